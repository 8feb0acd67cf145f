// shiftaddvit: patch embedding (timm PatchEmbed: Conv2d(Cin, C, kernel=p, stride=p), flatten(2).transpose(1,2)).
//
// Shapes: img (B,Cin,S,S)  w (C,Cin,p,p)  b (C)  out (B,P,C)  cols (B*P, K) with K = Cin*p*p.
// G = S / p patches per side (integer division: like the convolution, pixels past G*p are unused),
// P = G*G, patch index = py*G + px (rows first). im2col column order is (cin, ky, kx), so w viewed as
// (C, K) is exactly the PyTorch conv weight flattened, and out = cols w^T + b is a linear layer.
// Backward: dw, db by the linear backward on cols; dimg (optional) = col2im(dout w).
#include <algorithm>
#include <vector>

#include "ops/cpu/ops.h"
#include "ops/cpu/simd_math.h"

namespace sav::cpu {

namespace {

struct PatchGeom {
  int G, P, K;
};

PatchGeom check_patch_embed(int B, int Cin, int S, int p, int C) {
  SAV_CHECK_DIM(B);
  SAV_CHECK_DIM(Cin);
  SAV_CHECK_DIM(p);
  SAV_CHECK_DIM(C);
  SAV_CHECK(S >= p, "patch_embed: image side S=" << S << " is smaller than the patch side p=" << p);
  const int G = S / p;
  return {G, G * G, Cin * p * p};
}

// One (b, cin) image plane into its columns of cols. Planes touch disjoint columns.
void im2col_plane(float* cols, const float* plane, int b, int cin, int S, int p, const PatchGeom& g) {
  for (int py = 0; py < g.G; ++py)
    for (int px = 0; px < g.G; ++px) {
      float* dst = cols + (static_cast<int64_t>(b) * g.P + py * g.G + px) * g.K + cin * p * p;
      for (int ky = 0; ky < p; ++ky) {
        const float* src = plane + static_cast<int64_t>(py * p + ky) * S + px * p;
        std::copy(src, src + p, dst + ky * p);
      }
    }
}

// Adds the columns of one (b, cin) plane back into the image gradient.
void col2im_plane(float* plane, const float* dcols, int b, int cin, int S, int p, const PatchGeom& g) {
  for (int py = 0; py < g.G; ++py)
    for (int px = 0; px < g.G; ++px) {
      const float* src = dcols + (static_cast<int64_t>(b) * g.P + py * g.G + px) * g.K + cin * p * p;
      for (int ky = 0; ky < p; ++ky) {
        float* dst = plane + static_cast<int64_t>(py * p + ky) * S + px * p;
        for (int kx = 0; kx < p; ++kx) dst[kx] += src[ky * p + kx];
      }
    }
}

}  // namespace

// ---- reference ----

void patch_embed_forward_ref(float* out, float* cols, const float* img, const float* w, const float* b, int B, int Cin,
                             int S, int p, int C) {
  const PatchGeom g = check_patch_embed(B, Cin, S, p, C);
  for (int bi = 0; bi < B; ++bi)
    for (int py = 0; py < g.G; ++py)
      for (int px = 0; px < g.G; ++px) {
        const int64_t row = static_cast<int64_t>(bi) * g.P + py * g.G + px;
        for (int ci = 0; ci < Cin; ++ci)
          for (int ky = 0; ky < p; ++ky)
            for (int kx = 0; kx < p; ++kx)
              cols[row * g.K + (ci * p + ky) * p + kx] =
                  img[((static_cast<int64_t>(bi) * Cin + ci) * S + py * p + ky) * S + px * p + kx];
      }
  linear_forward_ref(out, cols, w, b, B * g.P, g.K, C);
}

void patch_embed_backward_ref(float* dimg, float* dw, float* db, const float* dout, const float* cols, const float* w,
                              int B, int Cin, int S, int p, int C) {
  const PatchGeom g = check_patch_embed(B, Cin, S, p, C);
  linear_backward_ref(nullptr, dw, db, dout, cols, w, B * g.P, g.K, C);
  if (!dimg) return;
  for (int bi = 0; bi < B; ++bi)
    for (int py = 0; py < g.G; ++py)
      for (int px = 0; px < g.G; ++px) {
        const int64_t row = static_cast<int64_t>(bi) * g.P + py * g.G + px;
        for (int ci = 0; ci < Cin; ++ci)
          for (int ky = 0; ky < p; ++ky)
            for (int kx = 0; kx < p; ++kx) {
              const int kcol = (ci * p + ky) * p + kx;
              double acc = 0.0;
              for (int c = 0; c < C; ++c)
                acc += static_cast<double>(dout[row * C + c]) * w[static_cast<int64_t>(c) * g.K + kcol];
              dimg[((static_cast<int64_t>(bi) * Cin + ci) * S + py * p + ky) * S + px * p + kx] +=
                  static_cast<float>(acc);
            }
      }
}

// ---- fast path ----

void patch_embed_forward(float* out, float* cols, const float* img, const float* w, const float* b, int B, int Cin,
                         int S, int p, int C) {
  const PatchGeom g = check_patch_embed(B, Cin, S, p, C);
  SAV_CHECK_PTR(out);
  SAV_CHECK_PTR(cols);
  SAV_CHECK_PTR(img);
  const int planes = B * Cin;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(planes) * S * S >= detail::kParallelElems)
  for (int bc = 0; bc < planes; ++bc)
    im2col_plane(cols, img + static_cast<int64_t>(bc) * S * S, bc / Cin, bc % Cin, S, p, g);
  linear_forward(out, cols, w, b, B * g.P, g.K, C);
}

void patch_embed_backward(float* dimg, float* dw, float* db, const float* dout, const float* cols, const float* w,
                          int B, int Cin, int S, int p, int C) {
  const PatchGeom g = check_patch_embed(B, Cin, S, p, C);
  const int M = B * g.P;
  linear_backward(nullptr, dw, db, dout, cols, w, M, g.K, C);
  if (!dimg) return;
  // dcols = dout w (fresh buffer), then scatter-add per image plane (planes are disjoint).
  std::vector<float> dcols(static_cast<size_t>(M) * g.K, 0.0f);
  linear_backward(dcols.data(), nullptr, nullptr, dout, cols, w, M, g.K, C);
  const int planes = B * Cin;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(planes) * S * S >= detail::kParallelElems)
  for (int bc = 0; bc < planes; ++bc)
    col2im_plane(dimg + static_cast<int64_t>(bc) * S * S, dcols.data(), bc / Cin, bc % Cin, S, p, g);
}

}  // namespace sav::cpu
