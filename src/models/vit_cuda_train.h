// shiftaddvit CUDA backend: training a ViT / DeiT (dense or ShiftAddViT) on one GPU. The model is a
// sav::ImageClassifier, so the Trainer, evaluate(), distillation and checkpoints work unchanged:
//
//   sav::Vit cpu(cfg);  cpu.load(ck);                      // the host model: names, metadata, checkpoints
//   sav::VitCudaTrain gpu(cpu, sav::cuda::F32Math::f32);   // parameters, gradients, AdamW moments on the GPU
//   sav::Trainer(gpu, train, test, opt).run();             // forward, backward and AdamW all on the GPU
//
// What runs where: every op of Vit::forward / Vit::backward (patch embedding, LayerNorm, softmax or Hamming
// attention, dense / shift / MoE linears with the router, the load-balancing loss and its gradient, GELU,
// residuals, head) runs on the GPU in float32 activations, with products through cuBLAS(Lt) in IEEE f32
// (F32Math::f32, the parity mode: the CPU engine's results up to summation order) or on TF32 tensor cores
// (F32Math::tf32: inputs rounded to 10-bit mantissas, f32 accumulation, f32 master weights). Gradient
// clipping, the non-finite check and AdamW run on the GPU over one flat parameter array (DeviceTrainer). The
// host sees the logits (B,V) and the auxiliary loss of each forward, and gives back dlogits (B,V): the loss,
// label smoothing and distillation stay the Trainer's own code. Router noise is drawn on the host from the
// same generator, in the same order, as the CPU model's (so a seed gives the CPU's routing up to rounding).
//
// Differences from the CPU model: a MoE layer runs both experts on every token and masks (the CPU gathers
// each expert's tokens); the same rows, so the same values up to the products' summation order. The host
// model's params() are current only after download_state (the Trainer does it before each checkpoint).
//
// Legend: B batch, N tokens, C width, H heads, F mlp hidden, V classes, M = B*N rows.
#pragma once

#include <memory>
#include <string>

#include "models/model.h"
#include "models/vit.h"
#include "ops/cuda/gemm.h"

namespace sav {

class VitCudaTrain : public ImageClassifier, public DeviceTrainer {
 public:
  // Copies the parameters and buffers of `model` to the current device. `model` must outlive this object;
  // its ReparamOptions are read at each forward. Throws sav::Error for sizes the kernels do not cover and
  // for ReparamOptions::release_compat (inference-only).
  VitCudaTrain(Vit& model, cuda::F32Math math);
  ~VitCudaTrain() override;
  VitCudaTrain(const VitCudaTrain&) = delete;
  VitCudaTrain& operator=(const VitCudaTrain&) = delete;

  // ImageClassifier: host images in, host logits out (synchronous).
  std::string arch() const override;
  int in_chans() const override;
  int img_size() const override;
  int num_classes() const override;
  void forward(const float* images, int B, bool train) override;
  const float* logits() const override;
  void backward(const float* dlogits) override;
  float aux_loss() const override;
  ParamSet& params() override;
  ParamSet& grads() override;  // the host model's (NOT updated: gradients live on the device; see grads_host)
  ParamSet* buffers() override;
  void set_noise_seed(uint64_t seed) override;
  void init_random(Rng& rng) override;  // on the host model, then uploaded
  std::string describe() const override;
  LayerKinds kinds() const override;
  ReparamOptions* reparam_options() override;
  std::map<std::string, std::string> metadata() const override;
  DeviceTrainer* device_trainer() override { return this; }

  // DeviceTrainer
  void zero_grads() override;
  float optimizer_step(const AdamWOptions& opt, float lr, float clip, int64_t t) override;
  void download_state(ParamSet* m, ParamSet* v) override;
  void upload_state(const ParamSet* m, const ParamSet* v) override;

  // The device gradients of the last backward copied into the host model's grads() (tests, reports).
  void grads_host();
  cuda::F32Math math() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sav
