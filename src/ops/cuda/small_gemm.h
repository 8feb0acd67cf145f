// shiftaddvit CUDA backend: the engine's own linear-layer product for few rows (a batch-1 or batch-2 transformer
// block: M of a few hundred), y = x W^T + b with the epilogues of gemm.h, built for programmatic dependent launch.
//
//   if (cuda::small_linear_supports(M, K, F)) {
//     cuda::DependentLaunchScope pdl(true);                                     // optional: overlap launches
//     cuda::small_linear_bf16(h, F, xn, w1, b1, M, C, F, /*gelu*/ true, s);     // h = GELU(xn W1^T + b1), bf16
//     cuda::small_linear_f32(x, C, h, w2, b2, M, F, C, /*accumulate*/ true, s); // x += h W2^T + b2, f32
//   }
//
// Shape legend: M rows, K in-features, F out-features; x (M, K) bf16 contiguous, w (F, K) bf16 (nn.Linear layout),
// y (M, F) with rows ldy apart. Why not cuBLASLt here: at a few hundred rows a product is a latency chain (launch,
// weights from L2, a short mma loop, the store), and cuBLASLt's kernels do not start before their predecessor ends.
// This kernel stages its weight tile BEFORE it waits for the predecessor (ptx::pdl_wait), so under a
// DependentLaunchScope the launch and the weight loads overlap the previous kernel; the activations follow the wait.
//
// Work split: one CTA (8 warps) per 32 x 32 output tile, the tile's W rows and x rows staged whole (K) in shared
// memory; warp w computes rows 16 (w & 1) .., columns 16 ((w >> 1) & 1) .. over the first (w < 4) or second half of
// the k steps (bf16 mma.sync m16n8k16, f32 accumulation); the halves are added in that order, then the bias, then the
// epilogue (GELU: the tanh form, as cuBLASLt's; residual: y + (s + b)). Results do not depend on the grid or on the
// launch mode: a rerun, and a run under a DependentLaunchScope, give the same bits.
// Limits (small_linear_supports): K % 16 == 0 and K <= 1536 (shared memory), F and ldy even.
// Measured on the H200 (bench/RESULTS.md, session 11): slower than cuBLASLt at DeiT-Tiny's batch-1 shapes (four
// products 16.5 us against 12.9, 15.5 under dependent launch), so ViTCuda runs it only when forced
// (ViTCudaDependentLaunch::small_products).
#pragma once

#include "ops/cuda/common.h"

namespace sav::cuda {

constexpr int kSmallLinearMaxK = 1536;

bool small_linear_supports(int M, int K, int F);
// y (M, F) bf16, row i at y + i ldy = [GELU](x W^T + b);  b (F) bf16 or nullptr
void small_linear_bf16(bf16* y, int ldy, const bf16* x, const bf16* w, const bf16* b, int M, int K, int F, bool gelu,
                       cudaStream_t stream);
// y (M, F) f32, row i at y + i ldy = x W^T + b, or y += x W^T + b when accumulate;  b (F) f32 or nullptr
void small_linear_f32(float* y, int ldy, const bf16* x, const bf16* w, const float* b, int M, int K, int F,
                      bool accumulate, cudaStream_t stream);

}  // namespace sav::cuda
