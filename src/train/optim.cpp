#include "train/optim.h"

#include <cmath>

namespace sav {

AdamW::AdamW(const ParamSet& params, const AdamWOptions& opt) : opt_(opt), m_(params.like()), v_(params.like()) {}

void AdamW::step(ParamSet& params, const ParamSet& grads, float lr) {
  ++t_;
  const float b1 = opt_.beta1, b2 = opt_.beta2, eps = opt_.eps;
  const float bc1 = 1.0f - std::pow(b1, static_cast<float>(t_));
  const float bc2 = 1.0f - std::pow(b2, static_cast<float>(t_));
  for (size_t i = 0; i < params.size(); ++i) {
    float* p = params.tensor(i).f32();
    const float* g = grads.tensor(i).f32();
    float* m = m_.tensor(i).f32();
    float* v = v_.tensor(i).f32();
    const float decay = params.decay(i) ? 1.0f - lr * opt_.weight_decay : 1.0f;
    const int64_t n = params.tensor(i).numel();
#pragma omp parallel for simd if (n > 65536)
    for (int64_t j = 0; j < n; ++j) {
      m[j] = b1 * m[j] + (1.0f - b1) * g[j];
      v[j] = b2 * v[j] + (1.0f - b2) * g[j] * g[j];
      const float mh = m[j] / bc1, vh = v[j] / bc2;
      p[j] = p[j] * decay - lr * mh / (std::sqrt(vh) + eps);
    }
  }
}

float cosine_lr(int64_t step, int64_t total, int64_t warmup, float base, float min_lr) {
  if (warmup > 0 && step < warmup) return base * static_cast<float>(step + 1) / static_cast<float>(warmup);
  if (total <= warmup) return base;
  double t = static_cast<double>(step - warmup) / static_cast<double>(total - warmup);
  if (t > 1.0) t = 1.0;
  return static_cast<float>(min_lr + 0.5 * (base - min_lr) * (1.0 + std::cos(M_PI * t)));
}

float clip_grad_norm(ParamSet& grads, float max_norm) {
  const float* g = grads.flat();
  const int64_t n = grads.numel();
  double ss = 0.0;
#pragma omp parallel for reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += double(g[i]) * g[i];
  const float norm = static_cast<float>(std::sqrt(ss));
  if (max_norm > 0.0f && norm > max_norm && std::isfinite(norm)) {
    const float s = max_norm / (norm + 1e-6f);
    float* gw = grads.flat();
#pragma omp parallel for
    for (int64_t i = 0; i < n; ++i) gw[i] *= s;
  }
  return norm;
}

int first_nonfinite(const ParamSet& grads) {
  for (size_t i = 0; i < grads.size(); ++i) {
    const float* g = grads.tensor(i).f32();
    for (int64_t j = 0, n = grads.tensor(i).numel(); j < n; ++j)
      if (!std::isfinite(g[j])) return static_cast<int>(i);
  }
  return -1;
}

}  // namespace sav
