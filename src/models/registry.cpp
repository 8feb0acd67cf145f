#include "models/registry.h"

#include "core/error.h"
#include "io/safetensors.h"
#include "models/vit.h"

namespace sav {

std::vector<std::string> known_archs() { return vit_preset_names(); }

std::unique_ptr<ImageClassifier> create_model(const std::string& arch, const std::map<std::string, int>& overrides) {
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

std::unique_ptr<ImageClassifier> load_model(const std::string& weights, const std::string& arch) {
  Checkpoint ck = Checkpoint::open(weights);
  const auto& md = ck.metadata();
  std::unique_ptr<Vit> model;
  auto kind = md.find("sav.model");
  if (kind != md.end()) {
    SAV_CHECK(kind->second == "vit", "checkpoint " << weights << " holds a '" << kind->second
                                                   << "' model, which this build cannot load");
    VitConfig cfg = vit_config_from_metadata(md);
    SAV_CHECK(arch.empty() || arch == cfg.name,
              "checkpoint " << weights << " holds arch '" << cfg.name << "' but --arch says '" << arch << "'");
    ReparamOptions ro;
    if (md.count("sav.reparam.pmin")) ro.pmin = std::stoi(md.at("sav.reparam.pmin"));
    if (md.count("sav.reparam.pmax")) ro.pmax = std::stoi(md.at("sav.reparam.pmax"));
    model = std::make_unique<Vit>(cfg, ro);
  } else {
    SAV_CHECK(!arch.empty(), "checkpoint " << weights << " does not name its arch (no shiftaddvit metadata); pass --arch");
    model = std::make_unique<Vit>(vit_preset(arch));
  }
  model->load(ck);
  return model;
}

}  // namespace sav
