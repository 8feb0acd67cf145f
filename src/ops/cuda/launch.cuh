// shiftaddvit CUDA backend: launching a kernel over thread-block clusters (host code of .cu files, sm_90).
//
//   launch_cluster(kernel, grid, block, smem, cluster, stream, params);  // cluster c = CTAs c G .. c G + G - 1
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "ops/cuda/common.h"

namespace sav::cuda {

// `kernel` on `grid` x `block` with `smem` dynamic shared memory bytes (allowed first: allow_dynamic_smem), in
// clusters of `cluster` consecutive CTAs along x (1: no cluster attribute, an ordinary launch), on `stream`; checked.
template <class... Params, class... Args>
void launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, int cluster, cudaStream_t stream,
                    Args&&... args) {
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster > 1 ? 1 : 0;
  SAV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
  SAV_CUDA_CHECK_LAUNCH();
}

}  // namespace sav::cuda
