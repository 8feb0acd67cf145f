#include "core/blas.h"

#include <cblas.h>

extern "C" void openblas_set_num_threads(int);
extern "C" char* openblas_get_config(void);

namespace sav {

void sgemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K,
              alpha, A, lda, B, ldb, beta, C, ldc);
}

void blas_set_threads(int n) { openblas_set_num_threads(n); }

const char* blas_name() { return openblas_get_config(); }

}  // namespace sav
