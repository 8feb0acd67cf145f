// sav_cuda_bench: latency of the CUDA engine (ViTCuda, graph replay) on the DeiT presets with random weights,
// dense and converted to ShiftAddViT.
//
//   sav_cuda_bench [--models deit_tiny_patch16_224,...] [--batches 1,64] [--iters 50] [--json out.jsonl]
//                  [--variants dense,shiftadd]
//   sav_cuda_bench --profile ...   # one eager forward per (model, variant, batch) between
//                                  # cudaProfilerStart/Stop, for `ncu --profile-from-start off` (after an
//                                  # unprofiled warm-up)
//
// Variants: dense = the preset as timm builds it; shiftadd = the paper's DeiT conversion: Hamming attention
// in every block (16 bits, 25 anchors), MoE(mult, shift) fc1 and fc2, dense attention linears; random
// routers (about half the tokens to each expert; both experts are computed for every token on the GPU, so
// the split does not change the time), KSH buffers that set about half the bits (the MatAdd cost follows
// the number of set bits). Shift weights run decoded to bf16 on the tensor cores (decode-to-matrix-unit).
//
// Prints one line per (model, variant, batch): name, variant, batch, median ms, images/s, and for shiftadd
// the share of tokens the routers sent to the shift expert; with --json also appends
// {"model":..., "variant":..., "batch":..., "engine_ms":...} rows (read by scripts/h200_bench.sh). A tool:
// it exits.
#include <cuda_profiler_api.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "models/vit.h"
#include "models/vit_cuda.h"
#include "ops/cuda/common.h"

namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// The shiftadd variant's random values (see the header): shift exponents in [-10, -4] with random signs,
// routers with logits ~ N(0, 1), KSH anchors random unit vectors, mu ~ exp(-1/2), A ~ N(0, 1).
void randomise_shiftadd(sav::Vit& m, sav::Rng& rng) {
  m.init_random(rng);
  const sav::VitConfig& c = m.config();
  sav::ParamSet& ps = m.params();
  for (size_t i = 0; i < ps.size(); ++i) {
    const std::string& n = ps.name(i);
    const sav::Tensor& t = ps.tensor(i);
    auto ends = [&](const char* suf) {
      const std::string s(suf);
      return n.size() >= s.size() && n.compare(n.size() - s.size(), s.size(), s) == 0;
    };
    if (ends(".p"))
      for (int64_t j = 0; j < t.numel(); ++j) t.f32()[j] = -4.0f - float(rng.below(7));
    else if (ends(".s"))
      for (int64_t j = 0; j < t.numel(); ++j) t.f32()[j] = rng.below(2) ? 1.0f : -1.0f;
    else if (ends(".router.weight"))
      for (int64_t j = 0; j < t.numel(); ++j) t.f32()[j] = rng.normal() / std::sqrt(float(t.dim(1)));
  }
  const int d = c.dim / c.heads;
  sav::ParamSet& bufs = *m.buffers();
  for (int l = 0; l < c.depth; ++l) {
    if (c.attn_kind(l) != 'h') continue;
    const std::string p = "blocks." + std::to_string(l) + ".attn.ksh.";
    const sav::Tensor& an = bufs.get(p + "anchors");
    for (int64_t r = 0; r < an.numel() / d; ++r) {
      float* a = an.f32() + r * d;
      double ss = 0.0;
      for (int i = 0; i < d; ++i) a[i] = rng.normal(), ss += double(a[i]) * a[i];
      for (int i = 0; i < d; ++i) a[i] = float(a[i] / std::sqrt(ss));
    }
    const sav::Tensor& mu = bufs.get(p + "mu");
    for (int64_t i = 0; i < mu.numel(); ++i) mu.f32()[i] = std::exp(-0.5f) + 0.02f * rng.normal();
    const sav::Tensor& A = bufs.get(p + "A");
    for (int64_t i = 0; i < A.numel(); ++i) A.f32()[i] = rng.normal();
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string models = "deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224";
  std::string batches = "1,64", json, variants = "dense,shiftadd";
  int iters = 50;
  bool profile = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "sav_cuda_bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--models") models = next();
    else if (a == "--batches") batches = next();
    else if (a == "--iters") iters = std::atoi(next().c_str());
    else if (a == "--json") json = next();
    else if (a == "--variants") variants = next();
    else if (a == "--profile") profile = true;
    else {
      std::fprintf(stderr,
                   "usage: sav_cuda_bench [--models a,b] [--batches 1,64] [--iters 50] [--json file] "
                   "[--variants dense,shiftadd] [--profile]\n");
      return 2;
    }
  }
  for (const std::string& v : split(variants))
    if (v != "dense" && v != "shiftadd") {
      std::fprintf(stderr, "sav_cuda_bench: unknown variant '%s' (dense, shiftadd)\n", v.c_str());
      return 2;
    }
  try {
    if (!sav::cuda::device_available()) {
      std::fprintf(stderr, "sav_cuda_bench: no CUDA device\n");
      return 1;
    }
    cudaDeviceProp prop{};
    SAV_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    std::printf("%-28s %-9s %5s %10s %12s %9s\n", "model", "variant", "batch", "engine_ms", "images/s",
                "to_shift");
    std::ofstream js;
    if (!json.empty()) js.open(json, std::ios::app);
    for (const std::string& name : split(models)) {
      for (const std::string& variant : split(variants)) {
        sav::VitConfig cfg = sav::vit_preset(name);
        const bool sa = variant == "shiftadd";
        if (sa) {
          cfg.attn = std::string(cfg.depth, 'h');
          cfg.mlp = std::string(cfg.depth, 'm');
          cfg.attn_linear = std::string(cfg.depth, 'd');
        }
        sav::Vit cpu(cfg);
        sav::Rng rng(1);
        if (sa)
          randomise_shiftadd(cpu, rng);
        else
          cpu.init_random(rng);
        sav::ViTCuda net(cpu);
        for (const std::string& bs : split(batches)) {
          const int B = std::atoi(bs.c_str());
          if (profile) {
            const sav::VitConfig& c = net.config();
            sav::cuda::DeviceBuffer<float> img(size_t(B) * c.in_chans * c.img_size * c.img_size),
                logits(size_t(B) * c.num_classes);
            img.fill_bytes(0);
            net.forward_eager(img.get(), logits.get(), B, nullptr);  // warm-up: algorithm choice, module loads
            SAV_CUDA_CHECK(cudaDeviceSynchronize());
            SAV_CUDA_CHECK(cudaProfilerStart());
            net.forward_eager(img.get(), logits.get(), B, nullptr);
            SAV_CUDA_CHECK(cudaDeviceSynchronize());
            SAV_CUDA_CHECK(cudaProfilerStop());
            std::printf("%-28s %-9s %5d profiled one eager forward\n", name.c_str(), variant.c_str(), B);
            continue;
          }
          const double ms = sav::vit_cuda_median_ms(net, B, iters);
          std::string share = "-";
          if (sa) {  // tokens to the shift expert over every MoE layer of the last (random-image) forward
            size_t n = 0, shift = 0;
            for (const auto& [layer, ch] : net.moe_choices())
              for (int8_t e : ch) n += 1, shift += e == 1;
            char buf[32];
            std::snprintf(buf, sizeof buf, "%.1f%%", n ? 100.0 * shift / n : 0.0);
            share = buf;
          }
          std::printf("%-28s %-9s %5d %10.4f %12.1f %9s\n", name.c_str(), variant.c_str(), B, ms, B * 1000.0 / ms,
                      share.c_str());
          std::fflush(stdout);
          if (js)
            js << "{\"model\": \"" << name << "\", \"variant\": \"" << variant << "\", \"batch\": " << B
               << ", \"engine_ms\": " << ms << "}\n";
        }
      }
    }
  } catch (const sav::Error& e) {
    std::fprintf(stderr, "sav_cuda_bench: %s\n", e.where().c_str());
    return 1;
  }
  return 0;
}
