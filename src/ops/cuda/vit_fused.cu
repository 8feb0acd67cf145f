// The ShiftAddViT forward at small batch as one kernel of thread-block clusters. Spec, steps and limits:
// vit_fused.h (legend there).
//
// Work split: a row tile is 16 token rows of ONE image (tile j of image b: tokens 16j .. 16j+15, the image's last
// tile shorter), and one cluster of CS CTAs owns one tile for the whole forward. Every CTA of the cluster keeps the
// tile's residual rows (16 x C f32) in its own shared memory; a product's output columns are split over the
// cluster (CTA `rank` computes columns [rank * F/CS, (rank+1) * F/CS)) and each CTA writes its columns into every
// CTA's copy through distributed shared memory, then the cluster barrier; cheap row-wise work (LayerNorm, the
// router, the KSH distances and codes, the attention output) is done by every CTA of the cluster for the whole tile.
//
// Products (SliceProduct, slice_run): bf16 mma.sync m16n8k16 with f32 accumulation. The weights are never staged
// in shared memory: each lane loads 16 bytes of its weight row per 32-wide k block straight from global memory (L2)
// into registers; a warp's first task is loaded BEFORE the barrier that makes the A operand ready (its latency
// hides behind it), its later tasks are prefetched into L1 and loaded one task ahead. Within a k block the k order is
// permuted (lane q holds k 8q..8q+7 of A and W: the first mma takes 8q..8q+3, the second 8q+4..8q+7); A and W use the
// same permutation, so the product is unchanged and both operands are single 16-byte loads. A task is one n8 column
// tile over kbs consecutive k blocks (kbs fixed by K alone); its partial goes to Cs and the epilogue adds a column's
// partials in k order, so every output's sum order is independent of the cluster size and the batch (a batch equals its
// single-image forwards bit for bit).
//
// Across tiles, the two per-image reductions of a Hamming block (sigma over all tokens, KV = h^T V) go through
// global memory as tagged words: (tag << 32 | f32 bits), stored and polled with relaxed gpu-scope 64-bit accesses;
// a reader spins until the tag of the current launch and block appears, so data and flag arrive in one L2 round
// trip and no grid-wide barrier exists. Tags: generation of the launch (a device counter the last CTA to finish
// advances) x 1024 + block, odd; slots alternate between two buffers by block parity (a tile writes block l+2 only
// after reading block l+1 from every tile of its image, which wrote it after reading block l).
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "ops/cuda/gelu.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/ptx.cuh"
#include "ops/cuda/vit_fused.h"

namespace sav::cuda {

namespace {

namespace cg = cooperative_groups;
using namespace ptx;

constexpr int kThreads = 512;  // 16 warps, one CTA per SM
constexpr int kWarps = kThreads / 32;
constexpr int kRT = 16;  // rows per tile = the mma's M
constexpr int kD = 64;   // head size
constexpr int kTaps = 9;
constexpr int kMaxC = 768;
constexpr int kMaxK = 1536;
constexpr int kMaxBits = 64;
constexpr int kMaxM = 64;
constexpr int kMaxH = 12;
constexpr int kCsFloats = 6144;  // product partials (splits x 16 rows x columns of a column group)
constexpr int kAtLd = 68;        // anchor rows in shared memory (16-byte rows; float4 reads of 8 lanes hit 32 banks)
constexpr int kMaxKbs = 3;       // k blocks per product task (kb_per_task)
constexpr int kStamps = 24;      // trace stamps per block
constexpr float kNormEps = 1e-6f;
constexpr float kSigmaMin = 1e-12f;
constexpr float kInvPi = 0.318309886183790671538f;
constexpr unsigned kFull = 0xffffffffu;

__host__ __device__ __forceinline__ int round_up4(int x) { return (x + 3) & ~3; }
// a / d for 0 <= a < 2^20 and 1 <= d < 2^10 by the float reciprocal inv = 1/d (exact there: a + 0.5 is at least
// 0.5/d from a multiple of d, far beyond the rounding); the kernel's loop indices, without integer division's
// ~20-instruction sequence.
__device__ __forceinline__ int fdiv(int a, float inv) { return __float2int_rz((float(a) + 0.5f) * inv); }
inline size_t align16(size_t x) { return (x + 15) / 16 * 16; }
__host__ __device__ __forceinline__ int tiles_per_image(int N) { return (N + kRT - 1) / kRT; }
// k blocks (32 wide) per product task: a function of K only (see the file comment)
__host__ __device__ __forceinline__ int kb_per_task(int KB) { return KB % 3 == 0 ? 3 : KB % 2 == 0 ? 2 : 1; }
int patch_k(const FusedVitDims& d) { return d.Cin * d.patch * d.patch; }

// Shared-memory layout (byte offsets) of one CTA.
struct Layout {
  size_t xs, a1, a2, qv, vh, kv, at, aa, ab, mu, ds, codes, cs, misc, prm[2], total;
  int lda1, lda2;
};

// A block's small parameters staged in shared memory (two areas, by block parity): a copy of its FusedBlock whose
// LayerNorm, conv, bias and router pointers are redirected to the copies that follow it (f32; a bf16 bias stays
// bf16). Per linear slot (qk, v, proj, fc1, fc2): bias 0 (F), bias 1 (F), router weights (2K), router bias (4).
constexpr int kSlots = 5;
struct PrmLayout {
  int ln, conv, b0[kSlots], b1[kSlots], wr[kSlots], br[kSlots];  // float offsets after the struct
  size_t bytes;
};
constexpr size_t kBlockStructBytes = (sizeof(FusedBlock) + 15) / 16 * 16;
PrmLayout prm_layout(const FusedVitDims& d) {
  PrmLayout P{};
  const int F[kSlots] = {2 * d.C, d.C, d.C, d.F, d.C}, K[kSlots] = {d.C, d.C, d.C, d.C, d.F};
  int o = 0;
  P.ln = o, o += 4 * d.C;
  P.conv = o, o += round_up4(d.H * kTaps);
  for (int i = 0; i < kSlots; ++i) {
    P.b0[i] = o, o += F[i];
    P.b1[i] = o, o += F[i];
    P.wr[i] = o, o += 2 * K[i];
    P.br[i] = o, o += 4;
  }
  P.bytes = kBlockStructBytes + size_t(o) * 4;
  return P;
}
// bf16 A rows: stride = 32 mod 64 elements, so the 16-byte loads of 8 lanes (2 rows x 4 k groups) hit all banks
int lda_for(int K) { return (K + 63) / 64 * 64 + 32; }
size_t misc_bytes(const FusedVitDims& d) {
  // rexp (2, 16) int, rgate (2, 16), qq (16, H), two_sigma (H), sigma partials (tiles per image, H)
  return size_t(2 * kRT) * 4 * 2 + size_t(kRT) * d.H * 4 + size_t(d.H) * 4 + size_t(tiles_per_image(d.N)) * d.H * 4;
}
Layout layout_for(const FusedVitDims& d) {
  Layout L{};
  L.lda1 = lda_for(d.C);
  L.lda2 = lda_for(std::max({d.F, patch_k(d), 2 * d.C}));
  const int m4 = round_up4(d.m);
  size_t o = 0;
  auto take = [&](size_t bytes) {
    const size_t at = o;
    o = align16(o + bytes);
    return at;
  };
  L.xs = take(size_t(kRT) * d.C * 4);
  L.a1 = take(size_t(kRT) * L.lda1 * 2);
  L.a2 = take(size_t(kRT) * L.lda2 * 2);  // also the normalised q (16, C) f32 of the hash (2C <= lda2)
  L.qv = take(size_t(kRT) * 2 * d.C * 2);
  L.vh = take(size_t(8) * d.C * 2);
  L.kv = take(size_t(d.nbits) * d.C * 4);
  L.at = take(size_t(d.H) * d.m * kAtLd * 4);
  L.aa = take(size_t(d.H) * m4 * 4);
  L.ab = take(size_t(d.H) * d.nbits * d.m * 4);
  L.mu = take(size_t(d.H) * m4 * 4);
  L.ds = take(size_t(kRT) * d.H * m4 * 4);
  L.codes = take(size_t(kRT) * d.H * 8);
  L.cs = take(size_t(kCsFloats) * 4);
  L.misc = take(misc_bytes(d));
  const size_t prm_bytes = prm_layout(d).bytes;
  L.prm[0] = take(prm_bytes);
  L.prm[1] = take(prm_bytes);
  L.total = o;
  return L;
}

struct KParams {
  FusedVitModel m;
  FusedLinear patch;  // the patch embedding as a dense linear (K = Cin*p*p, F = C)
  int T, tpi, CS;
  Layout L;
  PrmLayout P;
  const float* images;
  float* logits;
  float* x;                 // (B*N, C): the residual stream after the last block (tests)
  bf16* vg;                 // (B*N, C): v rows, read by the neighbouring tiles' token conv
  unsigned long long* sig;  // (2, T, H) tagged sigma partials
  unsigned long long* kvx;  // (2, T, b, C) tagged KV partials
  unsigned* ctl;            // [0] launch generation, [1] CTAs finished
  unsigned long long* trace;
};

// ---------------------------------------------------------------------------------------------------------
// small device helpers

__device__ __forceinline__ void st_tag(unsigned long long* p, float v, unsigned tag) {
  const unsigned long long w = (static_cast<unsigned long long>(tag) << 32) | __float_as_uint(v);
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(w) : "memory");
}
__device__ __forceinline__ unsigned long long ld_tag(const unsigned long long* p) {
  unsigned long long w;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(w) : "l"(p) : "memory");
  return w;
}
// The value of a tagged slot once it carries `tag` (spins).
__device__ __forceinline__ float tagged_value(unsigned long long w, const unsigned long long* p, unsigned tag) {
  while (static_cast<unsigned>(w >> 32) != tag) w = ld_tag(p);
  return __uint_as_float(static_cast<unsigned>(w));
}

// 8 bf16 (16-byte aligned, shared memory) -> f32
__device__ __forceinline__ void load8(float (&v)[8], const bf16* src) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}

// One warp: dst (C, bf16) = LayerNorm(xr) with two-pass f32 statistics (layernorm_forward's); xr in shared memory is
// read once per pass (no register copy of the row: the prefetched weights of the next product stay in registers).
__device__ __forceinline__ void ln_row_warp(bf16* dst, const float* xr, const float* w, const float* b, int C,
                                            float eps) {
  const int lane = threadIdx.x & 31;
  float s = 0.0f;
  for (int c = lane; c < C; c += 32) s += xr[c];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
  const float mean = s / C;
  float q = 0.0f;
  for (int c = lane; c < C; c += 32) q = fmaf(xr[c] - mean, xr[c] - mean, q);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(kFull, q, o);
  const float rstd = rsqrtf(q / C + eps);
  for (int c = lane; c < C; c += 32) dst[c] = __float2bfloat16_rn((xr[c] - mean) * rstd * w[c] + b[c]);
}

// A (16 rows, bf16) = LayerNorm of the tile's residual rows; rows past nrows zero. Warp w takes row w.
__device__ __noinline__ void ln_tile(bf16* A, int lda, const float* Xs, int C, int nrows, const float* w,
                                     const float* b, float eps) {
  static_assert(kWarps == kRT, "one warp per row");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp < nrows) {
    ln_row_warp(A + warp * lda, Xs + warp * C, w, b, C, eps);
  } else {
    for (int c = lane; c < C; c += 32) A[warp * lda + c] = __float2bfloat16_rn(0.0f);
  }
}

// The MoE router of the tile's rows (warp w: row w), f32 weights on the bf16 inputs of the product; the choice and
// the gate into rexp / rgate; rank 0 reports the choice of the valid rows.
__device__ __noinline__ void route(const FusedLinear& L, const bf16* A, int lda, int gate, int* rexp, float* rgate,
                                   int row0, int nrows, bool report) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, K = L.K;
  float s0[2] = {0.0f, 0.0f}, s1[2] = {0.0f, 0.0f};  // two interleaved partial sums each
  const bf16* a = A + warp * lda;
  for (int k = lane; k < K; k += 64) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int kk = k + 32 * h;
      if (kk >= K) continue;
      const float x = __bfloat162float(a[kk]);
      s0[h] = fmaf(x, L.wr[kk], s0[h]);
      s1[h] = fmaf(x, L.wr[K + kk], s1[h]);
    }
  }
  float t0 = s0[0] + s0[1], t1 = s1[0] + s1[1];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    t0 += __shfl_xor_sync(kFull, t0, o);
    t1 += __shfl_xor_sync(kFull, t1, o);
  }
  if (lane == 0) {
    const float l0 = t0 + L.br[0], l1 = t1 + L.br[1];
    const int e = l1 > l0 ? 1 : 0;  // ties (and NaN) -> the mult expert, as the CPU
    rexp[warp] = e;
    rgate[warp] = gate == moe_gate_prob ? 1.0f / (1.0f + expf(e ? l0 - l1 : l1 - l0)) : 1.0f;
    if (report && L.choice && warp < nrows) L.choice[row0 + warp] = static_cast<int8_t>(e);
  }
}

// ---------------------------------------------------------------------------------------------------------
// the slice product

// This CTA's columns [c0, c0 + Uh) of a linear (both experts' for MoE), in column groups whose partials fit Cs.
// Tasks of a group: E * gcols/8 n8 tiles x S k splits of kbs (<= 3) k blocks; warp w runs tasks w, w + 16, ...
struct SliceProduct {
  const bf16* w0;
  const bf16* w1;
  int K, kbs, S, c0, Uh, E, Gh, groups;
  float invS;         // 1 / S, for the task -> (tile, split) division
  uint4 wa[kMaxKbs];  // the warp's first task's weights (prefetch)

  __device__ __forceinline__ SliceProduct(const FusedLinear& L, int c0_, int Uh_) {
    w0 = L.w0, w1 = L.moe ? L.w1 : nullptr, K = L.K, kbs = kb_per_task(K / 32), S = K / 32 / kbs;
    c0 = c0_, Uh = Uh_, E = L.moe ? 2 : 1, invS = 1.0f / S;
    Gh = min(Uh, (kCsFloats / (S * kRT * E)) / 8 * 8);
    groups = (Uh + Gh - 1) / Gh;
  }
  __device__ __forceinline__ int gcols(int g) const { return min(Gh, Uh - g * Gh); }
  // The weights of this warp's first task of group g into registers (issued before the barrier that makes A ready)
  // and those of its other tasks into L1.
  __device__ __forceinline__ void prefetch(int g = 0);
};

// The lane's 16 bytes of W for k block 0 of `task` (n8 tile, split) of a group whose columns start at cbase.
__device__ __forceinline__ const bf16* task_w(const bf16* w0, const bf16* w1, int K, int kbs, int S, float invS,
                                              int cbase, int tpe, int task) {
  const int lane = threadIdx.x & 31, tile = fdiv(task, invS), sp = task - tile * S, e = tile >= tpe;
  const int n = cbase + (tile - e * tpe) * 8 + (lane >> 2);
  return (e ? w1 : w0) + size_t(n) * K + sp * kbs * 32 + 8 * (lane & 3);
}

__device__ __noinline__ void slice_prefetch(const bf16* w0, const bf16* w1, int K, int kbs, int S, float invS,
                                            int cbase, int gc, int E) {
  const int tpe = gc / 8, nt = E * tpe * S;
  for (int task = (threadIdx.x >> 5) + kWarps; task < nt; task += kWarps) {  // (the first task: registers)
    const bf16* w = task_w(w0, w1, K, kbs, S, invS, cbase, tpe, task);
    for (int kb = 0; kb < kbs; ++kb) asm volatile("prefetch.global.L1 [%0];" ::"l"(w + kb * 32));
  }
}
__device__ __forceinline__ void SliceProduct::prefetch(int g) {
  const int gc = gcols(g), task = threadIdx.x >> 5;
  if (task < E * (gc / 8) * S) {
    const bf16* src = task_w(w0, w1, K, kbs, S, invS, c0 + g * Gh, gc / 8, task);
#pragma unroll
    for (int kb = 0; kb < kMaxKbs; ++kb)
      if (kb < kbs) wa[kb] = __ldg(reinterpret_cast<const uint4*>(src + kb * 32));
  }
  slice_prefetch(w0, w1, K, kbs, S, invS, c0 + g * Gh, gc, E);
}

// The epilogue's common part for one row and 8 columns of a group: the k splits of the chosen expert's columns
// added in order, + bias, x gate; the result back into split 0's columns [c, c+8) of the row (the same thread
// reads them next). Out of line (one copy for every linear).
__device__ __noinline__ void finish8(float* Cs, int ncols, int S, int xoff, int r, int c, float gate, const float* bf,
                                     const bf16* bh, int col) {
  const float* src = Cs + r * ncols + xoff + c;
  float v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = src[i];
  for (int sp = 1; sp < S; ++sp)
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] += src[sp * kRT * ncols + i];
  float* dst = Cs + r * ncols + c;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float b = bf ? bf[col + i] : bh ? __bfloat162float(bh[col + i]) : 0.0f;
    dst[i] = (v[i] + b) * gate;
  }
}

// Column group g of a slice product: partials (S, 16, E * gc) into Cs; P.wa holds the warp's first task's weights
// (prefetch). No barrier inside.
__device__ __forceinline__ void slice_run(const SliceProduct& P, int g, const bf16* A, int lda, float* Cs) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, q = lane & 3;
  const int K = P.K, kbs = P.kbs, S = P.S, E = P.E, gc = P.gcols(g), cbase = P.c0 + g * P.Gh;
  const int tpe = gc / 8, nt = E * tpe * S, ncols = E * gc;
  const float invS = P.invS;
  const bf16 *w0 = P.w0, *w1 = P.w1;
  uint4 wn[kMaxKbs];
  auto load = [&](uint4(&w)[kMaxKbs], int task) {
    if (task >= nt) return;
    const bf16* src = task_w(w0, w1, K, kbs, S, invS, cbase, tpe, task);
#pragma unroll
    for (int kb = 0; kb < kMaxKbs; ++kb)
      if (kb < kbs) w[kb] = __ldg(reinterpret_cast<const uint4*>(src + kb * 32));
  };
#pragma unroll
  for (int kb = 0; kb < kMaxKbs; ++kb) wn[kb] = P.wa[kb];
  for (int task = warp; task < nt; task += kWarps) {
    uint4 w[kMaxKbs];
#pragma unroll
    for (int kb = 0; kb < kMaxKbs; ++kb) w[kb] = wn[kb];
    load(wn, task + kWarps);
    const int tile = fdiv(task, invS), sp = task - tile * S;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const bf16* a = A + r * lda + sp * kbs * 32 + 8 * q;
#pragma unroll
    for (int kb = 0; kb < kMaxKbs; ++kb) {
      if (kb >= kbs) break;
      const uint4 lo = *reinterpret_cast<const uint4*>(a + kb * 32);
      const uint4 hi = *reinterpret_cast<const uint4*>(a + 8 * lda + kb * 32);
      const uint32_t a0[4] = {lo.x, hi.x, lo.y, hi.y}, a1[4] = {lo.z, hi.z, lo.w, hi.w};
      mma_bf16(acc, a0, w[kb].x, w[kb].y);
      mma_bf16(acc, a1, w[kb].z, w[kb].w);
    }
    float* c = Cs + (sp * kRT + r) * ncols + tile * 8 + 2 * q;
    c[0] = acc[0], c[1] = acc[1];
    c[8 * ncols] = acc[2], c[8 * ncols + 1] = acc[3];
  }
}

// Runs every column group of P (the first one prefetched) and calls out(r, col, v) for the tile's valid rows and
// 8 consecutive columns col.. of the linear, v = (the chosen expert's output + its bias) * gate (MoE) or output +
// bias. Between groups and after the last: __syncthreads.
struct NoMid {
  __device__ void operator()() const {}
};
template <class Out, class Mid = NoMid>
__device__ __forceinline__ void product_out(SliceProduct& P, const FusedLinear& L, const bf16* A, int lda, float* Cs,
                                            const int* rexp, const float* rgate, int nrows, Out&& out,
                                            Mid&& mid = Mid{}) {
  for (int g = 0; g < P.groups; ++g) {
    const int gc = P.gcols(g), c8 = gc / 8, ncols = P.E * gc;
    if (g > 0) P.prefetch(g);
    slice_run(P, g, A, lda, Cs);
    __syncthreads();
    if (g == 0) mid();
    const float inv8 = 1.0f / c8;
    for (int e = threadIdx.x; e < nrows * c8; e += kThreads) {
      const int r = fdiv(e, inv8), c = (e - r * c8) * 8, col = P.c0 + g * P.Gh + c;
      const int x = L.moe ? rexp[r] : 0;
      const float* bf = L.moe ? (x ? L.b1 : L.b32) : L.b16 ? nullptr : L.b32;
      finish8(Cs, ncols, P.S, x * gc, r, c, L.moe ? rgate[r] : 1.0f, bf, L.moe ? nullptr : L.b16, col);
      float v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = Cs[r * ncols + c + i];
      out(r, col, v);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------
// the kernel

// The CTA's shared-memory buffers, addressed from the layout in the kernel parameters (constant bank) at each use,
// so no register holds them.
extern __shared__ __align__(16) unsigned char smem_raw[];
struct Smem {
  const Layout& L;
  int H;
  template <class T>
  __device__ __forceinline__ T* at(size_t off) const {
    return reinterpret_cast<T*>(smem_raw + off);
  }
  __device__ __forceinline__ float* Xs() const { return at<float>(L.xs); }
  __device__ __forceinline__ bf16* A1() const { return at<bf16>(L.a1); }
  __device__ __forceinline__ bf16* A2() const { return at<bf16>(L.a2); }
  __device__ __forceinline__ bf16* QV() const { return at<bf16>(L.qv); }
  __device__ __forceinline__ bf16* Vh() const { return at<bf16>(L.vh); }
  __device__ __forceinline__ float* KV() const { return at<float>(L.kv); }
  __device__ __forceinline__ float* At() const { return at<float>(L.at); }
  __device__ __forceinline__ float* aa() const { return at<float>(L.aa); }
  __device__ __forceinline__ float* Ab() const { return at<float>(L.ab); }
  __device__ __forceinline__ float* mu() const { return at<float>(L.mu); }
  __device__ __forceinline__ float* Ds() const { return at<float>(L.ds); }
  __device__ __forceinline__ unsigned long long* codes() const { return at<unsigned long long>(L.codes); }
  __device__ __forceinline__ float* Cs() const { return at<float>(L.cs); }
  __device__ __forceinline__ int* rexp() const { return at<int>(L.misc); }  // (2, 16)
  __device__ __forceinline__ float* rgate() const { return at<float>(L.misc + 2 * kRT * 4); }
  __device__ __forceinline__ float* qq() const { return rgate() + 2 * kRT; }  // (16, H)
  __device__ __forceinline__ float* tsig() const { return qq() + kRT * H; }   // (H): 2 sigma
  __device__ __forceinline__ float* parts() const { return tsig() + H; }      // (tiles per image, H)
};

// The KSH buffers of a block (anchors, A, mu) into shared memory by cp.async (the caller commits).
__device__ __forceinline__ void stage_ksh(const FusedVitDims& d, const FusedBlock& blk, const Smem& s) {
  const int Hm = d.H * d.m, m4 = round_up4(d.m);
  for (int e = threadIdx.x; e < Hm * (kD / 4); e += kThreads) {
    const int row = e / (kD / 4), seg = e - row * (kD / 4);
    cp_async16(s.At() + row * kAtLd + seg * 4, blk.anchors + size_t(row) * kD + seg * 4);
  }
  for (int e = threadIdx.x; e < d.H * d.nbits * d.m; e += kThreads) cp_async4(s.Ab() + e, blk.A + e);
  for (int e = threadIdx.x; e < Hm; e += kThreads) {
    const int h = e / d.m, j = e - h * d.m;
    cp_async4(s.mu() + h * m4 + j, blk.mu + e);
  }
}

// Block g's small parameters into the parameter area `area` (cp.async; the caller commits):
// thread 0 writes the redirected FusedBlock copy, every thread issues element copies (bf16 biases as pairs).
__device__ __forceinline__ void stage_block(const FusedVitDims& d, const PrmLayout& P, const FusedBlock* g,
                                            unsigned char* area) {
  float* f = reinterpret_cast<float*>(area + kBlockStructBytes);
  const int C = d.C, tid = threadIdx.x;
  auto slot = [](FusedBlock& b, int i) -> FusedLinear& {
    return i == 0 ? b.qk : i == 1 ? b.v : i == 2 ? b.proj : i == 3 ? b.fc1 : b.fc2;
  };
  auto cslot = [](const FusedBlock* b, int i) -> const FusedLinear& {
    return i == 0 ? b->qk : i == 1 ? b->v : i == 2 ? b->proj : i == 3 ? b->fc1 : b->fc2;
  };
  if (tid == 0) {
    FusedBlock fb = *g;
    fb.ln1_w = f + P.ln, fb.ln1_b = f + P.ln + C, fb.ln2_w = f + P.ln + 2 * C, fb.ln2_b = f + P.ln + 3 * C;
    fb.conv = f + P.conv;
    for (int i = 0; i < kSlots; ++i) {
      FusedLinear& L = slot(fb, i);
      if (L.moe) {
        L.b32 = f + P.b0[i], L.b1 = f + P.b1[i], L.wr = f + P.wr[i], L.br = f + P.br[i];
      } else if (L.b16) {
        L.b16 = reinterpret_cast<const bf16*>(f + P.b0[i]);
      } else if (L.b32) {
        L.b32 = f + P.b0[i];
      }
    }
    *reinterpret_cast<FusedBlock*>(area) = fb;
  }
  const float* lns[4] = {g->ln1_w, g->ln1_b, g->ln2_w, g->ln2_b};
  for (int e = tid; e < 4 * C; e += kThreads) cp_async4(f + P.ln + e, lns[e / C] + e % C);
  for (int e = tid; e < d.H * kTaps; e += kThreads) cp_async4(f + P.conv + e, g->conv + e);
  for (int i = 0; i < kSlots; ++i) {
    const FusedLinear& L = cslot(g, i);
    if (L.F == 0) continue;
    if (L.moe) {
      for (int e = tid; e < L.F; e += kThreads) {
        cp_async4(f + P.b0[i] + e, L.b32 + e);
        cp_async4(f + P.b1[i] + e, L.b1 + e);
      }
      for (int e = tid; e < 2 * L.K; e += kThreads) cp_async4(f + P.wr[i] + e, L.wr + e);
      if (tid < 2) cp_async4(f + P.br[i] + tid, L.br + tid);
    } else if (L.b16) {
      for (int e = tid; e < L.F / 2; e += kThreads) cp_async4(f + P.b0[i] + e, L.b16 + 2 * e);
    } else if (L.b32) {
      for (int e = tid; e < L.F; e += kThreads) cp_async4(f + P.b0[i] + e, L.b32 + e);
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) vit_fused_kernel(const __grid_constant__ KParams p) {
  cg::cluster_group cluster = cg::this_cluster();
  const FusedVitDims& d = p.m.dims;
  const int N = d.N, C = d.C, H = d.H, F = d.F, nb = d.nbits, m = d.m, m4 = round_up4(m);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int CS = p.CS, rank = static_cast<int>(cluster.block_rank()), t = blockIdx.x / CS;
  const int b = t / p.tpi, n0 = (t - b * p.tpi) * kRT, nrows = min(kRT, N - n0), row0 = b * N + n0;
  const int lda1 = p.L.lda1, lda2 = p.L.lda2, Cw = C / CS;
  const float invH = 1.0f / H, invH8 = 1.0f / (H * 8), invm = 1.0f / m, invHm = 1.0f / (H * m), invCw = 1.0f / Cw;
  const Smem s{p.L, H};
  const bool stamps = p.trace && blockIdx.x == 0;
  const int nst = 3 + d.depth * kStamps;  // trace: nst %globaltimer stamps, then nst clock64 stamps
  auto stamp = [&](int k) {
    if (stamps && tid == 0) p.trace[k] = timeline_now(), p.trace[nst + k] = clock64();
  };
  stamp(0);
  __shared__ unsigned gen_s;
  if (tid == 0) gen_s = *reinterpret_cast<volatile unsigned*>(p.ctl);
  // The shared memory of every CTA of the cluster (distributed shared memory), for the gathers: this CTA's
  // columns of a product go to every CTA, 16 bytes per store.
  __shared__ unsigned char* peer[8];
  if (tid < CS) peer[tid] = static_cast<unsigned char*>(cluster.map_shared_rank(static_cast<void*>(smem_raw), tid));
  auto put16 = [&](size_t off, uint4 v) {
#pragma unroll 1
    for (int q = 0; q < CS; ++q) *reinterpret_cast<uint4*>(peer[q] + off) = v;
  };
  auto put_x = [&](int r, int col, const float(&v)[8]) {  // x[r][col..col+7]
    const size_t off = p.L.xs + size_t(r * C + col) * 4;
    const float4 lo = make_float4(v[0], v[1], v[2], v[3]), hi = make_float4(v[4], v[5], v[6], v[7]);
#pragma unroll 1
    for (int q = 0; q < CS; ++q) {
      float4* d4 = reinterpret_cast<float4*>(peer[q] + off);
      d4[0] = lo, d4[1] = hi;
    }
  };
  auto pack8 = [](const float(&v)[8]) {
    uint4 u;
    const __nv_bfloat162 h0 = __floats2bfloat162_rn(v[0], v[1]), h1 = __floats2bfloat162_rn(v[2], v[3]);
    const __nv_bfloat162 h2 = __floats2bfloat162_rn(v[4], v[5]), h3 = __floats2bfloat162_rn(v[6], v[7]);
    u.x = *reinterpret_cast<const uint32_t*>(&h0), u.y = *reinterpret_cast<const uint32_t*>(&h1);
    u.z = *reinterpret_cast<const uint32_t*>(&h2), u.w = *reinterpret_cast<const uint32_t*>(&h3);
    return u;
  };

  // ---- embedding: im2col of the tile's patch rows (token 0 = the class row: zeros) -> A2; patch product ----
  SliceProduct pe(p.patch, rank * Cw, Cw);
  pe.prefetch();
  stage_ksh(d, p.m.blocks[0], s);
  stage_block(d, p.P, p.m.blocks, smem_raw + p.L.prm[0]);
  cp_async_commit();
  {
    const int ps = d.patch, G = d.S / ps, q4 = ps / 4, per_row = d.Cin * ps * q4, total = kRT * per_row;
    for (int e = tid; e < total; e += kThreads) {
      const int r = e / per_row, sidx = e - r * per_row, n = n0 + r;  // sidx * 4 = ci*p*p + ky*p + q*4
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (r < nrows && n > 0) {
        const int q = sidx % q4, ck = sidx / q4, ci = ck / ps, ky = ck - ci * ps;
        const int pp = n - 1, py = pp / G, px = pp - py * G;
        v = __ldg(reinterpret_cast<const float4*>(p.images + ((size_t(b) * d.Cin + ci) * d.S + py * ps + ky) * d.S +
                                                  px * ps + q * 4));
      }
      __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(s.A2() + r * lda2 + sidx * 4);
      dst[0] = __floats2bfloat162_rn(v.x, v.y);
      dst[1] = __floats2bfloat162_rn(v.z, v.w);
    }
  }
  cluster.sync();  // every CTA of the cluster runs (distributed shared memory is safe) and A2 is complete
  const unsigned gen = gen_s;
  product_out(pe, p.patch, s.A2(), lda2, s.Cs(), s.rexp(), s.rgate(), nrows, [&](int r, int col, float(&v)[8]) {
    const int n = n0 + r;
#pragma unroll
    for (int i = 0; i < 8; ++i)
      v[i] = n == 0 ? __ldg(p.m.cls + col + i) + __ldg(p.m.pos + col + i)
                    : v[i] + __ldg(p.m.pos + size_t(n) * C + col + i);
    put_x(r, col, v);
  });
  const FusedBlock* blocks = p.m.blocks;
  cp_async_wait<0>();  // block 0's KSH buffers and parameters
  cluster.sync();
  stamp(1);

  for (int l = 0; l < d.depth; ++l) {
    const FusedBlock& blk = *reinterpret_cast<const FusedBlock*>(smem_raw + p.L.prm[l & 1]);
    const int par = l & 1;
    auto bst = [&](int k) { stamp(2 + l * kStamps + k); };
    const unsigned tag = ((gen * 1024u + unsigned(l)) << 1) | 1u;
    // ---- LN1 -> [to_qk | to_v] slice -> QV (every CTA) and v rows -> global (the neighbours' token conv) ----
    const bool stacked = blk.v.F == 0;
    SliceProduct pq(blk.qk, stacked ? rank * (2 * Cw) : rank * Cw, stacked ? 2 * Cw : Cw);
    pq.prefetch();
    ln_tile(s.A1(), lda1, s.Xs(), C, nrows, blk.ln1_w, blk.ln1_b, d.eps);
    __syncthreads();
    auto put_qv = [&](int r, int col, const float(&v)[8]) {  // col in [0, 2C): q then v
      const uint4 u = pack8(v);
      put16(p.L.qv + size_t(r * 2 * C + col) * 2, u);
      if (col >= C) *reinterpret_cast<uint4*>(p.vg + size_t(row0 + r) * C + col - C) = u;
    };
    if (stacked) {
      product_out(pq, blk.qk, s.A1(), lda1, s.Cs(), s.rexp(), s.rgate(), nrows, put_qv);
    } else {
      if (blk.qk.moe) route(blk.qk, s.A1(), lda1, p.m.gate, s.rexp(), s.rgate(), row0, nrows, rank == 0);
      if (blk.v.moe) route(blk.v, s.A1(), lda1, p.m.gate, s.rexp() + kRT, s.rgate() + kRT, row0, nrows, rank == 0);
      SliceProduct pv(blk.v, rank * Cw, Cw);
      pv.prefetch();
      product_out(pq, blk.qk, s.A1(), lda1, s.Cs(), s.rexp(), s.rgate(), nrows, put_qv);
      product_out(pv, blk.v, s.A1(), lda1, s.Cs(), s.rexp() + kRT, s.rgate() + kRT, nrows,
                  [&](int r, int col, const float(&v)[8]) { put_qv(r, C + col, v); });
    }
    __threadfence();  // the v rows reach L2 before this CTA's tagged stores below
    cp_async_wait<0>();
    cluster.sync();
    bst(0);  // qk/v gathered

    // ---- KSH distances (every CTA, the whole tile): q / |q|, D = |q - a|^2; rank 0 publishes sum D ----
    float* Qn = reinterpret_cast<float*>(s.A2());        // (16, C) f32
    for (int e = tid; e < kRT * H * 8; e += kThreads) {  // 8 aligned lanes per (row, head): whole warps
      const int r = fdiv(e, invH8), rh = e >> 3, h = rh - fdiv(rh, invH) * H, g8 = e & 7, c = h * kD + g8 * 8;
      float q[8];
      load8(q, s.QV() + r * 2 * C + c);
      double ss = 0.0;
#pragma unroll
      for (int i = 0; i < 8; ++i) ss += double(q[i]) * q[i];
      ss = sum_lanes8(ss);
      const float nrm = fmaxf(static_cast<float>(sqrt(ss)), kNormEps);
      float q2 = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        q[i] = q[i] / nrm;
        q2 = fmaf(q[i], q[i], q2);
      }
      float4* dst = reinterpret_cast<float4*>(Qn + r * C + c);
      dst[0] = make_float4(q[0], q[1], q[2], q[3]), dst[1] = make_float4(q[4], q[5], q[6], q[7]);
      q2 = sum_lanes8(q2);
      if (g8 == 0) s.qq()[r * H + h] = q2;
    }
    {  // |a_j|^2: 8 aligned lanes per anchor (the loop bound rounded to whole warps)
      const int n8 = H * m * 8, n8w = (n8 + 31) / 32 * 32;
      for (int e = tid; e < n8w; e += kThreads) {
        const bool ok = e < n8;
        const int hj = e >> 3, g8 = e & 7;
        float acc = 0.0f;
        if (ok) {
          const float4* a = reinterpret_cast<const float4*>(s.At() + hj * kAtLd + g8 * 8);
          const float4 a0 = a[0], a1 = a[1];
          acc = a0.x * a0.x + a0.y * a0.y + a0.z * a0.z + a0.w * a0.w + a1.x * a1.x + a1.y * a1.y + a1.z * a1.z +
                a1.w * a1.w;
        }
        acc = sum_lanes8(acc);
        const int h = fdiv(hj, invm);
        if (ok && g8 == 0) s.aa()[h * m4 + hj - h * m] = acc;
      }
    }
    __syncthreads();
    bst(1);                                            // q normalised, |a|^2
    for (int e = tid; e < 4 * H * m; e += kThreads) {  // thread per (4 rows, head, anchor): anchors read 4x less
      const int rg = fdiv(e, invHm), hj = e - rg * (H * m), h = fdiv(hj, invm), j = hj - h * m;
      const float4* a = reinterpret_cast<const float4*>(s.At() + hj * kAtLd);
      float d4[4][4] = {};
#pragma unroll 4
      for (int i = 0; i < kD / 4; ++i) {
        const float4 aa = a[i];
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {
          const float4 qa = reinterpret_cast<const float4*>(Qn + (rg * 4 + rr) * C + h * kD)[i];
          d4[rr][0] = fmaf(qa.x, aa.x, d4[rr][0]);
          d4[rr][1] = fmaf(qa.y, aa.y, d4[rr][1]);
          d4[rr][2] = fmaf(qa.z, aa.z, d4[rr][2]);
          d4[rr][3] = fmaf(qa.w, aa.w, d4[rr][3]);
        }
      }
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        const int r = rg * 4 + rr;
        const float dot = (d4[rr][0] + d4[rr][1]) + (d4[rr][2] + d4[rr][3]);
        s.Ds()[(r * H + h) * m4 + j] = fmaxf(s.qq()[r * H + h] + s.aa()[h * m4 + j] - 2.0f * dot, 0.0f);
      }
    }
    __syncthreads();
    bst(2);                       // D
    if (rank == 0 && warp < H) {  // sum of D over the tile's rows and the anchors (double, fixed order)
      const int h = warp;
      double acc = 0.0;
      for (int r = 0; r < nrows; ++r)
        for (int j = lane; j < m; j += 32) acc += s.Ds()[(r * H + h) * m4 + j];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(kFull, acc, o);
      if (lane == 0) st_tag(p.sig + (size_t(par) * p.T + t) * H + h, static_cast<float>(acc), tag);
    }
    bst(3);  // sigma partial published

    // ---- exchange 1: sigma of the image from every tile's partial ----
    SliceProduct pp(blk.proj, rank * Cw, Cw);
    pp.prefetch();
    const int tpi = p.tpi;
    for (int e = tid; e < tpi * H; e += kThreads) {
      const unsigned long long* slot = p.sig + (size_t(par) * p.T + b * tpi) * H + e;
      s.parts()[e] = tagged_value(ld_tag(slot), slot, tag);
    }
    __threadfence();
    __syncthreads();
    bst(4);  // sigma partials arrived
    if (tid < H) {
      double tot = 0.0;
      for (int j = 0; j < tpi; ++j) tot += s.parts()[j * H + tid];
      s.tsig()[tid] = 2.0f * fmaxf(static_cast<float>(tot / (double(N) * m)), kSigmaMin);
    }
    {  // the v rows of the 4 tokens before and after the tile (other tiles'), for the token conv
      const int segs = C / 8;
      for (int e = tid; e < 8 * segs; e += kThreads) {
        const int hr = e / segs, sg = e - hr * segs, n = hr < 4 ? n0 - 4 + hr : n0 + kRT + hr - 4;
        if (n >= 0 && n < N) cp_async16(s.Vh() + hr * C + sg * 8, p.vg + size_t(b * N + n) * C + sg * 8);
      }
      cp_async_commit();
    }
    __syncthreads();
    bst(5);  // sigma known, halo issued

    // ---- codes (every CTA): k = exp(-D / 2 sigma) - mu, y = A k, code = y > 0; warp per (row, head): lane j
    // computes k_j, lane b sums y_b (k_j by shuffle, j ascending) ----
    for (int task = warp; task < kRT * H; task += kWarps) {
      const int r = fdiv(task, invH), h = task - r * H;
      const float* D = s.Ds() + task * m4;
      const float ts = s.tsig()[h];
      const float k_lo = lane < m ? expf(-D[lane] / ts) - s.mu()[h * m4 + lane] : 0.0f;
      const float k_hi = lane + 32 < m ? expf(-D[lane + 32] / ts) - s.mu()[h * m4 + lane + 32] : 0.0f;
      unsigned long long code = 0ull;
      for (int b0 = 0; b0 < nb; b0 += 32) {
        const int bit = b0 + lane;
        const float* Ar = s.Ab() + (size_t(h) * nb + min(bit, nb - 1)) * m;
        float y = 0.0f;
        for (int j = 0; j < m; ++j) {
          const float kj = __shfl_sync(kFull, j < 32 ? k_lo : k_hi, j & 31);
          y = fmaf(Ar[j], kj, y);
        }
        const unsigned bal = __ballot_sync(kFull, bit < nb && y > 0.0f);
        code |= static_cast<unsigned long long>(bal) << b0;
      }
      if (lane == 0) s.codes()[task] = r < nrows ? code : 0ull;
    }
    __syncthreads();
    bst(7);  // codes
    // this CTA's columns of the tile's KV partial: sum over the rows whose bit is set of v
    for (int e = tid; e < nb * Cw; e += kThreads) {
      const int i = fdiv(e, invCw), c = rank * Cw + (e - i * Cw), h = c / kD;
      float acc = 0.0f;
      for (int r = 0; r < nrows; ++r)
        if ((s.codes()[r * H + h] >> i) & 1ull) acc += __bfloat162float(s.QV()[r * 2 * C + C + c]);
      st_tag(p.kvx + ((size_t(par) * p.T + t) * nb + i) * C + c, acc, tag);
    }
    if (l + 1 < d.depth) {  // the next block's KSH buffers (Ds/codes stay) and parameters
      stage_ksh(d, blocks[l + 1], s);
      stage_block(d, p.P, blocks + l + 1, smem_raw + p.L.prm[(l + 1) & 1]);
      cp_async_commit();
    }
    bst(8);  // KV partial published

    // ---- exchange 2: KV of the image (this CTA's columns, tiles in order) -> every CTA ----
    for (int e = tid; e < nb * Cw; e += kThreads) {
      const int i = fdiv(e, invCw), c = rank * Cw + (e - i * Cw);
      const unsigned long long* base = p.kvx + ((size_t(par) * p.T + b * tpi) * nb + i) * C + c;
      const size_t step = size_t(nb) * C;
      float acc = 0.0f;
      for (int j0 = 0; j0 < tpi; j0 += 16) {  // every tile's word in flight at once: one L2 round trip
        unsigned long long w[16];
#pragma unroll
        for (int u = 0; u < 16; ++u)
          if (j0 + u < tpi) w[u] = ld_tag(base + (j0 + u) * step);
#pragma unroll
        for (int u = 0; u < 16; ++u)
          if (j0 + u < tpi) acc += tagged_value(w[u], base + (j0 + u) * step, tag);
      }
      const float kv = acc * kInvPi;
#pragma unroll 1
      for (int q = 0; q < CS; ++q) *reinterpret_cast<float*>(peer[q] + p.L.kv + size_t(i * C + c) * 4) = kv;
    }
    bst(9);  // KV partials arrived (thread 0's)
    if (l + 1 < d.depth)
      cp_async_wait<1>();  // the halo rows; the next block's KSH group may stay in flight
    else
      cp_async_wait<0>();
    cluster.sync();
    bst(10);  // KV gathered

    // ---- attention output (every CTA, whole tile) -> A1: z = 0.5 v + sum KV rows of set bits, z/|z|, + conv ----
    for (int e = tid; e < kRT * H * 8; e += kThreads) {
      const int r = fdiv(e, invH8), rh = e >> 3, h = rh - fdiv(rh, invH) * H, g8 = e & 7, col = h * kD + g8 * 8;
      const bool valid = r < nrows;
      const int n = n0 + r;
      float v[8], z[8];
      load8(v, s.QV() + r * 2 * C + C + col);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = valid ? v[i] : 0.0f, z[i] = 0.0f;
      unsigned long long code = valid ? s.codes()[r * H + h] : 0ull;
      while (code) {
        const int rb = __ffsll(static_cast<long long>(code)) - 1;
        code &= code - 1;
        const float4 k0 = *reinterpret_cast<const float4*>(s.KV() + rb * C + col);
        const float4 k1 = *reinterpret_cast<const float4*>(s.KV() + rb * C + col + 4);
        z[0] += k0.x, z[1] += k0.y, z[2] += k0.z, z[3] += k0.w;
        z[4] += k1.x, z[5] += k1.y, z[6] += k1.z, z[7] += k1.w;
      }
      double ss = 0.0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        z[i] += 0.5f * v[i];
        ss += double(z[i]) * z[i];
      }
      ss = sum_lanes8(ss);
      const float nrm = fmaxf(static_cast<float>(sqrt(ss)), kNormEps);
#pragma unroll
      for (int i = 0; i < 8; ++i) z[i] = z[i] / nrm;
#pragma unroll
      for (int tp = 0; tp < kTaps; ++tp) {
        const int rr = r + tp - kTaps / 2, nn = n + tp - kTaps / 2;
        if (!valid || nn < 0 || nn >= N) continue;
        const float w = blk.conv[h * kTaps + tp];
        const bf16* vt = rr < 0     ? s.Vh() + (rr + 4) * C + col
                         : rr < kRT ? s.QV() + rr * 2 * C + C + col
                                    : s.Vh() + (rr - kRT + 4) * C + col;
        float vv[8];
        load8(vv, vt);
#pragma unroll
        for (int i = 0; i < 8; ++i) z[i] = fmaf(w, vv[i], z[i]);
      }
      __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(s.A1() + r * lda1 + col);
#pragma unroll
      for (int i = 0; i < 4; ++i) dst[i] = __floats2bfloat162_rn(valid ? z[2 * i] : 0.0f, valid ? z[2 * i + 1] : 0.0f);
    }
    __syncthreads();
    bst(11);  // attention output
    if (blk.proj.moe) route(blk.proj, s.A1(), lda1, p.m.gate, s.rexp(), s.rgate(), row0, nrows, rank == 0);
    // ---- proj slice + bias + residual -> x (every CTA) ----
    auto add_residual = [&](int r, int col, float(&v)[8]) {  // x[r][col..col+7] += v in every CTA
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += s.Xs()[r * C + col + i];
      put_x(r, col, v);
    };
    product_out(pp, blk.proj, s.A1(), lda1, s.Cs(), s.rexp(), s.rgate(), nrows, add_residual,
                [&] { bst(12); });  // proj product
    bst(13);                        // proj
    const int Fw = F / CS;
    SliceProduct p1(blk.fc1, rank * Fw, Fw);
    p1.prefetch();
    cluster.sync();
    bst(14);  // x after proj gathered

    // ---- LN2 -> fc1 slice (+ GELU) -> A2 (every CTA) ----
    ln_tile(s.A1(), lda1, s.Xs(), C, nrows, blk.ln2_w, blk.ln2_b, d.eps);
    __syncthreads();
    bst(15);  // LN2
    if (blk.fc1.moe) route(blk.fc1, s.A1(), lda1, p.m.gate, s.rexp(), s.rgate(), row0, nrows, rank == 0);
    bst(16);  // fc1 router (thread 0's)
    const bool moe_gelu = blk.fc1.moe;
    product_out(
        p1, blk.fc1, s.A1(), lda1, s.Cs(), s.rexp(), s.rgate(), nrows,
        [&](int r, int col, float(&v)[8]) {
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = moe_gelu ? gelu_erf(v[i]) : gelu_tanh(v[i]);
          put16(p.L.a2 + size_t(r * lda2 + col) * 2, pack8(v));
        },
        [&] { bst(17); });  // fc1 product
    bst(18);                // fc1
    SliceProduct p2(blk.fc2, rank * Cw, Cw);
    p2.prefetch();
    cluster.sync();
    bst(19);  // hidden gathered

    // ---- fc2 slice + bias + residual -> x (every CTA) ----
    if (blk.fc2.moe) route(blk.fc2, s.A2(), lda2, p.m.gate, s.rexp(), s.rgate(), row0, nrows, rank == 0);
    // (A2 rows past the image hold older values: their outputs are never stored, and rows do not mix)
    bst(20);  // fc2 router
    const bool last = l + 1 == d.depth;
    product_out(
        p2, blk.fc2, s.A2(), lda2, s.Cs(), s.rexp(), s.rgate(), nrows,
        [&](int r, int col, float(&v)[8]) {
          add_residual(r, col, v);
          if (last)
#pragma unroll
            for (int i = 0; i < 8; ++i) p.x[size_t(row0 + r) * C + col + i] = v[i];
        },
        [&] { bst(21); });  // fc2 product
    bst(22);                // fc2
    cp_async_wait<0>();     // the next block's KSH buffers
    cluster.sync();
    bst(23);  // x after fc2 gathered
  }

  // ---- head: LayerNorm of the class row, the classifier (classes split over the cluster, a warp per class) ----
  if (n0 == 0) {
    if (warp == 0) ln_row_warp(s.A1(), s.Xs(), p.m.norm_w, p.m.norm_b, C, d.eps);
    __syncthreads();
    for (int cls = rank * kWarps + warp; cls < d.V; cls += CS * kWarps) {
      const bf16* w = p.m.head_w + size_t(cls) * C;
      float acc = 0.0f;
      for (int c = lane; c < C; c += 32) acc = fmaf(__bfloat162float(s.A1()[c]), __bfloat162float(w[c]), acc);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(kFull, acc, o);
      if (lane == 0) p.logits[size_t(b) * d.V + cls] = acc + __ldg(p.m.head_b + cls);
    }
  }
  stamp(2 + d.depth * kStamps);
  // the last CTA to finish advances the generation (every CTA read it at its start)
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(p.ctl + 1, 1u) == gridDim.x - 1) {
      p.ctl[1] = 0u;
      atomicAdd(p.ctl, 1u);
    }
  }
}

// The sizes the kernel covers, device aside (vit_fused.h).
bool dims_ok(const FusedVitDims& d, int B) {
  const int Kp = patch_k(d);
  return B >= 1 && B <= kFusedMaxBatch && d.depth >= 1 && d.depth < 1024 && d.H >= 1 && d.H <= kMaxH &&
         d.C == d.H * kD && d.C <= kMaxC && d.F >= 64 && d.F % 64 == 0 && Kp % 64 == 0 && std::max(d.F, Kp) <= kMaxK &&
         d.nbits >= 1 && d.nbits <= kMaxBits && d.m >= 1 && d.m <= kMaxM && d.N >= kRT && d.patch >= 4 &&
         d.patch % 4 == 0 && d.S % d.patch == 0 && d.S % 4 == 0 && d.N == (d.S / d.patch) * (d.S / d.patch) + 1 &&
         d.V >= 1;
}

// The launch for B images on the current device: the largest cluster size (8, 4, 2, 1) whose slices are whole n8
// tiles and whose B * tiles-per-image clusters are co-resident (the tiles wait on each other: every cluster must
// run at once). Made once per (device, sizes, B).
struct Plan {
  Layout L;
  PrmLayout P;
  int CS = 0, T = 0;
};

// The cluster launch of T tiles x CS CTAs with `smem` bytes of shared memory (cfg points into attr).
void cluster_launch_config(cudaLaunchConfig_t& cfg, cudaLaunchAttribute& attr, int T, int CS, size_t smem,
                           cudaStream_t stream) {
  cfg = cudaLaunchConfig_t{};
  cfg.gridDim = dim3(T * CS);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr = cudaLaunchAttribute{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = CS, attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
  cfg.attrs = &attr, cfg.numAttrs = 1;
}
Plan plan_for(const FusedVitDims& d, int B) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, int, int, int, int, int, int>, Plan> plans;
  int dev = 0;
  SAV_CUDA_CHECK(cudaGetDevice(&dev));
  const auto key = std::make_tuple(dev, B, d.N, d.C, d.F, d.m, d.nbits, patch_k(d));
  std::lock_guard<std::mutex> lock(mu);
  if (const auto it = plans.find(key); it != plans.end()) return it->second;
  Plan pl;
  pl.L = layout_for(d);
  pl.P = prm_layout(d);
  pl.T = B * tiles_per_image(d.N);
  if (pl.L.total <= size_t(max_smem_per_block())) {
    // the kernel's dynamic shared-memory limit only grows (a cached plan of a larger model must stay launchable)
    allow_dynamic_smem(reinterpret_cast<const void*>(vit_fused_kernel), pl.L.total);
    for (const int cs : {8, 4, 2, 1}) {
      if (d.C % (8 * cs) || d.F % (8 * cs) || (2 * d.C) % (8 * cs)) continue;
      cudaLaunchConfig_t cfg;
      cudaLaunchAttribute attr;
      cluster_launch_config(cfg, attr, pl.T, cs, pl.L.total, nullptr);
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, vit_fused_kernel, &cfg) != cudaSuccess) {
        (void)cudaGetLastError();
        continue;
      }
      if (clusters >= pl.T) {
        pl.CS = cs;
        break;
      }
    }
  }
  plans.emplace(key, pl);
  return pl;
}

}  // namespace

bool vit_fused_supports(const FusedVitDims& d, int B) {
  if (!dims_ok(d, B)) return false;
  if (device_available()) return plan_for(d, B).CS > 0;
  return true;
}

void FusedVitWorkspace::ensure(const FusedVitDims& d, int capacity) {
  if (capacity <= capacity_) return;
  SAV_CUDA_CHECK(cudaDeviceSynchronize());  // launches in flight may still use the old buffers
  const size_t M = size_t(capacity) * d.N, T = size_t(capacity) * tiles_per_image(d.N);
  x_.resize(M * d.C);
  vg_.resize(M * d.C);
  sig_.resize(2 * T * d.H);
  kvx_.resize(2 * T * d.nbits * d.C);
  ctl_.resize(2);
  sig_.fill_bytes(0);  // tag 0 never matches (tags are odd)
  kvx_.fill_bytes(0);
  ctl_.fill_bytes(0);
  capacity_ = capacity;
}

void vit_fused_forward(const FusedVitModel& m, int B, const float* images, float* logits, FusedVitWorkspace& ws,
                       cudaStream_t stream, unsigned long long* trace) {
  SAV_CHECK(dims_ok(m.dims, B),
            "vit_fused_forward: sizes outside the fused kernel (B=" << B << ", C=" << m.dims.C << ")");
  SAV_CHECK(images && logits && m.blocks && m.patch_w && m.head_w, "vit_fused_forward: null pointer");
  SAV_CHECK(ws.capacity() >= B, "vit_fused_forward: workspace for " << ws.capacity() << " images, batch " << B);
  const Plan pl = plan_for(m.dims, B);
  SAV_CHECK(pl.CS > 0, "vit_fused_forward: the kernel does not fit this device at batch "
                           << B << " (" << pl.L.total << " B shared memory, " << pl.T << " co-resident clusters)");
  KParams kp{};
  kp.m = m;
  kp.patch.K = patch_k(m.dims), kp.patch.F = m.dims.C, kp.patch.w0 = m.patch_w, kp.patch.b32 = m.patch_b;
  kp.T = pl.T, kp.tpi = tiles_per_image(m.dims.N), kp.CS = pl.CS, kp.L = pl.L, kp.P = pl.P;
  kp.images = images, kp.logits = logits;
  kp.x = ws.x_.get(), kp.vg = ws.vg_.get(), kp.sig = ws.sig_.get(), kp.kvx = ws.kvx_.get(), kp.ctl = ws.ctl_.get();
  kp.trace = trace;
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr;
  cluster_launch_config(cfg, attr, pl.T, pl.CS, pl.L.total, stream);
  SAV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, vit_fused_kernel, kp));
}

std::string vit_fused_trace(const FusedVitModel& m, int B, const float* images, float* logits, FusedVitWorkspace& ws,
                            cudaStream_t stream) {
  const int depth = m.dims.depth, n = 3 + depth * kStamps;
  DeviceBuffer<unsigned long long> tr(2 * size_t(n));
  tr.fill_bytes(0);
  vit_fused_forward(m, B, images, logits, ws, stream, tr.get());
  SAV_CUDA_CHECK(cudaStreamSynchronize(stream));
  const std::vector<unsigned long long> h = tr.download();
  const Plan pl = plan_for(m.dims, B);
  // the sub-step each stamp closes (kernel: bst(k))
  const char* names[kStamps] = {"LN1 + qk/v slices + gather",
                                "q / |q|, |a|^2",
                                "distances D",
                                "sigma partial published",
                                "wait sigma partials (exchange 1)",
                                "sigma, halo rows issued",
                                "",
                                "codes (k = exp(-D/2s) - mu, y = A k)",
                                "KV partial published, next KSH issued",
                                "wait KV partials (exchange 2)",
                                "KV gathered (cluster barrier)",
                                "attention output",
                                "proj router + product (mma)",
                                "proj epilogue",
                                "proj gathered (cluster barrier)",
                                "LN2",
                                "fc1 router",
                                "fc1 product (mma)",
                                "fc1 epilogue (GELU)",
                                "hidden gathered (cluster barrier)",
                                "fc2 router",
                                "fc2 product (mma)",
                                "fc2 epilogue",
                                "x gathered (cluster barrier)"};
  double us[kStamps] = {0}, cyc[kStamps] = {0};
  for (int l = 0; l < depth; ++l) {
    int prev = 1 + l * kStamps;
    for (int k = 0; k < kStamps; ++k) {
      const int i = 2 + l * kStamps + k;
      if (h[i] == 0) continue;
      us[k] += double(h[i] - h[prev]) * 1e-3 / depth;
      cyc[k] += double(h[n + i] - h[n + prev]) / depth;
      prev = i;
    }
  }
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(2);
  os << "fused kernel trace (" << pl.T << " clusters of " << pl.CS << " CTAs, batch " << B << ", CTA 0's clock): total "
     << double(h[n - 1] - h[0]) * 1e-3 << " us, embedding " << double(h[1] - h[0]) * 1e-3 << " us, head "
     << double(h[n - 1] - h[n - 2]) * 1e-3 << " us, SM clock "
     << double(h[2 * n - 1] - h[n]) / double(h[n - 1] - h[0]) * 1e3 << " MHz; per block (mean of " << depth
     << "), us and cycles:\n";
  for (int k = 0; k < kStamps; ++k)
    if (names[k][0]) os << "  " << names[k] << ": " << us[k] << " us, " << static_cast<long>(cyc[k]) << " cycles\n";
  return os.str();
}

}  // namespace sav::cuda
