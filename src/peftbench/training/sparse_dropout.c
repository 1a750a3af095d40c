/* Sparse corrections for LoRA dropout given as a sorted list of dropped positions.
 *
 * A LoRA layer with dropout computes dropout(x) A^T. With a few percent of x's elements
 * dropped, peftbench computes x A^T (no dropped copy of x) and subtracts what the dropped
 * elements contributed; the backward does the same for the gradients of A and of x. Each
 * function reads only the dropped elements: p * tokens * features of them, r values each.
 *
 * Tensors are row-major and contiguous; bf16 is passed as its 16 raw bits (uint16_t).
 * Sums are taken in float32 and rounded once to bf16 (round to nearest even, as torch).
 * Compiled at first use by peftbench/training/sparse_dropout.py (plain C99, no torch
 * headers). */
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* a (r x cols, bf16) as cols x r float32 in out: the r values of one column side by side. */
static void columns_as_float(float *out, const uint16_t *a, int64_t cols, int64_t r) {
    for (int64_t k = 0; k < r; k++)
        for (int64_t j = 0; j < cols; j++) out[j * r + k] = bf16_to_float(a[k * cols + j]);
}

/* hidden[i, k] -= sum over dropped (i, j) of rows[i, j] * a[k, j].
 * hidden: tokens x r (bf16), rows: tokens x cols (bf16), a: r x cols (bf16);
 * scratch: cols * r + r floats. Positions are sorted, so the row is followed, not divided. */
void pb_hidden_minus_dropped(uint16_t *hidden, const uint16_t *rows, const uint16_t *a,
                             const int64_t *positions, int64_t count, int64_t cols, int64_t r,
                             float *scratch) {
    float *columns = scratch, *acc = scratch + cols * r;
    columns_as_float(columns, a, cols, r);
    int64_t t = 0, i = 0, row_start = 0;
    while (t < count) {
        while (positions[t] >= row_start + cols) { i++; row_start += cols; }
        for (int64_t k = 0; k < r; k++) acc[k] = 0.0f;
        for (; t < count && positions[t] < row_start + cols; t++) {
            const float value = bf16_to_float(rows[positions[t]]);
            const float *column = columns + (positions[t] - row_start) * r;
            for (int64_t k = 0; k < r; k++) acc[k] += value * column[k];
        }
        uint16_t *out = hidden + i * r;
        for (int64_t k = 0; k < r; k++) out[k] = float_to_bf16(bf16_to_float(out[k]) - acc[k]);
    }
}

/* The backward's two corrections in one pass over the dropped positions, each skipped when
 * its output is NULL:
 *   grad_a[k, j] -= sum over dropped (i, j) of grad_hidden[i, k] * rows[i, j]
 *     (grad_a: r x cols, float32; turns grad_hidden^T rows into the gradient of A);
 *   grad_x[i, j] -= sum over k of grad_hidden[i, k] * a[k, j] at each dropped (i, j)
 *     (grad_x: tokens x cols, bf16 if x_is_bf16, else float32; removes the adapter's part
 *     where the input was dropped).
 * grad_hidden: tokens x r, rows: tokens x cols, a: r x cols (all bf16);
 * scratch: 2 * cols * r + r floats. */
void pb_backward_minus_dropped(float *grad_a, void *grad_x, int x_is_bf16,
                               const uint16_t *grad_hidden, const uint16_t *rows,
                               const uint16_t *a, const int64_t *positions, int64_t count,
                               int64_t cols, int64_t r, float *scratch) {
    float *sums = scratch, *columns = scratch + cols * r, *g = scratch + 2 * cols * r;
    if (grad_a) memset(sums, 0, sizeof(float) * cols * r);
    if (grad_x) columns_as_float(columns, a, cols, r);
    int64_t i = -1, row_start = -cols;
    for (int64_t t = 0; t < count; t++) {
        const int64_t position = positions[t];
        if (position >= row_start + cols) {
            while (position >= row_start + cols) { i++; row_start += cols; }
            for (int64_t k = 0; k < r; k++) g[k] = bf16_to_float(grad_hidden[i * r + k]);
        }
        const int64_t j = position - row_start;
        if (grad_a) {
            const float value = bf16_to_float(rows[position]);
            float *sum = sums + j * r;
            for (int64_t k = 0; k < r; k++) sum[k] += g[k] * value;
        }
        if (grad_x) {
            const float *column = columns + j * r;
            float part = 0.0f;
            for (int64_t k = 0; k < r; k++) part += g[k] * column[k];
            if (x_is_bf16) {
                uint16_t *value = (uint16_t *)grad_x + position;
                *value = float_to_bf16(bf16_to_float(*value) - part);
            } else {
                ((float *)grad_x)[position] -= part;
            }
        }
    }
    if (grad_a)
        for (int64_t k = 0; k < r; k++)
            for (int64_t j = 0; j < cols; j++) grad_a[k * cols + j] -= sums[j * r + k];
}
