// The f32 training ops of ops/cuda/train_ops.h against their CPU specs (the sav::cpu *_ref ops, or the host
// loops of Vit and AdamW), on odd shapes. Outputs that an op overwrites are poisoned (0xFF bytes = NaN) before
// each launch, so a NaN left afterwards is an element never written; outputs that an op accumulates into start
// from random nonzero values on both sides (the CPU backwards accumulate too), and the gaps of strided rows
// hold NaN that must survive. Every op is rerun from the same inputs and must give bit-identical results.
// Tolerances, as max|gpu - ref| / max|ref|:
//   exact (bit-identical): im2col, token assembly and its backward (the same float additions in the same
//     order as Vit's loops), add, AdamW (every float operation rounded singly on both sides: the host
//     reference goes through volatile temporaries, so no FMA contraction), the non-finite count of sumsq;
//   1e-5: LayerNorm forward / backward, column sums, GELU forward / backward, attention forward / backward
//     (f32 sums in another order than the references' double sums -- for attention the IEEE f32 products of
//     a cuBLAS Blas with F32Math::f32; erff / expf against the C library's double erf / exp);
//   1e-12: the double sum of squares (double sums in another order than the host's).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "ops/cpu/ops.h"
#include "ops/cuda/blas.h"
#include "ops/cuda/train_ops.h"

using namespace sav;
using namespace sav::test;
using sav::cuda::DeviceBuffer;

namespace {

class CudaTrainOps : public CudaTest {};

// The first C values of each of M rows ld apart, contiguous.
std::vector<float> compact(const std::vector<float>& a, int M, int C, int ld) {
  std::vector<float> r(size_t(M) * C);
  for (int i = 0; i < M; ++i)
    for (int c = 0; c < C; ++c) r[size_t(i) * C + c] = a[size_t(i) * ld + c];
  return r;
}

// Number of gap elements (columns C..ld-1 of each row) that are not NaN.
size_t gap_touched(const std::vector<float>& a, int M, int C, int ld) {
  size_t n = 0;
  for (int i = 0; i < M; ++i)
    for (int c = C; c < ld; ++c) n += !std::isnan(a[size_t(i) * ld + c]);
  return n;
}

// Sets the gaps (columns C..ld-1 of each row) to NaN: a kernel that reads them spreads NaN into its outputs.
void nan_gaps(std::vector<float>& a, int M, int C, int ld) {
  for (int i = 0; i < M; ++i)
    for (int c = C; c < ld; ++c) a[size_t(i) * ld + c] = std::numeric_limits<float>::quiet_NaN();
}

// M rows of C random values ld apart, NaN in the gaps.
std::vector<float> strided(int M, int C, int ld, uint64_t seed, float lo, float hi) {
  std::vector<float> a = uniform(size_t(M) * ld, seed, lo, hi);
  nan_gaps(a, M, C, ld);
  return a;
}

// Single float operations, each rounded on its own: the store to a volatile keeps the compiler from fusing a
// product and a sum into an FMA.
float f_mul(float a, float b) {
  volatile float r = a * b;
  return r;
}
float f_add(float a, float b) {
  volatile float r = a + b;
  return r;
}
float f_sub(float a, float b) {
  volatile float r = a - b;
  return r;
}
float f_div(float a, float b) {
  volatile float r = a / b;
  return r;
}
float f_sqrt(float a) {
  volatile float r = std::sqrt(a);
  return r;
}

}  // namespace

// ---- im2col: exactly the cols of cpu::patch_embed_forward_ref ----

TEST_F(CudaTrainOps, Im2colMatchesPatchEmbedColumns) {
  struct Case {
    int B, Cin, S, p;
  };
  for (const Case cs : {Case{3, 3, 37, 4}, Case{2, 3, 32, 16}, Case{1, 1, 5, 5}, Case{2, 7, 15, 2}, Case{3, 5, 9, 1},
                        Case{2, 3, 224, 16}}) {
    SCOPED_TRACE(dims({{"B", cs.B}, {"Cin", cs.Cin}, {"S", cs.S}, {"p", cs.p}}));
    const int B = cs.B, Cin = cs.Cin, S = cs.S, p = cs.p, G = S / p, P = G * G, K = Cin * p * p;
    const std::vector<float> img = normal(size_t(B) * Cin * S * S, 1 + S + p);
    const std::vector<float> w(K, 0.0f), b(1, 0.0f);
    std::vector<float> ref(size_t(B) * P * K), out(size_t(B) * P);
    cpu::patch_embed_forward_ref(out.data(), ref.data(), img.data(), w.data(), b.data(), B, Cin, S, p, 1);
    auto dimg = upload(img);
    auto dcols = poisoned(ref.size());
    cuda::im2col_f32(dcols.get(), dimg.get(), B, Cin, S, p, nullptr);
    device_sync();
    const std::vector<float> cols = dcols.download();
    EXPECT_EQ(count_nonfinite(cols), 0u);
    EXPECT_TRUE(bit_identical(cols, ref));
    dcols.fill_bytes(0xFF);
    cuda::im2col_f32(dcols.get(), dimg.get(), B, Cin, S, p, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dcols.download(), cols));
  }
  DeviceBuffer<float> a(64);
  EXPECT_NO_THROW(cuda::im2col_f32(nullptr, nullptr, 0, 3, 8, 4, nullptr));           // empty: nothing launched
  EXPECT_THROW(cuda::im2col_f32(a.get(), a.get(), 1, 1, 3, 4, nullptr), sav::Error);  // S < p
  EXPECT_THROW(cuda::im2col_f32(a.get(), a.get(), 1, 0, 8, 4, nullptr), sav::Error);  // Cin = 0
  EXPECT_THROW(cuda::im2col_f32(a.get(), a.get(), 1, 1, 8, 0, nullptr), sav::Error);  // p = 0
  EXPECT_THROW(cuda::im2col_f32(a.get(), a.get(), -1, 1, 8, 4, nullptr), sav::Error);
  EXPECT_THROW(cuda::im2col_f32(nullptr, a.get(), 1, 1, 8, 4, nullptr), sav::Error);
}

// ---- token assembly: Vit::forward's loop and Vit::backward's sums ----

TEST_F(CudaTrainOps, EmbedTokensForwardIsExact) {
  struct Case {
    int B, N, C;
  };
  for (const Case cs : {Case{3, 17, 75}, Case{3, 50, 75}, Case{3, 197, 75}, Case{2, 1, 7}, Case{1, 2, 1}}) {
    SCOPED_TRACE(dims({{"B", cs.B}, {"N", cs.N}, {"C", cs.C}}));
    const int B = cs.B, N = cs.N, C = cs.C, P = N - 1;
    const std::vector<float> pe = normal(size_t(B) * P * C, 2 + N), cls = normal(C, 3 + N),
                             pos = normal(size_t(N) * C, 4);
    std::vector<float> ref(size_t(B) * N * C);
    for (int b = 0; b < B; ++b) {
      float* xb = ref.data() + size_t(b) * N * C;
      for (int c = 0; c < C; ++c) xb[c] = cls[c] + pos[c];
      const float* pb = pe.data() + size_t(b) * P * C;
      for (int64_t i = 0; i < int64_t(P) * C; ++i) xb[C + i] = pb[i] + pos[C + i];
    }
    auto dpe = upload(pe), dcls = upload(cls), dpos = upload(pos);
    auto dx = poisoned(ref.size());
    cuda::embed_tokens_forward(dx.get(), dpe.get(), dcls.get(), dpos.get(), B, N, C, nullptr);
    device_sync();
    const std::vector<float> x = dx.download();
    EXPECT_EQ(count_nonfinite(x), 0u);
    EXPECT_TRUE(bit_identical(x, ref));
    dx.fill_bytes(0xFF);
    cuda::embed_tokens_forward(dx.get(), dpe.get(), dcls.get(), dpos.get(), B, N, C, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dx.download(), x));
  }
  DeviceBuffer<float> a(64);
  EXPECT_NO_THROW(cuda::embed_tokens_forward(nullptr, nullptr, nullptr, nullptr, 0, 5, 4, nullptr));
  EXPECT_THROW(cuda::embed_tokens_forward(a.get(), a.get(), a.get(), a.get(), 1, 0, 4, nullptr), sav::Error);
  EXPECT_THROW(cuda::embed_tokens_forward(a.get(), a.get(), a.get(), a.get(), 1, 4, 0, nullptr), sav::Error);
  EXPECT_THROW(cuda::embed_tokens_forward(a.get(), a.get(), nullptr, a.get(), 1, 4, 4, nullptr), sav::Error);
}

TEST_F(CudaTrainOps, EmbedTokensBackwardSumsInOrder) {
  struct Case {
    int B, N, C;
  };
  for (const Case cs : {Case{3, 17, 75}, Case{3, 50, 75}, Case{3, 197, 75}, Case{2, 1, 7}, Case{5, 3, 1}}) {
    SCOPED_TRACE(dims({{"B", cs.B}, {"N", cs.N}, {"C", cs.C}}));
    const int B = cs.B, N = cs.N, C = cs.C, P = N - 1;
    const std::vector<float> dx = normal(size_t(B) * N * C, 5 + N), cls0 = uniform(C, 6, -0.5f, 0.5f),
                             pos0 = uniform(size_t(N) * C, 7, -0.5f, 0.5f);
    // Vit::backward's loops
    std::vector<float> cls_ref = cls0, pos_ref = pos0, pe_ref(size_t(B) * P * C);
    for (int b = 0; b < B; ++b) {
      const float* db = dx.data() + size_t(b) * N * C;
      for (int c = 0; c < C; ++c) cls_ref[c] += db[c];
      for (int64_t i = 0; i < int64_t(N) * C; ++i) pos_ref[i] += db[i];
    }
    for (int b = 0; b < B; ++b)
      std::memcpy(pe_ref.data() + size_t(b) * P * C, dx.data() + size_t(b) * N * C + C, sizeof(float) * P * C);

    auto ddx = upload(dx), dcls = upload(cls0), dpos = upload(pos0);
    auto dpe = poisoned(pe_ref.size());
    cuda::embed_tokens_backward(dpe.get(), dcls.get(), dpos.get(), ddx.get(), B, N, C, nullptr);
    device_sync();
    const std::vector<float> pe = dpe.download(), cls = dcls.download(), pos = dpos.download();
    EXPECT_EQ(count_nonfinite(pe), 0u);
    EXPECT_TRUE(bit_identical(pe, pe_ref));
    EXPECT_TRUE(bit_identical(cls, cls_ref));
    EXPECT_TRUE(bit_identical(pos, pos_ref));
    // rerun from the same initial values
    dcls.upload(cls0);
    dpos.upload(pos0);
    dpe.fill_bytes(0xFF);
    cuda::embed_tokens_backward(dpe.get(), dcls.get(), dpos.get(), ddx.get(), B, N, C, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dpe.download(), pe));
    EXPECT_TRUE(bit_identical(dcls.download(), cls));
    EXPECT_TRUE(bit_identical(dpos.download(), pos));
    // each output alone
    dpos.upload(pos0);
    cuda::embed_tokens_backward(nullptr, nullptr, dpos.get(), ddx.get(), B, N, C, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dpos.download(), pos_ref));
    dcls.upload(cls0);
    cuda::embed_tokens_backward(nullptr, dcls.get(), nullptr, ddx.get(), B, N, C, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dcls.download(), cls_ref));
    if (P > 0) {
      dpe.fill_bytes(0xFF);
      cuda::embed_tokens_backward(dpe.get(), nullptr, nullptr, ddx.get(), B, N, C, nullptr);
      device_sync();
      EXPECT_TRUE(bit_identical(dpe.download(), pe_ref));
    }
  }
  DeviceBuffer<float> a(64);
  EXPECT_NO_THROW(cuda::embed_tokens_backward(nullptr, nullptr, nullptr, nullptr, 0, 5, 4, nullptr));
  EXPECT_THROW(cuda::embed_tokens_backward(a.get(), a.get(), a.get(), a.get(), 1, 0, 4, nullptr), sav::Error);
  EXPECT_THROW(cuda::embed_tokens_backward(a.get(), a.get(), a.get(), nullptr, 1, 4, 4, nullptr), sav::Error);
}

// ---- LayerNorm ----

namespace {

struct LnCase {
  int M, C, pad_x, pad_y, pad_dx;
};
const LnCase kLnCases[] = {LnCase{37, 75, 3, 2, 1},   LnCase{1, 1, 0, 0, 0},    LnCase{197, 192, 0, 5, 0},
                           LnCase{130, 768, 0, 0, 0}, LnCase{3, 1100, 1, 0, 2}, LnCase{64, 33, 0, 0, 0},
                           LnCase{65, 40, 0, 1, 3},   LnCase{9, 31, 2, 2, 2}};

}  // namespace

TEST_F(CudaTrainOps, LayerNormForwardMatchesReference) {
  for (const LnCase cs : kLnCases) {
    SCOPED_TRACE(dims({{"M", cs.M}, {"C", cs.C}}));
    const int M = cs.M, C = cs.C, ldx = C + cs.pad_x, ldy = C + cs.pad_y;
    std::vector<float> x = normal(size_t(M) * ldx, 11 + C, 2.0f);
    for (auto& v : x) v += 5.0f;  // a mean to remove
    nan_gaps(x, M, C, ldx);
    const std::vector<float> w = uniform(C, 12, 0.5f, 1.5f), b = uniform(C, 13, -0.5f, 0.5f);
    const std::vector<float> xc = compact(x, M, C, ldx);
    std::vector<float> ref(size_t(M) * C), mean_ref(M), rstd_ref(M);
    cpu::layernorm_forward_ref(ref.data(), mean_ref.data(), rstd_ref.data(), xc.data(), w.data(), b.data(), M, C,
                               1e-6f);

    auto dx = upload(x), dw = upload(w), db = upload(b);
    auto dy = poisoned(size_t(M) * ldy), dmean = poisoned(M), drstd = poisoned(M);
    cuda::layernorm_train_forward(dy.get(), ldy, dmean.get(), drstd.get(), dx.get(), ldx, dw.get(), db.get(), M, C,
                                  1e-6f, nullptr);
    device_sync();
    const std::vector<float> y = dy.download(), mean = dmean.download(), rstd = drstd.download();
    const std::vector<float> yc = compact(y, M, C, ldy);
    EXPECT_EQ(count_nonfinite(yc) + count_nonfinite(mean) + count_nonfinite(rstd), 0u);
    EXPECT_EQ(gap_touched(y, M, C, ldy), 0u) << "wrote outside the rows";
    EXPECT_LT(norm_err(yc, ref), 1e-5);
    EXPECT_LT(norm_err(mean, mean_ref), 1e-5);
    EXPECT_LT(norm_err(rstd, rstd_ref), 1e-5);
    // rerun: bit-identical; mean / rstd may be skipped
    dy.fill_bytes(0xFF);
    dmean.fill_bytes(0xFF);
    drstd.fill_bytes(0xFF);
    cuda::layernorm_train_forward(dy.get(), ldy, dmean.get(), drstd.get(), dx.get(), ldx, dw.get(), db.get(), M, C,
                                  1e-6f, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dy.download(), y));
    EXPECT_TRUE(bit_identical(dmean.download(), mean));
    EXPECT_TRUE(bit_identical(drstd.download(), rstd));
    dy.fill_bytes(0xFF);
    cuda::layernorm_train_forward(dy.get(), ldy, nullptr, nullptr, dx.get(), ldx, dw.get(), db.get(), M, C, 1e-6f,
                                  nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dy.download(), y));
  }
  DeviceBuffer<float> a(64), c(64);
  EXPECT_NO_THROW(
      cuda::layernorm_train_forward(nullptr, 8, nullptr, nullptr, nullptr, 8, nullptr, nullptr, 0, 8, 1e-6f, nullptr));
  EXPECT_THROW(
      cuda::layernorm_train_forward(a.get(), 8, a.get(), a.get(), c.get(), 8, a.get(), a.get(), 1, 0, 1e-6f, nullptr),
      sav::Error);  // C = 0
  EXPECT_THROW(
      cuda::layernorm_train_forward(a.get(), 4, a.get(), a.get(), c.get(), 8, a.get(), a.get(), 1, 8, 1e-6f, nullptr),
      sav::Error);  // ldy < C
  EXPECT_THROW(
      cuda::layernorm_train_forward(a.get(), 8, a.get(), a.get(), c.get(), 8, a.get(), a.get(), -1, 8, 1e-6f, nullptr),
      sav::Error);
  EXPECT_THROW(
      cuda::layernorm_train_forward(a.get(), 8, a.get(), a.get(), a.get(), 8, c.get(), c.get(), 1, 8, 1e-6f, nullptr),
      sav::Error);  // y aliases x
}

TEST_F(CudaTrainOps, LayerNormBackwardAccumulatesLikeReference) {
  for (const LnCase cs : kLnCases) {
    SCOPED_TRACE(dims({{"M", cs.M}, {"C", cs.C}}));
    const int M = cs.M, C = cs.C, ldx = C + cs.pad_x, lddy = C + cs.pad_y, lddx = C + cs.pad_dx;
    std::vector<float> x = normal(size_t(M) * ldx, 21 + C, 2.0f);
    for (auto& v : x) v += 3.0f;
    nan_gaps(x, M, C, ldx);
    std::vector<float> dy = normal(size_t(M) * lddy, 22 + C);
    nan_gaps(dy, M, C, lddy);
    const std::vector<float> w = uniform(C, 23, 0.5f, 1.5f), b = uniform(C, 24, -0.5f, 0.5f);
    const std::vector<float> dx0 = strided(M, C, lddx, 25, -0.5f, 0.5f), dw0 = uniform(C, 26, -0.5f, 0.5f),
                             db0 = uniform(C, 27, -0.5f, 0.5f);
    const std::vector<float> xc = compact(x, M, C, ldx), dyc = compact(dy, M, C, lddy);
    std::vector<float> y(size_t(M) * C), mean(M), rstd(M);
    cpu::layernorm_forward_ref(y.data(), mean.data(), rstd.data(), xc.data(), w.data(), b.data(), M, C, 1e-6f);
    std::vector<float> dx_ref = compact(dx0, M, C, lddx), dw_ref = dw0, db_ref = db0;
    cpu::layernorm_backward_ref(dx_ref.data(), dw_ref.data(), db_ref.data(), dyc.data(), xc.data(), w.data(),
                                mean.data(), rstd.data(), M, C);

    auto d_x = upload(x), ddy = upload(dy), d_w = upload(w), dmean = upload(mean), drstd = upload(rstd);
    auto ddx = upload(dx0), ddw = upload(dw0), ddb = upload(db0);
    const size_t ws_n = cuda::layernorm_backward_workspace_floats(M, C);
    ASSERT_GT(ws_n, 0u);
    auto ws = poisoned(ws_n);
    auto run = [&](float* dxp, float* dwp, float* dbp) {
      cuda::layernorm_train_backward(dxp, lddx, dwp, dbp, ddy.get(), lddy, d_x.get(), ldx, d_w.get(), dmean.get(),
                                     drstd.get(), M, C, ws.get(), nullptr);
      device_sync();
    };
    run(ddx.get(), ddw.get(), ddb.get());
    const std::vector<float> gdx = ddx.download(), gdw = ddw.download(), gdb = ddb.download();
    const std::vector<float> gdxc = compact(gdx, M, C, lddx);
    EXPECT_EQ(count_nonfinite(gdxc) + count_nonfinite(gdw) + count_nonfinite(gdb), 0u);
    EXPECT_EQ(gap_touched(gdx, M, C, lddx), 0u) << "wrote outside the rows";
    // C = 1 has zero variance: rstd = 1/sqrt(eps) = 1e3 multiplies every rounding of the float kernel (the
    // reference runs in double), so the dx tolerance scales with the largest rstd.
    const float rmax = *std::max_element(rstd.begin(), rstd.end());
    EXPECT_LT(norm_err(gdxc, dx_ref), 1e-5 * std::max(1.0f, rmax / 10.0f));
    EXPECT_LT(norm_err(gdw, dw_ref), 1e-5);
    EXPECT_LT(norm_err(gdb, db_ref), 1e-5);
    // rerun from the same initial values, with a freshly poisoned work space
    ddx.upload(dx0);
    ddw.upload(dw0);
    ddb.upload(db0);
    ws.fill_bytes(0xFF);
    run(ddx.get(), ddw.get(), ddb.get());
    EXPECT_TRUE(bit_identical(ddx.download(), gdx));
    EXPECT_TRUE(bit_identical(ddw.download(), gdw));
    EXPECT_TRUE(bit_identical(ddb.download(), gdb));
    // each gradient alone gives the same bits
    ddx.upload(dx0);
    run(ddx.get(), nullptr, nullptr);
    EXPECT_TRUE(bit_identical(ddx.download(), gdx));
    ddw.upload(dw0);
    ws.fill_bytes(0xFF);
    run(nullptr, ddw.get(), nullptr);
    EXPECT_TRUE(bit_identical(ddw.download(), gdw));
    ddb.upload(db0);
    ws.fill_bytes(0xFF);
    run(nullptr, nullptr, ddb.get());
    EXPECT_TRUE(bit_identical(ddb.download(), gdb));
  }
  EXPECT_EQ(cuda::layernorm_backward_workspace_floats(0, 8), 0u);
  DeviceBuffer<float> a(256);
  EXPECT_NO_THROW(cuda::layernorm_train_backward(nullptr, 8, nullptr, nullptr, nullptr, 8, nullptr, 8, nullptr, nullptr,
                                                 nullptr, 0, 8, nullptr, nullptr));
  EXPECT_THROW(cuda::layernorm_train_backward(a.get(), 8, a.get(), a.get(), a.get(), 8, a.get(), 8, a.get(), a.get(),
                                              a.get(), 2, 8, nullptr, nullptr),
               sav::Error);  // dw / db without a work space
  EXPECT_THROW(cuda::layernorm_train_backward(a.get(), 4, nullptr, nullptr, a.get(), 8, a.get(), 8, a.get(), a.get(),
                                              a.get(), 2, 8, nullptr, nullptr),
               sav::Error);  // lddx < C
  EXPECT_THROW(cuda::layernorm_train_backward(a.get(), 8, nullptr, nullptr, a.get(), 8, a.get(), 8, a.get(), a.get(),
                                              a.get(), 2, 0, nullptr, nullptr),
               sav::Error);  // C = 0
}

// ---- GELU ----

TEST_F(CudaTrainOps, GeluForwardBackwardMatchReference) {
  for (const int64_t n : {int64_t(1), int64_t(75), int64_t(4099), int64_t(100003)}) {
    SCOPED_TRACE(dims({{"n", n}}));
    std::vector<float> x = normal(size_t(n), 31 + n, 3.0f);
    const float special[] = {0.0f, -0.0f, 10.0f, -10.0f, 1e-20f, -6.5f};
    for (size_t i = 0; i < std::size(special) && i < x.size(); ++i) x[i * 7 % x.size()] = special[i];
    const std::vector<float> dy = normal(size_t(n), 32 + n);
    std::vector<float> y_ref(n), dx_ref(n, 0.0f);
    cpu::gelu_forward_ref(y_ref.data(), x.data(), n);
    cpu::gelu_backward_ref(dx_ref.data(), dy.data(), x.data(), n);  // += into zeros

    auto dx_in = upload(x), ddy = upload(dy);
    auto dyo = poisoned(n), ddx = poisoned(n);
    cuda::gelu_forward_f32(dyo.get(), dx_in.get(), n, nullptr);
    cuda::gelu_backward_f32(ddx.get(), ddy.get(), dx_in.get(), n, nullptr);
    device_sync();
    const std::vector<float> y = dyo.download(), g = ddx.download();
    EXPECT_EQ(count_nonfinite(y) + count_nonfinite(g), 0u);
    EXPECT_LT(norm_err(y, y_ref), 1e-5);
    EXPECT_LT(norm_err(g, dx_ref), 1e-5);
    // the backward overwrites: a second call gives the same values, not twice them
    cuda::gelu_backward_f32(ddx.get(), ddy.get(), dx_in.get(), n, nullptr);
    dyo.fill_bytes(0xFF);
    cuda::gelu_forward_f32(dyo.get(), dx_in.get(), n, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dyo.download(), y));
    EXPECT_TRUE(bit_identical(ddx.download(), g));
    // in place: y = x, dx = dy
    auto xi = upload(x), gi = upload(dy);
    cuda::gelu_backward_f32(gi.get(), gi.get(), xi.get(), n, nullptr);
    cuda::gelu_forward_f32(xi.get(), xi.get(), n, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(xi.download(), y));
    EXPECT_TRUE(bit_identical(gi.download(), g));
  }
  DeviceBuffer<float> a(8);
  EXPECT_NO_THROW(cuda::gelu_forward_f32(nullptr, nullptr, 0, nullptr));
  EXPECT_THROW(cuda::gelu_forward_f32(a.get(), a.get(), -1, nullptr), sav::Error);
  EXPECT_THROW(cuda::gelu_backward_f32(a.get(), nullptr, a.get(), 8, nullptr), sav::Error);
}

// ---- column sums, add ----

TEST_F(CudaTrainOps, ColsumAccumulatesColumnSums) {
  struct Case {
    int M, F, pad;
  };
  for (const Case cs :
       {Case{37, 75, 3}, Case{1, 1, 0}, Case{130, 768, 0}, Case{197, 33, 1}, Case{1000, 5, 0}, Case{64, 3072, 0}}) {
    SCOPED_TRACE(dims({{"M", cs.M}, {"F", cs.F}}));
    const int M = cs.M, F = cs.F, ld = F + cs.pad;
    const std::vector<float> dy = strided(M, F, ld, 41 + F, -1.0f, 1.0f), db0 = uniform(F, 42, -0.5f, 0.5f);
    std::vector<float> ref(F);
    for (int c = 0; c < F; ++c) {
      double s = 0.0;
      for (int i = 0; i < M; ++i) s += dy[size_t(i) * ld + c];
      ref[c] = float(db0[c] + s);
    }
    auto ddy = upload(dy), ddb = upload(db0);
    auto ws = poisoned(cuda::colsum_workspace_floats(M, F));
    cuda::colsum_f32(ddb.get(), ddy.get(), ld, M, F, ws.get(), nullptr);
    device_sync();
    const std::vector<float> db = ddb.download();
    EXPECT_EQ(count_nonfinite(db), 0u);
    EXPECT_LT(norm_err(db, ref), 1e-5);
    ddb.upload(db0);
    ws.fill_bytes(0xFF);
    cuda::colsum_f32(ddb.get(), ddy.get(), ld, M, F, ws.get(), nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(ddb.download(), db));
  }
  DeviceBuffer<float> a(64);
  EXPECT_EQ(cuda::colsum_workspace_floats(0, 8), 0u);
  EXPECT_NO_THROW(cuda::colsum_f32(nullptr, nullptr, 8, 0, 8, nullptr, nullptr));
  EXPECT_THROW(cuda::colsum_f32(a.get(), a.get(), 4, 2, 8, a.get(), nullptr), sav::Error);   // lddy < F
  EXPECT_THROW(cuda::colsum_f32(a.get(), a.get(), 8, 2, 8, nullptr, nullptr), sav::Error);   // no work space
  EXPECT_THROW(cuda::colsum_f32(a.get(), a.get(), 8, -1, 8, a.get(), nullptr), sav::Error);  // M < 0
}

TEST_F(CudaTrainOps, AddIsExact) {
  for (const int64_t n : {int64_t(1), int64_t(1001), int64_t(100003)}) {
    SCOPED_TRACE(dims({{"n", n}}));
    const std::vector<float> a = normal(size_t(n), 51), b = normal(size_t(n), 52, 3.0f);
    std::vector<float> ref(n);
    for (int64_t i = 0; i < n; ++i) ref[i] = a[i] + b[i];
    auto da = upload(a), db = upload(b);
    auto dy = poisoned(n);
    cuda::add_f32(dy.get(), da.get(), db.get(), n, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dy.download(), ref));
    cuda::add_f32(da.get(), da.get(), db.get(), n, nullptr);  // y aliases a
    device_sync();
    EXPECT_TRUE(bit_identical(da.download(), ref));
  }
  DeviceBuffer<float> a(8);
  EXPECT_NO_THROW(cuda::add_f32(nullptr, nullptr, nullptr, 0, nullptr));
  EXPECT_THROW(cuda::add_f32(a.get(), a.get(), nullptr, 8, nullptr), sav::Error);
  EXPECT_THROW(cuda::add_f32(a.get(), a.get(), a.get(), -3, nullptr), sav::Error);
}

// ---- attention ----

namespace {

struct AttCase {
  int B, N, C, H;
};
const AttCase kAttCases[] = {
    AttCase{3, 17, 75, 3},     // d = 25
    AttCase{3, 50, 75, 3},     // d = 25
    AttCase{2, 197, 192, 3},   // d = 64 (DeiT-tiny)
    AttCase{3, 197, 192, 3},   // d = 64 (DeiT-tiny), B = 3
    AttCase{1, 1024, 128, 1},  // d = 128
    AttCase{1, 1100, 16, 2},   // N beyond the old 1024 limit, d = 8
    AttCase{2, 5, 12, 4},      // d = 3
    AttCase{3, 1, 8, 2},       // N = 1
    AttCase{1, 33, 256, 2},    // d = 128, two heads
    AttCase{2, 9, 96, 1},      // d = 96
    AttCase{1, 7, 200, 1},     // d = 200
};

}  // namespace

TEST_F(CudaTrainOps, AttentionForwardMatchesReference) {
  cuda::Blas blas(nullptr, cuda::F32Math::f32);  // the legacy default stream, IEEE f32 products
  for (const AttCase cs : kAttCases) {
    SCOPED_TRACE(dims({{"B", cs.B}, {"N", cs.N}, {"C", cs.C}, {"H", cs.H}}));
    const int B = cs.B, N = cs.N, C = cs.C, H = cs.H;
    ASSERT_TRUE(cuda::attention_train_supports(N, C, H));
    const std::vector<float> qkv = normal(size_t(B) * N * 3 * C, 61 + N, 1.5f);
    std::vector<float> out_ref(size_t(B) * N * C), att_ref(size_t(B) * H * N * N);
    cpu::attention_forward_ref(out_ref.data(), att_ref.data(), qkv.data(), B, N, C, H);
    auto dqkv = upload(qkv);
    auto dout = poisoned(out_ref.size()), datt = poisoned(att_ref.size());
    cuda::attention_train_forward(dout.get(), datt.get(), dqkv.get(), B, N, C, H, blas, nullptr);
    device_sync();
    const std::vector<float> out = dout.download(), att = datt.download();
    EXPECT_EQ(count_nonfinite(out), 0u);
    EXPECT_EQ(count_nonfinite(att), 0u);
    EXPECT_LT(norm_err(out, out_ref), 1e-5);
    EXPECT_LT(norm_err(att, att_ref), 1e-5);
    dout.fill_bytes(0xFF);
    datt.fill_bytes(0xFF);
    cuda::attention_train_forward(dout.get(), datt.get(), dqkv.get(), B, N, C, H, blas, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dout.download(), out));
    EXPECT_TRUE(bit_identical(datt.download(), att));
  }
}

TEST_F(CudaTrainOps, AttentionBackwardMatchesReference) {
  cuda::Blas blas(nullptr, cuda::F32Math::f32);  // the legacy default stream, IEEE f32 products
  for (const AttCase cs : kAttCases) {
    SCOPED_TRACE(dims({{"B", cs.B}, {"N", cs.N}, {"C", cs.C}, {"H", cs.H}}));
    const int B = cs.B, N = cs.N, C = cs.C, H = cs.H;
    const std::vector<float> qkv = normal(size_t(B) * N * 3 * C, 71 + N, 1.5f), dout = normal(size_t(B) * N * C, 72);
    std::vector<float> out(size_t(B) * N * C), att(size_t(B) * H * N * N);
    cpu::attention_forward_ref(out.data(), att.data(), qkv.data(), B, N, C, H);
    std::vector<float> ref(qkv.size(), 0.0f);  // the reference accumulates: from zeros
    cpu::attention_backward_ref(ref.data(), nullptr, dout.data(), qkv.data(), att.data(), B, N, C, H);

    auto dqkv_in = upload(qkv), ddout = upload(dout), datt = upload(att);
    auto dg = poisoned(qkv.size()), ds = poisoned(att.size());
    cuda::attention_train_backward(dg.get(), ds.get(), ddout.get(), dqkv_in.get(), datt.get(), B, N, C, H, blas,
                                   nullptr);
    device_sync();
    const std::vector<float> g = dg.download();
    EXPECT_EQ(count_nonfinite(g), 0u) << "dqkv not fully written";
    EXPECT_EQ(count_nonfinite(ds.download()), 0u) << "ds not fully written";
    // q, k and v gradients separately (different scales)
    for (int s = 0; s < 3; ++s) {
      SCOPED_TRACE(s == 0 ? "dq" : s == 1 ? "dk" : "dv");
      std::vector<float> part, part_ref;
      for (int64_t row = 0; row < int64_t(B) * N; ++row)
        for (int c = 0; c < C; ++c) {
          part.push_back(g[size_t(row) * 3 * C + s * C + c]);
          part_ref.push_back(ref[size_t(row) * 3 * C + s * C + c]);
        }
      EXPECT_LT(norm_err(part, part_ref), 1e-5);
    }
    dg.fill_bytes(0xFF);
    ds.fill_bytes(0xFF);
    cuda::attention_train_backward(dg.get(), ds.get(), ddout.get(), dqkv_in.get(), datt.get(), B, N, C, H, blas,
                                   nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dg.download(), g));
  }
}

TEST_F(CudaTrainOps, AttentionRejectsUnsupportedSizes) {
  EXPECT_TRUE(cuda::attention_train_supports(197, 192, 3));
  EXPECT_TRUE(cuda::attention_train_supports(1025, 192, 3));
  EXPECT_TRUE(cuda::attention_train_supports(46340, 1024, 1));
  EXPECT_TRUE(cuda::attention_train_supports(1, 1, 1));
  EXPECT_FALSE(cuda::attention_train_supports(46341, 192, 3));  // N * N > INT_MAX
  EXPECT_FALSE(cuda::attention_train_supports(0, 192, 3));
  EXPECT_FALSE(cuda::attention_train_supports(16, 1025, 1));  // d = 1025
  EXPECT_FALSE(cuda::attention_train_supports(16, 64, 3));    // not divisible
  EXPECT_FALSE(cuda::attention_train_supports(16, 0, 1));
  EXPECT_FALSE(cuda::attention_train_supports(16, 64, 0));
  DeviceBuffer<float> a(4096);
  cuda::Blas blas(nullptr, cuda::F32Math::f32);
  EXPECT_THROW(cuda::attention_train_forward(a.get(), a.get(), a.get(), 1, 2, 1025, 1, blas, nullptr), sav::Error);
  EXPECT_THROW(cuda::attention_train_forward(a.get(), a.get(), a.get(), 1, 0, 8, 1, blas, nullptr), sav::Error);
  EXPECT_THROW(cuda::attention_train_forward(a.get(), a.get(), a.get(), -1, 2, 8, 1, blas, nullptr), sav::Error);
  EXPECT_THROW(cuda::attention_train_forward(nullptr, a.get(), a.get(), 1, 2, 8, 1, blas, nullptr), sav::Error);
  EXPECT_THROW(cuda::attention_train_backward(a.get(), nullptr, a.get(), a.get(), a.get(), 1, 2, 8, 1, blas, nullptr),
               sav::Error);
  EXPECT_THROW(cuda::attention_train_backward(a.get(), a.get(), a.get(), a.get(), a.get(), 1, 2, 64, 3, blas, nullptr),
               sav::Error);
  {  // the row kernels must run on the Blas's stream
    cuda::Stream other;
    EXPECT_THROW(cuda::attention_train_forward(a.get(), a.get(), a.get(), 1, 2, 8, 1, blas, other.get()), sav::Error);
    EXPECT_THROW(
        cuda::attention_train_backward(a.get(), a.get(), a.get(), a.get(), a.get(), 1, 2, 8, 1, blas, other.get()),
        sav::Error);
  }
  EXPECT_NO_THROW(cuda::attention_train_forward(nullptr, nullptr, nullptr, 0, 2, 8, 1, blas, nullptr));
  EXPECT_NO_THROW(
      cuda::attention_train_backward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 2, 8, 1, blas, nullptr));
}

// ---- optimizer ----

TEST_F(CudaTrainOps, SumsqMatchesHostDoubleSumAndCountsNonFinite) {
  constexpr int64_t kChunk = int64_t(1) << 15;
  for (const int64_t n : {int64_t(1), int64_t(75), int64_t(32768), int64_t(65537), int64_t(100003)}) {
    SCOPED_TRACE(dims({{"n", n}}));
    std::vector<float> g = normal(size_t(n), 81 + n, 0.01f);
    double ref = 0.0;
    for (int64_t lo = 0; lo < n; lo += kChunk) {
      double part = 0.0;
      for (int64_t i = lo; i < std::min(n, lo + kChunk); ++i) part += double(g[i]) * g[i];
      ref += part;
    }
    auto dg = upload(g);
    DeviceBuffer<double> ws(cuda::sumsq_workspace_doubles(n)), out(2);
    ws.fill_bytes(0xFF);
    out.fill_bytes(0xFF);
    cuda::sumsq_f64(out.get(), dg.get(), n, ws.get(), nullptr);
    device_sync();
    const std::vector<double> r = out.download();
    EXPECT_LE(std::fabs(r[0] - ref), 1e-12 * ref);
    EXPECT_EQ(r[1], 0.0);
    ws.fill_bytes(0xFF);
    out.fill_bytes(0xFF);
    cuda::sumsq_f64(out.get(), dg.get(), n, ws.get(), nullptr);
    device_sync();
    const std::vector<double> r2 = out.download();
    EXPECT_EQ(std::memcmp(r.data(), r2.data(), 2 * sizeof(double)), 0) << "rerun differs";
    // non-finite entries: counted, and the sum is not finite
    g[0] = std::numeric_limits<float>::quiet_NaN();
    double bad = 1;
    if (n > 40000) {
      g[40000] = std::numeric_limits<float>::infinity();
      ++bad;
    }
    if (n > 1) {
      g[n - 1] = -std::numeric_limits<float>::infinity();
      ++bad;
    }
    dg.upload(g);
    cuda::sumsq_f64(out.get(), dg.get(), n, ws.get(), nullptr);
    device_sync();
    const std::vector<double> r3 = out.download();
    EXPECT_FALSE(std::isfinite(r3[0]));
    EXPECT_EQ(r3[1], bad);
  }
  // n = 0: zeros
  DeviceBuffer<double> out(2);
  out.fill_bytes(0xFF);
  cuda::sumsq_f64(out.get(), nullptr, 0, nullptr, nullptr);
  device_sync();
  const std::vector<double> z = out.download();
  EXPECT_EQ(z[0], 0.0);
  EXPECT_EQ(z[1], 0.0);
  EXPECT_EQ(cuda::sumsq_workspace_doubles(0), 0u);
  EXPECT_EQ(cuda::sumsq_workspace_doubles(kChunk + 1), 4u);
  DeviceBuffer<float> a(8);
  EXPECT_THROW(cuda::sumsq_f64(out.get(), a.get(), -1, nullptr, nullptr), sav::Error);
  EXPECT_THROW(cuda::sumsq_f64(out.get(), a.get(), 8, nullptr, nullptr), sav::Error);  // no work space
}

TEST_F(CudaTrainOps, AdamwStepMatchesHostLoopBitForBit) {
  const int64_t n = 10007;
  const float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.05f;
  std::vector<float> p = normal(size_t(n), 91, 0.02f), m(n, 0.0f), v(n, 0.0f);
  std::vector<uint8_t> mask(n);
  Rng rng(92);
  for (auto& b : mask) b = uint8_t(rng.below(2));
  auto dp = upload(p), dm = upload(m), dv = upload(v);
  auto dmask = upload(mask);
  for (int t = 1; t <= 3; ++t) {
    SCOPED_TRACE(dims({{"t", t}}));
    const std::vector<float> g = normal(size_t(n), 93 + t, t == 2 ? 5.0f : 0.1f);
    const float gscale = t == 2 ? 0.37f : 1.0f, lr = 1e-3f * float(t);
    const float bc1 = 1.0f - std::pow(b1, float(t)), bc2 = 1.0f - std::pow(b2, float(t));
    // host: train/optim.cpp's formulas, one rounding per operation
    const float decay = f_sub(1.0f, f_mul(lr, wd));
    for (int64_t j = 0; j < n; ++j) {
      const float gs = f_mul(g[j], gscale);
      m[j] = f_add(f_mul(b1, m[j]), f_mul(f_sub(1.0f, b1), gs));
      v[j] = f_add(f_mul(b2, v[j]), f_mul(f_mul(f_sub(1.0f, b2), gs), gs));
      const float mh = f_div(m[j], bc1), vh = f_div(v[j], bc2);
      p[j] = f_sub(f_mul(p[j], mask[j] ? decay : 1.0f), f_div(f_mul(lr, mh), f_add(f_sqrt(vh), eps)));
    }
    auto dg = upload(g);
    cuda::adamw_step_f32(dp.get(), dg.get(), dm.get(), dv.get(), dmask.get(), n, gscale, lr, wd, b1, b2, bc1, bc2, eps,
                         nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dm.download(), m));
    EXPECT_TRUE(bit_identical(dv.download(), v));
    EXPECT_TRUE(bit_identical(dp.download(), p));
  }
  DeviceBuffer<float> a(8);
  EXPECT_NO_THROW(cuda::adamw_step_f32(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 1.0f, 1e-3f, 0.05f, b1, b2, 0.1f,
                                       0.001f, eps, nullptr));
  EXPECT_THROW(cuda::adamw_step_f32(a.get(), a.get(), a.get(), a.get(), nullptr, 8, 1.0f, 1e-3f, 0.05f, b1, b2, 0.1f,
                                    0.001f, eps, nullptr),
               sav::Error);  // no decay mask
  EXPECT_THROW(cuda::adamw_step_f32(a.get(), a.get(), a.get(), a.get(), nullptr, -1, 1.0f, 1e-3f, 0.05f, b1, b2, 0.1f,
                                    0.001f, eps, nullptr),
               sav::Error);
}
