/* saekit native kernels: plain C11 + GCC/Clang vector extensions, no Python or torch headers.
 *
 * Built on first use by saekit/sae/native.py (`cc -O3 -march=native -fopenmp -shared`) and called through
 * ctypes on contiguous float32 CPU tensors. Rows are split over OpenMP threads: loaded after torch, the
 * library binds to torch's own libgomp, so it reuses torch's worker threads (a second thread pool would
 * fight the first one's spin-waiting workers for the cores). Without OpenMP the pragmas are ignored and
 * the kernels run on one thread. Everything here has a torch reference it is tested against.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_simd.h"

/* -- row-wise top-k ------------------------------------------------------------------------------ */
typedef struct { float v; int64_t i; } item;

static void sift_items(item *h, int k, int p) { /* min-heap on v */
    item x = h[p];
    for (;;) {
        int c = 2 * p + 1;
        if (c >= k) break;
        if (c + 1 < k && h[c + 1].v < h[c].v) c++;
        if (!(h[c].v < x.v)) break;
        h[p] = h[c];
        p = c;
    }
    h[p] = x;
}

#define BS 32          /* block width: four 8-float vectors */
#define MAX_BLOCKS 65536
#define MAX_K 1024

/* One pass computes each block's maximum (vectorised, the only full read of the row); the k-th
 * largest block maximum T is a lower bound on the row's k-th largest value, so every top-k element is
 * >= T and sits in a block whose maximum is >= T. A second pass visits only those blocks (about k of
 * n_cols / BS) and keeps the k largest in a min-heap. Exact; the order of the k outputs is unspecified.
 * Returns 1 if the row holds a NaN (outputs then unspecified), else 0. */
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));
/* bf16 is the high half of a float32: widening is a 16-bit shift, exact */
#if defined(__AVX2__)
#include <immintrin.h>
static inline v8f load8_bf16(const uint16_t *p) { /* one vpmovzxwd from memory and one shift */
    return (v8f)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
}
#else
static inline v8f load8_bf16(const uint16_t *p) {
    v8h h; memcpy(&h, p, sizeof h);
    return (v8f)(__builtin_convertvector(h, v8u) << 16);
}
#endif
static inline float bf16_to_float(uint16_t h) { uint32_t w = (uint32_t)h << 16; float f; memcpy(&f, &w, 4); return f; }
#define IDENTITY(x) (x)
/* With `bias` (a float32 [n_cols] vector, or NULL) every element is read as pre + bias: the encoder
 * product can then be written by a bias-free GEMM (beta = 0), instead of first copying the bias over the
 * whole [B, d_sae] block and having the GEMM read it back. The selection is over pre + bias, exactly.
 * Both passes are vectorised: block maxima eight blocks at a time (hmax8x8), and the second pass tests
 * whole vectors against the threshold and visits only the lanes that pass. */
#define LOAD_BLOCK(LOAD8, p, c) \
    v8f x0 = LOAD8(p), x1 = LOAD8(p + 8), x2 = LOAD8(p + 16), x3 = LOAD8(p + 24); \
    if (c) { x0 += load8(c); x1 += load8(c + 8); x2 += load8(c + 16); x3 += load8(c + 24); }
#define TOPK_ROW(NAME, ELEM, LOAD8, LOAD1) \
static int NAME(const ELEM *row, const float *bias, int64_t nb, int32_t k, float *vals, int64_t *idx) { \
    float bmax[nb + 8], fh[MAX_K]; /* nb <= MAX_BLOCKS: at most 256 KiB of stack */ \
    item h[MAX_K]; \
    v8i nan_acc = {0}; \
    int64_t b = 0; \
    for (; b + 8 <= nb; b += 8) { \
        v8f m[8]; \
        for (int u = 0; u < 8; u++) { \
            const ELEM *p = row + (b + u) * BS; \
            const float *c = bias ? bias + (b + u) * BS : NULL; \
            LOAD_BLOCK(LOAD8, p, c) \
            nan_acc |= unord8(x0, x1) | unord8(x2, x3); \
            m[u] = vmax8(vmax8(x0, x1), vmax8(x2, x3)); \
        } \
        v8f r = hmax8x8(m); \
        memcpy(bmax + b, &r, sizeof r); \
    } \
    for (; b < nb; b++) { \
        const ELEM *p = row + b * BS; \
        const float *c = bias ? bias + b * BS : NULL; \
        LOAD_BLOCK(LOAD8, p, c) \
        nan_acc |= unord8(x0, x1) | unord8(x2, x3); \
        v8f m = vmax8(vmax8(x0, x1), vmax8(x2, x3)); \
        float s = m[0]; \
        for (int q = 1; q < 8; q++) s = m[q] > s ? m[q] : s; \
        bmax[b] = s; \
    } \
    int nan_seen = movemask8(nan_acc) != 0; \
    for (int q = 0; q < k; q++) fh[q] = bmax[q]; \
    for (int p = k / 2 - 1; p >= 0; p--) sift_floats(fh, k, p); \
    for (b = k; b < nb; b++) \
        if (bmax[b] > fh[0]) { fh[0] = bmax[b]; sift_floats(fh, k, 0); } \
    const float T = fh[0]; \
    const v8f Tv = {T, T, T, T, T, T, T, T}; \
    int n = 0; \
    for (b = 0; b < nb; b++) { \
        if (!(bmax[b] >= T)) continue; \
        const ELEM *p = row + b * BS; \
        const float *c = bias ? bias + b * BS : NULL; \
        LOAD_BLOCK(LOAD8, p, c) \
        uint32_t mask = (uint32_t)movemask8(x0 >= Tv) | (uint32_t)movemask8(x1 >= Tv) << 8 \
                        | (uint32_t)movemask8(x2 >= Tv) << 16 | (uint32_t)movemask8(x3 >= Tv) << 24; \
        while (mask) { \
            const int q = __builtin_ctz(mask); \
            mask &= mask - 1; \
            float v = LOAD1(p[q]); \
            if (c) v += c[q]; \
            if (n < k) { \
                h[n].v = v; h[n].i = b * BS + q; \
                if (++n == k) for (int s = k / 2 - 1; s >= 0; s--) sift_items(h, k, s); \
            } else if (v > h[0].v) { \
                h[0].v = v; h[0].i = b * BS + q; \
                sift_items(h, k, 0); \
            } \
        } \
    } \
    for (int q = n; q < k; q++) { h[q].v = 0.0f; h[q].i = 0; } /* only reachable with NaN */ \
    for (int q = 0; q < k; q++) { vals[q] = h[q].v; idx[q] = h[q].i; } \
    return nan_seen; \
}
TOPK_ROW(topk_row, float, load8, IDENTITY)
TOPK_ROW(topk_row_bf16, uint16_t, load8_bf16, bf16_to_float)

/* Row-wise top-k of pre + bias (bias may be NULL) over rows [0, n_rows) of a row-major [n_rows, n_cols]
 * matrix on n_threads OpenMP threads. Requires n_cols % BS == 0 and 1 <= k <= min(MAX_K, n_cols / BS).
 * Returns 1 if a NaN was seen (the caller then falls back to torch.topk, which orders NaN first), -1 on
 * bad sizes, else 0. */
int saekit_topk_rows(const float *pre, const float *bias, int64_t n_rows, int64_t n_cols, int32_t k, float *vals,
                     int64_t *idx, int32_t n_threads) {
    int64_t nb = n_cols / BS;
    if (k < 1 || k > MAX_K || n_cols % BS || k > nb || nb > MAX_BLOCKS) return -1;
    int nan_seen = 0;
#pragma omp parallel for num_threads(n_threads) schedule(static) reduction(|:nan_seen)
    for (int64_t r = 0; r < n_rows; r++)
        nan_seen |= topk_row(pre + r * n_cols, bias, nb, k, vals + r * k, idx + r * k);
    return nan_seen;
}

/* The same on a bf16 matrix (raw uint16 bits): the pre-activations of a bf16 encoder product. The k
 * values come out as float32 (the bf16 values exactly, plus the float32 bias when one is given). */
int saekit_topk_rows_bf16(const uint16_t *pre, const float *bias, int64_t n_rows, int64_t n_cols, int32_t k,
                          float *vals, int64_t *idx, int32_t n_threads) {
    int64_t nb = n_cols / BS;
    if (k < 1 || k > MAX_K || n_cols % BS || k > nb || nb > MAX_BLOCKS) return -1;
    int nan_seen = 0;
#pragma omp parallel for num_threads(n_threads) schedule(static) reduction(|:nan_seen)
    for (int64_t r = 0; r < n_rows; r++)
        nan_seen |= topk_row_bf16(pre + r * n_cols, bias, nb, k, vals + r * k, idx + r * k);
    return nan_seen;
}

/* -- gathered dot products ------------------------------------------------------------------------- */
/* out[b, j] = table[idx[b, j]] . rows[b] for b in [0, n_rows): the k dot products per row that the
 * backward of a sparse decode needs. Indices must be in [0, n_table) (checked by the caller). The _bf16
 * variant reads a bf16 table (raw uint16 bits) and accumulates in float32. */
#define GATHER_DOT(NAME, ELEM, LOAD8, LOAD1) \
void NAME(const int64_t *idx, int64_t n_rows, int32_t k, const ELEM *table, const float *rows, int64_t d, \
          float *out, int32_t n_threads) { \
_Pragma("omp parallel for num_threads(n_threads) schedule(static)") \
    for (int64_t b = 0; b < n_rows; b++) { \
        const float *x = rows + b * d; \
        for (int j = 0; j < k; j++) { \
            const ELEM *w = table + idx[b * k + j] * d; \
            v8f a0 = {0}, a1 = {0}; \
            int64_t q = 0; \
            for (; q + 16 <= d; q += 16) { \
                a0 += LOAD8(w + q) * load8(x + q); \
                a1 += LOAD8(w + q + 8) * load8(x + q + 8); \
            } \
            a0 += a1; \
            float s = 0.0f; \
            for (int t = 0; t < 8; t++) s += a0[t]; \
            for (; q < d; q++) s += LOAD1(w[q]) * x[q]; \
            out[b * k + j] = s; \
        } \
    } \
}
GATHER_DOT(saekit_gather_dot, float, load8, IDENTITY)
GATHER_DOT(saekit_gather_dot_bf16, uint16_t, load8_bf16, bf16_to_float)

/* -- transposed sparse products ------------------------------------------------------------------- */
#define TILE 32 /* latents per tile: each row of a [D, TILE] block of the transposed output is 2 cache lines */
/* sum of x[i]^2 in float vector lanes, added up in double (the gradient-norm by-products below) */
static double sum_squares(const float *x, int64_t m) {
    v8f s0 = {0}, s1 = {0};
    int64_t q = 0;
    for (; q + 16 <= m; q += 16) { v8f a = load8(x + q), b = load8(x + q + 8); s0 += a * a; s1 += b * b; }
    double s = 0.0;
    for (int t = 0; t < 8; t++) s += (double)s0[t] + (double)s1[t];
    for (; q < m; q++) s += (double)x[q] * (double)x[q];
    return s;
}

/* out = S^T @ M, [n, d] (or its transpose M^T @ S, [d, n], when `transposed`), where S [n_rows, n] holds
 * w[b, j] at (b, idx[b, j]) (duplicates add): the sparse weight gradients of the encoder and decoder.
 * The entries are counting-sorted by latent (stable, so the sums run in row order whatever the thread
 * count), then each thread accumulates whole tiles of latents in a small buffer and writes them once.
 * Indices must be in [0, n) (checked by the caller); with m_bf16, M is bf16 (raw uint16 bits) and the sums
 * are float32. Returns -1 if scratch memory is unavailable. */
/* a[0:d] = sum_s ws[s] * M[rows[s]]: the accumulators for 32 columns stay in registers while the entries
 * stream past (no read-modify-write of `a` per entry). rows and ws are the entries' rows and weights, gathered
 * once by sort_by_latent (each entry is visited d / 32 times; no division or indirect weight load per visit). */
#define ACCUMULATE_ROWS(NAME, ELEM, LOAD8, LOAD1) \
static void NAME(float *restrict a, const int64_t *rows, const float *ws, int64_t n_entries, const ELEM *M, int64_t d) { \
    int64_t q = 0; \
    for (; q + 32 <= d; q += 32) { \
        v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}; \
        for (int64_t s = 0; s < n_entries; s++) { \
            const ELEM *m = M + rows[s] * d + q; \
            const v8f c = {ws[s], ws[s], ws[s], ws[s], ws[s], ws[s], ws[s], ws[s]}; \
            a0 += c * LOAD8(m); a1 += c * LOAD8(m + 8); a2 += c * LOAD8(m + 16); a3 += c * LOAD8(m + 24); \
        } \
        memcpy(a + q, &a0, 32); memcpy(a + q + 8, &a1, 32); memcpy(a + q + 16, &a2, 32); memcpy(a + q + 24, &a3, 32); \
    } \
    for (; q < d; q++) { \
        float t = 0.0f; \
        for (int64_t s = 0; s < n_entries; s++) t += ws[s] * LOAD1(M[rows[s] * d + q]); \
        a[q] = t; \
    } \
}
ACCUMULATE_ROWS(accumulate_rows, float, load8, IDENTITY)
ACCUMULATE_ROWS(accumulate_rows_bf16, uint16_t, load8_bf16, bf16_to_float)

/* Counting sort of the n_entries = n_rows * k entries by latent, stable: entries of latent f are
 * order[start[f] .. start[f + 1]), in row order; rows[s] = order[s] / k and ws[s] = w[order[s]] (the row and
 * the weight of each, in the same order, so the kernels divide and gather once per entry, not once per visit).
 * One allocation, freed by the caller through *start_out. Returns -1 if memory is unavailable. */
typedef struct { int64_t *start, *order, *rows; float *ws; } sorted_entries;
static int sort_by_latent(const int64_t *idx, const float *w, int64_t n_entries, int32_t k, int64_t n, sorted_entries *out) {
    const size_t ne = (size_t)(n_entries ? n_entries : 1);
    int64_t *start = calloc((size_t)n + 1 + (size_t)n + 2 * ne + (ne + 1) / 2, sizeof *start);
    if (!start) return -1;
    int64_t *fill = start + n + 1, *order = fill + n, *rows = order + ne;
    float *ws = (float *)(rows + ne);
    for (int64_t e = 0; e < n_entries; e++) start[idx[e] + 1]++;
    for (int64_t f = 0; f < n; f++) start[f + 1] += start[f];
    memcpy(fill, start, (size_t)n * sizeof *fill);
    for (int64_t e = 0; e < n_entries; e++) {
        const int64_t s = fill[idx[e]]++;
        order[s] = e; rows[s] = e / k; ws[s] = w[e];
    }
    *out = (sorted_entries){start, order, rows, ws};
    return 0;
}

/* out[q * n + f0 + r] = acc[r * d + q] for r < rows, q < d: a [rows, d] tile written transposed into a [d, n]
 * output, 8 x 8 blocks transposed in registers (a pure copy). Why: the scalar copy read acc down a column (stride
 * 2 KiB at d 512) and wrote 32-float pieces 32 KiB apart, both strides that fall into one or two L1 sets; it took
 * 4.3 of the encoder weight gradient's 16 ms on the benchmark shape. */
static void store8(float *p, v8f x) { memcpy(p, &x, sizeof x); }
static void transpose8x8(const float *a, int64_t lda, float *o, int64_t ldo) {
    v8f r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = load8(a + i * lda);
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int i = 0; i < 4; i++) { /* column i from u[i] (rows 0-3) and u[i + 4] (rows 4-7), column i + 4 likewise */
        store8(o + i * ldo, __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11));
        store8(o + (i + 4) * ldo, __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15));
    }
}
#if defined(__AVX__)
static inline void stream8(float *p, v8f x) { _mm256_stream_ps(p, (__m256)x); }
static inline void stream_fence(void) { _mm_sfence(); } /* streamed stores are weakly ordered: fence before the barrier */
#else
static inline void stream8(float *p, v8f x) { store8(p, x); }
static inline void stream_fence(void) {}
#endif
static void store_transposed(const float *acc, int64_t rows, int64_t d, float *out, int64_t n) {
    const int64_t r8 = rows & ~(int64_t)7, d8 = d & ~(int64_t)7;
    if (rows == TILE && n % 8 == 0 && (uintptr_t)out % 32 == 0) { /* whole lines: streamed, no read for ownership */
        float buf[8 * TILE];
        for (int64_t q = 0; q < d8; q += 8) {
            for (int64_t r = 0; r < TILE; r += 8) transpose8x8(acc + r * d + q, d, buf + r, TILE);
            for (int i = 0; i < 8; i++)
                for (int r = 0; r < TILE; r += 8) stream8(out + (q + i) * n + r, load8(buf + i * TILE + r));
        }
    } else {
        for (int64_t q = 0; q < d8; q += 8)
            for (int64_t r = 0; r < r8; r += 8) transpose8x8(acc + r * d + q, d, out + q * n + r, n);
    }
    for (int64_t q = 0; q < d; q++) /* the edges: columns past d8, rows past r8 */
        for (int64_t r = q < d8 ? r8 : 0; r < rows; r++) out[q * n + r] = acc[r * d + q];
}

/* With ss_out, also *ss_out = the sum of squares of everything written (the gradient-norm by-product: each
 * tile is squared while it is still in cache; per-tile sums in double, added in tile order, so the result
 * does not depend on the thread count). */
int saekit_sparse_t_matmul(const int64_t *idx, const float *w, int64_t n_rows, int32_t k, const void *M, int32_t m_bf16,
                           int64_t d, int64_t n, int32_t transposed, float *out, int32_t n_threads, double *ss_out) {
    sorted_entries se;
    if (sort_by_latent(idx, w, n_rows * k, k, n, &se)) return -1;
    const int64_t *start = se.start;
    int64_t n_tiles = (n + TILE - 1) / TILE;
    double *tile_ss = ss_out ? malloc((size_t)(n_tiles ? n_tiles : 1) * sizeof *tile_ss) : NULL;
    if (ss_out && !tile_ss) { free(se.start); return -1; }
    int failed = 0;
#pragma omp parallel num_threads(n_threads) reduction(|:failed)
    {
        float *acc = malloc((size_t)TILE * (size_t)d * sizeof *acc);
        if (!acc) failed = 1;
#pragma omp for schedule(dynamic, 8)
        for (int64_t t = 0; t < n_tiles; t++) {
            if (!acc) continue;
            int64_t f0 = t * TILE, f1 = f0 + TILE < n ? f0 + TILE : n;
            for (int64_t f = f0; f < f1; f++) {
                const int64_t s0 = start[f], ns = start[f + 1] - s0;
                if (m_bf16)
                    accumulate_rows_bf16(acc + (f - f0) * d, se.rows + s0, se.ws + s0, ns, M, d);
                else
                    accumulate_rows(acc + (f - f0) * d, se.rows + s0, se.ws + s0, ns, M, d);
            }
            if (tile_ss) tile_ss[t] = sum_squares(acc, (f1 - f0) * d);
            if (transposed) {
                store_transposed(acc, f1 - f0, d, out + f0, n);
            } else {
                memcpy(out + f0 * d, acc, (size_t)(f1 - f0) * (size_t)d * sizeof *acc);
            }
        }
        free(acc);
        stream_fence();
    }
    if (tile_ss) {
        double total = 0.0;
        for (int64_t t = 0; t < n_tiles; t++) total += tile_ss[t];
        *ss_out = total;
        free(tile_ss);
    }
    free(se.start);
    return failed ? -1 : 0;
}

/* -- fused backward of a sparse decode ---------------------------------------------------------------- */
/* For one latent f: gw[0:d] = sum_s vs[s] * M[rows[s]] (the decoder-weight gradient row) and
 * gv[e_s] = W[f] . M[rows[s]] (the gradient of each selected value), e_s = entries[s], rows[s] = e_s / k,
 * vs[s] = vals[e_s], in one pass over the rows of M: the separate gather_dot + sparse_t_matmul read ~2^17 random
 * rows twice (once of W, once of M); here each M row is read once and W[f] once per latent. dacc holds one vector
 * of dot partials per entry. Measured no faster here and in the encoder weight gradient (one thread, benchmark
 * shape): streamed gW stores, rows and weights gathered once instead of e / k per visit (kept: simpler loops), prefetching the next
 * latent's rows, a column-strip-outer order that keeps M's [n_rows, 128] slice in L2 (the per-byte gather cost
 * was the same for an L2-resident M: the time is the ~4M single-use line fills, not where they come from). */
static inline float hsum8(v8f a) { float s = 0.0f; for (int t = 0; t < 8; t++) s += a[t]; return s; }
#define DECODE_BWD_LATENT(NAME, ELEM, LOAD8, LOAD1) \
static void NAME(float *restrict gw, float *restrict gv, v8f *restrict dacc, const float *wf, const int64_t *entries, \
                 const int64_t *rows, const float *vs, int64_t n_e, const ELEM *M, int64_t d) { \
    const v8f zero = {0}; \
    for (int64_t s = 0; s < n_e; s++) dacc[s] = zero; \
    int64_t q = 0; \
    for (; q + 32 <= d; q += 32) { \
        const v8f w0 = load8(wf + q), w1 = load8(wf + q + 8), w2 = load8(wf + q + 16), w3 = load8(wf + q + 24); \
        v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}; \
        for (int64_t s = 0; s < n_e; s++) { \
            const ELEM *m = M + rows[s] * d + q; \
            const v8f c = {vs[s], vs[s], vs[s], vs[s], vs[s], vs[s], vs[s], vs[s]}; \
            const v8f g0 = LOAD8(m), g1 = LOAD8(m + 8), g2 = LOAD8(m + 16), g3 = LOAD8(m + 24); \
            a0 += c * g0; a1 += c * g1; a2 += c * g2; a3 += c * g3; \
            dacc[s] += (w0 * g0 + w1 * g1) + (w2 * g2 + w3 * g3); \
        } \
        memcpy(gw + q, &a0, 32); memcpy(gw + q + 8, &a1, 32); memcpy(gw + q + 16, &a2, 32); memcpy(gw + q + 24, &a3, 32); \
    } \
    for (; q < d; q++) { \
        float t = 0.0f; \
        for (int64_t s = 0; s < n_e; s++) { \
            const float g = LOAD1(M[rows[s] * d + q]); \
            t += vs[s] * g; \
            dacc[s][0] += wf[q] * g; \
        } \
        gw[q] = t; \
    } \
    for (int64_t s = 0; s < n_e; s++) gv[entries[s]] = hsum8(dacc[s]); \
}
DECODE_BWD_LATENT(decode_bwd_latent, float, load8, IDENTITY)
DECODE_BWD_LATENT(decode_bwd_latent_bf16, uint16_t, load8_bf16, bf16_to_float)

/* gW [n, d] = S^T @ M and gvals[b, j] = W[idx[b, j]] . M[b] for S [n_rows, n] holding vals[b, j] at
 * (b, idx[b, j]): both gradients of x_hat = S @ W given grad x_hat = M (float32, or bf16 with m_bf16).
 * Latents are independent, so the result does not depend on the thread count. Indices must be in
 * [0, n) (checked by the caller). Returns -1 if scratch memory is unavailable. */
int saekit_decode_backward(const int64_t *idx, const float *vals, int64_t n_rows, int32_t k, const float *W,
                           const void *M, int32_t m_bf16, int64_t d, int64_t n, float *gW, float *gvals,
                           int32_t n_threads) {
    sorted_entries se;
    if (sort_by_latent(idx, vals, n_rows * k, k, n, &se)) return -1;
    const int64_t *start = se.start;
    int64_t most = 1;
    for (int64_t f = 0; f < n; f++) most = start[f + 1] - start[f] > most ? start[f + 1] - start[f] : most;
    int failed = 0;
#pragma omp parallel num_threads(n_threads) reduction(|:failed)
    {
        v8f *dacc = NULL;
        if (posix_memalign((void **)&dacc, 64, (size_t)most * sizeof *dacc)) { dacc = NULL; failed = 1; }
#pragma omp for schedule(dynamic, 64)
        for (int64_t f = 0; f < n; f++) {
            if (!dacc) continue;
            const int64_t s0 = start[f], ns = start[f + 1] - s0;
            if (m_bf16)
                decode_bwd_latent_bf16(gW + f * d, gvals, dacc, W + f * d, se.order + s0, se.rows + s0, se.ws + s0, ns, M, d);
            else
                decode_bwd_latent(gW + f * d, gvals, dacc, W + f * d, se.order + s0, se.rows + s0, se.ws + s0, ns, M, d);
        }
        free(dacc);
    }
    free(se.start);
    return failed ? -1 : 0;
}

/* -- sparse decode ----------------------------------------------------------------------------------- */
/* out[b] = sum_j w[b, j] * table[idx[b, j]] for b in [0, n_rows): the forward of a sparse decode,
 * accumulators for 32 columns at a time in registers. Indices must be in [0, n_table) (checked by the
 * caller). The _bf16 variant reads a bf16 table (raw uint16 bits) and sums in float32. */
#define EMBED_SUM(NAME, ELEM, LOAD8, LOAD1) \
void NAME(const int64_t *idx, const float *w, int64_t n_rows, int32_t k, const ELEM *table, int64_t d, \
          float *out, int32_t n_threads) { \
_Pragma("omp parallel for num_threads(n_threads) schedule(static)") \
    for (int64_t b = 0; b < n_rows; b++) { \
        const int64_t *ib = idx + b * k; \
        const float *wb = w + b * k; \
        float *o = out + b * d; \
        int64_t q = 0; \
        for (; q + 32 <= d; q += 32) { \
            v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}; \
            for (int j = 0; j < k; j++) { \
                const ELEM *m = table + ib[j] * d + q; \
                const v8f c = {wb[j], wb[j], wb[j], wb[j], wb[j], wb[j], wb[j], wb[j]}; \
                a0 += c * LOAD8(m); a1 += c * LOAD8(m + 8); a2 += c * LOAD8(m + 16); a3 += c * LOAD8(m + 24); \
            } \
            memcpy(o + q, &a0, 32); memcpy(o + q + 8, &a1, 32); memcpy(o + q + 16, &a2, 32); memcpy(o + q + 24, &a3, 32); \
        } \
        for (; q < d; q++) { \
            float t = 0.0f; \
            for (int j = 0; j < k; j++) t += wb[j] * LOAD1(table[ib[j] * d + q]); \
            o[q] = t; \
        } \
    } \
}
EMBED_SUM(saekit_embed_sum, float, load8, IDENTITY)
EMBED_SUM(saekit_embed_sum_bf16, uint16_t, load8_bf16, bf16_to_float)

/* -- unit-norm decoder rows ----------------------------------------------------------------------------- */
static inline float dot_row(const float *a, const float *b, int64_t d) {
    v8f s0 = {0}, s1 = {0};
    int64_t q = 0;
    for (; q + 16 <= d; q += 16) { s0 += load8(a + q) * load8(b + q); s1 += load8(a + q + 8) * load8(b + q + 8); }
    s0 += s1;
    float s = 0.0f;
    for (int t = 0; t < 8; t++) s += s0[t];
    for (; q < d; q++) s += a[q] * b[q];
    return s;
}

/* g[f] -= (g[f] . w[f]) w[f] for every row f of [n, d]: the decoder gradient without its component along
 * each (unit) row, one read of g and w and one write of g (each row stays in L1 between the two passes).
 * Rows are independent, so the result does not depend on the thread count. With ss_out, also *ss_out = the
 * sum of squares of the new g (row sums in double, added in row order: the gradient-norm by-product, read
 * while the row is in L1). Returns -1 (nothing changed) if scratch memory is unavailable. */
int saekit_rows_remove_parallel(float *g, const float *w, int64_t n, int64_t d, int32_t n_threads, double *ss_out) {
    double *row_ss = ss_out ? malloc((size_t)(n ? n : 1) * sizeof *row_ss) : NULL;
    if (ss_out && !row_ss) return -1;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t f = 0; f < n; f++) {
        float *gf = g + f * d;
        const float *wf = w + f * d;
        const float c = dot_row(gf, wf, d);
        for (int64_t q = 0; q < d; q++) gf[q] -= c * wf[q];
        if (row_ss) row_ss[f] = sum_squares(gf, d);
    }
    if (row_ss) {
        double total = 0.0;
        for (int64_t f = 0; f < n; f++) total += row_ss[f];
        *ss_out = total;
        free(row_ss);
    }
    return 0;
}

/* w[f] /= max(||w[f]||, 1e-12) for every row f of [n, d], in place, one read and one write. */
void saekit_rows_unit_norm(float *w, int64_t n, int64_t d, int32_t n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t f = 0; f < n; f++) {
        float *wf = w + f * d;
        float s = __builtin_sqrtf(dot_row(wf, wf, d));
        s = s > 1e-12f ? s : 1e-12f;
        for (int64_t q = 0; q < d; q++) wf[q] /= s;
    }
}
