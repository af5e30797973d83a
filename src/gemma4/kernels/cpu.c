/* The CPU's kernels (kernels/cpu.py): the int4 product, RMSNorm with its residual add, each head's norm and RoPE,
 * few-query attention, the tanh gelu, and a decode step's decoder layers built of them; on x86 CPUs, with AVX512
 * (-VNNI) or AVX2 where the compiler targets them (-march=native), else plain C.
 *
 * int4 product, y = x @ w.T: w in groups of 32 (or a multiple), read in the compressed-tensors layout as checkpoints
 * store it: row n is K / 2 bytes; byte t holds element 2t + 8 in its low nibble and element 2t + 1 + 8 in its high
 * one (int32 words read as little-endian bytes). Scales: one per `group` inputs of a row, bf16, fp16 or fp32.
 * As llama.cpp's Q4_0 x Q8_0 product, each row of x is quantized per block of 32 inputs, to be multiplied by the
 * stored nibbles (q + 8) in exact int32 dot products (VNNI), less 8 x the inputs' sum; but in two int8 parts, so that
 * the inputs keep 15 bits where Q8_0 keeps 8: x = e x (254 hi + lo), e = absmax / (127 x 254), hi = round(x / 254e),
 * lo = round((x - 254e hi) / e), |lo| <= 127; an input moves by at most e / 2, 2^-16 of its block's largest.
 * A block's two dot products are scaled by (weight scale x 254e) and (weight scale x e) and summed in fp32.
 * Blocks go by fours ("quads", 64 bytes of nibbles): a quad's low nibbles are its even elements in order, its high
 * nibbles its odd ones, so the inputs of a quad are stored evens first, odds second (`input_slot`).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>
#include <omp.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round half to even, as torch's cast */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

static inline float load_value(const void *p, int64_t i, int dtype) {
    if (dtype == DT_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    if (dtype == DT_F16) return f16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

#if defined(__AVX512F__)
/* 16 values of dtype from p, as fp32. */
static inline __m512 load16(const void *p, int dtype) {
    if (dtype == DT_F32) return _mm512_loadu_ps(p);
    __m256i bits = _mm256_loadu_si256((const __m256i *)p);
    if (dtype == DT_F16) return _mm512_cvtph_ps(bits);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
/* load16 of the lanes in `lanes` (the others 0), reading nothing past them. */
static inline __m512 load16_masked(const void *p, int dtype, __mmask16 lanes) {
    if (dtype == DT_F32) return _mm512_maskz_loadu_ps(lanes, p);
    __m256i bits = _mm256_maskz_loadu_epi16(lanes, p);
    if (dtype == DT_F16) return _mm512_cvtph_ps(bits);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#endif

/* 16 lanes rounded to dtype (as floats): bf16 to nearest even (NaN kept), fp16 by the hardware's conversion. */
static inline __m512 round16(__m512 v, int dtype) {
    if (dtype == DT_F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (dtype != DT_BF16) return v;
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)),
                            _mm512_set1_epi32((int32_t)0xffff0000u));
    return _mm512_mask_mov_ps(_mm512_castsi512_ps(bits), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}

/* 16 lanes stored as dtype (rounded as round16). */
static inline void store16(void *p, int dtype, __m512 v) {
    if (dtype == DT_F32) return _mm512_storeu_ps(p, v);
    if (dtype == DT_F16)
        return _mm256_storeu_si256(p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(round16(v, dtype)), 16);
    /* a NaN stays NaN (as f32_to_bf16 makes it: quiet), whatever its payload bits */
    bits = _mm512_mask_or_epi32(bits, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), bits, _mm512_set1_epi32(0x40));
    _mm256_storeu_si256(p, _mm512_cvtepi32_epi16(bits));
}
#endif

/* Where element i of a row of dtype starts. */
static inline const void *element(const void *p, int64_t i, int dtype) {
    return (const char *)p + i * (dtype == DT_F32 ? 4 : 2);
}

#define HI 254.0f /* hi's weight in units of lo's */

static inline void store_value(void *p, int64_t i, int dtype, float v) {
    if (dtype == DT_BF16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else if (dtype == DT_F16) ((uint16_t *)p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    else ((float *)p)[i] = v;
}

/* Where input i of a row of k sits among its int8 parts: in its quad of r blocks (the last may hold fewer), the 16r
 * even elements, then the 16r odd ones. */
static inline int64_t input_slot(int64_t i, int64_t k) {
    int64_t quad = i / 128, r = (k - 128 * quad) / 32 < 4 ? (k - 128 * quad) / 32 : 4, e = i % 128;
    return 128 * quad + (e % 2) * 16 * r + e / 2;
}

/* Blocks [b, end) of one row of x quantized: the int8 parts hi and lo of its k inputs (at `input_slot`), e[b] of each
 * block b, and in c[b] the block's share of the product's offset correction, -8 e (254 sum hi + sum lo). */
static void quantize_row(const void *x, int dtype, int64_t k, int64_t b, int64_t end, int8_t *hi, int8_t *lo, float *e,
                         float *c) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (; b < end; b++) {
        __m512 v[2] = {load16(element(x, 32 * b, dtype), dtype), load16(element(x, 32 * b + 16, dtype), dtype)};
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        float step = amax / (127.0f * HI), coarse = HI * step;
        __m512 to_hi = _mm512_set1_ps(amax > 0.0f ? 1.0f / coarse : 0.0f);
        __m512 to_lo = _mm512_set1_ps(amax > 0.0f ? 1.0f / step : 0.0f);
        __m512i parts[2][2]; /* [hi, lo][half] */
        for (int half = 0; half < 2; half++) {
            __m512 rounded =
                _mm512_roundscale_ps(_mm512_mul_ps(v[half], to_hi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512 rest = _mm512_fnmadd_ps(rounded, _mm512_set1_ps(coarse), v[half]);
            parts[0][half] = _mm512_cvtps_epi32(rounded);
            parts[1][half] = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(rest, to_lo)),
                                                               _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
        }
        int64_t evens = input_slot(32 * b, k), odds = input_slot(32 * b + 1, k);
        int8_t *out[2] = {hi, lo};
        int32_t sums[2];
        for (int part = 0; part < 2; part++) {
            __m512i first = parts[part][0], second = parts[part][1];
            _mm_storeu_si128((__m128i *)(out[part] + evens),
                             _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(first, even, second)));
            _mm_storeu_si128((__m128i *)(out[part] + odds),
                             _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(first, odd, second)));
            sums[part] = _mm512_reduce_add_epi32(_mm512_add_epi32(parts[part][0], parts[part][1]));
        }
        e[b] = step;
        c[b] = -8.0f * step * (HI * (float)sums[0] + (float)sums[1]);
    }
#endif
    for (; b < end; b++) {
        float v[32], amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            v[i] = load_value(x, 32 * b + i, dtype);
            amax = fmaxf(amax, fabsf(v[i]));
        }
        float step = amax / (127.0f * HI), coarse = HI * step;
        float to_hi = amax > 0.0f ? 1.0f / coarse : 0.0f, to_lo = amax > 0.0f ? 1.0f / step : 0.0f;
        int32_t sum_hi = 0, sum_lo = 0;
        for (int i = 0; i < 32; i++) {
            float h = nearbyintf(v[i] * to_hi);
            float l = fminf(fmaxf(nearbyintf(fmaf(-h, coarse, v[i]) * to_lo), -127.0f), 127.0f);
            hi[input_slot(32 * b + i, k)] = (int8_t)h;
            lo[input_slot(32 * b + i, k)] = (int8_t)l;
            sum_hi += (int32_t)h, sum_lo += (int32_t)l;
        }
        e[b] = step;
        c[b] = -8.0f * step * (HI * (float)sum_hi + (float)sum_lo);
    }
}

/* wd[b] = the weight scale of block b x e[b]; returns the row's offset correction, sum of weight scale x c[b]. */
static float row_scales(const void *scales, int dtype, int64_t offset, int64_t per_scale, const float *e,
                        const float *c, float *wd, int64_t blocks) {
    int64_t b = 0;
    float correction = 0.0f;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    if (per_scale == 1) {
        __m512 sum = _mm512_setzero_ps();
        for (; b < blocks; b += 16) { /* the last 16 masked: a row of few blocks is mostly this */
            const __mmask16 lanes = blocks - b >= 16 ? 0xffff : (__mmask16)((1u << (blocks - b)) - 1);
            __m512 ws = load16_masked(element(scales, offset + b, dtype), dtype, lanes);
            _mm512_mask_storeu_ps(wd + b, lanes, _mm512_mul_ps(ws, _mm512_maskz_loadu_ps(lanes, e + b)));
            sum = _mm512_fmadd_ps(ws, _mm512_maskz_loadu_ps(lanes, c + b), sum);
        }
        correction = _mm512_reduce_add_ps(sum);
    }
#endif
    for (; b < blocks; b++) {
        float ws = load_value(scales, offset + b / per_scale, dtype);
        wd[b] = ws * e[b];
        correction += ws * c[b];
    }
    return correction;
}

/* sum over blocks of wd[b] x (254 dot(nibbles, hi) + dot(nibbles, lo)) of block b, the nibbles being q + 8. */
static float row_dot(const uint8_t *w, const int8_t *hi, const int8_t *lo, const float *wd, int64_t blocks) {
    float total = 0.0f;
    int64_t b = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    /* A quad per step: its 64 bytes of low nibbles meet the 64 even inputs, its high nibbles the odd ones; each int32
     * lane of the dot products sums 4 bytes of one block (lanes 4j..4j+3: block j of the quad). */
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512 coarse = _mm512_set1_ps(HI);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t quad = 0; b + 4 <= blocks; b += 4, quad++) {
        __m512i raw = _mm512_loadu_si512((const void *)(w + 16 * b));
        _mm_prefetch((const char *)(w + 16 * b + 1024), _MM_HINT_T0);
        __m512i even_nibbles = _mm512_and_si512(raw, low4);
        __m512i odd_nibbles = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
        const int8_t *h = hi + 32 * b, *l = lo + 32 * b;
        __m512i dot_hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), even_nibbles, _mm512_loadu_si512(h));
        dot_hi = _mm512_dpbusd_epi32(dot_hi, odd_nibbles, _mm512_loadu_si512(h + 64));
        __m512i dot_lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), even_nibbles, _mm512_loadu_si512(l));
        dot_lo = _mm512_dpbusd_epi32(dot_lo, odd_nibbles, _mm512_loadu_si512(l + 64));
        __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_hi), coarse, _mm512_cvtepi32_ps(dot_lo));
        __m512 scales = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(wd + b)));
        if (quad & 1) acc1 = _mm512_fmadd_ps(sum, scales, acc1);
        else acc0 = _mm512_fmadd_ps(sum, scales, acc0);
    }
    total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__)
    /* A block per step: its 16 bytes of nibbles, low then high, meet its 16 even and 16 odd inputs. */
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps();
    for (; b < (blocks & ~(int64_t)3); b++) {
        const int64_t evens = 128 * (b / 4) + 16 * (b % 4), odds = evens + 64;
        __m128i raw = _mm_loadu_si128((const __m128i *)(w + 16 * b));
        __m256i nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low4);
        __m256i inputs_hi = _mm256_loadu2_m128i((const __m128i *)(hi + odds), (const __m128i *)(hi + evens));
        __m256i inputs_lo = _mm256_loadu2_m128i((const __m128i *)(lo + odds), (const __m128i *)(lo + evens));
        __m256i dot_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles, inputs_hi), _mm256_set1_epi16(1));
        __m256i dot_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles, inputs_lo), _mm256_set1_epi16(1));
        __m256 sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_hi), _mm256_set1_ps(HI), _mm256_cvtepi32_ps(dot_lo));
        acc = _mm256_fmadd_ps(sum, _mm256_broadcast_ss(wd + b), acc);
    }
    __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    total = _mm_cvtss_f32(_mm_add_ss(sum4, _mm_movehdup_ps(sum4)));
#endif
    for (; b < blocks; b++) { /* the last, partial quad (and everything without AVX2) */
        const int64_t quad = b / 4, r = blocks - 4 * quad < 4 ? blocks - 4 * quad : 4, j = b % 4;
        const int64_t evens = 128 * quad + 16 * j, odds = 128 * quad + 16 * r + 16 * j;
        int32_t dot_hi = 0, dot_lo = 0;
        for (int t = 0; t < 16; t++) {
            int32_t low = w[16 * b + t] & 15, high = w[16 * b + t] >> 4;
            dot_hi += low * hi[evens + t] + high * hi[odds + t];
            dot_lo += low * lo[evens + t] + high * lo[odds + t];
        }
        total += wd[b] * (HI * (float)dot_hi + (float)dot_lo);
    }
    return total;
}

/* Below this many weights a product runs on one thread: waking the others costs more than it saves. */
#define PARALLEL_MIN_WEIGHTS (1 << 18)

/* x [m, k] (row stride k) @ w.T -> y [m, n] (row stride y_stride); scales [n, k / group] (row stride s_stride).
 * w: int4 bytes [n, k / 2] (row stride w_stride), or with `chunk` > 0 stored chunk by chunk: K cut into chunks of
 * `chunk` inputs (the last may be shorter), chunk j's [n, its inputs / 2] bytes after chunk j - 1's. A row's inputs
 * of a wide K do not stay in L1 beside the streamed weights (24 KB of int8 parts at K = 12288: read from L2 for every
 * row); a chunk's do, and each chunk's weights still stream in order. Each chunk's sum is taken in fp32, then the
 * chunks' in order, whatever the number of threads (they split the chunks, and the rows where there are fewer
 * chunks than threads). Returns 0, or -1 where it does not take the shapes (the caller runs its twin). */
int gemma4_int4_matmul(const void *x, int x_dtype, int64_t m, int64_t k, const uint8_t *w, int64_t w_stride,
                       const void *scales, int s_dtype, int64_t s_stride, int64_t group, int64_t n, void *y,
                       int y_dtype, int64_t y_stride, int64_t chunk, int threads) {
    if (k % 32 || group % 32 || k % group || m < 1 || chunk % (4 * group) || chunk < 0) return -1;
    const int64_t blocks = k / 32, per_scale = group / 32, width = chunk && chunk < k ? chunk / 32 : blocks;
    const int64_t chunks = (blocks + width - 1) / width;
    int8_t *hi = aligned_alloc(64, (size_t)((2 * m * k + 63) / 64 * 64)); /* hi of every row, then lo */
    float *e = malloc(sizeof(float) * (size_t)(m * blocks)), *c = malloc(sizeof(float) * (size_t)(m * blocks));
    float *partial = chunks > 1 ? malloc(sizeof(float) * (size_t)(chunks * n * m)) : NULL; /* [chunk][row][r] */
    if (!hi || !e || !c || (chunks > 1 && !partial)) {
        free(hi), free(e), free(c), free(partial);
        return -1;
    }
    int8_t *lo = hi + m * k;
#pragma omp parallel num_threads(threads) if (n * k >= PARALLEL_MIN_WEIGHTS)
    {
        const int64_t quads = (blocks + 3) / 4;
#pragma omp for schedule(static)
        for (int64_t q = 0; q < m * quads; q++) {
            const int64_t r = q / quads, from = 4 * (q % quads), to = from + 4 < blocks ? from + 4 : blocks;
            quantize_row(element(x, r * k, x_dtype), x_dtype, k, from, to, hi + r * k, lo + r * k, e + r * blocks,
                         c + r * blocks);
        }
        /* units (row part, chunk), part-major: a thread's units are neighbouring chunks of the same rows */
        const int64_t count = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t parts = chunks >= count ? 1 : (count + chunks - 1) / chunks, units = parts * chunks;
        const int64_t end = units * (me + 1) / count;
        float *wd = malloc(sizeof(float) * (size_t)width);
        for (int64_t u = units * me / count; u < end; u = (u / chunks + 1) * chunks) {
            const int64_t part = u / chunks, first = u % chunks;
            const int64_t last = end - part * chunks < chunks ? end - part * chunks : chunks;
            for (int64_t j = first; j < last; j++) {
                const int64_t from = j * width, size = blocks - from < width ? blocks - from : width;
                const uint8_t *weights = chunks > 1 ? w + n * 16 * from : w + 16 * from;
                const int64_t stride = chunks > 1 ? 16 * size : w_stride;
                for (int64_t row = n * part / parts; row < n * (part + 1) / parts; row++) {
                    for (int64_t r = 0; r < m; r++) {
                        const int64_t b = r * blocks + from;
                        float out = row_scales(scales, s_dtype, row * s_stride + from / per_scale, per_scale, e + b,
                                               c + b, wd, size);
                        out += row_dot(weights + row * stride, hi + r * k + 32 * from, lo + r * k + 32 * from, wd,
                                       size);
                        if (chunks == 1) store_value(y, r * y_stride + row, y_dtype, out);
                        else partial[(j * n + row) * m + r] = out;
                    }
                }
            }
        }
        free(wd);
        if (chunks > 1) {
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t row = 0; row < n; row++) {
                for (int64_t r = 0; r < m; r++) {
                    float sum = 0.0f;
                    for (int64_t j = 0; j < chunks; j++) sum += partial[(j * n + row) * m + r];
                    store_value(y, r * y_stride + row, y_dtype, sum);
                }
            }
        }
    }
    free(hi), free(e), free(c), free(partial);
    return 0;
}

/* ---- RMSNorm and the residual add around it, rounded as the eager ops round ---------------------------------- */

static inline float rounded(float v, int dtype) { /* v rounded to dtype, as a float */
    if (dtype == DT_BF16) return bf16_to_f32(f32_to_bf16(v));
    if (dtype == DT_F16) return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
    return v;
}

/* 1 / rms(v) of one row, as common.RMSNorm: (mean of squares + eps) ^ -0.5 in fp32. */
static float inverse_rms(const float *v, int64_t dim, float eps) {
    float sum = 0.0f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= dim; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(v + i), _mm512_loadu_ps(v + i), acc);
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < dim; i++) sum += v[i] * v[i];
    return powf(sum / (float)dim + eps, -0.5f);
}

/* One row of dim values of dtype into v as floats; returns inverse_rms of it. */
static float load_inverse_rms(const void *x, int dtype, int64_t dim, float eps, float *v) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= dim; i += 16) _mm512_storeu_ps(v + i, load16(element(x, i, dtype), dtype));
#endif
    for (; i < dim; i++) v[i] = load_value(x, i, dtype);
    return inverse_rms(v, dim, eps);
}

/* fused.add_normed: new = (residual + norm(y)) [* scalar], each step rounded to dtype; h = next_norm(new) where
 * next_weight is given (else h is not written; it may be NULL); `factor` the scalar (1: none). */
void gemma4_add_rms_norm(const void *residual, const void *y, int dtype, int64_t rows, int64_t dim,
                         const void *weight, int w_dtype, float eps, float factor, const void *next_weight,
                         float next_eps, void *new_out, void *h_out) {
    float *v = malloc(sizeof(float) * (size_t)dim);
    const int64_t size = dtype == DT_F32 ? 4 : 2;
    for (int64_t r = 0; r < rows; r++) {
        const void *y_row = element(y, r * dim, dtype), *residual_row = element(residual, r * dim, dtype);
        char *new_row = (char *)new_out + r * dim * size, *h_row = h_out ? (char *)h_out + r * dim * size : NULL;
        const float inverse = load_inverse_rms(y_row, dtype, dim, eps, v);
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= dim; i += 16) { /* the scalar loop's operations, lane by lane */
            __m512 scaled = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(v + i), _mm512_set1_ps(inverse)),
                                          load16(element(weight, i, w_dtype), w_dtype));
            __m512 sum = _mm512_add_ps(load16(element(residual_row, i, dtype), dtype), round16(scaled, dtype));
            __m512 value = round16(_mm512_mul_ps(round16(sum, dtype), _mm512_set1_ps(factor)), dtype);
            _mm512_storeu_ps(v + i, value);
            store16(new_row + i * size, dtype, value);
        }
#endif
        for (; i < dim; i++) {
            float normed = rounded(v[i] * inverse * load_value(weight, i, w_dtype), dtype);
            float sum = rounded(load_value(residual_row, i, dtype) + normed, dtype);
            v[i] = rounded(sum * factor, dtype);
            store_value(new_row, i, dtype, v[i]);
        }
        if (!next_weight) continue;
        const float next_inverse = inverse_rms(v, dim, next_eps);
        i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= dim; i += 16) {
            __m512 normed = _mm512_mul_ps(_mm512_loadu_ps(v + i), _mm512_set1_ps(next_inverse));
            store16(h_row + i * size, dtype, _mm512_mul_ps(normed, load16(element(next_weight, i, w_dtype), w_dtype)));
        }
#endif
        for (; i < dim; i++) store_value(h_row, i, dtype, v[i] * next_inverse * load_value(next_weight, i, w_dtype));
    }
    free(v);
}

/* ---- attention of a few queries per row over gathered keys ---------------------------------------------------- */

/* Dot product of n values of a (fp32) and b (of dtype). */
static float dot_row(const float *a, const void *b, int dtype, int64_t n) {
    float sum = 0.0f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(element(b, i, dtype), dtype), acc);
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) sum += a[i] * load_value(b, i, dtype);
    return sum;
}

/* acc[0..n) += p x b (of dtype). */
static void add_scaled_row(float *acc, float p, const void *b, int dtype, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 scale = _mm512_set1_ps(p);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(acc + i,
                         _mm512_fmadd_ps(scale, load16(element(b, i, dtype), dtype), _mm512_loadu_ps(acc + i)));
#endif
    for (; i < n; i++) acc[i] += p * load_value(b, i, dtype);
}

/* The softmax of scores[0..n) (-inf: a key not seen, top: their largest) and the sum of the value rows it weighs into
 * acc [dim], in fp32 (scores are overwritten with the weights); value row j at values + rows[j] (rows NULL: j) rows of
 * dim values of dtype. Candidate `newest` (-1: none) is summed last, the others in order. Returns the softmax's total
 * (0: no key seen, acc left 0). */
static float weighted_values(float *scores, int64_t n, float top, int64_t newest, const char *values,
                             const int64_t *rows, int dtype, int64_t dim, float *acc) {
    const int64_t size = dtype == DT_F32 ? 4 : 2;
    float total = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const int64_t j = newest < 0 || i < newest ? i : (i < n - 1 ? i + 1 : newest);
        scores[j] = scores[j] != -INFINITY ? expf(scores[j] - top) : 0.0f;
        total += scores[j];
    }
    memset(acc, 0, sizeof(float) * (size_t)dim);
    for (int64_t i = 0; i < n; i++) {
        const int64_t j = newest < 0 || i < newest ? i : (i < n - 1 ? i + 1 : newest);
        if (scores[j] != 0.0f)
            add_scaled_row(acc, scores[j] / total, values + (rows ? rows[j] : j) * dim * size, dtype, dim);
    }
    return total;
}

/* attention.attend for few queries: q [B, H, Lq, D], k and v [B, Hkv, Lk, D], mask [B, Lq, Lk] (1: may attend),
 * all contiguous, of dtype; out [B, Lq, H * D]. Scores, softmax and the weighted sum in fp32 (scale 1), rounded once;
 * query head h reads KV head h / (H / Hkv). A row that may attend to nothing gives NaN, as softmax over -inf does. */
void gemma4_attend(const void *q, int dtype, int64_t batch, int64_t heads, int64_t lq, int64_t dim, const void *k,
                   const void *v, int64_t kv_heads, int64_t lk, const uint8_t *mask, void *out, int threads) {
    const int64_t group = heads / kv_heads, size = dtype == DT_F32 ? 4 : 2;
#pragma omp parallel num_threads(threads) if (batch * heads * lq * lk * dim >= (1 << 22))
    {
        float *query = malloc(sizeof(float) * (size_t)dim), *acc = malloc(sizeof(float) * (size_t)dim);
        float *scores = malloc(sizeof(float) * (size_t)lk);
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t h = 0; h < heads; h++) {
                const int64_t kv = b * kv_heads + h / group;
                const char *keys = (const char *)k + kv * lk * dim * size;
                const char *values = (const char *)v + kv * lk * dim * size;
                for (int64_t i = 0; i < lq; i++) {
                    const uint8_t *allowed = mask + (b * lq + i) * lk;
                    const int64_t from = ((b * heads + h) * lq + i) * dim;
                    for (int64_t d = 0; d < dim; d++) query[d] = load_value(q, from + d, dtype);
                    float top = -INFINITY;
                    for (int64_t j = 0; j < lk; j++) {
                        scores[j] = allowed[j] ? dot_row(query, keys + j * dim * size, dtype, dim) : -INFINITY;
                        top = fmaxf(top, scores[j]);
                    }
                    const float total = weighted_values(scores, lk, top, -1, values, NULL, dtype, dim, acc);
                    const int64_t row = (b * lq + i) * heads * dim + h * dim;
                    for (int64_t d = 0; d < dim; d++) store_value(out, row + d, dtype, total > 0.0f ? acc[d] : NAN);
                }
            }
        }
        free(query), free(acc), free(scores);
    }
}

/* ---- per-head RMSNorm then RoPE --------------------------------------------------------------------------------- */

/* One head's RMSNorm [* weight], rounded, then with cos/sin [dim] rotate-half RoPE rounded as the eager ops round:
 * x cos and rotate_half(x) sin each, then their sum. weight, cos, sin may be NULL. v [dim]: the result (values of
 * dtype, as floats). */
static void norm_rope_head(const void *x, int dtype, int64_t dim, const void *weight, int w_dtype, float eps,
                           const void *cos, const void *sin, float *v) {
    const int64_t half = dim / 2;
    const float inverse = load_inverse_rms(x, dtype, dim, eps, v);
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= dim; i += 16) {
        __m512 normed = _mm512_mul_ps(_mm512_loadu_ps(v + i), _mm512_set1_ps(inverse));
        if (weight) normed = _mm512_mul_ps(normed, load16(element(weight, i, w_dtype), w_dtype));
        _mm512_storeu_ps(v + i, round16(normed, dtype));
    }
#endif
    for (; i < dim; i++)
        v[i] = rounded(weight ? v[i] * inverse * load_value(weight, i, w_dtype) : v[i] * inverse, dtype);
    if (!cos) return;
    i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= half && half % 16 == 0; i += 16) { /* pairs (i, i + half) in place */
        __m512 first = _mm512_loadu_ps(v + i), second = _mm512_loadu_ps(v + i + half);
        __m512 cos_first = load16(element(cos, i, dtype), dtype), sin_first = load16(element(sin, i, dtype), dtype);
        __m512 cos_second = load16(element(cos, i + half, dtype), dtype);
        __m512 sin_second = load16(element(sin, i + half, dtype), dtype);
        __m512 minus_second = _mm512_castsi512_ps( /* -second, zeros' signs included */
            _mm512_xor_si512(_mm512_castps_si512(second), _mm512_set1_epi32(INT32_MIN)));
        _mm512_storeu_ps(v + i, round16(_mm512_add_ps(round16(_mm512_mul_ps(first, cos_first), dtype),
                                                      round16(_mm512_mul_ps(minus_second, sin_first), dtype)), dtype));
        _mm512_storeu_ps(v + i + half, round16(_mm512_add_ps(round16(_mm512_mul_ps(second, cos_second), dtype),
                                                             round16(_mm512_mul_ps(first, sin_second), dtype)), dtype));
    }
#endif
    for (; i < half; i++) { /* x cos and rotate_half(x) sin each rounded, then their sum */
        const float first = v[i], second = v[i + half];
        v[i] = rounded(rounded(first * load_value(cos, i, dtype), dtype) +
                       rounded(-second * load_value(sin, i, dtype), dtype), dtype);
        v[i + half] = rounded(rounded(second * load_value(cos, i + half, dtype), dtype) +
                              rounded(first * load_value(sin, i + half, dtype), dtype), dtype);
    }
}

/* text.norm_rope: x [B, L, H, D] -> out [B, H, L, D], each head through norm_rope_head with cos/sin [B, L, D] (or
 * NULL: the value norm). common.RMSNorm of rows is this with B = H = 1, without RoPE. */
void gemma4_norm_rope(const void *x, int dtype, int64_t batch, int64_t length, int64_t heads, int64_t dim,
                      const void *weight, int w_dtype, float eps, const void *cos, const void *sin, void *out) {
    float *v = malloc(sizeof(float) * (size_t)dim);
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t l = 0; l < length; l++) {
            const int64_t position = b * length + l;
            for (int64_t h = 0; h < heads; h++) {
                const int64_t in = (position * heads + h) * dim, to = ((b * heads + h) * length + l) * dim;
                norm_rope_head(element(x, in, dtype), dtype, dim, weight, w_dtype, eps,
                               cos ? element(cos, position * dim, dtype) : NULL,
                               sin ? element(sin, position * dim, dtype) : NULL, v);
                for (int64_t i = 0; i < dim; i++) store_value(out, to + i, dtype, v[i]);
            }
        }
    }
    free(v);
}

/* ---- a decode step's decoder layers in one call ------------------------------------------------------------------
 * text.DecoderLayer.forward for one token per row, every layer in turn, as its eager ops with the kernels above
 * compute it (same products, same roundings): a decode step's ~50 PyTorch ops and ~30 kernel calls per layer cost
 * about as much as its int4 products on a small CPU. K/V are written into the paged pools and read there in place,
 * through each row's candidate slots (model/paged_cache.py's in-place plan). Layers of 26B-A4B (experts) are not
 * taken here. Structures mirror kernels/cpu.py's ctypes ones field for field. */

struct int4_weight { /* gemma4_int4_matmul's operands: values [n, k / 2] bytes, scales [n, k / group] */
    const uint8_t *values;
    const void *scales;
    int64_t n, k, stride, scale_stride, group, scale_dtype, chunk; /* chunk: gemma4_int4_matmul's */
};

struct decode_layer {
    struct int4_weight qkv; /* q, k, v rows fused (q alone on KV-shared layers, q and k on K=V layers) */
    struct int4_weight o, gate_up, down, ple_gate, ple_projection; /* the last two unread without PLE */
    const void *q_norm, *k_norm, *post_attention_norm, *pre_feedforward_norm, *post_feedforward_norm,
        *post_ple_norm, *next_norm; /* next_norm: the next layer's input norm, or the final norm */
    const void *scalar; /* the layer scalar [1], of norm_dtype */
    int64_t norm_dtype;
    float eps;
    int64_t index, kv_source, full; /* kv_source: the layer whose pools it reads; full: 1 on global layers */
    int64_t heads, kv_heads, head_dim, width, ple_dim;
    int64_t writes_kv, has_value, has_ple; /* writes_kv 0 on KV-shared layers; has_value 0 on K=V layers */
};

struct decode_step {
    int64_t rows, hidden, dtype, threads, window, num_layers;
    void *x, *h; /* [rows, hidden]: the residual stream and input_layernorm(x), updated in place */
    const void *per_layer_inputs;                 /* [rows, num_layers, ple_dim] or NULL */
    const void *cos[2], *sin[2];                  /* [rows, head_dim] per layer type (0 sliding, 1 global) */
    const int64_t *query_positions, *num_keys;    /* [rows]; -1 / 0 on padding rows */
    const int64_t *write_slots[2];                /* [rows] flat pool slot of the new token */
    const int64_t *key_slots[2], *key_positions[2]; /* [rows, candidates]: pool slot and position of each */
    int64_t candidates[2];
    void **key_pools, **value_pools; /* per layer index: [kv_heads, pool_slots, head_dim] of dtype */
    const int64_t *pool_slots;
};

static void product(const struct int4_weight *w, const void *x, int dtype, int64_t m, void *y, int threads) {
    gemma4_int4_matmul(x, dtype, m, w->k, w->values, w->stride, w->scales, (int)w->scale_dtype, w->scale_stride,
                       w->group, w->n, y, dtype, w->n, w->chunk, threads);
}

#if defined(__AVX512F__)
/* e^x of 16 lanes, |x| <= 88: x = n ln 2 + r, |r| <= ln 2 / 2, e^r by Cephes expf's polynomial (within ~1 ulp). */
static inline __m512 exp16(__m512 x) {
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* tanh of 16 lanes, within a few fp32 ulps: its Taylor series to y^19 below |y| = 0.55 (the rest < 2^-30 there),
 * 1 - 2 / (e^2|y| + 1) with the sign above (no cancellation there: tanh > 0.5). */
static inline __m512 tanh16(__m512 y) {
    static const float taylor[] = {-2.3912911e-4f, 5.9002744e-4f, -1.4558344e-3f, 3.5921280e-3f, -8.8632355e-3f,
                                   2.1869489e-2f,  -5.3968254e-2f, 1.3333333e-1f,  -3.3333333e-1f}; /* y^19 .. y^3 */
    __m512 a = _mm512_abs_ps(y), y2 = _mm512_mul_ps(y, y);
    __m512 p = _mm512_set1_ps(taylor[0]);
    for (int i = 1; i < 9; i++) p = _mm512_fmadd_ps(p, y2, _mm512_set1_ps(taylor[i]));
    __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, y2), y, y);
    __m512 e = exp16(_mm512_min_ps(_mm512_add_ps(a, a), _mm512_set1_ps(40.0f)));
    __m512 large = _mm512_sub_ps(_mm512_set1_ps(1.0f),
                                 _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
    __m512i sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(INT32_MIN));
    large = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(large), sign));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0.55f), _CMP_LT_OQ), large, small);
}

#endif

/* fused.gated with the tanh gelu: act(gate) rounded, times up, rounded, each [rows, n] of dtype (row strides in
 * elements), into out [rows, n] (which may overlap gate and up where each row's output starts at or before its
 * gate and its up and ends before any later row's). act as F.gelu(approximate="tanh") on fp32 values, its tanh
 * within a few fp32 ulps of PyTorch's. */
void gemma4_gelu_gated(const void *gate, int64_t gate_stride, const void *up, int64_t up_stride, int dtype,
                       int64_t rows, int64_t n, void *out) {
    const float beta = 0.7978845608028654f, kappa = 0.044715f; /* sqrt(2 / pi) */
    const int64_t size = dtype == DT_F32 ? 4 : 2;
    for (int64_t r = 0; r < rows; r++) {
        const void *g_row = element(gate, r * gate_stride, dtype), *u_row = element(up, r * up_stride, dtype);
        char *o_row = (char *)out + r * n * size;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16) {
            __m512 g = load16(element(g_row, i, dtype), dtype);
            __m512 cube_term = _mm512_mul_ps(_mm512_set1_ps(kappa), _mm512_mul_ps(g, g));
            __m512 inner = _mm512_mul_ps(_mm512_set1_ps(beta), _mm512_fmadd_ps(cube_term, g, g));
            __m512 act = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g),
                                       _mm512_add_ps(_mm512_set1_ps(1.0f), tanh16(inner)));
            __m512 up_values = load16(element(u_row, i, dtype), dtype);
            store16(o_row + i * size, dtype, _mm512_mul_ps(round16(act, dtype), up_values));
        }
#endif
        for (; i < n; i++) {
            float g = load_value(g_row, i, dtype);
            float act = rounded(0.5f * g * (1.0f + tanhf(beta * (g + kappa * g * g * g))), dtype);
            store_value(o_row, i, dtype, act * load_value(u_row, i, dtype));
        }
    }
}

/* Attention of each row's query [heads, head_dim] (values of dtype, as floats) over its candidate keys in the pools,
 * out [rows, heads * head_dim] of dtype. Key j is visible iff 0 <= position <= the query's (and within the window on
 * sliding layers); scores, softmax and the weighted sum in fp32 (scale 1), rounded once. A row that sees nothing
 * (padding) gives zeros. The sums run over the candidates in order but the new token's key last (a ring holds it
 * among the others): the order in which the per-op path (paged_cache.py `update`, then `gemma4_attend`) gathers
 * them, so that both give the same bits. */
static void attend_pools(const struct decode_layer *layer, const struct decode_step *step, const float *query,
                         void *out) {
    const int type = (int)layer->full, dtype = (int)step->dtype, size = dtype == DT_F32 ? 4 : 2;
    const int64_t dim = layer->head_dim, heads = layer->heads, group = heads / layer->kv_heads;
    const int64_t candidates = step->candidates[type], slots = step->pool_slots[layer->kv_source];
    const int64_t window = type ? 0 : step->window;
    const char *keys = step->key_pools[layer->kv_source], *values = step->value_pools[layer->kv_source];
#pragma omp parallel num_threads((int)step->threads) if (heads * candidates * dim >= (1 << 16))
    {
        float *acc = malloc(sizeof(float) * (size_t)dim), *scores = malloc(sizeof(float) * (size_t)(candidates + 1));
#pragma omp for collapse(2) schedule(static)
        for (int64_t row = 0; row < step->rows; row++) {
            for (int64_t head = 0; head < heads; head++) {
                const int64_t query_position = step->query_positions[row];
                const int64_t n = step->num_keys[row] < candidates ? step->num_keys[row] : candidates;
                const int64_t *positions = step->key_positions[type] + row * candidates;
                const int64_t *at = step->key_slots[type] + row * candidates;
                const int64_t kv = head / group;
                const float *q = query + (row * heads + head) * dim;
                float top = -INFINITY;
                for (int64_t j = 0; j < n; j++) {
                    const int64_t p = positions[j];
                    const int visible = p >= 0 && p <= query_position && (!window || query_position - p < window);
                    scores[j] = visible ? dot_row(q, keys + (kv * slots + at[j]) * dim * size, dtype, dim) : -INFINITY;
                    top = fmaxf(top, scores[j]);
                }
                int64_t newest = -1; /* the candidate holding the new token's key, summed last */
                for (int64_t j = 0; j < n; j++) newest = at[j] == step->write_slots[type][row] ? j : newest;
                weighted_values(scores, n, top, newest, values + kv * slots * dim * size, at, dtype, dim, acc);
                for (int64_t d = 0; d < dim; d++) store_value(out, (row * heads + head) * dim + d, dtype, acc[d]);
            }
        }
        free(acc), free(scores);
    }
}

/* The new token's K and V of each row, from its projections (raw [kv_heads, head_dim] rows of dtype), into the
 * pools: k_norm and RoPE on keys, the weightless v_norm on values (of the raw keys on K=V layers). */
static void store_kv(const struct decode_layer *layer, const struct decode_step *step, const void *qkv) {
    const int dtype = (int)step->dtype, type = (int)layer->full;
    const int64_t dim = layer->head_dim, q_size = layer->heads * dim, kv_size = layer->kv_heads * dim;
    const int64_t slots = step->pool_slots[layer->index];
    float *v = malloc(sizeof(float) * (size_t)dim);
    for (int64_t row = 0; row < step->rows; row++) {
        const int64_t slot = step->write_slots[type][row];
        const void *cos = element(step->cos[type], row * dim, dtype), *sin = element(step->sin[type], row * dim, dtype);
        const int64_t from = row * layer->qkv.n + q_size;
        for (int64_t head = 0; head < layer->kv_heads; head++) {
            const int64_t to = (head * slots + slot) * dim;
            norm_rope_head(element(qkv, from + head * dim, dtype), dtype, dim, layer->k_norm, (int)layer->norm_dtype,
                           layer->eps, cos, sin, v);
            for (int64_t i = 0; i < dim; i++) store_value(step->key_pools[layer->index], to + i, dtype, v[i]);
            const int64_t value_from = from + (layer->has_value ? kv_size : 0) + head * dim;
            norm_rope_head(element(qkv, value_from, dtype), dtype, dim, NULL, 0, layer->eps, NULL, NULL, v);
            for (int64_t i = 0; i < dim; i++) store_value(step->value_pools[layer->index], to + i, dtype, v[i]);
        }
    }
    free(v);
}

static void decode_layer(const struct decode_layer *layer, const struct decode_step *step) {
    const int dtype = (int)step->dtype, threads = (int)step->threads, norms = (int)layer->norm_dtype;
    const int64_t m = step->rows, hidden = step->hidden, dim = layer->head_dim, size = dtype == DT_F32 ? 4 : 2;
    const int64_t q_size = layer->heads * dim, width = layer->width, type = layer->full;
    const float scalar = load_value(layer->scalar, 0, norms);
    char *qkv = malloc((size_t)(m * layer->qkv.n * size)), *attention = malloc((size_t)(m * q_size * size));
    char *projected = malloc((size_t)(m * hidden * size)), *gate_up = malloc((size_t)(m * 2 * width * size));
    float *query = malloc(sizeof(float) * (size_t)(m * q_size));

    /* attention: q/k/v of h; the new K/V into the pools; the query's heads normed and rotated */
    product(&layer->qkv, step->h, dtype, m, qkv, threads);
    if (layer->writes_kv) store_kv(layer, step, qkv);
    for (int64_t row = 0; row < m; row++) {
        for (int64_t head = 0; head < layer->heads; head++)
            norm_rope_head(element(qkv, row * layer->qkv.n + head * dim, dtype), dtype, dim, layer->q_norm, norms,
                           layer->eps, element(step->cos[type], row * dim, dtype),
                           element(step->sin[type], row * dim, dtype), query + (row * layer->heads + head) * dim);
    }
    attend_pools(layer, step, query, attention);
    /* x += post_attention_norm(o(attention)); h = pre_feedforward_norm(x) */
    product(&layer->o, attention, dtype, m, projected, threads);
    gemma4_add_rms_norm(step->x, projected, dtype, m, hidden, layer->post_attention_norm, norms, layer->eps, 1.0f,
                        layer->pre_feedforward_norm, layer->eps, step->x, step->h);
    /* x += post_feedforward_norm(down(act(gate(h)) * up(h))) [* scalar, then h = next_norm(x), without PLE] */
    product(&layer->gate_up, step->h, dtype, m, gate_up, threads);
    gemma4_gelu_gated(gate_up, 2 * width, gate_up + width * size, 2 * width, dtype, m, width, gate_up); /* in place */
    product(&layer->down, gate_up, dtype, m, projected, threads);
    gemma4_add_rms_norm(step->x, projected, dtype, m, hidden, layer->post_feedforward_norm, norms, layer->eps,
                        layer->has_ple ? 1.0f : scalar, layer->has_ple ? NULL : layer->next_norm, layer->eps,
                        step->x, step->h);
    if (layer->has_ple) {
        /* x = (x + post_ple_norm(projection(act(gate(x)) * per_layer_input))) * scalar; h = next_norm(x) */
        const int64_t ple = layer->ple_dim;
        char *gated = malloc((size_t)(m * ple * size));
        product(&layer->ple_gate, step->x, dtype, m, gated, threads);
        const void *inputs = element(step->per_layer_inputs, layer->index * ple, dtype); /* row stride: all layers' */
        gemma4_gelu_gated(gated, ple, inputs, step->num_layers * ple, dtype, m, ple, gated);
        product(&layer->ple_projection, gated, dtype, m, projected, threads);
        gemma4_add_rms_norm(step->x, projected, dtype, m, hidden, layer->post_ple_norm, norms, layer->eps,
                            scalar, layer->next_norm, layer->eps, step->x, step->h);
        free(gated);
    }
    free(qkv), free(attention), free(projected), free(gate_up), free(query);
}

void gemma4_decode_layers(const struct decode_layer *layers, int64_t count, const struct decode_step *step) {
    for (int64_t i = 0; i < count; i++) decode_layer(layers + i, step);
}
