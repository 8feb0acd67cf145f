// shiftaddvit: a GPU copy of a CPU model for the command-line program (`infer --device cuda`, `bench --device
// cuda`): ViTCuda or PvtCuda behind one interface. Host code; the implementation is in the CUDA library.
//
//   auto gpu = sav::make_gpu_model(model, /*tf32*/ false);   // throws without a usable GPU
//   gpu->forward_host(images, logits, B);                    // host pointers, synchronous
//   double ms = gpu->median_ms(64, 50);                      // graph replays on random images
#pragma once

#include <memory>
#include <string>

#include "models/model.h"

namespace sav {

class GpuClassifier {
 public:
  virtual ~GpuClassifier() = default;
  // images (B,Cin,S,S), logits (B,V), host memory.
  virtual void forward_host(const float* images, float* logits, int B) = 0;
  virtual double median_ms(int batch, int iters) = 0;
  // What the products run in, for tables: "bf16" (ViT), "f32" or "tf32" (PVT).
  virtual std::string precision() const = 0;
};

// The model (a sav::Vit or sav::Pvt, dense or converted, release checkpoints included) on the current CUDA
// device. tf32: PVT products on TF32 tensor cores instead of IEEE f32 (ViTs run bf16 products either way).
// Throws sav::Error when there is no usable GPU or the model is beyond the kernels.
std::unique_ptr<GpuClassifier> make_gpu_model(ImageClassifier& model, bool tf32);

// A trainable GPU copy of `model` (a sav::Vit or sav::Pvt, dense or ShiftAddViT; models/vit_cuda_train.h,
// models/pvt_cuda_train.h) for `train --device cuda` and `finetune --device cuda`: an ImageClassifier whose
// forward, backward and optimizer run on the GPU. `model`
// must outlive it; its params() are refreshed by the Trainer before each checkpoint. Throws without a usable
// GPU.
// precision: "f32" (IEEE f32 products), "tf32" (TF32 tensor cores) or "bf16" (mixed precision: bf16 products with
// f32 accumulation, f32 master weights, activations and optimizer state).
std::unique_ptr<ImageClassifier> make_gpu_trainer(ImageClassifier& model, const std::string& precision);

}  // namespace sav
