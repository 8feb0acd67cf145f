// shiftaddvit: safetensors checkpoints (read, write, sharded).
//
// The format (https://github.com/huggingface/safetensors), all integers little-endian:
//
//   [ 8 bytes ] N, unsigned 64-bit: the length of the header in bytes
//   [ N bytes ] header: a UTF-8 JSON object, possibly padded at the end with spaces (0x20)
//   [ rest    ] data region: the raw bytes of every tensor, row-major (C order), little-endian
//
// The header maps each tensor name to its description; the optional key "__metadata__" holds a flat
// string -> string object (free-form: format, framework, training step ...):
//
//   { "__metadata__": {"format": "pt"},
//     "blocks.0.attn.qkv.weight": {"dtype": "F32", "shape": [576, 192], "data_offsets": [0, 442368]},
//     "pos_embed":                {"dtype": "BF16", "shape": [1, 197, 192], "data_offsets": [442368, 518016]} }
//
// data_offsets [begin, end) are byte offsets relative to the start of the data region (8 + N), so a
// tensor's bytes are file[8 + N + begin, 8 + N + end). Shape [] is a scalar (1 element).
// Dtypes read and written here: F32, F16, BF16, I32, I64, U8 (others, e.g. F64 or BOOL, are refused).
//
// Validation on open is strict; every error is a sav::Error naming the file and, where there is one,
// the tensor: file shorter than 8 bytes; N > file size - 8 or N > 100 MB; header not valid JSON (a NUL
// byte included), not an object, or with a repeated key; an entry without dtype / shape / data_offsets or with other types;
// an unknown dtype; shape entries negative or not integers; element count overflowing int64; begin >
// end; end past the data region; end - begin != numel * dtype size; two tensors sharing bytes;
// "__metadata__" not an object of strings. Gaps between tensors (and bytes after the last one) are
// tolerated; the writer here never produces them.
//
// Reading memory-maps the file (copy-on-write, MAP_PRIVATE). A tensor returned by get() / get_raw()
// is a zero-copy view of the mapping when the stored dtype is the one asked for and its bytes are
// aligned; the view keeps the mapping alive after the SafeTensors object is gone. Writing into such a
// view changes only this process's copy, never the file. If another program truncates the file in
// place while it is mapped, reading the view faults (SIGBUS): replace checkpoints atomically (as
// save_safetensors does), never in place.
//
// Sharded checkpoints (as written by Hugging Face for big models): `model.safetensors.index.json` is
//   { "metadata": {"total_size": 123}, "weight_map": {"blocks.0.norm1.weight": "model-00001-of-00002.safetensors", ...} }
// with shard file names relative to the index's folder. Checkpoint opens either form, or a folder
// holding one of them, and reads all shards through the same API.
//
// Usage:
//   sav::save_safetensors("/tmp/m.safetensors", {{"head.weight", w}, {"head.bias", b}}, {{"format", "pt"}});
//   sav::SafeTensors st = sav::SafeTensors::open("/tmp/m.safetensors");
//   sav::Tensor w2 = st.get("head.weight");             // f32 CPU tensor, shape st.shape("head.weight")
//   sav::Checkpoint ck = sav::Checkpoint::open("/models/deit_tiny");   // file, index.json or folder
//   for (const std::string& name : ck.names()) { sav::Tensor t = ck.get(name); ... }
//
// Shape legend: none (shapes are whatever the file says; Shape is row-major, PyTorch order).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace sav {

// Largest header accepted (the reference implementation's limit).
constexpr uint64_t k_safetensors_max_header_bytes = 100'000'000;

// "F32" <-> DType::f32 etc. Throws for names outside F32, F16, BF16, I32, I64, U8.
DType safetensors_dtype_from_name(const std::string& name);

// One .safetensors file, memory-mapped. Cheap to copy (copies share the mapping); thread-safe to read.
class SafeTensors {
 public:
  // Maps and validates the file; throws sav::Error on any problem (see the list above).
  static SafeTensors open(const std::string& path);

  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const;
  size_t size() const;                      // number of tensors
  Shape shape(const std::string& name) const;
  DType dtype(const std::string& name) const;  // as stored
  size_t nbytes(const std::string& name) const;
  // Always an f32 CPU tensor: a zero-copy view for aligned F32 data, else a converted copy
  // (F16 / BF16 exactly; I32 / I64 / U8 as static_cast<float>, exact up to 2^24).
  Tensor get(const std::string& name) const;
  // The stored dtype, unconverted: a zero-copy view when aligned, else a copy.
  Tensor get_raw(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const;  // the "__metadata__" object
  std::string path() const;

 private:
  struct Impl;
  explicit SafeTensors(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

// Writes `tensors` (CPU tensors of any supported dtype, stored as they are held) in the given order,
// with `metadata` as "__metadata__" (omitted when empty). The header is padded with spaces to a multiple
// of 8 bytes, so the data region starts 8-byte aligned in the file. Names must be unique, non-empty and
// not "__metadata__". The file is replaced atomically (AtomicFile): after a failure or a crash `path`
// holds its previous content.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// A checkpoint made of one or several safetensors files.
class Checkpoint {
 public:
  // `path` is one of:
  //  - a .safetensors file;
  //  - an index file (name ending in ".json", e.g. model.safetensors.index.json) whose "weight_map"
  //    maps every tensor name to its shard file, relative to the index's folder. Every shard must exist,
  //    every tensor must be in the shard the map names, and every tensor of every shard must be mapped;
  //  - a folder holding model.safetensors (preferred) or model.safetensors.index.json.
  // A name present in two shards is an error.
  static Checkpoint open(const std::string& path);

  std::vector<std::string> names() const;  // sorted, over all shards
  bool contains(const std::string& name) const;
  size_t size() const;
  Shape shape(const std::string& name) const;
  DType dtype(const std::string& name) const;
  Tensor get(const std::string& name) const;      // as SafeTensors::get
  Tensor get_raw(const std::string& name) const;  // as SafeTensors::get_raw
  // Single file: its "__metadata__". Sharded: the index's "metadata" object (non-string values are
  // written as JSON text, e.g. total_size "123"); each shard's own metadata is in shards().
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::string path() const { return path_; }  // the file or index actually opened
  const std::vector<SafeTensors>& shards() const { return shards_; }
  const SafeTensors& shard_of(const std::string& name) const;

 private:
  Checkpoint() = default;
  std::string path_;
  std::vector<SafeTensors> shards_;
  std::map<std::string, size_t> where_;  // tensor name -> index in shards_
  std::map<std::string, std::string> metadata_;
};

}  // namespace sav
