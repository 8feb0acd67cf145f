// libFuzzer entry of the idx target (fuzz/targets.h). Built by fuzz/build.sh; run as in fuzz/README.md.
#include <cstddef>
#include <cstdint>

#include "targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return sav::fuzz::fuzz_idx_one(data, size);
}
