// shiftaddvit CUDA backend: what the Hamming attention kernels share (device code and layouts; include from .cu
// files): the prepared hash weights' layout (hamming_attention_prepare), the bf16 operand helpers, and the KSH hash
// of one 16-token tile on the tensor cores (ksh_distances, ksh_sigma, ksh_codes), so that hamming.cu's per-head
// kernel and ham_block.cu's attention sub-block kernel compute the same code bits from the same qk rows.
//
// The hash of a tile, one warp (lane = 4 g + q4 holds rows ta = g and tb = g + 8 of the tile, as the mma's
// accumulator rows):
//   ksh_distances (ksh_dots, ksh_d, ksh_dsum): the dot products qk.a_j (A = qk rows by ldmatrix, B = anchor parts: 3
//     mma per 16 dims and 8 anchors) and ||qk||^2 (from the same fragments); q.a = qk.a / max(||qk||, eps), D_nj =
//     max(||q||^2 + ||a_j||^2 - 2 q.a_j, 0) in the accumulators; returns the tile's sum of D over the valid rows and
//     anchors (double, every lane the same: a butterfly over the warp);
//   ksh_sigma: -1 / (2 sigma), sigma = mean D = the tiles' sums (lane t holds tile t's, t < 32) added by a butterfly;
//   ksh_codes: k = exp(-D / (2 sigma)) - mu_j, split in three bf16 parts, is directly the A operand of y = k A^T
//     (A split too: 6 mma per 16 anchors and 8 bits); code bit r = 1[y_r > 0], OR-ed over the 4 lanes of a row.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "ops/cuda/common.h"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/ptx.cuh"

namespace sav::cuda::ham {

constexpr int kMaxN = 256;
constexpr int kMaxD = 64;
constexpr int kMaxM = 32;
constexpr int kMaxBits = 64;
constexpr int kTaps = 9;
constexpr int kPad = kTaps / 2;
constexpr int kLdA = kMaxM + 8;      // bf16 row stride of the split A rows (80 bytes: conflict-free pair loads)
constexpr float kNormEps = 1e-6f;    // cpu::kHammingNormEps
constexpr float kSigmaMin = 1e-12f;  // cpu::kHammingSigmaMin
constexpr float kInvPi = 0.318309886183790671538f;

// One head's prepared hash weights (hamming_attention_prepare), byte offsets within the block; the kernels copy
// the block into shared memory as it is: the anchors (32 x (dp + 8)) and A (8 bt x kLdA) each split in three bf16
// parts (part k at rows k R ..), zero-padded, then ||a_j||^2 and mu (32 f32 each, zero past m).
struct PrepLayout {
  size_t anc, a, aa, mu, bytes;
};
__host__ __device__ constexpr PrepLayout prep_layout(int dp, int bt) {
  PrepLayout P{};
  size_t o = 0;
  P.anc = o, o = align16(o + size_t(3) * kMaxM * (dp + 8) * sizeof(bf16));
  P.a = o, o = align16(o + size_t(3) * bt * 8 * kLdA * sizeof(bf16));
  P.aa = o, o = align16(o + kMaxM * sizeof(float));
  P.mu = o, o = align16(o + kMaxM * sizeof(float));
  P.bytes = o;
  return P;
}

// bf16 bit patterns of two 0/1 values (an mma operand pair): bit r of w0 in the low half, bit r of w1 in the high
__device__ __forceinline__ uint32_t bit_pair(uint32_t w0, uint32_t w1, int r) {
  return (((w0 >> r) & 1u) | (((w1 >> r) & 1u) << 16)) * 0x3F80u;
}
// the same for bits r and r + 1 of one word (low half: bit r)
__device__ __forceinline__ uint32_t bit_pair2(uint32_t w, int r) {
  return (((w >> r) & 3u) * 0x8001u & 0x10001u) * 0x3F80u;
}
// the same for bit r of two 16-bit codes packed in one word (low half: bits 0-15, high half: bits 16-31)
__device__ __forceinline__ uint32_t bit_pair16(uint32_t w, int r) { return ((w >> r) & 0x10001u) * 0x3F80u; }
__device__ __forceinline__ uint32_t ld_pair(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ float2 ld_float2(const bf16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
// x = hi + mid + lo to 2^-24 relative, each part a bf16
__device__ __forceinline__ void split3(float x, bf16& hi, bf16& mid, bf16& lo) {
  hi = __float2bfloat16_rn(x);
  const float r = x - __bfloat162float(hi);
  mid = __float2bfloat16_rn(r);
  lo = __float2bfloat16_rn(r - __bfloat162float(mid));
}
// The three parts of the pair (x0, x1), each packed as an mma operand register (x0 in the low half)
__device__ __forceinline__ void split3_pair(float x0, float x1, uint32_t& hi, uint32_t& mid, uint32_t& lo) {
  bf16 h0, m0, l0, h1, m1, l1;
  split3(x0, h0, m0, l0);
  split3(x1, h1, m1, l1);
  auto pack = [](bf16 a, bf16 b) {
    return uint32_t(__bfloat16_as_ushort(a)) | (uint32_t(__bfloat16_as_ushort(b)) << 16);
  };
  hi = pack(h0, h1), mid = pack(m0, m1), lo = pack(l0, l1);
}

// The dot products of the tile at Q (16 rows ldq apart, dp columns, zero past d) with the anchors of anchor tiles
// nt0 .. nt1 - 1 (Anc: parts kMaxM rows apart, rows lda apart) into acc[nt] (anchor 8 nt + 2 q4 + (i & 1), row i < 2 ?
// ta : tb; the other tiles zero), and the rows' ||qk||^2 (ssa: ta, ssb: tb; every lane of the row's quad).
// `active` false (warp-uniform): no products (zeros).
__device__ __forceinline__ void ksh_dots(bool active, const bf16* Q, int ldq, const bf16* Anc, int lda, int dp, int nt0,
                                         int nt1, float (&acc)[4][4], float& ssa, float& ssb) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q4 = lane & 3;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
  ssa = 0.0f, ssb = 0.0f;
  if (active) {
    for (int ks = 0; ks < dp; ks += 16) {
      uint32_t a[4];
      ptx::ldmatrix_x4(a, Q + (lane & 15) * ldq + ks + (lane >> 4) * 8);
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&a[r]));
        const float s = fmaf(f.x, f.x, f.y * f.y);
        if (r & 1)
          ssb += s;
        else
          ssa += s;
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        if (nt >= nt0 && nt < nt1) {
#pragma unroll
          for (int part = 0; part < 3; ++part) {
            const bf16* bp = Anc + (part * kMaxM + nt * 8 + g) * lda + ks + 2 * q4;
            ptx::mma_bf16(acc[nt], a, ld_pair(bp), ld_pair(bp + 8));
          }
        }
      }
    }
  }
  ssa += __shfl_xor_sync(0xffffffffu, ssa, 1);
  ssa += __shfl_xor_sync(0xffffffffu, ssa, 2);
  ssb += __shfl_xor_sync(0xffffffffu, ssb, 1);
  ssb += __shfl_xor_sync(0xffffffffu, ssb, 2);
}

// ksh_dots' dot products -> D in place: q.a = qk.a / max(||qk||, eps), D = max(||q||^2 + ||a_j||^2 - 2 q.a_j, 0)
__device__ __forceinline__ void ksh_d(float (&acc)[4][4], float ssa, float ssb, const float* aa) {
  const int q4 = threadIdx.x & 3;
  const float ina = 1.0f / fmaxf(sqrtf(ssa), kNormEps), inb = 1.0f / fmaxf(sqrtf(ssb), kNormEps);
  const float qqa = ssa * ina * ina, qqb = ssb * inb * inb;  // ||q||^2 (1, or less for a row below eps)
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int j = nt * 8 + 2 * q4 + (i & 1);
      const bool rb = i >= 2;
      acc[nt][i] = fmaxf((rb ? qqb : qqa) + aa[j] - 2.0f * (acc[nt][i] * (rb ? inb : ina)), 0.0f);
    }
  }
}

// The tile's sum of D over its valid rows (va: ta, vb: tb) and anchors (< m, tiles < mt): each lane's in (nt, i)
// order, then a butterfly over the warp (double; every lane the same).
__device__ __forceinline__ double ksh_dsum(const float (&D)[4][4], int mt, int m, bool va, bool vb) {
  const int q4 = threadIdx.x & 3;
  double dsum = 0.0;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int j = nt * 8 + 2 * q4 + (i & 1);
      if (nt < mt && j < m && (i >= 2 ? vb : va)) dsum += D[nt][i];
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) dsum += __shfl_xor_sync(0xffffffffu, dsum, o);
  return dsum;
}

// The distances of a tile to every anchor (ksh_dots, ksh_d: D in acc) and their sum (ksh_dsum).
__device__ __forceinline__ double ksh_distances(bool active, const bf16* Q, int ldq, const bf16* Anc, int lda,
                                                const float* aa, int dp, int mt, int m, bool va, bool vb,
                                                float (&acc)[4][4]) {
  float ssa, ssb;
  ksh_dots(active, Q, ldq, Anc, lda, dp, 0, mt, acc, ssa, ssb);
  ksh_d(acc, ssa, ssb, aa);
  return ksh_dsum(acc, mt, m, va, vb);
}

// -1 / (2 sigma) from the tiles' sums of D (lane t < 32 holds tile t's, 0 past the tiles), N tokens, m anchors
__device__ __forceinline__ float ksh_sigma(double lane_sum, int N, int m) {
  double s = lane_sum;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return -1.0f / (2.0f * fmaxf(static_cast<float>(s / (double(N) * m)), kSigmaMin));
}

// The codes of rows ta (ca) and tb (cb) from ksh_distances' acc, bits of the bit tiles bt0 .. bt1 - 1 (8 bits each;
// the others 0): every lane of a row's quad holds them, 0 for a row that is no token. Apr: the split A (parts 8 nbt
// rows apart, rows kLdA apart), mus: mu (zero past m).
__device__ __forceinline__ void ksh_codes(bool active, const float (&acc)[4][4], float neg_inv_2sigma, const bf16* Apr,
                                          const float* mus, int m, int mt, int nbt, int bt0, int bt1, bool va, bool vb,
                                          unsigned long long& ca, unsigned long long& cb) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q4 = lane & 3;
  ca = 0, cb = 0;
  if (active) {
    // k = exp(-D / (2 sigma)) - mu_j (0 past m), split: the A operand of y for anchors 16kk..16kk+15
    uint32_t kh[2][4], km[2][4], kl[2][4];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int nt = 2 * kk + (r >> 1), i0 = 2 * (r & 1), j = nt * 8 + 2 * q4;
        const float k0 = j < m ? expf(acc[nt][i0] * neg_inv_2sigma) - mus[j] : 0.0f;
        const float k1 = j + 1 < m ? expf(acc[nt][i0 + 1] * neg_inv_2sigma) - mus[j + 1] : 0.0f;
        split3_pair(k0, k1, kh[kk][r], km[kk][r], kl[kk][r]);
      }
    const int kks = (mt + 1) / 2, arows = nbt * 8;
#pragma unroll 2
    for (int bt = bt0; bt < bt1; ++bt) {
      float y[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        if (kk < kks) {
          const bf16* bp = Apr + (bt * 8 + g) * kLdA + kk * 16 + 2 * q4;
          const uint32_t bh0 = ld_pair(bp), bh1 = ld_pair(bp + 8);
          const uint32_t bm0 = ld_pair(bp + arows * kLdA), bm1 = ld_pair(bp + arows * kLdA + 8);
          const uint32_t bl0 = ld_pair(bp + 2 * arows * kLdA), bl1 = ld_pair(bp + 2 * arows * kLdA + 8);
          ptx::mma_bf16(y, kh[kk], bh0, bh1);
          ptx::mma_bf16(y, kh[kk], bm0, bm1);
          ptx::mma_bf16(y, km[kk], bh0, bh1);
          ptx::mma_bf16(y, kh[kk], bl0, bl1);
          ptx::mma_bf16(y, kl[kk], bh0, bh1);
          ptx::mma_bf16(y, km[kk], bm0, bm1);
        }
      }
      const int r = bt * 8 + 2 * q4;  // bits past nbits: A rows are zero there, y = 0, no bit
      ca |= (static_cast<unsigned long long>(y[0] > 0.0f) << r) |
            (static_cast<unsigned long long>(y[1] > 0.0f) << (r + 1));
      cb |= (static_cast<unsigned long long>(y[2] > 0.0f) << r) |
            (static_cast<unsigned long long>(y[3] > 0.0f) << (r + 1));
    }
  }
  ca |= __shfl_xor_sync(0xffffffffu, ca, 1);
  ca |= __shfl_xor_sync(0xffffffffu, ca, 2);
  cb |= __shfl_xor_sync(0xffffffffu, cb, 1);
  cb |= __shfl_xor_sync(0xffffffffu, cb, 2);
  if (!va) ca = 0;
  if (!vb) cb = 0;
}

// The fused row epilogue's vectors into shared memory ep (cp.async by threads tid of T, not committed): the proj bias
// bp, ln_w, ln_b at ep, ep + C, ep + 2C, the router wr (2, C) at ep + 3C, br (2) at ep + 5C. C % 4 == 0, all 16-byte
// aligned.
__device__ __forceinline__ void stage_row_epilogue(float* ep, int C, const float* bp, const float* ln_w,
                                                   const float* ln_b, const float* wr, const float* br, int tid,
                                                   int T) {
  for (int c = tid * 4; c < C; c += T * 4) {
    ptx::cp_async16(ep + c, bp + c);
    ptx::cp_async16(ep + C + c, ln_w + c);
    ptx::cp_async16(ep + 2 * C + c, ln_b + c);
  }
  for (int c = tid * 4; c < 2 * C; c += T * 4) ptx::cp_async16(ep + 3 * C + c, wr + c);
  if (tid < 2) ptx::cp_async4(ep + 5 * C + tid, br + tid);
}

}  // namespace sav::cuda::ham
