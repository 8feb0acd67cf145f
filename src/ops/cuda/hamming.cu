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
//  2. bit planes: plane[r] = the tokens whose bit r is set (one ballot per 32 tokens);
//  3. MatAdd #1 (additions only): warp per bit r, lanes over columns; walks the set tokens of plane[r] in
//     increasing n: KV_r = sum of V rows (the CPU's order), then KV_r / pi as the CPU fast path;
//  4. MatAdd #2 (additions only) + normalisation + conv, warp per token: hkv = sum over the set bits r
//     (increasing) of KV_r / pi, z = hkv + 0.5 v, out = z / max(||z||, eps) (norm in double), then the 9
//     taps added in order; bf16 stores.
// Deterministic: every sum has a fixed order and no atomics, so reruns and graph replays are bit-identical.
//
// Cost (DeiT, N=197, d=64, b=16, m=25): the hash is ~0.3 MFMA per (b,h), the MatAdds ~0.2 M additions;
// at batch 1 only B*H CTAs run (3 for DeiT-Tiny), a few microseconds each. Splitting a head over a cluster
// of CTAs (distributed shared memory) is later work.
#include <algorithm>

#include "ops/cuda/ops.h"

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
  int nwords;  // ceil(N / 32) words per bit plane
  bool vec;    // 16-byte loads of the qk and v rows (d % 8 == 0, strides and pointers aligned)
  bool pairs;  // d even: lanes take column pairs in phases 3-4 (else columns lane, lane + 32)
};

// Shared memory carve-up, the same on host and device.
struct HamSmem {
  size_t red, codes, q, v, at, aa, mu, a, kv, planes, total;  // byte offsets
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
  s.planes = o, o = align16(o + size_t(p.nbits) * p.nwords * sizeof(unsigned));
  s.total = o;
  return s;
}

// Threads of the CTA: 2 per token, the tokens rounded up to 16 (whole warps), at least 4 warps.
inline int ham_threads(int N) { return std::clamp(kTpt * ((N + 15) / 16 * 16), 128, 1024); }

// Columns of lane in phases 3-4: (2 lane, 2 lane + 1) with pairs, else (lane, lane + 32).
template <bool kPairs>
__device__ __forceinline__ void lane_cols(int lane, int& c0, int& c1) {
  c0 = kPairs ? 2 * lane : lane;
  c1 = kPairs ? 2 * lane + 1 : lane + 32;
}
template <bool kPairs>
__device__ __forceinline__ void load_cols(const float* row, int c0, int c1, int d, float& x0, float& x1) {
  if (kPairs) {
    if (c0 < d) {  // d even: c1 < d too
      const float2 t = *reinterpret_cast<const float2*>(row + c0);
      x0 = t.x, x1 = t.y;
    } else {
      x0 = x1 = 0.0f;
    }
  } else {
    x0 = c0 < d ? row[c0] : 0.0f;
    x1 = c1 < d ? row[c1] : 0.0f;
  }
}

template <bool kPairs>
__device__ __forceinline__ void load_cols(const bf16* row, int c0, int c1, int d, float& x0, float& x1) {
  if (kPairs) {
    if (c0 < d) {  // d even: c1 < d too
      const float2 t = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(row + c0));
      x0 = t.x, x1 = t.y;
    } else {
      x0 = x1 = 0.0f;
    }
  } else {
    x0 = c0 < d ? __bfloat162float(row[c0]) : 0.0f;
    x1 = c1 < d ? __bfloat162float(row[c1]) : 0.0f;
  }
}

template <bool kPairs>
__device__ void matadd_phases(const HamParams& p, int b, int h, const unsigned long long* codes, const bf16* Vs,
                              float* KVs, const unsigned* planes) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
  const int d = p.d, N = p.N;
  int c0, c1;
  lane_cols<kPairs>(lane, c0, c1);
  float cw[kTaps];
#pragma unroll
  for (int t = 0; t < kTaps; ++t) cw[t] = p.conv_w[h * kTaps + t];
  // ---- 3. MatAdd #1: KV_r = sum of the V rows whose bit r is set, then / pi (CPU fast path) ----
  for (int r = warp; r < p.nbits; r += W) {
    float a0 = 0.0f, a1 = 0.0f;
    for (int wd = 0; wd < p.nwords; ++wd) {
      for (unsigned msk = planes[r * p.nwords + wd]; msk; msk &= msk - 1) {
        const int n = wd * 32 + __ffs(msk) - 1;
        float x0, x1;
        load_cols<kPairs>(Vs + n * d, c0, c1, d, x0, x1);
        a0 += x0;
        a1 += x1;
      }
    }
    if (c0 < d) KVs[r * d + c0] = a0 * kInvPi;
    if (c1 < d) KVs[r * d + c1] = a1 * kInvPi;
  }
  __syncthreads();
  // ---- 4. MatAdd #2, normalisation, conv: warp per token ----
  for (int n = warp; n < N; n += W) {
    float z0 = 0.0f, z1 = 0.0f;
    for (unsigned long long c = codes[n]; c; c &= c - 1) {
      const int r = __ffsll(static_cast<long long>(c)) - 1;
      float x0, x1;
      load_cols<kPairs>(KVs + r * d, c0, c1, d, x0, x1);
      z0 += x0;
      z1 += x1;
    }
    float v0, v1;
    load_cols<kPairs>(Vs + n * d, c0, c1, d, v0, v1);
    z0 += 0.5f * v0;
    z1 += 0.5f * v1;
    double ss = double(z0) * z0 + double(z1) * z1;  // zero for columns >= d
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float zn = fmaxf(static_cast<float>(sqrt(ss)), kNormEps);
    float o0 = z0 / zn, o1 = z1 / zn;
#pragma unroll
    for (int t = 0; t < kTaps; ++t) {
      const int src = n + t - kPad;
      if (src >= 0 && src < N) {
        float x0, x1;
        load_cols<kPairs>(Vs + src * d, c0, c1, d, x0, x1);
        o0 = fmaf(cw[t], x0, o0);
        o1 = fmaf(cw[t], x1, o1);
      }
    }
    bf16* dst = p.out + (int64_t(b) * N + n) * p.ldo + h * d;
    if (kPairs) {
      if (c0 < d) *reinterpret_cast<__nv_bfloat162*>(dst + c0) = __floats2bfloat162_rn(o0, o1);
    } else {
      if (c0 < d) dst[c0] = __float2bfloat16_rn(o0);
      if (c1 < d) dst[c1] = __float2bfloat16_rn(o1);
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
  unsigned* planes = reinterpret_cast<unsigned*>(smem + L.planes);

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
    if (j < m)
      for (int i = 0; i < d; ++i) s = fmaf(anc[j * d + i], anc[j * d + i], s);
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

  // ---- 2. bit planes: plane[r] word w bit t = bit r of the code of token 32 w + t ----
  for (int i = warp; i < nb * p.nwords; i += W) {
    const int r = i / p.nwords, wd = i - r * p.nwords, tok = wd * 32 + lane;
    const bool bit = tok < N && ((codes[tok] >> r) & 1ull);
    const unsigned plane = __ballot_sync(0xffffffffu, bit);
    if (lane == 0) planes[i] = plane;
  }
  __syncthreads();

  // ---- 3-4. the MatAdds, normalisation and conv ----
  if (p.pairs)
    matadd_phases<true>(p, b, h, codes, Vs, KVs, planes);
  else
    matadd_phases<false>(p, b, h, codes, Vs, KVs, planes);
}

}  // namespace

bool hamming_attention_supports(int N, int C, int H, int nbits, int m) {
  if (!(N >= 1 && N <= kHamMaxN && H >= 1 && C >= H && C % H == 0 && C / H <= kHamMaxD && nbits >= 1 &&
        nbits <= kHamMaxBits && m >= 1 && m <= kHamMaxM))
    return false;
  // The largest case (N 256, d 64, 64 bits) needs about 171 KB; sm_80 and later offer 163-227 KB.
  HamParams p{};
  p.N = N, p.d = C / H, p.nbits = nbits, p.m = m, p.ldq = (p.d + 31) / 32 * 32 + 4, p.nwords = (N + 31) / 32;
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
  p.nwords = (N + 31) / 32;
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
