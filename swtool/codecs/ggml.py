"""GGML block codecs (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and float conversions (F32, F16, BF16).

Each codec reproduces gguf-py's `gguf.quants.quantize` byte for byte (the
same float32 operations in the same order: scale, reciprocal, multiply, add,
truncate), so a file swtool writes is the file gguf-py (and therefore
llama.cpp's own converter) would write. The difference is speed: gguf-py
works on groups of 16 rows with many numpy temporaries on one core; here
chunks of blocks go to worker threads, each encoded in one pass by a C kernel
(swtool/kernels/core.c, compiled on first use, see swtool.native) or,
where no compiler is available, by the torch expressions below (one torch
expression per step over every block of the chunk; same bytes, a few times
slower).

Layouts (GGML, little-endian), per block of 32 values:
- Q8_0: fp16 d | 32 x int8 q;                       x = d * q
- Q4_0: fp16 d | 16 bytes (q[i] | q[i+16] << 4);     x = d * (q - 8)
- Q4_1: fp16 d | fp16 m | 16 bytes;                  x = d * q + m
- Q5_0: fp16 d | uint32 high bits | 16 bytes;        x = d * (q - 16)
- Q5_1: fp16 d | fp16 m | uint32 high bits | 16 bytes; x = d * q + m
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from swtool import native
from swtool.codecs import kquants
from swtool.codecs.errors import NonFiniteError
from swtool.workers import active as pool_active
from swtool.workers import intra_op_threads, run_chunks

QType = GGMLQuantizationType

CHUNK_ELEMENTS = 1 << 18
"""Blocks are processed in chunks of about this many values: small enough that one
chunk's temporaries stay in a core's cache across the codec's dozen passes, large
enough that torch's per-operation overhead is noise."""
NATIVE_CHUNK_ELEMENTS = 1 << 21
"""Values per call of a C kernel, which reads each block once: larger, since each hand-off to a
worker thread costs a scheduler wake-up (see swtool.codecs.rtn.NATIVE_CHUNK)."""


SHIFTS = torch.arange(32, dtype=torch.int32)


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(n, 1) float32 -> (n, 2) uint8, rounded to nearest even like numpy's astype(float16)."""
    return values.to(torch.float16).view(torch.uint8)


def _reciprocal(d: torch.Tensor) -> torch.Tensor:
    """1/d, with 0 where d is 0 (an all-zero block quantizes to the zero point)."""
    return (1.0 / d).masked_fill_(d == 0, 0.0)


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block, sign kept; on a +m/-m tie the first one, as numpy's argmax.

    Two fast reductions decide every block except exact ties (all-zero blocks
    included, where the sign of a zero matters), which take numpy's argmax path.
    """
    high = blocks.amax(dim=1, keepdim=True)
    low = blocks.amin(dim=1, keepdim=True)
    result = torch.where(high >= -low, high, low)
    ties = (high == -low).view(-1).nonzero().view(-1)
    if len(ties):
        tied = blocks[ties]
        result[ties] = tied.gather(1, tied.abs().argmax(dim=1, keepdim=True))
    return result


def _extremes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's max and min. Where one of them is zero, its sign (which reaches the stored
    bytes) is whatever numpy's SIMD reduction picks between 0.0 and -0.0, so those rare blocks
    are reduced by numpy itself."""
    high = blocks.amax(dim=1, keepdim=True)
    low = blocks.amin(dim=1, keepdim=True)
    zero = ((high == 0) | (low == 0)).view(-1).nonzero().view(-1)
    if len(zero):
        rows = blocks[zero].numpy()
        high[zero] = torch.from_numpy(rows.max(axis=-1, keepdims=True))
        low[zero] = torch.from_numpy(rows.min(axis=-1, keepdims=True))
    return high, low


def _levels(shifted: torch.Tensor, top: int) -> torch.Tensor:
    """gguf-py's `trunc(v).astype(uint8).clip(0, top)` for v > 0 (every codec adds at least 0.5 first), as int32."""
    return shifted.to(torch.int32).clamp_(0, top)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) int32 levels -> (n, 16) bytes `(q[:16] & 0x0F) | (q[16:] << 4)`; the uint8 cast drops bit 4 of the second half."""
    return ((q[:, :16] & 0x0F) | (q[:, 16:] << 4)).to(torch.uint8)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) 5-bit int32 levels -> (n, 4) bytes holding bit 4 of each, least significant bit first
    (numpy's packbits(bitorder="little")): a little-endian uint32."""
    word = ((q >> 4) << SHIFTS).sum(dim=1, keepdim=True, dtype=torch.int64)
    return word.to(torch.int32).view(torch.uint8)


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    scaled = blocks * _reciprocal(d)
    # round half away from zero exactly as gguf-py's np_roundf: floor(a) + floor(2 * frac(a)), sign of the input
    magnitude = scaled.abs()
    whole = magnitude.floor()
    q = magnitude.sub_(whole).mul_(2).floor_().add_(whole).copysign_(scaled)
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:] = q.to(torch.int8).view(torch.uint8)
    return d


def _symmetric_levels(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0: d = signed absmax / -(levels/2); q = trunc(x/d + levels/2 + 0.5) in [0, levels-1]."""
    half = levels // 2
    d = _signed_absmax(blocks) / -half
    return d, _levels((blocks * _reciprocal(d)).add_(half + 0.5), levels - 1)


def _affine_levels(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1: d = (max - min) / (levels-1); q = trunc((x - min)/d + 0.5) in [0, levels-1]."""
    high, low = _extremes(blocks)
    d = (high - low) / (levels - 1)
    return d, low, _levels((blocks - low).mul_(_reciprocal(d)).add_(0.5), levels - 1)


def _put_codes(q: torch.Tensor, out: torch.Tensor, start: int, levels: int) -> None:
    """The levels after a block's header: Q5's word of bit 4 first, then the nibbles (kernels/core.c's put_codes)."""
    if levels == 32:
        out[:, start : start + 4] = _high_bits(q)
        start += 4
    out[:, start:] = _nibbles(q)


def _symmetric(levels: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The Q4_0 (16 levels) or Q5_0 (32) codec: header fp16 d."""

    def codec(blocks: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        d, q = _symmetric_levels(blocks, levels)
        out[:, :2] = _fp16_bytes(d)
        _put_codes(q, out, 2, levels)
        return d

    return codec


def _affine(levels: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The Q4_1 (16 levels) or Q5_1 (32) codec: header fp16 d, fp16 min."""

    def codec(blocks: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        d, low, q = _affine_levels(blocks, levels)
        out[:, :2] = _fp16_bytes(d)
        out[:, 2:4] = _fp16_bytes(low)
        _put_codes(q, out, 4, levels)
        return d

    return codec


def _bf16(values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 as ggml_compute_fp32_to_bf16: NaN forced quiet (sign and top bits kept), else round to nearest even.

    Done on the signed int32 view: after the NaN rewrite no addition can overflow,
    and the arithmetic shift leaves the wanted 16 bits at the bottom.
    """
    n = values.view(torch.int32)
    n = torch.where((n & 0x7FFFFFFF) > 0x7F800000, (n & -65536) | (64 << 16), n)
    out.copy_(((n + (0x7FFF + ((n >> 16) & 1))) >> 16).to(torch.int16).view(torch.uint8))
    return values


def _f16(values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """numpy's own float32 -> float16 cast (what gguf-py calls; faster than torch's, and it releases the GIL)."""
    with np.errstate(over="ignore"):  # beyond fp16 range becomes inf, as in gguf-py
        out.copy_(torch.from_numpy(values.numpy().astype(np.float16)).view(torch.uint8))
    return values


CODECS: dict[QType, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    QType.Q8_0: _q8_0,
    QType.Q4_0: _symmetric(16),
    QType.Q4_1: _affine(16),
    QType.Q5_0: _symmetric(32),
    QType.Q5_1: _affine(32),
    QType.BF16: _bf16,
    QType.F16: _f16,
}
"""Each codec reads (n, block) float32 values, writes their (n, type size) bytes into `out` and
returns a tensor that is finite exactly when the values are: the block scales (a NaN or an
infinity reaches the max/min reductions), or the values themselves for the float types."""

TYPES: dict[str, QType] = {t.name: t for t in (QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1)}
"""Every tensor type swtool writes, by the name llama.cpp uses for it."""


def block_size(qtype: QType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def can_encode(shape: tuple[int, ...], qtype: QType) -> bool:
    """Whether rows of this shape fill whole blocks of `qtype` (the last axis is the row)."""
    return len(shape) > 0 and shape[-1] % block_size(qtype) == 0


def encoded_nbytes(shape: tuple[int, ...], qtype: QType) -> int:
    """Bytes of a tensor of `shape` stored as `qtype`."""
    block, size = GGML_QUANT_SIZES[qtype]
    count = int(np.prod(shape, dtype=np.int64))
    return count // block * size


NATIVE: dict[QType, str] = {
    QType.Q8_0: "ggml_q8_0",
    QType.Q4_0: "ggml_q4_0",
    QType.Q4_1: "ggml_q4_1",
    QType.Q5_0: "ggml_q5_0",
    QType.Q5_1: "ggml_q5_1",
    QType.BF16: "ggml_bf16",
    QType.F16: "ggml_f16",
}
"""The C kernel (swtool/kernels/core.c) of each codec; Q4_1/Q5_1 also flag blocks for CODECS to redo."""


def encode(data: torch.Tensor | np.ndarray, qtype: QType, threads: int | None = None, weights: np.ndarray | None = None) -> np.ndarray:
    """`data` (any float dtype, last axis = rows) as a contiguous uint8 array of GGML `qtype` bytes.

    Non-finite values raise NonFiniteError (gguf-py would write garbage blocks).
    Otherwise the bytes equal `gguf.quants.quantize(data.astype(float32), qtype).tobytes()`;
    the shape is (*data.shape[:-1], bytes per row). Chunks of blocks are encoded
    on `threads` worker threads (default: the open parallel_chunks() pool, else
    torch's intra-op thread count), by the C kernels where they compiled (reading fp16/bf16 sources without an fp32 copy),
    else by the torch codecs.

    K-quants, and Q4_0/Q4_1/Q5_0/Q5_1 given `weights` (an importance matrix row: one
    float32 per column), are swtool.codecs.kquants' (llama-quantize's bytes); other
    types ignore `weights`, as llama.cpp does.
    """
    if qtype in kquants.TYPES or (weights is not None and qtype in kquants.WEIGHTED):
        return kquants.encode(data, qtype, weights, threads)
    values = torch.as_tensor(data)
    lib = native.kernels()
    if lib is None or qtype == QType.F32 or native.dtype_code(values.dtype) is None:
        values = values.to(torch.float32)
    shape = tuple(values.shape)
    if not can_encode(shape, qtype):
        raise ValueError(f"row length {shape[-1] if shape else 0} is not a multiple of the {qtype.name} block size {block_size(qtype)}")
    out = np.empty((*shape[:-1], encoded_nbytes((shape[-1],), qtype)), dtype=np.uint8)
    if qtype == QType.F32:
        if not bool(torch.isfinite(values).all()):
            raise NonFiniteError("holds NaN or infinite values")
        out.reshape(-1)[:] = values.contiguous().reshape(-1).view(torch.uint8).numpy()
        return out
    block = block_size(qtype)
    step = max(1, (CHUNK_ELEMENTS if lib is None else NATIVE_CHUNK_ELEMENTS) // block)
    count = values.numel() // block
    flat_out = torch.from_numpy(out.reshape(count, -1))
    codec = CODECS[qtype]
    if lib is not None:
        values = values.contiguous()
        run = _native_chunks(lib, qtype, values, flat_out, step)
    else:
        flat_in = values.reshape(-1, block)

        def run(start: int) -> None:
            witness = codec(flat_in[start : start + step].contiguous(), flat_out[start : start + step])
            if not bool(torch.isfinite(witness).all()):
                raise NonFiniteError("holds NaN or infinite values")

    starts = range(0, count, step)
    if threads is None and pool_active():  # the command's pool (swtool quantize): no threads made per tensor
        run_chunks(run, starts)
        return out
    workers = min(threads or torch.get_num_threads(), len(starts))
    with intra_op_threads(1):  # our threads split the work; torch's would wait for each other at every kernel
        if workers <= 1:
            for start in starts:
                run(start)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, starts))
    return out


def _native_chunks(lib, qtype: QType, values: torch.Tensor, flat_out: torch.Tensor, step: int) -> Callable[[int], None]:
    """The chunk function calling `qtype`'s C kernel on blocks [start, start + step) of contiguous `values`."""
    function = getattr(lib, NATIVE[qtype])
    block, size = GGML_QUANT_SIZES[qtype]
    code = native.dtype_code(values.dtype)
    count = flat_out.shape[0]
    source, target, itemsize = values.data_ptr(), flat_out.data_ptr(), values.element_size()
    blocks_in = values.view(-1, block)
    affine = qtype in (QType.Q4_1, QType.Q5_1)

    def run(start: int) -> None:
        rows = min(step, count - start)
        args = [source + start * block * itemsize, code, rows, target + start * size]
        if affine:
            flags, flagged = np.empty(rows, dtype=np.uint8), ctypes.c_int64(0)
            args += [flags.ctypes.data, ctypes.addressof(flagged)]
        if function(*args) != 0:
            raise NonFiniteError("holds NaN or infinite values")
        if affine and flagged.value:  # a zero max or min: its sign comes from numpy's reduction
            redo = torch.from_numpy(np.flatnonzero(flags) + start)
            fixed = torch.empty(len(redo), size, dtype=torch.uint8)
            CODECS[qtype](blocks_in[redo].to(torch.float32), fixed)
            flat_out[redo] = fixed

    return run
