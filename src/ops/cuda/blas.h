// shiftaddvit CUDA backend: the f32 products of training (forward and both backward products of a linear
// layer) through cuBLAS, row-major, with IEEE f32 or TF32 tensor-core math.
//
//   sav::cuda::Blas blas(stream, sav::cuda::F32Math::f32);
//   blas.xwt(y, x, w, M, K, F, 0.0f);   // y (M,F)  = x (M,K) W^T             (forward, no bias)
//   blas.dyw(dx, dy, w, M, K, F, 1.0f); // dx (M,K) = dy (M,F) W + beta dx     (input gradient)
//   blas.dytx(dw, dy, x, M, K, F, 1.0f);// dW (F,K) = dy^T x + beta dW         (weight gradient)
//
// W is (F,K) as torch.nn.Linear.weight; all matrices contiguous row-major f32 on the device. beta 0
// overwrites (the output need not be initialised), beta 1 accumulates. cuBLAS picks one algorithm per shape
// and math mode, so results are bit-identical from run to run on one GPU. M, K, F >= 0 (an empty product with
// beta 0 over a non-empty output zeroes it). Not thread-safe: one Blas per thread / stream.
#pragma once

#include <memory>

#include "ops/cuda/common.h"
#include "ops/cuda/gemm.h"  // F32Math

namespace sav::cuda {

class Blas {
 public:
  Blas(cudaStream_t stream, F32Math math);
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  F32Math math() const { return math_; }

  void xwt(float* y, const float* x, const float* w, int M, int K, int F, float beta);
  void dyw(float* dx, const float* dy, const float* w, int M, int K, int F, float beta);
  void dytx(float* dw, const float* dy, const float* x, int M, int K, int F, float beta);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  F32Math math_;
};

}  // namespace sav::cuda
