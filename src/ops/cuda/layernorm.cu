// LayerNorm forward (f32 in, bf16 out), and the token assembly of the embedding fused with a LayerNorm.
// A group of lanes per row: the whole warp, or half a warp (two rows per warp, three float4 loads per lane at
// DeiT-Tiny's C = 192 instead of one or two) when the row is float4-aligned and C <= 512. The row stays in
// registers (at most 32 values per lane), two-pass mean / variance in f32 as cpu::layernorm_forward_ref.
#include "ops/cuda/launch.cuh"
#include "ops/cuda/layernorm.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/ptx.cuh"

namespace sav::cuda {

namespace {

constexpr int kLnMaxC = 1024;
constexpr int kLnPerLane = kLnMaxC / 32;
static_assert(ln::kMaxPer4 == kLnPerLane / 4, "the vector path keeps 8 float4 a lane");
constexpr int kLnWarps = 8;  // rows per block

struct LnParams {
  bf16* y;  // (M,C) rows ldy apart, or nullptr (embed without norm)
  int ldy;
  float* xout;     // embed mode: (M,C) f32 written, rows contiguous
  const float* x;  // plain mode: (M,C) f32 rows ldx apart
  int ldx;
  const float* pe;   // embed mode when non-null: (B,N-1,C)
  const float* cls;  // (C)
  const float* pos;  // (N,C)
  int N;
  const float* w;
  const float* b;
  int M, C;
  float eps;
  bool vec4;  // float4 loads, 4-bf16 stores
};

__device__ __forceinline__ float4 f4_add(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}

// Vector path (C % 4 == 0, aligned rows): lane holds float4 number lane + kG k. Scalar path (kG = 32 only):
// element lane + 32 k (compiled but never reached for kG = 16). Both keep the row in 32 registers. kG = 16: a
// half warp past the last row computes on zeros and stores nothing (its other half may still need the shuffles).
template <int kG>
__global__ void layernorm_kernel(const LnParams p) {
  ptx::pdl_trigger();  // dependent launch (common.h): let the next kernel start; wait before touching data
  ptx::pdl_wait();
  const int lane = threadIdx.x % kG;
  const int row = blockIdx.x * (kLnWarps * 32 / kG) + threadIdx.x / kG;
  const bool valid = row < p.M;
  if (kG == 32 && !valid) return;
  const int C = p.C;
  float s = 0.0f;
  if (kG == 16 || p.vec4) {
    constexpr int kPer4 = kLnPerLane / 4;
    const int C4 = C / 4;
    float4 v[kPer4];
    if (p.pe) {
      const int n = valid ? row % p.N : 0, b = valid ? row / p.N : 0;
      const float4* src =
          reinterpret_cast<const float4*>(n == 0 ? p.cls : p.pe + (int64_t(b) * (p.N - 1) + (n - 1)) * C);
      const float4* pos = reinterpret_cast<const float4*>(p.pos + int64_t(n) * C);
      float4* xo = reinterpret_cast<float4*>(p.xout + int64_t(row) * C);
#pragma unroll
      for (int k = 0; k < kPer4; ++k) {
        const int c = lane + kG * k;
        v[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (valid && c < C4) {
          v[k] = f4_add(src[c], pos[c]);
          xo[c] = v[k];
        }
      }
    } else {
      const float4* xr = reinterpret_cast<const float4*>(p.x + int64_t(row) * p.ldx);
#pragma unroll
      for (int k = 0; k < kPer4; ++k) {
        const int c = lane + kG * k;
        v[k] = valid && c < C4 ? xr[c] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
    }
    if (!p.y) return;
    float mean, rstd;
    ln::row_stats<kG>(v, lane, C, p.eps, mean, rstd);
    const float4* w4 = reinterpret_cast<const float4*>(p.w);
    const float4* b4 = reinterpret_cast<const float4*>(p.b);
    uint2* yr = reinterpret_cast<uint2*>(p.y + int64_t(row) * p.ldy);
#pragma unroll
    for (int k = 0; k < kPer4; ++k) {
      const int c = lane + kG * k;
      if (valid && c < C4) yr[c] = ln::apply4(v[k], mean, rstd, w4[c], b4[c]);
    }
    return;
  }
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

void launch(LnParams p, cudaStream_t stream) {
  SAV_CHECK(layernorm_supports(p.C), "layernorm: width " << p.C << " not supported (1..." << kLnMaxC << ")");
  SAV_CHECK(p.M >= 0, "layernorm: negative row count " << p.M);
  if (p.M == 0) return;
  auto a16 = [](const void* q) { return q == nullptr || reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  p.vec4 = p.C % 4 == 0 && p.ldx % 4 == 0 && p.ldy % 4 == 0 && a16(p.x) && a16(p.xout) && a16(p.pe) && a16(p.cls) &&
           a16(p.pos) && a16(p.w) && a16(p.b) && reinterpret_cast<uintptr_t>(p.y) % 8 == 0;
  if (p.vec4 && ln::row_group(p.C) == 16) {  // half a warp per row
    const int rows = kLnWarps * 2;
    launch_dependent(layernorm_kernel<16>, dim3((p.M + rows - 1) / rows), dim3(kLnWarps * 32), 0, 1, stream, p);
  } else {
    launch_dependent(layernorm_kernel<32>, dim3((p.M + kLnWarps - 1) / kLnWarps), dim3(kLnWarps * 32), 0, 1, stream, p);
  }
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
