/* Vector helpers shared by native.c and native_filter.c (two translation units of one library):
 * 8-float vectors, their maximum and NaN tests, the shuffle-tree maxima of eight vectors, and a float
 * min-heap's sift-down (the k-th largest value of a row). */
#ifndef SAEKIT_NATIVE_SIMD_H
#define SAEKIT_NATIVE_SIMD_H
#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f x; memcpy(&x, p, sizeof x); return x; }
#if defined(__AVX__)
#include <immintrin.h>
/* maxps returns its second operand when either is NaN: NaN is detected separately (unord8) */
static inline v8f vmax8(v8f a, v8f b) { return (v8f)_mm256_max_ps((__m256)a, (__m256)b); }
static inline v8i unord8(v8f a, v8f b) { return (v8i)_mm256_cmp_ps((__m256)a, (__m256)b, _CMP_UNORD_Q); }
static inline int movemask8(v8i m) { return _mm256_movemask_ps((__m256)m); }
#else
static inline v8f vmax8(v8f a, v8f b) { v8i m = a > b; return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline v8i unord8(v8f a, v8f b) { return (a != a) | (b != b); }
static inline int movemask8(v8i m) { int r = 0; for (int q = 0; q < 8; q++) r |= (m[q] != 0) << q; return r; }
#endif

/* The maxima of eight vectors, lane q of the result = max over the lanes of m[q]: a three-stage
 * shuffle tree (about 2.5 operations per vector instead of seven scalar compares each). */
static inline v8f hmax8x8(const v8f m[8]) {
    v8f p[4], q[2];
    for (int i = 0; i < 4; i++)
        p[i] = vmax8(__builtin_shufflevector(m[2 * i], m[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11),
                     __builtin_shufflevector(m[2 * i], m[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15));
    for (int j = 0; j < 2; j++)
        q[j] = vmax8(__builtin_shufflevector(p[2 * j], p[2 * j + 1], 0, 1, 8, 9, 4, 5, 12, 13),
                     __builtin_shufflevector(p[2 * j], p[2 * j + 1], 2, 3, 10, 11, 6, 7, 14, 15));
    v8f r = vmax8(__builtin_shufflevector(q[0], q[1], 0, 2, 4, 6, 8, 10, 12, 14),
                  __builtin_shufflevector(q[0], q[1], 1, 3, 5, 7, 9, 11, 13, 15));
    return __builtin_shufflevector(r, r, 0, 2, 1, 3, 4, 6, 5, 7);
}

/* Restore the min-heap h[0:k] below position p (h[p] may have grown). */
static inline void sift_floats(float *h, int64_t k, int64_t p) {
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

#endif
