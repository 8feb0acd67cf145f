// shiftaddvit CUDA backend: the whole ShiftAddViT (ViT / DeiT) forward pass at small batch as ONE kernel launch of
// thread-block clusters, for batch-1 latency.
//
//   using namespace sav::cuda;
//   FusedVitModel fm = ...;                       // device pointers of the weights (ViTCuda builds it)
//   if (vit_fused_supports(fm.dims, B)) {
//     FusedVitWorkspace ws(fm.dims, B);          // activations + exchange slots for up to B images
//     vit_fused_forward(fm, B, images, logits, ws, stream);   // one kernel launch, no host round trip
//   }
//
// Why: at batch 1 DeiT-Tiny's 197 tokens make every product a few microseconds of work, so the layered
// forward (about 9 kernels per block, each a launch plus a ramp-up and a tail) is latency: ~0.9 us per graph
// node and 3-5 us per small kernel (../shared/docs/ANCHORS.md). A grid-wide barrier per dependent step is no better
// (the previous version of this kernel: 5 barriers per block, 0.78 ms).
//
// Work split: one cluster of CS CTAs (8 at batch 1: 13 tiles x 8 = 104 CTAs on the H200) owns one tile of 16
// token rows of one image for the whole forward; the tile's residual rows live in the shared memory of each CTA of
// the cluster; a product's output columns are split over the cluster and gathered through distributed shared
// memory, so a tile's row-local chain (attention output, proj, LN2, fc1, fc2, LN1, qk/v) never leaves the cluster.
// Only the two per-image reductions of Hamming attention cross tiles, through epoch-tagged words in global memory
// (one L2 round trip, no grid barrier). Per block:
//   1  LN1 -> [to_qk | to_v] column slices (bf16 mma) -> q, v of the tile in every CTA; v rows to global memory
//   2  KSH: q / |q|, D = |q - a_j|^2 (every CTA); rank 0 publishes the tile's sum of D per head
//   3  wait for every tile of the image: sigma = mean D; the v rows of the 4 neighbouring tokens each side
//   4  k = exp(-D / 2 sigma) - mu, y = A k, codes; this CTA's columns of the tile's KV partial (sum of v rows per
//      set bit) published
//   5  wait for every tile's KV partial of this CTA's columns, add in tile order, / pi -> KV in every CTA
//   6  attention output (0.5 v + sum of KV rows of set bits, / |.|, + the 9-tap token conv of v) -> proj slice
//      + bias + residual -> x in every CTA
//   7  LN2 -> fc1 slice + GELU -> hidden in every CTA
//   8  fc2 slice + bias + residual -> x in every CTA
// then the final LayerNorm of the class row and the classifier (classes split over the cluster).
// MoE linears (METHOD.md section 3): every CTA routes the tile's rows (f32 router weights, bf16 inputs); the
// slice computes both experts' columns (at batch 1 the products are latency, not work) and the epilogue keeps the
// chosen one: (y_e + b_e) * gate, as moe_epilogue_forward.
// Deterministic: every sum has a fixed order independent of the cluster size and of the batch (reruns are
// bit-identical; a batch equals its single-image forwards bit for bit).
//
// Numerics differ from the layered path (ViTCuda's cuBLASLt forward) only by summation order and the router
// (f32 weights here, a hi/lo bf16 split there): logits agree to ~1e-2 of max|logit| (the Hamming codes
// amplify order noise near y = 0), see tests/cuda/test_vit_fused.cpp.
//
// Legend: B batch, N tokens, C width, H heads, d = C/H head size (64), F mlp hidden, b hash bits, m anchors,
// V classes, Cin channels, S image side, p patch, P = (S/p)^2 patches.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "ops/cuda/common.h"

namespace sav::cuda {

// One linear layer's device weights. Dense and shift (decoded to exact bf16) layers: w0, bias b16 (bf16
// outputs) or b32 (f32 outputs). MoE: w0 / w1 the experts (shift decoded), b32 / b1 their f32 biases, wr (2,K)
// f32 and br (2) the router, choice (rows) receives the expert of each row (nullable).
struct FusedLinear {
  int K = 0, F = 0;
  bool moe = false;
  const bf16* w0 = nullptr;
  const bf16* w1 = nullptr;
  const bf16* b16 = nullptr;
  const float* b32 = nullptr;
  const float* b1 = nullptr;
  const float* wr = nullptr;
  const float* br = nullptr;
  int8_t* choice = nullptr;
};

// A Hamming-attention block. qk / v: to_qk and to_v (C -> C each); with dense or shift linears ViTCuda stacks
// them: qk then has F = 2C (columns [0, C) q, [C, 2C) v) and v.F == 0. KSH buffers anchors (H,m,d), mu (H,m),
// A (H,b,m); conv (H,9).
struct FusedBlock {
  const float *ln1_w = nullptr, *ln1_b = nullptr, *ln2_w = nullptr, *ln2_b = nullptr;
  FusedLinear qk, v, proj, fc1, fc2;
  const float *anchors = nullptr, *mu = nullptr, *A = nullptr, *conv = nullptr;
};

struct FusedVitDims {
  int N = 0, C = 0, H = 0, F = 0, nbits = 16, m = 25, depth = 0, Cin = 3, S = 224, patch = 16, V = 1000;
  float eps = 1e-6f;
};

struct FusedVitModel {
  FusedVitDims dims;
  int gate = 0;                   // MoeGate (ops.h)
  const bf16* patch_w = nullptr;  // (C, Cin*p*p)
  const float *patch_b = nullptr, *cls = nullptr, *pos = nullptr, *norm_w = nullptr, *norm_b = nullptr;
  const bf16* head_w = nullptr;  // (V, C)
  const float* head_b = nullptr;
  const FusedBlock* blocks = nullptr;  // DEVICE array of dims.depth blocks
};

// Largest batch the fused kernel takes (every tile's cluster must be resident at once; larger batches fill the GPU
// through the layered path anyway).
constexpr int kFusedMaxBatch = 8;

// Whether the fused kernel covers these sizes: every block Hamming attention with head size 64, H <= 12,
// F % 64 == 0, Cin*p*p % 64 == 0, max(F, Cin*p*p) <= 1536, b <= 64, m <= 64, N >= 16, 1 <= B <= kFusedMaxBatch;
// with a device, also that the shared memory fits and the B * ceil(N/16) clusters can be resident at once.
bool vit_fused_supports(const FusedVitDims& d, int B);

// Activations and exchange slots of the fused forward for up to `capacity` images.
class FusedVitWorkspace {
 public:
  FusedVitWorkspace() = default;
  void ensure(const FusedVitDims& d, int capacity);  // grows (contents lost); counters zeroed
  int capacity() const { return capacity_; }
  // The residual stream x (B*N, C) f32, for tests.
  const float* x() const { return x_.get(); }

 private:
  friend void vit_fused_forward(const FusedVitModel&, int, const float*, float*, FusedVitWorkspace&, cudaStream_t,
                                unsigned long long*);
  int capacity_ = 0;
  DeviceBuffer<float> x_;
  DeviceBuffer<bf16> vg_;
  DeviceBuffer<unsigned long long> sig_, kvx_;
  DeviceBuffer<unsigned> ctl_;
};

// logits (B,V) f32 = the model applied to images (B,Cin,S,S) f32 (device pointers), one cooperative kernel
// launch on `stream` (capturable into a CUDA graph). Throws sav::Error if unsupported or ws is too small.
// trace: nullptr, or room for the phase timestamps (vit_fused_trace).
void vit_fused_forward(const FusedVitModel& m, int B, const float* images, float* logits, FusedVitWorkspace& ws,
                       cudaStream_t stream, unsigned long long* trace = nullptr);

// One forward with %globaltimer stamps of CTA 0 after each step; returns the time per step (1-8 above) averaged
// over the blocks, the embedding and the head, in us. Synchronises the stream.
std::string vit_fused_trace(const FusedVitModel& m, int B, const float* images, float* logits, FusedVitWorkspace& ws,
                            cudaStream_t stream);

}  // namespace sav::cuda
