"""`swtool edit` as a library call: a copy of a checkpoint with the paper's ablations applied, streamed.

What an edit does to a tensor is `swtool.ablation.edit_tensor`; this module streams it
over a checkpoint into a new one in the input's format: an HF directory, or a GGUF
file where only the GGML blocks holding an edited weight are re-encoded.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TextIO

import torch

from swtool.ablation import EditPlan, edit_tensor
from swtool.errors import SwtoolError
from swtool.families import linear_layers
from swtool.formats.atomic import atomic_output, check_target
from swtool.formats.compressed_tensors import schema as ct_schema
from swtool.formats.base import STORAGE, Checkpoint
from swtool.formats.gguf.patch import patch_gguf
from swtool.formats.hf.writer import PlannedTensor, ShardedWriter, parse_size
from swtool.formats.open import open_checkpoint
from swtool.formats.pickles import PICKLE_SUFFIXES
from swtool.provenance import Provenance, model_inputs
from swtool.readahead import ReadAhead
from swtool.supers import find_super_weights


WEIGHT_FILES = ("model.safetensors.index.json",)


def _copy_side_files(source: Path, target: Path) -> None:
    """config.json, tokenizer files, generation config...: every regular file that is not a weight.

    Pickled weights beside the safetensors are weights too: copied, they would carry the unedited
    values into the edited checkpoint.
    """
    for path in sorted(source.iterdir()):
        weights = path.suffix in (".safetensors", *PICKLE_SUFFIXES) or path.name in WEIGHT_FILES
        if path.is_file() and not weights and not path.name.startswith("."):
            shutil.copy2(path, target / path.name)


def edit_safetensors(checkpoint: Checkpoint, directory: Path, plan: EditPlan, max_shard_bytes: int, provenance: dict[str, str]) -> None:
    """Stream an HF checkpoint into `directory` (existing, empty), one tensor at a time, edits applied."""
    names = checkpoint.names()
    plan_out = [PlannedTensor(n, checkpoint.stored_dtype(n), checkpoint.shape(n)) for n in names]
    with ShardedWriter(directory, plan_out, {"format": "pt", **provenance}, max_shard_bytes) as writer:
        linear = linear_layers(checkpoint.config)
        for name in names:
            dtype = STORAGE[checkpoint.stored_dtype(name)].torch
            if plan.touches(name, linear):
                tensor = edit_tensor(plan, name, checkpoint.load(name, torch.float32), name in linear).to(dtype)
            else:
                tensor = checkpoint.load(name, dtype)
            writer.write(name, tensor)
    _copy_side_files(checkpoint.path, directory)


WEIGHT_SUFFIXES = (".gguf", ".safetensors", *PICKLE_SUFFIXES)


def check_output(checkpoint: Checkpoint, out: Path) -> None:
    """edit writes the input's format: a GGUF input needs OUT.gguf, an HF input a directory not named like a weight file."""
    suffix = out.suffix.lower()
    if checkpoint.format == "gguf" and suffix != ".gguf":
        raise SwtoolError(f"-o {out}: MODEL is a GGUF file and edit writes the input's format; name the output *.gguf")
    if checkpoint.format != "gguf" and suffix in WEIGHT_SUFFIXES:
        raise SwtoolError(
            f"-o {out}: MODEL is a Hugging Face directory and edit writes the input's format (a directory), not {suffix}; "
            "for GGUF, edit into a directory, then `swtool quantize DIR --format gguf`"
        )


def edit_gguf(checkpoint: Checkpoint, path: Path, plan: EditPlan, provenance: dict[str, str]) -> list[str]:
    """Write the edited GGUF file at `path` (see swtool.formats.gguf.patch); returns notes for the user."""
    linear = linear_layers(checkpoint.config)

    def edit(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight = checkpoint.load(name, torch.float32)
        return weight, edit_tensor(plan, name, weight, name in linear)

    touched = [name for name in checkpoint.names() if plan.touches(name, linear)]
    return patch_gguf(checkpoint, path, touched, edit, provenance)


def edit_checkpoint(checkpoint: Checkpoint, out: Path, plan: EditPlan, *, force: bool = False, max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Write the edited checkpoint at `out`, in the input's format, atomically; returns notes for the user."""
    if checkpoint.format == ct_schema.METHOD:
        refuse_quantized_edits(checkpoint, plan)
        checkpoint = checkpoint.store  # stored tensors streamed as they are, quantization_config included
    is_gguf = checkpoint.format == "gguf"
    with (
        Provenance("edit", plan.describe(), model_inputs(checkpoint)) as record,
        atomic_output(out, directory=not is_gguf, inputs=[checkpoint.path], force=force) as temp,
    ):
        if is_gguf:
            notes = edit_gguf(checkpoint, temp, plan, record.fields)
        else:
            edit_safetensors(checkpoint, temp, plan, max_shard_bytes, record.fields)
            notes = []
        record.seal(temp)
    return notes


def refuse_quantized_edits(checkpoint: Checkpoint, plan: EditPlan) -> None:
    """A compressed-tensors checkpoint is edited in its unquantized modules only (where its super weights are kept),
    so the output stays what transformers and vLLM load."""
    linear = linear_layers(checkpoint.config)
    quantized = [name for name in checkpoint.names() if checkpoint.quantized(name) and plan.touches(name, linear)]
    if quantized:
        raise SwtoolError(
            f"{checkpoint.path}: the edit would change {quantized[0]}, which is stored quantized (compressed-tensors); "
            "edit only reaches unquantized modules here: `swtool dequantize` first to edit it"
        )


def edit_model(
    model: Path,
    out: Path,
    plan: EditPlan,
    super_file: str | None,
    *,
    force: bool = False,
    max_shard_size: str = "5GB",
    ahead: ReadAhead | None = None,
    stdin: TextIO | None = None,
) -> tuple[Checkpoint, EditPlan, list[str]]:
    """Check the request and the output before the scan, find the super weights, write the edited copy.

    Returns the opened checkpoint, the plan with its super weights and the notes for the user.
    """
    shard_bytes = parse_size(max_shard_size)
    check_target(out, [model], force)
    checkpoint = open_checkpoint(model)
    if ahead is not None:
        ahead.stop()
    if not plan.active:
        raise SwtoolError("nothing to do: give --zero-super, --scale-super or --zero-outliers")
    check_output(checkpoint, out)  # refuse a bad OUT before the scan, not after it
    supers = find_super_weights(checkpoint, super_file, stdin or sys.stdin, required=plan.factor is not None)
    plan = EditPlan(tuple(supers), plan.zero_super, plan.scale_super, plan.zero_outliers)
    return checkpoint, plan, edit_checkpoint(checkpoint, out, plan, force=force, max_shard_bytes=shard_bytes)
