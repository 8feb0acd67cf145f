// Tests of the shift linear op family (src/ops/cpu/shift_linear.h): materialisation, conversion, the float
// forward/backward (fast vs reference, finite differences, the STE formulas), the integer shift-add kernel
// (SIMD vs scalar vs reference bit-exact, error bound against the float path, overflow rejection) and the
// packed 5-bit storage.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/cpu_features.h"
#include "core/error.h"
#include "core/rng.h"
#include "op_harness.h"
#include "ops/cpu/shift_linear.h"

namespace {

using namespace sav::cpu;
using sav::test::norm_err;

constexpr int kPmin = shift_default_pmin, kPmax = shift_default_pmax;

// Training-style parameters: p spread over and slightly beyond [pmin, pmax] (clamping), non-integer
// values (rounding), s in [-1.5, 1.5] so about a third of the weights are zero.
void random_shift_params(std::vector<float>& p, std::vector<float>& s, size_t n, uint64_t seed, int pmin = kPmin,
                         int pmax = kPmax) {
  p = sav::test::uniform(n, seed, static_cast<float>(pmin) - 1.4f, static_cast<float>(pmax) + 1.4f);
  s = sav::test::uniform(n, seed + 1, -1.5f, 1.5f);
}

bool bit_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

std::vector<ShiftIntIsa> available_isas() {
  std::vector<ShiftIntIsa> v{shift_isa_scalar};
  if (sav::cpu_features().avx2) v.push_back(shift_isa_avx2);
  return v;
}

TEST(ShiftLinear, RoundHalfEvenMatchesTorchRound) {
  const float in[] = {0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 0.49f, 0.51f, -0.51f, 3.0f, -14.5f, -13.5f, 7.2f};
  const float want[] = {0.f, 2.f, 2.f, -0.f, -2.f, -2.f, 0.f, 1.f, -1.f, 3.f, -14.f, -14.f, 7.f};
  for (size_t i = 0; i < sizeof(in) / sizeof(in[0]); ++i)
    EXPECT_EQ(shift_round_half_even(in[i]), want[i]) << "round(" << in[i] << ")";
}

TEST(ShiftLinear, MaterialiseRoundsSignsAndClamps) {
  // p: integers, halves (to even), beyond the range (clamped); s: round-then-sign, |s| <= 0.5 -> 0.
  const std::vector<float> p = {0.f, -3.f, -2.5f, -3.5f, -20.f, 5.f, -14.f, -0.4f, -1.f, -7.6f};
  const std::vector<float> s = {1.f, -1.f, 0.7f, -0.6f, 2.3f, -9.f, 0.5f, -0.5f, 0.49f, 1.51f};
  const std::vector<float> want = {1.f,
                                   -0.125f,
                                   0.25f,              // round(-2.5) = -2
                                   -0.0625f,           // round(-3.5) = -4
                                   std::ldexp(1.f, -14),  // clamp at pmin
                                   -1.f,               // clamp at pmax
                                   0.f,                // round(0.5) = 0
                                   0.f,                // round(-0.5) = -0
                                   0.f,
                                   std::ldexp(1.f, -8)};
  std::vector<float> W(p.size());
  shift_linear_weights(W.data(), p.data(), s.data(), 1, static_cast<int>(p.size()), kPmin, kPmax);
  for (size_t i = 0; i < p.size(); ++i) EXPECT_EQ(W[i], want[i]) << "entry " << i;
  // A custom range clamps at its own limits.
  shift_linear_weights(W.data(), p.data(), s.data(), 2, 5, -6, -2);
  EXPECT_EQ(W[0], 0.25f);     // p = 0 -> pmax = -2
  EXPECT_EQ(W[4], 0.015625f);  // p = -20 -> pmin = -6
  // Positive exponents (a range above 0) round half to even too: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4.
  const std::vector<float> pp = {0.5f, 1.5f, 2.5f, 3.5f, -0.5f, -1.5f}, sp(6, 1.0f);
  std::vector<float> Wp(6);
  shift_linear_weights(Wp.data(), pp.data(), sp.data(), 1, 6, -6, 5);
  const float want_p[] = {1.f, 4.f, 4.f, 16.f, 1.f, 0.25f};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(Wp[i], want_p[i]) << "p = " << pp[i];
}

TEST(ShiftLinear, FromDenseExactPowersSignsZeroAndClamping) {
  std::vector<float> w, wantp, wants;
  for (int e = -14; e <= 0; ++e)
    for (int sg : {1, -1}) {
      w.push_back(std::ldexp(static_cast<float>(sg), e));
      wantp.push_back(static_cast<float>(e));
      wants.push_back(static_cast<float>(sg));
    }
  auto add = [&](float v, float p, float s) {
    w.push_back(v);
    wantp.push_back(p);
    wants.push_back(s);
  };
  add(0.0f, kPmin, 0.f);                            // zero -> sign 0, p = pmin
  add(-0.0f, kPmin, 0.f);
  add(1e-9f, kPmin, 1.f);                           // below 2^pmin: clamped, not zeroed
  add(-3e-6f, kPmin, -1.f);
  add(8.0f, kPmax, 1.f);                            // above 2^pmax: clamped
  add(std::exp2(-3.4f), -3.f, 1.f);                 // log-domain rounding: threshold 2^(k+0.5)
  add(-std::exp2(-3.6f), -4.f, -1.f);
  add(0.7f, -1.f, 1.f);                             // log2 0.7 = -0.51
  add(0.71f, 0.f, 1.f);                             // log2 0.71 = -0.494
  std::vector<float> p(w.size()), s(w.size());
  shift_from_dense(p.data(), s.data(), w.data(), 1, static_cast<int>(w.size()), kPmin, kPmax);
  for (size_t i = 0; i < w.size(); ++i) {
    EXPECT_EQ(p[i], wantp[i]) << "w = " << w[i];
    EXPECT_EQ(s[i], wants[i]) << "w = " << w[i];
  }
  // Powers of two survive the round trip dense -> (p, s) -> W exactly.
  std::vector<float> W(w.size());
  shift_linear_weights(W.data(), p.data(), s.data(), 1, static_cast<int>(w.size()), kPmin, kPmax);
  for (int i = 0; i < 30; ++i) EXPECT_EQ(W[i], w[i]);
  std::vector<float> bad = {1.0f, NAN};
  EXPECT_THROW(shift_from_dense(p.data(), s.data(), bad.data(), 1, 2, kPmin, kPmax), sav::Error);
}

TEST(ShiftLinear, ForwardFastMatchesRef) {
  for (int M : {1, 3, 7, 13, 37})
    for (int K : {1, 5, 17, 64})
      for (int F : {1, 3, 33}) {
        std::vector<float> p, s;
        random_shift_params(p, s, static_cast<size_t>(F) * K, 100 + M * 7 + K * 3 + F);
        auto x = sav::test::normal(static_cast<size_t>(M) * K, 11 + M + K);
        auto b = sav::test::uniform(F, 12 + F);
        std::vector<float> y(static_cast<size_t>(M) * F), yr(y.size());
        shift_linear_forward(y.data(), x.data(), p.data(), s.data(), b.data(), M, K, F, kPmin, kPmax);
        shift_linear_forward_ref(yr.data(), x.data(), p.data(), s.data(), b.data(), M, K, F, kPmin, kPmax);
        EXPECT_LT(norm_err(y, yr), 1e-5) << "M=" << M << " K=" << K << " F=" << F;
        // Without bias, with caller-provided scratch.
        std::vector<float> scratch(static_cast<size_t>(F) * K);
        shift_linear_forward(y.data(), x.data(), p.data(), s.data(), nullptr, M, K, F, kPmin, kPmax, scratch.data());
        shift_linear_forward_ref(yr.data(), x.data(), p.data(), s.data(), nullptr, M, K, F, kPmin, kPmax);
        EXPECT_LT(norm_err(y, yr), 1e-5) << "no bias, M=" << M << " K=" << K << " F=" << F;
      }
}

TEST(ShiftLinear, BackwardFastMatchesRefAndAccumulates) {
  for (int M : {1, 7, 37})
    for (int K : {1, 5, 33})
      for (int F : {1, 3, 17}) {
        const size_t nx = static_cast<size_t>(M) * K, nw = static_cast<size_t>(F) * K;
        std::vector<float> p, s;
        random_shift_params(p, s, nw, 300 + M + K + F);
        auto x = sav::test::normal(nx, 31 + M);
        auto dy = sav::test::normal(static_cast<size_t>(M) * F, 32 + F);
        // Non-zero starting gradients: both paths must add to them.
        auto dx = sav::test::uniform(nx, 33), dp = sav::test::uniform(nw, 34), ds = sav::test::uniform(nw, 35),
             db = sav::test::uniform(F, 36);
        auto dxr = dx, dpr = dp, dsr = ds, dbr = db;
        shift_linear_backward(dx.data(), dp.data(), ds.data(), db.data(), dy.data(), x.data(), p.data(), s.data(), M,
                              K, F, kPmin, kPmax);
        shift_linear_backward_ref(dxr.data(), dpr.data(), dsr.data(), dbr.data(), dy.data(), x.data(), p.data(),
                                  s.data(), M, K, F, kPmin, kPmax);
        const char* where = "";
        EXPECT_LT(norm_err(dx, dxr), 1e-5) << where << "dx M=" << M << " K=" << K << " F=" << F;
        EXPECT_LT(norm_err(dp, dpr), 1e-5) << "dp M=" << M << " K=" << K << " F=" << F;
        EXPECT_LT(norm_err(ds, dsr), 1e-5) << "ds M=" << M << " K=" << K << " F=" << F;
        EXPECT_LT(norm_err(db, dbr), 1e-5) << "db M=" << M << " K=" << K << " F=" << F;
      }
  // nullptr gradients are skipped.
  std::vector<float> p, s;
  random_shift_params(p, s, 15, 7);
  auto x = sav::test::normal(15, 8), dy = sav::test::normal(9, 9);
  std::vector<float> db(3, 0.f);
  shift_linear_backward(nullptr, nullptr, nullptr, db.data(), dy.data(), x.data(), p.data(), s.data(), 3, 5, 3, kPmin,
                        kPmax);
  EXPECT_NEAR(db[0], dy[0] + dy[3] + dy[6], 1e-6);
}

TEST(ShiftLinear, BackwardFiniteDifferencesDxDb) {
  const int M = 5, K = 7, F = 6;
  std::vector<float> p, s;
  random_shift_params(p, s, static_cast<size_t>(F) * K, 41);
  auto x = sav::test::normal(static_cast<size_t>(M) * K, 42);
  auto b = sav::test::uniform(F, 43);
  auto R = sav::test::uniform(static_cast<size_t>(M) * F, 44);
  std::vector<float> y(static_cast<size_t>(M) * F);
  auto loss = [&] {
    shift_linear_forward_ref(y.data(), x.data(), p.data(), s.data(), b.data(), M, K, F, kPmin, kPmax);
    return sav::test::dot(y, R);
  };
  std::vector<float> dx(x.size(), 0.f), db(F, 0.f);
  shift_linear_backward(dx.data(), nullptr, nullptr, db.data(), R.data(), x.data(), p.data(), s.data(), M, K, F, kPmin,
                        kPmax);
  // The loss is linear in x and b: the only FD error is the float rounding of y (~1e-7 |y| per output).
  auto fx = sav::test::fd_check(x.data(), x.size(), dx.data(), loss);
  EXPECT_LT(fx.err, 2e-3) << "dx " << fx;
  auto fb = sav::test::fd_check(b.data(), b.size(), db.data(), loss);
  EXPECT_LT(fb.err, 2e-3) << "db " << fb;
}

TEST(ShiftLinear, BackwardStraightThroughFormulasInDouble) {
  const int M = 9, K = 11, F = 7;
  std::vector<float> p, s;
  random_shift_params(p, s, static_cast<size_t>(F) * K, 51);
  p[0] = -3.4f, s[0] = 0.2f;  // a zero weight: dp = 0, ds != 0
  p[1] = -2.6f, s[1] = -0.9f;
  auto x = sav::test::normal(static_cast<size_t>(M) * K, 52);
  auto dy = sav::test::normal(static_cast<size_t>(M) * F, 53);
  std::vector<float> dp(p.size(), 0.f), ds(p.size(), 0.f);
  shift_linear_backward(nullptr, dp.data(), ds.data(), nullptr, dy.data(), x.data(), p.data(), s.data(), M, K, F,
                        kPmin, kPmax);
  double worst_p = 0, worst_s = 0, scale_p = 0, scale_s = 0;
  for (int j = 0; j < F; ++j)
    for (int k = 0; k < K; ++k) {
      double dW = 0;
      for (int i = 0; i < M; ++i) dW += static_cast<double>(dy[i * F + j]) * x[i * K + k];
      const double pr = std::clamp(std::nearbyint(static_cast<double>(p[j * K + k])), double(kPmin), double(kPmax));
      const double sr = std::nearbyint(static_cast<double>(s[j * K + k]));
      const double sg = sr > 0 ? 1 : (sr < 0 ? -1 : 0);
      const double want_p = dW * sg * std::exp2(pr) * std::log(2.0), want_s = dW * std::exp2(pr);
      worst_p = std::max(worst_p, std::fabs(want_p - dp[j * K + k]));
      worst_s = std::max(worst_s, std::fabs(want_s - ds[j * K + k]));
      scale_p = std::max(scale_p, std::fabs(want_p));
      scale_s = std::max(scale_s, std::fabs(want_s));
    }
  EXPECT_LT(worst_p / scale_p, 1e-5);
  EXPECT_LT(worst_s / scale_s, 1e-5);
  EXPECT_EQ(dp[0], 0.0f);
  EXPECT_NE(ds[0], 0.0f);
  {
    double dW = 0;
    for (int i = 0; i < M; ++i) dW += static_cast<double>(dy[i * F]) * x[i * K + 1];
    EXPECT_NEAR(dp[1], dW * -0.125 * std::log(2.0), 1e-5 * std::fabs(dW));  // round(-2.6) = -3
    EXPECT_NEAR(ds[1], dW * 0.125, 1e-5 * std::fabs(dW));
  }
}

// ---- integer shift-add kernel ----

TEST(ShiftLinearInt, SimdScalarAndRefBitExactOnOddShapes) {
  printf("[ shift int kernel: auto = %s, cpu: %s ]\n", shift_int_isa_name(), sav::cpu_features_str().c_str());
  if (!sav::cpu_features().avx2) printf("[ no AVX2 on this CPU: only the scalar kernel is checked ]\n");
  int cases = 0;
  for (int K : {1, 3, 17, 65, 193})
    for (int F : {1, 5, 33, 130})
      for (int M : {1, 7, 50, 70}) {
        std::vector<float> p, s;
        random_shift_params(p, s, static_cast<size_t>(F) * K, 500 + K * 13 + F * 5 + M);
        auto x = sav::test::normal(static_cast<size_t>(M) * K, 600 + K + M, 2.0f);
        auto b = sav::test::uniform(F, 700 + F);
        const ShiftKernelWeights kw = shift_kernel_prepare(p.data(), s.data(), F, K, kPmin, kPmax);
        std::vector<float> yr(static_cast<size_t>(M) * F);
        shift_linear_forward_int_ref(yr.data(), x.data(), p.data(), s.data(), b.data(), M, K, F, kPmin, kPmax);
        for (ShiftIntIsa isa : available_isas()) {
          std::vector<float> y(yr.size(), NAN);
          shift_linear_forward_int(y.data(), x.data(), kw, b.data(), M, K, F, 16, isa);
          EXPECT_TRUE(bit_equal(y, yr)) << shift_int_isa_name(isa) << " M=" << M << " K=" << K << " F=" << F
                                        << " err " << norm_err(y, yr);
        }
        ++cases;
      }
  EXPECT_EQ(cases, 80);
}

TEST(ShiftLinearInt, CustomRangesLargeShiftsAndZeroWeights) {
  // Ranges whose smallest shift is not 0 (the kernel's plane offset), shifts up to 31 (x >> 31 is 0 or
  // -1), and a weight set with no nonzero entry at all (y = b).
  const int M = 37, K = 70, F = 21;
  auto x = sav::test::normal(static_cast<size_t>(M) * K, 1001, 4.0f);
  auto b = sav::test::uniform(F, 1002);
  for (auto [pmin, pmax] : {std::pair{-9, -3}, std::pair{-31, -17}, std::pair{-14, 0}}) {
    std::vector<float> p, s;
    random_shift_params(p, s, static_cast<size_t>(F) * K, 1003 - pmin, pmin, pmax);
    const bool all_zero = pmax == 0;
    if (all_zero) std::fill(s.begin(), s.end(), 0.3f);
    const ShiftKernelWeights kw = shift_kernel_prepare(p.data(), s.data(), F, K, pmin, pmax);
    std::vector<float> yr(static_cast<size_t>(M) * F);
    shift_linear_forward_int_ref(yr.data(), x.data(), p.data(), s.data(), b.data(), M, K, F, pmin, pmax);
    if (all_zero) {
      EXPECT_TRUE(kw.entry.empty());
      for (int i = 0; i < M; ++i) EXPECT_EQ(yr[static_cast<size_t>(i) * F + 3], b[3]);
    } else {
      EXPECT_EQ(kw.shift_lo, -pmax);
      EXPECT_EQ(kw.shift_hi, -pmin);
    }
    for (ShiftIntIsa isa : available_isas()) {
      std::vector<float> y(yr.size(), NAN);
      shift_linear_forward_int(y.data(), x.data(), kw, b.data(), M, K, F, 16, isa);
      EXPECT_TRUE(bit_equal(y, yr)) << shift_int_isa_name(isa) << " range [" << pmin << ", " << pmax << "]";
    }
  }
}

TEST(ShiftLinearInt, AgreesWithFloatRefWithinTruncationBound) {
  // |y_int - y| <= 1.5 K 2^-f (input rounding + floor of the shift) + |y| 2^-22 (int->float, bias add, and
  // the float reference's own final rounding).
  for (int f : {16, 10}) {
    double worst_ratio = 0, max_abs = 0, max_rel = 0;
    for (int K : {1, 17, 193, 768})
      for (int M : {7, 50}) {
        const int F = 33;
        std::vector<float> p, s;
        random_shift_params(p, s, static_cast<size_t>(F) * K, 900 + K + M);
        auto x = sav::test::normal(static_cast<size_t>(M) * K, 901 + K + M, 3.0f);
        auto b = sav::test::uniform(F, 902);
        const ShiftKernelWeights kw = shift_kernel_prepare(p.data(), s.data(), F, K, kPmin, kPmax);
        std::vector<float> yi(static_cast<size_t>(M) * F), yf(yi.size());
        shift_linear_forward_int(yi.data(), x.data(), kw, b.data(), M, K, F, f);
        shift_linear_forward_ref(yf.data(), x.data(), p.data(), s.data(), b.data(), M, K, F, kPmin, kPmax);
        const double bound_abs = 1.5 * K * std::ldexp(1.0, -f);
        for (size_t i = 0; i < yi.size(); ++i) {
          const double err = std::fabs(static_cast<double>(yi[i]) - yf[i]);
          const double bound = bound_abs + std::fabs(yf[i]) * std::ldexp(1.0, -22);
          ASSERT_LE(err, bound) << "f=" << f << " K=" << K << " M=" << M << " at " << i;
          worst_ratio = std::max(worst_ratio, err / bound);
          max_abs = std::max(max_abs, err);
          max_rel = std::max(max_rel, err / std::max(1e-3, static_cast<double>(std::fabs(yf[i]))));
        }
      }
    printf("[ int vs float, Q.%d: max abs err %.3g, max rel err %.3g (|y|>=1e-3 floor), worst err/bound %.3f ]\n", f,
           max_abs, max_rel, worst_ratio);
    // The bound is not vacuous: truncation is visible at 10 fractional bits.
    if (f == 10) {
      EXPECT_GT(worst_ratio, 0.05);
    }
  }
}

TEST(ShiftLinearInt, OverflowIsRejectedNeverWrapped) {
  const int K = 4, F = 3, M = 2;
  // Weights: all +1 (p = 0), all -1/2, mixed: the accumulator reaches the row L1 norm.
  std::vector<float> p = {0, 0, 0, 0, -1, -1, -1, -1, 0, -3, 0, -14};
  std::vector<float> s = {1, 1, 1, 1, -1, -1, -1, -1, 1, -1, -1, 1};
  const ShiftKernelWeights kw = shift_kernel_prepare(p.data(), s.data(), F, K, kPmin, kPmax);
  // At the limit: 4 * 8191.75 * 2^16 = 2147418112 <= 2^31-1: must be exact.
  std::vector<float> x = {8191.75f, 8191.75f, 8191.75f, 8191.75f, -8191.75f, 8191.75f, -8191.75f, -8191.75f};
  std::vector<float> yr(static_cast<size_t>(M) * F);
  shift_linear_forward_int_ref(yr.data(), x.data(), p.data(), s.data(), nullptr, M, K, F, kPmin, kPmax);
  EXPECT_EQ(yr[0], static_cast<float>(2147418112.0 / 65536.0));
  EXPECT_EQ(yr[1], -4 * 4095.875f);
  for (ShiftIntIsa isa : available_isas()) {
    std::vector<float> y(yr.size());
    shift_linear_forward_int(y.data(), x.data(), kw, nullptr, M, K, F, 16, isa);
    EXPECT_TRUE(bit_equal(y, yr)) << shift_int_isa_name(isa);
  }
  // One step over: row L1 = 2^31 -> rejected by every path.
  std::vector<float> over = x;
  over[5] = 8192.0f, over[6] = -8192.0f, over[7] = -8192.0f, over[4] = -8192.0f;
  std::vector<float> y(yr.size());
  EXPECT_THROW(shift_linear_forward_int_ref(y.data(), over.data(), p.data(), s.data(), nullptr, M, K, F, kPmin, kPmax),
               sav::Error);
  for (ShiftIntIsa isa : available_isas())
    EXPECT_THROW(shift_linear_forward_int(y.data(), over.data(), kw, nullptr, M, K, F, 16, isa), sav::Error);
  // A single value beyond Q15.16, and non-finite inputs.
  for (float bad : {40000.0f, -32768.0f, INFINITY, NAN}) {
    std::vector<float> xb = {0.f, 0.f, bad, 0.f, 1.f, 1.f, 1.f, 1.f};
    for (ShiftIntIsa isa : available_isas()) {
      EXPECT_THROW(shift_linear_forward_int(y.data(), xb.data(), kw, nullptr, M, K, F, 16, isa), sav::Error) << bad;
    }
    EXPECT_THROW(shift_linear_forward_int_ref(y.data(), xb.data(), p.data(), s.data(), nullptr, M, K, F, kPmin, kPmax),
                 sav::Error);
  }
  // The message says what to do.
  try {
    shift_linear_forward_int(y.data(), over.data(), kw, nullptr, M, K, F, 16);
    ADD_FAILURE() << "no throw";
  } catch (const sav::Error& e) {
    EXPECT_NE(std::string(e.what()).find("fewer fractional bits"), std::string::npos) << e.what();
  }
  // Choosing fewer fractional bits makes it fit, and the result is exact against the reference.
  const int f = shift_linear_int_frac_bits(over.data(), M, K);
  EXPECT_EQ(f, 15);
  std::vector<float> yo(yr.size()), yor(yr.size());
  shift_linear_forward_int(yo.data(), over.data(), kw, nullptr, M, K, F, f);
  shift_linear_forward_int_ref(yor.data(), over.data(), p.data(), s.data(), nullptr, M, K, F, kPmin, kPmax, f);
  EXPECT_TRUE(bit_equal(yo, yor));
  EXPECT_EQ(yo[0], 4 * 8191.75f);
  EXPECT_EQ(shift_linear_int_frac_bits(x.data(), M, K), 16);
  std::vector<float> huge = {3e9f, 0, 0, 0};
  EXPECT_THROW(shift_linear_int_frac_bits(huge.data(), 1, K), sav::Error);
  // Ranges the kernel cannot shift are rejected at preparation.
  EXPECT_THROW(shift_kernel_prepare(p.data(), s.data(), F, K, -14, 2), sav::Error);
  EXPECT_THROW(shift_kernel_prepare(p.data(), s.data(), F, K, -40, 0), sav::Error);
}

TEST(ShiftLinearInt, NegativeInputsShiftTowardMinusInfinity) {
  // x = -3 * 2^-16 (x_int = -3), weight +2^-1: floor(-3 / 2) = -2, i.e. -2 * 2^-16 (not -1).
  std::vector<float> p = {-1}, s = {1}, x = {-3.0f * std::ldexp(1.f, -16)};
  const ShiftKernelWeights kw = shift_kernel_prepare(p.data(), s.data(), 1, 1, kPmin, kPmax);
  float y = 0, yr = 0;
  shift_linear_forward_int_ref(&yr, x.data(), p.data(), s.data(), nullptr, 1, 1, 1, kPmin, kPmax);
  EXPECT_EQ(yr, -2.0f * std::ldexp(1.f, -16));
  for (ShiftIntIsa isa : available_isas()) {
    shift_linear_forward_int(&y, x.data(), kw, nullptr, 1, 1, 1, 16, isa);
    EXPECT_EQ(y, yr) << shift_int_isa_name(isa);
  }
  // Conversion rounds half to even: 2.5 * 2^-16 -> x_int = 2, 3.5 * 2^-16 -> 4.
  std::vector<float> p0 = {0, 0}, s0 = {1, 0}, x2 = {2.5f * std::ldexp(1.f, -16), 0.f, 3.5f * std::ldexp(1.f, -16), 0.f};
  float y2[2];
  shift_linear_forward_int_ref(y2, x2.data(), p0.data(), s0.data(), nullptr, 2, 2, 1, kPmin, kPmax);
  EXPECT_EQ(y2[0], 2.0f * std::ldexp(1.f, -16));
  EXPECT_EQ(y2[1], 4.0f * std::ldexp(1.f, -16));
}

// ---- packed storage ----

TEST(ShiftLinearPack, All31CodesRoundTrip) {
  int n = 0;
  std::vector<bool> seen(32, false);
  for (int sg : {-1, 0, 1})
    for (int e = kPmin; e <= kPmax; ++e) {
      if (sg == 0 && e != kPmin) continue;
      const uint8_t c = shift_code_encode(sg, e, kPmin, kPmax);
      ASSERT_LT(c, 32);
      EXPECT_FALSE(seen[c]) << "code " << int(c) << " used twice";
      seen[c] = true;
      int sg2, e2;
      shift_code_decode(c, kPmin, kPmax, &sg2, &e2);
      EXPECT_EQ(sg2, sg);
      EXPECT_EQ(e2, e);
      ++n;
    }
  EXPECT_EQ(n, 31);
  EXPECT_FALSE(seen[16]);
  int sg, e;
  EXPECT_THROW(shift_code_decode(16, kPmin, kPmax, &sg, &e), sav::Error);
  EXPECT_THROW(shift_code_decode(22, -6, -2, &sg, &e), sav::Error);  // exponent -7 < pmin
}

TEST(ShiftLinearPack, BitStreamLayoutAndTensorRoundTrip) {
  // Codes [1, 31] -> bits 00001 then 11111 -> bytes 0xE1, 0x03.
  {
    std::vector<float> p = {0.f, -14.f}, s = {1.f, -1.f};
    PackedShift ps = pack_shift(p.data(), s.data(), 1, 2, kPmin, kPmax);
    ASSERT_EQ(ps.codes.size(), 2u);
    EXPECT_EQ(ps.codes[0], 0xE1);
    EXPECT_EQ(ps.codes[1], 0x03);
  }
  for (auto [pmin, pmax] : {std::pair{-14, 0}, std::pair{-20, -6}, std::pair{-3, 2}}) {
    const int F = 7, K = 9;  // 63 codes = 315 bits -> 40 bytes
    std::vector<float> p, s;
    random_shift_params(p, s, F * K, 77 + pmin, pmin, pmax);
    PackedShift ps = pack_shift(p.data(), s.data(), F, K, pmin, pmax);
    EXPECT_EQ(ps.codes.size(), 40u);
    std::vector<float> p2(F * K), s2(F * K), W(F * K), W2(F * K);
    unpack_shift(p2.data(), s2.data(), ps);
    shift_linear_weights(W.data(), p.data(), s.data(), F, K, pmin, pmax);
    shift_linear_weights(W2.data(), p2.data(), s2.data(), F, K, pmin, pmax);
    EXPECT_TRUE(bit_equal(W, W2)) << "range [" << pmin << ", " << pmax << "]";
    for (int i = 0; i < F * K; ++i) {
      EXPECT_EQ(p2[i], std::floor(p2[i]));
      EXPECT_TRUE(p2[i] >= pmin && p2[i] <= pmax);
    }
    // Packing the unpacked values is the identity on the byte stream.
    PackedShift ps2 = pack_shift(p2.data(), s2.data(), F, K, pmin, pmax);
    EXPECT_EQ(ps.codes, ps2.codes);
  }
  std::vector<float> p(16, 0.f), s(16, 1.f);
  EXPECT_THROW(pack_shift(p.data(), s.data(), 4, 4, -15, 0), sav::Error);  // 16 exponents do not fit
  PackedShift bad = pack_shift(p.data(), s.data(), 4, 4, kPmin, kPmax);
  bad.codes.pop_back();
  EXPECT_THROW(unpack_shift(p.data(), s.data(), bad), sav::Error);
}

TEST(ShiftLinearPack, KernelFromPackedMatchesKernelFromParams) {
  const int M = 13, K = 37, F = 9;
  std::vector<float> p, s;
  random_shift_params(p, s, static_cast<size_t>(F) * K, 88);
  auto x = sav::test::normal(static_cast<size_t>(M) * K, 89);
  PackedShift ps = pack_shift(p.data(), s.data(), F, K, kPmin, kPmax);
  std::vector<float> y1(static_cast<size_t>(M) * F), y2(y1.size());
  shift_linear_forward_int(y1.data(), x.data(), shift_kernel_prepare(p.data(), s.data(), F, K, kPmin, kPmax), nullptr,
                           M, K, F);
  shift_linear_forward_int(y2.data(), x.data(), shift_kernel_prepare(ps), nullptr, M, K, F);
  EXPECT_TRUE(bit_equal(y1, y2));
}

}  // namespace
