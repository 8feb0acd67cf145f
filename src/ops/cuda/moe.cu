// MoE(mult, shift) linear for inference, routing on the GPU (no host round trip, graph-capturable): the
// stacked product s = x [W0; W1; Wr_hi; Wr_lo; 0]^T is one Gemm::linear_f32 (gemm.h); this file holds the
// weight stacking (host) and the per-token routing + epilogue kernel. Formulas in ops.h.
//
// Legend: M token rows, K in-features, F out-features, Fs = moe_stack_rows(F) rows of the stacked weight,
// lds >= 2F + 4 the row stride of s.
//
// Kernel: one warp per token row, 8 rows per block. Every lane reads the row's four router columns (one
// broadcast), picks the expert and the gate, then the lanes stream the chosen expert's F columns with
// float4 loads (when F, lds, ldo and the pointers allow) and apply the epilogue. Deterministic: no
// reductions across threads.
//
// Shift expert: its weight W1 = s * 2^p is decoded once, at load time, to an exact bf16 matrix and fed to
// the tensor cores with the dense expert ("decode-to-matrix-unit", METHOD.md section 2). Decoding packed
// 5-bit codes in registers inside the product (less weight traffic) is later work.
#include <cmath>

#include "core/tensor.h"
#include "ops/cuda/ops.h"

namespace sav::cuda {

namespace {

constexpr int kMoeRowsPerBlock = 8;

struct MoeEpiParams {
  void* out;
  int8_t* choice;
  const float* s;
  const float *b0, *b1, *br;
  int ldo, lds, M, F;
  int gate;  // MoeGate
  int epi;   // MoeEpilogue
  bool vec;  // float4 path
};

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

__global__ void moe_epilogue_kernel(const __grid_constant__ MoeEpiParams p) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kMoeRowsPerBlock + (threadIdx.x >> 5);
  if (row >= p.M) return;
  const float* sr = p.s + int64_t(row) * p.lds;
  const int F = p.F;
  const float l0 = sr[2 * F] + sr[2 * F + 2] + p.br[0];
  const float l1 = sr[2 * F + 1] + sr[2 * F + 3] + p.br[1];
  const int e = l1 > l0 ? 1 : 0;  // ties (and NaN) -> expert 0, as cpu::moe_router_forward
  // softmax probability of the chosen expert: 1 / (1 + exp(l_other - l_chosen))
  const float g = p.gate == moe_gate_prob ? 1.0f / (1.0f + expf(e ? l0 - l1 : l1 - l0)) : 1.0f;
  if (lane == 0 && p.choice) p.choice[row] = static_cast<int8_t>(e);
  const float* y = sr + e * F;
  const float* bias = e ? p.b1 : p.b0;
  if (p.vec) {
    const int F4 = F / 4;
    const float4* y4 = reinterpret_cast<const float4*>(y);
    const float4* b4 = reinterpret_cast<const float4*>(bias);
    for (int c = lane; c < F4; c += 32) {
      const float4 a = y4[c], bb = b4[c];
      float4 t = make_float4((a.x + bb.x) * g, (a.y + bb.y) * g, (a.z + bb.z) * g, (a.w + bb.w) * g);
      if (p.epi == moe_epilogue_f32_residual) {
        float4* o = reinterpret_cast<float4*>(static_cast<float*>(p.out) + int64_t(row) * p.ldo) + c;
        const float4 x = *o;
        *o = make_float4(x.x + t.x, x.y + t.y, x.z + t.z, x.w + t.w);
      } else {
        if (p.epi == moe_epilogue_bf16_gelu) t = make_float4(gelu_erf(t.x), gelu_erf(t.y), gelu_erf(t.z), gelu_erf(t.w));
        __align__(8) __nv_bfloat162 hv[2] = {__floats2bfloat162_rn(t.x, t.y), __floats2bfloat162_rn(t.z, t.w)};
        reinterpret_cast<uint2*>(static_cast<bf16*>(p.out) + int64_t(row) * p.ldo)[c] =
            *reinterpret_cast<const uint2*>(hv);
      }
    }
    return;
  }
  for (int c = lane; c < F; c += 32) {
    const float t = (y[c] + bias[c]) * g;
    if (p.epi == moe_epilogue_f32_residual) {
      static_cast<float*>(p.out)[int64_t(row) * p.ldo + c] += t;
    } else {
      static_cast<bf16*>(p.out)[int64_t(row) * p.ldo + c] =
          __float2bfloat16_rn(p.epi == moe_epilogue_bf16_gelu ? gelu_erf(t) : t);
    }
  }
}

}  // namespace

int moe_stack_rows(int F) { return (2 * F + 4 + 15) / 16 * 16; }

std::vector<bf16> moe_stack_weights(const float* w0, const float* w1, const float* wr, int F, int K) {
  SAV_CHECK(w0 && w1 && wr && F >= 1 && K >= 1, "moe_stack_weights: bad arguments F=" << F << " K=" << K);
  const int Fs = moe_stack_rows(F);
  std::vector<float> st(size_t(Fs) * K, 0.0f);
  std::copy(w0, w0 + size_t(F) * K, st.begin());
  std::copy(w1, w1 + size_t(F) * K, st.begin() + size_t(F) * K);
  for (int e = 0; e < 2; ++e)
    for (int k = 0; k < K; ++k) {
      const float w = wr[size_t(e) * K + k];
      const float hi = bf16_to_float(float_to_bf16(w));
      st[size_t(2 * F + e) * K + k] = hi;
      st[size_t(2 * F + 2 + e) * K + k] = w - hi;  // exact in f32; its bf16 rounding keeps ~16 bits overall
    }
  return to_bf16(st.data(), st.size());
}

void moe_epilogue_forward(void* out, int ldo, int8_t* choice, const float* s, int lds, const float* b0,
                          const float* b1, const float* br, int M, int F, MoeGate gate, MoeEpilogue epi,
                          cudaStream_t stream) {
  SAV_CHECK(out && s && b0 && b1 && br, "moe epilogue: null pointer");
  SAV_CHECK(M >= 0 && F >= 1 && ldo >= F && lds >= 2 * F + 4,
            "moe epilogue: bad sizes M=" << M << " F=" << F << " ldo=" << ldo << " lds=" << lds
                                         << " (lds >= 2F + 4: both experts and the split router)");
  SAV_CHECK(gate == moe_gate_straight_through || gate == moe_gate_prob, "moe epilogue: unknown gate " << int(gate));
  SAV_CHECK(epi == moe_epilogue_bf16 || epi == moe_epilogue_bf16_gelu || epi == moe_epilogue_f32_residual,
            "moe epilogue: unknown epilogue " << int(epi));
  if (M == 0) return;
  auto al = [](const void* q, int a) { return reinterpret_cast<uintptr_t>(q) % a == 0; };
  MoeEpiParams p{};
  p.out = out, p.choice = choice, p.s = s, p.b0 = b0, p.b1 = b1, p.br = br;
  p.ldo = ldo, p.lds = lds, p.M = M, p.F = F, p.gate = gate, p.epi = epi;
  p.vec = F % 4 == 0 && lds % 4 == 0 && ldo % 4 == 0 && al(s, 16) && al(b0, 16) && al(b1, 16) &&
          al(out, epi == moe_epilogue_f32_residual ? 16 : 8);
  const int blocks = (M + kMoeRowsPerBlock - 1) / kMoeRowsPerBlock;
  moe_epilogue_kernel<<<blocks, kMoeRowsPerBlock * 32, 0, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
}

}  // namespace sav::cuda
