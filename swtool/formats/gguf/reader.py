"""GGUF files as llama.cpp writes them, read through gguf-py's memory-mapped reader.

Tensors are exposed under canonical Hugging Face names (gguf-py's own name map
does the translation) and in HF layout: quantized blocks are dequantized on
load (K-quants by swtool's C decoders, swtool.codecs.kquants, reading only the
rows asked for: prompt embedding rows, one head chunk; other block types by
gguf-py), and what llama.cpp's converter changes is undone: the Q/K row
permutation of llama-style models, Gemma's `1 +` folded into norm weights, and
routed experts merged into one 3D tensor per projection (`ffn_down_exps`),
which reads back as one 2D tensor per expert. So the same forward serves both
formats. Reports still use the stored GGUF names and coordinates, which are
unchanged for `ffn_down` (an expert's rows and columns index its slice).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer

from swtool.codecs import kquants
from swtool.errors import SwtoolError
from swtool.families import Family, family_for
from swtool.families.config import ModelConfig, from_gguf
from swtool.formats.base import STORAGE, Checkpoint, Rows
from swtool.formats.gguf.tokenizer import gguf_tokenizer, gguf_tokenizer_json
from swtool.formats.gguf.check import check_gguf

ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
EXPERT = re.compile(r"\.experts\.(\d+)\.")
"""A per-expert canonical name; llama.cpp stores `.experts.` merged across experts."""
BLOCK = re.compile(r"blk\.(\d+)\.")
STORED_FLOATS = {qtype: STORAGE[qtype.name].numpy for qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)}
"""Tensor types read as they are stored (float16 stays float16 until load() converts it)."""


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every key/value of the file as plain Python values (arrays of tokens included)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise SwtoolError(f"GGUF metadata key {key} is unreadable ({exc})") from None
    return meta


class Reader(gguf.GGUFReader):
    """gguf-py's reader, building the same fields and tensors several times faster.

    gguf-py slices its np.memmap for every value it parses (a tokenizer is
    ~250,000 of them), and each memmap slice runs memmap's Python-level
    __array_finalize__; it also walks arrays item by item through its generic
    parser. Opening SmolLM2 took 3.5 s of CPU, most of `swtool quantize
    --format gguf`. Here slices come from a plain ndarray view of the same
    mapping (the same read-only views of the file) and arrays of strings or
    scalars are walked in one loop.
    """

    _plain: np.ndarray | None = None

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> np.ndarray:
        if self._plain is None:
            self._plain = self.data.view(np.ndarray)
        dtype = np.dtype(dtype)
        count = int(count)
        array = self._plain[offset : offset + dtype.itemsize * count].view(dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return array if order == "I" else array.view(array.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[gguf.GGUFValueType]]:
        """Arrays of strings and of scalars (the tokenizer) in one loop, with gguf-py's parts, indices and types."""
        if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, length = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        item, count, offs = gguf.GGUFValueType(item_type[0]), int(length[0]), orig_offs + 12
        parts: list[np.ndarray] = [item_type, length]
        types = [gguf.GGUFValueType.ARRAY] + ([item] if count else [])
        if item == gguf.GGUFValueType.STRING:
            plain = self._plain
            for _ in range(count):
                size = plain[offs : offs + 8].view(np.uint64)
                end = offs + 8 + int(size[0])
                parts += (size, plain[offs + 8 : end])
                offs = end
            return offs - orig_offs, parts, list(range(3, 2 + 2 * count, 2)), types
        scalar = self.gguf_scalar_to_np.get(item)
        if scalar is None:  # nested arrays
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offs, scalar, count)
        parts += (values[i : i + 1] for i in range(count))
        return 12 + int(values.nbytes), parts, list(range(2, 2 + count)), types


def open_reader(path: Path) -> gguf.GGUFReader:
    """gguf-py's reader, once our own walk of the header found it sound; residual failures become one clear error."""
    check_gguf(path)
    try:
        return Reader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, struct.error, MemoryError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise SwtoolError(f"{path}: not a readable GGUF file ({message})") from None


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's `permute` (HF half-split RoPE rows -> interleaved)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's `permute`: HF half-split RoPE rows -> llama.cpp's interleaved order."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def qk_heads(family: Family, config: ModelConfig, name: str) -> int | None:
    """The head count a Q/K tensor is permuted by in GGUF, or None for every other tensor."""
    if not family.gguf_permute_qk:
        return None
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return config.num_heads
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return config.num_kv_heads
    return None


class GGUFCheckpoint(Checkpoint):
    format = "gguf"

    def __init__(self, path: Path):
        self.path = path
        self.files = [path]
        self.reader = open_reader(path)
        self.meta = read_metadata(self.reader)
        arch = self.meta.get("general.architecture")
        if not isinstance(arch, str):
            raise SwtoolError(f"{path}: GGUF has no general.architecture")
        if arch not in ARCH_BY_NAME:
            raise SwtoolError(f"{path}: GGUF architecture {arch!r} is unknown to gguf-py")
        self.family: Family = family_for(arch, int(self.meta.get(f"{arch}.expert_count") or 0))
        self.arch = arch
        tensors = {t.name: t for t in self.reader.tensors}
        embed = tensors.get("token_embd.weight")
        if embed is None:
            raise SwtoolError(f"{path}: GGUF has no token_embd.weight")
        vocab = int(embed.shape[-1])
        self.config = from_gguf(self.meta, arch, vocab, tied="output.weight" not in tensors)
        if "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:
            self.config = dataclasses.replace(self.config, rope_scaling=self._longrope(tensors))
        self._expert_of: dict[str, int] = {}
        """Canonical names that are one expert's slice of a merged 3D tensor -> that expert."""
        self._entries = self._canonical_map(tensors)

    def _longrope(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """Phi-3 LongRoPE as transformers spells it, from llama.cpp's factor tensors and keys."""
        factors = {}
        for kind in ("long", "short"):
            tensor = tensors.get(f"rope_factors_{kind}.weight")
            if tensor is None or tensor.tensor_type.name != "F32" or int(np.prod(tensor.shape)) * 2 != self.config.rotary_dim:
                raise SwtoolError(f"{self.path}: LongRoPE needs rope_factors_long and rope_factors_short, F32, rotary_dim / 2 = {self.config.rotary_dim // 2} values each")
            factors[kind] = [float(v) for v in np.asarray(tensor.data, dtype=np.float32).reshape(-1)]
        original = int(self.meta.get(f"{self.arch}.rope.scaling.original_context_length") or self.config.max_position_embeddings)
        scaling = {"rope_type": "longrope", "long_factor": factors["long"], "short_factor": factors["short"],
                   "original_max_position_embeddings": original, "factor": self.config.max_position_embeddings / original}
        if self.meta.get(f"{self.arch}.rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = float(self.meta[f"{self.arch}.rope.scaling.attn_factor"])
        return scaling

    def _canonical_map(self, tensors: dict[str, Any]) -> dict[str, Any]:
        # gguf-py's name map grows with the block count, which a hostile file can set to billions:
        # map only the blocks that tensors exist for (check_layout then reports any the metadata claims in vain)
        blocks = min(self.config.num_layers, len({m.group(1) for t in tensors if (m := BLOCK.match(t))}))
        name_map = gguf.get_tensor_name_map(ARCH_BY_NAME[self.arch], blocks)
        canonical: dict[str, Any] = {}
        wanted = list(self.family.global_tensors(self.config).values())
        for layer in range(blocks):
            wanted += self.family.layer_tensors(self.config, layer).values()
        merged = set()
        for name in dict.fromkeys(wanted):
            expert = EXPERT.search(name)
            lookup = EXPERT.sub(".experts.", name) if expert else name
            stored = name_map.get_name(lookup, try_suffixes=(".weight", ".bias"))
            if stored not in tensors:
                continue
            canonical[name] = tensors[stored]
            if expert:
                self._expert_of[name] = int(expert.group(1))
                merged.add(stored)
            else:
                del tensors[stored]
        # GGUF-only tensors (rope_freqs...) stay reachable by their own name
        canonical.update({k: v for k, v in tensors.items() if k not in merged})
        return canonical

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(int(d) for d in reversed(self._entries[name].shape))
        return shape[1:] if name in self._expert_of else shape

    def stored_name(self, name: str) -> str:
        return self._entries[name].name

    def expert_of(self, name: str) -> int | None:
        """The expert whose slice of a merged 3D tensor `name` is, None for a tensor stored on its own."""
        return self._expert_of.get(name)

    def stored_dtype(self, name: str) -> str:
        return self._entries[name].tensor_type.name

    def _read(self, name: str, rows: Rows) -> torch.Tensor:
        shape = self.shape(name)
        permute_heads = qk_heads(self.family, self.config, name)
        wanted = rows if permute_heads is None and len(shape) > 1 else None  # permuted Q/K: rows are known once unpermuted
        raw, count = self._stored_rows(name, wanted)
        tensor = self._entries[name]
        shape = (count, *shape[1:]) if len(shape) > 1 else shape
        if tensor.tensor_type in STORED_FLOATS:
            values = raw.view(STORED_FLOATS[tensor.tensor_type])  # load() converts, once
        elif tensor.tensor_type in kquants.DECODED:  # swtool's C decoders, on the selected rows' bytes only
            values = kquants.decode(raw, tensor.tensor_type, shape)
        else:
            try:
                values = gguf.quants.dequantize(raw, tensor.tensor_type)
            except NotImplementedError:
                raise SwtoolError(f"{self.path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf-py cannot dequantize") from None
            values = np.asarray(values, dtype=np.float32)  # a fresh array for every block type
            if not values.flags.writeable:
                values = values.copy()
        out = torch.from_numpy(values.reshape(shape))
        if permute_heads is not None:
            out = unpermute_qk(out, permute_heads)
            if rows is not None:
                out = out[rows]
        if self.family.gguf_norm_offset and name.endswith("norm.weight"):
            out = out.to(torch.float32) - self.family.gguf_norm_offset
        return out

    def _stored_rows(self, name: str, rows: Rows) -> tuple[np.ndarray, int]:
        """The stored bytes of `rows` of a tensor (all of them for None) as (rows, bytes per row) uint8, and the row count.

        Read with pread, not through gguf-py's memory map: every page of a map that has been
        touched counts in the process's resident set until the map goes, so a scan through the
        map grew by the whole file (a 1.1 GB Q4_K_M peaked at 2.1 GB); reads keep one tensor, or
        only the rows asked for (the prompt's embedding rows, one chunk of the head).
        """
        tensor = self._entries[name]
        shape = self.shape(name)
        total = math.prod(shape[:-1]) if len(shape) > 1 else 1
        expert = self._expert_of.get(name)
        slab = int(tensor.n_bytes) // (int(tensor.shape[-1]) if expert is not None else 1)
        start = int(tensor.data_offset) + (expert * slab if expert is not None else 0)
        row_bytes = slab // total
        if rows is None:
            picked: range | np.ndarray = range(total)
        elif isinstance(rows, slice):
            picked = range(total)[rows]
        else:
            picked = np.asarray(rows, dtype=np.int64).reshape(-1)
            if len(picked) and (picked.min() < -total or picked.max() >= total):
                raise IndexError(f"rows out of range for {name} ({total} rows)")
            picked = picked % total if len(picked) else picked
        out = np.empty((len(picked), row_bytes), dtype=np.uint8)
        if isinstance(picked, range) and picked.step == 1:  # one contiguous read
            self._pread(out.reshape(-1), start + picked.start * row_bytes)
        else:
            for index, row in enumerate(picked):
                self._pread(out[index], start + int(row) * row_bytes)
        return out, len(picked)

    def _pread(self, buffer: np.ndarray, offset: int) -> None:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            count = os.preadv(self._descriptor, [view[done:]], offset + done)
            if count <= 0:
                raise SwtoolError(f"{self.path}: file ends inside tensor data (truncated?)")
            done += count

    @functools.cached_property
    def _descriptor(self) -> int:
        """One read-only descriptor shared by every thread (pread carries its own offset)."""
        return os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if "_descriptor" in self.__dict__:
            os.close(self.__dict__.pop("_descriptor"))

    def build_tokenizer(self) -> Tokenizer:
        return gguf_tokenizer(self.meta)

    def tokenizer_json(self) -> str:

        return gguf_tokenizer_json(self.meta)
