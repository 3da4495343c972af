"""A `tokenizers` pipeline rebuilt from a GGUF file's vocabulary metadata.

A GGUF file embeds its vocabulary (`tokenizer.ggml.*`); we rebuild an
equivalent `tokenizers` pipeline from it so that GGUF-only models tokenise
without network access, and so `dequantize` can write a `tokenizer.json`.
"""

from __future__ import annotations

from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from swtool.errors import SwtoolError

CONTROL, USER_DEFINED = 3, 4
"""llama.cpp's token types whose text must match as a whole (special tokens)."""

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` name for byte-level BPE vocabularies."""
    if pre in ("llama3", "llama-bpe", "dbrx", "smaug-bpe"):
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in ("qwen2", "deepseek-r1-qwen"):
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


NORMAL, BYTE = 1, 6


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """llama.cpp's `llama` (SentencePiece) tokenizer as BPE merges.

    llama.cpp repeatedly joins the adjacent pair whose joined text is the token of highest score
    (not a Viterbi search over scores); that is BPE whose merges are every split of every token into
    two tokens, ranked by the joined token's score.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, (text, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind not in (NORMAL, USER_DEFINED) or len(text) < 2:
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in ids and right in ids:
                ranked.append((-float(score), i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def gguf_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer as a `tokenizers` object, built directly (a JSON round trip cost as much again)."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise SwtoolError("GGUF: no tokenizer.ggml.tokens; the file carries no tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if model == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
        tok.pre_tokenizer = _byte_level_pre(str(meta.get("tokenizer.ggml.pre", "default")))
        tok.decoder = decoders.ByteLevel()
    elif model == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        unk_token = tokens[int(unk)] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=_spm_merges(tokens, scores, types), unk_token=unk_token, byte_fallback=True))
        steps = [normalizers.Replace(" ", "\u2581")]
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            steps.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(steps)
        tok.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        raise SwtoolError(f"GGUF: tokenizer model {model!r} is not supported (supported: gpt2, llama)")
    # both match as a whole; only CONTROL tokens are special (llama.cpp reads their text as text without parse_special)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", model == "llama") and bos is not None:
        bos_text = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_text} $A", pair=f"{bos_text} $A $B", special_tokens=[(bos_text, int(bos))]
        )
    return tok


def gguf_tokenizer_json(meta: dict[str, Any]) -> str:
    """The same tokenizer as a `tokenizer.json` document (for HF export)."""
    return gguf_tokenizer(meta).to_str()
