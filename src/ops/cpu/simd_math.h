// shiftaddvit: private helpers of the CPU ops (not a public header).
//
// Branch-free float approximations of exp and erf written so that GCC vectorises loops that call them
// (the libm calls are not vectorised without -ffast-math), AVX2+FMA versions of them and a small
// register-blocked matrix product for the attention core, argument checks, and the OpenMP grain sizes
// shared by the op files.
//
//   #pragma omp simd
//   for (int i = 0; i < n; ++i) y[i] = sav::cpu::detail::exp_approx(x[i]);
//
//   if (detail::use_avx2()) my_kernel_avx2(...);   // a SAV_AVX2 function
//   else my_kernel_portable(...);
//
// Accuracy: exp_approx relative error ~2 ulp on [-87, 88] (inputs outside are clamped: exp(-inf) gives
// ~1e-38 rather than 0, harmless for softmax); erf_approx absolute error < 1.5e-7 (Abramowitz & Stegun
// 7.1.26). The AVX2 versions evaluate the same polynomials with fused multiply-adds.
//
// Instruction sets: the library is compiled for baseline x86-64. Loops that GCC vectorises well are
// marked SAV_SIMD_CLONES (one clone per instruction set, picked by the loader); hand-blocked kernels are
// SAV_AVX2 functions called only when use_avx2() says the CPU has AVX2 and FMA.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SAV_HAVE_AVX2_KERNELS 1
#else
#define SAV_HAVE_AVX2_KERNELS 0
#endif

#include "core/cpu_features.h"
#include "core/error.h"

namespace sav::cpu::detail {

// Clones a hot function for AVX-512 (x86-64-v4), AVX2+FMA (x86-64-v3) and baseline x86-64; the loader
// picks one at run time (ifunc), so the library stays portable while its loops use the widest vectors.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SAV_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SAV_SIMD_CLONES
#endif

#define SAV_AVX2 __attribute__((target("avx2,fma")))

// Test hook: when true, the ops take their portable paths even on AVX2 machines (so tests can check both).
inline bool force_portable_kernels = false;

// True when the hand-written AVX2+FMA kernels may run.
inline bool use_avx2() {
#if SAV_HAVE_AVX2_KERNELS
  const CpuFeatures& f = cpu_features();
  return f.avx2 && f.fma && !force_portable_kernels;
#else
  return false;
#endif
}

// A per-thread work buffer of at least n floats, 64-byte aligned (packed panels then never straddle cache
// lines), kept between calls so the steady state does not allocate. Each Slot is a separate buffer; a
// pointer stays valid until the same thread asks the same slot for more.
template <int Slot>
float* thread_buffer(int64_t n) {
  struct Buffer {
    float* p = nullptr;
    int64_t n = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  if (buf.n < n) {
    std::free(buf.p);
    const size_t bytes = (static_cast<size_t>(n) * sizeof(float) + 63) / 64 * 64;
    buf.p = static_cast<float*>(std::aligned_alloc(64, bytes));
    buf.n = buf.p ? n : 0;
    SAV_CHECK(buf.p != nullptr, "out of memory for " << bytes << " bytes of kernel work space");
  }
  return buf.p;
}

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

#if SAV_HAVE_AVX2_KERNELS
namespace avx2 {

// Lanes [0, n) set, n in [0, 8]: for _mm256_maskload_ps / _mm256_maskstore_ps and blends.
SAV_AVX2 inline __m256i lane_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

SAV_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

SAV_AVX2 inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x as exp_approx (same reduction and polynomial) with FMAs; NaN propagates. n = round(x / ln2) comes
// from adding 1.5 * 2^23, which also leaves n in the low mantissa bits for building 2^n.
SAV_AVX2 inline __m256 exp(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));  // NaN stays NaN
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 nm = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(nm, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // bits(nm) = bits(magic) + n; (n + 127) << 23 is 2^n.
  const __m256i e =
      _mm256_slli_epi32(_mm256_sub_epi32(_mm256_castps_si256(nm), _mm256_set1_epi32(0x4B400000 - 127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// erf(x) as erf_approx, and e^{-x^2} in *exp_mx2.
SAV_AVX2 inline __m256 erf(__m256 x, __m256* exp_mx2) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 ax = _mm256_andnot_ps(sign, x);
  const __m256 t =
      _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), ax, _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = exp(_mm256_mul_ps(_mm256_xor_ps(x, sign), x));
  *exp_mx2 = e;
  const __m256 y = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f));  // erf(|x|)
  return _mm256_or_ps(y, _mm256_and_ps(x, sign));
}

// One register tile of a small product: C (R, 8*NV) = alpha * A B (+ C if accumulate) (+ bias if not
// null), summed over k < K. A (R,K) element (r,k) at a[r*a_rs + k*a_ks] (row-major: a_ks = 1;
// transposed: a_rs = 1); B (K, 8*NV) rows at b + k*ldb; C rows at c + r*ldc; bias (8*NV) added to every
// row. With MASK the last 8-column vector of B, C and bias touches only the lanes in `mask` (loads stay
// in bounds).
template <int R, int NV, bool MASK>
SAV_AVX2 inline void gemm_tile(int K, const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb, float* c,
                               int64_t ldc, float alpha, bool accumulate, const float* bias, __m256i mask) {
  __m256 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int k = 0; k < K; ++k) {
    __m256 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = (MASK && v == NV - 1) ? _mm256_maskload_ps(b + 8 * v, mask) : _mm256_loadu_ps(b + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r * a_rs);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(ar, bv[v], acc[r][v]);
    }
    a += a_ks;
    b += ldb;
  }
  const __m256 va = _mm256_set1_ps(alpha);
  __m256 vb[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v)
    vb[v] = !bias                   ? _mm256_setzero_ps()
            : (MASK && v == NV - 1) ? _mm256_maskload_ps(bias + 8 * v, mask)
                                    : _mm256_loadu_ps(bias + 8 * v);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const bool masked = MASK && v == NV - 1;
      __m256 out = _mm256_fmadd_ps(acc[r][v], va, vb[v]);
      if (accumulate)
        out = _mm256_add_ps(out, masked ? _mm256_maskload_ps(cr + 8 * v, mask) : _mm256_loadu_ps(cr + 8 * v));
      if (masked)
        _mm256_maskstore_ps(cr + 8 * v, mask, out);
      else
        _mm256_storeu_ps(cr + 8 * v, out);
    }
  }
}

// All rows of one column block: register tiles of 6 rows (4 rows for 24-column blocks, 12 accumulators
// either way), then the leftover rows.
template <int NV, bool MASK>
SAV_AVX2 inline void gemm_rows(int rows, int K, const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb,
                               float* c, int64_t ldc, float alpha, bool accumulate, const float* bias, __m256i mask) {
  constexpr int RB = NV >= 3 ? 4 : 6;
  int r = 0;
  for (; r + RB <= rows; r += RB)
    gemm_tile<RB, NV, MASK>(K, a + r * a_rs, a_rs, a_ks, b, ldb, c + r * ldc, ldc, alpha, accumulate, bias, mask);
  a += r * a_rs;
  c += r * ldc;
  switch (rows - r) {
    case 5:  // only when RB == 6
      gemm_tile<RB == 6 ? 5 : 1, NV, MASK>(K, a, a_rs, a_ks, b, ldb, c, ldc, alpha, accumulate, bias, mask);
      break;
    case 4:
      gemm_tile<RB == 6 ? 4 : 1, NV, MASK>(K, a, a_rs, a_ks, b, ldb, c, ldc, alpha, accumulate, bias, mask);
      break;
    case 3:
      gemm_tile<3, NV, MASK>(K, a, a_rs, a_ks, b, ldb, c, ldc, alpha, accumulate, bias, mask);
      break;
    case 2:
      gemm_tile<2, NV, MASK>(K, a, a_rs, a_ks, b, ldb, c, ldc, alpha, accumulate, bias, mask);
      break;
    case 1:
      gemm_tile<1, NV, MASK>(K, a, a_rs, a_ks, b, ldb, c, ldc, alpha, accumulate, bias, mask);
      break;
    default:
      break;
  }
}

// All rows of one block of `cols` columns, 8*(NV-1) < cols <= 8*NV (the last vector masked if partial).
template <int NV>
SAV_AVX2 inline void gemm_block(int rows, int cols, int K, const float* a, int64_t a_rs, int64_t a_ks, const float* b,
                                int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate, const float* bias) {
  if (cols == 8 * NV)
    gemm_rows<NV, false>(rows, K, a, a_rs, a_ks, b, ldb, c, ldc, alpha, accumulate, bias, _mm256_set1_epi32(-1));
  else
    gemm_rows<NV, true>(rows, K, a, a_rs, a_ks, b, ldb, c, ldc, alpha, accumulate, bias,
                        lane_mask(cols - 8 * (NV - 1)));
}

// C (M, Nc) = alpha * A (M,K) B (K,Nc) (+ C if accumulate) (+ bias if not null), for products whose B
// sits in L1/L2 (one attention head). A addressed as in gemm_tile; B and C row-major with row strides
// ldb, ldc; bias (Nc). Columns go in blocks of 16; a remainder of at most 8 joins the last block (a
// 24-column block), so that narrow 8-column tiles (one B load per broadcast: load bound) only occur
// when Nc <= 8.
SAV_AVX2 inline void small_gemm(int M, int Nc, int K, const float* a, int64_t a_rs, int64_t a_ks, const float* b,
                                int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate,
                                const float* bias = nullptr) {
  const int n16 = Nc / 16, rem = Nc % 16;
  const int plain16 = rem != 0 && rem <= 8 && n16 > 0 ? n16 - 1 : n16;  // 16-blocks before the last block
  for (int j = 0; j < 16 * plain16; j += 16)
    gemm_block<2>(M, 16, K, a, a_rs, a_ks, b + j, ldb, c + j, ldc, alpha, accumulate, bias ? bias + j : nullptr);
  const int j = 16 * plain16, last = Nc - j;  // 0, 1..16 (Nc <= 16), 9..15, or 17..24
  const float* bj = bias ? bias + j : nullptr;
  if (last > 16)
    gemm_block<3>(M, last, K, a, a_rs, a_ks, b + j, ldb, c + j, ldc, alpha, accumulate, bj);
  else if (last > 8)
    gemm_block<2>(M, last, K, a, a_rs, a_ks, b + j, ldb, c + j, ldc, alpha, accumulate, bj);
  else if (last > 0)
    gemm_block<1>(M, last, K, a, a_rs, a_ks, b + j, ldb, c + j, ldc, alpha, accumulate, bj);
}

}  // namespace avx2
#endif  // SAV_HAVE_AVX2_KERNELS

}  // namespace sav::cpu::detail

// Shape and pointer checks shared by the op files.
#define SAV_CHECK_DIM(v) SAV_CHECK((v) > 0, #v " must be positive, got " << (v))
#define SAV_CHECK_PTR(p) SAV_CHECK((p) != nullptr, #p " must not be null")
