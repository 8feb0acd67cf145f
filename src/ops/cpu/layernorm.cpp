// shiftaddvit: LayerNorm over the last dimension on the CPU (torch.nn.LayerNorm: biased variance).
//
// Shapes: x, y, dx, dy (M,C)  w, b, dw, db (C)  mean, rstd (M) saved by forward for backward.
//   y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps),  var = mean((x - mean)^2)
// Backward, per row with xhat = (x - mean) * rstd and g = dy * w:
//   dx += rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw += dy * xhat,  db += dy
// Fast path: OpenMP over rows (AVX2+FMA row kernels when C is a multiple of 8, else loops GCC
// vectorises); dw/db are summed per fixed chunk of rows and the chunks reduced in order, so the result
// does not depend on the number of threads.
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

#if SAV_HAVE_AVX2_KERNELS
// Rows [m0, m1) of the forward, C a multiple of 8.
SAV_AVX2 void layernorm_forward_rows_avx2(float* y, float* mean, float* rstd, const float* x, const float* w,
                                          const float* b, int m0, int m1, int C, float eps) {
  const float inv_c = 1.0f / static_cast<float>(C);
  for (int m = m0; m < m1; ++m) {
    const float* xr = x + static_cast<int64_t>(m) * C;
    float* yr = y + static_cast<int64_t>(m) * C;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int c = 0;
    for (; c + 16 <= C; c += 16) {
      s0 = _mm256_add_ps(s0, _mm256_loadu_ps(xr + c));
      s1 = _mm256_add_ps(s1, _mm256_loadu_ps(xr + c + 8));
    }
    if (c < C) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(xr + c));
    const float mu = detail::avx2::hsum(_mm256_add_ps(s0, s1)) * inv_c;
    const __m256 vmu = _mm256_set1_ps(mu);
    s0 = _mm256_setzero_ps();
    s1 = _mm256_setzero_ps();
    for (c = 0; c + 16 <= C; c += 16) {
      const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(xr + c), vmu);
      const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(xr + c + 8), vmu);
      s0 = _mm256_fmadd_ps(d0, d0, s0);
      s1 = _mm256_fmadd_ps(d1, d1, s1);
    }
    if (c < C) {
      const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(xr + c), vmu);
      s0 = _mm256_fmadd_ps(d0, d0, s0);
    }
    const float rs = 1.0f / std::sqrt(detail::avx2::hsum(_mm256_add_ps(s0, s1)) * inv_c + eps);
    const __m256 vrs = _mm256_set1_ps(rs);
    for (c = 0; c < C; c += 8) {
      const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + c), vmu), vrs);
      _mm256_storeu_ps(yr + c, _mm256_fmadd_ps(xhat, _mm256_loadu_ps(w + c), _mm256_loadu_ps(b + c)));
    }
    if (mean) mean[m] = mu;
    if (rstd) rstd[m] = rs;
  }
}

// Rows [m0, m1) of the backward, C a multiple of 8: dx += ...; pdw, pdb (C) += this chunk's dw, db terms
// (pdw null: skip them).
SAV_AVX2 void layernorm_backward_rows_avx2(float* dx, float* pdw, float* pdb, const float* dy, const float* x,
                                           const float* w, const float* mean, const float* rstd, int m0, int m1,
                                           int C) {
  const float inv_c = 1.0f / static_cast<float>(C);
  for (int m = m0; m < m1; ++m) {
    const float* xr = x + static_cast<int64_t>(m) * C;
    const float* dyr = dy + static_cast<int64_t>(m) * C;
    const __m256 vmu = _mm256_set1_ps(mean[m]), vrs = _mm256_set1_ps(rstd[m]);
    if (dx) {
      __m256 sg = _mm256_setzero_ps(), sgx = _mm256_setzero_ps();
      for (int c = 0; c < C; c += 8) {
        const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(dyr + c), _mm256_loadu_ps(w + c));
        const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + c), vmu), vrs);
        sg = _mm256_add_ps(sg, g);
        sgx = _mm256_fmadd_ps(g, xhat, sgx);
      }
      const __m256 mean_g = _mm256_set1_ps(detail::avx2::hsum(sg) * inv_c);
      const __m256 mean_gx = _mm256_set1_ps(detail::avx2::hsum(sgx) * inv_c);
      float* dxr = dx + static_cast<int64_t>(m) * C;
      for (int c = 0; c < C; c += 8) {
        const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(dyr + c), _mm256_loadu_ps(w + c));
        const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + c), vmu), vrs);
        const __m256 t = _mm256_fnmadd_ps(xhat, mean_gx, _mm256_sub_ps(g, mean_g));
        _mm256_storeu_ps(dxr + c, _mm256_fmadd_ps(vrs, t, _mm256_loadu_ps(dxr + c)));
      }
    }
    if (pdw) {
      for (int c = 0; c < C; c += 8) {
        const __m256 d = _mm256_loadu_ps(dyr + c);
        const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + c), vmu), vrs);
        _mm256_storeu_ps(pdw + c, _mm256_fmadd_ps(d, xhat, _mm256_loadu_ps(pdw + c)));
        _mm256_storeu_ps(pdb + c, _mm256_add_ps(d, _mm256_loadu_ps(pdb + c)));
      }
    }
  }
}
#endif

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
#if SAV_HAVE_AVX2_KERNELS
  if (C % 8 == 0 && detail::use_avx2()) {
    constexpr int kRows = 64;
    const int nchunks = (M + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * C >= detail::kParallelElems)
    for (int chunk = 0; chunk < nchunks; ++chunk)
      layernorm_forward_rows_avx2(y, mean, rstd, x, w, b, chunk * kRows, std::min(M, (chunk + 1) * kRows), C, eps);
    return;
  }
#endif
  const float inv_c = 1.0f / static_cast<float>(C);
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * C >= detail::kParallelElems)
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

#if SAV_HAVE_AVX2_KERNELS
  const bool avx2 = C % 8 == 0 && detail::use_avx2();
#endif
#pragma omp parallel for schedule(static) if (nchunks > 1 && static_cast<int64_t>(M) * C >= detail::kParallelElems)
  for (int chunk = 0; chunk < nchunks; ++chunk) {
    float* pdw = want_params ? partial.data() + static_cast<size_t>(chunk) * 2 * C : nullptr;
    float* pdb = want_params ? pdw + C : nullptr;
    const int m1 = std::min(M, (chunk + 1) * rows_per_chunk);
#if SAV_HAVE_AVX2_KERNELS
    if (avx2) {
      layernorm_backward_rows_avx2(dx, pdw, pdb, dy, x, w, mean, rstd, chunk * rows_per_chunk, m1, C);
      continue;
    }
#endif
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
