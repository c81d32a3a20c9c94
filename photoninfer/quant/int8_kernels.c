/* y[M, N] = x[M, K] @ W^T in float32, W given as int8 codes q with a float32 scale s (and optionally a float32
 * bias b) per group of G inputs of a row (G = 16 or 32): w = s * q (+ b). GGUF types that fit exactly:
 *   Q8_0: q in -128..127, s = d                           (G = 32, no bias)
 *   Q6_K: q in -32..31,   s = d * sc                      (G = 16, no bias)
 *   Q5_K: q in 0..31,     s = d * sc,  b = -dmin * m      (G = 32, bias)
 *   and fused layers that mix K-quants (Q4_K_M's q/k/v): every part at G = 16 with biases.
 * Repacked at load time into panels of 16 rows (native.pack_int8_panels):
 * W is N / 16 panels; a panel is K / G group records of 16 G + 64 (+ 64) bytes:
 *   bytes 0 .. 16 G - 1   codes: 16 bytes per input k of the group, byte r the code of panel row r;
 *   then the 16 rows' scales (float32), then, with biases, the 16 rows' biases (float32).
 * So one 16-lane vector holds one value per output row: no horizontal sums.
 *
 * Per group and row: sum_k w_k x_k = s * sum_k q_k x_k + b * sum_k x_k, the group sums of x computed once per
 * call. q * x is exact in float32, so the result is F.linear(x, dequantize(W)) up to the order and rounding of
 * float32 sums. AVX-512, AVX2 + FMA and scalar paths (built and tested; the scalar one slower), as q4_kernels.c.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PANEL 16

static inline int64_t record_bytes(int group, int biased) { return PANEL * group + 64 + (biased ? 64 : 0); }

#if defined(__AVX512F__)
#include <immintrin.h>

#define SIMD_PANEL 1
#define MAX_MT 8 /* rows of x per pass over a panel */

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048 /* ahead of the record being read (q4_kernels.c's distance) */
#endif

/* One panel times MT rows of x (row stride ldx; sums: group sums, row stride groups) -> y (row stride ldy) */
static inline __attribute__((always_inline)) void panel(const float *x, int64_t ldx, const float *sums,
                                                        const uint8_t *w, int64_t groups, float *y, int64_t ldy,
                                                        const int MT, const int G, const int BIASED) {
    const int CHAINS = MT == 1 ? 4 : MT <= 4 ? 2 : 1; /* independent sums: enough FMAs in flight */
    const int64_t R = record_bytes(G, BIASED);
    __m512 acc[MT];
    for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *rec = w + g * R;
        for (int l = 0; l < R; l += 64) _mm_prefetch((const char *)(rec + PREFETCH_BYTES + l), _MM_HINT_T0);
        __m512 part[MT][CHAINS];
        for (int i = 0; i < MT; i++)
            for (int c = 0; c < CHAINS; c++) part[i][c] = _mm512_setzero_ps();
#pragma GCC unroll 32
        for (int k = 0; k < G; k++) {
            const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(rec + 16 * k))));
#pragma GCC unroll 8
            for (int i = 0; i < MT; i++)
                part[i][k % CHAINS] = _mm512_fmadd_ps(q, _mm512_set1_ps(x[i * ldx + g * G + k]), part[i][k % CHAINS]);
        }
        const __m512 s = _mm512_loadu_ps((const float *)(rec + PANEL * G));
        for (int i = 0; i < MT; i++) {
            __m512 p = part[i][0];
            for (int c = 1; c < CHAINS; c++) p = _mm512_add_ps(p, part[i][c]);
            acc[i] = _mm512_fmadd_ps(s, p, acc[i]);
            if (BIASED)
                acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps((const float *)(rec + PANEL * G + 64)),
                                         _mm512_set1_ps(sums[i * groups + g]), acc[i]);
        }
    }
    for (int i = 0; i < MT; i++) _mm512_storeu_ps(y + i * ldy, acc[i]);
}

#elif defined(__AVX2__) && defined(__FMA__) /* 8 lanes: as q4_kernels.c's AVX2 panel, two vectors per panel */
#include <immintrin.h>

#define SIMD_PANEL 1
#define MAX_MT 4 /* rows of x per pass; their totals kept in y, so the registers hold only a group's sums */

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif

static inline __attribute__((always_inline)) void panel(const float *x, int64_t ldx, const float *sums,
                                                        const uint8_t *w, int64_t groups, float *y, int64_t ldy,
                                                        const int MT, const int G, const int BIASED) {
    const int CHAINS = MT == 1 ? 4 : MT == 2 ? 2 : 1; /* independent sums: enough FMAs in flight */
    const int64_t R = record_bytes(G, BIASED);
    for (int i = 0; i < MT; i++) {
        _mm256_storeu_ps(y + i * ldy, _mm256_setzero_ps());
        _mm256_storeu_ps(y + i * ldy + 8, _mm256_setzero_ps());
    }
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *rec = w + g * R;
        for (int l = 0; l < R; l += 64) _mm_prefetch((const char *)(rec + PREFETCH_BYTES + l), _MM_HINT_T0);
        __m256 part[MT][CHAINS][2];
        for (int i = 0; i < MT; i++)
            for (int c = 0; c < CHAINS; c++) part[i][c][0] = part[i][c][1] = _mm256_setzero_ps();
#pragma GCC unroll 32
        for (int k = 0; k < G; k++)
            for (int h = 0; h < 2; h++) { /* rows 8 h .. 8 h + 7: 8 code bytes */
                const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(rec + 16 * k + 8 * h))));
                for (int i = 0; i < MT; i++)
                    part[i][k % CHAINS][h] = _mm256_fmadd_ps(q, _mm256_set1_ps(x[i * ldx + g * G + k]), part[i][k % CHAINS][h]);
            }
        for (int h = 0; h < 2; h++) {
            const __m256 s = _mm256_loadu_ps((const float *)(rec + PANEL * G + 32 * h));
            for (int i = 0; i < MT; i++) {
                __m256 p = part[i][0][h];
                for (int c = 1; c < CHAINS; c++) p = _mm256_add_ps(p, part[i][c][h]);
                __m256 acc = _mm256_fmadd_ps(s, p, _mm256_loadu_ps(y + i * ldy + 8 * h));
                if (BIASED)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps((const float *)(rec + PANEL * G + 64 + 32 * h)),
                                          _mm256_set1_ps(sums[i * groups + g]), acc);
                _mm256_storeu_ps(y + i * ldy + 8 * h, acc);
            }
        }
    }
}

#else /* scalar fallback: the same sums */

#define MAX_MT 8

static void panel_rows(const float *x, int64_t ldx, const float *sums, int mt, const uint8_t *w, int64_t groups,
                       int group, int biased, float *y, int64_t ldy) {
    const int64_t R = record_bytes(group, biased);
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < PANEL; r++) {
            float acc = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *rec = w + g * R;
                float part = 0.0f, s, b;
                for (int k = 0; k < group; k++) part += (float)(int8_t)rec[16 * k + r] * x[i * ldx + g * group + k];
                memcpy(&s, rec + PANEL * group + 4 * r, 4);
                acc += s * part;
                if (biased) {
                    memcpy(&b, rec + PANEL * group + 64 + 4 * r, 4);
                    acc += b * sums[i * groups + g];
                }
            }
            y[i * ldy + r] = acc;
        }
}

#endif

#ifdef SIMD_PANEL /* one compiled panel per (rows, format): the row count and format must be constants */
#define ROWS_CASE(MT, G, B) \
    case MT: panel(x, ldx, sums, w, groups, y, ldy, MT, G, B); break;
#if MAX_MT > 4
#define ROWS_CASES_5_TO_8(G, B) ROWS_CASE(5, G, B) ROWS_CASE(6, G, B) ROWS_CASE(7, G, B) ROWS_CASE(8, G, B)
#else
#define ROWS_CASES_5_TO_8(G, B)
#endif
#define FORMAT_CASE(G, B) \
    switch (mt) { ROWS_CASE(1, G, B) ROWS_CASE(2, G, B) ROWS_CASE(3, G, B) ROWS_CASE(4, G, B) ROWS_CASES_5_TO_8(G, B) }

static void panel_rows(const float *x, int64_t ldx, const float *sums, int mt, const uint8_t *w, int64_t groups,
                       int group, int biased, float *y, int64_t ldy) {
    if (group == 16 && !biased) FORMAT_CASE(16, 0)
    else if (group == 16) FORMAT_CASE(16, 1)
    else if (!biased) FORMAT_CASE(32, 0)
    else FORMAT_CASE(32, 1)
}
#endif

/* x: float32 [M, K] contiguous; w: N / 16 panels (layout above); y: float32 [M, N]. K % group == 0,
 * N % 16 == 0, group 16 or 32. Returns 0, -1 when out of memory, -2 for another group size. */
int i8_matmul(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int group, int biased, float *y,
              int nthreads) {
    if (group != 16 && group != 32) return -2;
    const int64_t groups = K / group, panels = N / PANEL, R = record_bytes(group, biased);
    float *sums = NULL;
    if (biased) {
        sums = malloc(sizeof(float) * (M * groups + 1));
        if (!sums) return -1;
        for (int64_t i = 0; i < M * groups; i++) {
            float s = 0.0f;
            for (int k = 0; k < group; k++) s += x[i * group + k];
            sums[i] = s;
        }
    }
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t m0 = 0; m0 < M; m0 += MAX_MT) {
            int mt = M - m0 < MAX_MT ? (int)(M - m0) : MAX_MT;
            panel_rows(x + m0 * K, K, biased ? sums + m0 * groups : NULL, mt, w + p * groups * R, groups, group,
                       biased, y + m0 * N + p * PANEL, N);
        }
    free(sums);
    return 0;
}
