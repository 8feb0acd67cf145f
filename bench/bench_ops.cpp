// shiftaddvit: Google Benchmark of the dense CPU ops, fast path against reference, at DeiT-Tiny shapes:
// batch 8, N = 197 tokens (M = 197*8 rows), C = 192, H = 3 heads (d = 64), MLP hidden 768, 224x224 images
// with 16x16 patches, 1000 classes.
//
//   cmake -S . -B build -DSAV_BUILD_BENCH=ON && ninja -C build bench_ops
//   build/bench_ops --benchmark_filter='attention'            # only the attention cases
//
// Each case is named <op>_<forward|backward>/<fast|ref>; FLOP-counted ops report "flops" (per second).
#include <benchmark/benchmark.h>

#include <vector>

#include "core/rng.h"
#include "ops/cpu/ops.h"

namespace {

using std::vector;
namespace cpu = sav::cpu;

constexpr int kB = 8, kN = 197, kM = kB * kN, kC = 192, kH = 3, kHidden = 4 * kC;
constexpr int kImg = 224, kPatch = 16, kCin = 3, kClasses = 1000;

vector<float> rnd(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  sav::Rng rng(seed);
  vector<float> v(n);
  for (auto& x : v) x = rng.uniform(lo, hi);
  return v;
}

void set_flops(benchmark::State& st, double flops_per_iter) {
  st.counters["flops"] = benchmark::Counter(flops_per_iter, benchmark::Counter::kIsIterationInvariantRate);
}

// ---- linear (fc1 of the MLP: K = C, F = 4C) ----

void linear_forward(benchmark::State& st, bool fast) {
  const int M = kM, K = kC, F = kHidden;
  auto x = rnd(size_t(M) * K, 1), w = rnd(size_t(F) * K, 2), b = rnd(F, 3);
  vector<float> y(size_t(M) * F);
  auto fn = fast ? cpu::linear_forward : cpu::linear_forward_ref;
  for (auto _ : st) {
    fn(y.data(), x.data(), w.data(), b.data(), M, K, F);
    benchmark::DoNotOptimize(y.data());
  }
  set_flops(st, 2.0 * M * K * F);
}

void linear_backward(benchmark::State& st, bool fast) {
  const int M = kM, K = kC, F = kHidden;
  auto x = rnd(size_t(M) * K, 1), w = rnd(size_t(F) * K, 2), dy = rnd(size_t(M) * F, 4);
  vector<float> dx(x.size()), dw(w.size()), db(F);
  auto fn = fast ? cpu::linear_backward : cpu::linear_backward_ref;
  for (auto _ : st) {
    fn(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), M, K, F);
    benchmark::DoNotOptimize(dx.data());
  }
  set_flops(st, 4.0 * M * K * F);
}

// ---- layernorm ----

void layernorm_forward(benchmark::State& st, bool fast) {
  auto x = rnd(size_t(kM) * kC, 5), w = rnd(kC, 6), b = rnd(kC, 7);
  vector<float> y(x.size()), mean(kM), rstd(kM);
  auto fn = fast ? cpu::layernorm_forward : cpu::layernorm_forward_ref;
  for (auto _ : st) {
    fn(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), kM, kC, 1e-6f);
    benchmark::DoNotOptimize(y.data());
  }
  st.SetItemsProcessed(st.iterations() * int64_t(kM) * kC);
}

void layernorm_backward(benchmark::State& st, bool fast) {
  auto x = rnd(size_t(kM) * kC, 5), w = rnd(kC, 6), b = rnd(kC, 7), dy = rnd(x.size(), 8);
  vector<float> y(x.size()), mean(kM), rstd(kM), dx(x.size()), dw(kC), db(kC);
  cpu::layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), kM, kC, 1e-6f);
  auto fn = fast ? cpu::layernorm_backward : cpu::layernorm_backward_ref;
  for (auto _ : st) {
    fn(dx.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), mean.data(), rstd.data(), kM, kC);
    benchmark::DoNotOptimize(dx.data());
  }
  st.SetItemsProcessed(st.iterations() * int64_t(kM) * kC);
}

// ---- gelu (the MLP hidden activations: M x 4C) ----

void gelu_forward(benchmark::State& st, bool fast) {
  const int64_t n = int64_t(kM) * kHidden;
  auto x = rnd(n, 9, -4.0f, 4.0f);
  vector<float> y(n);
  auto fn = fast ? cpu::gelu_forward : cpu::gelu_forward_ref;
  for (auto _ : st) {
    fn(y.data(), x.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  st.SetItemsProcessed(st.iterations() * n);
}

void gelu_backward(benchmark::State& st, bool fast) {
  const int64_t n = int64_t(kM) * kHidden;
  auto x = rnd(n, 9, -4.0f, 4.0f), dy = rnd(n, 10);
  vector<float> dx(n);
  auto fn = fast ? cpu::gelu_backward : cpu::gelu_backward_ref;
  for (auto _ : st) {
    fn(dx.data(), dy.data(), x.data(), n);
    benchmark::DoNotOptimize(dx.data());
  }
  st.SetItemsProcessed(st.iterations() * n);
}

// ---- attention ----

void attention_forward(benchmark::State& st, bool fast) {
  auto qkv = rnd(size_t(kM) * 3 * kC, 11);
  vector<float> out(size_t(kM) * kC), att(size_t(kB) * kH * kN * kN);
  auto fn = fast ? cpu::attention_forward : cpu::attention_forward_ref;
  for (auto _ : st) {
    fn(out.data(), att.data(), qkv.data(), kB, kN, kC, kH);
    benchmark::DoNotOptimize(out.data());
  }
  set_flops(st, 4.0 * kB * kH * kN * kN * (kC / kH));
}

void attention_backward(benchmark::State& st, bool fast) {
  auto qkv = rnd(size_t(kM) * 3 * kC, 11), dout = rnd(size_t(kM) * kC, 12);
  vector<float> out(size_t(kM) * kC), att(size_t(kB) * kH * kN * kN), scratch(att.size()), dqkv(qkv.size());
  cpu::attention_forward(out.data(), att.data(), qkv.data(), kB, kN, kC, kH);
  auto fn = fast ? cpu::attention_backward : cpu::attention_backward_ref;
  for (auto _ : st) {
    fn(dqkv.data(), scratch.data(), dout.data(), qkv.data(), att.data(), kB, kN, kC, kH);
    benchmark::DoNotOptimize(dqkv.data());
  }
  set_flops(st, 8.0 * kB * kH * kN * kN * (kC / kH));
}

// ---- patch embedding ----

constexpr int kGrid = kImg / kPatch, kP = kGrid * kGrid, kK = kCin * kPatch * kPatch;

void patch_embed_forward(benchmark::State& st, bool fast) {
  auto img = rnd(size_t(kB) * kCin * kImg * kImg, 13), w = rnd(size_t(kC) * kK, 14), b = rnd(kC, 15);
  vector<float> out(size_t(kB) * kP * kC), cols(size_t(kB) * kP * kK);
  auto fn = fast ? cpu::patch_embed_forward : cpu::patch_embed_forward_ref;
  for (auto _ : st) {
    fn(out.data(), cols.data(), img.data(), w.data(), b.data(), kB, kCin, kImg, kPatch, kC);
    benchmark::DoNotOptimize(out.data());
  }
  set_flops(st, 2.0 * kB * kP * kK * kC);
}

void patch_embed_backward(benchmark::State& st, bool fast) {
  auto img = rnd(size_t(kB) * kCin * kImg * kImg, 13), w = rnd(size_t(kC) * kK, 14), b = rnd(kC, 15);
  vector<float> out(size_t(kB) * kP * kC), cols(size_t(kB) * kP * kK), dimg(img.size()), dw(w.size()), db(kC);
  auto dout = rnd(out.size(), 16);
  cpu::patch_embed_forward(out.data(), cols.data(), img.data(), w.data(), b.data(), kB, kCin, kImg, kPatch, kC);
  auto fn = fast ? cpu::patch_embed_backward : cpu::patch_embed_backward_ref;
  const bool with_dimg = st.range(0) != 0;
  for (auto _ : st) {
    fn(with_dimg ? dimg.data() : nullptr, dw.data(), db.data(), dout.data(), cols.data(), w.data(), kB, kCin, kImg,
       kPatch, kC);
    benchmark::DoNotOptimize(dw.data());
  }
  set_flops(st, (with_dimg ? 4.0 : 2.0) * kB * kP * kK * kC);
}

// ---- cross-entropy (B = 8 * 32 rows of 1000 classes) ----

constexpr int kCeRows = 256;

void cross_entropy_forward(benchmark::State& st, bool fast) {
  auto logits = rnd(size_t(kCeRows) * kClasses, 17, -5.0f, 5.0f);
  vector<int> targets(kCeRows);
  for (int i = 0; i < kCeRows; ++i) targets[i] = (i * 37) % kClasses;
  vector<float> probs(logits.size());
  auto fn = fast ? cpu::cross_entropy_forward : cpu::cross_entropy_forward_ref;
  for (auto _ : st) benchmark::DoNotOptimize(fn(probs.data(), logits.data(), targets.data(), kCeRows, kClasses, 0.1f));
  st.SetItemsProcessed(st.iterations() * int64_t(kCeRows) * kClasses);
}

void cross_entropy_backward(benchmark::State& st, bool fast) {
  auto probs = rnd(size_t(kCeRows) * kClasses, 18, 0.0f, 0.002f);
  vector<int> targets(kCeRows);
  for (int i = 0; i < kCeRows; ++i) targets[i] = (i * 37) % kClasses;
  vector<float> dl(probs.size());
  auto fn = fast ? cpu::cross_entropy_backward : cpu::cross_entropy_backward_ref;
  for (auto _ : st) {
    fn(dl.data(), probs.data(), targets.data(), kCeRows, kClasses, 0.1f, 1.0f);
    benchmark::DoNotOptimize(dl.data());
  }
  st.SetItemsProcessed(st.iterations() * int64_t(kCeRows) * kClasses);
}

// ---- residual add (M x C) ----

void add_inplace(benchmark::State& st) {
  const int64_t n = int64_t(kM) * kC;
  auto y = rnd(n, 19), x = rnd(n, 20);
  for (auto _ : st) {
    cpu::add_inplace(y.data(), x.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  st.SetItemsProcessed(st.iterations() * n);
}

#define SAV_BENCH_PAIR(fn)                                          \
  BENCHMARK_CAPTURE(fn, fast, true)->Unit(benchmark::kMillisecond); \
  BENCHMARK_CAPTURE(fn, ref, false)->Unit(benchmark::kMillisecond)

SAV_BENCH_PAIR(linear_forward);
SAV_BENCH_PAIR(linear_backward);
SAV_BENCH_PAIR(layernorm_forward);
SAV_BENCH_PAIR(layernorm_backward);
SAV_BENCH_PAIR(gelu_forward);
SAV_BENCH_PAIR(gelu_backward);
SAV_BENCH_PAIR(attention_forward);
SAV_BENCH_PAIR(attention_backward);
SAV_BENCH_PAIR(patch_embed_forward);
// Argument: 1 also computes dimg (not needed when the image is the input).
BENCHMARK_CAPTURE(patch_embed_backward, fast, true)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(patch_embed_backward, ref, false)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond);
SAV_BENCH_PAIR(cross_entropy_forward);
SAV_BENCH_PAIR(cross_entropy_backward);
BENCHMARK(add_inplace)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
