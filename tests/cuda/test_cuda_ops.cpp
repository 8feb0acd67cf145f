// CUDA ops against the CPU references (sav::cpu::*_ref), on odd shapes. Inputs are rounded to bf16 on the
// host first, so the reference sees exactly what the GPU sees; the tolerances then cover only the GPU's own
// roundings (bf16 outputs: 2^-8 relative; bf16 probabilities in attention) and summation order. Outputs are
// poisoned (0xFF bytes = NaN) before each launch; a NaN left afterwards is an element never written.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "cuda_test_util.h"
#include "ops/cpu/ops.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/ops.h"

using namespace sav;
using namespace sav::test;
using sav::cuda::bf16;
using sav::cuda::DeviceBuffer;

namespace {

class CudaOps : public CudaTest {};

// bf16 download -> f32
std::vector<float> download_f32(const DeviceBuffer<bf16>& b) { return cuda::from_bf16(b.download()); }

DeviceBuffer<bf16> upload_bf16(const std::vector<float>& v) {
  DeviceBuffer<bf16> d(v.size());
  d.upload(cuda::to_bf16(v.data(), v.size()));
  return d;
}

DeviceBuffer<float> upload_f32(const std::vector<float>& v) {
  DeviceBuffer<float> d(v.size());
  d.upload(v);
  return d;
}

}  // namespace

// Tolerance: one bf16 rounding of the output, 2^-8 relative to the element, <= 4e-3 of max|ref|; 8e-3 stated.
TEST_F(CudaOps, LayerNormMatchesReferenceOnOddShapesAndStrides) {
  struct Case { int M, C, ldx_pad, ldy_pad; };
  for (const Case cs : {Case{1, 1, 0, 0}, Case{7, 13, 5, 3}, Case{37, 192, 0, 0}, Case{13, 769, 2, 1},
                        Case{3, 1024, 0, 7}, Case{197, 48, 0, 0}, Case{5, 64, 4, 8}, Case{2, 1024, 0, 0}}) {
    SCOPED_TRACE("M=" + std::to_string(cs.M) + " C=" + std::to_string(cs.C));
    const int M = cs.M, C = cs.C, ldx = C + cs.ldx_pad, ldy = C + cs.ldy_pad;
    std::vector<float> x = normal(size_t(M) * ldx, 11, 2.0f);
    for (auto& v : x) v += 0.7f;  // a mean to remove
    const std::vector<float> w = uniform(C, 12, 0.5f, 1.5f), b = uniform(C, 13, -0.5f, 0.5f);
    std::vector<float> xc(size_t(M) * C), ref(size_t(M) * C), mean(M), rstd(M);
    for (int i = 0; i < M; ++i)
      for (int c = 0; c < C; ++c) xc[size_t(i) * C + c] = x[size_t(i) * ldx + c];
    cpu::layernorm_forward_ref(ref.data(), mean.data(), rstd.data(), xc.data(), w.data(), b.data(), M, C, 1e-6f);

    auto dx = upload_f32(x), dw = upload_f32(w), db = upload_f32(b);
    DeviceBuffer<bf16> dy(size_t(M) * ldy);
    dy.fill_bytes(0xFF);
    cuda::layernorm_forward(dy.get(), ldy, dx.get(), ldx, dw.get(), db.get(), M, C, 1e-6f, nullptr);
    SAV_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> y = download_f32(dy);
    std::vector<float> yc(size_t(M) * C);
    size_t gap_written = 0;
    for (int i = 0; i < M; ++i) {
      for (int c = 0; c < C; ++c) yc[size_t(i) * C + c] = y[size_t(i) * ldy + c];
      for (int c = C; c < ldy; ++c) gap_written += std::isfinite(y[size_t(i) * ldy + c]);
    }
    EXPECT_EQ(count_nonfinite(yc), 0u) << "unwritten or non-finite outputs";
    EXPECT_EQ(gap_written, 0u) << "wrote outside the rows";
    EXPECT_LT(norm_err(yc, ref), 8e-3);
  }
}

// The embedding's token assembly (exact in f32) fused with block 0's LayerNorm (bf16 output, 8e-3).
TEST_F(CudaOps, EmbedLayerNormAssemblesTokensAndNormalises) {
  for (const int C : {37, 48}) {  // scalar and float4 paths
  SCOPED_TRACE("C=" + std::to_string(C));
  const int B = 3, N = 5;
  const std::vector<float> pe = normal(size_t(B) * (N - 1) * C, 21), cls = normal(C, 22), pos = normal(size_t(N) * C, 23);
  const std::vector<float> w = uniform(C, 24, 0.5f, 1.5f), b = uniform(C, 25, -0.5f, 0.5f);
  std::vector<float> xref(size_t(B) * N * C);
  for (int bi = 0; bi < B; ++bi)
    for (int n = 0; n < N; ++n)
      for (int c = 0; c < C; ++c)
        xref[(size_t(bi) * N + n) * C + c] =
            (n == 0 ? cls[c] : pe[(size_t(bi) * (N - 1) + n - 1) * C + c]) + pos[size_t(n) * C + c];
  std::vector<float> yref(xref.size()), mean(B * N), rstd(B * N);
  cpu::layernorm_forward_ref(yref.data(), mean.data(), rstd.data(), xref.data(), w.data(), b.data(), B * N, C, 1e-6f);

  auto dpe = upload_f32(pe), dcls = upload_f32(cls), dpos = upload_f32(pos), dw = upload_f32(w), db = upload_f32(b);
  DeviceBuffer<float> dx(xref.size());
  DeviceBuffer<bf16> dy(xref.size());
  dx.fill_bytes(0xFF);
  dy.fill_bytes(0xFF);
  cuda::embed_layernorm_forward(dy.get(), dx.get(), dpe.get(), dcls.get(), dpos.get(), dw.get(), db.get(), B, N, C,
                                1e-6f, nullptr);
  SAV_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> x = dx.download(), y = download_f32(dy);
  EXPECT_EQ(count_nonfinite(x), 0u);
  EXPECT_EQ(count_nonfinite(y), 0u);
  EXPECT_LT(norm_err(x, xref), 1e-6);
  EXPECT_LT(norm_err(y, yref), 8e-3);
  }
}

// Tensor-core attention vs attention_forward_ref on bf16-rounded qkv; the cases cover 1, 4 and 8 warps per
// block, the 16-byte and the scalar staging paths, N up to 256 and d up to 64. Error sources: probabilities rounded
// to bf16 (2^-9 relative each) and the bf16 output (2^-9): ~4e-3 of max|ref|; 1e-2 stated.
TEST_F(CudaOps, AttentionMatchesReferenceOnOddShapes) {
  struct Case { int B, N, C, H; };
  for (const Case cs : {Case{1, 1, 16, 1}, Case{2, 7, 48, 3}, Case{1, 37, 48, 2}, Case{3, 197, 192, 3},
                        Case{1, 256, 128, 2}, Case{2, 13, 26, 2}, Case{1, 50, 32, 4}, Case{16, 197, 192, 3},
                        Case{2, 197, 768, 12}, Case{1, 100, 60, 1}, Case{64, 150, 192, 3}}) {
    SCOPED_TRACE("B=" + std::to_string(cs.B) + " N=" + std::to_string(cs.N) + " C=" + std::to_string(cs.C) +
                 " H=" + std::to_string(cs.H));
    const int B = cs.B, N = cs.N, C = cs.C, H = cs.H;
    ASSERT_TRUE(cuda::attention_supports(N, C, H));
    const std::vector<float> qkv = round_bf16(normal(size_t(B) * N * 3 * C, 31 + N, 1.5f));
    std::vector<float> ref(size_t(B) * N * C), att(size_t(B) * H * N * N);
    cpu::attention_forward_ref(ref.data(), att.data(), qkv.data(), B, N, C, H);

    auto dqkv = upload_bf16(qkv);
    DeviceBuffer<bf16> dout(ref.size());
    dout.fill_bytes(0xFF);
    cuda::attention_forward(dout.get(), dqkv.get(), B, N, C, H, nullptr);
    SAV_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> out = download_f32(dout);
    EXPECT_EQ(count_nonfinite(out), 0u);
    EXPECT_LT(norm_err(out, ref), 1e-2);
    // rerun: bit-identical
    cuda::attention_forward(dout.get(), dqkv.get(), B, N, C, H, nullptr);
    SAV_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(bit_identical(download_f32(dout), out));
  }
}

TEST_F(CudaOps, AttentionRejectsUnsupportedSizes) {
  EXPECT_FALSE(cuda::attention_supports(257, 192, 3));
  EXPECT_FALSE(cuda::attention_supports(197, 192 * 2, 3));  // head size 128
  DeviceBuffer<bf16> a(16), b(16);
  EXPECT_THROW(cuda::attention_forward(a.get(), b.get(), 1, 300, 64, 1, nullptr), sav::Error);
}

// cuBLASLt linears vs linear_forward_ref (+ gelu_forward_ref) on bf16-rounded x, w and (bf16 outputs) b.
// f32 outputs: only the summation order differs, 1e-5 of max|ref|. bf16 outputs: one rounding (4e-3) plus,
// with GELU, cuBLASLt's tanh form (<= 4.7e-4 absolute); 8e-3 stated.
TEST_F(CudaOps, LinearEpiloguesMatchReference) {
  struct Case { int M, K, F; };
  cuda::Gemm gemm;
  for (const Case cs : {Case{1, 16, 8}, Case{37, 48, 144}, Case{197, 192, 576}, Case{13, 768, 192}, Case{5, 48, 7},
                        Case{394, 192, 768}}) {
    const int M = cs.M, K = cs.K, F = cs.F;
    const std::vector<float> x = round_bf16(normal(size_t(M) * K, 41)), w = round_bf16(normal(size_t(F) * K, 42, 0.2f));
    const std::vector<float> bf = normal(F, 43, 0.5f), bb = round_bf16(bf), y0 = normal(size_t(M) * F, 44);
    auto dx = upload_bf16(x), dw = upload_bf16(w), dbb = upload_bf16(bb);
    auto dbf = upload_f32(bf);
    for (int mode = 0; mode < 4; ++mode) {  // 0 bf16, 1 bf16+gelu, 2 f32, 3 f32 accumulate
      SCOPED_TRACE("M=" + std::to_string(M) + " K=" + std::to_string(K) + " F=" + std::to_string(F) +
                   " mode=" + std::to_string(mode));
      std::vector<float> ref(size_t(M) * F);
      cpu::linear_forward_ref(ref.data(), x.data(), w.data(), mode < 2 ? bb.data() : bf.data(), M, K, F);
      if (mode == 1) {
        std::vector<float> g(ref.size());
        cpu::gelu_forward_ref(g.data(), ref.data(), int64_t(ref.size()));
        ref = g;
      }
      if (mode == 3)
        for (size_t i = 0; i < ref.size(); ++i) ref[i] += y0[i];
      std::vector<float> y;
      if (mode < 2) {
        DeviceBuffer<bf16> dy(ref.size());
        dy.fill_bytes(0xFF);
        gemm.linear_bf16(dy.get(), dx.get(), dw.get(), dbb.get(), M, K, F, mode == 1, nullptr);
        SAV_CUDA_CHECK(cudaDeviceSynchronize());
        y = download_f32(dy);
      } else {
        DeviceBuffer<float> dy(ref.size());
        if (mode == 3) dy.upload(y0); else dy.fill_bytes(0xFF);
        gemm.linear_f32(dy.get(), dx.get(), dw.get(), dbf.get(), M, K, F, mode == 3, nullptr);
        SAV_CUDA_CHECK(cudaDeviceSynchronize());
        y = dy.download();
      }
      EXPECT_EQ(count_nonfinite(y), 0u);
      EXPECT_LT(norm_err(y, ref), mode < 2 ? 8e-3 : 1e-5);
    }
  }
}

// im2col (exact: the bf16 rounding of the image) + the f32-output linear = cpu::patch_embed_forward_ref.
TEST_F(CudaOps, PatchEmbedMatchesReference) {
  struct Case { int B, Cin, S, p, C; };
  for (const Case cs : {Case{2, 3, 32, 8, 48}, Case{1, 2, 9, 3, 5}}) {  // vector and scalar im2col
  SCOPED_TRACE("S=" + std::to_string(cs.S) + " p=" + std::to_string(cs.p));
  const int B = cs.B, Cin = cs.Cin, S = cs.S, p = cs.p, C = cs.C, G = S / p, P = G * G, K = Cin * p * p;
  const std::vector<float> img = round_bf16(normal(size_t(B) * Cin * S * S, 51));
  const std::vector<float> w = round_bf16(normal(size_t(C) * K, 52, 0.05f)), b = normal(C, 53, 0.1f);
  std::vector<float> ref(size_t(B) * P * C), cols_ref(size_t(B) * P * K);
  cpu::patch_embed_forward_ref(ref.data(), cols_ref.data(), img.data(), w.data(), b.data(), B, Cin, S, p, C);

  auto dimg = upload_f32(img), db = upload_f32(b);
  auto dw = upload_bf16(w);
  DeviceBuffer<bf16> dcols(cols_ref.size());
  DeviceBuffer<float> dout(ref.size());
  dcols.fill_bytes(0xFF);
  dout.fill_bytes(0xFF);
  cuda::Gemm gemm;
  cuda::im2col_forward(dcols.get(), dimg.get(), B, Cin, S, p, nullptr);
  gemm.linear_f32(dout.get(), dcols.get(), dw.get(), db.get(), B * P, K, C, false, nullptr);
  SAV_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_TRUE(bit_identical(download_f32(dcols), cols_ref)) << "im2col layout";
  const std::vector<float> out = dout.download();
  EXPECT_EQ(count_nonfinite(out), 0u);
  EXPECT_LT(norm_err(out, ref), 1e-5);
  }
}

TEST_F(CudaOps, ConversionRoundsToNearestEven) {
  const std::vector<float> x = normal(1001, 61, 3.0f);
  auto dx = upload_f32(x);
  DeviceBuffer<bf16> dy(x.size());
  cuda::f32_to_bf16(dy.get(), dx.get(), int64_t(x.size()), nullptr);
  SAV_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_TRUE(bit_identical(download_f32(dy), round_bf16(x)));
}

// Errors surface as sav::Error with file:line, never as an exit.
TEST_F(CudaOps, CudaErrorsThrowWithLocation) {
  try {
    DeviceBuffer<float> huge(size_t(1) << 50);  // 4 PiB
    FAIL() << "allocation should have failed";
  } catch (const sav::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("out of GPU memory: allocating 4294967296 MiB"), std::string::npos) << msg;
    EXPECT_NE(msg.find("MiB free of"), std::string::npos) << msg;
    EXPECT_GT(e.line(), 0);
  }
  // The device is still usable afterwards.
  DeviceBuffer<float> small(1000);
  small.fill_bytes(0);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}
