"""GGML K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and the importance-weighted legacy encoders, byte-exact with llama.cpp.

`encode` writes what llama-quantize writes for a tensor: without an importance
matrix (weights=None) ggml's reference encoders, with one (a float32 weight per
column, the imatrix entry of the tensor) ggml's weighted searches, for the K
types and for Q4_0/Q4_1/Q5_0/Q5_1 (whose unweighted bytes are swtool.codecs.ggml's;
Q8_0 and the float types ignore an imatrix in llama.cpp, as in ggml.encode).
`decode` reads K-quant bytes back (any row range), equal to gguf-py's dequantize.

Engines: the C kernels (swtool/kernels/kquants.c, compiled by swtool.native),
or, without a compiler or with SWTOOL_NATIVE=0, swtool.codecs.kquants_numpy
(same bytes, much slower) and gguf-py's decoders. Rows are split into chunks
handed to swtool.workers.run_chunks: each row is encoded independently, so the
bytes never depend on the number of workers.

Proven against llama.cpp's own bytes by tests/codecs/test_kquants.py
(golden fixtures made with tests/codecs/kquants_golden.py).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QType
from gguf.quants import dequantize as gguf_dequantize

from swtool import native
from swtool.codecs import kquants_numpy
from swtool.codecs.errors import NonFiniteError
from swtool.workers import active as pool_active, run_chunks

TYPES = frozenset({QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K})
"""The K-quant types this module encodes and decodes."""
WEIGHTED = TYPES | {QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1}
"""Every type whose bytes depend on an importance matrix in llama.cpp."""
DECODED = WEIGHTED | {QType.Q8_0}
"""The types `decode` decodes in C (K types and the legacy ones)."""

CHUNK_ELEMENTS = 1 << 18
"""Values per chunk handed to a worker: the searches cost far more than the hand-off."""


def row_bytes(n: int, qtype: QType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return n // block * size


def _spread(work: Callable[[int], None], starts: range, threads: int | None) -> None:
    """Chunks on the command's pool when one is open, else on `threads` threads of this call's own
    (default: torch's count; a private pool, so concurrent callers never share or close each other's)."""
    if threads is None and pool_active():
        run_chunks(work, starts)
        return
    workers = min(threads or torch.get_num_threads(), len(starts))
    if workers <= 1:
        for start in starts:
            work(start)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="swtool-kquants") as pool:
        list(pool.map(work, starts))


def _weights(weights: np.ndarray | torch.Tensor | None, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.ascontiguousarray(torch.as_tensor(weights).to(torch.float32).numpy().reshape(-1))
    if w.shape != (n,):
        raise ValueError(f"importance weights have {w.size} values, rows have {n}")
    if not np.isfinite(w).all():
        raise NonFiniteError("importance weights hold NaN or infinite values")
    return w


def encode(values: np.ndarray | torch.Tensor, qtype: QType, weights: np.ndarray | torch.Tensor | None = None, threads: int | None = None) -> np.ndarray:
    """`values` (any float dtype, last axis = rows) as uint8 GGML `qtype` bytes, shape (*values.shape[:-1], bytes per row).

    `weights`: importance of each column (length of a row), or None for llama.cpp's
    unweighted path. K types take either; legacy Q4_0/Q4_1/Q5_0/Q5_1 only come here
    with weights (swtool.codecs.ggml.encode dispatches). NaN or infinity in the
    values or weights raises NonFiniteError.
    """
    if qtype not in TYPES and not (qtype in WEIGHTED and weights is not None):
        raise ValueError(f"{qtype.name} without importance weights is swtool.codecs.ggml's" if qtype in WEIGHTED else f"{qtype.name} is not a K-quant or weighted type")
    tensor = torch.as_tensor(values).detach()
    shape = tuple(tensor.shape)
    n = shape[-1] if shape else 0
    block = GGML_QUANT_SIZES[qtype][0]
    if n == 0 or n % block:
        raise ValueError(f"row length {n} is not a multiple of the {qtype.name} block size {block}")
    rows = tensor.reshape(-1, n)
    count = rows.shape[0]
    w = _weights(weights, n)
    out = np.empty((count, row_bytes(n, qtype)), dtype=np.uint8)
    lib = native.kernels()
    step = max(1, CHUNK_ELEMENTS // n)

    def work(start: int) -> None:
        chunk = np.ascontiguousarray(rows[start : start + step].to(torch.float32).numpy())
        target = out[start : start + len(chunk)]
        if lib is not None:
            status = lib.kq_encode(int(qtype), chunk.ctypes.data, len(chunk), n, None if w is None else w.ctypes.data, target.ctypes.data)
            if status == 1:
                raise NonFiniteError("holds NaN or infinite values")
            if status != 0:
                raise ValueError(f"the kernels cannot encode {qtype.name} rows of {n}")
        else:
            if not np.isfinite(chunk).all():
                raise NonFiniteError("holds NaN or infinite values")
            target[:] = kquants_numpy.encode_rows(chunk, qtype, w)

    _spread(work, range(0, count, step), threads)
    return out.reshape(*shape[:-1], out.shape[1])


def decode(raw: np.ndarray | bytes | memoryview, qtype: QType, shape: tuple[int, ...], rows: slice | None = None, threads: int | None = None) -> np.ndarray:
    """float32 values of GGML `qtype` bytes `raw` holding a tensor of `shape` (last axis = rows).

    rows=None: the whole tensor, shaped `shape`. Otherwise a slice (step 1) over the
    rows (all leading axes flattened): only those rows' bytes are decoded, returned
    as (selected rows, row length). K and legacy types (`DECODED`) use the C kernels where
    compiled; every other type (and the fallback) is gguf-py's dequantize. Values equal gguf-py's.
    """
    shape = tuple(int(s) for s in shape)
    n = shape[-1]
    total = int(np.prod(shape[:-1], dtype=np.int64))
    width = row_bytes(n, qtype)
    data = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else np.asarray(raw).view(np.uint8).reshape(-1)
    if data.size != total * width:
        raise ValueError(f"{data.size} bytes do not hold a {qtype.name} tensor of shape {shape} ({total * width} bytes)")
    start, stop, stride = (rows or slice(None)).indices(total)
    if stride != 1:
        raise ValueError("decode reads a contiguous range of rows (slice step 1)")
    count = max(0, stop - start)
    source = data.reshape(total, width)[start : start + count]
    out = np.empty((count, n), dtype=np.float32)
    lib = native.kernels() if qtype in DECODED else None
    step = max(1, CHUNK_ELEMENTS // n)

    def work(first: int) -> None:
        chunk = np.ascontiguousarray(source[first : first + step])
        target = out[first : first + len(chunk)]
        if lib is not None:
            lib.kq_decode(int(qtype), chunk.ctypes.data, chunk.size // GGML_QUANT_SIZES[qtype][1], target.ctypes.data)
        else:
            target[:] = gguf_dequantize(chunk, qtype).reshape(len(chunk), n)

    if count:
        _spread(work, range(0, count, step), threads)
    return out.reshape(shape) if rows is None else out
