"""GGUF output that stock llama.cpp loads: plan every tensor from headers, then stream the data.

Pass one (`plan_gguf`) reads only shapes and metadata: it names every tensor
as llama.cpp does, picks its GGML type, and gathers the key/values. Pass two
(`write_gguf`) writes the header, the key/values and the tensor infos with
gguf-py's low-level calls, then loads, permutes, encodes and writes one tensor
at a time (never `GGUFWriter.add_tensor`, which keeps every array until the end).

Type choice for `--type T` (a single type or one of llama-quantize's mixes,
Q4_K_M and friends): every quantized type is exactly llama-quantize's, from
swtool.formats.gguf.mixes (llama.cpp b11434's per-tensor rules, the head's
Q6_K, tied embeddings, row-length fallbacks with one note each; the legacy
single types Q4_0..Q8_0 included: their head is Q6_K where its rows fill
256-blocks, Q8_0 otherwise, as llama-quantize writes it). F32/F16/BF16 keep
1-D tensors F32 and convert every 2-D one, as llama.cpp's converter does.
With keep_super, tensors holding a super weight get the super type (Q8_0,
Q6_K or F16) when that is more precise than their planned type. Super
weights are never removed from a tensor: llama.cpp cannot apply a side
table, so a GGUF without them is a broken model. Their coordinates (in the
stored tensor) and fp16 values are recorded under `swtool.super_weights.*`,
beside provenance under `swtool.*`; llama.cpp ignores unknown keys (but would
refuse unknown tensors, so none are added).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGUFValueType
from gguf.gguf_writer import GGUFValue, WriterState

from swtool.codecs.ggml import (
    TYPES,
    NonFiniteError,
    QType,
    can_encode,
    encode,
    encoded_nbytes,
)
from swtool.errors import SwtoolError
from swtool.families import family_for
from swtool.families.rope import llama3_rope_factors
from swtool.formats.base import Checkpoint, Held, float_dtype
from swtool.formats.gguf.metadata import Metadata, model_metadata
from swtool.formats.gguf.mixes import (
    Fallback,
    TensorSpec,
    fit_row,
    model_facts,
    parse_mix,
    plan_mix,
)
from swtool.formats.gguf.reader import ARCH_BY_NAME, EXPERT, permute_qk, qk_heads
from swtool.formats.outfile import OutputFile
from swtool.workers import parallel_chunks

SUPER_TYPES = ("Q8_0", "Q6_K", "F16")
PRECISION = (QType.Q2_K, QType.Q3_K, QType.Q4_0, QType.Q4_K, QType.Q4_1, QType.Q5_0, QType.Q5_K, QType.Q5_1, QType.Q6_K,
             QType.Q8_0, QType.BF16, QType.F16, QType.F32)
"""Types from least to most precise (BF16 has fewer mantissa bits than F16)."""
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class GGUFTensor:
    source: str
    """Canonical name in the input checkpoint."""
    name: str
    """Name in the GGUF file."""
    shape: tuple[int, ...]
    """Shape as torch loads it, (out, in) for linear weights (GGUF stores it reversed)."""
    qtype: QType
    permute_heads: int | None = None
    """Re-apply llama.cpp's Q/K row permutation with this many heads."""
    offset: float = 0.0
    """Added to the values, as llama.cpp's converter folds Gemma's `1 +` into norm weights."""
    values: torch.Tensor | None = field(default=None, compare=False)
    """The data of a tensor llama.cpp needs that the input does not hold (rope_freqs)."""
    stacked: tuple[str, ...] = ()
    """Routed experts' canonical names, stacked along a new first axis into this one tensor
    (llama.cpp's `ffn_*_exps`, expert order); `source` is the first. Empty for every other tensor."""
    importance: np.ndarray | None = field(default=None, compare=False)
    """(matrices, row length) per-column weights from an importance matrix (one row per expert of a
    stacked tensor), which the quantizers weight their rounding error by, as llama-quantize --imatrix."""

    @property
    def nbytes(self) -> int:
        return encoded_nbytes(self.shape, self.qtype)


@dataclass
class GGUFPlan:
    arch: str
    qtype: QType
    tensors: list[GGUFTensor]
    metadata: Metadata
    notes: list[str] = field(default_factory=list)
    """What the user should hear about: fallbacks, unrecognised tokenizer parts."""


def parse_type(name: str, option: str = "--type", allowed: Sequence[str] = tuple(TYPES)) -> QType:
    if name.upper() not in allowed:
        raise SwtoolError(f"{option} {name!r} is not a GGUF type swtool writes; choose one of {', '.join(allowed)}")
    return QType[name.upper()]


def gguf_arch(checkpoint: Checkpoint) -> str:
    """llama.cpp's architecture name for the checkpoint's family; a clear error where llama.cpp has none."""
    config = checkpoint.config
    arch = family_for(config.model_type, config.num_experts).gguf_arch
    if arch is None or arch not in ARCH_BY_NAME:
        raise SwtoolError(f"model_type {config.model_type!r}: llama.cpp has no architecture for it, so it cannot be written as GGUF")
    return arch


def expert_index(name: str) -> int:
    found = EXPERT.search(name)
    return int(found.group(1)) if found else -1


def gguf_names(checkpoint: Checkpoint, arch: str) -> dict[str, list[str]]:
    """GGUF name -> the canonical names it is made of (one, or every routed expert in order), in input order.

    A GGUF input keeps its own names and order (and its GGUF-only tensors such
    as rope_freqs); an HF input is mapped with gguf-py's tensor name map, keeping
    only the tensors the family describes (a tied head is not written twice),
    and routed experts are merged as llama.cpp's converter merges them.
    """
    out: dict[str, list[str]] = {}
    if checkpoint.format == "gguf":
        for name in checkpoint.names():
            out.setdefault(checkpoint.stored_name(name), []).append(name)
        order = [t.name for t in checkpoint.reader.tensors]
        out = {stored: out[stored] for stored in order}
    else:
        config = checkpoint.config
        family = family_for(config.model_type, config.num_experts)
        wanted = set(family.global_tensors(config).values())
        for layer in range(config.num_layers):
            wanted.update(family.layer_tensors(config, layer).values())
        name_map = gguf.get_tensor_name_map(ARCH_BY_NAME[arch], config.num_layers)
        for name in checkpoint.names():
            if name not in wanted:
                continue
            stored = name_map.get_name(EXPERT.sub(".experts.", name), try_suffixes=(".weight", ".bias"))
            if stored is None:
                raise SwtoolError(f"{checkpoint.path}: tensor {name} has no llama.cpp name for architecture {arch}")
            out.setdefault(stored, []).append(name)
    return {stored: sorted(names, key=expert_index) for stored, names in out.items()}


def float_type(shape: tuple[int, ...], base: QType) -> QType:
    """F32/F16/BF16 output: 1-D tensors (norms, biases) stay F32, as llama.cpp's converter writes them."""
    return QType.F32 if len(shape) < 2 else base


def plan_gguf(
    checkpoint: Checkpoint,
    type_name: str,
    *,
    super_weights: Sequence[Held] = (),
    keep_super: bool = False,
    super_type: str = "Q8_0",
    provenance: dict[str, str] | None = None,
    importance: Mapping[str, np.ndarray] | None = None,
) -> GGUFPlan:
    """Every tensor's GGUF name, shape and type, and every key/value, from headers alone.

    `importance`: GGUF weight name -> (matrices, row length) per-column weights (an imatrix's
    means); the tensors it names are quantized with them, and the mixes' imatrix-only rules apply.
    """
    mix = parse_mix(type_name)
    protect = parse_type(super_type, "--super-type", SUPER_TYPES) if keep_super else None
    arch = gguf_arch(checkpoint)
    family = family_for(checkpoint.config.model_type, checkpoint.config.num_experts)
    holders = {w.tensor for w in super_weights}
    metadata, notes = model_metadata(checkpoint, arch)
    entries = []
    for name, sources in gguf_names(checkpoint, arch).items():
        stacked = tuple(sources) if expert_index(sources[0]) >= 0 else ()
        shape = (len(stacked), *checkpoint.shape(sources[0])) if stacked else tuple(checkpoint.shape(sources[0]))
        entries.append((name, sources, stacked, shape))
    importance = importance or {}
    mixed = mix_types(checkpoint, arch, metadata, entries, mix.name, notes, bool(importance)) if mix.quantized else {}
    fallbacks: list[Fallback] = []
    tensors: list[GGUFTensor] = []
    for name, sources, stacked, shape in entries:
        source = sources[0]
        qtype = mixed[name] if mix.quantized else float_type(shape, mix.default)
        if holders.intersection(sources) and protect is not None and len(shape) > 1 and PRECISION.index(protect) > PRECISION.index(qtype):
            qtype = fit_row(name, shape[-1], protect, fallbacks)  # Q6_K on rows it cannot take: Q8_0, as llama-quantize
        elif not can_encode(shape, qtype):
            qtype = fit_row(name, shape[-1], qtype, fallbacks)
        offset = family.gguf_norm_offset if source.endswith("norm.weight") else 0.0
        weights = tensor_importance(name, shape, importance)
        tensors.append(GGUFTensor(source, name, shape, qtype, qk_heads(family, checkpoint.config, source), offset, stacked=stacked, importance=weights))
    notes.extend(f.note for f in fallbacks)
    for name, values in (rope_tensors(checkpoint.config) if checkpoint.format != "gguf" else {}).items():
        tensors.append(GGUFTensor(name, name, tuple(values.shape), QType.F32, values=values))
    metadata["general.file_type"] = GGUFValue(int(mix.file_type), GGUFValueType.UINT32)
    metadata["general.quantization_version"] = GGUFValue(gguf.GGML_QUANT_VERSION, GGUFValueType.UINT32)
    if keep_super and super_weights:
        metadata.update(super_weight_metadata(checkpoint, tensors, super_weights, super_type.upper()))
    for key, value in (provenance or {}).items():  # swtool.provenance's fields, stored as they are named
        metadata[key] = GGUFValue(value, GGUFValueType.STRING)
    return GGUFPlan(arch, mix.default, tensors, metadata, notes)


def tensor_importance(name: str, shape: tuple[int, ...], importance: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The imatrix weights of one tensor, checked against its shape as llama-quantize checks them
    (a row per matrix: one, or one per expert); None where the imatrix has no entry for it."""
    weights = importance.get(name)
    if weights is None or len(shape) < 2:
        return None
    matrices = shape[0] if len(shape) == 3 else 1
    if weights.shape != (matrices, shape[-1]):
        raise SwtoolError(f"--imatrix: entry {name} holds {list(weights.shape)} values, the tensor needs {[matrices, shape[-1]]} (an imatrix of another model?)")
    return weights


def mix_types(checkpoint: Checkpoint, arch: str, metadata: Metadata, entries: list, mix: str, notes: list[str], has_imatrix: bool = False) -> dict[str, QType]:
    """Each tensor's type at a K-quant mix, as llama-quantize would pick it from the F16 file llama.cpp's
    converter makes of this checkpoint (or from this GGUF), with its fallback notes appended to `notes`.

    The converter stores what llama-quantize never quantizes (1-D tensors, norms, MoE routers) as F32,
    so an HF input's stored type is F32 for the rules' purpose; a GGUF input's is its own."""
    facts = model_facts(arch, {key: value.value for key, value in metadata.items()})
    specs = [
        TensorSpec(name, shape, QType[checkpoint.stored_dtype(sources[0])] if checkpoint.format == "gguf" else QType.F32)
        for name, sources, _, shape in entries
    ]
    plan = plan_mix(mix, specs, facts, has_imatrix=has_imatrix)
    notes.extend(plan.notes)
    return plan.types


def rope_tensors(config) -> dict[str, torch.Tensor]:
    """The RoPE tensors llama.cpp's converter generates from an HF config: llama3 scaling's `rope_freqs`,
    Phi-3 LongRoPE's `rope_factors_long` and `rope_factors_short`."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(config)}
    if scaling.get("rope_type") == "longrope":
        return {f"rope_factors_{kind}.weight": torch.tensor(scaling[f"{kind}_factor"], dtype=torch.float32) for kind in ("long", "short")}
    return {}


def stored_row(tensor: GGUFTensor, row: int) -> int:
    """Where HF row `row` of `tensor` lands in the GGUF file (moved only by the Q/K permutation)."""
    if tensor.permute_heads is None:
        return row
    order = permute_qk(torch.arange(tensor.shape[0]), tensor.permute_heads)
    return int((order == row).nonzero()[0, 0])


def super_weight_metadata(checkpoint: Checkpoint, tensors: list[GGUFTensor], weights: Sequence[Held], super_type: str) -> Metadata:
    """swtool.super_weights.*: parallel arrays of GGUF tensor name, row, col (as stored) and fp16 value;
    plus `expert` (the slice of a merged `ffn_*_exps` tensor, -1 elsewhere) when any weight is in a routed expert."""
    by_source = {source: t for t in tensors for source in (t.stacked or (t.source,))}
    names, rows, cols, values, experts = [], [], [], [], []
    for w in sorted(weights, key=lambda w: (w.tensor, w.row, w.col)):
        tensor = by_source.get(w.tensor)
        if tensor is None:
            raise SwtoolError(f"super weight tensor {w.tensor} is not written to the GGUF file")
        names.append(tensor.name)
        rows.append(stored_row(tensor, w.row))
        cols.append(w.col)
        values.append(checkpoint.value(w, torch.float16))
        experts.append(tensor.stacked.index(w.tensor) if tensor.stacked else -1)
    arr, prefix = GGUFValueType.ARRAY, "swtool.super_weights."
    out = {
        prefix + "tensor": GGUFValue(names, arr, GGUFValueType.STRING),
        prefix + "row": GGUFValue(rows, arr, GGUFValueType.UINT32),
        prefix + "col": GGUFValue(cols, arr, GGUFValueType.UINT32),
        prefix + "value": GGUFValue(values, arr, GGUFValueType.FLOAT32),
        prefix + "type": GGUFValue(super_type, GGUFValueType.STRING),
    }
    if any(e >= 0 for e in experts):
        out[prefix + "expert"] = GGUFValue(experts, arr, GGUFValueType.INT32)
    return out


def encoded_tensor(checkpoint: Checkpoint, tensor: GGUFTensor) -> np.ndarray:
    if tensor.stacked:  # one expert at a time: memory holds one expert's weights plus the encoded bytes
        rows = tensor.importance if tensor.importance is not None else [None] * len(tensor.stacked)
        return np.stack([
            encoded_tensor(checkpoint, replace(tensor, source=s, shape=tensor.shape[1:], stacked=(), importance=None if r is None else r[None]))
            for s, r in zip(tensor.stacked, rows)
        ])  # fmt: skip
    # fp16/bf16 weights go to the codecs as they are stored (exact either way, and the codecs
    # read them without an fp32 copy); a folded norm offset is added in float32, as the converter does
    dtype = float_dtype(checkpoint.stored_dtype(tensor.source), torch.float32) if tensor.values is None and not tensor.offset else torch.float32
    weight = tensor.values if tensor.values is not None else checkpoint.load(tensor.source, dtype)
    if tensor.permute_heads is not None:
        weight = permute_qk(weight, tensor.permute_heads)
    if tensor.offset:
        weight = weight + tensor.offset
    try:
        return encode(weight, tensor.qtype, weights=None if tensor.importance is None else tensor.importance[0])
    except NonFiniteError as exc:
        raise SwtoolError(f"{checkpoint.path}: tensor {checkpoint.stored_name(tensor.source)} {exc}") from None


class Writer(gguf.GGUFWriter):
    """gguf-py's writer, packing arrays (a tokenizer: ~150,000 strings and numbers) in one call
    instead of one Python call per item, which took most of the CPU time of writing a small model,
    and writing one file (no splits) through swtool's OutputFile. The bytes are the same."""

    def open_output_file(self, path: Path | None = None) -> None:
        if self.state is WriterState.NO_FILE:
            self.path = path or self.path
            self.fout = [OutputFile(self.path)]  # type: ignore[list-item]
            self.state = WriterState.EMPTY

    def write_tensor_data(self, tensor: np.ndarray, tensor_endianess: gguf.GGUFEndian | None = None) -> None:
        """gguf-py's, less the byte swaps and splits swtool never asks for, writing the array's own bytes
        (numpy's `tofile` needs a plain file)."""
        if self.state not in (WriterState.TI_DATA, WriterState.WEIGHTS) or self.fout is None:
            raise ValueError(f"expected the tensor infos to be written, got {self.state}")
        out = self.fout[0]
        info = self.tensors[0].pop(next(iter(self.tensors[0])))
        assert info.nbytes == tensor.nbytes
        self.write_padding(out, out.tell())
        out.write(memoryview(np.ascontiguousarray(tensor)).cast("B"))
        self.write_padding(out, tensor.nbytes)
        self.state = WriterState.WEIGHTS

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None) -> bytes:
        scalar = self._simple_value_packing.get(sub_type) if sub_type is not None else None
        if vtype != GGUFValueType.ARRAY or not isinstance(val, Sequence) or not val or (scalar is None and sub_type != GGUFValueType.STRING):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        order = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
        head = struct.pack(f"{order}IIQ", vtype, sub_type, len(val)) if add_vtype else struct.pack(f"{order}IQ", sub_type, len(val))
        if scalar is not None:
            return head + struct.pack(f"{order}{len(val)}{scalar}", *val)
        length = struct.Struct(f"{order}Q").pack
        encoded = [item.encode("utf-8") if isinstance(item, str) else item for item in val]
        return head + b"".join(length(len(item)) + item for item in encoded)


def write_gguf(checkpoint: Checkpoint, plan: GGUFPlan, path: Path, progress: Progress | None = None) -> None:
    """Write the planned file at `path`: header, key/values and tensor infos first, then one tensor at a time."""
    writer = Writer(path, plan.arch)
    writer.kv_data[0].update(plan.metadata)
    for tensor in plan.tensors:
        byte_shape = (*tensor.shape[:-1], encoded_nbytes(tensor.shape[-1:], tensor.qtype))
        writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), tensor.nbytes, raw_dtype=tensor.qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with parallel_chunks():  # one pool of worker threads for every tensor's chunks
            for index, tensor in enumerate(plan.tensors):
                writer.write_tensor_data(encoded_tensor(checkpoint, tensor))
                if progress:
                    progress(index + 1, len(plan.tensors))
    except BaseException:
        for out in writer.fout or ():
            out.abandon()
        raise
    writer.close()


def save_gguf(checkpoint: Checkpoint, plan: GGUFPlan, out: Path, *, force: bool = False, progress: Progress | None = None) -> None:
    """`write_gguf` through atomic_output: the file appears whole at `out` or not at all."""
    from swtool.formats.atomic import atomic_output

    with atomic_output(out, directory=False, inputs=[checkpoint.path, *checkpoint.files], force=force) as temp:
        write_gguf(checkpoint, plan, temp, progress)
