// shiftaddvit: the interface every image classifier of the engine implements (dense ViT today,
// ShiftAddViT and PVTv2 next), so the trainer, evaluator, benchmarks and CLI work with any of them.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "models/params.h"

namespace sav {

class Rng;
struct ReparamOptions;
struct AdamWOptions;

// Training that keeps the parameters, gradients and AdamW moments on an accelerator (the GPU trainer of
// models/vit_cuda_train.h). The Trainer calls these instead of its host optimizer when a model offers one;
// the host ParamSet (params()) is brought up to date by download_state before every checkpoint.
class DeviceTrainer {
 public:
  virtual ~DeviceTrainer() = default;
  virtual void zero_grads() = 0;
  // Clips the gradients to global L2 norm `clip` (<= 0: no clipping) and applies AdamW step number t (1 for
  // the first) with learning rate lr, as train/optim.h; returns the norm before clipping. Throws sav::Error
  // naming the first non-finite gradient tensor (nothing is updated then).
  virtual float optimizer_step(const AdamWOptions& opt, float lr, float clip, int64_t t) = 0;
  // Device -> host: the parameters into the model's params(), the moments into m and v (nullptr: skip).
  virtual void download_state(ParamSet* m, ParamSet* v) = 0;
  // Host -> device: the model's params() (and buffers), and the moments when given (after a resume).
  virtual void upload_state(const ParamSet* m, const ParamSet* v) = 0;
};

// What a model's layers are (one character per block or stage; empty strings: all dense / softmax).
struct LayerKinds {
  std::string attn, mlp, attn_linear;
};

class ImageClassifier {
 public:
  virtual ~ImageClassifier() = default;
  virtual std::string arch() const = 0;
  virtual int in_chans() const = 0;
  virtual int img_size() const = 0;
  virtual int num_classes() const = 0;
  // images (B,Cin,S,S) -> logits (B,V). `train` keeps activations for backward (and enables noise).
  virtual void forward(const float* images, int B, bool train) = 0;
  virtual const float* logits() const = 0;
  // Accumulates gradients of (loss whose d/dlogits is dlogits) + aux_loss() into grads().
  virtual void backward(const float* dlogits) = 0;
  // Auxiliary loss of the last forward (e.g. MoE load balancing), already scaled; 0 for dense models.
  virtual float aux_loss() const { return 0.0f; }
  virtual ParamSet& params() = 0;
  virtual ParamSet& grads() = 0;
  // Frozen tensors saved with the model but never trained (e.g. KSH hash parameters); may be empty.
  virtual ParamSet* buffers() { return nullptr; }
  // Seeds the randomness of training forwards (router noise) so a step is a function of its seed.
  virtual void set_noise_seed(uint64_t /*seed*/) {}
  // Fresh random parameters as timm initialises the architecture (training from scratch).
  virtual void init_random(Rng& rng) = 0;
  // One line: arch, geometry and, for ShiftAddViT models, the layer kinds.
  virtual std::string describe() const { return arch(); }
  virtual LayerKinds kinds() const { return {}; }
  // Reparameterisation options (shift kernel, MoE gate, ...) shared by the model's layers.
  virtual ReparamOptions* reparam_options() { return nullptr; }
  // Everything needed to rebuild the model from a checkpoint, stored in its __metadata__.
  virtual std::map<std::string, std::string> metadata() const = 0;
  // Non-null for models that train on an accelerator (see DeviceTrainer).
  virtual DeviceTrainer* device_trainer() { return nullptr; }
};

}  // namespace sav
