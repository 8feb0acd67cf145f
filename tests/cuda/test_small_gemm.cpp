// The small-M product kernel (ops/cuda/small_gemm.h) against a CPU double reference of its definition, and its
// programmatic dependent launch against ordinary launches:
//   - every epilogue (bf16, bf16 GELU, f32, f32 residual add) with and without a bias on odd shapes (partial 32-row
//     and 32-column tiles, M = 1, K = 16 and K = 1536, strided output rows); every output element written (the
//     output starts as NaN), the gap columns of strided rows and the rows past M left alone;
//   - a chain of dependent products launched under DependentLaunchScope(true), eagerly and as a captured graph, gives
//     the bits of the same chain launched in stream order (a kernel that read its input before its predecessor
//     finished would differ), and a rerun gives the same bits;
//   - bad shapes throw sav::Error.
// Tolerance. Each output is sum_k x_k w_k (exact products of bf16 values) summed in f32 by the tensor cores over
// K / 16 steps in two halves: count 2 ulp per step, n = K / 16 + 2 roundings, so |err| <= 2 n 2^-24 sum |x_k w_k|
// (< 2e-5 of the sum of |terms| for K <= 1536); the bias add and the residual add one rounding each. bf16 outputs add
// their own rounding (2^-9 relative) and GELU's slope (at most 1.13) times the pre-activation error.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda_test_util.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/small_gemm.h"

using namespace sav;
using namespace sav::test;
using sav::cuda::bf16;
using sav::cuda::DeviceBuffer;

namespace {

class SmallGemm : public CudaTest {};

double gelu_tanh(double v) { return 0.5 * v * (1.0 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))); }

struct Ref {
  std::vector<double> s, scale;  // x W^T (+ b) and sum |x_k w_k| + |b| per output
};

Ref reference(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& b, int M, int K,
              int F) {
  Ref r{std::vector<double>(size_t(M) * F), std::vector<double>(size_t(M) * F)};
  for (int i = 0; i < M; ++i)
    for (int f = 0; f < F; ++f) {
      double s = 0, a = 0;
      for (int k = 0; k < K; ++k) {
        const double t = double(x[size_t(i) * K + k]) * w[size_t(f) * K + k];
        s += t, a += std::fabs(t);
      }
      if (!b.empty()) s += b[f], a += std::fabs(b[f]);
      r.s[size_t(i) * F + f] = s, r.scale[size_t(i) * F + f] = a;
    }
  return r;
}

enum class Mode { bf16, gelu, f32, acc };
const char* name(Mode m) {
  return m == Mode::bf16 ? "bf16" : m == Mode::gelu ? "gelu" : m == Mode::f32 ? "f32" : "acc";
}

TEST_F(SmallGemm, MatchesReferenceOnOddShapes) {
  struct S {
    int M, K, F, ldy;
  };
  int seed = 1;
  for (const S sh : {S{1, 16, 2, 2}, S{37, 48, 38, 46}, S{197, 192, 384, 384}, S{197, 384, 768, 768},
                     S{197, 768, 400, 402}, S{33, 1536, 34, 34}, S{70, 208, 66, 70}}) {
    for (const Mode mode : {Mode::bf16, Mode::gelu, Mode::f32, Mode::acc}) {
      for (const bool bias : {false, true}) {
        SCOPED_TRACE(dims({{"M", sh.M}, {"K", sh.K}, {"F", sh.F}, {"ldy", sh.ldy}, {"bias", bias}}) + " " + name(mode));
        const int M = sh.M, K = sh.K, F = sh.F, ld = sh.ldy, tail = 5;
        const std::vector<float> x = round_bf16(normal(size_t(M) * K, ++seed));
        const std::vector<float> w = round_bf16(normal(size_t(F) * K, ++seed, 0.1f));
        std::vector<float> b = bias ? normal(F, ++seed, 0.5f) : std::vector<float>();
        const bool out16 = mode == Mode::bf16 || mode == Mode::gelu;
        if (out16 && bias) b = round_bf16(b);
        const Ref ref = reference(x, w, b, M, K, F);
        auto dx = upload_as<bf16>(x), dw = upload_as<bf16>(w);
        std::vector<float> y0 = normal(size_t(M + tail) * ld, ++seed);  // residual input (acc) / the gap sentinel
        float nan;
        std::memset(&nan, 0xFF, 4);
        cuda::Stream st;
        if (out16) {
          auto db = upload_as<bf16>(b);
          auto dy = poisoned<bf16>(size_t(M + tail) * ld);
          cuda::small_linear_bf16(dy.get(), ld, dx.get(), dw.get(), bias ? db.get() : nullptr, M, K, F,
                                  mode == Mode::gelu, st.get());
          device_sync();
          const std::vector<float> y = download_f32(dy);
          size_t bad = 0, touched = 0;
          for (int i = 0; i < M + tail; ++i)
            for (int c = 0; c < ld; ++c) {
              const float v = y[size_t(i) * ld + c];
              if (i >= M || c >= F) {
                touched += !std::isnan(v);
                continue;
              }
              const double s = ref.s[size_t(i) * F + c], sc = ref.scale[size_t(i) * F + c];
              const double want = mode == Mode::gelu ? gelu_tanh(s) : s;
              const double tol = 1.2 * 2e-5 * sc + std::ldexp(std::fabs(want), -8) + 1e-30;
              bad += !(std::fabs(v - want) <= tol);
            }
          EXPECT_EQ(bad, 0u);
          EXPECT_EQ(touched, 0u) << "wrote a gap column or a row past M";
        } else {
          auto db = upload(b);
          std::vector<float> init = y0;
          if (mode != Mode::acc) init.assign(init.size(), nan);
          for (int i = 0; i < M + tail; ++i)
            for (int c = 0; c < ld; ++c)
              if (i >= M || c >= F) init[size_t(i) * ld + c] = nan;
          auto dy = upload(init);
          cuda::small_linear_f32(dy.get(), ld, dx.get(), dw.get(), bias ? db.get() : nullptr, M, K, F,
                                 mode == Mode::acc, st.get());
          device_sync();
          const std::vector<float> y = dy.download();
          size_t bad = 0, touched = 0;
          for (int i = 0; i < M + tail; ++i)
            for (int c = 0; c < ld; ++c) {
              const size_t o = size_t(i) * ld + c;
              if (i >= M || c >= F) {
                touched += std::memcmp(&y[o], &init[o], 4) != 0;
                continue;
              }
              const double base = mode == Mode::acc ? y0[o] : 0.0;
              const double want = base + ref.s[size_t(i) * F + c];
              const double tol = 2e-5 * ref.scale[size_t(i) * F + c] + 2 * std::ldexp(std::fabs(want), -24) + 1e-30;
              bad += !(std::fabs(y[o] - want) <= tol);
            }
          EXPECT_EQ(bad, 0u);
          EXPECT_EQ(touched, 0u) << "wrote a gap column or a row past M";
        }
      }
    }
  }
}

// A chain of dependent products at DeiT-Tiny batch-1 shapes, 24 links of: a1 = GELU(a0 W01^T), a0 = a1 W10^T,
// r += a0 Wr^T (each product reads the one before it).
struct Chain {
  int M = 197, C = 192, F = 384, links = 24;
  DeviceBuffer<bf16> a0, a1, w01, w10;
  DeviceBuffer<float> r;
  DeviceBuffer<bf16> wr;
  std::vector<float> a0_init;
  Chain() {
    a0_init = round_bf16(normal(size_t(M) * C, 71));
    a0 = upload_as<bf16>(a0_init);
    a1 = DeviceBuffer<bf16>(size_t(M) * F);
    w01 = upload_as<bf16>(normal(size_t(F) * C, 72, 0.08f));
    w10 = upload_as<bf16>(normal(size_t(C) * F, 73, 0.06f));
    wr = upload_as<bf16>(normal(size_t(C) * C, 74, 0.07f));
    r = DeviceBuffer<float>(size_t(M) * C);
  }
  void reset() {
    a0.upload(sav::cuda::to_bf16(a0_init.data(), a0_init.size()));
    SAV_CUDA_CHECK(cudaMemset(r.get(), 0, r.bytes()));
  }
  void run(cudaStream_t s) {
    for (int l = 0; l < links; ++l) {
      cuda::small_linear_bf16(a1.get(), F, a0.get(), w01.get(), nullptr, M, C, F, true, s);
      cuda::small_linear_bf16(a0.get(), C, a1.get(), w10.get(), nullptr, M, F, C, false, s);
      cuda::small_linear_f32(r.get(), C, a0.get(), wr.get(), nullptr, M, C, C, true, s);
    }
  }
};

TEST_F(SmallGemm, DependentLaunchChainMatchesStreamOrderBitForBit) {
  Chain ch;
  cuda::Stream st;
  ch.reset();
  ch.run(st.get());
  device_sync();
  const std::vector<float> want = ch.r.download();
  EXPECT_EQ(count_nonfinite(want), 0u);
  ch.reset();
  ch.run(st.get());
  device_sync();
  EXPECT_TRUE(bit_identical(ch.r.download(), want)) << "rerun";
  {
    cuda::DependentLaunchScope pdl(true);
    ch.reset();
    ch.run(st.get());
    device_sync();
    EXPECT_TRUE(bit_identical(ch.r.download(), want)) << "eager, dependent launches";
    ch.reset();
    cudaGraph_t g = nullptr;
    SAV_CUDA_CHECK(cudaStreamBeginCapture(st.get(), cudaStreamCaptureModeThreadLocal));
    ch.run(st.get());
    SAV_CUDA_CHECK(cudaStreamEndCapture(st.get(), &g));
    cudaGraphExec_t ge = nullptr;
    SAV_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
    for (int rep = 0; rep < 3; ++rep) {
      ch.reset();
      SAV_CUDA_CHECK(cudaGraphLaunch(ge, st.get()));
      device_sync();
      EXPECT_TRUE(bit_identical(ch.r.download(), want)) << "graph replay " << rep;
    }
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
  }
}

TEST_F(SmallGemm, BadShapesThrow) {
  DeviceBuffer<bf16> x(64 * 64), w(64 * 64), y(64 * 64);
  cuda::Stream st;
  EXPECT_THROW(cuda::small_linear_bf16(y.get(), 64, x.get(), w.get(), nullptr, 4, 24, 8, false, st.get()), Error);
  EXPECT_THROW(cuda::small_linear_bf16(y.get(), 64, x.get(), w.get(), nullptr, 4, 32, 7, false, st.get()), Error);
  EXPECT_THROW(cuda::small_linear_bf16(y.get(), 6, x.get(), w.get(), nullptr, 4, 32, 8, false, st.get()), Error);
  EXPECT_THROW(cuda::small_linear_bf16(y.get(), 64, x.get(), w.get(), nullptr, 0, 32, 8, false, st.get()), Error);
  EXPECT_THROW(cuda::small_linear_bf16(y.get(), 64, x.get(), w.get(), nullptr, 4, 1552, 8, false, st.get()), Error);
  EXPECT_FALSE(cuda::small_linear_supports(197, 3072, 768));
  EXPECT_TRUE(cuda::small_linear_supports(197, 768, 400));
}

// Not an assertion: the products of 12 DeiT-Tiny batch-1 blocks (qk/v 192 -> 384 bf16, proj 192 -> 192 f32
// residual, masked fc1 384 -> 768 GELU, stacked fc2 768 -> 400 f32) in one graph, by cuBLASLt, by this kernel in
// stream order and under dependent launch; us per block.
TEST_F(SmallGemm, TimingPrinted) {
  const int M = 197, C = 192;
  auto xn = upload_as<bf16>(normal(size_t(M) * C, 1)), qkv = upload_as<bf16>(normal(size_t(M) * 2 * C, 2));
  auto hid = upload_as<bf16>(normal(size_t(M) * 768, 3));
  auto wq = upload_as<bf16>(normal(size_t(2 * C) * C, 4, 0.05f)), wp = upload_as<bf16>(normal(size_t(C) * C, 5, 0.05f));
  auto w1 = upload_as<bf16>(normal(size_t(768) * 2 * C, 6, 0.05f)),
       w2 = upload_as<bf16>(normal(size_t(400) * 768, 7, 0.03f));
  auto bp = upload(normal(C, 8));
  DeviceBuffer<float> x(size_t(M) * C), s(size_t(M) * 400);
  DeviceBuffer<bf16> ao(size_t(M) * C);
  SAV_CUDA_CHECK(cudaMemset(x.get(), 0, x.bytes()));
  cuda::Gemm gemm;
  cuda::Stream st;
  auto block_lt = [&](cudaStream_t t) {
    gemm.linear_bf16(qkv.get(), xn.get(), wq.get(), nullptr, M, C, 2 * C, false, t);
    gemm.linear_f32(x.get(), ao.get(), wp.get(), bp.get(), M, C, C, true, t);
    gemm.linear_bf16(hid.get(), qkv.get(), w1.get(), nullptr, M, 2 * C, 768, true, t);
    gemm.linear_f32(s.get(), hid.get(), w2.get(), nullptr, M, 768, 400, false, t);
  };
  auto block_own = [&](cudaStream_t t) {
    cuda::small_linear_bf16(qkv.get(), 2 * C, xn.get(), wq.get(), nullptr, M, C, 2 * C, false, t);
    cuda::small_linear_f32(x.get(), C, ao.get(), wp.get(), bp.get(), M, C, C, true, t);
    cuda::small_linear_bf16(hid.get(), 768, qkv.get(), w1.get(), nullptr, M, 2 * C, 768, true, t);
    cuda::small_linear_f32(s.get(), 400, hid.get(), w2.get(), nullptr, M, 768, 400, false, t);
  };
  block_lt(st.get());
  block_own(st.get());
  device_sync();
  const double lt = cuda::median_graph_us(block_lt, st.get(), 12, 21);
  const double own = cuda::median_graph_us(block_own, st.get(), 12, 21);
  double pdl = 0;
  {
    cuda::DependentLaunchScope scope(true);
    pdl = cuda::median_graph_us(block_own, st.get(), 12, 21);
  }
  std::printf(
      "[ small_gemm ] DeiT-Tiny b1 block products (4 products, us per block in a graph of 12): cuBLASLt %.2f, "
      "own %.2f, own + dependent launch %.2f\n",
      lt, own, pdl);
  EXPECT_GT(lt, 0.0);
}

}  // namespace
