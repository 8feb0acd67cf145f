// PVTv2 inference on one GPU, dense or ShiftAddViT, f32 activations: weights uploaded once (shift weights
// decoded, MoE weights stacked), activations sized for the largest batch seen, a CUDA graph per batch size.
// See pvt_cuda.h.
#include "models/pvt_cuda.h"

#include <algorithm>
#include <string>
#include <vector>

#include "core/error.h"
#include "models/cuda_model.h"
#include "ops/cpu/conv.h"
#include "ops/cpu/shift_linear.h"
#include "ops/cuda/common.h"
#include "ops/cuda/hamming_tiled.h"
#include "ops/cuda/ops.h"
#include "ops/cuda/pvt_ops.h"

namespace sav {

using cuda::DeviceBuffer;
using cuda::WeightPool;

namespace {

constexpr size_t kNone = cuda::kNoOffset;

// One linear layer on the device (f32). dense / shift: w (F,K), b (F) (shift: decoded; release mode: the
// bias rounded to Q16.16 and the input rounded before the product). MoE: w the stacked (2F+2, K) weight
// [W_mult; W_shift; W_router], biases b0, b1 (F) and br (2), the slot of its routing choices.
struct LinOff {
  LinearKind kind = LinearKind::dense;
  int K = 0, F = 0, slot = -1;
  size_t w = kNone, b = kNone, b0 = kNone, b1 = kNone, br = kNone;
};
struct Lin {
  LinearKind kind = LinearKind::dense;
  int K = 0, F = 0, slot = -1;
  const float *w = nullptr, *b = nullptr, *b0 = nullptr, *b1 = nullptr, *br = nullptr;
};

struct MoeSlot {
  std::string name;
  int rows_per_image = 0;
};

// Host copies of one layer's weights, decoded, pushed into the pool.
LinOff add_linear(WeightPool& pool, const ParamSet& ps, const std::string& p, LinearKind kind, int K, int F,
                  const ReparamOptions& ro, int rows_per_image, std::vector<MoeSlot>& slots) {
  LinOff o;
  o.kind = kind, o.K = K, o.F = F;
  auto fixed = [&](const Tensor& t) {
    std::vector<float> v(t.f32(), t.f32() + t.numel());
    if (ro.release_compat)
      for (float& x : v) x = release_fixed_point(x);
    return v;
  };
  auto decoded = [&](const std::string& q) {
    std::vector<float> w(size_t(F) * K);
    cpu::shift_linear_weights(w.data(), ps.get(q + ".p").f32(), ps.get(q + ".s").f32(), F, K, ro.pmin, ro.pmax);
    return w;
  };
  if (kind == LinearKind::dense) {
    o.w = pool.add_f32(ps.get(p + ".weight"));
    o.b = pool.add_f32(ps.get(p + ".bias"));
  } else if (kind == LinearKind::shift) {
    o.w = pool.add_f32(decoded(p));
    o.b = pool.add_f32(fixed(ps.get(p + ".bias")));
  } else {
    std::vector<float> st(size_t(2 * F + 2) * K);
    const float* w0 = ps.get(p + ".experts.0.weight").f32();
    const std::vector<float> w1 = decoded(p + ".experts.1");
    const float* wr = ps.get(p + ".router.weight").f32();
    std::copy(w0, w0 + size_t(F) * K, st.begin());
    std::copy(w1.begin(), w1.end(), st.begin() + size_t(F) * K);
    std::copy(wr, wr + size_t(2) * K, st.begin() + size_t(2 * F) * K);
    o.w = pool.add_f32(st);
    o.b0 = pool.add_f32(ps.get(p + ".experts.0.bias"));
    o.b1 = pool.add_f32(fixed(ps.get(p + ".experts.1.bias")));
    o.br = pool.add_f32(ps.get(p + ".router.bias"));
    o.slot = static_cast<int>(slots.size());
    slots.push_back({p, rows_per_image});
  }
  return o;
}

struct BlockOff {
  char attn = 's';
  int stage = 0;
  std::string prefix;
  size_t ln1_w, ln1_b, ln2_w, ln2_b, sr_w = kNone, sr_b = kNone, srn_w = kNone, srn_b = kNone;
  size_t dw_w, dw_b, anchors = kNone, mu = kNone, A = kNone, conv = kNone;
  LinOff q, kv, to_qk, to_v, proj, fc1, fc2;
};
struct BlockW {
  char attn = 's';
  int stage = 0;
  const float *ln1_w, *ln1_b, *ln2_w, *ln2_b, *sr_w, *sr_b, *srn_w, *srn_b, *dw_w, *dw_b;
  const float *anchors, *mu, *A, *conv;
  Lin q, kv, to_qk, to_v, proj, fc1, fc2;
};
struct StageW {
  const float *pe_w, *pe_b, *pe_nw, *pe_nb, *n_w, *n_b;
};

}  // namespace

struct PvtCuda::Impl {
  PvtConfig cfg;
  PvtCudaOptions opt;
  bool compat = false;
  cuda::MoeGate gate = cuda::moe_gate_straight_through;
  WeightPool pool;
  std::vector<StageW> stages;
  std::vector<BlockW> blocks;
  const float *head_w = nullptr, *head_b = nullptr;
  std::vector<MoeSlot> slots;
  size_t moe_s_per_image = 0, xfix_per_image = 0;
  std::vector<cuda::HammingTiledDims> ham_dims;  // of every Hamming block (B unset)
  cuda::Gemm gemm;
  cuda::Stream capture_stream;
  Pvt::ActivationTap tap;

  int capacity = 0, last_B = 0;
  DeviceBuffer<float> img, cols, t, x, xn, q, kv, sro, srn, ao, hid, hid2, sout, pooled, moe_s, xfix;
  DeviceBuffer<unsigned char> ham_ws;
  DeviceBuffer<int8_t> choices;
  std::vector<size_t> choice_off;  // per slot, elements per image before it
  cuda::GraphCache graphs;

  void ensure_capacity(int B) {
    if (B <= capacity) return;
    SAV_CUDA_CHECK(cudaDeviceSynchronize());  // replays in flight may still read the old buffers
    graphs.clear();
    const size_t S = cfg.img_size;
    size_t cols_n = 0, mc = 0, kvn = 0, srn_n = 0, mf = 0;
    int cin = cfg.in_chans;
    for (int s = 0; s < cfg.stages(); ++s) {
      const size_t g = cfg.grid(s), N = g * g, C = cfg.dims[s], k = s == 0 ? cfg.stem_patch : 3;
      const size_t gk = cfg.kv_grid(s), Nk = gk * gk, r = cfg.sr[s];
      cols_n = std::max(cols_n, N * cin * k * k);
      if (r > 1) cols_n = std::max(cols_n, Nk * C * r * r);
      mc = std::max(mc, N * C);
      kvn = std::max(kvn, std::max(Nk, N) * 2 * C);  // softmax kv (Nk, 2C); Hamming [qk | v] (N, 2C)
      srn_n = std::max(srn_n, Nk * C);
      mf = std::max(mf, N * size_t(cfg.mlp_hidden(s)));
      cin = int(C);
    }
    const size_t b = size_t(B);
    img.resize(b * S * S * cfg.in_chans);
    cols.resize(b * cols_n);
    for (DeviceBuffer<float>* d : {&t, &x, &xn, &q, &ao, &sout}) d->resize(b * mc);
    kv.resize(b * kvn);
    sro.resize(b * srn_n);
    srn.resize(b * srn_n);
    hid.resize(b * mf);
    hid2.resize(b * mf);
    pooled.resize(b * size_t(cfg.dims.back()));
    moe_s.resize(std::max<size_t>(b * moe_s_per_image, 1));
    xfix.resize(std::max<size_t>(b * xfix_per_image, 1));
    // the Hamming kernels' plan (chunking) depends on the batch: room for every batch up to this one
    size_t ws = 1;
    for (const cuda::HammingTiledDims& d : ham_dims)
      for (int bb = 1; bb <= B; ++bb) ws = std::max(ws, cuda::hamming_tiled_workspace_bytes({bb, d.N, d.C, d.H, d.nbits, d.m}));
    ham_ws.resize(ws);
    size_t total = 0;
    choice_off.assign(slots.size(), 0);
    for (size_t i = 0; i < slots.size(); ++i) choice_off[i] = total, total += size_t(slots[i].rows_per_image);
    choices.resize(std::max<size_t>(b * total, 1));
    capacity = B;
  }

  int8_t* choice_ptr(int slot) {
    return slot < 0 ? nullptr : choices.get() + choice_off[slot] * size_t(capacity);
  }

  // out (M, ldo) = L(x) or += L(x) (accumulate: the residual add).
  void linear(const Lin& L, const float* xin, int M, float* out, int ldo, bool accumulate, cudaStream_t s) {
    const cuda::F32Math m = opt.math;
    const bool fix = compat && L.kind != LinearKind::dense;
    const float* xs = xin;  // the shift expert's input
    if (fix) {
      cuda::release_fixed_point_f32(xfix.get(), xin, int64_t(M) * L.K, s);
      xs = xfix.get();
    }
    if (L.kind != LinearKind::moe) {
      gemm.linear_f32_in(out, ldo, xs, L.w, L.b, M, L.K, L.F, accumulate, m, s);
      return;
    }
    const int F = L.F, Fs = 2 * F + 2;
    if (!fix) {
      gemm.linear_f32_in(moe_s.get(), Fs, xin, L.w, nullptr, M, L.K, Fs, false, m, s);
    } else {
      const size_t FK = size_t(F) * L.K;
      gemm.linear_f32_in(moe_s.get(), Fs, xin, L.w, nullptr, M, L.K, F, false, m, s);
      gemm.linear_f32_in(moe_s.get() + F, Fs, xs, L.w + FK, nullptr, M, L.K, F, false, m, s);
      gemm.linear_f32_in(moe_s.get() + 2 * F, Fs, xin, L.w + 2 * FK, nullptr, M, L.K, 2, false, m, s);
    }
    cuda::moe_epilogue_f32(out, ldo, choice_ptr(L.slot), moe_s.get(), Fs, L.b0, L.b1, L.br, M, F, gate, compat,
                           accumulate, s);
  }

  // Eager runs with a tap: host copy of a device tensor handed to the tap.
  void report(int block, const char* what, const float* d, int64_t rows, int cols, cudaStream_t s) {
    std::vector<float> h(size_t(rows) * cols);
    SAV_CUDA_CHECK(cudaMemcpyAsync(h.data(), d, h.size() * sizeof(float), cudaMemcpyDeviceToHost, s));
    SAV_CUDA_CHECK(cudaStreamSynchronize(s));
    tap(block, what, h.data(), rows, cols);
  }

  void enqueue(const float* images, float* logits, int B, cudaStream_t s, bool tapping) {
    const int S = cfg.img_size, Cin = cfg.in_chans;
    last_B = B;
    cuda::nchw_to_nhwc_f32(img.get(), images, B, Cin, S * S, s);
    const float* xin = img.get();
    int cin = Cin, gin = S;
    int l = 0;
    for (int st = 0; st < cfg.stages(); ++st) {
      const StageW& sw = stages[st];
      const int g = cfg.grid(st), N = g * g, M = B * N, C = cfg.dims[st], F = cfg.mlp_hidden(st), H = cfg.heads[st];
      const int k = st == 0 ? cfg.stem_patch : 3, stride = st == 0 ? cfg.stem_stride : 2, r = cfg.sr[st];
      const int gk = cfg.kv_grid(st), Nk = gk * gk;
      cuda::im2col_nhwc_f32(cols.get(), xin, B, gin, gin, cin, k, stride, k / 2, s);
      gemm.linear_f32_in(t.get(), C, cols.get(), sw.pe_w, sw.pe_b, M, cin * k * k, C, false, opt.math, s);
      cuda::layernorm_f32(x.get(), C, t.get(), C, sw.pe_nw, sw.pe_nb, M, C, cfg.embed_ln_eps, s);
      if (tapping) report(-1 - st, "embed", x.get(), M, C, s);
      for (int i = 0; i < cfg.depths[st]; ++i, ++l) {
        const BlockW& w = blocks[l];
        cuda::layernorm_f32(xn.get(), C, x.get(), C, w.ln1_w, w.ln1_b, M, C, cfg.ln_eps, s);
        if (w.attn == 's') {
          linear(w.q, xn.get(), M, q.get(), C, false, s);
          const float* kvin = xn.get();
          if (r > 1) {
            cuda::im2col_nhwc_f32(cols.get(), xn.get(), B, g, g, C, r, r, 0, s);
            gemm.linear_f32_in(sro.get(), C, cols.get(), w.sr_w, w.sr_b, B * Nk, C * r * r, C, false, opt.math, s);
            cuda::layernorm_f32(srn.get(), C, sro.get(), C, w.srn_w, w.srn_b, B * Nk, C, cfg.embed_ln_eps, s);
            kvin = srn.get();
          }
          linear(w.kv, kvin, B * Nk, kv.get(), 2 * C, false, s);
          cuda::attention_q_kv_f32(ao.get(), q.get(), kv.get(), B, N, Nk, C, H, s);
        } else {
          linear(w.to_qk, xn.get(), M, kv.get(), 2 * C, false, s);
          linear(w.to_v, xn.get(), M, kv.get() + C, 2 * C, false, s);
          const cuda::HammingTiledDims hd{B, N, C, H, cfg.hash_bits, cfg.anchors};
          cuda::hamming_attention_tiled<float>(ao.get(), C, kv.get(), 2 * C, kv.get() + C, 2 * C, w.anchors, w.mu, w.A,
                                               w.conv, hd, ham_ws.get(), s);
        }
        std::vector<float> before;
        if (tapping) {
          before.resize(size_t(M) * C);
          SAV_CUDA_CHECK(cudaMemcpyAsync(before.data(), x.get(), before.size() * 4, cudaMemcpyDeviceToHost, s));
        }
        linear(w.proj, ao.get(), M, x.get(), C, true, s);
        if (tapping) {
          std::vector<float> after(before.size());
          SAV_CUDA_CHECK(cudaMemcpyAsync(after.data(), x.get(), after.size() * 4, cudaMemcpyDeviceToHost, s));
          SAV_CUDA_CHECK(cudaStreamSynchronize(s));
          for (size_t j = 0; j < after.size(); ++j) after[j] -= before[j];  // the attention branch
          tap(l, "attn", after.data(), M, C);
        }
        cuda::layernorm_f32(xn.get(), C, x.get(), C, w.ln2_w, w.ln2_b, M, C, cfg.ln_eps, s);
        linear(w.fc1, xn.get(), M, hid.get(), F, false, s);
        cuda::dwconv2d_f32(hid2.get(), hid.get(), w.dw_w, w.dw_b, B, g, g, F, 3, true, s);
        linear(w.fc2, hid2.get(), M, x.get(), C, true, s);
        if (tapping) report(l, "xout", x.get(), M, C, s);
      }
      cuda::layernorm_f32(sout.get(), C, x.get(), C, sw.n_w, sw.n_b, M, C, cfg.ln_eps, s);
      if (tapping) report(-1 - st, "out", sout.get(), M, C, s);
      xin = sout.get();
      cin = C, gin = g;
    }
    cuda::mean_tokens_f32(pooled.get(), sout.get(), B, gin * gin, cin, s);
    gemm.linear_f32_in(logits, cfg.num_classes, pooled.get(), head_w, head_b, B, cin, cfg.num_classes, false, opt.math,
                       s);
  }
};

PvtCuda::PvtCuda(const Pvt& model, PvtCudaOptions opt) : impl_(nullptr) {
  const PvtConfig& c = model.config();
  c.validate();
  for (int s = 0; s < c.stages(); ++s) {
    const int C = c.dims[s], H = c.heads[s];
    if (c.attn_kind(s) == 's') {
      SAV_CHECK(cuda::attention_q_kv_supports(C, H),
                "PvtCuda: stage " << s << " head size " << C / H << " is beyond the CUDA attention kernel");
    } else {
      const cuda::HammingTiledDims hd{1, c.tokens(s), C, H, c.hash_bits, c.anchors};
      SAV_CHECK(cuda::hamming_tiled_supports(hd), "PvtCuda: stage " << s << " Hamming attention (head size " << C / H
                                                                    << ", " << c.hash_bits << " bits, " << c.anchors
                                                                    << " anchors) is beyond the CUDA kernel");
    }
  }
  // Read-only access to the options and the KSH buffers (Pvt offers them through non-const accessors only).
  Pvt& mp = const_cast<Pvt&>(model);
  const ReparamOptions& ro = mp.reparam();
  SAV_CHECK(cuda::device_available(), "PvtCuda: no CUDA device is available");
  impl_ = std::make_unique<Impl>();
  Impl& m = *impl_;
  m.cfg = c;
  m.opt = opt;
  m.compat = ro.release_compat && !c.is_dense();
  m.gate = ro.release_compat || ro.gate != cpu::moe_gate_prob ? cuda::moe_gate_straight_through : cuda::moe_gate_prob;
  const ParamSet& ps = model.params();
  const ParamSet* bufs = mp.buffers();
  auto T = [&](const std::string& n) -> const Tensor& { return ps.get(n); };
  WeightPool& pool = m.pool;

  struct StageOff {
    size_t pe_w, pe_b, pe_nw, pe_nb, n_w, n_b;
  };
  std::vector<StageOff> so;
  std::vector<BlockOff> bo;
  for (int s = 0; s < c.stages(); ++s) {
    const std::string e = s == 0 ? "patch_embed." : "stages." + std::to_string(s) + ".downsample.";
    const std::string sn = "stages." + std::to_string(s) + ".norm.";
    so.push_back({pool.add_f32(T(e + "proj.weight")), pool.add_f32(T(e + "proj.bias")),
                  pool.add_f32(T(e + "norm.weight")), pool.add_f32(T(e + "norm.bias")), pool.add_f32(T(sn + "weight")),
                  pool.add_f32(T(sn + "bias"))});
  }
  for (int l = 0; l < model.num_blocks(); ++l) {
    const int s = model.block_stage(l), C = c.dims[s], F = c.mlp_hidden(s), N = c.tokens(s);
    const int gk = c.kv_grid(s), Nk = gk * gk;
    const std::string& p = model.block_prefix(l);
    const LinearKind ak = linear_kind_from_char(c.attn_linear_kind(s)), mk = linear_kind_from_char(c.mlp_kind(s));
    BlockOff o;
    o.attn = c.attn_kind(s), o.stage = s, o.prefix = p;
    o.ln1_w = pool.add_f32(T(p + "norm1.weight"));
    o.ln1_b = pool.add_f32(T(p + "norm1.bias"));
    auto lin = [&](const std::string& n, LinearKind k, int K, int Fo, int rows) {
      const LinOff r = add_linear(pool, ps, p + n, k, K, Fo, ro, rows, m.slots);
      if (k == LinearKind::moe) m.moe_s_per_image = std::max(m.moe_s_per_image, size_t(rows) * (2 * Fo + 2));
      if (m.compat && k != LinearKind::dense) m.xfix_per_image = std::max(m.xfix_per_image, size_t(rows) * K);
      return r;
    };
    if (o.attn == 's') {
      o.q = lin("attn.q", ak, C, C, N);
      if (c.sr[s] > 1) {
        o.sr_w = pool.add_f32(T(p + "attn.sr.weight"));
        o.sr_b = pool.add_f32(T(p + "attn.sr.bias"));
        o.srn_w = pool.add_f32(T(p + "attn.norm.weight"));
        o.srn_b = pool.add_f32(T(p + "attn.norm.bias"));
      }
      o.kv = lin("attn.kv", ak, C, 2 * C, Nk);
    } else {
      o.to_qk = lin("attn.to_qk", ak, C, C, N);
      o.to_v = lin("attn.to_v", ak, C, C, N);
      SAV_CHECK(bufs, "PvtCuda: the model has no KSH buffers");
      o.anchors = pool.add_f32(bufs->get(p + "attn.ksh.anchors"));
      o.mu = pool.add_f32(bufs->get(p + "attn.ksh.mu"));
      o.A = pool.add_f32(bufs->get(p + "attn.ksh.A"));
      o.conv = pool.add_f32(T(p + "attn.dwconv.weight"));
      m.ham_dims.push_back({0, N, C, c.heads[s], c.hash_bits, c.anchors});
    }
    o.proj = lin("attn.proj", ak, C, C, N);
    o.ln2_w = pool.add_f32(T(p + "norm2.weight"));
    o.ln2_b = pool.add_f32(T(p + "norm2.bias"));
    o.fc1 = lin("mlp.fc1", mk, C, F, N);
    o.dw_w = pool.add_f32(T(p + "mlp.dwconv.weight"));
    o.dw_b = pool.add_f32(T(p + "mlp.dwconv.bias"));
    o.fc2 = lin("mlp.fc2", mk, F, C, N);
    bo.push_back(o);
  }
  const size_t o_head_w = pool.add_f32(T("head.weight")), o_head_b = pool.add_f32(T("head.bias"));
  pool.upload();

  for (const StageOff& o : so)
    m.stages.push_back(
        {pool.f32(o.pe_w), pool.f32(o.pe_b), pool.f32(o.pe_nw), pool.f32(o.pe_nb), pool.f32(o.n_w), pool.f32(o.n_b)});
  auto L = [&](const LinOff& o) {
    Lin r;
    r.kind = o.kind, r.K = o.K, r.F = o.F, r.slot = o.slot;
    r.w = pool.f32(o.w), r.b = pool.f32(o.b), r.b0 = pool.f32(o.b0), r.b1 = pool.f32(o.b1), r.br = pool.f32(o.br);
    return r;
  };
  for (const BlockOff& o : bo) {
    BlockW w;
    w.attn = o.attn, w.stage = o.stage;
    w.ln1_w = pool.f32(o.ln1_w), w.ln1_b = pool.f32(o.ln1_b), w.ln2_w = pool.f32(o.ln2_w), w.ln2_b = pool.f32(o.ln2_b);
    w.sr_w = pool.f32(o.sr_w), w.sr_b = pool.f32(o.sr_b), w.srn_w = pool.f32(o.srn_w), w.srn_b = pool.f32(o.srn_b);
    w.dw_w = pool.f32(o.dw_w), w.dw_b = pool.f32(o.dw_b);
    w.anchors = pool.f32(o.anchors), w.mu = pool.f32(o.mu), w.A = pool.f32(o.A), w.conv = pool.f32(o.conv);
    w.q = L(o.q), w.kv = L(o.kv), w.to_qk = L(o.to_qk), w.to_v = L(o.to_v);
    w.proj = L(o.proj), w.fc1 = L(o.fc1), w.fc2 = L(o.fc2);
    m.blocks.push_back(w);
  }
  m.head_w = pool.f32(o_head_w), m.head_b = pool.f32(o_head_b);
}

PvtCuda::~PvtCuda() = default;

const PvtConfig& PvtCuda::config() const { return impl_->cfg; }
size_t PvtCuda::weight_bytes() const { return impl_->pool.bytes(); }
int PvtCuda::graph_count() const { return impl_->graphs.size(); }
void PvtCuda::set_activation_tap(Pvt::ActivationTap tap) { impl_->tap = std::move(tap); }

std::vector<std::pair<std::string, std::vector<int8_t>>> PvtCuda::moe_choices() const {
  const Impl& m = *impl_;
  std::vector<std::pair<std::string, std::vector<int8_t>>> out;
  SAV_CUDA_CHECK(cudaDeviceSynchronize());
  for (size_t i = 0; i < m.slots.size(); ++i) {
    std::vector<int8_t> ch(size_t(m.last_B) * m.slots[i].rows_per_image);
    if (!ch.empty())
      SAV_CUDA_CHECK(cudaMemcpy(ch.data(), m.choices.get() + m.choice_off[i] * size_t(m.capacity), ch.size(),
                                cudaMemcpyDeviceToHost));
    out.emplace_back(m.slots[i].name, std::move(ch));
  }
  return out;
}

void PvtCuda::forward_eager(const float* images, float* logits, int B, cudaStream_t stream) {
  SAV_CHECK(B >= 1, "PvtCuda: batch size must be positive, got " << B);
  SAV_CHECK(images && logits, "PvtCuda: null images or logits pointer");
  impl_->ensure_capacity(B);
  impl_->enqueue(images, logits, B, stream, false);
}

void PvtCuda::forward(const float* images, float* logits, int B, cudaStream_t stream) {
  SAV_CHECK(B >= 1, "PvtCuda: batch size must be positive, got " << B);
  SAV_CHECK(images && logits, "PvtCuda: null images or logits pointer");
  Impl& m = *impl_;
  m.ensure_capacity(B);
  m.graphs.launch(B, images, logits, stream, m.capture_stream.get(),
                  [&](cudaStream_t s) { m.enqueue(images, logits, B, s, false); });
  m.last_B = B;
}

void PvtCuda::forward_host(const float* images, float* logits, int B) {
  SAV_CHECK(B >= 1, "PvtCuda: batch size must be positive, got " << B);
  Impl& m = *impl_;
  const PvtConfig& c = m.cfg;
  const size_t ni = size_t(B) * c.in_chans * c.img_size * c.img_size, nl = size_t(B) * c.num_classes;
  DeviceBuffer<float> d_img(ni), d_logits(nl);
  cuda::Stream s;
  SAV_CUDA_CHECK(cudaMemcpyAsync(d_img.get(), images, ni * sizeof(float), cudaMemcpyHostToDevice, s.get()));
  if (m.tap) {
    m.ensure_capacity(B);
    m.enqueue(d_img.get(), d_logits.get(), B, s.get(), true);
  } else {
    forward(d_img.get(), d_logits.get(), B, s.get());
  }
  SAV_CUDA_CHECK(cudaMemcpyAsync(logits, d_logits.get(), nl * sizeof(float), cudaMemcpyDeviceToHost, s.get()));
  s.sync();
}

double pvt_cuda_median_ms(PvtCuda& net, int batch, int iters) {
  const PvtConfig& c = net.config();
  DeviceBuffer<float> logits(size_t(batch) * c.num_classes);
  return cuda::median_forward_ms(batch, size_t(c.in_chans) * c.img_size * c.img_size, iters,
                                 [&](const float* x, cudaStream_t s) { net.forward(x, logits.get(), batch, s); });
}

}  // namespace sav
