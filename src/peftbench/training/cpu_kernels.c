/* Compiled passes over activations for the CPU bf16 path, one pass where eager PyTorch
 * makes several, each reading and writing memory:
 *
 * - the gated MLP's silu(gate) * up and its backward (two eager passes forward, four
 *   backward);
 * - Llama's RMSNorm over the float32 residual stream, returning bf16, and the input
 *   gradient of its closed-form backward (pow, mean, rsqrt, two products and a cast
 *   forward; a product, a cast, a row dot product and three passes backward).
 *
 * Values are widened to float32 and computed in registers; results are rounded once to bf16
 * (round to nearest even, as torch), except where noted to keep eager's forward values. bf16 is passed as its 16 raw bits (uint16_t); arrays are
 * contiguous and row-major. Compiled at first use by peftbench/training/compiled_c.py
 * (plain C, no torch headers); the wrappers are in cpu_kernels.py. */
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
        int thread = 0;
#ifdef _OPENMP
        thread = omp_get_thread_num();
#endif
        float *g_n = work + (int64_t)thread * cols;
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
