"""`swtool quantize` as a library call: plan from headers, then stream one tensor at a time.

Quantize: choose the tensors (the 2-D projections of each layer, per the
family description; embeddings and head only when asked), find or read the
super weights to hold out, then hand the job to the output format's writer
(`WRITERS`): swtool-rtn safetensors or GGUF.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from swtool.codecs.rtn import QuantSpec, check_bits, parse_block, parse_clip
from swtool.detect import scan
from swtool.errors import SwtoolError
from swtool.formats.atomic import atomic_output, check_target
from swtool.formats.base import Checkpoint, Held
from swtool.formats.gguf import writer as gguf_out
from swtool.formats.gguf.mixes import parse_mix
from swtool.formats.hf.export import exported_names
from swtool.formats.hf.writer import parse_size
from swtool.formats.open import open_checkpoint
from swtool.formats.rtn import layout
from swtool.formats.rtn.reader import QuantizedCheckpoint
from swtool.formats.rtn.writer import write_rtn
from swtool.importance import input_importance
from swtool.provenance import model_inputs, provenance
from swtool.readahead import ReadAhead
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


def held_values(job: QuantizeJob) -> dict[str, list[tuple[int, int, float]]]:
    """Tensor -> (row, col, fp16 value) for the held weights of quantized tensors, read before any writing."""
    out: dict[str, list[tuple[int, int, float]]] = {}
    wanted = set(job.targets)
    for h in job.held:
        if h.tensor in wanted:
            out.setdefault(h.tensor, []).append((h.row, h.col, job.checkpoint.value(h, torch.float16)))
    return out


def write_safetensors(job: QuantizeJob, directory: Path, progress: Progress | None = None) -> QuantizeReport:
    """The swtool-rtn directory (see swtool.formats.rtn.layout)."""
    checkpoint = job.checkpoint
    held = held_values(job)
    importance = input_importance(checkpoint) if job.spec.clip.kind == "auto" else {}
    thresholds = write_rtn(checkpoint, directory, job.spec, job.targets, held, job.provenance, job.max_shard_bytes, importance, progress)
    kept = len(exported_names(checkpoint)) - len(job.targets)
    return QuantizeReport(len(job.targets), kept, [(t, r, c, v) for t, rows in held.items() for r, c, v in rows], thresholds)


def write_gguf(job: QuantizeJob, path: Path, progress: Progress | None = None) -> QuantizeReport:
    """A GGUF file llama.cpp runs; super weights stay in their tensors, which are written at job.super_type."""
    checkpoint = job.checkpoint
    plan = gguf_out.plan_gguf(
        checkpoint, job.gguf_type, super_weights=job.held, keep_super=bool(job.held), super_type=job.super_type, provenance=job.provenance
    )
    gguf_out.write_gguf(checkpoint, plan, path, progress)
    types = {source: t.qtype.name for t in plan.tensors for source in (t.stacked or (t.source,))}
    quantized = sum(1 for t in plan.tensors if t.qtype not in gguf_out.FLOAT_TYPES)
    held = [(checkpoint.stored_name(h.tensor), h.row, h.col, checkpoint.value(h, torch.float16)) for h in job.held]
    how = f"kept in its tensor, written as {types[job.held[0].tensor]}" if job.held else ""
    return QuantizeReport(quantized, len(plan.tensors) - quantized, held, held_how=how, notes=plan.notes)


WRITERS: dict[str, tuple[Callable[[QuantizeJob, Path, Progress | None], QuantizeReport], bool]] = {
    "safetensors": (write_safetensors, True),
    "gguf": (write_gguf, False),
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
    if type_name is None:
        type_name = {8: "Q8_0", 4: "Q4_0"}.get(bits)
        if type_name is None:
            raise SwtoolError(f"--format gguf: --bits {bits} has no GGML type; give --type (Q4_K_M, Q6_K, Q8_0, Q4_0, F16...)")
    gguf_out.parse_type(super_type, "--super-type", gguf_out.SUPER_TYPES)
    return parse_mix(type_name).name


def refuse_quantized(checkpoint: Checkpoint) -> None:
    if isinstance(checkpoint, QuantizedCheckpoint):
        raise SwtoolError(f"{checkpoint.path}: already quantized by swtool ({layout.FORMAT}); quantize its source, or dequantize it first")


@dataclass(frozen=True)
class QuantizeRequest:
    """Everything `swtool quantize` was asked, as the command line gives it."""

    model: Path
    output: Path
    bits: int = 4
    block: str = "512"
    sym: bool = False
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


def quantize_model(request: QuantizeRequest, bars: Bars, ahead: ReadAhead | None = None, stdin: TextIO | None = None) -> QuantizeReport:
    """Check every option, open the model, find or read its super weights, and write the output atomically."""
    r = request
    spec = QuantSpec(check_bits(r.bits), parse_block(r.block), r.sym, parse_clip(r.clip))
    max_bytes = parse_size(r.max_shard_size)
    out_format = output_format(r.out_format, r.output)
    if r.super_file is not None and not r.keep_super:
        raise SwtoolError("--super and --no-keep-super contradict each other")
    writer, is_directory = WRITERS[out_format]
    ggml_type = gguf_types(out_format, r.gguf_type, r.bits, r.super_type)
    check_target(r.output, [r.model], r.force)
    checkpoint = open_checkpoint(r.model, allow_nonfinite=r.allow_nonfinite)
    if ahead is not None:
        ahead.stop()
    refuse_quantized(checkpoint)
    digests: dict[str, str] = {}
    held: list[Held] = []
    if r.super_file is not None:
        held, label, digest = read_argument(r.super_file, checkpoint, stdin or sys.stdin)
        digests[label] = digest
    elif r.keep_super:
        with bars(f"scan {r.model.name}") as progress:
            held = from_scan(scan(checkpoint, progress=progress), checkpoint)
    options = {
        "bits": r.bits, "block": spec.block, "sym": r.sym, "clip": str(spec.clip), "keep_super": r.keep_super,
        "super": "scan" if r.super_file is None and r.keep_super else r.super_file, "include_embeddings": r.include_embeddings,
        "include_head": r.include_head, "format": out_format, "max_shard_size": r.max_shard_size, "allow_nonfinite": r.allow_nonfinite,
    }  # fmt: skip
    if out_format == "gguf":
        options.update({"type": ggml_type, "super_type": r.super_type.upper()})
    job = QuantizeJob(
        checkpoint,
        spec,
        targets(checkpoint, r.include_embeddings, r.include_head),
        held,
        {"swtool.source": str(r.model.resolve()), **provenance("quantize", options, model_inputs(checkpoint), digests)},
        max_bytes,
        gguf_type=ggml_type or "Q4_0",
        super_type=r.super_type,
    )
    with atomic_output(r.output, directory=is_directory, inputs=[r.model], force=r.force) as temp:
        with bars(f"quantize {r.model.name}") as progress:
            return writer(job, temp, progress)
