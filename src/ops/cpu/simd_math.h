// shiftaddvit: private helpers of the CPU ops (not a public header).
//
// Branch-free float approximations of exp and erf written so that GCC vectorises loops that call them
// (the libm calls are not vectorised without -ffast-math), plus argument checks and the OpenMP grain
// sizes shared by the op files.
//
//   #pragma omp simd
//   for (int i = 0; i < n; ++i) y[i] = sav::cpu::detail::exp_approx(x[i]);
//
// Accuracy: exp_approx relative error ~2 ulp on [-87, 88] (inputs outside are clamped: exp(-inf) gives
// ~1e-38 rather than 0, harmless for softmax); erf_approx absolute error < 1.5e-7 (Abramowitz & Stegun
// 7.1.26).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/error.h"

namespace sav::cpu::detail {

// Below these many elements (or rows) an OpenMP region costs more than it saves.
constexpr int64_t kParallelElems = 1 << 15;
constexpr int64_t kParallelRows = 16;

__attribute__((always_inline)) inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

__attribute__((always_inline)) inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// Clamps x to [lo, hi] with integer compares on an order-preserving key of the float's bits: GCC does
// not if-convert float compares under the default -ftrapping-math, which would block vectorisation.
__attribute__((always_inline)) inline int32_t float_order_key(float x) {
  const int32_t i = float_to_bits(x);
  return i >= 0 ? i : (i ^ 0x7FFFFFFF);
}
__attribute__((always_inline)) inline float clamp_vec(float x, float lo, float hi) {
  int32_t k = float_order_key(x);
  const int32_t klo = float_order_key(lo), khi = float_order_key(hi);
  k = k < klo ? klo : k;
  k = k > khi ? khi : k;
  return bits_to_float(k >= 0 ? k : (k ^ 0x7FFFFFFF));
}

// e^x. Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r, and 2^n
// built in the exponent bits.
__attribute__((always_inline)) inline float exp_approx(float x) {
  x = clamp_vec(x, -87.0f, 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;  // ln2 split in a short high part and the rest
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// erf(x) and, as a by-product, e^{-x^2} (which the GELU derivative needs).
__attribute__((always_inline)) inline float erf_approx(float x, float* exp_mx2) {
  const float ax = std::fabs(x);
  float t = 1.0f / (1.0f + 0.3275911f * ax);
  float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  float e = exp_approx(-x * x);
  *exp_mx2 = e;
  return std::copysign(1.0f - poly * e, x);
}

}  // namespace sav::cpu::detail

// Shape and pointer checks shared by the op files.
#define SAV_CHECK_DIM(v) SAV_CHECK((v) > 0, #v " must be positive, got " << (v))
#define SAV_CHECK_PTR(p) SAV_CHECK((p) != nullptr, #p " must not be null")
