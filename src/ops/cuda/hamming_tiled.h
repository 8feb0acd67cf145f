// shiftaddvit CUDA backend: the Hamming attention core (METHOD.md section 1) split over a thread-block
// cluster per (image, head), for any token count N (DeiT's 197 up to PVTv2 stage 1's 3136 and beyond).
// Spec: cpu::hamming_attention_forward (ops/cpu/hamming.h):
//   q = qk / max(||qk||, 1e-6);  D_nj = ||q_n - a_j||^2;  sigma = max(mean_{n,j} D, 1e-12)  (per image, head)
//   y_nr = sum_j A_rj (exp(-D_nj / (2 sigma)) - mu_j);  code bit r = 1[y_nr > 0]
//   KV_r = sum of the V rows whose bit r is set        (MatAdd #1, additions only)
//   z_n  = 0.5 v_n + sum over set bits r of KV_r / pi  (MatAdd #2, additions only)
//   out_n = z_n / max(||z_n||, 1e-6) + sum_t conv_w[h,t] v_{n+t-4}   (9 taps over the image's tokens, zero pad)
// No conv bias: the CPU models never pass one (HammingWeights::conv_b is nullptr in vit.cpp and pvt.cpp).
//
//   using namespace sav::cuda;
//   const HammingTiledDims dims{B, N, C, H, /*nbits*/ 16, /*m*/ 25};
//   if (!hamming_tiled_supports(dims)) { /* fall back */ }
//   DeviceBuffer<unsigned char> ws(hamming_tiled_workspace_bytes(dims));   // once; often 0 bytes
//   hamming_attention_tiled<bf16>(out, C, qk, 2 * C, v, 2 * C, anchors, mu, A, conv_w, dims, ws.get(), stream);
//
// Layouts (legend: B batch, N tokens per image, C channels, H heads, d = C/H, b = nbits, m anchors):
//   out, qk, v token-major: row b*N + n at ptr + row*ld (ld in elements, >= C), head h at columns h*d..h*d+d-1;
//   anchors (H,m,d), mu (H,m), A (H,b,m), conv_w (H,9): f32 device pointers.
//   T = float or bf16: bf16 inputs are converted on load, all arithmetic is f32 (norms and the sigma sum in
//   double, as the CPU), a bf16 output is rounded once at the store. out must not alias qk or v.
//
// Work split: one cluster of G CTAs (G in 1, 2, 4, 8, chosen from B*H and the SM count) per (image, head), CTA
// g owns tokens [g*chunk, (g+1)*chunk). One kernel launch per call, no host round trip, no allocation (the
// calls can be captured into CUDA graphs); the two global reductions of a head (sigma, KV) go through the
// cluster's distributed shared memory in a fixed order, so results are deterministic (bit-identical reruns,
// no float atomics). Needs sm_90 (clusters). The kernel design is described in hamming_tiled.cu.
//
// Accuracy: D_nj is computed as ||q||^2 + ||a||^2 - 2 q.a and the sums run in other orders than the CPU's, so
// a code bit whose y_nr lies within ~1e-6 of 0 may differ from the CPU's (relative to max|y| ~1e-7); with equal
// codes the f32 output matches the CPU to ~1e-6 of max|out|.
#pragma once

#include <cstddef>

#include "ops/cuda/common.h"

namespace sav::cuda {

struct HammingTiledDims {
  int B = 0, N = 0, C = 0, H = 0;
  int nbits = 16;  // b, 1..64
  int m = 25;      // anchors, 1..64
};

// Supported: B >= 0, 1 <= N <= 2^26, H >= 1, C % H == 0, 1 <= d <= 128, 1 <= nbits <= 64, 1 <= m <= 64; and,
// when a GPU is present, compute capability >= 9.0 and the shared memory fits. Pure of the device otherwise.
bool hamming_tiled_supports(const HammingTiledDims& d);

// Bytes of device workspace hamming_attention_tiled needs (16-byte aligned; cudaMalloc's alignment is fine).
// 0 when every chunk of tokens fits in shared memory (all DeiT sizes, PVTv2-B0 at 224x224 in bf16); else
// B*H*8*roundup(ceil(N/8), 4)*(4 m + 8) (per-chunk distances and codes in global memory). Independent of the
// device and of T (sized for the f32 case, which needs at least as much as bf16). Throws if unsupported.
size_t hamming_tiled_workspace_bytes(const HammingTiledDims& d);

// out = HammingAttention(qk, v) as above, on `stream`. workspace: hamming_tiled_workspace_bytes(d) bytes (may
// be nullptr when that is 0), not preserved between calls (one workspace per stream). Throws sav::Error on
// unsupported sizes, null pointers, strides below C, a missing workspace or a device without clusters.
template <class T>
void hamming_attention_tiled(T* out, int ldo, const T* qk, int ldqk, const T* v, int ldv, const float* anchors,
                             const float* mu, const float* A, const float* conv_w, const HammingTiledDims& d,
                             void* workspace, cudaStream_t stream);
extern template void hamming_attention_tiled<float>(float*, int, const float*, int, const float*, int, const float*,
                                                    const float*, const float*, const float*,
                                                    const HammingTiledDims&, void*, cudaStream_t);
extern template void hamming_attention_tiled<bf16>(bf16*, int, const bf16*, int, const bf16*, int, const float*,
                                                   const float*, const float*, const float*, const HammingTiledDims&,
                                                   void*, cudaStream_t);

// The launch plan (for tests, benchmarks and logs): cluster size G, tokens per CTA, D-tile size, whether the
// chunk lives in shared memory (else the workspace is used) and the dynamic shared memory per CTA.
// elem_bytes = sizeof(T) (4 or 2); sms = the device's SM count (sm_count()). Throws if unsupported.
struct HammingTiledPlan {
  int cluster = 0, chunk = 0, tile = 0;
  bool cached = false;
  size_t smem_bytes = 0;
};
HammingTiledPlan hamming_tiled_plan(const HammingTiledDims& d, size_t elem_bytes, int sms);

}  // namespace sav::cuda
