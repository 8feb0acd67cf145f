// shiftaddvit: tests of the PVTv2 CPU ops (src/ops/cpu/conv.h): conv2d, dwconv2d and attention with
// separate queries and keys/values.
//
// As test_ops.cpp: the references against convolutions / attention written out here, the fast paths
// against the references on odd shapes (normalised error max|a-b|/max|ref|), central finite differences
// of every gradient of both backward functions (loss L = sum(out * R) with a fixed random R), backward
// accumulation and nullptr gradients, bad arguments, and results that do not depend on the thread count.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/error.h"
#include "op_harness.h"
#include "ops/cpu/conv.h"
#include "ops/cpu/ops.h"
#include "ops/cpu/simd_math.h"

namespace {

using namespace sav;
using std::vector;
namespace t = sav::test;

using Loss = std::function<double()>;

struct Grad {
  const char* name;
  vector<float>* x;
  const vector<float>* g;
};

void expect_fd(const std::string& what, std::initializer_list<Grad> grads, const Loss& loss, double tol,
               float h = 1e-3f) {
  for (const Grad& gr : grads) {
    const t::FdResult r = t::fd_check(gr.x->data(), gr.x->size(), gr.g->data(), loss, h);
    EXPECT_LT(r.err, tol) << what << ": d" << gr.name << " " << r;
  }
}

vector<float> zeros(size_t n) { return vector<float>(n, 0.0f); }

vector<float> twice(const vector<float>& a) {
  vector<float> r(a);
  for (auto& v : r) v *= 2.0f;
  return r;
}

std::string mode(bool fast) { return fast ? "fast" : "ref"; }

// Sets detail::force_portable_kernels for the scope.
struct PortableScope {
  explicit PortableScope(bool on) : saved(cpu::detail::force_portable_kernels) {
    cpu::detail::force_portable_kernels = on;
  }
  ~PortableScope() { cpu::detail::force_portable_kernels = saved; }
  bool saved;
};

std::string path_name(bool portable) { return portable ? "portable" : (cpu::detail::use_avx2() ? "avx2" : "portable"); }

// Runs f() with 1, 2 and 3 OpenMP threads and returns what it returned each time.
vector<vector<float>> with_thread_counts(const std::function<vector<float>()>& f) {
  const int saved = omp_get_max_threads();
  vector<vector<float>> runs;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    runs.push_back(f());
  }
  omp_set_num_threads(saved);
  return runs;
}

vector<float> concat(std::initializer_list<const vector<float>*> parts) {
  vector<float> all;
  for (const auto* v : parts) all.insert(all.end(), v->begin(), v->end());
  return all;
}

// =====================================================================================================
// conv2d

struct ConvShape {
  int B, H, W, Cin, Cout, k, s, pad;
};
std::string conv_name(const ConvShape& s) {
  return "B=" + std::to_string(s.B) + " H=" + std::to_string(s.H) + " W=" + std::to_string(s.W) +
         " Cin=" + std::to_string(s.Cin) + " Cout=" + std::to_string(s.Cout) + " k=" + std::to_string(s.k) +
         " s=" + std::to_string(s.s) + " pad=" + std::to_string(s.pad);
}
struct ConvSizes {
  int Ho, Wo;
  size_t nx, nw, ny, ncols;
};
ConvSizes conv_sizes(const ConvShape& s) {
  const int Ho = cpu::conv_out_size(s.H, s.k, s.s, s.pad), Wo = cpu::conv_out_size(s.W, s.k, s.s, s.pad);
  return {Ho,
          Wo,
          size_t(s.B) * s.H * s.W * s.Cin,
          size_t(s.Cout) * s.Cin * s.k * s.k,
          size_t(s.B) * Ho * Wo * s.Cout,
          cpu::conv2d_cols_floats(s.B, s.H, s.W, s.Cin, s.k, s.s, s.pad)};
}

void conv_fwd(bool fast, float* y, float* cols, const float* x, const float* w, const float* b, const ConvShape& s) {
  (fast ? cpu::conv2d_forward : cpu::conv2d_forward_ref)(y, cols, x, w, b, s.B, s.H, s.W, s.Cin, s.Cout, s.k, s.s,
                                                         s.pad);
}
void conv_bwd(bool fast, float* dx, float* dw, float* db, float* scratch, const float* dy, const float* cols,
              const float* w, const ConvShape& s) {
  (fast ? cpu::conv2d_backward : cpu::conv2d_backward_ref)(dx, dw, db, scratch, dy, cols, w, s.B, s.H, s.W, s.Cin,
                                                           s.Cout, s.k, s.s, s.pad);
}

// PVTv2's shapes in small: the stage-1 patch embedding (k7 s4 p3), the later ones (k3 s2 p1), the spatial
// reductions (k = s, p = 0, here 2 and 3: on the 7x7 input k = s = 3 drops the last row and column), a
// stride-1 padded conv and a 1x1 conv.
const ConvShape kConvShapes[] = {{2, 13, 11, 3, 5, 7, 4, 3}, {1, 9, 10, 4, 6, 3, 2, 1}, {2, 8, 6, 5, 3, 2, 2, 0},
                                 {1, 7, 7, 2, 4, 3, 3, 0},   {2, 5, 6, 3, 2, 3, 1, 1},  {1, 4, 3, 5, 7, 1, 1, 0}};

TEST(OpsConv2d, OutputSize) {
  EXPECT_EQ(cpu::conv_out_size(224, 7, 4, 3), 56);
  EXPECT_EQ(cpu::conv_out_size(56, 3, 2, 1), 28);
  EXPECT_EQ(cpu::conv_out_size(56, 8, 8, 0), 7);
  EXPECT_EQ(cpu::conv_out_size(13, 7, 4, 3), 4);
  EXPECT_EQ(cpu::conv_out_size(7, 3, 3, 0), 2);  // floor: row 6 unused
  // Kernel larger than the padded input: floor division as PyTorch (C++ `/` alone would give 1).
  EXPECT_EQ(cpu::conv_out_size(1, 2, 2, 0), 0);
  EXPECT_EQ(cpu::conv_out_size(1, 3, 2, 0), 0);
  EXPECT_EQ(cpu::conv_out_size(1, 4, 2, 0), -1);
  EXPECT_EQ(cpu::conv_out_size(1, 7, 2, 0), -2);
  EXPECT_EQ(cpu::conv_out_size(1, 3, 1, 1), 1);
  EXPECT_EQ(cpu::conv2d_cols_floats(2, 13, 11, 3, 7, 4, 3), size_t(2) * 4 * 3 * 3 * 49);
}

TEST(OpsConv2d, RefMatchesDirectConvolution) {
  for (const auto& s : kConvShapes)
    for (bool bias : {true, false}) {
      SCOPED_TRACE(conv_name(s) + (bias ? " bias" : " no bias"));
      const ConvSizes z = conv_sizes(s);
      auto x = t::uniform(z.nx, 201), w = t::uniform(z.nw, 202), b = t::uniform(s.Cout, 203);
      vector<float> y(z.ny, 9.0f), cols(z.ncols, 9.0f);
      cpu::conv2d_forward_ref(y.data(), cols.data(), x.data(), w.data(), bias ? b.data() : nullptr, s.B, s.H, s.W,
                              s.Cin, s.Cout, s.k, s.s, s.pad);
      // torch.nn.functional.conv2d on the (B,Cin,H,W) view of x, written out, then back to channels-last.
      vector<float> want(z.ny);
      for (int bi = 0; bi < s.B; ++bi)
        for (int oy = 0; oy < z.Ho; ++oy)
          for (int ox = 0; ox < z.Wo; ++ox)
            for (int co = 0; co < s.Cout; ++co) {
              double acc = bias ? b[co] : 0.0;
              for (int ci = 0; ci < s.Cin; ++ci)
                for (int ky = 0; ky < s.k; ++ky)
                  for (int kx = 0; kx < s.k; ++kx) {
                    const int iy = oy * s.s + ky - s.pad, ix = ox * s.s + kx - s.pad;
                    if (iy < 0 || iy >= s.H || ix < 0 || ix >= s.W) continue;  // zero padding
                    acc += double(x[((size_t(bi) * s.H + iy) * s.W + ix) * s.Cin + ci]) *
                           w[((size_t(co) * s.Cin + ci) * s.k + ky) * s.k + kx];
                  }
              want[((size_t(bi) * z.Ho + oy) * z.Wo + ox) * s.Cout + co] = float(acc);
            }
      EXPECT_LT(t::norm_err(y, want), 1e-6);
    }
}

TEST(OpsConv2d, FastMatchesRef) {
  vector<ConvShape> shapes(std::begin(kConvShapes), std::end(kConvShapes));
  // Larger odd shapes: several OpenMP rows, K and Cout past the 16-column register tiles.
  shapes.push_back({2, 29, 31, 7, 37, 3, 2, 1});
  shapes.push_back({1, 33, 35, 3, 19, 7, 4, 3});
  shapes.push_back({3, 17, 15, 13, 11, 4, 4, 0});
  for (bool portable : {false, true}) {
    PortableScope scope(portable);
    for (const auto& s : shapes) {
      SCOPED_TRACE(path_name(portable) + " " + conv_name(s));
      const ConvSizes z = conv_sizes(s);
      auto x = t::uniform(z.nx, 211), w = t::uniform(z.nw, 212), b = t::uniform(s.Cout, 213);
      vector<float> y(z.ny, 4.0f), cols(z.ncols, 4.0f), y_ref(z.ny), cols_ref(z.ncols);
      cpu::conv2d_forward(y.data(), cols.data(), x.data(), w.data(), b.data(), s.B, s.H, s.W, s.Cin, s.Cout, s.k, s.s,
                          s.pad);
      cpu::conv2d_forward_ref(y_ref.data(), cols_ref.data(), x.data(), w.data(), b.data(), s.B, s.H, s.W, s.Cin, s.Cout,
                              s.k, s.s, s.pad);
      EXPECT_EQ(cols, cols_ref);
      EXPECT_LT(t::norm_err(y, y_ref), 1e-5) << "y";
      auto dy = t::uniform(z.ny, 214);
      auto dx = t::uniform(z.nx, 215), dw = t::uniform(z.nw, 216), db = t::uniform(s.Cout, 217);
      auto dx_ref = dx, dw_ref = dw, db_ref = db;
      vector<float> scratch(z.ncols, 5.0f);
      cpu::conv2d_backward(dx.data(), dw.data(), db.data(), scratch.data(), dy.data(), cols.data(), w.data(), s.B, s.H,
                           s.W, s.Cin, s.Cout, s.k, s.s, s.pad);
      cpu::conv2d_backward_ref(dx_ref.data(), dw_ref.data(), db_ref.data(), nullptr, dy.data(), cols.data(), w.data(),
                               s.B, s.H, s.W, s.Cin, s.Cout, s.k, s.s, s.pad);
      EXPECT_LT(t::norm_err(dx, dx_ref), 1e-5) << "dx";
      EXPECT_LT(t::norm_err(dw, dw_ref), 1e-5) << "dw";
      EXPECT_LT(t::norm_err(db, db_ref), 1e-5) << "db";
    }
  }
}

TEST(OpsConv2d, FiniteDifferences) {
  // The loss is linear in each of x, w, b: a large step has no truncation error and less rounding noise.
  for (bool fast : {false, true})
    for (const auto& s : {ConvShape{1, 7, 6, 2, 3, 3, 2, 1}, ConvShape{2, 9, 7, 3, 5, 7, 4, 3},
                          ConvShape{1, 7, 7, 3, 2, 3, 3, 0}, ConvShape{2, 5, 5, 2, 3, 3, 1, 1}}) {
      const ConvSizes z = conv_sizes(s);
      auto x = t::uniform(z.nx, 221), w = t::uniform(z.nw, 222), b = t::uniform(s.Cout, 223);
      auto R = t::uniform(z.ny, 224);
      vector<float> y(z.ny), cols(z.ncols), scratch(z.ncols);
      Loss loss = [&] {
        conv_fwd(fast, y.data(), cols.data(), x.data(), w.data(), b.data(), s);
        return t::dot(y, R);
      };
      loss();
      const vector<float> cols0 = cols;
      auto dx = zeros(z.nx), dw = zeros(z.nw), db = zeros(s.Cout);
      conv_bwd(fast, dx.data(), dw.data(), db.data(), scratch.data(), R.data(), cols0.data(), w.data(), s);
      // k = s = 3 on 7x7: row and column 6 of x are unused, their gradient is exactly 0 and FD agrees.
      expect_fd(mode(fast) + " conv2d " + conv_name(s), {{"x", &x, &dx}, {"w", &w, &dw}, {"b", &b, &db}}, loss, 2e-3,
                1e-2f);
    }
}

TEST(OpsConv2d, BackwardAccumulatesAndSkipsNull) {
  const ConvShape s{2, 9, 10, 4, 6, 3, 2, 1};
  const ConvSizes z = conv_sizes(s);
  auto x = t::uniform(z.nx, 231), w = t::uniform(z.nw, 232), b = t::uniform(s.Cout, 233);
  auto dy = t::uniform(z.ny, 234);
  vector<float> y(z.ny), cols(z.ncols), scratch(z.ncols);
  cpu::conv2d_forward(y.data(), cols.data(), x.data(), w.data(), b.data(), s.B, s.H, s.W, s.Cin, s.Cout, s.k, s.s,
                      s.pad);
  for (bool fast : {false, true}) {
    auto dx1 = zeros(z.nx), dw1 = zeros(z.nw), db1 = zeros(s.Cout);
    conv_bwd(fast, dx1.data(), dw1.data(), db1.data(), scratch.data(), dy.data(), cols.data(), w.data(), s);
    auto dx2 = zeros(z.nx), dw2 = zeros(z.nw), db2 = zeros(s.Cout);
    for (int i = 0; i < 2; ++i)
      conv_bwd(fast, dx2.data(), dw2.data(), db2.data(), scratch.data(), dy.data(), cols.data(), w.data(), s);
    EXPECT_LT(t::norm_err(dx2, twice(dx1)), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(dw2, twice(dw1)), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(db2, twice(db1)), 1e-6) << mode(fast);
    // One gradient at a time (the others nullptr) gives the same values; no scratch is needed without dx.
    auto dx3 = zeros(z.nx), dw3 = zeros(z.nw), db3 = zeros(s.Cout);
    conv_bwd(fast, dx3.data(), nullptr, nullptr, scratch.data(), dy.data(), cols.data(), w.data(), s);
    conv_bwd(fast, nullptr, dw3.data(), nullptr, nullptr, dy.data(), cols.data(), w.data(), s);
    conv_bwd(fast, nullptr, nullptr, db3.data(), nullptr, dy.data(), cols.data(), w.data(), s);
    EXPECT_LT(t::norm_err(dx3, dx1), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(dw3, dw1), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(db3, db1), 1e-6) << mode(fast);
    EXPECT_NO_THROW(conv_bwd(fast, nullptr, nullptr, nullptr, nullptr, dy.data(), cols.data(), w.data(), s));
  }
}

TEST(OpsConv2d, RejectsBadArguments) {
  vector<float> a(4096), c(4096), d(4096);
  auto fwd = [&](bool fast, int B, int H, int W, int Cin, int Cout, int k, int s, int pad) {
    (fast ? cpu::conv2d_forward : cpu::conv2d_forward_ref)(a.data(), c.data(), d.data(), d.data(), nullptr, B, H, W,
                                                           Cin, Cout, k, s, pad);
  };
  for (bool fast : {false, true}) {
    SCOPED_TRACE(mode(fast));
    EXPECT_NO_THROW(fwd(fast, 1, 5, 5, 2, 3, 3, 2, 1));
    EXPECT_THROW(fwd(fast, 0, 5, 5, 2, 3, 3, 2, 1), Error);   // B
    EXPECT_THROW(fwd(fast, 1, 5, 0, 2, 3, 3, 2, 1), Error);   // W
    EXPECT_THROW(fwd(fast, 1, 5, 5, 0, 3, 3, 2, 1), Error);   // Cin
    EXPECT_THROW(fwd(fast, 1, 5, 5, 2, 0, 3, 2, 1), Error);   // Cout
    EXPECT_THROW(fwd(fast, 1, 5, 5, 2, 3, 0, 2, 1), Error);   // k
    EXPECT_THROW(fwd(fast, 1, 5, 5, 2, 3, 3, 0, 1), Error);   // stride
    EXPECT_THROW(fwd(fast, 1, 5, 5, 2, 3, 3, 2, -1), Error);  // padding
    EXPECT_THROW(fwd(fast, 1, 5, 2, 2, 3, 7, 1, 2), Error);   // kernel wider than the padded input
  }
  EXPECT_THROW(cpu::conv2d_cols_floats(1, 3, 3, 1, 5, 1, 0), Error);
  // dx needs the scratch space.
  EXPECT_THROW(
      cpu::conv2d_backward(a.data(), nullptr, nullptr, nullptr, d.data(), c.data(), d.data(), 1, 5, 5, 2, 3, 3, 2, 1),
      Error);
}

TEST(OpsConv2d, IndependentOfThreadCount) {
  // y and dx: every element is computed by one thread in a fixed order (im2col rows, the register tiles of
  // linear_forward / linear_backward, col2im rows). dw goes through sgemm (OpenBLAS), which does not
  // promise it, as in linear_backward.
  if (!cpu::detail::use_avx2()) GTEST_SKIP() << "no AVX2+FMA on this CPU: the portable path uses threaded sgemm";
  const ConvShape s{2, 33, 31, 16, 40, 3, 2, 1};
  const ConvSizes z = conv_sizes(s);
  auto x = t::uniform(z.nx, 241), w = t::uniform(z.nw, 242), b = t::uniform(s.Cout, 243), dy = t::uniform(z.ny, 244);
  auto runs = with_thread_counts([&] {
    vector<float> y(z.ny), cols(z.ncols), scratch(z.ncols), dx = zeros(z.nx), db = zeros(s.Cout);
    conv_fwd(true, y.data(), cols.data(), x.data(), w.data(), b.data(), s);
    conv_bwd(true, dx.data(), nullptr, db.data(), scratch.data(), dy.data(), cols.data(), w.data(), s);
    return concat({&y, &dx, &db});
  });
  EXPECT_EQ(runs[0], runs[1]);  // bitwise
  EXPECT_EQ(runs[0], runs[2]);
}

// =====================================================================================================
// dwconv2d

struct DwShape {
  int B, H, W, C, k;
};
std::string dw_name(const DwShape& s) {
  return "B=" + std::to_string(s.B) + " H=" + std::to_string(s.H) + " W=" + std::to_string(s.W) +
         " C=" + std::to_string(s.C) + " k=" + std::to_string(s.k);
}
struct DwSizes {
  size_t nx, nw;
};
DwSizes dw_sizes(const DwShape& s) { return {size_t(s.B) * s.H * s.W * s.C, size_t(s.C) * s.k * s.k}; }

void dw_fwd(bool fast, float* y, const float* x, const float* w, const float* b, const DwShape& s) {
  (fast ? cpu::dwconv2d_forward : cpu::dwconv2d_forward_ref)(y, x, w, b, s.B, s.H, s.W, s.C, s.k);
}
void dw_bwd(bool fast, float* dx, float* dw, float* db, const float* dy, const float* x, const float* w,
            const DwShape& s) {
  (fast ? cpu::dwconv2d_backward : cpu::dwconv2d_backward_ref)(dx, dw, db, dy, x, w, s.B, s.H, s.W, s.C, s.k);
}

// 1x1 images, a kernel larger than the image (k = 7 on 3x2), C past one 32-channel block, and the
// PVTv2 3x3 on a 14x14 map (OpenMP over rows and channel blocks).
const DwShape kDwShapes[] = {{1, 1, 1, 1, 1}, {1, 1, 1, 3, 3},    {2, 5, 7, 3, 3},    {1, 9, 6, 37, 5},
                             {1, 3, 2, 9, 7}, {2, 13, 11, 40, 3}, {3, 14, 14, 70, 3}, {1, 8, 9, 64, 1}};

TEST(OpsDwConv2d, RefMatchesDirectConvolution) {
  for (const auto& s : kDwShapes)
    for (bool bias : {true, false}) {
      SCOPED_TRACE(dw_name(s) + (bias ? " bias" : " no bias"));
      const DwSizes z = dw_sizes(s);
      auto x = t::uniform(z.nx, 251), w = t::uniform(z.nw, 252), b = t::uniform(s.C, 253);
      vector<float> y(z.nx, 9.0f);
      cpu::dwconv2d_forward_ref(y.data(), x.data(), w.data(), bias ? b.data() : nullptr, s.B, s.H, s.W, s.C, s.k);
      // Conv2d(C, C, k, padding=k//2, groups=C): output channel c sees only input channel c.
      const int p = s.k / 2;
      vector<float> want(z.nx);
      for (int bi = 0; bi < s.B; ++bi)
        for (int c = 0; c < s.C; ++c)
          for (int oy = 0; oy < s.H; ++oy)
            for (int ox = 0; ox < s.W; ++ox) {
              double acc = bias ? b[c] : 0.0;
              for (int ky = 0; ky < s.k; ++ky)
                for (int kx = 0; kx < s.k; ++kx) {
                  const int iy = oy + ky - p, ix = ox + kx - p;
                  if (iy < 0 || iy >= s.H || ix < 0 || ix >= s.W) continue;
                  acc +=
                      double(x[((size_t(bi) * s.H + iy) * s.W + ix) * s.C + c]) * w[(size_t(c) * s.k + ky) * s.k + kx];
                }
              want[((size_t(bi) * s.H + oy) * s.W + ox) * s.C + c] = float(acc);
            }
      EXPECT_LT(t::norm_err(y, want), 1e-6);
    }
}

TEST(OpsDwConv2d, FastMatchesRef) {
  for (const auto& s : kDwShapes)
    for (bool bias : {true, false}) {
      SCOPED_TRACE(dw_name(s) + (bias ? " bias" : " no bias"));
      const DwSizes z = dw_sizes(s);
      auto x = t::uniform(z.nx, 261), w = t::uniform(z.nw, 262), b = t::uniform(s.C, 263);
      const float* bp = bias ? b.data() : nullptr;
      vector<float> y(z.nx, 4.0f), y_ref(z.nx);
      cpu::dwconv2d_forward(y.data(), x.data(), w.data(), bp, s.B, s.H, s.W, s.C, s.k);
      cpu::dwconv2d_forward_ref(y_ref.data(), x.data(), w.data(), bp, s.B, s.H, s.W, s.C, s.k);
      EXPECT_LT(t::norm_err(y, y_ref), 1e-6) << "y";
      auto dy = t::uniform(z.nx, 264);
      auto dx = t::uniform(z.nx, 265), dw = t::uniform(z.nw, 266), db = t::uniform(s.C, 267);
      auto dx_ref = dx, dw_ref = dw, db_ref = db;
      cpu::dwconv2d_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), s.B, s.H, s.W, s.C, s.k);
      cpu::dwconv2d_backward_ref(dx_ref.data(), dw_ref.data(), db_ref.data(), dy.data(), x.data(), w.data(), s.B, s.H,
                                 s.W, s.C, s.k);
      EXPECT_LT(t::norm_err(dx, dx_ref), 1e-6) << "dx";
      EXPECT_LT(t::norm_err(dw, dw_ref), 1e-6) << "dw";
      EXPECT_LT(t::norm_err(db, db_ref), 1e-6) << "db";
    }
}

TEST(OpsDwConv2d, FiniteDifferences) {
  for (bool fast : {false, true})
    for (const auto& s : {DwShape{1, 4, 5, 3, 3}, DwShape{2, 5, 3, 2, 5}, DwShape{1, 3, 3, 5, 1}}) {
      const DwSizes z = dw_sizes(s);
      auto x = t::uniform(z.nx, 271), w = t::uniform(z.nw, 272), b = t::uniform(s.C, 273);
      auto R = t::uniform(z.nx, 274);
      vector<float> y(z.nx);
      Loss loss = [&] {
        dw_fwd(fast, y.data(), x.data(), w.data(), b.data(), s);
        return t::dot(y, R);
      };
      auto dx = zeros(z.nx), dw = zeros(z.nw), db = zeros(s.C);
      dw_bwd(fast, dx.data(), dw.data(), db.data(), R.data(), x.data(), w.data(), s);
      expect_fd(mode(fast) + " dwconv2d " + dw_name(s), {{"x", &x, &dx}, {"w", &w, &dw}, {"b", &b, &db}}, loss, 2e-3,
                1e-2f);
    }
}

TEST(OpsDwConv2d, BackwardAccumulatesAndSkipsNull) {
  const DwShape s{2, 6, 5, 37, 3};
  const DwSizes z = dw_sizes(s);
  auto x = t::uniform(z.nx, 281), w = t::uniform(z.nw, 282), dy = t::uniform(z.nx, 283);
  for (bool fast : {false, true}) {
    auto dx1 = zeros(z.nx), dw1 = zeros(z.nw), db1 = zeros(s.C);
    dw_bwd(fast, dx1.data(), dw1.data(), db1.data(), dy.data(), x.data(), w.data(), s);
    auto dx2 = zeros(z.nx), dw2 = zeros(z.nw), db2 = zeros(s.C);
    for (int i = 0; i < 2; ++i) dw_bwd(fast, dx2.data(), dw2.data(), db2.data(), dy.data(), x.data(), w.data(), s);
    EXPECT_LT(t::norm_err(dx2, twice(dx1)), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(dw2, twice(dw1)), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(db2, twice(db1)), 1e-6) << mode(fast);
    auto dx3 = zeros(z.nx), dw3 = zeros(z.nw), db3 = zeros(s.C);
    dw_bwd(fast, dx3.data(), nullptr, nullptr, dy.data(), x.data(), w.data(), s);
    dw_bwd(fast, nullptr, dw3.data(), nullptr, dy.data(), x.data(), w.data(), s);
    dw_bwd(fast, nullptr, nullptr, db3.data(), dy.data(), nullptr, nullptr, s);  // db needs neither x nor w
    EXPECT_LT(t::norm_err(dx3, dx1), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(dw3, dw1), 1e-6) << mode(fast);
    EXPECT_LT(t::norm_err(db3, db1), 1e-6) << mode(fast);
    EXPECT_NO_THROW(dw_bwd(fast, nullptr, nullptr, nullptr, dy.data(), x.data(), w.data(), s));
  }
}

TEST(OpsDwConv2d, RejectsBadArguments) {
  vector<float> a(1024), c(1024);
  for (bool fast : {false, true}) {
    SCOPED_TRACE(mode(fast));
    auto fwd = fast ? cpu::dwconv2d_forward : cpu::dwconv2d_forward_ref;
    auto bwd = fast ? cpu::dwconv2d_backward : cpu::dwconv2d_backward_ref;
    EXPECT_NO_THROW(fwd(a.data(), c.data(), c.data(), nullptr, 1, 4, 4, 3, 3));
    EXPECT_THROW(fwd(a.data(), c.data(), c.data(), nullptr, 1, 4, 4, 3, 2), Error);  // even k
    EXPECT_THROW(fwd(a.data(), c.data(), c.data(), nullptr, 1, 4, 4, 3, 0), Error);
    EXPECT_THROW(fwd(a.data(), c.data(), c.data(), nullptr, 1, 4, 4, 0, 3), Error);   // C
    EXPECT_THROW(fwd(a.data(), c.data(), c.data(), nullptr, 0, 4, 4, 3, 3), Error);   // B
    EXPECT_THROW(fwd(a.data(), c.data(), c.data(), nullptr, 1, -4, 4, 3, 3), Error);  // H
    EXPECT_THROW(bwd(a.data(), nullptr, nullptr, c.data(), c.data(), c.data(), 1, 4, 4, 3, 4), Error);
  }
}

TEST(OpsDwConv2d, IndependentOfThreadCount) {
  const DwShape s{3, 14, 14, 70, 3};  // 3 channel blocks, 42 rows
  const DwSizes z = dw_sizes(s);
  auto x = t::uniform(z.nx, 291), w = t::uniform(z.nw, 292), b = t::uniform(s.C, 293), dy = t::uniform(z.nx, 294);
  auto runs = with_thread_counts([&] {
    vector<float> y(z.nx), dx = zeros(z.nx), dw = zeros(z.nw), db = zeros(s.C);
    dw_fwd(true, y.data(), x.data(), w.data(), b.data(), s);
    dw_bwd(true, dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), s);
    return concat({&y, &dx, &dw, &db});
  });
  EXPECT_EQ(runs[0], runs[1]);  // bitwise
  EXPECT_EQ(runs[0], runs[2]);
}

// =====================================================================================================
// attention with separate queries and keys/values

struct QkvShape {
  int B, N, Nk, C, H;
};
std::string qkv_name(const QkvShape& s) {
  return "B=" + std::to_string(s.B) + " N=" + std::to_string(s.N) + " Nk=" + std::to_string(s.Nk) +
         " C=" + std::to_string(s.C) + " H=" + std::to_string(s.H) + " d=" + std::to_string(s.C / s.H);
}
struct QkvSizes {
  size_t nq, nkv, natt;
};
QkvSizes qkv_sizes(const QkvShape& s) {
  return {size_t(s.B) * s.N * s.C, size_t(s.B) * s.Nk * 2 * s.C, size_t(s.B) * s.H * s.N * s.Nk};
}

void qkv_fwd(bool fast, float* out, float* att, const float* q, const float* kv, const QkvShape& s) {
  (fast ? cpu::attention_q_kv_forward : cpu::attention_q_kv_forward_ref)(out, att, q, kv, s.B, s.N, s.Nk, s.C, s.H);
}
void qkv_bwd(bool fast, float* dq, float* dkv, float* scratch, const float* dout, const float* q, const float* kv,
             const float* att, const QkvShape& s) {
  (fast ? cpu::attention_q_kv_backward : cpu::attention_q_kv_backward_ref)(dq, dkv, scratch, dout, q, kv, att, s.B, s.N,
                                                                           s.Nk, s.C, s.H);
}

// Nk < N (PVTv2's spatial reduction), Nk = 1 (the last reduction to a single token), N = Nk, Nk > N, d = 24
// with a 20-column (masked) head, one head of 64, and enough pairs for OpenMP.
const QkvShape kQkvShapes[] = {{2, 13, 5, 12, 3},  {1, 7, 1, 8, 2},   {2, 9, 9, 12, 3},    {3, 17, 20, 40, 2},
                               {1, 50, 13, 96, 4}, {1, 37, 8, 64, 1}, {4, 197, 49, 64, 2}, {2, 1, 3, 6, 2}};

TEST(OpsAttentionQKv, RefMatchesHandComputation) {
  // B=1, N=2 queries, Nk=3 keys, C=2, H=2 (d=1, scale 1). Head 0: q = (1, 0), keys k0 = (1, 0, 2),
  // values v0 = (10, 20, 30); head 1: q = (0, 2), keys k1 = (3, 1, -1), values v1 = (1, 2, 3).
  const float q[4] = {1, 0, 0, 2};
  const float kv[12] = {1, 3,  10, 1,   // key token 0: k (head 0, head 1), v (head 0, head 1)
                        0, 1,  20, 2,   // key token 1
                        2, -1, 30, 3};  // key token 2
  float out[4], att[12];
  cpu::attention_q_kv_forward_ref(out, att, q, kv, 1, 2, 3, 2, 2);
  auto softmax3 = [](double a, double b, double c, int i) {
    const double e[3] = {std::exp(a), std::exp(b), std::exp(c)};
    return e[i] / (e[0] + e[1] + e[2]);
  };
  // Head 0, query 0: scores (1, 0, 2); query 1: scores (0, 0, 0).
  for (int j = 0; j < 3; ++j) EXPECT_NEAR(att[j], softmax3(1, 0, 2, j), 1e-6);
  EXPECT_NEAR(out[0], 10 * softmax3(1, 0, 2, 0) + 20 * softmax3(1, 0, 2, 1) + 30 * softmax3(1, 0, 2, 2), 1e-5);
  EXPECT_NEAR(out[2], 20.0, 1e-5);
  // Head 1, query 0: scores (0, 0, 0); query 1: scores (6, 2, -2).
  EXPECT_NEAR(att[6 + 1], 1.0 / 3.0, 1e-6);
  EXPECT_NEAR(out[1], 2.0, 1e-5);
  EXPECT_NEAR(out[3], 1 * softmax3(6, 2, -2, 0) + 2 * softmax3(6, 2, -2, 1) + 3 * softmax3(6, 2, -2, 2), 1e-5);
}

TEST(OpsAttentionQKv, FastMatchesRef) {
  for (bool portable : {false, true}) {
    PortableScope scope(portable);
    for (const auto& s : kQkvShapes) {
      SCOPED_TRACE(path_name(portable) + " " + qkv_name(s));
      const QkvSizes z = qkv_sizes(s);
      auto q = t::uniform(z.nq, 401, -2.0f, 2.0f), kv = t::uniform(z.nkv, 402, -2.0f, 2.0f);
      vector<float> out(z.nq, 3.0f), att(z.natt, 3.0f), out_ref(z.nq), att_ref(z.natt);
      cpu::attention_q_kv_forward(out.data(), att.data(), q.data(), kv.data(), s.B, s.N, s.Nk, s.C, s.H);
      cpu::attention_q_kv_forward_ref(out_ref.data(), att_ref.data(), q.data(), kv.data(), s.B, s.N, s.Nk, s.C, s.H);
      EXPECT_LT(t::norm_err(out, out_ref), 1e-5) << "out";
      EXPECT_LT(t::norm_err(att, att_ref), 1e-5) << "att";
      auto dout = t::uniform(z.nq, 403), dq = t::uniform(z.nq, 404), dkv = t::uniform(z.nkv, 405);
      auto dq_ref = dq, dkv_ref = dkv;
      vector<float> scratch(z.natt);
      cpu::attention_q_kv_backward(dq.data(), dkv.data(), scratch.data(), dout.data(), q.data(), kv.data(),
                                   att_ref.data(), s.B, s.N, s.Nk, s.C, s.H);
      cpu::attention_q_kv_backward_ref(dq_ref.data(), dkv_ref.data(), nullptr, dout.data(), q.data(), kv.data(),
                                       att_ref.data(), s.B, s.N, s.Nk, s.C, s.H);
      EXPECT_LT(t::norm_err(dq, dq_ref), 1e-5) << "dq";
      EXPECT_LT(t::norm_err(dkv, dkv_ref), 1e-5) << "dkv";
    }
  }
}

TEST(OpsAttentionQKv, FiniteDifferences) {
  for (bool fast : {false, true})
    for (const auto& s : {QkvShape{2, 5, 3, 4, 2}, QkvShape{1, 7, 1, 6, 3}, QkvShape{1, 3, 7, 26, 2}}) {
      const QkvSizes z = qkv_sizes(s);
      auto q = t::uniform(z.nq, 411, -1.5f, 1.5f), kv = t::uniform(z.nkv, 412, -1.5f, 1.5f);
      auto R = t::uniform(z.nq, 413);
      vector<float> out(z.nq), att(z.natt), scratch(z.natt);
      Loss loss = [&] {
        qkv_fwd(fast, out.data(), att.data(), q.data(), kv.data(), s);
        return t::dot(out, R);
      };
      loss();
      const vector<float> att0 = att;
      auto dq = zeros(z.nq), dkv = zeros(z.nkv);
      qkv_bwd(fast, dq.data(), dkv.data(), scratch.data(), R.data(), q.data(), kv.data(), att0.data(), s);
      // Nk = 1: att is all ones, dq is exactly 0 and FD agrees.
      expect_fd(mode(fast) + " attention_q_kv " + qkv_name(s), {{"q", &q, &dq}, {"kv", &kv, &dkv}}, loss, 1e-2);
    }
}

TEST(OpsAttentionQKv, MatchesFusedQkvAttention) {
  // With kv = the k and v columns of a fused qkv (Nk = N), attention_q_kv is attention_forward/_backward.
  for (bool portable : {false, true}) {
    PortableScope scope(portable);
    for (const auto& s : {QkvShape{2, 13, 13, 12, 3}, QkvShape{3, 50, 50, 96, 4}, QkvShape{1, 1, 1, 4, 2}}) {
      SCOPED_TRACE(path_name(portable) + " " + qkv_name(s));
      const QkvSizes z = qkv_sizes(s);
      const size_t C = s.C, C3 = 3 * C, C2 = 2 * C, rows = size_t(s.B) * s.N;
      auto qkv = t::uniform(rows * C3, 421, -2.0f, 2.0f), dout = t::uniform(z.nq, 422);
      vector<float> q(z.nq), kv(z.nkv);
      for (size_t r = 0; r < rows; ++r)
        for (size_t c = 0; c < C3; ++c) (c < C ? q[r * C + c] : kv[r * C2 + c - C]) = qkv[r * C3 + c];
      for (bool fast : {false, true}) {
        SCOPED_TRACE(mode(fast));
        vector<float> out(z.nq), att(z.natt), out_f(z.nq), att_f(z.natt), scratch(z.natt);
        qkv_fwd(fast, out.data(), att.data(), q.data(), kv.data(), s);
        (fast ? cpu::attention_forward : cpu::attention_forward_ref)(out_f.data(), att_f.data(), qkv.data(), s.B, s.N,
                                                                     s.C, s.H);
        EXPECT_LT(t::norm_err(out, out_f), 1e-6) << "out";
        EXPECT_LT(t::norm_err(att, att_f), 1e-6) << "att";
        auto dq = zeros(z.nq), dkv = zeros(z.nkv), dqkv = zeros(qkv.size());
        qkv_bwd(fast, dq.data(), dkv.data(), scratch.data(), dout.data(), q.data(), kv.data(), att_f.data(), s);
        (fast ? cpu::attention_backward : cpu::attention_backward_ref)(dqkv.data(), scratch.data(), dout.data(),
                                                                       qkv.data(), att_f.data(), s.B, s.N, s.C, s.H);
        vector<float> joined(qkv.size());
        for (size_t r = 0; r < rows; ++r)
          for (size_t c = 0; c < C3; ++c) joined[r * C3 + c] = c < C ? dq[r * C + c] : dkv[r * C2 + c - C];
        EXPECT_LT(t::norm_err(joined, dqkv), 1e-6) << "dq, dkv";
      }
    }
  }
}

TEST(OpsAttentionQKv, BackwardAccumulatesAndChecksArgs) {
  const QkvShape s{2, 13, 5, 12, 3};
  const QkvSizes z = qkv_sizes(s);
  auto q = t::uniform(z.nq, 431), kv = t::uniform(z.nkv, 432), dout = t::uniform(z.nq, 433);
  vector<float> out(z.nq), att(z.natt), scratch(z.natt);
  cpu::attention_q_kv_forward(out.data(), att.data(), q.data(), kv.data(), s.B, s.N, s.Nk, s.C, s.H);
  for (bool portable : {false, true}) {
    PortableScope scope(portable);
    for (bool fast : {false, true}) {
      SCOPED_TRACE(path_name(portable) + " " + mode(fast));
      auto dq1 = zeros(z.nq), dkv1 = zeros(z.nkv);
      qkv_bwd(fast, dq1.data(), dkv1.data(), scratch.data(), dout.data(), q.data(), kv.data(), att.data(), s);
      auto dq2 = zeros(z.nq), dkv2 = zeros(z.nkv);
      for (int i = 0; i < 2; ++i)
        qkv_bwd(fast, dq2.data(), dkv2.data(), scratch.data(), dout.data(), q.data(), kv.data(), att.data(), s);
      EXPECT_LT(t::norm_err(dq2, twice(dq1)), 1e-6);
      EXPECT_LT(t::norm_err(dkv2, twice(dkv1)), 1e-6);
      auto dq3 = zeros(z.nq), dkv3 = zeros(z.nkv);
      qkv_bwd(fast, dq3.data(), nullptr, scratch.data(), dout.data(), q.data(), kv.data(), att.data(), s);
      qkv_bwd(fast, nullptr, dkv3.data(), scratch.data(), dout.data(), q.data(), kv.data(), att.data(), s);
      EXPECT_LT(t::norm_err(dq3, dq1), 1e-6);
      EXPECT_LT(t::norm_err(dkv3, dkv1), 1e-6);
      EXPECT_NO_THROW(qkv_bwd(fast, nullptr, nullptr, nullptr, dout.data(), q.data(), kv.data(), att.data(), s));
    }
  }
  for (bool fast : {false, true}) {
    SCOPED_TRACE(mode(fast));
    auto fwd = fast ? cpu::attention_q_kv_forward : cpu::attention_q_kv_forward_ref;
    EXPECT_THROW(fwd(out.data(), att.data(), q.data(), kv.data(), 1, 13, 5, 12, 5), Error);  // 12 % 5
    EXPECT_THROW(fwd(out.data(), att.data(), q.data(), kv.data(), 1, 13, 0, 12, 3), Error);  // Nk
    EXPECT_THROW(fwd(out.data(), att.data(), q.data(), kv.data(), 1, 0, 5, 12, 3), Error);   // N
    EXPECT_THROW(fwd(out.data(), att.data(), q.data(), kv.data(), 0, 13, 5, 12, 3), Error);  // B
  }
  auto dq = zeros(z.nq);
  EXPECT_THROW(cpu::attention_q_kv_backward(dq.data(), nullptr, nullptr, dout.data(), q.data(), kv.data(), att.data(),
                                            s.B, s.N, s.Nk, s.C, s.H),
               Error);  // scratch
}

TEST(OpsAttentionQKv, IndependentOfThreadCount) {
  if (!cpu::detail::use_avx2()) GTEST_SKIP() << "no AVX2+FMA on this CPU: the portable path uses sgemm";
  const QkvShape s{4, 197, 49, 64, 2};
  const QkvSizes z = qkv_sizes(s);
  auto q = t::uniform(z.nq, 441), kv = t::uniform(z.nkv, 442), dout = t::uniform(z.nq, 443);
  auto runs = with_thread_counts([&] {
    vector<float> out(z.nq), att(z.natt), scratch(z.natt), dq = zeros(z.nq), dkv = zeros(z.nkv);
    qkv_fwd(true, out.data(), att.data(), q.data(), kv.data(), s);
    qkv_bwd(true, dq.data(), dkv.data(), scratch.data(), dout.data(), q.data(), kv.data(), att.data(), s);
    return concat({&out, &att, &dq, &dkv});
  });
  EXPECT_EQ(runs[0], runs[1]);  // bitwise
  EXPECT_EQ(runs[0], runs[2]);
}

}  // namespace
