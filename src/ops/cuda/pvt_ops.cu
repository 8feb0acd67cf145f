// The float32 PVTv2 ops of pvt_ops.h. Launch configurations (H200 timings at batch 64 in brackets, for
// orientation):
//
//  nchw_to_nhwc_f32   C >= 16: 32x32 tiles through shared memory (padded to 33 columns), blocks of 32x8
//                     threads, grid (HW/32, C/32, B <= 65535); C < 16: one thread per pixel copying its C
//                     values, grid (HW/256, B). [images 3x224x224: 39 us]
//  im2col_nhwc_f32    256-thread blocks, each filling R output rows (pixels) for a chunk of cc input
//                     channels, through 32 KB of shared memory: gather, one warp per patch row (r, ky) (its
//                     k*cc values are contiguous in x when cc = Cin; patch rows of <= 32 values: one value per
//                     lane, 4 rows in flight), into shared (r, tap, ci) with an odd tap stride; then scatter
//                     as contiguous runs of cols (a chunk's columns are contiguous). R*k*k*stride <= 8192
//                     floats, R <= 32; one chunk unless k*k*Cin does not fit (then equal chunks); grid
//                     (ceil(M/R), chunks). Divisions by multiply-high magic numbers computed on the host.
//                     k > 64 (k*k > 4096): one thread per element of cols (a plain gather).
//                     [stem k7 s4: 142 us; k3 s2 C64 56x56: 99 us; k8 s8 C64: 46 us]
//  layernorm_f32      C <= 1024: one warp per row, 8 rows per 256-thread block, the row in registers
//                     (1..32 values per lane); C > 1024: one 256-thread block per row, three passes over the
//                     row (sum, squared deviations, output) with fixed-order block reductions. [~3 TB/s]
//  attention_q_kv_f32 128-thread CTAs (launch bounds for 4 CTAs per SM), grid B*H*tiles (one dimension).
//                     G = 1, 2, 4 or 8 lanes per query row (the smallest with 16 G >= d), each lane holding
//                     16 of the head's dims (zero-padded) of q and of the output accumulator per row (float4
//                     chunks g, g+G, g+2G, g+3G: a group reads 16G contiguous bytes of a shared K/V row,
//                     broadcast to the other groups, conflict-free); R = 2 query rows per thread when that
//                     still gives >= 2 CTAs per SM (each shared K/V value feeds two rows), else R = 1: a
//                     CTA takes 128 R / G query rows of one (b, h). Keys in tiles of 256/G rows of K and V
//                     (32 KB of static shared memory), processed in chunks of 16 (R = 1) or 8 (R = 2) keys:
//                     scores reduced over the G lanes by xor shuffles, one rescale of the running (max,
//                     sum, output) per chunk, ex2.approx with d^-0.5 log2(e) folded into q.
//                     [N 3136, Nk 49, d 64: 143 us; N 49, Nk 49, H 8: 23 us]
//  dwconv2d_f32       blocks of 32 x 8 threads: 32 (or 64 with float2 pairs) channels x 8 pixel runs; a
//                     thread computes 8 consecutive outputs of one image row (loads coalesced along C). k = 3:
//                     weights and the whole 3 x 10 input window in registers, loaded before the arithmetic,
//                     no bounds checks for interior runs; channel pairs (float2) when C is even and the
//                     pointers 8-byte aligned. Other k: plain loops over the taps. 32-bit index math within
//                     an image (H*W*C < 2^31, checked). [56x56x512 + GELU: 335 us]
//  mean_tokens_f32    one thread per (b, c), sequential sum over n (the CPU's order), then * (1/N).
//  release_fixed_point_f32  grid-stride elementwise, float4 when both pointers are 16-byte aligned.
//  moe_epilogue_f32   one warp per row, 8 rows per block, float4 when F, lds, ldo and the pointers allow.
#include <algorithm>
#include <climits>
#include <cmath>

#include "ops/cpu/conv.h"  // conv_out_size
#include "ops/cuda/gelu.cuh"
#include "ops/cuda/pvt_ops.h"

namespace sav::cuda {

namespace {

// n / d for 0 <= n < 2^31 and d >= 1 by a multiply-high (Granlund-Montgomery, round-up variant): with
// l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1, n / d = (umulhi(n, m) + n) >> l (the sum cannot
// overflow for n < 2^31).
struct FastDiv {
  uint32_t m = 1, l = 0;
  __host__ __device__ explicit FastDiv(uint32_t d) {
    while ((uint64_t(1) << l) < d) ++l;
    m = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << l) - d)) / d + 1);
  }
  __device__ __forceinline__ int div(int n) const { return int((__umulhi(uint32_t(n), m) + uint32_t(n)) >> l); }
};

// ---------------------------------------------------------------------------------------------------------
// nchw_to_nhwc

__global__ void __launch_bounds__(256) nchw_to_nhwc_tiled_kernel(float* y, const float* x, int C, int HW) {
  __shared__ float tile[32][33];
  const int p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
  const float* xb = x + int64_t(blockIdx.z) * C * HW;
  float* yb = y + int64_t(blockIdx.z) * C * HW;
  for (int j = threadIdx.y; j < 32; j += 8) {
    const int c = c0 + j, px = p0 + threadIdx.x;
    if (c < C && px < HW) tile[j][threadIdx.x] = xb[int64_t(c) * HW + px];
  }
  __syncthreads();
  for (int j = threadIdx.y; j < 32; j += 8) {
    const int px = p0 + j, c = c0 + threadIdx.x;
    if (px < HW && c < C) yb[int64_t(px) * C + c] = tile[threadIdx.x][j];
  }
}

// Few channels (images): one thread per pixel; the loads of each channel are coalesced over the pixels.
__global__ void __launch_bounds__(256) nchw_to_nhwc_small_kernel(float* y, const float* x, int C, int HW) {
  const int px = blockIdx.x * 256 + threadIdx.x;
  if (px >= HW) return;
  const float* xb = x + int64_t(blockIdx.y) * C * HW + px;
  float* yb = y + (int64_t(blockIdx.y) * HW + px) * C;
  for (int c = 0; c < C; ++c) yb[c] = xb[int64_t(c) * HW];
}

// ---------------------------------------------------------------------------------------------------------
// im2col

constexpr int kIcThreads = 256;
constexpr int kIcBudget = 8192;  // floats of shared memory per block
constexpr int kIcMaxRows = 32;

struct IcParams {
  float* cols;
  const float* x;
  int H, W, Cin, k, s, pad, Ho, Wo, K, kk;
  int64_t M;
  int rows;  // output rows per block
  int cc;    // input channels per chunk (the last chunk may hold fewer)
  int cs;    // shared-memory stride of a tap: cc | 1
  // divisions by k, k*k, and, for a full [0] and the last [1] channel chunk, by its channels and k*k*channels
  FastDiv dk{1}, dkk{1}, dcn[2]{FastDiv{1}, FastDiv{1}}, drow[2]{FastDiv{1}, FastDiv{1}};
};

__global__ void __launch_bounds__(kIcThreads) im2col_smem_kernel(const __grid_constant__ IcParams p) {
  __shared__ float sm[kIcBudget];
  __shared__ int64_t rbase[kIcMaxRows];  // offset of x[b, 0, 0, c0] of the row's image
  __shared__ int riy[kIcMaxRows], rix[kIcMaxRows];
  const int64_t row0 = int64_t(blockIdx.x) * p.rows;
  const int R = int(min(int64_t(p.rows), p.M - row0));
  const int c0 = blockIdx.y * p.cc;
  const int cn = min(p.cc, p.Cin - c0);
  if (int(threadIdx.x) < R) {
    const int64_t row = row0 + threadIdx.x;
    const int64_t t = row / p.Wo;
    const int ox = int(row - t * p.Wo);
    const int64_t b = t / p.Ho;
    const int oy = int(t - b * p.Ho);
    rbase[threadIdx.x] = b * p.H * p.W * p.Cin + c0;
    riy[threadIdx.x] = oy * p.s - p.pad;
    rix[threadIdx.x] = ox * p.s - p.pad;
  }
  __syncthreads();
  const int per_row = p.kk * cn, n = R * per_row, rstride = p.kk * p.cs;
  const bool last = blockIdx.y == gridDim.y - 1;
  const FastDiv div_row = p.drow[last], div_cn = p.dcn[last], div_k = p.dk, div_kk = p.dkk;
  // gather: warp w copies the patch rows (r, ky) = sg = w, w + 8, ...: the k*cn values x[b, iy, ix0 + kx,
  // c0 + ci] (kx, ci), contiguous in x when the chunk is all of Cin, to shared (r, ky*k + kx, ci), i.e.
  // sm[sg*k*cs + kx*cs + ci]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, seg_len = p.k * cn, nseg = R * p.k;
  constexpr int kWarps = kIcThreads / 32, kU = 4;
  if (seg_len <= 32) {  // short rows (the stem: 7 x 3): one value per lane, kU rows in flight per warp
    const int kx = div_cn.div(lane), ci = lane - kx * cn;
    const bool lane_ok = lane < seg_len;
    for (int sg0 = warp; sg0 < nseg; sg0 += kWarps * kU) {
      float v[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int sg = sg0 + kWarps * u;
        v[u] = 0.0f;
        if (lane_ok && sg < nseg) {
          const int r = div_k.div(sg), iy = riy[r] + sg - r * p.k, ix = rix[r] + kx;
          if (iy >= 0 && iy < p.H && ix >= 0 && ix < p.W) v[u] = p.x[rbase[r] + (int64_t(iy) * p.W + ix) * p.Cin + ci];
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int sg = sg0 + kWarps * u;
        if (lane_ok && sg < nseg) sm[(sg * p.k + kx) * p.cs + ci] = v[u];
      }
    }
  } else {
    for (int sg = warp; sg < nseg; sg += kWarps) {
      const int r = div_k.div(sg), iy = riy[r] + sg - r * p.k, ix0 = rix[r];
      const bool row_ok = iy >= 0 && iy < p.H;
      const int64_t base = rbase[r] + (int64_t(iy) * p.W + ix0) * p.Cin;  // offset of (iy, ix0, c0)
      float* srow = sm + sg * p.k * p.cs;
      for (int e = lane; e < seg_len; e += 32) {
        const int kx = div_cn.div(e), ci = e - kx * cn;
        const int ix = ix0 + kx;
        float v = 0.0f;
        if (row_ok && ix >= 0 && ix < p.W) v = p.x[base + kx * p.Cin + ci];
        srow[kx * p.cs + ci] = v;
      }
    }
  }
  __syncthreads();
  // scatter: element i = (r, j = ci*kk + t), j fastest (the chunk's columns are contiguous in cols)
  float* dst = p.cols + row0 * p.K + int64_t(c0) * p.kk;
  for (int i = threadIdx.x; i < n; i += kIcThreads) {
    const int r = div_row.div(i), j = i - r * per_row;
    const int ci = div_kk.div(j), t = j - ci * p.kk;
    dst[int64_t(r) * p.K + j] = sm[r * rstride + t * p.cs + ci];
  }
}

// Large kernels (k*k > kIcBudget / 2): one thread per element of cols.
__global__ void __launch_bounds__(256) im2col_direct_kernel(const __grid_constant__ IcParams p) {
  const int64_t total = p.M * p.K;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.K;
    const int col = int(i - row * p.K);
    const int ci = col / p.kk, t = col - ci * p.kk;
    const int ky = t / p.k, kx = t - ky * p.k;
    const int64_t tt = row / p.Wo;
    const int ox = int(row - tt * p.Wo);
    const int64_t b = tt / p.Ho;
    const int oy = int(tt - b * p.Ho);
    const int iy = oy * p.s - p.pad + ky, ix = ox * p.s - p.pad + kx;
    float v = 0.0f;
    if (iy >= 0 && iy < p.H && ix >= 0 && ix < p.W) v = p.x[((b * p.H + iy) * p.W + ix) * p.Cin + ci];
    p.cols[i] = v;
  }
}

// ---------------------------------------------------------------------------------------------------------
// LayerNorm

constexpr int kLnWarps = 8;
constexpr int kLnMaxWarpC = 1024;
constexpr int kLnBlockThreads = 256;

struct LnParams {
  float* y;
  const float* x;
  const float *w, *b;
  int ldy, ldx, M, C;
  float eps;
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int PER>
__global__ void __launch_bounds__(kLnWarps * 32) layernorm_warp_kernel(const __grid_constant__ LnParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kLnWarps + (threadIdx.x >> 5);
  if (row >= p.M) return;
  const float* xr = p.x + row * p.ldx;
  const int C = p.C;
  float v[PER];
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int c = lane + 32 * k;
    v[k] = c < C ? xr[c] : 0.0f;
    s += v[k];
  }
  const float mean = warp_sum(s) / float(C);
  float q = 0.0f;
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const float dv = lane + 32 * k < C ? v[k] - mean : 0.0f;
    q = fmaf(dv, dv, q);
  }
  const float rstd = 1.0f / sqrtf(warp_sum(q) / float(C) + p.eps);
  float* yr = p.y + row * p.ldy;
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int c = lane + 32 * k;
    if (c < C) yr[c] = (v[k] - mean) * rstd * p.w[c] + p.b[c];
  }
}

// Sum over the block in a fixed order; every thread gets the total. red: kLnBlockThreads / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.0f;
#pragma unroll
  for (int i = 0; i < kLnBlockThreads / 32; ++i) t += red[i];
  __syncthreads();  // red is reused by the next call
  return t;
}

__global__ void __launch_bounds__(kLnBlockThreads) layernorm_block_kernel(const __grid_constant__ LnParams p) {
  __shared__ float red[kLnBlockThreads / 32];
  const int64_t row = blockIdx.x;
  const float* xr = p.x + row * p.ldx;
  float* yr = p.y + row * p.ldy;
  const int C = p.C;
  float s = 0.0f;
  for (int c = threadIdx.x; c < C; c += kLnBlockThreads) s += xr[c];
  const float mean = block_sum(s, red) / float(C);
  float q = 0.0f;
  for (int c = threadIdx.x; c < C; c += kLnBlockThreads) {
    const float dv = xr[c] - mean;
    q = fmaf(dv, dv, q);
  }
  const float rstd = 1.0f / sqrtf(block_sum(q, red) / float(C) + p.eps);
  // every read of x above is done (block_sum's barriers): in place is safe, each element read then written
  // by the same thread
  for (int c = threadIdx.x; c < C; c += kLnBlockThreads) yr[c] = (xr[c] - mean) * rstd * p.w[c] + p.b[c];
}

// ---------------------------------------------------------------------------------------------------------
// attention_q_kv

constexpr int kAqThreads = 128;
constexpr int kAqMaxD = 128;
constexpr int kAqTileF4 = 1024;  // float4 per shared K (and V) tile: 16 KB each

struct AqParams {
  float* out;
  const float* q;
  const float* kv;
  int N, Nk, C, H, d;
  int tiles;     // query tiles per (b, h)
  float qscale;  // d^-0.5 * log2(e), folded into q
  bool vec;      // float4 global accesses (d % 4 == 0, 16-byte aligned pointers)
};

__device__ __forceinline__ float4 f4_scale(float4 a, float s) {
  return make_float4(a.x * s, a.y * s, a.z * s, a.w * s);
}

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx (2 ulp): exp2(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One online-softmax step over keys c0 .. c0+n-1 of the shared tile (n == CH when FULL; n is uniform over
// the CTA, so the shuffles are safe): scores of this thread's R rows (reduced over the G lanes of a row),
// one rescale of (m, l, o) per row, then o += p v.
template <int G, int R, int CH, bool FULL>
__device__ __forceinline__ void attention_chunk(const float4* Ks, const float4* Vs, int c0, int n, int g,
                                                const float4 (&qv)[R][4], float4 (&o)[R][4], float (&m)[R],
                                                float (&l)[R]) {
  constexpr int kD4 = 4 * G;
  float s[R][CH];
  float mx[R];
#pragma unroll
  for (int r = 0; r < R; ++r) mx[r] = -INFINITY;
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) {
    if (FULL || jj < n) {
      const float4* kr = Ks + (c0 + jj) * kD4 + g;
      float a[R];
#pragma unroll
      for (int r = 0; r < R; ++r) a[r] = 0.0f;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const float4 k4 = kr[G * v];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          a[r] = fmaf(qv[r][v].x, k4.x, a[r]);
          a[r] = fmaf(qv[r][v].y, k4.y, a[r]);
          a[r] = fmaf(qv[r][v].z, k4.z, a[r]);
          a[r] = fmaf(qv[r][v].w, k4.w, a[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int off = 1; off < G; off <<= 1) a[r] += __shfl_xor_sync(0xffffffffu, a[r], off);
        s[r][jj] = a[r];
        mx[r] = fmaxf(mx[r], a[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float mn = fmaxf(m[r], mx[r]);       // finite: the chunk holds at least one key
    const float alpha = fast_exp2(m[r] - mn);  // 0 on the first chunk (m = -inf)
    m[r] = mn;
    float ls = 0.0f;
#pragma unroll
    for (int jj = 0; jj < CH; ++jj) {
      s[r][jj] = FULL || jj < n ? fast_exp2(s[r][jj] - mn) : 0.0f;
      ls += s[r][jj];
    }
    l[r] = fmaf(l[r], alpha, ls);
#pragma unroll
    for (int v = 0; v < 4; ++v) o[r][v] = f4_scale(o[r][v], alpha);
  }
#pragma unroll
  for (int jj = 0; jj < CH; ++jj) {
    if (FULL || jj < n) {
      const float4* vr = Vs + (c0 + jj) * kD4 + g;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const float4 v4 = vr[G * v];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          o[r][v].x = fmaf(s[r][jj], v4.x, o[r][v].x);
          o[r][v].y = fmaf(s[r][jj], v4.y, o[r][v].y);
          o[r][v].z = fmaf(s[r][jj], v4.z, o[r][v].z);
          o[r][v].w = fmaf(s[r][jj], v4.w, o[r][v].w);
        }
      }
    }
  }
}

// G lanes per query row, R query rows per thread (R = 2: each K / V value read from shared memory feeds
// two rows). Thread t takes rows (t / G) + (128 / G) r, r < R, of the CTA's 128 R / G.
template <int G, int R>
__global__ void __launch_bounds__(kAqThreads, 4) attention_q_kv_kernel(const __grid_constant__ AqParams p) {
  constexpr int kGroups = kAqThreads / G;  // query rows per CTA = kGroups * R
  constexpr int kD4 = 4 * G;               // float4 per padded head row (16 G floats)
  constexpr int kKT = kAqTileF4 / kD4;     // keys per shared-memory tile
  constexpr int kChunk = R == 1 ? 16 : 8;  // keys per online-softmax step
  __shared__ float4 Ks[kAqTileF4], Vs[kAqTileF4];
  const int bh = blockIdx.x / p.tiles, qt = blockIdx.x - bh * p.tiles;
  const int b = bh / p.H, h = bh - b * p.H;
  const int g = threadIdx.x & (G - 1);
  const int d = p.d;
  const int64_t C2 = 2 * int64_t(p.C);

  // this lane's q dims of each of its rows: float4 chunks g + G v, v = 0..3 (zeros beyond d), pre-scaled
  const float4 zero4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  float4 qv[R][4], o[R][4];
  float m[R], l[R];  // running max (log2 units) and sum
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = qt * kGroups * R + r * kGroups + threadIdx.x / G;
    const bool active = row < p.N;
    const float* qr = p.q + (int64_t(b) * p.N + (active ? row : 0)) * p.C + int64_t(h) * d;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int c = 4 * (g + G * v);
      if (p.vec) {
        qv[r][v] = active && c < d ? *reinterpret_cast<const float4*>(qr + c) : zero4;
      } else {
        float t[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) t[e] = active && c + e < d ? qr[c + e] : 0.0f;
        qv[r][v] = make_float4(t[0], t[1], t[2], t[3]);
      }
      qv[r][v] = f4_scale(qv[r][v], p.qscale);
      o[r][v] = zero4;
    }
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }

  const float* kb = p.kv + int64_t(b) * p.Nk * C2 + int64_t(h) * d;
  for (int j0 = 0; j0 < p.Nk; j0 += kKT) {
    const int cnt = min(kKT, p.Nk - j0);
    __syncthreads();  // the previous tile is consumed
    if (p.vec) {
      for (int i = threadIdx.x; i < cnt * kD4; i += kAqThreads) {
        const int r = i / kD4, c = 4 * (i - r * kD4);
        float4 k4 = zero4, v4 = zero4;
        if (c < d) {
          const float* src = kb + int64_t(j0 + r) * C2 + c;
          k4 = *reinterpret_cast<const float4*>(src);
          v4 = *reinterpret_cast<const float4*>(src + p.C);
        }
        Ks[i] = k4;
        Vs[i] = v4;
      }
    } else {
      float* Kf = reinterpret_cast<float*>(Ks);
      float* Vf = reinterpret_cast<float*>(Vs);
      for (int i = threadIdx.x; i < cnt * kD4 * 4; i += kAqThreads) {
        const int r = i / (kD4 * 4), c = i - r * (kD4 * 4);
        const float* src = kb + int64_t(j0 + r) * C2 + c;
        Kf[i] = c < d ? src[0] : 0.0f;
        Vf[i] = c < d ? src[p.C] : 0.0f;
      }
    }
    __syncthreads();
    int c0 = 0;
    for (; c0 + kChunk <= cnt; c0 += kChunk) attention_chunk<G, R, kChunk, true>(Ks, Vs, c0, kChunk, g, qv, o, m, l);
    if (c0 < cnt) attention_chunk<G, R, kChunk, false>(Ks, Vs, c0, cnt - c0, g, qv, o, m, l);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = qt * kGroups * R + r * kGroups + threadIdx.x / G;
    if (row >= p.N) continue;
    const float inv = 1.0f / l[r];
    float* orow = p.out + (int64_t(b) * p.N + row) * p.C + int64_t(h) * d;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int c = 4 * (g + G * v);
      const float4 y = f4_scale(o[r][v], inv);
      if (p.vec) {
        if (c < d) *reinterpret_cast<float4*>(orow + c) = y;
      } else {
        const float t[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (c + e < d) orow[c + e] = t[e];
      }
    }
  }
}

template <int G>
void launch_attention_q_kv(AqParams p, int B, int H, cudaStream_t stream) {
  constexpr int kGroups = kAqThreads / G;
  // two rows per thread (half the shared-memory reads per multiply-add) when that still gives a few CTAs
  // per multiprocessor, else one (more CTAs for small problems)
  const int64_t bh = int64_t(B) * H, tiles2 = (p.N + 2 * kGroups - 1) / (2 * kGroups);
  const bool two = bh * tiles2 >= 2 * int64_t(sm_count());
  p.tiles = two ? int(tiles2) : (p.N + kGroups - 1) / kGroups;
  const int64_t blocks = bh * p.tiles;
  SAV_CHECK(blocks <= INT_MAX, "attention_q_kv_f32: grid too large (B=" << B << " H=" << H << " N=" << p.N << ")");
  if (two)
    attention_q_kv_kernel<G, 2><<<unsigned(blocks), kAqThreads, 0, stream>>>(p);
  else
    attention_q_kv_kernel<G, 1><<<unsigned(blocks), kAqThreads, 0, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------------
// depthwise conv

constexpr int kDwRun = 8;  // consecutive outputs of a row per thread
constexpr int kDwWarps = 8;

struct DwParams {
  float* y;
  const float* x;
  const float* w;
  const float* b;
  int H, W, C, k;
  int nrx;   // runs per image row: ceil(W / kDwRun)
  int runs;  // B * H * nrx
  bool gelu;
};

// K > 0: compile-time kernel side, V = 1 or 2 adjacent channels per thread (float2 accesses): the weights
// and the whole (K, kDwRun + K - 1) input window in registers, every load issued before the arithmetic
// (zeros outside the image). K == 0 (V = 1): any odd p.k, plain loops over the taps inside the image.
// Both sum bias + taps in (ky, kx) order.
template <int K, int V>
__global__ void __launch_bounds__(32 * kDwWarps) dwconv2d_kernel(const __grid_constant__ DwParams p) {
  static_assert(V == 1 || (V == 2 && K > 0), "float2 channels only on the compile-time path");
  const int c = (blockIdx.y * 32 + threadIdx.x) * V;
  const int run = blockIdx.x * kDwWarps + threadIdx.y;  // 32-bit index math: sizes checked at the launcher
  if (c >= p.C || run >= p.runs) return;                // V = 2: C is even, so c + 1 < C too
  const int t = run / p.nrx;
  const int ox0 = (run - t * p.nrx) * kDwRun;
  const int b = t / p.H;
  const int oy = t - b * p.H;
  const int C = p.C;
  float acc[kDwRun][V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float bias = p.b ? p.b[c + e] : 0.0f;
#pragma unroll
    for (int i = 0; i < kDwRun; ++i) acc[i][e] = bias;
  }
  const float* xb = p.x + int64_t(b) * p.H * p.W * C + c;  // image b, channel c
  if constexpr (K > 0) {
    constexpr int P = K / 2, kWin = kDwRun + K - 1;
    float wv[K * K][V];
#pragma unroll
    for (int i = 0; i < K * K; ++i)
#pragma unroll
      for (int e = 0; e < V; ++e) wv[i][e] = p.w[(c + e) * K * K + i];
    float win[K][kWin][V];
    auto load = [&](int ky, int i, const float* src) {
      if constexpr (V == 2) {
        const float2 v2 = *reinterpret_cast<const float2*>(src);
        win[ky][i][0] = v2.x;
        win[ky][i][1] = v2.y;
      } else {
        win[ky][i][0] = *src;
      }
    };
    // the window's first element: row oy - P, column ox0 - P (offsets within the image, in elements)
    const int off0 = ((oy - P) * p.W + ox0 - P) * C;
    if (oy >= P && oy + P < p.H && ox0 >= P && ox0 - P + kWin <= p.W) {  // interior: no bounds checks
#pragma unroll
      for (int ky = 0; ky < K; ++ky)
#pragma unroll
        for (int i = 0; i < kWin; ++i) load(ky, i, xb + (off0 + (ky * p.W + i) * C));
    } else {
#pragma unroll
      for (int ky = 0; ky < K; ++ky) {
        const int iy = oy + ky - P;
#pragma unroll
        for (int i = 0; i < kWin; ++i) {
          const int ix = ox0 - P + i;
#pragma unroll
          for (int e = 0; e < V; ++e) win[ky][i][e] = 0.0f;
          if (iy >= 0 && iy < p.H && ix >= 0 && ix < p.W) load(ky, i, xb + (off0 + (ky * p.W + i) * C));
        }
      }
    }
#pragma unroll
    for (int ky = 0; ky < K; ++ky)
#pragma unroll
      for (int i = 0; i < kDwRun; ++i)
#pragma unroll
        for (int kx = 0; kx < K; ++kx)
#pragma unroll
          for (int e = 0; e < V; ++e) acc[i][e] = fmaf(wv[ky * K + kx][e], win[ky][i + kx][e], acc[i][e]);
  } else {
    const int k = p.k, P = k / 2;
    for (int ky = 0; ky < k; ++ky) {
      const int iy = oy + ky - P;
      if (iy < 0 || iy >= p.H) continue;
      const float* xr = xb + iy * p.W * C;
      for (int kx = 0; kx < k; ++kx) {
        const float wt = p.w[(int64_t(c) * k + ky) * k + kx];
#pragma unroll
        for (int i = 0; i < kDwRun; ++i) {
          const int ix = ox0 + i + kx - P;
          if (ix >= 0 && ix < p.W) acc[i][0] = fmaf(wt, xr[ix * C], acc[i][0]);
        }
      }
    }
  }
  float* yr = p.y + int64_t(b) * p.H * p.W * C + oy * p.W * C + c;
#pragma unroll
  for (int i = 0; i < kDwRun; ++i) {
    if (ox0 + i >= p.W) continue;
    float r[V];
#pragma unroll
    for (int e = 0; e < V; ++e) r[e] = p.gelu ? gelu_erf(acc[i][e]) : acc[i][e];
    if constexpr (V == 2)
      *reinterpret_cast<float2*>(yr + (ox0 + i) * C) = make_float2(r[0], r[1]);
    else
      yr[(ox0 + i) * C] = r[0];
  }
}

// ---------------------------------------------------------------------------------------------------------
// mean over tokens, fixed-point rounding

__global__ void __launch_bounds__(256) mean_tokens_kernel(float* y, const float* x, int B, int N, int C, float inv) {
  const int64_t total = int64_t(B) * C;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / C, c = i - b * C;
    const float* xp = x + b * N * C + c;
    float acc = 0.0f;
    for (int n = 0; n < N; ++n) acc += xp[int64_t(n) * C];
    y[i] = acc * inv;
  }
}

// sav::release_fixed_point: both scalings are exact, floorf is exact; the clamp as std::clamp.
__device__ __forceinline__ float fixed_point(float v) {
  const float r = floorf(v * 65536.0f) * (1.0f / 65536.0f);
  return r < -32768.0f ? -32768.0f : (32767.0f < r ? 32767.0f : r);
}

__global__ void __launch_bounds__(256) fixed_point_kernel(float* y, const float* x, int64_t n, bool vec) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    const int64_t n4 = n / 4;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    float4* y4 = reinterpret_cast<float4*>(y);
    for (int64_t i = i0; i < n4; i += stride) {
      const float4 v = x4[i];
      y4[i] = make_float4(fixed_point(v.x), fixed_point(v.y), fixed_point(v.z), fixed_point(v.w));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + i0; i < n; i += stride) y[i] = fixed_point(x[i]);
}

// ---------------------------------------------------------------------------------------------------------
// MoE epilogue (f32)

constexpr int kMoeRows = 8;

struct MoeF32Params {
  float* out;
  int8_t* choice;
  const float* s;
  const float *b0, *b1, *br;
  int ldo, lds, M, F;
  bool prob, combine, accumulate, vec;
};

__device__ __forceinline__ float moe_value(float sv, float bv, float g, bool combine) {
  float y = __fmul_rn(__fadd_rn(sv, bv), g);
  if (combine) y = logf(__fadd_rn(expf(y), 2.220446049250313e-16f));
  return y;
}

__global__ void __launch_bounds__(kMoeRows * 32) moe_epilogue_f32_kernel(const __grid_constant__ MoeF32Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kMoeRows + (threadIdx.x >> 5);
  if (row >= p.M) return;
  const int F = p.F;
  const float* sr = p.s + row * p.lds;
  const float l0 = __fadd_rn(sr[2 * F], p.br[0]), l1 = __fadd_rn(sr[2 * F + 1], p.br[1]);
  const int e = l1 > l0 ? 1 : 0;  // ties (and NaN) -> expert 0, as cpu::moe_router_forward
  // the CPU's softmax of the chosen expert: exp(0) / (exp(0) + exp(l_other - l_e))
  const float g = p.prob ? 1.0f / __fadd_rn(1.0f, expf(__fsub_rn(e ? l0 : l1, e ? l1 : l0))) : 1.0f;
  if (lane == 0 && p.choice) p.choice[row] = static_cast<int8_t>(e);
  const float* y = sr + e * F;
  const float* bias = e ? p.b1 : p.b0;
  float* orow = p.out + row * p.ldo;
  if (p.vec) {
    const float4* y4 = reinterpret_cast<const float4*>(y);
    const float4* b4 = reinterpret_cast<const float4*>(bias);
    float4* o4 = reinterpret_cast<float4*>(orow);
    for (int c = lane; c < F / 4; c += 32) {
      const float4 a = y4[c], bb = b4[c];
      float4 t = make_float4(moe_value(a.x, bb.x, g, p.combine), moe_value(a.y, bb.y, g, p.combine),
                             moe_value(a.z, bb.z, g, p.combine), moe_value(a.w, bb.w, g, p.combine));
      if (p.accumulate) {
        const float4 x = o4[c];
        t = make_float4(__fadd_rn(x.x, t.x), __fadd_rn(x.y, t.y), __fadd_rn(x.z, t.z), __fadd_rn(x.w, t.w));
      }
      o4[c] = t;
    }
    return;
  }
  for (int c = lane; c < F; c += 32) {
    const float t = moe_value(y[c], bias[c], g, p.combine);
    orow[c] = p.accumulate ? __fadd_rn(orow[c], t) : t;
  }
}

}  // namespace

// =========================================================================================================

void nchw_to_nhwc_f32(float* y, const float* x, int B, int C, int HW, cudaStream_t stream) {
  SAV_CHECK(B >= 0 && C >= 0 && HW >= 0, "nchw_to_nhwc: negative size B=" << B << " C=" << C << " HW=" << HW);
  if (int64_t(B) * C * HW == 0) return;
  SAV_CHECK(y && x, "nchw_to_nhwc: null pointer");
  SAV_CHECK(B <= 65535, "nchw_to_nhwc: batch " << B << " exceeds the grid limit 65535");
  if (C < 16) {
    const dim3 grid((HW + 255) / 256, B);
    nchw_to_nhwc_small_kernel<<<grid, 256, 0, stream>>>(y, x, C, HW);
  } else {
    SAV_CHECK((C + 31) / 32 <= 65535, "nchw_to_nhwc: C=" << C << " too large");
    const dim3 grid((HW + 31) / 32, (C + 31) / 32, B);
    nchw_to_nhwc_tiled_kernel<<<grid, dim3(32, 8), 0, stream>>>(y, x, C, HW);
  }
  SAV_CUDA_CHECK_LAUNCH();
}

void im2col_nhwc_f32(float* cols, const float* x, int B, int H, int W, int Cin, int k, int s, int pad,
                     cudaStream_t stream) {
  SAV_CHECK(B >= 1 && H >= 1 && W >= 1 && Cin >= 1 && k >= 1 && s >= 1 && pad >= 0,
            "im2col_nhwc: bad sizes B=" << B << " H=" << H << " W=" << W << " Cin=" << Cin << " k=" << k << " s=" << s
                                        << " pad=" << pad);
  SAV_CHECK(H + 2 * int64_t(pad) >= k && W + 2 * int64_t(pad) >= k,
            "im2col_nhwc: kernel k=" << k << " is larger than the padded input " << H << "x" << W << " + 2*" << pad);
  SAV_CHECK(cols && x, "im2col_nhwc: null pointer");
  SAV_CHECK(int64_t(k) * k * Cin <= INT_MAX && int64_t(H) * W * Cin <= INT_MAX,
            "im2col_nhwc: sizes too large (k*k*Cin and H*W*Cin must fit in int)");
  IcParams p{};
  p.cols = cols, p.x = x, p.H = H, p.W = W, p.Cin = Cin, p.k = k, p.s = s, p.pad = pad;
  p.Ho = cpu::conv_out_size(H, k, s, pad), p.Wo = cpu::conv_out_size(W, k, s, pad);
  p.kk = k * k, p.K = Cin * p.kk;
  p.M = int64_t(B) * p.Ho * p.Wo;
  const int per_kk = kIcBudget / p.kk;  // channels of one row that fit
  if (per_kk < 2) {
    im2col_direct_kernel<<<grid_stride_blocks(p.M * p.K, 256), 256, 0, stream>>>(p);
    SAV_CUDA_CHECK_LAUNCH();
    return;
  }
  const int cc_max = per_kk % 2 == 1 ? per_kk : per_kk - 1;  // odd: its own stride fits
  const int chunks = (Cin + cc_max - 1) / cc_max;
  p.cc = (Cin + chunks - 1) / chunks;  // equal chunks, <= cc_max
  p.cs = p.cc | 1;
  p.rows = std::max(1, std::min(kIcMaxRows, kIcBudget / (p.kk * p.cs)));
  const int cn_last = Cin - (chunks - 1) * p.cc;
  p.dk = FastDiv(k), p.dkk = FastDiv(p.kk);
  p.dcn[0] = FastDiv(p.cc), p.dcn[1] = FastDiv(cn_last);
  p.drow[0] = FastDiv(p.kk * p.cc), p.drow[1] = FastDiv(p.kk * cn_last);
  const int64_t blocks = (p.M + p.rows - 1) / p.rows;
  SAV_CHECK(blocks <= INT_MAX && chunks <= 65535, "im2col_nhwc: too many output rows (" << p.M << ")");
  im2col_smem_kernel<<<dim3(unsigned(blocks), chunks), kIcThreads, 0, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
}

void layernorm_f32(float* y, int ldy, const float* x, int ldx, const float* w, const float* b, int M, int C, float eps,
                   cudaStream_t stream) {
  SAV_CHECK(C >= 1 && M >= 0, "layernorm_f32: bad sizes M=" << M << " C=" << C);
  SAV_CHECK(ldy >= C && ldx >= C, "layernorm_f32: leading dimensions " << ldy << ", " << ldx << " below width " << C);
  SAV_CHECK(y != x || ldy == ldx, "layernorm_f32: in place needs ldy == ldx");
  if (M == 0) return;
  SAV_CHECK(y && x && w && b, "layernorm_f32: null pointer");
  LnParams p{y, x, w, b, ldy, ldx, M, C, eps};
  if (C > kLnMaxWarpC) {
    layernorm_block_kernel<<<M, kLnBlockThreads, 0, stream>>>(p);
  } else {
    const int blocks = (M + kLnWarps - 1) / kLnWarps;
    const int per = (C + 31) / 32;
    if (per <= 1)
      layernorm_warp_kernel<1><<<blocks, kLnWarps * 32, 0, stream>>>(p);
    else if (per <= 2)
      layernorm_warp_kernel<2><<<blocks, kLnWarps * 32, 0, stream>>>(p);
    else if (per <= 4)
      layernorm_warp_kernel<4><<<blocks, kLnWarps * 32, 0, stream>>>(p);
    else if (per <= 8)
      layernorm_warp_kernel<8><<<blocks, kLnWarps * 32, 0, stream>>>(p);
    else if (per <= 16)
      layernorm_warp_kernel<16><<<blocks, kLnWarps * 32, 0, stream>>>(p);
    else
      layernorm_warp_kernel<32><<<blocks, kLnWarps * 32, 0, stream>>>(p);
  }
  SAV_CUDA_CHECK_LAUNCH();
}

bool attention_q_kv_supports(int C, int H) { return C >= 1 && H >= 1 && C % H == 0 && C / H <= kAqMaxD; }

void attention_q_kv_f32(float* out, const float* q, const float* kv, int B, int N, int Nk, int C, int H,
                        cudaStream_t stream) {
  SAV_CHECK(attention_q_kv_supports(C, H),
            "attention_q_kv_f32: C=" << C << ", H=" << H << " not supported (C % H == 0, head size C/H <= " << kAqMaxD
                                     << ")");
  SAV_CHECK(B >= 0 && N >= 1 && Nk >= 1, "attention_q_kv_f32: bad sizes B=" << B << " N=" << N << " Nk=" << Nk);
  if (B == 0) return;
  SAV_CHECK(out && q && kv, "attention_q_kv_f32: null pointer");
  AqParams p{};
  p.out = out, p.q = q, p.kv = kv, p.N = N, p.Nk = Nk, p.C = C, p.H = H, p.d = C / H;
  p.qscale = float(1.4426950408889634 / std::sqrt(double(p.d)));
  p.vec = p.d % 4 == 0 && aligned16(q) && aligned16(kv) && aligned16(out);
  switch (p.d <= 16 ? 1 : p.d <= 32 ? 2 : p.d <= 64 ? 4 : 8) {
    case 1:
      launch_attention_q_kv<1>(p, B, H, stream);
      break;
    case 2:
      launch_attention_q_kv<2>(p, B, H, stream);
      break;
    case 4:
      launch_attention_q_kv<4>(p, B, H, stream);
      break;
    default:
      launch_attention_q_kv<8>(p, B, H, stream);
      break;
  }
}

void dwconv2d_f32(float* y, const float* x, const float* w, const float* b, int B, int H, int W, int C, int k,
                  bool gelu, cudaStream_t stream) {
  SAV_CHECK(B >= 1 && H >= 1 && W >= 1 && C >= 1 && k >= 1,
            "dwconv2d_f32: bad sizes B=" << B << " H=" << H << " W=" << W << " C=" << C << " k=" << k);
  SAV_CHECK(k % 2 == 1, "dwconv2d_f32: kernel size k must be odd, got " << k);
  SAV_CHECK(y && x && w, "dwconv2d_f32: null pointer");
  SAV_CHECK(y != x, "dwconv2d_f32: y must not alias x");
  DwParams p{};
  p.y = y, p.x = x, p.w = w, p.b = b, p.H = H, p.W = W, p.C = C, p.k = k, p.gelu = gelu;
  p.nrx = (W + kDwRun - 1) / kDwRun;
  SAV_CHECK(
      int64_t(B) * H * p.nrx <= INT_MAX && int64_t(H) * W * C <= INT_MAX && int64_t(C) * k * k <= INT_MAX,
      "dwconv2d_f32: sizes too large for 32-bit indexing (B=" << B << " H=" << H << " W=" << W << " C=" << C << ")");
  p.runs = B * H * p.nrx;
  const bool pairs =
      k == 3 && C % 2 == 0 && reinterpret_cast<uintptr_t>(x) % 8 == 0 && reinterpret_cast<uintptr_t>(y) % 8 == 0;
  const int64_t bx = (p.runs + kDwWarps - 1) / kDwWarps, by = (C + (pairs ? 63 : 31)) / (pairs ? 64 : 32);
  SAV_CHECK(bx <= INT_MAX && by <= 65535, "dwconv2d_f32: sizes too large");
  const dim3 grid{unsigned(bx), unsigned(by)}, block{32, kDwWarps};
  if (pairs)
    dwconv2d_kernel<3, 2><<<grid, block, 0, stream>>>(p);
  else if (k == 3)
    dwconv2d_kernel<3, 1><<<grid, block, 0, stream>>>(p);
  else
    dwconv2d_kernel<0, 1><<<grid, block, 0, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
}

void mean_tokens_f32(float* y, const float* x, int B, int N, int C, cudaStream_t stream) {
  SAV_CHECK(B >= 0 && N >= 1 && C >= 1, "mean_tokens_f32: bad sizes B=" << B << " N=" << N << " C=" << C);
  if (B == 0) return;
  SAV_CHECK(y && x, "mean_tokens_f32: null pointer");
  const int64_t total = int64_t(B) * C;
  mean_tokens_kernel<<<grid_stride_blocks(total, 256), 256, 0, stream>>>(y, x, B, N, C, 1.0f / float(N));
  SAV_CUDA_CHECK_LAUNCH();
}

void release_fixed_point_f32(float* y, const float* x, int64_t n, cudaStream_t stream) {
  SAV_CHECK(n >= 0, "release_fixed_point_f32: negative size " << n);
  if (n == 0) return;
  SAV_CHECK(y && x, "release_fixed_point_f32: null pointer");
  const bool vec = aligned16(x) && aligned16(y);
  fixed_point_kernel<<<grid_stride_blocks(vec ? n / 4 + 4 : n, 256), 256, 0, stream>>>(y, x, n, vec);
  SAV_CUDA_CHECK_LAUNCH();
}

void moe_epilogue_f32(float* out, int ldo, int8_t* choice, const float* s, int lds, const float* b0, const float* b1,
                      const float* br, int M, int F, MoeGate gate, bool release_combine, bool accumulate,
                      cudaStream_t stream) {
  SAV_CHECK(M >= 0 && F >= 1 && ldo >= F && int64_t(lds) >= 2 * int64_t(F) + 2,
            "moe_epilogue_f32: bad sizes M=" << M << " F=" << F << " ldo=" << ldo << " lds=" << lds
                                             << " (lds >= 2F + 2: both experts and the router logits)");
  SAV_CHECK(gate == moe_gate_straight_through || gate == moe_gate_prob, "moe_epilogue_f32: unknown gate " << int(gate));
  if (M == 0) return;
  SAV_CHECK(out && s && b0 && b1 && br, "moe_epilogue_f32: null pointer");
  MoeF32Params p{};
  p.out = out, p.choice = choice, p.s = s, p.b0 = b0, p.b1 = b1, p.br = br;
  p.ldo = ldo, p.lds = lds, p.M = M, p.F = F;
  p.prob = gate == moe_gate_prob, p.combine = release_combine, p.accumulate = accumulate;
  p.vec =
      F % 4 == 0 && lds % 4 == 0 && ldo % 4 == 0 && aligned16(s) && aligned16(b0) && aligned16(b1) && aligned16(out);
  const int blocks = (M + kMoeRows - 1) / kMoeRows;
  moe_epilogue_f32_kernel<<<blocks, kMoeRows * 32, 0, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
}

}  // namespace sav::cuda
