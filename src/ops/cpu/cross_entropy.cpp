// shiftaddvit: softmax cross-entropy with label smoothing (timm LabelSmoothingCrossEntropy) on the CPU.
//
// Shapes: logits, probs, dlogits (B,V)  targets (B) in [0, V).
//   logp = logits - logsumexp(logits),  loss_b = (1-s) * (-logp[t_b]) + s * mean_v(-logp[v]),
//   loss = mean_b loss_b,  dloss/dlogits[b,v] = (probs[b,v] - (1-s) [v == t_b] - s / V) / B.
// s = 0 is plain cross-entropy. Fast path: OpenMP over rows, vectorised exp; per-row losses are summed
// in row order, so the loss does not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/cpu/ops.h"
#include "ops/cpu/simd_math.h"

namespace sav::cpu {

namespace {

void check_cross_entropy(const int* targets, int B, int V, float smoothing) {
  SAV_CHECK_DIM(B);
  SAV_CHECK_DIM(V);
  SAV_CHECK(smoothing >= 0.0f && smoothing < 1.0f, "cross_entropy: smoothing must be in [0, 1), got " << smoothing);
  SAV_CHECK_PTR(targets);
  for (int b = 0; b < B; ++b)
    SAV_CHECK(targets[b] >= 0 && targets[b] < V,
              "cross_entropy: target " << targets[b] << " of sample " << b << " is outside [0, " << V << ")");
}

// Softmax of one row into probs; returns the row's smoothed loss.
SAV_SIMD_CLONES float ce_row(float* probs, const float* logits, int target,
                                                                          int V, float smoothing) {
  float mx = logits[0];
#pragma omp simd reduction(max : mx)
  for (int v = 0; v < V; ++v) mx = std::max(mx, logits[v]);
  float sum = 0.0f, sum_x = 0.0f;
#pragma omp simd reduction(+ : sum, sum_x)
  for (int v = 0; v < V; ++v) {
    const float e = detail::exp_approx(logits[v] - mx);
    probs[v] = e;
    sum += e;
    sum_x += logits[v];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int v = 0; v < V; ++v) probs[v] *= inv;
  const float lse = mx + std::log(sum);
  const float nll = lse - logits[target];
  const float smooth = lse - sum_x / static_cast<float>(V);  // mean_v(-logp[v])
  return (1.0f - smoothing) * nll + smoothing * smooth;
}

}  // namespace

// ---- reference ----

float cross_entropy_forward_ref(float* probs, const float* logits, const int* targets, int B, int V, float smoothing) {
  check_cross_entropy(targets, B, V, smoothing);
  double total = 0.0;
  for (int b = 0; b < B; ++b) {
    const float* x = logits + static_cast<int64_t>(b) * V;
    double mx = x[0];
    for (int v = 1; v < V; ++v) mx = std::max(mx, static_cast<double>(x[v]));
    double sum = 0.0;
    for (int v = 0; v < V; ++v) sum += std::exp(x[v] - mx);
    const double lse = mx + std::log(sum);
    double smooth = 0.0;
    for (int v = 0; v < V; ++v) {
      const double logp = x[v] - lse;
      if (probs) probs[static_cast<int64_t>(b) * V + v] = static_cast<float>(std::exp(logp));
      smooth -= logp;
    }
    smooth /= V;
    const double nll = lse - x[targets[b]];
    total += (1.0 - smoothing) * nll + smoothing * smooth;
  }
  return static_cast<float>(total / B);
}

void cross_entropy_backward_ref(float* dlogits, const float* probs, const int* targets, int B, int V, float smoothing,
                                float dloss) {
  check_cross_entropy(targets, B, V, smoothing);
  if (!dlogits) return;
  for (int b = 0; b < B; ++b)
    for (int v = 0; v < V; ++v) {
      const double p = probs[static_cast<int64_t>(b) * V + v];
      const double target = (v == targets[b] ? 1.0 - smoothing : 0.0) + static_cast<double>(smoothing) / V;
      dlogits[static_cast<int64_t>(b) * V + v] += static_cast<float>(dloss * (p - target) / B);
    }
}

// ---- fast path ----

float cross_entropy_forward(float* probs, const float* logits, const int* targets, int B, int V, float smoothing) {
  check_cross_entropy(targets, B, V, smoothing);
  SAV_CHECK(probs != nullptr, "cross_entropy_forward: probs (B*V floats) must not be null (backward needs it)");
  SAV_CHECK_PTR(logits);
  std::vector<float> row_loss(B);
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(B) * V >= detail::kParallelElems)
  for (int b = 0; b < B; ++b)
    row_loss[b] =
        ce_row(probs + static_cast<int64_t>(b) * V, logits + static_cast<int64_t>(b) * V, targets[b], V, smoothing);
  double total = 0.0;
  for (int b = 0; b < B; ++b) total += row_loss[b];
  return static_cast<float>(total / B);
}

void cross_entropy_backward(float* dlogits, const float* probs, const int* targets, int B, int V, float smoothing,
                            float dloss) {
  check_cross_entropy(targets, B, V, smoothing);
  if (!dlogits) return;
  SAV_CHECK_PTR(probs);
  const float g = dloss / static_cast<float>(B);
  const float off = smoothing / static_cast<float>(V);
  const float on = 1.0f - smoothing;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(B) * V >= detail::kParallelElems)
  for (int b = 0; b < B; ++b) {
    float* d = dlogits + static_cast<int64_t>(b) * V;
    const float* p = probs + static_cast<int64_t>(b) * V;
#pragma omp simd
    for (int v = 0; v < V; ++v) d[v] += g * (p[v] - off);
    d[targets[b]] -= g * on;
  }
}

}  // namespace sav::cpu
