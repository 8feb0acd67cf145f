// shiftaddvit: KSH fitting (see ksh_fit.h for the algorithm).
//
// Legend: T' fitted tokens (after subsampling), d head dim, b bits, m anchors, k = topk.
// Storage: Q (T',d) normalised tokens; K (T',m) centred kernel features; the target S0 as two index
// lists pos/neg (T',k); the residual -sum_r y_r y_r^T as the fitted hard codes Yc (r,T') in {-1,+1}.
// Products with S = b S0 - Yc^T Yc cost O(T' (2k + r)) instead of O(T'^2).
#include "reparam/ksh_fit.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <numeric>

#include "core/error.h"

namespace sav {

namespace {

inline int64_t i64(int v) { return static_cast<int64_t>(v); }

// Copies the given rows of q (rows of d floats, row stride ldq) -> out (rows.size(), d), L2-normalised
// (max(norm, 1e-6) as the hash forward).
void normalise_tokens(std::vector<float>& out, const float* q, int64_t ldq, const std::vector<int>& rows, int d) {
  out.resize(rows.size() * static_cast<size_t>(d));
  for (size_t t = 0; t < rows.size(); ++t) {
    const float* x = q + rows[t] * ldq;
    double ss = 0.0;
    for (int i = 0; i < d; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float nrm = std::max(static_cast<float>(std::sqrt(ss)), 1e-6f);
    for (int i = 0; i < d; ++i) out[t * d + i] = x[i] / nrm;
  }
}

// Partial Fisher-Yates: the first `count` entries of a random permutation of 0..n-1.
std::vector<int> sample_without_replacement(int n, int count, Rng& rng) {
  std::vector<int> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  for (int i = 0; i < count; ++i) {
    const int j = i + static_cast<int>(rng.below(static_cast<uint64_t>(n - i)));
    std::swap(idx[i], idx[j]);
  }
  idx.resize(count);
  return idx;
}

// Sparse target S0: pos/neg (T,k) hold, per token, its k most and k least cosine-similar tokens.
struct Target {
  int T = 0, k = 0;
  std::vector<int> pos, neg;

  // out (T) = S0 y
  void apply(double* out, const float* y) const {
    for (int t = 0; t < T; ++t) {
      double s = 0.0;
      for (int e = 0; e < k; ++e) s += y[pos[i64(t) * k + e]] - y[neg[i64(t) * k + e]];
      out[t] = s;
    }
  }
  // out (T) += S0^T y
  void apply_transposed_add(double* out, const float* y) const {
    for (int t = 0; t < T; ++t) {
      const double yt = y[t];
      for (int e = 0; e < k; ++e) {
        out[pos[i64(t) * k + e]] += yt;
        out[neg[i64(t) * k + e]] -= yt;
      }
    }
  }
};

// Q (T,d) normalised: cosine similarity = dot product. One total order (similarity, then the lower index
// first): pos = its first k entries, neg = its last k.
Target build_target(const std::vector<float>& Q, int T, int d, int topk) {
  Target S;
  S.T = T;
  S.k = std::max(1, std::min(topk, T / 2));
  S.pos.resize(static_cast<size_t>(T) * S.k);
  S.neg.resize(static_cast<size_t>(T) * S.k);
  const int k = S.k;
  // Q^T (d,T): a row of the similarity matrix is then a vectorisable loop over tokens, each entry summed
  // over i in a fixed order (the same on any number of threads, unlike a BLAS product).
  std::vector<float> QT(static_cast<size_t>(d) * T);
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < d; ++i) QT[i64(i) * T + t] = Q[i64(t) * d + i];
#pragma omp parallel
  {
    std::vector<float> g(T);
    std::vector<int> idx(T);
#pragma omp for schedule(static)
    for (int t = 0; t < T; ++t) {
      std::fill(g.begin(), g.end(), 0.0f);
      for (int i = 0; i < d; ++i) {
        const float qi = Q[i64(t) * d + i];
        const float* __restrict col = QT.data() + i64(i) * T;
        float* __restrict gr = g.data();
        for (int u = 0; u < T; ++u) gr[u] += qi * col[u];
      }
      const float* gv = g.data();
      auto more_similar = [gv](int a, int b) { return gv[a] > gv[b] || (gv[a] == gv[b] && a < b); };
      // the exact reverse of more_similar, so pos and neg are disjoint (T >= 2k) even with ties
      auto less_similar = [gv](int a, int b) { return gv[a] < gv[b] || (gv[a] == gv[b] && a > b); };
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), more_similar);
      for (int e = 0; e < k; ++e) S.pos[i64(t) * k + e] = idx[e];
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), less_similar);
      for (int e = 0; e < k; ++e) S.neg[i64(t) * k + e] = idx[e];
    }
  }
  return S;
}

// The residual target S = b S0 - sum_r Yc_r Yc_r^T and its products.
struct Residual {
  const Target* S0 = nullptr;
  int b = 0;
  int T = 0;
  std::vector<float> Yc;  // (r, T) hard codes of the bits fitted so far
  int r = 0;
  std::vector<double> proj;  // (r) scratch

  // Sy (T) = S y ; Sty (T) = S^T y (may be nullptr)
  void apply(double* Sy, double* Sty, const float* y) {
    S0->apply(Sy, y);
    for (int t = 0; t < T; ++t) Sy[t] *= b;
    if (Sty) {
      std::fill(Sty, Sty + T, 0.0);
      S0->apply_transposed_add(Sty, y);
      for (int t = 0; t < T; ++t) Sty[t] *= b;
    }
    proj.assign(r, 0.0);
    for (int q = 0; q < r; ++q) {
      const float* yq = Yc.data() + i64(q) * T;
      double s = 0.0;
      for (int t = 0; t < T; ++t) s += static_cast<double>(yq[t]) * y[t];
      proj[q] = s;
    }
    for (int q = 0; q < r; ++q) {
      const float* yq = Yc.data() + i64(q) * T;
      for (int t = 0; t < T; ++t) {
        Sy[t] -= proj[q] * yq[t];
        if (Sty) Sty[t] -= proj[q] * yq[t];
      }
    }
  }
  // -y^T S y / (T b)
  double loss(const float* y, std::vector<double>& scratch) {
    scratch.resize(T);
    apply(scratch.data(), nullptr, y);
    double s = 0.0;
    for (int t = 0; t < T; ++t) s += static_cast<double>(y[t]) * scratch[t];
    return -s / (static_cast<double>(T) * b);
  }
  void push(const std::vector<float>& y) {
    Yc.insert(Yc.end(), y.begin(), y.end());
    ++r;
  }
};

// z (T) = K a ; K (T,m)
void kernel_project(std::vector<double>& z, const std::vector<float>& K, const std::vector<double>& a, int T, int m) {
  z.resize(T);
  for (int t = 0; t < T; ++t) {
    double s = 0.0;
    for (int j = 0; j < m; ++j) s += K[i64(t) * m + j] * a[j];
    z[t] = s;
  }
}

void hard_codes(std::vector<float>& y, const std::vector<float>& K, const std::vector<double>& a, int T, int m) {
  std::vector<double> z;
  kernel_project(z, K, a, T, m);
  y.resize(T);
  for (int t = 0; t < T; ++t) y[t] = z[t] > 0.0 ? 1.0f : -1.0f;
}

// Rescale a so that ||K a||^2 = T (z of unit rms). Leaves a zero vector alone.
void scale_to_unit_rms(std::vector<double>& a, const std::vector<float>& K, int T, int m) {
  std::vector<double> z;
  kernel_project(z, K, a, T, m);
  double ss = 0.0;
  for (double v : z) ss += v * v;
  if (ss <= 0.0) return;
  const double c = std::sqrt(static_cast<double>(T) / ss);
  for (double& v : a) v *= c;
}

// ---- small dense linear algebra (m x m, double, row-major) ----

// In place: M = L L^T, L lower triangular (upper part zeroed). Returns false if not positive definite.
bool cholesky(std::vector<double>& M, int n) {
  for (int j = 0; j < n; ++j) {
    double s = M[i64(j) * n + j];
    for (int k = 0; k < j; ++k) s -= M[i64(j) * n + k] * M[i64(j) * n + k];
    if (!(s > 0.0)) return false;
    const double l = std::sqrt(s);
    M[i64(j) * n + j] = l;
    for (int i = j + 1; i < n; ++i) {
      double t = M[i64(i) * n + j];
      for (int k = 0; k < j; ++k) t -= M[i64(i) * n + k] * M[i64(j) * n + k];
      M[i64(i) * n + j] = t / l;
    }
    for (int i = 0; i < j; ++i) M[i64(i) * n + j] = 0.0;
  }
  return true;
}

// Solve L x = b in place (forward substitution).
void solve_lower(const std::vector<double>& L, double* x, int n) {
  for (int i = 0; i < n; ++i) {
    double s = x[i];
    for (int k = 0; k < i; ++k) s -= L[i64(i) * n + k] * x[k];
    x[i] = s / L[i64(i) * n + i];
  }
}

// Solve L^T x = b in place (back substitution).
void solve_upper_t(const std::vector<double>& L, double* x, int n) {
  for (int i = n - 1; i >= 0; --i) {
    double s = x[i];
    for (int k = i + 1; k < n; ++k) s -= L[i64(k) * n + i] * x[k];
    x[i] = s / L[i64(i) * n + i];
  }
}

// Leading eigenvector of a symmetric matrix (cyclic Jacobi rotations). S is destroyed.
std::vector<double> leading_eigenvector(std::vector<double> S, int n) {
  std::vector<double> V(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) V[i64(i) * n + i] = 1.0;
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0.0, diag = 0.0;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) (i == j ? diag : off) += S[i64(i) * n + j] * S[i64(i) * n + j];
    if (off <= 1e-24 * std::max(diag, 1e-300)) break;
    for (int p = 0; p < n; ++p)
      for (int q = p + 1; q < n; ++q) {
        const double apq = S[i64(p) * n + q];
        if (apq == 0.0) continue;
        const double theta = (S[i64(q) * n + q] - S[i64(p) * n + p]) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int k = 0; k < n; ++k) {  // S <- S J (columns p, q)
          const double skp = S[i64(k) * n + p], skq = S[i64(k) * n + q];
          S[i64(k) * n + p] = c * skp - s * skq;
          S[i64(k) * n + q] = s * skp + c * skq;
        }
        for (int k = 0; k < n; ++k) {  // S <- J^T S (rows p, q)
          const double spk = S[i64(p) * n + k], sqk = S[i64(q) * n + k];
          S[i64(p) * n + k] = c * spk - s * sqk;
          S[i64(q) * n + k] = s * spk + c * sqk;
        }
        for (int k = 0; k < n; ++k) {  // V <- V J
          const double vkp = V[i64(k) * n + p], vkq = V[i64(k) * n + q];
          V[i64(k) * n + p] = c * vkp - s * vkq;
          V[i64(k) * n + q] = s * vkp + c * vkq;
        }
      }
  }
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (S[i64(i) * n + i] > S[i64(best) * n + best]) best = i;
  std::vector<double> u(n);
  for (int k = 0; k < n; ++k) u[k] = V[i64(k) * n + best];
  return u;
}

// Spectral init: the leading generalised eigenvector of (K^T S_sym K) a = lambda (K^T K + eps I) a, with
// S_sym = (S + S^T) / 2 the current residual target. Returns false (a untouched) if it degenerates.
bool spectral_init(std::vector<double>& a, const std::vector<float>& K, Residual& res, int T, int m) {
  std::vector<double> M1(static_cast<size_t>(m) * m), M2(static_cast<size_t>(m) * m, 0.0);
  std::vector<float> col(T);
  std::vector<double> Sy(T), Sty(T);
  for (int j = 0; j < m; ++j) {
    for (int t = 0; t < T; ++t) col[t] = K[i64(t) * m + j];
    res.apply(Sy.data(), Sty.data(), col.data());
    for (int i = 0; i < m; ++i) {
      double s = 0.0;
      for (int t = 0; t < T; ++t) s += K[i64(t) * m + i] * 0.5 * (Sy[t] + Sty[t]);
      M1[i64(i) * m + j] = s;
    }
  }
  for (int i = 0; i < m; ++i)
    for (int j = i; j < m; ++j) {
      const double s = 0.5 * (M1[i64(i) * m + j] + M1[i64(j) * m + i]);
      M1[i64(i) * m + j] = M1[i64(j) * m + i] = s;
    }
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j) M2[i64(i) * m + j] += static_cast<double>(K[i64(t) * m + i]) * K[i64(t) * m + j];
  double tr = 0.0;
  for (int i = 0; i < m; ++i) tr += M2[i64(i) * m + i];
  if (!(tr > 0.0)) return false;
  for (int i = 0; i < m; ++i) M2[i64(i) * m + i] += 1e-6 * tr / m;
  if (!cholesky(M2, m)) return false;
  // C = L^-1 M1 L^-T: columns of X = L^-1 M1, then rows of C = L^-1 X^T (M1 symmetric)
  std::vector<double> X(static_cast<size_t>(m) * m), Cm(static_cast<size_t>(m) * m), v(m);
  for (int j = 0; j < m; ++j) {
    for (int i = 0; i < m; ++i) v[i] = M1[i64(i) * m + j];
    solve_lower(M2, v.data(), m);
    for (int i = 0; i < m; ++i) X[i64(i) * m + j] = v[i];
  }
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < m; ++j) v[j] = X[i64(i) * m + j];  // row i of X = column i of X^T
    solve_lower(M2, v.data(), m);
    for (int j = 0; j < m; ++j) Cm[i64(j) * m + i] = v[j];
  }
  for (int i = 0; i < m; ++i)
    for (int j = i + 1; j < m; ++j) {
      const double s = 0.5 * (Cm[i64(i) * m + j] + Cm[i64(j) * m + i]);
      Cm[i64(i) * m + j] = Cm[i64(j) * m + i] = s;
    }
  std::vector<double> u = leading_eigenvector(std::move(Cm), m);
  solve_upper_t(M2, u.data(), m);
  for (double x : u)
    if (!std::isfinite(x)) return false;
  a = u;
  return true;
}

// Adam on the sigmoid relaxation; returns the final a.
std::vector<double> optimise_bit(const std::vector<double>& a0, const std::vector<float>& K, Residual& res, int T,
                                 int m, int b, const KshFitOptions& opt) {
  std::vector<double> a = a0, mom(m, 0.0), vel(m, 0.0), z, Sy(T), Sty(T), g(m);
  std::vector<float> y(T);
  double rms = 0.0;
  for (double x : a0) rms += x * x;
  rms = std::sqrt(rms / m);
  const double lr = opt.lr * (rms > 0.0 ? rms : 1.0);
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  double b1t = 1.0, b2t = 1.0;
  for (int step = 0; step < opt.steps; ++step) {
    kernel_project(z, K, a, T, m);
    for (int t = 0; t < T; ++t) y[t] = static_cast<float>(std::tanh(0.5 * z[t]));  // 2 sigmoid(z) - 1
    res.apply(Sy.data(), Sty.data(), y.data());
    // loss = -y^T S y / (T b): dloss/dy = -(S + S^T) y / (T b); dy/dz = (1 - y^2) / 2
    std::fill(g.begin(), g.end(), 0.0);
    const double scale = -1.0 / (static_cast<double>(T) * b);
    for (int t = 0; t < T; ++t) {
      const double dz = scale * (Sy[t] + Sty[t]) * 0.5 * (1.0 - static_cast<double>(y[t]) * y[t]);
      for (int j = 0; j < m; ++j) g[j] += dz * K[i64(t) * m + j];
    }
    b1t *= b1;
    b2t *= b2;
    for (int j = 0; j < m; ++j) {
      mom[j] = b1 * mom[j] + (1 - b1) * g[j];
      vel[j] = b2 * vel[j] + (1 - b2) * g[j] * g[j];
      a[j] -= lr * (mom[j] / (1 - b1t)) / (std::sqrt(vel[j] / (1 - b2t)) + eps);
    }
  }
  return a;
}

// Kernel features of tokens Q (T,d) against anchors (m,d): K (T,m) = exp(-D / (2 sigma)); returns sigma.
double kernel_features(std::vector<float>& K, const std::vector<float>& Q, const float* anchors, int T, int d, int m) {
  K.resize(static_cast<size_t>(T) * m);
  double acc = 0.0;
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < m; ++j) {
      float s = 0.0f;
      for (int i = 0; i < d; ++i) {
        const float diff = Q[i64(t) * d + i] - anchors[i64(j) * d + i];
        s += diff * diff;
      }
      K[i64(t) * m + j] = s;
      acc += s;
    }
  const double sigma = std::max(acc / (static_cast<double>(T) * m), 1e-12);  // as kHammingSigmaMin
  const float two_sigma = static_cast<float>(2.0 * sigma);
  for (float& v : K) v = std::exp(-v / two_sigma);
  return sigma;
}

// q (T,d) with row stride ldq (>= d).
KshParams ksh_fit_strided(const float* q, int64_t ldq, int T, int d, int b, int m, Rng& rng, const KshFitOptions& opt) {
  SAV_CHECK(q != nullptr && ldq >= d, "ksh_fit: q must not be null and its row stride " << ldq << " >= d");
  SAV_CHECK(d > 0 && m > 0, "ksh_fit: d and m must be positive, got d=" << d << " m=" << m);
  SAV_CHECK(b >= 1 && b <= 64, "ksh_fit: b (hash bits) must be in 1..64, got " << b);
  SAV_CHECK(T >= m && T >= 2, "ksh_fit: need at least m=" << m << " (and 2) tokens, got T=" << T);
  SAV_CHECK(opt.steps >= 0 && opt.topk >= 1 && opt.max_tokens >= std::max(m, 2),
            "ksh_fit: bad options steps=" << opt.steps << " topk=" << opt.topk << " max_tokens=" << opt.max_tokens);

  // 1. tokens (subsampled)
  std::vector<int> rows;
  if (T > opt.max_tokens) {
    rows = sample_without_replacement(T, opt.max_tokens, rng);
    std::sort(rows.begin(), rows.end());
  } else {
    rows.resize(T);
    std::iota(rows.begin(), rows.end(), 0);
  }
  const int Tf = static_cast<int>(rows.size());
  std::vector<float> Q;
  normalise_tokens(Q, q, ldq, rows, d);

  // 2. anchors, kernel features, centring
  KshParams p;
  p.d = d;
  p.nbits = b;
  p.m = m;
  p.anchors.resize(static_cast<size_t>(m) * d);
  const std::vector<int> anchor_rows = sample_without_replacement(Tf, m, rng);
  for (int j = 0; j < m; ++j) std::copy_n(Q.data() + i64(anchor_rows[j]) * d, d, p.anchors.data() + i64(j) * d);
  std::vector<float> K;
  kernel_features(K, Q, p.anchors.data(), Tf, d, m);
  p.mu.assign(m, 0.0f);
  for (int j = 0; j < m; ++j) {
    double s = 0.0;
    for (int t = 0; t < Tf; ++t) s += K[i64(t) * m + j];
    p.mu[j] = static_cast<float>(s / Tf);
  }
  for (int t = 0; t < Tf; ++t)
    for (int j = 0; j < m; ++j) K[i64(t) * m + j] -= p.mu[j];

  // 3. target
  const Target S0 = build_target(Q, Tf, d, opt.topk);
  Residual res;
  res.S0 = &S0;
  res.b = b;
  res.T = Tf;

  // 4. greedy bits
  p.A.assign(static_cast<size_t>(b) * m, 0.0f);
  p.bit_loss.assign(b, 0.0f);
  p.bit_optimised.assign(b, 0);
  std::vector<double> a0(m), scratch;
  std::vector<float> y_init, y_opt;
  for (int r = 0; r < b; ++r) {
    // the random vector is drawn in both modes so the rng stream does not depend on the init kind
    for (int j = 0; j < m; ++j) a0[j] = rng.normal();
    if (opt.spectral_init) spectral_init(a0, K, res, Tf, m);
    scale_to_unit_rms(a0, K, Tf, m);
    const std::vector<double> a_opt = optimise_bit(a0, K, res, Tf, m, b, opt);
    hard_codes(y_init, K, a0, Tf, m);
    hard_codes(y_opt, K, a_opt, Tf, m);
    const double loss_init = res.loss(y_init.data(), scratch);
    const double loss_opt = res.loss(y_opt.data(), scratch);
    const bool take_opt = loss_opt < loss_init;
    const std::vector<double>& a = take_opt ? a_opt : a0;
    for (int j = 0; j < m; ++j) p.A[i64(r) * m + j] = static_cast<float>(a[j]);
    p.bit_loss[r] = static_cast<float>(take_opt ? loss_opt : loss_init);
    p.bit_optimised[r] = take_opt ? 1 : 0;
    // the hard code of the stored float A (what the hash forward will produce on these tokens)
    std::vector<double> a_stored(m);
    for (int j = 0; j < m; ++j) a_stored[j] = p.A[i64(r) * m + j];
    std::vector<float> y_kept;
    hard_codes(y_kept, K, a_stored, Tf, m);
    res.push(y_kept);
  }
  return p;
}

}  // namespace

KshParams ksh_fit(const float* q, int T, int d, int b, int m, Rng& rng, const KshFitOptions& opt) {
  return ksh_fit_strided(q, d, T, d, b, m, rng, opt);
}

KshParams ksh_fit(const float* q, int T, int d, int b, int m, Rng& rng, int steps) {
  KshFitOptions opt;
  opt.steps = steps;
  return ksh_fit(q, T, d, b, m, rng, opt);
}

void ksh_fit_layer(float* anchors, float* mu, float* A, const float* qk_lin, int B, int N, int C, int H, int b, int m,
                   Rng& rng, const KshFitOptions& opt) {
  SAV_CHECK(anchors && mu && A && qk_lin, "ksh_fit_layer: null pointer");
  SAV_CHECK(B > 0 && N > 0 && C > 0 && H > 0 && C % H == 0,
            "ksh_fit_layer: bad sizes B=" << B << " N=" << N << " C=" << C << " H=" << H);
  const int d = C / H;
  const int64_t T = i64(B) * N;
  SAV_CHECK(T <= INT32_MAX, "ksh_fit_layer: too many tokens " << T);
  SAV_CHECK(T >= m && T >= 2, "ksh_fit_layer: need at least m=" << m << " tokens, got B*N=" << T);
  SAV_CHECK(b >= 1 && b <= 64, "ksh_fit_layer: b (hash bits) must be in 1..64, got " << b);
  // One seed per head drawn in order, then the heads are fitted in parallel: the result does not depend
  // on the number of threads.
  std::vector<uint64_t> seeds(H);
  for (auto& s : seeds) s = rng.next_u64();
  std::exception_ptr error;
#pragma omp parallel for schedule(dynamic, 1)
  for (int h = 0; h < H; ++h) {
    try {
      Rng head_rng(seeds[h]);
      const KshParams p = ksh_fit_strided(qk_lin + i64(h) * d, C, static_cast<int>(T), d, b, m, head_rng, opt);
      std::copy(p.anchors.begin(), p.anchors.end(), anchors + i64(h) * m * d);
      std::copy(p.mu.begin(), p.mu.end(), mu + i64(h) * m);
      std::copy(p.A.begin(), p.A.end(), A + i64(h) * b * m);
    } catch (...) {
#pragma omp critical(sav_ksh_fit_layer_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

double ksh_objective(const float* q, int T, int d, const KshParams& p, int topk) {
  SAV_CHECK(q != nullptr && T >= 2 && d == p.d,
            "ksh_objective: bad input (T=" << T << ", d=" << d << " vs params d=" << p.d << ")");
  const int m = p.m, b = p.nbits;
  std::vector<int> rows(T);
  std::iota(rows.begin(), rows.end(), 0);
  std::vector<float> Q, K;
  normalise_tokens(Q, q, d, rows, d);
  kernel_features(K, Q, p.anchors.data(), T, d, m);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < m; ++j) K[i64(t) * m + j] -= p.mu[j];
  const Target S0 = build_target(Q, T, d, topk);
  // Y (b,T) in {-1,+1}
  std::vector<float> Y(static_cast<size_t>(b) * T), y;
  std::vector<double> a(m), Sy(T);
  double cross = 0.0;  // sum_st S0_st (Y_s . Y_t)
  for (int r = 0; r < b; ++r) {
    for (int j = 0; j < m; ++j) a[j] = p.A[i64(r) * m + j];
    hard_codes(y, K, a, T, m);
    std::copy(y.begin(), y.end(), Y.begin() + i64(r) * T);
    S0.apply(Sy.data(), y.data());
    for (int t = 0; t < T; ++t) cross += y[t] * Sy[t];
  }
  double gram = 0.0;  // ||Y Y^T||_F^2 = ||Y^T Y||_F^2 (the b x b Gram matrix of the bits)
  for (int r = 0; r < b; ++r)
    for (int s = 0; s < b; ++s) {
      double g = 0.0;
      for (int t = 0; t < T; ++t) g += static_cast<double>(Y[i64(r) * T + t]) * Y[i64(s) * T + t];
      gram += g * g;
    }
  // ||S0||_F^2: pos and neg are disjoint (T >= 2k and one total order, see build_target)
  const double s0_sq = 2.0 * S0.k * static_cast<double>(T);
  const double bb = static_cast<double>(b) * b;
  return (gram / bb - 2.0 * cross / b + s0_sq) / (static_cast<double>(T) * T);
}

}  // namespace sav
