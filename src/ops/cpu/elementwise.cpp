// shiftaddvit: elementwise helpers on the CPU.
//
// Shapes: y, x (n), any layout.
#include "ops/cpu/ops.h"
#include "ops/cpu/simd_math.h"

namespace sav::cpu {

void add_inplace(float* y, const float* x, int64_t n) {
  SAV_CHECK(n >= 0, "add_inplace: n must be non-negative, got " << n);
  if (n == 0) return;
  SAV_CHECK_PTR(y);
  SAV_CHECK_PTR(x);
#pragma omp parallel for simd schedule(static) if (n >= detail::kParallelElems)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

}  // namespace sav::cpu
