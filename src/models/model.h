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
  virtual void set_noise_seed(uint64_t seed) {}
  // Fresh random parameters as timm initialises the architecture (training from scratch).
  virtual void init_random(Rng& rng) = 0;
  // One line: arch, geometry and, for ShiftAddViT models, the layer kinds.
  virtual std::string describe() const { return arch(); }
  virtual LayerKinds kinds() const { return {}; }
  // Reparameterisation options (shift kernel, MoE gate, ...) shared by the model's layers.
  virtual ReparamOptions* reparam_options() { return nullptr; }
  // Everything needed to rebuild the model from a checkpoint, stored in its __metadata__.
  virtual std::map<std::string, std::string> metadata() const = 0;
};

}  // namespace sav
