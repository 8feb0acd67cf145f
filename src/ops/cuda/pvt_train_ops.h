// shiftaddvit CUDA backend: the float32 ops of PVTv2 training that the ViT ops do not cover (specs:
// ops/cpu/conv.h). Forward-only PVT ops (layout change, channels-last im2col, depthwise conv) are in pvt_ops.h;
// LayerNorm, GELU, column sums are train_ops.h; Hamming attention hamming_train.h; products blas.h / gemm.h.
//
//   using namespace sav::cuda;
//   // conv2d on channels-last tokens: im2col_nhwc_f32 (pvt_ops.h) + a product; backward:
//   //   dW += dy^T cols (Blas::dytx), dcols = dy W (Blas::dyw), then
//   col2im_nhwc_f32(dx, dcols, B, H, W, Cin, k, s, pad, stream);
//   dwconv2d_backward_f32(dx, dw, db, dy, x, w, B, H, W, C, k, ws, stream);
//   attention_q_kv_train_forward(out, att, q, kv, B, N, Nk, C, H, blas, stream);  // stream == blas.stream()
//   attention_q_kv_train_backward(dq, dkv, ds, dout, q, kv, att, B, N, Nk, C, H, blas, stream);
//   mean_tokens_backward_f32(dx, dy, B, N, C, stream);
//
// Shape legend (as ops/cpu/conv.h): B batch, H, W image rows / columns, C channels, Cin input channels, k kernel
// side, s stride, pad zero padding, Ho = cpu::conv_out_size(H,k,s,pad), Wo likewise, K = Cin*k*k, N query
// tokens, Nk key/value tokens, d = C/H per head (H heads).
//
// Conventions as ops/cuda/train_ops.h: device pointers, float32, contiguous rows, checked launches, bad sizes
// or null required pointers throw sav::Error before launching, DETERMINISTIC (no float atomics; fixed
// summation orders; reductions over rows go through per-block partials in a work space), every output element
// written. Each op's spec is the named sav::cpu op; tests/cuda/test_pvt_train_ops.cpp checks it on odd sizes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ops/cuda/common.h"

namespace sav::cuda {

class Blas;  // blas.h

// ---- col2im: the backward of im2col_nhwc_f32 (the dx part of cpu::conv2d_backward_ref) ----
// dx (B,H,W,Cin) = (OVERWRITTEN, every element) sum over the (row, column) entries of dcols that im2col read
// from that pixel: dcols (B*Ho*Wo, K) with row (b*Ho + oy)*Wo + ox and column (ci*k + ky)*k + kx holding the
// gradient of x[b, oy*s - pad + ky, ox*s - pad + kx, ci] (padding entries dropped). Gather form (one thread
// per dx element, summing its contributions in (ky, kx) order).
void col2im_nhwc_f32(float* dx, const float* dcols, int B, int H, int W, int Cin, int k, int s, int pad,
                     cudaStream_t stream);

// ---- depthwise k x k conv, stride 1, padding k/2, backward (spec: cpu::dwconv2d_backward_ref) ----
// dx (B,H,W,C) = (OVERWRITTEN; nullptr: skip);  dw (C,1,k,k) += ;  db (C) +=  (each nullptr: skip);
// dy (B,H,W,C); x (B,H,W,C) as given to forward; w (C,1,k,k).
// ws: dwconv2d_backward_workspace_floats(B, H, W, C, k) floats (needed when dw or db is given).
void dwconv2d_backward_f32(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w, int B,
                           int H, int W, int C, int k, float* ws, cudaStream_t stream);
size_t dwconv2d_backward_workspace_floats(int B, int H, int W, int C, int k);

// ---- softmax attention with separate queries and keys/values, training (spec: cpu::attention_q_kv_forward_ref
// / cpu::attention_q_kv_backward_ref) ----
// q (B,N,C) head h at columns h*d..h*d+d-1; kv (B,Nk,2C): k of head h at column h*d + i, v at C + h*d + i;
// out (B,N,C) =; att (B,H,N,Nk) = the softmax probabilities (saved). scale = d^-0.5.
// As attention_train_forward / _backward (train_ops.h): every product is one cuBLAS batched GEMM over the B*H
// heads (Blas::batched on strided per-head views: Q rows C apart, K and V rows 2C apart), the softmax and its
// backward are the row ops softmax_rows_f32 / softmax_backward_rows_f32 (train_ops.h):
//   forward:  att = scale Q K^T;  softmax by rows;  out = att V
//   backward: ds = dout V^T;  ds = att (ds - rowsum(ds att));  dq = scale ds K;  dk = scale ds^T Q;
//             dv = att^T dout
// Precision: F32Math::f32 Blas: IEEE f32 products; F32Math::tf32: TF32 tensor-core products (f32 accumulation);
// the row ops f32 either way. Bit-identical reruns. The products run on blas's stream, the row ops on `stream`,
// which must be blas.stream() (checked). Not capturable into a CUDA graph (Blas::batched).
void attention_q_kv_train_forward(float* out, float* att, const float* q, const float* kv, int B, int N, int Nk, int C,
                                  int H, Blas& blas, cudaStream_t stream);
// dq (B,N,C) = (OVERWRITTEN);  dkv (B,Nk,2C) = (OVERWRITTEN);  ds (B,H,N,Nk) work space (the score
// gradients);  dout (B,N,C);  q, kv, att as in forward.
void attention_q_kv_train_backward(float* dq, float* dkv, float* ds, const float* dout, const float* q, const float* kv,
                                   const float* att, int B, int N, int Nk, int C, int H, Blas& blas,
                                   cudaStream_t stream);
// C % H == 0, 1 <= d <= 1024, 2C fits in int (the GEMMs' leading dimension), Nk >= 1; the calls further need
// N >= 1 and N * Nk <= INT_MAX (a head's score matrix indexable by int).
bool attention_q_kv_train_supports(int Nk, int C, int H);

// ---- mean over tokens, backward (the PVTv2 head's pooling: y = mean_n x[b,n,:]) ----
// dx (B,N,C) = dy[b,:] * (1.0f / N) (OVERWRITTEN); dy (B,C). Exact.
void mean_tokens_backward_f32(float* dx, const float* dy, int B, int N, int C, cudaStream_t stream);

}  // namespace sav::cuda
