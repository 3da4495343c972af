"""A `tokenizers` pipeline rebuilt from a GGUF file's vocabulary metadata.

A GGUF file embeds its vocabulary (`tokenizer.ggml.*`); we rebuild an
equivalent `tokenizers` pipeline from it so that GGUF-only models tokenise
without network access, and so `dequantize` can write a `tokenizer.json`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
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

HASH_BASE = 0x9E3779B97F4A7C15
"""Odd multiplier of the polynomial string hash (mod 2**64) that tests every split of every token at once."""
SPLIT_CHUNK = 1 << 16
"""Tokens whose splits are hashed at once: bounds the temporary arrays (~7 splits a token, a few uint64 arrays each)."""


def _prefix_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(prefix, inverse) over the texts joined, so that `_substring_hashes(prefix, inverse, a, b)` hashes characters
    a..b: sum(code[a + j] * HASH_BASE**j), the same value for equal substrings wherever they sit (uint64 wraps)."""
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64) + 1  # + 1: "a" != "a\0"
    powers = np.full(len(codes) + 1, HASH_BASE, dtype=np.uint64)
    inverse = np.full(len(codes) + 1, pow(HASH_BASE, -1, 1 << 64), dtype=np.uint64)
    powers[0] = inverse[0] = 1
    np.cumprod(powers, out=powers)
    np.cumprod(inverse, out=inverse)
    prefix = np.zeros(len(codes) + 1, dtype=np.uint64)
    np.cumsum(codes * powers[:-1], out=prefix[1:])
    return prefix, inverse


def _substring_hashes(prefix: np.ndarray, inverse: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    return (prefix[end] - prefix[start]) * inverse[start]


def _member(hashes: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Which hashes are in the sorted array `known` (queries sorted first: binary searches in order stay in cache)."""
    order = np.argsort(hashes)
    at = np.minimum(np.searchsorted(known, hashes[order]), len(known) - 1)
    found = np.empty(len(hashes), dtype=bool)
    found[order] = known[at] == hashes[order]
    return found


def _split_candidates(tokens: list[str], types: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(token index, cut) of every split of a NORMAL or USER_DEFINED token whose two halves hash like tokens:
    every split into two tokens, and (on a hash collision, never seen) a split whose half is no token."""
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))

    def bounds(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ends = np.cumsum(sizes)
        return ends - sizes, ends

    known = []
    for first in range(0, len(tokens), SPLIT_CHUNK):
        prefix, inverse = _prefix_hashes(tokens[first : first + SPLIT_CHUNK])
        known.append(_substring_hashes(prefix, inverse, *bounds(lengths[first : first + SPLIT_CHUNK])))
    known_sorted = np.sort(np.concatenate(known))
    eligible = np.flatnonzero(np.isin(np.asarray(types), (NORMAL, USER_DEFINED)) & (lengths >= 2))
    found_token, found_cut = [], []
    for first in range(0, len(eligible), SPLIT_CHUNK):
        block = eligible[first : first + SPLIT_CHUNK]
        prefix, inverse = _prefix_hashes([tokens[i] for i in block])
        starts, ends = bounds(lengths[block])
        cuts = lengths[block] - 1
        owner = np.repeat(np.arange(len(block)), cuts)
        cut = np.arange(len(owner)) - np.repeat(np.cumsum(cuts) - cuts, cuts) + 1
        middle = starts[owner] + cut
        hit = _member(_substring_hashes(prefix, inverse, starts[owner], middle), known_sorted)
        owner, cut, middle = owner[hit], cut[hit], middle[hit]
        hit = _member(_substring_hashes(prefix, inverse, middle, ends[owner]), known_sorted)
        found_token.append(block[owner[hit]])
        found_cut.append(cut[hit])
    return np.concatenate(found_token or [np.zeros(0, np.int64)]), np.concatenate(found_cut or [np.zeros(0, np.int64)])


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """llama.cpp's `llama` (SentencePiece) tokenizer as BPE merges.

    llama.cpp repeatedly joins the adjacent pair whose joined text is the token of highest score
    (not a Viterbi search over scores); that is BPE whose merges are every split of every token into
    two tokens, ranked by the joined token's score (then by token id and cut).

    A 262k-token vocabulary has ~1.6M splits: slicing and looking each up as Python strings took
    1.2 s, so the splits are found by hash in numpy and only the ~0.5M merges become strings. A hash
    collision can only add a pair whose half is no token, which `tokenizers` refuses (`_spm_bpe`).
    """
    token, cut = _split_candidates(tokens, types)
    order = np.lexsort((cut, token, -np.asarray(scores, dtype=np.float64)[token]))
    return [(text[:c], text[c:]) for text, c in zip(map(tokens.__getitem__, token[order].tolist()), cut[order].tolist())]


def _spm_bpe(vocab: dict[str, int], tokens: list[str], scores: list[float], types: list[int], unk_token: str | None) -> models.BPE:
    """The BPE model of a `llama` vocabulary. `tokenizers` refuses a merge whose half is not in the vocabulary,
    which only a hash collision in `_split_candidates` could produce: then such pairs are dropped."""
    merges = _spm_merges(tokens, scores, types)
    try:
        return models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, byte_fallback=True)
    except Exception:  # the tokenizers library raises bare Exceptions
        merges = [(left, right) for left, right in merges if left in vocab and right in vocab]
        return models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, byte_fallback=True)


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
        tok = Tokenizer(_spm_bpe({t: i for i, t in enumerate(tokens)}, tokens, scores, types, unk_token))
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
