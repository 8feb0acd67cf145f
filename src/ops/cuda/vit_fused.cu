// The ShiftAddViT forward at small batch as one persistent cooperative kernel. Spec, phases and limits:
// vit_fused.h. Legend there; RT = 16 rows per tile, U = units (output columns, both experts' for MoE) per tile.
//
// Tile machinery (linear_tile, tile_product): 16 warps; the A tile (16 rows x K, bf16, row stride K_max + 8) is
// built in shared memory by a phase-specific prologue (LayerNorm, copy, attention output or im2col) while the
// tile's weights arrive in a 110 KB ring (cp.async, 64-wide K chunks; a CTA's first tile of a phase is issued
// before the grid barrier that opens the phase). The warps form a grid of unit groups x K splits and run
// mma.sync m16n8k16 (bf16 in, f32 accumulation) on fragments read from shared memory with 32-bit loads (row
// strides = 4 words mod 32: conflict-free); the K-split partials go to shared memory (Cs) and a phase-specific
// epilogue adds them in split order and walks the tile element by element (bias, MoE choice and gate, GELU,
// residual, stores).
//
// Reads of activations written earlier in the same launch go through L2 (__ldcg / cp.async.cg), never the
// non-coherent read-only path; grid.sync() orders them.
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "ops/cuda/ops.h"
#include "ops/cuda/ptx.cuh"
#include "ops/cuda/vit_fused.h"

namespace sav::cuda {

namespace {

namespace cg = cooperative_groups;
using namespace ptx;

constexpr int kThreads = 512;  // 16 warps: one CTA per SM, every scheduler has 4 warps to hide latency with
constexpr int kWarps = kThreads / 32;
constexpr int kRT = 16;         // rows per tile
constexpr int kKC = 64;         // K chunk
constexpr int kWld = kKC + 8;   // weight-stage row stride (bf16): 36 words = 4 mod 32
constexpr int kRingRows = 768;  // weight ring: 768 unit-rows of one 64-wide K chunk (110 KB); a tile of U units
                                // has kRingRows / U chunk slots (DeiT-Tiny: every tile's whole K fits)
constexpr int kMaxUnits = 192;
constexpr int kCsFloats = 6400;  // accumulator partials: K-splits x 16 rows x (U + 4), at most 4 x 16 x 100
constexpr int kD = 64;           // head size
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
         kWarps * 8;
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
  s.cs = o, o = align16(o + size_t(kCsFloats) * sizeof(float));
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
  FusedLinear patch;  // the patch embedding as a dense linear (K = Cin*p*p, F = C)
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

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Sub-phase stamps of a CTA's first tile of a phase (vit_fused_trace): ns after the barrier, after the
// prologue, after the router, after the product, at the end; clock64 at the start and the end.
constexpr int kStamps = 8;  // + [7]: the prologue's inputs have arrived (after its wait)
__device__ __forceinline__ void stamp(unsigned long long* st, int k) {
  if (st && threadIdx.x == 0) st[k] = global_ns();
}

__device__ __forceinline__ uint32_t lds32(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }

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
  unsigned long long* st;  // sub-phase stamps of the current tile (trace) or nullptr
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
  t.st = nullptr;
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
__device__ __noinline__ void prefetch_tile(TileSmem& sm, const FusedLinear& L, int U, int c0) {
  const int nch = L.K / kKC, P = min(kRingRows / U, nch);
  if (L.moe) cp_rows(sm.Wr, 0, L.wr, 0, 1, 2 * L.K * 4);
  for (int ch = 0; ch < P; ++ch) issue_w(sm.Ws, L, U, c0, ch);
  cp_async_commit();
}

// ---------------------------------------------------------------------------------------------------------
// A-tile prologues (each: stage by cp.async, wait for everything in flight, compute As)

// One warp: dst (C, bf16) = LayerNorm(xr), xr in shared memory; two-pass f32 statistics (layernorm_forward's).
__device__ __forceinline__ void ln_row_warp(bf16* dst, const float* xr, const float* w, const float* b, int C,
                                            float eps) {
  constexpr int kPer = kMaxC / 32;
  const int lane = threadIdx.x & 31;
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
  const float rstd = rsqrtf(q / C + eps);
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int c = lane + 32 * k;
    if (c < C) dst[c] = __float2bfloat16_rn((v[k] - mean) * rstd * __ldg(w + c) + __ldg(b + c));
  }
}

// As rows = LayerNorm(x rows r0..r0+15) in bf16 (zeros past M); warp w takes rows w, w+4, w+8, w+12; two-pass
// f32 statistics as layernorm_forward.
__device__ __forceinline__ void build_ln(const KParams& p, TileSmem& sm, int r0, const float* w, const float* b) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, C = p.m.dims.C;
  const int nrows = max(0, min(kRT, p.M - r0));
  cp_rows(sm.Xs, C * 4, p.x + size_t(r0) * C, size_t(C) * 4, nrows, C * 4);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  stamp(sm.st, 7);
  for (int rr = warp; rr < kRT; rr += kWarps) {
    bf16* dst = sm.As + rr * p.lda;
    if (rr < nrows) {
      ln_row_warp(dst, sm.Xs + rr * C, w, b, C, p.m.dims.eps);
    } else {
      for (int c = lane; c < C; c += 32) dst[c] = __float2bfloat16_rn(0.0f);
    }
  }
}

// As rows = src rows r0..r0+15 (bf16, K columns, row stride ld), zeros past M.
__device__ __forceinline__ void build_copy(const KParams& p, TileSmem& sm, int r0, const bf16* src, int K, int ld) {
  const int nrows = max(0, min(kRT, p.M - r0));
  cp_rows(sm.As, p.lda * 2, src + size_t(r0) * ld, size_t(ld) * 2, nrows, K * 2);
  cp_async_commit();
  for (int e = threadIdx.x; e < (kRT - nrows) * (K / 8); e += kThreads) {
    const int r = nrows + e / (K / 8), s = e % (K / 8);
    *reinterpret_cast<uint4*>(sm.As + r * p.lda + s * 8) = make_uint4(0u, 0u, 0u, 0u);
  }
  cp_async_wait<0>();
  stamp(sm.st, 7);
}

// As rows = im2col of patches r0..min(r0+16, rows)-1 (patch row b*P + py*G + px; columns ci*p*p + ky*p + kx),
// bf16; float4 loads 8 at a time per thread before their conversions.
__device__ __forceinline__ void build_patches(const KParams& p, TileSmem& sm, int r0, int rows) {
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
__device__ __forceinline__ void build_attention(const KParams& p, TileSmem& sm, const FusedBlock& blk, int r0) {
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
  stamp(sm.st, 7);
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
__device__ void stage_anchors(const KParams& p, TileSmem& sm, const FusedBlock& blk, int h) {
  const int m = p.m.dims.m;
  cp_rows(sm.U, kAtLd * 4, blk.anchors + size_t(h) * m * kD, kD * 4, m, kD * 4);
  cp_async_commit();
}

// Phase 1, after the epilogue of a to_qk tile (rows r0.., head h) left the bf16-rounded q values in Cs:
// q = x / max(|x|, eps) (norm in double, as the CPU), D_nj = max(|q|^2 + |a_j|^2 - 2 q.a_j, 0) into p.dist
// (rows of m4) and each row's sum of D (double, j ascending) into p.rowsum.
__device__ __noinline__ void hash_prepare(const KParams& p, TileSmem& sm, int r0, int h, int cl) {
  const FusedVitDims& d = p.m.dims;
  const int m = d.m, m4 = round_up4(m), N = d.N, H = d.H, tid = threadIdx.x;
  const float* At = reinterpret_cast<const float*>(sm.U);  // (m, kAtLd)
  float* aa = reinterpret_cast<float*>(sm.U) + m * kAtLd;
  float* Ds = aa + m4;
  float* qq = sm.misc;
  if (tid < kRT * 8) {  // 16 rows x 8 column groups (whole warps)
    const int r = tid >> 3, g8 = tid & 7;
    float* q = sm.Cs + r * cl + g8 * 8;
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
    const float* q = sm.Cs + r * cl;
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
__device__ __noinline__ void hash_codes(const KParams& p, TileSmem& sm, const FusedBlock& blk, int b, int h, int c) {
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
  stamp(sm.st, 7);
  double tot = 0.0;
  for (int w = 0; w < kWarps; ++w) tot += red[w];
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

// ---------------------------------------------------------------------------------------------------------
// one tile of a product phase

// The product of a tile: Cs partials (KS, 16, U + 4) = As x W^T over the chunks of the ring. Warp grid: G = U/8/NF
// groups of NF n8-fragments (units) x KS K-splits (k-steps kg, kg + KS, ... of every 64-wide chunk), G * KS = 16.
// Chunks [0, P) completed in the prologue; when the whole K fits the ring (P == nch) no slot is reused and the
// loop needs no barrier. Else chunk ch >= S streams into slot ch % S after chunk ch - S.
template <int NF, int KS>
__device__ __forceinline__ void tile_product(TileSmem& sm, const FusedLinear& L, int U, int c0, int S, int P, int nch,
                                             int lda) {
  constexpr int G = kWarps / KS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, fg = warp % G, kg = warp / G, CL = U + 4;
  float acc[NF][4];
#pragma unroll
  for (int f = 0; f < NF; ++f) acc[f][0] = acc[f][1] = acc[f][2] = acc[f][3] = 0.0f;
  const int g = lane >> 2, t2 = (lane & 3) * 2;
  const bf16* a_lo = sm.As + g * lda + t2;
  const bf16* a_hi = a_lo + 8 * lda;
  for (int ch = 0; ch < nch; ++ch) {
    if (P < nch) {
      if (ch >= 1 && ch - 1 + S < nch) issue_w(sm.Ws, L, U, c0, ch - 1 + S);
      cp_async_commit();
      if (ch >= P) cp_async_wait<0>();
      __syncthreads();
    }
    const bf16* wst = sm.Ws + (ch % S) * U * kWld + (fg * NF * 8 + g) * kWld + t2;
#pragma unroll
    for (int kk = kg * 16; kk < kKC; kk += 16 * KS) {
      const int ka = ch * kKC + kk;
      const uint32_t a[4] = {lds32(a_lo + ka), lds32(a_hi + ka), lds32(a_lo + ka + 8), lds32(a_hi + ka + 8)};
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        const bf16* w = wst + f * 8 * kWld + kk;
        mma_bf16(acc[f], a, lds32(w), lds32(w + 8));
      }
    }
    if (P < nch) __syncthreads();
  }
  float* cp = sm.Cs + kg * kRT * CL;
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    const int u = fg * NF * 8 + f * 8 + t2;
    cp[g * CL + u] = acc[f][0];
    cp[g * CL + u + 1] = acc[f][1];
    cp[(g + 8) * CL + u] = acc[f][2];
    cp[(g + 8) * CL + u + 1] = acc[f][3];
  }
}

enum TileKind { tk_embed = 0, tk_qkv, tk_proj, tk_fc1, tk_fc2 };

// A tile of a product phase: rows r0.. (token rows; embed: patch rows b*P + pp0..) of at most `rows`, output
// columns c0.. of L, U units (both experts' columns for MoE). qkv tiles: ocol = the tile's column in the qkv
// buffer, head >= 0 for a to_qk tile (the hash is prepared after the epilogue).
struct TileJob {
  const FusedLinear* L;
  const FusedBlock* blk;
  int kind, r0, c0, rows, U, ocol, head, b, pp0;
  bool prefetched;
  unsigned long long* st;
};

// Cs (16 x U) = A (16 x K, built by the kind's prologue into As) x W^T, then the kind's epilogue for the
// 16 x Uh outputs (bias; MoE: the chosen expert's columns, gated). The prologue stages its inputs by cp.async
// and waits for everything in flight: the weight chunks (prefetched before the phase's barrier for a CTA's first
// tile), the router weights and the residual rows arrive meanwhile. Warp grid of the product: G groups of NF
// n8-fragments (units) x KS K-splits (k-steps kg, kg + KS, ... of every 64-wide chunk); the KS partials are
// added in split order in the epilogue. Inlined into each phase (the kind then folds to constants: measured
// 0.94 -> 0.74 ms against one shared out-of-line copy). Ends with a __syncthreads.
__device__ __forceinline__ void linear_tile(const KParams& p, TileSmem& sm, const TileJob& j) {
  const FusedLinear& L = *j.L;
  const int U = j.U, r0 = j.r0, c0 = j.c0, kind = j.kind;
  unsigned long long* st = j.st;
  stamp(st, 0);
  if (st && threadIdx.x == 0) st[5] = clock64();
  sm.st = st;
  const FusedVitDims& d = p.m.dims;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int K = L.K, Uh = L.moe ? U / 2 : U, nch = K / kKC, lda = p.lda, C = d.C, N = d.N;
  const int S = kRingRows / U, P = min(S, nch);  // chunks issued up front (all of them when they fit)
  const int nrows = max(0, min(kRT, j.rows - r0));
  if (!j.prefetched) prefetch_tile(sm, L, U, c0);
  const float* resid = kind == tk_embed                    ? p.m.pos + size_t(1 + j.pp0) * C
                       : kind == tk_proj || kind == tk_fc2 ? p.x + size_t(r0) * C
                                                           : nullptr;
  if (resid) cp_rows(sm.Xres, 64 * 4, resid + c0, size_t(C) * 4, nrows, Uh * 4);  // committed by the prologue
  float bias = 0.0f;  // unit tid's: loaded now, stored to shared memory after the prologue (U <= kThreads)
  if (tid < U) {
    if (L.moe)
      bias = __ldg((tid < Uh ? L.b32 : L.b1) + c0 + (tid < Uh ? tid : tid - Uh));
    else if (L.b16)
      bias = __bfloat162float(L.b16[c0 + tid]);
    else if (L.b32)
      bias = __ldg(L.b32 + c0 + tid);
  }
  const FusedBlock& blk = *j.blk;
  switch (kind) {
    case tk_embed:
      build_patches(p, sm, r0, j.rows);
      break;
    case tk_qkv:
      if (j.head >= 0) stage_anchors(p, sm, blk, j.head);
      build_ln(p, sm, r0, blk.ln1_w, blk.ln1_b);
      break;
    case tk_proj:
      build_attention(p, sm, blk, r0);
      break;
    case tk_fc1:
      build_ln(p, sm, r0, blk.ln2_w, blk.ln2_b);
      break;
    default:
      build_copy(p, sm, r0, p.hid, d.F, d.F);
  }
  stamp(st, 1);
  if (tid < U) sm.bias[tid] = bias;
  __syncthreads();
  static_assert(kWarps == kRT, "the router takes one row per warp");
  if (L.moe) {  // router: warp w takes row w; f32 weights, the bf16 inputs of the product
    float s0[2] = {0.0f, 0.0f}, s1[2] = {0.0f, 0.0f};  // two interleaved partial sums each
    const bf16* a = sm.As + warp * lda;
    for (int k = lane; k < K; k += 64) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int kk = k + 32 * h;
        if (kk >= K) continue;
        const float x = __bfloat162float(a[kk]);
        s0[h] = fmaf(x, sm.Wr[kk], s0[h]);
        s1[h] = fmaf(x, sm.Wr[K + kk], s1[h]);
      }
    }
    float t0 = s0[0] + s0[1], t1 = s1[0] + s1[1];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      t0 += __shfl_xor_sync(kFull, t0, o);
      t1 += __shfl_xor_sync(kFull, t1, o);
    }
    if (lane == 0) {
      const int r = warp;
      const float l0 = t0 + __ldg(L.br), l1 = t1 + __ldg(L.br + 1);
      const int e = l1 > l0 ? 1 : 0;  // ties (and NaN) -> the mult expert, as the CPU
      sm.rexp[r] = e;
      sm.rgate[r] = p.m.gate == moe_gate_prob ? 1.0f / (1.0f + expf(e ? l0 - l1 : l1 - l0)) : 1.0f;
      if (c0 == 0 && L.choice && r < nrows) L.choice[r0 + r] = static_cast<int8_t>(e);
    }
  }
  stamp(st, 2);
  const int KS = U == 32 || U == 96 ? 4 : U == 64 || U == 192 ? 2 : 1, CL = U + 4;  // as tile_product's
  switch (U) {  // the unit counts the phases use (vit_fused_supports)
    case 32:
      tile_product<1, 4>(sm, L, U, c0, S, P, nch, lda);
      break;
    case 64:
      tile_product<1, 2>(sm, L, U, c0, S, P, nch, lda);
      break;
    case 96:
      tile_product<3, 4>(sm, L, U, c0, S, P, nch, lda);
      break;
    case 128:
      tile_product<1, 1>(sm, L, U, c0, S, P, nch, lda);
      break;
    default:
      tile_product<3, 2>(sm, L, U, c0, S, P, nch, lda);
  }
  stamp(st, 3);
  __syncthreads();
  // the K-split partials added in split order; a to_qk tile leaves its rounded q in split 0's slot for the hash
  const bool moe_gelu = L.moe;
  for (int e = tid; e < nrows * Uh; e += kThreads) {
    const int r = e / Uh, c = e - r * Uh;
    const int u = L.moe ? c + sm.rexp[r] * Uh : c;
    float a = sm.Cs[r * CL + u];
    for (int k = 1; k < KS; ++k) a += sm.Cs[(k * kRT + r) * CL + u];
    const float val = L.moe ? (a + sm.bias[u]) * sm.rgate[r] : a + sm.bias[c];
    const float res = resid ? sm.Xres[r * 64 + c] : 0.0f;
    const int col = c0 + c;
    switch (kind) {
      case tk_embed:
        p.x[(size_t(j.b) * N + 1 + j.pp0 + r) * C + col] = val + res;
        break;
      case tk_qkv: {
        const bf16 hv = __float2bfloat16_rn(val);
        p.qkv[size_t(r0 + r) * 2 * C + j.ocol + c] = hv;
        if (j.head >= 0) sm.Cs[r * CL + c] = __bfloat162float(hv);
        break;
      }
      case tk_fc1:
        p.hid[size_t(r0 + r) * d.F + col] = __float2bfloat16_rn(moe_gelu ? gelu_erf(val) : gelu_tanh(val));
        break;
      default:  // proj, fc2: the residual stream
        p.x[size_t(r0 + r) * C + col] = res + val;
    }
  }
  __syncthreads();
  if (kind == tk_qkv && j.head >= 0) hash_prepare(p, sm, r0, j.head, CL);
  stamp(st, 4);
  if (st && threadIdx.x == 0) st[6] = clock64();
}

// ---------------------------------------------------------------------------------------------------------
// the kernel

__global__ void __launch_bounds__(kThreads, 1) vit_fused_kernel(const __grid_constant__ KParams p) {
  cg::grid_group grid = cg::this_grid();
  TileSmem sm = tile_smem(p);
  const FusedVitDims& d = p.m.dims;
  const int N = d.N, C = d.C, H = d.H, F = d.F, M = p.M, RT = (M + kRT - 1) / kRT, tid = threadIdx.x;
  // trace (vit_fused_trace): per phase, each CTA's time at the end of its work, then CTA 0's after the barrier
  int phase = 0;
  const unsigned stride = gridDim.x + 1;
  const int nphases = 1 + 5 * d.depth + 1;
  // this CTA's sub-phase stamps for the current phase (first tile only)
  auto sub = [&](int t) -> unsigned long long* {
    return p.trace && t == int(blockIdx.x)
               ? p.trace + size_t(nphases + 1) * stride + (size_t(phase) * gridDim.x + blockIdx.x) * kStamps
               : nullptr;
  };
  auto barrier = [&] {
    if (p.trace) {
      __syncthreads();
      if (tid == 0) p.trace[phase * stride + blockIdx.x] = global_ns();
    }
    grid.sync();
    if (p.trace && blockIdx.x == 0 && tid == 0) p.trace[phase * stride + gridDim.x] = global_ns();
    ++phase;
  };
  if (p.trace && blockIdx.x == 0 && tid == 0) p.trace[size_t(nphases) * stride] = global_ns();

  // Tile decompositions of the product phases (tile t of a phase; t = blockIdx.x is a CTA's first tile, whose
  // weights are prefetched before the barrier that opens the phase). RT row tiles of 16 token rows.
  const int hc = C / 64;                 // phase 1: column tiles of 64 per C-wide half (= heads)
  const int c4 = F % 96 == 0 ? 96 : 64;  // phase 4: columns per fc1 tile
  const int ps = d.patch, P = (d.S / ps) * (d.S / ps), tpi = (P + kRT - 1) / kRT;  // E: tiles per image
  auto units = [](const FusedLinear& L, int cols) { return L.moe ? 2 * cols : cols; };
  // the tile t of phase `kind` of block l (embedding: l ignored)
  auto job = [&](int kind, int l, int t) {
    TileJob j{};
    j.kind = kind, j.head = -1, j.rows = M, j.r0 = (t % RT) * kRT;
    j.blk = p.m.blocks + (l < d.depth ? l : 0);
    const FusedBlock& blk = *j.blk;
    if (kind == tk_embed) {
      const int bt = t % (p.B * tpi);
      j.L = &p.patch, j.b = bt / tpi, j.pp0 = (bt - j.b * tpi) * kRT, j.c0 = (t / (p.B * tpi)) * 64;
      j.r0 = j.b * P + j.pp0, j.rows = (j.b + 1) * P, j.U = 64;
    } else if (kind == tk_qkv) {
      const int ct = t / RT;
      const bool stacked = blk.v.F == 0, is_v = ct >= hc;
      j.L = stacked ? &blk.qk : (is_v ? &blk.v : &blk.qk);
      j.c0 = stacked ? ct * 64 : (ct % hc) * 64, j.ocol = ct * 64, j.head = is_v ? -1 : ct;
      j.U = units(*j.L, 64);
    } else if (kind == tk_proj || kind == tk_fc2) {
      j.L = kind == tk_proj ? &blk.proj : &blk.fc2, j.c0 = (t / RT) * 32, j.U = units(*j.L, 32);
    } else {
      j.L = &blk.fc1, j.c0 = (t / RT) * c4, j.U = units(blk.fc1, c4);
    }
    return j;
  };
  auto tiles = [&](int kind) {
    return kind == tk_embed ? p.B * tpi * (C / 64)
           : kind == tk_qkv ? RT * 2 * hc
           : kind == tk_fc1 ? RT * (F / c4)
                            : RT * (C / 32);
  };
  auto run_phase = [&](int kind, int l) {
    for (int t = blockIdx.x; t < tiles(kind); t += gridDim.x) {
      TileJob j = job(kind, l, t);
      j.prefetched = kind != tk_embed && t == int(blockIdx.x);
      j.st = sub(t);
      linear_tile(p, sm, j);
    }
  };
  // the weights of this CTA's first tile of phase `kind` of block l
  auto prefetch = [&](int kind, int l) {
    if (l >= d.depth || int(blockIdx.x) >= tiles(kind)) return;
    const TileJob j = job(kind, l, blockIdx.x);
    prefetch_tile(sm, *j.L, j.U, j.c0);
  };

  // ---- E: patches -> x (token rows b*N + 1 + patch; + pos staged as the tile's "residual"), class rows ----
  run_phase(tk_embed, 0);
  if (blockIdx.x == gridDim.x - 1)
    for (int e = tid; e < p.B * C; e += kThreads) {
      const int b = e / C, c = e - b * C;
      p.x[size_t(b) * N * C + c] = __ldg(p.m.cls + c) + __ldg(p.m.pos + c);
    }
  prefetch(tk_qkv, 0);
  barrier();

  for (int l = 0; l < d.depth; ++l) {
    const FusedBlock& blk = p.m.blocks[l];
    run_phase(tk_qkv, l);  // 1: LN1 -> [to_qk | to_v] -> qkv (bf16); to_qk tiles also prepare the hash
    barrier();
    for (int t = blockIdx.x; t < p.B * H * p.nch; t += gridDim.x) {  // 2: sigma, codes, KV
      const int c = t % p.nch, bh = t / p.nch;
      unsigned long long* st = sub(t);
      sm.st = st;
      stamp(st, 0);
      hash_codes(p, sm, blk, bh / H, bh % H, c);
      stamp(st, 4);
    }
    prefetch(tk_proj, l);
    barrier();
    run_phase(tk_proj, l);  // 3: attention output -> proj + residual
    prefetch(tk_fc1, l);
    barrier();
    run_phase(tk_fc1, l);  // 4: LN2 -> fc1 + GELU -> hid
    prefetch(tk_fc2, l);
    barrier();
    run_phase(tk_fc2, l);  // 5: fc2 + residual
    prefetch(tk_qkv, l + 1);
    barrier();
  }

  // ---- H: LayerNorm of the class rows, classifier (a warp per class) ----
  {
    bf16* cn = sm.As;  // (B, C)
    const int lane = tid & 31, warp = tid >> 5;
    cp_rows(sm.Xs, C * 4, p.x, size_t(N) * C * 4, p.B, C * 4);  // the class rows b*N
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    for (int b = warp; b < p.B; b += kWarps) ln_row_warp(cn + b * C, sm.Xs + b * C, p.m.norm_w, p.m.norm_b, C, d.eps);
    __syncthreads();
    for (int cls = blockIdx.x * (kThreads / 32) + warp; cls < d.V; cls += gridDim.x * (kThreads / 32)) {
      const bf16* w = p.m.head_w + size_t(cls) * C;
      for (int b = 0; b < p.B; ++b) {
        float s = 0.0f;
#pragma unroll 8
        for (int i = 0; i < kMaxC / 32; ++i)
          if (lane + 32 * i < C)
            s = fmaf(__bfloat162float(cn[b * C + lane + 32 * i]), __bfloat162float(w[lane + 32 * i]), s);
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

// The sizes the kernel covers, device aside (vit_fused.h).
bool dims_ok(const FusedVitDims& d, int B) {
  const int Kp = d.Cin * d.patch * d.patch;
  if (!(B >= 1 && B <= kFusedMaxBatch && d.depth >= 1 && d.H >= 1 && d.C == d.H * kD && d.C <= kMaxC && d.F >= 64 &&
        d.F % 64 == 0 && Kp % 64 == 0 && kmax_of(d) <= kMaxK && d.nbits >= 1 && d.nbits <= kMaxBits && d.m >= 1 &&
        d.m <= kMaxM && d.N >= kRT && d.patch >= 4 && d.patch % 4 == 0 && d.S % d.patch == 0 && d.S % 4 == 0 &&
        d.N == (d.S / d.patch) * (d.S / d.patch) + 1 && d.V >= 1))
    return false;
  // phase 2's last chunk stages every chunk's KV partial in the weight ring
  const size_t nch = (d.N + kChunk - 1) / kChunk;
  return nch * d.nbits * kD * sizeof(float) <= size_t(kRingRows) * kWld * sizeof(bf16);
}

// The launch for these sizes on the current device: one CTA per SM with the layout's dynamic shared memory. The
// kernel attribute and the occupancy check run once per (device, shared-memory size), not at every forward.
struct Launch {
  Smem L;
  int grid;
};
Launch launch_for(const FusedVitDims& d) {
  static std::mutex mu;
  static std::map<std::pair<int, size_t>, int> grids;
  const Smem L = smem_layout(d);
  int dev = 0;
  SAV_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(dev, L.total);
  if (const auto it = grids.find(key); it != grids.end()) return {L, it->second};
  SAV_CHECK(L.total <= size_t(max_smem_per_block()),
            "vit_fused_forward: " << L.total << " B of shared memory exceed the " << max_smem_per_block()
                                  << " B of the device");
  SAV_CUDA_CHECK(cudaFuncSetAttribute(vit_fused_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(L.total)));
  int per_sm = 0;
  SAV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, vit_fused_kernel, kThreads, L.total));
  SAV_CHECK(per_sm >= 1, "vit_fused_forward: the kernel does not fit on an SM (" << L.total << " B shared memory)");
  const int grid = sm_count();
  grids.emplace(key, grid);
  return {L, grid};
}

}  // namespace

bool vit_fused_supports(const FusedVitDims& d, int B) {
  if (!dims_ok(d, B)) return false;
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
  SAV_CHECK(dims_ok(m.dims, B),
            "vit_fused_forward: sizes outside the fused kernel (B=" << B << ", C=" << m.dims.C << ")");
  SAV_CHECK(images && logits && m.blocks && m.patch_w && m.head_w, "vit_fused_forward: null pointer");
  SAV_CHECK(ws.capacity() >= B, "vit_fused_forward: workspace for " << ws.capacity() << " images, batch " << B);
  const auto [L, grid] = launch_for(m.dims);
  KParams kp{};
  kp.m = m;
  kp.patch.K = m.dims.Cin * m.dims.patch * m.dims.patch, kp.patch.F = m.dims.C, kp.patch.w0 = m.patch_w;
  kp.patch.b32 = m.patch_b;
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
}

std::string vit_fused_trace(const FusedVitModel& m, int B, const float* images, float* logits, FusedVitWorkspace& ws,
                            cudaStream_t stream) {
  const int phases = 1 + 5 * m.dims.depth + 1, grid = launch_for(m.dims).grid;
  const size_t stride = size_t(grid) + 1;
  std::vector<unsigned long long> h(size_t(phases + 1) * stride + size_t(phases) * grid * kStamps);
  DeviceBuffer<unsigned long long> tr(h.size());
  tr.fill_bytes(0);
  vit_fused_forward(m, B, images, logits, ws, stream, tr.get());
  SAV_CUDA_CHECK(cudaStreamSynchronize(stream));
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
  // sub-phases of the CTAs' first tiles: mean over the CTAs that had one (stamps 0-4 ns; 5-6 clock64)
  double sub[7][4] = {{0}}, clk = 0.0, inputs[7] = {0};
  int subn[7] = {0};
  const unsigned long long* S = h.data() + size_t(phases + 1) * stride;
  for (int ph = 0; ph < phases; ++ph) {
    const int kind = ph == 0 ? 0 : ph == phases - 1 ? 6 : 1 + (ph - 1) % 5;
    for (int c = 0; c < grid; ++c) {
      const unsigned long long* st = S + (size_t(ph) * grid + c) * kStamps;
      if (st[0] == 0 || st[4] < st[0]) continue;
      if (kind == 2) {
        sub[kind][0] += double(st[4] - st[0]) * 1e-3;
        if (st[7] >= st[0]) inputs[kind] += double(st[7] - st[0]) * 1e-3;
      } else {
        for (int k = 0; k < 4; ++k) sub[kind][k] += double(st[k + 1] - st[k]) * 1e-3;
        if (st[7] >= st[0]) inputs[kind] += double(st[7] - st[0]) * 1e-3;
        if (st[6] > st[5] && st[4] > st[0]) clk = std::max(clk, double(st[6] - st[5]) / double(st[4] - st[0]));
      }
      subn[kind] += 1;
    }
  }
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(2);
  os << "fused kernel trace (" << grid << " CTAs, batch " << B << ", total " << double(prev - start) * 1e-3
     << " us): per phase, us per occurrence (slowest CTA's work; barrier after it)\n";
  for (int k = 0; k < 7; ++k)
    if (count[k])
      os << "  " << names[k] << ": x" << count[k] << "  work " << work[k] / count[k] << "  barrier "
         << bar[k] / count[k] << "  | first tiles (mean of " << subn[k] << "): prologue "
         << (subn[k] ? sub[k][0] / subn[k] : 0.0) << " (inputs in " << (subn[k] ? inputs[k] / subn[k] : 0.0)
         << ") router " << (subn[k] ? sub[k][1] / subn[k] : 0.0) << " product " << (subn[k] ? sub[k][2] / subn[k] : 0.0)
         << " epilogue " << (subn[k] ? sub[k][3] / subn[k] : 0.0) << "\n";
  os << "  SM clock seen by the tiles (clock64 / globaltimer): " << clk * 1e3 << " MHz\n";
  return os.str();
}

}  // namespace sav::cuda
