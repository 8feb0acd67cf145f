// shiftaddvit CUDA backend: the whole ShiftAddViT (ViT / DeiT) forward pass at small batch as ONE persistent
// kernel (cooperative launch, grid-wide barriers between the phases of a block), for batch-1 latency.
//
//   using namespace sav::cuda;
//   FusedVitModel fm = ...;                       // device pointers of the weights (ViTCuda builds it)
//   if (vit_fused_supports(fm.dims, kinds, B)) {
//     FusedVitWorkspace ws(fm.dims, B);          // activations + scratch for up to B images
//     vit_fused_forward(fm, B, images, logits, ws, stream);   // one kernel launch, no host round trip
//   }
//
// Why: at batch 1 DeiT-Tiny's 197 tokens make every product a few microseconds of work, so the layered
// forward (about 9 kernels per block, each a launch plus a ramp-up and a tail) is latency: ~0.9 us per graph
// node and 3-5 us per small kernel (../shared/docs/ANCHORS.md). Here one CTA per SM (512 threads) stays resident
// for the whole forward and walks through the phases below; a phase's tiles are spread over the CTAs and a
// grid barrier (cooperative groups) separates phases that depend on each other across tiles.
//
// Status (bench/RESULTS.md): on the H200 this kernel runs DeiT-Tiny ShiftAddViT at batch 1 in 0.78 ms against the
// layered path's 0.60 ms, so ViTCuda's automatic choice keeps the layered path; vit_fused_trace shows where each
// phase's time goes.
//
// Phases (M = B*N token rows; a row tile is 16 rows, row = b*N + n):
//   E   embedding: im2col of 16 patches built in shared memory from the f32 images -> bf16, the patch
//       product, + bias + pos (class rows: cls + pos) -> x (f32 residual stream).
//   per block:
//   1   LN1 (x rows, in the tile's prologue) -> [to_qk | to_v] product -> qkv (bf16). A to_qk tile is one
//       head's 64 columns: its epilogue also normalises q, computes the distances D (m anchors) and each
//       row's sum of D (double) for the KSH hash.
//   2   per (image, head, 16 tokens): sigma from the row sums (double, fixed order), k = exp(-D/2sigma) - mu,
//       y = A k, the codes; the chunk's MatAdd #1 partial (sum of v rows per set bit); the last chunk of a
//       head to finish (atomic ticket) adds the partials in chunk order and scales by 1/pi -> KV.
//   3   attention output of 16 rows built in the prologue (z = 0.5 v + sum of KV rows of set bits, z/|z|,
//       + the 9-tap token conv of v) -> proj product + bias + residual -> x.
//   4   LN2 prologue -> fc1 (+ GELU) -> hid (bf16).
//   5   hid rows -> fc2 + bias + residual -> x.
//   H   head: LayerNorm of the class rows, the classifier (a warp per class).
// MoE linears (METHOD.md section 3): the router (f32 weights, from the bf16 inputs) picks the expert of
// each row in the tile's prologue; the tile computes both experts' columns (the tile is small; at batch 1 the
// products are latency) and the epilogue keeps the chosen one: (y_e + b_e) * gate, as moe_epilogue_forward.
// Products: bf16 x bf16 on the tensor cores (mma.sync m16n8k16, f32 accumulation), a tile's weights staged
// from L2 by cp.async into a shared-memory ring before its inputs exist. Everything else in f32 (norms and sigma in
// double, as the CPU). Deterministic: every sum has a fixed order, no float atomics; reruns are bit-identical.
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

// Largest batch the fused kernel takes (its shared-memory staging of the class rows and of KV assumes few
// images; larger batches fill the GPU through the layered path anyway).
constexpr int kFusedMaxBatch = 8;

// Whether the fused kernel covers these sizes (pure of the device): every block Hamming attention with head
// size 64, C % 64 == 0 and C <= 768, F % 64 == 0, Cin*p*p % 64 == 0, max(C, F, Cin*p*p) <= 1536, b <= 64,
// m <= 64, N >= 16, 1 <= B <= kFusedMaxBatch; and the shared memory fits (needs a device to check).
bool vit_fused_supports(const FusedVitDims& d, int B);

// Activations and scratch of the fused forward for up to `capacity` images.
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
  DeviceBuffer<float> x_, dist_, kvp_, kv_;
  DeviceBuffer<bf16> qkv_, hid_;
  DeviceBuffer<double> rowsum_;
  DeviceBuffer<unsigned long long> codes_;
  DeviceBuffer<unsigned> tickets_;
};

// logits (B,V) f32 = the model applied to images (B,Cin,S,S) f32 (device pointers), one cooperative kernel
// launch on `stream` (capturable into a CUDA graph). Throws sav::Error if unsupported or ws is too small.
// trace: nullptr, or room for the phase timestamps (vit_fused_trace).
void vit_fused_forward(const FusedVitModel& m, int B, const float* images, float* logits, FusedVitWorkspace& ws,
                       cudaStream_t stream, unsigned long long* trace = nullptr);

// One forward with %globaltimer stamps at every phase boundary; returns a report per phase kind (E, 1-5, H):
// the slowest CTA's work and the barrier after it, in us, averaged over the blocks. Synchronises the stream.
std::string vit_fused_trace(const FusedVitModel& m, int B, const float* images, float* logits, FusedVitWorkspace& ws,
                            cudaStream_t stream);

}  // namespace sav::cuda
