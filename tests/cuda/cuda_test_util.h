// Helpers shared by the CUDA tests: skip without a GPU, device buffers from host vectors (uploaded or poisoned),
// bf16 rounding on the host, poison and bit checks, SCOPED_TRACE labels, and fitted-looking KSH weights for the
// Hamming attention tests.
//
//   class MyTest : public sav::test::CudaTest {};     // every TEST_F skips with "no CUDA device" when
//   TEST_F(MyTest, Works) {                            // the machine has no usable GPU
//     SCOPED_TRACE(dims({{"M", M}, {"C", C}}));        // "M=37 C=192"
//     auto dx = upload(x);                             // a DeviceBuffer<float> holding x
//     auto dy = poisoned(n);                           // n floats, every byte 0xFF (NaN)
//     my_kernel(dy.get(), dx.get(), ...); device_sync();
//     EXPECT_EQ(count_nonfinite(dy.download()), 0u);   // a NaN left is an element never written
//   }
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"
#include "ops/cuda/common.h"
#include "op_harness.h"

namespace sav::test {

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!sav::cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  }
};

// ---- device buffers ----

// A device copy of v; an empty vector gives an empty buffer (a null pointer) and no copy.
template <class T>
sav::cuda::DeviceBuffer<T> upload(const std::vector<T>& v) {
  sav::cuda::DeviceBuffer<T> d(v.size());
  if (!v.empty()) d.upload(v);
  return d;
}

// A device copy of v as T: float as is, bf16 rounded to nearest even.
template <class T>
sav::cuda::DeviceBuffer<T> upload_as(const std::vector<float>& v) {
  if constexpr (std::is_same_v<T, float>) {
    return upload(v);
  } else {
    static_assert(std::is_same_v<T, sav::cuda::bf16>, "upload_as: float or bf16");
    sav::cuda::DeviceBuffer<T> d(v.size());
    if (!v.empty()) d.upload(sav::cuda::to_bf16(v.data(), v.size()));
    return d;
  }
}

// The contents of a float or bf16 device buffer, as f32.
template <class T>
std::vector<float> download_f32(const sav::cuda::DeviceBuffer<T>& d) {
  if constexpr (std::is_same_v<T, float>) {
    return d.download();
  } else {
    static_assert(std::is_same_v<T, sav::cuda::bf16>, "download_f32: float or bf16");
    return sav::cuda::from_bf16(d.download());
  }
}

// n elements with every byte 0xFF (NaN for float and bf16, -1 for integers): a poison a test can detect.
template <class T = float>
sav::cuda::DeviceBuffer<T> poisoned(size_t n) {
  sav::cuda::DeviceBuffer<T> d(n);
  d.fill_bytes(0xFF);
  return d;
}

// Waits for the device; a kernel's asynchronous error surfaces here as sav::Error.
inline void device_sync() { SAV_CUDA_CHECK(cudaDeviceSynchronize()); }

// ---- host checks ----

// "k=v k=v ..." for SCOPED_TRACE: dims({{"M", 37}, {"C", 192}}) == "M=37 C=192".
inline std::string dims(std::initializer_list<std::pair<const char*, int64_t>> kv) {
  std::string s;
  for (const auto& [k, v] : kv) s += std::string(s.empty() ? "" : " ") + k + "=" + std::to_string(v);
  return s;
}

// The values a bf16 upload of v holds, back in f32.
inline std::vector<float> round_bf16(const std::vector<float>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = sav::bf16_to_float(sav::float_to_bf16(v[i]));
  return r;
}

// Number of non-finite entries (poisoned with 0xFF bytes = NaN before a kernel: any left were not written).
inline size_t count_nonfinite(const std::vector<float>& v) {
  size_t n = 0;
  for (float x : v) n += !std::isfinite(x);
  return n;
}

// Same size and the same bytes (NaN payloads and signed zeros included).
template <class T>
bool bit_identical(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// ---- KSH weights for the Hamming attention tests ----

// Image 0's qk rows of head h (d values at column h*d of rows C apart), each divided by its norm (clamped at
// 1e-6), in precision Q: the N x d rows the anchors are drawn from.
template <class Q>
std::vector<Q> unit_head_rows(const std::vector<float>& qk, int N, int C, int h, int d) {
  std::vector<Q> q(size_t(N) * d);
  for (int n = 0; n < N; ++n) {
    double ss = 0.0;
    for (int i = 0; i < d; ++i) ss += double(qk[size_t(n) * C + h * d + i]) * qk[size_t(n) * C + h * d + i];
    const Q nrm = std::max(Q(std::sqrt(ss)), Q(1e-6));
    for (int i = 0; i < d; ++i) q[size_t(n) * d + i] = qk[size_t(n) * C + h * d + i] / nrm;
  }
  return q;
}

// For each of the m anchors a_j (d floats each): the mean over the N rows q_n of exp(-D_nj / (2 sigma)),
// D_nj = ||q_n - a_j||^2 and sigma = the mean D (floored at 1e-12): a fitted mu_j (about half the bits set).
template <class Q>
std::vector<double> ksh_mu_means(const std::vector<Q>& q, const float* anchors, int N, int d, int m) {
  std::vector<double> D(size_t(N) * m);
  double tot = 0.0;
  for (int n = 0; n < N; ++n)
    for (int j = 0; j < m; ++j) {
      double s = 0.0;
      for (int i = 0; i < d; ++i) {
        const double t = q[size_t(n) * d + i] - anchors[size_t(j) * d + i];
        s += t * t;
      }
      D[size_t(n) * m + j] = s;
      tot += s;
    }
  const double sigma = std::max(tot / (double(N) * m), 1e-12);
  std::vector<double> means(m);
  for (int j = 0; j < m; ++j) {
    double s = 0.0;
    for (int n = 0; n < N; ++n) s += std::exp(-D[size_t(n) * m + j] / (2 * sigma));
    means[j] = s / N;
  }
  return means;
}

// KSH buffers of an (N, C) qk with H heads, nbits bits and m anchors a head.
struct KshWeights {
  std::vector<float> anchors, mu, A, conv;
};

// KSH buffers that look fitted: anchors = unit_head_rows<Q> of image 0 (sampled tokens, as the fit takes), mu =
// ksh_mu_means, A random normal; conv taps random. Q: the precision of the normalised rows.
template <class Q>
KshWeights fitted_ksh_weights(const std::vector<float>& qk, int N, int C, int H, int nbits, int m, uint64_t seed) {
  const int d = C / H;
  KshWeights w;
  w.anchors.resize(size_t(H) * m * d);
  w.mu.resize(size_t(H) * m);
  Rng rng(seed);
  for (int h = 0; h < H; ++h) {
    const std::vector<Q> q = unit_head_rows<Q>(qk, N, C, h, d);
    for (int j = 0; j < m; ++j) {
      const int n = static_cast<int>(rng.below(N));
      for (int i = 0; i < d; ++i) w.anchors[(size_t(h) * m + j) * d + i] = float(q[size_t(n) * d + i]);
    }
    const std::vector<double> means = ksh_mu_means(q, w.anchors.data() + size_t(h) * m * d, N, d, m);
    for (int j = 0; j < m; ++j) w.mu[size_t(h) * m + j] = float(means[j]);
  }
  w.A = normal(size_t(H) * nbits * m, seed + 1);
  w.conv = normal(size_t(H) * 9, seed + 2, 0.3f);
  return w;
}

}  // namespace sav::test
