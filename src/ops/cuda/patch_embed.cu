// Patch embedding, step 1: im2col of the f32 image into bf16 rows (one patch per row), the layout of
// cpu::patch_embed_forward's cols; step 2 is a Gemm (gemm.h) with the conv weight viewed as (C, Cin*p*p).
//
// For few images, the whole embedding as one kernel (patch_embed_ln_forward): im2col, the product, its bias, the
// class token, the position embedding and block 0's LayerNorm 1, launched for dependent launch (launch.cuh).
//
// Work split: the B*P patch rows in tiles of 16; a thread-block cluster of cs = K / 128 CTAs per tile, CTA r owning
// k [128 r, 128 r + 128). Before the dependent-launch wait the CTA's 128 columns of every weight row come by bulk
// copies (one per row, an mbarrier) into shared memory, and the epilogue's vectors (bias, LayerNorm weights, class
// token, the rows' position embeddings) by cp.async; after it, the tile's 16 x 128 image values, rounded to bf16
// (the im2col values). Warp w computes column tiles w, w + 8, ... of the CTA's partial (16 x C f32, mma.sync over
// the 128 k), the partials meet through distributed shared memory (CTA r sums rows r, r + cs, ... of the tile in
// rank order), and each row gets (sum + bias) + pos, is stored to x and normalised (ln::row_stats, the LayerNorm
// kernel's arithmetic) into y; the CTAs also write the class rows (cls + pos[0]). Deterministic: fixed sum orders,
// no atomics; a row's bits do not depend on B or the grid.
#include <cooperative_groups.h>

#include "ops/cuda/frag.cuh"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/layernorm.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/ptx.cuh"

namespace sav::cuda {

namespace {

struct Im2colParams {
  bf16* cols;
  const float* img;
  int B, Cin, S, p, G;  // G = S / p patches per side
  int64_t total;        // B * G*G * Cin*p*p
  bool vec;
};

// Vector path (p % 4 == 0, S % 4 == 0, fewer than 2^31 outputs): one thread per segment of p pixels
// (b, ci, py, ky, px), px fastest so that a warp reads contiguous image rows; p/4 float4 loads and p/4
// 8-byte stores of 4 bf16. Scalar path: one thread per output element.
__global__ void im2col_kernel(const Im2colParams a) {
  const int K = a.Cin * a.p * a.p, P = a.G * a.G;
  if (a.vec) {
    const int segs = static_cast<int>(a.total / a.p);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < segs; i += gridDim.x * blockDim.x) {
      int t = i;
      const int px = t % a.G;
      t /= a.G;
      const int ky = t % a.p;
      t /= a.p;
      const int py = t % a.G;
      t /= a.G;
      const int ci = t % a.Cin, b = t / a.Cin;
      const float* src = a.img + ((int64_t(b) * a.Cin + ci) * a.S + py * a.p + ky) * a.S + px * a.p;
      bf16* dst = a.cols + (int64_t(b) * P + py * a.G + px) * K + ci * a.p * a.p + ky * a.p;
      for (int x = 0; x < a.p; x += 4) {
        const float4 v = *reinterpret_cast<const float4*>(src + x);
        __align__(8) __nv_bfloat162 h[2] = {__floats2bfloat162_rn(v.x, v.y), __floats2bfloat162_rn(v.z, v.w)};
        *reinterpret_cast<uint2*>(dst + x) = *reinterpret_cast<const uint2*>(h);
      }
    }
    return;
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a.total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / K;
    const int col = static_cast<int>(i - row * K);
    const int b = static_cast<int>(row / P), pi = static_cast<int>(row - int64_t(b) * P);
    const int py = pi / a.G, px = pi - py * a.G;
    const int ci = col / (a.p * a.p), r = col - ci * a.p * a.p, ky = r / a.p, kx = r - ky * a.p;
    const float v = a.img[((int64_t(b) * a.Cin + ci) * a.S + py * a.p + ky) * a.S + px * a.p + kx];
    a.cols[i] = __float2bfloat16_rn(v);
  }
}

namespace cg = cooperative_groups;

constexpr int kPeThreads = 256, kPeWarps = kPeThreads / 32;
constexpr int kPeTM = 16;          // patch rows per tile
constexpr int kPeKC = 128;         // k per CTA of a tile's cluster (4 k blocks of frag.cuh)
constexpr int kPeLd = kPeKC + 32;  // the staged rows' stride: 32 mod 64 bf16, so rows g and g + 1 of a 16-byte
                                   // fragment load fall in distinct bank halves
constexpr int kPeMaxC = 384, kPeMaxCluster = 8;
constexpr int kPeG = 16;                    // LayerNorm: lanes per row (ln::row_group(C) for C <= 512)
constexpr int kPeS = kPeMaxC / (4 * kPeG);  // ... float4 slots per lane
static_assert(ln::row_group(kPeMaxC) == kPeG, "the LayerNorm kernel's lane group");

struct PeParams {
  bf16* y;
  float* x;
  const float* img;
  const bf16* w;
  const float *bias, *cls, *pos, *ln_w, *ln_b;
  int B, Cin, S, p, G, P, C, K, cs, ldp, ro;
  float eps;
};

struct PeSmem {
  size_t bar, w, a, part, red, ep, total;
};
__host__ __device__ constexpr PeSmem pe_smem(int C, int ldp, int ro) {
  PeSmem s{};
  size_t o = 0;
  s.bar = o, o = align16(o + sizeof(uint64_t));
  s.w = o, o = align16(o + size_t(C) * kPeLd * sizeof(bf16));
  s.a = o, o = align16(o + size_t(kPeTM) * kPeLd * sizeof(bf16));
  s.part = o, o = align16(o + size_t(kPeTM) * ldp * sizeof(float));
  s.red = o, o = align16(o + size_t(ro) * ldp * sizeof(float));
  s.ep = o, o = align16(o + size_t(5 + ro) * C * sizeof(float));  // bias, ln_w, ln_b, cls, pos[0], the rows' pos
  s.total = o;
  return s;
}

__global__ void __launch_bounds__(kPeThreads, 1) patch_embed_ln_kernel(const __grid_constant__ PeParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // built for sm_90; the launcher refuses older devices
#else
  extern __shared__ __align__(16) unsigned char smem[];
  const PeSmem L = pe_smem(p.C, p.ldp, p.ro);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + L.bar);
  bf16* ws = reinterpret_cast<bf16*>(smem + L.w);         // [output column][kPeLd]: the CTA's 128 k of each weight row
  bf16* as = reinterpret_cast<bf16*>(smem + L.a);         // [tile row][kPeLd]: the tile's image values, bf16
  float* part = reinterpret_cast<float*>(smem + L.part);  // [tile row][ldp]: this CTA's share of the product
  float* red = reinterpret_cast<float*>(smem + L.red);    // [row j][ldp]: tile row rank + cs j summed over the cluster
  float* ep = reinterpret_cast<float*>(smem + L.ep);      // the epilogue's vectors (pe_smem)
  const int C = p.C, K = p.K, cs = p.cs, ldp = p.ldp, ro = p.ro, pp = p.p * p.p, rows = p.B * p.P;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q4 = lane & 3;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank()), tile = static_cast<int>(blockIdx.x) / cs;
  const int k0 = rank * kPeKC;

  ptx::pdl_trigger();
  if (tid == 0) {
    ptx::mbar_init(bar, 1);
    ptx::mbar_arrive_expect_tx(bar, unsigned(C) * unsigned(kPeKC * sizeof(bf16)));
  }
  __syncthreads();  // the barrier is initialised and armed before any copy signals it
  for (int n = tid; n < C; n += kPeThreads)
    ptx::bulk_copy_g2s(ws + n * kPeLd, p.w + int64_t(n) * K + k0, unsigned(kPeKC * sizeof(bf16)), bar);
  const int q4s = C / 4;
  for (int c = 4 * tid; c < C; c += 4 * kPeThreads) {
    ptx::cp_async16(ep + c, p.bias + c);
    ptx::cp_async16(ep + C + c, p.ln_w + c);
    ptx::cp_async16(ep + 2 * C + c, p.ln_b + c);
    ptx::cp_async16(ep + 3 * C + c, p.cls + c);
    ptx::cp_async16(ep + 4 * C + c, p.pos + c);
  }
  for (int i = tid; i < ro * q4s; i += kPeThreads) {  // the position rows of this CTA's tile rows
    const int j = i / q4s, c = (i - j * q4s) * 4, pr = tile * kPeTM + rank + cs * j;
    if (rank + cs * j < kPeTM && pr < rows)
      ptx::cp_async16(ep + (5 + j) * C + c, p.pos + (1 + pr % p.P) * int64_t(C) + c);
  }
  ptx::cp_async_commit();
  ptx::pdl_wait();

  // the tile's image values (im2col column k = ci p^2 + ky p + kx), bf16; zeros past the last patch
  constexpr int kQ = kPeKC / 4;
  for (int i = tid; i < kPeTM * kQ; i += kPeThreads) {
    const int r = i / kQ, kk = (i - r * kQ) * 4, pr = tile * kPeTM + r;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (pr < rows) {
      const int b = pr / p.P, pi = pr - b * p.P, py = pi / p.G, px = pi - py * p.G;
      const int k = k0 + kk, ci = k / pp, ky = (k - ci * pp) / p.p, kx = k - ci * pp - ky * p.p;
      v = __ldg(reinterpret_cast<const float4*>(p.img + ((int64_t(b) * p.Cin + ci) * p.S + py * p.p + ky) * p.S +
                                                px * p.p + kx));
    }
    __align__(8) __nv_bfloat162 h[2] = {__floats2bfloat162_rn(v.x, v.y), __floats2bfloat162_rn(v.z, v.w)};
    *reinterpret_cast<uint2*>(as + r * kPeLd + kk) = *reinterpret_cast<const uint2*>(h);
  }
  __syncthreads();
  ptx::mbar_wait_parity(bar, 0);

  // the CTA's partial: warp w column tiles w, w + 8, ..., the A fragments read once
  {
    uint4 ra[kPeKC / 32], rb[kPeKC / 32];
#pragma unroll
    for (int kb = 0; kb < kPeKC / 32; ++kb) {
      ra[kb] = frag::a_fragment(as, kPeLd, g, kb);
      rb[kb] = frag::a_fragment(as, kPeLd, g + 8, kb);
    }
    for (int nt = warp; nt < C / 8; nt += kPeWarps) {
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int kb = 0; kb < kPeKC / 32; ++kb)
        frag::mma_kblock(acc, ra[kb], rb[kb], frag::a_fragment(ws, kPeLd, nt * 8 + g, kb));
      const int c = nt * 8 + 2 * q4;
      *reinterpret_cast<float2*>(part + g * ldp + c) = make_float2(acc[0], acc[1]);
      *reinterpret_cast<float2*>(part + (g + 8) * ldp + c) = make_float2(acc[2], acc[3]);
    }
  }
  ptx::cluster_arrive_release();
  ptx::cluster_wait_acquire();

  // this CTA's tile rows rank + cs j: the cs partials summed in rank order
  for (int i = tid; i < ro * q4s; i += kPeThreads) {
    const int j = i / q4s, c = (i - j * q4s) * 4, r = rank + cs * j;
    if (r >= kPeTM) continue;
    *reinterpret_cast<float4*>(red + j * ldp + c) = ptx::cluster_sum4<kPeMaxCluster>(cluster, part, r * ldp + c, cs);
  }
  ptx::cluster_arrive_relaxed();  // this CTA's remote reads are done; waited for before exit
  ptx::cp_async_wait<0>();        // the epilogue's vectors
  __syncthreads();

  // the rows: this CTA's tile rows, then the class rows of images blockIdx.x, blockIdx.x + gridDim.x, ...; a group
  // of kPeG lanes per row, whole warps in every round (the statistics shuffle over the warp)
  const int N = p.P + 1, nb = static_cast<int>(blockIdx.x), ng = static_cast<int>(gridDim.x);
  const int ncls = nb < p.B ? (p.B - 1 - nb) / ng + 1 : 0;
  const float4 *bias4 = reinterpret_cast<const float4*>(ep), *w4 = reinterpret_cast<const float4*>(ep + C),
               *b4 = reinterpret_cast<const float4*>(ep + 2 * C);
  for (int t0 = 0; t0 < ro + ncls; t0 += kPeThreads / kPeG) {
    const int t = t0 + tid / kPeG, l16 = tid % kPeG;
    bool valid = false, patch = false;
    int64_t orow = 0;
    const float4 *src = nullptr, *pos = nullptr;
    if (t < ro) {
      const int r = rank + cs * t, pr = tile * kPeTM + r;
      if (r < kPeTM && pr < rows) {
        const int b = pr / p.P, pi = pr - b * p.P;
        valid = patch = true, orow = int64_t(b) * N + 1 + pi;
        src = reinterpret_cast<const float4*>(red + t * ldp), pos = reinterpret_cast<const float4*>(ep + (5 + t) * C);
      }
    } else if (t < ro + ncls) {
      valid = true, orow = int64_t(nb + (t - ro) * ng) * N;
      src = reinterpret_cast<const float4*>(ep + 3 * C), pos = reinterpret_cast<const float4*>(ep + 4 * C);
    }
    float4 v[kPeS];
    float4* xo = reinterpret_cast<float4*>(p.x + orow * C);
#pragma unroll
    for (int k = 0; k < kPeS; ++k) {
      const int c = l16 + kPeG * k;
      v[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (valid && c < q4s) {
        float4 a = src[c];
        if (patch) a = make_float4(a.x + bias4[c].x, a.y + bias4[c].y, a.z + bias4[c].z, a.w + bias4[c].w);
        const float4 e = pos[c];
        v[k] = make_float4(a.x + e.x, a.y + e.y, a.z + e.z, a.w + e.w);
        xo[c] = v[k];
      }
    }
    float mean, rstd;
    ln::row_stats<kPeG, kPeS>(v, l16, C, p.eps, mean, rstd);
    uint2* yr = reinterpret_cast<uint2*>(p.y + orow * C);
#pragma unroll
    for (int k = 0; k < kPeS; ++k) {
      const int c = l16 + kPeG * k;
      if (valid && c < q4s) yr[c] = ln::apply4(v[k], mean, rstd, w4[c], b4[c]);
    }
  }
  ptx::cluster_wait_acquire();  // no CTA leaves while another reads its partial
#endif
}

PeParams pe_dims(int B, int Cin, int S, int p, int C) {
  PeParams a{};
  a.B = B, a.Cin = Cin, a.S = S, a.p = p, a.G = S / p, a.P = a.G * a.G, a.C = C, a.K = Cin * p * p;
  a.cs = a.K / kPeKC;
  a.ldp = ld_8mod32(C);
  a.ro = (kPeTM + a.cs - 1) / a.cs;
  return a;
}

}  // namespace

bool patch_embed_ln_supports(int Cin, int S, int p, int C) {
  if (Cin < 1 || p < 4 || p % 4 != 0 || S < p || S % p != 0 || C < 8 || C > kPeMaxC || C % 8 != 0) return false;
  const int64_t K = int64_t(Cin) * p * p;
  if (K % kPeKC != 0 || K / kPeKC > kPeMaxCluster) return false;
  const PeParams a = pe_dims(1, Cin, S, p, C);
  const size_t smem = pe_smem(C, a.ldp, a.ro).total;
  if (!device_available()) return smem <= 227 * 1024;
  return device_cc_major() >= 9 && smem <= size_t(max_smem_per_block()) &&
         cluster_fits(reinterpret_cast<const void*>(patch_embed_ln_kernel), a.cs, kPeThreads, smem, false);
}

void patch_embed_ln_forward(bf16* y, float* x, const float* img, const bf16* w, const float* bias, const float* cls,
                            const float* pos, const float* ln_w, const float* ln_b, int B, int Cin, int S, int p, int C,
                            float eps, cudaStream_t stream) {
  const char* what = "patch embed + layernorm";
  SAV_CHECK(B >= 0 && patch_embed_ln_supports(Cin, S, p, C),
            what << ": B=" << B << " Cin=" << Cin << " S=" << S << " p=" << p << " C=" << C
                 << " not supported (p % 4 == 0, Cin p^2 a multiple of 128 up to 1024, C % 8 == 0, C <= 384)");
  SAV_CHECK(y && x && img && w && bias && cls && pos && ln_w && ln_b, what << ": null pointer");
  SAV_CHECK(aligned16(y) && aligned16(x) && aligned16(img) && aligned16(w) && aligned16(bias) && aligned16(cls) &&
                aligned16(pos) && aligned16(ln_w) && aligned16(ln_b),
            what << ": misaligned pointers");
  if (B == 0) return;
  PeParams a = pe_dims(B, Cin, S, p, C);
  a.y = y, a.x = x, a.img = img, a.w = w, a.bias = bias, a.cls = cls, a.pos = pos, a.ln_w = ln_w, a.ln_b = ln_b;
  a.eps = eps;
  const int64_t tiles = (int64_t(B) * a.P + kPeTM - 1) / kPeTM;
  SAV_CHECK(tiles * a.cs <= (int64_t(1) << 31) - 1, what << ": B too large");
  launch_dependent(patch_embed_ln_kernel, dim3(static_cast<unsigned>(tiles * a.cs)), dim3(kPeThreads),
                   pe_smem(C, a.ldp, a.ro).total, a.cs, stream, a);
}

void im2col_forward(bf16* cols, const float* img, int B, int Cin, int S, int p, cudaStream_t stream) {
  SAV_CHECK(cols && img, "im2col: null pointer");
  SAV_CHECK(B >= 0 && Cin >= 1 && p >= 1 && S >= p && S % p == 0,
            "im2col: bad sizes B=" << B << " Cin=" << Cin << " S=" << S << " p=" << p);
  Im2colParams a{cols, img, B, Cin, S, p, S / p, 0, false};
  a.total = int64_t(B) * a.G * a.G * Cin * p * p;
  a.vec = p % 4 == 0 && S % 4 == 0 && a.total < (int64_t(1) << 31) && reinterpret_cast<uintptr_t>(img) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(cols) % 8 == 0;
  if (a.total == 0) return;
  const int64_t work = a.vec ? a.total / p : a.total;
  const int64_t blocks = std::min<int64_t>((work + 255) / 256, int64_t(sm_count()) * 32);
  im2col_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(a);
  SAV_CUDA_CHECK_LAUNCH();
}

}  // namespace sav::cuda
