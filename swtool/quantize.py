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
from swtool.formats.compressed_tensors import schema as ct_schema, writer as ct_writer
from swtool.formats.compressed_tensors.reader import CompressedTensorsCheckpoint
from swtool.formats.hf_export import export_hf, exported_names, write_model_files, write_weights
from swtool.formats.safetensors_out import TORCH_TO_ST, PlannedTensor, ShardedWriter
from swtool.errors import SwtoolError
from swtool.codecs import layout
from swtool.codecs.importance import input_importance
from swtool.codecs.rtn import Clip, QuantSpec, quantize
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
    float8: bool = False
    """--format compressed-tensors --bits fp8: E4M3 weights instead of integers."""


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
    """The dtype a tensor is stored in, where that is a float dtype torch has; fp16 for GGUF block types;
    for a compressed-tensors quantized weight, its scales' (the dtype it is rebuilt in)."""
    if isinstance(checkpoint, CompressedTensorsCheckpoint):
        return checkpoint.default_dtype(name)
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
        if isinstance(checkpoint, CompressedTensorsCheckpoint):  # its quantization_config describes tensors we do not copy
            drop_quantization_config(directory / "config.json")
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


# ---- compressed-tensors output (issue #17) -------------------------------------------------------------


def parse_bits(text: str, out_format: str) -> tuple[int, bool]:
    """--bits: (width, whether FP8); fp8 only for --format compressed-tensors."""
    if text.strip().lower() == "fp8":
        if out_format != "compressed-tensors":
            raise SwtoolError("--bits fp8 applies to --format compressed-tensors only")
        return 8, True
    try:
        return int(text), False
    except ValueError:
        raise SwtoolError(f"--bits {text!r}: expected 8, 4, 3 or 2 (or fp8 with --format compressed-tensors)") from None


def compressed_layout(job: QuantizeJob, targets: list[str]) -> ct_writer.Layout:
    """The one scheme every quantized module of a compressed-tensors output gets."""
    spec, checkpoint = job.spec, job.checkpoint
    if job.float8:
        scheme = ct_schema.WeightScheme(8, "float", True, "channel")
    elif spec.block == "channel":
        scheme = ct_schema.WeightScheme(spec.bits, "int", spec.sym, "channel")
    else:
        scheme = ct_schema.WeightScheme(spec.bits, "int", spec.sym, "group", int(spec.block))
    dtype = native_dtype(checkpoint, targets[0]) if targets else torch.float16
    return ct_writer.Layout(scheme, tuple(targets), dtype)


def check_compressed(checkpoint: Checkpoint, spec: QuantSpec, float8: bool, include_embeddings: bool, include_head: bool) -> None:
    """Refuse, before any work, what a compressed-tensors output cannot hold."""
    if include_embeddings:
        raise SwtoolError("--format compressed-tensors quantizes linear layers only; drop --include-embeddings")
    if checkpoint.config.num_experts:
        raise SwtoolError("--format compressed-tensors: MoE models are not supported (their experts are not one nn.Linear each in transformers)")
    chosen = targets(checkpoint, False, include_head)
    if include_head and "lm_head.weight" not in chosen:
        raise SwtoolError("--include-head: the head is tied to the embeddings (no lm_head.weight of its own); drop --include-head")
    if not chosen:
        raise SwtoolError(f"{checkpoint.path}: no quantizable tensor (no 2-D projection weight)")
    if float8:
        if spec.clip.kind != "none":
            raise SwtoolError("--bits fp8 rounds each weight to E4M3 with one scale per channel; --clip applies to integer widths only")
        return
    if spec.block == "tensor":
        raise SwtoolError("--format compressed-tensors takes --block N (a group dividing every row) or channel, not tensor")
    if spec.block != "channel":
        ct_writer.check_group(checkpoint, chosen, int(spec.block))


def write_compressed_tensors(job: QuantizeJob, directory: Path, progress: Progress | None = None) -> QuantizeReport:
    """A compressed-tensors directory transformers and vLLM load; modules holding super weights stay unquantized."""
    checkpoint = job.checkpoint
    held = held_values(job)
    kept = {sibling for tensor in held for sibling in ct_schema.fused_siblings(tensor) if checkpoint.has(sibling)}
    chosen = [n for n in job.targets if n not in kept]
    if not chosen:
        raise SwtoolError(f"{checkpoint.path}: no quantizable tensor left once the super weights' modules are kept")
    layout = compressed_layout(job, chosen)
    names = exported_names(checkpoint)
    meta = {"swtool.format": ct_schema.METHOD, "swtool.super": json.dumps([{"tensor": t, "row": r, "col": c, "value": v} for t, rows in held.items() for r, c, v in rows])}
    spec = job.spec
    meta["swtool.codecs"] = json.dumps({"bits": "fp8" if job.float8 else spec.bits, "block": "channel" if job.float8 else spec.block, "sym": spec.sym or job.float8, "clip": str(spec.clip), "dtype": str(layout.scale_dtype).removeprefix("torch.")})
    importance = input_importance(checkpoint) if spec.clip.kind == "auto" and not job.float8 else {}
    with parallel_chunks():
        thresholds = ct_writer.write_shards(
            checkpoint, directory, names, lambda n: native_dtype(checkpoint, n), layout, {**meta, **job.provenance}, job.max_shard_bytes,
            spec.clip if not job.float8 else Clip(), importance, progress,
        )
    copy_model_files(checkpoint, directory, layout.scale_dtype)
    shapes = {n: checkpoint.shape(n) for n in names}
    ct_writer.add_quantization_config(directory, layout, ct_writer.ignored_modules(names, shapes, set(chosen)))
    dtype = str(layout.scale_dtype).removeprefix("torch.")
    report = QuantizeReport(len(chosen), len(names) - len(chosen), [(t, r, c, v) for t, rows in held.items() for r, c, v in rows], thresholds, held_how=f"its module kept unquantized in {dtype}, in `ignore`")
    siblings = sorted(kept - set(held))
    if siblings:
        report.notes.append(f"kept unquantized too, as vLLM fuses them with a super weight's module: {', '.join(siblings)}")
    return report


def drop_quantization_config(path: Path) -> None:
    """Remove a copied config.json's quantization_config: the tensors written beside it are not compressed-tensors'."""
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2) + "\n")


# ---- end of compressed-tensors output ---------------------------------------------------------------------


WRITERS: dict[str, tuple[Callable[[QuantizeJob, Path, Progress | None], QuantizeReport], bool]] = {
    "safetensors": (write_safetensors, True),
    "gguf": (write_gguf, False),
    "compressed-tensors": (write_compressed_tensors, True),
}
"""--format -> (writer, whether the output is a directory)."""


def require_quantized(checkpoint: Checkpoint) -> QuantizedCheckpoint | CompressedTensorsCheckpoint:
    if not isinstance(checkpoint, (QuantizedCheckpoint, CompressedTensorsCheckpoint)):
        raise SwtoolError(f"{checkpoint.path}: neither a GGUF file nor a swtool-quantized checkpoint (no swtool.format in its safetensors metadata) or a compressed-tensors one")
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
    dtype = dtype or (checkpoint.header.dtype if isinstance(checkpoint, QuantizedCheckpoint) else checkpoint.model_dtype())
    with parallel_chunks():
        write_weights(checkpoint, directory, dtype, max_shard_bytes, {"swtool.dequantized_from": checkpoint.format, **(provenance or {})})
    copy_model_files(checkpoint, directory, dtype)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return dtype
