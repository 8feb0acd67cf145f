// The shared part of the GPU-trained models. See cuda_train_core.h.
#include "models/cuda_train_core.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "models/cuda_train_model.h"
#include "ops/cuda/moe_train.h"
#include "ops/cuda/train_ops.h"
#include "train/optim.h"

namespace sav::cuda_train {

namespace {
int64_t offset_of(const ParamSet& ps, const std::string& name) { return ps.get(name).f32() - ps.flat(); }
}  // namespace

Core::Core(ImageClassifier& host, cuda::F32Math math)
    : host_(host), math_(math), gemm_(size_t(32) << 20, /*autotune*/ false), blas_(stream_.get(), math) {
  const ReparamOptions* ro = host.reparam_options();
  SAV_CHECK(ro && !ro->release_compat,
            "GPU training: the release compatibility mode is inference-only and cannot train");
  const ParamSet& ps = host.params();
  params_.resize(ps.numel()), grads_.resize(ps.numel()), m_.resize(ps.numel()), v_.resize(ps.numel());
  if (const ParamSet* bs = host.buffers(); bs && bs->numel()) buffers_.resize(bs->numel());
  std::vector<uint8_t> mask(ps.numel(), 0);
  for (size_t i = 0; i < ps.size(); ++i)
    if (ps.decay(i)) {
      const int64_t off = offset_of(ps, ps.name(i));
      std::fill(mask.begin() + off, mask.begin() + off + ps.tensor(i).numel(), uint8_t{1});
    }
  decay_mask_.resize(mask.size());
  decay_mask_.upload(mask);
  upload_host_state(nullptr, nullptr);
  m_.fill_bytes(0), v_.fill_bytes(0), grads_.fill_bytes(0);
  grow(ws64_, cuda::sumsq_workspace_doubles(int64_t(ps.numel())));
}

float* Core::par(const std::string& n) { return params_.get() + offset_of(host_.params(), n); }
float* Core::grd(const std::string& n) { return grads_.get() + offset_of(host_.params(), n); }
float* Core::buf(const std::string& n) { return buffers_.get() + offset_of(*host_.buffers(), n); }

std::unique_ptr<DLinear> Core::make_linear(LinearLayer& hl) {
  auto L = std::make_unique<DLinear>();
  const std::string& prefix = hl.prefix();
  L->host = &hl, L->kind = hl.kind(), L->K = hl.in_features(), L->F = hl.out_features();
  const size_t n = size_t(L->F) * L->K;
  switch (L->kind) {
    case LinearKind::dense:
      L->w = par(prefix + ".weight"), L->b = par(prefix + ".bias"), L->dw = grd(prefix + ".weight");
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
      L->aux_slot = n_moe_++;
      grow(aux_d_, n_moe_);
      break;
    }
  }
  host_linears_.push_back(&hl);
  return L;
}

void Core::reserve(int max_rows) { grow(ws64_, cuda::moe_lb_workspace_doubles(max_rows)); }

void Core::lin_forward(DLinear& L, float* y, const float* x, int M, bool train) {
  L.x = x, L.M = M, L.train = train;
  const int K = L.K, F = L.F;
  const ReparamOptions& o = *host_.reparam_options();
  const cudaStream_t st = stream();
  if (L.kind == LinearKind::dense) {
    gemm_.linear_f32_in(y, F, x, L.w, L.b, M, K, F, false, math_, st);
    return;
  }
  cuda::shift_decode_f32(L.wdec.get(), L.p, L.s, int64_t(F) * K, o.pmin, o.pmax, st);
  if (L.kind == LinearKind::shift) {
    gemm_.linear_f32_in(y, F, x, L.wdec.get(), L.sb, M, K, F, false, math_, st);
    return;
  }
  // MoE: both experts on every row, the router a third product, then route / combine on the device.
  const size_t mf = size_t(M) * F;
  float* y0 = grow(L.y0, mf);
  float* y1 = grow(L.y1, mf);
  gemm_.linear_f32_in(y0, F, x, L.w, L.b, M, K, F, false, math_, st);
  gemm_.linear_f32_in(y1, F, x, L.wdec.get(), L.sb, M, K, F, false, math_, st);
  blas_.xwt(grow(L.rl, size_t(M) * 2), x, L.rw, M, K, 2, 0.0f);
  const float noise_std = train ? o.noise_std : 0.0f;
  const float* noise = nullptr;
  if (noise_std > 0.0f) {  // the CPU's draw: noise_std * N(0,1), row-major (t, e), one generator in layer order
    L.noise_host.resize(size_t(M) * 2);
    for (float& z : L.noise_host) z = noise_std * noise_rng_.normal();
    SAV_CUDA_CHECK(cudaMemcpyAsync(grow(L.noise, size_t(M) * 2), L.noise_host.data(), sizeof(float) * M * 2,
                                   cudaMemcpyHostToDevice, st));
    noise = L.noise.get();
  }
  cuda::moe_train_route(grow(L.logits, size_t(M) * 2), grow(L.noisy, size_t(M) * 2), grow(L.probs, size_t(M) * 2),
                        grow(L.choice, size_t(M)), grow(L.scale, size_t(M)), L.rl.get(), L.rb, noise, M, o.gate, st);
  cuda::moe_train_combine(y, F, y0, y1, L.choice.get(), L.scale.get(), M, F, false, st);
  float* aux = aux_d_.get() + L.aux_slot;
  if (train && o.lb_coef > 0.0f) {
    SAV_CHECK(ws64_.size() >= cuda::moe_lb_workspace_doubles(M),
              "GPU training: reserve() was not called for " << M << " rows");
    cuda::moe_lb_forward(L.stats.get(), aux, L.probs.get(), L.logits.get(), L.noisy.get(), L.choice.get(), o.alpha[0],
                         o.alpha[1], M, noise_std, o.lb_coef, ws64_.get(), st);
  } else {
    SAV_CUDA_CHECK(cudaMemsetAsync(aux, 0, sizeof(float), st));
  }
}

void Core::lin_backward(DLinear& L, float* dx, float dx_beta, const float* dy) {
  SAV_CHECK(L.train, "GPU training: backward of " << L.host->prefix() << " after a forward without train=true");
  const int M = L.M, K = L.K, F = L.F;
  const ReparamOptions& o = *host_.reparam_options();
  const cudaStream_t st = stream();
  float* wsf = ws_.get();
  auto dense_part = [&](const float* g, float beta) {  // expert 0 / dense
    blas_.dytx(L.dw, g, L.x, M, K, F, 1.0f);
    cuda::colsum_f32(L.db, g, F, M, F, wsf, st);
    if (dx) blas_.dyw(dx, g, L.w, M, K, F, beta);
  };
  auto shift_part = [&](const float* g, float beta) {  // expert 1 / shift (straight-through to p and s)
    blas_.dytx(L.dwtmp.get(), g, L.x, M, K, F, 0.0f);
    cuda::shift_weight_backward_f32(L.dp, L.ds, L.dwtmp.get(), L.p, L.s, int64_t(F) * K, o.pmin, o.pmax, st);
    cuda::colsum_f32(L.dsb, g, F, M, F, wsf, st);
    if (dx) blas_.dyw(dx, g, L.wdec.get(), M, K, F, beta);
  };
  if (L.kind == LinearKind::dense) return dense_part(dy, dx_beta);
  if (L.kind == LinearKind::shift) return shift_part(dy, dx_beta);
  const size_t mf = size_t(M) * F;
  float* dy0 = grow(L.dy0, mf);
  float* dy1 = grow(L.dy1, mf);
  cuda::moe_train_split_backward(dy0, dy1, grow(L.dscale, M), dy, F, L.y0.get(), L.y1.get(), L.choice.get(),
                                 L.scale.get(), M, F, st);
  const float coef = o.lb_coef > 0.0f ? o.lb_coef : 0.0f;
  cuda::moe_train_router_backward(grow(L.dlogits, size_t(M) * 2), L.dscale.get(), L.probs.get(), L.logits.get(),
                                  L.noisy.get(), L.choice.get(), L.stats.get(), o.alpha[0], o.alpha[1], M, o.noise_std,
                                  coef, o.gate, st);
  dense_part(dy0, dx_beta);
  shift_part(dy1, 1.0f);
  blas_.dytx(L.drw, L.dlogits.get(), L.x, M, K, 2, 1.0f);
  cuda::colsum_f32(L.drb, L.dlogits.get(), 2, M, 2, wsf, st);
  if (dx) blas_.dyw(dx, L.dlogits.get(), L.rw, M, K, 2, 1.0f);
}

float Core::finish_forward(const float* logits_d, std::vector<float>& logits_h, size_t n) {
  logits_h.resize(n);
  SAV_CUDA_CHECK(cudaMemcpyAsync(logits_h.data(), logits_d, sizeof(float) * n, cudaMemcpyDeviceToHost, stream()));
  aux_h_.assign(n_moe_, 0.0f);
  if (n_moe_)
    SAV_CUDA_CHECK(
        cudaMemcpyAsync(aux_h_.data(), aux_d_.get(), sizeof(float) * n_moe_, cudaMemcpyDeviceToHost, stream()));
  stream_.sync();
  float total = 0.0f;
  for (float a : aux_h_) total += a;  // layer order, as the CPU models' sums
  return total;
}

void Core::upload_host_state(const ParamSet* m, const ParamSet* v) {
  stream_.sync();
  const ParamSet& ps = host_.params();
  params_.upload(ps.flat(), ps.numel());
  if (const ParamSet* bs = host_.buffers(); bs && bs->numel()) buffers_.upload(bs->flat(), bs->numel());
  if (m) m_.upload(m->flat(), m->numel());
  if (v) v_.upload(v->flat(), v->numel());
}

void Core::zero_grads() { SAV_CUDA_CHECK(cudaMemsetAsync(grads_.get(), 0, grads_.bytes(), stream())); }

float Core::optimizer_step(const AdamWOptions& opt, float lr, float clip, int64_t t) {
  const int64_t n = static_cast<int64_t>(grads_.size());
  double* out = grow(norm_out_, 2);
  cuda::sumsq_f64(out, grads_.get(), n, ws64_.get(), stream());
  double h[2];
  SAV_CUDA_CHECK(cudaMemcpyAsync(h, out, sizeof(h), cudaMemcpyDeviceToHost, stream()));
  stream_.sync();
  if (h[1] > 0) {  // name the first bad tensor, as the host trainer does
    grads_to_host();
    const int bad = first_nonfinite(host_.grads());
    SAV_THROW("gradient of '" << host_.grads().name(bad < 0 ? 0 : bad) << "' is not finite");
  }
  const float norm = static_cast<float>(std::sqrt(h[0]));
  const float gscale = (clip > 0.0f && norm > clip && std::isfinite(norm)) ? clip / (norm + 1e-6f) : 1.0f;
  const float bc1 = 1.0f - std::pow(opt.beta1, static_cast<float>(t));
  const float bc2 = 1.0f - std::pow(opt.beta2, static_cast<float>(t));
  cuda::adamw_step_f32(params_.get(), grads_.get(), m_.get(), v_.get(), decay_mask_.get(), n, gscale, lr,
                       opt.weight_decay, opt.beta1, opt.beta2, bc1, bc2, opt.eps, stream());
  return norm;
}

void Core::download_state(ParamSet* m, ParamSet* v) {
  stream_.sync();
  ParamSet& ps = host_.params();
  SAV_CUDA_CHECK(cudaMemcpy(ps.flat(), params_.get(), sizeof(float) * ps.numel(), cudaMemcpyDeviceToHost));
  if (m) SAV_CUDA_CHECK(cudaMemcpy(m->flat(), m_.get(), sizeof(float) * m->numel(), cudaMemcpyDeviceToHost));
  if (v) SAV_CUDA_CHECK(cudaMemcpy(v->flat(), v_.get(), sizeof(float) * v->numel(), cudaMemcpyDeviceToHost));
  for (LinearLayer* L : host_linears_) L->params_changed();  // the host layers' decoded-weight caches are stale
}

void Core::grads_to_host() {
  stream_.sync();
  ParamSet& gs = host_.grads();
  SAV_CUDA_CHECK(cudaMemcpy(gs.flat(), grads_.get(), sizeof(float) * gs.numel(), cudaMemcpyDeviceToHost));
}

}  // namespace sav::cuda_train

namespace sav {

CudaTrainModel::CudaTrainModel(ImageClassifier& host, cuda::F32Math math)
    : host_(host), core_(std::make_unique<cuda_train::Core>(host, math)) {}
CudaTrainModel::~CudaTrainModel() = default;
void CudaTrainModel::set_noise_seed(uint64_t seed) { core_->seed_noise(seed); }
void CudaTrainModel::init_random(Rng& rng) {
  host_.init_random(rng);
  core_->upload_host_state(nullptr, nullptr);
}
void CudaTrainModel::zero_grads() { core_->zero_grads(); }
float CudaTrainModel::optimizer_step(const AdamWOptions& opt, float lr, float clip, int64_t t) {
  return core_->optimizer_step(opt, lr, clip, t);
}
void CudaTrainModel::download_state(ParamSet* m, ParamSet* v) { core_->download_state(m, v); }
void CudaTrainModel::upload_state(const ParamSet* m, const ParamSet* v) { core_->upload_host_state(m, v); }
void CudaTrainModel::grads_host() { core_->grads_to_host(); }
cuda::F32Math CudaTrainModel::math() const { return core_->math(); }

}  // namespace sav
