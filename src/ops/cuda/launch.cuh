// shiftaddvit CUDA backend: one launcher for the engine's own kernels that honours DependentLaunchScope
// (common.h). Include from .cu files.
//
//   cuda::launch(my_kernel, grid, block, smem, stream, arg0, arg1);   // my_kernel calls ptx::pdl_trigger() at its
//                                                                     // start and ptx::pdl_wait() before it reads
//                                                                     // an activation or writes anything
#pragma once

#include <utility>

#include "ops/cuda/common.h"

namespace sav::cuda {

// Launches kernel<<<grid, block, smem, stream>>>(args...), with programmatic stream serialization allowed when the
// calling thread is inside a DependentLaunchScope(true). Only for kernels that wait (ptx::pdl_wait) before touching
// data a predecessor writes or reads. Reports launch errors as sav::Error.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = dependent_launch() ? 1 : 0;
  SAV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...));
}

}  // namespace sav::cuda
