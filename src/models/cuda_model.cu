// What the GPU models share: the weight pool, the per-batch-size CUDA graphs, the latency timer. See
// cuda_model.h.
#include <algorithm>
#include <random>

#include "core/error.h"
#include "models/cuda_model.h"

namespace sav::cuda {

namespace {
constexpr size_t kAlign = 256;
}

size_t WeightPool::add(const void* p, size_t n) {
  SAV_CHECK(dev_.bytes() == 0, "WeightPool: add after upload");
  const size_t off = (host_.size() + kAlign - 1) / kAlign * kAlign;
  host_.resize(off + n);
  if (n) std::memcpy(host_.data() + off, p, n);
  return off;
}

size_t WeightPool::add_bf16(const Tensor& t) {
  const std::vector<bf16> v = to_bf16(t.f32(), size_t(t.numel()));
  return add(v.data(), sizeof(bf16) * v.size());
}

void WeightPool::upload() {
  dev_.resize(std::max<size_t>(host_.size(), 1));
  if (!host_.empty()) dev_.upload(host_);
  host_.clear();
  host_.shrink_to_fit();
}

const unsigned char* WeightPool::at(size_t off) const {
  SAV_CHECK(dev_.bytes() > 0, "WeightPool: pointer before upload");
  return dev_.get() + off;
}

void GraphCache::clear() {
  for (auto& [b, g] : graphs_)
    if (g.exec) cudaGraphExecDestroy(g.exec);
  graphs_.clear();
}

void GraphCache::launch(int B, const void* in, const void* out, cudaStream_t stream, cudaStream_t capture_stream,
                        const std::function<void(cudaStream_t)>& enqueue) {
  auto it = graphs_.find(B);
  if (it == graphs_.end() || it->second.in != in || it->second.out != out) {
    if (it == graphs_.end()) enqueue(stream);  // first use of this size: outside any capture
    SAV_CUDA_CHECK(cudaStreamBeginCapture(capture_stream, cudaStreamCaptureModeThreadLocal));
    cudaGraph_t g = nullptr;
    try {
      enqueue(capture_stream);
    } catch (...) {
      cudaStreamEndCapture(capture_stream, &g);  // leave the stream usable
      if (g) cudaGraphDestroy(g);
      throw;
    }
    SAV_CUDA_CHECK(cudaStreamEndCapture(capture_stream, &g));
    Entry& e = graphs_[B];
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
        graphs_.erase(B);
        SAV_CUDA_CHECK(err);
      }
    } else {
      cudaGraphDestroy(g);
    }
    e.in = in;
    e.out = out;
    it = graphs_.find(B);
  }
  SAV_CUDA_CHECK(cudaGraphLaunch(it->second.exec, stream));
}

double median_forward_ms(int batch, size_t in_elems, int iters,
                         const std::function<void(const float* x, cudaStream_t s)>& forward) {
  SAV_CHECK(batch >= 1 && iters >= 1, "median_forward_ms: batch " << batch << ", iters " << iters);
  std::vector<float> h(size_t(batch) * in_elems);
  std::mt19937 gen(1234);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& v : h) v = nd(gen);
  DeviceBuffer<float> img(h.size());
  img.upload(h);
  Stream s;
  return median_launch_us([&] { forward(img.get(), s.get()); }, s.get(), kForwardWarmups, iters) / 1000.0;
}

}  // namespace sav::cuda
