// sav_cuda_bench: latency of the CUDA engine (ViTCuda / PvtCuda, graph replay) on the DeiT and PVTv2 presets
// with random weights, dense and converted to ShiftAddViT.
//
//   sav_cuda_bench [--models deit_tiny_patch16_224,...] [--batches 1,64] [--iters 50] [--json out.jsonl]
//                  [--variants dense,shiftadd,shift] [--math f32|tf32] [--weights checkpoint.safetensors]
//                  [--path auto|layered|fused|both] [--row-fusion auto,on,off]
//                  [--dependent-launch auto,on,small,off] [--trace] [--timeline] [--shift-paths]
//   sav_cuda_bench --profile ...   # one eager forward per (model, variant, batch) between
//                                  # cudaProfilerStart/Stop, for `ncu --profile-from-start off` (after an
//                                  # unprofiled warm-up)
//
// Variants: dense = the preset as timm builds it; shiftadd = the paper's conversion: Hamming attention
// (16 bits, 25 anchors) in every DeiT block / in PVTv2 stages 1-3, MoE(mult, shift) fc1 and fc2, dense
// attention linears; shift = softmax attention with every attention linear (qkv / q, kv, and proj) and every
// MLP linear (fc1, fc2) a shift linear (no MoE, no Hamming: the model whose products are all shift layers);
// --math: the f32 products of the PVTv2 models (tf32 default; DeiT runs in bf16); random routers (about half
// the tokens to each expert; both experts are computed for every token on the GPU, so the split does not
// change the time), KSH buffers that set about half the bits (the MatAdd cost follows the number of set bits),
// shift exponents in [-10, -4] with random signs. Shift weights run on the tensor cores (decode-to-matrix-unit):
// in DeiT / ViT shift linears, per layer and batch size the faster of cuBLASLt on weights decoded once to bf16
// and the packed-mma kernel on 5-bit codes (models/vit_cuda.h ViTCudaShiftPath; timed on the first forward of a
// batch size); MoE shift experts and PVTv2 shift linears run decoded.
//
// --weights times one checkpoint instead (any layout `shiftaddvit infer` reads, the release's included),
// reported under its architecture's name with the variant "checkpoint".
// --path (ViT models): which forward ViTCuda runs (models/vit_cuda.h): auto (default: ViTCuda's automatic
// choice, see ViTCudaPath), layered, fused (the single cluster-kernel launch where the model and batch allow it;
// other rows keep auto), or both (one row per path). --trace: after each fused row, the time of each step of the
// fused kernel per block (%globaltimer and clock64 stamps; ops/cuda/vit_fused.h vit_fused_trace).
// --row-fusion (ViT models, layered path): a comma list of the rows-fused kernels' modes (ViTCudaRowFusion), one row
// each: auto (default: timed per shape, path "layered"; the automatic choices print after the row), on ("layered-rows")
// and off ("layered-norows": every product by cuBLASLt and its row kernel).
// --dependent-launch (ViT models, layered path): a comma list of ViTCudaDependentLaunch modes, one row each inside each
// row-fusion mode: auto (default: timed with the row-fusion sets), on (path suffix "+dep": dependent launch of the
// engine's kernels), small ("+dep+small": and the engine's small-M products instead of cuBLASLt) and off ("+nodep").
// --timeline: after each row, the block kernels' timeline of the last forward of a few more replays (common.h
// timeline_enable): per block, when each attention kernel (ham_block) and MLP kernel (mlp_block) started, was released
// by its dependent-launch wait and ended, against its predecessor; the recording itself adds a little time.
// --shift-paths: after each row of a ViT model with shift linears, the product each shift linear ran at that
// batch (ViTCuda::shift_paths: cublas_decoded or packed_mma) with the two times the automatic choice measured.
// Prints one line per (model, variant, batch, path): name, variant, batch, the path that ran, median ms,
// images/s, and for shiftadd the share of tokens the routers sent to the shift expert; with --json also appends
// {"model":..., "variant":..., "batch":..., "path":..., "engine_ms":...} rows (read by scripts/h200_bench.sh).
// A tool: it exits.
#include <cuda_profiler_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "models/cuda_model.h"
#include "models/pvt.h"
#include "models/pvt_cuda.h"
#include "models/registry.h"
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
void randomise_shiftadd(sav::ImageClassifier& m, sav::Rng& rng) {
  m.init_random(rng);
  auto ends = [](const std::string& n, const char* suf) {
    const std::string s(suf);
    return n.size() >= s.size() && n.compare(n.size() - s.size(), s.size(), s) == 0;
  };
  sav::ParamSet& ps = m.params();
  for (size_t i = 0; i < ps.size(); ++i) {
    const std::string& n = ps.name(i);
    const sav::Tensor& t = ps.tensor(i);
    if (ends(n, ".p"))
      for (int64_t j = 0; j < t.numel(); ++j) t.f32()[j] = -4.0f - float(rng.below(7));
    else if (ends(n, ".s"))
      for (int64_t j = 0; j < t.numel(); ++j) t.f32()[j] = rng.below(2) ? 1.0f : -1.0f;
    else if (ends(n, ".router.weight"))
      for (int64_t j = 0; j < t.numel(); ++j) t.f32()[j] = rng.normal() / std::sqrt(float(t.dim(1)));
  }
  sav::ParamSet& bufs = *m.buffers();
  for (size_t i = 0; i < bufs.size(); ++i) {
    const std::string& n = bufs.name(i);
    const sav::Tensor& t = bufs.tensor(i);
    if (ends(n, "ksh.anchors")) {  // (H, m, d)
      const int64_t d = t.dim(2);
      for (int64_t r = 0; r < t.numel() / d; ++r) {
        float* a = t.f32() + r * d;
        double ss = 0.0;
        for (int64_t j = 0; j < d; ++j) a[j] = rng.normal(), ss += double(a[j]) * a[j];
        for (int64_t j = 0; j < d; ++j) a[j] = float(a[j] / std::sqrt(ss));
      }
    } else if (ends(n, "ksh.mu")) {
      for (int64_t j = 0; j < t.numel(); ++j) t.f32()[j] = std::exp(-0.5f) + 0.02f * rng.normal();
    } else if (ends(n, "ksh.A")) {
      for (int64_t j = 0; j < t.numel(); ++j) t.f32()[j] = rng.normal();
    }
  }
}

// One engine model on the GPU, ViT or PVT, behind one interface for the timing loop.
struct Net {
  std::unique_ptr<sav::ImageClassifier> cpu;
  std::unique_ptr<sav::ViTCuda> vit;
  std::unique_ptr<sav::PvtCuda> pvt;
  int in_elems = 0, classes = 0;
  void forward_eager(const float* x, float* y, int B) {
    if (vit)
      vit->forward_eager(x, y, B, nullptr);
    else
      pvt->forward_eager(x, y, B, nullptr);
  }
  double median_ms(int B, int iters) {
    return vit ? sav::vit_cuda_median_ms(*vit, B, iters) : sav::pvt_cuda_median_ms(*pvt, B, iters);
  }
  std::vector<std::pair<std::string, std::vector<int8_t>>> moe_choices() const {
    return vit ? vit->moe_choices() : pvt->moe_choices();
  }
};

// A checkpoint's model (timm, engine or release layout, as `shiftaddvit infer` loads it) on the GPU.
Net net_of_checkpoint(const std::string& path, sav::cuda::F32Math math) {
  Net n;
  n.cpu = sav::load_model(path);
  if (auto* p = dynamic_cast<sav::Pvt*>(n.cpu.get()))
    n.pvt = std::make_unique<sav::PvtCuda>(*p, sav::PvtCudaOptions{math});
  else if (auto* v = dynamic_cast<sav::Vit*>(n.cpu.get()))
    n.vit = std::make_unique<sav::ViTCuda>(*v);
  else
    SAV_THROW("sav_cuda_bench: " << path << " is neither a ViT nor a PVT");
  n.in_elems = n.cpu->in_chans() * n.cpu->img_size() * n.cpu->img_size();
  n.classes = n.cpu->num_classes();
  return n;
}

// The preset `name` as timm builds it (variant dense), converted as the paper does (shiftadd: DeiT, Hamming
// attention in every block and MoE MLPs; PVTv2, Hamming attention in stages 1-3 and MoE MLPs), or with every
// block linear a shift linear and softmax attention (shift).
Net make_net(const std::string& name, const std::string& variant, sav::cuda::F32Math math) {
  Net n;
  sav::Rng rng(1);
  const bool shiftadd = variant == "shiftadd", shift = variant == "shift";
  if (sav::is_pvt_arch(name)) {
    sav::PvtConfig cfg = sav::pvt_preset(name);
    if (shiftadd) {
      cfg.attn = std::string(cfg.stages() - 1, 'h') + "s";
      cfg.mlp = std::string(cfg.stages(), 'm');
      cfg.attn_linear = std::string(cfg.stages(), 'd');
    } else if (shift) {
      cfg.attn = std::string(cfg.stages(), 's');
      cfg.mlp = std::string(cfg.stages(), 's');
      cfg.attn_linear = std::string(cfg.stages(), 's');
    }
    auto m = std::make_unique<sav::Pvt>(cfg);
    if (shiftadd || shift)
      randomise_shiftadd(*m, rng);
    else
      m->init_random(rng);
    n.pvt = std::make_unique<sav::PvtCuda>(*m, sav::PvtCudaOptions{math});
    n.cpu = std::move(m);
  } else {
    sav::VitConfig cfg = sav::vit_preset(name);
    if (shiftadd) {
      cfg.attn = std::string(cfg.depth, 'h');
      cfg.mlp = std::string(cfg.depth, 'm');
      cfg.attn_linear = std::string(cfg.depth, 'd');
    } else if (shift) {
      cfg.attn = std::string(cfg.depth, 's');
      cfg.mlp = std::string(cfg.depth, 's');
      cfg.attn_linear = std::string(cfg.depth, 's');
    }
    auto m = std::make_unique<sav::Vit>(cfg);
    if (shiftadd || shift)
      randomise_shiftadd(*m, rng);
    else
      m->init_random(rng);
    n.vit = std::make_unique<sav::ViTCuda>(*m);
    n.cpu = std::move(m);
  }
  n.in_elems = n.cpu->in_chans() * n.cpu->img_size() * n.cpu->img_size();
  n.classes = n.cpu->num_classes();
  return n;
}

// --shift-paths: the product each shift linear of a ViT model ran at batch B (nothing for models without
// shift linears).
void print_shift_paths(const Net& net, int B, const std::string& path_name) {
  if (!net.vit || net.vit->shift_layer_count() == 0) return;
  const std::vector<sav::ViTCudaShiftChoice> ch = net.vit->shift_choices(B);
  if (ch.empty()) {
    std::printf("  shift paths at batch %d: none (%s)\n", B,
                path_name == "fused" ? "the fused kernel ran" : "not chosen yet");
    return;
  }
  int packed = 0;
  for (const auto& c : ch) packed += c.path == "packed_mma";
  std::printf("  shift paths at batch %d: %d of %zu shift linears on packed_mma\n", B, packed, ch.size());
  auto us = [](float v) {
    char buf[32];
    if (v < 0.0f)
      std::snprintf(buf, sizeof buf, "-");
    else
      std::snprintf(buf, sizeof buf, "%.2f us", v);
    return std::string(buf);
  };
  for (const auto& c : ch)
    std::printf("    %-30s %-15s cublas %10s  packed %10s\n", c.layer.c_str(), c.path.c_str(), us(c.cublas_us).c_str(),
                us(c.packed_us).c_str());
}

// One bench row's modes on the network: row fusion, dependent launch and the forward path (a forced fused path
// falls back to automatic where the model or the batch is outside the kernel); its path name, or nullopt when the row
// is skipped: forced modes with nothing to force (fused path, dense models, PVT), or the fused path that cannot run
// when the layered row is printed too (both_paths).
std::optional<std::string> setup_row(Net& net, sav::ViTCudaPath path, sav::ViTCudaRowFusion rows,
                                     sav::ViTCudaDependentLaunch dep, int B, bool both_paths, bool dense) {
  const bool auto_rows = rows == sav::ViTCudaRowFusion::automatic;
  const bool auto_dep = dep == sav::ViTCudaDependentLaunch::automatic;
  if (!net.vit) {
    if (!auto_rows || !auto_dep) return std::nullopt;  // PVT: no rows-fused kernels
    return std::string("layered");
  }
  if (!auto_rows && (path == sav::ViTCudaPath::fused || dense)) return std::nullopt;  // nothing to fuse
  if (!auto_dep && path == sav::ViTCudaPath::fused) return std::nullopt;
  net.vit->set_row_fusion(rows);
  net.vit->set_dependent_launch(dep);
  if (path != sav::ViTCudaPath::fused || net.vit->fused_supported(B)) {
    net.vit->set_path(path);
  } else {
    if (both_paths) return std::nullopt;  // the layered row is the only one
    net.vit->set_path(sav::ViTCudaPath::automatic);
  }
  std::string name = net.vit->path_name(B);
  if (name == "layered" && !auto_rows) name = rows == sav::ViTCudaRowFusion::on ? "layered-rows" : "layered-norows";
  if (name.rfind("layered", 0) == 0 && !auto_dep)
    name += dep == sav::ViTCudaDependentLaunch::on               ? "+dep"
            : dep == sav::ViTCudaDependentLaunch::small_products ? "+dep+small"
                                                                 : "+nodep";
  return name;
}

// --profile: one eager forward of B zero images between cudaProfilerStart / Stop, after a warm-up forward
void profile_row(Net& net, int B) {
  sav::cuda::DeviceBuffer<float> img(size_t(B) * net.in_elems), logits(size_t(B) * net.classes);
  img.fill_bytes(0);
  net.forward_eager(img.get(), logits.get(), B);  // warm-up: algorithm choice, module loads
  SAV_CUDA_CHECK(cudaDeviceSynchronize());
  SAV_CUDA_CHECK(cudaProfilerStart());
  net.forward_eager(img.get(), logits.get(), B);
  SAV_CUDA_CHECK(cudaDeviceSynchronize());
  SAV_CUDA_CHECK(cudaProfilerStop());
}

// The share of tokens sent to the shift expert over every MoE layer of the last (random-image) forward, "12.3%".
std::string shift_share(const Net& net) {
  size_t n = 0, shift = 0;
  for (const auto& [layer, ch] : net.moe_choices())
    for (int8_t e : ch) n += 1, shift += e == 1;
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f%%", n ? 100.0 * shift / n : 0.0);
  return buf;
}

// The automatic choice's whole-forward timings at batch B (ViTCuda::row_fusion_choices), a line per set.
void print_row_choices(const sav::ViTCuda& vit, int B) {
  auto on = [](bool v) { return v ? "on" : "off"; };
  for (const sav::ViTCudaRowChoice& c : vit.row_fusion_choices(B))
    std::printf(
        "  row fusion: blk %-3s ham %-3s proj %-3s fc2 %-3s mlp %-3s pmlp %-3s dependent %-3s forward %8.2f us in a "
        "graph%s\n",
        on(c.blk), on(c.ham), on(c.proj), on(c.fc2), on(c.mlp), on(c.pmlp), on(c.dependent), c.forward_us,
        c.chosen ? "  <- chosen" : "");
}

// The modes of a comma list (flag's value s) by their names; false (after a message) for an unknown name.
template <class E>
bool parse_modes(const char* flag, const std::string& s, const std::vector<std::pair<std::string, E>>& names,
                 std::vector<E>& out) {
  for (const std::string& r : split(s)) {
    const auto it = std::find_if(names.begin(), names.end(), [&](const auto& n) { return n.first == r; });
    if (it == names.end()) {
      std::string all;
      for (const auto& n : names) all += (all.empty() ? "" : ", ") + n.first;
      std::fprintf(stderr, "sav_cuda_bench: %s takes %s (a comma list), got '%s'\n", flag, all.c_str(), r.c_str());
      return false;
    }
    out.push_back(it->second);
  }
  return true;
}

// The --timeline report over the records of `forwards` identical forwards: the records sorted by entry and cut into
// launches (a new launch where the kernel changes or a CTA index repeats), the last forward's launches one line each
// (the forwards' launches split evenly), then the means over its blocks after the first.
std::string timeline_report(std::vector<sav::cuda::TimelineRec> r, int forwards) {
  using Rec = sav::cuda::TimelineRec;
  std::sort(r.begin(), r.end(), [](const Rec& a, const Rec& b) { return a.t_entry < b.t_entry; });
  struct Launch {
    uint32_t kind = 0;
    uint64_t e0 = ~0ull, e1 = 0, w0 = ~0ull, x1 = 0;
    std::vector<uint32_t> ctas, sms;
  };
  std::vector<Launch> ls;
  for (const Rec& x : r) {
    if (ls.empty() || ls.back().kind != x.kind ||
        std::find(ls.back().ctas.begin(), ls.back().ctas.end(), x.cta) != ls.back().ctas.end()) {
      ls.emplace_back();
      ls.back().kind = x.kind;
    }
    Launch& l = ls.back();
    l.e0 = std::min(l.e0, x.t_entry), l.e1 = std::max(l.e1, x.t_entry);
    l.w0 = std::min(l.w0, x.t_waited), l.x1 = std::max(l.x1, x.t_exit);
    l.ctas.push_back(x.cta), l.sms.push_back(x.smid);
  }
  std::ostringstream o;
  if (ls.empty() || forwards < 1 || ls.size() % size_t(forwards) != 0) {
    o << "  timeline: " << ls.size() << " block-kernel launches in " << forwards
      << " forwards, not a whole number each\n";
    return o.str();
  }
  const size_t per = ls.size() / size_t(forwards), start = ls.size() - per;
  auto us = [](uint64_t a, uint64_t b) { return (double(a) - double(b)) * 1e-3; };
  o << "  timeline of one forward (us; entry = first CTA in, after the previous block kernel's first; resident = the\n"
       "  previous kernel's last exit - this kernel's last entry; release = first wait return - the previous kernel's\n"
       "  last exit; work = last exit - first wait return; shared = this kernel's CTAs on SMs the previous one used)\n";
  o << "  block kernel  ctas   entry  resident  release    work  shared\n";
  double sum[2][4] = {}, cnt[2] = {};
  int block = -1, attn = 0;
  uint64_t first_w = 0, last_w = 0;
  for (size_t i = start; i < ls.size(); ++i) {
    const Launch& l = ls[i];
    const bool is_attn = l.kind == sav::cuda::kTimelineHamBlock;
    if (is_attn) {
      ++block, ++attn;
      (attn == 1 ? first_w : last_w) = l.w0;
    }
    char line[160];
    const char* name = is_attn ? "attn" : "mlp";
    if (i == start) {  // no block kernel before it in this forward
      std::snprintf(line, sizeof line, "  %5d %-6s %5zu %7s %9s %8s %7.2f %7s\n", block, name, l.ctas.size(), "-", "-",
                    "-", us(l.x1, l.w0), "-");
      o << line;
      continue;
    }
    const Launch& pr = ls[i - 1];
    int shared = 0;
    for (uint32_t sm : l.sms) shared += std::count(pr.sms.begin(), pr.sms.end(), sm) > 0;
    const double v[4] = {us(l.e0, pr.e0), us(pr.x1, l.e1), us(l.w0, pr.x1), us(l.x1, l.w0)};
    std::snprintf(line, sizeof line, "  %5d %-6s %5zu %7.2f %9.2f %8.2f %7.2f %7d\n", block, name, l.ctas.size(), v[0],
                  v[1], v[2], v[3], shared);
    o << line;
    if (block >= 1) {
      for (int k = 0; k < 4; ++k) sum[is_attn ? 0 : 1][k] += v[k];
      ++cnt[is_attn ? 0 : 1];
    }
  }
  auto mean = [&](int t, int k) { return cnt[t] > 0 ? sum[t][k] / cnt[t] : 0.0; };
  char line[260];
  std::snprintf(line, sizeof line,
                "  mean over blocks 1..%d: attn entry %.2f resident %.2f release %.2f work %.2f | mlp entry %.2f "
                "resident %.2f release %.2f work %.2f | block period %.2f\n",
                block, mean(0, 0), mean(0, 1), mean(0, 2), mean(0, 3), mean(1, 0), mean(1, 1), mean(1, 2), mean(1, 3),
                attn > 1 ? us(last_w, first_w) / (attn - 1) : 0.0);
  o << line;
  return o.str();
}

}  // namespace

int main(int argc, char** argv) {
  std::string models = "deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224";
  std::string batches = "1,64", json, variants = "dense,shiftadd";
  int iters = 50;
  bool profile = false, trace = false, timeline = false, shift_paths = false;
  std::string math_s = "tf32", weights, path_s = "auto", rows_s = "auto", dep_s = "auto";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "sav_cuda_bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--models")
      models = next();
    else if (a == "--batches")
      batches = next();
    else if (a == "--iters")
      iters = std::atoi(next().c_str());
    else if (a == "--json")
      json = next();
    else if (a == "--variants")
      variants = next();
    else if (a == "--profile")
      profile = true;
    else if (a == "--math")
      math_s = next();
    else if (a == "--weights")
      weights = next();
    else if (a == "--path")
      path_s = next();
    else if (a == "--row-fusion")
      rows_s = next();
    else if (a == "--dependent-launch")
      dep_s = next();
    else if (a == "--trace")
      trace = true;
    else if (a == "--timeline")
      timeline = true;
    else if (a == "--shift-paths")
      shift_paths = true;
    else {
      std::fprintf(stderr,
                   "usage: sav_cuda_bench [--models a,b] [--batches 1,64] [--iters 50] [--json file] "
                   "[--variants dense,shiftadd,shift] [--math f32|tf32] [--weights ckpt] [--profile] "
                   "[--path auto|layered|fused|both] [--row-fusion auto,on,off] [--dependent-launch auto,on,small,off] "
                   "[--trace] [--timeline] [--shift-paths]\n");
      return 2;
    }
  }
  if (math_s != "f32" && math_s != "tf32") {
    std::fprintf(stderr, "sav_cuda_bench: --math is f32 or tf32, got '%s'\n", math_s.c_str());
    return 2;
  }
  const sav::cuda::F32Math math = math_s == "f32" ? sav::cuda::F32Math::f32 : sav::cuda::F32Math::tf32;
  if (path_s != "auto" && path_s != "layered" && path_s != "fused" && path_s != "both") {
    std::fprintf(stderr, "sav_cuda_bench: --path is auto, layered, fused or both, got '%s'\n", path_s.c_str());
    return 2;
  }
  std::vector<sav::ViTCudaRowFusion> row_fusions;
  std::vector<sav::ViTCudaDependentLaunch> dep_modes;
  using RF = sav::ViTCudaRowFusion;
  using DL = sav::ViTCudaDependentLaunch;
  if (!parse_modes("--row-fusion", rows_s, {{"auto", RF::automatic}, {"on", RF::on}, {"off", RF::off}}, row_fusions) ||
      !parse_modes("--dependent-launch", dep_s,
                   {{"auto", DL::automatic}, {"on", DL::on}, {"small", DL::small_products}, {"off", DL::off}},
                   dep_modes))
    return 2;
  std::vector<sav::ViTCudaPath> paths;
  if (path_s == "auto") paths = {sav::ViTCudaPath::automatic};
  if (path_s == "layered" || path_s == "both") paths.push_back(sav::ViTCudaPath::layered);
  if (path_s == "fused" || path_s == "both") paths.push_back(sav::ViTCudaPath::fused);
  for (const std::string& v : split(variants))
    if (v != "dense" && v != "shiftadd" && v != "shift") {
      std::fprintf(stderr, "sav_cuda_bench: unknown variant '%s' (dense, shiftadd, shift)\n", v.c_str());
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
    if (timeline) sav::cuda::timeline_enable();
    std::printf("%-28s %-9s %5s %-8s %10s %12s %9s\n", "model", "variant", "batch", "path", "engine_ms", "images/s",
                "to_shift");
    std::ofstream js;
    if (!json.empty()) js.open(json, std::ios::app);
    // --weights: that checkpoint only, reported under its architecture's name, variant "checkpoint"
    const std::vector<std::string> model_list = weights.empty() ? split(models) : std::vector<std::string>{weights};
    const std::vector<std::string> variant_list =
        weights.empty() ? split(variants) : std::vector<std::string>{"checkpoint"};
    for (const std::string& entry : model_list) {
      for (const std::string& variant : variant_list) {
        const bool sa = variant == "shiftadd";
        Net net = weights.empty() ? make_net(entry, variant, math) : net_of_checkpoint(entry, math);
        const std::string name = net.cpu->arch();
        // PVT models run f32 products: their rows say which math unless it is the default (tf32)
        const std::string vname = variant + (net.pvt && math == sav::cuda::F32Math::f32 ? "-f32" : "");
        for (const std::string& bs : split(batches))
          for (const sav::ViTCudaPath path : paths)
            for (const sav::ViTCudaRowFusion rows : row_fusions)
              for (const sav::ViTCudaDependentLaunch dep : dep_modes) {
                const int B = std::atoi(bs.c_str());
                const std::optional<std::string> path_name =
                    setup_row(net, path, rows, dep, B, path_s == "both", variant == "dense");
                if (!path_name) continue;
                if (profile) {
                  profile_row(net, B);
                  std::printf("%-28s %-9s %5d %-8s profiled one eager forward\n", name.c_str(), vname.c_str(), B,
                              path_name->c_str());
                  if (shift_paths) print_shift_paths(net, B, *path_name);
                  continue;
                }
                const double ms = net.median_ms(B, iters);
                const std::string share = sa || !weights.empty() ? shift_share(net) : "-";
                std::printf("%-28s %-9s %5d %-8s %10.4f %12.1f %9s\n", name.c_str(), vname.c_str(), B,
                            path_name->c_str(), ms, B * 1000.0 / ms, share.c_str());
                if (trace && *path_name == "fused") std::printf("%s", net.vit->fused_trace(B).c_str());
                if (timeline && net.vit) {
                  sav::cuda::timeline_reset();
                  net.median_ms(B, 3);  // median_forward_ms's warm-ups, then 3 forwards
                  std::printf("%s",
                              timeline_report(sav::cuda::timeline_collect(), sav::cuda::kForwardWarmups + 3).c_str());
                }
                if (shift_paths) print_shift_paths(net, B, *path_name);
                if (net.vit && (rows == RF::automatic || dep == DL::automatic) && path_name->rfind("layered", 0) == 0)
                  print_row_choices(*net.vit, B);
                std::fflush(stdout);
                if (js)
                  js << "{\"model\": \"" << name << "\", \"variant\": \"" << vname << "\", \"batch\": " << B
                     << ", \"path\": \"" << *path_name << "\", \"engine_ms\": " << ms << "}\n";
              }
      }
    }
  } catch (const sav::Error& e) {
    std::fprintf(stderr, "sav_cuda_bench: %s\n", e.where().c_str());
    return 1;
  }
  return 0;
}
