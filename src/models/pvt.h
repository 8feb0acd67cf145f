// shiftaddvit: PVTv2 (timm's PyramidVisionTransformerV2) and its ShiftAddViT reparameterisation, CPU forward
// and backward. Dense parameters carry timm's state_dict names, so timm checkpoints load by name.
//
//   sav::Pvt model(sav::pvt_preset("pvt_v2_b0"));
//   model.load(sav::Checkpoint::open("pvt_v2_b0.safetensors"));
//   model.forward(images, B);                 // images (B,Cin,S,S)
//   const float* logits = model.logits();     // (B,V)
//
// Architecture (per stage s = 0..3): an overlapping patch embedding (stage 0: `patch_embed`, conv k7 s4 p3;
// later stages: `stages.{s}.downsample`, conv k3 s2 p1) followed by LayerNorm (eps 1e-5); depths[s] pre-norm
// blocks `stages.{s}.blocks.{i}`; the stage norm `stages.{s}.norm`. The head reads the mean over the last
// stage's tokens. Block: x += attn(norm1(x)); x += mlp(norm2(x)) with
//   attention 's' (timm): q = attn.q(x); kv = attn.kv(sr(x)) where sr is, for sr_ratio r > 1, conv k=s=r
//                 (`attn.sr`) + LayerNorm eps 1e-5 (`attn.norm`) over the token grid; softmax attention over
//                 the reduced tokens; attn.proj;
//   attention 'h' (ShiftAddViT, METHOD.md section 1): Hamming attention over all tokens (no spatial
//                 reduction) with attn.to_qk, attn.to_v, attn.dwconv.weight (H,9), frozen KSH buffers
//                 attn.ksh.{anchors (H,m,d), mu (H,m), A (H,b,m)}; attn.proj;
//   MLP: mlp.fc1 -> mlp.dwconv (3x3 depthwise conv over the token grid, bias; timm 1.x name, the original
//        PVT repository calls it mlp.dwconv.dwconv) -> GELU -> mlp.fc2.
// Linears (q, kv, to_qk, to_v, proj per attn_linear; fc1, fc2 per mlp) are dense 'd', shift 's' or MoE 'm'
// (nn/linear_layer.h), one character per stage.
//
// Token tensors are (B,N,C) with N = g*g tokens of the stage's square grid in row-major order, i.e. the
// channels-last (B,g,g,C) image that timm reshapes to and from (B,C,g,g).
// Legend: B batch, g grid side of a stage, N = g*g tokens, Nk tokens after spatial reduction, C stage width,
// H heads, d = C/H, F = C * mlp_ratio, V classes, M = B*N rows.
#pragma once

#include <array>
#include <functional>
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

struct PvtConfig {
  std::string name = "custom";
  int img_size = 224, in_chans = 3, num_classes = 1000;
  int stem_patch = 7, stem_stride = 4;  // stage-0 patch embedding (timm: 7, 4); padding stem_patch / 2
  std::vector<int> dims{32, 64, 160, 256}, heads{1, 2, 5, 8}, depths{2, 2, 2, 2}, sr{8, 4, 2, 1};
  std::vector<int> mlp_ratios{8, 8, 4, 4};
  float ln_eps = 1e-6f;        // block and stage norms (timm LayerNorm)
  float embed_ln_eps = 1e-5f;  // patch-embedding and spatial-reduction norms (torch nn.LayerNorm)
  // ShiftAddViT kinds, one character per stage (empty: the dense timm model).
  std::string attn;         // 's' softmax with spatial reduction | 'h' Hamming over all tokens
  std::string mlp;          // 'd' dense | 's' shift | 'm' moe   (fc1 and fc2)
  std::string attn_linear;  // 'd' | 's' | 'm'                    (q, kv | to_qk, to_v, and proj)
  int hash_bits = 16, anchors = 25;

  int stages() const { return static_cast<int>(dims.size()); }
  int grid(int s) const;     // token grid side of stage s
  int tokens(int s) const { return grid(s) * grid(s); }
  int kv_grid(int s) const;  // grid side after the spatial reduction (softmax blocks)
  int mlp_hidden(int s) const { return dims[s] * mlp_ratios[s]; }
  int total_blocks() const;
  char attn_kind(int s) const { return attn.empty() ? 's' : attn[s]; }
  char mlp_kind(int s) const { return mlp.empty() ? 'd' : mlp[s]; }
  char attn_linear_kind(int s) const { return attn_linear.empty() ? 'd' : attn_linear[s]; }
  bool is_dense() const;
  void validate() const;  // throws on impossible sizes
  std::string describe() const;
};

// pvt_v2_b0, pvt_v2_b1, pvt_v2_b2 (timm), pvt_fmnist (28x28 grayscale, stem k3 s2: grids 14/7/4/2).
PvtConfig pvt_preset(const std::string& name);
std::vector<std::string> pvt_preset_names();
bool is_pvt_arch(const std::string& name);
// Config stored in a checkpoint's metadata by Pvt::metadata() (keys "sav.pvt.*").
PvtConfig pvt_config_from_metadata(const std::map<std::string, std::string>& md);

class Pvt : public ImageClassifier {
 public:
  explicit Pvt(const PvtConfig& cfg, const ReparamOptions& ropt = {});
  Pvt(const Pvt&) = delete;
  Pvt& operator=(const Pvt&) = delete;
  const PvtConfig& config() const { return cfg_; }
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
  ReparamOptions* reparam_options() override { return &ropt_; }  // timm's PVTv2 init (trunc-normal linears, fan-out normal convs)
  // Copies every parameter and buffer from the checkpoint; throws listing missing / mis-shaped tensors.
  void load(const Checkpoint& ck);

  void forward(const float* images, int B, bool train = false) override;
  const float* logits() const override { return logits_.f32(); }
  void backward(const float* dlogits) override;

  // Blocks in order (stage by stage); block l's checkpoint prefix, e.g. "stages.1.blocks.0.".
  int num_blocks() const { return static_cast<int>(blocks_.size()); }
  int block_stage(int l) const { return blocks_[l].stage; }
  const std::string& block_prefix(int l) const { return blocks_[l].prefix; }
  // Intermediate tensors of the last training forward: per block "ln1", "q" (softmax) or "qk", "v"
  // (Hamming), "ao", "xmid", "xout"; per stage (block = -1 - s) "embed" (after the patch-embedding norm)
  // and "out" (after the stage norm).
  Tensor activation(int block, const std::string& what) const;
  // Optional observer of every forward (inference included): called with intermediate tensors of B*N rows
  // and C columns, valid only during the call: per stage (block = -1 - s) "embed" (after the patch-embedding
  // norm) and "out" (after the stage norm); per block "attn" (the attention branch after proj, before the
  // residual add) and "xout" (the block output). For comparisons with other implementations.
  using ActivationTap = std::function<void(int block, const char* what, const float* x, int64_t rows, int cols)>;
  void set_activation_tap(ActivationTap tap) { tap_ = std::move(tap); }
  LinearLayer* find_linear(const std::string& prefix);
  std::vector<std::pair<std::string, const LinearLayer*>> moe_layers() const;
  // Checkpoint prefix of stage s's patch embedding: "patch_embed." or "stages.{s}.downsample.".
  std::string stage_embed(int s) const;

 private:
  struct Block {
    int stage = 0;
    std::string prefix;
    char attn = 's';
    std::unique_ptr<LinearLayer> q, kv, to_qk, to_v, proj, fc1, fc2;
    float *dwconv = nullptr, *ddwconv = nullptr, *anchors = nullptr, *mu = nullptr, *A = nullptr;
    std::array<LinearLayer*, 7> linears() const {
      return {q.get(), kv.get(), to_qk.get(), to_v.get(), proj.get(), fc1.get(), fc2.get()};
    }
  };
  struct BlockActs {
    Tensor ln1, mean1, rstd1, q, srcols, srout, srln, srmean, srrstd, kv, att, qk, v, hsaved, ao, xmid, ln2, mean2,
        rstd2, fc1, dw, gelu, xout;
    std::vector<uint64_t> codes;
  };
  struct StageActs {
    Tensor cols, conv, embed, emean, erstd, out, omean, orstd;
  };
  void ensure_buffers(int B, bool train);
  BlockActs& acts(int l) { return acts_[train_buffers_ ? l : first_block_[blocks_[l].stage]]; }

  PvtConfig cfg_;
  ReparamOptions ropt_;
  ParamSet params_, grads_, buffers_;
  std::vector<Block> blocks_;
  std::vector<int> first_block_;  // per stage
  Rng noise_rng_{0};
  ActivationTap tap_;
  int B_ = 0;
  bool train_buffers_ = false;
  Tensor img_, pooled_, logits_, tmp_, dx_, dt_, dbig_, dbig2_, dstage_, scratch_;
  std::vector<BlockActs> acts_;
  std::vector<StageActs> sacts_;
};

}  // namespace sav
