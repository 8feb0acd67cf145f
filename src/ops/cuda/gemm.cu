// cuBLASLt linear layers. Row-major y (M,F) = x (M,K) W^T is, in cuBLASLt's column-major terms,
// D (F x M, ld F) = op_T(A) B with A = W stored (K x F, ld K) and B = x stored (K x M, ld K): the "TN" case,
// the one every bf16 tensor-core kernel supports. The bias runs along D's rows (length F).
#include "ops/cuda/gemm.h"

#include "ops/cuda/ops.h"  // f32_to_bf16

#include <cublasLt.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <tuple>

namespace sav::cuda {

namespace {

const char* lt_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_(other)";
  }
}

}  // namespace

#define SAV_CUBLAS_CHECK(expr)                                                                         \
  do {                                                                                                 \
    const cublasStatus_t sav_s_ = (expr);                                                              \
    if (sav_s_ != CUBLAS_STATUS_SUCCESS)                                                               \
      SAV_THROW("cuBLASLt call failed: " #expr " -> " << lt_status_name(sav_s_) << " (" << int(sav_s_) \
                                                      << "); check the sizes, types and alignment");   \
  } while (0)

namespace {

enum class Out { bf16, bf16_gelu, f32, f32_acc };
// Input type and math of a product: bf16 inputs (tensor cores, f32 accumulation), f32 inputs with IEEE f32
// math (CUDA cores), f32 inputs with TF32 tensor-core math.
enum class In { bf16 = 0, f32 = 1, tf32 = 2 };

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  ~Plan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

}  // namespace

struct Gemm::Impl {
  cublasLtHandle_t handle = nullptr;
  bool autotune = true;
  DeviceBuffer<unsigned char> workspace;
  DeviceBuffer<bf16> xb, wb;  // bf16 copies of the operands (F32Math::bf16)
  // (M, K, F, output kind, has bias, input kind, ldy, pointer alignment) -> plan
  std::map<std::tuple<int, int, int, int, bool, int, int, int>, std::unique_ptr<Plan>> plans;

  // Times the heuristic's candidates on the call's operands (output to a scratch buffer) and returns the
  // index of the fastest; 0 (the heuristic's first choice) while the stream is being captured.
  int fastest(const Plan& p, const cublasLtMatmulHeuristicResult_t* res, int found, int M, int ldy, bool f32,
              const void* x, const void* w, cudaStream_t stream) {
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    SAV_CUDA_CHECK(cudaStreamIsCapturing(stream, &cap));
    if (cap != cudaStreamCaptureStatusNone || !autotune) return 0;
    DeviceBuffer<unsigned char> scratch(size_t(M) * ldy * (f32 ? 4 : 2));
    SAV_CUDA_CHECK(cudaMemsetAsync(scratch.get(), 0, scratch.bytes(), stream));
    Event e0, e1;
    const float alpha = 1.0f, beta = 0.0f;
    int best = 0;
    float best_ms = INFINITY;
    for (int i = 0; i < found; ++i) {
      if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
      auto launch = [&] {
        return cublasLtMatmul(handle, p.desc, &alpha, w, p.a, x, p.b, &beta, scratch.get(), p.d, scratch.get(), p.d,
                              &res[i].algo, workspace.get(), workspace.bytes(), stream);
      };
      if (launch() != CUBLAS_STATUS_SUCCESS) continue;  // a candidate that refuses these operands
      constexpr int kReps = 5;
      SAV_CUDA_CHECK(cudaEventRecord(e0.get(), stream));
      for (int r = 0; r < kReps; ++r) SAV_CUBLAS_CHECK(launch());
      SAV_CUDA_CHECK(cudaEventRecord(e1.get(), stream));
      SAV_CUDA_CHECK(cudaEventSynchronize(e1.get()));
      float ms = 0.0f;
      SAV_CUDA_CHECK(cudaEventElapsedTime(&ms, e0.get(), e1.get()));
      if (ms < best_ms) best = i, best_ms = ms;
    }
    return best;
  }

  Plan& plan(int M, int K, int F, int ldy, Out out, In in, bool has_bias, const void* bias, const void* y,
             const void* x, const void* w, cudaStream_t stream) {
    // The weakest alignment of the operands (cuBLASLt assumes 256 bytes unless told): a product that writes
    // columns of a wider buffer (ldy > F) may start at any 4-byte boundary.
    uint32_t align = 256;
    for (const void* q : {static_cast<const void*>(y), x, w, bias})
      if (q) align = std::min<uint32_t>(align, uint32_t(reinterpret_cast<uintptr_t>(q) & -reinterpret_cast<uintptr_t>(q)));
    auto key = std::make_tuple(M, K, F, int(out), has_bias, int(in), ldy, int(align));
    auto it = plans.find(key);
    if (it != plans.end()) return *it->second;
    auto p = std::make_unique<Plan>();
    const bool f32 = out == Out::f32 || out == Out::f32_acc;
    const cudaDataType_t dtype = f32 ? CUDA_R_32F : CUDA_R_16BF;
    const cublasComputeType_t ct = in == In::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const cudaDataType_t itype = in == In::bf16 ? CUDA_R_16BF : CUDA_R_32F;
    SAV_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, ct, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    SAV_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    SAV_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    if (out == Out::bf16_gelu) {
      p->epilogue = has_bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
    } else {
      p->epilogue = has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    }
    SAV_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &p->epilogue, sizeof(p->epilogue)));
    if (has_bias) {
      const cudaDataType_t bt = dtype;  // the bias has the output's type
      SAV_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
      SAV_CUBLAS_CHECK(
          cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    }
    SAV_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->a, itype, K, F, K));
    SAV_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->b, itype, K, M, K));
    SAV_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->d, dtype, F, M, ldy));

    cublasLtMatmulPreference_t pref = nullptr;
    SAV_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const size_t ws = workspace.bytes();
    cublasStatus_t st =
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      if (st == CUBLAS_STATUS_SUCCESS && align < 256)
        st = cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof(align));
    constexpr int kCandidates = 8;
    cublasLtMatmulHeuristicResult_t res[kCandidates] = {};
    int found = 0;
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulAlgoGetHeuristic(handle, p->desc, p->a, p->b, p->d, p->d, pref, kCandidates, res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    SAV_CUBLAS_CHECK(st);
    SAV_CHECK(found > 0, "cuBLASLt has no algorithm for the linear M=" << M << " K=" << K << " F=" << F
                                                                        << " output " << (f32 ? "f32" : "bf16")
                                                                        << " epilogue " << int(p->epilogue));
    p->algo = res[0].algo;
    if (found > 1) p->algo = res[fastest(*p, res, found, M, ldy, f32, x, w, stream)].algo;
    return *plans.emplace(key, std::move(p)).first->second;
  }

  void run(void* y, int ldy, const void* x, const void* w, const void* bias, int M, int K, int F, Out out, In in,
           cudaStream_t stream) {
    SAV_CHECK(y && x && w, "linear: null pointer");
    SAV_CHECK(M >= 0 && K >= 1 && F >= 1 && ldy >= F,
              "linear: bad sizes M=" << M << " K=" << K << " F=" << F << " ldy=" << ldy);
    if (M == 0) return;
    Plan& p = plan(M, K, F, ldy, out, in, bias != nullptr, bias, y, x, w, stream);
    if (bias)
      SAV_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    const float alpha = 1.0f, beta = out == Out::f32_acc ? 1.0f : 0.0f;
    SAV_CUBLAS_CHECK(cublasLtMatmul(handle, p.desc, &alpha, w, p.a, x, p.b, &beta, y, p.d, y, p.d, &p.algo,
                                    workspace.get(), workspace.bytes(), stream));
  }
};

Gemm::Gemm(size_t workspace_bytes, bool autotune) : impl_(std::make_unique<Impl>()) {
  impl_->autotune = autotune;
  SAV_CUBLAS_CHECK(cublasLtCreate(&impl_->handle));
  impl_->workspace.resize(workspace_bytes);
}

Gemm::~Gemm() {
  if (impl_ && impl_->handle) {
    impl_->plans.clear();
    cublasLtDestroy(impl_->handle);
  }
}

void Gemm::linear_bf16(bf16* y, const bf16* x, const bf16* w, const bf16* b, int M, int K, int F, bool gelu,
                       cudaStream_t stream) {
  impl_->run(y, F, x, w, b, M, K, F, gelu ? Out::bf16_gelu : Out::bf16, In::bf16, stream);
}

void Gemm::linear_f32(float* y, const bf16* x, const bf16* w, const float* b, int M, int K, int F, bool accumulate,
                      cudaStream_t stream) {
  impl_->run(y, F, x, w, b, M, K, F, accumulate ? Out::f32_acc : Out::f32, In::bf16, stream);
}

void Gemm::linear_f32_in(float* y, int ldy, const float* x, const float* w, const float* b, int M, int K, int F,
                         bool accumulate, F32Math math, cudaStream_t stream) {
  if (math == F32Math::bf16) {  // round both operands to bf16, then the bf16 product with an f32 output
    SAV_CHECK(ldy == F, "Gemm::linear_f32_in: bf16 math needs contiguous output rows (ldy " << ldy << ", F " << F
                                                                                           << ")");
    if (impl_->xb.size() < size_t(M) * K) impl_->xb.resize(size_t(M) * K);
    if (impl_->wb.size() < size_t(F) * K) impl_->wb.resize(size_t(F) * K);
    f32_to_bf16(impl_->xb.get(), x, int64_t(M) * K, stream);
    f32_to_bf16(impl_->wb.get(), w, int64_t(F) * K, stream);
    linear_f32(y, impl_->xb.get(), impl_->wb.get(), b, M, K, F, accumulate, stream);
    return;
  }
  impl_->run(y, ldy, x, w, b, M, K, F, accumulate ? Out::f32_acc : Out::f32,
             math == F32Math::tf32 ? In::tf32 : In::f32, stream);
}

}  // namespace sav::cuda
