// shiftaddvit: training and evaluation loops for any ImageClassifier.
//
//   sav::TrainOptions opt; opt.epochs = 10; opt.out_dir = "runs/fmnist";
//   sav::Trainer trainer(model, train_set, test_set, opt);
//   sav::TrainSummary s = trainer.run();        // resumes from out_dir/last.safetensors if opt.resume
//
// Checkpoints (safetensors, written atomically): out_dir/last.safetensors holds the parameters, the AdamW
// moments ("optim.m.<name>", "optim.v.<name>") and in its metadata the step, the model config and the
// options; out_dir/model.safetensors holds the final parameters only (what eval/infer/convert read).
// Every random draw (shuffle, augmentation) is a function of (seed, epoch, step), so a resumed run
// continues exactly where the saved one was.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "io/dataset.h"
#include "models/model.h"
#include "train/optim.h"

namespace sav {

struct TrainOptions {
  int epochs = 10;
  int batch = 64;
  float lr = 1e-3f, min_lr = 1e-5f;
  float warmup_epochs = 1.0f;
  float weight_decay = 0.05f;
  float clip = 1.0f;
  float smoothing = 0.1f;
  uint64_t seed = 0;
  Augment augment;
  Normalize normalize = Normalize::none();  // the CLI sets the data set's own
  int64_t train_limit = 0;  // use only the first N training images (0: all)
  int64_t eval_limit = 0;
  int eval_batch = 256;
  std::string out_dir;      // empty: no checkpoints
  int save_every = 0;       // steps between checkpoints (0: each epoch end only)
  bool resume = false;
  bool progress = true;
  int64_t max_steps = 0;    // stop after this many steps in this invocation (testing kill/resume); 0: no limit
  // Knowledge distillation: loss = (1 - distill) * CE(labels) + distill * T^2 * KL(teacher_T || student_T).
  ImageClassifier* teacher = nullptr;
  float distill = 0.5f, distill_temp = 2.0f;
};

// Soft distillation on logits (B,V): returns T^2 * mean_b KL(softmax(t/T) || softmax(s/T)) and adds
// weight * d/ds of it into dstudent (B,V).
float distill_loss(float* dstudent, const float* student, const float* teacher, int B, int V, float T, float weight);

struct EvalResult {
  int64_t n = 0;
  double top1 = 0, top5 = 0, loss = 0;
  double images_per_s = 0, seconds = 0;
};

struct EpochLog {
  int epoch;
  double train_loss, train_acc, test_top1, test_loss, images_per_s, seconds;
};

struct TrainSummary {
  std::vector<EpochLog> epochs;
  int64_t steps = 0;
  double seconds = 0;
  EvalResult final_eval;
  bool finished = false;  // false when max_steps stopped it early
};

EvalResult evaluate(ImageClassifier& model, const Dataset& ds, const Normalize& norm, int batch, int64_t limit = 0,
                    bool progress = false);

class Trainer {
 public:
  Trainer(ImageClassifier& model, const Dataset& train, const Dataset& test, const TrainOptions& opt);
  TrainSummary run();
  // Saves parameters + optimizer state + step atomically to `path`.
  void save_state(const std::string& path, int64_t step) const;
  // Restores from `path`; returns the step to continue from.
  int64_t load_state(const std::string& path);

 private:
  ImageClassifier& model_;
  const Dataset& train_;
  const Dataset& test_;
  TrainOptions opt_;
  AdamW optim_;
};

// Parameters then buffers, by checkpoint name (views, no copies).
std::vector<std::pair<std::string, Tensor>> model_tensors(ImageClassifier& model);
// Writes the model's parameters and metadata (no optimizer state) atomically.
void save_model(ImageClassifier& model, const std::string& path,
                const std::map<std::string, std::string>& extra_metadata = {});

}  // namespace sav
