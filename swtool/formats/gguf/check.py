"""Walk a GGUF header with bounds checks before gguf-py is allowed to read it.

gguf-py's reader trusts every count in the file: an array that claims 2**40
items makes it loop (and allocate a numpy view per item) long after the file
has run out, and a tensor whose offset lies past the end fails with an
unrelated reshape error. Files come from strangers, so this module reads the
header itself through a read-only memory map, checks every length against the
bytes that remain, never allocates anything sized by a count in the file, and
reports the first problem as one SwtoolError. Only then does
`gguf_in.open_reader` hand the file to gguf-py.

Layout (GGUF v2/v3): magic, version u32, tensor count u64, key/value count u64,
the key/values, the tensor infos (name, n_dims u32, dims u64 each, type u32,
offset u64), padding to `general.alignment`, then the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import gguf

from swtool.errors import SwtoolError

SUPPORTED_VERSIONS = (2, 3)
"""What gguf-py's reader handles (v1 used 32-bit counts and is long gone)."""

MAX_DIMS = 4
"""GGML_MAX_DIMS: llama.cpp refuses tensors of more dimensions."""

MAX_NAME = 65535
"""Longest key or tensor name accepted; the spec caps keys at 2**16 - 1 bytes."""

MAX_NESTING = 8
"""Arrays of arrays deeper than this are refused rather than recursed into."""

MAX_ARRAY_ITEMS = 1 << 22
"""Items in one metadata array. The largest real ones are vocabularies and merge lists (~300k);
gguf-py turns every item into a Python object, so a billion one-byte items would take tens of GBs."""

MAX_METADATA_ITEMS = 1 << 23
"""Items in all metadata arrays together, for the same reason."""

SCALAR_SIZES = {
    gguf.GGUFValueType.UINT8: 1,
    gguf.GGUFValueType.INT8: 1,
    gguf.GGUFValueType.BOOL: 1,
    gguf.GGUFValueType.UINT16: 2,
    gguf.GGUFValueType.INT16: 2,
    gguf.GGUFValueType.UINT32: 4,
    gguf.GGUFValueType.INT32: 4,
    gguf.GGUFValueType.FLOAT32: 4,
    gguf.GGUFValueType.UINT64: 8,
    gguf.GGUFValueType.INT64: 8,
    gguf.GGUFValueType.FLOAT64: 8,
}
MIN_VALUE_SIZE = {gguf.GGUFValueType.STRING: 8, gguf.GGUFValueType.ARRAY: 12, **SCALAR_SIZES}
"""The fewest bytes one value of each type can occupy: bounds a count before walking its items."""


class _Cursor:
    """A position in the mapped file; every read checks that the bytes exist."""

    def __init__(self, path: Path, data: mmap.mmap | bytes, order: str):
        self.path, self.data, self.order, self.pos = path, data, order, 0
        self.items = 0
        """Metadata array items seen so far."""

    def fail(self, message: str) -> SwtoolError:
        return SwtoolError(f"{self.path}: corrupt GGUF header: {message}")

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def skip(self, count: int, what: str) -> None:
        if count > self.remaining():
            raise self.fail(f"{what} needs {count} bytes at offset {self.pos}, only {self.remaining()} remain (truncated?)")
        self.pos += count

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        start = self.pos
        self.skip(size, what)
        return struct.unpack_from(self.order + fmt, self.data, start)[0]

    def u32(self, what: str) -> int:
        return self.unpack("I", what)

    def u64(self, what: str) -> int:
        return self.unpack("Q", what)

    def name(self, what: str) -> str:
        """A key or tensor name: short by specification, so it is read; longer ones are refused."""
        length = self.u64(f"length of {what}")
        if length > MAX_NAME:
            raise self.fail(f"{what} claims {length} bytes (names are at most {MAX_NAME})")
        start = self.pos
        self.skip(length, what)
        try:
            return bytes(self.data[start : start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {start} is not UTF-8") from None

    def value(self, raw_type: int, key: str, depth: int = 0) -> None:
        """Step over one value of `raw_type` without materialising it."""
        try:
            kind = gguf.GGUFValueType(raw_type)
        except ValueError:
            raise self.fail(f"key {key}: unknown value type {raw_type}") from None
        if kind in SCALAR_SIZES:
            self.skip(SCALAR_SIZES[kind], f"value of {key}")
        elif kind == gguf.GGUFValueType.STRING:
            self.skip(self.u64(f"string length of {key}"), f"string value of {key}")
        else:
            if depth >= MAX_NESTING:
                raise self.fail(f"key {key}: arrays nested deeper than {MAX_NESTING}")
            item_raw = self.u32(f"array item type of {key}")
            count = self.u64(f"array length of {key}")
            try:
                item = gguf.GGUFValueType(item_raw)
            except ValueError:
                raise self.fail(f"key {key}: unknown array item type {item_raw}") from None
            if count * MIN_VALUE_SIZE[item] > self.remaining():
                raise self.fail(f"key {key}: array claims {count} items, more than the {self.remaining()} bytes left in the file hold")
            self.items += count
            if count > MAX_ARRAY_ITEMS or self.items > MAX_METADATA_ITEMS:
                raise self.fail(
                    f"key {key}: {count} array items ({self.items} in all) exceed swtool's limits "
                    f"({MAX_ARRAY_ITEMS} per array, {MAX_METADATA_ITEMS} in all; real files hold a few hundred thousand)"
                )
            if item in SCALAR_SIZES:
                self.skip(count * SCALAR_SIZES[item], f"array {key}")
                return
            if item == gguf.GGUFValueType.STRING:
                count -= self.strings(count)  # the rest, if any, fails below with value()'s message
            for _ in range(count):
                self.value(item_raw, key, depth + 1)

    def strings(self, count: int) -> int:
        """Step over up to `count` strings that lie within the file, in one loop (a vocabulary is
        ~100,000 of them); how many it stepped over."""
        data, fmt, end, pos = self.data, self.order + "Q", len(self.data), self.pos
        unpack = struct.unpack_from
        done = 0
        while done < count and pos + 8 <= end:
            stop = pos + 8 + unpack(fmt, data, pos)[0]
            if stop > end:
                break
            pos, done = stop, done + 1
        self.pos = pos
        return done


def _map(path: Path) -> mmap.mmap | bytes:
    with path.open("rb") as fh:
        try:
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            return b""


def check_gguf(path: Path) -> None:
    """Raise SwtoolError unless `path` is a GGUF file whose header and tensor extents are consistent."""
    data = _map(path)
    try:
        _check(path, data)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def _check(path: Path, data: mmap.mmap | bytes) -> None:
    if len(data) < 8 or data[:4] != b"GGUF":
        raise SwtoolError(f"{path}: not a GGUF file (bad magic {bytes(data[:4])!r})")
    (version,) = struct.unpack_from("<I", data, 4)
    order = "<"
    if version & 0xFFFF == 0:  # written on a machine of the other byte order, as gguf-py detects it
        order = ">"
        (version,) = struct.unpack_from(">I", data, 4)
    if version not in SUPPORTED_VERSIONS:
        raise SwtoolError(f"{path}: GGUF version {version} is not supported (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    cur = _Cursor(path, data, order)
    cur.pos = 8
    tensor_count = cur.u64("tensor count")
    kv_count = cur.u64("key/value count")
    if kv_count * 13 > cur.remaining() or tensor_count * 24 > cur.remaining():
        raise cur.fail(f"{kv_count} key/values and {tensor_count} tensors cannot fit in the {len(data)} bytes of the file")
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    keys: set[str] = set()
    for index in range(kv_count):
        key = cur.name(f"key #{index}")
        if key in keys:
            raise cur.fail(f"key {key} appears twice")
        keys.add(key)
        raw_type = cur.u32(f"value type of {key}")
        start = cur.pos
        cur.value(raw_type, key)
        if key == "general.alignment":
            if raw_type != gguf.GGUFValueType.UINT32:
                raise cur.fail("general.alignment is not a UINT32")
            (alignment,) = struct.unpack_from(order + "I", data, start)
            if alignment == 0 or alignment & (alignment - 1):
                raise cur.fail(f"general.alignment {alignment} is not a power of two")
    tensors: list[tuple[int, int, str]] = []
    names: set[str] = set()
    for index in range(tensor_count):
        name = cur.name(f"name of tensor #{index}")
        if name in names:
            raise cur.fail(f"tensor {name} appears twice")
        names.add(name)
        n_dims = cur.u32(f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [cur.u64(f"dimensions of {name}") for _ in range(n_dims)]
        raw_type = cur.u32(f"type of {name}")
        offset = cur.u64(f"offset of {name}")
        try:
            kind = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[kind]
        except (ValueError, KeyError):
            raise SwtoolError(f"{path}: tensor {name} has unknown tensor type {raw_type}") from None
        if any(d == 0 for d in dims) or dims[0] % block:
            raise cur.fail(f"tensor {name} has dimensions {dims}, not usable for {kind.name} (blocks of {block})")
        elements = 1
        for d in dims:
            elements *= d
        tensors.append((offset, elements // block * type_size, name))
        if offset % alignment:
            raise cur.fail(f"tensor {name} starts at offset {offset}, not a multiple of the alignment {alignment}")
    data_start = cur.pos + (-cur.pos % alignment)
    available = max(len(data) - data_start, 0)
    end = 0
    for offset, nbytes, name in sorted(tensors):
        if offset < end:
            raise cur.fail(f"tensor {name} overlaps the previous tensor's data")
        end = offset + nbytes
        if end > available:
            raise SwtoolError(
                f"{path}: tensor {name} needs data up to byte {end} but the file holds {available} data bytes (truncated?)"
            )
