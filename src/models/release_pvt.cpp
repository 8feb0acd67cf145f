#include "models/release_pvt.h"

#include <algorithm>
#include <map>
#include <set>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "ops/cpu/hamming.h"

namespace sav {

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

std::string join_ints(const std::vector<int>& v) {
  std::ostringstream os;
  for (size_t i = 0; i < v.size(); ++i) os << (i ? "," : "") << v[i];
  return os.str();
}

// Up to six entries, then the count.
std::string join_some(const std::vector<std::string>& v) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < 6; ++i) s += (i ? ", " : "") + v[i];
  if (v.size() > 6) s += ", ... (" + std::to_string(v.size()) + " in all)";
  return s;
}

// Release names of the stage s = 0.. (engine numbering) and of block i in it.
std::string rel_block(int s, int i) { return "block" + std::to_string(s + 1) + "." + std::to_string(i) + "."; }

// The shape of a checkpoint tensor that must exist (the caller names what it is for).
Shape need_shape(const Checkpoint& ck, const std::string& name, const char* what) {
  SAV_CHECK(ck.contains(name), "checkpoint " << ck.path() << " (ShiftAddViT release layout) lacks " << name << ", needed "
                                             << "for " << what);
  return ck.shape(name);
}

// Kind of the linear under release prefix p: 'm' MoE (experts / gate), 's' shift, 'd' dense, '?' none.
char linear_kind_at(const Checkpoint& ck, const std::string& p) {
  if (ck.contains(p + ".experts.0.weight") || ck.contains(p + ".gate.gate.weight") || ck.contains(p + ".experts.1.shift"))
    return 'm';
  if (ck.contains(p + ".shift") || ck.contains(p + ".sign")) return 's';
  if (ck.contains(p + ".weight")) return 'd';
  return '?';
}

// (out, in) features of the linear under release prefix p of kind k.
std::pair<int64_t, int64_t> linear_shape_at(const Checkpoint& ck, const std::string& p, char k) {
  const std::string n = k == 'm' ? p + ".experts.0.weight" : k == 's' ? p + ".shift" : p + ".weight";
  const Shape sh = need_shape(ck, n, "the layer's size");
  SAV_CHECK(sh.size() == 2, "checkpoint " << ck.path() << ": " << n << " has shape " << shape_str(sh)
                                          << ", expected (out, in)");
  return {sh[0], sh[1]};
}

// Attention layout of a release block: 'h' Hamming (to_qk), 'f' fused softmax qkv, 'q' softmax q/kv.
char attn_layout_at(const Checkpoint& ck, const std::string& blk) {
  const std::string a = blk + "attn.";
  if (linear_kind_at(ck, a + "to_qk") != '?') return 'h';
  if (linear_kind_at(ck, a + "qkv") != '?') return 'f';
  if (linear_kind_at(ck, a + "q") != '?') return 'q';
  return '?';
}

// Engine linear suffix -> release suffix (for every linear kind).
const std::map<std::string, std::string>& linear_suffixes() {
  static const std::map<std::string, std::string> m = {
      {".weight", ".weight"},
      {".bias", ".bias"},
      {".p", ".shift"},
      {".s", ".sign"},
      {".router.weight", ".gate.gate.weight"},
      {".router.bias", ".gate.gate.bias"},
      {".experts.0.weight", ".experts.0.weight"},
      {".experts.0.bias", ".experts.0.bias"},
      {".experts.1.p", ".experts.1.shift"},
      {".experts.1.s", ".experts.1.sign"},
      {".experts.1.bias", ".experts.1.bias"}};
  return m;
}

// Where an engine tensor comes from: the release tensor, its expected shape, and the rows taken (all when
// row_end < 0).
struct Source {
  std::string name;
  Shape shape;
  int64_t row_begin = 0, row_end = -1;
};

// Maps one engine tensor name (of a model with config cfg; fused[s]: stage s had a fused attn.qkv).
Source source_of(const std::string& n, const Shape& shape, const PvtConfig& cfg, const std::vector<bool>& fused) {
  if (starts_with(n, "patch_embed.")) return {"patch_embed1." + n.substr(12), shape};
  if (starts_with(n, "head.")) return {n, shape};
  SAV_CHECK(starts_with(n, "stages."), "internal: no release name for " << n);
  const size_t dot = n.find('.', 7);
  const int s = std::stoi(n.substr(7, dot - 7));
  const std::string rest = n.substr(dot + 1), S1 = std::to_string(s + 1);
  if (starts_with(rest, "downsample.")) return {"patch_embed" + S1 + "." + rest.substr(11), shape};
  if (starts_with(rest, "norm.")) return {"norm" + S1 + "." + rest.substr(5), shape};
  SAV_CHECK(starts_with(rest, "blocks."), "internal: no release name for " << n);
  const size_t dot2 = rest.find('.', 7);
  const int i = std::stoi(rest.substr(7, dot2 - 7));
  const std::string r = rest.substr(dot2 + 1), blk = rel_block(s, i);
  const int64_t C = cfg.dims[s], H = cfg.heads[s], d = C / H, m = cfg.anchors;
  if (r == "attn.ksh.anchors") return {blk + "attn.qk_quant.ksh.anchor", {1, H, m, d}};
  if (r == "attn.ksh.mu") return {blk + "attn.qk_quant.ksh.mvec", {1, H, 1, m}};
  if (r == "attn.ksh.A") return {blk + "attn.qk_quant.ksh.A", shape};
  if (r == "attn.dwconv.weight") return {blk + "attn.dconv.weight", {H, 1, cpu::kHammingConvTaps, 1}};
  if (starts_with(r, "mlp.dwconv.")) return {blk + "mlp.dwconv.dwconv." + r.substr(11), shape};
  for (const char* role : {"attn.to_qk", "attn.to_v", "attn.proj", "attn.q", "attn.kv", "mlp.fc1", "mlp.fc2"}) {
    const std::string ro = role;
    if (!starts_with(r, ro + ".")) continue;
    const std::string suffix = r.substr(ro.size());
    auto it = linear_suffixes().find(suffix);
    SAV_CHECK(it != linear_suffixes().end(), "internal: no release name for " << n);
    const bool split = fused[s] && (ro == "attn.q" || ro == "attn.kv");
    if (!split) return {blk + ro + it->second, shape};
    Source src{blk + "attn.qkv" + it->second, shape};
    if (starts_with(suffix, ".router.")) return src;  // one router for both halves
    src.shape[0] = 3 * C;                               // q: rows [0,C); kv: rows [C,3C)
    src.row_begin = ro == "attn.q" ? 0 : C;
    src.row_end = ro == "attn.q" ? C : 3 * C;
    return src;
  }
  return {blk + r, shape};  // norm1, norm2, attn.sr, attn.norm
}

// Release attention layout per stage (for the qkv split); the config must come from release_pvt_config.
std::vector<bool> fused_stages(const Checkpoint& ck, const PvtConfig& cfg) {
  std::vector<bool> f(cfg.stages(), false);
  for (int s = 0; s < cfg.stages(); ++s) f[s] = cfg.depths[s] > 0 && attn_layout_at(ck, rel_block(s, 0)) == 'f';
  return f;
}

}  // namespace

bool is_release_pvt_layout(const Checkpoint& ck) {
  if (!ck.contains("patch_embed1.proj.weight")) return false;
  for (const std::string& n : ck.names())
    if (starts_with(n, "block1.")) return true;
  return false;
}

PvtConfig release_pvt_config(const Checkpoint& ck, const std::string& arch_hint) {
  const std::string where = "checkpoint " + ck.path() + " (ShiftAddViT release layout)";
  SAV_CHECK(is_release_pvt_layout(ck), "checkpoint " << ck.path() << " is not in the ShiftAddViT release layout (no "
                                                     << "patch_embed1.proj.weight and block1.* tensors)");
  // stages: patch_embed1, patch_embed2, ... in a row
  int S = 0;
  while (ck.contains("patch_embed" + std::to_string(S + 1) + ".proj.weight")) ++S;
  PvtConfig c;
  c.dims.assign(S, 0), c.heads.assign(S, 0), c.depths.assign(S, 0), c.sr.assign(S, 1), c.mlp_ratios.assign(S, 0);
  c.attn.assign(S, 's'), c.mlp.assign(S, 'd'), c.attn_linear.assign(S, 'd');
  // depths: the highest block index of every stage (the strict copy reports any block in between)
  for (const std::string& n : ck.names()) {
    if (!starts_with(n, "block")) continue;
    const size_t d1 = n.find('.'), d2 = d1 == std::string::npos ? d1 : n.find('.', d1 + 1);
    if (d2 == std::string::npos) continue;
    try {
      const int s = std::stoi(n.substr(5, d1 - 5)) - 1, i = std::stoi(n.substr(d1 + 1, d2 - d1 - 1));
      if (s >= 0 && s < S) c.depths[s] = std::max(c.depths[s], i + 1);
    } catch (const std::logic_error&) {
    }  // not a block tensor: reported as unexpected by the copy
  }
  // widths, input channels and the stem kernel from the patch embeddings
  for (int s = 0; s < S; ++s) {
    const std::string n = "patch_embed" + std::to_string(s + 1) + ".proj.weight";
    const Shape sh = ck.shape(n);
    SAV_CHECK(sh.size() == 4 && sh[2] == sh[3], where << ": " << n << " has shape " << shape_str(sh)
                                                      << ", expected (out, in, k, k)");
    c.dims[s] = static_cast<int>(sh[0]);
    if (s == 0) {
      c.in_chans = static_cast<int>(sh[1]);
      c.stem_patch = static_cast<int>(sh[2]);
    } else {
      SAV_CHECK(sh[1] == c.dims[s - 1] && sh[2] == 3, where << ": " << n << " has shape " << shape_str(sh) << ", expected ("
                                                            << c.dims[s] << ", " << c.dims[s - 1] << ", 3, 3)");
    }
  }
  // per stage: attention layout, linear kinds, heads (Hamming), hash size, MLP ratio
  int hash_bits = 0, anchors = 0;
  std::string hash_from;
  for (int s = 0; s < S; ++s) {
    SAV_CHECK(c.depths[s] > 0, where << ": stage " << s + 1 << " has patch_embed" << s + 1 << " but no block" << s + 1
                                     << ".* tensors");
    const int C = c.dims[s];
    char layout = 0, ak = 0, mk = 0;
    std::string layout_at, ak_at, mk_at;
    for (int i = 0; i < c.depths[s]; ++i) {
      const std::string blk = rel_block(s, i);
      const char l = attn_layout_at(ck, blk);
      if (l == '?') continue;  // a missing block: named by the copy
      SAV_CHECK(layout == 0 || l == layout, where << ": " << blk << "attn and " << layout_at << "attn have different "
                                                  << "attention types; the engine needs one per stage");
      if (layout == 0) layout = l, layout_at = blk;
      const std::vector<std::string> roles = l == 'h'   ? std::vector<std::string>{"to_qk", "to_v", "proj"}
                                             : l == 'f' ? std::vector<std::string>{"qkv", "proj"}
                                                        : std::vector<std::string>{"q", "kv", "proj"};
      for (const std::string& r : roles) {
        const char k = linear_kind_at(ck, blk + "attn." + r);
        if (k == '?') continue;
        SAV_CHECK(ak == 0 || k == ak, where << ": " << blk << "attn." << r << " is " << linear_kind_name(linear_kind_from_char(k))
                                            << " but " << ak_at << " is " << linear_kind_name(linear_kind_from_char(ak))
                                            << "; the engine needs one attention-linear kind per stage");
        if (ak == 0) ak = k, ak_at = blk + "attn." + r;
      }
      for (const char* r : {"fc1", "fc2"}) {
        const char k = linear_kind_at(ck, blk + "mlp." + r);
        if (k == '?') continue;
        SAV_CHECK(mk == 0 || k == mk, where << ": " << blk << "mlp." << r << " is " << linear_kind_name(linear_kind_from_char(k))
                                            << " but " << mk_at << " is " << linear_kind_name(linear_kind_from_char(mk))
                                            << "; the engine needs one MLP-linear kind per stage");
        if (mk == 0) mk = k, mk_at = blk + "mlp." + r;
      }
    }
    SAV_CHECK(layout != 0, where << ": no attention found in stage " << s + 1 << " (" << rel_block(s, 0)
                                 << "attn.to_qk, .qkv or .q with .weight, .shift or .experts.*)");
    SAV_CHECK(mk != 0, where << ": no MLP found in stage " << s + 1 << " (" << rel_block(s, 0) << "mlp.fc1)");
    c.attn[s] = layout == 'h' ? 'h' : 's';
    c.attn_linear[s] = ak;
    c.mlp[s] = mk;
    const auto [F, K] = linear_shape_at(ck, mk_at.substr(0, mk_at.size() - 4) + ".fc1", mk);
    SAV_CHECK(K == C && F % C == 0, where << ": " << mk_at.substr(0, mk_at.size() - 4) << ".fc1 maps " << K << " -> " << F
                                          << " features; expected " << C << " -> a multiple of " << C);
    c.mlp_ratios[s] = static_cast<int>(F / C);
    if (layout == 'h') {
      const std::string an = layout_at + "attn.qk_quant.ksh.A";
      const Shape sh = need_shape(ck, an, "the head count and hash size");
      SAV_CHECK(sh.size() == 3 && sh[0] > 0 && C % sh[0] == 0,
                where << ": " << an << " has shape " << shape_str(sh) << ", expected (heads, bits, anchors) with heads "
                      << "dividing the width " << C);
      c.heads[s] = static_cast<int>(sh[0]);
      if (hash_bits == 0) {
        hash_bits = static_cast<int>(sh[1]), anchors = static_cast<int>(sh[2]), hash_from = an;
      } else {
        SAV_CHECK(sh[1] == hash_bits && sh[2] == anchors,
                  where << ": " << an << " has " << sh[1] << " bits and " << sh[2] << " anchors but " << hash_from
                        << " has " << hash_bits << " and " << anchors << "; the engine needs one hash size per model");
      }
    } else if (layout == 'q') {
      const std::string sn = layout_at + "attn.sr.weight";
      if (ck.contains(sn)) {
        const Shape sh = ck.shape(sn);
        SAV_CHECK(sh.size() == 4 && sh[2] == sh[3] && sh[2] >= 1, where << ": " << sn << " has shape " << shape_str(sh)
                                                                        << ", expected (C, C, r, r)");
        c.sr[s] = static_cast<int>(sh[2]);
      }
    }
  }
  if (hash_bits > 0) c.hash_bits = hash_bits, c.anchors = anchors;
  const Shape hs = need_shape(ck, "head.weight", "the class count");
  SAV_CHECK(hs.size() == 2 && hs[1] == c.dims.back(), where << ": head.weight has shape " << shape_str(hs)
                                                            << ", expected (classes, " << c.dims.back() << ")");
  c.num_classes = static_cast<int>(hs[0]);

  // name, image size and softmax head counts from the matching preset (or the hint)
  auto same_geometry = [&](const PvtConfig& p) {
    return p.dims == c.dims && p.depths == c.depths && p.mlp_ratios == c.mlp_ratios && p.in_chans == c.in_chans &&
           p.stem_patch == c.stem_patch;
  };
  auto geometry = [](const PvtConfig& p) {
    return "widths " + join_ints(p.dims) + ", depths " + join_ints(p.depths) + ", mlp ratios " + join_ints(p.mlp_ratios) +
           ", " + std::to_string(p.in_chans) + " input channels, stem " + std::to_string(p.stem_patch) + "x" +
           std::to_string(p.stem_patch);
  };
  const PvtConfig* preset = nullptr;
  PvtConfig hp;
  if (!arch_hint.empty()) {
    SAV_CHECK(is_pvt_arch(arch_hint), where << ": --arch " << arch_hint << " is not a PVT preset (release checkpoints "
                                            << "are PVTv2 models: pvt_v2_b0, pvt_v2_b1, pvt_v2_b2)");
    hp = pvt_preset(arch_hint);
    SAV_CHECK(same_geometry(hp), where << " has " << geometry(c) << " but --arch " << arch_hint << " has "
                                       << geometry(hp));
    preset = &hp;
  } else {
    for (const std::string& name : pvt_preset_names()) {
      PvtConfig p = pvt_preset(name);
      if (same_geometry(p)) {
        hp = p;
        preset = &hp;
        break;
      }
    }
  }
  c.name = preset ? preset->name : "pvt_v2_custom";
  if (preset) c.img_size = preset->img_size, c.stem_stride = preset->stem_stride;
  static const std::vector<int> kReleaseHeads = {1, 2, 5, 8};  // every pvt_v2_b* of the release
  for (int s = 0; s < S; ++s) {
    if (c.attn[s] == 'h') continue;
    if (preset) c.heads[s] = preset->heads[s];
    else if (S == static_cast<int>(kReleaseHeads.size())) c.heads[s] = kReleaseHeads[s];
    else
      SAV_THROW(where << ": unknown geometry (" << geometry(c) << "): the head count of softmax stage " << s + 1
                      << " cannot be read from the tensors and no pvt_v2 preset has this geometry");
    SAV_CHECK(c.dims[s] % c.heads[s] == 0, where << ": unknown geometry (" << geometry(c) << "): stage " << s + 1
                                                 << " width " << c.dims[s] << " is not divisible by " << c.heads[s]
                                                 << " heads");
  }
  c.validate();
  return c;
}

std::unique_ptr<Pvt> load_release_pvt(const Checkpoint& ck, const std::string& arch_hint) {
  const PvtConfig cfg = release_pvt_config(ck, arch_hint);
  ReparamOptions ro;
  ro.release_compat = true;
  auto model = std::make_unique<Pvt>(cfg, ro);
  const std::vector<bool> fused = fused_stages(ck, cfg);

  // resolve every engine tensor first, copy only when all fit
  std::vector<std::pair<const Tensor*, Source>> plan;
  std::vector<std::string> missing, misshaped, unexpected;
  std::set<std::string> used;
  for (const ParamSet* ps : {static_cast<const ParamSet*>(&model->params()), static_cast<const ParamSet*>(model->buffers())}) {
    for (size_t i = 0; i < ps->size(); ++i) {
      const Tensor& t = ps->tensor(i);
      Source src = source_of(ps->name(i), t.shape(), cfg, fused);
      used.insert(src.name);
      if (!ck.contains(src.name)) {
        if (std::find(missing.begin(), missing.end(), src.name) == missing.end()) missing.push_back(src.name);
      } else if (ck.shape(src.name) != src.shape) {
        const std::string e = src.name + " " + shape_str(ck.shape(src.name)) + " (expected " + shape_str(src.shape) + ")";
        if (std::find(misshaped.begin(), misshaped.end(), e) == misshaped.end()) misshaped.push_back(e);
      }
      plan.emplace_back(&t, std::move(src));
    }
  }
  for (const std::string& n : ck.names())
    if (!used.count(n) && !ends_with(n, ".attn.qk_quant.projection_matrix")) unexpected.push_back(n);
  if (!missing.empty() || !misshaped.empty() || !unexpected.empty()) {
    std::ostringstream os;
    os << "checkpoint " << ck.path() << " (ShiftAddViT release layout, read as " << cfg.describe() << ") does not load:";
    if (!missing.empty()) os << " missing " << join_some(missing) << ";";
    if (!misshaped.empty()) os << " mis-shaped " << join_some(misshaped) << ";";
    if (!unexpected.empty()) os << " unexpected " << join_some(unexpected) << " (no place in the engine's model);";
    SAV_THROW(os.str());
  }
  for (auto& [t, src] : plan) {
    Tensor from = ck.get(src.name);
    if (src.row_end >= 0) from = from.rows(src.row_begin, src.row_end);
    t->copy_from(from);  // same element count; the layouts agree (see the header)
  }
  return model;  // fresh model: its linears prepare their decoded weights on the first forward
}

}  // namespace sav
