// shiftaddvit: dense -> ShiftAddViT conversion (METHOD.md sections 1-3).
//
//   sav::ConvertOptions opt;                 // attn "hamming", mlp "moe", attn_linear "dense"
//   auto sa = sav::convert_vit(dense, opt, calib_images, n);   // calib (n,Cin,S,S), normalised
//
// Per block: softmax attention -> Hamming attention takes to_qk <- W_q, to_v <- W_v (rows of the fused
// qkv), keeps proj, starts the 9-tap token conv at zero, and fits the KSH hash of every head on the
// calibration images' queries (the source model's activations). Linears: dense -> shift takes
// p = round(log2|w|), s = sign(w); dense -> moe makes expert 0 the dense weight, expert 1 its shift
// version, and a zero router. Every other tensor is copied by name. The source may already be partly
// converted (staged fine-tuning): layers whose kind does not change are copied as they are.
#pragma once

#include <memory>
#include <string>

#include "models/vit.h"

namespace sav {

struct ConvertOptions {
  std::string attn = "hamming";       // "softmax" | "hamming" | one char per block ("hhss")
  std::string mlp = "moe";            // "dense" | "shift" | "moe" | one char per block ("mmdd")
  std::string attn_linear = "dense";  // same, for qkv/to_qk/to_v and proj
  int hash_bits = 16, anchors = 25;
  uint64_t seed = 0;
  ReparamOptions reparam;
};

std::unique_ptr<Vit> convert_vit(Vit& src, const ConvertOptions& opt, const float* calib, int n_calib);

}  // namespace sav
