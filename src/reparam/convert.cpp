#include "reparam/convert.h"

#include <vector>

#include "core/error.h"
#include "reparam/ksh_fit.h"

namespace sav {

namespace {
std::string blk(int l) { return "blocks." + std::to_string(l) + "."; }

// (weight, bias) of a dense linear in `src` under `prefix`, or nulls when it is not dense there.
std::pair<const float*, const float*> dense_of(const Vit& src, const std::string& prefix) {
  const ParamSet& ps = src.params();
  if (!ps.contains(prefix + ".weight")) return {nullptr, nullptr};
  return {ps.get(prefix + ".weight").f32(), ps.get(prefix + ".bias").f32()};
}
}  // namespace

std::unique_ptr<Vit> convert_vit(Vit& src, const ConvertOptions& opt, const float* calib, int n_calib) {
  const VitConfig& sc = src.config();
  VitConfig cfg = sc;
  cfg.attn = expand_kinds(opt.attn, sc.depth, "--attn");
  cfg.mlp = expand_kinds(opt.mlp, sc.depth, "--mlp");
  cfg.attn_linear = expand_kinds(opt.attn_linear, sc.depth, "--attn-linear");
  for (char& c : cfg.attn) c = c == 'h' ? 'h' : 's';
  if (!sc.is_dense()) cfg.hash_bits = sc.hash_bits, cfg.anchors = sc.anchors;
  else cfg.hash_bits = opt.hash_bits, cfg.anchors = opt.anchors;
  auto dst = std::make_unique<Vit>(cfg, opt.reparam);
  const int C = sc.dim, H = sc.heads, N = sc.tokens();

  // 1. everything whose name and shape agree
  const ParamSet& sp = src.params();
  for (ParamSet* ps : {&dst->params(), dst->buffers()}) {
    for (size_t i = 0; i < ps->size(); ++i) {
      const std::string& n = ps->name(i);
      const ParamSet* from = sp.contains(n) ? &sp : (src.buffers()->contains(n) ? src.buffers() : nullptr);
      if (from && from->get(n).shape() == ps->tensor(i).shape()) ps->tensor(i).copy_from(from->get(n));
    }
  }
  // 2. blocks
  std::vector<int> fit_blocks;
  for (int l = 0; l < sc.depth; ++l) {
    const std::string p = blk(l);
    const char sa = sc.attn_kind(l), da = cfg.attn_kind(l);
    SAV_CHECK(!(sa == 'h' && da == 's'), "block " << l << " already has Hamming attention; it cannot go back to softmax");
    std::vector<std::string> roles = {"attn.proj", "mlp.fc1", "mlp.fc2"};
    if (da == 's') roles.push_back("attn.qkv");
    if (da == 'h' && sa == 'h') roles.insert(roles.end(), {"attn.to_qk", "attn.to_v"});
    for (const std::string& r : roles) {
      LinearLayer* lin = dst->find_linear(p + r);
      SAV_CHECK(lin != nullptr, "internal: no linear " << p << r);
      const LinearLayer* slin = src.find_linear(p + r);
      if (slin && slin->kind() == lin->kind()) continue;  // copied by name
      auto [w, b] = dense_of(src, p + r);
      SAV_CHECK(w != nullptr, "cannot convert " << p << r << " from " << linear_kind_name(slin->kind()) << " to "
                                                << linear_kind_name(lin->kind()) << " (only dense layers convert)");
      lin->init_from_dense(w, b);
    }
    if (da == 'h' && sa == 's') {
      auto [w, b] = dense_of(src, p + "attn.qkv");
      SAV_CHECK(w != nullptr, "Hamming attention needs a dense qkv in block " << l);
      // qkv rows: [0,C) q, [C,2C) k, [2C,3C) v
      dst->find_linear(p + "attn.to_qk")->init_from_dense(w, b);
      dst->find_linear(p + "attn.to_v")->init_from_dense(w + size_t(2) * C * C, b + 2 * C);
      fit_blocks.push_back(l);
    }
  }
  // 3. KSH on the calibration images' queries
  if (!fit_blocks.empty()) {
    SAV_CHECK(calib != nullptr && n_calib > 0, "Hamming attention needs calibration images to fit its hash");
    src.forward(calib, n_calib, true);
    Rng rng(opt.seed ^ 0x4b5348ull);
    const int64_t M = int64_t(n_calib) * N;
    std::vector<float> q(size_t(M) * C);
    for (int l : fit_blocks) {
      const Tensor qkv = src.activation(l, "qkv");
      for (int64_t r = 0; r < M; ++r)
        std::copy(qkv.f32() + r * 3 * C, qkv.f32() + r * 3 * C + C, q.data() + r * C);
      const std::string p = blk(l) + "attn.ksh.";
      ksh_fit_layer(dst->buffers()->get(p + "anchors").f32(), dst->buffers()->get(p + "mu").f32(),
                    dst->buffers()->get(p + "A").f32(), q.data(), n_calib, N, C, H, cfg.hash_bits, cfg.anchors, rng);
    }
  }
  return dst;
}

}  // namespace sav
