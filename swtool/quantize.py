"""`swtool quantize` and `swtool dequantize` as library calls: plan from headers, then stream one tensor at a time.

Quantize: choose the tensors (the 2-D projections of each layer, per the
family description; embeddings and head only when asked), plan every output
tensor's name, dtype and shape before reading any weight, then load, quantize
and write one tensor at a time. The output format is a writer picked by name
(`WRITERS`), so GGUF output plugs in beside safetensors.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swtool.arch import family_of
from swtool.formats.base import Checkpoint
from swtool.formats.quantized_in import QuantizedCheckpoint
from swtool.formats.hf_export import export_hf, exported_names, write_model_files, write_weights
from swtool.formats.safetensors_out import TORCH_TO_ST, PlannedTensor, ShardedWriter
from swtool.errors import SwtoolError
from swtool.codecs import layout
from swtool.codecs.importance import input_importance
from swtool.codecs.rtn import QuantSpec, quantize
from swtool.codecs.supers import Held
from swtool.workers import parallel_chunks

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files copied from an HF source (and from a quantized directory when dequantizing)."""

Progress = Callable[[int, int], None]


@dataclass
class QuantizeJob:
    checkpoint: Checkpoint
    spec: QuantSpec
    targets: list[str]
    """Canonical names of the tensors to quantize, in checkpoint order."""
    held: list[Held] = field(default_factory=list)
    provenance: dict[str, str] = field(default_factory=dict)
    """swtool.* metadata fields recording how the output was made (see swtool.provenance)."""
    max_shard_bytes: int = 5 * 10**9
    gguf_type: str = "Q4_0"
    """--format gguf: the GGML tensor type (see swtool.formats.gguf_out for which tensors get it)."""
    super_type: str = "Q8_0"
    """--format gguf: the type of tensors holding a held super weight (they stay in the tensor)."""


@dataclass
class QuantizeReport:
    quantized: int
    kept: int
    held: list[tuple[str, int, int, float]]
    """(tensor, row, col, fp16 value) of each held-out weight."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """--clip auto: the threshold chosen per tensor (only where clipping helped)."""
    held_how: str = "fp16, restored on dequantize"
    """How the held weights are kept, for the report."""
    notes: list[str] = field(default_factory=list)
    """Things the user should hear about (GGUF type fallbacks...)."""


def targets(checkpoint: Checkpoint, include_embeddings: bool = False, include_head: bool = False) -> list[str]:
    """The tensors to quantize: every layer's 2-D projection weights (not norms, not an MoE router), plus embeddings/head when asked."""
    config = checkpoint.config
    family = family_of(config)
    chosen: set[str] = set()
    for layer in range(config.num_layers):
        for role, name in family.layer_tensors(config, layer).items():
            if not any(skip in role for skip in ("norm", "router")) and name.endswith(".weight") and checkpoint.has(name) and len(checkpoint.shape(name)) == 2:
                chosen.add(name)
    globals_ = family.global_tensors(config)
    if include_embeddings:
        chosen.add(globals_["embed"])
    if include_head:
        chosen.add(globals_["head"])
    return [n for n in exported_names(checkpoint) if n in chosen]


def native_dtype(checkpoint: Checkpoint, name: str) -> torch.dtype:
    """The dtype a tensor is stored in, where that is a float dtype torch has; fp16 for GGUF block types."""
    return FLOAT_TYPES.get(checkpoint.stored_dtype(name), torch.float16)


def model_inputs(checkpoint: Checkpoint) -> list[Path]:
    """Every file of the model that quantize reads: weights, config and tokenizer files."""
    files = list(checkpoint.files)
    if checkpoint.path.is_dir():
        files += [checkpoint.path / f for f in MODEL_FILES if (checkpoint.path / f).is_file()]
        index = checkpoint.path / "model.safetensors.index.json"
        if index.is_file():
            files.append(index)
    return sorted(set(files))


def held_values(job: QuantizeJob) -> dict[str, list[tuple[int, int, float]]]:
    """Tensor -> (row, col, fp16 value) for the held weights of quantized tensors, read before any writing."""
    out: dict[str, list[tuple[int, int, float]]] = {}
    wanted = set(job.targets)
    for h in job.held:
        if h.tensor in wanted:
            value = float(job.checkpoint.load(h.tensor, torch.float32, rows=[h.row])[0, h.col].half())
            out.setdefault(h.tensor, []).append((h.row, h.col, value))
    return out


def write_safetensors(job: QuantizeJob, directory: Path, progress: Progress | None = None) -> QuantizeReport:
    """The swtool-rtn directory: copied/produced model files plus safetensors shards (see swtool.codecs.layout)."""
    checkpoint, spec = job.checkpoint, job.spec
    names = exported_names(checkpoint)
    wanted = set(job.targets)
    held = held_values(job)
    dtype = native_dtype(checkpoint, job.targets[0]) if job.targets else torch.float16
    plan: list[PlannedTensor] = []
    for name in names:
        if name in wanted:
            plan += layout.planned(name, checkpoint.shape(name), spec.bits, spec.block)
        else:
            plan.append(PlannedTensor(name, TORCH_TO_ST[native_dtype(checkpoint, name)], checkpoint.shape(name)))
    metadata = layout.metadata(spec.bits, spec.block, spec.sym, str(spec.clip), dtype, held, job.provenance)
    writer = ShardedWriter(directory, plan, metadata, job.max_shard_bytes)
    report = QuantizeReport(len(wanted), len(names) - len(wanted), [(t, r, c, v) for t, rows in held.items() for r, c, v in rows])
    importance = input_importance(checkpoint) if spec.clip.kind == "auto" else {}
    with parallel_chunks():
        for index, name in enumerate(names):
            weight = checkpoint.load(name, native_dtype(checkpoint, name))
            if name in wanted:
                q = quantize(weight, spec, [(r, c) for r, c, _ in held.get(name, [])], importance.get(name))
                del weight
                if q.threshold is not None:
                    report.thresholds[name] = q.threshold
                for stored_name, tensor in layout.stored(name, q):
                    writer.write(stored_name, tensor)
            else:
                writer.write(name, weight)
            if progress:
                progress(index + 1, len(names))
    writer.close()
    copy_model_files(checkpoint, directory, dtype)
    return report


def copy_model_files(checkpoint: Checkpoint, directory: Path, dtype: torch.dtype) -> None:
    """config.json and tokenizer files: copied from an HF directory, produced from GGUF metadata otherwise."""
    if checkpoint.path.is_dir():
        for name in MODEL_FILES:
            if (checkpoint.path / name).is_file():
                shutil.copyfile(checkpoint.path / name, directory / name)
    else:
        write_model_files(checkpoint, directory, dtype)


def write_gguf(job: QuantizeJob, path: Path, progress: Progress | None = None) -> QuantizeReport:
    """A GGUF file llama.cpp runs; super weights stay in their tensors, which are written at job.super_type."""
    from swtool.formats import gguf_out

    checkpoint = job.checkpoint
    plan = gguf_out.plan_gguf(
        checkpoint, job.gguf_type, super_weights=job.held, keep_super=bool(job.held), super_type=job.super_type, provenance=job.provenance
    )
    gguf_out.write_gguf(checkpoint, plan, path, progress)
    types = {source: t.qtype.name for t in plan.tensors for source in (t.stacked or (t.source,))}
    quantized = sum(1 for t in plan.tensors if t.qtype in gguf_out.BLOCK_TYPES)
    held = [
        (checkpoint.stored_name(h.tensor), h.row, h.col, float(checkpoint.load(h.tensor, torch.float32, rows=[h.row])[0, h.col].half()))
        for h in job.held
    ]
    how = f"kept in its tensor, written as {types[job.held[0].tensor]}" if job.held else ""
    return QuantizeReport(quantized, len(plan.tensors) - quantized, held, held_how=how, notes=plan.notes)


WRITERS: dict[str, tuple[Callable[[QuantizeJob, Path, Progress | None], QuantizeReport], bool]] = {
    "safetensors": (write_safetensors, True),
    "gguf": (write_gguf, False),
}
"""--format -> (writer, whether the output is a directory)."""


def require_quantized(checkpoint: Checkpoint) -> QuantizedCheckpoint:
    if not isinstance(checkpoint, QuantizedCheckpoint):
        raise SwtoolError(f"{checkpoint.path}: neither a GGUF file nor a swtool-quantized checkpoint (no swtool.format in its safetensors metadata)")
    return checkpoint


def refuse_quantized(checkpoint: Checkpoint) -> None:
    if isinstance(checkpoint, QuantizedCheckpoint):
        raise SwtoolError(f"{checkpoint.path}: already quantized by swtool ({layout.FORMAT}); quantize its source, or dequantize it first")


def dequantize_to(
    checkpoint: Checkpoint, directory: Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 10**9, provenance: dict[str, str] | None = None
) -> torch.dtype:
    """Write a swtool-quantized checkpoint or a GGUF file as a standard HF directory; returns the dtype written.

    A GGUF is dequantized tensor by tensor (Q/K un-permuted by the reader), fp16 unless asked otherwise.
    """
    if checkpoint.format == "gguf":
        dtype = dtype or torch.float16
        export_hf(checkpoint, directory, dtype, max_shard_bytes, {"swtool.dequantized_from": "gguf", **(provenance or {})})
        return dtype
    checkpoint = require_quantized(checkpoint)
    dtype = dtype or checkpoint.header.dtype
    with parallel_chunks():
        write_weights(checkpoint, directory, dtype, max_shard_bytes, {"swtool.dequantized_from": layout.FORMAT, **(provenance or {})})
    copy_model_files(checkpoint, directory, dtype)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return dtype
