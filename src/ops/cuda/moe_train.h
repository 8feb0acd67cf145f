// shiftaddvit CUDA backend: shift and MoE(mult, shift) linears for training, float32 (METHOD.md sections 2
// and 3; specs: ops/cpu/shift_linear.h and ops/cpu/moe.h, whose headers state the formulas).
//
// The products are cuda::Blas (blas.h); these kernels are everything around them.
//
// Shift linear (training keeps float exponents p and signs s, (F,K)):
//   shift_decode_f32(W, p, s, F*K, pmin, pmax, stream);       // W = sign(round(s)) * 2^clamp(round(p)) (exact)
//   y = x W^T + b                                              // Blas
//   dW = dy^T x (into a scratch);  dx += dy W                  // Blas
//   shift_weight_backward_f32(dp, ds, dW, p, s, F*K, pmin, pmax, stream);
//
// MoE linear, both experts computed for EVERY row (so no host round trip and no gather; the row results are
// the same as the CPU's gathered products, up to the products' summation order), the router a third product:
//   y0 = x W0^T + b0;  y1 = x W1^T + b1;  rl = x Wr^T      (Blas; W1 decoded as above; rl (M,2), no bias)
//   moe_train_route(logits, noisy, probs, choice, scale, rl, br, noise, M, gate, stream);
//   moe_train_combine(y, ldy, y0, y1, choice, scale, M, F, accumulate, stream);
//   moe_lb_forward(stats, aux, probs, logits, noisy, choice, alpha0, alpha1, M, noise_std, coef, ws, stream);
// backward (dy (M,F)):
//   moe_train_split_backward(dy0, dy1, dscale, dy, lddy, y0, y1, choice, scale, M, F, stream);
//   moe_train_router_backward(dlogits, dscale, probs, logits, noisy, choice, stats, alpha0, alpha1, M,
//                             noise_std, coef, gate, stream);
//   then Blas: dW0 += dy0^T x, dx += dy0 W0, dW1 = dy1^T x -> shift_weight_backward, dx += dy1 W1,
//              dWr += dlogits^T x, dx += dlogits Wr; colsum for db0, db1 (dy0, dy1) and dbr (dlogits).
//
// Shape legend: M rows (tokens), K in-features, F out-features, E = 2 experts (0 mult, 1 shift); n = F*K.
// Conventions as ops/cuda/train_ops.h: device pointers, f32 (choice int32), checked launches, deterministic
// (no float atomics, fixed summation orders), bad sizes throw before launching, M = 0 launches nothing.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ops/cpu/moe.h"  // cpu::MoeGateMode
#include "ops/cuda/common.h"

namespace sav::cuda {

// ---- shift weights (spec: cpu::shift_linear_weights, and the dp/ds loop of cpu::shift_linear_backward) ----
// W (n) = sign(round_half_even(s)) * 2^clamp(round_half_even(p), pmin, pmax); NaN p counts as pmin, NaN s as 0.
// Bit-exact with the CPU.
void shift_decode_f32(float* W, const float* p, const float* s, int64_t n, int pmin, int pmax, cudaStream_t stream);
// dp (n) += dW * (sign_r * 2^p_r * ln2);  ds (n) += dW * 2^p_r  (either may be nullptr). Bit-exact with the CPU
// for the same dW (the same float expression, no contraction).
void shift_weight_backward_f32(float* dp, float* ds, const float* dW, const float* p, const float* s, int64_t n,
                               int pmin, int pmax, cudaStream_t stream);

// ---- MoE routing (spec: cpu::moe_router_forward + cpu::moe_gate_forward, E = 2) ----
// logits (M,2) = rl + br;  noisy (M,2) = logits + noise (noise (M,2), or nullptr: no noise);
// probs (M,2) = softmax(noisy) computed as the CPU (subtract the max, exp, divide by the sum via 1/sum);
// choice (M) = argmax noisy (ties -> 0); scale (M) = 1 (straight-through) or probs[t, choice_t] (prob).
// rl (M,2) rows contiguous; br (2).
void moe_train_route(float* logits, float* noisy, float* probs, int* choice, float* scale, const float* rl,
                     const float* br, const float* noise, int M, sav::cpu::MoeGateMode gate, cudaStream_t stream);
// y (M,F) rows ldy apart: y[t] = scale_t * (choice_t == 0 ? y0[t] : y1[t])  (=, or += when accumulate);
// y0, y1 (M,F) contiguous.
void moe_train_combine(float* y, int ldy, const float* y0, const float* y1, const int* choice, const float* scale,
                       int M, int F, bool accumulate, cudaStream_t stream);

// ---- latency-aware load-balancing loss (spec: cpu::moe_lb_loss_forward / _backward, E = 2) ----
// stats (4) = {Importance_0, Importance_1, Load_0, Load_1} in f32 (sums in double over fixed chunks, chunk
// partials added in order), saved for backward; aux (1) = coef * L_lb (f32). Load is the smooth
// Phi((logits_te - noisy_t,other) / noise_std) when noise_std > 0, else the hard count of choice.
// alpha0, alpha1: the experts' latency factors. ws: moe_lb_workspace_doubles(M) doubles.
void moe_lb_forward(float* stats, float* aux, const float* probs, const float* logits, const float* noisy,
                    const int* choice, float alpha0, float alpha1, int M, float noise_std, float coef, double* ws,
                    cudaStream_t stream);
size_t moe_lb_workspace_doubles(int M);

// ---- backward ----
// dy0, dy1 (M,F) = (OVERWRITTEN): dy_e[t] = (choice_t == e) ? scale_t * dy[t] : 0;
// dscale (M) = <dy[t], y_{choice_t}[t]> (f32 sum over j in order). dy rows lddy apart; y0, y1 contiguous.
void moe_train_split_backward(float* dy0, float* dy1, float* dscale, const float* dy, int lddy, const float* y0,
                              const float* y1, const int* choice, const float* scale, int M, int F,
                              cudaStream_t stream);
// dlogits (M,2) = (OVERWRITTEN) the gradient w.r.t. the router logits (= w.r.t. noisy, the noise is constant):
//   dprobs[t, choice_t] = dscale_t (prob gate) or dscale_t / p_t (straight-through)   (cpu::moe_gate_backward)
//   dprobs += coef * dL_lb/dprobs (the Importance term, from stats)                   (cpu::moe_lb_loss_backward)
//   dlogits = softmax backward of dprobs: p_e (dprobs_e - sum_k p_k dprobs_k)         (cpu::moe_router_backward)
//   dlogits += coef * dL_lb/dlogits (the smooth Load term, only when noise_std > 0)
// (coef = 0: no load-balancing terms.)
void moe_train_router_backward(float* dlogits, const float* dscale, const float* probs, const float* logits,
                               const float* noisy, const int* choice, const float* stats, float alpha0, float alpha1,
                               int M, float noise_std, float coef, sav::cpu::MoeGateMode gate, cudaStream_t stream);

}  // namespace sav::cuda
