/* One decoder layer of a decode step in one call (the CPU fast path's `native_decode`), for M sequences that
 * each compute one token, with every linear layer in one of our packed formats (packed_matmul.c):
 *   residual += x;  h = rmsnorm(residual) * w_in;  qkv = h @ Wqkv^T;  rotate q, k (rope, halves);
 *   write k, v into the paged cache at the token's slot;  a = attention of q over the sequence's blocks;
 *   x = a @ Wo^T;  residual += x;  h = rmsnorm(residual) * w_post;  gu = h @ Wgu^T;  x = (silu(g) * u) @ Wd^T
 * float32 throughout, the same operations as cpu_fast.py's torch forward (its reference in the tests), so only
 * the order of float32 sums differs. Saves ~20 torch ops a layer (their dispatch is most of a small model's step).
 * Llama/SmolLM2 only: no q/k norm, no biases, head_dim and intermediate size % 16 == 0, block_size a power
 * of two (native_decode.py checks).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

int packed_matmul(int format, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y,
                  int nthreads);

struct linear {
    const uint8_t *panels;
    int64_t format; /* packed_matmul's */
};

struct layer {
    const float *in_norm, *post_norm; /* [hidden] */
    struct linear qkv, o, gate_up, down;
    float *k_cache, *v_cache; /* [blocks, block_size, kv_heads, head_dim] */
};

static inline int matmul(const struct linear *w, const float *x, int64_t M, int64_t K, int64_t N, float *y,
                         int nthreads) {
    return packed_matmul((int)w->format, x, M, K, w->panels, N, y, nthreads);
}

struct step {
    int64_t rows, hidden, heads, kv_heads, head_dim, inter, block_size, block_shift, max_blocks;
    float eps, scale;
    const float *cos, *sin;   /* [rows, head_dim / 2] at each row's position */
    const int64_t *slots;     /* [rows] cache slot of the new token */
    const int64_t *lens;      /* [rows] context length, the new token included */
    const int64_t *blocks;    /* [rows, max_blocks] block tables */
    float *work;              /* scratch, native_decode_work_floats() floats */
    int nthreads;
};

int64_t native_decode_work_floats(const struct step *s) {
    const int64_t qkv = (s->heads + 2 * s->kv_heads) * s->head_dim;
    return s->rows * (s->hidden + qkv + s->heads * s->head_dim + 3 * s->inter);
}

static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
    float sq = 0.0f;
    for (int64_t i = 0; i < n; i++) sq += x[i] * x[i];
    const float r = 1.0f / sqrtf(sq / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* x: [heads, head_dim] rotated in place: (a, b) halves -> (a cos - b sin, b cos + a sin) */
static void rope(float *x, int64_t heads, int64_t dim, const float *cos, const float *sin) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *a = x + h * dim, *b = a + half;
        for (int64_t i = 0; i < half; i++) {
            const float x1 = a[i], x2 = b[i];
            a[i] = x1 * cos[i] + x2 * -sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
/* 2^f on |f| <= 1/2, the vector exps' polynomial (coefficients of f^0 .. f^6) */
static const float EXP2_POLY[7] = {1.0f, 0.693147182f, 0.240226507f, 0.0555041087f, 0.00961812911f,
                                   0.00133335581f, 0.000154034646f};
#endif

#if defined(__AVX512F__)
#include <immintrin.h>

static inline float dot(const float *a, const float *b, int64_t n) { /* n % 16 == 0 */
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
    for (int64_t i = 16; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
}

/* y += a * x (n % 16 == 0) */
static inline void axpy(float a, const float *x, float *y, int64_t n) {
    const __m512 va = _mm512_set1_ps(a);
    for (int64_t i = 0; i < n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
}

/* exp(x) as 2^n * 2^f, 2^f by a degree-6 polynomial on |f| <= 1/2 (relative error ~2e-7, like a float32
 * exp; torch's vectorized exp is also a polynomial) */
static inline __m512 vexp(__m512 x) {
    __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f));
    y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-150.0f)), _mm512_set1_ps(128.0f)); /* 0 and inf beyond */
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, n);
    __m512 r = _mm512_set1_ps(EXP2_POLY[6]);
    for (int k = 5; k >= 0; k--) r = _mm512_fmadd_ps(r, f, _mm512_set1_ps(EXP2_POLY[k]));
    return _mm512_scalef_ps(r, n);
}

/* p[t] = exp(p[t] - max), returns their sum */
static float exp_shifted(float *p, int64_t len, float max) {
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t += 16) {
        const __mmask16 mask = len - t >= 16 ? 0xffff : (__mmask16)((1u << (len - t)) - 1);
        const __m512 r = vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p + t), _mm512_set1_ps(max)));
        _mm512_mask_storeu_ps(p + t, mask, r);
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mask, r));
    }
    return _mm512_reduce_add_ps(total);
}

/* out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, n % 16 == 0 */
static void silu_mul(const float *g, const float *u, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 x = _mm512_loadu_ps(g + i);
        const __m512 e = vexp(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)),
                                                _mm512_loadu_ps(u + i)));
    }
}
#elif defined(__AVX2__) && defined(__FMA__) /* the same, 8 lanes wide */
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float dot(const float *a, const float *b, int64_t n) { /* n % 16 == 0: two sums in flight */
    __m256 acc0 = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
    __m256 acc1 = _mm256_mul_ps(_mm256_loadu_ps(a + 8), _mm256_loadu_ps(b + 8));
    for (int64_t i = 16; i < n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
}

/* y += a * x (n % 8 == 0) */
static inline void axpy(float a, const float *x, float *y, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    for (int64_t i = 0; i < n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}

/* exp(x), the AVX-512 vexp's polynomial; 2^n (n in -150..128, no scalef here) as two exponent-field powers of
 * two, so results below 2^-126 and above 2^127 round to subnormals, 0 and inf as there */
static inline __m256 vexp(__m256 x) {
    __m256 y = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f));
    y = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-150.0f)), _mm256_set1_ps(128.0f));
    const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(y, n);
    __m256 r = _mm256_set1_ps(EXP2_POLY[6]);
    for (int k = 5; k >= 0; k--) r = _mm256_fmadd_ps(r, f, _mm256_set1_ps(EXP2_POLY[k]));
    const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1); /* n = half + (n - half) */
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(r, p1), p2);
}

/* p[t] = exp(p[t] - max), returns their sum */
static float exp_shifted(float *p, int64_t len, float max) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 total = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; t += 8) {
        const int rest = len - t >= 8 ? 8 : (int)(len - t);
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(rest), iota);
        const __m256 r = vexp(_mm256_sub_ps(_mm256_maskload_ps(p + t, mask), _mm256_set1_ps(max)));
        _mm256_maskstore_ps(p + t, mask, r);
        total = _mm256_add_ps(total, _mm256_and_ps(r, _mm256_castsi256_ps(mask)));
    }
    return hsum(total);
}

/* out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, n % 8 == 0 */
static void silu_mul(const float *g, const float *u, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = vexp(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                                _mm256_loadu_ps(u + i)));
    }
}
#else
static inline float dot(const float *a, const float *b, int64_t n) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static inline void axpy(float a, const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static float exp_shifted(float *p, int64_t len, float max) {
    float sum = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        p[t] = expf(p[t] - max);
        sum += p[t];
    }
    return sum;
}

static void silu_mul(const float *g, const float *u, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
#endif

/* The cache slot of token t of a sequence (block sizes are powers of two: no division) */
static inline int64_t slot_of(const struct step *s, const int64_t *blocks, int64_t t) {
    return blocks[t >> s->block_shift] * s->block_size + (t & (s->block_size - 1));
}

/* The `group` query heads q [group, D] that share kv head `kvh`: out [group, D] = softmax(q . K^T * scale) V
 * over the sequence's first `len` tokens (scores first, then their exponentials, then the sum of V rows:
 * each K and V row is read once for the whole group). scores: [group, len] scratch. */
static void attend(const struct step *s, const struct layer *l, const float *q, int64_t group, const int64_t *blocks,
                   int64_t len, int64_t kvh, float *out, float *scores) {
    const int64_t dim = s->head_dim, token_stride = s->kv_heads * dim;
    for (int64_t t = 0; t < len; t++) {
        const float *k = l->k_cache + slot_of(s, blocks, t) * token_stride + kvh * dim;
        for (int64_t g = 0; g < group; g++) scores[g * len + t] = dot(q + g * dim, k, dim) * s->scale;
    }
    for (int64_t g = 0; g < group; g++) {
        float *p = scores + g * len, max = -INFINITY;
        for (int64_t t = 0; t < len; t++) max = p[t] > max ? p[t] : max;
        const float sum = exp_shifted(p, len, max);
        for (int64_t t = 0; t < len; t++) p[t] /= sum;
    }
    for (int64_t i = 0; i < group * dim; i++) out[i] = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        const float *v = l->v_cache + slot_of(s, blocks, t) * token_stride + kvh * dim;
        for (int64_t g = 0; g < group; g++) axpy(scores[g * len + t], v, out + g * dim, dim);
    }
}

/* Returns 0, -1 when out of memory, -2 for an unknown weight format. */
int native_decode_layer(const struct step *s, const struct layer *l, float *residual, float *x) {
    const int64_t M = s->rows, H = s->hidden, D = s->head_dim, F = s->inter;
    const int64_t q_size = s->heads * D, kv_size = s->kv_heads * D, qkv_size = q_size + 2 * kv_size;
    float *h = s->work, *qkv = h + M * H, *a = qkv + M * qkv_size, *gu = a + M * q_size, *act = gu + 2 * M * F;
    int rc;

    for (int64_t r = 0; r < M; r++) {
        for (int64_t i = 0; i < H; i++) residual[r * H + i] += x[r * H + i];
        rms_norm(residual + r * H, l->in_norm, H, s->eps, h + r * H);
    }
    if ((rc = matmul(&l->qkv, h, M, H, qkv_size, qkv, s->nthreads))) return rc;
    for (int64_t r = 0; r < M; r++) {
        float *q = qkv + r * qkv_size, *k = q + q_size, *v = k + kv_size;
        rope(q, s->heads + s->kv_heads, D, s->cos + r * (D / 2), s->sin + r * (D / 2)); /* q and k: adjacent */
        for (int64_t i = 0; i < kv_size; i++) {
            l->k_cache[s->slots[r] * kv_size + i] = k[i];
            l->v_cache[s->slots[r] * kv_size + i] = v[i];
        }
    }
    const int64_t group = s->heads / s->kv_heads;
    int failed = 0;
#pragma omp parallel for num_threads(s->nthreads) schedule(dynamic) if (s->nthreads > 1)
    for (int64_t job = 0; job < M * s->kv_heads; job++) {
        const int64_t r = job / s->kv_heads, kvh = job % s->kv_heads;
        float *scores = malloc(sizeof(float) * group * s->lens[r]);
        if (!scores) {
            failed = 1;
            continue;
        }
        attend(s, l, qkv + r * qkv_size + kvh * group * D, group, s->blocks + r * s->max_blocks, s->lens[r], kvh,
               a + r * q_size + kvh * group * D, scores);
        free(scores);
    }
    if (failed) return -1;
    if ((rc = matmul(&l->o, a, M, q_size, H, x, s->nthreads))) return rc;
    for (int64_t r = 0; r < M; r++) {
        for (int64_t i = 0; i < H; i++) residual[r * H + i] += x[r * H + i];
        rms_norm(residual + r * H, l->post_norm, H, s->eps, h + r * H);
    }
    if ((rc = matmul(&l->gate_up, h, M, H, 2 * F, gu, s->nthreads))) return rc;
    for (int64_t r = 0; r < M; r++) silu_mul(gu + r * 2 * F, gu + r * 2 * F + F, act + r * F, F);
    return matmul(&l->down, act, M, F, H, x, s->nthreads);
}
