"""Write a compressed-tensors checkpoint: plan every stored tensor from shapes, then stream one weight at a time.

The shards go through swtool's ShardedWriter (one tensor in memory, an index
when there is more than one shard); the quantized modules' tensors are laid out
as swtool.formats.compressed_tensors.schema describes, every other tensor is
written as itself in the dtype the caller gives. config.json (copied or
produced by the caller) then gets its `quantization_config`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from swtool.codecs.compressed import pack_int32, pack_zero, quantize_fp8, quantize_int
from swtool.codecs.rtn import Clip
from swtool.errors import SwtoolError
from swtool.formats.base import Checkpoint
from swtool.formats.compressed_tensors import schema
from swtool.formats.base import STORAGE_OF
from swtool.formats.hf.writer import PlannedTensor, ShardedWriter


@dataclass(frozen=True)
class Layout:
    """What to quantize and how: one scheme for every target weight."""

    scheme: schema.WeightScheme
    targets: tuple[str, ...]
    """Weight names (canonical, `.weight`) to quantize."""
    scale_dtype: torch.dtype
    """The dtype of scales, and so of the rebuilt weights: the model's own."""

    @property
    def group(self) -> int | None:
        return self.scheme.group_size if self.scheme.strategy == "group" else None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_group(checkpoint: Checkpoint, targets: list[str], group: int) -> None:
    """--block N must divide the row length of every quantized weight: groups never straddle rows in this format."""
    lengths = {name: checkpoint.shape(name)[-1] for name in targets}
    common = math.gcd(*lengths.values()) if lengths else group
    for name, length in lengths.items():
        if length % group:
            choices = ", ".join(str(d) for d in divisors(common) if d > 1)
            raise SwtoolError(
                f"--block {group}: does not divide the row length {length} of {checkpoint.stored_name(name)}; "
                f"--format compressed-tensors needs a group dividing every row: {choices} or channel"
            )


def ignored_modules(names: list[str], shapes: dict[str, tuple[int, ...]], targets: set[str]) -> list[str]:
    """Module names of every linear layer that is not quantized (2-D `.weight`s but embeddings), and `lm_head` always when kept.

    With `Linear` as the target, anything not in `ignore` must be stored quantized, so a tied
    head (no tensor of its own, but an nn.Linear in the model) is listed too.
    """
    kept = [
        schema.module_of(n) for n in names
        if n.endswith(".weight") and len(shapes[n]) == 2 and "embed" not in n and n not in targets
    ]
    if "lm_head.weight" not in targets and "lm_head" not in kept:
        kept.append("lm_head")
    return kept


def planned(name: str, shape: tuple[int, ...], layout: Layout) -> list[PlannedTensor]:
    """The stored tensors of one quantized weight, in write order."""
    module, scheme = schema.module_of(name), layout.scheme
    rows, cols = shape
    scale = PlannedTensor(f"{module}.{schema.SCALE_LEAF}", STORAGE_OF[layout.scale_dtype].name, (rows, cols // layout.group if layout.group else 1))
    if scheme.type == "float":
        return [PlannedTensor(f"{module}.weight", "F8_E4M3", (rows, cols)), scale]
    out = [PlannedTensor(f"{module}.{schema.PACKED_LEAF}", "I32", (rows, math.ceil(cols * scheme.num_bits / 32))), scale]
    if not scheme.symmetric:
        out.append(PlannedTensor(f"{module}.{schema.ZERO_LEAF}", "I32", (math.ceil(rows * scheme.num_bits / 32), scale.shape[1])))
    return out + [PlannedTensor(f"{module}.{schema.SHAPE_LEAF}", "I64", (2,))]


def stored(name: str, weight: torch.Tensor, layout: Layout, clip: Clip, importance: torch.Tensor | None) -> tuple[list[tuple[str, torch.Tensor]], float | None]:
    """One weight quantized into its stored tensors (in planned order) and the --clip auto threshold, if any."""
    module, scheme = schema.module_of(name), layout.scheme
    if scheme.type == "float":
        values, scale = quantize_fp8(weight, layout.scale_dtype)
        return [(f"{module}.weight", values), (f"{module}.{schema.SCALE_LEAF}", scale)], None
    q = quantize_int(weight, scheme.num_bits, layout.group or weight.shape[-1], scheme.symmetric, layout.scale_dtype, clip, importance)
    out = [(f"{module}.{schema.PACKED_LEAF}", pack_int32(q.codes, q.bits)), (f"{module}.{schema.SCALE_LEAF}", q.scale)]
    if q.zero is not None:
        out.append((f"{module}.{schema.ZERO_LEAF}", pack_zero(q.zero, q.bits)))
    return out + [(f"{module}.{schema.SHAPE_LEAF}", torch.tensor(weight.shape, dtype=torch.int64))], q.threshold


def write_shards(
    checkpoint: Checkpoint,
    directory: Path,
    names: list[str],
    kept_dtype: Callable[[str], torch.dtype],
    layout: Layout,
    metadata: dict[str, str],
    max_shard_bytes: int,
    clip: Clip = Clip(),
    importance: dict[str, torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Stream `names` of `checkpoint` into shards in `directory`; returns the --clip auto threshold per tensor it clipped."""
    wanted = set(layout.targets)
    plan: list[PlannedTensor] = []
    for name in names:
        if name in wanted:
            plan += planned(name, checkpoint.shape(name), layout)
        else:
            plan.append(PlannedTensor(name, STORAGE_OF[kept_dtype(name)].name, checkpoint.shape(name)))
    with ShardedWriter(directory, plan, {"format": "pt", **metadata}, max_shard_bytes) as writer:
        thresholds: dict[str, float] = {}
        for index, name in enumerate(names):
            if name in wanted:
                tensors, threshold = stored(name, checkpoint.load(name, kept_dtype(name)), layout, clip, (importance or {}).get(name))
                if threshold is not None:
                    thresholds[name] = threshold
                for stored_name, tensor in tensors:
                    writer.write(stored_name, tensor)
            else:
                writer.write(name, checkpoint.load(name, kept_dtype(name)))
            if progress:
                progress(index + 1, len(names))
    return thresholds


def add_quantization_config(directory: Path, layout: Layout, ignore: list[str]) -> None:
    """Put the quantization_config into the config.json already in `directory` (and the scales' dtype as the model's)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = schema.quantization_config(layout.scheme, ignore)
    dtype = str(layout.scale_dtype).removeprefix("torch.")
    config["torch_dtype"] = dtype
    if "dtype" in config:  # transformers v5 spelling
        config["dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
