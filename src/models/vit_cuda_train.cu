// VitCudaTrain: Vit::forward / Vit::backward (models/vit.cpp) op for op on the GPU. The layout of every
// buffer, the order of the ops and the accumulation of gradients follow the CPU model, so the two can be
// compared tensor by tensor (tests/cuda/test_vit_cuda_train.cpp).
#include "models/vit_cuda_train.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "nn/linear_layer.h"
#include "ops/cpu/hamming.h"
#include "ops/cuda/blas.h"
#include "ops/cuda/common.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/hamming_train.h"
#include "ops/cuda/moe_train.h"
#include "ops/cuda/train_ops.h"
#include "train/optim.h"

namespace sav {

namespace {

using cuda::DeviceBuffer;

// Grows a buffer to at least n elements (never shrinks, so alternating batch sizes do not reallocate).
template <class T>
T* grow(DeviceBuffer<T>& b, size_t n) {
  if (b.size() < n) b.resize(n);
  return b.get();
}

// One linear layer on the device: pointers into the flat parameter / gradient arrays, plus what its forward
// keeps for the backward.
struct DLinear {
  std::string prefix;
  LinearKind kind = LinearKind::dense;
  int K = 0, F = 0;
  float *w = nullptr, *b = nullptr, *dw = nullptr, *db = nullptr;                                      // dense / expert 0
  float *p = nullptr, *s = nullptr, *sb = nullptr, *dp = nullptr, *ds = nullptr, *dsb = nullptr;       // shift / expert 1
  float *rw = nullptr, *rb = nullptr, *drw = nullptr, *drb = nullptr;                                  // router
  DeviceBuffer<float> wdec, dwtmp;  // decoded shift weight and its gradient (F,K)
  // saved by forward
  const float* x = nullptr;
  int M = 0;
  bool train = false;
  DeviceBuffer<float> y0, y1, rl, logits, noisy, probs, scale, stats, dscale, dlogits, dy0, dy1, noise;
  DeviceBuffer<int> choice;
  std::vector<float> noise_host;
  int aux_slot = -1;  // index into the per-forward auxiliary-loss array (MoE layers)
};

struct DBlock {
  char attn = 's';
  std::unique_ptr<DLinear> qkv, to_qk, to_v, proj, fc1, fc2;
  float *n1w, *n1b, *n2w, *n2b, *dn1w, *dn1b, *dn2w, *dn2b;
  float *dwconv = nullptr, *ddwconv = nullptr, *anchors = nullptr, *mu = nullptr, *A = nullptr;
  // activations of the last forward (grown to the largest batch seen)
  DeviceBuffer<float> ln1, mean1, rstd1, qkv_out, att, qk, v, hsaved, ao, xmid, ln2, mean2, rstd2, fc1_out, gelu,
      xout;
  DeviceBuffer<uint64_t> codes;
};

std::string blk(int l) { return "blocks." + std::to_string(l) + "."; }

}  // namespace

struct VitCudaTrain::Impl {
  Vit& host;
  VitConfig cfg;
  cuda::F32Math math;
  cuda::Stream stream;
  cuda::Gemm gemm;
  cuda::Blas blas;
  // flat device copies of the host ParamSets (same layout: offsets are the host views' offsets)
  DeviceBuffer<float> params, grads, m, v, buffers;
  DeviceBuffer<uint8_t> decay_mask;
  std::vector<DBlock> blocks;
  int n_moe = 0;
  Rng noise_rng{0};
  // per-forward state
  int B = 0;
  bool train = false, have_train_forward = false;
  DeviceBuffer<float> img, cols, pe, x0, tmp, cls_ln, cls_mean, cls_rstd, logits_d, aux_d;
  DeviceBuffer<float> dlogits_d, dcls_ln, dx, dao, dln, dbig, dbig2, ds, dpe, ws;
  DeviceBuffer<double> ws64, norm_out;
  std::vector<float> logits_h, aux_h;
  float aux_total = 0.0f;
  const float* xlast = nullptr;

  Impl(Vit& model, cuda::F32Math mth)
      : host(model), cfg(model.config()), math(mth), gemm(size_t(32) << 20, /*autotune*/ false), blas(stream.get(), mth) {}

  cudaStream_t st() const { return stream.get(); }
  int64_t offset(const ParamSet& ps, const std::string& name) const { return ps.get(name).f32() - ps.flat(); }
  float* par(const std::string& n) { return params.get() + offset(host.params(), n); }
  float* grd(const std::string& n) { return grads.get() + offset(host.params(), n); }
  float* buf(const std::string& n) { return buffers.get() + offset(*host.buffers(), n); }
  const ReparamOptions& ro() { return host.reparam(); }

  std::unique_ptr<DLinear> make_linear(const std::string& prefix) {
    const LinearLayer* hl = host.find_linear(prefix);
    SAV_CHECK(hl, "VitCudaTrain: no linear layer " << prefix);
    auto L = std::make_unique<DLinear>();
    L->prefix = prefix, L->kind = hl->kind(), L->K = hl->in_features(), L->F = hl->out_features();
    const size_t n = size_t(L->F) * L->K;
    switch (L->kind) {
      case LinearKind::dense:
        L->w = par(prefix + ".weight"), L->b = par(prefix + ".bias"), L->dw = grd(prefix + ".weight"),
        L->db = grd(prefix + ".bias");
        break;
      case LinearKind::shift:
        L->p = par(prefix + ".p"), L->s = par(prefix + ".s"), L->sb = par(prefix + ".bias");
        L->dp = grd(prefix + ".p"), L->ds = grd(prefix + ".s"), L->dsb = grd(prefix + ".bias");
        L->wdec.resize(n), L->dwtmp.resize(n);
        break;
      case LinearKind::moe: {
        const std::string e0 = prefix + ".experts.0", e1 = prefix + ".experts.1", r = prefix + ".router";
        L->w = par(e0 + ".weight"), L->b = par(e0 + ".bias"), L->dw = grd(e0 + ".weight"), L->db = grd(e0 + ".bias");
        L->p = par(e1 + ".p"), L->s = par(e1 + ".s"), L->sb = par(e1 + ".bias");
        L->dp = grd(e1 + ".p"), L->ds = grd(e1 + ".s"), L->dsb = grd(e1 + ".bias");
        L->rw = par(r + ".weight"), L->rb = par(r + ".bias"), L->drw = grd(r + ".weight"), L->drb = grd(r + ".bias");
        L->wdec.resize(n), L->dwtmp.resize(n);
        L->stats.resize(4);
        L->aux_slot = n_moe++;
        break;
      }
    }
    return L;
  }

  // ---- linear layers ----
  void lin_forward(DLinear& L, float* y, const float* x, int M, bool train_mode) {
    L.x = x, L.M = M, L.train = train_mode;
    const int K = L.K, F = L.F;
    const auto& o = ro();
    if (L.kind == LinearKind::dense) {
      gemm.linear_f32_in(y, F, x, L.w, L.b, M, K, F, false, math, st());
      return;
    }
    cuda::shift_decode_f32(L.wdec.get(), L.p, L.s, int64_t(F) * K, o.pmin, o.pmax, st());
    if (L.kind == LinearKind::shift) {
      gemm.linear_f32_in(y, F, x, L.wdec.get(), L.sb, M, K, F, false, math, st());
      return;
    }
    // MoE: both experts on every row, the router a third product, then route / combine on the device.
    const size_t mf = size_t(M) * F;
    float* y0 = grow(L.y0, mf);
    float* y1 = grow(L.y1, mf);
    gemm.linear_f32_in(y0, F, x, L.w, L.b, M, K, F, false, math, st());
    gemm.linear_f32_in(y1, F, x, L.wdec.get(), L.sb, M, K, F, false, math, st());
    blas.xwt(grow(L.rl, size_t(M) * 2), x, L.rw, M, K, 2, 0.0f);
    const float noise_std = train_mode ? o.noise_std : 0.0f;
    const float* noise = nullptr;
    if (noise_std > 0.0f) {  // the CPU's draw: noise_std * N(0,1), row-major (t, e), one generator in layer order
      L.noise_host.resize(size_t(M) * 2);
      for (float& z : L.noise_host) z = noise_std * noise_rng.normal();
      SAV_CUDA_CHECK(cudaMemcpyAsync(grow(L.noise, size_t(M) * 2), L.noise_host.data(), sizeof(float) * M * 2,
                                     cudaMemcpyHostToDevice, st()));
      noise = L.noise.get();
    }
    cuda::moe_train_route(grow(L.logits, size_t(M) * 2), grow(L.noisy, size_t(M) * 2), grow(L.probs, size_t(M) * 2),
                          grow(L.choice, size_t(M)), grow(L.scale, size_t(M)), L.rl.get(), L.rb, noise, M, o.gate, st());
    cuda::moe_train_combine(y, F, y0, y1, L.choice.get(), L.scale.get(), M, F, false, st());
    float* aux = aux_d.get() + L.aux_slot;
    if (train_mode && o.lb_coef > 0.0f) {
      cuda::moe_lb_forward(L.stats.get(), aux, L.probs.get(), L.logits.get(), L.noisy.get(), L.choice.get(),
                           o.alpha[0], o.alpha[1], M, noise_std, o.lb_coef, ws64.get(),
                           st());
    } else {
      SAV_CUDA_CHECK(cudaMemsetAsync(aux, 0, sizeof(float), st()));
    }
  }

  // dx (M,K) = (dx_beta 0) or += (dx_beta 1) the input gradient (nullptr: skip); parameter gradients +=.
  void lin_backward(DLinear& L, float* dx, float dx_beta, const float* dy) {
    SAV_CHECK(L.train, "VitCudaTrain: backward of " << L.prefix << " after a forward without train=true");
    const int M = L.M, K = L.K, F = L.F;
    const auto& o = ro();
    float* ws_f = ws.get();
    auto dense_part = [&](const float* g, float beta) {  // expert 0 / dense
      blas.dytx(L.dw, g, L.x, M, K, F, 1.0f);
      cuda::colsum_f32(L.db, g, F, M, F, ws_f, st());
      if (dx) blas.dyw(dx, g, L.w, M, K, F, beta);
    };
    auto shift_part = [&](const float* g, float beta) {  // expert 1 / shift (straight-through to p and s)
      blas.dytx(L.dwtmp.get(), g, L.x, M, K, F, 0.0f);
      cuda::shift_weight_backward_f32(L.dp, L.ds, L.dwtmp.get(), L.p, L.s, int64_t(F) * K, o.pmin, o.pmax, st());
      cuda::colsum_f32(L.dsb, g, F, M, F, ws_f, st());
      if (dx) blas.dyw(dx, g, L.wdec.get(), M, K, F, beta);
    };
    if (L.kind == LinearKind::dense) return dense_part(dy, dx_beta);
    if (L.kind == LinearKind::shift) return shift_part(dy, dx_beta);
    const size_t mf = size_t(M) * F;
    float* dy0 = grow(L.dy0, mf);
    float* dy1 = grow(L.dy1, mf);
    cuda::moe_train_split_backward(dy0, dy1, grow(L.dscale, M), dy, F, L.y0.get(), L.y1.get(), L.choice.get(),
                                   L.scale.get(), M, F, st());
    const float coef = o.lb_coef > 0.0f ? o.lb_coef : 0.0f;
    cuda::moe_train_router_backward(grow(L.dlogits, size_t(M) * 2), L.dscale.get(), L.probs.get(), L.logits.get(),
                                    L.noisy.get(), L.choice.get(), L.stats.get(), o.alpha[0], o.alpha[1], M,
                                    o.noise_std, coef, o.gate, st());
    dense_part(dy0, dx_beta);
    shift_part(dy1, 1.0f);
    blas.dytx(L.drw, L.dlogits.get(), L.x, M, K, 2, 1.0f);
    cuda::colsum_f32(L.drb, L.dlogits.get(), 2, M, 2, ws_f, st());
    if (dx) blas.dyw(dx, L.dlogits.get(), L.rw, M, K, 2, 1.0f);
  }

  cpu::HammingDims hdims(int Bn) const {
    return {Bn, cfg.tokens(), cfg.dim, cfg.heads, cfg.hash_bits, cfg.anchors};
  }

  void ensure(int Bn) {
    const int N = cfg.tokens(), C = cfg.dim, F = cfg.mlp_hidden, H = cfg.heads, P = cfg.num_patches();
    const size_t M = size_t(Bn) * N, K = size_t(cfg.in_chans) * cfg.patch * cfg.patch;
    grow(img, size_t(Bn) * cfg.in_chans * cfg.img_size * cfg.img_size);
    grow(cols, size_t(Bn) * P * K);
    grow(pe, size_t(Bn) * P * C);
    grow(dpe, size_t(Bn) * P * C);
    grow(x0, M * C);
    grow(tmp, M * C);
    grow(cls_ln, size_t(Bn) * C), grow(cls_mean, Bn), grow(cls_rstd, Bn), grow(dcls_ln, size_t(Bn) * C);
    grow(logits_d, size_t(Bn) * cfg.num_classes), grow(dlogits_d, size_t(Bn) * cfg.num_classes);
    grow(aux_d, std::max(n_moe, 1));
    grow(dx, M * C), grow(dao, M * C), grow(dln, M * C);
    grow(dbig, M * std::max(3 * C, F)), grow(dbig2, M * F);
    bool any_softmax = false;
    size_t ws_need = std::max({cuda::layernorm_backward_workspace_floats(int(M), C),
                               cuda::colsum_workspace_floats(int(M), std::max({3 * C, F, C, cfg.num_classes}))});
    for (auto& b : blocks) {
      grow(b.ln1, M * C), grow(b.mean1, M), grow(b.rstd1, M), grow(b.ao, M * C), grow(b.xmid, M * C);
      grow(b.ln2, M * C), grow(b.mean2, M), grow(b.rstd2, M), grow(b.fc1_out, M * F), grow(b.gelu, M * F);
      grow(b.xout, M * C);
      if (b.attn == 's') {
        any_softmax = true;
        grow(b.qkv_out, M * 3 * C), grow(b.att, size_t(Bn) * H * N * N);
      } else {
        const cpu::HammingDims d = hdims(Bn);
        grow(b.qk, M * C), grow(b.v, M * C);
        grow(b.hsaved, cpu::hamming_saved_floats(d)), grow(b.codes, cpu::hamming_saved_codes(d));
        ws_need = std::max(ws_need, cuda::hamming_train_workspace_floats(d));
      }
    }
    if (any_softmax) grow(ds, size_t(Bn) * H * N * N);
    grow(ws, ws_need);
    // sized here, not at first use: a reallocation would free memory that queued kernels may still read
    grow(ws64, std::max(cuda::moe_lb_workspace_doubles(int(M)), cuda::sumsq_workspace_doubles(int64_t(grads.size()))));
  }

  cpu::HammingWeights hweights(const DBlock& b) const { return {b.anchors, b.mu, b.A, b.dwconv, nullptr}; }

  void forward(const float* images, int Bn, bool train_mode) {
    SAV_CHECK(Bn > 0, "batch size must be positive, got " << Bn);
    ensure(Bn);
    B = Bn, train = train_mode;
    const int N = cfg.tokens(), C = cfg.dim, F = cfg.mlp_hidden, H = cfg.heads, P = cfg.num_patches();
    const int M = Bn * N, K = cfg.in_chans * cfg.patch * cfg.patch, V = cfg.num_classes;
    const size_t nimg = size_t(Bn) * cfg.in_chans * cfg.img_size * cfg.img_size;
    SAV_CUDA_CHECK(cudaMemcpyAsync(img.get(), images, sizeof(float) * nimg, cudaMemcpyHostToDevice, st()));
    cuda::im2col_f32(cols.get(), img.get(), Bn, cfg.in_chans, cfg.img_size, cfg.patch, st());
    gemm.linear_f32_in(pe.get(), C, cols.get(), par("patch_embed.proj.weight"), par("patch_embed.proj.bias"), Bn * P, K,
                       C, false, math, st());
    cuda::embed_tokens_forward(x0.get(), pe.get(), par("cls_token"), par("pos_embed"), Bn, N, C, st());
    const float* x = x0.get();
    float* t = tmp.get();
    for (auto& b : blocks) {
      cuda::layernorm_train_forward(b.ln1.get(), C, b.mean1.get(), b.rstd1.get(), x, C, b.n1w, b.n1b, M, C,
                                    cfg.ln_eps, st());
      if (b.attn == 's') {
        lin_forward(*b.qkv, b.qkv_out.get(), b.ln1.get(), M, train_mode);
        cuda::attention_train_forward(b.ao.get(), b.att.get(), b.qkv_out.get(), Bn, N, C, H, st());
      } else {
        lin_forward(*b.to_qk, b.qk.get(), b.ln1.get(), M, train_mode);
        lin_forward(*b.to_v, b.v.get(), b.ln1.get(), M, train_mode);
        const cpu::HammingDims d = hdims(Bn);
        const cpu::HammingSaved saved = cpu::hamming_saved_bind(d, b.hsaved.get(), b.codes.get());
        cuda::hamming_train_forward(b.ao.get(), C, saved, b.qk.get(), C, b.v.get(), C, hweights(b), d, st());
      }
      lin_forward(*b.proj, t, b.ao.get(), M, train_mode);
      cuda::add_f32(b.xmid.get(), x, t, int64_t(M) * C, st());
      cuda::layernorm_train_forward(b.ln2.get(), C, b.mean2.get(), b.rstd2.get(), b.xmid.get(), C, b.n2w, b.n2b, M, C,
                                    cfg.ln_eps, st());
      lin_forward(*b.fc1, b.fc1_out.get(), b.ln2.get(), M, train_mode);
      cuda::gelu_forward_f32(b.gelu.get(), b.fc1_out.get(), int64_t(M) * F, st());
      lin_forward(*b.fc2, t, b.gelu.get(), M, train_mode);
      cuda::add_f32(b.xout.get(), b.xmid.get(), t, int64_t(M) * C, st());
      x = b.xout.get();
    }
    xlast = x;
    // final norm and head on the class-token rows (row b at x + b*N*C)
    cuda::layernorm_train_forward(cls_ln.get(), C, cls_mean.get(), cls_rstd.get(), x, N * C, par("norm.weight"),
                                  par("norm.bias"), Bn, C, cfg.ln_eps, st());
    gemm.linear_f32_in(logits_d.get(), V, cls_ln.get(), par("head.weight"), par("head.bias"), Bn, C, V, false, math, st());
    logits_h.resize(size_t(Bn) * V);
    SAV_CUDA_CHECK(cudaMemcpyAsync(logits_h.data(), logits_d.get(), sizeof(float) * logits_h.size(),
                                   cudaMemcpyDeviceToHost, st()));
    aux_h.assign(n_moe, 0.0f);
    if (n_moe)
      SAV_CUDA_CHECK(
          cudaMemcpyAsync(aux_h.data(), aux_d.get(), sizeof(float) * n_moe, cudaMemcpyDeviceToHost, st()));
    stream.sync();
    aux_total = 0.0f;
    for (float a : aux_h) aux_total += a;  // layer order, as the CPU's linears_aux_loss
    have_train_forward = train_mode;
  }

  void backward(const float* dlogits) {
    SAV_CHECK(have_train_forward, "backward() needs a forward(..., train=true) first");
    const int Bn = B, N = cfg.tokens(), C = cfg.dim, F = cfg.mlp_hidden, H = cfg.heads, P = cfg.num_patches();
    const int M = Bn * N, K = cfg.in_chans * cfg.patch * cfg.patch, V = cfg.num_classes;
    float* ws_f = ws.get();
    SAV_CUDA_CHECK(cudaMemcpyAsync(dlogits_d.get(), dlogits, sizeof(float) * Bn * V, cudaMemcpyHostToDevice, st()));
    // head and final norm (class-token rows)
    blas.dyw(dcls_ln.get(), dlogits_d.get(), par("head.weight"), Bn, C, V, 0.0f);
    blas.dytx(grd("head.weight"), dlogits_d.get(), cls_ln.get(), Bn, C, V, 1.0f);
    cuda::colsum_f32(grd("head.bias"), dlogits_d.get(), V, Bn, V, ws_f, st());
    SAV_CUDA_CHECK(cudaMemsetAsync(dx.get(), 0, sizeof(float) * size_t(M) * C, st()));
    cuda::layernorm_train_backward(dx.get(), N * C, grd("norm.weight"), grd("norm.bias"), dcls_ln.get(), C, xlast, N * C,
                                   par("norm.weight"), cls_mean.get(), cls_rstd.get(), Bn, C, ws_f, st());
    for (int l = cfg.depth - 1; l >= 0; --l) {
      DBlock& b = blocks[l];
      const float* xin = l > 0 ? blocks[l - 1].xout.get() : x0.get();
      // MLP branch: xout = xmid + fc2(gelu(fc1(ln2(xmid))))
      lin_backward(*b.fc2, dbig.get(), 0.0f, dx.get());
      cuda::gelu_backward_f32(dbig2.get(), dbig.get(), b.fc1_out.get(), int64_t(M) * F, st());
      lin_backward(*b.fc1, dln.get(), 0.0f, dbig2.get());
      cuda::layernorm_train_backward(dx.get(), C, b.dn2w, b.dn2b, dln.get(), C, b.xmid.get(), C, b.n2w, b.mean2.get(),
                                     b.rstd2.get(), M, C, ws_f, st());  // dx = d xmid
      // attention branch: xmid = xin + proj(attn(ln1(xin)))
      lin_backward(*b.proj, dao.get(), 0.0f, dx.get());
      if (b.attn == 's') {
        cuda::attention_train_backward(dbig.get(), ds.get(), dao.get(), b.qkv_out.get(), b.att.get(), Bn, N, C, H,
                                       st());
        lin_backward(*b.qkv, dln.get(), 0.0f, dbig.get());
      } else {
        const cpu::HammingDims d = hdims(Bn);
        const cpu::HammingSaved saved = cpu::hamming_saved_bind(d, b.hsaved.get(), b.codes.get());
        float* dqk = dbig.get();
        float* dv = dbig.get() + size_t(M) * C;
        cuda::hamming_train_backward(dqk, C, dv, C, b.ddwconv, nullptr, dao.get(), C, b.v.get(), C, saved, hweights(b),
                                     d, ws_f, st());
        lin_backward(*b.to_qk, dln.get(), 0.0f, dqk);
        lin_backward(*b.to_v, dln.get(), 1.0f, dv);
      }
      cuda::layernorm_train_backward(dx.get(), C, b.dn1w, b.dn1b, dln.get(), C, xin, C, b.n1w, b.mean1.get(),
                                     b.rstd1.get(), M, C, ws_f, st());  // dx = d xin
    }
    cuda::embed_tokens_backward(dpe.get(), grd("cls_token"), grd("pos_embed"), dx.get(), Bn, N, C, st());
    blas.dytx(grd("patch_embed.proj.weight"), dpe.get(), cols.get(), Bn * P, K, C, 1.0f);
    cuda::colsum_f32(grd("patch_embed.proj.bias"), dpe.get(), C, Bn * P, C, ws_f, st());
    stream.sync();
  }

  void upload(const ParamSet* mm, const ParamSet* vv) {
    const ParamSet& ps = host.params();
    params.upload(ps.flat(), ps.numel());
    if (const ParamSet* bs = host.buffers(); bs && bs->numel()) buffers.upload(bs->flat(), bs->numel());
    if (mm) m.upload(mm->flat(), mm->numel());
    if (vv) v.upload(vv->flat(), vv->numel());
  }
};

VitCudaTrain::VitCudaTrain(Vit& model, cuda::F32Math math) : impl_(std::make_unique<Impl>(model, math)) {
  Impl& I = *impl_;
  const VitConfig& c = I.cfg;
  SAV_CHECK(!model.reparam().release_compat,
            "VitCudaTrain: the release compatibility mode is inference-only and cannot train");
  for (int l = 0; l < c.depth; ++l) {
    if (c.attn_kind(l) == 's')
      SAV_CHECK(cuda::attention_train_supports(c.tokens(), c.dim, c.heads),
                "VitCudaTrain: softmax attention with " << c.tokens() << " tokens, width " << c.dim << ", "
                                                        << c.heads << " heads is beyond the training kernels");
    else
      SAV_CHECK(cuda::hamming_train_supports(I.hdims(1)),
                "VitCudaTrain: Hamming attention of width " << c.dim << ", " << c.heads << " heads, " << c.hash_bits
                                                            << " bits, " << c.anchors
                                                            << " anchors is beyond the training kernels");
  }
  const ParamSet& ps = model.params();
  I.params.resize(ps.numel()), I.grads.resize(ps.numel()), I.m.resize(ps.numel()), I.v.resize(ps.numel());
  if (const ParamSet* bs = model.buffers(); bs && bs->numel()) I.buffers.resize(bs->numel());
  std::vector<uint8_t> mask(ps.numel(), 0);
  for (size_t i = 0; i < ps.size(); ++i)
    if (ps.decay(i)) {
      const int64_t off = I.offset(ps, ps.name(i));
      std::fill(mask.begin() + off, mask.begin() + off + ps.tensor(i).numel(), uint8_t{1});
    }
  I.decay_mask.resize(mask.size());
  I.decay_mask.upload(mask);
  I.upload(nullptr, nullptr);
  I.m.fill_bytes(0), I.v.fill_bytes(0), I.grads.fill_bytes(0);
  I.blocks.resize(c.depth);
  for (int l = 0; l < c.depth; ++l) {
    DBlock& b = I.blocks[l];
    const std::string p = blk(l);
    b.attn = c.attn_kind(l);
    if (b.attn == 's') {
      b.qkv = I.make_linear(p + "attn.qkv");
    } else {
      b.to_qk = I.make_linear(p + "attn.to_qk");
      b.to_v = I.make_linear(p + "attn.to_v");
      b.dwconv = I.par(p + "attn.dwconv.weight"), b.ddwconv = I.grd(p + "attn.dwconv.weight");
      b.anchors = I.buf(p + "attn.ksh.anchors"), b.mu = I.buf(p + "attn.ksh.mu"), b.A = I.buf(p + "attn.ksh.A");
    }
    b.proj = I.make_linear(p + "attn.proj");
    b.fc1 = I.make_linear(p + "mlp.fc1");
    b.fc2 = I.make_linear(p + "mlp.fc2");
    b.n1w = I.par(p + "norm1.weight"), b.n1b = I.par(p + "norm1.bias"), b.n2w = I.par(p + "norm2.weight"),
    b.n2b = I.par(p + "norm2.bias");
    b.dn1w = I.grd(p + "norm1.weight"), b.dn1b = I.grd(p + "norm1.bias"), b.dn2w = I.grd(p + "norm2.weight"),
    b.dn2b = I.grd(p + "norm2.bias");
  }
  // MoE aux slots were numbered in construction order (qkv | to_qk, to_v, proj, fc1, fc2 per block): the
  // CPU's linears() order, so the host sums them in the same order.
}

VitCudaTrain::~VitCudaTrain() = default;

std::string VitCudaTrain::arch() const { return impl_->host.arch(); }
int VitCudaTrain::in_chans() const { return impl_->cfg.in_chans; }
int VitCudaTrain::img_size() const { return impl_->cfg.img_size; }
int VitCudaTrain::num_classes() const { return impl_->cfg.num_classes; }
void VitCudaTrain::forward(const float* images, int B, bool train) { impl_->forward(images, B, train); }
const float* VitCudaTrain::logits() const { return impl_->logits_h.data(); }
void VitCudaTrain::backward(const float* dlogits) { impl_->backward(dlogits); }
float VitCudaTrain::aux_loss() const { return impl_->aux_total; }
ParamSet& VitCudaTrain::params() { return impl_->host.params(); }
ParamSet& VitCudaTrain::grads() { return impl_->host.grads(); }
ParamSet* VitCudaTrain::buffers() { return impl_->host.buffers(); }
void VitCudaTrain::set_noise_seed(uint64_t seed) { impl_->noise_rng.seed_with(seed); }
void VitCudaTrain::init_random(Rng& rng) {
  impl_->host.init_random(rng);
  impl_->upload(nullptr, nullptr);
}
std::string VitCudaTrain::describe() const { return impl_->host.describe(); }
LayerKinds VitCudaTrain::kinds() const { return impl_->host.kinds(); }
ReparamOptions* VitCudaTrain::reparam_options() { return impl_->host.reparam_options(); }
std::map<std::string, std::string> VitCudaTrain::metadata() const { return impl_->host.metadata(); }
cuda::F32Math VitCudaTrain::math() const { return impl_->math; }

void VitCudaTrain::zero_grads() {
  SAV_CUDA_CHECK(cudaMemsetAsync(impl_->grads.get(), 0, impl_->grads.bytes(), impl_->st()));
}

float VitCudaTrain::optimizer_step(const AdamWOptions& opt, float lr, float clip, int64_t t) {
  Impl& I = *impl_;
  const int64_t n = static_cast<int64_t>(I.grads.size());
  double* out = grow(I.norm_out, 2);
  cuda::sumsq_f64(out, I.grads.get(), n, grow(I.ws64, cuda::sumsq_workspace_doubles(n)), I.st());
  double h[2];
  SAV_CUDA_CHECK(cudaMemcpyAsync(h, out, sizeof(h), cudaMemcpyDeviceToHost, I.st()));
  I.stream.sync();
  if (h[1] > 0) {  // name the first bad tensor, as the host trainer does
    grads_host();
    const int bad = first_nonfinite(I.host.grads());
    SAV_THROW("gradient of '" << I.host.grads().name(bad < 0 ? 0 : bad) << "' is not finite");
  }
  const float norm = static_cast<float>(std::sqrt(h[0]));
  const float gscale = (clip > 0.0f && norm > clip && std::isfinite(norm)) ? clip / (norm + 1e-6f) : 1.0f;
  const float bc1 = 1.0f - std::pow(opt.beta1, static_cast<float>(t));
  const float bc2 = 1.0f - std::pow(opt.beta2, static_cast<float>(t));
  cuda::adamw_step_f32(I.params.get(), I.grads.get(), I.m.get(), I.v.get(), I.decay_mask.get(), n, gscale, lr,
                       opt.weight_decay, opt.beta1, opt.beta2, bc1, bc2, opt.eps, I.st());
  return norm;
}

void VitCudaTrain::download_state(ParamSet* m, ParamSet* v) {
  Impl& I = *impl_;
  I.stream.sync();
  ParamSet& ps = I.host.params();
  SAV_CUDA_CHECK(cudaMemcpy(ps.flat(), I.params.get(), sizeof(float) * ps.numel(), cudaMemcpyDeviceToHost));
  if (m) SAV_CUDA_CHECK(cudaMemcpy(m->flat(), I.m.get(), sizeof(float) * m->numel(), cudaMemcpyDeviceToHost));
  if (v) SAV_CUDA_CHECK(cudaMemcpy(v->flat(), I.v.get(), sizeof(float) * v->numel(), cudaMemcpyDeviceToHost));
  // the host layers cache decoded shift weights for inference: they are stale now
  for (int l = 0; l < I.cfg.depth; ++l)
    for (const char* n : {"attn.qkv", "attn.to_qk", "attn.to_v", "attn.proj", "mlp.fc1", "mlp.fc2"})
      if (LinearLayer* L = I.host.find_linear(blk(l) + n)) L->params_changed();
}

void VitCudaTrain::upload_state(const ParamSet* m, const ParamSet* v) {
  impl_->stream.sync();
  impl_->upload(m, v);
}

void VitCudaTrain::grads_host() {
  Impl& I = *impl_;
  I.stream.sync();
  ParamSet& gs = I.host.grads();
  SAV_CUDA_CHECK(cudaMemcpy(gs.flat(), I.grads.get(), sizeof(float) * gs.numel(), cudaMemcpyDeviceToHost));
}

}  // namespace sav
