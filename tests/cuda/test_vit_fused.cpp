// The fused single-kernel ShiftAddViT forward (ops/cuda/vit_fused.h, ViTCuda's "fused" path) against the f32
// CPU engine and against ViTCuda's layered path on the same weights.
//
// Tolerances as test_vit_cuda.cpp's ShiftAddViT tests (3e-2 of max|logit| for a few blocks; DeiT-Tiny's twelve
// Hamming blocks accumulate hash-bit flips near y = 0, so that comparison has a loose bound that a wrong kernel
// still fails by orders of magnitude): both GPU paths round the same tensors to bf16, but they sum in other
// orders and the fused kernel's router uses f32 weights (the layered one a hi/lo bf16 split), so a few routing
// decisions and hash bits near their thresholds may differ between them too.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "models/vit.h"
#include "models/vit_cuda.h"
#include "ops/cuda/vit_fused.h"
#include "vit_random.h"

using namespace sav;
using namespace sav::test;
using sav::cuda::DeviceBuffer;

namespace {

class VitFused : public CudaTest {};

// Small geometry inside the fused kernel's limits: head size 64, 3x8x8 patches (K = 192), 65 tokens.
VitConfig small_config() {
  VitConfig c;
  c.name = "fused_small";
  c.img_size = 64, c.patch = 8, c.in_chans = 3, c.num_classes = 10, c.dim = 128, c.depth = 3, c.heads = 2;
  c.mlp_hidden = 256;
  c.attn = "hhh";
  return c;
}

// The small geometry with MoE MLPs and dense attention linears.
VitConfig small_moe_config() {
  VitConfig c = small_config();
  c.mlp = "mmm", c.attn_linear = "ddd";
  return c;
}

// DeiT-Tiny converted as the benchmark's shiftadd variant: Hamming attention everywhere, MoE MLPs, dense attention
// linears.
VitConfig converted_deit_tiny() {
  VitConfig c = vit_preset("deit_tiny_patch16_224");
  c.attn = std::string(c.depth, 'h'), c.mlp = std::string(c.depth, 'm'), c.attn_linear = std::string(c.depth, 'd');
  return c;
}

struct PathRun {
  std::vector<float> logits;
  std::vector<std::pair<std::string, std::vector<int8_t>>> routing;
};

PathRun run_path(ViTCuda& net, ViTCudaPath path, const std::vector<float>& images, int B) {
  net.set_path(path);
  const VitConfig& c = net.config();
  DeviceBuffer<float> dimg(images.size()), dlogits(size_t(B) * c.num_classes);
  dimg.upload(images);
  dlogits.fill_bytes(0xFF);
  cuda::Stream s;
  net.forward(dimg.get(), dlogits.get(), B, s.get());
  s.sync();
  return {dlogits.download(), net.moe_choices()};
}

std::vector<float> cpu_logits(Vit& m, const std::vector<float>& x, int B) {
  m.forward(x.data(), B, false);
  return std::vector<float>(m.logits(), m.logits() + size_t(B) * m.num_classes());
}

// Largest fraction of tokens routed differently, over the MoE layers.
double routing_diff(const PathRun& a, const PathRun& b) {
  EXPECT_EQ(a.routing.size(), b.routing.size());
  double worst = 0.0;
  for (size_t i = 0; i < std::min(a.routing.size(), b.routing.size()); ++i) {
    const auto& x = a.routing[i].second;
    const auto& y = b.routing[i].second;
    EXPECT_EQ(x.size(), y.size());
    int diff = 0;
    for (size_t t = 0; t < std::min(x.size(), y.size()); ++t) diff += x[t] != y[t];
    worst = std::max(worst, x.empty() ? 0.0 : double(diff) / x.size());
  }
  return worst;
}

double routing_diff_cpu(Vit& cpu, const PathRun& g) {
  PathRun c;
  for (const auto& [name, layer] : cpu.moe_layers()) {
    std::vector<int8_t> ch;
    for (int e : layer->last_choice()) ch.push_back(static_cast<int8_t>(e));
    c.routing.emplace_back(name, ch);
  }
  return routing_diff(c, g);
}

// Every kind of linear in a Hamming block (dense, shift, MoE attention linears; MoE, dense, shift MLPs), both
// gate modes, batch 1 and 3 (batch 3 runs clusters of 2 CTAs, batch 1 of 8): fused vs the CPU and vs the layered path;
// the fused rerun is bit-identical and routes identically.
TEST_F(VitFused, EveryLinearKindMatchesCpuAndLayeredPath) {
  for (const auto gate : {cpu::moe_gate_straight_through, cpu::moe_gate_prob}) {
    for (const int B : {1, 3}) {
      SCOPED_TRACE(std::string(gate == cpu::moe_gate_prob ? "gate prob" : "gate straight-through") +
                   ", B=" + std::to_string(B));
      VitConfig c = small_config();
      c.attn_linear = "dsm", c.mlp = "mds";
      ReparamOptions ro;
      ro.gate = gate;
      Vit cpu(c, ro);
      randomise_shiftadd(cpu, 41 + B);
      ViTCuda net(cpu);
      net.set_path(ViTCudaPath::fused);
      EXPECT_STREQ(net.path_name(B), "fused");
      const std::vector<float> images = normal(size_t(B) * c.in_chans * c.img_size * c.img_size, 42 + B);
      const PathRun fused = run_path(net, ViTCudaPath::fused, images, B);
      EXPECT_EQ(count_nonfinite(fused.logits), 0u) << "logits not all written";
      const std::vector<float> ref = cpu_logits(cpu, images, B);
      const double e_cpu = norm_err(fused.logits, ref);
      const double r_cpu = routing_diff_cpu(cpu, fused);
      const PathRun layered = run_path(net, ViTCudaPath::layered, images, B);
      const double e_lay = norm_err(fused.logits, layered.logits);
      const double r_lay = routing_diff(fused, layered);
      std::printf("[ info ] fused vs CPU %.3e (routing %.3f), vs layered %.3e (routing %.3f), max|ref| %.3f\n", e_cpu,
                  r_cpu, e_lay, r_lay, max_abs(ref.data(), ref.size()));
      EXPECT_LT(e_cpu, 3e-2);
      EXPECT_LT(e_lay, 3e-2);
      EXPECT_LT(r_cpu, 0.02);
      EXPECT_LT(r_lay, 0.02);
      const PathRun again = run_path(net, ViTCudaPath::fused, images, B);
      EXPECT_TRUE(bit_identical(again.logits, fused.logits)) << "fused rerun differs";
      EXPECT_TRUE(again.routing == fused.routing) << "fused rerun routes differently";
      std::vector<float> host(fused.logits.size());
      net.forward_host(images.data(), host.data(), B);
      EXPECT_TRUE(bit_identical(host, fused.logits)) << "forward_host differs";
    }
  }
}

// DeiT-Tiny converted as the benchmark's shiftadd variant (Hamming attention everywhere, MoE MLPs, dense
// attention linears) at batch 1 and 2: against the CPU engine (loose, see the header), against the layered path,
// both experts used, reruns bit-identical. Prints the two paths' batch-1 latency (information, not a check).
TEST_F(VitFused, ConvertedDeitTinyMatchesCpuAndLayeredPath) {
  const VitConfig c = converted_deit_tiny();
  Vit cpu(c);
  randomise_shiftadd(cpu, 51);
  ViTCuda net(cpu);
  for (const int B : {1, 2}) {
    SCOPED_TRACE("B=" + std::to_string(B));
    const std::vector<float> images = normal(size_t(B) * c.in_chans * c.img_size * c.img_size, 52 + B);
    const PathRun fused = run_path(net, ViTCudaPath::fused, images, B);
    EXPECT_EQ(count_nonfinite(fused.logits), 0u);
    EXPECT_EQ(fused.routing.size(), size_t(2 * c.depth));
    for (const auto& [name, ch] : fused.routing) {
      EXPECT_EQ(ch.size(), size_t(B) * c.tokens()) << name;
      for (int8_t e : ch) EXPECT_TRUE(e == 0 || e == 1) << name;
    }
    const std::vector<float> ref = cpu_logits(cpu, images, B);
    const double e_cpu = norm_err(fused.logits, ref), r_cpu = routing_diff_cpu(cpu, fused);
    const PathRun layered = run_path(net, ViTCudaPath::layered, images, B);
    const double e_lay = norm_err(fused.logits, layered.logits), r_lay = routing_diff(fused, layered);
    const double e_lay_cpu = norm_err(layered.logits, ref);
    std::printf(
        "[ info ] deit_tiny B=%d: fused vs CPU %.3e (routing %.3f), layered vs CPU %.3e, fused vs layered "
        "%.3e (routing %.3f)\n",
        B, e_cpu, r_cpu, e_lay_cpu, e_lay, r_lay);
    EXPECT_LT(e_cpu, 0.25);
    EXPECT_LT(e_lay, 0.25);
    EXPECT_LT(r_cpu, 0.05);
    EXPECT_LT(r_lay, 0.05);
    const PathRun again = run_path(net, ViTCudaPath::fused, images, B);
    EXPECT_TRUE(bit_identical(again.logits, fused.logits));
    EXPECT_TRUE(again.routing == fused.routing);
  }
  net.set_path(ViTCudaPath::fused);
  const double ms_fused = vit_cuda_median_ms(net, 1, 30);
  net.set_path(ViTCudaPath::layered);
  const double ms_layered = vit_cuda_median_ms(net, 1, 30);
  std::printf("[ info ] converted deit_tiny batch 1: fused %.4f ms, layered %.4f ms\n", ms_fused, ms_layered);
}

// Each image's logits and routing do not depend on the other images of the batch or on the cluster size: a batch of 3
// (clusters of 2 CTAs) equals the three single-image forwards (clusters of 8) bit for bit.
TEST_F(VitFused, BatchInvariantBitForBit) {
  const VitConfig c = converted_deit_tiny();
  Vit cpu(c);
  randomise_shiftadd(cpu, 71);
  ViTCuda net(cpu);
  const int B = 3, V = c.num_classes;
  const size_t per = size_t(c.in_chans) * c.img_size * c.img_size;
  const std::vector<float> images = normal(B * per, 72);
  const PathRun all = run_path(net, ViTCudaPath::fused, images, B);
  for (int b = 0; b < B; ++b) {
    const std::vector<float> one(images.begin() + b * per, images.begin() + (b + 1) * per);
    const PathRun single = run_path(net, ViTCudaPath::fused, one, 1);
    const std::vector<float> part(all.logits.begin() + size_t(b) * V, all.logits.begin() + size_t(b + 1) * V);
    EXPECT_TRUE(bit_identical(single.logits, part)) << "image " << b << ": " << norm_err(single.logits, part);
    for (size_t i = 0; i < all.routing.size(); ++i) {
      const auto& r = all.routing[i].second;
      const std::vector<int8_t> rb(r.begin() + size_t(b) * c.tokens(), r.begin() + size_t(b + 1) * c.tokens());
      EXPECT_TRUE(rb == single.routing[i].second) << "image " << b << " " << all.routing[i].first;
    }
  }
}

// Models of different sizes in one process, alternately (regression: a smaller model's launch plan once lowered the
// kernel's shared-memory limit below a cached larger plan, whose next launch then failed): every forward runs, and
// each model's rerun is bit-identical to its first forward.
TEST_F(VitFused, ModelsOfDifferentSizesAlternate) {
  const VitConfig sc = small_moe_config();
  Vit small_cpu(sc);
  randomise_shiftadd(small_cpu, 81);
  ViTCuda small(small_cpu);
  const VitConfig tc = converted_deit_tiny();
  Vit tiny_cpu(tc);
  randomise_shiftadd(tiny_cpu, 82);
  ViTCuda tiny(tiny_cpu);
  const std::vector<float> xs = normal(size_t(sc.in_chans) * sc.img_size * sc.img_size, 83);
  const std::vector<float> xt = normal(size_t(tc.in_chans) * tc.img_size * tc.img_size, 84);
  std::vector<float> first_small, first_tiny;
  for (int round = 0; round < 2; ++round) {
    const PathRun b = run_path(tiny, ViTCudaPath::fused, xt, 1);  // the larger plan first
    const PathRun a = run_path(small, ViTCudaPath::fused, xs, 1);
    for (float v : a.logits) ASSERT_TRUE(std::isfinite(v));
    for (float v : b.logits) ASSERT_TRUE(std::isfinite(v));
    if (round == 0) {
      first_small = a.logits, first_tiny = b.logits;
    } else {
      EXPECT_TRUE(bit_identical(first_small, a.logits));
      EXPECT_TRUE(bit_identical(first_tiny, b.logits));
    }
  }
}

// The path choice: automatic takes the fused kernel only up to kVitFusedAutoMaxBatch (0 while it is slower than
// the layered path); forced, it runs up to the kernel's batch limit, layered beyond; models with softmax blocks
// are layered (forcing fused throws).
TEST_F(VitFused, PathChoice) {
  const VitConfig c = small_moe_config();
  Vit cpu(c);
  randomise_shiftadd(cpu, 61);
  ViTCuda net(cpu);
  EXPECT_TRUE(net.fused_supported(1));
  EXPECT_STREQ(net.path_name(1), 1 <= kVitFusedAutoMaxBatch ? "fused" : "layered");
  net.set_path(ViTCudaPath::fused);
  EXPECT_STREQ(net.path_name(1), "fused");
  EXPECT_STREQ(net.path_name(cuda::kFusedMaxBatch + 1), "layered");
  net.set_path(ViTCudaPath::layered);
  EXPECT_STREQ(net.path_name(1), "layered");
  VitConfig s = small_config();
  s.attn = "hsh";
  Vit mixed(s);
  randomise_shiftadd(mixed, 62);
  ViTCuda net2(mixed);
  EXPECT_STREQ(net2.path_name(1), "layered");
  EXPECT_THROW(net2.set_path(ViTCudaPath::fused), sav::Error);
}

// Pure size checks: no GPU needed.
TEST(VitFusedConfig, SupportsOnlyWhatTheKernelCovers) {
  cuda::FusedVitDims d;
  d.N = 197, d.C = 192, d.H = 3, d.F = 768, d.depth = 12, d.Cin = 3, d.S = 224, d.patch = 16, d.V = 1000;
  EXPECT_TRUE(cuda::vit_fused_supports(d, 1));
  EXPECT_TRUE(cuda::vit_fused_supports(d, cuda::kFusedMaxBatch));
  EXPECT_FALSE(cuda::vit_fused_supports(d, 0));
  EXPECT_FALSE(cuda::vit_fused_supports(d, cuda::kFusedMaxBatch + 1));
  cuda::FusedVitDims e = d;
  e.H = 4;  // head size 48
  EXPECT_FALSE(cuda::vit_fused_supports(e, 1));
  e = d, e.C = 768, e.H = 12, e.F = 3072;  // DeiT-Base: K = 3072 beyond the shared-memory A tile
  EXPECT_FALSE(cuda::vit_fused_supports(e, 1));
  e = d, e.nbits = 65;
  EXPECT_FALSE(cuda::vit_fused_supports(e, 1));
  e = d, e.N = 196;  // not (S/p)^2 + 1
  EXPECT_FALSE(cuda::vit_fused_supports(e, 1));
}

}  // namespace
