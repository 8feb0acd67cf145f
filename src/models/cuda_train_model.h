// shiftaddvit CUDA backend: the base of the GPU-trained models (VitCudaTrain, PvtCudaTrain). It wraps a host
// model (names, metadata, checkpoints) and keeps the parameters, gradients and AdamW moments on the GPU
// (cuda_train::Core); subclasses implement forward and backward with the device ops.
//
// The ImageClassifier interface works with host memory: forward takes host images and leaves host logits
// (synchronous), backward takes host dlogits. The host model's params() are current only after download_state
// (the Trainer does it before each checkpoint); grads() is the host model's and is filled only by grads_host().
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "models/model.h"
#include "ops/cuda/gemm.h"  // F32Math

namespace sav {

namespace cuda_train {
class Core;
}

class CudaTrainModel : public ImageClassifier, public DeviceTrainer {
 public:
  // Copies the parameters and buffers of `host` to the current device; `host` must outlive this object and its
  // ReparamOptions are read at each forward. Throws sav::Error for ReparamOptions::release_compat.
  CudaTrainModel(ImageClassifier& host, cuda::F32Math math);
  ~CudaTrainModel() override;
  CudaTrainModel(const CudaTrainModel&) = delete;
  CudaTrainModel& operator=(const CudaTrainModel&) = delete;

  std::string arch() const override { return host_.arch(); }
  int in_chans() const override { return host_.in_chans(); }
  int img_size() const override { return host_.img_size(); }
  int num_classes() const override { return host_.num_classes(); }
  const float* logits() const override { return logits_h_.data(); }
  float aux_loss() const override { return aux_; }
  ParamSet& params() override { return host_.params(); }
  ParamSet& grads() override { return host_.grads(); }
  ParamSet* buffers() override { return host_.buffers(); }
  void set_noise_seed(uint64_t seed) override;
  void init_random(Rng& rng) override;  // on the host model, then uploaded
  std::string describe() const override { return host_.describe(); }
  LayerKinds kinds() const override { return host_.kinds(); }
  ReparamOptions* reparam_options() override { return host_.reparam_options(); }
  std::map<std::string, std::string> metadata() const override { return host_.metadata(); }
  DeviceTrainer* device_trainer() override { return this; }

  void zero_grads() override;
  float optimizer_step(const AdamWOptions& opt, float lr, float clip, int64_t t) override;
  void download_state(ParamSet* m, ParamSet* v) override;
  void upload_state(const ParamSet* m, const ParamSet* v) override;

  // The device gradients of the last backward copied into the host model's grads() (tests, reports).
  void grads_host();
  cuda::F32Math math() const;

 protected:
  cuda_train::Core& core() { return *core_; }
  std::vector<float> logits_h_;  // (B,V) of the last forward
  float aux_ = 0.0f;             // its auxiliary loss

 private:
  ImageClassifier& host_;
  std::unique_ptr<cuda_train::Core> core_;
};

}  // namespace sav
