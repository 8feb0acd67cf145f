// shiftaddvit: multi-head softmax attention core on the CPU (timm Attention between qkv and proj).
//
// Shapes: B batch, N tokens, C channels, H heads, d = C / H.
//   qkv (B,N,3C): element [b, n, s*C + h*d + i] is q (s=0), k (s=1) or v (s=2) of head h, as timm's
//                 qkv.reshape(B, N, 3, H, d)
//   att (B,H,N,N): softmax over keys of  q k^T * d^-0.5   (saved for backward)
//   out (B,N,C):  att v with head h in columns h*d .. h*d+d-1
// Backward per (b, h):  dv = att^T dout,  datt = dout v^T,  ds = att * (datt - rowsum(datt * att)),
//   dq = ds k * scale,  dk = ds^T q * scale.
// Fast path: OpenMP over the B*H (batch, head) pairs. With AVX2+FMA each pair runs hand-blocked 6x16
// register tiles (detail::avx2::small_gemm) straight on the strided q, k, v rows of qkv (only k^T, v^T are
// packed, zero-padded to a multiple of 8 columns), with an AVX2 softmax in between; these products are
// far too small for BLAS (its packing and dispatch cost more than the arithmetic at N=50, d=24).
// Otherwise each pair gathers q, k, v into contiguous buffers and runs single-threaded sgemm.
// Gradients are accumulated straight into dqkv (row stride 3C).
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/blas.h"
#include "ops/cpu/ops.h"
#include "ops/cpu/simd_math.h"

namespace sav::cpu {

namespace {

void check_attention(int B, int N, int C, int H) {
  SAV_CHECK_DIM(B);
  SAV_CHECK_DIM(N);
  SAV_CHECK_DIM(C);
  SAV_CHECK_DIM(H);
  SAV_CHECK(C % H == 0, "attention: channels C=" << C << " must be divisible by heads H=" << H);
}

// Row-wise softmax in place: a (rows, n).
SAV_SIMD_CLONES void softmax_rows(float* a, int rows, int n) {
  for (int r = 0; r < rows; ++r) {
    float* row = a + static_cast<int64_t>(r) * n;
    float mx = row[0];
#pragma omp simd reduction(max : mx)
    for (int j = 0; j < n; ++j) mx = std::max(mx, row[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; ++j) {
      const float e = detail::exp_approx(row[j] - mx);
      row[j] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int j = 0; j < n; ++j) row[j] *= inv;
  }
}

// ds = att * (datt - rowsum(datt * att)), in place over datt: (rows, n).
SAV_SIMD_CLONES void softmax_backward_rows(float* datt, const float* att, int rows, int n) {
  for (int r = 0; r < rows; ++r) {
    float* g = datt + static_cast<int64_t>(r) * n;
    const float* p = att + static_cast<int64_t>(r) * n;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int j = 0; j < n; ++j) dot += g[j] * p[j];
#pragma omp simd
    for (int j = 0; j < n; ++j) g[j] = p[j] * (g[j] - dot);
  }
}

// Copies the (N, d) block at src with row stride ld into the contiguous dst.
void gather_head(float* dst, const float* src, int N, int d, int64_t ld) {
  for (int n = 0; n < N; ++n) std::copy(src + n * ld, src + n * ld + d, dst + static_cast<int64_t>(n) * d);
}

// OpenMP only where the pairs carry enough work to pay for waking the other threads: ~1M multiply-adds
// (about 0.1 ms on one core). Batch-1 vit_fmnist (4 pairs of N=50, d=24: 24 us in all) stays serial.
bool parallel_pairs(int pairs, int N, int d) {
  return pairs > 1 && static_cast<int64_t>(pairs) * N * N * d >= 32 * detail::kParallelElems;
}

#if SAV_HAVE_AVX2_KERNELS
// Per-pair work space of the AVX2 path, in floats: kt or vt (d, Np) and s (N, Np), Np = N rounded up to 8.
int64_t pad8(int n) { return (n + 7) / 8 * 8; }
int64_t pair_work_floats(int N, int d) { return pad8(N) * (d + N); }

// Asks for the cache lines of rows (rows, width) at row stride ld ahead of their use (the next batch
// element's rows of a head are cold: qkv is several MB).
void prefetch_rows(const float* p, int rows, int64_t ld, int width) {
  for (int r = 0; r < rows; ++r) {
    const float* row = p + r * ld;
    for (int off = 0; off < width; off += 16) __builtin_prefetch(row + off, 0, 2);
    __builtin_prefetch(row + width - 1, 0, 2);
  }
}

// dst (d, Np) = src (N, d)^T with src rows at stride ld; columns N..Np-1 are zero. 8x8 blocks are
// transposed in registers (a scalar transpose stalls on store-to-load address aliasing).
SAV_AVX2 void pack_transposed(float* dst, const float* src, int N, int d, int64_t ld, int64_t Np) {
  const int n8 = N / 8 * 8, d8 = d / 8 * 8;
  for (int j = 0; j < n8; j += 8)
    for (int t = 0; t < d8; t += 8) {
      const float* s0 = src + j * ld + t;
      const __m256 r0 = _mm256_loadu_ps(s0), r1 = _mm256_loadu_ps(s0 + ld), r2 = _mm256_loadu_ps(s0 + 2 * ld),
                   r3 = _mm256_loadu_ps(s0 + 3 * ld), r4 = _mm256_loadu_ps(s0 + 4 * ld),
                   r5 = _mm256_loadu_ps(s0 + 5 * ld), r6 = _mm256_loadu_ps(s0 + 6 * ld),
                   r7 = _mm256_loadu_ps(s0 + 7 * ld);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
                   t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                   t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                   u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                   u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                   u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* d0 = dst + t * Np + j;
      _mm256_storeu_ps(d0, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d0 + Np, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d0 + 2 * Np, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d0 + 3 * Np, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d0 + 4 * Np, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d0 + 5 * Np, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d0 + 6 * Np, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d0 + 7 * Np, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  for (int t = d8; t < d; ++t)  // leftover columns of src, all rows
    for (int j = 0; j < n8; ++j) dst[t * Np + j] = src[j * ld + t];
  for (int t = 0; t < d; ++t) {  // leftover rows of src, and the zero padding
    float* row = dst + t * Np;
    for (int j = n8; j < N; ++j) row[j] = src[j * ld + t];
    for (int64_t j = N; j < Np; ++j) row[j] = 0.0f;
  }
}

// Softmax of the N valid entries of row s (padded to a multiple of 8 with finite values): the
// probabilities overwrite s (padding lanes become 0) and are copied to p (N floats).
SAV_AVX2 void softmax_row_avx2(float* s, float* p, int N) {
  const int full = N / 8 * 8, rem = N - full;
  const __m256i tail = detail::avx2::lane_mask(rem);
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  __m256 vmax = ninf;
  for (int j = 0; j < full; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
  if (rem) vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + full), _mm256_castsi256_ps(tail)));
  const __m256 mx = _mm256_set1_ps(detail::avx2::hmax(vmax));
  __m256 vsum = _mm256_setzero_ps();
  for (int j = 0; j < full; j += 8) {
    const __m256 e = detail::avx2::exp(_mm256_sub_ps(_mm256_loadu_ps(s + j), mx));
    _mm256_storeu_ps(s + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  if (rem) {
    const __m256 e =
        _mm256_and_ps(detail::avx2::exp(_mm256_sub_ps(_mm256_loadu_ps(s + full), mx)), _mm256_castsi256_ps(tail));
    _mm256_storeu_ps(s + full, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / detail::avx2::hsum(vsum));
  for (int j = 0; j < full + (rem ? 8 : 0); j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv));
  std::copy(s, s + N, p);
}

// g = p * (g - dot(g, p)) over the N valid entries; g padded to a multiple of 8, p (N) unpadded.
SAV_AVX2 void softmax_backward_row_avx2(float* g, const float* p, int N) {
  const int full = N / 8 * 8, rem = N - full;
  const __m256i tail = detail::avx2::lane_mask(rem);
  __m256 vdot = _mm256_setzero_ps();
  for (int j = 0; j < full; j += 8) vdot = _mm256_fmadd_ps(_mm256_loadu_ps(g + j), _mm256_loadu_ps(p + j), vdot);
  if (rem) vdot = _mm256_fmadd_ps(_mm256_loadu_ps(g + full), _mm256_maskload_ps(p + full, tail), vdot);
  const __m256 dot = _mm256_set1_ps(detail::avx2::hsum(vdot));
  for (int j = 0; j < full; j += 8)
    _mm256_storeu_ps(g + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(g + j), dot)));
  if (rem)
    _mm256_storeu_ps(g + full,
                     _mm256_mul_ps(_mm256_maskload_ps(p + full, tail), _mm256_sub_ps(_mm256_loadu_ps(g + full), dot)));
}

// One (batch, head) pair forward. q, k, v: (N, d) at row stride ld (= 3C); out (N, d) at row stride ldo;
// att (N, N); work: pair_work_floats(N, d).
SAV_AVX2 void attention_pair_forward_avx2(float* out, float* att, const float* q, const float* k, const float* v, int N,
                                          int d, int64_t ld, int64_t ldo, float scale, float* work) {
  const int64_t Np = pad8(N);
  float* kt = work;          // (d, Np)
  float* s = work + d * Np;  // (N, Np)
  pack_transposed(kt, k, N, d, ld, Np);
  detail::avx2::small_gemm(N, static_cast<int>(Np), d, q, ld, 1, kt, Np, s, Np, scale, false);  // s = q k^T scale
  for (int i = 0; i < N; ++i) softmax_row_avx2(s + i * Np, att + static_cast<int64_t>(i) * N, N);
  detail::avx2::small_gemm(N, d, N, s, Np, 1, v, ld, out, ldo, 1.0f, false);  // out = p v
}

// One pair backward: dq, dk, dv (N, d) at row stride ld accumulate; dout (N, d) at row stride ldo.
SAV_AVX2 void attention_pair_backward_avx2(float* dq, float* dk, float* dv, const float* q, const float* k,
                                           const float* v, const float* att, const float* dout, int N, int d,
                                           int64_t ld, int64_t ldo, float scale, float* work) {
  const int64_t Np = pad8(N);
  float* vt = work;           // (d, Np)
  float* ds = work + d * Np;  // (N, Np)
  // dv += att^T dout: A(j, i) = att[i*N + j]
  detail::avx2::small_gemm(N, d, N, att, 1, N, dout, ldo, dv, ld, 1.0f, true);
  // datt = dout v^T, then the softmax backward row by row
  pack_transposed(vt, v, N, d, ld, Np);
  detail::avx2::small_gemm(N, static_cast<int>(Np), d, dout, ldo, 1, vt, Np, ds, Np, 1.0f, false);
  for (int i = 0; i < N; ++i) softmax_backward_row_avx2(ds + i * Np, att + static_cast<int64_t>(i) * N, N);
  // dq += ds k scale ; dk += ds^T q scale
  detail::avx2::small_gemm(N, d, N, ds, Np, 1, k, ld, dq, ld, scale, true);
  detail::avx2::small_gemm(N, d, N, ds, 1, Np, q, ld, dk, ld, scale, true);
}
#endif  // SAV_HAVE_AVX2_KERNELS

}  // namespace

// ---- reference ----

void attention_forward_ref(float* out, float* att, const float* qkv, int B, int N, int C, int H) {
  check_attention(B, N, C, H);
  const int d = C / H;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const int64_t C3 = 3 * static_cast<int64_t>(C);
  std::vector<double> s(N);
  for (int b = 0; b < B; ++b) {
    const float* base = qkv + b * N * C3;
    for (int h = 0; h < H; ++h) {
      float* a = att + ((static_cast<int64_t>(b) * H + h) * N) * N;
      for (int i = 0; i < N; ++i) {
        const float* q = base + i * C3 + h * d;
        double mx = -INFINITY;
        for (int j = 0; j < N; ++j) {
          const float* k = base + j * C3 + C + h * d;
          double acc = 0.0;
          for (int t = 0; t < d; ++t) acc += static_cast<double>(q[t]) * k[t];
          s[j] = acc * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0.0;
        for (int j = 0; j < N; ++j) {
          s[j] = std::exp(s[j] - mx);
          sum += s[j];
        }
        for (int j = 0; j < N; ++j) a[static_cast<int64_t>(i) * N + j] = static_cast<float>(s[j] / sum);
        for (int t = 0; t < d; ++t) {
          double acc = 0.0;
          for (int j = 0; j < N; ++j) acc += (s[j] / sum) * base[j * C3 + 2 * C + h * d + t];
          out[(static_cast<int64_t>(b) * N + i) * C + h * d + t] = static_cast<float>(acc);
        }
      }
    }
  }
}

void attention_backward_ref(float* dqkv, float* scratch, const float* dout, const float* qkv, const float* att, int B,
                            int N, int C, int H) {
  check_attention(B, N, C, H);
  if (!dqkv) return;
  const int d = C / H;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const int64_t C3 = 3 * static_cast<int64_t>(C);
  std::vector<double> ds(static_cast<size_t>(N) * N);
  for (int b = 0; b < B; ++b) {
    const float* base = qkv + b * N * C3;
    float* dbase = dqkv + b * N * C3;
    const float* dob = dout + static_cast<int64_t>(b) * N * C;
    for (int h = 0; h < H; ++h) {
      const float* a = att + ((static_cast<int64_t>(b) * H + h) * N) * N;
      // datt[i][j] = sum_t dout[i][t] v[j][t], then the softmax backward row by row.
      for (int i = 0; i < N; ++i) {
        double dot = 0.0;
        for (int j = 0; j < N; ++j) {
          double acc = 0.0;
          for (int t = 0; t < d; ++t)
            acc += static_cast<double>(dob[i * C + h * d + t]) * base[j * C3 + 2 * C + h * d + t];
          ds[static_cast<size_t>(i) * N + j] = acc;
          dot += acc * a[static_cast<int64_t>(i) * N + j];
        }
        for (int j = 0; j < N; ++j) {
          const size_t ij = static_cast<size_t>(i) * N + j;
          ds[ij] = a[ij] * (ds[ij] - dot);
        }
      }
      for (int j = 0; j < N; ++j) {
        for (int t = 0; t < d; ++t) {
          double dv = 0.0, dk = 0.0;
          for (int i = 0; i < N; ++i) {
            dv += static_cast<double>(a[static_cast<int64_t>(i) * N + j]) * dob[i * C + h * d + t];
            dk += ds[static_cast<size_t>(i) * N + j] * base[i * C3 + h * d + t];
          }
          dbase[j * C3 + 2 * C + h * d + t] += static_cast<float>(dv);
          dbase[j * C3 + C + h * d + t] += static_cast<float>(dk * scale);
        }
      }
      for (int i = 0; i < N; ++i) {
        for (int t = 0; t < d; ++t) {
          double dq = 0.0;
          for (int j = 0; j < N; ++j) dq += ds[static_cast<size_t>(i) * N + j] * base[j * C3 + C + h * d + t];
          dbase[i * C3 + h * d + t] += static_cast<float>(dq * scale);
        }
      }
    }
  }
}

// ---- fast path ----

void attention_forward(float* out, float* att, const float* qkv, int B, int N, int C, int H) {
  check_attention(B, N, C, H);
  SAV_CHECK_PTR(out);
  SAV_CHECK_PTR(att);
  SAV_CHECK_PTR(qkv);
  const int d = C / H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t C3 = 3 * static_cast<int64_t>(C);
  const int pairs = B * H;
  const bool parallel = parallel_pairs(pairs, N, d);
#if SAV_HAVE_AVX2_KERNELS
  if (detail::use_avx2()) {
#pragma omp parallel if (parallel)
    {
      float* work = detail::thread_buffer<2>(pair_work_floats(N, d));
#pragma omp for schedule(static)
      for (int bh = 0; bh < pairs; ++bh) {
        const int b = bh / H, h = bh % H;
        const float* base = qkv + static_cast<int64_t>(b) * N * C3 + h * d;
        if (b + 1 < B) {
          const float* next = base + static_cast<int64_t>(N) * C3;
          for (int part = 0; part < 3; ++part) prefetch_rows(next + part * C, N, C3, d);
        }
        attention_pair_forward_avx2(out + static_cast<int64_t>(b) * N * C + h * d,
                                    att + static_cast<int64_t>(bh) * N * N, base, base + C, base + 2 * C, N, d, C3, C,
                                    scale, work);
      }
    }
    return;
  }
#endif
#pragma omp parallel if (parallel)
  {
    std::vector<float> buf(3 * static_cast<size_t>(N) * d);
    float *q = buf.data(), *k = q + static_cast<size_t>(N) * d, *v = k + static_cast<size_t>(N) * d;
#pragma omp for schedule(dynamic, 1)
    for (int bh = 0; bh < pairs; ++bh) {
      const int b = bh / H, h = bh % H;
      const float* base = qkv + static_cast<int64_t>(b) * N * C3 + h * d;
      gather_head(q, base, N, d, C3);
      gather_head(k, base + C, N, d, C3);
      gather_head(v, base + 2 * C, N, d, C3);
      float* a = att + static_cast<int64_t>(bh) * N * N;
      sgemm(false, true, N, N, d, scale, q, d, k, d, 0.0f, a, N);
      softmax_rows(a, N, N);
      sgemm(false, false, N, d, N, 1.0f, a, N, v, d, 0.0f, out + static_cast<int64_t>(b) * N * C + h * d, C);
    }
  }
}

void attention_backward(float* dqkv, float* scratch, const float* dout, const float* qkv, const float* att, int B,
                        int N, int C, int H) {
  check_attention(B, N, C, H);
  if (!dqkv) return;
  SAV_CHECK(scratch != nullptr, "attention_backward: scratch (B*H*N*N floats of work space) must not be null");
  SAV_CHECK_PTR(dout);
  SAV_CHECK_PTR(qkv);
  SAV_CHECK_PTR(att);
  const int d = C / H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t C3 = 3 * static_cast<int64_t>(C);
  const int pairs = B * H;
  const bool parallel = parallel_pairs(pairs, N, d);
#if SAV_HAVE_AVX2_KERNELS
  if (detail::use_avx2()) {
#pragma omp parallel if (parallel)
    {
      float* work = detail::thread_buffer<2>(pair_work_floats(N, d));
#pragma omp for schedule(static)
      for (int bh = 0; bh < pairs; ++bh) {
        const int b = bh / H, h = bh % H;
        const int64_t off = static_cast<int64_t>(b) * N * C3 + h * d;
        float* dq = dqkv + off;
        const float* q = qkv + off;
        if (b + 1 < B) {
          const int64_t next = off + static_cast<int64_t>(N) * C3;
          for (int part = 0; part < 3; ++part) {
            prefetch_rows(qkv + next + part * C, N, C3, d);
            prefetch_rows(dqkv + next + part * C, N, C3, d);
          }
          prefetch_rows(dout + static_cast<int64_t>(b + 1) * N * C + h * d, N, C, d);
        }
        attention_pair_backward_avx2(dq, dq + C, dq + 2 * C, q, q + C, q + 2 * C,
                                     att + static_cast<int64_t>(bh) * N * N,
                                     dout + static_cast<int64_t>(b) * N * C + h * d, N, d, C3, C, scale, work);
      }
    }
    return;
  }
#endif
#pragma omp parallel if (parallel)
  {
    std::vector<float> buf(4 * static_cast<size_t>(N) * d);
    float *q = buf.data(), *k = q + static_cast<size_t>(N) * d, *v = k + static_cast<size_t>(N) * d,
          *go = v + static_cast<size_t>(N) * d;
#pragma omp for schedule(dynamic, 1)
    for (int bh = 0; bh < pairs; ++bh) {
      const int b = bh / H, h = bh % H;
      const int64_t off = static_cast<int64_t>(b) * N * C3 + h * d;
      gather_head(q, qkv + off, N, d, C3);
      gather_head(k, qkv + off + C, N, d, C3);
      gather_head(v, qkv + off + 2 * C, N, d, C3);
      gather_head(go, dout + static_cast<int64_t>(b) * N * C + h * d, N, d, C);
      const float* a = att + static_cast<int64_t>(bh) * N * N;
      float* ds = scratch + static_cast<int64_t>(bh) * N * N;
      float* dq = dqkv + off;
      // dv += att^T dout
      sgemm(true, false, N, d, N, 1.0f, a, N, go, d, 1.0f, dq + 2 * C, static_cast<int>(C3));
      // datt = dout v^T, then the softmax backward in place
      sgemm(false, true, N, N, d, 1.0f, go, d, v, d, 0.0f, ds, N);
      softmax_backward_rows(ds, a, N, N);
      // dq += ds k * scale ; dk += ds^T q * scale
      sgemm(false, false, N, d, N, scale, ds, N, k, d, 1.0f, dq, static_cast<int>(C3));
      sgemm(true, false, N, d, N, scale, ds, N, q, d, 1.0f, dq + C, static_cast<int>(C3));
    }
  }
}

}  // namespace sav::cpu
