#include "reparam/convert.h"

#include <vector>

#include "core/error.h"
#include "reparam/ksh_fit.h"

namespace sav {

namespace {
std::string blk(int l) { return "blocks." + std::to_string(l) + "."; }

// (weight, bias) of a dense linear in `ps` under `prefix`, or nulls when it is not dense there.
std::pair<const float*, const float*> dense_of(const ParamSet& ps, const std::string& prefix) {
  if (!ps.contains(prefix + ".weight")) return {nullptr, nullptr};
  return {ps.get(prefix + ".weight").f32(), ps.get(prefix + ".bias").f32()};
}
// 1. Everything whose name and shape agree in params and buffers.
void copy_matching(ImageClassifier& src, ImageClassifier& dst) {
  const ParamSet& sp = src.params();
  for (ParamSet* ps : {&dst.params(), dst.buffers()}) {
    for (size_t i = 0; i < ps->size(); ++i) {
      const std::string& n = ps->name(i);
      const ParamSet* from = sp.contains(n) ? &sp : (src.buffers()->contains(n) ? src.buffers() : nullptr);
      if (from && from->get(n).shape() == ps->tensor(i).shape()) ps->tensor(i).copy_from(from->get(n));
    }
  }
}

// A linear of dst whose kind differs from src's: initialised from src's dense weight (or throws).
template <class Model>
void convert_linear(Model& src, Model& dst, const std::string& name) {
  LinearLayer* lin = dst.find_linear(name);
  SAV_CHECK(lin != nullptr, "internal: no linear " << name);
  const LinearLayer* slin = src.find_linear(name);
  if (slin && slin->kind() == lin->kind()) return;  // copied by name
  auto [w, b] = dense_of(src.params(), name);
  SAV_CHECK(w != nullptr, "cannot convert " << name << " from " << linear_kind_name(slin->kind()) << " to "
                                            << linear_kind_name(lin->kind()) << " (only dense layers convert)");
  lin->init_from_dense(w, b);
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

  copy_matching(src, *dst);
  // 2. blocks
  std::vector<int> fit_blocks;
  for (int l = 0; l < sc.depth; ++l) {
    const std::string p = blk(l);
    const char sa = sc.attn_kind(l), da = cfg.attn_kind(l);
    SAV_CHECK(!(sa == 'h' && da == 's'), "block " << l << " already has Hamming attention; it cannot go back to softmax");
    std::vector<std::string> roles = {"attn.proj", "mlp.fc1", "mlp.fc2"};
    if (da == 's') roles.push_back("attn.qkv");
    if (da == 'h' && sa == 'h') roles.insert(roles.end(), {"attn.to_qk", "attn.to_v"});
    for (const std::string& r : roles) convert_linear(src, *dst, p + r);
    if (da == 'h' && sa == 's') {
      auto [w, b] = dense_of(src.params(), p + "attn.qkv");
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

std::unique_ptr<Pvt> convert_pvt(Pvt& src, const ConvertOptions& opt, const float* calib, int n_calib) {
  const PvtConfig& sc = src.config();
  const int S = sc.stages();
  PvtConfig cfg = sc;
  cfg.attn = expand_kinds(opt.attn, S, "--attn");
  cfg.mlp = expand_kinds(opt.mlp, S, "--mlp");
  cfg.attn_linear = expand_kinds(opt.attn_linear, S, "--attn-linear");
  for (char& c : cfg.attn) c = c == 'h' ? 'h' : 's';
  if (!sc.is_dense()) cfg.hash_bits = sc.hash_bits, cfg.anchors = sc.anchors;
  else cfg.hash_bits = opt.hash_bits, cfg.anchors = opt.anchors;
  auto dst = std::make_unique<Pvt>(cfg, opt.reparam);
  copy_matching(src, *dst);
  std::vector<int> fit_blocks;
  for (int l = 0; l < src.num_blocks(); ++l) {
    const int s = src.block_stage(l);
    const std::string& p = src.block_prefix(l);
    const char sa = sc.attn_kind(s), da = cfg.attn_kind(s);
    SAV_CHECK(!(sa == 'h' && da == 's'), "stage " << s << " already has Hamming attention; it cannot go back to softmax");
    std::vector<std::string> roles = {"attn.proj", "mlp.fc1", "mlp.fc2"};
    if (da == 's') roles.insert(roles.end(), {"attn.q", "attn.kv"});
    if (da == 'h' && sa == 'h') roles.insert(roles.end(), {"attn.to_qk", "attn.to_v"});
    for (const std::string& r : roles) convert_linear(src, *dst, p + r);
    if (da == 'h' && sa == 's') {
      auto [wq, bq] = dense_of(src.params(), p + "attn.q");
      auto [wkv, bkv] = dense_of(src.params(), p + "attn.kv");
      SAV_CHECK(wq != nullptr && wkv != nullptr, "Hamming attention needs dense q and kv in " << p << "attn");
      const int C = sc.dims[s];
      dst->find_linear(p + "attn.to_qk")->init_from_dense(wq, bq);
      dst->find_linear(p + "attn.to_v")->init_from_dense(wkv + size_t(C) * C, bkv + C);  // kv rows [C,2C): v
      fit_blocks.push_back(l);
    }
  }
  if (!fit_blocks.empty()) {
    SAV_CHECK(calib != nullptr && n_calib > 0, "Hamming attention needs calibration images to fit its hash");
    src.forward(calib, n_calib, true);
    Rng rng(opt.seed ^ 0x4b5348ull);
    for (int l : fit_blocks) {
      const int s = src.block_stage(l), C = sc.dims[s], H = sc.heads[s], N = sc.tokens(s);
      const Tensor q = src.activation(l, "q");  // (n_calib * N, C)
      const std::string p = src.block_prefix(l) + "attn.ksh.";
      ksh_fit_layer(dst->buffers()->get(p + "anchors").f32(), dst->buffers()->get(p + "mu").f32(),
                    dst->buffers()->get(p + "A").f32(), q.f32(), n_calib, N, C, H, cfg.hash_bits, cfg.anchors, rng);
    }
  }
  return dst;
}

}  // namespace sav
