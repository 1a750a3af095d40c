/* Compiled passes over activations for the CPU bf16 path, one pass where eager PyTorch
 * makes several, each reading and writing memory:
 *
 * - the gated MLP's silu(gate) * up and its backward (two eager passes forward, four
 *   backward);
 * - Llama's RMSNorm over the float32 residual stream, returning bf16, and the input
 *   gradient of its closed-form backward (pow, mean, rsqrt, two products and a cast
 *   forward; a product, a cast, a row dot product and three passes backward);
 * - a LoRA layer's adapter products and dropout (four passes);
 * - the rotary position embedding and its input gradient.
 *
 * Values are widened to float32 and computed in registers; results are rounded once to bf16
 * (round to nearest even, as torch; the AVX-512 BF16 LoRA and attention kernels flush
 * float32 subnormals to zero, see narrow_m512), except where noted to keep eager's forward
 * values.
 * bf16 is passed as its 16 raw bits (uint16_t); arrays are row-major and contiguous, except
 * where a function takes strides (pb_rotary). Compiled at first use by
 * peftbench/training/compiled_c.py (plain C, no torch headers); the wrappers are in
 * cpu_kernels.py. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* below this many elements one thread does the work (OpenMP's start costs more) */
#define PB_PARALLEL_MIN 32768

static inline float bf16_to_float(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u); /* NaN stays a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u);          /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

/* e^x with x clamped to [-87, 88] (a normal float result); relative error below 3e-7.
 * 2^t = 2^n 2^f with n = round(t), |f| <= 1/2, and 2^f by its degree-7 Taylor polynomial.
 * Written with plain arithmetic so that the loops below vectorise. */
/* n = round(x log2 e) and p = 2^(x log2 e - n) for x a float or a vector of floats (one
 * definition, so that exp_clamped and its 16-lane version round alike) */
#define PB_EXP_PARTS(x, n, p)                                                                \
    do {                                                                                     \
        __typeof__(x) pb_t = (x) * 1.44269504088896341f;                                     \
        (n) = (pb_t + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */         \
        __typeof__(x) pb_f = pb_t - (n);                                                     \
        (p) = pb_f * 1.5252733e-5f + 1.5403530e-4f;                                          \
        (p) = (p) * pb_f + 1.3333558e-3f;                                                    \
        (p) = (p) * pb_f + 9.6181291e-3f;                                                    \
        (p) = (p) * pb_f + 5.5504109e-2f;                                                    \
        (p) = (p) * pb_f + 2.4022651e-1f;                                                    \
        (p) = (p) * pb_f + 6.9314718e-1f;                                                    \
        (p) = (p) * pb_f + 1.0f;                                                             \
    } while (0)

static inline float exp_clamped(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n, p;
    PB_EXP_PARTS(x, n, p);
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* silu(x) = x / (1 + e) with e = exp(-x), rounded to bf16 and widened again: the value
 * eager bf16 keeps for silu's output, and the one both directions below multiply by */
static inline float silu_rounded(float x, float e) {
    return bf16_to_float(float_to_bf16(x / (1.0f + e)));
}

static inline int thread_number(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int thread_count(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* out = silu(gate) * up, with silu(gate) rounded to bf16 before the product, as eager bf16
 * computes it: the forward keeps eager's values (a product rounded once measured a step-1
 * prompt-tuning gradient 6.2 % from fp32's against eager's 2.7 % on SmolLM2) */
void pb_silu_mul(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t n,
                 int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (n >= PB_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        float x = bf16_to_float(gate[i]);
        out[i] = float_to_bf16(silu_rounded(x, exp_clamped(-x)) * bf16_to_float(up[i]));
    }
}

/* grad_gate = grad * up * silu'(gate), grad_up = grad * silu(gate) (silu's bf16 value, the
 * one the forward multiplied by), with silu'(x) = s (1 + x (1 - s)) and s = sigmoid(x), as
 * torch's silu_backward; each rounded once */
void pb_silu_mul_backward(const uint16_t *grad, const uint16_t *gate, const uint16_t *up,
                          uint16_t *grad_gate, uint16_t *grad_up, int64_t n, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (n >= PB_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        float x = bf16_to_float(gate[i]), g = bf16_to_float(grad[i]);
        float e = exp_clamped(-x), s = 1.0f / (1.0f + e);
        grad_up[i] = float_to_bf16(g * silu_rounded(x, e));
        grad_gate[i] = float_to_bf16(g * bf16_to_float(up[i]) * s * (1.0f + x * (1.0f - s)));
    }
}

/* sum of a[j] * b[j] over j < n in float32, in 16 lanes (vectorises without reordering
 * flags; the same order on every machine and thread count) */
static inline float dot16(const float *a, const float *b, int64_t n) {
    float lanes[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int k = 0; k < 16; k++)
            lanes[k] += a[j + k] * b[j + k];
    float sum = 0.0f;
    for (int k = 0; k < 16; k++)
        sum += lanes[k];
    for (; j < n; j++)
        sum += a[j] * b[j];
    return sum;
}

/* per row of x (rows x cols, float32): scale = 1 / sqrt(mean(x^2) + eps) and
 * out = bf16(weight * x * scale) */
void pb_rms_norm(const float *x, const float *weight, uint16_t *out, float *scale,
                 int64_t rows, int64_t cols, float eps, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols >= PB_PARALLEL_MIN)
    for (int64_t i = 0; i < rows; i++) {
        const float *row = x + i * cols;
        float r = 1.0f / sqrtf(dot16(row, row, cols) / (float)cols + eps);
        uint16_t *o = out + i * cols;
        for (int64_t j = 0; j < cols; j++)
            o[j] = float_to_bf16(weight[j] * (row[j] * r));
        scale[i] = r;
    }
}

/* the input gradient of pb_rms_norm, given the gradient of its output (bf16):
 * g_n = weight * grad, grad_x = scale * (g_n - x * scale^2 * mean(g_n * x)) (float32);
 * work holds cols floats per thread */
void pb_rms_norm_backward(const uint16_t *grad, const float *x, const float *weight,
                          const float *scale, float *grad_x, int64_t rows, int64_t cols,
                          float *work, int threads) {
    #pragma omp parallel num_threads(threads) if (rows * cols >= PB_PARALLEL_MIN)
    {
        float *g_n = work + (int64_t)thread_number() * cols;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            const float *row = x + i * cols;
            const uint16_t *g = grad + i * cols;
            for (int64_t j = 0; j < cols; j++)
                g_n[j] = weight[j] * bf16_to_float(g[j]);
            float r = scale[i];
            float coef = dot16(g_n, row, cols) * r * r / (float)cols;
            float *gx = grad_x + i * cols;
            for (int64_t j = 0; j < cols; j++)
                gx[j] = r * (g_n[j] - row[j] * coef);
        }
    }
}

/* ---- LoRA: the adapter's rank-r products around the frozen base matmul ----
 *
 * x (m x k, bf16) is the layer input, a (r x k) and b (n x r) the adapter's A and B as
 * stored (float32), scale the factor of B (LoRA's scaling over the dropout's 1 - p); the
 * base product x W^T (m x n, bf16) comes from torch. Dropout over the adapter's input is
 * drawn here: element (i, c) is kept when a hash of its flat index i * k + c and the call's
 * seed is at least threshold = p * 2^32 (kept as bits for the backward, or drawn again:
 * below).
 *
 * The products are bf16 ones, as under autocast: A and B are rounded to bf16 (into the
 * kernels' work buffers; the PyTorch fallback in fused_lora_bf16.py rounds scale * B and
 * its gradient products' results too), and so are the rank-r results hidden = x' A^T and grad_hidden = scale g B (kept as float32
 * arrays of bf16 values); products are summed in float32, and each bf16 output is rounded
 * once. Two implementations compute this:
 *
 * - with AVX-512 BF16 (PB_DPBF16): vdpbf16ps, 16 float32 sums of two bf16 products each
 *   per instruction. Sums along x's or g's rows (x' A^T, g B) take 32 columns of a row;
 *   sums over rows (A's and B's gradients) take two rows, interleaved into pairs; sums over
 *   the rank (the adapter's output and its input gradient) read B and A laid out as pairs of
 *   rank entries (bp, ap). Rows go in pairs; columns past the last multiple of 32 (16) are
 *   masked.
 * - elsewhere: GCC/Clang vector extensions (16 floats; the compiler splits them where
 *   registers are narrower), float32 multiply-adds of the same rounded operands, P rows at
 *   a time so that each vector of A, B^T or of a partial sum that is loaded serves P rows,
 *   instantiated for r = 4, 8 and 16 (everything unrolled) and once for any other r;
 *   columns past the last multiple of 16 one at a time.
 *
 * Both give the same values up to the order of float32 sums (and the AVX-512 BF16
 * instructions' flushing of subnormals to zero: vdpbf16ps's inputs, vcvtneps2bf16's
 * results). With dropout, pb_lora_down
 * stores the mask in bits (a bit per element, rows of (k + 31) / 32 words) where the
 * backward's pb_lora_grad_input reads it (AVX-512 BF16); the portable kernels leave bits
 * alone and draw the mask again. Work buffers: r k floats for
 * pb_lora_down, r n for pb_lora_up_add, r n more per thread for pb_lora_grad_hidden and
 * r k more per thread for pb_lora_grad_input. */

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__) &&             \
    !defined(PB_NO_DPBF16)
#define PB_DPBF16 1
#include <immintrin.h>
#else
#define PB_DPBF16 0
#endif

/* 1 when compiled with AVX-512 BF16 instructions (the LoRA kernels use them, and the
 * attention kernels exist), else 0 */
int pb_has_dpbf16(void) { return PB_DPBF16; }

typedef float pb_vf __attribute__((vector_size(64)));
typedef float pb_vf_u __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint32_t pb_vu __attribute__((vector_size(64)));
typedef uint16_t pb_vh __attribute__((vector_size(32)));
typedef uint16_t pb_vh_u __attribute__((vector_size(32), aligned(2), may_alias));
#define PB_LANES 16
#define PB_INLINE static inline __attribute__((always_inline))
/* before a loop over the rank (or a block's rows): unrolled while the compiler still sees
 * the arrays it indexes, so their elements become registers. Without it GCC 12 kept the
 * accumulators of dot_rows_dp in registers and also stored all of them to the stack on
 * every iteration (pb_lora_down without dropout x1.68 with it, hot, one thread). */
#define PB_UNROLL _Pragma("GCC unroll 16")
/* the largest LoRA rank the kernels take: their per-rank arrays have this fixed size (a
 * variable-length array stays in memory however small r is); pb_lora_max_rank tells the
 * caller, which keeps PyTorch's operations above it */
#define PB_MAX_RANK 64
#define PB_MAX_PAIRS (PB_MAX_RANK / 2)
int pb_lora_max_rank(void) { return PB_MAX_RANK; }

PB_INLINE pb_vf load16(const float *p) { return *(const pb_vf_u *)p; }
PB_INLINE void store16(float *p, pb_vf v) { *(pb_vf_u *)p = v; }
#if (defined(__clang__) || __GNUC__ >= 9) && !defined(PB_NO_CONVERTVECTOR)
PB_INLINE pb_vf widen_bits(pb_vh h) { return (pb_vf)(__builtin_convertvector(h, pb_vu) << 16); }
/* as float_to_bf16, 16 at a time */
PB_INLINE pb_vh narrow_bits(pb_vf f) {
    pb_vu u = (pb_vu)f;
    pb_vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    pb_vu nan = (pb_vu)((u & 0x7fffffffu) > 0x7f800000u);
    pb_vu bits = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
    return __builtin_convertvector(bits, pb_vh);
}
#else /* compilers without __builtin_convertvector (GCC before 9): lane by lane */
PB_INLINE pb_vf widen_bits(pb_vh h) {
    pb_vf v;
    for (int l = 0; l < 16; l++)
        v[l] = bf16_to_float(h[l]);
    return v;
}
PB_INLINE pb_vh narrow_bits(pb_vf f) {
    pb_vh h;
    for (int l = 0; l < 16; l++)
        h[l] = float_to_bf16(f[l]);
    return h;
}
#endif
PB_INLINE pb_vf widen16(const uint16_t *p) { return widen_bits(*(const pb_vh_u *)p); }
PB_INLINE void narrow16(uint16_t *p, pb_vf f) { *(pb_vh_u *)p = narrow_bits(f); }
PB_INLINE float sum16(pb_vf v) {
    float s = 0.0f;
    for (int l = 0; l < PB_LANES; l++)
        s += v[l];
    return s;
}

/* f rounded to the nearest bf16, as a float */
static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

/* lowbias32 (C. Wellons): a bijective 32-bit mixer with full avalanche; one definition
 * for a scalar and for 16 lanes, so the vector loops and the tail columns draw one mask */
#define PB_LOWBIAS32(x)                                                                      \
    do {                                                                                     \
        (x) ^= (x) >> 16;                                                                    \
        (x) *= 0x7feb352du;                                                                  \
        (x) ^= (x) >> 15;                                                                    \
        (x) *= 0x846ca68bu;                                                                  \
        (x) ^= (x) >> 16;                                                                    \
    } while (0)
static inline uint32_t mix32(uint32_t x) {
    PB_LOWBIAS32(x);
    return x;
}
PB_INLINE pb_vu mix32v(pb_vu x) {
    PB_LOWBIAS32(x);
    return x;
}

/* whether the dropout keeps element index of a call: mix32 of the index offset by the
 * seed's low word, mixed with its high word, at least the threshold */
static inline int pb_keep(uint32_t index, uint64_t seed, uint32_t threshold) {
    return threshold == 0 ||
           mix32(mix32(index + (uint32_t)seed) ^ (uint32_t)(seed >> 32)) >= threshold;
}
/* the keep mask (all bits set where kept) of indices first .. first + 15 */
PB_INLINE pb_vu keep16(uint32_t first, uint64_t seed, uint32_t threshold) {
    const pb_vu lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    pb_vu h = mix32v(mix32v(first + lanes + (uint32_t)seed) ^ (uint32_t)(seed >> 32));
    return (pb_vu)(h >= threshold);
}

/* this thread's zeroed share (size floats) of a work buffer of per-thread partial sums */
static inline float *thread_partial(float *work, int64_t size) {
    float *partial = work + (int64_t)thread_number() * size;
    memset(partial, 0, sizeof(float) * (size_t)size);
    return partial;
}

/* out = the sum of parts arrays of size floats, part t at partials + t * stride, added
 * in thread order */
static void sum_partials(const float *partials, int64_t stride, float *out, int64_t size,
                         int parts) {
    for (int64_t e = 0; e < size; e++) {
        float s = 0.0f;
        for (int t = 0; t < parts; t++)
            s += partials[(int64_t)t * stride + e];
        out[e] = s;
    }
}

/* dst (cols x rows) = scale * src^T for src (rows x cols) */
static void scaled_transpose(const float *src, float scale, int64_t rows, int64_t cols,
                             float *dst) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++)
            dst[j * rows + i] = scale * src[i * cols + j];
}

/* the dropout mask of a call (1 kept, 0 dropped), for tests and references */
void pb_lora_mask(uint8_t *keep, int64_t m, int64_t k, uint64_t seed, uint32_t threshold) {
    for (int64_t e = 0; e < m * k; e++)
        keep[e] = (uint8_t)pb_keep((uint32_t)e, seed, threshold);
}

/* the rows per block of the implementation below for rank r */
#define PB_BLOCK_ROWS(r)                                                                     \
    ((r) == 4 ? PB_ROWS_4 : (r) == 8 ? PB_ROWS_8 : (r) == 16 ? PB_ROWS_16 : PB_ROWS_ANY)

/* CALL(R, ROWS(R), I0) with R a constant for r = 4, 8 and 16 (the rows functions are
 * inlined into the OpenMP region and unrolled) and r itself otherwise */
#define PB_FOR_RANK(r, CALL, ROWS, I0)                                                       \
    do {                                                                                     \
        if ((r) == 4)                                                                        \
            CALL(4, ROWS(4), I0);                                                            \
        else if ((r) == 8)                                                                   \
            CALL(8, ROWS(8), I0);                                                            \
        else if ((r) == 16)                                                                  \
            CALL(16, ROWS(16), I0);                                                          \
        else                                                                                 \
            CALL(r, ROWS(r), I0);                                                            \
    } while (0)

/* Inside an OpenMP region: CALL(r, P, i0) for every block of P = PB_BLOCK_ROWS(r) rows
 * from row i0, shared among the threads (P a constant too, through PB_FOR_RANK); then
 * CALL(r, 1, i) for each row left over. */
#define PB_FOR_BLOCKS(m, r, CALL)                                                            \
    do {                                                                                     \
        const int64_t pb_blocks = (m) / PB_BLOCK_ROWS(r);                                    \
        _Pragma("omp for schedule(static)")                                                  \
        for (int64_t pb_block = 0; pb_block < pb_blocks; pb_block++)                         \
            PB_FOR_RANK(r, CALL, PB_BLOCK_ROWS, pb_block * PB_BLOCK_ROWS(r));                \
        _Pragma("omp for schedule(static)")                                                  \
        for (int64_t pb_row = pb_blocks * PB_BLOCK_ROWS(r); pb_row < (m); pb_row++)          \
            CALL(r, 1, pb_row);                                                              \
    } while (0)

#define PB_ROW_BLOCK 16
/* the rows of the block of PB_ROW_BLOCK that starts at row i of m (0 past the end) */
static inline int next_rows(int64_t m, int64_t i) {
    return (int)(m - i <= 0 ? 0 : m - i < PB_ROW_BLOCK ? m - i : PB_ROW_BLOCK);
}
#define PB_THESE_ROWS(R) pb_rows
/* Inside an OpenMP region: CALL(r, rows, i0) for consecutive blocks of PB_ROW_BLOCK rows
 * from row i0 (the last one shorter: rows is not a constant), shared among the threads,
 * r a constant through PB_FOR_RANK */
#define PB_FOR_ROW_BLOCKS(m, r, CALL)                                                        \
    do {                                                                                     \
        const int64_t pb_blocks = ((m) + PB_ROW_BLOCK - 1) / PB_ROW_BLOCK;                   \
        _Pragma("omp for schedule(static)")                                                  \
        for (int64_t pb_block = 0; pb_block < pb_blocks; pb_block++) {                       \
            const int pb_rows = next_rows(m, pb_block * PB_ROW_BLOCK);                       \
            PB_FOR_RANK(r, CALL, PB_THESE_ROWS, pb_block * PB_ROW_BLOCK);                    \
        }                                                                                    \
    } while (0)

#if PB_DPBF16
/* ---- AVX-512 BF16 ---- */

typedef uint32_t pb_pair; /* two bf16: the first in the low half */

static inline pb_pair bf16_pair(float first, float second) {
    return (pb_pair)float_to_bf16(first) | (pb_pair)float_to_bf16(second) << 16;
}
/* acc + the products of a's and b's bf16 pairs, lane by lane */
PB_INLINE __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
/* the columns c .. c + 31 (c .. c + 15) that exist among width */
PB_INLINE __mmask32 valid32(int64_t c, int64_t width) {
    return width - c >= 32 ? (__mmask32)0xffffffffu : ((__mmask32)1 << (width - c)) - 1;
}
PB_INLINE __mmask16 valid16(int64_t c, int64_t width) {
    return width - c >= 16 ? (__mmask16)0xffffu : (__mmask16)(((uint32_t)1 << (width - c)) - 1);
}
/* the dropout's keep mask of flat indices first .. first + 31 */
PB_INLINE __mmask32 keep32(uint32_t first, uint64_t seed, uint32_t threshold) {
    __m512i low = (__m512i)keep16(first, seed, threshold);
    __m512i high = (__m512i)keep16(first + 16, seed, threshold);
    return (__mmask32)_mm512_test_epi32_mask(low, low) |
           (__mmask32)_mm512_test_epi32_mask(high, high) << 16;
}
PB_INLINE __m512 widen_m256(__m256i h) { return (__m512)widen_bits((pb_vh)h); }
/* rounded to bf16 by vcvtneps2bf16 (one instruction, where narrow_bits takes about eight):
 * to nearest even, NaN kept quiet, as float_to_bf16, except that float32 subnormal inputs
 * become signed zero (float_to_bf16 rounds them, the largest up to FLT_MIN): in the LoRA
 * kernels' outputs and the attention's P and dS (a probability below 1.2e-38 becomes 0) */
PB_INLINE __m256i narrow_m512(__m512 f) { return (__m256i)_mm512_cvtneps_pbh(f); }

/* the pairs (r0[t], r1[t]) of two rows of 32 bf16: t < 16 into low, the rest into high */
PB_INLINE void interleave(__m512i r0, __m512i r1, __m512i *low, __m512i *high) {
    static const uint16_t low_index[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                           37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                           11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    static const uint16_t high_index[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                            53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                            27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
    *low = _mm512_permutex2var_epi16(r0, _mm512_loadu_si512(low_index), r1);
    *high = _mm512_permutex2var_epi16(r0, _mm512_loadu_si512(high_index), r1);
}

/* partial[0 .. 32) (only the valid columns) += the products of the row pairs low / high
 * (columns 0-15 / 16-31) with the pair of factors f */
PB_INLINE void add_pair_products(float *partial, __mmask32 valid, __m512i low, __m512i high,
                                 __m512i f) {
    __mmask16 first = (__mmask16)valid, second = (__mmask16)(valid >> 16);
    __m512 p = _mm512_maskz_loadu_ps(first, partial);
    _mm512_mask_storeu_ps(partial, first, dot_pairs(p, low, f));
    if (second) {
        p = _mm512_maskz_loadu_ps(second, partial + 16);
        _mm512_mask_storeu_ps(partial + 16, second, dot_pairs(p, high, f));
    }
}

/* dst (rows x cols) = src rounded to bf16 */
static void bf16_copy(const float *src, int64_t rows, int64_t cols, uint16_t *dst) {
    for (int64_t e = 0; e < rows * cols; e++)
        dst[e] = float_to_bf16(src[e]);
}
/* dst (cols x rows) = src^T rounded to bf16 */
static void bf16_transpose(const float *src, int64_t rows, int64_t cols, uint16_t *dst) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++)
            dst[j * rows + i] = float_to_bf16(src[i * cols + j]);
}
/* dst ((r + 1) / 2 x width) = pairs (w(2 jp, c), w(2 jp + 1, c)) of a rank-r matrix w,
 * element (j, c) at src[j * js + c * cs], rounded to bf16 (the second 0 past r) */
static void rank_pairs(const float *src, int64_t js, int64_t cs, int64_t r, int64_t width,
                       pb_pair *dst) {
    for (int64_t jp = 0; 2 * jp < r; jp++)
        for (int64_t c = 0; c < width; c++)
            dst[jp * width + c] =
                bf16_pair(src[2 * jp * js + c * cs],
                          2 * jp + 1 < r ? src[(2 * jp + 1) * js + c * cs] : 0.0f);
}

/* 32 bf16 of row i (width columns) from column c: those past width and, with drop, the
 * dropped ones 0; *keep receives the kept and valid columns. With drop the mask is drawn
 * and, when bits is given, stored there: a bit per element, rows of (width + 31) / 32
 * words (row16 reads it). */
PB_INLINE __m512i row32(const uint16_t *x, int64_t i, int64_t c, int64_t width,
                        uint64_t seed, uint32_t threshold, int drop, uint32_t *bits,
                        __mmask32 *keep) {
    __mmask32 valid = valid32(c, width);
    if (drop) {
        valid &= keep32((uint32_t)(i * width + c), seed, threshold);
        if (bits != NULL)
            bits[i * ((width + 31) / 32) + c / 32] = (uint32_t)valid;
    }
    *keep = valid;
    return _mm512_maskz_loadu_epi16(valid, x + i * width + c);
}

/* For rows i0 .. i0 + rows (1 or 2) of x (m x k, bf16, dropped where drop is set; the
 * mask stored in bits when given): sums = round(scale x' w^T), w (r x k, bf16). With h
 * (m x r, bf16 values) and partial (r x k), also partial += h^T x' (h's rows i0 .. i0 +
 * rows). */
PB_INLINE void dot_rows_dp(const uint16_t *restrict x, const uint16_t *restrict w,
                           float scale, float *restrict sums, int64_t i0, int64_t k,
                           const int64_t r, const int rows, uint64_t seed,
                           uint32_t threshold, int drop, uint32_t *restrict bits,
                           const float *restrict h, float *restrict partial) {
    __m512 s[2][PB_MAX_RANK];
    pb_pair hp[PB_MAX_RANK];
    PB_UNROLL
    for (int64_t j = 0; j < r; j++) {
        s[0][j] = s[1][j] = _mm512_setzero_ps();
        if (partial != NULL)
            hp[j] = bf16_pair(h[i0 * r + j], rows == 2 ? h[(i0 + 1) * r + j] : 0.0f);
    }
    for (int64_t c = 0; c < k; c += 32) {
        __mmask32 valid = valid32(c, k), keep;
        __m512i v[2];
        v[1] = _mm512_setzero_si512();
        PB_UNROLL
        for (int q = 0; q < rows; q++)
            v[q] = row32(x, i0 + q, c, k, seed, threshold, drop, bits, &keep);
        PB_UNROLL
        for (int64_t j = 0; j < r; j++) {
            __m512i wj = _mm512_maskz_loadu_epi16(valid, w + j * k + c);
            PB_UNROLL
            for (int q = 0; q < rows; q++)
                s[q][j] = dot_pairs(s[q][j], v[q], wj);
        }
        if (partial != NULL) {
            __m512i low, high;
            interleave(v[0], v[1], &low, &high);
            PB_UNROLL
            for (int64_t j = 0; j < r; j++)
                add_pair_products(partial + j * k + c, valid, low, high,
                                  _mm512_set1_epi32((int)hp[j]));
        }
    }
    PB_UNROLL
    for (int q = 0; q < rows; q++)
        PB_UNROLL
        for (int64_t j = 0; j < r; j++)
            sums[(i0 + q) * r + j] = round_bf16(scale * _mm512_reduce_add_ps(s[q][j]));
}

/* f (rows x (r + 1) / 2) = the rank pairs (h[q][2 jp], h[q][2 jp + 1]) of rows q < rows of
 * h (r values per row), the second 0 past r */
static inline void rank_pair_factors(const float *h, int64_t r, int rows, pb_pair *f) {
    const int64_t pairs = (r + 1) / 2;
    PB_UNROLL
    for (int q = 0; q < rows; q++)
        PB_UNROLL
        for (int64_t jp = 0; jp < pairs; jp++)
            f[q * pairs + jp] = bf16_pair(h[q * r + 2 * jp],
                                          2 * jp + 1 < r ? h[q * r + 2 * jp + 1] : 0.0f);
}

/* acc[q] (q < rows) = the float32 sums over the rank of f's row q (rank_pair_factors)
 * times w's rank-pair rows (width columns) at columns c .. c + 15, the valid ones */
PB_INLINE void rank_pair_sums(const pb_pair *restrict w, int64_t width, int64_t c,
                              __mmask16 valid, const pb_pair *restrict f, int64_t pairs,
                              int rows, __m512 acc[2]) {
    acc[0] = acc[1] = _mm512_setzero_ps();
    PB_UNROLL
    for (int64_t jp = 0; jp < pairs; jp++) {
        __m512i wv = _mm512_maskz_loadu_epi32(valid, w + jp * width + c);
        PB_UNROLL
        for (int q = 0; q < rows; q++)
            acc[q] = dot_pairs(acc[q], _mm512_set1_epi32((int)f[q * pairs + jp]), wv);
    }
}

/* out[i0 .. i0 + rows) += scale * h bp (h: hidden's rows, bp: B's rank pairs), rounded once */
PB_INLINE void up_rows_dp(uint16_t *restrict out, const float *restrict hidden,
                          const pb_pair *restrict bp, float scale, int64_t i0, int64_t n,
                          const int64_t r, const int rows) {
    const int64_t pairs = (r + 1) / 2;
    pb_pair hp[2 * PB_MAX_PAIRS];
    rank_pair_factors(hidden + i0 * r, r, rows, hp);
    const __m512 factor = _mm512_set1_ps(scale);
    for (int64_t c = 0; c < n; c += 16) {
        __mmask16 valid = valid16(c, n);
        __m512 acc[2];
        rank_pair_sums(bp, n, c, valid, hp, pairs, rows, acc);
        PB_UNROLL
        for (int q = 0; q < rows; q++) {
            uint16_t *o = out + (i0 + q) * n + c;
            __m512 v = widen_m256(_mm256_maskz_loadu_epi16(valid, o));
            _mm256_mask_storeu_epi16(o, valid, narrow_m512(_mm512_fmadd_ps(factor, acc[q], v)));
        }
    }
}

/* 16 bf16 of row i (width columns) from column c, a multiple of 16: those past width and,
 * with drop, the dropped ones 0; *keep receives the kept and valid columns. The mask is read
 * from bits when given (rows of (width + 31) / 32 words), else drawn. */
PB_INLINE __m256i row16(const uint16_t *x, int64_t i, int64_t c, int64_t width,
                        uint64_t seed, uint32_t threshold, int drop,
                        const uint32_t *bits, __mmask16 *keep) {
    __mmask16 valid = valid16(c, width);
    if (drop) {
        if (bits != NULL)
            valid &= (__mmask16)(bits[i * ((width + 31) / 32) + c / 32] >> (c & 16));
        else {
            __m512i drawn = (__m512i)keep16((uint32_t)(i * width + c), seed, threshold);
            valid &= _mm512_test_epi32_mask(drawn, drawn);
        }
    }
    *keep = valid;
    return _mm256_maskz_loadu_epi16(valid, x + i * width + c);
}

/* The cache lines of an array's rows i0 .. i0 + rows (width elements of size bytes each),
 * prefetched a share per call: share s of shares, for the calls of a loop */
PB_INLINE void prefetch_share(const void *array, int64_t i0, int rows, int64_t width,
                              int64_t size, int64_t s, int64_t shares) {
    const char *first = (const char *)array + i0 * width * size;
    const int64_t lines = (rows * width * size + 63) / 64;
    const int64_t per_share = (lines + shares - 1) / shares;
    for (int64_t u = s * per_share; u < (s + 1) * per_share && u < lines; u++)
        _mm_prefetch(first + 64 * u, _MM_HINT_T0);
}

/* For the rows i0 .. i0 + rows (at most PB_ROW_BLOCK): partial (r x k) += grad_hidden^T
 * dropout(x), and, with gx_base, grad_x = gx_base + mask * (grad_hidden ap) in float32
 * (x_f32) or bf16. Columns in chunks of 16 outside, the block's row pairs inside: a chunk's
 * r sums and A's rank pairs stay in registers over the block, so the partial sums are loaded
 * and stored once per block instead of once per row pair. Meanwhile the next_rows rows
 * after the block (of x, gx_base and bits) are prefetched: the saved input comes back
 * from memory in the backward, and the hardware prefetchers do not follow this order (x2.1
 * in the layer's sequence). */
PB_INLINE void grad_input_block_dp(const uint16_t *gx_base, const float *restrict grad_hidden,
                                   const pb_pair *restrict ap, const uint16_t *restrict x,
                                   void *grad_x, int x_f32, float *restrict partial,
                                   int64_t i0, int64_t k, const int64_t r, const int rows,
                                   int next_rows, uint64_t seed, uint32_t threshold, int drop,
                                   const uint32_t *restrict bits) {
    static const uint16_t pair_index[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                            21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                            11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const float *h = grad_hidden + i0 * r;
    const int64_t pairs = (r + 1) / 2;
    const int row_pairs = (rows + 1) / 2;
    /* per row pair the r pairs (h[2 p][j], h[2 p + 1][j]); per row its rank pairs */
    pb_pair across[PB_ROW_BLOCK / 2 * PB_MAX_RANK], along[PB_ROW_BLOCK * PB_MAX_PAIRS];
    for (int rp = 0; rp < row_pairs; rp++)
        PB_UNROLL
        for (int64_t j = 0; j < r; j++) {
            const float *pair = h + 2 * rp * r + j;
            across[rp * r + j] = bf16_pair(pair[0], 2 * rp + 1 < rows ? pair[r] : 0.0f);
        }
    rank_pair_factors(h, r, rows, along);
    const __m512i index = _mm512_loadu_si512(pair_index);
    const int64_t chunks = (k + 15) / 16;
    for (int64_t c = 0; c < k; c += 16) {
        const __mmask16 valid = valid16(c, k);
        __m512 sums[PB_MAX_RANK];
        __m512i a_pairs[PB_MAX_PAIRS];
        if (next_rows > 0) {
            prefetch_share(x, i0 + rows, next_rows, k, 2, c / 16, chunks);
            if (gx_base != NULL)
                prefetch_share(gx_base, i0 + rows, next_rows, k, 2, c / 16, chunks);
            if (drop && bits != NULL)
                prefetch_share(bits, i0 + rows, next_rows, (k + 31) / 32, 4, c / 16, chunks);
        }
        PB_UNROLL
        for (int64_t j = 0; j < r; j++)
            sums[j] = _mm512_maskz_loadu_ps(valid, partial + j * k + c);
        if (gx_base != NULL)
            PB_UNROLL
            for (int64_t jp = 0; jp < pairs; jp++)
                a_pairs[jp] = _mm512_maskz_loadu_epi32(valid, ap + jp * k + c);
        for (int rp = 0; rp < row_pairs; rp++) {
            const int64_t i = i0 + 2 * rp;
            const int both = 2 * rp + 1 < rows;
            __mmask16 keep[2] = {0, 0};
            __m256i first = row16(x, i, c, k, seed, threshold, drop, bits, &keep[0]);
            __m256i second = _mm256_setzero_si256();
            if (both)
                second = row16(x, i + 1, c, k, seed, threshold, drop, bits, &keep[1]);
            /* the pairs (first[t], second[t]) */
            __m512i row_pair = _mm512_permutexvar_epi16(
                index, _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1));
            const pb_pair *factors = across + rp * r;
            PB_UNROLL
            for (int64_t j = 0; j < r; j++)
                sums[j] = dot_pairs(sums[j], row_pair, _mm512_set1_epi32((int)factors[j]));
            if (gx_base == NULL)
                continue;
            PB_UNROLL
            for (int q = 0; q <= both; q++) {
                const pb_pair *factors = along + (2 * rp + q) * pairs;
                __m512 lora = _mm512_setzero_ps();
                PB_UNROLL
                for (int64_t jp = 0; jp < pairs; jp++)
                    lora = dot_pairs(lora, _mm512_set1_epi32((int)factors[jp]), a_pairs[jp]);
                const int64_t at = (i + q) * k + c;
                __m512 base = widen_m256(_mm256_maskz_loadu_epi16(valid, gx_base + at));
                __m512 sum = _mm512_mask_add_ps(base, keep[q], base, lora);
                if (x_f32)
                    _mm512_mask_storeu_ps((float *)grad_x + at, valid, sum);
                else
                    _mm256_mask_storeu_epi16((uint16_t *)grad_x + at, valid,
                                             narrow_m512(sum));
            }
        }
        PB_UNROLL
        for (int64_t j = 0; j < r; j++)
            _mm512_mask_storeu_ps(partial + j * k + c, valid, sums[j]);
    }
}

/* the implementation's operands (in the work buffer) and row blocks, for the entry points
 * below: bf16 copies and pair layouts, row pairs */
#define PB_ROWS_4 2 /* rows per block for r = 4, 8, 16 and any other r: pairs */
#define PB_ROWS_8 2
#define PB_ROWS_16 2
#define PB_ROWS_ANY 2
static const void *packed_a(const float *a, int64_t r, int64_t k, float *work) {
    bf16_copy(a, r, k, (uint16_t *)work);
    return work;
}
static const void *packed_b_for_up(const float *b, int64_t n, int64_t r, float *work) {
    rank_pairs(b, 1, r, r, n, (pb_pair *)work);
    return work;
}
static const void *packed_bt(const float *b, int64_t n, int64_t r, float *work) {
    bf16_transpose(b, n, r, (uint16_t *)work);
    return work;
}
static const void *packed_a_for_grad(const float *a, int64_t r, int64_t k, float *work) {
    rank_pairs(a, k, 1, r, k, (pb_pair *)work);
    return work;
}
#define PB_DOWN_ROWS(R, P, I0)                                                               \
    dot_rows_dp(x, (const uint16_t *)packed, 1.0f, hidden, I0, k, R, P, seed, threshold,    \
                drop, bits, NULL, NULL)
#define PB_UP_ROWS(R, P, I0) up_rows_dp(out, hidden, (const pb_pair *)packed, scale, I0, n, R, P)
#define PB_GRAD_HIDDEN_ROWS(R, P, I0)                                                        \
    dot_rows_dp(g, (const uint16_t *)packed, scale, grad_hidden, I0, n, R, P, 0, 0, 0, NULL, \
                hidden, partial)
#define PB_GRAD_INPUT_ROWS(R, ROWS, I0)                                                      \
    grad_input_block_dp(gx_base, grad_hidden, (const pb_pair *)packed, x, grad_x, x_f32,     \
                        partial, I0, k, R, ROWS, next_rows(m, (I0) + (ROWS)), seed,          \
                        threshold, drop, bits)
#define PB_GRAD_INPUT_FOR PB_FOR_ROW_BLOCKS

#else
/* ---- portable: vector extensions, float32 multiply-adds ---- */

#define PB_MAX_ROWS 4 /* the most rows per block here (PB_ROWS_4): fixed-size arrays */

/* 16 elements of x from flat index first, dropped ones 0; keep receives the mask */
PB_INLINE pb_vf dropped16(const uint16_t *x, uint32_t first, uint64_t seed,
                          uint32_t threshold, int drop, pb_vu *keep) {
    pb_vf v = widen16(x);
    if (!drop) {
        *keep = ~(pb_vu){0};
        return v;
    }
    *keep = keep16(first, seed, threshold);
    return (pb_vf)((pb_vu)v & *keep);
}
static inline float dropped1(const uint16_t *x, int64_t index, uint64_t seed,
                             uint32_t threshold) {
    return pb_keep((uint32_t)index, seed, threshold) ? bf16_to_float(*x) : 0.0f;
}

/* dst = src rounded to bf16 (as floats), size elements */
static void rounded_copy(const float *src, int64_t size, float *dst) {
    for (int64_t e = 0; e < size; e++)
        dst[e] = round_bf16(src[e]);
}
/* dst (cols x rows) = src^T rounded to bf16 (as floats) for src (rows x cols) */
static void rounded_transpose(const float *src, int64_t rows, int64_t cols, float *dst) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++)
            dst[j * rows + i] = round_bf16(src[i * cols + j]);
}

/* For P rows from row i0 of x (m x k, bf16, dropped where drop is set): sums =
 * round(scale x' a^T) (r per row). With h (the rows' r factors) and partial (r x k), also
 * partial += h^T x'. pb_lora_down and pb_lora_grad_hidden pass h and partial as constants
 * (NULL or not), so the inlined copies keep only their own work. */
PB_INLINE void rank_sums_rows(const uint16_t *restrict x, const float *restrict a,
                              float scale, float *restrict sums, int64_t i0, int64_t k,
                              const int64_t r, const int P, uint64_t seed,
                              uint32_t threshold, int drop, const float *restrict h,
                              float *restrict partial) {
    pb_vf s[PB_MAX_ROWS][PB_MAX_RANK];
    PB_UNROLL
    for (int q = 0; q < P; q++)
        PB_UNROLL
        for (int64_t j = 0; j < r; j++)
            s[q][j] = (pb_vf){0};
    int64_t c = 0;
    for (; c + PB_LANES <= k; c += PB_LANES) {
        pb_vf v[PB_MAX_ROWS];
        pb_vu keep;
        PB_UNROLL
        for (int q = 0; q < P; q++)
            v[q] = dropped16(x + (i0 + q) * k + c, (uint32_t)((i0 + q) * k + c), seed,
                             threshold, drop, &keep);
        PB_UNROLL
        for (int64_t j = 0; j < r; j++) {
            pb_vf w = load16(a + j * k + c);
            PB_UNROLL
            for (int q = 0; q < P; q++)
                s[q][j] += v[q] * w;
            if (partial != NULL) {
                pb_vf acc = load16(partial + j * k + c);
                PB_UNROLL
                for (int q = 0; q < P; q++)
                    acc += h[q * r + j] * v[q];
                store16(partial + j * k + c, acc);
            }
        }
    }
    float t[PB_MAX_ROWS][PB_MAX_RANK];
    PB_UNROLL
    for (int q = 0; q < P; q++)
        PB_UNROLL
        for (int64_t j = 0; j < r; j++)
            t[q][j] = sum16(s[q][j]);
    for (; c < k; c++)
        PB_UNROLL
        for (int q = 0; q < P; q++) {
            float v = dropped1(x + (i0 + q) * k + c, (i0 + q) * k + c, seed, threshold);
            PB_UNROLL
            for (int64_t j = 0; j < r; j++) {
                t[q][j] += v * a[j * k + c];
                if (partial != NULL)
                    partial[j * k + c] += h[q * r + j] * v;
            }
        }
    PB_UNROLL
    for (int q = 0; q < P; q++)
        PB_UNROLL
        for (int64_t j = 0; j < r; j++)
            sums[(i0 + q) * r + j] = round_bf16(scale * t[q][j]);
}

/* out[i0 .. i0 + P) += scale * hidden bt, rounded once */
PB_INLINE void up_rows(uint16_t *restrict out, const float *restrict hidden,
                       const float *restrict bt, float scale, int64_t i0, int64_t n,
                       const int64_t r, const int P) {
    const float *h = hidden + i0 * r;
    int64_t c = 0;
    for (; c + PB_LANES <= n; c += PB_LANES) {
        pb_vf acc[PB_MAX_ROWS];
        PB_UNROLL
        for (int q = 0; q < P; q++)
            acc[q] = (pb_vf){0};
        PB_UNROLL
        for (int64_t j = 0; j < r; j++) {
            pb_vf w = load16(bt + j * n + c);
            PB_UNROLL
            for (int q = 0; q < P; q++)
                acc[q] += h[q * r + j] * w;
        }
        PB_UNROLL
        for (int q = 0; q < P; q++)
            narrow16(out + (i0 + q) * n + c, widen16(out + (i0 + q) * n + c) + scale * acc[q]);
    }
    for (; c < n; c++)
        PB_UNROLL
        for (int q = 0; q < P; q++) {
            float t = 0.0f;
            PB_UNROLL
            for (int64_t j = 0; j < r; j++)
                t += h[q * r + j] * bt[j * n + c];
            out[(i0 + q) * n + c] = float_to_bf16(bf16_to_float(out[(i0 + q) * n + c]) +
                                                  scale * t);
        }
}

/* for P rows: partial (r x k) += grad_hidden^T dropout(x), and, with gx_base, grad_x =
 * gx_base + mask * (grad_hidden a) in float32 (x_f32) or bf16 */
PB_INLINE void grad_input_rows(const uint16_t *gx_base,
                               const float *restrict grad_hidden, const float *restrict a,
                               const uint16_t *restrict x, void *grad_x, int x_f32,
                               float *restrict partial, int64_t i0, int64_t k,
                               const int64_t r, const int P, uint64_t seed,
                               uint32_t threshold, int drop) {
    const float *h = grad_hidden + i0 * r;
    int64_t c = 0;
    for (; c + PB_LANES <= k; c += PB_LANES) {
        pb_vf v[PB_MAX_ROWS], lora[PB_MAX_ROWS];
        pb_vu keep[PB_MAX_ROWS];
        PB_UNROLL
        for (int q = 0; q < P; q++) {
            v[q] = dropped16(x + (i0 + q) * k + c, (uint32_t)((i0 + q) * k + c), seed,
                             threshold, drop, &keep[q]);
            lora[q] = (pb_vf){0};
        }
        PB_UNROLL
        for (int64_t j = 0; j < r; j++) {
            pb_vf w = load16(a + j * k + c), acc = load16(partial + j * k + c);
            PB_UNROLL
            for (int q = 0; q < P; q++) {
                acc += h[q * r + j] * v[q];
                lora[q] += h[q * r + j] * w;
            }
            store16(partial + j * k + c, acc);
        }
        if (gx_base == NULL)
            continue;
        PB_UNROLL
        for (int q = 0; q < P; q++) {
            int64_t index = (i0 + q) * k + c;
            pb_vf out = widen16(gx_base + index) + (pb_vf)((pb_vu)lora[q] & keep[q]);
            if (x_f32)
                store16((float *)grad_x + index, out);
            else
                narrow16((uint16_t *)grad_x + index, out);
        }
    }
    for (; c < k; c++)
        PB_UNROLL
        for (int q = 0; q < P; q++) {
            int64_t index = (i0 + q) * k + c;
            int kept = pb_keep((uint32_t)index, seed, threshold);
            float v = kept ? bf16_to_float(x[index]) : 0.0f, lora = 0.0f;
            PB_UNROLL
            for (int64_t j = 0; j < r; j++) {
                partial[j * k + c] += h[q * r + j] * v;
                lora += h[q * r + j] * a[j * k + c];
            }
            if (gx_base == NULL)
                continue;
            float out = bf16_to_float(gx_base[index]) + (kept ? lora : 0.0f);
            if (x_f32)
                ((float *)grad_x)[index] = out;
            else
                ((uint16_t *)grad_x)[index] = float_to_bf16(out);
        }
}

/* the implementation's operands (in the work buffer) and row blocks, for the entry points
 * below: float32 copies rounded to bf16, P = PB_BLOCK_ROWS(r) rows */
#define PB_ROWS_4 4 /* rows per block (r P sums stay in registers) */
_Static_assert(PB_ROWS_4 <= PB_MAX_ROWS, "the rows functions' arrays hold PB_MAX_ROWS rows");
#define PB_ROWS_8 2
#define PB_ROWS_16 1
#define PB_ROWS_ANY 1
static const void *packed_a(const float *a, int64_t r, int64_t k, float *work) {
    rounded_copy(a, r * k, work);
    return work;
}
static const void *packed_bt(const float *b, int64_t n, int64_t r, float *work) {
    rounded_transpose(b, n, r, work);
    return work;
}
#define packed_b_for_up packed_bt
#define packed_a_for_grad packed_a
#define PB_DOWN_ROWS(R, P, I0)                                                               \
    rank_sums_rows(x, (const float *)packed, 1.0f, hidden, I0, k, R, P, seed, threshold,    \
                   drop, NULL, NULL)
#define PB_UP_ROWS(R, P, I0) up_rows(out, hidden, (const float *)packed, scale, I0, n, R, P)
#define PB_GRAD_HIDDEN_ROWS(R, P, I0)                                                        \
    rank_sums_rows(g, (const float *)packed, scale, grad_hidden, I0, n, R, P, 0, 0, 0,      \
                   hidden + (I0) * (R), partial)
#define PB_GRAD_INPUT_ROWS(R, P, I0)                                                         \
    grad_input_rows(gx_base, grad_hidden, (const float *)packed, x, grad_x, x_f32, partial, \
                    I0, k, R, P, seed, threshold, drop)
#define PB_GRAD_INPUT_FOR PB_FOR_BLOCKS
#endif

/* ---- the entry points, over either implementation ---- */

/* ROWS over the row blocks in an OpenMP team when m * width * r is large enough, each
 * thread adding into its zeroed share of work (r * width floats); parts receives the team's
 * size. Uses m, r, threads and work. */
#define PB_PARTIAL_PASS(width, FOR, ROWS, parts)                                             \
    do {                                                                                     \
        const int64_t pb_size = r * (width);                                                 \
        const int pb_parallel = m * pb_size >= PB_PARALLEL_MIN * 8;                          \
        (void)pb_parallel; /* without OpenMP */                                              \
        _Pragma("omp parallel num_threads(threads) if (pb_parallel)")                        \
        {                                                                                    \
            _Pragma("omp single")                                                            \
            (parts) = thread_count();                                                        \
            float *partial = thread_partial(work, pb_size);                                  \
            FOR(m, r, ROWS);                                                                 \
        }                                                                                    \
    } while (0)

void pb_lora_down(const uint16_t *x, const float *a, float *hidden, int64_t m, int64_t k,
                  int64_t r, uint64_t seed, uint32_t threshold, uint32_t *bits, float *work,
                  int threads) {
    if (r < 1 || r > PB_MAX_RANK)
        return; /* never past the fixed per-rank arrays (the caller checks: lora_max_rank) */
    (void)bits; /* the portable kernels draw the mask again in the backward */
    int drop = threshold != 0;
    const void *packed = packed_a(a, r, k, work);
    #pragma omp parallel num_threads(threads) if (m * k * r >= PB_PARALLEL_MIN * 8)
    PB_FOR_BLOCKS(m, r, PB_DOWN_ROWS);
}

/* out += hidden (scale B^T), in place over the base product (bf16, m x n), rounded once */
void pb_lora_up_add(uint16_t *out, const float *hidden, const float *b, float scale,
                    int64_t m, int64_t n, int64_t r, float *work, int threads) {
    if (r < 1 || r > PB_MAX_RANK)
        return; /* never past the fixed per-rank arrays (the caller checks: lora_max_rank) */
    const void *packed = packed_b_for_up(b, n, r, work);
    #pragma omp parallel num_threads(threads) if (m * n >= PB_PARALLEL_MIN)
    PB_FOR_BLOCKS(m, r, PB_UP_ROWS);
}

/* From the output gradient g (m x n, bf16): grad_hidden = round(scale g B) (m x r) and
 * B's gradient grad_b = scale (hidden^T g)^T (float32, n x r) */
void pb_lora_grad_hidden(const uint16_t *g, const float *b, float scale, const float *hidden,
                         float *grad_hidden, float *grad_b, int64_t m, int64_t n, int64_t r,
                         float *work, int threads) {
    if (r < 1 || r > PB_MAX_RANK)
        return; /* never past the fixed per-rank arrays (the caller checks: lora_max_rank) */
    int parts = 1;
    const void *packed = packed_bt(b, n, r, work);
    work += r * n;
    PB_PARTIAL_PASS(n, PB_FOR_BLOCKS, PB_GRAD_HIDDEN_ROWS, parts);
    sum_partials(work, r * n, work, r * n, parts); /* in place: element e read, then set */
    scaled_transpose(work, scale, r, n, grad_b);
}

/* From the base input gradient gx_base = g W (bf16, m x k): grad_x = gx_base +
 * dropout-mask * (grad_hidden A) (float32 if x_f32 else bf16, m x k; it may be gx_base
 * itself) and grad_a = grad_hidden^T dropout(x) (float32, r x k); with gx_base NULL only
 * grad_a. */
void pb_lora_grad_input(const uint16_t *gx_base, const float *grad_hidden, const float *a,
                        const uint16_t *x, void *grad_x, int x_f32, float *grad_a, int64_t m,
                        int64_t k, int64_t r, uint64_t seed, uint32_t threshold,
                        uint32_t *bits, float *work, int threads) {
    if (r < 1 || r > PB_MAX_RANK)
        return; /* never past the fixed per-rank arrays (the caller checks: lora_max_rank) */
    (void)bits;
    int parts = 1, drop = threshold != 0;
    const void *packed = packed_a_for_grad(a, r, k, work);
    work += r * k;
    PB_PARTIAL_PASS(k, PB_GRAD_INPUT_FOR, PB_GRAD_INPUT_ROWS, parts);
    sum_partials(work, r * k, grad_a, r * k, parts);
}

#if PB_DPBF16
/* ---- attention probabilities (AVX-512 BF16 only) ----
 *
 * Per (batch, key/value head) pair: q (rows x d, bf16; the group's query heads stacked,
 * rows = groups * n, row i at query position i % n), k and v (n x d, bf16), g (rows x d,
 * bf16: the gradient of the attention's output), the additive float32 mask (n x n, row t
 * for query position t; mask_stride floats between batches, 0 when shared) and scale:
 *
 * - pb_attention_probs: P = softmax(scale q k^T + mask), rounded to bf16 (rows x n);
 * - pb_attention_grads: P again, and dS = scale P .* (dP - rowsum(dP .* P)) with
 *   dP = g v^T, the gradient of q k^T, both rounded to bf16.
 *
 * q k^T and g v^T are float32 sums of bf16 products (vdpbf16ps over pairs along d), the
 * softmax is float32 (exp_clamped), exactly 0 where the mask is -inf, and rows with every
 * key masked are 0, as torch's safe softmax gives them. Arrays are contiguous: q, g, P and
 * dS (batch, heads, rows, .), k and v (batch, heads, n, d). work: pb_attention_work(n, d)
 * floats per thread. */

#define PB_ATTENTION_ROWS 4 /* query rows at a time: their sums share each load */
/* floats of work per thread for the attention kernels (the caller allocates threads times) */
int64_t pb_attention_work(int64_t n, int64_t d) {
    return 2 * ((d + 1) / 2) * n + 2 * PB_ATTENTION_ROWS * n;
}

/* the bf16 pair (row[2 dp], row[2 dp + 1]) of a row of d values, the second 0 past d */
static inline pb_pair raw_pair(const uint16_t *row, int64_t dp, int64_t d) {
    return (pb_pair)row[2 * dp] | (2 * dp + 1 < d ? (pb_pair)row[2 * dp + 1] << 16 : 0u);
}

/* the two bf16 at p as a pair, one 32-bit load (p need not be aligned) */
static inline pb_pair load_pair(const uint16_t *p) {
    pb_pair pair;
    memcpy(&pair, p, sizeof pair);
    return pair;
}

/* dst[dp * n + j] = raw_pair(src's row j, dp) for the n rows of src (n x d, bf16) */
static void pair_rows(const uint16_t *src, int64_t n, int64_t d, pb_pair *dst) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t dp = 0; 2 * dp < d; dp++)
            dst[dp * n + j] = raw_pair(src + j * d, dp, d);
}

/* out[q][j] = the float32 sum of a[q][c] b[j][c] over c < d, for j < n and q < rows (at
 * most PB_ATTENTION_ROWS bf16 rows a[q]); bp the pairs of b's rows (pair_rows). The rows
 * share each load of bp and give 16 independent sums in flight for four rows (one row's
 * four waited on the dot product's latency); each row's sums are the same, in the same
 * order. */
PB_INLINE void row_dots(const uint16_t *const a[PB_ATTENTION_ROWS], const pb_pair *bp,
                        int64_t n, int64_t d, float *const out[PB_ATTENTION_ROWS],
                        const int rows) {
    for (int64_t j0 = 0; j0 < n; j0 += 64) {
        __mmask16 valid[4];
        __m512 acc[PB_ATTENTION_ROWS][4];
        PB_UNROLL
        for (int b = 0; b < 4; b++) {
            valid[b] = j0 + 16 * b < n ? valid16(j0 + 16 * b, n) : 0;
            PB_UNROLL
            for (int q = 0; q < rows; q++)
                acc[q][b] = _mm512_setzero_ps();
        }
        for (int64_t dp = 0; 2 * dp < d; dp++) {
            const pb_pair *row = bp + dp * n + j0;
            __m512i xv[PB_ATTENTION_ROWS];
            PB_UNROLL
            for (int q = 0; q < rows; q++)
                xv[q] = _mm512_set1_epi32((int)(2 * dp + 1 < d ? load_pair(a[q] + 2 * dp)
                                                               : raw_pair(a[q], dp, d)));
            PB_UNROLL
            for (int b = 0; b < 4; b++) {
                __m512i bv = _mm512_maskz_loadu_epi32(valid[b], row + 16 * b);
                PB_UNROLL
                for (int q = 0; q < rows; q++)
                    acc[q][b] = dot_pairs(acc[q][b], xv[q], bv);
            }
        }
        PB_UNROLL
        for (int q = 0; q < rows; q++)
            PB_UNROLL
            for (int b = 0; b < 4; b++)
                _mm512_mask_storeu_ps(out[q] + j0 + 16 * b, valid[b], acc[q][b]);
    }
}

/* the float32 sum of s[j] t[j], j < n, in 16 lanes */
static float dot_sum(const float *s, const float *t, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 valid = valid16(j, n);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(valid, s + j),
                              _mm512_maskz_loadu_ps(valid, t + j), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* exp_clamped, 16 at a time */
PB_INLINE __m512 exp16(__m512 x) {
    pb_vf v = (pb_vf)_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)),
                                   _mm512_set1_ps(88.0f)), n, p;
    PB_EXP_PARTS(v, n, p);
    __m512i bits = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvttps_epi32((__m512)n), _mm512_set1_epi32(127)), 23);
    return (__m512)(p * (pb_vf)bits);
}

/* s (n scores) = softmax(scale s + mask); NaN everywhere where a score is NaN or +inf, as
 * torch's softmax gives */
static void softmax_row(float *s, const float *mask, float scale, int64_t n) {
    __m512 top16 = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 valid = valid16(j, n);
        __m512 z = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(valid, s + j), _mm512_set1_ps(scale),
                                   _mm512_maskz_loadu_ps(valid, mask + j));
        _mm512_mask_storeu_ps(s + j, valid, z);
        top16 = _mm512_mask_max_ps(top16, valid, top16, z);
        nan |= _mm512_mask_cmp_ps_mask(valid, z, z, _CMP_UNORD_Q);
    }
    float top = _mm512_reduce_max_ps(top16);
    if (nan || top == INFINITY) {
        for (int64_t j = 0; j < n; j++)
            s[j] = NAN;
        return;
    }
    if (top == -INFINITY) {
        memset(s, 0, sizeof(float) * (size_t)n);
        return;
    }
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 valid = valid16(j, n);
        __m512 z = _mm512_maskz_loadu_ps(valid, s + j);
        /* 0 where the mask is -inf (and past n) */
        __mmask16 finite = valid & _mm512_cmp_ps_mask(z, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        __m512 e = _mm512_maskz_mov_ps(finite, exp16(_mm512_sub_ps(z, _mm512_set1_ps(top))));
        _mm512_mask_storeu_ps(s + j, valid, e);
        sum = _mm512_add_ps(sum, e);
    }
    __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 valid = valid16(j, n);
        _mm512_mask_storeu_ps(s + j, valid, _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, s + j),
                                                          inverse));
    }
}

/* out (n bf16) = s rounded */
static void round_row(const float *s, int64_t n, uint16_t *out) {
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 valid = valid16(j, n);
        _mm256_mask_storeu_epi16(out + j, valid,
                                 narrow_m512(_mm512_maskz_loadu_ps(valid, s + j)));
    }
}

/* For rows (1 to PB_ATTENTION_ROWS) consecutive rows from row (i: the first's index within
 * its batch and head, for the mask): P, and with g (else NULL) also dS. s and dp: scores of
 * n floats per row. */
PB_INLINE void attention_rows(const uint16_t *q, const uint16_t *g, const pb_pair *kp,
                              const pb_pair *vp, const float *m, int64_t row, int64_t i,
                              int64_t n, int64_t d, float scale, uint16_t *probs,
                              uint16_t *grad_scores, float *s, float *dp, const int rows) {
    const uint16_t *qs[PB_ATTENTION_ROWS], *gs[PB_ATTENTION_ROWS];
    float *ss[PB_ATTENTION_ROWS], *dps[PB_ATTENTION_ROWS];
    for (int r = 0; r < PB_ATTENTION_ROWS; r++) { /* past rows: the last row, not read */
        const int64_t at = row + (r < rows ? r : rows - 1);
        qs[r] = q + at * d;
        gs[r] = g == NULL ? NULL : g + at * d;
        ss[r] = s + r * n;
        dps[r] = dp + r * n;
    }
    row_dots(qs, kp, n, d, ss, rows);
    for (int r = 0; r < rows; r++)
        softmax_row(ss[r], m + ((i + r) % n) * n, scale, n);
    if (g != NULL) {
        row_dots(gs, vp, n, d, dps, rows);
        const __m512 factor = _mm512_set1_ps(scale);
        for (int r = 0; r < rows; r++) {
            const __m512 coef = _mm512_set1_ps(dot_sum(dps[r], ss[r], n));
            for (int64_t j = 0; j < n; j += 16) {
                __mmask16 valid = valid16(j, n);
                __m512 p = _mm512_maskz_loadu_ps(valid, ss[r] + j);
                __m512 ds = _mm512_mul_ps(
                    factor, _mm512_mul_ps(p, _mm512_sub_ps(
                                                 _mm512_maskz_loadu_ps(valid, dps[r] + j), coef)));
                _mm256_mask_storeu_epi16(grad_scores + (row + r) * n + j, valid, narrow_m512(ds));
            }
        }
    }
    for (int r = 0; r < rows; r++)
        round_row(ss[r], n, probs + (row + r) * n);
}

/* P for every row, and with g (else NULL) also dS: the work of both entry points below */
static void attention(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                      const uint16_t *g, const float *mask, int64_t mask_stride,
                      int64_t batch, int64_t heads, int64_t rows, int64_t n, int64_t d,
                      float scale, uint16_t *probs, uint16_t *grad_scores, float *work,
                      int threads) {
    const int64_t per_thread = pb_attention_work(n, d), half = (d + 1) / 2 * n;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < batch * heads; bh++) {
        float *mine = work + (int64_t)thread_number() * per_thread;
        pb_pair *kp = (pb_pair *)mine, *vp = (pb_pair *)mine + half;
        float *s = mine + 2 * half, *dp = s + PB_ATTENTION_ROWS * n;
        pair_rows(k + bh * n * d, n, d, kp);
        if (g != NULL)
            pair_rows(v + bh * n * d, n, d, vp);
        const float *m = mask + (bh / heads) * mask_stride;
        int64_t i0 = 0;
        for (; i0 + PB_ATTENTION_ROWS <= rows; i0 += PB_ATTENTION_ROWS)
            attention_rows(q, g, kp, vp, m, bh * rows + i0, i0, n, d, scale, probs,
                           grad_scores, s, dp, PB_ATTENTION_ROWS);
        for (; i0 < rows; i0++) /* the rows left over, one at a time */
            attention_rows(q, g, kp, vp, m, bh * rows + i0, i0, n, d, scale, probs,
                           grad_scores, s, dp, 1);
    }
}

void pb_attention_probs(const uint16_t *q, const uint16_t *k, const float *mask,
                        int64_t mask_stride, int64_t batch, int64_t heads, int64_t rows,
                        int64_t n, int64_t d, float scale, uint16_t *probs, float *work,
                        int threads) {
    attention(q, k, NULL, NULL, mask, mask_stride, batch, heads, rows, n, d, scale, probs,
              NULL, work, threads);
}

void pb_attention_grads(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                        const uint16_t *g, const float *mask, int64_t mask_stride,
                        int64_t batch, int64_t heads, int64_t rows, int64_t n, int64_t d,
                        float scale, uint16_t *probs, uint16_t *grad_scores, float *work,
                        int threads) {
    attention(q, k, v, g, mask, mask_stride, batch, heads, rows, n, d, scale, probs,
              grad_scores, work, threads);
}
#endif

/* The rotary position embedding of rows of d values (d even, h = d / 2), one row per (batch
 * b, head, position t), and its input gradient:
 *
 * - forward (backward == 0): out = x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1):
 *   out[j] = x[j] cos[j] - x[j + h] sin[j] (j < h), x[j] cos[j] + x[j - h] sin[j] (j >= h);
 * - backward: grad = g cos + rotate_half^T(g sin):
 *   grad[j] = g[j] cos[j] + g[j + h] sin[j + h] (j < h), g[j] cos[j] - g[j - h] sin[j - h].
 *
 * x and out are bf16 rows at b * sb + head * sh + t * st (src) and b * db + head * dh +
 * t * dt (dst), elements within a row contiguous; cos and sin are float32 rows at b * cb +
 * t * ct, shared by the heads. The forward keeps eager's float32 arithmetic (each product
 * and the sum rounded to float32, not fused), then rounds once to bf16, as eager's
 * bf16 x with float32 cos and sin followed by autocast's cast; the gradient is rounded once
 * where eager rounds each half. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void pb_rotary(const uint16_t *src, int64_t sb, int64_t sh, int64_t st, uint16_t *dst,
               int64_t db, int64_t dh, int64_t dt, const float *cos, const float *sin,
               int64_t cb, int64_t ct, int64_t batch, int64_t heads, int64_t len, int64_t d,
               int backward, int threads) {
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif
    const int64_t h = d / 2, rows = batch * heads * len;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * d >= PB_PARALLEL_MIN)
    for (int64_t row = 0; row < rows; row++) {
        const int64_t b = row / (heads * len), head = (row / len) % heads, t = row % len;
        const uint16_t *x = src + b * sb + head * sh + t * st;
        uint16_t *o = dst + b * db + head * dh + t * dt;
        const float *c = cos + b * cb + t * ct, *s = sin + b * cb + t * ct;
        for (int64_t j = 0; j < h; j++) {
            float lo = bf16_to_float(x[j]), hi = bf16_to_float(x[j + h]);
            float a = lo * c[j], e = hi * c[j + h], f, g;
            if (backward) {
                f = hi * s[j + h];
                g = lo * s[j];
                o[j] = float_to_bf16(a + f);
                o[j + h] = float_to_bf16(e - g);
            } else {
                f = hi * s[j];
                g = lo * s[j + h];
                o[j] = float_to_bf16(a - f);
                o[j + h] = float_to_bf16(e + g);
            }
        }
    }
}
