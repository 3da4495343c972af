"""`swtool quantize` as a library call: plan from headers, then stream one tensor at a time.

Quantize: choose the tensors (the 2-D projections of each layer, per the
family description; embeddings and head only when asked), find or read the
super weights to hold out, then hand the job to the output format's writer
(`WRITERS`): swtool-rtn safetensors or GGUF.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from swtool.codecs.rtn import Clip, QuantSpec, check_bits, parse_block, parse_clip
from swtool.detect import scan
from swtool.errors import SwtoolError
from swtool.formats.atomic import atomic_output, check_target
from swtool.formats.base import Checkpoint, Held, HeldValues, held_table
from swtool.formats.compressed_tensors import schema as ct_schema
from swtool.formats.compressed_tensors import writer as ct_writer
from swtool.formats.hf.export import copy_model_files, exported_names
from swtool.formats.hf.writer import parse_size
from swtool.formats.open import open_checkpoint
from swtool.formats.rtn import layout
from swtool.formats.rtn.writer import write_rtn
from swtool.importance import input_importance
from swtool.provenance import Provenance, model_inputs
from swtool.readahead import ReadAhead
from swtool.workers import parallel_chunks
from swtool.supers import from_scan, read_argument

Progress = Callable[[int, int], None]
Bars = Callable[[str], AbstractContextManager[Progress]]
"""Makes a progress callback for a named step (a bar on a terminal, nothing elsewhere)."""


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
    """--format gguf: the GGML tensor type (see swtool.formats.gguf.writer for which tensors get it)."""
    super_type: str = "Q8_0"
    """--format gguf: the type of tensors holding a held super weight (they stay in the tensor)."""
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    """--format gguf --imatrix: GGUF weight name -> (matrices, row length) per-column weights."""
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
    family = checkpoint.family
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


def held_values(job: QuantizeJob) -> HeldValues:
    """Tensor -> (row, col, fp16 value) for the held weights of quantized tensors, read before any writing."""
    out: HeldValues = {}
    wanted = set(job.targets)
    for h in job.held:
        if h.tensor in wanted:
            out.setdefault(h.tensor, []).append((h.row, h.col, job.checkpoint.value(h, torch.float16)))
    return out


def held_rows(held: HeldValues) -> list[tuple[str, int, int, float]]:
    """(tensor, row, col, value) of each held-out weight, for the report."""
    return [(t, r, c, v) for t, rows in held.items() for r, c, v in rows]


def write_safetensors(job: QuantizeJob, directory: Path, progress: Progress | None = None) -> QuantizeReport:
    """The swtool-rtn directory (see swtool.formats.rtn.layout)."""
    checkpoint = job.checkpoint
    held = held_values(job)
    importance = input_importance(checkpoint) if job.spec.clip.kind == "auto" else {}
    thresholds = write_rtn(checkpoint, directory, job.spec, job.targets, held, job.provenance, job.max_shard_bytes, importance, progress)
    kept = len(exported_names(checkpoint)) - len(job.targets)
    return QuantizeReport(len(job.targets), kept, held_rows(held), thresholds)


def write_gguf(job: QuantizeJob, path: Path, progress: Progress | None = None) -> QuantizeReport:
    """A GGUF file llama.cpp runs; super weights stay in their tensors, which are written at job.super_type."""
    from swtool.formats.gguf import writer as gguf_out  # (see gguf_types)

    checkpoint = job.checkpoint
    plan = gguf_out.plan_gguf(
        checkpoint, job.gguf_type, super_weights=job.held, keep_super=bool(job.held), super_type=job.super_type, provenance=job.provenance,
        importance=job.importance,
    )
    gguf_out.write_gguf(checkpoint, plan, path, progress)
    types = {source: t.qtype.name for t in plan.tensors for source in (t.stacked or (t.source,))}
    quantized = sum(1 for t in plan.tensors if t.qtype not in gguf_out.FLOAT_TYPES)
    held = [(checkpoint.stored_name(h.tensor), h.row, h.col, checkpoint.value(h, torch.float16)) for h in job.held]
    how = f"kept in its tensor, written as {types[job.held[0].tensor]}" if job.held else ""
    return QuantizeReport(quantized, len(plan.tensors) - quantized, held, held_how=how, notes=plan.notes)


# ---- compressed-tensors output (the format's own rules: formats/compressed_tensors) -------------------------


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
    dtype = checkpoint.native_dtype(targets[0]) if targets else torch.float16
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
    meta = {"swtool.format": ct_schema.METHOD, "swtool.super": held_table(held)}
    spec = job.spec
    meta["swtool.quant"] = json.dumps({"bits": "fp8" if job.float8 else spec.bits, "block": "channel" if job.float8 else spec.block, "sym": spec.sym or job.float8, "clip": str(spec.clip), "dtype": str(layout.scale_dtype).removeprefix("torch.")})
    importance = input_importance(checkpoint) if spec.clip.kind == "auto" and not job.float8 else {}
    with parallel_chunks():
        thresholds = ct_writer.write_shards(
            checkpoint, directory, names, checkpoint.native_dtype, layout, {**meta, **job.provenance}, job.max_shard_bytes,
            spec.clip if not job.float8 else Clip(), importance, progress,
        )
    copy_model_files(checkpoint, directory, layout.scale_dtype)
    shapes = {n: checkpoint.shape(n) for n in names}
    ct_writer.add_quantization_config(directory, layout, ct_writer.ignored_modules(names, shapes, set(chosen)))
    dtype = str(layout.scale_dtype).removeprefix("torch.")
    report = QuantizeReport(len(chosen), len(names) - len(chosen), held_rows(held), thresholds, held_how=f"its module kept unquantized in {dtype}, in `ignore`")
    siblings = sorted(kept - set(held))
    if siblings:
        report.notes.append(f"kept unquantized too, as vLLM fuses them with a super weight's module: {', '.join(siblings)}")
    return report


WRITERS: dict[str, tuple[Callable[[QuantizeJob, Path, Progress | None], QuantizeReport], bool]] = {
    "safetensors": (write_safetensors, True),
    "gguf": (write_gguf, False),
    "compressed-tensors": (write_compressed_tensors, True),
}
"""--format -> (writer, whether the output is a directory)."""

SUFFIXES = {".gguf": "gguf"}
"""Output names that say their format: `-o out.gguf` is GGUF without --format."""


def output_format(requested: str | None, output: Path) -> str:
    """The output format: --format when given (refused when the output's name says another), else the name's, else safetensors."""
    implied = SUFFIXES.get(output.suffix.lower())
    if requested is None:
        return implied or "safetensors"
    if requested not in WRITERS:
        raise SwtoolError(f"--format {requested!r}: expected one of {', '.join(WRITERS)}")
    if implied is not None and implied != requested:
        raise SwtoolError(f"-o {output}: the name says {implied} but --format is {requested}; rename the output or drop --format")
    return requested


def gguf_types(out_format: str, type_name: str | None, bits: int, super_type: str) -> str | None:
    """Check --type/--super-type before any work: the GGML type or llama-quantize mix to write
    (canonical name: aliases such as Q4_K resolved), None for safetensors output."""
    if out_format != "gguf":
        if type_name is not None:
            raise SwtoolError("--type applies to --format gguf only (safetensors output takes --bits)")
        return None
    # imported here, not with the module: gguf-py's import takes 0.15 s, which safetensors and
    # compressed-tensors outputs never need (5 % of quantizing a 1.1B model)
    from swtool.formats.gguf import writer as gguf_out
    from swtool.formats.gguf.mixes import parse_mix

    if type_name is None:
        type_name = {8: "Q8_0", 4: "Q4_0"}.get(bits)
        if type_name is None:
            raise SwtoolError(f"--format gguf: --bits {bits} has no GGML type; give --type (Q4_K_M, Q6_K, Q8_0, Q4_0, F16...)")
    gguf_out.parse_type(super_type, "--super-type", gguf_out.SUPER_TYPES)
    return parse_mix(type_name).name


def refuse_quantized(checkpoint: Checkpoint) -> None:
    if checkpoint.format == layout.FORMAT:
        raise SwtoolError(f"{checkpoint.path}: already quantized by swtool ({layout.FORMAT}); quantize its source, or dequantize it first")


@dataclass(frozen=True)
class QuantizeRequest:
    """Everything `swtool quantize` was asked, as the command line gives it."""

    model: Path
    output: Path
    bits: str = "4"
    block: str = "512"
    sym: bool | None = None
    """None: the format's default (asymmetric for swtool-rtn, symmetric for compressed-tensors)."""
    clip: str = "none"
    include_embeddings: bool = False
    include_head: bool = False
    keep_super: bool = True
    super_file: str | None = None
    out_format: str | None = None
    gguf_type: str | None = None
    super_type: str = "Q8_0"
    max_shard_size: str = "5GB"
    force: bool = False
    allow_nonfinite: bool = False
    imatrix: Path | None = None
    """--format gguf: an importance matrix (llama.cpp's GGUF file, or a legacy .dat) to weight the rounding by."""


def read_importance(path: Path | None, out_format: str) -> dict[str, np.ndarray]:
    """--imatrix FILE: each weight's per-column mean squares, as llama-quantize derives them; {} without one."""
    if path is None:
        return {}
    if out_format != "gguf":
        raise SwtoolError("--imatrix applies to --format gguf only (llama.cpp's quantizers weight their rounding by it)")
    if not path.is_file():
        raise SwtoolError(f"--imatrix {path}: no such file")
    from swtool.formats.gguf.imatrix import read_imatrix  # (see gguf_types)

    return {name: entry.means() for name, entry in read_imatrix(path).entries.items()}


def quantize_model(request: QuantizeRequest, bars: Bars, ahead: ReadAhead | None = None, stdin: TextIO | None = None) -> QuantizeReport:
    """Check every option, open the model, find or read its super weights, and write the output atomically."""
    r = request
    out_format = output_format(r.out_format, r.output)
    width, float8 = parse_bits(r.bits, out_format)
    sym = r.sym if r.sym is not None else out_format == "compressed-tensors"
    spec = QuantSpec(check_bits(width), parse_block(r.block), sym, parse_clip(r.clip))
    max_bytes = parse_size(r.max_shard_size)
    if r.super_file is not None and not r.keep_super:
        raise SwtoolError("--super and --no-keep-super contradict each other")
    writer, is_directory = WRITERS[out_format]
    ggml_type = gguf_types(out_format, r.gguf_type, width, r.super_type)
    importance = read_importance(r.imatrix, out_format)
    check_target(r.output, [r.model] + ([r.imatrix] if r.imatrix else []), r.force)
    checkpoint = open_checkpoint(r.model, allow_nonfinite=r.allow_nonfinite)
    if ahead is not None:
        ahead.stop()
    refuse_quantized(checkpoint)
    if out_format == "compressed-tensors":
        check_compressed(checkpoint, spec, float8, r.include_embeddings, r.include_head)
    digests: dict[str, str] = {}
    held: list[Held] = []
    if r.super_file is not None:
        held, label, digest = read_argument(r.super_file, checkpoint, stdin or sys.stdin)
        digests[label] = digest
    options = {
        "bits": "fp8" if float8 else width, "block": spec.block, "sym": sym, "clip": str(spec.clip), "keep_super": r.keep_super,
        "super": "scan" if r.super_file is None and r.keep_super else r.super_file, "include_embeddings": r.include_embeddings,
        "include_head": r.include_head, "format": out_format, "max_shard_size": r.max_shard_size, "allow_nonfinite": r.allow_nonfinite,
    }  # fmt: skip
    if out_format == "gguf":
        options.update({"type": ggml_type, "super_type": r.super_type.upper()})
        if r.imatrix is not None:
            options["imatrix"] = r.imatrix.name
    with Provenance("quantize", options, [*model_inputs(checkpoint), *([r.imatrix] if r.imatrix else [])], digests) as record:
        if r.super_file is None and r.keep_super:
            with bars(f"scan {r.model.name}") as progress:
                held = from_scan(scan(checkpoint, progress=progress), checkpoint)
        job = QuantizeJob(
            checkpoint,
            spec,
            targets(checkpoint, r.include_embeddings, r.include_head),
            held,
            {"swtool.source": str(r.model.resolve()), **record.fields},
            max_bytes,
            gguf_type=ggml_type or "Q4_0",
            super_type=r.super_type,
            importance=importance,
            float8=float8,
        )
        with atomic_output(r.output, directory=is_directory, inputs=[r.model], force=r.force) as temp:
            with bars(f"quantize {r.model.name}") as progress:
                report = writer(job, temp, progress)
            record.seal(temp)
        return report
