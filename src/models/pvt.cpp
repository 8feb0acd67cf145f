#include "models/pvt.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "core/error.h"
#include "io/safetensors.h"
#include "models/block_linears.h"
#include "ops/cpu/conv.h"
#include "ops/cpu/hamming.h"
#include "ops/cpu/ops.h"

namespace sav {

namespace {
constexpr int kMlpConv = 3;  // the MLP's depthwise conv is 3x3

std::string join_ints(const std::vector<int>& v) {
  std::ostringstream os;
  for (size_t i = 0; i < v.size(); ++i) os << (i ? "," : "") << v[i];
  return os.str();
}
std::vector<int> parse_ints(const std::string& s, const char* key) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      v.push_back(std::stoi(item));
    } catch (const std::logic_error&) {
      SAV_THROW("checkpoint metadata " << key << " = '" << s << "' is not a list of integers");
    }
  }
  return v;
}
}  // namespace

int PvtConfig::grid(int s) const {
  int g = cpu::conv_out_size(img_size, stem_patch, stem_stride, stem_patch / 2);
  for (int i = 1; i <= s; ++i) g = cpu::conv_out_size(g, 3, 2, 1);
  return g;
}

int PvtConfig::kv_grid(int s) const { return sr[s] > 1 ? cpu::conv_out_size(grid(s), sr[s], sr[s], 0) : grid(s); }

int PvtConfig::total_blocks() const {
  int n = 0;
  for (int d : depths) n += d;
  return n;
}

bool PvtConfig::is_dense() const {
  for (int s = 0; s < stages(); ++s)
    if (attn_kind(s) != 's' || mlp_kind(s) != 'd' || attn_linear_kind(s) != 'd') return false;
  return true;
}

void PvtConfig::validate() const {
  const size_t S = dims.size();
  SAV_CHECK(S >= 1 && heads.size() == S && depths.size() == S && sr.size() == S && mlp_ratios.size() == S,
            "PVT config: dims, heads, depths, sr and mlp_ratios need one entry per stage: " << describe());
  SAV_CHECK(img_size > 0 && in_chans > 0 && num_classes > 0, "impossible PVT sizes: " << describe());
  SAV_CHECK(stem_patch > stem_stride && stem_stride > 0,
            "PVT stem: patch " << stem_patch << " must exceed its stride " << stem_stride << " (overlapping)");
  for (size_t s = 0; s < S; ++s) {
    SAV_CHECK(dims[s] > 0 && heads[s] > 0 && dims[s] % heads[s] == 0,
              "stage " << s << ": width " << dims[s] << " is not divisible by the head count " << heads[s]);
    SAV_CHECK(depths[s] >= 0 && mlp_ratios[s] > 0 && sr[s] >= 1, "impossible PVT stage " << s << ": " << describe());
    SAV_CHECK(grid(int(s)) >= 1, "image size " << img_size << " is too small for stage " << s);
    SAV_CHECK(kv_grid(int(s)) >= 1, "stage " << s << ": grid " << grid(int(s)) << " is smaller than the spatial "
                                              << "reduction ratio " << sr[s]);
  }
  auto check = [&](const std::string& k, const char* what, const std::string& allowed) {
    SAV_CHECK(k.empty() || k.size() == S, what << " kinds '" << k << "' must have one character per stage (" << S << ")");
    for (char c : k) SAV_CHECK(allowed.find(c) != std::string::npos, what << " kind '" << c << "' not in " << allowed);
  };
  check(attn, "attention", "sh");
  check(mlp, "mlp", "dsm");
  check(attn_linear, "attention linear", "dsm");
  SAV_CHECK(hash_bits >= 1 && hash_bits <= 64 && anchors >= 1, "hash bits must be 1..64 and anchors >= 1");
}

std::string PvtConfig::describe() const {
  std::ostringstream os;
  os << name << ": " << img_size << "x" << img_size << "x" << in_chans << ", widths " << join_ints(dims) << ", heads "
     << join_ints(heads) << ", depths " << join_ints(depths) << ", sr " << join_ints(sr) << ", mlp ratios "
     << join_ints(mlp_ratios) << ", classes " << num_classes;
  if (!is_dense())
    os << ", attn " << (attn.empty() ? "dense" : attn) << ", mlp linears " << (mlp.empty() ? "dense" : mlp)
       << ", attn linears " << (attn_linear.empty() ? "dense" : attn_linear);
  return os.str();
}

PvtConfig pvt_preset(const std::string& name) {
  PvtConfig c;
  c.name = name;
  if (name == "pvt_v2_b0") {
  } else if (name == "pvt_v2_b1") {
    c.dims = {64, 128, 320, 512};
  } else if (name == "pvt_v2_b2") {
    c.dims = {64, 128, 320, 512};
    c.depths = {3, 4, 6, 3};
  } else if (name == "pvt_fmnist") {
    c.img_size = 28, c.in_chans = 1, c.num_classes = 10;
    c.stem_patch = 3, c.stem_stride = 2;  // grids 14, 7, 4, 2
    c.dims = {32, 64, 96, 128};
    c.heads = {1, 2, 3, 4};
    c.sr = {2, 1, 1, 1};
    c.mlp_ratios = {4, 4, 4, 4};
  } else {
    std::string all;
    for (auto& n : pvt_preset_names()) all += (all.empty() ? "" : ", ") + n;
    SAV_THROW("unknown PVT arch '" << name << "'; known: " << all);
  }
  return c;
}

std::vector<std::string> pvt_preset_names() { return {"pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_fmnist"}; }

bool is_pvt_arch(const std::string& name) {
  const auto names = pvt_preset_names();
  return std::find(names.begin(), names.end(), name) != names.end();
}

std::string Pvt::stage_embed(int s) const {
  return s == 0 ? "patch_embed." : "stages." + std::to_string(s) + ".downsample.";
}

Pvt::Pvt(const PvtConfig& cfg, const ReparamOptions& ropt) : cfg_(cfg), ropt_(ropt) {
  cfg_.validate();
  int cin = cfg_.in_chans;
  for (int s = 0; s < cfg_.stages(); ++s) {
    const int C = cfg_.dims[s], H = cfg_.heads[s], F = cfg_.mlp_hidden(s), r = cfg_.sr[s];
    const int k = s == 0 ? cfg_.stem_patch : 3;
    const std::string e = stage_embed(s);
    params_.declare(e + "proj.weight", {C, cin, k, k});
    params_.declare(e + "proj.bias", {C}, false);
    params_.declare(e + "norm.weight", {C}, false);
    params_.declare(e + "norm.bias", {C}, false);
    first_block_.push_back(static_cast<int>(blocks_.size()));
    const LinearKind ak = linear_kind_from_char(cfg_.attn_linear_kind(s)), mk = linear_kind_from_char(cfg_.mlp_kind(s));
    for (int i = 0; i < cfg_.depths[s]; ++i) {
      Block b;
      b.stage = s;
      b.prefix = "stages." + std::to_string(s) + ".blocks." + std::to_string(i) + ".";
      b.attn = cfg_.attn_kind(s);
      const std::string& p = b.prefix;
      params_.declare(p + "norm1.weight", {C}, false);
      params_.declare(p + "norm1.bias", {C}, false);
      if (b.attn == 's') {
        b.q = std::make_unique<LinearLayer>(p + "attn.q", C, C, ak, &ropt_);
        b.kv = std::make_unique<LinearLayer>(p + "attn.kv", C, 2 * C, ak, &ropt_);
        b.q->declare(params_);
        b.kv->declare(params_);
        if (r > 1) {
          params_.declare(p + "attn.sr.weight", {C, C, r, r});
          params_.declare(p + "attn.sr.bias", {C}, false);
          params_.declare(p + "attn.norm.weight", {C}, false);
          params_.declare(p + "attn.norm.bias", {C}, false);
        }
      } else {
        declare_hamming(b, p + "attn.", C, H, cfg_.hash_bits, cfg_.anchors, ak, &ropt_, params_, buffers_);
      }
      b.proj = std::make_unique<LinearLayer>(p + "attn.proj", C, C, ak, &ropt_);
      b.proj->declare(params_);
      params_.declare(p + "norm2.weight", {C}, false);
      params_.declare(p + "norm2.bias", {C}, false);
      b.fc1 = std::make_unique<LinearLayer>(p + "mlp.fc1", C, F, mk, &ropt_);
      b.fc1->declare(params_);
      params_.declare(p + "mlp.dwconv.weight", {F, 1, kMlpConv, kMlpConv});
      params_.declare(p + "mlp.dwconv.bias", {F}, false);
      b.fc2 = std::make_unique<LinearLayer>(p + "mlp.fc2", F, C, mk, &ropt_);
      b.fc2->declare(params_);
      blocks_.push_back(std::move(b));
    }
    const std::string sn = "stages." + std::to_string(s) + ".norm.";
    params_.declare(sn + "weight", {C}, false);
    params_.declare(sn + "bias", {C}, false);
    cin = C;
  }
  params_.declare("head.weight", {cfg_.num_classes, cin});
  params_.declare("head.bias", {cfg_.num_classes}, false);
  params_.allocate();
  grads_ = params_.like();
  buffers_.allocate();
  for (Block& b : blocks_) {
    for (auto* lin : b.linears())
      if (lin) lin->bind(params_, grads_);
    if (b.attn == 'h') {
      bind_hamming(b, b.prefix + "attn.", params_, grads_, buffers_);
    }
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& n = params_.name(i);
    if (n.find("norm") != std::string::npos && params_.tensor(i).ndim() == 1 && n.size() > 7 &&
        n.compare(n.size() - 7, 7, ".weight") == 0)
      params_.tensor(i).fill(1.0f);  // LayerNorm weights
  }
}

void Pvt::init_random(Rng& rng) {
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& n = params_.name(i);
    const Tensor& t = params_.tensor(i);
    float* p = t.f32();
    if (t.ndim() == 1) {
      const bool ln_w = n.find("norm") != std::string::npos && n.find(".weight") != std::string::npos;
      t.fill(ln_w ? 1.0f : 0.0f);
    } else if (t.ndim() == 4) {
      // timm: conv weights ~ N(0, sqrt(2 / fan_out)), fan_out = k*k*out_channels / groups
      const auto& sh = t.shape();
      const bool depthwise = sh[1] == 1 && n.find("dwconv") != std::string::npos;
      const double fan_out = double(sh[2]) * sh[3] * (depthwise ? 1 : sh[0]);
      const float std = static_cast<float>(std::sqrt(2.0 / fan_out));
      for (int64_t j = 0; j < t.numel(); ++j) p[j] = std * rng.normal();
    } else if (n.find("attn.dwconv") != std::string::npos) {
      t.fill(0.0f);  // Hamming token conv starts at zero (METHOD.md section 1)
    } else {
      for (int64_t j = 0; j < t.numel(); ++j) p[j] = rng.trunc_normal(0.02f);
    }
  }
}

void Pvt::load(const Checkpoint& ck) {
  load_params_strict(ck, params_, buffers_, cfg_.name);
  linears_params_changed(blocks_);
}

float Pvt::aux_loss() const { return linears_aux_loss(blocks_); }

LinearLayer* Pvt::find_linear(const std::string& prefix) { return linears_find(blocks_, prefix); }

std::vector<std::pair<std::string, const LinearLayer*>> Pvt::moe_layers() const { return linears_moe(blocks_); }

void Pvt::ensure_buffers(int B, bool train) {
  if (B == B_ && train == train_buffers_ && !acts_.empty()) return;
  const int S = cfg_.stages();
  int64_t max_mc = 1, max_mbig = 1, max_mf = 1, max_scratch = 1, max_stage = 1;
  sacts_.assign(S, {});
  int cin = cfg_.in_chans, gin = cfg_.img_size;
  for (int s = 0; s < S; ++s) {
    const int64_t g = cfg_.grid(s), N = g * g, M = B * N, C = cfg_.dims[s], F = cfg_.mlp_hidden(s);
    const int k = s == 0 ? cfg_.stem_patch : 3, st = s == 0 ? cfg_.stem_stride : 2;
    StageActs& a = sacts_[s];
    a.cols = Tensor::empty({int64_t(cpu::conv2d_cols_floats(B, gin, gin, cin, k, st, k / 2))});
    a.conv = Tensor::empty({M, C});
    a.embed = Tensor::empty({M, C});
    a.emean = Tensor::empty({M});
    a.erstd = Tensor::empty({M});
    a.out = Tensor::empty({M, C});
    a.omean = Tensor::empty({M});
    a.orstd = Tensor::empty({M});
    max_mc = std::max(max_mc, M * C);
    max_mbig = std::max(max_mbig, M * std::max<int64_t>(3 * C, F));
    max_mf = std::max(max_mf, M * F);
    max_scratch = std::max(max_scratch, a.cols.numel());
    max_stage = std::max(max_stage, int64_t(B) * gin * gin * cin);
    cin = static_cast<int>(C), gin = static_cast<int>(g);
  }
  max_stage = std::max(max_stage, int64_t(B) * gin * gin * cin);  // d(last stage output)
  acts_.assign(blocks_.size(), {});
  for (size_t l = 0; l < blocks_.size(); ++l) {
    const Block& bk = blocks_[l];
    const int s = bk.stage;
    if (!train && first_block_[s] != static_cast<int>(l)) continue;  // inference: one set per stage
    const int64_t g = cfg_.grid(s), N = g * g, M = B * N, C = cfg_.dims[s], F = cfg_.mlp_hidden(s), H = cfg_.heads[s];
    const int64_t gk = cfg_.kv_grid(s), Nk = gk * gk, r = cfg_.sr[s];
    BlockActs& a = acts_[l];
    a.ln1 = Tensor::empty({M, C});
    a.mean1 = Tensor::empty({M});
    a.rstd1 = Tensor::empty({M});
    if (bk.attn == 's') {
      a.q = Tensor::empty({M, C});
      if (r > 1) {
        a.srcols = Tensor::empty({int64_t(cpu::conv2d_cols_floats(B, int(g), int(g), int(C), int(r), int(r), 0))});
        a.srout = Tensor::empty({B * Nk, C});
        a.srln = Tensor::empty({B * Nk, C});
        a.srmean = Tensor::empty({B * Nk});
        a.srrstd = Tensor::empty({B * Nk});
        max_scratch = std::max(max_scratch, a.srcols.numel());
      }
      a.kv = Tensor::empty({B * Nk, 2 * C});
      a.att = Tensor::empty({B * H * N * Nk});
      max_scratch = std::max(max_scratch, B * H * N * Nk);
    } else {
      a.qk = Tensor::empty({M, C});
      a.v = Tensor::empty({M, C});
      if (train) {
        const cpu::HammingDims hd{B, int(N), int(C), int(H), cfg_.hash_bits, cfg_.anchors};
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
    a.dw = Tensor::empty({M, F});
    a.gelu = Tensor::empty({M, F});
    if (train) a.xout = Tensor::empty({M, C});
  }
  img_ = Tensor::empty({int64_t(B) * cfg_.img_size * cfg_.img_size * cfg_.in_chans});
  pooled_ = Tensor::empty({B, cfg_.dims.back()});
  logits_ = Tensor::empty({B, cfg_.num_classes});
  tmp_ = Tensor::empty({max_mc});
  if (train) {
    dx_ = Tensor::empty({max_mc});
    dt_ = Tensor::empty({max_mc});
    dbig_ = Tensor::empty({max_mbig});
    dbig2_ = Tensor::empty({max_mf});
    dstage_ = Tensor::empty({max_stage});
    scratch_ = Tensor::empty({max_scratch});
  }
  B_ = B;
  train_buffers_ = train;
}

void Pvt::forward(const float* images, int B, bool train) {
  SAV_CHECK(B > 0, "batch size must be positive, got " << B);
  ensure_buffers(B, train);
  const ParamSet& ps = params_;
  auto W = [&](const std::string& n) { return ps.get(n).f32(); };
  Rng* rng = train ? &noise_rng_ : nullptr;
  // images (B,Cin,S,S) -> channels-last (B,S,S,Cin)
  const int S = cfg_.img_size, Cin = cfg_.in_chans;
  float* img = img_.f32();
#pragma omp parallel for if (int64_t(B) * S * S * Cin >= 32768)
  for (int b = 0; b < B; ++b)
    for (int c = 0; c < Cin; ++c)
      for (int i = 0; i < S * S; ++i) img[(int64_t(b) * S * S + i) * Cin + c] = images[(int64_t(b) * Cin + c) * S * S + i];

  const float* xin = img;
  int cin = Cin, gin = S;
  for (int s = 0; s < cfg_.stages(); ++s) {
    const int g = cfg_.grid(s), N = g * g, M = B * N, C = cfg_.dims[s], F = cfg_.mlp_hidden(s), H = cfg_.heads[s];
    const int k = s == 0 ? cfg_.stem_patch : 3, st = s == 0 ? cfg_.stem_stride : 2, r = cfg_.sr[s];
    const int gk = cfg_.kv_grid(s), Nk = gk * gk;
    StageActs& sa = sacts_[s];
    const std::string e = stage_embed(s);
    cpu::conv2d_forward(sa.conv.f32(), sa.cols.f32(), xin, W(e + "proj.weight"), W(e + "proj.bias"), B, gin, gin, cin, C,
                        k, st, k / 2);
    cpu::layernorm_forward(sa.embed.f32(), sa.emean.f32(), sa.erstd.f32(), sa.conv.f32(), W(e + "norm.weight"),
                           W(e + "norm.bias"), M, C, cfg_.embed_ln_eps);
    if (tap_) tap_(-1 - s, "embed", sa.embed.f32(), M, C);
    float* x = sa.embed.f32();  // residual stream (inference: updated in place)
    float* t = tmp_.f32();
    for (int l = first_block_[s]; l < first_block_[s] + cfg_.depths[s]; ++l) {
      Block& bk = blocks_[l];
      BlockActs& a = acts(l);
      const std::string& p = bk.prefix;
      cpu::layernorm_forward(a.ln1.f32(), a.mean1.f32(), a.rstd1.f32(), x, W(p + "norm1.weight"), W(p + "norm1.bias"), M,
                             C, cfg_.ln_eps);
      if (bk.attn == 's') {
        bk.q->forward(a.q.f32(), a.ln1.f32(), M, train, rng);
        const float* kvin = a.ln1.f32();
        if (r > 1) {
          cpu::conv2d_forward(a.srout.f32(), a.srcols.f32(), a.ln1.f32(), W(p + "attn.sr.weight"), W(p + "attn.sr.bias"),
                              B, g, g, C, C, r, r, 0);
          cpu::layernorm_forward(a.srln.f32(), a.srmean.f32(), a.srrstd.f32(), a.srout.f32(), W(p + "attn.norm.weight"),
                                 W(p + "attn.norm.bias"), B * Nk, C, cfg_.embed_ln_eps);
          kvin = a.srln.f32();
        }
        bk.kv->forward(a.kv.f32(), kvin, B * Nk, train, rng);
        cpu::attention_q_kv_forward(a.ao.f32(), a.att.f32(), a.q.f32(), a.kv.f32(), B, N, Nk, C, H);
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
      if (tap_) tap_(l, "attn", t, M, C);
      float* xmid = a.xmid.f32();
#pragma omp parallel for if (int64_t(M) * C >= 32768)
      for (int64_t i = 0; i < int64_t(M) * C; ++i) xmid[i] = x[i] + t[i];
      cpu::layernorm_forward(a.ln2.f32(), a.mean2.f32(), a.rstd2.f32(), xmid, W(p + "norm2.weight"), W(p + "norm2.bias"),
                             M, C, cfg_.ln_eps);
      bk.fc1->forward(a.fc1.f32(), a.ln2.f32(), M, train, rng);
      cpu::dwconv2d_forward(a.dw.f32(), a.fc1.f32(), W(p + "mlp.dwconv.weight"), W(p + "mlp.dwconv.bias"), B,
                            g, g, F, kMlpConv);
      cpu::gelu_forward(a.gelu.f32(), a.dw.f32(), int64_t(M) * F);
      bk.fc2->forward(t, a.gelu.f32(), M, train, rng);
      float* xout = train ? a.xout.f32() : x;
#pragma omp parallel for if (int64_t(M) * C >= 32768)
      for (int64_t i = 0; i < int64_t(M) * C; ++i) xout[i] = xmid[i] + t[i];
      x = xout;
      if (tap_) tap_(l, "xout", x, M, C);
    }
    const std::string sn = "stages." + std::to_string(s) + ".norm.";
    cpu::layernorm_forward(sa.out.f32(), sa.omean.f32(), sa.orstd.f32(), x, W(sn + "weight"), W(sn + "bias"), M, C,
                           cfg_.ln_eps);
    if (tap_) tap_(-1 - s, "out", sa.out.f32(), M, C);
    xin = sa.out.f32();
    cin = C, gin = g;
  }
  // head on the mean over the last stage's tokens
  const int N = gin * gin, C = cin;
  float* pooled = pooled_.f32();
  const float inv = 1.0f / float(N);
  for (int b = 0; b < B; ++b) {
    float* pb = pooled + int64_t(b) * C;
    std::fill(pb, pb + C, 0.0f);
    for (int n = 0; n < N; ++n) {
      const float* row = xin + (int64_t(b) * N + n) * C;
      for (int c = 0; c < C; ++c) pb[c] += row[c];
    }
    for (int c = 0; c < C; ++c) pb[c] *= inv;
  }
  cpu::linear_forward(logits_.f32(), pooled, W("head.weight"), W("head.bias"), B, C, cfg_.num_classes);
}

void Pvt::backward(const float* dlogits) {
  SAV_CHECK(train_buffers_, "backward() needs a forward(..., train=true) first");
  const int B = B_;
  const ParamSet& ps = params_;
  const ParamSet& gs = grads_;
  auto W = [&](const std::string& n) { return ps.get(n).f32(); };
  auto G = [&](const std::string& n) { return gs.get(n).f32(); };
  const int last = cfg_.stages() - 1;
  // head: pooled = mean_n out[b, n]
  {
    const int N = cfg_.tokens(last), C = cfg_.dims[last];
    Tensor dpooled = Tensor::zeros({B, C});
    cpu::linear_backward(dpooled.f32(), G("head.weight"), G("head.bias"), dlogits, pooled_.f32(), W("head.weight"), B, C,
                         cfg_.num_classes);
    float* dout = dstage_.f32();  // d(stage output), (B,N,C)
    const float inv = 1.0f / float(N);
    for (int b = 0; b < B; ++b)
      for (int n = 0; n < N; ++n)
        for (int c = 0; c < C; ++c) dout[(int64_t(b) * N + n) * C + c] = dpooled.f32()[int64_t(b) * C + c] * inv;
  }
  float* dx = dx_.f32();
  float* dt = dt_.f32();
  float* dbig = dbig_.f32();
  float* dbig2 = dbig2_.f32();
  for (int s = last; s >= 0; --s) {
    const int g = cfg_.grid(s), N = g * g, M = B * N, C = cfg_.dims[s], F = cfg_.mlp_hidden(s), H = cfg_.heads[s];
    const int r = cfg_.sr[s], gk = cfg_.kv_grid(s), Nk = gk * gk;
    StageActs& sa = sacts_[s];
    const int lfirst = first_block_[s], lend = lfirst + cfg_.depths[s];
    const float* xlast = lend > lfirst ? acts_[lend - 1].xout.f32() : sa.embed.f32();
    const std::string sn = "stages." + std::to_string(s) + ".norm.";
    std::memset(dx, 0, sizeof(float) * M * C);
    cpu::layernorm_backward(dx, G(sn + "weight"), G(sn + "bias"), dstage_.f32(), xlast, W(sn + "weight"), sa.omean.f32(),
                            sa.orstd.f32(), M, C);
    for (int l = lend - 1; l >= lfirst; --l) {
      Block& bk = blocks_[l];
      BlockActs& a = acts_[l];
      const std::string& p = bk.prefix;
      const float* xin = l > lfirst ? acts_[l - 1].xout.f32() : sa.embed.f32();
      // MLP branch: xout = xmid + fc2(gelu(dwconv(fc1(ln2(xmid)))))
      std::memset(dbig, 0, sizeof(float) * M * F);
      bk.fc2->backward(dbig, dx);  // d gelu
      std::memset(dbig2, 0, sizeof(float) * M * F);
      cpu::gelu_backward(dbig2, dbig, a.dw.f32(), int64_t(M) * F);  // d dw
      std::memset(dbig, 0, sizeof(float) * M * F);
      cpu::dwconv2d_backward(dbig, G(p + "mlp.dwconv.weight"), G(p + "mlp.dwconv.bias"), dbig2,
                             a.fc1.f32(), W(p + "mlp.dwconv.weight"), B, g, g, F, kMlpConv);  // d fc1
      std::memset(dt, 0, sizeof(float) * M * C);
      bk.fc1->backward(dt, dbig);
      cpu::layernorm_backward(dx, G(p + "norm2.weight"), G(p + "norm2.bias"), dt, a.xmid.f32(), W(p + "norm2.weight"),
                              a.mean2.f32(), a.rstd2.f32(), M, C);  // dx = d xmid
      // attention branch: xmid = xin + proj(attn(ln1(xin)))
      std::memset(dt, 0, sizeof(float) * M * C);
      bk.proj->backward(dt, dx);  // dt = d ao
      float* dln1 = dbig2;        // (M,C), free now
      std::memset(dln1, 0, sizeof(float) * M * C);
      if (bk.attn == 's') {
        float* dq = dbig;                        // (M,C)
        float* dkv = dbig + int64_t(M) * C;      // (B*Nk, 2C); dbig holds M * max(3C, F) floats
        std::memset(dbig, 0, sizeof(float) * (int64_t(M) * C + int64_t(B) * Nk * 2 * C));
        cpu::attention_q_kv_backward(dq, dkv, scratch_.f32(), dt, a.q.f32(), a.kv.f32(), a.att.f32(), B, N, Nk, C, H);
        bk.q->backward(dln1, dq);
        if (r > 1) {
          float* dsrln = dt;  // (B*Nk, C); dt (d ao) is consumed
          std::memset(dsrln, 0, sizeof(float) * B * Nk * C);
          bk.kv->backward(dsrln, dkv);
          float* dsrout = dq;  // dq consumed by q->backward
          std::memset(dsrout, 0, sizeof(float) * B * Nk * C);
          cpu::layernorm_backward(dsrout, G(p + "attn.norm.weight"), G(p + "attn.norm.bias"), dsrln, a.srout.f32(),
                                  W(p + "attn.norm.weight"), a.srmean.f32(), a.srrstd.f32(), B * Nk, C);
          cpu::conv2d_backward(dln1, G(p + "attn.sr.weight"), G(p + "attn.sr.bias"), scratch_.f32(), dsrout,
                               a.srcols.f32(), W(p + "attn.sr.weight"), B, g, g, C, C, r, r, 0);
        } else {
          bk.kv->backward(dln1, dkv);
        }
      } else {
        const cpu::HammingDims hd{B, N, C, H, cfg_.hash_bits, cfg_.anchors};
        const cpu::HammingWeights hw{bk.anchors, bk.mu, bk.A, bk.dwconv, nullptr};
        const cpu::HammingSaved saved = cpu::hamming_saved_bind(hd, a.hsaved.f32(), a.codes.data());
        float* dqk = dbig;
        float* dv = dbig + int64_t(M) * C;
        std::memset(dbig, 0, sizeof(float) * M * 2 * C);
        cpu::hamming_attention_backward(dqk, dv, bk.ddwconv, nullptr, dt, a.v.f32(), saved, hw, hd);
        bk.to_qk->backward(dln1, dqk);
        bk.to_v->backward(dln1, dv);
      }
      cpu::layernorm_backward(dx, G(p + "norm1.weight"), G(p + "norm1.bias"), dln1, xin, W(p + "norm1.weight"),
                              a.mean1.f32(), a.rstd1.f32(), M, C);  // dx = d xin
    }
    // patch embedding: embed = LN(conv(prev)); prev = previous stage output (or the image: no gradient)
    const std::string e = stage_embed(s);
    float* dconv = dt;
    std::memset(dconv, 0, sizeof(float) * M * C);
    cpu::layernorm_backward(dconv, G(e + "norm.weight"), G(e + "norm.bias"), dx, sa.conv.f32(), W(e + "norm.weight"),
                            sa.emean.f32(), sa.erstd.f32(), M, C);
    const int k = s == 0 ? cfg_.stem_patch : 3, st = s == 0 ? cfg_.stem_stride : 2;
    const int gin = s == 0 ? cfg_.img_size : cfg_.grid(s - 1), cin = s == 0 ? cfg_.in_chans : cfg_.dims[s - 1];
    float* dprev = nullptr;
    if (s > 0) {
      dprev = dstage_.f32();
      std::memset(dprev, 0, sizeof(float) * int64_t(B) * gin * gin * cin);
    }
    cpu::conv2d_backward(dprev, G(e + "proj.weight"), G(e + "proj.bias"), scratch_.f32(), dconv, sa.cols.f32(),
                         W(e + "proj.weight"), B, gin, gin, cin, C, k, st, k / 2);
  }
}

Tensor Pvt::activation(int block, const std::string& what) const {
  SAV_CHECK(train_buffers_, "activations are kept only after a training forward");
  const Tensor* t = nullptr;
  if (block < 0) {
    const int s = -1 - block;
    SAV_CHECK(s < cfg_.stages(), "no stage " << s);
    if (what == "embed") t = &sacts_[s].embed;
    if (what == "out") t = &sacts_[s].out;
  } else {
    SAV_CHECK(block < num_blocks(), "no block " << block);
    const BlockActs& a = acts_[block];
    const std::map<std::string, const Tensor*> m = {{"ln1", &a.ln1}, {"q", &a.q},       {"qk", &a.qk},
                                                    {"v", &a.v},     {"ao", &a.ao},     {"xmid", &a.xmid},
                                                    {"xout", &a.xout}};
    auto it = m.find(what);
    if (it != m.end()) t = it->second;
  }
  SAV_CHECK(t && t->defined(), "no activation '" << what << "' for block " << block);
  return *t;
}

std::map<std::string, std::string> Pvt::metadata() const {
  const PvtConfig& c = cfg_;
  std::map<std::string, std::string> md = {{"sav.model", "pvt"},
                                           {"sav.pvt.name", c.name},
                                           {"sav.pvt.img_size", std::to_string(c.img_size)},
                                           {"sav.pvt.in_chans", std::to_string(c.in_chans)},
                                           {"sav.pvt.num_classes", std::to_string(c.num_classes)},
                                           {"sav.pvt.stem_patch", std::to_string(c.stem_patch)},
                                           {"sav.pvt.stem_stride", std::to_string(c.stem_stride)},
                                           {"sav.pvt.dims", join_ints(c.dims)},
                                           {"sav.pvt.heads", join_ints(c.heads)},
                                           {"sav.pvt.depths", join_ints(c.depths)},
                                           {"sav.pvt.sr", join_ints(c.sr)},
                                           {"sav.pvt.mlp_ratios", join_ints(c.mlp_ratios)}};
  if (!c.is_dense()) {
    const size_t S = c.dims.size();
    md["sav.pvt.attn"] = c.attn.empty() ? std::string(S, 's') : c.attn;
    md["sav.pvt.mlp"] = c.mlp.empty() ? std::string(S, 'd') : c.mlp;
    md["sav.pvt.attn_linear"] = c.attn_linear.empty() ? std::string(S, 'd') : c.attn_linear;
    md["sav.pvt.hash_bits"] = std::to_string(c.hash_bits);
    md["sav.pvt.anchors"] = std::to_string(c.anchors);
    md["sav.reparam.pmin"] = std::to_string(ropt_.pmin);
    md["sav.reparam.pmax"] = std::to_string(ropt_.pmax);
    if (ropt_.release_compat) md["sav.reparam.release_compat"] = "1";  // models/release_pvt.h
  }
  return md;
}

PvtConfig pvt_config_from_metadata(const std::map<std::string, std::string>& md) {
  auto get = [&](const char* k) -> const std::string& {
    auto it = md.find(std::string("sav.pvt.") + k);
    SAV_CHECK(it != md.end(), "checkpoint metadata lacks sav.pvt." << k << "; pass --arch");
    return it->second;
  };
  auto geti = [&](const char* k) {
    const auto v = parse_ints(get(k), k);
    SAV_CHECK(v.size() == 1, "checkpoint metadata sav.pvt." << k << " = '" << get(k) << "' is not one integer");
    return v[0];
  };
  PvtConfig c;
  c.name = get("name");
  c.img_size = geti("img_size");
  c.in_chans = geti("in_chans");
  c.num_classes = geti("num_classes");
  c.stem_patch = geti("stem_patch");
  c.stem_stride = geti("stem_stride");
  c.dims = parse_ints(get("dims"), "sav.pvt.dims");
  c.heads = parse_ints(get("heads"), "sav.pvt.heads");
  c.depths = parse_ints(get("depths"), "sav.pvt.depths");
  c.sr = parse_ints(get("sr"), "sav.pvt.sr");
  c.mlp_ratios = parse_ints(get("mlp_ratios"), "sav.pvt.mlp_ratios");
  if (md.count("sav.pvt.attn")) {
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
