// The attention half of a Hamming ViT block at small batch as ONE kernel (ops.h hamming_block_forward): to_qk and
// to_v, the Hamming attention (METHOD.md section 1), proj, the residual, LayerNorm 2 and the masked fc1's router and
// mask. Spec: the composition of gemm (bf16 products), hamming_attention_forward_ld and moe_ln_route_mask_forward.
//
// Work split: one thread-block cluster per image, one CTA per 16-token tile (tiles = ceil(N / 16) CTAs: a non-portable
// cluster size above 8; shared memory holds the whole image's v rows, so N <= 208), 16 warps; every CTA handles ALL
// heads of its tile (head size 64, at most 3 heads: DeiT-Tiny). So each token is hashed once, and the proj, which needs
// every head of a row, stays inside the CTA. What crosses CTAs:
//   sigma: each CTA writes its tile's sum of D per head into every CTA (8 bytes each), then a cluster barrier; every
//     CTA adds the tiles' sums in tile order, as the per-head kernel (ham::ksh_sigma), so the codes are the same bits;
//   the v rows: each CTA writes its tile's v rows to global memory (v_scratch, the image's rows padded to whole tiles)
//     before that barrier; after it, every CTA bulk-copies the other tiles' rows (one copy per tile, an mbarrier)
//     into its own shared memory, through L2, while it computes its codes. (Pushing them through distributed shared
//     memory instead moved about 20 bytes per cycle per SM: 4k cycles for the 77 KB each CTA receives.)
//   the codes: each CTA sends its tile's code words into every other CTA after a __syncthreads, 16 bytes per
//     st.async, which counts them on the receiver's mbarrier (cbar); the receiver waits for its bytes. (A second
//     cluster barrier after plain remote stores, as before, took 2.3% longer per forward: bench/RESULTS.md session 17.)
// Then every CTA computes the whole KV = h^T V over the image's tokens by itself (the same sums in every CTA: KV^T =
// v^T h, the codes expanded to bf16 0/1 rows over the dead hash weights, both operands by ldmatrix), scales by 1/pi and
// splits it in three bf16 parts as the per-head kernel. The 9-tap conv reads its neighbour rows from the same v rows
// (zero rows before and after the image). After the codes no CTA touches another's shared memory (a CTA leaves only
// after every other tile's codes reached it).
//
// Products: bf16 mma.sync m16n8k16, f32 accumulation. The to_qk / to_v and proj weights are not staged: each lane
// loads 16 bytes of its weight row per 32-wide k block straight from global memory into registers, the to_qk / to_v
// ones before the dependent-launch wait (they do not depend on the previous kernel), the proj ones after the KV
// product (in flight during z and the norms; the warps without a KV task issue theirs first); within a k block the k
// order is permuted (lane q4 holds k 8 q4 .. 8 q4 + 7 of its A rows and weight row: the first mma takes 8 q4 ..
// 8 q4 + 3, the second 8 q4 + 4 .. 8 q4 + 7), the same for both operands, so both are single 16-byte loads (A rows
// C + 32 bf16 apart: conflict-free).
//
// Phases (a __syncthreads, a cluster barrier or an mbarrier wait between each):
//  0. the epilogue's vectors by cp.async, the to_qk / to_v weight fragments, then the heads' prepared hash weights by
//     one bulk copy (waited for in phase 2); the v and codes mbarriers, zero codes and the conv's zero rows; after the
//     dependent-launch wait, the tile's LayerNorm-1 rows and its residual rows (waited for in phase 7);
//  1. qk | v (16 x 2C) = xn W^T + b, rounded to bf16 (as the cuBLASLt product's bf16 epilogue), rows past N zero; v
//     into the tile's rows of the image's v rows in shared memory and into v_scratch;
//  2. the hash of the tile: the distances a warp per (head, anchor tile) (ham::ksh_dots, ksh_d), the sums of D a warp
//     per head (ksh_dsum), the sigma exchange (cluster barrier), the other tiles' v rows requested, the codes a warp
//     per (head, 8 bits) (ksh_codes), sent to every other CTA; the wait for the other tiles' codes;
//  3. KV: the codes as bf16 rows, then KV^T a warp per (head, 16 columns, 16 bits) over all tokens, / pi, split; the
//     proj weight fragments issued;
//  4. z = h KV + 0.5 v, a warp per (head, 8 columns); ||z|| per (row, head): the column tiles' double sums in order;
//     out = z / max(||z||, eps) + the 9 taps of v, bf16 (the attention output);
//  5. proj (16 x C), a warp per 8 output columns (two for C > 128);
//  6. x += proj + b, then LayerNorm 2 + router + mask of the tile's rows (moe_rows::linear_residual_ln_route_mask: the
//     row arithmetic of moe_ln_route_mask_forward).
// Deterministic: every sum has a fixed order and no atomics, so reruns and graph replays give the same bits, and an
// image of a batch the same bits as alone. Against the per-head kernel on the same qk | v: the same codes; KV summed
// in another order (f32 rounding).
#include <cooperative_groups.h>

#include <algorithm>

#include "ops/cuda/frag.cuh"
#include "ops/cuda/hamming_common.cuh"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/moe_rows.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/ptx.cuh"

namespace sav::cuda {

namespace {

using namespace ham;
using frag::mma_kblock;
using frag::w_fragment;
namespace cg = cooperative_groups;

constexpr int kThreads = 512;  // 16 warps
constexpr int kWarps = kThreads / 32;
constexpr int kD = 64;           // head size
constexpr int kMaxH = 3;         // heads (C = 64 H <= 192)
constexpr int kMaxTiles = 16;    // N <= 256: the largest cluster
constexpr int kLdD = kMaxM + 8;  // floats per row of the distances in shared memory

// SAV_ABLATION (a diagnostic build only): the phases whose bits are set in the environment variable SAV_ABLATE are
// skipped (1 qkv product, 2 distances, 4 sigma barrier, 8 codes, 16 codes exchange + wait, 32 KV, 64 z, 128 norms +
// conv + output); the results are wrong, only the timing means something: what each phase adds to a forward.
#ifdef SAV_ABLATION
#define BLK_SKIP(bit) ((p.ablate & (bit)) != 0)
#else
#define BLK_SKIP(bit) false
#endif

// SAV_HAM_BLOCK_TRACE (a diagnostic build only): thread 0 of the first and the last CTA of image 0 prints the clock64
// cycles of each phase.
#ifdef SAV_HAM_BLOCK_TRACE
#define BLK_STAMP(i) (tid == 0 ? (void)(stamps[i] = clock64()) : (void)0)
// the phases both forms run (stamps 0 .. 11, 16), one line
__device__ void blk_trace_attention(const char* form, int rank, const long long* st) {
  printf(
      "[ham_block trace] rank %d %s cycles: stage-issue %lld wait+xs %lld qkv+copies %lld dist %lld sigma-bar %lld "
      "codes %lld codes-bar %lld v-wait %lld expand %lld kv-mma %lld z %lld norm+emit %lld\n",
      rank, form, st[1] - st[0], st[2] - st[1], st[3] - st[2], st[4] - st[3], st[5] - st[4], st[6] - st[5],
      st[7] - st[6], st[8] - st[7], st[16] - st[8], st[9] - st[16], st[10] - st[9], st[11] - st[10]);
}
#else
#define BLK_STAMP(i) ((void)0)
#endif

// The sizes that follow from (N, C, H, nbits, m): runtime values in the generic instances, compile-time constants in
// the instance specialised for DeiT-Tiny's attention (blk_kernel_for), where the index arithmetic, the loop bounds and
// the shared-memory layout fold into the code.
struct BlkShape {
  int N, C, H, nbits, m, tiles, mt, bt, mb, ldk;
};
__host__ __device__ constexpr BlkShape blk_shape(int N, int C, int H, int nbits, int m) {
  return BlkShape{
      N, C, H, nbits, m, (N + 15) / 16, (m + 7) / 8, (nbits + 7) / 8, (nbits + 15) / 16, 16 * ((nbits + 15) / 16) + 8};
}
struct BlkParams {
  float* x;  // residual rows (B N, ldx), updated
  const bf16* xn;
  const bf16 *wqkv, *bqkv;  // (2C, C), (2C): rows [0, C) to_qk, [C, 2C) to_v
  const unsigned char* prep;
  const float* conv_w;
  const bf16* wp;
  const float *bp, *ln_w, *ln_b, *wr, *br;
  bf16* xa;
  int8_t* choice;
  bf16* vg;       // the v rows of every image, (B T, C + 8), T = 16 tiles: the other CTAs copy them from here
  bf16* qkv_out;  // optional: the qk | v rows (B N, 2C)
  bf16* ao_out;   // optional: the attention output (B N, C)
  float eps;
  int ldx, ldxn, ldxa, Ka;
  BlkShape s;       // the sizes
  TimelineSink tl;  // common.h: the kernel timeline (a diagnostic; empty: nothing recorded)
#ifdef SAV_ABLATION
  unsigned ablate;
#endif
};

struct BlkSmem {
  size_t bar, vbar, cbar, prep, xs, qs, vall, dbuf, codes, sig, kvt, zsq, inv, xp, xin, ep, total;
};
__host__ __device__ constexpr BlkSmem blk_smem(const BlkShape& p) {
  BlkSmem s{};
  const size_t C = size_t(p.C), H = size_t(p.H);
  size_t o = 0;
  const size_t T = 16 * size_t(p.tiles);  // the image's token rows, padded to whole tiles
  s.bar = o, o = align16(o + sizeof(uint64_t));
  s.vbar = o, o = align16(o + sizeof(uint64_t));
  s.cbar = o, o = align16(o + sizeof(uint64_t));
  const size_t hT = H * 16 * p.mb * (T + 8) * sizeof(bf16);  // phase 3's bit rows, over the dead hash weights
  const size_t prep = H * prep_layout(kD, p.bt).bytes;
  s.prep = o, o = align16(o + (prep > hT ? prep : hT));
  s.xs = o, o = align16(o + 16 * (C + 32) * sizeof(bf16));  // phase 1's LayerNorm rows, then the attention output
  s.qs = o, o = align16(o + 16 * (C + 8) * sizeof(bf16));
  s.vall = o, o = align16(o + (T + 2 * kPad) * (C + 8) * sizeof(bf16));
  s.dbuf = o, o = align16(o + H * 16 * kLdD * sizeof(float));
  s.codes = o, o = align16(o + H * T * sizeof(unsigned long long));
  s.sig = o, o = align16(o + kMaxTiles * H * sizeof(double));
  s.kvt = o, o = align16(o + H * 3 * kD * p.ldk * sizeof(bf16));
  s.zsq = o, o = align16(o + 16 * H * (kD / 8) * sizeof(double));
  s.inv = o, o = align16(o + 16 * H * sizeof(float));
  s.xp = o, o = align16(o + 16 * C * sizeof(float));
  s.xin = o, o = align16(o + 16 * C * sizeof(float));
  s.ep = o, o = align16(o + (5 * C + 4 + H * kTaps) * sizeof(float));  // bp, ln_w, ln_b, wr (2C), br (2), pad, conv
  s.total = o;
  return s;
}

// kFull: the whole attention half; else up to the attention output (p.ao_out), proj and what follows left to
// mlp_block_proj_forward.
// kN, kM, kBits: the tokens, anchors and hash bits the instance is specialised for (0: read from p).
template <int kH, bool kFull, int kN = 0, int kM = 0, int kBits = 0>
__global__ void __launch_bounds__(kThreads, 1) ham_block_kernel(const __grid_constant__ BlkParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // built for sm_90; the launcher refuses older devices
#else
  static_assert((kN == 0) == (kM == 0) && (kN == 0) == (kBits == 0), "specialised for all three sizes or none");
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr BlkShape kFixed = blk_shape(kN > 0 ? kN : 16, kD * kH, kH, kBits > 0 ? kBits : 1, kM > 0 ? kM : 1);
  const BlkShape S = kN > 0 ? kFixed : p.s;
  const BlkSmem L = blk_smem(S);
  const PrepLayout P = prep_layout(kD, S.bt);
  constexpr int C = kD * kH, KB = C / 32, ldxs = C + 32, ldq = C + 8, NTh = kD / 8;
  constexpr unsigned kVTileBytes = 16 * ldq * sizeof(bf16);  // a tile's v rows (ldq apart: 16-byte multiple)
  constexpr int kQkvTiles = 2 * C / 8 / kWarps;              // to_qk | to_v column tiles per warp (= kH)
  constexpr int kProjTiles = (C / 8 + kWarps - 1) / kWarps;  // proj column tiles per warp
  bf16* xs = reinterpret_cast<bf16*>(smem + L.xs);
  bf16* qs = reinterpret_cast<bf16*>(smem + L.qs);
  const int T = 16 * S.tiles;
  bf16* vall = reinterpret_cast<bf16*>(smem + L.vall);    // storage row r = the image's token row r - kPad
  float* dbuf = reinterpret_cast<float*>(smem + L.dbuf);  // [head][row][anchor]: D
  unsigned long long* codes = reinterpret_cast<unsigned long long*>(smem + L.codes);  // [head][image token row]
  double* sig = reinterpret_cast<double*>(smem + L.sig);                              // [tile][head]
  bf16* kvt = reinterpret_cast<bf16*>(smem + L.kvt);      // [head][part][column][bit]: KV / pi in three bf16 parts
  double* zsq = reinterpret_cast<double*>(smem + L.zsq);  // [row][head][column tile]
  float* inv = reinterpret_cast<float*>(smem + L.inv);    // [row][head]
  bf16* aos = xs;                                         // the attention output (xs is dead after phase 1)
  float* xp = reinterpret_cast<float*>(smem + L.xp);
  float* xin = reinterpret_cast<float*>(smem + L.xin);
  float* ep = reinterpret_cast<float*>(smem + L.ep);
  const float* conv = ep + 5 * C + 4;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q4 = lane & 3;
  const int tiles = S.tiles, N = S.N;
  const int rank = static_cast<int>(blockIdx.x) % tiles, b = static_cast<int>(blockIdx.x) / tiles;
  const int row0 = rank * 16;
  const int64_t grow0 = int64_t(b) * N + row0;  // the tile's first global row
  cg::cluster_group cluster = cg::this_cluster();
#ifdef SAV_HAM_BLOCK_TRACE
  long long stamps[17] = {};
#endif
  BLK_STAMP(0);
  const uint64_t tl_entry = p.tl.recs && tid == 0 ? timeline_now() : 0;

  // ---- 0. staging; the to_qk / to_v weight fragments ----
  ptx::pdl_trigger();
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + L.bar);  // the hash weights' bulk copy
  if (kFull) stage_row_epilogue(ep, C, p.bp, p.ln_w, p.ln_b, p.wr, p.br, tid, kThreads);
  if (tid < kH * kTaps) ptx::cp_async4(ep + 5 * C + 4 + tid, p.conv_w + tid);
  ptx::cp_async_commit();
  uint64_t* vbar = reinterpret_cast<uint64_t*>(smem + L.vbar);  // the other tiles' v rows (bulk copies, phase 2)
  uint64_t* cbar = reinterpret_cast<uint64_t*>(smem + L.cbar);  // the other tiles' code words (st.async, phase 2)
  if (tid == 0) {
    ptx::mbar_init(vbar, 1);
    ptx::mbar_arrive_expect_tx(vbar, unsigned(tiles - 1) * kVTileBytes);
    ptx::mbar_init(cbar, 1);
    ptx::mbar_arrive_expect_tx(cbar, unsigned(tiles - 1) * kH * 8 * 16);
  }
  for (int i = tid; i < kH * T; i += kThreads) codes[i] = 0ull;  // bytes past the bit tiles stay zero
  for (int i = tid; i < 2 * kPad * ldq / 8; i += kThreads) {     // the conv's zero rows before and after the image
    const int r = i / (ldq / 8), c = (i - r * (ldq / 8)) * 8;
    *reinterpret_cast<uint4*>(vall + (r < kPad ? r : T + r) * ldq + c) = make_uint4(0, 0, 0, 0);
  }
  ptx::cluster_arrive_relaxed();  // runs: remote stores into this CTA may follow the matching wait
  uint4 wq[kQkvTiles][KB];
#pragma unroll
  for (int i = 0; i < kQkvTiles; ++i)
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) wq[i][kb] = w_fragment(p.wqkv, (warp + kWarps * i) * 8 + g, C, kb);
  __nv_bfloat162 bq[kQkvTiles];  // the lane's to_qk / to_v bias pairs: read after the products, an L2 round trip
#pragma unroll
  for (int i = 0; i < kQkvTiles; ++i)
    bq[i] = *reinterpret_cast<const __nv_bfloat162*>(p.bqkv + (warp + kWarps * i) * 8 + 2 * q4);
  if (tid == 0) {  // the heads' hash weights (needed from phase 2 on): one bulk copy, after the weight loads above
    ptx::mbar_init(bar, 1);
    ptx::mbar_arrive_expect_tx(bar, unsigned(kH * P.bytes));
    ptx::bulk_copy_g2s(smem + L.prep, p.prep, unsigned(kH * P.bytes), bar);
  }
  BLK_STAMP(1);
  ptx::pdl_wait();
  const uint64_t tl_waited = p.tl.recs && tid == 0 ? timeline_now() : 0;
  ptx::cp_async_rows(
      xs, ldxs, 16, C, p.xn, [&](int r) { return row0 + r < N ? p.xn + (grow0 + r) * p.ldxn : nullptr; }, tid,
      kThreads);
  ptx::cp_async_commit();
  if (kFull)
    ptx::cp_async_rows(
        xin, C, 16, C, p.x, [&](int r) { return row0 + r < N ? p.x + (grow0 + r) * p.ldx : nullptr; }, tid, kThreads);
  ptx::cp_async_commit();  // the residual rows: needed in phase 6 only
  ptx::cp_async_wait<1>();
  __syncthreads();

  BLK_STAMP(2);
  // ---- 1. qk | v = xn W^T + b (bf16), rows past N zero; v into the tile's rows of vall and into v_scratch (the other
  // CTAs copy it from there after the sigma barrier) ----
  bf16* vt0 = vall + (kPad + row0) * ldq;            // this tile's v rows
  bf16* vg0 = p.vg + (int64_t(b) * T + row0) * ldq;  // ... in global memory (the image's rows at b T)
  {
    float acc[kQkvTiles][4];
#pragma unroll
    for (int i = 0; i < kQkvTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    if (!BLK_SKIP(1))
#pragma unroll
      for (int kb = 0; kb < KB; ++kb)
#pragma unroll
        for (int i = 0; i < kQkvTiles; ++i) mma_kblock(acc[i], xs, ldxs, kb, wq[i][kb]);
#pragma unroll
    for (int i = 0; i < kQkvTiles; ++i) {
      const int c = (warp + kWarps * i) * 8 + 2 * q4;
      const float2 bias = __bfloat1622float2(bq[i]);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = g + 8 * half;
        const bool ok = row0 + r < N;
        const __nv_bfloat162 v2 =
            ok ? __floats2bfloat162_rn(__fadd_rn(acc[i][2 * half], bias.x), __fadd_rn(acc[i][2 * half + 1], bias.y))
               : __floats2bfloat162_rn(0.0f, 0.0f);
        bf16* dst = c < C ? qs + r * ldq + c : vt0 + r * ldq + c - C;
        *reinterpret_cast<__nv_bfloat162*>(dst) = v2;
        if (c >= C) *reinterpret_cast<__nv_bfloat162*>(vg0 + r * ldq + c - C) = v2;
        if (p.qkv_out && ok) *reinterpret_cast<__nv_bfloat162*>(p.qkv_out + (grow0 + r) * 2 * C + c) = v2;
      }
    }
  }
  BLK_STAMP(14);
  __syncthreads();
  BLK_STAMP(15);
  BLK_STAMP(3);
  ptx::mbar_wait_parity(bar, 0);  // the hash weights
  // ---- 2. the hash, the per-head kernel's arithmetic spread over warps: the distances a warp per (head, anchor
  // tile) into shared memory; each head's sum of D (a warp per head, the per-head kernel's order) into every CTA;
  // cluster barrier; the codes a warp per (head, 8 bits) ----
  const bool va = row0 + g < N, vb = row0 + g + 8 < N;
  auto prep_of = [&](int h) { return smem + L.prep + h * P.bytes; };
  auto d_at = [&](int h, int nt, int i) -> float& {  // D of (row i < 2 ? g : g + 8, anchor 8 nt + 2 q4 + (i & 1))
    return dbuf[(h * 16 + g + 8 * (i >> 1)) * kLdD + nt * 8 + 2 * q4 + (i & 1)];
  };
  if (warp < 4 * kH && !BLK_SKIP(2)) {
    const int h = warp >> 2, ntw = warp & 3;
    const unsigned char* ph = prep_of(h);
    float acc[4][4], ssa, ssb;
    ksh_dots(ntw < S.mt, qs + h * kD, ldq, reinterpret_cast<const bf16*>(ph + P.anc), kD + 8, kD, ntw, ntw + 1, acc,
             ssa, ssb);
    ksh_d(acc, ssa, ssb, reinterpret_cast<const float*>(ph + P.aa));
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
      if (nt == ntw)
#pragma unroll
        for (int i = 0; i < 4; ++i) d_at(h, nt, i) = acc[nt][i];
  }
  __syncthreads();
  auto load_d = [&](int h, float(&D)[4][4]) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) D[nt][i] = d_at(h, nt, i);
  };
  double dsum = 0.0;
  if (warp < kH) {
    float D[4][4];
    load_d(warp, D);
    dsum = ksh_dsum(D, S.mt, S.m, va, vb);
  }
  BLK_STAMP(4);
  ptx::cluster_wait_acquire();  // every CTA runs
  if (warp < kH && lane < tiles) *cluster.map_shared_rank(sig + rank * kH + warp, lane) = dsum;
  // the v rows in global memory, for the other CTAs' bulk copies after the barrier: fenced here, not right after the
  // stores, which have long completed by now (a fence there waited for them)
  ptx::fence_proxy_async_global();
  if (!BLK_SKIP(4)) {
    ptx::cluster_arrive_release();
    ptx::cluster_wait_acquire();  // every tile's sum of D, and its v rows in global memory
  }
  BLK_STAMP(5);
  if (warp == kWarps - 1 && lane < tiles - 1) {  // the other tiles' v rows (a warp without a codes task below)
    const int q = (rank + 1 + lane) % tiles;
    ptx::fence_proxy_async_global();
    ptx::bulk_copy_g2s(vall + (kPad + 16 * q) * ldq, p.vg + (int64_t(b) * T + 16 * q) * ldq, kVTileBytes, vbar);
  }
  for (int task = warp; task < (BLK_SKIP(8) ? 0 : kH * S.bt); task += kWarps) {
    const int h = task / S.bt, bt = task - h * S.bt;
    const unsigned char* ph = prep_of(h);
    const float nis = ksh_sigma(lane < tiles ? sig[lane * kH + h] : 0.0, N, S.m);
    float D[4][4];
    load_d(h, D);
    unsigned long long ca, cb;
    ksh_codes(true, D, nis, reinterpret_cast<const bf16*>(ph + P.a), reinterpret_cast<const float*>(ph + P.mu), S.m,
              S.mt, S.bt, bt, bt + 1, va, vb, ca, cb);
    if (q4 < 2)  // byte bt of the row's code word
      reinterpret_cast<unsigned char*>(codes + h * T + row0 + g + 8 * q4)[bt] =
          static_cast<unsigned char>((q4 ? cb : ca) >> (8 * bt));
  }
  __syncthreads();
  // the tile's code words into every other CTA: 16 bytes (two rows) per st.async, counted by the receiver's cbar (no
  // cluster barrier and no release fence)
  for (int i = tid; i < (BLK_SKIP(16) ? 0 : kH * 8 * (tiles - 1)); i += kThreads) {
    const int q = (rank + 1 + i / (kH * 8)) % tiles, j = i % (kH * 8);
    const uint4* src = reinterpret_cast<const uint4*>(codes + (j >> 3) * T + row0 + 2 * (j & 7));
    ptx::st_async16(src, *src, cbar, unsigned(q));
  }
  BLK_STAMP(6);
  if (!BLK_SKIP(16)) ptx::mbar_wait_parity<true>(cbar, 0);  // every tile's codes

  BLK_STAMP(7);
  // ---- 3. KV = h^T v / pi over the image's tokens (every CTA the same sums), in three bf16 parts ----
  const int kvpart = kD * S.ldk;
  ptx::mbar_wait_parity(vbar, 0);  // the other tiles' v rows
  BLK_STAMP(8);
  // the codes as bf16 0/1 rows hT[head][bit][token] (the hash weights' space is dead): the B operand of KV^T
  bf16* hT = reinterpret_cast<bf16*>(smem + L.prep);
  const int nb = 16 * S.mb, ldh = T + 8, Tp = T / 2;  // ldh: 4 (2k + 1) words, ldmatrix rows conflict-free
  for (int i = tid; i < (BLK_SKIP(32) ? 0 : kH * Tp); i += kThreads) {  // a thread per (head, token pair)
    const int h = i / Tp, tp = i - h * Tp;
    const unsigned long long c0 = codes[h * T + 2 * tp], c1 = codes[h * T + 2 * tp + 1];
    uint32_t* dst = reinterpret_cast<uint32_t*>(hT + h * nb * ldh + 2 * tp);
    for (int j = 0; j < S.mb; ++j) {  // 16 bits at a time: the two tokens' 16-bit code pieces in one word
      const uint32_t w = (uint32_t(c0 >> (16 * j)) & 0xFFFFu) | (uint32_t(c1 >> (16 * j)) << 16);
#pragma unroll
      for (int bit = 0; bit < 16; ++bit) dst[(16 * j + bit) * (ldh / 2)] = bit_pair16(w, bit);
    }
  }
  __syncthreads();
  BLK_STAMP(16);
  // KV^T (64 columns x nb bits per head) = v^T h, a warp per (head, 16 columns, 16 bits), 16 tokens per k-step
  for (int task = warp; task < (BLK_SKIP(32) ? 0 : kH * 4 * S.mb); task += kWarps) {
    const int h = task / (4 * S.mb), rest = task - h * 4 * S.mb, mt = rest / S.mb, np = rest - mt * S.mb;
    const int c0 = h * kD + mt * 16, b0 = np * 16;
    const bf16* va = vall + (kPad + (lane & 7) + ((lane >> 4) << 3)) * ldq + c0 + ((lane >> 3) & 1) * 8;
    const bf16* hb = hT + (h * nb + b0 + ((lane >> 4) << 3) + (lane & 7)) * ldh + ((lane >> 3) & 1) * 8;
    float acc[2][2][4] = {};  // k-steps t = u mod 2 in chain u, then their sum (the loads bound it: ldmatrix)
    auto step = [&](int t, float(&k)[2][4]) {
      uint32_t a[4], bb[4];
      ptx::ldmatrix_x4_trans(a, va + 16 * t * ldq);
      ptx::ldmatrix_x4(bb, hb + 16 * t);
      ptx::mma_bf16(k[0], a, bb[0], bb[1]);
      ptx::mma_bf16(k[1], a, bb[2], bb[3]);
    };
    int t = 0;
#pragma unroll 2
    for (; t + 2 <= tiles; t += 2) step(t, acc[0]), step(t + 1, acc[1]);
    if (t < tiles) step(t, acc[0]);
    // kv[n][i]: column c0 + g + 8 (i >> 1), bit b0 + 8 n + 2 q4 + (i & 1): / pi, three bf16 parts, bit pairs packed
    float kv[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) kv[n][i] = acc[0][n][i] + acc[1][n][i];
    }
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint32_t hi, mid, lo;
        split3_pair(kv[n][2 * half] * kInvPi, kv[n][2 * half + 1] * kInvPi, hi, mid, lo);
        bf16* o = kvt + h * 3 * kvpart + (mt * 16 + g + 8 * half) * S.ldk + b0 + 8 * n + 2 * q4;
        *reinterpret_cast<uint32_t*>(o) = hi;
        *reinterpret_cast<uint32_t*>(o + kvpart) = mid;
        *reinterpret_cast<uint32_t*>(o + 2 * kvpart) = lo;
      }
  }
  // the proj weight fragments: in flight during z and the norms (the warps without a KV task issue them first)
  uint4 wpf[kProjTiles][KB];
#pragma unroll
  for (int i = 0; i < kProjTiles; ++i) {
    const int nt = warp + kWarps * i;
#pragma unroll
    for (int kb = 0; kb < KB; ++kb)
      wpf[i][kb] = kFull && nt < C / 8 ? w_fragment(p.wp, nt * 8 + g, C, kb) : make_uint4(0, 0, 0, 0);
  }

  __syncthreads();
  BLK_STAMP(9);

  // ---- 4. z = h KV + 0.5 v, norms, conv: a warp per (head, column tile), at most two each ----
  constexpr int kUnits = kH * NTh, kPer = (kUnits + kWarps - 1) / kWarps;
  float z[kPer][4];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int u = warp + kWarps * j;
    if (u >= kUnits) break;
    const int h = u / NTh, nt = u - h * NTh, c = h * kD + nt * 8 + 2 * q4;
    const unsigned long long ca = codes[h * T + row0 + g], cb = codes[h * T + row0 + g + 8];
    const uint32_t a_lo = uint32_t(ca), a_hi = uint32_t(ca >> 32), b_lo = uint32_t(cb), b_hi = uint32_t(cb >> 32);
    float* zz = z[j];
    zz[0] = zz[1] = zz[2] = zz[3] = 0.0f;
    for (int kk = 0; kk < (BLK_SKIP(64) ? 0 : S.mb); ++kk) {
      const int ra = (kk & 1) * 16 + 2 * q4, rb = ra + 8;
      const uint32_t wa = kk & 2 ? a_hi : a_lo, wb = kk & 2 ? b_hi : b_lo;
      const uint32_t a[4] = {bit_pair2(wa, ra), bit_pair2(wb, ra), bit_pair2(wa, rb), bit_pair2(wb, rb)};
      const bf16* bp = kvt + h * 3 * kvpart + (nt * 8 + g) * S.ldk + kk * 16 + 2 * q4;
#pragma unroll
      for (int part = 0; part < 3; ++part)
        ptx::mma_bf16(z[j], a, ld_pair(bp + part * kvpart), ld_pair(bp + part * kvpart + 8));
    }
    const float2 xa = ld_float2(vt0 + g * ldq + c), xb = ld_float2(vt0 + (g + 8) * ldq + c);
    zz[0] += 0.5f * xa.x, zz[1] += 0.5f * xa.y, zz[2] += 0.5f * xb.x, zz[3] += 0.5f * xb.y;
    double sa = double(zz[0]) * zz[0] + double(zz[1]) * zz[1], sb = double(zz[2]) * zz[2] + double(zz[3]) * zz[3];
    sa += __shfl_xor_sync(0xffffffffu, sa, 1);
    sa += __shfl_xor_sync(0xffffffffu, sa, 2);
    sb += __shfl_xor_sync(0xffffffffu, sb, 1);
    sb += __shfl_xor_sync(0xffffffffu, sb, 2);
    if (q4 < 2) zsq[((g + 8 * q4) * kH + h) * NTh + nt] = q4 ? sb : sa;
  }
  __syncthreads();
  BLK_STAMP(10);
  if (tid < 16 * kH) {  // (row, head): the column tiles' sums in order, as the per-head kernel
    double s = 0.0;
    for (int nt = 0; nt < NTh; ++nt) s += zsq[tid * NTh + nt];
    inv[tid] = 1.0f / fmaxf(static_cast<float>(sqrt(s)), kNormEps);
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int u = warp + kWarps * j;
    if (u >= kUnits || BLK_SKIP(128)) break;
    const int h = u / NTh, nt = u - h * NTh, c = h * kD + nt * 8 + 2 * q4;
    const float ia = inv[g * kH + h], ib = inv[(g + 8) * kH + h];
    float o[4] = {z[j][0] * ia, z[j][1] * ia, z[j][2] * ib, z[j][3] * ib};
    const bf16* vt = vall + (row0 + g) * ldq + c;  // token row row0 + g - kPad
#pragma unroll
    for (int t = 0; t < kTaps; ++t) {
      const float w = conv[h * kTaps + t];
      const float2 xa = ld_float2(vt + t * ldq), xb = ld_float2(vt + (t + 8) * ldq);
      o[0] = fmaf(w, xa.x, o[0]), o[1] = fmaf(w, xa.y, o[1]);
      o[2] = fmaf(w, xb.x, o[2]), o[3] = fmaf(w, xb.y, o[3]);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = g + 8 * half;
      const __nv_bfloat162 v2 = __floats2bfloat162_rn(o[2 * half], o[2 * half + 1]);
      if (kFull) *reinterpret_cast<__nv_bfloat162*>(aos + r * ldxs + c) = v2;
      if (p.ao_out && row0 + r < N) *reinterpret_cast<__nv_bfloat162*>(p.ao_out + (grow0 + r) * C + c) = v2;
    }
  }
  if constexpr (!kFull) {  // the attention output is out; the MLP kernel takes it from here
    if (tid == 0) timeline_record(p.tl, kTimelineHamBlock, tl_entry, tl_waited);
#ifdef SAV_HAM_BLOCK_TRACE
    BLK_STAMP(11);
    if (tid == 0 && b == 0 && (rank == 0 || rank == tiles - 1)) blk_trace_attention("attention-only", rank, stamps);
#endif
    return;
  }
  __syncthreads();

  BLK_STAMP(11);
  // ---- 5. proj: a warp per 8 output columns ----
#pragma unroll
  for (int i = 0; i < kProjTiles; ++i) {
    const int nt = warp + kWarps * i;
    if (nt >= C / 8) break;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) mma_kblock(acc, aos, ldxs, kb, wpf[i][kb]);
    const int c = nt * 8 + 2 * q4;
    xp[g * C + c] = acc[0], xp[g * C + c + 1] = acc[1];
    xp[(g + 8) * C + c] = acc[2], xp[(g + 8) * C + c + 1] = acc[3];
  }
  ptx::cp_async_wait<0>();  // the residual rows
  __syncthreads();

  BLK_STAMP(12);
  // ---- 6. residual + LayerNorm 2 + router + mask: a group of 16 lanes per row ----
  constexpr int kG = 16, kS = 4;  // as moe_ln_route_mask_forward's kernel for C <= 256: the same row arithmetic
  if (tid < 16 * kG) {
    const int i = tid / kG, n = row0 + i;
    const bool valid = n < N;
    const int64_t gr = int64_t(b) * N + (valid ? n : 0);
    moe_rows::linear_residual_ln_route_mask<kG, kS>(xp + i * C, ep, xin + i * C, p.x + gr * p.ldx, valid, tid % kG, C,
                                                    p.Ka, p.eps, ep + C, ep + 2 * C, ep + 3 * C, ep + 5 * C,
                                                    p.xa + gr * p.ldxa, p.choice ? p.choice + gr : nullptr);
  }
  BLK_STAMP(13);
  if (tid == 0) timeline_record(p.tl, kTimelineHamBlock, tl_entry, tl_waited);
#ifdef SAV_HAM_BLOCK_TRACE
  if (tid == 0 && b == 0 && (rank == 0 || rank == tiles - 1)) {
    blk_trace_attention("whole", rank, stamps);
    printf(
        "[ham_block trace] rank %d whole, after the attention: proj %lld epi %lld total %lld; detail: qkv mma+stores "
        "%lld fence+sync %lld wp-issue %lld\n",
        rank, stamps[12] - stamps[11], stamps[13] - stamps[12], stamps[13] - stamps[0], stamps[14] - stamps[2],
        stamps[15] - stamps[14], stamps[3] - stamps[15]);
  }
#endif
#endif
}

BlkParams blk_dims(int N, int C, int H, int nbits, int m) {
  BlkParams p{};
  p.s = blk_shape(N, C, H, nbits, m);
  return p;
}

// The instance for a shape: DeiT-Tiny's attention (197 tokens, 3 heads, 25 anchors, 16 bits) up to the attention
// output (the batch-1 forward's form) has its own, with the sizes as constants; every other shape the generic one.
using BlkKernel = void (*)(BlkParams);
BlkKernel blk_kernel_for(int H, bool full = true, int N = 0, int m = 0, int nbits = 0) {
  if (!full) {
    constexpr int kTinyN = 197, kTinyM = 25, kTinyBits = 16;  // DeiT-Tiny: 14 x 14 patches + class token
    if (H == 3 && N == kTinyN && m == kTinyM && nbits == kTinyBits)
      return ham_block_kernel<3, false, kTinyN, kTinyM, kTinyBits>;
    return H == 1 ? ham_block_kernel<1, false> : H == 2 ? ham_block_kernel<2, false> : ham_block_kernel<3, false>;
  }
  return H == 1 ? ham_block_kernel<1, true> : H == 2 ? ham_block_kernel<2, true> : ham_block_kernel<3, true>;
}

}  // namespace

bool hamming_block_supports(int B, int N, int C, int H, int nbits, int m) {
  if (!(B >= 1 && N >= 1 && N <= kMaxTiles * 16 && H >= 1 && H <= kMaxH && C == kD * H && nbits >= 1 &&
        nbits <= kMaxBits && m >= 1 && m <= kMaxM))
    return false;
  const BlkShape S = blk_shape(N, C, H, nbits, m);
  const size_t smem = blk_smem(S).total;
  if (!device_available()) return smem <= 227 * 1024;
  return device_cc_major() >= 9 && smem <= size_t(max_smem_per_block()) &&
         cluster_fits(reinterpret_cast<const void*>(blk_kernel_for(H)), S.tiles, kThreads, smem, true) &&
         cluster_fits(reinterpret_cast<const void*>(blk_kernel_for(H, false, N, m, nbits)), S.tiles, kThreads, smem,
                      true);
}

size_t hamming_block_scratch_elems(int B, int N, int C) {
  return size_t(std::max(B, 0)) * 16 * ((std::max(N, 0) + 15) / 16) * (size_t(std::max(C, 0)) + 8);
}

namespace {

// The checks and parameters the two launchers share: the attention's inputs (to_qk / to_v, the hash, the conv, the v
// rows' scratch) and the shape.
BlkParams attention_params(const char* what, const bf16* xn, int ldxn, const bf16* wqkv, const bf16* bqkv,
                           const void* prep, const float* conv_w, bf16* v_scratch, int B, int N, int C, int H,
                           int nbits, int m) {
  SAV_CHECK(xn && wqkv && bqkv && prep && conv_w && v_scratch, what << ": null pointer");
  SAV_CHECK(
      hamming_block_supports(B, N, C, H, nbits, m),
      what << ": B=" << B << " N=" << N << " C=" << C << " H=" << H << " nbits=" << nbits << " m=" << m
           << " not supported (head size 64, at most 3 heads, nbits <= 64, anchors <= 32, the image's v rows in shared "
              "memory (N <= 208 at C = 192), a cluster of one CTA per 16-token tile that fits the device)");
  SAV_CHECK(ldxn >= C && ldxn % 8 == 0, what << ": row stride ldxn=" << ldxn);
  SAV_CHECK(aligned16(xn) && aligned16(wqkv) && aligned16(bqkv) && aligned16(prep) && aligned16(v_scratch),
            what << ": misaligned pointers");
  SAV_CHECK(int64_t(B) * ((N + 15) / 16) <= (int64_t(1) << 31) - 1, what << ": batch too large");
  BlkParams p = blk_dims(N, C, H, nbits, m);
  p.xn = xn, p.ldxn = ldxn, p.wqkv = wqkv, p.bqkv = bqkv;
  p.prep = static_cast<const unsigned char*>(prep), p.conv_w = conv_w, p.vg = v_scratch;
  p.tl = timeline_sink();
#ifdef SAV_ABLATION
  p.ablate = ablation_mask();
#endif
  return p;
}

void launch_blk(const BlkParams& p, int B, bool full, cudaStream_t stream) {
  launch_dependent(blk_kernel_for(p.s.H, full, p.s.N, p.s.m, p.s.nbits),
                   dim3(static_cast<unsigned>(int64_t(B) * p.s.tiles)), dim3(kThreads), blk_smem(p.s).total, p.s.tiles,
                   stream, p);
}

}  // namespace

void hamming_block_forward(float* x, int ldx, const bf16* xn, int ldxn, const bf16* wqkv, const bf16* bqkv,
                           const void* prep, const float* conv_w, const bf16* wp, const float* bp, const float* ln_w,
                           const float* ln_b, float eps, const float* wr, const float* br, bf16* xa, int ldxa,
                           int8_t* choice, bf16* v_scratch, int B, int N, int C, int H, int nbits, int m,
                           cudaStream_t stream, bf16* qkv_out, bf16* ao_out) {
  const char* what = "hamming attention block";
  BlkParams p = attention_params(what, xn, ldxn, wqkv, bqkv, prep, conv_w, v_scratch, B, N, C, H, nbits, m);
  SAV_CHECK(x && wp && bp && ln_w && ln_b && wr && br && xa, what << ": null pointer");
  const int Ka = moe_masked_cols(C);
  SAV_CHECK(ldx >= C && ldx % 4 == 0 && ldxa >= Ka && ldxa % 4 == 0,
            what << ": row strides ldx=" << ldx << " ldxa=" << ldxa);
  SAV_CHECK(aligned16(x) && aligned16(wp) && aligned16(bp) && aligned16(ln_w) && aligned16(ln_b) && aligned16(wr) &&
                reinterpret_cast<uintptr_t>(xa) % 8 == 0 && reinterpret_cast<uintptr_t>(qkv_out) % 4 == 0 &&
                reinterpret_cast<uintptr_t>(ao_out) % 4 == 0,
            what << ": misaligned pointers");
  p.x = x, p.ldx = ldx, p.wp = wp, p.bp = bp, p.ln_w = ln_w, p.ln_b = ln_b, p.wr = wr, p.br = br, p.eps = eps;
  p.xa = xa, p.ldxa = ldxa, p.Ka = Ka, p.choice = choice, p.qkv_out = qkv_out, p.ao_out = ao_out;
  launch_blk(p, B, true, stream);
}

void hamming_block_attention_forward(bf16* ao, const bf16* xn, int ldxn, const bf16* wqkv, const bf16* bqkv,
                                     const void* prep, const float* conv_w, bf16* v_scratch, int B, int N, int C, int H,
                                     int nbits, int m, cudaStream_t stream) {
  const char* what = "hamming attention block (attention output)";
  BlkParams p = attention_params(what, xn, ldxn, wqkv, bqkv, prep, conv_w, v_scratch, B, N, C, H, nbits, m);
  SAV_CHECK(ao && reinterpret_cast<uintptr_t>(ao) % 4 == 0, what << ": null or misaligned attention output");
  p.ao_out = ao;
  launch_blk(p, B, false, stream);
}

}  // namespace sav::cuda
