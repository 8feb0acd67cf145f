// shiftaddvit: LayerNorm over the last dimension on the CPU (torch.nn.LayerNorm: biased variance).
//
// Shapes: x, y, dx, dy (M,C)  w, b, dw, db (C)  mean, rstd (M) saved by forward for backward.
//   y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps),  var = mean((x - mean)^2)
// Backward, per row with xhat = (x - mean) * rstd and g = dy * w:
//   dx += rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw += dy * xhat,  db += dy
// Fast path: OpenMP over rows; dw/db are summed per fixed chunk of rows and the chunks reduced in order,
// so the result does not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/cpu/ops.h"
#include "ops/cpu/simd_math.h"

namespace sav::cpu {

namespace {

void check_layernorm(int M, int C) {
  SAV_CHECK(M >= 0, "layernorm: M (rows) must be non-negative, got " << M);
  SAV_CHECK_DIM(C);
}

}  // namespace

// ---- reference ----

void layernorm_forward_ref(float* y, float* mean, float* rstd, const float* x, const float* w, const float* b, int M,
                           int C, float eps) {
  check_layernorm(M, C);
  for (int m = 0; m < M; ++m) {
    const float* xr = x + static_cast<int64_t>(m) * C;
    float* yr = y + static_cast<int64_t>(m) * C;
    double mu = 0.0;
    for (int c = 0; c < C; ++c) mu += xr[c];
    mu /= C;
    double var = 0.0;
    for (int c = 0; c < C; ++c) var += (xr[c] - mu) * (xr[c] - mu);
    var /= C;
    const double rs = 1.0 / std::sqrt(var + eps);
    for (int c = 0; c < C; ++c) yr[c] = static_cast<float>((xr[c] - mu) * rs * w[c] + b[c]);
    if (mean) mean[m] = static_cast<float>(mu);
    if (rstd) rstd[m] = static_cast<float>(rs);
  }
}

void layernorm_backward_ref(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w,
                            const float* mean, const float* rstd, int M, int C) {
  check_layernorm(M, C);
  for (int m = 0; m < M; ++m) {
    const float* xr = x + static_cast<int64_t>(m) * C;
    const float* dyr = dy + static_cast<int64_t>(m) * C;
    const double mu = mean[m], rs = rstd[m];
    double mean_g = 0.0, mean_gx = 0.0;
    for (int c = 0; c < C; ++c) {
      const double xhat = (xr[c] - mu) * rs;
      const double g = static_cast<double>(dyr[c]) * w[c];
      mean_g += g;
      mean_gx += g * xhat;
    }
    mean_g /= C;
    mean_gx /= C;
    for (int c = 0; c < C; ++c) {
      const double xhat = (xr[c] - mu) * rs;
      const double g = static_cast<double>(dyr[c]) * w[c];
      if (dx) dx[static_cast<int64_t>(m) * C + c] += static_cast<float>(rs * (g - mean_g - xhat * mean_gx));
      if (dw) dw[c] += static_cast<float>(dyr[c] * xhat);
      if (db) db[c] += dyr[c];
    }
  }
}

// ---- fast path ----

void layernorm_forward(float* y, float* mean, float* rstd, const float* x, const float* w, const float* b, int M, int C,
                       float eps) {
  check_layernorm(M, C);
  if (M == 0) return;
  SAV_CHECK_PTR(y);
  SAV_CHECK_PTR(x);
  SAV_CHECK_PTR(w);
  SAV_CHECK_PTR(b);
  const float inv_c = 1.0f / static_cast<float>(C);
#pragma omp parallel for schedule(static) if (M >= detail::kParallelRows)
  for (int m = 0; m < M; ++m) {
    const float* xr = x + static_cast<int64_t>(m) * C;
    float* yr = y + static_cast<int64_t>(m) * C;
    // Two short passes over a row that sits in L1: the sum, then the centred sum of squares (more
    // accurate than E[x^2] - mean^2 when |mean| >> std).
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int c = 0; c < C; ++c) s += xr[c];
    const float mu = s * inv_c;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int c = 0; c < C; ++c) ss += (xr[c] - mu) * (xr[c] - mu);
    const float rs = 1.0f / std::sqrt(ss * inv_c + eps);
#pragma omp simd
    for (int c = 0; c < C; ++c) yr[c] = (xr[c] - mu) * rs * w[c] + b[c];
    if (mean) mean[m] = mu;
    if (rstd) rstd[m] = rs;
  }
}

void layernorm_backward(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w,
                        const float* mean, const float* rstd, int M, int C) {
  check_layernorm(M, C);
  if (M == 0 || (!dx && !dw && !db)) return;
  SAV_CHECK_PTR(dy);
  SAV_CHECK_PTR(x);
  SAV_CHECK_PTR(w);
  SAV_CHECK_PTR(mean);
  SAV_CHECK_PTR(rstd);
  const float inv_c = 1.0f / static_cast<float>(C);

  // Fixed chunks of rows (independent of the thread count) for deterministic dw/db partial sums.
  constexpr int kMaxChunks = 64;
  const int rows_per_chunk = std::max(16, (M + kMaxChunks - 1) / kMaxChunks);
  const int nchunks = (M + rows_per_chunk - 1) / rows_per_chunk;
  const bool want_params = dw || db;
  std::vector<float> partial(want_params ? static_cast<size_t>(nchunks) * 2 * C : 0, 0.0f);

#pragma omp parallel for schedule(static) if (nchunks > 1)
  for (int chunk = 0; chunk < nchunks; ++chunk) {
    float* pdw = want_params ? partial.data() + static_cast<size_t>(chunk) * 2 * C : nullptr;
    float* pdb = want_params ? pdw + C : nullptr;
    const int m1 = std::min(M, (chunk + 1) * rows_per_chunk);
    for (int m = chunk * rows_per_chunk; m < m1; ++m) {
      const float* xr = x + static_cast<int64_t>(m) * C;
      const float* dyr = dy + static_cast<int64_t>(m) * C;
      const float mu = mean[m], rs = rstd[m];
      if (dx) {
        float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
        for (int c = 0; c < C; ++c) {
          const float g = dyr[c] * w[c];
          sg += g;
          sgx += g * (xr[c] - mu) * rs;
        }
        const float mean_g = sg * inv_c, mean_gx = sgx * inv_c;
        float* dxr = dx + static_cast<int64_t>(m) * C;
#pragma omp simd
        for (int c = 0; c < C; ++c) dxr[c] += rs * (dyr[c] * w[c] - mean_g - (xr[c] - mu) * rs * mean_gx);
      }
      if (want_params) {
#pragma omp simd
        for (int c = 0; c < C; ++c) {
          pdw[c] += dyr[c] * (xr[c] - mu) * rs;
          pdb[c] += dyr[c];
        }
      }
    }
  }
  if (want_params) {
    for (int chunk = 0; chunk < nchunks; ++chunk) {
      const float* pdw = partial.data() + static_cast<size_t>(chunk) * 2 * C;
      if (dw)
        for (int c = 0; c < C; ++c) dw[c] += pdw[c];
      if (db)
        for (int c = 0; c < C; ++c) db[c] += pdw[C + c];
    }
  }
}

}  // namespace sav::cpu
