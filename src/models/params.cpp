#include "models/params.h"

#include <cstring>
#include <sstream>

#include "core/error.h"
#include "io/safetensors.h"

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

void load_params_strict(const Checkpoint& ck, ParamSet& params, ParamSet& buffers, const std::string& arch) {
  std::vector<std::string> missing, misshaped;
  auto scan = [&](const ParamSet& ps) {
    for (size_t i = 0; i < ps.size(); ++i) {
      const std::string& n = ps.name(i);
      if (!ck.contains(n)) {
        missing.push_back(n);
      } else if (ck.shape(n) != ps.tensor(i).shape()) {
        misshaped.push_back(n + " " + shape_str(ck.shape(n)) + " (expected " + shape_str(ps.tensor(i).shape()) + ")");
      }
    }
  };
  scan(params);
  scan(buffers);
  if (!missing.empty() || !misshaped.empty()) {
    auto join = [](const std::vector<std::string>& v) {
      std::string s;
      for (size_t i = 0; i < v.size() && i < 6; ++i) s += (i ? ", " : "") + v[i];
      if (v.size() > 6) s += ", ... (" + std::to_string(v.size()) + " in all)";
      return s;
    };
    std::ostringstream os;
    os << "checkpoint " << ck.path() << " does not fit arch " << arch << ":";
    if (!missing.empty()) os << " missing " << join(missing) << ";";
    if (!misshaped.empty()) os << " mis-shaped " << join(misshaped) << ";";
    SAV_THROW(os.str() << " check --arch (and the size flags) against the checkpoint");
  }
  for (size_t i = 0; i < params.size(); ++i) params.tensor(i).copy_from(ck.get(params.name(i)));
  for (size_t i = 0; i < buffers.size(); ++i) buffers.tensor(i).copy_from(ck.get(buffers.name(i)));
}

}  // namespace sav
