// shiftaddvit CUDA backend: launching the engine's own kernels over thread-block clusters, and with programmatic
// dependent launch (host code of .cu files, sm_90).
//
//   launch_cluster(kernel, grid, block, smem, cluster, stream, params);    // cluster c = CTAs c G .. c G + G - 1
//   launch_dependent(kernel, grid, block, smem, cluster, stream, params);  // the same, and under a
//                                                                          // DependentLaunchScope(true) (common.h)
//                                                                          // it may start before its predecessor ends
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "ops/cuda/common.h"

namespace sav::cuda {

// a shared-memory layout's next 16-byte boundary (host and device)
__host__ __device__ constexpr size_t align16(size_t x) { return (x + 15) / 16 * 16; }
// the least row stride >= n floats that is 8 mod 32 words: the mma accumulators' float2 stores of rows g = 0 .. 7 (4
// lanes each) fall in two wavefronts, not eight
__host__ __device__ constexpr int ld_8mod32(int n) { return n + ((8 - n) % 32 + 32) % 32; }

// `kernel` on `grid` x `block` with `smem` dynamic shared memory bytes (allowed first: allow_dynamic_smem), in
// clusters of `cluster` consecutive CTAs along x (1: no cluster attribute, an ordinary launch), on `stream`, with
// programmatic stream serialization allowed when `dependent`; checked.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, int cluster, bool dependent,
                   cudaStream_t stream, Args&&... args) {
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = static_cast<unsigned>(cluster);
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  if (dependent) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  SAV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
  SAV_CUDA_CHECK_LAUNCH();
}

template <class... Params, class... Args>
void launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, int cluster, cudaStream_t stream,
                    Args&&... args) {
  launch_kernel(kernel, grid, block, smem, cluster, false, stream, std::forward<Args>(args)...);
}

// For kernels that call ptx::pdl_wait() before they read an activation or write anything (and ptx::pdl_trigger()
// at their start): dependent launch inside a DependentLaunchScope(true) on this thread, else as launch_cluster.
template <class... Params, class... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, int cluster, cudaStream_t stream,
                      Args&&... args) {
  launch_kernel(kernel, grid, block, smem, cluster, dependent_launch(), stream, std::forward<Args>(args)...);
}

}  // namespace sav::cuda
