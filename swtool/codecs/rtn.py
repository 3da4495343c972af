"""Block round-to-nearest (RTN) quantization with super weights held out and optional outlier clipping.

A weight of shape (out, in) is flattened row-major and cut into blocks of
`block` consecutive elements (the paper's definition: its "128x128" block is
16384 consecutive elements); `channel` is one output row, `tensor` the whole
weight. A size that is not a multiple of the block gets a shorter last block
with its own scale, never a silent per-tensor fallback.

Per block, with L = 2**bits - 1 levels:
  asymmetric (default): scale = (max - min) / L, zero = min
  symmetric (absmax):   scale = max|w| / (2**(bits-1) - 1), zero = -2**(bits-1) * scale
and in both cases  code = clamp(floor((w - zero) / scale + 1/2), 0, L),  w' = code * scale + zero. Scale and zero are
rounded to fp16 (how they are stored) *before* the codes are computed, so the
stored numbers reproduce exactly the reconstruction that was optimised.

Order of operations for one tensor: (1) every held-out super weight is replaced
by the median of the rest of its block, so it cannot stretch the block's range;
(2) clipping, if asked; (3) RTN; the held weights' exact values travel in an fp16
side table and are written back by `dequantize`. Held weights are therefore
never clipped.

Everything is vectorised over blocks and processed in chunks of about a
million elements, so temporaries stay small however large the tensor is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from swtool import native
from swtool.codecs.errors import NonFiniteError
from swtool.codecs.pack import WIDTHS, pack, unpack
from swtool.errors import SwtoolError
from swtool.workers import run_chunks

CHUNK = 1 << 20
"""Elements processed per vectorised step (a whole number of blocks, at least one)."""
NATIVE_CHUNK = 1 << 21
"""Elements per call of the C kernel: one pass, so no cache-sized steps are needed, and each
hand-off to a worker thread costs a scheduler wake-up (on a busy machine, up to milliseconds):
a 1M-element tensor runs on the calling thread, a 10M-element one in 5 chunks."""

AUTO_STEPS = 12
AUTO_PATIENCE = 2
"""`--clip auto` tries thresholds max|w| * 2**(-k/2), k = 1..AUTO_STEPS (down to max/64), stopping
after AUTO_PATIENCE candidates in a row fail to beat the best so far."""


@dataclass(frozen=True)
class Clip:
    """An outlier clipping rule: none, z:K (per block), pct:P (per block) or auto (per tensor)."""

    kind: str = "none"
    value: float = 0.0

    def __str__(self) -> str:
        return self.kind if self.kind in ("none", "auto") else f"{self.kind}:{self.value:g}"


def parse_clip(text: str) -> Clip:
    kind, _, raw = text.strip().partition(":")
    if kind in ("none", "auto") and not raw:
        return Clip(kind)
    if kind in ("z", "pct") and raw:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if kind == "z" and value > 0 and math.isfinite(value):
            return Clip("z", value)
        if kind == "pct" and 0 < value < 1:
            return Clip("pct", value)
    raise SwtoolError(f"--clip {text!r}: expected none, auto, z:K (K > 0) or pct:P (0 < P < 1, a fraction)")


def parse_block(text: str) -> int | str:
    """'512' -> 512; 'channel' and 'tensor' stay names."""
    text = str(text).strip()
    if text in ("channel", "tensor"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise SwtoolError(f"--block {text!r}: expected a positive number of elements, 'channel' or 'tensor'") from None
    if value <= 0:
        raise SwtoolError(f"--block {value}: the block size must be a positive number of elements")
    return value


def check_bits(bits: int) -> int:
    if bits not in WIDTHS:
        raise SwtoolError(f"--bits {bits}: supported widths are {', '.join(map(str, WIDTHS))}")
    return bits


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    block: int | str = 512
    sym: bool = False
    clip: Clip = field(default_factory=Clip)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        parse_block(str(self.block))

    def block_length(self, shape: Sequence[int]) -> int:
        return block_length(self.block, shape)


def block_length(block: int | str, shape: Sequence[int]) -> int:
    """Elements per block for a tensor of `shape` (the last block may be shorter)."""
    numel = math.prod(shape)
    if block == "tensor":
        return max(numel, 1)
    if block == "channel":
        return max(shape[-1] if shape else 1, 1)
    return int(block)


@dataclass
class QuantizedTensor:
    """One tensor in quantized form: everything needed to rebuild it, nothing else."""

    codes: torch.Tensor
    """Packed codes (uint8), see swtool.codecs.pack."""
    scale: torch.Tensor
    """fp16, one per block."""
    zero: torch.Tensor
    """fp16, one per block."""
    shape: tuple[int, ...]
    bits: int
    block: int
    """Resolved block length in elements."""
    held: list[tuple[int, int, float]] = field(default_factory=list)
    """(row, col, fp16 value) of each held-out weight."""
    threshold: float | None = None
    """The clipping threshold --clip auto chose (None: no clipping helped, or another rule)."""


def _scale_zero(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp16 scale and zero point of a (blocks, n) tensor."""
    if sym:
        half = 2 ** (bits - 1)
        scale = (x.abs().amax(dim=1).float() / (half - 1)).half()
        zero = (scale.float() * -half).half()
    else:
        low, high = (v.float() for v in torch.aminmax(x, dim=1))
        scale = ((high - low) / (2**bits - 1)).half()
        zero = low.half()
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        if not torch.isfinite(x).all():
            raise NonFiniteError("holds NaN or Inf, which round-to-nearest cannot quantize")
        raise SwtoolError("weights exceed the fp16 range of scales and zero points")
    return scale, zero


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of a (blocks, n) tensor in any float dtype: floor((x - zero) / scale + 1/2), clamped to [0, L].

    Written as x * (1/scale) - (zero/scale - 1/2) so that one fp32 temporary
    takes three in-place passes and the uint8 cast truncates (rounds half up).
    """
    s = scale.float()[:, None]
    inverse = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    offset = zero.float()[:, None] * inverse - 0.5
    q = torch.mul(x, inverse)
    return q.sub_(offset).clamp_(0, 2**bits - 0.5).to(torch.uint8)


def _jobs(numel: int, n: int, chunk: int | None = None) -> list[tuple[int, int, int, int]]:
    """(first element, blocks, block width, first block index) of chunks of about `chunk` (CHUNK) elements."""
    full = numel // n
    step = max(1, (chunk or CHUNK) // n)
    jobs = [(b * n, min(step, full - b), n, b) for b in range(0, full, step)]
    if numel % n:
        jobs.append((full * n, 1, numel % n, full))
    return jobs


def _quantize_flat(flat: torch.Tensor, n: int, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpacked codes (uint8, flat), scales and zeros (fp16, per block) of a flat float tensor.

    Each chunk goes through the C kernel where it compiled (one read of the source
    per pass, no fp32 temporaries; swtool/kernels/core.c), else through torch.
    Both write the same bytes. Blocks whose min or max is a zero of either sign,
    and chunks the kernel refuses (NaN, infinity, fp16 overflow), take the torch
    path: it decides the stored sign of that zero and raises the right error.
    """
    blocks = -(-flat.numel() // n)
    codes = torch.empty(flat.numel(), dtype=torch.uint8)
    scales = torch.empty(blocks, dtype=torch.float16)
    zeros = torch.empty(blocks, dtype=torch.float16)
    lib = native.kernels()
    code = native.dtype_code(flat.dtype) if flat.is_contiguous() else None

    def reference(x: torch.Tensor, at: slice, block: int) -> None:
        scale, zero = _scale_zero(x, bits, sym)
        scales[block : block + x.shape[0]] = scale
        zeros[block : block + x.shape[0]] = zero
        codes[at].view(x.shape).copy_(_codes(x, scale, zero, bits))

    def work(job: tuple[int, int, int, int]) -> None:
        start, rows, width, block = job
        x = flat[start : start + rows * width].view(rows, width)
        if lib is None or code is None:
            reference(x, slice(start, start + rows * width), block)
            return
        flags = torch.zeros(rows, dtype=torch.uint8)
        status = lib.rtn_quantize(
            x.data_ptr(), code, rows, width, bits, int(sym), codes.data_ptr() + start,
            scales.data_ptr() + 2 * block, zeros.data_ptr() + 2 * block, flags.data_ptr(),
        )
        if status != 0:
            reference(x, slice(start, start + rows * width), block)
            return
        for row in flags.nonzero().view(-1).tolist():
            at = start + row * width
            reference(x[row : row + 1], slice(at, at + width), block + row)

    run_chunks(work, _jobs(flat.numel(), n, NATIVE_CHUNK if lib is not None and code is not None else CHUNK))
    return codes, scales, zeros


def _dequantize_flat(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.empty(codes.numel(), dtype=torch.float32)

    def work(job: tuple[int, int, int, int]) -> None:
        start, rows, width, block = job
        s = scale[block : block + rows].float()[:, None]
        z = zero[block : block + rows].float()[:, None]
        torch.addcmul(z, codes[start : start + rows * width].view(rows, width), s, out=out[start : start + rows * width].view(rows, width))

    run_chunks(work, _jobs(codes.numel(), n))
    return out


def _hold_out(flat: torch.Tensor, n: int, positions: Sequence[int]) -> None:
    """Replace each held position by the median of the other elements of its block (in place)."""
    by_block: dict[int, list[int]] = {}
    for p in positions:
        by_block.setdefault(p // n, []).append(p)
    for b, members in sorted(by_block.items()):
        start, stop = b * n, min((b + 1) * n, flat.numel())
        keep = torch.ones(stop - start, dtype=torch.bool)
        keep[[p - start for p in members]] = False
        rest = flat[start:stop][keep]
        flat[members] = rest.median() if rest.numel() else 0.0


def _clip_blocks(flat: torch.Tensor, n: int, clip: Clip) -> None:
    """z:K and pct:P: clamp each block at its own threshold on |w| (in place)."""

    def work(job: tuple[int, int, int, int]) -> None:
        start, rows, width, _ = job
        x = flat[start : start + rows * width].view(rows, width)
        magnitude = x.abs()
        if clip.kind == "z":
            threshold = magnitude.mean(dim=1) + clip.value * magnitude.std(dim=1, correction=0)
        else:
            k = min(max(math.ceil((1 - clip.value) * width), 1), width)
            threshold = magnitude.kthvalue(k, dim=1).values
        x.clamp_(-threshold[:, None], threshold[:, None])

    run_chunks(work, _jobs(flat.numel(), n))


def _block_errors(x: torch.Tensor, reference: torch.Tensor, bits: int, sym: bool, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-block reconstruction error of RTN applied to x against reference: squared, times each element's weight if any."""
    scale, zero = _scale_zero(x, bits, sym)
    rebuilt = _codes(x, scale, zero, bits).float().mul_(scale.float()[:, None]).add_(zero.float()[:, None])
    error = rebuilt.sub_(reference).pow_(2)
    return (error.mul_(weights) if weights is not None else error).sum(dim=1)


def _element_weights(importance: torch.Tensor | None, start: int, width: int, rows: torch.Tensor) -> torch.Tensor | None:
    """The importance of each element's input column, for the given blocks of a chunk starting at flat index start."""
    if importance is None:
        return None
    positions = start + rows[:, None] * width + torch.arange(width)
    return importance[positions % importance.numel()]


def auto_threshold(flat: torch.Tensor, n: int, bits: int, sym: bool, importance: torch.Tensor | None = None) -> float | None:
    """The clipping threshold on |w| that minimises the tensor's RTN error, or None if none helps.

    Data-free: the error is sum_ij (RTN(clip(W)) - W)_ij^2 * importance[j], `importance`
    holding one weight per input column (swtool.importance: the mean square of
    that column's input on the scan prompt, so the sum approximates the output error
    ||(W' - W) x||^2); without it every element counts alike. Candidates are
    max|w| * 2**(-k/2) (k = 1..AUTO_STEPS, stopping after AUTO_PATIENCE misses in a
    row), then the best is refined by a quarter octave either side. Only blocks whose
    max |w| exceeds a candidate change, so each candidate re-quantizes those alone,
    chunk by chunk on the worker threads; per-chunk sums are added in a fixed order,
    so the choice never depends on the number of workers.
    """
    jobs = _jobs(flat.numel(), n)
    blocks = -(-flat.numel() // n)
    peaks = torch.empty(blocks)
    base = torch.empty(blocks)

    def measure(job: tuple[int, int, int, int]) -> None:
        start, rows, width, block = job
        x = flat[start : start + rows * width].view(rows, width)
        peaks[block : block + rows] = x.abs().amax(dim=1).float()
        base[block : block + rows] = _block_errors(x, x.float(), bits, sym, _element_weights(importance, start, width, torch.arange(rows)))

    run_chunks(measure, jobs)
    top = float(peaks.max())

    def gain(threshold: float) -> float:
        changes = torch.zeros(len(jobs), dtype=torch.float64)

        def work(item: tuple[int, tuple[int, int, int, int]]) -> None:
            index, (start, rows, width, block) = item
            chosen_rows = torch.nonzero(peaks[block : block + rows] > threshold).view(-1)
            if chosen_rows.numel():
                chosen = flat[start : start + rows * width].view(rows, width).index_select(0, chosen_rows)
                errors = _block_errors(chosen.clamp(-threshold, threshold), chosen.float(), bits, sym, _element_weights(importance, start, width, chosen_rows))
                changes[index] = float(errors.double().sum() - base[block + chosen_rows].double().sum())

        run_chunks(work, list(enumerate(jobs)))
        return float(changes.sum())

    best, best_gain, misses = None, 0.0, 0
    for k in range(1, AUTO_STEPS + 1):
        threshold = top * 2 ** (-k / 2)
        g = gain(threshold)
        if g < best_gain:
            best, best_gain, misses = threshold, g, 0
        else:
            misses += 1
            if misses >= AUTO_PATIENCE:
                break
    if best is not None:
        for threshold in (best * 2**0.25, best * 2**-0.25):
            g = gain(threshold)
            if g < best_gain:
                best, best_gain = threshold, g
    return best


def quantize(weight: torch.Tensor, spec: QuantSpec, held: Sequence[tuple[int, int]] = (), importance: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize one weight (any float dtype, at least 1-D); `held` lists (row, col) to keep exactly.

    `importance` (one weight per input column, see swtool.importance) weights
    the error that `--clip auto` minimises; other rules ignore it. NaN or infinity raises
    NonFiniteError (the pass that finds each block's range finds them too)."""
    shape = tuple(weight.shape)
    n = spec.block_length(shape)
    columns = shape[-1] if len(shape) > 1 else 1
    flat = weight.detach().reshape(-1)
    if held or spec.clip.kind != "none":  # these edit the values: work on an fp32 copy, the caller's tensor stays untouched
        flat = flat.float() if flat.dtype != torch.float32 else flat.clone()
    if importance is not None and importance.numel() != columns:
        raise ValueError(f"importance has {importance.numel()} column weights for a weight of shape {list(shape)}")
    positions = [row * columns + col for row, col in held]
    kept = [(row, col, float(flat[p].half())) for (row, col), p in zip(held, positions)]
    # otherwise flat keeps the source dtype (bf16, fp16, fp32): min/max are exact in it and _codes upcasts chunk by chunk
    _hold_out(flat, n, positions)
    threshold = None
    if spec.clip.kind == "auto":
        threshold = auto_threshold(flat, n, spec.bits, spec.sym, importance)
        if threshold is not None:
            flat.clamp_(-threshold, threshold)
    elif spec.clip.kind != "none":
        _clip_blocks(flat, n, spec.clip)
    codes, scale, zero = _quantize_flat(flat, n, spec.bits, spec.sym)
    return QuantizedTensor(pack(codes, spec.bits), scale, zero, shape, spec.bits, n, kept, threshold)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """The fp32 reconstruction, held-out weights restored to their fp16 values."""
    count = math.prod(q.shape)
    if q.block <= 0 or q.scale.numel() != -(-count // q.block) or q.zero.numel() != q.scale.numel():
        raise SwtoolError(f"quantized tensor of shape {list(q.shape)}: {q.scale.numel()} scales do not match blocks of {q.block}")
    flat = _dequantize_flat(unpack(q.codes, q.bits, count), q.scale, q.zero, q.block)
    columns = q.shape[-1] if len(q.shape) > 1 else 1
    for row, col, value in q.held:
        flat[row * columns + col] = value
    return flat.view(q.shape)

