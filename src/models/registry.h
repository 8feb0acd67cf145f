// shiftaddvit: building models by arch name or from a checkpoint.
//
//   auto model = sav::create_model("vit_fmnist");                    // fresh parameters (zeros/ones)
//   auto model = sav::load_model("runs/teacher/model.safetensors");  // arch read from the metadata
//   auto model = sav::load_model("deit_tiny.safetensors", "deit_tiny_patch16_224");  // timm file, arch given
//   auto model = sav::load_model("official_pvt_v2_b0.safetensors");  // ShiftAddViT release, compatibility mode
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "models/model.h"

namespace sav {

// `overrides` replaces preset fields by name: img_size, patch, in_chans, num_classes, dim, depth, heads,
// mlp_hidden (any value <= 0 is ignored).
std::unique_ptr<ImageClassifier> create_model(const std::string& arch, const std::map<std::string, int>& overrides = {});
// Loads `weights` (a .safetensors file, a sharded index, or a folder). `arch` may be empty when the
// checkpoint was written by the engine (its metadata names the model) or by the ShiftAddViT release (its
// geometry is read from the tensors, models/release_pvt.h); otherwise it picks the preset.
// `format`: "auto" (engine metadata, else the release's names when present, else timm names), "timm"
// (never the release's names) or "shiftaddvit-release" (the release's names, or an error).
std::unique_ptr<ImageClassifier> load_model(const std::string& weights, const std::string& arch = "",
                                            const std::string& format = "auto");
std::vector<std::string> known_archs();

}  // namespace sav
