#include "models/params.h"

#include <cstring>

#include "core/error.h"

namespace sav {

void ParamSet::declare(const std::string& name, const Shape& shape, bool decay) {
  SAV_CHECK(!flat_.defined(), "cannot declare '" << name << "' after allocate()");
  SAV_CHECK(!index_.count(name), "parameter '" << name << "' declared twice");
  index_[name] = names_.size();
  names_.push_back(name);
  shapes_.push_back(shape);
  decay_.push_back(decay);
}

void ParamSet::allocate() {
  int64_t total = 0;
  for (const Shape& s : shapes_) total += shape_numel(s);
  flat_ = Tensor::zeros({total});
  tensors_.clear();
  int64_t off = 0;
  for (const Shape& s : shapes_) {
    int64_t n = shape_numel(s);
    tensors_.push_back(flat_.rows(off, off + n).reshape(s));
    off += n;
  }
}

ParamSet ParamSet::like() const {
  ParamSet p;
  for (size_t i = 0; i < names_.size(); ++i) p.declare(names_[i], shapes_[i], decay_[i]);
  p.allocate();
  return p;
}

const Tensor& ParamSet::get(const std::string& name) const {
  auto it = index_.find(name);
  SAV_CHECK(it != index_.end(), "no parameter named '" << name << "'");
  SAV_CHECK(flat_.defined(), "parameters not allocated");
  return tensors_[it->second];
}

void ParamSet::zero() {
  if (flat_.defined()) std::memset(flat_.data(), 0, flat_.nbytes());
}

}  // namespace sav
