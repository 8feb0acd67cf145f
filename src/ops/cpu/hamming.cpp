// shiftaddvit: Hamming attention and the KSH hash on the CPU (see hamming.h for the math and shapes).
//
// Legend: B batch, N tokens, C channels, H heads, d = C/H, b = nbits hash bits, m anchors.
//
// Fast path layout: everything runs per (image, head) — one OpenMP task each — on head-major buffers:
//   q (N,d) normalised  ->  dist (N,m)  ->  y (N,b), codes (N)  ->  kv (b,d)  ->  z (N,d)  ->  out rows.
// The hash runs on tiles of 16 tokens spread across SIMD lanes (GCC vector types, compiled for
// AVX-512 / AVX2 / baseline by target_clones), while every distance and every y is still summed in the
// reference's order, so the codes agree with the reference bit for bit.
// The two code products are the addition-only MatAdd kernels over set bits (no multiply by 0/1).
// Backward: the conv and normalisation by loops, the code products by the same MatAdd kernels, the dense
// d(code) = dz KV^T / pi + V dKV^T by sgemm, then the hash backward (exact, sigma included).
#include "ops/cpu/hamming.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "core/blas.h"
#include "core/error.h"

// Hot kernels are compiled for AVX-512, AVX2 and the baseline; the loader picks one at run time. Clang 14
// cannot clone function templates: there (the ThreadSanitizer build) the baseline alone is compiled.
#if defined(__clang__) && __clang_major__ < 15
#define SAV_HAMMING_CLONES
#else
#define SAV_HAMMING_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif

namespace sav::cpu {

namespace {

constexpr float kInvPi = 0.318309886183790671538f;
constexpr double kPi = 3.14159265358979323846;
constexpr int kConvPad = kHammingConvTaps / 2;  // 4

inline int64_t i64(int v) { return static_cast<int64_t>(v); }

// Go parallel over (image, head) only when there are several and enough work (an OpenMP region costs
// more than a small head): work ~ B*H*N*(d*m + b*m + b*d).
bool worth_threads(int B, int H, int N, int d, int nbits, int m) {
  return i64(B) * H > 1 && i64(B) * H * N * (i64(d) * m + i64(nbits) * m + i64(nbits) * d) >= (int64_t{1} << 16);
}

void check_hash_dims(int B, int H, int N, int d, int nbits, int m) {
  SAV_CHECK(B > 0 && H > 0 && N > 0 && d > 0 && m > 0,
            "ksh hash: sizes must be positive, got B=" << B << " H=" << H << " N=" << N << " d=" << d << " m=" << m);
  SAV_CHECK(nbits >= 1 && nbits <= 64,
            "ksh hash: nbits must be in 1..64 (codes are packed in a uint64), got " << nbits);
}

void check_saved(const HammingSaved& s) {
  SAV_CHECK(s.q && s.qnorm && s.dist && s.sigma && s.y && s.kv && s.z && s.znorm && s.codes,
            "hamming attention: the saved buffers are not bound; use hamming_saved_bind");
}

void check_weights(const HammingWeights& w) {
  SAV_CHECK(w.anchors && w.mu && w.A && w.conv_w,
            "hamming attention: anchors, mu, A and conv_w are required (conv_b may be nullptr)");
}

// Index of the lowest set bit (c != 0).
inline int lowest_bit(uint64_t c) { return __builtin_ctzll(c); }

// ---- MatAdd kernels (addition only) ----

// kv (b,d) += sum over tokens n and set bits r of code n of v[n]  (kv not cleared here)
SAV_HAMMING_CLONES void matadd1_accumulate(float* __restrict kv, const uint64_t* __restrict codes,
                                           const float* __restrict v, int N, int d, int ldv) {
  for (int n = 0; n < N; ++n) {
    const float* vn = v + i64(n) * ldv;
    for (uint64_t c = codes[n]; c; c &= c - 1) {
      float* __restrict kr = kv + i64(lowest_bit(c)) * d;
      for (int i = 0; i < d; ++i) kr[i] += vn[i];
    }
  }
}

// out[n] (row stride ldo) = (accumulate ? out[n] : 0) + sum over set bits r of code n of kv[r]
template <bool kAccumulate>
SAV_HAMMING_CLONES void matadd2_rows(float* __restrict out, int ldo, const uint64_t* __restrict codes,
                                     const float* __restrict kv, int N, int d) {
  for (int n = 0; n < N; ++n) {
    float* __restrict on = out + i64(n) * ldo;
    if (!kAccumulate)
      for (int i = 0; i < d; ++i) on[i] = 0.0f;
    for (uint64_t c = codes[n]; c; c &= c - 1) {
      const float* __restrict kr = kv + i64(lowest_bit(c)) * d;
      for (int i = 0; i < d; ++i) on[i] += kr[i];
    }
  }
}

// ---- per-head fast kernels ----

// Row normalisation: q (N,d) = x / max(||x||, eps), qn (N) = max(||x||, eps); x rows with stride ldx.
void normalise_rows(float* q, float* qn, const float* x, int N, int d, int ldx) {
  for (int n = 0; n < N; ++n) {
    const float* xn = x + i64(n) * ldx;
    double s = 0.0;
    for (int i = 0; i < d; ++i) s += static_cast<double>(xn[i]) * xn[i];
    const float nrm = std::max(static_cast<float>(std::sqrt(s)), kHammingNormEps);
    qn[n] = nrm;
    float* qr = q + i64(n) * d;
    for (int i = 0; i < d; ++i) qr[i] = xn[i] / nrm;
  }
}

// Normalisation backward: dx (row stride ldx) += d/dx of (x / max(||x||, eps)) applied to dq.
// q = normalised rows (N,d), qn (N) the clamped norms; dq (N,d).
void normalise_rows_backward(float* dx, int ldx, const float* dq, const float* q, const float* qn, int N, int d) {
  for (int n = 0; n < N; ++n) {
    const float* g = dq + i64(n) * d;
    const float* qr = q + i64(n) * d;
    float* out = dx + i64(n) * ldx;
    const float inv = 1.0f / qn[n];
    if (qn[n] > kHammingNormEps) {
      double dot = 0.0;
      for (int i = 0; i < d; ++i) dot += static_cast<double>(qr[i]) * g[i];
      const float fd = static_cast<float>(dot);
      for (int i = 0; i < d; ++i) out[i] += (g[i] - qr[i] * fd) * inv;
    } else {
      for (int i = 0; i < d; ++i) out[i] += g[i] * inv;  // clamped: x / eps is linear
    }
  }
}

// Hash of one head of one image, in tiles of kTile tokens laid out across the SIMD lanes: every
// distance and every y is still summed in the reference's order (over i, over j), so the values match
// the reference bit for bit when no FMA contraction is involved (none is enabled in any clone here).
// q (N,d); anchors (m,d); mu (m); A (b,m). Out: dist (N,m), *sigma, y (N,b), codes (N) (may be nullptr).
constexpr int kTile = 16;
typedef float vtile __attribute__((vector_size(kTile * sizeof(float))));  // one float per token of a tile

// Four independent accumulators (anchors j..j+3 or bits r..r+3) per pass keep the adds from waiting on
// each other; results go through an aligned buffer (indexing a vector value would keep it in memory).
SAV_HAMMING_CLONES void ksh_head_forward(float* dist, float* sigma, float* y, uint64_t* codes, const float* q,
                                         const float* anchors, const float* mu, const float* A, int N, int d, int nbits,
                                         int m) {
  // q tile (d) / centred kernel tile (m), tokens across lanes, plus 4 output rows; aligned by hand (a
  // std::vector of a vector type would drop its alignment attribute)
  const int rows = std::max(d, m);
  std::vector<float> tile_buf(static_cast<size_t>(rows + 4 + 1) * kTile);
  vtile* tile = reinterpret_cast<vtile*>((reinterpret_cast<uintptr_t>(tile_buf.data()) + sizeof(vtile) - 1) /
                                         sizeof(vtile) * sizeof(vtile));
  vtile* res = tile + rows;
  const float* res_f = reinterpret_cast<const float*>(res);
  // distances D_nj = sum_i (q_ni - a_ji)^2
  for (int n0 = 0; n0 < N; n0 += kTile) {
    const int nt = std::min(kTile, N - n0);
    float* tf = reinterpret_cast<float*>(tile);
    for (int i = 0; i < d; ++i)
      for (int u = 0; u < kTile; ++u) tf[i64(i) * kTile + u] = u < nt ? q[i64(n0 + u) * d + i] : 0.0f;
    for (int j0 = 0; j0 < m; j0 += 4) {
      const int nj = std::min(4, m - j0);
      const float* a0 = anchors + i64(j0) * d;
      const float* a1 = anchors + i64(j0 + (nj > 1 ? 1 : 0)) * d;
      const float* a2 = anchors + i64(j0 + (nj > 2 ? 2 : 0)) * d;
      const float* a3 = anchors + i64(j0 + (nj > 3 ? 3 : 0)) * d;
      vtile c0 = {}, c1 = {}, c2 = {}, c3 = {};
      for (int i = 0; i < d; ++i) {
        const vtile qi = tile[i];
        const vtile t0 = qi - a0[i], t1 = qi - a1[i], t2 = qi - a2[i], t3 = qi - a3[i];
        c0 += t0 * t0;
        c1 += t1 * t1;
        c2 += t2 * t2;
        c3 += t3 * t3;
      }
      res[0] = c0;
      res[1] = c1;
      res[2] = c2;
      res[3] = c3;
      for (int k = 0; k < nj; ++k)
        for (int u = 0; u < nt; ++u) dist[i64(n0 + u) * m + j0 + k] = res_f[k * kTile + u];
    }
  }
  double total = 0.0;
  for (int64_t e = 0; e < i64(N) * m; ++e) total += dist[e];
  const float sg = std::max(static_cast<float>(total / (static_cast<double>(N) * m)), kHammingSigmaMin);
  *sigma = sg;
  const float two_sigma = 2.0f * sg;
  // y_nr = sum_j A_rj (exp(-D_nj / (2 sigma)) - mu_j), code bit r = 1[y_nr > 0]
  for (int n0 = 0; n0 < N; n0 += kTile) {
    const int nt = std::min(kTile, N - n0);
    float* tf = reinterpret_cast<float*>(tile);
    for (int j = 0; j < m; ++j)
      for (int u = 0; u < kTile; ++u)
        tf[i64(j) * kTile + u] = u < nt ? std::exp(-dist[i64(n0 + u) * m + j] / two_sigma) - mu[j] : 0.0f;
    uint64_t c[kTile] = {};
    for (int r0 = 0; r0 < nbits; r0 += 4) {
      const int nr = std::min(4, nbits - r0);
      const float* A0 = A + i64(r0) * m;
      const float* A1 = A + i64(r0 + (nr > 1 ? 1 : 0)) * m;
      const float* A2 = A + i64(r0 + (nr > 2 ? 2 : 0)) * m;
      const float* A3 = A + i64(r0 + (nr > 3 ? 3 : 0)) * m;
      vtile c0 = {}, c1 = {}, c2 = {}, c3 = {};
      for (int j = 0; j < m; ++j) {
        const vtile kj = tile[j];
        c0 += A0[j] * kj;
        c1 += A1[j] * kj;
        c2 += A2[j] * kj;
        c3 += A3[j] * kj;
      }
      res[0] = c0;
      res[1] = c1;
      res[2] = c2;
      res[3] = c3;
      for (int k = 0; k < nr; ++k)
        for (int u = 0; u < nt; ++u) {
          const float v = res_f[k * kTile + u];
          y[i64(n0 + u) * nbits + r0 + k] = v;
          c[u] |= static_cast<uint64_t>(v > 0.0f) << (r0 + k);
        }
    }
    if (codes)
      for (int u = 0; u < nt; ++u) codes[n0 + u] = c[u];
  }
}

// Hash backward of one head: dq (N,d) += ; dy (N,b); q (N,d); dist (N,m); sigma; anchors (m,d); A (b,m).
// dD (N,m) is scratch.
SAV_HAMMING_CLONES void ksh_head_backward(float* dq, const float* dy, const float* q, const float* dist, float sigma,
                                          const float* anchors, const float* A, int N, int d, int nbits, int m,
                                          float* dD) {
  const float two_sigma = 2.0f * sigma;
  double dsig = 0.0;
  for (int n = 0; n < N; ++n) {
    const float* g = dy + i64(n) * nbits;
    const float* Dn = dist + i64(n) * m;
    float* __restrict dDn = dD + i64(n) * m;
    for (int j = 0; j < m; ++j) dDn[j] = 0.0f;  // holds dk first
    for (int r = 0; r < nbits; ++r) {
      const float gr = g[r];
      if (gr == 0.0f) continue;
      const float* __restrict Ar = A + i64(r) * m;
      for (int j = 0; j < m; ++j) dDn[j] += gr * Ar[j];
    }
    for (int j = 0; j < m; ++j) {
      const float t = dDn[j] * std::exp(-Dn[j] / two_sigma);  // dk * E
      dsig += static_cast<double>(t) * Dn[j];
      dDn[j] = -t / two_sigma;
    }
  }
  // sigma = mean D: every D_nj gets dsigma / (N m); dsigma = sum t D / (2 sigma^2)
  const float dD_sigma =
      sigma > kHammingSigmaMin  // clamped sigma: constant, no gradient
          ? static_cast<float>(dsig / (2.0 * static_cast<double>(sigma) * sigma) / (static_cast<double>(N) * m))
          : 0.0f;
  for (int n = 0; n < N; ++n) {
    float* dDn = dD + i64(n) * m;
    const float* qr = q + i64(n) * d;
    float* __restrict dqn = dq + i64(n) * d;
    float sum = 0.0f;
    for (int j = 0; j < m; ++j) {
      dDn[j] += dD_sigma;
      sum += dDn[j];
    }
    // dq_n += 2 sum_j dD_nj (q_n - a_j)
    for (int i = 0; i < d; ++i) dqn[i] += 2.0f * sum * qr[i];
    for (int j = 0; j < m; ++j) {
      const float c = -2.0f * dDn[j];
      const float* __restrict aj = anchors + i64(j) * d;
      for (int i = 0; i < d; ++i) dqn[i] += c * aj[i];
    }
  }
}

// Depthwise 9-tap conv over token rows, accumulated: out[n] (stride ldo) += bias + sum_t w[t] v[n+t-4]
// (v rows with stride ldv, zero outside 0..N-1).
SAV_HAMMING_CLONES void dwconv9_accumulate(float* out, int ldo, const float* v, int ldv, const float* w, float bias,
                                           int N, int d) {
  for (int n = 0; n < N; ++n) {
    float* __restrict on = out + i64(n) * ldo;
    if (bias != 0.0f)
      for (int i = 0; i < d; ++i) on[i] += bias;
    for (int t = 0; t < kHammingConvTaps; ++t) {
      const int src = n + t - kConvPad;
      if (src < 0 || src >= N) continue;
      const float wt = w[t];
      const float* __restrict vs = v + i64(src) * ldv;
      for (int i = 0; i < d; ++i) on[i] += wt * vs[i];
    }
  }
}

// Owns a HammingSaved when the caller passes none (ref path).
struct OwnedSaved {
  std::vector<float> buf;
  std::vector<uint64_t> codes;
  HammingSaved view;
  explicit OwnedSaved(const HammingDims& dims) : buf(hamming_saved_floats(dims)), codes(hamming_saved_codes(dims)) {
    view = hamming_saved_bind(dims, buf.data(), codes.data());
  }
};

}  // namespace

// ---- dims and saved buffers ----

void hamming_check_dims(const HammingDims& dims) {
  SAV_CHECK(dims.B > 0 && dims.N > 0 && dims.C > 0 && dims.H > 0,
            "hamming attention: B, N, C, H must be positive, got B=" << dims.B << " N=" << dims.N << " C=" << dims.C
                                                                     << " H=" << dims.H);
  SAV_CHECK(dims.C % dims.H == 0, "hamming attention: C=" << dims.C << " is not divisible by H=" << dims.H);
  SAV_CHECK(dims.nbits >= 1 && dims.nbits <= 64,
            "hamming attention: nbits must be in 1..64 (packed uint64 codes), got " << dims.nbits);
  SAV_CHECK(dims.m > 0, "hamming attention: the number of anchors m must be positive, got " << dims.m);
}

size_t hamming_saved_floats(const HammingDims& dims) {
  hamming_check_dims(dims);
  const size_t BH = static_cast<size_t>(dims.B) * dims.H, N = dims.N, d = dims.d(), b = dims.nbits, m = dims.m;
  return BH * (N * (2 * d + m + b + 2) + b * d + 1);
}

size_t hamming_saved_codes(const HammingDims& dims) {
  hamming_check_dims(dims);
  return static_cast<size_t>(dims.B) * dims.H * dims.N;
}

HammingSaved hamming_saved_bind(const HammingDims& dims, float* buf, uint64_t* codes) {
  hamming_check_dims(dims);
  SAV_CHECK(buf && codes, "hamming_saved_bind: buffers must not be null");
  const size_t BH = static_cast<size_t>(dims.B) * dims.H, N = dims.N, d = dims.d(), b = dims.nbits, m = dims.m;
  HammingSaved s;
  float* p = buf;
  s.q = p;
  p += BH * N * d;
  s.qnorm = p;
  p += BH * N;
  s.dist = p;
  p += BH * N * m;
  s.sigma = p;
  p += BH;
  s.y = p;
  p += BH * N * b;
  s.kv = p;
  p += BH * b * d;
  s.z = p;
  p += BH * N * d;
  s.znorm = p;
  p += BH * N;
  s.codes = codes;
  return s;
}

// ---- packing and MatAdd ----

void codes_pack(uint64_t* codes, const float* h, int N, int nbits) {
  SAV_CHECK(N >= 0 && nbits >= 1 && nbits <= 64, "codes_pack: bad sizes N=" << N << " nbits=" << nbits);
  for (int n = 0; n < N; ++n) {
    uint64_t c = 0;
    for (int r = 0; r < nbits; ++r) c |= static_cast<uint64_t>(h[i64(n) * nbits + r] > 0.5f) << r;
    codes[n] = c;
  }
}

void codes_unpack(float* h, const uint64_t* codes, int N, int nbits) {
  SAV_CHECK(N >= 0 && nbits >= 1 && nbits <= 64, "codes_unpack: bad sizes N=" << N << " nbits=" << nbits);
  for (int n = 0; n < N; ++n)
    for (int r = 0; r < nbits; ++r) h[i64(n) * nbits + r] = static_cast<float>((codes[n] >> r) & 1u);
}

void matadd_codes_t_v(float* kv, const uint64_t* codes, const float* v, int N, int d, int ldv, int nbits) {
  SAV_CHECK(N >= 0 && d > 0 && ldv >= d && nbits >= 1 && nbits <= 64,
            "matadd_codes_t_v: bad sizes N=" << N << " d=" << d << " ldv=" << ldv << " nbits=" << nbits);
  std::fill(kv, kv + i64(nbits) * d, 0.0f);
  matadd1_accumulate(kv, codes, v, N, d, ldv);
}

void matadd_codes_kv(float* out, int ldo, const uint64_t* codes, const float* kv, int N, int d, int nbits) {
  SAV_CHECK(N >= 0 && d > 0 && ldo >= d && nbits >= 1 && nbits <= 64,
            "matadd_codes_kv: bad sizes N=" << N << " d=" << d << " ldo=" << ldo << " nbits=" << nbits);
  matadd2_rows<false>(out, ldo, codes, kv, N, d);
}

void matadd_codes_t_v_ref(float* kv, const float* h, const float* v, int N, int d, int ldv, int nbits) {
  for (int r = 0; r < nbits; ++r)
    for (int i = 0; i < d; ++i) {
      float s = 0.0f;
      for (int n = 0; n < N; ++n) s += h[i64(n) * nbits + r] * v[i64(n) * ldv + i];
      kv[i64(r) * d + i] = s;
    }
}

void matadd_codes_kv_ref(float* out, int ldo, const float* h, const float* kv, int N, int d, int nbits) {
  for (int n = 0; n < N; ++n)
    for (int i = 0; i < d; ++i) {
      float s = 0.0f;
      for (int r = 0; r < nbits; ++r) s += h[i64(n) * nbits + r] * kv[i64(r) * d + i];
      out[i64(n) * ldo + i] = s;
    }
}

// ---- KSH hash ----

void ksh_hash_forward_ref(float* y, uint64_t* codes, float* dist, float* sigma, const float* q, const float* anchors,
                          const float* mu, const float* A, int B, int H, int N, int d, int nbits, int m) {
  check_hash_dims(B, H, N, d, nbits, m);
  for (int bi = 0; bi < B; ++bi)
    for (int h = 0; h < H; ++h) {
      const int64_t bh = i64(bi) * H + h;
      const float* qh = q + bh * N * d;
      const float* ah = anchors + i64(h) * m * d;
      float* Dh = dist + bh * N * m;
      double acc = 0.0;
      for (int n = 0; n < N; ++n)
        for (int j = 0; j < m; ++j) {
          float s = 0.0f;
          for (int i = 0; i < d; ++i) {
            const float t = qh[i64(n) * d + i] - ah[i64(j) * d + i];
            s += t * t;
          }
          Dh[i64(n) * m + j] = s;
          acc += s;
        }
      const float sg = std::max(static_cast<float>(acc / (static_cast<double>(N) * m)), kHammingSigmaMin);
      sigma[bh] = sg;
      for (int n = 0; n < N; ++n) {
        uint64_t c = 0;
        for (int r = 0; r < nbits; ++r) {
          float s = 0.0f;
          for (int j = 0; j < m; ++j) {
            const float k = std::exp(-Dh[i64(n) * m + j] / (2.0f * sg)) - mu[i64(h) * m + j];
            s += A[(i64(h) * nbits + r) * m + j] * k;
          }
          y[(bh * N + n) * nbits + r] = s;
          if (s > 0.0f) c |= uint64_t{1} << r;
        }
        if (codes) codes[bh * N + n] = c;
      }
    }
}

void ksh_hash_forward(float* y, uint64_t* codes, float* dist, float* sigma, const float* q, const float* anchors,
                      const float* mu, const float* A, int B, int H, int N, int d, int nbits, int m) {
  check_hash_dims(B, H, N, d, nbits, m);
  const bool par = worth_threads(B, H, N, d, nbits, m);
#pragma omp parallel for collapse(2) schedule(static) if (par)
  for (int bi = 0; bi < B; ++bi)
    for (int h = 0; h < H; ++h) {
      const int64_t bh = i64(bi) * H + h;
      ksh_head_forward(dist + bh * N * m, sigma + bh, y + bh * N * nbits, codes ? codes + bh * N : nullptr,
                       q + bh * N * d, anchors + i64(h) * m * d, mu + i64(h) * m, A + i64(h) * nbits * m, N, d, nbits,
                       m);
    }
}

void ksh_hash_backward_ref(float* dq, const float* dy, const float* q, const float* dist, const float* sigma,
                           const float* anchors, const float* mu, const float* A, int B, int H, int N, int d, int nbits,
                           int m) {
  check_hash_dims(B, H, N, d, nbits, m);
  std::vector<double> dD(static_cast<size_t>(N) * m);
  for (int bi = 0; bi < B; ++bi)
    for (int h = 0; h < H; ++h) {
      const int64_t bh = i64(bi) * H + h;
      const double sg = sigma[bh];
      const float* Dh = dist + bh * N * m;
      // y_nr = sum_j A_rj (E_nj - mu_j), E_nj = exp(-D_nj / (2 sigma))
      double dsig = 0.0;
      for (int n = 0; n < N; ++n)
        for (int j = 0; j < m; ++j) {
          double dk = 0.0;
          for (int r = 0; r < nbits; ++r)
            dk += static_cast<double>(dy[(bh * N + n) * nbits + r]) * A[(i64(h) * nbits + r) * m + j];
          const double D = Dh[i64(n) * m + j];
          const double E = std::exp(-D / (2.0 * sg));
          dD[i64(n) * m + j] = dk * E * (-1.0 / (2.0 * sg));  // through D directly
          dsig += dk * E * D / (2.0 * sg * sg);               // through sigma
        }
      for (int n = 0; n < N; ++n)
        for (int j = 0; j < m; ++j) {
          // sigma = mean D (unless clamped at kHammingSigmaMin)
          const double g = dD[i64(n) * m + j] + (sg > kHammingSigmaMin ? dsig / (static_cast<double>(N) * m) : 0.0);
          for (int i = 0; i < d; ++i) {
            const double diff = q[(bh * N + n) * d + i] - anchors[(i64(h) * m + j) * d + i];
            dq[(bh * N + n) * d + i] += static_cast<float>(2.0 * g * diff);
          }
        }
    }
}

void ksh_hash_backward(float* dq, const float* dy, const float* q, const float* dist, const float* sigma,
                       const float* anchors, const float* mu, const float* A, int B, int H, int N, int d, int nbits,
                       int m) {
  check_hash_dims(B, H, N, d, nbits, m);
  if (!dq) return;
  const bool par = worth_threads(B, H, N, d, nbits, m);
#pragma omp parallel if (par)
  {
    std::vector<float> dD(static_cast<size_t>(N) * m);
#pragma omp for collapse(2) schedule(static)
    for (int bi = 0; bi < B; ++bi)
      for (int h = 0; h < H; ++h) {
        const int64_t bh = i64(bi) * H + h;
        ksh_head_backward(dq + bh * N * d, dy + bh * N * nbits, q + bh * N * d, dist + bh * N * m, sigma[bh],
                          anchors + i64(h) * m * d, A + i64(h) * nbits * m, N, d, nbits, m, dD.data());
      }
  }
}

void ksh_ste_backward(float* dy, const float* dcode, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (y[i] > 0.0f && y[i] < 1.0f) dy[i] += dcode[i];
}

// ---- Hamming attention: reference ----

void hamming_attention_forward_ref(float* out, const HammingSaved* saved_in, const float* qk_lin, const float* v,
                                   const HammingWeights& w, const HammingDims& dims, bool relaxed_codes) {
  hamming_check_dims(dims);
  check_weights(w);
  const int B = dims.B, N = dims.N, C = dims.C, H = dims.H, d = dims.d(), nb = dims.nbits, m = dims.m;
  std::unique_ptr<OwnedSaved> owned;
  if (!saved_in) owned = std::make_unique<OwnedSaved>(dims);
  const HammingSaved& s = saved_in ? *saved_in : owned->view;
  check_saved(s);

  // q = qk / max(||qk||, eps), head-major
  for (int bi = 0; bi < B; ++bi)
    for (int h = 0; h < H; ++h)
      for (int n = 0; n < N; ++n) {
        const float* x = qk_lin + (i64(bi) * N + n) * C + i64(h) * d;
        double ss = 0.0;
        for (int i = 0; i < d; ++i) ss += static_cast<double>(x[i]) * x[i];
        const float nrm = std::max(static_cast<float>(std::sqrt(ss)), kHammingNormEps);
        const int64_t row = (i64(bi) * H + h) * N + n;
        s.qnorm[row] = nrm;
        for (int i = 0; i < d; ++i) s.q[row * d + i] = x[i] / nrm;
      }
  ksh_hash_forward_ref(s.y, s.codes, s.dist, s.sigma, s.q, w.anchors, w.mu, w.A, B, H, N, d, nb, m);

  std::vector<float> hm(static_cast<size_t>(N) * nb), hkv(static_cast<size_t>(N) * d);
  for (int bi = 0; bi < B; ++bi)
    for (int h = 0; h < H; ++h) {
      const int64_t bh = i64(bi) * H + h;
      if (relaxed_codes)
        std::copy(s.y + bh * N * nb, s.y + (bh + 1) * N * nb, hm.begin());
      else
        codes_unpack(hm.data(), s.codes + bh * N, N, nb);
      const float* vh = v + i64(bi) * N * C + i64(h) * d;  // rows with stride C
      float* kv = s.kv + bh * nb * d;
      matadd_codes_t_v_ref(kv, hm.data(), vh, N, d, C, nb);         // KV = h^T V
      matadd_codes_kv_ref(hkv.data(), d, hm.data(), kv, N, d, nb);  // h KV
      for (int n = 0; n < N; ++n) {
        float* z = s.z + (bh * N + n) * d;
        double ss = 0.0;
        for (int i = 0; i < d; ++i) {
          z[i] = 0.5f * vh[i64(n) * C + i] + kInvPi * hkv[i64(n) * d + i];
          ss += static_cast<double>(z[i]) * z[i];
        }
        const float zn = std::max(static_cast<float>(std::sqrt(ss)), kHammingNormEps);
        s.znorm[bh * N + n] = zn;
        float* o = out + (i64(bi) * N + n) * C + i64(h) * d;
        for (int i = 0; i < d; ++i) {
          float conv = w.conv_b ? w.conv_b[h] : 0.0f;
          for (int t = 0; t < kHammingConvTaps; ++t) {
            const int src = n + t - kConvPad;
            if (src >= 0 && src < N) conv += w.conv_w[i64(h) * kHammingConvTaps + t] * vh[i64(src) * C + i];
          }
          o[i] = z[i] / zn + conv;
        }
      }
    }
}

void hamming_attention_backward_ref(float* dqk_lin, float* dv, float* dconv_w, float* dconv_b, const float* dout,
                                    const float* v, const HammingSaved& s, const HammingWeights& w,
                                    const HammingDims& dims, bool relaxed_codes) {
  hamming_check_dims(dims);
  check_weights(w);
  check_saved(s);
  const int B = dims.B, N = dims.N, C = dims.C, H = dims.H, d = dims.d(), nb = dims.nbits, m = dims.m;
  std::vector<float> dy(static_cast<size_t>(B) * H * N * nb, 0.0f);
  std::vector<float> hm(static_cast<size_t>(N) * nb), dz(static_cast<size_t>(N) * d), dkv(static_cast<size_t>(nb) * d);
  for (int bi = 0; bi < B; ++bi)
    for (int h = 0; h < H; ++h) {
      const int64_t bh = i64(bi) * H + h;
      const float* vh = v + i64(bi) * N * C + i64(h) * d;
      const float* gh = dout + i64(bi) * N * C + i64(h) * d;
      float* dvh = dv ? dv + i64(bi) * N * C + i64(h) * d : nullptr;
      const float* wc = w.conv_w + i64(h) * kHammingConvTaps;
      // conv: out[n][i] += sum_t w[t] v[n+t-4][i] + bias
      for (int n = 0; n < N; ++n)
        for (int i = 0; i < d; ++i) {
          const float g = gh[i64(n) * C + i];
          if (dconv_b) dconv_b[h] += g;
          for (int t = 0; t < kHammingConvTaps; ++t) {
            const int src = n + t - kConvPad;
            if (src < 0 || src >= N) continue;
            if (dvh) dvh[i64(src) * C + i] += wc[t] * g;
            if (dconv_w) dconv_w[i64(h) * kHammingConvTaps + t] += g * vh[i64(src) * C + i];
          }
        }
      // zhat = z / max(||z||, eps)
      for (int n = 0; n < N; ++n) {
        const float* z = s.z + (bh * N + n) * d;
        const double zn = s.znorm[bh * N + n];
        double dot = 0.0;
        for (int i = 0; i < d; ++i) dot += (z[i] / zn) * gh[i64(n) * C + i];
        for (int i = 0; i < d; ++i) {
          const double g = gh[i64(n) * C + i];
          dz[i64(n) * d + i] = static_cast<float>(zn > kHammingNormEps ? (g - (z[i] / zn) * dot) / zn : g / zn);
        }
      }
      // z = 0.5 V + (1/pi) h KV,  KV = h^T V
      if (relaxed_codes)
        std::copy(s.y + bh * N * nb, s.y + (bh + 1) * N * nb, hm.begin());
      else
        codes_unpack(hm.data(), s.codes + bh * N, N, nb);
      const float* kv = s.kv + bh * nb * d;
      for (int r = 0; r < nb; ++r)
        for (int i = 0; i < d; ++i) {
          double acc = 0.0;
          for (int n = 0; n < N; ++n) acc += static_cast<double>(hm[i64(n) * nb + r]) * dz[i64(n) * d + i];
          dkv[i64(r) * d + i] = static_cast<float>(acc / kPi);  // dKV = (1/pi) h^T dz
        }
      if (dvh)
        for (int n = 0; n < N; ++n)
          for (int i = 0; i < d; ++i) {
            double acc = 0.5 * dz[i64(n) * d + i];
            for (int r = 0; r < nb; ++r) acc += static_cast<double>(hm[i64(n) * nb + r]) * dkv[i64(r) * d + i];
            dvh[i64(n) * C + i] += static_cast<float>(acc);
          }
      // dcode_nr = (1/pi) dz_n . KV_r + V_n . dKV_r ; dy = STE(dcode) (or dcode when relaxed)
      for (int n = 0; n < N; ++n)
        for (int r = 0; r < nb; ++r) {
          double acc = 0.0;
          for (int i = 0; i < d; ++i)
            acc += static_cast<double>(dz[i64(n) * d + i]) * kv[i64(r) * d + i] / kPi +
                   static_cast<double>(vh[i64(n) * C + i]) * dkv[i64(r) * d + i];
          const int64_t idx = (bh * N + n) * nb + r;
          const float yv = s.y[idx];
          if (relaxed_codes || (yv > 0.0f && yv < 1.0f)) dy[idx] = static_cast<float>(acc);
        }
    }
  if (!dqk_lin) return;
  std::vector<float> dq(static_cast<size_t>(B) * H * N * d, 0.0f);
  ksh_hash_backward_ref(dq.data(), dy.data(), s.q, s.dist, s.sigma, w.anchors, w.mu, w.A, B, H, N, d, nb, m);
  // q = x / max(||x||, eps)
  for (int bi = 0; bi < B; ++bi)
    for (int h = 0; h < H; ++h)
      for (int n = 0; n < N; ++n) {
        const int64_t row = (i64(bi) * H + h) * N + n;
        const double qn = s.qnorm[row];
        const float* qr = s.q + row * d;
        const float* g = dq.data() + row * d;
        double dot = 0.0;
        for (int i = 0; i < d; ++i) dot += static_cast<double>(qr[i]) * g[i];
        float* dx = dqk_lin + (i64(bi) * N + n) * C + i64(h) * d;
        for (int i = 0; i < d; ++i)
          dx[i] += static_cast<float>(qn > kHammingNormEps ? (g[i] - qr[i] * dot) / qn : g[i] / qn);
      }
}

// ---- Hamming attention: fast path ----

void hamming_attention_forward(float* out, const HammingSaved* saved, const float* qk_lin, const float* v,
                               const HammingWeights& w, const HammingDims& dims) {
  hamming_check_dims(dims);
  check_weights(w);
  SAV_CHECK(out && qk_lin && v, "hamming_attention_forward: out, qk_lin and v must not be null");
  if (saved) check_saved(*saved);
  const int B = dims.B, N = dims.N, C = dims.C, H = dims.H, d = dims.d(), nb = dims.nbits, m = dims.m;
  const bool par = worth_threads(B, H, N, d, nb, m);
#pragma omp parallel if (par)
  {
    // Per-thread scratch: the full per-head set at inference, only kv/pi when saving.
    std::vector<float> s_q, s_qn, s_dist, s_y, s_kv, s_z, s_zn;
    std::vector<uint64_t> s_codes;
    std::vector<float> kv_scaled(static_cast<size_t>(nb) * d);
    float s_sigma = 0.0f;
    if (!saved) {
      s_q.resize(static_cast<size_t>(N) * d);
      s_qn.resize(N);
      s_dist.resize(static_cast<size_t>(N) * m);
      s_y.resize(static_cast<size_t>(N) * nb);
      s_kv.resize(static_cast<size_t>(nb) * d);
      s_z.resize(static_cast<size_t>(N) * d);
      s_zn.resize(N);
      s_codes.resize(N);
    }
#pragma omp for collapse(2) schedule(static)
    for (int bi = 0; bi < B; ++bi)
      for (int h = 0; h < H; ++h) {
        const int64_t bh = i64(bi) * H + h;
        float* q = saved ? saved->q + bh * N * d : s_q.data();
        float* qn = saved ? saved->qnorm + bh * N : s_qn.data();
        float* dist = saved ? saved->dist + bh * N * m : s_dist.data();
        float* sigma = saved ? saved->sigma + bh : &s_sigma;
        float* y = saved ? saved->y + bh * N * nb : s_y.data();
        float* kv = saved ? saved->kv + bh * nb * d : s_kv.data();
        float* z = saved ? saved->z + bh * N * d : s_z.data();
        float* zn = saved ? saved->znorm + bh * N : s_zn.data();
        uint64_t* codes = saved ? saved->codes + bh * N : s_codes.data();
        const float* xh = qk_lin + i64(bi) * N * C + i64(h) * d;
        const float* vh = v + i64(bi) * N * C + i64(h) * d;
        float* oh = out + i64(bi) * N * C + i64(h) * d;

        normalise_rows(q, qn, xh, N, d, C);
        ksh_head_forward(dist, sigma, y, codes, q, w.anchors + i64(h) * m * d, w.mu + i64(h) * m, w.A + i64(h) * nb * m,
                         N, d, nb, m);
        // MatAdd #1: KV = code^T V
        std::fill(kv, kv + i64(nb) * d, 0.0f);
        matadd1_accumulate(kv, codes, vh, N, d, C);
        for (int64_t e = 0; e < i64(nb) * d; ++e) kv_scaled[e] = kv[e] * kInvPi;
        // MatAdd #2: z = 0.5 V + code (KV / pi)
        matadd2_rows<false>(z, d, codes, kv_scaled.data(), N, d);
        for (int n = 0; n < N; ++n) {
          float* zr = z + i64(n) * d;
          const float* vr = vh + i64(n) * C;
          double ss = 0.0;
          for (int i = 0; i < d; ++i) {
            zr[i] += 0.5f * vr[i];
            ss += static_cast<double>(zr[i]) * zr[i];
          }
          const float nrm = std::max(static_cast<float>(std::sqrt(ss)), kHammingNormEps);
          zn[n] = nrm;
          float* orow = oh + i64(n) * C;
          for (int i = 0; i < d; ++i) orow[i] = zr[i] / nrm;
        }
        dwconv9_accumulate(oh, C, vh, C, w.conv_w + i64(h) * kHammingConvTaps, w.conv_b ? w.conv_b[h] : 0.0f, N, d);
      }
  }
}

void hamming_attention_backward(float* dqk_lin, float* dv, float* dconv_w, float* dconv_b, const float* dout,
                                const float* v, const HammingSaved& s, const HammingWeights& w,
                                const HammingDims& dims) {
  hamming_check_dims(dims);
  check_weights(w);
  check_saved(s);
  SAV_CHECK(dout && v, "hamming_attention_backward: dout and v must not be null");
  const int B = dims.B, N = dims.N, C = dims.C, H = dims.H, d = dims.d(), nb = dims.nbits, m = dims.m;
  constexpr int T = kHammingConvTaps;
  // Conv weight/bias gradients per (image, head), reduced in a fixed order below (thread-count independent).
  std::vector<double> dconv_part(static_cast<size_t>(B) * H * (T + 1), 0.0);
  const bool par = worth_threads(B, H, N, d, nb, m);
#pragma omp parallel if (par)
  {
    std::vector<float> dz(static_cast<size_t>(N) * d), dkv(static_cast<size_t>(nb) * d);
    std::vector<float> dc, dy, dq, dD;
    if (dqk_lin) {
      dc.resize(static_cast<size_t>(N) * nb);
      dy.resize(static_cast<size_t>(N) * nb);
      dq.resize(static_cast<size_t>(N) * d);
      dD.resize(static_cast<size_t>(N) * m);
    }
#pragma omp for collapse(2) schedule(static)
    for (int bi = 0; bi < B; ++bi)
      for (int h = 0; h < H; ++h) {
        const int64_t bh = i64(bi) * H + h;
        const float* vh = v + i64(bi) * N * C + i64(h) * d;
        const float* gh = dout + i64(bi) * N * C + i64(h) * d;
        float* dvh = dv ? dv + i64(bi) * N * C + i64(h) * d : nullptr;
        const float* wc = w.conv_w + i64(h) * T;
        const uint64_t* codes = s.codes + bh * N;

        // DWConv: dV[src] += w[t] g[n]; dw[t] += sum g[n] . v[src]; db += sum g
        double* part = dconv_part.data() + bh * (T + 1);
        for (int n = 0; n < N; ++n) {
          const float* gn = gh + i64(n) * C;
          if (dconv_b) {
            double sb = 0.0;
            for (int i = 0; i < d; ++i) sb += gn[i];
            part[T] += sb;
          }
          for (int t = 0; t < T; ++t) {
            const int src = n + t - kConvPad;
            if (src < 0 || src >= N) continue;
            const float* vs = vh + i64(src) * C;
            if (dconv_w) {
              float sw = 0.0f;
              for (int i = 0; i < d; ++i) sw += gn[i] * vs[i];
              part[t] += sw;
            }
            if (dvh) {
              float* __restrict dvs = dvh + i64(src) * C;
              const float wt = wc[t];
              for (int i = 0; i < d; ++i) dvs[i] += wt * gn[i];
            }
          }
        }
        if (!dvh && !dqk_lin) continue;

        // normalisation: dz = (g - zhat (zhat . g)) / ||z||  (g / eps when clamped)
        const float* z = s.z + bh * N * d;
        const float* zn = s.znorm + bh * N;
        for (int n = 0; n < N; ++n) {
          const float* gn = gh + i64(n) * C;
          const float* zr = z + i64(n) * d;
          float* dzr = dz.data() + i64(n) * d;
          const float inv = 1.0f / zn[n];
          if (zn[n] > kHammingNormEps) {
            double dot = 0.0;
            for (int i = 0; i < d; ++i) dot += static_cast<double>(zr[i]) * gn[i];
            const float c = static_cast<float>(dot) * inv * inv;  // (zhat . g) / ||z||
            for (int i = 0; i < d; ++i) dzr[i] = (gn[i] - zr[i] * c) * inv;
          } else {
            for (int i = 0; i < d; ++i) dzr[i] = gn[i] * inv;
          }
        }
        // dKV = (1/pi) code^T dz  (MatAdd #1 on dz)
        std::fill(dkv.begin(), dkv.end(), 0.0f);
        matadd1_accumulate(dkv.data(), codes, dz.data(), N, d, d);
        for (float& e : dkv) e *= kInvPi;
        if (dvh) {
          // dV += 0.5 dz + code dKV  (MatAdd #2 on dKV)
          for (int n = 0; n < N; ++n) {
            float* __restrict dvr = dvh + i64(n) * C;
            const float* dzr = dz.data() + i64(n) * d;
            for (int i = 0; i < d; ++i) dvr[i] += 0.5f * dzr[i];
          }
          matadd2_rows<true>(dvh, C, codes, dkv.data(), N, d);
        }
        if (!dqk_lin) continue;
        // dcode (N,b) = (1/pi) dz KV^T + V dKV^T ; dy = STE(dcode)
        const float* kv = s.kv + bh * nb * d;
        sgemm(false, true, N, nb, d, kInvPi, dz.data(), d, kv, d, 0.0f, dc.data(), nb);
        sgemm(false, true, N, nb, d, 1.0f, vh, C, dkv.data(), d, 1.0f, dc.data(), nb);
        std::fill(dy.begin(), dy.end(), 0.0f);
        ksh_ste_backward(dy.data(), dc.data(), s.y + bh * N * nb, i64(N) * nb);
        // hash and q normalisation
        std::fill(dq.begin(), dq.end(), 0.0f);
        ksh_head_backward(dq.data(), dy.data(), s.q + bh * N * d, s.dist + bh * N * m, s.sigma[bh],
                          w.anchors + i64(h) * m * d, w.A + i64(h) * nb * m, N, d, nb, m, dD.data());
        normalise_rows_backward(dqk_lin + i64(bi) * N * C + i64(h) * d, C, dq.data(), s.q + bh * N * d,
                                s.qnorm + bh * N, N, d);
      }
  }
  for (int bi = 0; bi < B; ++bi)
    for (int h = 0; h < H; ++h) {
      const double* part = dconv_part.data() + (i64(bi) * H + h) * (T + 1);
      if (dconv_w)
        for (int t = 0; t < T; ++t) dconv_w[i64(h) * T + t] += static_cast<float>(part[t]);
      if (dconv_b) dconv_b[h] += static_cast<float>(part[T]);
    }
}

}  // namespace sav::cpu

#undef SAV_HAMMING_CLONES
