/* One MoE layer's experts on x86 CPUs (AVX2 + FMA, fp32): y[token] += w * W2 . (silu(W1 . x) * (W3 . x)).
 *
 * Weights are packed once into panels of 16 output columns, [N/16][K][16], so the inner loop streams one
 * contiguous 64-byte row of a panel per k and broadcasts one input value per row: a 6x16 register tile, 12 FMAs per
 * k. The K loop is cut into chunks of 128 so a panel chunk (8 KB) stays in L1 while every row block reuses it.
 * Threads split the output panels of each matmul, so no two threads write the same column: the scatter-add into the
 * tokens' rows needs no atomics. Built and loaded by cluster/kernels/cpu_build.py.
 *
 * Legend: P = (token, expert) pairs, sorted by expert; D = hidden; F = ffn; E = local experts.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define NR 16  /* panel width: two 8-float vectors */
#define MR 6   /* rows per register tile */
#define KC 128 /* k chunk kept in L1 */

/* c[r, 0:16] (+)= sum_k x[r, k] * panel[k, 0:16] for rows r < mr (mr is a constant after inlining). */
static inline void tile(int mr, int accumulate, int kc, const float *x, int ldx, const float *panel, float *c,
                        int ldc) {
  __m256 acc[MR][2]; /* one array: gcc keeps it in registers (two arrays were spilled every k) */
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < 2; v++)
      acc[r][v] = (accumulate && r < mr) ? _mm256_loadu_ps(c + (int64_t)r * ldc + 8 * v) : _mm256_setzero_ps();
#pragma GCC unroll 2
  for (int k = 0; k < kc; k++) {
    /* the panel's next chunk, one line per k: at decode sizes weights come from memory and the hardware
     * prefetcher alone left the tile waiting (+10% at 16-64 tokens); a prefetch past the weights cannot fault */
    _mm_prefetch((const char *)(panel + (int64_t)(k + KC) * NR), _MM_HINT_T0);
    __m256 b[2] = {_mm256_loadu_ps(panel + (int64_t)k * NR), _mm256_loadu_ps(panel + (int64_t)k * NR + 8)};
    for (int r = 0; r < mr; r++) {
      __m256 a = _mm256_broadcast_ss(x + (int64_t)r * ldx + k);
      for (int v = 0; v < 2; v++) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < 2; v++) _mm256_storeu_ps(c + (int64_t)r * ldc + 8 * v, acc[r][v]);
}

static void tile_any(int mr, int accumulate, int kc, const float *x, int ldx, const float *panel, float *c, int ldc) {
  switch (mr) {
    case 6: tile(6, accumulate, kc, x, ldx, panel, c, ldc); break;
    case 5: tile(5, accumulate, kc, x, ldx, panel, c, ldc); break;
    case 4: tile(4, accumulate, kc, x, ldx, panel, c, ldc); break;
    case 3: tile(3, accumulate, kc, x, ldx, panel, c, ldc); break;
    case 2: tile(2, accumulate, kc, x, ldx, panel, c, ldc); break;
    default: tile(1, accumulate, kc, x, ldx, panel, c, ldc); break;
  }
}

/* c[m, 0:16] = x[m, 0:K] . panel for all m rows: panel [K][16], c with row stride ldc. */
static void panel_product(int m, int k_total, const float *x, int ldx, const float *panel, float *c, int ldc) {
  for (int k0 = 0; k0 < k_total; k0 += KC) {
    int kc = k_total - k0 < KC ? k_total - k0 : KC;
    for (int r = 0; r < m; r += MR)
      tile_any(m - r < MR ? m - r : MR, k0 > 0, kc, x + (int64_t)r * ldx + k0, ldx, panel + (int64_t)k0 * NR,
               c + (int64_t)r * ldc, ldc);
  }
}

/* xs [P, D]: the pairs' input rows, grouped by expert (counts [E]). w13 packed [E][2F/16][D][16] (gate panels,
 * then up panels); w2 packed [E][D/16][F][16]. Scratch: h [P, 2F] gate/up outputs, act [P, F], y [P, D].
 * out [T, D] accumulates pair_weight * the expert's output at row pair_token.
 */
void expert_ffn(int n_experts, const int64_t *counts, int d, int f, const float *xs, const float *w13, const float *w2,
                const int64_t *pair_token, const float *pair_weight, float *h, float *act, float *y, float *out,
                int threads) {
  const int64_t w13_size = (int64_t)2 * f * d, w2_size = (int64_t)d * f;
#pragma omp parallel num_threads(threads)
  {
    int64_t first = 0;
    for (int e = 0; e < n_experts; first += counts[e], e++) {
      const int m = (int)counts[e];
      if (m == 0) continue;
      const float *x = xs + first * d, *we13 = w13 + e * w13_size, *we2 = w2 + e * w2_size;
      float *he = h + first * 2 * f, *ae = act + first * f, *ye = y + first * d;
      /* gate panel j and up panel F/16 + j on one thread, then silu(gate) * up for those 16 columns */
#pragma omp for schedule(static)
      for (int j = 0; j < f / NR; j++) {
        panel_product(m, d, x, d, we13 + (int64_t)j * d * NR, he + j * NR, 2 * f);
        panel_product(m, d, x, d, we13 + (int64_t)(f / NR + j) * d * NR, he + f + j * NR, 2 * f);
        for (int r = 0; r < m; r++) {
          const float *g = he + (int64_t)r * 2 * f + j * NR, *u = g + f;
          float *a = ae + (int64_t)r * f + j * NR;
          for (int c = 0; c < NR; c++) a[c] = g[c] / (1.0f + expf(-g[c])) * u[c];
        }
      }
      /* down panels: a thread owns 16 columns of out, so the scatter-add by token needs no atomics */
#pragma omp for schedule(static)
      for (int j = 0; j < d / NR; j++) {
        panel_product(m, f, ae, f, we2 + (int64_t)j * f * NR, ye + j * NR, d);
        for (int r = 0; r < m; r++) {
          const float w = pair_weight[first + r], *yr = ye + (int64_t)r * d + j * NR;
          float *o = out + pair_token[first + r] * d + j * NR;
          for (int c = 0; c < NR; c++) o[c] += w * yr[c];
        }
      }
    }
  }
}
