// shiftaddvit CUDA backend: the PTX instructions several kernels share, as thin inline wrappers (device code
// only; include from .cu files). sm_80+ (cp.async, ldmatrix, bf16 mma.sync); the kernels that use them trap on
// older devices and their launchers refuse them.
//
//   using namespace sav::cuda::ptx;
//   cp_async16(smem_dst, gmem_src);              // 16 bytes global -> shared, through L2 only (.cg)
//   cp_async4(smem_dst, gmem_src);               // 4 bytes (.ca)
//   cp_async_commit();  cp_async_wait<0>();      // then __syncthreads() before other threads read
//   mma_bf16(acc, a, b0, b1);                    // acc (16x8 f32) += a (16x16 bf16, row) b (16x8 bf16, col)
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cstdint>

namespace sav::cuda::ptx {

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses registers and L1 (data written by other CTAs of the same launch
// is read from L2); `valid` false stores 16 zero bytes instead (the source is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid = true) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
// 4-byte global -> shared copy through L1 (.ca: the only form for 4 bytes); for small, 4-byte aligned operands.
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
// Rows r < rows of `cols` elements each (cols * sizeof(T) a multiple of 16) into dst (rows ld apart) by cp_async16,
// threads tid, tid + nthreads, ... of the block: src_row(r) the row's global address, or nullptr for a row of zeros
// (nothing read; `any` stands in as the unread source address, a valid global pointer). Not committed.
template <class T, class SrcRow>
__device__ __forceinline__ void cp_async_rows(T* dst, int ld, int rows, int cols, const T* any, SrcRow src_row, int tid,
                                              int nthreads) {
  constexpr int kPer = 16 / sizeof(T);
  const int chunks = cols / kPer;
  for (int i = tid; i < rows * chunks; i += nthreads) {
    const int r = i / chunks, c = (i - r * chunks) * kPer;
    const T* s = src_row(r);
    cp_async16(dst + r * ld + c, s ? s + c : any, s != nullptr);
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most kPending of this thread's committed groups are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// two transposed 8x8 matrices: the row addresses of lanes 0-15 (lanes 16-31's are not used)
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p)));
}

// Thread-block cluster barrier halves (sm_90; every thread of every CTA of the cluster executes both, in order).
// relaxed: no memory ordering (e.g. "every CTA has started" before the first distributed shared-memory store);
// release / acquire: the arriving CTA's shared-memory stores (its own and remote ones) are visible after the wait.
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait_acquire() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// mbarriers (shared memory, 8 bytes) for bulk copies: init with the expected arrival count; the arriving thread
// also announces the bytes the copies will deliver (expect_tx); waiters poll the phase's parity.
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
// kCluster: acquire at cluster scope (data that other CTAs of the cluster delivered by st_async16), else the default
// (CTA scope: this CTA's bulk copies)
template <bool kCluster = false>
__device__ __forceinline__ bool mbar_test_parity(uint64_t* bar, unsigned parity) {
  unsigned done;
#define SAV_MBAR_TRY_WAIT(SEM)                                              \
  asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity" SEM           \
               ".shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n" \
               : "=r"(done)                                                 \
               : "r"(smem_u32(bar)), "r"(parity)                            \
               : "memory")
  if constexpr (kCluster)
    SAV_MBAR_TRY_WAIT(".acquire.cluster");
  else
    SAV_MBAR_TRY_WAIT("");
#undef SAV_MBAR_TRY_WAIT
  return done != 0;
}
template <bool kCluster = false>
__device__ __forceinline__ void mbar_wait_parity(uint64_t* bar, unsigned parity) {
  while (!mbar_test_parity<kCluster>(bar, parity)) {
  }
}
// 16 bytes into CTA `rank`'s shared memory at `local`'s offset there, counted against that CTA's mbarrier at `bar`'s
// offset (st.async: no fence and no cluster barrier; the receiver waits with mbar_wait_parity<true>)
__device__ __forceinline__ void st_async16(const void* local, uint4 v, uint64_t* bar, unsigned rank) {
  unsigned ra, rb;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(ra) : "r"(smem_u32(local)), "r"(rank));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(rb) : "r"(smem_u32(bar)), "r"(rank));
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];\n" ::"r"(ra),
               "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(rb)
               : "memory");
}
// Bulk (TMA, one-dimensional) copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to this
// CTA's shared memory; its completion counts against `bar`'s expected bytes.
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}

// This thread's global-memory stores become visible to bulk copies (the async proxy) ordered after them.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }

// Programmatic dependent launch (common.h DependentLaunchScope). trigger: this CTA lets the next kernel on the
// stream start (it takes effect when every CTA has triggered or exited); wait: blocks until the previous kernel
// has finished and its memory is visible. Both are no-ops for a kernel launched without the attribute.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// d (16x8 f32) += a (16x16 bf16, row-major fragments) * b (16x8 bf16, column-major fragments), m16n8k16.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The sum over the 8 aligned lanes of x's group (lanes 8k..8k+7), returned to every lane of the group, in a fixed
// order (xor 1, 2, 4); the whole warp must call it.
template <class T>
__device__ __forceinline__ T sum_lanes8(T x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  return x;
}

// The float4 at `off` floats into `part` (a shared-memory array at the same offset in every CTA of the cluster) summed
// over ranks 0 .. cs - 1 (cs <= kMax) in rank order, every rank's load in flight at once (distributed shared memory).
template <int kMax>
__device__ __forceinline__ float4 cluster_sum4(const cooperative_groups::cluster_group& cluster, float* part, int off,
                                               int cs) {
  float4 v[kMax];
#pragma unroll
  for (int q = 0; q < kMax; ++q)
    if (q < cs) v[q] = *reinterpret_cast<const float4*>(cluster.map_shared_rank(part, q) + off);
  float4 s = v[0];
#pragma unroll
  for (int q = 1; q < kMax; ++q)
    if (q < cs) s.x += v[q].x, s.y += v[q].y, s.z += v[q].z, s.w += v[q].w;
  return s;
}

}  // namespace sav::cuda::ptx
