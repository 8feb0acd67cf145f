// The f32 PVTv2 training ops of ops/cuda/pvt_train_ops.h against their CPU specs (cpu::conv2d_backward_ref's
// dx, cpu::dwconv2d_backward_ref, cpu::attention_q_kv_forward_ref / _backward_ref, and the mean-pool backward
// loop of Pvt::backward), on odd shapes. Outputs that an op overwrites are poisoned (0xFF bytes = NaN) before
// each launch, so a NaN left afterwards is an element never written; outputs that an op accumulates into (dw,
// db) start from the same random nonzero values on both sides (the CPU backwards accumulate; their overwritten
// counterparts start from zeros). Work spaces are poisoned too. Every op is rerun from the same inputs and must
// give bit-identical results. Tolerances, as max|gpu - ref| / max|ref|:
//   exact (bit-identical): mean_tokens_backward_f32 (the same float product as Pvt::backward's loop);
//   1e-6: col2im (the same float values of dcols summed in (ky, kx) order instead of the CPU's scatter order);
//   1e-5: dwconv2d backward (dx, dw, db) and attention forward / backward (f32 sums in another order than the
//     references' double sums -- for attention the IEEE f32 products of a cuBLAS Blas with F32Math::f32; expf
//     against the C library's double exp).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "ops/cpu/conv.h"
#include "ops/cuda/blas.h"
#include "ops/cuda/pvt_train_ops.h"

using namespace sav;
using namespace sav::test;
using sav::cuda::DeviceBuffer;

namespace {

class CudaPvtTrainOps : public CudaTest {};

}  // namespace

// ---- col2im: the dx of cpu::conv2d_backward_ref ----

TEST_F(CudaPvtTrainOps, Col2imMatchesConvBackwardDx) {
  struct Case {
    int B, H, W, Cin, k, s, pad;
  };
  for (const Case cs : {
           Case{2, 13, 13, 5, 3, 2, 1},  // PVTv2 patch embedding k3 s2 p1
           Case{2, 29, 29, 3, 7, 4, 3},  // the stem k7 s4 p3
           Case{2, 14, 14, 7, 2, 2, 0},  // spatial reduction k = s = r = 2
           Case{1, 9, 11, 4, 4, 4, 0},   // k = s = 4, the last column and row never read
           Case{3, 8, 6, 2, 3, 1, 1},    // stride 1: up to 9 contributions
           Case{2, 12, 12, 3, 5, 3, 0},  // pixels no patch reads: dx = 0 there
           Case{1, 1, 1, 1, 1, 1, 0},    // a single pixel
           Case{2, 7, 5, 33, 3, 2, 2},   // padding larger than the kernel's half
       }) {
    SCOPED_TRACE(
        dims({{"B", cs.B}, {"H", cs.H}, {"W", cs.W}, {"Cin", cs.Cin}, {"k", cs.k}, {"s", cs.s}, {"pad", cs.pad}}));
    const int B = cs.B, H = cs.H, W = cs.W, Cin = cs.Cin, k = cs.k, s = cs.s, pad = cs.pad, Cout = 6;
    const int Ho = cpu::conv_out_size(H, k, s, pad), Wo = cpu::conv_out_size(W, k, s, pad), K = Cin * k * k;
    const int64_t M = int64_t(B) * Ho * Wo;
    const std::vector<float> dy = normal(size_t(M) * Cout, 1 + k + H), w = normal(size_t(Cout) * K, 2 + k + s);
    // dcols = dy w, each entry as the reference forms it (a double sum rounded once)
    std::vector<float> dcols(size_t(M) * K);
    for (int64_t m = 0; m < M; ++m)
      for (int c = 0; c < K; ++c) {
        double acc = 0.0;
        for (int co = 0; co < Cout; ++co) acc += static_cast<double>(dy[size_t(m) * Cout + co]) * w[size_t(co) * K + c];
        dcols[size_t(m) * K + c] = static_cast<float>(acc);
      }
    std::vector<float> ref(size_t(B) * H * W * Cin, 0.0f);  // the reference accumulates: from zeros
    const std::vector<float> cols(size_t(M) * K, 0.0f);     // not read without dw
    cpu::conv2d_backward_ref(ref.data(), nullptr, nullptr, nullptr, dy.data(), cols.data(), w.data(), B, H, W, Cin,
                             Cout, k, s, pad);

    auto ddcols = upload(dcols);
    auto ddx = poisoned(ref.size());
    cuda::col2im_nhwc_f32(ddx.get(), ddcols.get(), B, H, W, Cin, k, s, pad, nullptr);
    device_sync();
    const std::vector<float> dx = ddx.download();
    EXPECT_EQ(count_nonfinite(dx), 0u) << "dx not fully written";
    EXPECT_LT(norm_err(dx, ref), 1e-6);
    ddx.fill_bytes(0xFF);
    cuda::col2im_nhwc_f32(ddx.get(), ddcols.get(), B, H, W, Cin, k, s, pad, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(ddx.download(), dx));
  }
  DeviceBuffer<float> a(256);
  EXPECT_NO_THROW(cuda::col2im_nhwc_f32(nullptr, nullptr, 0, 4, 4, 2, 3, 1, 1, nullptr));           // empty batch
  EXPECT_THROW(cuda::col2im_nhwc_f32(a.get(), a.get(), 1, 2, 2, 1, 5, 1, 1, nullptr), sav::Error);  // k > H + 2 pad
  EXPECT_THROW(cuda::col2im_nhwc_f32(a.get(), a.get(), 1, 4, 4, 1, 3, 0, 1, nullptr), sav::Error);  // s = 0
  EXPECT_THROW(cuda::col2im_nhwc_f32(a.get(), a.get(), 1, 4, 4, 0, 3, 1, 1, nullptr), sav::Error);  // Cin = 0
  EXPECT_THROW(cuda::col2im_nhwc_f32(a.get(), a.get(), 1, 4, 4, 1, 3, 1, -1, nullptr), sav::Error);
  EXPECT_THROW(cuda::col2im_nhwc_f32(a.get(), a.get(), -1, 4, 4, 1, 3, 1, 1, nullptr), sav::Error);
  EXPECT_THROW(cuda::col2im_nhwc_f32(nullptr, a.get(), 1, 4, 4, 1, 3, 1, 1, nullptr), sav::Error);
}

// ---- depthwise conv backward: cpu::dwconv2d_backward_ref ----

TEST_F(CudaPvtTrainOps, DwconvBackwardMatchesReference) {
  struct Case {
    int B, H, W, C, k;
  };
  for (const Case cs : {
           Case{2, 7, 9, 37, 3},    // one chunk, a partial channel block
           Case{2, 7, 9, 37, 5},    // the generic-k path
           Case{3, 29, 29, 64, 3},  // 2 chunks of pixels (the last partial), 2 channel blocks
           Case{2, 35, 33, 5, 5},   // generic k over 2 chunks
           Case{1, 5, 4, 3, 1},     // k = 1
           Case{2, 6, 5, 33, 7},    // k > H: taps beyond the image on both sides
           Case{1, 1, 1, 1, 3},     // a single pixel
       }) {
    SCOPED_TRACE(dims({{"B", cs.B}, {"H", cs.H}, {"W", cs.W}, {"C", cs.C}, {"k", cs.k}}));
    const int B = cs.B, H = cs.H, W = cs.W, C = cs.C, k = cs.k;
    const size_t n = size_t(B) * H * W * C, nw = size_t(C) * k * k;
    const std::vector<float> dy = normal(n, 11 + H + k), x = normal(n, 12 + W + k), w = normal(nw, 13 + k);
    const std::vector<float> dw0 = uniform(nw, 14, -0.5f, 0.5f), db0 = uniform(C, 15, -0.5f, 0.5f);
    std::vector<float> dx_ref(n, 0.0f), dw_ref = dw0, db_ref = db0;
    cpu::dwconv2d_backward_ref(dx_ref.data(), dw_ref.data(), db_ref.data(), dy.data(), x.data(), w.data(), B, H, W, C,
                               k);

    auto ddy = upload(dy), d_x = upload(x), d_w = upload(w), ddw = upload(dw0), ddb = upload(db0);
    auto ddx = poisoned(n);
    const size_t ws_n = cuda::dwconv2d_backward_workspace_floats(B, H, W, C, k);
    ASSERT_GT(ws_n, 0u);
    auto ws = poisoned(ws_n);
    auto run = [&](float* dxp, float* dwp, float* dbp, float* wsp) {
      cuda::dwconv2d_backward_f32(dxp, dwp, dbp, ddy.get(), d_x.get(), d_w.get(), B, H, W, C, k, wsp, nullptr);
      device_sync();
    };
    run(ddx.get(), ddw.get(), ddb.get(), ws.get());
    const std::vector<float> gdx = ddx.download(), gdw = ddw.download(), gdb = ddb.download();
    EXPECT_EQ(count_nonfinite(gdx), 0u) << "dx not fully written";
    EXPECT_EQ(count_nonfinite(gdw) + count_nonfinite(gdb), 0u);
    EXPECT_LT(norm_err(gdx, dx_ref), 1e-5);
    EXPECT_LT(norm_err(gdw, dw_ref), 1e-5);
    EXPECT_LT(norm_err(gdb, db_ref), 1e-5);
    // rerun from the same initial values, with freshly poisoned outputs and work space
    ddx.fill_bytes(0xFF);
    ws.fill_bytes(0xFF);
    ddw.upload(dw0);
    ddb.upload(db0);
    run(ddx.get(), ddw.get(), ddb.get(), ws.get());
    EXPECT_TRUE(bit_identical(ddx.download(), gdx));
    EXPECT_TRUE(bit_identical(ddw.download(), gdw));
    EXPECT_TRUE(bit_identical(ddb.download(), gdb));
    // each gradient alone gives the same bits (dx alone needs no work space)
    ddx.fill_bytes(0xFF);
    run(ddx.get(), nullptr, nullptr, nullptr);
    EXPECT_TRUE(bit_identical(ddx.download(), gdx));
    ddw.upload(dw0);
    ws.fill_bytes(0xFF);
    run(nullptr, ddw.get(), nullptr, ws.get());
    EXPECT_TRUE(bit_identical(ddw.download(), gdw));
    ddb.upload(db0);
    ws.fill_bytes(0xFF);
    run(nullptr, nullptr, ddb.get(), ws.get());
    EXPECT_TRUE(bit_identical(ddb.download(), gdb));
  }
  EXPECT_EQ(cuda::dwconv2d_backward_workspace_floats(0, 4, 4, 8, 3), 0u);
  DeviceBuffer<float> a(4096);
  float* p = a.get();
  EXPECT_NO_THROW(cuda::dwconv2d_backward_f32(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 4, 4, 8, 3,
                                              nullptr, nullptr));  // empty batch
  EXPECT_NO_THROW(cuda::dwconv2d_backward_f32(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, 4, 4, 8, 3,
                                              nullptr, nullptr));  // nothing wanted
  EXPECT_THROW(cuda::dwconv2d_backward_f32(p, p + 1024, p + 2048, p + 3072, p + 3072, p, 1, 4, 4, 8, 2, p, nullptr),
               sav::Error);  // even k
  EXPECT_THROW(
      cuda::dwconv2d_backward_f32(p, nullptr, nullptr, p + 1024, p + 2048, p + 3072, 1, 4, 4, 0, 3, nullptr, nullptr),
      sav::Error);  // C = 0
  EXPECT_THROW(
      cuda::dwconv2d_backward_f32(p, nullptr, nullptr, p + 1024, p + 2048, p + 3072, -1, 4, 4, 8, 3, nullptr, nullptr),
      sav::Error);
  EXPECT_THROW(
      cuda::dwconv2d_backward_f32(nullptr, p, nullptr, p + 1024, p + 2048, p + 3072, 1, 4, 4, 8, 3, nullptr, nullptr),
      sav::Error);  // dw without a work space
  EXPECT_THROW(
      cuda::dwconv2d_backward_f32(p, nullptr, nullptr, nullptr, p + 2048, p + 3072, 1, 4, 4, 8, 3, nullptr, nullptr),
      sav::Error);  // null dy
  EXPECT_THROW(cuda::dwconv2d_backward_f32(p, nullptr, nullptr, p, p + 2048, p + 3072, 1, 4, 4, 8, 3, nullptr, nullptr),
               sav::Error);  // dx aliases dy
}

// ---- attention with separate queries and keys/values ----

namespace {

struct AqCase {
  int B, N, Nk, C, H;
};
const AqCase kAqCases[] = {
    AqCase{2, 50, 13, 48, 3},     // d = 16
    AqCase{1, 197, 197, 64, 2},   // N = Nk, d = 32
    AqCase{1, 3136, 49, 32, 1},   // PVTv2-B0 stage 1 at 224: long sums over the queries in dk / dv
    AqCase{2, 300, 20, 64, 2},    // d = 32
    AqCase{2, 5, 1, 12, 4},       // Nk = 1, d = 3
    AqCase{3, 1, 4, 8, 2},        // N = 1
    AqCase{1, 10, 4096, 128, 1},  // long key rows, d = 128
    AqCase{1, 6, 5000, 16, 2},    // Nk beyond the old 4096 limit
    AqCase{3, 197, 197, 192, 3},  // DeiT-tiny's shape: N = Nk = 197, d = 64
    AqCase{2, 9, 33, 256, 2},     // d = 128, two heads
    AqCase{1, 17, 6, 5, 5},       // d = 1
    AqCase{2, 7, 9, 300, 1},      // d = 300
};

}  // namespace

TEST_F(CudaPvtTrainOps, AttentionQkvForwardMatchesReference) {
  cuda::Blas blas(nullptr, cuda::F32Math::f32);  // the legacy default stream, IEEE f32 products
  for (const AqCase cs : kAqCases) {
    SCOPED_TRACE(dims({{"B", cs.B}, {"N", cs.N}, {"Nk", cs.Nk}, {"C", cs.C}, {"H", cs.H}}));
    const int B = cs.B, N = cs.N, Nk = cs.Nk, C = cs.C, H = cs.H;
    ASSERT_TRUE(cuda::attention_q_kv_train_supports(Nk, C, H));
    const std::vector<float> q = normal(size_t(B) * N * C, 61 + N, 1.5f),
                             kv = normal(size_t(B) * Nk * 2 * C, 62 + Nk, 1.5f);
    std::vector<float> out_ref(size_t(B) * N * C), att_ref(size_t(B) * H * N * Nk);
    cpu::attention_q_kv_forward_ref(out_ref.data(), att_ref.data(), q.data(), kv.data(), B, N, Nk, C, H);
    auto dq = upload(q), dkv = upload(kv);
    auto dout = poisoned(out_ref.size()), datt = poisoned(att_ref.size());
    cuda::attention_q_kv_train_forward(dout.get(), datt.get(), dq.get(), dkv.get(), B, N, Nk, C, H, blas, nullptr);
    device_sync();
    const std::vector<float> out = dout.download(), att = datt.download();
    EXPECT_EQ(count_nonfinite(out), 0u);
    EXPECT_EQ(count_nonfinite(att), 0u);
    EXPECT_LT(norm_err(out, out_ref), 1e-5);
    EXPECT_LT(norm_err(att, att_ref), 1e-5);
    dout.fill_bytes(0xFF);
    datt.fill_bytes(0xFF);
    cuda::attention_q_kv_train_forward(dout.get(), datt.get(), dq.get(), dkv.get(), B, N, Nk, C, H, blas, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dout.download(), out));
    EXPECT_TRUE(bit_identical(datt.download(), att));
  }
}

TEST_F(CudaPvtTrainOps, AttentionQkvBackwardMatchesReference) {
  cuda::Blas blas(nullptr, cuda::F32Math::f32);  // the legacy default stream, IEEE f32 products
  for (const AqCase cs : kAqCases) {
    SCOPED_TRACE(dims({{"B", cs.B}, {"N", cs.N}, {"Nk", cs.Nk}, {"C", cs.C}, {"H", cs.H}}));
    const int B = cs.B, N = cs.N, Nk = cs.Nk, C = cs.C, H = cs.H;
    const std::vector<float> q = normal(size_t(B) * N * C, 71 + N, 1.5f),
                             kv = normal(size_t(B) * Nk * 2 * C, 72 + Nk, 1.5f), dout = normal(size_t(B) * N * C, 73);
    std::vector<float> out(size_t(B) * N * C), att(size_t(B) * H * N * Nk);
    cpu::attention_q_kv_forward_ref(out.data(), att.data(), q.data(), kv.data(), B, N, Nk, C, H);
    // the reference accumulates: from zeros
    std::vector<float> dq_ref(q.size(), 0.0f), dkv_ref(kv.size(), 0.0f), scratch(att.size());
    cpu::attention_q_kv_backward_ref(dq_ref.data(), dkv_ref.data(), scratch.data(), dout.data(), q.data(), kv.data(),
                                     att.data(), B, N, Nk, C, H);

    auto d_q = upload(q), d_kv = upload(kv), ddout = upload(dout), datt = upload(att);
    auto ddq = poisoned(q.size()), ddkv = poisoned(kv.size()), ds = poisoned(att.size());
    auto run = [&] {
      cuda::attention_q_kv_train_backward(ddq.get(), ddkv.get(), ds.get(), ddout.get(), d_q.get(), d_kv.get(),
                                          datt.get(), B, N, Nk, C, H, blas, nullptr);
      device_sync();
    };
    run();
    const std::vector<float> gq = ddq.download(), gkv = ddkv.download();
    EXPECT_EQ(count_nonfinite(gq), 0u) << "dq not fully written";
    EXPECT_EQ(count_nonfinite(gkv), 0u) << "dkv not fully written";
    EXPECT_EQ(count_nonfinite(ds.download()), 0u) << "ds not fully written";
    EXPECT_LT(norm_err(gq, dq_ref), 1e-5);
    // k and v gradients separately (different scales)
    for (int s = 0; s < 2; ++s) {
      SCOPED_TRACE(s == 0 ? "dk" : "dv");
      std::vector<float> part, part_ref;
      for (int64_t row = 0; row < int64_t(B) * Nk; ++row)
        for (int c = 0; c < C; ++c) {
          part.push_back(gkv[size_t(row) * 2 * C + s * C + c]);
          part_ref.push_back(dkv_ref[size_t(row) * 2 * C + s * C + c]);
        }
      EXPECT_LT(norm_err(part, part_ref), 1e-5);
    }
    ddq.fill_bytes(0xFF);
    ddkv.fill_bytes(0xFF);
    ds.fill_bytes(0xFF);
    run();
    EXPECT_TRUE(bit_identical(ddq.download(), gq));
    EXPECT_TRUE(bit_identical(ddkv.download(), gkv));
  }
}

TEST_F(CudaPvtTrainOps, AttentionQkvRejectsUnsupportedSizes) {
  EXPECT_TRUE(cuda::attention_q_kv_train_supports(49, 64, 1));
  EXPECT_TRUE(cuda::attention_q_kv_train_supports(4097, 1024, 1));
  EXPECT_TRUE(cuda::attention_q_kv_train_supports(1, 1, 1));
  EXPECT_FALSE(cuda::attention_q_kv_train_supports(0, 64, 1));
  EXPECT_FALSE(cuda::attention_q_kv_train_supports(49, 1025, 1));  // d = 1025
  EXPECT_FALSE(cuda::attention_q_kv_train_supports(49, 64, 3));    // not divisible
  EXPECT_FALSE(cuda::attention_q_kv_train_supports(49, 0, 1));
  EXPECT_FALSE(cuda::attention_q_kv_train_supports(49, 64, 0));
  DeviceBuffer<float> a(4096);
  float* p = a.get();
  cuda::Blas blas(nullptr, cuda::F32Math::f32);
  EXPECT_THROW(cuda::attention_q_kv_train_forward(p, p, p, p, 1, 2, 2, 1025, 1, blas, nullptr), sav::Error);
  EXPECT_THROW(cuda::attention_q_kv_train_forward(p, p, p, p, 1, 2, 0, 8, 1, blas, nullptr), sav::Error);  // Nk = 0
  EXPECT_THROW(cuda::attention_q_kv_train_forward(p, p, p, p, 1, 0, 2, 8, 1, blas, nullptr), sav::Error);  // N = 0
  EXPECT_THROW(cuda::attention_q_kv_train_forward(p, p, p, p, 1, 65536, 65536, 8, 1, blas, nullptr),
               sav::Error);  // N * Nk > INT_MAX
  EXPECT_THROW(cuda::attention_q_kv_train_forward(p, p, p, p, -1, 2, 2, 8, 1, blas, nullptr), sav::Error);
  EXPECT_THROW(cuda::attention_q_kv_train_forward(nullptr, p, p, p, 1, 2, 2, 8, 1, blas, nullptr), sav::Error);
  EXPECT_THROW(cuda::attention_q_kv_train_backward(p, p, nullptr, p, p, p, p, 1, 2, 2, 8, 1, blas, nullptr),
               sav::Error);
  EXPECT_THROW(cuda::attention_q_kv_train_backward(p, nullptr, p, p, p, p, p, 1, 2, 2, 8, 1, blas, nullptr),
               sav::Error);
  EXPECT_THROW(cuda::attention_q_kv_train_backward(p, p, p, p, p, p, p, 1, 2, 2, 64, 3, blas, nullptr), sav::Error);
  {  // the row kernels must run on the Blas's stream
    cuda::Stream other;
    EXPECT_THROW(cuda::attention_q_kv_train_forward(p, p, p, p, 1, 2, 2, 8, 1, blas, other.get()), sav::Error);
    EXPECT_THROW(cuda::attention_q_kv_train_backward(p, p, p, p, p, p, p, 1, 2, 2, 8, 1, blas, other.get()),
                 sav::Error);
  }
  EXPECT_NO_THROW(cuda::attention_q_kv_train_forward(nullptr, nullptr, nullptr, nullptr, 0, 2, 2, 8, 1, blas, nullptr));
  EXPECT_NO_THROW(cuda::attention_q_kv_train_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0,
                                                      2, 2, 8, 1, blas, nullptr));
}

// ---- mean over tokens, backward: Pvt::backward's loop ----

TEST_F(CudaPvtTrainOps, MeanTokensBackwardIsExact) {
  struct Case {
    int B, N, C;
  };
  for (const Case cs : {Case{3, 49, 37}, Case{2, 196, 5}, Case{1, 3, 1}, Case{2, 3136, 32}, Case{4, 7, 256}}) {
    SCOPED_TRACE(dims({{"B", cs.B}, {"N", cs.N}, {"C", cs.C}}));
    const int B = cs.B, N = cs.N, C = cs.C;
    const std::vector<float> dy = normal(size_t(B) * C, 81 + N);
    std::vector<float> ref(size_t(B) * N * C);
    const float inv = 1.0f / float(N);
    for (int b = 0; b < B; ++b)
      for (int n = 0; n < N; ++n)
        for (int c = 0; c < C; ++c) ref[(size_t(b) * N + n) * C + c] = dy[size_t(b) * C + c] * inv;
    auto ddy = upload(dy);
    auto ddx = poisoned(ref.size());
    cuda::mean_tokens_backward_f32(ddx.get(), ddy.get(), B, N, C, nullptr);
    device_sync();
    const std::vector<float> dx = ddx.download();
    EXPECT_EQ(count_nonfinite(dx), 0u);
    EXPECT_TRUE(bit_identical(dx, ref));
    ddx.fill_bytes(0xFF);
    cuda::mean_tokens_backward_f32(ddx.get(), ddy.get(), B, N, C, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(ddx.download(), dx));
  }
  DeviceBuffer<float> a(64);
  EXPECT_NO_THROW(cuda::mean_tokens_backward_f32(nullptr, nullptr, 0, 4, 4, nullptr));
  EXPECT_THROW(cuda::mean_tokens_backward_f32(a.get(), a.get(), 1, 0, 4, nullptr), sav::Error);
  EXPECT_THROW(cuda::mean_tokens_backward_f32(a.get(), a.get(), 1, 4, 0, nullptr), sav::Error);
  EXPECT_THROW(cuda::mean_tokens_backward_f32(a.get(), a.get(), -1, 4, 4, nullptr), sav::Error);
  EXPECT_THROW(cuda::mean_tokens_backward_f32(nullptr, a.get(), 1, 4, 4, nullptr), sav::Error);
}
