// cuda::hamming_attention_tiled (the cluster-split Hamming attention core, ops/cuda/hamming_tiled.h) against
// cpu::hamming_attention_forward on odd shapes, f32 and bf16.
//
// How a comparison works: the CPU forward (saved buffers) gives the reference output, the relaxed hash values
// y and the codes. The GPU computes D_nj as ||q||^2 + ||a||^2 - 2 q.a and sums in other orders, so a code bit
// whose |y_nr| is within rounding of 0 (~1e-7 of max|y|) may come out the other way; a flipped bit moves its
// token's row by O(1) and, through KV, the whole head by a little. So, per head: the bits with |y_nr| < 1e-5
// max|y| are "ambiguous"; for each token holding some, the GPU's choice is read off its output row (the
// combination whose reference row is nearest); the head's reference is then recomputed in double from those
// codes (KV, z, normalisation, conv: the spec's formulas) and every element is compared. Bits that are not
// ambiguous must agree (else the strict check fails), the number of ambiguous bits is bounded, and the
// test's own double reference is checked against the CPU output wherever no bit flipped.
// Tolerances (max|gpu - ref| / max|ref| over the case): f32 1e-5 (observed summation-order differences are
// ~1e-7); bf16 8e-3 (one bf16 rounding of the output, 2^-9 relative, |out| <= max|ref|).
// Also: outputs poisoned with NaN (0xFF) before each launch, none left after and nothing written in the
// padding columns of a strided output; reruns and CUDA-graph replays bit-identical; the workspace poisoned
// too (the kernel must not rely on its contents).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_test_util.h"
#include "ops/cpu/hamming.h"
#include "ops/cuda/hamming_tiled.h"
#include "ops/cuda/ops.h"

using namespace sav;
using namespace sav::test;
using sav::cuda::bf16;
using sav::cuda::DeviceBuffer;

namespace {

class CudaHammingTiled : public CudaTest {};

constexpr double kAmbiguousRel = 1e-5;  // |y| below this times the head's max|y|: the bit may go either way
constexpr double kTolF32 = 1e-5;
constexpr double kTolBf16 = 8e-3;
constexpr double kPi = 3.14159265358979323846;

struct Case {
  int B, N, C, H, nbits, m;
  int pad;  // > 0: qk and v interleaved in one (M, 2C + pad) buffer, out rows C + pad apart
};

std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " N=" + std::to_string(c.N) + " C=" + std::to_string(c.C) +
         " H=" + std::to_string(c.H) + " bits=" + std::to_string(c.nbits) + " m=" + std::to_string(c.m) +
         " pad=" + std::to_string(c.pad);
}

// One head of one image, for the double reference: v rows (stride C), conv taps.
struct Head {
  int N, C, d, nbits;
  const float* v;   // v + b*N*C + h*d
  const float* cw;  // conv_w + h*9
};

// KV (b, d) = sum of the v rows whose bit r is set
std::vector<double> head_kv(const Head& hd, const uint64_t* codes) {
  std::vector<double> kv(size_t(hd.nbits) * hd.d, 0.0);
  for (int n = 0; n < hd.N; ++n)
    for (int r = 0; r < hd.nbits; ++r)
      if ((codes[n] >> r) & 1u)
        for (int i = 0; i < hd.d; ++i) kv[size_t(r) * hd.d + i] += hd.v[size_t(n) * hd.C + i];
  return kv;
}

// o (d) = z / max(||z||, 1e-6) + sum_t cw[t] v[n + t - 4],  z = 0.5 v_n + (1/pi) sum over set bits of KV_r
void head_row(const Head& hd, const std::vector<double>& kv, uint64_t code, int n, double* o) {
  const int d = hd.d;
  std::vector<double> z(d);
  double ss = 0.0;
  for (int i = 0; i < d; ++i) {
    double s = 0.0;
    for (int r = 0; r < hd.nbits; ++r)
      if ((code >> r) & 1u) s += kv[size_t(r) * d + i];
    z[i] = 0.5 * hd.v[size_t(n) * hd.C + i] + s / kPi;
    ss += z[i] * z[i];
  }
  const double nrm = std::max(std::sqrt(ss), 1e-6);
  for (int i = 0; i < d; ++i) {
    double c = 0.0;
    for (int t = 0; t < 9; ++t) {
      const int src = n + t - 4;
      if (src >= 0 && src < hd.N) c += double(hd.cw[t]) * hd.v[size_t(src) * hd.C + i];
    }
    o[i] = z[i] / nrm + c;
  }
}

template <class T>
std::vector<unsigned char> download_bytes(const DeviceBuffer<T>& dbuf) {
  const std::vector<T> h = dbuf.download();
  std::vector<unsigned char> bytes(h.size() * sizeof(T));
  if (!h.empty()) std::memcpy(bytes.data(), h.data(), bytes.size());
  return bytes;
}

// Everything the device side of one case needs.
template <class T>
struct DeviceCase {
  DeviceBuffer<T> qk, v, buf, out;
  DeviceBuffer<float> anchors, mu, A, conv;
  DeviceBuffer<unsigned char> ws;
  const T *pqk = nullptr, *pv = nullptr;
  int ldin = 0, ldo = 0;
  cuda::HammingTiledDims dims{};
  void launch(cudaStream_t stream) {
    cuda::hamming_attention_tiled<T>(out.get(), ldo, pqk, ldin, pv, ldin, anchors.get(), mu.get(), A.get(), conv.get(),
                                     dims, ws.size() ? ws.get() : nullptr, stream);
  }
};

template <class T>
void run_case(const Case& cs) {
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  const double tol = kBf16 ? kTolBf16 : kTolF32;
  const int B = cs.B, N = cs.N, C = cs.C, H = cs.H, nb = cs.nbits, m = cs.m, d = C / H;
  SCOPED_TRACE(std::string(kBf16 ? "bf16 " : "f32 ") + describe(cs));
  const cuda::HammingTiledDims dims{B, N, C, H, nb, m};
  ASSERT_TRUE(cuda::hamming_tiled_supports(dims));
  const size_t M = size_t(B) * N;
  std::vector<float> qk = normal(M * C, 71 + N + C, 0.7f), v = normal(M * C, 72 + N + C);
  if (kBf16) qk = round_bf16(qk), v = round_bf16(v);  // the reference sees exactly what the GPU loads
  const KshWeights w = fitted_ksh_weights<double>(qk, N, C, H, nb, m, 73 + N);

  // CPU reference (fast path, as the models run it), with y and the codes
  const cpu::HammingDims cdims{B, N, C, H, nb, m};
  std::vector<float> saved_f(cpu::hamming_saved_floats(cdims));
  std::vector<uint64_t> saved_c(cpu::hamming_saved_codes(cdims));
  const cpu::HammingSaved saved = cpu::hamming_saved_bind(cdims, saved_f.data(), saved_c.data());
  const cpu::HammingWeights cw{w.anchors.data(), w.mu.data(), w.A.data(), w.conv.data(), nullptr};
  std::vector<float> ref(M * C);
  cpu::hamming_attention_forward(ref.data(), &saved, qk.data(), v.data(), cw, cdims);
  size_t set_bits = 0;
  for (size_t i = 0; i < size_t(B) * H * N; ++i) set_bits += __builtin_popcountll(saved.codes[i]);
  const double set_share = double(set_bits) / (double(B) * H * N * nb);
  if (size_t(B) * H * N * nb >= 256) {
    EXPECT_GT(set_share, 0.1) << "the test hash should set a fair share of the bits";
    EXPECT_LT(set_share, 0.9);
  }

  // device buffers: qk and v separate (B,N,C), or interleaved rows of one (M, 2C + pad) buffer
  DeviceCase<T> dc;
  dc.dims = dims;
  dc.ldin = cs.pad ? 2 * C + cs.pad : C;
  dc.ldo = C + cs.pad;
  if (cs.pad) {
    std::vector<float> buf(M * dc.ldin, 0.0f);
    for (size_t r = 0; r < M; ++r)
      for (int c = 0; c < C; ++c) buf[r * dc.ldin + c] = qk[r * C + c], buf[r * dc.ldin + C + c] = v[r * C + c];
    dc.buf = upload_as<T>(buf);
    dc.pqk = dc.buf.get(), dc.pv = dc.buf.get() + C;
  } else {
    dc.qk = upload_as<T>(qk), dc.v = upload_as<T>(v);
    dc.pqk = dc.qk.get(), dc.pv = dc.v.get();
  }
  dc.anchors = upload_as<float>(w.anchors), dc.mu = upload_as<float>(w.mu), dc.A = upload_as<float>(w.A);
  dc.conv = upload_as<float>(w.conv);
  const size_t ws_bytes = cuda::hamming_tiled_workspace_bytes(dims);
  dc.ws.resize(ws_bytes);
  dc.ws.fill_bytes(0xFF);
  dc.out.resize(M * dc.ldo);
  dc.out.fill_bytes(0xFF);
  const cuda::HammingTiledPlan plan = cuda::hamming_tiled_plan(dims, sizeof(T), cuda::sm_count());

  cuda::Stream stream;
  dc.launch(stream.get());
  stream.sync();
  const std::vector<float> outp = download_f32(dc.out);
  std::vector<float> out(M * C);
  size_t gap_written = 0;
  for (size_t r = 0; r < M; ++r) {
    for (int c = 0; c < C; ++c) out[r * C + c] = outp[r * dc.ldo + c];
    for (int c = C; c < dc.ldo; ++c) gap_written += std::isfinite(outp[r * dc.ldo + c]);
  }
  EXPECT_EQ(count_nonfinite(out), 0u) << "unwritten or non-finite outputs";
  EXPECT_EQ(gap_written, 0u) << "wrote outside the rows";

  // per head: read the GPU's choice of each ambiguous bit off its output, recompute the reference, compare
  std::vector<float> refx(M * C);  // the reference with the GPU's codes
  size_t ambiguous = 0, flipped_bits = 0, flipped_tokens = 0;
  int heads_flipped = 0;
  std::vector<float> mine_u, cpu_u;  // heads without flips: the test's double reference vs the CPU
  std::vector<double> row(d), best_row(d);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const size_t bh = size_t(b) * H + h;
      const Head hd{N, C, d, nb, v.data() + size_t(b) * N * C + size_t(h) * d, w.conv.data() + size_t(h) * 9};
      const uint64_t* cc = saved.codes + bh * N;
      const float* y = saved.y + bh * N * nb;
      const double ymax = max_abs(y, size_t(N) * nb);
      std::vector<uint64_t> codes(cc, cc + N);
      const std::vector<double> kv = head_kv(hd, cc);
      bool any_flip = false;
      for (int n = 0; n < N; ++n) {
        std::vector<int> amb;
        for (int r = 0; r < nb; ++r)
          if (std::fabs(y[size_t(n) * nb + r]) < kAmbiguousRel * ymax) amb.push_back(r);
        if (amb.empty()) continue;
        ambiguous += amb.size();
        ASSERT_LE(amb.size(), 8u) << "too many ambiguous bits in one token";
        const float* g = out.data() + (size_t(b) * N + n) * C + size_t(h) * d;
        double best = INFINITY;
        uint64_t best_code = codes[n];
        for (uint32_t combo = 0; combo < (1u << amb.size()); ++combo) {
          uint64_t code = codes[n];
          for (size_t k = 0; k < amb.size(); ++k) {
            code &= ~(uint64_t{1} << amb[k]);
            if ((combo >> k) & 1u) code |= uint64_t{1} << amb[k];
          }
          head_row(hd, kv, code, n, row.data());
          double dist = 0.0;
          for (int i = 0; i < d; ++i) dist += (g[i] - row[i]) * (g[i] - row[i]);
          if (dist < best) best = dist, best_code = code;
        }
        if (best_code != codes[n]) {
          flipped_bits += __builtin_popcountll(best_code ^ codes[n]);
          ++flipped_tokens;
          any_flip = true;
          codes[n] = best_code;
        }
      }
      heads_flipped += any_flip;
      const std::vector<double> kvx = any_flip ? head_kv(hd, codes.data()) : kv;
      for (int n = 0; n < N; ++n) {
        head_row(hd, kvx, codes[n], n, row.data());
        for (int i = 0; i < d; ++i) {
          const size_t e = (size_t(b) * N + n) * C + size_t(h) * d + i;
          refx[e] = float(row[i]);
          if (!any_flip) mine_u.push_back(float(row[i])), cpu_u.push_back(ref[e]);
        }
      }
    }
  const double err = norm_err(out, refx);
  const double err_cpu = norm_err(out, ref);
  std::printf("[ info ] %s %s: plan G=%d chunk=%d tile=%d %s smem=%zu ws=%zu; %.1f%% bits set, %zu ambiguous bits, "
              "%zu flipped (%zu tokens, %d heads); err %.3e (vs the CPU output as is: %.3e)\n",
              kBf16 ? "bf16" : "f32 ", describe(cs).c_str(), plan.cluster, plan.chunk, plan.tile,
              plan.cached ? "cached" : "uncached", plan.smem_bytes, ws_bytes, 100.0 * set_share, ambiguous,
              flipped_bits, flipped_tokens, heads_flipped, err, err_cpu);
  EXPECT_LE(double(ambiguous), std::max(8.0, 1e-3 * double(B) * H * N * nb)) << "the ambiguity test is too loose";
  EXPECT_LT(err, tol) << "GPU vs the reference with the GPU's codes";
  if (!mine_u.empty()) {
    EXPECT_LT(norm_err(mine_u, cpu_u), 1e-5) << "the test's reference disagrees with the CPU";
  }

  // rerun: bit-identical
  const std::vector<unsigned char> bytes = download_bytes(dc.out);
  dc.out.fill_bytes(0xFF);
  dc.ws.fill_bytes(0x7F);
  dc.launch(stream.get());
  stream.sync();
  EXPECT_TRUE(download_bytes(dc.out) == bytes) << "rerun not bit-identical";

  // captured into a CUDA graph (twice in a row) and replayed: bit-identical
  dc.out.fill_bytes(0xFF);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  SAV_CUDA_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal));
  dc.launch(stream.get());
  dc.launch(stream.get());
  SAV_CUDA_CHECK(cudaStreamEndCapture(stream.get(), &graph));
  SAV_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  SAV_CUDA_CHECK(cudaGraphLaunch(exec, stream.get()));
  SAV_CUDA_CHECK(cudaGraphLaunch(exec, stream.get()));
  stream.sync();
  EXPECT_TRUE(download_bytes(dc.out) == bytes) << "graph replay not bit-identical";
  SAV_CUDA_CHECK(cudaGraphExecDestroy(exec));
  SAV_CUDA_CHECK(cudaGraphDestroy(graph));
}

}  // namespace

// f32: odd shapes; the DeiT and PVTv2 stage-1 sizes; N = 1 and N = 5 (shorter than the conv); head sizes that
// are not multiples of 4 (the scalar column path) and odd strides (no cp.async); a chunk over several D tiles;
// the largest head (d 128, 64 bits, 64 anchors); batches that pick G = 8, 2 and 1 on a 132-SM H200; the
// uncached (workspace) path at N = 3136 (f32 does not fit the chunk in shared memory there).
TEST_F(CudaHammingTiled, F32MatchesCpuOnOddShapes) {
  for (const Case cs : {Case{1, 197, 192, 3, 16, 25, 0}, Case{2, 50, 96, 3, 32, 25, 8}, Case{3, 301, 64, 2, 64, 7, 0},
                        Case{2, 3136, 32, 1, 16, 25, 0}, Case{1, 1, 48, 2, 16, 25, 0}, Case{2, 5, 24, 2, 16, 25, 3},
                        Case{2, 37, 26, 2, 33, 5, 0}, Case{1, 1000, 64, 2, 16, 25, 0}, Case{1, 129, 384, 3, 64, 64, 2},
                        Case{64, 197, 192, 3, 16, 25, 0}, Case{96, 50, 96, 3, 16, 25, 0}, Case{2, 37, 30, 5, 16, 25, 1},
                        Case{3, 2, 8, 2, 1, 1, 0}})
    run_case<float>(cs);
}

// bf16 in/out: DeiT-Tiny at batch 1 and 64, PVTv2 stage 1 (chunk in shared memory), a sequence long enough for
// the uncached path, strided and odd-head cases.
TEST_F(CudaHammingTiled, Bf16MatchesCpuOnOddShapes) {
  for (const Case cs : {Case{1, 197, 192, 3, 16, 25, 0}, Case{2, 3136, 32, 1, 16, 25, 0}, Case{2, 50, 96, 3, 32, 25, 8},
                        Case{1, 9000, 32, 1, 16, 25, 0}, Case{2, 37, 26, 2, 33, 5, 3}, Case{64, 197, 192, 3, 16, 25, 0},
                        Case{1, 5, 24, 2, 16, 25, 0}})
    run_case<bf16>(cs);
}

TEST_F(CudaHammingTiled, RejectsUnsupportedSizes) {
  using D = cuda::HammingTiledDims;
  EXPECT_TRUE(cuda::hamming_tiled_supports(D{1, 197, 192, 3, 16, 25}));
  EXPECT_TRUE(cuda::hamming_tiled_supports(D{64, 3136, 32, 1, 16, 25}));
  EXPECT_TRUE(cuda::hamming_tiled_supports(D{1, 100000, 128, 1, 64, 64}));
  EXPECT_TRUE(cuda::hamming_tiled_supports(D{0, 197, 192, 3, 16, 25}));  // empty batch: a no-op
  EXPECT_FALSE(cuda::hamming_tiled_supports(D{1, 197, 129, 1, 16, 25}));  // head size 129
  EXPECT_FALSE(cuda::hamming_tiled_supports(D{1, 197, 100, 3, 16, 25}));  // C % H
  EXPECT_FALSE(cuda::hamming_tiled_supports(D{1, 197, 192, 3, 65, 25}));  // bits
  EXPECT_FALSE(cuda::hamming_tiled_supports(D{1, 197, 192, 3, 0, 25}));
  EXPECT_FALSE(cuda::hamming_tiled_supports(D{1, 197, 192, 3, 16, 65}));  // anchors
  EXPECT_FALSE(cuda::hamming_tiled_supports(D{1, 197, 192, 3, 16, 0}));
  EXPECT_FALSE(cuda::hamming_tiled_supports(D{1, 0, 192, 3, 16, 25}));  // tokens
  EXPECT_FALSE(cuda::hamming_tiled_supports(D{1, 197, 192, 0, 16, 25}));
  EXPECT_FALSE(cuda::hamming_tiled_supports(D{-1, 197, 192, 3, 16, 25}));

  DeviceBuffer<float> f(1 << 16);
  DeviceBuffer<bf16> h(1 << 16);
  auto launch_f32 = [&](const D& dims, int ld, void* ws) {
    cuda::hamming_attention_tiled<float>(f.get(), ld, f.get(), ld, f.get(), ld, f.get(), f.get(), f.get(), f.get(),
                                         dims, ws, nullptr);
  };
  EXPECT_THROW(launch_f32(D{1, 10, 129, 1, 16, 25}, 129, nullptr), sav::Error);  // head size
  EXPECT_THROW(launch_f32(D{1, 10, 64, 1, 65, 25}, 64, nullptr), sav::Error);    // bits
  EXPECT_THROW(launch_f32(D{1, 10, 64, 1, 16, 65}, 64, nullptr), sav::Error);    // anchors
  EXPECT_THROW(launch_f32(D{1, 10, 64, 1, 16, 25}, 63, nullptr), sav::Error);    // stride below C
  EXPECT_THROW(cuda::hamming_attention_tiled<bf16>(h.get(), 64, h.get(), 64, nullptr, 64, f.get(), f.get(), f.get(),
                                                   f.get(), D{1, 10, 64, 1, 16, 25}, nullptr, nullptr),
               sav::Error);  // null v
  const D needs_ws{1, 9000, 32, 1, 16, 25};
  ASSERT_GT(cuda::hamming_tiled_workspace_bytes(needs_ws), 0u);
  EXPECT_THROW(cuda::hamming_attention_tiled<bf16>(h.get(), 32, h.get(), 32, h.get(), 32, f.get(), f.get(), f.get(),
                                                   f.get(), needs_ws, nullptr, nullptr),
               sav::Error);  // missing workspace
  EXPECT_THROW(cuda::hamming_tiled_workspace_bytes(D{1, 197, 129, 1, 16, 25}), sav::Error);
  SAV_CUDA_CHECK(cudaDeviceSynchronize());  // nothing was launched
}

// Latency per call (printed, not asserted): the tiled kernel vs the per-head kernel with clusters of 1, 2, 4 and 8
// CTAs (the launcher's choice marked) at DeiT-Tiny batch 1 to 64 and DeiT-Small batch 8 and 16, and the tiled
// kernel at PVTv2-B0 stage 1 (batch 1 and 64), bf16.
// Eager: back-to-back launches; graph: 20 calls captured in one graph, replayed.
TEST_F(CudaHammingTiled, TimingPrinted) {
  struct T {
    const char* name;
    cuda::HammingTiledDims dims;
    bool per_head;
  };
  for (const T tc : {T{"DeiT-Tiny b1", {1, 197, 192, 3, 16, 25}, true},
                     T{"DeiT-Tiny b2", {2, 197, 192, 3, 16, 25}, true},
                     T{"DeiT-Tiny b4", {4, 197, 192, 3, 16, 25}, true},
                     T{"DeiT-Tiny b8", {8, 197, 192, 3, 16, 25}, true},
                     T{"DeiT-Tiny b16", {16, 197, 192, 3, 16, 25}, true},
                     T{"DeiT-Tiny b32", {32, 197, 192, 3, 16, 25}, true},
                     T{"DeiT-Tiny b64", {64, 197, 192, 3, 16, 25}, true},
                     T{"DeiT-Small b8", {8, 197, 384, 6, 16, 25}, true},
                     T{"DeiT-Small b16", {16, 197, 384, 6, 16, 25}, true},
                     T{"PVTv2-B0 s1 b1", {1, 3136, 32, 1, 16, 25}, false},
                     T{"PVTv2-B0 s1 b64", {64, 3136, 32, 1, 16, 25}, false}}) {
    const auto& d = tc.dims;
    const size_t M = size_t(d.B) * d.N;
    DeviceBuffer<bf16> qkv = upload_as<bf16>(normal(M * 2 * d.C, 5, 0.7f)), out(M * d.C);
    std::vector<float> qk_host(M * d.C);
    {
      const std::vector<float> all = round_bf16(normal(M * 2 * d.C, 5, 0.7f));
      for (size_t r = 0; r < M; ++r)
        for (int c = 0; c < d.C; ++c) qk_host[r * d.C + c] = all[r * 2 * d.C + c];
    }
    const KshWeights w = fitted_ksh_weights<double>(qk_host, d.N, d.C, d.H, d.nbits, d.m, 9);
    auto da = upload_as<float>(w.anchors), dmu = upload_as<float>(w.mu), dA = upload_as<float>(w.A);
    auto dconv = upload_as<float>(w.conv);
    DeviceBuffer<unsigned char> ws(cuda::hamming_tiled_workspace_bytes(d));
    cuda::Stream stream;
    auto tiled = [&] {
      cuda::hamming_attention_tiled<bf16>(out.get(), d.C, qkv.get(), 2 * d.C, qkv.get() + d.C, 2 * d.C, da.get(),
                                          dmu.get(), dA.get(), dconv.get(), d, ws.size() ? ws.get() : nullptr,
                                          stream.get());
    };
    DeviceBuffer<unsigned char> prep(cuda::hamming_attention_prepared_bytes(d.C, d.H, d.nbits));
    cuda::hamming_attention_prepare(prep.get(), da.get(), dmu.get(), dA.get(), d.C, d.H, d.nbits, d.m, nullptr);
    int G = 0;  // CTAs per (image, head) of the per-head kernel
    auto per_head = [&] {
      cuda::hamming_attention_forward_ld(out.get(), d.C, qkv.get(), 2 * d.C, qkv.get() + d.C, 2 * d.C, prep.get(),
                                         dconv.get(), d.B, d.N, d.C, d.H, d.nbits, d.m, stream.get(), G);
    };
    auto time_us = [&](auto&& fn) {
      constexpr int kCalls = 20, kReps = 10;
      for (int i = 0; i < 3; ++i) fn();
      stream.sync();
      cuda::Event e0, e1;
      SAV_CUDA_CHECK(cudaEventRecord(e0.get(), stream.get()));
      for (int i = 0; i < kCalls * kReps; ++i) fn();
      SAV_CUDA_CHECK(cudaEventRecord(e1.get(), stream.get()));
      stream.sync();
      float eager_ms = 0.0f;
      SAV_CUDA_CHECK(cudaEventElapsedTime(&eager_ms, e0.get(), e1.get()));
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      SAV_CUDA_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal));
      for (int i = 0; i < kCalls; ++i) fn();
      SAV_CUDA_CHECK(cudaStreamEndCapture(stream.get(), &graph));
      SAV_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
      SAV_CUDA_CHECK(cudaGraphLaunch(exec, stream.get()));
      stream.sync();
      SAV_CUDA_CHECK(cudaEventRecord(e0.get(), stream.get()));
      for (int i = 0; i < kReps; ++i) SAV_CUDA_CHECK(cudaGraphLaunch(exec, stream.get()));
      SAV_CUDA_CHECK(cudaEventRecord(e1.get(), stream.get()));
      stream.sync();
      float graph_ms = 0.0f;
      SAV_CUDA_CHECK(cudaEventElapsedTime(&graph_ms, e0.get(), e1.get()));
      SAV_CUDA_CHECK(cudaGraphExecDestroy(exec));
      SAV_CUDA_CHECK(cudaGraphDestroy(graph));
      return std::pair<double, double>(1e3 * eager_ms / (kCalls * kReps), 1e3 * graph_ms / (kCalls * kReps));
    };
    const auto t_new = time_us(tiled);
    const cuda::HammingTiledPlan p = cuda::hamming_tiled_plan(d, sizeof(bf16), cuda::sm_count());
    std::printf("[ info ] %-16s tiled (G=%d chunk=%d %s, %d CTAs): %.2f us eager, %.2f us in a graph\n", tc.name,
                p.cluster, p.chunk, p.cached ? "cached" : "uncached", p.cluster * d.B * d.H, t_new.first,
                t_new.second);
    if (tc.per_head && cuda::hamming_attention_supports(d.N, d.C, d.H, d.nbits, d.m)) {
      const int pick = cuda::hamming_attention_split(d.B, d.N, d.H), tiles = (d.N + 15) / 16;
      for (G = 1; G <= tiles; G = G < 8 ? 2 * G : G < tiles ? tiles : tiles + 1) {
        const auto t = time_us(per_head);
        std::printf("[ info ] %-16s per-head kernel, split %d (%d CTAs)%s: %.2f us eager, %.2f us in a graph\n",
                    tc.name, G, G * d.B * d.H, G == pick ? " [auto]" : "", t.first, t.second);
      }
    }
    EXPECT_GT(t_new.second, 0.0);
  }
}

// Host-only (runs without a GPU): the plan and the workspace size are pure functions of the sizes.
TEST(CudaHammingTiledPlan, PlanIsConsistent) {
  using D = cuda::HammingTiledDims;
  EXPECT_EQ(cuda::hamming_tiled_workspace_bytes(D{1, 197, 192, 3, 16, 25}), 0u);
  EXPECT_EQ(cuda::hamming_tiled_workspace_bytes(D{64, 197, 768, 12, 16, 25}), 0u);
  EXPECT_EQ(cuda::hamming_tiled_workspace_bytes(D{0, 197, 192, 3, 16, 25}), 0u);
  EXPECT_GT(cuda::hamming_tiled_workspace_bytes(D{1, 9000, 32, 1, 16, 25}), 0u);
  for (const D dims : {D{1, 197, 192, 3, 16, 25}, D{64, 197, 192, 3, 16, 25}, D{64, 3136, 32, 1, 16, 25},
                       D{1, 3136, 32, 1, 16, 25}, D{2, 5, 24, 2, 16, 25}, D{1, 1, 48, 2, 16, 25},
                       D{1, 20000, 128, 1, 64, 64}, D{1, 129, 384, 3, 64, 64}, D{512, 50, 96, 3, 16, 25}}) {
    const size_t ws = cuda::hamming_tiled_workspace_bytes(dims);
    for (const size_t el : {size_t(4), size_t(2)})
      for (const int sms : {1, 78, 132, 1000}) {
        SCOPED_TRACE("B=" + std::to_string(dims.B) + " N=" + std::to_string(dims.N) + " el=" + std::to_string(el) +
                     " sms=" + std::to_string(sms));
        const cuda::HammingTiledPlan p = cuda::hamming_tiled_plan(dims, el, sms);
        EXPECT_TRUE(p.cluster == 1 || p.cluster == 2 || p.cluster == 4 || p.cluster == 8);
        EXPECT_GE(int64_t(p.chunk) * p.cluster, dims.N);
        EXPECT_LT(int64_t(p.chunk) * (p.cluster - 1), dims.N) << "an empty CTA in the cluster";
        EXPECT_LE(p.smem_bytes, size_t(227 * 1024));
        if (!p.cached) {
          EXPECT_GT(ws, 0u) << "an uncached plan needs the workspace";
          EXPECT_EQ(p.cluster, 8);
        }
      }
  }
  // the production sizes keep the chunk in shared memory, two CTAs per SM (<= 113 KB)
  for (const D dims : {D{1, 197, 192, 3, 16, 25}, D{64, 197, 192, 3, 16, 25}, D{64, 3136, 32, 1, 16, 25}}) {
    const cuda::HammingTiledPlan p = cuda::hamming_tiled_plan(dims, sizeof(bf16), 132);
    EXPECT_TRUE(p.cached);
    EXPECT_LE(p.smem_bytes, size_t(113 * 1024));
  }
  EXPECT_EQ(cuda::hamming_tiled_plan(D{1, 197, 192, 3, 16, 25}, 2, 132).cluster, 8);
}
