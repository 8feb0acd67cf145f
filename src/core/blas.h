// shiftaddvit: the one place the engine talks to the CPU BLAS (OpenBLAS from Debian).
// Row-major single-precision products; everything dense on the CPU goes through sgemm here.
#pragma once

namespace sav {

// C (M,N) = alpha * op(A) op(B) + beta * C, row-major; op(A) is (M,K), op(B) is (K,N).
// lda/ldb/ldc are the row strides of A, B, C as stored.
void sgemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc);
void blas_set_threads(int n);
const char* blas_name();

}  // namespace sav
