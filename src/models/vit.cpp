#include "models/vit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "core/error.h"
#include "io/safetensors.h"
#include "models/block_linears.h"
#include "ops/cpu/hamming.h"
#include "ops/cpu/ops.h"

namespace sav {

namespace {
std::string blk(int l) { return "blocks." + std::to_string(l) + "."; }
}  // namespace

bool VitConfig::is_dense() const {
  for (int l = 0; l < depth; ++l)
    if (attn_kind(l) != 's' || mlp_kind(l) != 'd' || attn_linear_kind(l) != 'd') return false;
  return true;
}

void VitConfig::validate() const {
  SAV_CHECK(img_size > 0 && patch > 0 && img_size % patch == 0,
            "image size " << img_size << " is not a positive multiple of the patch size " << patch);
  SAV_CHECK(in_chans > 0 && num_classes > 0 && depth >= 0 && mlp_hidden > 0, "impossible ViT sizes: " << describe());
  SAV_CHECK(dim > 0 && heads > 0 && dim % heads == 0,
            "width " << dim << " is not divisible by the head count " << heads);
  auto check = [&](const std::string& s, const char* what, const std::string& allowed) {
    SAV_CHECK(s.empty() || static_cast<int>(s.size()) == depth,
              what << " kinds '" << s << "' must have one character per block (" << depth << ")");
    for (char c : s) SAV_CHECK(allowed.find(c) != std::string::npos, what << " kind '" << c << "' not in " << allowed);
  };
  check(attn, "attention", "sh");
  check(mlp, "mlp", "dsm");
  check(attn_linear, "attention linear", "dsm");
  SAV_CHECK(hash_bits >= 1 && hash_bits <= 64 && anchors >= 1, "hash bits must be 1..64 and anchors >= 1");
}

std::string VitConfig::describe() const {
  std::ostringstream os;
  os << name << ": " << img_size << "x" << img_size << "x" << in_chans << ", patch " << patch << ", width " << dim
     << ", depth " << depth << ", heads " << heads << ", mlp " << mlp_hidden << ", classes " << num_classes;
  if (!is_dense())
    os << ", attn " << (attn.empty() ? "dense" : attn) << ", mlp linears " << (mlp.empty() ? "dense" : mlp)
       << ", attn linears " << (attn_linear.empty() ? "dense" : attn_linear);
  return os.str();
}

std::string expand_kinds(const std::string& spec, int depth, const std::string& what) {
  static const std::map<std::string, char> words = {{"softmax", 's'}, {"hamming", 'h'}, {"dense", 'd'},
                                                    {"shift", 's'},   {"moe", 'm'}};
  auto it = words.find(spec);
  if (it != words.end()) return std::string(depth, it->second);
  SAV_CHECK(static_cast<int>(spec.size()) == depth,
            what << " '" << spec << "' is neither a kind name nor one character per block (" << depth << " blocks)");
  return spec;
}

VitConfig vit_preset(const std::string& name) {
  VitConfig c;
  c.name = name;
  if (name == "deit_tiny_patch16_224") {
    c.dim = 192, c.heads = 3;
  } else if (name == "deit_small_patch16_224") {
    c.dim = 384, c.heads = 6;
  } else if (name == "deit_base_patch16_224") {
    c.dim = 768, c.heads = 12;
  } else if (name == "vit_fmnist") {
    c.img_size = 28, c.patch = 4, c.in_chans = 1, c.num_classes = 10;
    c.dim = 96, c.depth = 4, c.heads = 4;
  } else {
    std::string all;
    for (auto& n : vit_preset_names()) all += (all.empty() ? "" : ", ") + n;
    SAV_THROW("unknown arch '" << name << "'; known: " << all);
  }
  c.mlp_hidden = name == "vit_fmnist" ? 2 * c.dim : 4 * c.dim;
  return c;
}

std::vector<std::string> vit_preset_names() {
  return {"deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "vit_fmnist"};
}

Vit::Vit(const VitConfig& cfg, const ReparamOptions& ropt) : cfg_(cfg), ropt_(ropt) {
  cfg_.validate();
  const int C = cfg_.dim, F = cfg_.mlp_hidden, H = cfg_.heads;
  params_.declare("cls_token", {1, 1, C}, false);
  params_.declare("pos_embed", {1, cfg_.tokens(), C}, false);
  params_.declare("patch_embed.proj.weight", {C, cfg_.in_chans, cfg_.patch, cfg_.patch});
  params_.declare("patch_embed.proj.bias", {C}, false);
  blocks_.resize(cfg_.depth);
  for (int l = 0; l < cfg_.depth; ++l) {
    Block& b = blocks_[l];
    const std::string p = blk(l);
    b.attn = cfg_.attn_kind(l);
    const LinearKind ak = linear_kind_from_char(cfg_.attn_linear_kind(l)), mk = linear_kind_from_char(cfg_.mlp_kind(l));
    params_.declare(p + "norm1.weight", {C}, false);
    params_.declare(p + "norm1.bias", {C}, false);
    if (b.attn == 's') {
      b.qkv = std::make_unique<LinearLayer>(p + "attn.qkv", C, 3 * C, ak, &ropt_);
      b.qkv->declare(params_);
    } else {
      declare_hamming(b, p + "attn.", C, H, cfg_.hash_bits, cfg_.anchors, ak, &ropt_, params_, buffers_);
    }
    b.proj = std::make_unique<LinearLayer>(p + "attn.proj", C, C, ak, &ropt_);
    b.proj->declare(params_);
    params_.declare(p + "norm2.weight", {C}, false);
    params_.declare(p + "norm2.bias", {C}, false);
    b.fc1 = std::make_unique<LinearLayer>(p + "mlp.fc1", C, F, mk, &ropt_);
    b.fc2 = std::make_unique<LinearLayer>(p + "mlp.fc2", F, C, mk, &ropt_);
    b.fc1->declare(params_);
    b.fc2->declare(params_);
  }
  params_.declare("norm.weight", {C}, false);
  params_.declare("norm.bias", {C}, false);
  params_.declare("head.weight", {cfg_.num_classes, C});
  params_.declare("head.bias", {cfg_.num_classes}, false);
  params_.allocate();
  grads_ = params_.like();
  buffers_.allocate();
  for (int l = 0; l < cfg_.depth; ++l) {
    Block& b = blocks_[l];
    const std::string p = blk(l);
    for (auto* lin : b.linears())
      if (lin) lin->bind(params_, grads_);
    if (b.attn == 'h') {
      bind_hamming(b, p + "attn.", params_, grads_, buffers_);
    }
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& n = params_.name(i);
    if (n.find("norm") != std::string::npos && n.size() > 7 && n.compare(n.size() - 7, 7, ".weight") == 0)
      params_.tensor(i).fill(1.0f);  // LayerNorm weights
  }
}

void Vit::init_random(Rng& rng) {
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& n = params_.name(i);
    const Tensor& t = params_.tensor(i);
    float* p = t.f32();
    if (t.ndim() == 1) {
      bool ln_w = n.find("norm") != std::string::npos && n.find(".weight") != std::string::npos;
      t.fill(ln_w ? 1.0f : 0.0f);
    } else if (n == "cls_token") {
      for (int64_t j = 0; j < t.numel(); ++j) p[j] = 1e-6f * rng.normal();
    } else if (n == "patch_embed.proj.weight") {
      // timm leaves the patch convolution at PyTorch's Conv2d default: kaiming_uniform(a = sqrt 5), i.e.
      // U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for its bias (below).
      const float bound = 1.0f / std::sqrt(float(t.numel() / t.shape()[0]));
      for (int64_t j = 0; j < t.numel(); ++j) p[j] = rng.uniform(-bound, bound);
    } else {
      for (int64_t j = 0; j < t.numel(); ++j) p[j] = rng.trunc_normal(0.02f);
    }
  }
  const Tensor& w = params_.get("patch_embed.proj.weight");
  const Tensor& b = params_.get("patch_embed.proj.bias");
  const float bound = 1.0f / std::sqrt(float(w.numel() / w.shape()[0]));
  for (int64_t j = 0; j < b.numel(); ++j) b.f32()[j] = rng.uniform(-bound, bound);
}

void Vit::load(const Checkpoint& ck) {
  load_params_strict(ck, params_, buffers_, cfg_.name);
  linears_params_changed(blocks_);
}

float Vit::aux_loss() const { return linears_aux_loss(blocks_); }

LinearLayer* Vit::find_linear(const std::string& prefix) { return linears_find(blocks_, prefix); }

std::vector<std::pair<std::string, const LinearLayer*>> Vit::moe_layers() const { return linears_moe(blocks_); }

void Vit::ensure_buffers(int B, bool train) {
  if (B == B_ && train == train_buffers_ && !acts_.empty()) return;
  const int64_t N = cfg_.tokens(), C = cfg_.dim, F = cfg_.mlp_hidden, H = cfg_.heads, M = B * N;
  const int64_t P = cfg_.num_patches(), K = int64_t(cfg_.in_chans) * cfg_.patch * cfg_.patch;
  cols_ = Tensor::empty({B * P, K});
  pe_ = Tensor::empty({B * P, C});
  x0_ = Tensor::empty({M, C});
  cls_ln_ = Tensor::empty({B, C});
  cls_mean_ = Tensor::empty({B});
  cls_rstd_ = Tensor::empty({B});
  logits_ = Tensor::empty({B, cfg_.num_classes});
  tmp_ = Tensor::empty({M, C});
  // In inference all blocks share one set of activation buffers (the residual stream stays in x0_).
  const int nacts = train ? cfg_.depth : std::min(cfg_.depth, 1);
  acts_.assign(nacts, {});
  bool any_softmax = false, any_hamming = false;
  for (const auto& b : blocks_) (b.attn == 's' ? any_softmax : any_hamming) = true;
  const cpu::HammingDims hd{B, static_cast<int>(N), static_cast<int>(C), static_cast<int>(H), cfg_.hash_bits,
                            cfg_.anchors};
  for (int i = 0; i < nacts; ++i) {
    BlockActs& a = acts_[i];
    const char kind = train ? blocks_[i].attn : 0;  // inference: buffers for both kinds
    a.ln1 = Tensor::empty({M, C});
    a.mean1 = Tensor::empty({M});
    a.rstd1 = Tensor::empty({M});
    if (kind == 's' || (kind == 0 && any_softmax)) {
      a.qkv = Tensor::empty({M, 3 * C});
      a.att = Tensor::empty({B * H * N * N});
    }
    if (kind == 'h' || (kind == 0 && any_hamming)) {
      a.qk = Tensor::empty({M, C});
      a.v = Tensor::empty({M, C});
      if (train) {
        a.hsaved = Tensor::empty({static_cast<int64_t>(cpu::hamming_saved_floats(hd))});
        a.codes.resize(cpu::hamming_saved_codes(hd));
      }
    }
    a.ao = Tensor::empty({M, C});
    a.xmid = Tensor::empty({M, C});
    a.ln2 = Tensor::empty({M, C});
    a.mean2 = Tensor::empty({M});
    a.rstd2 = Tensor::empty({M});
    a.fc1 = Tensor::empty({M, F});
    a.gelu = Tensor::empty({M, F});
    a.xout = Tensor::empty({M, C});
  }
  if (train) {
    dx_ = Tensor::empty({M, C});
    dtmp_ = Tensor::empty({M, C});
    dbig_ = Tensor::empty({M, std::max(3 * C, F)});
    dbig2_ = Tensor::empty({M, std::max(C, F)});
    scratch_ = Tensor::empty({any_softmax ? B * H * N * N : 1});
  }
  B_ = B;
  train_buffers_ = train;
}

void Vit::forward(const float* images, int B, bool train) {
  SAV_CHECK(B > 0, "batch size must be positive, got " << B);
  ensure_buffers(B, train);
  const int N = cfg_.tokens(), C = cfg_.dim, F = cfg_.mlp_hidden, H = cfg_.heads, P = cfg_.num_patches();
  const int M = B * N;
  const ParamSet& ps = params_;
  Rng* rng = train ? &noise_rng_ : nullptr;
  cpu::patch_embed_forward(pe_.f32(), cols_.f32(), images, ps.get("patch_embed.proj.weight").f32(),
                           ps.get("patch_embed.proj.bias").f32(), B, cfg_.in_chans, cfg_.img_size, cfg_.patch, C);
  const float* cls = ps.get("cls_token").f32();
  const float* pos = ps.get("pos_embed").f32();
  float* x0 = x0_.f32();
#pragma omp parallel for if (int64_t(M) * C >= 32768)
  for (int b = 0; b < B; ++b) {
    float* xb = x0 + int64_t(b) * N * C;
    for (int c = 0; c < C; ++c) xb[c] = cls[c] + pos[c];
    const float* pb = pe_.f32() + int64_t(b) * P * C;
    for (int64_t i = 0; i < int64_t(P) * C; ++i) xb[C + i] = pb[i] + pos[C + i];
  }
  const float* x = x0;
  float* t = tmp_.f32();
  for (int l = 0; l < cfg_.depth; ++l) {
    BlockActs& a = acts_[train ? l : 0];
    Block& bk = blocks_[l];
    const std::string p = blk(l);
    cpu::layernorm_forward(a.ln1.f32(), a.mean1.f32(), a.rstd1.f32(), x, ps.get(p + "norm1.weight").f32(),
                           ps.get(p + "norm1.bias").f32(), M, C, cfg_.ln_eps);
    if (bk.attn == 's') {
      bk.qkv->forward(a.qkv.f32(), a.ln1.f32(), M, train, rng);
      cpu::attention_forward(a.ao.f32(), a.att.f32(), a.qkv.f32(), B, N, C, H);
    } else {
      bk.to_qk->forward(a.qk.f32(), a.ln1.f32(), M, train, rng);
      bk.to_v->forward(a.v.f32(), a.ln1.f32(), M, train, rng);
      const cpu::HammingDims hd{B, N, C, H, cfg_.hash_bits, cfg_.anchors};
      const cpu::HammingWeights hw{bk.anchors, bk.mu, bk.A, bk.dwconv, nullptr};
      cpu::HammingSaved saved;
      if (train) saved = cpu::hamming_saved_bind(hd, a.hsaved.f32(), a.codes.data());
      cpu::hamming_attention_forward(a.ao.f32(), train ? &saved : nullptr, a.qk.f32(), a.v.f32(), hw, hd);
    }
    bk.proj->forward(t, a.ao.f32(), M, train, rng);
    float* xmid = a.xmid.f32();
#pragma omp parallel for if (int64_t(M) * C >= 32768)
    for (int64_t i = 0; i < int64_t(M) * C; ++i) xmid[i] = x[i] + t[i];
    cpu::layernorm_forward(a.ln2.f32(), a.mean2.f32(), a.rstd2.f32(), xmid, ps.get(p + "norm2.weight").f32(),
                           ps.get(p + "norm2.bias").f32(), M, C, cfg_.ln_eps);
    bk.fc1->forward(a.fc1.f32(), a.ln2.f32(), M, train, rng);
    cpu::gelu_forward(a.gelu.f32(), a.fc1.f32(), int64_t(M) * F);
    bk.fc2->forward(t, a.gelu.f32(), M, train, rng);
    float* xout = train ? a.xout.f32() : x0;  // inference: x0_ holds the residual stream
#pragma omp parallel for if (int64_t(M) * C >= 32768)
    for (int64_t i = 0; i < int64_t(M) * C; ++i) xout[i] = xmid[i] + t[i];
    x = xout;
  }
  // Final norm and head on the class token only (timm norms all tokens; only the class token is used).
  float* cls_in = train ? dtmp_.f32() : t;
  for (int b = 0; b < B; ++b) std::memcpy(cls_in + int64_t(b) * C, x + int64_t(b) * N * C, sizeof(float) * C);
  cpu::layernorm_forward(cls_ln_.f32(), cls_mean_.f32(), cls_rstd_.f32(), cls_in, ps.get("norm.weight").f32(),
                         ps.get("norm.bias").f32(), B, C, cfg_.ln_eps);
  cpu::linear_forward(logits_.f32(), cls_ln_.f32(), ps.get("head.weight").f32(), ps.get("head.bias").f32(), B, C,
                      cfg_.num_classes);
}

void Vit::backward(const float* dlogits) {
  SAV_CHECK(train_buffers_, "backward() needs a forward(..., train=true) first");
  const int B = B_, N = cfg_.tokens(), C = cfg_.dim, F = cfg_.mlp_hidden, H = cfg_.heads, P = cfg_.num_patches();
  const int M = B * N;
  const ParamSet& ps = params_;
  const ParamSet& gs = grads_;
  auto W = [&](const std::string& n) { return ps.get(n).f32(); };
  auto G = [&](const std::string& n) { return gs.get(n).f32(); };

  // head and final norm (class-token rows only)
  Tensor dcls_ln = Tensor::zeros({B, C});
  cpu::linear_backward(dcls_ln.f32(), G("head.weight"), G("head.bias"), dlogits, cls_ln_.f32(), W("head.weight"), B, C,
                       cfg_.num_classes);
  const float* xlast = cfg_.depth > 0 ? acts_.back().xout.f32() : x0_.f32();
  Tensor cls_in = Tensor::empty({B, C});
  for (int b = 0; b < B; ++b)
    std::memcpy(cls_in.f32() + int64_t(b) * C, xlast + int64_t(b) * N * C, sizeof(float) * C);
  Tensor dcls = Tensor::zeros({B, C});
  cpu::layernorm_backward(dcls.f32(), G("norm.weight"), G("norm.bias"), dcls_ln.f32(), cls_in.f32(), W("norm.weight"),
                          cls_mean_.f32(), cls_rstd_.f32(), B, C);
  float* dx = dx_.f32();  // gradient of the residual stream (M,C)
  std::memset(dx, 0, sizeof(float) * M * C);
  for (int b = 0; b < B; ++b) std::memcpy(dx + int64_t(b) * N * C, dcls.f32() + int64_t(b) * C, sizeof(float) * C);

  float* dbig = dbig_.f32();
  float* dbig2 = dbig2_.f32();
  float* dt = dtmp_.f32();
  for (int l = cfg_.depth - 1; l >= 0; --l) {
    BlockActs& a = acts_[l];
    Block& bk = blocks_[l];
    const std::string p = blk(l);
    const float* xin = l > 0 ? acts_[l - 1].xout.f32() : x0_.f32();
    // MLP branch: xout = xmid + fc2(gelu(fc1(ln2(xmid))))
    std::memset(dbig, 0, sizeof(float) * M * F);
    bk.fc2->backward(dbig, dx);
    std::memset(dbig2, 0, sizeof(float) * M * F);
    cpu::gelu_backward(dbig2, dbig, a.fc1.f32(), int64_t(M) * F);
    std::memset(dt, 0, sizeof(float) * M * C);
    bk.fc1->backward(dt, dbig2);
    cpu::layernorm_backward(dx, G(p + "norm2.weight"), G(p + "norm2.bias"), dt, a.xmid.f32(), W(p + "norm2.weight"),
                            a.mean2.f32(), a.rstd2.f32(), M, C);  // dx now holds d xmid
    // attention branch: xmid = xin + proj(attn(ln1(xin)))
    std::memset(dt, 0, sizeof(float) * M * C);
    bk.proj->backward(dt, dx);  // dt = d ao
    if (bk.attn == 's') {
      std::memset(dbig, 0, sizeof(float) * M * 3 * C);
      cpu::attention_backward(dbig, scratch_.f32(), dt, a.qkv.f32(), a.att.f32(), B, N, C, H);
      std::memset(dt, 0, sizeof(float) * M * C);
      bk.qkv->backward(dt, dbig);
    } else {
      const cpu::HammingDims hd{B, N, C, H, cfg_.hash_bits, cfg_.anchors};
      const cpu::HammingWeights hw{bk.anchors, bk.mu, bk.A, bk.dwconv, nullptr};
      const cpu::HammingSaved saved = cpu::hamming_saved_bind(hd, a.hsaved.f32(), a.codes.data());
      float* dqk = dbig;        // (M,C)
      float* dv = dbig + int64_t(M) * C;  // (M,C); dbig holds >= 3C columns of M rows
      std::memset(dbig, 0, sizeof(float) * M * 2 * C);
      cpu::hamming_attention_backward(dqk, dv, bk.ddwconv, nullptr, dt, a.v.f32(), saved, hw, hd);
      std::memset(dt, 0, sizeof(float) * M * C);
      bk.to_qk->backward(dt, dqk);
      bk.to_v->backward(dt, dv);
    }
    cpu::layernorm_backward(dx, G(p + "norm1.weight"), G(p + "norm1.bias"), dt, xin, W(p + "norm1.weight"),
                            a.mean1.f32(), a.rstd1.f32(), M, C);  // dx now holds d xin
  }
  // embeddings: x0[b,0] = cls + pos[0]; x0[b,1+i] = pe[b,i] + pos[1+i]
  float* dcls_tok = G("cls_token");
  float* dpos = G("pos_embed");
  for (int b = 0; b < B; ++b) {
    const float* db = dx + int64_t(b) * N * C;
    for (int c = 0; c < C; ++c) dcls_tok[c] += db[c];
    for (int64_t i = 0; i < int64_t(N) * C; ++i) dpos[i] += db[i];
  }
  Tensor dpe = Tensor::empty({int64_t(B) * P, C});
  for (int b = 0; b < B; ++b)
    std::memcpy(dpe.f32() + int64_t(b) * P * C, dx + int64_t(b) * N * C + C, sizeof(float) * P * C);
  cpu::patch_embed_backward(nullptr, G("patch_embed.proj.weight"), G("patch_embed.proj.bias"), dpe.f32(), cols_.f32(),
                            W("patch_embed.proj.weight"), B, cfg_.in_chans, cfg_.img_size, cfg_.patch, C);
}

Tensor Vit::activation(int block, const std::string& what) const {
  SAV_CHECK(train_buffers_ && block >= 0 && block < static_cast<int>(acts_.size()),
            "activations are kept only after a training forward; block " << block);
  const BlockActs& a = acts_[block];
  const std::map<std::string, const Tensor*> m = {{"ln1", &a.ln1},   {"qkv", &a.qkv},   {"qk", &a.qk},
                                                  {"v", &a.v},       {"ao", &a.ao},     {"xmid", &a.xmid},
                                                  {"ln2", &a.ln2},   {"fc1", &a.fc1},   {"gelu", &a.gelu},
                                                  {"xout", &a.xout}};
  auto it = m.find(what);
  SAV_CHECK(it != m.end() && it->second->defined(), "no activation '" << what << "' in block " << block);
  return *it->second;
}

std::map<std::string, std::string> Vit::metadata() const {
  const VitConfig& c = cfg_;
  std::map<std::string, std::string> md = {{"sav.model", "vit"},
                                           {"sav.vit.name", c.name},
                                           {"sav.vit.img_size", std::to_string(c.img_size)},
                                           {"sav.vit.patch", std::to_string(c.patch)},
                                           {"sav.vit.in_chans", std::to_string(c.in_chans)},
                                           {"sav.vit.num_classes", std::to_string(c.num_classes)},
                                           {"sav.vit.dim", std::to_string(c.dim)},
                                           {"sav.vit.depth", std::to_string(c.depth)},
                                           {"sav.vit.heads", std::to_string(c.heads)},
                                           {"sav.vit.mlp_hidden", std::to_string(c.mlp_hidden)},
                                           {"sav.vit.ln_eps", std::to_string(c.ln_eps)}};
  if (!c.is_dense()) {
    md["sav.vit.attn"] = c.attn.empty() ? std::string(c.depth, 's') : c.attn;
    md["sav.vit.mlp"] = c.mlp.empty() ? std::string(c.depth, 'd') : c.mlp;
    md["sav.vit.attn_linear"] = c.attn_linear.empty() ? std::string(c.depth, 'd') : c.attn_linear;
    md["sav.vit.hash_bits"] = std::to_string(c.hash_bits);
    md["sav.vit.anchors"] = std::to_string(c.anchors);
    md["sav.reparam.pmin"] = std::to_string(ropt_.pmin);
    md["sav.reparam.pmax"] = std::to_string(ropt_.pmax);
  }
  return md;
}

VitConfig vit_config_from_metadata(const std::map<std::string, std::string>& md) {
  auto get = [&](const char* k) -> const std::string& {
    auto it = md.find(std::string("sav.vit.") + k);
    SAV_CHECK(it != md.end(), "checkpoint metadata lacks sav.vit." << k << "; pass --arch");
    return it->second;
  };
  auto geti = [&](const char* k) {
    try {
      return std::stoi(get(k));
    } catch (const std::logic_error&) {
      SAV_THROW("checkpoint metadata sav.vit." << k << " = '" << get(k) << "' is not an integer");
    }
  };
  VitConfig c;
  c.name = get("name");
  c.img_size = geti("img_size");
  c.patch = geti("patch");
  c.in_chans = geti("in_chans");
  c.num_classes = geti("num_classes");
  c.dim = geti("dim");
  c.depth = geti("depth");
  c.heads = geti("heads");
  c.mlp_hidden = geti("mlp_hidden");
  c.ln_eps = std::stof(get("ln_eps"));
  if (md.count("sav.vit.attn")) {
    c.attn = get("attn");
    c.mlp = get("mlp");
    c.attn_linear = get("attn_linear");
    c.hash_bits = geti("hash_bits");
    c.anchors = geti("anchors");
  }
  c.validate();
  return c;
}

}  // namespace sav
