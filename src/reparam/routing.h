// shiftaddvit: what the MoE routers do. Token shares per layer over a data set, expert latency profiling
// (the alpha factors of the latency-aware loss), and a picture of which tokens went to which expert.
//
//   auto shares = sav::routing_shares(model, test_set, norm, 1000);   // per MoE layer: tokens per expert
//   sav::ExpertProfile p = sav::profile_experts(96, 192, 6400, true);  // per-token latency, this machine
//   sav::route_picture(model, image_chw, "route.png");                  // overlay per MoE layer
#pragma once

#include <string>
#include <vector>

#include "io/dataset.h"
#include "models/vit.h"

namespace sav {

struct LayerShares {
  std::string name;
  int64_t tokens[2] = {0, 0};  // mult, shift
  double shift_share() const { return tokens[0] + tokens[1] ? double(tokens[1]) / (tokens[0] + tokens[1]) : 0.0; }
};
// Runs the first `limit` images (0: all) in inference mode and counts the router's choices per MoE layer.
std::vector<LayerShares> routing_shares(Vit& model, const Dataset& ds, const Normalize& norm, int64_t limit,
                                        int batch = 256);

struct ExpertProfile {
  int K = 0, F = 0, tokens = 0;
  double mult_us_per_token = 0, shift_us_per_token = 0;
  bool int_kernel = false;
  const char* shift_isa = "";
  // Latency factors normalised so that the faster expert is 1.
  double alpha_mult() const;
  double alpha_shift() const;
};
// Times a dense linear (K->F, BLAS) against the shift expert (integer MatShift kernel when int_kernel,
// else the float path) on `tokens` random rows: median of `iters`.
ExpertProfile profile_experts(int K, int F, int tokens, bool int_kernel, int iters = 20);

// image (Cin,S,S) normalised as the model expects; `pixels` (Cin,S,S) uint8 for the background.
// Writes a PNG: one panel per MoE layer, the image with each patch tinted blue (mult) or orange (shift),
// scaled so a panel is at least 160 pixels wide. Returns the per-layer shift shares of this image.
std::vector<LayerShares> route_picture(Vit& model, const float* image, const uint8_t* pixels,
                                       const std::string& png_path);

}  // namespace sav
