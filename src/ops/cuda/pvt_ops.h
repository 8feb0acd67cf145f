// shiftaddvit CUDA backend: the float32 ops of PVTv2 inference (layout changes, im2col for the strided
// convolutions, LayerNorm, attention over spatially reduced keys, depthwise conv + GELU, token mean, the
// release's fixed-point rounding, and the f32 MoE routing epilogue). The products themselves are
// Gemm::linear_f32 (gemm.h).
//
//   using namespace sav::cuda;
//   nchw_to_nhwc_f32(y, img, B, 3, S * S, stream);                          // images to channels-last
//   im2col_nhwc_f32(cols, x, B, H, W, Cin, k, s, pad, stream);              // then a product with w (Cout, K)
//   layernorm_f32(y, C, x, C, w, b, M, C, eps, stream);
//   attention_q_kv_f32(out, q, kv, B, N, Nk, C, H, stream);
//   dwconv2d_f32(y, x, w, b, B, H, W, C, 3, /*gelu=*/true, stream);
//   mean_tokens_f32(pooled, x, B, N, C, stream);
//   release_fixed_point_f32(y, x, n, stream);
//   moe_epilogue_f32(out, ldo, choice, s, lds, b0, b1, br, M, F, gate, release, accumulate, stream);
//
// Shape legend (as ops/cpu/conv.h): B batch, H, W image rows / columns, C channels, Cin input channels, k
// kernel side, s stride, pad zero padding, Ho = cpu::conv_out_size(H,k,s,pad), Wo likewise, K = Cin*k*k,
// N query tokens, Nk key/value tokens, d = C/H per head (H heads), M rows, F out-features.
//
// Conventions (as ops.h): all pointers are device pointers, all tensors float32, rows contiguous unless
// an ld (leading dimension, elements) is given; every launch runs on `stream` and is checked; arguments
// are validated at the launcher (bad sizes or null pointers throw sav::Error before anything is
// launched); an empty problem (0 rows or tokens where allowed) launches nothing. Deterministic: every
// sum runs in a fixed order, so a rerun gives bit-identical results. Each op's CPU reference (the spec) is
// named below.
#pragma once

#include <cstdint>

#include "ops/cuda/common.h"
#include "ops/cuda/ops.h"  // MoeGate

namespace sav::cuda {

// ---- layout: (B, C, HW) -> (B, HW, C), e.g. NCHW images to channels-last tokens ----
// y[(b*HW + p)*C + c] = x[(b*C + c)*HW + p]. Exact (a copy). B, C, HW >= 0 (any 0: nothing to do).
void nchw_to_nhwc_f32(float* y, const float* x, int B, int C, int HW, cudaStream_t stream);

// ---- im2col of a channels-last image (PVTv2 patch embeddings and spatial-reduction convs) ----
// x (B,H,W,Cin); cols (B*Ho*Wo, K): row (b*Ho + oy)*Wo + ox, column (ci*k + ky)*k + kx holds
// x[b, oy*s - pad + ky, ox*s - pad + kx, ci], 0 in the padding: exactly the cols of
// cpu::conv2d_forward_ref (then y = cols w^T + b with w (Cout, K), the PyTorch weight flattened).
// B, H, W, Cin, k, s >= 1, pad >= 0, H + 2 pad >= k and W + 2 pad >= k. Exact (a copy).
void im2col_nhwc_f32(float* cols, const float* x, int B, int H, int W, int Cin, int k, int s, int pad,
                     cudaStream_t stream);

// ---- LayerNorm over the last dim, f32 in and out (spec: cpu::layernorm_forward_ref) ----
// y (M,C), row i at y + i*ldy; x (M,C), row i at x + i*ldx; w, b (C).
//   y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps),  var = mean((x - mean)^2) (biased)
// Two-pass mean / variance in f32. Any C >= 1, M >= 0; y may equal x (in place, then ldy == ldx).
void layernorm_f32(float* y, int ldy, const float* x, int ldx, const float* w, const float* b, int M, int C, float eps,
                   cudaStream_t stream);

// ---- softmax attention, queries and keys/values from different token sets (timm PVTv2 Attention core;
// spec: cpu::attention_q_kv_forward_ref) ----
// q (B,N,C), head h at columns h*d .. h*d+d-1; kv (B,Nk,2C): k of head h at column h*d + i, v at
// C + h*d + i; out (B,N,C) = softmax(q k^T * d^-0.5) v per head, heads concatenated. Online softmax over
// tiles of keys staged in shared memory: any N >= 1, Nk >= 1 (B >= 0); f32 throughout (CUDA cores).
void attention_q_kv_f32(float* out, const float* q, const float* kv, int B, int N, int Nk, int C, int H,
                        cudaStream_t stream);
bool attention_q_kv_supports(int C, int H);  // C, H >= 1, C % H == 0, 1 <= d = C/H <= 128

// ---- depthwise k x k conv, stride 1, zero padding k/2, optionally + exact GELU (PVTv2 MLP) ----
// x, y (B,H,W,C) channels-last (y must not overlap x); w (C,1,k,k) PyTorch layout; b (C) or nullptr.
//   z = b[c] + sum_{ky,kx} w[c,ky,kx] x[b, y+ky-k/2, x+kx-k/2, c];  y = gelu ? 0.5 z (1 + erf(z/sqrt2)) : z
// Spec: cpu::dwconv2d_forward_ref, then cpu::gelu_forward_ref. k odd >= 1; B, H, W, C >= 1.
void dwconv2d_f32(float* y, const float* x, const float* w, const float* b, int B, int H, int W, int C, int k,
                  bool gelu, cudaStream_t stream);

// ---- mean over tokens (the PVTv2 head's pooling) ----
// y (B,C) = (sum_{n = 0..N-1} x[b,n,:], summed in order from 0.0f) * (1.0f / N); x (B,N,C). Bit-exact
// with the CPU Pvt head's loop. B >= 0, N, C >= 1.
void mean_tokens_f32(float* y, const float* x, int B, int N, int C, cudaStream_t stream);

// ---- the public release's Q16.16 rounding of shift-layer inputs (nn/linear_layer.h) ----
// y (n) = sav::release_fixed_point(x) = clamp(floor(x * 65536) / 65536, -32768, 32767) elementwise,
// bit-exact; y may equal x. n >= 0.
void release_fixed_point_f32(float* y, const float* x, int64_t n, cudaStream_t stream);

// ---- MoE(mult, shift) routing epilogue in f32 (after ONE stacked f32 product, no bias) ----
// s (M, lds) f32, lds >= 2F + 2: columns [0,F) expert 0 (mult), [F,2F) expert 1 (shift), [2F,2F+2) the
// router logits without bias. Per row (one warp):
//   l_e = s[2F+e] + br[e];  e = argmax (ties -> 0, as cpu::moe_router_forward);
//   g = 1 (moe_gate_straight_through) or the softmax probability of e, 1 / (1 + exp(l_other - l_e)), as
//       the CPU fast path computes it (moe_gate_prob);
//   y_j = (s[e*F + j] + b_e[j]) * g;  release_combine: y_j = log(exp(y_j) + 2.220446049250313e-16f)
//       (sav::release_moe_combine, CUDA's expf / logf: within a few ulp of the C library's);
//   out[row*ldo + j] = y_j, or += y_j when accumulate;  choice[row] = e (choice may be nullptr).
// b0, b1 (F), br (2). F >= 1, M >= 0, ldo >= F. No multiply-add contraction: with g = 1 and no combine
// the result is bit-exact with the same float formulas on the host.
void moe_epilogue_f32(float* out, int ldo, int8_t* choice, const float* s, int lds, const float* b0, const float* b1,
                      const float* br, int M, int F, MoeGate gate, bool release_combine, bool accumulate,
                      cudaStream_t stream);

}  // namespace sav::cuda
