// shiftaddvit: bookkeeping over the LinearLayers of a model's blocks, shared by the ViT and PVT models.
// `Blocks` is a container of block structs whose linears() returns an array of LinearLayer* (nullptr for
// linears the block does not have).
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "models/params.h"
#include "nn/linear_layer.h"
#include "ops/cpu/hamming.h"

namespace sav {

template <class Blocks>
void linears_params_changed(Blocks& blocks) {  // after parameters were overwritten (load, optimizer)
  for (auto& b : blocks)
    for (auto* lin : b.linears())
      if (lin) lin->params_changed();
}

template <class Blocks>
float linears_aux_loss(const Blocks& blocks) {  // sum of the MoE load-balancing losses of the last forward
  float s = 0.0f;
  for (const auto& b : blocks)
    for (auto* lin : b.linears())
      if (lin) s += lin->aux_loss();
  return s;
}

template <class Blocks>
LinearLayer* linears_find(Blocks& blocks, const std::string& prefix) {
  for (auto& b : blocks)
    for (auto* lin : b.linears())
      if (lin && lin->prefix() == prefix) return lin;
  return nullptr;
}

template <class Blocks>
std::vector<std::pair<std::string, const LinearLayer*>> linears_moe(const Blocks& blocks) {
  std::vector<std::pair<std::string, const LinearLayer*>> v;
  for (const auto& b : blocks)
    for (auto* lin : b.linears())
      if (lin && lin->kind() == LinearKind::moe) v.emplace_back(lin->prefix(), lin);
  return v;
}

// Hamming attention of a block (members to_qk, to_v, dwconv, ddwconv, anchors, mu, A): declares under `p`
// ("...attn.") the linears to_qk and to_v (C -> C, kind k), the token conv dwconv.weight (H,9) and the frozen
// KSH buffers ksh.anchors (H,m,d), ksh.mu (H,m), ksh.A (H,b,m).
template <class Block>
void declare_hamming(Block& b, const std::string& p, int C, int H, int bits, int m, LinearKind k,
                     const ReparamOptions* ro, ParamSet& params, ParamSet& buffers) {
  b.to_qk = std::make_unique<LinearLayer>(p + "to_qk", C, C, k, ro);
  b.to_v = std::make_unique<LinearLayer>(p + "to_v", C, C, k, ro);
  b.to_qk->declare(params);
  b.to_v->declare(params);
  params.declare(p + "dwconv.weight", {H, cpu::kHammingConvTaps}, false);
  buffers.declare(p + "ksh.anchors", {H, m, C / H});
  buffers.declare(p + "ksh.mu", {H, m});
  buffers.declare(p + "ksh.A", {H, bits, m});
}

// After allocation: points the block at its token conv (and gradient) and KSH buffers.
template <class Block>
void bind_hamming(Block& b, const std::string& p, const ParamSet& params, const ParamSet& grads,
                  const ParamSet& buffers) {
  b.dwconv = params.get(p + "dwconv.weight").f32();
  b.ddwconv = grads.get(p + "dwconv.weight").f32();
  b.anchors = buffers.get(p + "ksh.anchors").f32();
  b.mu = buffers.get(p + "ksh.mu").f32();
  b.A = buffers.get(p + "ksh.A").f32();
}

}  // namespace sav
