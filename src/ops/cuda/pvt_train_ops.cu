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
//  attention_q_kv_train_* no kernels of their own: cuBLAS batched GEMMs (Blas::batched, one pointer triple per
//                         (b, h)) and the softmax row ops of train_ops.h.
//  mean_tokens_backward_f32  grid-stride elementwise, dx = dy * (1.0f / N) with the host's 1.0f / float(N).
#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "ops/cpu/conv.h"  // conv_out_size
#include "ops/cuda/blas.h"
#include "ops/cuda/pvt_train_ops.h"
#include "ops/cuda/train_ops.h"  // attention_heads_forward / _backward

namespace sav::cuda {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

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
// attention with separate q and kv: the per-head pointers of the batched products

constexpr int kAqMaxD = 1024;

// Checks the sizes and the streams; returns d.
int aq_check(int B, int N, int Nk, int C, int H, const Blas& blas, cudaStream_t stream, const char* what) {
  SAV_CHECK(attention_q_kv_train_supports(Nk, C, H), what << ": Nk=" << Nk << ", C=" << C << ", H=" << H
                                                          << " not supported (C % H == 0, head size 1.." << kAqMaxD
                                                          << ", 2C fits in int, Nk >= 1)");
  SAV_CHECK(B >= 0 && N >= 1 && int64_t(N) * Nk <= INT_MAX && int64_t(B) * H <= INT_MAX,
            what << ": bad sizes B=" << B << " N=" << N << " Nk=" << Nk << " (N >= 1, N*Nk and B*H must fit in int)");
  SAV_CHECK(stream == blas.stream(), what << ": stream differs from the Blas's stream (the row kernels would race "
                                             "with the products)");
  return C / H;
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
  col2im_kernel<<<grid_stride_blocks(g.total, kThreads), kThreads, 0, stream>>>(dx, dcols, g);
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
    dw_finalize_kernel<<<grid_stride_blocks(int64_t(k * k + 1) * C, kThreads), kThreads, 0, stream>>>(
        dw, db, ws, nchunks, C, k * k);
    SAV_CUDA_CHECK_LAUNCH();
  }
  if (dx) {
    const dim3 grid((g.npix + kDwTy - 1) / kDwTy, cblocks), block(32, kDwTy);
    dw_dx_kernel<<<grid, block, 0, stream>>>(dx, dy, w, g);
    SAV_CUDA_CHECK_LAUNCH();
  }
}

bool attention_q_kv_train_supports(int Nk, int C, int H) {
  return C >= 1 && H >= 1 && C % H == 0 && C / H <= kAqMaxD && 2 * int64_t(C) <= INT_MAX && Nk >= 1;
}

void attention_q_kv_train_forward(float* out, float* att, const float* q, const float* kv, int B, int N, int Nk, int C,
                                  int H, Blas& blas, cudaStream_t stream) {
  const int d = aq_check(B, N, Nk, C, H, blas, stream, "attention_q_kv_train_forward");
  if (B == 0) return;
  SAV_CHECK(out && att && q && kv, "attention_q_kv_train_forward: null pointer");
  const int64_t bq = int64_t(N) * C, bkv = int64_t(Nk) * 2 * C;
  attention_heads_forward(out, C, bq, att, {q, C, bq}, {kv, 2 * C, bkv}, {kv + C, 2 * C, bkv}, B, N, Nk, H, d, blas,
                          stream);
}

void attention_q_kv_train_backward(float* dq, float* dkv, float* ds, const float* dout, const float* q, const float* kv,
                                   const float* att, int B, int N, int Nk, int C, int H, Blas& blas,
                                   cudaStream_t stream) {
  const int d = aq_check(B, N, Nk, C, H, blas, stream, "attention_q_kv_train_backward");
  if (B == 0) return;
  SAV_CHECK(dq && dkv && ds && dout && q && kv && att, "attention_q_kv_train_backward: null pointer");
  const int64_t bq = int64_t(N) * C, bkv = int64_t(Nk) * 2 * C;
  attention_heads_backward(dq, dkv, dkv + C, ds, {dout, C, bq}, {q, C, bq}, {kv, 2 * C, bkv}, {kv + C, 2 * C, bkv}, att,
                           B, N, Nk, H, d, blas, stream);
}

void mean_tokens_backward_f32(float* dx, const float* dy, int B, int N, int C, cudaStream_t stream) {
  SAV_CHECK(B >= 0 && N >= 1 && C >= 1, "mean_tokens_backward_f32: bad sizes B=" << B << " N=" << N << " C=" << C);
  if (B == 0) return;
  SAV_CHECK(dx && dy, "mean_tokens_backward_f32: null pointer");
  const int64_t total = int64_t(B) * N * C;
  mean_backward_kernel<<<grid_stride_blocks(total, kThreads), kThreads, 0, stream>>>(dx, dy, N, C, 1.0f / float(N),
                                                                                     total);
  SAV_CUDA_CHECK_LAUNCH();
}

}  // namespace sav::cuda
