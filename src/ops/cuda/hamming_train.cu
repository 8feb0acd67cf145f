// Hamming attention for training, float32 (ops/cuda/hamming_train.h): forward that fills the CPU's saved
// tensors (cpu::HammingSaved, head-major) and its backward. Spec: cpu::hamming_attention_forward_ref /
// cpu::hamming_attention_backward_ref (ops/cpu/hamming.h, hamming.cpp).
//
// Legend: B batch, N tokens, C channels, H heads, d = C/H (<= 128), b = nbits (<= 64), m anchors (<= 64),
// bh = image * H + head, "row" = (bh, n) = one token of one head.
//
// Every kernel runs 256-thread blocks (8 warps). Row kernels take one (b,h) and a tile of 32 tokens per block
// (grid B*H*ceil(N/32), one dimension), one warp per token row; per-head constants (anchors, A, KV, dKV) are
// staged in shared memory with an odd row stride where lanes walk across rows (conflict-free). Per-head
// kernels over the codes (KV, dKV) take one (b,h) and a chunk of 256 (r, i) outputs per block, walking the
// tokens in increasing n (codes staged 256 at a time). No float atomics anywhere: every sum has a fixed order
// (sequential loops, xor-butterfly warp sums, fixed block trees), so reruns are bit-identical.
//
// Forward (saved = s):
//  F1 fwd_norm_dist   row: s.qnorm = max(||qk||, eps) (sum of squares in double), s.q = qk / qnorm,
//                     s.dist D_nj = sum_i (q_i - a_ji)^2, lane per anchor j, in the reference's order
//  F2 fwd_sigma       block per (b,h): s.sigma = max(mean D, 1e-12) (double, fixed block tree)
//  F3 fwd_hash        row: k_j = expf(-D_nj / (2 sigma)) - mu_j (lane per j), s.y y_r = sum_j A_rj k_j
//                     (lane per bit, the reference's order), s.codes by two ballots
//  F4 fwd_kv          (b,h) x 256 outputs: s.kv KV_ri = sum over n (increasing) with bit r set of v_ni
//  F5 fwd_out         row: s.z z = 0.5 v + (1/pi) sum over set bits (increasing r) of KV_r, s.znorm,
//                     out = z / znorm + (conv_b) + sum_t conv_w[t] v[n+t-4]
// The float formulas follow the reference (no FMA contraction: __fmul_rn / __fadd_rn), so q, qnorm, dist,
// kv, z and out normally agree with it bit for bit given the same codes; sigma's double sum runs in another
// order (rarely one ulp) and y differs by CUDA's expf (<= 2 ulp) against the C library's.
//
// Backward (ws = workspace, see hamming_train_workspace_floats):
//  B7 bwd_conv_partial  (head, chunk of 256 token rows): the 9 tap sums sum dout * v[n+t-4] and the bias sum
//     + bwd_conv_final  in double, per chunk (stored as float hi + lo pairs), then per head the chunks in
//                       order: dconv_w += , dconv_b += . Runs first (reads dout and v only).
//  B1 bwd_dz          row: dz = (g - zhat (zhat . g)) / znorm (g / znorm when clamped), double
//  B2 bwd_dkv         (b,h) x 256 outputs: dKV_ri = (1/pi) sum over n (increasing) with bit r set of dz_ni
//                     (double accumulation as the reference)
//  B3 bwd_dv_dcode    row, KV and dKV staged: dv = [conv: sum_t conv_w[t] dout[n+4-t], t = 8..0] +
//                     (0.5 dz + sum over set bits of dKV_r) (OVERWRITTEN); dcode_r = (dz . KV_r) / pi +
//                     v . dKV_r (double, lane per bit), dy = dcode where 0 < y < 1 else 0 (STE)
//  B4 bwd_dsig_rows   row: dk_j = sum_r dy_r A_rj, E = exp(-D / (2 sigma)) (double), row partial of
//                     dsigma = sum_j dk E D / (2 sigma^2) (hi + lo pair)
//  B5 bwd_dsig        block per (b,h): dsigma over the rows (fixed tree); c = dsigma / (N m), 0 if clamped
//  B6 bwd_dq          row: g_j = dk_j E (-1 / (2 sigma)) + c (dk and E recomputed), dq_i = sum_j (float)
//                     (2 g_j (q_i - a_ji)) (float sum over j as the reference), then the q normalisation
//                     backward written (=) into dqk
// The double formulas again follow the reference; only the dot products reduced across lanes (normalisation
// backward, dsigma) and the per-term 1/pi of dcode differ in the order / rounding of double sums.
//
// Aliasing: out must not be v (the conv reads neighbouring rows of v while rows of out are written); out may
// overlay qk (qk is read by F1 only). dv must not be dout or v; dqk may be dout or v (written last).
#include <algorithm>
#include <climits>
#include <cmath>

#include "ops/cuda/hamming_train.h"

namespace sav::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerBlock = 32;  // token rows per block of the row kernels (4 per warp)
constexpr int kMaxD = 128;
constexpr int kMaxBits = 64;
constexpr int kMaxM = 64;
constexpr int kSlots = kMaxD / 32;  // head dims per lane: i = lane + 32 k
constexpr int kTaps = 9;
constexpr int kPad = kTaps / 2;
constexpr int kConvRows = 256;  // token rows (b, n) per block of the conv-gradient partial sums
constexpr float kEps = 1e-6f;
constexpr float kSigmaMin = 1e-12f;
constexpr float kInvPiF = 0.318309886183790671538f;
constexpr double kPiD = 3.14159265358979323846;
constexpr unsigned kFull = 0xffffffffu;

static_assert(kTaps == sav::cpu::kHammingConvTaps, "conv taps differ from the CPU's");
static_assert(kEps == sav::cpu::kHammingNormEps && kSigmaMin == sav::cpu::kHammingSigmaMin,
              "constants differ from the CPU's");

// ---------------------------------------------------------------------------------------------------------
// device helpers

// xor butterfly: every lane ends with the same (bitwise) value, floating addition being commutative
__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

// Fixed-order tree over the block (kThreads threads); red: kThreads doubles of shared memory. Every thread
// gets the total.
__device__ __forceinline__ double block_sum(double x, double* red) {
  red[threadIdx.x] = x;
  __syncthreads();
#pragma unroll
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (int(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const double t = red[0];
  __syncthreads();
  return t;
}

// A double kept in two floats (the workspace is float): hi = (float)x, lo = (float)(x - hi), ~48 bits.
__device__ __forceinline__ void store_hilo(float* p, double x) {
  const float hi = float(x);
  p[0] = hi;
  p[1] = float(x - double(hi));
}
__device__ __forceinline__ double load_hilo(const float* p) { return double(p[0]) + double(p[1]); }

__device__ __forceinline__ int lowest_bit(uint64_t c) { return __ffsll(static_cast<long long>(c)) - 1; }

// Copies rows x cols of g (contiguous) into s with row stride lds, by the whole block.
__device__ __forceinline__ void stage(float* s, int lds, const float* g, int rows, int cols) {
  const int n = rows * cols;
  for (int e = threadIdx.x; e < n; e += kThreads) {
    const int r = e / cols, c = e - r * cols;
    s[r * lds + c] = g[e];
  }
}

// odd row stride >= cols: lanes walking across rows at one column hit 32 different banks
__host__ __device__ __forceinline__ int odd_stride(int cols) { return cols | 1; }

// ---------------------------------------------------------------------------------------------------------
// forward

struct FwdParams {
  float* out;
  const float* qk;
  const float* v;
  const float *anchors, *mu, *A, *conv_w, *conv_b;
  float *q, *qnorm, *dist, *sigma, *y, *kv, *z, *znorm;
  uint64_t* codes;
  int ldo, ldqk, ldv;
  int N, H, d, nb, m;
  int tiles;   // row tiles per (b, h)
  int chunks;  // (r, i) chunks of kThreads per (b, h) for the KV kernel
};

// F1: q, qnorm, dist. Shared: anchors (m, lda) | per-warp q row (d).
__global__ void __launch_bounds__(kThreads) fwd_norm_dist_kernel(const __grid_constant__ FwdParams p) {
  extern __shared__ float smem[];
  const int bh = blockIdx.x / p.tiles, tile = blockIdx.x - bh * p.tiles;
  const int b = bh / p.H, h = bh - b * p.H;
  const int d = p.d, m = p.m, lda = odd_stride(d);
  float* sa = smem;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* qw = sa + m * lda + warp * d;
  stage(sa, lda, p.anchors + int64_t(h) * m * d, m, d);
  __syncthreads();
  const int n1 = min(p.N, (tile + 1) * kRowsPerBlock);
  for (int n = tile * kRowsPerBlock + warp; n < n1; n += kWarps) {
    const int64_t row = int64_t(bh) * p.N + n;
    const float* x = p.qk + (int64_t(b) * p.N + n) * p.ldqk + int64_t(h) * d;
    float xv[kSlots];
    double ss = 0.0;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int i = lane + 32 * k;
      xv[k] = i < d ? x[i] : 0.0f;
      ss += double(xv[k]) * double(xv[k]);  // exact product: FMA or not, the same sum
    }
    ss = warp_sum(ss);
    const float nrm = fmaxf(float(sqrt(ss)), kEps);
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int i = lane + 32 * k;
      if (i < d) {
        const float qv = xv[k] / nrm;
        qw[i] = qv;
        p.q[row * d + i] = qv;
      }
    }
    if (lane == 0) p.qnorm[row] = nrm;
    __syncwarp();
    for (int j = lane; j < m; j += 32) {
      const float* a = sa + j * lda;
      float s = 0.0f;
      for (int i = 0; i < d; ++i) {
        const float t = __fsub_rn(qw[i], a[i]);
        s = __fadd_rn(s, __fmul_rn(t, t));
      }
      p.dist[row * m + j] = s;
    }
    __syncwarp();  // qw is rewritten by the next row
  }
}

// F2: sigma = max(mean of D over the (b,h), kSigmaMin). One block per (b,h).
__global__ void __launch_bounds__(kThreads) fwd_sigma_kernel(const __grid_constant__ FwdParams p) {
  __shared__ double red[kThreads];
  const int bh = blockIdx.x;
  const int64_t cnt = int64_t(p.N) * p.m;
  const float* D = p.dist + int64_t(bh) * cnt;
  double s = 0.0;
  for (int64_t e = threadIdx.x; e < cnt; e += kThreads) s += D[e];
  const double tot = block_sum(s, red);
  if (threadIdx.x == 0) p.sigma[bh] = fmaxf(float(tot / (double(p.N) * p.m)), kSigmaMin);
}

// F3: y and codes. Shared: A (nb, lA) | mu (m) | per-warp k row (m).
__global__ void __launch_bounds__(kThreads) fwd_hash_kernel(const __grid_constant__ FwdParams p) {
  extern __shared__ float smem[];
  const int bh = blockIdx.x / p.tiles, tile = blockIdx.x - bh * p.tiles;
  const int h = bh % p.H;
  const int nb = p.nb, m = p.m, lA = odd_stride(m);
  float* sA = smem;
  float* smu = sA + nb * lA;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* kw = smu + m + warp * m;
  stage(sA, lA, p.A + int64_t(h) * nb * m, nb, m);
  for (int j = threadIdx.x; j < m; j += kThreads) smu[j] = p.mu[int64_t(h) * m + j];
  __syncthreads();
  const float two_sigma = 2.0f * p.sigma[bh];
  const int n1 = min(p.N, (tile + 1) * kRowsPerBlock);
  for (int n = tile * kRowsPerBlock + warp; n < n1; n += kWarps) {
    const int64_t row = int64_t(bh) * p.N + n;
    for (int j = lane; j < m; j += 32) kw[j] = __fsub_rn(expf(-p.dist[row * m + j] / two_sigma), smu[j]);
    __syncwarp();
    uint64_t code = 0;
    for (int base = 0; base < nb; base += 32) {  // uniform over the warp: the ballots see every lane
      const int r = base + lane;
      float s = 0.0f;
      if (r < nb) {
        const float* Ar = sA + r * lA;
        for (int j = 0; j < m; ++j) s = __fadd_rn(s, __fmul_rn(Ar[j], kw[j]));
        p.y[row * nb + r] = s;
      }
      const unsigned bits = __ballot_sync(kFull, r < nb && s > 0.0f);
      code |= uint64_t(bits) << base;
    }
    if (lane == 0) p.codes[row] = code;
    __syncwarp();  // kw is rewritten by the next row
  }
}

// F4: KV_ri = sum over tokens n (increasing) whose bit r is set of v_ni. Block: (b,h) x kThreads outputs.
__global__ void __launch_bounds__(kThreads) fwd_kv_kernel(const __grid_constant__ FwdParams p) {
  __shared__ uint64_t sc[kThreads];
  const int bh = blockIdx.x / p.chunks, chunk = blockIdx.x - bh * p.chunks;
  const int b = bh / p.H, h = bh - b * p.H;
  const int d = p.d, e = chunk * kThreads + threadIdx.x;
  const bool active = e < p.nb * d;
  const int r = active ? e / d : 0, i = active ? e - r * d : 0;
  const float* vcol = p.v + int64_t(b) * p.N * p.ldv + int64_t(h) * d + i;
  const uint64_t* codes = p.codes + int64_t(bh) * p.N;
  float s = 0.0f;
  for (int n0 = 0; n0 < p.N; n0 += kThreads) {
    const int cnt = min(kThreads, p.N - n0);
    __syncthreads();
    if (int(threadIdx.x) < cnt) sc[threadIdx.x] = codes[n0 + threadIdx.x];
    __syncthreads();
    if (active)
      for (int u = 0; u < cnt; ++u)
        if ((sc[u] >> r) & 1u) s += vcol[int64_t(n0 + u) * p.ldv];
  }
  if (active) p.kv[(int64_t(bh) * p.nb + r) * d + i] = s;
}

// F5: z, znorm, out. No shared memory (KV rows read from global, coalesced over the lanes).
__global__ void __launch_bounds__(kThreads) fwd_out_kernel(const __grid_constant__ FwdParams p) {
  const int bh = blockIdx.x / p.tiles, tile = blockIdx.x - bh * p.tiles;
  const int b = bh / p.H, h = bh - b * p.H;
  const int d = p.d, N = p.N;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float* kvh = p.kv + int64_t(bh) * p.nb * d;
  const float* vh = p.v + int64_t(b) * N * p.ldv + int64_t(h) * d;  // row n at vh + n * ldv
  const float* cw = p.conv_w + int64_t(h) * kTaps;
  const float bias = p.conv_b ? p.conv_b[h] : 0.0f;
  const int n1 = min(N, (tile + 1) * kRowsPerBlock);
  for (int n = tile * kRowsPerBlock + warp; n < n1; n += kWarps) {
    const int64_t row = int64_t(bh) * N + n;
    const uint64_t code = p.codes[row];
    const float* vr = vh + int64_t(n) * p.ldv;
    float zv[kSlots];
    double ss = 0.0;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int i = lane + 32 * k;
      zv[k] = 0.0f;
      if (i < d) {
        float hs = 0.0f;  // MatAdd #2: the set bits' KV rows in increasing r
        for (uint64_t c = code; c; c &= c - 1) hs += kvh[lowest_bit(c) * d + i];
        zv[k] = __fadd_rn(__fmul_rn(0.5f, vr[i]), __fmul_rn(kInvPiF, hs));
        p.z[row * d + i] = zv[k];
      }
      ss += double(zv[k]) * double(zv[k]);
    }
    ss = warp_sum(ss);
    const float zn = fmaxf(float(sqrt(ss)), kEps);
    if (lane == 0) p.znorm[row] = zn;
    float* orow = p.out + (int64_t(b) * N + n) * p.ldo + int64_t(h) * d;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int i = lane + 32 * k;
      if (i < d) {
        float conv = bias;
        for (int t = 0; t < kTaps; ++t) {
          const int src = n + t - kPad;
          if (src >= 0 && src < N) conv = __fadd_rn(conv, __fmul_rn(cw[t], vh[int64_t(src) * p.ldv + i]));
        }
        orow[i] = __fadd_rn(zv[k] / zn, conv);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// backward

struct BwdParams {
  float* dqk;
  float* dv;
  float* dconv_w;
  float* dconv_b;
  const float* dout;
  const float* v;
  const float *q, *qnorm, *dist, *sigma, *y, *kv, *z, *znorm;
  const uint64_t* codes;
  const float *anchors, *A, *conv_w;
  float *dz, *dkv, *dy, *dsp, *dsc, *dconv_part;  // workspace
  int lddqk, lddv, lddout, ldv;
  int B, N, H, d, nb, m;
  int tiles, chunks, conv_chunks;
  bool need_dcode;  // dqk requested
};

// B7a: per (head, chunk of kConvRows token rows): the 9 tap sums sum dout[b,n,i] v[b,n+t-4,i] and the bias
// sum sum dout[b,n,i], in double; written as hi/lo pairs to dconv_part[(h * conv_chunks + chunk) * 10 + t].
__global__ void __launch_bounds__(kThreads) bwd_conv_partial_kernel(const __grid_constant__ BwdParams p) {
  __shared__ double red[kWarps][kTaps + 1];
  const int h = blockIdx.x / p.conv_chunks, chunk = blockIdx.x - h * p.conv_chunks;
  const int d = p.d, N = p.N;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r0 = int64_t(chunk) * kConvRows, r1 = min(r0 + kConvRows, int64_t(p.B) * N);
  double acc[kTaps + 1];
#pragma unroll
  for (int t = 0; t <= kTaps; ++t) acc[t] = 0.0;
  for (int64_t rw = r0 + warp; rw < r1; rw += kWarps) {
    const int b = int(rw / N), n = int(rw - int64_t(b) * N);
    const float* g = p.dout + rw * p.lddout + int64_t(h) * d;
    const float* vh = p.v + int64_t(b) * N * p.ldv + int64_t(h) * d;
    for (int i = lane; i < d; i += 32) {
      const double gi = g[i];
      acc[kTaps] += gi;
#pragma unroll
      for (int t = 0; t < kTaps; ++t) {
        const int src = n + t - kPad;
        if (src >= 0 && src < N) acc[t] += gi * double(vh[int64_t(src) * p.ldv + i]);  // exact product
      }
    }
  }
#pragma unroll
  for (int t = 0; t <= kTaps; ++t) {
    const double s = warp_sum(acc[t]);
    if (lane == 0) red[warp][t] = s;
  }
  __syncthreads();
  if (int(threadIdx.x) <= kTaps) {
    const int t = threadIdx.x;
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += red[w][t];
    store_hilo(p.dconv_part + ((int64_t(h) * p.conv_chunks + chunk) * (kTaps + 1) + t) * 2, s);
  }
}

// B7b: one block of 32 threads per head: thread t sums the chunks in order, then dconv_w / dconv_b +=.
__global__ void __launch_bounds__(32) bwd_conv_final_kernel(const __grid_constant__ BwdParams p) {
  const int h = blockIdx.x, t = threadIdx.x;
  if (t > kTaps) return;
  double s = 0.0;
  for (int c = 0; c < p.conv_chunks; ++c)
    s += load_hilo(p.dconv_part + ((int64_t(h) * p.conv_chunks + c) * (kTaps + 1) + t) * 2);
  if (t < kTaps) {
    if (p.dconv_w) p.dconv_w[int64_t(h) * kTaps + t] += float(s);
  } else if (p.dconv_b) {
    p.dconv_b[h] += float(s);
  }
}

// B1: dz (head-major, workspace) from the z normalisation. One warp per row, no shared memory.
__global__ void __launch_bounds__(kThreads) bwd_dz_kernel(const __grid_constant__ BwdParams p) {
  const int bh = blockIdx.x / p.tiles, tile = blockIdx.x - bh * p.tiles;
  const int b = bh / p.H, h = bh - b * p.H;
  const int d = p.d;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n1 = min(p.N, (tile + 1) * kRowsPerBlock);
  for (int n = tile * kRowsPerBlock + warp; n < n1; n += kWarps) {
    const int64_t row = int64_t(bh) * p.N + n;
    const float* g = p.dout + (int64_t(b) * p.N + n) * p.lddout + int64_t(h) * d;
    const float* zr = p.z + row * d;
    const double zn = p.znorm[row];
    double gv[kSlots], zh[kSlots];
    double dot = 0.0;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int i = lane + 32 * k;
      gv[k] = i < d ? double(g[i]) : 0.0;
      zh[k] = i < d ? double(zr[i]) / zn : 0.0;
      dot = __dadd_rn(dot, __dmul_rn(zh[k], gv[k]));
    }
    dot = warp_sum(dot);
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int i = lane + 32 * k;
      if (i < d) p.dz[row * d + i] = float(zn > kEps ? __dsub_rn(gv[k], __dmul_rn(zh[k], dot)) / zn : gv[k] / zn);
    }
  }
}

// B2: dKV_ri = (1/pi) sum over tokens n (increasing) whose bit r is set of dz_ni (double). Block: (b,h) x
// kThreads outputs.
__global__ void __launch_bounds__(kThreads) bwd_dkv_kernel(const __grid_constant__ BwdParams p) {
  __shared__ uint64_t sc[kThreads];
  const int bh = blockIdx.x / p.chunks, chunk = blockIdx.x - bh * p.chunks;
  const int d = p.d, e = chunk * kThreads + threadIdx.x;
  const bool active = e < p.nb * d;
  const int r = active ? e / d : 0, i = active ? e - r * d : 0;
  const float* dzcol = p.dz + int64_t(bh) * p.N * d + i;
  const uint64_t* codes = p.codes + int64_t(bh) * p.N;
  double s = 0.0;
  for (int n0 = 0; n0 < p.N; n0 += kThreads) {
    const int cnt = min(kThreads, p.N - n0);
    __syncthreads();
    if (int(threadIdx.x) < cnt) sc[threadIdx.x] = codes[n0 + threadIdx.x];
    __syncthreads();
    if (active)
      for (int u = 0; u < cnt; ++u)
        if ((sc[u] >> r) & 1u) s += double(dzcol[int64_t(n0 + u) * d]);
  }
  if (active) p.dkv[(int64_t(bh) * p.nb + r) * d + i] = float(s / kPiD);
}

// B3: dv (overwritten; when p.dv) and dy (when p.need_dcode). Shared: KV (nb, lK) | dKV (nb, lK) | per-warp
// dz row (d) | per-warp v row (d).
__global__ void __launch_bounds__(kThreads) bwd_dv_dcode_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ float smem[];
  const int bh = blockIdx.x / p.tiles, tile = blockIdx.x - bh * p.tiles;
  const int b = bh / p.H, h = bh - b * p.H;
  const int d = p.d, N = p.N, nb = p.nb, lK = odd_stride(d);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* skv = smem;
  float* sdkv = skv + nb * lK;
  float* wdz = sdkv + nb * lK + warp * d;
  float* wv = sdkv + nb * lK + kWarps * d + warp * d;
  if (p.need_dcode) stage(skv, lK, p.kv + int64_t(bh) * nb * d, nb, d);
  stage(sdkv, lK, p.dkv + int64_t(bh) * nb * d, nb, d);
  __syncthreads();
  const float* cw = p.conv_w + int64_t(h) * kTaps;
  const float* gh = p.dout + int64_t(b) * N * p.lddout + int64_t(h) * d;  // dout row n at gh + n * lddout
  const int n1 = min(N, (tile + 1) * kRowsPerBlock);
  for (int n = tile * kRowsPerBlock + warp; n < n1; n += kWarps) {
    const int64_t row = int64_t(bh) * N + n;
    const uint64_t code = p.codes[row];
    const float* vr = p.v + (int64_t(b) * N + n) * p.ldv + int64_t(h) * d;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int i = lane + 32 * k;
      if (i < d) {
        const float dzi = p.dz[row * d + i];
        if (p.need_dcode) {
          wdz[i] = dzi;
          wv[i] = vr[i];
        }
        if (p.dv) {
          // the reference: the conv part first (dout rows n+4-t for t = 8..0, i.e. increasing token), then
          // (float)(0.5 dz + sum over set bits of dKV_r) in double
          float cs = 0.0f;
          for (int t = kTaps - 1; t >= 0; --t) {
            const int src = n + kPad - t;
            if (src >= 0 && src < N) cs = __fadd_rn(cs, __fmul_rn(cw[t], gh[int64_t(src) * p.lddout + i]));
          }
          double acc = 0.5 * double(dzi);
          for (uint64_t c = code; c; c &= c - 1) acc += double(sdkv[lowest_bit(c) * lK + i]);
          p.dv[(int64_t(b) * N + n) * p.lddv + int64_t(h) * d + i] = __fadd_rn(cs, float(acc));
        }
      }
    }
    if (p.need_dcode) {
      __syncwarp();
      for (int r = lane; r < nb; r += 32) {
        const float* kr = skv + r * lK;
        const float* dkr = sdkv + r * lK;
        double a1 = 0.0, a2 = 0.0;  // products of floats: exact in double
        for (int i = 0; i < d; ++i) {
          a1 += double(wdz[i]) * double(kr[i]);
          a2 += double(wv[i]) * double(dkr[i]);
        }
        const double dcode = __dadd_rn(a1 / kPiD, a2);
        const float yv = p.y[row * nb + r];
        p.dy[row * nb + r] = (yv > 0.0f && yv < 1.0f) ? float(dcode) : 0.0f;
      }
      __syncwarp();  // wdz / wv are rewritten by the next row
    }
  }
}

// dk_j = sum_r dy_r A_rj (double, r increasing), for the anchors j = lane, lane + 32 of one row.
__device__ __forceinline__ double row_dk(const float* wdy, const float* sA, int nb, int m, int j) {
  double dk = 0.0;
  for (int r = 0; r < nb; ++r) dk += double(wdy[r]) * double(sA[r * m + j]);  // exact products
  return dk;
}

// B4: per row, the partial sum over j of dk E D / (2 sigma^2) (hi/lo pair in dsp). Shared: A (nb, m) |
// per-warp dy row (nb).
__global__ void __launch_bounds__(kThreads) bwd_dsig_rows_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ float smem[];
  const int bh = blockIdx.x / p.tiles, tile = blockIdx.x - bh * p.tiles;
  const int h = bh % p.H;
  const int nb = p.nb, m = p.m;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* sA = smem;
  float* wdy = sA + nb * m + warp * nb;
  stage(sA, m, p.A + int64_t(h) * nb * m, nb, m);
  __syncthreads();
  const double sg = p.sigma[bh];
  const double two_sigma = 2.0 * sg, two_sigma2 = 2.0 * sg * sg;
  const int n1 = min(p.N, (tile + 1) * kRowsPerBlock);
  for (int n = tile * kRowsPerBlock + warp; n < n1; n += kWarps) {
    const int64_t row = int64_t(bh) * p.N + n;
    for (int r = lane; r < nb; r += 32) wdy[r] = p.dy[row * nb + r];
    __syncwarp();
    double part = 0.0;
    for (int j = lane; j < m; j += 32) {
      const double dk = row_dk(wdy, sA, nb, m, j);
      const double D = p.dist[row * m + j];
      const double E = exp(-D / two_sigma);
      part += __dmul_rn(__dmul_rn(dk, E), D) / two_sigma2;
    }
    part = warp_sum(part);
    if (lane == 0) store_hilo(p.dsp + row * 2, part);
    __syncwarp();  // wdy is rewritten by the next row
  }
}

// B5: per (b,h): dsigma = sum of the row partials (fixed tree); dsc = dsigma / (N m) (0 when sigma is clamped).
__global__ void __launch_bounds__(kThreads) bwd_dsig_kernel(const __grid_constant__ BwdParams p) {
  __shared__ double red[kThreads];
  const int bh = blockIdx.x;
  const float* part = p.dsp + int64_t(bh) * p.N * 2;
  double s = 0.0;
  for (int n = threadIdx.x; n < p.N; n += kThreads) s += load_hilo(part + int64_t(n) * 2);
  const double tot = block_sum(s, red);
  if (threadIdx.x == 0) {
    const double sg = p.sigma[bh];
    store_hilo(p.dsc + int64_t(bh) * 2, sg > kSigmaMin ? tot / (double(p.N) * p.m) : 0.0);
  }
}

// B6: dq through the hash, then the q normalisation backward into dqk (overwritten). Shared: per-warp g row
// (m doubles) | anchors (m, lda) | A (nb, m) | per-warp dy row (nb).
__global__ void __launch_bounds__(kThreads) bwd_dq_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ double smem_d[];
  const int bh = blockIdx.x / p.tiles, tile = blockIdx.x - bh * p.tiles;
  const int b = bh / p.H, h = bh - b * p.H;
  const int d = p.d, nb = p.nb, m = p.m, lda = odd_stride(d);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  double* wg = smem_d + warp * m;
  float* sa = reinterpret_cast<float*>(smem_d + kWarps * m);
  float* sA = sa + m * lda;
  float* wdy = sA + nb * m + warp * nb;
  stage(sa, lda, p.anchors + int64_t(h) * m * d, m, d);
  stage(sA, m, p.A + int64_t(h) * nb * m, nb, m);
  __syncthreads();
  const double sg = p.sigma[bh];
  const double two_sigma = 2.0 * sg, neg_inv = -1.0 / (2.0 * sg);
  const double c = load_hilo(p.dsc + int64_t(bh) * 2);
  const int n1 = min(p.N, (tile + 1) * kRowsPerBlock);
  for (int n = tile * kRowsPerBlock + warp; n < n1; n += kWarps) {
    const int64_t row = int64_t(bh) * p.N + n;
    for (int r = lane; r < nb; r += 32) wdy[r] = p.dy[row * nb + r];
    __syncwarp();
    for (int j = lane; j < m; j += 32) {
      const double dk = row_dk(wdy, sA, nb, m, j);
      const double D = p.dist[row * m + j];
      const double E = exp(-D / two_sigma);
      const double dD = __dmul_rn(__dmul_rn(dk, E), neg_inv);
      wg[j] = __dmul_rn(2.0, __dadd_rn(dD, c));  // 2 g_j (exact doubling)
    }
    __syncwarp();
    const float* qr = p.q + row * d;
    float qv[kSlots], dq[kSlots];
    double dot = 0.0;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int i = lane + 32 * k;
      qv[k] = 0.0f;
      dq[k] = 0.0f;
      if (i < d) {
        qv[k] = qr[i];
        const double qi = qv[k];
        float acc = 0.0f;  // the reference: dq += (float)(2 g (q - a)), j increasing
        for (int j = 0; j < m; ++j) acc = __fadd_rn(acc, float(__dmul_rn(wg[j], qi - double(sa[j * lda + i]))));
        dq[k] = acc;
      }
      dot += double(qv[k]) * double(dq[k]);  // exact product
    }
    dot = warp_sum(dot);
    const double qn = p.qnorm[row];
    float* dx = p.dqk + (int64_t(b) * p.N + n) * p.lddqk + int64_t(h) * d;
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int i = lane + 32 * k;
      if (i < d) {
        const double g = dq[k];
        dx[i] = float(qn > kEps ? __dsub_rn(g, __dmul_rn(double(qv[k]), dot)) / qn : g / qn);
      }
    }
    __syncwarp();  // wg / wdy are rewritten by the next row
  }
}

// ---------------------------------------------------------------------------------------------------------
// host helpers

struct Sizes {
  int64_t BH, N, d, nb, m;
  int tiles, chunks, conv_chunks;
};

Sizes sizes_of(const sav::cpu::HammingDims& dims) {
  Sizes s{};
  s.BH = int64_t(dims.B) * dims.H;
  s.N = dims.N;
  s.d = dims.d();
  s.nb = dims.nbits;
  s.m = dims.m;
  s.tiles = (dims.N + kRowsPerBlock - 1) / kRowsPerBlock;
  s.chunks = int((s.nb * s.d + kThreads - 1) / kThreads);
  const int64_t conv_chunks = (int64_t(dims.B) * dims.N + kConvRows - 1) / kConvRows;
  SAV_CHECK(s.BH * s.tiles <= INT_MAX && s.BH * s.chunks <= INT_MAX && conv_chunks * dims.H <= INT_MAX,
            "hamming_train: sizes too large for the grid (B=" << dims.B << " N=" << dims.N << " H=" << dims.H << ")");
  s.conv_chunks = int(conv_chunks);
  return s;
}

// Workspace carve-up (floats): dz (BH N d) | dkv (BH nb d) | dy (BH N nb) | dsp (BH N 2) | dsc (BH 2) |
// dconv_part (H conv_chunks 10 2).
struct WsLayout {
  size_t dz, dkv, dy, dsp, dsc, conv, total;
};
WsLayout ws_layout(const sav::cpu::HammingDims& dims, const Sizes& s) {
  WsLayout w{};
  const size_t BH = size_t(s.BH), N = size_t(s.N), d = size_t(s.d), nb = size_t(s.nb);
  w.dz = 0;
  w.dkv = w.dz + BH * N * d;
  w.dy = w.dkv + BH * nb * d;
  w.dsp = w.dy + BH * N * nb;
  w.dsc = w.dsp + BH * N * 2;
  w.conv = w.dsc + BH * 2;
  w.total = w.conv + size_t(dims.H) * size_t(s.conv_chunks) * (kTaps + 1) * 2;
  return w;
}

void check_supported(const sav::cpu::HammingDims& dims, const char* fn) {
  SAV_CHECK(hamming_train_supports(dims), fn << ": unsupported sizes B=" << dims.B << " N=" << dims.N << " C=" << dims.C
                                             << " H=" << dims.H << " nbits=" << dims.nbits << " m=" << dims.m
                                             << " (need B, N, C, H >= 1, C % H == 0, C/H <= " << kMaxD
                                             << ", 1 <= nbits <= " << kMaxBits << ", 1 <= m <= " << kMaxM << ")");
}

void check_saved(const sav::cpu::HammingSaved& s, const char* fn) {
  SAV_CHECK(s.q && s.qnorm && s.dist && s.sigma && s.y && s.kv && s.z && s.znorm && s.codes,
            fn << ": the saved buffers are not bound (use cpu::hamming_saved_bind on device memory)");
}

}  // namespace

bool hamming_train_supports(const sav::cpu::HammingDims& dims) {
  if (dims.B < 1 || dims.N < 1 || dims.C < 1 || dims.H < 1 || dims.C % dims.H != 0) return false;
  const int d = dims.C / dims.H;
  return d <= kMaxD && dims.nbits >= 1 && dims.nbits <= kMaxBits && dims.m >= 1 && dims.m <= kMaxM;
}

size_t hamming_train_workspace_floats(const sav::cpu::HammingDims& dims) {
  check_supported(dims, "hamming_train_workspace_floats");
  return ws_layout(dims, sizes_of(dims)).total;
}

void hamming_train_forward(float* out, int ldo, const sav::cpu::HammingSaved& saved, const float* qk, int ldqk,
                           const float* v, int ldv, const sav::cpu::HammingWeights& w,
                           const sav::cpu::HammingDims& dims, cudaStream_t stream) {
  constexpr const char* fn = "hamming_train_forward";
  check_supported(dims, fn);
  const int C = dims.C;
  SAV_CHECK(ldo >= C && ldqk >= C && ldv >= C,
            fn << ": leading dimensions ldo=" << ldo << " ldqk=" << ldqk << " ldv=" << ldv << " below C=" << C);
  SAV_CHECK(out && qk && v, fn << ": out, qk and v must not be null");
  SAV_CHECK(w.anchors && w.mu && w.A && w.conv_w, fn << ": anchors, mu, A and conv_w are required");
  check_saved(saved, fn);
  SAV_CHECK(out != v, fn << ": out must not alias v");
  const Sizes s = sizes_of(dims);

  FwdParams p{};
  p.out = out, p.qk = qk, p.v = v;
  p.anchors = w.anchors, p.mu = w.mu, p.A = w.A, p.conv_w = w.conv_w, p.conv_b = w.conv_b;
  p.q = saved.q, p.qnorm = saved.qnorm, p.dist = saved.dist, p.sigma = saved.sigma, p.y = saved.y;
  p.kv = saved.kv, p.z = saved.z, p.znorm = saved.znorm, p.codes = saved.codes;
  p.ldo = ldo, p.ldqk = ldqk, p.ldv = ldv;
  p.N = dims.N, p.H = dims.H, p.d = int(s.d), p.nb = int(s.nb), p.m = int(s.m);
  p.tiles = s.tiles, p.chunks = s.chunks;

  const unsigned row_blocks = unsigned(s.BH * s.tiles);
  const size_t smem1 = (size_t(s.m) * odd_stride(int(s.d)) + size_t(kWarps) * s.d) * sizeof(float);
  allow_dynamic_smem(reinterpret_cast<const void*>(fwd_norm_dist_kernel), smem1);
  fwd_norm_dist_kernel<<<row_blocks, kThreads, smem1, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
  fwd_sigma_kernel<<<unsigned(s.BH), kThreads, 0, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
  const size_t smem3 = (size_t(s.nb) * odd_stride(int(s.m)) + size_t(s.m) * (1 + kWarps)) * sizeof(float);
  allow_dynamic_smem(reinterpret_cast<const void*>(fwd_hash_kernel), smem3);
  fwd_hash_kernel<<<row_blocks, kThreads, smem3, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
  fwd_kv_kernel<<<unsigned(s.BH * s.chunks), kThreads, 0, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
  fwd_out_kernel<<<row_blocks, kThreads, 0, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
}

void hamming_train_backward(float* dqk, int lddqk, float* dv, int lddv, float* dconv_w, float* dconv_b,
                            const float* dout, int lddout, const float* v, int ldv, const sav::cpu::HammingSaved& saved,
                            const sav::cpu::HammingWeights& w, const sav::cpu::HammingDims& dims, float* ws,
                            cudaStream_t stream) {
  constexpr const char* fn = "hamming_train_backward";
  check_supported(dims, fn);
  const int C = dims.C;
  SAV_CHECK(dout && v, fn << ": dout and v must not be null");
  SAV_CHECK(lddout >= C && ldv >= C,
            fn << ": leading dimensions lddout=" << lddout << " ldv=" << ldv << " below C=" << C);
  SAV_CHECK(!dqk || lddqk >= C, fn << ": lddqk=" << lddqk << " below C=" << C);
  SAV_CHECK(!dv || lddv >= C, fn << ": lddv=" << lddv << " below C=" << C);
  SAV_CHECK(w.anchors && w.A && w.conv_w, fn << ": anchors, A and conv_w are required");
  check_saved(saved, fn);
  SAV_CHECK(!dv || (dv != dout && dv != v), fn << ": dv must not alias dout or v");
  if (!dqk && !dv && !dconv_w && !dconv_b) return;
  SAV_CHECK(ws, fn << ": workspace must not be null (hamming_train_workspace_floats floats)");
  const Sizes s = sizes_of(dims);
  const WsLayout L = ws_layout(dims, s);

  BwdParams p{};
  p.dqk = dqk, p.dv = dv, p.dconv_w = dconv_w, p.dconv_b = dconv_b, p.dout = dout, p.v = v;
  p.q = saved.q, p.qnorm = saved.qnorm, p.dist = saved.dist, p.sigma = saved.sigma, p.y = saved.y;
  p.kv = saved.kv, p.z = saved.z, p.znorm = saved.znorm, p.codes = saved.codes;
  p.anchors = w.anchors, p.A = w.A, p.conv_w = w.conv_w;
  p.dz = ws + L.dz, p.dkv = ws + L.dkv, p.dy = ws + L.dy, p.dsp = ws + L.dsp, p.dsc = ws + L.dsc;
  p.dconv_part = ws + L.conv;
  p.lddqk = lddqk, p.lddv = lddv, p.lddout = lddout, p.ldv = ldv;
  p.B = dims.B, p.N = dims.N, p.H = dims.H, p.d = int(s.d), p.nb = int(s.nb), p.m = int(s.m);
  p.tiles = s.tiles, p.chunks = s.chunks, p.conv_chunks = s.conv_chunks;
  p.need_dcode = dqk != nullptr;

  // conv weight / bias gradients first: they read dout and v, which dqk may overlay
  if (dconv_w || dconv_b) {
    bwd_conv_partial_kernel<<<unsigned(int64_t(dims.H) * s.conv_chunks), kThreads, 0, stream>>>(p);
    SAV_CUDA_CHECK_LAUNCH();
    bwd_conv_final_kernel<<<unsigned(dims.H), 32, 0, stream>>>(p);
    SAV_CUDA_CHECK_LAUNCH();
  }
  if (!dqk && !dv) return;

  const unsigned row_blocks = unsigned(s.BH * s.tiles);
  bwd_dz_kernel<<<row_blocks, kThreads, 0, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
  bwd_dkv_kernel<<<unsigned(s.BH * s.chunks), kThreads, 0, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
  const size_t smem3 = (2 * size_t(s.nb) * odd_stride(int(s.d)) + 2 * size_t(kWarps) * s.d) * sizeof(float);
  allow_dynamic_smem(reinterpret_cast<const void*>(bwd_dv_dcode_kernel), smem3);
  bwd_dv_dcode_kernel<<<row_blocks, kThreads, smem3, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
  if (!dqk) return;

  const size_t smem4 = (size_t(s.nb) * s.m + size_t(kWarps) * s.nb) * sizeof(float);
  allow_dynamic_smem(reinterpret_cast<const void*>(bwd_dsig_rows_kernel), smem4);
  bwd_dsig_rows_kernel<<<row_blocks, kThreads, smem4, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
  bwd_dsig_kernel<<<unsigned(s.BH), kThreads, 0, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
  const size_t smem6 =
      size_t(kWarps) * s.m * sizeof(double) +
      (size_t(s.m) * odd_stride(int(s.d)) + size_t(s.nb) * s.m + size_t(kWarps) * s.nb) * sizeof(float);
  allow_dynamic_smem(reinterpret_cast<const void*>(bwd_dq_kernel), smem6);
  bwd_dq_kernel<<<row_blocks, kThreads, smem6, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
}

}  // namespace sav::cuda
