// VitCudaTrain: Vit::forward / Vit::backward (models/vit.cpp) op for op on the GPU. The layout of every
// buffer, the order of the ops and the accumulation of gradients follow the CPU model, so the two can be
// compared tensor by tensor (tests/cuda/test_vit_cuda_train.cpp).
#include "models/vit_cuda_train.h"

#include <algorithm>
#include <string>
#include <vector>

#include "core/error.h"
#include "models/cuda_train_core.h"
#include "ops/cpu/hamming.h"
#include "ops/cuda/common.h"
#include "ops/cuda/hamming_train.h"
#include "ops/cuda/train_ops.h"

namespace sav {

namespace {

using cuda::DeviceBuffer;
using cuda_train::DLinear;
using cuda_train::grow;

struct DBlock {
  char attn = 's';
  std::unique_ptr<DLinear> qkv, to_qk, to_v, proj, fc1, fc2;
  float *n1w, *n1b, *n2w, *n2b, *dn1w, *dn1b, *dn2w, *dn2b;
  float *dwconv = nullptr, *ddwconv = nullptr, *anchors = nullptr, *mu = nullptr, *A = nullptr;
  // activations of the last forward (grown to the largest batch seen)
  DeviceBuffer<float> ln1, mean1, rstd1, qkv_out, att, qk, v, hsaved, ao, xmid, ln2, mean2, rstd2, fc1_out, gelu, xout;
  DeviceBuffer<uint64_t> codes;
};

std::string blk(int l) { return "blocks." + std::to_string(l) + "."; }

}  // namespace

struct VitCudaTrain::Impl {
  Vit& host;
  VitConfig cfg;
  cuda_train::Core& core;
  std::vector<DBlock> blocks;
  // per-forward state
  int B = 0;
  bool have_train_forward = false;
  DeviceBuffer<float> img, cols, pe, x0, tmp, cls_ln, cls_mean, cls_rstd, logits_d;
  DeviceBuffer<float> dlogits_d, dcls_ln, dx, dao, dln, dbig, dbig2, ds, dpe;
  const float* xlast = nullptr;

  Impl(Vit& model, cuda_train::Core& c) : host(model), cfg(model.config()), core(c) {}

  cudaStream_t st() const { return core.stream(); }
  float* par(const std::string& n) { return core.par(n); }
  float* grd(const std::string& n) { return core.grd(n); }
  std::unique_ptr<DLinear> make_linear(const std::string& prefix) {
    LinearLayer* hl = host.find_linear(prefix);
    SAV_CHECK(hl, "VitCudaTrain: no linear layer " << prefix);
    return core.make_linear(*hl);
  }

  cpu::HammingDims hdims(int Bn) const { return {Bn, cfg.tokens(), cfg.dim, cfg.heads, cfg.hash_bits, cfg.anchors}; }

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
    core.ws(ws_need);
    core.reserve(int(M));
  }

  cpu::HammingWeights hweights(const DBlock& b) const { return {b.anchors, b.mu, b.A, b.dwconv, nullptr}; }

  // Returns the auxiliary loss; the logits go to logits_h.
  float forward(const float* images, int Bn, bool train_mode, std::vector<float>& logits_h) {
    SAV_CHECK(Bn > 0, "batch size must be positive, got " << Bn);
    ensure(Bn);
    B = Bn;
    const int N = cfg.tokens(), C = cfg.dim, F = cfg.mlp_hidden, H = cfg.heads, P = cfg.num_patches();
    const int M = Bn * N, K = cfg.in_chans * cfg.patch * cfg.patch, V = cfg.num_classes;
    const size_t nimg = size_t(Bn) * cfg.in_chans * cfg.img_size * cfg.img_size;
    SAV_CUDA_CHECK(cudaMemcpyAsync(img.get(), images, sizeof(float) * nimg, cudaMemcpyHostToDevice, st()));
    cuda::im2col_f32(cols.get(), img.get(), Bn, cfg.in_chans, cfg.img_size, cfg.patch, st());
    core.gemm().linear_f32_in(pe.get(), C, cols.get(), par("patch_embed.proj.weight"), par("patch_embed.proj.bias"),
                              Bn * P, K, C, false, core.math(), st());
    cuda::embed_tokens_forward(x0.get(), pe.get(), par("cls_token"), par("pos_embed"), Bn, N, C, st());
    const float* x = x0.get();
    float* t = tmp.get();
    for (auto& b : blocks) {
      cuda::layernorm_train_forward(b.ln1.get(), C, b.mean1.get(), b.rstd1.get(), x, C, b.n1w, b.n1b, M, C, cfg.ln_eps,
                                    st());
      if (b.attn == 's') {
        core.lin_forward(*b.qkv, b.qkv_out.get(), b.ln1.get(), M, train_mode);
        cuda::attention_train_forward(b.ao.get(), b.att.get(), b.qkv_out.get(), Bn, N, C, H, core.blas(), st());
      } else {
        core.lin_forward(*b.to_qk, b.qk.get(), b.ln1.get(), M, train_mode);
        core.lin_forward(*b.to_v, b.v.get(), b.ln1.get(), M, train_mode);
        const cpu::HammingDims d = hdims(Bn);
        const cpu::HammingSaved saved = cpu::hamming_saved_bind(d, b.hsaved.get(), b.codes.get());
        cuda::hamming_train_forward(b.ao.get(), C, saved, b.qk.get(), C, b.v.get(), C, hweights(b), d, st());
      }
      core.lin_forward(*b.proj, t, b.ao.get(), M, train_mode);
      cuda::add_f32(b.xmid.get(), x, t, int64_t(M) * C, st());
      cuda::layernorm_train_forward(b.ln2.get(), C, b.mean2.get(), b.rstd2.get(), b.xmid.get(), C, b.n2w, b.n2b, M, C,
                                    cfg.ln_eps, st());
      core.lin_forward(*b.fc1, b.fc1_out.get(), b.ln2.get(), M, train_mode);
      cuda::gelu_forward_f32(b.gelu.get(), b.fc1_out.get(), int64_t(M) * F, st());
      core.lin_forward(*b.fc2, t, b.gelu.get(), M, train_mode);
      cuda::add_f32(b.xout.get(), b.xmid.get(), t, int64_t(M) * C, st());
      x = b.xout.get();
    }
    xlast = x;
    // final norm and head on the class-token rows (row b at x + b*N*C)
    cuda::layernorm_train_forward(cls_ln.get(), C, cls_mean.get(), cls_rstd.get(), x, N * C, par("norm.weight"),
                                  par("norm.bias"), Bn, C, cfg.ln_eps, st());
    core.gemm().linear_f32_in(logits_d.get(), V, cls_ln.get(), par("head.weight"), par("head.bias"), Bn, C, V, false,
                              core.math(), st());
    have_train_forward = train_mode;
    return core.finish_forward(logits_d.get(), logits_h, size_t(Bn) * V);
  }

  void backward(const float* dlogits) {
    SAV_CHECK(have_train_forward, "backward() needs a forward(..., train=true) first");
    const int Bn = B, N = cfg.tokens(), C = cfg.dim, F = cfg.mlp_hidden, H = cfg.heads, P = cfg.num_patches();
    const int M = Bn * N, K = cfg.in_chans * cfg.patch * cfg.patch, V = cfg.num_classes;
    float* ws_f = core.ws();
    cuda::Blas& blas = core.blas();
    SAV_CUDA_CHECK(cudaMemcpyAsync(dlogits_d.get(), dlogits, sizeof(float) * Bn * V, cudaMemcpyHostToDevice, st()));
    // head and final norm (class-token rows)
    blas.dyw(dcls_ln.get(), dlogits_d.get(), par("head.weight"), Bn, C, V, 0.0f);
    blas.dytx(grd("head.weight"), dlogits_d.get(), cls_ln.get(), Bn, C, V, 1.0f);
    cuda::colsum_f32(grd("head.bias"), dlogits_d.get(), V, Bn, V, ws_f, st());
    SAV_CUDA_CHECK(cudaMemsetAsync(dx.get(), 0, sizeof(float) * size_t(M) * C, st()));
    cuda::layernorm_train_backward(dx.get(), N * C, grd("norm.weight"), grd("norm.bias"), dcls_ln.get(), C, xlast,
                                   N * C, par("norm.weight"), cls_mean.get(), cls_rstd.get(), Bn, C, ws_f, st());
    for (int l = cfg.depth - 1; l >= 0; --l) {
      DBlock& b = blocks[l];
      const float* xin = l > 0 ? blocks[l - 1].xout.get() : x0.get();
      // MLP branch: xout = xmid + fc2(gelu(fc1(ln2(xmid))))
      core.lin_backward(*b.fc2, dbig.get(), 0.0f, dx.get());
      cuda::gelu_backward_f32(dbig2.get(), dbig.get(), b.fc1_out.get(), int64_t(M) * F, st());
      core.lin_backward(*b.fc1, dln.get(), 0.0f, dbig2.get());
      cuda::layernorm_train_backward(dx.get(), C, b.dn2w, b.dn2b, dln.get(), C, b.xmid.get(), C, b.n2w, b.mean2.get(),
                                     b.rstd2.get(), M, C, ws_f, st());  // dx = d xmid
      // attention branch: xmid = xin + proj(attn(ln1(xin)))
      core.lin_backward(*b.proj, dao.get(), 0.0f, dx.get());
      if (b.attn == 's') {
        cuda::attention_train_backward(dbig.get(), ds.get(), dao.get(), b.qkv_out.get(), b.att.get(), Bn, N, C, H, blas,
                                       st());
        core.lin_backward(*b.qkv, dln.get(), 0.0f, dbig.get());
      } else {
        const cpu::HammingDims d = hdims(Bn);
        const cpu::HammingSaved saved = cpu::hamming_saved_bind(d, b.hsaved.get(), b.codes.get());
        float* dqk = dbig.get();
        float* dv = dbig.get() + size_t(M) * C;
        cuda::hamming_train_backward(dqk, C, dv, C, b.ddwconv, nullptr, dao.get(), C, b.v.get(), C, saved, hweights(b),
                                     d, ws_f, st());
        core.lin_backward(*b.to_qk, dln.get(), 0.0f, dqk);
        core.lin_backward(*b.to_v, dln.get(), 1.0f, dv);
      }
      cuda::layernorm_train_backward(dx.get(), C, b.dn1w, b.dn1b, dln.get(), C, xin, C, b.n1w, b.mean1.get(),
                                     b.rstd1.get(), M, C, ws_f, st());  // dx = d xin
    }
    cuda::embed_tokens_backward(dpe.get(), grd("cls_token"), grd("pos_embed"), dx.get(), Bn, N, C, st());
    blas.dytx(grd("patch_embed.proj.weight"), dpe.get(), cols.get(), Bn * P, K, C, 1.0f);
    cuda::colsum_f32(grd("patch_embed.proj.bias"), dpe.get(), C, Bn * P, C, ws_f, st());
    SAV_CUDA_CHECK(cudaStreamSynchronize(st()));
  }
};

VitCudaTrain::VitCudaTrain(Vit& model, cuda::F32Math math)
    : CudaTrainModel(model, math), impl_(std::make_unique<Impl>(model, core())) {
  Impl& I = *impl_;
  const VitConfig& c = I.cfg;
  for (int l = 0; l < c.depth; ++l) {
    if (c.attn_kind(l) == 's')
      SAV_CHECK(cuda::attention_train_supports(c.tokens(), c.dim, c.heads),
                "VitCudaTrain: softmax attention with " << c.tokens() << " tokens, width " << c.dim << ", " << c.heads
                                                        << " heads is beyond the training kernels");
    else
      SAV_CHECK(cuda::hamming_train_supports(I.hdims(1)), "VitCudaTrain: Hamming attention of width "
                                                              << c.dim << ", " << c.heads << " heads, " << c.hash_bits
                                                              << " bits, " << c.anchors
                                                              << " anchors is beyond the training kernels");
  }
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
      b.anchors = I.core.buf(p + "attn.ksh.anchors"), b.mu = I.core.buf(p + "attn.ksh.mu"),
      b.A = I.core.buf(p + "attn.ksh.A");
    }
    b.proj = I.make_linear(p + "attn.proj");
    b.fc1 = I.make_linear(p + "mlp.fc1");
    b.fc2 = I.make_linear(p + "mlp.fc2");
    b.n1w = I.par(p + "norm1.weight"), b.n1b = I.par(p + "norm1.bias"), b.n2w = I.par(p + "norm2.weight"),
    b.n2b = I.par(p + "norm2.bias");
    b.dn1w = I.grd(p + "norm1.weight"), b.dn1b = I.grd(p + "norm1.bias"), b.dn2w = I.grd(p + "norm2.weight"),
    b.dn2b = I.grd(p + "norm2.bias");
  }
  // MoE aux slots are numbered in construction order (qkv | to_qk, to_v, proj, fc1, fc2 per block): the CPU's
  // linears() order, so the host sums them in the same order.
}

VitCudaTrain::~VitCudaTrain() = default;

void VitCudaTrain::forward(const float* images, int B, bool train) {
  aux_ = impl_->forward(images, B, train, logits_h_);
}

void VitCudaTrain::backward(const float* dlogits) { impl_->backward(dlogits); }

}  // namespace sav
