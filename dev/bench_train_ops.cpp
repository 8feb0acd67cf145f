// shiftaddvit dev tool: stand-alone timing of each dense CPU op at the training shapes of vit_fmnist
// (B=128: M=6400, C=96, 3C=288, F=192, H=4, N=50) and deit_tiny (B=8: M=1576, C=192, 3C=576, F=768, H=3,
// N=197), plus batch-1 inference shapes. Not part of the library or the test binary.
//
// Build (from the repository root; the library sources are compiled in, no CMake needed):
//   g++ -std=c++20 -O3 -fno-math-errno -fopenmp -Isrc -I/usr/include/x86_64-linux-gnu/openblas-openmp \
//     dev/bench_train_ops.cpp src/core/*.cpp src/ops/cpu/{linear,layernorm,gelu,attention,elementwise,\
//     cross_entropy,patch_embed}.cpp src/models/params.cpp src/train/optim.cpp \
//     -L/usr/lib/x86_64-linux-gnu/openblas-openmp -lopenblas -lz -o /tmp/bench_train_ops
// Run:
//   OMP_WAIT_POLICY=passive /tmp/bench_train_ops --threads 1 --reps 30 [--filter attention]
//
// Each op is run `reps` times after two warm-up runs; printed are the minimum and the median wall time
// and, with one thread, the minimum thread CPU time (robust when the machine is shared: time the thread
// spent descheduled does not count). GFLOP/s is given for the products (2 flops per multiply-add).
#include <omp.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "core/blas.h"
#include "core/cpu_features.h"
#include "core/rng.h"
#include "models/params.h"
#include "ops/cpu/ops.h"
#include "train/optim.h"

namespace {

struct Options {
  int threads = 1;
  int reps = 20;
  std::string filter;
};

double thread_cpu_ms() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

double wall_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::vector<float> randn(size_t n, uint64_t seed, float std = 1.0f) {
  sav::Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = rng.normal() * std;
  return v;
}

void run(const Options& o, const std::string& name, double flops, const std::function<void()>& f) {
  if (!o.filter.empty() && name.find(o.filter) == std::string::npos) return;
  f();
  f();
  std::vector<double> wall, cpu;
  for (int r = 0; r < o.reps; ++r) {
    const double w0 = wall_ms(), c0 = thread_cpu_ms();
    f();
    cpu.push_back(thread_cpu_ms() - c0);
    wall.push_back(wall_ms() - w0);
  }
  std::sort(wall.begin(), wall.end());
  std::sort(cpu.begin(), cpu.end());
  const double best = o.threads == 1 ? cpu[0] : wall[0];
  std::printf("%-34s %9.3f %9.3f %9.3f", name.c_str(), wall[0], wall[wall.size() / 2], o.threads == 1 ? cpu[0] : 0.0);
  if (flops > 0) std::printf(" %8.1f", flops / (best * 1e6));
  std::printf("\n");
  std::fflush(stdout);
}

struct Shapes {
  const char* tag;
  int B, N, C, H, F;
};

void bench_shapes(const Options& o, const Shapes& s) {
  using namespace sav::cpu;
  const int B = s.B, N = s.N, C = s.C, H = s.H, F = s.F, M = B * N;
  const std::string t = std::string(s.tag) + " ";
  auto x = randn(size_t(M) * C, 1), xf = randn(size_t(M) * F, 2), xq = randn(size_t(M) * 3 * C, 3, 0.5f);
  auto w_qkv = randn(size_t(3) * C * C, 4, 0.05f), w_proj = randn(size_t(C) * C, 5, 0.05f);
  auto w_fc1 = randn(size_t(F) * C, 6, 0.05f), w_fc2 = randn(size_t(C) * F, 7, 0.05f);
  auto bias = randn(size_t(std::max(3 * C, F)), 8, 0.1f);
  auto lnw = randn(C, 9, 0.1f), lnb = randn(C, 10, 0.1f);
  for (auto& v : lnw) v += 1.0f;
  std::vector<float> y(size_t(M) * std::max(3 * C, F)), dx(size_t(M) * std::max(3 * C, F));
  std::vector<float> dw(size_t(F) * C * 3), db(size_t(3 * C + F));
  std::vector<float> mean(M), rstd(M);
  auto dy = randn(size_t(M) * std::max(3 * C, F), 11, 0.1f);

  struct Lin {
    const char* name;
    const float* w;
    int K, Fo;
  } lins[] = {{"qkv", w_qkv.data(), C, 3 * C},
              {"proj", w_proj.data(), C, C},
              {"fc1", w_fc1.data(), C, F},
              {"fc2", w_fc2.data(), F, C}};
  for (const Lin& l : lins) {
    const float* in = l.K == C ? x.data() : xf.data();
    const double fl = 2.0 * M * l.K * l.Fo;
    run(o, t + "linear_fwd " + l.name, fl, [&] { linear_forward(y.data(), in, l.w, bias.data(), M, l.K, l.Fo); });
    run(o, t + "linear_bwd " + l.name, 2 * fl,
        [&] { linear_backward(dx.data(), dw.data(), db.data(), dy.data(), in, l.w, M, l.K, l.Fo); });
  }
  run(o, t + "layernorm_fwd", 0,
      [&] { layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), lnw.data(), lnb.data(), M, C, 1e-6f); });
  run(o, t + "layernorm_bwd", 0, [&] {
    layernorm_backward(dx.data(), dw.data(), db.data(), dy.data(), x.data(), lnw.data(), mean.data(), rstd.data(), M,
                       C);
  });
  run(o, t + "gelu_fwd", 0, [&] { gelu_forward(y.data(), xf.data(), int64_t(M) * F); });
  run(o, t + "gelu_bwd", 0, [&] { gelu_backward(dx.data(), dy.data(), xf.data(), int64_t(M) * F); });
  run(o, t + "add_inplace", 0, [&] { add_inplace(y.data(), x.data(), int64_t(M) * C); });
  std::vector<float> att(size_t(B) * H * N * N), scratch(size_t(B) * H * N * N);
  const double afl = 4.0 * B * H * double(N) * N * (C / H);
  run(o, t + "attention_fwd", afl, [&] { attention_forward(y.data(), att.data(), xq.data(), B, N, C, H); });
  run(o, t + "attention_bwd", 2 * afl, [&] {
    attention_backward(dx.data(), scratch.data(), dy.data(), xq.data(), att.data(), B, N, C, H);
  });
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--threads") o.threads = std::stoi(next());
    else if (a == "--reps") o.reps = std::stoi(next());
    else if (a == "--filter") o.filter = next();
    else {
      std::fprintf(stderr, "usage: %s [--threads n] [--reps r] [--filter substring]\n", argv[0]);
      return 2;
    }
  }
  sav::set_num_threads(o.threads);
  std::printf("threads %d, cpu %s, reps %d\n", o.threads, sav::cpu_features_str().c_str(), o.reps);
  std::printf("%-34s %9s %9s %9s %8s\n", "op", "min ms", "med ms", "cpu ms", "GFLOP/s");
  bench_shapes(o, {"fmnist", 128, 50, 96, 4, 192});
  bench_shapes(o, {"fmnist1", 1, 50, 96, 4, 192});
  bench_shapes(o, {"deit", 8, 197, 192, 3, 768});

  {  // patch embedding, cross-entropy, optimizer at vit_fmnist B=128
    using namespace sav::cpu;
    const int B = 128, S = 28, p = 4, C = 96, P = 49, V = 10;
    auto img = randn(size_t(B) * S * S, 20), w = randn(size_t(C) * p * p, 21, 0.1f), b = randn(C, 22);
    std::vector<float> out(size_t(B) * P * C), cols(size_t(B) * P * p * p), dw(w.size()), db(C);
    auto dout = randn(out.size(), 23);
    run(o, "fmnist patch_embed_fwd", 2.0 * B * P * C * p * p,
        [&] { patch_embed_forward(out.data(), cols.data(), img.data(), w.data(), b.data(), B, 1, S, p, C); });
    run(o, "fmnist patch_embed_bwd", 2.0 * B * P * C * p * p, [&] {
      patch_embed_backward(nullptr, dw.data(), db.data(), dout.data(), cols.data(), w.data(), B, 1, S, p, C);
    });
    auto logits = randn(size_t(B) * V, 24);
    std::vector<float> probs(logits.size()), dl(logits.size());
    std::vector<int> tg(B);
    for (int i = 0; i < B; ++i) tg[i] = i % V;
    run(o, "fmnist cross_entropy_fwd", 0,
        [&] { cross_entropy_forward(probs.data(), logits.data(), tg.data(), B, V, 0.1f); });
    run(o, "fmnist cross_entropy_bwd", 0,
        [&] { cross_entropy_backward(dl.data(), probs.data(), tg.data(), B, V, 0.1f, 1.0f); });
  }
  {  // AdamW and clipping over a parameter set the size of vit_fmnist (~0.3M) and deit_tiny (~5.7M)
    for (int64_t n : {int64_t(310000), int64_t(5700000)}) {
      sav::ParamSet ps;
      ps.declare("w", {n / 2});
      ps.declare("b", {n - n / 2}, false);
      ps.allocate();
      sav::ParamSet gs = ps.like();
      auto r = randn(size_t(n), 30, 0.01f);
      std::memcpy(gs.flat(), r.data(), sizeof(float) * n);
      sav::AdamW opt(ps, sav::AdamWOptions{});
      const std::string tag = n < 1000000 ? "fmnist " : "deit ";
      run(o, tag + "adamw_step", 0, [&] { opt.step(ps, gs, 1e-5f); });
      run(o, tag + "clip_grad_norm", 0, [&] { sav::clip_grad_norm(gs, 1e9f); });
    }
  }
  return 0;
}
