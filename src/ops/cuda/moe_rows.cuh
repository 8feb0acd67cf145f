// shiftaddvit CUDA backend: the per-row MoE epilogues with a LayerNorm fused, shared by the row kernels of moe.cu and
// the cluster kernels of rows_fused.cu so that they agree bit for bit. Device code only; include from .cu files.
//
// A row of C columns (C % 4 == 0) is handled by a group of kG aligned lanes of a warp (kG = ln::row_group(C)): lane
// l handles float4 number l + kG k, k < kS (ln::row_stats). A group past the last row (`valid` false) computes on
// zeros, joins the shuffles and stores nothing.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "ops/cuda/layernorm.cuh"
#include "ops/cuda/ops.h"

namespace sav::cuda::moe_rows {

// x + t, each component rounded once (no contraction with the product that made t)
__device__ __forceinline__ float4 res_add(float4 x, float4 t) {
  return make_float4(__fadd_rn(x.x, t.x), __fadd_rn(x.y, t.y), __fadd_rn(x.z, t.z), __fadd_rn(x.w, t.w));
}

// LayerNorm of the row v (K columns, zeros past them) + router + mask (ops.h moe_ln_route_mask_forward): the lane
// normalises its float4s to four bf16 each, adds their products with the router weights wr (2,K) to its two partial
// logits (in k order), the kG partials are summed by a butterfly, l_e = partial + br[e], e = l1 > l0 (ties and NaN:
// 0); the lane writes its four bf16 into the chosen half of xa_row (Ka columns) and zeros into the other, then
// [2K, Ka) = s0 s0 s1 s1 0 ...; lane 0 stores e in *choice (nullptr: not stored).
template <int kG, int kS = ln::kMaxPer4>
__device__ __forceinline__ void ln_route_mask(const float4 (&v)[kS], int lane, bool valid, int K, int Ka, float eps,
                                              const float* ln_w, const float* ln_b, const float* wr, const float* br,
                                              bf16* xa_row, int8_t* choice) {
  const int K4 = K / 4;
  float mean, rstd;
  ln::row_stats<kG, kS>(v, lane, K, eps, mean, rstd);
  const float4 *w4 = reinterpret_cast<const float4*>(ln_w), *b4 = reinterpret_cast<const float4*>(ln_b);
  const float4 *r0 = reinterpret_cast<const float4*>(wr), *r1 = reinterpret_cast<const float4*>(wr + K);
  uint2 y[kS];
  float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
  for (int k = 0; k < kS; ++k) {
    const int c = lane + kG * k;
    y[k] = make_uint2(0u, 0u);
    if (c < K4) {
      y[k] = ln::apply4(v[k], mean, rstd, w4[c], b4[c]);
      const float4 q0 = r0[c], q1 = r1[c];
      const float e0 = __uint_as_float(y[k].x << 16), e1 = __uint_as_float(y[k].x & 0xFFFF0000u);
      const float e2 = __uint_as_float(y[k].y << 16), e3 = __uint_as_float(y[k].y & 0xFFFF0000u);
      a0 = fmaf(e0, q0.x, a0), a1 = fmaf(e0, q1.x, a1);
      a0 = fmaf(e1, q0.y, a0), a1 = fmaf(e1, q1.y, a1);
      a0 = fmaf(e2, q0.z, a0), a1 = fmaf(e2, q1.z, a1);
      a0 = fmaf(e3, q0.w, a0), a1 = fmaf(e3, q1.w, a1);
    }
  }
#pragma unroll
  for (int o = kG / 2; o > 0; o >>= 1) {
    a0 += __shfl_xor_sync(0xffffffffu, a0, o);
    a1 += __shfl_xor_sync(0xffffffffu, a1, o);
  }
  if (!valid) return;
  const float l0 = a0 + br[0], l1 = a1 + br[1];
  const int e = l1 > l0 ? 1 : 0;  // ties and NaN -> expert 0
  uint2* o2 = reinterpret_cast<uint2*>(xa_row);
  const uint2 z = make_uint2(0u, 0u);
#pragma unroll
  for (int k = 0; k < kS; ++k) {
    const int c = lane + kG * k;
    if (c < K4) {
      o2[c] = e ? z : y[k];
      o2[K4 + c] = e ? y[k] : z;
    }
  }
  // columns [2K, Ka): s0 s0 s1 s1 (bf16 1.0 = 0x3F80), then zeros
  constexpr uint32_t kOnes = 0x3F803F80u;
  for (int c = 2 * K4 + lane; c < Ka / 4; c += kG) o2[c] = c == 2 * K4 ? make_uint2(e ? 0u : kOnes, e ? kOnes : 0u) : z;
  if (lane == 0 && choice) *choice = static_cast<int8_t>(e);
}

// A linear layer's residual epilogue and the LayerNorm + router + mask after it, for one row: x_out = x_in + (sr + b)
// (each add rounded once; sr the row's product, b the bias, C columns), then ln_route_mask of the new row. x_out may
// be x_in; any input may be in shared memory; sr, b and x_in are read only when `valid`.
template <int kG, int kS = ln::kMaxPer4>
__device__ __forceinline__ void linear_residual_ln_route_mask(const float* sr, const float* b, const float* x_in,
                                                              float* x_out, bool valid, int lane, int C, int Ka,
                                                              float eps, const float* ln_w, const float* ln_b,
                                                              const float* wr, const float* br, bf16* xa_row,
                                                              int8_t* choice) {
  const int C4 = C / 4;
  const float4 *s4 = reinterpret_cast<const float4*>(sr), *b4 = reinterpret_cast<const float4*>(b);
  const float4* xi4 = reinterpret_cast<const float4*>(x_in);
  float4* xo4 = reinterpret_cast<float4*>(x_out);
  float4 v[kS];
#pragma unroll
  for (int k = 0; k < kS; ++k) {
    const int c = lane + kG * k;
    v[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (valid && c < C4) {
      const float4 s = s4[c], bb = b4[c];
      v[k] = res_add(
          xi4[c], make_float4(__fadd_rn(s.x, bb.x), __fadd_rn(s.y, bb.y), __fadd_rn(s.z, bb.z), __fadd_rn(s.w, bb.w)));
      xo4[c] = v[k];
    }
  }
  ln_route_mask<kG, kS>(v, lane, valid, C, Ka, eps, ln_w, ln_b, wr, br, xa_row, choice);
}

// The stacked form's residual epilogue (ops.h moe_epilogue_forward, moe_epilogue_f32_residual) and the LayerNorm
// after it, for one row: sr the row of s (2F + 4 columns: both experts, the split router), x_in (F) f32 the
// residual row, x_out (F) = x_in + the expert's output (may be x_in), xn_row (F) bf16 = LayerNorm(x_out) (as
// layernorm_kernel), lane 0 stores the expert in *choice (nullptr: not stored). sr must be readable even when
// !valid (its router columns are read). Any of the inputs may be in shared memory.
template <int kG, int kS = ln::kMaxPer4>
__device__ __forceinline__ void epilogue_residual_ln(const float* sr, const float* x_in, float* x_out, bf16* xn_row,
                                                     int8_t* choice, bool valid, int lane, int F, int gate, float eps,
                                                     const float* b0, const float* b1, const float* br,
                                                     const float* ln_w, const float* ln_b) {
  const int F4 = F / 4;
  const float l0 = sr[2 * F] + sr[2 * F + 2] + br[0];
  const float l1 = sr[2 * F + 1] + sr[2 * F + 3] + br[1];
  const int e = l1 > l0 ? 1 : 0;  // ties (and NaN) -> expert 0, as cpu::moe_router_forward
  const float g = gate == moe_gate_prob ? 1.0f / (1.0f + expf(e ? l0 - l1 : l1 - l0)) : 1.0f;
  const float4* y4 = reinterpret_cast<const float4*>(sr + e * F);
  const float4* bias4 = reinterpret_cast<const float4*>(e ? b1 : b0);
  const float4* xi4 = reinterpret_cast<const float4*>(x_in);
  float4* xo4 = reinterpret_cast<float4*>(x_out);
  float4 v[kS];
#pragma unroll
  for (int k = 0; k < kS; ++k) {
    const int c = lane + kG * k;
    v[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (valid && c < F4) {
      const float4 a = y4[c], bb = bias4[c], xo = xi4[c];
      const float4 t = make_float4(__fmul_rn(a.x + bb.x, g), __fmul_rn(a.y + bb.y, g), __fmul_rn(a.z + bb.z, g),
                                   __fmul_rn(a.w + bb.w, g));  // as moe_epilogue_kernel
      v[k] = res_add(xo, t);
      xo4[c] = v[k];
    }
  }
  float mean, rstd;
  ln::row_stats<kG, kS>(v, lane, F, eps, mean, rstd);
  if (!valid) return;
  const float4 *w4 = reinterpret_cast<const float4*>(ln_w), *b4 = reinterpret_cast<const float4*>(ln_b);
  uint2* yn = reinterpret_cast<uint2*>(xn_row);
#pragma unroll
  for (int k = 0; k < kS; ++k) {
    const int c = lane + kG * k;
    if (c < F4) yn[c] = ln::apply4(v[k], mean, rstd, w4[c], b4[c]);
  }
  if (lane == 0 && choice) *choice = static_cast<int8_t>(e);
}

}  // namespace sav::cuda::moe_rows
