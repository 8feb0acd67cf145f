// libFuzzer entry of the image target (fuzz/targets.h). Built by fuzz/build.sh; run as in fuzz/README.md.
#include <cstddef>
#include <cstdint>

#include "targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return sav::fuzz::fuzz_image_one(data, size);
}
