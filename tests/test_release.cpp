// Checkpoints of the public ShiftAddViT release (models/release_pvt.h).
//  - Reference model (files of shared/reference, see its README; skipped when absent): the release's
//    PVTv2-B0 with Hamming attention and MoE linears reproduces the release's logits and every intermediate
//    it recorded, converts to the engine's own checkpoint that reloads with the same logits, and runs from
//    the command line.
//  - Tiny release-layout checkpoints written here from random engine models (no files needed): every tensor
//    maps back to where it came from (dense, shift and MoE linears, fused and split softmax projections),
//    the loaded model computes what the original computes, and broken checkpoints give errors naming the
//    tensors.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include "core/error.h"
#include "op_harness.h"
#include "core/rng.h"
#include "io/safetensors.h"
#include "models/pvt.h"
#include "models/registry.h"
#include "models/release_pvt.h"
#include "train/trainer.h"

using namespace sav;
namespace fs = std::filesystem;

namespace {

// max |a - ref| / max |ref|
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

#define EXPECT_HAS(msg, part) EXPECT_NE(std::string(msg).find(part), std::string::npos) << (msg)

// A fresh temporary folder, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() /
           ("sav_release_" + std::to_string(::getpid()) + "_" + (info ? std::string(info->name()) : "suite"));
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string operator/(const std::string& f) const { return (path / f).string(); }
};

// ---------------------------------------------------------------------------------------------------------
// The reference model of the release

const char* kRefModel = "official_pvt_v2_b0_moe_seed1.safetensors";
const char* kRefIo = "official_pvt_v2_b0_moe_seed1.io.safetensors";

// $SAV_RELEASE_REF, else <repo>/../shared/reference, else /work/shared/reference; "" when none has both files.
std::string reference_dir() {
  std::vector<std::string> dirs;
  if (const char* e = std::getenv("SAV_RELEASE_REF")) dirs.push_back(e);
  dirs.push_back(std::string(SAV_TEST_DATA) + "/../../shared/reference");
  dirs.push_back("/work/shared/reference");
  for (const std::string& d : dirs)
    if (fs::exists(fs::path(d) / kRefModel) && fs::exists(fs::path(d) / kRefIo)) return d;
  return "";
}

#define SKIP_WITHOUT_REFERENCE()                                                                             \
  if (reference_dir().empty())                                                                               \
  GTEST_SKIP() << "ShiftAddViT release reference files (" << kRefModel << ", " << kRefIo << ") not found in " \
               << "$SAV_RELEASE_REF, <repo>/../shared/reference or /work/shared/reference"

// The release's name of an intermediate the engine's activation tap reports (stage s = -1 - block for
// "embed" / "out"; block l of the model otherwise).
std::string release_name(const Pvt& m, int block, const std::string& what) {
  if (block < 0) {
    const int s = -1 - block;
    return (what == "embed" ? "patch_embed" : "norm") + std::to_string(s + 1);
  }
  const int s = m.block_stage(block);
  int i = 0;
  for (int l = 0; l < block; ++l) i += m.block_stage(l) == s;
  const std::string b = "block" + std::to_string(s + 1) + "." + std::to_string(i);
  return what == "attn" ? b + ".attn" : b;
}

// One forward of the reference model on the reference input, with every intermediate kept (by release name).
struct ReferenceRun {
  std::unique_ptr<ImageClassifier> model;
  std::map<std::string, std::vector<float>> acts;
  std::vector<float> logits;
};

const ReferenceRun& reference_run() {
  static ReferenceRun run = [] {
    ReferenceRun r;
    const std::string dir = reference_dir();
    r.model = load_model(dir + "/" + kRefModel);  // detected by its names; no --arch
    Pvt* pvt = dynamic_cast<Pvt*>(r.model.get());
    SAV_CHECK(pvt != nullptr, "the release checkpoint did not load as a PVT");
    pvt->set_activation_tap([&r, pvt](int block, const char* what, const float* x, int64_t rows, int cols) {
      r.acts[release_name(*pvt, block, what)].assign(x, x + rows * cols);
    });
    Checkpoint io = Checkpoint::open(dir + "/" + kRefIo);
    const Tensor x = io.get("input");
    const int B = static_cast<int>(x.dim(0));
    pvt->forward(x.f32(), B, false);
    pvt->set_activation_tap(nullptr);
    r.logits.assign(pvt->logits(), pvt->logits() + int64_t(B) * pvt->num_classes());
    return r;
  }();
  return run;
}

// ---------------------------------------------------------------------------------------------------------
// Tiny release-layout checkpoints written from engine models

// The release's tensors of an engine model, by the rules of models/release_pvt.h written out again
// independently: fused[s] writes stage s's attn.q and attn.kv as one attn.qkv (q's router).
std::vector<std::pair<std::string, Tensor>> release_tensors(Pvt& m, const std::vector<bool>& fused) {
  const PvtConfig& c = m.config();
  std::vector<std::pair<std::string, Tensor>> out;
  std::map<std::string, std::vector<float>> qkv;  // fused release name -> q rows then kv rows
  std::map<std::string, Shape> qkv_shape;
  const std::regex stage_re(R"(stages\.(\d+)\.(downsample|norm)\.(.*))"), block_re(R"(stages\.(\d+)\.blocks\.(\d+)\.(.*))");
  auto one = [&](const std::string& n, const Tensor& t) {
    std::smatch g;
    std::string name = n;
    Tensor v = t.clone();
    if (n.rfind("patch_embed.", 0) == 0) {
      name = "patch_embed1." + n.substr(12);
    } else if (std::regex_match(n, g, stage_re)) {
      const std::string s1 = std::to_string(std::stoi(g[1]) + 1);
      name = (g[2] == "downsample" ? "patch_embed" + s1 : "norm" + s1) + "." + g[3].str();
    } else if (std::regex_match(n, g, block_re)) {
      const int s = std::stoi(g[1]);
      const int H = c.heads[s], d = c.dims[s] / H;
      std::string r = g[3];
      const std::string blk = "block" + std::to_string(s + 1) + "." + g[2].str() + ".";
      auto replace = [&](const std::string& from, const std::string& to) {
        const size_t at = r.find(from);
        if (at != std::string::npos) r.replace(at, from.size(), to);
      };
      if (r == "attn.ksh.anchors") r = "attn.qk_quant.ksh.anchor", v = v.reshape({1, H, c.anchors, d});
      else if (r == "attn.ksh.mu") r = "attn.qk_quant.ksh.mvec", v = v.reshape({1, H, 1, c.anchors});
      else if (r == "attn.ksh.A") r = "attn.qk_quant.ksh.A";
      else if (r == "attn.dwconv.weight") r = "attn.dconv.weight", v = v.reshape({H, 1, 9, 1});
      else if (r.rfind("mlp.dwconv.", 0) == 0) r = "mlp.dwconv.dwconv." + r.substr(11);
      replace(".router.", ".gate.gate.");
      if (r.size() > 2 && r.compare(r.size() - 2, 2, ".p") == 0) r = r.substr(0, r.size() - 2) + ".shift";
      if (r.size() > 2 && r.compare(r.size() - 2, 2, ".s") == 0) r = r.substr(0, r.size() - 2) + ".sign";
      const bool q = r.rfind("attn.q.", 0) == 0, kv = r.rfind("attn.kv.", 0) == 0;
      if (fused[s] && (q || kv)) {
        const std::string fname = blk + "attn.qkv." + r.substr(q ? 7 : 8);
        if (fname.find(".gate.gate.") != std::string::npos) {
          if (q) out.emplace_back(fname, v);  // the kv router is made equal to q's by the caller
          return;
        }
        std::vector<float>& dst = qkv[fname];
        const std::vector<float> src = v.to_vector();
        dst.insert(q ? dst.begin() : dst.end(), src.begin(), src.end());  // q rows first
        Shape sh = v.shape();
        sh[0] = 3 * c.dims[s];
        qkv_shape[fname] = sh;
        return;
      }
      name = blk + r;
    }
    out.emplace_back(name, v);
  };
  for (size_t i = 0; i < m.params().size(); ++i) one(m.params().name(i), m.params().tensor(i));
  for (size_t i = 0; i < m.buffers()->size(); ++i) one(m.buffers()->name(i), m.buffers()->tensor(i));
  for (auto& [n, v] : qkv) out.emplace_back(n, Tensor::from_vector(v, qkv_shape[n]));
  // the release also stores a projection matrix of its KSH module, unused by its forward
  for (int l = 0; l < m.num_blocks(); ++l)
    if (c.attn_kind(m.block_stage(l)) == 'h') {
      std::string p = m.block_prefix(l);  // stages.{s}.blocks.{i}.
      std::smatch g;
      std::regex_match(p, g, std::regex(R"(stages\.(\d+)\.blocks\.(\d+)\.)"));
      out.emplace_back("block" + std::to_string(std::stoi(g[1]) + 1) + "." + g[2].str() + ".attn.qk_quant.projection_matrix",
                       Tensor::zeros({3, 4}));
    }
  return out;
}

// A random model with every tensor away from trivial values (LayerNorm weights, KSH buffers, shift exponents
// spread over [-8, 0], signs over {-1, 0, 1}); MoE routers of a fused stage's q and kv made equal.
void randomise(Pvt& m, uint64_t seed, const std::vector<bool>& fused) {
  Rng rng(seed);
  m.init_random(rng);
  for (size_t i = 0; i < m.params().size(); ++i) {
    const std::string& n = m.params().name(i);
    const Tensor& t = m.params().tensor(i);
    float* p = t.f32();
    const auto ends = [&](const char* s) { return n.size() >= std::strlen(s) && n.compare(n.size() - std::strlen(s), std::strlen(s), s) == 0; };
    for (int64_t j = 0; j < t.numel(); ++j) {
      if (ends(".p")) p[j] = rng.uniform(-8.0f, 0.5f);
      else if (ends(".s")) p[j] = rng.uniform(-1.5f, 1.5f);
      else if (t.ndim() == 1 || n.find("router") != std::string::npos || n.find("attn.dwconv") != std::string::npos)
        p[j] += 0.2f * rng.normal();
    }
  }
  for (size_t i = 0; i < m.buffers()->size(); ++i) {
    const std::string& n = m.buffers()->name(i);
    const Tensor& t = m.buffers()->tensor(i);
    for (int64_t j = 0; j < t.numel(); ++j)
      t.f32()[j] = n.find(".mu") != std::string::npos ? rng.uniform(0.0f, 0.5f) : 0.3f * rng.normal();
  }
  for (int l = 0; l < m.num_blocks(); ++l) {
    const std::string p = m.block_prefix(l) + "attn.";
    if (!fused[m.block_stage(l)] || !m.params().contains(p + "q.router.weight")) continue;
    m.params().get(p + "kv.router.weight").copy_from(m.params().get(p + "q.router.weight"));
    m.params().get(p + "kv.router.bias").copy_from(m.params().get(p + "q.router.bias"));
  }
}

// B0-like widths with small depths and MLPs (no preset matches: head counts of softmax stages are the
// release's 1, 2, 5, 8), the reference model's kinds, 8 hash bits and 5 anchors.
PvtConfig tiny_release_config() {
  PvtConfig c;
  c.name = "pvt_v2_custom";
  c.dims = {8, 16, 40, 64}, c.heads = {1, 2, 5, 8}, c.depths = {1, 2, 1, 1}, c.sr = {1, 1, 1, 1};
  c.mlp_ratios = {2, 2, 2, 2};
  c.num_classes = 11;
  c.attn = "hhhs", c.mlp = "mmmm", c.attn_linear = "mmmd";
  c.hash_bits = 8, c.anchors = 5;
  return c;
}

// Writes `m` in the release layout to `path`.
void write_release(Pvt& m, const std::vector<bool>& fused, const std::string& path) {
  save_safetensors(path, release_tensors(m, fused));
}

// Every engine tensor of `got` equals the one of `want` with the same name, bit for bit.
void expect_same_tensors(Pvt& got, Pvt& want) {
  for (ParamSet* ps : {&want.params(), want.buffers()}) {
    const ParamSet& gs = ps == &want.params() ? got.params() : *got.buffers();
    ASSERT_EQ(gs.size(), ps->size());
    for (size_t i = 0; i < ps->size(); ++i) {
      const std::string& n = ps->name(i);
      ASSERT_TRUE(gs.contains(n)) << n;
      ASSERT_EQ(gs.get(n).shape(), ps->tensor(i).shape()) << n;
      EXPECT_EQ(std::memcmp(gs.get(n).f32(), ps->tensor(i).f32(), ps->tensor(i).nbytes()), 0) << n;
    }
  }
}

void expect_same_config(const PvtConfig& a, const PvtConfig& b) {
  EXPECT_EQ(a.dims, b.dims);
  EXPECT_EQ(a.heads, b.heads);
  EXPECT_EQ(a.depths, b.depths);
  EXPECT_EQ(a.sr, b.sr);
  EXPECT_EQ(a.mlp_ratios, b.mlp_ratios);
  EXPECT_EQ(a.attn, b.attn);
  EXPECT_EQ(a.mlp, b.mlp);
  EXPECT_EQ(a.attn_linear, b.attn_linear);
  EXPECT_EQ(a.hash_bits, b.hash_bits);
  EXPECT_EQ(a.anchors, b.anchors);
  EXPECT_EQ(a.num_classes, b.num_classes);
  EXPECT_EQ(a.in_chans, b.in_chans);
  EXPECT_EQ(a.img_size, b.img_size);
  EXPECT_EQ(a.stem_patch, b.stem_patch);
  EXPECT_EQ(a.stem_stride, b.stem_stride);
}

std::vector<float> random_images(int B, const PvtConfig& c, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> x(size_t(B) * c.in_chans * c.img_size * c.img_size);
  for (float& v : x) v = rng.normal();
  return x;
}

struct RunResult {
  int code;
  std::string out;
};

RunResult run_cli(const std::string& args) {
  const std::string cmd = std::string(SAV_CLI) + " --threads 2 " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  EXPECT_NE(p, nullptr);
  std::string out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), out};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------

TEST(ReleaseReference, LoadsAsPvtV2B0InCompatibilityMode) {
  SKIP_WITHOUT_REFERENCE();
  Checkpoint ck = Checkpoint::open(reference_dir() + "/" + kRefModel);
  EXPECT_TRUE(is_release_pvt_layout(ck));
  const PvtConfig c = release_pvt_config(ck);
  EXPECT_EQ(c.name, "pvt_v2_b0");
  EXPECT_EQ(c.attn, "hhhs");
  EXPECT_EQ(c.mlp, "mmmm");
  EXPECT_EQ(c.attn_linear, "mmmd");
  EXPECT_EQ(c.heads, (std::vector<int>{1, 2, 5, 8}));
  EXPECT_EQ(c.hash_bits, 16);
  EXPECT_EQ(c.anchors, 25);
  const auto& run = reference_run();
  EXPECT_TRUE(run.model->reparam_options()->release_compat);
  EXPECT_EQ(run.model->arch(), "pvt_v2_b0");
}

// The release's float32 CPU logits (README: logits_gpu, from an H200, differ from them by 6e-6).
TEST(ReleaseReference, LogitsMatchTheRelease) {
  SKIP_WITHOUT_REFERENCE();
  const auto& run = reference_run();
  Checkpoint io = Checkpoint::open(reference_dir() + "/" + kRefIo);
  const Tensor ref = io.get("logits");
  ASSERT_EQ(int64_t(run.logits.size()), ref.numel());
  const double e = sav::test::norm_err(run.logits.data(), ref.f32(), ref.numel());
  std::cout << "[ release ] logits: max rel err " << e << " (vs CPU), "
            << sav::test::norm_err(run.logits.data(), io.get("logits_gpu").f32(), ref.numel()) << " (vs H200)\n";
  EXPECT_LT(e, 1e-4);
}

// Every intermediate the release recorded: patch_embed{s}, block{s}.{i}.attn, block{s}.{i}, norm{s}, each
// within 1e-4 relative (max abs error / max abs reference value of that tensor).
TEST(ReleaseReference, EveryIntermediateMatchesTheRelease) {
  SKIP_WITHOUT_REFERENCE();
  const auto& run = reference_run();
  Checkpoint io = Checkpoint::open(reference_dir() + "/" + kRefIo);
  std::map<std::string, double> group_max;  // patch_embed, attn, block, norm
  int compared = 0;
  for (const std::string& n : io.names()) {
    if (n == "input" || n == "logits" || n == "logits_gpu") continue;
    auto it = run.acts.find(n);
    ASSERT_NE(it, run.acts.end()) << "the engine reports no intermediate for the release's " << n;
    const Tensor ref = io.get(n);
    ASSERT_EQ(int64_t(it->second.size()), ref.numel()) << n << " " << shape_str(ref.shape());
    const double e = sav::test::norm_err(it->second.data(), ref.f32(), ref.numel());
    EXPECT_LT(e, 1e-4) << n;
    const std::string group = n.rfind("patch_embed", 0) == 0                             ? "patch_embed{s}"
                              : n.rfind("norm", 0) == 0                                  ? "norm{s}"
                              : n.size() > 5 && n.compare(n.size() - 5, 5, ".attn") == 0 ? "block{s}.{i}.attn"
                                                                                         : "block{s}.{i}";
    group_max[group] = std::max(group_max[group], e);
    ++compared;
  }
  EXPECT_EQ(compared, 4 + 4 + 8 + 8);  // B0: 4 stages, 8 blocks
  for (auto& [g, e] : group_max) std::cout << "[ release ] " << g << ": max rel err " << e << "\n";
}

// The engine's own checkpoint of the release model (convert = re-save) keeps the compatibility mode and the
// outputs.
TEST(ReleaseReference, ConvertedCheckpointReloadsWithTheSameLogits) {
  SKIP_WITHOUT_REFERENCE();
  const auto& run = reference_run();
  TempDir tmp;
  const std::string path = tmp / "engine.safetensors";
  save_model(*run.model, path);
  Checkpoint ck = Checkpoint::open(path);
  EXPECT_FALSE(is_release_pvt_layout(ck));
  EXPECT_EQ(ck.metadata().at("sav.model"), "pvt");
  EXPECT_EQ(ck.metadata().at("sav.reparam.release_compat"), "1");
  EXPECT_TRUE(ck.contains("stages.0.blocks.0.mlp.fc1.experts.1.p"));
  auto back = load_model(path);
  EXPECT_TRUE(back->reparam_options()->release_compat);
  EXPECT_EQ(back->describe(), run.model->describe());
  Checkpoint io = Checkpoint::open(reference_dir() + "/" + kRefIo);
  const Tensor x = io.get("input");
  const int B = static_cast<int>(x.dim(0));
  back->forward(x.f32(), B, false);
  EXPECT_EQ(sav::test::norm_err(back->logits(), run.logits.data(), int64_t(run.logits.size())), 0.0);
  EXPECT_LT(sav::test::norm_err(back->logits(), io.get("logits").f32(), io.get("logits").numel()), 1e-4);
  // the compatibility mode is inference-only
  EXPECT_HAS(error_of([&] { back->forward(x.f32(), 1, true); }), "inference-only");
}

// shiftaddvit infer / convert on the release checkpoint, with and without --arch and --format.
TEST(ReleaseReference, CommandLineInferAndConvert) {
  SKIP_WITHOUT_REFERENCE();
  const auto& run = reference_run();
  TempDir tmp;
  const std::string w = reference_dir() + "/" + kRefModel, io = reference_dir() + "/" + kRefIo;
  const std::string out1 = tmp / "out1.safetensors", out2 = tmp / "out2.safetensors", conv = tmp / "conv.safetensors",
                    out3 = tmp / "out3.safetensors";
  RunResult r = run_cli("infer --arch pvt_v2_b0 --weights " + w + " --input " + io + " --output " + out1);
  ASSERT_EQ(r.code, 0) << r.out;
  r = run_cli("infer --format shiftaddvit-release --weights " + w + " --input " + io + " --output " + out2);
  ASSERT_EQ(r.code, 0) << r.out;
  r = run_cli("convert --weights " + w + " --out " + conv);
  ASSERT_EQ(r.code, 0) << r.out;
  r = run_cli("infer --weights " + conv + " --input " + io + " --output " + out3);
  ASSERT_EQ(r.code, 0) << r.out;
  for (const std::string& o : {out1, out2, out3}) {
    Checkpoint ck = Checkpoint::open(o);
    EXPECT_EQ(sav::test::norm_err(ck.get("logits").f32(), run.logits.data(), int64_t(run.logits.size())), 0.0) << o;
  }
  // wrong arch, wrong format, a kind change: one-line errors
  r = run_cli("infer --arch pvt_v2_b1 --weights " + w + " --input " + io + " --output " + out1);
  EXPECT_NE(r.code, 0);
  EXPECT_HAS(r.out, "--arch pvt_v2_b1");
  r = run_cli("infer --format shiftaddvit-release --weights " + conv + " --input " + io + " --output " + out1);
  EXPECT_NE(r.code, 0);
  EXPECT_HAS(r.out, "not by the ShiftAddViT release");
  r = run_cli("convert --weights " + w + " --mlp dense --out " + conv);
  EXPECT_NE(r.code, 0);
  EXPECT_HAS(r.out, "--mlp dense is not possible");
}

// ---------------------------------------------------------------------------------------------------------

// The reference model's kinds: Hamming stages with MoE attention linears, a fused dense qkv in the last
// stage, MoE MLPs everywhere. Every tensor comes back bit for bit, and the model computes the same.
TEST(ReleaseLayout, TinyCheckpointRoundTrip) {
  const PvtConfig c = tiny_release_config();
  const std::vector<bool> fused = {false, false, false, true};
  ReparamOptions ro;
  ro.release_compat = true;
  Pvt src(c, ro);
  randomise(src, 7, fused);
  TempDir tmp;
  write_release(src, fused, tmp / "rel.safetensors");
  Checkpoint ck = Checkpoint::open(tmp / "rel.safetensors");
  EXPECT_TRUE(is_release_pvt_layout(ck));
  EXPECT_TRUE(ck.contains("block4.0.attn.qkv.weight"));
  EXPECT_TRUE(ck.contains("block2.1.mlp.fc2.experts.1.shift"));
  auto got = load_release_pvt(ck);
  expect_same_config(got->config(), c);
  EXPECT_EQ(got->config().name, "pvt_v2_custom");
  EXPECT_TRUE(got->reparam().release_compat);
  expect_same_tensors(*got, src);

  const std::vector<float> x = random_images(1, c, 3);
  src.forward(x.data(), 1, false);
  got->forward(x.data(), 1, false);
  EXPECT_EQ(sav::test::norm_err(got->logits(), src.logits(), c.num_classes), 0.0);
  // through load_model (detected) and the engine's own checkpoint
  const std::string engine = tmp / "engine.safetensors";
  save_model(*load_model(tmp / "rel.safetensors"), engine);
  auto back = load_model(engine);
  back->forward(x.data(), 1, false);
  EXPECT_EQ(sav::test::norm_err(back->logits(), src.logits(), c.num_classes), 0.0);
}

// The other layouts the loader reads: plain shift linears (.shift/.sign), a softmax stage with spatial
// reduction (attn.q, attn.kv, attn.sr, attn.norm), and an MoE fused qkv (one router for q and kv).
TEST(ReleaseLayout, ShiftLinearsSpatialReductionAndMoeQkvRoundTrip) {
  PvtConfig c = tiny_release_config();
  c.attn = "hhss", c.mlp = "ssss", c.attn_linear = "sddm", c.sr = {1, 1, 2, 1};
  const std::vector<bool> fused = {false, false, false, true};
  ReparamOptions ro;
  ro.release_compat = true;
  Pvt src(c, ro);
  randomise(src, 11, fused);
  TempDir tmp;
  write_release(src, fused, tmp / "rel.safetensors");
  Checkpoint ck = Checkpoint::open(tmp / "rel.safetensors");
  EXPECT_TRUE(ck.contains("block3.0.attn.sr.weight"));
  EXPECT_TRUE(ck.contains("block4.0.attn.qkv.gate.gate.weight"));
  EXPECT_TRUE(ck.contains("block1.0.mlp.fc1.shift"));
  auto got = load_release_pvt(ck);
  expect_same_config(got->config(), c);
  expect_same_tensors(*got, src);
  const std::vector<float> x = random_images(1, c, 5);
  src.forward(x.data(), 1, false);
  got->forward(x.data(), 1, false);
  EXPECT_EQ(sav::test::norm_err(got->logits(), src.logits(), c.num_classes), 0.0);
}

// A missing, mis-named, mis-shaped or extra tensor, a wrong --arch and an unknown geometry: errors that name
// the release's tensors (or the geometry), before anything is copied.
TEST(ReleaseLayout, BrokenCheckpointsGiveClearErrors) {
  const PvtConfig c = tiny_release_config();
  const std::vector<bool> fused = {false, false, false, true};
  Pvt src(c);
  randomise(src, 13, fused);
  const auto good = release_tensors(src, fused);
  TempDir tmp;
  // write `good` with `edit` applied, then return the error of loading it
  auto load_error = [&](const std::function<void(std::vector<std::pair<std::string, Tensor>>&)>& edit,
                        const std::string& hint = "") {
    auto ts = good;
    edit(ts);
    const std::string p = tmp / "broken.safetensors";
    save_safetensors(p, ts);
    return error_of([&] { load_release_pvt(Checkpoint::open(p), hint); });
  };
  auto drop = [](const std::string& prefix) {
    return [prefix](std::vector<std::pair<std::string, Tensor>>& ts) {
      std::erase_if(ts, [&](const auto& t) { return t.first.rfind(prefix, 0) == 0; });
    };
  };
  auto rename = [](const std::string& from, const std::string& to) {
    return [from, to](std::vector<std::pair<std::string, Tensor>>& ts) {
      for (auto& t : ts)
        if (t.first == from) t.first = to;
    };
  };

  EXPECT_EQ(load_error([](auto&) {}), "(no error)");
  std::string e = load_error(drop("block2.1.mlp.fc2.experts.1.sign"));
  EXPECT_HAS(e, "missing block2.1.mlp.fc2.experts.1.sign");
  EXPECT_HAS(e, "ShiftAddViT release layout");
  e = load_error(drop("block2.0."));  // a whole block inside a stage
  EXPECT_HAS(e, "missing block2.0.norm1.weight");
  e = load_error(rename("block1.0.attn.qk_quant.ksh.mvec", "block1.0.attn.qk_quant.ksh.mvec_"));
  EXPECT_HAS(e, "missing block1.0.attn.qk_quant.ksh.mvec");
  EXPECT_HAS(e, "unexpected block1.0.attn.qk_quant.ksh.mvec_");
  e = load_error([](auto& ts) {
    for (auto& t : ts)
      if (t.first == "block3.0.norm2.bias") t.second = Tensor::zeros({41});
  });
  EXPECT_HAS(e, "mis-shaped block3.0.norm2.bias (41,) (expected (40,))");
  e = load_error(drop("head."));
  EXPECT_HAS(e, "lacks head.weight");
  e = load_error(drop("block3.0.attn.qk_quant.ksh.A"));
  EXPECT_HAS(e, "lacks block3.0.attn.qk_quant.ksh.A");
  e = load_error([](auto&) {}, "pvt_v2_b0");
  EXPECT_HAS(e, "--arch pvt_v2_b0 has widths 32,64,160,256");
  e = load_error([](auto&) {}, "deit_tiny_patch16_224");
  EXPECT_HAS(e, "is not a PVT preset");
  e = load_error([](auto& ts) {  // MoE fc1 with a dense fc2 in the same stage
    std::erase_if(ts, [](const auto& t) { return t.first.rfind("block1.0.mlp.fc2.", 0) == 0; });
    ts.emplace_back("block1.0.mlp.fc2.weight", Tensor::zeros({8, 16}));
    ts.emplace_back("block1.0.mlp.fc2.bias", Tensor::zeros({8}));
  });
  EXPECT_HAS(e, "one MLP-linear kind per stage");

  // a file cut short: the safetensors reader names it (through load_model's detection too)
  {
    const std::string p = tmp / "cut.safetensors";
    save_safetensors(p, good);
    fs::resize_file(p, fs::file_size(p) / 2);
    EXPECT_HAS(error_of([&] { load_model(p); }), p);
  }

  // three stages, the last one softmax: no preset, no way to read its head count
  PvtConfig c3 = c;
  c3.dims = {8, 16, 40}, c3.heads = {1, 2, 5}, c3.depths = {1, 1, 1}, c3.sr = {1, 1, 1}, c3.mlp_ratios = {2, 2, 2};
  c3.attn = "hhs", c3.mlp = "mmm", c3.attn_linear = "mmd";
  Pvt m3(c3);
  randomise(m3, 17, {false, false, true});
  save_safetensors(tmp / "three.safetensors", release_tensors(m3, {false, false, true}));
  EXPECT_HAS(error_of([&] { load_release_pvt(Checkpoint::open(tmp / "three.safetensors")); }), "unknown geometry");

  // not the release's layout at all: a checkpoint with timm names
  save_safetensors(tmp / "timm.safetensors", {{"patch_embed.proj.weight", Tensor::zeros({8, 3, 7, 7})}});
  Checkpoint timm = Checkpoint::open(tmp / "timm.safetensors");
  EXPECT_FALSE(is_release_pvt_layout(timm));
  EXPECT_HAS(error_of([&] { load_release_pvt(timm); }), "is not in the ShiftAddViT release layout");
  EXPECT_HAS(error_of([&] { load_model(tmp / "timm.safetensors", "pvt_v2_b0", "shiftaddvit-release"); }),
             "is not in the ShiftAddViT release layout");
  EXPECT_HAS(error_of([&] { load_model(tmp / "timm.safetensors", "pvt_v2_b0", "onnx"); }), "unknown checkpoint format");
}
