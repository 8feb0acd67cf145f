// The float32 training ops of train_ops.h. Every kernel writes each of its output elements from exactly one
// thread; no atomics; every sum runs in an order fixed by the sizes alone, so reruns are bit-identical.
// Launch configurations:
//
//  im2col_f32              grid-stride, 256 threads, one thread per element of cols (a gather; the writes
//                          are coalesced, the reads contiguous along kx).
//  embed_tokens_forward    grid-stride, one thread per element of x.
//  embed_tokens_backward   dpe: grid-stride copy, one thread per element; dpos / dcls: one thread per (n, c),
//                          starting from the stored value and adding dx[b, n, c] for b = 0..B-1 (the CPU
//                          loop's order, so bit-exact).
//  layernorm_train_forward one warp per row, 8 rows per 256-thread block; the row is read three times
//                          (sum, squared deviations, output) in lane-strided order, warp sums by xor shuffles.
//  layernorm_train_backward dw / db: blocks of 32 x 8 threads over (chunk of kColRows rows, 32 columns); each
//                          thread sums 8 rows of its column, the 8 partials are added in order through shared
//                          memory and stored in ws (dw partials, then db partials); then one thread per column
//                          adds the chunk partials in chunk order and adds the total to dw / db. dx: one warp
//                          per row (8 per block), two passes (sums of g and g xhat, then the update).
//  gelu_*, add_f32         grid-stride elementwise.
//  colsum_f32              as LayerNorm's db: chunk partials in ws, then a per-column ordered sum.
//  softmax_rows_f32 / softmax_backward_rows_f32
//                          one warp per row, 8 rows per 256-thread block, grid-stride over the rows (at most
//                          16 blocks per SM); the row is read in lane-strided order: the max, then expf and the
//                          sum (the exponentials stored), then the division; backward: the sum of ds p, then
//                          the update. Warp sums and maxima by xor shuffles.
//  attention_train_*       no kernels of their own: cuBLAS batched GEMMs (Blas::batched, one pointer triple
//                          per (b, h)) and the two row ops above.
//  sumsq_f64               one 256-thread block per chunk of kSqChunk elements (double accumulation, fixed
//                          tree reduction in shared memory), partial sums and non-finite counts in ws; then a
//                          single thread adds the chunk partials in chunk order.
//  adamw_step_f32          grid-stride elementwise; every float operation through the __f*_rn intrinsics (never
//                          contracted into FMAs), in the order of train/optim.cpp's loop.
#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "ops/cuda/blas.h"
#include "ops/cuda/train_ops.h"

namespace sav::cuda {

namespace {

constexpr int kThreads = 256;

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

__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

// ---------------------------------------------------------------------------------------------------------
// im2col and token assembly

__global__ void __launch_bounds__(kThreads)
    im2col_kernel(float* cols, const float* img, int Cin, int S, int p, int G, int64_t total) {
  const int P = G * G, pp = p * p, K = Cin * pp;
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t row = i / K;
    const int col = int(i - row * K);
    const int64_t b = row / P;
    const int pidx = int(row - b * P);
    const int py = pidx / G, px = pidx - py * G;
    const int ci = col / pp, t = col - ci * pp;
    const int ky = t / p, kx = t - ky * p;
    cols[i] = img[((b * Cin + ci) * S + py * p + ky) * S + px * p + kx];
  }
}

__global__ void __launch_bounds__(kThreads)
    embed_forward_kernel(float* x, const float* pe, const float* cls, const float* pos, int N, int C, int64_t total) {
  const int64_t NC = int64_t(N) * C;
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t b = i / NC;
    const int64_t nc = i - b * NC;  // n * C + c
    if (nc < C)
      x[i] = cls[nc] + pos[nc];
    else
      x[i] = pe[b * (NC - C) + nc - C] + pos[nc];
  }
}

__global__ void __launch_bounds__(kThreads) embed_dpe_kernel(float* dpe, const float* dx, int N, int C, int64_t total) {
  const int64_t PC = int64_t(N - 1) * C;
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t b = i / PC;
    dpe[i] = dx[b * (PC + C) + C + (i - b * PC)];
  }
}

// One thread per (n, c): the sums over b in order b = 0..B-1, starting from the stored values.
__global__ void __launch_bounds__(kThreads)
    embed_dpos_kernel(float* dcls, float* dpos, const float* dx, int B, int N, int C) {
  const int64_t NC = int64_t(N) * C;
  for (int64_t i = global_thread(); i < NC; i += grid_threads()) {
    if (dpos) {
      float a = dpos[i];
      for (int b = 0; b < B; ++b) a += dx[b * NC + i];
      dpos[i] = a;
    }
    if (dcls && i < C) {
      float a = dcls[i];
      for (int b = 0; b < B; ++b) a += dx[b * NC + i];
      dcls[i] = a;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// LayerNorm

constexpr int kLnWarps = 8;      // rows per block
constexpr int kColRows = 64;     // rows per chunk of the column partial sums
constexpr int kColThreadsY = 8;  // blocks of 32 x 8 threads

__global__ void __launch_bounds__(kLnWarps * 32)
    ln_forward_kernel(float* y, int ldy, float* mean, float* rstd, const float* x, int ldx, const float* w,
                      const float* b, int M, int C, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kLnWarps + (threadIdx.x >> 5);
  if (row >= M) return;  // the whole warp leaves together
  const float* xr = x + row * ldx;
  float s = 0.0f;
  for (int c = lane; c < C; c += 32) s += xr[c];
  const float mu = warp_sum(s) / float(C);
  float q = 0.0f;
  for (int c = lane; c < C; c += 32) {
    const float dv = xr[c] - mu;
    q += dv * dv;
  }
  const float rs = 1.0f / sqrtf(warp_sum(q) / float(C) + eps);
  float* yr = y + row * ldy;
  for (int c = lane; c < C; c += 32) yr[c] = (xr[c] - mu) * rs * w[c] + b[c];
  if (lane == 0) {
    if (mean) mean[row] = mu;
    if (rstd) rstd[row] = rs;
  }
}

__global__ void __launch_bounds__(kLnWarps * 32)
    ln_backward_dx_kernel(float* dx, int lddx, const float* dy, int lddy, const float* x, int ldx, const float* w,
                          const float* mean, const float* rstd, int M, int C) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kLnWarps + (threadIdx.x >> 5);
  if (row >= M) return;
  const float* xr = x + row * ldx;
  const float* dyr = dy + row * lddy;
  const float mu = mean[row], rs = rstd[row];
  float sg = 0.0f, sgx = 0.0f;
  for (int c = lane; c < C; c += 32) {
    const float g = dyr[c] * w[c];
    const float xhat = (xr[c] - mu) * rs;
    sg += g;
    sgx += g * xhat;
  }
  const float mean_g = warp_sum(sg) / float(C), mean_gx = warp_sum(sgx) / float(C);
  float* dxr = dx + row * lddx;
  for (int c = lane; c < C; c += 32) {
    const float g = dyr[c] * w[c];
    const float xhat = (xr[c] - mu) * rs;
    dxr[c] += rs * (g - mean_g - xhat * mean_gx);
  }
}

// Column partial sums over chunks of kColRows rows: block (chunk, 32 columns), 32 x 8 threads. LN: ws[chunk * C
// + c] = sum dy * xhat, ws[(nchunks + chunk) * C + c] = sum dy; !LN (colsum): ws[chunk * C + c] = sum dy.
template <bool LN>
__global__ void __launch_bounds__(32 * kColThreadsY)
    col_partial_kernel(float* ws, const float* dy, int lddy, const float* x, int ldx, const float* mean,
                       const float* rstd, int M, int C) {
  __shared__ float sw[kColThreadsY][33], sb[kColThreadsY][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.y * 32 + tx;
  const int chunk = blockIdx.x, nchunks = gridDim.x;
  const int r1 = int(min(int64_t(M), (int64_t(chunk) + 1) * kColRows));
  float pw = 0.0f, pb = 0.0f;
  if (c < C) {
    for (int r = chunk * kColRows + ty; r < r1; r += kColThreadsY) {
      const float d = dy[int64_t(r) * lddy + c];
      if constexpr (LN) pw += d * ((x[int64_t(r) * ldx + c] - mean[r]) * rstd[r]);
      pb += d;
    }
  }
  sw[ty][tx] = pw;
  sb[ty][tx] = pb;
  __syncthreads();
  if (ty == 0 && c < C) {
    float tw = 0.0f, tb = 0.0f;
#pragma unroll
    for (int k = 0; k < kColThreadsY; ++k) {
      tw += sw[k][tx];
      tb += sb[k][tx];
    }
    if constexpr (LN) {
      ws[int64_t(chunk) * C + c] = tw;
      ws[(int64_t(nchunks) + chunk) * C + c] = tb;
    } else {
      ws[int64_t(chunk) * C + c] = tb;
    }
  }
}

// out[c] += sum over chunks k = 0..nchunks-1 (in order) of part[k * C + c].
__global__ void __launch_bounds__(kThreads) col_finalize_kernel(float* out, const float* part, int nchunks, int C) {
  const int c = blockIdx.x * kThreads + threadIdx.x;
  if (c >= C) return;
  float s = 0.0f;
#pragma unroll 8
  for (int k = 0; k < nchunks; ++k) s += part[int64_t(k) * C + c];
  out[c] += s;
}

int col_chunks(int M) { return (M + kColRows - 1) / kColRows; }

// ---------------------------------------------------------------------------------------------------------
// GELU, add

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

__global__ void __launch_bounds__(kThreads) gelu_forward_kernel(float* y, const float* x, int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const float v = x[i];
    y[i] = 0.5f * v * (1.0f + erff(v * kInvSqrt2));
  }
}

__global__ void __launch_bounds__(kThreads)
    gelu_backward_kernel(float* dx, const float* dy, const float* x, int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const float v = x[i];
    const float cdf = 0.5f * (1.0f + erff(v * kInvSqrt2));
    const float pdf = kInvSqrt2Pi * expf(-0.5f * v * v);
    dx[i] = dy[i] * (cdf + v * pdf);
  }
}

__global__ void __launch_bounds__(kThreads) add_kernel(float* y, const float* a, const float* b, int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) y[i] = a[i] + b[i];
}

// ---------------------------------------------------------------------------------------------------------
// softmax rows

constexpr int kRowWarps = 8;  // rows per block

int row_blocks(int64_t rows) {
  return int(std::max<int64_t>(1, std::min<int64_t>((rows + kRowWarps - 1) / kRowWarps, int64_t(sm_count()) * 16)));
}

__global__ void __launch_bounds__(kRowWarps * 32) softmax_rows_kernel(float* p, int64_t rows, int n) {
  const int lane = threadIdx.x & 31;
  for (int64_t r = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5); r < rows;
       r += int64_t(gridDim.x) * kRowWarps) {  // uniform over the warp
    float* pr = p + r * n;
    float mx = -INFINITY;
    for (int j = lane; j < n; j += 32) mx = fmaxf(mx, pr[j]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j < n; j += 32) {
      const float e = expf(pr[j] - mx);
      pr[j] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    for (int j = lane; j < n; j += 32) pr[j] = pr[j] / sum;
  }
}

__global__ void __launch_bounds__(kRowWarps * 32)
    softmax_backward_rows_kernel(float* ds, const float* p, int64_t rows, int n) {
  const int lane = threadIdx.x & 31;
  for (int64_t r = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5); r < rows;
       r += int64_t(gridDim.x) * kRowWarps) {
    float* dr = ds + r * n;
    const float* pr = p + r * n;
    float dot = 0.0f;
    for (int j = lane; j < n; j += 32) dot += dr[j] * pr[j];
    dot = warp_sum(dot);
    for (int j = lane; j < n; j += 32) dr[j] = pr[j] * (dr[j] - dot);
  }
}

// ---------------------------------------------------------------------------------------------------------
// attention: the per-head pointers of the batched products

constexpr int kAtMaxD = 1024;
constexpr int kAtMaxN = 46340;  // N * N <= INT_MAX

// ptr[b*H + h] = base + b*bstride + h*hstride.
template <class T>
std::vector<T*> head_ptrs(T* base, int B, int H, int64_t bstride, int64_t hstride) {
  std::vector<T*> v(size_t(B) * H);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) v[size_t(b) * H + h] = base + b * bstride + h * hstride;
  return v;
}

// Checks the sizes and the streams; returns d.
int attention_check(int B, int N, int C, int H, const Blas& blas, cudaStream_t stream, const char* what) {
  SAV_CHECK(attention_train_supports(N, C, H), what << ": N=" << N << ", C=" << C << ", H=" << H
                                                    << " not supported (C % H == 0, head size 1.." << kAtMaxD
                                                    << ", 3C fits in int, 1 <= N <= " << kAtMaxN << ")");
  SAV_CHECK(B >= 0 && int64_t(B) * H <= INT_MAX, what << ": bad batch " << B << " (B*H must fit in int)");
  SAV_CHECK(stream == blas.stream(), what << ": stream differs from the Blas's stream (the row kernels would race "
                                             "with the products)");
  return C / H;
}

// ---------------------------------------------------------------------------------------------------------
// optimizer

constexpr int64_t kSqChunk = int64_t(1) << 15;

__global__ void __launch_bounds__(kThreads) sumsq_partial_kernel(double* ws, const float* g, int64_t n) {
  __shared__ double ss[kThreads];
  __shared__ unsigned int sc[kThreads];
  const int64_t lo = int64_t(blockIdx.x) * kSqChunk, hi = min(n, lo + kSqChunk);
  double s = 0.0;
  unsigned int bad = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const float v = g[i];
    s += double(v) * double(v);
    bad += isfinite(v) ? 0u : 1u;
  }
  ss[threadIdx.x] = s;
  sc[threadIdx.x] = bad;
  __syncthreads();
  for (int o = kThreads / 2; o > 0; o >>= 1) {
    if (int(threadIdx.x) < o) {
      ss[threadIdx.x] += ss[threadIdx.x + o];
      sc[threadIdx.x] += sc[threadIdx.x + o];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    ws[blockIdx.x] = ss[0];
    ws[gridDim.x + blockIdx.x] = double(sc[0]);
  }
}

__global__ void sumsq_final_kernel(double* out, const double* ws, int64_t nchunks) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double s = 0.0, bad = 0.0;
  for (int64_t k = 0; k < nchunks; ++k) {
    s += ws[k];
    bad += ws[nchunks + k];
  }
  out[0] = s;
  out[1] = bad;
}

__global__ void __launch_bounds__(kThreads)
    adamw_kernel(float* p, const float* g, float* m, float* v, const uint8_t* mask, int64_t n, float gscale, float lr,
                 float wd, float b1, float b2, float bc1, float bc2, float eps) {
  const float decay = __fsub_rn(1.0f, __fmul_rn(lr, wd));
  const float omb1 = __fsub_rn(1.0f, b1), omb2 = __fsub_rn(1.0f, b2);
  for (int64_t j = global_thread(); j < n; j += grid_threads()) {
    const float gs = __fmul_rn(g[j], gscale);
    const float mj = __fadd_rn(__fmul_rn(b1, m[j]), __fmul_rn(omb1, gs));
    const float vj = __fadd_rn(__fmul_rn(b2, v[j]), __fmul_rn(__fmul_rn(omb2, gs), gs));
    m[j] = mj;
    v[j] = vj;
    const float mh = __fdiv_rn(mj, bc1), vh = __fdiv_rn(vj, bc2);
    const float dec = mask[j] ? decay : 1.0f;
    p[j] = __fsub_rn(__fmul_rn(p[j], dec), __fdiv_rn(__fmul_rn(lr, mh), __fadd_rn(__fsqrt_rn(vh), eps)));
  }
}

}  // namespace

// ---- patch embedding, tokens ----

void im2col_f32(float* cols, const float* img, int B, int Cin, int S, int p, cudaStream_t stream) {
  SAV_CHECK(B >= 0 && Cin >= 1 && p >= 1 && S >= p,
            "im2col_f32: bad sizes B=" << B << " Cin=" << Cin << " S=" << S << " p=" << p << " (need S >= p >= 1)");
  const int G = S / p;
  SAV_CHECK(int64_t(Cin) * p * p <= INT_MAX && int64_t(G) * G <= INT_MAX, "im2col_f32: sizes too large");
  const int64_t total = int64_t(B) * G * G * Cin * p * p;
  if (total == 0) return;
  SAV_CHECK(cols && img, "im2col_f32: null pointer");
  im2col_kernel<<<grid_stride_blocks(total, kThreads), kThreads, 0, stream>>>(cols, img, Cin, S, p, G, total);
  SAV_CUDA_CHECK_LAUNCH();
}

void embed_tokens_forward(float* x, const float* pe, const float* cls, const float* pos, int B, int N, int C,
                          cudaStream_t stream) {
  SAV_CHECK(B >= 0 && N >= 1 && C >= 1, "embed_tokens_forward: bad sizes B=" << B << " N=" << N << " C=" << C);
  if (B == 0) return;
  SAV_CHECK(x && cls && pos && (pe || N == 1), "embed_tokens_forward: null pointer");
  const int64_t total = int64_t(B) * N * C;
  embed_forward_kernel<<<grid_stride_blocks(total, kThreads), kThreads, 0, stream>>>(x, pe, cls, pos, N, C, total);
  SAV_CUDA_CHECK_LAUNCH();
}

void embed_tokens_backward(float* dpe, float* dcls, float* dpos, const float* dx, int B, int N, int C,
                           cudaStream_t stream) {
  SAV_CHECK(B >= 0 && N >= 1 && C >= 1, "embed_tokens_backward: bad sizes B=" << B << " N=" << N << " C=" << C);
  if (B == 0 || (!dpe && !dcls && !dpos)) return;
  SAV_CHECK(dx, "embed_tokens_backward: null dx");
  const int64_t npe = int64_t(B) * (N - 1) * C;
  if (dpe && npe > 0) {
    embed_dpe_kernel<<<grid_stride_blocks(npe, kThreads), kThreads, 0, stream>>>(dpe, dx, N, C, npe);
    SAV_CUDA_CHECK_LAUNCH();
  }
  if (dcls || dpos) {
    embed_dpos_kernel<<<grid_stride_blocks(int64_t(N) * C, kThreads), kThreads, 0, stream>>>(dcls, dpos, dx, B, N, C);
    SAV_CUDA_CHECK_LAUNCH();
  }
}

// ---- LayerNorm ----

// mean and rstd may be nullptr (not saved); y, x, w, b are required.
void layernorm_train_forward(float* y, int ldy, float* mean, float* rstd, const float* x, int ldx, const float* w,
                             const float* b, int M, int C, float eps, cudaStream_t stream) {
  SAV_CHECK(M >= 0 && C >= 1, "layernorm_train_forward: bad sizes M=" << M << " C=" << C);
  SAV_CHECK(ldy >= C && ldx >= C,
            "layernorm_train_forward: leading dimensions " << ldy << ", " << ldx << " below width " << C);
  if (M == 0) return;
  SAV_CHECK(y && x && w && b, "layernorm_train_forward: null pointer");
  SAV_CHECK(y != x, "layernorm_train_forward: y must not alias x");
  const int blocks = (M + kLnWarps - 1) / kLnWarps;
  ln_forward_kernel<<<blocks, kLnWarps * 32, 0, stream>>>(y, ldy, mean, rstd, x, ldx, w, b, M, C, eps);
  SAV_CUDA_CHECK_LAUNCH();
}

size_t layernorm_backward_workspace_floats(int M, int C) {
  if (M <= 0 || C <= 0) return 0;
  return size_t(2) * size_t(col_chunks(M)) * size_t(C);
}

void layernorm_train_backward(float* dx, int lddx, float* dw, float* db, const float* dy, int lddy, const float* x,
                              int ldx, const float* w, const float* mean, const float* rstd, int M, int C, float* ws,
                              cudaStream_t stream) {
  SAV_CHECK(M >= 0 && C >= 1, "layernorm_train_backward: bad sizes M=" << M << " C=" << C);
  SAV_CHECK(lddy >= C && ldx >= C && (!dx || lddx >= C), "layernorm_train_backward: leading dimensions (dx "
                                                             << lddx << ", dy " << lddy << ", x " << ldx
                                                             << ") below width " << C);
  if (M == 0 || (!dx && !dw && !db)) return;
  SAV_CHECK(dy && x && mean && rstd, "layernorm_train_backward: null pointer");
  SAV_CHECK(!dx || w, "layernorm_train_backward: null w");
  const int nchunks = col_chunks(M);
  SAV_CHECK((C + 31) / 32 <= 65535, "layernorm_train_backward: C=" << C << " too large");
  // the partials first: they read dy, which the caller may have aliased with dx
  if (dw || db) {
    SAV_CHECK(ws, "layernorm_train_backward: null work space (layernorm_backward_workspace_floats floats)");
    const dim3 grid(nchunks, (C + 31) / 32), block(32, kColThreadsY);
    col_partial_kernel<true><<<grid, block, 0, stream>>>(ws, dy, lddy, x, ldx, mean, rstd, M, C);
    SAV_CUDA_CHECK_LAUNCH();
    const int fblocks = (C + kThreads - 1) / kThreads;
    if (dw) {
      col_finalize_kernel<<<fblocks, kThreads, 0, stream>>>(dw, ws, nchunks, C);
      SAV_CUDA_CHECK_LAUNCH();
    }
    if (db) {
      col_finalize_kernel<<<fblocks, kThreads, 0, stream>>>(db, ws + size_t(nchunks) * C, nchunks, C);
      SAV_CUDA_CHECK_LAUNCH();
    }
  }
  if (dx) {
    const int blocks = (M + kLnWarps - 1) / kLnWarps;
    ln_backward_dx_kernel<<<blocks, kLnWarps * 32, 0, stream>>>(dx, lddx, dy, lddy, x, ldx, w, mean, rstd, M, C);
    SAV_CUDA_CHECK_LAUNCH();
  }
}

// ---- GELU, add ----

void gelu_forward_f32(float* y, const float* x, int64_t n, cudaStream_t stream) {
  SAV_CHECK(n >= 0, "gelu_forward_f32: negative size " << n);
  if (n == 0) return;
  SAV_CHECK(y && x, "gelu_forward_f32: null pointer");
  gelu_forward_kernel<<<grid_stride_blocks(n, kThreads), kThreads, 0, stream>>>(y, x, n);
  SAV_CUDA_CHECK_LAUNCH();
}

void gelu_backward_f32(float* dx, const float* dy, const float* x, int64_t n, cudaStream_t stream) {
  SAV_CHECK(n >= 0, "gelu_backward_f32: negative size " << n);
  if (n == 0) return;
  SAV_CHECK(dx && dy && x, "gelu_backward_f32: null pointer");
  gelu_backward_kernel<<<grid_stride_blocks(n, kThreads), kThreads, 0, stream>>>(dx, dy, x, n);
  SAV_CUDA_CHECK_LAUNCH();
}

void add_f32(float* y, const float* a, const float* b, int64_t n, cudaStream_t stream) {
  SAV_CHECK(n >= 0, "add_f32: negative size " << n);
  if (n == 0) return;
  SAV_CHECK(y && a && b, "add_f32: null pointer");
  add_kernel<<<grid_stride_blocks(n, kThreads), kThreads, 0, stream>>>(y, a, b, n);
  SAV_CUDA_CHECK_LAUNCH();
}

// ---- column sums ----

size_t colsum_workspace_floats(int M, int F) {
  if (M <= 0 || F <= 0) return 0;
  return size_t(col_chunks(M)) * size_t(F);
}

void colsum_f32(float* db, const float* dy, int lddy, int M, int F, float* ws, cudaStream_t stream) {
  SAV_CHECK(M >= 0 && F >= 1 && lddy >= F, "colsum_f32: bad sizes M=" << M << " F=" << F << " lddy=" << lddy);
  if (M == 0) return;
  SAV_CHECK(db && dy, "colsum_f32: null pointer");
  SAV_CHECK(ws, "colsum_f32: null work space (colsum_workspace_floats floats)");
  SAV_CHECK((F + 31) / 32 <= 65535, "colsum_f32: F=" << F << " too large");
  const int nchunks = col_chunks(M);
  const dim3 grid(nchunks, (F + 31) / 32), block(32, kColThreadsY);
  col_partial_kernel<false><<<grid, block, 0, stream>>>(ws, dy, lddy, nullptr, 0, nullptr, nullptr, M, F);
  SAV_CUDA_CHECK_LAUNCH();
  col_finalize_kernel<<<(F + kThreads - 1) / kThreads, kThreads, 0, stream>>>(db, ws, nchunks, F);
  SAV_CUDA_CHECK_LAUNCH();
}

// ---- softmax rows ----

void softmax_rows_f32(float* p, int64_t rows, int n, cudaStream_t stream) {
  SAV_CHECK(rows >= 0 && n >= 1, "softmax_rows_f32: bad sizes rows=" << rows << " n=" << n);
  if (rows == 0) return;
  SAV_CHECK(p, "softmax_rows_f32: null pointer");
  softmax_rows_kernel<<<row_blocks(rows), kRowWarps * 32, 0, stream>>>(p, rows, n);
  SAV_CUDA_CHECK_LAUNCH();
}

void softmax_backward_rows_f32(float* ds, const float* p, int64_t rows, int n, cudaStream_t stream) {
  SAV_CHECK(rows >= 0 && n >= 1, "softmax_backward_rows_f32: bad sizes rows=" << rows << " n=" << n);
  if (rows == 0) return;
  SAV_CHECK(ds && p, "softmax_backward_rows_f32: null pointer");
  softmax_backward_rows_kernel<<<row_blocks(rows), kRowWarps * 32, 0, stream>>>(ds, p, rows, n);
  SAV_CUDA_CHECK_LAUNCH();
}

// ---- attention ----

bool attention_train_supports(int N, int C, int H) {
  return C >= 1 && H >= 1 && C % H == 0 && C / H <= kAtMaxD && 3 * int64_t(C) <= INT_MAX && N >= 1 && N <= kAtMaxN;
}

// The per-head pointer arrays of the batched products are built on the host (head_ptrs) for each call.
void attention_heads_forward(float* out, int ldo, int64_t bo, float* att, HeadTensor q, HeadTensor k, HeadTensor v,
                             int B, int N, int Nk, int H, int d, Blas& blas, cudaStream_t stream) {
  const int count = B * H;
  const int64_t NNk = int64_t(N) * Nk;
  const float scale = float(1.0 / std::sqrt(double(d)));
  const auto qh = head_ptrs(q.ptr, B, H, q.bstride, d), kh = head_ptrs(k.ptr, B, H, k.bstride, d),
             vh = head_ptrs(v.ptr, B, H, v.bstride, d);
  const auto p = head_ptrs(att, B, H, H * NNk, NNk);
  const auto o = head_ptrs(out, B, H, bo, d);
  // att = scale Q K^T, then the softmax by rows
  blas.batched(false, true, N, Nk, d, scale, qh.data(), q.ld, kh.data(), k.ld, 0.0f, p.data(), Nk, count);
  softmax_rows_f32(att, int64_t(count) * N, Nk, stream);
  // out = P V
  blas.batched(false, false, N, d, Nk, 1.0f, p.data(), Nk, vh.data(), v.ld, 0.0f, o.data(), ldo, count);
}

void attention_heads_backward(float* dq, float* dk, float* dv, float* ds, HeadTensor dout, HeadTensor q, HeadTensor k,
                              HeadTensor v, const float* att, int B, int N, int Nk, int H, int d, Blas& blas,
                              cudaStream_t stream) {
  const int count = B * H;
  const int64_t NNk = int64_t(N) * Nk;
  const float scale = float(1.0 / std::sqrt(double(d)));
  const auto qh = head_ptrs(q.ptr, B, H, q.bstride, d), kh = head_ptrs(k.ptr, B, H, k.bstride, d),
             vh = head_ptrs(v.ptr, B, H, v.bstride, d);
  const auto dqh = head_ptrs(dq, B, H, q.bstride, d), dkh = head_ptrs(dk, B, H, k.bstride, d),
             dvh = head_ptrs(dv, B, H, v.bstride, d);
  const auto p = head_ptrs(att, B, H, H * NNk, NNk);
  const auto s = head_ptrs(ds, B, H, H * NNk, NNk);
  const auto gout = head_ptrs(dout.ptr, B, H, dout.bstride, d);
  // ds = dP = dO V^T, then ds = P (dP - rowsum(dP P)) by rows
  blas.batched(false, true, N, Nk, d, 1.0f, gout.data(), dout.ld, vh.data(), v.ld, 0.0f, s.data(), Nk, count);
  softmax_backward_rows_f32(ds, att, int64_t(count) * N, Nk, stream);
  // dq = scale dS K
  blas.batched(false, false, N, d, Nk, scale, s.data(), Nk, kh.data(), k.ld, 0.0f, dqh.data(), q.ld, count);
  // dk = scale dS^T Q
  blas.batched(true, false, Nk, d, N, scale, s.data(), Nk, qh.data(), q.ld, 0.0f, dkh.data(), k.ld, count);
  // dv = P^T dO
  blas.batched(true, false, Nk, d, N, 1.0f, p.data(), Nk, gout.data(), dout.ld, 0.0f, dvh.data(), v.ld, count);
}

void attention_train_forward(float* out, float* att, const float* qkv, int B, int N, int C, int H, Blas& blas,
                             cudaStream_t stream) {
  const int d = attention_check(B, N, C, H, blas, stream, "attention_train_forward");
  if (B == 0) return;
  SAV_CHECK(out && att && qkv, "attention_train_forward: null pointer");
  const int64_t b3 = int64_t(N) * 3 * C;
  attention_heads_forward(out, C, int64_t(N) * C, att, {qkv, 3 * C, b3}, {qkv + C, 3 * C, b3}, {qkv + 2 * C, 3 * C, b3},
                          B, N, N, H, d, blas, stream);
}

void attention_train_backward(float* dqkv, float* ds, const float* dout, const float* qkv, const float* att, int B,
                              int N, int C, int H, Blas& blas, cudaStream_t stream) {
  const int d = attention_check(B, N, C, H, blas, stream, "attention_train_backward");
  if (B == 0) return;
  SAV_CHECK(dqkv && ds && dout && qkv && att, "attention_train_backward: null pointer");
  const int64_t b3 = int64_t(N) * 3 * C;
  attention_heads_backward(dqkv, dqkv + C, dqkv + 2 * C, ds, {dout, C, int64_t(N) * C}, {qkv, 3 * C, b3},
                           {qkv + C, 3 * C, b3}, {qkv + 2 * C, 3 * C, b3}, att, B, N, N, H, d, blas, stream);
}

// ---- optimizer ----

size_t sumsq_workspace_doubles(int64_t n) {
  if (n <= 0) return 0;
  return size_t(2) * size_t((n + kSqChunk - 1) / kSqChunk);
}

// n = 0: out = {0, 0} by a memset on the stream (no kernel).
void sumsq_f64(double* out, const float* g, int64_t n, double* ws, cudaStream_t stream) {
  SAV_CHECK(n >= 0, "sumsq_f64: negative size " << n);
  SAV_CHECK(out, "sumsq_f64: null out");
  if (n == 0) {
    SAV_CUDA_CHECK(cudaMemsetAsync(out, 0, 2 * sizeof(double), stream));
    return;
  }
  SAV_CHECK(g, "sumsq_f64: null g");
  SAV_CHECK(ws, "sumsq_f64: null work space (sumsq_workspace_doubles doubles)");
  const int64_t nchunks = (n + kSqChunk - 1) / kSqChunk;
  SAV_CHECK(nchunks <= INT_MAX, "sumsq_f64: n=" << n << " too large");
  sumsq_partial_kernel<<<unsigned(nchunks), kThreads, 0, stream>>>(ws, g, n);
  SAV_CUDA_CHECK_LAUNCH();
  sumsq_final_kernel<<<1, 1, 0, stream>>>(out, ws, nchunks);
  SAV_CUDA_CHECK_LAUNCH();
}

void adamw_step_f32(float* p, const float* g, float* m, float* v, const uint8_t* decay_mask, int64_t n, float gscale,
                    float lr, float wd, float b1, float b2, float bc1, float bc2, float eps, cudaStream_t stream) {
  SAV_CHECK(n >= 0, "adamw_step_f32: negative size " << n);
  if (n == 0) return;
  SAV_CHECK(p && g && m && v && decay_mask, "adamw_step_f32: null pointer");
  adamw_kernel<<<grid_stride_blocks(n, kThreads), kThreads, 0, stream>>>(p, g, m, v, decay_mask, n, gscale, lr, wd, b1,
                                                                         b2, bc1, bc2, eps);
  SAV_CUDA_CHECK_LAUNCH();
}

}  // namespace sav::cuda
