// shiftaddvit: linear layer y = x W^T + b on the CPU.
//
// Shapes: x (M,K)  w (F,K) as torch.nn.Linear.weight  b (F)  y (M,F).
// Fast path with AVX2+FMA: y and dx by hand-blocked 6x16 register tiles over W packed in 16-column panels
// (transposed for y), the bias added as each tile is stored, OpenMP over blocks of rows; at these widths
// (K, F of a few hundred) OpenBLAS spends much of its time packing. dw (a long sum over M) stays with
// sgemm, as fast here. Without AVX2: one sgemm per product (OpenBLAS threads it). The bias gradient is an
// OpenMP loop.
#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "core/blas.h"
#include "ops/cpu/ops.h"
#include "ops/cpu/simd_math.h"

namespace sav::cpu {

namespace {

void check_linear(int M, int K, int F) {
  SAV_CHECK(M >= 0, "linear: M (rows) must be non-negative, got " << M);
  SAV_CHECK_DIM(K);
  SAV_CHECK_DIM(F);
}

#if SAV_HAVE_AVX2_KERNELS
// Packs w (F, K) transposed into column panels of 16: wp[p][k][c] = w[16p + c][k], zero past F (the
// layout the 6x16 tiles stream through). 8x8 blocks are transposed in registers.
int64_t packed_panels_floats(int F, int K) { return static_cast<int64_t>((F + 15) / 16) * 16 * K; }

SAV_AVX2 void pack_wt_panels(float* wp, const float* w, int F, int K) {
  const int k8 = K / 8 * 8;
  for (int f0 = 0; f0 < F; f0 += 8) {
    float* panel = wp + static_cast<int64_t>(f0 / 16) * 16 * K + (f0 % 16);  // + k*16 + c
    if (f0 + 8 <= F) {
      for (int k = 0; k < k8; k += 8) {
        const float* s0 = w + static_cast<int64_t>(f0) * K + k;
        __m256 r[8], t[8], u[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s0 + static_cast<int64_t>(i) * K);
        for (int i = 0; i < 4; ++i) {
          t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
          t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 2; ++i) {
          u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
          u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
          u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
          u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
        }
        float* d0 = panel + static_cast<int64_t>(k) * 16;
        for (int i = 0; i < 4; ++i) {
          _mm256_storeu_ps(d0 + i * 16, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
          _mm256_storeu_ps(d0 + (i + 4) * 16, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
        }
      }
      for (int k = k8; k < K; ++k)
        for (int c = 0; c < 8; ++c) panel[k * 16 + c] = w[static_cast<int64_t>(f0 + c) * K + k];
    } else {
      for (int k = 0; k < K; ++k)
        for (int c = 0; c < 8; ++c) panel[k * 16 + c] = f0 + c < F ? w[static_cast<int64_t>(f0 + c) * K + k] : 0.0f;
    }
  }
  if (F % 16 != 0 && F % 16 <= 8) {  // the right half of the last panel is all padding
    float* panel = wp + static_cast<int64_t>(F / 16) * 16 * K + 8;
    for (int k = 0; k < K; ++k)
      for (int c = 0; c < 8; ++c) panel[k * 16 + c] = 0.0f;
  }
}

// Rows [m0, m1) of C (M, N) = A (M, Kd) Bp (+ bias) (+ C if accumulate); A, C row-major (row strides lda,
// ldc), Bp packed in column panels of 16 (panel p is (Kd, 16) at bp + 16*Kd*p, zero past N). Six rows at
// a time sweep all panels, so the rows of A stay in L1 while the panels stream from L2. The next block's
// rows of A and C are cold (activations of several MB): their cache lines are requested a block ahead,
// a few per panel (a burst of prefetches would fill the miss queues and stall).
SAV_AVX2 void panel_gemm_rows(int m0, int m1, int N, int Kd, const float* a, int64_t lda, const float* bp, float* c,
                              int64_t ldc, const float* bias, bool accumulate) {
  const int panels = (N + 15) / 16;
  const int a_lines = (Kd + 15) / 16, row_lines = a_lines + panels, lines = 6 * row_lines;
  const int per_panel = (lines + panels - 1) / panels;
  for (int m = m0; m < m1; m += 6) {
    const int rows = std::min(6, m1 - m), next_lines = std::max(0, std::min(6, m1 - m - 6)) * row_lines;
    const float* ar = a + m * lda;
    float* cr = c + m * ldc;
    int line = 0;  // prefetch cursor over the next block's lines: per row, the A line then the C lines
    for (int p = 0; p < panels; ++p) {
      for (const int end = std::min(next_lines, line + per_panel); line < end; ++line) {
        const int r = 6 + line / row_lines, l = line % row_lines;
        const float* addr = l < a_lines ? ar + r * lda + 16 * l : cr + r * ldc + 16 * (l - a_lines);
        _mm_prefetch(reinterpret_cast<const char*>(addr), _MM_HINT_T0);
      }
      const int cols = std::min(16, N - 16 * p);
      const float* panel = bp + static_cast<int64_t>(p) * 16 * Kd;
      const float* bias_p = bias ? bias + 16 * p : nullptr;
      if (cols > 8)
        detail::avx2::gemm_block<2>(rows, cols, Kd, ar, lda, 1, panel, 16, cr + 16 * p, ldc, 1.0f, accumulate, bias_p);
      else
        detail::avx2::gemm_block<1>(rows, cols, Kd, ar, lda, 1, panel, 16, cr + 16 * p, ldc, 1.0f, accumulate, bias_p);
    }
  }
}

// Packs w (F, K) into column panels of 16 without transposing: wq[p][f][c] = w[f][16p + c], zero past K.
SAV_AVX2 void pack_w_panels(float* wq, const float* w, int F, int K) {
  const int full = K / 16, rem = K % 16;
  for (int p = 0; p < full; ++p) {
    float* panel = wq + static_cast<int64_t>(p) * 16 * F;
    for (int f = 0; f < F; ++f) {
      const float* src = w + static_cast<int64_t>(f) * K + 16 * p;
      _mm256_storeu_ps(panel + f * 16, _mm256_loadu_ps(src));
      _mm256_storeu_ps(panel + f * 16 + 8, _mm256_loadu_ps(src + 8));
    }
  }
  if (rem) {
    float* panel = wq + static_cast<int64_t>(full) * 16 * F;
    for (int f = 0; f < F; ++f)
      for (int c = 0; c < 16; ++c) panel[f * 16 + c] = c < rem ? w[static_cast<int64_t>(f) * K + 16 * full + c] : 0.0f;
  }
}
#endif

// db (n) += column sums of the (M, n) block of dy at row stride F; n <= kColumnBlock. The accumulators
// stay in registers.
constexpr int kColumnBlock = 64;
SAV_SIMD_CLONES void column_sums(float* db, const float* dy, int M, int F, int n) {
  float acc[kColumnBlock] = {};
  for (int m = 0; m < M; ++m) {
    const float* row = dy + static_cast<int64_t>(m) * F;
    if (n == kColumnBlock) {
#pragma omp simd
      for (int f = 0; f < kColumnBlock; ++f) acc[f] += row[f];
    } else {
      for (int f = 0; f < n; ++f) acc[f] += row[f];
    }
  }
  for (int f = 0; f < n; ++f) db[f] += acc[f];
}

// Splits [0, M) into per-thread row ranges of whole 6-row blocks and runs f(m0, m1) on each.
template <class Fn>
void parallel_row_blocks(int M, bool parallel, Fn f) {
  const int blocks = (M + 5) / 6;
#pragma omp parallel if (parallel && blocks > 1)
  {
#ifdef _OPENMP
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
#else
    const int nt = 1, t = 0;
#endif
    const int b0 = static_cast<int>(static_cast<int64_t>(blocks) * t / nt);
    const int b1 = static_cast<int>(static_cast<int64_t>(blocks) * (t + 1) / nt);
    if (b1 > b0) f(6 * b0, std::min(M, 6 * b1));
  }
}

}  // namespace

// ---- reference ----

void linear_forward_ref(float* y, const float* x, const float* w, const float* b, int M, int K, int F) {
  check_linear(M, K, F);
  for (int m = 0; m < M; ++m) {
    for (int f = 0; f < F; ++f) {
      double acc = b ? b[f] : 0.0;
      for (int k = 0; k < K; ++k)
        acc += static_cast<double>(x[static_cast<int64_t>(m) * K + k]) * w[static_cast<int64_t>(f) * K + k];
      y[static_cast<int64_t>(m) * F + f] = static_cast<float>(acc);
    }
  }
}

void linear_backward_ref(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w, int M, int K,
                         int F) {
  check_linear(M, K, F);
  if (dx) {
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < K; ++k) {
        double acc = 0.0;
        for (int f = 0; f < F; ++f)
          acc += static_cast<double>(dy[static_cast<int64_t>(m) * F + f]) * w[static_cast<int64_t>(f) * K + k];
        dx[static_cast<int64_t>(m) * K + k] += static_cast<float>(acc);
      }
  }
  if (dw) {
    for (int f = 0; f < F; ++f)
      for (int k = 0; k < K; ++k) {
        double acc = 0.0;
        for (int m = 0; m < M; ++m)
          acc += static_cast<double>(dy[static_cast<int64_t>(m) * F + f]) * x[static_cast<int64_t>(m) * K + k];
        dw[static_cast<int64_t>(f) * K + k] += static_cast<float>(acc);
      }
  }
  if (db) {
    for (int f = 0; f < F; ++f) {
      double acc = 0.0;
      for (int m = 0; m < M; ++m) acc += dy[static_cast<int64_t>(m) * F + f];
      db[f] += static_cast<float>(acc);
    }
  }
}

// ---- fast path ----

void linear_forward(float* y, const float* x, const float* w, const float* b, int M, int K, int F) {
  check_linear(M, K, F);
  if (M == 0) return;
  SAV_CHECK_PTR(y);
  SAV_CHECK_PTR(x);
  SAV_CHECK_PTR(w);
#if SAV_HAVE_AVX2_KERNELS
  if (detail::use_avx2()) {
    float* wp = detail::thread_buffer<0>(packed_panels_floats(F, K));
    pack_wt_panels(wp, w, F, K);
    const bool parallel = static_cast<int64_t>(M) * F * K >= 64 * detail::kParallelElems;
    parallel_row_blocks(M, parallel, [&](int m0, int m1) { panel_gemm_rows(m0, m1, F, K, x, K, wp, y, F, b, false); });
    return;
  }
#endif
  float beta = 0.0f;
  if (b) {
    // Seed y with the bias, then let sgemm accumulate on top of it.
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * F >= detail::kParallelElems)
    for (int m = 0; m < M; ++m) std::copy(b, b + F, y + static_cast<int64_t>(m) * F);
    beta = 1.0f;
  }
  sgemm(false, true, M, F, K, 1.0f, x, K, w, K, beta, y, F);
}

void linear_backward(float* dx, float* dw, float* db, const float* dy, const float* x, const float* w, int M, int K,
                     int F) {
  check_linear(M, K, F);
  if (M == 0) return;
  SAV_CHECK_PTR(dy);
#if SAV_HAVE_AVX2_KERNELS
  const bool avx2 = detail::use_avx2();
#else
  const bool avx2 = false;
#endif
  if (dx) {
    SAV_CHECK_PTR(w);
#if SAV_HAVE_AVX2_KERNELS
    if (avx2) {
      const bool parallel = static_cast<int64_t>(M) * F * K >= 64 * detail::kParallelElems;
      float* wq = detail::thread_buffer<0>(packed_panels_floats(K, F));
      pack_w_panels(wq, w, F, K);
      parallel_row_blocks(M, parallel,
                          [&](int m0, int m1) { panel_gemm_rows(m0, m1, K, F, dy, F, wq, dx, K, nullptr, true); });
    }
#endif
    if (!avx2) sgemm(false, false, M, K, F, 1.0f, dy, F, w, K, 1.0f, dx, K);
  }
  if (dw) {  // a long sum over M: OpenBLAS's packed kernel is as fast as hand-blocked tiles here
    SAV_CHECK_PTR(x);
    sgemm(true, false, F, K, M, 1.0f, dy, F, x, K, 1.0f, dw, K);
  }
  if (db) {
    // Column sums: blocks of columns in parallel, rows in order inside a block (deterministic).
    const int nblocks = (F + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * F >= detail::kParallelElems)
    for (int blk = 0; blk < nblocks; ++blk) {
      const int f0 = blk * kColumnBlock;
      column_sums(db + f0, dy + f0, M, F, std::min(kColumnBlock, F - f0));
    }
  }
}

}  // namespace sav::cpu
