// shiftaddvit: dense -> ShiftAddViT conversion (METHOD.md sections 1-3).
//
//   sav::ConvertOptions opt;                 // attn "hamming", mlp "moe", attn_linear "dense"
//   auto sa = sav::convert_vit(dense, opt, calib_images, n);   // calib (n,Cin,S,S), normalised
//   auto sp = sav::convert_pvt(dense_pvt, opt, calib_images, n);
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

#include "models/pvt.h"
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

// PVTv2 (METHOD.md section 1): kinds are per stage ("hhhs" is the paper's model: Hamming attention over all
// tokens in stages 1-3, softmax in stage 4). Softmax -> Hamming takes to_qk <- attn.q, to_v <- the value
// half of attn.kv (rows [C, 2C)) and drops the spatial reduction (attn.sr, attn.norm) and the key half;
// the KSH hash of every head is fitted on the calibration images' queries (attn.q outputs). Linears as
// for ViT (q, kv, to_qk, to_v, proj follow attn_linear; fc1, fc2 follow mlp).
std::unique_ptr<Pvt> convert_pvt(Pvt& src, const ConvertOptions& opt, const float* calib, int n_calib);

}  // namespace sav
