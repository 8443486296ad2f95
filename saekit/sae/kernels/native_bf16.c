/* saekit native kernels of the CPU bf16 step (`precision: bf16`), reading bf16 (raw uint16 bits) and computing in
 * float32: the row-wise top-k of the bf16 encoder product and the sparse decode's gather. The bisection top-k is one
 * body for bf16 and float32 rows: the dense float32 step selects with it too (26 -> 17 ms alone on the benchmark
 * shape, one thread; native.c's heap kernel stays for widths that are not a multiple of 256). Built into the same
 * library as native.c (see native.py), called from kernels/sparse.py under CPU bf16 autocast; each has a torch
 * reference and native.c's kernel it is tested against (tests/test_bf16_cpu.py).
 *
 * Why separate from native.c's bf16 twins (measured on the benchmark shape, one thread):
 * - top-k: native.c finds the k-th largest block maximum with a size-k min-heap fed 256 block maxima (~70
 *   data-dependent sifts a row) and runs the final selection through a heap as well; that k-dependent part was
 *   ~15 of its ~28 ms (k 1: 13 ms). Here both thresholds are found by bisection on the float's ordered bits,
 *   rounds of a vectorised count without data-dependent branches (16 for the row's lower bound, 32 for the exact
 *   k-th value among the few candidates): 25 -> 14 ms a step inside the bf16 training step (scripts/profile_step.py).
 * - gather: native.c keeps 32 output columns in registers while the k rows stream past strip by strip, so each
 *   random 1 KB row is visited in d / 32 separate pieces; here each row is read whole, in order, the next rows
 *   prefetched, into float32 accumulators in L1 (13 -> 9 ms alone, 10.5 -> 9.3 ms inside the step). The sums are the same terms in the same order
 *   (slot order), so the result equals native.c's up to the compiler's fused multiply-adds.
 * (Reordering native.c's decoder backward and encoder weight gradient the same way measured no faster.) */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_simd.h"

#if defined(__AVX2__)
#include <immintrin.h>
static inline v8f ld8_bf16(const uint16_t *p) {
    return (v8f)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
}
#else
typedef uint16_t v8h_ __attribute__((vector_size(16)));
typedef uint32_t v8u_ __attribute__((vector_size(32)));
static inline v8f ld8_bf16(const uint16_t *p) { v8h_ h; memcpy(&h, p, sizeof h); return (v8f)(__builtin_convertvector(h, v8u_) << 16); }
#endif
static inline float bf16_f(uint16_t h) { uint32_t w = (uint32_t)h << 16; float f; memcpy(&f, &w, 4); return f; }
static inline v8f splat8(float s) { return (v8f){s, s, s, s, s, s, s, s}; }
static inline void st8(float *p, v8f x) { memcpy(p, &x, sizeof x); }

#define PF 4 /* gathered rows ahead to prefetch: each is a random jump (~90 ns from memory on the benchmark machine) */
static inline void prefetch_row(const void *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 3);
}

/* a[0:d] += c * row[0:d] (row bf16), 32 columns a step */
static inline void axpy_bf16(float *restrict a, float c, const uint16_t *row, int64_t d) {
    const v8f cv = splat8(c);
    int64_t q = 0;
    for (; q + 32 <= d; q += 32) {
        st8(a + q, load8(a + q) + cv * ld8_bf16(row + q));
        st8(a + q + 8, load8(a + q + 8) + cv * ld8_bf16(row + q + 8));
        st8(a + q + 16, load8(a + q + 16) + cv * ld8_bf16(row + q + 16));
        st8(a + q + 24, load8(a + q + 24) + cv * ld8_bf16(row + q + 24));
    }
    for (; q < d; q++) a[q] += c * bf16_f(row[q]);
}

/* out[b] = sum_j w[b, j] * table[idx[b, j]] (table bf16 [n_table, d], sums float32) for b in [0, n_rows).
 * Indices must be in [0, n_table) (checked by the caller). */
void saekit_embed_sum_rows_bf16(const int64_t *idx, const float *w, int64_t n_rows, int32_t k, const uint16_t *table,
                                int64_t d, float *out, int32_t n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t b = 0; b < n_rows; b++) {
        float *o = out + b * d;
        memset(o, 0, (size_t)d * sizeof *o);
        for (int j = 0; j < k; j++) {
            const int64_t ahead = b * k + j + PF; /* into the next rows' slots too */
            if (ahead < n_rows * k) prefetch_row(table + idx[ahead] * d, d * 2);
            axpy_bf16(o, w[b * k + j], table + idx[b * k + j] * d, d);
        }
    }
}

/* -- row-wise top-k of a bf16 matrix (+ float32 bias) ------------------------------------------------------ */
#define BSZ 32 /* block width, as native.c's BS (native.py's BLOCK) */

/* A float's bits as an int32 whose signed order is the float order (no NaN): negative floats flip their
 * magnitude bits. */
static inline int32_t okey(float f) { int32_t b; memcpy(&b, &f, 4); return b ^ ((b >> 31) & 0x7fffffff); }

/* The largest multiple t of 2^shift with count(key[0:n] >= t) >= k (1 <= k <= n), by bisection (32 - shift
 * rounds of a vectorisable count): shift 0 gives the k-th largest key exactly; shift 16 a lower bound of it
 * within one bf16 step, in half the rounds (enough for a threshold that only has to be a lower bound). */
static int32_t kth_key(const int32_t *key, int64_t n, int64_t k, int shift) {
    int64_t lo = INT32_MIN >> shift, hi = INT32_MAX >> shift; /* in units of 2^shift; count(>= lo) >= k */
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        const int32_t t = (int32_t)(mid * ((int64_t)1 << shift));
        int32_t c = 0;
        for (int64_t i = 0; i < n; i++) c += key[i] >= t;
        if (c >= k) lo = mid; else hi = mid - 1;
    }
    return (int32_t)(lo * ((int64_t)1 << shift));
}

typedef struct { int32_t *bkey, *ckey; float *cval; int64_t *cidx; } topk_scratch; /* per thread */

/* okey of x + 0: -0 becomes +0 first, so the two zeros are one key (they are one value, and a tie between them goes
 * to the lower index, as between any equal values) */
static inline v8i okey8(v8f x) { const v8i r = (v8i)(x + splat8(0.0f)); return r ^ ((r >> 31) & 0x7fffffff); }

/* One row: pass 1 reads every block (pre + bias) for its maximum; T = the k-th largest block maximum (rounded
 * down to a multiple of 2^16 in key order) bounds the row's k-th largest value from below, so pass 2 collects, from the blocks whose maximum is >= T, every element
 * >= T (at least k); the answer is the k largest of those: all above their k-th largest value, then the ones
 * equal to it in index order (the lower index wins a tie).
 * Returns 1 if the row holds a NaN (outputs unspecified), else 0. One body for float32 and bf16 rows (ELEM, LOAD8). */
#define TOPK_ROW_BISECT(NAME, ELEM, LOAD8) \
static int NAME(const ELEM *row, const float *bias, int64_t nb, int32_t k, float *vals, int64_t *idx, topk_scratch *s) { \
    v8i nan_acc = {0}; \
    int64_t b = 0; \
    for (; b < nb; b += 8) { /* nb % 8 == 0 (checked by the caller): eight block maxima per shuffle tree */ \
        v8f m[8]; \
        for (int u = 0; u < 8; u++) { \
            const ELEM *p = row + (b + u) * BSZ; \
            v8f x0 = LOAD8(p), x1 = LOAD8(p + 8), x2 = LOAD8(p + 16), x3 = LOAD8(p + 24); \
            if (bias) { \
                const float *c = bias + (b + u) * BSZ; \
                x0 += load8(c); x1 += load8(c + 8); x2 += load8(c + 16); x3 += load8(c + 24); \
            } \
            nan_acc |= unord8(x0, x1) | unord8(x2, x3); \
            m[u] = vmax8(vmax8(x0, x1), vmax8(x2, x3)); \
        } \
        const v8i key = okey8(hmax8x8(m)); \
        memcpy(s->bkey + b, &key, sizeof key); \
    } \
    if (movemask8(nan_acc)) return 1; \
    const int32_t T = kth_key(s->bkey, nb, k, 16); /* <= the k-th largest block maximum <= the k-th largest value */ \
    const int32_t Tb = T ^ ((T >> 31) & 0x7fffffff); /* okey is its own inverse */ \
    float Tf; \
    memcpy(&Tf, &Tb, 4); \
    const v8f Tv = splat8(Tf); \
    int64_t n = 0; \
    for (b = 0; b < nb; b++) { \
        if (s->bkey[b] < T) continue; \
        const ELEM *p = row + b * BSZ; \
        const float *c = bias ? bias + b * BSZ : NULL; \
        v8f x[4] = {LOAD8(p), LOAD8(p + 8), LOAD8(p + 16), LOAD8(p + 24)}; \
        if (c) for (int u = 0; u < 4; u++) x[u] += load8(c + 8 * u); \
        uint32_t mask = (uint32_t)movemask8((v8i)(x[0] >= Tv)) | (uint32_t)movemask8((v8i)(x[1] >= Tv)) << 8 \
                        | (uint32_t)movemask8((v8i)(x[2] >= Tv)) << 16 | (uint32_t)movemask8((v8i)(x[3] >= Tv)) << 24; \
        float xs[BSZ]; \
        memcpy(xs, x, sizeof xs); \
        while (mask) { /* float >= Tf: a superset of key >= T, harmless: the selection below uses keys */ \
            const int q = __builtin_ctz(mask); \
            mask &= mask - 1; \
            s->ckey[n] = okey(xs[q] + 0.0f); s->cval[n] = xs[q]; s->cidx[n] = b * BSZ + q; n++; \
        } \
    } \
    const int32_t t = n == k ? INT32_MIN : kth_key(s->ckey, n, k, 0); \
    int32_t m = 0; \
    for (int64_t i = 0; i < n; i++) \
        if (s->ckey[i] > t) { vals[m] = s->cval[i]; idx[m] = s->cidx[i]; m++; } \
    for (int64_t i = 0; i < n && m < k; i++) \
        if (s->ckey[i] == t) { vals[m] = s->cval[i]; idx[m] = s->cidx[i]; m++; } \
    return 0; \
}
TOPK_ROW_BISECT(topk_row_bf16_bisect, uint16_t, ld8_bf16)
TOPK_ROW_BISECT(topk_row_f32_bisect, float, load8)

/* Row-wise top-k of pre ([n_rows, n_cols], float32 or bf16 raw bits: ELEM) + bias (float32 [n_cols] or NULL) on
 * n_threads threads, the k values float32 (the stored values exactly, plus the bias), unordered. Requires
 * n_cols % 256 == 0 and 1 <= k <= n_cols / 32. Returns 1 if a NaN was seen (the caller falls back to torch.topk),
 * -1 on bad sizes or no memory, else 0. */
#define TOPK_ROWS_BISECT(NAME, ROW, ELEM) \
int NAME(const ELEM *pre, const float *bias, int64_t n_rows, int64_t n_cols, int32_t k, float *vals, int64_t *idx, \
         int32_t n_threads) { \
    const int64_t nb = n_cols / BSZ; \
    if (k < 1 || n_cols % (8 * BSZ) || k > nb) return -1; \
    int nan_seen = 0, failed = 0; \
_Pragma("omp parallel num_threads(n_threads) reduction(|:nan_seen, failed)") \
    { \
        topk_scratch s = {malloc((size_t)nb * 4), malloc((size_t)n_cols * 4), malloc((size_t)n_cols * 4), \
                          malloc((size_t)n_cols * 8)}; \
        const int ok = s.bkey && s.ckey && s.cval && s.cidx; \
        failed |= !ok; \
_Pragma("omp for schedule(static)") \
        for (int64_t r = 0; r < n_rows; r++) \
            if (ok) nan_seen |= ROW(pre + r * n_cols, bias, nb, k, vals + r * k, idx + r * k, &s); \
        free(s.bkey); free(s.ckey); free(s.cval); free(s.cidx); \
    } \
    return failed ? -1 : nan_seen; \
}
TOPK_ROWS_BISECT(saekit_topk_rows_bf16_bisect, topk_row_bf16_bisect, uint16_t)
TOPK_ROWS_BISECT(saekit_topk_rows_bisect, topk_row_f32_bisect, float)
