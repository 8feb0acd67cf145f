// shiftaddvit: a linear layer that is dense, shift (DeepShift-PS) or a mixture of a dense and a shift
// expert (MoE with a trained router and the latency-aware load-balancing loss). The models hold one
// LinearLayer per linear and never look inside.
//
//   LinearLayer fc1("blocks.0.mlp.fc1", /*K*/ 96, /*F*/ 192, LinearKind::moe);
//   fc1.declare(params);  params.allocate();  grads = params.like();  fc1.bind(params, grads);
//   fc1.init_from_dense(w, b);                 // conversion from a pre-trained nn.Linear
//   fc1.forward(y, x, M, /*train*/ true, &rng);  // x must stay alive until backward
//   fc1.backward(dx, dy);                      // accumulates dx and the parameter gradients
//   loss += fc1.aux_loss();                    // coef * L_lb of the last forward (MoE only)
//
// Checkpoint names (suffixes of the prefix):
//   dense: .weight (F,K) .bias (F)
//   shift: .p (F,K) float exponents, .s (F,K) float signs, .bias (F)   (5-bit packed on export: .codes)
//   moe:   .router.weight (2,K) .router.bias (2), .experts.0.weight (F,K) .experts.0.bias (F),
//          .experts.1.p .experts.1.s (F,K) .experts.1.bias (F)          expert 0 = mult, 1 = shift
//
// Release compatibility (ReparamOptions::release_compat, inference only; models/release_pvt.h): what the
// public ShiftAddViT release computes, where it differs from METHOD.md:
//   moe:   the token goes to argmax of the router logits, the gate is the constant 1.0 (no probability
//          scaling), and every expert output y is combined as log(exp(y) + 2.220446049250313e-16) in
//          float32 (an approximate identity; it floors outputs near -36.04 and overflows above ~88.7);
//   shift: input and bias go to fixed point first, v -> clamp(floor(v * 2^16) / 2^16, -32768, 32767),
//          then y = x_fixed W^T + bias_fixed in float32 with W = sign(round(s)) * 2^round(clamp(p)) (the
//          same W as the float path). The integer kernel (int_kernel) is not used in this mode.
// Legend: M rows (tokens), K in-features, F out-features, E = 2 experts.
#pragma once

#include <string>
#include <vector>

#include "core/rng.h"
#include "models/params.h"
#include "ops/cpu/moe.h"
#include "ops/cpu/shift_linear.h"

namespace sav {

enum class LinearKind { dense, shift, moe };
LinearKind linear_kind_from_string(const std::string& s);  // "dense" | "shift" | "moe"
LinearKind linear_kind_from_char(char c);                  // 'd' | 's' | 'm' (per-block kind strings)
const char* linear_kind_name(LinearKind k);

struct ReparamOptions {
  int pmin = cpu::shift_default_pmin, pmax = cpu::shift_default_pmax;
  bool int_kernel = false;  // inference: run shift experts with the integer MatShift kernel
  int frac_bits = cpu::shift_default_frac_bits;
  cpu::MoeGateMode gate = cpu::moe_gate_straight_through;
  float noise_std = 0.5f;   // router noise while training (1/E)
  float lb_coef = cpu::moe_lb_default_coef;
  float alpha[2] = {1.0f, 1.0f};  // per-expert latency factors (mult, shift)
  // Reproduce the public release's outputs (see the header comment; inference only: a training forward
  // of a shift or MoE layer throws). Set for checkpoints of the release; stored in checkpoint metadata
  // as sav.reparam.release_compat = 1.
  bool release_compat = false;
};

// The release's fixed-point rounding of shift-layer inputs and biases (Q16.16, floor, clamped).
float release_fixed_point(float v);
// The release's MoE combine of one expert output: log(exp(y) + 2.220446049250313e-16) in float32.
float release_moe_combine(float y);

class LinearLayer {
 public:
  LinearLayer(std::string prefix, int K, int F, LinearKind kind, const ReparamOptions* opt);
  LinearKind kind() const { return kind_; }
  const std::string& prefix() const { return prefix_; }
  int in_features() const { return K_; }
  int out_features() const { return F_; }

  void declare(ParamSet& ps) const;
  void bind(const ParamSet& params, const ParamSet& grads);
  // w (F,K), b (F): sets every expert from a dense layer (shift: p = round(log2|w|), s = sign(w)); the
  // router starts at zero (equal probabilities).
  void init_from_dense(const float* w, const float* b);

  // y (M,F) overwritten; x (M,K) kept by pointer for backward.
  void forward(float* y, const float* x, int M, bool train, Rng* rng);
  // dx (M,K) += (nullptr: skip); dy (M,F). Parameter gradients accumulate into the bound grads.
  void backward(float* dx, const float* dy);
  float aux_loss() const { return aux_loss_; }
  // Tokens per expert in the last forward (MoE), else empty.
  const std::vector<int>& expert_counts() const { return counts_; }
  const std::vector<int>& last_choice() const { return choice_; }  // (M) expert of each token (MoE)
  void params_changed() { kernel_ready_ = false; }  // after an optimizer step

 private:
  void decode_weights();  // wdec_ = the shift expert's float weights s * 2^p (inference paths)
  void expert_forward(int e, float* y, const float* x, int M, bool train);
  void expert_backward(int e, float* dx, const float* dy, const float* x, int M);
  std::string prefix_;
  int K_, F_;
  LinearKind kind_;
  const ReparamOptions* opt_;
  // bound pointers
  float *w_ = nullptr, *b_ = nullptr, *dw_ = nullptr, *db_ = nullptr;          // dense / expert 0
  float *p_ = nullptr, *s_ = nullptr, *sb_ = nullptr, *dp_ = nullptr, *ds_ = nullptr, *dsb_ = nullptr;  // shift
  float *rw_ = nullptr, *rb_ = nullptr, *drw_ = nullptr, *drb_ = nullptr;      // router
  // saved by forward
  const float* x_ = nullptr;
  int M_ = 0;
  bool train_ = false;
  std::vector<float> scratch_, logits_, noisy_, probs_, scale_, xg_[2], yg_[2];
  std::vector<int> choice_, counts_, offsets_, idx_;
  float aux_loss_ = 0.0f;
  cpu::ShiftKernelWeights kernel_;  // integer kernel weights (inference, int_kernel)
  std::vector<float> wdec_;          // decoded float weights (inference, float path)
  std::vector<float> xfix_, bfix_;   // fixed-point input and bias (release_compat)
  bool kernel_ready_ = false;        // kernel_ / wdec_ match the current p, s
};

}  // namespace sav
