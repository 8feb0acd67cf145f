// shiftaddvit CUDA backend: mma.sync fragments of a row-major A tile in shared memory against weight rows held in
// registers, the k order permuted so that both operands are single 16-byte loads (device code only; include from .cu
// files, sm_80+).
//
// Within a 32-wide k block, lane q4 = lane % 4 holds k 8 q4 .. 8 q4 + 7 of its A rows (g = lane / 4 and g + 8) and
// of its weight row; the first m16n8k16 takes 8 q4 .. 8 q4 + 3, the second 8 q4 + 4 .. 8 q4 + 7. A product only
// needs A and B to use the same k order, so the sum is the one over the block's 32 k. A 16-wide tail block does the
// same with 8-byte loads (lane q4 holds k 4 q4 .. 4 q4 + 3, one mma).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "ops/cuda/ptx.cuh"

namespace sav::cuda::frag {

// acc (16 x 8) += A (16 rows of As, ld bf16 apart, k block kb) x W^T (the lane's 16-byte fragment w of its weight
// row): two mma
// ... with the lane's A fragment already in registers: ra of row g, rb of row g + 8 (a_fragment)
__device__ __forceinline__ void mma_kblock(float (&acc)[4], uint4 ra, uint4 rb, uint4 w) {
  const uint32_t a0[4] = {ra.x, rb.x, ra.y, rb.y}, a1[4] = {ra.z, rb.z, ra.w, rb.w};
  ptx::mma_bf16(acc, a0, w.x, w.y);
  ptx::mma_bf16(acc, a1, w.z, w.w);
}
// the lane's 16 bytes of A row r (rows ld bf16 apart) in k block kb
__device__ __forceinline__ uint4 a_fragment(const __nv_bfloat16* As, int ld, int r, int kb) {
  return *reinterpret_cast<const uint4*>(As + r * ld + kb * 32 + 8 * (threadIdx.x & 3));
}
__device__ __forceinline__ void mma_kblock(float (&acc)[4], const __nv_bfloat16* As, int ld, int kb, uint4 w) {
  const int g = (threadIdx.x & 31) >> 2;
  mma_kblock(acc, a_fragment(As, ld, g, kb), a_fragment(As, ld, g + 8, kb), w);
}
// the lane's fragment of weight row n (rows ld bf16 apart) in k block kb, read through the read-only path
__device__ __forceinline__ uint4 w_fragment(const __nv_bfloat16* W, int n, int ld, int kb) {
  return __ldg(reinterpret_cast<const uint4*>(W + int64_t(n) * ld + kb * 32 + 8 * (threadIdx.x & 3)));
}

// The 16-wide tail block starting at column k0: acc += A x W^T with the lane's 8-byte weight fragment w.
__device__ __forceinline__ void mma_ktail(float (&acc)[4], const __nv_bfloat16* As, int ld, int k0, uint2 w) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q4 = lane & 3;
  const uint2 ra = *reinterpret_cast<const uint2*>(As + g * ld + k0 + 4 * q4);
  const uint2 rb = *reinterpret_cast<const uint2*>(As + (g + 8) * ld + k0 + 4 * q4);
  const uint32_t a[4] = {ra.x, rb.x, ra.y, rb.y};
  ptx::mma_bf16(acc, a, w.x, w.y);
}
__device__ __forceinline__ uint2 w_tail_fragment(const __nv_bfloat16* W, int n, int ld, int k0) {
  return __ldg(reinterpret_cast<const uint2*>(W + int64_t(n) * ld + k0 + 4 * (threadIdx.x & 3)));
}

}  // namespace sav::cuda::frag
