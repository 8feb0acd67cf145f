// Tests of the Hamming attention op family (ops/cpu/hamming.h) and of KSH fitting (reparam/ksh_fit.h).
//
// What each finite-difference check can see: the hard code 1[y > 0] is piecewise constant, so
//  - dv, dconv_w, dconv_b of the real (hard-code) block are exact gradients and are FD-checked directly
//    (perturbing v or the conv never changes a code: codes depend on qk only);
//  - dqk_lin of the real block is a straight-through estimate, which FD cannot see; instead the reference
//    is run in its `relaxed_codes` debug mode (the relaxed y used in place of the code, the STE mask off),
//    where the whole block is differentiable, and dqk_lin/dv/dconv are FD-checked there: this covers the
//    q normalisation, the distances, sigma (its gradient is included), the kernel, A and the dcode of both
//    MatAdds. The STE mask itself is checked by a unit test and by fast-vs-reference on the hard block.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "op_harness.h"
#include "ops/cpu/hamming.h"
#include "reparam/ksh_fit.h"

namespace {

using sav::cpu::HammingDims;
using sav::cpu::HammingSaved;
using sav::cpu::HammingWeights;
using sav::test::norm_err;

// Random frozen weights for a layer: anchors are random unit vectors (tokens are normalised), mu a
// plausible kernel mean, A normal, conv small.
struct LayerWeights {
  std::vector<float> anchors, mu, A, conv_w, conv_b;
  HammingWeights view(bool with_bias) const {
    return HammingWeights{anchors.data(), mu.data(), A.data(), conv_w.data(), with_bias ? conv_b.data() : nullptr};
  }
};

LayerWeights make_weights(const HammingDims& dims, uint64_t seed) {
  const int H = dims.H, d = dims.d(), m = dims.m, b = dims.nbits;
  LayerWeights w;
  w.anchors = sav::test::normal(static_cast<size_t>(H) * m * d, seed);
  for (int k = 0; k < H * m; ++k) {
    double s = 0.0;
    for (int i = 0; i < d; ++i) s += w.anchors[k * d + i] * w.anchors[k * d + i];
    for (int i = 0; i < d; ++i) w.anchors[k * d + i] /= static_cast<float>(std::sqrt(s) + 1e-12);
  }
  w.mu = sav::test::uniform(static_cast<size_t>(H) * m, seed + 1, 0.2f, 0.6f);
  w.A = sav::test::normal(static_cast<size_t>(H) * b * m, seed + 2);
  w.conv_w = sav::test::uniform(static_cast<size_t>(H) * sav::cpu::kHammingConvTaps, seed + 3, -0.3f, 0.3f);
  w.conv_b = sav::test::uniform(H, seed + 4, -0.2f, 0.2f);
  return w;
}

struct SavedBuf {
  std::vector<float> f;
  std::vector<uint64_t> c;
  HammingSaved s;
  explicit SavedBuf(const HammingDims& dims)
      : f(sav::cpu::hamming_saved_floats(dims), -7.0f), c(sav::cpu::hamming_saved_codes(dims), ~uint64_t{0}) {
    s = sav::cpu::hamming_saved_bind(dims, f.data(), c.data());
  }
};

// Smallest |y| relative to max |y|: when it is tiny, fast and ref codes may legitimately differ.
double min_rel_abs(const float* y, size_t n) {
  double mn = INFINITY, mx = 0.0;
  for (size_t i = 0; i < n; ++i) {
    mn = std::min(mn, static_cast<double>(std::fabs(y[i])));
    mx = std::max(mx, static_cast<double>(std::fabs(y[i])));
  }
  return mx > 0 ? mn / mx : 0.0;
}

size_t count_code_mismatches(const std::vector<uint64_t>& a, const std::vector<uint64_t>& b) {
  size_t k = 0;
  for (size_t i = 0; i < a.size(); ++i) k += a[i] != b[i];
  return k;
}

// The shapes every fast-vs-reference test runs (odd sizes; N = 1 and N < 9 exercise the conv borders).
std::vector<HammingDims> test_shapes() {
  return {
      {1, 1, 3, 1, 8, 5},      // single token
      {2, 7, 12, 3, 13, 6},    // d = 4, odd bits
      {3, 13, 10, 2, 16, 25},  // d = 5, default b and m
      {1, 37, 21, 3, 16, 25},  // d = 7
      {2, 9, 8, 1, 64, 7},     // all 64 bits
  };
}

}  // namespace

// ---- packed MatAdd kernels vs float reference ----

TEST(HammingMatAdd, PackedKernelsMatchFloatReference) {
  struct Case {
    int N, d, b, ld;
  };
  const Case cases[] = {{1, 1, 8, 1}, {7, 3, 13, 5}, {37, 13, 16, 13}, {13, 17, 8, 20}, {29, 5, 64, 9}};
  uint64_t seed = 100;
  for (const Case& c : cases) {
    sav::Rng rng(seed++);
    std::vector<float> h(static_cast<size_t>(c.N) * c.b);
    for (auto& x : h) x = rng.uniform() < 0.5f ? 1.0f : 0.0f;
    std::vector<uint64_t> codes(c.N);
    sav::cpu::codes_pack(codes.data(), h.data(), c.N, c.b);
    std::vector<float> h2(h.size());
    sav::cpu::codes_unpack(h2.data(), codes.data(), c.N, c.b);
    ASSERT_EQ(h, h2) << "pack/unpack round trip, N=" << c.N << " b=" << c.b;
    if (c.b < 64) {
      for (uint64_t w : codes) ASSERT_EQ(w >> c.b, 0u) << "bits above nbits must be zero";
    }

    const auto v = sav::test::uniform(static_cast<size_t>(c.N) * c.ld, seed++);
    std::vector<float> kv(static_cast<size_t>(c.b) * c.d, 99.0f), kv_ref(kv.size());
    sav::cpu::matadd_codes_t_v(kv.data(), codes.data(), v.data(), c.N, c.d, c.ld, c.b);
    sav::cpu::matadd_codes_t_v_ref(kv_ref.data(), h.data(), v.data(), c.N, c.d, c.ld, c.b);
    EXPECT_LT(norm_err(kv, kv_ref), 1e-6) << "MatAdd #1 N=" << c.N << " d=" << c.d << " b=" << c.b;

    const int ldo = c.d + 3;
    std::vector<float> out(static_cast<size_t>(c.N) * ldo, 5.0f), out_ref(out);
    sav::cpu::matadd_codes_kv(out.data(), ldo, codes.data(), kv_ref.data(), c.N, c.d, c.b);
    sav::cpu::matadd_codes_kv_ref(out_ref.data(), ldo, h.data(), kv_ref.data(), c.N, c.d, c.b);
    EXPECT_LT(norm_err(out, out_ref), 1e-6) << "MatAdd #2 N=" << c.N << " d=" << c.d << " b=" << c.b;
    for (int n = 0; n < c.N; ++n)
      for (int i = c.d; i < ldo; ++i) EXPECT_EQ(out[static_cast<size_t>(n) * ldo + i], 5.0f) << "stride padding";
  }
}

// ---- KSH hash alone ----

TEST(KshHash, FastMatchesReference) {
  const int B = 2, H = 3, N = 37, d = 7, m = 25;
  for (int nbits : {8, 13, 16}) {
    HammingDims dims{B, N, H * d, H, nbits, m};
    const LayerWeights w = make_weights(dims, 7 + nbits);
    auto q = sav::test::normal(static_cast<size_t>(B) * H * N * d, 11 + nbits);
    for (size_t r = 0; r < q.size() / d; ++r) {  // unit rows, as the attention feeds it
      double s = 0.0;
      for (int i = 0; i < d; ++i) s += q[r * d + i] * q[r * d + i];
      for (int i = 0; i < d; ++i) q[r * d + i] /= static_cast<float>(std::sqrt(s));
    }
    const size_t ny = static_cast<size_t>(B) * H * N * nbits, nd = static_cast<size_t>(B) * H * N * m;
    std::vector<float> y(ny), y_ref(ny), D(nd), D_ref(nd), sg(B * H), sg_ref(B * H);
    std::vector<uint64_t> c(B * H * N), c_ref(B * H * N);
    sav::cpu::ksh_hash_forward(y.data(), c.data(), D.data(), sg.data(), q.data(), w.anchors.data(), w.mu.data(),
                               w.A.data(), B, H, N, d, nbits, m);
    sav::cpu::ksh_hash_forward_ref(y_ref.data(), c_ref.data(), D_ref.data(), sg_ref.data(), q.data(), w.anchors.data(),
                                   w.mu.data(), w.A.data(), B, H, N, d, nbits, m);
    EXPECT_LT(norm_err(D, D_ref), 1e-6);
    EXPECT_LT(norm_err(sg, sg_ref), 1e-6);
    EXPECT_LT(norm_err(y, y_ref), 1e-5);
    // Codes: equal wherever y is not within float noise of 0.
    for (size_t i = 0; i < ny; ++i) {
      const bool bit = (c[i / nbits] >> (i % nbits)) & 1u, bit_ref = (c_ref[i / nbits] >> (i % nbits)) & 1u;
      EXPECT_EQ(bit_ref, y_ref[i] > 0.0f);
      if (std::fabs(y_ref[i]) > 1e-5f) {
        EXPECT_EQ(bit, bit_ref) << "code " << i << " y_ref " << y_ref[i];
      }
    }
    // Backward: fast vs ref, accumulating into a non-zero dq.
    const auto dy = sav::test::uniform(ny, 5 + nbits);
    auto dq = sav::test::uniform(q.size(), 6), dq_ref = dq;
    sav::cpu::ksh_hash_backward(dq.data(), dy.data(), q.data(), D.data(), sg.data(), w.anchors.data(), w.mu.data(),
                                w.A.data(), B, H, N, d, nbits, m);
    sav::cpu::ksh_hash_backward_ref(dq_ref.data(), dy.data(), q.data(), D_ref.data(), sg_ref.data(), w.anchors.data(),
                                    w.mu.data(), w.A.data(), B, H, N, d, nbits, m);
    EXPECT_LT(norm_err(dq, dq_ref), 1e-5) << "nbits " << nbits;
  }
}

TEST(KshHash, BackwardFiniteDifferencesThroughRelaxedY) {
  // L = sum(y * R) with y the relaxed hash; exact gradient including sigma's dependence on q.
  const int B = 2, H = 2, N = 9, d = 5, m = 6, nbits = 13;
  HammingDims dims{B, N, H * d, H, nbits, m};
  const LayerWeights w = make_weights(dims, 3);
  auto q = sav::test::uniform(static_cast<size_t>(B) * H * N * d, 4, -0.6f, 0.6f);
  const size_t ny = static_cast<size_t>(B) * H * N * nbits;
  const auto R = sav::test::uniform(ny, 5);
  std::vector<float> y(ny), D(static_cast<size_t>(B) * H * N * m), sg(B * H);
  auto loss = [&] {
    sav::cpu::ksh_hash_forward_ref(y.data(), nullptr, D.data(), sg.data(), q.data(), w.anchors.data(), w.mu.data(),
                                   w.A.data(), B, H, N, d, nbits, m);
    return sav::test::dot(y, R);
  };
  loss();
  std::vector<float> dq(q.size(), 0.0f);
  sav::cpu::ksh_hash_backward_ref(dq.data(), R.data(), q.data(), D.data(), sg.data(), w.anchors.data(), w.mu.data(),
                                  w.A.data(), B, H, N, d, nbits, m);
  const auto fd = sav::test::fd_check(q.data(), q.size(), dq.data(), loss, 1e-3f, 60);
  EXPECT_LT(fd.err, 5e-3) << fd;
  // Dropping the sigma term must be visible to this check (the test can fail).
  std::vector<float> dq_fast(q.size(), 0.0f);
  sav::cpu::ksh_hash_backward(dq_fast.data(), R.data(), q.data(), D.data(), sg.data(), w.anchors.data(), w.mu.data(),
                              w.A.data(), B, H, N, d, nbits, m);
  const auto fd_fast = sav::test::fd_check(q.data(), q.size(), dq_fast.data(), loss, 1e-3f, 60);
  EXPECT_LT(fd_fast.err, 5e-3) << fd_fast;
}

TEST(KshHash, StraightThroughMask) {
  const float y[] = {-0.5f, 0.0f, 1e-6f, 0.5f, 0.999f, 1.0f, 1.5f};
  const float dcode[] = {1, 2, 3, 4, 5, 6, 7};
  float dy[7] = {10, 10, 10, 10, 10, 10, 10};
  sav::cpu::ksh_ste_backward(dy, dcode, y, 7);
  const float expect[] = {10, 10, 13, 14, 15, 10, 10};  // passes only where 0 < y < 1, accumulates
  for (int i = 0; i < 7; ++i) EXPECT_EQ(dy[i], expect[i]) << i;
}

// ---- full Hamming attention ----

TEST(HammingAttention, ForwardFastMatchesReference) {
  uint64_t seed = 200;
  for (const HammingDims& dims : test_shapes())
    for (bool bias : {false, true}) {
      const int B = dims.B, N = dims.N, C = dims.C;
      const LayerWeights w = make_weights(dims, seed++);
      const auto qk = sav::test::normal(static_cast<size_t>(B) * N * C, seed++);
      const auto v = sav::test::normal(static_cast<size_t>(B) * N * C, seed++);
      std::vector<float> out(qk.size(), 3.0f), out_ref(qk.size(), -3.0f), out_inf(qk.size(), 1.0f);
      SavedBuf s(dims), s_ref(dims);
      sav::cpu::hamming_attention_forward(out.data(), &s.s, qk.data(), v.data(), w.view(bias), dims);
      sav::cpu::hamming_attention_forward_ref(out_ref.data(), &s_ref.s, qk.data(), v.data(), w.view(bias), dims);
      sav::cpu::hamming_attention_forward(out_inf.data(), nullptr, qk.data(), v.data(), w.view(bias), dims);
      const std::string where = "B=" + std::to_string(B) + " N=" + std::to_string(N) + " C=" + std::to_string(C) +
                                " H=" + std::to_string(dims.H) + " b=" + std::to_string(dims.nbits) +
                                " m=" + std::to_string(dims.m) + (bias ? " bias" : "");
      // The fast hash sums every distance and y in the reference's order, so the codes are identical (a
      // change that breaks this, e.g. an approximate exp, must turn this into a tolerance on |y| ~ 0).
      const size_t ny = static_cast<size_t>(B) * dims.H * N * dims.nbits;
      ASSERT_EQ(count_code_mismatches(s.c, s_ref.c), 0u)
          << where << ": codes differ; min |y|/max |y| = " << min_rel_abs(s_ref.s.y, ny);
      EXPECT_LT(norm_err(out, out_ref), 2e-6) << where;
      EXPECT_EQ(out, out_inf) << where << ": inference mode (no saved) must give the same output";
      EXPECT_LT(norm_err(s.f, s_ref.f), 2e-6) << where << ": saved intermediates";
    }
}

TEST(HammingAttention, CodesAreTheHashOfTheNormalisedQuery) {
  // The saved codes of the attention are ksh_hash of q = qk / ||qk||, and scaling qk changes nothing.
  HammingDims dims{2, 11, 12, 2, 16, 25};
  const LayerWeights w = make_weights(dims, 31);
  auto qk = sav::test::normal(static_cast<size_t>(dims.B) * dims.N * dims.C, 32);
  const auto v = sav::test::normal(qk.size(), 33);
  std::vector<float> out(qk.size()), out2(qk.size());
  SavedBuf s(dims), s2(dims);
  sav::cpu::hamming_attention_forward(out.data(), &s.s, qk.data(), v.data(), w.view(false), dims);
  for (auto& x : qk) x *= 4.0f;  // exact in float
  sav::cpu::hamming_attention_forward(out2.data(), &s2.s, qk.data(), v.data(), w.view(false), dims);
  EXPECT_EQ(s.c, s2.c);
  EXPECT_LT(norm_err(out2, out), 1e-6);
  size_t ones = 0;
  for (uint64_t c : s.c) ones += __builtin_popcountll(c);
  const double frac = static_cast<double>(ones) / (s.c.size() * dims.nbits);
  EXPECT_GT(frac, 0.05);  // codes are not degenerate (all zeros / all ones)
  EXPECT_LT(frac, 0.95);
}

TEST(HammingAttention, BackwardFastMatchesReference) {
  uint64_t seed = 300;
  for (const HammingDims& dims : test_shapes())
    for (bool bias : {false, true}) {
      const int B = dims.B, N = dims.N, C = dims.C, H = dims.H;
      const LayerWeights w = make_weights(dims, seed++);
      const auto qk = sav::test::normal(static_cast<size_t>(B) * N * C, seed++);
      const auto v = sav::test::normal(qk.size(), seed++);
      const auto dout = sav::test::uniform(qk.size(), seed++);
      std::vector<float> out(qk.size());
      SavedBuf s(dims);
      sav::cpu::hamming_attention_forward_ref(out.data(), &s.s, qk.data(), v.data(), w.view(bias), dims);
      // Non-zero initial gradients: both must accumulate.
      auto dqk = sav::test::uniform(qk.size(), 1), dqk_ref = dqk;
      auto dv = sav::test::uniform(qk.size(), 2), dv_ref = dv;
      auto dw = sav::test::uniform(static_cast<size_t>(H) * 9, 3), dw_ref = dw;
      auto db = sav::test::uniform(H, 4), db_ref = db;
      sav::cpu::hamming_attention_backward(dqk.data(), dv.data(), dw.data(), bias ? db.data() : nullptr, dout.data(),
                                           v.data(), s.s, w.view(bias), dims);
      sav::cpu::hamming_attention_backward_ref(dqk_ref.data(), dv_ref.data(), dw_ref.data(),
                                               bias ? db_ref.data() : nullptr, dout.data(), v.data(), s.s, w.view(bias),
                                               dims);
      const std::string where = "N=" + std::to_string(N) + " C=" + std::to_string(C) +
                                " b=" + std::to_string(dims.nbits) + (bias ? " bias" : "");
      EXPECT_LT(norm_err(dqk, dqk_ref), 1e-5) << where;
      EXPECT_LT(norm_err(dv, dv_ref), 1e-5) << where;
      EXPECT_LT(norm_err(dw, dw_ref), 1e-5) << where;
      EXPECT_LT(norm_err(db, db_ref), 1e-5) << where;
      // nullptr gradients are skipped; the others are unchanged by that.
      auto dv_only = sav::test::uniform(qk.size(), 2);
      sav::cpu::hamming_attention_backward(nullptr, dv_only.data(), nullptr, nullptr, dout.data(), v.data(), s.s,
                                           w.view(bias), dims);
      EXPECT_LT(norm_err(dv_only, dv_ref), 1e-5) << where;
    }
}

TEST(HammingAttention, BackwardSteMatters) {
  // With the STE some dqk flows; with dout = 0 none does; and dqk differs from the relaxed gradient.
  HammingDims dims{2, 13, 12, 3, 16, 25};
  const LayerWeights w = make_weights(dims, 41);
  const auto qk = sav::test::normal(static_cast<size_t>(dims.B) * dims.N * dims.C, 42);
  const auto v = sav::test::normal(qk.size(), 43);
  const auto dout = sav::test::uniform(qk.size(), 44);
  std::vector<float> out(qk.size());
  SavedBuf s(dims);
  sav::cpu::hamming_attention_forward(out.data(), &s.s, qk.data(), v.data(), w.view(false), dims);
  size_t in_band = 0;
  const size_t ny = static_cast<size_t>(dims.B) * dims.H * dims.N * dims.nbits;
  for (size_t i = 0; i < ny; ++i) in_band += s.s.y[i] > 0.0f && s.s.y[i] < 1.0f;
  ASSERT_GT(in_band, 0u) << "fixture: some y must lie in (0, 1) for the STE to pass gradient";
  std::vector<float> dqk(qk.size(), 0.0f);
  sav::cpu::hamming_attention_backward(dqk.data(), nullptr, nullptr, nullptr, dout.data(), v.data(), s.s, w.view(false),
                                       dims);
  EXPECT_GT(sav::test::max_abs(dqk.data(), dqk.size()), 1e-4);
  std::vector<float> zero(qk.size(), 0.0f), dqk0(qk.size(), 0.0f);
  sav::cpu::hamming_attention_backward(dqk0.data(), nullptr, nullptr, nullptr, zero.data(), v.data(), s.s,
                                       w.view(false), dims);
  EXPECT_EQ(sav::test::max_abs(dqk0.data(), dqk0.size()), 0.0);
}

TEST(HammingAttention, FiniteDifferencesExactPaths) {
  // Hard codes: dv, dconv_w, dconv_b are exact (codes do not depend on v or the conv).
  for (const HammingDims& dims : {HammingDims{2, 11, 12, 3, 13, 7}, HammingDims{1, 6, 5, 1, 16, 25}}) {
    const LayerWeights w0 = make_weights(dims, 51);
    LayerWeights w = w0;
    const auto qk = sav::test::normal(static_cast<size_t>(dims.B) * dims.N * dims.C, 52);
    auto v = sav::test::normal(qk.size(), 53);
    const auto R = sav::test::uniform(qk.size(), 54);
    std::vector<float> out(qk.size());
    SavedBuf s(dims);
    auto loss = [&] {
      sav::cpu::hamming_attention_forward_ref(out.data(), &s.s, qk.data(), v.data(), w.view(true), dims);
      return sav::test::dot(out, R);
    };
    loss();
    const std::vector<uint64_t> codes0 = s.c;
    std::vector<float> dv(v.size(), 0.0f), dw(w.conv_w.size(), 0.0f), db(w.conv_b.size(), 0.0f);
    sav::cpu::hamming_attention_backward(nullptr, dv.data(), dw.data(), db.data(), R.data(), v.data(), s.s,
                                         w.view(true), dims);
    const auto fd_v = sav::test::fd_check(v.data(), v.size(), dv.data(), loss, 1e-3f, 64);
    EXPECT_LT(fd_v.err, 5e-3) << "dv: " << fd_v;
    const auto fd_w = sav::test::fd_check(w.conv_w.data(), w.conv_w.size(), dw.data(), loss, 1e-3f, 64);
    EXPECT_LT(fd_w.err, 5e-3) << "dconv_w: " << fd_w;
    const auto fd_b = sav::test::fd_check(w.conv_b.data(), w.conv_b.size(), db.data(), loss, 1e-3f, 64);
    EXPECT_LT(fd_b.err, 5e-3) << "dconv_b: " << fd_b;
    loss();
    EXPECT_EQ(s.c, codes0) << "perturbing v or the conv must not change the codes";
  }
}

TEST(HammingAttention, FiniteDifferencesRelaxedCodes) {
  // Debug mode of the reference: the relaxed y replaces the code; everything is differentiable.
  for (const HammingDims& dims : {HammingDims{2, 10, 12, 3, 13, 7}, HammingDims{1, 5, 6, 1, 8, 25}}) {
    LayerWeights w = make_weights(dims, 61);
    for (auto& a : w.A) a *= 0.3f;  // keeps y (hence the relaxed block) of moderate size
    auto qk = sav::test::normal(static_cast<size_t>(dims.B) * dims.N * dims.C, 62);
    auto v = sav::test::normal(qk.size(), 63);
    const auto R = sav::test::uniform(qk.size(), 64);
    std::vector<float> out(qk.size());
    SavedBuf s(dims);
    auto loss = [&] {
      sav::cpu::hamming_attention_forward_ref(out.data(), &s.s, qk.data(), v.data(), w.view(true), dims, true);
      return sav::test::dot(out, R);
    };
    loss();
    std::vector<float> dqk(qk.size(), 0.0f), dv(v.size(), 0.0f), dw(w.conv_w.size(), 0.0f), db(w.conv_b.size(), 0.0f);
    sav::cpu::hamming_attention_backward_ref(dqk.data(), dv.data(), dw.data(), db.data(), R.data(), v.data(), s.s,
                                             w.view(true), dims, true);
    const auto fd_qk = sav::test::fd_check(qk.data(), qk.size(), dqk.data(), loss, 1e-3f, 64);
    EXPECT_LT(fd_qk.err, 1e-2) << "dqk_lin (relaxed): " << fd_qk;
    const auto fd_v = sav::test::fd_check(v.data(), v.size(), dv.data(), loss, 1e-3f, 64);
    EXPECT_LT(fd_v.err, 1e-2) << "dv (relaxed): " << fd_v;
    const auto fd_w = sav::test::fd_check(w.conv_w.data(), w.conv_w.size(), dw.data(), loss, 1e-3f, 64);
    EXPECT_LT(fd_w.err, 5e-3) << "dconv_w (relaxed): " << fd_w;
  }
}

TEST(HammingAttention, DegenerateInputsStayFinite) {
  // Image 0: every token equal to every anchor (sigma clamps to its minimum); image 1: an all-zero qk row
  // (its norm clamps).
  HammingDims dims{2, 5, 4, 1, 8, 3};
  LayerWeights w = make_weights(dims, 71);
  for (int j = 0; j < dims.m; ++j)
    for (int i = 0; i < 4; ++i) w.anchors[j * 4 + i] = 0.5f;
  std::vector<float> qk(static_cast<size_t>(dims.B) * dims.N * dims.C, 1.0f);
  for (int i = 0; i < 4; ++i) qk[dims.N * 4 + i] = 0.0f;  // image 1, token 0: zero vector
  const auto v = sav::test::normal(qk.size(), 72);
  const auto dout = sav::test::uniform(qk.size(), 73);
  std::vector<float> out(qk.size()), out_ref(qk.size()), dqk(qk.size(), 0.0f), dv(qk.size(), 0.0f);
  SavedBuf s(dims), s_ref(dims);
  sav::cpu::hamming_attention_forward(out.data(), &s.s, qk.data(), v.data(), w.view(true), dims);
  sav::cpu::hamming_attention_forward_ref(out_ref.data(), &s_ref.s, qk.data(), v.data(), w.view(true), dims);
  sav::cpu::hamming_attention_backward(dqk.data(), dv.data(), nullptr, nullptr, dout.data(), v.data(), s.s,
                                       w.view(true), dims);
  for (size_t i = 0; i < out.size(); ++i) {
    ASSERT_TRUE(std::isfinite(out[i]) && std::isfinite(out_ref[i])) << i;
    ASSERT_TRUE(std::isfinite(dqk[i]) && std::isfinite(dv[i])) << i;
  }
  EXPECT_LT(norm_err(out, out_ref), 2e-6);
  EXPECT_EQ(s.s.sigma[0], sav::cpu::kHammingSigmaMin);
  EXPECT_EQ(s.s.qnorm[dims.N], sav::cpu::kHammingNormEps);
}

TEST(HammingAttention, RejectsBadDims) {
  EXPECT_THROW(sav::cpu::hamming_check_dims(HammingDims{1, 4, 10, 3, 16, 25}), sav::Error);  // C % H
  EXPECT_THROW(sav::cpu::hamming_check_dims(HammingDims{1, 4, 12, 3, 65, 25}), sav::Error);  // > 64 bits
  EXPECT_THROW(sav::cpu::hamming_check_dims(HammingDims{1, 4, 12, 3, 16, 0}), sav::Error);
  EXPECT_NO_THROW(sav::cpu::hamming_check_dims(HammingDims{1, 4, 12, 3, 64, 1}));
  EXPECT_EQ(sav::cpu::hamming_saved_floats(HammingDims{2, 5, 12, 3, 16, 25}),
            static_cast<size_t>(2 * 3 * (5 * (2 * 4 + 25 + 16 + 2) + 16 * 4 + 1)));
}

// ---- KSH fitting ----

namespace {

// T tokens around `clusters` random unit centres in d dims (noise std `noise` per coordinate), with labels.
void clustered_tokens(std::vector<float>& q, std::vector<int>& label, int clusters, int per_cluster, int d, float noise,
                      uint64_t seed) {
  sav::Rng rng(seed);
  std::vector<float> centres(static_cast<size_t>(clusters) * d);
  for (auto& x : centres) x = rng.normal();
  const int T = clusters * per_cluster;
  q.assign(static_cast<size_t>(T) * d, 0.0f);
  label.assign(T, 0);
  for (int t = 0; t < T; ++t) {
    const int c = t % clusters;  // interleaved clusters of exactly per_cluster tokens
    label[t] = c;
    double cn = 0.0;
    for (int i = 0; i < d; ++i) cn += centres[c * d + i] * centres[c * d + i];
    for (int i = 0; i < d; ++i)
      q[static_cast<size_t>(t) * d + i] = centres[c * d + i] / static_cast<float>(std::sqrt(cn)) + noise * rng.normal();
  }
}

std::vector<uint64_t> hash_tokens(const std::vector<float>& q_raw, int T, int d, const sav::KshParams& p) {
  std::vector<float> q(q_raw);
  for (int t = 0; t < T; ++t) {
    double s = 0.0;
    for (int i = 0; i < d; ++i) s += q[t * d + i] * q[t * d + i];
    for (int i = 0; i < d; ++i) q[t * d + i] /= static_cast<float>(std::sqrt(s));
  }
  std::vector<float> y(static_cast<size_t>(T) * p.nbits), D(static_cast<size_t>(T) * p.m), sg(1);
  std::vector<uint64_t> codes(T);
  sav::cpu::ksh_hash_forward(y.data(), codes.data(), D.data(), sg.data(), q.data(), p.anchors.data(), p.mu.data(),
                             p.A.data(), 1, 1, T, d, p.nbits, p.m);
  return codes;
}

}  // namespace

TEST(KshFit, ClusteredDataGivesCloseCodesWithinClusters) {
  // Clusters of topk = 10 tokens: each token's 10 most similar tokens are its cluster (itself included),
  // so the target asks for equal codes within a cluster and unrelated codes elsewhere.
  const int d = 16, clusters = 40, per = 10, b = 16, m = 25;
  std::vector<float> q;
  std::vector<int> label;
  clustered_tokens(q, label, clusters, per, d, 0.12f, 7);
  const int T = clusters * per;
  sav::Rng rng(1);
  const sav::KshParams p = sav::ksh_fit(q.data(), T, d, b, m, rng);
  ASSERT_EQ(p.A.size(), static_cast<size_t>(b) * m);
  ASSERT_EQ(p.anchors.size(), static_cast<size_t>(m) * d);
  ASSERT_EQ(p.mu.size(), static_cast<size_t>(m));
  const auto codes = hash_tokens(q, T, d, p);
  double within = 0, across = 0;
  size_t nw = 0, na = 0;
  for (int s = 0; s < T; ++s)
    for (int t = s + 1; t < T; ++t) {
      const int hd = __builtin_popcountll(codes[s] ^ codes[t]);
      if (label[s] == label[t]) {
        within += hd;
        ++nw;
      } else {
        across += hd;
        ++na;
      }
    }
  within /= nw;
  across /= na;
  // Measured: within ~2.0, across ~8.1 (16 bits); unrelated codes sit near b/2 = 8.
  EXPECT_LT(within, 0.4 * across) << "mean Hamming distance within clusters " << within << ", across " << across;
  EXPECT_GT(across, 0.4 * b) << "codes of different clusters should differ in many bits";
}

TEST(KshFit, ImprovesObjectiveOverRandomProjection) {
  const int d = 16, b = 16, m = 25;
  for (int per : {10, 60}) {  // clusters of about topk tokens, and larger ones
    std::vector<float> q;
    std::vector<int> label;
    clustered_tokens(q, label, per == 10 ? 40 : 8, per, d, 0.2f, 9);
    const int T = static_cast<int>(label.size());
    for (bool spectral : {true, false}) {
      sav::Rng rng(2);
      sav::KshFitOptions opt;
      opt.spectral_init = spectral;
      const sav::KshParams p = sav::ksh_fit(q.data(), T, d, b, m, rng, opt);
      sav::KshParams rnd = p;  // same anchors and mu, random A
      sav::Rng rng2(3);
      for (auto& a : rnd.A) a = rng2.normal();
      const double obj_fit = sav::ksh_objective(q.data(), T, d, p);
      const double obj_rnd = sav::ksh_objective(q.data(), T, d, rnd);
      int optimised = 0;
      for (uint8_t o : p.bit_optimised) optimised += o;
      // Measured: fitted 0.068-0.075 vs random A 0.12-0.16 (ratio 0.46-0.58).
      EXPECT_LT(obj_fit, 0.75 * obj_rnd) << (spectral ? "spectral" : "random") << " init, clusters of " << per
                                         << ": fitted " << obj_fit << " vs random A " << obj_rnd << " (" << optimised
                                         << " bits optimised)";
    }
  }
}

TEST(KshFit, ObjectiveMatchesBruteForce) {
  // ksh_objective = mean over all pairs of (Y_s . Y_t / b - S0_st)^2, recomputed here from its definition.
  const int d = 5, b = 7, m = 6, topk = 3;
  std::vector<float> q;
  std::vector<int> label;
  clustered_tokens(q, label, 4, 6, d, 0.3f, 21);
  const int T = static_cast<int>(label.size());
  sav::KshParams p;
  p.d = d;
  p.nbits = b;
  p.m = m;
  p.anchors = sav::test::normal(static_cast<size_t>(m) * d, 22);
  p.mu = sav::test::uniform(m, 23, 0.2f, 0.5f);
  p.A = sav::test::normal(static_cast<size_t>(b) * m, 24);
  const auto codes = hash_tokens(q, T, d, p);  // the hash forward: bit r = 1[y_r > 0]
  std::vector<float> qn(q);
  for (int t = 0; t < T; ++t) {
    double s = 0.0;
    for (int i = 0; i < d; ++i) s += qn[t * d + i] * qn[t * d + i];
    for (int i = 0; i < d; ++i) qn[t * d + i] /= static_cast<float>(std::sqrt(s));
  }
  double sum = 0.0;
  for (int s = 0; s < T; ++s) {
    std::vector<std::pair<double, int>> sims;
    for (int t = 0; t < T; ++t) {
      double c = 0.0;
      for (int i = 0; i < d; ++i) c += qn[s * d + i] * qn[t * d + i];
      sims.push_back({-c, t});
    }
    std::sort(sims.begin(), sims.end());
    std::vector<int> S0(T, 0);
    for (int e = 0; e < topk; ++e) S0[sims[e].second] = 1, S0[sims[T - 1 - e].second] = -1;
    for (int t = 0; t < T; ++t) {
      const int agree = b - 2 * __builtin_popcountll(codes[s] ^ codes[t]);  // Y_s . Y_t with Y = +-1
      const double e = static_cast<double>(agree) / b - S0[t];
      sum += e * e;
    }
  }
  EXPECT_NEAR(sav::ksh_objective(q.data(), T, d, p, topk), sum / (static_cast<double>(T) * T), 1e-9);
}

TEST(KshFit, DeterministicForASeed) {
  std::vector<float> q;
  std::vector<int> label;
  clustered_tokens(q, label, 5, 50, 8, 0.3f, 11);
  const int T = static_cast<int>(label.size());
  sav::KshFitOptions opt;
  opt.max_tokens = 200;  // exercises the subsampling too
  sav::Rng r1(77), r2(77), r3(78);
  const auto p1 = sav::ksh_fit(q.data(), T, 8, 13, 9, r1, opt);
  const auto p2 = sav::ksh_fit(q.data(), T, 8, 13, 9, r2, opt);
  const auto p3 = sav::ksh_fit(q.data(), T, 8, 13, 9, r3, opt);
  EXPECT_EQ(p1.A, p2.A);
  EXPECT_EQ(p1.anchors, p2.anchors);
  EXPECT_EQ(p1.mu, p2.mu);
  EXPECT_NE(p1.A, p3.A) << "another seed should give another fit";
  for (float a : p1.A) ASSERT_TRUE(std::isfinite(a));
}

TEST(KshFit, LayerFitsEveryHeadAndFeedsTheAttention) {
  const int B = 2, N = 40, H = 2, d = 6, C = H * d, b = 16, m = 25;
  std::vector<float> qk = sav::test::normal(static_cast<size_t>(B) * N * C, 91);
  std::vector<float> anchors(static_cast<size_t>(H) * m * d), mu(static_cast<size_t>(H) * m),
      A(static_cast<size_t>(H) * b * m);
  sav::Rng rng(5);
  sav::KshFitOptions opt;
  opt.steps = 30;
  sav::ksh_fit_layer(anchors.data(), mu.data(), A.data(), qk.data(), B, N, C, H, b, m, rng, opt);
  // Head h equals a direct fit of its tokens with Rng(h-th draw of the layer rng).
  sav::Rng rng2(5);
  std::vector<uint64_t> seeds(H);
  for (auto& sd : seeds) sd = rng2.next_u64();
  std::vector<float> tok(static_cast<size_t>(B) * N * d);
  for (int h = 0; h < H; ++h) {
    for (int t = 0; t < B * N; ++t)
      for (int i = 0; i < d; ++i) tok[t * d + i] = qk[static_cast<size_t>(t) * C + h * d + i];
    sav::Rng head_rng(seeds[h]);
    const auto p = sav::ksh_fit(tok.data(), B * N, d, b, m, head_rng, opt);
    EXPECT_TRUE(std::equal(p.A.begin(), p.A.end(), A.begin() + h * b * m)) << "head " << h;
    EXPECT_TRUE(std::equal(p.anchors.begin(), p.anchors.end(), anchors.begin() + h * m * d)) << "head " << h;
    EXPECT_TRUE(std::equal(p.mu.begin(), p.mu.end(), mu.begin() + h * m)) << "head " << h;
  }
  // The fitted hash in the attention: codes use both values of most bits.
  HammingDims dims{B, N, C, H, b, m};
  const std::vector<float> conv(H * 9, 0.0f);
  const HammingWeights w{anchors.data(), mu.data(), A.data(), conv.data(), nullptr};
  std::vector<float> out(qk.size());
  SavedBuf s(dims);
  sav::cpu::hamming_attention_forward(out.data(), &s.s, qk.data(), qk.data(), w, dims);
  int balanced_bits = 0;
  for (int h = 0; h < H; ++h)
    for (int r = 0; r < b; ++r) {
      int ones = 0;
      for (int bi = 0; bi < B; ++bi)
        for (int n = 0; n < N; ++n) ones += (s.c[(static_cast<size_t>(bi) * H + h) * N + n] >> r) & 1u;
      balanced_bits += ones > 0 && ones < B * N;
    }
  EXPECT_GE(balanced_bits, H * b * 3 / 4) << "most fitted bits should split the tokens";
}
