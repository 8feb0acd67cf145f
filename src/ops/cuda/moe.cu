// MoE(mult, shift) linear for inference, routing on the GPU (no host round trip, graph-capturable). Two forms
// (formulas in ops.h):
//   stacked  s = x [W0; W1; Wr_hi; Wr_lo; 0]^T is one Gemm::linear_f32 (gemm.h) into an f32 scratch, then the
//            routing + epilogue kernel below (any gate, any epilogue);
//   masked   (straight-through gate) the router kernel below writes the doubled input x_aug = [x s0 | x s1 |
//            s0 s0 s1 s1 | 0], then ONE Gemm of x_aug with W_aug = [W0 | W1 | b0_hi b0_lo b1_hi b1_lo | 0]
//            gives the chosen expert's output with its bias, the epilogue (GELU, residual add) fused in cuBLASLt.
// This file holds the weight layouts (host) and the two kernels.
//
// Legend: M token rows, K in-features, F out-features, Fs = moe_stack_rows(F) rows of the stacked weight,
// lds >= 2F + 4 the row stride of s, Ka = moe_masked_cols(K) columns of x_aug and W_aug.
//
// Epilogue kernel (stacked form): one thread per float4 of the output (per element when F, lds, ldo or the
// pointers do not allow float4), rows flattened, 256 threads a block: each thread reads its row's four router
// columns (a broadcast shared with the row's other threads) and, for the residual epilogue, its float4 of the
// output, picks the expert and the gate, then reads the chosen expert's float4 and its bias. Many short
// independent chains (one warp per row left fc2's F = 192 with 1-2 float4 a lane: latency bound). Deterministic:
// no reductions across threads; every element's arithmetic is the same as the former warp-per-row kernel's.
//
// Router + mask kernel (masked form): one warp per token row, 8 rows a block. The lanes read the row (16-byte
// chunks of 8 bf16 when K % 8 == 0, ldx % 8 == 0 and the pointers are 16-byte aligned; the first 4 chunks a lane
// held in registers, further ones read again for the write; else element by element), each lane sums its
// products with the f32 router weight (fmaf, its chunks in increasing order), a butterfly shuffle adds the 32
// partials (commutative pairs: every lane ends with the same bits), br is added, l1 > l0 picks expert 1 (ties
// and NaN: expert 0), and the lanes write the row of x_aug: exact copies of x and exact zeros. Deterministic.
//
// Shift expert: its weight W1 = s * 2^p is decoded once, at load time, to an exact bf16 matrix and fed to
// the tensor cores with the dense expert ("decode-to-matrix-unit", METHOD.md section 2). Decoding packed
// 5-bit codes in registers inside the product (less weight traffic) is later work.
#include <cmath>

#include "core/tensor.h"
#include "ops/cuda/gelu.cuh"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/layernorm.cuh"
#include "ops/cuda/moe_rows.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/ptx.cuh"

namespace sav::cuda {

namespace {

using moe_rows::res_add;

constexpr int kMoeEpiThreads = 256;
constexpr int kMaskRowsPerBlock = 8;
constexpr int kMaskRegChunks = 4;  // 16-byte chunks of x a lane keeps in registers (K <= 1024 on the vector path)

struct MoeEpiParams {
  void* out;
  int8_t* choice;
  const float* s;
  const float *b0, *b1, *br;
  int ldo, lds, M, F;
  int per_row;  // threads per row: F / 4 (vec) or F
  int gate;     // MoeGate
  int epi;      // MoeEpilogue
  bool vec;     // float4 path
};

__global__ void __launch_bounds__(kMoeEpiThreads) moe_epilogue_kernel(const __grid_constant__ MoeEpiParams p) {
  ptx::pdl_trigger();  // dependent launch (common.h): let the next kernel start; wait before touching data
  ptx::pdl_wait();
  const int64_t i = int64_t(blockIdx.x) * kMoeEpiThreads + threadIdx.x;
  if (i >= int64_t(p.M) * p.per_row) return;
  const int row = static_cast<int>(i / p.per_row), c = static_cast<int>(i - int64_t(row) * p.per_row);
  const int F = p.F;
  const float* sr = p.s + int64_t(row) * p.lds;
  const bool res = p.epi == moe_epilogue_f32_residual;
  // the loads that do not depend on the routing first: the router columns and (residual) the output itself
  const float r0 = sr[2 * F], r1 = sr[2 * F + 1], r2 = sr[2 * F + 2], r3 = sr[2 * F + 3];
  const float br0 = p.br[0], br1 = p.br[1];
  float* of = res ? static_cast<float*>(p.out) + int64_t(row) * p.ldo : nullptr;
  float4 x4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  float x1 = 0.0f;
  if (res) {
    if (p.vec)
      x4 = reinterpret_cast<const float4*>(of)[c];
    else
      x1 = of[c];
  }
  const float l0 = r0 + r2 + br0;
  const float l1 = r1 + r3 + br1;
  const int e = l1 > l0 ? 1 : 0;  // ties (and NaN) -> expert 0, as cpu::moe_router_forward
  // softmax probability of the chosen expert: 1 / (1 + exp(l_other - l_chosen))
  const float g = p.gate == moe_gate_prob ? 1.0f / (1.0f + expf(e ? l0 - l1 : l1 - l0)) : 1.0f;
  const float* y = sr + e * F;
  const float* bias = e ? p.b1 : p.b0;
  if (p.vec) {
    const float4 a = reinterpret_cast<const float4*>(y)[c], bb = reinterpret_cast<const float4*>(bias)[c];
    float4 t = make_float4(__fmul_rn(a.x + bb.x, g), __fmul_rn(a.y + bb.y, g), __fmul_rn(a.z + bb.z, g),
                           __fmul_rn(a.w + bb.w, g));  // _rn: never contracted into an fma with the residual add
    if (res) {
      reinterpret_cast<float4*>(of)[c] = res_add(x4, t);
    } else {
      if (p.epi == moe_epilogue_bf16_gelu) t = make_float4(gelu_erf(t.x), gelu_erf(t.y), gelu_erf(t.z), gelu_erf(t.w));
      __align__(8) __nv_bfloat162 hv[2] = {__floats2bfloat162_rn(t.x, t.y), __floats2bfloat162_rn(t.z, t.w)};
      reinterpret_cast<uint2*>(static_cast<bf16*>(p.out) + int64_t(row) * p.ldo)[c] =
          *reinterpret_cast<const uint2*>(hv);
    }
  } else {
    const float t = __fmul_rn(y[c] + bias[c], g);
    if (res) {
      of[c] = __fadd_rn(x1, t);
    } else {
      static_cast<bf16*>(p.out)[int64_t(row) * p.ldo + c] =
          __float2bfloat16_rn(p.epi == moe_epilogue_bf16_gelu ? gelu_erf(t) : t);
    }
  }
  if (c == 0 && p.choice) p.choice[row] = static_cast<int8_t>(e);
}

struct MoeMaskParams {
  bf16* xa;
  int8_t* choice;
  const bf16* x;
  const float *wr, *br;
  int ldxa, ldx, M, K, Ka;
  bool vec;  // 16-byte chunks
};

// a0 += sum_i x_i wr0_i, a1 += sum_i x_i wr1_i over the 8 bf16 of v (in order); w0, w1: the chunk's router weights
__device__ __forceinline__ void dot8(float& a0, float& a1, const uint4 v, const float* w0, const float* w1) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
  const float4 wa = reinterpret_cast<const float4*>(w0)[0], wb = reinterpret_cast<const float4*>(w0)[1];
  const float4 wc = reinterpret_cast<const float4*>(w1)[0], wd = reinterpret_cast<const float4*>(w1)[1];
  const float q0[8] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
  const float q1[8] = {wc.x, wc.y, wc.z, wc.w, wd.x, wd.y, wd.z, wd.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float lo = __uint_as_float(u[j] << 16), hi = __uint_as_float(u[j] & 0xFFFF0000u);  // bf16 -> f32, exact
    a0 = fmaf(lo, q0[2 * j], a0);
    a1 = fmaf(lo, q1[2 * j], a1);
    a0 = fmaf(hi, q0[2 * j + 1], a0);
    a1 = fmaf(hi, q1[2 * j + 1], a1);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void __launch_bounds__(kMaskRowsPerBlock * 32)
    moe_route_mask_kernel(const __grid_constant__ MoeMaskParams p) {
  ptx::pdl_trigger();  // dependent launch (common.h): let the next kernel start; wait before touching data
  ptx::pdl_wait();
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kMaskRowsPerBlock + (threadIdx.x >> 5);
  if (row >= p.M) return;  // whole warps: the shuffles below see all 32 lanes
  const int K = p.K;
  const bf16* xr = p.x + int64_t(row) * p.ldx;
  bf16* orow = p.xa + int64_t(row) * p.ldxa;
  float a0 = 0.0f, a1 = 0.0f;
  if (p.vec) {
    const int nc = K / 8;  // 16-byte chunks of x
    const uint4* x4 = reinterpret_cast<const uint4*>(xr);
    uint4 held[kMaskRegChunks];
#pragma unroll
    for (int r = 0; r < kMaskRegChunks; ++r) {
      const int c = lane + 32 * r;
      held[r] = c < nc ? x4[c] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int r = 0; r < kMaskRegChunks; ++r) {
      const int c = lane + 32 * r;
      if (c < nc) dot8(a0, a1, held[r], p.wr + 8 * c, p.wr + K + 8 * c);
    }
    for (int c = lane + 32 * kMaskRegChunks; c < nc; c += 32) dot8(a0, a1, x4[c], p.wr + 8 * c, p.wr + K + 8 * c);
    const float l0 = warp_sum(a0) + p.br[0], l1 = warp_sum(a1) + p.br[1];
    const int e = l1 > l0 ? 1 : 0;  // ties and NaN -> expert 0
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
    uint4* o4 = reinterpret_cast<uint4*>(orow);
#pragma unroll
    for (int r = 0; r < kMaskRegChunks; ++r) {
      const int c = lane + 32 * r;
      if (c < nc) {
        o4[c] = e ? z : held[r];
        o4[nc + c] = e ? held[r] : z;
      }
    }
    for (int c = lane + 32 * kMaskRegChunks; c < nc; c += 32) {
      const uint4 v = x4[c];
      o4[c] = e ? z : v;
      o4[nc + c] = e ? v : z;
    }
    // columns [2K, Ka): s0 s0 s1 s1 (bf16 1.0 = 0x3F80), then zeros
    constexpr uint32_t kOnes = 0x3F803F80u;
    for (int c = 2 * nc + lane; c < p.Ka / 8; c += 32)
      o4[c] = c == 2 * nc ? make_uint4(e ? 0u : kOnes, e ? kOnes : 0u, 0u, 0u) : z;
    if (lane == 0 && p.choice) p.choice[row] = static_cast<int8_t>(e);
    return;
  }
  for (int k = lane; k < K; k += 32) {
    const float v = __bfloat162float(xr[k]);
    a0 = fmaf(v, p.wr[k], a0);
    a1 = fmaf(v, p.wr[K + k], a1);
  }
  const float l0 = warp_sum(a0) + p.br[0], l1 = warp_sum(a1) + p.br[1];
  const int e = l1 > l0 ? 1 : 0;  // ties and NaN -> expert 0
  const bf16 zero = __ushort_as_bfloat16(0), one = __ushort_as_bfloat16(0x3F80);
  for (int j = lane; j < p.Ka; j += 32) {
    bf16 v = zero;
    if (j < K) {
      if (e == 0) v = xr[j];
    } else if (j < 2 * K) {
      if (e == 1) v = xr[j - K];
    } else if (j < 2 * K + 4) {
      if (((j - 2 * K) >> 1) == e) v = one;
    }
    orow[j] = v;
  }
  if (lane == 0 && p.choice) p.choice[row] = static_cast<int8_t>(e);
}

struct MoeLnMaskParams {
  bf16* xa;
  int8_t* choice;
  const float *x, *ln_w, *ln_b, *wr, *br;
  float eps;
  int ldxa, ldx, M, K, Ka;
};

// Rows per block of the kernels with a LayerNorm fused (ln::row_group lanes per row).
inline int ln_blocks(int M, int group) {
  const int rows = kMaskRowsPerBlock * 32 / group;
  return (M + rows - 1) / rows;
}

// LayerNorm + router + mask (moe_rows::ln_route_mask), kG lanes per row (ln::row_group): lane l loads float4 number
// l + kG k of its row.
template <int kG>
__global__ void __launch_bounds__(kMaskRowsPerBlock * 32)
    moe_ln_route_mask_kernel(const __grid_constant__ MoeLnMaskParams p) {
  ptx::pdl_trigger();  // dependent launch (common.h): let the next kernel start; wait before touching data
  ptx::pdl_wait();
  const int lane = threadIdx.x % kG;
  const int row = blockIdx.x * (kMaskRowsPerBlock * 32 / kG) + threadIdx.x / kG;
  const bool valid = row < p.M;
  const int K4 = p.K / 4;
  float4 v[ln::kMaxPer4];
  const float4* xr = reinterpret_cast<const float4*>(p.x + int64_t(row) * p.ldx);
#pragma unroll
  for (int k = 0; k < ln::kMaxPer4; ++k) {
    const int c = lane + kG * k;
    v[k] = valid && c < K4 ? xr[c] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  moe_rows::ln_route_mask<kG>(v, lane, valid, p.K, p.Ka, p.eps, p.ln_w, p.ln_b, p.wr, p.br,
                              p.xa + int64_t(row) * p.ldxa, p.choice ? p.choice + row : nullptr);
}

struct MoeEpiLnParams {
  float* x;
  int8_t* choice;
  const float *s, *b0, *b1, *br, *ln_w, *ln_b;
  bf16* xn;
  float eps;
  int ldx, lds, ldxn, M, F, gate;
};

// The residual epilogue and the LayerNorm after it (moe_rows::epilogue_residual_ln), kG lanes per row.
template <int kG>
__global__ void __launch_bounds__(kMaskRowsPerBlock * 32)
    moe_epilogue_residual_ln_kernel(const __grid_constant__ MoeEpiLnParams p) {
  ptx::pdl_trigger();  // dependent launch (common.h): let the next kernel start; wait before touching data
  ptx::pdl_wait();
  const int lane = threadIdx.x % kG;
  const int row = blockIdx.x * (kMaskRowsPerBlock * 32 / kG) + threadIdx.x / kG;
  const bool valid = row < p.M;
  float* xr = p.x + int64_t(row) * p.ldx;
  moe_rows::epilogue_residual_ln<kG>(p.s + int64_t(valid ? row : 0) * p.lds, xr, xr, p.xn + int64_t(row) * p.ldxn,
                                     p.choice ? p.choice + row : nullptr, valid, lane, p.F, p.gate, p.eps, p.b0, p.b1,
                                     p.br, p.ln_w, p.ln_b);
}

bool aligned(const void* q, int a) { return reinterpret_cast<uintptr_t>(q) % a == 0; }

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

void moe_epilogue_forward(void* out, int ldo, int8_t* choice, const float* s, int lds, const float* b0, const float* b1,
                          const float* br, int M, int F, MoeGate gate, MoeEpilogue epi, cudaStream_t stream) {
  SAV_CHECK(out && s && b0 && b1 && br, "moe epilogue: null pointer");
  SAV_CHECK(M >= 0 && F >= 1 && ldo >= F && lds >= 2 * F + 4,
            "moe epilogue: bad sizes M=" << M << " F=" << F << " ldo=" << ldo << " lds=" << lds
                                         << " (lds >= 2F + 4: both experts and the split router)");
  SAV_CHECK(gate == moe_gate_straight_through || gate == moe_gate_prob, "moe epilogue: unknown gate " << int(gate));
  SAV_CHECK(epi == moe_epilogue_bf16 || epi == moe_epilogue_bf16_gelu || epi == moe_epilogue_f32_residual,
            "moe epilogue: unknown epilogue " << int(epi));
  if (M == 0) return;
  MoeEpiParams p{};
  p.out = out, p.choice = choice, p.s = s, p.b0 = b0, p.b1 = b1, p.br = br;
  p.ldo = ldo, p.lds = lds, p.M = M, p.F = F, p.gate = gate, p.epi = epi;
  p.vec = F % 4 == 0 && lds % 4 == 0 && ldo % 4 == 0 && aligned(s, 16) && aligned(b0, 16) && aligned(b1, 16) &&
          aligned(out, epi == moe_epilogue_f32_residual ? 16 : 8);
  p.per_row = p.vec ? F / 4 : F;
  const int64_t threads = int64_t(M) * p.per_row;
  const int64_t blocks = (threads + kMoeEpiThreads - 1) / kMoeEpiThreads;
  SAV_CHECK(blocks <= 0x7FFFFFFF, "moe epilogue: " << M << " x " << F << " outputs exceed the grid");
  launch_dependent(moe_epilogue_kernel, dim3(static_cast<unsigned>(blocks)), dim3(kMoeEpiThreads), 0, 1, stream, p);
}

std::vector<bf16> moe_masked_weights(const float* w0, const float* w1, const float* b0, const float* b1, int F, int K) {
  SAV_CHECK(w0 && w1 && b0 && b1 && F >= 1 && K >= 1, "moe_masked_weights: bad arguments F=" << F << " K=" << K);
  const int Ka = moe_masked_cols(K);
  std::vector<float> wa(size_t(F) * Ka, 0.0f);
  for (int j = 0; j < F; ++j) {
    float* r = wa.data() + size_t(j) * Ka;
    std::copy(w0 + size_t(j) * K, w0 + size_t(j + 1) * K, r);
    std::copy(w1 + size_t(j) * K, w1 + size_t(j + 1) * K, r + K);
    const float b[2] = {b0[j], b1[j]};
    for (int e = 0; e < 2; ++e) {
      const float hi = bf16_to_float(float_to_bf16(b[e]));
      r[2 * K + 2 * e] = hi;
      r[2 * K + 2 * e + 1] = b[e] - hi;  // exact in f32; rounded to bf16 below: the bias to ~16 bits
    }
  }
  return to_bf16(wa.data(), wa.size());
}

void moe_route_mask_forward(bf16* xa, int ldxa, int8_t* choice, const bf16* x, int ldx, const float* wr,
                            const float* br, int M, int K, cudaStream_t stream) {
  SAV_CHECK(xa && x && wr && br, "moe route+mask: null pointer");
  const int Ka = K >= 1 && K <= (0x7FFFFFFF - 19) / 2 ? moe_masked_cols(K) : 0;
  SAV_CHECK(M >= 0 && Ka > 0 && ldx >= K && ldxa >= Ka,
            "moe route+mask: bad sizes M=" << M << " K=" << K << " ldx=" << ldx << " ldxa=" << ldxa
                                           << " (ldxa >= moe_masked_cols(K) = round_up(2K + 4, 16))");
  if (M == 0) return;
  MoeMaskParams p{};
  p.xa = xa, p.choice = choice, p.x = x, p.wr = wr, p.br = br;
  p.ldxa = ldxa, p.ldx = ldx, p.M = M, p.K = K, p.Ka = Ka;
  p.vec = K % 8 == 0 && ldx % 8 == 0 && ldxa % 8 == 0 && aligned(x, 16) && aligned(xa, 16) && aligned(wr, 16);
  const int blocks = (M + kMaskRowsPerBlock - 1) / kMaskRowsPerBlock;
  launch_dependent(moe_route_mask_kernel, dim3(blocks), dim3(kMaskRowsPerBlock * 32), 0, 1, stream, p);
}

bool moe_ln_route_mask_supports(int K) { return K >= 4 && K % 4 == 0 && K <= ln::kMaxCols; }

void moe_ln_route_mask_forward(bf16* xa, int ldxa, int8_t* choice, const float* x, int ldx, const float* ln_w,
                               const float* ln_b, float eps, const float* wr, const float* br, int M, int K,
                               cudaStream_t stream) {
  SAV_CHECK(xa && x && ln_w && ln_b && wr && br, "moe layernorm+route+mask: null pointer");
  SAV_CHECK(moe_ln_route_mask_supports(K),
            "moe layernorm+route+mask: K=" << K << " not supported (K % 4 == 0, 4 <= K <= " << ln::kMaxCols << ")");
  const int Ka = moe_masked_cols(K);
  SAV_CHECK(M >= 0 && ldx >= K && ldxa >= Ka && ldx % 4 == 0 && ldxa % 4 == 0,
            "moe layernorm+route+mask: bad sizes M=" << M << " K=" << K << " ldx=" << ldx << " ldxa=" << ldxa);
  SAV_CHECK(aligned(x, 16) && aligned(ln_w, 16) && aligned(ln_b, 16) && aligned(wr, 16) && aligned(xa, 8),
            "moe layernorm+route+mask: misaligned pointers");
  if (M == 0) return;
  MoeLnMaskParams p{};
  p.xa = xa, p.choice = choice, p.x = x, p.ln_w = ln_w, p.ln_b = ln_b, p.wr = wr, p.br = br, p.eps = eps;
  p.ldxa = ldxa, p.ldx = ldx, p.M = M, p.K = K, p.Ka = Ka;
  if (ln::row_group(K) == 16)
    launch_dependent(moe_ln_route_mask_kernel<16>, dim3(ln_blocks(M, 16)), dim3(kMaskRowsPerBlock * 32), 0, 1, stream,
                     p);
  else
    launch_dependent(moe_ln_route_mask_kernel<32>, dim3(ln_blocks(M, 32)), dim3(kMaskRowsPerBlock * 32), 0, 1, stream,
                     p);
}

bool moe_epilogue_residual_ln_supports(int F) { return moe_ln_route_mask_supports(F); }

void moe_epilogue_residual_ln_forward(float* x, int ldx, int8_t* choice, const float* s, int lds, const float* b0,
                                      const float* b1, const float* br, int M, int F, MoeGate gate, bf16* xn, int ldxn,
                                      const float* ln_w, const float* ln_b, float eps, cudaStream_t stream) {
  SAV_CHECK(x && s && b0 && b1 && br && xn && ln_w && ln_b, "moe epilogue+layernorm: null pointer");
  SAV_CHECK(moe_epilogue_residual_ln_supports(F),
            "moe epilogue+layernorm: F=" << F << " not supported (F % 4 == 0, 4 <= F <= " << ln::kMaxCols << ")");
  SAV_CHECK(M >= 0 && ldx >= F && ldxn >= F && lds >= 2 * F + 4 && ldx % 4 == 0 && lds % 4 == 0 && ldxn % 4 == 0,
            "moe epilogue+layernorm: bad sizes M=" << M << " F=" << F << " ldx=" << ldx << " lds=" << lds
                                                   << " ldxn=" << ldxn);
  SAV_CHECK(gate == moe_gate_straight_through || gate == moe_gate_prob,
            "moe epilogue+layernorm: unknown gate " << int(gate));
  SAV_CHECK(aligned(x, 16) && aligned(s, 16) && aligned(b0, 16) && aligned(b1, 16) && aligned(ln_w, 16) &&
                aligned(ln_b, 16) && aligned(xn, 8),
            "moe epilogue+layernorm: misaligned pointers");
  if (M == 0) return;
  MoeEpiLnParams p{};
  p.x = x, p.choice = choice, p.s = s, p.b0 = b0, p.b1 = b1, p.br = br, p.ln_w = ln_w, p.ln_b = ln_b, p.xn = xn;
  p.eps = eps, p.ldx = ldx, p.lds = lds, p.ldxn = ldxn, p.M = M, p.F = F, p.gate = gate;
  if (ln::row_group(F) == 16)
    launch_dependent(moe_epilogue_residual_ln_kernel<16>, dim3(ln_blocks(M, 16)), dim3(kMaskRowsPerBlock * 32), 0, 1,
                     stream, p);
  else
    launch_dependent(moe_epilogue_residual_ln_kernel<32>, dim3(ln_blocks(M, 32)), dim3(kMaskRowsPerBlock * 32), 0, 1,
                     stream, p);
}

}  // namespace sav::cuda
