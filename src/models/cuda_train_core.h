// shiftaddvit CUDA backend: what every GPU-trained model shares (internal to the models' .cu files): the flat
// device copies of a host model's parameters, gradients and AdamW moments, the linear layers (dense, shift, MoE
// with router noise and the load-balancing loss) forward and backward, and the DeviceTrainer work (clipping,
// AdamW, state transfers). VitCudaTrain and PvtCudaTrain add their own op sequences on top.
//
//   cuda_train::Core core(host_model, math);             // uploads params() and buffers()
//   auto fc1 = core.make_linear(*host_model.find_linear("blocks.0.mlp.fc1"));
//   core.lin_forward(*fc1, y, x, M, /*train*/ true);     // y (M,F); x kept for backward
//   core.lin_backward(*fc1, dx, /*dx_beta*/ 0.0f, dy);   // dx (M,K) = (beta 0) or += (beta 1)
//   float aux = core.finish_forward();                   // the MoE layers' aux losses, summed on the host
//
// Host parameter layout: the device arrays mirror ParamSet::flat() element for element, so a parameter's
// device pointer is the device base + its host offset.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"
#include "models/model.h"
#include "nn/linear_layer.h"
#include "ops/cuda/blas.h"
#include "ops/cuda/common.h"
#include "ops/cuda/gemm.h"

namespace sav::cuda_train {

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
  LinearLayer* host = nullptr;
  LinearKind kind = LinearKind::dense;
  int K = 0, F = 0;
  float *w = nullptr, *b = nullptr, *dw = nullptr, *db = nullptr;                                 // dense / expert 0
  float *p = nullptr, *s = nullptr, *sb = nullptr, *dp = nullptr, *ds = nullptr, *dsb = nullptr;  // shift / expert 1
  float *rw = nullptr, *rb = nullptr, *drw = nullptr, *drb = nullptr;                             // router
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

class Core {
 public:
  Core(ImageClassifier& host, cuda::F32Math math);
  ImageClassifier& host() { return host_; }
  cuda::F32Math math() const { return math_; }
  cudaStream_t stream() const { return stream_.get(); }
  cuda::Gemm& gemm() { return gemm_; }
  cuda::Blas& blas() { return blas_; }
  void seed_noise(uint64_t seed) { noise_rng_.seed_with(seed); }

  float* par(const std::string& name);  // device parameter / gradient / buffer by checkpoint name
  float* grd(const std::string& name);
  float* buf(const std::string& name);

  // Linears are numbered for their aux-loss slots in creation order: create them in the host model's
  // linears() order so the host sums the aux losses as the CPU model does.
  std::unique_ptr<DLinear> make_linear(LinearLayer& host_layer);
  void lin_forward(DLinear& L, float* y, const float* x, int M, bool train);
  void lin_backward(DLinear& L, float* dx, float dx_beta, const float* dy);

  // Work space (floats) for the ops' reductions; grown in the model's ensure() before any kernel uses it.
  float* ws(size_t floats) { return grow(ws_, floats); }
  float* ws() const { return ws_.get(); }
  void reserve(int max_rows);  // per-forward arrays for up to max_rows rows in a MoE layer
  // Starts the copies of the logits (n floats from the device) and of the aux losses, waits, and returns the
  // aux loss summed in layer order.
  float finish_forward(const float* logits_d, std::vector<float>& logits_h, size_t n);
  void upload_host_state(const ParamSet* m, const ParamSet* v);

  // DeviceTrainer
  void zero_grads();
  float optimizer_step(const AdamWOptions& opt, float lr, float clip, int64_t t);
  void download_state(ParamSet* m, ParamSet* v);
  void grads_to_host();

 private:
  ImageClassifier& host_;
  cuda::F32Math math_;
  cuda::Stream stream_;
  cuda::Gemm gemm_;
  cuda::Blas blas_;
  DeviceBuffer<float> params_, grads_, m_, v_, buffers_;
  DeviceBuffer<uint8_t> decay_mask_;
  DeviceBuffer<float> ws_, aux_d_;
  DeviceBuffer<double> ws64_, norm_out_;
  std::vector<float> aux_h_;
  std::vector<LinearLayer*> host_linears_;
  int n_moe_ = 0;
  Rng noise_rng_{0};
};

}  // namespace sav::cuda_train
