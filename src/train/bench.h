// shiftaddvit: timing the engine's own forward pass and training step (used by `shiftaddvit bench`).
#pragma once

#include "models/model.h"

namespace sav {

struct BenchResult {
  int batch = 0;
  double forward_ms = 0;      // median over iterations, inference forward
  double train_step_ms = 0;   // median, forward + loss + backward + AdamW (0 if not measured)
};

// Random inputs (seeded); `warmup` untimed iterations then the median of `iters`.
BenchResult bench_model(ImageClassifier& model, int batch, int iters, int warmup, bool train);

}  // namespace sav
