// libFuzzer entry of the checkpoint_index target (fuzz/targets.h). Built by fuzz/build.sh; run as in fuzz/README.md.
#include <cstddef>
#include <cstdint>

#include "targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return sav::fuzz::fuzz_checkpoint_index_one(data, size);
}
