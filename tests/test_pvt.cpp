// PVTv2 model tests: golden comparisons against timm (files made by python/make_golden.py), a whole-model
// finite-difference check, the inference path against the training path, converted stages, bad inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "golden_harness.h"
#include "op_harness.h"
#include "core/rng.h"
#include "io/safetensors.h"
#include "io/synth.h"
#include "models/pvt.h"
#include "models/registry.h"
#include "reparam/convert.h"
#include "ops/cpu/ops.h"

using namespace sav;

namespace {

const std::string kGolden = std::string(SAV_TEST_DATA) + "/golden/";

PvtConfig tiny_config() {  // python/make_golden.py golden_pvt_tiny
  PvtConfig c;
  c.name = "golden_pvt_tiny";
  c.img_size = 64, c.num_classes = 7;
  c.dims = {8, 16, 24, 32}, c.heads = {1, 2, 3, 4}, c.depths = {1, 2, 1, 1}, c.sr = {8, 4, 2, 1};
  c.mlp_ratios = {2, 2, 2, 2};
  return c;
}

// A config small enough for finite differences of every parameter: 16x16 images, grids 4/2/1.
PvtConfig fd_config() {
  PvtConfig c;
  c.name = "fd";
  c.img_size = 16, c.in_chans = 2, c.num_classes = 5;
  c.dims = {4, 6, 8}, c.heads = {1, 2, 2}, c.depths = {1, 1, 1}, c.sr = {2, 1, 1}, c.mlp_ratios = {2, 2, 2};
  return c;
}

void perturb(ImageClassifier& m, uint64_t seed, float std) {
  Rng rng(seed);
  for (size_t i = 0; i < m.params().size(); ++i) {
    float* p = m.params().tensor(i).f32();
    for (int64_t j = 0; j < m.params().tensor(i).numel(); ++j) p[j] += std * rng.normal();
  }
}

}  // namespace

TEST(PvtGolden, TinyPvtLogitsLossAndEveryGradientMatchTimm) {
  Pvt model(tiny_config());
  int checked = 0;
  sav::test::check_training_golden(model, kGolden + "pvt_tiny.safetensors", [](const std::string& n) {
    // float32 engine vs float64 PyTorch; the patch embeddings and norms sum over every token of the batch
    return n.find("norm") != std::string::npos || n.find("proj") != std::string::npos ? 3e-4 : 1e-4;
  }, &checked);
  EXPECT_EQ(checked, static_cast<int>(model.params().size()));
  EXPECT_GT(checked, 90);
}

TEST(PvtGolden, PvtV2B0WithSynthWeightsMatchesTimmFloat64Logits) {
  Pvt model(pvt_preset("pvt_v2_b0"));
  const sav::test::LogitsCheck r = sav::test::synth_logits_check(model, kGolden + "pvt_v2_b0_logits.safetensors", 2);
  EXPECT_GT(r.max_ref, 0.1) << "reference logits should be non-trivial";
  EXPECT_LT(r.rel(), 1e-4) << "max abs error " << r.max_err << " / max abs logit " << r.max_ref;
}

TEST(PvtModel, PresetsHaveTimmGeometry) {
  const PvtConfig b0 = pvt_preset("pvt_v2_b0");
  EXPECT_EQ(b0.grid(0), 56);
  EXPECT_EQ(b0.grid(3), 7);
  EXPECT_EQ(b0.kv_grid(0), 7);
  EXPECT_EQ(b0.kv_grid(3), 7);
  Pvt m0(b0), m1(pvt_preset("pvt_v2_b1")), m2(pvt_preset("pvt_v2_b2"));
  // timm parameter counts (sum of state_dict numel)
  EXPECT_EQ(m0.params().numel(), 3666760);
  EXPECT_EQ(m1.params().numel(), 14009000);
  EXPECT_EQ(m2.params().numel(), 25362856);
  const PvtConfig f = pvt_preset("pvt_fmnist");
  EXPECT_EQ(f.grid(0), 14);
  EXPECT_EQ(f.grid(3), 2);
  EXPECT_THROW(pvt_preset("pvt_v2_b9"), Error);
}

// d loss / d theta by central differences for a few entries of every parameter tensor (dense model).
TEST(PvtModel, FiniteDifferencesOfTheWholeModel) {
  const PvtConfig c = fd_config();
  Pvt model(c);
  perturb(model, 3, 0.3f);
  const int B = 2, V = c.num_classes;
  std::vector<float> x(size_t(B) * c.in_chans * c.img_size * c.img_size);
  Rng rng(4);
  for (auto& v : x) v = rng.normal();
  const int targets[B] = {1, 3};
  std::vector<float> probs(B * V), dl(B * V, 0.0f);
  auto loss_at = [&]() {
    model.forward(x.data(), B, true);
    return double(cpu::cross_entropy_forward(probs.data(), model.logits(), targets, B, V, 0.0f));
  };
  loss_at();
  cpu::cross_entropy_backward(dl.data(), probs.data(), targets, B, V, 0.0f, 1.0f);
  model.grads().zero();
  model.backward(dl.data());
  const float h = 1e-2f;
  for (size_t i = 0; i < model.params().size(); ++i) {
    const Tensor& p = model.params().tensor(i);
    const Tensor& g = model.grads().tensor(i);
    const double scale = std::max(1e-3, double(std::fabs(g.f32()[0])) + 1e-2);
    for (int64_t j : {int64_t(0), p.numel() / 2, p.numel() - 1}) {
      const float keep = p.f32()[j];
      p.f32()[j] = keep + h;
      const double lp = loss_at();
      p.f32()[j] = keep - h;
      const double lm = loss_at();
      p.f32()[j] = keep;
      const double num = (lp - lm) / (2 * h);
      EXPECT_NEAR(num, g.f32()[j], 2e-2 * std::max(scale, std::fabs(num)) + 2e-3)
          << model.params().name(i) << "[" << j << "]";
    }
  }
}

TEST(PvtModel, InferenceForwardEqualsTrainingForward) {
  PvtConfig c = fd_config();
  c.img_size = 20;  // grids 5, 3, 2 (odd sizes, floor in the spatial reduction)
  Pvt model(c);
  perturb(model, 5, 0.2f);
  const int B = 3;
  std::vector<float> x(size_t(B) * c.in_chans * c.img_size * c.img_size);
  Rng rng(6);
  for (auto& v : x) v = rng.normal();
  model.forward(x.data(), B, true);
  std::vector<float> a(model.logits(), model.logits() + B * c.num_classes);
  model.forward(x.data(), B, false);
  EXPECT_LT(sav::test::norm_err(model.logits(), a.data(), B * c.num_classes), 1e-6);
}

TEST(PvtModel, ShiftAddStagesRunForwardAndBackward) {
  PvtConfig c = fd_config();
  c.attn = "hhs", c.mlp = "msd", c.attn_linear = "sdm";
  c.hash_bits = 8, c.anchors = 5;
  Pvt model(c);
  Rng init(7);
  model.init_random(init);
  for (size_t i = 0; i < model.buffers()->size(); ++i) {  // some KSH parameters
    float* p = model.buffers()->tensor(i).f32();
    for (int64_t j = 0; j < model.buffers()->tensor(i).numel(); ++j) p[j] = 0.5f * init.normal();
  }
  EXPECT_TRUE(model.params().contains("stages.0.blocks.0.attn.to_qk.p"));
  EXPECT_TRUE(model.params().contains("stages.0.blocks.0.mlp.fc1.router.weight"));
  EXPECT_TRUE(model.params().contains("stages.2.blocks.0.attn.kv.router.weight"));
  EXPECT_FALSE(model.params().contains("stages.0.blocks.0.attn.sr.weight"));
  const int B = 2;
  std::vector<float> x(size_t(B) * c.in_chans * c.img_size * c.img_size);
  for (auto& v : x) v = init.normal();
  model.forward(x.data(), B, true);
  for (int i = 0; i < B * c.num_classes; ++i) EXPECT_TRUE(std::isfinite(model.logits()[i]));
  EXPECT_GT(model.aux_loss(), 0.0f);
  std::vector<float> dl(B * c.num_classes, 0.1f);
  model.grads().zero();
  model.backward(dl.data());
  double gsum = 0;
  for (int64_t i = 0; i < model.grads().numel(); ++i) gsum += std::fabs(model.grads().flat()[i]);
  EXPECT_GT(gsum, 0.0);
  EXPECT_TRUE(std::isfinite(gsum));
  // metadata round trip
  const PvtConfig back = pvt_config_from_metadata(model.metadata());
  EXPECT_EQ(back.attn, c.attn);
  EXPECT_EQ(back.mlp, c.mlp);
  EXPECT_EQ(back.dims, c.dims);
}

TEST(PvtModel, BadConfigsAndCheckpointsThrow) {
  PvtConfig c = fd_config();
  c.img_size = 4;  // grid 1 at stage 0, smaller than sr 2
  EXPECT_THROW(Pvt{c}, Error);
  c = fd_config();
  c.heads = {1, 4, 2};  // 6 % 4 != 0
  EXPECT_THROW(Pvt{c}, Error);
  c = fd_config();
  c.attn = "hh";  // one char per stage
  EXPECT_THROW(Pvt{c}, Error);
  // a timm pvt checkpoint does not fit a ViT arch and vice versa: clear error, nothing loaded
  EXPECT_THROW(load_model(kGolden + "pvt_tiny.safetensors", "pvt_v2_b0"), Error);
  EXPECT_THROW(load_model(kGolden + "vit_tiny.safetensors", "pvt_v2_b0"), Error);
}

namespace {
std::unique_ptr<Pvt> random_dense_pvt(uint64_t seed) {
  auto m = std::make_unique<Pvt>(fd_config());
  Rng rng(seed);
  m->init_random(rng);
  perturb(*m, seed + 1, 0.1f);
  return m;
}
std::vector<float> random_images(const PvtConfig& c, int B, uint64_t seed) {
  std::vector<float> x(size_t(B) * c.in_chans * c.img_size * c.img_size);
  Rng rng(seed);
  for (auto& v : x) v = rng.normal();
  return x;
}
}  // namespace

TEST(PvtConvert, MoeWithAZeroRouterKeepsTheDenseModel) {
  auto dense = random_dense_pvt(11);
  ConvertOptions opt;
  opt.attn = "softmax", opt.mlp = "moe", opt.attn_linear = "moe";
  auto sa = convert_pvt(*dense, opt, nullptr, 0);
  const int B = 3, V = dense->num_classes();
  auto x = random_images(dense->config(), B, 12);
  dense->forward(x.data(), B, false);
  std::vector<float> ref(dense->logits(), dense->logits() + B * V);
  sa->forward(x.data(), B, false);  // eval: no noise, equal probabilities -> expert 0 (mult) everywhere
  EXPECT_LT(sav::test::norm_err(sa->logits(), ref.data(), B * V), 1e-6);
  EXPECT_EQ(sa->moe_layers().size(), size_t(3 * 5));  // q, kv, proj, fc1, fc2 in each of 3 blocks
  for (auto& [name, layer] : sa->moe_layers()) EXPECT_EQ(layer->expert_counts()[1], 0) << name;
}

TEST(PvtConvert, HammingStagesTakeQAndTheValueHalfOfKvAndFitTheHash) {
  auto dense = random_dense_pvt(13);
  ConvertOptions opt;
  opt.attn = "hhs", opt.mlp = "dense", opt.hash_bits = 8, opt.anchors = 5;
  const int n = 6;
  auto calib = random_images(dense->config(), n, 14);
  auto sa = convert_pvt(*dense, opt, calib.data(), n);
  EXPECT_FALSE(sa->params().contains("stages.0.blocks.0.attn.sr.weight"));  // spatial reduction dropped
  EXPECT_TRUE(sa->params().contains("stages.2.blocks.0.attn.kv.weight"));   // the last stage keeps softmax
  for (int s : {0, 1}) {
    const int C = dense->config().dims[s];
    const std::string p = "stages." + std::to_string(s) + ".blocks.0.attn.";
    const float* q = dense->params().get(p + "q.weight").f32();
    const float* kv = dense->params().get(p + "kv.weight").f32();
    const float* kvb = dense->params().get(p + "kv.bias").f32();
    const float* to_qk = sa->params().get(p + "to_qk.weight").f32();
    const float* to_v = sa->params().get(p + "to_v.weight").f32();
    const float* to_vb = sa->params().get(p + "to_v.bias").f32();
    for (int i = 0; i < C * C; ++i) {
      ASSERT_EQ(to_qk[i], q[i]);
      ASSERT_EQ(to_v[i], kv[C * C + i]);
    }
    for (int i = 0; i < C; ++i) ASSERT_EQ(to_vb[i], kvb[C + i]);
    const Tensor A = sa->buffers()->get(p + "ksh.A");
    double norm = 0;
    for (int64_t i = 0; i < A.numel(); ++i) norm += std::fabs(A.f32()[i]);
    EXPECT_GT(norm, 0.0) << "KSH projection of stage " << s << " was not fitted";
  }
  // everything else is copied: the last stage's attention and the MLPs
  EXPECT_EQ(sa->params().get("stages.2.blocks.0.attn.q.weight").f32()[3],
            dense->params().get("stages.2.blocks.0.attn.q.weight").f32()[3]);
  EXPECT_EQ(sa->params().get("stages.0.blocks.0.mlp.dwconv.weight").f32()[5],
            dense->params().get("stages.0.blocks.0.mlp.dwconv.weight").f32()[5]);
  sa->forward(calib.data(), n, false);
  for (int i = 0; i < n * sa->num_classes(); ++i) ASSERT_TRUE(std::isfinite(sa->logits()[i]));
  // a converted stage cannot go back to softmax attention
  ConvertOptions back;
  back.attn = "softmax", back.mlp = "dense";
  EXPECT_THROW(convert_pvt(*sa, back, calib.data(), n), Error);
}
