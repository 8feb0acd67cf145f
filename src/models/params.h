// shiftaddvit: named parameter sets.
//
// A ParamSet is an ordered list of (checkpoint name, tensor) whose tensors are views into one flat f32
// buffer, so optimizers and gradient clipping run over a single array and gradients share the layout.
//
//   ParamSet ps;
//   ps.declare("blocks.0.attn.qkv.weight", {576, 192});   // timm name, PyTorch shape
//   ps.allocate();                                        // one buffer, zero-filled
//   float* w = ps.get("blocks.0.attn.qkv.weight").f32();
#pragma once

#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace sav {

class ParamSet {
 public:
  void declare(const std::string& name, const Shape& shape, bool decay = true);
  void allocate();  // zero-filled; views into one buffer
  ParamSet like() const;  // same names and shapes, fresh zero buffer (for grads, optimizer moments)

  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const Tensor& get(const std::string& name) const;
  size_t size() const { return names_.size(); }
  const std::string& name(size_t i) const { return names_[i]; }
  const Tensor& tensor(size_t i) const { return tensors_[i]; }
  bool decay(size_t i) const { return decay_[i]; }  // weight decay applies (matrices, not norms/biases)
  float* flat() const { return flat_.f32(); }
  int64_t numel() const { return flat_.defined() ? flat_.numel() : 0; }
  void zero();

 private:
  std::vector<std::string> names_;
  std::vector<Shape> shapes_;
  std::vector<bool> decay_;
  std::vector<Tensor> tensors_;
  std::map<std::string, size_t> index_;
  Tensor flat_;
};

class Checkpoint;
// Copies every tensor of `params` and `buffers` from the checkpoint by name; throws naming the missing
// and mis-shaped tensors (up to six of each) and the arch, before anything is copied.
void load_params_strict(const Checkpoint& ck, ParamSet& params, ParamSet& buffers, const std::string& arch);

}  // namespace sav
