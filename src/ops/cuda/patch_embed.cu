// Patch embedding, step 1: im2col of the f32 image into bf16 rows (one patch per row), the layout of
// cpu::patch_embed_forward's cols; step 2 is a Gemm (gemm.h) with the conv weight viewed as (C, Cin*p*p).
#include "ops/cuda/ops.h"

namespace sav::cuda {

namespace {

struct Im2colParams {
  bf16* cols;
  const float* img;
  int B, Cin, S, p, G;  // G = S / p patches per side
  int64_t total;        // B * G*G * Cin*p*p
  bool vec;
};

// Vector path (p % 4 == 0, S % 4 == 0, fewer than 2^31 outputs): one thread per segment of p pixels
// (b, ci, py, ky, px), px fastest so that a warp reads contiguous image rows; p/4 float4 loads and p/4
// 8-byte stores of 4 bf16. Scalar path: one thread per output element.
__global__ void im2col_kernel(const Im2colParams a) {
  const int K = a.Cin * a.p * a.p, P = a.G * a.G;
  if (a.vec) {
    const int segs = static_cast<int>(a.total / a.p);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < segs; i += gridDim.x * blockDim.x) {
      int t = i;
      const int px = t % a.G;
      t /= a.G;
      const int ky = t % a.p;
      t /= a.p;
      const int py = t % a.G;
      t /= a.G;
      const int ci = t % a.Cin, b = t / a.Cin;
      const float* src = a.img + ((int64_t(b) * a.Cin + ci) * a.S + py * a.p + ky) * a.S + px * a.p;
      bf16* dst = a.cols + (int64_t(b) * P + py * a.G + px) * K + ci * a.p * a.p + ky * a.p;
      for (int x = 0; x < a.p; x += 4) {
        const float4 v = *reinterpret_cast<const float4*>(src + x);
        __align__(8) __nv_bfloat162 h[2] = {__floats2bfloat162_rn(v.x, v.y), __floats2bfloat162_rn(v.z, v.w)};
        *reinterpret_cast<uint2*>(dst + x) = *reinterpret_cast<const uint2*>(h);
      }
    }
    return;
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a.total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / K;
    const int col = static_cast<int>(i - row * K);
    const int b = static_cast<int>(row / P), pi = static_cast<int>(row - int64_t(b) * P);
    const int py = pi / a.G, px = pi - py * a.G;
    const int ci = col / (a.p * a.p), r = col - ci * a.p * a.p, ky = r / a.p, kx = r - ky * a.p;
    const float v = a.img[((int64_t(b) * a.Cin + ci) * a.S + py * a.p + ky) * a.S + px * a.p + kx];
    a.cols[i] = __float2bfloat16_rn(v);
  }
}

}  // namespace

void im2col_forward(bf16* cols, const float* img, int B, int Cin, int S, int p, cudaStream_t stream) {
  SAV_CHECK(cols && img, "im2col: null pointer");
  SAV_CHECK(B >= 0 && Cin >= 1 && p >= 1 && S >= p && S % p == 0,
            "im2col: bad sizes B=" << B << " Cin=" << Cin << " S=" << S << " p=" << p);
  Im2colParams a{cols, img, B, Cin, S, p, S / p, 0, false};
  a.total = int64_t(B) * a.G * a.G * Cin * p * p;
  a.vec = p % 4 == 0 && S % 4 == 0 && a.total < (int64_t(1) << 31) && reinterpret_cast<uintptr_t>(img) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(cols) % 8 == 0;
  if (a.total == 0) return;
  const int64_t work = a.vec ? a.total / p : a.total;
  const int64_t blocks = std::min<int64_t>((work + 255) / 256, int64_t(sm_count()) * 32);
  im2col_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(a);
  SAV_CUDA_CHECK_LAUNCH();
}

}  // namespace sav::cuda
