// shiftaddvit: mixture-of-experts plumbing on the CPU (METHOD.md section 3): the router, top-1 dispatch
// (route, gather, scatter), gate scaling, and the latency-aware load-balancing loss.
//
// The experts themselves are ordinary linears (dense = expert 0, shift = expert 1) that the caller runs
// on each expert's contiguous batch of gathered rows; this file provides everything around them.
//
// Shape legend: M tokens (rows, = B*N), C in-features, F out-features, E experts (2 in ShiftAddViT:
// 0 = mult/dense, 1 = shift; any E >= 1 works), n_e = counts[e] tokens routed to expert e.
//
// One MoE linear, forward (training: noise_std = moe_default_noise_std(E); eval: noise_std = 0):
//   moe_router_forward(logits, noisy, probs, choice, x, w_r, b_r, M, C, E, noise_std, &rng);
//   moe_route(counts, offsets, idx, choice, M, E);
//   moe_gate_forward(scale, probs, choice, M, E, moe_gate_prob);
//   for (int e = 0; e < E; ++e) {
//     const int* ie = idx + offsets[e];
//     moe_gather(xg[e], x, ie, counts[e], C);            // xg[e] (n_e, C)
//     expert_forward(e, yg[e], xg[e], counts[e]);          // yg[e] (n_e, F), the caller's linear
//     moe_scatter(y, yg[e], ie, scale, counts[e], F);      // y (M, F): every row written once overall
//   }
//   float lb = moe_lb_loss_forward(nullptr, nullptr, probs, logits, noisy, choice, alpha, M, E, noise_std);
//   total_loss = task_loss + moe_lb_default_coef * lb;
// Backward (dprobs (M,E), dlogits (M,E), dscale (M) zeroed first):
//   for e: moe_scatter_backward(dyg[e], dscale, dy, yg[e], ie, scale, counts[e], F);
//          expert_backward(e, dxg[e], ...);  moe_gather_backward(dx, dxg[e], ie, counts[e], C);
//   moe_gate_backward(dprobs, dscale, probs, choice, M, E, moe_gate_prob);
//   moe_lb_loss_backward(dprobs, dlogits, probs, logits, noisy, choice, alpha, M, E, noise_std,
//                        moe_lb_default_coef);
//   moe_router_backward(dx, dw_r, db_r, dlogits, dprobs, probs, x, w_r, M, C, E);
//
// Conventions as in ops.h: `*_ref` is the plain-loop spec, the unsuffixed name the fast path (sgemm,
// OpenMP over rows); outputs of forwards are overwritten; backwards ACCUMULATE (+=) and skip nullptr
// gradients; everything is contiguous row-major float32 with dimensions passed explicitly.
//
// Router. logits = x W_r^T + b_r; noisy = logits + noise, noise_te = noise_std * N(0,1) drawn serially
// from `rng` in row-major (t, e) order (so a seed fixes the routing, whatever the thread count);
// probs = softmax(noisy); choice_t = argmax_e noisy_te (ties -> the lowest index). With noise_std == 0
// (eval, or noise disabled) noisy == logits and no random numbers are drawn. The noise is a constant
// added to the logits, so d/dlogits == d/dnoisy.
//
// Gate scaling (p_t = probs[t, choice_t]), y_t = scale_t * expert_{choice_t}(x_t):
//   moe_gate_prob:              scale_t = p_t.
//                               backward: d expert_out_t = scale_t * dy_t, dp_t = <dy_t, expert_out_t>.
//   moe_gate_straight_through:  scale_t = p_t / stop_grad(p_t) (= 1 in the forward: the converted model's
//                               output is unchanged).
//                               backward: d expert_out_t = dy_t,  dp_t = <dy_t, expert_out_t> / p_t.
// moe_scatter_backward produces dscale_t = <dy_t, expert_out_t> and d expert_out_t = scale_t * dy_t for
// both modes; moe_gate_backward maps dscale to dprobs (times 1, or divided by p_t).
//
// Latency-aware load-balancing loss (alpha_e = latency factor of expert e, nullptr = all 1):
//   L_lb = CV2(alpha * Importance) + CV2(alpha * Load)
//   CV2(z) = Var(z) / (Mean(z)^2 + 1e-10), Var the UNBIASED variance (divides by E-1), as torch's .var()
//            in the reference release; CV2 = 0 when E == 1.
//   Importance_e = sum_t probs[t,e]  (the router probabilities passed in: noisy in training).
//   Load_e       = sum_t P_te with, when noise_std > 0 (training), the smooth top-1 probability of
//                  Shazeer et al.'s noisy gating: resampling only expert e's noise, the token goes to e iff
//                  logits_te + n > thr_te, thr_te = max_{j != e} noisy_tj, so
//                      P_te = Phi((logits_te - thr_te) / noise_std),  Phi the standard normal CDF;
//                  gradient: with u = (logits_te - thr_te)/noise_std and k = argmax_{j != e} noisy_tj,
//                      dP_te/dlogits_te = phi(u)/noise_std,  dP_te/dlogits_tk = -phi(u)/noise_std
//                  (the threshold moves with its own clean logit; noise is held fixed).
//                  When noise_std <= 0 (eval): Load_e = hard count of choice == e, no gradient.
//   dCV2/dz_e = 2 (z_e - mean) / ((E-1) D) - 2 Var mean / (E D^2),  D = mean^2 + 1e-10.
// Balance is reached when alpha_e Load_e is equal for all experts: the faster expert gets more tokens.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"

namespace sav::cpu {

enum MoeGateMode {
  moe_gate_prob = 0,              // y = p * expert(x)
  moe_gate_straight_through = 1,  // y = p / stop_grad(p) * expert(x)
};

constexpr float moe_lb_default_coef = 0.01f;  // weight of L_lb in the total loss (METHOD.md)
constexpr float moe_cv2_eps = 1e-10f;
inline float moe_default_noise_std(int E) { return 1.0f / static_cast<float>(E); }

// ---- router ----
// logits (M,E) clean, noisy (M,E) = logits + noise, probs (M,E) = softmax(noisy), choice (M) top-1;
// x (M,C)  w (E,C)  b (E) or nullptr; rng may be nullptr only when noise_std == 0.
void moe_router_forward(float* logits, float* noisy, float* probs, int* choice, const float* x, const float* w,
                        const float* b, int M, int C, int E, float noise_std, Rng* rng);
void moe_router_forward_ref(float* logits, float* noisy, float* probs, int* choice, const float* x,
                            const float* w, const float* b, int M, int C, int E, float noise_std, Rng* rng);
// dlogits (M,E) in/out work space: on entry the gradient w.r.t. the logits from other terms (the load
// loss; zeros otherwise), on exit += softmax backward of dprobs (M,E). Then dx (M,C) += dlogits W,
// dw (E,C) += dlogits^T x, db (E) += column sums of dlogits. probs (M,E) as from forward.
void moe_router_backward(float* dx, float* dw, float* db, float* dlogits, const float* dprobs, const float* probs,
                         const float* x, const float* w, int M, int C, int E);
void moe_router_backward_ref(float* dx, float* dw, float* db, float* dlogits, const float* dprobs,
                             const float* probs, const float* x, const float* w, int M, int C, int E);

// ---- dispatch ----
// counts (E), offsets (E+1) with offsets[0] = 0, offsets[E] = M; idx (M) a permutation of 0..M-1 grouped by
// expert, increasing token order inside each group (stable); choice (M) in [0, E).
void moe_route(int* counts, int* offsets, int* idx, const int* choice, int M, int E);
void moe_route_ref(int* counts, int* offsets, int* idx, const int* choice, int M, int E);

// xg (count,C): xg[r] = x[idx[r]]; x (M,C) (M is not needed); idx (count) = idx + offsets[e]
void moe_gather(float* xg, const float* x, const int* idx, int count, int C);
void moe_gather_ref(float* xg, const float* x, const int* idx, int count, int C);
// dx (M,C): dx[idx[r]] += dxg[r]; dxg (count,C)
void moe_gather_backward(float* dx, const float* dxg, const int* idx, int count, int C);
void moe_gather_backward_ref(float* dx, const float* dxg, const int* idx, int count, int C);

// y (M,F): y[idx[r]] = gate_scale[idx[r]] * yg[r] (overwrites those rows); yg (count,F);
// gate_scale (M) indexed by token, or nullptr for 1
void moe_scatter(float* y, const float* yg, const int* idx, const float* gate_scale, int count, int F);
void moe_scatter_ref(float* y, const float* yg, const int* idx, const float* gate_scale, int count, int F);
// dyg (count,F) += gate_scale[t] * dy[t];  dscale (M) [t] += <dy[t], yg[r]>, t = idx[r]; dy (M,F)
void moe_scatter_backward(float* dyg, float* dscale, const float* dy, const float* yg, const int* idx,
                          const float* gate_scale, int count, int F);
void moe_scatter_backward_ref(float* dyg, float* dscale, const float* dy, const float* yg, const int* idx,
                              const float* gate_scale, int count, int F);

// ---- gate scaling (O(M) loops, one version each) ----
// scale (M) from probs (M,E) and choice (M), see the mode formulas above
void moe_gate_forward(float* scale, const float* probs, const int* choice, int M, int E, MoeGateMode mode);
// dprobs (M,E) [t, choice_t] += dscale_t (prob) or dscale_t / p_t (straight-through)
void moe_gate_backward(float* dprobs, const float* dscale, const float* probs, const int* choice, int M, int E,
                       MoeGateMode mode);

// ---- latency-aware load-balancing loss ----
// Returns L_lb (without the coefficient). importance, load (E) optional outputs (nullptr to skip), before
// the alpha factors. probs (M,E), logits (M,E) clean, noisy (M,E), choice (M), alpha (E) or nullptr.
float moe_lb_loss_forward(float* importance, float* load, const float* probs, const float* logits,
                          const float* noisy, const int* choice, const float* alpha, int M, int E, float noise_std);
float moe_lb_loss_forward_ref(float* importance, float* load, const float* probs, const float* logits,
                              const float* noisy, const int* choice, const float* alpha, int M, int E,
                              float noise_std);
// dprobs (M,E) += dloss * dL_lb/dprobs (the Importance term); dlogits (M,E) += dloss * dL_lb/dlogits (the
// smooth Load term; nothing when noise_std <= 0). dloss = d(total)/d(L_lb), i.e. the coefficient.
void moe_lb_loss_backward(float* dprobs, float* dlogits, const float* probs, const float* logits,
                          const float* noisy, const int* choice, const float* alpha, int M, int E, float noise_std,
                          float dloss);
void moe_lb_loss_backward_ref(float* dprobs, float* dlogits, const float* probs, const float* logits,
                              const float* noisy, const int* choice, const float* alpha, int M, int E,
                              float noise_std, float dloss);

// ---- report ----
struct MoeShares {
  int tokens = 0;
  std::vector<int> counts;    // (E) tokens per expert
  std::vector<float> shares;  // (E) counts / tokens (0 when there are no tokens)
};
// counts (E) as from moe_route
MoeShares moe_shares(const int* counts, int E);
// "e0 120 (46.9%)  e1 136 (53.1%)"
std::string moe_shares_str(const MoeShares& s);

}  // namespace sav::cpu
