"""Edits of single weights, the paper's ablations: zero or scale the super weights, prune other outliers.

`edit_tensor` is the one definition of what an edit does to a tensor; `swtool
edit` streams it over a checkpoint into a new one in the input's format (an
HF directory, or a GGUF file where only the GGML blocks holding an edited
weight are re-encoded), and `swtool eval` applies it to each layer in memory,
so an ablation can be measured without writing it.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TextIO

import gguf
import numpy as np
import torch

from swtool.arch import Family, family_of
from swtool.formats import PICKLE_SUFFIXES
from swtool.formats.base import Checkpoint
from swtool.formats.compressed_tensors.reader import CompressedTensorsCheckpoint
from swtool.config import ModelConfig
from swtool.errors import SwtoolError
from swtool.codecs.ggml import QType
from swtool.codecs.supers import Held


def linear_roles(family: Family, config: ModelConfig) -> list[str]:
    """The roles of a layer that are projection matrices (2-D), as opposed to norms and biases."""
    shapes = family.layer_shapes(config)
    return [role for role in family.layer_tensors(config, 0) if len(shapes.get(role, ())) == 2]


def linear_layers(checkpoint: Checkpoint) -> dict[str, int]:
    """Canonical name -> layer of every projection matrix in every decoder layer."""
    config = checkpoint.config
    family = family_of(config)
    roles = linear_roles(family, config)
    return {name: i for i in range(config.num_layers) for role, name in family.layer_tensors(config, i).items() if role in roles}


def find_super_weights(checkpoint: Checkpoint, super_file: str | None, stdin: TextIO, *, required: bool, **scan_options) -> list[Held]:
    """The super weights named by `--super FILE|-`, or found by a scan; none found is an error when `required`."""
    from swtool.codecs.supers import from_scan, read_argument

    if super_file is not None:
        held = read_argument(super_file, checkpoint, stdin)[0]
    else:
        from swtool.detect import scan

        held = from_scan(scan(checkpoint, **scan_options), checkpoint)
    if required and not held:
        source = f"--super {super_file} lists" if super_file is not None else "the scan found"
        raise SwtoolError(f"{source} no super weight in {checkpoint.path}; nothing to act on")
    return held


@dataclass(frozen=True)
class EditPlan:
    supers: tuple[Held, ...] = ()
    zero_super: bool = False
    scale_super: float | None = None
    zero_outliers: int = 0
    """Prune this many largest-magnitude weights of each linear tensor, super weights excepted."""

    def __post_init__(self) -> None:
        if self.zero_super and self.scale_super is not None:
            raise SwtoolError("--zero-super and --scale-super exclude each other (zeroing is --scale-super 0)")
        if self.zero_outliers < 0:
            raise SwtoolError("--zero-outliers must be a non-negative count")

    @property
    def factor(self) -> float | None:
        """What the super weights are multiplied by, or None when they are left alone."""
        return 0.0 if self.zero_super else self.scale_super

    @property
    def active(self) -> bool:
        return self.factor is not None or self.zero_outliers > 0

    def touches(self, name: str, linear: Collection[str]) -> bool:
        return (self.factor is not None and any(s.tensor == name for s in self.supers)) or (self.zero_outliers > 0 and name in linear)

    def describe(self) -> dict:
        return {
            "zero_super": self.zero_super,
            "scale_super": self.scale_super,
            "zero_outliers": self.zero_outliers,
            "super_weights": [[s.tensor, s.row, s.col] for s in self.supers],
        }


def edit_tensor(plan: EditPlan, name: str, weight: torch.Tensor, is_linear: bool) -> torch.Tensor:
    """The tensor with the plan applied (a new tensor; the input is left untouched)."""
    out = weight.clone()
    mine = [(s.row, s.col) for s in plan.supers if s.tensor == name]
    if plan.zero_outliers and is_linear:
        magnitude = out.abs().flatten()
        for row, col in mine:  # the super weights are never counted as outliers
            magnitude[row * out.shape[1] + col] = -1
        count = min(plan.zero_outliers, magnitude.numel() - len(mine))
        out.view(-1)[torch.topk(magnitude, count, sorted=False).indices] = 0
    if plan.factor is not None:
        for row, col in mine:
            out[row, col] = weight[row, col] * plan.factor
    return out


def provenance(checkpoint: Checkpoint, plan: EditPlan) -> dict[str, str]:
    """String metadata recorded in the output: what made it, how, and from exactly which input."""
    from swtool.provenance import provenance as record
    from swtool.quantize import model_inputs

    return record("edit", plan.describe(), model_inputs(checkpoint))


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


def edit_safetensors(checkpoint: Checkpoint, directory: Path, plan: EditPlan, max_shard_bytes: int) -> None:
    """Stream an HF checkpoint into `directory` (existing, empty), one tensor at a time, edits applied."""
    from swtool.formats.safetensors_in import DTYPES
    from swtool.formats.safetensors_out import PlannedTensor, ShardedWriter

    names = checkpoint.names()
    plan_out = [PlannedTensor(n, checkpoint.stored_dtype(n), checkpoint.shape(n)) for n in names]
    writer = ShardedWriter(directory, plan_out, {"format": "pt", **provenance(checkpoint, plan)}, max_shard_bytes)
    linear = linear_layers(checkpoint)
    for name in names:
        dtype = DTYPES[checkpoint.stored_dtype(name)][1]
        if plan.touches(name, linear):
            tensor = edit_tensor(plan, name, checkpoint.load(name, torch.float32), name in linear).to(dtype)
        else:
            tensor = checkpoint.load(name, dtype)
        writer.write(name, tensor)
    writer.close()
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


def stored_edits(checkpoint: Checkpoint, plan: EditPlan, name: str, is_linear: bool) -> tuple[np.ndarray, np.ndarray]:
    """Where the plan changes canonical tensor `name` in a GGUF file, and to what: flat positions in the stored
    tensor (Q/K rows in llama.cpp's permuted order, an expert's slice at its offset in the merged tensor) and values.

    Edits touch 2-D projections only, so Gemma's `1 +` on norm weights never applies here.
    """
    from swtool.formats.gguf_in import permute_qk, qk_heads

    weight = checkpoint.load(name, torch.float32)
    edited = edit_tensor(plan, name, weight, is_linear)
    heads = qk_heads(checkpoint.family, checkpoint.config, name)
    if heads is not None:
        weight, edited = permute_qk(weight, heads), permute_qk(edited, heads)
    changed = (weight != edited).reshape(-1).nonzero().reshape(-1)
    expert = checkpoint.expert_of(name)
    start = 0 if expert is None else expert * weight.numel()
    return (changed + start).numpy(), edited.reshape(-1)[changed].numpy()


def _edited_gguf_tensor(
    checkpoint: Checkpoint, plan: EditPlan, tensor, names: list[str], linear: Collection[str], target: QType | None, blocks: list[int]
) -> np.ndarray:
    """The new bytes of one stored tensor (a gguf ReaderTensor holding the canonical `names`): its blocks
    holding an edit re-encoded, or all of it at `target`; the number of GGML blocks that changed is appended to `blocks`."""
    from swtool.codecs.ggml_edit import reencode, set_values

    raw = np.fromfile(checkpoint.path, dtype=np.uint8, count=int(tensor.n_bytes), offset=int(tensor.data_offset))
    edits = [stored_edits(checkpoint, plan, name, name in linear) for name in names]
    positions = np.concatenate([p for p, _ in edits])
    values = np.concatenate([v for _, v in edits])
    qtype = tensor.tensor_type
    if target is not None:
        blocks.append(int(tensor.n_elements) // gguf.GGML_QUANT_SIZES[target][0])
        return reencode(raw, qtype, tuple(int(d) for d in reversed(tensor.shape)), positions, values, target)
    blocks.append(len(np.unique(positions // gguf.GGML_QUANT_SIZES[qtype][0])))
    return set_values(raw, qtype, positions, values) if len(positions) else raw


def edit_gguf(checkpoint: Checkpoint, path: Path, plan: EditPlan) -> list[str]:
    """Write the edited GGUF file at `path`; returns notes for the user (what was re-encoded).

    Every key/value and every tensor the plan does not touch is copied byte for byte; in a touched
    tensor only the GGML blocks holding a changed weight are re-encoded, at the stored type, unless
    swtool has no encoder for that type (K-quants...): then the whole tensor is re-encoded at the
    nearest type it has (see swtool.codecs.ggml_edit). The input's `swtool.*` keys described how
    the input was made; they are replaced by this edit's provenance.
    """
    from swtool.formats.gguf_copy import Replacement, copy_gguf
    from swtool.codecs.ggml_edit import fallback_type

    linear = linear_layers(checkpoint)
    members: dict[str, list[str]] = {}
    for name in checkpoint.names():
        if plan.touches(name, linear):
            members.setdefault(checkpoint.stored_name(name), []).append(name)
    stored = {t.name: t for t in checkpoint.reader.tensors}
    notes: list[str] = []
    blocks: list[int] = []
    replacements: dict[str, Replacement] = {}
    for gguf_name, names in members.items():
        qtype = stored[gguf_name].tensor_type
        target = fallback_type(qtype, int(stored[gguf_name].shape[0]))
        if target is not None:
            notes.append(f"{gguf_name}: stored as {qtype.name}, which swtool cannot encode; the whole tensor was re-encoded as {target.name}")
        edited = partial(_edited_gguf_tensor, checkpoint, plan, stored[gguf_name], names, linear, target, blocks)
        replacements[gguf_name] = Replacement(target or qtype, edited)
    copy_gguf(checkpoint.reader, checkpoint.path, path, replacements, lambda key: key.startswith("swtool."), provenance(checkpoint, plan))
    count, tensors = sum(blocks), sum(1 for n in blocks if n)
    notes.append(f"{_plural(count, 'GGML block')} in {_plural(tensors, 'tensor')} re-encoded; every other byte of tensor data copied from the input")
    return notes


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def edit_checkpoint(checkpoint: Checkpoint, out: Path, plan: EditPlan, *, force: bool = False, max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Write the edited checkpoint at `out`, in the input's format, atomically; returns notes for the user."""
    from swtool.formats.atomic import atomic_output

    if not plan.active:
        raise SwtoolError("nothing to do: give --zero-super, --scale-super or --zero-outliers")
    check_output(checkpoint, out)
    if checkpoint.format == "gguf":
        with atomic_output(out, directory=False, inputs=[checkpoint.path], force=force) as temp:
            return edit_gguf(checkpoint, temp, plan)
    if isinstance(checkpoint, CompressedTensorsCheckpoint):
        return edit_compressed_tensors(checkpoint, out, plan, force, max_shard_bytes)
    with atomic_output(out, directory=True, inputs=[checkpoint.path], force=force) as temp:
        edit_safetensors(checkpoint, temp, plan, max_shard_bytes)
    return []


def edit_compressed_tensors(checkpoint: CompressedTensorsCheckpoint, out: Path, plan: EditPlan, force: bool, max_shard_bytes: int) -> list[str]:
    """Edit the unquantized modules of a compressed-tensors checkpoint (the super weights' are): its stored tensors are
    streamed as they are, quantization_config included, so the output stays what transformers and vLLM load."""
    from swtool.formats.atomic import atomic_output

    linear = linear_layers(checkpoint)
    quantized = [name for name in checkpoint.names() if checkpoint.quantized(name) and plan.touches(name, linear)]
    if quantized:
        raise SwtoolError(
            f"{checkpoint.path}: the edit would change {quantized[0]}, which is stored quantized (compressed-tensors); "
            "edit only reaches unquantized modules here: `swtool dequantize` first to edit it"
        )
    with atomic_output(out, directory=True, inputs=[checkpoint.path], force=force) as temp:
        edit_safetensors(checkpoint.store, temp, plan, max_shard_bytes)
    return []
