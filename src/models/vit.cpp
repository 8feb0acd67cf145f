#include "models/vit.h"

#include <cmath>
#include <cstring>
#include <sstream>

#include "core/error.h"
#include "io/safetensors.h"
#include "ops/cpu/ops.h"

namespace sav {

void VitConfig::validate() const {
  SAV_CHECK(img_size > 0 && patch > 0 && img_size % patch == 0,
            "image size " << img_size << " is not a positive multiple of the patch size " << patch);
  SAV_CHECK(in_chans > 0 && num_classes > 0 && depth >= 0 && mlp_hidden > 0, "impossible ViT sizes: " << describe());
  SAV_CHECK(dim > 0 && heads > 0 && dim % heads == 0,
            "width " << dim << " is not divisible by the head count " << heads);
}

std::string VitConfig::describe() const {
  std::ostringstream os;
  os << name << ": " << img_size << "x" << img_size << "x" << in_chans << ", patch " << patch << ", width " << dim
     << ", depth " << depth << ", heads " << heads << ", mlp " << mlp_hidden << ", classes " << num_classes;
  return os.str();
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

Vit::Vit(const VitConfig& cfg) : cfg_(cfg) {
  cfg_.validate();
  const int C = cfg.dim, F = cfg.mlp_hidden;
  params_.declare("cls_token", {1, 1, C}, false);
  params_.declare("pos_embed", {1, cfg.tokens(), C}, false);
  params_.declare("patch_embed.proj.weight", {C, cfg.in_chans, cfg.patch, cfg.patch});
  params_.declare("patch_embed.proj.bias", {C}, false);
  for (int l = 0; l < cfg.depth; ++l) {
    std::string p = "blocks." + std::to_string(l) + ".";
    params_.declare(p + "norm1.weight", {C}, false);
    params_.declare(p + "norm1.bias", {C}, false);
    params_.declare(p + "attn.qkv.weight", {3 * C, C});
    params_.declare(p + "attn.qkv.bias", {3 * C}, false);
    params_.declare(p + "attn.proj.weight", {C, C});
    params_.declare(p + "attn.proj.bias", {C}, false);
    params_.declare(p + "norm2.weight", {C}, false);
    params_.declare(p + "norm2.bias", {C}, false);
    params_.declare(p + "mlp.fc1.weight", {F, C});
    params_.declare(p + "mlp.fc1.bias", {F}, false);
    params_.declare(p + "mlp.fc2.weight", {C, F});
    params_.declare(p + "mlp.fc2.bias", {C}, false);
  }
  params_.declare("norm.weight", {C}, false);
  params_.declare("norm.bias", {C}, false);
  params_.declare("head.weight", {cfg.num_classes, C});
  params_.declare("head.bias", {cfg.num_classes}, false);
  params_.allocate();
  grads_ = params_.like();
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& n = params_.name(i);
    if (n.size() > 7 && n.compare(n.size() - 7, 7, ".weight") == 0 && params_.tensor(i).ndim() == 1)
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
    } else {
      for (int64_t j = 0; j < t.numel(); ++j) p[j] = rng.trunc_normal(0.02f);
    }
  }
}

void Vit::load(const Checkpoint& ck) {
  std::vector<std::string> missing, misshaped, unexpected;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& n = params_.name(i);
    if (!ck.contains(n)) {
      missing.push_back(n);
      continue;
    }
    if (ck.shape(n) != params_.tensor(i).shape()) {
      misshaped.push_back(n + " " + shape_str(ck.shape(n)) + " (expected " + shape_str(params_.tensor(i).shape()) +
                          ")");
      continue;
    }
  }
  for (const std::string& n : ck.names())
    if (!params_.contains(n) && n != "head_dist.weight" && n != "head_dist.bias" && n != "dist_token")
      unexpected.push_back(n);
  if (!missing.empty() || !misshaped.empty()) {
    auto join = [](const std::vector<std::string>& v) {
      std::string s;
      for (size_t i = 0; i < v.size() && i < 6; ++i) s += (i ? ", " : "") + v[i];
      if (v.size() > 6) s += ", ... (" + std::to_string(v.size()) + " in all)";
      return s;
    };
    std::ostringstream os;
    os << "checkpoint " << ck.path() << " does not fit arch " << cfg_.name << ":";
    if (!missing.empty()) os << " missing " << join(missing) << ";";
    if (!misshaped.empty()) os << " mis-shaped " << join(misshaped) << ";";
    if (!unexpected.empty()) os << " unexpected " << join(unexpected) << ";";
    SAV_THROW(os.str() << " check --arch (and --img-size / --classes) against the checkpoint");
  }
  for (size_t i = 0; i < params_.size(); ++i) params_.tensor(i).copy_from(ck.get(params_.name(i)));
}

std::vector<std::pair<std::string, Tensor>> Vit::named_tensors() const {
  std::vector<std::pair<std::string, Tensor>> v;
  for (size_t i = 0; i < params_.size(); ++i) v.emplace_back(params_.name(i), params_.tensor(i));
  return v;
}

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
  // In inference all blocks share one set of activation buffers (x ping-pongs between x0_ and xout).
  const int nacts = train ? cfg_.depth : std::min(cfg_.depth, 1);
  acts_.assign(nacts, {});
  for (auto& a : acts_) {
    a.ln1 = Tensor::empty({M, C});
    a.mean1 = Tensor::empty({M});
    a.rstd1 = Tensor::empty({M});
    a.qkv = Tensor::empty({M, 3 * C});
    a.att = Tensor::empty({B * H * N * N});
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
    scratch_ = Tensor::empty({B * H * N * N});
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
  cpu::patch_embed_forward(pe_.f32(), cols_.f32(), images, ps.get("patch_embed.proj.weight").f32(),
                           ps.get("patch_embed.proj.bias").f32(), B, cfg_.in_chans, cfg_.img_size, cfg_.patch, C);
  const float* cls = ps.get("cls_token").f32();
  const float* pos = ps.get("pos_embed").f32();
  float* x0 = x0_.f32();
#pragma omp parallel for
  for (int b = 0; b < B; ++b) {
    float* xb = x0 + int64_t(b) * N * C;
    for (int c = 0; c < C; ++c) xb[c] = cls[c] + pos[c];
    const float* pb = pe_.f32() + int64_t(b) * P * C;
    for (int64_t i = 0; i < int64_t(P) * C; ++i) xb[C + i] = pb[i] + pos[C + i];
  }
  const float* x = x0;
  for (int l = 0; l < cfg_.depth; ++l) {
    BlockActs& a = acts_[train ? l : 0];
    const std::string p = "blocks." + std::to_string(l) + ".";
    cpu::layernorm_forward(a.ln1.f32(), a.mean1.f32(), a.rstd1.f32(), x, ps.get(p + "norm1.weight").f32(),
                           ps.get(p + "norm1.bias").f32(), M, C, cfg_.ln_eps);
    cpu::linear_forward(a.qkv.f32(), a.ln1.f32(), ps.get(p + "attn.qkv.weight").f32(),
                        ps.get(p + "attn.qkv.bias").f32(), M, C, 3 * C);
    cpu::attention_forward(a.ao.f32(), a.att.f32(), a.qkv.f32(), B, N, C, H);
    cpu::linear_forward(tmp_.f32(), a.ao.f32(), ps.get(p + "attn.proj.weight").f32(),
                        ps.get(p + "attn.proj.bias").f32(), M, C, C);
    float* xmid = a.xmid.f32();
    const float* t = tmp_.f32();
#pragma omp parallel for
    for (int64_t i = 0; i < int64_t(M) * C; ++i) xmid[i] = x[i] + t[i];
    cpu::layernorm_forward(a.ln2.f32(), a.mean2.f32(), a.rstd2.f32(), xmid, ps.get(p + "norm2.weight").f32(),
                           ps.get(p + "norm2.bias").f32(), M, C, cfg_.ln_eps);
    cpu::linear_forward(a.fc1.f32(), a.ln2.f32(), ps.get(p + "mlp.fc1.weight").f32(), ps.get(p + "mlp.fc1.bias").f32(),
                        M, C, F);
    cpu::gelu_forward(a.gelu.f32(), a.fc1.f32(), int64_t(M) * F);
    // In inference x may alias a.xout of the previous block (shared buffers): write fc2 into tmp first.
    cpu::linear_forward(tmp_.f32(), a.gelu.f32(), ps.get(p + "mlp.fc2.weight").f32(),
                        ps.get(p + "mlp.fc2.bias").f32(), M, F, C);
    float* xout = train ? a.xout.f32() : x0;  // inference: x0_ holds the residual stream
#pragma omp parallel for
    for (int64_t i = 0; i < int64_t(M) * C; ++i) xout[i] = xmid[i] + t[i];
    x = xout;
  }
  // Final norm and head on the class token only (timm norms all tokens; only the class token is used).
  float* cls_in = dtmp_.defined() && train ? dtmp_.f32() : tmp_.f32();
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
  float* dt = dtmp_.f32();
  for (int l = cfg_.depth - 1; l >= 0; --l) {
    BlockActs& a = acts_[l];
    const std::string p = "blocks." + std::to_string(l) + ".";
    const float* xin = l > 0 ? acts_[l - 1].xout.f32() : x0_.f32();
    // MLP branch: xout = xmid + fc2(gelu(fc1(ln2(xmid))))
    std::memset(dbig, 0, sizeof(float) * M * F);
    cpu::linear_backward(dbig, G(p + "mlp.fc2.weight"), G(p + "mlp.fc2.bias"), dx, a.gelu.f32(), W(p + "mlp.fc2.weight"),
                         M, F, C);
    // dgelu -> dfc1 in place is not allowed (accumulating API): use the tail of dbig? keep a clean copy.
    Tensor dfc1 = Tensor::zeros({M, F});
    cpu::gelu_backward(dfc1.f32(), dbig, a.fc1.f32(), int64_t(M) * F);
    std::memset(dt, 0, sizeof(float) * M * C);
    cpu::linear_backward(dt, G(p + "mlp.fc1.weight"), G(p + "mlp.fc1.bias"), dfc1.f32(), a.ln2.f32(),
                         W(p + "mlp.fc1.weight"), M, C, F);
    cpu::layernorm_backward(dx, G(p + "norm2.weight"), G(p + "norm2.bias"), dt, a.xmid.f32(), W(p + "norm2.weight"),
                            a.mean2.f32(), a.rstd2.f32(), M, C);  // dx now holds d xmid
    // attention branch: xmid = xin + proj(attn(qkv(ln1(xin))))
    std::memset(dt, 0, sizeof(float) * M * C);
    cpu::linear_backward(dt, G(p + "attn.proj.weight"), G(p + "attn.proj.bias"), dx, a.ao.f32(),
                         W(p + "attn.proj.weight"), M, C, C);
    std::memset(dbig, 0, sizeof(float) * M * 3 * C);
    cpu::attention_backward(dbig, scratch_.f32(), dt, a.qkv.f32(), a.att.f32(), B, N, C, H);
    std::memset(dt, 0, sizeof(float) * M * C);
    cpu::linear_backward(dt, G(p + "attn.qkv.weight"), G(p + "attn.qkv.bias"), dbig, a.ln1.f32(),
                         W(p + "attn.qkv.weight"), M, C, 3 * C);
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

}  // namespace sav

namespace sav {

std::map<std::string, std::string> Vit::metadata() const {
  const VitConfig& c = cfg_;
  return {{"sav.model", "vit"},
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
  c.validate();
  return c;
}

}  // namespace sav
