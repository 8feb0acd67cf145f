// The ShiftAddViT forward at small batch as one persistent cooperative kernel. Spec, phases and limits:
// vit_fused.h. Legend there; RT = 16 rows per tile, U = units (output columns, both experts' for MoE) per tile.
//
// Tile machinery (linear_tile): 4 warps; the A tile (16 rows x K, bf16, row stride K_max + 8) is built in
// shared memory by a phase-specific prologue (LayerNorm, copy, attention output or im2col) while the first
// chunks of the weight tile stream in (cp.async, 64-wide K chunks, 3 stages); warp w owns units
// [w*U/4, (w+1)*U/4) and runs mma.sync m16n8k16 (bf16 in, f32 accumulation) on fragments read from shared
// memory with 32-bit loads (row strides = 4 words mod 32: conflict-free). The accumulators go to shared memory
// (Cs) and a phase-specific epilogue walks the tile element by element (bias, MoE choice and gate, GELU,
// residual, stores).
//
// Reads of activations written earlier in the same launch go through L2 (__ldcg / cp.async.cg), never the
// non-coherent read-only path; grid.sync() orders them.
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "ops/cuda/ops.h"
#include "ops/cuda/vit_fused.h"

namespace sav::cuda {

namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 128;
constexpr int kRT = 16;         // rows per tile
constexpr int kKC = 64;         // K chunk
constexpr int kWld = kKC + 8;   // weight-stage row stride (bf16): 36 words = 4 mod 32
constexpr int kRingRows = 768;  // weight ring: 768 unit-rows of one 64-wide K chunk (110 KB); a tile of U units
                                // has kRingRows / U chunk slots (DeiT-Tiny: every tile's whole K fits)
constexpr int kMaxUnits = 192;
constexpr int kCld = kMaxUnits + 4;  // accumulator tile row stride (f32)
constexpr int kD = 64;               // head size
constexpr int kTaps = 9;
constexpr int kMaxC = 768;
constexpr int kMaxK = 1536;
constexpr int kMaxBits = 64;
constexpr int kMaxM = 64;
constexpr int kChunk = 16;  // tokens per phase-2 item
constexpr float kNormEps = 1e-6f;
constexpr float kSigmaMin = 1e-12f;
constexpr float kInvPi = 0.318309886183790671538f;
constexpr unsigned kFull = 0xffffffffu;

struct Smem {
  size_t as, ws, cs, wr, xs, xres, bias, u, misc, total;
};

// misc region: router expert (16 int) and gate (16 float), qq (16 float), sigma, ticket flag
constexpr size_t kMiscBytes = 256;
constexpr int kAtLd = kD + 4;  // anchor rows in shared memory: 68 floats (16-byte rows, 4 banks apart)

inline size_t align16(size_t x) { return (x + 15) / 16 * 16; }
__host__ __device__ __forceinline__ int round_up4(int x) { return (x + 3) & ~3; }

int kmax_of(const FusedVitDims& d) { return std::max({d.C, d.F, d.Cin * d.patch * d.patch}); }

// Phase scratch (the U region, one layout per phase; byte sizes, every part a multiple of 16 bytes):
//   1: anchors (m, 68) f32, |a|^2 (m4), D (16, m)
//   2: D -> k (16, m4), v (16, d) bf16, A (b*m rounded to 4), mu (m4), codes (16) u64, 4 doubles
//   3: KV of two images (2, H, b, d) f32, v rows with a 4-row halo (24, C) bf16, codes (16, H) u64
__host__ __device__ __forceinline__ size_t scratch_p1(int m) {
  return (size_t(m) * kAtLd + round_up4(m) + size_t(kRT) * round_up4(m)) * sizeof(float);
}
__host__ __device__ __forceinline__ size_t scratch_p2(int m, int nb) {
  return size_t(kRT) * round_up4(m) * 4 + kRT * kD * 2 + size_t(round_up4(nb * m)) * 4 + round_up4(m) * 4 + kRT * 8 +
         32;
}
__host__ __device__ __forceinline__ size_t scratch_p3(int C, int H, int nb) {
  return size_t(2) * H * nb * kD * 4 + size_t(kRT + 8) * C * 2 + size_t(kRT) * H * 8;
}

Smem smem_layout(const FusedVitDims& d) {
  Smem s{};
  const int kmax = kmax_of(d), lda = kmax + 8;
  size_t o = 0;
  s.as = o, o = align16(o + size_t(kRT) * lda * sizeof(bf16));
  s.ws = o, o = align16(o + size_t(kRingRows) * kWld * sizeof(bf16));
  s.cs = o, o = align16(o + size_t(kRT) * kCld * sizeof(float));
  s.wr = o, o = align16(o + size_t(2) * kmax * sizeof(float));  // MoE router weights (2, K)
  s.xs = o, o = align16(o + size_t(kRT) * d.C * sizeof(float));
  s.xres = o, o = align16(o + size_t(kRT) * 64 * sizeof(float));  // residual tile (16, <= 64 columns)
  s.bias = o, o = align16(o + size_t(kMaxUnits) * sizeof(float));
  s.u = o, o = align16(o + std::max({scratch_p1(d.m), scratch_p2(d.m, d.nbits), scratch_p3(d.C, d.H, d.nbits)}));
  s.misc = o, o = align16(o + kMiscBytes);
  s.total = o;
  return s;
}

struct KParams {
  FusedVitModel m;
  int B, M, lda, nch;
  const float* images;
  float* logits;
  float* x;
  bf16* qkv;
  bf16* hid;
  float* dist;
  double* rowsum;
  unsigned long long* codes;
  float* kvp;
  float* kv;
  unsigned* tickets;
  unsigned long long* trace;  // nullable: phase timestamps (vit_fused_trace)
  unsigned o_as, o_ws, o_cs, o_wr, o_xs, o_xres, o_bias, o_u, o_misc;
};

// ---------------------------------------------------------------------------------------------------------
// small device helpers

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ uint32_t lds32(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
// cuBLASLt's GELU epilogue (the tanh form), which the layered path uses for dense fc1 layers
__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// ---------------------------------------------------------------------------------------------------------
// the tile product

struct TileSmem {
  bf16* As;
  bf16* Ws;
  float* Cs;
  float* Wr;    // (2, K) router weights of a MoE tile
  float* Xs;    // (16, C or Cin*p*p) f32 staging of the prologues
  float* Xres;  // (16, 64) residual tile
  float* bias;  // (U) the tile's biases
  unsigned char* U;
  int* rexp;
  float* rgate;
  float* misc;  // 16 floats after rexp / rgate: qq; then sigma etc.
};

__device__ __forceinline__ TileSmem tile_smem(const KParams& p) {
  extern __shared__ __align__(16) unsigned char smem[];
  TileSmem t;
  t.As = reinterpret_cast<bf16*>(smem + p.o_as);
  t.Ws = reinterpret_cast<bf16*>(smem + p.o_ws);
  t.Cs = reinterpret_cast<float*>(smem + p.o_cs);
  t.Wr = reinterpret_cast<float*>(smem + p.o_wr);
  t.Xs = reinterpret_cast<float*>(smem + p.o_xs);
  t.Xres = reinterpret_cast<float*>(smem + p.o_xres);
  t.bias = reinterpret_cast<float*>(smem + p.o_bias);
  t.U = smem + p.o_u;
  t.rexp = reinterpret_cast<int*>(smem + p.o_misc);
  t.rgate = reinterpret_cast<float*>(smem + p.o_misc + 64);
  t.misc = reinterpret_cast<float*>(smem + p.o_misc + 128);
  return t;
}

// `rows` rows of row_bytes (a multiple of 16; 16-byte aligned rows) from global memory to shared memory by
// cp.async: all issued at once (the caller commits and waits).
__device__ __forceinline__ void cp_rows(void* dst, int dst_stride, const void* src, size_t src_stride, int rows,
                                        int row_bytes) {
  const int segs = row_bytes / 16;
  for (int e = threadIdx.x; e < rows * segs; e += kThreads) {
    const int r = e / segs, c = e - r * segs;
    cp_async16(static_cast<unsigned char*>(dst) + size_t(r) * dst_stride + c * 16,
               static_cast<const unsigned char*>(src) + r * src_stride + c * 16);
  }
}

// n floats from global (read-only) to shared memory, loads batched 4 per thread before the stores.
__device__ __forceinline__ void stage_scalar(float* dst, const float* src, int n) {
  for (int base = 0; base < n; base += 4 * kThreads) {
    float v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int i = base + k * kThreads + threadIdx.x;
      v[k] = i < n ? __ldg(src + i) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int i = base + k * kThreads + threadIdx.x;
      if (i < n) dst[i] = v[k];
    }
  }
}

// Chunk ch of a tile's weights into ring slot ch % S (S = kRingRows / U): units [0, Uh) are rows c0.. of w0,
// [Uh, U) rows c0.. of w1 (MoE).
__device__ __forceinline__ void issue_w(bf16* Ws, const FusedLinear& L, int U, int c0, int ch) {
  const int Uh = L.moe ? U / 2 : U, K = L.K, S = kRingRows / U;
  bf16* dst = Ws + (ch % S) * U * kWld;
  for (int e = threadIdx.x; e < U * 8; e += kThreads) {
    const int u = e >> 3, seg = e & 7;
    const bf16* src = (u < Uh ? L.w0 + size_t(c0 + u) * K : L.w1 + size_t(c0 + u - Uh) * K) + ch * kKC + seg * 8;
    cp_async16(dst + u * kWld + seg * 8, src);
  }
}

// The weight-only part of a tile, issued before its inputs exist (before the grid barrier that ends the previous
// phase, when the tile is this CTA's first of the next phase): the first min(S, K/64) chunks and the router's
// weights, one commit group. The ring and Wr must be idle (the previous tile has ended).
__device__ void prefetch_tile(const TileSmem& sm, const FusedLinear& L, int U, int c0) {
  const int nch = L.K / kKC, P = min(kRingRows / U, nch);
  if (L.moe) cp_rows(sm.Wr, 0, L.wr, 0, 1, 2 * L.K * 4);
  for (int ch = 0; ch < P; ++ch) issue_w(sm.Ws, L, U, c0, ch);
  cp_async_commit();
}

// One tile: Cs (16 x U) = A (16 x K, built by `build` into As) x W^T for the tile's U units, then `epi(r, c,
// val, res)` for each of the 16 x Uh output elements (val: bias added; MoE: the chosen expert's, gated; res: the
// staged resid[r * C + c0 + c] when `resid` (the tile's first row of a (rows, C) f32 array) is given, else 0). `build`
// stages its inputs by cp.async, waits for all of them (cp_async_wait<0>) and writes As; the weight chunks, the router
// weights and the residual tile are in flight meanwhile. Ends with a __syncthreads (shared memory free for the next
// tile).
template <int NFW, class Build, class Epi>
__device__ void linear_tile(const KParams& p, const TileSmem& sm, const FusedLinear& L, int r0, int c0, int rows,
                            const float* resid, bool prefetched, Build build, Epi epi) {
  constexpr int U = 32 * NFW;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int K = L.K, Uh = L.moe ? U / 2 : U, nch = K / kKC, lda = p.lda, C = p.m.dims.C;
  const int S = kRingRows / U, P = min(S, nch);  // chunks issued up front (all of them when they fit)
  const int nrows = max(0, min(kRT, rows - r0));
  if (!prefetched) prefetch_tile(sm, L, U, c0);
  if (resid) cp_rows(sm.Xres, 64 * 4, resid + c0, size_t(C) * 4, nrows, Uh * 4);  // committed by build
  float bias[2] = {0.0f, 0.0f};  // units tid, tid + 128: loaded now, stored to shared memory after the prologue
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int u = tid + i * kThreads;
    if (u >= U) continue;
    if (L.moe)
      bias[i] = __ldg((u < Uh ? L.b32 : L.b1) + c0 + (u < Uh ? u : u - Uh));
    else if (L.b16)
      bias[i] = __bfloat162float(L.b16[c0 + u]);
    else if (L.b32)
      bias[i] = __ldg(L.b32 + c0 + u);
  }
  build();
#pragma unroll
  for (int i = 0; i < 2; ++i)
    if (tid + i * kThreads < U) sm.bias[tid + i * kThreads] = bias[i];
  __syncthreads();
  if (L.moe) {  // router: warp w takes rows 4w .. 4w+3 together; f32 weights, the bf16 inputs of the product
    const float br0 = __ldg(L.br), br1 = __ldg(L.br + 1);
    float s0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const bf16* a = sm.As + warp * 4 * lda;
    for (int k = lane; k < K; k += 32) {
      const float w0 = sm.Wr[k], w1 = sm.Wr[K + k];
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        const float x = __bfloat162float(a[rr * lda + k]);
        s0[rr] = fmaf(x, w0, s0[rr]);
        s1[rr] = fmaf(x, w1, s1[rr]);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        s0[rr] += __shfl_xor_sync(kFull, s0[rr], o);
        s1[rr] += __shfl_xor_sync(kFull, s1[rr], o);
      }
    if (lane < 4) {
      const int rr = lane, r = warp * 4 + rr;
      {
        const float t0 = rr == 0 ? s0[0] : rr == 1 ? s0[1] : rr == 2 ? s0[2] : s0[3];
        const float t1 = rr == 0 ? s1[0] : rr == 1 ? s1[1] : rr == 2 ? s1[2] : s1[3];
        const float l0 = t0 + br0, l1 = t1 + br1;
        const int e = l1 > l0 ? 1 : 0;  // ties (and NaN) -> the mult expert, as the CPU
        sm.rexp[r] = e;
        sm.rgate[r] = p.m.gate == moe_gate_prob ? 1.0f / (1.0f + expf(e ? l0 - l1 : l1 - l0)) : 1.0f;
        if (c0 == 0 && L.choice && r < nrows) L.choice[r0 + r] = static_cast<int8_t>(e);
      }
    }
  }
  float acc[NFW][4];
#pragma unroll
  for (int f = 0; f < NFW; ++f) acc[f][0] = acc[f][1] = acc[f][2] = acc[f][3] = 0.0f;
  const int g = lane >> 2, t2 = (lane & 3) * 2;
  const bf16* a_lo = sm.As + g * lda + t2;
  const bf16* a_hi = a_lo + 8 * lda;
  // Chunks [0, P) completed in build (cp_async_wait<0>); when the whole K fits the ring (P == nch) no slot is
  // reused and the loop needs no barrier. Else chunk ch >= S streams into slot ch % S after chunk ch - S.
  for (int ch = 0; ch < nch; ++ch) {
    if (P < nch) {
      if (ch >= 1 && ch - 1 + S < nch) issue_w(sm.Ws, L, U, c0, ch - 1 + S);
      cp_async_commit();
      if (ch >= P) cp_async_wait<0>();
      __syncthreads();
    }
    const bf16* wst = sm.Ws + (ch % S) * U * kWld + (warp * NFW * 8 + g) * kWld + t2;
#pragma unroll
    for (int kk = 0; kk < kKC; kk += 16) {
      const int ka = ch * kKC + kk;
      const uint32_t a0 = lds32(a_lo + ka), a1 = lds32(a_hi + ka), a2 = lds32(a_lo + ka + 8), a3 = lds32(a_hi + ka + 8);
#pragma unroll
      for (int f = 0; f < NFW; ++f) {
        const bf16* w = wst + f * 8 * kWld + kk;
        mma_bf16(acc[f], a0, a1, a2, a3, lds32(w), lds32(w + 8));
      }
    }
    if (P < nch) __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < NFW; ++f) {
    const int u = warp * NFW * 8 + f * 8 + t2;
    sm.Cs[g * kCld + u] = acc[f][0];
    sm.Cs[g * kCld + u + 1] = acc[f][1];
    sm.Cs[(g + 8) * kCld + u] = acc[f][2];
    sm.Cs[(g + 8) * kCld + u + 1] = acc[f][3];
  }
  __syncthreads();
  for (int e = tid; e < nrows * Uh; e += kThreads) {
    const int r = e / Uh, c = e - r * Uh;
    float val;
    if (L.moe) {
      const int x = sm.rexp[r];
      val = (sm.Cs[r * kCld + c + x * Uh] + sm.bias[c + x * Uh]) * sm.rgate[r];
    } else {
      val = sm.Cs[r * kCld + c] + sm.bias[c];
    }
    epi(r, c, val, resid ? sm.Xres[r * 64 + c] : 0.0f);
  }
  __syncthreads();
}

// Runs linear_tile with the warp layout of the layer: dense / shift NFW_DENSE fragments per warp, MoE twice
// as many (both experts over the same output columns).
template <int NFW_DENSE, class Build, class Epi>
__device__ __forceinline__ void run_tile(const KParams& p, const TileSmem& sm, const FusedLinear& L, int r0, int c0,
                                         const float* resid, bool prefetched, Build build, Epi epi) {
  if (L.moe)
    linear_tile<2 * NFW_DENSE>(p, sm, L, r0, c0, p.M, resid, prefetched, build, epi);
  else
    linear_tile<NFW_DENSE>(p, sm, L, r0, c0, p.M, resid, prefetched, build, epi);
}

// ---------------------------------------------------------------------------------------------------------
// A-tile prologues (each: stage by cp.async, wait for everything in flight, compute As)

// As rows = LayerNorm(x rows r0..r0+15) in bf16 (zeros past M); warp w takes rows w, w+4, w+8, w+12; two-pass
// f32 statistics as layernorm_forward.
__device__ void build_ln(const KParams& p, const TileSmem& sm, int r0, const float* w, const float* b) {
  constexpr int kPer = kMaxC / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, C = p.m.dims.C;
  const int nrows = max(0, min(kRT, p.M - r0));
  cp_rows(sm.Xs, C * 4, p.x + size_t(r0) * C, size_t(C) * 4, nrows, C * 4);
  cp_async_commit();
  float wv[kPer], bv[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int c = lane + 32 * k;
    wv[k] = c < C ? __ldg(w + c) : 0.0f;
    bv[k] = c < C ? __ldg(b + c) : 0.0f;
  }
  cp_async_wait<0>();
  __syncthreads();
  for (int rr = warp; rr < kRT; rr += 4) {
    bf16* dst = sm.As + rr * p.lda;
    if (rr >= nrows) {
      for (int c = lane; c < C; c += 32) dst[c] = __float2bfloat16_rn(0.0f);
      continue;
    }
    const float* xr = sm.Xs + rr * C;
    float v[kPer];
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int c = lane + 32 * k;
      v[k] = c < C ? xr[c] : 0.0f;
      s += v[k];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
    const float mean = s / C;
    float q = 0.0f;
#pragma unroll
    for (int k = 0; k < kPer; ++k)
      if (lane + 32 * k < C) q = fmaf(v[k] - mean, v[k] - mean, q);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(kFull, q, o);
    const float rstd = rsqrtf(q / C + p.m.dims.eps);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int c = lane + 32 * k;
      if (c < C) dst[c] = __float2bfloat16_rn((v[k] - mean) * rstd * wv[k] + bv[k]);
    }
  }
}

// As rows = src rows r0..r0+15 (bf16, K columns, row stride ld), zeros past M.
__device__ void build_copy(const KParams& p, const TileSmem& sm, int r0, const bf16* src, int K, int ld) {
  const int nrows = max(0, min(kRT, p.M - r0));
  cp_rows(sm.As, p.lda * 2, src + size_t(r0) * ld, size_t(ld) * 2, nrows, K * 2);
  cp_async_commit();
  for (int e = threadIdx.x; e < (kRT - nrows) * (K / 8); e += kThreads) {
    const int r = nrows + e / (K / 8), s = e % (K / 8);
    *reinterpret_cast<uint4*>(sm.As + r * p.lda + s * 8) = make_uint4(0u, 0u, 0u, 0u);
  }
  cp_async_wait<0>();
}

// As rows = im2col of patches r0..min(r0+16, rows)-1 (patch row b*P + py*G + px; columns ci*p*p + ky*p + kx),
// bf16; float4 loads 8 at a time per thread before their conversions.
__device__ void build_patches(const KParams& p, const TileSmem& sm, int r0, int rows) {
  const FusedVitDims& d = p.m.dims;
  const int ps = d.patch, G = d.S / ps, P = G * G, q4 = ps / 4;
  const int nrows = max(0, min(kRT, rows - r0)), per_row = d.Cin * ps * q4, total = kRT * per_row;
  for (int base = 0; base < total; base += 8 * kThreads) {
    float4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int e = base + u * kThreads + threadIdx.x, r = e / per_row;
      v[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (e < total && r < nrows) {
        const int s = e - r * per_row, q = s % q4, ck = s / q4, ci = ck / ps, ky = ck - ci * ps;
        const int pr = r0 + r, b = pr / P, pp = pr - b * P, py = pp / G, px = pp - py * G;
        v[u] = __ldg(reinterpret_cast<const float4*>(p.images + ((size_t(b) * d.Cin + ci) * d.S + py * ps + ky) * d.S +
                                                     px * ps + q * 4));
      }
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int e = base + u * kThreads + threadIdx.x;
      if (e >= total) continue;
      const int r = e / per_row, s = e - r * per_row;  // s * 4 = ci*p*p + ky*p + q*4
      __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(sm.As + r * p.lda + s * 4);
      dst[0] = __floats2bfloat162_rn(v[u].x, v[u].y);
      dst[1] = __floats2bfloat162_rn(v[u].z, v[u].w);
    }
  }
  cp_async_wait<0>();  // the tile's weights (build is where linear_tile waits for them)
}

// As rows = the Hamming attention output of rows r0..r0+15, all heads (bf16):
//   z = (sum over set bits r, ascending, of KV_r) + 0.5 v;  out = z / max(|z|, eps) + sum_t conv_t v_{n+t-4}
// Staged first: KV of the (at most two) images of the tile, the v rows of the tile with a 4-row halo, the codes.
// Thread task = (row, head, 8 columns); the 8 tasks of a (row, head) are 8 aligned lanes (norm by shuffles).
__device__ void build_attention(const KParams& p, const TileSmem& sm, const FusedBlock& blk, int r0) {
  const FusedVitDims& d = p.m.dims;
  const int N = d.N, C = d.C, H = d.H, nb = d.nbits, C2 = 2 * C, tid = threadIdx.x;
  const int nrows = max(0, min(kRT, p.M - r0));
  const int b_lo = r0 / N, b_hi = (r0 + nrows - 1) / N, per_img = H * nb * kD;
  float* KVs = reinterpret_cast<float*>(sm.U);                                         // (2, H, nb, d)
  bf16* Vh = reinterpret_cast<bf16*>(KVs + 2 * per_img);                               // (24, C): rows r0-4 ..
  unsigned long long* cd = reinterpret_cast<unsigned long long*>(Vh + (kRT + 8) * C);  // (16, H)
  cp_rows(KVs, 0, p.kv + size_t(b_lo) * per_img, 0, 1, (b_hi - b_lo + 1) * per_img * 4);
  const int g0 = max(0, r0 - 4), g1 = min(p.M, r0 + nrows + 4);
  cp_rows(Vh + (g0 - (r0 - 4)) * C, C * 2, p.qkv + size_t(g0) * C2 + C, size_t(C2) * 2, g1 - g0, C * 2);
  cp_async_commit();
  for (int e = tid; e < nrows * H; e += kThreads) {
    const int r = e / H, h = e - r * H, row = r0 + r, b = row / N;
    cd[e] = __ldcg(p.codes + (size_t(b) * H + h) * N + (row - b * N));
  }
  cp_async_wait<0>();
  __syncthreads();
  const int tasks = kRT * H * 8;  // a multiple of kThreads: uniform loop, full-mask shuffles
  for (int e = tid; e < tasks; e += kThreads) {
    const int r = e / (H * 8), h = (e >> 3) % H, g8 = e & 7;
    const bool valid = r < nrows;
    const int row = r0 + r, b = valid ? row / N : b_lo, n = valid ? row - b * N : 0;
    const int col = h * kD + g8 * 8;
    float v[8], z[8];
    const bf16* vr = Vh + (r + 4) * C + col;
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = valid ? __bfloat162float(vr[i]) : 0.0f, z[i] = 0.0f;
    unsigned long long code = valid ? cd[r * H + h] : 0ull;
    const float* kvh = KVs + size_t(b - b_lo) * per_img + size_t(h) * nb * kD + g8 * 8;
    while (code) {
      const int rb = __ffsll(static_cast<long long>(code)) - 1;
      code &= code - 1;
      const float4 k0 = *reinterpret_cast<const float4*>(kvh + rb * kD);
      const float4 k1 = *reinterpret_cast<const float4*>(kvh + rb * kD + 4);
      z[0] += k0.x, z[1] += k0.y, z[2] += k0.z, z[3] += k0.w;
      z[4] += k1.x, z[5] += k1.y, z[6] += k1.z, z[7] += k1.w;
    }
    double ss = 0.0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      z[i] += 0.5f * v[i];
      ss += double(z[i]) * z[i];
    }
    ss += __shfl_xor_sync(kFull, ss, 1);
    ss += __shfl_xor_sync(kFull, ss, 2);
    ss += __shfl_xor_sync(kFull, ss, 4);
    const float nrm = fmaxf(static_cast<float>(sqrt(ss)), kNormEps);
#pragma unroll
    for (int i = 0; i < 8; ++i) z[i] = z[i] / nrm;
#pragma unroll
    for (int t = 0; t < kTaps; ++t) {
      const int nn = n + t - kTaps / 2;
      if (!valid || nn < 0 || nn >= N) continue;
      const float w = __ldg(blk.conv + h * kTaps + t);
      const bf16* vt = Vh + (r + 4 + t - kTaps / 2) * C + col;
#pragma unroll
      for (int i = 0; i < 8; ++i) z[i] = fmaf(w, __bfloat162float(vt[i]), z[i]);
    }
    __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(sm.As + r * p.lda + col);
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[i] = __floats2bfloat162_rn(valid ? z[2 * i] : 0.0f, valid ? z[2 * i + 1] : 0.0f);
  }
}

// ---------------------------------------------------------------------------------------------------------
// KSH pieces

// Phase-1 prologue of a to_qk tile of head h: the head's anchors (m, d) into rows of kAtLd floats (cp.async;
// the following build waits for it).
__device__ void stage_anchors(const KParams& p, const TileSmem& sm, const FusedBlock& blk, int h) {
  const int m = p.m.dims.m;
  cp_rows(sm.U, kAtLd * 4, blk.anchors + size_t(h) * m * kD, kD * 4, m, kD * 4);
  cp_async_commit();
}

// Phase 1, after the epilogue of a to_qk tile (rows r0.., head h) left the bf16-rounded q values in Cs:
// q = x / max(|x|, eps) (norm in double, as the CPU), D_nj = max(|q|^2 + |a_j|^2 - 2 q.a_j, 0) into p.dist
// (rows of m4) and each row's sum of D (double, j ascending) into p.rowsum.
__device__ void hash_prepare(const KParams& p, const TileSmem& sm, int r0, int h) {
  const FusedVitDims& d = p.m.dims;
  const int m = d.m, m4 = round_up4(m), N = d.N, H = d.H, tid = threadIdx.x;
  const float* At = reinterpret_cast<const float*>(sm.U);  // (m, kAtLd)
  float* aa = reinterpret_cast<float*>(sm.U) + m * kAtLd;
  float* Ds = aa + m4;
  float* qq = sm.misc;
  {
    const int r = tid >> 3, g8 = tid & 7;  // 16 rows x 8 column groups = kThreads tasks
    float* q = sm.Cs + r * kCld + g8 * 8;
    double ss = 0.0;
#pragma unroll
    for (int i = 0; i < 8; ++i) ss += double(q[i]) * q[i];
    ss += __shfl_xor_sync(kFull, ss, 1);
    ss += __shfl_xor_sync(kFull, ss, 2);
    ss += __shfl_xor_sync(kFull, ss, 4);
    const float nrm = fmaxf(static_cast<float>(sqrt(ss)), kNormEps);
    float q2 = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      q[i] = q[i] / nrm;
      q2 = fmaf(q[i], q[i], q2);
    }
    q2 += __shfl_xor_sync(kFull, q2, 1);
    q2 += __shfl_xor_sync(kFull, q2, 2);
    q2 += __shfl_xor_sync(kFull, q2, 4);
    if (g8 == 0) qq[r] = q2;
  }
  for (int j = tid; j < m; j += kThreads) {
    float s = 0.0f;
#pragma unroll 8
    for (int i = 0; i < kD; ++i) s = fmaf(At[j * kAtLd + i], At[j * kAtLd + i], s);
    aa[j] = s;
  }
  __syncthreads();
  const int nrows = max(0, min(kRT, p.M - r0));
  for (int e = tid; e < kRT * m; e += kThreads) {
    const int r = e / m, j = e - r * m;
    const float* q = sm.Cs + r * kCld;
    const float* a = At + j * kAtLd;
    float d4[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // four interleaved partial sums (a short dependency chain)
#pragma unroll 16
    for (int i = 0; i < kD; ++i) d4[i & 3] = fmaf(q[i], a[i], d4[i & 3]);
    const float dot = (d4[0] + d4[1]) + (d4[2] + d4[3]);
    const float D = fmaxf(qq[r] + aa[j] - 2.0f * dot, 0.0f);
    Ds[r * m + j] = D;
    if (r < nrows) {
      const int row = r0 + r, b = row / N, n = row - b * N;
      p.dist[((size_t(b) * H + h) * N + n) * m4 + j] = D;
    }
  }
  __syncthreads();
  if (tid < nrows) {
    const int row = r0 + tid, b = row / N, n = row - b * N;
    double s = 0.0;
    for (int j = 0; j < m; ++j) s += Ds[tid * m + j];
    p.rowsum[(size_t(b) * H + h) * N + n] = s;
  }
  __syncthreads();
}

// Phase 2 item (image b, head h, tokens [c*16, c*16+16)): sigma, k, y, codes, the chunk's MatAdd #1 partial;
// the head's last chunk to finish reduces the partials in chunk order into KV (scaled by 1/pi).
__device__ void hash_codes(const KParams& p, const TileSmem& sm, const FusedBlock& blk, int b, int h, int c) {
  const FusedVitDims& d = p.m.dims;
  const int N = d.N, H = d.H, m = d.m, m4 = round_up4(m), nb = d.nbits, C = d.C, tid = threadIdx.x, nch = p.nch;
  const int lane = tid & 31, warp = tid >> 5;
  const int base = b * H + h, n0 = c * kChunk, cnt = min(kChunk, N - n0);
  float* Ks = reinterpret_cast<float*>(sm.U);                                // (16, m4): D, then k
  bf16* Vs = reinterpret_cast<bf16*>(Ks + kRT * m4);                         // (16, d)
  float* As = reinterpret_cast<float*>(Vs + kRT * kD);                       // (b, m)
  float* mus = As + round_up4(nb * m);                                       // (m)
  unsigned long long* cs = reinterpret_cast<unsigned long long*>(mus + m4);  // (16)
  double* red = reinterpret_cast<double*>(cs + kRT);                         // (4)
  cp_rows(Ks, 0, p.dist + (size_t(base) * N + n0) * m4, 0, 1, cnt * m4 * 4);
  cp_rows(Vs, kD * 2, p.qkv + (size_t(b) * N + n0) * 2 * C + C + h * kD, size_t(2 * C) * 2, cnt, kD * 2);
  cp_async_commit();
  stage_scalar(As, blk.A + size_t(h) * nb * m, nb * m);
  if (tid < m) mus[tid] = __ldg(blk.mu + h * m + tid);
  if (tid < kRT) cs[tid] = 0ull;
  double s = 0.0;
  for (int n = tid; n < N; n += kThreads) s += __ldcg(p.rowsum + size_t(base) * N + n);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
  if (lane == 0) red[warp] = s;
  cp_async_wait<0>();
  __syncthreads();
  const double tot = (red[0] + red[1]) + (red[2] + red[3]);
  const float two_sigma = 2.0f * fmaxf(static_cast<float>(tot / (double(N) * m)), kSigmaMin);
  for (int e = tid; e < cnt * m; e += kThreads) {
    const int tn = e / m, j = e - tn * m;
    Ks[tn * m4 + j] = expf(-Ks[tn * m4 + j] / two_sigma) - mus[j];
  }
  __syncthreads();
  for (int e = tid; e < cnt * nb; e += kThreads) {
    const int tn = e / nb, r = e - tn * nb;
    const float* Ar = As + r * m;
    const float* k = Ks + tn * m4;
    float y = 0.0f;
    for (int j = 0; j < m; ++j) y = fmaf(Ar[j], k[j], y);
    if (y > 0.0f) atomicOr(cs + tn, 1ull << r);
  }
  __syncthreads();
  if (tid < cnt) p.codes[size_t(base) * N + n0 + tid] = cs[tid];
  float* part = p.kvp + (size_t(base) * nch + c) * nb * kD;
  for (int e = tid; e < nb * (kD / 8); e += kThreads) {
    const int r = e / (kD / 8), q8 = e - r * (kD / 8);
    float a[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int tn = 0; tn < cnt; ++tn) {
      if (!((cs[tn] >> r) & 1ull)) continue;
      const bf16* v = Vs + tn * kD + q8 * 8;
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] += __bfloat162float(v[i]);
    }
    float4* o = reinterpret_cast<float4*>(part + r * kD + q8 * 8);
    o[0] = make_float4(a[0], a[1], a[2], a[3]);
    o[1] = make_float4(a[4], a[5], a[6], a[7]);
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) sm.misc[1] = atomicAdd(p.tickets + base, 1u) == unsigned(nch - 1) ? 1.0f : 0.0f;
  __syncthreads();
  if (sm.misc[1] != 0.0f) {
    __threadfence();
    // every chunk's partial into the (idle) weight ring at once (vit_fused_supports checks it fits), summed in
    // chunk order
    float* parts = reinterpret_cast<float*>(sm.Ws);
    cp_rows(parts, 0, p.kvp + size_t(base) * nch * nb * kD, 0, 1, nch * nb * kD * 4);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    for (int e = tid; e < nb * kD; e += kThreads) {
      float t = 0.0f;
      for (int k = 0; k < nch; ++k) t += parts[size_t(k) * nb * kD + e];
      p.kv[size_t(base) * nb * kD + e] = t * kInvPi;
    }
    if (tid == 0) p.tickets[base] = 0u;  // every chunk of this head has arrived: ready for the next block
  }
  __syncthreads();
}

// One warp: dst (C, bf16) = LayerNorm(xr) with two-pass f32 statistics (layernorm_forward's).
__device__ __forceinline__ void ln_row_warp(bf16* dst, const float* xr, const float* w, const float* b, int C,
                                            float eps) {
  constexpr int kPer = kMaxC / 32;
  const int lane = threadIdx.x & 31;
  float v[kPer];
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int c = lane + 32 * k;
    v[k] = c < C ? __ldcg(xr + c) : 0.0f;
    s += v[k];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
  const float mean = s / C;
  float q = 0.0f;
#pragma unroll
  for (int k = 0; k < kPer; ++k)
    if (lane + 32 * k < C) q = fmaf(v[k] - mean, v[k] - mean, q);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(kFull, q, o);
  const float rstd = rsqrtf(q / C + eps);
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int c = lane + 32 * k;
    if (c < C) dst[c] = __float2bfloat16_rn((v[k] - mean) * rstd * __ldg(w + c) + __ldg(b + c));
  }
}

// ---------------------------------------------------------------------------------------------------------
// the kernel

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void __launch_bounds__(kThreads) vit_fused_kernel(const __grid_constant__ KParams p) {
  cg::grid_group grid = cg::this_grid();
  const TileSmem sm = tile_smem(p);
  const FusedVitDims& d = p.m.dims;
  const int N = d.N, C = d.C, H = d.H, F = d.F, M = p.M, RT = (M + kRT - 1) / kRT, tid = threadIdx.x;
  // trace (vit_fused_trace): per phase, each CTA's time at the end of its work, then CTA 0's after the barrier
  int phase = 0;
  const unsigned stride = gridDim.x + 1;
  auto barrier = [&] {
    if (p.trace) {
      __syncthreads();
      if (tid == 0) p.trace[phase * stride + blockIdx.x] = global_ns();
    }
    grid.sync();
    if (p.trace && blockIdx.x == 0 && tid == 0) p.trace[phase * stride + gridDim.x] = global_ns();
    ++phase;
  };
  if (p.trace && blockIdx.x == 0 && tid == 0) p.trace[size_t(1 + 5 * d.depth + 1) * stride] = global_ns();

  // Tile decompositions of the product phases (tile t of a phase; t = blockIdx.x is a CTA's first tile, whose
  // weights are prefetched before the barrier that opens the phase). RT row tiles of 16 token rows.
  const int hc = C / 64;                 // phase 1: column tiles of 64 per C-wide half (= heads)
  const int c4 = F % 96 == 0 ? 96 : 64;  // phase 4: columns per fc1 tile
  const int ps = d.patch, P = (d.S / ps) * (d.S / ps), tpi = (P + kRT - 1) / kRT;  // E: tiles per image
  auto units = [](const FusedLinear& L, int cols) { return L.moe ? 2 * cols : cols; };
  auto qkv_tile = [&](const FusedBlock& blk, int t, const FusedLinear*& L, int& c0) {  // returns the column tile
    const int ct = t / RT;
    const bool stacked = blk.v.F == 0, is_v = ct >= hc;
    L = stacked ? &blk.qk : (is_v ? &blk.v : &blk.qk);
    c0 = stacked ? ct * 64 : (ct % hc) * 64;
    return ct;
  };
  // the weights of this CTA's first tile of the phase `next` of block l (1: qkv, 3: proj, 4: fc1, 5: fc2)
  auto prefetch = [&](int l, int next) {
    if (l >= d.depth) return;
    const FusedBlock& blk = p.m.blocks[l];
    const int t = blockIdx.x;
    if (next == 1 && t < RT * 2 * hc) {
      const FusedLinear* L;
      int c0;
      qkv_tile(blk, t, L, c0);
      prefetch_tile(sm, *L, units(*L, 64), c0);
    } else if (next == 3 && t < RT * (C / 32)) {
      prefetch_tile(sm, blk.proj, units(blk.proj, 32), (t / RT) * 32);
    } else if (next == 4 && t < RT * (F / c4)) {
      prefetch_tile(sm, blk.fc1, units(blk.fc1, c4), (t / RT) * c4);
    } else if (next == 5 && t < RT * (C / 32)) {
      prefetch_tile(sm, blk.fc2, units(blk.fc2, 32), (t / RT) * 32);
    }
  };

  // ---- E: patches -> x (token rows b*N + 1 + patch), class rows cls + pos ----
  {
    // tiles of 16 patches within one image (the position rows are then contiguous: staged as the "residual")
    FusedLinear L;
    L.K = d.Cin * ps * ps, L.F = C, L.w0 = p.m.patch_w, L.b32 = p.m.patch_b;
    for (int t = blockIdx.x; t < p.B * tpi * (C / 64); t += gridDim.x) {
      const int bt = t % (p.B * tpi), b = bt / tpi, pp0 = (bt - b * tpi) * kRT, c0 = (t / (p.B * tpi)) * 64;
      const int r0 = b * P + pp0;
      linear_tile<2>(
          p, sm, L, r0, c0, (b + 1) * P, p.m.pos + size_t(1 + pp0) * C, false,
          [&] { build_patches(p, sm, r0, (b + 1) * P); },
          [&](int r, int c, float val, float pos) { p.x[(size_t(b) * N + 1 + pp0 + r) * C + c0 + c] = val + pos; });
    }
    if (blockIdx.x == gridDim.x - 1)
      for (int e = tid; e < p.B * C; e += kThreads) {
        const int b = e / C, c = e - b * C;
        p.x[size_t(b) * N * C + c] = __ldg(p.m.cls + c) + __ldg(p.m.pos + c);
      }
  }
  prefetch(0, 1);
  barrier();

  for (int l = 0; l < d.depth; ++l) {
    const FusedBlock& blk = p.m.blocks[l];
    // ---- 1: LN1 -> [to_qk | to_v] -> qkv (bf16); to_qk tiles also prepare the hash ----
    for (int t = blockIdx.x; t < RT * 2 * hc; t += gridDim.x) {
      const FusedLinear* L;
      int c0;
      const int r0 = (t % RT) * kRT, ct = qkv_tile(blk, t, L, c0), ocol = ct * 64;
      const bool is_v = ct >= hc;
      run_tile<2>(
          p, sm, *L, r0, c0, nullptr, t == int(blockIdx.x),
          [&] {
            if (!is_v) stage_anchors(p, sm, blk, ct);
            build_ln(p, sm, r0, blk.ln1_w, blk.ln1_b);
          },
          [&](int r, int c, float val, float) {
            const bf16 hv = __float2bfloat16_rn(val);
            p.qkv[size_t(r0 + r) * 2 * C + ocol + c] = hv;
            if (!is_v) sm.Cs[r * kCld + c] = __bfloat162float(hv);
          });
      if (!is_v) hash_prepare(p, sm, r0, ct);
    }
    barrier();
    // ---- 2: sigma, codes, KV ----
    for (int t = blockIdx.x; t < p.B * H * p.nch; t += gridDim.x) {
      const int c = t % p.nch, bh = t / p.nch;
      hash_codes(p, sm, blk, bh / H, bh % H, c);
    }
    prefetch(l, 3);
    barrier();
    // ---- 3: attention output -> proj + residual ----
    for (int t = blockIdx.x; t < RT * (C / 32); t += gridDim.x) {
      const int r0 = (t % RT) * kRT, c0 = (t / RT) * 32;
      run_tile<1>(
          p, sm, blk.proj, r0, c0, p.x + size_t(r0) * C, t == int(blockIdx.x), [&] { build_attention(p, sm, blk, r0); },
          [&](int r, int c, float val, float res) { p.x[size_t(r0 + r) * C + c0 + c] = res + val; });
    }
    prefetch(l, 4);
    barrier();
    // ---- 4: LN2 -> fc1 + GELU -> hid ----
    for (int t = blockIdx.x; t < RT * (F / c4); t += gridDim.x) {
      const int r0 = (t % RT) * kRT, c0 = (t / RT) * c4;
      const bool moe = blk.fc1.moe;
      auto build = [&] { build_ln(p, sm, r0, blk.ln2_w, blk.ln2_b); };
      auto epi = [&](int r, int c, float val, float) {
        p.hid[size_t(r0 + r) * F + c0 + c] = __float2bfloat16_rn(moe ? gelu_erf(val) : gelu_tanh(val));
      };
      if (c4 == 96)
        run_tile<3>(p, sm, blk.fc1, r0, c0, nullptr, t == int(blockIdx.x), build, epi);
      else
        run_tile<2>(p, sm, blk.fc1, r0, c0, nullptr, t == int(blockIdx.x), build, epi);
    }
    prefetch(l, 5);
    barrier();
    // ---- 5: fc2 + residual ----
    for (int t = blockIdx.x; t < RT * (C / 32); t += gridDim.x) {
      const int r0 = (t % RT) * kRT, c0 = (t / RT) * 32;
      run_tile<1>(
          p, sm, blk.fc2, r0, c0, p.x + size_t(r0) * C, t == int(blockIdx.x),
          [&] { build_copy(p, sm, r0, p.hid, F, F); },
          [&](int r, int c, float val, float res) { p.x[size_t(r0 + r) * C + c0 + c] = res + val; });
    }
    prefetch(l + 1, 1);
    barrier();
  }

  // ---- H: LayerNorm of the class rows, classifier (a warp per class) ----
  {
    bf16* cn = sm.As;  // (B, C)
    const int lane = tid & 31, warp = tid >> 5;
    for (int b = warp; b < p.B; b += kThreads / 32)
      ln_row_warp(cn + b * C, p.x + size_t(b) * N * C, p.m.norm_w, p.m.norm_b, C, d.eps);
    __syncthreads();
    for (int cls = blockIdx.x * (kThreads / 32) + warp; cls < d.V; cls += gridDim.x * (kThreads / 32)) {
      const bf16* w = p.m.head_w + size_t(cls) * C;
      float wv[kMaxC / 32];
#pragma unroll
      for (int i = 0; i < kMaxC / 32; ++i) wv[i] = lane + 32 * i < C ? __bfloat162float(w[lane + 32 * i]) : 0.0f;
      for (int b = 0; b < p.B; ++b) {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < kMaxC / 32; ++i)
          if (lane + 32 * i < C) s = fmaf(__bfloat162float(cn[b * C + lane + 32 * i]), wv[i], s);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
        if (lane == 0) p.logits[size_t(b) * d.V + cls] = s + __ldg(p.m.head_b + cls);
      }
    }
  }
  if (p.trace) {
    __syncthreads();
    if (tid == 0) p.trace[phase * stride + blockIdx.x] = global_ns();
  }
}

int g_last_grid = 0;

}  // namespace

bool vit_fused_supports(const FusedVitDims& d, int B) {
  const int Kp = d.Cin * d.patch * d.patch;
  if (!(B >= 1 && B <= kFusedMaxBatch && d.depth >= 1 && d.H >= 1 && d.C == d.H * kD && d.C <= kMaxC && d.F >= 64 &&
        d.F % 64 == 0 && Kp % 64 == 0 && kmax_of(d) <= kMaxK && d.nbits >= 1 && d.nbits <= kMaxBits && d.m >= 1 &&
        d.m <= kMaxM && d.N >= kRT && d.patch >= 4 && d.patch % 4 == 0 && d.S % d.patch == 0 && d.S % 4 == 0 &&
        d.N == (d.S / d.patch) * (d.S / d.patch) + 1 && d.V >= 1))
    return false;
  // phase 2's last chunk stages every chunk's KV partial in the weight ring
  const size_t nch = (d.N + kChunk - 1) / kChunk;
  if (nch * d.nbits * kD * sizeof(float) > size_t(kRingRows) * kWld * sizeof(bf16)) return false;
  if (device_available()) return smem_layout(d).total <= size_t(max_smem_per_block());
  return true;
}

void FusedVitWorkspace::ensure(const FusedVitDims& d, int capacity) {
  if (capacity <= capacity_) return;
  SAV_CUDA_CHECK(cudaDeviceSynchronize());  // launches in flight may still use the old buffers
  const size_t M = size_t(capacity) * d.N, BH = size_t(capacity) * d.H, nch = (d.N + kChunk - 1) / kChunk;
  x_.resize(M * d.C);
  qkv_.resize(M * 2 * d.C);
  hid_.resize(M * d.F);
  dist_.resize(BH * d.N * round_up4(d.m));
  rowsum_.resize(BH * d.N);
  codes_.resize(BH * d.N);
  kvp_.resize(BH * nch * d.nbits * kD);
  kv_.resize(BH * d.nbits * kD);
  tickets_.resize(BH);
  SAV_CUDA_CHECK(cudaMemset(tickets_.get(), 0, BH * sizeof(unsigned)));
  capacity_ = capacity;
}

void vit_fused_forward(const FusedVitModel& m, int B, const float* images, float* logits, FusedVitWorkspace& ws,
                       cudaStream_t stream, unsigned long long* trace) {
  SAV_CHECK(vit_fused_supports(m.dims, B),
            "vit_fused_forward: sizes outside the fused kernel (B=" << B << ", C=" << m.dims.C << ")");
  SAV_CHECK(images && logits && m.blocks && m.patch_w && m.head_w, "vit_fused_forward: null pointer");
  SAV_CHECK(ws.capacity() >= B, "vit_fused_forward: workspace for " << ws.capacity() << " images, batch " << B);
  const Smem L = smem_layout(m.dims);
  SAV_CUDA_CHECK(cudaFuncSetAttribute(vit_fused_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(L.total)));
  int per_sm = 0;
  SAV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, vit_fused_kernel, kThreads, L.total));
  SAV_CHECK(per_sm >= 1, "vit_fused_forward: the kernel does not fit on an SM (" << L.total << " B shared memory)");
  // CTAs per SM: at most 2 (more makes every barrier slower); SAV_FUSED_CTAS_PER_SM overrides (experiments)
  static const int want = [] {
    const char* e = std::getenv("SAV_FUSED_CTAS_PER_SM");
    return e && std::atoi(e) > 0 ? std::atoi(e) : 2;
  }();
  const int grid = std::min(per_sm, want) * sm_count();
  KParams kp{};
  kp.m = m;
  kp.B = B, kp.M = B * m.dims.N, kp.lda = kmax_of(m.dims) + 8, kp.nch = (m.dims.N + kChunk - 1) / kChunk;
  kp.images = images, kp.logits = logits;
  kp.x = ws.x_.get(), kp.qkv = ws.qkv_.get(), kp.hid = ws.hid_.get(), kp.dist = ws.dist_.get();
  kp.rowsum = ws.rowsum_.get(), kp.codes = ws.codes_.get(), kp.kvp = ws.kvp_.get(), kp.kv = ws.kv_.get();
  kp.tickets = ws.tickets_.get();
  kp.trace = trace;
  kp.o_as = unsigned(L.as), kp.o_ws = unsigned(L.ws), kp.o_cs = unsigned(L.cs), kp.o_u = unsigned(L.u);
  kp.o_wr = unsigned(L.wr), kp.o_xs = unsigned(L.xs), kp.o_xres = unsigned(L.xres), kp.o_bias = unsigned(L.bias);
  kp.o_misc = unsigned(L.misc);
  void* args[] = {&kp};
  SAV_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(vit_fused_kernel), dim3(grid),
                                             dim3(kThreads), args, L.total, stream));
  g_last_grid = grid;
}

int vit_fused_grid_ctas() { return g_last_grid; }

std::string vit_fused_trace(const FusedVitModel& m, int B, const float* images, float* logits, FusedVitWorkspace& ws,
                            cudaStream_t stream) {
  const int phases = 1 + 5 * m.dims.depth + 1;
  const size_t max_grid = size_t(4) * sm_count(), stride_max = max_grid + 1;
  DeviceBuffer<unsigned long long> tr(size_t(phases + 1) * stride_max);
  vit_fused_forward(m, B, images, logits, ws, stream, tr.get());
  SAV_CUDA_CHECK(cudaStreamSynchronize(stream));
  const int grid = g_last_grid;
  const size_t stride = size_t(grid) + 1;
  std::vector<unsigned long long> h(size_t(phases + 1) * stride);
  SAV_CUDA_CHECK(cudaMemcpy(h.data(), tr.get(), h.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  // per phase: work = last CTA's end - the previous barrier's exit (CTA 0); barrier = exit - last CTA's end
  const char* names[7] = {"E embed", "1 LN1+qk/v+D", "2 sigma/codes/KV", "3 attn+proj", "4 LN2+fc1", "5 fc2", "H head"};
  double work[7] = {0}, bar[7] = {0};
  int count[7] = {0};
  unsigned long long prev = h[size_t(phases) * stride];
  const unsigned long long start = prev;
  for (int ph = 0; ph < phases; ++ph) {
    unsigned long long last = 0;
    for (int c = 0; c < grid; ++c) last = std::max(last, h[ph * stride + c]);
    const int kind = ph == 0 ? 0 : ph == phases - 1 ? 6 : 1 + (ph - 1) % 5;
    work[kind] += double(last - prev) * 1e-3;
    const unsigned long long exit = ph == phases - 1 ? last : h[ph * stride + grid];
    bar[kind] += double(exit - last) * 1e-3;
    count[kind] += 1;
    prev = exit;
  }
  std::ostringstream os;
  os << "fused kernel trace (" << grid << " CTAs, batch " << B << ", total " << double(prev - start) * 1e-3
     << " us): per phase, us per occurrence (slowest CTA's work; barrier after it)\n";
  for (int k = 0; k < 7; ++k)
    if (count[k])
      os << "  " << names[k] << ": x" << count[k] << "  work " << work[k] / count[k] << "  barrier "
         << bar[k] / count[k] << "\n";
  return os.str();
}

}  // namespace sav::cuda
