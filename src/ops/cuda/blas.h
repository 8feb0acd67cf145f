// shiftaddvit CUDA backend: the f32 products of training (forward and both backward products of a linear
// layer, and the batched per-head products of softmax attention) through cuBLAS, row-major, with IEEE f32 or
// TF32 tensor-core math (the handle's math mode: every method, batched included, uses it), or F32Math::bf16:
// xwt / dyw / dytx round both operands to bf16 (conversion kernels into the Blas's scratch) and run bf16 tensor
// cores with f32 accumulation and output; the batched products then use TF32.
//
//   sav::cuda::Blas blas(stream, sav::cuda::F32Math::f32);
//   blas.xwt(y, x, w, M, K, F, 0.0f);   // y (M,F)  = x (M,K) W^T             (forward, no bias)
//   blas.dyw(dx, dy, w, M, K, F, 1.0f); // dx (M,K) = dy (M,F) W + beta dx     (input gradient)
//   blas.dytx(dw, dy, x, M, K, F, 1.0f);// dW (F,K) = dy^T x + beta dW         (weight gradient)
//   blas.batched(false, true, m, n, k, alpha, a, lda, b, ldb, 0.0f, c, ldc, count);  // C_i = alpha A_i B_i^T
//
// W is (F,K) as torch.nn.Linear.weight; xwt / dyw / dytx matrices contiguous row-major f32 on the device. beta 0
// overwrites (the output need not be initialised), beta 1 accumulates. cuBLAS picks one algorithm per shape
// and math mode, so results are bit-identical from run to run on one GPU. M, K, F >= 0 (an empty product with
// beta 0 over a non-empty output zeroes it). Every product runs on the Blas's stream (stream()). Not
// thread-safe: one Blas per thread / stream.
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
  cudaStream_t stream() const;

  void xwt(float* y, const float* x, const float* w, int M, int K, int F, float beta);
  void dyw(float* dx, const float* dy, const float* w, int M, int K, int F, float beta);
  void dytx(float* dw, const float* dy, const float* x, int M, int K, int F, float beta);

  // count independent products, in row-major terms (cublasSgemmBatched):
  //   C_i (m,n) = alpha op(A_i) op(B_i) + beta C_i,   i = 0 .. count-1,
  // op(A_i) (m,k) is A_i (m,k) with rows lda apart (trans_a false) or A_i^T with A_i (k,m) rows lda apart
  // (trans_a true); op(B_i) (k,n) likewise from B_i (k,n) or (n,k) rows ldb apart; C_i (m,n) rows ldc apart.
  // So lda >= (trans_a ? m : k), ldb >= (trans_b ? k : n), ldc >= n. a, b, c are HOST arrays of count device
  // pointers each (any addresses: the matrices may interleave, e.g. the heads of one (tokens, 3C) tensor);
  // they are read before the call returns. The C_i must not overlap each other or any A_j / B_j.
  // m, n, count >= 0 (nothing to do if any is 0); k >= 1.
  // The pointer arrays travel to the device through a ring of kPtrSlots slots (pinned host + device arrays,
  // grown on demand): each call fills the next slot, copies it with cudaMemcpyAsync on the stream, launches
  // the product and records the slot's event; a slot is refilled only after its event (so the copy and the
  // product that read it) has completed, so the host runs at most kPtrSlots batched calls ahead of the GPU.
  // Not capturable into a CUDA graph (the copies would read the pinned slots at replay): throws if the stream
  // is capturing.
  void batched(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* const* a, int lda,
               const float* const* b, int ldb, float beta, float* const* c, int ldc, int count);
  static constexpr int kPtrSlots = 32;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  F32Math math_;
};

}  // namespace sav::cuda
