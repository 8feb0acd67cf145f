// shiftaddvit: shift linear layers (DeepShift-PS) on the CPU. Spec and formulas: shift_linear.h.
//
// Shapes: x (M,K)  p, s, W (F,K)  b (F)  y (M,F).
// Float path: materialise W = s_r 2^p_r once per call, then sgemm (OpenBLAS threads it).
// Integer path, per task (a block of kRowBlock = 32 rows x a range of outputs):
//   1. convert the rows to fixed point, transposed [k][row] (AVX2: 8x8 tiles), and check the row L1
//      bound that makes int32 overflow impossible;
//   2. per k-block of 32 inputs, build the shift planes x_int >> s for every shift s the weights use
//      (one arithmetic shift per activation and exponent);
//   3. per output j, add or subtract one plane row (32 rows = 4 AVX2 vectors) per nonzero weight, with
//      the accumulators carried across k-blocks in a small buffer;
//   4. convert back (x 2^-f, exact) and add the bias.
// The inner loop of 3 is load + add/sub only: no shift, no multiplication. Each term is still the
// spec's floor(x_int / 2^s), so the result is bit-exact to shift_linear_forward_int_ref; this is about
// twice as fast on Zen 4 as a variable shift per weight (vpsravd/vpsrad issue one per cycle there).
#include "ops/cpu/shift_linear.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SAV_SHIFT_X86 1
#endif

#include "core/blas.h"
#include "core/cpu_features.h"
#include "core/error.h"

namespace sav::cpu {

namespace {

constexpr double kLn2 = 0.69314718055994530942;
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

void check_dims(const char* op, int M, int K, int F) {
  SAV_CHECK(M >= 0, op << ": M (rows) must be non-negative, got " << M);
  SAV_CHECK(K > 0, op << ": K (in-features) must be positive, got " << K);
  SAV_CHECK(F > 0, op << ": F (out-features) must be positive, got " << F);
}

void check_range(const char* op, int pmin, int pmax) {
  SAV_CHECK(pmin <= pmax, op << ": exponent range needs pmin <= pmax, got [" << pmin << ", " << pmax << "]");
  SAV_CHECK(pmin >= -100 && pmax <= 100,
            op << ": exponent range [" << pmin << ", " << pmax << "] is outside [-100, 100]");
}

void check_int_range(const char* op, int pmin, int pmax) {
  check_range(op, pmin, pmax);
  SAV_CHECK(pmax <= 0 && pmin >= -31, op << ": the integer shift kernel needs -31 <= pmin <= pmax <= 0, got ["
                                          << pmin << ", " << pmax << "]; use the float path for other ranges");
}

void check_frac_bits(const char* op, int frac_bits) {
  SAV_CHECK(frac_bits >= 0 && frac_bits <= 30, op << ": frac_bits must be in [0, 30], got " << frac_bits);
}

// p_r = clamp(round_half_even(p), pmin, pmax); NaN -> pmin. Branch-free (vectorisable): p is first
// clamped to [pmin-1, pmax+1], which does not change the result since rounding is monotonic.
inline int round_exponent(float p, int pmin, int pmax) {
  const float lo = static_cast<float>(pmin - 1), hi = static_cast<float>(pmax + 1);
  const float v = std::min(std::max(lo, p), hi);  // std::max(lo, NaN) = lo
  const int q = static_cast<int>(v);              // toward zero
  const float d = v - static_cast<float>(q);
  const int odd = q & 1;
  const int up = static_cast<int>(d > 0.5f) | (static_cast<int>(d == 0.5f) & odd);
  const int down = static_cast<int>(d < -0.5f) | (static_cast<int>(d == -0.5f) & odd);
  return std::min(std::max(q + up - down, pmin), pmax);
}

// 2^e as a float, exact, for e in [-126, 127] (the ranges here are within [-100, 100]); no libm call.
inline float pow2f(int e) { return std::bit_cast<float>(static_cast<uint32_t>(e + 127) << 23); }

// s_r = sign(round_half_even(s)): +1 for s > 0.5, -1 for s < -0.5, else 0 (round(+-0.5) = 0); NaN -> 0.
inline int round_sign(float s) { return static_cast<int>(s > 0.5f) - static_cast<int>(s < -0.5f); }

inline int code_bits(const std::vector<uint8_t>& bytes, int64_t n) {
  int64_t bit = n * 5;
  int64_t byte = bit >> 3;
  int off = static_cast<int>(bit & 7);
  unsigned v = bytes[byte];
  if (off > 3) v |= static_cast<unsigned>(bytes[byte + 1]) << 8;
  return static_cast<int>((v >> off) & 31u);
}

inline void put_code_bits(std::vector<uint8_t>& bytes, int64_t n, unsigned code) {
  int64_t bit = n * 5;
  int64_t byte = bit >> 3;
  int off = static_cast<int>(bit & 7);
  unsigned v = code << off;
  bytes[byte] |= static_cast<uint8_t>(v & 0xffu);
  if (off > 3) bytes[byte + 1] |= static_cast<uint8_t>(v >> 8);
}

// ---- fixed-point conversion (shared by the kernel and its reference, so both see the same x_int) ----

// Round half to even for |v| < 2^31, without libm and independent of the FP rounding mode.
inline int32_t round_half_even_i32(float v) {
  const int32_t q = static_cast<int32_t>(v);  // toward zero
  const float d = v - static_cast<float>(q);   // exact fractional part, in (-1, 1)
  const int32_t odd = q & 1;
  // Branch-free: the rounding direction of random data is unpredictable.
  const int32_t up = static_cast<int32_t>(d > 0.5f) | (static_cast<int32_t>(d == 0.5f) & odd);
  const int32_t down = static_cast<int32_t>(d < -0.5f) | (static_cast<int32_t>(d == -0.5f) & odd);
  return q + up - down;
}

// x * 2^f rounded half to even; false when it is not finite or does not fit int32.
inline bool to_fixed(float x, float scale, int32_t* q) {
  const float v = x * scale;  // exact: scale is a power of two (or overflows to inf, rejected below)
  if (!(std::fabs(v) < 2147483648.0f)) return false;
  *q = round_half_even_i32(v);
  return true;
}

[[noreturn]] void throw_overflow(const char* op, const float* x, int64_t row, int K, int frac_bits) {
  double l1 = 0.0;
  bool finite = true;
  for (int k = 0; k < K; ++k) {
    float v = x[row * K + k];
    if (!std::isfinite(v)) finite = false;
    l1 += std::fabs(static_cast<double>(v));
  }
  if (!finite) SAV_THROW(op << ": row " << row << " of x has a non-finite value (NaN/Inf)");
  SAV_THROW(op << ": row " << row << " of x does not fit Q" << (31 - frac_bits) << "." << frac_bits
               << " accumulation (sum_k |x| = " << l1 << ", times 2^" << frac_bits
               << " must stay <= 2^31-1); use fewer fractional bits, e.g. shift_linear_int_frac_bits(x, M, K) = "
               << "the largest that fits, or the float path");
}

// ---- integer kernel: blocked transposed fixed-point activations ----

constexpr int kRowBlock = 32;     // rows per block: 4 AVX2 vectors
constexpr int kShiftKBlock = 32;  // inputs per k-block: the shift planes of a block stay in L1/L2

// xt: block layout [k][r], kRowBlock ints per k. Converts rows [i0, i0+rows) of x; zero-fills the rest.
// Returns the first offending row (absolute index) or -1.
int64_t convert_block(int32_t* xt, const float* x, int64_t i0, int rows, int K, float scale) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + (i0 + r) * K;
    int64_t l1 = 0;
    for (int k = 0; k < K; ++k) {
      int32_t q;
      if (!to_fixed(xr[k], scale, &q)) return i0 + r;
      l1 += q < 0 ? -static_cast<int64_t>(q) : q;
      xt[static_cast<int64_t>(k) * kRowBlock + r] = q;
    }
    if (l1 > kInt32Max) return i0 + r;
  }
  for (int r = rows; r < kRowBlock; ++r)
    for (int k = 0; k < K; ++k) xt[static_cast<int64_t>(k) * kRowBlock + r] = 0;
  return -1;
}

#ifdef SAV_SHIFT_X86
// 8x8 transpose of floats: out[c][r] = in[r][c].
__attribute__((target("avx2"))) inline void transpose8x8(const __m256 v[8], __m256 out[8]) {
  const __m256 a0 = _mm256_unpacklo_ps(v[0], v[1]), a1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 a2 = _mm256_unpacklo_ps(v[2], v[3]), a3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 a4 = _mm256_unpacklo_ps(v[4], v[5]), a5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 a6 = _mm256_unpacklo_ps(v[6], v[7]), a7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
  const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
  const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
  const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
  out[0] = _mm256_permute2f128_ps(b0, b4, 0x20), out[1] = _mm256_permute2f128_ps(b1, b5, 0x20);
  out[2] = _mm256_permute2f128_ps(b2, b6, 0x20), out[3] = _mm256_permute2f128_ps(b3, b7, 0x20);
  out[4] = _mm256_permute2f128_ps(b0, b4, 0x31), out[5] = _mm256_permute2f128_ps(b1, b5, 0x31);
  out[6] = _mm256_permute2f128_ps(b2, b6, 0x31), out[7] = _mm256_permute2f128_ps(b3, b7, 0x31);
}

// AVX2 version of convert_block: 8x8 tiles of x are scaled, rounded half to even (explicit rounding
// mode, so independent of MXCSR), range-checked, transposed in registers and stored; the row L1 norms
// are then summed in int64 lanes. Same x_int and same verdict as convert_block (which it falls back to
// for locating an offending row).
__attribute__((target("avx2"))) int64_t convert_block_avx2(int32_t* xt, const float* x, int64_t i0, int rows, int K,
                                                           float scale) {
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 limit = _mm256_set1_ps(2147483648.0f);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  const int K8 = K & ~7;
  for (int g = 0; g < kRowBlock / 8; ++g) {
    const float* xr[8];
    bool live[8];
    for (int r = 0; r < 8; ++r) {
      live[r] = 8 * g + r < rows;
      xr[r] = live[r] ? x + (i0 + 8 * g + r) * K : x;
    }
    for (int k0 = 0; k0 < K8; k0 += 8) {
      __m256 v[8];
      for (int r = 0; r < 8; ++r) {
        v[r] = live[r] ? _mm256_mul_ps(_mm256_loadu_ps(xr[r] + k0), vscale) : _mm256_setzero_ps();
        ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_and_ps(v[r], absmask), limit, _CMP_LT_OQ));
        v[r] = _mm256_round_ps(v[r], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      }
      __m256 t[8];
      transpose8x8(v, t);
      for (int c = 0; c < 8; ++c)
        _mm256_store_si256(reinterpret_cast<__m256i*>(xt + static_cast<int64_t>(k0 + c) * kRowBlock + 8 * g),
                           _mm256_cvttps_epi32(t[c]));
    }
  }
  // Tail columns k >= K8: scalar.
  for (int r = 0; r < kRowBlock; ++r)
    for (int k = K8; k < K; ++k) {
      int32_t q = 0;
      if (r < rows && !to_fixed(x[(i0 + r) * K + k], scale, &q)) return convert_block(xt, x, i0, rows, K, scale);
      xt[static_cast<int64_t>(k) * kRowBlock + r] = q;
    }
  if (_mm256_movemask_ps(ok) != 0xff) return convert_block(xt, x, i0, rows, K, scale);
  // Row L1 norms in int64 lanes (|q| < 2^31 after the range check, so abs and zero-extension are exact).
  __m256i l1[8];
  for (auto& a : l1) a = _mm256_setzero_si256();
  for (int k = 0; k < K; ++k)
    for (int g = 0; g < kRowBlock / 8; ++g) {
      const __m256i q = _mm256_abs_epi32(
          _mm256_load_si256(reinterpret_cast<const __m256i*>(xt + static_cast<int64_t>(k) * kRowBlock + 8 * g)));
      l1[2 * g] = _mm256_add_epi64(l1[2 * g], _mm256_cvtepu32_epi64(_mm256_castsi256_si128(q)));
      l1[2 * g + 1] = _mm256_add_epi64(l1[2 * g + 1], _mm256_cvtepu32_epi64(_mm256_extracti128_si256(q, 1)));
    }
  const __m256i lim = _mm256_set1_epi64x(kInt32Max);
  __m256i over = _mm256_setzero_si256();
  for (auto& a : l1) over = _mm256_or_si256(over, _mm256_cmpgt_epi64(a, lim));
  if (!_mm256_testz_si256(over, over)) return convert_block(xt, x, i0, rows, K, scale);
  return -1;
}
#endif

// One task: rows [i0, i0+rows) of one row block (xt, layout [k][kRowBlock]), outputs [j0, j1).
// For each k-block of w.k_block inputs, the "shift planes" plane[s][k][r] = x_int[r][k] >> (shift_lo + s)
// are built once (one shift per activation and exponent), then every nonzero weight (j, k, shift) is a
// single add or subtract of one plane row into the accumulators of output j: the per-term floor of the
// spec, with no shift and no multiplication in the inner loop. acc: (j1-j0) x kRowBlock int32 work space;
// planes: n_shift * k_block * kRowBlock int32 work space. Integer sums are exact (no overflow by the row
// L1 check), so the order of summation does not matter and every kernel is bit-exact to the reference.
struct TaskArgs {
  float* y;
  const int32_t* xt;
  const ShiftKernelWeights* w;
  const float* b;
  int64_t i0;
  int rows, j0, j1, F, K;
  float out_scale;
  int32_t* acc;
  int32_t* planes;
};

void write_outputs(const TaskArgs& t) {
  for (int r = 0; r < t.rows; ++r) {
    float* yr = t.y + (t.i0 + r) * t.F;
    for (int j = t.j0; j < t.j1; ++j)
      yr[j] = static_cast<float>(t.acc[static_cast<int64_t>(j - t.j0) * kRowBlock + r]) * t.out_scale +
              (t.b ? t.b[j] : 0.0f);
  }
}

// Portable kernel: plain loops over the kRowBlock rows (vectorisable with SSE2).
void shift_task_scalar(const TaskArgs& t) {
  const ShiftKernelWeights& w = *t.w;
  const int KB = w.k_block, nkb = (t.K + KB - 1) / KB, ns = w.shift_hi - w.shift_lo + 1;
  for (int kb = 0; kb < nkb; ++kb) {
    const int k0 = kb * KB, kn = std::min(KB, t.K - k0);
    for (int s = 0; s < ns; ++s)
      for (int kl = 0; kl < kn; ++kl) {
        const int32_t* src = t.xt + static_cast<int64_t>(k0 + kl) * kRowBlock;
        int32_t* dst = t.planes + (static_cast<int64_t>(s) * KB + kl) * kRowBlock;
        const int sh = w.shift_lo + s;
        for (int r = 0; r < kRowBlock; ++r) dst[r] = src[r] >> sh;
      }
    for (int j = t.j0; j < t.j1; ++j) {
      int32_t* acc = t.acc + static_cast<int64_t>(j - t.j0) * kRowBlock;
      int32_t a[kRowBlock];  // a local copy the compiler can keep in registers
      for (int r = 0; r < kRowBlock; ++r) a[r] = kb == 0 ? 0 : acc[r];
      const int64_t seg = static_cast<int64_t>(kb) * t.F + j;
      const int32_t e0 = w.seg_start[seg], e1 = w.seg_start[seg + 1], em = e0 + w.seg_npos[seg];
      for (int32_t e = e0; e < em; ++e) {
        const int32_t* xp = t.planes + static_cast<int64_t>(w.entry[e]) * kRowBlock;
#pragma GCC unroll 32
        for (int r = 0; r < kRowBlock; ++r) a[r] += xp[r];
      }
      for (int32_t e = em; e < e1; ++e) {
        const int32_t* xp = t.planes + static_cast<int64_t>(w.entry[e]) * kRowBlock;
#pragma GCC unroll 32
        for (int r = 0; r < kRowBlock; ++r) a[r] -= xp[r];
      }
      for (int r = 0; r < kRowBlock; ++r) acc[r] = a[r];
    }
  }
  write_outputs(t);
}

#ifdef SAV_SHIFT_X86
__attribute__((target("avx2"))) void shift_task_avx2(const TaskArgs& t) {
  static_assert(kRowBlock == 32, "the AVX2 kernel holds a row block in 4 vectors of 8 rows");
  const ShiftKernelWeights& w = *t.w;
  const int KB = w.k_block, nkb = (t.K + KB - 1) / KB, ns = w.shift_hi - w.shift_lo + 1;
  const uint32_t* entry = w.entry.data();
  for (int kb = 0; kb < nkb; ++kb) {
    const int k0 = kb * KB, kn = std::min(KB, t.K - k0);
    for (int s = 0; s < ns; ++s) {
      const __m128i c = _mm_cvtsi32_si128(w.shift_lo + s);
      for (int kl = 0; kl < kn; ++kl) {
        const __m256i* src = reinterpret_cast<const __m256i*>(t.xt + static_cast<int64_t>(k0 + kl) * kRowBlock);
        __m256i* dst = reinterpret_cast<__m256i*>(t.planes + (static_cast<int64_t>(s) * KB + kl) * kRowBlock);
        for (int v = 0; v < 4; ++v) _mm256_store_si256(dst + v, _mm256_sra_epi32(_mm256_load_si256(src + v), c));
      }
    }
    const int32_t* seg_start = w.seg_start.data() + static_cast<int64_t>(kb) * t.F;
    const int32_t* seg_npos = w.seg_npos.data() + static_cast<int64_t>(kb) * t.F;
    for (int j = t.j0; j < t.j1; ++j) {
      __m256i* ap = reinterpret_cast<__m256i*>(t.acc + static_cast<int64_t>(j - t.j0) * kRowBlock);
      __m256i a0, a1, a2, a3;
      if (kb == 0) {
        a0 = a1 = a2 = a3 = _mm256_setzero_si256();
      } else {
        a0 = _mm256_load_si256(ap + 0), a1 = _mm256_load_si256(ap + 1);
        a2 = _mm256_load_si256(ap + 2), a3 = _mm256_load_si256(ap + 3);
      }
      const int32_t e0 = seg_start[j], e1 = seg_start[j + 1], em = e0 + seg_npos[j];
      for (int32_t e = e0; e < em; ++e) {
        const __m256i* xp = reinterpret_cast<const __m256i*>(t.planes + static_cast<int64_t>(entry[e]) * kRowBlock);
        a0 = _mm256_add_epi32(a0, _mm256_load_si256(xp + 0));
        a1 = _mm256_add_epi32(a1, _mm256_load_si256(xp + 1));
        a2 = _mm256_add_epi32(a2, _mm256_load_si256(xp + 2));
        a3 = _mm256_add_epi32(a3, _mm256_load_si256(xp + 3));
      }
      for (int32_t e = em; e < e1; ++e) {
        const __m256i* xp = reinterpret_cast<const __m256i*>(t.planes + static_cast<int64_t>(entry[e]) * kRowBlock);
        a0 = _mm256_sub_epi32(a0, _mm256_load_si256(xp + 0));
        a1 = _mm256_sub_epi32(a1, _mm256_load_si256(xp + 1));
        a2 = _mm256_sub_epi32(a2, _mm256_load_si256(xp + 2));
        a3 = _mm256_sub_epi32(a3, _mm256_load_si256(xp + 3));
      }
      _mm256_store_si256(ap + 0, a0), _mm256_store_si256(ap + 1, a1);
      _mm256_store_si256(ap + 2, a2), _mm256_store_si256(ap + 3, a3);
    }
  }
  // Outputs: 8x8 tiles of acc [j][r] -> y [r][j], converted and scaled (exact: a power of two), + bias.
  // Same float operations as write_outputs, so the result is bit-identical to the portable kernel.
  const __m256 scale = _mm256_set1_ps(t.out_scale);
  const int nj = t.j1 - t.j0, nj8 = nj & ~7;
  for (int g = 0; g * 8 < t.rows; ++g) {
    const int rn = std::min(8, t.rows - 8 * g);
    for (int jj = 0; jj < nj8; jj += 8) {
      __m256 v[8], o[8];
      for (int c = 0; c < 8; ++c)
        v[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(
                                 t.acc + static_cast<int64_t>(jj + c) * kRowBlock + 8 * g))),
                             scale);
      transpose8x8(v, o);
      const __m256 bias = t.b ? _mm256_loadu_ps(t.b + t.j0 + jj) : _mm256_setzero_ps();
      for (int r = 0; r < rn; ++r)
        _mm256_storeu_ps(t.y + (t.i0 + 8 * g + r) * t.F + t.j0 + jj, _mm256_add_ps(o[r], bias));
    }
    for (int r = 0; r < rn; ++r) {
      float* yr = t.y + (t.i0 + 8 * g + r) * t.F;
      for (int jj = nj8; jj < nj; ++jj)
        yr[t.j0 + jj] = static_cast<float>(t.acc[static_cast<int64_t>(jj) * kRowBlock + 8 * g + r]) * t.out_scale +
                        (t.b ? t.b[t.j0 + jj] : 0.0f);
    }
  }
}
#endif

ShiftIntIsa resolve_isa(ShiftIntIsa isa) {
#ifdef SAV_SHIFT_X86
  const bool have_avx2 = cpu_features().avx2;
#else
  const bool have_avx2 = false;
#endif
  if (isa == shift_isa_auto) return have_avx2 ? shift_isa_avx2 : shift_isa_scalar;
  if (isa == shift_isa_avx2)
    SAV_CHECK(have_avx2, "shift_linear_forward_int: the AVX2 kernel was requested but this CPU has no AVX2 ("
                             << cpu_features_str() << "); use shift_isa_auto");
  SAV_CHECK(isa == shift_isa_scalar || isa == shift_isa_avx2, "shift_linear_forward_int: unknown isa " << int(isa));
  return isa;
}

struct AlignedFree {
  void operator()(int32_t* p) const { std::free(p); }
};

}  // namespace

float shift_round_half_even(float v) {
  if (std::fabs(v) < 2147483648.0f) return static_cast<float>(round_half_even_i32(v));
  float r = std::round(v);  // half away from zero (inf, NaN, and |v| >= 2^31, which is integral anyway)
  if (std::fabs(v - std::trunc(v)) == 0.5f) r = 2.0f * std::round(0.5f * v);
  return r;
}

// ---- materialisation and conversion ----

void shift_linear_weights(float* W, const float* p, const float* s, int F, int K, int pmin, int pmax) {
  check_dims("shift_linear_weights", 0, K, F);
  check_range("shift_linear_weights", pmin, pmax);
  const int64_t n = static_cast<int64_t>(F) * K;
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    const int sg = round_sign(s[i]);
    // sign bit from sg, magnitude 2^p_r, or +0 for sg == 0: bit operations only.
    const uint32_t mag = static_cast<uint32_t>(round_exponent(p[i], pmin, pmax) + 127) << 23;
    const uint32_t bits = (sg != 0 ? mag : 0u) | (sg < 0 ? 0x80000000u : 0u);
    W[i] = std::bit_cast<float>(bits);
  }
}

void shift_from_dense(float* p, float* s, const float* w, int F, int K, int pmin, int pmax) {
  check_dims("shift_from_dense", 0, K, F);
  check_range("shift_from_dense", pmin, pmax);
  const int64_t n = static_cast<int64_t>(F) * K;
  for (int64_t i = 0; i < n; ++i) {
    const float v = w[i];
    SAV_CHECK(std::isfinite(v), "shift_from_dense: weight " << i << " (row " << i / K << ", col " << i % K
                                                            << ") is not finite (" << v << ")");
    if (v == 0.0f) {
      s[i] = 0.0f;
      p[i] = static_cast<float>(pmin);
      continue;
    }
    s[i] = v > 0.0f ? 1.0f : -1.0f;
    // log2 in double: exact at powers of two, and no float rounding can move a value across the tie.
    const double l = std::log2(std::fabs(static_cast<double>(v)));
    double r = std::round(l);
    if (std::fabs(l - std::trunc(l)) == 0.5) r = 2.0 * std::round(0.5 * l);  // ties to even, as torch.round
    r = std::clamp(r, static_cast<double>(pmin), static_cast<double>(pmax));
    p[i] = static_cast<float>(r);
  }
}

// ---- float path: reference ----

void shift_linear_forward_ref(float* y, const float* x, const float* p, const float* s, const float* b, int M,
                              int K, int F, int pmin, int pmax) {
  check_dims("shift_linear_forward_ref", M, K, F);
  check_range("shift_linear_forward_ref", pmin, pmax);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < F; ++j) {
      double acc = b ? b[j] : 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const int sg = round_sign(s[j * K + k]);
        const double wv = sg == 0 ? 0.0 : std::ldexp(static_cast<double>(sg), round_exponent(p[j * K + k], pmin, pmax));
        acc += static_cast<double>(x[i * K + k]) * wv;
      }
      y[i * F + j] = static_cast<float>(acc);
    }
}

void shift_linear_backward_ref(float* dx, float* dp, float* ds, float* db, const float* dy, const float* x,
                               const float* p, const float* s, int M, int K, int F, int pmin, int pmax) {
  check_dims("shift_linear_backward_ref", M, K, F);
  check_range("shift_linear_backward_ref", pmin, pmax);
  auto weight = [&](int64_t idx, double* pow2) {
    *pow2 = std::ldexp(1.0, round_exponent(p[idx], pmin, pmax));
    return round_sign(s[idx]) * *pow2;
  };
  if (dx) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t k = 0; k < K; ++k) {
        double acc = 0.0, pw;
        for (int64_t j = 0; j < F; ++j) acc += static_cast<double>(dy[i * F + j]) * weight(j * K + k, &pw);
        dx[i * K + k] += static_cast<float>(acc);
      }
  }
  if (dp || ds) {
    for (int64_t j = 0; j < F; ++j)
      for (int64_t k = 0; k < K; ++k) {
        double dw = 0.0, pw;
        for (int64_t i = 0; i < M; ++i) dw += static_cast<double>(dy[i * F + j]) * x[i * K + k];
        const double wv = weight(j * K + k, &pw);
        if (dp) dp[j * K + k] += static_cast<float>(dw * wv * kLn2);
        if (ds) ds[j * K + k] += static_cast<float>(dw * pw);
      }
  }
  if (db) {
    for (int64_t j = 0; j < F; ++j) {
      double acc = 0.0;
      for (int64_t i = 0; i < M; ++i) acc += dy[i * F + j];
      db[j] += static_cast<float>(acc);
    }
  }
}

// ---- float path: fast ----

void shift_linear_forward(float* y, const float* x, const float* p, const float* s, const float* b, int M, int K,
                          int F, int pmin, int pmax, float* scratch) {
  check_dims("shift_linear_forward", M, K, F);
  check_range("shift_linear_forward", pmin, pmax);
  if (M == 0) return;
  std::vector<float> own;
  if (!scratch) {
    own.resize(static_cast<size_t>(F) * K);
    scratch = own.data();
  }
  shift_linear_weights(scratch, p, s, F, K, pmin, pmax);
  float beta = 0.0f;
  if (b) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * F >= (1 << 16))
    for (int64_t i = 0; i < M; ++i) std::copy(b, b + F, y + i * F);
    beta = 1.0f;
  }
  sgemm(false, true, M, F, K, 1.0f, x, K, scratch, K, beta, y, F);
}

void shift_linear_backward(float* dx, float* dp, float* ds, float* db, const float* dy, const float* x,
                           const float* p, const float* s, int M, int K, int F, int pmin, int pmax,
                           float* scratch) {
  check_dims("shift_linear_backward", M, K, F);
  check_range("shift_linear_backward", pmin, pmax);
  if (M == 0) return;
  const int64_t n = static_cast<int64_t>(F) * K;
  std::vector<float> own;
  if (!scratch && (dx || dp || ds)) {
    own.resize(static_cast<size_t>(2 * n));
    scratch = own.data();
  }
  if (dx) {
    shift_linear_weights(scratch, p, s, F, K, pmin, pmax);
    sgemm(false, false, M, K, F, 1.0f, dy, F, scratch, K, 1.0f, dx, K);  // dx (M,K) += dy (M,F) W (F,K)
  }
  if (dp || ds) {
    float* dW = scratch + n;
    sgemm(true, false, F, K, M, 1.0f, dy, F, x, K, 0.0f, dW, K);  // dW (F,K) = dy^T x
    const float ln2 = static_cast<float>(kLn2);
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
    for (int64_t i = 0; i < n; ++i) {
      const float pw = pow2f(round_exponent(p[i], pmin, pmax));
      if (dp) dp[i] += dW[i] * (static_cast<float>(round_sign(s[i])) * pw * ln2);
      if (ds) ds[i] += dW[i] * pw;
    }
  }
  if (db) {
    constexpr int kCols = 256;
    const int chunks = (F + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * F >= (1 << 16))
    for (int c = 0; c < chunks; ++c) {
      const int j0 = c * kCols, j1 = std::min(F, j0 + kCols);
      float acc[kCols] = {};
      for (int64_t i = 0; i < M; ++i) {
        const float* row = dy + i * F;
        for (int j = j0; j < j1; ++j) acc[j - j0] += row[j];
      }
      for (int j = j0; j < j1; ++j) db[j] += acc[j - j0];
    }
  }
}

// ---- packed storage ----

uint8_t shift_code_encode(int sign, int p, int pmin, int pmax) {
  check_range("shift_code_encode", pmin, pmax);
  SAV_CHECK(pmax - pmin <= 14, "shift_code_encode: the 5-bit code holds 15 exponents, range [" << pmin << ", "
                                                                                              << pmax << "] has "
                                                                                              << pmax - pmin + 1);
  SAV_CHECK(sign >= -1 && sign <= 1, "shift_code_encode: sign must be -1, 0 or 1, got " << sign);
  if (sign == 0) return 0;
  SAV_CHECK(p >= pmin && p <= pmax, "shift_code_encode: exponent " << p << " outside [" << pmin << ", " << pmax << "]");
  return static_cast<uint8_t>(((sign < 0 ? 1 : 0) << 4) | (pmax - p + 1));
}

void shift_code_decode(uint8_t code, int pmin, int pmax, int* sign, int* p) {
  SAV_CHECK(code < 32, "shift_code_decode: code " << int(code) << " is not a 5-bit value");
  if (code == 0) {
    *sign = 0;
    *p = pmin;
    return;
  }
  const int low = code & 15;
  SAV_CHECK(low != 0, "shift_code_decode: code 16 (negative zero) is invalid; corrupt checkpoint?");
  SAV_CHECK(low <= pmax - pmin + 1, "shift_code_decode: code " << int(code) << " means exponent " << pmax - low + 1
                                                               << ", below pmin = " << pmin
                                                               << "; wrong range or corrupt checkpoint?");
  *sign = (code & 16) ? -1 : 1;
  *p = pmax - low + 1;
}

PackedShift pack_shift(const float* p, const float* s, int F, int K, int pmin, int pmax) {
  check_dims("pack_shift", 0, K, F);
  check_range("pack_shift", pmin, pmax);
  SAV_CHECK(pmax - pmin <= 14, "pack_shift: the 5-bit code holds 15 exponents, range [" << pmin << ", " << pmax
                                                                                      << "] has " << pmax - pmin + 1);
  PackedShift out;
  out.F = F;
  out.K = K;
  out.pmin = pmin;
  out.pmax = pmax;
  const int64_t n = static_cast<int64_t>(F) * K;
  out.codes.assign(static_cast<size_t>((n * 5 + 7) / 8), 0);
  for (int64_t i = 0; i < n; ++i)
    put_code_bits(out.codes, i, shift_code_encode(round_sign(s[i]), round_exponent(p[i], pmin, pmax), pmin, pmax));
  return out;
}

void unpack_shift(float* p, float* s, const PackedShift& packed) {
  check_dims("unpack_shift", 0, packed.K, packed.F);
  const int64_t n = static_cast<int64_t>(packed.F) * packed.K;
  SAV_CHECK(static_cast<int64_t>(packed.codes.size()) == (n * 5 + 7) / 8,
            "unpack_shift: " << packed.codes.size() << " code bytes for a " << packed.F << "x" << packed.K
                             << " weight, expected " << (n * 5 + 7) / 8);
  for (int64_t i = 0; i < n; ++i) {
    int sg, e;
    shift_code_decode(static_cast<uint8_t>(code_bits(packed.codes, i)), packed.pmin, packed.pmax, &sg, &e);
    p[i] = static_cast<float>(e);
    s[i] = static_cast<float>(sg);
  }
}

// ---- integer kernel ----

ShiftKernelWeights shift_kernel_prepare(const float* p, const float* s, int F, int K, int pmin, int pmax) {
  check_dims("shift_kernel_prepare", 0, K, F);
  check_int_range("shift_kernel_prepare", pmin, pmax);
  ShiftKernelWeights w;
  w.F = F;
  w.K = K;
  w.k_block = kShiftKBlock;
  const int64_t n = static_cast<int64_t>(F) * K;
  int64_t nnz = 0;
  int lo = 31, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (round_sign(s[i]) == 0) continue;
    ++nnz;
    const int sh = -round_exponent(p[i], pmin, pmax);
    lo = std::min(lo, sh);
    hi = std::max(hi, sh);
  }
  SAV_CHECK(nnz <= kInt32Max, "shift_kernel_prepare: too many nonzero weights (" << nnz << ")");
  if (nnz == 0) lo = hi = 0;
  w.shift_lo = lo;
  w.shift_hi = hi;
  const int KB = w.k_block, nkb = (K + KB - 1) / KB;
  w.seg_start.assign(static_cast<size_t>(nkb) * F + 1, 0);
  w.seg_npos.assign(static_cast<size_t>(nkb) * F, 0);
  w.entry.reserve(static_cast<size_t>(nnz));
  for (int kb = 0; kb < nkb; ++kb)
    for (int64_t j = 0; j < F; ++j) {
      const int64_t seg = static_cast<int64_t>(kb) * F + j;
      w.seg_start[seg] = static_cast<int32_t>(w.entry.size());
      for (int want : {1, -1}) {
        for (int k = kb * KB; k < std::min(K, (kb + 1) * KB); ++k) {
          if (round_sign(s[j * K + k]) != want) continue;
          const int sh = -round_exponent(p[j * K + k], pmin, pmax);
          w.entry.push_back(static_cast<uint32_t>((sh - lo) * KB + (k - kb * KB)));
        }
        if (want == 1) w.seg_npos[seg] = static_cast<int32_t>(w.entry.size()) - w.seg_start[seg];
      }
    }
  w.seg_start.back() = static_cast<int32_t>(w.entry.size());
  return w;
}

ShiftKernelWeights shift_kernel_prepare(const PackedShift& packed) {
  const size_t n = static_cast<size_t>(packed.F) * packed.K;
  std::vector<float> p(n), s(n);
  unpack_shift(p.data(), s.data(), packed);
  return shift_kernel_prepare(p.data(), s.data(), packed.F, packed.K, packed.pmin, packed.pmax);
}

const char* shift_int_isa_name(ShiftIntIsa isa) {
  return resolve_isa(isa) == shift_isa_avx2 ? "avx2" : "scalar";
}

int shift_linear_int_frac_bits(const float* x, int M, int K, int max_frac_bits) {
  SAV_CHECK(M >= 0 && K > 0, "shift_linear_int_frac_bits: bad shape M=" << M << " K=" << K);
  check_frac_bits("shift_linear_int_frac_bits", max_frac_bits);
  double l1max = 0.0;
  int64_t bad = -1;
  for (int64_t i = 0; i < M && bad < 0; ++i) {
    double l1 = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const float v = x[i * K + k];
      if (!std::isfinite(v)) {
        bad = i;
        break;
      }
      l1 += std::fabs(static_cast<double>(v));
    }
    l1max = std::max(l1max, l1);
  }
  if (bad >= 0) throw_overflow("shift_linear_int_frac_bits", x, bad, K, 0);
  // sum |round(x 2^f)| <= l1 2^f + K/2; the double sum of K terms is off by far less than the margin.
  for (int f = max_frac_bits; f >= 0; --f) {
    const double bound = l1max * std::ldexp(1.0, f) * (1.0 + 1e-12) + 0.5 * K;
    if (bound <= static_cast<double>(kInt32Max)) return f;
  }
  SAV_THROW("shift_linear_int_frac_bits: the largest row of x has sum_k |x| = "
            << l1max << ", which does not fit an int32 accumulator even with 0 fractional bits; use the float path");
}

void shift_linear_forward_int(float* y, const float* x, const ShiftKernelWeights& w, const float* b, int M, int K,
                              int F, int frac_bits, ShiftIntIsa isa) {
  check_dims("shift_linear_forward_int", M, K, F);
  check_frac_bits("shift_linear_forward_int", frac_bits);
  SAV_CHECK(w.F == F && w.K == K, "shift_linear_forward_int: weights are " << w.F << "x" << w.K << ", call asks for "
                                                                            << F << "x" << K);
  {
    const int64_t segs = w.k_block > 0 ? static_cast<int64_t>((K + w.k_block - 1) / w.k_block) * F : -1;
    SAV_CHECK(w.k_block > 0 && static_cast<int64_t>(w.seg_start.size()) == segs + 1 &&
                  static_cast<int64_t>(w.seg_npos.size()) == segs &&
                  w.seg_start.back() == static_cast<int32_t>(w.entry.size()) && w.shift_lo >= 0 &&
                  w.shift_lo <= w.shift_hi && w.shift_hi <= 31,
              "shift_linear_forward_int: ShiftKernelWeights is inconsistent; build it with shift_kernel_prepare");
  }
  isa = resolve_isa(isa);
  if (M == 0) return;

  const float in_scale = std::ldexp(1.0f, frac_bits);
  const float out_scale = std::ldexp(1.0f, -frac_bits);
  const int64_t blocks = (static_cast<int64_t>(M) + kRowBlock - 1) / kRowBlock;
  // Tasks: (row block, column chunk). A whole row of outputs per task amortises the conversion and the
  // shift planes best; columns are split only when there are too few row blocks for the threads.
  const int threads = num_threads();
  int chunk = F;
  if (blocks < 4 * threads) {
    const int64_t splits = std::min<int64_t>((4 * threads + blocks - 1) / blocks, (F + 63) / 64);
    chunk = static_cast<int>((F + splits - 1) / splits);
  }
  const int64_t chunks = (F + chunk - 1) / chunk;
  const int64_t tasks = chunks * blocks;
  const int ns = w.shift_hi - w.shift_lo + 1;
  // Per-thread work space: the row block's fixed-point activations [k][row], the accumulators
  // [j][row] and the shift planes [shift][k][row]; all 64-byte aligned for the AVX2 loads.
  const size_t xt_ints = static_cast<size_t>(K) * kRowBlock;
  const size_t acc_ints = static_cast<size_t>(chunk) * kRowBlock;
  const size_t work_ints = xt_ints + acc_ints + static_cast<size_t>(ns) * w.k_block * kRowBlock;
  int64_t bad = std::numeric_limits<int64_t>::max();  // first row of x that does not fit
  int oom = 0;
#pragma omp parallel if (tasks > 1)
  {
    std::unique_ptr<int32_t, AlignedFree> work(
        static_cast<int32_t*>(std::aligned_alloc(64, (work_ints * sizeof(int32_t) + 63) / 64 * 64)));
    if (!work) {
#pragma omp atomic write
      oom = 1;
    }
    int64_t my_bad = std::numeric_limits<int64_t>::max();
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      if (!work) continue;
      const int64_t blk = task / chunks, c = task % chunks;
      TaskArgs ta;
      ta.y = y;
      ta.xt = work.get();
      ta.w = &w;
      ta.b = b;
      ta.i0 = blk * kRowBlock;
      ta.rows = static_cast<int>(std::min<int64_t>(kRowBlock, M - ta.i0));
      ta.j0 = static_cast<int>(c * chunk);
      ta.j1 = std::min(F, ta.j0 + chunk);
      ta.F = F;
      ta.K = K;
      ta.out_scale = out_scale;
      ta.acc = work.get() + xt_ints;
      ta.planes = work.get() + xt_ints + acc_ints;
#ifdef SAV_SHIFT_X86
      if (isa == shift_isa_avx2) {
        const int64_t r = convert_block_avx2(work.get(), x, ta.i0, ta.rows, K, in_scale);
        if (r >= 0) {
          my_bad = std::min(my_bad, r);
          continue;
        }
        shift_task_avx2(ta);
        continue;
      }
#endif
      const int64_t r = convert_block(work.get(), x, ta.i0, ta.rows, K, in_scale);
      if (r >= 0) {
        my_bad = std::min(my_bad, r);
        continue;
      }
      shift_task_scalar(ta);
    }
#pragma omp critical(sav_shift_int_bad)
    bad = std::min(bad, my_bad);
  }
  SAV_CHECK(!oom, "shift_linear_forward_int: out of memory for " << work_ints * sizeof(int32_t)
                                                                 << " bytes of per-thread work space");
  if (bad != std::numeric_limits<int64_t>::max()) throw_overflow("shift_linear_forward_int", x, bad, K, frac_bits);
}

void shift_linear_forward_int_ref(float* y, const float* x, const float* p, const float* s, const float* b, int M,
                                  int K, int F, int pmin, int pmax, int frac_bits) {
  check_dims("shift_linear_forward_int_ref", M, K, F);
  check_int_range("shift_linear_forward_int_ref", pmin, pmax);
  check_frac_bits("shift_linear_forward_int_ref", frac_bits);
  const float in_scale = std::ldexp(1.0f, frac_bits);
  const float out_scale = std::ldexp(1.0f, -frac_bits);
  std::vector<int32_t> xq(static_cast<size_t>(K));
  for (int64_t i = 0; i < M; ++i) {
    int64_t l1 = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (!to_fixed(x[i * K + k], in_scale, &xq[k])) throw_overflow("shift_linear_forward_int_ref", x, i, K, frac_bits);
      l1 += std::abs(static_cast<int64_t>(xq[k]));
    }
    if (l1 > kInt32Max) throw_overflow("shift_linear_forward_int_ref", x, i, K, frac_bits);
    for (int64_t j = 0; j < F; ++j) {
      int64_t acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int sg = round_sign(s[j * K + k]);
        const int sh = -round_exponent(p[j * K + k], pmin, pmax);
        if (sg > 0) acc += xq[k] >> sh;
        if (sg < 0) acc -= xq[k] >> sh;
      }
      SAV_CHECK(acc >= -kInt32Max - 1 && acc <= kInt32Max, "shift_linear_forward_int_ref: internal overflow");
      y[i * F + j] = static_cast<float>(static_cast<int32_t>(acc)) * out_scale + (b ? b[j] : 0.0f);
    }
  }
}

}  // namespace sav::cpu
