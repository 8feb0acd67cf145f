// shiftaddvit: multi-head softmax attention core on the CPU (timm Attention between qkv and proj), and the
// PVTv2 variant whose keys/values come from a separate (spatially reduced) token set (ops/cpu/conv.h).
//
// Shapes: B batch, N query tokens, Nk key/value tokens (Nk = N for self-attention), C channels, H heads,
// d = C / H.
//   qkv (B,N,3C): element [b, n, s*C + h*d + i] is q (s=0), k (s=1) or v (s=2) of head h, as timm's
//                 qkv.reshape(B, N, 3, H, d)
//   q (B,N,C), kv (B,Nk,2C): the attention_q_kv_* layout, as timm's PVTv2 q and kv.reshape(B, Nk, 2, H, d)
//   att (B,H,N,Nk): softmax over keys of  q k^T * d^-0.5   (saved for backward)
//   out (B,N,C):  att v with head h in columns h*d .. h*d+d-1
// Backward per (b, h):  dv = att^T dout,  datt = dout v^T,  ds = att * (datt - rowsum(datt * att)),
//   dq = ds k * scale,  dk = ds^T q * scale.
// Both layouts run one implementation (attention_core_forward / _backward) on strided views: q, k and v
// of head 0 of batch element 0 and their row strides (3C, 3C, 3C for qkv; C, 2C, 2C for q and kv); the
// gradients have the layout of their inputs.
// Fast path: OpenMP over the B*H (batch, head) pairs. With AVX2+FMA each pair runs hand-blocked 6x16
// register tiles (detail::avx2::small_gemm) straight on the strided q, k, v rows (only k^T, v^T are
// packed, zero-padded to a multiple of 8 columns), with an AVX2 softmax in between; these products are
// far too small for BLAS (its packing and dispatch cost more than the arithmetic at N=50, d=24).
// Otherwise each pair gathers q, k, v into contiguous buffers and runs single-threaded sgemm.
// Gradients are accumulated straight into the strided dq, dk, dv.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/blas.h"
#include "ops/cpu/conv.h"
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

void check_attention_q_kv(int B, int N, int Nk, int C, int H) {
  SAV_CHECK_DIM(B);
  SAV_CHECK_DIM(N);
  SAV_CHECK_DIM(Nk);
  SAV_CHECK_DIM(C);
  SAV_CHECK_DIM(H);
  SAV_CHECK(C % H == 0, "attention_q_kv: channels C=" << C << " must be divisible by heads H=" << H);
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
bool parallel_pairs(int pairs, int N, int Nk, int d) {
  return pairs > 1 && static_cast<int64_t>(pairs) * N * Nk * d >= 32 * detail::kParallelElems;
}

// One attention problem as strided views: q, k, v point at head 0 of batch element 0; rows of q, k, v
// are ldq, ldk, ldv floats apart; batch element b starts N*ldq (q) and Nk*ldk, Nk*ldv (k, v) further.
// Head h is the d columns from h*d. out and dout are (B,N,C); att (B,H,N,Nk).
struct AttView {
  const float *q, *k, *v;
  int64_t ldq, ldk, ldv;
  int B, N, Nk, C, H;
};

#if SAV_HAVE_AVX2_KERNELS
// Per-pair work space of the AVX2 path, in floats: kt or vt (d, Nkp) and s (N, Nkp), Nkp = Nk rounded up
// to 8.
int64_t pad8(int n) { return (n + 7) / 8 * 8; }
int64_t pair_work_floats(int N, int Nk, int d) { return pad8(Nk) * (d + N); }

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

// One (batch, head) pair forward. q (N, d), k and v (Nk, d) at row strides ldq, ldk, ldv; out (N, d) at row
// stride ldo; att (N, Nk); work: pair_work_floats(N, Nk, d).
SAV_AVX2 void attention_pair_forward_avx2(float* out, float* att, const float* q, const float* k, const float* v, int N,
                                          int Nk, int d, int64_t ldq, int64_t ldk, int64_t ldv, int64_t ldo,
                                          float scale, float* work) {
  const int64_t Nkp = pad8(Nk);
  float* kt = work;           // (d, Nkp)
  float* s = work + d * Nkp;  // (N, Nkp)
  pack_transposed(kt, k, Nk, d, ldk, Nkp);
  detail::avx2::small_gemm(N, static_cast<int>(Nkp), d, q, ldq, 1, kt, Nkp, s, Nkp, scale, false);  // s = q k^T scale
  for (int i = 0; i < N; ++i) softmax_row_avx2(s + i * Nkp, att + static_cast<int64_t>(i) * Nk, Nk);
  detail::avx2::small_gemm(N, d, Nk, s, Nkp, 1, v, ldv, out, ldo, 1.0f, false);  // out = p v
}

// One pair backward: dq (N, d), dk and dv (Nk, d) accumulate at the row strides of q, k, v (each may be
// nullptr); dout (N, d) at row stride ldo.
SAV_AVX2 void attention_pair_backward_avx2(float* dq, float* dk, float* dv, const float* q, const float* k,
                                           const float* v, const float* att, const float* dout, int N, int Nk, int d,
                                           int64_t ldq, int64_t ldk, int64_t ldv, int64_t ldo, float scale,
                                           float* work) {
  const int64_t Nkp = pad8(Nk);
  float* vt = work;            // (d, Nkp)
  float* ds = work + d * Nkp;  // (N, Nkp)
  // dv += att^T dout: A(j, i) = att[i*Nk + j]
  if (dv) detail::avx2::small_gemm(Nk, d, N, att, 1, Nk, dout, ldo, dv, ldv, 1.0f, true);
  if (!dq && !dk) return;
  // datt = dout v^T, then the softmax backward row by row
  pack_transposed(vt, v, Nk, d, ldv, Nkp);
  detail::avx2::small_gemm(N, static_cast<int>(Nkp), d, dout, ldo, 1, vt, Nkp, ds, Nkp, 1.0f, false);
  for (int i = 0; i < N; ++i) softmax_backward_row_avx2(ds + i * Nkp, att + static_cast<int64_t>(i) * Nk, Nk);
  // dq += ds k scale ; dk += ds^T q scale
  if (dq) detail::avx2::small_gemm(N, d, Nk, ds, Nkp, 1, k, ldk, dq, ldq, scale, true);
  if (dk) detail::avx2::small_gemm(Nk, d, N, ds, 1, Nkp, q, ldq, dk, ldk, scale, true);
}
#endif  // SAV_HAVE_AVX2_KERNELS

// ---- the shared fast implementation (attention_forward / attention_q_kv_forward and their backward) ----

void attention_core_forward(float* out, float* att, const AttView& a) {
  const int N = a.N, Nk = a.Nk, C = a.C, H = a.H, d = C / H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t bq = N * a.ldq, bk = Nk * a.ldk, bv = Nk * a.ldv;  // batch strides
  const int pairs = a.B * H;
  const bool parallel = parallel_pairs(pairs, N, Nk, d);
#if SAV_HAVE_AVX2_KERNELS
  if (detail::use_avx2()) {
#pragma omp parallel if (parallel)
    {
      float* work = detail::thread_buffer<2>(pair_work_floats(N, Nk, d));
#pragma omp for schedule(static)
      for (int bh = 0; bh < pairs; ++bh) {
        const int b = bh / H, h = bh % H;
        const float* q = a.q + b * bq + h * d;
        const float* k = a.k + b * bk + h * d;
        const float* v = a.v + b * bv + h * d;
        if (b + 1 < a.B) {  // the next batch element's rows of this head
          prefetch_rows(q + bq, N, a.ldq, d);
          prefetch_rows(k + bk, Nk, a.ldk, d);
          prefetch_rows(v + bv, Nk, a.ldv, d);
        }
        attention_pair_forward_avx2(out + static_cast<int64_t>(b) * N * C + h * d,
                                    att + static_cast<int64_t>(bh) * N * Nk, q, k, v, N, Nk, d, a.ldq, a.ldk, a.ldv, C,
                                    scale, work);
      }
    }
    return;
  }
#endif
#pragma omp parallel if (parallel)
  {
    std::vector<float> buf((static_cast<size_t>(N) + 2 * static_cast<size_t>(Nk)) * d);
    float *q = buf.data(), *k = q + static_cast<size_t>(N) * d, *v = k + static_cast<size_t>(Nk) * d;
#pragma omp for schedule(dynamic, 1)
    for (int bh = 0; bh < pairs; ++bh) {
      const int b = bh / H, h = bh % H;
      gather_head(q, a.q + b * bq + h * d, N, d, a.ldq);
      gather_head(k, a.k + b * bk + h * d, Nk, d, a.ldk);
      gather_head(v, a.v + b * bv + h * d, Nk, d, a.ldv);
      float* p = att + static_cast<int64_t>(bh) * N * Nk;
      sgemm(false, true, N, Nk, d, scale, q, d, k, d, 0.0f, p, Nk);
      softmax_rows(p, N, Nk);
      sgemm(false, false, N, d, Nk, 1.0f, p, Nk, v, d, 0.0f, out + static_cast<int64_t>(b) * N * C + h * d, C);
    }
  }
}

// dq, dk, dv (each may be nullptr) have the layouts of a.q, a.k, a.v and accumulate. scratch: B*H*N*Nk
// floats (portable path).
void attention_core_backward(float* dq, float* dk, float* dv, float* scratch, const float* dout, const float* att,
                             const AttView& a) {
  const int N = a.N, Nk = a.Nk, C = a.C, H = a.H, d = C / H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t bq = N * a.ldq, bk = Nk * a.ldk, bv = Nk * a.ldv;  // batch strides
  const int pairs = a.B * H;
  const bool parallel = parallel_pairs(pairs, N, Nk, d);
#if SAV_HAVE_AVX2_KERNELS
  if (detail::use_avx2()) {
#pragma omp parallel if (parallel)
    {
      float* work = detail::thread_buffer<2>(pair_work_floats(N, Nk, d));
#pragma omp for schedule(static)
      for (int bh = 0; bh < pairs; ++bh) {
        const int b = bh / H, h = bh % H;
        const int64_t oq = b * bq + h * d, ok = b * bk + h * d, ov = b * bv + h * d;
        const float* go = dout + static_cast<int64_t>(b) * N * C + h * d;
        if (b + 1 < a.B) {  // the next batch element's rows of this head
          prefetch_rows(a.q + oq + bq, N, a.ldq, d);
          prefetch_rows(a.k + ok + bk, Nk, a.ldk, d);
          prefetch_rows(a.v + ov + bv, Nk, a.ldv, d);
          if (dq) prefetch_rows(dq + oq + bq, N, a.ldq, d);
          if (dk) prefetch_rows(dk + ok + bk, Nk, a.ldk, d);
          if (dv) prefetch_rows(dv + ov + bv, Nk, a.ldv, d);
          prefetch_rows(go + static_cast<int64_t>(N) * C, N, C, d);
        }
        attention_pair_backward_avx2(dq ? dq + oq : nullptr, dk ? dk + ok : nullptr, dv ? dv + ov : nullptr, a.q + oq,
                                     a.k + ok, a.v + ov, att + static_cast<int64_t>(bh) * N * Nk, go, N, Nk, d, a.ldq,
                                     a.ldk, a.ldv, C, scale, work);
      }
    }
    return;
  }
#endif
#pragma omp parallel if (parallel)
  {
    std::vector<float> buf((2 * static_cast<size_t>(N) + 2 * static_cast<size_t>(Nk)) * d);
    float *q = buf.data(), *k = q + static_cast<size_t>(N) * d, *v = k + static_cast<size_t>(Nk) * d,
          *go = v + static_cast<size_t>(Nk) * d;
#pragma omp for schedule(dynamic, 1)
    for (int bh = 0; bh < pairs; ++bh) {
      const int b = bh / H, h = bh % H;
      const int64_t oq = b * bq + h * d, ok = b * bk + h * d, ov = b * bv + h * d;
      gather_head(q, a.q + oq, N, d, a.ldq);
      gather_head(k, a.k + ok, Nk, d, a.ldk);
      gather_head(v, a.v + ov, Nk, d, a.ldv);
      gather_head(go, dout + static_cast<int64_t>(b) * N * C + h * d, N, d, C);
      const float* p = att + static_cast<int64_t>(bh) * N * Nk;
      // dv += att^T dout
      if (dv) sgemm(true, false, Nk, d, N, 1.0f, p, Nk, go, d, 1.0f, dv + ov, static_cast<int>(a.ldv));
      if (!dq && !dk) continue;
      // datt = dout v^T, then the softmax backward in place
      float* ds = scratch + static_cast<int64_t>(bh) * N * Nk;
      sgemm(false, true, N, Nk, d, 1.0f, go, d, v, d, 0.0f, ds, Nk);
      softmax_backward_rows(ds, p, N, Nk);
      // dq += ds k * scale ; dk += ds^T q * scale
      if (dq) sgemm(false, false, N, d, Nk, scale, ds, Nk, k, d, 1.0f, dq + oq, static_cast<int>(a.ldq));
      if (dk) sgemm(true, false, Nk, d, N, scale, ds, Nk, q, d, 1.0f, dk + ok, static_cast<int>(a.ldk));
    }
  }
}

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
  const int64_t C3 = 3 * static_cast<int64_t>(C);
  attention_core_forward(out, att, {qkv, qkv + C, qkv + 2 * C, C3, C3, C3, B, N, N, C, H});
}

void attention_backward(float* dqkv, float* scratch, const float* dout, const float* qkv, const float* att, int B,
                        int N, int C, int H) {
  check_attention(B, N, C, H);
  if (!dqkv) return;
  SAV_CHECK(scratch != nullptr, "attention_backward: scratch (B*H*N*N floats of work space) must not be null");
  SAV_CHECK_PTR(dout);
  SAV_CHECK_PTR(qkv);
  SAV_CHECK_PTR(att);
  const int64_t C3 = 3 * static_cast<int64_t>(C);
  attention_core_backward(dqkv, dqkv + C, dqkv + 2 * C, scratch, dout, att,
                          {qkv, qkv + C, qkv + 2 * C, C3, C3, C3, B, N, N, C, H});
}

// =====================================================================================================
// attention with separate queries and keys/values (ops/cpu/conv.h): q (B,N,C), kv (B,Nk,2C)

// ---- reference ----

void attention_q_kv_forward_ref(float* out, float* att, const float* q, const float* kv, int B, int N, int Nk, int C,
                                int H) {
  check_attention_q_kv(B, N, Nk, C, H);
  const int d = C / H;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const int64_t C2 = 2 * static_cast<int64_t>(C);
  std::vector<double> s(Nk);
  for (int b = 0; b < B; ++b) {
    const float* qb = q + static_cast<int64_t>(b) * N * C;
    const float* kvb = kv + static_cast<int64_t>(b) * Nk * C2;
    for (int h = 0; h < H; ++h) {
      float* a = att + ((static_cast<int64_t>(b) * H + h) * N) * Nk;
      for (int i = 0; i < N; ++i) {
        double mx = -INFINITY;
        for (int j = 0; j < Nk; ++j) {
          double acc = 0.0;
          for (int t = 0; t < d; ++t) acc += static_cast<double>(qb[i * C + h * d + t]) * kvb[j * C2 + h * d + t];
          s[j] = acc * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0.0;
        for (int j = 0; j < Nk; ++j) {
          s[j] = std::exp(s[j] - mx);
          sum += s[j];
        }
        for (int j = 0; j < Nk; ++j) a[static_cast<int64_t>(i) * Nk + j] = static_cast<float>(s[j] / sum);
        for (int t = 0; t < d; ++t) {
          double acc = 0.0;
          for (int j = 0; j < Nk; ++j) acc += (s[j] / sum) * kvb[j * C2 + C + h * d + t];
          out[(static_cast<int64_t>(b) * N + i) * C + h * d + t] = static_cast<float>(acc);
        }
      }
    }
  }
}

void attention_q_kv_backward_ref(float* dq, float* dkv, float* scratch, const float* dout, const float* q,
                                 const float* kv, const float* att, int B, int N, int Nk, int C, int H) {
  check_attention_q_kv(B, N, Nk, C, H);
  if (!dq && !dkv) return;
  const int d = C / H;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const int64_t C2 = 2 * static_cast<int64_t>(C);
  std::vector<double> ds(static_cast<size_t>(N) * Nk);
  for (int b = 0; b < B; ++b) {
    const float* qb = q + static_cast<int64_t>(b) * N * C;
    const float* kvb = kv + static_cast<int64_t>(b) * Nk * C2;
    const float* dob = dout + static_cast<int64_t>(b) * N * C;
    for (int h = 0; h < H; ++h) {
      const float* a = att + ((static_cast<int64_t>(b) * H + h) * N) * Nk;
      // datt[i][j] = sum_t dout[i][t] v[j][t], then the softmax backward row by row.
      for (int i = 0; i < N; ++i) {
        double dot = 0.0;
        for (int j = 0; j < Nk; ++j) {
          double acc = 0.0;
          for (int t = 0; t < d; ++t) acc += static_cast<double>(dob[i * C + h * d + t]) * kvb[j * C2 + C + h * d + t];
          ds[static_cast<size_t>(i) * Nk + j] = acc;
          dot += acc * a[static_cast<int64_t>(i) * Nk + j];
        }
        for (int j = 0; j < Nk; ++j) {
          const size_t ij = static_cast<size_t>(i) * Nk + j;
          ds[ij] = a[ij] * (ds[ij] - dot);
        }
      }
      if (dkv) {
        float* dkvb = dkv + static_cast<int64_t>(b) * Nk * C2;
        for (int j = 0; j < Nk; ++j)
          for (int t = 0; t < d; ++t) {
            double dv = 0.0, dk = 0.0;
            for (int i = 0; i < N; ++i) {
              dv += static_cast<double>(a[static_cast<int64_t>(i) * Nk + j]) * dob[i * C + h * d + t];
              dk += ds[static_cast<size_t>(i) * Nk + j] * qb[i * C + h * d + t];
            }
            dkvb[j * C2 + C + h * d + t] += static_cast<float>(dv);
            dkvb[j * C2 + h * d + t] += static_cast<float>(dk * scale);
          }
      }
      if (dq) {
        float* dqb = dq + static_cast<int64_t>(b) * N * C;
        for (int i = 0; i < N; ++i)
          for (int t = 0; t < d; ++t) {
            double acc = 0.0;
            for (int j = 0; j < Nk; ++j) acc += ds[static_cast<size_t>(i) * Nk + j] * kvb[j * C2 + h * d + t];
            dqb[i * C + h * d + t] += static_cast<float>(acc * scale);
          }
      }
    }
  }
}

// ---- fast path ----

void attention_q_kv_forward(float* out, float* att, const float* q, const float* kv, int B, int N, int Nk, int C,
                            int H) {
  check_attention_q_kv(B, N, Nk, C, H);
  SAV_CHECK_PTR(out);
  SAV_CHECK_PTR(att);
  SAV_CHECK_PTR(q);
  SAV_CHECK_PTR(kv);
  const int64_t C2 = 2 * static_cast<int64_t>(C);
  attention_core_forward(out, att, {q, kv, kv + C, C, C2, C2, B, N, Nk, C, H});
}

void attention_q_kv_backward(float* dq, float* dkv, float* scratch, const float* dout, const float* q, const float* kv,
                             const float* att, int B, int N, int Nk, int C, int H) {
  check_attention_q_kv(B, N, Nk, C, H);
  if (!dq && !dkv) return;
  SAV_CHECK(scratch != nullptr, "attention_q_kv_backward: scratch (B*H*N*Nk floats of work space) must not be null");
  SAV_CHECK_PTR(dout);
  SAV_CHECK_PTR(q);
  SAV_CHECK_PTR(kv);
  SAV_CHECK_PTR(att);
  const int64_t C2 = 2 * static_cast<int64_t>(C);
  attention_core_backward(dq, dkv, dkv ? dkv + C : nullptr, scratch, dout, att,
                          {q, kv, kv + C, C, C2, C2, B, N, Nk, C, H});
}

}  // namespace sav::cpu
