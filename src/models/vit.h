// shiftaddvit: the ViT / DeiT family (timm's VisionTransformer with a class token), CPU forward and
// backward, parameters named as timm's state_dict so timm checkpoints load by name.
//
//   sav::VitConfig cfg = sav::vit_preset("deit_tiny_patch16_224");
//   sav::Vit model(cfg);
//   model.load(sav::Checkpoint::open("deit_tiny.safetensors"));   // strict: names and shapes
//   model.forward(images, B);                                       // images (B,Cin,S,S)
//   const float* logits = model.logits();                           // (B,V)
//
// Training: forward(images, B, /*train=*/true), loss via cross_entropy, then backward(dlogits) fills
// model.grads() (accumulating).
//
// Legend: B batch, P patches, N = P+1 tokens, C width, H heads, d = C/H, F = mlp hidden, V classes,
// Cin image channels, S image side, p patch side, M = B*N rows.
#pragma once

#include <string>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"
#include "models/model.h"
#include "models/params.h"

namespace sav {

class Checkpoint;

struct VitConfig {
  std::string name = "custom";
  int img_size = 224, patch = 16, in_chans = 3, num_classes = 1000;
  int dim = 192, depth = 12, heads = 3;
  int mlp_hidden = 768;
  float ln_eps = 1e-6f;

  int grid() const { return img_size / patch; }
  int num_patches() const { return grid() * grid(); }
  int tokens() const { return num_patches() + 1; }
  void validate() const;  // throws on impossible sizes
  std::string describe() const;
};

// deit_tiny_patch16_224, deit_small_patch16_224, deit_base_patch16_224, vit_fmnist (28x28 grayscale).
VitConfig vit_preset(const std::string& name);
// Config stored in a checkpoint's metadata by Vit::metadata() (keys "sav.vit.*").
VitConfig vit_config_from_metadata(const std::map<std::string, std::string>& md);
std::vector<std::string> vit_preset_names();

class Vit : public ImageClassifier {
 public:
  explicit Vit(const VitConfig& cfg);
  const VitConfig& config() const { return cfg_; }

  std::string arch() const override { return cfg_.name; }
  int in_chans() const override { return cfg_.in_chans; }
  int img_size() const override { return cfg_.img_size; }
  int num_classes() const override { return cfg_.num_classes; }
  ParamSet& params() override { return params_; }
  ParamSet& grads() override { return grads_; }
  const ParamSet& params() const { return params_; }
  std::map<std::string, std::string> metadata() const override;

  void init_random(Rng& rng);  // timm-style init for training from scratch
  // Copies every parameter from the checkpoint; throws listing missing / mis-shaped / unexpected tensors.
  void load(const Checkpoint& ck);
  std::vector<std::pair<std::string, Tensor>> named_tensors() const;

  // images (B,Cin,S,S) -> logits (B,V). `train` keeps activations for backward.
  void forward(const float* images, int B, bool train = false) override;
  const float* logits() const override { return logits_.f32(); }
  // dlogits (B,V) for the last training forward; gradients accumulate into grads().
  void backward(const float* dlogits) override;

 private:
  struct BlockActs {
    Tensor ln1, mean1, rstd1, qkv, att, ao, xmid, ln2, mean2, rstd2, fc1, gelu, xout;
  };
  void ensure_buffers(int B, bool train);

  VitConfig cfg_;
  ParamSet params_, grads_;
  int B_ = 0;
  bool train_buffers_ = false;
  Tensor cols_, pe_, x0_, cls_ln_, cls_mean_, cls_rstd_, logits_, tmp_, dx_, dtmp_, dbig_, scratch_;
  std::vector<BlockActs> acts_;
};

}  // namespace sav
