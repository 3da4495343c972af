"""Hugging Face directories: `config.json` plus one safetensors file or an indexed set of shards.

We parse and check the safetensors header ourselves (it is 8 bytes of length
and a JSON document) instead of trusting it: files come from strangers, and a
hostile header must produce a clear error, not an allocation of gigabytes.
Tensor bytes are then read with plain file reads, not through a memory map:
every page of a map that has been touched counts in the process's resident set
until the map goes, so a scan through maps grew to the size of the whole model
(see bench/scan_bench.py); reads keep it at one tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from swtool.formats import PICKLE_SUFFIXES, pickle_refusal
from swtool.formats.base import Checkpoint, Rows
from swtool.config import from_hf
from swtool.errors import SwtoolError

HEADER_CAP = 100 * 1024 * 1024
"""The safetensors format refuses headers larger than 100 MB; so do we."""

DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "F64": (np.dtype("<f8"), torch.float64),
    "F32": (np.dtype("<f4"), torch.float32),
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<u2"), torch.bfloat16),
    "I64": (np.dtype("<i8"), torch.int64),
    "I32": (np.dtype("<i4"), torch.int32),
    "I16": (np.dtype("<i2"), torch.int16),
    "I8": (np.dtype("i1"), torch.int8),
    "U8": (np.dtype("u1"), torch.uint8),
    "BOOL": (np.dtype("?"), torch.bool),
    "F8_E4M3": (np.dtype("u1"), torch.float8_e4m3fn),
}

READ_BLOCK_BYTES = 16 * 1024 * 1024

SHARD_PATTERN = re.compile(r".*-\d+-of-\d+\.safetensors$")

JSON_ITEMS_CAP = 1_000_000
"""Most JSON values (counted as commas and opening brackets, before parsing) in a header, index or
config. A real header holds a few thousand tensors at ~8 items each; 100 MB of tiny hostile entries
would become millions of Python objects (GBs) if parsed."""

CONFIG_CAP = 16 * 1024 * 1024
"""config.json files are kilobytes; anything this large is not one."""


def parse_json(raw: bytes, where: str, what: str) -> object:
    """json.loads for untrusted bytes: bounded in the objects it may create, every failure one SwtoolError."""
    if raw.count(b",") + raw.count(b"{") + raw.count(b"[") > JSON_ITEMS_CAP:
        raise SwtoolError(f"{where}: {what} holds more than {JSON_ITEMS_CAP} JSON values; refusing it (real ones hold thousands)")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SwtoolError(f"{where}: {what} is not valid JSON ({exc.__class__.__name__})") from None


def read_json(path: Path, cap: int, what: str) -> object:
    size = path.stat().st_size
    if size > cap:
        raise SwtoolError(f"{path}: {size} bytes is too large for {what} (at most {cap})")
    return parse_json(path.read_bytes(), str(path), what)


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset in the file."""
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate one safetensors file's header; return its entries and `__metadata__`."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise SwtoolError(f"{path}: truncated safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > HEADER_CAP:
            raise SwtoolError(f"{path}: safetensors header of {header_len} bytes exceeds the format's 100 MB cap")
        if 8 + header_len > size:
            raise SwtoolError(f"{path}: safetensors header length ({header_len}) runs past the end of the file (truncated?)")
        raw = fh.read(header_len)
    header = parse_json(raw, str(path), "safetensors header")
    if not isinstance(header, dict):
        raise SwtoolError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SwtoolError(f"{path}: safetensors __metadata__ is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise SwtoolError(f"{path}: tensor {name}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise SwtoolError(f"{path}: tensor {name}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise SwtoolError(f"{path}: tensor {name}: shape {shape!r} is not a list of non-negative integers")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise SwtoolError(f"{path}: tensor {name}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_size:
            raise SwtoolError(
                f"{path}: tensor {name}: data_offsets end at byte {end} but the file holds {data_size} data bytes (truncated?)"
            )
        expected = math.prod(shape) * DTYPES[dtype][0].itemsize
        if end - begin != expected:
            raise SwtoolError(
                f"{path}: tensor {name}: shape {shape} of {dtype} needs {expected} bytes, data_offsets give {end - begin}"
            )
        entries[name] = TensorEntry(path, dtype, tuple(shape), data_start + begin, end - begin)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            raise SwtoolError(f"{path}: tensor {name} overlaps the previous tensor's bytes")
        if begin > position:
            raise SwtoolError(f"{path}: a hole of {begin - position} bytes precedes tensor {name}")
        position = end
    if position != data_size:
        raise SwtoolError(f"{path}: {data_size - position} trailing bytes after the last tensor")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def shard_map(directory: Path) -> dict[str, TensorEntry]:
    """All tensors of a directory, checking the index against the shards it names."""
    index_path = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    pickles = sorted(p for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if index_path.exists():
        index = read_json(index_path, HEADER_CAP, "a safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SwtoolError(f"{index_path}: not a valid index (needs a JSON object with a weight_map of shard names)")
        shard_names = sorted(set(weight_map.values()))
        for shard_name in shard_names:
            if shard_name != Path(shard_name).name or shard_name.startswith("."):
                raise SwtoolError(f"{index_path}: shard name {shard_name!r} is not a file name in the model directory")
        entries: dict[str, TensorEntry] = {}
        for shard_name in shard_names:
            shard = directory / str(shard_name)
            if not shard.is_file():
                raise SwtoolError(f"{index_path}: names shard {shard_name}, which does not exist")
            shard_entries, _ = read_header(shard)
            for name, entry in shard_entries.items():
                if name in entries:
                    raise SwtoolError(f"{directory}: tensor {name} is stored in two shards ({entries[name].file.name}, {shard.name})")
                entries[name] = entry
        for name, shard_name in weight_map.items():
            if name not in entries:
                raise SwtoolError(f"{index_path}: tensor {name} is listed in {shard_name} but not stored there")
            if entries[name].file.name != shard_name:
                raise SwtoolError(f"{index_path}: tensor {name} is listed in {shard_name} but stored in {entries[name].file.name}")
        unindexed = [p.name for p in directory.glob("*.safetensors") if SHARD_PATTERN.match(p.name) and p.name not in shard_names]
        if unindexed:
            raise SwtoolError(f"{directory}: shard {sorted(unindexed)[0]} is not in model.safetensors.index.json")
        return entries
    if single.is_file():
        return read_header(single)[0]
    if pickles:
        raise pickle_refusal(pickles[0])
    raise SwtoolError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise SwtoolError(f"{directory}: no config.json (not a Hugging Face model directory)")
    config = read_json(path, CONFIG_CAP, "config.json")
    if not isinstance(config, dict):
        raise SwtoolError(f"{path}: not a JSON object")
    return config


class SafetensorsCheckpoint(Checkpoint):
    format = "safetensors"

    def __init__(self, directory: Path):
        self.path = directory
        self.raw_config = read_config(directory)
        self.config = from_hf(self.raw_config)
        self._entries: dict[str, TensorEntry] = shard_map(directory)
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
        np_dtype, torch_dtype = DTYPES[entry.dtype]
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
        np_dtype, torch_dtype = DTYPES[entry.dtype]
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
