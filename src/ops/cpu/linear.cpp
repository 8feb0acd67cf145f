// shiftaddvit: linear layer y = x W^T + b on the CPU.
//
// Shapes: x (M,K)  w (F,K) as torch.nn.Linear.weight  b (F)  y (M,F).
// Fast path: one sgemm per product (OpenBLAS threads it); the bias and its gradient are OpenMP loops.
#include <algorithm>
#include <vector>

#include "core/blas.h"
#include "ops/cpu/ops.h"
#include "ops/cpu/simd_math.h"

namespace sav::cpu {

namespace {

void check_linear(int M, int K, int F) {
  SAV_CHECK(M >= 0, "linear: M (rows) must be non-negative, got " << M);
  SAV_CHECK_DIM(K);
  SAV_CHECK_DIM(F);
}

}  // namespace

// ---- reference ----

void linear_forward_ref(float* y, const float* x, const float* w, const float* b, int M, int K, int F) {
  check_linear(M, K, F);
  for (int m = 0; m < M; ++m) {
    for (int f = 0; f < F; ++f) {
      double acc = b ? b[f] : 0.0;
      for (int k = 0; k < K; ++k)
        acc += static_cast<double>(x[static_cast<int64_t>(m) * K + k]) * w[static_cast<int64_t>(f) * K + k];
      y[static_cast<int64_t>(m) * F + f] = static_cast<float>(acc);
    }
  }
}

void linear_backward_ref(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w, int M, int K,
                         int F) {
  check_linear(M, K, F);
  if (dx) {
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < K; ++k) {
        double acc = 0.0;
        for (int f = 0; f < F; ++f)
          acc += static_cast<double>(dy[static_cast<int64_t>(m) * F + f]) * w[static_cast<int64_t>(f) * K + k];
        dx[static_cast<int64_t>(m) * K + k] += static_cast<float>(acc);
      }
  }
  if (dw) {
    for (int f = 0; f < F; ++f)
      for (int k = 0; k < K; ++k) {
        double acc = 0.0;
        for (int m = 0; m < M; ++m)
          acc += static_cast<double>(dy[static_cast<int64_t>(m) * F + f]) * x[static_cast<int64_t>(m) * K + k];
        dw[static_cast<int64_t>(f) * K + k] += static_cast<float>(acc);
      }
  }
  if (db) {
    for (int f = 0; f < F; ++f) {
      double acc = 0.0;
      for (int m = 0; m < M; ++m) acc += dy[static_cast<int64_t>(m) * F + f];
      db[f] += static_cast<float>(acc);
    }
  }
}

// ---- fast path ----

void linear_forward(float* y, const float* x, const float* w, const float* b, int M, int K, int F) {
  check_linear(M, K, F);
  if (M == 0) return;
  SAV_CHECK_PTR(y);
  SAV_CHECK_PTR(x);
  SAV_CHECK_PTR(w);
  float beta = 0.0f;
  if (b) {
    // Seed y with the bias, then let sgemm accumulate on top of it.
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * F >= detail::kParallelElems)
    for (int m = 0; m < M; ++m) std::copy(b, b + F, y + static_cast<int64_t>(m) * F);
    beta = 1.0f;
  }
  sgemm(false, true, M, F, K, 1.0f, x, K, w, K, beta, y, F);
}

void linear_backward(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w, int M, int K,
                     int F) {
  check_linear(M, K, F);
  if (M == 0) return;
  SAV_CHECK_PTR(dy);
  if (dx) {
    SAV_CHECK_PTR(w);
    sgemm(false, false, M, K, F, 1.0f, dy, F, w, K, 1.0f, dx, K);
  }
  if (dw) {
    SAV_CHECK_PTR(x);
    sgemm(true, false, F, K, M, 1.0f, dy, F, x, K, 1.0f, dw, K);
  }
  if (db) {
    // Column sums: blocks of columns in parallel, rows in order inside a block (deterministic).
    constexpr int kBlock = 64;
    const int nblocks = (F + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * F >= detail::kParallelElems)
    for (int blk = 0; blk < nblocks; ++blk) {
      const int f0 = blk * kBlock, f1 = std::min(F, f0 + kBlock);
      float acc[kBlock] = {};
      for (int m = 0; m < M; ++m) {
        const float* row = dy + static_cast<int64_t>(m) * F;
#pragma omp simd
        for (int f = f0; f < f1; ++f) acc[f - f0] += row[f];
      }
      for (int f = f0; f < f1; ++f) db[f] += acc[f - f0];
    }
  }
}

}  // namespace sav::cpu
