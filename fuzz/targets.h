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
// Harness guards (inputs skipped before they reach a known, not yet fixed problem; fuzz/README.md, "Known
// issues"; -DSAV_FUZZ_NO_GUARDS turns them off): K1 images whose header claims more than k_fuzz_max_pixels
// pixels, K2 0 x 0 decodes, K3 JPEGs with an oversized Huffman table, K4 PNGs whose first IDAT is empty,
// K5 resizes whose output would exceed k_fuzz_max_resize_pixels, K6/K7 16-bit or overflowing PNM headers,
// K8 JPEG scans that use an undefined Huffman table.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace sav::fuzz {

inline constexpr std::string_view k_fuzz_split = "#SAVSPLIT#";
inline constexpr uint64_t k_fuzz_max_pixels = uint64_t(1) << 22;         // decoded image, w * h
inline constexpr uint64_t k_fuzz_max_resize_pixels = uint64_t(1) << 22;  // resize output, h * w

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
