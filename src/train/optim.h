// shiftaddvit: AdamW, learning-rate schedule, gradient clipping.
//
//   sav::AdamW opt(params, {.lr = 1e-3f, .weight_decay = 0.05f});
//   float norm = sav::clip_grad_norm(grads, 1.0f);      // returns the norm before clipping
//   opt.step(params, grads, sav::cosine_lr(step, total, warmup, base_lr, min_lr));
#pragma once

#include <cstdint>

#include "models/params.h"

namespace sav {

struct AdamWOptions {
  float lr = 1e-3f;
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  float weight_decay = 0.05f;  // decoupled; applied only to tensors the ParamSet marks for decay
};

class AdamW {
 public:
  AdamW(const ParamSet& params, const AdamWOptions& opt);
  // One update with learning rate `lr` (the schedule's value for this step).
  void step(ParamSet& params, const ParamSet& grads, float lr);
  int64_t steps() const { return t_; }
  void set_steps(int64_t t) { t_ = t; }
  ParamSet& m() { return m_; }
  ParamSet& v() { return v_; }
  const AdamWOptions& options() const { return opt_; }

 private:
  AdamWOptions opt_;
  ParamSet m_, v_;
  int64_t t_ = 0;
};

// Linear warm-up from 0 to base over `warmup` steps, then cosine decay to min_lr at `total`.
float cosine_lr(int64_t step, int64_t total, int64_t warmup, float base, float min_lr);
// Scales grads so their global L2 norm is at most max_norm (<= 0: no clipping). Returns the norm before.
float clip_grad_norm(ParamSet& grads, float max_norm);
// Index of the first non-finite gradient tensor, or -1.
int first_nonfinite(const ParamSet& grads);

}  // namespace sav
