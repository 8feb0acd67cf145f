// shiftaddvit: the ViT / DeiT family (timm's VisionTransformer with a class token) and its ShiftAddViT
// reparameterisation, CPU forward and backward. Dense parameters carry timm's state_dict names, so timm
// checkpoints load by name; reparameterised layers add their own names (see nn/linear_layer.h and below).
//
//   sav::VitConfig cfg = sav::vit_preset("deit_tiny_patch16_224");
//   sav::Vit model(cfg);
//   model.load(sav::Checkpoint::open("deit_tiny.safetensors"));   // strict: names and shapes
//   model.forward(images, B);                                       // images (B,Cin,S,S)
//   const float* logits = model.logits();                           // (B,V)
//
// A ShiftAddViT is the same class with per-block kinds (VitConfig::attn, mlp, attn_linear):
//   attention 's' softmax (timm) | 'h' Hamming (METHOD.md section 1): blocks.{i}.attn.to_qk, .to_v, .proj,
//     .dwconv.weight (H,9) trainable; frozen KSH buffers .ksh.anchors (H,m,d), .ksh.mu (H,m), .ksh.A (H,b,m);
//   linears 'd' dense | 's' shift | 'm' MoE(mult, shift) for fc1/fc2 (mlp) and qkv|to_qk,to_v / proj
//     (attn_linear).
//
// Legend: B batch, P patches, N = P+1 tokens, C width, H heads, d = C/H, F = mlp hidden, V classes,
// Cin image channels, S image side, p patch side, M = B*N rows, b hash bits, m anchors.
#pragma once

#include <array>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"
#include "models/model.h"
#include "models/params.h"
#include "nn/linear_layer.h"

namespace sav {

class Checkpoint;

struct VitConfig {
  std::string name = "custom";
  int img_size = 224, patch = 16, in_chans = 3, num_classes = 1000;
  int dim = 192, depth = 12, heads = 3;
  int mlp_hidden = 768;
  float ln_eps = 1e-6f;
  // ShiftAddViT kinds, one character per block (empty: all dense softmax blocks).
  std::string attn;         // 's' softmax | 'h' hamming
  std::string mlp;          // 'd' dense | 's' shift | 'm' moe   (fc1 and fc2)
  std::string attn_linear;  // 'd' | 's' | 'm'                    (qkv or to_qk/to_v, and proj)
  int hash_bits = 16, anchors = 25;

  int grid() const { return img_size / patch; }
  int num_patches() const { return grid() * grid(); }
  int tokens() const { return num_patches() + 1; }
  char attn_kind(int l) const { return attn.empty() ? 's' : attn[l]; }
  char mlp_kind(int l) const { return mlp.empty() ? 'd' : mlp[l]; }
  char attn_linear_kind(int l) const { return attn_linear.empty() ? 'd' : attn_linear[l]; }
  bool is_dense() const;
  void validate() const;  // throws on impossible sizes
  std::string describe() const;
};

// deit_tiny_patch16_224, deit_small_patch16_224, deit_base_patch16_224, vit_fmnist (28x28 grayscale).
VitConfig vit_preset(const std::string& name);
std::vector<std::string> vit_preset_names();
// Config stored in a checkpoint's metadata by Vit::metadata() (keys "sav.vit.*").
VitConfig vit_config_from_metadata(const std::map<std::string, std::string>& md);
// Expands a per-model choice ("hamming", "moe", ...) or a per-block string ("hhss") to one char per block.
std::string expand_kinds(const std::string& spec, int depth, const std::string& what);

class Vit : public ImageClassifier {
 public:
  explicit Vit(const VitConfig& cfg, const ReparamOptions& ropt = {});
  Vit(const Vit&) = delete;
  Vit& operator=(const Vit&) = delete;
  const VitConfig& config() const { return cfg_; }
  ReparamOptions& reparam() { return ropt_; }

  std::string arch() const override { return cfg_.name; }
  int in_chans() const override { return cfg_.in_chans; }
  int img_size() const override { return cfg_.img_size; }
  int num_classes() const override { return cfg_.num_classes; }
  ParamSet& params() override { return params_; }
  ParamSet& grads() override { return grads_; }
  ParamSet* buffers() override { return &buffers_; }
  const ParamSet& params() const { return params_; }
  std::map<std::string, std::string> metadata() const override;
  void set_noise_seed(uint64_t seed) override { noise_rng_.seed_with(seed); }
  float aux_loss() const override;

  void init_random(Rng& rng) override;
  std::string describe() const override { return cfg_.describe(); }
  LayerKinds kinds() const override { return {cfg_.attn, cfg_.mlp, cfg_.attn_linear}; }
  ReparamOptions* reparam_options() override { return &ropt_; }  // timm-style init for training from scratch
  // Copies every parameter and buffer from the checkpoint; throws listing missing / mis-shaped tensors.
  void load(const Checkpoint& ck);

  // images (B,Cin,S,S) -> logits (B,V). `train` keeps activations for backward (and adds router noise).
  void forward(const float* images, int B, bool train = false) override;
  const float* logits() const override { return logits_.f32(); }
  // dlogits (B,V) for the last training forward; gradients accumulate into grads().
  void backward(const float* dlogits) override;

  // Intermediate tensors of the last training forward, by block and name: "ln1", "qkv" (softmax blocks),
  // "qk", "v" (Hamming blocks), "ao", "xmid", "ln2", "fc1", "gelu", "xout". For dumps and KSH fitting.
  Tensor activation(int block, const std::string& what) const;
  // The linear layer with this checkpoint prefix (e.g. "blocks.0.mlp.fc1"), or nullptr.
  LinearLayer* find_linear(const std::string& prefix);
  // MoE layers, for routing reports: (name, layer).
  std::vector<std::pair<std::string, const LinearLayer*>> moe_layers() const;

 private:
  struct Block {
    char attn = 's';
    std::unique_ptr<LinearLayer> qkv, to_qk, to_v, proj, fc1, fc2;
    float *dwconv = nullptr, *ddwconv = nullptr, *anchors = nullptr, *mu = nullptr, *A = nullptr;
    // Every linear of the block (absent ones are nullptr).
    std::array<LinearLayer*, 6> linears() const {
      return {qkv.get(), to_qk.get(), to_v.get(), proj.get(), fc1.get(), fc2.get()};
    }
  };
  struct BlockActs {
    Tensor ln1, mean1, rstd1, qkv, att, qk, v, hsaved, ao, xmid, ln2, mean2, rstd2, fc1, gelu, xout;
    std::vector<uint64_t> codes;
  };
  void ensure_buffers(int B, bool train);

  VitConfig cfg_;
  ReparamOptions ropt_;
  ParamSet params_, grads_, buffers_;
  std::vector<Block> blocks_;
  Rng noise_rng_{0};
  int B_ = 0;
  bool train_buffers_ = false;
  Tensor cols_, pe_, x0_, cls_ln_, cls_mean_, cls_rstd_, logits_, tmp_, dx_, dtmp_, dbig_, dbig2_, scratch_;
  std::vector<BlockActs> acts_;
};

}  // namespace sav
