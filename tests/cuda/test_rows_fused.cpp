// The small-M fused product + row epilogue kernels (ops/cuda/ops.h rows_linear_ln_mask_forward,
// rows_moe_residual_ln_forward, rows_fused_supports, rows_fused_cluster) against their definitions:
//   - rows_linear_ln_mask_forward: x against a CPU double reference x0 + (a W^T + b) within a tolerance; x_aug and
//     the choices bit for bit moe_ln_route_mask_forward run on the kernel's own output x (the spec: the same row
//     arithmetic);
//   - rows_moe_residual_ln_forward: s = h ws^T computed on the CPU in double (from the bf16 values), rounded to f32
//     and fed to moe_epilogue_residual_ln_forward as the reference; the choices equal the reference's except on
//     near-tie rows, x within a tolerance on the rows routed alike, xn bit for bit layernorm_forward of the kernel's
//     own x (every row);
//   - both: every cluster size (1, 2, 4, 8 and the launcher's pick) and a rerun give the same bits; a batch of two
//     images gives each image's bits of a run on that image alone; row strides honoured (NaN in the input rows'
//     gaps, which a kernel reading them would spread; the output rows' gaps must keep their bytes); the 16 rows after
//     the M rows of every output stay poisoned (a partial 16-row tile writes nothing past M); bad arguments throw
//     sav::Error.
// Shapes: M from 1 to 394 (partial 16-row tiles), C with C % 8 == 0 and C % 8 == 4, K % 64 != 0, DeiT-Tiny's
// proj (K = C = 192) and fc2 (K = 768, C = 192).
//
// Product tolerance. The kernels sum the K products a_k w_k (exact in f32: bf16 x bf16) in f32 on the tensor
// cores, in blocks of 64 (4 mma steps each) summed in order; the tensor cores' f32 accumulation may truncate, so
// count 2 ulp per step: with n = K/16 + K/64 + 4 roundings on any term's path the error is at most 2 n 2^-24 sum|a_k
// w_k| (< 8e-6 sum|terms| for K <= 776), plus one rounding each of s + b and x + t (2^-24 of |x0| + |t|). Stated
// bound kRel = 1e-5 of (|x0| + sum_k |a_k w_k| + |b|); the reference is double. The router logits of the MoE kernel
// are l_e = s[2C+e] + s[2C+2+e] + br[e] (hi/lo router columns): the kernel's and the reference's logits are each
// within kRel of their scale sum|terms| of the exact ones, so a row whose exact logits differ by less than
// kAmbiguous (10x margin) of the scale may route either way ("ambiguous"); x is compared on rows routed alike. The
// prob gate's probability moves by at most |d(l1 - l0)| relative, which the tolerance adds (times |y|).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/ops.h"

using namespace sav;
using namespace sav::test;
using sav::cuda::bf16;
using sav::cuda::DeviceBuffer;

namespace {

class RowsFused : public CudaTest {};

constexpr float kEps = 1e-6f;
constexpr double kRel = 1e-5;        // product + residual tolerance, relative to the sum of |terms| (header)
constexpr double kAmbiguous = 1e-4;  // router logits closer than this (relative to their scale) may route either way
constexpr int kClusters[] = {1, 2, 4, 8};
constexpr int kTail = 16;  // poisoned rows after the M rows of every output (a partial tile must not write them)

int round_up8(int n) { return (n + 7) / 8 * 8; }

bf16 bf16_from_bits(uint16_t u) {
  bf16 v;
  std::memcpy(static_cast<void*>(&v), &u, 2);
  return v;
}
uint16_t bits(bf16 v) {
  uint16_t u;
  std::memcpy(&u, &v, 2);
  return u;
}

// Rows [r0, r0 + n) of a row-major buffer with rows ld apart.
template <class T>
std::vector<T> rows_of(const std::vector<T>& v, size_t ld, int r0, int n) {
  return std::vector<T>(v.begin() + r0 * ld, v.begin() + (r0 + n) * ld);
}

// (M, ld) bf16 rows holding the (M, K) values v (bf16-exact), the gap columns NaN (0xFFFF).
std::vector<bf16> strided_bf16(const std::vector<float>& v, int M, int K, int ld) {
  std::vector<bf16> r(size_t(M) * ld, bf16_from_bits(0xFFFF));
  const std::vector<bf16> b = sav::cuda::to_bf16(v.data(), v.size());
  for (int t = 0; t < M; ++t)
    for (int k = 0; k < K; ++k) r[size_t(t) * ld + k] = b[size_t(t) * K + k];
  return r;
}

// (M, ld) f32 rows: normal values in the first C columns, the gap columns NaN (every byte 0xFF).
std::vector<float> strided_x0(int M, int C, int ld, uint64_t seed) {
  std::vector<float> x = normal(size_t(M) * ld, seed);
  float nan;
  std::memset(&nan, 0xFF, 4);
  for (int t = 0; t < M; ++t)
    for (int j = C; j < ld; ++j) x[size_t(t) * ld + j] = nan;
  return x;
}

// Gap columns [C, ld) of x that differ from x0's bytes (the kernel must leave them alone).
size_t gap_changed(const std::vector<float>& x, const std::vector<float>& x0, int M, int C, int ld) {
  size_t n = 0;
  for (int t = 0; t < M; ++t)
    for (int j = C; j < ld; ++j) n += std::memcmp(&x[size_t(t) * ld + j], &x0[size_t(t) * ld + j], 4) != 0;
  return n;
}

// A device copy of v followed by `tail` poisoned elements (every byte 0xFF): rows past M that a kernel must not write.
template <class T>
DeviceBuffer<T> with_tail(const std::vector<T>& v, size_t tail) {
  auto d = poisoned<T>(v.size() + tail);
  if (!v.empty()) d.upload(v.data(), v.size());
  return d;
}

// Downloads d, expects its elements from `n` on still poisoned, and returns the first n.
template <class T>
std::vector<T> download_head(const DeviceBuffer<T>& d, size_t n) {
  std::vector<T> v = d.download();
  size_t written = 0;
  for (size_t i = n; i < v.size(); ++i) {
    const auto* p = reinterpret_cast<const unsigned char*>(&v[i]);
    for (size_t k = 0; k < sizeof(T); ++k) written += p[k] != 0xFF;
  }
  EXPECT_EQ(written, 0u) << "wrote rows past M";
  v.resize(n);
  return v;
}

int count_shift(const std::vector<int8_t>& ch) {
  int n = 0;
  for (int8_t c : ch) n += c == 1;
  return n;
}
int count_invalid(const std::vector<int8_t>& ch) {
  int n = 0;
  for (int8_t c : ch) n += c != 0 && c != 1;
  return n;
}

// ---- rows_linear_ln_mask_forward ----

// a (M,K) bf16-rounded normal in rows lda = K + 8 apart (NaN gaps), W (C,K) bf16-rounded normal / sqrt(K), b small,
// x0 (M,C) normal in rows ldx apart (NaN gaps), LayerNorm weights around 1 / 0, router wr (2,C) normal / sqrt(C)
// (logits ~ N(0,1): both experts get tokens), br small; x_aug rows ldxa = Ka + 16 apart.
struct LinCase {
  int M = 0, K = 0, C = 0, lda = 0, ldx = 0, ldxa = 0;
  std::vector<float> af, wf;  // a (M,K), W (C,K): the bf16 values, as floats
  std::vector<bf16> a, w;     // a (M,lda), W (C,K)
  std::vector<float> b, x0, lw, lb, wr, br;
};

LinCase lin_case(int M, int K, int C, uint64_t seed) {
  LinCase c;
  c.M = M, c.K = K, c.C = C, c.lda = K + 8, c.ldx = round_up8(C) + 8, c.ldxa = cuda::moe_masked_cols(C) + 16;
  c.af = round_bf16(normal(size_t(M) * K, seed));
  c.wf = round_bf16(normal(size_t(C) * K, seed + 1, 1.0f / std::sqrt(float(K))));
  c.a = strided_bf16(c.af, M, K, c.lda);
  c.w = sav::cuda::to_bf16(c.wf.data(), c.wf.size());
  c.b = normal(C, seed + 2, 0.1f);
  c.x0 = strided_x0(M, C, c.ldx, seed + 3);
  c.lw = uniform(C, seed + 4, 0.5f, 1.5f);
  c.lb = uniform(C, seed + 5, -0.5f, 0.5f);
  c.wr = normal(size_t(2) * C, seed + 6, 1.0f / std::sqrt(float(C)));
  c.br = normal(2, seed + 7, 0.1f);
  return c;
}

// The first n rows of image r0.. (same weights).
LinCase lin_rows(const LinCase& c, int r0, int n) {
  LinCase s = c;
  s.M = n;
  s.af = rows_of(c.af, c.K, r0, n);
  s.a = rows_of(c.a, c.lda, r0, n);
  s.x0 = rows_of(c.x0, c.ldx, r0, n);
  return s;
}

struct LinDev {
  DeviceBuffer<bf16> w;
  DeviceBuffer<float> b, lw, lb, wr, br;
  explicit LinDev(const LinCase& c)
      : w(upload(c.w)), b(upload(c.b)), lw(upload(c.lw)), lb(upload(c.lb)), wr(upload(c.wr)), br(upload(c.br)) {}
};

struct LinOut {
  std::vector<float> x;
  std::vector<bf16> xa;
  std::vector<int8_t> ch;
};

// One launch from x0 (x_aug and the choices poisoned).
LinOut run_lin(const LinCase& c, const LinDev& d, int cluster) {
  auto da = upload(c.a);
  auto dx = with_tail(c.x0, size_t(kTail) * c.ldx);
  auto dxa = poisoned<bf16>(size_t(c.M + kTail) * c.ldxa);
  auto dch = poisoned<int8_t>(c.M + kTail);
  cuda::rows_linear_ln_mask_forward(dx.get(), c.ldx, da.get(), c.lda, d.w.get(), d.b.get(), c.M, c.K, c.C, d.lw.get(),
                                    d.lb.get(), kEps, d.wr.get(), d.br.get(), dxa.get(), c.ldxa, dch.get(), nullptr,
                                    cluster);
  device_sync();
  return {download_head(dx, c.x0.size()), download_head(dxa, size_t(c.M) * c.ldxa), download_head(dch, c.M)};
}

// moe_ln_route_mask_forward on the rows x (M, ldx): x_aug (poisoned, ldxa) and choices.
LinOut route_ref(const LinCase& c, const LinDev& d, const std::vector<float>& x) {
  auto dx = upload(x);
  auto dxa = poisoned<bf16>(size_t(c.M) * c.ldxa);
  auto dch = poisoned<int8_t>(c.M);
  cuda::moe_ln_route_mask_forward(dxa.get(), c.ldxa, dch.get(), dx.get(), c.ldx, d.lw.get(), d.lb.get(), kEps,
                                  d.wr.get(), d.br.get(), c.M, c.C, nullptr);
  device_sync();
  return {x, dxa.download(), dch.download()};
}

// x elements (first C columns) outside the tolerance of x0 + (a W^T + b) in double (NaN counts as outside).
size_t lin_x_bad(const LinCase& c, const std::vector<float>& x) {
  size_t bad = 0;
  for (int t = 0; t < c.M; ++t)
    for (int j = 0; j < c.C; ++j) {
      double acc = 0.0, mag = 0.0;
      for (int k = 0; k < c.K; ++k) {
        const double p = double(c.af[size_t(t) * c.K + k]) * c.wf[size_t(j) * c.K + k];
        acc += p, mag += std::fabs(p);
      }
      const double x0 = c.x0[size_t(t) * c.ldx + j];
      const double ref = x0 + (acc + c.b[j]);
      const double tol = kRel * (std::fabs(x0) + mag + std::fabs(c.b[j])) + 1e-30;
      bad += !(std::fabs(double(x[size_t(t) * c.ldx + j]) - ref) <= tol);
    }
  return bad;
}

// x_aug columns past Ka that were written (poison 0xFFFF expected).
size_t xa_gap_written(const std::vector<bf16>& xa, int M, int Ka, int ldxa) {
  size_t n = 0;
  for (int t = 0; t < M; ++t)
    for (int j = Ka; j < ldxa; ++j) n += bits(xa[size_t(t) * ldxa + j]) != 0xFFFF;
  return n;
}

// A linear + LayerNorm + mask kernel's output o against its definition: x = x0 + (a W^T + b) within the tolerance
// (gap columns untouched), every choice written, x_aug and the choices bit for bit moe_ln_route_mask_forward on o.x,
// nothing written past Ka.
void expect_lin_definition(const LinCase& c, const LinDev& d, const LinOut& o) {
  EXPECT_EQ(lin_x_bad(c, o.x), 0u) << "x differs from x0 + (a W^T + b) (or not written)";
  EXPECT_EQ(gap_changed(o.x, c.x0, c.M, c.C, c.ldx), 0u) << "x's gap columns changed";
  ASSERT_EQ(count_invalid(o.ch), 0) << "choices not written";
  const LinOut r = route_ref(c, d, o.x);
  EXPECT_TRUE(bit_identical(o.xa, r.xa)) << "x_aug differs from moe_ln_route_mask_forward on the output x";
  EXPECT_TRUE(o.ch == r.ch) << "choices differ from moe_ln_route_mask_forward on the output x";
  EXPECT_EQ(xa_gap_written(o.xa, c.M, cuda::moe_masked_cols(c.C), c.ldxa), 0u) << "wrote past Ka";
}

// ---- rows_moe_residual_ln_forward ----

// h (M,K) bf16-rounded normal in rows ldh = K + 8 apart (NaN gaps); w0, w1 (C,K) bf16-rounded normal / sqrt(K),
// wr (2,K) normal / sqrt(K) (f32: moe_stack_weights splits it hi/lo); ws their stacked (Fs,K) bf16 weight; b0, b1,
// br small; x0 (M,C) normal in rows ldx apart (NaN gaps); LayerNorm weights; xn rows ldxn apart.
struct MoeCase {
  int M = 0, K = 0, C = 0, Fs = 0, ldh = 0, ldx = 0, ldxn = 0;
  std::vector<float> hf, wsf;  // h (M,K), ws (Fs,K): the bf16 values, as floats
  std::vector<bf16> h, ws;     // h (M,ldh), ws (Fs,K)
  std::vector<float> b0, b1, br, x0, lw, lb;
};

MoeCase moe_case(int M, int K, int C, uint64_t seed) {
  MoeCase c;
  c.M = M, c.K = K, c.C = C, c.Fs = cuda::moe_stack_rows(C), c.ldh = K + 8, c.ldx = c.ldxn = round_up8(C) + 8;
  const float ws_std = 1.0f / std::sqrt(float(K));
  c.hf = round_bf16(normal(size_t(M) * K, seed));
  const std::vector<float> w0 = round_bf16(normal(size_t(C) * K, seed + 1, ws_std));
  const std::vector<float> w1 = round_bf16(normal(size_t(C) * K, seed + 2, ws_std));
  const std::vector<float> wr = normal(size_t(2) * K, seed + 3, ws_std);
  c.ws = cuda::moe_stack_weights(w0.data(), w1.data(), wr.data(), C, K);
  c.wsf = sav::cuda::from_bf16(c.ws);
  c.h = strided_bf16(c.hf, M, K, c.ldh);
  c.b0 = normal(C, seed + 4, 0.1f);
  c.b1 = normal(C, seed + 5, 0.1f);
  c.br = normal(2, seed + 6, 0.1f);
  c.x0 = strided_x0(M, C, c.ldx, seed + 7);
  c.lw = uniform(C, seed + 8, 0.5f, 1.5f);
  c.lb = uniform(C, seed + 9, -0.5f, 0.5f);
  return c;
}

MoeCase moe_rows(const MoeCase& c, int r0, int n) {
  MoeCase s = c;
  s.M = n;
  s.hf = rows_of(c.hf, c.K, r0, n);
  s.h = rows_of(c.h, c.ldh, r0, n);
  s.x0 = rows_of(c.x0, c.ldx, r0, n);
  return s;
}

struct MoeDev {
  DeviceBuffer<bf16> ws;
  DeviceBuffer<float> b0, b1, br, lw, lb;
  explicit MoeDev(const MoeCase& c)
      : ws(upload(c.ws)), b0(upload(c.b0)), b1(upload(c.b1)), br(upload(c.br)), lw(upload(c.lw)), lb(upload(c.lb)) {}
};

struct MoeOut {
  std::vector<float> x;
  std::vector<bf16> xn;
  std::vector<int8_t> ch;  // empty: run without a choice pointer
};

// One launch from x0 (xn and the choices poisoned).
MoeOut run_moe(const MoeCase& c, const MoeDev& d, cuda::MoeGate gate, int cluster, bool with_choice = true) {
  auto dh = upload(c.h);
  auto dx = with_tail(c.x0, size_t(kTail) * c.ldx);
  auto dxn = poisoned<bf16>(size_t(c.M + kTail) * c.ldxn);
  auto dch = poisoned<int8_t>(c.M + kTail);
  cuda::rows_moe_residual_ln_forward(dx.get(), c.ldx, with_choice ? dch.get() : nullptr, dh.get(), c.ldh, d.ws.get(),
                                     d.b0.get(), d.b1.get(), d.br.get(), c.M, c.K, c.C, gate, dxn.get(), c.ldxn,
                                     d.lw.get(), d.lb.get(), kEps, nullptr, cluster);
  device_sync();
  MoeOut o{download_head(dx, c.x0.size()), download_head(dxn, size_t(c.M) * c.ldxn), {}};
  const std::vector<int8_t> ch = download_head(dch, c.M);
  if (with_choice) o.ch = ch;
  return o;
}

// s (M,Fs) = h ws^T in double from the bf16 values, and sum_k |h_k ws_jk| per element.
struct MoeProduct {
  std::vector<double> s, mag;
};
MoeProduct moe_product(const MoeCase& c) {
  MoeProduct p{std::vector<double>(size_t(c.M) * c.Fs), std::vector<double>(size_t(c.M) * c.Fs)};
  for (int t = 0; t < c.M; ++t)
    for (int j = 0; j < c.Fs; ++j) {
      double acc = 0.0, mag = 0.0;
      for (int k = 0; k < c.K; ++k) {
        const double q = double(c.hf[size_t(t) * c.K + k]) * c.wsf[size_t(j) * c.K + k];
        acc += q, mag += std::fabs(q);
      }
      p.s[size_t(t) * c.Fs + j] = acc, p.mag[size_t(t) * c.Fs + j] = mag;
    }
  return p;
}

// The reference: moe_epilogue_residual_ln_forward on s rounded to f32 (lds = Fs), from x0.
MoeOut moe_ref(const MoeCase& c, const MoeDev& d, const MoeProduct& p, cuda::MoeGate gate) {
  std::vector<float> sf(p.s.begin(), p.s.end());
  auto ds = upload(sf);
  auto dx = upload(c.x0);
  auto dxn = poisoned<bf16>(size_t(c.M) * c.ldxn);
  auto dch = poisoned<int8_t>(c.M);
  cuda::moe_epilogue_residual_ln_forward(dx.get(), c.ldx, dch.get(), ds.get(), c.Fs, d.b0.get(), d.b1.get(), d.br.get(),
                                         c.M, c.C, gate, dxn.get(), c.ldxn, d.lw.get(), d.lb.get(), kEps, nullptr);
  device_sync();
  return {dx.download(), dxn.download(), dch.download()};
}

// layernorm_forward of the rows x (M, ldx) into poisoned rows ldxn apart.
std::vector<bf16> layernorm_of(const MoeCase& c, const MoeDev& d, const std::vector<float>& x) {
  auto dx = upload(x);
  auto dxn = poisoned<bf16>(size_t(c.M) * c.ldxn);
  cuda::layernorm_forward(dxn.get(), c.ldxn, dx.get(), c.ldx, d.lw.get(), d.lb.get(), c.M, c.C, kEps, nullptr);
  device_sync();
  return dxn.download();
}

struct MoeCheck {
  int ambiguous = 0, wrong = 0, flipped = 0;
  size_t x_bad = 0;
};

// The kernel's choices and x against the reference (header: ambiguous rows may route either way; x compared on the
// rows routed alike).
MoeCheck check_moe(const MoeCase& c, const MoeProduct& p, cuda::MoeGate gate, const MoeOut& got, const MoeOut& ref) {
  MoeCheck r;
  const int C = c.C, Fs = c.Fs;
  for (int t = 0; t < c.M; ++t) {
    const double* s = p.s.data() + size_t(t) * Fs;
    const double* mag = p.mag.data() + size_t(t) * Fs;
    double l[2], scale = 0.0;
    for (int e = 0; e < 2; ++e) {
      l[e] = s[2 * C + e] + s[2 * C + 2 + e] + c.br[e];
      scale += mag[2 * C + e] + mag[2 * C + 2 + e] + std::fabs(c.br[e]);
    }
    const bool amb = std::fabs(l[1] - l[0]) <= kAmbiguous * scale;
    r.ambiguous += amb;
    if (got.ch[t] != ref.ch[t]) {
      ++r.flipped;
      r.wrong += !amb;
      continue;
    }
    const int e = ref.ch[t];
    const std::vector<float>& be = e ? c.b1 : c.b0;
    const double dgate = gate == cuda::moe_gate_prob ? 2 * kRel * scale : 0.0;  // relative change of the probability
    for (int j = 0; j < C; ++j) {
      const size_t i = size_t(t) * c.ldx + j;
      const double magy = mag[size_t(e) * C + j] + std::fabs(be[j]);
      const double tol = kRel * (std::fabs(c.x0[i]) + magy) + magy * dgate + 1e-30;
      r.x_bad += !(std::fabs(double(got.x[i]) - ref.x[i]) <= tol);
    }
  }
  return r;
}

}  // namespace

// The DeiT-Tiny shapes run at cluster 8, the launcher's pick is a valid cluster size, and the documented limits.
TEST_F(RowsFused, SupportsDeiTTinyAndLimits) {
  EXPECT_TRUE(cuda::rows_fused_supports(192, 192, 192, 8)) << "DeiT-Tiny proj";
  EXPECT_TRUE(cuda::rows_fused_supports(768, 192, cuda::moe_stack_rows(192), 8)) << "DeiT-Tiny fc2";
  for (const int M : {1, 15, 16, 17, 197, 394, 4096}) {
    const int g = cuda::rows_fused_cluster(M);
    EXPECT_TRUE(g == 1 || g == 2 || g == 4 || g == 8) << "M=" << M << ": cluster " << g;
  }
  EXPECT_FALSE(cuda::rows_fused_supports(192, 192, 192, 3)) << "cluster 3";
  EXPECT_FALSE(cuda::rows_fused_supports(192, 192, 192, 16)) << "cluster 16";
  EXPECT_FALSE(cuda::rows_fused_supports(196, 192, 192, 8)) << "K % 8 != 0";
  EXPECT_FALSE(cuda::rows_fused_supports(192, 190, 190, 8)) << "C % 4 != 0";
  EXPECT_FALSE(cuda::rows_fused_supports(192, 1028, 1028, 8)) << "C > 1024";
  EXPECT_FALSE(cuda::rows_fused_supports(8192, 1024, 1024, 1)) << "a 16 MB weight slice in shared memory";
}

// rows_linear_ln_mask_forward: x against x0 + (a W^T + b) in double (header tolerance), every element written and
// the gap columns untouched; x_aug and the choices bit for bit moe_ln_route_mask_forward on the kernel's output x
// (columns past Ka untouched); both experts used; every supported cluster size, the launcher's pick and a rerun
// give the same bits.
TEST_F(RowsFused, LinearLnMaskMatchesDefinition) {
  struct Case {
    int M, K, C;
  };
  for (const Case cs : {Case{197, 192, 192}, Case{1, 192, 192}, Case{15, 264, 200}, Case{16, 776, 388},
                        Case{17, 192, 516}, Case{37, 264, 388}, Case{197, 776, 200}, Case{37, 192, 1024}}) {
    const int M = cs.M, K = cs.K, C = cs.C;
    SCOPED_TRACE(dims({{"M", M}, {"K", K}, {"C", C}}));
    const LinCase c = lin_case(M, K, C, 1000 + 7 * M + K + C);
    const LinDev d(c);
    std::optional<LinOut> first;
    std::string skipped;
    for (const int g : kClusters) {
      SCOPED_TRACE(dims({{"cluster", g}}));
      if (!cuda::rows_fused_supports(K, C, C, g)) {
        skipped += " " + std::to_string(g);
        continue;
      }
      const LinOut o = run_lin(c, d, g);
      if (first) {
        EXPECT_TRUE(bit_identical(o.x, first->x)) << "x depends on the cluster size";
        EXPECT_TRUE(bit_identical(o.xa, first->xa)) << "x_aug depends on the cluster size";
        EXPECT_TRUE(o.ch == first->ch) << "choices depend on the cluster size";
        continue;
      }
      expect_lin_definition(c, d, o);
      if (M >= 37) {
        const int to_shift = count_shift(o.ch);
        EXPECT_GT(to_shift, M / 5) << "both experts should get tokens";
        EXPECT_LT(to_shift, M - M / 5);
      }
      const LinOut again = run_lin(c, d, g);
      EXPECT_TRUE(bit_identical(again.x, o.x) && bit_identical(again.xa, o.xa) && again.ch == o.ch) << "rerun differs";
      first = o;
    }
    ASSERT_TRUE(first.has_value()) << "no cluster size supports the shape";
    const int pick = cuda::rows_fused_cluster(M);
    if (cuda::rows_fused_supports(K, C, C, pick)) {
      const LinOut o = run_lin(c, d, 0);
      EXPECT_TRUE(bit_identical(o.x, first->x) && bit_identical(o.xa, first->xa) && o.ch == first->ch)
          << "cluster 0 (the launcher's pick, " << pick << ") differs";
    }
    if (!skipped.empty()) std::printf("[ info ] M=%d K=%d C=%d: clusters not supported:%s\n", M, K, C, skipped.c_str());
  }
}

// rows_moe_residual_ln_forward against moe_epilogue_residual_ln_forward on s = h ws^T computed in double (header):
// choices equal except on ambiguous rows, x within the tolerance on the rows routed alike (the gap columns
// untouched everywhere), xn bit for bit layernorm_forward of the kernel's own x (gap columns untouched); both
// gates; every supported cluster size, the launcher's pick, a rerun and a null choice pointer give the same bits.
TEST_F(RowsFused, MoeResidualLnMatchesDefinition) {
  struct Case {
    int M, K, C;
  };
  for (const Case cs : {Case{197, 768, 192}, Case{197, 192, 192}, Case{1, 264, 200}, Case{15, 264, 388},
                        Case{16, 192, 516}, Case{17, 776, 200}, Case{37, 264, 516}, Case{197, 264, 388}}) {
    const int M = cs.M, K = cs.K, C = cs.C, Fs = cuda::moe_stack_rows(C);
    const MoeCase c = moe_case(M, K, C, 2000 + 7 * M + K + C);
    const MoeDev d(c);
    const MoeProduct p = moe_product(c);
    for (const auto gate : {cuda::moe_gate_straight_through, cuda::moe_gate_prob}) {
      SCOPED_TRACE(dims({{"M", M}, {"K", K}, {"C", C}, {"gate", int(gate)}}));
      const MoeOut ref = moe_ref(c, d, p, gate);
      std::optional<MoeOut> first;
      std::string skipped;
      for (const int g : kClusters) {
        SCOPED_TRACE(dims({{"cluster", g}}));
        if (!cuda::rows_fused_supports(K, C, Fs, g)) {
          skipped += " " + std::to_string(g);
          continue;
        }
        const MoeOut o = run_moe(c, d, gate, g);
        if (first) {
          EXPECT_TRUE(bit_identical(o.x, first->x)) << "x depends on the cluster size";
          EXPECT_TRUE(bit_identical(o.xn, first->xn)) << "xn depends on the cluster size";
          EXPECT_TRUE(o.ch == first->ch) << "choices depend on the cluster size";
          continue;
        }
        ASSERT_EQ(count_invalid(o.ch), 0) << "choices not written";
        const MoeCheck r = check_moe(c, p, gate, o, ref);
        EXPECT_EQ(r.wrong, 0) << "routing differs from the reference on unambiguous rows (" << r.ambiguous
                              << " ambiguous)";
        EXPECT_LE(r.ambiguous, 1 + M / 50) << "too many near-ties for random logits";
        EXPECT_EQ(r.x_bad, 0u) << "x differs from the reference (or not written)";
        EXPECT_EQ(gap_changed(o.x, c.x0, M, C, c.ldx), 0u) << "x's gap columns changed";
        EXPECT_TRUE(bit_identical(o.xn, layernorm_of(c, d, o.x)))
            << "xn differs from layernorm_forward of the output x (or its gap columns were written)";
        if (M >= 37) {
          const int to_shift = count_shift(o.ch);
          EXPECT_GT(to_shift, M / 5) << "both experts should get tokens";
          EXPECT_LT(to_shift, M - M / 5);
        }
        if (r.flipped) std::printf("[ info ] M=%d K=%d C=%d: %d near-tie rows routed otherwise\n", M, K, C, r.flipped);
        const MoeOut again = run_moe(c, d, gate, g);
        EXPECT_TRUE(bit_identical(again.x, o.x) && bit_identical(again.xn, o.xn) && again.ch == o.ch)
            << "rerun differs";
        const MoeOut nochoice = run_moe(c, d, gate, g, false);
        EXPECT_TRUE(bit_identical(nochoice.x, o.x) && bit_identical(nochoice.xn, o.xn))
            << "a null choice pointer changes the outputs";
        first = o;
      }
      ASSERT_TRUE(first.has_value()) << "no cluster size supports the shape";
      const int pick = cuda::rows_fused_cluster(M);
      if (cuda::rows_fused_supports(K, C, Fs, pick)) {
        const MoeOut o = run_moe(c, d, gate, 0);
        EXPECT_TRUE(bit_identical(o.x, first->x) && bit_identical(o.xn, first->xn) && o.ch == first->ch)
            << "cluster 0 (the launcher's pick, " << pick << ") differs";
      }
      if (!skipped.empty())
        std::printf("[ info ] M=%d K=%d C=%d: clusters not supported:%s\n", M, K, C, skipped.c_str());
    }
  }
}

// Two images (M = 394) give each image's bits of a run on that image's 197 rows alone (the sums do not depend on
// M), at cluster 8 (DeiT-Tiny's proj and fc2 shapes) and at the launcher's pick where supported.
TEST_F(RowsFused, BatchIndependent) {
  const int N = 197, M = 2 * N;
  {
    const int K = 192, C = 192;
    ASSERT_TRUE(cuda::rows_fused_supports(K, C, C, 8));
    const LinCase c = lin_case(M, K, C, 3001);
    const LinDev d(c);
    for (const int g : {8, 0}) {
      if (g == 0 && !(cuda::rows_fused_supports(K, C, C, cuda::rows_fused_cluster(M)) &&
                      cuda::rows_fused_supports(K, C, C, cuda::rows_fused_cluster(N))))
        continue;
      SCOPED_TRACE(dims({{"linear_ln_mask cluster", g}}));
      const LinOut both = run_lin(c, d, g);
      for (int img = 0; img < 2; ++img) {
        SCOPED_TRACE(dims({{"image", img}}));
        const LinOut one = run_lin(lin_rows(c, img * N, N), d, g);
        EXPECT_TRUE(bit_identical(one.x, rows_of(both.x, c.ldx, img * N, N))) << "x depends on the batch";
        EXPECT_TRUE(bit_identical(one.xa, rows_of(both.xa, c.ldxa, img * N, N))) << "x_aug depends on the batch";
        EXPECT_TRUE(one.ch == rows_of(both.ch, 1, img * N, N)) << "choices depend on the batch";
      }
    }
  }
  {
    const int K = 768, C = 192, Fs = cuda::moe_stack_rows(C);
    ASSERT_TRUE(cuda::rows_fused_supports(K, C, Fs, 8));
    const MoeCase c = moe_case(M, K, C, 3002);
    const MoeDev d(c);
    for (const auto gate : {cuda::moe_gate_straight_through, cuda::moe_gate_prob})
      for (const int g : {8, 0}) {
        if (g == 0 && !(cuda::rows_fused_supports(K, C, Fs, cuda::rows_fused_cluster(M)) &&
                        cuda::rows_fused_supports(K, C, Fs, cuda::rows_fused_cluster(N))))
          continue;
        SCOPED_TRACE(dims({{"moe_residual_ln cluster", g}, {"gate", int(gate)}}));
        const MoeOut both = run_moe(c, d, gate, g);
        for (int img = 0; img < 2; ++img) {
          SCOPED_TRACE(dims({{"image", img}}));
          const MoeOut one = run_moe(moe_rows(c, img * N, N), d, gate, g);
          EXPECT_TRUE(bit_identical(one.x, rows_of(both.x, c.ldx, img * N, N))) << "x depends on the batch";
          EXPECT_TRUE(bit_identical(one.xn, rows_of(both.xn, c.ldxn, img * N, N))) << "xn depends on the batch";
          EXPECT_TRUE(one.ch == rows_of(both.ch, 1, img * N, N)) << "choices depend on the batch";
        }
      }
  }
}

// Bad arguments throw sav::Error before any launch: null pointers, K % 8 != 0, C % 4 != 0, C > 1024, strides below
// the width, a bf16 input stride (lda, ldh) not a multiple of 8 elements, pointers one element off their
// alignment, cluster sizes 3 and 16, a shape rows_fused_supports refuses, an unknown gate. M = 0 is a no-op. (Every
// buffer is large enough for the largest bad call, so a missing check reads and writes inside allocations.)
TEST_F(RowsFused, BadArgumentsThrow) {
  DeviceBuffer<float> x(1 << 15), b(1 << 13), b1(1 << 13), lw(1 << 13), lb(1 << 13), wr(1 << 13), br(1 << 13);
  DeviceBuffer<bf16> a(1 << 17), w(1 << 23), xa(1 << 16), xn(1 << 15);
  DeviceBuffer<int8_t> ch(64);
  for (auto* buf : {&x, &b, &b1, &lw, &lb, &wr, &br}) buf->fill_bytes(0);
  for (auto* buf : {&a, &w, &xa, &xn}) buf->fill_bytes(0);
  ch.fill_bytes(0);

  struct LinArgs {
    float* x;
    int ldx;
    const bf16* a;
    int lda;
    const bf16* w;
    int M, K, C;
    const float* lw;
    const float* wr;
    bf16* xa;
    int ldxa, cluster;
  };
  auto lin = [&](const LinArgs& p) {
    cuda::rows_linear_ln_mask_forward(p.x, p.ldx, p.a, p.lda, p.w, b.get(), p.M, p.K, p.C, p.lw, lb.get(), kEps, p.wr,
                                      br.get(), p.xa, p.ldxa, ch.get(), nullptr, p.cluster);
  };
  const LinArgs lbase{x.get(), 200, a.get(), 200, w.get(), 16, 192, 192, lw.get(), wr.get(), xa.get(), 416, 8};
  ASSERT_EQ(cuda::moe_masked_cols(192) + 16, lbase.ldxa);
  ASSERT_TRUE(cuda::rows_fused_supports(192, 192, 192, 8));
  ASSERT_NO_THROW(lin(lbase)) << "the valid baseline call";
  device_sync();
  auto lin_bad = [&](const char* what, auto&& mutate) {
    SCOPED_TRACE(std::string("rows_linear_ln_mask_forward: ") + what);
    LinArgs p = lbase;
    mutate(p);
    EXPECT_THROW(lin(p), sav::Error);
  };
  lin_bad("x null", [](LinArgs& p) { p.x = nullptr; });
  lin_bad("a null", [](LinArgs& p) { p.a = nullptr; });
  lin_bad("w null", [](LinArgs& p) { p.w = nullptr; });
  lin_bad("ln_w null", [](LinArgs& p) { p.lw = nullptr; });
  lin_bad("wr null", [](LinArgs& p) { p.wr = nullptr; });
  lin_bad("xa null", [](LinArgs& p) { p.xa = nullptr; });
  lin_bad("K % 8 != 0", [](LinArgs& p) { p.K = 196, p.lda = 208; });
  lin_bad("C % 4 != 0", [](LinArgs& p) { p.C = 190; });
  lin_bad("C > 1024", [](LinArgs& p) { p.C = 1028, p.ldx = 1032, p.ldxa = cuda::moe_masked_cols(1028) + 16; });
  lin_bad("ldx < C", [](LinArgs& p) { p.ldx = 184; });
  lin_bad("lda < K", [](LinArgs& p) { p.lda = 184; });
  lin_bad("lda % 8 != 0", [](LinArgs& p) { p.lda = 196; });
  lin_bad("ldxa < Ka", [](LinArgs& p) { p.ldxa = cuda::moe_masked_cols(192) - 16; });
  lin_bad("x misaligned", [](LinArgs& p) { p.x += 1; });
  lin_bad("a misaligned", [](LinArgs& p) { p.a += 1; });
  lin_bad("w misaligned", [](LinArgs& p) { p.w += 1; });
  lin_bad("xa misaligned", [](LinArgs& p) { p.xa += 1; });
  lin_bad("cluster 3", [](LinArgs& p) { p.cluster = 3; });
  lin_bad("cluster 16", [](LinArgs& p) { p.cluster = 16; });
  ASSERT_FALSE(cuda::rows_fused_supports(4096, 1024, 1024, 1));
  lin_bad("unsupported shape", [](LinArgs& p) {
    p.K = 4096, p.lda = 4104, p.C = 1024, p.ldx = 1032, p.ldxa = cuda::moe_masked_cols(1024), p.cluster = 1;
  });
  {
    LinArgs p = lbase;
    p.M = 0;
    EXPECT_NO_THROW(lin(p)) << "M = 0 is a no-op";
    device_sync();
  }

  struct MoeArgs {
    float* x;
    int ldx;
    const bf16* h;
    int ldh;
    const bf16* ws;
    const float* b0;
    int M, K, C;
    cuda::MoeGate gate;
    bf16* xn;
    int ldxn;
    const float* lw;
    int cluster;
  };
  auto moe = [&](const MoeArgs& p) {
    cuda::rows_moe_residual_ln_forward(p.x, p.ldx, ch.get(), p.h, p.ldh, p.ws, p.b0, b1.get(), br.get(), p.M, p.K, p.C,
                                       p.gate, p.xn, p.ldxn, p.lw, lb.get(), kEps, nullptr, p.cluster);
  };
  const MoeArgs mbase{x.get(),  200, a.get(),  776, w.get(), b.get(), 16, 768, 192, cuda::moe_gate_straight_through,
                      xn.get(), 200, lw.get(), 8};
  ASSERT_TRUE(cuda::rows_fused_supports(768, 192, cuda::moe_stack_rows(192), 8));
  ASSERT_NO_THROW(moe(mbase)) << "the valid baseline call";
  device_sync();
  auto moe_bad = [&](const char* what, auto&& mutate) {
    SCOPED_TRACE(std::string("rows_moe_residual_ln_forward: ") + what);
    MoeArgs p = mbase;
    mutate(p);
    EXPECT_THROW(moe(p), sav::Error);
  };
  moe_bad("x null", [](MoeArgs& p) { p.x = nullptr; });
  moe_bad("h null", [](MoeArgs& p) { p.h = nullptr; });
  moe_bad("ws null", [](MoeArgs& p) { p.ws = nullptr; });
  moe_bad("b0 null", [](MoeArgs& p) { p.b0 = nullptr; });
  moe_bad("xn null", [](MoeArgs& p) { p.xn = nullptr; });
  moe_bad("ln_w null", [](MoeArgs& p) { p.lw = nullptr; });
  moe_bad("K % 8 != 0", [](MoeArgs& p) { p.K = 772, p.ldh = 784; });
  moe_bad("C % 4 != 0", [](MoeArgs& p) { p.C = 190; });
  moe_bad("C > 1024", [](MoeArgs& p) { p.C = 1028, p.ldx = 1032, p.ldxn = 1032; });
  moe_bad("ldx < C", [](MoeArgs& p) { p.ldx = 184; });
  moe_bad("ldh < K", [](MoeArgs& p) { p.ldh = 760; });
  moe_bad("ldh % 8 != 0", [](MoeArgs& p) { p.ldh = 772; });
  moe_bad("ldxn < C", [](MoeArgs& p) { p.ldxn = 184; });
  moe_bad("x misaligned", [](MoeArgs& p) { p.x += 1; });
  moe_bad("h misaligned", [](MoeArgs& p) { p.h += 1; });
  moe_bad("ws misaligned", [](MoeArgs& p) { p.ws += 1; });
  moe_bad("xn misaligned", [](MoeArgs& p) { p.xn += 1; });
  moe_bad("cluster 3", [](MoeArgs& p) { p.cluster = 3; });
  moe_bad("cluster 16", [](MoeArgs& p) { p.cluster = 16; });
  moe_bad("unknown gate", [](MoeArgs& p) { p.gate = static_cast<cuda::MoeGate>(2); });
  ASSERT_FALSE(cuda::rows_fused_supports(2048, 1024, cuda::moe_stack_rows(1024), 1));
  moe_bad("unsupported shape",
          [](MoeArgs& p) { p.K = 2048, p.ldh = 2056, p.C = 1024, p.ldx = 1032, p.ldxn = 1032, p.cluster = 1; });
  {
    MoeArgs p = mbase;
    p.M = 0;
    EXPECT_NO_THROW(moe(p)) << "M = 0 is a no-op";
    device_sync();
  }
}

// hamming_attention_proj_ln_mask_forward (ops.h): a = hamming_attention_forward_ld's output on the same inputs (the
// same code, its bf16 values), then x against x0 + (a W^T + b) in double within kRel (lin_x_bad), the gap columns
// and the rows past M untouched, x_aug and the choices bit for bit moe_ln_route_mask_forward on the kernel's own x;
// a rerun gives the same bits; images of a batch of two equal single-image runs; unsupported sizes throw.
TEST_F(RowsFused, HammingProjLnMaskMatchesDefinition) {
  struct Case {
    int B, N, C, H, nbits, m;
  };
  for (const Case cs : {Case{1, 197, 192, 3, 16, 25}, Case{2, 197, 192, 3, 16, 25}, Case{1, 50, 96, 3, 16, 25},
                        Case{1, 37, 128, 4, 8, 9}}) {
    const int B = cs.B, N = cs.N, C = cs.C, H = cs.H, M = B * N;
    SCOPED_TRACE(dims({{"B", B}, {"N", N}, {"C", C}, {"H", H}}));
    ASSERT_TRUE(cuda::hamming_attention_proj_supports(B, N, C, H, cs.nbits, cs.m));
    // qk, v (M, C) bf16 in one (M, 2C) buffer; KSH weights fitted to qk
    const std::vector<float> qkv = round_bf16(normal(size_t(M) * 2 * C, 900 + N, 0.7f));
    std::vector<float> qk(size_t(M) * C);
    for (int r = 0; r < M; ++r)
      for (int j = 0; j < C; ++j) qk[size_t(r) * C + j] = qkv[size_t(r) * 2 * C + j];
    const KshWeights kw = fitted_ksh_weights<double>(qk, N, C, H, cs.nbits, cs.m, 31 + N);
    auto dqkv = upload_as<bf16>(qkv);
    auto da = upload(kw.anchors), dmu = upload(kw.mu), dA = upload(kw.A), dconv = upload(kw.conv);
    DeviceBuffer<unsigned char> prep(cuda::hamming_attention_prepared_bytes(C, H, cs.nbits));
    cuda::hamming_attention_prepare(prep.get(), da.get(), dmu.get(), dA.get(), C, H, cs.nbits, cs.m, nullptr);
    auto dao = poisoned<bf16>(size_t(M) * C);
    cuda::hamming_attention_forward_ld(dao.get(), C, dqkv.get(), 2 * C, dqkv.get() + C, 2 * C, prep.get(), dconv.get(),
                                       B, N, C, H, cs.nbits, cs.m, nullptr);
    device_sync();
    // the linear case with a = the attention output
    LinCase c = lin_case(M, C, C, 4000 + N + C);
    c.af = download_f32(dao);
    c.a = sav::cuda::to_bf16(c.af.data(), c.af.size()), c.lda = C;
    const LinDev d(c);
    auto run = [&](int b0, int nb) {
      const int Mr = nb * N;
      std::vector<float> x0(c.x0.begin() + size_t(b0) * N * c.ldx, c.x0.begin() + size_t(b0 + nb) * N * c.ldx);
      auto dx = with_tail(x0, size_t(kTail) * c.ldx);
      auto dxa = poisoned<bf16>(size_t(Mr + kTail) * c.ldxa);
      auto dch = poisoned<int8_t>(Mr + kTail);
      const size_t off = size_t(b0) * N * 2 * C;
      cuda::hamming_attention_proj_ln_mask_forward(dx.get(), c.ldx, dqkv.get() + off, 2 * C, dqkv.get() + off + C,
                                                   2 * C, prep.get(), dconv.get(), d.w.get(), d.b.get(), d.lw.get(),
                                                   d.lb.get(), kEps, d.wr.get(), d.br.get(), dxa.get(), c.ldxa,
                                                   dch.get(), nb, N, C, H, cs.nbits, cs.m, nullptr);
      device_sync();
      return LinOut{download_head(dx, x0.size()), download_head(dxa, size_t(Mr) * c.ldxa), download_head(dch, Mr)};
    };
    const LinOut o = run(0, B);
    expect_lin_definition(c, d, o);
    const LinOut again = run(0, B);
    EXPECT_TRUE(bit_identical(again.x, o.x) && bit_identical(again.xa, o.xa) && again.ch == o.ch) << "rerun differs";
    if (B == 2) {
      const LinOut one = run(1, 1);
      EXPECT_TRUE(bit_identical(one.x, rows_of(o.x, c.ldx, N, N))) << "image 1 alone differs from the batch";
      EXPECT_TRUE(bit_identical(one.xa, rows_of(o.xa, c.ldxa, N, N)) && one.ch == rows_of(o.ch, 1, N, N));
    }
  }
  EXPECT_FALSE(cuda::hamming_attention_proj_supports(8, 197, 192, 3, 16, 25)) << "several tiles per CTA";
  EXPECT_FALSE(cuda::hamming_attention_proj_supports(1, 197, 384, 6, 16, 25)) << "C > 256";
  EXPECT_FALSE(cuda::hamming_attention_proj_supports(1, 197, 192, 12, 16, 25)) << "H > 8";
  DeviceBuffer<float> f(64);
  DeviceBuffer<bf16> h(64);
  EXPECT_THROW(cuda::hamming_attention_proj_ln_mask_forward(f.get(), 192, h.get(), 384, h.get(), 384, f.get(), f.get(),
                                                            h.get(), f.get(), f.get(), f.get(), kEps, f.get(), f.get(),
                                                            h.get(), 400, nullptr, 8, 197, 192, 3, 16, 25, nullptr),
               Error);
}

// Not an assertion: DeiT-Tiny batch 1, the fused Hamming + proj + LN2 + router + mask kernel against the three kernels
// it replaces (Hamming attention, the cuBLASLt proj with its residual, moe_ln_route_mask_forward), each sequence 12
// times in one graph; us per sequence.
TEST_F(RowsFused, HammingProjTimingPrinted) {
  const int B = 1, N = 197, C = 192, H = 3, nb = 16, m = 25, M = B * N;
  const std::vector<float> qkv = round_bf16(normal(size_t(M) * 2 * C, 5, 0.7f));
  std::vector<float> qk(size_t(M) * C);
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < C; ++j) qk[size_t(r) * C + j] = qkv[size_t(r) * 2 * C + j];
  const KshWeights kw = fitted_ksh_weights<double>(qk, N, C, H, nb, m, 9);
  auto dqkv = upload_as<bf16>(qkv);
  auto da = upload(kw.anchors), dmu = upload(kw.mu), dA = upload(kw.A), dconv = upload(kw.conv);
  DeviceBuffer<unsigned char> prep(cuda::hamming_attention_prepared_bytes(C, H, nb));
  cuda::hamming_attention_prepare(prep.get(), da.get(), dmu.get(), dA.get(), C, H, nb, m, nullptr);
  const LinCase c = lin_case(M, C, C, 77);
  const LinDev d(c);
  auto dx = upload(c.x0);
  auto dxa = poisoned<bf16>(size_t(M) * c.ldxa);
  auto dch = poisoned<int8_t>(M);
  DeviceBuffer<bf16> ao(size_t(M) * C);
  DeviceBuffer<float> xc(size_t(M) * C);
  SAV_CUDA_CHECK(cudaMemset(xc.get(), 0, xc.bytes()));
  cuda::Gemm gemm;
  cuda::Stream st;
  auto separate = [&](cudaStream_t s) {
    cuda::hamming_attention_forward_ld(ao.get(), C, dqkv.get(), 2 * C, dqkv.get() + C, 2 * C, prep.get(), dconv.get(),
                                       B, N, C, H, nb, m, s);
    gemm.linear_f32(xc.get(), ao.get(), d.w.get(), d.b.get(), M, C, C, true, s);
    cuda::moe_ln_route_mask_forward(dxa.get(), c.ldxa, dch.get(), xc.get(), C, d.lw.get(), d.lb.get(), kEps, d.wr.get(),
                                    d.br.get(), M, C, s);
  };
  auto fused = [&](cudaStream_t s) {
    cuda::hamming_attention_proj_ln_mask_forward(
        dx.get(), c.ldx, dqkv.get(), 2 * C, dqkv.get() + C, 2 * C, prep.get(), dconv.get(), d.w.get(), d.b.get(),
        d.lw.get(), d.lb.get(), kEps, d.wr.get(), d.br.get(), dxa.get(), c.ldxa, dch.get(), B, N, C, H, nb, m, s);
  };
  auto ham = [&](cudaStream_t s) {
    cuda::hamming_attention_forward_ld(ao.get(), C, dqkv.get(), 2 * C, dqkv.get() + C, 2 * C, prep.get(), dconv.get(),
                                       B, N, C, H, nb, m, s);
  };
  separate(st.get());
  fused(st.get());
  device_sync();
  const double us_sep = cuda::median_graph_us(separate, st.get(), 12, 21);
  const double us_fused = cuda::median_graph_us(fused, st.get(), 12, 21);
  const double us_ham = cuda::median_graph_us(ham, st.get(), 12, 21);
  std::printf(
      "[ hamming+proj ] DeiT-Tiny b1, us per sequence in a graph of 12: Hamming alone %.2f, Hamming + proj + "
      "LN/router/mask kernels %.2f, fused %.2f\n",
      us_ham, us_sep, us_fused);
  EXPECT_GT(us_fused, 0.0);
}

// ---- hamming_block_forward: to_qk / to_v + Hamming attention + proj + LN2 + router + mask in one kernel ----

// The inputs of one attention sub-block: xn (M,C) bf16-rounded normal in rows ldxn = C + 8 apart, wqkv (2C,C)
// bf16-rounded normal / sqrt(C), bqkv (2C) bf16-rounded small; KSH weights fitted to the exact qk; proj, LayerNorm
// and router as lin_case.
struct BlockCase {
  int B = 0, N = 0, C = 0, H = 0, nbits = 0, m = 0, ldxn = 0;
  std::vector<float> xnf, wf, bf;  // the bf16 values, as floats
  std::vector<double> qkv;         // (M, 2C) exact xn wqkv^T + b
  KshWeights kw;
  LinCase lin;
};

BlockCase block_case(int B, int N, int C, int H, int nbits, int m, uint64_t seed) {
  BlockCase k;
  k.B = B, k.N = N, k.C = C, k.H = H, k.nbits = nbits, k.m = m, k.ldxn = C + 8;
  const int M = B * N;
  k.xnf = round_bf16(normal(size_t(M) * C, seed));
  k.wf = round_bf16(normal(size_t(2) * C * C, seed + 1, 1.0f / std::sqrt(float(C))));
  k.bf = round_bf16(normal(size_t(2) * C, seed + 2, 0.1f));
  k.qkv.assign(size_t(M) * 2 * C, 0.0);
  std::vector<float> qk(size_t(M) * C);
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < 2 * C; ++j) {
      double acc = k.bf[j];
      for (int i = 0; i < C; ++i) acc += double(k.xnf[size_t(r) * C + i]) * k.wf[size_t(j) * C + i];
      k.qkv[size_t(r) * 2 * C + j] = acc;
      if (j < C) qk[size_t(r) * C + j] = static_cast<float>(acc);
    }
  k.kw = fitted_ksh_weights<double>(qk, N, C, H, nbits, m, seed + 3);
  k.lin = lin_case(M, C, C, seed + 4);
  return k;
}

struct BlockDev {
  DeviceBuffer<bf16> xn, w, b;
  DeviceBuffer<float> anchors, mu, A, conv;
  DeviceBuffer<unsigned char> prep;
  LinDev lin;
  explicit BlockDev(const BlockCase& k)
      : xn(upload(strided_bf16(k.xnf, k.B * k.N, k.C, k.ldxn))),
        w(upload_as<bf16>(k.wf)),
        b(upload_as<bf16>(k.bf)),
        anchors(upload(k.kw.anchors)),
        mu(upload(k.kw.mu)),
        A(upload(k.kw.A)),
        conv(upload(k.kw.conv)),
        prep(cuda::hamming_attention_prepared_bytes(k.C, k.H, k.nbits)),
        lin(k.lin) {
    cuda::hamming_attention_prepare(prep.get(), anchors.get(), mu.get(), A.get(), k.C, k.H, k.nbits, k.m, nullptr);
  }
};

struct BlockOut {
  LinOut lin;
  std::vector<bf16> qkv, ao;  // the kernel's qk | v rows (M, 2C) and attention output (M, C)
};

// Images b0 .. b0 + nb - 1 from x0 (outputs poisoned, with tails).
BlockOut run_block(const BlockCase& k, const BlockDev& d, int b0, int nb, cudaStream_t s = nullptr) {
  const LinCase& c = k.lin;
  const int N = k.N, C = k.C, Mr = nb * N;
  std::vector<float> x0(c.x0.begin() + size_t(b0) * N * c.ldx, c.x0.begin() + size_t(b0 + nb) * N * c.ldx);
  auto dx = with_tail(x0, size_t(kTail) * c.ldx);
  auto dxa = poisoned<bf16>(size_t(Mr + kTail) * c.ldxa);
  auto dch = poisoned<int8_t>(Mr + kTail);
  auto dqkv = poisoned<bf16>(size_t(Mr + kTail) * 2 * C);
  auto dao = poisoned<bf16>(size_t(Mr + kTail) * C);
  auto dv = poisoned<bf16>(cuda::hamming_block_scratch_elems(nb, N, C));
  cuda::hamming_block_forward(dx.get(), c.ldx, d.xn.get() + size_t(b0) * N * k.ldxn, k.ldxn, d.w.get(), d.b.get(),
                              d.prep.get(), d.conv.get(), d.lin.w.get(), d.lin.b.get(), d.lin.lw.get(), d.lin.lb.get(),
                              kEps, d.lin.wr.get(), d.lin.br.get(), dxa.get(), c.ldxa, dch.get(), dv.get(), nb, N, C,
                              k.H, k.nbits, k.m, s, dqkv.get(), dao.get());
  device_sync();
  BlockOut o;
  o.lin = {download_head(dx, x0.size()), download_head(dxa, size_t(Mr) * c.ldxa), download_head(dch, Mr)};
  const std::vector<bf16> q = dqkv.download(), a = dao.download();
  o.qkv.assign(q.begin(), q.begin() + size_t(Mr) * 2 * C);
  o.ao.assign(a.begin(), a.begin() + size_t(Mr) * C);
  EXPECT_EQ(std::count_if(q.begin() + size_t(Mr) * 2 * C, q.end(), [](bf16 v) { return bits(v) != 0xFFFF; }), 0)
      << "qk | v written past the rows";
  EXPECT_EQ(std::count_if(a.begin() + size_t(Mr) * C, a.end(), [](bf16 v) { return bits(v) != 0xFFFF; }), 0)
      << "attention output written past the rows";
  return o;
}

// The kernel against its definition, in three links:
//  1. its qk | v rows: the exact product + bias within bf16 rounding (half an ulp, plus the f32 sum's error);
//  2. its attention output: hamming_attention_forward_ld on its own qk | v rows (the same codes; KV summed in another
//     order, so an element may differ by one bf16 ulp);
//  3. x, x_aug, the choices: expect_lin_definition with a = its attention output (x within the tolerance of
//     x0 + a W^T + b, x_aug and the choices bit for bit moe_ln_route_mask_forward on x, nothing written past them).
// A rerun gives the same bits; image 1 of a batch of two equals image 1 alone.
TEST_F(RowsFused, HammingBlockMatchesDefinition) {
  struct Case {
    int B, N, C, H, nbits, m;
  };
  for (const Case cs : {Case{1, 197, 192, 3, 16, 25}, Case{2, 197, 192, 3, 16, 25}, Case{1, 50, 128, 2, 16, 25},
                        Case{2, 37, 64, 1, 8, 9}, Case{1, 64, 192, 3, 24, 25}, Case{1, 17, 128, 2, 16, 32},
                        Case{2, 11, 64, 1, 40, 12}, Case{1, 208, 192, 3, 16, 25}}) {
    const int B = cs.B, N = cs.N, C = cs.C, H = cs.H, M = B * N;
    SCOPED_TRACE(dims({{"B", B}, {"N", N}, {"C", C}, {"H", H}, {"nbits", cs.nbits}, {"m", cs.m}}));
    ASSERT_TRUE(cuda::hamming_block_supports(B, N, C, H, cs.nbits, cs.m));
    BlockCase k = block_case(B, N, C, H, cs.nbits, cs.m, 300 + N + C);
    const BlockDev d(k);
    const BlockOut o = run_block(k, d, 0, B);
    // 1. qk | v
    size_t bad_qkv = 0;
    for (int r = 0; r < M; ++r)
      for (int j = 0; j < 2 * C; ++j) {
        const double ref = k.qkv[size_t(r) * 2 * C + j], got = __bfloat162float(o.qkv[size_t(r) * 2 * C + j]);
        bad_qkv += !(std::fabs(got - ref) <= std::ldexp(std::fabs(ref), -8) + 1e-5);
      }
    EXPECT_EQ(bad_qkv, 0u) << "qk | v differ from xn W^T + b beyond bf16 rounding";
    // 2. the attention output against the per-head kernel on the same qk | v
    auto dq = upload(o.qkv);
    auto dref = poisoned<bf16>(size_t(M) * C);
    cuda::hamming_attention_forward_ld(dref.get(), C, dq.get(), 2 * C, dq.get() + C, 2 * C, d.prep.get(), d.conv.get(),
                                       B, N, C, H, cs.nbits, cs.m, nullptr);
    const std::vector<bf16> ref = dref.download();
    size_t bad_ao = 0, unequal = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const double a = __bfloat162float(o.ao[i]), r = __bfloat162float(ref[i]);
      unequal += bits(o.ao[i]) != bits(ref[i]);
      bad_ao += !(std::fabs(a - r) <= std::ldexp(std::fabs(r), -7) + 1e-6);
    }
    EXPECT_EQ(bad_ao, 0u) << "attention output differs from hamming_attention_forward_ld beyond one bf16 ulp";
    EXPECT_LE(unequal, ref.size() / 50) << "more than 2% of the attention output differs from the per-head kernel";
    std::printf("[ block ] B=%d N=%d C=%d: %zu of %zu attention outputs one ulp from the per-head kernel's\n", B, N, C,
                unequal, ref.size());
    // 3. proj + residual + LayerNorm + router + mask on the kernel's own attention output
    k.lin.af.resize(o.ao.size());
    for (size_t i = 0; i < o.ao.size(); ++i) k.lin.af[i] = __bfloat162float(o.ao[i]);
    k.lin.a = strided_bf16(k.lin.af, M, C, k.lin.lda);
    expect_lin_definition(k.lin, d.lin, o.lin);
    const BlockOut again = run_block(k, d, 0, B);
    EXPECT_TRUE(bit_identical(again.lin.x, o.lin.x) && bit_identical(again.lin.xa, o.lin.xa) &&
                again.lin.ch == o.lin.ch && bit_identical(again.ao, o.ao))
        << "rerun differs";
    if (B == 2) {
      const BlockOut one = run_block(k, d, 1, 1);
      const LinCase& c = k.lin;
      EXPECT_TRUE(bit_identical(one.lin.x, rows_of(o.lin.x, c.ldx, N, N))) << "image 1 alone differs from the batch";
      EXPECT_TRUE(bit_identical(one.lin.xa, rows_of(o.lin.xa, c.ldxa, N, N)) &&
                  one.lin.ch == rows_of(o.lin.ch, 1, N, N));
    }
  }
  EXPECT_FALSE(cuda::hamming_block_supports(1, 197, 256, 4, 16, 25)) << "4 heads";
  EXPECT_FALSE(cuda::hamming_block_supports(1, 197, 96, 3, 16, 25)) << "head size 32";
  EXPECT_FALSE(cuda::hamming_block_supports(1, 300, 192, 3, 16, 25)) << "N > 256";
  EXPECT_FALSE(cuda::hamming_block_supports(1, 224, 192, 3, 16, 25)) << "the image's v rows exceed shared memory";
  DeviceBuffer<float> f(64);
  DeviceBuffer<bf16> h(64);
  EXPECT_THROW(cuda::hamming_block_forward(f.get(), 192, h.get(), 192, h.get(), h.get(), f.get(), f.get(), h.get(),
                                           f.get(), f.get(), f.get(), kEps, f.get(), f.get(), h.get(), 400, nullptr,
                                           h.get(), 1, 197, 256, 4, 16, 25, nullptr),
               Error);
}

// Not an assertion: DeiT-Tiny batch 1, the one-kernel attention sub-block against the two kernels it replaces (the
// cuBLASLt to_qk / to_v product, the fused Hamming + proj + LN2 + router + mask kernel), each sequence 12 times in
// one graph; us per sequence.
TEST_F(RowsFused, HammingBlockTimingPrinted) {
  const BlockCase k = block_case(1, 197, 192, 3, 16, 25, 11);
  const BlockDev d(k);
  const LinCase& c = k.lin;
  const int M = 197, C = 192;
  auto dx = upload(c.x0);
  auto dxa = poisoned<bf16>(size_t(M) * c.ldxa);
  auto dch = poisoned<int8_t>(M);
  DeviceBuffer<bf16> qkv(size_t(M) * 2 * C), xn(size_t(M) * C), dv(cuda::hamming_block_scratch_elems(1, M, C));
  SAV_CUDA_CHECK(cudaMemcpy2D(xn.get(), C * sizeof(bf16), d.xn.get(), k.ldxn * sizeof(bf16), C * sizeof(bf16), M,
                              cudaMemcpyDeviceToDevice));
  cuda::Gemm gemm;
  cuda::Stream st;
  auto two = [&](cudaStream_t s) {
    gemm.linear_bf16(qkv.get(), xn.get(), d.w.get(), d.b.get(), M, C, 2 * C, false, s);
    cuda::hamming_attention_proj_ln_mask_forward(dx.get(), c.ldx, qkv.get(), 2 * C, qkv.get() + C, 2 * C, d.prep.get(),
                                                 d.conv.get(), d.lin.w.get(), d.lin.b.get(), d.lin.lw.get(),
                                                 d.lin.lb.get(), kEps, d.lin.wr.get(), d.lin.br.get(), dxa.get(),
                                                 c.ldxa, dch.get(), 1, M, C, 3, 16, 25, s);
  };
  auto one = [&](cudaStream_t s) {
    cuda::hamming_block_forward(dx.get(), c.ldx, d.xn.get(), k.ldxn, d.w.get(), d.b.get(), d.prep.get(), d.conv.get(),
                                d.lin.w.get(), d.lin.b.get(), d.lin.lw.get(), d.lin.lb.get(), kEps, d.lin.wr.get(),
                                d.lin.br.get(), dxa.get(), c.ldxa, dch.get(), dv.get(), 1, M, C, 3, 16, 25, s);
  };
  two(st.get());
  one(st.get());
  device_sync();
  const double us_two = cuda::median_graph_us(two, st.get(), 12, 21);
  const double us_one = cuda::median_graph_us(one, st.get(), 12, 21);
  std::printf(
      "[ hamming block ] DeiT-Tiny b1, us per sequence in a graph of 12: to_qk/to_v product + fused Hamming "
      "kernel %.2f, one kernel %.2f\n",
      us_two, us_one);
  EXPECT_GT(us_one, 0.0);
}

// ---- mlp_block_forward ----

// fc1's side: rows xr (M,C) bf16-rounded normal, a random expert per row, x_aug (M, Ka) = [xr s0 | xr s1 | s0 s0 s1
// s1 | 0] in rows ldxa = Ka + 8 apart (NaN gaps), W_aug = moe_masked_weights of w0, w1 (F,C) bf16-rounded normal /
// sqrt(C) and b0, b1 small; fc2's side: a MoeCase with K = F (its h replaced by the kernel's hidden rows).
struct MlpCase {
  int M = 0, C = 0, F = 0, Ka = 0, ldxa = 0;
  std::vector<float> xaf, waf;  // (M,Ka), (F,Ka) as floats
  std::vector<bf16> xa, wa;
  MoeCase fc2;
};

MlpCase mlp_case(int M, int C, int F, uint64_t seed) {
  MlpCase k;
  k.M = M, k.C = C, k.F = F, k.Ka = cuda::moe_masked_cols(C), k.ldxa = k.Ka + 8;
  const float ws = 1.0f / std::sqrt(float(C));
  const std::vector<float> xr = round_bf16(normal(size_t(M) * C, seed));
  const std::vector<float> w0 = round_bf16(normal(size_t(F) * C, seed + 1, ws));
  const std::vector<float> w1 = round_bf16(normal(size_t(F) * C, seed + 2, ws));
  const std::vector<float> b0 = normal(F, seed + 3, 0.1f), b1 = normal(F, seed + 4, 0.1f);
  k.wa = cuda::moe_masked_weights(w0.data(), w1.data(), b0.data(), b1.data(), F, C);
  k.waf = sav::cuda::from_bf16(k.wa);
  const std::vector<float> pick = uniform(M, seed + 5, 0.0f, 1.0f);
  k.xaf.assign(size_t(M) * k.Ka, 0.0f);
  for (int t = 0; t < M; ++t) {
    const int e = pick[t] < 0.5f ? 0 : 1;
    float* r = k.xaf.data() + size_t(t) * k.Ka;
    std::copy(xr.begin() + size_t(t) * C, xr.begin() + size_t(t + 1) * C, r + e * C);
    r[2 * C + 2 * e] = r[2 * C + 2 * e + 1] = 1.0f;
  }
  k.xa = strided_bf16(k.xaf, M, k.Ka, k.ldxa);
  k.fc2 = moe_case(M, F, C, seed + 10);
  return k;
}

struct MlpDev {
  DeviceBuffer<bf16> xa, wa;
  MoeDev fc2;
  explicit MlpDev(const MlpCase& k) : xa(upload(k.xa)), wa(upload(k.wa)), fc2(k.fc2) {}
};

struct MlpOut {
  std::vector<bf16> hid;  // (M,F)
  MoeOut o;
};

// One launch of rows [r0, r0 + n) from x0 (xn, the choices and hid poisoned, kTail poisoned rows after each).
MlpOut run_mlp(const MlpCase& k, const MlpDev& d, cuda::MoeGate gate, int tile_rows, int r0, int n) {
  const MoeCase& c = k.fc2;
  auto dx = with_tail(rows_of(c.x0, c.ldx, r0, n), size_t(kTail) * c.ldx);
  auto dxn = poisoned<bf16>(size_t(n + kTail) * c.ldxn);
  auto dch = poisoned<int8_t>(n + kTail);
  auto dh = poisoned<bf16>(size_t(n + kTail) * k.F);
  cuda::mlp_block_forward(dx.get(), c.ldx, dch.get(), d.xa.get() + size_t(r0) * k.ldxa, k.ldxa, d.wa.get(),
                          d.fc2.ws.get(), d.fc2.b0.get(), d.fc2.b1.get(), d.fc2.br.get(), n, k.C, k.F, gate, dxn.get(),
                          c.ldxn, d.fc2.lw.get(), d.fc2.lb.get(), kEps, nullptr, tile_rows, dh.get());
  device_sync();
  return {download_head(dh, size_t(n) * k.F),
          {download_head(dx, size_t(n) * c.ldx), download_head(dxn, size_t(n) * c.ldxn), download_head(dch, n)}};
}

// The hidden rows against gelu_tanh(x_aug W_aug^T) in double: within one bf16 ulp plus the f32 sum's error (kRel of
// the sum of |terms|, times GELU's slope <= 1.13).
size_t mlp_hid_bad(const MlpCase& k, const std::vector<bf16>& hid) {
  size_t bad = 0;
  for (int t = 0; t < k.M; ++t)
    for (int j = 0; j < k.F; ++j) {
      double acc = 0.0, mag = 0.0;
      for (int q = 0; q < k.Ka; ++q) {
        const double v = double(k.xaf[size_t(t) * k.Ka + q]) * k.waf[size_t(j) * k.Ka + q];
        acc += v, mag += std::fabs(v);
      }
      const double ref = 0.5 * acc * (1.0 + std::tanh(0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)));
      const double got = __bfloat162float(hid[size_t(t) * k.F + j]);
      bad += !(std::fabs(got - ref) <= std::ldexp(std::fabs(ref), -7) + 1.2 * kRel * mag + 1e-6);
    }
  return bad;
}

// mlp_block_forward against its definition: the hidden rows against gelu_tanh(x_aug W_aug^T) (mlp_hid_bad); x, xn
// and the choices against moe_epilogue_residual_ln_forward on s = h ws^T in double from the kernel's own hidden rows
// (check_moe: choices equal except on near-ties, x within the tolerance, xn bit for bit layernorm_forward of the
// kernel's x); both gates; both tile sizes, a rerun and the rows of the second half run alone give the same bits; no
// row past M and no gap column written.
TEST_F(RowsFused, MlpBlockMatchesDefinition) {
  struct Case {
    int M, C, F;
  };
  for (const Case cs : {Case{197, 192, 768}, Case{394, 192, 768}, Case{1, 192, 768}, Case{17, 64, 256},
                        Case{50, 128, 512}, Case{33, 96, 1024}, Case{45, 104, 384}}) {
    const int M = cs.M, C = cs.C, F = cs.F;
    ASSERT_TRUE(cuda::mlp_block_supports(M, C, F, 16) && cuda::mlp_block_supports(M, C, F, 32))
        << "M=" << M << " C=" << C << " F=" << F;
    MlpCase k = mlp_case(M, C, F, 5000 + M + C + F);
    const MlpDev d(k);
    for (const auto gate : {cuda::moe_gate_straight_through, cuda::moe_gate_prob}) {
      if (gate == cuda::moe_gate_prob && M != 50) continue;  // one shape for the prob gate
      SCOPED_TRACE(dims({{"M", M}, {"C", C}, {"F", F}, {"gate", int(gate)}}));
      const MlpOut o = run_mlp(k, d, gate, 16, 0, M);
      EXPECT_EQ(mlp_hid_bad(k, o.hid), 0u) << "hidden rows differ from gelu_tanh(x_aug W_aug^T) beyond bf16 rounding";
      MoeCase& c = k.fc2;
      c.hf.resize(size_t(M) * F);
      for (size_t i = 0; i < c.hf.size(); ++i) c.hf[i] = __bfloat162float(o.hid[i]);
      c.h = strided_bf16(c.hf, M, F, c.ldh);
      const MoeProduct p = moe_product(c);
      const MoeOut ref = moe_ref(c, d.fc2, p, gate);
      ASSERT_EQ(count_invalid(o.o.ch), 0) << "choices not written";
      const MoeCheck r = check_moe(c, p, gate, o.o, ref);
      EXPECT_EQ(r.wrong, 0) << "routing differs from the reference on unambiguous rows (" << r.ambiguous
                            << " ambiguous)";
      EXPECT_EQ(r.x_bad, 0u) << "x differs from the reference (or not written)";
      EXPECT_EQ(gap_changed(o.o.x, c.x0, M, C, c.ldx), 0u) << "x's gap columns changed";
      EXPECT_TRUE(bit_identical(o.o.xn, layernorm_of(c, d.fc2, o.o.x))) << "xn differs from layernorm_forward of x";
      if (M >= 45) {  // the router sees GELU outputs (mostly positive): one expert may take most tokens
        const int to_shift = count_shift(o.o.ch);
        EXPECT_GT(to_shift, 0) << "both experts should get tokens";
        EXPECT_LT(to_shift, M);
      }
      const MlpOut t32 = run_mlp(k, d, gate, 32, 0, M), again = run_mlp(k, d, gate, 16, 0, M);
      for (const MlpOut* q : {&t32, &again})
        EXPECT_TRUE(bit_identical(q->hid, o.hid) && bit_identical(q->o.x, o.o.x) && bit_identical(q->o.xn, o.o.xn) &&
                    q->o.ch == o.o.ch)
            << (q == &t32 ? "32-row tiles differ from 16-row tiles" : "rerun differs");
      if (M >= 2) {
        const int h = M / 2;
        const MlpOut part = run_mlp(k, d, gate, 0, h, M - h);
        EXPECT_TRUE(bit_identical(part.hid, rows_of(o.hid, F, h, M - h)) &&
                    bit_identical(part.o.x, rows_of(o.o.x, c.ldx, h, M - h)) &&
                    bit_identical(part.o.xn, rows_of(o.o.xn, c.ldxn, h, M - h)) &&
                    part.o.ch == rows_of(o.o.ch, 1, h, M - h))
            << "rows run alone differ from the same rows of the whole run";
      }
    }
  }
  EXPECT_FALSE(cuda::mlp_block_supports(197, 384, 1536)) << "C > 192";
  EXPECT_FALSE(cuda::mlp_block_supports(197, 192, 700)) << "F % 128 != 0";
  EXPECT_FALSE(cuda::mlp_block_supports(197, 192, 768, 24)) << "tile rows";
  DeviceBuffer<float> f(64);
  DeviceBuffer<bf16> h(64);
  EXPECT_THROW(
      cuda::mlp_block_forward(f.get(), 192, nullptr, h.get(), 400, h.get(), h.get(), f.get(), f.get(), f.get(), 197,
                              192, 700, cuda::moe_gate_straight_through, h.get(), 192, f.get(), f.get(), kEps, nullptr),
      Error);
  EXPECT_THROW(
      cuda::mlp_block_forward(f.get(), 192, nullptr, h.get(), 392, h.get(), h.get(), f.get(), f.get(), f.get(), 197,
                              192, 768, cuda::moe_gate_straight_through, h.get(), 192, f.get(), f.get(), kEps, nullptr),
      Error)
      << "ldxa < Ka";
}

// The proj form against the composition it replaces: hamming_block_attention_forward + mlp_block_proj_forward give
// the same bits as hamming_block_forward + mlp_block_forward (x, the next LayerNorm xn, both layers' choices; the
// attention output equal to the full kernel's ao_out), on odd shapes and both gates; nothing written past the rows.
TEST_F(RowsFused, BlockProjFormMatchesComposition) {
  struct Case {
    int B, N, C, H, F;
  };
  // DeiT-Tiny's sizes run the instances specialised for them; N = 100 the generic ones at the same width
  for (const Case cs :
       {Case{1, 197, 192, 3, 768}, Case{1, 100, 192, 3, 768}, Case{2, 37, 64, 1, 256}, Case{1, 50, 128, 2, 512}}) {
    const int B = cs.B, N = cs.N, C = cs.C, H = cs.H, F = cs.F, M = B * N;
    ASSERT_TRUE(cuda::hamming_block_supports(B, N, C, H, 16, 25) && cuda::mlp_block_proj_supports(M, C, F));
    const BlockCase k = block_case(B, N, C, H, 16, 25, 700 + N + C);
    const BlockDev d(k);
    const MlpCase mk = mlp_case(M, C, F, 800 + N + C);
    const MlpDev md(mk);
    const LinCase& c = k.lin;
    const int ldxn = C + 8;
    for (const auto gate : {cuda::moe_gate_straight_through, cuda::moe_gate_prob}) {
      SCOPED_TRACE(dims({{"B", B}, {"N", N}, {"C", C}, {"F", F}, {"gate", int(gate)}}));
      struct Out {
        std::vector<float> x;
        std::vector<bf16> xn, ao;
        std::vector<int8_t> ch1, ch2;
      };
      auto run = [&](bool proj_form) {
        auto dx = with_tail(c.x0, size_t(kTail) * c.ldx);
        auto dxn = poisoned<bf16>(size_t(M + kTail) * ldxn);
        auto dao = poisoned<bf16>(size_t(M + kTail) * C);
        auto dxa = poisoned<bf16>(size_t(M + kTail) * c.ldxa);
        auto dch1 = poisoned<int8_t>(M + kTail), dch2 = poisoned<int8_t>(M + kTail);
        auto dv = poisoned<bf16>(cuda::hamming_block_scratch_elems(B, N, C));
        if (proj_form) {
          cuda::hamming_block_attention_forward(dao.get(), d.xn.get(), k.ldxn, d.w.get(), d.b.get(), d.prep.get(),
                                                d.conv.get(), dv.get(), B, N, C, H, 16, 25, nullptr);
          cuda::mlp_block_proj_forward(dx.get(), c.ldx, dao.get(), C, d.lin.w.get(), d.lin.b.get(), d.lin.lw.get(),
                                       d.lin.lb.get(), d.lin.wr.get(), d.lin.br.get(), dch1.get(), md.wa.get(),
                                       md.fc2.ws.get(), md.fc2.b0.get(), md.fc2.b1.get(), md.fc2.br.get(), dch2.get(),
                                       M, C, F, gate, dxn.get(), ldxn, md.fc2.lw.get(), md.fc2.lb.get(), kEps, nullptr);
        } else {
          cuda::hamming_block_forward(dx.get(), c.ldx, d.xn.get(), k.ldxn, d.w.get(), d.b.get(), d.prep.get(),
                                      d.conv.get(), d.lin.w.get(), d.lin.b.get(), d.lin.lw.get(), d.lin.lb.get(), kEps,
                                      d.lin.wr.get(), d.lin.br.get(), dxa.get(), c.ldxa, dch1.get(), dv.get(), B, N, C,
                                      H, 16, 25, nullptr, nullptr, dao.get());
          cuda::mlp_block_forward(dx.get(), c.ldx, dch2.get(), dxa.get(), c.ldxa, md.wa.get(), md.fc2.ws.get(),
                                  md.fc2.b0.get(), md.fc2.b1.get(), md.fc2.br.get(), M, C, F, gate, dxn.get(), ldxn,
                                  md.fc2.lw.get(), md.fc2.lb.get(), kEps, nullptr, 16);
        }
        device_sync();
        Out o{dx.download(), dxn.download(), dao.download(), dch1.download(), dch2.download()};
        return o;
      };
      const Out ref = run(false), got = run(true);
      EXPECT_TRUE(bit_identical(got.ao, ref.ao)) << "attention output differs from the full kernel's";
      EXPECT_TRUE(bit_identical(got.x, ref.x)) << "x differs (or a row past M changed)";
      EXPECT_TRUE(bit_identical(got.xn, ref.xn)) << "xn differs (or was written past M)";
      EXPECT_EQ(got.ch1, ref.ch1) << "fc1 choices differ";
      EXPECT_EQ(got.ch2, ref.ch2) << "fc2 choices differ";
      EXPECT_EQ(count_invalid(std::vector<int8_t>(got.ch1.begin(), got.ch1.begin() + M)), 0) << "fc1 choices unwritten";
      EXPECT_EQ(
          std::count_if(got.xn.begin() + size_t(M) * ldxn, got.xn.end(), [](bf16 v) { return bits(v) != 0xFFFF; }), 0)
          << "xn written past the rows";
      EXPECT_EQ(std::count_if(got.ao.begin() + size_t(M) * C, got.ao.end(), [](bf16 v) { return bits(v) != 0xFFFF; }),
                0)
          << "attention output written past the rows";
      EXPECT_FALSE(bit_identical(got.x, c.x0)) << "x unchanged";
    }
  }
  EXPECT_FALSE(cuda::mlp_block_proj_supports(197, 104, 384)) << "C % 32 != 0";
  DeviceBuffer<float> f(64);
  DeviceBuffer<bf16> h(64);
  EXPECT_THROW(
      cuda::mlp_block_proj_forward(f.get(), 104, h.get(), 104, h.get(), f.get(), f.get(), f.get(), f.get(), f.get(),
                                   nullptr, h.get(), h.get(), f.get(), f.get(), f.get(), nullptr, 197, 104, 384,
                                   cuda::moe_gate_straight_through, h.get(), 104, f.get(), f.get(), kEps, nullptr),
      Error);
  EXPECT_THROW(cuda::hamming_block_attention_forward(h.get(), h.get(), 192, h.get(), h.get(), f.get(), f.get(), h.get(),
                                                     1, 224, 192, 3, 16, 25, nullptr),
               Error);
}

// Not an assertion: DeiT-Tiny batch 1 (M = 197), the one-kernel MLP half against the three kernels it replaces
// (cuBLASLt masked fc1 + GELU, the cuBLASLt stacked fc2, the epilogue + LayerNorm kernel), each sequence 12 times in
// one graph; us per sequence, both tile sizes, and 16-row tiles with dependent launch (as in a forward).
TEST_F(RowsFused, MlpBlockTimingPrinted) {
  const int M = 197, C = 192, F = 768;
  const MlpCase k = mlp_case(M, C, F, 17);
  const MlpDev d(k);
  const MoeCase& c = k.fc2;
  auto dx = upload(c.x0);
  auto dxn = poisoned<bf16>(size_t(M) * c.ldxn);
  auto dch = poisoned<int8_t>(M);
  DeviceBuffer<bf16> hid(size_t(M) * F);
  DeviceBuffer<float> s(size_t(M) * c.Fs);
  auto xa = upload(sav::cuda::to_bf16(k.xaf.data(), k.xaf.size()));  // contiguous rows (Ka apart), as in ViTCuda
  cuda::Gemm gemm;
  cuda::Stream st;
  auto three = [&](cudaStream_t q) {
    gemm.linear_bf16(hid.get(), xa.get(), d.wa.get(), nullptr, M, k.Ka, F, true, q);
    gemm.linear_f32(s.get(), hid.get(), d.fc2.ws.get(), nullptr, M, F, c.Fs, false, q);
    cuda::moe_epilogue_residual_ln_forward(dx.get(), c.ldx, dch.get(), s.get(), c.Fs, d.fc2.b0.get(), d.fc2.b1.get(),
                                           d.fc2.br.get(), M, C, cuda::moe_gate_straight_through, dxn.get(), c.ldxn,
                                           d.fc2.lw.get(), d.fc2.lb.get(), kEps, q);
  };
  auto one = [&](int tm) {
    return [&, tm](cudaStream_t q) {
      cuda::mlp_block_forward(dx.get(), c.ldx, dch.get(), xa.get(), k.Ka, d.wa.get(), d.fc2.ws.get(), d.fc2.b0.get(),
                              d.fc2.b1.get(), d.fc2.br.get(), M, C, F, cuda::moe_gate_straight_through, dxn.get(),
                              c.ldxn, d.fc2.lw.get(), d.fc2.lb.get(), kEps, q, tm);
    };
  };
  three(st.get());
  one(16)(st.get());
  one(32)(st.get());
  device_sync();
  const double us_three = cuda::median_graph_us(three, st.get(), 12, 21);
  const double us16 = cuda::median_graph_us(one(16), st.get(), 12, 21);
  const double us32 = cuda::median_graph_us(one(32), st.get(), 12, 21);
  double us_dep = 0.0;
  {
    const cuda::DependentLaunchScope dependent(true);  // each launch's weights load while the previous one runs
    us_dep = cuda::median_graph_us(one(16), st.get(), 12, 21);
  }
  std::printf(
      "[ mlp block ] DeiT-Tiny b1, us per sequence in a graph of 12: masked fc1 + stacked fc2 + epilogue/LN %.2f, one "
      "kernel %.2f (16-row tiles) %.2f (32-row tiles) %.2f (16-row tiles, dependent launch)\n",
      us_three, us16, us32, us_dep);
}
