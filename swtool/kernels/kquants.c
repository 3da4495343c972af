/* GGML K-quant codecs (Q2_K..Q6_K) and the importance-weighted legacy encoders (Q4_0, Q4_1, Q5_0, Q5_1).
 *
 * Why: llama-quantize's K-quants search each sub-block's scale (and min) iteratively;
 * numpy needs a Python loop per search step for that. Here the searches run on 8 sub-blocks
 * at once, one per SIMD lane (each lane doing its sub-block's scalar operations), which makes
 * a core 3-7x faster than llama.cpp's scalar loops with the same bytes
 * (scripts/bench/kquants_speed.py).
 *
 * Exactness: the bytes equal what llama.cpp's ggml_quantize_chunk writes (ggml/src/ggml-quants.c,
 * read as the specification): without an importance matrix each K type takes ggml's reference
 * encoder (quantize_row_qN_K_ref), with one the weighted search (quantize_row_qN_K_impl); the
 * legacy types take this file only with weights (without, core.c's kernels are the reference).
 * Every float operation is ggml's, in ggml's order, in float32: the library is compiled with
 * -ffp-contract=off and without fast-math, and ggml-base is built without FMA, so both sides round
 * identically. Rounding to an integer is ggml's magic-number trick (nearest()), not rint(); fp16 is
 * the IEEE round-to-nearest-even cast, which ggml's software conversion equals for finite values.
 * Integer narrowing (int -> uint8/int8) mirrors ggml's variable types, since a few out-of-range
 * intermediate values wrap there and reach the bytes.
 *
 * Entry points work on whole rows of float32 (the legacy weighted encoders need the row's mean
 * square), return 0, or 1 when a row holds NaN or infinity, or 2 for a type this file lacks.
 *
 * Block layouts (little-endian; QK = 256 values per super-block, fp16 = IEEE half):
 *   Q2_K  84 B: scales[16] (low nibble scale, high nibble min) | qs[64] (2-bit) | fp16 d | fp16 dmin
 *   Q3_K 110 B: hmask[32] (bit 2 of each level) | qs[64] (low 2 bits) | scales[12] (16 x 6-bit) | fp16 d
 *   Q4_K 144 B: fp16 d | fp16 dmin | scales[12] (8 scales + 8 mins, 6-bit) | qs[128] (4-bit)
 *   Q5_K 176 B: fp16 d | fp16 dmin | scales[12] | qh[32] (bit 4) | qs[128] (low 4 bits)
 *   Q6_K 210 B: ql[128] (low 4 bits) | qh[64] (high 2 bits) | int8 scales[16] | fp16 d
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml_blocks.h"

#pragma GCC diagnostic ignored "-Wpsabi" /* vectors passed between static functions only: no ABI to keep */

enum { KQ_Q4_0 = 2, KQ_Q4_1 = 3, KQ_Q5_0 = 6, KQ_Q5_1 = 7, KQ_Q8_0 = 8, KQ_Q2_K = 10, KQ_Q3_K = 11, KQ_Q4_K = 12, KQ_Q5_K = 13, KQ_Q6_K = 14 };

#define QK 256
#define TINY 1e-15f /* ggml's GROUP_MAX_EPS: a group whose largest magnitude is below this is all zero */

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }
static inline int mini(int a, int b) { return a < b ? a : b; }

// ---------------------------------------------------------------- rounding and fp16

/* Round to nearest (ties to even) by adding 1.5 * 2^23 and reading the low mantissa bits:
 * ggml's nearest_int, valid for |f| <= 2^22 (outside, the same garbage as ggml's). */
static inline int nearest(float f) {
    float v = f + 12582912.f;
    int32_t i;
    memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline void put_f16(uint8_t *p, float f) {
    _Float16 h = (_Float16)f;
    memcpy(p, &h, 2);
}

static inline float get_f16(const uint8_t *p) {
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

// ---------------------------------------------------------------- scale searches

/* The two searches that dominate the encoders run on LANES groups at once: lane g of vector x[i]
 * holds element i of group g, and every lane performs exactly the scalar float32 operations of its
 * group, in the same order (branches become per-lane selects; steps a scalar group would skip are
 * computed and discarded). GCC/Clang vector extensions: AVX2 where compiled with it, else SSE pairs. */
#define LANES 8
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

static inline vf splat(float f) { return (vf){0} + f; }
static inline vi splati(int v) { return (vi){0} + v; }
static inline vf tof(vi v) { return __builtin_convertvector(v, vf); }
static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vi isel(vi m, vi a, vi b) { return (a & m) | (b & ~m); }
static inline vf vabs(vf x) { return (vf)((vi)x & 0x7fffffff); }
static inline vi vnearest(vf f) { return ((vi)(f + 12582912.f) & 0x007fffff) - 0x00400000; }
static inline vi iclamp(vi v, int lo, int hi) {
    v = isel(v < lo, splati(lo), v);
    return isel(v > hi, splati(hi), v);
}

/* Per lane, the value of largest magnitude (the first one, its sign kept) and that magnitude. */
static vf signed_max_lanes(int n, const vf *restrict x, vf *restrict amax_out) {
    vf max = splat(0), amax = splat(0);
    for (int i = 0; i < n; i++) {
        vf ax = vabs(x[i]);
        vi bigger = ax > amax;
        amax = vsel(bigger, ax, amax);
        max = vsel(bigger, x[i], max);
    }
    *amax_out = amax;
    return max;
}

/* Symmetric levels L in [0, 2*nmax) for x ~ scale * (L - nmax), weighted least squares
 * (w = qw[i], or x^2 without weights), trying 18 scales around -nmax/max (ggml's make_qx_quants,
 * rmse_type 1, the only kind the K-quants and weighted legacy types use). Returns the scales. */
static vf fit_symmetric_lanes(int n, int nmax, const vf *restrict x, const vf *restrict qw, vi *restrict L) {
    vf amax, max = signed_max_lanes(n, x, &amax);
    vi zero = amax < TINY;
    vf iscale = splat((float)-nmax) / max;
    vf sumlx = splat(0), suml2 = splat(0);
    for (int i = 0; i < n; i++) {
        vi l = iclamp(vnearest(iscale * x[i]), -nmax, nmax - 1);
        L[i] = l + nmax;
        vf w = qw ? qw[i] : x[i] * x[i];
        vf lf = tof(l);
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    vf scale = vsel(suml2 != 0, sumlx / suml2, splat(0.0f));
    vf best = scale * sumlx;
    vi trial[32];
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = splat(-(nmax + 0.1f * is)) / max;
        sumlx = suml2 = splat(0);
        for (int i = 0; i < n; i++) {
            vi l = iclamp(vnearest(iscale * x[i]), -nmax, nmax - 1);
            trial[i] = l + nmax;
            vf w = qw ? qw[i] : x[i] * x[i];
            vf lf = tof(l);
            sumlx += w * x[i] * lf;
            suml2 += w * lf * lf;
        }
        vi better = (suml2 > 0) & (sumlx * sumlx > best * suml2);
        for (int i = 0; i < n; i++) L[i] = isel(better, trial[i], L[i]);
        scale = vsel(better, sumlx / suml2, scale);
        best = vsel(better, scale * sumlx, best);
    }
    for (int i = 0; i < n; i++) L[i] = isel(zero, splati(0), L[i]);
    return vsel(zero, splat(0.f), scale);
}

/* Affine levels L in [0, nmax] for x ~ scale * L - min (min >= 0 returned in *neg_min), weighted
 * by `w`: start at the range, then try nstep+1 scales (rmin + rdelta*is + nmax)/(max - min), each
 * with its least-squares scale and min, keeping the lowest weighted error (|diff| with use_mad,
 * else diff^2). `v3` selects ggml's make_qkx3_quants (the weighted encoders: levels clipped before
 * rounding, empty range when max <= min) over make_qkx2_quants (the reference encoders). */
static vf fit_affine_lanes(int n, int nmax, const vf *restrict x, const vf *restrict w, vi *restrict L, vf *neg_min,
                           float rmin, float rdelta, int nstep, int use_mad, int v3) {
    vf min = x[0], max = x[0];
    vf sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        min = vsel(x[i] < min, x[i], min);
        max = vsel(x[i] > max, x[i], max);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    min = vsel(min > 0, splat(0), min);
    vi empty = v3 ? max <= min : max == min;
    vf min0 = min;
    vf iscale = splat((float)nmax) / (max - min);
    vf scale = 1 / iscale;
    vf best = splat(0);
    for (int i = 0; i < n; i++) {
        L[i] = iclamp(vnearest(iscale * (x[i] - min)), 0, nmax);
        vf diff = scale * tof(L[i]) + min - x[i];
        diff = use_mad ? vabs(diff) : diff * diff;
        best += w[i] * diff;
    }
    vi trial[32];
    for (int is = 0; is <= nstep; is++) {
        iscale = splat(rmin + rdelta * is + nmax) / (max - min);
        vf sum_l = splat(0), sum_l2 = splat(0), sum_xl = splat(0);
        for (int i = 0; i < n; i++) {
            vi l;
            if (v3) {
                vf v = iscale * (x[i] - min);
                l = isel(v > 0, vnearest(vsel(v < (float)nmax, v, splat((float)nmax))), splati(0));
            } else {
                l = iclamp(vnearest(iscale * (x[i] - min)), 0, nmax);
            }
            trial[i] = l;
            vf lf = tof(l);
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        vf D = sum_w * sum_l2 - sum_l * sum_l;
        vf this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        vf this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        vi positive = this_min > 0;
        this_min = vsel(positive, splat(0), this_min);
        this_scale = vsel(positive, sum_xl / sum_l2, this_scale);
        vf err = splat(0);
        for (int i = 0; i < n; i++) {
            vf diff = this_scale * tof(trial[i]) + this_min - x[i];
            diff = use_mad ? vabs(diff) : diff * diff;
            err += w[i] * diff;
        }
        vi take = (D > 0) & (err < best);
        for (int i = 0; i < n; i++) L[i] = isel(take, trial[i], L[i]);
        best = vsel(take, err, best);
        scale = vsel(take, this_scale, scale);
        min = vsel(take, this_min, min);
    }
    for (int i = 0; i < n; i++) L[i] = isel(empty, splati(0), L[i]);
    *neg_min = -vsel(empty, min0, min);
    return vsel(empty, splat(0.f), scale);
}

/* `groups` groups of n values at x + n*g (weights likewise, or NULL), LANES at a time (spare lanes
 * hold zeros, whose results are dropped): levels to L + n*g, scales to scales[g]. */
static void gather(const float *restrict src, int n, int first, int count, vf *restrict out) {
    for (int i = 0; i < n; i++) {
        vf v = splat(0);
        for (int g = 0; g < count; g++) v[g] = src[(first + g) * n + i];
        out[i] = v;
    }
}

static void fit_symmetric_many(int groups, int n, int nmax, const float *restrict x, const float *restrict qw, int8_t *restrict L, float *restrict scales) {
    vf X[32], W[32];
    vi Q[32];
    for (int first = 0; first < groups; first += LANES) {
        int count = groups - first < LANES ? groups - first : LANES;
        gather(x, n, first, count, X);
        if (qw) gather(qw, n, first, count, W);
        vf s = fit_symmetric_lanes(n, nmax, X, qw ? W : NULL, Q);
        for (int g = 0; g < count; g++) {
            scales[first + g] = s[g];
            for (int i = 0; i < n; i++) L[(first + g) * n + i] = (int8_t)Q[i][g];
        }
    }
}

static void fit_affine_many(int groups, int n, int nmax, const float *restrict x, const float *restrict w, uint8_t *restrict L,
                            float *restrict scales, float *restrict neg_mins, float rmin, float rdelta, int nstep, int use_mad, int v3) {
    vf X[32], W[32], m;
    vi Q[32];
    for (int first = 0; first < groups; first += LANES) {
        int count = groups - first < LANES ? groups - first : LANES;
        gather(x, n, first, count, X);
        gather(w, n, first, count, W);
        vf s = fit_affine_lanes(n, nmax, X, W, Q, &m, rmin, rdelta, nstep, use_mad, v3);
        for (int g = 0; g < count; g++) {
            scales[first + g] = s[g];
            neg_mins[first + g] = m[g];
            for (int i = 0; i < n; i++) L[(first + g) * n + i] = (uint8_t)Q[i][g];
        }
    }
}

/* Q3_K's unweighted search (ggml's make_q3_quants with do_rmse): start at -nmax/max, then up to
 * five sweeps moving single levels while the x^2-weighted fit improves. Levels in [0, 2*nmax).
 * A lane whose sweep changed nothing would repeat it unchanged, so running the remaining sweeps
 * for it (while other lanes still change) gives ggml's early exit. */
static vf fit_q3_lanes(int n, int nmax, const vf *restrict x, vi *restrict L) {
    vf amax, max = signed_max_lanes(n, x, &amax);
    vi zero = amax < TINY;
    vf iscale = splat((float)-nmax) / max;
    vf sumlx = splat(0), suml2 = splat(0);
    for (int i = 0; i < n; i++) {
        L[i] = iclamp(vnearest(iscale * x[i]), -nmax, nmax - 1);
        vf w = x[i] * x[i], lf = tof(L[i]);
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    for (int sweep = 0; sweep < 5; sweep++) {
        vi changed = splati(0);
        for (int i = 0; i < n; i++) {
            vf w = x[i] * x[i], lf = tof(L[i]);
            vf slx = sumlx - w * x[i] * lf;
            vf sl2 = suml2 - w * lf * lf;
            vi l = iclamp(vnearest(x[i] * sl2 / slx), -nmax, nmax - 1);
            vf nf = tof(l);
            vf slx2 = slx + w * x[i] * nf;
            vf sl22 = sl2 + w * nf * nf;
            vi take = ~zero & (slx > 0) & (l != L[i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22);
            L[i] = isel(take, l, L[i]);
            sumlx = vsel(take, slx2, sumlx);
            suml2 = vsel(take, sl22, suml2);
            changed |= take;
        }
        int any = 0;
        for (int g = 0; g < LANES; g++) any |= changed[g];
        if (!any) break;
    }
    for (int i = 0; i < n; i++) L[i] = isel(zero, splati(0), L[i] + nmax);
    return vsel(zero | (suml2 <= 0.0f), splat(0.0f), sumlx / suml2);
}

static void fit_q3_many(int groups, int n, int nmax, const float *restrict x, int8_t *restrict L, float *restrict scales) {
    vf X[32];
    vi Q[32];
    for (int first = 0; first < groups; first += LANES) {
        int count = groups - first < LANES ? groups - first : LANES;
        gather(x, n, first, count, X);
        vf s = fit_q3_lanes(n, nmax, X, Q);
        for (int g = 0; g < count; g++) {
            scales[first + g] = s[g];
            for (int i = 0; i < n; i++) L[(first + g) * n + i] = (int8_t)Q[i][g];
        }
    }
}

/* Non-negative levels L in [0, nmax] for the sub-block scales (or mins) x ~ scale * L, weighted by
 * qw (ggml's make_qp_quants): 9 trial scales, then up to five sweeps moving single levels. */
static float fit_positive(int n, int nmax, const float *restrict x, uint8_t *restrict L, const float *restrict qw) {
    float max = 0;
    for (int i = 0; i < n; i++) max = max > x[i] ? max : x[i];
    if (max < TINY) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = nmax / max;
    for (int i = 0; i < n; i++) L[i] = (uint8_t)nearest(iscale * x[i]);
    float scale = 1 / iscale;
    float best = 0;
    for (int i = 0; i < n; i++) {
        float diff = x[i] - scale * L[i];
        best += qw[i] * diff * diff;
    }
    for (int is = -4; is <= 4; is++) {
        if (is == 0) continue;
        float iscale_is = (0.1f * is + nmax) / max;
        float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; i++) {
            int l = mini(nmax, nearest(iscale_is * x[i]));
            float diff = x[i] - scale_is * l;
            mse += qw[i] * diff * diff;
        }
        if (mse < best) {
            best = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = mini(nmax, nearest(iscale * x[i]));
        L[i] = (uint8_t)l;
        sumlx += qw[i] * x[i] * l;
        suml2 += qw[i] * l * l;
    }
    for (int sweep = 0; sweep < 5; sweep++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            float w = qw[i];
            float slx = sumlx - w * x[i] * L[i];
            float sl2 = suml2 - w * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int l = mini(nmax, nearest(x[i] * sl2 / slx));
                if (l != L[i]) {
                    slx += w * x[i] * l;
                    sl2 += w * l * l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed++;
                    }
                }
            }
        }
        if (!changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// ---------------------------------------------------------------- shared packing

/* Sum of squares, one value after another (ggml's order). */
static inline float sum_squares(const float *restrict x, int64_t n) {
    float s = 0;
    for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
    return s;
}

/* Importance weights qw[i] * sqrt(sigma2 + x[i]^2) and their sum. */
static inline float importance(int n, const float *restrict x, const float *restrict qw, float sigma2, float *restrict w) {
    float sum = 0;
    for (int i = 0; i < n; i++) w[i] = qw[i] * sqrtf(sigma2 + x[i] * x[i]);
    for (int i = 0; i < n; i++) sum += w[i];
    return sum;
}

/* Four 2-bit planes: byte l of each 32-byte half holds levels l, l+32, l+64, l+96 of its 128. */
static inline void pack_2bit(const uint8_t *restrict L, uint8_t *restrict qs) {
    for (int j = 0; j < QK; j += 128)
        for (int l = 0; l < 32; l++)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

/* Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins (sub-blocks 4-7 split into nibbles + top bits). */
static inline void put_scale_min(uint8_t *restrict s, int j, uint8_t ls, uint8_t lm) {
    if (j < 4) {
        s[j] = ls;
        s[j + 4] = lm;
    } else {
        s[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
        s[j - 4] |= (uint8_t)((ls >> 4) << 6);
        s[j] |= (uint8_t)((lm >> 4) << 6);
    }
}

static inline void get_scale_min(const uint8_t *restrict s, int j, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (uint8_t)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        *m = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* Q3_K's scale j (6 bits, stored +32): low nibbles in bytes 0-7, top two bits in bytes 8-11. */
static inline void put_q3_scale(uint8_t *restrict s, int j, int l) {
    if (j < 8) s[j] = (uint8_t)(l & 0xF);
    else s[j - 8] |= (uint8_t)((l & 0xF) << 4);
    l >>= 4;
    s[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
}

static inline int get_q3_scale(const uint8_t *restrict s, int j) {
    int8_t sc = (int8_t)(j < 8 ? s[j] & 0xF : s[j - 8] >> 4);
    return (int8_t)((sc | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
}

/* Levels of an affine super-block (Q2_K: 16 x 16, Q4_K/Q5_K: 8 x 32) recomputed from the stored
 * scales: nearest((x + m) / d) in [0, nmax]; sub-blocks whose scale rounded to zero keep theirs. */
static inline void requantize_affine(const float *restrict x, int groups, int size, int nmax, const float *d, const float *m, uint8_t *restrict L) {
    for (int j = 0; j < groups; j++) {
        if (!d[j]) continue;
        for (int i = 0; i < size; i++) L[size * j + i] = (uint8_t)clampi(nearest((x[size * j + i] + m[j]) / d[j]), 0, nmax);
    }
}

// ---------------------------------------------------------------- Q2_K

static void encode_q2_K(const float *restrict x, uint8_t *restrict y, const float *restrict qw) {
    uint8_t L[QK], Ls[16], Lm[16];
    float scales[16], mins[16], w[QK], sw[16], d[16], m[16];
    uint8_t *sc = y, *qs = y + 16, *dd = y + 80, *dmin = y + 82;
    if (qw) {
        float sigma2 = sum_squares(x, QK) / QK;
        for (int j = 0; j < 16; j++) sw[j] = importance(16, x + 16 * j, qw + 16 * j, sigma2, w + 16 * j);
        fit_affine_many(16, 16, 3, x, w, L, scales, mins, -0.9f, 0.05f, 36, 0, 1);
        float dm = fit_positive(16, 15, scales, Ls, sw);
        float mm = fit_positive(16, 15, mins, Lm, sw);
        put_f16(dd, dm);
        put_f16(dmin, mm);
        for (int j = 0; j < 16; j++) sc[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
    } else {
        float max_scale = 0, max_min = 0;
        for (int i = 0; i < QK; i++) w[i] = fabsf(x[i]);
        fit_affine_many(16, 16, 3, x, w, L, scales, mins, -0.5f, 0.1f, 15, 1, 0);
        for (int j = 0; j < 16; j++) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        if (max_scale > 0) {
            float iscale = 15.f / max_scale;
            for (int j = 0; j < 16; j++) sc[j] = (uint8_t)nearest(iscale * scales[j]);
            put_f16(dd, max_scale / 15.f);
        } else {
            memset(sc, 0, 16);
            put_f16(dd, 0.f);
        }
        if (max_min > 0) {
            float iscale = 15.f / max_min;
            for (int j = 0; j < 16; j++) sc[j] |= (uint8_t)(nearest(iscale * mins[j]) << 4);
            put_f16(dmin, max_min / 15.f);
        } else {
            put_f16(dmin, 0.f);
        }
    }
    for (int j = 0; j < 16; j++) {
        d[j] = get_f16(dd) * (sc[j] & 0xF);
        m[j] = get_f16(dmin) * (sc[j] >> 4);
    }
    requantize_affine(x, 16, 16, 3, d, m, L);
    pack_2bit(L, qs);
}

// ---------------------------------------------------------------- Q3_K

static void encode_q3_K(const float *restrict x, uint8_t *restrict y, const float *restrict qw) {
    int8_t L[QK], Ls[16];
    float scales[16], w[QK], sw[16], d_block;
    uint8_t *hmask = y, *qs = y + 32, *sc = y + 96, *dd = y + 108;
    memset(sc, 0, 12);
    if (qw) {
        float sigma2 = 2 * sum_squares(x, QK) / QK;
        for (int j = 0; j < 16; j++) sw[j] = importance(16, x + 16 * j, qw + 16 * j, sigma2, w + 16 * j);
        fit_symmetric_many(16, 16, 4, x, w, L, scales);
        fit_symmetric_many(1, 16, 32, scales, sw, Ls, &d_block);
        for (int j = 0; j < 16; j++) put_q3_scale(sc, j, Ls[j]);
        put_f16(dd, d_block);
    } else {
        float max_scale = 0, amax = 0;
        fit_q3_many(16, 16, 4, x, L, scales);
        for (int j = 0; j < 16; j++) {
            float a = fabsf(scales[j]);
            if (a > amax) { amax = a; max_scale = scales[j]; }
        }
        if (max_scale) {
            float iscale = -32.f / max_scale;
            for (int j = 0; j < 16; j++) {
                int8_t l = (int8_t)nearest(iscale * scales[j]);
                put_q3_scale(sc, j, (int8_t)(clampi(l, -32, 31) + 32));
            }
            put_f16(dd, 1 / iscale);
        } else {
            put_f16(dd, 0.f);
        }
    }
    float d_all = get_f16(dd);
    for (int j = 0; j < 16; j++) {
        float d = d_all * get_q3_scale(sc, j);
        if (!d) continue;
        for (int i = 0; i < 16; i++) L[16 * j + i] = (int8_t)(clampi(nearest(x[16 * j + i] / d), -4, 3) + 4);
    }
    /* bit 2 of level j goes to bit j/32 of hmask[j%32]; the low two bits to the 2-bit planes */
    memset(hmask, 0, 32);
    uint8_t low[QK];
    for (int j = 0; j < QK; j++) {
        int l = L[j];
        if (l > 3) {
            hmask[j % 32] |= (uint8_t)(1u << (j / 32));
            l -= 4;
        }
        low[j] = (uint8_t)l;
    }
    pack_2bit(low, qs);
}

// ---------------------------------------------------------------- Q4_K and Q5_K

/* The affine super-block both share: 8 sub-blocks of 32 levels in [0, nmax], 6-bit scales and mins. */
static void affine_superblock(const float *restrict x, uint8_t *restrict head, const float *restrict qw, int nmax, uint8_t *restrict L) {
    uint8_t Ls[8], Lm[8];
    float scales[8], mins[8], w[QK], sw[8], d[8], m[8];
    uint8_t *sc = head + 4;
    if (qw) {
        float sigma2 = 2 * sum_squares(x, QK) / QK;
        for (int j = 0; j < 8; j++) sw[j] = importance(32, x + 32 * j, qw + 32 * j, sigma2, w + 32 * j);
        fit_affine_many(8, 32, nmax, x, w, L, scales, mins, -0.9f, 0.05f, 36, 0, 1);
        float d_block = fit_positive(8, 63, scales, Ls, sw);
        float m_block = fit_positive(8, 63, mins, Lm, sw);
        for (int j = 0; j < 8; j++) {
            /* ggml clips the levels to 63 for Q5_K only (they can exceed it after a uint8 wrap) */
            uint8_t ls = nmax == 31 && Ls[j] > 63 ? 63 : Ls[j];
            uint8_t lm = nmax == 31 && Lm[j] > 63 ? 63 : Lm[j];
            put_scale_min(sc, j, ls, lm);
        }
        put_f16(head, d_block);
        put_f16(head + 2, m_block);
    } else {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; j++) {
            float av_x = sqrtf(sum_squares(x + 32 * j, 32) / 32);
            for (int i = 0; i < 32; i++) w[32 * j + i] = av_x + fabsf(x[32 * j + i]);
        }
        if (nmax == 15) fit_affine_many(8, 32, 15, x, w, L, scales, mins, -1.f, 0.1f, 20, 0, 0);
        else fit_affine_many(8, 32, 31, x, w, L, scales, mins, -0.5f, 0.1f, 15, 0, 0);
        for (int j = 0; j < 8; j++) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < 8; j++) {
            uint8_t ls = (uint8_t)nearest(inv_scale * scales[j]);
            uint8_t lm = (uint8_t)nearest(inv_min * mins[j]);
            put_scale_min(sc, j, ls < 63 ? ls : 63, lm < 63 ? lm : 63);
        }
        put_f16(head, max_scale / 63.f);
        put_f16(head + 2, max_min / 63.f);
    }
    for (int j = 0; j < 8; j++) {
        uint8_t s, mm;
        get_scale_min(sc, j, &s, &mm);
        d[j] = get_f16(head) * s;
        m[j] = get_f16(head + 2) * mm;
    }
    requantize_affine(x, 8, 32, nmax, d, m, L);
}

static void encode_q4_K(const float *restrict x, uint8_t *restrict y, const float *restrict qw) {
    uint8_t L[QK];
    affine_superblock(x, y, qw, 15, L);
    uint8_t *q = y + 16;
    for (int j = 0; j < QK; j += 64, q += 32)
        for (int l = 0; l < 32; l++) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
}

static void encode_q5_K(const float *restrict x, uint8_t *restrict y, const float *restrict qw) {
    uint8_t L[QK];
    affine_superblock(x, y, qw, 31, L);
    uint8_t *qh = y + 16, *ql = y + 48;
    memset(qh, 0, 32);
    /* pair p of 64 levels: low nibbles of l and l+32 share byte l of ql; their bit 4 is bit 2p / 2p+1 of qh[l] */
    for (int p = 0; p < 4; p++, ql += 32) {
        for (int l = 0; l < 32; l++) {
            int l1 = L[64 * p + l], l2 = L[64 * p + l + 32];
            if (l1 > 15) { l1 -= 16; qh[l] |= (uint8_t)(1u << (2 * p)); }
            if (l2 > 15) { l2 -= 16; qh[l] |= (uint8_t)(2u << (2 * p)); }
            ql[l] = (uint8_t)(l1 | (l2 << 4));
        }
    }
}

// ---------------------------------------------------------------- Q6_K

static void encode_q6_K(const float *restrict x, uint8_t *restrict y, const float *restrict qw) {
    int8_t L[QK];
    float scales[16];
    uint8_t *ql = y, *qh = y + 128, *dd = y + 208;
    int8_t *sc = (int8_t *)(y + 192);
    float max_scale = 0, max_abs = 0;
    fit_symmetric_many(16, 16, 32, x, qw, L, scales);
    for (int j = 0; j < 16; j++) {
        float a = fabsf(scales[j]);
        if (a > max_abs) { max_abs = a; max_scale = scales[j]; }
    }
    if (max_abs < TINY) {
        memset(y, 0, 210);
        return;
    }
    float iscale = -128.f / max_scale;
    put_f16(dd, 1 / iscale);
    for (int j = 0; j < 16; j++) sc[j] = (int8_t)mini(127, nearest(iscale * scales[j]));
    float d_all = get_f16(dd);
    for (int j = 0; j < 16; j++) {
        float d = d_all * sc[j];
        if (!d) continue;
        for (int i = 0; i < 16; i++) L[16 * j + i] = (int8_t)(clampi(nearest(x[16 * j + i] / d), -32, 31) + 32);
    }
    for (int j = 0; j < QK; j += 128, ql += 64, qh += 32) {
        for (int l = 0; l < 32; l++) {
            const int8_t *q = L + j + l;
            ql[l] = (uint8_t)((q[0] & 0xF) | ((q[64] & 0xF) << 4));
            ql[l + 32] = (uint8_t)((q[32] & 0xF) | ((q[96] & 0xF) << 4));
            qh[l] = (uint8_t)((q[0] >> 4) | ((q[32] >> 4) << 2) | ((q[64] >> 4) << 4) | ((q[96] >> 4) << 6));
        }
    }
}

// ---------------------------------------------------------------- weighted legacy types (blocks of 32)

/* Q4_0 (nmax 8, 18 B) / Q5_0 (nmax 16, 22 B): fp16 d [| qh] | nibbles; sigma2 is the row's mean square. */
static void encode_symmetric_row(const float *restrict x, int64_t n, uint8_t *restrict y, const float *restrict qw, int nmax) {
    float sigma2 = sum_squares(x, n) / n;
    float w[LANES * 32], d[LANES];
    int8_t levels[LANES * 32];
    int size = nmax == 8 ? 18 : 22;
    for (int64_t b = 0; b < n / 32; b++, x += 32, qw += 32, y += size) {
        int lane = (int)(b % LANES);
        if (lane == 0) {  /* the next LANES blocks (fewer at the end of the row) in one search */
            int count = n / 32 - b < LANES ? (int)(n / 32 - b) : LANES;
            for (int g = 0; g < count; g++) importance(32, x + 32 * g, qw + 32 * g, sigma2, w + 32 * g);
            fit_symmetric_many(count, 32, nmax, x, w, levels, d);
        }
        put_f16(y, d[lane]);
        put_codes((const uint8_t *)(levels + 32 * lane), y + 2, 2 * nmax); /* levels in [0, 2*nmax) */
    }
}

/* Q4_1 (nmax 15, 20 B) / Q5_1 (nmax 31, 24 B): fp16 d | fp16 m [| qh] | nibbles. */
static void encode_affine_row(const float *restrict x, int64_t n, uint8_t *restrict y, const float *restrict qw, int nmax) {
    float sigma2 = sum_squares(x, n) / n;
    float w[LANES * 32], d[LANES], neg_min[LANES];
    uint8_t levels[LANES * 32];
    int size = nmax == 15 ? 20 : 24;
    for (int64_t b = 0; b < n / 32; b++, x += 32, qw += 32, y += size) {
        int lane = (int)(b % LANES);
        if (lane == 0) {
            int count = n / 32 - b < LANES ? (int)(n / 32 - b) : LANES;
            for (int g = 0; g < count; g++) importance(32, x + 32 * g, qw + 32 * g, sigma2, w + 32 * g);
            fit_affine_many(count, 32, nmax, x, w, levels, d, neg_min, -0.9f, 0.05f, 36, 0, 1);
        }
        put_f16(y, d[lane]);
        put_f16(y + 2, -neg_min[lane]);
        put_codes(levels + 32 * lane, y + 4, nmax + 1); /* levels in [0, nmax] */
    }
}

// ---------------------------------------------------------------- entry points

static int row_finite(const float *restrict x, int64_t n) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        bad |= (u & 0x7f800000u) == 0x7f800000u;
    }
    return !bad;
}

/* Bytes of one super-block of a K type; 0 for any other type. */
static int k_block_bytes(int type) {
    switch (type) {
        case KQ_Q2_K: return 84;
        case KQ_Q3_K: return 110;
        case KQ_Q4_K: return 144;
        case KQ_Q5_K: return 176;
        case KQ_Q6_K: return 210;
        default: return 0;
    }
}

/* Encode `rows` rows of `n` float32 values of `src` as GGML `type` into `out` (rows * row bytes).
 * `weights`: the importance of each of the n columns, or NULL for the unweighted reference path
 * (legacy types require weights here). Returns 0, 1 (a row holds NaN/inf), 2 (unsupported). */
int kq_encode(int type, const float *src, int64_t rows, int64_t n, const float *weights, uint8_t *out) {
    int kbytes = k_block_bytes(type);
    int legacy = type == KQ_Q4_0 || type == KQ_Q4_1 || type == KQ_Q5_0 || type == KQ_Q5_1;
    if (!(kbytes && n % QK == 0) && !(legacy && weights && n % 32 == 0)) return 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *x = src + r * n;
        if (!row_finite(x, n)) return 1;
        if (legacy) {
            int size = type == KQ_Q4_0 ? 18 : type == KQ_Q4_1 ? 20 : type == KQ_Q5_0 ? 22 : 24;
            uint8_t *y = out + r * (n / 32) * size;
            if (type == KQ_Q4_0 || type == KQ_Q5_0) encode_symmetric_row(x, n, y, weights, type == KQ_Q4_0 ? 8 : 16);
            else encode_affine_row(x, n, y, weights, type == KQ_Q4_1 ? 15 : 31);
            continue;
        }
        uint8_t *y = out + r * (n / QK) * kbytes;
        for (int64_t b = 0; b < n / QK; b++) {
            const float *xb = x + b * QK, *qw = weights ? weights + b * QK : NULL;
            uint8_t *yb = y + b * kbytes;
            switch (type) {
                case KQ_Q2_K: encode_q2_K(xb, yb, qw); break;
                case KQ_Q3_K: encode_q3_K(xb, yb, qw); break;
                case KQ_Q4_K: encode_q4_K(xb, yb, qw); break;
                case KQ_Q5_K: encode_q5_K(xb, yb, qw); break;
                default: encode_q6_K(xb, yb, qw); break;
            }
        }
    }
    return 0;
}

/* Decoders, one super-block each, looping by sub-block so the compiler vectorises them: value =
 * (d * sub-block scale) * level [- dmin * sub-block min], the float32 products gguf-py makes. */
static void decode_q2_K(const uint8_t *restrict x, float *restrict y) {
    float d = get_f16(x + 80), dmin = get_f16(x + 82);
    for (int j = 0; j < 16; j++) {  /* sub-block j: byte 16 + 32*(j/8) + 16*(j%2) + l, bits 2*((j/2)%4) */
        uint8_t sc = x[j];
        float dl = d * (sc & 0xF), ml = dmin * (sc >> 4);
        const uint8_t *q = x + 16 + 32 * (j / 8) + 16 * (j % 2);
        int shift = 2 * ((j / 2) % 4);
        for (int l = 0; l < 16; l++) y[16 * j + l] = dl * ((q[l] >> shift) & 3) - ml;
    }
}

static void decode_q3_K(const uint8_t *restrict x, float *restrict y) {
    float d = get_f16(x + 108);
    for (int j = 0; j < 16; j++) {  /* like Q2_K, with bit j/2 of hmask[16*(j%2) + l] adding 4 */
        float dl = d * get_q3_scale(x + 96, j);
        const uint8_t *q = x + 32 + 32 * (j / 8) + 16 * (j % 2), *hm = x + 16 * (j % 2);
        int shift = 2 * ((j / 2) % 4), bit = j / 2;
        for (int l = 0; l < 16; l++) y[16 * j + l] = dl * (((q[l] >> shift) & 3) - ((hm[l] >> bit) & 1 ? 0 : 4));
    }
}

static void decode_q45_K(const uint8_t *restrict x, float *restrict y, int five) {
    float d = get_f16(x), dmin = get_f16(x + 2);
    const uint8_t *qh = x + 16, *qs = x + (five ? 48 : 16);
    for (int j = 0; j < 8; j++) {  /* sub-block j: nibble j%2 of qs[32*(j/2) + l], bit j of qh[l] */
        uint8_t sc, m;
        get_scale_min(x + 4, j, &sc, &m);
        float dl = d * sc, ml = dmin * m;
        const uint8_t *q = qs + 32 * (j / 2);
        int shift = 4 * (j % 2);
        if (five) for (int l = 0; l < 32; l++) y[32 * j + l] = dl * (((q[l] >> shift) & 0xF) | (((qh[l] >> j) & 1) << 4)) - ml;
        else for (int l = 0; l < 32; l++) y[32 * j + l] = dl * ((q[l] >> shift) & 0xF) - ml;
    }
}

static void decode_q6_K(const uint8_t *restrict x, float *restrict y) {
    float d = get_f16(x + 208);
    const int8_t *sc = (const int8_t *)(x + 192);
    for (int j = 0; j < 8; j++) {  /* 32 values j: half h = j/4, quarter k = j%4 */
        int h = j / 4, k = j % 4;
        const uint8_t *ql = x + 64 * h + 32 * (k & 1), *qh = x + 128 + 32 * h;
        int low_shift = 4 * (k >> 1), high_shift = 2 * k;
        float d0 = d * sc[2 * j], d1 = d * sc[2 * j + 1];
        for (int l = 0; l < 32; l++) {
            int q = (((ql[l] >> low_shift) & 0xF) | (((qh[l] >> high_shift) & 3) << 4)) - 32;
            y[32 * j + l] = (l < 16 ? d0 : d1) * q;
        }
    }
}

/* The legacy blocks (32 values): value = d * level [+ m], level signed for Q4_0/Q5_0 (offset 8, 16)
 * and Q8_0; low nibbles give values 0-15, high nibbles 16-31, bit j of qh the fifth bit of value j. */
static void decode_legacy(int type, const uint8_t *restrict x, float *restrict y) {
    float d = get_f16(x);
    if (type == KQ_Q8_0) {
        for (int i = 0; i < GGML_BLOCK; i++) y[i] = (float)(int8_t)x[2 + i] * d;
        return;
    }
    int affine = type == KQ_Q4_1 || type == KQ_Q5_1, five = type == KQ_Q5_0 || type == KQ_Q5_1;
    float m = affine ? get_f16(x + 2) : 0.0f;
    const uint8_t *q = x + 2 + 2 * affine + 4 * five;
    uint32_t qh = 0;
    if (five) memcpy(&qh, x + 2 + 2 * affine, 4);
    int offset = affine ? 0 : (five ? 16 : 8);
    for (int i = 0; i < GGML_BLOCK; i++) {
        int level = ((q[i % 16] >> (4 * (i / 16))) & 0xF) | (int)(((qh >> i) & 1) << 4);
        float v = d * (float)(level - offset);
        y[i] = affine ? v + m : v;  /* product, then sum: no fused multiply-add (-ffp-contract=off) */
    }
}

/* Bytes and values of one block of `type` as decoded here (0 bytes: not a type decoded here). */
static int block_bytes(int type) {
    switch (type) {
        case KQ_Q4_0: return 18;
        case KQ_Q4_1: return 20;
        case KQ_Q5_0: return 22;
        case KQ_Q5_1: return 24;
        case KQ_Q8_0: return 34;
        default: return k_block_bytes(type);
    }
}

/* Decode `blocks` blocks of `type` (a K type's 256-value super-blocks, or a legacy type's 32-value blocks)
 * into float32 values: ggml's dequantize_row_*, equal to gguf-py's dequantize (the same float32 products
 * and sums in the same order). Returns 0 or 2. */
int kq_decode(int type, const uint8_t *src, int64_t blocks, float *out) {
    int bytes = block_bytes(type);
    if (!bytes) return 2;
    int values = k_block_bytes(type) ? QK : GGML_BLOCK;
    for (int64_t b = 0; b < blocks; b++, src += bytes, out += values) {
        switch (type) {
            case KQ_Q2_K: decode_q2_K(src, out); break;
            case KQ_Q3_K: decode_q3_K(src, out); break;
            case KQ_Q4_K: decode_q45_K(src, out, 0); break;
            case KQ_Q5_K: decode_q45_K(src, out, 1); break;
            case KQ_Q6_K: decode_q6_K(src, out); break;
            default: decode_legacy(type, src, out); break;
        }
    }
    return 0;
}
