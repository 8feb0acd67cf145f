// The masked MoE(mult, shift) product (ops/cuda/ops.h moe_route_mask_forward, moe_masked_weights): the router +
// mask kernel against a plain CPU reference, element by element; the whole masked layer (kernel + one cuBLASLt
// product) against the CPU reference of the MoE linear; ViTCuda's SAV_MOE_MASKED modes against each other and the
// CPU engine.
//
// Routing tolerance. The GPU sums a row's K products x_k wr[e,k] (bf16 x, f32 weights) and br[e] in f32 in its own
// order; every f32 summation order of n terms is within gamma_n * sum|terms| of the exact sum (gamma_n = n u / (1 -
// n u), u = 2^-24; n = K + 6 bounds the roundings on any term's path: fmaf chain, 5 shuffle adds, the bias). The
// CPU reference (cpu::moe_router_forward_ref) sums in double and rounds the logit to f32 (u |l|). A row whose exact
// logits differ by less than the sum of those bounds may route either way ("ambiguous"); every other row must
// route as the CPU does. Exactly tied logits (computed in the same order) and NaN logits go to expert 0.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/rng.h"
#include "cuda_test_util.h"
#include "models/vit.h"
#include "models/vit_cuda.h"
#include "ops/cpu/moe.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/ops.h"
#include "vit_random.h"

using namespace sav;
using namespace sav::test;
using sav::cuda::bf16;
using sav::cuda::DeviceBuffer;

namespace {

class MoeMasked : public CudaTest {};

uint16_t bits(bf16 v) {
  uint16_t u;
  std::memcpy(&u, &v, 2);
  return u;
}

// Router inputs of M rows of K features: x bf16-rounded normal (row 0 all zeros, row 1 starting with a NaN when
// M > 2), wr (2,K) normal / sqrt(K) (logits ~ N(0,1): both experts get tokens), br (2) small.
struct RouterCase {
  int M, K;
  std::vector<float> x, wr, br;
};

RouterCase router_case(int M, int K, uint64_t seed, bool nan_row) {
  RouterCase r{M, K, round_bf16(normal(size_t(M) * K, seed)),
               normal(size_t(2) * K, seed + 1, 1.0f / std::sqrt(float(K))), normal(2, seed + 2, 0.1f)};
  if (M > 2) {
    for (int k = 0; k < K; ++k) r.x[k] = 0.0f;
    if (nan_row) r.x[size_t(K)] = std::numeric_limits<float>::quiet_NaN();
  }
  return r;
}

// Per row: the CPU's choice (cpu::moe_router_forward_ref), the exact logits (double), and whether the row is
// ambiguous (header).
struct RouterRef {
  std::vector<int> choice;
  std::vector<double> l0, l1;
  std::vector<bool> ambiguous;
};

RouterRef router_ref(const RouterCase& rc) {
  const int M = rc.M, K = rc.K;
  RouterRef r;
  r.choice.resize(M);
  std::vector<float> logits(size_t(M) * 2), noisy(size_t(M) * 2), probs(size_t(M) * 2);
  cpu::moe_router_forward_ref(logits.data(), noisy.data(), probs.data(), r.choice.data(), rc.x.data(), rc.wr.data(),
                              rc.br.data(), M, K, 2, 0.0f, nullptr);
  const double u = std::ldexp(1.0, -24), n = K + 6, gamma = n * u / (1.0 - n * u);
  for (int t = 0; t < M; ++t) {
    double l[2], bound = 0.0;
    for (int e = 0; e < 2; ++e) {
      double acc = rc.br[e], mag = std::fabs(rc.br[e]);
      for (int k = 0; k < K; ++k) {
        const double p = double(rc.x[size_t(t) * K + k]) * rc.wr[size_t(e) * K + k];
        acc += p, mag += std::fabs(p);
      }
      l[e] = acc;
      bound += gamma * mag + u * std::fabs(acc);
    }
    r.l0.push_back(l[0]), r.l1.push_back(l[1]);
    r.ambiguous.push_back(std::fabs(l[1] - l[0]) <= bound);  // false for NaN
  }
  return r;
}

// Checks the rows of x_aug (M, ldxa) against [src s0 | src s1 | s0 s0 s1 s1 | 0] for the kernel's own choices ch
// (src row t at src + t ld_src, bf16 bits) and the choices against the CPU's (ref) on its unambiguous rows.
struct XaugCheck {
  int unwritten = 0, ambiguous = 0, wrong = 0, to_shift = 0;
  size_t bad = 0, gap_written = 0;
};
XaugCheck check_xaug(const std::vector<bf16>& xa, int ldxa, const std::vector<int8_t>& ch, const RouterRef& ref,
                     const bf16* src, size_t ld_src, int M, int K) {
  XaugCheck r;
  const int Ka = cuda::moe_masked_cols(K);
  for (int t = 0; t < M; ++t) {
    if (ch[t] != 0 && ch[t] != 1) {
      ++r.unwritten;
      continue;
    }
    const int e = ch[t];
    r.to_shift += e;
    if (ref.ambiguous[t])
      ++r.ambiguous;
    else
      r.wrong += e != ref.choice[t];
    for (int j = 0; j < Ka; ++j) {
      uint16_t want = 0;
      if (j < K)
        want = e == 0 ? bits(src[size_t(t) * ld_src + j]) : 0;
      else if (j < 2 * K)
        want = e == 1 ? bits(src[size_t(t) * ld_src + j - K]) : 0;
      else if (j < 2 * K + 4)
        want = (j - 2 * K) / 2 == e ? 0x3F80 : 0;
      r.bad += bits(xa[size_t(t) * ldxa + j]) != want;
    }
    for (int j = Ka; j < ldxa; ++j) r.gap_written += bits(xa[size_t(t) * ldxa + j]) != 0xFFFF;
  }
  return r;
}

// The assertions on a check_xaug result of M rows: every choice written (fatal), no element of x_aug off its layout
// (bad_msg: the layout expected), nothing written past Ka, the CPU's choices on unambiguous rows, few near-ties, and
// (M >= 37) both experts used. Call as ASSERT_NO_FATAL_FAILURE(expect_xaug_ok(...)) to stop the test when a choice
// is missing.
void expect_xaug_ok(const XaugCheck& r, int M, const char* bad_msg) {
  ASSERT_EQ(r.unwritten, 0) << "choices not written";
  EXPECT_EQ(r.bad, 0u) << bad_msg;
  EXPECT_EQ(r.gap_written, 0u) << "wrote past Ka";
  EXPECT_EQ(r.wrong, 0) << "routing differs from the CPU on unambiguous rows (" << r.ambiguous << " ambiguous)";
  EXPECT_LE(r.ambiguous, 1 + M / 50) << "too many near-ties for random logits";
  if (M >= 37) {
    EXPECT_GT(r.to_shift, M / 5) << "both experts should get tokens";
    EXPECT_LT(r.to_shift, M - M / 5);
  }
}

}  // namespace

// Every element of x_aug checked bit for bit against the row's expected layout [x s0 | x s1 | s0 s0 s1 s1 | 0]
// (from the GPU's choice), the columns past Ka untouched, the choices equal to the CPU's on unambiguous rows (the
// all-zero row: br decides; the NaN row: expert 0). Odd K and strides (scalar path), K % 8 == 0 (16-byte path, K =
// 4096 beyond the register-held chunks), reruns bit-identical, a null choice pointer.
TEST_F(MoeMasked, RouteMaskMatchesCpuReference) {
  struct Case {
    int M, K, ldx_pad, ldxa_pad;
  };
  for (const Case cs :
       {Case{37, 45, 0, 0}, Case{37, 45, 3, 5}, Case{37, 192, 0, 0}, Case{37, 192, 1, 0}, Case{37, 192, 0, 3},
        Case{64, 768, 0, 16}, Case{5, 4096, 0, 0}, Case{3, 1, 0, 0}, Case{197, 200, 8, 8}, Case{1, 13, 0, 0}}) {
    const int M = cs.M, K = cs.K, Ka = cuda::moe_masked_cols(K), ldx = K + cs.ldx_pad, ldxa = Ka + cs.ldxa_pad;
    SCOPED_TRACE(dims({{"M", M}, {"K", K}, {"ldx", ldx}, {"ldxa", ldxa}}));
    ASSERT_EQ(Ka % 16, 0);
    ASSERT_GE(Ka, 2 * K + 4);
    ASSERT_LT(Ka, 2 * K + 20);
    const RouterCase rc = router_case(M, K, 100 + K, true);
    const RouterRef ref = router_ref(rc);
    std::vector<float> xs(size_t(M) * ldx, 0.0f);
    for (int t = 0; t < M; ++t)
      for (int k = 0; k < K; ++k) xs[size_t(t) * ldx + k] = rc.x[size_t(t) * K + k];
    auto dx = upload_as<bf16>(xs);
    auto dwr = upload(rc.wr), dbr = upload(rc.br);
    auto dxa = poisoned<bf16>(size_t(M) * ldxa);
    DeviceBuffer<int8_t> dch(M);
    dch.fill_bytes(0x7F);
    cuda::moe_route_mask_forward(dxa.get(), ldxa, dch.get(), dx.get(), ldx, dwr.get(), dbr.get(), M, K, nullptr);
    device_sync();
    const std::vector<bf16> xa = dxa.download();
    const std::vector<int8_t> ch = dch.download();
    const std::vector<bf16> xb = sav::cuda::to_bf16(xs.data(), xs.size());
    ASSERT_NO_FATAL_FAILURE(expect_xaug_ok(check_xaug(xa, ldxa, ch, ref, xb.data(), ldx, M, K), M,
                                           "x_aug elements differ from [x s0 | x s1 | s0 s0 s1 s1 | 0]"));
    if (M > 2) {
      EXPECT_EQ(ch[1], 0) << "a NaN logit goes to expert 0";
    }
    // rerun: the same bits; without a choice pointer: the same x_aug, the choices untouched
    auto dxa2 = poisoned<bf16>(size_t(M) * ldxa);
    cuda::moe_route_mask_forward(dxa2.get(), ldxa, dch.get(), dx.get(), ldx, dwr.get(), dbr.get(), M, K, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dxa2.download(), xa)) << "rerun differs";
    EXPECT_TRUE(dch.download() == ch);
    dch.fill_bytes(0x7F);
    cuda::moe_route_mask_forward(dxa2.get(), ldxa, nullptr, dx.get(), ldx, dwr.get(), dbr.get(), M, K, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dxa2.download(), xa)) << "null choice pointer changes x_aug";
    for (int8_t c : dch.download()) ASSERT_EQ(c, 0x7F) << "choices written through a null pointer";
  }
}

// The LayerNorm fused into the router + mask kernel (moe_ln_route_mask_forward) against layernorm_forward's bf16
// output routed by the CPU reference: every x_aug element bit for bit [xn s0 | xn s1 | s0 s0 s1 s1 | 0] with xn the
// LayerNorm kernel's output (the same arithmetic) and the kernel's own choice; the choices equal the CPU's on
// unambiguous rows (the header's bound, on xn); nothing written past Ka; a rerun bit-identical. K from 4 to 512
// (half a warp per row) and 516 to 1024 (a warp per row), rows past a whole row group (M odd), strided rows.
TEST_F(MoeMasked, LayerNormRouteMaskMatchesLayerNormThenCpuRouter) {
  struct Case {
    int M, K, ldx_pad, ldxa_pad;
  };
  for (const Case cs :
       {Case{37, 192, 0, 0}, Case{197, 48, 4, 4}, Case{5, 4, 0, 0}, Case{33, 512, 0, 8}, Case{394, 384, 0, 0},
        Case{1, 100, 8, 0}, Case{197, 768, 0, 0}, Case{11, 516, 4, 8}, Case{9, 1024, 0, 0}}) {
    const int M = cs.M, K = cs.K, Ka = cuda::moe_masked_cols(K), ldx = K + cs.ldx_pad, ldxa = Ka + cs.ldxa_pad;
    SCOPED_TRACE(dims({{"M", M}, {"K", K}, {"ldx", ldx}, {"ldxa", ldxa}}));
    ASSERT_TRUE(cuda::moe_ln_route_mask_supports(K));
    std::vector<float> xs = normal(size_t(M) * ldx, 300 + K, 2.0f);
    for (auto& v : xs) v += 0.7f;  // a mean to remove
    const std::vector<float> lw = uniform(K, 301, 0.5f, 1.5f), lb = uniform(K, 302, -0.5f, 0.5f);
    auto dx = upload(xs), dlw = upload(lw), dlb = upload(lb);
    DeviceBuffer<bf16> dxn(size_t(M) * K);
    cuda::layernorm_forward(dxn.get(), K, dx.get(), ldx, dlw.get(), dlb.get(), M, K, 1e-6f, nullptr);
    device_sync();
    const std::vector<bf16> xn = dxn.download();
    RouterCase rc = router_case(M, K, 303 + K, false);
    for (size_t i = 0; i < xn.size(); ++i) rc.x[i] = sav::bf16_to_float(bits(xn[i]));
    const RouterRef ref = router_ref(rc);
    auto dwr = upload(rc.wr), dbr = upload(rc.br);
    auto dxa = poisoned<bf16>(size_t(M) * ldxa);
    auto dch = poisoned<int8_t>(M);
    cuda::moe_ln_route_mask_forward(dxa.get(), ldxa, dch.get(), dx.get(), ldx, dlw.get(), dlb.get(), 1e-6f, dwr.get(),
                                    dbr.get(), M, K, nullptr);
    device_sync();
    const std::vector<bf16> xa = dxa.download();
    const std::vector<int8_t> ch = dch.download();
    ASSERT_NO_FATAL_FAILURE(expect_xaug_ok(check_xaug(xa, ldxa, ch, ref, xn.data(), K, M, K), M,
                                           "x_aug differs from [LayerNorm(x) s0 | LayerNorm(x) s1 | s0 s0 s1 s1 | 0]"));
    auto dxa2 = poisoned<bf16>(size_t(M) * ldxa);
    cuda::moe_ln_route_mask_forward(dxa2.get(), ldxa, nullptr, dx.get(), ldx, dlw.get(), dlb.get(), 1e-6f, dwr.get(),
                                    dbr.get(), M, K, nullptr);
    device_sync();
    EXPECT_TRUE(bit_identical(dxa2.download(), xa)) << "rerun differs";
  }
  EXPECT_FALSE(cuda::moe_ln_route_mask_supports(1028));
  EXPECT_FALSE(cuda::moe_ln_route_mask_supports(190));
  DeviceBuffer<bf16> xa(64);
  DeviceBuffer<float> x(64);
  EXPECT_THROW(cuda::moe_ln_route_mask_forward(xa.get(), 32, nullptr, x.get(), 6, x.get(), x.get(), 1e-6f, x.get(),
                                               x.get(), 1, 6, nullptr),
               sav::Error);
}

// The stacked form's residual epilogue with the next LayerNorm fused (moe_epilogue_residual_ln_forward) against
// moe_epilogue_forward (f32 residual) then layernorm_forward: the residual stream, the LayerNorm output and the
// choices bit for bit, both gates, F from 4 to 1024 (both row groups), strided rows.
TEST_F(MoeMasked, EpilogueResidualLayerNormMatchesEpilogueThenLayerNorm) {
  struct Case {
    int M, F, ldx_pad, ldxn_pad;
  };
  for (const auto gate : {cuda::moe_gate_straight_through, cuda::moe_gate_prob})
    for (const Case cs : {Case{37, 192, 0, 0}, Case{197, 48, 4, 8}, Case{5, 4, 0, 0}, Case{33, 512, 0, 4},
                          Case{394, 384, 0, 0}, Case{197, 768, 0, 0}, Case{13, 516, 4, 8}, Case{9, 1024, 0, 4}}) {
      const int M = cs.M, F = cs.F, lds = cuda::moe_stack_rows(F), ldx = F + cs.ldx_pad, ldxn = F + cs.ldxn_pad;
      SCOPED_TRACE(dims({{"M", M}, {"F", F}, {"ldx", ldx}, {"ldxn", ldxn}, {"gate", int(gate)}}));
      ASSERT_TRUE(cuda::moe_epilogue_residual_ln_supports(F));
      std::vector<float> sc = normal(size_t(M) * lds, 400 + F);
      for (int t = 0; t < M; ++t)  // router columns: logits ~ N(0, 1), both experts used
        for (int j = 2 * F; j < 2 * F + 4; ++j) sc[size_t(t) * lds + j] *= j < 2 * F + 2 ? 1.0f : 1e-3f;
      std::vector<float> xs = normal(size_t(M) * ldx, 401 + F, 2.0f);
      for (auto& v : xs) v += 0.7f;
      const std::vector<float> b0 = normal(F, 402), b1 = normal(F, 403), br = normal(2, 404, 0.1f);
      const std::vector<float> lw = uniform(F, 405, 0.5f, 1.5f), lb = uniform(F, 406, -0.5f, 0.5f);
      auto ds = upload(sc), db0 = upload(b0), db1 = upload(b1), dbr = upload(br), dlw = upload(lw), dlb = upload(lb);
      auto xa = upload(xs), xb = upload(xs);
      auto ca = poisoned<int8_t>(M), cb = poisoned<int8_t>(M);
      auto na = poisoned<bf16>(size_t(M) * ldxn), nb = poisoned<bf16>(size_t(M) * ldxn);
      cuda::moe_epilogue_forward(xa.get(), ldx, ca.get(), ds.get(), lds, db0.get(), db1.get(), dbr.get(), M, F, gate,
                                 cuda::moe_epilogue_f32_residual, nullptr);
      cuda::layernorm_forward(na.get(), ldxn, xa.get(), ldx, dlw.get(), dlb.get(), M, F, 1e-6f, nullptr);
      cuda::moe_epilogue_residual_ln_forward(xb.get(), ldx, cb.get(), ds.get(), lds, db0.get(), db1.get(), dbr.get(), M,
                                             F, gate, nb.get(), ldxn, dlw.get(), dlb.get(), 1e-6f, nullptr);
      device_sync();
      const std::vector<int8_t> cha = ca.download();
      EXPECT_TRUE(bit_identical(xb.download(), xa.download())) << "residual stream differs";
      EXPECT_TRUE(bit_identical(nb.download(), na.download())) << "LayerNorm output (and the gaps) differ";
      EXPECT_TRUE(cb.download() == cha) << "choices differ";
      int to_shift = 0;
      for (int8_t c : cha) to_shift += c;
      if (M >= 37) {
        EXPECT_GT(to_shift, M / 5) << "both experts should get tokens";
        EXPECT_LT(to_shift, M - M / 5);
      }
    }
  EXPECT_FALSE(cuda::moe_epilogue_residual_ln_supports(1028));
  EXPECT_FALSE(cuda::moe_epilogue_residual_ln_supports(190));
}

// Identical router rows (wr[1] = wr[0], br[1] = br[0]): both logits are summed in the same order, so every row is
// an exact tie and goes to expert 0, on both kernel paths.
TEST_F(MoeMasked, ExactTiesGoToExpertZero) {
  for (const int K : {45, 192}) {
    SCOPED_TRACE(dims({{"K", K}}));
    const int M = 37, Ka = cuda::moe_masked_cols(K);
    RouterCase rc = router_case(M, K, 7, false);
    for (int k = 0; k < K; ++k) rc.wr[size_t(K) + k] = rc.wr[k];
    rc.br[1] = rc.br[0];
    auto dx = upload_as<bf16>(rc.x);
    auto dwr = upload(rc.wr), dbr = upload(rc.br);
    auto dxa = poisoned<bf16>(size_t(M) * Ka);
    auto dch = poisoned<int8_t>(M);
    cuda::moe_route_mask_forward(dxa.get(), Ka, dch.get(), dx.get(), K, dwr.get(), dbr.get(), M, K, nullptr);
    device_sync();
    for (int8_t c : dch.download()) ASSERT_EQ(c, 0);
    const std::vector<bf16> xa = dxa.download();
    for (int t = 0; t < M; ++t) {
      const bf16* r = xa.data() + size_t(t) * Ka;
      EXPECT_EQ(bits(r[2 * K]), 0x3F80);
      EXPECT_EQ(bits(r[2 * K + 1]), 0x3F80);
      EXPECT_EQ(bits(r[2 * K + 2]), 0);
      EXPECT_EQ(bits(r[2 * K + 3]), 0);
    }
  }
}

TEST_F(MoeMasked, BadArgumentsThrow) {
  DeviceBuffer<bf16> xa(1024), x(1024);
  DeviceBuffer<float> wr(64), br(2);
  DeviceBuffer<int8_t> ch(8);
  auto call = [&](bf16* a, int ldxa, const bf16* xx, int ldx, const float* w, int M, int K) {
    cuda::moe_route_mask_forward(a, ldxa, ch.get(), xx, ldx, w, br.get(), M, K, nullptr);
  };
  EXPECT_NO_THROW(call(xa.get(), 80, x.get(), 32, wr.get(), 0, 32));  // M = 0: nothing to do
  EXPECT_THROW(call(nullptr, 80, x.get(), 32, wr.get(), 4, 32), sav::Error);
  EXPECT_THROW(call(xa.get(), 80, nullptr, 32, wr.get(), 4, 32), sav::Error);
  EXPECT_THROW(call(xa.get(), 80, x.get(), 32, nullptr, 4, 32), sav::Error);
  EXPECT_THROW(call(xa.get(), 79, x.get(), 32, wr.get(), 4, 32), sav::Error);  // ldxa < Ka = 80
  EXPECT_THROW(call(xa.get(), 80, x.get(), 31, wr.get(), 4, 32), sav::Error);  // ldx < K
  EXPECT_THROW(call(xa.get(), 80, x.get(), 32, wr.get(), 4, 0), sav::Error);
  EXPECT_THROW(call(xa.get(), 80, x.get(), 32, wr.get(), -1, 32), sav::Error);
  std::vector<float> w(4), b(2);
  EXPECT_THROW(cuda::moe_masked_weights(w.data(), w.data(), b.data(), nullptr, 2, 2), sav::Error);
  EXPECT_THROW(cuda::moe_masked_weights(w.data(), w.data(), b.data(), b.data(), 0, 2), sav::Error);
}

// W_aug's layout: [W0 | W1 | b0_hi b0_lo b1_hi b1_lo | 0], the bias split to within 2^-17 of each bias.
TEST(MoeMaskedWeights, LayoutAndBiasSplit) {
  const int F = 5, K = 3, Ka = cuda::moe_masked_cols(K);
  ASSERT_EQ(Ka, 16);
  const std::vector<float> w0 = round_bf16(normal(F * K, 1)), w1 = round_bf16(normal(F * K, 2));
  const std::vector<float> b0 = normal(F, 3), b1 = normal(F, 4);
  const std::vector<float> wa =
      sav::cuda::from_bf16(cuda::moe_masked_weights(w0.data(), w1.data(), b0.data(), b1.data(), F, K));
  ASSERT_EQ(wa.size(), size_t(F) * Ka);
  for (int j = 0; j < F; ++j) {
    const float* r = wa.data() + size_t(j) * Ka;
    for (int k = 0; k < K; ++k) {
      EXPECT_EQ(r[k], w0[size_t(j) * K + k]);
      EXPECT_EQ(r[K + k], w1[size_t(j) * K + k]);
    }
    EXPECT_LE(std::fabs(double(r[2 * K]) + r[2 * K + 1] - b0[j]), std::ldexp(std::fabs(b0[j]), -17));
    EXPECT_LE(std::fabs(double(r[2 * K + 2]) + r[2 * K + 3] - b1[j]), std::ldexp(std::fabs(b1[j]), -17));
    for (int c = 2 * K + 4; c < Ka; ++c) EXPECT_EQ(r[c], 0.0f);
  }
}

// The whole masked layer (router + mask kernel, then one cuBLASLt product with W_aug and the fused epilogue) against
// the CPU reference of the MoE linear: routing by cpu::moe_router_forward_ref, the chosen expert's x W_e^T + b_e in
// double (x and W0 bf16-rounded, W1 exact powers of two, b_e f32), then the epilogue: GELU (erf form, the CPU's)
// for the bf16 output, the residual add for the f32 output. On ambiguous rows (header) the GPU's choice is used.
// Tolerances: bf16 output: one rounding (2^-9 relative, <= 2e-3 of max|ref|) + cuBLASLt's tanh GELU (<= 4.7e-4
// absolute, gemm.h; max|ref| > 1 here) + the bias split (2^-17 |b|): 8e-3 stated, as the stacked form's test;
// f32 residual output: f32 accumulation over Ka terms and the bias split: 1e-5 of max|ref|. Reruns bit-identical.
TEST_F(MoeMasked, MaskedLayerMatchesCpuMoeLinear) {
  struct Case {
    int M, K, F;
  };
  cuda::Gemm gemm;
  for (const Case cs : {Case{197, 192, 768}, Case{37, 45, 37}, Case{394, 768, 192}, Case{5, 16, 8}}) {
    const int M = cs.M, K = cs.K, F = cs.F, Ka = cuda::moe_masked_cols(K);
    const RouterCase rc = router_case(M, K, 81 + F, false);
    const RouterRef rr = router_ref(rc);
    const std::vector<float>& x = rc.x;
    const std::vector<float> w0 = round_bf16(normal(size_t(F) * K, 82, 0.1f));
    std::vector<float> w1(size_t(F) * K);
    {
      Rng rng(83);
      for (auto& w : w1) {
        const int sg = static_cast<int>(rng.below(3)) - 1, p = -static_cast<int>(rng.below(8)) - 2;
        w = sg * std::ldexp(1.0f, p);
      }
    }
    const std::vector<float> b0 = normal(F, 85, 0.3f), b1 = normal(F, 86, 0.3f);
    const std::vector<float> x0 = normal(size_t(M) * F, 88);
    auto dx = upload_as<bf16>(x);
    auto dwr = upload(rc.wr), dbr = upload(rc.br);
    DeviceBuffer<bf16> dwa(size_t(F) * Ka);
    dwa.upload(cuda::moe_masked_weights(w0.data(), w1.data(), b0.data(), b1.data(), F, K));
    DeviceBuffer<bf16> dxa(size_t(M) * Ka);
    DeviceBuffer<int8_t> dch(M);
    for (const bool residual : {false, true}) {
      SCOPED_TRACE(dims({{"M", M}, {"K", K}, {"F", F}, {"residual", residual}}));
      std::vector<float> got, again;
      std::vector<int8_t> ch;
      for (int rep = 0; rep < 2; ++rep) {
        dxa.fill_bytes(0xFF);
        dch.fill_bytes(0x7F);
        cuda::moe_route_mask_forward(dxa.get(), Ka, dch.get(), dx.get(), K, dwr.get(), dbr.get(), M, K, nullptr);
        std::vector<float> y;
        if (residual) {
          auto dout = upload(x0);
          gemm.linear_f32(dout.get(), dxa.get(), dwa.get(), nullptr, M, Ka, F, true, nullptr);
          y = dout.download();
        } else {
          auto dout = poisoned<bf16>(size_t(M) * F);
          gemm.linear_bf16(dout.get(), dxa.get(), dwa.get(), nullptr, M, Ka, F, true, nullptr);
          y = download_f32(dout);
        }
        if (rep == 0) {
          got = y, ch = dch.download();
        } else {
          again = y;
          EXPECT_TRUE(dch.download() == ch) << "rerun routes differently";
        }
      }
      EXPECT_TRUE(bit_identical(again, got)) << "rerun differs";
      std::vector<float> ref(size_t(M) * F);
      int ambiguous = 0, wrong = 0;
      for (int t = 0; t < M; ++t) {
        ASSERT_TRUE(ch[t] == 0 || ch[t] == 1) << "choice of row " << t << " not written";
        if (rr.ambiguous[t])
          ++ambiguous;
        else
          wrong += ch[t] != rr.choice[t];
        const int e = ch[t];
        const std::vector<float>& w = e ? w1 : w0;
        for (int j = 0; j < F; ++j) {
          double a = (e ? b1 : b0)[j];
          for (int k = 0; k < K; ++k) a += double(x[size_t(t) * K + k]) * w[size_t(j) * K + k];
          ref[size_t(t) * F + j] =
              float(residual ? x0[size_t(t) * F + j] + a : 0.5 * a * (1.0 + std::erf(a / std::sqrt(2.0))));
        }
      }
      EXPECT_EQ(wrong, 0) << "routing differs from the CPU on unambiguous rows (" << ambiguous << " ambiguous)";
      EXPECT_EQ(count_nonfinite(got), 0u) << "outputs not all written";
      const double err = norm_err(got, ref);
      std::printf("[ info ] masked MoE M=%d K=%d F=%d %s: err %.3e (max|ref| %.3f)\n", M, K, F,
                  residual ? "f32 residual" : "bf16 GELU", err, max_abs(ref.data(), ref.size()));
      EXPECT_LT(err, residual ? 1e-5 : 8e-3);
    }
  }
}

// ---- the stacked form's epilogue kernel (moe_epilogue_forward: a thread per float4 across rows) ----

// With the straight-through gate the bf16 and f32-residual epilogues are plain f32 arithmetic, so the kernel must
// equal a host emulation bit for bit: l_e = (s[2F+e] + s[2F+2+e]) + br[e], e = l1 > l0, y = (s[eF+j] + b_e[j]) * 1,
// out = bf16(y) (round to nearest even) or out = x + y. Float4 path (F = 192, 768) and scalar path (F = 37, odd
// strides); every row's choice and every output element checked, columns past F untouched. (GELU and the prob gate
// use erff / expf, whose device results the host cannot reproduce bit for bit: test_cuda_ops.cpp checks them with a
// tolerance.)
TEST_F(MoeMasked, StackedEpilogueStraightThroughIsExactF32) {
  struct Case {
    int M, F, ldo_pad, lds_pad;
  };
  for (const Case cs : {Case{394, 192, 4, 0}, Case{37, 768, 0, 16}, Case{37, 37, 3, 1}, Case{1, 8, 0, 0}}) {
    const int M = cs.M, F = cs.F, ldo = F + cs.ldo_pad, lds = cuda::moe_stack_rows(F) + cs.lds_pad;
    const std::vector<float> sv = normal(size_t(M) * lds, 91 + F), b0 = normal(F, 92), b1 = normal(F, 93);
    const std::vector<float> br = normal(2, 94, 0.1f), x0 = normal(size_t(M) * ldo, 95);
    auto ds = upload(sv);
    auto db0 = upload(b0), db1 = upload(b1), dbr = upload(br);
    DeviceBuffer<int8_t> dch(M);
    for (const bool residual : {false, true}) {
      SCOPED_TRACE(dims({{"M", M}, {"F", F}, {"ldo", ldo}, {"lds", lds}, {"residual", residual}}));
      dch.fill_bytes(0x7F);
      std::vector<float> got;
      std::vector<uint16_t> got16;
      if (residual) {
        auto dout = upload(x0);
        cuda::moe_epilogue_forward(dout.get(), ldo, dch.get(), ds.get(), lds, db0.get(), db1.get(), dbr.get(), M, F,
                                   cuda::moe_gate_straight_through, cuda::moe_epilogue_f32_residual, nullptr);
        got = dout.download();
      } else {
        auto dout = poisoned<bf16>(size_t(M) * ldo);
        cuda::moe_epilogue_forward(dout.get(), ldo, dch.get(), ds.get(), lds, db0.get(), db1.get(), dbr.get(), M, F,
                                   cuda::moe_gate_straight_through, cuda::moe_epilogue_bf16, nullptr);
        for (bf16 v : dout.download()) got16.push_back(bits(v));
      }
      const std::vector<int8_t> ch = dch.download();
      size_t bad = 0, gap = 0;
      int bad_choice = 0;
      for (int t = 0; t < M; ++t) {
        const float* sr = sv.data() + size_t(t) * lds;
        const float l0 = sr[2 * F] + sr[2 * F + 2] + br[0];
        const float l1 = sr[2 * F + 1] + sr[2 * F + 3] + br[1];
        const int e = l1 > l0 ? 1 : 0;
        bad_choice += ch[t] != e;
        for (int j = 0; j < F; ++j) {
          const float y = (sr[e * F + j] + (e ? b1 : b0)[j]) * 1.0f;
          const size_t i = size_t(t) * ldo + j;
          if (residual) {
            const float want = x0[i] + y;
            bad += std::memcmp(&got[i], &want, 4) != 0;
          } else {
            bad += got16[i] != sav::float_to_bf16(y);
          }
        }
        for (int j = F; j < ldo; ++j) {
          const size_t i = size_t(t) * ldo + j;
          gap += residual ? std::memcmp(&got[i], &x0[i], 4) != 0 : got16[i] != 0xFFFF;
        }
      }
      EXPECT_EQ(bad_choice, 0);
      EXPECT_EQ(bad, 0u) << "outputs differ from the f32 arithmetic";
      EXPECT_EQ(gap, 0u) << "wrote outside the rows";
    }
  }
}

// ---- ViTCuda's SAV_MOE_MASKED modes ----

namespace {

// Sets SAV_MOE_MASKED for its lifetime (nullptr: unset), then restores the previous value.
class ScopedMaskedEnv {
 public:
  explicit ScopedMaskedEnv(const char* v) {
    const char* old = std::getenv("SAV_MOE_MASKED");
    had_ = old != nullptr;
    if (had_) old_ = old;
    if (v)
      setenv("SAV_MOE_MASKED", v, 1);
    else
      unsetenv("SAV_MOE_MASKED");
  }
  ~ScopedMaskedEnv() {
    if (had_)
      setenv("SAV_MOE_MASKED", old_.c_str(), 1);
    else
      unsetenv("SAV_MOE_MASKED");
  }

 private:
  bool had_ = false;
  std::string old_;
};

// The ShiftAddVit test model of test_vit_cuda.cpp: Hamming and softmax blocks with dense, shift and MoE attention
// linears, dense, shift and MoE MLPs (MoE: qkv of a softmax block, to_qk / to_v of a Hamming block, proj, fc1, fc2).
// The CPU reference of a converted model: its weights randomised (randomise_shiftadd with seed), B random images
// (seed + 1) and the CPU's logits for them.
struct Reference {
  std::vector<float> images, logits;
};
Reference randomised_reference(Vit& cpu, int B, uint64_t seed) {
  randomise_shiftadd(cpu, seed);
  const VitConfig& c = cpu.config();
  Reference r;
  r.images = normal(size_t(B) * c.in_chans * c.img_size * c.img_size, seed + 1);
  cpu.forward(r.images.data(), B, false);
  r.logits.assign(cpu.logits(), cpu.logits() + size_t(B) * c.num_classes);
  return r;
}

VitConfig every_kind_config() {
  VitConfig c = vit_preset("vit_fmnist");
  c.depth = 6;
  c.attn = "hhhsss", c.attn_linear = "dsmdsm", c.mlp = "mmsdmm";
  return c;
}

struct ModeRun {
  std::vector<float> logits;
  std::vector<std::pair<std::string, std::vector<int8_t>>> routing;
  size_t weight_bytes = 0;
};

// Graph forward of B images (capture), then a replay and an eager run that must give the same bits and routing.
ModeRun run_mode(ViTCuda& net, const std::vector<float>& images, int B) {
  const int V = net.config().num_classes;
  DeviceBuffer<float> dimg(images.size()), dl(size_t(B) * V);
  dimg.upload(images);
  cuda::Stream s;
  ModeRun r;
  dl.fill_bytes(0xFF);
  net.forward(dimg.get(), dl.get(), B, s.get());
  s.sync();
  r.logits = dl.download();
  r.routing = net.moe_choices();
  r.weight_bytes = net.weight_bytes();
  for (const bool eager : {false, true}) {
    dl.fill_bytes(0xFF);
    if (eager)
      net.forward_eager(dimg.get(), dl.get(), B, s.get());
    else
      net.forward(dimg.get(), dl.get(), B, s.get());
    s.sync();
    EXPECT_TRUE(bit_identical(dl.download(), r.logits)) << (eager ? "eager run" : "graph replay") << " differs";
    EXPECT_TRUE(net.moe_choices() == r.routing) << (eager ? "eager run" : "graph replay") << " routes differently";
  }
  return r;
}

// Largest fraction of tokens routed differently from the CPU's last forward, over the MoE layers.
double routing_vs_cpu(Vit& cpu, const ModeRun& g) {
  const auto layers = cpu.moe_layers();
  EXPECT_EQ(layers.size(), g.routing.size());
  double worst = 0.0;
  for (size_t i = 0; i < std::min(layers.size(), g.routing.size()); ++i) {
    EXPECT_EQ(layers[i].first, g.routing[i].first);
    const std::vector<int>& cc = layers[i].second->last_choice();
    const std::vector<int8_t>& gc = g.routing[i].second;
    EXPECT_EQ(cc.size(), gc.size());
    int diff = 0;
    for (size_t t = 0; t < std::min(cc.size(), gc.size()); ++t) diff += cc[t] != gc[t];
    worst = std::max(worst, gc.empty() ? 0.0 : double(diff) / gc.size());
  }
  return worst;
}

}  // namespace

// off / fc1 / all on one model, both gates: every mode within the ShiftAddViT bound of the CPU engine (3e-2 of
// max|logit|, test_vit_cuda.cpp's header: hash bits and routing decisions near their thresholds may flip) and of the
// stacked form (off), routing as the CPU's except at near-ties (< 2%), replays bit-identical; the masked modes hold
// W_aug (more weight bytes) only with the straight-through gate. A second, larger batch reallocates x_aug. (Each
// ViTCuda has its own Gemm, whose autotuning may pick other algorithms: the modes are not compared bit for bit.)
TEST_F(MoeMasked, VitCudaModesAgree) {
  for (const auto gate : {cpu::moe_gate_straight_through, cpu::moe_gate_prob}) {
    SCOPED_TRACE(gate == cpu::moe_gate_prob ? "gate prob" : "gate straight-through");
    const VitConfig c = every_kind_config();
    ReparamOptions ro;
    ro.gate = gate;
    Vit cpu(c, ro);
    const int B = 3;
    const auto [images, ref] = randomised_reference(cpu, B, 21);
    std::vector<ModeRun> runs;
    for (const char* mode : {"off", "fc1", "all"}) {
      SCOPED_TRACE(std::string("SAV_MOE_MASKED=") + mode);
      ScopedMaskedEnv env(mode);
      ViTCuda net(cpu);
      runs.push_back(run_mode(net, images, B));
      const ModeRun& r = runs.back();
      EXPECT_EQ(count_nonfinite(r.logits), 0u);
      const double e = norm_err(r.logits, ref), e_off = norm_err(r.logits, runs[0].logits);
      const double rt = routing_vs_cpu(cpu, r);
      std::printf(
          "[ info ] %s, SAV_MOE_MASKED=%s: err vs CPU %.3e, vs off %.3e, routing vs CPU %.3f, %zu weight bytes\n",
          gate == cpu::moe_gate_prob ? "prob" : "straight-through", mode, e, e_off, rt, r.weight_bytes);
      EXPECT_LT(e, 3e-2);
      EXPECT_LT(e_off, 3e-2);
      EXPECT_LT(rt, 0.02);
      if (std::string(mode) == "all") {  // a larger batch: x_aug grows; still within the bound
        const int B2 = 5;
        const std::vector<float> im2 = normal(size_t(B2) * c.in_chans * c.img_size * c.img_size, 23);
        std::vector<float> got2(size_t(B2) * c.num_classes, NAN);
        net.forward_host(im2.data(), got2.data(), B2);
        cpu.forward(im2.data(), B2, false);
        const std::vector<float> ref2(cpu.logits(), cpu.logits() + got2.size());
        EXPECT_EQ(count_nonfinite(got2), 0u);
        EXPECT_LT(norm_err(got2, ref2), 3e-2);
        cpu.forward(images.data(), B, false);  // the CPU's last routing back to the first batch
      }
    }
    if (gate == cpu::moe_gate_straight_through) {
      EXPECT_GT(runs[1].weight_bytes, runs[0].weight_bytes) << "fc1 mode should hold W_aug of the MoE fc1 layers";
      EXPECT_GT(runs[2].weight_bytes, runs[1].weight_bytes) << "all mode should hold more W_aug";
    } else {
      EXPECT_EQ(runs[1].weight_bytes, runs[0].weight_bytes) << "the prob gate never runs masked";
      EXPECT_EQ(runs[2].weight_bytes, runs[0].weight_bytes);
    }
  }
}

// An unknown SAV_MOE_MASKED is refused at construction, before the device is touched (no GPU needed).
TEST(MoeMaskedConfig, UnknownModeThrows) {
  VitConfig c = vit_preset("vit_fmnist");
  c.mlp = std::string(c.depth, 'm');
  Vit cpu(c);
  ScopedMaskedEnv env("fc2");
  try {
    ViTCuda net(cpu);
    FAIL() << "SAV_MOE_MASKED=fc2 should be refused";
  } catch (const sav::Error& e) {
    EXPECT_NE(std::string(e.what()).find("SAV_MOE_MASKED"), std::string::npos) << e.what();
  }
}

namespace {

// The path ViTCuda::shift_paths reports for a layer, or "(missing)".
std::string path_of(const std::vector<std::pair<std::string, std::string>>& v, const std::string& layer) {
  for (const auto& [name, path] : v)
    if (name == layer) return path;
  return std::string("(missing)");
}

}  // namespace

// The rows-fused kernels (ViTCuda::set_row_fusion) forced on against forced off on the same model: the products sum in
// another f32 order than cuBLASLt's, so the logits agree within the converted models' bound and the routing nearly
// everywhere; graph replays and eager runs of each mode are bit-identical (run_mode), shift_paths reports a fused
// proj as "rows_fused", and the automatic mode times a whole forward with each set of fusable forms and keeps the
// fastest.
TEST_F(MoeMasked, VitCudaRowFusionModesAgree) {
  const VitConfig c = every_kind_config();
  Vit cpu(c);
  const int B = 3;
  const auto [images, ref] = randomised_reference(cpu, B, 31);
  ViTCuda net(cpu);
  EXPECT_EQ(net.row_fusion(), ViTCudaRowFusion::automatic) << "the default";
  net.set_dependent_launch(ViTCudaDependentLaunch::off);  // the row-fusion sets alone (dependent launch: below)
  net.set_row_fusion(ViTCudaRowFusion::off);
  const ModeRun off = run_mode(net, images, B);
  const auto paths_off = net.shift_paths(B);
  net.set_row_fusion(ViTCudaRowFusion::on);
  const ModeRun on = run_mode(net, images, B);
  const auto paths_on = net.shift_paths(B);
  EXPECT_TRUE(net.row_fusion_choices(B).empty()) << "forced modes time nothing";
  net.set_row_fusion(ViTCudaRowFusion::automatic);
  const ModeRun au = run_mode(net, images, B);
  const std::vector<ViTCudaRowChoice> choices = net.row_fusion_choices(B);
  for (const ModeRun* r : {&on, &au}) {
    EXPECT_EQ(count_nonfinite(r->logits), 0u);
    const double e_off = norm_err(r->logits, off.logits), e_cpu = norm_err(r->logits, ref);
    std::printf("[ info ] rows %s: vs forced off %.3e, vs CPU %.3e, routing vs CPU %.3f\n", r == &on ? "on" : "auto",
                e_off, e_cpu, routing_vs_cpu(cpu, *r));
    EXPECT_LT(e_off, 3e-2);
    EXPECT_LT(e_cpu, 3e-2);
    EXPECT_LT(routing_vs_cpu(cpu, *r), 0.02);
  }
  // blocks 0, 1, 4 have the proj form, 0 and 1 (Hamming) also the fused Hamming form, and the fc2 form exists
  // (attn "hhhsss", attn_linear "dsmdsm", mlp "mmsdmm"): the eight sets were timed, the fastest kept
  ASSERT_EQ(choices.size(), 8u);
  int chosen = 0;
  float best = choices[0].forward_us;
  for (const ViTCudaRowChoice& ch : choices) {
    std::printf("[ info ] automatic: proj %d fc2 %d forward %.2f us%s\n", ch.proj, ch.fc2, ch.forward_us,
                ch.chosen ? " (chosen)" : "");
    EXPECT_GT(ch.forward_us, 0.0f);
    chosen += ch.chosen;
    best = std::min(best, ch.forward_us);
  }
  EXPECT_EQ(chosen, 1);
  for (const ViTCudaRowChoice& ch : choices) {
    if (ch.chosen) {
      EXPECT_EQ(ch.forward_us, best);
    }
  }
  EXPECT_EQ(path_of(paths_on, "blocks.1.attn.proj"), "rows_fused");
  EXPECT_NE(path_of(paths_off, "blocks.1.attn.proj"), "rows_fused");
  EXPECT_NE(path_of(paths_off, "blocks.1.attn.proj"), "(missing)");
}

// Dependent launch (ViTCudaDependentLaunch): forced on, the same bits as forced off (only the launches differ); with
// the engine's small-M products, logits and routing within the tolerances of forced off (cuBLASLt) and of the CPU,
// also with row fusion forced; graph replays and eager runs bit-identical in every mode (run_mode); automatic tries
// every row-fusion set with and without dependent launch (16 forward timings) and keeps the fastest.
TEST_F(MoeMasked, VitCudaDependentLaunchModesAgree) {
  const VitConfig c = every_kind_config();
  Vit cpu(c);
  const int B = 2;
  const auto [images, ref] = randomised_reference(cpu, B, 41);
  ViTCuda net(cpu);
  EXPECT_EQ(net.dependent_launch(), ViTCudaDependentLaunch::automatic) << "the default";
  net.set_row_fusion(ViTCudaRowFusion::off);
  net.set_dependent_launch(ViTCudaDependentLaunch::off);
  const ModeRun off = run_mode(net, images, B);
  net.set_dependent_launch(ViTCudaDependentLaunch::on);
  const ModeRun on = run_mode(net, images, B);
  net.set_dependent_launch(ViTCudaDependentLaunch::small_products);
  const ModeRun small = run_mode(net, images, B);
  net.set_row_fusion(ViTCudaRowFusion::on);
  const ModeRun small_rows = run_mode(net, images, B);
  EXPECT_TRUE(net.row_fusion_choices(B).empty()) << "forced modes time nothing";
  net.set_row_fusion(ViTCudaRowFusion::automatic);
  net.set_dependent_launch(ViTCudaDependentLaunch::automatic);
  const ModeRun au = run_mode(net, images, B);
  EXPECT_TRUE(bit_identical(on.logits, off.logits)) << "dependent launch alone changes no arithmetic";
  EXPECT_FALSE(bit_identical(small.logits, off.logits)) << "the small-M products did not run (cuBLASLt's bits)";
  for (const ModeRun* r : {&small, &small_rows, &au}) {
    EXPECT_EQ(count_nonfinite(r->logits), 0u);
    const double e_off = norm_err(r->logits, off.logits), e_cpu = norm_err(r->logits, ref);
    std::printf("[ info ] dependent %s: vs forced off %.3e, vs CPU %.3e, routing vs CPU %.3f\n",
                r == &small        ? "small products"
                : r == &small_rows ? "small products + rows"
                                   : "auto",
                e_off, e_cpu, routing_vs_cpu(cpu, *r));
    EXPECT_LT(e_off, 3e-2);
    EXPECT_LT(e_cpu, 3e-2);
    EXPECT_LT(routing_vs_cpu(cpu, *r), 0.02);
  }
  const std::vector<ViTCudaRowChoice> choices = net.row_fusion_choices(B);
  ASSERT_EQ(choices.size(), 16u);
  int chosen = 0, dependent = 0;
  for (const ViTCudaRowChoice& ch : choices) {
    std::printf("[ info ] automatic: proj %d fc2 %d dependent %d forward %.2f us%s\n", ch.proj, ch.fc2, ch.dependent,
                ch.forward_us, ch.chosen ? " (chosen)" : "");
    EXPECT_GT(ch.forward_us, 0.0f);
    chosen += ch.chosen;
    dependent += ch.dependent;
  }
  EXPECT_EQ(chosen, 1);
  EXPECT_EQ(dependent, 8);
}

// The attention block kernel (ViTCudaRowChoice::blk, ops.h hamming_block_forward) and the MLP block kernel
// (ViTCudaRowChoice::mlp, ops.h mlp_block_forward) on a model whose blocks they take (head size 64, 3 heads, dense and
// shift to_qk / to_v, masked MoE fc1, stacked MoE fc2, F = 384): forced on against forced off within the
// converted models' bound and the routing nearly everywhere, every mode bit-identical between graph and eager
// (run_mode), shift_paths reports the fused shift to_qk / to_v and proj as "rows_fused", and the automatic mode times
// sets with each form.
TEST_F(MoeMasked, VitCudaBlockFormAgrees) {
  VitConfig c = vit_preset("vit_fmnist");
  c.dim = 192, c.heads = 3, c.depth = 3, c.mlp_hidden = 384;
  c.attn = "hhs", c.attn_linear = "dsd", c.mlp = "mmm";
  Vit cpu(c);
  const int B = 2;
  const auto [images, ref] = randomised_reference(cpu, B, 51);
  ViTCuda net(cpu);
  net.set_dependent_launch(ViTCudaDependentLaunch::off);
  net.set_row_fusion(ViTCudaRowFusion::off);
  const ModeRun off = run_mode(net, images, B);
  const auto paths_off = net.shift_paths(B);
  net.set_row_fusion(ViTCudaRowFusion::on);
  const ModeRun on = run_mode(net, images, B);
  const auto paths_on = net.shift_paths(B);
  net.set_row_fusion(ViTCudaRowFusion::automatic);
  const ModeRun au = run_mode(net, images, B);
  for (const ModeRun* r : {&on, &au}) {
    EXPECT_EQ(count_nonfinite(r->logits), 0u);
    const double e_off = norm_err(r->logits, off.logits), e_cpu = norm_err(r->logits, ref);
    std::printf("[ info ] block form %s: vs forced off %.3e, vs CPU %.3e, routing vs CPU %.3f\n",
                r == &on ? "on" : "auto", e_off, e_cpu, routing_vs_cpu(cpu, *r));
    EXPECT_LT(e_off, 3e-2);
    EXPECT_LT(e_cpu, 3e-2);
    EXPECT_LT(routing_vs_cpu(cpu, *r), 0.02);
  }
  EXPECT_EQ(path_of(paths_on, "blocks.1.attn.to_qk+to_v"), "rows_fused");
  EXPECT_EQ(path_of(paths_on, "blocks.1.attn.proj"), "rows_fused");
  EXPECT_NE(path_of(paths_off, "blocks.1.attn.to_qk+to_v"), "rows_fused");
  EXPECT_NE(path_of(paths_off, "blocks.1.attn.to_qk+to_v"), "(missing)");
  int blk = 0, mlp = 0, chosen = 0;
  for (const ViTCudaRowChoice& ch : net.row_fusion_choices(B)) {
    std::printf("[ info ] automatic: blk %d ham %d proj %d fc2 %d mlp %d forward %.2f us%s\n", ch.blk, ch.ham, ch.proj,
                ch.fc2, ch.mlp, ch.forward_us, ch.chosen ? " (chosen)" : "");
    blk += ch.blk;
    mlp += ch.mlp;
    chosen += ch.chosen;
    EXPECT_TRUE(!ch.blk || ch.ham) << "the block form falls back to the Hamming form";
    EXPECT_TRUE(!ch.mlp || !ch.fc2) << "the MLP form replaces the fc2 form";
  }
  EXPECT_GT(blk, 0) << "no set with the block form was timed";
  EXPECT_GT(mlp, 0) << "no set with the MLP form was timed";
  EXPECT_EQ(chosen, 1);
}
