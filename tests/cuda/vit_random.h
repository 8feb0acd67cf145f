// Random ViT / ShiftAddViT weights for the CUDA tests (test_vit_cuda.cpp, test_vit_cuda_train.cpp).
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "core/rng.h"
#include "models/vit.h"
#include "nn/linear_layer.h"

namespace sav::test {

// Random weights with non-trivial biases and LayerNorm affines (init_random leaves them at 0 and 1).
inline void randomise(Vit& m, uint64_t seed) {
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

// A random ShiftAddViT as a conversion (reparam/convert.h) would leave it, with trained-looking routers
// and hashes: dense weights as randomise(); every shift layer and MoE shift expert the shift version of a
// random dense weight (p = round(log2|w|), s = sign(w)), its MoE expert 0 that dense weight; routers
// random with logits ~ N(0,1) (both experts get tokens); 9-tap convs random; KSH anchors random unit
// vectors, mu near the mean kernel value exp(-1/2) (D ~ 2 between random unit vectors, sigma ~ 2), so
// about half the bits are set; A random.
inline void randomise_shiftadd(Vit& m, uint64_t seed) {
  randomise(m, seed);
  const VitConfig& c = m.config();
  Rng rng(seed + 1000);
  const int d = c.dim / c.heads;
  for (int l = 0; l < c.depth; ++l) {
    const std::string p = "blocks." + std::to_string(l) + ".";
    for (const char* name : {"attn.qkv", "attn.to_qk", "attn.to_v", "attn.proj", "mlp.fc1", "mlp.fc2"}) {
      LinearLayer* lin = m.find_linear(p + name);
      if (!lin || lin->kind() == LinearKind::dense) continue;
      const int K = lin->in_features(), F = lin->out_features();
      std::vector<float> w(size_t(F) * K), b(F);
      for (auto& x : w) x = rng.trunc_normal(0.02f);
      for (auto& x : b) x = rng.uniform(-0.1f, 0.1f);
      lin->init_from_dense(w.data(), b.data());
      if (lin->kind() == LinearKind::moe) {
        const Tensor& rw = m.params().get(p + name + std::string(".router.weight"));
        for (int64_t i = 0; i < rw.numel(); ++i) rw.f32()[i] = rng.normal() / std::sqrt(float(K));
        const Tensor& rb = m.params().get(p + name + std::string(".router.bias"));
        for (int64_t i = 0; i < rb.numel(); ++i) rb.f32()[i] = rng.uniform(-0.1f, 0.1f);
      }
    }
    if (c.attn_kind(l) != 'h') continue;
    const Tensor& conv = m.params().get(p + "attn.dwconv.weight");
    for (int64_t i = 0; i < conv.numel(); ++i) conv.f32()[i] = 0.2f * rng.normal();
    ParamSet& bufs = *m.buffers();
    const Tensor& an = bufs.get(p + "attn.ksh.anchors");
    for (int64_t r = 0; r < an.numel() / d; ++r) {
      float* a = an.f32() + r * d;
      double ss = 0.0;
      for (int i = 0; i < d; ++i) a[i] = rng.normal(), ss += double(a[i]) * a[i];
      for (int i = 0; i < d; ++i) a[i] = float(a[i] / std::sqrt(ss));
    }
    const Tensor& mu = bufs.get(p + "attn.ksh.mu");
    for (int64_t i = 0; i < mu.numel(); ++i) mu.f32()[i] = std::exp(-0.5f) + 0.02f * rng.normal();
    const Tensor& A = bufs.get(p + "attn.ksh.A");
    for (int64_t i = 0; i < A.numel(); ++i) A.f32()[i] = rng.normal();
  }
}

}  // namespace sav::test
