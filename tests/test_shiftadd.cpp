// ShiftAddViT model tests: conversion semantics, whole-model gradients through the reparameterised
// layers, checkpoint round trips, the integer inference path, and a training step that learns.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <vector>

#include "core/rng.h"
#include "io/safetensors.h"
#include "models/registry.h"
#include "models/vit.h"
#include "ops/cpu/ops.h"
#include "ops/cpu/shift_linear.h"
#include "reparam/convert.h"
#include "train/optim.h"
#include "train/trainer.h"

using namespace sav;

namespace {

VitConfig small_config() {
  VitConfig c;
  c.name = "small";
  c.img_size = 12, c.patch = 4, c.in_chans = 2, c.num_classes = 5, c.dim = 16, c.depth = 2, c.heads = 2;
  c.mlp_hidden = 24;
  c.hash_bits = 8, c.anchors = 6;
  return c;
}

std::unique_ptr<Vit> random_dense(uint64_t seed) {
  auto m = std::make_unique<Vit>(small_config());
  Rng rng(seed);
  for (size_t i = 0; i < m->params().size(); ++i) {
    float* p = m->params().tensor(i).f32();
    for (int64_t j = 0; j < m->params().tensor(i).numel(); ++j) p[j] += 0.3f * rng.normal();
  }
  return m;
}

std::vector<float> random_images(int B, uint64_t seed) {
  const VitConfig c = small_config();
  std::vector<float> x(size_t(B) * c.in_chans * c.img_size * c.img_size);
  Rng rng(seed);
  for (float& v : x) v = rng.normal();
  return x;
}

double max_rel(const float* a, const float* b, int n) {
  double m = 0, r = 0;
  for (int i = 0; i < n; ++i) m = std::max(m, double(std::fabs(a[i] - b[i]))), r = std::max(r, double(std::fabs(b[i])));
  return m / std::max(r, 1e-12);
}

}  // namespace

TEST(ShiftAddConvert, MoeWithAZeroRouterKeepsTheDenseModel) {
  auto dense = random_dense(1);
  ConvertOptions opt;
  opt.attn = "softmax";
  opt.mlp = "moe";
  opt.attn_linear = "moe";
  auto sa = convert_vit(*dense, opt, nullptr, 0);
  auto x = random_images(3, 2);
  dense->forward(x.data(), 3, false);
  std::vector<float> ref(dense->logits(), dense->logits() + 15);
  sa->forward(x.data(), 3, false);  // eval: no noise, equal probabilities -> expert 0 (mult) everywhere
  EXPECT_LT(max_rel(sa->logits(), ref.data(), 15), 1e-6);
  for (auto& [name, layer] : sa->moe_layers()) EXPECT_EQ(layer->expert_counts()[1], 0) << name;
}

TEST(ShiftAddConvert, AllShiftEqualsTheDenseModelOnPowerOfTwoWeights) {
  auto dense = random_dense(3);
  ConvertOptions opt;
  opt.attn = "softmax";
  opt.mlp = "shift";
  opt.attn_linear = "shift";
  auto sa = convert_vit(*dense, opt, nullptr, 0);
  // Replace the dense model's linear weights by their power-of-two rounding: the two must then agree.
  for (size_t i = 0; i < dense->params().size(); ++i) {
    const std::string& n = dense->params().name(i);
    const Tensor& t = dense->params().tensor(i);
    if (t.ndim() != 2 || n.find("blocks.") != 0) continue;
    const int F = static_cast<int>(t.dim(0)), K = static_cast<int>(t.dim(1));
    std::vector<float> p(F * K), s(F * K);
    cpu::shift_from_dense(p.data(), s.data(), t.f32(), F, K, -14, 0);
    cpu::shift_linear_weights(t.f32(), p.data(), s.data(), F, K, -14, 0);
  }
  auto x = random_images(2, 4);
  dense->forward(x.data(), 2, false);
  std::vector<float> ref(dense->logits(), dense->logits() + 10);
  sa->forward(x.data(), 2, false);
  EXPECT_LT(max_rel(sa->logits(), ref.data(), 10), 1e-5);
  // and the integer MatShift path agrees within its fixed-point error
  sa->reparam().int_kernel = true;
  sa->load(*std::make_unique<Checkpoint>(Checkpoint::open([&] {
    std::string path = (std::filesystem::temp_directory_path() / "sav_shift_int.safetensors").string();
    save_model(*sa, path);
    return path;
  }())));
  sa->forward(x.data(), 2, false);
  EXPECT_LT(max_rel(sa->logits(), ref.data(), 10), 1e-3);
}

TEST(ShiftAddConvert, HammingConversionSplitsQkvAndFitsTheHash) {
  auto dense = random_dense(5);
  ConvertOptions opt;
  opt.attn = "hamming";
  opt.mlp = "dense";
  auto calib = random_images(8, 6);
  auto sa = convert_vit(*dense, opt, calib.data(), 8);
  const int C = 16;
  const float* qkv = dense->params().get("blocks.1.attn.qkv.weight").f32();
  const float* to_v = sa->params().get("blocks.1.attn.to_v.weight").f32();
  const float* to_qk = sa->params().get("blocks.1.attn.to_qk.weight").f32();
  for (int i = 0; i < C * C; ++i) {
    ASSERT_EQ(to_qk[i], qkv[i]);
    ASSERT_EQ(to_v[i], qkv[2 * C * C + i]);
  }
  const Tensor A = sa->buffers()->get("blocks.1.attn.ksh.A");
  double norm = 0;
  for (int64_t i = 0; i < A.numel(); ++i) norm += std::fabs(A.f32()[i]);
  EXPECT_GT(norm, 0.0) << "KSH projection was not fitted";
  sa->forward(calib.data(), 8, false);
  for (int i = 0; i < 8 * 5; ++i) ASSERT_TRUE(std::isfinite(sa->logits()[i]));
}

// Gradients of the whole converted model by central differences, for every parameter the straight-through
// estimators do not touch (shift exponents/signs and the layers feeding the hash have STE gradients, which
// the op tests check against their formulas). Router noise is off so the routing is fixed.
TEST(ShiftAddModel, FiniteDifferencesThroughHammingAndMoe) {
  auto dense = random_dense(7);
  ConvertOptions opt;
  opt.attn = "hamming";
  opt.mlp = "moe";
  opt.reparam.noise_std = 0.0f;
  opt.reparam.gate = cpu::moe_gate_prob;
  auto calib = random_images(6, 8);
  auto sa = convert_vit(*dense, opt, calib.data(), 6);
  Rng rng(9);
  for (size_t i = 0; i < sa->params().size(); ++i) {
    const std::string& n = sa->params().name(i);
    if (n.find("router") != std::string::npos || n.find("dwconv") != std::string::npos) {
      float* p = sa->params().tensor(i).f32();
      for (int64_t j = 0; j < sa->params().tensor(i).numel(); ++j) p[j] = 0.5f * rng.normal();
    }
  }
  const int B = 3, V = 5;
  auto x = random_images(B, 10);
  std::vector<int> y = {0, 2, 4};
  std::vector<float> probs(B * V), dl(B * V, 0.0f);
  auto loss_at = [&]() {
    sa->forward(x.data(), B, true);
    return double(cpu::cross_entropy_forward(probs.data(), sa->logits(), y.data(), B, V, 0.1f)) + sa->aux_loss();
  };
  loss_at();
  cpu::cross_entropy_backward(dl.data(), probs.data(), y.data(), B, V, 0.1f, 1.0f);
  sa->grads().zero();
  sa->backward(dl.data());
  const float h = 1e-2f;
  int checked = 0;
  for (size_t i = 0; i < sa->params().size(); ++i) {
    const std::string& n = sa->params().name(i);
    // Everything in block 0 and the embeddings is upstream of block 1's hash, whose straight-through
    // gradient FD cannot see; in block 1 so are to_qk and norm1. Shift p/s have STE gradients too.
    const bool last_block = n.rfind("blocks.1.", 0) == 0 || n.rfind("norm.", 0) == 0 || n.rfind("head.", 0) == 0;
    if (!last_block || n.find(".p") == n.size() - 2 || n.find(".s") == n.size() - 2 ||
        n.find("to_qk") != std::string::npos || n.find("norm1") != std::string::npos)
      continue;
    float* p = sa->params().tensor(i).f32();
    const float* g = sa->grads().tensor(i).f32();
    for (int k = 0; k < 2; ++k) {
      const int64_t j = static_cast<int64_t>(rng.below(sa->params().tensor(i).numel()));
      const float keep = p[j];
      p[j] = keep + h;
      const double lp = loss_at();
      p[j] = keep - h;
      const double lm = loss_at();
      p[j] = keep;
      const double fd = (lp - lm) / (2 * h);
      EXPECT_NEAR(g[j], fd, 3e-3 + 3e-2 * std::fabs(fd)) << n << "[" << j << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 20);
}

TEST(ShiftAddModel, CheckpointRoundTripKeepsLogitsAndBuffers) {
  auto dense = random_dense(11);
  ConvertOptions opt;
  auto calib = random_images(6, 12);
  auto sa = convert_vit(*dense, opt, calib.data(), 6);
  const std::string path = (std::filesystem::temp_directory_path() / "sav_sa_roundtrip.safetensors").string();
  save_model(*sa, path);
  auto back = load_model(path);
  auto x = random_images(2, 13);
  sa->forward(x.data(), 2, false);
  std::vector<float> ref(sa->logits(), sa->logits() + 10);
  back->forward(x.data(), 2, false);
  EXPECT_EQ(max_rel(back->logits(), ref.data(), 10), 0.0);
  std::filesystem::remove(path);
}

TEST(ShiftAddModel, TrainingStepsReduceTheLossOnAFixedBatch) {
  auto dense = random_dense(14);
  ConvertOptions opt;
  auto calib = random_images(6, 15);
  auto sa = convert_vit(*dense, opt, calib.data(), 6);
  AdamW adam(sa->params(), AdamWOptions{3e-3f, 0.9f, 0.999f, 1e-8f, 0.0f});
  const int B = 6, V = 5;
  std::vector<int> y = {0, 1, 2, 3, 4, 0};
  std::vector<float> probs(B * V), dl(B * V);
  float first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    sa->set_noise_seed(step);
    sa->forward(calib.data(), B, true);
    const float loss = cpu::cross_entropy_forward(probs.data(), sa->logits(), y.data(), B, V, 0.0f);
    if (step == 0) first = loss;
    last = loss;
    std::fill(dl.begin(), dl.end(), 0.0f);
    cpu::cross_entropy_backward(dl.data(), probs.data(), y.data(), B, V, 0.0f, 1.0f);
    sa->grads().zero();
    sa->backward(dl.data());
    adam.step(sa->params(), sa->grads(), 3e-3f);
  }
  EXPECT_LT(last, 0.5f * first) << "first " << first << " last " << last;
}
