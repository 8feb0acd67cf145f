// shiftaddvit CUDA backend: ViT / DeiT inference on one GPU, dense or ShiftAddViT, built from a CPU sav::Vit.
//
//   sav::Vit cpu(sav::vit_preset("deit_tiny_patch16_224"));
//   cpu.load(sav::Checkpoint::open("deit_tiny.safetensors"));
//   sav::ViTCuda net(cpu);                                  // copies the weights to the current device
//   net.forward(d_images, d_logits, B, stream);             // device pointers; a CUDA graph per batch size
//   net.forward_host(images, logits, B);                    // host pointers, synchronous
//   double ms = sav::vit_cuda_median_ms(net, 64, 50);       // graph replays timed with CUDA events
//
// Precision: matrices in bf16 (weights and the activations fed to products), f32 accumulation, the
// residual stream, LayerNorm statistics and the softmax in f32; GELU is cuBLASLt's tanh form (gemm.h) in
// dense, shift and masked MoE fc1 layers, the erf form (the CPU's) in stacked MoE fc1 layers (see below).
// Logits agree with the f32 CPU engine to about 1e-2 of max|logit| for dense models
// (tests/cuda/test_vit_cuda.cpp; converted models: see there).
//
// Dense block: LN1 -> qkv (bias epilogue, bf16) -> attention -> proj (bias + residual epilogue, f32) -> LN2
// -> fc1 (bias + GELU epilogue, bf16) -> fc2 (bias + residual epilogue, f32): 7 kernels. The embedding is
// im2col + a product + one kernel that assembles the tokens and applies block 0's LN1; the head normalises
// the class tokens only and runs one product.
//
// ShiftAddViT blocks (VitConfig::attn, mlp, attn_linear; METHOD.md), the whole forward still one CUDA graph
// with no host round trip:
//   shift linear  W = s * 2^p held twice: decoded once, at construction, to an exact bf16 matrix (every +-2^p is
//                 a bf16 value) for the same cuBLASLt product and epilogue as a dense linear, and as packed
//                 5-bit codes for the packed-mma kernel (ops/cuda/shift_gpu.h: decoded in registers, fed to
//                 mma.sync, the same epilogues). Both are "decode-to-matrix-unit" with the same products; per
//                 (layer shape, batch size) the faster one runs (set_shift_path, shift_paths). The bias of a
//                 bf16-output layer is the bf16-rounded one on both paths. ReparamOptions::int_kernel, a CPU
//                 path, is not used here;
//   MoE linear    stacked: one product with the stacked weight [W0; W1; router] into an f32 scratch, then one
//                 kernel that routes each token (top-1 argmax, ties -> mult expert), applies the gate
//                 (ReparamOptions::gate: straight-through = 1, prob = p) and the layer's epilogue
//                 (ops/cuda/ops.h moe_epilogue_forward); masked (straight-through gate only): one kernel routes
//                 each token (f32 router) and writes the doubled input [x s0 | x s1 | s0 s0 s1 s1], then one
//                 product with [W0 | W1 | biases] and the layer's epilogue fused in cuBLASLt (no f32 scratch;
//                 ops.h moe_route_mask_forward). The environment variable SAV_MOE_MASKED, read at construction,
//                 picks the masked layers: fc1 (default), all (every MoE linear with a contiguous output: fc1,
//                 fc2, proj, softmax qkv; not a Hamming block's to_qk / to_v) or off. Both forms compute both
//                 experts for every token;
//   Hamming attn  to_qk and to_v as one product on the stacked [W_qk; W_v] (dense / shift) or two MoE
//                 linears writing the two halves of one (M, 2C) buffer, then the fused Hamming kernel
//                 (ops/cuda/hamming.cu, 1 CTA per image and head at large batch, up to one per 16-token tile at
//                 small batch, with the hash weights prepared at load; ops/cuda/hamming_tiled.cu where N > 256),
//                 then proj;
//   LayerNorms    fused where a MoE kernel touches the same rows (C <= 1024): a masked fc1's LayerNorm runs in its
//                 router kernel, a stacked fc2's residual epilogue also writes the next block's LayerNorm (both
//                 bit for bit the separate kernels' results);
//   rows-fused    at small batch (ViTCudaRowFusion): proj + residual + LN2 + fc1's router and mask as one kernel,
//                 and a stacked fc2 + its residual epilogue + the next LN1 as one kernel (thread-block clusters
//                 per 16-row tile), where timing the whole forward shows them faster;
//   dependent     at small batch (ViTCudaDependentLaunch): the engine's own kernels launched with programmatic
//                 dependent launch (weights staged before they wait for their predecessor), where timing shows it
//                 faster.
//
// Legend: B batch, N tokens, C width, H heads, F mlp hidden, V classes, Cin channels, S image side,
// M = B*N rows.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "models/vit.h"

namespace sav {

// Which forward runs: `layered` = the kernels above (a CUDA graph per batch size); `fused` = the whole
// forward as one kernel launch of thread-block clusters (ops/cuda/vit_fused.h: every block Hamming attention,
// batch <= 8); `automatic` = fused for batches up to kVitFusedAutoMaxBatch when the model allows it, else layered.
// On the H200 the fused kernel is still slower than the layered path at every batch (bench/RESULTS.md: DeiT-Tiny
// ShiftAddViT batch 1 0.67 vs 0.60 ms), so automatic currently never picks it (kVitFusedAutoMaxBatch = 0).
enum class ViTCudaPath { automatic, layered, fused };
constexpr int kVitFusedAutoMaxBatch = 0;

// Rows-fused kernels at small batch (ops/cuda/ops.h rows_linear_ln_mask_forward, rows_moe_residual_ln_forward,
// hamming_attention_proj_ln_mask_forward): where a cluster of at least 4 CTAs per 16-row tile fits the SMs (batch 1-2
// of DeiT's 197 tokens) and the weights fit shared memory, three forms of the layered path can run fused: "proj" (a
// proj linear, dense or shift on the automatic shift path, with its residual, then a masked MoE fc1's LayerNorm +
// router + mask: one kernel instead of two), "ham" (the same inside a Hamming block's attention kernel, for C <= 256
// and one 16-token tile per CTA: one kernel instead of three), "blk" (to_qk / to_v, the Hamming attention and all of
// "ham" in one cluster kernel per image, ops/cuda/ops.h hamming_block_forward: head size 64, up to 3 heads), "fc2"
// (a stacked MoE fc2 with its residual routing epilogue and the next block's LayerNorm) and "mlp" (a masked MoE fc1
// with its GELU and all of "fc2" in one cluster kernel per row tile, ops/cuda/ops.h mlp_block_forward: C <= 192, F a
// multiple of 128 up to 1024). Their products sum in their
// own f32 order (the last bits differ from cuBLASLt's). `automatic` (default): the first forward of a batch size
// (eager or graph) times a whole forward (a CUDA graph) with each set of the forms fused and keeps the fastest (on the
// H200 the fused proj wins at DeiT-Small's width and loses at DeiT-Tiny's: bench/RESULTS.md); a forward enqueued inside
// the caller's own stream capture before that runs them unfused. `off` / `on` force them.
enum class ViTCudaRowFusion { automatic, off, on };
// Dependent launch at small batch: the engine's own kernels (Hamming, the MoE row kernels, LayerNorms, the rows-fused
// and packed shift kernels) launched with programmatic stream serialization (ops/cuda/common.h
// DependentLaunchScope), so each may start while its predecessor runs, stage its weights, and wait for the
// predecessor's output. Dependent launch alone changes no arithmetic. cuBLASLt's kernels let no successor start early,
// so `small_products` also runs the layer products that cuBLASLt would run (dense, decoded shift, MoE stacked /
// masked) by the engine's small-M kernel (ops/cuda/small_gemm.h; another f32 summation order, the last bits differ).
// `automatic` (default): off and on tried with the row-fusion sets above by timing whole forwards, for M = B*N <=
// kVitDependentAutoMaxRows; the others force a mode (small_products is never chosen automatically: slower than cuBLASLt
// at DeiT's sizes on the H200, bench/RESULTS.md).
enum class ViTCudaDependentLaunch { automatic, off, on, small_products };
constexpr int kVitDependentAutoMaxRows = 1024;
// One set of forms the automatic choice timed: fused forms (ham: a Hamming block's proj + LN2 + router in its attention
// kernel; blk: also its to_qk / to_v, the attention half of the block as one kernel, ops/cuda/ops.h
// hamming_block_forward, where it fits: DeiT-Tiny's width, a cluster per image; with dependent launch it also runs
// the patch embedding as one kernel, ops/cuda/ops.h patch_embed_ln_forward, and the head by the small-M product, both
// staging their weights before the wait, both another f32 summation order than cuBLASLt's; proj: the other proj-fusable
// blocks', or all when ham is off; mlp: the MLP half of the block as one kernel, ops/cuda/ops.h mlp_block_forward;
// pmlp: with blk and mlp, the proj, residual, LN2 and router moved from the attention kernel into the MLP kernel,
// hamming_block_attention_forward + mlp_block_proj_forward), dependent launch, the forward's median microseconds (a
// graph replay), and whether it was kept.
struct ViTCudaRowChoice {
  bool proj = false, fc2 = false, dependent = false, ham = false, blk = false, mlp = false, pmlp = false;
  float forward_us = -1.0f;
  bool chosen = false;
};

// Which product runs a shift linear (LinearKind::shift) of the layered path (ops/cuda/shift_gpu.h):
// `cublas_decoded` = cuBLASLt on the weights decoded once to bf16; `packed_mma` = the packed 5-bit codes
// decoded in registers and fed to mma.sync (3.2x less weight traffic; the same products, another f32 summation
// order); `automatic` = per (layer shape, M = B*N) the faster of the two, timed once on the first eager forward
// of a batch size (on the first layer of each shape and epilogue; the others of that shape follow it). The int
// (MatShift) path is not offered: it rounds activations to fixed point (other numbers) and has no bf16 / GELU /
// residual epilogues.
enum class ViTCudaShiftPath { automatic, cublas_decoded, packed_mma };

// One shift linear's product for one batch size: layer name, path ("cublas_decoded" | "packed_mma"), and the
// median microseconds the automatic choice measured per path for the layer's shape (negative: not timed: forced,
// or no packed form).
struct ViTCudaShiftChoice {
  std::string layer, path;
  float cublas_us = -1.0f, packed_us = -1.0f;
};

class ViTCuda {
 public:
  // Copies the parameters (and the KSH buffers) of `model` to the current CUDA device, decoding shift
  // weights and stacking MoE weights, and reads the model's ReparamOptions (gate mode, shift exponent
  // range) and SAV_MOE_MASKED (above). Throws sav::Error for sizes the kernels do not cover (softmax blocks: N <= 256
  // and head size <= 64; C <= 1024; Hamming blocks: ops/cuda/hamming_tiled.h hamming_tiled_supports), for
  // ReparamOptions::release_compat (a CPU-only mode) and for an unknown SAV_MOE_MASKED, before touching the device.
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

  // Forces or frees the choice of forward (default automatic). fused throws if the model is outside the kernel.
  void set_path(ViTCudaPath path);
  // "fused" or "layered": what a forward of B images runs.
  const char* path_name(int B) const;
  // Whether the fused kernel can run a forward of B images of this model.
  bool fused_supported(int B) const;
  // One fused forward of B random images with timestamps at every phase boundary: a per-phase report
  // (cuda::vit_fused_trace). Throws if the fused kernel does not cover B.
  std::string fused_trace(int B);

  // Rows-fused kernels at small batch (ops/cuda/ops.h rows_linear_ln_mask_forward, rows_moe_residual_ln_forward;
  // ViTCudaRowFusion above). Drops the captured graphs.
  void set_row_fusion(ViTCudaRowFusion mode);
  ViTCudaRowFusion row_fusion() const;
  // Dependent launch and the small-M products (ViTCudaDependentLaunch above). Drops the captured graphs and the
  // automatic choices.
  void set_dependent_launch(ViTCudaDependentLaunch mode);
  ViTCudaDependentLaunch dependent_launch() const;
  // The automatic choice's timings (row fusion and dependent launch) for forwards of B images (empty before the first
  // forward of B, when both modes are forced, or when nothing is fusable at B and dependent launch is not tried).
  std::vector<ViTCudaRowChoice> row_fusion_choices(int B) const;

  // Forces or frees the shift linears' product (default automatic); drops the captured graphs (the next
  // forward of each batch size re-captures).
  void set_shift_path(ViTCudaShiftPath path);
  ViTCudaShiftPath shift_path() const;
  // Shift linears of the layered path, in forward order: 0 for models without shift linears.
  int shift_layer_count() const;
  // (layer, path) of every shift linear for a forward of B images: the forced path, or what the automatic choice
  // picked (the first forward of B times them), or "rows_fused" for a proj run in a fused kernel (rows-fused or
  // Hamming; set_row_fusion). Empty when the model has no shift linears, when the automatic
  // choice has not run for B yet, or when B runs the fused kernel (path_name(B) == "fused"). Layer names: the
  // checkpoint prefix ("blocks.3.mlp.fc1"); a Hamming block's stacked to_qk and to_v (one product, one packed
  // weight of 2C rows) is "blocks.{i}.attn.to_qk+to_v". Shift linears stay on (and report) cublas_decoded in
  // every mode when the model's exponent range (ReparamOptions pmin, pmax) does not fit the packed form
  // (ops/cuda/shift_gpu.h shift_packed_supports).
  std::vector<std::pair<std::string, std::string>> shift_paths(int B) const;
  // The same with the timings of the automatic choice.
  std::vector<ViTCudaShiftChoice> shift_choices(int B) const;

  size_t weight_bytes() const;  // device bytes of the parameters (the shift linears' packed forms included)
  int graph_count() const;      // captured graphs (one per batch size)

  // MoE layers in forward order, each with the expert (0 mult, 1 shift) of every token row (B*N, row
  // b*N + n) of the last forward (eager or replay): for routing reports and tests. Synchronises the device.
  std::vector<std::pair<std::string, std::vector<int8_t>>> moe_choices() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Median wall time in ms of one forward at `batch` (graph replay, CUDA events around each replay, after
// warm-up), on random images; iters >= 1.
double vit_cuda_median_ms(ViTCuda& net, int batch, int iters);

}  // namespace sav
