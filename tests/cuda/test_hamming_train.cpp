// cuda::hamming_train_forward / _backward (ops/cuda/hamming_train.h) against cpu::hamming_attention_forward_ref
// and cpu::hamming_attention_backward_ref, on odd shapes (d = 10, 16, 64, 128; nbits 1..64; m 3..64; N from 1 to
// 3136, N < 9 so the conv window crosses both ends; a qk row of zeros for the clamped normalisation).
//
// Inputs: qk, v random normal; anchors = normalised qk rows of image 0 plus noise, renormalised; mu_j = the
// mean over image 0 of exp(-D_nj / (2 sigma)) plus noise (about half the bits set, many y in (0, 1) so the
// straight-through mask passes gradient); A, conv taps, conv bias, dout random. qk and v are read from one
// stacked (B*N, 2C + pad) buffer, out / dout have padding columns: padding holds NaN on the inputs (a read of
// it would show) and must stay unwritten on the outputs.
//
// Well-conditioned inputs: the GPU's y differs from the reference's by rounding (CUDA's expf against the C
// library's, a few ulp), so a code bit or a straight-through mask bit could flip where y is within rounding of
// 0 or of 1. Each case therefore takes the first seed for which the CPU reference has no y with
// |y| < 1e-5 max|y| nor |y - 1| < 1e-5 max|y|; codes are then required to be EXACTLY equal, and the
// masks 0 < y < 1 too.
//
// Tolerances, as max|gpu - ref| / max|ref| (test_harness norm_err):
//   forward out and every saved float tensor: 1e-5 (the kernels follow the reference's float formulas and
//     summation orders: q, dist, kv, z and out should mostly agree bit for bit; y by a few ulp (expf), sigma
//     and the norms by a double sum in another order);
//   backward dqk, dv on the CPU's saved tensors uploaded: 1e-5 (double sums in another order, double exp);
//   backward dqk, dv end to end (GPU forward's saved tensors): 3e-5;
//   dconv_w, dconv_b: 1e-6 against a double-precision sum in the test (the GPU sums in double); the CPU
//     reference accumulates ~B*N*d float products in float, so it is held to that double sum at 1e-3 only.
// Also: outputs and the workspace are poisoned (0xFF bytes = NaN) before each launch, no NaN may remain in the
// outputs (dqk and dv are overwritten, every element); reruns are bit-identical; the nullptr gradients are
// skipped (their columns stay poisoned) without changing the others by a bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/rng.h"
#include "cuda_test_util.h"
#include "ops/cpu/hamming.h"
#include "ops/cuda/hamming_train.h"

using namespace sav;
using namespace sav::test;
using sav::cuda::DeviceBuffer;

namespace {

class CudaHammingTrain : public CudaTest {};

constexpr double kMarginRel = 1e-5;   // y this close (relative to max|y|) to 0 or 1: the seed is rejected
constexpr double kTolFwd = 1e-5;      // forward out and saved tensors
constexpr double kTolBwd = 1e-5;      // dqk, dv from the same (CPU) saved tensors
constexpr double kTolBwdE2E = 3e-5;   // dqk, dv from the GPU forward's saved tensors
constexpr double kTolConv = 1e-6;     // dconv_w, dconv_b against the test's double sums
constexpr double kTolConvRef = 1e-3;  // the CPU reference's float sums against the same double sums
constexpr int kPadIn = 5;             // padding columns of the stacked [qk | v] buffer
constexpr int kPadOut = 3;            // of out
constexpr int kPadDout = 2;           // of dout
constexpr int kMaxSeeds = 64;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct Case {
  int B, N, C, H, nbits, m;
  bool bias;      // a conv bias
  bool zero_row;  // qk row (image 0, token min(1, N-1)) of head 0 all zeros: the clamped q normalisation
};

std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " N=" + std::to_string(c.N) + " C=" + std::to_string(c.C) +
         " H=" + std::to_string(c.H) + " bits=" + std::to_string(c.nbits) + " m=" + std::to_string(c.m) +
         (c.bias ? " bias" : "") + (c.zero_row ? " zero-row" : "");
}

// Host inputs of one case and the CPU reference forward (saved tensors included).
struct Problem {
  Case cs{};
  uint64_t seed = 0;
  std::vector<float> qk, v, anchors, mu, A, conv_w, conv_b, dout, dconv_w0, dconv_b0;
  std::vector<float> out, saved_f;
  std::vector<uint64_t> codes;

  int d() const { return cs.C / cs.H; }
  size_t M() const { return size_t(cs.B) * cs.N; }
  cpu::HammingDims dims() const { return cpu::HammingDims{cs.B, cs.N, cs.C, cs.H, cs.nbits, cs.m}; }
  cpu::HammingWeights weights() const {
    return cpu::HammingWeights{anchors.data(), mu.data(), A.data(), conv_w.data(), cs.bias ? conv_b.data() : nullptr};
  }
  cpu::HammingSaved saved() { return cpu::hamming_saved_bind(dims(), saved_f.data(), codes.data()); }
};

void make_inputs(Problem& pr, const Case& cs, uint64_t seed) {
  pr.cs = cs;
  pr.seed = seed;
  const int N = cs.N, C = cs.C, H = cs.H, d = C / H, m = cs.m;
  const size_t M = size_t(cs.B) * N;
  const uint64_t s0 = seed * 16;
  pr.qk = normal(M * C, s0 + 1, 0.7f);
  pr.v = normal(M * C, s0 + 2);
  if (cs.zero_row) {
    const int n = std::min(1, N - 1);
    for (int i = 0; i < d; ++i) pr.qk[size_t(n) * C + i] = 0.0f;
  }
  pr.anchors.assign(size_t(H) * m * d, 0.0f);
  pr.mu.assign(size_t(H) * m, 0.0f);
  Rng rng(s0 + 3);
  for (int h = 0; h < H; ++h) {
    const std::vector<double> q = unit_head_rows<double>(pr.qk, N, C, h, d);  // image 0's normalised rows of head h
    for (int j = 0; j < m; ++j) {
      const int n = int(rng.below(uint64_t(N)));
      std::vector<double> a(d);
      double ss = 0.0;
      for (int i = 0; i < d; ++i) {
        a[i] = q[size_t(n) * d + i] + 0.3 * rng.normal() / std::sqrt(double(d));
        ss += a[i] * a[i];
      }
      const double nrm = std::max(std::sqrt(ss), 1e-6);
      for (int i = 0; i < d; ++i) pr.anchors[(size_t(h) * m + j) * d + i] = float(a[i] / nrm);
    }
    const std::vector<double> means = ksh_mu_means(q, pr.anchors.data() + size_t(h) * m * d, N, d, m);
    for (int j = 0; j < m; ++j) pr.mu[size_t(h) * m + j] = float(means[j] + 0.05 * rng.normal());
  }
  pr.A = normal(size_t(H) * cs.nbits * m, s0 + 4);
  pr.conv_w = normal(size_t(H) * 9, s0 + 5, 0.3f);
  pr.conv_b = normal(size_t(H), s0 + 6, 0.2f);
  pr.dout = normal(M * C, s0 + 7);
  pr.dconv_w0 = normal(size_t(H) * 9, s0 + 8, 0.5f);
  pr.dconv_b0 = normal(size_t(H), s0 + 9, 0.5f);
}

void cpu_forward(Problem& pr) {
  const cpu::HammingDims dims = pr.dims();
  pr.saved_f.assign(cpu::hamming_saved_floats(dims), 0.0f);
  pr.codes.assign(cpu::hamming_saved_codes(dims), 0);
  pr.out.assign(pr.M() * pr.cs.C, 0.0f);
  const cpu::HammingSaved s = pr.saved();
  cpu::hamming_attention_forward_ref(pr.out.data(), &s, pr.qk.data(), pr.v.data(), pr.weights(), dims);
}

size_t y_count(const cpu::HammingDims& dims) { return size_t(dims.B) * dims.H * dims.N * dims.nbits; }

// Number of y within kMarginRel max|y| of 0 or of 1 (a code or a straight-through mask bit that rounding could
// flip).
size_t ambiguous_y(Problem& pr) {
  const cpu::HammingSaved s = pr.saved();
  const size_t n = y_count(pr.dims());
  const double margin = kMarginRel * max_abs(s.y, n);
  size_t bad = 0;
  for (size_t e = 0; e < n; ++e) bad += std::fabs(s.y[e]) < margin || std::fabs(s.y[e] - 1.0f) < margin;
  return bad;
}

// The first seed whose reference has no ambiguous y. False when none of kMaxSeeds qualifies.
bool prepare(Problem& pr, const Case& cs) {
  for (uint64_t seed = 1; seed <= kMaxSeeds; ++seed) {
    make_inputs(pr, cs, seed);
    cpu_forward(pr);
    if (ambiguous_y(pr) == 0) return true;
  }
  return false;
}

// Row-major (rows, ld) buffer <- (rows, C) block at column col0; other columns keep their contents.
void put_block(std::vector<float>& buf, int ld, int col0, const std::vector<float>& x, int C) {
  const size_t rows = x.size() / C;
  for (size_t r = 0; r < rows; ++r) std::copy_n(x.data() + r * C, C, buf.data() + r * ld + col0);
}

// The (rows, C) block at column col0 of a row-major (rows, ld) buffer.
std::vector<float> get_block(const std::vector<float>& buf, size_t rows, int ld, int col0, int C) {
  std::vector<float> x(rows * C);
  for (size_t r = 0; r < rows; ++r) std::copy_n(buf.data() + r * ld + col0, C, x.data() + r * C);
  return x;
}

// True when every element of columns [col0, col0 + width) of a (rows, ld) buffer is NaN (never written).
bool columns_poisoned(const std::vector<float>& buf, size_t rows, int ld, int col0, int width) {
  for (size_t r = 0; r < rows; ++r)
    for (int c = col0; c < col0 + width; ++c)
      if (!std::isnan(buf[r * ld + c])) return false;
  return true;
}

// The device side of one problem: stacked [qk | v] input, weights, dout.
struct DeviceProblem {
  int ldin = 0, lddout = 0;
  DeviceBuffer<float> qkv, anchors, mu, A, conv_w, conv_b, dout;
  cpu::HammingWeights w{};
  const float* qk() const { return qkv.get(); }
  const float* v(int C) const { return qkv.get() + C; }

  explicit DeviceProblem(const Problem& pr) {
    const int C = pr.cs.C;
    const size_t M = pr.M();
    ldin = 2 * C + kPadIn;
    std::vector<float> in(M * ldin, kNaN);
    put_block(in, ldin, 0, pr.qk, C);
    put_block(in, ldin, C, pr.v, C);
    qkv = upload(in);
    lddout = C + kPadDout;
    std::vector<float> g(M * lddout, kNaN);
    put_block(g, lddout, 0, pr.dout, C);
    dout = upload(g);
    anchors = upload(pr.anchors);
    mu = upload(pr.mu);
    A = upload(pr.A);
    conv_w = upload(pr.conv_w);
    if (pr.cs.bias) conv_b = upload(pr.conv_b);
    w = cpu::HammingWeights{anchors.get(), mu.get(), A.get(), conv_w.get(), pr.cs.bias ? conv_b.get() : nullptr};
  }
};

// Saved tensors in device memory, poisoned, bound in the CPU layout.
struct DeviceSaved {
  DeviceBuffer<float> f;
  DeviceBuffer<uint64_t> codes;
  cpu::HammingSaved s{};
  explicit DeviceSaved(const cpu::HammingDims& dims)
      : f(poisoned<float>(cpu::hamming_saved_floats(dims))), codes(poisoned<uint64_t>(cpu::hamming_saved_codes(dims))) {
    s = cpu::hamming_saved_bind(dims, f.get(), codes.get());
  }
};

struct FwdResult {
  std::vector<float> out;  // strided (M, ldo), as downloaded
  std::vector<float> saved_f;
  std::vector<uint64_t> codes;
};

FwdResult run_forward(const Problem& pr, const DeviceProblem& dp, DeviceSaved& ds, int ldo) {
  const int C = pr.cs.C;
  DeviceBuffer<float> out = poisoned<float>(pr.M() * ldo);
  ds.f.fill_bytes(0xFF);
  ds.codes.fill_bytes(0xFF);
  cuda::hamming_train_forward(out.get(), ldo, ds.s, dp.qk(), dp.ldin, dp.v(C), dp.ldin, dp.w, pr.dims(), nullptr);
  device_sync();
  return FwdResult{out.download(), ds.f.download(), ds.codes.download()};
}

struct BwdResult {
  std::vector<float> grad;  // (M, 2C): dqk columns 0..C-1, dv columns C..2C-1, as downloaded
  std::vector<float> dconv_w, dconv_b;
};

// Backward into a poisoned stacked gradient buffer (dqk = columns 0..C-1, dv = C..2C-1, ld 2C), dconv_w / dconv_b
// starting from the problem's initial values; each of the four may be skipped (nullptr).
BwdResult run_backward(const Problem& pr, const DeviceProblem& dp, const cpu::HammingSaved& saved, bool want_dqk,
                       bool want_dv, bool want_dconv_w, bool want_dconv_b) {
  const int C = pr.cs.C, ldg = 2 * C;
  const cpu::HammingDims dims = pr.dims();
  DeviceBuffer<float> grad = poisoned<float>(pr.M() * ldg);
  DeviceBuffer<float> dcw = upload(pr.dconv_w0), dcb = upload(pr.dconv_b0);
  DeviceBuffer<float> ws = poisoned<float>(cuda::hamming_train_workspace_floats(dims));
  cuda::hamming_train_backward(want_dqk ? grad.get() : nullptr, ldg, want_dv ? grad.get() + C : nullptr, ldg,
                               want_dconv_w ? dcw.get() : nullptr, want_dconv_b ? dcb.get() : nullptr, dp.dout.get(),
                               dp.lddout, dp.v(C), dp.ldin, saved, dp.w, dims, ws.get(), nullptr);
  device_sync();
  return BwdResult{grad.download(), dcw.download(), dcb.download()};
}

// The CPU reference backward on the CPU forward's saved tensors: dqk, dv from zero; dconv from the initial values.
struct RefGrads {
  std::vector<float> dqk, dv, dconv_w, dconv_b;
};
RefGrads cpu_backward(Problem& pr) {
  RefGrads g;
  const size_t n = pr.M() * pr.cs.C;
  g.dqk.assign(n, 0.0f);
  g.dv.assign(n, 0.0f);
  g.dconv_w = pr.dconv_w0;
  g.dconv_b = pr.dconv_b0;
  cpu::hamming_attention_backward_ref(g.dqk.data(), g.dv.data(), g.dconv_w.data(), g.dconv_b.data(), pr.dout.data(),
                                      pr.v.data(), pr.saved(), pr.weights(), pr.dims());
  return g;
}

// dconv_w (H, 9) and dconv_b (H) from the initial values plus the exact sums, in double.
void conv_grads_double(const Problem& pr, std::vector<float>& dw, std::vector<float>& db) {
  const int B = pr.cs.B, N = pr.cs.N, C = pr.cs.C, H = pr.cs.H, d = pr.d();
  dw.resize(size_t(H) * 9);
  db.resize(H);
  for (int h = 0; h < H; ++h) {
    std::vector<double> s(10, 0.0);
    for (int b = 0; b < B; ++b)
      for (int n = 0; n < N; ++n)
        for (int i = 0; i < d; ++i) {
          const double g = pr.dout[(size_t(b) * N + n) * C + h * d + i];
          s[9] += g;
          for (int t = 0; t < 9; ++t) {
            const int src = n + t - 4;
            if (src >= 0 && src < N) s[t] += g * pr.v[(size_t(b) * N + src) * C + h * d + i];
          }
        }
    for (int t = 0; t < 9; ++t) dw[size_t(h) * 9 + t] = float(pr.dconv_w0[size_t(h) * 9 + t] + s[t]);
    db[h] = float(pr.dconv_b0[h] + s[9]);
  }
}

// norm_err over everything, and again with the zero qk row's head-0 entries left out (they are g / eps there,
// ~1e6 times the others, and would hide every other error).
void expect_dqk_close(const Problem& pr, const std::vector<float>& got, const std::vector<float>& ref, double tol,
                      const char* what) {
  EXPECT_LT(norm_err(got, ref), tol) << what << " dqk";
  if (!pr.cs.zero_row) return;
  std::vector<float> a = got, r = ref;
  const int n = std::min(1, pr.cs.N - 1);
  for (int i = 0; i < pr.d(); ++i) a[size_t(n) * pr.cs.C + i] = r[size_t(n) * pr.cs.C + i] = 0.0f;
  EXPECT_LT(norm_err(a, r), tol) << what << " dqk without the zero row";
}

void run_case(const Case& cs) {
  SCOPED_TRACE(describe(cs));
  Problem pr;
  ASSERT_TRUE(prepare(pr, cs)) << "no seed in 1.." << kMaxSeeds << " gives a reference without y near 0 or 1";
  SCOPED_TRACE("seed " + std::to_string(pr.seed));
  const cpu::HammingDims dims = pr.dims();
  ASSERT_TRUE(cuda::hamming_train_supports(dims));
  const int N = cs.N, C = cs.C, d = pr.d(), nb = cs.nbits, m = cs.m;
  const size_t M = pr.M(), BH = size_t(cs.B) * cs.H;
  const int ldo = C + kPadOut;
  DeviceProblem dp(pr);

  // ---- forward: out and every saved tensor ----
  DeviceSaved ds(dims);
  const FwdResult f1 = run_forward(pr, dp, ds, ldo);
  EXPECT_TRUE(columns_poisoned(f1.out, M, ldo, C, kPadOut)) << "out padding written";
  const std::vector<float> out = get_block(f1.out, M, ldo, 0, C);
  EXPECT_EQ(count_nonfinite(out), 0u) << "out";
  EXPECT_LT(norm_err(out, pr.out), kTolFwd) << "out";
  EXPECT_EQ(count_nonfinite(f1.saved_f), 0u) << "saved floats";
  std::vector<float> gsaved_f = f1.saved_f;
  std::vector<uint64_t> gcodes = f1.codes;
  const cpu::HammingSaved gs = cpu::hamming_saved_bind(dims, gsaved_f.data(), gcodes.data());
  const cpu::HammingSaved rs = pr.saved();
  struct Field {
    const char* name;
    const float *gpu, *ref;
    size_t n;
  };
  for (const Field& fl : {Field{"q", gs.q, rs.q, BH * N * d}, Field{"qnorm", gs.qnorm, rs.qnorm, BH * N},
                          Field{"dist", gs.dist, rs.dist, BH * N * m}, Field{"sigma", gs.sigma, rs.sigma, BH},
                          Field{"y", gs.y, rs.y, BH * N * nb}, Field{"kv", gs.kv, rs.kv, BH * nb * d},
                          Field{"z", gs.z, rs.z, BH * N * d}, Field{"znorm", gs.znorm, rs.znorm, BH * N}})
    EXPECT_LT(norm_err(fl.gpu, fl.ref, fl.n), kTolFwd) << "saved " << fl.name;
  size_t code_diff = 0, mask_diff = 0;
  for (size_t e = 0; e < BH * N; ++e) code_diff += gcodes[e] != pr.codes[e];
  for (size_t e = 0; e < BH * N * nb; ++e)
    mask_diff += (gs.y[e] > 0.0f && gs.y[e] < 1.0f) != (rs.y[e] > 0.0f && rs.y[e] < 1.0f);
  EXPECT_EQ(code_diff, 0u) << "tokens whose code differs from the reference";
  EXPECT_EQ(mask_diff, 0u) << "straight-through mask bits (0 < y < 1) that differ from the reference";
  // rerun: bit-identical
  const FwdResult f2 = run_forward(pr, dp, ds, ldo);
  EXPECT_TRUE(bit_identical(f1.out, f2.out)) << "forward rerun: out";
  EXPECT_TRUE(bit_identical(f1.saved_f, f2.saved_f)) << "forward rerun: saved";
  EXPECT_TRUE(bit_identical(f1.codes, f2.codes)) << "forward rerun: codes";

  // ---- backward on the CPU's saved tensors (the same inputs on both sides) ----
  const RefGrads ref = cpu_backward(pr);
  std::vector<float> dw_exact, db_exact;
  conv_grads_double(pr, dw_exact, db_exact);
  EXPECT_LT(norm_err(ref.dconv_w, dw_exact), kTolConvRef) << "CPU dconv_w against the double sums";
  EXPECT_LT(norm_err(ref.dconv_b, db_exact), kTolConvRef) << "CPU dconv_b against the double sums";
  DeviceBuffer<float> csaved_f = upload(pr.saved_f);
  DeviceBuffer<uint64_t> ccodes(pr.codes.size());
  ccodes.upload(pr.codes);
  const cpu::HammingSaved cs_dev = cpu::hamming_saved_bind(dims, csaved_f.get(), ccodes.get());

  const BwdResult b1 = run_backward(pr, dp, cs_dev, true, true, true, true);
  EXPECT_EQ(count_nonfinite(b1.grad), 0u) << "dqk / dv: elements not written";
  const std::vector<float> dqk = get_block(b1.grad, M, 2 * C, 0, C), dv = get_block(b1.grad, M, 2 * C, C, C);
  expect_dqk_close(pr, dqk, ref.dqk, kTolBwd, "same saved:");
  EXPECT_LT(norm_err(dv, ref.dv), kTolBwd) << "same saved: dv";
  EXPECT_LT(norm_err(b1.dconv_w, dw_exact), kTolConv) << "dconv_w";
  EXPECT_LT(norm_err(b1.dconv_b, db_exact), kTolConv) << "dconv_b";
  // rerun: bit-identical
  const BwdResult b2 = run_backward(pr, dp, cs_dev, true, true, true, true);
  EXPECT_TRUE(bit_identical(b1.grad, b2.grad)) << "backward rerun: dqk / dv";
  EXPECT_TRUE(bit_identical(b1.dconv_w, b2.dconv_w)) << "backward rerun: dconv_w";
  EXPECT_TRUE(bit_identical(b1.dconv_b, b2.dconv_b)) << "backward rerun: dconv_b";
  // skipped gradients: the others are unchanged to the bit, the skipped columns / values untouched
  const BwdResult b3 = run_backward(pr, dp, cs_dev, true, false, false, true);
  EXPECT_TRUE(columns_poisoned(b3.grad, M, 2 * C, C, C)) << "dv skipped but written";
  EXPECT_TRUE(bit_identical(get_block(b3.grad, M, 2 * C, 0, C), dqk)) << "dqk alone";
  EXPECT_TRUE(bit_identical(b3.dconv_w, pr.dconv_w0)) << "dconv_w skipped but changed";
  EXPECT_TRUE(bit_identical(b3.dconv_b, b1.dconv_b)) << "dconv_b alone";
  const BwdResult b4 = run_backward(pr, dp, cs_dev, false, true, true, false);
  EXPECT_TRUE(columns_poisoned(b4.grad, M, 2 * C, 0, C)) << "dqk skipped but written";
  EXPECT_TRUE(bit_identical(get_block(b4.grad, M, 2 * C, C, C), dv)) << "dv alone";
  EXPECT_TRUE(bit_identical(b4.dconv_w, b1.dconv_w)) << "dconv_w alone";
  EXPECT_TRUE(bit_identical(b4.dconv_b, pr.dconv_b0)) << "dconv_b skipped but changed";

  // ---- end to end: backward on the GPU forward's saved tensors ----
  ASSERT_EQ(code_diff, 0u);
  ASSERT_EQ(mask_diff, 0u);
  const BwdResult b5 = run_backward(pr, dp, ds.s, true, true, true, true);
  EXPECT_EQ(count_nonfinite(b5.grad), 0u) << "end to end: elements not written";
  expect_dqk_close(pr, get_block(b5.grad, M, 2 * C, 0, C), ref.dqk, kTolBwdE2E, "end to end:");
  EXPECT_LT(norm_err(get_block(b5.grad, M, 2 * C, C, C), ref.dv), kTolBwdE2E) << "end to end: dv";
}

}  // namespace

// d = 16 (half a warp), three heads, conv bias
TEST_F(CudaHammingTrain, SmallHeadsMatchReference) { run_case(Case{2, 37, 48, 3, 16, 25, true, false}); }

// DeiT-Tiny's head: N = 197, d = 64, 16 bits, 25 anchors
TEST_F(CudaHammingTrain, DeitHeadMatchesReference) { run_case(Case{1, 197, 192, 3, 16, 25, false, false}); }

// the limits: d = 128, 64 bits, 64 anchors
TEST_F(CudaHammingTrain, LargestHeadMatchesReference) { run_case(Case{2, 50, 256, 2, 64, 64, true, false}); }

// odd everything: d = 10, 33 bits (two ballots), 7 anchors, N = 5 < 9 (the conv crosses both ends), a zero qk row
TEST_F(CudaHammingTrain, OddSizesAndZeroRowMatchReference) { run_case(Case{3, 5, 40, 4, 33, 7, true, true}); }

// one token, one bit, three anchors
TEST_F(CudaHammingTrain, SingleTokenMatchesReference) { run_case(Case{2, 1, 24, 2, 1, 3, true, false}); }

// PVTv2 stage 1: N = 3136 (many row tiles and code chunks), one head of 64
TEST_F(CudaHammingTrain, PvtStage1MatchesReference) { run_case(Case{1, 3136, 64, 1, 16, 25, false, false}); }

// Argument checks: they throw before touching the device, so this runs without a GPU too (the pointers are
// host stand-ins, never dereferenced).
TEST(CudaHammingTrainArgs, SupportsAndRejects) {
  using D = cpu::HammingDims;
  EXPECT_TRUE(cuda::hamming_train_supports(D{2, 197, 192, 3, 16, 25}));
  EXPECT_TRUE(cuda::hamming_train_supports(D{1, 1, 128, 1, 64, 64}));     // d = 128, 64 bits, 64 anchors
  EXPECT_FALSE(cuda::hamming_train_supports(D{1, 197, 256, 1, 16, 25}));  // d = 256
  EXPECT_FALSE(cuda::hamming_train_supports(D{1, 197, 192, 3, 65, 25}));  // 65 bits
  EXPECT_FALSE(cuda::hamming_train_supports(D{1, 197, 192, 3, 0, 25}));
  EXPECT_FALSE(cuda::hamming_train_supports(D{1, 197, 192, 3, 16, 65}));  // 65 anchors
  EXPECT_FALSE(cuda::hamming_train_supports(D{1, 197, 192, 3, 16, 0}));
  EXPECT_FALSE(cuda::hamming_train_supports(D{1, 197, 190, 3, 16, 25}));  // C % H != 0
  EXPECT_FALSE(cuda::hamming_train_supports(D{0, 197, 192, 3, 16, 25}));
  EXPECT_FALSE(cuda::hamming_train_supports(D{1, 0, 192, 3, 16, 25}));
  EXPECT_THROW(cuda::hamming_train_workspace_floats(D{1, 197, 256, 1, 16, 25}), sav::Error);
  EXPECT_GT(cuda::hamming_train_workspace_floats(D{2, 197, 192, 3, 16, 25}), 0u);

  std::vector<float> f(64);
  std::vector<uint64_t> c(4);
  float* p = f.data();
  cpu::HammingSaved s{p, p, p, p, p, p, p, p, c.data()};
  const cpu::HammingWeights w{p, p, p, p, nullptr};
  const D good{1, 4, 16, 2, 8, 5}, bad{1, 4, 256, 1, 8, 5};
  float* out = p + 32;
  // forward: unsupported sizes, a leading dimension below C, null pointers, unbound saved, out aliasing v
  EXPECT_THROW(cuda::hamming_train_forward(out, 256, s, p, 512, p, 512, w, bad, nullptr), sav::Error);
  EXPECT_THROW(cuda::hamming_train_forward(out, 15, s, p, 32, p, 32, w, good, nullptr), sav::Error);
  EXPECT_THROW(cuda::hamming_train_forward(nullptr, 16, s, p, 32, p, 32, w, good, nullptr), sav::Error);
  EXPECT_THROW(cuda::hamming_train_forward(out, 16, cpu::HammingSaved{}, p, 32, p, 32, w, good, nullptr), sav::Error);
  EXPECT_THROW(cuda::hamming_train_forward(out, 16, s, p, 32, out, 32, w, good, nullptr), sav::Error);
  const cpu::HammingWeights no_a{nullptr, p, p, p, nullptr};
  EXPECT_THROW(cuda::hamming_train_forward(out, 16, s, p, 32, p, 32, no_a, good, nullptr), sav::Error);
  // backward: unsupported sizes, bad leading dimensions, no workspace, dv aliasing dout
  EXPECT_THROW(cuda::hamming_train_backward(out, 256, out, 256, p, p, p, 256, p, 256, s, w, bad, p, nullptr),
               sav::Error);
  EXPECT_THROW(
      cuda::hamming_train_backward(out, 8, nullptr, 16, nullptr, nullptr, p, 16, p, 16, s, w, good, p, nullptr),
      sav::Error);
  EXPECT_THROW(
      cuda::hamming_train_backward(out, 16, nullptr, 16, nullptr, nullptr, p, 15, p, 16, s, w, good, p, nullptr),
      sav::Error);
  EXPECT_THROW(
      cuda::hamming_train_backward(out, 16, nullptr, 16, nullptr, nullptr, p, 16, p, 16, s, w, good, nullptr, nullptr),
      sav::Error);
  EXPECT_THROW(
      cuda::hamming_train_backward(nullptr, 16, p, 16, nullptr, nullptr, p, 16, p + 16, 16, s, w, good, p, nullptr),
      sav::Error);
  EXPECT_THROW(cuda::hamming_train_backward(out, 16, nullptr, 16, nullptr, nullptr, p, 16, p, 16, cpu::HammingSaved{},
                                            w, good, p, nullptr),
               sav::Error);
  // nothing requested: a no-op (no workspace needed)
  EXPECT_NO_THROW(cuda::hamming_train_backward(nullptr, 16, nullptr, 16, nullptr, nullptr, p, 16, p, 16, s, w, good,
                                               nullptr, nullptr));
}
