// Small-M products with a whole-row epilogue in one launch (spec: ops.h, "Small-M products with a whole-row
// epilogue"): a thread-block cluster of G CTAs per tile of 16 rows.
//
// Legend: M rows, K in-features (Kp = K rounded up to 32: whole pairs of k-steps), Fc output columns of the product (C
// for a linear, Fs = moe_stack_rows(C) for a stacked MoE layer), nt = ceil(Fc / 8) column tiles, CTA r of a cluster
// owns column tiles r nt / G .. (r+1) nt / G - 1 (ntl of them), rpc = 16 / G rows of the tile whose epilogue it runs
// (rows r rpc ..). A k block is 64 columns of K (4 mma k-steps); a k part is 4 k blocks (256 columns), P = ceil(Kp /
// 256) parts.
//
// Phases:
//  0. staging, zero-filled past M, K and Fc (so no later loop checks bounds): the tile's 16 rows of the input and
//     the CTA's ntl x 8 rows of the weight by bulk copies (cp.async.bulk: the TMA unit, one copy per row and k part,
//     an mbarrier per k part: per-thread cp.async moved only ~12 bytes a cycle per SM here), and the epilogue's
//     operands (its residual rows, biases, LayerNorm and router weights) by cp.async, off its critical path;
//  1. products: warp w owns the CTA's column tiles w, w + 16, ...; per k block a fresh 4-mma chain (A by ldmatrix
//     from the row tile, B by ldmatrix from the weight rows; two blocks in flight), the blocks' results added in
//     order in registers as their k parts land;
//  2. each row's columns sent from the registers to the CTA that owns the row's epilogue (distributed shared
//     memory), then the one cluster barrier;
//  3. the epilogue of the CTA's rpc rows, ln::row_group(C) lanes per row, with moe_rows' arithmetic (the same as
//     the separate row kernels').
// Deterministic, and the same bits for every G and M: a column's sum runs over fixed k blocks (K only), in order.
#include <cooperative_groups.h>

#include <algorithm>

#include "ops/cuda/launch.cuh"
#include "ops/cuda/moe_rows.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/ptx.cuh"

namespace sav::cuda {

namespace {

namespace cg = cooperative_groups;

constexpr int kRT = 16;        // rows per tile (the mma's M)
constexpr int kThreads = 512;  // 16 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBlockK = 64;     // columns of K per k block (4 k-steps)
constexpr int kPartBlocks = 4;  // k blocks per k part
constexpr int kMaxParts = 4;    // K <= 1024
constexpr int kPartK = kBlockK * kPartBlocks;
constexpr int kTilesPerWarp = 4;  // column tiles per CTA <= 64

enum RowsEpi { rows_epi_linear_ln_mask = 0, rows_epi_moe_residual_ln = 1 };

struct RowsParams {
  const bf16* a;  // (M, K) rows lda apart
  const bf16* w;  // (Fc, K) rows K apart
  int lda, M, K, Kp, Fc, C, G, nt, parts;
  int epi;  // RowsEpi
  float* x;
  int ldx;
  float eps;
  const float *ln_w, *ln_b, *br;
  int8_t* choice;
  // linear + LayerNorm + router + mask
  const float *b, *wr;
  bf16* xa;
  int ldxa, Ka;
  // stacked MoE + residual + LayerNorm
  const float *b0, *b1;
  int gate;
  bf16* xn;
  int ldxn;
};

__host__ __device__ inline int ld_k(int Kp) { return Kp + 8; }  // bf16 row stride of the staged rows (16-byte rows)
__host__ __device__ inline int max_local_tiles(int nt, int G) { return (nt + G - 1) / G; }

struct RowsSmem {
  size_t bar, as, ws, rs, ep, total;  // byte offsets
};
// The epilogue's operands, staged at the start (f32, offsets in floats from RowsSmem::ep): the rpc residual rows, then
// C each of b0 (the linear's bias), b1, ln_w, ln_b, 2C of wr, 4 of br.
struct EpiOperands {
  int x, b0, b1, lnw, lnb, wr, br, floats;
};
__host__ __device__ inline EpiOperands epi_operands(int C, int rpc) {
  EpiOperands e{};
  int o = 0;
  e.x = o, o += rpc * C;
  e.b0 = o, o += C;
  e.b1 = o, o += C;
  e.lnw = o, o += C;
  e.lnb = o, o += C;
  e.wr = o, o += 2 * C;
  e.br = o, o += 4;
  e.floats = o;
  return e;
}
__host__ __device__ inline int k_blocks(int Kp) { return (Kp + kBlockK - 1) / kBlockK; }
__host__ __device__ inline RowsSmem rows_smem(int Kp, int Fc, int C, int nt, int G) {
  const int ntl = max_local_tiles(nt, G), ld = ld_k(Kp);
  RowsSmem s{};
  size_t o = 0;
  s.bar = o, o = align16(o + kMaxParts * sizeof(uint64_t));
  s.as = o, o = align16(o + size_t(kRT) * ld * sizeof(bf16));
  s.ws = o, o = align16(o + size_t(ntl) * 8 * ld * sizeof(bf16));
  s.rs = o, o = align16(o + size_t(kRT / G) * Fc * sizeof(float));
  s.ep = o, o = align16(o + size_t(epi_operands(C, kRT / G).floats) * sizeof(float));
  s.total = o;
  return s;
}

// The epilogue of one row: sr its product row, xs its residual row and ep the other operands (shared memory).
template <int kG, int kS>
__device__ __forceinline__ void epilogue_row(const RowsParams& p, const float* sr, const float* xs, const float* ep,
                                             const EpiOperands& E, int row, int lane) {
  const bool valid = row < p.M;
  const int64_t r = valid ? row : 0;
  float* xg = p.x + r * p.ldx;
  if (p.epi == rows_epi_moe_residual_ln) {
    moe_rows::epilogue_residual_ln<kG, kS>(sr, xs, xg, p.xn + r * p.ldxn, p.choice ? p.choice + r : nullptr, valid,
                                           lane, p.C, p.gate, p.eps, ep + E.b0, ep + E.b1, ep + E.br, ep + E.lnw,
                                           ep + E.lnb);
    return;
  }
  // x += s + b (t = s + b, then x + t), then the LayerNorm + router + mask of the new row
  moe_rows::linear_residual_ln_route_mask<kG, kS>(sr, ep + E.b0, xs, xg, valid, lane, p.C, p.Ka, p.eps, ep + E.lnw,
                                                  ep + E.lnb, ep + E.wr, ep + E.br, p.xa + r * p.ldxa,
                                                  p.choice ? p.choice + r : nullptr);
}

// kG lanes per epilogue row (ln::row_group(C)), kS float4 slots per lane (C <= 4 kG kS): only the epilogue depends on
// them.
template <int kG, int kS>
__global__ void __launch_bounds__(kThreads, 1) rows_fused_kernel(const __grid_constant__ RowsParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // thread-block clusters need sm_90; the launcher refuses older devices
#else
  extern __shared__ __align__(16) unsigned char smem[];
  const int G = p.G, Kp = p.Kp, ld = ld_k(Kp), parts = p.parts;
  const RowsSmem L = rows_smem(Kp, p.Fc, p.C, p.nt, G);
  bf16* As = reinterpret_cast<bf16*>(smem + L.as);
  bf16* Ws = reinterpret_cast<bf16*>(smem + L.ws);
  float* Rs = reinterpret_cast<float*>(smem + L.rs);  // [rpc][Fc]: the rows whose epilogue this CTA runs

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = G == 1 ? 0 : static_cast<int>(cluster.block_rank());
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = static_cast<int>(blockIdx.x) / G, row0 = tile * kRT;
  const int n0 = rank * p.nt / G, ntl = (rank + 1) * p.nt / G - n0;  // this CTA's column tiles
  const int rpc = kRT / G;
  const EpiOperands E = epi_operands(p.C, rpc);
  float* ep = reinterpret_cast<float*>(smem + L.ep);
  // no remote shared-memory write before every CTA of the cluster runs: arrive now (no ordering needed), wait before
  // the first one
  if (G > 1) ptx::cluster_arrive_relaxed();
  ptx::pdl_trigger();  // dependent launch (common.h): what depends on the previous kernel is staged after pdl_wait

  // ---- 0. staging: the tile's rows and the CTA's weight rows by bulk copies, one mbarrier per k part (k < K;
  // zeros past K, M and Fc by plain stores); the epilogue's operands by cp.async ----
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + L.bar);
  const int arows = min(kRT, p.M - row0), wrows = min(ntl * 8, p.Fc - n0 * 8);  // rows that exist
  auto part_k = [&](int s, int& k0, int& k1) { k0 = s * kPartK, k1 = min(p.K, k0 + kPartK); };
  if (tid == 0) {
    for (int s = 0; s < parts; ++s) {
      int k0, k1;
      part_k(s, k0, k1);
      ptx::mbar_init(bars + s, 1);
      ptx::mbar_arrive_expect_tx(bars + s, unsigned(arows + wrows) * unsigned(max(k1 - k0, 0)) * 2u);
    }
  }
  {
    const bf16 zero = __float2bfloat16_rn(0.0f);
    for (int i = tid; i < (kRT + ntl * 8) * (Kp - p.K); i += kThreads) {  // columns K .. Kp - 1 of every row
      const int rr = i / (Kp - p.K), c = p.K + i - rr * (Kp - p.K);
      (rr < kRT ? As + rr * ld : Ws + (rr - kRT) * ld)[c] = zero;
    }
    for (int i = tid; i < (kRT - arows) * p.K; i += kThreads) As[(arows + i / p.K) * ld + i % p.K] = zero;
    for (int i = tid; i < (ntl * 8 - wrows) * p.K; i += kThreads) Ws[(wrows + i / p.K) * ld + i % p.K] = zero;
    const bool moe = p.epi == rows_epi_moe_residual_ln;
    for (int c = tid * 4; c < p.C; c += kThreads * 4) {
      ptx::cp_async16(ep + E.b0 + c, (moe ? p.b0 : p.b) + c);
      if (moe) ptx::cp_async16(ep + E.b1 + c, p.b1 + c);
      ptx::cp_async16(ep + E.lnw + c, p.ln_w + c);
      ptx::cp_async16(ep + E.lnb + c, p.ln_b + c);
    }
    if (!moe)
      for (int c = tid * 4; c < 2 * p.C; c += kThreads * 4) ptx::cp_async16(ep + E.wr + c, p.wr + c);
    if (tid < 2) ptx::cp_async4(ep + E.br + tid, p.br + tid);
    ptx::cp_async_commit();
  }
  __syncthreads();  // the barriers are initialised (and armed) before any copy signals them
  // the weight rows first, then (after the previous kernel has finished) the tile's rows and residual rows
  auto copy_rows = [&](int rows, bool arow) {
    for (int i = tid; i < rows * parts; i += kThreads) {
      const int rr = i / parts, s = i - rr * parts;
      int k0, k1;
      part_k(s, k0, k1);
      if (k1 <= k0) continue;
      const bf16* src = arow ? p.a + int64_t(row0 + rr) * p.lda : p.w + int64_t(n0 * 8 + rr) * p.K;
      ptx::bulk_copy_g2s((arow ? As : Ws) + rr * ld + k0, src + k0, unsigned(k1 - k0) * 2u, bars + s);
    }
  };
  copy_rows(wrows, false);
  ptx::pdl_wait();
  copy_rows(arows, true);
  {
    const int C4 = p.C / 4;
    for (int i = tid; i < rpc * C4; i += kThreads) {  // this CTA's residual rows (zeros past M)
      const int rr = i / C4, c = (i - rr * C4) * 4, row = row0 + rank * rpc + rr;
      ptx::cp_async16(ep + E.x + rr * p.C + c, row < p.M ? p.x + int64_t(row) * p.ldx + c : p.x, row < p.M);
    }
    ptx::cp_async_commit();
  }

  // ---- 1. products: warp w owns the column tiles w, w + 16, ... (at most kTilesPerWarp); per k block a fresh 4-mma
  // chain (two blocks in flight), the blocks' results added in order as their k parts land ----
  const int g = lane >> 2, q4 = lane & 3;
  const int ksteps = Kp / 16, KB = k_blocks(Kp);  // Kp % 32 == 0: k-steps come in pairs
  float sum[kTilesPerWarp][4];
  auto block_product = [&](const bf16* wrow, int kb, float(&acc)[4]) {
    acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
#pragma unroll
    for (int h = 0; h < kBlockK / 32; ++h) {  // two k-steps per B ldmatrix.x4
      const int ks = kb * (kBlockK / 16) + 2 * h;
      if (ks >= ksteps) break;
      uint32_t bw[4];
      ptx::ldmatrix_x4(bw, wrow + ks * 16);  // b0, b1 of k-step ks, then of ks + 1
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t af[4];
        ptx::ldmatrix_x4(af, As + (lane & 15) * ld + (ks + j) * 16 + (lane >> 4) * 8);
        ptx::mma_bf16(acc, af, bw[2 * j], bw[2 * j + 1]);
      }
    }
  };
#pragma unroll
  for (int j = 0; j < kTilesPerWarp; ++j) {
    const int nl = warp + kWarps * j;
    if (nl >= ntl) break;
    const bf16* wrow = Ws + (nl * 8 + (lane & 7)) * ld + (lane >> 3) * 8;
    for (int s = 0; s < parts; ++s) {
      if (j == 0) ptx::mbar_wait_parity(bars + s, 0);
      const int kb1 = min(KB, (s + 1) * kPartBlocks);
      for (int kb = s * kPartBlocks; kb < kb1; kb += 2) {
        float a0[4], a1[4];
        block_product(wrow, kb, a0);
        if (kb + 1 < kb1) block_product(wrow, kb + 1, a1);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          sum[j][i] = kb == 0 ? a0[i] : sum[j][i] + a0[i];
          if (kb + 1 < kb1) sum[j][i] += a1[i];
        }
      }
    }
  }
  ptx::cp_async_wait<0>();  // the epilogue's operands

  // ---- 2. each row's columns to the CTA that runs the row's epilogue (distributed shared memory) ----
  if (G > 1) ptx::cluster_wait_acquire();  // every CTA of the cluster has started
#pragma unroll
  for (int j = 0; j < kTilesPerWarp; ++j) {
    const int nl = warp + kWarps * j;
    if (nl >= ntl) break;
    const int col = (n0 + nl) * 8 + 2 * q4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int rr = g + 8 * half, dst = rr / rpc, slot = rr - dst * rpc;
      float* rs = (G == 1 ? Rs : cluster.map_shared_rank(Rs, dst)) + slot * p.Fc + col;
      if (col < p.Fc) rs[0] = sum[j][2 * half];
      if (col + 1 < p.Fc) rs[1] = sum[j][2 * half + 1];
    }
  }
  if (G > 1) {
    ptx::cluster_arrive_release();
    ptx::cluster_wait_acquire();
  } else {
    __syncthreads();
  }

  // ---- 3. the epilogue of this CTA's rows ----
  const int grp = tid / kG, glane = tid % kG;
  if (grp >= rpc) return;  // whole warps: rpc kG is a multiple of 32 (rpc >= 2 when kG = 16)
  epilogue_row<kG, kS>(p, Rs + grp * p.Fc, ep + E.x + grp * p.C, ep, E, row0 + rank * rpc + grp, glane);
#endif
}

RowsParams rows_params(const bf16* a, int lda, const bf16* w, int M, int K, int C, int Fc, int G) {
  RowsParams p{};
  p.a = a, p.w = w, p.lda = lda, p.M = M, p.K = K, p.Kp = (K + 31) / 32 * 32, p.Fc = Fc, p.C = C;
  p.G = G;
  p.nt = (Fc + 7) / 8;
  p.parts = (p.Kp + kPartK - 1) / kPartK;
  return p;
}

// The cluster size a launcher runs: `cluster` (1, 2, 4 or 8), or 0: rows_fused_cluster(M).
int resolve_cluster(const char* what, int cluster, int M) {
  SAV_CHECK(cluster == 0 || cluster == 1 || cluster == 2 || cluster == 4 || cluster == 8,
            what << ": cluster size " << cluster << " must be 1, 2, 4 or 8 (0: automatic)");
  return cluster == 0 ? rows_fused_cluster(M) : cluster;
}

void check_rows(const char* what, const bf16* a, int lda, const bf16* w, int M, int K, int C, int Fc, int G) {
  SAV_CHECK(a && w, what << ": null pointer");
  SAV_CHECK(M >= 0 && K >= 8 && K % 8 == 0 && K <= kMaxParts * kPartK && C >= 4 && C % 4 == 0 && C <= ln::kMaxCols &&
                lda >= K && lda % 8 == 0,
            what << ": sizes M=" << M << " K=" << K << " C=" << C << " lda=" << lda
                 << " not supported (K % 8 == 0, K <= " << kMaxParts * kPartK << ", C % 4 == 0, C <= " << ln::kMaxCols
                 << ", lda >= K and a multiple of 8)");
  SAV_CHECK(aligned16(a) && aligned16(w), what << ": the input and the weight must be 16-byte aligned");
  SAV_CHECK(rows_fused_supports(K, C, Fc, G), what << ": K=" << K << " C=" << C << " " << Fc
                                                   << " output columns do not fit one CTA's shared memory at "
                                                   << "cluster size " << G);
  SAV_CHECK(device_cc_major() >= 9, what << ": needs a compute capability 9.0 device (thread-block clusters)");
}

void launch_rows(const RowsParams& p, cudaStream_t stream) {
  if (p.M == 0) return;
  const size_t smem = rows_smem(p.Kp, p.Fc, p.C, p.nt, p.G).total;
  const int64_t tiles = (int64_t(p.M) + kRT - 1) / kRT;
  SAV_CHECK(tiles * p.G <= 0x7FFFFFFF, "rows fused: " << p.M << " rows exceed the grid");
  // the epilogue's lanes per row and float4 slots per lane: the smallest instantiation that holds C
  const int kg = ln::row_group(p.C), slots = (p.C / 4 + kg - 1) / kg;
  void (*kernel)(RowsParams) = kg == 32     ? rows_fused_kernel<32, 8>
                               : slots <= 2 ? rows_fused_kernel<16, 2>
                               : slots <= 4 ? rows_fused_kernel<16, 4>
                                            : rows_fused_kernel<16, 8>;
  launch_dependent(kernel, dim3(static_cast<unsigned>(tiles * p.G)), dim3(kThreads), smem, p.G, stream, p);
}

}  // namespace

bool rows_fused_supports(int K, int C, int Fcols, int cluster) {
  if (!(K >= 8 && K % 8 == 0 && K <= kMaxParts * kPartK && C >= 4 && C % 4 == 0 && C <= ln::kMaxCols && Fcols >= C &&
        (cluster == 1 || cluster == 2 || cluster == 4 || cluster == 8)))
    return false;
  const int Kp = (K + 31) / 32 * 32, nt = (Fcols + 7) / 8;
  if (max_local_tiles(nt, cluster) > kTilesPerWarp * kWarps) return false;
  const size_t smem = rows_smem(Kp, Fcols, C, nt, cluster).total;
  return device_available() ? smem <= size_t(max_smem_per_block()) : smem <= size_t(227) * 1024;
}

int rows_fused_cluster(int M) {
  const int64_t tiles = (int64_t(std::max(M, 1)) + kRT - 1) / kRT, sms = device_available() ? sm_count() : 132;
  for (int g = 8; g > 1; g /= 2)
    if (tiles * g <= sms) return g;
  return 1;
}

void rows_linear_ln_mask_forward(float* x, int ldx, const bf16* a, int lda, const bf16* w, const float* b, int M, int K,
                                 int C, const float* ln_w, const float* ln_b, float eps, const float* wr,
                                 const float* br, bf16* xa, int ldxa, int8_t* choice, cudaStream_t stream,
                                 int cluster) {
  const char* what = "rows linear+layernorm+mask";
  const int G = resolve_cluster(what, cluster, M);
  check_rows(what, a, lda, w, M, K, C, C, G);
  SAV_CHECK(x && b && ln_w && ln_b && wr && br && xa, what << ": null pointer");
  const int Ka = moe_masked_cols(C);
  SAV_CHECK(
      ldx >= C && ldx % 4 == 0 && ldxa >= Ka && ldxa % 4 == 0,
      what << ": row strides ldx=" << ldx << " ldxa=" << ldxa << " (ldx >= C, ldxa >= " << Ka << ", multiples of 4)");
  SAV_CHECK(aligned16(x) && aligned16(b) && aligned16(ln_w) && aligned16(ln_b) && aligned16(wr) &&
                reinterpret_cast<uintptr_t>(xa) % 8 == 0,
            what << ": misaligned pointers");
  RowsParams p = rows_params(a, lda, w, M, K, C, C, G);
  p.epi = rows_epi_linear_ln_mask;
  p.x = x, p.ldx = ldx, p.b = b, p.ln_w = ln_w, p.ln_b = ln_b, p.eps = eps, p.wr = wr, p.br = br;
  p.xa = xa, p.ldxa = ldxa, p.Ka = Ka, p.choice = choice;
  launch_rows(p, stream);
}

void rows_moe_residual_ln_forward(float* x, int ldx, int8_t* choice, const bf16* h, int ldh, const bf16* ws,
                                  const float* b0, const float* b1, const float* br, int M, int K, int C, MoeGate gate,
                                  bf16* xn, int ldxn, const float* ln_w, const float* ln_b, float eps,
                                  cudaStream_t stream, int cluster) {
  const char* what = "rows moe+residual+layernorm";
  const int Fs = moe_stack_rows(C), G = resolve_cluster(what, cluster, M);
  check_rows(what, h, ldh, ws, M, K, C, Fs, G);
  SAV_CHECK(x && b0 && b1 && br && xn && ln_w && ln_b, what << ": null pointer");
  SAV_CHECK(gate == moe_gate_straight_through || gate == moe_gate_prob, what << ": unknown gate " << int(gate));
  SAV_CHECK(ldx >= C && ldx % 4 == 0 && ldxn >= C && ldxn % 4 == 0,
            what << ": row strides ldx=" << ldx << " ldxn=" << ldxn << " (>= C, multiples of 4)");
  SAV_CHECK(aligned16(x) && aligned16(b0) && aligned16(b1) && aligned16(ln_w) && aligned16(ln_b) &&
                reinterpret_cast<uintptr_t>(xn) % 8 == 0,
            what << ": misaligned pointers");
  RowsParams p = rows_params(h, ldh, ws, M, K, C, Fs, G);
  p.epi = rows_epi_moe_residual_ln;
  p.x = x, p.ldx = ldx, p.b0 = b0, p.b1 = b1, p.br = br, p.gate = gate, p.xn = xn, p.ldxn = ldxn;
  p.ln_w = ln_w, p.ln_b = ln_b, p.eps = eps, p.choice = choice;
  launch_rows(p, stream);
}

}  // namespace sav::cuda
