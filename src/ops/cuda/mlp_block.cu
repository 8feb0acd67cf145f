// The MLP half of a ViT block at small M as ONE kernel (ops.h mlp_block_forward): the masked MoE fc1 with its GELU,
// the stacked MoE fc2, its routing + residual epilogue and the next block's LayerNorm 1. Spec: the composition of
// the masked product (x_aug W_aug^T, the GELU tanh form, bf16), the stacked product (f32) and
// moe_epilogue_residual_ln_forward.
//
// Work split: the M rows in tiles of TM = 16 kMB rows; a thread-block cluster of cs = F / 128 CTAs per tile, CTA r
// owning the 128 hidden units [128 r, 128 r + 128). Each CTA computes its hidden slice of the tile (fc1 needs all of
// x_aug's columns, which every CTA reads) and that slice's share of fc2, a partial s (TM x (2C + 4)) over its 128 of
// the F products; the shares meet through distributed shared memory: CTA r adds, for the rows r, r + cs, ... of the
// tile, the cs partials in rank order and runs the epilogue of those rows.
//
// Weights are not staged by the previous kernel's end: before the dependent-launch wait every lane loads its fc1
// fragments (the CTA's 128 rows of W_aug, permuted k order of frag.cuh) into registers, and the CTA's 128 columns of
// every stacked fc2 row come by bulk copies (one per row, an mbarrier) into shared memory, so they arrive while the
// previous kernel runs. After the wait: the tile's x_aug rows (cp.async, zeros past M) and the residual rows of the
// CTA's epilogue rows.
//
// Phases:
//  1. fc1: warp w owns column tiles 2 (w % 8) and 2 (w % 8) + 1 of the slice (16 hidden units) over one half of
//     Ka's 32-wide k blocks (w / 8; the second half also the 16-wide tail block when Ka % 32 = 16), so each A
//     fragment read from shared memory serves two tiles; the two warps of a pair swap one tile's sums through shared
//     memory, and each adds them for its own tile (first half + second half), applies GELU (tanh form) and stores
//     bf16 into shared memory (the optional hid_out copy for tests);
//  2. fc2 partial: warp w owns column tiles w, w + 16, ... of the 2C + 4 stacked columns: the slice's 128 k (4 blocks;
//     the lane's A fragments read once into registers) into the CTA's partial rows (f32, shared memory); cluster
//     barrier;
//  3. the CTA's rows: the cs partials summed in rank order (float4 reads from every CTA, all in flight at once) into a
//  local row; a cluster
//     arrive (remote reads done); then the epilogue of each row (moe_rows::epilogue_residual_ln, the arithmetic of
//     moe_epilogue_residual_ln_forward), a group of 16 lanes per row; the cluster wait before exit.
// Deterministic: every sum has a fixed order (k blocks, then the ranks), no atomics; a row's bits do not depend on M,
// the tile size or the other rows.
#include <cooperative_groups.h>

#include <algorithm>

#include "ops/cuda/frag.cuh"
#include "ops/cuda/gelu.cuh"
#include "ops/cuda/hamming_common.cuh"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/moe_rows.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/ptx.cuh"

namespace sav::cuda {

namespace {

namespace cg = cooperative_groups;
using frag::mma_kblock;
using frag::mma_ktail;

constexpr int kThreads = 512;  // 16 warps
constexpr int kWarps = kThreads / 32;
constexpr int kHC = 8 * kWarps;  // hidden units per CTA: 16 fc1 column tiles (a pair per warp and k half)
// Shared-memory row strides for the 16-byte fragment loads (frag::a_fragment): lanes 0-7 of a load read rows g and
// g + 1, 64 bytes each, so a stride of 32 mod 64 bf16 puts the two rows in distinct bank halves (one wavefront per
// quarter warp, not two).
constexpr int kLdH = kHC + 32;  // the hidden slice
constexpr int kLdW = kHC;       // the fc2 weight slice: odd rows swizzled instead (k block kb at kb ^ 1), no padding
__host__ __device__ constexpr int xa_ld(int Ka) { return Ka + (96 - Ka % 64) % 64; }  // = 32 mod 64, Ka % 16 == 0
constexpr int kMaxKB1 = 12;           // fc1's 32-wide k blocks: Ka <= 400 (C <= 192)
constexpr int kMaxKBh = kMaxKB1 / 2;  // ... per k half
static_assert(kWarps == 16, "fc1: 8 pairs of column tiles x 2 k halves");
constexpr int kMaxC = 192;      // model width: Ka = moe_masked_cols(C) <= 32 kMaxKB1 + 16
constexpr int kMaxT2 = 4;       // fc2 column tiles per warp: 2C + 4 <= 8 * 16 * 4
constexpr int kMaxCluster = 8;  // F <= 1024 (portable cluster sizes)
constexpr int kG = 16, kS = 3;  // epilogue: lanes per row (ln::row_group(C) for C <= 192), float4 slots per lane

// SAV_ABLATION (a diagnostic build only, as ham_block.cu): phases skipped by the bits of SAV_ABLATE: 256 proj, 512
// LayerNorm 2 + router + mask, 1024 fc1, 2048 fc2, 4096 the cluster barrier and the partials' sum, 8192 the epilogue.
#ifdef SAV_ABLATION
#define MLP_SKIP(bit) ((p.ablate & (bit)) != 0)
#else
#define MLP_SKIP(bit) false
#endif

// SAV_MLP_BLOCK_TRACE (a diagnostic build only): thread 0 of the first and the last CTA prints the clock64 cycles of
// each phase.
#ifdef SAV_MLP_BLOCK_TRACE
#define MLP_STAMP(i) (tid == 0 ? (void)(stamps[i] = clock64()) : (void)0)
#else
#define MLP_STAMP(i) ((void)0)
#endif

// The kernel's sizes that follow from (C, F, tile rows): runtime values in the generic instances, compile-time
// constants in the instances specialised for one model width (mlp_kernel_for), where the index arithmetic, the loop
// bounds and the shared-memory layout fold into the code.
struct MlpShape {
  int C, F, Ka, cs, nt2, ldp, ro;
};
__host__ __device__ constexpr MlpShape mlp_shape(int C, int F, int tm) {
  const int nt2 = (2 * C + 4 + 7) / 8, cs = F / kHC;
  return MlpShape{C, F, moe_masked_cols(C), cs, nt2, ld_8mod32(nt2 * 8), (tm + cs - 1) / cs};
}

struct MlpParams {
  float* x;
  int8_t* choice;
  const bf16 *xa, *wa, *ws;
  const float *b0, *b1, *br, *ln_w, *ln_b;
  // the proj form (kProj): the attention output rows ao (ldao apart), proj (wp, bp), LayerNorm 2 (ln2_w, ln2_b) and the
  // masked fc1's router (wr, br1, choices choice1) run first, in every CTA of the tile's cluster, instead of reading xa
  const bf16 *ao, *wp;
  const float *bp, *ln2_w, *ln2_b, *wr, *br1;
  int8_t* choice1;
  int ldao;
  bf16* xn;
  bf16* hid_out;
  float eps;
  int gate;
  int ldx, ldxa, ldxn;
  int M;
  MlpShape s;       // the sizes (s.ro: epilogue rows per CTA)
  TimelineSink tl;  // common.h: the kernel timeline (a diagnostic; empty: nothing recorded)
#ifdef SAV_ABLATION
  unsigned ablate;
#endif
};

constexpr int kProjRegTiles = 12;  // the proj form: proj column tiles 0 .. 11 from registers, the others from smem
__host__ __device__ constexpr int proj_smem_rows(int C) { return C / 8 > kProjRegTiles ? C - 8 * kProjRegTiles : 0; }

struct MlpSmem {
  size_t bar, ws, xa, hid, part, red, xres, ep, aos, xin, ep2, wps, total;
};
__host__ __device__ constexpr MlpSmem mlp_smem(const MlpShape& p, int tm, bool proj) {
  MlpSmem s{};
  const size_t C = size_t(p.C), ro2 = size_t(p.ro + 1) / 2 * 2;  // epilogue rows, even: whole warps run it
  size_t o = 0;
  s.bar = o, o = align16(o + sizeof(uint64_t));
  s.ws = o, o = align16(o + size_t(p.nt2) * 8 * kLdW * sizeof(bf16));
  s.xa = o, o = align16(o + size_t(tm) * xa_ld(p.Ka) * sizeof(bf16));
  s.hid = o, o = align16(o + size_t(tm) * kLdH * sizeof(bf16));
  s.part = o, o = align16(o + size_t(tm) * (p.ldp > 128 ? p.ldp : 128) * sizeof(float));  // also fc1's k-half exchange
  s.red = o, o = align16(o + ro2 * p.ldp * sizeof(float));
  s.xres = o, o = align16(o + (proj ? 0 : ro2 * C) * sizeof(float));  // the proj form keeps every row in xin
  s.ep = o, o = align16(o + (4 * C + 4) * sizeof(float));             // b0, b1, ln_w, ln_b, br (2), pad
  if (proj) {  // the proj form: the attention output rows, the residual rows, bp, ln2_w, ln2_b, wr (2C), br1 (2)
    s.aos = o, o = align16(o + size_t(tm) * (C + 32) * sizeof(bf16));
    s.xin = o, o = align16(o + size_t(tm) * C * sizeof(float));
    s.ep2 = o, o = align16(o + (5 * C + 4) * sizeof(float));
    s.wps = o, o = align16(o + size_t(proj_smem_rows(p.C)) * (C + 32) * sizeof(bf16));  // proj rows 96 .. C - 1
  }
  s.total = o;
  return s;
}

// kC, kF: the model width and hidden size the instance is specialised for (0: read from p)
template <int kMB, bool kProj, int kC = 0, int kF = 0>
__global__ void __launch_bounds__(kThreads, 1) mlp_block_kernel(const __grid_constant__ MlpParams p) {
  static_assert(!kProj || kMB == 1, "the proj form runs 16-row tiles");
  static_assert((kC == 0) == (kF == 0), "specialised for both sizes or neither");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // built for sm_90; the launcher refuses older devices
#else
  constexpr int TM = 16 * kMB;
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr MlpShape kFixed = mlp_shape(kC, kF > 0 ? kF : kHC, TM);
  const MlpShape S = kC > 0 ? kFixed : p.s;
  const MlpSmem L = mlp_smem(S, TM, kProj);
  const int C = S.C, Ka = S.Ka, ldxs = xa_ld(Ka), KB1 = Ka / 32, cs = S.cs, ldp = S.ldp, nt2 = S.nt2, ro = S.ro;
  const bool tail = Ka % 32 != 0;
  bf16* wsm = reinterpret_cast<bf16*>(smem + L.ws);  // [stacked row][kLdW]: the slice's 128 columns, swizzled
  bf16* xas = reinterpret_cast<bf16*>(smem + L.xa);
  bf16* hs = reinterpret_cast<bf16*>(smem + L.hid);
  float* part = reinterpret_cast<float*>(smem + L.part);  // [row][ldp]: this CTA's share of s
  float* red = reinterpret_cast<float*>(smem + L.red);    // [epilogue row][ldp]: s summed over the cluster
  float* xres = reinterpret_cast<float*>(smem + L.xres);  // [epilogue row][C]: residual rows
  float* ep = reinterpret_cast<float*>(smem + L.ep);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + L.bar);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q4 = lane & 3;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank()), tile = static_cast<int>(blockIdx.x) / cs;
  const int row0 = tile * TM, hc0 = rank * kHC;
#ifdef SAV_MLP_BLOCK_TRACE
  long long stamps[16] = {};
#endif
  MLP_STAMP(0);
  const uint64_t tl_entry = p.tl.recs && tid == 0 ? timeline_now() : 0;

  // ---- 0. weights before the dependent-launch wait; then the tile's rows ----
  ptx::pdl_trigger();
  // fc1 split: warp w owns the slice's column tiles 2 (w % 8) and 2 (w % 8) + 1 over one half of Ka's k blocks
  // (w / 8: the first ceil(KB1 / 2) blocks, or the rest and the tail), so each A fragment serves two tiles
  const int kh = warp / 8, pair = warp % 8;
  const int KBh = (KB1 + 1) / 2, kb0 = kh * KBh, kb1 = kh ? KB1 : KBh;
  uint4 w1[2][kMaxKBh];
  uint2 w1t[2] = {make_uint2(0u, 0u), make_uint2(0u, 0u)};
  // a lambda called once: written inline, the same loads compile to other code (the 16-row form: 124 registers, not
  // 122)
  auto load_w1 = [&]() {
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int n = hc0 + (2 * pair + t) * 8 + g;
#pragma unroll
      for (int j = 0; j < kMaxKBh; ++j)
        if (kb0 + j < kb1) w1[t][j] = frag::w_fragment(p.wa, n, Ka, kb0 + j);
      if (tail && kh) w1t[t] = frag::w_tail_fragment(p.wa, n, Ka, KB1 * 32);
    }
  };
  load_w1();
  // the proj form: every CTA computes the whole proj of its tile, warp w column tiles w (weights in registers) and
  // 12 + w (weights in shared memory, bulk-copied below), each over all of C's k blocks (the attention kernel's order)
  constexpr int kPKB = kProj ? kMaxC / 32 : 1;
  const int KBp = C / 32, srows = kProj ? proj_smem_rows(C) : 0;
  bf16* wps = reinterpret_cast<bf16*>(smem + L.wps);
  uint4 wpf[kPKB];
  if constexpr (kProj)
#pragma unroll
    for (int kb = 0; kb < kPKB; ++kb)
      wpf[kb] = warp < kProjRegTiles && warp < C / 8 && kb < KBp ? frag::w_fragment(p.wp, warp * 8 + g, C, kb)
                                                                 : make_uint4(0, 0, 0, 0);
  const int wrows = nt2 * 8;  // stacked rows used: 2C + 4 rounded up to 8 (zero rows past 2C + 4)
  if (tid == 0) {
    ptx::mbar_init(bar, 1);
    ptx::mbar_arrive_expect_tx(bar,
                               unsigned(wrows) * unsigned(kHC * sizeof(bf16)) + unsigned(srows * C * sizeof(bf16)));
  }
  for (int c = tid * 4; c < C; c += kThreads * 4) {
    ptx::cp_async16(ep + c, p.b0 + c);
    ptx::cp_async16(ep + C + c, p.b1 + c);
    ptx::cp_async16(ep + 2 * C + c, p.ln_w + c);
    ptx::cp_async16(ep + 3 * C + c, p.ln_b + c);
  }
  if (tid < 2) ptx::cp_async4(ep + 4 * C + tid, p.br + tid);
  float* ep2 = reinterpret_cast<float*>(smem + L.ep2);  // the proj form: bp, ln2_w, ln2_b, wr (2C), br1 (2)
  if constexpr (kProj) ham::stage_row_epilogue(ep2, C, p.bp, p.ln2_w, p.ln2_b, p.wr, p.br1, tid, kThreads);
  ptx::cp_async_commit();
  __syncthreads();  // the barrier is initialised and armed before any copy signals it
  for (int r = tid; r < wrows; r += kThreads)
    if (r & 1)  // the 64-byte k blocks of odd rows swapped in pairs (block kb at kb ^ 1)
      for (int kb = 0; kb < kHC / 32; ++kb)
        ptx::bulk_copy_g2s(wsm + r * kLdW + (kb ^ 1) * 32, p.ws + int64_t(r) * S.F + hc0 + kb * 32, 64u, bar);
    else
      ptx::bulk_copy_g2s(wsm + r * kLdW, p.ws + int64_t(r) * S.F + hc0, unsigned(kHC * sizeof(bf16)), bar);
  for (int r = tid; r < srows; r += kThreads)  // the proj form: proj weight rows 96 + r
    ptx::bulk_copy_g2s(wps + r * (C + 32), p.wp + int64_t(8 * kProjRegTiles + r) * C, unsigned(C * sizeof(bf16)), bar);

  MLP_STAMP(1);
  ptx::pdl_wait();
  const uint64_t tl_waited = p.tl.recs && tid == 0 ? timeline_now() : 0;
  MLP_STAMP(2);
  float* xin = reinterpret_cast<float*>(smem + L.xin);  // the proj form: the tile's residual rows, then x + proj
  if constexpr (kProj) {
    // ---- 0'. the proj form: x + proj of the attention output, then LayerNorm 2 + router + mask into xas (as the
    // attention kernel's phases 5 and 6, the same arithmetic and order) ----
    bf16* aos = reinterpret_cast<bf16*>(smem + L.aos);
    const int lda = C + 32;  // 16-byte A loads of rows g and g + 1 in distinct banks
    ptx::cp_async_rows(
        aos, lda, TM, C, p.ao, [&](int r) { return row0 + r < p.M ? p.ao + int64_t(row0 + r) * p.ldao : nullptr; }, tid,
        kThreads);
    ptx::cp_async_commit();
    ptx::cp_async_rows(
        xin, C, TM, C, p.x, [&](int r) { return row0 + r < p.M ? p.x + int64_t(row0 + r) * p.ldx : nullptr; }, tid,
        kThreads);
    ptx::cp_async_commit();  // the residual rows: needed after the proj
    ptx::cp_async_wait<1>();
    __syncthreads();
    MLP_STAMP(12);
    // the proj rows (TM x C f32), C + 8 apart (8 mod 32 words): the accumulators' float2 stores of rows g = 0 .. 7 in
    // distinct banks (C apart, a multiple of 32, they took 8 wavefronts, not 2); part holds TM x ldp >= TM (C + 8)
    float* xp = part;
    const int ldxp = C + 8;
    auto emit = [&](int nt, const float(&acc)[4]) {
      const int c = nt * 8 + 2 * q4;
      *reinterpret_cast<float2*>(xp + g * ldxp + c) = make_float2(acc[0], acc[1]);
      *reinterpret_cast<float2*>(xp + (g + 8) * ldxp + c) = make_float2(acc[2], acc[3]);
    };
    // warp w: column tile w (register weights) and, when there is one, 12 + w (shared memory weights, waited for
    // first: they came with the fc2 slice while the previous kernel ran); the two chains interleaved, each A fragment
    // read once for both
    const bool reg_tile = warp < kProjRegTiles && warp < C / 8, smem_tile = 8 * warp < srows;
    MLP_STAMP(13);
    if (smem_tile) ptx::mbar_wait_parity(bar, 0);  // the proj rows in shared memory (and the fc2 slice)
    MLP_STAMP(14);
    if (reg_tile && !MLP_SKIP(256)) {
      float acc[2][4] = {};
#pragma unroll
      for (int kb = 0; kb < kPKB; ++kb)
        if (kb < KBp) {
          const uint4 ra = frag::a_fragment(aos, lda, g, kb), rb = frag::a_fragment(aos, lda, g + 8, kb);
          mma_kblock(acc[0], ra, rb, wpf[kb]);
          if (smem_tile) mma_kblock(acc[1], ra, rb, frag::a_fragment(wps, C + 32, warp * 8 + g, kb));
        }
      emit(warp, acc[0]);
      if (smem_tile) emit(kProjRegTiles + warp, acc[1]);
    }
    ptx::cp_async_wait<0>();
    __syncthreads();
    MLP_STAMP(15);
    constexpr int kG1 = 16, kS1 = kMaxC / 64;  // as the attention kernel's epilogue (kS: the same bits)
    if (tid < TM * kG1 && !MLP_SKIP(512)) {
      const int i = tid / kG1, lane16 = tid % kG1;
      const bool valid = row0 + i < p.M;
      int8_t* ch = valid && rank == 0 && p.choice1 ? p.choice1 + row0 + i : nullptr;
      moe_rows::linear_residual_ln_route_mask<kG1, kS1>(xp + i * ldxp, ep2, xin + i * C, xin + i * C, valid, lane16, C,
                                                        Ka, p.eps, ep2 + C, ep2 + 2 * C, ep2 + 3 * C, ep2 + 5 * C,
                                                        xas + i * ldxs, ch);
      if (!valid)  // zeros past M, as the copy of x_aug rows
        for (int c = lane16 * 8; c < Ka; c += kG1 * 8)
          *reinterpret_cast<uint4*>(xas + i * ldxs + c) = make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
  } else {
    ptx::cp_async_rows(
        xas, ldxs, TM, Ka, p.xa, [&](int r) { return row0 + r < p.M ? p.xa + int64_t(row0 + r) * p.ldxa : nullptr; },
        tid, kThreads);
    ptx::cp_async_commit();
    ptx::cp_async_rows(
        xres, C, ro, C, p.x,
        [&](int j) {  // epilogue row j: tile row rank + cs j
          const int r = rank + cs * j;
          return r < TM && row0 + r < p.M ? p.x + int64_t(row0 + r) * p.ldx : nullptr;
        },
        tid, kThreads);
    ptx::cp_async_commit();  // the residual rows: needed in phase 3 only
    ptx::cp_async_wait<1>();
    __syncthreads();
  }
  MLP_STAMP(3);

  // ---- 1. fc1 + GELU: the two k halves' sums meet in shared memory (the fc2 partial rows, unused yet) ----
  {
    float acc[2][kMB][4] = {};
#pragma unroll
    for (int j = 0; j < kMaxKBh; ++j)
      if (kb0 + j < kb1 && !MLP_SKIP(1024))
#pragma unroll
        for (int mb = 0; mb < kMB; ++mb) {
          const uint4 ra = frag::a_fragment(xas, ldxs, mb * 16 + g, kb0 + j);
          const uint4 rb = frag::a_fragment(xas, ldxs, mb * 16 + g + 8, kb0 + j);
#pragma unroll
          for (int t = 0; t < 2; ++t) mma_kblock(acc[t][mb], ra, rb, w1[t][j]);
        }
    if (tail && kh)
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
        for (int t = 0; t < 2; ++t) mma_ktail(acc[t][mb], xas + mb * 16 * ldxs, ldxs, KB1 * 32, w1t[t]);
    // warp (kh, pair) finishes tile kh of its pair (first half + second half, GELU, bf16): it hands its sums of the
    // other tile to the partner warp (1 - kh, pair) and takes the partner's sums of its own, so both k halves share
    // the epilogue
    auto xch = [&](int mb, int t, int i) -> float& { return part[(((pair * kMB + mb) * 2 + t) * 4 + i) * 32 + lane]; };
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
      for (int t = 0; t < 2; ++t)
        if (t != kh)
#pragma unroll
          for (int i = 0; i < 4; ++i) xch(mb, t, i) = acc[t][mb][i];
    __syncthreads();
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        if (t != kh) continue;
        const int c = (2 * pair + t) * 8 + 2 * q4;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = mb * 16 + g + 8 * half;
          const float v0 = __fadd_rn(acc[t][mb][2 * half], xch(mb, t, 2 * half));  // the halves' sum: commutative
          const float v1 = __fadd_rn(acc[t][mb][2 * half + 1], xch(mb, t, 2 * half + 1));
          const __nv_bfloat162 h2 = __floats2bfloat162_rn(gelu_tanh(v0), gelu_tanh(v1));
          *reinterpret_cast<__nv_bfloat162*>(hs + r * kLdH + c) = h2;
          if (p.hid_out && row0 + r < p.M)
            *reinterpret_cast<__nv_bfloat162*>(p.hid_out + int64_t(row0 + r) * S.F + hc0 + c) = h2;
        }
      }
  }
  __syncthreads();

  // ---- 2. fc2: this slice's share of s, column tiles warp, warp + 16, ... ----
  MLP_STAMP(4);
  ptx::mbar_wait_parity(bar, 0);  // the fc2 weight slice
  MLP_STAMP(5);
  {
    constexpr int KB2 = kHC / 32;
    uint4 ha[kMB][KB2][2];  // the lane's A fragments of the hidden slice, read once for every column tile
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
      for (int kb = 0; kb < KB2; ++kb)
#pragma unroll
        for (int half = 0; half < 2; ++half) ha[mb][kb][half] = frag::a_fragment(hs, kLdH, mb * 16 + g + 8 * half, kb);
    float acc[kMaxT2][kMB][4] = {};
#pragma unroll
    for (int i = 0; i < kMaxT2; ++i) {
      const int nt = warp + kWarps * i;
      if (nt < nt2 && !MLP_SKIP(2048))
#pragma unroll
        for (int kb = 0; kb < KB2; ++kb) {
          const uint4 w = frag::a_fragment(wsm, kLdW, nt * 8 + g, kb ^ (g & 1));  // row nt * 8 + g: odd rows swizzled
#pragma unroll
          for (int mb = 0; mb < kMB; ++mb) mma_kblock(acc[i][mb], ha[mb][kb][0], ha[mb][kb][1], w);
        }
    }
#pragma unroll
    for (int i = 0; i < kMaxT2; ++i) {
      const int nt = warp + kWarps * i;
      if (nt >= nt2) break;
      const int c = nt * 8 + 2 * q4;
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
        for (int half = 0; half < 2; ++half)
          *reinterpret_cast<float2*>(part + (mb * 16 + g + 8 * half) * ldp + c) =
              make_float2(acc[i][mb][2 * half], acc[i][mb][2 * half + 1]);
    }
  }
  MLP_STAMP(6);
  if (!MLP_SKIP(4096)) {
    ptx::cluster_arrive_release();
    ptx::cluster_wait_acquire();
  }
  MLP_STAMP(7);

  // ---- 3. the CTA's rows rank, rank + cs, ...: the partials summed in rank order, then the epilogue ----
  const int q4s = nt2 * 2;  // float4 per partial row
  for (int i = tid; i < (MLP_SKIP(4096) ? 0 : ro * q4s); i += kThreads) {
    const int j = i / q4s, c = (i - j * q4s) * 4, r = rank + cs * j;
    if (r >= TM) continue;
    *reinterpret_cast<float4*>(red + j * ldp + c) = ptx::cluster_sum4<kMaxCluster>(cluster, part, r * ldp + c, cs);
  }
  MLP_STAMP(10);
  // this CTA's remote reads are done (their values are summed and stored above, so they have returned): a relaxed
  // arrive, no release fence; waited for before exit
  ptx::cluster_arrive_relaxed();
  ptx::cp_async_wait<0>();  // the residual rows (the proj form waited for them before LayerNorm 2)
  __syncthreads();
  MLP_STAMP(11);
  if (tid < (ro + 1) / 2 * 2 * kG && !MLP_SKIP(8192)) {  // whole warps: the row statistics shuffle over all 32 lanes
    const int j = tid / kG, r = rank + cs * j, n = row0 + r;
    const bool valid = j < ro && r < TM && n < p.M;
    const int64_t gr = valid ? n : 0;
    const float* x_in = kProj ? xin + (r < TM ? r : 0) * C : xres + j * C;
    moe_rows::epilogue_residual_ln<kG, kS>(red + j * ldp, x_in, p.x + gr * p.ldx, p.xn + gr * p.ldxn,
                                           p.choice ? p.choice + gr : nullptr, valid, tid % kG, C, p.gate, p.eps, ep,
                                           ep + C, ep + 4 * C, ep + 2 * C, ep + 3 * C);
  }
  MLP_STAMP(8);
  ptx::cluster_wait_acquire();  // no CTA leaves while another reads its partial
  MLP_STAMP(9);
  if (tid == 0) timeline_record(p.tl, kTimelineMlpBlock, tl_entry, tl_waited);
#ifdef SAV_MLP_BLOCK_TRACE
  if (tid == 0 && (blockIdx.x == 0 || blockIdx.x == gridDim.x - 1)) {
    printf(
        "[mlp_block trace] cta %d cycles: issue %lld pdl-wait %lld xa %lld fc1 %lld ws-wait %lld fc2 %lld cluster-bar "
        "%lld reduce+epi %lld (sum %lld sync %lld) exit-bar %lld total %lld\n",
        int(blockIdx.x), stamps[1] - stamps[0], stamps[2] - stamps[1], stamps[3] - stamps[2], stamps[4] - stamps[3],
        stamps[5] - stamps[4], stamps[6] - stamps[5], stamps[7] - stamps[6], stamps[8] - stamps[7],
        stamps[10] - stamps[7], stamps[11] - stamps[10], stamps[9] - stamps[8], stamps[9] - stamps[0]);
    if (kProj)
      printf("[mlp_block trace] cta %d proj form: loads %lld smem weights wait %lld proj + sync %lld ln2 %lld\n",
             int(blockIdx.x), stamps[12] - stamps[2], stamps[14] - stamps[13], stamps[15] - stamps[14],
             stamps[3] - stamps[15]);
  }
#endif
#endif
}

MlpParams mlp_dims(int M, int C, int F, int tm) {
  MlpParams p{};
  p.M = M, p.s = mlp_shape(C, F, tm);
  return p;
}

// The instance for a tile size, form and model: DeiT-Tiny's sizes (C 192, F 768) in the proj form have their own,
// with the sizes as constants (the batch-1 forward's MLP half); every other shape the generic one.
using MlpKernel = void (*)(MlpParams);
MlpKernel mlp_kernel_for(int tm, bool proj, int C, int F) {
  constexpr int kTinyC = 192, kTinyF = 768;  // DeiT-Tiny
  if (proj) return C == kTinyC && F == kTinyF ? mlp_block_kernel<1, true, kTinyC, kTinyF> : mlp_block_kernel<1, true>;
  return tm == 16 ? mlp_block_kernel<1, false> : mlp_block_kernel<2, false>;
}

bool shape_ok(int M, int C, int F) {
  return M >= 1 && C >= 8 && C <= kMaxC && C % 8 == 0 && F >= kHC && F % kHC == 0 && F / kHC <= kMaxCluster;
}

void launch_mlp(MlpParams& p, int tm, bool proj, const char* what, cudaStream_t stream) {
  p.tl = timeline_sink();
#ifdef SAV_ABLATION
  p.ablate = ablation_mask();
#endif
  const int64_t tiles = (int64_t(p.M) + tm - 1) / tm;
  SAV_CHECK(tiles * p.s.cs <= (int64_t(1) << 31) - 1, what << ": M too large");
  const size_t smem = mlp_smem(p.s, tm, proj).total;
  launch_dependent(mlp_kernel_for(tm, proj, p.s.C, p.s.F), dim3(static_cast<unsigned>(tiles * p.s.cs)), dim3(kThreads),
                   smem, p.s.cs, stream, p);
}

bool smem_and_cluster_fit(int M, int C, int F, int tm, bool proj) {
  const size_t smem = mlp_smem(mlp_shape(C, F, tm), tm, proj).total;
  if (!device_available()) return smem <= 227 * 1024;
  return device_cc_major() >= 9 && smem <= size_t(max_smem_per_block()) &&
         cluster_fits(reinterpret_cast<const void*>(mlp_kernel_for(tm, proj, C, F)), F / kHC, kThreads, smem, false);
}

}  // namespace

int mlp_block_tile_rows(int M) {
  // 16-row tiles while their clusters take at most about half the SMs beside the attention kernel; else 32
  return M <= 16 * 16 ? 16 : 32;
}

bool mlp_block_supports(int M, int C, int F, int tile_rows) {
  if (!shape_ok(M, C, F)) return false;
  const int tm = tile_rows == 0 ? mlp_block_tile_rows(M) : tile_rows;
  if (tm != 16 && tm != 32) return false;
  return smem_and_cluster_fit(M, C, F, tm, false);
}

bool mlp_block_proj_supports(int M, int C, int F) {
  return shape_ok(M, C, F) && C % 32 == 0 && smem_and_cluster_fit(M, C, F, 16, true);
}

namespace {

// The checks and parameters both launchers share (x, the masked fc1's W_aug, the stacked fc2, its epilogue and the
// next LayerNorm), after the caller's shape check; M >= 1.
MlpParams mlp_params(const char* what, float* x, int ldx, int8_t* choice, const bf16* wa, const bf16* ws,
                     const float* b0, const float* b1, const float* br, int M, int C, int F, MoeGate gate, bf16* xn,
                     int ldxn, const float* ln_w, const float* ln_b, float eps, bf16* hid_out, int tm) {
  SAV_CHECK(x && wa && ws && b0 && b1 && br && xn && ln_w && ln_b, what << ": null pointer");
  SAV_CHECK(ldx >= C && ldx % 4 == 0 && ldxn >= C && ldxn % 4 == 0,
            what << ": row strides ldx=" << ldx << " ldxn=" << ldxn);
  SAV_CHECK(aligned16(x) && aligned16(wa) && aligned16(ws) && aligned16(b0) && aligned16(b1) && aligned16(ln_w) &&
                aligned16(ln_b) && reinterpret_cast<uintptr_t>(br) % 4 == 0 &&
                reinterpret_cast<uintptr_t>(xn) % 8 == 0 && reinterpret_cast<uintptr_t>(hid_out) % 4 == 0,
            what << ": misaligned pointers");
  MlpParams p = mlp_dims(M, C, F, tm);
  p.x = x, p.ldx = ldx, p.choice = choice, p.wa = wa, p.ws = ws;
  p.b0 = b0, p.b1 = b1, p.br = br, p.xn = xn, p.ldxn = ldxn, p.ln_w = ln_w, p.ln_b = ln_b, p.eps = eps;
  p.gate = gate, p.hid_out = hid_out;
  return p;
}

}  // namespace

void mlp_block_forward(float* x, int ldx, int8_t* choice, const bf16* xa, int ldxa, const bf16* wa, const bf16* ws,
                       const float* b0, const float* b1, const float* br, int M, int C, int F, MoeGate gate, bf16* xn,
                       int ldxn, const float* ln_w, const float* ln_b, float eps, cudaStream_t stream, int tile_rows,
                       bf16* hid_out) {
  const char* what = "mlp block";
  const int tm = tile_rows == 0 ? mlp_block_tile_rows(std::max(M, 1)) : tile_rows;
  SAV_CHECK(mlp_block_supports(std::max(M, 1), C, F, tm) && M >= 0,
            what << ": M=" << M << " C=" << C << " F=" << F << " tile rows " << tm
                 << " not supported (C % 8 == 0, C <= 192, F a multiple of 128 up to 1024, tiles of 16 or 32 rows)");
  MlpParams p = mlp_params(what, x, ldx, choice, wa, ws, b0, b1, br, std::max(M, 1), C, F, gate, xn, ldxn, ln_w, ln_b,
                           eps, hid_out, tm);
  SAV_CHECK(xa && aligned16(xa), what << ": null or misaligned x_aug");
  SAV_CHECK(ldxa >= p.s.Ka && ldxa % 8 == 0, what << ": row stride ldxa=" << ldxa);
  if (M == 0) return;
  p.xa = xa, p.ldxa = ldxa;
  launch_mlp(p, tm, false, what, stream);
}

void mlp_block_proj_forward(float* x, int ldx, const bf16* ao, int ldao, const bf16* wp, const float* bp,
                            const float* ln2_w, const float* ln2_b, const float* wr, const float* br1, int8_t* choice1,
                            const bf16* wa, const bf16* ws, const float* b0, const float* b1, const float* br,
                            int8_t* choice, int M, int C, int F, MoeGate gate, bf16* xn, int ldxn, const float* ln_w,
                            const float* ln_b, float eps, cudaStream_t stream, bf16* hid_out) {
  const char* what = "mlp block (proj form)";
  SAV_CHECK(M >= 0 && mlp_block_proj_supports(std::max(M, 1), C, F),
            what << ": M=" << M << " C=" << C << " F=" << F
                 << " not supported (C % 32 == 0, C <= 192, F a multiple of 128 up to 1024)");
  MlpParams p = mlp_params(what, x, ldx, choice, wa, ws, b0, b1, br, std::max(M, 1), C, F, gate, xn, ldxn, ln_w, ln_b,
                           eps, hid_out, 16);
  SAV_CHECK(ao && wp && bp && ln2_w && ln2_b && wr && br1, what << ": null pointer");
  SAV_CHECK(ldao >= C && ldao % 8 == 0, what << ": row stride ldao=" << ldao);
  SAV_CHECK(aligned16(ao) && aligned16(wp) && aligned16(bp) && aligned16(ln2_w) && aligned16(ln2_b) && aligned16(wr) &&
                reinterpret_cast<uintptr_t>(br1) % 4 == 0,
            what << ": misaligned pointers");
  if (M == 0) return;
  p.ao = ao, p.ldao = ldao, p.wp = wp, p.bp = bp, p.ln2_w = ln2_w, p.ln2_b = ln2_b, p.wr = wr, p.br1 = br1;
  p.choice1 = choice1;
  launch_mlp(p, 16, true, what, stream);
}

}  // namespace sav::cuda
