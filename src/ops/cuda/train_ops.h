// shiftaddvit CUDA backend: the float32 ops of ViT training, forward (saving what backward needs) and
// backward, plus the optimizer's elementwise work. The products are cuda::Blas (blas.h), including the batched
// ones of the softmax attention here; Hamming attention is hamming_train.h, shift and MoE linears moe_train.h.
//
//   using namespace sav::cuda;
//   im2col_f32(cols, img, B, Cin, S, p, stream);                               // patch embedding, then a product
//   embed_tokens_forward(x, pe, cls, pos, B, N, C, stream);
//   layernorm_train_forward(y, C, mean, rstd, x, C, w, b, M, C, eps, stream);
//   layernorm_train_backward(dx, C, dw, db, dy, C, x, C, w, mean, rstd, M, C, ws, stream);
//   attention_train_forward(out, att, qkv, B, N, C, H, blas, stream);             // stream == blas.stream()
//   attention_train_backward(dqkv, ds, dout, qkv, att, B, N, C, H, blas, stream);
//   adamw_step_f32(p, g, m, v, decay_mask, n, ..., stream);
//
// Shape legend (as ops/cpu/ops.h): B batch, N tokens, C channels, H heads, d = C/H, M rows, P = N - 1
// patches, p patch side, Cin image channels, S image side, K = Cin*p*p, F out-features, n elements.
//
// Conventions: device pointers, float32, rows contiguous unless an ld (leading dimension, elements) is
// given; every launch runs on `stream` and is checked; bad sizes or null required pointers throw sav::Error
// before anything is launched; M = 0 (or n = 0) launches nothing. Forward outputs are overwritten. Backward
// outputs say per op whether they are overwritten (=) or accumulated (+=). DETERMINISTIC: no float atomics;
// every sum runs in a fixed order (reductions over rows go through per-block partial sums in a work space,
// then a second pass), so a rerun is bit-identical. Each op's spec is the named sav::cpu op
// (ops/cpu/ops.h); tests/cuda/test_train_ops.cpp checks every op against it on odd sizes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ops/cuda/common.h"

namespace sav::cuda {

class Blas;  // blas.h

// ---- patch embedding: im2col, f32 (spec: the cols of cpu::patch_embed_forward_ref) ----
// cols (B*P, K): row b*P + py*(S/p) + px, column ci*p*p + ky*p + kx = img[b, ci, py*p + ky, px*p + kx].
// img (B,Cin,S,S). Exact (a copy).
void im2col_f32(float* cols, const float* img, int B, int Cin, int S, int p, cudaStream_t stream);

// ---- token assembly (Vit::forward): x[b,0,:] = cls + pos[0,:];  x[b,n,:] = pe[b,n-1,:] + pos[n,:] ----
// x (B,N,C) =;  pe (B,N-1,C);  cls (C);  pos (N,C). Exact.
void embed_tokens_forward(float* x, const float* pe, const float* cls, const float* pos, int B, int N, int C,
                          cudaStream_t stream);
// Backward: dpe (B,N-1,C) = dx[:,1:,:];  dcls (C) += sum_b dx[b,0,:];  dpos (N,C) += sum_b dx[b,:,:]
// (sums over b in order b = 0..B-1, starting from the existing value: bit-exact with Vit::backward's loop).
// Any of dpe, dcls, dpos may be nullptr.
void embed_tokens_backward(float* dpe, float* dcls, float* dpos, const float* dx, int B, int N, int C,
                           cudaStream_t stream);

// ---- LayerNorm over the last dim, training (spec: cpu::layernorm_forward_ref / layernorm_backward_ref) ----
// y (M,C) rows ldy apart =; mean, rstd (M) = (saved for backward); x (M,C) rows ldx apart; w, b (C).
// Any C >= 1. y must not alias x.
void layernorm_train_forward(float* y, int ldy, float* mean, float* rstd, const float* x, int ldx, const float* w,
                             const float* b, int M, int C, float eps, cudaStream_t stream);
// dx (M,C) rows lddx apart +=  (nullptr: skip);  dw, db (C) +=  (nullptr: skip);  dy (M,C) rows lddy apart;
// x rows ldx apart, w, mean, rstd as in forward. ws: layernorm_backward_workspace_floats(M, C) floats.
void layernorm_train_backward(float* dx, int lddx, float* dw, float* db, const float* dy, int lddy, const float* x,
                              int ldx, const float* w, const float* mean, const float* rstd, int M, int C, float* ws,
                              cudaStream_t stream);
size_t layernorm_backward_workspace_floats(int M, int C);

// ---- GELU, exact erf form (spec: cpu::gelu_forward_ref / gelu_backward_ref) ----
// y (n) =;  x (n). y may equal x.
void gelu_forward_f32(float* y, const float* x, int64_t n, cudaStream_t stream);
// dx (n) = dy * GELU'(x)  (OVERWRITTEN, unlike the CPU's +=; dx may equal dy).
void gelu_backward_f32(float* dx, const float* dy, const float* x, int64_t n, cudaStream_t stream);

// ---- column sums (bias gradients): db (F) += sum_rows dy (M,F) rows lddy apart ----
// ws: colsum_workspace_floats(M, F) floats.
void colsum_f32(float* db, const float* dy, int lddy, int M, int F, float* ws, cudaStream_t stream);
size_t colsum_workspace_floats(int M, int F);

// ---- elementwise ----
void add_f32(float* y, const float* a, const float* b, int64_t n, cudaStream_t stream);  // y = a + b (may alias)

// ---- softmax over rows and its backward (the row steps of cpu::attention_forward_ref / _backward_ref) ----
// p (rows, n) in place: p[r, :] = softmax(p[r, :]): the row max subtracted, expf, divided by the row sum.
void softmax_rows_f32(float* p, int64_t rows, int n, cudaStream_t stream);
// ds (rows, n) in place, from dL/dp to dL/d(softmax input): ds[r, j] = p[r, j] (ds[r, j] - sum_k ds[r, k] p[r, k]).
// p (rows, n) the probabilities (softmax_rows_f32's output). One warp per row for both ops (sums by xor
// shuffles in a fixed order: deterministic); any n >= 1, rows >= 0.
void softmax_backward_rows_f32(float* ds, const float* p, int64_t rows, int n, cudaStream_t stream);

// ---- multi-head softmax attention over per-head slices of token tensors, training (the products and row
// steps shared by attention_train_* below and pvt_train_ops.h's attention_q_kv_train_*) ----
// Head h of image b of a tensor t is the (rows, d) matrix at t.ptr + b * t.bstride + h * d with rows t.ld apart.
struct HeadTensor {
  const float* ptr;
  int ld;
  int64_t bstride;
};
// q: N query rows; k, v: Nk key rows; out (N rows per image, heads at h*d) =; att (B,H,N,Nk) = probabilities.
void attention_heads_forward(float* out, int ldo, int64_t bo, float* att, HeadTensor q, HeadTensor k, HeadTensor v,
                             int B, int N, int Nk, int H, int d, Blas& blas, cudaStream_t stream);
// dq, dk, dv = (OVERWRITTEN) in the layouts of q, k, v; ds (B,H,N,Nk) work space; dout in the layout of out.
void attention_heads_backward(float* dq, float* dk, float* dv, float* ds, HeadTensor dout, HeadTensor q, HeadTensor k,
                              HeadTensor v, const float* att, int B, int N, int Nk, int H, int d, Blas& blas,
                              cudaStream_t stream);

// ---- multi-head softmax self-attention core, training (spec: cpu::attention_forward_ref / _backward_ref) ----
// qkv (B,N,3C) timm layout [s*C + h*d + i], s in {q,k,v}; out (B,N,C) = heads concatenated;
// att (B,H,N,N) = the softmax probabilities (saved). scale = d^-0.5.
// Every product is one cuBLAS batched GEMM over the B*H heads (Blas::batched; head (b, h) of Q, K, V is the
// strided (N,d) view at qkv + b*N*3C + s*C + h*d, rows 3C apart; its (N,N) score matrix lies in att / ds):
//   forward:  att = scale Q K^T;  softmax_rows_f32(att);  out = att V                       (2 products)
//   backward: ds = dout V^T;  softmax_backward_rows_f32(ds, att);  dq = scale ds K;  dk = scale ds^T Q;
//             dv = att^T dout                                                            (4 products)
// Precision: with a Blas of F32Math::f32 the products are IEEE f32 (f32 FMAs, cuBLAS's summation order); with
// F32Math::tf32 they run on TF32 tensor cores (operands rounded to TF32, f32 accumulation), like the linears.
// The softmax and its backward are f32 either way. One cuBLAS algorithm per shape and math mode, fixed-order
// row sums: reruns are bit-identical. The products run on blas's stream, the row ops on `stream`, which must be
// blas.stream() (checked). Not capturable into a CUDA graph (Blas::batched uploads pointer arrays).
void attention_train_forward(float* out, float* att, const float* qkv, int B, int N, int C, int H, Blas& blas,
                             cudaStream_t stream);
// dqkv (B,N,3C) = (OVERWRITTEN, every element);  ds (B,H,N,N) work space (the score gradients);
// dout (B,N,C); qkv, att as from forward.
void attention_train_backward(float* dqkv, float* ds, const float* dout, const float* qkv, const float* att, int B,
                              int N, int C, int H, Blas& blas, cudaStream_t stream);
// C % H == 0, 1 <= d <= 1024, 3C fits in int (the GEMMs' leading dimension), 1 <= N <= 46340 (a head's N x N
// score matrix indexable by int). The B*H*N*N floats of att / ds are the practical limit.
bool attention_train_supports(int N, int C, int H);

// ---- optimizer ----
// Sum of squares of g (n) in double, and whether any entry is not finite: out[0] = sum g^2 (as a double
// computed in fixed-size chunks, chunk partials added in order), out[1] = count of non-finite entries.
// out (2) doubles, device. ws: sumsq_workspace_doubles(n) doubles.
void sumsq_f64(double* out, const float* g, int64_t n, double* ws, cudaStream_t stream);
size_t sumsq_workspace_doubles(int64_t n);
// AdamW with a gradient scale (clipping), elementwise as train/optim.cpp's AdamW::step:
//   gs = g * gscale;  m = b1 m + (1-b1) gs;  v = b2 v + (1-b2) gs^2;
//   p = p * (decay_mask[j] ? 1 - lr*wd : 1) - lr * (m/bc1) / (sqrt(v/bc2) + eps)
// p, m, v (n) updated in place; g (n); decay_mask (n) uint8 (1: decayed).
void adamw_step_f32(float* p, const float* g, float* m, float* v, const uint8_t* decay_mask, int64_t n, float gscale,
                    float lr, float wd, float b1, float b2, float bc1, float bc2, float eps, cudaStream_t stream);

}  // namespace sav::cuda
