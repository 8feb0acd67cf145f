// Benchmark: the shift linear layer y = x W^T + b, W = s 2^p, on the CPU.
//   sgemm          dense fp32 product through sav::sgemm (the multiplication baseline, same shapes)
//   shift_float    shift_linear_forward: materialise W from (p, s), then sgemm (the training path)
//   shift_int      shift_linear_forward_int: the multiplier-free MatShift kernel, Q16.16 activations,
//                  ISA picked at run time (avx2 or scalar); shift_int_scalar forces the portable kernel.
// Shapes (M rows, K in, F out): DeiT-Tiny MLP fc1 (K=192, F=768) and fc2 (K=768, F=192) at batch 1
// (M=197) and batch 64 (M=64*197); a Fashion-MNIST ViT linear (M=50*64, K=64, F=128).
// Counter GMACs = M*K*F / time (multiply-accumulates, or shift-adds, per second), always the dense
// count. Weights: a dense N(0, 0.02) matrix converted by shift_from_dense (all nonzero, as a converted
// checkpoint); shift_int also runs with zero_pct=33 (a third zeroed) to show what zero skipping buys.
// Threads: OMP_NUM_THREADS (the BLAS follows it). The CPU column is the main thread's CPU time.
//
//   cmake -DSAV_BUILD_BENCH=ON ... && ./bench_shift --benchmark_min_time=0.2
//   OMP_NUM_THREADS=1 ./bench_shift      # single-core efficiency, less sensitive to a busy machine
#include <benchmark/benchmark.h>

#include <vector>

#include "core/blas.h"
#include "core/cpu_features.h"
#include "core/rng.h"
#include "ops/cpu/shift_linear.h"

namespace {

using namespace sav::cpu;

struct Problem {
  int M, K, F;
  std::vector<float> x, p, s, b, w, y, scratch;
  ShiftKernelWeights kw;
  // Weights: a dense N(0, 0.02) weight (DeiT-like) converted with shift_from_dense, so every weight is
  // nonzero and exponents spread over [-14, 0] with most near -6; zero_pct of them are then zeroed (the
  // int kernel skips zeros; the float path and sgemm do not care).
  Problem(int M_, int K_, int F_, int zero_pct = 0) : M(M_), K(K_), F(F_) {
    sav::Rng rng(42);
    const size_t nx = static_cast<size_t>(M) * K, nw = static_cast<size_t>(F) * K;
    x.resize(nx);
    for (auto& v : x) v = rng.normal();
    std::vector<float> dense(nw);
    for (auto& v : dense) v = rng.trunc_normal(0.02f);
    p.resize(nw);
    s.resize(nw);
    shift_from_dense(p.data(), s.data(), dense.data(), F, K, shift_default_pmin, shift_default_pmax);
    for (auto& v : s)
      if (static_cast<int>(rng.below(100)) < zero_pct) v = 0.0f;
    b.resize(F);
    for (auto& v : b) v = rng.uniform(-0.1f, 0.1f);
    w.resize(nw);
    shift_linear_weights(w.data(), p.data(), s.data(), F, K, shift_default_pmin, shift_default_pmax);
    y.resize(static_cast<size_t>(M) * F);
    scratch.resize(nw);
    kw = shift_kernel_prepare(p.data(), s.data(), F, K, shift_default_pmin, shift_default_pmax);
  }
  void report(benchmark::State& st) const {
    st.counters["GMACs"] = benchmark::Counter(static_cast<double>(M) * K * F * 1e-9 * st.iterations(),
                                              benchmark::Counter::kIsRate);
  }
};

void bm_sgemm(benchmark::State& st) {
  Problem pr(st.range(0), st.range(1), st.range(2));
  for (auto _ : st) {
    sav::sgemm(false, true, pr.M, pr.F, pr.K, 1.0f, pr.x.data(), pr.K, pr.w.data(), pr.K, 0.0f, pr.y.data(), pr.F);
    benchmark::DoNotOptimize(pr.y.data());
  }
  pr.report(st);
}

void bm_shift_float(benchmark::State& st) {
  Problem pr(st.range(0), st.range(1), st.range(2));
  for (auto _ : st) {
    shift_linear_forward(pr.y.data(), pr.x.data(), pr.p.data(), pr.s.data(), pr.b.data(), pr.M, pr.K, pr.F,
                         shift_default_pmin, shift_default_pmax, pr.scratch.data());
    benchmark::DoNotOptimize(pr.y.data());
  }
  pr.report(st);
}

void run_int(benchmark::State& st, ShiftIntIsa isa) {
  Problem pr(st.range(0), st.range(1), st.range(2), st.range(3));
  st.SetLabel(shift_int_isa_name(isa));
  for (auto _ : st) {
    shift_linear_forward_int(pr.y.data(), pr.x.data(), pr.kw, pr.b.data(), pr.M, pr.K, pr.F,
                             shift_default_frac_bits, isa);
    benchmark::DoNotOptimize(pr.y.data());
  }
  pr.report(st);
}
void bm_shift_int(benchmark::State& st) { run_int(st, shift_isa_auto); }
void bm_shift_int_scalar(benchmark::State& st) { run_int(st, shift_isa_scalar); }

void add_shapes(benchmark::internal::Benchmark* b, bool with_zeros) {
  b->ArgNames({"M", "K", "F", "zero_pct"});
  const int shapes[][3] = {{197, 192, 768}, {197, 768, 192}, {64 * 197, 192, 768}, {64 * 197, 768, 192},
                           {50 * 64, 64, 128}};
  for (const auto& sh : shapes) {
    b->Args({sh[0], sh[1], sh[2], 0});
    if (with_zeros) b->Args({sh[0], sh[1], sh[2], 33});
  }
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}
void shapes(benchmark::internal::Benchmark* b) { add_shapes(b, false); }
void shapes_zeros(benchmark::internal::Benchmark* b) { add_shapes(b, true); }

BENCHMARK(bm_sgemm)->Apply(shapes);
BENCHMARK(bm_shift_float)->Apply(shapes);
BENCHMARK(bm_shift_int)->Apply(shapes_zeros);
BENCHMARK(bm_shift_int_scalar)->Apply(shapes);

}  // namespace

int main(int argc, char** argv) {
  benchmark::AddCustomContext("cpu_features", sav::cpu_features_str());
  benchmark::AddCustomContext("threads", std::to_string(sav::num_threads()));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
