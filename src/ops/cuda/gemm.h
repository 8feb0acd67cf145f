// shiftaddvit CUDA backend: linear layers (y = x W^T + b) through cuBLASLt, bf16 inputs, f32 accumulation,
// with the bias, GELU and residual adds fused into the product's epilogue.
//
//   sav::cuda::Gemm gemm;                                              // one per stream / model
//   gemm.linear_bf16(h, xn, w1, b1, M, C, F, /*gelu*/ true, stream);   // h = GELU(xn W1^T + b1), bf16
//   gemm.linear_f32(x, h, w2, b2, M, F, C, /*accumulate*/ true, stream);  // x += h W2^T + b2, f32
//
// Shape legend: M rows, K in-features, F out-features. x (M,K), w (F,K) (PyTorch nn.Linear layout), y (M,F);
// row-major, x and w contiguous, y contiguous unless an ldy is given. Pointers aligned to 256 bytes get the
// fastest algorithms (cudaMalloc gives that); weaker alignments (a column offset into a wider y) are allowed
// and planned for separately. GELU is cuBLASLt's tanh approximation: at most 4.7e-4 from
// the exact erf form (torch.nn.GELU()), well under bf16's rounding of the output.
//
// Algorithms are chosen once per shape and cached: cuBLASLt's heuristic proposes up to 8, the first call of a
// shape times each on its operands (into a scratch output) and keeps the fastest (the heuristic's first
// choice when that call is being captured into a graph). Later calls allocate nothing, so they can be
// captured. Results are bit-identical from call to call with one Gemm; another Gemm may pick another
// algorithm (summation order) unless it is built with autotune = false. Not thread-safe: one Gemm per thread.
#pragma once

#include <memory>

#include "ops/cuda/common.h"

namespace sav::cuda {

// Math of the f32-input products: IEEE f32 (CUDA cores; what a CPU f32 BLAS computes, up to summation
// order) or TF32 tensor cores (inputs rounded to 10-bit mantissas, f32 accumulation; ~8x the throughput).
// bf16: the f32 inputs are rounded to bf16 by a conversion kernel, then bf16 tensor cores with f32 accumulation
// (the mixed-precision training mode: f32 master weights and activations, bf16 products).
enum class F32Math { f32, tf32, bf16 };

class Gemm {
 public:
  // autotune false: always the heuristic's first algorithm, so every Gemm (e.g. the one of a resumed training
  // run) computes a shape the same way: reproducible bit for bit across objects and processes.
  explicit Gemm(size_t workspace_bytes = size_t(32) << 20, bool autotune = true);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // y (M,F) bf16 = [GELU](x W^T + b);  b (F) bf16 or nullptr
  void linear_bf16(bf16* y, const bf16* x, const bf16* w, const bf16* b, int M, int K, int F, bool gelu,
                   cudaStream_t stream);
  // y (M,F) f32 = x W^T + b, or y += x W^T + b when accumulate (the residual add);  b (F) f32 or nullptr
  void linear_f32(float* y, const bf16* x, const bf16* w, const float* b, int M, int K, int F, bool accumulate,
                  cudaStream_t stream);
  // y (M,F) f32, row i at y + i*ldy (ldy >= F) = x W^T + b, or += when accumulate; x (M,K) f32, w (F,K) f32,
  // b (F) f32 or nullptr. F32Math::bf16 needs contiguous rows (ldy == F).
  void linear_f32_in(float* y, int ldy, const float* x, const float* w, const float* b, int M, int K, int F,
                     bool accumulate, F32Math math, cudaStream_t stream);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sav::cuda
