// PvtCudaTrain: Pvt::forward / Pvt::backward (models/pvt.cpp) op for op on the GPU. Buffers, op order and
// gradient accumulation follow the CPU model, so the two can be compared tensor by tensor
// (tests/cuda/test_pvt_cuda_train.cpp).
#include "models/pvt_cuda_train.h"

#include <algorithm>
#include <string>
#include <vector>

#include "core/error.h"
#include "models/cuda_train_core.h"
#include "ops/cpu/conv.h"
#include "ops/cpu/hamming.h"
#include "ops/cuda/common.h"
#include "ops/cuda/hamming_train.h"
#include "ops/cuda/pvt_ops.h"
#include "ops/cuda/pvt_train_ops.h"
#include "ops/cuda/train_ops.h"

namespace sav {

namespace {

using cuda::DeviceBuffer;
using cuda_train::DLinear;
using cuda_train::grow;

constexpr int kMlpConv = 3;  // the MLP's depthwise conv is 3x3 (as models/pvt.cpp)

struct PBlock {
  int stage = 0;
  std::string prefix;
  char attn = 's';
  std::unique_ptr<DLinear> q, kv, to_qk, to_v, proj, fc1, fc2;
  float *dwconv = nullptr, *ddwconv = nullptr, *anchors = nullptr, *mu = nullptr, *A = nullptr;
  DeviceBuffer<float> ln1, mean1, rstd1, q_out, srcols, srout, srln, srmean, srrstd, kv_out, att, qk, v, hsaved, ao,
      xmid, ln2, mean2, rstd2, fc1_out, dw, gelu, xout;
  DeviceBuffer<uint64_t> codes;
};

struct PStage {
  DeviceBuffer<float> cols, conv, embed, emean, erstd, out, omean, orstd;
  int first = 0, count = 0;  // blocks
};

}  // namespace

struct PvtCudaTrain::Impl {
  Pvt& host;
  PvtConfig cfg;
  cuda_train::Core& core;
  std::vector<PBlock> blocks;
  std::vector<PStage> stages;
  int B = 0;
  bool have_train_forward = false;
  DeviceBuffer<float> img, img_nhwc, pooled, logits_d, tmp, dlogits_d, dpooled, dx, dt, dbig, dbig2, dstage, dcols, ds;

  Impl(Pvt& model, cuda_train::Core& c) : host(model), cfg(model.config()), core(c) {}

  cudaStream_t st() const { return core.stream(); }
  float* par(const std::string& n) { return core.par(n); }
  float* grd(const std::string& n) { return core.grd(n); }
  int kernel(int s) const { return s == 0 ? cfg.stem_patch : 3; }
  int stride(int s) const { return s == 0 ? cfg.stem_stride : 2; }
  int in_grid(int s) const { return s == 0 ? cfg.img_size : cfg.grid(s - 1); }
  int in_chans(int s) const { return s == 0 ? cfg.in_chans : cfg.dims[s - 1]; }
  cpu::HammingDims hdims(int Bn, int s) const {
    return {Bn, cfg.tokens(s), cfg.dims[s], cfg.heads[s], cfg.hash_bits, cfg.anchors};
  }
  cpu::HammingWeights hweights(const PBlock& b) const { return {b.anchors, b.mu, b.A, b.dwconv, nullptr}; }
  std::unique_ptr<DLinear> make_linear(const std::string& prefix) {
    LinearLayer* hl = host.find_linear(prefix);
    SAV_CHECK(hl, "PvtCudaTrain: no linear layer " << prefix);
    return core.make_linear(*hl);
  }

  void ensure(int Bn) {
    size_t max_mc = 1, max_mbig = 1, max_mf = 1, max_cols = 1, max_stage = 1, max_att = 1, wsn = 1;
    auto need_ws = [&](size_t n) { wsn = std::max(wsn, n); };
    for (int s = 0; s < cfg.stages(); ++s) {
      const int g = cfg.grid(s), N = g * g, C = cfg.dims[s], F = cfg.mlp_hidden(s), H = cfg.heads[s];
      const int k = kernel(s), gin = in_grid(s), cin = in_chans(s);
      const size_t M = size_t(Bn) * N;
      PStage& sa = stages[s];
      const size_t ncols = cpu::conv2d_cols_floats(Bn, gin, gin, cin, k, stride(s), k / 2);
      grow(sa.cols, ncols), grow(sa.conv, M * C), grow(sa.embed, M * C), grow(sa.emean, M), grow(sa.erstd, M);
      grow(sa.out, M * C), grow(sa.omean, M), grow(sa.orstd, M);
      max_mc = std::max(max_mc, M * C);
      max_mbig = std::max(max_mbig, M * std::max(3 * C, F));
      max_mf = std::max(max_mf, M * F);
      max_cols = std::max(max_cols, ncols);
      max_stage = std::max(max_stage, size_t(Bn) * gin * gin * cin);
      need_ws(cuda::layernorm_backward_workspace_floats(int(M), C));
      need_ws(cuda::colsum_workspace_floats(int(M), std::max({3 * C, F, cfg.num_classes})));
      need_ws(cuda::dwconv2d_backward_workspace_floats(Bn, g, g, F, kMlpConv));
      for (int l = sa.first; l < sa.first + sa.count; ++l) {
        PBlock& b = blocks[l];
        const int r = cfg.sr[s], gk = cfg.kv_grid(s), Nk = gk * gk;
        grow(b.ln1, M * C), grow(b.mean1, M), grow(b.rstd1, M), grow(b.ao, M * C), grow(b.xmid, M * C);
        grow(b.ln2, M * C), grow(b.mean2, M), grow(b.rstd2, M), grow(b.fc1_out, M * F), grow(b.dw, M * F);
        grow(b.gelu, M * F), grow(b.xout, M * C);
        if (b.attn == 's') {
          grow(b.q_out, M * C), grow(b.kv_out, size_t(Bn) * Nk * 2 * C), grow(b.att, size_t(Bn) * H * N * Nk);
          max_att = std::max(max_att, size_t(Bn) * H * N * Nk);
          if (r > 1) {
            const size_t nsr = cpu::conv2d_cols_floats(Bn, g, g, C, r, r, 0);
            grow(b.srcols, nsr), grow(b.srout, size_t(Bn) * Nk * C), grow(b.srln, size_t(Bn) * Nk * C);
            grow(b.srmean, size_t(Bn) * Nk), grow(b.srrstd, size_t(Bn) * Nk);
            max_cols = std::max(max_cols, nsr);
          }
        } else {
          const cpu::HammingDims d = hdims(Bn, s);
          grow(b.qk, M * C), grow(b.v, M * C);
          grow(b.hsaved, cpu::hamming_saved_floats(d)), grow(b.codes, cpu::hamming_saved_codes(d));
          need_ws(cuda::hamming_train_workspace_floats(d));
        }
      }
    }
    const int last = cfg.stages() - 1;
    max_stage = std::max(max_stage, size_t(Bn) * cfg.tokens(last) * cfg.dims[last]);
    grow(img, size_t(Bn) * cfg.in_chans * cfg.img_size * cfg.img_size);
    grow(img_nhwc, size_t(Bn) * cfg.in_chans * cfg.img_size * cfg.img_size);
    grow(pooled, size_t(Bn) * cfg.dims[last]), grow(dpooled, size_t(Bn) * cfg.dims[last]);
    grow(logits_d, size_t(Bn) * cfg.num_classes), grow(dlogits_d, size_t(Bn) * cfg.num_classes);
    grow(tmp, max_mc), grow(dx, max_mc), grow(dt, max_mc), grow(dbig, max_mbig), grow(dbig2, max_mf);
    grow(dstage, max_stage), grow(dcols, max_cols), grow(ds, max_att);
    core.ws(wsn);
    core.reserve(int(size_t(Bn) * cfg.tokens(0)));
  }

  // y (B*Ho*Wo, Cout) = conv(x) through im2col (cols kept for backward) and a product with w (Cout, K).
  void conv_forward(float* y, float* cols, const float* x, const std::string& wname, const std::string& bname, int Bn,
                    int gin, int cin, int cout, int k, int s, int pad) {
    cuda::im2col_nhwc_f32(cols, x, Bn, gin, gin, cin, k, s, pad, st());
    const int go = cpu::conv_out_size(gin, k, s, pad), K = cin * k * k;
    core.gemm().linear_f32_in(y, cout, cols, par(wname), par(bname), Bn * go * go, K, cout, false, core.math(), st());
  }
  // dW += dy^T cols, db += column sums of dy; dx (B,gin,gin,cin) = the input gradient (nullptr: skip).
  void conv_backward(float* dxin, const float* dy, const float* cols, const std::string& wname,
                     const std::string& bname, int Bn, int gin, int cin, int cout, int k, int s, int pad) {
    const int go = cpu::conv_out_size(gin, k, s, pad), K = cin * k * k, rows = Bn * go * go;
    core.blas().dytx(grd(wname), dy, cols, rows, K, cout, 1.0f);
    cuda::colsum_f32(grd(bname), dy, cout, rows, cout, core.ws(), st());
    if (!dxin) return;
    core.blas().dyw(dcols.get(), dy, par(wname), rows, K, cout, 0.0f);
    cuda::col2im_nhwc_f32(dxin, dcols.get(), Bn, gin, gin, cin, k, s, pad, st());
  }

  float forward(const float* images, int Bn, bool train, std::vector<float>& logits_h) {
    SAV_CHECK(Bn > 0, "batch size must be positive, got " << Bn);
    ensure(Bn);
    B = Bn;
    const int S = cfg.img_size, V = cfg.num_classes;
    SAV_CUDA_CHECK(cudaMemcpyAsync(img.get(), images, sizeof(float) * size_t(Bn) * cfg.in_chans * S * S,
                                   cudaMemcpyHostToDevice, st()));
    cuda::nchw_to_nhwc_f32(img_nhwc.get(), img.get(), Bn, cfg.in_chans, S * S, st());
    const float* xin = img_nhwc.get();
    for (int s = 0; s < cfg.stages(); ++s) {
      const int g = cfg.grid(s), N = g * g, M = Bn * N, C = cfg.dims[s], F = cfg.mlp_hidden(s), H = cfg.heads[s];
      const int r = cfg.sr[s], gk = cfg.kv_grid(s), Nk = gk * gk, k = kernel(s);
      PStage& sa = stages[s];
      const std::string e = host.stage_embed(s);
      conv_forward(sa.conv.get(), sa.cols.get(), xin, e + "proj.weight", e + "proj.bias", Bn, in_grid(s), in_chans(s),
                   C, k, stride(s), k / 2);
      cuda::layernorm_train_forward(sa.embed.get(), C, sa.emean.get(), sa.erstd.get(), sa.conv.get(), C,
                                    par(e + "norm.weight"), par(e + "norm.bias"), M, C, cfg.embed_ln_eps, st());
      const float* x = sa.embed.get();
      float* t = tmp.get();
      for (int l = sa.first; l < sa.first + sa.count; ++l) {
        PBlock& b = blocks[l];
        const std::string& p = b.prefix;
        cuda::layernorm_train_forward(b.ln1.get(), C, b.mean1.get(), b.rstd1.get(), x, C, par(p + "norm1.weight"),
                                      par(p + "norm1.bias"), M, C, cfg.ln_eps, st());
        if (b.attn == 's') {
          core.lin_forward(*b.q, b.q_out.get(), b.ln1.get(), M, train);
          const float* kvin = b.ln1.get();
          if (r > 1) {
            conv_forward(b.srout.get(), b.srcols.get(), b.ln1.get(), p + "attn.sr.weight", p + "attn.sr.bias", Bn, g, C,
                         C, r, r, 0);
            cuda::layernorm_train_forward(b.srln.get(), C, b.srmean.get(), b.srrstd.get(), b.srout.get(), C,
                                          par(p + "attn.norm.weight"), par(p + "attn.norm.bias"), Bn * Nk, C,
                                          cfg.embed_ln_eps, st());
            kvin = b.srln.get();
          }
          core.lin_forward(*b.kv, b.kv_out.get(), kvin, Bn * Nk, train);
          cuda::attention_q_kv_train_forward(b.ao.get(), b.att.get(), b.q_out.get(), b.kv_out.get(), Bn, N, Nk, C, H,
                                             core.blas(), st());
        } else {
          core.lin_forward(*b.to_qk, b.qk.get(), b.ln1.get(), M, train);
          core.lin_forward(*b.to_v, b.v.get(), b.ln1.get(), M, train);
          const cpu::HammingDims d = hdims(Bn, s);
          const cpu::HammingSaved saved = cpu::hamming_saved_bind(d, b.hsaved.get(), b.codes.get());
          cuda::hamming_train_forward(b.ao.get(), C, saved, b.qk.get(), C, b.v.get(), C, hweights(b), d, st());
        }
        core.lin_forward(*b.proj, t, b.ao.get(), M, train);
        cuda::add_f32(b.xmid.get(), x, t, int64_t(M) * C, st());
        cuda::layernorm_train_forward(b.ln2.get(), C, b.mean2.get(), b.rstd2.get(), b.xmid.get(), C,
                                      par(p + "norm2.weight"), par(p + "norm2.bias"), M, C, cfg.ln_eps, st());
        core.lin_forward(*b.fc1, b.fc1_out.get(), b.ln2.get(), M, train);
        cuda::dwconv2d_f32(b.dw.get(), b.fc1_out.get(), par(p + "mlp.dwconv.weight"), par(p + "mlp.dwconv.bias"), Bn, g,
                           g, F, kMlpConv, /*gelu*/ false, st());
        cuda::gelu_forward_f32(b.gelu.get(), b.dw.get(), int64_t(M) * F, st());
        core.lin_forward(*b.fc2, t, b.gelu.get(), M, train);
        cuda::add_f32(b.xout.get(), b.xmid.get(), t, int64_t(M) * C, st());
        x = b.xout.get();
      }
      const std::string sn = "stages." + std::to_string(s) + ".norm.";
      cuda::layernorm_train_forward(sa.out.get(), C, sa.omean.get(), sa.orstd.get(), x, C, par(sn + "weight"),
                                    par(sn + "bias"), M, C, cfg.ln_eps, st());
      xin = sa.out.get();
    }
    const int last = cfg.stages() - 1, N = cfg.tokens(last), C = cfg.dims[last];
    cuda::mean_tokens_f32(pooled.get(), xin, Bn, N, C, st());
    core.gemm().linear_f32_in(logits_d.get(), V, pooled.get(), par("head.weight"), par("head.bias"), Bn, C, V, false,
                              core.math(), st());
    have_train_forward = train;
    return core.finish_forward(logits_d.get(), logits_h, size_t(Bn) * V);
  }

  void backward(const float* dlogits) {
    SAV_CHECK(have_train_forward, "backward() needs a forward(..., train=true) first");
    const int Bn = B, V = cfg.num_classes, last = cfg.stages() - 1;
    float* ws = core.ws();
    cuda::Blas& blas = core.blas();
    SAV_CUDA_CHECK(cudaMemcpyAsync(dlogits_d.get(), dlogits, sizeof(float) * Bn * V, cudaMemcpyHostToDevice, st()));
    {  // head: pooled = mean_n out[b, n]
      const int N = cfg.tokens(last), C = cfg.dims[last];
      blas.dyw(dpooled.get(), dlogits_d.get(), par("head.weight"), Bn, C, V, 0.0f);
      blas.dytx(grd("head.weight"), dlogits_d.get(), pooled.get(), Bn, C, V, 1.0f);
      cuda::colsum_f32(grd("head.bias"), dlogits_d.get(), V, Bn, V, ws, st());
      cuda::mean_tokens_backward_f32(dstage.get(), dpooled.get(), Bn, N, C, st());
    }
    for (int s = last; s >= 0; --s) {
      const int g = cfg.grid(s), N = g * g, M = Bn * N, C = cfg.dims[s], F = cfg.mlp_hidden(s), H = cfg.heads[s];
      const int r = cfg.sr[s], gk = cfg.kv_grid(s), Nk = gk * gk;
      PStage& sa = stages[s];
      const float* xlast = sa.count > 0 ? blocks[sa.first + sa.count - 1].xout.get() : sa.embed.get();
      const std::string sn = "stages." + std::to_string(s) + ".norm.";
      SAV_CUDA_CHECK(cudaMemsetAsync(dx.get(), 0, sizeof(float) * size_t(M) * C, st()));
      cuda::layernorm_train_backward(dx.get(), C, grd(sn + "weight"), grd(sn + "bias"), dstage.get(), C, xlast, C,
                                     par(sn + "weight"), sa.omean.get(), sa.orstd.get(), M, C, ws, st());
      for (int l = sa.first + sa.count - 1; l >= sa.first; --l) {
        PBlock& b = blocks[l];
        const std::string& p = b.prefix;
        const float* xin = l > sa.first ? blocks[l - 1].xout.get() : sa.embed.get();
        // MLP branch: xout = xmid + fc2(gelu(dwconv(fc1(ln2(xmid)))))
        core.lin_backward(*b.fc2, dbig.get(), 0.0f, dx.get());                               // d gelu
        cuda::gelu_backward_f32(dbig2.get(), dbig.get(), b.dw.get(), int64_t(M) * F, st());  // d dw
        cuda::dwconv2d_backward_f32(dbig.get(), grd(p + "mlp.dwconv.weight"), grd(p + "mlp.dwconv.bias"), dbig2.get(),
                                    b.fc1_out.get(), par(p + "mlp.dwconv.weight"), Bn, g, g, F, kMlpConv, ws,
                                    st());  // d fc1
        core.lin_backward(*b.fc1, dt.get(), 0.0f, dbig.get());
        cuda::layernorm_train_backward(dx.get(), C, grd(p + "norm2.weight"), grd(p + "norm2.bias"), dt.get(), C,
                                       b.xmid.get(), C, par(p + "norm2.weight"), b.mean2.get(), b.rstd2.get(), M, C, ws,
                                       st());  // dx = d xmid
        // attention branch: xmid = xin + proj(attn(ln1(xin)))
        core.lin_backward(*b.proj, dt.get(), 0.0f, dx.get());  // dt = d ao
        float* dln1 = dbig2.get();                             // (M,C), free now
        if (b.attn == 's') {
          float* dq = dbig.get();                   // (M,C)
          float* dkv = dbig.get() + size_t(M) * C;  // (B*Nk, 2C)
          cuda::attention_q_kv_train_backward(dq, dkv, ds.get(), dt.get(), b.q_out.get(), b.kv_out.get(), b.att.get(),
                                              Bn, N, Nk, C, H, blas, st());
          core.lin_backward(*b.q, dln1, 0.0f, dq);
          if (r > 1) {
            float* dsrln = dt.get();  // (B*Nk, C); d ao is consumed
            core.lin_backward(*b.kv, dsrln, 0.0f, dkv);
            float* dsrout = dq;  // consumed by the q backward
            SAV_CUDA_CHECK(cudaMemsetAsync(dsrout, 0, sizeof(float) * size_t(Bn) * Nk * C, st()));
            cuda::layernorm_train_backward(dsrout, C, grd(p + "attn.norm.weight"), grd(p + "attn.norm.bias"), dsrln, C,
                                           b.srout.get(), C, par(p + "attn.norm.weight"), b.srmean.get(),
                                           b.srrstd.get(), Bn * Nk, C, ws, st());
            conv_backward(tmp.get(), dsrout, b.srcols.get(), p + "attn.sr.weight", p + "attn.sr.bias", Bn, g, C, C, r,
                          r, 0);
            cuda::add_f32(dln1, dln1, tmp.get(), int64_t(M) * C, st());
          } else {
            core.lin_backward(*b.kv, dln1, 1.0f, dkv);
          }
        } else {
          const cpu::HammingDims d = hdims(Bn, s);
          const cpu::HammingSaved saved = cpu::hamming_saved_bind(d, b.hsaved.get(), b.codes.get());
          float* dqk = dbig.get();
          float* dv = dbig.get() + size_t(M) * C;
          cuda::hamming_train_backward(dqk, C, dv, C, b.ddwconv, nullptr, dt.get(), C, b.v.get(), C, saved, hweights(b),
                                       d, ws, st());
          core.lin_backward(*b.to_qk, dln1, 0.0f, dqk);
          core.lin_backward(*b.to_v, dln1, 1.0f, dv);
        }
        cuda::layernorm_train_backward(dx.get(), C, grd(p + "norm1.weight"), grd(p + "norm1.bias"), dln1, C, xin, C,
                                       par(p + "norm1.weight"), b.mean1.get(), b.rstd1.get(), M, C, ws,
                                       st());  // dx = d xin
      }
      // patch embedding: embed = LN(conv(prev)); prev = the previous stage's output (or the image: no gradient)
      const std::string e = host.stage_embed(s);
      float* dconv = dt.get();
      SAV_CUDA_CHECK(cudaMemsetAsync(dconv, 0, sizeof(float) * size_t(M) * C, st()));
      cuda::layernorm_train_backward(dconv, C, grd(e + "norm.weight"), grd(e + "norm.bias"), dx.get(), C, sa.conv.get(),
                                     C, par(e + "norm.weight"), sa.emean.get(), sa.erstd.get(), M, C, ws, st());
      const int k = kernel(s);
      conv_backward(s > 0 ? dstage.get() : nullptr, dconv, sa.cols.get(), e + "proj.weight", e + "proj.bias", Bn,
                    in_grid(s), in_chans(s), C, k, stride(s), k / 2);
    }
    SAV_CUDA_CHECK(cudaStreamSynchronize(st()));
  }
};

PvtCudaTrain::PvtCudaTrain(Pvt& model, cuda::F32Math math)
    : CudaTrainModel(model, math), impl_(std::make_unique<Impl>(model, core())) {
  Impl& I = *impl_;
  const PvtConfig& c = I.cfg;
  I.stages.resize(c.stages());
  I.blocks.resize(model.num_blocks());
  for (int l = 0; l < model.num_blocks(); ++l) {
    PBlock& b = I.blocks[l];
    b.stage = model.block_stage(l);
    b.prefix = model.block_prefix(l);
    b.attn = c.attn_kind(b.stage);
    PStage& sa = I.stages[b.stage];
    if (sa.count == 0) sa.first = l;
    ++sa.count;
    const int s = b.stage, C = c.dims[s], H = c.heads[s];
    if (b.attn == 's')
      SAV_CHECK(cuda::attention_q_kv_train_supports(c.kv_grid(s) * c.kv_grid(s), C, H),
                "PvtCudaTrain: stage " << s << " attention (width " << C << ", " << H
                                       << " heads) is beyond the training kernels");
    else
      SAV_CHECK(cuda::hamming_train_supports(I.hdims(1, s)), "PvtCudaTrain: stage "
                                                                 << s << " Hamming attention (width " << C << ", " << H
                                                                 << " heads, " << c.hash_bits << " bits, " << c.anchors
                                                                 << " anchors) is beyond the training kernels");
    // linears in the host's linears() order (q, kv | to_qk, to_v, proj, fc1, fc2): the aux-loss order
    const std::string& p = b.prefix;
    if (b.attn == 's') {
      b.q = I.make_linear(p + "attn.q");
      b.kv = I.make_linear(p + "attn.kv");
    } else {
      b.to_qk = I.make_linear(p + "attn.to_qk");
      b.to_v = I.make_linear(p + "attn.to_v");
      b.dwconv = I.par(p + "attn.dwconv.weight"), b.ddwconv = I.grd(p + "attn.dwconv.weight");
      b.anchors = I.core.buf(p + "attn.ksh.anchors"), b.mu = I.core.buf(p + "attn.ksh.mu");
      b.A = I.core.buf(p + "attn.ksh.A");
    }
    b.proj = I.make_linear(p + "attn.proj");
    b.fc1 = I.make_linear(p + "mlp.fc1");
    b.fc2 = I.make_linear(p + "mlp.fc2");
  }
}

PvtCudaTrain::~PvtCudaTrain() = default;

void PvtCudaTrain::forward(const float* images, int B, bool train) {
  aux_ = impl_->forward(images, B, train, logits_h_);
}

void PvtCudaTrain::backward(const float* dlogits) { impl_->backward(dlogits); }

}  // namespace sav
