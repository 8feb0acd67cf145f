// ViT model tests: golden comparisons against timm (files made by python/make_golden.py on a machine with
// timm) and a whole-model finite-difference check.
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
#include "models/vit.h"
#include "ops/cpu/ops.h"

using namespace sav;

namespace {

const std::string kGolden = std::string(SAV_TEST_DATA) + "/golden/";

VitConfig tiny_config() {
  VitConfig c;
  c.name = "golden_tiny";
  c.img_size = 32, c.patch = 8, c.in_chans = 3, c.num_classes = 7, c.dim = 48, c.depth = 2, c.heads = 3;
  c.mlp_hidden = 96;
  return c;
}

// Per-tensor tolerance on max|grad - ref| / max|ref| (float32 engine vs float64 PyTorch). Accumulations over
// the whole batch (patch embedding, position embedding) and LayerNorm weights sum more terms.
double grad_tolerance(const std::string& name) {
  if (name.find("patch_embed") != std::string::npos || name == "pos_embed" || name == "cls_token") return 2e-4;
  if (name.find("norm") != std::string::npos) return 2e-4;
  return 1e-4;
}

}  // namespace

TEST(VitGolden, TinyVitLogitsLossAndEveryGradientMatchTimm) {
  Vit model(tiny_config());
  int checked = 0;
  sav::test::check_training_golden(model, kGolden + "vit_tiny.safetensors", grad_tolerance, &checked);
  EXPECT_EQ(checked, 4 + 12 * 2 + 4);
}

TEST(VitGolden, DeitTinyWithSynthWeightsMatchesTimmFloat64Logits) {
  Vit model(vit_preset("deit_tiny_patch16_224"));
  const sav::test::LogitsCheck r = sav::test::synth_logits_check(model, kGolden + "deit_tiny_logits.safetensors", 2);
  EXPECT_GT(r.max_ref, 0.1) << "reference logits should be non-trivial";
  EXPECT_LT(r.rel(), 1e-4) << "max abs error " << r.max_err << " / max abs logit " << r.max_ref;
}

// Whole-model check independent of the golden files: d loss / d theta by central differences (in float64
// accumulation of the loss) for a few entries of every parameter tensor.
TEST(VitModel, FiniteDifferencesOfTheWholeModel) {
  VitConfig c;
  c.name = "fd";
  c.img_size = 8, c.patch = 4, c.in_chans = 2, c.num_classes = 5, c.dim = 12, c.depth = 2, c.heads = 3;
  c.mlp_hidden = 20;
  Vit model(c);
  Rng rng(3);
  for (size_t i = 0; i < model.params().size(); ++i) {
    float* p = model.params().tensor(i).f32();
    for (int64_t j = 0; j < model.params().tensor(i).numel(); ++j) p[j] += 0.3f * rng.normal();
  }
  const int B = 3, V = c.num_classes;
  std::vector<float> x(B * 2 * 8 * 8);
  for (float& v : x) v = rng.normal();
  std::vector<int> y = {0, 3, 4};
  std::vector<float> probs(B * V), dl(B * V, 0.0f);
  auto loss_at = [&]() {
    model.forward(x.data(), B, false);
    return double(cpu::cross_entropy_forward(probs.data(), model.logits(), y.data(), B, V, 0.1f));
  };
  model.forward(x.data(), B, true);
  cpu::cross_entropy_forward(probs.data(), model.logits(), y.data(), B, V, 0.1f);
  cpu::cross_entropy_backward(dl.data(), probs.data(), y.data(), B, V, 0.1f, 1.0f);
  model.grads().zero();
  model.backward(dl.data());
  const float h = 1e-2f;
  for (size_t i = 0; i < model.params().size(); ++i) {
    float* p = model.params().tensor(i).f32();
    const float* g = model.grads().tensor(i).f32();
    const int64_t n = model.params().tensor(i).numel();
    for (int k = 0; k < 3; ++k) {
      const int64_t j = static_cast<int64_t>(rng.below(n));
      const float keep = p[j];
      p[j] = keep + h;
      const double lp = loss_at();
      p[j] = keep - h;
      const double lm = loss_at();
      p[j] = keep;
      const double fd = (lp - lm) / (2 * h);
      EXPECT_NEAR(g[j], fd, 2e-3 + 2e-2 * std::fabs(fd)) << model.params().name(i) << "[" << j << "]";
    }
  }
}

TEST(VitModel, InferenceAndTrainingForwardAgree) {
  Vit model(vit_preset("vit_fmnist"));
  Rng rng(5);
  model.init_random(rng);
  std::vector<float> x(4 * 28 * 28);
  for (float& v : x) v = rng.normal();
  model.forward(x.data(), 4, true);
  std::vector<float> a(model.logits(), model.logits() + 40);
  model.forward(x.data(), 4, false);
  EXPECT_LT(sav::test::norm_err(model.logits(), a.data(), 40), 1e-6);
}

TEST(VitModel, RejectsImpossibleSizes) {
  VitConfig c = vit_preset("vit_fmnist");
  c.patch = 5;
  EXPECT_THROW(Vit{c}, sav::Error);
  c = vit_preset("vit_fmnist");
  c.heads = 5;
  EXPECT_THROW(Vit{c}, sav::Error);
  EXPECT_THROW(vit_preset("no_such_arch"), sav::Error);
}
