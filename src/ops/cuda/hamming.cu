// Hamming attention core (binary-code linear attention, METHOD.md section 1) for one GPU: one CTA per
// (image b, head h), everything in shared memory (N <= 256 tokens, d <= 64, m <= 32 anchors, b <= 64 bits).
// Spec: cpu::hamming_attention_forward (ops/cpu/hamming.h); formulas in ops.h.
//
// Legend: B batch, N tokens, C channels, H heads, d = C/H, b = nbits hash bits, m anchors, T threads of the
// CTA (2 per token, a multiple of 32, 128..1024), W = T/32 warps.
//
// Phases (a __syncthreads between each):
//  0. stage the head's qk slice (bf16 -> f32) and its v slice (kept in bf16: exact, and half the shared
//     memory, so two CTAs fit on an SM) and its KSH buffers in shared memory: anchors transposed (d,36) with
//     ||a_j||^2, mu, A rows (b,36) (row stride 36 = 4 mod 32), zero padded to 32 anchors;
//  1. hash, 2 threads per token (laneT takes dims laneT, laneT+2, ...): q = qk / max(||qk||, eps) (norm in
//     double, as the CPU), the dot products q.a_j for all m anchors in registers, summed over the 2 lanes
//     (both lanes get the same sums), D_nj = max(||q||^2 + ||a_j||^2 - 2 q.a_j, 0) (one FMA
//     per (n,j,i) instead of a subtract and an FMA; the expansion differs from the CPU's sum of squared
//     differences by a few ulp of D ~ 1), stored over the token's staged qk row;
//     sigma: per-token sums of D in double, reduced over the CTA in a fixed order;
//     k_nj = exp(-D_nj / (2 sigma)) - mu_j in place (each lane half of the anchors), then y_nr for
//     bits r = laneT + 2k, code bits OR-ed over the 2 lanes -> codes[n];
//  2. MatAdd #1: KV_r = sum of the V rows whose bit r is set, / pi, as a 0/1 x bf16 product on the tensor cores
//     (matadd_mma: exact products, f32 sums; only the summation order differs from the CPU's);
//  3. MatAdd #2 + normalisation + conv: hkv = h KV (tensor cores, KV split in three bf16 parts: f32-accurate),
//     z = hkv + 0.5 v, out = z / max(||z||, eps) (norm in double), then the 9 taps added in order; bf16 stores.
// Deterministic: every sum has a fixed order and no atomics, so reruns and graph replays are bit-identical.
//
// Cost (DeiT, N=197, d=64, b=16, m=25): the hash is ~0.3 MFMA per (b,h), the MatAdds ~0.2 M additions;
// at batch 1 only B*H CTAs run (3 for DeiT-Tiny), a few microseconds each. Splitting a head over a cluster
// of CTAs (distributed shared memory) is later work.
#include <algorithm>

#include "ops/cuda/ops.h"
#include "ops/cuda/ptx.cuh"

namespace sav::cuda {

namespace {

constexpr int kHamMaxN = 256;
constexpr int kHamMaxD = 64;
constexpr int kHamMaxM = 32;
constexpr int kHamMaxBits = 64;
constexpr int kTpt = 2;             // threads per token in the hash phase
constexpr int kRow = 36;            // smem row stride (floats) of the transposed anchors and of A: 4 mod 32
constexpr int kTaps = 9;
constexpr int kPad = kTaps / 2;
constexpr float kNormEps = 1e-6f;    // cpu::kHammingNormEps
constexpr float kSigmaMin = 1e-12f;  // cpu::kHammingSigmaMin
constexpr float kInvPi = 0.318309886183790671538f;

struct HamParams {
  bf16* out;
  const bf16* qk;
  const bf16* v;
  const float *anchors, *mu, *A, *conv_w;
  int ldo, ldqk, ldv;
  int B, N, C, H, d, nbits, m;
  int ldq;     // smem row stride of the staged qk (floats), 4 mod 32
  bool vec;    // 16-byte loads of the qk and v rows (d % 8 == 0, strides and pointers aligned)
  bool pairs;  // d even and the output 4-byte aligned: bf16 pairs are stored at once
};

// Shared memory carve-up, the same on host and device.
struct HamSmem {
  size_t red, codes, q, v, at, aa, mu, a, kv, total;  // byte offsets
};
__host__ __device__ inline size_t align16(size_t x) { return (x + 15) / 16 * 16; }
__host__ __device__ inline HamSmem ham_smem(const HamParams& p) {
  HamSmem s{};
  size_t o = 0;
  s.red = o, o = align16(o + 33 * sizeof(double));
  s.codes = o, o = align16(o + size_t(p.N) * sizeof(unsigned long long));
  s.q = o, o = align16(o + size_t(p.N) * p.ldq * sizeof(float));
  s.v = o, o = align16(o + size_t(p.N) * p.d * sizeof(bf16));
  s.at = o, o = align16(o + size_t(p.d) * kRow * sizeof(float));
  s.aa = o, o = align16(o + kHamMaxM * sizeof(float));
  s.mu = o, o = align16(o + kHamMaxM * sizeof(float));
  s.a = o, o = align16(o + size_t(p.nbits) * kRow * sizeof(float));
  s.kv = o, o = align16(o + size_t(p.nbits) * p.d * sizeof(float));
  s.total = o;
  return s;
}

// Threads of the CTA: 2 per token, the tokens rounded up to 16 (whole warps), at least 4 warps.
inline int ham_threads(int N) { return std::clamp(kTpt * ((N + 15) / 16 * 16), 128, 1024); }

// bf16 bit patterns of two 0/1 values, the first in the low half (an mma operand pair)
__device__ __forceinline__ uint32_t bit_pair(unsigned long long c0, unsigned long long c1, int r) {
  return (((c0 >> r) & 1ull) ? 0x3F80u : 0u) | (((c1 >> r) & 1ull) ? 0x3F800000u : 0u);
}
__device__ __forceinline__ uint32_t bf16_pair(bf16 lo, bf16 hi) {
  return uint32_t(__bfloat16_as_ushort(lo)) | (uint32_t(__bfloat16_as_ushort(hi)) << 16);
}
__device__ __forceinline__ bf16 v_at(const bf16* Vs, int d, int N, int n, int c) {
  return n < N && c < d ? Vs[n * d + c] : __float2bfloat16_rn(0.0f);
}
// v[n][c], v[n][c + 1] in f32 (zero outside the head and past N)
__device__ __forceinline__ float2 v_pair(const bf16* Vs, int d, int N, int n, int c) {
  if (n < 0 || n >= N) return make_float2(0.0f, 0.0f);
  if (c + 1 < d && d % 2 == 0) return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(Vs + n * d + c));
  return make_float2(c < d ? __bfloat162float(Vs[n * d + c]) : 0.0f,
                     c + 1 < d ? __bfloat162float(Vs[n * d + c + 1]) : 0.0f);
}

// Phases 2-3, the two MatAdds, on the tensor cores (bf16 mma.sync m16n8k16, f32 accumulation). The codes are 0/1,
// exact in bf16, and v is bf16 already, so KV = h^T V is exact products summed in f32; the second product takes KV
// split in three bf16 parts (hi + mid + lo = KV to 2^-24), so Z = h KV is f32-accurate too. Against the CPU only
// the summation order differs (the codes, computed before, are the same).
//   2. KV (b x d) = h^T (b x N) V (N x d): warp per (16 bits, 8 columns) tile, k over the tokens in order; / pi.
//   3. Z (N x d) = h (N x b) KV (b x d), warp per 16 tokens (all columns in its registers): z = Z + 0.5 v, the
//      row norm by two shuffles (the 4 lanes of a row hold its d columns), z / max(|z|, eps), the 9 taps of v;
//      bf16 stores.
__device__ void matadd_mma(const HamParams& p, int b, int h, const unsigned long long* codes, const bf16* Vs,
                           float* KVs) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5, g = lane >> 2, q = lane & 3;
  const int d = p.d, N = p.N, nb = p.nbits, NT = (d + 7) / 8, MB = (nb + 15) / 16;
  // ---- 2. KV ----
  for (int task = warp; task < MB * NT; task += W) {
    const int mt = task / NT, nt = task - mt * NT, r0 = mt * 16 + g, n = nt * 8 + g;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < N; k0 += 16) {
      const int ka = k0 + 2 * q, kb = ka + 8;
      const unsigned long long c0 = ka < N ? codes[ka] : 0ull, c1 = ka + 1 < N ? codes[ka + 1] : 0ull;
      const unsigned long long c2 = kb < N ? codes[kb] : 0ull, c3 = kb + 1 < N ? codes[kb + 1] : 0ull;
      const uint32_t a[4] = {bit_pair(c0, c1, r0), bit_pair(c0, c1, r0 + 8), bit_pair(c2, c3, r0),
                             bit_pair(c2, c3, r0 + 8)};
      const uint32_t b0 = bf16_pair(v_at(Vs, d, N, ka, n), v_at(Vs, d, N, ka + 1, n));
      const uint32_t b1 = bf16_pair(v_at(Vs, d, N, kb, n), v_at(Vs, d, N, kb + 1, n));
      ptx::mma_bf16(acc, a, b0, b1);
    }
    const int c = nt * 8 + 2 * q;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = r0 + (i >> 1) * 8, cc = c + (i & 1);
      if (r < nb && cc < d) KVs[r * d + cc] = acc[i] * kInvPi;
    }
  }
  __syncthreads();
  // ---- 3. Z, normalisation, conv ----
  float cw[kTaps];
#pragma unroll
  for (int t = 0; t < kTaps; ++t) cw[t] = p.conv_w[h * kTaps + t];
  for (int t0 = warp * 16; t0 < N; t0 += W * 16) {
    const int ta = t0 + g, tb = ta + 8;
    const unsigned long long ca = ta < N ? codes[ta] : 0ull, cb = tb < N ? codes[tb] : 0ull;
    const bool interior = t0 >= kPad && t0 + 16 + kPad <= N && d % 8 == 0;  // uniform over the warp
    // z (rows ta, tb; columns c, c + 1 of column tile nt) = h KV + 0.5 v; recomputed by the second pass (the
    // products are a few mma; keeping every tile's accumulators would exceed the 64 registers of two CTAs per SM)
    auto tile_z = [&](int nt, float (&z)[4]) {
      const int n = nt * 8 + g, c = nt * 8 + 2 * q;
      z[0] = z[1] = z[2] = z[3] = 0.0f;
      for (int kk = 0; kk < MB * 16; kk += 16) {
        const int ra = kk + 2 * q, rb = ra + 8;
        const uint32_t a[4] = {bit_pair(ca, ca >> 1, ra), bit_pair(cb, cb >> 1, ra), bit_pair(ca, ca >> 1, rb),
                               bit_pair(cb, cb >> 1, rb)};
        const int rows[4] = {ra, ra + 1, rb, rb + 1};  // KV rows of b0 (2) and b1 (2)
        bf16 hi[4], mid[4], lo[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float x = rows[i] < nb && n < d ? KVs[rows[i] * d + n] : 0.0f;
          hi[i] = __float2bfloat16_rn(x);
          const float r1 = x - __bfloat162float(hi[i]);
          mid[i] = __float2bfloat16_rn(r1);
          lo[i] = __float2bfloat16_rn(r1 - __bfloat162float(mid[i]));
        }
        ptx::mma_bf16(z, a, bf16_pair(hi[0], hi[1]), bf16_pair(hi[2], hi[3]));
        ptx::mma_bf16(z, a, bf16_pair(mid[0], mid[1]), bf16_pair(mid[2], mid[3]));
        ptx::mma_bf16(z, a, bf16_pair(lo[0], lo[1]), bf16_pair(lo[2], lo[3]));
      }
      const float2 va = v_pair(Vs, d, N, ta, c), vb = v_pair(Vs, d, N, tb, c);
      z[0] += 0.5f * va.x, z[1] += 0.5f * va.y, z[2] += 0.5f * vb.x, z[3] += 0.5f * vb.y;
    };
    double ssa = 0.0, ssb = 0.0;  // the norms of rows ta and tb: the 4 lanes of a row hold its d columns
    for (int nt = 0; nt < NT; ++nt) {
      float z[4];
      tile_z(nt, z);
      ssa += double(z[0]) * z[0] + double(z[1]) * z[1];
      ssb += double(z[2]) * z[2] + double(z[3]) * z[3];
    }
    ssa += __shfl_xor_sync(0xffffffffu, ssa, 1);
    ssa += __shfl_xor_sync(0xffffffffu, ssa, 2);
    ssb += __shfl_xor_sync(0xffffffffu, ssb, 1);
    ssb += __shfl_xor_sync(0xffffffffu, ssb, 2);
    const float na = fmaxf(static_cast<float>(sqrt(ssa)), kNormEps);
    const float nbr = fmaxf(static_cast<float>(sqrt(ssb)), kNormEps);
    bf16* outa = p.out + (int64_t(b) * N + ta) * p.ldo + h * d;
    bf16* outb = p.out + (int64_t(b) * N + tb) * p.ldo + h * d;
    for (int nt = 0; nt < NT; ++nt) {
      const int c = nt * 8 + 2 * q;
      float z[4];
      tile_z(nt, z);
      float o[4] = {z[0] / na, z[1] / na, z[2] / nbr, z[3] / nbr};
      if (interior) {  // every tap row inside the image, whole column pairs: no checks (the same sums)
        const bf16* va = Vs + (ta - kPad) * d + c;
#pragma unroll
        for (int t = 0; t < kTaps; ++t) {
          const float2 xa = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(va + t * d));
          const float2 xb = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(va + (t + 8) * d));
          o[0] = fmaf(cw[t], xa.x, o[0]), o[1] = fmaf(cw[t], xa.y, o[1]);
          o[2] = fmaf(cw[t], xb.x, o[2]), o[3] = fmaf(cw[t], xb.y, o[3]);
        }
      } else {
#pragma unroll
        for (int t = 0; t < kTaps; ++t) {
          const float2 xa = v_pair(Vs, d, N, ta + t - kPad, c), xb = v_pair(Vs, d, N, tb + t - kPad, c);
          o[0] = fmaf(cw[t], xa.x, o[0]), o[1] = fmaf(cw[t], xa.y, o[1]);
          o[2] = fmaf(cw[t], xb.x, o[2]), o[3] = fmaf(cw[t], xb.y, o[3]);
        }
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if ((half ? tb : ta) >= N || c >= d) continue;
        bf16* dst = (half ? outb : outa) + c;
        const float x0 = o[2 * half], x1 = o[2 * half + 1];
        if (p.pairs && c + 1 < d) {
          *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(x0, x1);
        } else {
          dst[0] = __float2bfloat16_rn(x0);
          if (c + 1 < d) dst[1] = __float2bfloat16_rn(x1);
        }
      }
    }
  }
}

__global__ void __launch_bounds__(1024) hamming_kernel(const __grid_constant__ HamParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const HamSmem L = ham_smem(p);
  double* red = reinterpret_cast<double*>(smem + L.red);
  unsigned long long* codes = reinterpret_cast<unsigned long long*>(smem + L.codes);
  float* Qs = reinterpret_cast<float*>(smem + L.q);
  bf16* Vs = reinterpret_cast<bf16*>(smem + L.v);
  float* At = reinterpret_cast<float*>(smem + L.at);
  float* aa = reinterpret_cast<float*>(smem + L.aa);
  float* mus = reinterpret_cast<float*>(smem + L.mu);
  float* As = reinterpret_cast<float*>(smem + L.a);
  float* KVs = reinterpret_cast<float*>(smem + L.kv);

  const int tid = threadIdx.x, T = blockDim.x, lane = tid & 31, warp = tid >> 5, W = T >> 5;
  const int bh = blockIdx.x, b = bh / p.H, h = bh - b * p.H;
  const int N = p.N, d = p.d, m = p.m, nb = p.nbits;

  // ---- 0. stage qk, v (bf16 -> f32) and the head's KSH buffers ----
  const bf16* qk = p.qk + int64_t(b) * N * p.ldqk + h * d;
  const bf16* vv = p.v + int64_t(b) * N * p.ldv + h * d;
  if (p.vec) {
    const int chunks = d / 8;
    for (int i = tid; i < N * chunks; i += T) {
      const int n = i / chunks, c = (i - n * chunks) * 8;
      const uint4 rq = *reinterpret_cast<const uint4*>(qk + int64_t(n) * p.ldqk + c);
      const uint4 rv = *reinterpret_cast<const uint4*>(vv + int64_t(n) * p.ldv + c);
      const __nv_bfloat162* hq = reinterpret_cast<const __nv_bfloat162*>(&rq);
      float* q = Qs + n * p.ldq + c;
      *reinterpret_cast<uint4*>(Vs + n * d + c) = rv;  // d % 8 == 0: 16-byte aligned
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 fq = __bfloat1622float2(hq[k]);
        q[2 * k] = fq.x, q[2 * k + 1] = fq.y;
      }
    }
  } else {
    for (int i = tid; i < N * d; i += T) {
      const int n = i / d, c = i - n * d;
      Qs[n * p.ldq + c] = __bfloat162float(qk[int64_t(n) * p.ldqk + c]);
      Vs[n * d + c] = vv[int64_t(n) * p.ldv + c];
    }
  }
  const float* anc = p.anchors + int64_t(h) * m * d;
  for (int i = tid; i < d * kHamMaxM; i += T) {
    const int di = i / kHamMaxM, j = i - di * kHamMaxM;
    At[di * kRow + j] = j < m ? anc[j * d + di] : 0.0f;
  }
  for (int j = tid; j < kHamMaxM; j += T) {
    float s = 0.0f;
    if (j < m) {
      float x[kHamMaxD];  // every load in flight at once (one round trip), then the sum in order
#pragma unroll
      for (int i = 0; i < kHamMaxD; ++i) x[i] = i < d ? anc[j * d + i] : 0.0f;
#pragma unroll
      for (int i = 0; i < kHamMaxD; ++i)
        if (i < d) s = fmaf(x[i], x[i], s);
    }
    aa[j] = s;
    mus[j] = j < m ? p.mu[h * m + j] : 0.0f;
  }
  for (int i = tid; i < nb * kHamMaxM; i += T) {
    const int r = i / kHamMaxM, j = i - r * kHamMaxM;
    As[r * kRow + j] = j < m ? p.A[(int64_t(h) * nb + r) * m + j] : 0.0f;
  }
  __syncthreads();

  // ---- 1. hash: 4 threads per token; the token's staged qk row is reused for D_nj, then k_nj ----
  const int n = tid >> 1, laneT = tid & 1;
  const bool valid = n < N;
  float* qrow = Qs + (valid ? n : 0) * p.ldq;  // ldq >= 36: room for 32 anchors
  double ssd = 0.0;
  if (valid)
    for (int i = laneT; i < d; i += kTpt) ssd += double(qrow[i]) * qrow[i];
  ssd += __shfl_xor_sync(0xffffffffu, ssd, 1);
  const float nrm = fmaxf(static_cast<float>(sqrt(ssd)), kNormEps);
  float dot[kHamMaxM];
#pragma unroll
  for (int j = 0; j < kHamMaxM; ++j) dot[j] = 0.0f;
  float qq = 0.0f;
  if (valid) {
    for (int i = laneT; i < d; i += kTpt) {
      const float q = qrow[i] / nrm;  // as the CPU: x / max(||x||, eps)
      qq = fmaf(q, q, qq);
      const float4* a4 = reinterpret_cast<const float4*>(At + i * kRow);
#pragma unroll
      for (int j4 = 0; j4 < kHamMaxM / 4; ++j4) {
        if (4 * j4 < m) {
          const float4 a = a4[j4];
          dot[4 * j4] = fmaf(q, a.x, dot[4 * j4]);
          dot[4 * j4 + 1] = fmaf(q, a.y, dot[4 * j4 + 1]);
          dot[4 * j4 + 2] = fmaf(q, a.z, dot[4 * j4 + 2]);
          dot[4 * j4 + 3] = fmaf(q, a.w, dot[4 * j4 + 3]);
        }
      }
    }
  }
  qq += __shfl_xor_sync(0xffffffffu, qq, 1);
  __syncwarp();  // the group's reads of qrow are done: it now receives D
  double dsum = 0.0;
#pragma unroll
  for (int j = 0; j < kHamMaxM; ++j) {
    if (j < m) {  // m is uniform: the shuffles run on every lane or on none
      float t = dot[j];
      t += __shfl_xor_sync(0xffffffffu, t, 1);  // both lanes get the same sum
      const float D = fmaxf(qq + aa[j] - 2.0f * t, 0.0f);
      dsum += D;
      if ((j & 1) == laneT && valid) qrow[j] = D;
    }
  }
  // sigma = mean D over (n, j): one contribution per valid token, warp sums, then warp 0 in order
  double part = (valid && laneT == 0) ? dsum : 0.0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
  if (lane == 0) red[warp] = part;
  __syncthreads();
  if (warp == 0) {
    double s = lane < W ? red[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) red[32] = double(fmaxf(static_cast<float>(s / (double(N) * m)), kSigmaMin));
  }
  __syncthreads();
  const float two_sigma = 2.0f * static_cast<float>(red[32]);
  const int m4 = (m + 3) / 4 * 4;
  if (valid)  // k_nj = exp(-D_nj / (2 sigma)) - mu_j; zero in the padding up to a multiple of 4
    for (int j = laneT; j < m4; j += kTpt) qrow[j] = j < m ? expf(-qrow[j] / two_sigma) - mus[j] : 0.0f;
  __syncwarp();
  unsigned long long code = 0;
  if (valid) {
    const float4* k4 = reinterpret_cast<const float4*>(qrow);
    for (int r = laneT; r < nb; r += kTpt) {
      const float4* a4 = reinterpret_cast<const float4*>(As + r * kRow);
      float y = 0.0f;
      for (int j4 = 0; j4 < m4 / 4; ++j4) {
        const float4 a = a4[j4], k = k4[j4];
        y = fmaf(a.x, k.x, y);
        y = fmaf(a.y, k.y, y);
        y = fmaf(a.z, k.z, y);
        y = fmaf(a.w, k.w, y);
      }
      code |= static_cast<unsigned long long>(y > 0.0f) << r;
    }
  }
  code |= __shfl_xor_sync(0xffffffffu, code, 1);
  if (valid && laneT == 0) codes[n] = code;
  __syncthreads();

  // ---- 2-3. the MatAdds, normalisation and conv ----
  matadd_mma(p, b, h, codes, Vs, KVs);
}

}  // namespace

bool hamming_attention_supports(int N, int C, int H, int nbits, int m) {
  if (!(N >= 1 && N <= kHamMaxN && H >= 1 && C >= H && C % H == 0 && C / H <= kHamMaxD && nbits >= 1 &&
        nbits <= kHamMaxBits && m >= 1 && m <= kHamMaxM))
    return false;
  // The largest case (N 256, d 64, 64 bits) needs about 171 KB; sm_80 and later offer 163-227 KB.
  HamParams p{};
  p.N = N, p.d = C / H, p.nbits = nbits, p.m = m, p.ldq = (p.d + 31) / 32 * 32 + 4;
  return device_available() ? ham_smem(p).total <= size_t(max_smem_per_block()) : true;
}

void hamming_attention_forward_ld(bf16* out, int ldo, const bf16* qk, int ldqk, const bf16* v, int ldv,
                                  const float* anchors, const float* mu, const float* A, const float* conv_w, int B,
                                  int N, int C, int H, int nbits, int m, cudaStream_t stream) {
  SAV_CHECK(out && qk && v && anchors && mu && A && conv_w, "hamming attention: null pointer");
  SAV_CHECK(N >= 1 && N <= kHamMaxN && H >= 1 && C % H == 0 && C / H >= 1 && C / H <= kHamMaxD && nbits >= 1 &&
                nbits <= kHamMaxBits && m >= 1 && m <= kHamMaxM,
            "hamming attention: N=" << N << " C=" << C << " H=" << H << " nbits=" << nbits << " m=" << m
                                    << " not supported (N <= " << kHamMaxN << ", head size <= " << kHamMaxD
                                    << ", nbits <= " << kHamMaxBits << ", anchors <= " << kHamMaxM << ")");
  SAV_CHECK(ldo >= C && ldqk >= C && ldv >= C,
            "hamming attention: row strides " << ldo << ", " << ldqk << ", " << ldv << " below the width " << C);
  SAV_CHECK(B >= 0, "hamming attention: negative batch " << B);
  if (B == 0) return;
  SAV_CHECK(int64_t(B) * H <= (int64_t(1) << 31) - 1, "hamming attention: B*H too large");
  HamParams p{};
  p.out = out, p.qk = qk, p.v = v, p.anchors = anchors, p.mu = mu, p.A = A, p.conv_w = conv_w;
  p.ldo = ldo, p.ldqk = ldqk, p.ldv = ldv;
  p.B = B, p.N = N, p.C = C, p.H = H, p.d = C / H, p.nbits = nbits, p.m = m;
  p.ldq = (p.d + 31) / 32 * 32 + 4;
  auto a16 = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  p.vec = p.d % 8 == 0 && ldqk % 8 == 0 && ldv % 8 == 0 && a16(qk) && a16(v);
  p.pairs = p.d % 2 == 0 && ldo % 2 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0;
  const size_t smem = ham_smem(p).total;
  SAV_CHECK(smem <= size_t(max_smem_per_block()), "hamming attention: needs " << smem
                                                      << " bytes of shared memory, the device offers "
                                                      << max_smem_per_block());
  static bool attr_set = false;  // once per process (before any graph capture: the first call is eager)
  if (!attr_set) {
    SAV_CUDA_CHECK(cudaFuncSetAttribute(hamming_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        max_smem_per_block()));
    attr_set = true;
  }
  hamming_kernel<<<static_cast<unsigned>(int64_t(B) * H), ham_threads(N), smem, stream>>>(p);
  SAV_CUDA_CHECK_LAUNCH();
}

void hamming_attention_forward(bf16* out, const bf16* qk, const bf16* v, const float* anchors, const float* mu,
                               const float* A, const float* conv_w, int B, int N, int C, int H, int nbits, int m,
                               cudaStream_t stream) {
  hamming_attention_forward_ld(out, C, qk, C, v, C, anchors, mu, A, conv_w, B, N, C, H, nbits, m, stream);
}

}  // namespace sav::cuda
