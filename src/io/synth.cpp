#include "io/synth.h"

#include <cmath>

namespace sav {

namespace {
uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001B3ull;
  }
  return h;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

double synth_scale(const std::string& name, const Shape& shape) {
  if (name == "input") return 2.0;
  if (shape.size() == 1) return ends_with(name, ".weight") ? 0.2 : 0.1;
  if (name == "cls_token" || name == "pos_embed") return 0.5;
  int64_t fan_in = 1;
  for (size_t i = 1; i < shape.size(); ++i) fan_in *= shape[i];
  return std::sqrt(3.0 / static_cast<double>(fan_in));
}
}  // namespace

Tensor synth_tensor(const std::string& name, const Shape& shape) {
  Tensor t = Tensor::empty(shape);
  float* p = t.f32();
  const uint64_t seed = fnv1a64(name);
  const double scale = synth_scale(name, shape);
  const double offset = (shape.size() == 1 && ends_with(name, ".weight")) ? 1.0 : 0.0;
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    uint64_t z = seed + static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    const double u = static_cast<double>(z >> 40) / 16777216.0;
    p[i] = static_cast<float>((2.0 * u - 1.0) * scale + offset);
  }
  return t;
}

}  // namespace sav
