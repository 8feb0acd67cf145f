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

#include "models/cuda_train_model.h"
#include "models/vit.h"

namespace sav {

class VitCudaTrain : public CudaTrainModel {
 public:
  // Throws sav::Error for sizes the kernels do not cover and for ReparamOptions::release_compat.
  VitCudaTrain(Vit& model, cuda::F32Math math);
  ~VitCudaTrain() override;

  void forward(const float* images, int B, bool train) override;
  void backward(const float* dlogits) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sav
