// LayerNorm forward (f32 in, bf16 out), and the token assembly of the embedding fused with a LayerNorm.
// One warp per row; the row stays in registers (C <= 1024: 32 values per lane), two-pass mean / variance
// in f32 as cpu::layernorm_forward_ref.
#include "ops/cuda/ops.h"

namespace sav::cuda {

namespace {

constexpr int kLnMaxC = 1024;
constexpr int kLnPerLane = kLnMaxC / 32;
constexpr int kLnWarps = 8;  // rows per block

struct LnParams {
  bf16* y;  // (M,C) rows ldy apart, or nullptr (embed without norm)
  int ldy;
  float* xout;       // embed mode: (M,C) f32 written, rows contiguous
  const float* x;    // plain mode: (M,C) f32 rows ldx apart
  int ldx;
  const float* pe;   // embed mode when non-null: (B,N-1,C)
  const float* cls;  // (C)
  const float* pos;  // (N,C)
  int N;
  const float* w;
  const float* b;
  int M, C;
  float eps;
};

__global__ void layernorm_kernel(const LnParams p) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kLnWarps + (threadIdx.x >> 5);
  if (row >= p.M) return;
  const int C = p.C;
  float v[kLnPerLane];
  if (p.pe) {
    const int n = row % p.N, b = row / p.N;
    const float* src = n == 0 ? p.cls : p.pe + (int64_t(b) * (p.N - 1) + (n - 1)) * C;
    const float* pos = p.pos + int64_t(n) * C;
    float* xo = p.xout + int64_t(row) * C;
#pragma unroll
    for (int k = 0; k < kLnPerLane; ++k) {
      const int c = lane + 32 * k;
      v[k] = 0.0f;
      if (c < C) {
        v[k] = src[c] + pos[c];
        xo[c] = v[k];
      }
    }
  } else {
    const float* xr = p.x + int64_t(row) * p.ldx;
#pragma unroll
    for (int k = 0; k < kLnPerLane; ++k) {
      const int c = lane + 32 * k;
      v[k] = c < C ? xr[c] : 0.0f;
    }
  }
  if (!p.y) return;
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < kLnPerLane; ++k) s += v[k];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  const float mean = s / C;
  float q = 0.0f;
#pragma unroll
  for (int k = 0; k < kLnPerLane; ++k) {
    const int c = lane + 32 * k;
    const float dlt = c < C ? v[k] - mean : 0.0f;
    q += dlt * dlt;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
  const float rstd = rsqrtf(q / C + p.eps);
  bf16* yr = p.y + int64_t(row) * p.ldy;
#pragma unroll
  for (int k = 0; k < kLnPerLane; ++k) {
    const int c = lane + 32 * k;
    if (c < C) yr[c] = __float2bfloat16_rn((v[k] - mean) * rstd * p.w[c] + p.b[c]);
  }
}

void launch(const LnParams& p, cudaStream_t stream) {
  SAV_CHECK(layernorm_supports(p.C), "layernorm: width " << p.C << " not supported (1..." << kLnMaxC << ")");
  SAV_CHECK(p.M >= 0, "layernorm: negative row count " << p.M);
  if (p.M == 0) return;
  const int blocks = (p.M + kLnWarps - 1) / kLnWarps;
  layernorm_kernel<<<blocks, kLnWarps * 32, 0, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
}

}  // namespace

bool layernorm_supports(int C) { return C >= 1 && C <= kLnMaxC; }

void layernorm_forward(bf16* y, int ldy, const float* x, int ldx, const float* w, const float* b, int M, int C,
                       float eps, cudaStream_t stream) {
  SAV_CHECK(y && x && w && b, "layernorm: null pointer");
  SAV_CHECK(ldy >= C && ldx >= C, "layernorm: leading dimensions " << ldy << ", " << ldx << " below width " << C);
  LnParams p{};
  p.y = y, p.ldy = ldy, p.x = x, p.ldx = ldx, p.w = w, p.b = b, p.M = M, p.C = C, p.eps = eps;
  launch(p, stream);
}

void embed_layernorm_forward(bf16* y, float* x, const float* pe, const float* cls, const float* pos, const float* w,
                             const float* b, int B, int N, int C, float eps, cudaStream_t stream) {
  SAV_CHECK(x && pe && cls && pos, "embed_layernorm: null pointer");
  SAV_CHECK(!y || (w && b), "embed_layernorm: norm weights missing");
  SAV_CHECK(N >= 1 && B >= 0, "embed_layernorm: bad sizes B=" << B << " N=" << N);
  LnParams p{};
  p.y = y, p.ldy = C, p.xout = x, p.pe = pe, p.cls = cls, p.pos = pos, p.N = N, p.w = w, p.b = b;
  p.M = B * N, p.C = C, p.eps = eps;
  launch(p, stream);
}

}  // namespace sav::cuda
