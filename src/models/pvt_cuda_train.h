// shiftaddvit CUDA backend: training a PVTv2 (dense or ShiftAddViT) on one GPU, an ImageClassifier for the
// Trainer (see models/cuda_train_model.h for what lives where):
//
//   sav::Pvt cpu(cfg);  cpu.load(ck);
//   sav::PvtCudaTrain gpu(cpu, sav::cuda::F32Math::f32);
//   sav::Trainer(gpu, train, test, opt).run();
//
// Pvt::forward / Pvt::backward (models/pvt.cpp) op for op on the GPU in float32: overlapping patch-embedding
// convolutions (channels-last im2col + product; backward col2im), LayerNorms, spatial-reduction softmax
// attention (sr conv + norm, separate q and kv products) or Hamming attention over all tokens, dense / shift /
// MoE linears, the MLP's 3x3 depthwise conv + GELU, residuals, stage norms, token-mean head. Products in IEEE
// f32 or on TF32 tensor cores.
#pragma once

#include <memory>

#include "models/cuda_train_model.h"
#include "models/pvt.h"

namespace sav {

class PvtCudaTrain : public CudaTrainModel {
 public:
  // Throws sav::Error for sizes the kernels do not cover and for ReparamOptions::release_compat.
  PvtCudaTrain(Pvt& model, cuda::F32Math math);
  ~PvtCudaTrain() override;

  void forward(const float* images, int B, bool train) override;
  void backward(const float* dlogits) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sav
