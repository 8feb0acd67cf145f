// shiftaddvit: tests of the dense CPU ops (src/ops/cpu/ops.h).
//
// For every op: the fast path against the reference on odd shapes (normalised error max|a-b|/max|ref|,
// tolerance stated per check), central finite differences of every gradient of both the reference and
// the fast backward (loss L = sum(out * R) with a fixed random R), backward accumulation (two calls give
// twice the gradient) and nullptr gradients being skipped.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/error.h"
#include "op_harness.h"
#include "ops/cpu/ops.h"
#include "ops/cpu/simd_math.h"

namespace {

using namespace sav;
using std::vector;
namespace t = sav::test;

using Loss = std::function<double()>;

// One gradient to check: the tensor perturbed and the analytic gradient of the loss with respect to it.
struct Grad {
  const char* name;
  vector<float>* x;
  const vector<float>* g;
};

void expect_fd(const std::string& what, std::initializer_list<Grad> grads, const Loss& loss, double tol,
               float h = 1e-3f) {
  for (const Grad& gr : grads) {
    const t::FdResult r = t::fd_check(gr.x->data(), gr.x->size(), gr.g->data(), loss, h);
    EXPECT_LT(r.err, tol) << what << ": d" << gr.name << " " << r;
  }
}

vector<float> zeros(size_t n) { return vector<float>(n, 0.0f); }

vector<float> twice(const vector<float>& a) {
  vector<float> r(a);
  for (auto& v : r) v *= 2.0f;
  return r;
}

std::string mode(bool fast) { return fast ? "fast" : "ref"; }

// =====================================================================================================
// linear

struct LinearShape {
  int M, K, F;
};
const LinearShape kLinearShapes[] = {{1, 1, 1}, {3, 7, 5}, {13, 37, 11}, {37, 13, 64}, {197, 192, 67}};

TEST(OpsLinear, FastMatchesRef) {
  for (const auto& s : kLinearShapes)
    for (bool bias : {true, false}) {
      SCOPED_TRACE("M=" + std::to_string(s.M) + " K=" + std::to_string(s.K) + " F=" + std::to_string(s.F) +
                   (bias ? " bias" : " no bias"));
      auto x = t::uniform(size_t(s.M) * s.K, 1), w = t::uniform(size_t(s.F) * s.K, 2), b = t::uniform(s.F, 3);
      const float* bp = bias ? b.data() : nullptr;
      vector<float> y(size_t(s.M) * s.F, 7.0f), y_ref(y.size(), -7.0f);  // forward overwrites
      cpu::linear_forward(y.data(), x.data(), w.data(), bp, s.M, s.K, s.F);
      cpu::linear_forward_ref(y_ref.data(), x.data(), w.data(), bp, s.M, s.K, s.F);
      EXPECT_LT(t::norm_err(y, y_ref), 1e-5) << "y";

      // Gradients start from random values: the ops accumulate.
      auto dy = t::uniform(y.size(), 4);
      auto dx = t::uniform(x.size(), 5), dw = t::uniform(w.size(), 6), db = t::uniform(b.size(), 7);
      auto dx_ref = dx, dw_ref = dw, db_ref = db;
      cpu::linear_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), s.M, s.K, s.F);
      cpu::linear_backward_ref(dx_ref.data(), dw_ref.data(), db_ref.data(), dy.data(), x.data(), w.data(), s.M, s.K,
                               s.F);
      EXPECT_LT(t::norm_err(dx, dx_ref), 1e-5) << "dx";
      EXPECT_LT(t::norm_err(dw, dw_ref), 1e-5) << "dw";
      EXPECT_LT(t::norm_err(db, db_ref), 1e-5) << "db";
    }
}

TEST(OpsLinear, FiniteDifferences) {
  for (bool fast : {false, true})
    for (const auto& s : {LinearShape{1, 3, 2}, LinearShape{7, 13, 5}, LinearShape{13, 37, 11}}) {
      auto fwd = fast ? cpu::linear_forward : cpu::linear_forward_ref;
      auto bwd = fast ? cpu::linear_backward : cpu::linear_backward_ref;
      auto x = t::uniform(size_t(s.M) * s.K, 11), w = t::uniform(size_t(s.F) * s.K, 12), b = t::uniform(s.F, 13);
      auto R = t::uniform(size_t(s.M) * s.F, 14);
      vector<float> y(R.size());
      Loss loss = [&] {
        fwd(y.data(), x.data(), w.data(), b.data(), s.M, s.K, s.F);
        return t::dot(y, R);
      };
      auto dx = zeros(x.size()), dw = zeros(w.size()), db = zeros(b.size());
      bwd(dx.data(), dw.data(), db.data(), R.data(), x.data(), w.data(), s.M, s.K, s.F);
      // Linear in each input, so only float rounding of the forward limits the agreement.
      expect_fd(mode(fast) + " linear M=" + std::to_string(s.M), {{"x", &x, &dx}, {"w", &w, &dw}, {"b", &b, &db}}, loss,
                2e-3);
    }
}

TEST(OpsLinear, BackwardAccumulatesAndSkipsNull) {
  const int M = 13, K = 7, F = 5;
  auto x = t::uniform(M * K, 21), w = t::uniform(F * K, 22), dy = t::uniform(M * F, 23);
  for (bool fast : {false, true}) {
    auto bwd = fast ? cpu::linear_backward : cpu::linear_backward_ref;
    auto dx1 = zeros(x.size()), dw1 = zeros(w.size()), db1 = zeros(F);
    bwd(dx1.data(), dw1.data(), db1.data(), dy.data(), x.data(), w.data(), M, K, F);
    auto dx2 = zeros(x.size()), dw2 = zeros(w.size()), db2 = zeros(F);
    for (int i = 0; i < 2; ++i) bwd(dx2.data(), dw2.data(), db2.data(), dy.data(), x.data(), w.data(), M, K, F);
    EXPECT_LT(t::norm_err(dx2, twice(dx1)), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(dw2, twice(dw1)), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(db2, twice(db1)), 1e-6) << mode(fast);
    // Only dw requested: the same dw, nothing else touched.
    auto dw3 = zeros(w.size());
    bwd(nullptr, dw3.data(), nullptr, dy.data(), x.data(), w.data(), M, K, F);
    EXPECT_LT(t::norm_err(dw3, dw1), 1e-6) << mode(fast);
  }
}

TEST(OpsLinear, RejectsBadShapes) {
  vector<float> a(16), b(16), c(16);
  EXPECT_THROW(cpu::linear_forward(a.data(), b.data(), c.data(), nullptr, 2, 0, 2), Error);
  EXPECT_THROW(cpu::linear_forward_ref(a.data(), b.data(), c.data(), nullptr, -1, 2, 2), Error);
}

// =====================================================================================================
// layernorm

struct LnShape {
  int M, C;
};
const LnShape kLnShapes[] = {{1, 1}, {1, 3}, {7, 13}, {13, 37}, {37, 192}, {394, 192}};

// x with a common offset per row in [-offset, offset) (mean >> std when large, to exercise the numerics).
vector<float> ln_input(int M, int C, uint64_t seed, float offset = 20.0f) {
  auto x = t::uniform(size_t(M) * C, seed);
  auto off = t::uniform(M, seed + 1, -offset, offset);
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) x[size_t(m) * C + c] += off[m];
  return x;
}

// The fast LayerNorm forward and backward against the references on one shape; seeds from `seed` up.
void check_layernorm_fast_vs_ref(const LnShape& s, float eps, uint64_t seed) {
  auto x = ln_input(s.M, s.C, seed), w = t::uniform(s.C, seed + 2, 0.5f, 1.5f), b = t::uniform(s.C, seed + 3);
  vector<float> y(x.size(), 9.0f), mean(s.M), rstd(s.M), y_ref(x.size()), mean_ref(s.M), rstd_ref(s.M);
  cpu::layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), s.M, s.C, eps);
  cpu::layernorm_forward_ref(y_ref.data(), mean_ref.data(), rstd_ref.data(), x.data(), w.data(), b.data(), s.M, s.C,
                             eps);
  EXPECT_LT(t::norm_err(y, y_ref), 2e-5) << "y";
  EXPECT_LT(t::norm_err(mean, mean_ref), 1e-6) << "mean";
  EXPECT_LT(t::norm_err(rstd, rstd_ref), 2e-5) << "rstd";

  auto dy = t::uniform(x.size(), seed + 4);
  auto dx = t::uniform(x.size(), seed + 5), dw = t::uniform(s.C, seed + 6), db = t::uniform(s.C, seed + 7);
  auto dx_ref = dx, dw_ref = dw, db_ref = db;
  cpu::layernorm_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), mean_ref.data(),
                          rstd_ref.data(), s.M, s.C);
  cpu::layernorm_backward_ref(dx_ref.data(), dw_ref.data(), db_ref.data(), dy.data(), x.data(), w.data(),
                              mean_ref.data(), rstd_ref.data(), s.M, s.C);
  EXPECT_LT(t::norm_err(dx, dx_ref), 2e-5) << "dx";
  EXPECT_LT(t::norm_err(dw, dw_ref), 2e-5) << "dw";
  EXPECT_LT(t::norm_err(db, db_ref), 1e-5) << "db";
}

TEST(OpsLayerNorm, FastMatchesRef) {
  for (const auto& s : kLnShapes) {
    SCOPED_TRACE("M=" + std::to_string(s.M) + " C=" + std::to_string(s.C));
    check_layernorm_fast_vs_ref(s, 1e-6f, 31);
  }
}

TEST(OpsLayerNorm, MatchesDefinition) {
  // Biased variance, eps inside the square root (torch.nn.LayerNorm): row {1, 2, 3, 6}: mean 3, var 3.5.
  const float x[4] = {1, 2, 3, 6}, w[4] = {1, 1, 1, 1}, b[4] = {0, 0, 0, 0};
  const float eps = 0.5f;
  float y[4], mean, rstd;
  for (bool fast : {false, true}) {
    (fast ? cpu::layernorm_forward : cpu::layernorm_forward_ref)(y, &mean, &rstd, x, w, b, 1, 4, eps);
    EXPECT_NEAR(mean, 3.0f, 1e-6f);
    EXPECT_NEAR(rstd, 0.5f, 1e-6f);  // 1/sqrt(3.5 + 0.5)
    EXPECT_NEAR(y[0], -1.0f, 1e-6f);
    EXPECT_NEAR(y[3], 1.5f, 1e-6f);
  }
}

TEST(OpsLayerNorm, FiniteDifferences) {
  const float eps = 1e-5f;
  for (bool fast : {false, true})
    for (const auto& s : {LnShape{1, 3}, LnShape{7, 13}, LnShape{5, 37}}) {
      auto fwd = fast ? cpu::layernorm_forward : cpu::layernorm_forward_ref;
      auto bwd = fast ? cpu::layernorm_backward : cpu::layernorm_backward_ref;
      // A small offset: float rounding of x - mean (~1e-7 |mean|) would otherwise dominate the differences.
      auto x = ln_input(s.M, s.C, 41, 2.0f), w = t::uniform(s.C, 43, 0.5f, 1.5f), b = t::uniform(s.C, 44);
      auto R = t::uniform(x.size(), 45);
      vector<float> y(x.size()), mean(s.M), rstd(s.M);
      Loss loss = [&] {
        fwd(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), s.M, s.C, eps);
        return t::dot(y, R);
      };
      loss();  // fills mean, rstd at the unperturbed point
      vector<float> mean0 = mean, rstd0 = rstd;
      auto dx = zeros(x.size()), dw = zeros(s.C), db = zeros(s.C);
      bwd(dx.data(), dw.data(), db.data(), R.data(), x.data(), w.data(), mean0.data(), rstd0.data(), s.M, s.C);
      expect_fd(mode(fast) + " layernorm M=" + std::to_string(s.M) + " C=" + std::to_string(s.C),
                {{"x", &x, &dx}, {"w", &w, &dw}, {"b", &b, &db}}, loss, 1e-2);
    }
}

TEST(OpsLayerNorm, BackwardAccumulatesAndSkipsNull) {
  const int M = 37, C = 13;
  auto x = ln_input(M, C, 51), w = t::uniform(C, 52), b = t::uniform(C, 53), dy = t::uniform(x.size(), 54);
  vector<float> y(x.size()), mean(M), rstd(M);
  cpu::layernorm_forward_ref(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), M, C, 1e-5f);
  for (bool fast : {false, true}) {
    auto bwd = fast ? cpu::layernorm_backward : cpu::layernorm_backward_ref;
    auto dx1 = zeros(x.size()), dw1 = zeros(C), db1 = zeros(C);
    bwd(dx1.data(), dw1.data(), db1.data(), dy.data(), x.data(), w.data(), mean.data(), rstd.data(), M, C);
    auto dx2 = zeros(x.size()), dw2 = zeros(C), db2 = zeros(C);
    for (int i = 0; i < 2; ++i)
      bwd(dx2.data(), dw2.data(), db2.data(), dy.data(), x.data(), w.data(), mean.data(), rstd.data(), M, C);
    EXPECT_LT(t::norm_err(dx2, twice(dx1)), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(dw2, twice(dw1)), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(db2, twice(db1)), 1e-6) << mode(fast);
    auto dx3 = zeros(x.size()), db3 = zeros(C);
    bwd(dx3.data(), nullptr, nullptr, dy.data(), x.data(), w.data(), mean.data(), rstd.data(), M, C);
    bwd(nullptr, nullptr, db3.data(), dy.data(), x.data(), w.data(), mean.data(), rstd.data(), M, C);
    EXPECT_LT(t::norm_err(dx3, dx1), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(db3, db1), 1e-6) << mode(fast);
  }
}

TEST(OpsLayerNorm, BackwardIndependentOfThreadCount) {
  const int M = 197 * 4, C = 192;
  auto x = ln_input(M, C, 61), w = t::uniform(C, 62), b = t::uniform(C, 63), dy = t::uniform(x.size(), 64);
  vector<float> y(x.size()), mean(M), rstd(M);
  cpu::layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), M, C, 1e-6f);
  const int saved = omp_get_max_threads();
  vector<vector<float>> dws;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    auto dw = zeros(C), db = zeros(C);
    cpu::layernorm_backward(nullptr, dw.data(), db.data(), dy.data(), x.data(), w.data(), mean.data(), rstd.data(), M,
                            C);
    dw.insert(dw.end(), db.begin(), db.end());
    dws.push_back(dw);
  }
  omp_set_num_threads(saved);
  EXPECT_EQ(dws[0], dws[1]);  // bitwise
  EXPECT_EQ(dws[0], dws[2]);
}

// =====================================================================================================
// gelu

TEST(OpsGelu, RefMatchesKnownValues) {
  // 0.5 x (1 + erf(x / sqrt2)) in double precision (Python math.erf), as torch.nn.GELU().
  const float x[6] = {-3.0f, -1.0f, 0.0f, 0.5f, 1.0f, 2.0f};
  const double want[6] = {-0.00404969409489031, -0.15865525393145707, 0.0,
                          0.34573123063700656,  0.8413447460685429,   1.9544997361036416};
  float y[6], yf[6];
  cpu::gelu_forward_ref(y, x, 6);
  cpu::gelu_forward(yf, x, 6);
  for (int i = 0; i < 6; ++i) {
    EXPECT_NEAR(y[i], want[i], 1e-7) << "ref x=" << x[i];
    EXPECT_NEAR(yf[i], want[i], 5e-7) << "fast x=" << x[i];
  }
}

TEST(OpsGelu, FastMatchesRef) {
  for (int64_t n : {1, 7, 37, 1000, 100003}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    auto x = t::normal(n, 71, 3.0f);
    if (n > 2) x[0] = 30.0f, x[1] = -30.0f, x[2] = 0.0f;
    vector<float> y(n, 5.0f), y_ref(n);
    cpu::gelu_forward(y.data(), x.data(), n);
    cpu::gelu_forward_ref(y_ref.data(), x.data(), n);
    // Abramowitz-Stegun erf: |error| < 1.5e-7, so |y error| < 1e-7 |x|.
    EXPECT_LT(t::norm_err(y, y_ref), 2e-6) << "y";
    auto dy = t::uniform(n, 72), dx = t::uniform(n, 73);
    auto dx_ref = dx;
    cpu::gelu_backward(dx.data(), dy.data(), x.data(), n);
    cpu::gelu_backward_ref(dx_ref.data(), dy.data(), x.data(), n);
    EXPECT_LT(t::norm_err(dx, dx_ref), 2e-6) << "dx";
  }
}

TEST(OpsGelu, FiniteDifferences) {
  for (bool fast : {false, true}) {
    auto fwd = fast ? cpu::gelu_forward : cpu::gelu_forward_ref;
    auto bwd = fast ? cpu::gelu_backward : cpu::gelu_backward_ref;
    const int n = 37;
    auto x = t::normal(n, 81, 2.0f), R = t::uniform(n, 82);
    vector<float> y(n);
    Loss loss = [&] {
      fwd(y.data(), x.data(), n);
      return t::dot(y, R);
    };
    auto dx = zeros(n);
    bwd(dx.data(), R.data(), x.data(), n);
    expect_fd(mode(fast) + " gelu", {{"x", &x, &dx}}, loss, 2e-3);
  }
}

TEST(OpsGelu, BackwardAccumulatesAndSkipsNull) {
  const int n = 1001;
  auto x = t::normal(n, 91, 2.0f), dy = t::uniform(n, 92);
  for (bool fast : {false, true}) {
    auto bwd = fast ? cpu::gelu_backward : cpu::gelu_backward_ref;
    auto dx1 = zeros(n), dx2 = zeros(n);
    bwd(dx1.data(), dy.data(), x.data(), n);
    bwd(dx2.data(), dy.data(), x.data(), n);
    bwd(dx2.data(), dy.data(), x.data(), n);
    EXPECT_LT(t::norm_err(dx2, twice(dx1)), 1e-6) << mode(fast);
    EXPECT_NO_THROW(bwd(nullptr, dy.data(), x.data(), n));
  }
}

// =====================================================================================================
// attention

struct AttShape {
  int B, N, C, H;
};
std::string att_name(const AttShape& s) {
  return "B=" + std::to_string(s.B) + " N=" + std::to_string(s.N) + " C=" + std::to_string(s.C) +
         " H=" + std::to_string(s.H) + " d=" + std::to_string(s.C / s.H);
}
const AttShape kAttShapes[] = {{1, 1, 4, 2},  {1, 5, 7, 1},   {2, 13, 26, 2},
                               {3, 7, 21, 3}, {1, 37, 39, 3}, {2, 197, 192, 3}};

TEST(OpsAttention, FastMatchesRef) {
  for (const auto& s : kAttShapes) {
    SCOPED_TRACE(att_name(s));
    const size_t nqkv = size_t(s.B) * s.N * 3 * s.C, nout = size_t(s.B) * s.N * s.C,
                 natt = size_t(s.B) * s.H * s.N * s.N;
    auto qkv = t::uniform(nqkv, 101, -2.0f, 2.0f);
    vector<float> out(nout, 3.0f), att(natt, 3.0f), out_ref(nout), att_ref(natt);
    cpu::attention_forward(out.data(), att.data(), qkv.data(), s.B, s.N, s.C, s.H);
    cpu::attention_forward_ref(out_ref.data(), att_ref.data(), qkv.data(), s.B, s.N, s.C, s.H);
    EXPECT_LT(t::norm_err(out, out_ref), 1e-5) << "out";
    EXPECT_LT(t::norm_err(att, att_ref), 1e-5) << "att";

    auto dout = t::uniform(nout, 102);
    auto dqkv = t::uniform(nqkv, 103);
    auto dqkv_ref = dqkv;
    vector<float> scratch(natt);
    cpu::attention_backward(dqkv.data(), scratch.data(), dout.data(), qkv.data(), att_ref.data(), s.B, s.N, s.C, s.H);
    cpu::attention_backward_ref(dqkv_ref.data(), nullptr, dout.data(), qkv.data(), att_ref.data(), s.B, s.N, s.C, s.H);
    EXPECT_LT(t::norm_err(dqkv, dqkv_ref), 1e-5) << "dqkv";
  }
}

TEST(OpsAttention, RefMatchesHandComputation) {
  // B=1, N=2, C=2, H=2 (d=1, scale 1): each head attends with scores q_i k_j.
  // token rows: [q0 q1 | k0 k1 | v0 v1] for heads 0 and 1.
  const float qkv[12] = {1, 0, 2, 5,  10, 20,   // token 0
                         0, 1, 0, -5, 30, 40};  // token 1
  float out[4], att[8];
  cpu::attention_forward_ref(out, att, qkv, 1, 2, 2, 2);
  // Head 0: q = (1, 0), k = (2, 0): token 0 scores (2, 0), token 1 scores (0, 0).
  const double p = 1.0 / (1.0 + std::exp(-2.0));
  EXPECT_NEAR(att[0], p, 1e-6);
  EXPECT_NEAR(att[2], 0.5, 1e-6);
  EXPECT_NEAR(out[0], p * 10 + (1 - p) * 30, 1e-5);
  EXPECT_NEAR(out[2], 20.0, 1e-5);  // token 1, head 0: mean of v0 = (10 + 30) / 2
  // Head 1: q = (0, 1), k = (5, -5): token 0 scores (0, 0), token 1 scores (5, -5).
  const double p1 = 1.0 / (1.0 + std::exp(-10.0));
  EXPECT_NEAR(out[1], 30.0, 1e-5);
  EXPECT_NEAR(out[3], p1 * 20 + (1 - p1) * 40, 1e-5);
}

TEST(OpsAttention, FiniteDifferences) {
  for (bool fast : {false, true})
    for (const auto& s : {AttShape{1, 3, 4, 2}, AttShape{2, 5, 7, 1}, AttShape{1, 7, 26, 2}}) {
      auto fwd = fast ? cpu::attention_forward : cpu::attention_forward_ref;
      auto bwd = fast ? cpu::attention_backward : cpu::attention_backward_ref;
      const size_t nqkv = size_t(s.B) * s.N * 3 * s.C, nout = size_t(s.B) * s.N * s.C,
                   natt = size_t(s.B) * s.H * s.N * s.N;
      auto qkv = t::uniform(nqkv, 111, -1.5f, 1.5f), R = t::uniform(nout, 112);
      vector<float> out(nout), att(natt), scratch(natt);
      Loss loss = [&] {
        fwd(out.data(), att.data(), qkv.data(), s.B, s.N, s.C, s.H);
        return t::dot(out, R);
      };
      loss();
      const vector<float> att0 = att;
      auto dqkv = zeros(nqkv);
      bwd(dqkv.data(), scratch.data(), R.data(), qkv.data(), att0.data(), s.B, s.N, s.C, s.H);
      expect_fd(mode(fast) + " attention " + att_name(s), {{"qkv", &qkv, &dqkv}}, loss, 1e-2);
    }
}

TEST(OpsAttention, BackwardAccumulatesAndChecksArgs) {
  const AttShape s{2, 13, 26, 2};
  const size_t nqkv = size_t(s.B) * s.N * 3 * s.C, nout = size_t(s.B) * s.N * s.C, natt = size_t(s.B) * s.H * s.N * s.N;
  auto qkv = t::uniform(nqkv, 121), dout = t::uniform(nout, 122);
  vector<float> out(nout), att(natt), scratch(natt);
  cpu::attention_forward(out.data(), att.data(), qkv.data(), s.B, s.N, s.C, s.H);
  for (bool fast : {false, true}) {
    auto bwd = fast ? cpu::attention_backward : cpu::attention_backward_ref;
    auto d1 = zeros(nqkv), d2 = zeros(nqkv);
    bwd(d1.data(), scratch.data(), dout.data(), qkv.data(), att.data(), s.B, s.N, s.C, s.H);
    for (int i = 0; i < 2; ++i) bwd(d2.data(), scratch.data(), dout.data(), qkv.data(), att.data(), s.B, s.N, s.C, s.H);
    EXPECT_LT(t::norm_err(d2, twice(d1)), 1e-6) << mode(fast);
    EXPECT_NO_THROW(bwd(nullptr, scratch.data(), dout.data(), qkv.data(), att.data(), s.B, s.N, s.C, s.H));
  }
  EXPECT_THROW(cpu::attention_forward(out.data(), att.data(), qkv.data(), 1, 13, 26, 3), Error);  // 26 % 3
  auto d = zeros(nqkv);
  EXPECT_THROW(cpu::attention_backward(d.data(), nullptr, dout.data(), qkv.data(), att.data(), s.B, s.N, s.C, s.H),
               Error);
}

// =====================================================================================================
// patch embedding

struct PatchShape {
  int B, Cin, S, p, C;
};
std::string patch_name(const PatchShape& s) {
  return "B=" + std::to_string(s.B) + " Cin=" + std::to_string(s.Cin) + " S=" + std::to_string(s.S) +
         " p=" + std::to_string(s.p) + " C=" + std::to_string(s.C);
}
struct PatchSizes {
  int G, P, K;
  size_t nimg, nw, ncols, nout;
};
PatchSizes patch_sizes(const PatchShape& s) {
  const int G = s.S / s.p, P = G * G, K = s.Cin * s.p * s.p;
  return {G, P, K, size_t(s.B) * s.Cin * s.S * s.S, size_t(s.C) * K, size_t(s.B) * P * K, size_t(s.B) * P * s.C};
}
// S = 10, p = 4 leaves the last two rows and columns unused (as the strided convolution does).
const PatchShape kPatchShapes[] = {{1, 1, 4, 2, 3}, {2, 3, 9, 3, 5}, {1, 3, 10, 4, 7}, {2, 3, 32, 16, 24}};

TEST(OpsPatchEmbed, RefMatchesDirectConvolution) {
  for (const auto& s : kPatchShapes) {
    SCOPED_TRACE(patch_name(s));
    const PatchSizes z = patch_sizes(s);
    auto img = t::uniform(z.nimg, 131), w = t::uniform(z.nw, 132), b = t::uniform(s.C, 133);
    vector<float> out(z.nout), cols(z.ncols);
    cpu::patch_embed_forward_ref(out.data(), cols.data(), img.data(), w.data(), b.data(), s.B, s.Cin, s.S, s.p, s.C);
    // Conv2d(kernel = stride = p) written out, then flatten(2).transpose(1, 2).
    vector<float> want(z.nout);
    for (int bi = 0; bi < s.B; ++bi)
      for (int oy = 0; oy < z.G; ++oy)
        for (int ox = 0; ox < z.G; ++ox)
          for (int c = 0; c < s.C; ++c) {
            double acc = b[c];
            for (int ci = 0; ci < s.Cin; ++ci)
              for (int ky = 0; ky < s.p; ++ky)
                for (int kx = 0; kx < s.p; ++kx)
                  acc += double(img[((size_t(bi) * s.Cin + ci) * s.S + oy * s.p + ky) * s.S + ox * s.p + kx]) *
                         w[((size_t(c) * s.Cin + ci) * s.p + ky) * s.p + kx];
            want[(size_t(bi) * z.P + oy * z.G + ox) * s.C + c] = float(acc);
          }
    EXPECT_LT(t::norm_err(out, want), 1e-6);
  }
}

TEST(OpsPatchEmbed, FastMatchesRef) {
  for (const auto& s : kPatchShapes) {
    SCOPED_TRACE(patch_name(s));
    const PatchSizes z = patch_sizes(s);
    auto img = t::uniform(z.nimg, 141), w = t::uniform(z.nw, 142), b = t::uniform(s.C, 143);
    vector<float> out(z.nout, 4.0f), cols(z.ncols, 4.0f), out_ref(z.nout), cols_ref(z.ncols);
    cpu::patch_embed_forward(out.data(), cols.data(), img.data(), w.data(), b.data(), s.B, s.Cin, s.S, s.p, s.C);
    cpu::patch_embed_forward_ref(out_ref.data(), cols_ref.data(), img.data(), w.data(), b.data(), s.B, s.Cin, s.S, s.p,
                                 s.C);
    EXPECT_EQ(cols, cols_ref);
    EXPECT_LT(t::norm_err(out, out_ref), 1e-5) << "out";
    auto dout = t::uniform(z.nout, 144);
    auto dimg = t::uniform(z.nimg, 145), dw = t::uniform(z.nw, 146), db = t::uniform(s.C, 147);
    auto dimg_ref = dimg, dw_ref = dw, db_ref = db;
    cpu::patch_embed_backward(dimg.data(), dw.data(), db.data(), dout.data(), cols.data(), w.data(), s.B, s.Cin, s.S,
                              s.p, s.C);
    cpu::patch_embed_backward_ref(dimg_ref.data(), dw_ref.data(), db_ref.data(), dout.data(), cols.data(), w.data(),
                                  s.B, s.Cin, s.S, s.p, s.C);
    EXPECT_LT(t::norm_err(dimg, dimg_ref), 1e-5) << "dimg";
    EXPECT_LT(t::norm_err(dw, dw_ref), 1e-5) << "dw";
    EXPECT_LT(t::norm_err(db, db_ref), 1e-5) << "db";
  }
}

TEST(OpsPatchEmbed, FiniteDifferences) {
  for (bool fast : {false, true})
    for (const auto& s : {PatchShape{1, 1, 4, 2, 3}, PatchShape{2, 3, 7, 3, 5}}) {
      auto fwd = fast ? cpu::patch_embed_forward : cpu::patch_embed_forward_ref;
      auto bwd = fast ? cpu::patch_embed_backward : cpu::patch_embed_backward_ref;
      const PatchSizes z = patch_sizes(s);
      auto img = t::uniform(z.nimg, 151), w = t::uniform(z.nw, 152), b = t::uniform(s.C, 153);
      auto R = t::uniform(z.nout, 154);
      vector<float> out(z.nout), cols(z.ncols);
      Loss loss = [&] {
        fwd(out.data(), cols.data(), img.data(), w.data(), b.data(), s.B, s.Cin, s.S, s.p, s.C);
        return t::dot(out, R);
      };
      loss();
      const vector<float> cols0 = cols;
      auto dimg = zeros(z.nimg), dw = zeros(z.nw), db = zeros(s.C);
      bwd(dimg.data(), dw.data(), db.data(), R.data(), cols0.data(), w.data(), s.B, s.Cin, s.S, s.p, s.C);
      // S = 7, p = 3: row and column 6 are unused, their gradient is exactly 0 and FD agrees.
      expect_fd(mode(fast) + " patch_embed " + patch_name(s), {{"img", &img, &dimg}, {"w", &w, &dw}, {"b", &b, &db}},
                loss, 2e-3);
    }
}

TEST(OpsPatchEmbed, BackwardAccumulatesAndSkipsNull) {
  const PatchShape s{2, 3, 9, 3, 5};
  const PatchSizes z = patch_sizes(s);
  auto img = t::uniform(z.nimg, 161), w = t::uniform(z.nw, 162), b = t::uniform(s.C, 163);
  auto dout = t::uniform(z.nout, 164);
  vector<float> out(z.nout), cols(z.ncols);
  cpu::patch_embed_forward(out.data(), cols.data(), img.data(), w.data(), b.data(), s.B, s.Cin, s.S, s.p, s.C);
  for (bool fast : {false, true}) {
    auto bwd = fast ? cpu::patch_embed_backward : cpu::patch_embed_backward_ref;
    auto di1 = zeros(z.nimg), dw1 = zeros(z.nw), db1 = zeros(s.C);
    bwd(di1.data(), dw1.data(), db1.data(), dout.data(), cols.data(), w.data(), s.B, s.Cin, s.S, s.p, s.C);
    auto di2 = zeros(z.nimg), dw2 = zeros(z.nw), db2 = zeros(s.C);
    for (int i = 0; i < 2; ++i)
      bwd(di2.data(), dw2.data(), db2.data(), dout.data(), cols.data(), w.data(), s.B, s.Cin, s.S, s.p, s.C);
    EXPECT_LT(t::norm_err(di2, twice(di1)), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(dw2, twice(dw1)), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(db2, twice(db1)), 1e-6) << mode(fast);
    auto dw3 = zeros(z.nw);
    bwd(nullptr, dw3.data(), nullptr, dout.data(), cols.data(), w.data(), s.B, s.Cin, s.S, s.p, s.C);
    EXPECT_LT(t::norm_err(dw3, dw1), 1e-6) << mode(fast);
  }
}

// =====================================================================================================
// cross-entropy

struct CeShape {
  int B, V;
};
const CeShape kCeShapes[] = {{1, 1}, {1, 2}, {3, 7}, {13, 10}, {37, 1000}};

vector<int> ce_targets(int B, int V, uint64_t seed) {
  Rng rng(seed);
  vector<int> tg(B);
  for (auto& v : tg) v = int(rng.below(V));
  return tg;
}

TEST(OpsCrossEntropy, RefMatchesHandComputation) {
  // timm LabelSmoothingCrossEntropy: (1-s) * nll + s * mean(-logp), averaged over the batch.
  const float logits[6] = {1, 2, 3, 0, 0, 5};
  const int targets[2] = {0, 2};
  const float s = 0.1f;
  auto row_loss = [&](const float* x, int tgt) {
    double lse = std::log(std::exp(double(x[0])) + std::exp(double(x[1])) + std::exp(double(x[2])));
    double smooth = (3 * lse - x[0] - x[1] - x[2]) / 3;
    return (1 - s) * (lse - x[tgt]) + s * smooth;
  };
  const double want = (row_loss(logits, 0) + row_loss(logits + 3, 2)) / 2;
  float probs[6];
  EXPECT_NEAR(cpu::cross_entropy_forward_ref(probs, logits, targets, 2, 3, s), want, 1e-6);
  EXPECT_NEAR(cpu::cross_entropy_forward(probs, logits, targets, 2, 3, s), want, 1e-6);
  EXPECT_NEAR(probs[5], std::exp(5.0) / (2 + std::exp(5.0)), 1e-6);
}

TEST(OpsCrossEntropy, FastMatchesRef) {
  for (float smoothing : {0.0f, 0.1f})
    for (const auto& s : kCeShapes) {
      SCOPED_TRACE("B=" + std::to_string(s.B) + " V=" + std::to_string(s.V) + " s=" + std::to_string(smoothing));
      auto logits = t::normal(size_t(s.B) * s.V, 171, 3.0f);
      for (int v = 0; v < s.V; ++v) logits[v] += 80.0f;  // a shifted row: the softmax must subtract the max
      auto tg = ce_targets(s.B, s.V, 172);
      vector<float> probs(logits.size(), 2.0f), probs_ref(logits.size());
      const float loss = cpu::cross_entropy_forward(probs.data(), logits.data(), tg.data(), s.B, s.V, smoothing);
      const float loss_ref =
          cpu::cross_entropy_forward_ref(probs_ref.data(), logits.data(), tg.data(), s.B, s.V, smoothing);
      EXPECT_TRUE(std::isfinite(loss));
      EXPECT_NEAR(loss, loss_ref, 1e-5 * std::max(1.0f, std::fabs(loss_ref))) << "loss";
      EXPECT_LT(t::norm_err(probs, probs_ref), 1e-5) << "probs";
      auto dl = t::uniform(logits.size(), 173), dl_ref = dl;
      cpu::cross_entropy_backward(dl.data(), probs_ref.data(), tg.data(), s.B, s.V, smoothing, 0.7f);
      cpu::cross_entropy_backward_ref(dl_ref.data(), probs_ref.data(), tg.data(), s.B, s.V, smoothing, 0.7f);
      EXPECT_LT(t::norm_err(dl, dl_ref), 1e-6) << "dlogits";
    }
}

TEST(OpsCrossEntropy, FiniteDifferences) {
  for (bool fast : {false, true})
    for (float smoothing : {0.0f, 0.1f})
      for (const auto& s : {CeShape{1, 2}, CeShape{3, 7}, CeShape{5, 37}}) {
        auto fwd = fast ? cpu::cross_entropy_forward : cpu::cross_entropy_forward_ref;
        auto bwd = fast ? cpu::cross_entropy_backward : cpu::cross_entropy_backward_ref;
        auto logits = t::normal(size_t(s.B) * s.V, 181, 2.0f);
        auto tg = ce_targets(s.B, s.V, 182);
        vector<float> probs(logits.size());
        const float dloss = 0.7f;
        Loss loss = [&] { return double(dloss) * fwd(probs.data(), logits.data(), tg.data(), s.B, s.V, smoothing); };
        loss();
        const vector<float> probs0 = probs;
        auto dl = zeros(logits.size());
        bwd(dl.data(), probs0.data(), tg.data(), s.B, s.V, smoothing, dloss);
        // The loss comes back in float: rounding noise ~1e-7 |L| / h.
        expect_fd(mode(fast) + " cross_entropy B=" + std::to_string(s.B) + " V=" + std::to_string(s.V) +
                      " s=" + std::to_string(smoothing),
                  {{"logits", &logits, &dl}}, loss, 1e-2);
      }
}

TEST(OpsCrossEntropy, BackwardAccumulatesAndChecksTargets) {
  const int B = 13, V = 10;
  auto logits = t::normal(B * V, 191);
  auto tg = ce_targets(B, V, 192);
  vector<float> probs(B * V);
  cpu::cross_entropy_forward(probs.data(), logits.data(), tg.data(), B, V, 0.1f);
  for (bool fast : {false, true}) {
    auto bwd = fast ? cpu::cross_entropy_backward : cpu::cross_entropy_backward_ref;
    auto d1 = zeros(B * V), d2 = zeros(B * V);
    bwd(d1.data(), probs.data(), tg.data(), B, V, 0.1f, 1.0f);
    for (int i = 0; i < 2; ++i) bwd(d2.data(), probs.data(), tg.data(), B, V, 0.1f, 1.0f);
    EXPECT_LT(t::norm_err(d2, twice(d1)), 1e-6) << mode(fast);
    EXPECT_NO_THROW(bwd(nullptr, probs.data(), tg.data(), B, V, 0.1f, 1.0f));
  }
  tg[3] = V;
  EXPECT_THROW(cpu::cross_entropy_forward(probs.data(), logits.data(), tg.data(), B, V, 0.1f), Error);
  tg[3] = -1;
  EXPECT_THROW(cpu::cross_entropy_forward_ref(probs.data(), logits.data(), tg.data(), B, V, 0.1f), Error);
}

// =====================================================================================================
// elementwise and the vectorised math helpers

TEST(OpsElementwise, AddInplace) {
  for (int64_t n : {0, 1, 7, 100003}) {
    auto y = t::uniform(n, 201), x = t::uniform(n, 202);
    auto want = y;
    for (int64_t i = 0; i < n; ++i) want[i] += x[i];
    cpu::add_inplace(y.data(), x.data(), n);
    EXPECT_EQ(y, want) << "n=" << n;
  }
}

TEST(OpsSimdMath, ExpAndErfAccuracy) {
  double worst_exp = 0.0, worst_erf = 0.0, worst_emz2 = 0.0;
  for (int i = 0; i <= 200000; ++i) {
    const float x = -87.0f + 175.0f * float(i) / 200000.0f;
    const double e = std::exp(double(x));
    worst_exp = std::max(worst_exp, std::fabs(cpu::detail::exp_approx(x) - e) / e);
    const float z = -6.0f + 12.0f * float(i) / 200000.0f;
    float emz2;
    const float erf = cpu::detail::erf_approx(z, &emz2);
    worst_erf = std::max(worst_erf, std::fabs(erf - std::erf(double(z))));
    const double e2 = std::exp(-double(z * z));  // the same float argument z * z
    worst_emz2 = std::max(worst_emz2, std::fabs(emz2 - e2) / e2);
  }
  EXPECT_LT(worst_exp, 3e-7);  // a couple of float ulps
  EXPECT_LT(worst_emz2, 3e-7);
  EXPECT_LT(worst_erf, 1e-6);  // Abramowitz-Stegun 7.1.26 (1.5e-7) plus float rounding of its polynomial
  // Out-of-range inputs clamp instead of producing inf / NaN.
  EXPECT_GT(cpu::detail::exp_approx(-1e30f), 0.0f);
  EXPECT_LT(cpu::detail::exp_approx(-1e30f), 1e-37f);
  EXPECT_TRUE(std::isfinite(cpu::detail::exp_approx(1e30f)));
}


// =====================================================================================================
// instruction-set paths: the AVX2+FMA kernels (taken on CPUs that have them) and the portable loops,
// each against the reference, on shapes that reach every tile shape, mask and tail of the kernels
// (rows not a multiple of 6, columns not a multiple of 16 or 8, heads of d = 8, 20, 24, 64, N not a
// multiple of 8) and the OpenMP paths.

#if SAV_HAVE_AVX2_KERNELS
// e^x and erf(x) through the AVX2 versions, 8 lanes at a time (n a multiple of 8).
SAV_AVX2 void avx2_exp_erf(float* e, float* erf, float* emx2, const float* x, const float* z, int n) {
  for (int i = 0; i < n; i += 8) {
    _mm256_storeu_ps(e + i, cpu::detail::avx2::exp(_mm256_loadu_ps(x + i)));
    __m256 em;
    _mm256_storeu_ps(erf + i, cpu::detail::avx2::erf(_mm256_loadu_ps(z + i), &em));
    _mm256_storeu_ps(emx2 + i, em);
  }
}
#endif

// Sets detail::force_portable_kernels for the scope.
struct PortableScope {
  explicit PortableScope(bool on) : saved(cpu::detail::force_portable_kernels) {
    cpu::detail::force_portable_kernels = on;
  }
  ~PortableScope() { cpu::detail::force_portable_kernels = saved; }
  bool saved;
};

std::string path_name(bool portable) { return portable ? "portable" : (cpu::detail::use_avx2() ? "avx2" : "portable"); }

TEST(OpsKernelPaths, Avx2ExpAndErfAccuracy) {
#if SAV_HAVE_AVX2_KERNELS
  if (!cpu::detail::use_avx2()) GTEST_SKIP() << "no AVX2+FMA on this CPU";
  const int n = 200008;
  vector<float> x(n), z(n), e(n), erf(n), emx2(n);
  for (int i = 0; i < n; ++i) {
    x[i] = -87.0f + 175.0f * float(i) / float(n - 8);
    z[i] = -6.0f + 12.0f * float(i) / float(n - 8);
  }
  x[n - 2] = -1e30f, x[n - 1] = 1e30f;
  avx2_exp_erf(e.data(), erf.data(), emx2.data(), x.data(), z.data(), n);
  double worst_exp = 0.0, worst_erf = 0.0, worst_emz2 = 0.0;
  for (int i = 0; i < n - 8; ++i) {
    const double ex = std::exp(double(x[i]));
    worst_exp = std::max(worst_exp, std::fabs(e[i] - ex) / ex);
    worst_erf = std::max(worst_erf, std::fabs(erf[i] - std::erf(double(z[i]))));
    const double e2 = std::exp(-double(z[i] * z[i]));
    worst_emz2 = std::max(worst_emz2, std::fabs(emx2[i] - e2) / e2);
  }
  EXPECT_LT(worst_exp, 3e-7);
  EXPECT_LT(worst_emz2, 3e-7);
  EXPECT_LT(worst_erf, 1e-6);
  EXPECT_GT(e[n - 2], 0.0f);  // clamped like exp_approx
  EXPECT_LT(e[n - 2], 1e-37f);
  EXPECT_TRUE(std::isfinite(e[n - 1]));
#else
  GTEST_SKIP() << "not an x86-64 GCC build";
#endif
}

TEST(OpsKernelPaths, LinearMatchesRef) {
  const LinearShape shapes[] = {{1, 1, 1},   {5, 7, 40},    {6, 16, 8},   {7, 24, 9},    {13, 37, 67},
                                {3, 96, 10}, {50, 96, 288}, {50, 192, 96}, {400, 96, 96}, {97, 5, 17}};
  for (bool portable : {false, true}) {
    PortableScope scope(portable);
    for (const auto& s : shapes) {
      SCOPED_TRACE(path_name(portable) + " M=" + std::to_string(s.M) + " K=" + std::to_string(s.K) +
                   " F=" + std::to_string(s.F));
      auto x = t::uniform(size_t(s.M) * s.K, 301), w = t::uniform(size_t(s.F) * s.K, 302), b = t::uniform(s.F, 303);
      vector<float> y(size_t(s.M) * s.F, 7.0f), y_ref(y.size());
      cpu::linear_forward(y.data(), x.data(), w.data(), b.data(), s.M, s.K, s.F);
      cpu::linear_forward_ref(y_ref.data(), x.data(), w.data(), b.data(), s.M, s.K, s.F);
      EXPECT_LT(t::norm_err(y, y_ref), 1e-5) << "y";
      cpu::linear_forward(y.data(), x.data(), w.data(), nullptr, s.M, s.K, s.F);
      cpu::linear_forward_ref(y_ref.data(), x.data(), w.data(), nullptr, s.M, s.K, s.F);
      EXPECT_LT(t::norm_err(y, y_ref), 1e-5) << "y without bias";
      auto dy = t::uniform(y.size(), 304);
      auto dx = t::uniform(x.size(), 305), dw = t::uniform(w.size(), 306), db = t::uniform(b.size(), 307);
      auto dx_ref = dx, dw_ref = dw, db_ref = db;
      cpu::linear_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), s.M, s.K, s.F);
      cpu::linear_backward_ref(dx_ref.data(), dw_ref.data(), db_ref.data(), dy.data(), x.data(), w.data(), s.M, s.K,
                               s.F);
      EXPECT_LT(t::norm_err(dx, dx_ref), 1e-5) << "dx";
      EXPECT_LT(t::norm_err(dw, dw_ref), 1e-5) << "dw";
      EXPECT_LT(t::norm_err(db, db_ref), 1e-5) << "db";
    }
  }
}

TEST(OpsKernelPaths, LayerNormMatchesRef) {
  const LnShape shapes[] = {{1, 8}, {7, 24}, {65, 96}, {400, 96}, {3, 192}, {5, 40}};
  for (bool portable : {false, true}) {
    PortableScope scope(portable);
    for (const auto& s : shapes) {
      SCOPED_TRACE(path_name(portable) + " M=" + std::to_string(s.M) + " C=" + std::to_string(s.C));
      check_layernorm_fast_vs_ref(s, 1e-6f, 311);
    }
  }
}

TEST(OpsKernelPaths, GeluMatchesRef) {
  for (bool portable : {false, true}) {
    PortableScope scope(portable);
    for (int64_t n : {1, 7, 8, 9, 37, 40000}) {
      SCOPED_TRACE(path_name(portable) + " n=" + std::to_string(n));
      auto x = t::normal(n, 321, 3.0f);
      if (n > 2) x[0] = 30.0f, x[1] = -30.0f, x[2] = 0.0f;
      vector<float> y(n, 5.0f), y_ref(n);
      cpu::gelu_forward(y.data(), x.data(), n);
      cpu::gelu_forward_ref(y_ref.data(), x.data(), n);
      EXPECT_LT(t::norm_err(y, y_ref), 2e-6) << "y";
      auto dy = t::uniform(n, 322), dx = t::uniform(n, 323);
      auto dx_ref = dx;
      cpu::gelu_backward(dx.data(), dy.data(), x.data(), n);
      cpu::gelu_backward_ref(dx_ref.data(), dy.data(), x.data(), n);
      EXPECT_LT(t::norm_err(dx, dx_ref), 2e-6) << "dx";
    }
  }
}

TEST(OpsKernelPaths, AttentionMatchesRef) {
  // d = 24 (vit_fmnist), 20 (masked 24-column tiles), 8, 64, 4, 3; N = 50, 17, 9, 8, 197, 1; the last
  // shape runs OpenMP over (batch, head) pairs.
  const AttShape shapes[] = {{3, 50, 96, 4}, {2, 17, 40, 2}, {1, 9, 16, 2}, {1, 8, 8, 1},
                             {1, 197, 64, 1}, {2, 1, 12, 3}, {2, 13, 9, 3}, {16, 50, 96, 4}};
  for (bool portable : {false, true}) {
    PortableScope scope(portable);
    for (const auto& s : shapes) {
      SCOPED_TRACE(path_name(portable) + " " + att_name(s));
      const size_t nqkv = size_t(s.B) * s.N * 3 * s.C, nout = size_t(s.B) * s.N * s.C,
                   natt = size_t(s.B) * s.H * s.N * s.N;
      auto qkv = t::uniform(nqkv, 331, -2.0f, 2.0f);
      vector<float> out(nout, 3.0f), att(natt, 3.0f), out_ref(nout), att_ref(natt);
      cpu::attention_forward(out.data(), att.data(), qkv.data(), s.B, s.N, s.C, s.H);
      cpu::attention_forward_ref(out_ref.data(), att_ref.data(), qkv.data(), s.B, s.N, s.C, s.H);
      EXPECT_LT(t::norm_err(out, out_ref), 1e-5) << "out";
      EXPECT_LT(t::norm_err(att, att_ref), 1e-5) << "att";
      auto dout = t::uniform(nout, 332), dqkv = t::uniform(nqkv, 333);
      auto dqkv_ref = dqkv;
      vector<float> scratch(natt);
      cpu::attention_backward(dqkv.data(), scratch.data(), dout.data(), qkv.data(), att_ref.data(), s.B, s.N, s.C,
                              s.H);
      cpu::attention_backward_ref(dqkv_ref.data(), nullptr, dout.data(), qkv.data(), att_ref.data(), s.B, s.N, s.C,
                                  s.H);
      EXPECT_LT(t::norm_err(dqkv, dqkv_ref), 1e-5) << "dqkv";
    }
  }
}

TEST(OpsKernelPaths, IndependentOfThreadCount) {
  // In the AVX2 kernels every output element is computed by one thread in a fixed order: results are
  // bitwise the same for any number of threads (threaded OpenBLAS, the portable path, does not promise it).
  if (!cpu::detail::use_avx2()) GTEST_SKIP() << "no AVX2+FMA on this CPU";
  const int M = 400, K = 96, F = 192, B = 16, N = 50, C = 96, H = 4;
  auto x = t::uniform(size_t(M) * K, 341), w = t::uniform(size_t(F) * K, 342), b = t::uniform(F, 343);
  auto dy = t::uniform(size_t(M) * F, 344), qkv = t::uniform(size_t(B) * N * 3 * C, 345);
  auto dout = t::uniform(size_t(B) * N * C, 346);
  const int saved = omp_get_max_threads();
  vector<vector<float>> runs;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    vector<float> y(size_t(M) * F), dx = zeros(x.size()), att(size_t(B) * H * N * N), out(size_t(B) * N * C);
    vector<float> dqkv = zeros(qkv.size()), scratch(att.size());
    cpu::linear_forward(y.data(), x.data(), w.data(), b.data(), M, K, F);
    cpu::linear_backward(dx.data(), nullptr, nullptr, dy.data(), x.data(), w.data(), M, K, F);
    cpu::attention_forward(out.data(), att.data(), qkv.data(), B, N, C, H);
    cpu::attention_backward(dqkv.data(), scratch.data(), dout.data(), qkv.data(), att.data(), B, N, C, H);
    vector<float> all;
    for (const auto* v : {&y, &dx, &att, &out, &dqkv}) all.insert(all.end(), v->begin(), v->end());
    runs.push_back(all);
  }
  omp_set_num_threads(saved);
  EXPECT_EQ(runs[0], runs[1]);  // bitwise
  EXPECT_EQ(runs[0], runs[2]);
}

}  // namespace
