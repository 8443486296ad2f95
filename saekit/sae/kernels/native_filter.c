/* saekit certified bf16 pre-filter: an EXACT float32 row-wise top-k of x_c @ W + b that uses a bf16
 * product only to find candidates. Plain C11 + GCC/Clang vector extensions, built together with native.c
 * (see native.py) and driven by native_filter.py, whose docstring derives the error bound e[b, j]:
 *
 *   |pre_bf16[b, j] + b[j] - r[b, j]| <= e[b, j] = c * ||x_c[b]|| * ||W[:, j]|| + u_rel * |pre_bf16[b, j]|
 *                                               + a_rel * |b[j]| + tiny[b]
 *
 * where r[b, j] = fl(dot(x_c[b], W[:, j]) + b[j]) is the float32 value this file recomputes (fixed summation
 * order, so it does not depend on the thread count). Per row: L = pre + b - e, U = pre + b + e, t = the k-th
 * largest L; every latent with U < t has r < t <= the k-th largest r, so the top-k of r over all latents is
 * the top-k of r over the candidates {j : U[j] >= t} (at least k of them: U >= L). Ties: the larger value
 * first, then the lower latent index (a total order, so the chosen set is unique).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "native_simd.h"

/* Sum of a[q] * b[q] in a fixed order: four 8-lane accumulators over 32-float steps, then the lanes. */
static inline float f_dot(const float *a, const float *b, int64_t d) {
    v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t q = 0;
    for (; q + 32 <= d; q += 32) {
        s0 += load8(a + q) * load8(b + q);
        s1 += load8(a + q + 8) * load8(b + q + 8);
        s2 += load8(a + q + 16) * load8(b + q + 16);
        s3 += load8(a + q + 24) * load8(b + q + 24);
    }
    s0 = (s0 + s1) + (s2 + s3);
    float s = 0.0f;
    for (int t = 0; t < 8; t++) s += s0[t];
    for (; q < d; q++) s += a[q] * b[q];
    return s;
}

/* f_dot of four rows with one w (each w vector loaded once for the four): per row the same operations in the
 * same order as f_dot, so a value does not depend on which rows share its latent. */
static inline void f_dot4(const float *const xs[4], const float *w, int64_t d, float out[4]) {
    v8f a[4][4];
    memset(a, 0, sizeof a);
    int64_t q = 0;
    for (; q + 32 <= d; q += 32) {
        const v8f w0 = load8(w + q), w1 = load8(w + q + 8), w2 = load8(w + q + 16), w3 = load8(w + q + 24);
        for (int r = 0; r < 4; r++) {
            a[r][0] += load8(xs[r] + q) * w0;
            a[r][1] += load8(xs[r] + q + 8) * w1;
            a[r][2] += load8(xs[r] + q + 16) * w2;
            a[r][3] += load8(xs[r] + q + 24) * w3;
        }
    }
    for (int r = 0; r < 4; r++) {
        const v8f s0 = (a[r][0] + a[r][1]) + (a[r][2] + a[r][3]);
        float s = 0.0f;
        for (int t = 0; t < 8; t++) s += s0[t];
        for (int64_t e = q; e < d; e++) s += xs[r][e] * w[e];
        out[r] = s;
    }
}

/* -- preparation: WT [F, D] = W^T and nw[j] = ||W[:, j]||, one pass over W [D, F] ------------------------- */
#define PREP_TILE 16
void saekit_filter_prep(const float *W, int64_t D, int64_t F, float *WT, float *nw, int32_t n_threads) {
    int64_t n_tiles = (F + PREP_TILE - 1) / PREP_TILE;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t t = 0; t < n_tiles; t++) {
        int64_t f0 = t * PREP_TILE, nf = F - f0 < PREP_TILE ? F - f0 : PREP_TILE;
        for (int64_t d = 0; d < D; d++) {
            const float *w = W + d * F + f0;
            for (int64_t i = 0; i < nf; i++) WT[(f0 + i) * D + d] = w[i];
        }
        for (int64_t i = 0; i < nf; i++) {
            const float *r = WT + (f0 + i) * D;
            nw[f0 + i] = __builtin_sqrtf(f_dot(r, r, D));
        }
    }
}

/* -- selection helpers ----------------------------------------------------------------------------------- */
typedef struct { float v; int64_t i; } fitem;

/* a ranks below b: smaller value, or the same value and a higher index */
static inline int below(fitem a, fitem b) { return a.v < b.v || (a.v == b.v && a.i > b.i); }

static void sift_below(fitem *h, int64_t k, int64_t p) { /* min-heap in the `below` order: h[0] ranks lowest */
    fitem x = h[p];
    for (;;) {
        int64_t c = 2 * p + 1;
        if (c >= k) break;
        if (c + 1 < k && below(h[c + 1], h[c])) c++;
        if (!below(h[c], x)) break;
        h[p] = h[c];
        p = c;
    }
    h[p] = x;
}

/* -- one row ----------------------------------------------------------------------------------------------- */
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
static inline v16f g_load(const float *p) { v16f x; memcpy(&x, p, sizeof x); return x; }
static inline v16f g_load_bf16(const uint16_t *p) { v16h h; memcpy(&h, p, sizeof h); return (v16f)(__builtin_convertvector(h, v16u) << 16); }
static inline v16f g_splat(float s) { return (v16f){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }
static inline v16f g_abs(v16f a) { return (v16f)((v16u)a & 0x7fffffffu); }
static inline v16f g_max(v16f a, v16f b) { v16i m = a > b; return (v16f)(((v16i)a & m) | ((v16i)b & ~m)); }
static inline float g_hmax(v16f a) { /* maximum of the 16 lanes (no NaN): a shuffle tree */
    v8f m = vmax8(__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7), __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15));
    m = vmax8(m, __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3));
    m = vmax8(m, __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5));
    m = vmax8(m, __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6));
    return m[0];
}
#if defined(__AVX512F__)
#include <immintrin.h>
static inline unsigned g_ge_mask(v16f a, v16f b) { return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GE_OQ); }
#else
static inline unsigned g_ge_mask(v16f a, v16f b) { unsigned r = 0; for (int q = 0; q < 16; q++) r |= (unsigned)(a[q] >= b[q]) << q; return r; }
#endif

typedef struct {
    const float *bias, *WT, *nw;
    int64_t F, D;
    int32_t k;
    float c, u_rel, a_rel, tiny_per_norm, tiny_const;
} filter_args;

typedef struct { float *L, *bmaxL, *bmaxU, *fh; fitem *h; } scratch; /* per-thread, one row at a time */

/* p + b (into *q) and e for 16 latents starting at j (see the file comment) */
static inline v16f bound16(const filter_args *A, int64_t j, v16f p, v16f *q, float cx, float tiny) {
    const v16f b = A->bias ? g_load(A->bias + j) : g_splat(0.0f);
    *q = p + b;
    return g_splat(cx) * g_load(A->nw + j) + g_splat(A->u_rel) * g_abs(p) + g_splat(A->a_rel) * g_abs(b) + g_splat(tiny);
}

/* L = p + b - e and U = p + b + e for the 32 latents of block `blk` */
static inline void block_bounds(const filter_args *A, const uint16_t *pre, int64_t blk, float cx, float tiny,
                                v16f *l0, v16f *l1, v16f *u0, v16f *u1) {
    v16f q0, q1;
    const v16f p0 = g_load_bf16(pre + blk * 32), p1 = g_load_bf16(pre + blk * 32 + 16);
    const v16f e0 = bound16(A, blk * 32, p0, &q0, cx, tiny), e1 = bound16(A, blk * 32 + 16, p1, &q1, cx, tiny);
    *l0 = q0 - e0; *l1 = q1 - e1; *u0 = q0 + e0; *u1 = q1 + e1;
}

static inline v8f half_max(v16f a) {
    return vmax8(__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7), __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15));
}

static inline float g_hsum(v16f a) { float s = 0.0f; for (int q = 0; q < 16; q++) s += a[q]; return s; }


/* The k-th largest of L[0:32 nb] (no NaN), 1 <= k <= 32 nb. The k-th largest block maximum T0 is a lower bound
 * of the answer, so only the elements >= T0 of blocks whose maximum is >= T0 enter the size-k heap. */
static float kth_largest(const float *L, const float *bmax, int64_t nb, int64_t k, float *fh) {
    float T0 = -__builtin_inff();
    if (k <= nb) {
        for (int64_t q = 0; q < k; q++) fh[q] = bmax[q];
        for (int64_t p = k / 2 - 1; p >= 0; p--) sift_floats(fh, k, p);
        for (int64_t b = k; b < nb; b++)
            if (bmax[b] > fh[0]) { fh[0] = bmax[b]; sift_floats(fh, k, 0); }
        T0 = fh[0];
    }
    const v16f T0v = g_splat(T0);
    int64_t m = 0;
    for (int64_t b = 0; b < nb; b++) {
        if (!(bmax[b] >= T0)) continue;
        const float *l = L + b * 32;
        uint32_t mask = g_ge_mask(g_load(l), T0v) | g_ge_mask(g_load(l + 16), T0v) << 16;
        while (mask) {
            const float v = l[__builtin_ctz(mask)];
            mask &= mask - 1;
            if (m < k) { fh[m++] = v; if (m == k) for (int64_t p = k / 2 - 1; p >= 0; p--) sift_floats(fh, k, p); }
            else if (v > fh[0]) { fh[0] = v; sift_floats(fh, k, 0); }
        }
    }
    return fh[0];
}

/* The candidates of one row, appended to cand: {j : U[j] >= t}, t the k-th largest L. Returns 1 when the row
 * is not finite (NaN/inf in the product, the bias or the norms), else 0. F % 32 == 0. */
static int row_candidates(const filter_args *A, const uint16_t *pre, const float *x, scratch *s, int32_t *cand,
                          int64_t *n_out) {
    const int64_t F = A->F, D = A->D, k = A->k, nb = F / 32;
    const float nx = __builtin_sqrtf(f_dot(x, x, D));
    if (!(nx <= 3.0e38f)) return 1;
    const float cx = A->c * nx, tiny = A->tiny_const + A->tiny_per_norm * nx;
    v16f acc = g_splat(0.0f); /* sum of L + U: NaN or inf when any L or U is (inf - inf = NaN included) */
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) { /* pass 1: L, and the block maxima of L and of U, eight blocks at a time */
        v8f mL[8], mU[8];
        for (int u = 0; u < 8; u++) {
            v16f l0, l1, u0, u1;
            block_bounds(A, pre, b + u, cx, tiny, &l0, &l1, &u0, &u1);
            acc += (l0 + u0) + (l1 + u1);
            memcpy(s->L + (b + u) * 32, &l0, sizeof l0);
            memcpy(s->L + (b + u) * 32 + 16, &l1, sizeof l1);
            mL[u] = half_max(g_max(l0, l1));
            mU[u] = half_max(g_max(u0, u1));
        }
        const v8f rL = hmax8x8(mL), rU = hmax8x8(mU);
        memcpy(s->bmaxL + b, &rL, sizeof rL);
        memcpy(s->bmaxU + b, &rU, sizeof rU);
    }
    for (; b < nb; b++) {
        v16f l0, l1, u0, u1;
        block_bounds(A, pre, b, cx, tiny, &l0, &l1, &u0, &u1);
        acc += (l0 + u0) + (l1 + u1);
        memcpy(s->L + b * 32, &l0, sizeof l0);
        memcpy(s->L + b * 32 + 16, &l1, sizeof l1);
        s->bmaxL[b] = g_hmax(g_max(l0, l1));
        s->bmaxU[b] = g_hmax(g_max(u0, u1));
    }
    const float total = g_hsum(acc); /* over 32 F terms each <= 6e38 in size: may overflow to inf on finite */
    if (!(__builtin_fabsf(total) <= 3.0e38f)) return 1; /* data (a needless dense fallback), never hides NaN */
    const float t = kth_largest(s->L, s->bmaxL, nb, k, s->fh);
    const v16f tv = g_splat(t);
    int64_t n = 0; /* pass 2, in the blocks that can hold one: U >= t (the same U as pass 1) */
    for (b = 0; b < nb; b++) {
        if (!(s->bmaxU[b] >= t)) continue;
        v16f l0, l1, u0, u1;
        block_bounds(A, pre, b, cx, tiny, &l0, &l1, &u0, &u1);
        uint32_t mask = g_ge_mask(u0, tv) | g_ge_mask(u1, tv) << 16;
        while (mask) { cand[n++] = (int32_t)(b * 32 + __builtin_ctz(mask)); mask &= mask - 1; }
    }
    *n_out = n;
    return 0;
}

/* -- a tile of rows: candidates, latent-major recompute, per-row top-k -------------------------------------- */
/* Per-thread buffers for one tile: pair p = (row prow[p], latent plat[p]) with value pval[p]; a row's pairs are
 * contiguous (rstart). The recompute visits the pairs latent by latent (counting sort into order), so each
 * W^T row is read once per tile instead of once per pair (the gathers were memory-bound: ~120 ns a pair). */
typedef struct { int32_t *plat, *prow, *order, *lstart; float *pval; int64_t *rstart, cap; } tile_buf;

static int reserve(tile_buf *t, int64_t need) {
    if (need <= t->cap) return 0;
    int64_t cap = need > 2 * t->cap ? need : 2 * t->cap;
    int32_t *a = realloc(t->plat, (size_t)cap * 4), *b = a ? realloc(t->prow, (size_t)cap * 4) : NULL;
    if (a) t->plat = a;
    if (b) t->prow = b;
    int32_t *c = b ? realloc(t->order, (size_t)cap * 4) : NULL;
    if (c) t->order = c;
    float *d = c ? realloc(t->pval, (size_t)cap * 4) : NULL;
    if (d) t->pval = d;
    if (!d) return -1;
    t->cap = cap;
    return 0;
}

static double seconds(void) { struct timespec ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); /* this thread's CPU time */ return ts.tv_sec + 1e-9 * ts.tv_nsec; }

/* secs[0] += time finding candidates (bound + filter), secs[1] += time recomputing and selecting */
static int run_tile(const filter_args *A, const uint16_t *pre, const float *x, int64_t r0, int64_t r1, scratch *s,
                    tile_buf *t, float *vals, int64_t *idx, int64_t *n_cand, double *secs) {
    const int64_t F = A->F, D = A->D, k = A->k;
    int64_t np = 0;
    const double t0 = seconds();
    t->rstart[0] = 0;
    for (int64_t r = r0; r < r1; r++) {
        if (reserve(t, np + F)) return 2;
        int64_t n = 0;
        if (row_candidates(A, pre + r * F, x + r * D, s, t->plat + np, &n)) return 1;
        for (int64_t q = np; q < np + n; q++) t->prow[q] = (int32_t)(r - r0);
        np += n;
        t->rstart[r - r0 + 1] = np;
    }
    *n_cand += np;
    const double t1 = seconds();
    memset(t->lstart, 0, (size_t)(F + 1) * sizeof *t->lstart); /* counting sort of the pairs by latent */
    for (int64_t p = 0; p < np; p++) t->lstart[t->plat[p] + 1]++;
    for (int64_t j = 0; j < F; j++) t->lstart[j + 1] += t->lstart[j];
    for (int64_t p = 0; p < np; p++) t->order[t->lstart[t->plat[p]]++] = (int32_t)p;
    for (int64_t j = F; j > 0; j--) t->lstart[j] = t->lstart[j - 1]; /* back to the starts */
    t->lstart[0] = 0;
    for (int64_t o = 0; o < np;) { /* exact float32 values, one latent at a time */
        const int64_t j = t->plat[t->order[o]], o1 = t->lstart[j + 1];
        if (o1 < np) {
            const char *nxt = (const char *)(A->WT + (int64_t)t->plat[t->order[o1]] * D);
            for (int64_t c = 0; c < D * 4; c += 64) __builtin_prefetch(nxt + c);
        }
        const float *w = A->WT + j * D, bj = A->bias ? A->bias[j] : 0.0f;
        for (; o + 4 <= o1; o += 4) { /* four rows at a time share the loads of w */
            const float *xs[4];
            float v[4];
            for (int r = 0; r < 4; r++) xs[r] = x + (r0 + t->prow[t->order[o + r]]) * D;
            f_dot4(xs, w, D, v);
            for (int r = 0; r < 4; r++) t->pval[t->order[o + r]] = v[r] + bj;
        }
        for (; o < o1; o++) {
            const int64_t p = t->order[o];
            t->pval[p] = f_dot(x + (r0 + t->prow[p]) * D, w, D) + bj;
        }
    }
    for (int64_t r = r0; r < r1; r++) { /* per row: top-k in the (value desc, index asc) order */
        int64_t m = 0;
        for (int64_t p = t->rstart[r - r0]; p < t->rstart[r - r0 + 1]; p++) {
            const fitem it = {t->pval[p], t->plat[p]};
            if (m < k) { s->h[m++] = it; if (m == k) for (int64_t q = k / 2 - 1; q >= 0; q--) sift_below(s->h, k, q); }
            else if (below(s->h[0], it)) { s->h[0] = it; sift_below(s->h, k, 0); }
        }
        for (int64_t q = 0; q < k; q++) { vals[r * k + q] = s->h[q].v; idx[r * k + q] = s->h[q].i; }
    }
    secs[0] += t1 - t0;
    secs[1] += seconds() - t1;
    return 0;
}

#define ROW_TILE 512 /* rows per tile: their x rows (1 MB at d_in 512) stay in L2 during the recompute; 512 took ~25 % less
                        * recompute time than 256 on the benchmark shape (more pairs share each W^T row read) */

/* Row-wise exact top-k (unordered within a row) of fl(x_c[b] . W[:, j] + bias[j]) over rows [0, B), from the
 * bf16 product `pre` [B, F] (raw uint16 bits), x_c [B, D] float32, WT [F, D] and nw [F] from saekit_filter_prep.
 * bias may be NULL. 1 <= k <= F, F % 32 == 0, F * ROW_TILE < 2^31. *n_cand_total receives the candidates summed over rows,
 * phase_s[0] and phase_s[1] the seconds spent finding candidates and recomputing (summed over threads).
 * Returns 0, 1 when a row is not finite (the caller then takes the dense path), -1 on bad sizes or no memory. */
int saekit_topk_filtered(const uint16_t *pre, const float *bias, const float *x, const float *WT, const float *nw,
                         int64_t B, int64_t F, int64_t D, int32_t k, float c, float u_rel, float a_rel,
                         float tiny_per_norm, float tiny_const, float *vals, int64_t *idx, int64_t *n_cand_total,
                         double *phase_s, int32_t n_threads) {
    if (k < 1 || k > F || D < 1 || F % 32 || F * ROW_TILE >= ((int64_t)1 << 31)) return -1; /* int32 pair indices */
    const filter_args A = {bias, WT, nw, F, D, k, c, u_rel, a_rel, tiny_per_norm, tiny_const};
    const int64_t n_tiles = (B + ROW_TILE - 1) / ROW_TILE;
    int status = 0;
    int64_t total = 0;
    double find_s = 0.0, recompute_s = 0.0;
#pragma omp parallel num_threads(n_threads) reduction(|:status) reduction(+:total, find_s, recompute_s)
    {
        double secs[2] = {0.0, 0.0};
        scratch s = {malloc((size_t)F * sizeof(float)), malloc((size_t)(F / 32 + 1) * sizeof(float)),
                     malloc((size_t)(F / 32 + 1) * sizeof(float)), malloc((size_t)k * sizeof(float)),
                     malloc((size_t)k * sizeof(fitem))};
        tile_buf t = {NULL, NULL, NULL, malloc((size_t)(F + 1) * sizeof(int32_t)), NULL,
                      malloc((size_t)(ROW_TILE + 1) * sizeof(int64_t)), 0};
        int ok = s.L && s.bmaxL && s.bmaxU && s.fh && s.h && t.lstart && t.rstart;
        if (!ok) status |= 2;
#pragma omp for schedule(dynamic, 1)
        for (int64_t q = 0; q < n_tiles; q++) {
            if (!ok || status) continue;
            const int64_t r0 = q * ROW_TILE, r1 = r0 + ROW_TILE < B ? r0 + ROW_TILE : B;
            int64_t n = 0;
            status |= run_tile(&A, pre, x, r0, r1, &s, &t, vals, idx, &n, secs);
            total += n;
        }
        find_s += secs[0];
        recompute_s += secs[1];
        free(s.L); free(s.bmaxL); free(s.bmaxU); free(s.fh); free(s.h);
        free(t.plat); free(t.prow); free(t.order); free(t.lstart); free(t.pval); free(t.rstart);
    }
    *n_cand_total = total;
    phase_s[0] = find_s;
    phase_s[1] = recompute_s;
    return status & 2 ? -1 : status;
}
