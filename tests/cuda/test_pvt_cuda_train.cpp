// PvtCudaTrain (PVTv2 training on the GPU) against the CPU model (sav::Pvt), tensor by tensor, with the
// shared one-step check of train_compare.h (logits and aux loss within 1e-4, every gradient tensor within 2e-3,
// parameters after a clipped AdamW step within 1e-4, a bit-identical rerun, the evaluation forward):
//   - a dense PVT whose softmax stages all use spatial reduction (sr 4 and 2: the sr conv, its norm, col2im)
//     and overlapping patch embeddings (k7 s4, k3 s2);
//   - a converted PVT: Hamming attention in stages 1-2 (over all tokens), softmax in stage 3, MoE in the MLPs
//     and attention linears, shift MLP in the last stage, router noise.
// And a Fashion-MNIST-shaped PVT (the pvt_fmnist preset) trains a few steps through the Trainer on the GPU.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "core/rng.h"
#include "cuda_test_util.h"
#include "io/dataset.h"
#include "models/pvt.h"
#include "models/pvt_cuda_train.h"
#include "models/registry.h"
#include "pvt_random.h"
#include "train/trainer.h"
#include "train_compare.h"

using namespace sav;
using namespace sav::test;

namespace {

class PvtCudaTraining : public CudaTest {};

PvtConfig dense_tiny() {
  PvtConfig c;
  c.name = "tiny_dense";
  c.img_size = 40, c.num_classes = 9;
  c.dims = {16, 24, 32}, c.heads = {1, 2, 2}, c.depths = {1, 2, 1}, c.sr = {4, 2, 1}, c.mlp_ratios = {2, 3, 2};
  return c;
}

void copy_model(Pvt& dst, Pvt& src) {
  std::memcpy(dst.params().flat(), src.params().flat(), sizeof(float) * src.params().numel());
  if (src.buffers()->numel())
    std::memcpy(dst.buffers()->flat(), src.buffers()->flat(), sizeof(float) * src.buffers()->numel());
}

}  // namespace

TEST_F(PvtCudaTraining, DenseStepWithSpatialReductionMatchesCpu) {
  Pvt cpu(dense_tiny()), host(dense_tiny());
  Rng rng(17);
  cpu.init_random(rng);
  for (size_t i = 0; i < cpu.params().size(); ++i)  // non-trivial biases and norms
    if (cpu.params().tensor(i).ndim() == 1)
      for (int64_t j = 0; j < cpu.params().tensor(i).numel(); ++j)
        cpu.params().tensor(i).f32()[j] += 0.1f * rng.normal();
  copy_model(host, cpu);
  PvtCudaTrain gpu(host, cuda::F32Math::f32);
  expect_step_matches_cpu(cpu, host, gpu, 3);
}

TEST_F(PvtCudaTraining, ConvertedStepMatchesCpu) {
  auto cpu = converted_tiny(5);
  auto host = converted_tiny(5);
  PvtCudaTrain gpu(*host, cuda::F32Math::f32);
  expect_step_matches_cpu(*cpu, *host, gpu, 3);
}

TEST_F(PvtCudaTraining, FashionMnistShapedModelTrainsThroughTheTrainer) {
  Dataset ds;
  ds.n = 64, ds.channels = 1, ds.height = 28, ds.width = 28, ds.num_classes = 10;
  ds.pixels.resize(size_t(ds.n) * ds.image_size());
  Rng rng(3);
  for (int i = 0; i < ds.n; ++i) {  // a learnable signal: the label sets the brightness of one quadrant
    ds.labels.push_back(i % 10);
    for (size_t p = 0; p < ds.image_size(); ++p) ds.pixels[i * ds.image_size() + p] = uint8_t(rng.below(64));
    for (int y = 0; y < 14; ++y)
      for (int x = 0; x < 14; ++x) ds.pixels[i * ds.image_size() + (y + 14 * (i % 2)) * 28 + x] += uint8_t(19 * (i % 10));
  }
  auto host = create_model("pvt_fmnist", {});
  Rng init(1);
  host->init_random(init);
  PvtCudaTrain gpu(dynamic_cast<Pvt&>(*host), cuda::F32Math::f32);
  TrainOptions opt;
  opt.epochs = 8, opt.batch = 16, opt.progress = false, opt.lr = 2e-3f, opt.warmup_epochs = 0;
  const TrainSummary s = Trainer(gpu, ds, ds, opt).run();
  ASSERT_EQ(s.epochs.size(), 8u);
  EXPECT_LT(s.epochs.back().train_loss, s.epochs.front().train_loss) << "the loss did not go down";
}

// Mixed precision on the dense PVT (tolerances as VitCudaTraining.Bf16MixedPrecisionStepStaysClose).
TEST_F(PvtCudaTraining, Bf16MixedPrecisionStepStaysClose) {
  Pvt cpu(dense_tiny()), host(dense_tiny());
  Rng rng(19);
  cpu.init_random(rng);
  copy_model(host, cpu);
  PvtCudaTrain gpu(host, cuda::F32Math::bf16);
  StepTolerances tol;
  tol.logits = 2e-2, tol.grads = 6e-2, tol.params = 2.5e-2;
  tol.eval_after_step = 5e-2;  // after parameters that differ by up to 2.5 lr
  expect_step_matches_cpu(cpu, host, gpu, 3, tol);
}
