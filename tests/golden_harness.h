// shiftaddvit: checks of whole models against timm golden files (header only, used by tests/test_*.cpp).
//
// synth_logits_check: a model whose parameters are python/synth.py tensors (rebuilt bit-exactly by
// sav::synth_tensor from their names) runs the synthetic input; its logits are compared with timm's float64
// logits stored as two f32 halves (logits + logits_lo) by python/make_golden.py.
// check_training_golden: a training step on a golden_training() file of python/make_golden.py (weights,
// input, target, float64 logits, loss with label smoothing 0.1, every parameter gradient "grad.<name>").
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "io/synth.h"
#include "models/model.h"
#include "op_harness.h"
#include "ops/cpu/ops.h"

namespace sav::test {

struct LogitsCheck {
  double max_err = 0, max_ref = 0;  // max |engine - timm| and max |timm|
  double rel() const { return max_ref > 0 ? max_err / max_ref : max_err; }
};

inline LogitsCheck synth_logits_check(ImageClassifier& model, const std::string& golden_file, int batch) {
  Checkpoint ck = Checkpoint::open(golden_file);
  for (size_t i = 0; i < model.params().size(); ++i)
    model.params().tensor(i).copy_from(synth_tensor(model.params().name(i), model.params().tensor(i).shape()));
  Tensor x = synth_tensor("input", {batch, model.in_chans(), model.img_size(), model.img_size()});
  model.forward(x.f32(), batch, false);
  Tensor hi = ck.get("logits"), lo = ck.get("logits_lo");
  LogitsCheck r;
  for (int64_t i = 0; i < hi.numel(); ++i) {
    const double ref = double(hi.f32()[i]) + double(lo.f32()[i]);
    r.max_err = std::max(r.max_err, std::fabs(model.logits()[i] - ref));
    r.max_ref = std::max(r.max_ref, std::fabs(ref));
  }
  return r;
}

// Loads the file's weights into `model`, runs a training forward on its input (logits within 1e-5), the
// label-smoothed (0.1) cross-entropy against its targets (loss within 1e-5) and the backward pass, then
// compares every parameter gradient with grad_tol(name); *checked counts the gradients compared.
template <class Model>  // sav::Vit, sav::Pvt: anything with load(const Checkpoint&)
void check_training_golden(Model& model, const std::string& golden_file,
                           const std::function<double(const std::string&)>& grad_tol, int* checked) {
  Checkpoint ck = Checkpoint::open(golden_file);
  model.load(ck);
  Tensor x = ck.get("input");
  Tensor target = ck.get_raw("target");
  const int B = static_cast<int>(x.dim(0)), V = model.num_classes();
  model.forward(x.f32(), B, true);
  EXPECT_LT(norm_err(model.logits(), ck.get("logits").f32(), size_t(B) * V), 1e-5) << "logits";

  std::vector<float> probs(size_t(B) * V), dl(size_t(B) * V, 0.0f);
  const float loss = cpu::cross_entropy_forward(probs.data(), model.logits(), target.as<int32_t>(), B, V, 0.1f);
  EXPECT_NEAR(loss, ck.get("loss").f32()[0], 1e-5 * std::fabs(ck.get("loss").f32()[0]) + 1e-6);
  cpu::cross_entropy_backward(dl.data(), probs.data(), target.as<int32_t>(), B, V, 0.1f, 1.0f);
  model.grads().zero();
  model.backward(dl.data());
  *checked = 0;
  for (size_t i = 0; i < model.grads().size(); ++i) {
    const std::string& n = model.grads().name(i);
    ASSERT_TRUE(ck.contains("grad." + n)) << n;
    Tensor ref = ck.get("grad." + n);
    ASSERT_EQ(ref.shape(), model.grads().tensor(i).shape()) << n;
    EXPECT_LT(norm_err(model.grads().tensor(i).f32(), ref.f32(), size_t(ref.numel())), grad_tol(n)) << n;
    ++*checked;
  }
}

}  // namespace sav::test
