// shiftaddvit CUDA backend: dense ViT / DeiT inference on one GPU, built from a CPU sav::Vit.
//
//   sav::Vit cpu(sav::vit_preset("deit_tiny_patch16_224"));
//   cpu.load(sav::Checkpoint::open("deit_tiny.safetensors"));
//   sav::ViTCuda net(cpu);                                  // copies the weights to the current device
//   net.forward(d_images, d_logits, B, stream);             // device pointers; a CUDA graph per batch size
//   net.forward_host(images, logits, B);                    // host pointers, synchronous
//   double ms = sav::vit_cuda_median_ms(net, 64, 50);       // graph replays timed with CUDA events
//
// Precision: matrices in bf16 (weights and the activations fed to products), f32 accumulation, the
// residual stream, LayerNorm statistics and the softmax in f32; GELU is cuBLASLt's tanh form (gemm.h).
// Logits agree with the f32 CPU engine to about 1e-2 of max|logit| (tests/cuda/test_vit_cuda.cpp).
//
// Per block: LN1 -> qkv (bias epilogue, bf16) -> attention -> proj (bias + residual epilogue, f32) -> LN2
// -> fc1 (bias + GELU epilogue, bf16) -> fc2 (bias + residual epilogue, f32): 7 kernels. The embedding is
// im2col + a product + one kernel that assembles the tokens and applies block 0's LN1; the head normalises
// the class tokens only and runs one product.
//
// Legend: B batch, N tokens, C width, H heads, F mlp hidden, V classes, Cin channels, S image side.
#pragma once

#include <cuda_runtime.h>

#include <memory>

#include "models/vit.h"

namespace sav {

class ViTCuda {
 public:
  // Copies the dense parameters of `model` to the current CUDA device. Throws sav::Error for a ShiftAddViT
  // (non-dense) configuration or sizes the kernels do not cover (N <= 256, head size <= 64, C <= 1024),
  // before touching the device.
  explicit ViTCuda(const Vit& model);
  ~ViTCuda();
  ViTCuda(const ViTCuda&) = delete;
  ViTCuda& operator=(const ViTCuda&) = delete;

  const VitConfig& config() const;
  // images (B,Cin,S,S) f32, logits (B,V) f32, both device pointers. The first call for a batch size runs
  // the kernels once and captures a CUDA graph; later calls replay it (a call with other pointers
  // re-captures). Enqueued on `stream`, asynchronous.
  void forward(const float* images, float* logits, int B, cudaStream_t stream);
  // The same work launched kernel by kernel, without a graph.
  void forward_eager(const float* images, float* logits, int B, cudaStream_t stream);
  // images (B,Cin,S,S) and logits (B,V) in host memory; synchronous.
  void forward_host(const float* images, float* logits, int B);

  size_t weight_bytes() const;  // device bytes of the parameters
  int graph_count() const;      // captured graphs (one per batch size)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Median wall time in ms of one forward at `batch` (graph replay, CUDA events around each replay, after
// warm-up), on random images; iters >= 1.
double vit_cuda_median_ms(ViTCuda& net, int batch, int iters);

}  // namespace sav
