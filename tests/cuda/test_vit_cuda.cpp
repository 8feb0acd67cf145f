// ViTCuda (dense ViT inference on the GPU) against the f32 CPU engine (sav::Vit) and timm's golden logits.
//
// Tolerance on the logits, max|gpu - ref| / max|ref|: 1e-2. The GPU rounds every product input to bf16
// (weights, LayerNorm outputs, attention inputs and probabilities, GELU outputs: 2^-9 relative each) and
// uses the tanh GELU; the residual stream, statistics and accumulations stay f32.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/rng.h"
#include "cuda_test_util.h"
#include "io/safetensors.h"
#include "io/synth.h"
#include "models/vit.h"
#include "models/vit_cuda.h"

using namespace sav;
using namespace sav::test;
using sav::cuda::DeviceBuffer;

namespace {

const std::string kGolden = std::string(SAV_TEST_DATA) + "/golden/";
constexpr double kLogitTol = 1e-2;

class VitCuda : public CudaTest {};

VitConfig tiny_config() {  // the configuration of tests/golden/vit_tiny.safetensors (as tests/test_vit.cpp)
  VitConfig c;
  c.name = "golden_tiny";
  c.img_size = 32, c.patch = 8, c.in_chans = 3, c.num_classes = 7, c.dim = 48, c.depth = 2, c.heads = 3;
  c.mlp_hidden = 96;
  return c;
}

// Random weights with non-trivial biases and LayerNorm affines (init_random leaves them at 0 and 1).
void randomise(Vit& m, uint64_t seed) {
  Rng rng(seed);
  m.init_random(rng);
  for (size_t i = 0; i < m.params().size(); ++i) {
    const Tensor& t = m.params().tensor(i);
    if (t.ndim() != 1) continue;
    const bool ln_w = m.params().name(i).find("norm") != std::string::npos &&
                      m.params().name(i).find(".weight") != std::string::npos;
    for (int64_t j = 0; j < t.numel(); ++j) t.f32()[j] = (ln_w ? 1.0f : 0.0f) + rng.uniform(-0.1f, 0.1f);
  }
}

std::vector<float> cpu_logits(Vit& m, const std::vector<float>& x, int B) {
  m.forward(x.data(), B, false);
  return std::vector<float>(m.logits(), m.logits() + size_t(B) * m.num_classes());
}

}  // namespace

TEST_F(VitCuda, GoldenTinyMatchesCpuEngineAndTimm) {
  Checkpoint ck = Checkpoint::open(kGolden + "vit_tiny.safetensors");
  Vit cpu(tiny_config());
  cpu.load(ck);
  const Tensor x = ck.get("input");
  const int B = static_cast<int>(x.dim(0)), V = cpu.num_classes();
  const std::vector<float> images = x.to_vector();
  const std::vector<float> ref = cpu_logits(cpu, images, B);
  const Tensor timm = ck.get("logits");
  const std::vector<float> timm_ref = timm.to_vector();

  ViTCuda net(cpu);
  DeviceBuffer<float> dimg(images.size()), dlogits(size_t(B) * V);
  dimg.upload(images);
  dlogits.fill_bytes(0xFF);
  cuda::Stream s;
  net.forward(dimg.get(), dlogits.get(), B, s.get());
  s.sync();
  const std::vector<float> got = dlogits.download();
  EXPECT_EQ(count_nonfinite(got), 0u) << "logits not all written";
  const double e_cpu = norm_err(got, ref), e_timm = norm_err(got, timm_ref);
  std::printf("[ info ] golden tiny: err vs CPU engine %.3e, vs timm %.3e\n", e_cpu, e_timm);
  EXPECT_LT(e_cpu, kLogitTol);
  EXPECT_LT(e_timm, kLogitTol);

  // graph replay, eager launches and the host entry point give the same bits
  dlogits.fill_bytes(0xFF);
  net.forward(dimg.get(), dlogits.get(), B, s.get());
  s.sync();
  EXPECT_TRUE(bit_identical(dlogits.download(), got)) << "graph replay differs";
  dlogits.fill_bytes(0xFF);
  net.forward_eager(dimg.get(), dlogits.get(), B, s.get());
  s.sync();
  EXPECT_TRUE(bit_identical(dlogits.download(), got)) << "eager run differs";
  std::vector<float> host(got.size());
  net.forward_host(images.data(), host.data(), B);
  EXPECT_TRUE(bit_identical(host, got)) << "forward_host differs";
}

TEST_F(VitCuda, DeitTinyRandomWeightsMatchesCpuEngineAtSeveralBatchSizes) {
  Vit cpu(vit_preset("deit_tiny_patch16_224"));
  randomise(cpu, 7);
  ViTCuda net(cpu);
  const VitConfig& c = cpu.config();
  const size_t per_image = size_t(c.in_chans) * c.img_size * c.img_size;
  std::vector<std::vector<float>> first(4);
  for (int B : {3, 1, 2}) {  // growing and shrinking: buffers reallocated, one graph per size
    SCOPED_TRACE("B=" + std::to_string(B));
    const std::vector<float> images = normal(per_image * B, 100 + B);
    const std::vector<float> ref = cpu_logits(cpu, images, B);
    std::vector<float> got(size_t(B) * c.num_classes, NAN);
    net.forward_host(images.data(), got.data(), B);
    EXPECT_EQ(count_nonfinite(got), 0u);
    const double e = norm_err(got, ref);
    std::printf("[ info ] deit_tiny random weights B=%d: err vs CPU engine %.3e (max|ref| %.3f)\n", B, e,
                max_abs(ref.data(), ref.size()));
    EXPECT_LT(e, kLogitTol);
    first[B] = got;
  }
  EXPECT_EQ(net.graph_count(), 3);
  for (int B : {3, 2}) {  // replays after other sizes: bit-identical
    const std::vector<float> images = normal(per_image * B, 100 + B);
    std::vector<float> got(size_t(B) * c.num_classes, NAN);
    net.forward_host(images.data(), got.data(), B);
    EXPECT_TRUE(bit_identical(got, first[B])) << "B=" << B;
  }
}

// timm's float64 logits of deit_tiny_patch16_224 with synthetic weights (tests/golden, python/make_golden.py).
TEST_F(VitCuda, DeitTinySynthWeightsMatchTimmFloat64) {
  Checkpoint ck = Checkpoint::open(kGolden + "deit_tiny_logits.safetensors");
  Vit cpu(vit_preset("deit_tiny_patch16_224"));
  for (size_t i = 0; i < cpu.params().size(); ++i)
    cpu.params().tensor(i).copy_from(synth_tensor(cpu.params().name(i), cpu.params().tensor(i).shape()));
  const std::vector<float> images = synth_tensor("input", {2, 3, 224, 224}).to_vector();
  ViTCuda net(cpu);
  std::vector<float> got(2 * 1000);
  net.forward_host(images.data(), got.data(), 2);
  const Tensor hi = ck.get("logits"), lo = ck.get("logits_lo");
  std::vector<float> ref(2 * 1000);
  for (int i = 0; i < 2000; ++i) ref[i] = float(double(hi.f32()[i]) + double(lo.f32()[i]));
  const double e = norm_err(got, ref);
  std::printf("[ info ] deit_tiny synth weights: err vs timm float64 %.3e\n", e);
  EXPECT_EQ(count_nonfinite(got), 0u);
  EXPECT_LT(e, kLogitTol);
}

TEST_F(VitCuda, TimingEntryPointReturnsAPositiveMedian) {
  Vit cpu(tiny_config());
  randomise(cpu, 3);
  ViTCuda net(cpu);
  const double ms = vit_cuda_median_ms(net, 4, 7);
  std::printf("[ info ] golden tiny config, batch 4: %.4f ms\n", ms);
  EXPECT_GT(ms, 0.0);
  EXPECT_LT(ms, 1000.0);
}

// Runs without a GPU: the configuration checks come before any device call.
TEST(VitCudaConfig, RejectsShiftAddAndOversizedModels) {
  VitConfig c = tiny_config();
  c.mlp = "ms";  // MoE and shift MLPs
  Vit shiftadd(c);
  EXPECT_THROW(ViTCuda net(shiftadd), sav::Error);
  VitConfig big = tiny_config();
  big.img_size = 136;  // 17x17 patches + 1 = 290 tokens > 256
  Vit large(big);
  try {
    ViTCuda net(large);
    FAIL() << "290 tokens should be refused";
  } catch (const sav::Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokens"), std::string::npos) << e.what();
  }
}
