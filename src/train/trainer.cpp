#include "train/trainer.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <numeric>

#include "core/error.h"
#include "core/progress.h"
#include "core/rng.h"
#include "io/safetensors.h"
#include "ops/cpu/ops.h"

namespace sav {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void make_dirs(const std::string& dir) {
  std::string cur;
  for (size_t i = 0; i <= dir.size(); ++i) {
    if (i == dir.size() || dir[i] == '/') {
      if (!cur.empty() && cur != "." && ::mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST)
        SAV_THROW("cannot create folder '" << cur << "': " << std::strerror(errno));
    }
    if (i < dir.size()) cur += dir[i];
  }
}

// A run killed during a checkpoint write leaves "<name>.tmp.<pid>" beside the intact checkpoint; the next
// run in that folder removes them.
void remove_stale_temporaries(const std::string& dir) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    for (const char* base : {"last.safetensors.tmp.", "model.safetensors.tmp."})
      if (name.rfind(base, 0) == 0) std::filesystem::remove(e.path(), ec);
  }
}

// Epoch permutation of [0, n): a function of (seed, epoch) only.
std::vector<int> epoch_order(int64_t n, uint64_t seed, int epoch) {
  std::vector<int> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  Rng rng(seed * 1000003ull + static_cast<uint64_t>(epoch) + 17);
  for (int64_t i = n - 1; i > 0; --i) std::swap(idx[i], idx[rng.below(i + 1)]);
  return idx;
}

void top_k(const float* logits, int V, int label, int& top1, int& top5) {
  int rank = 0;
  for (int v = 0; v < V; ++v)
    if (logits[v] > logits[label] || (logits[v] == logits[label] && v < label)) ++rank;
  top1 += rank == 0;
  top5 += rank < 5;
}

}  // namespace

float distill_loss(float* dstudent, const float* student, const float* teacher, int B, int V, float T, float weight) {
  double total = 0;
  std::vector<double> ps(V), pt(V);
  for (int b = 0; b < B; ++b) {
    const float* s = student + size_t(b) * V;
    const float* t = teacher + size_t(b) * V;
    auto softmax = [&](const float* z, std::vector<double>& p) {
      double mx = z[0];
      for (int v = 1; v < V; ++v) mx = std::max(mx, double(z[v]));
      double sum = 0;
      for (int v = 0; v < V; ++v) sum += (p[v] = std::exp((z[v] - mx) / T));
      for (int v = 0; v < V; ++v) p[v] /= sum;
    };
    softmax(s, ps);
    softmax(t, pt);
    for (int v = 0; v < V; ++v)
      if (pt[v] > 0) total += pt[v] * (std::log(pt[v]) - std::log(std::max(ps[v], 1e-300)));
    // d/ds_v of T^2 * KL / B = T * (ps_v - pt_v) / B
    for (int v = 0; v < V; ++v) dstudent[size_t(b) * V + v] += weight * float(T * (ps[v] - pt[v]) / B);
  }
  return static_cast<float>(T * T * total / B);
}

EvalResult evaluate(ImageClassifier& model, const Dataset& ds, const Normalize& norm, int batch, int64_t limit,
                    bool progress) {
  SAV_CHECK(ds.channels == model.in_chans() && ds.height == model.img_size() && ds.width == model.img_size(),
            "data set images are " << ds.channels << "x" << ds.height << "x" << ds.width << " but the model "
                                   << model.arch() << " expects " << model.in_chans() << "x" << model.img_size()
                                   << "x" << model.img_size());
  const int64_t n = limit > 0 ? std::min<int64_t>(limit, ds.n) : ds.n;
  const int V = model.num_classes();
  std::vector<float> images(size_t(batch) * ds.channels * ds.height * ds.width);
  std::vector<int> labels(batch), idx(batch);
  std::vector<float> probs(size_t(batch) * V);
  int top1 = 0, top5 = 0;
  double loss = 0;
  Progress bar("eval", (n + batch - 1) / batch, "img", progress);
  const double t0 = now_s();
  for (int64_t s = 0; s < n; s += batch) {
    const int B = static_cast<int>(std::min<int64_t>(batch, n - s));
    std::iota(idx.begin(), idx.begin() + B, static_cast<int>(s));
    make_batch(ds, idx.data(), B, norm, Augment{}, nullptr, images.data(), labels.data());
    for (int b = 0; b < B; ++b)
      SAV_CHECK(labels[b] >= 0 && labels[b] < V,
                "label " << labels[b] << " of image " << s + b << " is outside the model's " << V << " classes");
    model.forward(images.data(), B, false);
    loss += double(cpu::cross_entropy_forward(probs.data(), model.logits(), labels.data(), B, V, 0.0f)) * B;
    for (int b = 0; b < B; ++b) top_k(model.logits() + size_t(b) * V, V, labels[b], top1, top5);
    bar.update(s / batch + 1, B, {{"top1", n ? double(top1) / (s + B) : 0}});
  }
  if (progress) bar.finish();
  EvalResult r;
  r.n = n;
  r.seconds = now_s() - t0;
  r.top1 = n ? double(top1) / n : 0;
  r.top5 = n ? double(top5) / n : 0;
  r.loss = n ? loss / n : 0;
  r.images_per_s = r.seconds > 0 ? n / r.seconds : 0;
  return r;
}

Trainer::Trainer(ImageClassifier& model, const Dataset& train, const Dataset& test, const TrainOptions& opt)
    : model_(model),
      train_(train),
      test_(test),
      opt_(opt),
      optim_(model.params(), AdamWOptions{opt.lr, 0.9f, 0.999f, 1e-8f, opt.weight_decay}) {
  SAV_CHECK(opt.batch > 0 && opt.epochs > 0, "batch and epochs must be positive (got " << opt.batch << ", "
                                                                                       << opt.epochs << ")");
  SAV_CHECK(train.channels == model.in_chans() && train.height == model.img_size(),
            "training images are " << train.channels << "x" << train.height << "x" << train.width
                                   << " but the model expects " << model.in_chans() << "x" << model.img_size() << "x"
                                   << model.img_size());
}

std::vector<std::pair<std::string, Tensor>> model_tensors(ImageClassifier& model) {
  std::vector<std::pair<std::string, Tensor>> ts;
  const ParamSet& ps = model.params();
  for (size_t i = 0; i < ps.size(); ++i) ts.emplace_back(ps.name(i), ps.tensor(i));
  if (const ParamSet* bs = model.buffers())
    for (size_t i = 0; i < bs->size(); ++i) ts.emplace_back(bs->name(i), bs->tensor(i));
  return ts;
}

void save_model(ImageClassifier& model, const std::string& path, const std::map<std::string, std::string>& extra) {
  auto md = model.metadata();
  for (auto& [k, v] : extra) md[k] = v;
  save_safetensors(path, model_tensors(model), md);
}

void Trainer::save_state(const std::string& path, int64_t step) const {
  auto md = model_.metadata();
  md["sav.train.step"] = std::to_string(step);
  md["sav.train.seed"] = std::to_string(opt_.seed);
  md["sav.train.batch"] = std::to_string(opt_.batch);
  md["sav.train.epochs"] = std::to_string(opt_.epochs);
  md["sav.train.adam_steps"] = std::to_string(optim_.steps());
  std::vector<std::pair<std::string, Tensor>> ts = model_tensors(model_);
  const ParamSet& ps = model_.params();
  AdamW& o = const_cast<AdamW&>(optim_);
  for (size_t i = 0; i < ps.size(); ++i) ts.emplace_back("optim.m." + ps.name(i), o.m().tensor(i));
  for (size_t i = 0; i < ps.size(); ++i) ts.emplace_back("optim.v." + ps.name(i), o.v().tensor(i));
  save_safetensors(path, ts, md);
}

int64_t Trainer::load_state(const std::string& path) {
  Checkpoint ck = Checkpoint::open(path);
  const auto& md = ck.metadata();
  auto get = [&](const std::string& k) {
    auto it = md.find(k);
    SAV_CHECK(it != md.end(), "training state " << path << " lacks metadata '" << k << "'");
    return it->second;
  };
  auto mine = model_.metadata();
  for (auto& [k, v] : mine)
    SAV_CHECK(md.count(k) && md.at(k) == v, "training state " << path << " was written for another model (" << k
                                                              << " = '" << (md.count(k) ? md.at(k) : "?")
                                                              << "', this run has '" << v << "')");
  SAV_CHECK(get("sav.train.batch") == std::to_string(opt_.batch) && get("sav.train.seed") == std::to_string(opt_.seed),
            "cannot resume " << path << ": it was trained with batch " << get("sav.train.batch") << " and seed "
                             << get("sav.train.seed") << "; pass the same --batch and --seed");
  ParamSet& ps = model_.params();
  for (size_t i = 0; i < ps.size(); ++i) {
    const std::string& n = ps.name(i);
    for (const std::string& key : {n, "optim.m." + n, "optim.v." + n}) {
      SAV_CHECK(ck.contains(key), "training state " << path << " lacks tensor '" << key << "'");
      check_shape(ck.get(key), ps.tensor(i).shape(), path + ": " + key);
    }
    ps.tensor(i).copy_from(ck.get(n));
    optim_.m().tensor(i).copy_from(ck.get("optim.m." + n));
    optim_.v().tensor(i).copy_from(ck.get("optim.v." + n));
  }
  if (ParamSet* bs = model_.buffers())
    for (size_t i = 0; i < bs->size(); ++i) {
      SAV_CHECK(ck.contains(bs->name(i)), "training state " << path << " lacks buffer '" << bs->name(i) << "'");
      bs->tensor(i).copy_from(ck.get(bs->name(i)));
    }
  optim_.set_steps(std::stoll(get("sav.train.adam_steps")));
  return std::stoll(get("sav.train.step"));
}

TrainSummary Trainer::run() {
  const int64_t n = opt_.train_limit > 0 ? std::min<int64_t>(opt_.train_limit, train_.n) : train_.n;
  const int B = opt_.batch;
  const int64_t steps_per_epoch = n / B;  // drop the last partial batch
  SAV_CHECK(steps_per_epoch > 0, "the training set (" << n << " images) is smaller than one batch of " << B);
  const int64_t total = steps_per_epoch * opt_.epochs;
  const int64_t warmup = static_cast<int64_t>(opt_.warmup_epochs * steps_per_epoch);
  const int V = model_.num_classes();
  const std::string last = opt_.out_dir.empty() ? "" : opt_.out_dir + "/last.safetensors";
  if (!opt_.out_dir.empty()) {
    make_dirs(opt_.out_dir);
    remove_stale_temporaries(opt_.out_dir);
  }

  // A model that trains on an accelerator keeps parameters, gradients and moments there; the host copies are
  // refreshed before each checkpoint.
  DeviceTrainer* dt = model_.device_trainer();
  auto checkpoint = [&](int64_t at) {
    if (dt) dt->download_state(&optim_.m(), &optim_.v());
    save_state(last, at);
  };
  int64_t step = 0;
  if (opt_.resume) {
    SAV_CHECK(!last.empty(), "--resume needs an output folder (--out)");
    struct stat st;
    if (::stat(last.c_str(), &st) == 0) {
      step = load_state(last);
      if (dt) dt->upload_state(&optim_.m(), &optim_.v());
      std::cerr << "resumed from " << last << " at step " << step << "/" << total << "\n";
    } else {
      std::cerr << "no " << last << " to resume from; starting fresh\n";
    }
  }

  std::vector<float> images(size_t(B) * train_.channels * train_.height * train_.width);
  std::vector<int> labels(B);
  std::vector<float> probs(size_t(B) * V), dlogits(size_t(B) * V);
  TrainSummary summary;
  const double t_start = now_s();
  int64_t steps_this_run = 0;
  for (int epoch = static_cast<int>(step / steps_per_epoch); epoch < opt_.epochs; ++epoch) {
    const std::vector<int> order = epoch_order(n, opt_.seed, epoch);
    Progress bar("epoch " + std::to_string(epoch + 1) + "/" + std::to_string(opt_.epochs), steps_per_epoch, "img",
                 opt_.progress);
    double loss_sum = 0;
    int64_t correct = 0, seen = 0;
    const double t_epoch = now_s();
    for (int64_t s = step - epoch * steps_per_epoch; s < steps_per_epoch; ++s, ++step) {
      if (opt_.max_steps > 0 && steps_this_run >= opt_.max_steps) {
        if (!last.empty()) checkpoint(step);
        summary.steps = step;
        summary.seconds = now_s() - t_start;
        return summary;
      }
      Rng aug_rng(opt_.seed ^ (0x5bd1e995ull * static_cast<uint64_t>(step + 1)));
      make_batch(train_, order.data() + s * B, B, opt_.normalize, opt_.augment, &aug_rng, images.data(),
                 labels.data());
      model_.set_noise_seed(opt_.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(step) + 1);
      model_.forward(images.data(), B, true);
      const float loss = cpu::cross_entropy_forward(probs.data(), model_.logits(), labels.data(), B, V, opt_.smoothing);
      const float aux = model_.aux_loss();
      SAV_CHECK(std::isfinite(loss) && std::isfinite(aux),
                "loss is not finite at step " << step << " (loss " << loss << ", aux " << aux
                                              << "); the last good checkpoint is kept; try a lower --lr");
      std::fill(dlogits.begin(), dlogits.end(), 0.0f);
      const float ce_weight = opt_.teacher ? 1.0f - opt_.distill : 1.0f;
      cpu::cross_entropy_backward(dlogits.data(), probs.data(), labels.data(), B, V, opt_.smoothing, ce_weight);
      float kd = 0.0f;
      if (opt_.teacher) {
        const std::vector<float> student(model_.logits(), model_.logits() + size_t(B) * V);
        opt_.teacher->forward(images.data(), B, false);
        kd = distill_loss(dlogits.data(), student.data(), opt_.teacher->logits(), B, V, opt_.distill_temp, opt_.distill);
      }
      const float lr = cosine_lr(step, total, warmup, opt_.lr, opt_.min_lr);
      if (dt) {
        dt->zero_grads();
        model_.backward(dlogits.data());
        try {
          dt->optimizer_step(optim_.options(), lr, opt_.clip, optim_.steps() + 1);
        } catch (const Error& e) {
          SAV_THROW(e.what() << " at step " << step
                             << "; the last good checkpoint is kept; try a lower --lr or --clip");
        }
        optim_.set_steps(optim_.steps() + 1);
      } else {
        model_.grads().zero();
        model_.backward(dlogits.data());
        const int bad = first_nonfinite(model_.grads());
        SAV_CHECK(bad < 0, "gradient of '" << model_.grads().name(bad < 0 ? 0 : bad) << "' is not finite at step "
                                           << step << "; the last good checkpoint is kept; try a lower --lr or --clip");
        clip_grad_norm(model_.grads(), opt_.clip);
        optim_.step(model_.params(), model_.grads(), lr);
      }
      ++steps_this_run;
      loss_sum += ce_weight * loss + (opt_.teacher ? opt_.distill * kd : 0.0f) + aux;
      for (int b = 0; b < B; ++b) {
        const float* l = model_.logits() + size_t(b) * V;
        correct += std::max_element(l, l + V) - l == labels[b];
      }
      seen += B;
      bar.update(s + 1, B, {{"loss", loss_sum / (seen / B)}, {"acc", double(correct) / seen}});
      if (opt_.save_every > 0 && !last.empty() && (step + 1) % opt_.save_every == 0) checkpoint(step + 1);
    }
    bar.finish();
    const double train_s = now_s() - t_epoch;
    EvalResult ev = evaluate(model_, test_, opt_.normalize, opt_.eval_batch, opt_.eval_limit, false);
    summary.epochs.push_back({epoch + 1, seen ? loss_sum / (seen / B) : 0, seen ? double(correct) / seen : 0, ev.top1,
                              ev.loss, seen / std::max(train_s, 1e-9), train_s});
    std::cerr << "epoch " << epoch + 1 << ": train loss " << fmt(summary.epochs.back().train_loss, 4) << ", test top-1 "
              << fmt(100 * ev.top1, 2) << "%\n";
    if (!last.empty()) checkpoint(step);
    summary.final_eval = ev;
  }
  if (summary.epochs.empty()) summary.final_eval = evaluate(model_, test_, opt_.normalize, opt_.eval_batch, opt_.eval_limit);
  summary.steps = step;
  summary.seconds = now_s() - t_start;
  summary.finished = true;
  if (dt) dt->download_state(nullptr, nullptr);
  if (!opt_.out_dir.empty()) save_model(model_, opt_.out_dir + "/model.safetensors");
  return summary;
}

}  // namespace sav
