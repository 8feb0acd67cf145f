// Multi-head softmax attention forward for short sequences (N <= 256, d <= 64) on tensor cores: bf16
// mma.sync (m16n8k16) with f32 accumulation, scores and probabilities kept in registers, online softmax
// over chunks of 64 keys (as flash-attention 2). Spec: cpu::attention_forward_ref.
//
// Grid (query tiles, B*H), W warps per block (see attention_forward for the choice). A block stages
// K, V of one (b,h) and its W*16 queries in shared memory (bf16, rows padded to Np = roundup(N,16) with
// zeros, row stride dp+8 elements, dp = roundup(d,16): 16-byte aligned, conflict-free ldmatrix rows). Each
// warp owns 16 queries:
//   for each chunk of 64 keys: S (16,64) = Q K^T (registers) -> mask, running max m and sum l ->
//   P = exp2((S - m) scale log2e) in bf16 (registers, reused as the A operand) -> O = O*alpha + P V
//   out = O / l in bf16.
// For small batches the warps of a block share one 16-query tile and split its keys (flash-decoding style);
// the partial (m, l, O) are combined through shared memory.
// Shared memory: (2 Np + 16 W) (dp+8) 2 bytes (+ W*16*(dp+2)*4 with split keys): 78 KB for N=197, d=64,
// W=8 (two blocks per SM).
#include <algorithm>
#include <cmath>

#include "ops/cuda/ops.h"
#include "ops/cuda/ptx.cuh"

namespace sav::cuda {

namespace {

using namespace ptx;

constexpr int kAttMaxN = 256;
constexpr int kAttMaxD = 64;
constexpr int kKSteps = kAttMaxD / 16;  // k16 steps of Q K^T
constexpr int kOTiles = kAttMaxD / 8;   // n8 tiles of O
constexpr int kChunk = 64;              // keys per online-softmax step

struct AttParams {
  bf16* out;
  const bf16* qkv;
  int B, N, C, H, d;
  int Np, dp;  // padded to multiples of 16
  int ld;      // smem row stride (bf16 elements) = dp + 8
  int warps;
  int split;         // key splits per 16 queries (1, or warps when one block holds one query tile)
  float scale_log2;  // d^-0.5 * log2(e)
  bool vec;          // 16-byte copies possible (d % 8 == 0, C % 8 == 0, aligned pointers)
  bool pairs;        // bf16x2 stores possible (d, C even, out 4-byte aligned)
};

size_t smem_bytes(const AttParams& p) {
  size_t bytes = size_t(2 * p.Np + 16 * p.warps) * p.ld * sizeof(bf16);
  if (p.split > 1) bytes += size_t(p.split) * 16 * (2 + p.dp) * sizeof(float);  // partial m, l, O
  return bytes;
}

// ---- PTX wrappers ----
__device__ __forceinline__ void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait<0>();
}
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (lower address)
  return *reinterpret_cast<const unsigned*>(&v);
}

// Copies rows [0, rows_pad) of head h's slice s (0 q, 1 k, 2 v) of batch b into dst (rows_pad, ld) bf16,
// zero-filling rows >= N - row0 and columns >= d. Threads tid..(of nthreads) share the work; the vector
// path is asynchronous (the caller waits with cp_async_wait_all before its barrier).
__device__ __forceinline__ void stage_rows(bf16* dst, const AttParams& p, int b, int h, int s, int row0, int rows_pad,
                                           int tid, int nthreads) {
  const int valid = min(rows_pad, p.N - row0);
  const bf16* src = p.qkv + (int64_t(b) * p.N + row0) * 3 * p.C + s * p.C + h * p.d;
  if (p.vec) {
    const int chunks = p.dp / 8;   // 8 bf16 per 16-byte chunk
    if (nthreads % chunks == 0) {  // fixed column per thread: no division in the loop
      const int c8 = (tid % chunks) * 8, rstep = nthreads / chunks;
      const bool col_ok = c8 < p.d;
      int r = tid / chunks;
      const int64_t gstep = int64_t(rstep) * 3 * p.C;
      const bf16* gp = src + int64_t(r) * 3 * p.C + c8;
      bf16* sp = dst + r * p.ld + c8;
      for (; r < rows_pad; r += rstep, gp += gstep, sp += rstep * p.ld) {
        const bool ok = col_ok && r < valid;
        cp_async16(sp, ok ? gp : p.qkv, ok);
      }
      return;
    }
    for (int i = tid; i < rows_pad * chunks; i += nthreads) {
      const int r = i / chunks, c8 = (i - r * chunks) * 8;
      const bool ok = r < valid && c8 < p.d;
      cp_async16(dst + r * p.ld + c8, ok ? src + int64_t(r) * 3 * p.C + c8 : p.qkv, ok);
    }
  } else {
    const bf16 zero = __float2bfloat16_rn(0.0f);
    for (int i = tid; i < rows_pad * p.dp; i += nthreads) {
      const int r = i / p.dp, c = i - r * p.dp;
      dst[r * p.ld + c] = (r < valid && c < p.d) ? src[int64_t(r) * 3 * p.C + c] : zero;
    }
  }
}

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: exp2(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__global__ void attention_kernel(const __grid_constant__ AttParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* Ks = reinterpret_cast<bf16*>(smem);
  bf16* Vs = Ks + p.Np * p.ld;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  bf16* Qs = Vs + p.Np * p.ld + warp * 16 * p.ld;  // this warp's 16 queries
  // split == 1: each warp owns 16 queries and all keys. split > 1: the block's warps share 16 queries and
  // take every split-th chunk of keys each; partial results are combined through shared memory.
  const int qw = warp / p.split, ks = warp - qw * p.split;
  const int bh = blockIdx.y, b = bh / p.H, h = bh - b * p.H;
  const int q0 = (blockIdx.x * (p.warps / p.split) + qw) * 16;

  stage_rows(Ks, p, b, h, 1, 0, p.Np, threadIdx.x, blockDim.x);
  stage_rows(Vs, p, b, h, 2, 0, p.Np, threadIdx.x, blockDim.x);
  if (q0 < p.N) stage_rows(Qs, p, b, h, 0, q0, 16, lane, 32);
  cp_async_wait_all();
  __syncthreads();
  if (q0 >= p.N) return;  // with split > 1 the whole block leaves together

  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates: row g (and g+8), column pair 2t
  const int dk = p.dp / 16;
  const float sc = p.scale_log2;
  unsigned qa[kKSteps][4];
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk)
    if (kk < dk) ldmatrix_x4(qa[kk], Qs + (lane & 15) * p.ld + kk * 16 + 8 * (lane >> 4));

  float o[kOTiles][4];
#pragma unroll
  for (int n = 0; n < kOTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  // running max of the raw scores and this thread's part of the sum, rows g and g+8
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

  for (int j0 = ks * kChunk; j0 < p.N; j0 += kChunk * p.split) {
    float s[kChunk / 8][4];
#pragma unroll
    for (int n = 0; n < kChunk / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      // S = Q K^T for keys j0 .. j0+63 (16-key tiles beyond Np skipped)
#pragma unroll
    for (int kp = 0; kp < kChunk / 16; ++kp) {
      if (j0 + 16 * kp < p.Np) {
        const bf16* krow = Ks + (j0 + 16 * kp + (lane & 7) + 8 * (lane >> 4)) * p.ld + 8 * ((lane >> 3) & 1);
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
          if (kk < dk) {
            unsigned kb[4];
            ldmatrix_x4(kb, krow + kk * 16);
            mma_bf16(s[2 * kp], qa[kk], kb[0], kb[1]);
            mma_bf16(s[2 * kp + 1], qa[kk], kb[2], kb[3]);
          }
        }
      }
    }
    if (j0 + kChunk > p.N) {  // the chunk that crosses N: mask keys >= N
#pragma unroll
      for (int n = 0; n < kChunk / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (j0 + 8 * n + 2 * t + (e & 1) >= p.N) s[n][e] = -INFINITY;
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int n = 0; n < kChunk / 8; ++n) {
      mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
      mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
    }
#pragma unroll
    for (int o2 = 1; o2 <= 2; o2 <<= 1) {  // the 4 lanes of a row
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o2));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);                        // finite: key j0 < N is in the chunk
    const float a0 = fast_exp2((m0 - mn0) * sc), a1 = fast_exp2((m1 - mn1) * sc);  // 0 on the first chunk
    m0 = mn0, m1 = mn1;
    const float b0 = -mn0 * sc, b1 = -mn1 * sc;
    float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
    for (int n = 0; n < kChunk / 8; ++n) {
      if (j0 + 8 * n < p.N) {
        s[n][0] = fast_exp2(fmaf(s[n][0], sc, b0)), s[n][1] = fast_exp2(fmaf(s[n][1], sc, b0));
        s[n][2] = fast_exp2(fmaf(s[n][2], sc, b1)), s[n][3] = fast_exp2(fmaf(s[n][3], sc, b1));
        ps0 += s[n][0] + s[n][1];
        ps1 += s[n][2] + s[n][3];
      } else {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      }
    }
    l0 = l0 * a0 + ps0;
    l1 = l1 * a1 + ps1;
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) o[n][0] *= a0, o[n][1] *= a0, o[n][2] *= a1, o[n][3] *= a1;
      // O += P V; P's accumulator layout is the A operand's (two n8 tiles = one k16 step)
#pragma unroll
    for (int kp = 0; kp < kChunk / 16; ++kp) {
      if (j0 + 16 * kp < p.Np) {
        const unsigned pa[4] = {pack_bf16(s[2 * kp][0], s[2 * kp][1]), pack_bf16(s[2 * kp][2], s[2 * kp][3]),
                                pack_bf16(s[2 * kp + 1][0], s[2 * kp + 1][1]),
                                pack_bf16(s[2 * kp + 1][2], s[2 * kp + 1][3])};
        const bf16* vrow = Vs + (j0 + 16 * kp + (lane & 7) + 8 * ((lane >> 3) & 1)) * p.ld + 8 * (lane >> 4);
#pragma unroll
        for (int cp = 0; cp < kOTiles / 2; ++cp) {
          if (cp < dk) {
            unsigned vb[4];
            ldmatrix_x4_trans(vb, vrow + cp * 16);
            mma_bf16(o[2 * cp], pa, vb[0], vb[1]);
            mma_bf16(o[2 * cp + 1], pa, vb[2], vb[3]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int o2 = 1; o2 <= 2; o2 <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o2);
  }

  if (p.split > 1) {
    // Partial (m, l, O) of each key split to shared memory (after Q: Ms, Ls (split,16), Os (split,16,dp)),
    // then the block combines: O = sum_k 2^((m_k - M) sc) O_k / sum_k 2^((m_k - M) sc) l_k.
    float* Ms = reinterpret_cast<float*>(Vs + p.Np * p.ld + p.warps * 16 * p.ld);
    float* Ls = Ms + p.split * 16;
    float* Os = Ls + p.split * 16;
    if (t == 0) {
      Ms[ks * 16 + g] = m0, Ms[ks * 16 + g + 8] = m1;
      Ls[ks * 16 + g] = l0, Ls[ks * 16 + g + 8] = l1;
    }
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
      const int c = 8 * n + 2 * t;
      if (c < p.dp) {
        float* row0 = Os + (ks * 16 + g) * p.dp + c;
        float* row1 = Os + (ks * 16 + g + 8) * p.dp + c;
        row0[0] = o[n][0], row0[1] = o[n][1], row1[0] = o[n][2], row1[1] = o[n][3];
      }
    }
    __syncthreads();
    const int rows = min(16, p.N - q0);
    for (int i = threadIdx.x; i < rows * p.d; i += blockDim.x) {
      const int r = i / p.d, c = i - r * p.d;
      float M = -INFINITY;
      for (int k = 0; k < p.split; ++k) M = fmaxf(M, Ms[k * 16 + r]);
      float L = 0.0f, O = 0.0f;
      for (int k = 0; k < p.split; ++k) {
        const float w = fast_exp2((Ms[k * 16 + r] - M) * sc);  // a split without keys: m = -inf, w = 0
        L += w * Ls[k * 16 + r];
        O += w * Os[(k * 16 + r) * p.dp + c];
      }
      p.out[(int64_t(b) * p.N + q0 + r) * p.C + h * p.d + c] = __float2bfloat16_rn(O / L);
    }
    return;
  }

  const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int q = q0 + g + 8 * half;
    if (q >= p.N) continue;
    const float inv = half ? inv1 : inv0;
    bf16* dst = p.out + (int64_t(b) * p.N + q) * p.C + h * p.d;
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
      const int c = 8 * n + 2 * t;
      const float v0 = o[n][2 * half] * inv, v1 = o[n][2 * half + 1] * inv;
      if (p.pairs && c + 1 < p.d) {
        *reinterpret_cast<__nv_bfloat162*>(dst + c) = __floats2bfloat162_rn(v0, v1);
      } else {
        if (c < p.d) dst[c] = __float2bfloat16_rn(v0);
        if (c + 1 < p.d) dst[c + 1] = __float2bfloat16_rn(v1);
      }
    }
  }
}

}  // namespace

bool attention_supports(int N, int C, int H) {
  return N >= 1 && N <= kAttMaxN && H >= 1 && C >= H && C % H == 0 && C / H <= kAttMaxD;
}

void attention_forward(bf16* out, const bf16* qkv, int B, int N, int C, int H, cudaStream_t stream) {
  SAV_CHECK(out && qkv, "attention: null pointer");
  SAV_CHECK(attention_supports(N, C, H), "attention: N=" << N << ", C=" << C << ", H=" << H << " not supported (N <= "
                                                         << kAttMaxN << ", head size C/H <= " << kAttMaxD << ")");
  SAV_CHECK(B >= 0, "attention: negative batch " << B);
  if (B == 0) return;
  SAV_CHECK(int64_t(B) * H <= 65535, "attention: B*H = " << int64_t(B) * H << " exceeds the grid's y limit");
  AttParams p{};
  p.out = out, p.qkv = qkv, p.B = B, p.N = N, p.C = C, p.H = H, p.d = C / H;
  p.Np = (N + 15) / 16 * 16;
  p.dp = (p.d + 15) / 16 * 16;
  p.ld = p.dp + 8;
  p.scale_log2 = 1.4426950408889634f / std::sqrt(static_cast<float>(p.d));
  p.vec = p.d % 8 == 0 && C % 8 == 0 && reinterpret_cast<uintptr_t>(qkv) % 16 == 0;
  p.pairs = p.d % 2 == 0 && C % 2 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0;
  // Large batches: eight warps (128 queries: fewer copies of K and V) per block when that gives two blocks
  // per multiprocessor, else four; each warp takes 16 queries and all keys. Small batches (fewer 64-query
  // tiles than multiprocessors): one 16-query tile per block, its keys split over up to four warps (one
  // 64-key chunk each), which shortens the chain of dependent steps per warp.
  const int64_t bh = int64_t(B) * H, tiles128 = bh * ((N + 127) / 128), tiles64 = bh * ((N + 63) / 64);
  if (tiles64 >= sm_count()) {
    p.warps = tiles128 >= 2 * sm_count() ? 8 : 4;
    p.warps = std::min(p.warps, (N + 15) / 16);
    p.split = 1;
  } else {
    p.split = std::min(4, (N + kChunk - 1) / kChunk);
    p.warps = p.split;
  }
  const size_t smem = smem_bytes(p);
  SAV_CHECK(smem <= size_t(max_smem_per_block()),
            "attention: needs " << smem << " bytes of shared memory, the device offers " << max_smem_per_block());
  // the whole opt-in limit at once: the first (eager) call sets it, so no later one (in a graph capture) has to
  allow_dynamic_smem(reinterpret_cast<const void*>(attention_kernel), size_t(max_smem_per_block()));
  const int qtile = 16 * (p.warps / p.split);
  const dim3 grid((N + qtile - 1) / qtile, B * H);
  attention_kernel<<<grid, p.warps * 32, smem, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
}

}  // namespace sav::cuda
