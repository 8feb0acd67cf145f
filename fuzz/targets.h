// shiftaddvit fuzz targets: one plain entry function per reader of outside input.
//
//   int rc = sav::fuzz::fuzz_safetensors_one(bytes, size);   // what libFuzzer's LLVMFuzzerTestOneInput calls
//   for (const auto& t : sav::fuzz::fuzz_targets()) t.fn(bytes, size);  // what the replay test does
//
// Each entry function turns the input bytes into the files (or strings) a reader takes, runs the reader,
// and checks what comes back (shapes, sizes, a round trip, fast vs reference). A sav::Error is the
// expected outcome of bad input and is swallowed. Anything else escapes: an invariant that does not hold
// throws sav::fuzz::InvariantError (std::logic_error), other exceptions (std::bad_alloc,
// std::out_of_range, ...) pass through, and memory errors crash under the sanitizers. Every function
// returns 0 (libFuzzer's convention).
//
// Multi-file inputs are split at the marker k_fuzz_split ("#SAVSPLIT#"):
//   checkpoint_index: INDEX_JSON #SAVSPLIT# SHARD_A [#SAVSPLIT# SHARD_B]   (files a.safetensors, b.safetensors)
//   idx:              IMAGES_IDX3 #SAVSPLIT# LABELS_IDX1                    (each plain or gzipped)
// image: byte 0 picks sizes (resize 1 + b0 % 48, crop from b0 >> 4), bytes 1.. are the image file.
// cli_values: the text as one --batch / --alpha value, and split at '\n' into an argv for the CLI11 options.
//
// Files are written into one scratch folder per process (under $TMPDIR, else /dev/shm, else /tmp),
// removed at exit. Not thread-safe (libFuzzer and the replay test run one input at a time).
//
// The image target decodes with a 2^20-pixel limit instead of kMaxImagePixels (the same check, reached
// more often, and no multi-second decodes of headers that promise 100 M pixels of missing data), and skips
// resizes whose output would exceed k_fuzz_max_resize_pixels (valid but slow);
// outputs past kMaxImagePixels must be refused with sav::Error. There are no other guards: the problems
// K1-K8 of fuzz/README.md are fixed and their inputs replayed from fuzz/regressions/image/.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace sav::fuzz {

inline constexpr std::string_view k_fuzz_split = "#SAVSPLIT#";
inline constexpr int64_t k_fuzz_max_resize_pixels = int64_t(1) << 22;  // resize output, h * w
inline constexpr int64_t k_fuzz_max_decode_pixels = int64_t(1) << 20;  // decode_image's limit in the harness

// An invariant of a reader's result that does not hold (a bug, not bad input).
class InvariantError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

int fuzz_safetensors_one(const uint8_t* data, size_t size);
int fuzz_checkpoint_index_one(const uint8_t* data, size_t size);
int fuzz_idx_one(const uint8_t* data, size_t size);
int fuzz_image_one(const uint8_t* data, size_t size);
int fuzz_cli_values_one(const uint8_t* data, size_t size);

struct FuzzTarget {
  const char* name;  // "safetensors", ...: also the folder name under fuzz/corpus and fuzz/regressions
  int (*fn)(const uint8_t* data, size_t size);
};
const std::vector<FuzzTarget>& fuzz_targets();

// Splits `data` at every k_fuzz_split marker (at most max_parts parts; the last takes the rest).
std::vector<std::string_view> fuzz_split(const uint8_t* data, size_t size, size_t max_parts);

// The scratch folder of this process (created on first use, removed at exit).
const std::string& fuzz_scratch_dir();

}  // namespace sav::fuzz
