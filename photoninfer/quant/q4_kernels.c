/* y[M, N] = x[M, K] @ W^T in float32, W a GGUF 4-bit or 5-bit weight with w = d * q + m per group of 32
 * inputs (Q4_1, Q5_1; Q4_0 has m = -8 d, Q5_0 m = -16 d; Q4_K, Q5_K have d = d * sc, m = -dmin * mn), q in
 * 0..15 (0..31), repacked at load time into panels of 16 rows. d and m are float16 (Q4_0, Q4_1, Q5_0, Q5_1)
 * or float32 (the K-quants: products float16 cannot hold).
 *
 * Layout (native.pack_panels): W is N / 16 panels; a panel is K / 32 block records:
 *   bytes   0..255  low 4 bits of the codes: 4 chunks of 64 bytes; in chunk j, the 32-bit lane r holds 8
 *                   nibbles, nibble t (bits 4t..4t+3) the code of panel row r at the block's input 8 j + t;
 *   5-bit codes only: 64 bytes, the 32-bit lane r holding the fifth bits of row r (bit k: input k);
 *   then d of the 16 rows, then m of the 16 rows (float16: 32 bytes each; float32: 64 bytes each).
 * So one 16-lane vector holds one value per output row: no horizontal sums. Bytes per weight: 0.625 (4-bit,
 * float16), 0.75 (4-bit, float32; 5-bit, float16), 0.875 (5-bit, float32).
 *
 * Per block and row: sum_k w_k x_k = d * sum_k q_k x_k + m * sum_k x_k, the block sums of x computed once
 * per call. The products q * x are exact, so the result is F.linear(x, dequantize(W)) up to the order and
 * rounding of float32 sums (~1e-6 relative).
 * Three paths, chosen at compile time (-march=native): AVX-512 (a code becomes a float by a permute from the
 * table 0..15 or 0..31), AVX2 + FMA + F16C (two 8-lane vectors per panel row set; int -> float conversion), and
 * a scalar one for other CPUs (built and tested, slower than torch's kernel). q4_simd() says which.
 * No torch headers: plain C, loaded with ctypes; threads from OpenMP (torch's own libgomp when loaded).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32
#define PANEL 16

static inline int record_bytes(int f32, int five) { return 256 + (five ? 64 : 0) + (f32 ? 128 : 64); }

/* fp16 bits -> float (exact), portable */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalize */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if defined(__AVX512F__)
#include <immintrin.h>

int q4_simd(void) { return 512; }

#define SIMD_PANEL 1
#define MAX_MT 8 /* rows of x per pass over a panel */
#define SCALED_X 0

#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 8 /* records ahead: the hardware prefetcher alone leaves a core waiting on memory */
#endif

/* One panel times MT rows of x (x: row stride ldx; sums: block sums, row stride blocks) -> y (row stride ldy) */
static inline __attribute__((always_inline)) void panel(const float *x, int64_t ldx, const float *sums,
                                                        const uint8_t *w, int64_t blocks, float *y, int64_t ldy,
                                                        const int MT, const int F32, const int FIVE) {
    const int R = record_bytes(F32, FIVE), S = FIVE ? 320 : 256; /* S: where d starts */
    const int CHAINS = MT == 1 ? 4 : MT <= 4 ? 2 : 1; /* independent sums: enough FMAs in flight */
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 iota16 = _mm512_add_ps(iota, _mm512_set1_ps(16.0f));
    const __m512i low4 = _mm512_set1_epi32(15);
    __m512 acc[MT];
    for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *rec = w + b * R;
        for (int l = 0; l < R; l += 64) _mm_prefetch((const char *)(rec + PREFETCH_BLOCKS * R + l), _MM_HINT_T0);
        __m512 part[MT][CHAINS];
        for (int i = 0; i < MT; i++)
            for (int c = 0; c < CHAINS; c++) part[i][c] = _mm512_setzero_ps();
        const __m512i h = FIVE ? _mm512_loadu_si512(rec + 256) : _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            __m512i v = _mm512_loadu_si512(rec + 64 * j);
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) {
                __m512 q;
                if (FIVE) { /* the fifth bit of input k moved to bit 4 of the index: 32-entry table */
                    const int k = 8 * j + t;
                    const __m512i high = k >= 4 ? _mm512_srli_epi32(h, k - 4) : _mm512_slli_epi32(h, 4 - k);
                    const __m512i idx = _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 4 * t), high, low4, 0xE4);
                    q = _mm512_permutex2var_ps(iota, idx, iota16); /* (idx & 15) | (high & 16) indexes 0..31 */
                } else {
                    q = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * t), iota); /* low 4 bits index */
                }
#pragma GCC unroll 8
                for (int i = 0; i < MT; i++) {
                    const int c = (j * 8 + t) % CHAINS;
                    part[i][c] = _mm512_fmadd_ps(q, _mm512_set1_ps(x[i * ldx + b * GROUP + 8 * j + t]), part[i][c]);
                }
            }
        }
        const __m512 d = F32 ? _mm512_loadu_ps((const float *)(rec + S))
                             : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + S)));
        const __m512 m = F32 ? _mm512_loadu_ps((const float *)(rec + S + 64))
                             : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + S + 32)));
        for (int i = 0; i < MT; i++) {
            __m512 s = part[i][0];
            for (int c = 1; c < CHAINS; c++) s = _mm512_add_ps(s, part[i][c]);
            acc[i] = _mm512_fmadd_ps(d, s, acc[i]);
            acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(sums[i * blocks + b]), acc[i]);
        }
    }
    for (int i = 0; i < MT; i++) _mm512_storeu_ps(y + i * ldy, acc[i]);
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) /* AVX2 + FMA: most laptops, older AMD */
#include <immintrin.h>

int q4_simd(void) { return 256; }

#define SIMD_PANEL 1
#define MAX_MT 4   /* rows of x per pass over a panel */
#define SCALED_X 1 /* the panel reads x times 16^-t at input t of each 8 (see below) */

#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 8
#endif

/* As the AVX-512 panel, 8 lanes wide: a panel's 16 rows are two vectors (h = 0: rows 0..7, h = 1: rows 8..15).
 * A code becomes a float by int -> float conversion, not by a permute (an 8-entry table needs two and a blend:
 * measured 2x slower), and without a shift: nibble t is masked in place, so the integer is q * 16^t, multiplied
 * with x already scaled by 16^-t (q4_matmul's scaled copy; t = 7 is shifted down instead, as the top nibble
 * would make the integer negative). A fifth bit is shifted to just above its nibble. Powers of two: the
 * products are q * x exactly (but for |x| < 2^-102, whose scaled copy is subnormal: an error below 1e-36 a
 * product). That leaves 3 ops per 8 codes (mask, convert, FMA), 1.5 with 4 rows of x. 4 rows at a time, their
 * totals kept in y (updated once a block, in the L1 cache), so the 16 registers hold only the block's sums:
 * 8 vectors whatever the rows (measured: totals in registers allow 2 rows, 20% slower at 3-4 rows; decoding a
 * chunk of the panel once into float32 for a dense kernel over many rows was no faster). */
static inline __attribute__((always_inline)) void panel(const float *x, int64_t ldx, const float *sums,
                                                        const uint8_t *w, int64_t blocks, float *y, int64_t ldy,
                                                        const int MT, const int F32, const int FIVE) {
    const int R = record_bytes(F32, FIVE), S = FIVE ? 320 : 256; /* S: where d starts */
    const int CHAINS = MT == 1 ? 4 : MT == 2 ? 2 : 1; /* independent sums: enough FMAs in flight */
    for (int i = 0; i < MT; i++) {
        _mm256_storeu_ps(y + i * ldy, _mm256_setzero_ps());
        _mm256_storeu_ps(y + i * ldy + 8, _mm256_setzero_ps());
    }
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *rec = w + b * R;
        for (int l = 0; l < R; l += 64) _mm_prefetch((const char *)(rec + PREFETCH_BLOCKS * R + l), _MM_HINT_T0);
        __m256 part[MT][CHAINS][2];
        for (int i = 0; i < MT; i++)
            for (int c = 0; c < CHAINS; c++) part[i][c][0] = part[i][c][1] = _mm256_setzero_ps();
        const __m256i high[2] = {FIVE ? _mm256_loadu_si256((const __m256i *)(rec + 256)) : _mm256_setzero_si256(),
                                 FIVE ? _mm256_loadu_si256((const __m256i *)(rec + 288)) : _mm256_setzero_si256()};
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            const __m256i v[2] = {_mm256_loadu_si256((const __m256i *)(rec + 64 * j)),
                                  _mm256_loadu_si256((const __m256i *)(rec + 64 * j + 32))};
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) {
                const int c = (j * 8 + t) % CHAINS, k = 8 * j + t, top = t == 7 ? 4 : 4 * t + 4; /* fifth bit's place */
                for (int h = 0; h < 2; h++) {
                    __m256i n = t == 7 ? _mm256_srli_epi32(v[h], 28)
                                       : _mm256_and_si256(v[h], _mm256_set1_epi32(15 << (4 * t)));
                    if (FIVE) { /* bit k of high -> bit `top` */
                        const __m256i moved = k >= top ? _mm256_srli_epi32(high[h], k - top)
                                                       : _mm256_slli_epi32(high[h], top - k);
                        n = _mm256_or_si256(n, _mm256_and_si256(moved, _mm256_set1_epi32(1 << top)));
                    }
                    const __m256 q = _mm256_cvtepi32_ps(n); /* q * 16^t (t < 7), q (t = 7) */
                    for (int i = 0; i < MT; i++)
                        part[i][c][h] = _mm256_fmadd_ps(q, _mm256_set1_ps(x[i * ldx + b * GROUP + k]), part[i][c][h]);
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 d = F32 ? _mm256_loadu_ps((const float *)(rec + S + 32 * h))
                                 : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + S + 16 * h)));
            const __m256 m = F32 ? _mm256_loadu_ps((const float *)(rec + S + 64 + 32 * h))
                                 : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + S + 32 + 16 * h)));
            for (int i = 0; i < MT; i++) {
                __m256 s = part[i][0][h];
                for (int c = 1; c < CHAINS; c++) s = _mm256_add_ps(s, part[i][c][h]);
                const __m256 acc = _mm256_fmadd_ps(d, s, _mm256_loadu_ps(y + i * ldy + 8 * h));
                _mm256_storeu_ps(y + i * ldy + 8 * h, _mm256_fmadd_ps(m, _mm256_set1_ps(sums[i * blocks + b]), acc));
            }
        }
    }
}

#else /* scalar fallback: the same sums */

int q4_simd(void) { return 0; }

#define MAX_MT 8
#define SCALED_X 0

static void panel_rows(const float *x, int64_t ldx, const float *sums, int mt, const uint8_t *w, int64_t blocks,
                       int f32, int five, float *y, int64_t ldy) {
    const int R = record_bytes(f32, five), S = five ? 320 : 256;
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < PANEL; r++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < blocks; b++) {
                const uint8_t *rec = w + b * R;
                float part = 0.0f;
                uint32_t high = 0;
                if (five) memcpy(&high, rec + 256 + 4 * r, 4);
                for (int j = 0; j < 4; j++) {
                    uint32_t lane;
                    memcpy(&lane, rec + 64 * j + 4 * r, 4);
                    for (int t = 0; t < 8; t++) {
                        const int k = 8 * j + t;
                        const uint32_t code = ((lane >> (4 * t)) & 15) | (((high >> k) & 1) << 4);
                        part += (float)code * x[i * ldx + b * GROUP + k];
                    }
                }
                float d, m;
                if (f32) {
                    memcpy(&d, rec + S + 4 * r, 4);
                    memcpy(&m, rec + S + 64 + 4 * r, 4);
                } else {
                    uint16_t hd, hm;
                    memcpy(&hd, rec + S + 2 * r, 2);
                    memcpy(&hm, rec + S + 32 + 2 * r, 2);
                    d = half_to_float(hd);
                    m = half_to_float(hm);
                }
                acc += d * part + m * sums[i * blocks + b];
            }
            y[i * ldy + r] = acc;
        }
}

#endif

#ifdef SIMD_PANEL /* one compiled panel per (rows, format): the row count and format must be constants */
#define PANEL_CASE(MT, F32, FIVE) \
    case MT: panel(x, ldx, sums, w, blocks, y, ldy, MT, F32, FIVE); break;
#if MAX_MT > 4
#define PANEL_CASES_5_TO_8(F32, FIVE) \
    PANEL_CASE(5, F32, FIVE) PANEL_CASE(6, F32, FIVE) PANEL_CASE(7, F32, FIVE) PANEL_CASE(8, F32, FIVE)
#else
#define PANEL_CASES_5_TO_8(F32, FIVE)
#endif
#define FORMAT_CASE(F32, FIVE) \
    switch (mt) { PANEL_CASE(1, F32, FIVE) PANEL_CASE(2, F32, FIVE) PANEL_CASE(3, F32, FIVE) PANEL_CASE(4, F32, FIVE) \
                  PANEL_CASES_5_TO_8(F32, FIVE) }

static void panel_rows(const float *x, int64_t ldx, const float *sums, int mt, const uint8_t *w, int64_t blocks,
                       int f32, int five, float *y, int64_t ldy) {
    if (!f32 && !five) FORMAT_CASE(0, 0)
    else if (!five) FORMAT_CASE(1, 0)
    else if (!f32) FORMAT_CASE(0, 1)
    else FORMAT_CASE(1, 1)
}
#endif

/* x: float32 [M, K] contiguous; w: N / 16 panels (layout above; f32: float32 d and m; five: 5-bit codes);
 * y: float32 [M, N]. K % 32 == 0, N % 16 == 0. Returns 0, or -1 when out of memory. */
int q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int f32, int five, float *y,
              int nthreads) {
    const int64_t blocks = K / GROUP, panels = N / PANEL, R = record_bytes(f32, five);
    float *sums = malloc(sizeof(float) * (M * blocks + (SCALED_X ? M * K : 0) + 1));
    if (!sums) return -1;
    for (int64_t i = 0; i < M * blocks; i++) {
        float s = 0.0f;
        for (int k = 0; k < GROUP; k++) s += x[i * GROUP + k];
        sums[i] = s;
    }
    if (SCALED_X) { /* x * 16^-t at input t of each 8, but t = 7: the AVX2 panel's codes come as q * 16^t */
        static const float scale[8] = {1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.0f};
        float *scaled = sums + M * blocks;
        for (int64_t i = 0; i < M * K; i++) scaled[i] = x[i] * scale[i % 8];
        x = scaled;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t m0 = 0; m0 < M; m0 += MAX_MT) {
            int mt = M - m0 < MAX_MT ? (int)(M - m0) : MAX_MT;
            panel_rows(x + m0 * K, K, sums + m0 * blocks, mt, w + p * blocks * R, blocks, f32, five,
                       y + m0 * N + p * PANEL, N);
        }
    free(sums);
    return 0;
}
