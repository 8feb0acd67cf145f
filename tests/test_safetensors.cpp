// Tests of src/io/safetensors.h and src/io/atomic_file.h: round trips of every dtype, sharded
// checkpoints, one test per validation error (bad bytes crafted here), truncation and byte-flip fuzzing,
// the seed corpus in tests/data/safetensors/, and atomic replacement (a failed or killed writer leaves
// the previous file intact).
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"

#ifndef SAV_TEST_DATA
#define SAV_TEST_DATA "tests"
#endif

namespace fs = std::filesystem;
using sav::Checkpoint;
using sav::DType;
using sav::SafeTensors;
using sav::Shape;
using sav::Tensor;

namespace {

// A fresh folder under /tmp, removed with everything in it at the end of the test.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/sav_safetensors_XXXXXX";
    char* p = ::mkdtemp(tmpl);
    if (!p) throw std::runtime_error("mkdtemp failed");
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    ::chmod(path_.c_str(), 0700);
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// 8-byte little-endian length + header (padded with spaces to a multiple of 8 when `pad`) + data.
std::string st_bytes(std::string header, const std::string& data = "", bool pad = true) {
  if (pad) header.append((8 - header.size() % 8) % 8, ' ');
  uint64_t n = header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

std::string raw_len(uint64_t n) {
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  return out;
}

// Opens `path` expecting sav::Error whose message contains every needle.
void expect_open_error(const std::string& path, const std::vector<std::string>& needles) {
  try {
    SafeTensors st = SafeTensors::open(path);
    ADD_FAILURE() << "opening " << path << " did not throw (it holds " << st.size() << " tensors)";
  } catch (const sav::Error& e) {
    std::string msg = e.what();
    for (const std::string& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "message lacks '" << n << "': " << msg;
  }
}

void expect_checkpoint_error(const std::string& path, const std::vector<std::string>& needles) {
  try {
    Checkpoint ck = Checkpoint::open(path);
    ADD_FAILURE() << "opening checkpoint " << path << " did not throw (" << ck.size() << " tensors)";
  } catch (const sav::Error& e) {
    std::string msg = e.what();
    for (const std::string& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "message lacks '" << n << "': " << msg;
  }
}

Tensor random_tensor(const Shape& shape, DType dt, sav::Rng& rng) {
  Tensor t = Tensor::empty(shape, dt);
  int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    float v = rng.uniform(-100.0f, 100.0f);
    switch (dt) {
      case DType::f32: t.as<float>()[i] = v; break;
      case DType::f16: t.as<uint16_t>()[i] = sav::float_to_half(v); break;
      case DType::bf16: t.as<uint16_t>()[i] = sav::float_to_bf16(v); break;
      case DType::i32: t.as<int32_t>()[i] = static_cast<int32_t>(rng.next_u64()); break;
      case DType::i64: t.as<int64_t>()[i] = static_cast<int64_t>(rng.next_u64()); break;
      case DType::u8: t.as<uint8_t>()[i] = static_cast<uint8_t>(rng.next_u64()); break;
    }
  }
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         (a.nbytes() == 0 || std::memcmp(a.data(), b.data(), a.nbytes()) == 0);
}

// Reads every tensor both ways and touches every byte, so a wrong bound would fault.
double read_everything(const SafeTensors& st) {
  double sum = 0;
  for (const std::string& name : st.names()) {
    Tensor raw = st.get_raw(name);
    const unsigned char* p = static_cast<const unsigned char*>(raw.nbytes() ? raw.data() : nullptr);
    for (size_t i = 0; i < raw.nbytes(); ++i) sum += p[i];
    Tensor f = st.get(name);
    EXPECT_EQ(f.dtype(), DType::f32);
    EXPECT_EQ(f.shape(), st.shape(name));
    for (int64_t i = 0; i < f.numel(); ++i) sum += std::isfinite(f.f32()[i]) ? 1.0 : 0.0;
  }
  return sum;
}

const std::vector<DType> k_all_dtypes = {DType::f32, DType::f16, DType::bf16, DType::i32, DType::i64, DType::u8};

}  // namespace

// ---------------------------------------------------------------- round trips

TEST(SafeTensors, RoundTripEveryDtype) {
  TempDir dir;
  sav::Rng rng(1);
  std::vector<std::pair<std::string, Tensor>> tensors;
  // Odd sizes so later tensors start at offsets that are not multiples of their element size.
  const std::vector<Shape> shapes = {{3, 7}, {13}, {1, 37}, {7, 1, 3}, {5}, {37, 3}};
  for (size_t i = 0; i < k_all_dtypes.size(); ++i)
    tensors.push_back({std::string("t.") + sav::dtype_name(k_all_dtypes[i]), random_tensor(shapes[i], k_all_dtypes[i], rng)});
  const std::string path = dir.file("all.safetensors");
  sav::save_safetensors(path, tensors);

  SafeTensors st = SafeTensors::open(path);
  EXPECT_EQ(st.path(), path);
  std::vector<std::string> names = st.names();
  ASSERT_EQ(names.size(), tensors.size());
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(st.contains(name));
    EXPECT_EQ(st.dtype(name), t.dtype());
    EXPECT_EQ(st.shape(name), t.shape());
    EXPECT_EQ(st.nbytes(name), t.nbytes());
    Tensor raw = st.get_raw(name);
    EXPECT_TRUE(same_bytes(raw, t));  // bit-exact, whatever the dtype
    Tensor f = st.get(name);
    ASSERT_EQ(f.dtype(), DType::f32);
    ASSERT_EQ(f.shape(), t.shape());
    Tensor want = t.to_f32();
    for (int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(f.f32()[i], want.f32()[i]) << "element " << i;
  }
  EXPECT_FALSE(st.contains("t.F64"));
  EXPECT_TRUE(st.metadata().empty());
}

TEST(SafeTensors, HalfAndBfloatConvertToExactFloats) {
  TempDir dir;
  // Bit patterns with known values: 1, -2, 65504 (max), 2^-24 (smallest subnormal), 2^-14 (smallest normal),
  // +inf, -0.
  const std::vector<uint16_t> h = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x0400, 0x7c00, 0x8000};
  const std::vector<float> hv = {1.0f, -2.0f, 65504.0f, std::ldexp(1.0f, -24), std::ldexp(1.0f, -14), INFINITY, -0.0f};
  // bf16: 1, -3, 2^100, 1.0078125 (1 + 2^-7), smallest subnormal 2^-133.
  const std::vector<uint16_t> b = {0x3f80, 0xc040, 0x7180, 0x3f81, 0x0001};
  const std::vector<float> bv = {1.0f, -3.0f, std::ldexp(1.0f, 100), 1.0078125f, std::ldexp(1.0f, -133)};
  Tensor th = Tensor::empty({(int64_t)h.size()}, DType::f16);
  std::memcpy(th.data(), h.data(), h.size() * 2);
  Tensor tb = Tensor::empty({(int64_t)b.size()}, DType::bf16);
  std::memcpy(tb.data(), b.data(), b.size() * 2);
  const std::string path = dir.file("half.safetensors");
  sav::save_safetensors(path, {{"h", th}, {"b", tb}});
  SafeTensors st = SafeTensors::open(path);
  EXPECT_EQ(st.dtype("h"), DType::f16);
  EXPECT_EQ(st.dtype("b"), DType::bf16);
  Tensor fh = st.get("h"), fb = st.get("b");
  for (size_t i = 0; i < hv.size(); ++i) {
    EXPECT_EQ(fh.f32()[i], hv[i]) << "f16 element " << i;
    EXPECT_EQ(std::signbit(fh.f32()[i]), std::signbit(hv[i])) << "f16 element " << i;
  }
  for (size_t i = 0; i < bv.size(); ++i) EXPECT_EQ(fb.f32()[i], bv[i]) << "bf16 element " << i;
}

TEST(SafeTensors, MetadataKept) {
  TempDir dir;
  const std::map<std::string, std::string> meta = {
      {"format", "pt"}, {"arch", "deit_tiny_patch16_224"}, {"step", "1200"}, {"note", "quotes \" and \\ and ünïcode"}};
  const std::string path = dir.file("meta.safetensors");
  sav::save_safetensors(path, {{"w", Tensor::from_vector({1, 2, 3}, {3})}}, meta);
  SafeTensors st = SafeTensors::open(path);
  EXPECT_EQ(st.metadata(), meta);
  EXPECT_EQ(st.names(), std::vector<std::string>{"w"});
  // No metadata: no "__metadata__" key in the header.
  sav::save_safetensors(path, {{"w", Tensor::from_vector({1, 2, 3}, {3})}});
  EXPECT_EQ(read_file(path).find("__metadata__"), std::string::npos);
  EXPECT_TRUE(SafeTensors::open(path).metadata().empty());
}

TEST(SafeTensors, ZeroSizedScalarAndEmptyFile) {
  TempDir dir;
  Tensor scalar = Tensor::from_vector({2.5f}, {});
  const std::string path = dir.file("zero.safetensors");
  sav::save_safetensors(path, {{"a", Tensor::from_vector({1, 2}, {2})},
                               {"empty", Tensor::empty({0, 3})},
                               {"empty_i64", Tensor::empty({4, 0}, DType::i64)},
                               {"scalar", scalar}});
  SafeTensors st = SafeTensors::open(path);
  EXPECT_EQ(st.shape("empty"), (Shape{0, 3}));
  EXPECT_EQ(st.get("empty").numel(), 0);
  EXPECT_EQ(st.get_raw("empty_i64").dtype(), DType::i64);
  EXPECT_EQ(st.get_raw("empty_i64").shape(), (Shape{4, 0}));
  EXPECT_EQ(st.shape("scalar"), Shape{});
  EXPECT_EQ(st.get("scalar").f32()[0], 2.5f);
  EXPECT_EQ(st.get("a").to_vector(), (std::vector<float>{1, 2}));

  // A checkpoint with no tensors at all.
  sav::save_safetensors(path, {});
  EXPECT_EQ(SafeTensors::open(path).size(), 0u);
}

TEST(SafeTensors, HeaderPaddedToMultipleOf8AndOffsetsInGivenOrder) {
  TempDir dir;
  sav::Rng rng(2);
  for (int len = 1; len <= 9; ++len) {  // name lengths move the header length through every residue mod 8
    const std::string path = dir.file("pad.safetensors");
    std::string name(len, 'x');
    sav::save_safetensors(path, {{name, random_tensor({3}, DType::u8, rng)}, {"a", random_tensor({2}, DType::f32, rng)}});
    std::string bytes = read_file(path);
    uint64_t n;
    std::memcpy(&n, bytes.data(), 8);
    EXPECT_EQ(n % 8, 0u) << "header length " << n;
    EXPECT_EQ(bytes.size(), 8 + n + 3 + 8);
    std::string header = bytes.substr(8, n);
    size_t last = header.find_last_not_of(' ');
    EXPECT_EQ(header[last], '}');
    // Given order: name first at offset 0, then "a" (even though "a" sorts first).
    auto j = nlohmann::json::parse(header);
    EXPECT_EQ(j[name]["data_offsets"], nlohmann::json({0, 3}));
    EXPECT_EQ(j["a"]["data_offsets"], nlohmann::json({3, 11}));
    // "a" is misaligned (data offset 3): get() must copy and still read the right values.
    SafeTensors st = SafeTensors::open(path);
    Tensor a = st.get("a");
    EXPECT_EQ(std::memcmp(a.data(), bytes.data() + 8 + n + 3, 8), 0);
  }
}

TEST(SafeTensors, AlignedF32IsZeroCopyViewThatOutlivesReader) {
  TempDir dir;
  const std::string path = dir.file("view.safetensors");
  std::vector<float> v(37);
  for (int i = 0; i < 37; ++i) v[i] = 0.25f * i - 3;
  sav::save_safetensors(path, {{"v", Tensor::from_vector(v, {37})}, {"w", Tensor::from_vector({5, 6}, {2})}});
  Tensor t1, t2;
  {
    SafeTensors st = SafeTensors::open(path);
    t1 = st.get("v");
    t2 = st.get("v");
    // Two views of the same mapping: same address (a copy would have a fresh buffer).
    EXPECT_EQ(t1.data(), t2.data());
    EXPECT_EQ(st.get_raw("v").data(), t1.data());
  }  // the SafeTensors object is gone; the views keep the mapping alive
  EXPECT_EQ(t1.to_vector(), v);
  // Copy-on-write: writing into the view never reaches the file.
  const std::string before = read_file(path);
  t1.f32()[0] = 1234.0f;
  EXPECT_EQ(t2.f32()[0], 1234.0f);  // same process-private pages
  EXPECT_EQ(read_file(path), before);
  EXPECT_EQ(SafeTensors::open(path).get("v").f32()[0], v[0]);
}

TEST(SafeTensors, MissingTensorErrorNamesFileAndNeighbours) {
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  sav::save_safetensors(path, {{"blocks.0.attn.proj.weight", Tensor::zeros({2, 2})},
                               {"blocks.0.attn.qkv.weight", Tensor::zeros({6, 2})}});
  SafeTensors st = SafeTensors::open(path);
  try {
    st.get("blocks.0.attn.q.weight");
    FAIL() << "no error";
  } catch (const sav::Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find(path), std::string::npos) << m;
    EXPECT_NE(m.find("'blocks.0.attn.q.weight'"), std::string::npos) << m;
    EXPECT_NE(m.find("blocks.0.attn.qkv.weight"), std::string::npos) << m;
  }
  EXPECT_THROW(st.shape("nope"), sav::Error);
  EXPECT_THROW(st.dtype("nope"), sav::Error);
  EXPECT_THROW(st.get_raw("nope"), sav::Error);
}

TEST(SafeTensors, WriterRejectsBadInput) {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  Tensor t = Tensor::zeros({2});
  auto expect_save_error = [&](const std::vector<std::pair<std::string, Tensor>>& ts, const std::string& needle) {
    try {
      sav::save_safetensors(path, ts);
      ADD_FAILURE() << "no error, expected '" << needle << "'";
    } catch (const sav::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_FALSE(fs::exists(path));
  };
  expect_save_error({{"a", t}, {"a", t}}, "given twice");
  expect_save_error({{"__metadata__", t}}, "reserved");
  expect_save_error({{"", t}}, "empty name");
  expect_save_error({{"u", Tensor()}}, "undefined");
  expect_save_error({{std::string("bad\xff", 4), t}}, "UTF-8");
  EXPECT_TRUE(fs::is_empty(dir.path()));  // no temporary left behind
  // A missing folder: the error names the path and the system's reason.
  const std::string missing = dir.file("no/such/folder/x.safetensors");
  try {
    sav::save_safetensors(missing, {{"a", t}});
    FAIL() << "no error";
  } catch (const sav::Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find(missing), std::string::npos) << m;
    EXPECT_NE(m.find(std::strerror(ENOENT)), std::string::npos) << m;
  }
}

TEST(SafeTensors, OpenErrorsForMissingPathAndFolder) {
  TempDir dir;
  expect_open_error(dir.file("absent.safetensors"), {"absent.safetensors", std::strerror(ENOENT)});
  expect_open_error(dir.path(), {dir.path(), "folder"});
}

// ---------------------------------------------------------------- validation (crafted bytes)

class SafeTensorsValidation : public ::testing::Test {
 protected:
  // Writes `bytes` to a file and expects open() to fail naming the file and each needle.
  void expect_bad(const std::string& bytes, std::vector<std::string> needles) {
    const std::string path = dir_.file("bad.safetensors");
    write_file(path, bytes);
    needles.push_back(path);
    expect_open_error(path, needles);
  }
  TempDir dir_;
  const std::string eight_ = std::string(8, '\0');
};

TEST_F(SafeTensorsValidation, FileShorterThan8Bytes) {
  for (int n = 0; n < 8; ++n) expect_bad(std::string(n, '\0'), {"too short"});
}

TEST_F(SafeTensorsValidation, HeaderLengthPastEndOfFile) {
  expect_bad(raw_len(17) + std::string(16, ' '), {"header length 17", "larger than the file"});
  expect_bad(raw_len(~uint64_t{0} >> 40) + "{}", {"larger than the file"});
}

TEST_F(SafeTensorsValidation, HeaderLengthOver100MB) {
  expect_bad(raw_len(100'000'001) + "{}      ", {"100000001", "100 MB"});
  expect_bad(raw_len(~uint64_t{0}) + "{}      ", {"100 MB"});
}

TEST_F(SafeTensorsValidation, HeaderNotJson) {
  expect_bad(st_bytes(R"({"w": {"dtype": )"), {"not valid JSON"});
  expect_bad(st_bytes("not json at all"), {"not valid JSON"});
  expect_bad(st_bytes(std::string("{\"w\xff\": 1}")), {"not valid JSON"});  // invalid UTF-8
  expect_bad(st_bytes(std::string("{}\0\0\0\0\0\0", 8), "", false), {"not valid JSON"});  // NUL padding
  expect_bad(st_bytes(std::string("{}\0 \"x\": 1", 11)), {"NUL byte"});
}

TEST_F(SafeTensorsValidation, HeaderNotObject) {
  expect_bad(st_bytes("[1, 2]"), {"must be a JSON object", "array"});
  expect_bad(st_bytes("42"), {"must be a JSON object"});
  expect_bad(st_bytes(R"({"w": [1, 2]})"), {"tensor 'w'", "entry must be a JSON object"});
}

TEST_F(SafeTensorsValidation, EntryLacksField) {
  expect_bad(st_bytes(R"({"w": {"shape": [2], "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "lacks \"dtype\""});
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "lacks \"shape\""});
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [2]}})", eight_), {"tensor 'w'", "lacks \"data_offsets\""});
}

TEST_F(SafeTensorsValidation, FieldOfWrongType) {
  expect_bad(st_bytes(R"({"w": {"dtype": 32, "shape": [2], "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "dtype must be a string"});
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "shape must be a JSON array"});
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}})", eight_), {"tensor 'w'", "data_offsets must be an array"});
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}})", eight_), {"tensor 'w'", "data_offsets[1]"});
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 8]}})", eight_), {"tensor 'w'", "negative"});
}

TEST_F(SafeTensorsValidation, UnknownDtype) {
  expect_bad(st_bytes(R"({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "dtype 'Q4'"});
  expect_bad(st_bytes(R"({"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "dtype 'F64'"});
  expect_bad(st_bytes(R"({"w": {"dtype": "f32", "shape": [2], "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "dtype 'f32'"});
}

TEST_F(SafeTensorsValidation, NegativeShape) {
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "shape[1] = -1 is negative"});
}

TEST_F(SafeTensorsValidation, NonIntegerShape) {
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "shape[0]", "integer"});
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "integer"});
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "integer"});
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [true], "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "integer"});
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [1e30], "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "integer"});
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [9223372036854775808], "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "too large"});
}

TEST_F(SafeTensorsValidation, OffsetsOutOfDataRegion) {
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", std::string(7, '\0')),
             {"tensor 'w'", "out of the data region"});
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [18446744073709551608, 18446744073709551615]}})", eight_),
             {"tensor 'w'"});
}

TEST_F(SafeTensorsValidation, BeginAfterEnd) {
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", eight_), {"tensor 'w'", "begin 8 > end 4"});
}

TEST_F(SafeTensorsValidation, OverlappingTensors) {
  const std::string h =
      R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "U8", "shape": [4], "data_offsets": [12, 16]},
          "c": {"dtype": "I32", "shape": [2], "data_offsets": [4, 12]}})";
  expect_bad(st_bytes(h, std::string(16, '\0')), {"'a' [0, 8)", "'c' [4, 12)", "overlap"});
  // Same range twice.
  expect_bad(st_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", eight_), {"overlap"});
  // Touching ranges and an empty tensor inside another's range are fine.
  const std::string path = dir_.file("ok.safetensors");
  write_file(path, st_bytes(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                                "e": {"dtype": "F32", "shape": [0], "data_offsets": [2, 2]}})", eight_));
  EXPECT_EQ(SafeTensors::open(path).size(), 3u);
}

TEST_F(SafeTensorsValidation, SizeDoesNotMatchShape) {
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", eight_), {"tensor 'w'", "span 8 bytes", "needs 12"});
  expect_bad(st_bytes(R"({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 4]}})", eight_), {"tensor 'w'", "needs 8"});
}

TEST_F(SafeTensorsValidation, NumelOverflow) {
  expect_bad(st_bytes(R"({"w": {"dtype": "U8", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}})", eight_),
             {"tensor 'w'", "numel overflow"});
  // Overflow among the non-zero dimensions is refused even when another dimension is 0.
  expect_bad(st_bytes(R"({"w": {"dtype": "U8", "shape": [4294967296, 0, 4294967296], "data_offsets": [0, 0]}})", eight_),
             {"tensor 'w'", "numel overflow"});
  // numel fits int64 but numel * 8 bytes does not fit 64 bits.
  expect_bad(st_bytes(R"({"w": {"dtype": "I64", "shape": [4611686018427387904], "data_offsets": [0, 8]}})", eight_),
             {"tensor 'w'", "overflows the byte count"});
}

TEST_F(SafeTensorsValidation, DuplicateKeyAndBadMetadata) {
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                          "w": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}})", eight_), {"'w' appears twice"});
  expect_bad(st_bytes(R"({"w": {"dtype": "F32", "dtype": "U8", "shape": [2], "data_offsets": [0, 8]}})", eight_), {"'dtype' appears twice"});
  expect_bad(st_bytes(R"({"__metadata__": {"step": 3}})"), {"__metadata__", "'step'", "must be a string"});
  expect_bad(st_bytes(R"({"__metadata__": ["a"]})"), {"__metadata__ must be a JSON object"});
}

TEST_F(SafeTensorsValidation, AcceptsUnpaddedHeaderAndTrailingBytes) {
  // Neither padding nor a data region ending at the last tensor is required.
  const std::string path = dir_.file("ok.safetensors");
  float v[2] = {1.5f, -2.0f};
  std::string data(reinterpret_cast<const char*>(v), 8);
  write_file(path, st_bytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", data + "junk", false));
  EXPECT_EQ(SafeTensors::open(path).get("w").to_vector(), (std::vector<float>{1.5f, -2.0f}));
}

// ---------------------------------------------------------------- fuzzing

TEST(SafeTensorsFuzz, EveryTruncationThrowsCleanly) {
  TempDir dir;
  sav::Rng rng(3);
  const std::string good = dir.file("good.safetensors");
  sav::save_safetensors(good, {{"a", random_tensor({3, 5}, DType::f32, rng)},
                               {"b", random_tensor({7}, DType::f16, rng)},
                               {"c", random_tensor({2}, DType::i64, rng)}},
                        {{"k", "v"}});
  const std::string bytes = read_file(good);
  ASSERT_GT(bytes.size(), 100u);
  EXPECT_GT(read_everything(SafeTensors::open(good)), 0.0);
  const std::string cut = dir.file("cut.safetensors");
  int thrown = 0;
  for (size_t len = 0; len < bytes.size(); ++len) {
    write_file(cut, bytes.substr(0, len));
    try {
      SafeTensors st = SafeTensors::open(cut);
      ADD_FAILURE() << "a file truncated to " << len << " of " << bytes.size() << " bytes opened";
    } catch (const sav::Error&) {
      ++thrown;
    }
  }
  EXPECT_EQ(thrown, static_cast<int>(bytes.size()));
}

TEST(SafeTensorsFuzz, HeaderByteFlipsThrowOrLoad) {
  TempDir dir;
  sav::Rng rng(4);
  const std::string good = dir.file("good.safetensors");
  sav::save_safetensors(good, {{"w", random_tensor({4, 3}, DType::f32, rng)},
                               {"h", random_tensor({5}, DType::bf16, rng)},
                               {"i", random_tensor({3}, DType::i32, rng)},
                               {"u", random_tensor({9}, DType::u8, rng)},
                               {"z", Tensor::empty({0, 2})}},
                        {{"format", "pt"}});
  const std::string bytes = read_file(good);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  const std::string flipped = dir.file("flipped.safetensors");
  int loaded = 0, refused = 0;
  for (int trial = 0; trial < 400; ++trial) {
    std::string b = bytes;
    int flips = 1 + static_cast<int>(rng.below(3));
    for (int k = 0; k < flips; ++k) {
      size_t pos = static_cast<size_t>(rng.below(8 + n));  // the length field or the header
      // Half the time a random bit, half the time a byte typical of JSON (digits, quotes, brackets).
      static const char k_json_bytes[] = "0123456789-.e\"{}[],: ";
      if (rng.below(2)) b[pos] = static_cast<char>(b[pos] ^ (1 << rng.below(8)));
      else b[pos] = k_json_bytes[rng.below(sizeof(k_json_bytes) - 1)];
    }
    write_file(flipped, b);
    try {
      SafeTensors st = SafeTensors::open(flipped);
      read_everything(st);
      ++loaded;
    } catch (const sav::Error&) {
      ++refused;
    }
  }
  EXPECT_EQ(loaded + refused, 400);
  EXPECT_GT(refused, 0);
  RecordProperty("loaded", loaded);
}

// ---------------------------------------------------------------- seed corpus

TEST(SafeTensorsCorpus, ValidFilesLoadInvalidFilesThrow) {
  const fs::path dir = fs::path(SAV_TEST_DATA) / "data" / "safetensors";
  ASSERT_TRUE(fs::is_directory(dir)) << dir << " (run tests/data/safetensors/make_corpus.py)";
  int valid = 0, invalid = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (entry.path().extension() != ".safetensors") continue;
    SCOPED_TRACE(name);
    if (name.rfind("valid_", 0) == 0) {
      SafeTensors st = SafeTensors::open(entry.path().string());
      read_everything(st);
      ++valid;
    } else if (name.rfind("invalid_", 0) == 0) {
      EXPECT_THROW(SafeTensors::open(entry.path().string()), sav::Error);
      ++invalid;
    }
  }
  EXPECT_GE(valid, 4);
  EXPECT_GE(invalid, 18);

  // Values written by the independent Python writer.
  SafeTensors st = SafeTensors::open((dir / "valid_all_dtypes.safetensors").string());
  EXPECT_EQ(st.names(), (std::vector<std::string>{"a.f32", "b.f16", "c.bf16", "d.i32", "e.i64", "f.u8"}));
  EXPECT_EQ(st.metadata().at("format"), "pt");
  EXPECT_EQ(st.shape("a.f32"), (Shape{2, 3}));
  EXPECT_EQ(st.get("a.f32").to_vector(), (std::vector<float>{-1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f}));
  EXPECT_EQ(st.get("b.f16").to_vector(), (std::vector<float>{1.0f, -2.5f, 65504.0f}));
  EXPECT_EQ(st.get("c.bf16").to_vector(), (std::vector<float>{1.0f, -3.0f}));
  EXPECT_EQ(st.get("d.i32").to_vector(), (std::vector<float>{-1, 2, -3, 4}));
  Tensor i64 = st.get_raw("e.i64");
  ASSERT_EQ(i64.dtype(), DType::i64);
  EXPECT_EQ(i64.as<int64_t>()[0], -(int64_t{1} << 40));
  EXPECT_EQ(i64.as<int64_t>()[1], 7);
  Tensor u8 = st.get_raw("f.u8");
  EXPECT_EQ(u8.as<uint8_t>()[2], 255);
  SafeTensors mis = SafeTensors::open((dir / "valid_unpadded_misaligned.safetensors").string());
  EXPECT_EQ(mis.get("w").to_vector(), (std::vector<float>{1.5f, -0.25f}));
  SafeTensors zero = SafeTensors::open((dir / "valid_zero_sized.safetensors").string());
  EXPECT_EQ(zero.get("scalar").to_vector(), std::vector<float>{3.25f});
}

// ---------------------------------------------------------------- sharded checkpoints

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    a_ = Tensor::from_vector({1, 2, 3, 4}, {2, 2});
    b_ = Tensor::from_vector({5, 6}, {2});
    c_ = Tensor::from_vector({7, 8, 9}, {3});
  }
  // Two shards {a, b} and {c} plus an index; `map` overrides the weight_map.
  std::string write_sharded(const std::string& folder, nlohmann::json map = nullptr) {
    fs::create_directories(folder);
    sav::save_safetensors(folder + "/model-00001-of-00002.safetensors", {{"a", a_}, {"b", b_}}, {{"shard", "1"}});
    sav::save_safetensors(folder + "/model-00002-of-00002.safetensors", {{"c", c_}}, {{"shard", "2"}});
    if (map.is_null())
      map = {{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00001-of-00002.safetensors"},
             {"c", "model-00002-of-00002.safetensors"}};
    nlohmann::json index = {{"metadata", {{"total_size", 36}}}, {"weight_map", map}};
    const std::string path = folder + "/model.safetensors.index.json";
    write_file(path, index.dump(2));
    return path;
  }
  void expect_abc(const Checkpoint& ck) {
    EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b", "c"}));
    EXPECT_EQ(ck.size(), 3u);
    EXPECT_EQ(ck.shape("a"), (Shape{2, 2}));
    EXPECT_EQ(ck.dtype("c"), DType::f32);
    EXPECT_EQ(ck.get("a").to_vector(), a_.to_vector());
    EXPECT_EQ(ck.get("b").to_vector(), b_.to_vector());
    EXPECT_EQ(ck.get_raw("c").to_vector(), c_.to_vector());
    EXPECT_TRUE(ck.contains("c"));
    EXPECT_FALSE(ck.contains("d"));
    EXPECT_THROW(ck.get("d"), sav::Error);
  }
  TempDir dir_;
  Tensor a_, b_, c_;
};

TEST_F(CheckpointTest, ShardedIndexByFileAndByFolder) {
  const std::string index = write_sharded(dir_.file("m"));
  Checkpoint ck = Checkpoint::open(index);
  expect_abc(ck);
  EXPECT_EQ(ck.path(), index);
  EXPECT_EQ(ck.shards().size(), 2u);
  EXPECT_EQ(ck.metadata().at("total_size"), "36");
  EXPECT_EQ(ck.shard_of("c").metadata().at("shard"), "2");
  EXPECT_EQ(ck.shard_of("a").metadata().at("shard"), "1");
  Checkpoint by_folder = Checkpoint::open(dir_.file("m"));
  expect_abc(by_folder);
  EXPECT_EQ(by_folder.path(), index);
}

TEST_F(CheckpointTest, SingleFileByFileAndByFolder) {
  fs::create_directories(dir_.file("s"));
  const std::string file = dir_.file("s/model.safetensors");
  sav::save_safetensors(file, {{"c", c_}, {"a", a_}, {"b", b_}}, {{"format", "pt"}});
  Checkpoint ck = Checkpoint::open(file);
  expect_abc(ck);
  EXPECT_EQ(ck.metadata().at("format"), "pt");
  expect_abc(Checkpoint::open(dir_.file("s")));
  // A folder with both: model.safetensors wins.
  write_sharded(dir_.file("s"));
  EXPECT_EQ(Checkpoint::open(dir_.file("s")).path(), dir_.file("s") + "/model.safetensors");
}

TEST_F(CheckpointTest, FolderWithNeitherFileOrMissingPath) {
  fs::create_directories(dir_.file("empty"));
  expect_checkpoint_error(dir_.file("empty"), {"neither", "model.safetensors.index.json"});
  expect_checkpoint_error(dir_.file("nothing_here"), {"nothing_here", "does not exist"});
}

TEST_F(CheckpointTest, MissingShard) {
  const std::string index = write_sharded(dir_.file("m"));
  fs::remove(dir_.file("m/model-00002-of-00002.safetensors"));
  expect_checkpoint_error(index, {index, "model-00002-of-00002.safetensors", "does not exist"});
}

TEST_F(CheckpointTest, TensorNotInTheShardTheMapNames) {
  nlohmann::json map = {{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00002-of-00002.safetensors"},
                        {"c", "model-00002-of-00002.safetensors"}};
  const std::string index = write_sharded(dir_.file("m"), map);
  expect_checkpoint_error(index, {"'b'", "model-00002-of-00002.safetensors", "does not hold it"});
}

TEST_F(CheckpointTest, MappedTensorMissingEverywhere) {
  nlohmann::json map = {{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00001-of-00002.safetensors"},
                        {"c", "model-00002-of-00002.safetensors"}, {"d", "model-00002-of-00002.safetensors"}};
  expect_checkpoint_error(write_sharded(dir_.file("m"), map), {"'d'", "does not hold it"});
}

TEST_F(CheckpointTest, TensorMissingFromWeightMap) {
  nlohmann::json map = {{"a", "model-00001-of-00002.safetensors"}, {"c", "model-00002-of-00002.safetensors"}};
  expect_checkpoint_error(write_sharded(dir_.file("m"), map), {"'b'", "not in the weight_map"});
}

TEST_F(CheckpointTest, DuplicateNameAcrossShards) {
  const std::string index = write_sharded(dir_.file("m"));
  sav::save_safetensors(dir_.file("m/model-00002-of-00002.safetensors"), {{"c", c_}, {"a", a_}});
  expect_checkpoint_error(index, {"'a'", "two shards"});
}

TEST_F(CheckpointTest, BadIndexFiles) {
  fs::create_directories(dir_.file("m"));
  const std::string index = dir_.file("m/model.safetensors.index.json");
  write_file(index, "{\"weight_map\": ");
  expect_checkpoint_error(index, {index, "not valid JSON"});
  write_file(index, R"({"metadata": {}})");
  expect_checkpoint_error(index, {"weight_map"});
  write_file(index, R"({"weight_map": {}})");
  expect_checkpoint_error(index, {"empty"});
  write_file(index, R"({"weight_map": {"a": 3}})");
  expect_checkpoint_error(index, {"'a'", "file name"});
  write_file(index, R"({"weight_map": {"a": "../outside.safetensors"}})");
  expect_checkpoint_error(index, {"'../outside.safetensors'", "relative"});
  write_file(index, R"({"weight_map": {"a": "/etc/passwd"}})");
  expect_checkpoint_error(index, {"relative"});
  // A shard that exists but is corrupt: the shard's own error comes through.
  write_file(dir_.file("m/s.safetensors"), "tiny");
  write_file(index, R"({"weight_map": {"a": "s.safetensors"}})");
  expect_checkpoint_error(index, {"s.safetensors", "too short"});
}

// ---------------------------------------------------------------- atomic writes

TEST(AtomicFile, CommitReplacesContentAndLeavesNoTemporary) {
  TempDir dir;
  const std::string path = dir.file("f.bin");
  write_file(path, "old content");
  {
    sav::AtomicFile f(path);
    EXPECT_EQ(f.temp_path(), path + ".tmp." + std::to_string(::getpid()));
    EXPECT_TRUE(fs::exists(f.temp_path()));
    f.write("new ", 4);
    f.write("content!", 8);
    EXPECT_EQ(f.bytes_written(), 12u);
    EXPECT_EQ(read_file(path), "old content");  // untouched until commit
    f.commit();
    EXPECT_TRUE(f.committed());
    EXPECT_THROW(f.write("x", 1), sav::Error);
    EXPECT_THROW(f.commit(), sav::Error);
  }
  EXPECT_EQ(read_file(path), "new content!");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator{}), 1);
}

TEST(AtomicFile, DestroyedWithoutCommitKeepsOriginal) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  sav::save_safetensors(path, {{"w", Tensor::from_vector({1, 2, 3}, {3})}}, {{"version", "1"}});
  const std::string v1 = read_file(path);
  std::string temp;
  try {
    sav::AtomicFile f(path);
    temp = f.temp_path();
    std::string junk(4096, 'j');
    f.write(junk.data(), junk.size());
    throw std::runtime_error("simulated failure mid-write");
  } catch (const std::runtime_error&) {
  }
  EXPECT_FALSE(temp.empty());
  EXPECT_FALSE(fs::exists(temp));
  EXPECT_EQ(read_file(path), v1);
  SafeTensors st = SafeTensors::open(path);
  EXPECT_EQ(st.metadata().at("version"), "1");
  EXPECT_EQ(st.get("w").to_vector(), (std::vector<float>{1, 2, 3}));
  // Two writers at once in one process get distinct temporaries.
  sav::AtomicFile f1(path), f2(path);
  EXPECT_NE(f1.temp_path(), f2.temp_path());
  f2.discard();
  EXPECT_FALSE(fs::exists(f2.temp_path()));
}

TEST(AtomicFile, KilledWriterLeavesOriginalIntact) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  sav::save_safetensors(path, {{"w", Tensor::from_vector({4, 5}, {2})}});
  const std::string v1 = read_file(path);
  fflush(nullptr);
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The child starts writing a new version and is killed before commit(). It never returns into
    // GoogleTest: any failure ends it with a status the parent reports.
    ::alarm(20);  // a hung child dies of SIGALRM instead of hanging the test
    try {
      sav::AtomicFile f(path);
      std::string junk(1 << 16, 'k');
      f.write(junk.data(), junk.size());
      ::kill(::getpid(), SIGKILL);
    } catch (...) {
      ::_exit(3);
    }
    ::_exit(4);  // not reached
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with status " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  EXPECT_EQ(WTERMSIG(status), SIGKILL);
  EXPECT_EQ(read_file(path), v1);
  EXPECT_EQ(SafeTensors::open(path).get("w").to_vector(), (std::vector<float>{4, 5}));
  // The killed writer's stale temporary is all that is left; a new writer is not blocked by it.
  const std::string stale = path + ".tmp." + std::to_string(child);
  EXPECT_TRUE(fs::exists(stale));
  sav::save_safetensors(path, {{"w", Tensor::from_vector({6}, {1})}});
  EXPECT_EQ(SafeTensors::open(path).get("w").to_vector(), std::vector<float>{6});
}

TEST(AtomicFile, ErrorsNameThePathAndReason) {
  TempDir dir;
  auto expect_error = [](const std::function<void()>& fn, const std::vector<std::string>& needles) {
    try {
      fn();
      ADD_FAILURE() << "no error";
    } catch (const sav::Error& e) {
      std::string m = e.what();
      for (const std::string& n : needles) EXPECT_NE(m.find(n), std::string::npos) << "lacks '" << n << "': " << m;
    }
  };
  const std::string missing = dir.file("missing/f.bin");
  expect_error([&] { sav::AtomicFile f(missing); }, {missing, std::strerror(ENOENT), "does the folder"});
  write_file(dir.file("plain"), "x");
  const std::string under_file = dir.file("plain/f.bin");
  expect_error([&] { sav::AtomicFile f(under_file); }, {under_file, std::strerror(ENOTDIR)});
  // Renaming over a folder fails at commit(); the temporary is removed.
  fs::create_directories(dir.file("sub"));
  write_file(dir.file("sub/inside"), "x");
  std::string temp;
  expect_error([&] {
    sav::AtomicFile f(dir.file("sub"));
    temp = f.temp_path();
    f.write("abc", 3);
    f.commit();
  }, {dir.file("sub"), "cannot replace"});
  EXPECT_FALSE(fs::exists(temp));
  EXPECT_TRUE(fs::is_directory(dir.file("sub")));
}

TEST(AtomicFile, UnwritableFolderIsEacces) {
  if (::geteuid() == 0) GTEST_SKIP() << "running as root: permission checks (EACCES) do not apply";
  TempDir dir;
  fs::create_directories(dir.file("ro"));
  ::chmod(dir.file("ro").c_str(), 0555);
  const std::string ro = dir.file("ro/f.bin");
  try {
    sav::AtomicFile f(ro);
    FAIL() << "no error";
  } catch (const sav::Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find(ro), std::string::npos) << m;
    EXPECT_NE(m.find(std::strerror(EACCES)), std::string::npos) << m;
    EXPECT_NE(m.find("writable"), std::string::npos) << m;
  }
}
