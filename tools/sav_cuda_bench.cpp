// sav_cuda_bench: latency of the CUDA engine (ViTCuda, graph replay) on the DeiT presets with random weights.
//
//   sav_cuda_bench [--models deit_tiny_patch16_224,...] [--batches 1,64] [--iters 50] [--json out.jsonl]
//   sav_cuda_bench --profile ...   # one eager forward per (model, batch) between cudaProfilerStart/Stop,
//                                  # for `ncu --profile-from-start off` (after an unprofiled warm-up)
//
// Prints one line per (model, batch): name, batch, median ms, images/s; with --json also appends
// {"model":..., "batch":..., "engine_ms":...} rows (read by scripts/h200_bench.sh). A tool: it exits.
#include <cuda_profiler_api.h>

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

}  // namespace

int main(int argc, char** argv) {
  std::string models = "deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224";
  std::string batches = "1,64", json;
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
    else if (a == "--profile") profile = true;
    else {
      std::fprintf(stderr, "usage: sav_cuda_bench [--models a,b] [--batches 1,64] [--iters 50] [--json file]\n");
      return 2;
    }
  }
  try {
    if (!sav::cuda::device_available()) {
      std::fprintf(stderr, "sav_cuda_bench: no CUDA device\n");
      return 1;
    }
    cudaDeviceProp prop{};
    SAV_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    std::printf("%-28s %5s %10s %12s\n", "model", "batch", "engine_ms", "images/s");
    std::ofstream js;
    if (!json.empty()) js.open(json, std::ios::app);
    for (const std::string& name : split(models)) {
      sav::Vit cpu(sav::vit_preset(name));
      sav::Rng rng(1);
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
          std::printf("%-28s %5d profiled one eager forward\n", name.c_str(), B);
          continue;
        }
        const double ms = sav::vit_cuda_median_ms(net, B, iters);
        std::printf("%-28s %5d %10.4f %12.1f\n", name.c_str(), B, ms, B * 1000.0 / ms);
        std::fflush(stdout);
        if (js) js << "{\"model\": \"" << name << "\", \"batch\": " << B << ", \"engine_ms\": " << ms << "}\n";
      }
    }
  } catch (const sav::Error& e) {
    std::fprintf(stderr, "sav_cuda_bench: %s\n", e.where().c_str());
    return 1;
  }
  return 0;
}
