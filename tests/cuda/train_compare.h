// One training step of a GPU-trained model (CudaTrainModel) against its CPU model, tensor by tensor: the
// shared check of test_vit_cuda_train.cpp and test_pvt_cuda_train.cpp.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/rng.h"
#include "cuda_test_util.h"
#include "models/cuda_train_model.h"
#include "models/model.h"
#include "train/optim.h"

namespace sav::test {

// max |a - ref| / max |ref| over n elements
inline double rel_err(const float* a, const float* ref, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    num = std::max(num, double(std::fabs(a[i] - ref[i])));
    den = std::max(den, double(std::fabs(ref[i])));
  }
  return den > 0 ? num / den : num;
}

inline std::vector<float> random_vec(size_t n, uint64_t seed, float scale = 1.0f) {
  Rng r(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = scale * r.normal();
  return v;
}

struct StepTolerances {
  double logits = 1e-4, grads = 2e-3, params = 1e-4;
  double eval_after_step = 1e-4;  // logits of the evaluation forward after the AdamW step
};

// `cpu` and `host` hold the same parameters and buffers; `gpu` wraps `host`. Runs a training forward (router
// noise seed 42), a backward from random dlogits, a rerun on the GPU (must be bit-identical), a clipped AdamW
// step on both, and an evaluation forward; checks each against the CPU.
inline void expect_step_matches_cpu(ImageClassifier& cpu, ImageClassifier& host, CudaTrainModel& gpu, int B,
                                    const StepTolerances& tol = {}) {
  const int V = cpu.num_classes();
  const auto images = random_vec(size_t(B) * cpu.in_chans() * cpu.img_size() * cpu.img_size(), 3);
  cpu.set_noise_seed(42), gpu.set_noise_seed(42);
  cpu.forward(images.data(), B, true);
  gpu.forward(images.data(), B, true);
  EXPECT_LT(rel_err(gpu.logits(), cpu.logits(), int64_t(B) * V), tol.logits);
  EXPECT_NEAR(gpu.aux_loss(), cpu.aux_loss(), tol.logits * std::max(1.0f, std::fabs(cpu.aux_loss())));

  const auto dlogits = random_vec(size_t(B) * V, 5, 0.1f);
  cpu.grads().zero();
  cpu.backward(dlogits.data());
  gpu.zero_grads();
  gpu.backward(dlogits.data());
  gpu.grads_host();
  const ParamSet& gc = cpu.grads();
  const ParamSet& gg = host.grads();
  int nonzero = 0;
  for (size_t i = 0; i < gc.size(); ++i) {
    const int64_t n = gc.tensor(i).numel();
    EXPECT_LT(rel_err(gg.tensor(i).f32(), gc.tensor(i).f32(), n), tol.grads) << "gradient of " << gc.name(i);
    double mx = 0;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, double(std::fabs(gc.tensor(i).f32()[j])));
    nonzero += mx > 0;
  }
  EXPECT_GT(nonzero, int(gc.size()) * 9 / 10) << "most gradients should be nonzero";

  const std::vector<float> g1(gg.flat(), gg.flat() + gg.numel());
  gpu.set_noise_seed(42);
  gpu.forward(images.data(), B, true);
  gpu.zero_grads();
  gpu.backward(dlogits.data());
  gpu.grads_host();
  EXPECT_TRUE(bit_identical(std::vector<float>(gg.flat(), gg.flat() + gg.numel()), g1)) << "rerun differs";

  AdamWOptions ao;
  ao.lr = 1e-2f, ao.weight_decay = 0.05f;
  AdamW opt(cpu.params(), ao);
  const float cn = clip_grad_norm(cpu.grads(), 0.5f);
  opt.step(cpu.params(), cpu.grads(), ao.lr);
  const float gn = gpu.optimizer_step(ao, ao.lr, 0.5f, 1);
  EXPECT_NEAR(gn, cn, 1e-3 * cn);
  gpu.download_state(nullptr, nullptr);
  double pmax = 0, worst = 0;
  for (int64_t j = 0; j < cpu.params().numel(); ++j) {
    pmax = std::max(pmax, double(std::fabs(cpu.params().flat()[j])));
    worst = std::max(worst, double(std::fabs(host.params().flat()[j] - cpu.params().flat()[j])));
  }
  EXPECT_LT(worst / pmax, tol.params);

  cpu.forward(images.data(), B, false);
  gpu.forward(images.data(), B, false);
  EXPECT_LT(rel_err(gpu.logits(), cpu.logits(), int64_t(B) * V), tol.eval_after_step) << "evaluation forward";
}

}  // namespace sav::test
