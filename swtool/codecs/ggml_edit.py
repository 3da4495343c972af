"""Set single values inside GGML-encoded tensor bytes, touching only the blocks that hold them.

`swtool edit` on a GGUF changes a handful of scalars (the super weights, or a
few outliers per tensor). Re-encoding a whole quantized tensor would
re-round every other weight of it; here only the blocks holding an edited
value are decoded (gguf-py), changed, and encoded again at the same type
(swtool's codecs, byte-identical to gguf-py's); every other block keeps its
bytes. The other values of an edited block are re-rounded on the block's new
scale: unavoidable, since the block's scale follows its contents.

One exception to gguf-py's encoding: in the affine types (Q4_1, Q5_1, value =
d * q + m) zero is on a block's grid only by accident, so a block that must
hold an exact 0 (a zeroed super weight or outlier) gets a grid through 0
instead: d rounded up to few enough significant bits that m = -k * d is an
fp16 value, so d * k + m is exactly 0 in llama.cpp's and gguf-py's float
arithmetic. Every value's error stays within d / 2, as in plain RTN (d is at
most 1/64 coarser). The symmetric types (Q4_0, Q5_0, Q8_0) and the float
types store 0 exactly as they are.

K-quants (Q2_K..Q6_K) are patched the same way, one 256-value super-block at a
time, decoded by swtool's C decoders and re-encoded at their own type with
llama.cpp's reference quantizer (swtool.codecs.kquants). Q3_K and Q6_K are
symmetric and store 0 exactly; Q2_K, Q4_K and Q5_K (value = d * q - m per
sub-block) hold 0 as near as the super-block's new grid allows.

Other types swtool has no encoder for (i-quants...) cannot be patched block by
block: `fallback_type` names the type the whole tensor is re-encoded at instead.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from swtool.codecs import kquants
from swtool.codecs.ggml import TYPES, QType, block_size, encode

AFFINE = {QType.Q4_1: 15, QType.Q5_1: 31}
"""Affine block types -> their top level (levels - 1)."""
FLOAT16_TINY = 2.0**-24
"""The smallest positive fp16 value (subnormal); fp16 values are multiples of it."""


def fallback_type(qtype: QType, row_length: int) -> QType | None:
    """The type a tensor stored as `qtype` must be re-encoded at to be edited, None when it can be patched in place.

    Q8_0 is at least as precise as every i-quant (which have no encoder here), F16 when
    the rows do not fill whole Q8_0 blocks. K-quants are patched in place.
    """
    if qtype.name in TYPES or qtype in kquants.TYPES:
        return None
    return QType.Q8_0 if row_length % block_size(QType.Q8_0) == 0 else QType.F16


def set_values(raw: np.ndarray, qtype: QType, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A copy of the tensor bytes `raw` (uint8, GGML `qtype`) where the elements at the flat `positions`
    (row-major over the stored tensor) read back as `values`, or as near as `qtype` allows
    (exactly, for 0, except in Q2_K/Q4_K/Q5_K). Only the blocks holding a position change."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.array(raw, dtype=np.uint8).reshape(-1, size)
    positions = np.asarray(positions, dtype=np.int64)
    touched, where = np.unique(positions // block, return_inverse=True)
    if qtype in kquants.TYPES:
        decoded = kquants.decode(out[touched], qtype, (len(touched), block))
    else:
        decoded = np.array(gguf.quants.dequantize(out[touched], qtype), dtype=np.float32).reshape(len(touched), block)
    decoded[where, positions % block] = values
    encoded = encode(decoded, qtype)
    if qtype in AFFINE:
        needs_zero = np.unique(where[np.asarray(values) == 0])
        if len(needs_zero):
            encoded[needs_zero] = encode_through_zero(decoded[needs_zero], qtype)
    out[touched] = encoded
    return out.reshape(-1)


def reencode(raw: np.ndarray, qtype: QType, shape: tuple[int, ...], positions: np.ndarray, values: np.ndarray, target: QType) -> np.ndarray:
    """The whole tensor (stored as `qtype`, `shape` in torch order) decoded, the values set, encoded as `target`."""
    decoded = np.array(gguf.quants.dequantize(np.asarray(raw, dtype=np.uint8).reshape(shape[0], -1), qtype), dtype=np.float32)
    flat = decoded.reshape(-1)
    flat[np.asarray(positions, dtype=np.int64)] = values
    return encode(flat.reshape(shape), target).reshape(-1)


def encode_through_zero(blocks: np.ndarray, qtype: QType) -> np.ndarray:
    """Q4_1/Q5_1 bytes of (n, 32) float32 `blocks` (each holding 0) on a grid d * q + m that passes exactly through 0."""
    top = AFFINE[qtype]
    bits = 11 - top.bit_length()  # significant bits of d such that k * d (k <= top) fits fp16's 11
    low = np.minimum(blocks.min(axis=1), 0.0).astype(np.float64)
    high = np.maximum(blocks.max(axis=1), 0.0).astype(np.float64)
    d = np.zeros_like(low)
    m = np.zeros_like(low)
    q = np.zeros(blocks.shape, dtype=np.int64)
    for i in np.flatnonzero(high > low):
        exact = (high[i] - low[i]) / top
        quantum = max(2.0 ** (math.floor(math.log2(exact)) - bits + 1), FLOAT16_TINY)
        d[i] = math.ceil(exact / quantum) * quantum
        k = min(max(round(-low[i] / d[i]), 0), top)
        m[i] = -k * d[i]
        q[i] = np.clip(np.floor((blocks[i].astype(np.float64) - m[i]) / d[i] + 0.5), 0, top)
    if not (np.float16(d).astype(np.float64) == d).all() or not (np.float16(m).astype(np.float64) == m).all():
        raise ValueError("block range beyond fp16: cannot encode a grid through zero")
    d16, m16 = d.astype(np.float16), m.astype(np.float16)
    nibbles = ((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)).astype(np.uint8)
    parts = [d16.view(np.uint8).reshape(-1, 2), m16.view(np.uint8).reshape(-1, 2)]
    if top == 31:  # Q5_1: bit 4 of every level, as a little-endian uint32
        high_bits = ((q >> 4) & 1) << np.arange(32, dtype=np.int64)
        parts.append(high_bits.sum(axis=1).astype("<u4").view(np.uint8).reshape(-1, 4))
    parts.append(nibbles)
    return np.concatenate(parts, axis=1)
