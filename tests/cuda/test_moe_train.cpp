// The training kernels of shift and MoE linears (ops/cuda/moe_train.h) against their CPU specs
// (ops/cpu/shift_linear.h, ops/cpu/moe.h), on odd sizes. Outputs are poisoned (0xFF bytes = NaN, or -1 for
// int) before each launch; a poison left afterwards is an element never written. Every op is rerun and
// must give bit-identical results. Tolerances:
//   exact (bit-identical): shift_decode_f32 vs cpu::shift_linear_weights (ties, out-of-range and NaN p,
//     s near +-0.5 and NaN); shift_weight_backward_f32 vs the CPU's dp/ds loop for the same dW; the route's
//     logits, noisy and choice; combine; split_backward's dy0/dy1 and its dscale vs an in-order host float
//     sum; the hard Load counts; router_backward with coef = 0 vs the CPU chain moe_gate_backward ->
//     moe_router_backward (the same float expressions);
//   1e-6 absolute: the route's probs and scale vs moe_router_forward_ref (CUDA's expf is a few ulp from the
//     C library's exp, and the reference softmax is in double);
//   1e-6 relative: Importance, smooth Load and aux = coef * L of moe_lb_forward vs moe_lb_loss_forward_ref
//     (double sums in another order, CUDA's erfc);
//   1e-5 of max|ref|: shift_weight_backward_f32 vs cpu::shift_linear_backward (dW from a double product
//     here, an sgemm there); split_backward's dscale vs moe_scatter_backward_ref (double sums);
//     router_backward with the load-balancing terms (coef != 0) vs moe_gate_backward ->
//     moe_lb_loss_backward_ref -> moe_router_backward(_ref): the device takes Importance and Load from the
//     f32 stats of moe_lb_forward while the CPU recomputes them in double (~1e-7 relative in the lb terms).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/rng.h"
#include "cuda_test_util.h"
#include "ops/cpu/moe.h"
#include "ops/cpu/shift_linear.h"
#include "ops/cuda/moe_train.h"

using namespace sav;
using namespace sav::test;
using sav::cuda::DeviceBuffer;

namespace {

class CudaMoeTrain : public CudaTest {};

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Number of positions where a and b differ bitwise (sizes must match).
size_t bit_diffs(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return std::max(a.size(), b.size());
  size_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
  return n;
}

// max |a - ref| (NaN counts as a failure).
double max_abs_diff(const std::vector<float>& a, const std::vector<float>& ref) {
  if (a.size() != ref.size()) return INFINITY;
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - double(ref[i]));
    if (!(d <= m)) m = d;
  }
  return m;
}

// max |a - ref| / |ref| elementwise, with an absolute floor `abs_floor` on the denominator.
double max_rel_diff(const float* a, const float* ref, size_t n, double abs_floor = 1e-30) {
  double m = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double d = std::fabs(double(a[i]) - double(ref[i])) / std::max(abs_floor, std::fabs(double(ref[i])));
    if (!(d <= m)) m = d;
  }
  return m;
}

// Exponents p with half-integer ties, out-of-range and non-finite values mixed in.
std::vector<float> shift_p_values(size_t n, uint64_t seed, int pmin, int pmax) {
  std::vector<float> p = uniform(n, seed, float(pmin) - 3.0f, float(pmax) + 3.0f);
  const std::vector<float> special = {kNaN,
                                      kInf,
                                      -kInf,
                                      1e30f,
                                      -1e30f,
                                      float(pmin) - 0.5f,
                                      float(pmax) + 0.5f,
                                      float(pmin) + 0.5f,
                                      float(pmax) - 0.5f,
                                      std::nextafter(float(pmin) - 0.5f, 0.0f),
                                      std::nextafter(float(pmax) + 0.5f, 0.0f),
                                      -0.0f,
                                      0.5f,
                                      -0.5f,
                                      1.5f,
                                      -1.5f,
                                      2.5f,
                                      -2.5f,
                                      std::nextafter(0.5f, 1.0f),
                                      std::nextafter(-0.5f, -1.0f),
                                      float(pmin),
                                      float(pmax)};
  const int span = pmax - pmin + 4;  // ties k + 0.5 for k in [pmin - 2, pmax + 1]
  for (size_t i = 0; i < n; ++i) {
    if (i % 5 == 1) p[i] = float(pmin - 2 + int((i / 5) % span)) + 0.5f;
    if (i % 7 == 3) p[i] = special[(i / 7) % special.size()];
  }
  return p;
}

// Signs s around the +-0.5 thresholds, with non-finite values mixed in.
std::vector<float> shift_s_values(size_t n, uint64_t seed) {
  std::vector<float> s = uniform(n, seed, -1.5f, 1.5f);
  const std::vector<float> special = {0.5f,
                                      -0.5f,
                                      std::nextafter(0.5f, 1.0f),
                                      std::nextafter(-0.5f, -1.0f),
                                      std::nextafter(0.5f, 0.0f),
                                      std::nextafter(-0.5f, 0.0f),
                                      kNaN,
                                      kInf,
                                      -kInf,
                                      0.0f,
                                      -0.0f,
                                      1.5f,
                                      -1.5f,
                                      2.5f};
  for (size_t i = 0; i < n; ++i)
    if (i % 3 == 2) s[i] = special[(i / 3) % special.size()];
  return s;
}

// The router's inputs and the CPU's forward: logits = rl + br (cpu::moe_router_forward_ref with C = 2, x = rl,
// w = I, b = br, whose double sum of two floats rounds exactly as a float add), noise drawn as the CPU does.
struct RouterCase {
  int M = 0;
  float noise_std = 0.0f;
  std::vector<float> rl, br, noise;         // noise empty when noise_std == 0
  std::vector<float> logits, noisy, probs;  // CPU reference (M,2)
  std::vector<int> choice;                  // CPU reference (M)
};

RouterCase make_router_case(int M, float noise_std, uint64_t seed, float br0 = 0.4f, float br1 = -0.3f) {
  RouterCase rc;
  rc.M = M;
  rc.noise_std = noise_std;
  rc.rl = normal(size_t(M) * 2, seed);
  rc.br = {br0, br1};
  const std::vector<float> eye = {1.0f, 0.0f, 0.0f, 1.0f};
  rc.logits.resize(size_t(M) * 2);
  rc.noisy.resize(size_t(M) * 2);
  rc.probs.resize(size_t(M) * 2);
  rc.choice.resize(M);
  const uint64_t noise_seed = seed * 7919 + 17;
  Rng rng(noise_seed);
  cpu::moe_router_forward_ref(rc.logits.data(), rc.noisy.data(), rc.probs.data(), rc.choice.data(), rc.rl.data(),
                              eye.data(), rc.br.data(), M, 2, 2, noise_std, noise_std > 0.0f ? &rng : nullptr);
  if (noise_std > 0.0f) {  // the same draw as the CPU's add_noise: noise_std * N(0,1) in (t, e) order
    Rng r2(noise_seed);
    rc.noise.resize(size_t(M) * 2);
    for (auto& v : rc.noise) v = noise_std * r2.normal();
  }
  return rc;
}

// Preconditions of the exact comparisons: the CPU's logits are the float sums rl + br, its noisy values
// logits + noise.
void check_router_case(const RouterCase& rc) {
  size_t bad_logits = 0, bad_noisy = 0;
  for (int t = 0; t < rc.M; ++t)
    for (int e = 0; e < 2; ++e) {
      const size_t i = size_t(t) * 2 + e;
      const float l = rc.rl[i] + rc.br[e];
      bad_logits += std::memcmp(&l, &rc.logits[i], 4) != 0;
      const float z = rc.noise.empty() ? l : l + rc.noise[i];
      bad_noisy += std::memcmp(&z, &rc.noisy[i], 4) != 0;
    }
  ASSERT_EQ(bad_logits, 0u) << "test set-up: the CPU's logits are not rl + br";
  ASSERT_EQ(bad_noisy, 0u) << "test set-up: the CPU's noisy logits are not logits + noise";
}

}  // namespace

// ---- shift weights ----

TEST_F(CudaMoeTrain, ShiftDecodeIsBitExactWithShiftLinearWeights) {
  struct Case {
    int F, K, pmin, pmax;
  };
  for (const Case cs : {Case{45, 37, -14, 0}, Case{96, 301, -14, 0}, Case{1, 1, -14, 0}, Case{13, 7, -8, 3},
                        Case{33, 65, -100, 100}, Case{7, 9, 5, 5}, Case{301, 45, -14, 0}}) {
    SCOPED_TRACE(dims({{"F", cs.F}, {"K", cs.K}, {"pmin", cs.pmin}, {"pmax", cs.pmax}}));
    const int64_t n = int64_t(cs.F) * cs.K;
    const std::vector<float> p = shift_p_values(n, 1 + cs.F, cs.pmin, cs.pmax), s = shift_s_values(n, 2 + cs.K);
    std::vector<float> ref(n);
    cpu::shift_linear_weights(ref.data(), p.data(), s.data(), cs.F, cs.K, cs.pmin, cs.pmax);
    auto dp = upload(p), ds = upload(s);
    auto dW = poisoned(n);
    cuda::shift_decode_f32(dW.get(), dp.get(), ds.get(), n, cs.pmin, cs.pmax, nullptr);
    device_sync();
    const std::vector<float> W = dW.download();
    EXPECT_EQ(count_nonfinite(W), 0u);
    EXPECT_EQ(bit_diffs(W, ref), 0u);
    cuda::shift_decode_f32(dW.get(), dp.get(), ds.get(), n, cs.pmin, cs.pmax, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dW.download(), W));
  }
  DeviceBuffer<float> a(16);
  EXPECT_NO_THROW(cuda::shift_decode_f32(nullptr, nullptr, nullptr, 0, -14, 0, nullptr));
  EXPECT_THROW(cuda::shift_decode_f32(a.get(), a.get(), a.get(), 4, 0, -14, nullptr), sav::Error);   // pmin > pmax
  EXPECT_THROW(cuda::shift_decode_f32(a.get(), a.get(), a.get(), 4, -101, 0, nullptr), sav::Error);  // range
  EXPECT_THROW(cuda::shift_decode_f32(a.get(), a.get(), a.get(), -1, -14, 0, nullptr), sav::Error);
  EXPECT_THROW(cuda::shift_decode_f32(nullptr, a.get(), a.get(), 4, -14, 0, nullptr), sav::Error);
  EXPECT_THROW(cuda::shift_decode_f32(a.get(), a.get(), nullptr, 4, -14, 0, nullptr), sav::Error);
}

TEST_F(CudaMoeTrain, ShiftWeightBackwardIsBitExactWithTheCpuLoop) {
  struct Case {
    int F, K, pmin, pmax;
  };
  const float ln2 = static_cast<float>(0.69314718055994530942);  // as ops/cpu/shift_linear.cpp
  for (const Case cs :
       {Case{45, 37, -14, 0}, Case{96, 301, -14, 0}, Case{1, 1, -14, 0}, Case{13, 7, -8, 3}, Case{33, 65, -100, 100}}) {
    SCOPED_TRACE(dims({{"F", cs.F}, {"K", cs.K}, {"pmin", cs.pmin}, {"pmax", cs.pmax}}));
    const int64_t n = int64_t(cs.F) * cs.K;
    const std::vector<float> p = shift_p_values(n, 3 + cs.F, cs.pmin, cs.pmax), s = shift_s_values(n, 4 + cs.K);
    const std::vector<float> dW = normal(n, 5 + n, 0.7f), dp0 = normal(n, 6 + n), ds0 = normal(n, 7 + n);
    // 2^p_r from the CPU's decode with s = 1, the rounded sign from its decode with the real s
    std::vector<float> pw(n), Ws(n);
    const std::vector<float> ones(n, 1.0f);
    cpu::shift_linear_weights(pw.data(), p.data(), ones.data(), cs.F, cs.K, cs.pmin, cs.pmax);
    cpu::shift_linear_weights(Ws.data(), p.data(), s.data(), cs.F, cs.K, cs.pmin, cs.pmax);
    std::vector<float> dp_ref = dp0, ds_ref = ds0;
    for (int64_t i = 0; i < n; ++i) {  // the loop of cpu::shift_linear_backward
      const int sg = Ws[i] > 0.0f ? 1 : (Ws[i] < 0.0f ? -1 : 0);
      dp_ref[i] += dW[i] * (static_cast<float>(sg) * pw[i] * ln2);
      ds_ref[i] += dW[i] * pw[i];
    }
    auto d_p = upload(p), d_s = upload(s), d_dW = upload(dW);
    for (int which = 0; which < 3; ++which) {  // both, dp only, ds only
      SCOPED_TRACE(which == 0 ? "dp and ds" : (which == 1 ? "dp only" : "ds only"));
      auto d_dp = upload(dp0), d_ds = upload(ds0);
      float* pdp = which != 2 ? d_dp.get() : nullptr;
      float* pds = which != 1 ? d_ds.get() : nullptr;
      cuda::shift_weight_backward_f32(pdp, pds, d_dW.get(), d_p.get(), d_s.get(), n, cs.pmin, cs.pmax, nullptr);
      device_sync();
      const std::vector<float> gdp = d_dp.download(), gds = d_ds.download();
      EXPECT_EQ(bit_diffs(gdp, which != 2 ? dp_ref : dp0), 0u);
      EXPECT_EQ(bit_diffs(gds, which != 1 ? ds_ref : ds0), 0u);
    }
  }
  DeviceBuffer<float> a(16);
  EXPECT_NO_THROW(cuda::shift_weight_backward_f32(nullptr, nullptr, nullptr, nullptr, nullptr, 0, -14, 0, nullptr));
  EXPECT_NO_THROW(cuda::shift_weight_backward_f32(nullptr, nullptr, nullptr, nullptr, nullptr, 4, -14, 0, nullptr));
  EXPECT_THROW(cuda::shift_weight_backward_f32(a.get(), a.get(), a.get(), a.get(), a.get(), 4, 1, 0, nullptr),
               sav::Error);
  EXPECT_THROW(cuda::shift_weight_backward_f32(a.get(), a.get(), a.get(), a.get(), a.get(), -4, -14, 0, nullptr),
               sav::Error);
  EXPECT_THROW(cuda::shift_weight_backward_f32(a.get(), a.get(), nullptr, a.get(), a.get(), 4, -14, 0, nullptr),
               sav::Error);
  EXPECT_THROW(cuda::shift_weight_backward_f32(a.get(), nullptr, a.get(), a.get(), nullptr, 4, -14, 0, nullptr),
               sav::Error);  // dp needs s
}

TEST_F(CudaMoeTrain, ShiftWeightBackwardMatchesShiftLinearBackward) {
  // dW = dy^T x on the host (double, rounded once); the CPU op forms it with an sgemm.
  const int M = 37, K = 45, F = 33, pmin = -14, pmax = 0;
  const int64_t n = int64_t(F) * K;
  const std::vector<float> p = uniform(n, 11, -15.0f, 1.0f), s = uniform(n, 12, -1.5f, 1.5f);
  const std::vector<float> dy = normal(size_t(M) * F, 13), x = normal(size_t(M) * K, 14);
  std::vector<float> dW(n);
  for (int j = 0; j < F; ++j)
    for (int k = 0; k < K; ++k) {
      double acc = 0.0;
      for (int i = 0; i < M; ++i) acc += double(dy[size_t(i) * F + j]) * x[size_t(i) * K + k];
      dW[size_t(j) * K + k] = float(acc);
    }
  std::vector<float> dp_ref(n, 0.0f), ds_ref(n, 0.0f);
  cpu::shift_linear_backward(nullptr, dp_ref.data(), ds_ref.data(), nullptr, dy.data(), x.data(), p.data(), s.data(), M,
                             K, F, pmin, pmax);
  auto d_p = upload(p), d_s = upload(s), d_dW = upload(dW);
  auto d_dp = upload(std::vector<float>(n, 0.0f)), d_ds = upload(std::vector<float>(n, 0.0f));
  cuda::shift_weight_backward_f32(d_dp.get(), d_ds.get(), d_dW.get(), d_p.get(), d_s.get(), n, pmin, pmax, nullptr);
  device_sync();
  EXPECT_LT(norm_err(d_dp.download(), dp_ref), 1e-5);
  EXPECT_LT(norm_err(d_ds.download(), ds_ref), 1e-5);
}

// ---- routing ----

TEST_F(CudaMoeTrain, RouteMatchesCpuRouterAndGate) {
  struct Case {
    int M;
    float noise_std;
  };
  for (const Case cs :
       {Case{1, 0.0f}, Case{37, 0.0f}, Case{37, 0.5f}, Case{301, 0.5f}, Case{1000, 0.0f}, Case{1000, 0.5f}}) {
    for (const cpu::MoeGateMode gate : {cpu::moe_gate_prob, cpu::moe_gate_straight_through}) {
      SCOPED_TRACE(dims({{"M", cs.M}, {"noise_std*10", int64_t(cs.noise_std * 10)}, {"gate", int(gate)}}));
      const int M = cs.M;
      const RouterCase rc = make_router_case(M, cs.noise_std, 20 + M);
      ASSERT_NO_FATAL_FAILURE(check_router_case(rc));
      std::vector<float> scale_ref(M);
      cpu::moe_gate_forward(scale_ref.data(), rc.probs.data(), rc.choice.data(), M, 2, gate);

      auto d_rl = upload(rc.rl), d_br = upload(rc.br);
      DeviceBuffer<float> d_noise;
      if (!rc.noise.empty()) d_noise = upload(rc.noise);
      auto d_logits = poisoned(size_t(M) * 2), d_noisy = poisoned(size_t(M) * 2), d_probs = poisoned(size_t(M) * 2);
      auto d_scale = poisoned(M);
      auto d_choice = poisoned<int>(M);
      auto run = [&] {
        cuda::moe_train_route(d_logits.get(), d_noisy.get(), d_probs.get(), d_choice.get(), d_scale.get(), d_rl.get(),
                              d_br.get(), rc.noise.empty() ? nullptr : d_noise.get(), M, gate, nullptr);
        device_sync();
      };
      run();
      const std::vector<float> logits = d_logits.download(), noisy = d_noisy.download(), probs = d_probs.download(),
                               scale = d_scale.download();
      const std::vector<int> choice = d_choice.download();
      EXPECT_EQ(bit_diffs(logits, rc.logits), 0u);
      EXPECT_EQ(bit_diffs(noisy, rc.noisy), 0u);
      EXPECT_EQ(choice, rc.choice);
      EXPECT_EQ(count_nonfinite(probs), 0u);
      EXPECT_LT(max_abs_diff(probs, rc.probs), 1e-6);
      EXPECT_LT(max_abs_diff(scale, scale_ref), 1e-6);
      size_t scale_bad = 0;
      for (int t = 0; t < M; ++t) {
        const float want = gate == cpu::moe_gate_prob ? probs[size_t(t) * 2 + (choice[t] != 0)] : 1.0f;
        scale_bad += std::memcmp(&want, &scale[t], 4) != 0;
      }
      EXPECT_EQ(scale_bad, 0u) << "scale is not the chosen probability (prob gate) or 1 (straight-through)";
      run();
      EXPECT_TRUE(bit_identical(d_logits.download(), logits));
      EXPECT_TRUE(bit_identical(d_noisy.download(), noisy));
      EXPECT_TRUE(bit_identical(d_probs.download(), probs));
      EXPECT_TRUE(bit_identical(d_scale.download(), scale));
      EXPECT_EQ(d_choice.download(), choice);
    }
  }
}

TEST_F(CudaMoeTrain, RouteTiesGoToExpertZero) {
  const int M = 5;
  const std::vector<float> rl = {0.25f, 0.25f, -1.0f, -1.0f, 0.0f, 0.0f, 2.0f, 2.0f, 0.5f, 0.75f};
  const std::vector<float> br = {0.125f, 0.125f};
  auto d_rl = upload(rl), d_br = upload(br);
  auto d_logits = poisoned(10), d_noisy = poisoned(10), d_probs = poisoned(10), d_scale = poisoned(M);
  auto d_choice = poisoned<int>(M);
  cuda::moe_train_route(d_logits.get(), d_noisy.get(), d_probs.get(), d_choice.get(), d_scale.get(), d_rl.get(),
                        d_br.get(), nullptr, M, cpu::moe_gate_prob, nullptr);
  device_sync();
  EXPECT_EQ(d_choice.download(), (std::vector<int>{0, 0, 0, 0, 1}));
  const std::vector<float> probs = d_probs.download();
  for (int t = 0; t < 4; ++t) {
    EXPECT_EQ(probs[2 * t], 0.5f);
    EXPECT_EQ(probs[2 * t + 1], 0.5f);
  }
  DeviceBuffer<float> a(16);
  DeviceBuffer<int> c(16);
  EXPECT_NO_THROW(cuda::moe_train_route(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0,
                                        cpu::moe_gate_prob, nullptr));
  EXPECT_THROW(cuda::moe_train_route(a.get(), a.get(), a.get(), c.get(), a.get(), a.get(), a.get(), nullptr, -1,
                                     cpu::moe_gate_prob, nullptr),
               sav::Error);
  EXPECT_THROW(cuda::moe_train_route(a.get(), a.get(), a.get(), c.get(), a.get(), a.get(), a.get(), nullptr, 4,
                                     static_cast<cpu::MoeGateMode>(7), nullptr),
               sav::Error);
  EXPECT_THROW(cuda::moe_train_route(a.get(), a.get(), a.get(), c.get(), a.get(), a.get(), nullptr, nullptr, 4,
                                     cpu::moe_gate_prob, nullptr),
               sav::Error);
}

TEST_F(CudaMoeTrain, CombineScalesTheChosenExpert) {
  struct Case {
    int M, F, pad;
  };
  for (const Case cs : {Case{37, 45, 3}, Case{301, 96, 0}, Case{1, 1, 0}, Case{9, 33, 7}}) {
    for (const bool accumulate : {false, true}) {
      SCOPED_TRACE(dims({{"M", cs.M}, {"F", cs.F}, {"pad", cs.pad}, {"accumulate", accumulate}}));
      const int M = cs.M, F = cs.F, ldy = F + cs.pad;
      const std::vector<float> y0 = normal(size_t(M) * F, 31 + M), y1 = normal(size_t(M) * F, 32 + F);
      const std::vector<float> scale = uniform(M, 33, 0.5f, 1.0f);
      std::vector<int> choice(M);
      Rng rng(34 + M);
      for (auto& c : choice) c = int(rng.below(2));
      const std::vector<float> y_init = normal(size_t(M) * ldy, 35);
      std::vector<float> ref = y_init;
      for (int t = 0; t < M; ++t)
        for (int j = 0; j < F; ++j) {
          const float v = scale[t] * (choice[t] ? y1 : y0)[size_t(t) * F + j];
          ref[size_t(t) * ldy + j] = accumulate ? ref[size_t(t) * ldy + j] + v : v;
        }
      auto d_y0 = upload(y0), d_y1 = upload(y1), d_scale = upload(scale);
      auto d_choice = upload(choice);
      DeviceBuffer<float> d_y = upload(y_init);
      if (!accumulate) d_y.fill_bytes(0xFF);
      cuda::moe_train_combine(d_y.get(), ldy, d_y0.get(), d_y1.get(), d_choice.get(), d_scale.get(), M, F, accumulate,
                              nullptr);
      device_sync();
      const std::vector<float> y = d_y.download();
      size_t bad = 0, gap_touched = 0;
      for (int t = 0; t < M; ++t) {
        for (int j = 0; j < F; ++j) bad += std::memcmp(&y[size_t(t) * ldy + j], &ref[size_t(t) * ldy + j], 4) != 0;
        for (int j = F; j < ldy; ++j)
          gap_touched += accumulate ? std::memcmp(&y[size_t(t) * ldy + j], &y_init[size_t(t) * ldy + j], 4) != 0
                                    : std::isfinite(y[size_t(t) * ldy + j]);
      }
      EXPECT_EQ(bad, 0u);
      EXPECT_EQ(gap_touched, 0u) << "wrote outside the rows";
      if (!accumulate) {  // rerun: bit-identical
        cuda::moe_train_combine(d_y.get(), ldy, d_y0.get(), d_y1.get(), d_choice.get(), d_scale.get(), M, F, false,
                                nullptr);
        device_sync();
        EXPECT_TRUE(bit_identical(d_y.download(), y));
      }
    }
  }
  DeviceBuffer<float> a(64);
  DeviceBuffer<int> c(8);
  EXPECT_NO_THROW(cuda::moe_train_combine(nullptr, 4, nullptr, nullptr, nullptr, nullptr, 0, 4, false, nullptr));
  EXPECT_THROW(cuda::moe_train_combine(a.get(), 3, a.get(), a.get(), c.get(), a.get(), 2, 4, false, nullptr),
               sav::Error);  // ldy < F
  EXPECT_THROW(cuda::moe_train_combine(a.get(), 4, a.get(), a.get(), c.get(), a.get(), 2, 0, false, nullptr),
               sav::Error);
  EXPECT_THROW(cuda::moe_train_combine(a.get(), 4, a.get(), a.get(), nullptr, a.get(), 2, 4, false, nullptr),
               sav::Error);
}

// ---- load-balancing loss ----

TEST_F(CudaMoeTrain, LbForwardMatchesCpuLoss) {
  const float coef = cpu::moe_lb_default_coef;
  for (const int M : {1, 37, 301, 1024, 1025, 2500}) {
    for (const float noise_std : {0.5f, 0.0f}) {
      const RouterCase rc = make_router_case(M, noise_std, 40 + M);
      ASSERT_NO_FATAL_FAILURE(check_router_case(rc));
      for (const auto& alpha : {std::vector<float>{1.0f, 1.0f}, std::vector<float>{1.3f, 0.7f}}) {
        SCOPED_TRACE(
            dims({{"M", M}, {"noise_std*10", int64_t(noise_std * 10)}, {"alpha0*10", int64_t(alpha[0] * 10)}}));
        std::vector<float> imp(2), load(2);
        const float L = cpu::moe_lb_loss_forward_ref(imp.data(), load.data(), rc.probs.data(), rc.logits.data(),
                                                     rc.noisy.data(), rc.choice.data(), alpha.data(), M, 2, noise_std);
        const float aux_ref = coef * L;  // LinearLayer: opt.lb_coef * moe_lb_loss_forward(...)

        auto d_probs = upload(rc.probs), d_logits = upload(rc.logits), d_noisy = upload(rc.noisy);
        auto d_choice = upload(rc.choice);
        auto d_stats = poisoned(4), d_aux = poisoned(1);
        const size_t nws = cuda::moe_lb_workspace_doubles(M);
        ASSERT_GE(nws, size_t(4));
        DeviceBuffer<double> d_ws(nws);
        d_ws.fill_bytes(0xFF);
        auto run = [&] {
          cuda::moe_lb_forward(d_stats.get(), d_aux.get(), d_probs.get(), d_logits.get(), d_noisy.get(), d_choice.get(),
                               alpha[0], alpha[1], M, noise_std, coef, d_ws.get(), nullptr);
          device_sync();
        };
        run();
        const std::vector<float> stats = d_stats.download(), aux = d_aux.download();
        EXPECT_EQ(count_nonfinite(stats), 0u);
        EXPECT_LT(max_rel_diff(stats.data(), imp.data(), 2), 1e-6) << "Importance";
        if (noise_std > 0.0f) {
          EXPECT_LT(max_rel_diff(stats.data() + 2, load.data(), 2, 1e-6), 1e-6) << "smooth Load";
        } else {
          EXPECT_EQ(stats[2], load[0]) << "hard Load (counts)";
          EXPECT_EQ(stats[3], load[1]) << "hard Load (counts)";
        }
        EXPECT_TRUE(std::isfinite(aux[0]));
        EXPECT_LE(std::fabs(double(aux[0]) - aux_ref), 1e-6 * std::fabs(double(aux_ref)) + 1e-12)
            << "aux " << aux[0] << " vs " << aux_ref;
        run();
        EXPECT_TRUE(bit_identical(d_stats.download(), stats));
        EXPECT_TRUE(bit_identical(d_aux.download(), aux));
      }
    }
  }
}

TEST_F(CudaMoeTrain, LbForwardEmptyAndBadSizes) {
  auto d_stats = poisoned(4), d_aux = poisoned(1);
  EXPECT_EQ(cuda::moe_lb_workspace_doubles(0), 0u);
  cuda::moe_lb_forward(d_stats.get(), d_aux.get(), nullptr, nullptr, nullptr, nullptr, 1.0f, 1.0f, 0, 0.5f, 0.01f,
                       nullptr, nullptr);
  device_sync();
  EXPECT_EQ(d_stats.download(), std::vector<float>(4, 0.0f));  // the CPU's values for no tokens
  EXPECT_EQ(d_aux.download(), std::vector<float>(1, 0.0f));
  EXPECT_NO_THROW(cuda::moe_lb_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1.0f, 1.0f, 0, 0.5f, 0.01f,
                                       nullptr, nullptr));
  DeviceBuffer<float> a(64);
  DeviceBuffer<int> c(32);
  DeviceBuffer<double> ws(cuda::moe_lb_workspace_doubles(32));
  EXPECT_THROW(cuda::moe_lb_forward(a.get(), a.get(), a.get(), a.get(), a.get(), c.get(), 1.0f, 1.0f, -1, 0.5f, 0.01f,
                                    ws.get(), nullptr),
               sav::Error);
  EXPECT_THROW(cuda::moe_lb_forward(a.get(), a.get(), a.get(), a.get(), a.get(), c.get(), 1.0f, 1.0f, 32, kNaN, 0.01f,
                                    ws.get(), nullptr),
               sav::Error);
  EXPECT_THROW(cuda::moe_lb_forward(a.get(), a.get(), a.get(), nullptr, a.get(), c.get(), 1.0f, 1.0f, 32, 0.5f, 0.01f,
                                    ws.get(), nullptr),
               sav::Error);  // smooth load needs the logits
  EXPECT_THROW(cuda::moe_lb_forward(a.get(), a.get(), a.get(), a.get(), a.get(), nullptr, 1.0f, 1.0f, 32, 0.0f, 0.01f,
                                    ws.get(), nullptr),
               sav::Error);  // hard load needs the choices
  EXPECT_THROW(cuda::moe_lb_forward(a.get(), a.get(), a.get(), a.get(), a.get(), c.get(), 1.0f, 1.0f, 32, 0.5f, 0.01f,
                                    nullptr, nullptr),
               sav::Error);  // no work space
}

// ---- backward ----

TEST_F(CudaMoeTrain, SplitBackwardMatchesScatterBackward) {
  struct Case {
    int M, F, pad;
  };
  for (const Case cs : {Case{37, 45, 5}, Case{301, 96, 0}, Case{1, 1, 0}, Case{13, 33, 2}, Case{8, 64, 1}}) {
    SCOPED_TRACE(dims({{"M", cs.M}, {"F", cs.F}, {"pad", cs.pad}}));
    const int M = cs.M, F = cs.F, lddy = F + cs.pad;
    const std::vector<float> dy = normal(size_t(M) * lddy, 51 + M), y0 = normal(size_t(M) * F, 52 + F),
                             y1 = normal(size_t(M) * F, 53 + F);
    const std::vector<float> scale = uniform(M, 54, 0.5f, 1.0f);
    std::vector<int> choice(M);
    Rng rng(55 + M);
    for (auto& c : choice) c = int(rng.below(2));
    if (M > 1) choice[0] = 0, choice[1] = 1;

    // CPU: route, gather each expert's outputs, scatter backward into zeroed buffers (moe.h's recipe)
    std::vector<float> dyc(size_t(M) * F);
    for (int t = 0; t < M; ++t)
      for (int j = 0; j < F; ++j) dyc[size_t(t) * F + j] = dy[size_t(t) * lddy + j];
    std::vector<int> counts(2), offsets(3), idx(M);
    cpu::moe_route_ref(counts.data(), offsets.data(), idx.data(), choice.data(), M, 2);
    std::vector<float> dy_ref[2] = {std::vector<float>(size_t(M) * F, 0.0f), std::vector<float>(size_t(M) * F, 0.0f)};
    std::vector<float> dscale_ref(M, 0.0f);
    for (int e = 0; e < 2; ++e) {
      const int n = counts[e];
      if (n == 0) continue;
      const int* ie = idx.data() + offsets[e];
      std::vector<float> yg(size_t(n) * F), dyg(size_t(n) * F, 0.0f);
      cpu::moe_gather_ref(yg.data(), (e ? y1 : y0).data(), ie, n, F);
      cpu::moe_scatter_backward_ref(dyg.data(), dscale_ref.data(), dyc.data(), yg.data(), ie, scale.data(), n, F);
      for (int r = 0; r < n; ++r)
        for (int j = 0; j < F; ++j) dy_ref[e][size_t(ie[r]) * F + j] = dyg[size_t(r) * F + j];
    }
    // dscale as the header states it: a float sum over j in order
    std::vector<float> dscale_seq(M);
    for (int t = 0; t < M; ++t) {
      const float* yc = (choice[t] ? y1 : y0).data() + size_t(t) * F;
      float acc = 0.0f;
      for (int j = 0; j < F; ++j) acc += dy[size_t(t) * lddy + j] * yc[j];
      dscale_seq[t] = acc;
    }

    auto d_dy = upload(dy), d_y0 = upload(y0), d_y1 = upload(y1), d_scale = upload(scale);
    auto d_choice = upload(choice);
    auto d_dy0 = poisoned(size_t(M) * F), d_dy1 = poisoned(size_t(M) * F), d_dscale = poisoned(M);
    auto run = [&] {
      cuda::moe_train_split_backward(d_dy0.get(), d_dy1.get(), d_dscale.get(), d_dy.get(), lddy, d_y0.get(), d_y1.get(),
                                     d_choice.get(), d_scale.get(), M, F, nullptr);
      device_sync();
    };
    run();
    const std::vector<float> g0 = d_dy0.download(), g1 = d_dy1.download(), gds = d_dscale.download();
    EXPECT_EQ(count_nonfinite(g0) + count_nonfinite(g1) + count_nonfinite(gds), 0u);
    EXPECT_EQ(bit_diffs(g0, dy_ref[0]), 0u);
    EXPECT_EQ(bit_diffs(g1, dy_ref[1]), 0u);
    EXPECT_EQ(bit_diffs(gds, dscale_seq), 0u) << "dscale is not the in-order float sum";
    EXPECT_LT(norm_err(gds, dscale_ref), 1e-5);
    run();
    EXPECT_TRUE(bit_identical(d_dy0.download(), g0));
    EXPECT_TRUE(bit_identical(d_dy1.download(), g1));
    EXPECT_TRUE(bit_identical(d_dscale.download(), gds));
  }
  DeviceBuffer<float> a(64);
  DeviceBuffer<int> c(8);
  EXPECT_NO_THROW(cuda::moe_train_split_backward(nullptr, nullptr, nullptr, nullptr, 4, nullptr, nullptr, nullptr,
                                                 nullptr, 0, 4, nullptr));
  EXPECT_THROW(cuda::moe_train_split_backward(a.get(), a.get(), a.get(), a.get(), 3, a.get(), a.get(), c.get(), a.get(),
                                              2, 4, nullptr),
               sav::Error);  // lddy < F
  EXPECT_THROW(cuda::moe_train_split_backward(a.get(), a.get(), a.get(), a.get(), 4, a.get(), a.get(), c.get(), a.get(),
                                              -2, 4, nullptr),
               sav::Error);
  EXPECT_THROW(cuda::moe_train_split_backward(a.get(), nullptr, a.get(), a.get(), 4, a.get(), a.get(), c.get(), a.get(),
                                              2, 4, nullptr),
               sav::Error);
}

TEST_F(CudaMoeTrain, RouterBackwardMatchesCpuChain) {
  struct Case {
    int M;
    float noise_std, coef, alpha0, alpha1;
    bool zero_dscale;  // only the load-balancing terms
  };
  const std::vector<Case> cases = {
      Case{37, 0.5f, 0.0f, 1.0f, 1.0f, false},   Case{301, 0.0f, 0.0f, 1.0f, 1.0f, false},
      Case{37, 0.5f, 10.0f, 1.0f, 1.0f, false},  Case{37, 0.5f, 10.0f, 1.3f, 0.7f, false},
      Case{301, 0.5f, 10.0f, 1.3f, 0.7f, false}, Case{301, 0.0f, 10.0f, 1.3f, 0.7f, false},
      Case{37, 0.0f, 10.0f, 1.0f, 1.0f, false},  Case{37, 0.5f, 10.0f, 1.3f, 0.7f, true},
      Case{301, 0.5f, 10.0f, 1.0f, 1.0f, true},  Case{301, 0.0f, 10.0f, 1.3f, 0.7f, true},
      Case{1, 0.5f, 10.0f, 1.3f, 0.7f, false},   Case{1000, 0.5f, 0.01f, 1.3f, 0.7f, false}};
  for (const Case& cs : cases) {
    for (const cpu::MoeGateMode gate : {cpu::moe_gate_prob, cpu::moe_gate_straight_through}) {
      SCOPED_TRACE(dims({{"M", cs.M},
                         {"noise_std*10", int64_t(cs.noise_std * 10)},
                         {"coef*100", int64_t(cs.coef * 100)},
                         {"alpha0*10", int64_t(cs.alpha0 * 10)},
                         {"zero_dscale", cs.zero_dscale},
                         {"gate", int(gate)}}));
      const int M = cs.M;
      const RouterCase rc = make_router_case(M, cs.noise_std, 60 + M);
      ASSERT_NO_FATAL_FAILURE(check_router_case(rc));
      const std::vector<float> alpha = {cs.alpha0, cs.alpha1};
      const std::vector<float> dscale = cs.zero_dscale ? std::vector<float>(M, 0.0f) : normal(M, 61 + M);
      const bool lb = cs.coef != 0.0f;
      // the stats moe_lb_forward saves: Importance and Load in f32
      std::vector<float> imp(2), load(2);
      cpu::moe_lb_loss_forward_ref(imp.data(), load.data(), rc.probs.data(), rc.logits.data(), rc.noisy.data(),
                                   rc.choice.data(), alpha.data(), M, 2, cs.noise_std);
      const std::vector<float> stats = {imp[0], imp[1], load[0], load[1]};

      // CPU chain, as LinearLayer::backward (with the lb loss's plain-loop version)
      std::vector<float> dprobs(size_t(M) * 2, 0.0f), dl_lb(size_t(M) * 2, 0.0f);
      cpu::moe_gate_backward(dprobs.data(), dscale.data(), rc.probs.data(), rc.choice.data(), M, 2, gate);
      if (lb)
        cpu::moe_lb_loss_backward_ref(dprobs.data(), dl_lb.data(), rc.probs.data(), rc.logits.data(), rc.noisy.data(),
                                      rc.choice.data(), alpha.data(), M, 2, cs.noise_std, cs.coef);
      std::vector<float> ref = dl_lb, ref_d = dl_lb;
      cpu::moe_router_backward(nullptr, nullptr, nullptr, ref.data(), dprobs.data(), rc.probs.data(), nullptr, nullptr,
                               M, 1, 2);  // float softmax backward
      cpu::moe_router_backward_ref(nullptr, nullptr, nullptr, ref_d.data(), dprobs.data(), rc.probs.data(), nullptr,
                                   nullptr, M, 1, 2);  // double softmax backward

      auto d_probs = upload(rc.probs), d_logits = upload(rc.logits), d_noisy = upload(rc.noisy);
      auto d_choice = upload(rc.choice);
      auto d_dscale = upload(dscale), d_stats = upload(stats);
      auto d_dl = poisoned(size_t(M) * 2);
      // coef = 0: nothing of the load-balancing loss is needed (stats and logits may be absent)
      const float* p_stats = lb ? d_stats.get() : nullptr;
      const float* p_logits = lb ? d_logits.get() : nullptr;
      const float* p_noisy = lb ? d_noisy.get() : nullptr;
      auto run = [&] {
        cuda::moe_train_router_backward(d_dl.get(), d_dscale.get(), d_probs.get(), p_logits, p_noisy, d_choice.get(),
                                        p_stats, cs.alpha0, cs.alpha1, M, cs.noise_std, cs.coef, gate, nullptr);
        device_sync();
      };
      run();
      const std::vector<float> dl = d_dl.download();
      EXPECT_EQ(count_nonfinite(dl), 0u);
      if (!lb) {
        EXPECT_EQ(bit_diffs(dl, ref), 0u) << "coef = 0: the same float expressions as the CPU";
      } else {
        EXPECT_LT(norm_err(dl, ref), 1e-5);
      }
      EXPECT_LT(norm_err(dl, ref_d), 1e-5);
      run();
      EXPECT_TRUE(bit_identical(d_dl.download(), dl));
    }
  }
  DeviceBuffer<float> a(64);
  DeviceBuffer<int> c(8);
  EXPECT_NO_THROW(cuda::moe_train_router_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1.0f,
                                                  1.0f, 0, 0.5f, 0.01f, cpu::moe_gate_prob, nullptr));
  EXPECT_THROW(cuda::moe_train_router_backward(a.get(), a.get(), a.get(), a.get(), a.get(), c.get(), a.get(), 1.0f,
                                               1.0f, -1, 0.5f, 0.01f, cpu::moe_gate_prob, nullptr),
               sav::Error);
  EXPECT_THROW(cuda::moe_train_router_backward(a.get(), a.get(), a.get(), a.get(), a.get(), c.get(), a.get(), 1.0f,
                                               1.0f, 4, 0.5f, 0.01f, static_cast<cpu::MoeGateMode>(5), nullptr),
               sav::Error);
  EXPECT_THROW(cuda::moe_train_router_backward(a.get(), a.get(), a.get(), a.get(), a.get(), c.get(), nullptr, 1.0f,
                                               1.0f, 4, 0.5f, 0.01f, cpu::moe_gate_prob, nullptr),
               sav::Error);  // lb terms need stats
  EXPECT_THROW(cuda::moe_train_router_backward(a.get(), a.get(), a.get(), nullptr, a.get(), c.get(), a.get(), 1.0f,
                                               1.0f, 4, 0.5f, 0.01f, cpu::moe_gate_prob, nullptr),
               sav::Error);  // the smooth load term needs the logits
  EXPECT_THROW(cuda::moe_train_router_backward(a.get(), nullptr, a.get(), a.get(), a.get(), c.get(), a.get(), 1.0f,
                                               1.0f, 4, 0.5f, 0.01f, cpu::moe_gate_prob, nullptr),
               sav::Error);
}
