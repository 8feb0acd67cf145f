// Dense ViT inference on one GPU: weights uploaded once, activations sized for the largest batch seen, a
// CUDA graph per batch size. See vit_cuda.h.
#include "models/vit_cuda.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "ops/cuda/common.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/ops.h"

namespace sav {

using cuda::bf16;
using cuda::DeviceBuffer;

namespace {

constexpr size_t kAlign = 256;  // every tensor of the weight pool starts on a 256-byte boundary

// Host staging of the weight pool: f32 or bf16 copies appended at aligned offsets.
struct PoolBuilder {
  std::vector<unsigned char> bytes;
  size_t add(const void* p, size_t n) {
    const size_t off = (bytes.size() + kAlign - 1) / kAlign * kAlign;
    bytes.resize(off + n);
    std::memcpy(bytes.data() + off, p, n);
    return off;
  }
  size_t add_f32(const Tensor& t) { return add(t.f32(), sizeof(float) * t.numel()); }
  size_t add_bf16(const Tensor& t) {
    const std::vector<bf16> v = cuda::to_bf16(t.f32(), t.numel());
    return add(v.data(), sizeof(bf16) * v.size());
  }
};

struct BlockOffsets {
  size_t ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b;
};
struct BlockWeights {
  const float *ln1_w, *ln1_b, *ln2_w, *ln2_b, *proj_b, *fc2_b;
  const bf16 *qkv_w, *qkv_b, *proj_w, *fc1_w, *fc1_b, *fc2_w;
};

struct GraphEntry {
  cudaGraphExec_t exec = nullptr;
  const float* images = nullptr;
  float* logits = nullptr;
};

}  // namespace

struct ViTCuda::Impl {
  VitConfig cfg;
  DeviceBuffer<unsigned char> pool;
  const bf16 *patch_w = nullptr, *head_w = nullptr;
  const float *patch_b = nullptr, *cls = nullptr, *pos = nullptr, *norm_w = nullptr, *norm_b = nullptr,
              *head_b = nullptr;
  std::vector<BlockWeights> blocks;
  cuda::Gemm gemm;
  cuda::Stream capture_stream;

  // activations, sized for `capacity` images
  int capacity = 0;
  DeviceBuffer<float> x, pe;
  DeviceBuffer<bf16> xn, qkv, ao, hid, cols, clsn;
  std::map<int, GraphEntry> graphs;

  ~Impl() { drop_graphs(); }

  void drop_graphs() {
    for (auto& [b, g] : graphs)
      if (g.exec) cudaGraphExecDestroy(g.exec);
    graphs.clear();
  }

  void ensure_capacity(int B) {
    if (B <= capacity) return;
    SAV_CUDA_CHECK(cudaDeviceSynchronize());  // replays in flight may still read the old buffers
    drop_graphs();
    const size_t N = cfg.tokens(), C = cfg.dim, F = cfg.mlp_hidden, P = cfg.num_patches();
    const size_t K = size_t(cfg.in_chans) * cfg.patch * cfg.patch, M = size_t(B) * N;
    x.resize(M * C);
    pe.resize(size_t(B) * P * C);
    xn.resize(M * C);
    qkv.resize(M * 3 * C);
    ao.resize(M * C);
    hid.resize(M * F);
    cols.resize(size_t(B) * P * K);
    clsn.resize(size_t(B) * C);
    capacity = B;
  }

  void enqueue(const float* images, float* logits, int B, cudaStream_t s) {
    const int N = cfg.tokens(), C = cfg.dim, F = cfg.mlp_hidden, H = cfg.heads, P = cfg.num_patches();
    const int K = cfg.in_chans * cfg.patch * cfg.patch, M = B * N;
    const float eps = cfg.ln_eps;
    cuda::im2col_forward(cols.get(), images, B, cfg.in_chans, cfg.img_size, cfg.patch, s);
    gemm.linear_f32(pe.get(), cols.get(), patch_w, patch_b, B * P, K, C, false, s);
    const bool has_blocks = !blocks.empty();
    cuda::embed_layernorm_forward(has_blocks ? xn.get() : nullptr, x.get(), pe.get(), cls, pos,
                                  has_blocks ? blocks[0].ln1_w : nullptr, has_blocks ? blocks[0].ln1_b : nullptr, B,
                                  N, C, eps, s);
    for (size_t l = 0; l < blocks.size(); ++l) {
      const BlockWeights& w = blocks[l];
      if (l > 0) cuda::layernorm_forward(xn.get(), C, x.get(), C, w.ln1_w, w.ln1_b, M, C, eps, s);
      gemm.linear_bf16(qkv.get(), xn.get(), w.qkv_w, w.qkv_b, M, C, 3 * C, false, s);
      cuda::attention_forward(ao.get(), qkv.get(), B, N, C, H, s);
      gemm.linear_f32(x.get(), ao.get(), w.proj_w, w.proj_b, M, C, C, true, s);
      cuda::layernorm_forward(xn.get(), C, x.get(), C, w.ln2_w, w.ln2_b, M, C, eps, s);
      gemm.linear_bf16(hid.get(), xn.get(), w.fc1_w, w.fc1_b, M, C, F, true, s);
      gemm.linear_f32(x.get(), hid.get(), w.fc2_w, w.fc2_b, M, F, C, true, s);
    }
    // final norm on the class tokens (rows b*N), then the head
    cuda::layernorm_forward(clsn.get(), C, x.get(), N * C, norm_w, norm_b, B, C, eps, s);
    gemm.linear_f32(logits, clsn.get(), head_w, head_b, B, C, cfg.num_classes, false, s);
  }

  cudaGraph_t capture(const float* images, float* logits, int B) {
    cudaStream_t cs = capture_stream.get();
    SAV_CUDA_CHECK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
    try {
      enqueue(images, logits, B, cs);
    } catch (...) {
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(cs, &g);  // leave the stream usable
      if (g) cudaGraphDestroy(g);
      throw;
    }
    cudaGraph_t g = nullptr;
    SAV_CUDA_CHECK(cudaStreamEndCapture(cs, &g));
    return g;
  }
};

ViTCuda::ViTCuda(const Vit& model) : impl_(nullptr) {
  const VitConfig& c = model.config();
  SAV_CHECK(c.is_dense(), "ViTCuda runs dense ViT/DeiT models only; " << c.describe()
                                                                      << " has ShiftAddViT layers (run it on the CPU)");
  SAV_CHECK(cuda::attention_supports(c.tokens(), c.dim, c.heads),
            "ViTCuda: " << c.tokens() << " tokens and head size " << c.dim / c.heads
                        << " are beyond the CUDA attention kernel (N <= 256, head size <= 64)");
  SAV_CHECK(cuda::layernorm_supports(c.dim), "ViTCuda: width " << c.dim << " is beyond the CUDA LayerNorm (<= 1024)");
  SAV_CHECK(cuda::device_available(), "ViTCuda: no CUDA device is available");
  impl_ = std::make_unique<Impl>();
  Impl& m = *impl_;
  m.cfg = c;
  const ParamSet& ps = model.params();
  auto T = [&](const std::string& n) -> const Tensor& { return ps.get(n); };

  PoolBuilder pb;
  const size_t o_patch_w = pb.add_bf16(T("patch_embed.proj.weight"));  // (C, Cin*p*p) viewed as a matrix
  const size_t o_patch_b = pb.add_f32(T("patch_embed.proj.bias"));
  const size_t o_cls = pb.add_f32(T("cls_token"));
  const size_t o_pos = pb.add_f32(T("pos_embed"));
  std::vector<BlockOffsets> bo(c.depth);
  for (int l = 0; l < c.depth; ++l) {
    const std::string p = "blocks." + std::to_string(l) + ".";
    BlockOffsets& o = bo[l];
    o.ln1_w = pb.add_f32(T(p + "norm1.weight"));
    o.ln1_b = pb.add_f32(T(p + "norm1.bias"));
    o.qkv_w = pb.add_bf16(T(p + "attn.qkv.weight"));
    o.qkv_b = pb.add_bf16(T(p + "attn.qkv.bias"));
    o.proj_w = pb.add_bf16(T(p + "attn.proj.weight"));
    o.proj_b = pb.add_f32(T(p + "attn.proj.bias"));
    o.ln2_w = pb.add_f32(T(p + "norm2.weight"));
    o.ln2_b = pb.add_f32(T(p + "norm2.bias"));
    o.fc1_w = pb.add_bf16(T(p + "mlp.fc1.weight"));
    o.fc1_b = pb.add_bf16(T(p + "mlp.fc1.bias"));
    o.fc2_w = pb.add_bf16(T(p + "mlp.fc2.weight"));
    o.fc2_b = pb.add_f32(T(p + "mlp.fc2.bias"));
  }
  const size_t o_norm_w = pb.add_f32(T("norm.weight"));
  const size_t o_norm_b = pb.add_f32(T("norm.bias"));
  const size_t o_head_w = pb.add_bf16(T("head.weight"));
  const size_t o_head_b = pb.add_f32(T("head.bias"));

  m.pool.resize(pb.bytes.size());
  m.pool.upload(pb.bytes);
  const unsigned char* base = m.pool.get();
  auto F32 = [&](size_t off) { return reinterpret_cast<const float*>(base + off); };
  auto B16 = [&](size_t off) { return reinterpret_cast<const bf16*>(base + off); };
  m.patch_w = B16(o_patch_w), m.patch_b = F32(o_patch_b), m.cls = F32(o_cls), m.pos = F32(o_pos);
  m.norm_w = F32(o_norm_w), m.norm_b = F32(o_norm_b), m.head_w = B16(o_head_w), m.head_b = F32(o_head_b);
  for (const BlockOffsets& o : bo)
    m.blocks.push_back({F32(o.ln1_w), F32(o.ln1_b), F32(o.ln2_w), F32(o.ln2_b), F32(o.proj_b), F32(o.fc2_b),
                        B16(o.qkv_w), B16(o.qkv_b), B16(o.proj_w), B16(o.fc1_w), B16(o.fc1_b), B16(o.fc2_w)});
}

ViTCuda::~ViTCuda() = default;

const VitConfig& ViTCuda::config() const { return impl_->cfg; }
size_t ViTCuda::weight_bytes() const { return impl_->pool.bytes(); }
int ViTCuda::graph_count() const { return static_cast<int>(impl_->graphs.size()); }

void ViTCuda::forward_eager(const float* images, float* logits, int B, cudaStream_t stream) {
  SAV_CHECK(B >= 1, "ViTCuda: batch size must be positive, got " << B);
  SAV_CHECK(images && logits, "ViTCuda: null images or logits pointer");
  impl_->ensure_capacity(B);
  impl_->enqueue(images, logits, B, stream);
}

void ViTCuda::forward(const float* images, float* logits, int B, cudaStream_t stream) {
  SAV_CHECK(B >= 1, "ViTCuda: batch size must be positive, got " << B);
  SAV_CHECK(images && logits, "ViTCuda: null images or logits pointer");
  Impl& m = *impl_;
  m.ensure_capacity(B);
  auto it = m.graphs.find(B);
  if (it == m.graphs.end() || it->second.images != images || it->second.logits != logits) {
    if (it == m.graphs.end()) {
      // First use of this size: run the kernels once outside any capture (module loading, algorithm
      // choice), then capture.
      m.enqueue(images, logits, B, stream);
    }
    cudaGraph_t g = m.capture(images, logits, B);
    GraphEntry& e = m.graphs[B];
    bool updated = false;
    if (e.exec) {
      cudaGraphExecUpdateResultInfo info{};
      updated = cudaGraphExecUpdate(e.exec, g, &info) == cudaSuccess;
      if (!updated) {
        cudaGetLastError();
        cudaGraphExecDestroy(e.exec);
        e.exec = nullptr;
      }
    }
    if (!updated) {
      const cudaError_t err = cudaGraphInstantiate(&e.exec, g, 0);
      cudaGraphDestroy(g);
      if (err != cudaSuccess) {
        m.graphs.erase(B);
        SAV_CUDA_CHECK(err);
      }
    } else {
      cudaGraphDestroy(g);
    }
    e.images = images;
    e.logits = logits;
    it = m.graphs.find(B);
  }
  SAV_CUDA_CHECK(cudaGraphLaunch(it->second.exec, stream));
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
  SAV_CHECK(batch >= 1 && iters >= 1, "vit_cuda_median_ms: batch " << batch << ", iters " << iters);
  const VitConfig& c = net.config();
  const size_t ni = size_t(batch) * c.in_chans * c.img_size * c.img_size;
  std::vector<float> h(ni);
  std::mt19937 gen(1234);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& v : h) v = nd(gen);
  DeviceBuffer<float> img(ni), logits(size_t(batch) * c.num_classes);
  img.upload(h);
  cuda::Stream s;
  for (int i = 0; i < 10; ++i) net.forward(img.get(), logits.get(), batch, s.get());  // capture + warm-up
  s.sync();
  cuda::Event e0, e1;
  std::vector<float> ms(iters);
  for (int i = 0; i < iters; ++i) {
    SAV_CUDA_CHECK(cudaEventRecord(e0.get(), s.get()));
    net.forward(img.get(), logits.get(), batch, s.get());
    SAV_CUDA_CHECK(cudaEventRecord(e1.get(), s.get()));
    SAV_CUDA_CHECK(cudaEventSynchronize(e1.get()));
    SAV_CUDA_CHECK(cudaEventElapsedTime(&ms[i], e0.get(), e1.get()));
  }
  std::sort(ms.begin(), ms.end());
  return ms[iters / 2];
}

}  // namespace sav
