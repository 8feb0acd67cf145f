// VitCudaTrain (ViT training on the GPU) against the CPU model (sav::Vit), tensor by tensor.
//
// A small ShiftAddViT with every kind of layer (softmax and Hamming attention; dense, shift and MoE linears
// in both the attention and the MLP) runs one training forward with router noise, one backward and one
// clipped AdamW step on both engines from the same weights, seed and data. Products run in IEEE f32 on the
// GPU (F32Math::f32), so the two engines differ only in summation order. Tolerances, as
// max|gpu - cpu| / max|cpu| per tensor:
//   logits, auxiliary loss: 1e-4;  gradients: 2e-3 (each backward chains ~30 ops; the MoE routers' gradients
//   come from differences of nearly equal terms);  parameters after one AdamW step: 1e-4 of the largest
//   parameter (the update is lr * m/sqrt(v) ~ lr per element, so a gradient of the wrong SIGN would show).
// The test first checks that the hash codes and the routing decisions agree (rounding could flip a bit whose
// value is within ~1e-7 of its threshold; the inputs are random and no flip occurs with these seeds).
// Also: a rerun on the GPU is bit-identical; evaluation forwards agree; a training run interrupted by
// --max-steps and resumed on the GPU ends bit-identical to an uninterrupted GPU run; a NaN gradient is
// reported by tensor name.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include "core/rng.h"
#include "cuda_test_util.h"
#include "io/dataset.h"
#include "io/safetensors.h"
#include "models/vit.h"
#include "models/vit_cuda_train.h"
#include "ops/cpu/ops.h"
#include "train/optim.h"
#include "train/trainer.h"
#include "train_compare.h"
#include "vit_random.h"

using namespace sav;
using namespace sav::test;
namespace fs = std::filesystem;

namespace {

class VitCudaTraining : public CudaTest {};

VitConfig mixed_config() {
  VitConfig c;
  c.name = "train_mixed";
  c.img_size = 12, c.patch = 4, c.in_chans = 2, c.num_classes = 7, c.dim = 24, c.depth = 3, c.heads = 3;
  c.mlp_hidden = 40;
  c.attn = "shh", c.mlp = "msd", c.attn_linear = "dms";
  c.hash_bits = 8, c.anchors = 5;
  return c;
}

void copy_model(Vit& dst, Vit& src) {
  std::memcpy(dst.params().flat(), src.params().flat(), sizeof(float) * src.params().numel());
  std::memcpy(dst.buffers()->flat(), src.buffers()->flat(), sizeof(float) * src.buffers()->numel());
}

}  // namespace

TEST_F(VitCudaTraining, OneStepMatchesTheCpuModelTensorByTensor) {
  const VitConfig cfg = mixed_config();
  Vit cpu(cfg), host(cfg);
  randomise_shiftadd(cpu, 11);
  copy_model(host, cpu);
  VitCudaTrain gpu(host, cuda::F32Math::f32);
  expect_step_matches_cpu(cpu, host, gpu, 5);
  // the MoE layers add a load-balancing loss
  cpu.set_noise_seed(1);
  const auto x = random_vec(size_t(2) * cfg.in_chans * cfg.img_size * cfg.img_size, 9);
  cpu.forward(x.data(), 2, true);
  EXPECT_GT(cpu.aux_loss(), 0.0f);
}

TEST_F(VitCudaTraining, DenseModelGradientsMatchAtALargerBatch) {
  VitConfig c = vit_preset("vit_fmnist");
  c.depth = 2;
  Vit cpu(c), host(c);
  randomise(cpu, 21);
  copy_model(host, cpu);
  VitCudaTrain gpu(host, cuda::F32Math::f32);
  const int B = 33;
  const auto images = random_vec(size_t(B) * 28 * 28, 8);
  cpu.forward(images.data(), B, true);
  gpu.forward(images.data(), B, true);
  EXPECT_LT(rel_err(gpu.logits(), cpu.logits(), int64_t(B) * c.num_classes), 1e-4);
  const auto dl = random_vec(size_t(B) * c.num_classes, 9, 0.05f);
  cpu.grads().zero();
  cpu.backward(dl.data());
  gpu.zero_grads();
  gpu.backward(dl.data());
  gpu.grads_host();
  for (size_t i = 0; i < cpu.grads().size(); ++i)
    EXPECT_LT(rel_err(host.grads().tensor(i).f32(), cpu.grads().tensor(i).f32(), cpu.grads().tensor(i).numel()),
              1e-3)
        << cpu.grads().name(i);
}

TEST_F(VitCudaTraining, Tf32ProductsStayClose) {
  const VitConfig cfg = mixed_config();
  Vit cpu(cfg), host(cfg);
  randomise_shiftadd(cpu, 12);
  copy_model(host, cpu);
  VitCudaTrain gpu(host, cuda::F32Math::tf32);
  const int B = 4;
  const auto images = random_vec(size_t(B) * cfg.in_chans * cfg.img_size * cfg.img_size, 4);
  cpu.forward(images.data(), B, false);
  gpu.forward(images.data(), B, false);
  // TF32 rounds product inputs to 10-bit mantissas (2^-11 relative); a hash bit near 0 may flip
  EXPECT_LT(rel_err(gpu.logits(), cpu.logits(), int64_t(B) * cfg.num_classes), 3e-2);
}

TEST_F(VitCudaTraining, ResumedGpuRunEndsBitIdenticalAndNanIsNamed) {
  Dataset ds;
  ds.n = 96, ds.channels = 2, ds.height = 12, ds.width = 12, ds.num_classes = 7;
  ds.pixels.resize(size_t(ds.n) * ds.image_size());
  Rng rng(3);
  for (auto& p : ds.pixels) p = static_cast<uint8_t>(rng.below(256));
  for (int i = 0; i < ds.n; ++i) ds.labels.push_back(i % 7);
  const VitConfig cfg = mixed_config();
  const fs::path dir = fs::temp_directory_path() / ("sav_gpu_resume_" + std::to_string(::getpid()));
  auto run = [&](const std::string& out, int64_t max_steps, bool resume) {
    Vit host(cfg);
    randomise_shiftadd(host, 13);
    VitCudaTrain gpu(host, cuda::F32Math::f32);
    TrainOptions opt;
    opt.epochs = 2, opt.batch = 16, opt.out_dir = out, opt.progress = false, opt.max_steps = max_steps;
    opt.resume = resume, opt.lr = 2e-3f;
    Trainer(gpu, ds, ds, opt).run();
  };
  run((dir / "a").string(), 0, false);
  run((dir / "b").string(), 7, false);
  run((dir / "b").string(), 0, true);
  const Checkpoint a = Checkpoint::open((dir / "a" / "model.safetensors").string());
  const Checkpoint b = Checkpoint::open((dir / "b" / "model.safetensors").string());
  Vit probe(cfg);
  for (size_t i = 0; i < probe.params().size(); ++i) {
    const std::string& n = probe.params().name(i);
    EXPECT_TRUE(bit_identical(a.get(n).to_vector(), b.get(n).to_vector())) << n;
  }

  // a NaN parameter makes a non-finite gradient: the step throws naming a tensor and updates nothing
  Vit host(cfg);
  randomise_shiftadd(host, 13);
  host.params().get("head.weight").f32()[2] = std::nanf("");
  VitCudaTrain gpu(host, cuda::F32Math::f32);
  const auto images = random_vec(size_t(4) * ds.image_size(), 6);
  gpu.forward(images.data(), 4, true);
  const auto dl = random_vec(size_t(4) * 7, 7);
  gpu.zero_grads();
  gpu.backward(dl.data());
  try {
    gpu.optimizer_step(AdamWOptions{}, 1e-3f, 1.0f, 1);
    FAIL() << "a NaN gradient was not reported";
  } catch (const sav::Error& e) {
    EXPECT_NE(std::string(e.what()).find("is not finite"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

// Mixed precision (F32Math::bf16: products with bf16-rounded operands, f32 accumulation, f32 master weights). A
// dense model has no discrete decisions, so the step stays close to the f32 CPU model: bf16 rounds each product
// operand to 2^-9 relative (logits within 2e-2, gradients within 6e-2); the first AdamW step moves every
// parameter by lr * sign(gradient), so a gradient element near 0 may flip sign: parameters within 2.5 lr, and the
// evaluation forward after the step within 5e-2 (measured on the H200: 2.8e-2).
TEST_F(VitCudaTraining, Bf16MixedPrecisionStepStaysClose) {
  VitConfig c = vit_preset("vit_fmnist");
  c.depth = 2;
  Vit cpu(c), host(c);
  randomise(cpu, 23);
  copy_model(host, cpu);
  VitCudaTrain gpu(host, cuda::F32Math::bf16);
  StepTolerances tol;
  tol.logits = 2e-2, tol.grads = 6e-2, tol.params = 2.5e-2;
  tol.eval_after_step = 5e-2;  // after parameters that differ by up to 2.5 lr
  expect_step_matches_cpu(cpu, host, gpu, 17, tol);
}
