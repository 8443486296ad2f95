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

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

static inline v8f f_load8(const float *p) { v8f x; memcpy(&x, p, sizeof x); return x; }
static inline v8f f_load8_bf16(const uint16_t *p) { /* bf16 is the high half of a float32: exact */
    v8h h; memcpy(&h, p, sizeof h);
    return (v8f)(__builtin_convertvector(h, v8u) << 16);
}
static inline v8f f_abs8(v8f a) { return (v8f)((v8u)a & 0x7fffffffu); }
static inline v8f f_splat(float s) { v8f r = {s, s, s, s, s, s, s, s}; return r; }
static inline v8f f_max8(v8f a, v8f b) { v8i m = a > b; return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
#if defined(__AVX__)
#include <immintrin.h>
static inline int f_movemask(v8i m) { return _mm256_movemask_ps((__m256)m); }
#else
static inline int f_movemask(v8i m) { int r = 0; for (int q = 0; q < 8; q++) r |= (m[q] != 0) << q; return r; }
#endif
static inline float f_hmax(v8f a) { float s = a[0]; for (int q = 1; q < 8; q++) s = a[q] > s ? a[q] : s; return s; }

/* Sum of a[q] * b[q] in a fixed order: four 8-lane accumulators over 32-float steps, then the lanes. */
static inline float f_dot(const float *a, const float *b, int64_t d) {
    v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t q = 0;
    for (; q + 32 <= d; q += 32) {
        s0 += f_load8(a + q) * f_load8(b + q);
        s1 += f_load8(a + q + 8) * f_load8(b + q + 8);
        s2 += f_load8(a + q + 16) * f_load8(b + q + 16);
        s3 += f_load8(a + q + 24) * f_load8(b + q + 24);
    }
    s0 = (s0 + s1) + (s2 + s3);
    float s = 0.0f;
    for (int t = 0; t < 8; t++) s += s0[t];
    for (; q < d; q++) s += a[q] * b[q];
    return s;
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

static void sift_f(float *h, int64_t k, int64_t p) { /* plain float min-heap */
    float x = h[p];
    for (;;) {
        int64_t c = 2 * p + 1;
        if (c >= k) break;
        if (c + 1 < k && h[c + 1] < h[c]) c++;
        if (!(h[c] < x)) break;
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
static inline float g_hmax(v16f a) { /* maximum of the 16 lanes (no NaN) */
    v8f lo = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7), hi = __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    return f_hmax(f_max8(lo, hi));
}
#if defined(__AVX512F__)
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

typedef struct { float *L, *bmaxL, *bmaxU, *fh; int64_t *cand; fitem *h; } scratch;

/* p + b (into *q) and e for 16 latents starting at j (see the file comment) */
static inline v16f bound16(const filter_args *A, int64_t j, v16f p, v16f *q, float cx, float tiny) {
    const v16f b = A->bias ? g_load(A->bias + j) : g_splat(0.0f);
    *q = p + b;
    return g_splat(cx) * g_load(A->nw + j) + g_splat(A->u_rel) * g_abs(p) + g_splat(A->a_rel) * g_abs(b) + g_splat(tiny);
}

/* The k-th largest of L[0:32 nb] (no NaN), 1 <= k <= 32 nb. The k-th largest block maximum T0 is a lower bound
 * of the answer, so only the elements >= T0 of blocks whose maximum is >= T0 enter the size-k heap. */
static float kth_largest(const float *L, const float *bmax, int64_t nb, int64_t k, float *fh) {
    float T0 = -__builtin_inff();
    if (k <= nb) {
        for (int64_t q = 0; q < k; q++) fh[q] = bmax[q];
        for (int64_t p = k / 2 - 1; p >= 0; p--) sift_f(fh, k, p);
        for (int64_t b = k; b < nb; b++)
            if (bmax[b] > fh[0]) { fh[0] = bmax[b]; sift_f(fh, k, 0); }
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
            if (m < k) { fh[m++] = v; if (m == k) for (int64_t p = k / 2 - 1; p >= 0; p--) sift_f(fh, k, p); }
            else if (v > fh[0]) { fh[0] = v; sift_f(fh, k, 0); }
        }
    }
    return fh[0];
}

/* Candidates, then their exact float32 values, top-k in the (value desc, index asc) order. Returns 1 when the
 * row is not finite (NaN/inf in the product, the bias or the norms), else 0. F % 32 == 0. */
static int filter_row(const filter_args *A, const uint16_t *pre, const float *x, scratch *s, float *vals,
                      int64_t *idx, int64_t *n_cand) {
    const int64_t F = A->F, D = A->D, k = A->k, nb = F / 32;
    const float nx = __builtin_sqrtf(f_dot(x, x, D));
    if (!(nx <= 3.0e38f)) return 1;
    const float cx = A->c * nx, tiny = A->tiny_const + A->tiny_per_norm * nx;
    const v16f big = g_splat(3.0e38f);
    unsigned finite = 0xffffu; /* lanes whose L and U were all finite (NaN compares false) */
    for (int64_t b = 0; b < nb; b++) { /* pass 1: L, and the block maxima of L and of U */
        v16f q0, q1;
        const v16f p0 = g_load_bf16(pre + b * 32), p1 = g_load_bf16(pre + b * 32 + 16);
        const v16f e0 = bound16(A, b * 32, p0, &q0, cx, tiny), e1 = bound16(A, b * 32 + 16, p1, &q1, cx, tiny);
        const v16f l0 = q0 - e0, l1 = q1 - e1, u0 = q0 + e0, u1 = q1 + e1;
        finite &= g_ge_mask(big, g_abs(l0)) & g_ge_mask(big, g_abs(l1)) & g_ge_mask(big, g_abs(u0)) & g_ge_mask(big, g_abs(u1));
        memcpy(s->L + b * 32, &l0, sizeof l0);
        memcpy(s->L + b * 32 + 16, &l1, sizeof l1);
        s->bmaxL[b] = g_hmax(g_max(l0, l1));
        s->bmaxU[b] = g_hmax(g_max(u0, u1));
    }
    if (finite != 0xffffu) return 1;
    const float t = kth_largest(s->L, s->bmaxL, nb, k, s->fh);
    const v16f tv = g_splat(t);
    int64_t n = 0; /* pass 2, in the blocks that can hold one: candidates U >= t (the same U as pass 1) */
    for (int64_t b = 0; b < nb; b++) {
        if (!(s->bmaxU[b] >= t)) continue;
        v16f q0, q1;
        const v16f p0 = g_load_bf16(pre + b * 32), p1 = g_load_bf16(pre + b * 32 + 16);
        const v16f e0 = bound16(A, b * 32, p0, &q0, cx, tiny), e1 = bound16(A, b * 32 + 16, p1, &q1, cx, tiny);
        uint32_t mask = g_ge_mask(q0 + e0, tv) | g_ge_mask(q1 + e1, tv) << 16;
        while (mask) { s->cand[n++] = b * 32 + __builtin_ctz(mask); mask &= mask - 1; }
    }
    int64_t m = 0;
    for (int64_t c = 0; c < n; c++) {
        const int64_t j = s->cand[c];
        if (c + 2 < n) {
            const char *nxt = (const char *)(A->WT + s->cand[c + 2] * D);
            for (int64_t o = 0; o < D * 4; o += 64) __builtin_prefetch(nxt + o);
        }
        fitem it = {f_dot(x, A->WT + j * D, D) + (A->bias ? A->bias[j] : 0.0f), j};
        if (m < k) { s->h[m++] = it; if (m == k) for (int64_t p = k / 2 - 1; p >= 0; p--) sift_below(s->h, k, p); }
        else if (below(s->h[0], it)) { s->h[0] = it; sift_below(s->h, k, 0); }
    }
    for (int64_t q = 0; q < k; q++) { vals[q] = s->h[q].v; idx[q] = s->h[q].i; }
    *n_cand = n;
    return 0;
}

/* Row-wise exact top-k (unordered within a row) of fl(x_c[b] . W[:, j] + bias[j]) over rows [0, B), from the
 * bf16 product `pre` [B, F] (raw uint16 bits), x_c [B, D] float32, WT [F, D] and nw [F] from saekit_filter_prep.
 * bias may be NULL. 1 <= k <= F. *n_cand_total receives the candidates summed over rows. Returns 0, 1 when a
 * row is not finite (the caller then takes the dense path), -1 on bad sizes or no scratch memory. */
int saekit_topk_filtered(const uint16_t *pre, const float *bias, const float *x, const float *WT, const float *nw,
                         int64_t B, int64_t F, int64_t D, int32_t k, float c, float u_rel, float a_rel,
                         float tiny_per_norm, float tiny_const, float *vals, int64_t *idx, int64_t *n_cand_total,
                         int32_t n_threads) {
    if (k < 1 || k > F || D < 1 || F % 32) return -1;
    const filter_args A = {bias, WT, nw, F, D, k, c, u_rel, a_rel, tiny_per_norm, tiny_const};
    int status = 0;
    int64_t total = 0;
#pragma omp parallel num_threads(n_threads) reduction(|:status) reduction(+:total)
    {
        scratch s = {malloc((size_t)F * sizeof(float)), malloc((size_t)(F / 32 + 1) * sizeof(float)),
                     malloc((size_t)(F / 32 + 1) * sizeof(float)), malloc((size_t)k * sizeof(float)),
                     malloc((size_t)F * sizeof(int64_t)), malloc((size_t)k * sizeof(fitem))};
        int ok = s.L && s.bmaxL && s.bmaxU && s.fh && s.cand && s.h;
        if (!ok) status |= 2;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < B; r++) {
            if (!ok) continue;
            int64_t n = 0;
            status |= filter_row(&A, pre + r * F, x + r * D, &s, vals + r * k, idx + r * k, &n);
            total += n;
        }
        free(s.L); free(s.bmaxL); free(s.bmaxU); free(s.fh); free(s.cand); free(s.h);
    }
    *n_cand_total = total;
    return status & 2 ? -1 : status;
}
