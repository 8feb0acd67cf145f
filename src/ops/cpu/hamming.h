// shiftaddvit: Hamming attention (binary-code linear attention) and the KSH hash, CPU forward/backward.
//
// METHOD.md section 1. The linears to_qk, to_v and proj are ordinary linears run by the caller; this file
// is the core between them:
//
//   q    = qk_lin / max(||qk_lin||_2, eps)              per (b, n, h) over d           (eps = 1e-6)
//   D_nj = ||q_n - a_j||^2,  sigma = mean_{n,j} D_nj     per image b and head h (from the current input;
//                                                        clamped at kHammingSigmaMin = 1e-12)
//   y_nr = sum_j A_rj (exp(-D_nj / (2 sigma)) - mu_j),  code_nr = 1[y_nr > 0]           (KSH hash)
//   KV   = code^T V                                      (b,d)  MatAdd #1: sum of V rows whose bit r is set
//   z    = 0.5 V + (1/pi) code KV                        (N,d)  MatAdd #2: sum of KV rows whose bit is set
//   out  = z / max(||z||_2, eps) + DWConv9(V)            DWConv9: 9 taps over the token index n of each
//                                                        image, zero padding 4, one kernel per head shared
//                                                        by the d channels of the head (+ optional bias)
//
// Usage (training step of one block; the caller owns all buffers):
//
//   sav::cpu::HammingDims dims{B, N, C, H, /*nbits*/ 16, /*m*/ 25};
//   std::vector<float> saved_buf(sav::cpu::hamming_saved_floats(dims));
//   std::vector<uint64_t> code_buf(sav::cpu::hamming_saved_codes(dims));
//   auto saved = sav::cpu::hamming_saved_bind(dims, saved_buf.data(), code_buf.data());
//   sav::cpu::HammingWeights w{anchors, mu, A, conv_w, /*conv_b*/ nullptr};
//   sav::cpu::hamming_attention_forward(out, &saved, qk_lin, v, w, dims);       // &saved may be nullptr
//   ...                                                                          // at inference
//   sav::cpu::hamming_attention_backward(dqk_lin, dv, dconv_w, nullptr, dout, v, saved, w, dims);
//
// Shape legend: B batch, N tokens per image, C channels, H heads, d = C/H head dim, b = nbits hash bits
// (1..64), m anchors. Token-major tensors (qk_lin, v, out and their gradients) are (B,N,C) with head h at
// columns h*d .. h*d+d-1 (PyTorch's reshape(B,N,H,d)). Saved intermediates are head-major (B,H,N,*).
// Codes are bit-packed: one uint64 per (b,h,n), bit r = code_nr, bits >= nbits are zero.
//
// Checkpoint names (PVTv2 release layout): anchors = attn.qk_quant.ksh.anchor (1,H,m,d), mu =
// attn.qk_quant.ksh.mvec (1,H,1,m), A = attn.qk_quant.ksh.A (H,b,m), conv_w = attn.dconv.weight (H,1,9,1)
// i.e. (H,9) with tap t reading token n + t - 4 (PyTorch cross-correlation). The release has no conv bias.
//
// Backward:
//  - the code is a straight-through estimator (the release's BinaryQuantizer): dy_nr = dcode_nr where
//    0 < y_nr < 1, else 0;
//  - anchors, mu and A are frozen buffers: no gradient is produced for them;
//  - sigma depends on the input and its gradient IS included (exact: sigma = mean_{n,j} D_nj), so the
//    gradient through the relaxed y is exact and finite-difference checkable;
//  - dqk_lin goes back through the q normalisation (and through the max(.,eps) clamp: dq/eps there).
//
// Conventions as in ops.h: `*_ref` are plain loops (the spec, float {0,1} code matrices and ordinary
// matrix products), the fast paths use packed codes with addition-only MatAdd kernels and OpenMP over
// (b,h); forward outputs are overwritten; backward functions ACCUMULATE (+=) into every gradient and skip
// nullptr ones. Results of the fast path do not depend on the number of threads.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sav::cpu {

constexpr int kHammingConvTaps = 9;         // DWConv kernel length over the token index (padding 4)
constexpr float kHammingNormEps = 1e-6f;    // q and z normalisation: x / max(||x||, eps)
constexpr float kHammingSigmaMin = 1e-12f;  // sigma = max(mean D, this): all tokens on the anchors gives no NaN

struct HammingDims {
  int B = 0, N = 0, C = 0, H = 0;
  int nbits = 16;  // b, 1..64
  int m = 25;      // anchors
  int d() const { return H > 0 ? C / H : 0; }
};
// Throws unless all sizes are positive, C % H == 0, 1 <= nbits <= 64.
void hamming_check_dims(const HammingDims& dims);

// Frozen weights of one Hamming attention layer.
struct HammingWeights {
  const float* anchors = nullptr;  // (H,m,d)
  const float* mu = nullptr;       // (H,m)
  const float* A = nullptr;        // (H,b,m)
  const float* conv_w = nullptr;   // (H,9)
  const float* conv_b = nullptr;   // (H) or nullptr (none)
};

// What forward saves for backward (all head-major). Bind it onto caller memory with hamming_saved_bind.
struct HammingSaved {
  float* q = nullptr;         // (B,H,N,d) normalised qk
  float* qnorm = nullptr;     // (B,H,N)   max(||qk_lin||, eps)
  float* dist = nullptr;      // (B,H,N,m) D_nj = ||q_n - a_j||^2
  float* sigma = nullptr;     // (B,H)     mean of D over n, j
  float* y = nullptr;         // (B,H,N,b) relaxed hash values (the STE mask reads them)
  float* kv = nullptr;        // (B,H,b,d) KV = code^T V
  float* z = nullptr;         // (B,H,N,d) 0.5 V + (1/pi) code KV, before normalisation
  float* znorm = nullptr;     // (B,H,N)   max(||z||, eps)
  uint64_t* codes = nullptr;  // (B,H,N) packed codes
};
// Floats needed for the float part of HammingSaved: B*H*(N*(2d + m + b + 2) + b*d + 1).
size_t hamming_saved_floats(const HammingDims& dims);
// uint64 words needed for the codes: B*H*N.
size_t hamming_saved_codes(const HammingDims& dims);
// Carves the HammingSaved arrays out of buf (hamming_saved_floats floats) and codes (B*H*N words).
HammingSaved hamming_saved_bind(const HammingDims& dims, float* buf, uint64_t* codes);

// ---- full Hamming attention core ----
// out (B,N,C) overwritten (must not alias qk_lin or v); qk_lin (B,N,C) = to_qk(x); v (B,N,C) = to_v(x).
// saved: filled when non-null (training); nullptr at inference (the fast path then uses per-thread scratch;
// the ref allocates its own).
void hamming_attention_forward(float* out, const HammingSaved* saved, const float* qk_lin, const float* v,
                               const HammingWeights& w, const HammingDims& dims);
// relaxed_codes (debug, ref only): use the relaxed y itself in place of the {0,1} code in both MatAdds
// (so the whole block is differentiable) — the matching backward passes dcode to dy unmasked. It exists
// to check the gradient through the hash by finite differences.
void hamming_attention_forward_ref(float* out, const HammingSaved* saved, const float* qk_lin, const float* v,
                                   const HammingWeights& w, const HammingDims& dims, bool relaxed_codes = false);

// dqk_lin (B,N,C) +=, dv (B,N,C) +=, dconv_w (H,9) +=, dconv_b (H) += (each may be nullptr);
// dout (B,N,C); v (B,N,C) as given to forward; saved as filled by forward.
void hamming_attention_backward(float* dqk_lin, float* dv, float* dconv_w, float* dconv_b, const float* dout,
                                const float* v, const HammingSaved& saved, const HammingWeights& w,
                                const HammingDims& dims);
void hamming_attention_backward_ref(float* dqk_lin, float* dv, float* dconv_w, float* dconv_b, const float* dout,
                                    const float* v, const HammingSaved& saved, const HammingWeights& w,
                                    const HammingDims& dims, bool relaxed_codes = false);

// ---- KSH hash alone: q (B,H,N,d), already normalised ----
// y (B,H,N,b) relaxed values (overwritten); codes (B,H,N) packed, bit r = 1[y_r > 0] (may be nullptr);
// dist (B,H,N,m) D_nj saved for backward; sigma (B,H); anchors (H,m,d); mu (H,m); A (H,b,m).
void ksh_hash_forward(float* y, uint64_t* codes, float* dist, float* sigma, const float* q, const float* anchors,
                      const float* mu, const float* A, int B, int H, int N, int d, int nbits, int m);
void ksh_hash_forward_ref(float* y, uint64_t* codes, float* dist, float* sigma, const float* q, const float* anchors,
                          const float* mu, const float* A, int B, int H, int N, int d, int nbits, int m);
// dq (B,H,N,d) += d(sum dy * y)/dq, exact (sigma's dependence on q included); dy (B,H,N,b) is the
// gradient w.r.t. the relaxed y (apply ksh_ste_backward first to go from dcode to dy).
void ksh_hash_backward(float* dq, const float* dy, const float* q, const float* dist, const float* sigma,
                       const float* anchors, const float* mu, const float* A, int B, int H, int N, int d, int nbits,
                       int m);
void ksh_hash_backward_ref(float* dq, const float* dy, const float* q, const float* dist, const float* sigma,
                           const float* anchors, const float* mu, const float* A, int B, int H, int N, int d, int nbits,
                           int m);
// Straight-through estimator: dy (n) += dcode where 0 < y < 1; dcode (n), y (n).
void ksh_ste_backward(float* dy, const float* dcode, const float* y, int64_t n);

// ---- the two MatAdd products over packed codes (one head of one image; addition only) ----
// MatAdd #1: kv (b,d) = code^T v = for each token n and each set bit r: kv[r] += v[n]. kv overwritten.
// codes (N); v (N,d) with row stride ldv.
void matadd_codes_t_v(float* kv, const uint64_t* codes, const float* v, int N, int d, int ldv, int nbits);
// MatAdd #2: out (N,d) (row stride ldo) = code kv = for each token n: sum of kv[r] over set bits r.
// Overwritten. kv (b,d).
void matadd_codes_kv(float* out, int ldo, const uint64_t* codes, const float* kv, int N, int d, int nbits);
// References with a float {0,1} code matrix h (N,b) and plain matrix products.
void matadd_codes_t_v_ref(float* kv, const float* h, const float* v, int N, int d, int ldv, int nbits);
void matadd_codes_kv_ref(float* out, int ldo, const float* h, const float* kv, int N, int d, int nbits);
// Packing helpers: codes (N) <-> h (N,b) with h in {0,1} (pack reads h > 0.5).
void codes_pack(uint64_t* codes, const float* h, int N, int nbits);
void codes_unpack(float* h, const uint64_t* codes, int N, int nbits);

}  // namespace sav::cpu
