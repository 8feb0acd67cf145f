// A random converted PVTv2 for the CUDA tests (test_pvt_cuda.cpp, test_pvt_cuda_train.cpp).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"
#include "models/pvt.h"
#include "op_harness.h"
#include "reparam/convert.h"

namespace sav::test {

// A small converted PVT (Hamming stages 1-2, softmax 3 with spatial reduction, MoE everywhere, shift in the
// last stage's MLP), its routers and token convs perturbed so both experts and the conv are exercised.
inline std::unique_ptr<Pvt> converted_tiny(uint64_t seed) {
  PvtConfig c;
  c.name = "tiny";
  c.img_size = 40, c.num_classes = 9;
  c.dims = {16, 24, 32}, c.heads = {1, 2, 2}, c.depths = {1, 2, 1}, c.sr = {4, 2, 1}, c.mlp_ratios = {2, 3, 2};
  Pvt dense(c);
  Rng rng(seed);
  dense.init_random(rng);
  for (size_t i = 0; i < dense.params().size(); ++i) {  // non-trivial biases and norms
    const Tensor& t = dense.params().tensor(i);
    if (dense.params().name(i).find("bias") != std::string::npos)
      for (int64_t j = 0; j < t.numel(); ++j) t.f32()[j] += 0.1f * rng.normal();
  }
  const int n = 4;
  const std::vector<float> calib = normal(size_t(n) * 3 * 40 * 40, seed + 7);
  ConvertOptions opt;
  opt.attn = "hhs", opt.mlp = "mms", opt.attn_linear = "mmd";
  opt.seed = seed;
  auto m = convert_pvt(dense, opt, calib.data(), n);
  for (size_t i = 0; i < m->params().size(); ++i) {
    const std::string& name = m->params().name(i);
    const Tensor& t = m->params().tensor(i);
    if (name.find("router.weight") != std::string::npos || name.find("attn.dwconv") != std::string::npos)
      for (int64_t j = 0; j < t.numel(); ++j) t.f32()[j] = 0.3f * rng.normal();
  }
  return m;
}

}  // namespace sav::test
