// shiftaddvit: deterministic synthetic tensors, bit-identical to python/synth.py.
// A tensor is a pure function of its name and shape, so golden tests can rebuild large weights and inputs
// (e.g. a whole deit_tiny_patch16_224) instead of committing them.
//   value_i = scale(name, shape) * (2 * (splitmix64(fnv1a64(name) + (i+1) * 0x9E3779B97F4A7C15) >> 40) / 2^24 - 1)
//   (+1 for 1-D "*.weight" tensors, i.e. norm weights), computed in double and rounded once to float.
#pragma once

#include <string>

#include "core/tensor.h"

namespace sav {

Tensor synth_tensor(const std::string& name, const Shape& shape);

}  // namespace sav
