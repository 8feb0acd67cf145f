// shiftaddvit fuzz targets: the entry functions. See targets.h.
//
// Compiled twice: into each libFuzzer binary by fuzz/build.sh (clang, sanitizers), and into the main
// test binary through tests/test_fuzz_replay.cpp, which #includes this file (g++, no libFuzzer).
#include "targets.h"

#include <stdlib.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>

#include "../tools/cli_checks.h"
#include "core/error.h"
#include "core/parse.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "io/dataset.h"
#include "io/image.h"
#include "io/safetensors.h"

namespace sav::fuzz {

namespace fs = std::filesystem;

namespace {

#define FUZZ_REQUIRE(cond, msg)                                                                        \
  do {                                                                                                 \
    if (!(cond)) {                                                                                     \
      std::ostringstream fuzz_os_;                                                                     \
      fuzz_os_ << "fuzz invariant failed: " #cond ": " << msg << " (" << __FILE__ << ":" << __LINE__ << ")"; \
      throw ::sav::fuzz::InvariantError(fuzz_os_.str());                                               \
    }                                                                                                  \
  } while (0)

// Keeps reads of every byte from being optimised away (so ASan checks them all).
volatile uint64_t g_sink = 0;

void touch(const void* p, size_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  uint64_t h = 0;
  for (size_t i = 0; i < n; ++i) h = h * 131 + b[i];
  g_sink = g_sink + h;
}

struct Scratch {
  std::string dir;
  ~Scratch() {
    std::error_code ec;
    if (!dir.empty()) fs::remove_all(dir, ec);
  }
};

void write_file(const std::string& path, std::string_view bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (f) f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  f.close();
  if (!f) throw std::runtime_error("fuzz harness: cannot write '" + path + "'");
}

void remove_file(const std::string& path) {
  std::error_code ec;
  fs::remove(path, ec);
}

// Asserts that calling f throws sav::Error (a lookup of a name that is not there, say).
template <class F>
void require_error(F&& f, const char* what) {
  bool threw = false;
  try {
    f();
  } catch (const sav::Error&) {
    threw = true;
  }
  FUZZ_REQUIRE(threw, what << " did not throw sav::Error");
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// The f32 value get() must give for element i of a raw tensor.
float expected_f32(const Tensor& raw, int64_t i) {
  switch (raw.dtype()) {
    case DType::f32: return raw.as<float>()[i];
    case DType::f16: return half_to_float(raw.as<uint16_t>()[i]);
    case DType::bf16: return bf16_to_float(raw.as<uint16_t>()[i]);
    case DType::i32: return static_cast<float>(raw.as<int32_t>()[i]);
    case DType::i64: return static_cast<float>(raw.as<int64_t>()[i]);
    case DType::u8: return static_cast<float>(raw.as<uint8_t>()[i]);
    default: break;
  }
  FUZZ_REQUIRE(false, "unexpected dtype " << dtype_name(raw.dtype()));
  return 0;
}

// Everything a reader of one safetensors file can ask, with the answers cross-checked.
void check_safetensors(const SafeTensors& st) {
  const std::vector<std::string> names = st.names();
  FUZZ_REQUIRE(names.size() == st.size(), names.size() << " names, size() " << st.size());
  FUZZ_REQUIRE(std::adjacent_find(names.begin(), names.end(), std::greater_equal<>()) == names.end(),
               "names() not sorted and unique");
  for (const std::string& name : names) {
    FUZZ_REQUIRE(st.contains(name), "contains('" << name << "') is false");
    FUZZ_REQUIRE(name != "__metadata__", "__metadata__ listed as a tensor");
    const Shape shape = st.shape(name);
    const DType dtype = st.dtype(name);
    for (int64_t d : shape) FUZZ_REQUIRE(d >= 0, "negative dimension in " << shape_str(shape));
    const int64_t numel = shape_numel(shape);
    FUZZ_REQUIRE(numel >= 0, "numel " << numel);
    FUZZ_REQUIRE(st.nbytes(name) == static_cast<size_t>(numel) * dtype_size(dtype),
                 "nbytes " << st.nbytes(name) << " for " << shape_str(shape) << " " << dtype_name(dtype));
    const Tensor raw = st.get_raw(name);
    FUZZ_REQUIRE(raw.dtype() == dtype && raw.shape() == shape && raw.nbytes() == st.nbytes(name),
                 "get_raw('" << name << "') disagrees with dtype()/shape()/nbytes()");
    if (raw.nbytes() > 0) touch(raw.data(), raw.nbytes());
    const Tensor f = st.get(name);
    FUZZ_REQUIRE(f.dtype() == DType::f32 && f.shape() == shape, "get('" << name << "') is not f32 of its shape");
    const float* pf = f.numel() > 0 ? f.f32() : nullptr;
    for (int64_t i = 0; i < numel; ++i)
      FUZZ_REQUIRE(same_bits(pf[i], expected_f32(raw, i)), "get('" << name << "')[" << i << "] = " << pf[i]);
  }
  for (const auto& [k, v] : st.metadata()) touch(v.data(), v.size());
  require_error([&] { st.get("\x01 not a tensor"); }, "SafeTensors::get of a missing name");
}

// Writes every tensor back with save_safetensors and reads it again: same names, dtypes, shapes, bytes.
void check_round_trip(const SafeTensors& st) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const std::string& name : st.names()) {
    if (name.empty()) return;  // the reader takes "" as a name, the writer refuses it (documented)
    tensors.emplace_back(name, st.get_raw(name));
  }
  const std::string path = fuzz_scratch_dir() + "/round_trip.safetensors";
  save_safetensors(path, tensors, st.metadata());
  const SafeTensors back = SafeTensors::open(path);
  FUZZ_REQUIRE(back.names() == st.names(), "round trip changed the names");
  FUZZ_REQUIRE(back.metadata() == st.metadata(), "round trip changed the metadata");
  for (const auto& [name, t] : tensors) {
    const Tensor u = back.get_raw(name);
    FUZZ_REQUIRE(u.dtype() == t.dtype() && u.shape() == t.shape(), "round trip changed '" << name << "'");
    FUZZ_REQUIRE(t.nbytes() == 0 || std::memcmp(u.data(), t.data(), t.nbytes()) == 0,
                 "round trip changed the bytes of '" << name << "'");
  }
}

void check_checkpoint(const Checkpoint& ck) {
  const std::vector<std::string> names = ck.names();
  FUZZ_REQUIRE(names.size() == ck.size(), names.size() << " names, size() " << ck.size());
  FUZZ_REQUIRE(std::adjacent_find(names.begin(), names.end(), std::greater_equal<>()) == names.end(),
               "names() not sorted and unique");
  size_t in_shards = 0;
  for (const SafeTensors& s : ck.shards()) {
    check_safetensors(s);
    in_shards += s.size();
  }
  FUZZ_REQUIRE(in_shards == names.size(), "shards hold " << in_shards << " tensors, names() " << names.size());
  for (const std::string& name : names) {
    FUZZ_REQUIRE(ck.contains(name), "contains('" << name << "') is false");
    const SafeTensors& s = ck.shard_of(name);
    FUZZ_REQUIRE(s.contains(name), "shard_of('" << name << "') does not hold it");
    FUZZ_REQUIRE(ck.shape(name) == s.shape(name) && ck.dtype(name) == s.dtype(name), "'" << name << "' differs");
    const Tensor t = ck.get(name);
    FUZZ_REQUIRE(t.dtype() == DType::f32 && t.shape() == s.shape(name), "get('" << name << "')");
    if (t.nbytes() > 0) touch(t.data(), t.nbytes());
    FUZZ_REQUIRE(ck.get_raw(name).dtype() == s.dtype(name), "get_raw('" << name << "')");
  }
  for (const auto& [k, v] : ck.metadata()) touch(v.data(), v.size());
  require_error([&] { ck.get("\x01 not a tensor"); }, "Checkpoint::get of a missing name");
}

void check_dataset(const Dataset& ds, uint64_t seed) {
  FUZZ_REQUIRE(ds.n >= 1 && ds.channels == 1 && ds.height >= 1 && ds.width >= 1,
               "n " << ds.n << ", shape (" << ds.channels << ", " << ds.height << ", " << ds.width << ")");
  FUZZ_REQUIRE(ds.pixels.size() == size_t(ds.n) * ds.image_size(), "pixels " << ds.pixels.size());
  FUZZ_REQUIRE(ds.labels.size() == size_t(ds.n), "labels " << ds.labels.size());
  FUZZ_REQUIRE(ds.num_classes >= 1 && ds.num_classes <= 256, "num_classes " << ds.num_classes);
  FUZZ_REQUIRE(ds.class_names.size() == size_t(ds.num_classes), "class_names " << ds.class_names.size());
  for (int y : ds.labels) FUZZ_REQUIRE(y >= 0 && y < ds.num_classes, "label " << y);
  const Image last = dataset_image(ds, ds.n - 1);
  FUZZ_REQUIRE(std::equal(last.data.begin(), last.data.end(), ds.image(ds.n - 1)), "dataset_image differs");
  require_error([&] { dataset_image(ds, ds.n); }, "dataset_image past the end");

  // A batch of (up to) 3 images, plain and augmented.
  const int idx[3] = {0, ds.n - 1, ds.n / 2};
  const int B = std::min(ds.n, 3);
  const size_t per = ds.image_size();
  const Normalize norm = Normalize::fashion_mnist();
  std::vector<float> x(per * B);
  std::vector<int> y(B);
  make_batch(ds, idx, B, norm, Augment{}, nullptr, x.data(), y.data());
  for (int b = 0; b < B; ++b) {
    FUZZ_REQUIRE(y[b] == ds.labels[idx[b]], "batch label");
    const uint8_t* src = ds.image(idx[b]);
    for (size_t i = 0; i < per; ++i) {
      const float want = (src[i] / 255.0f - norm.mean[0]) / norm.std[0];
      FUZZ_REQUIRE(std::fabs(x[per * b + i] - want) <= 1e-5f, "batch value " << x[per * b + i] << " vs " << want);
    }
  }
  Rng rng(seed);
  make_batch(ds, idx, B, norm, Augment{.pad_crop = 2, .hflip = true}, &rng, x.data(), y.data());
  const float lo = -norm.mean[0] / norm.std[0] - 1e-5f, hi = (1 - norm.mean[0]) / norm.std[0] + 1e-5f;
  for (float v : x) FUZZ_REQUIRE(v >= lo && v <= hi, "augmented value " << v << " outside [" << lo << ", " << hi << "]");
}

// Shorter side -> s as resize_shorter_side computes it, in 64 bits (to skip outputs over the limit).
void shorter_side_dims(const Image& im, int s, int64_t* h, int64_t* w) {
  if (im.height <= im.width) {
    *h = s;
    *w = int64_t(s) * im.width / im.height;
  } else {
    *w = s;
    *h = int64_t(s) * im.height / im.width;
  }
}

void check_image(const Image& im, int channels, uint8_t b0) {
  FUZZ_REQUIRE(im.channels == channels && im.height >= 1 && im.width >= 1,
               "decoded (" << im.channels << ", " << im.height << ", " << im.width << ")");
  FUZZ_REQUIRE(im.data.size() == size_t(channels) * im.height * im.width, "data " << im.data.size());

  const int s = 1 + b0 % 48;
  int64_t rh, rw;
  shorter_side_dims(im, s, &rh, &rw);
  if (rh * rw > kMaxImagePixels) {  // a thin strip (K5 in fuzz/README.md): refused, not wrapped around
    require_error([&] { resize_shorter_side(im, s); }, "resize_shorter_side past kMaxImagePixels");
    return;
  }
  if (rh * rw > k_fuzz_max_resize_pixels) return;  // valid but slow: keep the fuzzer fast
  const Image r = resize_shorter_side(im, s);
  FUZZ_REQUIRE(r.channels == channels && r.height == rh && r.width == rw,
               "resize_shorter_side(" << s << ") gave " << r.height << " x " << r.width << ", expected " << rh
                                      << " x " << rw);
  FUZZ_REQUIRE(r.data.size() == size_t(channels) * r.height * r.width, "resized data " << r.data.size());

  const int ch = 1 + 3 * (b0 >> 4), cw = 1 + (b0 >> 2) % 37;
  const Image c = center_crop(r, ch, cw);
  FUZZ_REQUIRE(c.channels == channels && c.height == ch && c.width == cw, "center_crop shape");
  const int top = static_cast<int>(std::nearbyint((r.height - ch) / 2.0));
  const int left = static_cast<int>(std::nearbyint((r.width - cw) / 2.0));
  for (int k = 0; k < channels; ++k)
    for (int y : {0, ch - 1})
      for (int x : {0, cw - 1}) {
        const int sy = y + top, sx = x + left;
        const int want = (sy >= 0 && sy < r.height && sx >= 0 && sx < r.width) ? r.at(k, sy, sx) : 0;
        FUZZ_REQUIRE(c.at(k, y, x) == want, "center_crop pixel (" << k << ", " << y << ", " << x << ")");
      }

  // Fast vs reference resize on small images: the header promises at most 1 level of difference.
  if (int64_t(im.height) * im.width <= 1024) {
    const int oh = 1 + b0 % 13, ow = 1 + (b0 >> 3) % 17;
    const Image fast = resize_bilinear(im, oh, ow), ref = resize_bilinear_ref(im, oh, ow);
    FUZZ_REQUIRE(fast.data.size() == ref.data.size(), "resize fast/ref sizes");
    for (size_t i = 0; i < fast.data.size(); ++i)
      FUZZ_REQUIRE(std::abs(int(fast.data[i]) - int(ref.data[i])) <= 1,
                   "resize_bilinear " << int(fast.data[i]) << " vs resize_bilinear_ref " << int(ref.data[i])
                                      << " at " << i << " (" << im.height << "x" << im.width << " -> " << oh << "x"
                                      << ow << ")");
  }
}

// The CLI11 definitions of tools/shiftaddvit.cpp's value options (a subset, same types and checks).
struct CliValues {
  int threads = 0;
  int epochs = 1, batch = 128, pad_crop = 0, iters = 10, warmup = 2, hash_bits = 8;
  float lr = 1e-3f, lb_coef = 0.01f;
  uint64_t seed = 0;
  int64_t train_limit = 0;
  bool hflip = false, bench_train = false;
  std::string data_format = "auto", bench_batches = "1,64", alpha = "1,1", gate = "st";
};

void run_cli(const std::vector<std::string>& args) {
  CliValues v;
  CLI::App app{"fuzz"};
  app.require_subcommand(1);
  app.add_option("--threads", v.threads);
  auto* train = app.add_subcommand("train");
  train->add_option("--epochs", v.epochs)->check(cli_positive_int());
  train->add_option("--batch", v.batch)->check(cli_positive_int());
  train->add_option("--lr", v.lr)->check(cli_float(FloatRule::positive));
  train->add_option("--seed", v.seed);
  train->add_option("--pad-crop", v.pad_crop);
  train->add_option("--train-limit", v.train_limit);
  train->add_flag("--hflip", v.hflip);
  train->add_option("--data-format", v.data_format)->check(CLI::IsMember({"auto", "fmnist", "folder"}));
  auto* bench = app.add_subcommand("bench");
  bench->add_option("--batch", v.bench_batches)->check(cli_int_list());
  bench->add_option("--iters", v.iters)->check(cli_positive_int());
  bench->add_option("--warmup", v.warmup);
  bench->add_flag("--train", v.bench_train);
  auto* convert = app.add_subcommand("convert");
  convert->add_option("--alpha", v.alpha);
  convert->add_option("--hash-bits", v.hash_bits);
  convert->add_option("--gate", v.gate)->check(CLI::IsMember({"st", "prob"}));
  convert->add_option("--lb-coef", v.lb_coef)->check(cli_float(FloatRule::non_negative));

  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  try {
    app.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const CLI::ParseError&) {
    return;  // what the CLI prints as "error: ..." (or --help)
  }
  if (*train) {
    FUZZ_REQUIRE(v.epochs > 0 && v.batch > 0, "train --epochs " << v.epochs << " --batch " << v.batch);
    FUZZ_REQUIRE(std::isfinite(v.lr) && v.lr > 0, "train --lr " << v.lr);
  }
  if (*bench) {
    FUZZ_REQUIRE(v.iters > 0, "bench --iters " << v.iters);
    try {
      for (int b : parse_int_list(v.bench_batches, "--batch")) FUZZ_REQUIRE(b > 0, "bench --batch " << b);
    } catch (const sav::Error&) {
    }
  }
  if (*convert) {
    try {
      const auto a = parse_alpha(v.alpha);
      FUZZ_REQUIRE(std::isfinite(a[0]) && std::isfinite(a[1]) && a[0] > 0 && a[1] > 0, "convert --alpha");
    } catch (const sav::Error&) {
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------ helpers

const std::string& fuzz_scratch_dir() {
  static Scratch s = [] {
    std::string base;
    if (const char* t = std::getenv("TMPDIR"); t && *t) base = t;
    else if (::access("/dev/shm", W_OK) == 0) base = "/dev/shm";
    else base = "/tmp";
    std::string templ = base + "/sav_fuzz_XXXXXX";
    if (!::mkdtemp(templ.data())) throw std::runtime_error("fuzz harness: mkdtemp in '" + base + "' failed");
    return Scratch{templ};
  }();
  return s.dir;
}

std::vector<std::string_view> fuzz_split(const uint8_t* data, size_t size, size_t max_parts) {
  std::string_view all(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> parts;
  while (parts.size() + 1 < max_parts) {
    const size_t at = all.find(k_fuzz_split);
    if (at == std::string_view::npos) break;
    parts.push_back(all.substr(0, at));
    all.remove_prefix(at + k_fuzz_split.size());
  }
  parts.push_back(all);
  return parts;
}

const std::vector<FuzzTarget>& fuzz_targets() {
  static const std::vector<FuzzTarget> targets = {{"safetensors", fuzz_safetensors_one},
                                                  {"checkpoint_index", fuzz_checkpoint_index_one},
                                                  {"idx", fuzz_idx_one},
                                                  {"image", fuzz_image_one},
                                                  {"cli_values", fuzz_cli_values_one}};
  return targets;
}

// ------------------------------------------------------------------------------------------------ targets

int fuzz_safetensors_one(const uint8_t* data, size_t size) {
  const std::string path = fuzz_scratch_dir() + "/t.safetensors";
  write_file(path, std::string_view(reinterpret_cast<const char*>(data), size));
  try {
    const SafeTensors st = SafeTensors::open(path);
    check_safetensors(st);
    const Checkpoint ck = Checkpoint::open(path);
    FUZZ_REQUIRE(ck.names() == st.names(), "Checkpoint of a single file lists other names");
    check_round_trip(st);
  } catch (const sav::Error&) {
  }
  return 0;
}

int fuzz_checkpoint_index_one(const uint8_t* data, size_t size) {
  const std::vector<std::string_view> parts = fuzz_split(data, size, 3);
  const std::string dir = fuzz_scratch_dir() + "/ck";
  std::error_code ec;
  fs::create_directories(dir, ec);
  const std::string index = dir + "/model.safetensors.index.json";
  const std::string shard[2] = {dir + "/a.safetensors", dir + "/b.safetensors"};
  write_file(index, parts[0]);
  for (int s = 0; s < 2; ++s) {
    if (parts.size() > size_t(s) + 1) write_file(shard[s], parts[s + 1]);
    else remove_file(shard[s]);
  }
  try {
    const Checkpoint ck = Checkpoint::open(index);
    check_checkpoint(ck);
    const Checkpoint by_folder = Checkpoint::open(dir);  // the folder holds only the index
    FUZZ_REQUIRE(by_folder.names() == ck.names(), "opening the folder lists other names than the index");
  } catch (const sav::Error&) {
  }
  return 0;
}

int fuzz_idx_one(const uint8_t* data, size_t size) {
  const std::vector<std::string_view> parts = fuzz_split(data, size, 2);
  const std::string images = fuzz_scratch_dir() + "/images-idx3-ubyte";
  const std::string labels = fuzz_scratch_dir() + "/labels-idx1-ubyte";
  write_file(images, parts[0]);
  write_file(labels, parts.size() > 1 ? parts[1] : std::string_view());
  try {
    const Dataset ds = load_idx(images, labels);
    check_dataset(ds, size);
  } catch (const sav::Error&) {
  }
  return 0;
}

int fuzz_image_one(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t b0 = data[0];
  const uint8_t* bytes = data + 1;
  const size_t n = size - 1;
  int dims[2][2] = {{-1, -1}, {-1, -1}};
  const int channels[2] = {1, 3};
  for (int k = 0; k < 2; ++k) {
    try {
      const Image im = decode_image(bytes, n, channels[k], "fuzz input", k_fuzz_max_decode_pixels);
      dims[k][0] = im.height;
      dims[k][1] = im.width;
      check_image(im, channels[k], b0);
    } catch (const sav::Error&) {
    }
  }
  if (dims[0][0] >= 0 && dims[1][0] >= 0)
    FUZZ_REQUIRE(dims[0][0] == dims[1][0] && dims[0][1] == dims[1][1],
                 "1-channel decode " << dims[0][0] << "x" << dims[0][1] << ", 3-channel " << dims[1][0] << "x"
                                     << dims[1][1]);
  return 0;
}

int fuzz_cli_values_one(const uint8_t* data, size_t size) {
  const std::string s(reinterpret_cast<const char*>(data), size);
  // An argv: the program name, then the input's lines (at most 64).
  std::vector<std::string> args = {"shiftaddvit"};
  size_t start = 0;
  while (start <= s.size() && args.size() < 65) {
    size_t end = s.find('\n', start);
    if (end == std::string::npos) end = s.size();
    args.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  run_cli(args);
  try {
    const std::vector<int> v = parse_int_list(s, "--batch");
    FUZZ_REQUIRE(!v.empty(), "parse_int_list gave an empty list");
    for (int x : v) FUZZ_REQUIRE(x > 0, "parse_int_list gave " << x);
  } catch (const sav::Error&) {
  }
  try {
    const std::array<float, 2> a = parse_alpha(s);
    FUZZ_REQUIRE(std::isfinite(a[0]) && std::isfinite(a[1]) && a[0] > 0 && a[1] > 0,
                 "parse_alpha gave " << a[0] << ", " << a[1]);
  } catch (const sav::Error&) {
  }
  return 0;
}

}  // namespace sav::fuzz
