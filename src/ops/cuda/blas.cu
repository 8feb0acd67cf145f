// cuBLAS sgemm in row-major terms: a row-major (R,C) matrix is a column-major (C,R) one, so every product is
// computed transposed. y (M,F) = x W^T  <=>  y^T (F,M) = W (F,K) x^T: gemm(T, N, F, M, K, W ld K, x ld K, y ld F).
// dx (M,K) = dy W  <=>  dx^T (K,M) = W^T dy^T: gemm(N, N, K, M, F, W ld K, dy ld F, dx ld K).
// dW (F,K) = dy^T x  <=>  dW^T (K,F) = x^T dy: gemm(N, T, K, F, M, x ld K, dy ld F, dW ld K).
// batched: C (m,n) = op(A) op(B)  <=>  C^T (n,m) = op(B)^T op(A)^T: gemmBatched(op_b, op_a, n, m, k, B ld ldb,
// A ld lda, C ld ldc), where op_x is T exactly when trans_x (the stored row-major matrix, read column-major, is
// already the transpose of the untransposed operand).
#include <cublas_v2.h>

#include <algorithm>

#include "ops/cuda/blas.h"
#include "ops/cuda/ops.h"  // f32_to_bf16

#define SAV_CUBLAS_CALL(expr)                                                                                      \
  do {                                                                                                             \
    const cublasStatus_t sav_s_ = (expr);                                                                          \
    if (sav_s_ != CUBLAS_STATUS_SUCCESS)                                                                           \
      SAV_THROW("cuBLAS call failed: " #expr " -> status " << int(sav_s_) << " (" << cublasGetStatusString(sav_s_) \
                                                           << "); check the sizes and the device");                \
  } while (0)

namespace sav::cuda {

struct Blas::Impl {
  // One slot of the pointer-array ring: 3 * cap pointers (the A, B and C arrays of up to cap matrices) in pinned
  // host memory and on the device, and the event recorded after the product that read them.
  struct PtrSlot {
    float** host = nullptr;
    float** dev = nullptr;
    size_t cap = 0;
    cudaEvent_t done = nullptr;
    bool pending = false;  // done was recorded and may not have completed
  };

  cublasHandle_t handle = nullptr;
  cudaStream_t stream = nullptr;
  bool bf16_math = false;
  DeviceBuffer<bf16> ab, bb;  // bf16 copies of the operands (F32Math::bf16)
  PtrSlot slots[kPtrSlots];
  int next = 0;

  ~Impl() {
    for (PtrSlot& s : slots) {  // never throws: the slots' copies and products finish before their memory goes
      if (s.pending) cudaEventSynchronize(s.done);
      if (s.host) cudaFreeHost(s.host);
      if (s.dev) cudaFree(s.dev);
      if (s.done) cudaEventDestroy(s.done);
    }
    if (handle) cublasDestroy(handle);
  }

  void gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float* a, int lda, const float* b,
            int ldb, float beta, float* c, int ldc) {
    if (m == 0 || n == 0) return;
    if (k == 0) {  // cuBLAS would scale C by beta; make beta 0 a true overwrite
      if (beta == 0.0f) SAV_CUDA_CHECK(cudaMemsetAsync(c, 0, sizeof(float) * size_t(m) * n, stream));
      return;
    }
    const float one = 1.0f;
    if (!bf16_math) {
      SAV_CUBLAS_CALL(cublasSgemm(handle, ta, tb, m, n, k, &one, a, lda, b, ldb, &beta, c, ldc));
      return;
    }
    // F32Math::bf16: both operands rounded to bf16 (contiguous: lda, ldb are their row lengths), f32 output
    const size_t na = size_t(lda) * (ta == CUBLAS_OP_N ? k : m), nb = size_t(ldb) * (tb == CUBLAS_OP_N ? n : k);
    if (ab.size() < na) ab.resize(na);
    if (bb.size() < nb) bb.resize(nb);
    f32_to_bf16(ab.get(), a, int64_t(na), stream);
    f32_to_bf16(bb.get(), b, int64_t(nb), stream);
    SAV_CUBLAS_CALL(cublasGemmEx(handle, ta, tb, m, n, k, &one, ab.get(), CUDA_R_16BF, lda, bb.get(), CUDA_R_16BF, ldb,
                                 &beta, c, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  // The next slot of the ring, idle (its last copy and product have completed) and holding >= count matrices.
  PtrSlot& slot(size_t count) {
    PtrSlot& s = slots[next];
    next = (next + 1) % kPtrSlots;
    if (s.pending) {
      SAV_CUDA_CHECK(cudaEventSynchronize(s.done));
      s.pending = false;
    }
    if (!s.done) SAV_CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
    if (s.cap < count) {
      const size_t cap = std::max(count, 2 * s.cap), bytes = 3 * cap * sizeof(float*);
      s.cap = 0;
      if (s.host) SAV_CUDA_CHECK(cudaFreeHost(s.host));
      s.host = nullptr;
      if (s.dev) SAV_CUDA_CHECK(cudaFree(s.dev));
      s.dev = nullptr;
      void* h = nullptr;
      void* d = nullptr;
      SAV_CUDA_CHECK(cudaMallocHost(&h, bytes));
      s.host = static_cast<float**>(h);
      SAV_CUDA_CHECK(cudaMalloc(&d, bytes));
      s.dev = static_cast<float**>(d);
      s.cap = cap;
    }
    return s;
  }
};

Blas::Blas(cudaStream_t stream, F32Math math) : impl_(std::make_unique<Impl>()), math_(math) {
  SAV_CUBLAS_CALL(cublasCreate(&impl_->handle));
  impl_->stream = stream;
  SAV_CUBLAS_CALL(cublasSetStream(impl_->handle, stream));
  // bf16: the linear products run in bf16 (cublasGemmEx); the batched attention products in TF32
  impl_->bf16_math = math == F32Math::bf16;
  SAV_CUBLAS_CALL(cublasSetMathMode(impl_->handle, math == F32Math::f32 ? CUBLAS_PEDANTIC_MATH
                                                                         : CUBLAS_TF32_TENSOR_OP_MATH));
}

Blas::~Blas() = default;

cudaStream_t Blas::stream() const { return impl_->stream; }

namespace {
void check_dims(const char* what, int M, int K, int F) {
  SAV_CHECK(M >= 0 && K >= 0 && F >= 0,
            "Blas::" << what << ": negative size (M " << M << ", K " << K << ", F " << F << ")");
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

void Blas::batched(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* const* a, int lda,
                   const float* const* b, int ldb, float beta, float* const* c, int ldc, int count) {
  SAV_CHECK(m >= 0 && n >= 0 && k >= 1 && count >= 0,
            "Blas::batched: bad sizes (m " << m << ", n " << n << ", k " << k << ", count " << count << ")");
  SAV_CHECK(lda >= std::max(1, trans_a ? m : k) && ldb >= std::max(1, trans_b ? k : n) && ldc >= std::max(1, n),
            "Blas::batched: leading dimensions lda " << lda << ", ldb " << ldb << ", ldc " << ldc << " too small for m "
                                                     << m << ", n " << n << ", k " << k << (trans_a ? ", A^T" : "")
                                                     << (trans_b ? ", B^T" : ""));
  if (m == 0 || n == 0 || count == 0) return;
  SAV_CHECK(a && b && c, "Blas::batched: null pointer array");
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  SAV_CUDA_CHECK(cudaStreamIsCapturing(impl_->stream, &capture));
  SAV_CHECK(capture == cudaStreamCaptureStatusNone,
            "Blas::batched: the stream is being captured; the pointer arrays are uploaded from pinned host memory, "
            "which a graph replay would read again, so batched products cannot be captured");
  const size_t nc = size_t(count);
  Impl::PtrSlot& s = impl_->slot(nc);
  for (size_t i = 0; i < nc; ++i) {
    s.host[i] = const_cast<float*>(a[i]);
    s.host[nc + i] = const_cast<float*>(b[i]);
    s.host[2 * nc + i] = c[i];
  }
  const cudaStream_t st = impl_->stream;
  SAV_CUDA_CHECK(cudaMemcpyAsync(s.dev, s.host, 3 * nc * sizeof(float*), cudaMemcpyHostToDevice, st));
  const cublasStatus_t status =
      cublasSgemmBatched(impl_->handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m,
                         k, &alpha, s.dev + nc, ldb, s.dev, lda, &beta, s.dev + 2 * nc, ldc, count);
  // the copy is queued whatever the product did: the slot stays busy until the stream has passed this point
  const cudaError_t rec = cudaEventRecord(s.done, st);
  if (rec == cudaSuccess)
    s.pending = true;
  else
    cudaStreamSynchronize(st);  // no event to wait on later: let the copy finish before the slot can be refilled
  SAV_CUDA_CHECK(rec);
  SAV_CUBLAS_CALL(status);
}

}  // namespace sav::cuda
