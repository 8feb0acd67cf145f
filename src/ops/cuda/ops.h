// shiftaddvit CUDA backend: the dense ViT inference ops (forward only), bf16 activations, fp32 statistics.
//
//   using namespace sav::cuda;
//   im2col_forward(cols, img, B, Cin, S, p, stream);                       // then Gemm::linear_f32 (gemm.h)
//   embed_layernorm_forward(y, x, pe, cls, pos, w, b, B, N, C, eps, stream);
//   layernorm_forward(y, C, x, C, w, b, M, C, eps, stream);
//   attention_forward(out, qkv, B, N, C, H, stream);
//
// Shape legend (as ops/cpu/ops.h): B batch, N tokens, C channels, H heads, d = C/H, M rows, P patches per
// image, p patch side, Cin image channels, S image side, K = Cin*p*p.
//
// Conventions: all pointers are device pointers; every launch runs on the given stream and is checked (a
// bad configuration throws sav::Error); dimensions are passed explicitly; rows are contiguous unless an ld
// (leading dimension, in elements) is given. Each op's CPU reference (the spec) is the matching sav::cpu op.
// `*_supports` answers whether a size is handled, so callers can fall back or fail clearly.
#pragma once

#include <cstdint>

#include "ops/cuda/common.h"

namespace sav::cuda {

// ---- patch embedding, step 1: im2col in bf16 (step 2 is a Gemm with bias) ----
// cols (B*P, K) bf16, row b*P + py*(S/p) + px, column ci*p*p + ky*p + kx (cpu::patch_embed_forward's cols)
// img (B,Cin,S,S) f32
void im2col_forward(bf16* cols, const float* img, int B, int Cin, int S, int p, cudaStream_t stream);

// ---- token assembly fused with a LayerNorm (the embedding's adds and block 0's norm1) ----
// x (B,N,C) f32 written: x[b,0,:] = cls + pos[0,:];  x[b,n,:] = pe[b,n-1,:] + pos[n,:] for n >= 1
// y (B,N,C) bf16 = LayerNorm(x) * w + b, or nullptr to skip the norm
// pe (B,N-1,C) f32   cls (C)   pos (N,C)   w, b (C)
void embed_layernorm_forward(bf16* y, float* x, const float* pe, const float* cls, const float* pos, const float* w,
                             const float* b, int B, int N, int C, float eps, cudaStream_t stream);

// ---- LayerNorm over the last dim, f32 in, bf16 out (statistics in f32) ----
// y (M,C) bf16, row i at y + i*ldy;  x (M,C) f32, row i at x + i*ldx;  w, b (C)
void layernorm_forward(bf16* y, int ldy, const float* x, int ldx, const float* w, const float* b, int M, int C,
                       float eps, cudaStream_t stream);
bool layernorm_supports(int C);  // 1 <= C <= 1024

// ---- multi-head softmax self-attention core (between qkv and proj), tensor cores (bf16 in, f32 acc) ----
// out (B,N,C) bf16 heads concatenated [h*d + i];  qkv (B,N,3C) bf16, timm layout [s*C + h*d + i], s in q,k,v
// scale = d^-0.5; the probabilities are rounded to bf16 before P V.
void attention_forward(bf16* out, const bf16* qkv, int B, int N, int C, int H, cudaStream_t stream);
bool attention_supports(int N, int C, int H);  // 1 <= N <= 256, C % H == 0, 1 <= d <= 64

// ---- conversions ----
// y (n) bf16 = x (n) f32, round to nearest even
void f32_to_bf16(bf16* y, const float* x, int64_t n, cudaStream_t stream);

}  // namespace sav::cuda
