#include "train/optim.h"

#include <algorithm>
#include <cmath>
#include <vector>

// The update and the norm are long elementwise loops: one clone per instruction set (AVX-512, AVX2+FMA,
// baseline), picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SAV_OPTIM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SAV_OPTIM_CLONES
#endif

namespace sav {

namespace {

SAV_OPTIM_CLONES void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, float b1, float b2,
                                   float bc1, float bc2, float eps, float lr, float decay) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    m[j] = b1 * m[j] + (1.0f - b1) * g[j];
    v[j] = b2 * v[j] + (1.0f - b2) * g[j] * g[j];
    const float mh = m[j] / bc1, vh = v[j] / bc2;
    p[j] = p[j] * decay - lr * mh / (std::sqrt(vh) + eps);
  }
}

SAV_OPTIM_CLONES double sum_squares(const float* g, int64_t n) {
  double ss = 0.0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += double(g[i]) * g[i];
  return ss;
}

SAV_OPTIM_CLONES void scale_inplace(float* g, int64_t n, float s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) g[i] *= s;
}

// The loops run in fixed chunks (OpenMP over chunks when there are several), so per-chunk partial sums,
// and hence the results, do not depend on the thread count.
constexpr int64_t kChunk = 1 << 15;

}  // namespace

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
    const int64_t nchunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (nchunks > 2)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t lo = c * kChunk, len = std::min(kChunk, n - lo);
      adamw_update(p + lo, g + lo, m + lo, v + lo, len, b1, b2, bc1, bc2, eps, lr, decay);
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
  // Per-chunk partial sums added in chunk order: the norm does not depend on the thread count.
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(nchunks);
#pragma omp parallel for schedule(static) if (nchunks > 2)
  for (int64_t c = 0; c < nchunks; ++c) partial[c] = sum_squares(g + c * kChunk, std::min(kChunk, n - c * kChunk));
  double ss = 0.0;
  for (double x : partial) ss += x;
  const float norm = static_cast<float>(std::sqrt(ss));
  if (max_norm > 0.0f && norm > max_norm && std::isfinite(norm)) {
    const float s = max_norm / (norm + 1e-6f);
    float* gw = grads.flat();
#pragma omp parallel for schedule(static) if (nchunks > 2)
    for (int64_t c = 0; c < nchunks; ++c) scale_inplace(gw + c * kChunk, std::min(kChunk, n - c * kChunk), s);
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
