"""The key/values of a GGUF file llama.cpp can load: hyper-parameters and tokenizer.

From a GGUF input they are copied with their original value types (swtool
changes weights, never the model's description). From a Hugging Face
directory they are built the way llama.cpp's `convert_hf_to_gguf.py` builds
them for a byte-level BPE (gpt2-style) tokenizer: every id up to the model's
vocab size (missing ids become `[PAD<i>]` UNUSED tokens), token types
(CONTROL for special added tokens, USER_DEFINED for other added tokens),
merges and special ids through gguf-py's `SpecialVocab`, and the
pre-tokenizer name llama.cpp uses to pick its splitting regex. llama.cpp's
converter identifies the pre-tokenizer by hashing a sample tokenization; we
recognise the `tokenizer.json` pre-tokenizer structure instead, which is the
inverse of `swtool.model.tokenizer` reading those names.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType, TokenType
from gguf.gguf_writer import GGUFValue

from swtool.errors import SwtoolError
from swtool.families.config import ModelConfig, gguf_query_scale
from swtool.formats.base import Checkpoint
from swtool.formats.gguf.tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT

Metadata = dict[str, GGUFValue]

WRITTEN_BY_SWTOOL = ("general.architecture", "general.file_type", "general.quantization_version")
"""Keys every output sets itself, never copied from the input."""


def copied_metadata(reader: gguf.GGUFReader, arch: str) -> Metadata:
    """general.*, {arch}.* and tokenizer.* of a GGUF input, with their value types."""
    out: Metadata = {}
    for key, field in reader.fields.items():
        if key in WRITTEN_BY_SWTOOL or not key.startswith(("general.", f"{arch}.", "tokenizer.")):
            continue
        types = list(field.types)
        if types[0] == GGUFValueType.ARRAY and len(types) != 2:
            continue  # nested arrays: no llama/tokenizer key uses them, and gguf-py cannot write them
        sub_type = types[1] if types[0] == GGUFValueType.ARRAY else None
        if sub_type is not None and not field.data:
            continue  # gguf-py refuses to write empty arrays; llama.cpp treats a missing array as empty
        out[key] = GGUFValue(field.contents(), types[0], sub_type)
    return out


SLIDING_ARCHS = ("gemma2", "gemma3", "olmo2")
"""Architectures whose llama.cpp graph runs a sliding window on the layers `attention.sliding_window_pattern` marks."""


def hyperparameters(config: ModelConfig, arch: str) -> Metadata:
    """The `{arch}.*` keys llama.cpp's convert_hf_to_gguf.py writes for this family, through gguf-py's own setters
    (so key names and value types are llama.cpp's).

    Beyond the converter, a few keys it leaves to llama.cpp's defaults are written explicitly where the
    HF config can differ from them (Gemma's RoPE base, the sliding-window layer pattern); a model
    llama.cpp cannot represent is refused rather than written wrong.
    """
    check_representable(config, arch)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type")
    w = gguf.GGUFWriter(None, arch)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.rotary_dim or config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_vocab_size(config.vocab_size)
    if arch == "olmo":  # a LayerNorm without parameters, at a fixed epsilon (OlmoModel in the converter)
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_layer_norm_rms_eps(config.norm_eps)
    if config.clip_qkv is not None:
        w.add_clamp_kqv(config.clip_qkv)
    if config.num_experts:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.experts_per_token)
    if arch == "phi3":  # the converter always writes both; a window of 0 marks "none"
        w.add_rope_scaling_orig_ctx_len(phi3_original_context(config))
        w.add_sliding_window(config.sliding_window or 0)
        if kind == "longrope":
            w.add_rope_scaling_attn_factors(longrope_attention_factor(config))
    if arch in SLIDING_ARCHS and config.sliding_window:
        w.add_sliding_window(config.sliding_window)
        w.add_sliding_window_pattern([bool(config.sliding_layers[i]) if config.sliding_layers else True for i in range(config.num_layers)])
    if arch == "gemma3" and config.local_rope_theta is not None:
        w.add_rope_freq_base_swa(config.local_rope_theta)
    if config.attn_softcap:
        w.add_attn_logit_softcapping(config.attn_softcap)
    if config.final_softcap:
        w.add_final_logit_softcapping(config.final_softcap)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    return {k: v for k, v in w.kv_data[0].items() if k != "general.architecture"}


def phi3_original_context(config: ModelConfig) -> int:
    return int((config.rope_scaling or {}).get("original_max_position_embeddings") or config.extra.get("original_max_position_embeddings") or config.max_position_embeddings)


def longrope_attention_factor(config: ModelConfig) -> float:
    """The LongRoPE attention scaling: the config's, else the converter's (and transformers') formula."""
    scaling, original = config.rope_scaling or {}, phi3_original_context(config)
    scale = config.max_position_embeddings / original
    computed = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    return float(scaling.get("attention_factor") or computed)


def check_representable(config: ModelConfig, arch: str) -> None:
    """Refuse what llama.cpp's GGUF cannot express, so no file silently computes another model."""
    kind = (config.rope_scaling or {}).get("rope_type")
    # llama3 scaling travels as the rope_freqs tensor, Phi-3's LongRoPE as rope_factors_long/short (swtool.formats.gguf.writer)
    if kind not in (None, "linear", "yarn", "llama3") and not (kind == "longrope" and arch == "phi3"):
        raise SwtoolError(f"rope scaling {kind!r}: GGUF output supports linear, yarn and llama3 scaling (and LongRoPE for phi3)")
    if arch in ("gemma", "gemma2") and not config.tie_embeddings:
        raise SwtoolError(f"model_type {config.model_type!r} with an untied lm_head: llama.cpp's {arch} architecture always uses the embeddings as output")
    if arch in ("gemma2", "gemma3"):
        expected = gguf_query_scale(arch, config.hidden_size, config.num_heads, config.num_layers) or config.head_dim**-0.5
        actual = config.query_scale if config.query_scale is not None else config.head_dim**-0.5
        if not math.isclose(actual, expected, rel_tol=1e-6):
            raise SwtoolError(
                f"query_pre_attn_scalar {actual**-2:g}: GGUF has no key for it and llama.cpp's {arch} uses {expected**-2:g} for this shape, "
                "so the file would compute another model"
            )
    if arch == "gemma2" and not (config.attn_softcap and config.final_softcap):
        raise SwtoolError("gemma2 without attention or final logit soft-capping: llama.cpp's gemma2 always soft-caps both (50 and 30 when unset)")
    if config.sliding_window and arch not in (*SLIDING_ARCHS, "phi3") and config.model_type not in ("mistral", "mixtral"):
        raise SwtoolError(f"model_type {config.model_type!r} with a sliding window: llama.cpp's {arch} architecture runs none")


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level tokenizer.json pre-tokenizer, None when unrecognised."""
    if pre is None:
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(regex)
    return None


def looks_special(text: str) -> bool:
    """Added tokens convert_hf_to_gguf.py marks CONTROL even when tokenizer.json does not call them special."""
    return text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))


@contextmanager
def _quiet_gguf_logs() -> Iterator[None]:
    """gguf-py logs its progress; swtool reports through its own CLI only."""
    logger = logging.getLogger("gguf")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def adds_space_prefix(data: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "▁" before the text (llama.cpp's add_space_prefix):
    a `Prepend` normalizer (older files) or a `Metaspace` pre-tokenizer that prepends (newer ones)."""
    normalizer, pre = json.dumps(data.get("normalizer")), data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    metaspace = [s for s in steps if s.get("type") == "Metaspace"]
    if metaspace:
        return metaspace[0].get("prepend_scheme", "always" if metaspace[0].get("add_prefix_space", True) else "never") != "never"
    return '"Prepend"' in normalizer


def merge_scores(model: dict[str, Any]) -> dict[str, float]:
    """SentencePiece scores that make llama.cpp's SPM merging reproduce the BPE merges: llama.cpp merges the
    adjacent pair whose joined text is the token with the highest score, BPE the pair of lowest rank, so each
    token made by a merge scores minus the rank of the first merge that makes it."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def sentencepiece_score(token: str, kind: int, scores: dict[str, float]) -> float:
    """A token's score as llama.cpp's converter would give it: from the merges for normal tokens, -1000 for
    added and padding tokens (as `_set_vocab_sentencepiece` writes them), 0 for bytes, unk and control tokens."""
    if kind == TokenType.NORMAL:
        return scores.get(token, 0.0)
    return -1000.0 if kind in (TokenType.USER_DEFINED, TokenType.UNUSED) else 0.0


def tokenizer_metadata(directory: Path, vocab_size: int, arch: str) -> tuple[Metadata, list[str]]:
    """tokenizer.ggml.* keys built from an HF directory's tokenizer.json; also notes for the user.

    Byte-level BPE becomes llama.cpp's `gpt2` vocabulary (tokens, types, merges, pre-tokenizer name);
    BPE with byte fallback (the SentencePiece-derived tokenizers of Llama-2, Mistral, Mixtral, Phi-3
    and Gemma) becomes its `llama` (SentencePiece) vocabulary: tokens, scores from the merge ranks,
    types (BYTE for <0xNN>, UNKNOWN for the unk token) and add_space_prefix.
    """
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise SwtoolError(f"{directory}: no tokenizer.json; GGUF output embeds the tokenizer and needs it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SwtoolError(f"{path}: not a tokenizers JSON document ({exc})") from None
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or "ByteLevel" in json.dumps(data.get("decoder"))
    sentencepiece = model.get("type") == "BPE" and bool(model.get("byte_fallback")) and not byte_level
    if model.get("type") != "BPE" or not (byte_level or sentencepiece):
        raise SwtoolError(
            f"{path}: a {model.get('type')} tokenizer{'' if byte_level else ' without byte-level pre-tokenization or byte fallback'}; "
            "GGUF output supports byte-level BPE (gpt2-style) and byte-fallback BPE (SentencePiece-style) tokenizers"
        )
    notes = []
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    kinds: dict[int, int] = {i: TokenType.NORMAL for i in by_id}
    if sentencepiece:
        kinds.update({i: TokenType.BYTE for i, t in by_id.items() if BYTE_TOKEN.fullmatch(t)})
        kinds.update({i: TokenType.UNKNOWN for i, t in by_id.items() if t == model.get("unk_token")})
    for added in data.get("added_tokens") or []:
        i, text = int(added["id"]), added["content"]
        by_id[i] = text
        if kinds.get(i) not in (TokenType.UNKNOWN, TokenType.BYTE):
            kinds[i] = TokenType.CONTROL if added.get("special") or looks_special(text) else TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise SwtoolError(f"{path}: token id {max(by_id)} is outside the model's vocabulary of {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [int(kinds.get(i, TokenType.UNUSED)) for i in range(vocab_size)]

    collector = gguf.GGUFWriter(None, arch)
    if sentencepiece:
        scores = merge_scores(model)
        collector.add_tokenizer_model("llama")
        collector.add_tokenizer_pre("default")
        collector.add_token_list(tokens)
        collector.add_token_scores([sentencepiece_score(t, k, scores) for t, k in zip(tokens, types)])
        collector.add_token_types(types)
        collector.add_add_space_prefix(adds_space_prefix(data))
    else:
        pre = pre_tokenizer_name(data.get("pre_tokenizer"))
        if pre is None:
            pre = "default"
            notes.append("tokenizer.json: pre-tokenizer not recognised; wrote tokenizer.ggml.pre = default (llama.cpp's generic byte-level split)")
        collector.add_tokenizer_model("gpt2")
        collector.add_tokenizer_pre(pre)
        collector.add_token_list(tokens)
        collector.add_token_types(types)
    with _quiet_gguf_logs():
        special = gguf.SpecialVocab(directory, load_merges=not sentencepiece, n_vocab=vocab_size)
        special.add_to_gguf(collector, quiet=True)
    if not sentencepiece and not special.merges:
        notes.append("tokenizer.json has no merges; llama.cpp refuses a gpt2 tokenizer without tokenizer.ggml.merges")
    return {k: v for k, v in collector.kv_data[0].items() if k != "general.architecture"}, notes


def model_metadata(checkpoint: Checkpoint, arch: str) -> tuple[Metadata, list[str]]:
    """Everything that describes the model (not the weights' encoding): copied from GGUF, built from HF."""
    if checkpoint.format == "gguf":
        return copied_metadata(checkpoint.reader, arch), []
    config = checkpoint.config
    meta: Metadata = {"general.name": GGUFValue(config.name or checkpoint.path.name, GGUFValueType.STRING)}
    meta.update(hyperparameters(config, arch))
    tokens, notes = tokenizer_metadata(checkpoint.path, config.vocab_size, arch)
    meta.update(tokens)
    return meta, notes
