// Device queries, host bf16 conversions and the f32 -> bf16 conversion kernel.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "ops/cuda/common.h"
#include "ops/cuda/ops.h"

namespace sav::cuda {

bool device_available() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device / no driver" error
    return false;
  }
  return n > 0;
}

bool cluster_fits(const void* kernel, int cluster, int threads, size_t smem, bool non_portable) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, size_t>, bool> known;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, cluster, threads, smem);
  if (auto it = known.find(key); it != known.end()) return it->second;
  allow_dynamic_smem(kernel, smem);  // smem <= the device's limit: checked by the caller
  bool ok =
      !non_portable || cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
  if (ok) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(cluster));
    cfg.blockDim = dim3(static_cast<unsigned>(threads));
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = static_cast<unsigned>(cluster), attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
    cfg.attrs = &attr, cfg.numAttrs = 1;
    int clusters = 0;
    ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess && clusters >= 1;
  }
  cudaGetLastError();
  known[key] = ok;
  return ok;
}

namespace {
struct DeviceInfo {
  int sms = 0, smem_optin = 0, cc_major = 0;
};
DeviceInfo device_info() {
  static std::mutex mu;
  static DeviceInfo cache[64];
  int dev = 0;
  SAV_CUDA_CHECK(cudaGetDevice(&dev));
  SAV_CHECK(dev >= 0 && dev < 64, "CUDA device index " << dev << " out of range");
  std::lock_guard<std::mutex> lock(mu);
  DeviceInfo& d = cache[dev];
  if (d.sms == 0) {
    SAV_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
    SAV_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    SAV_CUDA_CHECK(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev));
  }
  return d;
}
}  // namespace

int sm_count() { return device_info().sms; }
int max_smem_per_block() { return device_info().smem_optin; }
int device_cc_major() { return device_info().cc_major; }

void allow_dynamic_smem(const void* kernel, size_t smem) {
  if (smem <= 48 * 1024) return;
  static std::mutex mu;
  static std::vector<std::pair<const void*, size_t>> done;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& d : done)
    if (d.first == kernel && d.second >= smem) return;
  SAV_CHECK(smem <= size_t(max_smem_per_block()), "a kernel needs "
                                                      << smem << " bytes of shared memory per block, the device offers "
                                                      << max_smem_per_block());
  SAV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  done.emplace_back(kernel, smem);
}

namespace {
thread_local bool t_dependent_launch = false;
}
bool dependent_launch() { return t_dependent_launch; }
DependentLaunchScope::DependentLaunchScope(bool on) : prev_(t_dependent_launch) { t_dependent_launch = on; }
DependentLaunchScope::~DependentLaunchScope() { t_dependent_launch = prev_; }

namespace {
struct TimelineState {
  DeviceBuffer<unsigned> count;
  DeviceBuffer<TimelineRec> recs;
};
TimelineState& timeline_state() {
  static TimelineState s;
  return s;
}
}  // namespace
void timeline_enable() {
  TimelineState& s = timeline_state();
  if (s.recs.size()) return;
  s.recs.resize(size_t(1) << 18);
  s.count.resize(1);
  timeline_reset();
}
TimelineSink timeline_sink() {
  TimelineState& s = timeline_state();
  return {s.count.get(), s.recs.get(), static_cast<unsigned>(s.recs.size())};
}
void timeline_reset() {
  TimelineState& s = timeline_state();
  SAV_CHECK(s.recs.size(), "timeline_reset: the timeline is not enabled");
  SAV_CUDA_CHECK(cudaDeviceSynchronize());
  SAV_CUDA_CHECK(cudaMemset(s.count.get(), 0, sizeof(unsigned)));
}
std::vector<TimelineRec> timeline_collect() {
  TimelineState& s = timeline_state();
  SAV_CHECK(s.recs.size(), "timeline_collect: the timeline is not enabled");
  SAV_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<unsigned> n = s.count.download();
  std::vector<TimelineRec> all = s.recs.download();
  all.resize(std::min<size_t>(n[0], all.size()));
  return all;
}

unsigned ablation_mask() {
  static const unsigned mask = [] {
    const char* v = std::getenv("SAV_ABLATE");
    return v ? static_cast<unsigned>(std::strtoul(v, nullptr, 0)) : 0u;
  }();
  return mask;
}

std::vector<bf16> to_bf16(const float* x, size_t n) {
  std::vector<bf16> y(n);
  for (size_t i = 0; i < n; ++i) {
    __nv_bfloat16_raw r;
    r.x = float_to_bf16(x[i]);
    y[i] = bf16(r);
  }
  return y;
}

std::vector<float> from_bf16(const std::vector<bf16>& x) {
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const __nv_bfloat16_raw r(x[i]);
    y[i] = bf16_to_float(r.x);
  }
  return y;
}

namespace {
__global__ void f32_to_bf16_kernel(bf16* y, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}
}  // namespace

void f32_to_bf16(bf16* y, const float* x, int64_t n, cudaStream_t stream) {
  SAV_CHECK(n >= 0 && (n == 0 || (y && x)), "f32_to_bf16: bad arguments");
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65535);
  f32_to_bf16_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(y, x, n);
  SAV_CUDA_CHECK_LAUNCH();
}

double median_launch_us(const std::function<void()>& launch, cudaStream_t stream, int warmups, int runs) {
  SAV_CHECK(runs >= 1 && warmups >= 0, "median_launch_us: runs " << runs << ", warm-ups " << warmups);
  for (int i = 0; i < warmups; ++i) launch();
  SAV_CUDA_CHECK(cudaStreamSynchronize(stream));
  Event e0, e1;
  std::vector<float> ms(static_cast<size_t>(runs));
  for (float& t : ms) {
    SAV_CUDA_CHECK(cudaEventRecord(e0.get(), stream));
    launch();
    SAV_CUDA_CHECK(cudaEventRecord(e1.get(), stream));
    SAV_CUDA_CHECK(cudaEventSynchronize(e1.get()));
    SAV_CUDA_CHECK(cudaEventElapsedTime(&t, e0.get(), e1.get()));
  }
  std::sort(ms.begin(), ms.end());
  return 1000.0 * ms[ms.size() / 2];
}

double median_graph_us(const std::function<void(cudaStream_t)>& launch, cudaStream_t stream, int reps, int runs) {
  SAV_CHECK(reps >= 1 && runs >= 1, "median_graph_us: reps " << reps << ", runs " << runs);
  SAV_CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaGraph_t graph = nullptr;
  SAV_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  try {
    for (int i = 0; i < reps; ++i) launch(stream);
  } catch (...) {
    cudaStreamEndCapture(stream, &graph);  // leave the stream usable
    if (graph) cudaGraphDestroy(graph);
    throw;
  }
  SAV_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  SAV_CUDA_CHECK(inst);
  std::vector<float> ms(static_cast<size_t>(runs));
  cudaError_t err = cudaGraphLaunch(exec, stream);
  {
    Event e0, e1;
    for (size_t i = 0; i < ms.size() && err == cudaSuccess; ++i) {
      err = cudaEventRecord(e0.get(), stream);
      if (err == cudaSuccess) err = cudaGraphLaunch(exec, stream);
      if (err == cudaSuccess) err = cudaEventRecord(e1.get(), stream);
      if (err == cudaSuccess) err = cudaEventSynchronize(e1.get());
      if (err == cudaSuccess) err = cudaEventElapsedTime(&ms[i], e0.get(), e1.get());
    }
  }
  cudaStreamSynchronize(stream);
  cudaGraphExecDestroy(exec);
  SAV_CUDA_CHECK(err);
  std::sort(ms.begin(), ms.end());
  return 1000.0 * ms[ms.size() / 2] / reps;
}

}  // namespace sav::cuda
