#include "train/bench.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include "core/rng.h"
#include "ops/cpu/ops.h"
#include "train/optim.h"

namespace sav {

namespace {
template <class F>
double median_ms(F&& f, int iters, int warmup) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}
}  // namespace

BenchResult bench_model(ImageClassifier& model, int batch, int iters, int warmup, bool train) {
  const int S = model.img_size(), Cin = model.in_chans(), V = model.num_classes();
  std::vector<float> x(size_t(batch) * Cin * S * S);
  Rng rng(1234);
  for (float& v : x) v = rng.normal();
  std::vector<int> labels(batch);
  for (int& l : labels) l = static_cast<int>(rng.below(V));
  BenchResult r;
  r.batch = batch;
  r.forward_ms = median_ms([&] { model.forward(x.data(), batch, false); }, iters, warmup);
  if (train) {
    AdamW opt(model.params(), AdamWOptions{});
    std::vector<float> probs(size_t(batch) * V), dl(size_t(batch) * V);
    r.train_step_ms = median_ms(
        [&] {
          model.forward(x.data(), batch, true);
          cpu::cross_entropy_forward(probs.data(), model.logits(), labels.data(), batch, V, 0.1f);
          std::fill(dl.begin(), dl.end(), 0.0f);
          cpu::cross_entropy_backward(dl.data(), probs.data(), labels.data(), batch, V, 0.1f, 1.0f);
          if (DeviceTrainer* dt = model.device_trainer()) {  // gradients and AdamW on the accelerator
            dt->zero_grads();
            model.backward(dl.data());
            dt->optimizer_step(opt.options(), 1e-5f, 1.0f, opt.steps() + 1);
            opt.set_steps(opt.steps() + 1);
            return;
          }
          model.grads().zero();
          model.backward(dl.data());
          clip_grad_norm(model.grads(), 1.0f);
          opt.step(model.params(), model.grads(), 1e-5f);
        },
        iters, warmup);
  }
  return r;
}

}  // namespace sav
