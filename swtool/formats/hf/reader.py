"""Hugging Face directories: `config.json` plus one safetensors file or an indexed set of shards.

Headers are parsed and checked once, in `header.py`. A whole tensor wanted in its stored dtype
is mapped (private), not read: its values are the page cache's pages
themselves, so no loader copies them, and the map goes with the tensor. One long-lived map of
the whole file would instead keep every page touched in the resident set until the end, so a
scan grew to the size of the model (see bench/scan_bench.py); a map per tensor keeps it at the
tensors alive (two layers in a stream). Rows, and tensors converted to another dtype, are read
or converted from such a map piece by piece.
"""

from __future__ import annotations

import mmap
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

    def _mapped(self, entry: TensorEntry) -> np.ndarray:
        """The tensor's bytes as a private map of its file: copy-on-write, so nothing a caller does
        reaches the file. Not populated when made: MAP_POPULATE on a writable private map copies
        every page (15 s of system time on the 7B scan), so pages are faulted in as they are read."""
        if entry.nbytes == 0:
            return np.empty(0, np.uint8)
        page_start = entry.start - entry.start % mmap.ALLOCATIONGRANULARITY
        lead = entry.start - page_start
        descriptor = self._handle(entry.file).fileno()
        if os.fstat(descriptor).st_size < entry.start + entry.nbytes:  # a map past the end would crash on access (SIGBUS)
            raise SwtoolError(f"{entry.file}: file ended before tensor data (truncated since it was opened?)")
        try:
            view = mmap.mmap(
                descriptor,
                lead + entry.nbytes,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=page_start,
            )
        except (OSError, ValueError) as exc:
            raise SwtoolError(f"{entry.file}: cannot map tensor data ({exc}); truncated since it was opened?") from None
        return np.frombuffer(view, np.uint8, entry.nbytes, lead)

    def _read(self, name: str, rows: Rows) -> torch.Tensor:
        entry = self._entries[name]
        np_dtype, torch_dtype = STORAGE[entry.dtype].numpy, STORAGE[entry.dtype].torch
        if rows is None:
            return torch.from_numpy(self._mapped(entry).view(np_dtype).reshape(entry.shape)).view(torch_dtype)
        index = np.arange(entry.shape[0])[rows]  # validates and normalises any row selection
        row_bytes = entry.nbytes // max(entry.shape[0], 1)
        array = np.empty((len(index), *entry.shape[1:]), np_dtype)
        # One read per run of consecutive rows: a head chunk is one read, scattered embedding rows a few.
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        for first, last in zip([0, *breaks], [*breaks, len(index)]):
            self._read_span(entry.file, entry.start + int(index[first]) * row_bytes, array[first:last])
        return torch.from_numpy(array).view(torch_dtype)

    def refills(self, name: str, dtype: torch.dtype) -> bool:
        """Only a conversion refills: a tensor wanted in its stored dtype is mapped, with no copy at all."""
        return STORAGE[self._entries[name].dtype].torch != dtype

    def _read_into(self, name: str, out: torch.Tensor) -> None:
        mapped = torch.from_numpy(self._mapped(self._entries[name])).view(STORAGE[self._entries[name].dtype].torch)
        out.view(-1).copy_(mapped)  # converted straight from the page cache's pages

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
