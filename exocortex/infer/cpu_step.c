/* The decode step on CPU with bf16 weights, as one C function (exocortex/infer/native.py builds and calls
 * it): one token for each of n rows, each row at its own position in its own row of the cache. The same math as
 * decode_step in decode.py with the norm gains folded into the matrices (FusedWeights' rows layout):
 * embedding, then per layer rms -> q/k/v -> per-head q/k norm -> rotary -> the key/value written to the cache
 * -> attention over positions 0..pos -> output matrix into the residual -> rms -> gate/up -> silu(gate) * up
 * -> down matrix into the residual; at the end rms -> head. Activations are rounded to bf16 where they enter a
 * matrix, as torch's bf16 step rounds them.
 *
 * Why by hand: at a few rows a matmul reads each weight once for little arithmetic. Inductor's multiply-and-sum
 * converts every bf16 weight to float32 before its multiply-add and sums each output horizontally; here the
 * weights are packed so that one AVX512-BF16 `vdpbf16ps` multiplies a pair of inputs into 16 outputs at once
 * (32 weights per instruction, no conversion, no horizontal sums), and each weight loaded serves up to four
 * rows. Attention, softmax and SwiGLU are vectorized by hand too (exp16). Without AVX512-BF16 the same steps
 * are plain C loops: correct everywhere (the tests run them on any machine), never chosen for speed.
 *
 * Packed matrix: an (in, out) matrix W as [out/16][in/2][16][2] bf16 (out padded to 16, in to 2 with zeros):
 * block b, pair p holds W[2p][16b..16b+15] and W[2p+1][16b..16b+15] interleaved.
 *
 * Threads: one OpenMP team for the whole step, between barriers (ten per layer): the matrices share out their
 * blocks, the attention its (row, head) pairs, the rest its rows. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

typedef uint16_t bf16;

typedef struct {
    const bf16 *w;    /* packed, see above */
    int in, out;      /* logical sizes */
} Matrix;

typedef struct {
    Matrix qkv, o, gu, down;
    const float *qk_gain;  /* (n_heads + n_kv, head_dim), 1/sqrt(head_dim) folded into the q rows */
    bf16 *k, *v;           /* row 0 of the cache: (rows, n_kv, max_len, head_dim) */
} Layer;

typedef struct {
    int depth, dim, n_heads, n_kv, head_dim, ffn, vocab, max_len, max_rows, cache_rows;
    float eps;
    const float *embed;      /* (vocab, dim) */
    const float *cos, *sin;  /* (limit, head_dim); sin's first half negated (rotation by a roll) */
    Matrix head;
    const Layer *layers;
    /* max_rows: tokens per call (the scratch's rows); cache_rows: the cache's rows (slots).
       scratch for max_rows rows, each row at a stride of: x dim, out out_stride (the widest padded output),
       qk (n_heads + n_kv) * head_dim, att n_heads * max_len, y n_heads * head_dim, xb in_stride (bf16, the
       widest input + 2), scale 1 */
    int out_stride, in_stride;
    float *x, *out, *qk, *att, *y, *scale;
    bf16 *xb;
} Model;

static inline float bf16_to_f32(bf16 h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

static inline bf16 f32_to_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffff) > 0x7f800000) return (bf16)((v.u >> 16) | 0x40);  /* NaN stays NaN */
    v.u += 0x7fff + ((v.u >> 16) & 1);
    return (bf16)(v.u >> 16);
}

#if defined(__AVX512BF16__)
/* R rows (1..4) x 4 blocks: every weight loaded once feeds R rows */
static inline __attribute__((always_inline)) void mv4(const bf16 *xb, int xs, const bf16 *w, size_t block,
                                                      int pairs, float *out, int os, const int R) {
    __m512 a[4][4];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++) a[r][j] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; p++) {
        __m512bh wv[4];
        for (int j = 0; j < 4; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * block + p * 32);
        for (int r = 0; r < R; r++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32(((const int *)(xb + (size_t)r * xs))[p]);
            for (int j = 0; j < 4; j++) a[r][j] = _mm512_dpbf16_ps(a[r][j], xv, wv[j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(out + (size_t)r * os + 16 * j, a[r][j]);
}

static inline __attribute__((always_inline)) void mv1(const bf16 *xb, int xs, const bf16 *w, int pairs,
                                                      float *out, int os, const int R) {
    __m512 a[4];
    for (int r = 0; r < R; r++) a[r] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; p++) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(w + p * 32);
        for (int r = 0; r < R; r++)
            a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32(((const int *)(xb + (size_t)r * xs))[p]), wv);
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + (size_t)r * os, a[r]);
}
#endif

/* out[r][16 b0 .. 16 b1) = xb[r] @ W for rows r < n and blocks b0..b1 of W (xb rows: bf16, zero-padded to
   even, xs apart; out rows os apart) */
static void matvec_blocks(const bf16 *xb, int xs, int n, const Matrix *m, float *out, int os, int b0, int b1) {
    const int pairs = (m->in + 1) / 2;
    const size_t block = (size_t)pairs * 32;
#if defined(__AVX512BF16__)
    for (int r0 = 0; r0 < n; r0 += 4) {  /* rows four at a time: a block's weights are read once per four rows */
        const int R = n - r0 < 4 ? n - r0 : 4;
        const bf16 *x = xb + (size_t)r0 * xs;
        float *o = out + (size_t)r0 * os;
        int b = b0;
        for (; b + 4 <= b1; b += 4) {
            const bf16 *w = m->w + (size_t)b * block;
            switch (R) {  /* constant R: the accumulators stay in registers */
                case 1: mv4(x, xs, w, block, pairs, o + 16 * b, os, 1); break;
                case 2: mv4(x, xs, w, block, pairs, o + 16 * b, os, 2); break;
                case 3: mv4(x, xs, w, block, pairs, o + 16 * b, os, 3); break;
                default: mv4(x, xs, w, block, pairs, o + 16 * b, os, 4);
            }
        }
        for (; b < b1; b++) {
            const bf16 *w = m->w + (size_t)b * block;
            switch (R) {
                case 1: mv1(x, xs, w, pairs, o + 16 * b, os, 1); break;
                case 2: mv1(x, xs, w, pairs, o + 16 * b, os, 2); break;
                case 3: mv1(x, xs, w, pairs, o + 16 * b, os, 3); break;
                default: mv1(x, xs, w, pairs, o + 16 * b, os, 4);
            }
        }
    }
#else
    for (int r = 0; r < n; r++)
        for (int b = b0; b < b1; b++) {
            const bf16 *w = m->w + (size_t)b * block, *x = xb + (size_t)r * xs;
            float acc[16] = {0};
            for (int p = 0; p < pairs; p++) {
                const float x0 = bf16_to_f32(x[2 * p]), x1 = bf16_to_f32(x[2 * p + 1]);
                for (int j = 0; j < 16; j++)
                    acc[j] += x0 * bf16_to_f32(w[p * 32 + 2 * j]) + x1 * bf16_to_f32(w[p * 32 + 2 * j + 1]);
            }
            memcpy(out + (size_t)r * os + 16 * b, acc, sizeof acc);
        }
#endif
}

/* out = xb @ W for n rows, over the team (called by every thread; ends with the team's barrier). Threads take
   runs of four blocks as they come (dynamic): a thread the OS deschedules for a moment (beside a server's event
   loop) leaves its share to the others instead of holding them all at the barrier. */
static void matvec(const Model *md, int n, const Matrix *m) {
    const int blocks = (m->out + 15) / 16;
#pragma omp for schedule(dynamic, 1)
    for (int b = 0; b < blocks; b += 4)
        matvec_blocks(md->xb, md->in_stride, n, m, md->out, md->out_stride, b, b + 4 < blocks ? b + 4 : blocks);
}

/* the same for rows r0..n-1 only */
static void matvec_from(const Model *md, int r0, int n, const Matrix *m) {
    const int blocks = (m->out + 15) / 16;
#pragma omp for schedule(dynamic, 1)
    for (int b = 0; b < blocks; b += 4)
        matvec_blocks(md->xb + (size_t)r0 * md->in_stride, md->in_stride, n - r0, m,
                      md->out + (size_t)r0 * md->out_stride, md->out_stride, b, b + 4 < blocks ? b + 4 : blocks);
}

/* xb = bf16(v) (n values, zero-padded to even); returns 1/rms(v) */
static float to_bf16_rms(const float *v, int n, bf16 *xb, float eps) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) {
        ss += v[i] * v[i];
        xb[i] = f32_to_bf16(v[i]);
    }
    if (n & 1) xb[n] = 0;
    return 1.0f / sqrtf(ss / (float)n + eps);
}

/* x += o, then xb = bf16(x); returns 1/rms(x): a residual add and the norm of the next matrix's input */
static float add_then_rms(float *x, const float *o, int n, bf16 *xb, float eps) {
    for (int i = 0; i < n; i++) x[i] += o[i];
    return to_bf16_rms(x, n, xb, eps);
}

static void to_bf16(const float *v, int n, bf16 *xb) {
    for (int i = 0; i < n; i++) xb[i] = f32_to_bf16(v[i]);
    if (n & 1) xb[n] = 0;
}

#if defined(__AVX512BF16__)
static inline __m512 bf16x16(const bf16 *p) {
    return _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)p));
}

/* e^x for x in float32 lanes, to ~1e-7 relative: 2^n * e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by
   its Taylor series to r^7 */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147181f), x);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* y (hd) = softmax(q . k[t] for t < span) @ v[0..span): the query is bf16-valued, the probabilities rounded to
   bf16 as decode_step's softmax(...).to(v.dtype); a (span) is scratch */
static void attend(const float *q, const bf16 *kc, const bf16 *vc, int span, int hd, float *a, float *y) {
    float mx = -INFINITY, sum = 0.f;
    int t = 0;
#if defined(__AVX512BF16__)
    if (hd % 16 == 0) {
        for (; t < span; t++) {
            __m512 acc = _mm512_setzero_ps();
            for (int i = 0; i < hd; i += 16)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), bf16x16(kc + (size_t)t * hd + i), acc);
            a[t] = _mm512_reduce_add_ps(acc);
            mx = a[t] > mx ? a[t] : mx;
        }
        const __m512 m16 = _mm512_set1_ps(mx);
        __m512 s16 = _mm512_setzero_ps();
        for (t = 0; t + 16 <= span; t += 16) {
            const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(a + t), m16));
            _mm512_storeu_ps(a + t, e);
            s16 = _mm512_add_ps(s16, e);
        }
        sum = _mm512_reduce_add_ps(s16);
        for (; t < span; t++) sum += (a[t] = expf(a[t] - mx));
        __m512 acc[8];
        const int chunks = hd / 16 < 8 ? hd / 16 : 8;
        if (hd <= 128) {
            for (int c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();
            for (t = 0; t < span; t++) {
                const __m512 p = _mm512_set1_ps(bf16_to_f32(f32_to_bf16(a[t] / sum)));
                for (int c = 0; c < chunks; c++)
                    acc[c] = _mm512_fmadd_ps(p, bf16x16(vc + (size_t)t * hd + 16 * c), acc[c]);
            }
            for (int c = 0; c < chunks; c++) _mm512_storeu_ps(y + 16 * c, acc[c]);
            return;
        }
        for (int i = 0; i < hd; i++) y[i] = 0.f;
        for (t = 0; t < span; t++) {
            const __m512 p = _mm512_set1_ps(bf16_to_f32(f32_to_bf16(a[t] / sum)));
            for (int i = 0; i < hd; i += 16)
                _mm512_storeu_ps(y + i, _mm512_fmadd_ps(p, bf16x16(vc + (size_t)t * hd + i), _mm512_loadu_ps(y + i)));
        }
        return;
    }
#endif
    for (t = 0; t < span; t++) {
        float s = 0.f;
        for (int i = 0; i < hd; i++) s += q[i] * bf16_to_f32(kc[(size_t)t * hd + i]);
        a[t] = s;
        mx = s > mx ? s : mx;
    }
    for (t = 0; t < span; t++) sum += (a[t] = expf(a[t] - mx));
    for (int i = 0; i < hd; i++) y[i] = 0.f;
    for (t = 0; t < span; t++) {
        const float p = bf16_to_f32(f32_to_bf16(a[t] / sum));
        for (int i = 0; i < hd; i++) y[i] += p * bf16_to_f32(vc[(size_t)t * hd + i]);
    }
}

/* o[i] = silu(o[i] * scale) * o[F + i] * scale for i < F */
static void swiglu(float *o, int F, float scale) {
    int i = 0;
#if defined(__AVX512BF16__)
    const __m512 s = _mm512_set1_ps(scale), one = _mm512_set1_ps(1.f);
    for (; i + 16 <= F; i += 16) {
        const __m512 g = _mm512_mul_ps(_mm512_loadu_ps(o + i), s), u = _mm512_mul_ps(_mm512_loadu_ps(o + F + i), s);
        const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_mul_ps(g, sig), u));
    }
#endif
    for (; i < F; i++) {
        const float g = o[i] * scale, u = o[F + i] * scale;
        o[i] = g / (1.0f + expf(-g)) * u;
    }
}

/* Tokens 0..n-1, token r at position pos[r] of the cache's row slots[r] (slots NULL: row r) -> the logits of
   tokens head_from..n-1, (n - head_from, vocab) float32. Writes each token's key/value at its position first,
   then each attends to its row's keys 0..pos[r]: tokens of one row at consecutive positions are a chunk of a
   prompt (causal among themselves), tokens of different rows a decode step. */
int exo_step(const Model *m, int n, const int64_t *tokens, const int64_t *pos, const int64_t *slots,
             int head_from, float *logits, int threads) {
    for (int r = 0; r < n; r++) {  /* nothing outside the tables and the cache is ever read or written */
        if (tokens[r] < 0 || tokens[r] >= m->vocab) return 1;
        if (pos[r] < 0 || pos[r] >= m->max_len) return 2;
        if (slots ? slots[r] < 0 || slots[r] >= m->cache_rows : r >= m->cache_rows) return 3;
    }
    if (n > m->max_rows) return 3;
    const int D = m->dim, H = m->n_heads, KV = m->n_kv, hd = m->head_dim, half = hd / 2, rep = H / KV;
    const int nq = H + KV, F = m->ffn, os = m->out_stride, xs = m->in_stride;
    const size_t kv_row = (size_t)KV * m->max_len * hd, kv_head = (size_t)m->max_len * hd;
    for (int r = 0; r < n; r++) memcpy(m->x + (size_t)r * D, m->embed + (size_t)tokens[r] * D, sizeof(float) * D);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int r = 0; r < n; r++)  /* each layer's end does this for the next one (and for the head) */
            m->scale[r] = to_bf16_rms(m->x + (size_t)r * D, D, m->xb + (size_t)r * xs, m->eps);
        for (int l = 0; l < m->depth; l++) {
            const Layer *L = &m->layers[l];
            matvec(m, n, &L->qkv);
#pragma omp for schedule(dynamic, 1)
            for (int r = 0; r < n; r++) {
                /* q and k: rms per head with its gain, then rotary; k and v into the cache; q rounded to bf16
                   as the cache's dtype (decode_step does the same) */
                const float scale = m->scale[r], *o = m->out + (size_t)r * os;
                const float *cs = m->cos + (size_t)pos[r] * hd, *sn = m->sin + (size_t)pos[r] * hd;
                float *qk = m->qk + (size_t)r * nq * hd;
                for (int h = 0; h < nq; h++) {
                    const float *src = o + h * hd, *g = L->qk_gain + h * hd;
                    float ss = 0.f, *dst = qk + h * hd;
                    for (int i = 0; i < hd; i++) ss += (src[i] * scale) * (src[i] * scale);
                    const float k = scale / sqrtf(ss / (float)hd + m->eps);
                    for (int i = 0; i < hd; i++) {
                        const int j = i < half ? i + half : i - half;
                        dst[i] = src[i] * k * g[i] * cs[i] + src[j] * k * g[j] * sn[i];
                    }
                }
                for (int g = 0; g < KV; g++) {
                    const size_t at = (slots ? slots[r] : r) * kv_row + g * kv_head + (size_t)pos[r] * hd;
                    const float *ks = qk + (H + g) * hd, *vs = o + (nq + g) * hd;
                    for (int i = 0; i < hd; i++) {
                        L->k[at + i] = f32_to_bf16(ks[i]);
                        L->v[at + i] = f32_to_bf16(vs[i] * scale);
                    }
                }
                for (int i = 0; i < H * hd; i++) qk[i] = bf16_to_f32(f32_to_bf16(qk[i]));
            }
            /* attention, each (row, query head) on its own */
#pragma omp for schedule(dynamic, 1)
            for (int rh = 0; rh < n * H; rh++) {
                const int r = rh / H, h = rh % H, span = (int)pos[r] + 1;
                const size_t base = (slots ? slots[r] : r) * kv_row + (size_t)(h / rep) * kv_head;
                attend(m->qk + (size_t)r * nq * hd + h * hd, L->k + base, L->v + base, span, hd,
                       m->att + (size_t)rh * m->max_len, m->y + (size_t)rh * hd);
            }
#pragma omp for schedule(dynamic, 1)
            for (int r = 0; r < n; r++) to_bf16(m->y + (size_t)r * H * hd, H * hd, m->xb + (size_t)r * xs);
            matvec(m, n, &L->o);
#pragma omp for schedule(dynamic, 1)
            for (int r = 0; r < n; r++)
                m->scale[r] = add_then_rms(m->x + (size_t)r * D, m->out + (size_t)r * os, D, m->xb + (size_t)r * xs,
                                           m->eps);
            matvec(m, n, &L->gu);
#pragma omp for schedule(dynamic, 1)
            for (int r = 0; r < n; r++) {
                float *o = m->out + (size_t)r * os;
                swiglu(o, F, m->scale[r]);
                to_bf16(o, F, m->xb + (size_t)r * xs);
            }
            matvec(m, n, &L->down);
#pragma omp for schedule(dynamic, 1)
            for (int r = 0; r < n; r++)
                m->scale[r] = add_then_rms(m->x + (size_t)r * D, m->out + (size_t)r * os, D, m->xb + (size_t)r * xs,
                                           m->eps);
        }
        if (head_from < n) matvec_from(m, head_from, n, &m->head);
#pragma omp for schedule(dynamic, 1)
        for (int r = head_from; r < n; r++)
            for (int i = 0; i < m->vocab; i++)
                logits[(size_t)(r - head_from) * m->vocab + i] = m->out[(size_t)r * os + i] * m->scale[r];
    }
    return 0;
}

/* Whether this build uses AVX512-BF16 (1) or the plain C loops (0). */
int exo_native_kernel(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}
