// The f32 PVTv2 CUDA ops (ops/cuda/pvt_ops.h) against their CPU references, on odd shapes. Outputs are
// poisoned (0xFF bytes = NaN) before each launch; a NaN left afterwards is an element never written. Every
// op is rerun and must give bit-identical results. Tolerances, as max|gpu - ref| / max|ref|:
//   exact (bit-identical): layout change, im2col, token mean, fixed-point rounding, MoE epilogue with gate 1
//     and no combine (the same float formulas as the host);
//   1e-5: LayerNorm, attention, depthwise conv (+ GELU): f32 sums in another order than the references'
//     double sums (observed on an H200: LayerNorm <= 1.9e-7, dwconv <= 2.0e-7, attention <= 5.8e-7 and
//     2.9e-6 for Nk = 3136);
//   1e-6: MoE epilogue with the probability gate or the log/exp combine (CUDA's expf / logf, a few ulp from
//     the C library's; observed <= 1.2e-7).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "nn/linear_layer.h"
#include "ops/cpu/conv.h"
#include "ops/cpu/moe.h"
#include "ops/cpu/ops.h"
#include "ops/cuda/pvt_ops.h"

using namespace sav;
using namespace sav::test;
using sav::cuda::DeviceBuffer;

namespace {

class CudaPvtOps : public CudaTest {};

}  // namespace

// ---- layout ----

TEST_F(CudaPvtOps, NchwToNhwcIsAnExactTranspose) {
  struct Case {
    int B, C, HW;
  };
  for (const Case cs : {Case{2, 3, 49}, Case{1, 3, 224 * 224}, Case{2, 37, 169}, Case{2, 64, 225}, Case{1, 160, 1},
                        Case{3, 1, 5}, Case{2, 15, 33}, Case{1, 33, 31}}) {
    SCOPED_TRACE(dims({{"B", cs.B}, {"C", cs.C}, {"HW", cs.HW}}));
    const int B = cs.B, C = cs.C, HW = cs.HW;
    const std::vector<float> x = normal(size_t(B) * C * HW, 1 + C);
    std::vector<float> ref(x.size());
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < C; ++c)
        for (int p = 0; p < HW; ++p) ref[(size_t(b) * HW + p) * C + c] = x[(size_t(b) * C + c) * HW + p];
    auto dx = upload(x);
    auto dy = poisoned(x.size());
    cuda::nchw_to_nhwc_f32(dy.get(), dx.get(), B, C, HW, nullptr);
    device_sync();
    const std::vector<float> y = dy.download();
    EXPECT_EQ(count_nonfinite(y), 0u);
    EXPECT_TRUE(bit_identical(y, ref));
  }
  DeviceBuffer<float> a(4);
  EXPECT_NO_THROW(cuda::nchw_to_nhwc_f32(nullptr, nullptr, 0, 3, 5, nullptr));  // empty: nothing launched
  EXPECT_THROW(cuda::nchw_to_nhwc_f32(a.get(), a.get(), 1, -1, 4, nullptr), sav::Error);
}

// ---- im2col: exactly cpu::conv2d_forward_ref's cols ----

TEST_F(CudaPvtOps, Im2colMatchesConvReferenceColumns) {
  struct Case {
    int B, H, W, Cin, k, s, pad;
  };
  for (const Case cs : {
           Case{2, 37, 37, 3, 7, 4, 3},    // stem, odd side
           Case{1, 224, 224, 3, 7, 4, 3},  // stem, the real size
           Case{2, 13, 15, 37, 3, 2, 1},   // patch embedding k3 s2
           Case{2, 15, 15, 320, 3, 2, 1},  // k3 s2, wide
           Case{2, 57, 57, 64, 8, 8, 0},   // spatial reduction r = 8 (a remainder row / column dropped)
           Case{2, 15, 15, 160, 4, 4, 0},  // r = 4
           Case{2, 7, 7, 320, 2, 2, 0},    // r = 2
           Case{1, 17, 17, 320, 8, 8, 0},  // channels in chunks (64 taps x 320 do not fit one block)
           Case{1, 68, 68, 2, 65, 3, 1},   // k > 64: the direct gather
           Case{2, 5, 6, 5, 1, 1, 0},      // 1x1
           Case{1, 3, 4, 7, 5, 1, 2},      // kernel wider than the image
       }) {
    SCOPED_TRACE(
        dims({{"B", cs.B}, {"H", cs.H}, {"W", cs.W}, {"Cin", cs.Cin}, {"k", cs.k}, {"s", cs.s}, {"pad", cs.pad}}));
    const int B = cs.B, H = cs.H, W = cs.W, Cin = cs.Cin, k = cs.k, s = cs.s, pad = cs.pad;
    const size_t ncols = cpu::conv2d_cols_floats(B, H, W, Cin, k, s, pad);
    const int Ho = cpu::conv_out_size(H, k, s, pad), Wo = cpu::conv_out_size(W, k, s, pad);
    ASSERT_EQ(ncols, size_t(B) * Ho * Wo * Cin * k * k);
    const std::vector<float> x = normal(size_t(B) * H * W * Cin, 100 + k + Cin);
    const std::vector<float> w(size_t(Cin) * k * k, 0.0f);
    std::vector<float> cols_ref(ncols), y(size_t(B) * Ho * Wo);
    cpu::conv2d_forward_ref(y.data(), cols_ref.data(), x.data(), w.data(), nullptr, B, H, W, Cin, 1, k, s, pad);

    auto dx = upload(x);
    auto dcols = poisoned(ncols);
    cuda::im2col_nhwc_f32(dcols.get(), dx.get(), B, H, W, Cin, k, s, pad, nullptr);
    device_sync();
    const std::vector<float> cols = dcols.download();
    EXPECT_EQ(count_nonfinite(cols), 0u);
    EXPECT_TRUE(bit_identical(cols, cols_ref));
  }
}

TEST_F(CudaPvtOps, Im2colRejectsBadSizes) {
  DeviceBuffer<float> a(64);
  EXPECT_THROW(cuda::im2col_nhwc_f32(a.get(), a.get(), 1, 4, 4, 1, 7, 1, 1, nullptr), sav::Error);  // k > H + 2 pad
  EXPECT_THROW(cuda::im2col_nhwc_f32(a.get(), a.get(), 1, 4, 4, 1, 3, 0, 1, nullptr), sav::Error);  // s = 0
  EXPECT_THROW(cuda::im2col_nhwc_f32(a.get(), a.get(), 1, 4, 4, 1, 3, 1, -1, nullptr), sav::Error);
  EXPECT_THROW(cuda::im2col_nhwc_f32(a.get(), a.get(), -2, 4, 4, 1, 3, 1, 1, nullptr), sav::Error);
  EXPECT_THROW(cuda::im2col_nhwc_f32(nullptr, a.get(), 1, 4, 4, 1, 3, 1, 1, nullptr), sav::Error);
}

// ---- LayerNorm ----

TEST_F(CudaPvtOps, LayerNormMatchesReferenceOnOddShapesStridesAndInPlace) {
  struct Case {
    int M, C, ldx_pad, ldy_pad;
  };
  for (const Case cs : {Case{1, 1, 0, 0}, Case{7, 13, 5, 3}, Case{197, 32, 0, 0}, Case{37, 64, 0, 0},
                        Case{13, 160, 2, 1}, Case{5, 320, 0, 0}, Case{3, 1024, 0, 7}, Case{4, 1025, 0, 0},
                        Case{3, 2048, 1, 0}, Case{2, 3001, 0, 2}, Case{9, 33, 0, 0}}) {
    SCOPED_TRACE(dims({{"M", cs.M}, {"C", cs.C}}));
    const int M = cs.M, C = cs.C, ldx = C + cs.ldx_pad, ldy = C + cs.ldy_pad;
    std::vector<float> x = normal(size_t(M) * ldx, 11 + C, 2.0f);
    for (auto& v : x) v += 5.0f;  // a mean to remove
    const std::vector<float> w = uniform(C, 12, 0.5f, 1.5f), b = uniform(C, 13, -0.5f, 0.5f);
    std::vector<float> xc(size_t(M) * C), ref(size_t(M) * C), mean(M), rstd(M);
    for (int i = 0; i < M; ++i)
      for (int c = 0; c < C; ++c) xc[size_t(i) * C + c] = x[size_t(i) * ldx + c];
    cpu::layernorm_forward_ref(ref.data(), mean.data(), rstd.data(), xc.data(), w.data(), b.data(), M, C, 1e-6f);

    auto dx = upload(x), dw = upload(w), db = upload(b);
    auto dy = poisoned(size_t(M) * ldy);
    cuda::layernorm_f32(dy.get(), ldy, dx.get(), ldx, dw.get(), db.get(), M, C, 1e-6f, nullptr);
    device_sync();
    const std::vector<float> y = dy.download();
    std::vector<float> yc(size_t(M) * C);
    size_t gap_written = 0;
    for (int i = 0; i < M; ++i) {
      for (int c = 0; c < C; ++c) yc[size_t(i) * C + c] = y[size_t(i) * ldy + c];
      for (int c = C; c < ldy; ++c) gap_written += std::isfinite(y[size_t(i) * ldy + c]);
    }
    EXPECT_EQ(count_nonfinite(yc), 0u) << "unwritten or non-finite outputs";
    EXPECT_EQ(gap_written, 0u) << "wrote outside the rows";
    EXPECT_LT(norm_err(yc, ref), 1e-5);
    // rerun: bit-identical
    cuda::layernorm_f32(dy.get(), ldy, dx.get(), ldx, dw.get(), db.get(), M, C, 1e-6f, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dy.download(), y));
    // in place (y == x, ldy == ldx): the same values
    cuda::layernorm_f32(dx.get(), ldx, dx.get(), ldx, dw.get(), db.get(), M, C, 1e-6f, nullptr);
    device_sync();
    const std::vector<float> xi = dx.download();
    size_t diff = 0;
    for (int i = 0; i < M; ++i)
      for (int c = 0; c < C; ++c) diff += std::memcmp(&xi[size_t(i) * ldx + c], &y[size_t(i) * ldy + c], 4) != 0;
    EXPECT_EQ(diff, 0u) << "in place differs from out of place";
  }
  DeviceBuffer<float> a(64);
  EXPECT_NO_THROW(cuda::layernorm_f32(nullptr, 8, nullptr, 8, nullptr, nullptr, 0, 8, 1e-6f, nullptr));
  EXPECT_THROW(cuda::layernorm_f32(a.get(), 8, a.get(), 8, a.get(), a.get(), 1, 0, 1e-6f, nullptr), sav::Error);
  EXPECT_THROW(cuda::layernorm_f32(a.get(), 4, a.get(), 8, a.get(), a.get(), 1, 8, 1e-6f, nullptr), sav::Error);
  EXPECT_THROW(cuda::layernorm_f32(a.get(), 8, a.get(), 8, a.get(), a.get(), -1, 8, 1e-6f, nullptr), sav::Error);
}

// ---- attention with separate queries and keys/values ----

TEST_F(CudaPvtOps, AttentionQkvMatchesReference) {
  struct Case {
    int B, N, Nk, C, H;
    bool misalign;
  };
  for (const Case cs : {
           Case{2, 197, 49, 64, 1, false},    // d = 64 (4 lanes per query)
           Case{2, 197, 1, 64, 2, false},     // d = 32, one key
           Case{1, 197, 300, 160, 5, false},  // d = 32, three key tiles (the last partial)
           Case{2, 13, 49, 51, 3, false},     // d = 17: scalar loads, padded head
           Case{1, 50, 3136, 64, 1, false},   // Nk = 3136: 49 key tiles
           Case{1, 7, 5, 128, 1, false},      // d = 128 (8 lanes per query)
           Case{1, 40, 17, 256, 2, false},    // d = 128, two heads
           Case{1, 33, 20, 16, 1, false},     // d = 16 (one lane per query)
           Case{3, 1, 7, 12, 4, false},       // d = 3, N = 1
           Case{2, 131, 49, 64, 1, true},     // d = 64 with misaligned pointers: scalar loads
           // enough CTAs for two query rows per thread (on GPUs of up to ~150 multiprocessors)
           Case{20, 197, 13, 512, 8, false},  // d = 64
           Case{25, 257, 9, 256, 8, false},   // d = 32
       }) {
    SCOPED_TRACE(dims({{"B", cs.B}, {"N", cs.N}, {"Nk", cs.Nk}, {"C", cs.C}, {"H", cs.H}, {"misalign", cs.misalign}}));
    const int B = cs.B, N = cs.N, Nk = cs.Nk, C = cs.C, H = cs.H, off = cs.misalign ? 1 : 0;
    ASSERT_TRUE(cuda::attention_q_kv_supports(C, H));
    const std::vector<float> q = normal(size_t(B) * N * C, 31 + N, 1.5f), kv = normal(size_t(B) * Nk * 2 * C, 32 + Nk);
    std::vector<float> ref(size_t(B) * N * C), att(size_t(B) * H * N * Nk);
    cpu::attention_q_kv_forward_ref(ref.data(), att.data(), q.data(), kv.data(), B, N, Nk, C, H);

    std::vector<float> qp(off, 0.0f), kvp(off, 0.0f);
    qp.insert(qp.end(), q.begin(), q.end());
    kvp.insert(kvp.end(), kv.begin(), kv.end());
    auto dq = upload(qp), dkv = upload(kvp);
    auto dout = poisoned(ref.size() + off);
    cuda::attention_q_kv_f32(dout.get() + off, dq.get() + off, dkv.get() + off, B, N, Nk, C, H, nullptr);
    device_sync();
    std::vector<float> out = dout.download();
    out.erase(out.begin(), out.begin() + off);
    EXPECT_EQ(count_nonfinite(out), 0u);
    EXPECT_LT(norm_err(out, ref), 1e-5);
    cuda::attention_q_kv_f32(dout.get() + off, dq.get() + off, dkv.get() + off, B, N, Nk, C, H, nullptr);
    device_sync();
    std::vector<float> out2 = dout.download();
    out2.erase(out2.begin(), out2.begin() + off);
    EXPECT_TRUE(bit_identical(out2, out));
  }
}

TEST_F(CudaPvtOps, AttentionQkvRejectsUnsupportedSizes) {
  EXPECT_TRUE(cuda::attention_q_kv_supports(128, 1));
  EXPECT_TRUE(cuda::attention_q_kv_supports(512, 8));
  EXPECT_FALSE(cuda::attention_q_kv_supports(129, 1));  // d = 129
  EXPECT_FALSE(cuda::attention_q_kv_supports(64, 3));   // not divisible
  EXPECT_FALSE(cuda::attention_q_kv_supports(0, 1));
  EXPECT_FALSE(cuda::attention_q_kv_supports(64, 0));
  DeviceBuffer<float> a(1024);
  EXPECT_THROW(cuda::attention_q_kv_f32(a.get(), a.get(), a.get(), 1, 2, 2, 129, 1, nullptr), sav::Error);
  EXPECT_THROW(cuda::attention_q_kv_f32(a.get(), a.get(), a.get(), 1, 2, 2, 64, 3, nullptr), sav::Error);
  EXPECT_THROW(cuda::attention_q_kv_f32(a.get(), a.get(), a.get(), 1, 0, 2, 64, 1, nullptr), sav::Error);
  EXPECT_THROW(cuda::attention_q_kv_f32(a.get(), a.get(), a.get(), 1, 2, 0, 64, 1, nullptr), sav::Error);
  EXPECT_THROW(cuda::attention_q_kv_f32(a.get(), a.get(), a.get(), -1, 2, 2, 64, 1, nullptr), sav::Error);
  EXPECT_THROW(cuda::attention_q_kv_f32(nullptr, a.get(), a.get(), 1, 2, 2, 64, 1, nullptr), sav::Error);
  EXPECT_NO_THROW(cuda::attention_q_kv_f32(nullptr, nullptr, nullptr, 0, 2, 2, 64, 1, nullptr));
}

// ---- depthwise conv (+ GELU) ----

TEST_F(CudaPvtOps, DwConvMatchesReference) {
  struct Case {
    int B, H, W, C, k;
    bool gelu, bias;
  };
  for (const Case cs :
       {Case{2, 7, 7, 37, 3, true, true}, Case{2, 13, 15, 64, 3, false, true}, Case{1, 15, 13, 160, 3, true, false},
        Case{2, 28, 28, 256, 3, true, true}, Case{2, 7, 9, 3, 5, true, true}, Case{1, 4, 3, 8, 7, false, true},
        Case{1, 1, 1, 5, 1, true, true}, Case{1, 3, 17, 33, 3, false, false}, Case{1, 20, 27, 37, 3, true, true}}) {
    SCOPED_TRACE(
        dims({{"B", cs.B}, {"H", cs.H}, {"W", cs.W}, {"C", cs.C}, {"k", cs.k}, {"gelu", cs.gelu}, {"bias", cs.bias}}));
    const int B = cs.B, H = cs.H, W = cs.W, C = cs.C, k = cs.k;
    const std::vector<float> x = normal(size_t(B) * H * W * C, 61 + C), w = normal(size_t(C) * k * k, 62, 0.4f),
                             b = normal(C, 63, 0.5f);
    std::vector<float> ref(x.size());
    cpu::dwconv2d_forward_ref(ref.data(), x.data(), w.data(), cs.bias ? b.data() : nullptr, B, H, W, C, k);
    if (cs.gelu) {
      std::vector<float> g(ref.size());
      cpu::gelu_forward_ref(g.data(), ref.data(), int64_t(ref.size()));
      ref = g;
    }
    auto dx = upload(x), dw = upload(w), db = upload(b);
    auto dy = poisoned(x.size());
    cuda::dwconv2d_f32(dy.get(), dx.get(), dw.get(), cs.bias ? db.get() : nullptr, B, H, W, C, k, cs.gelu, nullptr);
    device_sync();
    const std::vector<float> y = dy.download();
    EXPECT_EQ(count_nonfinite(y), 0u);
    EXPECT_LT(norm_err(y, ref), 1e-5);
    cuda::dwconv2d_f32(dy.get(), dx.get(), dw.get(), cs.bias ? db.get() : nullptr, B, H, W, C, k, cs.gelu, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dy.download(), y));
  }
  DeviceBuffer<float> a(64), c(64);
  EXPECT_THROW(cuda::dwconv2d_f32(a.get(), c.get(), c.get(), nullptr, 1, 4, 4, 2, 2, false, nullptr), sav::Error);
  EXPECT_THROW(cuda::dwconv2d_f32(a.get(), c.get(), c.get(), nullptr, 1, 4, 4, 0, 3, false, nullptr), sav::Error);
  EXPECT_THROW(cuda::dwconv2d_f32(a.get(), c.get(), c.get(), nullptr, -1, 4, 4, 2, 3, false, nullptr), sav::Error);
  EXPECT_THROW(cuda::dwconv2d_f32(a.get(), a.get(), c.get(), nullptr, 1, 4, 4, 2, 3, false, nullptr), sav::Error);
}

// ---- mean over tokens: bit-exact with the CPU Pvt head's loop ----

TEST_F(CudaPvtOps, MeanTokensIsBitExactWithTheHeadLoop) {
  struct Case {
    int B, N, C;
  };
  for (const Case cs : {Case{2, 49, 256}, Case{3, 197, 37}, Case{1, 1, 5}, Case{2, 3136, 3}}) {
    SCOPED_TRACE(dims({{"B", cs.B}, {"N", cs.N}, {"C", cs.C}}));
    const int B = cs.B, N = cs.N, C = cs.C;
    const std::vector<float> x = normal(size_t(B) * N * C, 71 + N);
    std::vector<float> ref(size_t(B) * C, 0.0f);
    const float inv = 1.0f / float(N);
    for (int b = 0; b < B; ++b) {  // as Pvt::forward's head
      float* pb = ref.data() + size_t(b) * C;
      for (int n = 0; n < N; ++n)
        for (int c = 0; c < C; ++c) pb[c] += x[(size_t(b) * N + n) * C + c];
      for (int c = 0; c < C; ++c) pb[c] *= inv;
    }
    auto dx = upload(x);
    auto dy = poisoned(ref.size());
    cuda::mean_tokens_f32(dy.get(), dx.get(), B, N, C, nullptr);
    device_sync();
    const std::vector<float> y = dy.download();
    EXPECT_EQ(count_nonfinite(y), 0u);
    EXPECT_TRUE(bit_identical(y, ref));
  }
  DeviceBuffer<float> a(16);
  EXPECT_NO_THROW(cuda::mean_tokens_f32(nullptr, nullptr, 0, 4, 4, nullptr));
  EXPECT_THROW(cuda::mean_tokens_f32(a.get(), a.get(), 1, 0, 4, nullptr), sav::Error);
  EXPECT_THROW(cuda::mean_tokens_f32(a.get(), a.get(), 1, 4, -4, nullptr), sav::Error);
}

// ---- the release's fixed-point rounding: bit-exact with sav::release_fixed_point ----

TEST_F(CudaPvtOps, ReleaseFixedPointIsBitExact) {
  const int64_t n = 100003;
  std::vector<float> x = normal(size_t(n), 81, 3.0f);
  const std::vector<float> wide = uniform(size_t(n), 82, -40000.0f, 40000.0f);
  for (int64_t i = 0; i < n; i += 3) x[size_t(i)] = wide[size_t(i)];  // beyond the clamp too
  const float inf = std::numeric_limits<float>::infinity();
  const float specials[] = {0.0f,
                            -0.0f,
                            1.0f / 65536.0f,
                            -1.0f / 65536.0f,
                            1.5f / 65536.0f,
                            -1.5f / 65536.0f,
                            1e-30f,
                            -1e-30f,
                            1e-40f,
                            -1e-40f,
                            32767.0f,
                            32767.5f,
                            -32768.0f,
                            -32768.5f,
                            1e30f,
                            -1e30f,
                            inf,
                            -inf,
                            0.3f,
                            -0.3f,
                            65535.99f,
                            12345.678f,
                            -12345.678f};
  for (size_t i = 0; i < sizeof(specials) / sizeof(float); ++i) x[7 * i + 1] = specials[i];
  std::vector<float> ref(x.size());
  for (size_t i = 0; i < x.size(); ++i) ref[i] = release_fixed_point(x[i]);

  auto dx = upload(x);
  for (int off : {0, 1}) {  // float4 and scalar paths
    SCOPED_TRACE("offset " + std::to_string(off));
    const int64_t m = n - off;
    auto dy = poisoned(size_t(n));
    cuda::release_fixed_point_f32(dy.get() + off, dx.get() + off, m, nullptr);
    device_sync();
    std::vector<float> y = dy.download();
    y.erase(y.begin(), y.begin() + off);
    const std::vector<float> r(ref.begin() + off, ref.end());
    EXPECT_EQ(count_nonfinite(y), 0u);
    EXPECT_TRUE(bit_identical(y, r));
  }
  // in place
  cuda::release_fixed_point_f32(dx.get(), dx.get(), n, nullptr);
  sync();
  EXPECT_TRUE(bit_identical(dx.download(), ref));
  EXPECT_NO_THROW(cuda::release_fixed_point_f32(nullptr, nullptr, 0, nullptr));
  EXPECT_THROW(cuda::release_fixed_point_f32(dx.get(), dx.get(), -1, nullptr), sav::Error);
}

// ---- MoE routing epilogue (f32) against cpu::moe_router_forward_ref and the host formulas ----

TEST_F(CudaPvtOps, MoeEpilogueF32RoutesAndMatchesHost) {
  struct Case {
    int M, F, lds_pad, ldo_pad;
    bool tied_bias;
  };
  for (const Case cs : {Case{1, 1, 0, 0, false}, Case{50, 37, 3, 2, false}, Case{197, 64, 2, 0, true},
                        Case{33, 64, 0, 4, false}, Case{17, 160, 6, 4, true}}) {
    const int M = cs.M, F = cs.F, lds = 2 * F + 2 + cs.lds_pad, ldo = F + cs.ldo_pad;
    std::vector<float> s = normal(size_t(M) * lds, 91 + F, 2.0f);
    for (int r = 0; r < M; r += 4) s[size_t(r) * lds + 2 * F + 1] = s[size_t(r) * lds + 2 * F];  // logit ties
    const std::vector<float> b0 = normal(F, 92, 0.5f), b1 = normal(F, 93, 0.5f);
    const std::vector<float> br = cs.tied_bias ? std::vector<float>{0.25f, 0.25f} : std::vector<float>{0.3f, -0.2f};
    std::vector<float> out0 = normal(size_t(M) * ldo, 94);
    for (int r = 0; r < M; ++r)
      for (int j = F; j < ldo; ++j) out0[size_t(r) * ldo + j] = std::numeric_limits<float>::quiet_NaN();
    // the router on the host: logits = s[2F + e] + br[e] (an identity "weight" on the two logit columns)
    std::vector<float> rx(size_t(M) * 2), logits(size_t(M) * 2), noisy(size_t(M) * 2), probs(size_t(M) * 2);
    for (int r = 0; r < M; ++r)
      for (int e = 0; e < 2; ++e) rx[size_t(r) * 2 + e] = s[size_t(r) * lds + 2 * F + e];
    const std::vector<float> eye = {1.0f, 0.0f, 0.0f, 1.0f};
    std::vector<int> choice_ref(M);
    cpu::moe_router_forward_ref(logits.data(), noisy.data(), probs.data(), choice_ref.data(), rx.data(), eye.data(),
                                br.data(), M, 2, 2, 0.0f, nullptr);
    int ties = 0;
    for (int r = 0; r < M; ++r) {
      ties += logits[size_t(r) * 2] == logits[size_t(r) * 2 + 1];
    }
    if (cs.tied_bias) {
      EXPECT_GT(ties, 0) << "the case should hold tied logits";
    }

    auto ds = upload(s), db0 = upload(b0), db1 = upload(b1), dbr = upload(br);
    DeviceBuffer<int8_t> dchoice(M);
    for (int mode = 0; mode < 8; ++mode) {
      const bool prob = mode & 1, combine = mode & 2, accumulate = mode & 4;
      SCOPED_TRACE(dims({{"M", M},
                         {"F", F},
                         {"lds", lds},
                         {"ldo", ldo},
                         {"prob", prob},
                         {"combine", combine},
                         {"accumulate", accumulate}}));
      std::vector<float> ref(size_t(M) * F);
      for (int r = 0; r < M; ++r) {
        const int e = choice_ref[r];
        const float g = prob ? probs[size_t(r) * 2 + e] : 1.0f;
        for (int j = 0; j < F; ++j) {
          float y = (s[size_t(r) * lds + size_t(e) * F + j] + (e ? b1 : b0)[j]) * g;
          if (combine) y = release_moe_combine(y);
          ref[size_t(r) * F + j] = accumulate ? out0[size_t(r) * ldo + j] + y : y;
        }
      }
      DeviceBuffer<float> dout(size_t(M) * ldo);
      if (accumulate)
        dout.upload(out0);
      else
        dout.fill_bytes(0xFF);
      dchoice.fill_bytes(0xFF);
      int8_t* ch = mode == 3 ? nullptr : dchoice.get();  // choice is optional
      cuda::moe_epilogue_f32(dout.get(), ldo, ch, ds.get(), lds, db0.get(), db1.get(), dbr.get(), M, F,
                             prob ? cuda::moe_gate_prob : cuda::moe_gate_straight_through, combine, accumulate,
                             nullptr);
      device_sync();
      const std::vector<float> o = dout.download();
      std::vector<float> oc(size_t(M) * F);
      size_t gap_written = 0;
      for (int r = 0; r < M; ++r) {
        for (int j = 0; j < F; ++j) oc[size_t(r) * F + j] = o[size_t(r) * ldo + j];
        for (int j = F; j < ldo; ++j) gap_written += std::isfinite(o[size_t(r) * ldo + j]);
      }
      EXPECT_EQ(count_nonfinite(oc), 0u);
      EXPECT_EQ(gap_written, 0u) << "wrote outside the rows";
      if (!prob && !combine)
        EXPECT_TRUE(bit_identical(oc, ref));
      else
        EXPECT_LT(norm_err(oc, ref), 1e-6);
      const std::vector<int8_t> chv = dchoice.download();
      int wrong = 0;
      for (int r = 0; r < M; ++r) wrong += ch ? chv[r] != choice_ref[r] : chv[r] != int8_t(-1);
      EXPECT_EQ(wrong, 0) << (ch ? "choices differ from the router's" : "choice written although null");
      // rerun: bit-identical
      if (accumulate) dout.upload(out0);
      cuda::moe_epilogue_f32(dout.get(), ldo, ch, ds.get(), lds, db0.get(), db1.get(), dbr.get(), M, F,
                             prob ? cuda::moe_gate_prob : cuda::moe_gate_straight_through, combine, accumulate,
                             nullptr);
      device_sync();
      EXPECT_TRUE(bit_identical(dout.download(), o));
    }
  }
  DeviceBuffer<float> a(64);
  const auto st = cuda::moe_gate_straight_through;
  EXPECT_NO_THROW(cuda::moe_epilogue_f32(nullptr, 4, nullptr, nullptr, 10, nullptr, nullptr, nullptr, 0, 4, st, false,
                                         false, nullptr));
  EXPECT_THROW(cuda::moe_epilogue_f32(a.get(), 4, nullptr, a.get(), 9, a.get(), a.get(), a.get(), 1, 4, st, false,
                                      false, nullptr),
               sav::Error);  // lds < 2F + 2
  EXPECT_THROW(cuda::moe_epilogue_f32(a.get(), 3, nullptr, a.get(), 10, a.get(), a.get(), a.get(), 1, 4, st, false,
                                      false, nullptr),
               sav::Error);  // ldo < F
  EXPECT_THROW(cuda::moe_epilogue_f32(a.get(), 4, nullptr, a.get(), 10, a.get(), a.get(), a.get(), 1, 0, st, false,
                                      false, nullptr),
               sav::Error);  // F = 0
  EXPECT_THROW(cuda::moe_epilogue_f32(a.get(), 4, nullptr, a.get(), 10, a.get(), a.get(), a.get(), 1, 4,
                                      cuda::MoeGate(7), false, false, nullptr),
               sav::Error);
}
