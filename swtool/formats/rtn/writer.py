"""The swtool-rtn writer: every tensor streamed into safetensors shards, the chosen ones quantized (see layout)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from swtool.codecs.errors import NonFiniteError
from swtool.codecs.rtn import QuantizedTensor, QuantSpec, quantize
from swtool.errors import SwtoolError
from swtool.formats.base import STORAGE_OF, Checkpoint, HeldValues
from swtool.formats.hf.export import copy_model_files, exported_names
from swtool.formats.hf.writer import PlannedTensor, ShardedWriter
from swtool.formats.rtn import layout
from swtool.workers import parallel_chunks


def write_rtn(
    checkpoint: Checkpoint,
    directory: Path,
    spec: QuantSpec,
    targets: list[str],
    held: HeldValues,
    metadata: dict[str, str],
    max_shard_bytes: int,
    importance: dict[str, torch.Tensor],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Write the swtool-rtn directory: model files plus shards; returns the --clip auto threshold chosen per tensor.

    `importance` weights each input column's error for --clip auto (empty otherwise); `metadata`
    is the provenance recorded beside the format's own keys.
    """
    names = exported_names(checkpoint)
    wanted = set(targets)
    dtype = checkpoint.native_dtype(targets[0]) if targets else torch.float16
    plan: list[PlannedTensor] = []
    for name in names:
        if name in wanted:
            plan += layout.planned(name, checkpoint.shape(name), spec.bits, spec.block)
        else:
            plan.append(PlannedTensor(name, STORAGE_OF[checkpoint.native_dtype(name)].name, checkpoint.shape(name)))
    with ShardedWriter(directory, plan, layout.metadata(spec.bits, spec.block, spec.sym, str(spec.clip), dtype, held, metadata), max_shard_bytes) as writer:
        thresholds: dict[str, float] = {}
        with parallel_chunks():
            for index, name in enumerate(names):
                weight = checkpoint.load(name, checkpoint.native_dtype(name), checked=name not in wanted)
                if name in wanted:
                    q = quantize_checked(checkpoint, name, weight, spec, [(r, c) for r, c, _ in held.get(name, [])], importance.get(name))
                    del weight
                    if q.threshold is not None:
                        thresholds[name] = q.threshold
                    for stored_name, tensor in layout.stored(name, q):
                        writer.write(stored_name, tensor)
                else:
                    writer.write(name, weight)
                if progress:
                    progress(index + 1, len(names))
    copy_model_files(checkpoint, directory, dtype)
    return thresholds


def quantize_checked(checkpoint: Checkpoint, name: str, weight: torch.Tensor, spec: QuantSpec, held: list[tuple[int, int]], importance: torch.Tensor | None) -> QuantizedTensor:
    """`quantize` on a weight loaded unchecked: quantizing reads every value once anyway and finds NaN/Inf
    there, so the loader's own check (a whole extra pass) runs only then, to name the first bad value."""
    try:
        return quantize(weight, spec, held, importance)
    except NonFiniteError as exc:
        checkpoint.load(name, weight.dtype)  # raises, naming the first bad value, unless --allow-nonfinite
        raise SwtoolError(f"{checkpoint.path}: tensor {checkpoint.stored_name(name)} {exc} (--allow-nonfinite only lets them through unquantized tensors)") from None
