/* Sparse corrections for LoRA dropout given as a sorted list of dropped positions.
 *
 * A LoRA layer with dropout computes dropout(x) A^T. With a few percent of x's elements
 * dropped, peftbench computes x A^T (no dropped copy of x) and subtracts what the dropped
 * elements contributed; the backward does the same for the gradients of A and of x. Each
 * function reads only the dropped elements: p * tokens * features of them, r values each.
 *
 * Tensors are row-major and contiguous; bf16 is passed as its 16 raw bits (uint16_t).
 * Sums are taken in float32 and rounded once to bf16 (round to nearest even, as torch).
 *
 * The undropped product arrives rounded to bf16, so subtracting a dropped part much larger
 * than what remains (an outlier element dropped) would leave that rounding error behind,
 * large against the result. Where a row of hidden (a column of grad_a) has a dropped part
 * larger than its result (compared by their largest elements), that row (column) is
 * recomputed from the kept elements in float32 instead; the functions return how many.
 * Positions must be strictly increasing: the functions check it before reading at them and
 * return -1 otherwise (the caller checks the last one is in range).
 *
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

static inline float larger_magnitude(float largest, float value) {
    const float magnitude = value < 0.0f ? -value : value;
    return magnitude > largest ? magnitude : largest;
}

/* a (r x cols, bf16) as cols x r float32 in out: the r values of one column side by side. */
static void columns_as_float(float *out, const uint16_t *a, int64_t cols, int64_t r) {
    for (int64_t k = 0; k < r; k++)
        for (int64_t j = 0; j < cols; j++) out[j * r + k] = bf16_to_float(a[k * cols + j]);
}

/* hidden[i, k] -= sum over dropped (i, j) of rows[i, j] * a[k, j].
 * hidden: tokens x r (bf16), rows: tokens x cols (bf16), a: r x cols (bf16);
 * scratch: cols * r + 2 * r floats. Positions are sorted, so the row is followed, not
 * divided. Returns the rows recomputed, or -1 for positions not strictly increasing. */
int64_t pb_hidden_minus_dropped(uint16_t *hidden, const uint16_t *rows, const uint16_t *a,
                                const int64_t *positions, int64_t count, int64_t cols,
                                int64_t r, float *scratch) {
    float *columns = scratch, *dropped = scratch + cols * r, *kept = dropped + r;
    columns_as_float(columns, a, cols, r);
    int64_t t = 0, i = 0, row_start = 0, previous = -1, recomputed = 0;
    while (t < count) {
        while (positions[t] >= row_start + cols) { i++; row_start += cols; }
        for (int64_t k = 0; k < r; k++) dropped[k] = 0.0f;
        for (; t < count && positions[t] < row_start + cols; t++) {
            if (positions[t] <= previous) return -1;
            previous = positions[t];
            const float value = bf16_to_float(rows[positions[t]]);
            const float *column = columns + (positions[t] - row_start) * r;
            for (int64_t k = 0; k < r; k++) dropped[k] += value * column[k];
        }
        uint16_t *out = hidden + i * r;
        float largest_dropped = 0.0f, largest_kept = 0.0f;
        for (int64_t k = 0; k < r; k++) {
            kept[k] = bf16_to_float(out[k]) - dropped[k];
            largest_dropped = larger_magnitude(largest_dropped, dropped[k]);
            largest_kept = larger_magnitude(largest_kept, kept[k]);
        }
        if (largest_dropped > largest_kept) {  /* the whole row again, in float32 */
            for (int64_t k = 0; k < r; k++) kept[k] = -dropped[k];
            const uint16_t *row = rows + row_start;
            for (int64_t j = 0; j < cols; j++) {
                const float value = bf16_to_float(row[j]);
                for (int64_t k = 0; k < r; k++) kept[k] += value * columns[j * r + k];
            }
            recomputed++;
        }
        for (int64_t k = 0; k < r; k++) out[k] = float_to_bf16(kept[k]);
    }
    return recomputed;
}

/* The backward's two corrections in one pass over the dropped positions, each skipped when
 * its output is NULL:
 *   grad_a[k, j] -= sum over dropped (i, j) of grad_hidden[i, k] * rows[i, j]
 *     (grad_a: r x cols, float32; turns grad_hidden^T rows into the gradient of A);
 *   grad_x[i, j] -= sum over k of grad_hidden[i, k] * a[k, j] at each dropped (i, j)
 *     (grad_x: tokens x cols, bf16 if x_is_bf16, else float32; removes the adapter's part
 *     where the input was dropped; that part is small against the base layer's).
 * grad_hidden: tokens x r, rows: tokens x cols, a: r x cols (all bf16);
 * scratch: 2 * cols * r + r floats. Returns the columns of grad_a recomputed, or -1 for
 * positions not strictly increasing. */
int64_t pb_backward_minus_dropped(float *grad_a, void *grad_x, int x_is_bf16,
                                  const uint16_t *grad_hidden, const uint16_t *rows,
                                  const uint16_t *a, const int64_t *positions, int64_t count,
                                  int64_t tokens, int64_t cols, int64_t r, float *scratch) {
    float *sums = scratch, *columns = scratch + cols * r, *g = scratch + 2 * cols * r;
    if (grad_a) memset(sums, 0, sizeof(float) * cols * r);
    if (grad_x) columns_as_float(columns, a, cols, r);
    int64_t i = -1, row_start = -cols, previous = -1, recomputed = 0;
    for (int64_t t = 0; t < count; t++) {
        const int64_t position = positions[t];
        if (position <= previous) return -1;
        previous = position;
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
    if (!grad_a) return 0;
    for (int64_t j = 0; j < cols; j++) {
        const float *dropped = sums + j * r;
        float largest_dropped = 0.0f, largest_kept = 0.0f;
        for (int64_t k = 0; k < r; k++) {
            largest_dropped = larger_magnitude(largest_dropped, dropped[k]);
            largest_kept = larger_magnitude(largest_kept, grad_a[k * cols + j] - dropped[k]);
        }
        if (largest_dropped > largest_kept) {  /* the whole column again, in float32 */
            for (int64_t k = 0; k < r; k++) g[k] = -dropped[k];
            for (int64_t row = 0; row < tokens; row++) {
                const float value = bf16_to_float(rows[row * cols + j]);
                for (int64_t k = 0; k < r; k++)
                    g[k] += bf16_to_float(grad_hidden[row * r + k]) * value;
            }
            for (int64_t k = 0; k < r; k++) grad_a[k * cols + j] = g[k];
            recomputed++;
        } else {
            for (int64_t k = 0; k < r; k++) grad_a[k * cols + j] -= dropped[k];
        }
    }
    return recomputed;
}
