"""llama.cpp's importance-matrix files: the GGUF format llama-imatrix writes by default, and the legacy .dat.

What `llama-imatrix` stores (tools/imatrix/imatrix.cpp, `save_imatrix`), and so what is written here:

    general.type          "imatrix"
    imatrix.datasets      [str]  the text files the sums were collected on
    imatrix.chunk_count   u32    chunks of text processed
    imatrix.chunk_size    u32    tokens per chunk
    imatrix.stats_schema  [str]  the names of the 12 values of every `.stats` tensor
    then per weight W, tensors in sorted name order:
    W.in_sum2   F32 (n_mat, n_in)   sum over collected tokens of x_j^2 for each input channel j
    W.counts    F32 (n_mat, 1)      tokens collected (per expert for merged expert tensors)
    W.in_sum    F32 (n_mat, n_in)   sum of x_j (lets llama-imatrix compare layers by mean activation)
    W.stats     F32 (12,)           summary statistics (see `gguf_imatrix_stats`)

n_mat is 1 for a plain 2-D weight (stored 1-D, as ggml drops trailing unit dimensions) and the
expert count for a merged 3-D expert tensor. Readers (llama-quantize) divide in_sum2 by counts
to get the mean square input of each column, 1 where an expert saw no token.

The legacy .dat holds per weight (n_in * n_mat) values `mean * ncall` with ncall its chunk count,
then the chunk count and the dataset name; swtool reads it but writes only GGUF.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from swtool.errors import SwtoolError

STATS_SCHEMA = ("sum_sq", "mean", "elements", "std_deviation", "skewness", "kurtosis", "gain", "h_norm", "l2_dist", "cossim", "pearson", "covariance")
"""The names llama-imatrix writes under imatrix.stats_schema, in the order of each `.stats` tensor."""

KEY_TYPE = "general.type"
KEY_DATASETS = gguf.Keys.IMatrix.DATASETS
KEY_CHUNK_COUNT = gguf.Keys.IMatrix.CHUNK_COUNT
KEY_CHUNK_SIZE = gguf.Keys.IMatrix.CHUNK_SIZE
KEY_STATS_SCHEMA = "imatrix.stats_schema"
SUFFIXES = (".in_sum2", ".counts", ".in_sum", ".stats")
"""Per-weight tensor suffixes, in the order llama-imatrix adds them."""


@dataclass
class Entry:
    """One weight's sums, as float32 arrays of llama.cpp's shapes (n_mat rows: 1, or one per expert)."""

    in_sum2: np.ndarray
    """(n_mat, n_in): sum of squares of each input channel over the collected tokens."""
    counts: np.ndarray
    """(n_mat,): tokens collected per matrix (legacy files: the chunk count, one value)."""
    in_sum: np.ndarray | None = None
    """(n_mat, n_in): plain sums, or None (legacy files have none)."""
    stats: np.ndarray | None = None
    """(12,) statistics in STATS_SCHEMA order, or None."""

    def means(self) -> np.ndarray:
        """(n_mat, n_in) mean square input per column, as llama-quantize derives it: 1 where no token was seen."""
        counts = np.broadcast_to(np.asarray(self.counts, np.float32).reshape(-1, 1), (self.in_sum2.shape[0], 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(counts > 0, self.in_sum2 / np.where(counts > 0, counts, 1), np.float32(1)).astype(np.float32)


@dataclass
class Imatrix:
    entries: dict[str, Entry]
    """GGUF weight name (blk.0.attn_q.weight) -> its sums."""
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    legacy: bool = False
    """Read from a legacy .dat: in_sum2 holds mean * chunk count and counts the chunk count."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Extra string keys written after llama.cpp's (swtool's provenance), and any read back."""


def _stored(array: np.ndarray) -> np.ndarray:
    """float32, C order, without leading unit axes: what ggml's writer records for a (n, 1...) tensor."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    while array.ndim > 1 and array.shape[0] == 1:
        array = array[0]
    return array


def write_imatrix(path: Path, imatrix: Imatrix) -> None:
    """Write `imatrix` as llama-imatrix does (same keys in the same order, same tensors, names, types and shapes)."""
    writer = gguf.GGUFWriter(path, "imatrix")
    writer.kv_data[0].clear()  # no general.architecture: an imatrix file has none
    writer.add_type("imatrix")
    writer.add_array(KEY_DATASETS, list(imatrix.datasets))
    writer.add_uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
    writer.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
    writer.add_array(KEY_STATS_SCHEMA, list(STATS_SCHEMA))
    for key, value in imatrix.metadata.items():
        writer.add_string(key, value)
    for name in sorted(imatrix.entries):
        entry = imatrix.entries[name]
        n_mat = entry.in_sum2.shape[0]
        writer.add_tensor(f"{name}.in_sum2", _stored(entry.in_sum2))
        writer.add_tensor(f"{name}.counts", _stored(np.asarray(entry.counts, np.float32).reshape(n_mat, 1)))
        if entry.in_sum is not None:
            writer.add_tensor(f"{name}.in_sum", _stored(entry.in_sum))
        stats = entry.stats if entry.stats is not None else np.zeros(len(STATS_SCHEMA), np.float32)
        writer.add_tensor(f"{name}.stats", _stored(stats))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def read_imatrix(path: Path) -> Imatrix:
    """An imatrix file of either format (GGUF by its magic, else legacy .dat), checked as llama.cpp's loader checks it."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise SwtoolError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, struct.error) as exc:
        raise SwtoolError(f"{path}: not a readable GGUF file ({exc})") from None
    values = {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    if values.get(KEY_TYPE) != "imatrix" and not any(t.name.endswith(".in_sum2") for t in reader.tensors):
        raise SwtoolError(f"{path}: a GGUF file but not an importance matrix (general.type is {values.get(KEY_TYPE)!r})")
    if KEY_CHUNK_COUNT not in values or KEY_CHUNK_SIZE not in values or KEY_DATASETS not in values:
        raise SwtoolError(f"{path}: imatrix metadata missing ({KEY_DATASETS}, {KEY_CHUNK_COUNT}, {KEY_CHUNK_SIZE})")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        for suffix in SUFFIXES:
            if tensor.name.endswith(suffix):
                if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise SwtoolError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, not F32")
                parts.setdefault(tensor.name[: -len(suffix)], {})[suffix] = np.array(tensor.data, dtype=np.float32)
                break
    entries = {}
    for name, found in parts.items():
        if ".in_sum2" not in found or ".counts" not in found:
            raise SwtoolError(f"{path}: {name} lacks its in_sum2 or counts tensor")
        counts = found[".counts"].reshape(-1)
        if found[".in_sum2"].size % counts.size:
            raise SwtoolError(f"{path}: {name}: {found['.in_sum2'].size} sums do not divide into {counts.size} matrices")
        in_sum2 = found[".in_sum2"].reshape(counts.size, -1)
        in_sum = found.get(".in_sum")
        if in_sum is not None and in_sum.size != in_sum2.size:
            raise SwtoolError(f"{path}: {name}: in_sum and in_sum2 differ in size")
        entries[name] = Entry(in_sum2, counts, None if in_sum is None else in_sum.reshape(in_sum2.shape), found.get(".stats"))
    if not entries:
        raise SwtoolError(f"{path}: no importance data in the file")
    extra = {k: v for k, v in values.items() if k not in (KEY_TYPE, KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE, KEY_STATS_SCHEMA) and isinstance(v, str)}
    return Imatrix(entries, list(values[KEY_DATASETS]), int(values[KEY_CHUNK_COUNT]), int(values[KEY_CHUNK_SIZE]), metadata=extra)


def _read_legacy(path: Path) -> Imatrix:
    """The .dat layout: i32 n_entries, then per entry i32 name length, name, i32 ncall, i32 nval, nval f32;
    then optionally i32 chunk count, i32 length and the dataset name (all little-endian)."""
    data = path.read_bytes()
    offset = 0

    def take(fmt: str) -> tuple:
        nonlocal offset
        size = struct.calcsize(fmt)
        if offset + size > len(data):
            raise SwtoolError(f"{path}: neither GGUF nor a complete legacy imatrix (.dat) file")
        out = struct.unpack_from(fmt, data, offset)
        offset += size
        return out

    (count,) = take("<i")
    if count < 1:
        raise SwtoolError(f"{path}: neither GGUF nor a legacy imatrix (.dat) file (no entries)")
    entries = {}
    for _ in range(count):
        (length,) = take("<i")
        if length < 1 or length > 4096:
            raise SwtoolError(f"{path}: neither GGUF nor a legacy imatrix (.dat) file (bad name length {length})")
        name = bytes(take(f"<{length}s")[0]).decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise SwtoolError(f"{path}: legacy imatrix entry {name} has no values")
        sums = np.array(take(f"<{nval}f"), dtype=np.float32).reshape(1, nval)
        entries[name] = Entry(sums, np.array([ncall], np.float32))
    chunk_count, datasets = 0, []
    if offset < len(data):
        (chunk_count,) = take("<i")
        if offset + 4 <= len(data):
            (length,) = take("<i")
            if length > 0:
                datasets.append(bytes(take(f"<{length}s")[0]).decode("utf-8", "replace"))
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)
