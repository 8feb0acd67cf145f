// shiftaddvit: the PVTv2 ops on the CPU, forward and backward: 2-D convolution and depthwise convolution on
// channels-last (token-major) tensors, and softmax attention whose keys/values come from a different
// (spatially reduced) token set than the queries.
//
// Token-major layout: a (B,H,W,C) tensor is the (B,N,C) token tensor of a transformer with N = H*W tokens
// in row-major order (n = y*W + x), which is what timm's PVTv2 reshapes to and from (B,C,H,W).
// Weights keep PyTorch's layouts so timm checkpoints load unchanged.
//
// Conventions as in ops.h: `*_ref` are plain loops (the spec); the fast paths use BLAS (im2col) and
// OpenMP; forward outputs are overwritten; backward functions ACCUMULATE (+=) into every gradient and skip
// nullptr ones; results of the fast paths do not depend on the number of threads.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sav::cpu {

// Output side of a convolution: (in + 2 pad - k) / s + 1 (floor division, as PyTorch), so <= 0 when the
// kernel is larger than the padded input (C++ `/` truncates towards zero: -1 / 2 + 1 would be 1).
inline int conv_out_size(int in, int k, int s, int pad) {
  const int span = in + 2 * pad - k;
  return (span >= 0 ? span / s : -((s - 1 - span) / s)) + 1;
}

// ---- 2-D convolution, groups = 1 (PVTv2 patch embeddings: k7 s4 p3, k3 s2 p1; spatial reduction: k = s = r) ----
// x (B,H,W,Cin) channels-last; w (Cout,Cin,k,k) PyTorch layout; b (Cout) or nullptr; stride s >= 1, zero
// padding pad >= 0; y (B,Ho,Wo,Cout) with Ho = conv_out_size(H,k,s,pad), Wo likewise.
// cols: work space of conv2d_cols_floats() floats (im2col, row (b,oy,ox), column (ci*k + ky)*k + kx), filled
// by forward and read by backward (the reference fills it too, the same way).
size_t conv2d_cols_floats(int B, int H, int W, int Cin, int k, int s, int pad);
void conv2d_forward(float* y, float* cols, const float* x, const float* w, const float* b, int B, int H, int W,
                    int Cin, int Cout, int k, int s, int pad);
void conv2d_forward_ref(float* y, float* cols, const float* x, const float* w, const float* b, int B, int H, int W,
                        int Cin, int Cout, int k, int s, int pad);
// dx (B,H,W,Cin) +=, dw (Cout,Cin,k,k) +=, db (Cout) += (each may be nullptr); dy (B,Ho,Wo,Cout); cols as
// filled by forward. scratch: conv2d_cols_floats() floats of work space (fast path; the ref may ignore it).
void conv2d_backward(float* dx, float* dw, float* db, float* scratch, const float* dy, const float* cols,
                     const float* w, int B, int H, int W, int Cin, int Cout, int k, int s, int pad);
void conv2d_backward_ref(float* dx, float* dw, float* db, float* scratch, const float* dy, const float* cols,
                         const float* w, int B, int H, int W, int Cin, int Cout, int k, int s, int pad);

// ---- depthwise 2-D convolution, stride 1, zero padding k/2, k odd (PVTv2 MLP: 3x3 with bias) ----
// x, y (B,H,W,C) channels-last; w (C,1,k,k) PyTorch layout; b (C) or nullptr.
void dwconv2d_forward(float* y, const float* x, const float* w, const float* b, int B, int H, int W, int C, int k);
void dwconv2d_forward_ref(float* y, const float* x, const float* w, const float* b, int B, int H, int W, int C,
                          int k);
// dx (B,H,W,C) +=, dw (C,1,k,k) +=, db (C) += (each may be nullptr); dy (B,H,W,C); x as given to forward.
void dwconv2d_backward(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w, int B, int H,
                       int W, int C, int k);
void dwconv2d_backward_ref(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w, int B,
                           int H, int W, int C, int k);

// ---- multi-head softmax attention with separate queries and keys/values (timm PVTv2 Attention core) ----
// q (B,N,C) with head h at columns h*d .. h*d+d-1; kv (B,Nk,2C) as timm's kv.reshape(B,Nk,2,H,d): k of head
// h at columns h*d + i, v at C + h*d + i; att (B,H,N,Nk) softmax over keys of q k^T * d^-0.5 (saved for
// backward); out (B,N,C) heads concatenated.
void attention_q_kv_forward(float* out, float* att, const float* q, const float* kv, int B, int N, int Nk, int C,
                            int H);
void attention_q_kv_forward_ref(float* out, float* att, const float* q, const float* kv, int B, int N, int Nk, int C,
                                int H);
// dq (B,N,C) +=, dkv (B,Nk,2C) += (each may be nullptr); scratch: at least B*H*N*Nk floats of work space.
void attention_q_kv_backward(float* dq, float* dkv, float* scratch, const float* dout, const float* q,
                             const float* kv, const float* att, int B, int N, int Nk, int C, int H);
void attention_q_kv_backward_ref(float* dq, float* dkv, float* scratch, const float* dout, const float* q,
                                 const float* kv, const float* att, int B, int N, int Nk, int C, int H);

}  // namespace sav::cpu
