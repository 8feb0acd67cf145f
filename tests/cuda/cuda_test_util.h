// Helpers shared by the CUDA tests: skip without a GPU, bf16 rounding on the host, poison checks.
//
//   class MyTest : public sav::test::CudaTest {};     // every TEST_F skips with "no CUDA device" when
//   TEST_F(MyTest, Works) { ... }                      // the machine has no usable GPU
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/tensor.h"
#include "ops/cuda/common.h"
#include "op_harness.h"

namespace sav::test {

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!sav::cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  }
};

// The values a bf16 upload of v holds, back in f32.
inline std::vector<float> round_bf16(const std::vector<float>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = sav::bf16_to_float(sav::float_to_bf16(v[i]));
  return r;
}

// Number of non-finite entries (poisoned with 0xFF bytes = NaN before a kernel: any left were not written).
inline size_t count_nonfinite(const std::vector<float>& v) {
  size_t n = 0;
  for (float x : v) n += !std::isfinite(x);
  return n;
}

inline bool bit_identical(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace sav::test
