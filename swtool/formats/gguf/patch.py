"""A GGUF file with a few weights changed: only the GGML blocks that hold a change are re-encoded.

Callers (`swtool edit`) say which canonical tensors change and give, one tensor at
a time, the old and new float values; this module finds where those values sit in
the stored tensor (Q/K rows in llama.cpp's permuted order, an expert's slice at
its offset in a merged tensor) and rewrites the file through `rewrite.copy_gguf`,
so every key/value and every untouched byte is copied from the input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch

from swtool.codecs.ggml import QType
from swtool.codecs.ggml_edit import fallback_type, reencode, set_values
from swtool.formats.base import Checkpoint
from swtool.formats.gguf.reader import permute_qk, qk_heads
from swtool.formats.gguf.rewrite import Replacement, copy_gguf

Edit = Callable[[str], tuple[torch.Tensor, torch.Tensor]]
"""Canonical name -> (the tensor as loaded, the tensor as it should be), float32, (out, in)."""


def stored_edits(checkpoint: Checkpoint, name: str, edit: Edit) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions in the stored tensor where canonical `name` changes, and the new values there.

    Edits touch 2-D projections only, so Gemma's `1 +` on norm weights never applies here.
    """
    weight, edited = edit(name)
    heads = qk_heads(checkpoint.family, checkpoint.config, name)
    if heads is not None:
        weight, edited = permute_qk(weight, heads), permute_qk(edited, heads)
    changed = (weight != edited).reshape(-1).nonzero().reshape(-1)
    expert = checkpoint.expert_of(name)
    start = 0 if expert is None else expert * weight.numel()
    return (changed + start).numpy(), edited.reshape(-1)[changed].numpy()


def _patched_tensor(checkpoint: Checkpoint, edit: Edit, tensor, names: list[str], target: QType | None, blocks: list[int]) -> np.ndarray:
    """The new bytes of one stored tensor (a gguf ReaderTensor holding the canonical `names`): its blocks
    holding an edit re-encoded, or all of it at `target`; the number of GGML blocks that changed is appended to `blocks`."""
    raw = np.fromfile(checkpoint.path, dtype=np.uint8, count=int(tensor.n_bytes), offset=int(tensor.data_offset))
    edits = [stored_edits(checkpoint, name, edit) for name in names]
    positions = np.concatenate([p for p, _ in edits])
    values = np.concatenate([v for _, v in edits])
    qtype = tensor.tensor_type
    if target is not None:
        blocks.append(int(tensor.n_elements) // gguf.GGML_QUANT_SIZES[target][0])
        return reencode(raw, qtype, tuple(int(d) for d in reversed(tensor.shape)), positions, values, target)
    blocks.append(len(np.unique(positions // gguf.GGML_QUANT_SIZES[qtype][0])))
    return set_values(raw, qtype, positions, values) if len(positions) else raw


def patch_gguf(checkpoint: Checkpoint, path: Path, touched: list[str], edit: Edit, metadata: Mapping[str, str]) -> list[str]:
    """Write `checkpoint` (a GGUF file) to `path` with the `touched` canonical tensors edited; returns notes.

    In a touched tensor only the GGML blocks holding a changed weight are re-encoded, at the
    stored type, unless swtool has no encoder for that type: then the whole tensor is re-encoded
    at the nearest type it has (see swtool.codecs.ggml_edit). The input's `swtool.*` keys described
    how the input was made; they are replaced by `metadata`.
    """
    members: dict[str, list[str]] = {}
    for name in touched:
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
        replacements[gguf_name] = Replacement(target or qtype, partial(_patched_tensor, checkpoint, edit, stored[gguf_name], names, target, blocks))
    copy_gguf(checkpoint.reader, checkpoint.path, path, replacements, lambda key: key.startswith("swtool."), metadata)
    count, tensors = sum(blocks), sum(1 for n in blocks if n)
    notes.append(f"{_plural(count, 'GGML block')} in {_plural(tensors, 'tensor')} re-encoded; every other byte of tensor data copied from the input")
    return notes


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
