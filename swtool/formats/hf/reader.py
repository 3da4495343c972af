"""Hugging Face directories: `config.json` plus one safetensors file or an indexed set of shards.

Headers are parsed and checked once, in `header.py`; tensor bytes are then read with plain file reads, not through a memory map:
every page of a map that has been touched counts in the process's resident set
until the map goes, so a scan through maps grew to the size of the whole model
(see bench/scan_bench.py); reads keep it at one tensor.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from swtool.errors import SwtoolError
from swtool.families.config import from_hf
from swtool.formats.base import STORAGE, Checkpoint, Rows
from swtool.formats.hf.header import Shards, TensorEntry, read_config, read_shards

READ_BLOCK_BYTES = 16 * 1024 * 1024


class SafetensorsCheckpoint(Checkpoint):
    format = "safetensors"

    def __init__(self, directory: Path, shards: Shards | None = None):
        self.path = directory
        self.raw_config = read_config(directory)
        self.config = from_hf(self.raw_config)
        self.shards = shards or read_shards(directory)
        self._entries: dict[str, TensorEntry] = self.shards.entries
        self.files = sorted({e.file for e in self._entries.values()})
        self._handles: dict[Path, BinaryIO] = {}
        self._opening = threading.Lock()
        self._local = threading.local()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def stored_name(self, name: str) -> str:
        return name

    def stored_dtype(self, name: str) -> str:
        return self._entries[name].dtype

    def _handle(self, file: Path) -> BinaryIO:
        with self._opening:
            if file not in self._handles:
                self._handles[file] = file.open("rb", buffering=0)
            return self._handles[file]

    @property
    def _staging(self) -> np.ndarray:
        """One staging block per thread, reused for every tensor that thread reads."""
        if not hasattr(self._local, "staging"):
            self._local.staging = np.empty(READ_BLOCK_BYTES, np.uint8)
        return self._local.staging

    def _read(self, name: str, rows: Rows) -> torch.Tensor:
        entry = self._entries[name]
        np_dtype, torch_dtype = STORAGE[entry.dtype].numpy, STORAGE[entry.dtype].torch
        if rows is None:
            array = np.empty(entry.shape, np_dtype)
            self._read_span(entry.file, entry.start, array)
        else:
            index = np.arange(entry.shape[0])[rows]  # validates and normalises any row selection
            row_bytes = entry.nbytes // max(entry.shape[0], 1)
            array = np.empty((len(index), *entry.shape[1:]), np_dtype)
            # One read per run of consecutive rows: a head chunk is one read, scattered embedding rows a few.
            breaks = np.flatnonzero(np.diff(index) != 1) + 1
            for first, last in zip([0, *breaks], [*breaks, len(index)]):
                self._read_span(entry.file, entry.start + int(index[first]) * row_bytes, array[first:last])
        return torch.from_numpy(array).view(torch_dtype)

    def _read_into(self, name: str, out: torch.Tensor) -> bool:
        entry = self._entries[name]
        np_dtype, torch_dtype = STORAGE[entry.dtype].numpy, STORAGE[entry.dtype].torch
        if out.dtype == torch_dtype:  # stored as wanted: straight into out, one copy
            self._read_span(entry.file, entry.start, out.view(-1).view(torch.uint8).numpy())
            return True
        # Through one private staging block, reused for every tensor: fresh memory costs page faults.
        flat = out.view(-1)
        itemsize = np_dtype.itemsize
        step = max(1, READ_BLOCK_BYTES // itemsize)
        count = entry.nbytes // itemsize
        for start in range(0, count, step):
            block = self._staging[: min(step, count - start) * itemsize].view(np_dtype)
            self._read_span(entry.file, entry.start + start * itemsize, block)
            flat[start : start + len(block)].copy_(torch.from_numpy(block).view(torch_dtype))
        return True

    def _read_span(self, file: Path, offset: int, into: np.ndarray) -> None:
        view = memoryview(into).cast("B")
        descriptor = self._handle(file).fileno()
        done = 0
        while done < len(view):
            count = os.preadv(descriptor, [view[done:]], offset + done)  # no shared file position: threads may read at once
            if not count:
                raise SwtoolError(f"{file}: file ended while reading tensor data (truncated since it was opened?)")
            done += count

    def tokenizer_json(self) -> str:
        path = self.path / "tokenizer.json"
        if not path.is_file():
            raise SwtoolError(f"{self.path}: no tokenizer.json (swtool needs the fast-tokenizer file)")
        return path.read_text()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
