// ViT / DeiT inference on one GPU, dense or ShiftAddViT: weights uploaded once (shift weights decoded, MoE
// weights stacked), activations sized for the largest batch seen, a CUDA graph per batch size. See
// vit_cuda.h.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "models/cuda_model.h"
#include "models/vit_cuda.h"
#include "ops/cpu/shift_linear.h"
#include "ops/cuda/common.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/hamming_tiled.h"
#include "ops/cuda/ops.h"
#include "ops/cuda/shift_gpu.h"
#include "ops/cuda/small_gemm.h"
#include "ops/cuda/vit_fused.h"

namespace sav {

using cuda::bf16;
using cuda::DeviceBuffer;

namespace {

using cuda::WeightPool;
constexpr size_t kNone = cuda::kNoOffset;

// One linear layer on the device. dense / shift: w (F,K) bf16 (shift decoded, exact) with a bias in the
// epilogue's type (b16 for bf16 outputs, b32 for f32 outputs). MoE: w the stacked (Fs,K) weight
// (moe_stack_weights), f32 biases b0, b1 (F) and br (2), the f32 router wr (2,K), and its slot in the
// routing-choice buffer; a MoE layer that runs masked (straight-through gate, MoeMasked) also wa = W_aug (F,Ka)
// (moe_masked_weights).
// Shift: also its index in the shift-layer list (packed form, path choices) and, for bf16 outputs, bp = the
// bf16-rounded bias in f32 (the packed kernel's bias: the values the cuBLASLt epilogue adds).
struct LinOff {
  LinearKind kind = LinearKind::dense;
  int K = 0, F = 0, Fs = 0, Ka = 0, moe_slot = -1, shift = -1;
  size_t w = kNone, b16 = kNone, b32 = kNone, b0 = kNone, b1 = kNone, br = kNone, wr = kNone, bp = kNone, wa = kNone;
  std::string name;
};
struct Lin {
  LinearKind kind = LinearKind::dense;
  int K = 0, F = 0, Fs = 0, Ka = 0, moe_slot = -1, shift = -1;
  const bf16* w = nullptr;
  const bf16* b16 = nullptr;
  const bf16* wa = nullptr;  // MoE, masked: W_aug (F,Ka); nullptr: the stacked product + epilogue kernel
  const float *b32 = nullptr, *b0 = nullptr, *b1 = nullptr, *br = nullptr, *wr = nullptr, *bp = nullptr;
};

// A shift linear of the layered path (stacked to_qk + to_v: one layer of 2C rows): its packed 5-bit form
// (ops/cuda/shift_gpu.h) when the exponent range fits it, and the automatic path choice per row count M.
struct ShiftChoice {
  cuda::ShiftPath path = cuda::shift_path_cublas_decoded;
  float cublas_us = -1.0f, packed_us = -1.0f;
};
struct ShiftLayer {
  std::string name;
  int K = 0, F = 0;
  bool packed_ok = false;
  cuda::ShiftPackedWeights packed;
  std::map<int, ShiftChoice> chosen;  // by M
};

// Which MoE linears of the layered path run the masked product (ops.h moe_route_mask_forward + one Gemm with the
// epilogue fused) instead of the stacked product + epilogue kernel; only with the straight-through gate. Read once,
// at construction, from the environment variable SAV_MOE_MASKED: "fc1" (default: the GELU layers), "all" (every
// MoE linear whose output is contiguous: fc1, fc2, proj, a softmax block's qkv; a Hamming block's to_qk and to_v
// write the halves of one buffer and stay stacked) or "off".
enum class MoeMasked { off, fc1, all };

MoeMasked moe_masked_from_env() {
  const char* v = std::getenv("SAV_MOE_MASKED");
  const std::string s = v ? v : "";
  if (s.empty() || s == "fc1") return MoeMasked::fc1;
  if (s == "all") return MoeMasked::all;
  SAV_CHECK(s == "off", "ViTCuda: SAV_MOE_MASKED must be fc1, all or off, got '" << s << "'");
  return MoeMasked::off;
}

// The fused kernel's view of a layer (vit_fused.h); choices: the layer's slot of the routing buffer.
cuda::FusedLinear fused_linear(const Lin& L, int8_t* choices) {
  cuda::FusedLinear f;
  f.K = L.K, f.F = L.F, f.w0 = L.w;
  if (L.kind == LinearKind::moe) {
    f.moe = true, f.w1 = L.w + size_t(L.F) * L.K, f.b32 = L.b0, f.b1 = L.b1, f.wr = L.wr, f.br = L.br;
    f.choice = choices;
  } else {
    f.b16 = L.b16, f.b32 = L.b32;
  }
  return f;
}

struct BlockOffsets {
  char attn = 's';
  size_t ln1_w, ln1_b, ln2_w, ln2_b;
  LinOff qkv;          // softmax: qkv (3C); Hamming with dense / shift linears: stacked [to_qk; to_v] (2C)
  LinOff to_qk, to_v;  // Hamming with MoE linears
  LinOff proj, fc1, fc2;
  size_t anchors = kNone, mu = kNone, A = kNone, conv = kNone;  // Hamming: (H,m,d) (H,m) (H,b,m) (H,9)
};
struct BlockWeights {
  char attn = 's';
  const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
  Lin qkv, to_qk, to_v, proj, fc1, fc2;
  const float *anchors = nullptr, *mu = nullptr, *A = nullptr, *conv = nullptr;
  const void* ham_prep = nullptr;  // Hamming: the per-head kernel's prepared hash weights (hamming_attention_prepare)
};

// Host f32 weight (F,K) and bias (F) of a dense or shift layer `prefix` (shift decoded: s * 2^p).
void dense_or_shift(const ParamSet& ps, const std::string& prefix, LinearKind kind, int K, int F,
                    const ReparamOptions& ro, std::vector<float>& w, std::vector<float>& b) {
  const size_t n = size_t(F) * K;
  w.resize(n);
  if (kind == LinearKind::dense) {
    const float* src = ps.get(prefix + ".weight").f32();
    w.assign(src, src + n);
  } else {
    cpu::shift_linear_weights(w.data(), ps.get(prefix + ".p").f32(), ps.get(prefix + ".s").f32(), F, K, ro.pmin,
                              ro.pmax);
  }
  const float* bs = ps.get(prefix + ".bias").f32();
  b.assign(bs, bs + F);
}

// Adds the layers `prefixes` (same kind, same K; their outputs stacked: F = sum of theirs) to the pool.
// MoE takes exactly one prefix; masked: also W_aug (the layer runs the masked product). bias_bf16: the epilogue
// writes bf16 (bias in bf16), else f32. A shift layer is also appended to `shifts` with its packed form (uploaded
// now) when ro's exponent range fits it.
LinOff add_linear(WeightPool& pb, const ParamSet& ps, const std::vector<std::string>& prefixes, LinearKind kind, int K,
                  int F1, bool bias_bf16, const ReparamOptions& ro, int* moe_count, std::vector<ShiftLayer>* shifts,
                  bool masked = false) {
  LinOff o;
  o.kind = kind, o.K = K, o.name = prefixes[0];
  if (kind == LinearKind::moe) {
    SAV_CHECK(prefixes.size() == 1, "internal: a stacked MoE linear");
    const std::string& p = prefixes[0];
    std::vector<float> w1(size_t(F1) * K);
    cpu::shift_linear_weights(w1.data(), ps.get(p + ".experts.1.p").f32(), ps.get(p + ".experts.1.s").f32(), F1, K,
                              ro.pmin, ro.pmax);
    const std::vector<bf16> st = cuda::moe_stack_weights(ps.get(p + ".experts.0.weight").f32(), w1.data(),
                                                         ps.get(p + ".router.weight").f32(), F1, K);
    o.F = F1, o.Fs = cuda::moe_stack_rows(F1);
    o.w = pb.add(st.data(), st.size() * sizeof(bf16));
    o.b0 = pb.add_f32(ps.get(p + ".experts.0.bias"));
    o.b1 = pb.add_f32(ps.get(p + ".experts.1.bias"));
    o.br = pb.add_f32(ps.get(p + ".router.bias"));
    o.wr = pb.add_f32(ps.get(p + ".router.weight"));  // f32 router of the fused kernel and the masked form
    if (masked) {
      const std::vector<bf16> wa =
          cuda::moe_masked_weights(ps.get(p + ".experts.0.weight").f32(), w1.data(),
                                   ps.get(p + ".experts.0.bias").f32(), ps.get(p + ".experts.1.bias").f32(), F1, K);
      o.Ka = cuda::moe_masked_cols(K);
      o.wa = pb.add(wa.data(), wa.size() * sizeof(bf16));
    }
    o.moe_slot = (*moe_count)++;
    return o;
  }
  std::vector<float> w, b, wl, bl;
  for (const std::string& p : prefixes) {
    dense_or_shift(ps, p, kind, K, F1, ro, wl, bl);
    w.insert(w.end(), wl.begin(), wl.end());
    b.insert(b.end(), bl.begin(), bl.end());
  }
  o.F = F1 * static_cast<int>(prefixes.size());
  const std::vector<bf16> wb = cuda::to_bf16(w.data(), w.size());
  o.w = pb.add(wb.data(), wb.size() * sizeof(bf16));
  if (bias_bf16) {
    const std::vector<bf16> bb = cuda::to_bf16(b.data(), b.size());
    o.b16 = pb.add(bb.data(), bb.size() * sizeof(bf16));
    if (kind == LinearKind::shift) o.bp = pb.add_f32(cuda::from_bf16(bb));
  } else {
    o.b32 = pb.add(b.data(), b.size() * sizeof(float));
  }
  if (kind == LinearKind::shift) {
    ShiftLayer sl;
    sl.name = prefixes[0];  // stacked: "blocks.i.attn.to_qk+to_v"
    for (size_t i = 1; i < prefixes.size(); ++i) sl.name += "+" + prefixes[i].substr(prefixes[i].rfind('.') + 1);
    sl.K = K, sl.F = o.F;
    sl.packed_ok = cuda::shift_packed_supports(ro.pmin, ro.pmax);
    if (sl.packed_ok) sl.packed = cuda::shift_packed_weights_from_matrix(w.data(), o.F, K, ro.pmin, ro.pmax);
    o.shift = static_cast<int>(shifts->size());
    shifts->push_back(std::move(sl));
  }
  return o;
}

}  // namespace

struct ViTCuda::Impl {
  VitConfig cfg;
  cuda::MoeGate gate = cuda::moe_gate_straight_through;
  WeightPool pool;
  const bf16 *patch_w = nullptr, *head_w = nullptr;
  const float *patch_b = nullptr, *cls = nullptr, *pos = nullptr, *norm_w = nullptr, *norm_b = nullptr,
              *head_b = nullptr;
  std::vector<BlockWeights> blocks;
  std::vector<std::string> moe_names;    // by slot, in forward order
  int moe_fs = 0;                        // widest stacked MoE weight of a layer not run masked (scratch columns)
  int moe_ka = 0;                        // widest W_aug of a masked MoE layer (x_aug scratch columns)
  std::vector<ShiftLayer> shift_layers;  // in forward order
  ViTCudaShiftPath shift_mode = ViTCudaShiftPath::automatic;
  ViTCudaRowFusion row_mode = ViTCudaRowFusion::automatic;              // set_row_fusion
  ViTCudaDependentLaunch dep_mode = ViTCudaDependentLaunch::automatic;  // set_dependent_launch
  // automatic row fusion / dependent launch: per M the whole-forward timing of each set of forms (choose_rows) and the
  // set chosen
  struct RowForms {
    bool proj = false, fc2 = false;
    bool dependent = false;  // dependent launch (vit_cuda.h ViTCudaDependentLaunch)
    bool ham = false;        // Hamming attention + proj + LN2 + fc1's router and mask as one kernel (ham_fusable)
    bool blk = false;        // ... with to_qk / to_v too: the attention half of the block as one kernel (blk_fusable)
    bool mlp = false;        // masked fc1 + GELU + stacked fc2 + epilogue + next LN1 as one kernel (mlp_fusable)
    bool pmlp = false;       // with blk and mlp: proj + residual + LN2 + router in the MLP kernel (pmlp_fusable)
  };
  bool small_products = false;  // the forward being enqueued runs dense products by cuda::small_linear_*
  std::map<int, std::vector<ViTCudaRowChoice>> row_timings;
  std::map<int, RowForms> row_chosen;
  const RowForms* row_trial = nullptr;                                        // the set a timing forward runs
  std::map<std::tuple<int, int, int, int>, ShiftChoice> shift_shape_choices;  // (M, K, F, epilogue): timed once
  cuda::Gemm gemm;
  cuda::Stream capture_stream;

  // activations, sized for `capacity` images
  int capacity = 0;
  int last_rows = 0;  // rows (B*N) of the last forward, for moe_choices()
  DeviceBuffer<float> x, pe, moe_s;
  DeviceBuffer<bf16> xn, qkv, ao, hid, cols, clsn, moe_xa;  // moe_xa: x_aug of the masked MoE layers
  DeviceBuffer<bf16> ham_v;              // the attention block kernel's v rows (hamming_block_scratch_elems)
  DeviceBuffer<int8_t> choices;          // (MoE layers, capacity*N) expert of each token
  DeviceBuffer<unsigned char> ham_ws;    // Hamming kernels' workspace
  DeviceBuffer<unsigned char> ham_prep;  // the Hamming blocks' prepared hash weights, one slice per block
  cuda::GraphCache graphs;

  // the fused single-kernel path (vit_fused.h): every block Hamming attention, sizes it covers
  bool fused_model = false;
  ViTCudaPath path_mode = ViTCudaPath::automatic;
  cuda::FusedVitModel fused;
  DeviceBuffer<cuda::FusedBlock> fused_blocks;
  cuda::FusedVitWorkspace fused_ws;

  // the model's sizes were checked at batch 1; B decides the clusters, which must all be resident (cached plan)
  bool fused_ok(int B) const {
    return fused_model && B >= 1 && B <= cuda::kFusedMaxBatch && cuda::vit_fused_supports(fused.dims, B);
  }
  bool use_fused(int B) const {
    if (!fused_ok(B) || path_mode == ViTCudaPath::layered) return false;
    return path_mode == ViTCudaPath::fused || B <= kVitFusedAutoMaxBatch;
  }

  int8_t* choice_slot(const Lin& L) {
    return L.moe_slot < 0 ? nullptr : choices.get() + size_t(L.moe_slot) * size_t(capacity) * cfg.tokens();
  }

  // (Re)builds the device block array of the fused kernel: its MoE layers write into `choices`, which moves
  // when the capacity grows.
  void upload_fused_blocks() {
    std::vector<cuda::FusedBlock> fb(blocks.size());
    for (size_t l = 0; l < blocks.size(); ++l) {
      const BlockWeights& w = blocks[l];
      cuda::FusedBlock& f = fb[l];
      f.ln1_w = w.ln1_w, f.ln1_b = w.ln1_b, f.ln2_w = w.ln2_w, f.ln2_b = w.ln2_b;
      if (w.to_qk.kind == LinearKind::moe) {
        f.qk = fused_linear(w.to_qk, choice_slot(w.to_qk));
        f.v = fused_linear(w.to_v, choice_slot(w.to_v));
      } else {
        f.qk = fused_linear(w.qkv, nullptr);  // stacked [to_qk; to_v]: F = 2C, f.v.F == 0
      }
      f.proj = fused_linear(w.proj, choice_slot(w.proj));
      f.fc1 = fused_linear(w.fc1, choice_slot(w.fc1));
      f.fc2 = fused_linear(w.fc2, choice_slot(w.fc2));
      f.anchors = w.anchors, f.mu = w.mu, f.A = w.A, f.conv = w.conv;
    }
    fused_blocks.resize(fb.size());
    SAV_CUDA_CHECK(
        cudaMemcpy(fused_blocks.get(), fb.data(), fb.size() * sizeof(cuda::FusedBlock), cudaMemcpyHostToDevice));
    fused.blocks = fused_blocks.get();
  }

  void ensure_capacity(int B) {
    if (B <= capacity) return;
    SAV_CUDA_CHECK(cudaDeviceSynchronize());  // replays in flight may still read the old buffers
    graphs.clear();
    const size_t N = cfg.tokens(), C = cfg.dim, F = cfg.mlp_hidden, P = cfg.num_patches();
    const size_t K = size_t(cfg.in_chans) * cfg.patch * cfg.patch, M = size_t(B) * N;
    x.resize(M * C);
    pe.resize(size_t(B) * P * C);
    xn.resize(M * C);
    qkv.resize(M * 3 * C);  // softmax blocks (M,3C); Hamming blocks use (M,2C) of it
    ao.resize(M * C);
    hid.resize(M * F);
    cols.resize(size_t(B) * P * K);
    clsn.resize(size_t(B) * C);
    moe_s.resize(M * size_t(moe_fs));
    moe_xa.resize(M * size_t(moe_ka));
    choices.resize(M * moe_names.size());
    // the tiled Hamming kernel's plan (chunking) depends on the batch: room for every batch up to this one, when a
    // Hamming block runs it (N > 256: no prepared per-head kernel)
    const bool tiled =
        std::any_of(blocks.begin(), blocks.end(), [](const BlockWeights& w) { return w.attn == 'h' && !w.ham_prep; });
    size_t ws = 1;
    for (int bb = 1; bb <= B && tiled; ++bb)
      ws = std::max(
          ws, cuda::hamming_tiled_workspace_bytes({bb, cfg.tokens(), cfg.dim, cfg.heads, cfg.hash_bits, cfg.anchors}));
    ham_ws.resize(ws);
    // the attention block kernel's v rows: only where that kernel can run (blk_fusable's shape test)
    const bool blk = std::any_of(blocks.begin(), blocks.end(), [](const BlockWeights& w) { return w.ham_prep; }) &&
                     cuda::hamming_block_supports(B, cfg.tokens(), cfg.dim, cfg.heads, cfg.hash_bits, cfg.anchors);
    ham_v.resize(blk ? cuda::hamming_block_scratch_elems(B, cfg.tokens(), cfg.dim) : 1);
    capacity = B;
    if (fused_model) upload_fused_blocks();
  }

  // The forward of B images on `s`: the fused kernel when it is chosen, else the layered kernels.
  void run(const float* images, float* logits, int B, cudaStream_t s, bool graph) {
    ensure_capacity(B);
    if (use_fused(B)) {
      fused_ws.ensure(fused.dims, B);
      cuda::vit_fused_forward(fused, B, images, logits, fused_ws, s);  // one launch: no graph needed
      last_rows = B * cfg.tokens();
    } else {
      choose_rows(images, logits, B, s);  // first forward of B (eager or graph): the same kernels in both
      if (graph) {
        graphs.launch(B, images, logits, s, capture_stream.get(),
                      [&](cudaStream_t cs) { enqueue(images, logits, B, cs); });
        last_rows = B * cfg.tokens();
      } else {
        enqueue(images, logits, B, s);
      }
    }
  }

  enum class Epi { bf16, gelu, residual };

  // dense / shift on the decoded bf16 weights: one cuBLASLt product with a fused epilogue (contiguous outputs).
  void decoded_linear(const Lin& L, const bf16* xin, int M, Epi epi, void* out, int ldo, cudaStream_t s) {
    SAV_CHECK(ldo == L.F, "internal: strided output of a dense / shift linear");
    product(xin, L.w, epi == Epi::residual ? static_cast<const void*>(L.b32) : L.b16, M, L.K, L.F, epi, out, s);
  }
  // out (M, F) contiguous = [epi](x W^T + b), b f32 (residual) or bf16 (else) or nullptr: cuBLASLt, or the engine's
  // small-M kernel when the forward runs them (ViTCudaDependentLaunch::small_products).
  void product(const bf16* x, const bf16* w, const void* b, int M, int K, int F, Epi epi, void* out, cudaStream_t s) {
    if (epi == Epi::residual) {
      f32_product(static_cast<float*>(out), x, w, static_cast<const float*>(b), M, K, F, true, s);
    } else if (small_products && cuda::small_linear_supports(M, K, F)) {
      cuda::small_linear_bf16(static_cast<bf16*>(out), F, x, w, static_cast<const bf16*>(b), M, K, F, epi == Epi::gelu,
                              s);
    } else {
      gemm.linear_bf16(static_cast<bf16*>(out), x, w, static_cast<const bf16*>(b), M, K, F, epi == Epi::gelu, s);
    }
  }
  // out (M, F) f32 = x W^T + b, or += when accumulate; the same two products as product().
  void f32_product(float* out, const bf16* x, const bf16* w, const float* b, int M, int K, int F, bool accumulate,
                   cudaStream_t s) {
    if (small_products && cuda::small_linear_supports(M, K, F))
      cuda::small_linear_f32(out, F, x, w, b, M, K, F, accumulate, s);
    else
      gemm.linear_f32(out, x, w, b, M, K, F, accumulate, s);
  }

  // A shift linear by the packed-mma kernel with the same epilogue (f32 bias: b32, or the bf16-rounded bp).
  void packed_linear(const Lin& L, const bf16* xin, int M, Epi epi, void* out, int ldo, cudaStream_t s) {
    const ShiftLayer& sl = shift_layers[L.shift];
    cuda::ShiftEpilogue e;
    e.ldy = ldo;
    if (epi == Epi::residual) {
      e.accumulate = true;
      cuda::shift_packed_linear_forward(static_cast<float*>(out), xin, sl.packed, L.b32, M, L.K, L.F, e, s);
    } else {
      e.gelu = epi == Epi::gelu;
      cuda::shift_packed_linear_forward(static_cast<bf16*>(out), xin, sl.packed, L.bp, M, L.K, L.F, e, s);
    }
  }

  // Times both products of shift linear L for M rows (its epilogue and input, a scratch output; 3 warm-ups,
  // then the median of 9 CUDA-event-timed launches each) and returns the faster (ties: cuBLASLt) with the times.
  // Synchronises `s` and allocates: only outside stream capture.
  ShiftChoice time_shift_paths(const Lin& L, const bf16* xin, int M, Epi epi, cudaStream_t s) {
    constexpr int kWarmups = 3, kRuns = 9;
    DeviceBuffer<unsigned char> scratch(size_t(M) * L.F * (epi == Epi::residual ? sizeof(float) : sizeof(bf16)));
    SAV_CUDA_CHECK(cudaMemsetAsync(scratch.get(), 0, scratch.bytes(), s));
    ShiftChoice ch;
    float best_us = std::numeric_limits<float>::infinity();
    for (const cuda::ShiftPath path : {cuda::shift_path_cublas_decoded, cuda::shift_path_packed_mma}) {
      auto once = [&] {
        if (path == cuda::shift_path_packed_mma)
          packed_linear(L, xin, M, epi, scratch.get(), L.F, s);
        else
          decoded_linear(L, xin, M, epi, scratch.get(), L.F, s);
      };
      // (cuBLASLt picks its algorithm on the first warm-up call)
      const float us = static_cast<float>(cuda::median_launch_us(once, s, kWarmups, kRuns));
      (path == cuda::shift_path_packed_mma ? ch.packed_us : ch.cublas_us) = us;
      if (us < best_us) best_us = us, ch.path = path;
    }
    return ch;
  }

  // The product a shift linear runs for M rows: the forced one, the layer's cached choice, or (first eager call
  // of M) the choice of its shape: timed on the first layer of each (M, K, F, epilogue), shared by the layers of
  // the same shape (one decision per shape, a few timings per batch size). While `s` is being captured an M
  // without a choice runs cuBLASLt (GraphCache runs every batch size's first forward eagerly, so a capture
  // normally finds the choice made).
  cuda::ShiftPath shift_path_for(const Lin& L, const bf16* xin, int M, Epi epi, cudaStream_t s) {
    ShiftLayer& sl = shift_layers[L.shift];
    if (!sl.packed_ok || shift_mode == ViTCudaShiftPath::cublas_decoded || M > cuda::shift_gpu_max_rows)
      return cuda::shift_path_cublas_decoded;
    if (shift_mode == ViTCudaShiftPath::packed_mma) return cuda::shift_path_packed_mma;
    if (const auto it = sl.chosen.find(M); it != sl.chosen.end()) return it->second.path;
    const auto key = std::make_tuple(M, L.K, L.F, static_cast<int>(epi));
    auto it = shift_shape_choices.find(key);
    if (it == shift_shape_choices.end()) {
      cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
      SAV_CUDA_CHECK(cudaStreamIsCapturing(s, &cap));
      if (cap != cudaStreamCaptureStatusNone) return cuda::shift_path_cublas_decoded;
      it = shift_shape_choices.emplace(key, time_shift_paths(L, xin, M, epi, s)).first;
    }
    sl.chosen[M] = it->second;
    return it->second.path;
  }

  // A stacked MoE layer's product into the f32 scratch moe_s (both experts and the split router; then an epilogue).
  void stacked_product(const Lin& L, const bf16* xin, int M, cudaStream_t s) {
    f32_product(moe_s.get(), xin, L.w, nullptr, M, L.K, L.Fs, false, s);
  }

  // A masked MoE layer's product of x_aug (moe_xa, written by a router + mask kernel) with W_aug, epilogue fused.
  void masked_product(const Lin& L, int M, Epi epi, void* out, int ldo, cudaStream_t s) {
    SAV_CHECK(ldo == L.F, "internal: strided output of a masked MoE linear");
    product(moe_xa.get(), L.wa, nullptr, M, L.Ka, L.F, epi, out, s);
  }

  // out (M, ldo) = the layer applied to x (M, K) with the epilogue: bf16 | GELU -> bf16 | f32 residual add.
  // dense: one cuBLASLt product with a fused epilogue (contiguous outputs: ldo == F); shift: that or the
  // packed-mma kernel (shift_path_for); MoE, masked (L.wa): the router + mask kernel writes x_aug, then one
  // cuBLASLt product with W_aug and the fused epilogue (GELU: the tanh form); MoE, stacked: the stacked product
  // into the f32 scratch, then the routing epilogue kernel (GELU: the erf form).
  void linear(const Lin& L, const bf16* xin, int M, Epi epi, void* out, int ldo, cudaStream_t s) {
    if (L.kind != LinearKind::moe) {
      if (L.shift >= 0 && shift_path_for(L, xin, M, epi, s) == cuda::shift_path_packed_mma)
        packed_linear(L, xin, M, epi, out, ldo, s);
      else
        decoded_linear(L, xin, M, epi, out, ldo, s);
      return;
    }
    if (L.wa) {
      cuda::moe_route_mask_forward(moe_xa.get(), L.Ka, choice_slot(L), xin, L.K, L.wr, L.br, M, L.K, s);
      masked_product(L, M, epi, out, ldo, s);
      return;
    }
    stacked_product(L, xin, M, s);
    const cuda::MoeEpilogue me = epi == Epi::residual ? cuda::moe_epilogue_f32_residual
                                 : epi == Epi::gelu   ? cuda::moe_epilogue_bf16_gelu
                                                      : cuda::moe_epilogue_bf16;
    cuda::moe_epilogue_forward(out, ldo, choice_slot(L), moe_s.get(), L.Fs, L.b0, L.b1, L.br, M, L.F, gate, me, s);
  }

  // Whether a product of M rows (K in, C out, Fc product columns) with a whole-row epilogue can run as one rows-fused
  // kernel (ops.h rows_linear_ln_mask_forward / rows_moe_residual_ln_forward): small M only (a cluster of at least 4
  // CTAs per 16-row tile fits the SMs: batch 1-2 of 197 tokens), where it fits shared memory.
  bool rows_fusable(int M, int K, int C, int Fc) const {
    const int G = cuda::rows_fused_cluster(M);
    return row_mode != ViTCudaRowFusion::off && G >= 4 && cuda::rows_fused_supports(K, C, Fc, G);
  }
  // Block w's proj is a linear (dense, or shift on the automatic path) with its f32 bias and residual add, before a
  // masked MoE fc1 whose LayerNorm + router + mask a fused kernel can run with it.
  bool proj_before_router(const BlockWeights& w) const {
    const Lin& pj = w.proj;
    return pj.kind != LinearKind::moe && pj.b32 && (pj.shift < 0 || shift_mode == ViTCudaShiftPath::automatic) &&
           w.fc1.wa;
  }
  // ... in the rows-fused kernel
  bool proj_fusable(const BlockWeights& w, int M) const {
    return proj_before_router(w) && rows_fusable(M, w.proj.K, cfg.dim, cfg.dim);
  }

  // Block l's fc2 is a stacked MoE linear whose residual epilogue also writes the next block's LayerNorm (one kernel,
  // or with the product as the rows-fused fc2 form where fc2_fusable).
  bool fc2_next_ln(size_t l) const {
    const Lin& f2 = blocks[l].fc2;
    return f2.kind == LinearKind::moe && !f2.wa && cuda::moe_epilogue_residual_ln_supports(cfg.dim);
  }
  // The LayerNorm after block l: the next block's LayerNorm 1, or the final norm after the last block (its rows then
  // feed the head: forward's class rows).
  struct NextLn {
    const float *w, *b;
  };
  NextLn next_ln(size_t l) const {
    return l + 1 < blocks.size() ? NextLn{blocks[l + 1].ln1_w, blocks[l + 1].ln1_b} : NextLn{norm_w, norm_b};
  }
  bool fc2_fusable(size_t l, int M) const {
    return fc2_next_ln(l) && rows_fusable(M, blocks[l].fc2.K, cfg.dim, blocks[l].fc2.Fs);
  }

  // Block l's MLP half as one kernel (ops.h mlp_block_forward): a masked MoE fc1 (W_aug: C in, F out; its x_aug
  // written by the attention half's router + mask, whichever form runs it) and a stacked MoE fc2 with the next
  // block's LayerNorm (fc2_next_ln).
  bool mlp_fusable(size_t l, int M) const {
    return row_mode != ViTCudaRowFusion::off && fc2_next_ln(l) && blocks[l].fc1.wa &&
           cuda::moe_ln_route_mask_supports(cfg.dim) && cuda::mlp_block_supports(M, cfg.dim, cfg.mlp_hidden);
  }

  // ... and with the attention half as one kernel (blk_fusable): the proj, residual, LN2 and router can move from the
  // attention kernel into the MLP kernel (ops.h hamming_block_attention_forward + mlp_block_proj_forward)
  bool pmlp_fusable(size_t l, int B) const {
    const int M = B * cfg.tokens();
    return blk_fusable(blocks[l], B) && mlp_fusable(l, M) && cuda::mlp_block_proj_supports(M, cfg.dim, cfg.mlp_hidden);
  }

  // A Hamming block (the per-head kernel) whose proj (dense, or shift on the automatic path), residual, LN2 and masked
  // fc1's router + mask can run inside the Hamming kernel (ops.h hamming_attention_proj_ln_mask_forward).
  bool ham_fusable(const BlockWeights& w, int B) const {
    return row_mode != ViTCudaRowFusion::off && w.attn == 'h' && w.ham_prep && proj_before_router(w) &&
           w.fc1.Ka == cuda::moe_masked_cols(cfg.dim) &&
           cuda::hamming_attention_proj_supports(B, cfg.tokens(), cfg.dim, cfg.heads, cfg.hash_bits, cfg.anchors);
  }
  // ... and whose to_qk / to_v is one linear (dense, or shift on the automatic path) with a bf16 bias: the whole
  // attention half in one kernel (ops.h hamming_block_forward).
  bool blk_fusable(const BlockWeights& w, int B) const {
    const Lin& q = w.qkv;
    return ham_fusable(w, B) && w.to_qk.kind != LinearKind::moe && q.kind != LinearKind::moe && q.w && q.b16 &&
           (q.shift < 0 || shift_mode == ViTCudaShiftPath::automatic) &&
           cuda::hamming_block_supports(B, cfg.tokens(), cfg.dim, cfg.heads, cfg.hash_bits, cfg.anchors);
  }
  // Where block w's proj runs in a forward of B images with the forms f: in the attention block kernel (with to_qk /
  // to_v and the Hamming attention), in the Hamming kernel, in the rows-fused kernel, or on its own (a layered linear).
  enum class ProjRun { block, hamming, rows, own };
  ProjRun proj_run(const BlockWeights& w, int B, const RowForms& f) const {
    if (f.blk && blk_fusable(w, B)) return ProjRun::block;
    if (f.ham && ham_fusable(w, B)) return ProjRun::hamming;
    if (f.proj && proj_fusable(w, B * cfg.tokens())) return ProjRun::rows;
    return ProjRun::own;
  }

  // The fc2 form and its two ways, writing x (the residual stream), the next block's LayerNorm xn and the routing
  // choices (nullptr: not written): x += the stacked MoE fc2 of hid (its routing epilogue), then the next LN1 -> xn.
  void fc2_rows(const BlockWeights& w, NextLn next, int M, bool fused, float* xo, bf16* xno, int8_t* ch,
                cudaStream_t s) {
    const int C = cfg.dim;
    if (fused) {
      cuda::rows_moe_residual_ln_forward(xo, C, ch, hid.get(), cfg.mlp_hidden, w.fc2.w, w.fc2.b0, w.fc2.b1, w.fc2.br, M,
                                         w.fc2.K, C, gate, xno, C, next.w, next.b, cfg.ln_eps, s);
    } else {
      stacked_product(w.fc2, hid.get(), M, s);
      cuda::moe_epilogue_residual_ln_forward(xo, C, ch, moe_s.get(), w.fc2.Fs, w.fc2.b0, w.fc2.b1, w.fc2.br, M, C, gate,
                                             xno, C, next.w, next.b, cfg.ln_eps, s);
    }
  }

  // After a mode change: the captured graphs (made with the other kernels) and the automatic choices (made under the
  // other mode, maybe without trying every set) go.
  void drop_choices() {
    SAV_CUDA_CHECK(cudaDeviceSynchronize());  // replays in flight
    graphs.clear();
    row_chosen.clear();
    row_timings.clear();
  }

  // The forms that run fused for M rows: forced on / off, the set a timing forward tries, the automatic choice made
  // for M, or none (no choice: a forward enqueued inside the caller's stream capture).
  RowForms forms_for(int M) const {
    RowForms f{};
    if (row_trial) {
      f = *row_trial;
    } else if (const auto it = row_chosen.find(M); it != row_chosen.end()) {
      f = it->second;
    }
    if (row_mode != ViTCudaRowFusion::automatic)
      f.proj = f.fc2 = f.ham = f.blk = f.mlp = f.pmlp = row_mode == ViTCudaRowFusion::on;
    if (dep_mode != ViTCudaDependentLaunch::automatic) f.dependent = dep_mode != ViTCudaDependentLaunch::off;
    return f;
  }
  // The automatic choice for B images (first forward of B, eager or graph, outside any capture): each set of the forms
  // that some layer can run fused, without and (M <= kVitDependentAutoMaxRows) with dependent launch, is tried on a
  // whole forward, captured as a CUDA graph on the capture stream and timed (cuda::median_graph_us: the median of 15
  // replays, after an eager forward that makes the lazy choices), and the fastest set is kept (ties: the first tried:
  // fewer fused forms, no dependent launch). Timing the forms alone, in a graph of repeated calls, picked the
  // wrong side on the H200 (bench/RESULTS.md): what a fused kernel saves depends on its neighbours.
  void choose_rows(const float* images, float* logits, int B, cudaStream_t s) {
    const int M = B * cfg.tokens();
    const bool auto_rows = row_mode == ViTCudaRowFusion::automatic;
    const bool auto_dep = dep_mode == ViTCudaDependentLaunch::automatic && M <= kVitDependentAutoMaxRows;
    if ((!auto_rows && !auto_dep) || row_chosen.count(M)) return;
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    SAV_CUDA_CHECK(cudaStreamIsCapturing(s, &cap));
    if (cap != cudaStreamCaptureStatusNone) return;  // inside the caller's capture: unfused, no choice recorded
    bool any_proj = false, any_fc2 = false, any_ham = false, any_blk = false, any_mlp = false, any_pmlp = false;
    bool proj_beside_ham = false;
    for (size_t l = 0; auto_rows && l < blocks.size(); ++l) {
      const bool pf = proj_fusable(blocks[l], M), hf = ham_fusable(blocks[l], B);
      any_proj = any_proj || pf;
      any_ham = any_ham || hf;
      any_blk = any_blk || blk_fusable(blocks[l], B);
      proj_beside_ham = proj_beside_ham || (pf && !hf);  // a block the Hamming form does not take
      any_fc2 = any_fc2 || fc2_fusable(l, M);
      any_mlp = any_mlp || mlp_fusable(l, M);
      any_pmlp = any_pmlp || pmlp_fusable(l, B);
    }
    if (!any_proj && !any_fc2 && !any_ham && !any_mlp && !auto_dep) {
      row_chosen[M] = RowForms{};
      return;
    }
    std::vector<ViTCudaRowChoice> timings;
    std::vector<RowForms> sets;
    for (const bool dep : {false, true})
      for (const int att : {0, 1, 2})  // the attention forms: none, ham, blk (and ham where blk does not fit)
        for (const bool mlp : {false, true})
          for (const RowForms f :
               {RowForms{false, false}, RowForms{true, false}, RowForms{false, true}, RowForms{true, true}}) {
            const bool ham = att > 0, blk = att == 2;
            if ((!f.proj || (ham ? proj_beside_ham : any_proj)) && (!f.fc2 || (any_fc2 && !mlp)) &&
                (!dep || auto_dep) && (!ham || any_ham) && (!blk || any_blk) && (!mlp || any_mlp)) {
              sets.push_back({f.proj, f.fc2, dep, ham, blk, mlp});
              if (blk && mlp && any_pmlp) sets.push_back({f.proj, f.fc2, dep, ham, blk, mlp, true});
            }
          }
    for (const RowForms& f : sets) {
      row_trial = &f;
      try {
        enqueue(images, logits, B, s);  // eager: lazy choices (cuBLASLt plans, shift paths) before the capture
        SAV_CUDA_CHECK(cudaStreamSynchronize(s));
        const double us = cuda::median_graph_us([&](cudaStream_t st) { enqueue(images, logits, B, st); },
                                                capture_stream.get(), 1, 15);
        const RowForms ran = forms_for(M);  // the trial as the forced modes leave it
        row_trial = nullptr;
        timings.push_back(
            {ran.proj, ran.fc2, ran.dependent, ran.ham, ran.blk, ran.mlp, ran.pmlp, static_cast<float>(us), false});
      } catch (...) {
        row_trial = nullptr;
        throw;
      }
    }
    size_t best = 0;  // the first of the fastest
    for (size_t i = 1; i < timings.size(); ++i)
      if (timings[i].forward_us < timings[best].forward_us) best = i;
    timings[best].chosen = true;
    row_timings[M] = std::move(timings);
    row_chosen[M] = sets[best];
  }

  void enqueue(const float* images, float* logits, int B, cudaStream_t s) {
    const int N = cfg.tokens(), C = cfg.dim, F = cfg.mlp_hidden, H = cfg.heads, P = cfg.num_patches();
    const int K = cfg.in_chans * cfg.patch * cfg.patch, M = B * N;
    const float eps = cfg.ln_eps;
    last_rows = M;
    const RowForms forms = forms_for(M);
    const cuda::DependentLaunchScope dependent(forms.dependent);  // the engine's kernels (launch_dependent)
    small_products = forms.dependent && dep_mode == ViTCudaDependentLaunch::small_products;
    const bool has_blocks = !blocks.empty();
    // the latency forms (the attention block kernel under dependent launch): the embedding as one kernel that stages
    // its weights before the wait (cuBLASLt's product lets no successor start early); else im2col, the product and the
    // token assembly + LN1
    const bool latency_forms = forms.dependent && forms.blk;
    if (latency_forms && has_blocks && cuda::aligned16(images) &&
        cuda::patch_embed_ln_supports(cfg.in_chans, cfg.img_size, cfg.patch, C)) {
      cuda::patch_embed_ln_forward(xn.get(), x.get(), images, patch_w, patch_b, cls, pos, blocks[0].ln1_w,
                                   blocks[0].ln1_b, B, cfg.in_chans, cfg.img_size, cfg.patch, C, eps, s);
    } else {
      cuda::im2col_forward(cols.get(), images, B, cfg.in_chans, cfg.img_size, cfg.patch, s);
      gemm.linear_f32(pe.get(), cols.get(), patch_w, patch_b, B * P, K, C, false, s);
      cuda::embed_layernorm_forward(has_blocks ? xn.get() : nullptr, x.get(), pe.get(), cls, pos,
                                    has_blocks ? blocks[0].ln1_w : nullptr, has_blocks ? blocks[0].ln1_b : nullptr, B,
                                    N, C, eps, s);
    }
    bool ln1_done = true;  // block 0's LayerNorm ran with the embedding
    for (size_t l = 0; l < blocks.size(); ++l) {
      const BlockWeights& w = blocks[l];
      const ProjRun proj = proj_run(w, B, forms);
      // the proj form of the MLP kernel: it runs proj + residual + LN2 + router, the attention kernel stops before
      const bool pmlp = proj == ProjRun::block && forms.mlp && forms.pmlp && pmlp_fusable(l, B);
      if (!ln1_done) cuda::layernorm_forward(xn.get(), C, x.get(), C, w.ln1_w, w.ln1_b, M, C, eps, s);
      if (pmlp) {  // to_qk / to_v and the attention: one kernel
        cuda::hamming_block_attention_forward(ao.get(), xn.get(), C, w.qkv.w, w.qkv.b16, w.ham_prep, w.conv,
                                              ham_v.get(), B, N, C, H, cfg.hash_bits, cfg.anchors, s);
      } else if (proj == ProjRun::block) {  // to_qk / to_v, attention, proj, LN2, fc1's router + mask: one kernel
        cuda::hamming_block_forward(x.get(), C, xn.get(), C, w.qkv.w, w.qkv.b16, w.ham_prep, w.conv, w.proj.w,
                                    w.proj.b32, w.ln2_w, w.ln2_b, eps, w.fc1.wr, w.fc1.br, moe_xa.get(), w.fc1.Ka,
                                    choice_slot(w.fc1), ham_v.get(), B, N, C, H, cfg.hash_bits, cfg.anchors, s);
      } else if (w.attn == 's') {
        linear(w.qkv, xn.get(), M, Epi::bf16, qkv.get(), 3 * C, s);
        cuda::attention_forward(ao.get(), qkv.get(), B, N, C, H, s);
      } else {
        // (M, 2C): qk in columns [0, C), v in [C, 2C)
        if (w.to_qk.kind == LinearKind::moe) {
          linear(w.to_qk, xn.get(), M, Epi::bf16, qkv.get(), 2 * C, s);
          linear(w.to_v, xn.get(), M, Epi::bf16, qkv.get() + C, 2 * C, s);
        } else {
          linear(w.qkv, xn.get(), M, Epi::bf16, qkv.get(), 2 * C, s);
        }
        // The per-head kernel (G CTAs per image and head, G from hamming_attention_split) where it
        // covers the sizes, else the tiled kernel (any N).
        if (proj == ProjRun::hamming) {
          cuda::hamming_attention_proj_ln_mask_forward(x.get(), C, qkv.get(), 2 * C, qkv.get() + C, 2 * C, w.ham_prep,
                                                       w.conv, w.proj.w, w.proj.b32, w.ln2_w, w.ln2_b, eps, w.fc1.wr,
                                                       w.fc1.br, moe_xa.get(), w.fc1.Ka, choice_slot(w.fc1), B, N, C, H,
                                                       cfg.hash_bits, cfg.anchors, s);
        } else if (w.ham_prep) {
          cuda::hamming_attention_forward_ld(ao.get(), C, qkv.get(), 2 * C, qkv.get() + C, 2 * C, w.ham_prep, w.conv, B,
                                             N, C, H, cfg.hash_bits, cfg.anchors, s);
        } else {
          const cuda::HammingTiledDims hd{B, N, C, H, cfg.hash_bits, cfg.anchors};
          cuda::hamming_attention_tiled<bf16>(ao.get(), C, qkv.get(), 2 * C, qkv.get() + C, 2 * C, w.anchors, w.mu, w.A,
                                              w.conv, hd, ham_ws.get(), s);
        }
      }
      // a masked fc1's x_aug (moe_xa) from the attention half's router + mask
      const bool masked_fc1 = proj != ProjRun::own || (w.fc1.wa && cuda::moe_ln_route_mask_supports(C));
      if (proj == ProjRun::rows) {  // proj + residual, then LN2 + fc1's router and mask: one kernel
        cuda::rows_linear_ln_mask_forward(x.get(), C, ao.get(), C, w.proj.w, w.proj.b32, M, w.proj.K, C, w.ln2_w,
                                          w.ln2_b, eps, w.fc1.wr, w.fc1.br, moe_xa.get(), w.fc1.Ka, choice_slot(w.fc1),
                                          s);
      } else if (proj == ProjRun::own && masked_fc1) {  // masked fc1: its LayerNorm fused into the router
        linear(w.proj, ao.get(), M, Epi::residual, x.get(), C, s);
        cuda::moe_ln_route_mask_forward(moe_xa.get(), w.fc1.Ka, choice_slot(w.fc1), x.get(), C, w.ln2_w, w.ln2_b, eps,
                                        w.fc1.wr, w.fc1.br, M, C, s);
      } else if (proj == ProjRun::own) {
        linear(w.proj, ao.get(), M, Epi::residual, x.get(), C, s);
        cuda::layernorm_forward(xn.get(), C, x.get(), C, w.ln2_w, w.ln2_b, M, C, eps, s);
        linear(w.fc1, xn.get(), M, Epi::gelu, hid.get(), F, s);
      }  // else proj, LN2 and the router ran in the attention kernel
      // the MLP half as one kernel (mlp_fusable implies masked_fc1), else the masked fc1 product here
      const bool mlp = forms.mlp && mlp_fusable(l, M);
      if (masked_fc1 && !mlp) masked_product(w.fc1, M, Epi::gelu, hid.get(), F, s);
      // a stacked MoE fc2: its residual epilogue fused with the next block's LayerNorm
      ln1_done = fc2_next_ln(l);
      const NextLn next = next_ln(l);
      if (pmlp) {  // proj + residual + LN2 + router + mask, fc1 + GELU + fc2 + routing epilogue + the next LN1
        cuda::mlp_block_proj_forward(x.get(), C, ao.get(), C, w.proj.w, w.proj.b32, w.ln2_w, w.ln2_b, w.fc1.wr,
                                     w.fc1.br, choice_slot(w.fc1), w.fc1.wa, w.fc2.w, w.fc2.b0, w.fc2.b1, w.fc2.br,
                                     choice_slot(w.fc2), M, C, F, gate, xn.get(), C, next.w, next.b, eps, s);
      } else if (mlp) {  // fc1 + GELU + fc2 + routing epilogue + the next LN1: one kernel
        cuda::mlp_block_forward(x.get(), C, choice_slot(w.fc2), moe_xa.get(), w.fc1.Ka, w.fc1.wa, w.fc2.w, w.fc2.b0,
                                w.fc2.b1, w.fc2.br, M, C, F, gate, xn.get(), C, next.w, next.b, eps, s);
      } else if (ln1_done) {  // product + routing epilogue + the next LN1: one kernel or two
        const bool fused = fc2_fusable(l, M) && forms.fc2;
        fc2_rows(w, next, M, fused, x.get(), xn.get(), choice_slot(w.fc2), s);
      } else {
        linear(w.fc2, hid.get(), M, Epi::residual, x.get(), C, s);
      }
    }
    // final norm on the class tokens (rows b*N), then the head. When the last block's fc2 epilogue ran the final
    // norm on every row (ln1_done), one image's class row is xn's first row: the same bits (the epilogue's LayerNorm
    // is layernorm_kernel's), one kernel less.
    const bf16* head_in = xn.get();
    if (!(ln1_done && has_blocks && B == 1)) {
      cuda::layernorm_forward(clsn.get(), C, x.get(), N * C, norm_w, norm_b, B, C, eps, s);
      head_in = clsn.get();
    }
    // the latency forms: the head by the engine's small-M product, which stages its weights before the wait
    if (latency_forms && cuda::small_linear_supports(B, C, cfg.num_classes))
      cuda::small_linear_f32(logits, cfg.num_classes, head_in, head_w, head_b, B, C, cfg.num_classes, false, s);
    else
      gemm.linear_f32(logits, head_in, head_w, head_b, B, C, cfg.num_classes, false, s);
  }
};

ViTCuda::ViTCuda(const Vit& model) : impl_(nullptr) {
  const VitConfig& c = model.config();
  const int N = c.tokens(), C = c.dim, H = c.heads, F = c.mlp_hidden;
  for (int l = 0; l < c.depth; ++l) {
    if (c.attn_kind(l) == 's') {
      SAV_CHECK(cuda::attention_supports(N, C, H),
                "ViTCuda: " << N << " tokens and head size " << C / H
                            << " are beyond the CUDA attention kernel (N <= 256, head size <= 64)");
    } else {
      SAV_CHECK(cuda::hamming_tiled_supports({1, N, C, H, c.hash_bits, c.anchors}),
                "ViTCuda: Hamming attention with head size " << C / H << ", " << c.hash_bits << " hash bits and "
                                                             << c.anchors << " anchors is beyond the CUDA kernel");
    }
  }
  SAV_CHECK(cuda::layernorm_supports(c.dim), "ViTCuda: width " << c.dim << " is beyond the CUDA LayerNorm (<= 1024)");
  // Read-only access to the options and the KSH buffers (Vit offers them through non-const accessors only).
  Vit& mv = const_cast<Vit&>(model);
  const ReparamOptions& ro = mv.reparam();
  SAV_CHECK(c.is_dense() || !ro.release_compat,
            "ViTCuda computes METHOD.md's ShiftAddViT; the release compatibility mode (release_compat: log-exp "
            "MoE combine, fixed-point shift inputs) runs on the CPU only");
  const MoeMasked masked_mode = moe_masked_from_env();
  SAV_CHECK(cuda::device_available(), "ViTCuda: no CUDA device is available");
  impl_ = std::make_unique<Impl>();
  Impl& m = *impl_;
  m.cfg = c;
  m.gate = ro.gate == cpu::moe_gate_prob ? cuda::moe_gate_prob : cuda::moe_gate_straight_through;
  // which MoE linears run masked (straight-through gate only): the GELU layers (fc1), or every one whose output is
  // contiguous (not a Hamming block's to_qk / to_v)
  const bool st = m.gate == cuda::moe_gate_straight_through;
  const bool mask_fc1 = st && masked_mode != MoeMasked::off, mask_all = st && masked_mode == MoeMasked::all;
  const ParamSet& ps = model.params();
  auto T = [&](const std::string& n) -> const Tensor& { return ps.get(n); };
  const ParamSet* bufs = mv.buffers();

  WeightPool& pb = m.pool;
  const size_t o_patch_w = pb.add_bf16(T("patch_embed.proj.weight"));  // (C, Cin*p*p) viewed as a matrix
  const size_t o_patch_b = pb.add_f32(T("patch_embed.proj.bias"));
  const size_t o_cls = pb.add_f32(T("cls_token"));
  const size_t o_pos = pb.add_f32(T("pos_embed"));
  int moe_count = 0;
  std::vector<BlockOffsets> bo(c.depth);
  for (int l = 0; l < c.depth; ++l) {
    const std::string p = "blocks." + std::to_string(l) + ".";
    BlockOffsets& o = bo[l];
    const LinearKind ak = linear_kind_from_char(c.attn_linear_kind(l)), mk = linear_kind_from_char(c.mlp_kind(l));
    o.attn = c.attn_kind(l);
    o.ln1_w = pb.add_f32(T(p + "norm1.weight"));
    o.ln1_b = pb.add_f32(T(p + "norm1.bias"));
    if (o.attn == 's') {
      o.qkv = add_linear(pb, ps, {p + "attn.qkv"}, ak, C, 3 * C, true, ro, &moe_count, &m.shift_layers, mask_all);
    } else {
      if (ak == LinearKind::moe) {
        o.to_qk = add_linear(pb, ps, {p + "attn.to_qk"}, ak, C, C, true, ro, &moe_count, &m.shift_layers);
        o.to_v = add_linear(pb, ps, {p + "attn.to_v"}, ak, C, C, true, ro, &moe_count, &m.shift_layers);
      } else {
        o.qkv =
            add_linear(pb, ps, {p + "attn.to_qk", p + "attn.to_v"}, ak, C, C, true, ro, &moe_count, &m.shift_layers);
      }
      SAV_CHECK(bufs, "ViTCuda: the model has no KSH buffers");
      o.anchors = pb.add_f32(bufs->get(p + "attn.ksh.anchors"));
      o.mu = pb.add_f32(bufs->get(p + "attn.ksh.mu"));
      o.A = pb.add_f32(bufs->get(p + "attn.ksh.A"));
      o.conv = pb.add_f32(T(p + "attn.dwconv.weight"));
    }
    o.proj = add_linear(pb, ps, {p + "attn.proj"}, ak, C, C, false, ro, &moe_count, &m.shift_layers, mask_all);
    o.ln2_w = pb.add_f32(T(p + "norm2.weight"));
    o.ln2_b = pb.add_f32(T(p + "norm2.bias"));
    o.fc1 = add_linear(pb, ps, {p + "mlp.fc1"}, mk, C, F, true, ro, &moe_count, &m.shift_layers, mask_fc1);
    o.fc2 = add_linear(pb, ps, {p + "mlp.fc2"}, mk, F, C, false, ro, &moe_count, &m.shift_layers, mask_all);
  }
  const size_t o_norm_w = pb.add_f32(T("norm.weight"));
  const size_t o_norm_b = pb.add_f32(T("norm.bias"));
  const size_t o_head_w = pb.add_bf16(T("head.weight"));
  const size_t o_head_b = pb.add_f32(T("head.bias"));

  m.pool.upload();
  {  // the packed-mma kernel needs sm_80 (bf16 mma.sync, cp.async): elsewhere shift linears stay on cuBLASLt
    int dev = 0, cc = 0;
    SAV_CUDA_CHECK(cudaGetDevice(&dev));
    SAV_CUDA_CHECK(cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMajor, dev));
    if (cc < 8)
      for (ShiftLayer& sl : m.shift_layers) sl.packed_ok = false;
  }
  auto F32 = [&](size_t off) { return m.pool.f32(off); };
  auto B16 = [&](size_t off) { return m.pool.b16(off); };
  m.moe_names.resize(moe_count);
  auto lin = [&](const LinOff& o) {
    Lin L;
    L.kind = o.kind, L.K = o.K, L.F = o.F, L.Fs = o.Fs, L.Ka = o.Ka, L.moe_slot = o.moe_slot, L.shift = o.shift;
    L.w = B16(o.w), L.b16 = B16(o.b16), L.b32 = F32(o.b32), L.b0 = F32(o.b0), L.b1 = F32(o.b1), L.br = F32(o.br);
    L.wr = F32(o.wr), L.bp = F32(o.bp), L.wa = B16(o.wa);
    if (o.kind == LinearKind::moe) {
      m.moe_names[o.moe_slot] = o.name;
      if (L.wa)
        m.moe_ka = std::max(m.moe_ka, o.Ka);
      else
        m.moe_fs = std::max(m.moe_fs, o.Fs);
    }
    return L;
  };
  m.patch_w = B16(o_patch_w), m.patch_b = F32(o_patch_b), m.cls = F32(o_cls), m.pos = F32(o_pos);
  m.norm_w = F32(o_norm_w), m.norm_b = F32(o_norm_b), m.head_w = B16(o_head_w), m.head_b = F32(o_head_b);
  for (const BlockOffsets& o : bo) {
    BlockWeights w;
    w.attn = o.attn;
    w.ln1_w = F32(o.ln1_w), w.ln1_b = F32(o.ln1_b), w.ln2_w = F32(o.ln2_w), w.ln2_b = F32(o.ln2_b);
    // forward order of the MoE slots: qkv | to_qk, to_v, proj, fc1, fc2 (add_linear numbered them so)
    w.qkv = lin(o.qkv), w.to_qk = lin(o.to_qk), w.to_v = lin(o.to_v);
    w.proj = lin(o.proj), w.fc1 = lin(o.fc1), w.fc2 = lin(o.fc2);
    w.anchors = F32(o.anchors), w.mu = F32(o.mu), w.A = F32(o.A), w.conv = F32(o.conv);
    m.blocks.push_back(w);
  }
  // the per-head Hamming kernel's prepared weights, where it covers the sizes (else the tiled kernel runs)
  if (cuda::hamming_attention_supports(N, C, H, c.hash_bits, c.anchors)) {
    const size_t per_block = cuda::hamming_attention_prepared_bytes(C, H, c.hash_bits);  // a multiple of 16
    size_t n = 0;
    for (const BlockWeights& w : m.blocks) n += w.anchors ? per_block : 0;
    m.ham_prep.resize(n);
    unsigned char* at = m.ham_prep.get();
    for (BlockWeights& w : m.blocks) {
      if (!w.anchors) continue;
      cuda::hamming_attention_prepare(at, w.anchors, w.mu, w.A, C, H, c.hash_bits, c.anchors, nullptr);
      w.ham_prep = at;
      at += per_block;
    }
    SAV_CUDA_CHECK(cudaDeviceSynchronize());
  }
  // the fused kernel: every block Hamming attention, sizes within vit_fused_supports (batch 1 as the probe)
  cuda::FusedVitDims& fd = m.fused.dims;
  fd.N = N, fd.C = C, fd.H = H, fd.F = F, fd.nbits = c.hash_bits, fd.m = c.anchors, fd.depth = c.depth;
  fd.Cin = c.in_chans, fd.S = c.img_size, fd.patch = c.patch, fd.V = c.num_classes, fd.eps = c.ln_eps;
  m.fused_model = c.attn == std::string(c.depth, 'h') && cuda::vit_fused_supports(fd, 1);
  if (m.fused_model) {
    m.fused.gate = m.gate;
    m.fused.patch_w = m.patch_w, m.fused.patch_b = m.patch_b, m.fused.cls = m.cls, m.fused.pos = m.pos;
    m.fused.norm_w = m.norm_w, m.fused.norm_b = m.norm_b, m.fused.head_w = m.head_w, m.fused.head_b = m.head_b;
  }
}

ViTCuda::~ViTCuda() = default;

const VitConfig& ViTCuda::config() const { return impl_->cfg; }
size_t ViTCuda::weight_bytes() const {
  size_t n = impl_->pool.bytes();
  for (const ShiftLayer& sl : impl_->shift_layers) n += sl.packed.words.bytes();
  return n;
}

void ViTCuda::set_shift_path(ViTCudaShiftPath path) {
  Impl& m = *impl_;
  if (path == m.shift_mode) return;
  m.shift_mode = path;
  if (m.shift_layers.empty()) return;
  SAV_CUDA_CHECK(cudaDeviceSynchronize());  // replays in flight
  m.graphs.clear();                         // captured with the other products
}

ViTCudaShiftPath ViTCuda::shift_path() const { return impl_->shift_mode; }

int ViTCuda::shift_layer_count() const { return static_cast<int>(impl_->shift_layers.size()); }

std::vector<ViTCudaShiftChoice> ViTCuda::shift_choices(int B) const {
  const Impl& m = *impl_;
  std::vector<ViTCudaShiftChoice> out;
  if (m.shift_layers.empty() || B < 1 || m.use_fused(B)) return out;
  const int M = B * m.cfg.tokens();
  std::set<int> rows_fused;  // the shift layers a forward of B runs in a rows-fused proj kernel (as Impl::enqueue)
  const auto forms = m.forms_for(M);
  for (const auto& w : m.blocks) {
    const Impl::ProjRun run = m.proj_run(w, B, forms);
    if (w.proj.shift >= 0 && run != Impl::ProjRun::own) rows_fused.insert(w.proj.shift);
    if (w.qkv.shift >= 0 && run == Impl::ProjRun::block) rows_fused.insert(w.qkv.shift);
  }
  for (size_t i = 0; i < m.shift_layers.size(); ++i) {
    const ShiftLayer& sl = m.shift_layers[i];
    ViTCudaShiftChoice c;
    c.layer = sl.name;
    cuda::ShiftPath path = cuda::shift_path_cublas_decoded;
    const bool can_pack = sl.packed_ok && M <= cuda::shift_gpu_max_rows;  // as Impl::shift_path_for
    if (rows_fused.count(static_cast<int>(i))) {
      c.path = "rows_fused";
      out.push_back(std::move(c));
      continue;
    }
    if (can_pack && m.shift_mode == ViTCudaShiftPath::packed_mma) {
      path = cuda::shift_path_packed_mma;
    } else if (can_pack && m.shift_mode == ViTCudaShiftPath::automatic) {
      const auto it = sl.chosen.find(M);
      if (it == sl.chosen.end()) return {};  // not chosen for B yet
      path = it->second.path;
      c.cublas_us = it->second.cublas_us, c.packed_us = it->second.packed_us;
    }
    c.path = cuda::shift_path_name(path);
    out.push_back(std::move(c));
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> ViTCuda::shift_paths(int B) const {
  std::vector<std::pair<std::string, std::string>> out;
  for (ViTCudaShiftChoice& c : shift_choices(B)) out.emplace_back(std::move(c.layer), std::move(c.path));
  return out;
}

int ViTCuda::graph_count() const { return impl_->graphs.size(); }

std::vector<std::pair<std::string, std::vector<int8_t>>> ViTCuda::moe_choices() const {
  const Impl& m = *impl_;
  std::vector<std::pair<std::string, std::vector<int8_t>>> out;
  SAV_CUDA_CHECK(cudaDeviceSynchronize());
  const size_t stride = size_t(m.capacity) * m.cfg.tokens();
  for (size_t i = 0; i < m.moe_names.size(); ++i) {
    std::vector<int8_t> ch(m.last_rows);
    if (m.last_rows > 0)
      SAV_CUDA_CHECK(cudaMemcpy(ch.data(), m.choices.get() + i * stride, ch.size(), cudaMemcpyDeviceToHost));
    out.emplace_back(m.moe_names[i], std::move(ch));
  }
  return out;
}

void ViTCuda::forward_eager(const float* images, float* logits, int B, cudaStream_t stream) {
  SAV_CHECK(B >= 1, "ViTCuda: batch size must be positive, got " << B);
  SAV_CHECK(images && logits, "ViTCuda: null images or logits pointer");
  impl_->run(images, logits, B, stream, false);
}

void ViTCuda::forward(const float* images, float* logits, int B, cudaStream_t stream) {
  SAV_CHECK(B >= 1, "ViTCuda: batch size must be positive, got " << B);
  SAV_CHECK(images && logits, "ViTCuda: null images or logits pointer");
  impl_->run(images, logits, B, stream, true);
}

void ViTCuda::set_row_fusion(ViTCudaRowFusion mode) {
  Impl& m = *impl_;
  if (mode == m.row_mode) return;
  m.row_mode = mode;
  m.drop_choices();
}

ViTCudaRowFusion ViTCuda::row_fusion() const { return impl_->row_mode; }

void ViTCuda::set_dependent_launch(ViTCudaDependentLaunch mode) {
  Impl& m = *impl_;
  if (mode == m.dep_mode) return;
  m.dep_mode = mode;
  m.drop_choices();
}

ViTCudaDependentLaunch ViTCuda::dependent_launch() const { return impl_->dep_mode; }

std::vector<ViTCudaRowChoice> ViTCuda::row_fusion_choices(int B) const {
  const auto it = impl_->row_timings.find(B * impl_->cfg.tokens());
  return it == impl_->row_timings.end() ? std::vector<ViTCudaRowChoice>{} : it->second;
}

void ViTCuda::set_path(ViTCudaPath path) {
  SAV_CHECK(path != ViTCudaPath::fused || impl_->fused_model,
            "ViTCuda: the fused kernel needs Hamming attention in every block and sizes it covers "
            "(ops/cuda/vit_fused.h)");
  impl_->path_mode = path;
}

const char* ViTCuda::path_name(int B) const { return impl_->use_fused(B) ? "fused" : "layered"; }

bool ViTCuda::fused_supported(int B) const { return impl_->fused_ok(B); }

std::string ViTCuda::fused_trace(int B) {
  SAV_CHECK(fused_supported(B), "ViTCuda: the fused kernel does not cover this model at batch " << B);
  Impl& m = *impl_;
  const VitConfig& c = m.cfg;
  m.ensure_capacity(B);
  m.fused_ws.ensure(m.fused.dims, B);
  DeviceBuffer<float> img(size_t(B) * c.in_chans * c.img_size * c.img_size), logits(size_t(B) * c.num_classes);
  img.fill_bytes(0);
  cuda::Stream s;
  cuda::vit_fused_forward(m.fused, B, img.get(), logits.get(), m.fused_ws, s.get());  // warm-up
  return cuda::vit_fused_trace(m.fused, B, img.get(), logits.get(), m.fused_ws, s.get());
}

void ViTCuda::forward_host(const float* images, float* logits, int B) {
  SAV_CHECK(B >= 1, "ViTCuda: batch size must be positive, got " << B);
  const VitConfig& c = impl_->cfg;
  const size_t ni = size_t(B) * c.in_chans * c.img_size * c.img_size, nl = size_t(B) * c.num_classes;
  DeviceBuffer<float> d_img(ni), d_logits(nl);
  cuda::Stream s;
  SAV_CUDA_CHECK(cudaMemcpyAsync(d_img.get(), images, ni * sizeof(float), cudaMemcpyHostToDevice, s.get()));
  forward(d_img.get(), d_logits.get(), B, s.get());
  SAV_CUDA_CHECK(cudaMemcpyAsync(logits, d_logits.get(), nl * sizeof(float), cudaMemcpyDeviceToHost, s.get()));
  s.sync();
}

double vit_cuda_median_ms(ViTCuda& net, int batch, int iters) {
  const VitConfig& c = net.config();
  DeviceBuffer<float> logits(size_t(batch) * c.num_classes);
  return cuda::median_forward_ms(batch, size_t(c.in_chans) * c.img_size * c.img_size, iters,
                                 [&](const float* x, cudaStream_t s) { net.forward(x, logits.get(), batch, s); });
}

}  // namespace sav
