// PvtCuda (PVTv2 on the GPU) against timm's float64 logits (golden file of python/make_golden.py), against
// the CPU engine on converted ShiftAddViT models, and against the public release's reference outputs
// (../shared/reference, when present: $SAV_RELEASE_REF on the device machine). f32 math: the CPU's results
// up to summation order, so the tolerances are the CPU tests' own (1e-4 relative); tf32: stated below.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "core/rng.h"
#include "cuda_test_util.h"
#include "io/safetensors.h"
#include "io/synth.h"
#include "models/pvt.h"
#include "models/pvt_cuda.h"
#include "pvt_random.h"
#include "models/registry.h"
#include "reparam/convert.h"

using namespace sav;
using namespace sav::test;

namespace {

class PvtCudaTest : public CudaTest {};

const std::string kGolden = std::string(SAV_TEST_DATA) + "/golden/";

// max |a - b| / max |b|
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double e = 0, m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    e = std::max(e, std::fabs(double(a[i]) - double(b[i])));
    m = std::max(m, std::fabs(double(b[i])));
  }
  return m > 0 ? e / m : e;
}

std::vector<float> gpu_logits(PvtCuda& net, const float* x, int B) {
  std::vector<float> y(size_t(B) * net.config().num_classes);
  net.forward_host(x, y.data(), B);
  return y;
}

}  // namespace

// timm pvt_v2_b0 (python/synth.py weights with non-trivial biases), float64 logits: within 1e-4 relative, as
// the CPU engine (tests/test_pvt.cpp PvtGolden).
TEST_F(PvtCudaTest, PvtV2B0MatchesTimmFloat64Logits) {
  Pvt model(pvt_preset("pvt_v2_b0"));
  for (size_t i = 0; i < model.params().size(); ++i)
    model.params().tensor(i).copy_from(synth_tensor(model.params().name(i), model.params().tensor(i).shape()));
  const int B = 2;
  Tensor x = synth_tensor("input", {B, 3, 224, 224});
  Checkpoint ck = Checkpoint::open(kGolden + "pvt_v2_b0_logits.safetensors");
  Tensor hi = ck.get("logits"), lo = ck.get("logits_lo");
  std::vector<float> ref(hi.numel());
  for (int64_t i = 0; i < hi.numel(); ++i) ref[i] = float(double(hi.f32()[i]) + double(lo.f32()[i]));
  PvtCuda net(model);
  const std::vector<float> y = gpu_logits(net, x.f32(), B);
  const double e = rel_err(y, ref);
  std::printf("[ pvt ] pvt_v2_b0 vs timm float64: max rel err %.3g (f32 math)\n", e);
  EXPECT_LT(e, 1e-4);
  // TF32 products: inputs rounded to 10-bit mantissas
  PvtCuda fast(model, PvtCudaOptions{cuda::F32Math::tf32});
  const double ef = rel_err(gpu_logits(fast, x.f32(), B), ref);
  std::printf("[ pvt ] pvt_v2_b0 vs timm float64: max rel err %.3g (tf32 math)\n", ef);
  EXPECT_LT(ef, 2e-2);
}

// A converted model (Hamming, MoE, shift; spatial reduction in the softmax stage) against the CPU engine:
// logits, every tap point, and the routing of every MoE layer.
TEST_F(PvtCudaTest, ConvertedModelMatchesCpuEngine) {
  auto m = converted_tiny(3);
  const int B = 3, S = 40;
  const std::vector<float> x = normal(size_t(B) * 3 * S * S, 11);
  std::map<std::string, std::vector<float>> cpu_acts, gpu_acts;
  auto key = [](int block, const char* what) { return std::to_string(block) + what; };
  m->set_activation_tap([&](int block, const char* what, const float* p, int64_t rows, int cols) {
    cpu_acts[key(block, what)].assign(p, p + rows * cols);
  });
  m->forward(x.data(), B, false);
  m->set_activation_tap(nullptr);
  const std::vector<float> ref(m->logits(), m->logits() + B * 9);
  PvtCuda net(*m);
  net.set_activation_tap([&](int block, const char* what, const float* p, int64_t rows, int cols) {
    gpu_acts[key(block, what)].assign(p, p + rows * cols);
  });
  const std::vector<float> y_tap = gpu_logits(net, x.data(), B);
  net.set_activation_tap(nullptr);
  EXPECT_LT(rel_err(y_tap, ref), 1e-4);
  ASSERT_EQ(gpu_acts.size(), cpu_acts.size());
  for (const auto& [k, v] : cpu_acts) {
    ASSERT_EQ(gpu_acts[k].size(), v.size()) << k;
    EXPECT_LT(rel_err(gpu_acts[k], v), 1e-4) << k;
  }
  // routing: every MoE layer, every token, as the CPU decided
  const auto layers = m->moe_layers();
  const auto choices = net.moe_choices();
  ASSERT_EQ(layers.size(), choices.size());
  int tokens = 0, differ = 0, to_shift = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    EXPECT_EQ(layers[i].first, choices[i].first);
    const std::vector<int>& c = layers[i].second->last_choice();
    ASSERT_EQ(c.size(), choices[i].second.size()) << layers[i].first;
    for (size_t j = 0; j < c.size(); ++j) tokens++, differ += c[j] != choices[i].second[j], to_shift += c[j] == 1;
  }
  std::printf("[ pvt ] converted tiny: %d MoE tokens, %d to the shift expert, %d routed differently\n", tokens,
              to_shift, differ);
  EXPECT_GT(to_shift, tokens / 10);
  EXPECT_LT(to_shift, tokens - tokens / 10);
  EXPECT_EQ(differ, 0);
  // the graph replay equals the eager run, bit for bit, and a replay repeats itself
  const std::vector<float> y1 = gpu_logits(net, x.data(), B), y2 = gpu_logits(net, x.data(), B);
  EXPECT_TRUE(bit_identical(y1, y_tap));
  EXPECT_TRUE(bit_identical(y1, y2));
  EXPECT_EQ(net.graph_count(), 1);
  // a larger batch (buffers grow) then the first size again: the same numbers
  const std::vector<float> x5 = normal(size_t(5) * 3 * S * S, 12);
  m->forward(x5.data(), 5, false);
  const std::vector<float> ref5(m->logits(), m->logits() + 5 * 9);
  EXPECT_LT(rel_err(gpu_logits(net, x5.data(), 5), ref5), 1e-4);
  EXPECT_TRUE(bit_identical(gpu_logits(net, x.data(), B), y1));
}

TEST_F(PvtCudaTest, RejectsWhatTheKernelsDoNotCover) {
  PvtConfig c = pvt_preset("pvt_v2_b0");
  c.dims = {32, 64, 160, 1040}, c.heads = {1, 2, 5, 8};  // head size 130 in stage 4
  Pvt m(c);
  EXPECT_THROW(PvtCuda{m}, Error);
}

// The public release's PVTv2-B0 (../shared/reference): logits within 1e-4 of the release, and every
// intermediate the release recorded, as the CPU test (tests/test_release.cpp) checks on the CPU.
TEST_F(PvtCudaTest, ReleaseReferenceOnTheGpu) {
  std::string dir;
  for (const char* d : {static_cast<const char*>(std::getenv("SAV_RELEASE_REF")), "/work/shared/reference"})
    if (d && std::filesystem::exists(std::string(d) + "/official_pvt_v2_b0_moe_seed1.io.safetensors")) {
      dir = d;
      break;
    }
  if (dir.empty()) GTEST_SKIP() << "release reference files not found ($SAV_RELEASE_REF, /work/shared/reference)";
  auto model = load_model(dir + "/official_pvt_v2_b0_moe_seed1.safetensors");
  Pvt* pvt = dynamic_cast<Pvt*>(model.get());
  ASSERT_NE(pvt, nullptr);
  Checkpoint io = Checkpoint::open(dir + "/official_pvt_v2_b0_moe_seed1.io.safetensors");
  const Tensor x = io.get("input");
  const int B = static_cast<int>(x.dim(0));
  PvtCuda net(*pvt);
  // release names of the tap points (as tests/test_release.cpp)
  std::map<std::string, std::vector<float>> acts;
  net.set_activation_tap([&](int block, const char* what, const float* p, int64_t rows, int cols) {
    std::string n;
    if (block < 0) {
      n = (std::string(what) == "embed" ? "patch_embed" : "norm") + std::to_string(-block);
    } else {
      const int s = pvt->block_stage(block);
      int i = 0;
      for (int l = 0; l < block; ++l) i += pvt->block_stage(l) == s;
      n = "block" + std::to_string(s + 1) + "." + std::to_string(i) + (std::string(what) == "attn" ? ".attn" : "");
    }
    acts[n].assign(p, p + rows * cols);
  });
  std::vector<float> y = gpu_logits(net, x.f32(), B);
  net.set_activation_tap(nullptr);
  const Tensor ref = io.get("logits"), ref_gpu = io.get("logits_gpu");
  const std::vector<float> r(ref.f32(), ref.f32() + ref.numel()), rg(ref_gpu.f32(), ref_gpu.f32() + ref_gpu.numel());
  const double e = rel_err(y, r), eg = rel_err(y, rg);
  std::printf("[ release ] H200 logits: max rel err %.3g (vs the release on CPU), %.3g (vs the release on H200)\n", e,
              eg);
  EXPECT_LT(e, 1e-4);
  EXPECT_LT(eg, 1e-4);
  int compared = 0;
  double worst = 0;
  for (const std::string& n : io.names()) {
    if (n == "input" || n == "logits" || n == "logits_gpu") continue;
    auto it = acts.find(n);
    ASSERT_NE(it, acts.end()) << "no GPU intermediate for the release's " << n;
    const Tensor t = io.get(n);
    ASSERT_EQ(int64_t(it->second.size()), t.numel()) << n;
    const double en = rel_err(it->second, std::vector<float>(t.f32(), t.f32() + t.numel()));
    EXPECT_LT(en, 1e-4) << n;
    worst = std::max(worst, en);
    ++compared;
  }
  std::printf("[ release ] H200: %d intermediates, worst max rel err %.3g\n", compared, worst);
  EXPECT_GE(compared, 20);
  // the graph replay gives the same logits as the tapped eager run
  EXPECT_TRUE(bit_identical(gpu_logits(net, x.f32(), B), y));
}
