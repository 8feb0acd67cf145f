// Hamming attention core (binary-code linear attention, METHOD.md section 1) for one GPU: G CTAs per (image b, head
// h), everything in shared memory (N <= 256 tokens, d <= 64, m <= 32 anchors, b <= 64 bits). Spec:
// cpu::hamming_attention_forward (ops/cpu/hamming.h); formulas in ops.h.
//
// Legend: B batch, N tokens, C channels, H heads, d = C/H, b = nbits hash bits, m anchors; a "tile" is 16
// tokens, a "column tile" 8 of the head's d columns (dp = d rounded up to 16, NT = dp / 8 of them); CTA r of an
// (image, head) owns the tiles r tiles / G .. (r+1) tiles / G - 1 (its output rows). The CTA has one warp per tile
// (at least 4 warps). Every product runs on the tensor cores (bf16 mma.sync m16n8k16, f32 accumulation) with f32
// operands split in three bf16 parts (hi + mid + lo = x to 2^-24), so they are f32-accurate; bf16 inputs (qk, v)
// and the 0/1 codes are exact in one part.
//
// Phases (a __syncthreads between each):
//  0. stage in shared memory, zero-padded so no later loop checks bounds (cp.async): the head's prepared hash
//     weights (hamming_attention_prepare: anchors and A split in three parts, ||a_j||^2, mu; one contiguous
//     copy), every qk row and every v row (with 4 zero rows before and after the image, so the 9-tap conv reads
//     zeros there);
//  1. hash, per warp and tile, in EVERY CTA of the (image, head) (the same bits: the hash is a chain per tile, so
//     repeating it costs no latency and needs no exchange between the CTAs): the dot products qk.a_j (A = qk rows
//     by ldmatrix, B = anchor parts: 3 mma per 16 dims and 8 anchors) and ||qk||^2 (from the same fragments);
//     q.a = qk.a / max(||qk||, eps), D_nj = max(||q||^2 + ||a_j||^2 - 2 q.a_j, 0) in the accumulators; sigma =
//     mean D over the valid tokens (double: each tile's sum, then the tiles' sums in tile order);
//     k = exp(-D / (2 sigma)) - mu_j, and the accumulators of two anchor tiles are directly the A operand of
//     y = k A^T (k and A both split: 6 mma per 16 anchors and 8 bits); code bit r = 1[y_r > 0], OR-ed over the 4
//     lanes of a row -> codes[n];
//  2. MatAdd #1 in every CTA: KV = h^T V / pi, a warp per (16 bits, column tile), 0/1 x bf16 (exact products, f32
//     sums; V fragments by ldmatrix.trans, 32 tokens per step); stored transposed, split in three;
//  3. MatAdd #2 + normalisation + conv for the CTA's tiles, a warp per range of units (tile, column tile): z = h KV
//     + 0.5 v (3 mma per 16 bits and unit); each (row, column tile)'s sum of z^2 (double, over the 4 lanes of the
//     row) to shared memory; ||z||^2 = those sums in column-tile order; out = z / max(||z||, eps) + the 9 taps of v
//     in order; bf16 stores. z stays in registers when no warp has more than 2 units (4 in the 128-register
//     instantiation that G > 1 uses), else it is recomputed (64 registers at 2 CTAs/SM).
// Deterministic: every sum has a fixed order, independent of G, and no atomics, so reruns, graph replays and every
// G give the same bits. Against the CPU: D is ||q||^2 + ||a||^2 - 2 q.a (a few ulp of D ~ 1 from the CPU's sum of
// squared differences) and the sums run in other orders, so a code bit whose y lies within ~1e-7 of max|y| of 0 may
// differ; with equal codes the output agrees to f32 summation order before the bf16 store.
//
// Cost (DeiT, N=197, d=64, b=16, m=25): per tile 48 mma for the distances and 24 for y; 3 for z per unit (twice at
// G = 1); 14 per KV task (8 tasks); staging ~90 KB per CTA. The launcher's G (hamming_attention_split) spreads a
// small batch over the SMs: at batch 1 a CTA per tile. (Sessions 9's form split the columns over a thread-block
// cluster and exchanged the z norms through distributed shared memory; splitting the rows needs no exchange.)
#include <cooperative_groups.h>

#include <algorithm>

#include "ops/cuda/hamming_common.cuh"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/moe_rows.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/ptx.cuh"

namespace sav::cuda {

namespace {

using namespace ham;

struct HamParams {
  bf16* out;
  const bf16* qk;
  const bf16* v;
  const unsigned char* prep;  // hamming_attention_prepare's buffer: one PrepLayout block per head
  const float* conv_w;
  int ldo, ldqk, ldv;
  int B, N, C, H, d, nbits, m;
  int tiles;   // ceil(N / 16): one warp each
  int nk;      // N rounded up to 32: the token rows of the KV product (2 k-steps per ldmatrix.x4.trans)
  int dp;      // d rounded up to 16: columns of every staged row that the products read
  int ldb;     // dp + 8: bf16 row stride of the staged qk, v and anchor rows (16-byte rows, conflict-free)
  int mt;      // ceil(m / 8) anchor tiles (<= 4)
  int bt;      // ceil(nbits / 8) bit tiles of y
  int mb;      // ceil(nbits / 16) bit tiles of KV = k-steps of z
  int ldk;     // 16 mb + 8: bf16 row stride of the transposed KV parts
  int G;       // CTAs per (image, head), 1 .. tiles: CTA r owns the token tiles r tiles / G .. (r+1) tiles / G - 1
  bool vec;    // 16-byte cp.async of the qk and v rows (d % 8 == 0, strides and pointers aligned)
  bool pairs;  // d even and the output 4-byte aligned: bf16 pairs are stored at once
  // the fused proj + LayerNorm + router + mask (hamming_attention_proj_ln_mask_forward; fuse false: not used)
  bool fuse;
  const bf16* wp;  // (C, C) proj weight
  const float *bp, *ln_w, *ln_b, *wr, *br;
  float* x;  // residual rows, ldx apart
  bf16* xa;  // x_aug rows, ldxa apart, Ka columns
  int8_t* choice;
  float eps;
  int ldx, ldxa, Ka;
};

// Shared memory carve-up, the same on host and device.
struct HamSmem {
  size_t tsum, zsq, inv, codes, q, v, prep, kv;  // byte offsets
  size_t wp, ao, xp, xin, ep, bar;               // the fused epilogue's (p.fuse)
  size_t total;
};
__host__ __device__ inline HamSmem ham_smem(const HamParams& p) {
  HamSmem s{};
  size_t o = 0;
  s.tsum = o, o = align16(o + kMaxN / 16 * sizeof(double));
  s.zsq = o, o = align16(o + size_t(p.tiles) * 16 * (p.dp / 8) * sizeof(double));
  s.inv = o, o = align16(o + size_t(p.tiles) * 16 * sizeof(float));
  s.codes = o, o = align16(o + size_t(p.nk) * sizeof(unsigned long long));
  s.q = o, o = align16(o + size_t(p.tiles) * 16 * p.ldb * sizeof(bf16));
  s.v = o, o = align16(o + size_t(p.nk + 2 * kPad) * p.ldb * sizeof(bf16));
  s.prep = o, o += prep_layout(p.dp, p.bt).bytes;
  s.kv = o, o = align16(o + size_t(3) * p.dp * p.ldk * sizeof(bf16));
  if (p.fuse) {  // proj weight and the tile's attention output (bf16, rows C + 8 apart), its product, residual rows,
                 // then b, ln_w, ln_b (C each), wr (2C), br (2)
    const size_t ldc = size_t(p.C) + 8;
    s.wp = o, o = align16(o + size_t(p.C) * ldc * sizeof(bf16));
    s.ao = o, o = align16(o + 16 * ldc * sizeof(bf16));
    s.xp = o, o = align16(o + size_t(16) * p.C * sizeof(float));
    s.xin = o, o = align16(o + size_t(16) * p.C * sizeof(float));
    s.ep = o, o = align16(o + (size_t(5) * p.C + 4) * sizeof(float));
    s.bar = o, o = align16(o + sizeof(uint64_t));  // the proj weight's bulk copies
  }
  s.total = o;
  return s;
}

HamParams ham_dims(int B, int N, int C, int H, int nbits, int m) {
  HamParams p{};
  p.B = B, p.N = N, p.C = C, p.H = H, p.d = C / H, p.nbits = nbits, p.m = m;
  p.tiles = (N + 15) / 16, p.nk = (N + 31) / 32 * 32;
  p.dp = (p.d + 15) / 16 * 16, p.ldb = p.dp + 8;
  p.mt = (m + 7) / 8, p.bt = (nbits + 7) / 8, p.mb = (nbits + 15) / 16, p.ldk = 16 * p.mb + 8;
  p.G = 1;
  return p;
}

// ham_dims with the launchers' common inputs: the qk and v rows, the prepared hash weights and the conv taps.
HamParams ham_inputs(int B, int N, int C, int H, int nbits, int m, const bf16* qk, int ldqk, const bf16* v, int ldv,
                     const void* prep, const float* conv_w) {
  HamParams p = ham_dims(B, N, C, H, nbits, m);
  p.qk = qk, p.v = v, p.prep = static_cast<const unsigned char*>(prep), p.conv_w = conv_w;
  p.ldqk = ldqk, p.ldv = ldv;
  p.vec = p.d % 8 == 0 && ldqk % 8 == 0 && ldv % 8 == 0 && aligned16(qk) && aligned16(v);
  return p;
}

// One warp per 16-token tile, at least 4 warps (N <= 256: at most 16).
inline int ham_threads(int N) { return 32 * std::max(4, (N + 15) / 16); }

// kMinBlocks: CTAs per SM the register budget is cut for (2: 64 registers, the large-batch grids of one CTA per
// head; 1: 128 registers, the small batches split over G > 1 CTAs per head, where a CTA has its SM to itself).
// The same code, the same bits.
// kFuse: the fused proj + LayerNorm + router + mask (hamming_attention_proj_ln_mask_forward): a thread-block cluster
// of the H heads of one 16-token tile (G == tiles), CTA h at blockIdx.x = (b G + r) H + h.
template <int kMinBlocks, bool kFuse = false>
__global__ void __launch_bounds__(512, kMinBlocks) hamming_kernel(const __grid_constant__ HamParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // built for sm_90; the launcher refuses older devices
#else
  extern __shared__ __align__(16) unsigned char smem[];
  const HamSmem L = ham_smem(p);
  double* tsum = reinterpret_cast<double*>(smem + L.tsum);   // sigma partial of each tile
  double* zsq = reinterpret_cast<double*>(smem + L.zsq);     // (token, column tile): sum of z^2 over its 8 columns
  float* inv_norm = reinterpret_cast<float*>(smem + L.inv);  // (token): 1 / max(||z||, eps)
  unsigned long long* codes = reinterpret_cast<unsigned long long*>(smem + L.codes);
  bf16* Qs = reinterpret_cast<bf16*>(smem + L.q);
  bf16* Vs = reinterpret_cast<bf16*>(smem + L.v) + kPad * p.ldb;  // rows -kPad .. nk + kPad - 1
  const PrepLayout P = prep_layout(p.dp, p.bt);
  const bf16* Anc = reinterpret_cast<const bf16*>(smem + L.prep + P.anc);  // [part][anchor][dim]
  const bf16* Apr = reinterpret_cast<const bf16*>(smem + L.prep + P.a);    // [part][bit][anchor]
  const float* aa = reinterpret_cast<const float*>(smem + L.prep + P.aa);
  const float* mus = reinterpret_cast<const float*>(smem + L.prep + P.mu);
  bf16* KVt = reinterpret_cast<bf16*>(smem + L.kv);  // [part][column][bit]

  const int G = p.G;
  const int tid = threadIdx.x, T = blockDim.x, lane = tid & 31, warp = tid >> 5, W = T >> 5;
  const int g = lane >> 2, q4 = lane & 3;
  int rank, b, h;
  if constexpr (kFuse) {
    const int br = static_cast<int>(blockIdx.x) / p.H;
    h = static_cast<int>(blockIdx.x) - br * p.H, b = br / G, rank = br - b * G;
  } else {
    const int bh = static_cast<int>(blockIdx.x) / G;
    rank = static_cast<int>(blockIdx.x) - bh * G, b = bh / p.H, h = bh - b * p.H;
  }
  const int N = p.N, d = p.d, m = p.m, dp = p.dp, ldb = p.ldb, NT = dp / 8;

  // ---- 0. staging: the head's prepared hash weights (before the dependent-launch wait: they do not depend on
  // the previous kernel), then the qk rows and v columns ----
  ptx::pdl_trigger();
  {
    const unsigned char* src = p.prep + int64_t(h) * P.bytes;
    for (int i = tid * 16; i < int(P.bytes); i += T * 16) ptx::cp_async16(smem + L.prep + i, src + i);
    if constexpr (kFuse) {
      ptx::cluster_arrive_relaxed();  // runs: the cluster may store here after their wait
      if (tid == 0) {  // armed for the proj weight's bulk copies (issued after the staging barrier below)
        uint64_t* bar = reinterpret_cast<uint64_t*>(smem + L.bar);
        ptx::mbar_init(bar, 1);
        ptx::mbar_arrive_expect_tx(bar, unsigned(p.C) * unsigned(p.C) * 2u);
      }
    }
    ptx::cp_async_commit();
  }
  ptx::pdl_wait();
  const bf16* qk = p.qk + int64_t(b) * N * p.ldqk + h * d;
  const bf16* vv = p.v + int64_t(b) * N * p.ldv + h * d;
  const int vrows = p.nk + 2 * kPad;
  if (p.vec) {
    const int cpr = dp / 8;  // 16-byte chunks per staged row (zero beyond d)
    for (int i = tid; i < p.tiles * 16 * cpr; i += T) {
      const int n = i / cpr, c = (i - n * cpr) * 8;
      const bool ok = n < N && c < d;
      ptx::cp_async16(Qs + n * ldb + c, ok ? qk + int64_t(n) * p.ldqk + c : qk, ok);
    }
    for (int i = tid; i < vrows * NT; i += T) {
      const int r = i / NT, c = (i - r * NT) * 8, n = r - kPad;
      const bool ok = n >= 0 && n < N && c < d;
      ptx::cp_async16(Vs + n * ldb + c, ok ? vv + int64_t(n) * p.ldv + c : vv, ok);
    }
    ptx::cp_async_commit();
  } else {
    const bf16 zero = __float2bfloat16_rn(0.0f);
    const int vc = dp;
    for (int i = tid; i < p.tiles * 16 * dp; i += T) {
      const int n = i / dp, c = i - n * dp;
      Qs[n * ldb + c] = n < N && c < d ? qk[int64_t(n) * p.ldqk + c] : zero;
    }
    for (int i = tid; i < vrows * vc; i += T) {
      const int r = i / vc, c = i - r * vc, n = r - kPad;
      Vs[n * ldb + c] = n >= 0 && n < N && c < d ? vv[int64_t(n) * p.ldv + c] : zero;
    }
  }
  for (int i = p.tiles * 16 + tid; i < p.nk; i += T) codes[i] = 0ull;  // rows no tile writes (read by KV)
  ptx::cp_async_wait<0>();
  __syncthreads();
  if constexpr (kFuse) {
    // the fused epilogue's operands, needed only after phase 3: copied while the hash and the MatAdds run (not
    // earlier: they would share the SM's load bandwidth with the staging above). The proj weight by bulk copies, a
    // row each (per-thread copies here slowed the hash by their load instructions), then by cp.async the tile's
    // residual rows (zeros past N) and b, ln_w, ln_b, wr, br.
    const int C = p.C, ldc = C + 8, C4 = C / 4, row0 = rank * 16;
    bf16* Wps = reinterpret_cast<bf16*>(smem + L.wp);
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem + L.bar);
    for (int r = tid; r < C; r += T) ptx::bulk_copy_g2s(Wps + r * ldc, p.wp + int64_t(r) * C, unsigned(C) * 2u, bar);
    float* xin = reinterpret_cast<float*>(smem + L.xin);
    for (int i = tid; i < 16 * C4; i += T) {
      const int rr = i / C4, c = (i - rr * C4) * 4, n = row0 + rr;
      const bool ok = n < N;
      ptx::cp_async16(xin + rr * C + c, ok ? p.x + (int64_t(b) * N + n) * p.ldx + c : p.x, ok);
    }
    float* ep = reinterpret_cast<float*>(smem + L.ep);
    stage_row_epilogue(ep, C, p.bp, p.ln_w, p.ln_b, p.wr, p.br, tid, T);
    ptx::cp_async_commit();
  }

  // ---- 1. hash, per warp and tile: every CTA of the (image, head) hashes every tile (the same bits), so sigma
  // and the codes need no exchange ----
  {
    const bool has_tile = warp < p.tiles;  // warp-uniform
    const int ta = warp * 16 + g, tb = ta + 8;
    const bool va = has_tile && ta < N, vb = has_tile && tb < N;
    float acc[4][4];  // anchor tile nt: (ta, 8nt + 2q4 + {0,1}), (tb, ...): D
    const double dsum = ksh_distances(has_tile, Qs + warp * 16 * ldb, ldb, Anc, ldb, aa, dp, p.mt, m, va, vb, acc);
    if (lane == 0) tsum[warp] = dsum;
    __syncthreads();
    // sigma = mean D: the tiles' partials summed in tile order (lane t holds tile t), the same in every warp
    const float neg_inv_2sigma = ksh_sigma(lane < p.tiles ? tsum[lane] : 0.0, N, m);
    unsigned long long ca, cb;  // the codes of rows ta, tb (every lane of the row's quad)
    ksh_codes(has_tile, acc, neg_inv_2sigma, Apr, mus, m, p.mt, p.bt, 0, p.bt, va, vb, ca, cb);
    if (has_tile && q4 < 2) codes[q4 ? tb : ta] = q4 ? cb : ca;
  }
  __syncthreads();

  // ---- 2. KV = h^T V / pi, a warp per (16 bits, 8 columns); transposed, split ----
  const int kvpart = dp * p.ldk;
  for (int task = warp; task < p.mb * NT; task += W) {
    const int mt = task / NT, nt = task - mt * NT, r0 = (mt & 1) * 16 + g, hw = mt >> 1;
    const uint32_t* cw32 = reinterpret_cast<const uint32_t*>(codes) + hw;  // the 32-bit half holding bits 16mt..
    float kv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < p.nk; k0 += 32) {
      uint32_t bv[4];  // b0, b1 of tokens k0..k0+15, then of k0+16..k0+31 (columns 8nt..8nt+7)
      ptx::ldmatrix_x4_trans(bv, Vs + (k0 + lane) * ldb + nt * 8);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int ka = k0 + 16 * hf + 2 * q4;
        const uint32_t c0 = cw32[2 * ka], c1 = cw32[2 * ka + 2], c2 = cw32[2 * ka + 16], c3 = cw32[2 * ka + 18];
        const uint32_t a[4] = {bit_pair(c0, c1, r0), bit_pair(c0, c1, r0 + 8), bit_pair(c2, c3, r0),
                               bit_pair(c2, c3, r0 + 8)};
        ptx::mma_bf16(kv, a, bv[2 * hf], bv[2 * hf + 1]);
      }
    }
    const int c = nt * 8 + 2 * q4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      bf16 hi, mid, lo;
      split3(kv[i] * kInvPi, hi, mid, lo);
      const int e = (c + (i & 1)) * p.ldk + mt * 16 + g + (i >> 1) * 8;
      KVt[e] = hi, KVt[kvpart + e] = mid, KVt[2 * kvpart + e] = lo;
    }
  }
  __syncthreads();

  // ---- 3. z = h KV + 0.5 v per unit (a 16-token tile of this CTA, a column tile); norms; conv ----
  // The CTA's token tiles t0 .. t1 - 1; its units (tile, column tile) in tile-major order, warp w takes the
  // contiguous range u0 .. u1 - 1 (G = 1 with a warp per tile: warp w = tile w, every column tile).
  const int t0 = rank * p.tiles / G, t1 = (rank + 1) * p.tiles / G, U = (t1 - t0) * NT;
  const int u0 = warp * U / W, u1 = (warp + 1) * U / W;
  struct UnitRows {
    int ta, tb;                       // the lane's two token rows
    uint32_t a_lo, a_hi, b_lo, b_hi;  // their codes
  };
  auto tile_rows = [&](int tl) {  // the lane's rows of the CTA's tile tl
    UnitRows r;
    r.ta = (t0 + tl) * 16 + g, r.tb = r.ta + 8;
    const unsigned long long ca = codes[r.ta], cb = codes[r.tb];
    r.a_lo = uint32_t(ca), r.a_hi = uint32_t(ca >> 32), r.b_lo = uint32_t(cb), r.b_hi = uint32_t(cb >> 32);
    return r;
  };
  auto tile_z = [&](const UnitRows& r, int nt, float(&z)[4]) {
    const int c = nt * 8 + 2 * q4;
    z[0] = z[1] = z[2] = z[3] = 0.0f;
    for (int kk = 0; kk < p.mb; ++kk) {
      const int ra = (kk & 1) * 16 + 2 * q4, rb = ra + 8;
      const uint32_t wa = kk & 2 ? r.a_hi : r.a_lo, wb = kk & 2 ? r.b_hi : r.b_lo;
      const uint32_t a[4] = {bit_pair2(wa, ra), bit_pair2(wb, ra), bit_pair2(wa, rb), bit_pair2(wb, rb)};
      const bf16* bp = KVt + (nt * 8 + g) * p.ldk + kk * 16 + 2 * q4;
#pragma unroll
      for (int part = 0; part < 3; ++part)
        ptx::mma_bf16(z, a, ld_pair(bp + part * kvpart), ld_pair(bp + part * kvpart + 8));
    }
    const float2 xa = ld_float2(Vs + r.ta * ldb + c), xb = ld_float2(Vs + r.tb * ldb + c);
    z[0] += 0.5f * xa.x, z[1] += 0.5f * xa.y, z[2] += 0.5f * xb.x, z[3] += 0.5f * xb.y;
  };
  // the squared norm of rows ta, tb over column tile nt (the 4 lanes of a row hold its 8 columns)
  auto put_norm = [&](const UnitRows& r, int nt, const float(&z)[4]) {
    double sa = double(z[0]) * z[0] + double(z[1]) * z[1], sb = double(z[2]) * z[2] + double(z[3]) * z[3];
    sa += __shfl_xor_sync(0xffffffffu, sa, 1);
    sa += __shfl_xor_sync(0xffffffffu, sa, 2);
    sb += __shfl_xor_sync(0xffffffffu, sb, 1);
    sb += __shfl_xor_sync(0xffffffffu, sb, 2);
    if (q4 < 2) zsq[(q4 ? r.tb : r.ta) * NT + nt] = q4 ? sb : sa;
  };
  // The warp's units in order: a cursor (tile, column tile) advanced without divisions; the codes are read again only
  // when the tile changes (G = 1: once).
  struct Cursor {
    int tl, nt;
    UnitRows r;
  };
  auto first_unit = [&] {
    Cursor c;
    c.tl = u0 / NT, c.nt = u0 - c.tl * NT;
    c.r = tile_rows(c.tl);
    return c;
  };
  auto next_unit = [&](Cursor& c, bool more) {  // more: another unit follows
    if (++c.nt == NT && more) c.nt = 0, c.r = tile_rows(++c.tl);
  };
  // z is kept in registers when no warp has more than kKeep units, else recomputed in the second pass.
  // for_units(f) calls f(rows, column tile, z, kept) for the warp's units in order: z is zk[j] (registers, kept)
  // when they are few enough, else a fresh local.
  constexpr int kKeep = kMinBlocks == 1 ? 4 : 2;
  const bool keep = (U + W - 1) / W <= kKeep;
  float zk[kKeep][4];
  auto for_units = [&](auto&& f) {
    if (u0 >= u1) return;
    Cursor c = first_unit();
    if (keep) {
#pragma unroll
      for (int j = 0; j < kKeep; ++j)
        if (u0 + j < u1) {
          f(c.r, c.nt, zk[j], true);
          next_unit(c, u0 + j + 1 < u1);
        }
    } else {
      for (int u = u0; u < u1; ++u) {
        float z[4];
        f(c.r, c.nt, z, false);
        next_unit(c, u + 1 < u1);
      }
    }
  };
  for_units([&](const UnitRows& r, int nt, float(&z)[4], bool) {
    tile_z(r, nt, z);
    put_norm(r, nt, z);
  });
  __syncthreads();
  // 1 / max(||z||, eps) of the CTA's rows: the column tiles' partials added in order (the same for every G)
  for (int i = t0 * 16 + tid; i < t1 * 16; i += T) {
    double zz = 0.0;
    for (int nt = 0; nt < NT; ++nt) zz += zsq[i * NT + nt];
    inv_norm[i] = 1.0f / fmaxf(static_cast<float>(sqrt(zz)), kNormEps);
  }
  __syncthreads();
  float cw[kTaps];
#pragma unroll
  for (int t = 0; t < kTaps; ++t) cw[t] = p.conv_w[h * kTaps + t];
  auto emit = [&](const UnitRows& r, int nt, const float(&z)[4]) {
    const int c = nt * 8 + 2 * q4;
    const float inv_za = inv_norm[r.ta], inv_zb = inv_norm[r.tb];
    float o[4] = {z[0] * inv_za, z[1] * inv_za, z[2] * inv_zb, z[3] * inv_zb};
    const bf16* vt = Vs + (r.ta - kPad) * ldb + c;  // zero rows outside the image: no checks
#pragma unroll
    for (int t = 0; t < kTaps; ++t) {
      const float2 xa = ld_float2(vt + t * ldb), xb = ld_float2(vt + (t + 8) * ldb);
      o[0] = fmaf(cw[t], xa.x, o[0]), o[1] = fmaf(cw[t], xa.y, o[1]);
      o[2] = fmaf(cw[t], xb.x, o[2]), o[3] = fmaf(cw[t], xb.y, o[3]);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = half ? r.tb : r.ta;
      if (row >= N || c >= d) continue;
      if constexpr (kFuse) {  // into every cluster CTA's copy of the tile's attention output (d even: pairs)
        const int ldc = p.C + 8;
        bf16* ao = reinterpret_cast<bf16*>(smem + L.ao) + (row - t0 * 16) * ldc + h * d + c;
        const __nv_bfloat162 v2 = __floats2bfloat162_rn(o[2 * half], o[2 * half + 1]);
        for (int q = 0; q < p.H; ++q)
          *reinterpret_cast<__nv_bfloat162*>(cooperative_groups::this_cluster().map_shared_rank(ao, q)) = v2;
        continue;
      }
      bf16* dst = p.out + (int64_t(b) * N + row) * p.ldo + h * d + c;
      const float x0 = o[2 * half], x1 = o[2 * half + 1];
      if (p.pairs && c + 1 < d) {
        *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(x0, x1);
      } else {
        dst[0] = __float2bfloat16_rn(x0);
        if (c + 1 < d) dst[1] = __float2bfloat16_rn(x1);
      }
    }
  };
  if constexpr (kFuse) ptx::cluster_wait_acquire();  // every CTA of the cluster runs (before the remote stores)
  for_units([&](const UnitRows& r, int nt, float(&z)[4], bool kept) {
    if (!kept) tile_z(r, nt, z);
    emit(r, nt, z);
  });
  if constexpr (kFuse) {
    // ---- 4. (fused) the tile's proj product, then the residual + LayerNorm + router + mask of rows h, h + H, ..
    ptx::cp_async_wait<0>();        // the epilogue's operands (visible to the CTA after the barrier)
    ptx::cluster_arrive_release();  // the attention output of every head is in every CTA
    ptx::cluster_wait_acquire();
    const int C = p.C, ldc = C + 8, NTc = C / 8, row0 = t0 * 16;
    ptx::mbar_wait_parity(reinterpret_cast<uint64_t*>(smem + L.bar), 0);  // the proj weight
    const bf16* AOs = reinterpret_cast<const bf16*>(smem + L.ao);
    const bf16* Wps = reinterpret_cast<const bf16*>(smem + L.wp);
    float* Xp = reinterpret_cast<float*>(smem + L.xp);
    const float* ep = reinterpret_cast<const float*>(smem + L.ep);
    for (int nt0 = warp; nt0 < NTc; nt0 += 2 * W) {  // two column tiles per pass
      const int nt1 = nt0 + W;
      // four independent mma chains: the two tiles, each over the even and the odd k-steps (added at the end)
      float a0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, a1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      float e0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, e1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int ks = 0; ks < C; ks += 32) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int k = ks + 16 * j;
          if (k >= C) break;
          uint32_t a[4];
          ptx::ldmatrix_x4(a, AOs + (lane & 15) * ldc + k + (lane >> 4) * 8);
          const bf16* w0 = Wps + (nt0 * 8 + g) * ldc + k + 2 * q4;
          ptx::mma_bf16(j ? e0 : a0, a, ld_pair(w0), ld_pair(w0 + 8));
          if (nt1 < NTc) {
            const bf16* w1 = Wps + (nt1 * 8 + g) * ldc + k + 2 * q4;
            ptx::mma_bf16(j ? e1 : a1, a, ld_pair(w1), ld_pair(w1 + 8));
          }
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) a0[i] += e0[i], a1[i] += e1[i];
      auto put = [&](int nt, const float(&acc)[4]) {
        const int c = nt * 8 + 2 * q4;
        Xp[g * C + c] = acc[0], Xp[g * C + c + 1] = acc[1];
        Xp[(g + 8) * C + c] = acc[2], Xp[(g + 8) * C + c + 1] = acc[3];
      };
      put(nt0, a0);
      if (nt1 < NTc) put(nt1, a1);
    }
    __syncthreads();
    constexpr int kG = 16, kS = 4;  // as moe_ln_route_mask_forward's kernel for C <= 256: the same bits
    const int grp = tid / kG, rows = (16 - h + p.H - 1) / p.H;  // this CTA's rows of the tile: h, h + H, ...
    if (warp * 32 >= rows * kG) return;                         // whole warps (the groups shuffle)
    const int i = h + grp * p.H, n = row0 + i;
    const bool valid = grp < rows && n < N;
    const int64_t gr = int64_t(b) * N + (valid ? n : 0);
    const float* xin = reinterpret_cast<const float*>(smem + L.xin);
    moe_rows::linear_residual_ln_route_mask<kG, kS>(
        Xp + (valid ? i : 0) * C, ep, xin + (valid ? i : 0) * C, p.x + gr * p.ldx, valid, tid % kG, C, p.Ka, p.eps,
        ep + C, ep + 2 * C, ep + 3 * C, ep + 5 * C, p.xa + gr * p.ldxa, p.choice ? p.choice + gr : nullptr);
  }
#endif
}

// x = hi + mid + lo (bf16 parts), stored at dst[0], dst[part_stride], dst[2 part_stride]
__device__ __forceinline__ void store_split3(bf16* dst, size_t part_stride, float x) {
  bf16 hi, mid, lo;
  split3(x, hi, mid, lo);
  dst[0] = hi, dst[part_stride] = mid, dst[2 * part_stride] = lo;
}

// One CTA per head: its PrepLayout block, every byte written (padding zero).
__global__ void hamming_prepare_kernel(unsigned char* prep, const float* anchors, const float* mu, const float* A,
                                       int d, int dp, int nbits, int bt, int m) {
  const int h = blockIdx.x, tid = threadIdx.x, T = blockDim.x, ldb = dp + 8;
  const PrepLayout P = prep_layout(dp, bt);
  unsigned char* base = prep + int64_t(h) * P.bytes;
  for (size_t i = tid; i < P.bytes; i += T) base[i] = 0;
  __syncthreads();
  const float* anc = anchors + int64_t(h) * m * d;
  const float* Ah = A + int64_t(h) * nbits * m;
  bf16* Anc = reinterpret_cast<bf16*>(base + P.anc);
  bf16* Apr = reinterpret_cast<bf16*>(base + P.a);
  for (int i = tid; i < m * d; i += T) {
    const int j = i / d, c = i - j * d;
    store_split3(Anc + j * ldb + c, size_t(kMaxM) * ldb, anc[i]);
  }
  for (int i = tid; i < nbits * m; i += T) {
    const int r = i / m, j = i - r * m;
    store_split3(Apr + r * kLdA + j, size_t(bt) * 8 * kLdA, Ah[i]);
  }
  for (int j = tid; j < m; j += T) {
    float s = 0.0f;  // in order, as the CPU's
    for (int i = 0; i < d; ++i) s = fmaf(anc[j * d + i], anc[j * d + i], s);
    reinterpret_cast<float*>(base + P.aa)[j] = s;
    reinterpret_cast<float*>(base + P.mu)[j] = mu[h * m + j];
  }
}

void check_dims(int N, int C, int H, int nbits, int m) {
  SAV_CHECK(N >= 1 && N <= kMaxN && H >= 1 && C % H == 0 && C / H >= 1 && C / H <= kMaxD && nbits >= 1 &&
                nbits <= kMaxBits && m >= 1 && m <= kMaxM,
            "hamming attention: N=" << N << " C=" << C << " H=" << H << " nbits=" << nbits << " m=" << m
                                    << " not supported (N <= " << kMaxN << ", head size <= " << kMaxD
                                    << ", nbits <= " << kMaxBits << ", anchors <= " << kMaxM << ")");
}

}  // namespace

size_t hamming_attention_prepared_bytes(int C, int H, int nbits) {
  SAV_CHECK(H >= 1 && C % H == 0 && C / H >= 1 && nbits >= 1,
            "hamming attention: C=" << C << " H=" << H << " nbits=" << nbits << " not supported");
  const HamParams p = ham_dims(1, 1, C, H, nbits, 1);
  return size_t(H) * prep_layout(p.dp, p.bt).bytes;
}

void hamming_attention_prepare(void* prep, const float* anchors, const float* mu, const float* A, int C, int H,
                               int nbits, int m, cudaStream_t stream) {
  SAV_CHECK(prep && anchors && mu && A, "hamming attention prepare: null pointer");
  SAV_CHECK(reinterpret_cast<uintptr_t>(prep) % 16 == 0, "hamming attention prepare: buffer not 16-byte aligned");
  check_dims(1, C, H, nbits, m);
  const HamParams p = ham_dims(1, 1, C, H, nbits, m);
  hamming_prepare_kernel<<<H, 256, 0, stream>>>(static_cast<unsigned char*>(prep), anchors, mu, A, p.d, p.dp, nbits,
                                                p.bt, m);
  SAV_CUDA_CHECK_LAUNCH();
}

bool hamming_attention_supports(int N, int C, int H, int nbits, int m) {
  if (!(N >= 1 && N <= kMaxN && H >= 1 && C >= H && C % H == 0 && C / H <= kMaxD && nbits >= 1 && nbits <= kMaxBits &&
        m >= 1 && m <= kMaxM))
    return false;
  // The largest case (N 256, d 64, 64 bits) needs about 147 KB; sm_90 offers 227 KB.
  const HamParams p = ham_dims(1, N, C, H, nbits, m);
  return device_available() ? device_cc_major() >= 9 && ham_smem(p).total <= size_t(max_smem_per_block()) : true;
}

void hamming_attention_forward_ld(bf16* out, int ldo, const bf16* qk, int ldqk, const bf16* v, int ldv,
                                  const void* prep, const float* conv_w, int B, int N, int C, int H, int nbits, int m,
                                  cudaStream_t stream, int split) {
  SAV_CHECK(out && qk && v && prep && conv_w, "hamming attention: null pointer");
  SAV_CHECK(reinterpret_cast<uintptr_t>(prep) % 16 == 0, "hamming attention: prepared buffer not 16-byte aligned");
  check_dims(N, C, H, nbits, m);
  SAV_CHECK(ldo >= C && ldqk >= C && ldv >= C,
            "hamming attention: row strides " << ldo << ", " << ldqk << ", " << ldv << " below the width " << C);
  SAV_CHECK(B >= 0, "hamming attention: negative batch " << B);
  if (B == 0) return;
  SAV_CHECK(int64_t(B) * H <= (int64_t(1) << 31) - 1, "hamming attention: B*H too large");
  HamParams p = ham_inputs(B, N, C, H, nbits, m, qk, ldqk, v, ldv, prep, conv_w);
  p.out = out, p.ldo = ldo;
  p.pairs = p.d % 2 == 0 && ldo % 2 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0;
  if (split == 0) split = hamming_attention_split(B, N, H);
  SAV_CHECK(split >= 1 && split <= p.tiles,
            "hamming attention: " << split << " CTAs per (image, head); 1 to " << p.tiles << " (its 16-token tiles)");
  SAV_CHECK(device_cc_major() >= 9, "hamming attention: needs a compute capability 9.0 device");
  SAV_CHECK(int64_t(B) * H * split <= (int64_t(1) << 31) - 1, "hamming attention: B*H*split too large");
  p.G = split;
  const size_t smem = ham_smem(p).total;
  SAV_CHECK(smem <= size_t(max_smem_per_block()), "hamming attention: needs "
                                                      << smem << " bytes of shared memory, the device offers "
                                                      << max_smem_per_block());
  launch_dependent(split > 1 ? hamming_kernel<1> : hamming_kernel<2>,
                   dim3(static_cast<unsigned>(int64_t(B) * H * split)), dim3(static_cast<unsigned>(ham_threads(N))),
                   smem, 1, stream, p);
}

bool hamming_attention_proj_supports(int B, int N, int C, int H, int nbits, int m) {
  if (!hamming_attention_supports(N, C, H, nbits, m) || B < 1 || H > 8 || C % 16 != 0 || C > 256 || (C / H) % 2 != 0)
    return false;
  HamParams p = ham_dims(B, N, C, H, nbits, m);
  if (hamming_attention_split(B, N, H) != p.tiles) return false;
  p.fuse = true;
  return device_available() ? ham_smem(p).total <= size_t(max_smem_per_block()) : ham_smem(p).total <= 227 * 1024;
}

void hamming_attention_proj_ln_mask_forward(float* x, int ldx, const bf16* qk, int ldqk, const bf16* v, int ldv,
                                            const void* prep, const float* conv_w, const bf16* wp, const float* bp,
                                            const float* ln_w, const float* ln_b, float eps, const float* wr,
                                            const float* br, bf16* xa, int ldxa, int8_t* choice, int B, int N, int C,
                                            int H, int nbits, int m, cudaStream_t stream) {
  const char* what = "hamming attention + proj + layernorm + mask";
  SAV_CHECK(x && qk && v && prep && conv_w && wp && bp && ln_w && ln_b && wr && br && xa, what << ": null pointer");
  check_dims(N, C, H, nbits, m);
  SAV_CHECK(hamming_attention_proj_supports(B, N, C, H, nbits, m),
            what << ": B=" << B << " N=" << N << " C=" << C << " H=" << H
                 << " not supported (one 16-token tile per CTA at the launcher's split, H <= 8, C % 16 == 0, C <= 256, "
                    "d even, shared memory)");
  const int Ka = moe_masked_cols(C);
  SAV_CHECK(ldqk >= C && ldv >= C && ldx >= C && ldx % 4 == 0 && ldxa >= Ka && ldxa % 4 == 0,
            what << ": row strides ldqk=" << ldqk << " ldv=" << ldv << " ldx=" << ldx << " ldxa=" << ldxa);
  SAV_CHECK(aligned16(prep) && aligned16(x) && aligned16(wp) && aligned16(bp) && aligned16(ln_w) && aligned16(ln_b) &&
                aligned16(wr) && reinterpret_cast<uintptr_t>(xa) % 8 == 0,
            what << ": misaligned pointers");
  HamParams p = ham_inputs(B, N, C, H, nbits, m, qk, ldqk, v, ldv, prep, conv_w);
  p.G = p.tiles;
  p.fuse = true, p.wp = wp, p.bp = bp, p.ln_w = ln_w, p.ln_b = ln_b, p.wr = wr, p.br = br, p.eps = eps;
  p.x = x, p.ldx = ldx, p.xa = xa, p.ldxa = ldxa, p.Ka = Ka, p.choice = choice;
  SAV_CHECK(int64_t(B) * H * p.G <= (int64_t(1) << 31) - 1, what << ": B*H*tiles too large");
  launch_dependent(hamming_kernel<1, true>, dim3(static_cast<unsigned>(int64_t(B) * H * p.G)),
                   dim3(static_cast<unsigned>(ham_threads(N))), ham_smem(p).total, H, stream, p);
}

int hamming_attention_split(int B, int N, int H) {
  const int64_t tiles = (std::max(N, 1) + 15) / 16, sms = device_available() ? sm_count() : 132;
  return static_cast<int>(std::clamp<int64_t>(sms / std::max<int64_t>(int64_t(B) * H, 1), 1, tiles));
}

}  // namespace sav::cuda
