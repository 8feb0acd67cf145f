// shiftaddvit CUDA backend: error checks, RAII device memory, small helpers. Host code only (includable
// from .cpp files compiled by the host compiler and from .cu files).
//
//   SAV_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream));   // throws sav::Error
//   sav::cuda::DeviceBuffer<float> x(M * C);                                         // cudaMalloc / cudaFree
//   x.upload(host_vector);  std::vector<float> h = x.download();
//   if (!sav::cuda::device_available()) { /* no GPU: skip or fall back to the CPU engine */ }
//
// Every CUDA runtime and cuBLAS call of the backend goes through a check macro, so a failure surfaces as a
// sav::Error carrying file:line, the failed call and the error's name; nothing exits or aborts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "core/error.h"

#define SAV_CUDA_CHECK(expr)                                                                                        \
  do {                                                                                                              \
    const cudaError_t sav_e_ = (expr);                                                                              \
    if (sav_e_ != cudaSuccess)                                                                                      \
      SAV_THROW("CUDA call failed: " #expr " -> " << cudaGetErrorName(sav_e_) << " (" << cudaGetErrorString(sav_e_) \
                                                  << "); check the device, the driver and the sizes");              \
  } while (0)

// After a kernel launch: reports launch-configuration errors (grid, block, shared memory) at the launcher.
#define SAV_CUDA_CHECK_LAUNCH() SAV_CUDA_CHECK(cudaGetLastError())

namespace sav::cuda {

using bf16 = __nv_bfloat16;

// True when at least one CUDA device is usable (false on machines with nvcc but no GPU or driver).
bool device_available();
// Multiprocessor count of the current device (cached per device).
int sm_count();
// Opt-in shared memory per block of the current device, in bytes.
int max_smem_per_block();
// Lets `kernel` (a __global__ function) take `smem` bytes of dynamic shared memory (cudaFuncSetAttribute past the
// 48 KB default; remembered per kernel, so a later call, e.g. while a graph is captured, sets nothing). Throws if
// the device offers less.
void allow_dynamic_smem(const void* kernel, size_t smem);
// Whether `kernel` runs on this device as thread-block clusters of `cluster` CTAs of `threads` threads with `smem`
// dynamic shared memory bytes each (cached per kernel, cluster size, threads and bytes; it also allows the kernel its
// shared memory and, when non_portable, cluster sizes above 8). A refused size leaves no CUDA error behind.
bool cluster_fits(const void* kernel, int cluster, int threads, size_t smem, bool non_portable);
// Compute capability major of the current device (cached per device; 9 for Hopper: thread-block clusters).
int device_cc_major();
// Programmatic dependent launch (sm_90) of the engine's own kernels. Inside a DependentLaunchScope(true) on a
// thread, the kernels launched by launch_dependent (launch.cuh) carry the programmatic-stream-serialization
// attribute: such a kernel may start while its predecessor on the stream still runs, stages what does not depend on
// it (weights), then waits (griddepcontrol.wait) for the predecessor's end and memory before it reads an activation
// or writes anything. Each such kernel lets its own dependents start at its beginning. Outside a scope (the
// default) every launch keeps ordinary stream order. Scopes nest; the flag is per thread.
bool dependent_launch();
class DependentLaunchScope {
 public:
  explicit DependentLaunchScope(bool on);
  ~DependentLaunchScope();
  DependentLaunchScope(const DependentLaunchScope&) = delete;
  DependentLaunchScope& operator=(const DependentLaunchScope&) = delete;

 private:
  bool prev_;
};
// Kernel timeline (a diagnostic: sav_cuda_bench --timeline). While enabled, the block kernels (ham_block,
// mlp_block) launched afterwards (graphs captured afterwards included) append one record per CTA: %globaltimer ns at
// the kernel's entry, after its dependent-launch wait, and at its exit, and the SM it ran on. Records past the
// buffer's capacity are dropped. timeline_sink() is {nullptr, nullptr, 0} while disabled, which records nothing.
struct TimelineRec {
  uint32_t kind, cta, smid, pad;  // kind: kTimelineHamBlock or kTimelineMlpBlock
  uint64_t t_entry, t_waited, t_exit;
};
constexpr uint32_t kTimelineHamBlock = 1, kTimelineMlpBlock = 2;
struct TimelineSink {
  unsigned* count;
  TimelineRec* recs;
  unsigned cap;
};
#ifdef __CUDACC__
// %globaltimer in ns (the timeline's stamps; also the fused kernel's trace)
__device__ __forceinline__ uint64_t timeline_now() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// One CTA's record (call from one thread, at the kernel's exit); nothing when the sink is empty.
__device__ __forceinline__ void timeline_record(const TimelineSink& s, uint32_t kind, uint64_t t_entry,
                                                uint64_t t_waited) {
  if (!s.recs) return;
  const unsigned i = atomicAdd(s.count, 1u);
  if (i >= s.cap) return;
  uint32_t sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  s.recs[i] = TimelineRec{kind, blockIdx.x, sm, 0u, t_entry, t_waited, timeline_now()};
}
#endif
void timeline_enable();  // allocates the buffer on first use
TimelineSink timeline_sink();
void timeline_reset();                        // drops the records so far (synchronises the device)
std::vector<TimelineRec> timeline_collect();  // synchronises the device; the records in the order written
// The phase mask of a SAV_ABLATION diagnostic build of the block kernels (ham_block.cu, mlp_block.cu): the environment
// variable SAV_ABLATE (0x.. or decimal), read on first use; 0 when unset.
unsigned ablation_mask();
// Whether a device or host pointer is 16-byte aligned (16-byte vector loads and copies).
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
// Blocks for a grid-stride loop over `work` items with `threads` per block: enough to cover the work, at most
// 16 per SM, at least 1.
inline int grid_stride_blocks(int64_t work, int threads) {
  const int64_t need = (work + threads - 1) / threads, cap = int64_t(sm_count()) * 16;
  return int(need < 1 ? 1 : need < cap ? need : cap);
}

// Owning device allocation of n elements of T; move-only. Memory is not initialised.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { resize(n); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  // Reallocates (contents lost) when n differs from the current size.
  void resize(size_t n) {
    if (n == n_) return;
    release();
    if (n > 0) {
      void* p = nullptr;
      const cudaError_t e = cudaMalloc(&p, n * sizeof(T));
      if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();  // clear the sticky-free error so the caller can go on
        size_t free_b = 0, total_b = 0;
        (void)cudaMemGetInfo(&free_b, &total_b);
        SAV_THROW("out of GPU memory: allocating " << (n * sizeof(T) >> 20) << " MiB with " << (free_b >> 20)
                                                   << " MiB free of " << (total_b >> 20)
                                                   << " MiB; try a smaller --batch or a smaller model");
      }
      SAV_CUDA_CHECK(e);
      p_ = static_cast<T*>(p);
      n_ = n;
    }
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }
  // Synchronous copies (the device is synchronised, so work on any stream sees or has finished with the
  // data): for set-up and tests, not for hot paths.
  void upload(const T* host, size_t n) {
    SAV_CHECK(n <= n_, "upload of " << n << " elements into a device buffer of " << n_);
    SAV_CUDA_CHECK(cudaMemcpy(p_, host, n * sizeof(T), cudaMemcpyHostToDevice));
    SAV_CUDA_CHECK(cudaDeviceSynchronize());
  }
  void upload(const std::vector<T>& v) { upload(v.data(), v.size()); }
  std::vector<T> download() const {
    std::vector<T> v(n_);
    SAV_CUDA_CHECK(cudaDeviceSynchronize());
    if (n_) SAV_CUDA_CHECK(cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
  // Sets every byte to `byte` (0xFF makes float NaN and bf16 NaN: a poison that a test can detect).
  void fill_bytes(int byte) {
    if (n_) SAV_CUDA_CHECK(cudaMemset(p_, byte, n_ * sizeof(T)));
    SAV_CUDA_CHECK(cudaDeviceSynchronize());
  }

 private:
  void release() noexcept {
    if (p_) cudaFree(p_);  // never throws from a destructor
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  size_t n_ = 0;
};

// RAII CUDA stream / event / graph-exec handles.
class Stream {
 public:
  Stream() { SAV_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() {
    if (s_) cudaStreamDestroy(s_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  void sync() const { SAV_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

class Event {
 public:
  Event() { SAV_CUDA_CHECK(cudaEventCreate(&e_)); }
  ~Event() {
    if (e_) cudaEventDestroy(e_);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

// Host-side conversions (round to nearest even), for uploads of weights and test data.
std::vector<bf16> to_bf16(const float* x, size_t n);
std::vector<float> from_bf16(const std::vector<bf16>& x);

// Median microseconds of `runs` calls of launch() on `stream`, each between two CUDA events, after `warmups`
// untimed calls and a stream synchronisation (benchmarks, the engine's per-shape path choices). Synchronises
// `stream`; runs >= 1; not during stream capture.
double median_launch_us(const std::function<void()>& launch, cudaStream_t stream, int warmups, int runs);
// Median microseconds of one call of launch(stream) inside a CUDA graph, the way a model's forward runs it: `reps`
// calls captured on `stream` (one that may be captured: not the legacy default stream), the graph replayed `runs`
// times after one untimed replay, CUDA events around each; the median replay / reps. Run launch once outside the
// capture first when it makes lazy choices (algorithms, plans). Synchronises `stream`; reps, runs >= 1.
double median_graph_us(const std::function<void(cudaStream_t)>& launch, cudaStream_t stream, int reps, int runs);

}  // namespace sav::cuda
