#include "nn/linear_layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "ops/cpu/ops.h"

namespace sav {

LinearKind linear_kind_from_string(const std::string& s) {
  if (s == "dense") return LinearKind::dense;
  if (s == "shift") return LinearKind::shift;
  if (s == "moe") return LinearKind::moe;
  SAV_THROW("unknown linear kind '" << s << "'; use dense, shift or moe");
}

LinearKind linear_kind_from_char(char c) {
  switch (c) {
    case 'd': return LinearKind::dense;
    case 's': return LinearKind::shift;
    case 'm': return LinearKind::moe;
  }
  SAV_THROW("unknown linear kind '" << c << "' (use d, s or m)");
}

const char* linear_kind_name(LinearKind k) {
  switch (k) {
    case LinearKind::dense: return "dense";
    case LinearKind::shift: return "shift";
    case LinearKind::moe: return "moe";
  }
  return "?";
}

float release_fixed_point(float v) {
  // floor(v / 2^-16) * 2^-16: both scalings are exact in float32, so only the floor rounds
  const float r = std::floor(v * 65536.0f) * (1.0f / 65536.0f);
  return std::clamp(r, -32768.0f, 32767.0f);
}

float release_moe_combine(float y) {
  // the release adds numpy's float64 machine epsilon to a float32 tensor: the sum is float32
  return std::log(std::exp(y) + 2.220446049250313e-16f);
}

LinearLayer::LinearLayer(std::string prefix, int K, int F, LinearKind kind, const ReparamOptions* opt)
    : prefix_(std::move(prefix)), K_(K), F_(F), kind_(kind), opt_(opt) {
  SAV_CHECK(opt_ != nullptr, "LinearLayer needs options");
}

void LinearLayer::declare(ParamSet& ps) const {
  const std::string& p = prefix_;
  switch (kind_) {
    case LinearKind::dense:
      ps.declare(p + ".weight", {F_, K_});
      ps.declare(p + ".bias", {F_}, false);
      break;
    case LinearKind::shift:
      ps.declare(p + ".p", {F_, K_}, false);  // exponents and signs take no weight decay
      ps.declare(p + ".s", {F_, K_}, false);
      ps.declare(p + ".bias", {F_}, false);
      break;
    case LinearKind::moe:
      ps.declare(p + ".router.weight", {2, K_});
      ps.declare(p + ".router.bias", {2}, false);
      ps.declare(p + ".experts.0.weight", {F_, K_});
      ps.declare(p + ".experts.0.bias", {F_}, false);
      ps.declare(p + ".experts.1.p", {F_, K_}, false);
      ps.declare(p + ".experts.1.s", {F_, K_}, false);
      ps.declare(p + ".experts.1.bias", {F_}, false);
      break;
  }
}

void LinearLayer::bind(const ParamSet& params, const ParamSet& grads) {
  auto P = [&](const std::string& n) { return params.get(prefix_ + n).f32(); };
  auto G = [&](const std::string& n) { return grads.get(prefix_ + n).f32(); };
  switch (kind_) {
    case LinearKind::dense:
      w_ = P(".weight"), b_ = P(".bias"), dw_ = G(".weight"), db_ = G(".bias");
      break;
    case LinearKind::shift:
      p_ = P(".p"), s_ = P(".s"), sb_ = P(".bias"), dp_ = G(".p"), ds_ = G(".s"), dsb_ = G(".bias");
      break;
    case LinearKind::moe:
      rw_ = P(".router.weight"), rb_ = P(".router.bias"), drw_ = G(".router.weight"), drb_ = G(".router.bias");
      w_ = P(".experts.0.weight"), b_ = P(".experts.0.bias"), dw_ = G(".experts.0.weight"), db_ = G(".experts.0.bias");
      p_ = P(".experts.1.p"), s_ = P(".experts.1.s"), sb_ = P(".experts.1.bias");
      dp_ = G(".experts.1.p"), ds_ = G(".experts.1.s"), dsb_ = G(".experts.1.bias");
      break;
  }
  kernel_ready_ = false;
}

void LinearLayer::init_from_dense(const float* w, const float* b) {
  const size_t n = size_t(F_) * K_;
  if (w_) std::memcpy(w_, w, n * sizeof(float));
  if (b_) std::memcpy(b_, b, F_ * sizeof(float));
  if (p_) {
    cpu::shift_from_dense(p_, s_, w, F_, K_, opt_->pmin, opt_->pmax);
    std::memcpy(sb_, b, F_ * sizeof(float));
  }
  if (rw_) {
    std::fill(rw_, rw_ + 2 * K_, 0.0f);
    rb_[0] = rb_[1] = 0.0f;
  }
  kernel_ready_ = false;
}

void LinearLayer::decode_weights() {
  wdec_.resize(size_t(F_) * K_);
  cpu::shift_linear_weights(wdec_.data(), p_, s_, F_, K_, opt_->pmin, opt_->pmax);
}

void LinearLayer::expert_forward(int e, float* y, const float* x, int M, bool train) {
  if (M == 0) return;
  if (e == 0) {
    cpu::linear_forward(y, x, w_, b_, M, K_, F_);
    return;
  }
  if (opt_->release_compat) {  // inference only (forward checks): fixed-point input and bias, float product
    if (!kernel_ready_) {
      decode_weights();
      bfix_.resize(F_);
      for (int j = 0; j < F_; ++j) bfix_[j] = release_fixed_point(sb_[j]);
      kernel_ready_ = true;
    }
    xfix_.resize(size_t(M) * K_);
    const int64_t n = int64_t(M) * K_;
#pragma omp parallel for if (n >= 32768)
    for (int64_t i = 0; i < n; ++i) xfix_[i] = release_fixed_point(x[i]);
    cpu::linear_forward(y, xfix_.data(), wdec_.data(), bfix_.data(), M, K_, F_);
    return;
  }
  if (!train && opt_->int_kernel) {
    if (!kernel_ready_) {
      kernel_ = cpu::shift_kernel_prepare(p_, s_, F_, K_, opt_->pmin, opt_->pmax);
      kernel_ready_ = true;
    }
    const int f = cpu::shift_linear_int_frac_bits(x, M, K_, opt_->frac_bits);
    cpu::shift_linear_forward_int(y, x, kernel_, sb_, M, K_, F_, f);
    return;
  }
  if (!train) {  // inference, float path: decode the 5-bit weights once, then a BLAS product
    if (!kernel_ready_) {
      decode_weights();
      kernel_ready_ = true;
    }
    cpu::linear_forward(y, x, wdec_.data(), sb_, M, K_, F_);
    return;
  }
  scratch_.resize(size_t(2) * F_ * K_);
  cpu::shift_linear_forward(y, x, p_, s_, sb_, M, K_, F_, opt_->pmin, opt_->pmax, scratch_.data());
}

void LinearLayer::expert_backward(int e, float* dx, const float* dy, const float* x, int M) {
  if (M == 0) return;
  if (e == 0) {
    cpu::linear_backward(dx, dw_, db_, dy, x, w_, M, K_, F_);
  } else {
    scratch_.resize(size_t(2) * F_ * K_);
    cpu::shift_linear_backward(dx, dp_, ds_, dsb_, dy, x, p_, s_, M, K_, F_, opt_->pmin, opt_->pmax, scratch_.data());
  }
}

void LinearLayer::forward(float* y, const float* x, int M, bool train, Rng* rng) {
  x_ = x;
  M_ = M;
  train_ = train;
  aux_loss_ = 0.0f;
  if (train) kernel_ready_ = false;
  if (kind_ == LinearKind::dense) return expert_forward(0, y, x, M, train);
  SAV_CHECK(!(train && opt_->release_compat),
            prefix_ << ": the release compatibility mode (release_compat) is inference-only: it reproduces "
                       "the outputs of a release checkpoint and cannot train");
  if (kind_ == LinearKind::shift) return expert_forward(1, y, x, M, train);
  const int E = 2;
  const float noise = train ? opt_->noise_std : 0.0f;
  logits_.resize(size_t(M) * E), noisy_.resize(size_t(M) * E), probs_.resize(size_t(M) * E);
  choice_.resize(M), counts_.resize(E), offsets_.resize(E + 1), idx_.resize(M), scale_.resize(M);
  cpu::moe_router_forward(logits_.data(), noisy_.data(), probs_.data(), choice_.data(), x, rw_, rb_, M, K_, E, noise,
                          rng);
  cpu::moe_route(counts_.data(), offsets_.data(), idx_.data(), choice_.data(), M, E);
  cpu::moe_gate_forward(scale_.data(), probs_.data(), choice_.data(), M, E, opt_->gate);
  // release: gate 1.0 (the argmax of the noise-free logits is the choice already)
  const float* scale = opt_->release_compat ? nullptr : scale_.data();
  for (int e = 0; e < E; ++e) {
    const int n = counts_[e];
    const int* idx = idx_.data() + offsets_[e];
    xg_[e].resize(size_t(n) * K_);
    yg_[e].resize(size_t(n) * F_);
    cpu::moe_gather(xg_[e].data(), x, idx, n, K_);
    expert_forward(e, yg_[e].data(), xg_[e].data(), n, train);
    cpu::moe_scatter(y, yg_[e].data(), idx, scale, n, F_);
  }
  if (opt_->release_compat) {  // every row was written by exactly one expert
    const int64_t n = int64_t(M) * F_;
#pragma omp parallel for if (n >= 32768)
    for (int64_t i = 0; i < n; ++i) y[i] = release_moe_combine(y[i]);
  }
  if (train && opt_->lb_coef > 0.0f)
    aux_loss_ = opt_->lb_coef * cpu::moe_lb_loss_forward(nullptr, nullptr, probs_.data(), logits_.data(), noisy_.data(),
                                                         choice_.data(), opt_->alpha, M, E, noise);
}

void LinearLayer::backward(float* dx, const float* dy) {
  SAV_CHECK(train_, "LinearLayer::backward after a forward without train=true (" << prefix_ << ")");
  const int M = M_;
  if (kind_ == LinearKind::dense) return expert_backward(0, dx, dy, x_, M);
  if (kind_ == LinearKind::shift) return expert_backward(1, dx, dy, x_, M);
  const int E = 2;
  std::vector<float> dscale(M, 0.0f), dprobs(size_t(M) * E, 0.0f), dlogits(size_t(M) * E, 0.0f);
  for (int e = 0; e < E; ++e) {
    const int n = counts_[e];
    if (n == 0) continue;
    const int* idx = idx_.data() + offsets_[e];
    std::vector<float> dyg(size_t(n) * F_, 0.0f), dxg(size_t(n) * K_, 0.0f);
    cpu::moe_scatter_backward(dyg.data(), dscale.data(), dy, yg_[e].data(), idx, scale_.data(), n, F_);
    expert_backward(e, dx ? dxg.data() : nullptr, dyg.data(), xg_[e].data(), n);
    if (dx) cpu::moe_gather_backward(dx, dxg.data(), idx, n, K_);
  }
  cpu::moe_gate_backward(dprobs.data(), dscale.data(), probs_.data(), choice_.data(), M, E, opt_->gate);
  if (opt_->lb_coef > 0.0f)
    cpu::moe_lb_loss_backward(dprobs.data(), dlogits.data(), probs_.data(), logits_.data(), noisy_.data(),
                              choice_.data(), opt_->alpha, M, E, opt_->noise_std, opt_->lb_coef);
  cpu::moe_router_backward(dx, drw_, drb_, dlogits.data(), dprobs.data(), probs_.data(), x_, rw_, M, K_, E);
}

}  // namespace sav
