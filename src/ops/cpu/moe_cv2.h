// shiftaddvit: CV^2 of the latency-aware load-balancing loss (METHOD.md section 3), one definition for the CPU
// (ops/cpu/moe.cpp) and the GPU training kernels (ops/cuda/moe_train.cu), so both compute the same formula.
#pragma once

#include "ops/cpu/moe.h"

#if defined(__CUDACC__)
#define SAV_HOST_DEVICE __host__ __device__
#else
#define SAV_HOST_DEVICE
#endif

namespace sav::cpu {

// CV^2(z) = Var(z) / (Mean(z)^2 + moe_cv2_eps) with the unbiased variance; g (E) receives dCV^2/dz when non-null.
// 0 when E == 1.
SAV_HOST_DEVICE inline double moe_cv2(const double* z, int E, double* g) {
  if (E < 2) {
    if (g) g[0] = 0.0;
    return 0.0;
  }
  double mean = 0.0;
  for (int e = 0; e < E; ++e) mean += z[e];
  mean /= E;
  double ss = 0.0;
  for (int e = 0; e < E; ++e) ss += (z[e] - mean) * (z[e] - mean);
  const double var = ss / (E - 1);
  const double D = mean * mean + static_cast<double>(moe_cv2_eps);
  if (g)
    for (int e = 0; e < E; ++e) g[e] = 2.0 * (z[e] - mean) / ((E - 1) * D) - 2.0 * var * mean / (E * D * D);
  return var / D;
}

}  // namespace sav::cpu
