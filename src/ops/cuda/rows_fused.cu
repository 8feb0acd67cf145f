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
//  0. staging (cp.async, zero-filled past M, K and Fc, so no later loop checks bounds): the tile's 16 rows of the
//     input and the CTA's ntl x 8 rows of the weight, one commit group per k part;
//  1. products, part by part as each group lands: a task is (column tile, k block), warp w takes tasks w, w + 16, ...
//     of the part; a task is a fresh 4-mma chain (A by ldmatrix from the row tile, B by ldmatrix from the weight
//     rows) whose 16 x 8 partial goes to shared memory;
//  2. per output (row, column): the k blocks' partials added in order, sent to the CTA that owns the row's epilogue
//     (distributed shared memory), then the one cluster barrier;
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

__host__ __device__ inline size_t align16(size_t x) { return (x + 15) / 16 * 16; }
__host__ __device__ inline int ld_k(int Kp) { return Kp + 8; }  // bf16 row stride of the staged rows (16-byte rows)
__host__ __device__ inline int max_local_tiles(int nt, int G) { return (nt + G - 1) / G; }

struct RowsSmem {
  size_t as, ws, ps, rs, total;  // byte offsets
};
__host__ __device__ inline int k_blocks(int Kp) { return (Kp + kBlockK - 1) / kBlockK; }
__host__ __device__ inline RowsSmem rows_smem(int Kp, int Fc, int nt, int G) {
  const int ntl = max_local_tiles(nt, G), ld = ld_k(Kp);
  RowsSmem s{};
  size_t o = 0;
  s.as = o, o = align16(o + size_t(kRT) * ld * sizeof(bf16));
  s.ws = o, o = align16(o + size_t(ntl) * 8 * ld * sizeof(bf16));
  s.ps = o, o = align16(o + size_t(ntl) * k_blocks(Kp) * kRT * 8 * sizeof(float));
  s.rs = o, o = align16(o + size_t(kRT / G) * Fc * sizeof(float));
  s.total = o;
  return s;
}

// cp.async.wait_group with a run-time count (at most kMaxParts - 1 groups left in flight)
__device__ __forceinline__ void wait_parts(int pending) {
  switch (pending) {
    case 3:
      ptx::cp_async_wait<3>();
      break;
    case 2:
      ptx::cp_async_wait<2>();
      break;
    case 1:
      ptx::cp_async_wait<1>();
      break;
    default:
      ptx::cp_async_wait<0>();
  }
}

template <int kG>
__device__ __forceinline__ void epilogue_row(const RowsParams& p, const float* sr, int row, int lane) {
  const bool valid = row < p.M;
  const int64_t r = valid ? row : 0;
  if (p.epi == rows_epi_moe_residual_ln) {
    moe_rows::epilogue_residual_ln<kG>(sr, p.x + r * p.ldx, p.xn + r * p.ldxn, p.choice ? p.choice + r : nullptr, valid,
                                       lane, p.C, p.gate, p.eps, p.b0, p.b1, p.br, p.ln_w, p.ln_b);
    return;
  }
  // x += s + b (t = s + b, then x + t), then the LayerNorm + router + mask of the new row
  const int C4 = p.C / 4;
  float4* x4 = reinterpret_cast<float4*>(p.x + r * p.ldx);
  const float4 *s4 = reinterpret_cast<const float4*>(sr), *b4 = reinterpret_cast<const float4*>(p.b);
  float4 v[ln::kMaxPer4];
#pragma unroll
  for (int k = 0; k < ln::kMaxPer4; ++k) {
    const int c = lane + kG * k;
    v[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (valid && c < C4) {
      const float4 s = s4[c], bb = b4[c];
      v[k] = moe_rows::res_add(
          x4[c], make_float4(__fadd_rn(s.x, bb.x), __fadd_rn(s.y, bb.y), __fadd_rn(s.z, bb.z), __fadd_rn(s.w, bb.w)));
      x4[c] = v[k];
    }
  }
  moe_rows::ln_route_mask<kG>(v, lane, valid, p.C, p.Ka, p.eps, p.ln_w, p.ln_b, p.wr, p.br, p.xa + r * p.ldxa,
                              p.choice ? p.choice + r : nullptr);
}

__global__ void __launch_bounds__(kThreads, 1) rows_fused_kernel(const __grid_constant__ RowsParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // thread-block clusters need sm_90; the launcher refuses older devices
#else
  extern __shared__ __align__(16) unsigned char smem[];
  const int G = p.G, Kp = p.Kp, ld = ld_k(Kp), parts = p.parts;
  const RowsSmem L = rows_smem(Kp, p.Fc, p.nt, G);
  bf16* As = reinterpret_cast<bf16*>(smem + L.as);
  bf16* Ws = reinterpret_cast<bf16*>(smem + L.ws);
  float* Ps = reinterpret_cast<float*>(smem + L.ps);  // [local tile][k block][row][8]
  float* Rs = reinterpret_cast<float*>(smem + L.rs);  // [rpc][Fc]: the rows whose epilogue this CTA runs

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = G == 1 ? 0 : static_cast<int>(cluster.block_rank());
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = static_cast<int>(blockIdx.x) / G, row0 = tile * kRT;
  const int n0 = rank * p.nt / G, ntl = (rank + 1) * p.nt / G - n0;  // this CTA's column tiles
  const int rpc = kRT / G;
  // no remote shared-memory write before every CTA of the cluster runs: arrive now, wait before the first one
  auto started = G == 1 ? decltype(cluster.barrier_arrive()){} : cluster.barrier_arrive();

  // ---- 0. staging, one commit group per k part ----
  const int cpr = Kp / 8;  // 16-byte chunks of a staged row
  for (int s = 0; s < parts; ++s) {
    const int c0 = s * (kPartK / 8), c1 = min(cpr, c0 + kPartK / 8), cw = c1 - c0;
    for (int i = tid; i < kRT * cw; i += kThreads) {
      const int rr = i / cw, c = (c0 + i - rr * cw) * 8, row = row0 + rr;
      const bool ok = row < p.M && c < p.K;
      ptx::cp_async16(As + rr * ld + c, ok ? p.a + int64_t(row) * p.lda + c : p.a, ok);
    }
    for (int i = tid; i < ntl * 8 * cw; i += kThreads) {
      const int rr = i / cw, c = (c0 + i - rr * cw) * 8, f = n0 * 8 + rr;
      const bool ok = f < p.Fc && c < p.K;
      ptx::cp_async16(Ws + rr * ld + c, ok ? p.w + int64_t(f) * p.K + c : p.w, ok);
    }
    ptx::cp_async_commit();
  }

  // ---- 1. products, k part by k part: task (local column tile, k block), a fresh 4-mma chain each ----
  const int g = lane >> 2, q4 = lane & 3;
  const int ksteps = Kp / 16, KB = k_blocks(Kp);  // Kp % 32 == 0: k-steps come in pairs
  for (int s = 0; s < parts; ++s) {
    wait_parts(parts - 1 - s);
    __syncthreads();
    const int kb0 = s * kPartBlocks, nkb = min(kPartBlocks, KB - kb0);
    for (int t = warp; t < ntl * nkb; t += kWarps) {
      const int nl = t / nkb, kb = kb0 + t - nl * nkb;
      const bf16* wrow = Ws + (nl * 8 + (lane & 7)) * ld + (lane >> 3) * 8;
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
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
      float* ps = Ps + (nl * KB + kb) * (kRT * 8);
      ps[g * 8 + 2 * q4] = acc[0], ps[g * 8 + 2 * q4 + 1] = acc[1];
      ps[(g + 8) * 8 + 2 * q4] = acc[2], ps[(g + 8) * 8 + 2 * q4 + 1] = acc[3];
    }
  }
  __syncthreads();

  // ---- 2. the k blocks' sums, in order, to the CTA that runs the row's epilogue ----
  if (G > 1) cluster.barrier_wait(std::move(started));
  for (int i = tid; i < ntl * kRT * 8; i += kThreads) {
    const int nl = i / (kRT * 8), e = i - nl * (kRT * 8), rr = e / 8, col = (n0 + nl) * 8 + (e & 7);
    if (col >= p.Fc) continue;
    const float* ps = Ps + nl * KB * (kRT * 8) + e;
    float v = ps[0];
    for (int kb = 1; kb < KB; ++kb) v += ps[kb * (kRT * 8)];
    const int dst = rr / rpc, slot = rr - dst * rpc;
    float* rs = G == 1 ? Rs : cluster.map_shared_rank(Rs, dst);
    rs[slot * p.Fc + col] = v;
  }
  if (G > 1)
    cluster.sync();
  else
    __syncthreads();

  // ---- 3. the epilogue of this CTA's rows ----
  const int kG = ln::row_group(p.C);
  const int grp = tid / kG, glane = tid % kG;
  if (grp >= rpc) return;  // whole warps: rpc kG is a multiple of 32 (rpc >= 2 when kG = 16)
  const int row = row0 + rank * rpc + grp;
  if (kG == 16)
    epilogue_row<16>(p, Rs + grp * p.Fc, row, glane);
  else
    epilogue_row<32>(p, Rs + grp * p.Fc, row, glane);
#endif
}

bool aligned16(const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; }

RowsParams rows_params(const bf16* a, int lda, const bf16* w, int M, int K, int C, int Fc, int cluster) {
  RowsParams p{};
  p.a = a, p.w = w, p.lda = lda, p.M = M, p.K = K, p.Kp = (K + 31) / 32 * 32, p.Fc = Fc, p.C = C;
  p.G = cluster == 0 ? rows_fused_cluster(M) : cluster;
  p.nt = (Fc + 7) / 8;
  p.parts = (p.Kp + kPartK - 1) / kPartK;
  return p;
}

void check_rows(const char* what, const bf16* a, int lda, const bf16* w, int M, int K, int C, int Fc, int cluster) {
  SAV_CHECK(a && w, what << ": null pointer");
  SAV_CHECK(M >= 0 && K >= 8 && K % 8 == 0 && K <= kMaxParts * kPartK && C >= 4 && C % 4 == 0 && C <= ln::kMaxCols &&
                lda >= K && lda % 8 == 0,
            what << ": sizes M=" << M << " K=" << K << " C=" << C << " lda=" << lda
                 << " not supported (K % 8 == 0, K <= " << kMaxParts * kPartK << ", C % 4 == 0, C <= " << ln::kMaxCols
                 << ", lda >= K and a multiple of 8)");
  SAV_CHECK(cluster == 0 || cluster == 1 || cluster == 2 || cluster == 4 || cluster == 8,
            what << ": cluster size " << cluster << " must be 1, 2, 4 or 8 (0: automatic)");
  SAV_CHECK(aligned16(a) && aligned16(w), what << ": the input and the weight must be 16-byte aligned");
  SAV_CHECK(rows_fused_supports(K, C, Fc, cluster == 0 ? rows_fused_cluster(M) : cluster),
            what << ": K=" << K << " C=" << C << " " << Fc << " output columns do not fit one CTA's shared memory at "
                 << "cluster size " << (cluster == 0 ? rows_fused_cluster(M) : cluster));
  SAV_CHECK(device_cc_major() >= 9, what << ": needs a compute capability 9.0 device (thread-block clusters)");
}

void launch_rows(const RowsParams& p, cudaStream_t stream) {
  if (p.M == 0) return;
  const size_t smem = rows_smem(p.Kp, p.Fc, p.nt, p.G).total;
  const int64_t tiles = (int64_t(p.M) + kRT - 1) / kRT;
  SAV_CHECK(tiles * p.G <= 0x7FFFFFFF, "rows fused: " << p.M << " rows exceed the grid");
  launch_cluster(rows_fused_kernel, dim3(static_cast<unsigned>(tiles * p.G)), dim3(kThreads), smem, p.G, stream, p);
}

}  // namespace

bool rows_fused_supports(int K, int C, int Fcols, int cluster) {
  if (!(K >= 8 && K % 8 == 0 && K <= kMaxParts * kPartK && C >= 4 && C % 4 == 0 && C <= ln::kMaxCols && Fcols >= C &&
        (cluster == 1 || cluster == 2 || cluster == 4 || cluster == 8)))
    return false;
  const int Kp = (K + 31) / 32 * 32, nt = (Fcols + 7) / 8;
  const size_t smem = rows_smem(Kp, Fcols, nt, cluster).total;
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
  check_rows(what, a, lda, w, M, K, C, C, cluster);
  SAV_CHECK(x && b && ln_w && ln_b && wr && br && xa, what << ": null pointer");
  const int Ka = moe_masked_cols(C);
  SAV_CHECK(
      ldx >= C && ldx % 4 == 0 && ldxa >= Ka && ldxa % 4 == 0,
      what << ": row strides ldx=" << ldx << " ldxa=" << ldxa << " (ldx >= C, ldxa >= " << Ka << ", multiples of 4)");
  SAV_CHECK(aligned16(x) && aligned16(b) && aligned16(ln_w) && aligned16(ln_b) && aligned16(wr) &&
                reinterpret_cast<uintptr_t>(xa) % 8 == 0,
            what << ": misaligned pointers");
  RowsParams p = rows_params(a, lda, w, M, K, C, C, cluster);
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
  const int Fs = moe_stack_rows(C);
  check_rows(what, h, ldh, ws, M, K, C, Fs, cluster);
  SAV_CHECK(x && b0 && b1 && br && xn && ln_w && ln_b, what << ": null pointer");
  SAV_CHECK(gate == moe_gate_straight_through || gate == moe_gate_prob, what << ": unknown gate " << int(gate));
  SAV_CHECK(ldx >= C && ldx % 4 == 0 && ldxn >= C && ldxn % 4 == 0,
            what << ": row strides ldx=" << ldx << " ldxn=" << ldxn << " (>= C, multiples of 4)");
  SAV_CHECK(aligned16(x) && aligned16(b0) && aligned16(b1) && aligned16(ln_w) && aligned16(ln_b) &&
                reinterpret_cast<uintptr_t>(xn) % 8 == 0,
            what << ": misaligned pointers");
  RowsParams p = rows_params(h, ldh, ws, M, K, C, Fs, cluster);
  p.epi = rows_epi_moe_residual_ln;
  p.x = x, p.ldx = ldx, p.b0 = b0, p.b1 = b1, p.br = br, p.gate = gate, p.xn = xn, p.ldxn = ldxn;
  p.ln_w = ln_w, p.ln_b = ln_b, p.eps = eps, p.choice = choice;
  launch_rows(p, stream);
}

}  // namespace sav::cuda
