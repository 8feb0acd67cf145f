// shiftaddvit: dense CPU ops, forward and backward.
//
// Shape legend: B batch, N tokens, C channels, H heads, d = C/H, M rows (= B*N usually), K in-features,
// F out-features, V classes, P patches per image, p patch side, Cin image channels, S image side.
//
// Conventions (as in llm.c):
//  - every op has a plain reference `<op>_forward_ref` / `<op>_backward_ref` (simple loops, the spec)
//    and a fast path `<op>_forward` / `<op>_backward` (BLAS + OpenMP + vectorisable loops); tests
//    check the fast path against the reference and every backward against finite differences;
//  - forward outputs are overwritten;
//  - backward functions ACCUMULATE (+=) into every gradient they produce (dx, dw, db...), so that
//    residual branches and shared parameters just add up; any gradient pointer may be nullptr to
//    skip it;
//  - all tensors are contiguous row-major float32; dimensions are passed explicitly.
#pragma once

#include <cstdint>

namespace sav::cpu {

// ---- linear: y = x W^T + b ----
// y (M,F)  x (M,K)  w (F,K)  b (F) or nullptr
void linear_forward(float* y, const float* x, const float* w, const float* b, int M, int K, int F);
void linear_forward_ref(float* y, const float* x, const float* w, const float* b, int M, int K, int F);
// dx (M,K) += dy W ; dw (F,K) += dy^T x ; db (F) += sum_rows dy
void linear_backward(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w, int M, int K,
                     int F);
void linear_backward_ref(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w, int M,
                         int K, int F);

// ---- layernorm over the last dim ----
// y (M,C)  mean (M)  rstd (M) saved for backward  x (M,C)  w (C)  b (C)
void layernorm_forward(float* y, float* mean, float* rstd, const float* x, const float* w, const float* b, int M,
                       int C, float eps);
void layernorm_forward_ref(float* y, float* mean, float* rstd, const float* x, const float* w, const float* b, int M,
                           int C, float eps);
void layernorm_backward(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w,
                        const float* mean, const float* rstd, int M, int C);
void layernorm_backward_ref(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w,
                            const float* mean, const float* rstd, int M, int C);

// ---- GELU, exact (erf) form as torch.nn.GELU() ----
// y (n)  x (n)
void gelu_forward(float* y, const float* x, int64_t n);
void gelu_forward_ref(float* y, const float* x, int64_t n);
void gelu_backward(float* dx, const float* dy, const float* x, int64_t n);
void gelu_backward_ref(float* dx, const float* dy, const float* x, int64_t n);

// ---- multi-head softmax self-attention core (timm Attention between qkv and proj) ----
// qkv (B,N,3C) laid out as timm: [..., s*C + h*d + i] for s in {q,k,v}; out (B,N,C) with heads
// concatenated [h*d + i]; att (B,H,N,N) softmax probabilities saved for backward; scale = d^-0.5.
void attention_forward(float* out, float* att, const float* qkv, int B, int N, int C, int H);
void attention_forward_ref(float* out, float* att, const float* qkv, int B, int N, int C, int H);
// dqkv (B,N,3C) += ; scratch: at least B*H*N*N floats of work space (fast path; ref may ignore it)
void attention_backward(float* dqkv, float* scratch, const float* dout, const float* qkv, const float* att, int B,
                        int N, int C, int H);
void attention_backward_ref(float* dqkv, float* scratch, const float* dout, const float* qkv, const float* att, int B,
                            int N, int C, int H);

// ---- patch embedding: conv with kernel = stride = p, no padding, then flatten(2).transpose(1,2) ----
// out (B,P,C), P = (S/p)^2 for square images of side S (rows first); img (B,Cin,S,S); w (C,Cin,p,p); b (C)
// cols (B*P, Cin*p*p) is work space (im2col), kept for backward.
void patch_embed_forward(float* out, float* cols, const float* img, const float* w, const float* b, int B, int Cin,
                         int S, int p, int C);
void patch_embed_forward_ref(float* out, float* cols, const float* img, const float* w, const float* b, int B,
                             int Cin, int S, int p, int C);
// dw, db += ; dimg (B,Cin,S,S) += (may be nullptr). cols as filled by forward.
void patch_embed_backward(float* dimg, float* dw, float* db, const float* dout, const float* cols, const float* w,
                          int B, int Cin, int S, int p, int C);
void patch_embed_backward_ref(float* dimg, float* dw, float* db, const float* dout, const float* cols,
                              const float* w, int B, int Cin, int S, int p, int C);

// ---- softmax cross-entropy with label smoothing (timm LabelSmoothingCrossEntropy) ----
// loss_b = (1-s) * (-log p[target]) + s * mean_v(-log p[v]); returns the mean over B.
// probs (B,V) saved; logits (B,V); targets (B)
float cross_entropy_forward(float* probs, const float* logits, const int* targets, int B, int V, float smoothing);
float cross_entropy_forward_ref(float* probs, const float* logits, const int* targets, int B, int V,
                                float smoothing);
// dlogits (B,V) += dloss * d(mean loss)/dlogits
void cross_entropy_backward(float* dlogits, const float* probs, const int* targets, int B, int V, float smoothing,
                            float dloss);
void cross_entropy_backward_ref(float* dlogits, const float* probs, const int* targets, int B, int V,
                                float smoothing, float dloss);

// ---- elementwise helpers ----
void add_inplace(float* y, const float* x, int64_t n);  // y += x

}  // namespace sav::cpu
