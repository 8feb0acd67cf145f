// Shift linear layers on the GPU: the MatShift integer kernel (CUDA cores), the packed-code tensor-core kernel
// (decode-to-matrix-unit) and the per-shape chooser. API, device forms and numerics: shift_gpu.h.
//
// Legend: M rows, K in-features, F out-features; BM x BN the CTA tile of outputs, S the CTAs of a cluster that
// split K (S = 1: no cluster). Fp = F rounded up to 128, Kp = K rounded up to the k-tile.
//
// ---- Int kernel (shift_int_kernel) ----
// Identity used so that the inner loop is one xor, one shift and half an add per term (no multiply, no
// branch, zero weights included). With u = x_int + 2^31 (mod 2^32: u = x_int ^ 0x80000000, in [0, 2^32)) and
// logical shifts (">>u", amounts clamped at 32: u >>u 32 = 0):
//   x_int >> n      = (u >>u n) - 2^(31-n)                    (floor((u - 2^31) / 2^n), 2^n divides 2^31)
//   -(x_int >> n)   = (~u >>u n) + 1 - 2^(31-n)                (~u >>u n = 2^(32-n) - 1 - (u >>u n))
//   0 (zero weight) = (u >>u 32)
// so out[i,j] = col_add[j] + sum_k ((u[i,k] ^ neg[j,k]) >>u n[j,k])  (mod 2^32), with neg = 0 or ~0, n = -p (32
// for a zero weight) and col_add[j] = sum over the column's nonzero weights of -2^(31-n) (+1 when negative),
// computed once on the host. All arithmetic is modulo 2^32; when the row passes the CPU's check
// (sum_k |x_int| <= 2^31 - 1) the true sum lies in int32, so the wrapped uint32 read as int32 is exact.
// Tiling: a CTA owns BM x BN outputs; 8 x 8 per thread (threads BM*BN/64), k-tiles of 32 inputs, two stages:
//   x tile: global -> registers (16-byte loads, prefetched one tile ahead) -> fixed point (round half to even,
//           range and finiteness checked as cpu::to_fixed, |x_int| summed per row in int64) -> u, stored
//           transposed Us[k][m] (row stride BM + 4 words: 16-byte aligned rows for the 128-bit reads);
//   codes tile: cp.async 16 B, Ws[k][n] (one byte per weight, the int form's layout).
//   Inner loop per k: 8 u (two 128-bit smem loads, shared by the 8 outputs of a row), 8 code bytes (one 64-bit
//   load, shared by the 8 rows); per (row, output): xor, funnel shift, and an IADD3 for two k at once.
// Plans: 128 x 128 (256 threads) when that gives at least one CTA per SM; else 64 x 64 (64 threads) with K
// split over a cluster of S = 1, 2, 4, 8 CTAs (sm_90; each keeps >= 1 k-tile) until there is one CTA per SM.
// Epilogue: the 8 x 8 accumulators and the per-row partial L1 norms go to shared memory; after the cluster
// barrier, rank r finishes rows [r BM/S, (r+1) BM/S) of the tile, adding the S partials in rank order through
// distributed shared memory (integer sums: any order gives the same bits), then col_add, the row check
// (non-finite, |x 2^f| >= 2^31 or L1 > 2^31 - 1 -> NaN row + atomicMin of the row into status), the CPU's
// float(acc) * 2^-f + b with explicit _rn operations (no FMA contraction), and coalesced stores.
//
// ---- Packed-mma kernel (shift_mma_kernel) ----
// k-blocks of 64 inputs = one 40-byte code record per output row (layout in shift_gpu.h), 3-stage cp.async
// pipeline: the x tile (BM x 64 bf16, zero-filled outside M x K, row stride 72 elements = 144 bytes, which makes
// the 8 row addresses of an ldmatrix phase fall in distinct bank groups) and the BN records (one contiguous,
// 16-byte aligned block in global memory). Warps WM x WN, warp tile (BM/WM) x (BN/WN): MI m16 tiles x NI n8
// tiles. Per k-block a lane loads its two nibble words and its sign word per n8 tile (its column g = lane/4 of
// the tile, lane-in-quad t = lane%4 selects the words), then per k16 step decodes its two B registers (2 bf16
// each) with shifts, masks and one bf16x2 multiply, loads A with ldmatrix.x4 and issues MI x NI mma.sync.
// Plans: 128 x 128, 8 warps of 64 x 32, when that gives one CTA per SM; else 64 x 64, 4 warps of 32 x 32, with
// the cluster split over K as above (>= 2 k-blocks per CTA; f32 partials added in rank order: deterministic).
// Epilogue: accumulators -> shared memory (row stride BN + 8 floats: the float2 stores of a half-warp hit
// distinct banks) -> the rank's rows, partial sums added in rank order, + bias, optional GELU (tanh form),
// optional residual add (f32 y += v), f32 or bf16 stores into rows of stride ldy (ShiftEpilogue).
//
// ---- Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16; g = lane >> 2, t = lane & 3) ----
//   A (16 x 16, row): a0 (row g, cols 2t, 2t+1), a1 (row g+8, cols 2t, 2t+1), a2 (row g, cols 2t+8, 2t+9),
//     a3 (row g+8, cols 2t+8, 2t+9); lower column in the lower 16 bits. ldmatrix.x4: lane l gives the row address
//     of matrix l/8, row l%8; register i receives matrix i, lane l holding row l/4, elements 2(l%4), +1. With
//     lane l pointing at tile row (l & 15), column 8 (l >> 4): matrix 0 = rows 0-7 / cols 0-7 -> a0, matrix 1 =
//     rows 8-15 / cols 0-7 -> a1, matrix 2 = rows 0-7 / cols 8-15 -> a2, matrix 3 = rows 8-15 / cols 8-15 -> a3.
//   B (16 x 8, col): b0 (rows k = 2t, 2t+1 of column n = g), b1 (rows 2t+8, 2t+9, column g); lower k in the lower
//     16 bits. B[k][n] = W[n][k] (y = x W^T), so lane (g, t) needs weights W[n0 + g][k0 + 16 st + 8 b + 2 t + e],
//     which the record layout stores as: nibble word 2t + st/2, nibbles q = 2 (st % 2) + b (e = 0) and q + 4
//     (e = 1); sign word 8 + t/2, bits 8 (t%2) + P and 16 + 8 (t%2) + P with P = 4 (st/2) + q.
//     Decoding pair q: (word << (7 - 4q)) (a right shift for q >= 2) & 0x07800780 puts nibble q at bits 7..10
//     and nibble q + 4 at bits 23..26; (sign_word << (15 - 8 (t%2) - P)) & 0x80008000 puts the two signs at bits
//     15 and 31; the or is the bf16 pair +-2^(d - 127) (d = 0 gives +0), times 2^(126 + pmin) = +-2^p.
//   C (16 x 8, f32): c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, cols 2t, 2t+1).
// These index formulas were checked on the host by emulating the kernels' index arithmetic (pack -> per-lane
// decode -> per-fragment product) against a plain product, for all lanes, steps and records.
#include <cooperative_groups.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "core/error.h"
#include "ops/cuda/gelu.cuh"
#include "ops/cuda/gemm.h"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/ptx.cuh"
#include "ops/cuda/shift_gpu.h"

namespace sav::cuda {

namespace {

namespace cg = cooperative_groups;
using namespace ptx;

constexpr int kIntBK = 32;     // inputs per k-tile of the int kernel
constexpr int kMmaBK = 64;     // inputs per k-block of the mma kernel (one code record)
constexpr int kRecWords = 10;  // 64 codes x 5 bits = 40 bytes
constexpr int kFPad = 128;     // F padding of both forms (the largest BN)
constexpr int kMaxSplits = 8;  // portable cluster size
constexpr int kMmaStages = 3;
constexpr uint8_t kZeroCode = 32;                  // int form: shift 32 -> 0
constexpr unsigned long long kL1Sat = 1ull << 32;  // row L1 sums saturate here (any value > 2^31 - 1 is bad)
constexpr int kMaxKF = 1 << 20;
constexpr unsigned kStatusNone = 0xFFFFFFFFu;

inline int round_up(int x, int a) { return (x + a - 1) / a * a; }
inline int cdiv(int x, int a) { return (x + a - 1) / a; }

// ---------------------------------------------------------------------------------------------------------
// Plans.

template <int BM, int BN>
struct IntTile {
  static constexpr int kThreads = BM * BN / 64;  // 8 x 8 outputs per thread
  static constexpr int kLdU = BM + 4;            // x tile row stride (words)
  static constexpr int kLdAcc = BN + 4;          // epilogue tile row stride (words)
  static constexpr size_t kUBytes = size_t(kIntBK) * kLdU * 4;
  static constexpr size_t kWBytes = size_t(kIntBK) * BN;
  static constexpr size_t kPipeBytes = 2 * (kUBytes + kWBytes);
  static constexpr size_t kAccBytes = size_t(BM) * kLdAcc * 4;
  static constexpr size_t kMainBytes = kPipeBytes > kAccBytes ? kPipeBytes : kAccBytes;
  static constexpr size_t kSmemBytes = kMainBytes + size_t(BM) * 8;  // + per-row L1 partials
  static_assert(kUBytes % 16 == 0 && kMainBytes % 16 == 0, "16-byte aligned smem regions");
};

template <int BM, int BN, int WM, int WN>
struct MmaTile {
  static constexpr int kThreads = 32 * WM * WN;
  static constexpr int kTMW = BM / WM, kTNW = BN / WN;  // warp tile
  static constexpr int kMI = kTMW / 16, kNI = kTNW / 8;
  static constexpr int kLdA = kMmaBK + 8;  // bf16 elements per smem row of the x tile
  static constexpr int kLdC = BN + 8;      // floats per smem row of the epilogue tile
  static constexpr size_t kABytes = size_t(BM) * kLdA * 2;
  static constexpr size_t kBBytes = size_t(BN) * kRecWords * 4;
  static constexpr size_t kStageBytes = kABytes + kBBytes;
  static constexpr size_t kPipeBytes = kMmaStages * kStageBytes;
  static constexpr size_t kAccBytes = size_t(BM) * kLdC * 4;
  static constexpr size_t kSmemBytes = kPipeBytes > kAccBytes ? kPipeBytes : kAccBytes;
  static_assert(kTMW % 16 == 0 && kTNW % 8 == 0, "warp tile of whole mma tiles");
  static_assert(kABytes % 16 == 0 && kBBytes % 16 == 0, "16-byte aligned stages");
};

using IntBig = IntTile<128, 128>;
using IntSmall = IntTile<64, 64>;
using MmaBig = MmaTile<128, 128, 2, 4>;
using MmaSmall = MmaTile<64, 64, 2, 2>;

bool clusters_supported() { return device_cc_major() >= 9; }

// Big tiles when they alone give a CTA per SM; else small tiles, with K split over a cluster (at least
// min_tiles k-tiles per CTA) until they do.
ShiftKernelPlan make_plan(int M, int F, int k_tiles, int min_tiles, int big_m, int big_n, int small_m, int small_n) {
  const int64_t sms = sm_count();
  const int64_t big = int64_t(cdiv(M, big_m)) * cdiv(F, big_n);
  if (big >= sms) return ShiftKernelPlan{big_m, big_n, 1};
  const int64_t small = int64_t(cdiv(M, small_m)) * cdiv(F, small_n);
  int S = 1;
  if (clusters_supported())
    while (S < kMaxSplits && small * S < sms && min_tiles * (2 * S) <= k_tiles) S *= 2;
  return ShiftKernelPlan{small_m, small_n, S};
}

void check_shape(const char* op, int M, int K, int F) {
  SAV_CHECK(M >= 0 && M <= shift_gpu_max_rows,
            op << ": M (rows) must be in [0, " << shift_gpu_max_rows << "], got " << M);
  SAV_CHECK(K > 0 && K <= kMaxKF, op << ": K (in-features) must be in [1, " << kMaxKF << "], got " << K);
  SAV_CHECK(F > 0 && F <= kMaxKF, op << ": F (out-features) must be in [1, " << kMaxKF << "], got " << F);
}

// y (bytes ny) and x (bytes nx) must not overlap.
void check_no_alias(const char* op, const void* y, size_t ny, const void* x, size_t nx) {
  const auto a = reinterpret_cast<uintptr_t>(y), b = reinterpret_cast<uintptr_t>(x);
  SAV_CHECK(a + ny <= b || b + nx <= a, op << ": the output y overlaps the input x; use separate buffers");
}

// ---------------------------------------------------------------------------------------------------------
// Device helpers.

// Two bf16 products a * b (per 16-bit half), as fma(a, b, -0): exact here (powers of two in range).
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}

// Rank of this CTA in its K-split cluster (0 without a cluster), the barrier over the cluster (or the CTA), and
// a peer's copy of a shared-memory address.
__device__ __forceinline__ int split_rank(int S) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (S > 1) return static_cast<int>(cg::this_cluster().block_rank());
#endif
  return 0;
}
__device__ __forceinline__ void split_sync(int S) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (S > 1) {
    cg::this_cluster().sync();
    return;
  }
#endif
  __syncthreads();
}
template <class T>
__device__ __forceinline__ T* split_peer(T* p, int q, int S) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (S > 1) return cg::this_cluster().map_shared_rank(p, q);
#endif
  return p;
}

// Element e of a 16-byte chunk of x as f32 (4 floats or 8 bf16; little-endian: lower address = lower bits).
template <class XT>
__device__ __forceinline__ float chunk_elem(const uint32_t (&w)[4], int e) {
  if constexpr (sizeof(XT) == 4) {
    return __uint_as_float(w[e]);
  } else {
    return __uint_as_float((e & 1) ? (w[e >> 1] & 0xFFFF0000u) : (w[e >> 1] << 16));
  }
}
__device__ __forceinline__ uint32_t elem_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t elem_bits(bf16 v) { return __bfloat16_as_ushort(v); }

// 16 bytes of row `row` of x (K elements) from element k: vector load, or element loads with zeros past K.
template <class XT>
__device__ __forceinline__ uint4 load_chunk(const XT* x, int64_t row, int k, int K, bool vec) {
  constexpr int CH = 16 / int(sizeof(XT));
  const XT* src = x + row * K + k;
  if (vec) return k < K ? __ldg(reinterpret_cast<const uint4*>(src)) : make_uint4(0, 0, 0, 0);
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int e = 0; e < CH; ++e) {
    if (k + e < K) {
      if constexpr (sizeof(XT) == 4)
        w[e] = elem_bits(src[e]);
      else
        w[e >> 1] |= elem_bits(src[e]) << (16 * (e & 1));
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// ---------------------------------------------------------------------------------------------------------
// Int kernel.

struct IntParams {
  float* y;
  const void* x;
  const uint8_t* codes;     // (Kp, Fp)
  const uint32_t* col_add;  // (Fp)
  const float* bias;        // (F) or nullptr
  unsigned* status;         // or nullptr
  int M, K, F, Fp;
  int k_tiles;  // Kp / kIntBK
  int splits;
  float in_scale, out_scale;
  bool xvec;  // 16-byte loads of x
};

template <class XT, int BM, int BN>
__global__ void __launch_bounds__(IntTile<BM, BN>::kThreads, BM == 128 ? 2 : 8)
    shift_int_kernel(const __grid_constant__ IntParams p) {
  using Tl = IntTile<BM, BN>;
  constexpr int T = Tl::kThreads;
  constexpr int CH = 16 / int(sizeof(XT));  // x elements per 16-byte chunk
  constexpr int CPR = kIntBK / CH;          // chunks per tile row (lanes sharing a row)
  constexpr int RSTEP = T / CPR;            // tile rows per loader pass
  constexpr int NCH = BM / RSTEP;           // chunks per thread
  constexpr int TXN = BN / 8;               // threads along n
  constexpr int LDU = Tl::kLdU, LDACC = Tl::kLdAcc;
  static_assert(T % CPR == 0 && BM % RSTEP == 0 && 32 % CPR == 0 && NCH <= 32, "loader mapping");

  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* Us = reinterpret_cast<uint32_t*>(smem);                                        // [2][kIntBK][LDU]
  uint8_t* Ws = smem + 2 * Tl::kUBytes;                                                    // [2][kIntBK][BN]
  uint32_t* Acc = reinterpret_cast<uint32_t*>(smem);                                       // [BM][LDACC] (epilogue)
  unsigned long long* L1s = reinterpret_cast<unsigned long long*>(smem + Tl::kMainBytes);  // [BM] row sum |x_int|

  const int tid = threadIdx.x;
  const int S = p.splits;
  const int rank = split_rank(S);
  const int n0 = static_cast<int>(blockIdx.x) / S * BN;
  const int m0 = static_cast<int>(blockIdx.y) * BM;
  const int kt0 = rank * p.k_tiles / S, kt1 = (rank + 1) * p.k_tiles / S;
  const XT* xg = static_cast<const XT*>(p.x);

  // loader: chunk column lc, rows lr + i * RSTEP
  const int lc = tid % CPR, lr = tid / CPR;
  auto load_w = [&](int kt, int st) {
    constexpr int kChunks = kIntBK * BN / 16, kPerRow = BN / 16;
    uint8_t* dst = Ws + st * Tl::kWBytes;
    const uint8_t* src = p.codes + size_t(kt) * kIntBK * p.Fp + n0;
    for (int c = tid; c < kChunks; c += T) {
      const int r = c / kPerRow, cc = c - r * kPerRow;
      cp_async16(dst + r * BN + cc * 16, src + size_t(r) * p.Fp + cc * 16);
    }
  };
  // x tile kt -> fixed point (cpu to_fixed: x 2^f, |.| < 2^31 and finite, round half to even) -> u = x_int ^ 2^31
  // in stage st; the row sums of |x_int| are added to L1s (saturating at 2^32, which is already "does not fit";
  // a non-finite or out-of-range value sets 2^32). The lane with lc == 0 owns its rows' L1s entries.
  auto convert_x = [&](int kt, int st) {
    const int k = kt * kIntBK + lc * CH;
    uint4 raw[NCH];
#pragma unroll
    for (int i = 0; i < NCH; ++i) {  // all loads in flight first
      const int m = m0 + lr + i * RSTEP;
      raw[i] = m < p.M ? load_chunk<XT>(xg, m, k, p.K, p.xvec) : make_uint4(0, 0, 0, 0);
    }
    uint32_t* U = Us + st * (Tl::kUBytes / 4);
#pragma unroll
    for (int i = 0; i < NCH; ++i) {
      const uint32_t w[4] = {raw[i].x, raw[i].y, raw[i].z, raw[i].w};
      const int r = lr + i * RSTEP;
      unsigned long long sum = 0;
      bool bad = false;
#pragma unroll
      for (int e = 0; e < CH; ++e) {
        const float v = __fmul_rn(chunk_elem<XT>(w, e), p.in_scale);
        const bool ok = fabsf(v) < 2147483648.0f;  // false for NaN and +-Inf too
        const int q = ok ? __float2int_rn(v) : 0;  // round to nearest even, |q| < 2^31
        sum += static_cast<unsigned>(q < 0 ? -q : q);
        bad |= !ok;
        U[(lc * CH + e) * LDU + r] = static_cast<uint32_t>(q) ^ 0x80000000u;
      }
      if (bad) sum = kL1Sat;
#pragma unroll
      for (int o = CPR / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);  // lanes of the row
      if (lc == 0) L1s[r] = min(L1s[r] + sum, kL1Sat);
    }
  };

  if (tid < BM) L1s[tid] = 0;  // (threads >= BM in both plans); ordered by the barrier below
  const int tx = tid % TXN, ty = tid / TXN;
  uint32_t acc[8][8];
#pragma unroll
  for (int m = 0; m < 8; ++m)
#pragma unroll
    for (int n = 0; n < 8; ++n) acc[m][n] = 0;

  __syncthreads();
  if (kt0 < kt1) {
    load_w(kt0, 0);
    cp_async_commit();
    convert_x(kt0, 0);
    cp_async_wait<0>();
    __syncthreads();
    for (int kt = kt0; kt < kt1; ++kt) {
      const int st = (kt - kt0) & 1;
      const bool more = kt + 1 < kt1;
      if (more) {  // stage st ^ 1 was last read before the previous iteration's closing barrier
        load_w(kt + 1, st ^ 1);
        cp_async_commit();
        convert_x(kt + 1, st ^ 1);  // its global loads are the only latency not hidden by this warp
      }
      const uint32_t* U = Us + st * (Tl::kUBytes / 4) + ty * 8;
      const uint8_t* Wt = Ws + st * Tl::kWBytes + tx * 8;
#pragma unroll 1
      for (int kk = 0; kk < kIntBK; kk += 2) {
        const uint4 ua0 = *reinterpret_cast<const uint4*>(U + kk * LDU);
        const uint4 ub0 = *reinterpret_cast<const uint4*>(U + kk * LDU + 4);
        const uint4 ua1 = *reinterpret_cast<const uint4*>(U + (kk + 1) * LDU);
        const uint4 ub1 = *reinterpret_cast<const uint4*>(U + (kk + 1) * LDU + 4);
        const uint2 w0 = *reinterpret_cast<const uint2*>(Wt + kk * BN);
        const uint2 w1 = *reinterpret_cast<const uint2*>(Wt + (kk + 1) * BN);
        const uint32_t u0[8] = {ua0.x, ua0.y, ua0.z, ua0.w, ub0.x, ub0.y, ub0.z, ub0.w};
        const uint32_t u1[8] = {ua1.x, ua1.y, ua1.z, ua1.w, ub1.x, ub1.y, ub1.z, ub1.w};
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          const uint32_t b0 = ((n < 4 ? w0.x : w0.y) >> (8 * (n & 3))) & 0xFFu;
          const uint32_t b1 = ((n < 4 ? w1.x : w1.y) >> (8 * (n & 3))) & 0xFFu;
          const uint32_t s0 = b0 & 63u, s1 = b1 & 63u;              // shift, 32 for a zero weight
          const uint32_t f0 = 0u - (b0 >> 7), f1 = 0u - (b1 >> 7);  // ~0 for a negative weight
#pragma unroll
          for (int m = 0; m < 8; ++m)
            acc[m][n] += __funnelshift_rc(u0[m] ^ f0, 0u, s0) + __funnelshift_rc(u1[m] ^ f1, 0u, s1);
        }
      }
      if (more) cp_async_wait<0>();
      __syncthreads();
    }
  }

  // ---- epilogue ---- (the loop ended with a barrier: the stage buffers are free for the accumulator tile)
#pragma unroll
  for (int m = 0; m < 8; ++m) {
    uint32_t* dst = Acc + (ty * 8 + m) * LDACC + tx * 8;
    *reinterpret_cast<uint4*>(dst) = make_uint4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
    *reinterpret_cast<uint4*>(dst + 4) = make_uint4(acc[m][4], acc[m][5], acc[m][6], acc[m][7]);
  }
  split_sync(S);  // every CTA's partial tile and L1 partials are in place

  const uint32_t* accs[kMaxSplits];
  const unsigned long long* l1s[kMaxSplits];
#pragma unroll
  for (int q = 0; q < kMaxSplits; ++q) {
    accs[q] = q < S ? split_peer(Acc, q, S) : Acc;
    l1s[q] = q < S ? split_peer(L1s, q, S) : L1s;
  }
  const int rows = BM / S, rb = rank * rows;
  for (int e = tid; e < rows * BN; e += T) {
    const int r = rb + e / BN, c = e % BN;
    const int m = m0 + r, n = n0 + c;
    if (m >= p.M || n >= p.F) continue;
    uint32_t a = p.col_add[n];
    unsigned long long l = 0;
#pragma unroll
    for (int q = 0; q < kMaxSplits; ++q) {
      if (q < S) {
        a += accs[q][r * LDACC + c];
        l += l1s[q][r];
      }
    }
    float out;
    if (l > 0x7FFFFFFFull) {  // non-finite, |x 2^f| >= 2^31, or sum |x_int| > 2^31 - 1: the CPU throws
      out = __int_as_float(0x7FFFFFFF);
      if (c == 0 && p.status) atomicMin(p.status, static_cast<unsigned>(m));
    } else {
      out = __fadd_rn(__fmul_rn(__int2float_rn(static_cast<int>(a)), p.out_scale), p.bias ? p.bias[n] : 0.0f);
    }
    p.y[int64_t(m) * p.F + n] = out;
  }
  if (S > 1) split_sync(S);  // no CTA leaves while a peer may still read its shared memory
}

// ---------------------------------------------------------------------------------------------------------
// Packed-mma kernel.

struct MmaParams {
  void* y;  // float or bf16 (M, ldy)
  const bf16* x;
  const uint32_t* words;  // (nkb, Fp, kRecWords)
  const float* bias;      // (F) or nullptr
  int M, K, F, Fp, nkb, splits;
  int64_t ldy;      // row stride of y (elements), >= F
  uint32_t scale2;  // bf16x2 bits of 2^(126 + pmin), both halves
  bool xvec;        // 16-byte cp.async of x (K % 8 == 0, 16-byte aligned x)
  bool gelu;        // v = GELU_tanh(v) after the bias
  bool accumulate;  // y = y + v (f32 y)
};

__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_out(bf16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ float load_out(const float* p) { return *p; }
__device__ __forceinline__ float load_out(const bf16* p) { return __bfloat162float(*p); }

template <class OutT, int BM, int BN, int WM, int WN>
__global__ void __launch_bounds__(MmaTile<BM, BN, WM, WN>::kThreads, BM == 128 ? 2 : 4)
    shift_mma_kernel(const __grid_constant__ MmaParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync bf16 / cp.async / ldmatrix need sm_80; the launcher refuses older devices
#else
  using Tl = MmaTile<BM, BN, WM, WN>;
  constexpr int T = Tl::kThreads, MI = Tl::kMI, NI = Tl::kNI, LDA = Tl::kLdA, LDC = Tl::kLdC;
  extern __shared__ __align__(16) unsigned char smem[];

  ptx::pdl_trigger();  // dependent launch (common.h): let the next kernel start; wait before touching data
  ptx::pdl_wait();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WM, wn = warp / WM;
  const int g = lane >> 2, t = lane & 3;
  const int S = p.splits;
  const int rank = split_rank(S);
  const int n0 = static_cast<int>(blockIdx.x) / S * BN;
  const int m0 = static_cast<int>(blockIdx.y) * BM;
  const int kb0 = rank * p.nkb / S, kb1 = (rank + 1) * p.nkb / S, nk = kb1 - kb0;

  auto stage_a = [&](int s) { return reinterpret_cast<bf16*>(smem + s * Tl::kStageBytes); };
  auto stage_b = [&](int s) { return reinterpret_cast<uint32_t*>(smem + s * Tl::kStageBytes + Tl::kABytes); };

  auto load = [&](int kb, int s) {
    bf16* As = stage_a(s);
    for (int c = tid; c < BM * 8; c += T) {  // BM rows x 8 chunks of 8 bf16
      const int r = c >> 3, ch = c & 7;
      const int m = m0 + r, k = kb * kMmaBK + ch * 8;
      bf16* dst = As + r * LDA + ch * 8;
      if (p.xvec) {
        const bool ok = m < p.M && k < p.K;
        cp_async16(dst, ok ? p.x + int64_t(m) * p.K + k : p.x, ok);
      } else {
        *reinterpret_cast<uint4*>(dst) = m < p.M ? load_chunk<bf16>(p.x, m, k, p.K, false) : make_uint4(0, 0, 0, 0);
      }
    }
    const unsigned char* src = reinterpret_cast<const unsigned char*>(p.words + (size_t(kb) * p.Fp + n0) * kRecWords);
    unsigned char* dst = reinterpret_cast<unsigned char*>(stage_b(s));
    for (int c = tid; c < BN * kRecWords / 4; c += T) cp_async16(dst + c * 16, src + size_t(c) * 16);
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[mi][ni][v] = 0.0f;

#pragma unroll
  for (int s = 0; s < kMmaStages - 1; ++s) {
    if (s < nk) load(kb0 + s, s);
    cp_async_commit();  // one group per k-block, empty ones included: the wait count stays uniform
  }
  const int sgs = 15 - 8 * (t & 1);  // sign word shift for P = 0
  for (int i = 0; i < nk; ++i) {
    cp_async_wait<kMmaStages - 2>();  // k-block i has landed (this thread's copies)
    __syncthreads();                  // ... everyone's; and k-block i - 1's stage is free again
    {
      const int j = i + kMmaStages - 1;
      if (j < nk) load(kb0 + j, j % kMmaStages);
      cp_async_commit();
    }
    const int s = i % kMmaStages;
    const bf16* As = stage_a(s);
    const uint32_t* Bs = stage_b(s);
    uint32_t nib[NI][2], sg[NI];
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const uint32_t* rec = Bs + (wn * Tl::kTNW + ni * 8 + g) * kRecWords;
      const uint2 v = *reinterpret_cast<const uint2*>(rec + 2 * t);
      nib[ni][0] = v.x;
      nib[ni][1] = v.y;
      sg[ni] = rec[8 + (t >> 1)];
    }
#pragma unroll
    for (int st = 0; st < kMmaBK / 16; ++st) {
      uint32_t a[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(a[mi], As + (wm * Tl::kTMW + mi * 16 + (lane & 15)) * LDA + st * 16 + 8 * (lane >> 4));
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        uint32_t b[2];
#pragma unroll
        for (int bb = 0; bb < 2; ++bb) {
          const int q = 2 * (st & 1) + bb, P = 4 * (st >> 1) + q;
          const uint32_t w = nib[ni][st >> 1];
          const uint32_t nb = (q == 0 ? w << 7 : q == 1 ? w << 3 : q == 2 ? w >> 1 : w >> 5) & 0x07800780u;
          const uint32_t sb = (sg[ni] << (sgs - P)) & 0x80008000u;
          b[bb] = bf16x2_mul(nb | sb, p.scale2);
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) mma_bf16(acc[mi][ni], a[mi], b[0], b[1]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can be pending; drained before the smem is reused
  __syncthreads();

  // ---- epilogue ----
  float* C = reinterpret_cast<float*>(smem);  // [BM][LDC]
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int r = wm * Tl::kTMW + mi * 16 + g, c = wn * Tl::kTNW + ni * 8 + 2 * t;
      *reinterpret_cast<float2*>(C + r * LDC + c) = make_float2(acc[mi][ni][0], acc[mi][ni][1]);
      *reinterpret_cast<float2*>(C + (r + 8) * LDC + c) = make_float2(acc[mi][ni][2], acc[mi][ni][3]);
    }
  split_sync(S);

  const float* cs[kMaxSplits];
#pragma unroll
  for (int q = 0; q < kMaxSplits; ++q) cs[q] = q < S ? split_peer(C, q, S) : C;
  OutT* y = static_cast<OutT*>(p.y);
  const int rows = BM / S, rb = rank * rows;
  for (int e = tid; e < rows * BN; e += T) {
    const int r = rb + e / BN, c = e % BN;
    const int m = m0 + r, n = n0 + c;
    if (m >= p.M || n >= p.F) continue;
    float v = cs[0][r * LDC + c];
#pragma unroll
    for (int q = 1; q < kMaxSplits; ++q)
      if (q < S) v = __fadd_rn(v, cs[q][r * LDC + c]);  // rank order: deterministic
    if (p.bias) v = __fadd_rn(v, p.bias[n]);
    if (p.gelu) v = gelu_tanh_rn(v);  // gelu.cuh: cuBLASLt's tanh form, no contraction
    OutT* dst = y + int64_t(m) * p.ldy + n;
    if (p.accumulate) v = __fadd_rn(load_out(dst), v);  // the residual add, one rounding
    store_out(dst, v);
  }
  if (S > 1) split_sync(S);
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.

// grid.x = n tiles x splits: with splits > 1 the CTAs [c splits, (c+1) splits) of a row of the grid form one
// cluster (rank = blockIdx.x % splits), launched with the cluster-dimension attribute.
template <class P>
void launch(void (*kernel)(P), const P& prm, dim3 grid, int threads, size_t smem, int splits, cudaStream_t stream) {
  launch_dependent(kernel, grid, dim3(threads), smem, splits, stream, prm);
}

void check_device_cc80(const char* op) {
  SAV_CHECK(device_cc_major() >= 8, op << ": needs a compute capability 8.0 or newer device (cp.async, bf16 mma.sync)");
}

template <class XT>
void int_forward(float* y, const XT* x, const ShiftGpuWeights& w, const float* bias, int M, int K, int F, int frac_bits,
                 cudaStream_t stream, unsigned* status) {
  const char* op = "shift_int_linear_forward";
  check_shape(op, M, K, F);
  SAV_CHECK(w.F == F && w.K == K,
            op << ": weights are " << w.F << "x" << w.K << " (F x K), the call asks for " << F << "x" << K);
  SAV_CHECK(w.Fp == round_up(F, kFPad) && w.Kp == round_up(K, kIntBK) && w.codes.size() == size_t(w.Kp) * w.Fp &&
                w.col_add.size() == size_t(w.Fp),
            op << ": ShiftGpuWeights is inconsistent; build it with shift_gpu_weights_prepare");
  SAV_CHECK(frac_bits >= 0 && frac_bits <= 30, op << ": frac_bits must be in [0, 30], got " << frac_bits);
  if (M == 0) return;
  SAV_CHECK(y && x, op << ": null y or x");
  check_no_alias(op, y, size_t(M) * F * sizeof(float), x, size_t(M) * K * sizeof(XT));
  check_device_cc80(op);
  const ShiftKernelPlan pl = shift_int_plan(M, K, F);
  IntParams prm{};
  prm.y = y, prm.x = x, prm.codes = w.codes.get(), prm.col_add = w.col_add.get(), prm.bias = bias;
  prm.status = status;
  prm.M = M, prm.K = K, prm.F = F, prm.Fp = w.Fp;
  prm.k_tiles = w.Kp / kIntBK;
  prm.splits = pl.splits;
  prm.in_scale = std::ldexp(1.0f, frac_bits);
  prm.out_scale = std::ldexp(1.0f, -frac_bits);
  prm.xvec = K % (16 / int(sizeof(XT))) == 0 && aligned16(x);
  const dim3 grid(static_cast<unsigned>(cdiv(F, pl.bn) * pl.splits), static_cast<unsigned>(cdiv(M, pl.bm)), 1);
  if (pl.bm == 128)
    launch(shift_int_kernel<XT, 128, 128>, prm, grid, IntBig::kThreads, IntBig::kSmemBytes, pl.splits, stream);
  else
    launch(shift_int_kernel<XT, 64, 64>, prm, grid, IntSmall::kThreads, IntSmall::kSmemBytes, pl.splits, stream);
}

template <class OutT>
void packed_forward(OutT* y, const bf16* x, const ShiftPackedWeights& w, const float* bias, int M, int K, int F,
                    const ShiftEpilogue& epi, cudaStream_t stream) {
  const char* op = "shift_packed_linear_forward";
  check_shape(op, M, K, F);
  SAV_CHECK(epi.ldy == 0 || epi.ldy >= F,
            op << ": the output row stride ldy must be 0 (= F) or >= F = " << F << ", got " << epi.ldy);
  constexpr bool kF32Out = std::is_same_v<OutT, float>;
  SAV_CHECK(!epi.accumulate || kF32Out, op << ": accumulate (the residual add) needs an f32 output");
  const int64_t ldy = epi.ldy == 0 ? F : epi.ldy;
  SAV_CHECK(w.F == F && w.K == K,
            op << ": weights are " << w.F << "x" << w.K << " (F x K), the call asks for " << F << "x" << K);
  SAV_CHECK(w.Fp == round_up(F, kFPad) && w.nkb == cdiv(K, kMmaBK) &&
                w.words.size() == size_t(w.nkb) * w.Fp * kRecWords && w.pmax - w.pmin <= 14 && w.pmax >= w.pmin &&
                w.pmin >= -126 && w.pmin <= 1,
            op << ": ShiftPackedWeights is inconsistent; build it with shift_packed_weights_prepare");
  if (M == 0) return;
  SAV_CHECK(y && x, op << ": null y or x");
  check_no_alias(op, y, size_t((M - 1) * ldy + F) * sizeof(OutT), x, size_t(M) * K * sizeof(bf16));
  check_device_cc80(op);
  const ShiftKernelPlan pl = shift_packed_plan(M, K, F);
  MmaParams prm{};
  prm.y = y, prm.x = x, prm.words = w.words.get(), prm.bias = bias;
  prm.M = M, prm.K = K, prm.F = F, prm.Fp = w.Fp, prm.nkb = w.nkb, prm.splits = pl.splits;
  prm.ldy = ldy, prm.gelu = epi.gelu, prm.accumulate = epi.accumulate;
  const uint32_t half = static_cast<uint32_t>(253 + w.pmin) << 7;  // bf16 2^(126 + pmin): exponent field 253 + pmin
  prm.scale2 = half | (half << 16);
  prm.xvec = K % 8 == 0 && aligned16(x);
  const dim3 grid(static_cast<unsigned>(cdiv(F, pl.bn) * pl.splits), static_cast<unsigned>(cdiv(M, pl.bm)), 1);
  if (pl.bm == 128)
    launch(shift_mma_kernel<OutT, 128, 128, 2, 4>, prm, grid, MmaBig::kThreads, MmaBig::kSmemBytes, pl.splits, stream);
  else
    launch(shift_mma_kernel<OutT, 64, 64, 2, 2>, prm, grid, MmaSmall::kThreads, MmaSmall::kSmemBytes, pl.splits,
           stream);
}

// ---------------------------------------------------------------------------------------------------------
// Host forms.

// W (F,K) = s_r 2^p_r as the forward pass rounds them.
std::vector<float> materialise(const char* op, const float* p, const float* s, int F, int K, int pmin, int pmax) {
  SAV_CHECK(p && s, op << ": null p or s");
  check_shape(op, 0, K, F);
  std::vector<float> W(size_t(F) * K);
  cpu::shift_linear_weights(W.data(), p, s, F, K, pmin, pmax);
  return W;
}

// w = +-2^e exactly (or 0): e; throws otherwise.
int exponent_of(const char* op, float w) {
  int e = 0;
  const float m = std::frexp(std::fabs(w), &e);  // |w| = m 2^e, m in [0.5, 1)
  SAV_CHECK(m == 0.5f, op << ": weight " << w << " is not a power of two; pass s_r 2^p_r (cpu::shift_linear_weights)");
  return e - 1;
}

ShiftGpuWeights upload_int(const float* W, int F, int K) {
  ShiftGpuWeights w;
  std::vector<uint32_t> col;
  const std::vector<uint8_t> codes = shift_int_codes_host(W, F, K, &col);
  w.F = F, w.K = K, w.Fp = round_up(F, kFPad), w.Kp = round_up(K, kIntBK);
  w.codes.resize(codes.size());
  w.codes.upload(codes);
  w.col_add.resize(col.size());
  w.col_add.upload(col);
  return w;
}

ShiftPackedWeights upload_packed(const float* W, int F, int K, int pmin, int pmax) {
  ShiftPackedWeights w;
  const std::vector<uint32_t> words = shift_packed_words_host(W, F, K, pmin, pmax);
  w.F = F, w.K = K, w.Fp = round_up(F, kFPad), w.nkb = cdiv(K, kMmaBK), w.pmin = pmin, w.pmax = pmax;
  w.words.resize(words.size());
  w.words.upload(words);
  return w;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Public API.

std::vector<uint8_t> shift_int_codes_host(const float* W, int F, int K, std::vector<uint32_t>* col_add) {
  const char* op = "shift_int_codes_host";
  check_shape(op, 0, K, F);
  SAV_CHECK(W && col_add, op << ": null W or col_add");
  const int Fp = round_up(F, kFPad), Kp = round_up(K, kIntBK);
  std::vector<uint8_t> codes(size_t(Kp) * Fp, kZeroCode);
  col_add->assign(size_t(Fp), 0u);
  for (int j = 0; j < F; ++j) {
    uint32_t c = 0;  // modulo 2^32
    for (int k = 0; k < K; ++k) {
      const float v = W[size_t(j) * K + k];
      if (v == 0.0f) continue;
      const int e = exponent_of(op, v);
      SAV_CHECK(e >= -31 && e <= 0, op << ": weight 2^" << e << " outside the int kernel's range [2^-31, 2^0]");
      const uint32_t n = static_cast<uint32_t>(-e);
      const bool neg = v < 0.0f;
      codes[size_t(k) * Fp + j] = static_cast<uint8_t>(n | (neg ? 0x80u : 0u));
      const uint32_t pw = 1u << (31 - n);  // 2^(31 - n)
      c += neg ? 1u - pw : 0u - pw;
    }
    (*col_add)[j] = c;
  }
  return codes;
}

std::vector<uint32_t> shift_packed_words_host(const float* W, int F, int K, int pmin, int pmax) {
  const char* op = "shift_packed_words_host";
  check_shape(op, 0, K, F);
  SAV_CHECK(W, op << ": null W");
  SAV_CHECK(
      pmin <= pmax && pmax - pmin <= 14 && pmin >= -126 && pmin <= 1,
      op << ": the packed form needs pmax - pmin <= 14 and -126 <= pmin <= 1, got [" << pmin << ", " << pmax << "]");
  const int Fp = round_up(F, kFPad), nkb = cdiv(K, kMmaBK);
  std::vector<uint32_t> words(size_t(nkb) * Fp * kRecWords, 0u);
  for (int j = 0; j < F; ++j)
    for (int k = 0; k < K; ++k) {
      const float v = W[size_t(j) * K + k];
      if (v == 0.0f) continue;
      const int e = exponent_of(op, v);
      SAV_CHECK(e >= pmin && e <= pmax, op << ": weight 2^" << e << " outside [2^" << pmin << ", 2^" << pmax << "]");
      const uint32_t d = static_cast<uint32_t>(e - pmin + 1);  // 1..15
      const int kb = k / kMmaBK, kl = k % kMmaBK;
      const int st = kl / 16, b = (kl % 16) / 8, t = (kl % 8) / 2, half = kl % 2;
      const int h = st / 2, q = 2 * (st % 2) + b, P = 4 * h + q;
      uint32_t* rec = words.data() + (size_t(kb) * Fp + j) * kRecWords;
      rec[2 * t + h] |= d << (4 * q + 16 * half);
      if (v < 0.0f) rec[8 + t / 2] |= 1u << (8 * (t % 2) + P + 16 * half);
    }
  return words;
}

ShiftGpuWeights shift_gpu_weights_prepare(const float* p, const float* s, int F, int K, int pmin, int pmax) {
  SAV_CHECK(
      pmin <= pmax && pmin >= -31 && pmax <= 0,
      "shift_gpu_weights_prepare: the int kernel needs -31 <= pmin <= pmax <= 0, got [" << pmin << ", " << pmax << "]");
  const std::vector<float> W = materialise("shift_gpu_weights_prepare", p, s, F, K, pmin, pmax);
  return upload_int(W.data(), F, K);
}

ShiftPackedWeights shift_packed_weights_prepare(const float* p, const float* s, int F, int K, int pmin, int pmax) {
  SAV_CHECK(pmin <= pmax && pmax - pmin <= 14 && pmin >= -126 && pmin <= 1,
            "shift_packed_weights_prepare: the packed form needs pmax - pmin <= 14 and -126 <= pmin <= 1, got ["
                << pmin << ", " << pmax << "]");
  const std::vector<float> W = materialise("shift_packed_weights_prepare", p, s, F, K, pmin, pmax);
  return upload_packed(W.data(), F, K, pmin, pmax);
}

ShiftPackedWeights shift_packed_weights_prepare(const cpu::PackedShift& packed) {
  const size_t n = size_t(packed.F) * packed.K;
  check_shape("shift_packed_weights_prepare", 0, packed.K, packed.F);
  std::vector<float> p(n), s(n);
  cpu::unpack_shift(p.data(), s.data(), packed);  // validates every code
  return shift_packed_weights_prepare(p.data(), s.data(), packed.F, packed.K, packed.pmin, packed.pmax);
}

ShiftKernelPlan shift_int_plan(int M, int K, int F) {
  check_shape("shift_int_plan", M, K, F);
  return make_plan(M, F, cdiv(K, kIntBK), /*min_tiles*/ 1, 128, 128, 64, 64);  // ~5k instructions per tile
}

ShiftKernelPlan shift_packed_plan(int M, int K, int F) {
  check_shape("shift_packed_plan", M, K, F);
  return make_plan(M, F, cdiv(K, kMmaBK), /*min_tiles*/ 2, 128, 128, 64, 64);
}

void shift_int_linear_forward(float* y, const float* x, const ShiftGpuWeights& w, const float* bias, int M, int K,
                              int F, int frac_bits, cudaStream_t stream, unsigned* status) {
  int_forward<float>(y, x, w, bias, M, K, F, frac_bits, stream, status);
}
void shift_int_linear_forward(float* y, const bf16* x, const ShiftGpuWeights& w, const float* bias, int M, int K, int F,
                              int frac_bits, cudaStream_t stream, unsigned* status) {
  int_forward<bf16>(y, x, w, bias, M, K, F, frac_bits, stream, status);
}

void shift_int_status_reset(unsigned* status, cudaStream_t stream) {
  SAV_CHECK(status, "shift_int_status_reset: null status");
  SAV_CUDA_CHECK(cudaMemsetAsync(status, 0xFF, sizeof(unsigned), stream));
}

int64_t shift_int_status_read(const unsigned* status, cudaStream_t stream) {
  SAV_CHECK(status, "shift_int_status_read: null status");
  unsigned v = kStatusNone;
  SAV_CUDA_CHECK(cudaMemcpyAsync(&v, status, sizeof(unsigned), cudaMemcpyDeviceToHost, stream));
  SAV_CUDA_CHECK(cudaStreamSynchronize(stream));
  return v == kStatusNone ? -1 : int64_t(v);
}

void shift_packed_linear_forward(float* y, const bf16* x, const ShiftPackedWeights& w, const float* bias, int M, int K,
                                 int F, cudaStream_t stream) {
  packed_forward<float>(y, x, w, bias, M, K, F, ShiftEpilogue{}, stream);
}
void shift_packed_linear_forward(bf16* y, const bf16* x, const ShiftPackedWeights& w, const float* bias, int M, int K,
                                 int F, cudaStream_t stream) {
  packed_forward<bf16>(y, x, w, bias, M, K, F, ShiftEpilogue{}, stream);
}
void shift_packed_linear_forward(float* y, const bf16* x, const ShiftPackedWeights& w, const float* bias, int M, int K,
                                 int F, const ShiftEpilogue& epi, cudaStream_t stream) {
  packed_forward<float>(y, x, w, bias, M, K, F, epi, stream);
}
void shift_packed_linear_forward(bf16* y, const bf16* x, const ShiftPackedWeights& w, const float* bias, int M, int K,
                                 int F, const ShiftEpilogue& epi, cudaStream_t stream) {
  packed_forward<bf16>(y, x, w, bias, M, K, F, epi, stream);
}

bool shift_packed_supports(int pmin, int pmax) {
  return pmin <= pmax && pmax - pmin <= 14 && pmin >= -126 && pmin <= 1;
}

ShiftPackedWeights shift_packed_weights_from_matrix(const float* W, int F, int K, int pmin, int pmax) {
  return upload_packed(W, F, K, pmin, pmax);  // shift_packed_words_host checks W, the shape and the range
}

const char* shift_path_name(ShiftPath path) {
  switch (path) {
    case shift_path_cublas_decoded:
      return "cublas_decoded";
    case shift_path_packed_mma:
      return "packed_mma";
    case shift_path_int:
      return "int";
  }
  return "unknown";
}

// ---------------------------------------------------------------------------------------------------------
// ShiftLinearGpu.

ShiftLinearGpu::ShiftLinearGpu(const float* p, const float* s, const float* bias, int F, int K, int pmin, int pmax,
                               int frac_bits)
    : F_(F), K_(K), pmin_(pmin), pmax_(pmax), frac_bits_(frac_bits) {
  const char* op = "ShiftLinearGpu";
  SAV_CHECK(pmin <= pmax && pmin >= -31 && pmax <= 0 && pmax - pmin <= 14,
            op << ": needs -31 <= pmin <= pmax <= 0 and pmax - pmin <= 14 (int and packed forms), got [" << pmin << ", "
               << pmax << "]");
  SAV_CHECK(frac_bits >= 0 && frac_bits <= 30, op << ": frac_bits must be in [0, 30], got " << frac_bits);
  const std::vector<float> W = materialise(op, p, s, F, K, pmin, pmax);
  const std::vector<bf16> wb = to_bf16(W.data(), W.size());  // exact: +-2^p with p in [-31, 0], or 0
  w_bf16_.resize(wb.size());
  w_bf16_.upload(wb);
  if (bias) {
    bias_.resize(size_t(F));
    bias_.upload(bias, size_t(F));
  }
  packed_ = upload_packed(W.data(), F, K, pmin, pmax);
  intw_ = upload_int(W.data(), F, K);
  status_.resize(1);
  status_.fill_bytes(0xFF);
  gemm_ = std::make_unique<Gemm>();
}

ShiftLinearGpu::~ShiftLinearGpu() = default;
ShiftLinearGpu::ShiftLinearGpu(ShiftLinearGpu&&) noexcept = default;
ShiftLinearGpu& ShiftLinearGpu::operator=(ShiftLinearGpu&&) noexcept = default;

void ShiftLinearGpu::forward(float* y, const bf16* x, int M, cudaStream_t stream, ShiftPath path) {
  const char* op = "ShiftLinearGpu::forward";
  SAV_CHECK(gemm_, op << ": moved-from layer");
  SAV_CHECK(M >= 0 && M <= shift_gpu_max_rows, op << ": M must be in [0, " << shift_gpu_max_rows << "], got " << M);
  SAV_CHECK(path == shift_path_cublas_decoded || path == shift_path_packed_mma || path == shift_path_int,
            op << ": unknown path " << int(path));
  if (M == 0) {
    last_ = path;
    return;
  }
  SAV_CHECK(y && x, op << ": null y or x");
  const float* b = bias();
  switch (path) {
    case shift_path_cublas_decoded:
      check_no_alias(op, y, size_t(M) * F_ * sizeof(float), x, size_t(M) * K_ * sizeof(bf16));
      gemm_->linear_f32(y, x, w_bf16_.get(), b, M, K_, F_, /*accumulate*/ false, stream);
      break;
    case shift_path_packed_mma:
      shift_packed_linear_forward(y, x, packed_, b, M, K_, F_, stream);
      break;
    case shift_path_int:
      shift_int_linear_forward(y, x, intw_, b, M, K_, F_, frac_bits_, stream, status_.get());
      break;
  }
  last_ = path;
}

ShiftPath ShiftLinearGpu::pick(int M, cudaStream_t stream, bool include_int) {
  const char* op = "ShiftLinearGpu::pick";
  SAV_CHECK(M > 0 && M <= shift_gpu_max_rows, op << ": M must be in [1, " << shift_gpu_max_rows << "], got " << M);
  const auto key = std::make_pair(M, include_int);
  if (auto it = picks_.find(key); it != picks_.end()) return it->second.best;
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  SAV_CUDA_CHECK(cudaStreamIsCapturing(stream, &cap));
  SAV_CHECK(cap == cudaStreamCaptureStatusNone,
            op << ": cannot time paths while the stream is being captured; call pick(" << M << ") before capture");
  constexpr int kWarmups = 3, kRuns = 9;
  DeviceBuffer<bf16> x(size_t(M) * K_);
  DeviceBuffer<float> y(size_t(M) * F_);
  x.fill_bytes(0);
  const ShiftPath saved = last_;
  Timing tm;
  float best_us = std::numeric_limits<float>::infinity();
  const ShiftPath cands[3] = {shift_path_cublas_decoded, shift_path_packed_mma, shift_path_int};
  for (const ShiftPath path : cands) {
    if (path == shift_path_int && !include_int) continue;
    const float us = static_cast<float>(
        median_launch_us([&] { forward(y.get(), x.get(), M, stream, path); }, stream, kWarmups, kRuns));
    tm.us[path] = us;
    if (us < best_us) {
      best_us = us;
      tm.best = path;
    }
  }
  last_ = saved;
  picks_[key] = tm;
  return tm.best;
}

const float* ShiftLinearGpu::pick_times_us(int M, bool include_int) const {
  const auto it = picks_.find(std::make_pair(M, include_int));
  return it == picks_.end() ? nullptr : it->second.us;
}

int64_t ShiftLinearGpu::int_status_take(cudaStream_t stream) {
  SAV_CHECK(status_.get(), "ShiftLinearGpu::int_status_take: moved-from layer");
  const int64_t row = shift_int_status_read(status_.get(), stream);
  shift_int_status_reset(status_.get(), stream);
  SAV_CUDA_CHECK(cudaStreamSynchronize(stream));
  return row;
}

}  // namespace sav::cuda
