// shiftaddvit CUDA backend: what the GPU models (ViTCuda, PvtCuda) share. Host code only.
//
//   sav::cuda::WeightPool pool;                       // host staging of the weights, 256-byte aligned
//   size_t o = pool.add_f32(tensor);  pool.upload();  const float* w = pool.f32(o);
//   sav::cuda::GraphCache graphs;                     // one CUDA graph per batch size
//   graphs.launch(B, images, logits, stream, capture_stream, [&](cudaStream_t s) { enqueue(..., s); });
//   double ms = sav::cuda::median_forward_ms(batch, in_elems, iters, [&](const float* x, cudaStream_t s) {...});
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <vector>

#include "core/tensor.h"
#include "ops/cuda/common.h"

namespace sav::cuda {

constexpr size_t kNoOffset = std::numeric_limits<size_t>::max();

// Host staging of a model's parameters as one device allocation: f32 or bf16 copies appended at 256-byte
// aligned offsets (what cuBLASLt's fastest algorithms want), uploaded once.
class WeightPool {
 public:
  size_t add(const void* p, size_t n);
  size_t add_f32(const Tensor& t) { return add(t.f32(), sizeof(float) * size_t(t.numel())); }
  size_t add_f32(const std::vector<float>& v) { return add(v.data(), sizeof(float) * v.size()); }
  size_t add_bf16(const Tensor& t);
  void upload();  // copies the staged bytes to the device (call once, after the last add)
  const float* f32(size_t off) const { return off == kNoOffset ? nullptr : reinterpret_cast<const float*>(at(off)); }
  const bf16* b16(size_t off) const { return off == kNoOffset ? nullptr : reinterpret_cast<const bf16*>(at(off)); }
  size_t bytes() const { return dev_.bytes(); }

 private:
  const unsigned char* at(size_t off) const;
  std::vector<unsigned char> host_;
  DeviceBuffer<unsigned char> dev_;
};

// A captured CUDA graph per batch size, re-captured (and updated in place when the topology allows) when the
// caller's input / output pointers change. The first launch of a size runs the work once outside any capture
// (module loading, cuBLASLt algorithm choice), then captures it on `capture_stream`.
class GraphCache {
 public:
  GraphCache() = default;
  ~GraphCache() { clear(); }
  GraphCache(const GraphCache&) = delete;
  GraphCache& operator=(const GraphCache&) = delete;
  void clear();
  int size() const { return static_cast<int>(graphs_.size()); }
  void launch(int B, const void* in, const void* out, cudaStream_t stream, cudaStream_t capture_stream,
              const std::function<void(cudaStream_t)>& enqueue);

 private:
  struct Entry {
    cudaGraphExec_t exec = nullptr;
    const void* in = nullptr;
    const void* out = nullptr;
  };
  std::map<int, Entry> graphs_;
};

// Median wall time in ms of forward(x, stream) at `batch` with x (batch * in_elems) random normal floats on
// the device: kForwardWarmups warm-up calls (the first captures the graph), then `iters` timed ones, CUDA events
// around each.
constexpr int kForwardWarmups = 10;
double median_forward_ms(int batch, size_t in_elems, int iters,
                         const std::function<void(const float* x, cudaStream_t s)>& forward);

}  // namespace sav::cuda
