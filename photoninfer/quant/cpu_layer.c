/* One decoder layer of a decode step in one call (the CPU fast path's `native_decode`), for M sequences that
 * each compute one token, with every linear layer in q4_kernels.c's panels:
 *   residual += x;  h = rmsnorm(residual) * w_in;  qkv = h @ Wqkv^T;  rotate q, k (rope, halves);
 *   write k, v into the paged cache at the token's slot;  a = attention of q over the sequence's blocks;
 *   x = a @ Wo^T;  residual += x;  h = rmsnorm(residual) * w_post;  gu = h @ Wgu^T;  x = (silu(g) * u) @ Wd^T
 * float32 throughout, the same operations as cpu_fast.py's torch forward (its reference in the tests), so only
 * the order of float32 sums differs. Saves ~20 torch ops a layer (their dispatch is most of a small model's step).
 * Llama/SmolLM2 only: no q/k norm, no biases (the Python side checks).
 */
#include <math.h>
#include <stdint.h>

int q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y, int nthreads);

struct layer {
    const float *in_norm, *post_norm; /* [hidden] */
    const uint8_t *qkv, *o, *gate_up, *down;
    float *k_cache, *v_cache; /* [blocks, block_size, kv_heads, head_dim] */
};

struct step {
    int64_t rows, hidden, heads, kv_heads, head_dim, inter, block_size, max_blocks;
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

/* out[D] = softmax(q . K^T * scale) V over `len` tokens of the sequence's blocks, kv head `kvh`
 * (one pass, rescaling the running sums when the maximum grows) */
static void attend(const struct step *s, const struct layer *l, const float *q, const int64_t *blocks, int64_t len,
                   int64_t kvh, float *out) {
    const int64_t dim = s->head_dim, token_stride = s->kv_heads * dim;
    float max = -INFINITY, sum = 0.0f;
    for (int64_t i = 0; i < dim; i++) out[i] = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        const int64_t slot = blocks[t / s->block_size] * s->block_size + t % s->block_size;
        const float *k = l->k_cache + slot * token_stride + kvh * dim, *v = l->v_cache + slot * token_stride + kvh * dim;
        float score = 0.0f;
        for (int64_t i = 0; i < dim; i++) score += q[i] * k[i];
        score *= s->scale;
        if (score > max) {
            const float c = expf(max - score);
            sum *= c;
            for (int64_t i = 0; i < dim; i++) out[i] *= c;
            max = score;
        }
        const float p = expf(score - max);
        sum += p;
        for (int64_t i = 0; i < dim; i++) out[i] += p * v[i];
    }
    for (int64_t i = 0; i < dim; i++) out[i] /= sum;
}

void native_decode_layer(const struct step *s, const struct layer *l, float *residual, float *x) {
    const int64_t M = s->rows, H = s->hidden, D = s->head_dim, F = s->inter;
    const int64_t q_size = s->heads * D, kv_size = s->kv_heads * D, qkv_size = q_size + 2 * kv_size;
    float *h = s->work, *qkv = h + M * H, *a = qkv + M * qkv_size, *gu = a + M * q_size, *act = gu + 2 * M * F;

    for (int64_t r = 0; r < M; r++) {
        for (int64_t i = 0; i < H; i++) residual[r * H + i] += x[r * H + i];
        rms_norm(residual + r * H, l->in_norm, H, s->eps, h + r * H);
    }
    q4_matmul(h, M, H, l->qkv, qkv_size, qkv, s->nthreads);
    for (int64_t r = 0; r < M; r++) {
        float *q = qkv + r * qkv_size, *k = q + q_size, *v = k + kv_size;
        rope(q, s->heads + s->kv_heads, D, s->cos + r * (D / 2), s->sin + r * (D / 2)); /* q and k: adjacent */
        for (int64_t i = 0; i < kv_size; i++) {
            l->k_cache[s->slots[r] * kv_size + i] = k[i];
            l->v_cache[s->slots[r] * kv_size + i] = v[i];
        }
    }
    const int64_t group = s->heads / s->kv_heads;
#pragma omp parallel for num_threads(s->nthreads) schedule(static) if (s->nthreads > 1)
    for (int64_t job = 0; job < M * s->heads; job++) {
        const int64_t r = job / s->heads, head = job % s->heads;
        attend(s, l, qkv + r * qkv_size + head * D, s->blocks + r * s->max_blocks, s->lens[r], head / group,
               a + r * q_size + head * D);
    }
    q4_matmul(a, M, q_size, l->o, H, x, s->nthreads);
    for (int64_t r = 0; r < M; r++) {
        for (int64_t i = 0; i < H; i++) residual[r * H + i] += x[r * H + i];
        rms_norm(residual + r * H, l->post_norm, H, s->eps, h + r * H);
    }
    q4_matmul(h, M, H, l->gate_up, 2 * F, gu, s->nthreads);
    for (int64_t r = 0; r < M; r++)
        for (int64_t i = 0; i < F; i++) {
            const float g = gu[r * 2 * F + i];
            act[r * F + i] = g / (1.0f + expf(-g)) * gu[r * 2 * F + F + i];
        }
    q4_matmul(act, M, F, l->down, H, x, s->nthreads);
}
