// shiftaddvit: 2-D convolution and depthwise 2-D convolution on channels-last tensors (the PVTv2 ops of
// ops/cpu/conv.h). attention_q_kv_* of the same header live in attention.cpp, where they share the
// fused-qkv attention kernels.
//
// conv2d (groups = 1): x (B,H,W,Cin), w (Cout,Cin,k,k), y (B,Ho,Wo,Cout); M = B*Ho*Wo output pixels,
//   K = Cin*k*k. im2col fills cols (M, K): row m = (b*Ho + oy)*Wo + ox, column (ci*k + ky)*k + kx holds
//   x[b, oy*s - pad + ky, ox*s - pad + kx, ci] (0 in the padding). w viewed as (Cout, K) is then the
//   PyTorch weight flattened and  y = cols w^T + b  is a linear layer; backward is the linear backward on
//   cols (dw += dy^T cols, db += column sums of dy) plus, for dx, dcols = dy w and col2im.
//   Fast path: im2col with OpenMP over output rows (b, oy) (each fills its own rows of cols); the products
//   go through linear_forward / linear_backward (AVX2 register tiles, or sgemm); dcols lands in scratch
//   and col2im runs as a gather over input rows (b, iy), OpenMP over those rows: every row of dx is
//   written by one thread, which adds its contributions in the fixed order (ky, ox, kx), so dx does not
//   depend on the number of threads.
//
// dwconv2d (depthwise, stride 1, padding p = k/2): x, y (B,H,W,C), w (C,1,k,k).
//   y[b,y,x,c] = bias[c] + sum_{ky,kx} w[c,ky,kx] x[b, y+ky-p, x+kx-p, c].
//   Fast path: the weight is transposed once to tap-major wt (k*k, C), so each tap is a contiguous vector
//   over channels and the inner loops run over C (contiguous in channels-last), in blocks of
//   kChannelBlock channels whose sums stay in registers; OpenMP over rows (b, y).
//   dx is the same correlation of dy with the kernel flipped (tap t -> k*k-1-t; p = (k-1)/2 makes the
//   offsets line up), accumulated into dx. dw and db are sums over all pixels: OpenMP over fixed blocks
//   of kChannelBlock channels, each block summed over the pixels in order by one thread (row partial sums
//   in float, totals in double), so there is no cross-thread reduction and no dependence on the thread
//   count.
#include <algorithm>
#include <vector>

#include "ops/cpu/conv.h"
#include "ops/cpu/ops.h"
#include "ops/cpu/simd_math.h"

namespace sav::cpu {

namespace {

// ---- conv2d geometry ----

struct ConvGeom {
  int B, H, W, Cin, k, s, pad;
  int Ho, Wo, K;  // output side, columns of cols = Cin*k*k
  int64_t M;      // rows of cols = B*Ho*Wo
};

ConvGeom conv_geom(int B, int H, int W, int Cin, int k, int s, int pad) {
  SAV_CHECK_DIM(B);
  SAV_CHECK_DIM(H);
  SAV_CHECK_DIM(W);
  SAV_CHECK_DIM(Cin);
  SAV_CHECK_DIM(k);
  SAV_CHECK_DIM(s);
  SAV_CHECK(pad >= 0, "conv2d: padding must be non-negative, got " << pad);
  SAV_CHECK(H + 2 * pad >= k && W + 2 * pad >= k,
            "conv2d: kernel k=" << k << " is larger than the padded input " << H << "x" << W << " + 2*" << pad);
  ConvGeom g{B, H, W, Cin, k, s, pad, conv_out_size(H, k, s, pad), conv_out_size(W, k, s, pad), Cin * k * k, 0};
  g.M = static_cast<int64_t>(B) * g.Ho * g.Wo;
  return g;
}

ConvGeom check_conv2d(int B, int H, int W, int Cin, int Cout, int k, int s, int pad) {
  SAV_CHECK_DIM(Cout);
  return conv_geom(B, H, W, Cin, k, s, pad);
}

// im2col of the Wo output pixels of row oy of image b: their rows of cols.
void im2col_row(float* cols, const float* x, int b, int oy, const ConvGeom& g) {
  const int kk = g.k * g.k;
  for (int ox = 0; ox < g.Wo; ++ox) {
    float* dst = cols + ((static_cast<int64_t>(b) * g.Ho + oy) * g.Wo + ox) * g.K;
    for (int ky = 0; ky < g.k; ++ky) {
      const int iy = oy * g.s - g.pad + ky;
      for (int kx = 0; kx < g.k; ++kx) {
        const int ix = ox * g.s - g.pad + kx;
        float* d = dst + ky * g.k + kx;  // + ci*kk
        if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) {
          for (int ci = 0; ci < g.Cin; ++ci) d[ci * kk] = 0.0f;
        } else {
          const float* src = x + ((static_cast<int64_t>(b) * g.H + iy) * g.W + ix) * g.Cin;
          for (int ci = 0; ci < g.Cin; ++ci) d[ci * kk] = src[ci];
        }
      }
    }
  }
}

// col2im of input row iy of image b: dx[b, iy, :, :] += every entry of dcols that im2col read from that
// row, added in the order (ky, ox, kx).
void col2im_row(float* dx, const float* dcols, int b, int iy, const ConvGeom& g) {
  const int kk = g.k * g.k;
  float* drow = dx + (static_cast<int64_t>(b) * g.H + iy) * g.W * g.Cin;
  for (int ky = 0; ky < g.k; ++ky) {
    const int t = iy + g.pad - ky;  // = oy * s for the output row that reads input row iy through tap ky
    if (t < 0 || t % g.s != 0 || t / g.s >= g.Ho) continue;
    const int oy = t / g.s;
    for (int ox = 0; ox < g.Wo; ++ox) {
      const float* src = dcols + ((static_cast<int64_t>(b) * g.Ho + oy) * g.Wo + ox) * g.K + ky * g.k;
      for (int kx = 0; kx < g.k; ++kx) {
        const int ix = ox * g.s - g.pad + kx;
        if (ix < 0 || ix >= g.W) continue;
        float* d = drow + static_cast<int64_t>(ix) * g.Cin;
        for (int ci = 0; ci < g.Cin; ++ci) d[ci] += src[ci * kk + kx];
      }
    }
  }
}

// ---- dwconv2d helpers ----

void check_dwconv2d(int B, int H, int W, int C, int k) {
  SAV_CHECK_DIM(B);
  SAV_CHECK_DIM(H);
  SAV_CHECK_DIM(W);
  SAV_CHECK_DIM(C);
  SAV_CHECK_DIM(k);
  SAV_CHECK(k % 2 == 1, "dwconv2d: kernel size k must be odd (padding k/2 keeps the size), got " << k);
}

// wt (k*k, C) from w (C, k*k): wt[t*C + c] = w[c*kk + t], or with flip the tap k*k-1-t (the kernel
// rotated by 180 degrees, for dx).
void transpose_taps(float* wt, const float* w, int C, int kk, bool flip) {
  for (int t = 0; t < kk; ++t)
    for (int c = 0; c < C; ++c)
      wt[static_cast<int64_t>(t) * C + c] = w[static_cast<int64_t>(c) * kk + (flip ? kk - 1 - t : t)];
}

// Channels per register block of the depthwise kernels: 32 floats stay in 4 AVX2 (2 AVX-512) registers
// while the taps (forward, dx) or the pixels (dw, db) are summed. PVTv2's hidden widths are multiples.
constexpr int kChannelBlock = 32;

// The channel loops of one block. FULL: n == kChannelBlock, a constant trip count, so the loops unroll
// completely and the caller's accumulator array lives in registers; otherwise n < kChannelBlock.
template <bool FULL>
__attribute__((always_inline)) inline void fma_block(float* acc, const float* a, const float* b, int n) {
  const int nn = FULL ? kChannelBlock : n;
#pragma omp simd
  for (int c = 0; c < nn; ++c) acc[c] += a[c] * b[c];
}

// Pixel x of row y, channels [c0, c0 + n): o = (o if accumulate, else bias or 0) + sum over the taps
// inside the image of wt[ky*k + kx] * in[y+ky-p, x+kx-p].
template <bool FULL>
__attribute__((always_inline)) inline void dw_pixel_block(float* o, const float* in, const float* wt, const float* bias,
                                                          int y, int x, int H, int W, int C, int k, int c0, int n,
                                                          bool accumulate) {
  const int nn = FULL ? kChannelBlock : n, p = k / 2;
  float acc[kChannelBlock];
  if (accumulate || bias) {
    const float* init = accumulate ? o + c0 : bias + c0;
    for (int c = 0; c < nn; ++c) acc[c] = init[c];
  } else {
    for (int c = 0; c < nn; ++c) acc[c] = 0.0f;
  }
  const int kx0 = std::max(0, p - x), kx1 = std::min(k, W + p - x);
  for (int ky = 0; ky < k; ++ky) {
    const int iy = y + ky - p;
    if (iy < 0 || iy >= H) continue;
    for (int kx = kx0; kx < kx1; ++kx)
      fma_block<FULL>(acc, wt + static_cast<int64_t>(ky * k + kx) * C + c0,
                      in + (static_cast<int64_t>(iy) * W + x + kx - p) * C + c0, n);
  }
  for (int c = 0; c < nn; ++c) o[c0 + c] = acc[c];
}

// Row y of one image (H, W, C) of out: out[y, x, :] = (bias or 0; or out itself when accumulate) + sum
// over taps of wt[ky*k + kx, :] * in[y+ky-p, x+kx-p, :], taps in the padding skipped. Each pixel runs
// its channels in register blocks.
SAV_SIMD_CLONES void dw_row(float* out, const float* in, const float* wt, const float* bias, int y, int H, int W, int C,
                            int k, bool accumulate) {
  const int full = C / kChannelBlock * kChannelBlock;
  for (int x = 0; x < W; ++x) {
    float* o = out + (static_cast<int64_t>(y) * W + x) * C;
    for (int c0 = 0; c0 < full; c0 += kChannelBlock)
      dw_pixel_block<true>(o, in, wt, bias, y, x, H, W, C, k, c0, kChannelBlock, accumulate);
    if (full < C) dw_pixel_block<false>(o, in, wt, bias, y, x, H, W, C, k, full, C - full, accumulate);
  }
}

// dw_db_block for n channels (FULL: n == kChannelBlock). tacc ((k*k + 1) * kChannelBlock doubles): the
// totals, tap t at t*kChannelBlock, db last.
template <bool FULL>
__attribute__((always_inline)) inline void dw_db_sums(double* tacc, bool want_dw, bool want_db, const float* dy,
                                                      const float* x, int B, int H, int W, int C, int k, int c0,
                                                      int n) {
  const int nn = FULL ? kChannelBlock : n, p = k / 2, kk = k * k;
  constexpr int nb = kChannelBlock;
  for (int b = 0; b < B; ++b)
    for (int y = 0; y < H; ++y) {
      // Each sum over the W pixels of this row in float (registers), then added to its total in double.
      const float* dyrow = dy + (static_cast<int64_t>(b) * H + y) * W * C + c0;
      if (want_db) {
        float acc[nb] = {};
        for (int xx = 0; xx < W; ++xx) {
          const float* g = dyrow + static_cast<int64_t>(xx) * C;
#pragma omp simd
          for (int c = 0; c < nn; ++c) acc[c] += g[c];
        }
        for (int c = 0; c < nn; ++c) tacc[kk * nb + c] += acc[c];
      }
      if (!want_dw) continue;
      for (int ky = 0; ky < k; ++ky) {
        const int iy = y + ky - p;
        if (iy < 0 || iy >= H) continue;
        for (int kx = 0; kx < k; ++kx) {
          // dw[c, ky, kx] += sum_x dy[b, y, x, c] * x[b, iy, x + kx - p, c] over the x that stay inside.
          const int x0 = std::max(0, p - kx), x1 = std::min(W, W + p - kx);
          if (x0 >= x1) continue;
          const float* g = dyrow + static_cast<int64_t>(x0) * C;
          const float* src = x + ((static_cast<int64_t>(b) * H + iy) * W + x0 + kx - p) * C + c0;
          float acc[nb] = {};
          for (int xx = x0; xx < x1; ++xx, g += C, src += C) fma_block<FULL>(acc, g, src, n);
          double* t = tacc + (ky * k + kx) * nb;
          for (int c = 0; c < nn; ++c) t[c] += acc[c];
        }
      }
    }
}

// Channels [c0, c0 + n) of dw (C, k*k) and db (C) (either may be nullptr): += the sums over all pixels,
// taken in a fixed order. tacc: (k*k + 1)*kChannelBlock doubles of work space.
SAV_SIMD_CLONES void dw_db_block(float* dw, float* db, const float* dy, const float* x, int B, int H, int W, int C,
                                 int k, int c0, int n, double* tacc) {
  const int kk = k * k;
  constexpr int nb = kChannelBlock;
  std::fill(tacc, tacc + (kk + 1) * nb, 0.0);
  if (n == nb)
    dw_db_sums<true>(tacc, dw != nullptr, db != nullptr, dy, x, B, H, W, C, k, c0, n);
  else
    dw_db_sums<false>(tacc, dw != nullptr, db != nullptr, dy, x, B, H, W, C, k, c0, n);
  if (dw)
    for (int c = 0; c < n; ++c)
      for (int t = 0; t < kk; ++t) dw[static_cast<int64_t>(c0 + c) * kk + t] += static_cast<float>(tacc[t * nb + c]);
  if (db)
    for (int c = 0; c < n; ++c) db[c0 + c] += static_cast<float>(tacc[kk * nb + c]);
}

}  // namespace

// =====================================================================================================
// conv2d

size_t conv2d_cols_floats(int B, int H, int W, int Cin, int k, int s, int pad) {
  const ConvGeom g = conv_geom(B, H, W, Cin, k, s, pad);
  return static_cast<size_t>(g.M) * static_cast<size_t>(g.K);
}

// ---- reference ----

void conv2d_forward_ref(float* y, float* cols, const float* x, const float* w, const float* b, int B, int H, int W,
                        int Cin, int Cout, int k, int s, int pad) {
  const ConvGeom g = check_conv2d(B, H, W, Cin, Cout, k, s, pad);
  for (int bi = 0; bi < B; ++bi)
    for (int oy = 0; oy < g.Ho; ++oy)
      for (int ox = 0; ox < g.Wo; ++ox) {
        const int64_t row = (static_cast<int64_t>(bi) * g.Ho + oy) * g.Wo + ox;
        for (int ci = 0; ci < Cin; ++ci)
          for (int ky = 0; ky < k; ++ky)
            for (int kx = 0; kx < k; ++kx) {
              const int iy = oy * s - pad + ky, ix = ox * s - pad + kx;
              const bool inside = iy >= 0 && iy < H && ix >= 0 && ix < W;
              cols[row * g.K + (ci * k + ky) * k + kx] =
                  inside ? x[((static_cast<int64_t>(bi) * H + iy) * W + ix) * Cin + ci] : 0.0f;
            }
      }
  linear_forward_ref(y, cols, w, b, static_cast<int>(g.M), g.K, Cout);
}

void conv2d_backward_ref(float* dx, float* dw, float* db, float* scratch, const float* dy, const float* cols,
                         const float* w, int B, int H, int W, int Cin, int Cout, int k, int s, int pad) {
  const ConvGeom g = check_conv2d(B, H, W, Cin, Cout, k, s, pad);
  linear_backward_ref(nullptr, dw, db, dy, cols, w, static_cast<int>(g.M), g.K, Cout);
  if (!dx) return;
  // dx[b, iy, ix, ci] += sum over output pixels and taps that read it of dy . w.
  for (int bi = 0; bi < B; ++bi)
    for (int oy = 0; oy < g.Ho; ++oy)
      for (int ox = 0; ox < g.Wo; ++ox) {
        const int64_t row = (static_cast<int64_t>(bi) * g.Ho + oy) * g.Wo + ox;
        for (int ci = 0; ci < Cin; ++ci)
          for (int ky = 0; ky < k; ++ky)
            for (int kx = 0; kx < k; ++kx) {
              const int iy = oy * s - pad + ky, ix = ox * s - pad + kx;
              if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
              const int kcol = (ci * k + ky) * k + kx;
              double acc = 0.0;
              for (int co = 0; co < Cout; ++co)
                acc += static_cast<double>(dy[row * Cout + co]) * w[static_cast<int64_t>(co) * g.K + kcol];
              dx[((static_cast<int64_t>(bi) * H + iy) * W + ix) * Cin + ci] += static_cast<float>(acc);
            }
      }
}

// ---- fast path ----

void conv2d_forward(float* y, float* cols, const float* x, const float* w, const float* b, int B, int H, int W, int Cin,
                    int Cout, int k, int s, int pad) {
  const ConvGeom g = check_conv2d(B, H, W, Cin, Cout, k, s, pad);
  SAV_CHECK_PTR(y);
  SAV_CHECK_PTR(cols);
  SAV_CHECK_PTR(x);
  SAV_CHECK_PTR(w);
  const int rows = B * g.Ho;
#pragma omp parallel for schedule(static) if (g.M * g.K >= detail::kParallelElems)
  for (int r = 0; r < rows; ++r) im2col_row(cols, x, r / g.Ho, r % g.Ho, g);
  linear_forward(y, cols, w, b, static_cast<int>(g.M), g.K, Cout);
}

void conv2d_backward(float* dx, float* dw, float* db, float* scratch, const float* dy, const float* cols,
                     const float* w, int B, int H, int W, int Cin, int Cout, int k, int s, int pad) {
  const ConvGeom g = check_conv2d(B, H, W, Cin, Cout, k, s, pad);
  SAV_CHECK_PTR(dy);
  const int M = static_cast<int>(g.M);
  if (dw || db) linear_backward(nullptr, dw, db, dy, cols, w, M, g.K, Cout);  // checks cols when dw is wanted
  if (!dx) return;
  SAV_CHECK(scratch != nullptr, "conv2d_backward: scratch (conv2d_cols_floats() floats) must not be null");
  SAV_CHECK_PTR(w);
  const bool parallel = g.M * g.K >= detail::kParallelElems;
  // dcols = dy w: linear_backward accumulates, so scratch starts from zero.
  const int64_t n = g.M * g.K, chunk = 1 << 16;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < n; i += chunk) std::fill(scratch + i, scratch + std::min(n, i + chunk), 0.0f);
  linear_backward(scratch, nullptr, nullptr, dy, cols, w, M, g.K, Cout);
  const int rows = B * H;
#pragma omp parallel for schedule(static) if (parallel)
  for (int r = 0; r < rows; ++r) col2im_row(dx, scratch, r / H, r % H, g);
}

// =====================================================================================================
// dwconv2d

// ---- reference ----

void dwconv2d_forward_ref(float* y, const float* x, const float* w, const float* b, int B, int H, int W, int C, int k) {
  check_dwconv2d(B, H, W, C, k);
  const int p = k / 2;
  for (int bi = 0; bi < B; ++bi)
    for (int oy = 0; oy < H; ++oy)
      for (int ox = 0; ox < W; ++ox)
        for (int c = 0; c < C; ++c) {
          double acc = b ? b[c] : 0.0;
          for (int ky = 0; ky < k; ++ky)
            for (int kx = 0; kx < k; ++kx) {
              const int iy = oy + ky - p, ix = ox + kx - p;
              if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
              acc += static_cast<double>(w[(static_cast<int64_t>(c) * k + ky) * k + kx]) *
                     x[((static_cast<int64_t>(bi) * H + iy) * W + ix) * C + c];
            }
          y[((static_cast<int64_t>(bi) * H + oy) * W + ox) * C + c] = static_cast<float>(acc);
        }
}

void dwconv2d_backward_ref(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w, int B,
                           int H, int W, int C, int k) {
  check_dwconv2d(B, H, W, C, k);
  const int p = k / 2;
  auto at = [&](int bi, int yy, int xx, int c) { return ((static_cast<int64_t>(bi) * H + yy) * W + xx) * C + c; };
  if (dx) {
    // dx[b, iy, ix, c] = sum over the output pixels (oy, ox) = (iy - ky + p, ix - kx + p) that read it.
    for (int bi = 0; bi < B; ++bi)
      for (int iy = 0; iy < H; ++iy)
        for (int ix = 0; ix < W; ++ix)
          for (int c = 0; c < C; ++c) {
            double acc = 0.0;
            for (int ky = 0; ky < k; ++ky)
              for (int kx = 0; kx < k; ++kx) {
                const int oy = iy - ky + p, ox = ix - kx + p;
                if (oy < 0 || oy >= H || ox < 0 || ox >= W) continue;
                acc += static_cast<double>(w[(static_cast<int64_t>(c) * k + ky) * k + kx]) * dy[at(bi, oy, ox, c)];
              }
            dx[at(bi, iy, ix, c)] += static_cast<float>(acc);
          }
  }
  if (dw) {
    for (int c = 0; c < C; ++c)
      for (int ky = 0; ky < k; ++ky)
        for (int kx = 0; kx < k; ++kx) {
          double acc = 0.0;
          for (int bi = 0; bi < B; ++bi)
            for (int oy = 0; oy < H; ++oy)
              for (int ox = 0; ox < W; ++ox) {
                const int iy = oy + ky - p, ix = ox + kx - p;
                if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                acc += static_cast<double>(dy[at(bi, oy, ox, c)]) * x[at(bi, iy, ix, c)];
              }
          dw[(static_cast<int64_t>(c) * k + ky) * k + kx] += static_cast<float>(acc);
        }
  }
  if (db) {
    for (int c = 0; c < C; ++c) {
      double acc = 0.0;
      for (int bi = 0; bi < B; ++bi)
        for (int oy = 0; oy < H; ++oy)
          for (int ox = 0; ox < W; ++ox) acc += dy[at(bi, oy, ox, c)];
      db[c] += static_cast<float>(acc);
    }
  }
}

// ---- fast path ----

void dwconv2d_forward(float* y, const float* x, const float* w, const float* b, int B, int H, int W, int C, int k) {
  check_dwconv2d(B, H, W, C, k);
  SAV_CHECK_PTR(y);
  SAV_CHECK_PTR(x);
  SAV_CHECK_PTR(w);
  const int kk = k * k;
  std::vector<float> wt(static_cast<size_t>(kk) * C);
  transpose_taps(wt.data(), w, C, kk, false);
  const int64_t image = static_cast<int64_t>(H) * W * C;
  const int rows = B * H;
#pragma omp parallel for schedule(static) if (B * image * kk >= detail::kParallelElems)
  for (int r = 0; r < rows; ++r) {
    const int bi = r / H;
    dw_row(y + bi * image, x + bi * image, wt.data(), b, r % H, H, W, C, k, false);
  }
}

void dwconv2d_backward(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w, int B, int H,
                       int W, int C, int k) {
  check_dwconv2d(B, H, W, C, k);
  if (!dx && !dw && !db) return;
  SAV_CHECK_PTR(dy);
  const int kk = k * k;
  const int64_t image = static_cast<int64_t>(H) * W * C;
  const bool parallel = B * image * kk >= detail::kParallelElems;
  if (dx) {
    SAV_CHECK_PTR(w);
    std::vector<float> wf(static_cast<size_t>(kk) * C);
    transpose_taps(wf.data(), w, C, kk, true);
    const int rows = B * H;
#pragma omp parallel for schedule(static) if (parallel)
    for (int r = 0; r < rows; ++r) {
      const int bi = r / H;
      dw_row(dx + bi * image, dy + bi * image, wf.data(), nullptr, r % H, H, W, C, k, true);
    }
  }
  if (dw || db) {
    if (dw) SAV_CHECK_PTR(x);
    const int blocks = (C + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel if (parallel && blocks > 1)
    {
      std::vector<double> tacc(static_cast<size_t>(kk + 1) * kChannelBlock);
#pragma omp for schedule(static)
      for (int blk = 0; blk < blocks; ++blk) {
        const int c0 = blk * kChannelBlock;
        dw_db_block(dw, db, dy, x, B, H, W, C, k, c0, std::min(kChannelBlock, C - c0), tacc.data());
      }
    }
  }
}

}  // namespace sav::cpu
