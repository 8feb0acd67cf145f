// Tests of the MoE op family (src/ops/cpu/moe.h): route/gather/scatter, router, gate modes, the
// latency-aware load-balancing loss, and a full two-expert MoE linear composed from them.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "ops/cpu/moe.h"

using namespace sav;
using namespace sav::cpu;

namespace {

std::vector<float> moe_randn(Rng& rng, size_t n, float std = 1.0f) {
  std::vector<float> v(n);
  for (auto& x : v) x = std * rng.normal();
  return v;
}

// max|a-b| / max|ref| (ref = b), 0 when both are zero
double moe_nerr(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return den > 0.0 ? num / den : num;
}

// margin between the best and second-best value of row t
float moe_margin(const float* z, int E) {
  if (E < 2) return 1e30f;
  float a = -1e30f, b = -1e30f;
  for (int e = 0; e < E; ++e) {
    if (z[e] > a) {
      b = a;
      a = z[e];
    } else if (z[e] > b) {
      b = z[e];
    }
  }
  return a - b;
}

const int kRows[] = {1, 3, 7, 13, 37};

// ---------------- a complete MoE linear built from the ops (the test's composition) ----------------

struct MoeLayer {
  int M, C, F, E;
  std::vector<float> wr, br;              // (E,C), (E)
  std::vector<std::vector<float>> we, be;  // E x (F,C), E x (F)
};

struct MoeFwd {
  std::vector<float> logits, noisy, probs, scale, y;
  std::vector<int> choice, counts, offsets, idx;
  std::vector<std::vector<float>> xg, yg;
};

MoeLayer moe_make_layer(Rng& rng, int M, int C, int F, int E) {
  MoeLayer L{M, C, F, E, {}, {}, {}, {}};
  L.wr = moe_randn(rng, static_cast<size_t>(E) * C, 1.0f / std::sqrt(static_cast<float>(C)));
  L.br = moe_randn(rng, E, 0.3f);
  for (int e = 0; e < E; ++e) {
    L.we.push_back(moe_randn(rng, static_cast<size_t>(F) * C, 0.5f));
    L.be.push_back(moe_randn(rng, F, 0.2f));
  }
  return L;
}

// expert e: yg (n,F) = xg (n,C) We^T + be, double accumulation
void moe_expert_forward(const MoeLayer& L, int e, float* yg, const float* xg, int n) {
  for (int r = 0; r < n; ++r)
    for (int f = 0; f < L.F; ++f) {
      double acc = L.be[e][f];
      for (int c = 0; c < L.C; ++c)
        acc += static_cast<double>(xg[static_cast<size_t>(r) * L.C + c]) * L.we[e][static_cast<size_t>(f) * L.C + c];
      yg[static_cast<size_t>(r) * L.F + f] = static_cast<float>(acc);
    }
}

// p0 != nullptr: scale = p / p0 with p0 held fixed (the straight-through surrogate, for finite differences)
void moe_layer_forward(const MoeLayer& L, const std::vector<float>& x, MoeGateMode mode, MoeFwd& f,
                       const std::vector<float>* p0 = nullptr) {
  const int M = L.M, C = L.C, F = L.F, E = L.E;
  f.logits.assign(static_cast<size_t>(M) * E, 0.f);
  f.noisy = f.probs = f.logits;
  f.choice.assign(M, 0);
  f.counts.assign(E, 0);
  f.offsets.assign(E + 1, 0);
  f.idx.assign(M, 0);
  f.scale.assign(M, 0.f);
  f.y.assign(static_cast<size_t>(M) * F, 0.f);
  moe_router_forward(f.logits.data(), f.noisy.data(), f.probs.data(), f.choice.data(), x.data(), L.wr.data(),
                     L.br.data(), M, C, E, 0.0f, nullptr);
  moe_route(f.counts.data(), f.offsets.data(), f.idx.data(), f.choice.data(), M, E);
  moe_gate_forward(f.scale.data(), f.probs.data(), f.choice.data(), M, E, mode);
  if (p0)
    for (int t = 0; t < M; ++t) {
      const size_t i = static_cast<size_t>(t) * E + f.choice[t];
      f.scale[t] = f.probs[i] / (*p0)[i];
    }
  f.xg.assign(E, {});
  f.yg.assign(E, {});
  for (int e = 0; e < E; ++e) {
    const int n = f.counts[e];
    const int* ie = f.idx.data() + f.offsets[e];
    f.xg[e].assign(static_cast<size_t>(n) * C, 0.f);
    f.yg[e].assign(static_cast<size_t>(n) * F, 0.f);
    moe_gather(f.xg[e].data(), x.data(), ie, n, C);
    moe_expert_forward(L, e, f.yg[e].data(), f.xg[e].data(), n);
    moe_scatter(f.y.data(), f.yg[e].data(), ie, f.scale.data(), n, F);
  }
}

double moe_dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

struct MoeGrads {
  std::vector<float> dx, dwr, dbr;
  std::vector<std::vector<float>> dwe, dbe;
};

// gradients of L = sum(y * R)
MoeGrads moe_layer_backward(const MoeLayer& L, const std::vector<float>& x, const MoeFwd& f,
                            const std::vector<float>& R, MoeGateMode mode) {
  const int M = L.M, C = L.C, F = L.F, E = L.E;
  MoeGrads g;
  g.dx.assign(static_cast<size_t>(M) * C, 0.f);
  g.dwr.assign(L.wr.size(), 0.f);
  g.dbr.assign(E, 0.f);
  std::vector<float> dprobs(static_cast<size_t>(M) * E, 0.f), dlogits(dprobs.size(), 0.f), dscale(M, 0.f);
  for (int e = 0; e < E; ++e) {
    g.dwe.emplace_back(L.we[e].size(), 0.f);
    g.dbe.emplace_back(F, 0.f);
    const int n = f.counts[e];
    const int* ie = f.idx.data() + f.offsets[e];
    std::vector<float> dyg(static_cast<size_t>(n) * F, 0.f), dxg(static_cast<size_t>(n) * C, 0.f);
    moe_scatter_backward(dyg.data(), dscale.data(), R.data(), f.yg[e].data(), ie, f.scale.data(), n, F);
    for (int r = 0; r < n; ++r)
      for (int o = 0; o < F; ++o) {
        const float d = dyg[static_cast<size_t>(r) * F + o];
        g.dbe[e][o] += d;
        for (int c = 0; c < C; ++c) {
          dxg[static_cast<size_t>(r) * C + c] += d * L.we[e][static_cast<size_t>(o) * C + c];
          g.dwe[e][static_cast<size_t>(o) * C + c] += d * f.xg[e][static_cast<size_t>(r) * C + c];
        }
      }
    moe_gather_backward(g.dx.data(), dxg.data(), ie, n, C);
  }
  moe_gate_backward(dprobs.data(), dscale.data(), f.probs.data(), f.choice.data(), M, E, mode);
  moe_router_backward(g.dx.data(), g.dwr.data(), g.dbr.data(), dlogits.data(), dprobs.data(), f.probs.data(),
                      x.data(), L.wr.data(), M, C, E);
  return g;
}

}  // namespace

// ============================== dispatch ==============================

TEST(Moe, RouteIsStableGroupedPermutationAndMatchesRef) {
  Rng rng(11);
  for (int E : {1, 2, 3, 5})
    for (int M : {0, 1, 3, 7, 13, 37}) {
      std::vector<int> choice(M);
      for (auto& c : choice) c = static_cast<int>(rng.below(E));
      std::vector<int> counts(E), offsets(E + 1), idx(M), counts_r(E), offsets_r(E + 1), idx_r(M);
      moe_route(counts.data(), offsets.data(), idx.data(), choice.data(), M, E);
      moe_route_ref(counts_r.data(), offsets_r.data(), idx_r.data(), choice.data(), M, E);
      EXPECT_EQ(counts, counts_r);
      EXPECT_EQ(offsets, offsets_r);
      EXPECT_EQ(idx, idx_r);
      EXPECT_EQ(offsets[0], 0);
      EXPECT_EQ(offsets[E], M);
      std::vector<int> seen(M, 0);
      for (int e = 0; e < E; ++e) {
        EXPECT_EQ(counts[e], static_cast<int>(std::count(choice.begin(), choice.end(), e)));
        for (int r = offsets[e]; r < offsets[e + 1]; ++r) {
          EXPECT_EQ(choice[idx[r]], e);
          ++seen[idx[r]];
          if (r > offsets[e]) {
            EXPECT_LT(idx[r - 1], idx[r]) << "not stable";
          }
        }
      }
      for (int t = 0; t < M; ++t) EXPECT_EQ(seen[t], 1);
    }
}

TEST(Moe, RouteRejectsBadChoice) {
  std::vector<int> choice = {0, 2, 1}, counts(2), offsets(3), idx(3);
  EXPECT_THROW(moe_route(counts.data(), offsets.data(), idx.data(), choice.data(), 3, 2), sav::Error);
  EXPECT_THROW(moe_route_ref(counts.data(), offsets.data(), idx.data(), choice.data(), 3, 2), sav::Error);
  std::vector<float> scale(3), probs(6, 0.5f);
  EXPECT_THROW(moe_gate_forward(scale.data(), probs.data(), choice.data(), 3, 2, moe_gate_prob), sav::Error);
  Rng rng(1);
  std::vector<float> x(3 * 4), w(2 * 4), lg(6), nz(6), pr(6);
  EXPECT_THROW(moe_router_forward(lg.data(), nz.data(), pr.data(), choice.data(), x.data(), w.data(), nullptr, 3, 4,
                                  2, 0.5f, nullptr),
               sav::Error);  // noise without an Rng
}

TEST(Moe, GatherScatterMatchRef) {
  Rng rng(12);
  for (int M : kRows)
    for (int C : {1, 5, 17}) {
      const int E = 3, F = C + 2;
      std::vector<int> choice(M), counts(E), offsets(E + 1), idx(M);
      for (auto& c : choice) c = static_cast<int>(rng.below(E));
      moe_route(counts.data(), offsets.data(), idx.data(), choice.data(), M, E);
      auto x = moe_randn(rng, static_cast<size_t>(M) * C);
      auto scale = moe_randn(rng, M);
      auto dy = moe_randn(rng, static_cast<size_t>(M) * F);
      std::vector<float> y(static_cast<size_t>(M) * F, 0.f), y_r = y;
      std::vector<float> dx = moe_randn(rng, static_cast<size_t>(M) * C), dx_r = dx;
      std::vector<float> dscale = moe_randn(rng, M), dscale_r = dscale;
      for (int e = 0; e < E; ++e) {
        const int n = counts[e];
        const int* ie = idx.data() + offsets[e];
        std::vector<float> xg(static_cast<size_t>(n) * C), xg_r(xg.size());
        moe_gather(xg.data(), x.data(), ie, n, C);
        moe_gather_ref(xg_r.data(), x.data(), ie, n, C);
        EXPECT_EQ(xg, xg_r);
        auto yg = moe_randn(rng, static_cast<size_t>(n) * F);
        moe_scatter(y.data(), yg.data(), ie, scale.data(), n, F);
        moe_scatter_ref(y_r.data(), yg.data(), ie, scale.data(), n, F);
        auto dxg = moe_randn(rng, static_cast<size_t>(n) * C);
        moe_gather_backward(dx.data(), dxg.data(), ie, n, C);
        moe_gather_backward_ref(dx_r.data(), dxg.data(), ie, n, C);
        std::vector<float> dyg = moe_randn(rng, static_cast<size_t>(n) * F), dyg_r = dyg;
        moe_scatter_backward(dyg.data(), dscale.data(), dy.data(), yg.data(), ie, scale.data(), n, F);
        moe_scatter_backward_ref(dyg_r.data(), dscale_r.data(), dy.data(), yg.data(), ie, scale.data(), n, F);
        EXPECT_EQ(dyg, dyg_r);  // the same single product per element
      }
      EXPECT_EQ(y, y_r);
      EXPECT_EQ(dx, dx_r);
      EXPECT_LE(moe_nerr(dscale, dscale_r), 1e-6) << "M=" << M << " C=" << C;  // float vs double dot
    }
}

TEST(Moe, RouteGatherScatterRoundTripWithIdentityExperts) {
  Rng rng(13);
  for (int M : kRows)
    for (int E : {1, 2, 3}) {
      const int C = 9;
      std::vector<int> choice(M), counts(E), offsets(E + 1), idx(M);
      for (auto& c : choice) c = static_cast<int>(rng.below(E));
      moe_route(counts.data(), offsets.data(), idx.data(), choice.data(), M, E);
      auto x = moe_randn(rng, static_cast<size_t>(M) * C);
      std::vector<float> probs(static_cast<size_t>(M) * E);
      for (int t = 0; t < M; ++t)
        for (int e = 0; e < E; ++e) probs[static_cast<size_t>(t) * E + e] = rng.uniform(0.1f, 1.0f);
      for (MoeGateMode mode : {moe_gate_prob, moe_gate_straight_through}) {
        std::vector<float> scale(M), y(static_cast<size_t>(M) * C, -999.f), y1 = y;
        moe_gate_forward(scale.data(), probs.data(), choice.data(), M, E, mode);
        for (int e = 0; e < E; ++e) {
          const int* ie = idx.data() + offsets[e];
          std::vector<float> xg(static_cast<size_t>(counts[e]) * C);
          moe_gather(xg.data(), x.data(), ie, counts[e], C);
          moe_scatter(y.data(), xg.data(), ie, scale.data(), counts[e], C);  // identity expert
          moe_scatter(y1.data(), xg.data(), ie, nullptr, counts[e], C);
        }
        EXPECT_EQ(y1, x);
        for (int t = 0; t < M; ++t) {
          const float p = probs[static_cast<size_t>(t) * E + choice[t]];
          const float s = (mode == moe_gate_prob) ? p : 1.0f;
          ASSERT_EQ(scale[t], s);
          for (int c = 0; c < C; ++c)
            ASSERT_EQ(y[static_cast<size_t>(t) * C + c], s * x[static_cast<size_t>(t) * C + c]) << "t=" << t;
        }
      }
    }
}

// ============================== router ==============================

TEST(Moe, RouterForwardBackwardMatchRef) {
  for (int E : {2, 3})
    for (int M : kRows)
      for (float noise : {0.0f, 0.5f}) {
        Rng rng(100 + M * 7 + E);
        const int C = 13;
        auto x = moe_randn(rng, static_cast<size_t>(M) * C);
        auto w = moe_randn(rng, static_cast<size_t>(E) * C, 0.3f);
        auto b = moe_randn(rng, E, 0.1f);
        const size_t ME = static_cast<size_t>(M) * E;
        std::vector<float> lg(ME), nz(ME), pr(ME), lg_r(ME), nz_r(ME), pr_r(ME);
        std::vector<int> ch(M), ch_r(M);
        Rng r1(5), r2(5);
        moe_router_forward(lg.data(), nz.data(), pr.data(), ch.data(), x.data(), w.data(), b.data(), M, C, E, noise,
                           &r1);
        moe_router_forward_ref(lg_r.data(), nz_r.data(), pr_r.data(), ch_r.data(), x.data(), w.data(), b.data(), M,
                               C, E, noise, &r2);
        EXPECT_LE(moe_nerr(lg, lg_r), 1e-5) << "logits M=" << M << " E=" << E;
        EXPECT_LE(moe_nerr(nz, nz_r), 1e-5) << "noisy M=" << M << " E=" << E;
        EXPECT_LE(moe_nerr(pr, pr_r), 1e-5) << "probs M=" << M << " E=" << E;
        for (int t = 0; t < M; ++t) {
          if (moe_margin(&nz_r[static_cast<size_t>(t) * E], E) > 1e-4f) {
            EXPECT_EQ(ch[t], ch_r[t]);
          }
          float s = 0.f;
          for (int e = 0; e < E; ++e) s += pr[static_cast<size_t>(t) * E + e];
          EXPECT_NEAR(s, 1.0f, 1e-5f);
        }
        if (noise == 0.0f) {
          EXPECT_EQ(lg, nz);
        }

        auto dprobs = moe_randn(rng, ME);
        std::vector<float> dl = moe_randn(rng, ME), dl_r = dl;
        std::vector<float> dx = moe_randn(rng, static_cast<size_t>(M) * C), dx_r = dx;
        std::vector<float> dw = moe_randn(rng, w.size()), dw_r = dw;
        std::vector<float> db = moe_randn(rng, E), db_r = db;
        moe_router_backward(dx.data(), dw.data(), db.data(), dl.data(), dprobs.data(), pr_r.data(), x.data(), w.data(),
                            M, C, E);
        moe_router_backward_ref(dx_r.data(), dw_r.data(), db_r.data(), dl_r.data(), dprobs.data(), pr_r.data(),
                                x.data(), w.data(), M, C, E);
        EXPECT_LE(moe_nerr(dl, dl_r), 1e-5) << "dlogits";
        EXPECT_LE(moe_nerr(dx, dx_r), 1e-5) << "dx";
        EXPECT_LE(moe_nerr(dw, dw_r), 1e-5) << "dw";
        EXPECT_LE(moe_nerr(db, db_r), 1e-5) << "db";
      }
}

TEST(Moe, NoisyRoutingIsDeterministicForASeed) {
  const int M = 256, C = 8, E = 2;
  Rng rng(21);
  auto x = moe_randn(rng, static_cast<size_t>(M) * C);
  auto w = moe_randn(rng, static_cast<size_t>(E) * C, 0.05f);  // small logits: the noise decides often
  const size_t ME = static_cast<size_t>(M) * E;
  auto run = [&](uint64_t seed, float noise, std::vector<float>& nz, std::vector<float>& pr, std::vector<int>& ch) {
    std::vector<float> lg(ME);
    nz.assign(ME, 0.f);
    pr.assign(ME, 0.f);
    ch.assign(M, 0);
    Rng r(seed);
    moe_router_forward(lg.data(), nz.data(), pr.data(), ch.data(), x.data(), w.data(), nullptr, M, C, E, noise, &r);
  };
  std::vector<float> nz1, pr1, nz2, pr2, nz3, pr3, nz0, pr0;
  std::vector<int> ch1, ch2, ch3, ch0;
  run(7, moe_default_noise_std(E), nz1, pr1, ch1);
  run(7, moe_default_noise_std(E), nz2, pr2, ch2);
  run(8, moe_default_noise_std(E), nz3, pr3, ch3);
  run(7, 0.0f, nz0, pr0, ch0);
  EXPECT_EQ(nz1, nz2);
  EXPECT_EQ(pr1, pr2);
  EXPECT_EQ(ch1, ch2);
  int diff_seed = 0, diff_clean = 0;
  for (int t = 0; t < M; ++t) {
    diff_seed += ch1[t] != ch3[t];
    diff_clean += ch1[t] != ch0[t];
  }
  EXPECT_GT(diff_seed, M / 10) << "another seed should route differently";
  EXPECT_GT(diff_clean, M / 10) << "noise std 1/E should flip many near-even tokens";
  // The noise-free path draws no random numbers.
  Rng r(9), r_copy(9);
  std::vector<float> lg(ME);
  moe_router_forward(lg.data(), nz0.data(), pr0.data(), ch0.data(), x.data(), w.data(), nullptr, M, C, E, 0.0f, &r);
  EXPECT_EQ(r.next_u64(), r_copy.next_u64());
}

TEST(Moe, FastPathsMatchRefOnLargeInputs) {
  // Large enough that the OpenMP branches run (>= 2^15 elements per op).
  const int M = 17003, C = 5, E = 2, F = 7;
  Rng rng(41);
  auto x = moe_randn(rng, static_cast<size_t>(M) * C);
  auto w = moe_randn(rng, static_cast<size_t>(E) * C, 0.3f);
  auto b = moe_randn(rng, E, 0.1f);
  const size_t ME = static_cast<size_t>(M) * E;
  std::vector<float> lg(ME), nz(ME), pr(ME), lg_r(ME), nz_r(ME), pr_r(ME);
  std::vector<int> ch(M), ch_r(M);
  Rng r1(3), r2(3);
  moe_router_forward(lg.data(), nz.data(), pr.data(), ch.data(), x.data(), w.data(), b.data(), M, C, E, 0.5f, &r1);
  moe_router_forward_ref(lg_r.data(), nz_r.data(), pr_r.data(), ch_r.data(), x.data(), w.data(), b.data(), M, C, E,
                         0.5f, &r2);
  EXPECT_LE(moe_nerr(pr, pr_r), 1e-5);
  int mism = 0;
  for (int t = 0; t < M; ++t) mism += ch[t] != ch_r[t] && moe_margin(&nz_r[static_cast<size_t>(t) * E], E) > 1e-4f;
  EXPECT_EQ(mism, 0);
  std::vector<float> dp(ME, 0.f), dl(ME, 0.f), dp_r(ME, 0.f), dl_r(ME, 0.f);
  const float L = moe_lb_loss_forward(nullptr, nullptr, pr_r.data(), lg_r.data(), nz_r.data(), ch_r.data(), nullptr,
                                      M, E, 0.5f);
  const float L_r = moe_lb_loss_forward_ref(nullptr, nullptr, pr_r.data(), lg_r.data(), nz_r.data(), ch_r.data(),
                                            nullptr, M, E, 0.5f);
  EXPECT_NEAR(L, L_r, 1e-5 * std::max(1.0f, L_r));
  moe_lb_loss_backward(dp.data(), dl.data(), pr_r.data(), lg_r.data(), nz_r.data(), ch_r.data(), nullptr, M, E, 0.5f,
                       0.01f);
  moe_lb_loss_backward_ref(dp_r.data(), dl_r.data(), pr_r.data(), lg_r.data(), nz_r.data(), ch_r.data(), nullptr, M,
                           E, 0.5f, 0.01f);
  EXPECT_LE(moe_nerr(dp, dp_r), 1e-5);
  EXPECT_LE(moe_nerr(dl, dl_r), 1e-5);
  auto dprobs = moe_randn(rng, ME);
  std::vector<float> dx(static_cast<size_t>(M) * C, 0.f), dx_r = dx, dw(w.size(), 0.f), dw_r = dw, db(E, 0.f),
      db_r = db;
  moe_router_backward(dx.data(), dw.data(), db.data(), dl.data(), dprobs.data(), pr_r.data(), x.data(), w.data(), M,
                      C, E);
  moe_router_backward_ref(dx_r.data(), dw_r.data(), db_r.data(), dl_r.data(), dprobs.data(), pr_r.data(), x.data(),
                          w.data(), M, C, E);
  EXPECT_LE(moe_nerr(dx, dx_r), 1e-5);
  EXPECT_LE(moe_nerr(dw, dw_r), 1e-5);
  EXPECT_LE(moe_nerr(db, db_r), 1e-5);
  std::vector<int> counts(E), offsets(E + 1), idx(M);
  moe_route(counts.data(), offsets.data(), idx.data(), ch_r.data(), M, E);
  auto dy = moe_randn(rng, static_cast<size_t>(M) * F);
  std::vector<float> y(static_cast<size_t>(M) * F), y_r = y, gx(static_cast<size_t>(M) * C, 0.f), gx_r = gx;
  std::vector<float> ds(M, 0.f), ds_r(M, 0.f);
  for (int e = 0; e < E; ++e) {
    const int n = counts[e];
    const int* ie = idx.data() + offsets[e];
    std::vector<float> xg(static_cast<size_t>(n) * C), xg_r(xg.size());
    moe_gather(xg.data(), x.data(), ie, n, C);
    moe_gather_ref(xg_r.data(), x.data(), ie, n, C);
    EXPECT_EQ(xg, xg_r);
    auto yg = moe_randn(rng, static_cast<size_t>(n) * F);
    moe_scatter(y.data(), yg.data(), ie, pr_r.data(), n, F);  // any per-token scale will do
    moe_scatter_ref(y_r.data(), yg.data(), ie, pr_r.data(), n, F);
    moe_gather_backward(gx.data(), xg.data(), ie, n, C);
    moe_gather_backward_ref(gx_r.data(), xg.data(), ie, n, C);
    std::vector<float> dyg(yg.size(), 0.f), dyg_r = dyg;
    moe_scatter_backward(dyg.data(), ds.data(), dy.data(), yg.data(), ie, pr_r.data(), n, F);
    moe_scatter_backward_ref(dyg_r.data(), ds_r.data(), dy.data(), yg.data(), ie, pr_r.data(), n, F);
    EXPECT_EQ(dyg, dyg_r);
  }
  EXPECT_EQ(y, y_r);
  EXPECT_EQ(gx, x);  // every token gathered exactly once
  EXPECT_EQ(gx, gx_r);
  EXPECT_LE(moe_nerr(ds, ds_r), 1e-6);
}

// ============================== the whole MoE layer ==============================

TEST(Moe, LayerForwardMatchesPerTokenReference) {
  for (int E : {2, 3})
    for (int M : kRows)
      for (MoeGateMode mode : {moe_gate_prob, moe_gate_straight_through}) {
        Rng rng(300 + M + 10 * E);
        const int C = 11, F = 7;
        MoeLayer L = moe_make_layer(rng, M, C, F, E);
        auto x = moe_randn(rng, static_cast<size_t>(M) * C);
        MoeFwd f;
        moe_layer_forward(L, x, mode, f);
        // plain per-token loop: router, softmax, argmax, chosen expert, gate
        std::vector<float> y_ref(static_cast<size_t>(M) * F);
        for (int t = 0; t < M; ++t) {
          std::vector<double> lg(E);
          for (int e = 0; e < E; ++e) {
            lg[e] = L.br[e];
            for (int c = 0; c < C; ++c) lg[e] += static_cast<double>(x[static_cast<size_t>(t) * C + c]) * L.wr[e * C + c];
          }
          const int k = static_cast<int>(std::max_element(lg.begin(), lg.end()) - lg.begin());
          double sum = 0.0;
          for (int e = 0; e < E; ++e) sum += std::exp(lg[e] - lg[k]);
          const double p = 1.0 / sum;
          ASSERT_EQ(f.choice[t], k) << "t=" << t;
          for (int o = 0; o < F; ++o) {
            double acc = L.be[k][o];
            for (int c = 0; c < C; ++c)
              acc += static_cast<double>(x[static_cast<size_t>(t) * C + c]) * L.we[k][static_cast<size_t>(o) * C + c];
            y_ref[static_cast<size_t>(t) * F + o] = static_cast<float>((mode == moe_gate_prob ? p : 1.0) * acc);
          }
        }
        EXPECT_LE(moe_nerr(f.y, y_ref), 1e-5) << "M=" << M << " E=" << E << " mode=" << mode;
      }
}

TEST(Moe, LayerGradientsMatchFiniteDifferences) {
  for (int E : {2, 3})
    for (MoeGateMode mode : {moe_gate_prob, moe_gate_straight_through}) {
      Rng rng(400 + E);
      const int M = 13, C = 7, F = 5;
      MoeLayer L = moe_make_layer(rng, M, C, F, E);
      auto x = moe_randn(rng, static_cast<size_t>(M) * C);
      // Keep every token clear of a routing tie so that a 1e-3 perturbation never flips a choice.
      MoeFwd f0;
      for (int attempt = 0; attempt < 200; ++attempt) {
        moe_layer_forward(L, x, mode, f0);
        bool ok = true;
        for (int t = 0; t < M; ++t)
          if (moe_margin(&f0.logits[static_cast<size_t>(t) * E], E) < 0.1f) {
            ok = false;
            for (int c = 0; c < C; ++c) x[static_cast<size_t>(t) * C + c] = rng.normal();
          }
        if (ok) break;
      }
      for (int t = 0; t < M; ++t) ASSERT_GE(moe_margin(&f0.logits[static_cast<size_t>(t) * E], E), 0.1f);
      auto R = moe_randn(rng, static_cast<size_t>(M) * F);
      MoeGrads g = moe_layer_backward(L, x, f0, R, mode);
      // Straight-through: the gradient is that of the surrogate with scale = p / p0, p0 frozen.
      const std::vector<float>* p0 = (mode == moe_gate_straight_through) ? &f0.probs : nullptr;
      int flips = 0;
      auto loss = [&](const MoeLayer& Lp, const std::vector<float>& xp) {
        MoeFwd f;
        moe_layer_forward(Lp, xp, mode, f, p0);
        flips += f.choice != f0.choice;
        return moe_dot(f.y, R);
      };
      const float h = 1e-3f;
      auto fd = [&](std::vector<float>& v, std::function<double()> L_of) {
        std::vector<float> out(v.size());
        for (size_t i = 0; i < v.size(); ++i) {
          const float keep = v[i];
          v[i] = keep + h;
          const double lp = L_of();
          v[i] = keep - h;
          const double lm = L_of();
          v[i] = keep;
          out[i] = static_cast<float>((lp - lm) / (2.0 * h));
        }
        return out;
      };
      MoeLayer Lp = L;
      auto xp = x;
      auto L_now = [&]() { return loss(Lp, xp); };
      const double tol = 5e-3;
      EXPECT_LE(moe_nerr(g.dx, fd(xp, L_now)), tol) << "dx E=" << E << " mode=" << mode;
      EXPECT_LE(moe_nerr(g.dwr, fd(Lp.wr, L_now)), tol) << "dW_r E=" << E << " mode=" << mode;
      EXPECT_LE(moe_nerr(g.dbr, fd(Lp.br, L_now)), tol) << "db_r E=" << E << " mode=" << mode;
      for (int e = 0; e < E; ++e) {
        if (f0.counts[e] == 0) continue;
        EXPECT_LE(moe_nerr(g.dwe[e], fd(Lp.we[e], L_now)), tol) << "dW_" << e << " mode=" << mode;
        EXPECT_LE(moe_nerr(g.dbe[e], fd(Lp.be[e], L_now)), tol) << "db_" << e << " mode=" << mode;
      }
      EXPECT_EQ(flips, 0) << "a perturbation changed the routing";
      // The router must actually receive gradient (the release's constant gate would give zero).
      double gr = 0.0;
      for (float v : g.dwr) gr = std::max(gr, std::fabs(static_cast<double>(v)));
      EXPECT_GT(gr, 1e-3);
    }
}

// ============================== load-balancing loss ==============================

TEST(Moe, LbLossKnownValues) {
  // E = 2, two tokens, probs rows (0.25, 0.75) and (0.25, 0.75): Importance = (0.5, 1.5), mean 1, unbiased
  // var 0.5, CV2 = 0.5. Hard load with choices (1, 1): Load = (0, 2), CV2 = 2 / 1 = 2.
  std::vector<float> probs = {0.25f, 0.75f, 0.25f, 0.75f};
  std::vector<int> choice = {1, 1};
  std::vector<float> imp(2), load(2);
  float L = moe_lb_loss_forward(imp.data(), load.data(), probs.data(), nullptr, nullptr, choice.data(), nullptr, 2,
                                2, 0.0f);
  EXPECT_NEAR(L, 2.5f, 1e-6f);
  EXPECT_EQ(imp, (std::vector<float>{0.5f, 1.5f}));
  EXPECT_EQ(load, (std::vector<float>{0.0f, 2.0f}));
  // alpha = (3, 1): alpha*Importance = (1.5, 1.5) is balanced, alpha*Load = (0, 2) is not.
  std::vector<float> alpha = {3.0f, 1.0f};
  L = moe_lb_loss_forward(nullptr, nullptr, probs.data(), nullptr, nullptr, choice.data(), alpha.data(), 2, 2, 0.0f);
  EXPECT_NEAR(L, 2.0f, 1e-6f);
  // One expert: nothing to balance.
  std::vector<float> p1 = {1.0f, 1.0f};
  std::vector<int> c1 = {0, 0};
  EXPECT_EQ(moe_lb_loss_forward(nullptr, nullptr, p1.data(), nullptr, nullptr, c1.data(), nullptr, 2, 1, 0.0f), 0.0f);
}

TEST(Moe, LbLossFastMatchesRef) {
  for (int E : {2, 3, 4})
    for (int M : kRows)
      for (float noise : {0.0f, 0.5f}) {
        Rng rng(500 + M + E);
        const size_t ME = static_cast<size_t>(M) * E;
        auto lg = moe_randn(rng, ME);
        std::vector<float> nz(ME), pr(ME);
        std::vector<int> ch(M);
        for (size_t i = 0; i < ME; ++i) nz[i] = lg[i] + noise * rng.normal();
        for (int t = 0; t < M; ++t) {
          const float* z = &nz[static_cast<size_t>(t) * E];
          ch[t] = static_cast<int>(std::max_element(z, z + E) - z);
          double s = 0.0;
          for (int e = 0; e < E; ++e) s += std::exp(z[e] - z[ch[t]]);
          for (int e = 0; e < E; ++e) pr[static_cast<size_t>(t) * E + e] = static_cast<float>(std::exp(z[e] - z[ch[t]]) / s);
        }
        std::vector<float> alpha(E);
        for (int e = 0; e < E; ++e) alpha[e] = 1.0f + e;
        std::vector<float> imp(E), ld(E), imp_r(E), ld_r(E);
        const float L = moe_lb_loss_forward(imp.data(), ld.data(), pr.data(), lg.data(), nz.data(), ch.data(),
                                            alpha.data(), M, E, noise);
        const float L_r = moe_lb_loss_forward_ref(imp_r.data(), ld_r.data(), pr.data(), lg.data(), nz.data(),
                                                  ch.data(), alpha.data(), M, E, noise);
        EXPECT_NEAR(L, L_r, 1e-5 * std::max(1.0f, std::fabs(L_r))) << "M=" << M << " E=" << E;
        EXPECT_LE(moe_nerr(imp, imp_r), 1e-6);
        EXPECT_LE(moe_nerr(ld, ld_r), 1e-6);
        std::vector<float> dp = moe_randn(rng, ME), dp_r = dp, dl = moe_randn(rng, ME), dl_r = dl;
        moe_lb_loss_backward(dp.data(), dl.data(), pr.data(), lg.data(), nz.data(), ch.data(), alpha.data(), M, E,
                             noise, 0.37f);
        moe_lb_loss_backward_ref(dp_r.data(), dl_r.data(), pr.data(), lg.data(), nz.data(), ch.data(), alpha.data(),
                                 M, E, noise, 0.37f);
        EXPECT_LE(moe_nerr(dp, dp_r), 1e-5) << "dprobs M=" << M << " E=" << E;
        EXPECT_LE(moe_nerr(dl, dl_r), 1e-5) << "dlogits M=" << M << " E=" << E;
      }
}

TEST(Moe, LbLossGradientMatchesFiniteDifferences) {
  // L(logits) with the noise held fixed: noisy = logits + n, probs = softmax(noisy); both the Importance
  // path (through the softmax) and the smooth Load path (through Phi and the threshold) are checked.
  for (int E : {2, 3})
    for (float noise : {0.5f, 0.0f}) {
      Rng rng(600 + E);
      const int M = 13;
      const size_t ME = static_cast<size_t>(M) * E;
      auto lg = moe_randn(rng, ME);
      auto n = moe_randn(rng, ME, noise);
      std::vector<float> alpha = {2.0f, 1.0f, 1.5f};
      auto eval = [&](const std::vector<float>& l, std::vector<float>* nz_out, std::vector<float>* pr_out,
                      std::vector<int>* ch_out) {
        std::vector<float> nz(ME), pr(ME);
        std::vector<int> ch(M);
        for (size_t i = 0; i < ME; ++i) nz[i] = l[i] + n[i];
        for (int t = 0; t < M; ++t) {
          const float* z = &nz[static_cast<size_t>(t) * E];
          ch[t] = static_cast<int>(std::max_element(z, z + E) - z);
          double s = 0.0;
          for (int e = 0; e < E; ++e) s += std::exp(static_cast<double>(z[e]) - z[ch[t]]);
          for (int e = 0; e < E; ++e)
            pr[static_cast<size_t>(t) * E + e] = static_cast<float>(std::exp(static_cast<double>(z[e]) - z[ch[t]]) / s);
        }
        const double L =
            moe_lb_loss_forward_ref(nullptr, nullptr, pr.data(), l.data(), nz.data(), ch.data(), alpha.data(), M, E, noise);
        if (nz_out) *nz_out = nz;
        if (pr_out) *pr_out = pr;
        if (ch_out) *ch_out = ch;
        return L;
      };
      std::vector<float> nz, pr;
      std::vector<int> ch;
      eval(lg, &nz, &pr, &ch);
      std::vector<float> dprobs(ME, 0.f), dlogits(ME, 0.f);
      moe_lb_loss_backward(dprobs.data(), dlogits.data(), pr.data(), lg.data(), nz.data(), ch.data(), alpha.data(), M,
                           E, noise, 1.0f);
      // through the softmax (router backward with no x/w gradients)
      moe_router_backward(nullptr, nullptr, nullptr, dlogits.data(), dprobs.data(), pr.data(), nullptr, nullptr, M, 1,
                          E);
      std::vector<float> num(ME);
      const float h = 1e-3f;
      auto l = lg;
      for (size_t i = 0; i < ME; ++i) {
        const float keep = l[i];
        l[i] = keep + h;
        const double lp = eval(l, nullptr, nullptr, nullptr);
        l[i] = keep - h;
        const double lm = eval(l, nullptr, nullptr, nullptr);
        l[i] = keep;
        num[i] = static_cast<float>((lp - lm) / (2.0 * h));
      }
      EXPECT_LE(moe_nerr(dlogits, num), 5e-3) << "E=" << E << " noise=" << noise;
      double mx = 0.0;
      for (float v : num) mx = std::max(mx, std::fabs(static_cast<double>(v)));
      EXPECT_GT(mx, 1e-3) << "the check must see a non-zero gradient";
    }
}

TEST(Moe, LbLossLatencyFactorsMoveSharesToFasterExpert) {
  // Minimise L_lb alone by plain gradient descent on the router (noisy training routing), for
  // alpha = (2, 1) (expert 1 twice as fast) and (1, 2) (expert 0 faster); the share of expert 1 at eval
  // must follow the faster expert.
  const int M = 256, C = 8, E = 2, steps = 300;
  const float lr = 0.05f, noise = moe_default_noise_std(E);
  Rng data_rng(31);
  const auto x = moe_randn(data_rng, static_cast<size_t>(M) * C);
  const size_t ME = static_cast<size_t>(M) * E;
  auto train = [&](std::vector<float> alpha, float* smooth_share1) {
    Rng rng(77);
    auto w = moe_randn(rng, static_cast<size_t>(E) * C, 0.01f);
    std::vector<float> b(E, 0.f);
    std::vector<float> lg(ME), nz(ME), pr(ME), ld(E);
    std::vector<int> ch(M);
    for (int s = 0; s < steps; ++s) {
      moe_router_forward(lg.data(), nz.data(), pr.data(), ch.data(), x.data(), w.data(), b.data(), M, C, E, noise,
                         &rng);
      std::vector<float> dp(ME, 0.f), dl(ME, 0.f), dw(w.size(), 0.f), db(E, 0.f);
      moe_lb_loss_backward(dp.data(), dl.data(), pr.data(), lg.data(), nz.data(), ch.data(), alpha.data(), M, E, noise,
                           1.0f);
      moe_router_backward(nullptr, dw.data(), db.data(), dl.data(), dp.data(), pr.data(), x.data(), w.data(), M, C, E);
      for (size_t i = 0; i < w.size(); ++i) w[i] -= lr * dw[i];
      for (int e = 0; e < E; ++e) b[e] -= lr * db[e];
    }
    moe_router_forward(lg.data(), nz.data(), pr.data(), ch.data(), x.data(), w.data(), b.data(), M, C, E, noise, &rng);
    moe_lb_loss_forward(nullptr, ld.data(), pr.data(), lg.data(), nz.data(), ch.data(), alpha.data(), M, E, noise);
    *smooth_share1 = ld[1] / (ld[0] + ld[1]);
    // eval routing: no noise, hard counts
    moe_router_forward(lg.data(), nz.data(), pr.data(), ch.data(), x.data(), w.data(), b.data(), M, C, E, 0.0f,
                       nullptr);
    std::vector<int> counts(E), offsets(E + 1), idx(M);
    moe_route(counts.data(), offsets.data(), idx.data(), ch.data(), M, E);
    MoeShares sh = moe_shares(counts.data(), E);
    EXPECT_EQ(sh.tokens, M);
    return sh;
  };
  float smooth_a = 0.f, smooth_b = 0.f;
  MoeShares a = train({2.0f, 1.0f}, &smooth_a);
  MoeShares b = train({1.0f, 2.0f}, &smooth_b);
  RecordProperty("shares_alpha_2_1", moe_shares_str(a));
  RecordProperty("shares_alpha_1_2", moe_shares_str(b));
  std::printf("alpha (2,1): %s  smooth share1 %.3f\nalpha (1,2): %s  smooth share1 %.3f\n", moe_shares_str(a).c_str(),
              smooth_a, moe_shares_str(b).c_str(), smooth_b);
  EXPECT_GT(a.shares[1], 0.55f);
  EXPECT_LT(b.shares[1], 0.45f);
  EXPECT_GT(a.shares[1] - b.shares[1], 0.2f);
  EXPECT_GT(smooth_a, 0.55f);
  EXPECT_LT(smooth_b, 0.45f);
}

TEST(Moe, SharesReport) {
  std::vector<int> counts = {3, 1};
  MoeShares s = moe_shares(counts.data(), 2);
  EXPECT_EQ(s.tokens, 4);
  EXPECT_FLOAT_EQ(s.shares[0], 0.75f);
  EXPECT_FLOAT_EQ(s.shares[1], 0.25f);
  EXPECT_EQ(moe_shares_str(s), "e0 3 (75.0%)  e1 1 (25.0%)");
  std::vector<int> zero = {0, 0, 0};
  MoeShares z = moe_shares(zero.data(), 3);
  EXPECT_EQ(z.tokens, 0);
  EXPECT_EQ(z.shares, (std::vector<float>{0.f, 0.f, 0.f}));
}
