// shiftaddvit: a small reusable harness for op tests (header only, used by tests/test_*.cpp).
//
// Random fills, the normalised error max|a - ref| / max|ref|, and a central finite-difference checker of
// an analytic gradient against a scalar loss, typically L = sum(out * R) with a fixed random R.
//
//   std::vector<float> x = sav::test::uniform(M * K, 1), R = sav::test::uniform(M * F, 2);
//   auto loss = [&] { op_forward_ref(y.data(), x.data(), ...); return sav::test::dot(y, R); };
//   op_backward(dx.data(), R.data() /* dL/dy */, x.data(), ...);      // dx zero-initialised
//   auto fd = sav::test::fd_check(x.data(), x.size(), dx.data(), loss);
//   EXPECT_LT(fd.err, 1e-2) << fd;
//
// Shapes: vectors are flat float arrays; ops pass their own dimensions.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <ostream>
#include <vector>

#include "core/rng.h"

namespace sav::test {

// n values uniform in [lo, hi), deterministic in `seed`.
inline std::vector<float> uniform(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = rng.uniform(lo, hi);
  return v;
}

// n standard-normal values times `std`.
inline std::vector<float> normal(size_t n, uint64_t seed, float std = 1.0f) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = rng.normal() * std;
  return v;
}

inline double max_abs(const float* a, size_t n) {
  double m = 0.0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, static_cast<double>(std::fabs(a[i])));
  return m;
}

// max|a - ref| / max|ref|; when ref is all zeros, the plain max|a - ref|.
inline double norm_err(const float* a, const float* ref, size_t n) {
  double diff = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - ref[i]);
    if (!(d <= diff)) diff = d;  // NaN propagates as a failure
  }
  const double scale = max_abs(ref, n);
  return scale > 0.0 ? diff / scale : diff;
}
inline double norm_err(const std::vector<float>& a, const std::vector<float>& ref) {
  return a.size() == ref.size() ? norm_err(a.data(), ref.data(), a.size()) : INFINITY;
}

// sum(a * r) in double: the scalar loss of finite-difference checks.
inline double dot(const float* a, const float* r, size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * r[i];
  return s;
}
inline double dot(const std::vector<float>& a, const std::vector<float>& r) {
  return dot(a.data(), r.data(), std::min(a.size(), r.size()));
}

struct FdResult {
  double err = 0.0;      // max |numeric - analytic| over checked entries / max |analytic| over all entries
  size_t worst = 0;      // index of the worst entry
  double numeric = 0.0;  // its central difference
  double analytic = 0.0;
  size_t checked = 0;
};

inline std::ostream& operator<<(std::ostream& os, const FdResult& r) {
  return os << "fd err " << r.err << " at [" << r.worst << "] numeric " << r.numeric << " analytic " << r.analytic
            << " (" << r.checked << " entries checked)";
}

// Central differences of `loss` with respect to x[i], compared with grad[i]. Checks every entry when
// n <= max_points, otherwise max_points entries drawn with `seed` (always including the first and last).
// x is restored after each perturbation.
inline FdResult fd_check(float* x, size_t n, const float* grad, const std::function<double()>& loss, float h = 1e-3f,
                         size_t max_points = 48, uint64_t seed = 12345) {
  std::vector<size_t> idx;
  if (n <= max_points) {
    for (size_t i = 0; i < n; ++i) idx.push_back(i);
  } else {
    Rng rng(seed);
    idx.push_back(0);
    idx.push_back(n - 1);
    while (idx.size() < max_points) idx.push_back(static_cast<size_t>(rng.below(n)));
  }
  FdResult r;
  double worst = -1.0;
  for (size_t i : idx) {
    const float saved = x[i];
    x[i] = saved + h;
    const double lp = loss();
    x[i] = saved - h;
    const double lm = loss();
    x[i] = saved;
    // The actual step in float (saved +- h is rounded).
    const double step = static_cast<double>(saved + h) - static_cast<double>(saved - h);
    const double num = (lp - lm) / step;
    const double d = std::fabs(num - grad[i]);
    if (!(d <= worst)) {
      worst = d;
      r.worst = i;
      r.numeric = num;
      r.analytic = grad[i];
    }
  }
  r.checked = idx.size();
  const double scale = max_abs(grad, n);
  r.err = scale > 0.0 ? worst / scale : worst;
  return r;
}

}  // namespace sav::test
