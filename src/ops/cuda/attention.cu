// Multi-head softmax attention forward for short sequences (N <= 256, d <= 64) on tensor cores (WMMA,
// bf16 inputs, f32 accumulation). Spec: cpu::attention_forward_ref.
//
// Grid (ceil(N / (16 W)), B*H), W warps per block. A block stages K and V of one (b,h) in shared memory
// (bf16, zero-padded to Np = roundup(N,16) rows and dp = roundup(d,16) columns); each warp owns 16 queries:
//   S (16,Np) = Q K^T        (WMMA, f32, kept in the warp's shared region)
//   P = softmax(S * scale)   (one row at a time across the warp, f32; written back as bf16 over S)
//   O (16,dp) = P V          (WMMA), stored over the same region, then written to out in bf16.
// Shared memory: 2 * Np * (dp+8) * 2 bytes (K, V) + W * 16 * (Np+4) * 4 bytes; for N=197, d=64, W=4 it is
// 114 KB, so two blocks share a multiprocessor.
#include <mma.h>

#include <algorithm>
#include <cmath>

#include "ops/cuda/ops.h"

namespace sav::cuda {

namespace {

namespace wmma = nvcuda::wmma;

constexpr int kAttMaxN = 256;
constexpr int kAttMaxD = 64;
constexpr int kTile = 16;

struct AttParams {
  bf16* out;
  const bf16* qkv;
  int B, N, C, H, d;
  int Np, dp;        // padded to multiples of 16
  int ldk;           // K/V smem row stride (bf16 elements) = dp + 8
  int lds;           // S row stride (f32 elements) = max(Np, dp) + 4
  int warps;
  float scale_log2;  // d^-0.5 * log2(e)
  bool vec;          // 16-byte loads possible (d % 8 == 0 and C % 8 == 0)
};

size_t smem_bytes(const AttParams& p) {
  return size_t(2) * p.Np * p.ldk * sizeof(bf16) + size_t(p.warps) * kTile * p.lds * sizeof(float);
}

// Copies rows [0, rows_pad) of head h's slice s (0 q, 1 k, 2 v) of batch b into dst (rows_pad, ld) bf16,
// zero-filling rows >= N - row0 and columns >= d. Threads tid..(of nthreads) share the work.
__device__ void stage_rows(bf16* dst, int ld, const AttParams& p, int b, int h, int s, int row0, int rows_pad,
                           int tid, int nthreads) {
  const int valid = min(rows_pad, p.N - row0);
  const bf16* src = p.qkv + (int64_t(b) * p.N + row0) * 3 * p.C + s * p.C + h * p.d;
  if (p.vec) {
    const int chunks = p.dp / 8;  // 8 bf16 per 16-byte chunk
    for (int i = tid; i < rows_pad * chunks; i += nthreads) {
      const int r = i / chunks, c8 = (i - r * chunks) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < valid && c8 < p.d) v = *reinterpret_cast<const uint4*>(src + int64_t(r) * 3 * p.C + c8);
      *reinterpret_cast<uint4*>(dst + r * ld + c8) = v;
    }
  } else {
    const bf16 zero = __float2bfloat16_rn(0.0f);
    for (int i = tid; i < rows_pad * p.dp; i += nthreads) {
      const int r = i / p.dp, c = i - r * p.dp;
      dst[r * ld + c] = (r < valid && c < p.d) ? src[int64_t(r) * 3 * p.C + c] : zero;
    }
  }
}

__global__ void attention_kernel(const AttParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* Ks = reinterpret_cast<bf16*>(smem);
  bf16* Vs = Ks + p.Np * p.ldk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* S = reinterpret_cast<float*>(Vs + p.Np * p.ldk) + warp * kTile * p.lds;
  bf16* Qs = reinterpret_cast<bf16*>(S);  // the warp's Q tile, staged over its S region (ld = ldk)
  bf16* P = reinterpret_cast<bf16*>(S);   // probabilities over S, row r at P + r * 2 * lds
  const int ldp = 2 * p.lds;

  const int bh = blockIdx.y, b = bh / p.H, h = bh - b * p.H;
  const int q0 = (blockIdx.x * p.warps + warp) * kTile;

  stage_rows(Ks, p.ldk, p, b, h, 1, 0, p.Np, threadIdx.x, blockDim.x);
  stage_rows(Vs, p.ldk, p, b, h, 2, 0, p.Np, threadIdx.x, blockDim.x);
  if (q0 < p.N) stage_rows(Qs, p.ldk, p, b, h, 0, q0, kTile, lane, 32);
  __syncthreads();
  if (q0 >= p.N) return;

  const int dk = p.dp / kTile, nk = p.Np / kTile;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> qf[kAttMaxD / kTile];
#pragma unroll
  for (int kk = 0; kk < kAttMaxD / kTile; ++kk)
    if (kk < dk) wmma::load_matrix_sync(qf[kk], Qs + kk * kTile, p.ldk);
  __syncwarp();

  // S = Q K^T
  for (int jt = 0; jt < nk; ++jt) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < kAttMaxD / kTile; ++kk) {
      if (kk < dk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> kf;
        wmma::load_matrix_sync(kf, Ks + jt * kTile * p.ldk + kk * kTile, p.ldk);
        wmma::mma_sync(acc, qf[kk], kf, acc);
      }
    }
    wmma::store_matrix_sync(S + jt * kTile, acc, p.lds, wmma::mem_row_major);
  }
  __syncwarp();

  // Row softmax; lane holds columns lane + 32 t. P (bf16) overwrites the front of the same row of S.
  constexpr int kPer = kAttMaxN / 32;
  for (int r = 0; r < kTile; ++r) {
    const float* srow = S + r * p.lds;
    float v[kPer];
    float mx = -INFINITY;
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int j = lane + 32 * t;
      v[t] = j < p.N ? srow[j] * p.scale_log2 : -INFINITY;
      mx = fmaxf(mx, v[t]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.0f;
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      v[t] = exp2f(v[t] - mx);  // exp2(-inf) = 0 for padded columns
      sum += v[t];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = 1.0f / sum;
    __syncwarp();  // every lane has read row r before it is overwritten
    bf16* prow = P + r * ldp;
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int j = lane + 32 * t;
      if (j < p.Np) prow[j] = __float2bfloat16_rn(v[t] * inv);
    }
  }
  __syncwarp();

  // O = P V
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> of[kAttMaxD / kTile];
#pragma unroll
  for (int ct = 0; ct < kAttMaxD / kTile; ++ct) wmma::fill_fragment(of[ct], 0.0f);
  for (int jt = 0; jt < nk; ++jt) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> pf;
    wmma::load_matrix_sync(pf, P + jt * kTile, ldp);
#pragma unroll
    for (int ct = 0; ct < kAttMaxD / kTile; ++ct) {
      if (ct < dk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> vf;
        wmma::load_matrix_sync(vf, Vs + jt * kTile * p.ldk + ct * kTile, p.ldk);
        wmma::mma_sync(of[ct], pf, vf, of[ct]);
      }
    }
  }
  __syncwarp();  // P fully consumed before O overwrites the region
#pragma unroll
  for (int ct = 0; ct < kAttMaxD / kTile; ++ct)
    if (ct < dk) wmma::store_matrix_sync(S + ct * kTile, of[ct], p.lds, wmma::mem_row_major);
  __syncwarp();

  const int rows = min(kTile, p.N - q0);
  bf16* dst = p.out + (int64_t(b) * p.N + q0) * p.C + h * p.d;
  for (int i = lane; i < rows * p.d; i += 32) {
    const int r = i / p.d, c = i - r * p.d;
    dst[int64_t(r) * p.C + c] = __float2bfloat16_rn(S[r * p.lds + c]);
  }
}

}  // namespace

bool attention_supports(int N, int C, int H) {
  return N >= 1 && N <= kAttMaxN && H >= 1 && C >= H && C % H == 0 && C / H <= kAttMaxD;
}

void attention_forward(bf16* out, const bf16* qkv, int B, int N, int C, int H, cudaStream_t stream) {
  SAV_CHECK(out && qkv, "attention: null pointer");
  SAV_CHECK(attention_supports(N, C, H), "attention: N=" << N << ", C=" << C << ", H=" << H
                                                         << " not supported (N <= " << kAttMaxN
                                                         << ", head size C/H <= " << kAttMaxD << ")");
  SAV_CHECK(B >= 0, "attention: negative batch " << B);
  if (B == 0) return;
  AttParams p{};
  p.out = out, p.qkv = qkv, p.B = B, p.N = N, p.C = C, p.H = H, p.d = C / H;
  p.Np = (N + kTile - 1) / kTile * kTile;
  p.dp = (p.d + kTile - 1) / kTile * kTile;
  p.ldk = p.dp + 8;
  p.lds = std::max(p.Np, p.dp) + 4;
  p.scale_log2 = 1.4426950408889634f / std::sqrt(static_cast<float>(p.d));
  p.vec = p.d % 8 == 0 && C % 8 == 0 && reinterpret_cast<uintptr_t>(qkv) % 16 == 0;
  // Four warps (64 queries) per block when that still fills the machine, else two.
  const int64_t tiles64 = int64_t(B) * H * ((N + 63) / 64);
  p.warps = tiles64 >= sm_count() ? 4 : 2;
  p.warps = std::min(p.warps, (N + kTile - 1) / kTile);
  const size_t smem = smem_bytes(p);
  SAV_CHECK(smem <= size_t(max_smem_per_block()),
            "attention: needs " << smem << " bytes of shared memory, the device offers " << max_smem_per_block());
  static bool attr_set = false;  // per process; the maximum is the device's limit
  if (!attr_set) {
    SAV_CUDA_CHECK(cudaFuncSetAttribute(attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        max_smem_per_block()));
    attr_set = true;
  }
  const dim3 grid((N + kTile * p.warps - 1) / (kTile * p.warps), B * H);
  SAV_CHECK(B * H <= 65535, "attention: B*H = " << B * H << " exceeds the grid's y limit");
  attention_kernel<<<grid, p.warps * 32, smem, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
}

}  // namespace sav::cuda
