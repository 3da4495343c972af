"""Copy a GGUF file with some tensors' bytes replaced: every key/value and every other tensor byte for byte.

`swtool edit` changes a few scalars and nothing else, so its GGUF output is
the input file with new bytes in a few tensors. gguf-py's writer cannot do
that faithfully (it re-serialises key/values from Python values, refuses
empty arrays and cannot write nested ones, and pads to its own alignment), so
this writes the container itself: the header; the input's key/value records
copied as raw bytes (minus the keys the caller replaces) followed by the
caller's new string keys; tensor infos in the input's order (a replaced
tensor may change type); then each tensor's data at the input's alignment,
read from the input in blocks (never memory-mapped, so RSS stays flat) or
produced by the caller one tensor at a time.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np
from gguf import GGUFEndian, GGUFValueType

from swtool.codecs.ggml import QType, encoded_nbytes
from swtool.errors import SwtoolError
from swtool.formats.outfile import OutputFile

COPY_BLOCK = 16 << 20
"""Bytes copied at a time from the input's data section."""
GGUF_VERSION = 3


@dataclass(frozen=True)
class Replacement:
    qtype: QType
    """The tensor's type in the output (the input's, unless it had to change)."""
    data: Callable[[], np.ndarray]
    """Produces the tensor's new bytes (uint8) when its turn comes, so one tensor is in memory at a time."""


def _string(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return struct.pack("<Q", len(encoded)) + encoded


def _field_bytes(reader: gguf.GGUFReader, field) -> bytes:
    size = sum(int(part.nbytes) for part in field.parts)
    return reader.data[field.offset : field.offset + size].tobytes()


def _padding(position: int, alignment: int) -> bytes:
    return bytes(-position % alignment)


def _copy_range(source: BinaryIO, offset: int, count: int, out: OutputFile) -> None:
    source.seek(offset)
    while count > 0:
        block = source.read(min(COPY_BLOCK, count))
        if not block:
            raise SwtoolError(f"{source.name}: ends inside a tensor's data")
        out.write(block)
        count -= len(block)


def copy_gguf(
    reader: gguf.GGUFReader,
    source: Path,
    path: Path,
    replacements: Mapping[str, Replacement],
    drop_key: Callable[[str], bool],
    new_strings: Mapping[str, str],
) -> None:
    """Write `source` (opened as `reader`) to `path` with the `replacements` (GGUF tensor name -> new type and bytes),
    without the keys `drop_key` accepts, and with `new_strings` added as string keys."""
    if reader.endianess != GGUFEndian.LITTLE:
        raise SwtoolError(f"{source}: a big-endian GGUF file; swtool edits little-endian files only")
    fields = [f for name, f in reader.fields.items() if not name.startswith("GGUF.") and not drop_key(name) and name not in new_strings]
    records = [_field_bytes(reader, f) for f in fields]
    records += [_string(key) + struct.pack("<I", GGUFValueType.STRING) + _string(value) for key, value in new_strings.items()]
    tensors = reader.tensors
    types = {t.name: replacements[t.name].qtype if t.name in replacements else QType(t.tensor_type) for t in tensors}
    sizes = {t.name: encoded_nbytes(tuple(int(d) for d in t.shape), types[t.name]) if t.name in replacements else int(t.n_bytes) for t in tensors}
    alignment = reader.alignment
    with OutputFile(path) as out, source.open("rb") as data:
        out.write(b"GGUF" + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(records)))
        out.write(b"".join(records))
        offset = 0
        for t in tensors:
            dims = [int(d) for d in t.shape]
            out.write(_string(t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, int(types[t.name]), offset))
            offset += sizes[t.name] + len(_padding(sizes[t.name], alignment))
        out.write(_padding(out.tell(), alignment))
        for t in tensors:
            if t.name in replacements:
                block = np.ascontiguousarray(replacements[t.name].data(), dtype=np.uint8)
                if block.nbytes != sizes[t.name]:
                    raise AssertionError(f"{t.name}: {block.nbytes} bytes produced, {sizes[t.name]} planned")
                out.write(block)
            else:
                _copy_range(data, int(t.data_offset), sizes[t.name], out)
            out.write(_padding(sizes[t.name], alignment))
