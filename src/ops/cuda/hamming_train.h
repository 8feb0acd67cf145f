// shiftaddvit CUDA backend: Hamming attention for training, float32, forward with everything backward needs
// saved, and backward (METHOD.md section 1; spec: cpu::hamming_attention_forward_ref / _backward_ref,
// ops/cpu/hamming.h, whose header states the formulas, the straight-through estimator and the saved
// tensors).
//
//   sav::cpu::HammingDims dims{B, N, C, H, nbits, m};
//   DeviceBuffer<float> saved_f(sav::cpu::hamming_saved_floats(dims));     // the CPU layout, on the device
//   DeviceBuffer<uint64_t> codes(sav::cpu::hamming_saved_codes(dims));
//   sav::cpu::HammingSaved saved = sav::cpu::hamming_saved_bind(dims, saved_f.get(), codes.get());
//   sav::cpu::HammingWeights w{anchors, mu, A, conv_w, nullptr};              // device pointers
//   hamming_train_forward(out, C, saved, qk, ldqk, v, ldv, w, dims, stream);
//   DeviceBuffer<float> ws(hamming_train_workspace_floats(dims));
//   hamming_train_backward(dqk, lddqk, dv, lddv, dconv_w, dout, C, v, ldv, saved, w, dims, ws.get(), stream);
//
// Token-major tensors (qk, v, out and their gradients) are (B,N,C) with head h at columns h*d..h*d+d-1 and
// rows ld apart (e.g. qk = buf, v = buf + C, ld = 2C for the stacked [to_qk; to_v] product). The saved
// tensors use the CPU's head-major layout (cpu::HammingSaved) in device memory, so a test can download and
// compare them one by one.
//
// Deterministic (no float atomics; fixed summation orders), f32 arithmetic (sums may run in another order
// than the CPU's, so results agree to rounding, and a hash bit whose y is within rounding of 0 may differ).
// Sizes: any B, N >= 1; C % H == 0, d = C/H <= 128; 1 <= nbits <= 64; 1 <= m <= 64.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ops/cpu/hamming.h"
#include "ops/cuda/common.h"

namespace sav::cuda {

bool hamming_train_supports(const sav::cpu::HammingDims& dims);

// out (B,N,C) rows ldo apart = the Hamming attention output; saved (all of q, qnorm, dist, sigma, y, kv, z,
// znorm, codes) filled; qk, v rows ldqk / ldv apart; w: device pointers, conv_b may be nullptr.
void hamming_train_forward(float* out, int ldo, const sav::cpu::HammingSaved& saved, const float* qk, int ldqk,
                           const float* v, int ldv, const sav::cpu::HammingWeights& w,
                           const sav::cpu::HammingDims& dims, cudaStream_t stream);

// dqk (B,N,C) rows lddqk apart  = (OVERWRITTEN, every element; nullptr: skip);
// dv  (B,N,C) rows lddv apart   = (OVERWRITTEN, every element; nullptr: skip);
// dconv_w (H,9) += ; dconv_b (H) += (each nullptr: skip);
// dout (B,N,C) rows lddout apart; v, saved, w as given to / filled by forward.
// ws: hamming_train_workspace_floats(dims) floats.
void hamming_train_backward(float* dqk, int lddqk, float* dv, int lddv, float* dconv_w, float* dconv_b,
                            const float* dout, int lddout, const float* v, int ldv, const sav::cpu::HammingSaved& saved,
                            const sav::cpu::HammingWeights& w, const sav::cpu::HammingDims& dims, float* ws,
                            cudaStream_t stream);
size_t hamming_train_workspace_floats(const sav::cpu::HammingDims& dims);

}  // namespace sav::cuda
