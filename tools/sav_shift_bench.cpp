// sav_shift_bench: the three GPU paths of a shift linear layer (ops/cuda/shift_gpu.h) on the linear shapes of
// DeiT-Tiny/Small/Base: cuBLASLt on the decoded bf16 weights, the packed 5-bit codes decoded to tensor cores
// (packed-mma), and the integer shift-add kernel on CUDA cores (MatShift). Run `sav_shift_bench --help`.
//
// Per width C (192, 384, 768) the layers qkv (K x F = C x 3C), proj (C x C), fc1 (C x 4C), fc2 (4C x C), at
// M = 197 and 12608 rows (one and 64 images of 197 tokens). Random weights: exponents uniform in
// [pmin, pmax], signs +-1 with a share of zeros; bf16 activations ~ N(0, 0.5^2). Each path: warm-ups, then
// --iters launches each timed by a pair of CUDA events; the median is reported, with the achieved bandwidth
// (bytes of the path's weight form + x (bf16) + y (f32) + bias, divided by the time) and TOP/s (2 M K F
// operations: one multiply or shift and one add per weight and row). "pick" is ShiftLinearGpu::pick among the
// exact paths (cublas_decoded, packed_mma); "pick_all" includes int. A tool: it exits.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "ops/cuda/common.h"
#include "ops/cuda/shift_gpu.h"

namespace {

using sav::cuda::ShiftPath;

const char* kUsage =
    "usage: sav_shift_bench [options]\n"
    "\n"
    "Times the three GPU paths of a shift linear layer (y = x W^T + b, W = sign * 2^p, bf16 x, f32 y) on the\n"
    "linear shapes of DeiT: per width C, qkv (K x F = C x 3C), proj (C x C), fc1 (C x 4C), fc2 (4C x C).\n"
    "Paths: cublas_decoded (weights decoded to bf16, cuBLASLt), packed_mma (5-bit codes decoded in registers,\n"
    "mma.sync tensor cores), int (fixed-point shift-add on CUDA cores; results differ by fixed-point rounding).\n"
    "\n"
    "options:\n"
    "  --widths LIST      embedding widths C, comma-separated (default 192,384,768: DeiT-Tiny/Small/Base)\n"
    "  --rows LIST        row counts M, comma-separated (default 197,12608: batch 1 and 64 of 197 tokens)\n"
    "  --layers LIST      any of qkv,proj,fc1,fc2 (default all four)\n"
    "  --paths LIST       any of cublas_decoded,packed_mma,int (default all three); the others print '-'\n"
    "  --iters N          timed launches per path, median reported (default 50)\n"
    "  --warmup N         untimed launches per path first (default 5)\n"
    "  --pmin P, --pmax P exponent range of the random weights (default -14, 0; the layer needs\n"
    "                     -31 <= pmin <= pmax <= 0 and pmax - pmin <= 14)\n"
    "  --zero-share S     fraction of zero weights, 0..1 (default 0.1)\n"
    "  --frac-bits F      fractional bits of the int path's fixed point, 0..30 (default 16)\n"
    "  --seed N           random seed (default 1)\n"
    "  --no-pick          skip ShiftLinearGpu::pick (its columns print '-')\n"
    "  --check            also print the largest difference of packed_mma and int from cublas_decoded,\n"
    "                     relative to max|y| (packed_mma: f32 summation order, ~1e-6; int: fixed point)\n"
    "  --json FILE        append one JSON object per (layer, M) row to FILE\n"
    "  --help             this text\n"
    "\n"
    "Columns: us = median microseconds per launch; GB/s = (weight bytes of the path's form + M K 2 + M F 4 +\n"
    "F 4) / time; TOP/s = 2 M K F / time. Weight forms: bf16 2 B/weight, packed 5 bits/weight (F padded to 128,\n"
    "K to 64), int 1 B/weight (K padded to 32) + 4 B per output.\n";

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "sav_shift_bench: %s\n(see sav_shift_bench --help)\n", msg.c_str());
  std::exit(2);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

long parse_int(const std::string& flag, const std::string& v, long lo, long hi) {
  char* end = nullptr;
  const long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x < lo || x > hi)
    usage_error(flag + " needs an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got '" + v +
                "'");
  return x;
}

double parse_double(const std::string& flag, const std::string& v, double lo, double hi) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !(x >= lo && x <= hi))
    usage_error(flag + " needs a number in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got '" + v + "'");
  return x;
}

struct Layer {
  std::string name;
  int K, F;
};

std::vector<Layer> layers_of(int C) {
  return {{"qkv", C, 3 * C}, {"proj", C, C}, {"fc1", C, 4 * C}, {"fc2", 4 * C, C}};
}

// Bytes of the weight form each path reads.
double weight_bytes(const sav::cuda::ShiftLinearGpu& lin, ShiftPath path) {
  switch (path) {
    case sav::cuda::shift_path_cublas_decoded:
      return 2.0 * lin.F() * lin.K();
    case sav::cuda::shift_path_packed_mma:
      return double(lin.packed_weights().words.bytes());
    case sav::cuda::shift_path_int:
      return double(lin.int_weights().codes.bytes() + lin.int_weights().col_add.bytes());
  }
  return 0.0;
}

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& ref) {
  double d = 0.0, m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    d = std::max(d, std::fabs(double(a[i]) - ref[i]));
    m = std::max(m, std::fabs(double(ref[i])));
  }
  return m > 0 ? d / m : d;
}

}  // namespace

int main(int argc, char** argv) {
  std::string widths_s = "192,384,768", rows_s = "197,12608", layers_s = "qkv,proj,fc1,fc2";
  std::string paths_s = "cublas_decoded,packed_mma,int", json;
  int iters = 50, warmup = 5, pmin = -14, pmax = 0, frac_bits = 16;
  double zero_share = 0.1;
  uint64_t seed = 1;
  bool do_pick = true, check = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--widths") {
      widths_s = next();
    } else if (a == "--rows") {
      rows_s = next();
    } else if (a == "--layers") {
      layers_s = next();
    } else if (a == "--paths") {
      paths_s = next();
    } else if (a == "--iters") {
      iters = int(parse_int(a, next(), 1, 100000));
    } else if (a == "--warmup") {
      warmup = int(parse_int(a, next(), 0, 100000));
    } else if (a == "--pmin") {
      pmin = int(parse_int(a, next(), -31, 0));
    } else if (a == "--pmax") {
      pmax = int(parse_int(a, next(), -31, 0));
    } else if (a == "--zero-share") {
      zero_share = parse_double(a, next(), 0.0, 1.0);
    } else if (a == "--frac-bits") {
      frac_bits = int(parse_int(a, next(), 0, 30));
    } else if (a == "--seed") {
      seed = uint64_t(parse_int(a, next(), 0, 1L << 40));
    } else if (a == "--no-pick") {
      do_pick = false;
    } else if (a == "--check") {
      check = true;
    } else if (a == "--json") {
      json = next();
    } else {
      usage_error("unknown option '" + a + "'");
    }
  }
  if (pmin > pmax || pmax - pmin > 14) usage_error("--pmin/--pmax need pmin <= pmax and pmax - pmin <= 14");
  std::vector<int> widths, rows;
  for (const std::string& w : split(widths_s)) widths.push_back(int(parse_int("--widths", w, 1, 1 << 16)));
  for (const std::string& r : split(rows_s))
    rows.push_back(int(parse_int("--rows", r, 1, sav::cuda::shift_gpu_max_rows)));
  const std::vector<std::string> layer_names = split(layers_s);
  for (const std::string& l : layer_names)
    if (l != "qkv" && l != "proj" && l != "fc1" && l != "fc2") usage_error("unknown layer '" + l + "'");
  bool run[3] = {false, false, false};
  for (const std::string& p : split(paths_s)) {
    bool known = false;
    for (int k = 0; k < 3; ++k)
      if (p == sav::cuda::shift_path_name(ShiftPath(k))) run[k] = known = true;
    if (!known) usage_error("unknown path '" + p + "' (cublas_decoded, packed_mma, int)");
  }
  if (widths.empty() || rows.empty() || layer_names.empty()) usage_error("empty --widths, --rows or --layers");

  try {
    if (!sav::cuda::device_available()) {
      std::fprintf(stderr, "sav_shift_bench: no CUDA device\n");
      return 1;
    }
    cudaDeviceProp prop{};
    SAV_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s, %d SMs; weights 2^[%d, %d], %.0f%% zeros; int path Q%d.%d; median of %d launches\n",
                prop.name, prop.multiProcessorCount, pmin, pmax, 100.0 * zero_share, 31 - frac_bits, frac_bits, iters);
    std::printf("%-6s %5s %5s %6s | %10s %10s %10s | %-14s %-14s | %8s %8s %8s | %7s %7s %7s", "layer", "K", "F", "M",
                "cublas_us", "packed_us", "int_us", "pick", "pick_all", "GB/s_cub", "GB/s_pk", "GB/s_int", "TOP_cub",
                "TOP_pk", "TOP_int");
    if (check) std::printf(" | %9s %9s", "d_packed", "d_int");
    std::printf("\n");
    std::ofstream js;
    if (!json.empty()) {
      js.open(json, std::ios::app);
      if (!js) SAV_THROW("cannot open " << json << " for appending");
    }
    sav::cuda::Stream stream;
    sav::Rng rng(seed);
    for (const int C : widths) {
      for (const Layer& L : layers_of(C)) {
        if (std::find(layer_names.begin(), layer_names.end(), L.name) == layer_names.end()) continue;
        const int K = L.K, F = L.F;
        std::vector<float> p(size_t(F) * K), s(size_t(F) * K), b(static_cast<size_t>(F));
        for (size_t i = 0; i < p.size(); ++i) {
          p[i] = float(pmin + int(rng.below(uint64_t(pmax - pmin + 1))));
          s[i] = rng.uniform() < zero_share ? 0.0f : (rng.below(2) ? 1.0f : -1.0f);
        }
        for (float& v : b) v = rng.uniform(-0.5f, 0.5f);
        sav::cuda::ShiftLinearGpu lin(p.data(), s.data(), b.data(), F, K, pmin, pmax, frac_bits);
        for (const int M : rows) {
          std::vector<float> xh(size_t(M) * K);
          for (float& v : xh) v = 0.5f * rng.normal();
          sav::cuda::DeviceBuffer<sav::cuda::bf16> x(xh.size());
          x.upload(sav::cuda::to_bf16(xh.data(), xh.size()));
          sav::cuda::DeviceBuffer<float> y(size_t(M) * F);
          double us[3] = {-1, -1, -1};
          std::vector<float> out[3];
          for (int k = 0; k < 3; ++k) {
            if (!run[k]) continue;
            const ShiftPath path = ShiftPath(k);
            us[k] = sav::cuda::median_launch_us([&] { lin.forward(y.get(), x.get(), M, stream.get(), path); },
                                                stream.get(), warmup, iters);
            if (check) {
              stream.sync();
              out[k] = y.download();
            }
          }
          if (run[sav::cuda::shift_path_int] && lin.int_status_take(stream.get()) >= 0)
            std::fprintf(stderr, "sav_shift_bench: warning: rows of x did not fit Q%d.%d (int outputs NaN)\n",
                         31 - frac_bits, frac_bits);
          std::string pick = "-", pick_all = "-";
          if (do_pick) {
            pick = sav::cuda::shift_path_name(lin.pick(M, stream.get()));
            pick_all = sav::cuda::shift_path_name(lin.pick(M, stream.get(), true));
          }
          const double act_bytes = 2.0 * M * K + 4.0 * M * F + 4.0 * F;
          const double ops = 2.0 * M * K * F;
          double gbps[3], tops[3];
          for (int k = 0; k < 3; ++k) {
            gbps[k] = us[k] > 0 ? (weight_bytes(lin, ShiftPath(k)) + act_bytes) / (us[k] * 1e3) : -1;
            tops[k] = us[k] > 0 ? ops / (us[k] * 1e6) : -1;
          }
          auto num = [](double v, const char* fmt) {
            if (v < 0) return std::string("-");
            char buf[32];
            std::snprintf(buf, sizeof buf, fmt, v);
            return std::string(buf);
          };
          std::printf("%-6s %5d %5d %6d | %10s %10s %10s | %-14s %-14s | %8s %8s %8s | %7s %7s %7s", L.name.c_str(), K,
                      F, M, num(us[0], "%.2f").c_str(), num(us[1], "%.2f").c_str(), num(us[2], "%.2f").c_str(),
                      pick.c_str(), pick_all.c_str(), num(gbps[0], "%.0f").c_str(), num(gbps[1], "%.0f").c_str(),
                      num(gbps[2], "%.0f").c_str(), num(tops[0], "%.1f").c_str(), num(tops[1], "%.1f").c_str(),
                      num(tops[2], "%.2f").c_str());
          double d_packed = -1, d_int = -1;
          if (check) {
            const std::vector<float>& ref = out[sav::cuda::shift_path_cublas_decoded];
            if (!ref.empty() && !out[1].empty()) d_packed = max_rel_diff(out[1], ref);
            if (!ref.empty() && !out[2].empty()) d_int = max_rel_diff(out[2], ref);
            std::printf(" | %9s %9s", num(d_packed, "%.2e").c_str(), num(d_int, "%.2e").c_str());
          }
          std::printf("\n");
          std::fflush(stdout);
          if (js) {
            js << "{\"width\": " << C << ", \"layer\": \"" << L.name << "\", \"K\": " << K << ", \"F\": " << F
               << ", \"M\": " << M << ", \"pick\": \"" << pick << "\", \"pick_all\": \"" << pick_all << "\"";
            for (int k = 0; k < 3; ++k) {
              if (us[k] < 0) continue;
              const char* n = sav::cuda::shift_path_name(ShiftPath(k));
              js << ", \"" << n << "_us\": " << us[k] << ", \"" << n << "_gbps\": " << gbps[k] << ", \"" << n
                 << "_tops\": " << tops[k];
            }
            if (d_packed >= 0) js << ", \"packed_mma_rel_diff\": " << d_packed;
            if (d_int >= 0) js << ", \"int_rel_diff\": " << d_int;
            js << "}\n";
          }
        }
      }
    }
  } catch (const sav::Error& e) {
    std::fprintf(stderr, "sav_shift_bench: %s\n", e.where().c_str());
    return 1;
  }
  return 0;
}
