// shiftaddvit: bookkeeping over the LinearLayers of a model's blocks, shared by the ViT and PVT models.
// `Blocks` is a container of block structs whose linears() returns an array of LinearLayer* (nullptr for
// linears the block does not have).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "nn/linear_layer.h"

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

}  // namespace sav
