"""Streaming safetensors shards: plan every tensor from shapes, then write data one tensor at a time.

A safetensors header must list every tensor's offsets before the data, so the
writer takes a plan (name, dtype, shape) up front, cuts it into shards of at
most `max_shard_bytes`, and then accepts tensors in plan order, writing each
straight to its shard. Memory holds one tensor, never the model.
`model.safetensors.index.json` is written when there is more than one shard,
as transformers expects.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from swtool.errors import SwtoolError
from swtool.formats.base import STORAGE, STORAGE_OF
from swtool.formats.outfile import OutputFile


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    """safetensors dtype name (F32, BF16, U8...)."""
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * STORAGE[self.dtype].size


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; also KB, MB, GiB, MiB... and plain byte counts."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGTIB")
    unit = stripped[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise SwtoolError(f"cannot read size {text!r} (examples: 5GB, 500MB, 2GiB)") from None
    if value <= 0:
        raise SwtoolError(f"size {text!r} must be positive")
    return int(value)


def _shard_plan(plan: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in plan:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


class ShardedWriter:
    """Write planned tensors, in plan order, into `directory` as one file or an indexed set of shards."""

    def __init__(self, directory: Path, plan: list[PlannedTensor], metadata: dict[str, str], max_shard_bytes: int = 5 * 10**9):
        names = [t.name for t in plan]
        if len(set(names)) != len(names):
            raise SwtoolError("internal: duplicate tensor names in the write plan")
        self.directory = directory
        self.metadata = {str(k): str(v) for k, v in metadata.items()}
        self.shards = _shard_plan(plan, max_shard_bytes)
        count = len(self.shards)
        self.files = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._queue = [(shard_index, t) for shard_index, shard in enumerate(self.shards) for t in shard]
        self._position = 0
        self._handle: OutputFile | None = None
        self._open_index = -1

    def _open(self, index: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for tensor in self.shards[index]:
            header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align data to 8 bytes, as the reference writer does
        self._handle = OutputFile(self.directory / self.files[index])
        self._handle.write(struct.pack("<Q", len(raw)))
        self._handle.write(raw)
        self._open_index = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, planned = self._queue[self._position]
        if name != planned.name:
            raise SwtoolError(f"internal: wrote {name} where the plan expects {planned.name}")
        if getattr(STORAGE_OF.get(tensor.dtype), 'name', None) != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise SwtoolError(f"internal: {name} is {tensor.dtype} {list(tensor.shape)}, planned {planned.dtype} {list(planned.shape)}")
        if shard_index != self._open_index:
            self._open(shard_index)
        data = tensor.detach().contiguous().cpu()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        elif data.dtype == torch.float8_e4m3fn:  # numpy has no float8: write its bytes
            data = data.view(torch.uint8)
        assert self._handle is not None
        self._handle.write(memoryview(data.numpy()).cast("B"))  # the tensor's own bytes: no copy on the way to the file
        self._position += 1

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None) -> None:
        """Close on success; on an error stop writing (the atomic output removes what was written)."""
        if kind is None:
            self.close()
        elif self._handle is not None:
            self._handle.abandon()
            self._handle = None

    def close(self) -> None:
        """Finish the last shard and write the index; every planned tensor must have been written."""
        if self._position != len(self._queue):
            missing = self._queue[self._position][1].name
            raise SwtoolError(f"internal: output closed before tensor {missing} was written")
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if len(self.files) > 1:
            weight_map = {t.name: self.files[i] for i, shard in enumerate(self.shards) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total, **self.metadata}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
