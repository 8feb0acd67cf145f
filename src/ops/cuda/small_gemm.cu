// The small-M product kernel (spec: small_gemm.h).
#include <cstdint>

#include "ops/cuda/gelu.cuh"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/ptx.cuh"
#include "ops/cuda/small_gemm.h"

namespace sav::cuda {

namespace {

using namespace ptx;

constexpr int kBM = 32, kBN = 32;  // output tile
constexpr int kThreads = 256;      // 8 warps: 2 (rows) x 2 (columns) x 2 (k halves)
constexpr int kPad = 8;            // bf16 elements after each staged row (ldmatrix rows on distinct banks)

enum Epi : int { kEpiBf16, kEpiBf16Gelu, kEpiF32, kEpiF32Acc };

struct Args {
  const bf16* x;
  const bf16* w;
  const void* b;  // bf16 (bf16 epilogues) or f32, or nullptr
  void* y;
  int ldy, M, K, F, epi;
};

size_t smem_bytes(int K) { return size_t(kBM + kBN) * (K + kPad) * sizeof(bf16) + 4 * 256 * sizeof(float); }

// Stages rows [r0, r0 + 32) of the (rows, K) bf16 matrix g (rows past `rows`: zeros) into s (rows K + kPad apart).
__device__ __forceinline__ void stage_rows(bf16* s, const bf16* g, int r0, int rows, int K) {
  const int chunks = K / 8, ld = K + kPad;
  for (int i = threadIdx.x; i < 32 * chunks; i += kThreads) {
    const int r = i / chunks, c = i - r * chunks;
    const bool ok = r0 + r < rows;
    cp_async16(s + r * ld + c * 8, g + size_t(ok ? r0 + r : 0) * K + c * 8, ok);
  }
  cp_async_commit();
}

__global__ void __launch_bounds__(kThreads) small_linear_kernel(const Args a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int K = a.K, ld = K + kPad;
  bf16* Ws = reinterpret_cast<bf16*>(smem);
  bf16* As = Ws + kBN * ld;
  float* red = reinterpret_cast<float*>(As + kBM * ld);
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  pdl_trigger();
  stage_rows(Ws, a.w, n0, a.F, K);  // weights: independent of the predecessor
  pdl_wait();
  stage_rows(As, a.x, m0, a.M, K);
  cp_async_wait<0>();
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp & 1, wn = (warp >> 1) & 1, wk = warp >> 2;
  const int steps = K / 16, half = (steps + 1) / 2;
  const bf16* arow = As + (wm * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8;
  const bf16* brow = Ws + (wn * 16 + (lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8;
  float acc[2][4] = {};
  for (int s = wk ? half : 0, e = wk ? steps : half; s < e; ++s) {
    uint32_t af[4], bw[4];
    ldmatrix_x4(af, arow + s * 16);
    ldmatrix_x4(bw, brow + s * 16);
    mma_bf16(acc[0], af, bw[0], bw[1]);
    mma_bf16(acc[1], af, bw[2], bw[3]);
  }
  float* mine = red + (warp & 3) * 256 + lane;
  if (wk) {
    for (int i = 0; i < 8; ++i) mine[i * 32] = acc[i >> 2][i & 3];
  }
  __syncthreads();
  if (wk) return;
  for (int i = 0; i < 8; ++i) acc[i >> 2][i & 3] += mine[i * 32];

  const int r_lo = m0 + wm * 16 + (lane >> 2);
  for (int j = 0; j < 2; ++j) {
    const int c = n0 + wn * 16 + j * 8 + (lane & 3) * 2;
    if (c >= a.F) continue;
    float b0 = 0.f, b1 = 0.f;
    if (a.b) {
      if (a.epi <= kEpiBf16Gelu) {
        const bf16* bb = static_cast<const bf16*>(a.b);
        b0 = __bfloat162float(bb[c]), b1 = __bfloat162float(bb[c + 1]);
      } else {
        const float* bb = static_cast<const float*>(a.b);
        b0 = bb[c], b1 = bb[c + 1];
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int r = r_lo + h * 8;
      if (r >= a.M) continue;
      float v0 = acc[j][2 * h] + b0, v1 = acc[j][2 * h + 1] + b1;
      const size_t o = size_t(r) * a.ldy + c;
      if (a.epi <= kEpiBf16Gelu) {
        if (a.epi == kEpiBf16Gelu) v0 = gelu_tanh(v0), v1 = gelu_tanh(v1);
        *reinterpret_cast<__nv_bfloat162*>(static_cast<bf16*>(a.y) + o) = __floats2bfloat162_rn(v0, v1);
      } else {
        float2* yp = reinterpret_cast<float2*>(static_cast<float*>(a.y) + o);
        if (a.epi == kEpiF32Acc) {
          const float2 old = *yp;
          v0 = old.x + v0, v1 = old.y + v1;
        }
        *yp = make_float2(v0, v1);
      }
    }
  }
}

void run(const Args& a, size_t ysize, cudaStream_t stream) {
  SAV_CHECK(small_linear_supports(a.M, a.K, a.F),
            "small_linear: unsupported shape M=" << a.M << " K=" << a.K << " F=" << a.F
                                                 << " (needs M >= 1, K % 16 == 0, K <= " << kSmallLinearMaxK
                                                 << ", F even)");
  SAV_CHECK(a.ldy >= a.F && a.ldy % 2 == 0, "small_linear: ldy " << a.ldy << " must be even and >= F " << a.F);
  SAV_CHECK(a.x && a.w && a.y, "small_linear: null x, w or y");
  SAV_CHECK(aligned16(a.x) && aligned16(a.w) && reinterpret_cast<uintptr_t>(a.y) % (2 * ysize) == 0,
            "small_linear: x and w must be 16-byte aligned, y aligned to two elements");
  SAV_CHECK(device_cc_major() >= 9, "small_linear: needs compute capability 9 (griddepcontrol)");
  const dim3 grid((a.M + kBM - 1) / kBM, (a.F + kBN - 1) / kBN);
  launch_dependent(small_linear_kernel, grid, dim3(kThreads), smem_bytes(a.K), 1, stream, a);
}

}  // namespace

bool small_linear_supports(int M, int K, int F) {
  return M >= 1 && K >= 16 && K % 16 == 0 && K <= kSmallLinearMaxK && F >= 2 && F % 2 == 0;
}

void small_linear_bf16(bf16* y, int ldy, const bf16* x, const bf16* w, const bf16* b, int M, int K, int F, bool gelu,
                       cudaStream_t stream) {
  run(Args{x, w, b, y, ldy, M, K, F, gelu ? kEpiBf16Gelu : kEpiBf16}, sizeof(bf16), stream);
}

void small_linear_f32(float* y, int ldy, const bf16* x, const bf16* w, const float* b, int M, int K, int F,
                      bool accumulate, cudaStream_t stream) {
  run(Args{x, w, b, y, ldy, M, K, F, accumulate ? kEpiF32Acc : kEpiF32}, sizeof(float), stream);
}

}  // namespace sav::cuda
