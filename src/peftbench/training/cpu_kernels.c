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
 * (round to nearest even, as torch), except where noted to keep eager's forward values.
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
static inline float exp_clamped(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float t = x * 1.44269504088896341f;
    float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    float f = t - n;
    float p = 1.5252733e-5f;
    p = p * f + 1.5403530e-4f;
    p = p * f + 1.3333558e-3f;
    p = p * f + 9.6181291e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022651e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
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
 * base product x W^T (m x n, bf16) comes from torch. The kernels multiply by
 * bt = scale * B^T (r x n), which they lay out in their work buffer. Dropout over
 * the adapter's input is drawn here: element (i, c) is kept when a hash of its flat index
 * i * k + c and the call's seed is at least threshold = p * 2^32, so the backward draws the
 * same mask again instead of keeping it. Sums over the rank are float32.
 *
 * The loops run over 16 columns at a time in GCC/Clang vector extensions (16 floats; the
 * compiler splits them where registers are narrower) and over P rows at a time, so that each
 * vector of A, B^T or of a partial sum that is loaded serves P rows, with r P independent
 * sums in registers. They are instantiated for r = 4, 8 and 16 (everything unrolled) and
 * once for any other r. Columns past the last multiple of 16 are done one at a time. */

typedef float pb_vf __attribute__((vector_size(64)));
typedef float pb_vf_u __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint32_t pb_vu __attribute__((vector_size(64)));
typedef uint16_t pb_vh __attribute__((vector_size(32)));
typedef uint16_t pb_vh_u __attribute__((vector_size(32), aligned(2), may_alias));
#define PB_LANES 16
#define PB_INLINE static inline __attribute__((always_inline))

PB_INLINE pb_vf load16(const float *p) { return *(const pb_vf_u *)p; }
PB_INLINE void store16(float *p, pb_vf v) { *(pb_vf_u *)p = v; }
#if (defined(__clang__) || __GNUC__ >= 9) && !defined(PB_NO_CONVERTVECTOR)
PB_INLINE pb_vf widen16(const uint16_t *p) {
    return (pb_vf)(__builtin_convertvector(*(const pb_vh_u *)p, pb_vu) << 16);
}
/* as float_to_bf16, 16 at a time */
PB_INLINE void narrow16(uint16_t *p, pb_vf f) {
    pb_vu u = (pb_vu)f;
    pb_vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    pb_vu nan = (pb_vu)((u & 0x7fffffffu) > 0x7f800000u);
    pb_vu bits = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
    *(pb_vh_u *)p = __builtin_convertvector(bits, pb_vh);
}
#else /* compilers without __builtin_convertvector (GCC before 9): lane by lane */
PB_INLINE pb_vf widen16(const uint16_t *p) {
    pb_vf v;
    for (int l = 0; l < 16; l++)
        v[l] = bf16_to_float(p[l]);
    return v;
}
PB_INLINE void narrow16(uint16_t *p, pb_vf f) {
    for (int l = 0; l < 16; l++)
        p[l] = float_to_bf16(f[l]);
}
#endif
PB_INLINE float sum16(pb_vf v) {
    float s = 0.0f;
    for (int l = 0; l < PB_LANES; l++)
        s += v[l];
    return s;
}

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

/* this thread's zeroed share (size floats) of a work buffer of per-thread partial sums */
static inline float *thread_partial(float *work, int64_t size) {
    float *partial = work + (int64_t)thread_number() * size;
    memset(partial, 0, sizeof(float) * (size_t)size);
    return partial;
}

/* rows per block: 4 for r = 4, 2 for r = 8, else 1 (r P sums stay in registers) */
static inline int per_block(int64_t r) { return r == 4 ? 4 : r == 8 ? 2 : 1; }

/* Inside an OpenMP region: CALL(r, P, i0) for every block of P = per_block(r) rows from
 * row i0, shared among the threads, with r and P constants for r = 4, 8 and 16 (the rows
 * functions are inlined into the region and unrolled) and r itself otherwise; then
 * CALL(r, 1, i) for each row left over. */
#define PB_FOR_ROWS(m, r, CALL)                                                              \
    do {                                                                                     \
        const int64_t pb_blocks = (m) / per_block(r);                                        \
        _Pragma("omp for schedule(static)")                                                  \
        for (int64_t pb_block = 0; pb_block < pb_blocks; pb_block++) {                       \
            if ((r) == 4)                                                                    \
                CALL(4, 4, pb_block * 4);                                                    \
            else if ((r) == 8)                                                               \
                CALL(8, 2, pb_block * 2);                                                    \
            else if ((r) == 16)                                                              \
                CALL(16, 1, pb_block);                                                       \
            else                                                                             \
                CALL(r, 1, pb_block);                                                        \
        }                                                                                    \
        _Pragma("omp for schedule(static)")                                                  \
        for (int64_t pb_row = pb_blocks * per_block(r); pb_row < (m); pb_row++)              \
            CALL(r, 1, pb_row);                                                              \
    } while (0)

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

/* For P rows from row i0 of x (m x k, bf16, dropped where drop is set): sums = x' a^T
 * (r per row). With h (the rows' r factors) and partial (r x k), also partial += h^T x'.
 * pb_lora_down and pb_lora_grad_hidden pass h and partial as constants (NULL or not), so
 * the inlined copies keep only their own work. */
PB_INLINE void rank_sums_rows(const uint16_t *restrict x, const float *restrict a,
                              float *restrict sums, int64_t i0, int64_t k, const int64_t r,
                              const int P, uint64_t seed, uint32_t threshold, int drop,
                              const float *restrict h, float *restrict partial) {
    pb_vf s[P][r];
    for (int q = 0; q < P; q++)
        for (int64_t j = 0; j < r; j++)
            s[q][j] = (pb_vf){0};
    int64_t c = 0;
    for (; c + PB_LANES <= k; c += PB_LANES) {
        pb_vf v[P];
        pb_vu keep;
        for (int q = 0; q < P; q++)
            v[q] = dropped16(x + (i0 + q) * k + c, (uint32_t)((i0 + q) * k + c), seed,
                             threshold, drop, &keep);
        for (int64_t j = 0; j < r; j++) {
            pb_vf w = load16(a + j * k + c);
            for (int q = 0; q < P; q++)
                s[q][j] += v[q] * w;
            if (partial != NULL) {
                pb_vf acc = load16(partial + j * k + c);
                for (int q = 0; q < P; q++)
                    acc += h[q * r + j] * v[q];
                store16(partial + j * k + c, acc);
            }
        }
    }
    float t[P][r];
    for (int q = 0; q < P; q++)
        for (int64_t j = 0; j < r; j++)
            t[q][j] = sum16(s[q][j]);
    for (; c < k; c++)
        for (int q = 0; q < P; q++) {
            float v = dropped1(x + (i0 + q) * k + c, (i0 + q) * k + c, seed, threshold);
            for (int64_t j = 0; j < r; j++) {
                t[q][j] += v * a[j * k + c];
                if (partial != NULL)
                    partial[j * k + c] += h[q * r + j] * v;
            }
        }
    for (int q = 0; q < P; q++)
        for (int64_t j = 0; j < r; j++)
            sums[(i0 + q) * r + j] = t[q][j];
}

/* hidden = dropout(x) a^T (float32, m x r) */
void pb_lora_down(const uint16_t *x, const float *a, float *hidden, int64_t m, int64_t k,
                  int64_t r, uint64_t seed, uint32_t threshold, int threads) {
    int drop = threshold != 0;
    #pragma omp parallel num_threads(threads) if (m * k * r >= PB_PARALLEL_MIN * 8)
    {
#define PB_DOWN(R, P, I0)                                                                    \
    rank_sums_rows(x, a, hidden, I0, k, R, P, seed, threshold, drop, NULL, NULL)
        PB_FOR_ROWS(m, r, PB_DOWN);
#undef PB_DOWN
    }
}

/* out[i0 .. i0 + P) += hidden bt, rounded once */
PB_INLINE void up_rows(uint16_t *restrict out, const float *restrict hidden,
                       const float *restrict bt, int64_t i0, int64_t n, const int64_t r,
                       const int P) {
    const float *h = hidden + i0 * r;
    int64_t c = 0;
    for (; c + PB_LANES <= n; c += PB_LANES) {
        pb_vf v[P];
        for (int q = 0; q < P; q++)
            v[q] = widen16(out + (i0 + q) * n + c);
        for (int64_t j = 0; j < r; j++) {
            pb_vf w = load16(bt + j * n + c);
            for (int q = 0; q < P; q++)
                v[q] += h[q * r + j] * w;
        }
        for (int q = 0; q < P; q++)
            narrow16(out + (i0 + q) * n + c, v[q]);
    }
    for (; c < n; c++)
        for (int q = 0; q < P; q++) {
            float t = bf16_to_float(out[(i0 + q) * n + c]);
            for (int64_t j = 0; j < r; j++)
                t += h[q * r + j] * bt[j * n + c];
            out[(i0 + q) * n + c] = float_to_bf16(t);
        }
}

/* out += hidden (scale b^T), in place over the base product (bf16, m x n), rounded once;
 * work: r n floats */
void pb_lora_up_add(uint16_t *out, const float *hidden, const float *b, float scale,
                    int64_t m, int64_t n, int64_t r, float *work, int threads) {
    const float *bt = work;
    scaled_transpose(b, scale, n, r, work);
    #pragma omp parallel num_threads(threads) if (m * n >= PB_PARALLEL_MIN)
    {
#define PB_UP(R, P, I0) up_rows(out, hidden, bt, I0, n, R, P)
        PB_FOR_ROWS(m, r, PB_UP);
#undef PB_UP
    }
}

/* From the output gradient g (m x n, bf16): grad_hidden = g bt^T (float32, m x r) and B's
 * gradient grad_b = scale (hidden^T g)^T (float32, n x r). work: r n floats, and r n more
 * per thread. */
void pb_lora_grad_hidden(const uint16_t *g, const float *b, float scale, const float *hidden,
                         float *grad_hidden, float *grad_b, int64_t m, int64_t n, int64_t r,
                         float *work, int threads) {
    int parts = 1;
    const float *bt = work;
    scaled_transpose(b, scale, n, r, work);
    work += r * n;
    #pragma omp parallel num_threads(threads) if (m * n * r >= PB_PARALLEL_MIN * 8)
    {
        #pragma omp single
        parts = thread_count();
        float *partial = thread_partial(work, r * n);
#define PB_GRAD_HIDDEN(R, P, I0)                                                             \
    rank_sums_rows(g, bt, grad_hidden, I0, n, R, P, 0, 0, 0, hidden + (I0) * (R), partial)
        PB_FOR_ROWS(m, r, PB_GRAD_HIDDEN);
#undef PB_GRAD_HIDDEN
    }
    sum_partials(work, r * n, work, r * n, parts); /* in place: element e read, then set */
    scaled_transpose(work, scale, r, n, grad_b);
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
        pb_vf v[P], lora[P];
        pb_vu keep[P];
        for (int q = 0; q < P; q++) {
            v[q] = dropped16(x + (i0 + q) * k + c, (uint32_t)((i0 + q) * k + c), seed,
                             threshold, drop, &keep[q]);
            lora[q] = (pb_vf){0};
        }
        for (int64_t j = 0; j < r; j++) {
            pb_vf w = load16(a + j * k + c), acc = load16(partial + j * k + c);
            for (int q = 0; q < P; q++) {
                acc += h[q * r + j] * v[q];
                lora[q] += h[q * r + j] * w;
            }
            store16(partial + j * k + c, acc);
        }
        if (gx_base == NULL)
            continue;
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
        for (int q = 0; q < P; q++) {
            int64_t index = (i0 + q) * k + c;
            int kept = pb_keep((uint32_t)index, seed, threshold);
            float v = kept ? bf16_to_float(x[index]) : 0.0f, lora = 0.0f;
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

/* From the base input gradient gx_base = g W (bf16, m x k): grad_x = gx_base +
 * dropout-mask * (grad_hidden a) (float32 if x_f32 else bf16, m x k; it may be gx_base
 * itself) and grad_a = grad_hidden^T dropout(x) (float32, r x k); with gx_base NULL only
 * grad_a. work: r k floats per thread. */
void pb_lora_grad_input(const uint16_t *gx_base, const float *grad_hidden, const float *a,
                        const uint16_t *x, void *grad_x, int x_f32, float *grad_a, int64_t m,
                        int64_t k, int64_t r, uint64_t seed, uint32_t threshold, float *work,
                        int threads) {
    int parts = 1, drop = threshold != 0;
    #pragma omp parallel num_threads(threads) if (m * k * r >= PB_PARALLEL_MIN * 8)
    {
        #pragma omp single
        parts = thread_count();
        float *partial = thread_partial(work, r * k);
#define PB_GRAD_INPUT(R, P, I0)                                                              \
    grad_input_rows(gx_base, grad_hidden, a, x, grad_x, x_f32, partial, I0, k, R, P, seed,  \
                    threshold, drop)
        PB_FOR_ROWS(m, r, PB_GRAD_INPUT);
#undef PB_GRAD_INPUT
    }
    sum_partials(work, r * k, grad_a, r * k, parts);
}

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
