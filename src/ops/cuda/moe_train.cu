// Shift and MoE(mult, shift) linears for training, float32: the kernels around the products (moe_train.h).
// Specs: ops/cpu/shift_linear.{h,cpp} and ops/cpu/moe.{h,cpp}; E = 2 experts throughout.
//
// Launch configurations:
//  shift_decode_f32 /        grid-stride elementwise, 256-thread blocks (at most 16 blocks per SM), int64
//  shift_weight_backward_f32 indices. The rounding is the CPU's branch-free round_exponent / round_sign
//                            replicated operation by operation (clamp to [pmin-1, pmax+1], truncate, fix up
//                            the half-even ties), 2^p built from its exponent bits: bit-exact. The dp/ds
//                            updates use __fmul_rn / __fadd_rn, so nvcc cannot contract them into FMAs and
//                            they round exactly as the CPU's plain float expressions.
//  moe_train_route           one thread per row, 256-thread blocks: logits = rl + br, noisy = logits + noise,
//                            the CPU's float softmax_argmax_row (expf, the accurate one, not __expf).
//  moe_train_combine /       one warp per row, 8 rows per 256-thread block; lanes stride over the columns.
//  moe_train_split_backward  dscale is summed IN ORDER over j (as a plain C loop): each 32-column chunk's
//                            products are broadcast lane by lane with shuffles and every lane adds them in
//                            order, so the result is the host's sequential float sum, bit for bit.
//  moe_lb_forward            two passes. 1: blocks of 256 threads over chunks of kLbChunk = 1024 rows, each
//                            thread sums its rows (t = chunk + tid + 256 k) in double, then a fixed shared-
//                            memory tree per block -> 4 doubles per block in ws. 2: one thread adds the block
//                            partials in block order, computes L = CV2(alpha Imp) + CV2(alpha Load) in
//                            double as cpu::cv2, writes stats (f32) and aux = coef * (float)L (f32, as
//                            LinearLayer: opt.lb_coef * moe_lb_loss_forward(...)).
//  moe_train_router_backward one thread per row, 256-thread blocks. Every thread recomputes the (tiny) CV2
//                            gradients from stats in double. The float additions follow the CPU chain
//                            moe_gate_backward -> moe_lb_loss_backward(_ref) -> moe_router_backward:
//                            dprobs = 0 + gate term, += (float)(gi * alpha * coef); dlogits = 0 + the load
//                            terms in the CPU's (e, then k) order; then the float softmax backward of
//                            cpu::moe_router_backward (dot = 0 + p0 dp0 + p1 dp1; dl += p (dp - dot)).
//
// Choice values: the kernels read choice != 0 as expert 1 (moe_train_route only writes 0 or 1); the hard
// load of moe_lb_forward counts choice == 0 and choice == 1 (the CPU throws on anything else, a kernel cannot).
// M = 0: nothing is launched, except that moe_lb_forward sets stats and aux to 0 (the CPU's values for no
// tokens: Importance = Load = 0, L = 0) with cudaMemsetAsync when they are given.
#include <algorithm>
#include <cmath>

#include "ops/cuda/moe_train.h"
#include "ops/cpu/moe_cv2.h"

namespace sav::cuda {

namespace {

constexpr double kLn2 = 0.69314718055994530942;  // as ops/cpu/shift_linear.cpp
constexpr int kEwThreads = 256;
constexpr int kRowThreads = 256;
constexpr int kWarpRows = 8;  // rows (warps) per block of the row-per-warp kernels
constexpr int kLbThreads = 256;
constexpr int kLbRowsPerThread = 4;
constexpr int kLbChunk = kLbThreads * kLbRowsPerThread;

int ew_blocks(int64_t n) {
  const int64_t want = (n + kEwThreads - 1) / kEwThreads;
  return int(std::max<int64_t>(1, std::min<int64_t>(want, int64_t(sm_count()) * 16)));
}

void check_shift_range(const char* op, int pmin, int pmax) {
  SAV_CHECK(pmin <= pmax, op << ": exponent range needs pmin <= pmax, got [" << pmin << ", " << pmax << "]");
  SAV_CHECK(pmin >= -100 && pmax <= 100,
            op << ": exponent range [" << pmin << ", " << pmax << "] is outside [-100, 100]");
}

void check_gate(const char* op, sav::cpu::MoeGateMode gate) {
  SAV_CHECK(gate == sav::cpu::moe_gate_prob || gate == sav::cpu::moe_gate_straight_through,
            op << ": unknown gate mode " << int(gate));
}

// ---- shift weights ----

// cpu round_exponent, operation by operation: clamp to [pmin-1, pmax+1] (std::max(lo, p) = lo < p ? p : lo,
// so NaN -> lo), truncate, round half to even by the exact fractional part, clamp to [pmin, pmax].
__device__ __forceinline__ int round_exponent_dev(float p, int pmin, int pmax) {
  const float lo = float(pmin - 1), hi = float(pmax + 1);
  const float m = (lo < p) ? p : lo;
  const float v = (hi < m) ? hi : m;
  const int q = __float2int_rz(v);
  const float d = __fsub_rn(v, float(q));  // exact
  const int odd = q & 1;
  const int up = int(d > 0.5f) | (int(d == 0.5f) & odd);
  const int down = int(d < -0.5f) | (int(d == -0.5f) & odd);
  const int r = q + up - down;
  return r < pmin ? pmin : (r > pmax ? pmax : r);
}

// +1 for s > 0.5, -1 for s < -0.5, else 0 (NaN -> 0), as cpu round_sign.
__device__ __forceinline__ int round_sign_dev(float s) { return int(s > 0.5f) - int(s < -0.5f); }

// 2^e, exact, for e in [-126, 127].
__device__ __forceinline__ float pow2_dev(int e) { return __uint_as_float(uint32_t(e + 127) << 23); }

__global__ void __launch_bounds__(kEwThreads)
    shift_decode_kernel(float* W, const float* p, const float* s, int64_t n, int pmin, int pmax) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int sg = round_sign_dev(s[i]);
    const uint32_t mag = uint32_t(round_exponent_dev(p[i], pmin, pmax) + 127) << 23;
    const uint32_t bits = (sg != 0 ? mag : 0u) | (sg < 0 ? 0x80000000u : 0u);
    W[i] = __uint_as_float(bits);
  }
}

__global__ void __launch_bounds__(kEwThreads)
    shift_weight_backward_kernel(float* dp, float* ds, const float* dW, const float* p, const float* s, int64_t n,
                                 int pmin, int pmax, float ln2) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float pw = pow2_dev(round_exponent_dev(p[i], pmin, pmax));
    const float g = dW[i];
    // CPU: dp[i] += dW[i] * (static_cast<float>(round_sign(s[i])) * pw * ln2);  ds[i] += dW[i] * pw;
    if (dp) dp[i] = __fadd_rn(dp[i], __fmul_rn(g, __fmul_rn(__fmul_rn(float(round_sign_dev(s[i])), pw), ln2)));
    if (ds) ds[i] = __fadd_rn(ds[i], __fmul_rn(g, pw));
  }
}

// ---- routing ----

__global__ void __launch_bounds__(kRowThreads)
    route_kernel(float* logits, float* noisy, float* probs, int* choice, float* scale, const float* rl, const float* br,
                 const float* noise, int M, bool prob_gate) {
  const int t = blockIdx.x * kRowThreads + threadIdx.x;
  if (t >= M) return;
  const int64_t i = int64_t(t) * 2;
  const float l0 = __fadd_rn(rl[i], br[0]), l1 = __fadd_rn(rl[i + 1], br[1]);
  const float z0 = noise ? __fadd_rn(l0, noise[i]) : l0;
  const float z1 = noise ? __fadd_rn(l1, noise[i + 1]) : l1;
  // cpu softmax_argmax_row with E = 2
  const int best = (z1 > z0) ? 1 : 0;  // ties (and NaN) -> 0
  const float mx = best ? z1 : z0;
  const float e0 = expf(__fsub_rn(z0, mx)), e1 = expf(__fsub_rn(z1, mx));
  const float sum = __fadd_rn(__fadd_rn(0.0f, e0), e1);
  const float inv = __fdiv_rn(1.0f, sum);
  const float p0 = __fmul_rn(e0, inv), p1 = __fmul_rn(e1, inv);
  logits[i] = l0;
  logits[i + 1] = l1;
  noisy[i] = z0;
  noisy[i + 1] = z1;
  probs[i] = p0;
  probs[i + 1] = p1;
  choice[t] = best;
  scale[t] = prob_gate ? (best ? p1 : p0) : 1.0f;
}

__global__ void __launch_bounds__(kWarpRows * 32)
    combine_kernel(float* y, int ldy, const float* y0, const float* y1, const int* choice, const float* scale, int M,
                   int F, bool accumulate) {
  const int t = blockIdx.x * kWarpRows + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (t >= M) return;
  const float sc = scale[t];
  const float* src = (choice[t] != 0 ? y1 : y0) + int64_t(t) * F;
  float* dst = y + int64_t(t) * ldy;
  for (int j = lane; j < F; j += 32) {
    const float v = __fmul_rn(sc, src[j]);
    dst[j] = accumulate ? __fadd_rn(dst[j], v) : v;
  }
}

// ---- load-balancing loss ----

__device__ __forceinline__ double normal_cdf_dev(double u) { return 0.5 * erfc(-u * 0.70710678118654752440); }
__device__ __forceinline__ double normal_pdf_dev(double u) { return 0.39894228040143267794 * exp(-0.5 * u * u); }

// Pass 1: ws[4 b + {0,1,2,3}] = sums over chunk b of {probs[t,0], probs[t,1], P_t0, P_t1} (double).
__global__ void __launch_bounds__(kLbThreads)
    lb_partial_kernel(double* ws, const float* probs, const float* logits, const float* noisy, const int* choice, int M,
                      float noise_std) {
  __shared__ double sh[4][kLbThreads];
  const int tid = threadIdx.x;
  const int64_t base = int64_t(blockIdx.x) * kLbChunk;
  const bool smooth = noise_std > 0.0f;
  const double sd = noise_std;
  double a0 = 0.0, a1 = 0.0, b0 = 0.0, b1 = 0.0;
  for (int k = 0; k < kLbRowsPerThread; ++k) {
    const int64_t t = base + tid + int64_t(k) * kLbThreads;
    if (t >= M) break;
    a0 += probs[2 * t];
    a1 += probs[2 * t + 1];
    if (smooth) {
      // P_te = Phi((logits_te - noisy_t,other) / noise_std)
      b0 += normal_cdf_dev((static_cast<double>(logits[2 * t]) - noisy[2 * t + 1]) / sd);
      b1 += normal_cdf_dev((static_cast<double>(logits[2 * t + 1]) - noisy[2 * t]) / sd);
    } else {
      const int c = choice[t];
      b0 += (c == 0) ? 1.0 : 0.0;
      b1 += (c == 1) ? 1.0 : 0.0;
    }
  }
  sh[0][tid] = a0;
  sh[1][tid] = a1;
  sh[2][tid] = b0;
  sh[3][tid] = b1;
  __syncthreads();
  for (int s = kLbThreads / 2; s > 0; s >>= 1) {
    if (tid < s)
      for (int q = 0; q < 4; ++q) sh[q][tid] += sh[q][tid + s];
    __syncthreads();
  }
  if (tid < 4) ws[4 * int64_t(blockIdx.x) + tid] = sh[tid][0];
}

// Pass 2 (one thread): the block partials in order, then the loss.
__global__ void lb_final_kernel(float* stats, float* aux, const double* ws, int nblocks, float alpha0, float alpha1,
                                float coef) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double tot[4] = {0.0, 0.0, 0.0, 0.0};
  for (int b = 0; b < nblocks; ++b)
    for (int q = 0; q < 4; ++q) tot[q] += ws[4 * int64_t(b) + q];
  for (int q = 0; q < 4; ++q) stats[q] = static_cast<float>(tot[q]);
  const double a0 = alpha0, a1 = alpha1;
  double z[2] = {tot[0] * a0, tot[1] * a1};
  double L = sav::cpu::moe_cv2(z, 2, nullptr);
  z[0] = tot[2] * a0;
  z[1] = tot[3] * a1;
  L += sav::cpu::moe_cv2(z, 2, nullptr);
  aux[0] = __fmul_rn(coef, static_cast<float>(L));
}

// ---- backward ----

__global__ void __launch_bounds__(kWarpRows * 32)
    split_backward_kernel(float* dy0, float* dy1, float* dscale, const float* dy, int lddy, const float* y0,
                          const float* y1, const int* choice, const float* scale, int M, int F) {
  const int t = blockIdx.x * kWarpRows + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (t >= M) return;  // whole warps exit together (t is uniform across a warp)
  const bool one = choice[t] != 0;
  const float sc = scale[t];
  const float* d = dy + int64_t(t) * lddy;
  const float* yc = (one ? y1 : y0) + int64_t(t) * F;
  float* o0 = dy0 + int64_t(t) * F;
  float* o1 = dy1 + int64_t(t) * F;
  float acc = 0.0f;
  for (int j0 = 0; j0 < F; j0 += 32) {
    const int j = j0 + lane;
    float prod = 0.0f;
    if (j < F) {
      const float dv = d[j];
      // 0 + s dy: the CPU accumulates into a zeroed buffer (the same value, also for the sign of a zero)
      const float g = __fadd_rn(0.0f, __fmul_rn(sc, dv));
      o0[j] = one ? 0.0f : g;
      o1[j] = one ? g : 0.0f;
      prod = __fmul_rn(dv, yc[j]);
    }
    if (j0 + 32 <= F) {
      // a full chunk: unrolled, so the shuffles (independent of acc) overlap the chain of adds
#pragma unroll
      for (int k = 0; k < 32; ++k) acc = __fadd_rn(acc, __shfl_sync(0xffffffffu, prod, k));
    } else {
      for (int k = 0; k < F - j0; ++k) acc = __fadd_rn(acc, __shfl_sync(0xffffffffu, prod, k));
    }
  }
  if (lane == 0) dscale[t] = acc;
}

__global__ void __launch_bounds__(kRowThreads)
    router_backward_kernel(float* dlogits, const float* dscale, const float* probs, const float* logits,
                           const float* noisy, const int* choice, const float* stats, float alpha0, float alpha1, int M,
                           float noise_std, float coef, bool prob_gate) {
  const int t = blockIdx.x * kRowThreads + threadIdx.x;
  if (t >= M) return;
  const int64_t i = int64_t(t) * 2;
  const float p0 = probs[i], p1 = probs[i + 1];
  const bool one = choice[t] != 0;
  // cpu::moe_gate_backward into a zeroed dprobs
  const float ds = dscale[t];
  const float gterm = prob_gate ? ds : __fdiv_rn(ds, one ? p1 : p0);
  float dp0 = 0.0f, dp1 = 0.0f;
  if (one)
    dp1 = __fadd_rn(dp1, gterm);
  else
    dp0 = __fadd_rn(dp0, gterm);
  float dl0 = 0.0f, dl1 = 0.0f;
  if (coef != 0.0f) {
    const bool smooth = noise_std > 0.0f;
    const double a[2] = {static_cast<double>(alpha0), static_cast<double>(alpha1)};
    const double dloss = coef;
    double z[2], gi[2], gl[2] = {0.0, 0.0};
    z[0] = static_cast<double>(stats[0]) * a[0];
    z[1] = static_cast<double>(stats[1]) * a[1];
    sav::cpu::moe_cv2(z, 2, gi);
    if (smooth) {
      z[0] = static_cast<double>(stats[2]) * a[0];
      z[1] = static_cast<double>(stats[3]) * a[1];
      sav::cpu::moe_cv2(z, 2, gl);
    }
    for (int e = 0; e < 2; ++e) {  // as moe_lb_loss_backward_ref: g *= a * dloss
      gi[e] *= a[e] * dloss;
      gl[e] *= a[e] * dloss;
    }
    dp0 = __fadd_rn(dp0, static_cast<float>(gi[0]));
    dp1 = __fadd_rn(dp1, static_cast<float>(gi[1]));
    if (smooth) {
      const double sd = noise_std;
      const float l0 = logits[i], l1 = logits[i + 1], z0 = noisy[i], z1 = noisy[i + 1];
      const double u0 = (static_cast<double>(l0) - static_cast<double>(z1)) / sd;
      const double u1 = (static_cast<double>(l1) - static_cast<double>(z0)) / sd;
      const float d0 = static_cast<float>(gl[0] * normal_pdf_dev(u0) / sd);
      const float d1 = static_cast<float>(gl[1] * normal_pdf_dev(u1) / sd);
      // the CPU's order: e = 0 (dl0 += d0, dl1 -= d0), then e = 1 (dl1 += d1, dl0 -= d1)
      dl0 = __fadd_rn(dl0, d0);
      dl1 = __fsub_rn(dl1, d0);
      dl1 = __fadd_rn(dl1, d1);
      dl0 = __fsub_rn(dl0, d1);
    }
  }
  // cpu::moe_router_backward: dot = sum_e p_e dp_e (float, in order); dl_e += p_e (dp_e - dot)
  float dot = 0.0f;
  dot = __fadd_rn(dot, __fmul_rn(p0, dp0));
  dot = __fadd_rn(dot, __fmul_rn(p1, dp1));
  dl0 = __fadd_rn(dl0, __fmul_rn(p0, __fsub_rn(dp0, dot)));
  dl1 = __fadd_rn(dl1, __fmul_rn(p1, __fsub_rn(dp1, dot)));
  dlogits[i] = dl0;
  dlogits[i + 1] = dl1;
}

}  // namespace

// =========================================================================================================

void shift_decode_f32(float* W, const float* p, const float* s, int64_t n, int pmin, int pmax, cudaStream_t stream) {
  SAV_CHECK(n >= 0, "shift_decode_f32: n (weights) must be non-negative, got " << n);
  check_shift_range("shift_decode_f32", pmin, pmax);
  if (n == 0) return;
  SAV_CHECK(W && p && s, "shift_decode_f32: W, p and s must be given");
  shift_decode_kernel<<<ew_blocks(n), kEwThreads, 0, stream>>>(W, p, s, n, pmin, pmax);
  SAV_CUDA_CHECK_LAUNCH();
}

void shift_weight_backward_f32(float* dp, float* ds, const float* dW, const float* p, const float* s, int64_t n,
                               int pmin, int pmax, cudaStream_t stream) {
  SAV_CHECK(n >= 0, "shift_weight_backward_f32: n (weights) must be non-negative, got " << n);
  check_shift_range("shift_weight_backward_f32", pmin, pmax);
  if (n == 0 || (!dp && !ds)) return;
  SAV_CHECK(dW && p, "shift_weight_backward_f32: dW and p must be given");
  SAV_CHECK(s || !dp, "shift_weight_backward_f32: dp needs s");
  const float ln2 = static_cast<float>(kLn2);  // the CPU's float ln 2
  shift_weight_backward_kernel<<<ew_blocks(n), kEwThreads, 0, stream>>>(dp, ds, dW, p, s, n, pmin, pmax, ln2);
  SAV_CUDA_CHECK_LAUNCH();
}

void moe_train_route(float* logits, float* noisy, float* probs, int* choice, float* scale, const float* rl,
                     const float* br, const float* noise, int M, sav::cpu::MoeGateMode gate, cudaStream_t stream) {
  SAV_CHECK(M >= 0, "moe_train_route: M (rows) must be non-negative, got " << M);
  check_gate("moe_train_route", gate);
  if (M == 0) return;
  SAV_CHECK(logits && noisy && probs && choice && scale && rl && br,
            "moe_train_route: logits, noisy, probs, choice, scale, rl and br must be given (noise may be nullptr)");
  const int blocks = (M + kRowThreads - 1) / kRowThreads;
  route_kernel<<<blocks, kRowThreads, 0, stream>>>(logits, noisy, probs, choice, scale, rl, br, noise, M,
                                                   gate == sav::cpu::moe_gate_prob);
  SAV_CUDA_CHECK_LAUNCH();
}

void moe_train_combine(float* y, int ldy, const float* y0, const float* y1, const int* choice, const float* scale,
                       int M, int F, bool accumulate, cudaStream_t stream) {
  SAV_CHECK(M >= 0 && F >= 1 && ldy >= F, "moe_train_combine: bad sizes M=" << M << " F=" << F << " ldy=" << ldy
                                                                            << " (need M >= 0, F >= 1, ldy >= F)");
  if (M == 0) return;
  SAV_CHECK(y && y0 && y1 && choice && scale, "moe_train_combine: y, y0, y1, choice and scale must be given");
  const int blocks = (M + kWarpRows - 1) / kWarpRows;
  combine_kernel<<<blocks, kWarpRows * 32, 0, stream>>>(y, ldy, y0, y1, choice, scale, M, F, accumulate);
  SAV_CUDA_CHECK_LAUNCH();
}

size_t moe_lb_workspace_doubles(int M) {
  SAV_CHECK(M >= 0, "moe_lb_workspace_doubles: M (rows) must be non-negative, got " << M);
  return size_t(4) * size_t((int64_t(M) + kLbChunk - 1) / kLbChunk);
}

void moe_lb_forward(float* stats, float* aux, const float* probs, const float* logits, const float* noisy,
                    const int* choice, float alpha0, float alpha1, int M, float noise_std, float coef, double* ws,
                    cudaStream_t stream) {
  SAV_CHECK(M >= 0, "moe_lb_forward: M (rows) must be non-negative, got " << M);
  SAV_CHECK(std::isfinite(noise_std), "moe_lb_forward: noise_std must be finite, got " << noise_std);
  if (M == 0) {  // no tokens: Importance = Load = 0 and L = 0, as the CPU (no kernel launched)
    if (stats) SAV_CUDA_CHECK(cudaMemsetAsync(stats, 0, 4 * sizeof(float), stream));
    if (aux) SAV_CUDA_CHECK(cudaMemsetAsync(aux, 0, sizeof(float), stream));
    return;
  }
  SAV_CHECK(stats && aux && probs && ws, "moe_lb_forward: stats, aux, probs and ws must be given");
  if (noise_std > 0.0f)
    SAV_CHECK(logits && noisy, "moe_lb_forward: the smooth load (noise_std > 0) needs the clean and noisy logits");
  else
    SAV_CHECK(choice, "moe_lb_forward: the hard load (noise_std <= 0) needs the choices");
  const int nblocks = int((int64_t(M) + kLbChunk - 1) / kLbChunk);
  lb_partial_kernel<<<nblocks, kLbThreads, 0, stream>>>(ws, probs, logits, noisy, choice, M, noise_std);
  SAV_CUDA_CHECK_LAUNCH();
  lb_final_kernel<<<1, 1, 0, stream>>>(stats, aux, ws, nblocks, alpha0, alpha1, coef);
  SAV_CUDA_CHECK_LAUNCH();
}

void moe_train_split_backward(float* dy0, float* dy1, float* dscale, const float* dy, int lddy, const float* y0,
                              const float* y1, const int* choice, const float* scale, int M, int F,
                              cudaStream_t stream) {
  SAV_CHECK(M >= 0 && F >= 1 && lddy >= F,
            "moe_train_split_backward: bad sizes M=" << M << " F=" << F << " lddy=" << lddy
                                                     << " (need M >= 0, F >= 1, lddy >= F)");
  if (M == 0) return;
  SAV_CHECK(dy0 && dy1 && dscale && dy && y0 && y1 && choice && scale,
            "moe_train_split_backward: dy0, dy1, dscale, dy, y0, y1, choice and scale must be given");
  const int blocks = (M + kWarpRows - 1) / kWarpRows;
  split_backward_kernel<<<blocks, kWarpRows * 32, 0, stream>>>(dy0, dy1, dscale, dy, lddy, y0, y1, choice, scale, M, F);
  SAV_CUDA_CHECK_LAUNCH();
}

void moe_train_router_backward(float* dlogits, const float* dscale, const float* probs, const float* logits,
                               const float* noisy, const int* choice, const float* stats, float alpha0, float alpha1,
                               int M, float noise_std, float coef, sav::cpu::MoeGateMode gate, cudaStream_t stream) {
  SAV_CHECK(M >= 0, "moe_train_router_backward: M (rows) must be non-negative, got " << M);
  check_gate("moe_train_router_backward", gate);
  SAV_CHECK(std::isfinite(noise_std), "moe_train_router_backward: noise_std must be finite, got " << noise_std);
  SAV_CHECK(std::isfinite(coef), "moe_train_router_backward: coef must be finite, got " << coef);
  if (M == 0) return;
  SAV_CHECK(dlogits && dscale && probs && choice,
            "moe_train_router_backward: dlogits, dscale, probs and choice must be given");
  if (coef != 0.0f) {
    SAV_CHECK(stats, "moe_train_router_backward: the load-balancing terms (coef != 0) need stats from moe_lb_forward");
    if (noise_std > 0.0f)
      SAV_CHECK(logits && noisy,
                "moe_train_router_backward: the smooth load term (noise_std > 0) needs the clean and noisy logits");
  }
  const int blocks = (M + kRowThreads - 1) / kRowThreads;
  router_backward_kernel<<<blocks, kRowThreads, 0, stream>>>(dlogits, dscale, probs, logits, noisy, choice, stats,
                                                             alpha0, alpha1, M, noise_std, coef,
                                                             gate == sav::cpu::moe_gate_prob);
  SAV_CUDA_CHECK_LAUNCH();
}

}  // namespace sav::cuda
