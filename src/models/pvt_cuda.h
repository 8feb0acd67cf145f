// shiftaddvit CUDA backend: PVTv2 inference on one GPU, dense or ShiftAddViT, built from a CPU sav::Pvt
// (timm checkpoints, engine checkpoints, and the public release's checkpoints in its compatibility mode).
//
//   sav::Pvt cpu(sav::pvt_preset("pvt_v2_b0"));
//   cpu.load(sav::Checkpoint::open("pvt_v2_b0.safetensors"));
//   sav::PvtCuda net(cpu);                                  // copies the weights to the current device
//   net.forward(d_images, d_logits, B, stream);             // device pointers; a CUDA graph per batch size
//   net.forward_host(images, logits, B);                    // host pointers, synchronous
//   double ms = sav::pvt_cuda_median_ms(net, 64, 50);
//
// Precision: activations, weights and statistics in f32 throughout. Products run through cuBLASLt with
// IEEE f32 math (PvtCudaOptions::math = f32, the default: the CPU engine's results up to summation order,
// so timm's and the release's outputs are reproduced within 1e-4) or TF32 tensor cores (math = tf32:
// faster products, inputs rounded to 10-bit mantissas).
//
// Per stage: NCHW -> NHWC (stage 0) | im2col -> product (+bias) -> LayerNorm (the patch embedding); blocks;
// the stage norm. Block (pre-norm, residual stream x in f32):
//   softmax  LN1 -> q; [im2col -> sr product -> LN] -> kv; attention over the reduced tokens
//            (ops/cuda/pvt_ops.h attention_q_kv_f32) -> proj (+bias, += x in the product's epilogue)
//   Hamming  LN1 -> to_qk, to_v (into the two halves of one (M, 2C) buffer) -> the multi-CTA Hamming core
//            over all tokens (ops/cuda/hamming_tiled.h) -> proj (+= x)
//   MLP      LN2 -> fc1 -> 3x3 depthwise conv + bias + GELU (one kernel) -> fc2 (+= x)
// Linears: dense; shift (the exact weights s * 2^p decoded once, at construction, then a dense product:
// "decode-to-matrix-unit"); MoE (one product with the stacked [W_mult; W_shift; W_router] into an f32
// scratch, then one kernel that routes every token (argmax, ties -> mult), applies the gate and the bias
// and writes or accumulates the output: no host round trip, the whole forward is one CUDA graph).
// Release compatibility (ReparamOptions::release_compat, nn/linear_layer.h): shift experts read the
// input rounded to Q16.16 (a kernel before their product, run as a separate product for MoE layers) with
// the bias rounded likewise, the gate is 1, and MoE outputs pass through log(exp(y) + eps).
//
// Legend: B batch, g grid side of a stage, N = g*g tokens, Nk reduced tokens, C width, H heads, F mlp hidden,
// V classes, M = B*N rows.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "models/pvt.h"
#include "ops/cuda/gemm.h"

namespace sav {

struct PvtCudaOptions {
  cuda::F32Math math = cuda::F32Math::f32;
};

class PvtCuda {
 public:
  // Copies the parameters (and KSH buffers) of `model` to the current CUDA device and reads its
  // ReparamOptions (gate mode, shift exponent range, release compatibility). Throws sav::Error for sizes
  // the kernels do not cover, before touching the device.
  explicit PvtCuda(const Pvt& model, PvtCudaOptions opt = {});
  ~PvtCuda();
  PvtCuda(const PvtCuda&) = delete;
  PvtCuda& operator=(const PvtCuda&) = delete;

  const PvtConfig& config() const;
  // images (B,Cin,S,S) f32, logits (B,V) f32, device pointers; graph captured on first use of a batch size.
  void forward(const float* images, float* logits, int B, cudaStream_t stream);
  // The same, kernel by kernel (no graph).
  void forward_eager(const float* images, float* logits, int B, cudaStream_t stream);
  // Host pointers; synchronous. With an activation tap set, runs eagerly and reports the tap points of
  // sav::Pvt (per stage "embed" and "out", per block "attn" and "xout"; host copies, valid during the call).
  void forward_host(const float* images, float* logits, int B);
  void set_activation_tap(Pvt::ActivationTap tap);

  size_t weight_bytes() const;
  int graph_count() const;
  // MoE layers in forward order with the expert (0 mult, 1 shift) of every token row of the last forward.
  std::vector<std::pair<std::string, std::vector<int8_t>>> moe_choices() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

double pvt_cuda_median_ms(PvtCuda& net, int batch, int iters);

}  // namespace sav
