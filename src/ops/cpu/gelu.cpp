// shiftaddvit: exact GELU (torch.nn.GELU(approximate='none')) on the CPU.
//
// Shapes: x, y, dx, dy (n), any layout (elementwise).
//   y = 0.5 x (1 + erf(x / sqrt2)),  dy/dx = Phi(x) + x phi(x),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
// Reference: std::erf / std::exp in double. Fast path: OpenMP + a vectorised erf (|error| < 1.5e-7)
// that shares its exp(-x^2/2) with the derivative; AVX2+FMA intrinsics where the CPU has them, else the
// same formulas in loops that GCC vectorises (cloned per instruction set).
#include <cmath>

#include "ops/cpu/ops.h"
#include "ops/cpu/simd_math.h"

namespace sav::cpu {

namespace {

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

SAV_SIMD_CLONES void gelu_forward_kernel(float* y, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float e;
    const float xi = x[i];
    y[i] = 0.5f * xi * (1.0f + detail::erf_approx(xi * static_cast<float>(kInvSqrt2), &e));
  }
}

SAV_SIMD_CLONES void gelu_backward_kernel(float* dx, const float* dy, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float e;  // exp(-x^2 / 2)
    const float xi = x[i];
    const float cdf = 0.5f * (1.0f + detail::erf_approx(xi * static_cast<float>(kInvSqrt2), &e));
    dx[i] += dy[i] * (cdf + xi * static_cast<float>(kInvSqrt2Pi) * e);
  }
}

#if SAV_HAVE_AVX2_KERNELS
SAV_AVX2 void gelu_forward_avx2(float* y, const float* x, int64_t n) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f),
               is2 = _mm256_set1_ps(static_cast<float>(kInvSqrt2));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xi = _mm256_loadu_ps(x + i);
    __m256 e;
    const __m256 erf = detail::avx2::erf(_mm256_mul_ps(xi, is2), &e);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(half, xi), _mm256_add_ps(one, erf)));
  }
  if (i < n) gelu_forward_kernel(y + i, x + i, n - i);
}

SAV_AVX2 void gelu_backward_avx2(float* dx, const float* dy, const float* x, int64_t n) {
  const __m256 half = _mm256_set1_ps(0.5f), is2 = _mm256_set1_ps(static_cast<float>(kInvSqrt2)),
               is2pi = _mm256_set1_ps(static_cast<float>(kInvSqrt2Pi));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xi = _mm256_loadu_ps(x + i);
    __m256 e;  // exp(-x^2 / 2)
    const __m256 erf = detail::avx2::erf(_mm256_mul_ps(xi, is2), &e);
    const __m256 cdf = _mm256_fmadd_ps(half, erf, half);
    const __m256 grad = _mm256_fmadd_ps(_mm256_mul_ps(xi, is2pi), e, cdf);
    _mm256_storeu_ps(dx + i, _mm256_fmadd_ps(_mm256_loadu_ps(dy + i), grad, _mm256_loadu_ps(dx + i)));
  }
  if (i < n) gelu_backward_kernel(dx + i, dy + i, x + i, n - i);
}
#endif

// Runs kernel(lo, hi) over [0, n) in OpenMP chunks of whole cache lines.
template <class F>
void parallel_chunks(int64_t n, F kernel) {
  constexpr int64_t kChunk = 1 << 14;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n >= detail::kParallelElems)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t lo = c * kChunk, hi = lo + kChunk < n ? lo + kChunk : n;
    kernel(lo, hi);
  }
}

}  // namespace

void gelu_forward_ref(float* y, const float* x, int64_t n) {
  SAV_CHECK(n >= 0, "gelu: n must be non-negative, got " << n);
  for (int64_t i = 0; i < n; ++i) {
    const double xi = x[i];
    y[i] = static_cast<float>(0.5 * xi * (1.0 + std::erf(xi * kInvSqrt2)));
  }
}

void gelu_backward_ref(float* dx, const float* dy, const float* x, int64_t n) {
  SAV_CHECK(n >= 0, "gelu: n must be non-negative, got " << n);
  if (!dx) return;
  for (int64_t i = 0; i < n; ++i) {
    const double xi = x[i];
    const double cdf = 0.5 * (1.0 + std::erf(xi * kInvSqrt2));
    const double pdf = kInvSqrt2Pi * std::exp(-0.5 * xi * xi);
    dx[i] += static_cast<float>(dy[i] * (cdf + xi * pdf));
  }
}

void gelu_forward(float* y, const float* x, int64_t n) {
  SAV_CHECK(n >= 0, "gelu: n must be non-negative, got " << n);
  if (n == 0) return;
  SAV_CHECK_PTR(y);
  SAV_CHECK_PTR(x);
#if SAV_HAVE_AVX2_KERNELS
  if (detail::use_avx2()) {
    parallel_chunks(n, [&](int64_t lo, int64_t hi) { gelu_forward_avx2(y + lo, x + lo, hi - lo); });
    return;
  }
#endif
  parallel_chunks(n, [&](int64_t lo, int64_t hi) { gelu_forward_kernel(y + lo, x + lo, hi - lo); });
}

void gelu_backward(float* dx, const float* dy, const float* x, int64_t n) {
  SAV_CHECK(n >= 0, "gelu: n must be non-negative, got " << n);
  if (n == 0 || !dx) return;
  SAV_CHECK_PTR(dy);
  SAV_CHECK_PTR(x);
#if SAV_HAVE_AVX2_KERNELS
  if (detail::use_avx2()) {
    parallel_chunks(n, [&](int64_t lo, int64_t hi) { gelu_backward_avx2(dx + lo, dy + lo, x + lo, hi - lo); });
    return;
  }
#endif
  parallel_chunks(n, [&](int64_t lo, int64_t hi) { gelu_backward_kernel(dx + lo, dy + lo, x + lo, hi - lo); });
}

}  // namespace sav::cpu
