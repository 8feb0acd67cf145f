// shiftaddvit: fitting the KSH hash (kernelized supervised hashing) of a Hamming attention layer.
//
// Done once at conversion, on the normalised to_qk activations of a calibration batch (METHOD.md
// section 1); afterwards anchors, mu and A are frozen buffers used by ops/cpu/hamming.h.
//
//   sav::Rng rng(seed);
//   sav::KshParams p = sav::ksh_fit(q, T, d, /*b*/ 16, /*m*/ 25, rng);      // one head, q (T,d)
//   sav::ksh_fit_layer(anchors, mu, A, qk_lin, B, N, C, H, 16, 25, rng);   // every head of a layer
//
// Shape legend: T calibration tokens of one head, d head dim, b hash bits (1..64), m anchors,
// B batch, N tokens per image, C channels, H heads.
//
// The fit (per head):
//  1. tokens are L2-normalised (again: harmless if they already are) and, when T > max_tokens,
//     a random subset of max_tokens of them is used (T' tokens below);
//  2. anchors = m distinct random tokens; D_tj = ||q_t - a_j||^2; sigma = mean D; E = exp(-D / (2 sigma));
//     mu = column means of E; K = E - mu (T',m). (The hash forward recomputes sigma from its own input,
//     per image and head; here it comes from the calibration tokens, as in the release.)
//  3. target S0 (T',T'): +1 for each token's topk most cosine-similar tokens (itself included, as in the
//     release), -1 for its topk least similar, 0 elsewhere (ties: lower index counts as more similar);
//     S = b * S0.
//     S is kept sparse plus the low-rank residual of the bits fitted so far (never formed densely).
//  4. bits one at a time (greedy): for bit r, a_r (m) starts from the init (the leading generalised
//     eigenvector of (K^T S_sym K, K^T K) — the original KSH spectral relaxation — or a random normal
//     vector), scaled so that ||K a||^2 = T'. Then `steps` Adam steps (beta 0.9/0.999, eps 1e-8,
//     step size lr * rms(a_init)) on the relaxation y = 2 sigmoid(K a) - 1, loss -y^T S y / (T' b).
//     The optimised a_r is kept only if its hard-sign loss (y = +-1, +1 where K a > 0) is strictly lower
//     than the init's; otherwise the init is kept. Then S <- S - y y^T with the hard codes kept.
//  Deterministic for a given rng state, on any number of threads.
#pragma once

#include <cstdint>
#include <vector>

#include "core/rng.h"

namespace sav {

struct KshParams {
  int d = 0, nbits = 0, m = 0;
  std::vector<float> anchors;          // (m,d)  attn.qk_quant.ksh.anchor[0, h]
  std::vector<float> mu;               // (m)    attn.qk_quant.ksh.mvec[0, h, 0]
  std::vector<float> A;                // (b,m)  attn.qk_quant.ksh.A[h]
  std::vector<float> bit_loss;         // (b) diagnostics: hard-sign loss of each chosen bit on the residual target
  std::vector<uint8_t> bit_optimised;  // (b) 1 where the optimised a_r beat its init
};

struct KshFitOptions {
  int steps = 100;            // Adam steps per bit
  float lr = 0.1f;            // Adam step size, relative to the rms of the initial a_r
  int topk = 10;              // similar / dissimilar neighbours per token in the target
  int max_tokens = 2000;      // subsample above this many tokens
  bool spectral_init = true;  // false: random normal init (what the release does)
};

// Fit one head. q (T,d) tokens of one head (normalised or not); T >= m and T >= 2.
KshParams ksh_fit(const float* q, int T, int d, int b, int m, Rng& rng, int steps = 100);
KshParams ksh_fit(const float* q, int T, int d, int b, int m, Rng& rng, const KshFitOptions& opt);

// Fit every head of one layer from its to_qk output qk_lin (B,N,C) (head h at columns h*d..h*d+d-1).
// Head h is fitted with Rng(s_h), s_h the h-th rng.next_u64() drawn here; heads run in parallel.
// Outputs: anchors (H,m,d), mu (H,m), A (H,b,m), overwritten.
void ksh_fit_layer(float* anchors, float* mu, float* A, const float* qk_lin, int B, int N, int C, int H, int b, int m,
                   Rng& rng, const KshFitOptions& opt = {});

// Quality of a fitted hash on tokens q (T,d) (normalised inside, all T used): with sigma from these
// tokens, codes Y = sign(K A^T) in {-1,+1} (T,b) and the target S0 above, the KSH objective as a mean
// square error over all token pairs:
//   objective = (1 / T^2) sum_{s,t} (Y_s . Y_t / b - S0_st)^2        (lower is better)
// (the greedy fit minimises || Y Y^T - b S0 ||_F^2 bit by bit; this is that, normalised).
double ksh_objective(const float* q, int T, int d, const KshParams& p, int topk = 10);

}  // namespace sav
