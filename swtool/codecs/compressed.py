"""The tensor codecs of the compressed-tensors format: integer RTN with integer zero points, int32 packing, FP8.

compressed-tensors (the format vLLM and llm-compressor use) rebuilds a weight as
    w = (q - z) * s          computed in the scale's dtype
with signed integer codes q in [-2**(b-1), 2**(b-1) - 1], one scale s per
group of `group` consecutive elements of a row (or per row, "channel"), and,
for asymmetric schemes, an integer zero point z in the same range. So the
zero point is an integer, not swtool-rtn's float `zero` (which may sit
anywhere): this is its own round-to-nearest variant.

Per group (all arithmetic in fp32 once the scale is rounded to its storage dtype):
  symmetric:  s = max|w| / (2**(b-1) - 1),  z = 0         (the code -2**(b-1) is never used, as in swtool-rtn)
  asymmetric: lo = min(min w, 0), hi = max(max w, 0)        (the grid always holds 0: z must be a code)
              s = (hi - lo) / (2**b - 1),  z = clamp(round(-2**(b-1) - lo / s), code range)
  q = clamp(round(w / s + z), code range)                   (round half to even, like the package's quantize)
A group of zeros gets s = 1, so it decodes to exact zeros. Given the same s and
z, `compressed_tensors.quantization.lifecycle.forward.quantize` gives the same q
(tested): only the choice of s and z is ours.

Packing (`pack-quantized`, as in compressed-tensors 0.20.1's pack_to_int32):
codes are made unsigned (q + 2**(b-1)), each row is a little-endian bit stream
in which element i occupies bits [i*b, (i+1)*b) (3-bit codes straddle int32
words), zero-padded to whole int32 words: ceil(cols * b / 32) words per row.
Zero points of shape (out, groups) are packed the same way along the output
axis (their transpose is packed row by row, then transposed back). This is the
same bit stream swtool.codecs.pack writes for a row whose length is a multiple
of 32, so that packer (and its C kernel) does the work.

FP8 (`float-quantized`): E4M3 values q = clamp(w / s, -448, 448) rounded to
nearest even by torch's cast, one scale s = max|w| / 448 per output row;
w = q * s in the scale's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from swtool.codecs.pack import pack, unpack
from swtool.codecs.rtn import Clip, _clip_blocks, auto_threshold
from swtool.errors import SwtoolError
from swtool.workers import run_chunks

INT_BITS = (2, 3, 4, 8)
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
CHUNK = 1 << 20
"""Elements processed per step: bounds the fp32 temporaries whatever the tensor's size."""


@dataclass
class IntQuantized:
    """One weight in compressed-tensors integer form, before packing."""

    codes: torch.Tensor
    """uint8 (out, in): q + 2**(bits-1), each < 2**bits."""
    scale: torch.Tensor
    """(out, groups) in the storage dtype of scales."""
    zero: torch.Tensor | None
    """int8 (out, groups): the integer zero points (None: symmetric)."""
    bits: int
    threshold: float | None = None
    """The clipping threshold --clip auto chose, if it chose one."""


def code_range(bits: int) -> tuple[int, int]:
    """The signed codes a `bits`-bit compressed-tensors weight may hold."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _clip(flat: torch.Tensor, group: int, bits: int, sym: bool, clip: Clip, importance: torch.Tensor | None) -> tuple[torch.Tensor, float | None]:
    """The values that get rounded: --clip applied exactly as for swtool-rtn (on an fp32 copy).

    `auto` picks its threshold by swtool-rtn's error (same groups, same symmetric grid; the asymmetric
    grid differs from this codec's by at most half a step), a proxy for this codec's own error.
    """
    if clip.kind == "none":
        return flat, None
    flat = flat.float() if flat.dtype != torch.float32 else flat.clone()
    if clip.kind == "auto":
        threshold = auto_threshold(flat, group, bits, sym, importance)
        if threshold is not None:
            flat.clamp_(-threshold, threshold)
        return flat, threshold
    _clip_blocks(flat, group, clip)
    return flat, None


def _store(scale: torch.Tensor, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    """fp32 scales rounded to their storage dtype: 1 for all-zero groups (they decode to zeros), never 0 or Inf."""
    stored = scale.to(dtype)
    if not torch.isfinite(stored).all():
        if not torch.isfinite(x).all():
            raise SwtoolError("weights hold NaN or Inf, which round-to-nearest cannot quantize")
        raise SwtoolError(f"weights exceed the {str(dtype).removeprefix('torch.')} range of the scales")
    tiny = torch.tensor(torch.finfo(dtype).smallest_normal, dtype=dtype)
    return torch.where(scale == 0, torch.ones_like(stored), torch.where(stored == 0, tiny, stored))


def _scales(x: torch.Tensor, bits: int, sym: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (stored scale, fp32 integer zero point) of a (groups, n) fp32 tensor."""
    low, high = code_range(bits)
    if sym:
        stored = _store(x.abs().amax(dim=1) / high, dtype, x)
        return stored, torch.zeros(len(stored))
    lo = x.amin(dim=1).clamp(max=0)
    stored = _store((x.amax(dim=1).clamp(min=0) - lo) / (2**bits - 1), dtype, x)
    return stored, torch.round(low - lo / stored.float()).clamp_(low, high)


def quantize_int(
    weight: torch.Tensor, bits: int, group: int, sym: bool, scale_dtype: torch.dtype, clip: Clip = Clip(), importance: torch.Tensor | None = None
) -> IntQuantized:
    """Quantize a 2-D weight (out, in) with groups of `group` elements along each row (`group` divides `in`)."""
    if bits not in INT_BITS:
        raise SwtoolError(f"--bits {bits}: compressed-tensors integer widths here are {', '.join(map(str, INT_BITS))}")
    rows, cols = weight.shape
    if group <= 0 or cols % group:
        raise SwtoolError(f"a group of {group} does not divide the row length {cols}")
    flat, threshold = _clip(weight.detach().reshape(-1), group, bits, sym, clip, importance)
    groups = flat.numel() // group
    low, high = code_range(bits)
    codes = torch.empty(flat.numel(), dtype=torch.uint8)
    scale = torch.empty(groups, dtype=scale_dtype)
    zero = torch.empty(groups, dtype=torch.int8)
    step = max(1, CHUNK // group)

    def work(first: int) -> None:
        x = flat[first * group : (first + step) * group].view(-1, group).to(torch.float32, copy=True)  # never the caller's tensor
        stored, z = _scales(x, bits, sym, scale_dtype)
        q = x.div_(stored.float()[:, None]).add_(z[:, None]).round_().clamp_(low, high)
        codes[first * group : first * group + q.numel()] = q.sub_(low).to(torch.uint8).view(-1)
        scale[first : first + len(stored)] = stored
        zero[first : first + len(stored)] = z.to(torch.int8)

    run_chunks(work, range(0, groups, step))
    return IntQuantized(codes.view(rows, cols), scale.view(rows, -1), None if sym else zero.view(rows, -1), bits, threshold)


def _rescale(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """(q - z) * s for fp32 codes (rows, cols), rounded once to the scale's dtype.

    Scales are (rows, groups), (rows, 1) or (1,): the package's group, channel and tensor strategies.
    """
    rows, cols = q.shape
    s = scale.float().reshape(-1, scale.shape[-1]) if scale.dim() > 1 else scale.float().reshape(1, -1)
    groups = s.shape[-1]
    if cols % groups or s.shape[0] not in (1, rows):
        raise SwtoolError(f"scales of shape {list(scale.shape)} do not fit a weight of shape {[rows, cols]}")
    q = q.view(rows, groups, cols // groups)
    if zero is not None:
        q.sub_(zero.float().reshape(-1, groups)[:, :, None])
    return q.mul_(s[:, :, None]).view(rows, cols).to(scale.dtype)


def dequantize_int(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """(q - z) * s in the scale's dtype, for unsigned codes (out, in) and int8 zero points shaped like the scales.

    Computed in fp32 and rounded once: the same numbers as the package's arithmetic in the
    scale's dtype, since (q - z) and its product with s are exact in fp32.
    """
    return _rescale(codes.to(torch.float32).sub_(2 ** (bits - 1)), scale, zero)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (rows, cols) -> int32 (rows, ceil(cols * bits / 32)), each row a dense little-endian bit stream."""
    rows, cols = codes.shape
    padded = -(-cols // 32) * 32
    if padded != cols:
        codes = torch.nn.functional.pad(codes, (0, padded - cols))
    words = pack(codes.contiguous().view(-1), bits).view(torch.int32).view(rows, padded * bits // 32)
    return words[:, : math.ceil(cols * bits / 32)].contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of pack_int32: unsigned codes (rows, cols) as uint8."""
    rows, words = packed.shape
    if words != math.ceil(cols * bits / 32):
        raise SwtoolError(f"packed rows hold {words} int32 words; {cols} codes of {bits} bits need {math.ceil(cols * bits / 32)}")
    full = -(-cols // 32) * bits
    if full != words:
        packed = torch.nn.functional.pad(packed, (0, full - words))
    padded = full * 32 // bits
    return unpack(packed.contiguous().view(torch.uint8).view(-1), bits, rows * padded).view(rows, padded)[:, :cols]


def pack_zero(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 zero points (out, groups) -> int32 (ceil(out * bits / 32), groups), packed along the output axis."""
    unsigned = (zero.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
    return pack_int32(unsigned.t().contiguous(), bits).t().contiguous()


def unpack_zero(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """The inverse of pack_zero: int8 zero points (rows, groups)."""
    unsigned = unpack_int32(packed.t().contiguous(), bits, rows).t()
    return (unsigned.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8).contiguous()


def quantize_fp8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 weight (out, in), scales (out, 1) in `scale_dtype`): one scale per output channel, no data needed."""
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=FP8)
    scale = torch.empty(rows, 1, dtype=scale_dtype)
    step = max(1, CHUNK // max(cols, 1))

    def work(first: int) -> None:
        x = weight[first : first + step].to(torch.float32, copy=True)
        stored = _store(x.abs().amax(dim=1) / FP8_MAX, scale_dtype, x)
        out[first : first + len(x)] = x.div_(stored.float()[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        scale[first : first + len(x), 0] = stored

    run_chunks(work, range(0, rows, step))
    return out, scale


def dequantize_values(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """(q - z) * s in the scale's dtype for values stored as themselves: E4M3 (float-quantized) or signed int8
    codes (naive- and int-quantized); exact in fp32 before the one rounding, as for packed codes."""
    return _rescale(values.to(torch.float32), scale, zero)
