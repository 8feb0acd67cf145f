#include "models/registry.h"

#include "core/error.h"
#include "io/safetensors.h"
#include "models/pvt.h"
#include "models/release_pvt.h"
#include "models/vit.h"

namespace sav {

std::vector<std::string> known_archs() {
  std::vector<std::string> v = vit_preset_names();
  for (const auto& n : pvt_preset_names()) v.push_back(n);
  return v;
}

std::unique_ptr<ImageClassifier> create_model(const std::string& arch, const std::map<std::string, int>& overrides) {
  if (is_pvt_arch(arch)) {
    PvtConfig c = pvt_preset(arch);
    for (auto& [k, v] : overrides) {
      if (v <= 0) continue;
      if (k == "img_size") c.img_size = v;
      else if (k == "in_chans") c.in_chans = v;
      else if (k == "num_classes") c.num_classes = v;
      else SAV_THROW("model override '" << k << "' is not available for PVT models (img_size, in_chans, num_classes)");
    }
    return std::make_unique<Pvt>(c);
  }
  VitConfig c = vit_preset(arch);
  for (auto& [k, v] : overrides) {
    if (v <= 0) continue;
    if (k == "img_size") c.img_size = v;
    else if (k == "patch") c.patch = v;
    else if (k == "in_chans") c.in_chans = v;
    else if (k == "num_classes") c.num_classes = v;
    else if (k == "dim") c.dim = v;
    else if (k == "depth") c.depth = v;
    else if (k == "heads") c.heads = v;
    else if (k == "mlp_hidden") c.mlp_hidden = v;
    else SAV_THROW("unknown model override '" << k << "'");
  }
  return std::make_unique<Vit>(c);
}

std::unique_ptr<ImageClassifier> load_model(const std::string& weights, const std::string& arch,
                                            const std::string& format) {
  SAV_CHECK(format == "auto" || format == "timm" || format == "shiftaddvit-release",
            "unknown checkpoint format '" << format << "'; use auto, timm or shiftaddvit-release");
  Checkpoint ck = Checkpoint::open(weights);
  const auto& md = ck.metadata();
  auto kind = md.find("sav.model");
  // the public ShiftAddViT release's names (models/release_pvt.h): detected, or asked for
  if (format == "shiftaddvit-release" || (format == "auto" && kind == md.end() && is_release_pvt_layout(ck))) {
    SAV_CHECK(kind == md.end(), "checkpoint " << weights << " was written by the engine (sav.model = " << kind->second
                                              << "), not by the ShiftAddViT release; drop --format");
    return load_release_pvt(ck, arch);
  }
  ReparamOptions ro;
  if (md.count("sav.reparam.pmin")) ro.pmin = std::stoi(md.at("sav.reparam.pmin"));
  if (md.count("sav.reparam.pmax")) ro.pmax = std::stoi(md.at("sav.reparam.pmax"));
  if (md.count("sav.reparam.release_compat")) ro.release_compat = md.at("sav.reparam.release_compat") == "1";
  auto check_arch = [&](const std::string& name) {
    SAV_CHECK(arch.empty() || arch == name,
              "checkpoint " << weights << " holds arch '" << name << "' but --arch says '" << arch << "'");
  };
  if (kind != md.end()) {
    if (kind->second == "pvt") {
      PvtConfig cfg = pvt_config_from_metadata(md);
      check_arch(cfg.name);
      auto model = std::make_unique<Pvt>(cfg, ro);
      model->load(ck);
      return model;
    }
    SAV_CHECK(kind->second == "vit", "checkpoint " << weights << " holds a '" << kind->second
                                                   << "' model, which this build cannot load");
    VitConfig cfg = vit_config_from_metadata(md);
    check_arch(cfg.name);
    auto model = std::make_unique<Vit>(cfg, ro);
    model->load(ck);
    return model;
  }
  SAV_CHECK(!arch.empty(), "checkpoint " << weights << " does not name its arch (no shiftaddvit metadata); pass --arch");
  if (is_pvt_arch(arch)) {
    auto model = std::make_unique<Pvt>(pvt_preset(arch));
    model->load(ck);
    return model;
  }
  auto model = std::make_unique<Vit>(vit_preset(arch));
  model->load(ck);
  return model;
}

}  // namespace sav
