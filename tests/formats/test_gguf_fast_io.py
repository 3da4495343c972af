"""swtool's faster GGUF reader and writer (gguf_in.Reader, gguf_out.Writer) give exactly what gguf-py's give."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType

from swtool.formats.gguf.reader import Reader
from swtool.formats.gguf.writer import Writer

VT = GGUFValueType
METADATA = [
    ("a.strings", ["", "héllo", "x" * 300, "Ġthe"], VT.ARRAY, VT.STRING),
    ("a.one_string", ["only"], VT.ARRAY, VT.STRING),
    ("a.i32", [0, -1, 2**31 - 1, -(2**31)], VT.ARRAY, VT.INT32),
    ("a.u8", [0, 255, 7], VT.ARRAY, VT.UINT8),
    ("a.f32", [0.5, -1e30, 3.25], VT.ARRAY, VT.FLOAT32),
    ("a.f64", [1e300, -0.0], VT.ARRAY, VT.FLOAT64),
    ("a.u64", [2**64 - 1, 0], VT.ARRAY, VT.UINT64),
    ("a.bools", [True, False, True], VT.ARRAY, VT.BOOL),
    ("a.nested", [[1, 2], [3]], VT.ARRAY, None),
    ("a.untyped", [1, 2, 3], VT.ARRAY, None),
    ("s.scalar_string", "plain", VT.STRING, None),
    ("s.u32", 7, VT.UINT32, None),
    ("s.bool", True, VT.BOOL, None),
]


def write(cls: type[gguf.GGUFWriter], path: Path) -> bytes:
    writer = cls(path, "llama")
    for key, value, vtype, sub in METADATA:
        writer.add_key_value(key, value, vtype, sub)
    writer.add_tensor_info("t.weight", (2, 32), np.dtype(np.float32), 2 * 32 * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.write_tensor_data(np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.close()
    return path.read_bytes()


def test_writer_bytes_equal_gguf_py(tmp_path):
    assert write(Writer, tmp_path / "ours.gguf") == write(gguf.GGUFWriter, tmp_path / "theirs.gguf")


def assert_same_reading(path: Path) -> None:
    theirs, ours = gguf.GGUFReader(path, "r"), Reader(path, "r")
    assert list(theirs.fields) == list(ours.fields)
    for a, b in zip(theirs.fields.values(), ours.fields.values()):
        assert (a.offset, a.name, a.data, a.types) == (b.offset, b.name, b.data, b.types), a.name
        assert len(a.parts) == len(b.parts), a.name
        for x, y in zip(a.parts, b.parts):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), a.name
        assert a.contents() == b.contents(), a.name
    assert theirs.data_offset == ours.data_offset
    for a, b in zip(theirs.tensors, ours.tensors, strict=True):
        assert (a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == (b.name, b.tensor_type, b.n_elements, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data)
        assert not b.data.flags.writeable  # still a read-only view of the file


def test_reader_fields_equal_gguf_py(tmp_path):
    path = tmp_path / "kinds.gguf"
    write(gguf.GGUFWriter, path)
    assert_same_reading(path)


def test_reader_on_a_real_tokenizer(smollm2_gguf):
    """49,152 tokens, their types and 48,900 merges, as llama.cpp's converter wrote them."""
    assert_same_reading(smollm2_gguf)


def test_reader_refuses_what_gguf_py_refuses(tmp_path):
    path = tmp_path / "cut.gguf"
    data = write(gguf.GGUFWriter, tmp_path / "whole.gguf")
    path.write_bytes(data[: data.index(b"x" * 300) + 10])  # a string array cut short
    with pytest.raises(Exception) as theirs:
        gguf.GGUFReader(path, "r")
    with pytest.raises(type(theirs.value)):
        Reader(path, "r")
