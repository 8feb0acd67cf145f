// The float32 PVTv2 training ops of pvt_train_ops.h. Every output element is written by exactly one thread; no
// atomics; every sum runs in an order fixed by the sizes alone, so reruns are bit-identical. Launch
// configurations:
//
//  col2im_nhwc_f32        grid-stride, 256 threads, one thread per element (b, y, x, ci) of dx: the taps that
//                         reach it are ky = (y + pad) mod s, + s, ... (then oy = (y + pad - ky) / s is integral)
//                         and likewise kx; contributions with oy >= Ho or ox >= Wo are dropped; summed in (ky, kx)
//                         order from 0.0f and stored (dx overwritten).
//  dwconv2d_backward_f32  dx: blocks of 32 x 8 threads, (32 channels) x (8 pixels), grid (ceil(B*H*W / 8),
//                         ceil(C / 32)); each thread gathers sum_{ky,kx} w[c,ky,kx] dy[b, y-ky+p, x-kx+p, c] in
//                         (ky, kx) order (fmaf) and stores it.
//                         dw / db: the B*H*W pixels in chunks of kDwChunk (flattened (b, y, x) order); kernel 1,
//                         grid (chunks, ceil(C / 32)) of 32 x 8 threads, writes per-chunk partials ws[(chunk*T +
//                         t)*C + c], t = ky*k + kx for the taps and t = k*k (T - 1) for db. k = 3: thread (c, ty)
//                         takes the pixels ty, ty + 8, ... of the chunk with all T sums in registers, then the 8
//                         partial sets are added in ty order through shared memory. Other k: thread (c, ty) takes
//                         the sums t = ty, ty + 8, ... one at a time, each over the chunk's pixels in order.
//                         Kernel 2: one thread per (t, c) adds the chunk partials in chunk order (from 0.0f) and
//                         adds the total to dw[c*k*k + t] or db[c].
//  attention_q_kv_train_* one 256-thread block per (b, h, tile of 8 query rows), grid B*H*ceil(N/8) (one
//                         dimension). Forward: the tile's query rows in shared memory, scores (8 x Nk floats of
//                         dynamic shared memory, up to 128 KB for Nk = 4096: opt-in above 48 KB) by one warp per
//                         key (lanes over the head's dims, xor-shuffle sums), softmax by one warp per row (expf,
//                         division by the sum), out = P V with one thread per (row, dim) summing over keys in
//                         order. Backward: kernel 1 (same tiling) dP = dout V^T into shared memory, then
//                         ds = P (dP - rowsum(dP P)) to the work space; kernel 2 dq = scale ds K, one thread per
//                         (query row, dim), keys in order; kernel 3 dk = scale ds^T Q and dv = P^T dout: one
//                         block per (b, h, tile of KR key rows), KR = 8 (N <= 256), 4 (N <= 1024) or 2, and
//                         S = max(1, 256 / (KR d)) query slices: thread (slice, key row, dim) sums its contiguous
//                         slice of the queries in order, then the S slice partials are added in slice order
//                         through shared memory (the slice bounds depend on N and S only).
//  mean_tokens_backward_f32  grid-stride elementwise, dx = dy * (1.0f / N) with the host's 1.0f / float(N).
#include <algorithm>
#include <climits>
#include <cmath>

#include "ops/cpu/conv.h"  // conv_out_size
#include "ops/cuda/pvt_train_ops.h"

namespace sav::cuda {

namespace {

constexpr int kThreads = 256;

int grid_stride_blocks(int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(sm_count()) * 16)));
}

__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// col2im

struct C2iGeom {
  int H, W, Cin, k, s, pad, Ho, Wo, K;
  int64_t total;  // B*H*W*Cin
};

__global__ void __launch_bounds__(kThreads) col2im_kernel(float* dx, const float* dcols, const C2iGeom g) {
  for (int64_t i = global_thread(); i < g.total; i += grid_threads()) {
    const int64_t pix = i / g.Cin;
    const int ci = int(i - pix * g.Cin);
    const int64_t row = pix / g.W;  // b*H + y
    const int x = int(pix - row * g.W);
    const int64_t b = row / g.H;
    const int y = int(row - b * g.H);
    const int ty = y + g.pad, tx = x + g.pad;  // = oy*s + ky, ox*s + kx
    const float* db = dcols + b * g.Ho * g.Wo * g.K + ci * g.k * g.k;
    float acc = 0.0f;
    for (int ky = ty % g.s; ky < g.k && ky <= ty; ky += g.s) {
      const int oy = (ty - ky) / g.s;
      if (oy >= g.Ho) continue;
      for (int kx = tx % g.s; kx < g.k && kx <= tx; kx += g.s) {
        const int ox = (tx - kx) / g.s;
        if (ox >= g.Wo) continue;
        acc += db[(int64_t(oy) * g.Wo + ox) * g.K + ky * g.k + kx];
      }
    }
    dx[i] = acc;
  }
}

// ---------------------------------------------------------------------------------------------------------
// depthwise conv backward

constexpr int kDwChunk = 2048;  // pixels per chunk of the dw / db partial sums
constexpr int kDwTy = 8;        // blocks of 32 x kDwTy threads

struct DwGeom {
  int H, W, C, k;
  int npix;  // B*H*W
};

// dx[b, y, x, c] = sum_{ky,kx} w[c, ky, kx] dy[b, y-ky+p, x-kx+p, c] (taps outside the image skipped).
__global__ void __launch_bounds__(32 * kDwTy) dw_dx_kernel(float* dx, const float* dy, const float* w, const DwGeom g) {
  const int c = blockIdx.y * 32 + threadIdx.x;
  const int pix = blockIdx.x * kDwTy + threadIdx.y;
  if (c >= g.C || pix >= g.npix) return;
  const int row = pix / g.W, x = pix - row * g.W, b = row / g.H, y = row - b * g.H;
  const int k = g.k, p = k / 2;
  const float* wc = w + int64_t(c) * k * k;
  const float* dyb = dy + int64_t(b) * g.H * g.W * g.C + c;
  float acc = 0.0f;
  for (int ky = 0; ky < k; ++ky) {
    const int oy = y - ky + p;
    if (oy < 0 || oy >= g.H) continue;
    for (int kx = 0; kx < k; ++kx) {
      const int ox = x - kx + p;
      if (ox < 0 || ox >= g.W) continue;
      acc = fmaf(wc[ky * k + kx], dyb[(int64_t(oy) * g.W + ox) * g.C], acc);
    }
  }
  dx[int64_t(pix) * g.C + c] = acc;
}

// Chunk partials, k = K known at compile time: all T = K*K + 1 sums of a thread in registers.
template <int K>
__global__ void __launch_bounds__(32 * kDwTy)
    dw_partial_reg_kernel(float* ws, const float* dy, const float* x, const DwGeom g, bool want_dw) {
  constexpr int T = K * K + 1, P = K / 2;
  __shared__ float red[kDwTy][T][32];
  const int lane = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.y * 32 + lane;
  const int p0 = blockIdx.x * kDwChunk, p1 = min(g.npix, p0 + kDwChunk);
  const int H = g.H, W = g.W, C = g.C;
  float acc[T];
#pragma unroll
  for (int t = 0; t < T; ++t) acc[t] = 0.0f;
  if (c < C) {
    for (int pix = p0 + ty; pix < p1; pix += kDwTy) {
      const float gv = dy[int64_t(pix) * C + c];
      acc[T - 1] += gv;
      if (!want_dw) continue;
      const int row = pix / W, xx = pix - row * W, b = row / H, y = row - b * H;
      const float* xb = x + int64_t(b) * H * W * C + c;
#pragma unroll
      for (int ky = 0; ky < K; ++ky) {
        const int iy = y + ky - P;
        if (iy < 0 || iy >= H) continue;
#pragma unroll
        for (int kx = 0; kx < K; ++kx) {
          const int ix = xx + kx - P;
          if (ix < 0 || ix >= W) continue;
          acc[ky * K + kx] = fmaf(gv, xb[(int64_t(iy) * W + ix) * C], acc[ky * K + kx]);
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < T; ++t) red[ty][t][lane] = acc[t];
  __syncthreads();
  if (c >= C) return;
  for (int t = ty; t < T; t += kDwTy) {
    float s = red[0][t][lane];
#pragma unroll
    for (int r = 1; r < kDwTy; ++r) s += red[r][t][lane];
    ws[(int64_t(blockIdx.x) * T + t) * C + c] = s;
  }
}

// Chunk partials, any k: thread (c, ty) computes the sums t = ty, ty + 8, ..., each over the chunk in order.
__global__ void __launch_bounds__(32 * kDwTy)
    dw_partial_generic_kernel(float* ws, const float* dy, const float* x, const DwGeom g, bool want_dw) {
  const int c = blockIdx.y * 32 + threadIdx.x;
  if (c >= g.C) return;
  const int H = g.H, W = g.W, C = g.C, k = g.k, P = k / 2, kk = k * k, T = kk + 1;
  const int p0 = blockIdx.x * kDwChunk, p1 = min(g.npix, p0 + kDwChunk);
  const int row0 = p0 / W, x0 = p0 - row0 * W, b0 = row0 / H, y0 = row0 - b0 * H;
  for (int t = threadIdx.y; t < T; t += kDwTy) {
    if (t < kk && !want_dw) continue;  // not read by the finalize
    const int ky = t / k, kx = t - ky * k;
    float acc = 0.0f;
    int b = b0, y = y0, xx = x0;
    for (int pix = p0; pix < p1; ++pix) {
      const float gv = dy[int64_t(pix) * C + c];
      if (t == kk) {
        acc += gv;
      } else {
        const int iy = y + ky - P, ix = xx + kx - P;
        if (iy >= 0 && iy < H && ix >= 0 && ix < W) acc = fmaf(gv, x[((int64_t(b) * H + iy) * W + ix) * C + c], acc);
      }
      if (++xx == W) {
        xx = 0;
        if (++y == H) y = 0, ++b;
      }
    }
    ws[(int64_t(blockIdx.x) * T + t) * C + c] = acc;
  }
}

// dw[c*kk + t] += sum over chunks of ws[(chunk*T + t)*C + c] (t < kk), db[c] += the same for t = kk.
__global__ void __launch_bounds__(kThreads)
    dw_finalize_kernel(float* dw, float* db, const float* ws, int nchunks, int C, int kk) {
  const int T = kk + 1;
  const int64_t n = int64_t(T) * C;
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const int t = int(i / C), c = int(i - int64_t(t) * C);
    float* dst = t < kk ? (dw ? dw + int64_t(c) * kk + t : nullptr) : (db ? db + c : nullptr);
    if (!dst) continue;
    float s = 0.0f;
#pragma unroll 8  // the loads run ahead of the (ordered) additions
    for (int ch = 0; ch < nchunks; ++ch) s += ws[(int64_t(ch) * T + t) * C + c];
    *dst += s;
  }
}

// ---------------------------------------------------------------------------------------------------------
// attention with separate q and kv

constexpr int kAqRows = 8;  // query rows per block (forward, ds, dq)
constexpr int kAqThreads = 256;
constexpr int kAqWarps = kAqThreads / 32;
constexpr int kAqMaxD = 128;
constexpr int kAqMaxNk = 4096;
static_assert(kAqRows == kAqWarps, "the softmax gives one warp to each row of the tile");

struct AqGeom {
  int N, Nk, C, H, d;
  int tiles;       // query tiles of kAqRows rows
  int kr, ktiles;  // key rows per block of the dk / dv kernel, and its tiles
  int slices;      // query slices of the dk / dv kernel
  float scale;
};

struct AqTile {
  int b, h, r0, rows;
};

// Block -> (b, h, tile): tiles of `per` rows out of n.
__device__ __forceinline__ AqTile aq_tile(int n, int tiles, int per, int H) {
  const int tile = blockIdx.x % tiles, bh = blockIdx.x / tiles;
  AqTile t;
  t.h = bh % H;
  t.b = bh / H;
  t.r0 = tile * per;
  t.rows = min(per, n - t.r0);
  return t;
}

// A (rows x d, shared) = rows 0 .. rows-1 of src (row r at src + r * lda).
__device__ __forceinline__ void aq_load_rows(float* A, const float* src, int64_t lda, int rows, int d) {
  for (int e = threadIdx.x; e < rows * d; e += kAqThreads) {
    const int r = e / d, t = e - r * d;
    A[e] = src[r * lda + t];
  }
}

// S[r * Nk + j] = alpha * sum_t A[r * d + t] * kb[j * ldk + t] for r < rows, j < Nk: one warp per key j, lanes
// over t (<= 128: 4 values per lane), xor-shuffle sums. The loops are uniform over each warp.
__device__ __forceinline__ void aq_scores(float* S, const float* A, const float* kb, int64_t ldk, int Nk, int d,
                                          int rows, float alpha) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int j = warp; j < Nk; j += kAqWarps) {
    const float* kj = kb + j * ldk;
    float kr[kAqMaxD / 32];
#pragma unroll
    for (int m = 0; m < kAqMaxD / 32; ++m) {
      const int t = lane + 32 * m;
      kr[m] = t < d ? kj[t] : 0.0f;
    }
    for (int r = 0; r < rows; ++r) {
      const float* ar = A + r * d;
      float s = 0.0f;
#pragma unroll
      for (int m = 0; m < kAqMaxD / 32; ++m) {
        const int t = lane + 32 * m;
        if (t < d) s += ar[t] * kr[m];
      }
      s = warp_sum(s);
      if (lane == 0) S[r * Nk + j] = s * alpha;
    }
  }
}

__global__ void __launch_bounds__(kAqThreads)
    aq_forward_kernel(float* out, float* att, const float* q, const float* kv, const AqGeom g) {
  extern __shared__ float smem[];
  const AqTile tl = aq_tile(g.N, g.tiles, kAqRows, g.H);
  const int N = g.N, Nk = g.Nk, C = g.C, d = g.d;
  const int64_t C2 = 2 * int64_t(C);
  float* S = smem;                 // kAqRows x Nk: scores, then probabilities
  float* A = smem + kAqRows * Nk;  // kAqRows x d: the query rows
  const float* kvb = kv + int64_t(tl.b) * Nk * C2 + tl.h * d;
  aq_load_rows(A, q + (int64_t(tl.b) * N + tl.r0) * C + tl.h * d, C, tl.rows, d);
  __syncthreads();
  aq_scores(S, A, kvb, C2, Nk, d, tl.rows, g.scale);
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp < tl.rows) {
    float* Sr = S + warp * Nk;
    float mx = -INFINITY;
    for (int j = lane; j < Nk; j += 32) mx = fmaxf(mx, Sr[j]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j < Nk; j += 32) {
      const float e = expf(Sr[j] - mx);
      Sr[j] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    float* ar = att + ((int64_t(tl.b) * g.H + tl.h) * N + tl.r0 + warp) * Nk;
    for (int j = lane; j < Nk; j += 32) {
      const float p = Sr[j] / sum;
      Sr[j] = p;
      ar[j] = p;
    }
  }
  __syncthreads();
  const float* vb = kvb + C;
  for (int e = threadIdx.x; e < tl.rows * d; e += kAqThreads) {
    const int r = e / d, t = e - r * d;
    const float* pr = S + r * Nk;
    float acc = 0.0f;
    for (int j = 0; j < Nk; ++j) acc += pr[j] * vb[j * C2 + t];
    out[(int64_t(tl.b) * N + tl.r0 + r) * C + tl.h * d + t] = acc;
  }
}

// ds rows of the tile: dP = dout V^T (shared), then ds = P (dP - sum_j dP P).
__global__ void __launch_bounds__(kAqThreads)
    aq_ds_kernel(float* ds, const float* dout, const float* kv, const float* att, const AqGeom g) {
  extern __shared__ float smem[];
  const AqTile tl = aq_tile(g.N, g.tiles, kAqRows, g.H);
  const int N = g.N, Nk = g.Nk, C = g.C, d = g.d;
  const int64_t C2 = 2 * int64_t(C);
  float* S = smem;                 // kAqRows x Nk: dP
  float* A = smem + kAqRows * Nk;  // kAqRows x d: dout rows
  aq_load_rows(A, dout + (int64_t(tl.b) * N + tl.r0) * C + tl.h * d, C, tl.rows, d);
  __syncthreads();
  aq_scores(S, A, kv + int64_t(tl.b) * Nk * C2 + C + tl.h * d, C2, Nk, d, tl.rows, 1.0f);
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp < tl.rows) {
    const float* Sr = S + warp * Nk;
    const int64_t off = ((int64_t(tl.b) * g.H + tl.h) * N + tl.r0 + warp) * Nk;
    const float* pr = att + off;
    float dot = 0.0f;
    for (int j = lane; j < Nk; j += 32) dot += Sr[j] * pr[j];
    dot = warp_sum(dot);
    float* dsr = ds + off;
    for (int j = lane; j < Nk; j += 32) dsr[j] = pr[j] * (Sr[j] - dot);
  }
}

// dq[i, t] = scale sum_j ds[i, j] k[j, t]: one thread per (query row of the tile, t), keys in order.
__global__ void __launch_bounds__(kAqThreads)
    aq_dq_kernel(float* dq, const float* ds, const float* kv, const AqGeom g) {
  const AqTile tl = aq_tile(g.N, g.tiles, kAqRows, g.H);
  const int N = g.N, Nk = g.Nk, C = g.C, d = g.d;
  const int64_t C2 = 2 * int64_t(C);
  const float* kb = kv + int64_t(tl.b) * Nk * C2 + tl.h * d;
  const float* dsb = ds + (int64_t(tl.b) * g.H + tl.h) * N * Nk;
  for (int e = threadIdx.x; e < tl.rows * d; e += kAqThreads) {
    const int r = e / d, t = e - r * d, i = tl.r0 + r;
    const float* dsr = dsb + int64_t(i) * Nk;
    float acc = 0.0f;
    for (int j = 0; j < Nk; ++j) acc += dsr[j] * kb[j * C2 + t];
    dq[(int64_t(tl.b) * N + i) * C + tl.h * d + t] = acc * g.scale;
  }
}

// dk[j, t] = scale sum_i ds[i, j] q[i, t];  dv[j, t] = sum_i P[i, j] dout[i, t], for the tile's key rows j. With
// S = g.slices > 1 (S * kr * d <= 256): thread (s, r, t) sums the queries [N s / S, N (s+1) / S) in order, the S
// partials are then added in slice order; S = 1: one thread per (r, t) (strided), all queries in order.
__global__ void __launch_bounds__(kAqThreads)
    aq_dkv_kernel(float* dkv, const float* ds, const float* dout, const float* q, const float* att, const AqGeom g) {
  __shared__ float red_k[kAqThreads], red_v[kAqThreads];
  const AqTile tl = aq_tile(g.Nk, g.ktiles, g.kr, g.H);
  const int N = g.N, Nk = g.Nk, C = g.C, d = g.d, S = g.slices, W = tl.rows * d;
  const int64_t C2 = 2 * int64_t(C);
  const float* qb = q + int64_t(tl.b) * N * C + tl.h * d;
  const float* ob = dout + int64_t(tl.b) * N * C + tl.h * d;
  const int64_t hoff = (int64_t(tl.b) * g.H + tl.h) * N * Nk;
  float* dkvb = dkv + int64_t(tl.b) * Nk * C2 + tl.h * d;
  if (S == 1) {
    for (int e = threadIdx.x; e < W; e += kAqThreads) {
      const int r = e / d, t = e - r * d, j = tl.r0 + r;
      const float* dsc = ds + hoff + j;
      const float* pc = att + hoff + j;
      float ak = 0.0f, av = 0.0f;
      for (int i = 0; i < N; ++i) {
        ak += dsc[int64_t(i) * Nk] * qb[int64_t(i) * C + t];
        av += pc[int64_t(i) * Nk] * ob[int64_t(i) * C + t];
      }
      float* dr = dkvb + int64_t(j) * C2 + t;
      dr[0] = ak * g.scale;
      dr[C] = av;
    }
    return;
  }
  const int s = threadIdx.x / W, e = threadIdx.x - s * W;
  if (s < S) {
    const int r = e / d, t = e - r * d, j = tl.r0 + r;
    const int i0 = int(int64_t(N) * s / S), i1 = int(int64_t(N) * (s + 1) / S);
    const float* dsc = ds + hoff + j;
    const float* pc = att + hoff + j;
    float ak = 0.0f, av = 0.0f;
    for (int i = i0; i < i1; ++i) {
      ak += dsc[int64_t(i) * Nk] * qb[int64_t(i) * C + t];
      av += pc[int64_t(i) * Nk] * ob[int64_t(i) * C + t];
    }
    red_k[threadIdx.x] = ak;
    red_v[threadIdx.x] = av;
  }
  __syncthreads();
  if (int(threadIdx.x) < W) {
    const int r = threadIdx.x / d, t = threadIdx.x - r * d, j = tl.r0 + r;
    float ak = red_k[threadIdx.x], av = red_v[threadIdx.x];
    for (int ss = 1; ss < S; ++ss) {
      ak += red_k[ss * W + threadIdx.x];
      av += red_v[ss * W + threadIdx.x];
    }
    float* dr = dkvb + int64_t(j) * C2 + t;
    dr[0] = ak * g.scale;
    dr[C] = av;
  }
}

AqGeom aq_geom(int B, int N, int Nk, int C, int H, const char* what) {
  SAV_CHECK(attention_q_kv_train_supports(Nk, C, H), what << ": Nk=" << Nk << ", C=" << C << ", H=" << H
                                                          << " not supported (C % H == 0, head size 1.." << kAqMaxD
                                                          << ", 1 <= Nk <= " << kAqMaxNk << ")");
  SAV_CHECK(B >= 0 && N >= 1, what << ": bad sizes B=" << B << " N=" << N);
  AqGeom g{};
  g.N = N, g.Nk = Nk, g.C = C, g.H = H, g.d = C / H;
  g.tiles = (N + kAqRows - 1) / kAqRows;
  g.kr = N <= 256 ? 8 : N <= 1024 ? 4 : 2;
  g.ktiles = (Nk + g.kr - 1) / g.kr;
  g.slices = std::max(1, kAqThreads / (g.kr * g.d));
  g.scale = float(1.0 / std::sqrt(double(g.d)));
  SAV_CHECK(int64_t(B) * H * g.tiles <= INT_MAX && int64_t(B) * H * g.ktiles <= INT_MAX,
            what << ": too many blocks (B=" << B << ", H=" << H << ", N=" << N << ")");
  return g;
}

// Dynamic shared memory of the forward and ds kernels: the scores of kAqRows rows and the tile's rows.
size_t aq_smem(const AqGeom& g) { return sizeof(float) * size_t(kAqRows) * size_t(g.Nk + g.d); }

// Opts the kernel in to more than 48 KB of dynamic shared memory (once per process: before any graph capture,
// the first call is eager), after checking that the device offers smem bytes.
void aq_allow_smem(const void* kernel, bool& attr_set, size_t smem, const char* what) {
  SAV_CHECK(smem <= size_t(max_smem_per_block()),
            what << ": needs " << smem << " bytes of shared memory, the device offers " << max_smem_per_block());
  if (smem > 48 * 1024 && !attr_set) {
    SAV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem_per_block()));
    attr_set = true;
  }
}

// ---------------------------------------------------------------------------------------------------------
// mean over tokens, backward

__global__ void __launch_bounds__(kThreads)
    mean_backward_kernel(float* dx, const float* dy, int N, int C, float inv, int64_t total) {
  const int64_t NC = int64_t(N) * C;
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t b = i / NC;
    const int64_t c = (i - b * NC) % C;
    dx[i] = __fmul_rn(dy[b * C + c], inv);
  }
}

}  // namespace

// =========================================================================================================

void col2im_nhwc_f32(float* dx, const float* dcols, int B, int H, int W, int Cin, int k, int s, int pad,
                     cudaStream_t stream) {
  SAV_CHECK(B >= 0 && H >= 1 && W >= 1 && Cin >= 1 && k >= 1 && s >= 1 && pad >= 0,
            "col2im_nhwc: bad sizes B=" << B << " H=" << H << " W=" << W << " Cin=" << Cin << " k=" << k << " s=" << s
                                        << " pad=" << pad);
  SAV_CHECK(H + 2 * int64_t(pad) >= k && W + 2 * int64_t(pad) >= k,
            "col2im_nhwc: kernel k=" << k << " is larger than the padded input " << H << "x" << W << " + 2*" << pad);
  SAV_CHECK(int64_t(k) * k * Cin <= INT_MAX && int64_t(H) + pad <= INT_MAX / 2 && int64_t(W) + pad <= INT_MAX / 2,
            "col2im_nhwc: sizes too large (k*k*Cin must fit in int)");
  if (B == 0) return;
  SAV_CHECK(dx && dcols, "col2im_nhwc: null pointer");
  C2iGeom g{};
  g.H = H, g.W = W, g.Cin = Cin, g.k = k, g.s = s, g.pad = pad;
  g.Ho = cpu::conv_out_size(H, k, s, pad), g.Wo = cpu::conv_out_size(W, k, s, pad);
  g.K = Cin * k * k;
  g.total = int64_t(B) * H * W * Cin;
  col2im_kernel<<<grid_stride_blocks(g.total), kThreads, 0, stream>>>(dx, dcols, g);
  SAV_CUDA_CHECK_LAUNCH();
}

namespace {

void check_dwconv_backward(int B, int H, int W, int C, int k) {
  SAV_CHECK(B >= 0 && H >= 1 && W >= 1 && C >= 1 && k >= 1,
            "dwconv2d_backward_f32: bad sizes B=" << B << " H=" << H << " W=" << W << " C=" << C << " k=" << k);
  SAV_CHECK(k % 2 == 1, "dwconv2d_backward_f32: kernel size k must be odd, got " << k);
  SAV_CHECK(int64_t(B) * H * W <= INT_MAX - kDwChunk && int64_t(C) * k * k <= INT_MAX && (C + 31) / 32 <= 65535,
            "dwconv2d_backward_f32: sizes too large (B=" << B << " H=" << H << " W=" << W << " C=" << C << ")");
}

int dw_chunks(int B, int H, int W) { return int((int64_t(B) * H * W + kDwChunk - 1) / kDwChunk); }

}  // namespace

size_t dwconv2d_backward_workspace_floats(int B, int H, int W, int C, int k) {
  if (B <= 0 || H <= 0 || W <= 0 || C <= 0 || k <= 0) return 0;
  return size_t(dw_chunks(B, H, W)) * (size_t(k) * size_t(k) + 1) * size_t(C);
}

void dwconv2d_backward_f32(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w, int B,
                           int H, int W, int C, int k, float* ws, cudaStream_t stream) {
  check_dwconv_backward(B, H, W, C, k);
  if (B == 0 || (!dx && !dw && !db)) return;
  SAV_CHECK(dy, "dwconv2d_backward_f32: null dy");
  SAV_CHECK(!dx || w, "dwconv2d_backward_f32: null w (needed for dx)");
  SAV_CHECK(!dw || x, "dwconv2d_backward_f32: null x (needed for dw)");
  SAV_CHECK(!dx || (dx != dy && dx != x), "dwconv2d_backward_f32: dx must not alias dy or x");
  DwGeom g{};
  g.H = H, g.W = W, g.C = C, g.k = k, g.npix = B * H * W;
  const int cblocks = (C + 31) / 32;
  if (dw || db) {
    SAV_CHECK(ws, "dwconv2d_backward_f32: null work space (dwconv2d_backward_workspace_floats floats)");
    const int nchunks = dw_chunks(B, H, W);
    const dim3 grid(nchunks, cblocks), block(32, kDwTy);
    if (k == 3)
      dw_partial_reg_kernel<3><<<grid, block, 0, stream>>>(ws, dy, x, g, dw != nullptr);
    else
      dw_partial_generic_kernel<<<grid, block, 0, stream>>>(ws, dy, x, g, dw != nullptr);
    SAV_CUDA_CHECK_LAUNCH();
    dw_finalize_kernel<<<grid_stride_blocks(int64_t(k * k + 1) * C), kThreads, 0, stream>>>(dw, db, ws, nchunks, C,
                                                                                            k * k);
    SAV_CUDA_CHECK_LAUNCH();
  }
  if (dx) {
    const dim3 grid((g.npix + kDwTy - 1) / kDwTy, cblocks), block(32, kDwTy);
    dw_dx_kernel<<<grid, block, 0, stream>>>(dx, dy, w, g);
    SAV_CUDA_CHECK_LAUNCH();
  }
}

bool attention_q_kv_train_supports(int Nk, int C, int H) {
  return C >= 1 && H >= 1 && C % H == 0 && C / H <= kAqMaxD && Nk >= 1 && Nk <= kAqMaxNk;
}

void attention_q_kv_train_forward(float* out, float* att, const float* q, const float* kv, int B, int N, int Nk, int C,
                                  int H, cudaStream_t stream) {
  const AqGeom g = aq_geom(B, N, Nk, C, H, "attention_q_kv_train_forward");
  if (B == 0) return;
  SAV_CHECK(out && att && q && kv, "attention_q_kv_train_forward: null pointer");
  const size_t smem = aq_smem(g);
  static bool attr_set = false;
  aq_allow_smem(reinterpret_cast<const void*>(&aq_forward_kernel), attr_set, smem, "attention_q_kv_train_forward");
  aq_forward_kernel<<<B * H * g.tiles, kAqThreads, smem, stream>>>(out, att, q, kv, g);
  SAV_CUDA_CHECK_LAUNCH();
}

void attention_q_kv_train_backward(float* dq, float* dkv, float* ds, const float* dout, const float* q, const float* kv,
                                   const float* att, int B, int N, int Nk, int C, int H, cudaStream_t stream) {
  const AqGeom g = aq_geom(B, N, Nk, C, H, "attention_q_kv_train_backward");
  if (B == 0) return;
  SAV_CHECK(dq && dkv && ds && dout && q && kv && att, "attention_q_kv_train_backward: null pointer");
  const size_t smem = aq_smem(g);
  static bool attr_set = false;
  aq_allow_smem(reinterpret_cast<const void*>(&aq_ds_kernel), attr_set, smem, "attention_q_kv_train_backward");
  aq_ds_kernel<<<B * H * g.tiles, kAqThreads, smem, stream>>>(ds, dout, kv, att, g);
  SAV_CUDA_CHECK_LAUNCH();
  aq_dq_kernel<<<B * H * g.tiles, kAqThreads, 0, stream>>>(dq, ds, kv, g);
  SAV_CUDA_CHECK_LAUNCH();
  aq_dkv_kernel<<<B * H * g.ktiles, kAqThreads, 0, stream>>>(dkv, ds, dout, q, att, g);
  SAV_CUDA_CHECK_LAUNCH();
}

void mean_tokens_backward_f32(float* dx, const float* dy, int B, int N, int C, cudaStream_t stream) {
  SAV_CHECK(B >= 0 && N >= 1 && C >= 1, "mean_tokens_backward_f32: bad sizes B=" << B << " N=" << N << " C=" << C);
  if (B == 0) return;
  SAV_CHECK(dx && dy, "mean_tokens_backward_f32: null pointer");
  const int64_t total = int64_t(B) * N * C;
  mean_backward_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(dx, dy, N, C, 1.0f / float(N), total);
  SAV_CUDA_CHECK_LAUNCH();
}

}  // namespace sav::cuda
