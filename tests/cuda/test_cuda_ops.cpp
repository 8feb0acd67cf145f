// CUDA ops against the CPU references (sav::cpu::*_ref), on odd shapes. Inputs are rounded to bf16 on the
// host first, so the reference sees exactly what the GPU sees; the tolerances then cover only the GPU's own
// roundings (bf16 outputs: 2^-8 relative; bf16 probabilities in attention) and summation order. Outputs are
// poisoned (0xFF bytes = NaN) before each launch; a NaN left afterwards is an element never written.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "cuda_test_util.h"
#include "ops/cpu/hamming.h"
#include "ops/cpu/ops.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/ops.h"

using namespace sav;
using namespace sav::test;
using sav::cuda::bf16;
using sav::cuda::DeviceBuffer;

namespace {

class CudaOps : public CudaTest {};

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

    auto dx = upload(x), dw = upload(w), db = upload(b);
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

  auto dpe = upload(pe), dcls = upload(cls), dpos = upload(pos), dw = upload(w), db = upload(b);
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

    auto dqkv = upload_as<bf16>(qkv);
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
    auto dx = upload_as<bf16>(x), dw = upload_as<bf16>(w), dbb = upload_as<bf16>(bb);
    auto dbf = upload(bf);
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

  auto dimg = upload(img), db = upload(b);
  auto dw = upload_as<bf16>(w);
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

// The fused embedding (im2col + product + bias + class token + position + LN1 as one kernel) against the CPU reference
// (x: f32 summation order only, 1e-5; y: bf16, 8e-3) and against the composition on the device (the same values up
// to the product's summation order: x 1e-6, y differing in under 1% of its bf16). The cases cover clusters of 1, 2
// and 6 CTAs, a partial last tile, C from one column tile to 384, and several images; a row past the outputs stays
// untouched, and a rerun is bit-identical.
TEST_F(CudaOps, FusedPatchEmbedLayerNormMatchesReferenceAndComposition) {
  EXPECT_FALSE(cuda::patch_embed_ln_supports(1, 28, 4, 64));    // K = 16
  EXPECT_FALSE(cuda::patch_embed_ln_supports(3, 30, 6, 64));    // p % 4
  EXPECT_FALSE(cuda::patch_embed_ln_supports(3, 224, 16, 392)); // C > 384
  EXPECT_FALSE(cuda::patch_embed_ln_supports(5, 64, 16, 192));  // K = 1280: a cluster of 10
  struct Case { int B, Cin, S, p, C; };
  for (const Case cs : {Case{1, 3, 224, 16, 192}, Case{2, 1, 48, 16, 40}, Case{3, 2, 40, 8, 96},
                        Case{1, 3, 64, 16, 384}, Case{5, 8, 12, 4, 8}, Case{2, 4, 32, 8, 24}}) {
    SCOPED_TRACE(dims({{"B", cs.B}, {"Cin", cs.Cin}, {"S", cs.S}, {"p", cs.p}, {"C", cs.C}}));
    const int B = cs.B, Cin = cs.Cin, S = cs.S, p = cs.p, C = cs.C, G = S / p, P = G * G, N = P + 1, K = Cin * p * p;
    ASSERT_TRUE(cuda::patch_embed_ln_supports(Cin, S, p, C));
    const std::vector<float> img = round_bf16(normal(size_t(B) * Cin * S * S, 61));
    const std::vector<float> w = round_bf16(normal(size_t(C) * K, 62, 0.05f)), b = normal(C, 63, 0.1f);
    const std::vector<float> cls = normal(C, 64), pos = normal(size_t(N) * C, 65, 0.5f);
    const std::vector<float> lw = uniform(C, 66, 0.5f, 1.5f), lb = uniform(C, 67, -0.5f, 0.5f);
    std::vector<float> pe(size_t(B) * P * C), cols(size_t(B) * P * K), xref(size_t(B) * N * C);
    cpu::patch_embed_forward_ref(pe.data(), cols.data(), img.data(), w.data(), b.data(), B, Cin, S, p, C);
    for (int bi = 0; bi < B; ++bi)
      for (int n = 0; n < N; ++n)
        for (int c = 0; c < C; ++c)
          xref[(size_t(bi) * N + n) * C + c] =
              (n == 0 ? cls[c] : pe[(size_t(bi) * P + n - 1) * C + c]) + pos[size_t(n) * C + c];
    std::vector<float> yref(xref.size()), mean(size_t(B) * N), rstd(size_t(B) * N);
    cpu::layernorm_forward_ref(yref.data(), mean.data(), rstd.data(), xref.data(), lw.data(), lb.data(), B * N, C,
                               1e-6f);

    auto dimg = upload(img), db = upload(b), dcls = upload(cls), dpos = upload(pos), dlw = upload(lw), dlb = upload(lb);
    auto dw = upload_as<bf16>(w);
    const size_t n_out = xref.size();
    auto fused = [&](std::vector<float>& x, std::vector<float>& y) {
      auto dx = poisoned<float>(n_out + C);  // one row more: must stay untouched
      auto dy = poisoned<bf16>(n_out + C);
      cuda::patch_embed_ln_forward(dy.get(), dx.get(), dimg.get(), dw.get(), db.get(), dcls.get(), dpos.get(),
                                   dlw.get(), dlb.get(), B, Cin, S, p, C, 1e-6f, nullptr);
      device_sync();
      x = dx.download(), y = download_f32(dy);
      EXPECT_EQ(count_nonfinite(std::vector<float>(x.end() - C, x.end())), size_t(C)) << "wrote past x";
      EXPECT_EQ(count_nonfinite(std::vector<float>(y.end() - C, y.end())), size_t(C)) << "wrote past y";
      x.resize(n_out), y.resize(n_out);
    };
    std::vector<float> x, y, x2, y2;
    fused(x, y);
    EXPECT_EQ(count_nonfinite(x), 0u) << "x not written everywhere";
    EXPECT_EQ(count_nonfinite(y), 0u) << "y not written everywhere";
    EXPECT_LT(norm_err(x, xref), 1e-5);
    EXPECT_LT(norm_err(y, yref), 8e-3);
    fused(x2, y2);
    EXPECT_TRUE(bit_identical(x2, x) && bit_identical(y2, y)) << "rerun differs";

    DeviceBuffer<bf16> dcols(cols.size()), dyc(n_out);
    DeviceBuffer<float> dpe(pe.size()), dxc(n_out);
    cuda::Gemm gemm;
    cuda::im2col_forward(dcols.get(), dimg.get(), B, Cin, S, p, nullptr);
    gemm.linear_f32(dpe.get(), dcols.get(), dw.get(), db.get(), B * P, K, C, false, nullptr);
    cuda::embed_layernorm_forward(dyc.get(), dxc.get(), dpe.get(), dcls.get(), dpos.get(), dlw.get(), dlb.get(), B, N,
                                  C, 1e-6f, nullptr);
    device_sync();
    const std::vector<float> xc = dxc.download(), yc = download_f32(dyc);
    EXPECT_LT(norm_err(x, xc), 1e-6);
    size_t differ = 0;
    for (size_t i = 0; i < n_out; ++i) differ += y[i] != yc[i];
    EXPECT_LT(double(differ), 0.01 * double(n_out)) << differ << " of " << n_out << " bf16 differ from the composition";
  }
}

// ---- Hamming attention core ----
namespace {

struct HamCase {
  int B, N, C, H, nbits, m;
  int ld_pad;  // > 0: qk and v interleaved in one (M, 2C + ld_pad) buffer, out rows C + ld_pad apart
};

}  // namespace

// GPU kernel vs cpu::hamming_attention_forward (the fast path the CPU model runs) on bf16-rounded qk and v,
// so both see the same inputs. A code bit can still differ where y_nr is within rounding of 0 (the GPU
// computes D_nj = ||q||^2 + ||a||^2 - 2 q.a and sums in other orders: ~1e-7 of max|y|); a flipped bit moves
// every token of the head, so heads with a |y_nr| below 1e-5 max|y| (expected: a few percent of heads) are
// excluded from the value check and counted; at most a quarter may be. Elsewhere: bf16 output (2^-9
// relative, |out| <~ 1 + |conv|) plus f32 summation-order differences: 1e-2 of max|ref| stated.
TEST_F(CudaOps, HammingAttentionMatchesCpuOnOddShapes) {
  for (const HamCase cs : {HamCase{2, 197, 192, 3, 16, 25, 0}, HamCase{3, 37, 48, 4, 9, 7, 0},
                           HamCase{1, 256, 128, 2, 64, 32, 0}, HamCase{2, 50, 26, 2, 33, 5, 0},
                           HamCase{2, 197, 192, 3, 16, 25, 8}, HamCase{1, 3, 16, 1, 2, 1, 0},
                           HamCase{4, 65, 96, 3, 16, 25, 2}}) {
    const int B = cs.B, N = cs.N, C = cs.C, H = cs.H, nb = cs.nbits, m = cs.m, d = C / H;
    SCOPED_TRACE("B=" + std::to_string(B) + " N=" + std::to_string(N) + " C=" + std::to_string(C) +
                 " H=" + std::to_string(H) + " bits=" + std::to_string(nb) + " m=" + std::to_string(m) +
                 " pad=" + std::to_string(cs.ld_pad));
    ASSERT_TRUE(cuda::hamming_attention_supports(N, C, H, nb, m));
    const size_t M = size_t(B) * N;
    const std::vector<float> qk = round_bf16(normal(M * C, 71 + N, 0.7f));
    const std::vector<float> v = round_bf16(normal(M * C, 72 + N));
    const KshWeights hw = fitted_ksh_weights<float>(qk, N, C, H, nb, m, 73 + N);

    const cpu::HammingDims dims{B, N, C, H, nb, m};
    std::vector<float> saved_f(cpu::hamming_saved_floats(dims));
    std::vector<uint64_t> saved_c(cpu::hamming_saved_codes(dims));
    const cpu::HammingSaved saved = cpu::hamming_saved_bind(dims, saved_f.data(), saved_c.data());
    const cpu::HammingWeights w{hw.anchors.data(), hw.mu.data(), hw.A.data(), hw.conv.data(), nullptr};
    std::vector<float> ref(M * C);
    cpu::hamming_attention_forward(ref.data(), &saved, qk.data(), v.data(), w, dims);

    // heads whose codes are ambiguous at f32 rounding
    std::vector<bool> ambiguous(size_t(B) * H, false);
    size_t set_bits = 0;
    for (int bh = 0; bh < B * H; ++bh) {
      const float* y = saved.y + size_t(bh) * N * nb;
      const double ymax = max_abs(y, size_t(N) * nb);
      for (size_t i = 0; i < size_t(N) * nb; ++i) ambiguous[bh] = ambiguous[bh] || std::fabs(y[i]) < 1e-5 * ymax;
      for (int n = 0; n < N; ++n) set_bits += __builtin_popcountll(saved.codes[size_t(bh) * N + n]);
    }
    const double set_share = double(set_bits) / (double(B) * H * N * nb);
    if (B * H * N * nb >= 256) {
      EXPECT_GT(set_share, 0.1) << "the test hash should set a fair share of the bits";
      EXPECT_LT(set_share, 0.9);
    }

    // device buffers: qk and v either separate (B,N,C) or interleaved rows of one (M, 2C + pad) buffer
    const int ldin = cs.ld_pad ? 2 * C + cs.ld_pad : C, ldo = C + cs.ld_pad;
    DeviceBuffer<bf16> dqk, dv, dbuf;
    const bf16 *pqk, *pv;
    if (cs.ld_pad) {
      std::vector<float> buf(M * ldin, 0.0f);
      for (size_t r = 0; r < M; ++r)
        for (int c = 0; c < C; ++c) buf[r * ldin + c] = qk[r * C + c], buf[r * ldin + C + c] = v[r * C + c];
      dbuf = upload_as<bf16>(buf);
      pqk = dbuf.get(), pv = dbuf.get() + C;
    } else {
      dqk = upload_as<bf16>(qk), dv = upload_as<bf16>(v);
      pqk = dqk.get(), pv = dv.get();
    }
    auto da = upload(hw.anchors), dmu = upload(hw.mu), dA = upload(hw.A), dconv = upload(hw.conv);
    DeviceBuffer<unsigned char> prep(cuda::hamming_attention_prepared_bytes(C, H, nb));
    prep.fill_bytes(0xA5);  // every byte must be written
    cuda::hamming_attention_prepare(prep.get(), da.get(), dmu.get(), dA.get(), C, H, nb, m, nullptr);
    DeviceBuffer<bf16> dout(M * ldo);
    dout.fill_bytes(0xFF);
    cuda::hamming_attention_forward_ld(dout.get(), ldo, pqk, ldin, pv, ldin, prep.get(), dconv.get(), B, N, C, H, nb, m,
                                       nullptr);
    SAV_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> outp = download_f32(dout);
    std::vector<float> out(M * C);
    size_t gap_written = 0;
    for (size_t r = 0; r < M; ++r) {
      for (int c = 0; c < C; ++c) out[r * C + c] = outp[r * ldo + c];
      for (int c = C; c < ldo; ++c) gap_written += std::isfinite(outp[r * ldo + c]);
    }
    EXPECT_EQ(count_nonfinite(out), 0u) << "unwritten or non-finite outputs";
    EXPECT_EQ(gap_written, 0u) << "wrote outside the rows";

    // value check per head: every head within 1e-2 of the reference, except heads where a hash value lies
    // within f32 rounding of 0 (a code bit may flip there, which moves the whole head) AND the error shows it
    std::vector<float> got_u, ref_u;
    int excluded = 0;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        std::vector<float> gh, rh;
        for (int n = 0; n < N; ++n)
          for (int i = 0; i < d; ++i) {
            const size_t e = (size_t(b) * N + n) * C + h * d + i;
            gh.push_back(out[e]);
            rh.push_back(ref[e]);
          }
        if (ambiguous[size_t(b) * H + h] && norm_err(gh, rh) >= 1e-2) {
          ++excluded;
          continue;
        }
        got_u.insert(got_u.end(), gh.begin(), gh.end());
        ref_u.insert(ref_u.end(), rh.begin(), rh.end());
      }
    std::printf("[ info ] hamming B=%d N=%d C=%d H=%d b=%d m=%d: %.1f%% bits set, %d of %d heads off by an ambiguous "
                "code, err of the others %.3e\n",
                B, N, C, H, nb, m, 100.0 * set_share, excluded, B * H, norm_err(got_u, ref_u));
    EXPECT_LE(excluded * 4, B * H) << "too many heads off by ambiguous codes";
    EXPECT_LT(norm_err(got_u, ref_u), 1e-2);

    // rerun: bit-identical; and every split (CTAs per head, each writing the rows of its token tiles) gives the
    // same bits as the auto choice; a split beyond the tiles is refused
    cuda::hamming_attention_forward_ld(dout.get(), ldo, pqk, ldin, pv, ldin, prep.get(), dconv.get(), B, N, C, H, nb, m,
                                       nullptr);
    SAV_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(bit_identical(download_f32(dout), outp));
    const int tiles = (N + 15) / 16;
    for (int G : {1, 2, 3, 4, 8, 13, tiles, tiles + 1}) {
      if (G > tiles) {
        EXPECT_THROW(cuda::hamming_attention_forward_ld(dout.get(), ldo, pqk, ldin, pv, ldin, prep.get(), dconv.get(),
                                                        B, N, C, H, nb, m, nullptr, G),
                     sav::Error);
        continue;
      }
      SCOPED_TRACE("split " + std::to_string(G));
      dout.fill_bytes(0xFF);
      cuda::hamming_attention_forward_ld(dout.get(), ldo, pqk, ldin, pv, ldin, prep.get(), dconv.get(), B, N, C, H, nb,
                                         m, nullptr, G);
      SAV_CUDA_CHECK(cudaDeviceSynchronize());
      EXPECT_TRUE(bit_identical(download_f32(dout), outp));
    }
  }
}

TEST_F(CudaOps, HammingAttentionRejectsUnsupportedSizes) {
  EXPECT_FALSE(cuda::hamming_attention_supports(257, 192, 3, 16, 25));  // tokens
  EXPECT_FALSE(cuda::hamming_attention_supports(197, 384, 3, 16, 25));  // head size 128
  EXPECT_FALSE(cuda::hamming_attention_supports(197, 192, 3, 65, 25));  // bits
  EXPECT_FALSE(cuda::hamming_attention_supports(197, 192, 3, 16, 33));  // anchors
  EXPECT_TRUE(cuda::hamming_attention_supports(256, 768, 12, 64, 32));
  DeviceBuffer<bf16> a(64), b(64);
  DeviceBuffer<float> f(64);
  DeviceBuffer<unsigned char> prep(cuda::hamming_attention_prepared_bytes(16, 1, 16));
  EXPECT_THROW(cuda::hamming_attention_forward_ld(a.get(), 16, b.get(), 16, b.get(), 16, prep.get(), f.get(), 1, 300,
                                                  16, 1, 16, 25, nullptr),
               sav::Error);  // tokens
  EXPECT_THROW(cuda::hamming_attention_forward_ld(a.get(), 16, b.get(), 16, b.get(), 16, prep.get() + 8, f.get(), 1, 3,
                                                  16, 1, 16, 25, nullptr),
               sav::Error);  // prepared buffer misaligned
  // 33 anchors
  EXPECT_THROW(cuda::hamming_attention_prepare(prep.get(), f.get(), f.get(), f.get(), 16, 1, 16, 33, nullptr),
               sav::Error);
  SAV_CUDA_CHECK(cudaDeviceSynchronize());  // nothing was launched
}

// ---- MoE(mult, shift) linear: stacked product + routing epilogue ----
// CPU reference in double on exactly what the GPU multiplies (x and W0 bf16-rounded, W1 exact powers of two;
// the router from its f32 weight and the bf16 x). The GPU router keeps ~16 bits of the f32 router weight
// (high + remainder rows): rows whose logits are within 1e-3 of max|logit| of a tie may route either way;
// there the GPU's choice is used for the value check, elsewhere the choice must equal the CPU's.
// Tolerances: bf16 outputs one rounding (2^-9 relative) + f32 accumulation: 8e-3 of max|ref|; the f32
// residual output 1e-5 (summation order only).
TEST_F(CudaOps, MoeLinearRoutesAndMatchesCpu) {
  struct Case { int M, K, F, ldo_pad; };
  cuda::Gemm gemm;
  for (const Case cs : {Case{197, 192, 768, 0}, Case{37, 48, 37, 3}, Case{394, 768, 192, 4}, Case{5, 16, 8, 0}}) {
    const int M = cs.M, K = cs.K, F = cs.F, Fs = cuda::moe_stack_rows(F);
    const std::vector<float> x = round_bf16(normal(size_t(M) * K, 81 + F));
    const std::vector<float> w0 = round_bf16(normal(size_t(F) * K, 82, 0.1f));
    std::vector<float> w1(size_t(F) * K);
    {
      Rng rng(83);
      for (auto& w : w1) {
        const int sg = static_cast<int>(rng.below(3)) - 1, p = -static_cast<int>(rng.below(8)) - 2;
        w = sg * std::ldexp(1.0f, p);
      }
    }
    const std::vector<float> wr = normal(size_t(2) * K, 84, 1.0f / std::sqrt(float(K)));
    const std::vector<float> b0 = normal(F, 85, 0.3f), b1 = normal(F, 86, 0.3f), br = normal(2, 87, 0.1f);
    const std::vector<float> x0 = normal(size_t(M) * (F + cs.ldo_pad), 88);
    // CPU: logits and expert outputs in double
    std::vector<double> l(size_t(M) * 2), y0(size_t(M) * F), y1(size_t(M) * F);
    double lmax = 0.0;
    for (int t = 0; t < M; ++t) {
      for (int e = 0; e < 2; ++e) {
        double a = br[e];
        for (int k = 0; k < K; ++k) a += double(x[size_t(t) * K + k]) * wr[size_t(e) * K + k];
        l[size_t(t) * 2 + e] = a;
        lmax = std::max(lmax, std::fabs(a));
      }
      for (int j = 0; j < F; ++j) {
        double a0 = b0[j], a1 = b1[j];
        for (int k = 0; k < K; ++k) {
          a0 += double(x[size_t(t) * K + k]) * w0[size_t(j) * K + k];
          a1 += double(x[size_t(t) * K + k]) * w1[size_t(j) * K + k];
        }
        y0[size_t(t) * F + j] = a0, y1[size_t(t) * F + j] = a1;
      }
    }
    auto dx = upload_as<bf16>(x);
    DeviceBuffer<bf16> dw(size_t(Fs) * K);
    dw.upload(cuda::moe_stack_weights(w0.data(), w1.data(), wr.data(), F, K));
    auto db0 = upload(b0), db1 = upload(b1), dbr = upload(br);
    DeviceBuffer<float> ds(size_t(M) * Fs);
    DeviceBuffer<int8_t> dch(M);
    for (int gate = 0; gate < 2; ++gate)
      for (int epi = 0; epi < 3; ++epi) {
        SCOPED_TRACE("M=" + std::to_string(M) + " K=" + std::to_string(K) + " F=" + std::to_string(F) +
                     " gate=" + std::to_string(gate) + " epi=" + std::to_string(epi));
        const int ldo = F + cs.ldo_pad;
        ds.fill_bytes(0xFF);
        dch.fill_bytes(0x7F);
        gemm.linear_f32(ds.get(), dx.get(), dw.get(), nullptr, M, K, Fs, false, nullptr);
        std::vector<float> got;
        const auto g = static_cast<cuda::MoeGate>(gate);
        const auto me = static_cast<cuda::MoeEpilogue>(epi);
        if (me == cuda::moe_epilogue_f32_residual) {
          auto dout = upload(x0);
          cuda::moe_epilogue_forward(dout.get(), ldo, dch.get(), ds.get(), Fs, db0.get(), db1.get(), dbr.get(), M, F,
                                     g, me, nullptr);
          SAV_CUDA_CHECK(cudaDeviceSynchronize());
          got = dout.download();
        } else {
          DeviceBuffer<bf16> dout(size_t(M) * ldo);
          dout.fill_bytes(0xFF);
          cuda::moe_epilogue_forward(dout.get(), ldo, dch.get(), ds.get(), Fs, db0.get(), db1.get(), dbr.get(), M, F,
                                     g, me, nullptr);
          SAV_CUDA_CHECK(cudaDeviceSynchronize());
          got = download_f32(dout);
        }
        const std::vector<int8_t> ch = dch.download();
        int to_shift = 0, ambiguous = 0, wrong = 0;
        std::vector<float> got_c(size_t(M) * F), ref(size_t(M) * F);
        size_t gap_changed = 0;
        for (int t = 0; t < M; ++t) {
          ASSERT_TRUE(ch[t] == 0 || ch[t] == 1) << "choice of row " << t << " not written";
          const double l0 = l[size_t(t) * 2], l1 = l[size_t(t) * 2 + 1];
          const int e_cpu = l1 > l0 ? 1 : 0;
          if (std::fabs(l1 - l0) < 1e-3 * lmax) ++ambiguous;
          else wrong += ch[t] != e_cpu;
          const int e = ch[t];
          to_shift += e;
          const double gv = gate == cuda::moe_gate_prob ? 1.0 / (1.0 + std::exp(e ? l0 - l1 : l1 - l0)) : 1.0;
          for (int j = 0; j < F; ++j) {
            const double yv = (e ? y1 : y0)[size_t(t) * F + j] * gv;
            double r = yv;
            if (epi == cuda::moe_epilogue_bf16_gelu) r = 0.5 * yv * (1.0 + std::erf(yv / std::sqrt(2.0)));
            if (epi == cuda::moe_epilogue_f32_residual) r = x0[size_t(t) * ldo + j] + yv;
            ref[size_t(t) * F + j] = float(r);
            got_c[size_t(t) * F + j] = got[size_t(t) * ldo + j];
          }
          for (int j = F; j < ldo; ++j) {
            const float gj = got[size_t(t) * ldo + j];
            if (epi == cuda::moe_epilogue_f32_residual) gap_changed += gj != x0[size_t(t) * ldo + j];
            else gap_changed += std::isfinite(gj);
          }
        }
        EXPECT_EQ(wrong, 0) << "routing differs from the CPU on unambiguous rows (" << ambiguous << " ambiguous)";
        EXPECT_LE(ambiguous * 20, M + 20) << "too many near-ties for this test's router";
        if (M >= 37) {
          EXPECT_GT(to_shift, M / 5) << "both experts should get tokens";
          EXPECT_LT(to_shift, M - M / 5);
        }
        EXPECT_EQ(count_nonfinite(got_c), 0u);
        EXPECT_EQ(gap_changed, 0u) << "wrote outside the rows";
        EXPECT_LT(norm_err(got_c, ref), epi == cuda::moe_epilogue_f32_residual ? 1e-5 : 8e-3);
      }
  }
}

TEST_F(CudaOps, ConversionRoundsToNearestEven) {
  const std::vector<float> x = normal(1001, 61, 3.0f);
  auto dx = upload(x);
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
