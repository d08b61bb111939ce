/* Decode attention straight from the paged KV cache on x86 CPUs (AVX2 + FMA, fp32): one new query token per
 * sequence.
 *
 * Each (sequence, kv head) is one work item: its G query heads walk the sequence's blocks in table order, so every
 * key and value row is read once, from where it lives, with no gather into a contiguous copy. Softmax is online
 * (a running max and sum per head, rescaled when the max grows), so a block's scores never leave a small stack
 * buffer whatever the context length. Built and loaded by cluster/kernels/cpu_build.py.
 *
 * Legend: B = sequences, H = query heads, KV = kv heads, G = H / KV, Dh = head dim, N = blocks, bs = block size.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define MAX_GROUP 16      /* query heads per kv head */
#define MAX_HEAD_DIM 256  /* a multiple of 16 */
#define MAX_BLOCK 64      /* tokens per block */

/* The lane sums of eight vectors, as one vector: out[j] = sum of a[j]'s lanes. */
static inline __m256 lane_sums8(const __m256 a[8]) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

static inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float lane_max(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* exp(x) for x <= 0 to about 2 ulp: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6 polynomial.
 * Inputs below -87 give 2^-126-ish, which next to the softmax's largest term (1) adds nothing. */
static inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

/* scores[t] = q . k[t] for the block's rows t < n rounded up to 8 (the block holds bs rows, so the tail rows exist;
 * the caller masks their scores). */
static inline void block_scores(int n, int head_dim, const float *q, const float *k, float *scores) {
  for (int t = 0; t < n; t += 8) {
    __m256 acc[8];
    for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
    for (int i = 0; i < head_dim; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      for (int r = 0; r < 8; r++)
        acc[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (int64_t)(t + r) * head_dim + i), acc[r]);
    }
    _mm256_store_ps(scores + t, lane_sums8(acc));
  }
}

/* acc[0:8*width] += sum_t p[t] * v[t, 0:8*width] over t < n; `width` (vectors) is a constant after inlining, so
 * the accumulators live in registers. */
static inline void weighted_rows(int width, int n, int head_dim, const float *p, const float *v, float *acc) {
  __m256 a[8];
  for (int i = 0; i < width; i++) a[i] = _mm256_load_ps(acc + 8 * i);
  for (int t = 0; t < n; t++) {
    const __m256 w = _mm256_broadcast_ss(p + t);
    for (int i = 0; i < width; i++)
      a[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + (int64_t)t * head_dim + 8 * i), a[i]);
  }
  for (int i = 0; i < width; i++) _mm256_store_ps(acc + 8 * i, a[i]);
}

/* One (sequence, kv head): q [G, Dh] (pre-scaled) over the context's rows in k/v [N, bs, Dh] -> out [G, Dh]. */
static void attend_one(int group, int head_dim, int block_size, const float *q, const float *k, const float *v,
                       const int64_t *table, int64_t context, float *out) {
  float acc[MAX_GROUP][MAX_HEAD_DIM] __attribute__((aligned(32)));
  float scores[MAX_GROUP][MAX_BLOCK] __attribute__((aligned(32)));
  float running_max[MAX_GROUP], running_sum[MAX_GROUP];
  for (int g = 0; g < group; g++) {
    running_max[g] = -INFINITY;
    running_sum[g] = 0.0f;
    for (int i = 0; i < head_dim; i++) acc[g][i] = 0.0f;
  }
  for (int64_t start = 0; start < context; start += block_size) {
    const int n = context - start < block_size ? (int)(context - start) : block_size;
    const int64_t base = table[start / block_size] * block_size * head_dim;
    for (int g = 0; g < group; g++) {
      float *s = scores[g];
      block_scores(n, head_dim, q + g * head_dim, k + base, s);
      const int padded = (n + 7) & ~7;
      for (int t = n; t < padded; t++) s[t] = -INFINITY; /* rows past the context: exp adds ~1e-38 to a sum >= 1 */
      __m256 vmax = _mm256_set1_ps(running_max[g]);
      for (int t = 0; t < padded; t += 8) vmax = _mm256_max_ps(vmax, _mm256_load_ps(s + t));
      const float block_max = lane_max(vmax);
      if (block_max > running_max[g]) { /* rescale what was summed under the old max */
        const float alpha = expf(running_max[g] - block_max);
        running_sum[g] *= alpha;
        for (int i = 0; i < head_dim; i++) acc[g][i] *= alpha;
        running_max[g] = block_max;
      }
      const __m256 m = _mm256_set1_ps(block_max);
      __m256 vsum = _mm256_setzero_ps();
      for (int t = 0; t < padded; t += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(s + t), m));
        _mm256_store_ps(s + t, e);
        vsum = _mm256_add_ps(vsum, e);
      }
      running_sum[g] += lane_sum(vsum);
      for (int i = 0; i < head_dim; i += 64)
        if (head_dim - i >= 64) weighted_rows(8, n, head_dim, s, v + base + i, acc[g] + i);
        else for (int j = i; j < head_dim; j += 16) weighted_rows(2, n, head_dim, s, v + base + j, acc[g] + j);
    }
  }
  for (int g = 0; g < group; g++) {
    const float sum = running_sum[g] > 0.0f ? running_sum[g] : 1.0f; /* context 0 (a padding row): zeros */
    for (int i = 0; i < head_dim; i++) out[g * head_dim + i] = acc[g][i] / sum;
  }
}

/* q [B, H, Dh]; k_cache, v_cache [KV, N, bs, Dh] (one layer); tables [B, table_stride] block ids; contexts [B]
 * tokens cached per sequence, this step's included (0, a padding row: its output is zeros) -> out [B, H, Dh].
 * Needs G <= 16, Dh <= 256 and a multiple of 16, bs <= 64 and a multiple of 8 (the caller checks). */
void paged_decode_attention(int batch, int heads, int kv_heads, int head_dim, int block_size, int64_t num_blocks,
                            const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
                            int64_t table_stride, const int64_t *contexts, float scale, float *out, int threads) {
  const int group = heads / kv_heads;
  const int64_t head_stride = num_blocks * block_size * head_dim;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t item = 0; item < (int64_t)batch * kv_heads; item++) {
    const int64_t b = item / kv_heads, h = item % kv_heads;
    float qs[MAX_GROUP * MAX_HEAD_DIM] __attribute__((aligned(32)));
    const float *qb = q + (b * heads + h * group) * head_dim;
    for (int i = 0; i < group * head_dim; i++) qs[i] = qb[i] * scale;
    attend_one(group, head_dim, block_size, qs, k_cache + h * head_stride, v_cache + h * head_stride,
               tables + b * table_stride, contexts[b], out + (b * heads + h * group) * head_dim);
  }
}
