// Hamming attention core over a thread-block cluster per (image, head): any N, one launch per call.
// Spec and API: hamming_tiled.h (math as cpu::hamming_attention_forward).
//
// Legend: B batch, N tokens, C channels, H heads, d = C/H, b = nbits, m anchors; G CTAs per cluster (one cluster
// per (image, head)), CTA g of a cluster owns the `chunk` tokens [g*chunk, (g+1)*chunk) of its image (the last
// CTAs may own fewer or none); 256 threads per CTA; m4, b4 = m, b rounded up to 4; TT = tokens per D tile.
//
// Plan (host): G = the smallest of 1, 2, 4, 8 with B*H*G >= 2 * SMs (at most N/16 so a CTA gets >= 16 tokens),
// then doubled until the chunk fits the cache budget (113 KB of shared memory: two CTAs per SM on sm_90);
// if it does not fit even at G = 8, the chunk's distances and codes go to the workspace (global memory) and
// qk / v are staged tile by tile ("uncached"; only for very long sequences, or f32 at N >~ 2400 with d = 32).
//
// Phases of the kernel (one launch; "cs" = cluster.sync(), barrier over the G CTAs):
//  0. cp.async (16 B, when the rows are aligned; else plain loads) of the chunk's raw qk rows and of its v rows
//     with a 4-token halo on each side (kept in the input type: bf16 halves the footprint), in flight while the
//     head's constants are staged: anchors transposed (d, m4) and their squared norms, mu, A transposed (m, b4);
//     the chunk's codes cleared.
//  1. per D tile of TT tokens: q = x / max(||x||, eps) (8 lanes per token, norm in double as the CPU) written
//     transposed Qt (d, TT + 4) with ||q||^2; then D (m, chunk) = max(||q||^2 + ||a||^2 - 2 q.a, 0) as a small
//     register-tiled GEMM (4 tokens x 4 anchors per thread, float4 smem loads; split over d and reduced by
//     shuffles when there are few tiles); the CTA's sum of D (double, fixed order) -> cs -> every CTA adds the
//     G partials in rank order (DSMEM) -> the same sigma everywhere.
//  2. k = exp(-D / (2 sigma)) - mu in place; y = A k per 4 tokens x 4 bits (split over m likewise); bits
//     y > 0 OR-ed into the packed uint64 codes (shared-memory atomicOr: order-free, deterministic).
//  3. MatAdd #1 partial: thread = (bit r, 4 columns) (x token segments when that leaves threads idle):
//     KV_r += v_n over the chunk's tokens with bit r set, in token order; segments added in order -> the CTA's
//     KV partial (b, d) -> cs -> every CTA sums the G partials in rank order and scales by 1/pi (the CPU's
//     kv * (1/pi)); then an arrive on the cluster barrier (its remote reads are done; the matching wait is the
//     last instruction, so no CTA leaves while its shared memory may still be read).
//  4. per token (L lanes, 4 contiguous columns each): z = sum over set bits (ascending) of KV_r/pi, + 0.5 v;
//     out = z / max(||z||, eps) (norm in double) + the 9 taps in order (halo rows from the staged v); stores.
// Every sum has a fixed order and shape-only thread assignments, so reruns and graph replays are bit-identical.
//
// Limits: d <= 128 (8 lanes x 16 registers in the normalisation, 4 columns x 32 lanes in phase 4), b <= 64
// (uint64 codes), m <= 64 (smem constants; any m would work but the budget assumes it), N <= 2^26 (int
// indices); G <= 8 (portable cluster size).
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "ops/cuda/hamming_tiled.h"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/ptx.cuh"

namespace sav::cuda {

namespace {

namespace cg = cooperative_groups;
using namespace ptx;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxD = 128;
constexpr int kMaxBits = 64;
constexpr int kMaxM = 64;
constexpr int kMaxN = 1 << 26;
constexpr int kMaxCluster = 8;
constexpr int kTaps = 9;
constexpr int kPad = kTaps / 2;
constexpr int kMinTokensPerCta = 16;
constexpr int kMaxTile = 64;
constexpr size_t kCacheBudget = 113 * 1024;  // 2 CTAs per SM on sm_90 (228 KB per SM, 1 KB reserved per CTA)
constexpr size_t kSmemLimit = 227 * 1024;    // sm_90 opt-in limit per block
constexpr float kNormEps = 1e-6f;            // cpu::kHammingNormEps
constexpr float kSigmaMin = 1e-12f;          // cpu::kHammingSigmaMin
constexpr float kInvPi = 0.318309886183790671538f;

// ---------------------------------------------------------------------------------------------------------
// Host plan: cluster size, chunk, tile and the shared-memory carve-up (byte offsets).

inline int round_up(int x, int a) { return (x + a - 1) / a * a; }
inline size_t align16(size_t x) { return (x + 15) / 16 * 16; }

struct Layout {
  size_t red, at, aa, mu, at2, kvp, u, codes, dc, xraw, vraw, total;
};

struct Plan {
  int G = 1, chunk = 1, TT = 32, DCp = 4, m4 = 4, nb4 = 4;
  bool cached = true;
  Layout L{};
};

Layout make_layout(int d, int m, int nbits, int m4, int nb4, int TT, int chunk, bool cached, size_t tsz) {
  Layout L{};
  size_t o = 0;
  L.red = o, o = align16(o + 16 * sizeof(double));  // 8 warp sums, the CTA partial, sigma
  L.at = o, o = align16(o + size_t(d) * m4 * sizeof(float));
  L.aa = o, o = align16(o + size_t(m4) * sizeof(float));
  L.mu = o, o = align16(o + size_t(m4) * sizeof(float));
  L.at2 = o, o = align16(o + size_t(m) * nb4 * sizeof(float));
  L.kvp = o, o = align16(o + size_t(nbits) * d * sizeof(float));
  // union: Qt (d, TT + 4) + ||q||^2 (TT) in phase 1 | segment partials (<= 256 x 4) in phase 3 | KV/pi (b, d)
  const size_t u = std::max({size_t(d) * (TT + 4) * sizeof(float) + size_t(TT) * sizeof(float),
                             size_t(kThreads) * 4 * sizeof(float), size_t(nbits) * d * sizeof(float)});
  L.u = o, o = align16(o + u);
  const int DCp = round_up(chunk, 4);
  const int rows = cached ? chunk : TT;
  L.codes = o, o = align16(o + (cached ? size_t(DCp) * sizeof(unsigned long long) : 0));
  L.dc = o, o = align16(o + (cached ? size_t(m) * DCp * sizeof(float) : 0));
  L.xraw = o, o = align16(o + size_t(rows) * d * tsz);
  L.vraw = o, o = align16(o + size_t(rows + 2 * kPad) * d * tsz);
  L.total = o;
  return L;
}

bool dims_ok(const HammingTiledDims& dd) {
  if (!(dd.B >= 0 && dd.N >= 1 && dd.N <= kMaxN && dd.H >= 1 && dd.C >= dd.H && dd.C % dd.H == 0)) return false;
  const int d = dd.C / dd.H;
  if (!(d >= 1 && d <= kMaxD && dd.nbits >= 1 && dd.nbits <= kMaxBits && dd.m >= 1 && dd.m <= kMaxM)) return false;
  return int64_t(dd.B) * dd.H * kMaxCluster <= int64_t(INT32_MAX);  // 1-D grid of G * B * H CTAs
}

Plan plan_at(const HammingTiledDims& dd, size_t tsz, int G, bool cached) {
  Plan p;
  const int d = dd.C / dd.H;
  p.G = G;
  p.chunk = (dd.N + G - 1) / G;
  p.TT = cached ? std::min(kMaxTile, round_up(p.chunk, 32)) : kMaxTile;
  p.DCp = round_up(p.chunk, 4);
  p.m4 = round_up(dd.m, 4);
  p.nb4 = round_up(dd.nbits, 4);
  p.cached = cached;
  p.L = make_layout(d, dd.m, dd.nbits, p.m4, p.nb4, p.TT, p.chunk, cached, tsz);
  return p;
}

// The decision at G = kMaxCluster: the chunk in shared memory when it fits the budget, or when it needs no
// more shared memory than the tiled (uncached) form and fits the device limit (large d, b, m: the fixed part
// dominates); else uncached (distances and codes in the workspace).
Plan plan_at_max(const HammingTiledDims& dd, size_t tsz) {
  const Plan c = plan_at(dd, tsz, kMaxCluster, true);
  if (c.L.total <= kCacheBudget) return c;
  const Plan u = plan_at(dd, tsz, kMaxCluster, false);
  if (c.L.total <= kSmemLimit && c.L.total <= u.L.total) return c;
  return u;
}

Plan make_plan(const HammingTiledDims& dd, size_t tsz, int sms) {
  const int64_t bh = int64_t(dd.B) * dd.H;
  int G = 1;  // enough CTAs for two per SM
  while (G < kMaxCluster && bh * G < 2 * int64_t(std::max(sms, 1))) G *= 2;
  int gcap = 1;  // at least kMinTokensPerCta tokens per CTA
  while (gcap < kMaxCluster && int64_t(gcap) * 2 * kMinTokensPerCta <= dd.N) gcap *= 2;
  for (G = std::min(G, gcap); G < kMaxCluster; G *= 2) {  // smaller chunks until the chunk fits the budget
    const Plan p = plan_at(dd, tsz, G, true);
    if (p.L.total <= kCacheBudget) return p;
  }
  return plan_at_max(dd, tsz);
}

// Uncached plans always run with G = kMaxCluster: the workspace holds B*H*8 chunks of DCp tokens. Sized for
// whichever element type needs it (the decision is made at G = 8 only, so it does not depend on the device).
size_t workspace_for(const HammingTiledDims& dd) {
  if (plan_at_max(dd, sizeof(float)).cached && plan_at_max(dd, sizeof(bf16)).cached) return 0;
  const int DCp = round_up((dd.N + kMaxCluster - 1) / kMaxCluster, 4);
  return size_t(dd.B) * dd.H * kMaxCluster * DCp * (size_t(dd.m) * sizeof(float) + sizeof(unsigned long long));
}

// ---------------------------------------------------------------------------------------------------------
// Device side.

template <class T>
struct TiledParams {
  T* out;
  const T* qk;
  const T* v;
  const float *anchors, *mu, *A, *conv_w;
  float* ws_d;                   // uncached: D / k of every chunk, (m, DCp) each
  unsigned long long* ws_codes;  // uncached: codes of every chunk, DCp each
  long long ldo, ldqk, ldv;
  int N, H, d, nbits, m, m4, nb4;
  int G, chunk, TT, DCp;
  int lanes;  // phase 4: lanes per token (power of two <= 32)
  bool cached, q_async, v_async, out_vec;
  unsigned o_red, o_at, o_aa, o_mu, o_at2, o_kvp, o_u, o_codes, o_dc, o_xraw, o_vraw;  // smem byte offsets
};

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store_f32(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_f32(bf16* p, float x) { *p = __float2bfloat16_rn(x); }

// 4 consecutive elements (16-byte aligned for float, 8-byte for bf16) as floats.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const bf16* p) {
  const __nv_bfloat162* q = reinterpret_cast<const __nv_bfloat162*>(p);
  const float2 a = __bfloat1622float2(q[0]), b = __bfloat1622float2(q[1]);
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ void store4(float* p, float4 x) { *reinterpret_cast<float4*>(p) = x; }
__device__ __forceinline__ void store4(bf16* p, float4 x) {
  __nv_bfloat162* q = reinterpret_cast<__nv_bfloat162*>(p);
  q[0] = __floats2bfloat162_rn(x.x, x.y);
  q[1] = __floats2bfloat162_rn(x.z, x.w);
}

// Rows row0 .. row0 + nrows - 1 of src (row stride ld, d columns) -> dst (row stride d), by 16-byte cp.async
// (async: d * sizeof(T), ld * sizeof(T) and the pointers 16-byte aligned) or plain loads.
template <class T>
__device__ void stage_rows(T* dst, const T* src, long long ld, int row0, int nrows, int d, bool async) {
  if (nrows <= 0) return;
  if (async) {
    constexpr int kPer = 16 / int(sizeof(T));
    const int cpr = d / kPer, total = nrows * cpr;
    for (int e = threadIdx.x; e < total; e += kThreads) {
      const int r = e / cpr, c = (e - r * cpr) * kPer;
      cp_async16(dst + size_t(r) * d + c, src + (long long)(row0 + r) * ld + c);
    }
  } else {
    const int total = nrows * d;
    for (int e = threadIdx.x; e < total; e += kThreads) {
      const int r = e / d, c = e - r * d;
      dst[size_t(r) * d + c] = src[(long long)(row0 + r) * ld + c];
    }
  }
}

// The head's constants: At[i * m4 + j] = anchors[j * d + i] (d, m4), At2[j * nb4 + r] = A[r * m + j] (m, nb4),
// mus (m4) = mu, zero padded; coalesced global reads, all of a round in flight before the transposed stores.
__device__ void stage_constants(float* At, float* At2, float* mus, const float* anc, const float* Ah, const float* mu,
                                int d, int m, int m4, int nb, int nb4) {
  constexpr int kBatch = 8;
  const int tid = threadIdx.x, na = m * d, nA = nb * m, total = max(na, nA);
  for (int base = 0; base < total; base += kBatch * kThreads) {
    float xa[kBatch], xA[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int e = base + k * kThreads + tid;
      xa[k] = e < na ? anc[e] : 0.0f;
      xA[k] = e < nA ? Ah[e] : 0.0f;
    }
    const float xm = base == 0 && tid < m ? mu[tid] : 0.0f;  // m <= 64 < kThreads
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int e = base + k * kThreads + tid;
      if (e < na) {
        const int j = e / d;
        At[(e - j * d) * m4 + j] = xa[k];
      }
      if (e < nA) {
        const int r = e / m;
        At2[(e - r * m) * nb4 + r] = xA[k];
      }
    }
    if (base == 0 && tid < m4) mus[tid] = xm;
  }
  for (int e = tid; e < d * (m4 - m); e += kThreads) {  // padding anchors m .. m4-1
    const int i = e / (m4 - m);
    At[i * m4 + m + (e - i * (m4 - m))] = 0.0f;
  }
  for (int e = tid; e < m * (nb4 - nb); e += kThreads) {  // padding bits b .. b4-1
    const int j = e / (nb4 - nb);
    At2[j * nb4 + nb + (e - j * (nb4 - nb))] = 0.0f;
  }
}

// acc[4u + k] += x[u] * y[k]  (u over the 4 tokens of x, k over the 4 anchors / bits of y)
__device__ __forceinline__ void fma_4x4(float* acc, const float4 x, const float4 y) {
  const float xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[4 * u + k] = fmaf(xs[u], ys[k], acc[4 * u + k]);
}

// Split factor of a GEMM over its reduction dimension: the largest power of two <= 8 that keeps items * KS
// within the CTA (few items: more threads per item, shorter dependency chains).
__device__ __forceinline__ int split_factor(int items) {
  int ks = 1;
  while (ks < 8 && items * ks * 2 <= kThreads) ks *= 2;
  return ks;
}

template <class T, bool kVec4>
__global__ void __launch_bounds__(kThreads, 2) hamming_tiled_kernel(const __grid_constant__ TiledParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need sm_90; the launcher refuses older devices
#else
  extern __shared__ __align__(16) unsigned char smem[];
  cg::cluster_group cluster = cg::this_cluster();
  constexpr unsigned kFull = 0xffffffffu;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = p.G;
  const int g = static_cast<int>(cluster.block_rank());
  const int bh = static_cast<int>(blockIdx.x) / G;
  const int b = bh / p.H, h = bh - b * p.H;
  const int N = p.N, d = p.d, m = p.m, nb = p.nbits, m4 = p.m4, nb4 = p.nb4, DCp = p.DCp;
  const int tb = min(N, g * p.chunk);   // first token (index within the image) of this CTA
  const int te = min(N, tb + p.chunk);  // one past the last
  const int cnt = te - tb, cnt4 = (cnt + 3) & ~3;

  double* red = reinterpret_cast<double*>(smem + p.o_red);
  float* At = reinterpret_cast<float*>(smem + p.o_at);    // (d, m4) anchors transposed
  float* aa = reinterpret_cast<float*>(smem + p.o_aa);    // (m4) ||a_j||^2
  float* mus = reinterpret_cast<float*>(smem + p.o_mu);   // (m4)
  float* At2 = reinterpret_cast<float*>(smem + p.o_at2);  // (m, nb4) A transposed
  float* KVp = reinterpret_cast<float*>(smem + p.o_kvp);  // (b, d) this CTA's MatAdd #1 partial (read by the cluster)
  float* U = reinterpret_cast<float*>(smem + p.o_u);
  T* Xr = reinterpret_cast<T*>(smem + p.o_xraw);  // raw qk rows: the chunk (cached) or one tile
  T* Vr = reinterpret_cast<T*>(smem + p.o_vraw);  // raw v rows with a 4-token halo on each side
  const int64_t chunk_id = int64_t(bh) * G + g;
  unsigned long long* codes = p.cached ? reinterpret_cast<unsigned long long*>(smem + p.o_codes)
                                       : p.ws_codes + chunk_id * DCp;  // (chunk) packed codes
  float* Dc = p.cached ? reinterpret_cast<float*>(smem + p.o_dc)
                       : p.ws_d + chunk_id * m * DCp;  // (m, DCp) D, then k, of the chunk's tokens

  const T* qk = p.qk + int64_t(b) * N * p.ldqk + int64_t(h) * d;
  const T* vv = p.v + int64_t(b) * N * p.ldv + int64_t(h) * d;

  // ---- 0. async staging of the chunk (cached plans), the head's constants, cleared codes ----
  float cw[kTaps];  // used in phase 4; the loads are in flight meanwhile
#pragma unroll
  for (int t = 0; t < kTaps; ++t) cw[t] = p.conv_w[h * kTaps + t];
  if (p.cached && cnt > 0) {
    stage_rows(Xr, qk, p.ldqk, tb, cnt, d, p.q_async);
    cp_async_commit();
    const int v0 = max(0, tb - kPad), v1 = min(N, te + kPad);  // Vr row 0 is token tb - 4
    stage_rows(Vr + size_t(v0 - (tb - kPad)) * d, vv, p.ldv, v0, v1 - v0, d, p.v_async);
    cp_async_commit();
  }
  stage_constants(At, At2, mus, p.anchors + int64_t(h) * m * d, p.A + int64_t(h) * nb * m, p.mu + int64_t(h) * m, d, m,
                  m4, nb, nb4);
  for (int t = tid; t < cnt4; t += kThreads) codes[t] = 0ull;

  // ---- 1. q, D and the CTA's sum of D ----
  const int TT = p.TT, TTp = TT + 4;  // TTp = 4 mod 32: conflict-free transposed writes, float4 reads
  float* Qt = U;                      // (d, TTp)
  float* qq = U + size_t(d) * TTp;    // (TT)
  double dsum = 0.0;
  for (int t0 = 0; t0 < cnt; t0 += TT) {
    const int tc = min(TT, cnt - t0), tc4 = (tc + 3) & ~3;
    if (p.cached) {
      if (t0 == 0) cp_async_wait<1>();  // the qk group (v may still be in flight)
    } else {
      stage_rows(Xr, qk, p.ldqk, tb + t0, tc, d, p.q_async);
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();
    if (t0 == 0) {  // ||a_j||^2 from the staged anchors: 8 lanes per anchor (m4 % 4 == 0: uniform per warp)
      const int l8 = lane & 7;
      for (int j = tid >> 3; j < m4; j += kThreads / 8) {
        float s2 = 0.0f;
        for (int i = l8; i < d; i += 8) s2 = fmaf(At[i * m4 + j], At[i * m4 + j], s2);
        s2 = sum_lanes8(s2);
        if (l8 == 0) aa[j] = s2;
      }
    }
    // normalisation: 8 lanes per token; the 4 groups of a warp take 4 consecutive tokens, tc4 % 4 == 0, so
    // every warp runs the loop uniformly (full-mask shuffles)
    {
      const T* xs = Xr + size_t(p.cached ? t0 : 0) * d;
      const int l8 = lane & 7, kq = (d + 7) / 8;
      for (int tt = tid >> 3; tt < tc4; tt += kThreads / 8) {
        const bool valid = tt < tc;
        float x[kMaxD / 8];
        double ss = 0.0;
#pragma unroll
        for (int k = 0; k < kMaxD / 8; ++k) {
          const int i = l8 + 8 * k;
          x[k] = (k < kq && valid && i < d) ? to_f32(xs[size_t(tt) * d + i]) : 0.0f;
          if (k < kq) ss += double(x[k]) * x[k];
        }
        ss = sum_lanes8(ss);
        const float nrm = fmaxf(static_cast<float>(sqrt(ss)), kNormEps);
        float q2 = 0.0f;
#pragma unroll
        for (int k = 0; k < kMaxD / 8; ++k) {
          const int i = l8 + 8 * k;
          if (k < kq && i < d) {
            const float q = x[k] / nrm;  // as the CPU: x / max(||x||, eps)
            Qt[i * TTp + tt] = q;
            q2 = fmaf(q, q, q2);
          }
        }
        q2 = sum_lanes8(q2);
        if (l8 == 0) qq[tt] = q2;
      }
    }
    __syncthreads();
    // D GEMM: item = (4 tokens, 4 anchors), KS threads per item split d
    {
      const int ntg = tc4 >> 2, njg = m4 >> 2, items = ntg * njg;
      const int KS = split_factor(items), per = kThreads / KS, nrep = (items + per - 1) / per;
      const int itl = tid / KS, ks = tid - itl * KS;
      const int kc = (d + KS - 1) / KS, i0 = min(d, ks * kc), i1 = min(d, i0 + kc);
      const float4* Q4 = reinterpret_cast<const float4*>(Qt);
      const float4* A4 = reinterpret_cast<const float4*>(At);
      for (int rep = 0; rep < nrep; ++rep) {  // uniform trip count: full-mask shuffles below
        const int it = rep * per + itl;
        const bool act = it < items;
        const int jg = act ? it / ntg : 0, tg = act ? it - jg * ntg : 0;
        float acc[16];
#pragma unroll
        for (int k = 0; k < 16; ++k) acc[k] = 0.0f;
        if (act) {
#pragma unroll 4
          for (int i = i0; i < i1; ++i) fma_4x4(acc, Q4[i * (TTp >> 2) + tg], A4[i * (m4 >> 2) + jg]);
        }
        for (int o = 1; o < KS; o <<= 1)
#pragma unroll
          for (int k = 0; k < 16; ++k) acc[k] += __shfl_xor_sync(kFull, acc[k], o);
        if (act && ks == 0) {
#pragma unroll
          for (int a = 0; a < 4; ++a) {
            const int j = 4 * jg + a;
            if (j < m) {
              float Dv[4];
#pragma unroll
              for (int u = 0; u < 4; ++u) {
                Dv[u] = fmaxf(qq[4 * tg + u] + aa[j] - 2.0f * acc[4 * u + a], 0.0f);
                if (4 * tg + u < tc) dsum += Dv[u];
              }
              *reinterpret_cast<float4*>(Dc + size_t(j) * DCp + t0 + 4 * tg) = make_float4(Dv[0], Dv[1], Dv[2], Dv[3]);
            }
          }
        }
      }
    }
    __syncthreads();  // Qt / Xr are rewritten by the next tile
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) dsum += __shfl_xor_sync(kFull, dsum, o);
  if (lane == 0) red[warp] = dsum;
  __syncthreads();
  if (tid == 0) {
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += red[w];
    red[8] = s;
  }
  cluster.sync();  // every CTA's partial is in place

  // ---- 2. sigma (rank order), k in place, y and the codes ----
  float* sc = reinterpret_cast<float*>(red + 10);
  if (warp == 0) {  // lane r fetches CTA r's partial; lane 0 adds them in rank order
    const double part = lane < G ? *cluster.map_shared_rank(red + 8, lane) : 0.0;
    double tot = 0.0;
    for (int r = 0; r < G; ++r) tot += __shfl_sync(kFull, part, r);
    const float sg = fmaxf(static_cast<float>(tot / (double(N) * m)), kSigmaMin);
    if (lane == 0) sc[0] = -1.0f / (2.0f * sg);
  }
  __syncthreads();
  {
    const float nis = sc[0];
    for (int e = tid; e < m * cnt4; e += kThreads) {
      const int j = e / cnt4, t = e - j * cnt4;
      float* dp = Dc + size_t(j) * DCp + t;
      *dp = t < cnt ? expf(*dp * nis) - mus[j] : 0.0f;
    }
  }
  __syncthreads();
  {
    const int ntg = cnt4 >> 2, nrg = nb4 >> 2, items = ntg * nrg;
    const int KS = split_factor(items), per = kThreads / KS, nrep = (items + per - 1) / per;
    const int itl = tid / KS, ks = tid - itl * KS;
    const int kc = (m + KS - 1) / KS, j0 = min(m, ks * kc), j1 = min(m, j0 + kc);
    const float4* K4 = reinterpret_cast<const float4*>(Dc);
    const float4* B4 = reinterpret_cast<const float4*>(At2);
    for (int rep = 0; rep < nrep; ++rep) {
      const int it = rep * per + itl;
      const bool act = it < items;
      const int rg = act ? it / ntg : 0, tg = act ? it - rg * ntg : 0;
      float acc[16];
#pragma unroll
      for (int k = 0; k < 16; ++k) acc[k] = 0.0f;
      if (act) {
#pragma unroll 4
        for (int j = j0; j < j1; ++j) fma_4x4(acc, K4[j * (DCp >> 2) + tg], B4[j * (nb4 >> 2) + rg]);
      }
      for (int o = 1; o < KS; o <<= 1)
#pragma unroll
        for (int k = 0; k < 16; ++k) acc[k] += __shfl_xor_sync(kFull, acc[k], o);
      if (act && ks == 0) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int t = 4 * tg + u;
          unsigned long long bits = 0ull;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const int r = 4 * rg + k;
            if (r < nb && acc[4 * u + k] > 0.0f) bits |= 1ull << r;
          }
          if (t < cnt && bits) atomicOr(codes + t, bits);
        }
      }
    }
  }
  cp_async_wait<0>();  // the v rows (cached plans)
  __syncthreads();

  // ---- 3. MatAdd #1 partial over the chunk, then the cluster sum ----
  constexpr int W = kVec4 ? 4 : 1;             // columns per item
  constexpr int KI = kVec4 ? 8 : 32;           // items per thread: b * d / W / 256 <= KI
  const int VT = p.cached ? max(cnt, 1) : TT;  // tokens per staged v tile
  {
    const int nq = d / W, items = nb * nq;
    const int S = items < kThreads ? kThreads / items : 1;  // token segments (S > 1: one item per thread)
    const bool kv_act = tid < items * S;
    const int seg = S > 1 ? tid / items : 0;
    int rc[KI], nk = 0;  // item k: bit r = rc >> 16, first column rc & 0xffff
#pragma unroll
    for (int k = 0; k < KI; ++k) {
      const int it = S > 1 ? tid - seg * items : tid + k * kThreads;
      const bool ok = kv_act && it < items && (S == 1 || k == 0);
      const int r = ok ? it / nq : 0;
      rc[k] = ok ? (r << 16) | ((it - r * nq) * W) : 0;
      if (ok) nk = k + 1;
    }
    float acc[KI * W];
#pragma unroll
    for (int k = 0; k < KI * W; ++k) acc[k] = 0.0f;
    for (int t0 = 0; t0 < cnt; t0 += VT) {
      const int tc = min(VT, cnt - t0), vbase = tb + t0 - kPad;  // vbase: token of Vr row 0
      if (!p.cached) {
        __syncthreads();  // the previous tile's readers are done
        const int v0 = max(0, vbase), v1 = min(N, tb + t0 + tc + kPad);
        stage_rows(Vr + size_t(v0 - vbase) * d, vv, p.ldv, v0, v1 - v0, d, p.v_async);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
      }
      if (nk > 0) {
        const int len = (tc + S - 1) / S, s0 = min(tc, seg * len), s1 = min(tc, s0 + len);
        for (int t = s0; t < s1; ++t) {
          const unsigned long long c = codes[t0 + t];
          const T* row = Vr + size_t(t + kPad) * d;  // token tb + t0 + t
#pragma unroll
          for (int k = 0; k < KI; ++k) {
            if (k < nk && ((c >> (rc[k] >> 16)) & 1ull)) {
              if constexpr (kVec4) {
                const float4 x = load4(row + (rc[k] & 0xffff));
                acc[4 * k] += x.x;
                acc[4 * k + 1] += x.y;
                acc[4 * k + 2] += x.z;
                acc[4 * k + 3] += x.w;
              } else {
                acc[k] += to_f32(row[rc[k] & 0xffff]);
              }
            }
          }
        }
      }
    }
    if (S > 1) {  // segments added in order (U is free: Qt's last use was before several barriers)
      float* segp = U;
      const int item = tid - seg * items;
      if (kv_act && seg > 0)
#pragma unroll
        for (int w = 0; w < W; ++w) segp[(size_t(seg - 1) * items + item) * W + w] = acc[w];
      __syncthreads();
      if (kv_act && seg == 0)
        for (int s = 1; s < S; ++s)
#pragma unroll
          for (int w = 0; w < W; ++w) acc[w] += segp[(size_t(s - 1) * items + item) * W + w];
    }
    if (seg == 0) {
#pragma unroll
      for (int k = 0; k < KI; ++k)
        if (k < nk)
#pragma unroll
          for (int w = 0; w < W; ++w) KVp[(rc[k] >> 16) * d + (rc[k] & 0xffff) + w] = acc[k * W + w];
    }
  }
  cluster.sync();  // every CTA's KV partial is in place (and U's segment partials are consumed)
  float* KVs = U;  // (b, d) KV / pi of the whole head
  for (int e = tid; e < nb * d; e += kThreads) {
    float part[kMaxCluster];
#pragma unroll
    for (int r = 0; r < kMaxCluster; ++r) part[r] = r < G ? *cluster.map_shared_rank(KVp + e, r) : 0.0f;
    float s = part[0];
#pragma unroll
    for (int r = 1; r < kMaxCluster; ++r)
      if (r < G) s += part[r];
    KVs[e] = s * kInvPi;  // the CPU's kv * (1/pi)
  }
  auto token = cluster.barrier_arrive();  // remote reads done; the wait is at the very end
  __syncthreads();

  // ---- 4. MatAdd #2, normalisation, conv, stores ----
  {
    const int L = p.lanes, TPW = 32 / L, gi = lane / L, li = lane - gi * L;
    int col[4];
    bool cok[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      col[k] = kVec4 ? 4 * li + k : li + L * k;
      cok[k] = col[k] < d;
    }
    for (int t0 = 0; t0 < cnt; t0 += VT) {
      const int tc = min(VT, cnt - t0), vbase = tb + t0 - kPad;
      if (!p.cached) {
        __syncthreads();
        const int v0 = max(0, vbase), v1 = min(N, tb + t0 + tc + kPad);
        stage_rows(Vr + size_t(v0 - vbase) * d, vv, p.ldv, v0, v1 - v0, d, p.v_async);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
      }
      for (int tw = warp * TPW; tw < tc; tw += kWarps * TPW) {  // uniform per warp: full-mask shuffles
        const int t = tw + gi;
        const bool valid = t < tc;
        const int n = tb + t0 + t;  // token within the image
        float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        double ss = 0.0;
        if (valid) {
          for (unsigned long long c = codes[t0 + t]; c; c &= c - 1) {
            const float* kr = KVs + (__ffsll(static_cast<long long>(c)) - 1) * d;
            if constexpr (kVec4) {
              if (cok[0]) {
                const float4 x = *reinterpret_cast<const float4*>(kr + col[0]);
                z[0] += x.x, z[1] += x.y, z[2] += x.z, z[3] += x.w;
              }
            } else {
#pragma unroll
              for (int k = 0; k < 4; ++k)
                if (cok[k]) z[k] += kr[col[k]];
            }
          }
          const T* vr = Vr + size_t(n - vbase) * d;
          if constexpr (kVec4) {
            if (cok[0]) {
              const float4 x = load4(vr + col[0]);
              z[0] += 0.5f * x.x, z[1] += 0.5f * x.y, z[2] += 0.5f * x.z, z[3] += 0.5f * x.w;
            }
          } else {
#pragma unroll
            for (int k = 0; k < 4; ++k)
              if (cok[k]) z[k] += 0.5f * to_f32(vr[col[k]]);
          }
#pragma unroll
          for (int k = 0; k < 4; ++k)
            if (cok[k]) ss += double(z[k]) * z[k];
        }
        for (int o = L >> 1; o > 0; o >>= 1) ss += __shfl_xor_sync(kFull, ss, o);
        if (valid) {
          const float nrm = fmaxf(static_cast<float>(sqrt(ss)), kNormEps);
          float o4[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) o4[k] = z[k] / nrm;
#pragma unroll
          for (int tap = 0; tap < kTaps; ++tap) {
            const int src = n + tap - kPad;
            if (src >= 0 && src < N) {
              const T* vs = Vr + size_t(src - vbase) * d;
              if constexpr (kVec4) {
                if (cok[0]) {
                  const float4 x = load4(vs + col[0]);
                  o4[0] = fmaf(cw[tap], x.x, o4[0]);
                  o4[1] = fmaf(cw[tap], x.y, o4[1]);
                  o4[2] = fmaf(cw[tap], x.z, o4[2]);
                  o4[3] = fmaf(cw[tap], x.w, o4[3]);
                }
              } else {
#pragma unroll
                for (int k = 0; k < 4; ++k)
                  if (cok[k]) o4[k] = fmaf(cw[tap], to_f32(vs[col[k]]), o4[k]);
              }
            }
          }
          T* dst = p.out + (int64_t(b) * N + n) * p.ldo + int64_t(h) * d;
          if (kVec4 && p.out_vec) {
            if (cok[0]) store4(dst + col[0], make_float4(o4[0], o4[1], o4[2], o4[3]));
          } else {
#pragma unroll
            for (int k = 0; k < 4; ++k)
              if (cok[k]) store_f32(dst + col[k], o4[k]);
          }
        }
      }
    }
  }
  cluster.barrier_wait(std::move(token));  // no CTA leaves while a peer may still read its KV partial
#endif
}

bool aligned(const void* ptr, size_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; }

template <class T, bool kVec4>
void launch(const TiledParams<T>& prm, const Plan& pl, int64_t bh, cudaStream_t stream) {
  void (*kernel)(TiledParams<T>) = hamming_tiled_kernel<T, kVec4>;
  launch_cluster(kernel, dim3(static_cast<unsigned>(bh * pl.G)), dim3(kThreads), pl.L.total, pl.G, stream, prm);
}

}  // namespace

bool hamming_tiled_supports(const HammingTiledDims& dd) {
  if (!dims_ok(dd)) return false;
  // the largest plan make_plan can pick is the one at G = 8 (smaller G only when within the budget)
  const size_t worst =
      std::max({plan_at_max(dd, sizeof(float)).L.total, plan_at_max(dd, sizeof(bf16)).L.total, kCacheBudget});
  if (worst > kSmemLimit) return false;
  if (device_available()) {
    if (device_cc_major() < 9) return false;
    if (worst > size_t(max_smem_per_block())) return false;
  }
  return true;
}

size_t hamming_tiled_workspace_bytes(const HammingTiledDims& dd) {
  SAV_CHECK(dims_ok(dd), "hamming_tiled: unsupported sizes B=" << dd.B << " N=" << dd.N << " C=" << dd.C << " H="
                                                               << dd.H << " nbits=" << dd.nbits << " m=" << dd.m);
  if (dd.B == 0) return 0;
  return workspace_for(dd);
}

HammingTiledPlan hamming_tiled_plan(const HammingTiledDims& dd, size_t elem_bytes, int sms) {
  SAV_CHECK(dims_ok(dd), "hamming_tiled: unsupported sizes B=" << dd.B << " N=" << dd.N << " C=" << dd.C << " H="
                                                               << dd.H << " nbits=" << dd.nbits << " m=" << dd.m);
  SAV_CHECK(elem_bytes == 2 || elem_bytes == 4, "hamming_tiled_plan: elem_bytes must be 2 or 4");
  const Plan pl = make_plan(dd, elem_bytes, sms);
  return HammingTiledPlan{pl.G, pl.chunk, pl.TT, pl.cached, pl.L.total};
}

template <class T>
void hamming_attention_tiled(T* out, int ldo, const T* qk, int ldqk, const T* v, int ldv, const float* anchors,
                             const float* mu, const float* A, const float* conv_w, const HammingTiledDims& dd,
                             void* workspace, cudaStream_t stream) {
  SAV_CHECK(dims_ok(dd), "hamming_tiled: unsupported sizes B="
                             << dd.B << " N=" << dd.N << " C=" << dd.C << " H=" << dd.H << " nbits=" << dd.nbits
                             << " m=" << dd.m << " (need N in 1.." << kMaxN << ", C % H == 0, head size 1.." << kMaxD
                             << ", nbits 1.." << kMaxBits << ", m 1.." << kMaxM << ")");
  SAV_CHECK(out && qk && v && anchors && mu && A && conv_w, "hamming_tiled: null pointer");
  SAV_CHECK(ldo >= dd.C && ldqk >= dd.C && ldv >= dd.C,
            "hamming_tiled: row strides " << ldo << ", " << ldqk << ", " << ldv << " below the width " << dd.C);
  if (dd.B == 0) return;
  SAV_CHECK(device_cc_major() >= 9, "hamming_tiled: needs a compute capability 9.0 device (thread-block clusters)");
  const Plan pl = make_plan(dd, sizeof(T), sm_count());
  SAV_CHECK(
      pl.L.total <= size_t(max_smem_per_block()),
      "hamming_tiled: needs " << pl.L.total << " bytes of shared memory, the device offers " << max_smem_per_block());
  const int d = dd.C / dd.H;
  TiledParams<T> prm{};
  prm.out = out, prm.qk = qk, prm.v = v;
  prm.anchors = anchors, prm.mu = mu, prm.A = A, prm.conv_w = conv_w;
  prm.ws_d = nullptr, prm.ws_codes = nullptr;
  if (!pl.cached) {
    const size_t need = workspace_for(dd);
    SAV_CHECK(workspace && aligned(workspace, 16),
              "hamming_tiled: B=" << dd.B << " N=" << dd.N << " needs a 16-byte aligned workspace of " << need
                                  << " bytes (hamming_tiled_workspace_bytes), got " << workspace);
    const size_t dbytes = size_t(dd.B) * dd.H * kMaxCluster * pl.DCp * dd.m * sizeof(float);
    prm.ws_d = static_cast<float*>(workspace);
    prm.ws_codes = reinterpret_cast<unsigned long long*>(static_cast<unsigned char*>(workspace) + dbytes);
  }
  prm.ldo = ldo, prm.ldqk = ldqk, prm.ldv = ldv;
  prm.N = dd.N, prm.H = dd.H, prm.d = d, prm.nbits = dd.nbits, prm.m = dd.m, prm.m4 = pl.m4, prm.nb4 = pl.nb4;
  prm.G = pl.G, prm.chunk = pl.chunk, prm.TT = pl.TT, prm.DCp = pl.DCp;
  const bool vec4 = d % 4 == 0;
  int lanes = 1;  // phase 4: one quad of columns per lane (vec4), else up to 4 strided columns per lane
  while (lanes < 32 && lanes < (vec4 ? d / 4 : d)) lanes *= 2;
  prm.lanes = lanes;
  prm.cached = pl.cached;
  constexpr size_t kEl = sizeof(T);
  prm.q_async = (d * kEl) % 16 == 0 && (size_t(ldqk) * kEl) % 16 == 0 && aligned(qk, 16);
  prm.v_async = (d * kEl) % 16 == 0 && (size_t(ldv) * kEl) % 16 == 0 && aligned(v, 16);
  prm.out_vec = vec4 && ldo % 4 == 0 && aligned(out, 4 * kEl);
  prm.o_red = unsigned(pl.L.red), prm.o_at = unsigned(pl.L.at), prm.o_aa = unsigned(pl.L.aa);
  prm.o_mu = unsigned(pl.L.mu), prm.o_at2 = unsigned(pl.L.at2), prm.o_kvp = unsigned(pl.L.kvp);
  prm.o_u = unsigned(pl.L.u), prm.o_codes = unsigned(pl.L.codes), prm.o_dc = unsigned(pl.L.dc);
  prm.o_xraw = unsigned(pl.L.xraw), prm.o_vraw = unsigned(pl.L.vraw);
  const int64_t bh = int64_t(dd.B) * dd.H;
  if (vec4)
    launch<T, true>(prm, pl, bh, stream);
  else
    launch<T, false>(prm, pl, bh, stream);
}

template void hamming_attention_tiled<float>(float*, int, const float*, int, const float*, int, const float*,
                                             const float*, const float*, const float*, const HammingTiledDims&, void*,
                                             cudaStream_t);
template void hamming_attention_tiled<bf16>(bf16*, int, const bf16*, int, const bf16*, int, const float*, const float*,
                                            const float*, const float*, const HammingTiledDims&, void*, cudaStream_t);

}  // namespace sav::cuda
