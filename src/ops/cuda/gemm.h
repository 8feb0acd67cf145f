// shiftaddvit CUDA backend: linear layers (y = x W^T + b) through cuBLASLt, bf16 inputs, f32 accumulation,
// with the bias, GELU and residual adds fused into the product's epilogue.
//
//   sav::cuda::Gemm gemm;                                              // one per stream / model
//   gemm.linear_bf16(h, xn, w1, b1, M, C, F, /*gelu*/ true, stream);   // h = GELU(xn W1^T + b1), bf16
//   gemm.linear_f32(x, h, w2, b2, M, F, C, /*accumulate*/ true, stream);  // x += h W2^T + b2, f32
//
// Shape legend: M rows, K in-features, F out-features. x (M,K) bf16, w (F,K) bf16 (PyTorch nn.Linear
// layout), y (M,F); all row-major and contiguous, every pointer aligned to 256 bytes (cudaMalloc gives that;
// the algorithm is chosen for that alignment). GELU is cuBLASLt's tanh approximation: at most 4.7e-4 from
// the exact erf form (torch.nn.GELU()), well under bf16's rounding of the output.
//
// Algorithms are chosen once per shape and cached: cuBLASLt's heuristic proposes up to 8, the first call of a
// shape times each on its operands (into a scratch output) and keeps the fastest (the heuristic's first
// choice when that call is being captured into a graph). Later calls allocate nothing, so they can be
// captured. Results are bit-identical from call to call with one Gemm; another Gemm may pick another
// algorithm (summation order). Not thread-safe: one Gemm per thread.
#pragma once

#include <memory>

#include "ops/cuda/common.h"

namespace sav::cuda {

class Gemm {
 public:
  explicit Gemm(size_t workspace_bytes = size_t(32) << 20);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // y (M,F) bf16 = [GELU](x W^T + b);  b (F) bf16 or nullptr
  void linear_bf16(bf16* y, const bf16* x, const bf16* w, const bf16* b, int M, int K, int F, bool gelu,
                   cudaStream_t stream);
  // y (M,F) f32 = x W^T + b, or y += x W^T + b when accumulate (the residual add);  b (F) f32 or nullptr
  void linear_f32(float* y, const bf16* x, const bf16* w, const float* b, int M, int K, int F, bool accumulate,
                  cudaStream_t stream);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sav::cuda
