/* Fused CPU kernels for swtool's quantizers, compiled on first use by swtool/native.py.
 *
 * Why C: the torch versions of these codecs make a dozen passes over memory per
 * chunk (one per elementwise op, each with its own temporary) and numpy's
 * float->fp16 cast is not vectorised; here each block is read once, kept in
 * registers, and its bytes written once. Every function is a plain loop over
 * blocks with no shared state, so swtool's worker threads call them on disjoint
 * chunks (ctypes releases the GIL for the call).
 *
 * Exactness: every float operation is the one the reference performs, in the
 * same order, in float32 (compiled with -ffp-contract=off so no multiply-add is
 * fused). The GGML codecs equal gguf-py's gguf.quants.quantize byte for byte;
 * rtn_quantize equals swtool.codecs.rtn's torch path. fp16 conversion is the
 * compiler's _Float16 cast: IEEE round to nearest even, as numpy and torch.
 *
 * Sources are float32 (0), float16 (1) or bfloat16 (2); all convert exactly to
 * float32. Return value: 0, or 1 when a block holds NaN or infinity (the caller
 * raises its error; outputs are then undefined).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ggml_blocks.h"
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { F32 = 0, F16 = 1, BF16 = 2 };

static inline uint16_t half_bits(float f) {
    _Float16 h = (_Float16)f;
    uint16_t b;
    memcpy(&b, &h, 2);
    return b;
}

static inline uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Values [start, start + n) of the source as float32 into v. */
static inline void load(const void *src, int dtype, int64_t start, int64_t n, float *restrict v) {
    if (dtype == F32) {
        memcpy(v, (const float *)src + start, (size_t)n * 4);
    } else if (dtype == F16) {
        const _Float16 *s = (const _Float16 *)src + start;
        int64_t i = 0;
#ifdef __F16C__
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
        for (; i < n; i++) v[i] = (float)s[i];
    } else {
        const uint16_t *s = (const uint16_t *)src + start;
        for (int64_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)s[i] << 16;
            memcpy(&v[i], &u, 4);
        }
    }
}

static inline float bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Reductions on bit patterns, which the compiler vectorises (float max/min it may not reorder
 * without -ffast-math). Valid for finite values, which every caller has checked: the bits of |x|
 * order like |x|, and key() maps float bits to integers ordered like the floats (-0 before +0;
 * callers that store the sign of a zero extreme flag those blocks for the reference to redo). */
static inline float abs_max(const float *restrict v, int n) {
    uint32_t m = 0;
    for (int i = 0; i < n; i++) {
        uint32_t a = float_bits(v[i]) & 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    return bits_float(m);
}

static inline int32_t key(float f) {
    int32_t i = (int32_t)float_bits(f);
    return i ^ ((i >> 31) & 0x7FFFFFFF);
}

static inline float unkey(int32_t k) { return bits_float((uint32_t)(k ^ ((k >> 31) & 0x7FFFFFFF))); }

static inline void min_max(const float *restrict v, int n, float *low, float *high) {
    int32_t lo = INT32_MAX, hi = INT32_MIN;
    for (int i = 0; i < n; i++) {
        int32_t k = key(v[i]);
        lo = k < lo ? k : lo;
        hi = k > hi ? k : hi;
    }
    *low = unkey(lo);
    *high = unkey(hi);
}

/* Non-zero when any of the n values is NaN or infinite (exponent all ones). */
static inline int nonfinite(const float *restrict v, int n) {
    uint32_t bad = 0;
    for (int i = 0; i < n; i++) bad |= (float_bits(v[i]) & 0x7F800000u) == 0x7F800000u;
    return bad != 0;
}

/* ---- GGML block codecs: 32 values per block ---- */

#define QK 32

static inline void put_half(uint8_t *out, float f) {
    uint16_t b = half_bits(f);
    memcpy(out, &b, 2);
}

/* d = max|x| / 127; q = round half away from zero (gguf-py's np_roundf) of x / d. */
int ggml_q8_0(const void *src, int dtype, int64_t blocks, uint8_t *restrict out) {
    float v[QK];
    for (int64_t b = 0; b < blocks; b++, out += 34) {
        load(src, dtype, b * QK, QK, v);
        if (nonfinite(v, QK)) return 1;
        float d = abs_max(v, QK) / 127.0f;
        float id = d == 0.0f ? 0.0f : 1.0f / d;
        put_half(out, d);
        int32_t q[QK];
        for (int i = 0; i < QK; i++) {
            /* |x| <= 127 (plus rounding), so floor of these non-negatives is truncation to int */
            float x = v[i] * id;
            float a = fabsf(x);
            float whole = (float)(int32_t)a;
            int32_t r = (int32_t)(whole + (float)(int32_t)(2.0f * (a - whole)));
            q[i] = x < 0.0f ? -r : r;
        }
        for (int i = 0; i < QK; i++) out[2 + i] = (uint8_t)q[i];
    }
    return 0;
}

/* The value of largest magnitude, sign kept, first on ties (numpy's argmax of |x|). */
static inline float signed_absmax(const float *restrict v) {
    uint32_t amax = float_bits(abs_max(v, QK)), hits = 0;
    for (int i = 0; i < QK; i++) hits |= (uint32_t)((float_bits(v[i]) & 0x7FFFFFFFu) == amax) << i;
    return v[__builtin_ctz(hits)]; /* hits != 0: the maximum is one of the values */
}

/* Q4_0 (levels 16) and Q5_0 (levels 32): d = signed absmax / -(levels/2); q = trunc(x/d + levels/2 + 0.5). */
static int symmetric(const void *src, int dtype, int64_t blocks, uint8_t *restrict out, int levels) {
    float v[QK];
    uint8_t q[QK];
    const int size = levels == 16 ? 18 : 22;
    const float half = (float)(levels / 2), shift = (float)(levels / 2) + 0.5f;
    for (int64_t b = 0; b < blocks; b++, out += size) {
        load(src, dtype, b * QK, QK, v);
        if (nonfinite(v, QK)) return 1;
        float d = signed_absmax(v) / -half;
        float id = d == 0.0f ? 0.0f : 1.0f / d;
        for (int i = 0; i < QK; i++) {
            int t = (int)(v[i] * id + shift);
            q[i] = (uint8_t)(t < 0 ? 0 : t > levels - 1 ? levels - 1 : t);
        }
        put_half(out, d);
        put_codes(q, out + 2, levels);
    }
    return 0;
}

int ggml_q4_0(const void *src, int dtype, int64_t blocks, uint8_t *restrict out) { return symmetric(src, dtype, blocks, out, 16); }
int ggml_q5_0(const void *src, int dtype, int64_t blocks, uint8_t *restrict out) { return symmetric(src, dtype, blocks, out, 32); }

/* Q4_1 (levels 16) and Q5_1 (levels 32): d = (max - min) / (levels-1); q = trunc((x - min)/d + 0.5).
 * A block whose max or min is zero gets flags[b] = 1: the sign of that zero reaches the stored
 * bytes and is whatever numpy's SIMD reduction picks, so the caller re-encodes those blocks
 * with numpy's reduction. Returns 0/1 as the others; *flagged counts the flags set. */
static int affine(const void *src, int dtype, int64_t blocks, uint8_t *restrict out, int levels, uint8_t *restrict flags, int64_t *flagged) {
    float v[QK];
    uint8_t q[QK];
    const int size = levels == 16 ? 20 : 24;
    const float top = (float)(levels - 1);
    int64_t count = 0;
    for (int64_t b = 0; b < blocks; b++, out += size) {
        load(src, dtype, b * QK, QK, v);
        if (nonfinite(v, QK)) return 1;
        float high, low;
        min_max(v, QK, &low, &high);
        flags[b] = high == 0.0f || low == 0.0f;
        count += flags[b];
        float d = (high - low) / top;
        float id = d == 0.0f ? 0.0f : 1.0f / d;
        for (int i = 0; i < QK; i++) {
            int t = (int)((v[i] - low) * id + 0.5f);
            q[i] = (uint8_t)(t < 0 ? 0 : t > levels - 1 ? levels - 1 : t);
        }
        put_half(out, d);
        put_half(out + 2, low);
        put_codes(q, out + 4, levels);
    }
    *flagged = count;
    return 0;
}

int ggml_q4_1(const void *src, int dtype, int64_t blocks, uint8_t *restrict out, uint8_t *restrict flags, int64_t *flagged) {
    return affine(src, dtype, blocks, out, 16, flags, flagged);
}
int ggml_q5_1(const void *src, int dtype, int64_t blocks, uint8_t *restrict out, uint8_t *restrict flags, int64_t *flagged) {
    return affine(src, dtype, blocks, out, 32, flags, flagged);
}

/* ---- float conversions, n values ---- */

#define STRIP 1024

int ggml_f16(const void *src, int dtype, int64_t n, uint16_t *restrict out) {
    float v[STRIP];
    for (int64_t s = 0; s < n; s += STRIP) {
        int m = (int)(n - s < STRIP ? n - s : STRIP);
        load(src, dtype, s, m, v);
        if (nonfinite(v, m)) return 1;
        int i = 0;
#ifdef __F16C__
        for (; i + 8 <= m; i += 8)
            _mm_storeu_si128((__m128i *)(out + s + i), _mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
        for (; i < m; i++) out[s + i] = half_bits(v[i]);
    }
    return 0;
}

/* ggml_compute_fp32_to_bf16: round to nearest even (NaN is refused before it matters). */
int ggml_bf16(const void *src, int dtype, int64_t n, uint16_t *restrict out) {
    float v[STRIP];
    for (int64_t s = 0; s < n; s += STRIP) {
        int m = (int)(n - s < STRIP ? n - s : STRIP);
        load(src, dtype, s, m, v);
        if (nonfinite(v, m)) return 1;
        for (int i = 0; i < m; i++) {
            uint32_t u = float_bits(v[i]);
            out[s + i] = (uint16_t)((u + (0x7FFFu + ((u >> 16) & 1u))) >> 16);
        }
    }
    return 0;
}

/* ---- swtool-rtn: `rows` blocks of `width` values, codes unpacked ---- */

/* Per block (asymmetric) scale = fp16((max - min) / L), zero = fp16(min); (symmetric) scale =
 * fp16(max|x| / (2^(bits-1) - 1)), zero = fp16(scale * -2^(bits-1)); then
 * code = (uint8) clamp(x * inv - (zero * inv - 0.5), 0, L + 0.5) with inv = 1/scale (0 if scale is 0),
 * exactly the operations of rtn._scale_zero and rtn._codes. Asymmetric blocks whose min or max
 * is zero get flags[r] = 1 (the stored sign of that zero is torch's choice; the caller redoes
 * them). Returns 1 when a value is NaN or infinite, 2 when a scale or zero overflows fp16. */
/* One block's fp16 scale and zero from its reduction, and the inverse and offset its codes use;
 * 0, or 2 when the scale or zero overflows fp16. */
static inline int rtn_scale(float low, float high, float amax, int bits, int sym, uint16_t *scale_out, uint16_t *zero_out, float *inv, float *offset) {
    _Float16 scale, zero;
    if (sym) {
        const int half = 1 << (bits - 1);
        scale = (_Float16)(amax / (float)(half - 1));
        zero = (_Float16)((float)scale * (float)-half);
    } else {
        scale = (_Float16)((high - low) / (float)((1 << bits) - 1));
        zero = (_Float16)low;
    }
    if (!isfinite((float)scale) || !isfinite((float)zero)) return 2;
    memcpy(scale_out, &scale, 2);
    memcpy(zero_out, &zero, 2);
    const float s = (float)scale;
    *inv = s > 0.0f ? 1.0f / s : 0.0f;
    *offset = (float)zero * *inv - 0.5f;
    return 0;
}

static inline void rtn_codes(const float *restrict v, int n, float inv, float offset, float top, uint8_t *restrict c) {
    for (int i = 0; i < n; i++) {
        float q = v[i] * inv - offset;
        q = q > 0.0f ? q : 0.0f;
        q = q < top ? q : top;
        c[i] = (uint8_t)(int)q;
    }
}

#define GROUP 8
#define SMALL 64

/* Blocks of at most SMALL values, GROUP at a time: one load, then the GROUP reductions, the GROUP
 * scale computations (independent, so their divisions and conversions overlap) and the codes. */
static int rtn_small(const void *src, int dtype, int64_t rows, int width, int bits, int sym,
                     uint8_t *restrict codes, uint16_t *restrict scales, uint16_t *restrict zeros, uint8_t *restrict flags) {
    float v[GROUP * SMALL], low[GROUP] = {0}, high[GROUP] = {0}, amax[GROUP] = {0}, inv[GROUP], offset[GROUP];
    const float top = (float)((1 << bits) - 1) + 0.5f;
    for (int64_t r0 = 0; r0 < rows; r0 += GROUP) {
        const int g = rows - r0 < GROUP ? (int)(rows - r0) : GROUP;
        load(src, dtype, r0 * width, (int64_t)g * width, v);
        if (nonfinite(v, g * width)) return 1;
        for (int k = 0; k < g; k++) {
            if (sym)
                amax[k] = abs_max(v + k * width, width);
            else
                min_max(v + k * width, width, &low[k], &high[k]);
        }
        for (int k = 0; k < g; k++) {
            flags[r0 + k] = !sym && (high[k] == 0.0f || low[k] == 0.0f);
            if (rtn_scale(low[k], high[k], amax[k], bits, sym, &scales[r0 + k], &zeros[r0 + k], &inv[k], &offset[k])) return 2;
        }
        for (int k = 0; k < g; k++) rtn_codes(v + k * width, width, inv[k], offset[k], top, codes + (r0 + k) * width);
    }
    return 0;
}

int rtn_quantize(const void *src, int dtype, int64_t rows, int64_t width, int bits, int sym,
                 uint8_t *restrict codes, uint16_t *restrict scales, uint16_t *restrict zeros, uint8_t *restrict flags) {
    if (width <= SMALL) return rtn_small(src, dtype, rows, (int)width, bits, sym, codes, scales, zeros, flags);
    float v[STRIP];
    const int L = (1 << bits) - 1;
    const float top = (float)L + 0.5f;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t base = r * width;
        float high = -INFINITY, low = INFINITY, amax = 0.0f;
        for (int64_t s = 0; s < width; s += STRIP) {
            int m = (int)(width - s < STRIP ? width - s : STRIP);
            load(src, dtype, base + s, m, v);
            if (nonfinite(v, m)) return 1;
            if (sym) {
                float a = abs_max(v, m);
                amax = a > amax ? a : amax;
            } else {
                float lo, hi;
                min_max(v, m, &lo, &hi);
                high = hi > high ? hi : high;
                low = lo < low ? lo : low;
            }
        }
        flags[r] = !sym && (high == 0.0f || low == 0.0f);
        float inv, offset;
        if (rtn_scale(low, high, amax, bits, sym, &scales[r], &zeros[r], &inv, &offset)) return 2;
        for (int64_t s0 = 0; s0 < width; s0 += STRIP) {
            int m = (int)(width - s0 < STRIP ? width - s0 : STRIP);
            if (width > STRIP) load(src, dtype, base + s0, m, v); /* else v still holds the block */
            rtn_codes(v, m, inv, offset, top, codes + base + s0);
        }
    }
    return 0;
}

/* ---- bit packing (swtool.codecs.pack): `groups` groups of codes into bytes ---- */

/* Code j of a group lands at bits [j * bits, (j + 1) * bits) of the group read as a little-endian
 * integer (4 bits: 2 codes -> 1 byte; 2 bits: 4 -> 1; 3 bits: 8 -> 3). Codes must be < 2^bits. */
static inline void pack_width(const uint8_t *restrict codes, int64_t groups, int bits, uint8_t *restrict out) {
    const int per = bits == 3 ? 8 : 8 / bits, nbytes = per * bits / 8;
    for (int64_t g = 0; g < groups; g++) {
        uint32_t w = 0;
        for (int j = 0; j < per; j++) w |= (uint32_t)codes[g * per + j] << (j * bits);
        for (int k = 0; k < nbytes; k++) out[g * nbytes + k] = (uint8_t)(w >> (8 * k));
    }
}

void pack_codes(const uint8_t *restrict codes, int64_t groups, int bits, uint8_t *restrict out) {
    switch (bits) { /* constant widths, so each loop is unrolled and vectorised */
    case 2: pack_width(codes, groups, 2, out); break;
    case 3: pack_width(codes, groups, 3, out); break;
    case 4: pack_width(codes, groups, 4, out); break;
    }
}

/* ---- Products with 16-bit weights: the scan's forward ---- */

/* y[n, m] = x[n, k] . w[m, k]^T: x and y float32, w float16 (1) or bfloat16 (2), read in place;
 * rows of y are ldy floats apart, so threads can each fill a band of its columns.
 *
 * Why: the scan multiplies a few dozen input rows by each weight, which is bound by memory
 * traffic, not arithmetic. Converting a bf16 layer to float32 first writes and rereads twice
 * its bytes; here each block of LIN_ROWS weight rows is converted one chunk of LIN_CHUNK
 * columns at a time into a buffer that stays in L1 while every input row uses it. Sums are
 * float32 in another order than torch's: results agree to rounding, not bit for bit.
 * Vectorised with AVX-512 or with AVX2 and FMA; linear_half_vectorised() says whether this
 * build is (the caller keeps torch's path otherwise: a scalar loop would be slower than
 * converting). */
#define LIN_ROWS 4
#define LIN_CHUNK 1024

/* The LIN_ROWS dot products of LIN_TOKENS input rows xs with the converted rows wf over kc
 * columns, into out[token][row]: LIN_ROWS x LIN_TOKENS accumulators stay in registers, so each
 * loaded weight vector serves every token and each input vector every row. */
#if defined(__AVX512F__)
#define LIN_TOKENS 4
static inline void dot_rows(const float (*restrict wf)[LIN_CHUNK], const float *const *xs, int64_t kc, float (*restrict out)[LIN_ROWS]) {
    __m512 acc[LIN_TOKENS][LIN_ROWS];
    for (int t = 0; t < LIN_TOKENS; t++)
        for (int r = 0; r < LIN_ROWS; r++) acc[t][r] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= kc; j += 16) {
        __m512 x0 = _mm512_loadu_ps(xs[0] + j), x1 = _mm512_loadu_ps(xs[1] + j), x2 = _mm512_loadu_ps(xs[2] + j), x3 = _mm512_loadu_ps(xs[3] + j);
        for (int r = 0; r < LIN_ROWS; r++) {
            __m512 w = _mm512_load_ps(wf[r] + j);
            acc[0][r] = _mm512_fmadd_ps(w, x0, acc[0][r]);
            acc[1][r] = _mm512_fmadd_ps(w, x1, acc[1][r]);
            acc[2][r] = _mm512_fmadd_ps(w, x2, acc[2][r]);
            acc[3][r] = _mm512_fmadd_ps(w, x3, acc[3][r]);
        }
    }
    for (int t = 0; t < LIN_TOKENS; t++)
        for (int r = 0; r < LIN_ROWS; r++) out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
#elif defined(__AVX2__) && defined(__FMA__)
#define LIN_TOKENS 2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline void dot_rows(const float (*restrict wf)[LIN_CHUNK], const float *const *xs, int64_t kc, float (*restrict out)[LIN_ROWS]) {
    __m256 acc[LIN_TOKENS][LIN_ROWS];
    for (int t = 0; t < LIN_TOKENS; t++)
        for (int r = 0; r < LIN_ROWS; r++) acc[t][r] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= kc; j += 8) {
        __m256 x0 = _mm256_loadu_ps(xs[0] + j), x1 = _mm256_loadu_ps(xs[1] + j);
        for (int r = 0; r < LIN_ROWS; r++) {
            __m256 w = _mm256_load_ps(wf[r] + j);
            acc[0][r] = _mm256_fmadd_ps(w, x0, acc[0][r]);
            acc[1][r] = _mm256_fmadd_ps(w, x1, acc[1][r]);
        }
    }
    for (int t = 0; t < LIN_TOKENS; t++)
        for (int r = 0; r < LIN_ROWS; r++) out[t][r] = hsum8(acc[t][r]);
#else
#define LIN_TOKENS 1
static inline void dot_rows(const float (*restrict wf)[LIN_CHUNK], const float *const *xs, int64_t kc, float (*restrict out)[LIN_ROWS]) {
    int64_t j = 0;
    for (int r = 0; r < LIN_ROWS; r++) out[0][r] = 0.0f;
#endif
    for (; j < kc; j++)
        for (int t = 0; t < LIN_TOKENS; t++)
            for (int r = 0; r < LIN_ROWS; r++) out[t][r] += wf[r][j] * xs[t][j];
}

int linear_half_vectorised(void) { return LIN_TOKENS > 1; }

int linear_half(const float *restrict x, int64_t n, int64_t k, const void *w, int dtype, int64_t m, float *restrict y, int64_t ldy) {
    static _Thread_local float wf[LIN_ROWS][LIN_CHUNK] __attribute__((aligned(64)));
    float out[LIN_TOKENS][LIN_ROWS];
    const float *xs[LIN_TOKENS];
    for (int64_t t = 0; t < n; t++) memset(y + t * ldy, 0, (size_t)m * sizeof(float));
    for (int64_t r0 = 0; r0 < m; r0 += LIN_ROWS) {
        int rows = m - r0 < LIN_ROWS ? (int)(m - r0) : LIN_ROWS;
        for (int64_t c0 = 0; c0 < k; c0 += LIN_CHUNK) {
            int64_t kc = k - c0 < LIN_CHUNK ? k - c0 : LIN_CHUNK;
            for (int r = 0; r < LIN_ROWS; r++) {
                if (r < rows) load(w, dtype, (r0 + r) * k + c0, kc, wf[r]);
                else memset(wf[r], 0, (size_t)kc * sizeof(float));
            }
            for (int64_t t0 = 0; t0 < n; t0 += LIN_TOKENS) {
                int tokens = n - t0 < LIN_TOKENS ? (int)(n - t0) : LIN_TOKENS;
                for (int t = 0; t < LIN_TOKENS; t++) xs[t] = x + (t0 + (t < tokens ? t : 0)) * k + c0;  /* spare slots repeat a row */
                dot_rows((const float (*)[LIN_CHUNK])wf, xs, kc, out);
                for (int t = 0; t < tokens; t++)
                    for (int r = 0; r < rows; r++) y[(t0 + t) * ldy + r0 + r] += out[t][r];
            }
        }
    }
    return 0;
}
