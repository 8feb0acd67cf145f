// shiftaddvit: multi-head softmax attention core on the CPU (timm Attention between qkv and proj).
//
// Shapes: B batch, N tokens, C channels, H heads, d = C / H.
//   qkv (B,N,3C): element [b, n, s*C + h*d + i] is q (s=0), k (s=1) or v (s=2) of head h, as timm's
//                 qkv.reshape(B, N, 3, H, d)
//   att (B,H,N,N): softmax over keys of  q k^T * d^-0.5   (saved for backward)
//   out (B,N,C):  att v with head h in columns h*d .. h*d+d-1
// Backward per (b, h):  dv = att^T dout,  datt = dout v^T,  ds = att * (datt - rowsum(datt * att)),
//   dq = ds k * scale,  dk = ds^T q * scale.
// Fast path: OpenMP over the B*H (batch, head) pairs; each gathers its q, k, v into contiguous thread-local
// buffers and runs single-threaded sgemm (OpenBLAS's OpenMP build does not nest), with a vectorised
// softmax in between. Gradients are accumulated straight into dqkv by sgemm (beta = 1, row stride 3C).
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
__attribute__((target_clones("avx512f", "avx2", "default"))) void softmax_rows(float* a, int rows, int n) {
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
__attribute__((target_clones("avx512f", "avx2", "default"))) void softmax_backward_rows(float* datt, const float* att,
                                                                                        int rows, int n) {
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
  const bool parallel = pairs > 1 && static_cast<int64_t>(pairs) * N * N * d >= detail::kParallelElems;
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
  const bool parallel = pairs > 1 && static_cast<int64_t>(pairs) * N * N * d >= detail::kParallelElems;
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
