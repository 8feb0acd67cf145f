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
};

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
  bool kernel_ready_ = false;        // kernel_ / wdec_ match the current p, s
};

}  // namespace sav
