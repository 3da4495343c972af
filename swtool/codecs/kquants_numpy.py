"""The K-quant and weighted legacy encoders in numpy: kernels/kquants.c's bytes where no C compiler is.

Why a second implementation: swtool must write llama.cpp's bytes on a machine
without a compiler too. Each function here is the C search of the same name,
vectorised over groups (sub-blocks or super-blocks) instead of looping over
them; within a group every float32 operation is llama.cpp's, in its order:
sums are accumulated one element after another (`_seqsum`, not numpy's
pairwise sum), constants are float32, and integer narrowing wraps like C's.
Two sequential parts of ggml's searches are kept sequential: the early exits
(replaced by running every step for every group and masking the updates, which
changes nothing, since a step that changes nothing leaves the state as it was)
and the level-by-level sweeps (a Python loop over the 16 or 32 positions).

Tested against llama.cpp's bytes (tests/codecs/kquants_golden.npz) alongside the C engine.
Slower than C by one to two orders of magnitude; meant as a fallback.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QType

F = np.float32
TINY = F(1e-15)  # ggml's GROUP_MAX_EPS
MAGIC = F(12582912.0)  # 1.5 * 2^23


def _nearest(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round to nearest even via the float32 magic number, as int64."""
    bits = (np.asarray(v, dtype=F) + MAGIC).view(np.int32)
    return ((bits & 0x007FFFFF) - 0x00400000).astype(np.int64)


def _seqsum(a: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Sum over the last axis in order, in float32, from 0 (or from `start`, then every element)."""
    total = np.zeros(a.shape[:-1], dtype=F) if start is None else start.astype(F, copy=True)
    for i in range(a.shape[-1]):
        total += a[..., i]
    return total


def _half(v: np.ndarray) -> np.ndarray:
    """float32 -> IEEE fp16 (round to nearest even), as ggml's GGML_FP32_TO_FP16."""
    return np.asarray(v, dtype=F).astype(np.float16)


def _first_abs_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(largest |x|, the signed value first reaching it) per row, 0 for all-zero rows: ggml's strict `>` scan
    from 0, done as a scan (NaN, which overflowing sums of huge inputs make, is never taken, as in C)."""
    amax = np.zeros(x.shape[:-1], dtype=F)
    signed = np.zeros(x.shape[:-1], dtype=F)
    for i in range(x.shape[-1]):
        a = np.abs(x[..., i])
        bigger = a > amax
        amax = np.where(bigger, a, amax)
        signed = np.where(bigger, x[..., i], signed)
    return amax, signed


# ---------------------------------------------------------------- scale searches (groups along axis 0)


def fit_symmetric(x: np.ndarray, nmax: int, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants (rmse_type 1): levels in [0, 2*nmax) and the scale, weights qw or x^2."""
    amax, mx = _first_abs_max(x)
    zero = amax < TINY
    mx = np.where(zero, F(1), mx)
    w = x * x if qw is None else qw
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        l = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(F)
        return l, _seqsum(wx * lf), _seqsum(w * lf * lf)

    l, sumlx, suml2 = trial(F(-nmax) / mx)
    L = l + nmax
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F(1)), F(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = trial(-(F(nmax) + F(0.1) * F(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better[:, None], l + nmax, L)
        scale = np.where(better, sumlx / np.where(better, suml2, F(1)), scale)
        best = np.where(better, scale * sumlx, best)
    L[zero] = 0
    scale[zero] = 0
    return scale.astype(F), L


def fit_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants with do_rmse: levels in [0, 2*nmax) and the scale."""
    amax, mx = _first_abs_max(x)
    zero = amax < TINY
    mx = np.where(zero, F(1), mx)
    L = np.clip(_nearest((F(-nmax) / mx)[:, None] * x), -nmax, nmax - 1)
    w = x * x
    lf = L.astype(F)
    sumlx = _seqsum(w * x * lf)
    suml2 = _seqsum(w * lf * lf)
    _sweeps(x, w, L, sumlx, suml2, lambda v: np.clip(v, -nmax, nmax - 1), check_sl2=False)
    L += nmax
    L[zero] = 0
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F(1)), F(0))
    scale[zero] = 0
    return scale.astype(F), L


def _sweeps(x, w, L, sumlx, suml2, clip, check_sl2: bool, wrap=None) -> None:
    """Five passes moving one level at a time while the weighted fit sumlx^2/suml2 improves (in place).

    check_sl2: make_qp_quants's order of tests (slx > 0 and sl2 > 0 first), else make_q3_quants's
    (slx > 0 first, sl2 > 0 with the move). wrap: how a stored level reads back (uint8 for qp)."""
    for _ in range(5):
        for i in range(x.shape[1]):
            wi, xi = w[:, i], x[:, i]
            Li = L[:, i] if wrap is None else wrap(L[:, i])
            Lf = Li.astype(F)
            slx = sumlx - wi * xi * Lf
            sl2 = suml2 - wi * Lf * Lf
            cand = (slx > 0) & (sl2 > 0) if check_sl2 else slx > 0
            new = clip(_nearest(xi * sl2 / np.where(cand, slx, F(1))))
            cand &= new != Li
            nf = new.astype(F)
            slx2 = slx + wi * xi * nf
            sl22 = sl2 + wi * nf * nf
            take = cand & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if not check_sl2:
                take &= sl22 > 0
            L[:, i] = np.where(take, new, L[:, i])
            sumlx[...] = np.where(take, slx2, sumlx)
            suml2[...] = np.where(take, sl22, suml2)


def fit_affine(x: np.ndarray, nmax: int, w: np.ndarray, rmin: float, rdelta: float, nstep: int, use_mad: bool, v3: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants (v3 False) / make_qkx3_quants (v3 True): (scale, -min, levels in [0, nmax])."""
    G = x.shape[0]
    mn = x.min(axis=1)
    mx = x.max(axis=1)
    for extreme in (mn, mx):  # where it is a zero, ggml's scan keeps the first zero it meets, whose sign
        zero = extreme == 0  # reaches the stored min or the sign of an infinite trial scale
        if zero.any():
            first = np.argmax(x[zero] == 0, axis=1)
            extreme[zero] = x[zero][np.arange(len(first)), first]
    sum_w = _seqsum(w[:, 1:], w[:, 0])
    sum_x = _seqsum(w[:, 1:] * x[:, 1:], w[:, 0] * x[:, 0])
    mn = np.where(mn > 0, F(0), mn)
    empty = mx <= mn if v3 else mx == mn
    mn0 = mn.copy()
    span = np.where(empty, F(1), mx - mn)
    iscale = F(nmax) / span
    scale = F(1) / iscale
    L = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)

    def error(s: np.ndarray, m: np.ndarray, levels: np.ndarray) -> np.ndarray:
        diff = s[:, None] * levels.astype(F) + m[:, None] - x
        diff = np.abs(diff) if use_mad else diff * diff
        return _seqsum(w * diff)

    best = error(scale, mn, L)
    with np.errstate(all="ignore"):
        for step in range(nstep + 1):
            iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / np.where(empty, F(1), mx - mn)
            v = iscale[:, None] * (x - mn[:, None])
            if v3:
                l = np.where(v > 0, _nearest(np.where(v < nmax, v, F(nmax))), 0)
            else:
                l = np.clip(_nearest(v), 0, nmax)
            lf = l.astype(F)
            sum_l = _seqsum(w * lf)
            sum_l2 = _seqsum(w * lf * lf)
            sum_xl = _seqsum(w * lf * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            ok = D > 0
            Ds = np.where(ok, D, F(1))
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
            pos = this_min > 0
            this_min = np.where(pos, F(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            better = ok & (error(this_scale, this_min, l) < best) & ~empty
            L = np.where(better[:, None], l, L)
            best = np.where(better, error(this_scale, this_min, l), best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L[empty] = 0
    scale = np.where(empty, F(0), scale).astype(F)
    mn = np.where(empty, mn0, mn)
    assert L.shape[0] == G
    return scale, (-mn).astype(F), L


def fit_positive(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants: levels in [0, nmax] (stored as uint8, wrapping like ggml's) for non-negative x."""
    mx = np.zeros(x.shape[0], dtype=F)
    for i in range(x.shape[1]):  # ggml's `max = max > x ? max : x`, NaN included
        mx = np.where(mx > x[:, i], mx, x[:, i])
    zero = mx < TINY
    mx = np.where(zero, F(1), mx)
    iscale = F(nmax) / mx
    L = _nearest(iscale[:, None] * x).astype(np.uint8)
    scale = F(1) / iscale
    diff = x - scale[:, None] * L.astype(F)
    best = _seqsum(qw * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F(0.1) * F(step) + F(nmax)) / mx
        scale_is = F(1) / iscale_is
        l = np.minimum(nmax, _nearest(iscale_is[:, None] * x))
        diff = x - scale_is[:, None] * l.astype(F)
        mse = _seqsum(qw * diff * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, iscale_is, iscale)
    l = np.minimum(nmax, _nearest(iscale[:, None] * x))
    lf = l.astype(F)
    sumlx = _seqsum(qw * x * lf)
    suml2 = _seqsum(qw * lf * lf)
    L = l.astype(np.uint8).astype(np.int64)
    _sweeps(x, qw, L, sumlx, suml2, lambda v: np.minimum(nmax, v), check_sl2=True, wrap=lambda v: v.astype(np.uint8).astype(np.int64))
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F(1)), F(0)).astype(F)
    L = L.astype(np.uint8)
    L[zero] = 0
    scale[zero] = 0
    return scale, L


# ---------------------------------------------------------------- packing


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """(B, 256) levels -> (B, 64): byte l of each 32-byte half holds levels l, +32, +64, +96 of its 128."""
    q = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_scale_min(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """(B, 8) uint8 scales and mins -> Q4_K/Q5_K's (B, 12) bytes."""
    s = np.empty((ls.shape[0], 12), dtype=np.uint8)
    s[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    s[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return s


def _unpack_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _pack_q3_scales(v: np.ndarray) -> np.ndarray:
    """(B, 16) 6-bit values -> Q3_K's (B, 12) bytes: nibbles in 0-7, top bits of j in byte 8 + j%4 at 2*(j/4)."""
    v = v.astype(np.uint8)
    s = np.zeros((v.shape[0], 12), dtype=np.uint8)
    s[:, :8] = (v[:, :8] & 0xF) | ((v[:, 8:] & 0xF) << 4)
    top = (v >> 4).reshape(-1, 4, 4)  # [j/4, j%4]
    for jj in range(4):
        s[:, 8:] |= top[:, jj] << (2 * jj)
    return s


def _unpack_q3_scales(s: np.ndarray) -> np.ndarray:
    low = np.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=1)
    top = np.concatenate([(s[:, 8:] >> (2 * jj)) & 3 for jj in range(4)], axis=1)
    return (low | (top << 4)).astype(np.int64) - 32


def _requantize(xs: np.ndarray, d: np.ndarray, m: np.ndarray | None, L: np.ndarray, lo: int, hi: int, offset: int) -> np.ndarray:
    """Levels nearest((x + m) / d) (or x / d), clipped, plus offset, where the sub-block's d is not 0."""
    with np.errstate(all="ignore"):
        v = xs + m[..., None] if m is not None else xs
        new = np.clip(_nearest(v / np.where(d != 0, d, F(1))[..., None]), lo, hi) + offset
    return np.where((d != 0)[..., None], new, L.reshape(new.shape)).reshape(L.shape)


# ---------------------------------------------------------------- encoders: (B, 256) float32 super-blocks -> (B, size) bytes


def _q2_K(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    B = x.shape[0]
    xs = x.reshape(B, 16, 16)
    if qw is not None:
        sigma2 = _seqsum(x * x) / F(256)
        w = qw.reshape(B, 16, 16) * np.sqrt(sigma2[:, None, None] + xs * xs)
        sw = _seqsum(w)
        scales, mins, L = fit_affine(xs.reshape(-1, 16), 3, w.reshape(-1, 16), -0.9, 0.05, 36, False, True)
        dm, Ls = fit_positive(scales.reshape(B, 16), 15, sw)
        mm, Lm = fit_positive(mins.reshape(B, 16), 15, sw)
        d16, m16 = _half(dm), _half(mm)
        sc = Ls | (Lm << 4)
    else:
        scales, mins, L = fit_affine(xs.reshape(-1, 16), 3, np.abs(xs).reshape(-1, 16), -0.5, 0.1, 15, True, False)
        scales, mins = scales.reshape(B, 16), mins.reshape(B, 16)
        max_scale = np.where(scales.max(1) > 0, scales.max(1), F(0))
        max_min = np.where(mins.max(1) > 0, mins.max(1), F(0))
        with np.errstate(all="ignore"):
            ls = _nearest((F(15) / max_scale)[:, None] * scales)
            lm = _nearest((F(15) / max_min)[:, None] * mins)
        sc = np.where((max_scale > 0)[:, None], ls, 0)
        sc = np.where((max_min > 0)[:, None], sc | (lm << 4), sc).astype(np.uint8)
        d16 = _half(np.where(max_scale > 0, max_scale / F(15), F(0)))
        m16 = _half(np.where(max_min > 0, max_min / F(15), F(0)))
    d = d16.astype(F)[:, None] * (sc & 0xF).astype(F)
    m = m16.astype(F)[:, None] * (sc >> 4).astype(F)
    L = _requantize(xs, d, m, L.reshape(B, 256), 0, 3, 0)
    return np.concatenate([sc, _pack_2bit(L), d16.view(np.uint8).reshape(B, 2), m16.view(np.uint8).reshape(B, 2)], axis=1)


def _q3_K(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    B = x.shape[0]
    xs = x.reshape(B, 16, 16)
    if qw is not None:
        sigma2 = F(2) * _seqsum(x * x) / F(256)
        w = qw.reshape(B, 16, 16) * np.sqrt(sigma2[:, None, None] + xs * xs)
        sw = _seqsum(w)
        scales, L = fit_symmetric(xs.reshape(-1, 16), 4, w.reshape(-1, 16))
        d_block, Ls = fit_symmetric(scales.reshape(B, 16), 32, sw)
        packed = _pack_q3_scales(Ls)
        d16 = _half(d_block)
    else:
        scales, L = fit_q3(xs.reshape(-1, 16), 4)
        scales = scales.reshape(B, 16)
        _, max_scale = _first_abs_max(scales)
        nz = max_scale != 0
        with np.errstate(all="ignore"):
            iscale = F(-32) / np.where(nz, max_scale, F(1))
            l = _nearest(iscale[:, None] * scales).astype(np.int8).astype(np.int64)
        packed = np.where(nz[:, None], _pack_q3_scales(np.clip(l, -32, 31) + 32), 0).astype(np.uint8)
        d16 = _half(np.where(nz, F(1) / iscale, F(0)))
    d = d16.astype(F)[:, None] * _unpack_q3_scales(packed).astype(F)
    L = _requantize(xs, d, None, L.reshape(B, 256), -4, 3, 4)
    high = L > 3
    hmask = np.zeros((B, 32), dtype=np.uint8)
    for b in range(8):
        hmask |= high[:, 32 * b : 32 * b + 32].astype(np.uint8) << b
    return np.concatenate([hmask, _pack_2bit(np.where(high, L - 4, L)), packed, d16.view(np.uint8).reshape(B, 2)], axis=1)


def _affine_superblock(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's shared part: (B, 16) header bytes (d, dmin, 12 scale bytes) and (B, 256) levels."""
    B = x.shape[0]
    xs = x.reshape(B, 8, 32)
    if qw is not None:
        sigma2 = F(2) * _seqsum(x * x) / F(256)
        w = qw.reshape(B, 8, 32) * np.sqrt(sigma2[:, None, None] + xs * xs)
        sw = _seqsum(w)
        scales, mins, L = fit_affine(xs.reshape(-1, 32), nmax, w.reshape(-1, 32), -0.9, 0.05, 36, False, True)
        d_block, ls = fit_positive(scales.reshape(B, 8), 63, sw)
        m_block, lm = fit_positive(mins.reshape(B, 8), 63, sw)
        if nmax == 31:  # ggml clips to 63 for Q5_K only
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
        d16, m16 = _half(d_block), _half(m_block)
    else:
        av_x = np.sqrt(_seqsum(xs * xs) / F(32))
        w = av_x[..., None] + np.abs(xs)
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, L = fit_affine(xs.reshape(-1, 32), nmax, w.reshape(-1, 32), rmin, 0.1, nstep, False, False)
        scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
        max_scale = np.where(scales.max(1) > 0, scales.max(1), F(0))
        max_min = np.where(mins.max(1) > 0, mins.max(1), F(0))
        with np.errstate(all="ignore"):
            inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0))
            inv_min = np.where(max_min > 0, F(63) / max_min, F(0))
        ls = np.minimum(_nearest(inv_scale[:, None] * scales).astype(np.uint8), 63)
        lm = np.minimum(_nearest(inv_min[:, None] * mins).astype(np.uint8), 63)
        d16, m16 = _half(max_scale / F(63)), _half(max_min / F(63))
    packed = _pack_scale_min(ls.astype(np.uint8), lm.astype(np.uint8))
    sc, m = _unpack_scale_min(packed)
    d = d16.astype(F)[:, None] * sc.astype(F)
    dm = m16.astype(F)[:, None] * m.astype(F)
    L = _requantize(xs, d, dm, L.reshape(B, 256), 0, nmax, 0)
    head = np.concatenate([d16.view(np.uint8).reshape(B, 2), m16.view(np.uint8).reshape(B, 2), packed], axis=1)
    return head, L


def _q4_K(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    head, L = _affine_superblock(x, qw, 15)
    q = L.astype(np.uint8).reshape(-1, 4, 2, 32)
    return np.concatenate([head, (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


def _q5_K(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    head, L = _affine_superblock(x, qw, 31)
    q = L.astype(np.uint8).reshape(-1, 4, 2, 32)
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for p in range(4):
        qh |= ((q[:, p, 0] >> 4) & 1) << (2 * p)
        qh |= ((q[:, p, 1] >> 4) & 1) << (2 * p + 1)
    low = q & 0xF
    return np.concatenate([head, qh, (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


def _q6_K(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    B = x.shape[0]
    xs = x.reshape(B, 16, 16)
    scales, L = fit_symmetric(xs.reshape(-1, 16), 32, None if qw is None else qw.reshape(-1, 16))
    scales = scales.reshape(B, 16)
    max_abs, max_scale = _first_abs_max(scales)
    zero = max_abs < TINY
    with np.errstate(all="ignore"):
        iscale = F(-128) / np.where(zero, F(1), max_scale)
        d16 = _half(F(1) / iscale)
        sc = np.minimum(127, _nearest(iscale[:, None] * scales)).astype(np.int8)
    d = d16.astype(F)[:, None] * sc.astype(F)
    L = _requantize(xs, d, None, L.reshape(B, 256), -32, 31, 32).astype(np.uint8).reshape(B, 2, 4, 32)
    ql = np.stack([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4), (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(B, 128), qh.reshape(B, 64), sc.view(np.uint8), d16.view(np.uint8).reshape(B, 2)], axis=1)
    out[zero] = 0
    return out


def _legacy(x: np.ndarray, qw: np.ndarray, qtype: QType) -> np.ndarray:
    """Weighted Q4_0/Q4_1/Q5_0/Q5_1 of (R, n) rows: blocks of 32, sigma2 the row's mean square."""
    R, n = x.shape
    sigma2 = _seqsum(x * x) / F(n)
    xb = x.reshape(R, n // 32, 32)
    w = (qw.reshape(1, n // 32, 32) * np.sqrt(sigma2[:, None, None] + xb * xb)).reshape(-1, 32)
    xb = xb.reshape(-1, 32)
    parts: list[np.ndarray] = []
    if qtype in (QType.Q4_0, QType.Q5_0):
        nmax = 8 if qtype == QType.Q4_0 else 16
        d, L = fit_symmetric(xb, nmax, w)
        parts.append(_half(d).view(np.uint8).reshape(-1, 2))
    else:
        nmax = 15 if qtype == QType.Q4_1 else 31
        d, neg_min, L = fit_affine(xb, nmax, w, -0.9, 0.05, 36, False, True)
        parts += [_half(d).view(np.uint8).reshape(-1, 2), _half(-neg_min).view(np.uint8).reshape(-1, 2)]
    if nmax > 15:
        bits = ((L >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
        parts.append(np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4))
    parts.append(((L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)).astype(np.uint8))
    return np.concatenate(parts, axis=1).reshape(R, -1)


_K = {QType.Q2_K: _q2_K, QType.Q3_K: _q3_K, QType.Q4_K: _q4_K, QType.Q5_K: _q5_K, QType.Q6_K: _q6_K}


def encode_rows(x: np.ndarray, qtype: QType, weights: np.ndarray | None) -> np.ndarray:
    """(R, n) finite float32 rows -> (R, bytes per row) uint8, as llama.cpp's ggml_quantize_chunk."""
    x = np.ascontiguousarray(x, dtype=F)
    R, n = x.shape
    with np.errstate(all="ignore"):
        if qtype in _K:
            qw = None if weights is None else np.broadcast_to(weights.reshape(n // 256, 256), (R, n // 256, 256)).reshape(-1, 256)
            return _K[qtype](x.reshape(-1, 256), qw).reshape(R, -1)
        return _legacy(x, weights, qtype)
