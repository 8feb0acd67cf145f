// shiftaddvit: the command-line program. The only place in the project that exits.
//
//   shiftaddvit train --out runs/teacher                 # dense ViT on Fashion-MNIST
//   shiftaddvit eval --weights runs/teacher/model.safetensors
//   shiftaddvit infer --arch deit_tiny_patch16_224 --weights W.safetensors --input IN.safetensors --output OUT.safetensors
//   shiftaddvit bench --arch vit_fmnist --batch 1,64 --train
//   shiftaddvit infer --device cuda --weights official_pvt_v2_b0.safetensors --input IN --output OUT   # on the GPU
#include <CLI/CLI.hpp>
#include <array>
#include <tuple>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <utility>

#include "cli_checks.h"

#include "core/blas.h"
#include "core/cpu_features.h"
#include "core/error.h"
#include "core/parse.h"
#include "core/progress.h"
#include "io/dataset.h"
#include "io/safetensors.h"
#include "models/gpu_model.h"
#include "models/registry.h"
#include "models/pvt.h"
#include "models/vit.h"
#include "reparam/convert.h"
#include "reparam/routing.h"
#include "energy/energy.h"
#include "io/image.h"
#include "train/bench.h"
#include "train/trainer.h"

namespace {

using namespace sav;

const char* kFmnistDir = "/usr/share/datasets/fashion-mnist";

struct DataArgs {
  std::string data = kFmnistDir;
  std::string format = "auto";  // fmnist | folder | auto
};

void add_data_flags(CLI::App* app, DataArgs& d) {
  app->add_option("--data", d.data,
                  "Data set folder: Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...), or an ImageNet-style "
                  "folder with train/ and val/ subfolders of class folders of JPEG/PNG images")
      ->capture_default_str();
  app->add_option("--data-format", d.format, "fmnist, folder, or auto (look at the files)")
      ->check(CLI::IsMember({"auto", "fmnist", "folder"}))
      ->capture_default_str();
}

bool is_idx_folder(const std::string& dir) {
  std::FILE* f = std::fopen((dir + "/t10k-labels-idx1-ubyte.gz").c_str(), "rb");
  if (!f) f = std::fopen((dir + "/t10k-labels-idx1-ubyte").c_str(), "rb");
  if (f) std::fclose(f);
  return f != nullptr;
}

Dataset load_split(const DataArgs& d, bool train, int img_size, int channels) {
  std::string fmt = d.format;
  if (fmt == "auto") fmt = is_idx_folder(d.data) ? "fmnist" : "folder";
  if (fmt == "fmnist") return load_fashion_mnist(d.data, train);
  return load_image_folder(d.data + (train ? "/train" : "/val"), img_size, channels);
}

Normalize normalize_for(const DataArgs& d, int channels) {
  return channels == 1 ? Normalize::fashion_mnist() : Normalize::imagenet();
}

Vit& as_vit(ImageClassifier& m) {
  auto* v = dynamic_cast<Vit*>(&m);
  SAV_CHECK(v != nullptr, "model " << m.arch() << " is not a ViT");
  return *v;
}

struct ModelArgs {
  std::string arch;
  std::string weights;
  int img_size = 0, patch = 0, in_chans = 0, classes = 0, dim = 0, depth = 0, heads = 0, mlp_hidden = 0;
  std::string shift_kernel = "float";
  std::string format = "auto";      // checkpoint names: auto | timm | shiftaddvit-release
  CLI::Option* arch_opt = nullptr;  // to tell a default --arch from one the user gave
};

void add_model_flags(CLI::App* app, ModelArgs& m, bool weights_required, const std::string& default_arch) {
  m.arch = default_arch;
  std::string archs;
  for (auto& a : known_archs()) archs += (archs.empty() ? "" : ", ") + a;
  auto* a = m.arch_opt = app->add_option("--arch", m.arch, "Model preset: " + archs +
                                                  (default_arch.empty() ? " (read from the checkpoint if omitted)" : ""));
  if (!default_arch.empty()) a->capture_default_str();
  auto* w = app->add_option("--weights", m.weights,
                            "Checkpoint: a .safetensors file (timm names), a model.safetensors.index.json of shards, "
                            "or a folder holding either");
  if (weights_required) w->required();
  app->add_option("--shift-kernel", m.shift_kernel, "Inference path of shift layers: float (decode the 5-bit weights, "
                                                    "BLAS) or int (multiplier-free MatShift on Q16.16 activations)")
      ->check(CLI::IsMember({"float", "int"}))
      ->capture_default_str();
}

void add_format_flag(CLI::App* app, ModelArgs& m) {
  app->add_option("--format", m.format,
                  "Checkpoint names: auto (engine metadata, else the ShiftAddViT release's names when present, else "
                  "timm), timm, or shiftaddvit-release (the public ShiftAddViT PVTv2 release, run in its "
                  "compatibility mode)")
      ->check(CLI::IsMember({"auto", "timm", "shiftaddvit-release"}))
      ->capture_default_str();
}

void add_shape_flags(CLI::App* app, ModelArgs& m) {
  app->add_option("--img-size", m.img_size, "Override the preset's image side (pixels)");
  app->add_option("--patch", m.patch, "Override the preset's patch side");
  app->add_option("--in-chans", m.in_chans, "Override the preset's image channels");
  app->add_option("--classes", m.classes, "Override the preset's class count");
  app->add_option("--dim", m.dim, "Override the preset's width");
  app->add_option("--depth", m.depth, "Override the preset's block count");
  app->add_option("--heads", m.heads, "Override the preset's head count");
  app->add_option("--mlp-hidden", m.mlp_hidden, "Override the preset's MLP hidden width");
}

std::unique_ptr<ImageClassifier> build_model(const ModelArgs& m) {
  if (!m.weights.empty()) {
    // a checkpoint written by the engine names its arch; a subcommand's default --arch must not contradict it
    const bool given = m.arch_opt == nullptr || m.arch_opt->count() > 0;
    auto model = load_model(m.weights, given ? m.arch : "", m.format);
    if (ReparamOptions* ro = model->reparam_options()) ro->int_kernel = m.shift_kernel == "int";
    return model;
  }
  return create_model(m.arch, {{"img_size", m.img_size},
                               {"patch", m.patch},
                               {"in_chans", m.in_chans},
                               {"num_classes", m.classes},
                               {"dim", m.dim},
                               {"depth", m.depth},
                               {"heads", m.heads},
                               {"mlp_hidden", m.mlp_hidden}});
}

void print_env() {
  std::cerr << "shiftaddvit: " << num_threads() << " threads, cpu " << cpu_features_str() << "\n";
}

int cmd_eval(const ModelArgs& m, const DataArgs& d, int batch, int64_t limit) {
  auto model = build_model(m);
  Dataset test = load_split(d, false, model->img_size(), model->in_chans());
  EvalResult r = evaluate(*model, test, normalize_for(d, model->in_chans()), batch, limit, true);
  Table t({"model", "images", "top-1 %", "top-5 %", "loss", "img/s"});
  t.add({model->arch(), std::to_string(r.n), fmt(100 * r.top1, 2), fmt(100 * r.top5, 2), fmt(r.loss, 4),
         fmt(r.images_per_s, 0)});
  t.print(std::cout);
  return 0;
}

#ifndef SAV_HAVE_CUDA
[[noreturn]] void throw_no_cuda_backend() {
  SAV_THROW("--device cuda: this build has no CUDA backend (configure where nvcc is installed, -DSAV_CUDA=ON)");
}
#endif

// The model on the GPU for --device cuda (throws in a build without the CUDA backend).
std::unique_ptr<GpuClassifier> gpu_model_for(ImageClassifier& m, bool tf32) {
#ifdef SAV_HAVE_CUDA
  return make_gpu_model(m, tf32);
#else
  (void)m, (void)tf32;
  throw_no_cuda_backend();
#endif
}

struct DeviceArgs {
  std::string device = "cpu";
  bool tf32 = false;
  bool bf16 = false;  // training only
  std::string train_precision() const { return bf16 ? "bf16" : tf32 ? "tf32" : "f32"; }
};

// The trainable GPU copy of a model for train / finetune --device cuda; nullptr for --device cpu.
std::unique_ptr<ImageClassifier> gpu_trainer_for(ImageClassifier& m, const DeviceArgs& dev) {
  if (dev.device != "cuda") return nullptr;
#ifdef SAV_HAVE_CUDA
  return make_gpu_trainer(m, dev.train_precision());
#else
  (void)m;
  throw_no_cuda_backend();
#endif
}

void add_train_device_flags(CLI::App* app, DeviceArgs& d) {
  app->add_option("--device", d.device, "Where to train: cpu, or cuda (forward, backward and AdamW on the GPU; "
                                        "ViT/DeiT and PVTv2 models)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  auto* tf = app->add_flag("--tf32", d.tf32, "With --device cuda: products on TF32 tensor cores (f32 master weights "
                                            "and activations) instead of IEEE f32");
  app->add_flag("--bf16", d.bf16, "With --device cuda: mixed precision, products in bf16 on tensor cores with f32 "
                                  "accumulation (f32 master weights, activations and AdamW state; attention "
                                  "products in TF32)")
      ->excludes(tf);
}

int cmd_train(const ModelArgs& m, const DataArgs& d, const DeviceArgs& dev, TrainOptions opt) {
  print_env();
  auto model = build_model(m);
  if (m.weights.empty()) {
    Rng rng(opt.seed);
    model->init_random(rng);
  }
  Dataset train = load_split(d, true, model->img_size(), model->in_chans());
  Dataset test = load_split(d, false, model->img_size(), model->in_chans());
  opt.normalize = normalize_for(d, model->in_chans());
  std::cerr << "model " << model->arch() << " (" << model->params().numel() << " parameters); data " << train.source
            << ": " << train.n << " train / " << test.n << " test images\n";
  std::unique_ptr<ImageClassifier> gpu = gpu_trainer_for(*model, dev);
  if (gpu) std::cerr << "training on the GPU (" << dev.train_precision() << " products)\n";
  Trainer trainer(gpu ? *gpu : *model, train, test, opt);
  TrainSummary s = trainer.run();
  Table t({"epoch", "train loss", "train acc %", "test top-1 %", "test loss", "img/s", "time"});
  for (auto& e : s.epochs)
    t.add({std::to_string(e.epoch), fmt(e.train_loss, 4), fmt(100 * e.train_acc, 2), fmt(100 * e.test_top1, 2),
           fmt(e.test_loss, 4), fmt(e.images_per_s, 0), fmt_duration(e.seconds)});
  std::cout << "\n";
  t.print(std::cout);
  if (!s.finished) {
    std::cout << "stopped after " << s.steps << " steps (--max-steps); resume with --resume\n";
    return 0;
  }
  std::cout << "final: test top-1 " << fmt(100 * s.final_eval.top1, 2) << "% on " << s.final_eval.n << " images, "
            << s.steps << " steps in " << fmt_duration(s.seconds);
  if (!opt.out_dir.empty()) std::cout << "; model written to " << opt.out_dir << "/model.safetensors";
  std::cout << "\n";
  return 0;
}


void add_device_flags(CLI::App* app, DeviceArgs& d) {
  app->add_option("--device", d.device, "Where to run: cpu, or cuda (the GPU backend; ViTs in bf16, PVTv2 in f32)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app->add_flag("--tf32", d.tf32, "With --device cuda: PVTv2 products (and with --train all training products) on "
                                  "TF32 tensor cores (faster; about 1e-3 relative) instead of IEEE f32");
}

// bench --train --device cuda: the training precision of the timed step
void add_bench_train_precision_flag(CLI::App* app, DeviceArgs& d) {
  app->add_flag("--bf16", d.bf16, "With --device cuda --train: time the mixed-precision (bf16 products) step");
}

int cmd_infer(const ModelArgs& m, const DeviceArgs& dev, const std::string& input, const std::string& output,
              int batch) {
  auto model = build_model(m);
  std::unique_ptr<GpuClassifier> gpu;
  if (dev.device == "cuda") gpu = gpu_model_for(*model, dev.tf32);
  Checkpoint in = Checkpoint::open(input);
  SAV_CHECK(in.contains("input"), "input file " << input << " has no tensor named 'input'");
  Tensor x = in.get("input");
  const int S = model->img_size(), Cin = model->in_chans(), V = model->num_classes();
  SAV_CHECK(x.ndim() == 4 && x.dim(1) == Cin && x.dim(2) == S && x.dim(3) == S,
            "input tensor has shape " << shape_str(x.shape()) << " but " << model->arch() << " expects (B, " << Cin
                                      << ", " << S << ", " << S << ")");
  const int64_t B = x.dim(0);
  Tensor logits = Tensor::empty({B, V});
  for (int64_t s = 0; s < B; s += batch) {
    const int b = static_cast<int>(std::min<int64_t>(batch, B - s));
    if (gpu) {
      gpu->forward_host(x.f32() + s * Cin * S * S, logits.f32() + s * V, b);
      continue;
    }
    model->forward(x.f32() + s * Cin * S * S, b, false);
    std::copy(model->logits(), model->logits() + int64_t(b) * V, logits.f32() + s * V);
  }
  save_safetensors(output, {{"logits", logits}}, {{"sav.arch", model->arch()}});
  std::cerr << "wrote logits " << shape_str(logits.shape()) << " to " << output << "\n";
  return 0;
}

int cmd_bench(const ModelArgs& m, const DeviceArgs& dev, const std::string& batches, int iters, int warmup,
              bool train) {
  print_env();
  std::vector<std::string> archs;
  std::stringstream ss(m.arch);
  std::string a;
  while (std::getline(ss, a, ',')) archs.push_back(a);
  const auto bs = parse_int_list(batches, "--batch");
  Table t({"model", "batch", "forward ms", "forward img/s", "train step ms", "train img/s"});
  for (const auto& arch : archs) {
    ModelArgs mm = m;
    mm.arch = arch;
    auto model = build_model(mm);
    if (m.weights.empty()) {
      Rng rng(0);
      model->init_random(rng);
    }
    std::unique_ptr<GpuClassifier> gpu;
    std::unique_ptr<ImageClassifier> gpu_train;
    if (dev.device == "cuda" && train) gpu_train = gpu_trainer_for(*model, dev);  // f32 forward + train step
    else if (dev.device == "cuda") gpu = gpu_model_for(*model, dev.tf32);
    for (int b : bs) {
      if (gpu_train) {  // host images in, host logits out, like the Trainer's own loop
        BenchResult r = bench_model(*gpu_train, b, iters, warmup, true);
        t.add({model->arch() + " (cuda train " + dev.train_precision() + ")", std::to_string(b),
               fmt(r.forward_ms, 3), fmt(1000.0 * b / r.forward_ms, 1), fmt(r.train_step_ms, 3),
               fmt(1000.0 * b / r.train_step_ms, 1)});
        continue;
      }
      if (gpu) {  // graph replays on the GPU; warm-up inside
        const double ms = gpu->median_ms(b, iters);
        t.add({model->arch() + " (cuda " + gpu->precision() + ")", std::to_string(b), fmt(ms, 3),
               fmt(1000.0 * b / ms, 1), "-", "-"});
        continue;
      }
      BenchResult r = bench_model(*model, b, iters, warmup, train);
      t.add({model->arch(), std::to_string(b), fmt(r.forward_ms, 3), fmt(1000.0 * b / r.forward_ms, 1),
             train ? fmt(r.train_step_ms, 3) : "-", train ? fmt(1000.0 * b / r.train_step_ms, 1) : "-"});
      std::cerr << "  " << arch << " batch " << b << " done\n";
    }
  }
  t.print(std::cout);
  return 0;
}

// First n images of the training split, normalised, for KSH fitting.
std::vector<float> calibration_images(const DataArgs& d, const ImageClassifier& m, int n) {
  Dataset train = load_split(d, true, m.img_size(), m.in_chans());
  n = std::min(n, train.n);
  std::vector<float> x(size_t(n) * train.image_size());
  std::vector<int> idx(n), labels(n);
  for (int i = 0; i < n; ++i) idx[i] = i;
  make_batch(train, idx.data(), n, normalize_for(d, m.in_chans()), Augment{}, nullptr, x.data(), labels.data());
  return x;
}

struct ReparamArgs {
  ConvertOptions conv;
  std::string gate = "st";
  std::string alpha = "1,1";
  int calib = 64;
};

void add_reparam_flags(CLI::App* app, ReparamArgs& r) {
  app->add_option("--attn", r.conv.attn, "Attention per block: softmax, hamming, or one letter per block (s/h)")
      ->capture_default_str();
  app->add_option("--mlp", r.conv.mlp, "MLP linears (fc1, fc2): dense, shift, moe, or one letter per block (d/s/m)")
      ->capture_default_str();
  app->add_option("--attn-linear", r.conv.attn_linear, "Attention linears (qkv or to_qk/to_v, proj): dense, shift, moe, "
                                                       "or one letter per block")
      ->capture_default_str();
  app->add_option("--hash-bits", r.conv.hash_bits, "KSH hash bits b (1..64)")->capture_default_str();
  app->add_option("--anchors", r.conv.anchors, "KSH anchors m")->capture_default_str();
  app->add_option("--calib", r.calib, "Training images used to fit the KSH hash")->capture_default_str();
  app->add_option("--gate", r.gate, "MoE gate: st (p/stop_grad(p): keeps the dense model's outputs at conversion) "
                                    "or prob (outputs scaled by the router probability)")
      ->check(CLI::IsMember({"st", "prob"}))
      ->capture_default_str();
  app->add_option("--alpha", r.alpha, "Latency factors of the mult and shift experts for the load-balancing loss "
                                      "(as written by `shiftaddvit profile`)")
      ->capture_default_str();
  app->add_option("--lb-coef", r.conv.reparam.lb_coef, "Coefficient of the latency-aware load-balancing loss")
      ->capture_default_str()
      ->check(cli_float(FloatRule::non_negative));
  app->add_option("--router-noise", r.conv.reparam.noise_std, "Std of the router's gate noise while training")
      ->capture_default_str()
      ->check(cli_float(FloatRule::non_negative));
}

ReparamOptions reparam_options(const ReparamArgs& r) {
  ReparamOptions o = r.conv.reparam;
  o.gate = r.gate == "prob" ? cpu::moe_gate_prob : cpu::moe_gate_straight_through;
  const std::array<float, 2> a = parse_alpha(r.alpha);
  o.alpha[0] = a[0], o.alpha[1] = a[1];
  return o;
}

std::unique_ptr<ImageClassifier> convert_model(ImageClassifier& dense, const ReparamArgs& r, const DataArgs& d,
                                               uint64_t seed) {
  ConvertOptions c = r.conv;
  c.reparam = reparam_options(r);
  c.seed = seed;
  std::vector<float> calib;
  if (c.attn != "softmax") calib = calibration_images(d, dense, r.calib);
  const int n = static_cast<int>(calib.size() /
                                 std::max<size_t>(1, size_t(dense.in_chans()) * dense.img_size() * dense.img_size()));
  if (auto* pvt = dynamic_cast<Pvt*>(&dense)) return convert_pvt(*pvt, c, calib.data(), n);
  return convert_vit(as_vit(dense), c, calib.data(), n);
}

// A checkpoint of the ShiftAddViT release (release compatibility mode) is re-saved with the engine's names and
// metadata, its layer kinds unchanged: that mode is inference-only, so there is nothing to convert or fit.
int resave_release(ImageClassifier& model, const CLI::App& app, const ReparamArgs& r, const std::string& out) {
  const LayerKinds k = model.kinds();
  const int S = static_cast<int>(k.attn.size());
  for (auto [flag, spec, have] : {std::tuple{"--attn", r.conv.attn, k.attn}, std::tuple{"--mlp", r.conv.mlp, k.mlp},
                                  std::tuple{"--attn-linear", r.conv.attn_linear, k.attn_linear}}) {
    if (app.get_option(flag)->count() == 0) continue;
    std::string want = expand_kinds(spec, S, flag);
    if (std::string(flag) == "--attn")
      for (char& c : want) c = c == 'h' ? 'h' : 's';
    SAV_CHECK(want == have, "the checkpoint is a ShiftAddViT release model (" << flag << " " << have
                                << "): convert re-saves it with its layer kinds unchanged (its compatibility mode is "
                                << "inference-only), so " << flag << " " << spec << " is not possible");
  }
  save_model(model, out);
  std::cout << "re-saved " << model.describe() << " (ShiftAddViT release, compatibility mode) with the engine's "
            << "names\nwrote " << out << "\n";
  return 0;
}

int cmd_convert(const ModelArgs& m, const DataArgs& d, const ReparamArgs& r, const std::string& out,
                const CLI::App& app) {
  auto dense = build_model(m);
  if (const ReparamOptions* ro = dense->reparam_options(); ro && ro->release_compat)
    return resave_release(*dense, app, r, out);
  auto sa = convert_model(*dense, r, d, 0);
  save_model(*sa, out);
  std::cout << "converted " << dense->arch() << " -> " << sa->describe() << "\nwrote " << out << "\n";
  return 0;
}

// Staged fine-tuning: stage 1 converts the attention only, stage 2 also the linears (METHOD.md section 4).
int cmd_finetune(const ModelArgs& m, const DataArgs& d, const ReparamArgs& r, const DeviceArgs& dev,
                 TrainOptions opt, int epochs1, int epochs2, bool distill) {
  print_env();
  SAV_CHECK(!opt.out_dir.empty(), "finetune needs --out");
  auto teacher = build_model(m);
  Dataset train = load_split(d, true, teacher->img_size(), teacher->in_chans());
  Dataset test = load_split(d, false, teacher->img_size(), teacher->in_chans());
  opt.normalize = normalize_for(d, teacher->in_chans());
  // --device cuda: the teacher and each stage's student run on the GPU (the host models keep the names,
  // metadata and, after each stage, the trained parameters).
  std::unique_ptr<ImageClassifier> teacher_gpu = gpu_trainer_for(*teacher, dev);
  ImageClassifier& teacher_run = teacher_gpu ? *teacher_gpu : *teacher;
  EvalResult t_eval = evaluate(teacher_run, test, opt.normalize, opt.eval_batch, opt.eval_limit);
  std::cerr << "teacher " << teacher->arch() << ": test top-1 " << fmt(100 * t_eval.top1, 2) << "%\n";
  if (distill) opt.teacher = &teacher_run;
  Table t({"stage", "attention", "mlp linears", "attn linears", "epochs", "test top-1 %", "teacher top-1 %", "delta"});
  std::unique_ptr<ImageClassifier> cur;
  struct Stage { std::string name; ReparamArgs args; int epochs; };
  ReparamArgs s1 = r;
  s1.conv.mlp = "dense";
  s1.conv.attn_linear = "dense";
  std::vector<Stage> stages;
  if (epochs1 > 0 && r.conv.attn != "softmax") stages.push_back({"stage1", s1, epochs1});
  stages.push_back({"stage2", r, epochs2});
  ImageClassifier* src = teacher.get();
  for (auto& st : stages) {
    const std::string dir = opt.out_dir + "/" + st.name;
    std::unique_ptr<ImageClassifier> next;
    std::optional<EvalResult> trained;  // the Trainer's final evaluation, when this run trained the stage
    std::FILE* done = std::fopen((dir + "/model.safetensors").c_str(), "rb");
    if (done && opt.resume) {
      std::fclose(done);
      next = load_model(dir + "/model.safetensors");
      std::cerr << st.name << ": already finished, loaded " << dir << "/model.safetensors\n";
    } else {
      if (done) std::fclose(done);
      next = convert_model(*src, st.args, d, opt.seed);
      std::cerr << st.name << ": " << next->describe() << "\n";
      TrainOptions o = opt;
      o.out_dir = dir;
      o.epochs = st.epochs;
      std::unique_ptr<ImageClassifier> gpu = gpu_trainer_for(*next, dev);
      Trainer trainer(gpu ? *gpu : *next, train, test, o);
      TrainSummary s = trainer.run();
      if (!s.finished) return 0;
      trained = s.final_eval;
    }
    EvalResult e;
    if (trained) {
      e = *trained;
    } else {
      std::unique_ptr<ImageClassifier> gpu = gpu_trainer_for(*next, dev);
      e = evaluate(gpu ? *gpu : *next, test, opt.normalize, opt.eval_batch, opt.eval_limit);
    }
    const LayerKinds nc = next->kinds();
    t.add({st.name, nc.attn, nc.mlp, nc.attn_linear, std::to_string(st.epochs), fmt(100 * e.top1, 2),
           fmt(100 * t_eval.top1, 2), fmt(100 * (e.top1 - t_eval.top1), 2)});
    cur = std::move(next);
    src = cur.get();
    // keep the previous stage alive only as long as it is the source
  }
  std::cout << "\n";
  t.print(std::cout);
  save_model(*cur, opt.out_dir + "/model.safetensors");
  std::cout << "final model: " << opt.out_dir << "/model.safetensors\n";
  return 0;
}

// The dense-vs-converted table (and CSV/JSON files on request) of cmd_energy.
int print_energy(const std::vector<LayerDesc>& dense, const std::vector<LayerDesc>& conv, const std::string& csv,
                 const std::string& json) {
  EnergyReport rd = energy_report(dense), rc = energy_report(conv);
  print_energy_table(std::cout, rd, rc);
  auto write = [](const std::string& path, const std::string& text) {
    std::ofstream f(path);
    SAV_CHECK(f.good(), "cannot write " << path);
    f << text;
  };
  if (!csv.empty()) write(csv, "# dense\n" + energy_csv(rd) + "# converted\n" + energy_csv(rc));
  if (!json.empty()) write(json, "{\"dense\": " + energy_json(rd) + ", \"converted\": " + energy_json(rc) + "}\n");
  return 0;
}

// PVTv2: per-stage kinds from the model, or (geometry only) the flags with the paper's rule: Hamming
// attention in every stage but the last. MoE shares: `share` (routing of PVT models is not measured here).
int energy_pvt(ImageClassifier* model, const std::string& arch, const std::string& attn, const std::string& mlp,
               const std::string& attn_linear, double share, const std::string& csv, const std::string& json) {
  const PvtConfig cfg = model ? dynamic_cast<Pvt&>(*model).config() : pvt_preset(arch);
  PvtGeometry g{cfg.img_size, cfg.in_chans, cfg.num_classes, cfg.stem_patch, cfg.stem_stride, cfg.dims, cfg.heads,
                cfg.depths, cfg.sr, cfg.mlp_ratios};
  const int S = cfg.stages();
  auto kind = [](char k) {
    return k == 'd' ? LayerKind::linear_dense : k == 's' ? LayerKind::linear_shift : LayerKind::linear_moe;
  };
  std::string ak, mk, lk;
  if (model && !cfg.is_dense()) {
    ak = cfg.attn.empty() ? std::string(S, 's') : cfg.attn;
    mk = cfg.mlp.empty() ? std::string(S, 'd') : cfg.mlp;
    lk = cfg.attn_linear.empty() ? std::string(S, 'd') : cfg.attn_linear;
  } else {
    ak = attn == "hamming" ? std::string(S - 1, 'h') + "s" : expand_kinds(attn, S, "--attn");
    mk = expand_kinds(mlp, S, "--mlp");
    lk = expand_kinds(attn_linear, S, "--attn-linear");
  }
  std::vector<BlockChoice> stages(S);
  for (int s = 0; s < S; ++s) {
    stages[s].attn = ak[s] == 'h' ? LayerKind::attn_hamming : LayerKind::attn_softmax;
    stages[s].qkv.kind = stages[s].proj.kind = kind(lk[s]);
    stages[s].fc1.kind = stages[s].fc2.kind = kind(mk[s]);
    for (LinearChoice* c : {&stages[s].qkv, &stages[s].proj, &stages[s].fc1, &stages[s].fc2}) c->shift_share = share;
    stages[s].hash_bits = cfg.hash_bits, stages[s].anchors = cfg.anchors;
  }
  auto dense = pvt_dense_layers(g);
  auto conv = pvt_convert_layers(dense, stages);
  std::cout << "energy per image, 45 nm unit energies (METHOD.md section 5): dense vs " << cfg.name
            << " with attention " << ak << ", MLP linears " << mk << ", attention linears " << lk
            << " (per stage), MoE shift share " << fmt(share, 2) << " (assumed)\n";
  return print_energy(dense, conv, csv, json);
}

int cmd_energy(const ModelArgs& m, const DataArgs& d, const std::string& attn, const std::string& mlp,
               const std::string& attn_linear, double share, int64_t limit, const std::string& csv,
               const std::string& json) {
  const bool pvt = m.weights.empty() ? is_pvt_arch(m.arch) : false;
  std::unique_ptr<ImageClassifier> model;
  if (!m.weights.empty()) model = build_model(m);
  if (pvt || (model && dynamic_cast<Pvt*>(model.get()))) return energy_pvt(model.get(), m.arch, attn, mlp, attn_linear,
                                                                           share, csv, json);
  VitConfig cfg;
  std::vector<LayerShares> measured;
  if (!m.weights.empty()) {
    cfg = as_vit(*model).config();
    if (!as_vit(*model).moe_layers().empty() && limit >= 0) {
      Dataset test = load_split(d, false, cfg.img_size, cfg.in_chans);
      measured = routing_shares(as_vit(*model), test, normalize_for(d, cfg.in_chans), limit);
    }
  } else {
    cfg = vit_preset(m.arch);
  }
  auto dense = vit_dense_layers(cfg.img_size, cfg.patch, cfg.in_chans, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_hidden,
                                cfg.num_classes);
  std::vector<LayerDesc> conv;
  std::string what;
  if (model && !cfg.is_dense()) {
    std::vector<BlockChoice> blocks(cfg.depth);
    auto lin = [&](char k, const std::string& name) {
      LinearChoice c;
      c.kind = k == 'd' ? LayerKind::linear_dense : k == 's' ? LayerKind::linear_shift : LayerKind::linear_moe;
      c.shift_share = share;
      for (auto& ms : measured)
        if (ms.name == name) c.shift_share = ms.shift_share();
      return c;
    };
    for (int l = 0; l < cfg.depth; ++l) {
      const std::string p = "blocks." + std::to_string(l) + ".";
      blocks[l].attn = cfg.attn_kind(l) == 'h' ? LayerKind::attn_hamming : LayerKind::attn_softmax;
      blocks[l].qkv = lin(cfg.attn_linear_kind(l), p + (cfg.attn_kind(l) == 'h' ? "attn.to_qk" : "attn.qkv"));
      blocks[l].proj = lin(cfg.attn_linear_kind(l), p + "attn.proj");
      blocks[l].fc1 = lin(cfg.mlp_kind(l), p + "mlp.fc1");
      blocks[l].fc2 = lin(cfg.mlp_kind(l), p + "mlp.fc2");
      blocks[l].hash_bits = cfg.hash_bits;
      blocks[l].anchors = cfg.anchors;
    }
    conv = vit_convert_layers(dense, blocks);
    what = cfg.describe() + (measured.empty() ? ", MoE shift share " + fmt(share, 2) + " (assumed)"
                                              : ", MoE shift shares measured on " + d.data);
  } else {
    conv = vit_converted_layers(dense, attn, mlp, share, attn_linear);
    what = cfg.name + " geometry: attention " + attn + ", MLP " + mlp + ", attention linears " + attn_linear +
           (mlp == "moe" || attn_linear == "moe" ? ", shift share " + fmt(share, 2) : "");
  }
  std::cout << "energy per image, 45 nm unit energies (METHOD.md section 5): dense vs " << what << "\n";
  for (auto& ms : measured)
    std::cout << "  " << ms.name << ": " << fmt(100 * ms.shift_share(), 1) << "% of tokens to the shift expert\n";
  return print_energy(dense, conv, csv, json);
}

int cmd_profile(const ModelArgs& m, int tokens, bool int_kernel, const std::string& out) {
  print_env();
  VitConfig cfg = m.weights.empty() ? vit_preset(m.arch) : as_vit(*build_model(m)).config();
  Table t({"layer", "K", "F", "tokens", "mult us/token", "shift us/token", "shift kernel", "alpha mult", "alpha shift"});
  double am = 0, ash = 0;
  for (auto [K, F, name] : {std::tuple{cfg.dim, cfg.mlp_hidden, "fc1"}, std::tuple{cfg.mlp_hidden, cfg.dim, "fc2"}}) {
    ExpertProfile p = profile_experts(K, F, tokens, int_kernel);
    t.add({name, std::to_string(K), std::to_string(F), std::to_string(tokens), fmt(p.mult_us_per_token, 4),
           fmt(p.shift_us_per_token, 4), p.shift_isa, fmt(p.alpha_mult(), 3), fmt(p.alpha_shift(), 3)});
    am += p.mult_us_per_token, ash += p.shift_us_per_token;
  }
  const double lo = std::min(am, ash);
  t.print(std::cout);
  std::ostringstream alpha;
  alpha << fmt(am / lo, 3) << "," << fmt(ash / lo, 3);
  std::cout << "latency factors for the load-balancing loss on this machine: --alpha " << alpha.str() << "\n";
  if (!out.empty()) {
    std::ofstream f(out);
    SAV_CHECK(f.good(), "cannot write " << out);
    f << "{\"arch\": \"" << cfg.name << "\", \"tokens\": " << tokens << ", \"int_kernel\": "
      << (int_kernel ? "true" : "false") << ", \"mult_us\": " << am << ", \"shift_us\": " << ash
      << ", \"alpha\": [" << alpha.str() << "]}\n";
    std::cout << "wrote " << out << "\n";
  }
  return 0;
}

int cmd_route(const ModelArgs& m, const DataArgs& d, const std::string& image_path, int index,
              const std::string& out) {
  auto model = build_model(m);
  Vit& vit = as_vit(*model);
  const VitConfig& c = vit.config();
  Image img;
  if (!image_path.empty()) {
    img = load_image(image_path, c.in_chans);
    img = center_crop(resize_shorter_side(img, c.img_size), c.img_size, c.img_size);
  } else {
    Dataset test = load_split(d, false, c.img_size, c.in_chans);
    SAV_CHECK(index >= 0 && index < test.n, "--index " << index << " outside the test set (" << test.n << " images)");
    img = dataset_image(test, index);
    std::cout << "test image " << index << " (" << test.class_names[test.labels[index]] << ")\n";
  }
  Dataset one;
  one.n = 1, one.channels = c.in_chans, one.height = c.img_size, one.width = c.img_size, one.num_classes = 1;
  one.pixels = img.data;
  one.labels = {0};
  std::vector<float> x(one.image_size());
  int label = 0, idx = 0;
  make_batch(one, &idx, 1, normalize_for(d, c.in_chans), Augment{}, nullptr, x.data(), &label);
  auto shares = route_picture(vit, x.data(), img.data.data(), out);
  Table t({"MoE layer", "mult tokens", "shift tokens", "shift share %"});
  for (auto& s : shares)
    t.add({s.name, std::to_string(s.tokens[0]), std::to_string(s.tokens[1]), fmt(100 * s.shift_share(), 1)});
  t.print(std::cout);
  std::cout << "wrote " << out << " (blue: mult expert, orange: shift expert; one panel per MoE layer)\n";
  return 0;
}

}  // namespace

// The optimisation, augmentation and data-limit flags that train and finetune share.
void add_optim_flags(CLI::App* app, TrainOptions& o, const char* seed_help) {
  app->add_option("--batch", o.batch, "Images per step")->capture_default_str()->check(cli_positive_int());
  app->add_option("--lr", o.lr, "Peak learning rate (AdamW)")->capture_default_str()->check(cli_float(FloatRule::positive));
  app->add_option("--min-lr", o.min_lr, "Learning rate at the end of the cosine decay (of each stage)")
      ->capture_default_str()
      ->check(cli_float(FloatRule::non_negative));
  app->add_option("--warmup-epochs", o.warmup_epochs, "Linear warm-up length in epochs (of each stage)")
      ->capture_default_str()
      ->check(cli_float(FloatRule::non_negative));
  app->add_option("--wd", o.weight_decay, "AdamW weight decay (matrices only)")
      ->capture_default_str()
      ->check(cli_float(FloatRule::non_negative));
  app->add_option("--clip", o.clip, "Clip the global gradient norm to this (0: off)")
      ->capture_default_str()
      ->check(cli_float(FloatRule::non_negative));
  app->add_option("--smoothing", o.smoothing, "Label smoothing of the cross-entropy")
      ->capture_default_str()
      ->check(cli_float(FloatRule::fraction));
  app->add_option("--seed", o.seed, seed_help)->capture_default_str();
  app->add_option("--pad-crop", o.augment.pad_crop, "Augmentation: random crop after padding by this many pixels")
      ->capture_default_str();
  app->add_flag("--hflip", o.augment.hflip, "Augmentation: random horizontal flips");
  app->add_flag("--crop-per-batch", o.augment.crop_per_batch,
                "Augmentation: draw one crop offset per batch instead of one per image");
  app->add_option("--train-limit", o.train_limit, "Use only the first N training images (0: all)");
  app->add_option("--eval-limit", o.eval_limit, "Evaluate on only the first N test images (0: all)");
}

int main(int argc, char** argv) {
  CLI::App app{"shiftaddvit: turn pre-trained vision transformers into ShiftAddViT models and run them fast.\n"
               "ViT/DeiT training, evaluation, inference and benchmarks; ShiftAddViT conversion, fine-tuning, "
               "energy and routing pictures."};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "CPU threads for OpenMP and BLAS (default: all cores)");

  ModelArgs tm, em, im, bm;
  DataArgs td, ed;
  TrainOptions topt;
  int eval_batch = 256;
  int64_t eval_limit = 0;
  std::string in_path, out_path;
  int infer_batch = 64;
  std::string bench_batches = "1,64";
  int bench_iters = 10, bench_warmup = 2;
  bool bench_train = false;

  auto* train = app.add_subcommand("train", "Train a model (from scratch, or from --weights) and evaluate it");
  add_model_flags(train, tm, false, "vit_fmnist");
  add_shape_flags(train, tm);
  add_data_flags(train, td);
  train->add_option("--epochs", topt.epochs, "Passes over the training set")->capture_default_str()->check(cli_positive_int());
  add_optim_flags(train, topt, "Seed of init, shuffling and augmentation");
  train->add_option("--out", topt.out_dir, "Folder for checkpoints (last.safetensors, model.safetensors)");
  train->add_option("--save-every", topt.save_every, "Also checkpoint every N steps (0: at epoch ends only)");
  train->add_flag("--resume", topt.resume, "Continue from OUT/last.safetensors if it exists");
  train->add_option("--max-steps", topt.max_steps, "Stop (with a checkpoint) after N steps of this run (0: no limit)");
  bool no_progress = false;
  train->add_flag("--no-progress", no_progress, "No progress bar");
  DeviceArgs train_dev, finetune_dev;
  add_train_device_flags(train, train_dev);

  auto* eval = app.add_subcommand("eval", "Top-1/top-5 accuracy of a checkpoint on the test split");
  add_model_flags(eval, em, true, "");
  add_data_flags(eval, ed);
  eval->add_option("--batch", eval_batch, "Images per forward pass")->capture_default_str()->check(cli_positive_int());
  eval->add_option("--limit", eval_limit, "Evaluate only the first N images (0: all)");

  auto* infer = app.add_subcommand("infer", "Logits for a batch of images stored as a safetensors tensor");
  add_model_flags(infer, im, true, "");
  add_format_flag(infer, im);
  infer->add_option("--input", in_path, "safetensors file with a float32 tensor 'input' (B,C,S,S), normalised")->required();
  infer->add_option("--output", out_path, "safetensors file to write the float32 tensor 'logits' (B,classes) to")
      ->required();
  infer->add_option("--batch", infer_batch, "Images per forward pass")->capture_default_str()->check(cli_positive_int());
  DeviceArgs infer_dev, bench_dev;
  add_device_flags(infer, infer_dev);

  auto* bench = app.add_subcommand("bench", "Time the engine's forward pass (and training step) and print a table");
  add_model_flags(bench, bm, false, "vit_fmnist");
  bench->add_option("--batch", bench_batches, "Comma-separated batch sizes")->check(cli_int_list())->capture_default_str();
  bench->add_option("--iters", bench_iters, "Timed iterations (the median is reported)")->capture_default_str()
      ->check(cli_positive_int());
  bench->add_option("--warmup", bench_warmup, "Untimed iterations first")->capture_default_str();
  bench->add_flag("--train", bench_train, "Also time a full training step (forward, backward, AdamW; with --device cuda on the GPU, f32 or --tf32)");
  add_device_flags(bench, bench_dev);
  add_bench_train_precision_flag(bench, bench_dev);

  ModelArgs cm, fm;
  DataArgs cd, fd;
  ReparamArgs cr, fr;
  std::string convert_out;
  auto* convert = app.add_subcommand("convert", "Dense checkpoint -> ShiftAddViT checkpoint (KSH fitted on real data); a "
                                              "ShiftAddViT release checkpoint is re-saved with the engine's names");
  add_model_flags(convert, cm, true, "");
  add_format_flag(convert, cm);
  add_data_flags(convert, cd);
  add_reparam_flags(convert, cr);
  convert->add_option("--out", convert_out, "Output .safetensors file")->required();

  TrainOptions fopt;
  fopt.epochs = 2;
  fopt.lr = 5e-4f;
  fopt.warmup_epochs = 0.2f;
  int epochs1 = 1, epochs2 = 2;
  bool distill = false, f_no_progress = false;
  auto* finetune = app.add_subcommand("finetune", "Convert a dense model and fine-tune it in stages (attention, then "
                                                  "linears), optionally distilling from the dense model");
  add_model_flags(finetune, fm, true, "");
  add_data_flags(finetune, fd);
  add_reparam_flags(finetune, fr);
  finetune->add_option("--stage1-epochs", epochs1, "Epochs with only the attention converted (0: skip)")
      ->capture_default_str();
  finetune->add_option("--stage2-epochs", epochs2, "Epochs with attention and linears converted")->capture_default_str();
  finetune->add_flag("--distill", distill, "Distil from the dense model given by --weights");
  finetune->add_option("--distill-weight", fopt.distill, "Weight of the distillation term (vs cross-entropy)")
      ->capture_default_str()
      ->check(cli_float(FloatRule::non_negative));
  finetune->add_option("--distill-temp", fopt.distill_temp, "Distillation temperature")->capture_default_str()
      ->check(cli_float(FloatRule::positive));
  add_optim_flags(finetune, fopt, "Seed of shuffling, augmentation, router noise, KSH fitting");
  finetune->add_option("--out", fopt.out_dir, "Folder: stage1/, stage2/ checkpoints and the final model.safetensors")
      ->required();
  finetune->add_option("--save-every", fopt.save_every, "Also checkpoint every N steps");
  finetune->add_flag("--resume", fopt.resume, "Continue finished stages and OUT/stageK/last.safetensors");
  finetune->add_option("--max-steps", fopt.max_steps, "Stop (with a checkpoint) after N steps of a stage");
  finetune->add_flag("--no-progress", f_no_progress, "No progress bar");
  add_train_device_flags(finetune, finetune_dev);

  ModelArgs nm, pm, rm;
  DataArgs nd, rd;
  std::string e_attn = "hamming", e_mlp = "moe", e_attn_lin = "dense", e_csv, e_json;
  double e_share = 0.5;
  int64_t e_limit = 2000;
  auto* energy = app.add_subcommand("energy", "Per-layer multiplications, additions, shifts and bytes, priced with 45 nm "
                                              "unit energies: dense vs converted");
  add_model_flags(energy, nm, false, "deit_tiny_patch16_224");
  add_data_flags(energy, nd);
  energy->add_option("--attn", e_attn, "Without --weights: attention of the converted geometry (softmax, hamming)")
      ->capture_default_str();
  energy->add_option("--mlp", e_mlp, "Without --weights: MLP linears (dense, shift, moe)")->capture_default_str();
  energy->add_option("--attn-linear", e_attn_lin, "Without --weights: attention linears (dense, shift, moe)")
      ->capture_default_str();
  energy->add_option("--share", e_share, "MoE share of tokens sent to the shift expert (assumed when not measured)")
      ->capture_default_str();
  energy->add_option("--limit", e_limit, "With --weights of a MoE model: test images used to measure the shares "
                                         "(-1: don't measure)")
      ->capture_default_str();
  energy->add_option("--csv", e_csv, "Also write per-layer rows as CSV to this file");
  energy->add_option("--json", e_json, "Also write the reports as JSON to this file");

  int p_tokens = 3200;
  bool p_int = false;
  std::string p_out;
  auto* profile = app.add_subcommand("profile", "Measure each MoE expert's per-token latency on this machine and print "
                                                "the latency factors (--alpha) for the load-balancing loss");
  add_model_flags(profile, pm, false, "vit_fmnist");
  profile->add_option("--tokens", p_tokens, "Tokens per timed call")->capture_default_str()->check(cli_positive_int());
  profile->add_flag("--int-kernel", p_int, "Time the integer MatShift kernel for the shift expert (else the float path)");
  profile->add_option("--out", p_out, "Write the factors as JSON to this file");

  std::string r_image, r_out = "route.png";
  int r_index = 0;
  auto* route = app.add_subcommand("route", "Picture of which tokens each MoE layer sent to which expert");
  add_model_flags(route, rm, true, "");
  add_data_flags(route, rd);
  route->add_option("image", r_image, "Image file (PNG/JPEG); without it, --index picks a test image");
  route->add_option("--index", r_index, "Test-set image to use when no image file is given")->capture_default_str();
  route->add_option("--out", r_out, "PNG to write")->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // "shiftaddvit trian": CLI11 says only that a subcommand is required; name the word it did not know.
    if (app.get_subcommands().empty()) {
      for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a.empty() || a[0] == '-') continue;
        std::string known;
        for (const CLI::App* sc : std::as_const(app).get_subcommands([](const CLI::App*) { return true; })) known += (known.empty() ? "" : ", ") + sc->get_name();
        std::cerr << "error: unknown subcommand '" << a << "'; known: " << known << " (see --help)\n";
        return 2;
      }
    }
    std::cerr << "error: " << e.what() << " (see --help)\n";
    return e.get_exit_code() ? e.get_exit_code() : 2;
  }
  try {
    if (threads > 0) set_num_threads(threads);
    topt.progress = !no_progress;
    if (*train) return cmd_train(tm, td, train_dev, topt);
    if (*eval) return cmd_eval(em, ed, eval_batch, eval_limit);
    if (*infer) return cmd_infer(im, infer_dev, in_path, out_path, infer_batch);
    if (*bench) return cmd_bench(bm, bench_dev, bench_batches, bench_iters, bench_warmup, bench_train);
    if (*convert) return cmd_convert(cm, cd, cr, convert_out, *convert);
    if (*energy) return cmd_energy(nm, nd, e_attn, e_mlp, e_attn_lin, e_share, e_limit, e_csv, e_json);
    if (*profile) return cmd_profile(pm, p_tokens, p_int, p_out);
    if (*route) return cmd_route(rm, rd, r_image, r_index, r_out);
    if (*finetune) {
      fopt.progress = !f_no_progress;
      return cmd_finetune(fm, fd, fr, finetune_dev, fopt, epochs1, epochs2, distill);
    }
  } catch (const sav::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
