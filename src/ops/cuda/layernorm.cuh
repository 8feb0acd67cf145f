// shiftaddvit CUDA backend: the row LayerNorm arithmetic that more than one kernel computes (the LayerNorm
// kernel, and the MoE router + mask kernel with the LayerNorm before it fused), so they agree bit for bit.
// Device code only; include from .cu files.
//
// A row of C floats (C % 4 == 0) is held by a group of kG aligned lanes of a warp (kG = 16 or 32): lane l holds
// float4 number l + kG k in v[k] (zeros past C / 4). Two-pass mean / variance in f32, as
// cpu::layernorm_forward_ref; every lane of the group gets the same bits. The products are written as explicit
// fmas, so no kernel that inlines this can contract them differently.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace sav::cuda::ln {

constexpr int kMaxPer4 = 8;                  // float4 per lane: C <= 4 kG kMaxPer4
constexpr int kMaxCols = 4 * 32 * kMaxPer4;  // 1024

// The lanes per row of a float4-aligned row of C columns: half a warp up to 512, a warp up to 1024. Every kernel
// that normalises rows with row_stats picks its group by this, so they agree bit for bit.
__host__ __device__ constexpr int row_group(int C) { return C <= 4 * 16 * kMaxPer4 ? 16 : 32; }

// kS float4 slots per lane (kS <= kMaxPer4, C <= 4 kG kS): a kernel sized for its widths keeps fewer registers and
// less code; the zeros of the missing slots add nothing, so every kS gives the same bits.
template <int kG, int kS = kMaxPer4>
__device__ __forceinline__ void row_stats(const float4 (&v)[kS], int lane, int C, float eps, float& mean, float& rstd) {
  const int C4 = C / 4;
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < kS; ++k) s += (v[k].x + v[k].y) + (v[k].z + v[k].w);
#pragma unroll
  for (int o = kG / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  mean = s / C;
  float q = 0.0f;
#pragma unroll
  for (int k = 0; k < kS; ++k) {
    if (lane + kG * k < C4) {
      const float a = v[k].x - mean, b = v[k].y - mean, c = v[k].z - mean, d = v[k].w - mean;
      q += fmaf(a, a, b * b) + fmaf(c, c, d * d);
    }
  }
#pragma unroll
  for (int o = kG / 2; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
  rstd = rsqrtf(q / C + eps);
}

// fma((v - mean) rstd, w, b) as four bf16 (rounded once), packed in 8 bytes in column order
__device__ __forceinline__ uint2 apply4(float4 v, float mean, float rstd, float4 w, float4 b) {
  __align__(8) __nv_bfloat162 h[2] = {
      __floats2bfloat162_rn(fmaf((v.x - mean) * rstd, w.x, b.x), fmaf((v.y - mean) * rstd, w.y, b.y)),
      __floats2bfloat162_rn(fmaf((v.z - mean) * rstd, w.z, b.z), fmaf((v.w - mean) * rstd, w.w, b.w))};
  return *reinterpret_cast<const uint2*>(h);
}

}  // namespace sav::cuda::ln
