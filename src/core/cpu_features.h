// shiftaddvit: instruction sets detected at run time (the CI machine may be another CPU model).
#pragma once

#include <string>

namespace sav {

struct CpuFeatures {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vnni = false, amx_bf16 = false;
};

const CpuFeatures& cpu_features();
std::string cpu_features_str();  // "avx2 fma avx512f ..."
int num_threads();               // OpenMP threads the engine uses
void set_num_threads(int n);     // also sets the BLAS library's threads

}  // namespace sav
