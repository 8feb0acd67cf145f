// shiftaddvit CUDA backend: the GELU forms the kernels share (device code only; include from .cu files).
//   gelu_erf     the exact form (torch.nn.GELU()): the MoE epilogues and the PVT depthwise-conv MLPs
//   gelu_tanh    cuBLASLt's CUBLASLT_EPILOGUE_GELU form, as the compiler contracts it
//   gelu_tanh_rn the same with explicit _rn operations (no contraction: the same bits whatever the compiler fuses)
#pragma once

namespace sav::cuda {

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float gelu_tanh_rn(float v) {
  const float v3 = __fmul_rn(__fmul_rn(v, v), v);
  const float u = __fmul_rn(0.7978845608f, __fadd_rn(v, __fmul_rn(0.044715f, v3)));
  return __fmul_rn(__fmul_rn(0.5f, v), __fadd_rn(1.0f, tanhf(u)));
}

}  // namespace sav::cuda
