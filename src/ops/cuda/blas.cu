// cuBLAS sgemm in row-major terms: a row-major (R,C) matrix is a column-major (C,R) one, so every product is
// computed transposed. y (M,F) = x W^T  <=>  y^T (F,M) = W (F,K) x^T: gemm(T, N, F, M, K, W ld K, x ld K, y ld F).
// dx (M,K) = dy W  <=>  dx^T (K,M) = W^T dy^T: gemm(N, N, K, M, F, W ld K, dy ld F, dx ld K).
// dW (F,K) = dy^T x  <=>  dW^T (K,F) = x^T dy: gemm(N, T, K, F, M, x ld K, dy ld F, dW ld K).
#include "ops/cuda/blas.h"

#include <cublas_v2.h>

#define SAV_CUBLAS_CALL(expr)                                                                              \
  do {                                                                                                     \
    const cublasStatus_t sav_s_ = (expr);                                                                  \
    if (sav_s_ != CUBLAS_STATUS_SUCCESS)                                                                   \
      SAV_THROW("cuBLAS call failed: " #expr " -> status " << int(sav_s_) << " (" << cublasGetStatusString(sav_s_) \
                                                           << "); check the sizes and the device");        \
  } while (0)

namespace sav::cuda {

struct Blas::Impl {
  cublasHandle_t handle = nullptr;
  cudaStream_t stream = nullptr;
  void gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float* a, int lda, const float* b,
            int ldb, float beta, float* c, int ldc) {
    if (m == 0 || n == 0) return;
    if (k == 0) {  // cuBLAS would scale C by beta; make beta 0 a true overwrite
      if (beta == 0.0f) SAV_CUDA_CHECK(cudaMemsetAsync(c, 0, sizeof(float) * size_t(m) * n, stream));
      return;
    }
    const float one = 1.0f;
    SAV_CUBLAS_CALL(cublasSgemm(handle, ta, tb, m, n, k, &one, a, lda, b, ldb, &beta, c, ldc));
  }
};

Blas::Blas(cudaStream_t stream, F32Math math) : impl_(std::make_unique<Impl>()), math_(math) {
  SAV_CUBLAS_CALL(cublasCreate(&impl_->handle));
  impl_->stream = stream;
  SAV_CUBLAS_CALL(cublasSetStream(impl_->handle, stream));
  SAV_CUBLAS_CALL(cublasSetMathMode(impl_->handle, math == F32Math::tf32 ? CUBLAS_TF32_TENSOR_OP_MATH
                                                                         : CUBLAS_PEDANTIC_MATH));
}

Blas::~Blas() {
  if (impl_ && impl_->handle) cublasDestroy(impl_->handle);
}

namespace {
void check_dims(const char* what, int M, int K, int F) {
  SAV_CHECK(M >= 0 && K >= 0 && F >= 0, "Blas::" << what << ": negative size (M " << M << ", K " << K << ", F " << F
                                                 << ")");
}
}  // namespace

void Blas::xwt(float* y, const float* x, const float* w, int M, int K, int F, float beta) {
  check_dims("xwt", M, K, F);
  impl_->gemm(CUBLAS_OP_T, CUBLAS_OP_N, F, M, K, w, K, x, K, beta, y, F);
}

void Blas::dyw(float* dx, const float* dy, const float* w, int M, int K, int F, float beta) {
  check_dims("dyw", M, K, F);
  impl_->gemm(CUBLAS_OP_N, CUBLAS_OP_N, K, M, F, w, K, dy, F, beta, dx, K);
}

void Blas::dytx(float* dw, const float* dy, const float* x, int M, int K, int F, float beta) {
  check_dims("dytx", M, K, F);
  impl_->gemm(CUBLAS_OP_N, CUBLAS_OP_T, K, F, M, x, K, dy, F, beta, dw, K);
}

}  // namespace sav::cuda
