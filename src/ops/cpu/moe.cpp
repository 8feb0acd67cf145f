// shiftaddvit: mixture-of-experts plumbing on the CPU: router, top-1 dispatch, gate scaling and the
// latency-aware load-balancing loss. Formulas and shapes: moe.h.
//
// Fast paths: the router's two dense products go through sgemm; row-wise work (softmax, gather, scatter,
// per-token loss gradients) is OpenMP over rows, each row owned by one thread. Sums over tokens (bias
// gradient, Importance, Load) run serially in double so results do not depend on the thread count.
// The gate noise is drawn serially in (t, e) order in both paths.
#include "ops/cpu/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>

#include "core/blas.h"
#include "core/error.h"
#include "ops/cpu/moe_cv2.h"

namespace sav::cpu {

namespace {

constexpr int64_t kParallelElems = 1 << 15;  // below this an OpenMP region costs more than it saves

void check_router(const float* logits, const float* noisy, const float* probs, const int* choice, const float* x,
                  const float* w, int M, int C, int E, float noise_std, const Rng* rng) {
  SAV_CHECK(M >= 0, "moe router: M (tokens) must be non-negative, got " << M);
  SAV_CHECK(C > 0, "moe router: C (in-features) must be positive, got " << C);
  SAV_CHECK(E > 0, "moe router: E (experts) must be positive, got " << E);
  SAV_CHECK(noise_std >= 0.0f && std::isfinite(noise_std),
            "moe router: noise_std must be finite and >= 0 (0 at eval), got " << noise_std);
  SAV_CHECK(noise_std == 0.0f || rng != nullptr, "moe router: gate noise needs an Rng; pass noise_std = 0 at eval");
  if (M == 0) return;
  SAV_CHECK(logits && noisy && probs && choice && x && w,
            "moe router: logits, noisy, probs, choice, x and w must all be given");
}

void check_lb(const float* probs, const float* logits, const float* noisy, const int* choice, int M, int E,
              float noise_std) {
  SAV_CHECK(M >= 0, "moe lb loss: M (tokens) must be non-negative, got " << M);
  SAV_CHECK(E > 0, "moe lb loss: E (experts) must be positive, got " << E);
  SAV_CHECK(std::isfinite(noise_std), "moe lb loss: noise_std must be finite, got " << noise_std);
  if (M == 0) return;
  SAV_CHECK(probs, "moe lb loss: probs must be given");
  if (noise_std > 0.0f)
    SAV_CHECK(logits && noisy, "moe lb loss: the smooth load (noise_std > 0) needs the clean and noisy logits");
  else
    SAV_CHECK(choice, "moe lb loss: the hard load (noise_std == 0) needs the choices");
}

// Noise is added serially so that a seed fixes the routing whatever the thread count.
void add_noise(float* noisy, const float* logits, int64_t n, float noise_std, Rng* rng) {
  if (noise_std > 0.0f) {
    for (int64_t i = 0; i < n; ++i) noisy[i] = logits[i] + noise_std * rng->normal();
  } else {
    std::memcpy(noisy, logits, sizeof(float) * n);
  }
}

// Softmax of one row and its argmax (lowest index on ties).
inline int softmax_argmax_row(float* p, const float* z, int E) {
  int best = 0;
  for (int e = 1; e < E; ++e)
    if (z[e] > z[best]) best = e;
  const float mx = z[best];
  float sum = 0.0f;
  for (int e = 0; e < E; ++e) {
    p[e] = std::exp(z[e] - mx);
    sum += p[e];
  }
  const float inv = 1.0f / sum;
  for (int e = 0; e < E; ++e) p[e] *= inv;
  return best;
}

double normal_cdf(double u) { return 0.5 * std::erfc(-u * 0.70710678118654752440); }
double normal_pdf(double u) { return 0.39894228040143267794 * std::exp(-0.5 * u * u); }

// Top-1 and top-2 indices of a row (lowest index on ties); top2 = -1 when E == 1.
inline void top2_row(const float* z, int E, int* top1, int* top2) {
  int a = 0;
  for (int e = 1; e < E; ++e)
    if (z[e] > z[a]) a = e;
  int b = -1;
  for (int e = 0; e < E; ++e)
    if (e != a && (b < 0 || z[e] > z[b])) b = e;
  *top1 = a;
  *top2 = b;
}

// Importance and Load (before alpha), in double; serial sums over tokens.
void importance_load(double* imp, double* load, const float* probs, const float* logits, const float* noisy,
                     const int* choice, int M, int E, float noise_std) {
  std::fill(imp, imp + E, 0.0);
  std::fill(load, load + E, 0.0);
  for (int t = 0; t < M; ++t)
    for (int e = 0; e < E; ++e) imp[e] += probs[static_cast<int64_t>(t) * E + e];
  if (noise_std > 0.0f) {
    const double s = noise_std;
    for (int t = 0; t < M; ++t) {
      const float* l = logits + static_cast<int64_t>(t) * E;
      const float* z = noisy + static_cast<int64_t>(t) * E;
      int a, b;
      top2_row(z, E, &a, &b);
      for (int e = 0; e < E; ++e) {
        const int k = (e == a) ? b : a;
        load[e] += (k < 0) ? 1.0 : normal_cdf((static_cast<double>(l[e]) - z[k]) / s);
      }
    }
  } else {
    for (int t = 0; t < M; ++t) {
      SAV_CHECK(choice[t] >= 0 && choice[t] < E, "moe lb loss: choice[" << t << "] = " << choice[t]
                                                     << " is not an expert index in [0, " << E << ")");
      load[choice[t]] += 1.0;
    }
  }
}

void scaled(double* z, const double* v, const float* alpha, int E) {
  for (int e = 0; e < E; ++e) z[e] = v[e] * (alpha ? static_cast<double>(alpha[e]) : 1.0);
}

}  // namespace

// ============================== router ==============================

void moe_router_forward_ref(float* logits, float* noisy, float* probs, int* choice, const float* x,
                            const float* w, const float* b, int M, int C, int E, float noise_std, Rng* rng) {
  check_router(logits, noisy, probs, choice, x, w, M, C, E, noise_std, rng);
  for (int t = 0; t < M; ++t)
    for (int e = 0; e < E; ++e) {
      double acc = b ? b[e] : 0.0;
      for (int c = 0; c < C; ++c)
        acc += static_cast<double>(x[static_cast<int64_t>(t) * C + c]) * w[static_cast<int64_t>(e) * C + c];
      logits[static_cast<int64_t>(t) * E + e] = static_cast<float>(acc);
    }
  add_noise(noisy, logits, static_cast<int64_t>(M) * E, noise_std, rng);
  for (int t = 0; t < M; ++t) {
    const float* z = noisy + static_cast<int64_t>(t) * E;
    float* p = probs + static_cast<int64_t>(t) * E;
    int best = 0;
    for (int e = 1; e < E; ++e)
      if (z[e] > z[best]) best = e;
    const double mx = z[best];
    double sum = 0.0;
    for (int e = 0; e < E; ++e) sum += std::exp(static_cast<double>(z[e]) - mx);
    for (int e = 0; e < E; ++e) p[e] = static_cast<float>(std::exp(static_cast<double>(z[e]) - mx) / sum);
    choice[t] = best;
  }
}

void moe_router_forward(float* logits, float* noisy, float* probs, int* choice, const float* x, const float* w,
                        const float* b, int M, int C, int E, float noise_std, Rng* rng) {
  check_router(logits, noisy, probs, choice, x, w, M, C, E, noise_std, rng);
  if (M == 0) return;
  sgemm(false, true, M, E, C, 1.0f, x, C, w, C, 0.0f, logits, E);
  if (b)
    for (int t = 0; t < M; ++t)
      for (int e = 0; e < E; ++e) logits[static_cast<int64_t>(t) * E + e] += b[e];
  add_noise(noisy, logits, static_cast<int64_t>(M) * E, noise_std, rng);
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * E >= kParallelElems)
  for (int t = 0; t < M; ++t)
    choice[t] = softmax_argmax_row(probs + static_cast<int64_t>(t) * E, noisy + static_cast<int64_t>(t) * E, E);
}

void moe_router_backward_ref(float* dx, float* dw, float* db, float* dlogits, const float* dprobs,
                             const float* probs, const float* x, const float* w, int M, int C, int E) {
  SAV_CHECK(M >= 0 && C > 0 && E > 0, "moe router backward: bad shape M=" << M << " C=" << C << " E=" << E);
  if (M == 0) return;
  SAV_CHECK(dlogits && probs, "moe router backward: dlogits (work space) and probs must be given");
  if (dprobs) {
    for (int t = 0; t < M; ++t) {
      const float* p = probs + static_cast<int64_t>(t) * E;
      const float* dp = dprobs + static_cast<int64_t>(t) * E;
      double dot = 0.0;
      for (int e = 0; e < E; ++e) dot += static_cast<double>(p[e]) * dp[e];
      for (int e = 0; e < E; ++e) dlogits[static_cast<int64_t>(t) * E + e] += static_cast<float>(p[e] * (dp[e] - dot));
    }
  }
  if (dx) {
    SAV_CHECK(w, "moe router backward: dx needs w");
    for (int t = 0; t < M; ++t)
      for (int c = 0; c < C; ++c) {
        double acc = 0.0;
        for (int e = 0; e < E; ++e)
          acc += static_cast<double>(dlogits[static_cast<int64_t>(t) * E + e]) * w[static_cast<int64_t>(e) * C + c];
        dx[static_cast<int64_t>(t) * C + c] += static_cast<float>(acc);
      }
  }
  if (dw) {
    SAV_CHECK(x, "moe router backward: dw needs x");
    for (int e = 0; e < E; ++e)
      for (int c = 0; c < C; ++c) {
        double acc = 0.0;
        for (int t = 0; t < M; ++t)
          acc += static_cast<double>(dlogits[static_cast<int64_t>(t) * E + e]) * x[static_cast<int64_t>(t) * C + c];
        dw[static_cast<int64_t>(e) * C + c] += static_cast<float>(acc);
      }
  }
  if (db) {
    for (int e = 0; e < E; ++e) {
      double acc = 0.0;
      for (int t = 0; t < M; ++t) acc += dlogits[static_cast<int64_t>(t) * E + e];
      db[e] += static_cast<float>(acc);
    }
  }
}

void moe_router_backward(float* dx, float* dw, float* db, float* dlogits, const float* dprobs, const float* probs,
                         const float* x, const float* w, int M, int C, int E) {
  SAV_CHECK(M >= 0 && C > 0 && E > 0, "moe router backward: bad shape M=" << M << " C=" << C << " E=" << E);
  if (M == 0) return;
  SAV_CHECK(dlogits && probs, "moe router backward: dlogits (work space) and probs must be given");
  if (dprobs) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * E >= kParallelElems)
    for (int t = 0; t < M; ++t) {
      const float* p = probs + static_cast<int64_t>(t) * E;
      const float* dp = dprobs + static_cast<int64_t>(t) * E;
      float* dl = dlogits + static_cast<int64_t>(t) * E;
      float dot = 0.0f;
      for (int e = 0; e < E; ++e) dot += p[e] * dp[e];
      for (int e = 0; e < E; ++e) dl[e] += p[e] * (dp[e] - dot);
    }
  }
  if (dx) {
    SAV_CHECK(w, "moe router backward: dx needs w");
    sgemm(false, false, M, C, E, 1.0f, dlogits, E, w, C, 1.0f, dx, C);
  }
  if (dw) {
    SAV_CHECK(x, "moe router backward: dw needs x");
    sgemm(true, false, E, C, M, 1.0f, dlogits, E, x, C, 1.0f, dw, C);
  }
  if (db) {
    std::vector<double> acc(E, 0.0);
    for (int t = 0; t < M; ++t)
      for (int e = 0; e < E; ++e) acc[e] += dlogits[static_cast<int64_t>(t) * E + e];
    for (int e = 0; e < E; ++e) db[e] += static_cast<float>(acc[e]);
  }
}

// ============================== dispatch ==============================

void moe_route_ref(int* counts, int* offsets, int* idx, const int* choice, int M, int E) {
  SAV_CHECK(M >= 0 && E > 0, "moe_route: bad shape M=" << M << " E=" << E);
  SAV_CHECK(counts && offsets && (M == 0 || (idx && choice)), "moe_route: counts, offsets, idx, choice needed");
  for (int t = 0; t < M; ++t)
    SAV_CHECK(choice[t] >= 0 && choice[t] < E,
              "moe_route: choice[" << t << "] = " << choice[t] << " is not an expert index in [0, " << E << ")");
  int r = 0;
  for (int e = 0; e < E; ++e) {
    offsets[e] = r;
    for (int t = 0; t < M; ++t)
      if (choice[t] == e) idx[r++] = t;
    counts[e] = r - offsets[e];
  }
  offsets[E] = r;
}

void moe_route(int* counts, int* offsets, int* idx, const int* choice, int M, int E) {
  SAV_CHECK(M >= 0 && E > 0, "moe_route: bad shape M=" << M << " E=" << E);
  SAV_CHECK(counts && offsets && (M == 0 || (idx && choice)), "moe_route: counts, offsets, idx, choice needed");
  std::fill(counts, counts + E, 0);
  for (int t = 0; t < M; ++t) {
    const int e = choice[t];
    SAV_CHECK(e >= 0 && e < E, "moe_route: choice[" << t << "] = " << e << " is not an expert index in [0, " << E << ")");
    ++counts[e];
  }
  offsets[0] = 0;
  for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  std::vector<int> cursor(offsets, offsets + E);
  for (int t = 0; t < M; ++t) idx[cursor[choice[t]]++] = t;  // stable: tokens in increasing order
}

void moe_gather_ref(float* xg, const float* x, const int* idx, int count, int C) {
  SAV_CHECK(count >= 0 && C > 0, "moe_gather: bad shape count=" << count << " C=" << C);
  for (int r = 0; r < count; ++r)
    for (int c = 0; c < C; ++c) xg[static_cast<int64_t>(r) * C + c] = x[static_cast<int64_t>(idx[r]) * C + c];
}

void moe_gather(float* xg, const float* x, const int* idx, int count, int C) {
  SAV_CHECK(count >= 0 && C > 0, "moe_gather: bad shape count=" << count << " C=" << C);
  if (count == 0) return;
  SAV_CHECK(xg && x && idx, "moe_gather: xg, x, idx must be given");
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(count) * C >= kParallelElems)
  for (int r = 0; r < count; ++r)
    std::memcpy(xg + static_cast<int64_t>(r) * C, x + static_cast<int64_t>(idx[r]) * C, sizeof(float) * C);
}

void moe_gather_backward_ref(float* dx, const float* dxg, const int* idx, int count, int C) {
  SAV_CHECK(count >= 0 && C > 0, "moe_gather_backward: bad shape count=" << count << " C=" << C);
  if (!dx) return;
  for (int r = 0; r < count; ++r)
    for (int c = 0; c < C; ++c) dx[static_cast<int64_t>(idx[r]) * C + c] += dxg[static_cast<int64_t>(r) * C + c];
}

void moe_gather_backward(float* dx, const float* dxg, const int* idx, int count, int C) {
  SAV_CHECK(count >= 0 && C > 0, "moe_gather_backward: bad shape count=" << count << " C=" << C);
  if (!dx || count == 0) return;
  SAV_CHECK(dxg && idx, "moe_gather_backward: dxg and idx must be given");
  // idx holds distinct tokens (a slice of a permutation), so rows never collide across threads.
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(count) * C >= kParallelElems)
  for (int r = 0; r < count; ++r) {
    float* d = dx + static_cast<int64_t>(idx[r]) * C;
    const float* s = dxg + static_cast<int64_t>(r) * C;
#pragma omp simd
    for (int c = 0; c < C; ++c) d[c] += s[c];
  }
}

void moe_scatter_ref(float* y, const float* yg, const int* idx, const float* gate_scale, int count, int F) {
  SAV_CHECK(count >= 0 && F > 0, "moe_scatter: bad shape count=" << count << " F=" << F);
  for (int r = 0; r < count; ++r) {
    const int t = idx[r];
    const float s = gate_scale ? gate_scale[t] : 1.0f;
    for (int f = 0; f < F; ++f) y[static_cast<int64_t>(t) * F + f] = s * yg[static_cast<int64_t>(r) * F + f];
  }
}

void moe_scatter(float* y, const float* yg, const int* idx, const float* gate_scale, int count, int F) {
  SAV_CHECK(count >= 0 && F > 0, "moe_scatter: bad shape count=" << count << " F=" << F);
  if (count == 0) return;
  SAV_CHECK(y && yg && idx, "moe_scatter: y, yg, idx must be given");
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(count) * F >= kParallelElems)
  for (int r = 0; r < count; ++r) {
    const int t = idx[r];
    const float s = gate_scale ? gate_scale[t] : 1.0f;
    float* d = y + static_cast<int64_t>(t) * F;
    const float* g = yg + static_cast<int64_t>(r) * F;
#pragma omp simd
    for (int f = 0; f < F; ++f) d[f] = s * g[f];
  }
}

void moe_scatter_backward_ref(float* dyg, float* dscale, const float* dy, const float* yg, const int* idx,
                              const float* gate_scale, int count, int F) {
  SAV_CHECK(count >= 0 && F > 0, "moe_scatter_backward: bad shape count=" << count << " F=" << F);
  for (int r = 0; r < count; ++r) {
    const int t = idx[r];
    const float s = gate_scale ? gate_scale[t] : 1.0f;
    if (dyg)
      for (int f = 0; f < F; ++f) dyg[static_cast<int64_t>(r) * F + f] += s * dy[static_cast<int64_t>(t) * F + f];
    if (dscale) {
      double acc = 0.0;
      for (int f = 0; f < F; ++f)
        acc += static_cast<double>(dy[static_cast<int64_t>(t) * F + f]) * yg[static_cast<int64_t>(r) * F + f];
      dscale[t] += static_cast<float>(acc);
    }
  }
}

void moe_scatter_backward(float* dyg, float* dscale, const float* dy, const float* yg, const int* idx,
                          const float* gate_scale, int count, int F) {
  SAV_CHECK(count >= 0 && F > 0, "moe_scatter_backward: bad shape count=" << count << " F=" << F);
  if (count == 0 || (!dyg && !dscale)) return;
  SAV_CHECK(dy && idx, "moe_scatter_backward: dy and idx must be given");
  SAV_CHECK(!dscale || yg, "moe_scatter_backward: dscale needs yg");
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(count) * F >= kParallelElems)
  for (int r = 0; r < count; ++r) {
    const int t = idx[r];
    const float s = gate_scale ? gate_scale[t] : 1.0f;
    const float* d = dy + static_cast<int64_t>(t) * F;
    if (dyg) {
      float* o = dyg + static_cast<int64_t>(r) * F;
#pragma omp simd
      for (int f = 0; f < F; ++f) o[f] += s * d[f];
    }
    if (dscale) {
      const float* g = yg + static_cast<int64_t>(r) * F;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int f = 0; f < F; ++f) acc += d[f] * g[f];
      dscale[t] += acc;
    }
  }
}

// ============================== gate ==============================

void moe_gate_forward(float* scale, const float* probs, const int* choice, int M, int E, MoeGateMode mode) {
  SAV_CHECK(M >= 0 && E > 0, "moe_gate_forward: bad shape M=" << M << " E=" << E);
  SAV_CHECK(mode == moe_gate_prob || mode == moe_gate_straight_through,
            "moe_gate_forward: unknown gate mode " << static_cast<int>(mode));
  for (int t = 0; t < M; ++t) {
    SAV_CHECK(choice[t] >= 0 && choice[t] < E, "moe_gate_forward: choice[" << t << "] = " << choice[t]
                                                   << " is not an expert index in [0, " << E << ")");
    const float p = probs[static_cast<int64_t>(t) * E + choice[t]];
    // p / stop_grad(p) is exactly 1 for the chosen (largest, so positive) probability.
    scale[t] = (mode == moe_gate_prob) ? p : 1.0f;
  }
}

void moe_gate_backward(float* dprobs, const float* dscale, const float* probs, const int* choice, int M, int E,
                       MoeGateMode mode) {
  SAV_CHECK(M >= 0 && E > 0, "moe_gate_backward: bad shape M=" << M << " E=" << E);
  SAV_CHECK(mode == moe_gate_prob || mode == moe_gate_straight_through,
            "moe_gate_backward: unknown gate mode " << static_cast<int>(mode));
  if (!dprobs || M == 0) return;
  SAV_CHECK(dscale && probs && choice, "moe_gate_backward: dscale, probs, choice must be given");
  for (int t = 0; t < M; ++t) {
    const int64_t i = static_cast<int64_t>(t) * E + choice[t];
    dprobs[i] += (mode == moe_gate_prob) ? dscale[t] : dscale[t] / probs[i];
  }
}

// ============================== load-balancing loss ==============================

float moe_lb_loss_forward_ref(float* importance, float* load, const float* probs, const float* logits,
                              const float* noisy, const int* choice, const float* alpha, int M, int E,
                              float noise_std) {
  check_lb(probs, logits, noisy, choice, M, E, noise_std);
  std::vector<double> imp(E, 0.0), ld(E, 0.0), z(E);
  for (int e = 0; e < E; ++e)
    for (int t = 0; t < M; ++t) {
      imp[e] += probs[static_cast<int64_t>(t) * E + e];
      if (noise_std > 0.0f) {
        // threshold = the best noisy value among the other experts
        double thr = -std::numeric_limits<double>::infinity();
        for (int j = 0; j < E; ++j)
          if (j != e) thr = std::max(thr, static_cast<double>(noisy[static_cast<int64_t>(t) * E + j]));
        ld[e] += normal_cdf((logits[static_cast<int64_t>(t) * E + e] - thr) / noise_std);
      } else {
        ld[e] += (choice[t] == e) ? 1.0 : 0.0;
      }
    }
  for (int e = 0; e < E; ++e) {
    if (importance) importance[e] = static_cast<float>(imp[e]);
    if (load) load[e] = static_cast<float>(ld[e]);
  }
  scaled(z.data(), imp.data(), alpha, E);
  double L = moe_cv2(z.data(), E, nullptr);
  scaled(z.data(), ld.data(), alpha, E);
  L += moe_cv2(z.data(), E, nullptr);
  return static_cast<float>(L);
}

float moe_lb_loss_forward(float* importance, float* load, const float* probs, const float* logits,
                          const float* noisy, const int* choice, const float* alpha, int M, int E,
                          float noise_std) {
  check_lb(probs, logits, noisy, choice, M, E, noise_std);
  std::vector<double> imp(E), ld(E), z(E);
  importance_load(imp.data(), ld.data(), probs, logits, noisy, choice, M, E, noise_std);
  for (int e = 0; e < E; ++e) {
    if (importance) importance[e] = static_cast<float>(imp[e]);
    if (load) load[e] = static_cast<float>(ld[e]);
  }
  scaled(z.data(), imp.data(), alpha, E);
  double L = moe_cv2(z.data(), E, nullptr);
  scaled(z.data(), ld.data(), alpha, E);
  L += moe_cv2(z.data(), E, nullptr);
  return static_cast<float>(L);
}

void moe_lb_loss_backward_ref(float* dprobs, float* dlogits, const float* probs, const float* logits,
                              const float* noisy, const int* choice, const float* alpha, int M, int E,
                              float noise_std, float dloss) {
  check_lb(probs, logits, noisy, choice, M, E, noise_std);
  if (M == 0 || E < 2) return;
  std::vector<double> imp(E, 0.0), ld(E, 0.0), z(E), gi(E), gl(E);
  for (int t = 0; t < M; ++t)
    for (int e = 0; e < E; ++e) imp[e] += probs[static_cast<int64_t>(t) * E + e];
  const bool smooth = noise_std > 0.0f;
  auto thr_of = [&](int t, int e, int* k) {
    double thr = -std::numeric_limits<double>::infinity();
    *k = -1;
    for (int j = 0; j < E; ++j) {
      const double v = noisy[static_cast<int64_t>(t) * E + j];
      if (j != e && v > thr) {
        thr = v;
        *k = j;
      }
    }
    return thr;
  };
  if (!smooth) {
    scaled(z.data(), imp.data(), alpha, E);
    moe_cv2(z.data(), E, gi.data());
  } else {
    for (int t = 0; t < M; ++t)
      for (int e = 0; e < E; ++e) {
        int k;
        const double thr = thr_of(t, e, &k);
        ld[e] += normal_cdf((logits[static_cast<int64_t>(t) * E + e] - thr) / noise_std);
      }
    scaled(z.data(), imp.data(), alpha, E);
    moe_cv2(z.data(), E, gi.data());
    scaled(z.data(), ld.data(), alpha, E);
    moe_cv2(z.data(), E, gl.data());
  }
  for (int e = 0; e < E; ++e) {
    const double a = alpha ? alpha[e] : 1.0;
    gi[e] *= a * dloss;
    gl[e] *= a * dloss;
  }
  if (dprobs)
    for (int t = 0; t < M; ++t)
      for (int e = 0; e < E; ++e) dprobs[static_cast<int64_t>(t) * E + e] += static_cast<float>(gi[e]);
  if (dlogits && smooth)
    for (int t = 0; t < M; ++t)
      for (int e = 0; e < E; ++e) {
        int k;
        const double thr = thr_of(t, e, &k);
        const double u = (logits[static_cast<int64_t>(t) * E + e] - thr) / noise_std;
        const double d = gl[e] * normal_pdf(u) / noise_std;
        dlogits[static_cast<int64_t>(t) * E + e] += static_cast<float>(d);
        dlogits[static_cast<int64_t>(t) * E + k] -= static_cast<float>(d);
      }
}

void moe_lb_loss_backward(float* dprobs, float* dlogits, const float* probs, const float* logits,
                          const float* noisy, const int* choice, const float* alpha, int M, int E, float noise_std,
                          float dloss) {
  check_lb(probs, logits, noisy, choice, M, E, noise_std);
  if (M == 0 || E < 2) return;
  std::vector<double> imp(E), ld(E), z(E), gi(E), gl(E, 0.0);
  importance_load(imp.data(), ld.data(), probs, logits, noisy, choice, M, E, noise_std);
  const bool smooth = noise_std > 0.0f;
  scaled(z.data(), imp.data(), alpha, E);
  moe_cv2(z.data(), E, gi.data());
  if (smooth) {
    scaled(z.data(), ld.data(), alpha, E);
    moe_cv2(z.data(), E, gl.data());
  }
  std::vector<float> gif(E), glf(E);
  for (int e = 0; e < E; ++e) {
    const double a = alpha ? alpha[e] : 1.0;
    gif[e] = static_cast<float>(gi[e] * a * dloss);
    glf[e] = smooth ? static_cast<float>(gl[e] * a * dloss / noise_std) : 0.0f;  // with dP/dlogit's 1/sigma
  }
  const float* gI = gif.data();
  const float* gL = glf.data();
  const float inv_s = smooth ? 1.0f / noise_std : 0.0f;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * E >= kParallelElems)
  for (int t = 0; t < M; ++t) {
    if (dprobs) {
      float* dp = dprobs + static_cast<int64_t>(t) * E;
      for (int e = 0; e < E; ++e) dp[e] += gI[e];
    }
    if (dlogits && smooth) {
      const float* l = logits + static_cast<int64_t>(t) * E;
      const float* z = noisy + static_cast<int64_t>(t) * E;
      float* dl = dlogits + static_cast<int64_t>(t) * E;
      int a, b;
      top2_row(z, E, &a, &b);
      for (int e = 0; e < E; ++e) {
        const int k = (e == a) ? b : a;
        const float u = (l[e] - z[k]) * inv_s;
        const float d = gL[e] * 0.39894228f * std::exp(-0.5f * u * u);
        dl[e] += d;
        dl[k] -= d;
      }
    }
  }
}

// ============================== report ==============================

MoeShares moe_shares(const int* counts, int E) {
  SAV_CHECK(E > 0 && counts, "moe_shares: need E > 0 counts, got E=" << E);
  MoeShares s;
  s.counts.assign(counts, counts + E);
  for (int e = 0; e < E; ++e) s.tokens += counts[e];
  s.shares.resize(E, 0.0f);
  if (s.tokens > 0)
    for (int e = 0; e < E; ++e) s.shares[e] = static_cast<float>(counts[e]) / static_cast<float>(s.tokens);
  return s;
}

std::string moe_shares_str(const MoeShares& s) {
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(1);
  for (size_t e = 0; e < s.counts.size(); ++e) {
    if (e) os << "  ";
    os << 'e' << e << ' ' << s.counts[e] << " (" << 100.0f * s.shares[e] << "%)";
  }
  return os.str();
}

}  // namespace sav::cpu
