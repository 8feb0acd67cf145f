// shiftaddvit: checks of whole models against timm golden files (header only, used by tests/test_*.cpp).
//
// synth_logits_check: a model whose parameters are python/synth.py tensors (rebuilt bit-exactly by
// sav::synth_tensor from their names) runs the synthetic input; its logits are compared with timm's float64
// logits stored as two f32 halves (logits + logits_lo) by python/make_golden.py.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>

#include "io/safetensors.h"
#include "io/synth.h"
#include "models/model.h"

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

}  // namespace sav::test
