/* Native CPU kernels of hrnn_lit (hrnn_lit/models/native.py builds and loads them with
   ctypes; what each is for and its measured effect: that module's docstring). Plain C,
   no torch headers. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* Adagrad on rows idx[0..m) of p and acc ([n, d], row-major), gradient rows g [m, d]:
   g += wd p; acc += g^2; p -= lr g / (sqrt(acc) + eps). Returns 0, or -1 (nothing
   written) if an index is outside [0, n). Rows must be distinct. */
CLONES
int adagrad_rows(float *p, float *acc, const float *g, const int64_t *idx, int64_t m,
                 int64_t n, int64_t d, float lr, float eps, float wd) {
  for (int64_t i = 0; i < m; i++)
    if (idx[i] < 0 || idx[i] >= n) return -1;
#pragma omp parallel for schedule(static) if (m * d >= 32768)
  for (int64_t i = 0; i < m; i++) {
    float *pr = p + idx[i] * d, *ar = acc + idx[i] * d;
    const float *gr = g + i * d;
    if (i + 4 < m) /* the rows 4 ahead, into cache (the tables are larger than it) */
      for (int64_t j = 0; j < d; j += 16) {
        __builtin_prefetch(p + idx[i + 4] * d + j, 1);
        __builtin_prefetch(acc + idx[i + 4] * d + j, 1);
      }
    for (int64_t j = 0; j < d; j++) {
      float gj = wd != 0.0f ? fmaf(pr[j], wd, gr[j]) : gr[j];
      float a = fmaf(gj, gj, ar[j]);
      ar[j] = a;
      pr[j] = pr[j] - (lr * gj) / (sqrtf(a) + eps);
    }
  }
  return 0;
}

/* The sorted distinct values of each row of x [t, w] (values in [0, n)), from a bitset of
   n bits per thread: row i's values go to values[offsets[i] .. offsets[i + 1]) (values has
   room for t * w), each entry's index among them to inverse [t, w], and, where counts is
   not NULL, each value's number of entries to counts (aligned with values), entry j of
   row i counting valid[i * b + j] for j < b (valid not NULL), else 1. Returns 0; -1
   (nothing written) if a value is outside [0, n); -2 if scratch memory is not there. */
CLONES
int distinct_rows(const int64_t *x, int64_t t, int64_t w, int64_t n, const uint8_t *valid,
                  int64_t b, int64_t *values, int64_t *offsets, int64_t *inverse,
                  int64_t *counts) {
  for (int64_t i = 0; i < t * w; i++)
    if (x[i] < 0 || x[i] >= n) return -1;
  int failed = 0;
  int64_t words = n / 64 + 1;
#pragma omp parallel if (t * w >= 32768)
  {
    uint64_t *bits = calloc(words, sizeof *bits);
    int32_t *rank = malloc(n * sizeof *rank);
    if (!bits || !rank) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    if (!failed) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < t; i++) {
        const int64_t *xr = x + i * w;
        int64_t *vr = values + i * w, *ir = inverse + i * w, k = 0;
        for (int64_t j = 0; j < w; j++) bits[xr[j] >> 6] |= 1ull << (xr[j] & 63);
        for (int64_t q = 0; q < words; q++)
          for (uint64_t m = bits[q]; m; m &= m - 1) {
            int64_t v = q * 64 + __builtin_ctzll(m);
            rank[v] = (int32_t)k;
            vr[k++] = v;
          }
        for (int64_t j = 0; j < k; j++) bits[vr[j] >> 6] = 0;
        for (int64_t j = 0; j < w; j++) ir[j] = rank[xr[j]];
        offsets[i + 1] = k;
        if (counts) {
          int64_t *cr = counts + i * w;
          for (int64_t j = 0; j < k; j++) cr[j] = 0;
          for (int64_t j = 0; j < w; j++) cr[ir[j]] += (valid && j < b) ? valid[i * b + j] : 1;
        }
      }
    }
    free(bits);
    free(rank);
  }
  if (failed) return -2;
  offsets[0] = 0;
  for (int64_t i = 0; i < t; i++) { /* rows to their places (left moves: in order) */
    int64_t k = offsets[i + 1], at = offsets[i];
    memmove(values + at, values + i * w, k * sizeof *values);
    if (counts) memmove(counts + at, counts + i * w, k * sizeof *counts);
    offsets[i + 1] = at + k;
  }
  return 0;
}

/* exp(x) for x <= 0: Cephes' expf polynomial (within 2 ulp); 0 below -87 (no denormals). */
static inline float exp_nonpos(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
  float r = fmaf(k, -0.693359375f, xc);
  r = fmaf(k, 2.12194440e-4f, r);
  float q = 1.9875691500e-4f;
  q = fmaf(q, r, 1.3981999507e-3f);
  q = fmaf(q, r, 8.3334519073e-3f);
  q = fmaf(q, r, 4.1665795894e-2f);
  q = fmaf(q, r, 1.6666665459e-1f);
  q = fmaf(q, r, 5.0000001201e-1f);
  q = fmaf(q, r * r, r) + 1.0f;
  int32_t bits = ((int32_t)k + 127) << 23; /* 2^k */
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : q * scale;
}

#define LANES 16 /* partial maxima and sums: one vector, the same order on every target */

/* Softmax cross-entropy of the rows of y [b, m] (row-major) with logits y + bias (bias
   [m], or NULL for none) and target columns target[b]. Overwrites row i of y with
   e = exp(logit - max) and subtracts the row's sum s from e[target], so that the gradient
   of the row's loss is y[i] / s; writes sums[i] = s and row_loss[i] = max + log s -
   y[i, target] (the score before the bias). Returns 0, or -1 (nothing written) if a target
   is outside [0, m). */
CLONES
int softmax_xent_rows(float *y, const float *bias, const int64_t *target, int64_t b,
                      int64_t m, float *sums, float *row_loss) {
  for (int64_t i = 0; i < b; i++)
    if (target[i] < 0 || target[i] >= m) return -1;
#pragma omp parallel for schedule(static) if (b * m >= 65536)
  for (int64_t i = 0; i < b; i++) {
    float *row = y + i * m;
    float pos = row[target[i]], top = -INFINITY, s = 0.0f;
    float mx[LANES], sm[LANES];
    for (int l = 0; l < LANES; l++) mx[l] = -INFINITY, sm[l] = 0.0f;
    if (bias)
      for (int64_t j = 0; j < m; j++) row[j] += bias[j];
    int64_t j = 0;
    for (; j + LANES <= m; j += LANES)
      for (int l = 0; l < LANES; l++) mx[l] = row[j + l] > mx[l] ? row[j + l] : mx[l];
    for (int l = 0; j + l < m; l++) mx[l] = row[j + l] > mx[l] ? row[j + l] : mx[l];
    for (int l = 0; l < LANES; l++) top = mx[l] > top ? mx[l] : top;
    for (j = 0; j + LANES <= m; j += LANES)
      for (int l = 0; l < LANES; l++) {
        float e = exp_nonpos(row[j + l] - top);
        row[j + l] = e;
        sm[l] += e;
      }
    for (int l = 0; j + l < m; l++) {
      float e = exp_nonpos(row[j + l] - top);
      row[j + l] = e;
      sm[l] += e;
    }
    for (int l = 0; l < LANES; l++) s += sm[l];
    row[target[i]] -= s;
    sums[i] = s;
    row_loss[i] = top + logf(s) - pos;
  }
  return 0;
}
static inline float sigmoid_f(float x) {
  float e = exp_nonpos(x < 0.0f ? x : -x); /* exp(-|x|) */
  float d = 1.0f / (1.0f + e);
  return x < 0.0f ? e * d : d;
}

/* tanh: Cephes' tanhf (odd polynomial below 0.625, else 1 - 2 / (exp(2|x|) + 1)). */
static inline float tanh_f(float x) {
  float a = x < 0.0f ? -x : x, x2 = x * x;
  float q = -5.70498872745e-3f;
  q = fmaf(q, x2, 2.06390887954e-2f);
  q = fmaf(q, x2, -5.37397155531e-2f);
  q = fmaf(q, x2, 1.33314422036e-1f);
  q = fmaf(q, x2, -3.33332819422e-1f);
  float small = fmaf(q * x2, x, x);
  float e = exp_nonpos(-2.0f * a);
  float big = (1.0f - e) / (1.0f + e);
  big = x < 0.0f ? -big : big;
  return a < 0.625f ? small : big;
}

/* One row of gru_forward (restrict: the pointers never alias, so the loops vectorise). */
static inline void gru_forward_row(const float *restrict gi, const float *restrict gh,
                                   const float *restrict h, int64_t k, float *restrict h_new,
                                   float *restrict rz, float *restrict n) {
  for (int64_t j = 0; j < 2 * k; j++) rz[j] = sigmoid_f(gi[j] + gh[j]);
  for (int64_t j = 0; j < k; j++) {
    float nj = tanh_f(fmaf(rz[j], gh[2 * k + j], gi[2 * k + j]));
    n[j] = nj;
    h_new[j] = fmaf(rz[k + j], h[j] - nj, nj);
  }
}

/* GRU cell (gate order r, z, n) on rows of gi, gh [rows, 3k] (biases included) and
   h [rows, k]: rz [rows, 2k] = sigmoid(gi + gh) of the first 2k columns,
   n = tanh(gi_n + r gh_n), h_new = n + z (h - n). */
CLONES
void gru_forward(const float *gi, const float *gh, const float *h, int64_t rows, int64_t k,
                 float *h_new, float *rz, float *n) {
#pragma omp parallel for schedule(static) if (rows * k >= 8192)
  for (int64_t i = 0; i < rows; i++)
    gru_forward_row(gi + i * 3 * k, gh + i * 3 * k, h + i * k, k, h_new + i * k,
                    rz + i * 2 * k, n + i * k);
}

/* One row of gru_backward. */
static inline void gru_backward_row(const float *restrict dh, const float *restrict h,
                                    const float *restrict rz, const float *restrict n,
                                    const float *restrict gh, int64_t k, float *restrict da,
                                    float *restrict dgh) {
  const float *restrict r = rz, *restrict z = rz + k, *restrict h_n = gh + 2 * k;
  for (int64_t j = 0; j < k; j++) {
    float an = dh[j] * (1.0f - z[j]) * (1.0f - n[j] * n[j]);
    float az = dh[j] * (h[j] - n[j]) * (z[j] * (1.0f - z[j]));
    float ar = an * h_n[j] * (r[j] * (1.0f - r[j]));
    da[j] = ar, da[k + j] = az, da[2 * k + j] = an;
    dgh[j] = ar, dgh[k + j] = az, dgh[2 * k + j] = an * r[j];
  }
}

/* The gates' pre-activation gradients da, dgh [rows, 3k] from d h_new [rows, k]:
   a_n = dh (1 - z)(1 - n^2), a_z = dh (h - n) z (1 - z), a_r = a_n gh_n r (1 - r);
   da = [a_r, a_z, a_n], dgh = [a_r, a_z, a_n r]. */
CLONES
void gru_backward(const float *dh, const float *h, const float *rz, const float *n,
                  const float *gh, int64_t rows, int64_t k, float *da, float *dgh) {
#pragma omp parallel for schedule(static) if (rows * k >= 8192)
  for (int64_t i = 0; i < rows; i++)
    gru_backward_row(dh + i * k, h + i * k, rz + i * 2 * k, n + i * k, gh + i * 3 * k, k,
                     da + i * 3 * k, dgh + i * 3 * k);
}
