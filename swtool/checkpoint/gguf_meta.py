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
inverse of `swtool.tokenizer` reading those names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType, TokenType
from gguf.gguf_writer import GGUFValue

from swtool.checkpoint.base import Checkpoint
from swtool.config import ModelConfig
from swtool.errors import SwtoolError
from swtool.tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT

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


def hyperparameters(config: ModelConfig, arch: str) -> Metadata:
    """The `{arch}.*` keys convert_hf_to_gguf.py writes for a llama-style model."""
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    keys: list[tuple[str, Any, GGUFValueType]] = [
        ("context_length", config.max_position_embeddings, u32),
        ("embedding_length", config.hidden_size, u32),
        ("block_count", config.num_layers, u32),
        ("feed_forward_length", config.intermediate_size, u32),
        ("attention.head_count", config.num_heads, u32),
        ("attention.head_count_kv", config.num_kv_heads, u32),
        ("rope.freq_base", config.rope_theta, f32),
        ("attention.layer_norm_rms_epsilon", config.norm_eps, f32),
        ("attention.key_length", config.head_dim, u32),
        ("attention.value_length", config.head_dim, u32),
        ("rope.dimension_count", config.head_dim, u32),
        ("vocab_size", config.vocab_size, u32),
    ]
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind in ("linear", "yarn"):
        keys += [("rope.scaling.type", kind, GGUFValueType.STRING), ("rope.scaling.factor", float(scaling["factor"]), f32)]
        if kind == "yarn":
            keys.append(("rope.scaling.original_context_length", int(scaling["original_max_position_embeddings"]), u32))
    elif kind not in (None, "llama3"):  # llama3 scaling travels as the rope_freqs tensor (swtool.checkpoint.gguf_out)
        raise SwtoolError(f"rope scaling {kind!r}: GGUF output supports linear, yarn and llama3 scaling")
    return {f"{arch}.{key}": GGUFValue(value, vtype) for key, value, vtype in keys}


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


def tokenizer_metadata(directory: Path, vocab_size: int, arch: str) -> tuple[Metadata, list[str]]:
    """tokenizer.ggml.* keys built from an HF directory's tokenizer.json; also notes for the user."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise SwtoolError(f"{directory}: no tokenizer.json; GGUF output embeds the tokenizer and needs it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SwtoolError(f"{path}: not a tokenizers JSON document ({exc})") from None
    pre = pre_tokenizer_name(data.get("pre_tokenizer"))
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or "ByteLevel" in json.dumps(data.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise SwtoolError(
            f"{path}: a {model.get('type')} tokenizer{'' if byte_level else ' without byte-level pre-tokenization'}; "
            "GGUF output supports byte-level BPE (gpt2-style) tokenizers"
        )
    notes = []
    if pre is None:
        pre = "default"
        notes.append("tokenizer.json: pre-tokenizer not recognised; wrote tokenizer.ggml.pre = default (llama.cpp's generic byte-level split)")
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    kinds: dict[int, int] = {i: TokenType.NORMAL for i in by_id}
    for added in data.get("added_tokens") or []:
        i, text = int(added["id"]), added["content"]
        by_id[i] = text
        kinds[i] = TokenType.CONTROL if added.get("special") or looks_special(text) else TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise SwtoolError(f"{path}: token id {max(by_id)} is outside the model's vocabulary of {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [int(kinds.get(i, TokenType.UNUSED)) for i in range(vocab_size)]

    collector = gguf.GGUFWriter(None, arch)
    collector.add_tokenizer_model("gpt2")
    collector.add_tokenizer_pre(pre)
    collector.add_token_list(tokens)
    collector.add_token_types(types)
    with _quiet_gguf_logs():
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
        special.add_to_gguf(collector, quiet=True)
    if not special.merges:
        notes.append("tokenizer.json has no merges; llama.cpp refuses a gpt2 tokenizer without tokenizer.ggml.merges")
    return {k: v for k, v in collector.kv_data[0].items() if k != "general.architecture"}, notes


def model_metadata(checkpoint: Checkpoint, arch: str) -> tuple[Metadata, list[str]]:
    """Everything that describes the model (not the weights' encoding): copied from GGUF, built from HF."""
    reader = getattr(checkpoint, "reader", None)
    if reader is not None:
        return copied_metadata(reader, arch), []
    config = checkpoint.config
    meta: Metadata = {"general.name": GGUFValue(config.name or checkpoint.path.name, GGUFValueType.STRING)}
    meta.update(hyperparameters(config, arch))
    tokens, notes = tokenizer_metadata(checkpoint.path, config.vocab_size, arch)
    meta.update(tokens)
    return meta, notes
