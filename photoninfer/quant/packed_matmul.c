/* y[M, N] = x[M, K] @ W^T in float32 for a weight in any of our packed formats: one entry point for Python
 * (native.py) and for cpu_layer.c, whose layers may mix formats. The numbers are native.py's FORMATS. */
#include <stdint.h>

int q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int f32, int five, float *y,
              int nthreads);
int i8_matmul(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int group, int biased, float *y,
              int nthreads);

enum { Q4_F16 = 0, Q4_F32 = 1, I8_G32 = 2, I8_G32_BIASED = 3, I8_G16 = 4, I8_G16_BIASED = 5, Q5_F16 = 6, Q5_F32 = 7 };

/* Returns 0, -1 when out of memory, -2 for an unknown format. */
int packed_matmul(int format, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y,
                  int nthreads) {
    switch (format) {
    case Q4_F16: return q4_matmul(x, M, K, w, N, 0, 0, y, nthreads);
    case Q4_F32: return q4_matmul(x, M, K, w, N, 1, 0, y, nthreads);
    case Q5_F16: return q4_matmul(x, M, K, w, N, 0, 1, y, nthreads);
    case Q5_F32: return q4_matmul(x, M, K, w, N, 1, 1, y, nthreads);
    case I8_G32: return i8_matmul(x, M, K, w, N, 32, 0, y, nthreads);
    case I8_G32_BIASED: return i8_matmul(x, M, K, w, N, 32, 1, y, nthreads);
    case I8_G16: return i8_matmul(x, M, K, w, N, 16, 0, y, nthreads);
    case I8_G16_BIASED: return i8_matmul(x, M, K, w, N, 16, 1, y, nthreads);
    default: return -2;
    }
}
