// Tests for src/io/dataset.{h,cpp} and src/io/image.{h,cpp}: IDX reading (gzip and plain) and every error
// path, Fashion-MNIST (when installed), images (PNG round trip, resize fast vs reference, antialiasing,
// centre crop), the ImageNet-style folder reader, and make_batch (normalisation, augmentation).
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "io/dataset.h"
#include "io/image.h"

namespace fs = std::filesystem;
using sav::Dataset;
using sav::Image;

namespace {

// A fresh temporary folder, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("sav_test_dataset_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

void put_be32(std::vector<uint8_t>& v, uint32_t x) {
  v.push_back(uint8_t(x >> 24));
  v.push_back(uint8_t(x >> 16));
  v.push_back(uint8_t(x >> 8));
  v.push_back(uint8_t(x));
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes, bool gz) {
  if (gz) {
    gzFile f = gzopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr) << path;
    if (!bytes.empty()) {
      ASSERT_EQ(gzwrite(f, bytes.data(), unsigned(bytes.size())), int(bytes.size()));
    }
    ASSERT_EQ(gzclose(f), Z_OK);
  } else {
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    ASSERT_TRUE(bool(f)) << path;
  }
}

std::vector<uint8_t> idx_images(uint32_t magic, uint32_t n, uint32_t rows, uint32_t cols, const std::vector<uint8_t>& px) {
  std::vector<uint8_t> v;
  put_be32(v, magic);
  put_be32(v, n);
  put_be32(v, rows);
  put_be32(v, cols);
  v.insert(v.end(), px.begin(), px.end());
  return v;
}

std::vector<uint8_t> idx_labels(uint32_t magic, uint32_t n, const std::vector<uint8_t>& labels) {
  std::vector<uint8_t> v;
  put_be32(v, magic);
  put_be32(v, n);
  v.insert(v.end(), labels.begin(), labels.end());
  return v;
}

std::vector<uint8_t> random_bytes(size_t n, uint64_t seed, int mod = 256) {
  sav::Rng rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = uint8_t(rng.below(mod));
  return v;
}

// The message of the sav::Error that f throws (fails the test if it throws nothing or something else).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const sav::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected sav::Error, got std::exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected sav::Error, nothing was thrown";
  return "";
}

#define EXPECT_HAS(msg, part) EXPECT_NE((msg).find(part), std::string::npos) << "message: " << (msg)

Image random_image(int c, int h, int w, uint64_t seed) {
  Image im(c, h, w);
  im.data = random_bytes(im.data.size(), seed);
  return im;
}

// A small in-memory data set with random pixels.
Dataset random_dataset(int n, int c, int h, int w, int classes, uint64_t seed) {
  Dataset ds;
  ds.n = n;
  ds.channels = c;
  ds.height = h;
  ds.width = w;
  ds.num_classes = classes;
  ds.pixels = random_bytes(size_t(n) * c * h * w, seed);
  for (int i = 0; i < n; ++i) ds.labels.push_back(i % classes);
  ds.source = "random";
  return ds;
}

}  // namespace

// ------------------------------------------------------------------------------------------------ IDX

TEST(Dataset, IdxGzipAndPlainRoundTrip) {
  TempDir tmp;
  const int n = 7, rows = 5, cols = 3;
  const auto px = random_bytes(n * rows * cols, 1);
  const auto lb = random_bytes(n, 2, 4);
  for (bool gz : {true, false}) {
    const std::string ip = tmp / (gz ? "im.gz" : "im"), lp = tmp / (gz ? "lb.gz" : "lb");
    write_bytes(ip, idx_images(0x803, n, rows, cols, px), gz);
    write_bytes(lp, idx_labels(0x801, n, lb), gz);
    const Dataset ds = sav::load_idx(ip, lp);
    EXPECT_EQ(ds.n, n);
    EXPECT_EQ(ds.channels, 1);
    EXPECT_EQ(ds.height, rows);
    EXPECT_EQ(ds.width, cols);
    EXPECT_EQ(ds.pixels, px);
    ASSERT_EQ(ds.labels.size(), size_t(n));
    for (int i = 0; i < n; ++i) EXPECT_EQ(ds.labels[i], lb[i]);
    EXPECT_EQ(ds.num_classes, *std::max_element(lb.begin(), lb.end()) + 1);
    EXPECT_EQ(int(ds.class_names.size()), ds.num_classes);
  }
}

TEST(Dataset, IdxBadMagic) {
  TempDir tmp;
  const auto px = random_bytes(4 * 9, 3);
  write_bytes(tmp / "lb.gz", idx_labels(0x801, 4, {0, 1, 2, 3}), true);
  // Label file passed as images: a hint that the paths are swapped.
  std::string msg = error_of([&] { sav::load_idx(tmp / "lb.gz", tmp / "lb.gz"); });
  EXPECT_HAS(msg, tmp / "lb.gz");
  EXPECT_HAS(msg, "0x00000801");
  EXPECT_HAS(msg, "swapped");
  // Garbage magic.
  write_bytes(tmp / "im.gz", idx_images(0x12345678, 4, 3, 3, px), true);
  msg = error_of([&] { sav::load_idx(tmp / "im.gz", tmp / "lb.gz"); });
  EXPECT_HAS(msg, tmp / "im.gz");
  EXPECT_HAS(msg, "0x12345678");
  EXPECT_HAS(msg, "0x00000803");
  // Bad label magic.
  write_bytes(tmp / "im.gz", idx_images(0x803, 4, 3, 3, px), true);
  write_bytes(tmp / "lb2.gz", idx_labels(0x802, 4, {0, 1, 2, 3}), true);
  msg = error_of([&] { sav::load_idx(tmp / "im.gz", tmp / "lb2.gz"); });
  EXPECT_HAS(msg, tmp / "lb2.gz");
  EXPECT_HAS(msg, "0x00000802");
  // Bad dims.
  write_bytes(tmp / "im0.gz", idx_images(0x803, 4, 0, 3, px), true);
  msg = error_of([&] { sav::load_idx(tmp / "im0.gz", tmp / "lb.gz"); });
  EXPECT_HAS(msg, "0 x 3");
}

TEST(Dataset, IdxTruncatedImages) {
  TempDir tmp;
  const int n = 6, rows = 4, cols = 5;  // expected 16 + 120 = 136 bytes
  const auto full = idx_images(0x803, n, rows, cols, random_bytes(n * rows * cols, 4));
  const std::vector<uint8_t> bytes(full.begin(), full.end() - 10);
  write_bytes(tmp / "lb.gz", idx_labels(0x801, n, {0, 1, 2, 3, 4, 5}), true);
  for (bool gz : {true, false}) {
    const std::string ip = tmp / (gz ? "im.gz" : "im");
    write_bytes(ip, bytes, gz);
    const std::string msg = error_of([&] { sav::load_idx(ip, tmp / "lb.gz"); });
    EXPECT_HAS(msg, ip);
    EXPECT_HAS(msg, "truncated");
    EXPECT_HAS(msg, "expected 136 bytes");
    EXPECT_HAS(msg, "found 126");
    EXPECT_HAS(msg, "6 x 4 x 5");
  }
  // Shorter than a header.
  write_bytes(tmp / "short", {0, 0, 8, 3, 0, 0}, false);
  std::string msg = error_of([&] { sav::load_idx(tmp / "short", tmp / "lb.gz"); });
  EXPECT_HAS(msg, "truncated");
  EXPECT_HAS(msg, "found 6");
  // A gzip stream cut in the middle (the compressed file itself is truncated).
  write_bytes(tmp / "big.gz", idx_images(0x803, 200, 28, 28, random_bytes(200 * 784, 5)), true);
  fs::resize_file(tmp / "big.gz", fs::file_size(tmp / "big.gz") / 2);
  msg = error_of([&] { sav::load_idx(tmp / "big.gz", tmp / "lb.gz"); });
  EXPECT_HAS(msg, tmp / "big.gz");
  EXPECT_HAS(msg, "expected 156816 bytes");
  EXPECT_TRUE(msg.find("truncated") != std::string::npos || msg.find("corrupt") != std::string::npos) << msg;
  // Truncated labels.
  write_bytes(tmp / "im.gz", idx_images(0x803, n, rows, cols, random_bytes(n * rows * cols, 4)), true);
  write_bytes(tmp / "lb3.gz", idx_labels(0x801, n, {0, 1, 2}), true);
  msg = error_of([&] { sav::load_idx(tmp / "im.gz", tmp / "lb3.gz"); });
  EXPECT_HAS(msg, tmp / "lb3.gz");
  EXPECT_HAS(msg, "expected 14 bytes");
  EXPECT_HAS(msg, "found 11");
}

TEST(Dataset, IdxCountMismatchAndTrailingData) {
  TempDir tmp;
  write_bytes(tmp / "im.gz", idx_images(0x803, 5, 2, 2, random_bytes(20, 6)), true);
  write_bytes(tmp / "lb.gz", idx_labels(0x801, 4, {0, 1, 2, 3}), true);
  std::string msg = error_of([&] { sav::load_idx(tmp / "im.gz", tmp / "lb.gz"); });
  EXPECT_HAS(msg, "5 images");
  EXPECT_HAS(msg, "4 labels");
  EXPECT_HAS(msg, tmp / "lb.gz");
  // More bytes than the header says.
  write_bytes(tmp / "im2.gz", idx_images(0x803, 4, 2, 2, random_bytes(20, 6)), true);
  msg = error_of([&] { sav::load_idx(tmp / "im2.gz", tmp / "lb.gz"); });
  EXPECT_HAS(msg, tmp / "im2.gz");
  EXPECT_HAS(msg, "after the expected 32 bytes");
}

TEST(Dataset, IdxMissingFile) {
  TempDir tmp;
  write_bytes(tmp / "lb.gz", idx_labels(0x801, 1, {0}), true);
  std::string msg = error_of([&] { sav::load_idx(tmp / "nope.gz", tmp / "lb.gz"); });
  EXPECT_HAS(msg, tmp / "nope.gz");
  EXPECT_HAS(msg, "does not exist");
}

TEST(Dataset, FashionMnistMissing) {
  TempDir tmp;
  std::string msg = error_of([&] { sav::load_fashion_mnist(tmp / "no_such_dir", true); });
  EXPECT_HAS(msg, tmp / "no_such_dir");
  EXPECT_HAS(msg, "apt-get install dataset-fashion-mnist");
  // Folder present, labels file missing.
  write_bytes(tmp / "t10k-images-idx3-ubyte.gz", idx_images(0x803, 1, 28, 28, random_bytes(784, 7)), true);
  msg = error_of([&] { sav::load_fashion_mnist(tmp.path.string(), false); });
  EXPECT_HAS(msg, "t10k-labels-idx1-ubyte.gz");
  EXPECT_HAS(msg, "missing");
  EXPECT_HAS(msg, "apt-get install dataset-fashion-mnist");
  // With an (uncompressed) labels file it loads, with the Fashion-MNIST class names.
  write_bytes(tmp / "t10k-labels-idx1-ubyte", idx_labels(0x801, 1, {9}), false);
  const Dataset ds = sav::load_fashion_mnist(tmp.path.string(), false);
  EXPECT_EQ(ds.n, 1);
  EXPECT_EQ(ds.num_classes, 10);
  EXPECT_EQ(ds.class_names[9], "Ankle boot");
  EXPECT_EQ(ds.labels[0], 9);
}

TEST(Dataset, FashionMnistTestSplit) {
  if (!fs::exists(fs::path(sav::kFashionMnistDir) / "t10k-images-idx3-ubyte.gz"))
    GTEST_SKIP() << "Fashion-MNIST not installed at " << sav::kFashionMnistDir
                 << " (apt-get install dataset-fashion-mnist)";
  const Dataset ds = sav::load_fashion_mnist(sav::kFashionMnistDir, false);
  EXPECT_EQ(ds.n, 10000);
  EXPECT_EQ(ds.channels, 1);
  EXPECT_EQ(ds.height, 28);
  EXPECT_EQ(ds.width, 28);
  EXPECT_EQ(ds.num_classes, 10);
  ASSERT_EQ(ds.class_names.size(), 10u);
  EXPECT_EQ(ds.class_names[0], "T-shirt/top");
  std::vector<int> hist(10, 0);
  for (int l : ds.labels) {
    ASSERT_TRUE(l >= 0 && l < 10) << l;
    ++hist[l];
  }
  for (int k = 0; k < 10; ++k) EXPECT_EQ(hist[k], 1000) << "class " << k;
  // The Normalize preset's mean (0.2860, measured on train) is close to the test split's pixel mean.
  double sum = 0;
  for (uint8_t p : ds.pixels) sum += p;
  EXPECT_NEAR(sum / ds.pixels.size() / 255.0, sav::Normalize::fashion_mnist().mean[0], 0.01);
}

// ------------------------------------------------------------------------------------------------ images

TEST(Image, PngRoundTripAndConversions) {
  TempDir tmp;
  for (int c : {1, 2, 3, 4}) {
    const Image im = random_image(c, 13, 9, 10 + c);
    const std::string p = tmp / ("rt" + std::to_string(c) + ".png");
    sav::save_png(p, im);
    const Image back = sav::load_image(p, c);
    EXPECT_EQ(back.channels, c);
    EXPECT_EQ(back.height, 13);
    EXPECT_EQ(back.width, 9);
    EXPECT_EQ(back.data, im.data) << c << " channels";
  }
  // Gray loaded as RGB replicates; RGBA loaded as RGB drops alpha.
  const Image gray = random_image(1, 5, 6, 20);
  sav::save_png(tmp / "g.png", gray);
  const Image g3 = sav::load_image(tmp / "g.png", 3);
  for (int c = 0; c < 3; ++c)
    for (int i = 0; i < 30; ++i) EXPECT_EQ(g3.data[c * 30 + i], gray.data[i]);
  const Image rgba = random_image(4, 5, 6, 21);
  sav::save_png(tmp / "a.png", rgba);
  const Image a3 = sav::load_image(tmp / "a.png", 3);
  EXPECT_TRUE(std::equal(a3.data.begin(), a3.data.end(), rgba.data.begin()));
  // Writing into a missing folder fails clearly.
  std::string msg = error_of([&] { sav::save_png(tmp / "no/such/dir/x.png", gray); });
  EXPECT_HAS(msg, "no/such/dir/x.png");
}

TEST(Image, CorruptAndMissingFiles) {
  TempDir tmp;
  write_bytes(tmp / "bad.png", {'n', 'o', 't', ' ', 'a', ' ', 'p', 'n', 'g'}, false);
  std::string msg = error_of([&] { sav::load_image(tmp / "bad.png", 3); });
  EXPECT_HAS(msg, tmp / "bad.png");
  // A valid PNG cut in half.
  sav::save_png(tmp / "ok.png", random_image(3, 40, 40, 22));
  fs::resize_file(tmp / "ok.png", fs::file_size(tmp / "ok.png") / 2);
  msg = error_of([&] { sav::load_image(tmp / "ok.png", 3); });
  EXPECT_HAS(msg, tmp / "ok.png");
  msg = error_of([&] { sav::load_image(tmp / "missing.png", 3); });
  EXPECT_HAS(msg, tmp / "missing.png");
  write_bytes(tmp / "empty.jpg", {}, false);
  msg = error_of([&] { sav::load_image(tmp / "empty.jpg", 3); });
  EXPECT_HAS(msg, "empty");
}

// Decoding against Pillow (python/make_image_refs.py wrote the files and Pillow's convert("RGB") / ("L")):
// baseline 4:2:0, progressive 4:4:4, gray and Adobe CMYK JPEGs, a palette PNG with a transparent index,
// an RGBA PNG. Both use libjpeg-turbo's default (islow IDCT, fancy upsampling): the pixels are identical.
TEST(Image, DecodeMatchesPillow) {
  const fs::path dir = fs::path(SAV_TEST_DATA) / "data" / "image";
  int n = 0;
  for (const char* name : {"color420.jpg", "progressive444.jpg", "gray.jpg", "cmyk.jpg", "palette_trns.png", "rgba.png"}) {
    for (int c : {3, 1}) {
      SCOPED_TRACE(std::string(name) + (c == 3 ? " RGB" : " L"));
      const Image im = sav::load_image((dir / name).string(), c);
      std::ifstream f(dir / (std::string(name) + (c == 3 ? ".rgb" : ".l")), std::ios::binary);
      ASSERT_TRUE(f) << "missing reference for " << name;
      const std::vector<uint8_t> want((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      ASSERT_EQ(im.data.size(), want.size());
      int worst = 0;
      for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::abs(int(im.data[i]) - int(want[i])));
      EXPECT_EQ(worst, 0) << im.height << "x" << im.width;
      ++n;
    }
  }
  EXPECT_EQ(n, 12);
}

// Files the decoders must refuse with a message naming the file and the problem, before allocating pixels.
TEST(Image, RefusesHugeEmptyAndForeignFiles) {
  TempDir tmp;
  // A PNG whose IHDR claims 65535 x 65535 (4.3 G pixels): refused from the header alone.
  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  auto chunk = [&png](const char* type, std::vector<uint8_t> data) {
    for (int k = 3; k >= 0; --k) png.push_back(uint8_t(data.size() >> (8 * k)));
    const size_t at = png.size();
    png.insert(png.end(), type, type + 4);
    png.insert(png.end(), data.begin(), data.end());
    const uint32_t crc = crc32(0, png.data() + at, static_cast<uInt>(png.size() - at));
    for (int k = 3; k >= 0; --k) png.push_back(uint8_t(crc >> (8 * k)));
  };
  chunk("IHDR", {0, 0, 0xFF, 0xFF, 0, 0, 0xFF, 0xFF, 8, 2, 0, 0, 0});
  chunk("IDAT", {0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01});
  chunk("IEND", {});
  std::string msg = error_of([&] { sav::decode_image(png.data(), png.size(), 3, "huge.png"); });
  EXPECT_HAS(msg, "huge.png");
  EXPECT_HAS(msg, "65535x65535") << msg;
  EXPECT_HAS(msg, "limit");
  // Not a JPEG or PNG (a GIF header), and a JPEG cut after its first bytes.
  const uint8_t gif[] = {'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0, 0, 0, 0};
  msg = error_of([&] { sav::decode_image(gif, sizeof gif, 3, "x.gif"); });
  EXPECT_HAS(msg, "not a JPEG or PNG");
  const uint8_t jpg[] = {0xFF, 0xD8, 0xFF, 0xE0, 0, 16, 'J', 'F', 'I', 'F'};
  msg = error_of([&] { sav::decode_image(jpg, sizeof jpg, 3, "cut.jpg"); });
  EXPECT_HAS(msg, "cut.jpg");
  // Resizing a thin strip: the long side would pass the pixel limit; refused, no int wrap-around.
  const Image strip(1, 1, 100000, 7);
  msg = error_of([&] { sav::resize_shorter_side(strip, 2048); });
  EXPECT_HAS(msg, "thin strip");
  EXPECT_EQ(sav::resize_shorter_side(strip, 2).width, 200000);
}

// Fast separable resize vs the direct 2-D reference, odd sizes, up and down. The fast path rounds twice
// (Pillow's uint8 intermediate), the reference once, so pixels may differ by 1 level, without bias.
TEST(Image, ResizeFastMatchesReference) {
  struct Case { int c, H, W, h, w; };
  const Case cases[] = {{1, 37, 23, 16, 11}, {3, 23, 37, 50, 70}, {3, 13, 7, 13, 7}, {1, 1, 1, 3, 5},
                        {3, 50, 70, 1, 1},   {2, 7, 13, 3, 29},   {1, 64, 3, 9, 3}};
  for (const Case& k : cases) {
    const Image src = random_image(k.c, k.H, k.W, 100 + k.H * k.W);
    const Image fast = sav::resize_bilinear(src, k.h, k.w), ref = sav::resize_bilinear_ref(src, k.h, k.w);
    ASSERT_EQ(fast.data.size(), size_t(k.c) * k.h * k.w);
    int max_diff = 0;
    double mean_diff = 0;
    for (size_t i = 0; i < fast.data.size(); ++i) {
      const int d = int(fast.data[i]) - int(ref.data[i]);
      max_diff = std::max(max_diff, std::abs(d));
      mean_diff += d;
    }
    mean_diff /= double(fast.data.size());
    EXPECT_LE(max_diff, 1) << k.H << "x" << k.W << " -> " << k.h << "x" << k.w;
    EXPECT_LE(std::fabs(mean_diff), 0.15) << k.H << "x" << k.W << " -> " << k.h << "x" << k.w;
    if (k.H == k.h && k.W == k.w) {
      EXPECT_EQ(fast.data, src.data) << "same-size resize must be the identity";
    }
  }
}

// Golden values from Pillow 13: Image.fromarray(p).resize((w, h), Image.BILINEAR) with
// p[y, x] = (37 x + 91 y + ((x y) % 17) 11) % 256. One axis at a time, where we match Pillow bit for bit.
TEST(Image, ResizeMatchesPillow) {
  struct Case { int H, W, h, w; std::vector<uint8_t> want; };
  const Case cases[] = {
      {9, 13, 9, 5, {39,  124, 142, 64,  149, 142, 136, 123, 110, 104, 168, 132, 104, 78,  128,
                     92,  136, 148, 124, 121, 118, 104, 145, 131, 125, 118, 167, 132, 141, 188,
                     131, 117, 81,  184, 108, 157, 85,  120, 103, 124, 158, 127, 96,  115, 115}},
      {7, 5, 12, 5, {0,   37,  74,  111, 148, 34,  75,  116, 158, 103, 87,  135, 182, 230, 32,
                     140, 194, 110, 163, 100, 161, 222, 58,  119, 147, 65,  132, 124, 191, 76,
                     44,  117, 115, 188, 80,  97,  176, 32,  112, 159, 150, 118, 66,  152, 152,
                     192, 39,  132, 216, 119, 96,  99,  198, 180, 48,  34,  137, 240, 156, 3}},
      {4, 30, 4, 7, {75,  124, 117, 100, 138, 106, 129, 143, 123, 115, 146, 92,  141, 132,
                     147, 108, 113, 131, 123, 115, 148, 114, 143, 112, 153, 133, 162, 147}},
  };
  for (const Case& k : cases) {
    Image src(1, k.H, k.W);
    for (int y = 0; y < k.H; ++y)
      for (int x = 0; x < k.W; ++x) src.at(0, y, x) = uint8_t((x * 37 + y * 91 + ((x * y) % 17) * 11) % 256);
    EXPECT_EQ(sav::resize_bilinear(src, k.h, k.w).data, k.want) << k.H << "x" << k.W << " -> " << k.h << "x" << k.w;
  }
}

TEST(Image, ResizeKnownValues) {
  // Upscaling 1x2 [0, 200] to 1x4: centres at 0.25, 0.75, 1.25, 1.75 in input pixels ->
  // 0, 0.25*200, 0.75*200, 200 (edges clamp).
  Image src(1, 1, 2);
  src.data = {0, 200};
  Image up = sav::resize_bilinear(src, 1, 4);
  EXPECT_EQ(up.data, (std::vector<uint8_t>{0, 50, 150, 200}));
  // Antialiasing: stripes of period 2 shrunk 3x average to mid-gray (plain bilinear samples at
  // x = 1.5, 4.5, ... hit single stripes and would give 255, 0, 255, ...).
  Image stripes(1, 9, 66);
  for (int y = 0; y < 9; ++y)
    for (int x = 0; x < 66; ++x) stripes.at(0, y, x) = (x % 2) ? 255 : 0;
  const Image small = sav::resize_bilinear(stripes, 3, 22);
  for (uint8_t v : small.data) EXPECT_NEAR(int(v), 128, 20);
  // resize_shorter_side keeps the aspect ratio, truncating the long side (torchvision).
  const Image r = sav::resize_shorter_side(random_image(3, 37, 50, 30), 18);
  EXPECT_EQ(r.height, 18);
  EXPECT_EQ(r.width, 18 * 50 / 37);
  const Image r2 = sav::resize_shorter_side(random_image(3, 70, 50, 31), 18);
  EXPECT_EQ(r2.width, 18);
  EXPECT_EQ(r2.height, 18 * 70 / 50);
}

TEST(Image, CenterCrop) {
  Image src(1, 6, 7);
  for (int y = 0; y < 6; ++y)
    for (int x = 0; x < 7; ++x) src.at(0, y, x) = uint8_t(y * 10 + x);
  // top = round((6-3)/2) = round(1.5) = 2 (ties to even, as torchvision), left = round(2.0) = 2.
  const Image c = sav::center_crop(src, 3, 3);
  for (int y = 0; y < 3; ++y)
    for (int x = 0; x < 3; ++x) EXPECT_EQ(c.at(0, y, x), (y + 2) * 10 + (x + 2));
  // top = round(0.5) = 0, left = round(2.5) = 2.
  const Image c2 = sav::center_crop(src, 5, 2);
  EXPECT_EQ(c2.at(0, 0, 0), 2);
  EXPECT_EQ(c2.at(0, 4, 1), 43);
  // Larger than the image: zero padding around it (top = round(-1) = -1, left = round(-0.5) = 0).
  const Image p = sav::center_crop(src, 8, 8);
  EXPECT_EQ(p.at(0, 0, 0), 0);
  EXPECT_EQ(p.at(0, 1, 0), 0);
  EXPECT_EQ(p.at(0, 1, 1), 1);
  EXPECT_EQ(p.at(0, 6, 6), 56);
  EXPECT_EQ(p.at(0, 7, 7), 0);
  EXPECT_EQ(p.at(0, 6, 7), 0);
}

// ------------------------------------------------------------------------------------------------ folder

TEST(Dataset, ImageFolder) {
  TempDir tmp;
  // Classes created out of order: labels follow the sorted names (ant 0, bee 1, cat 2).
  for (const char* d : {"cat", "ant", "bee", ".hidden"}) fs::create_directories(tmp.path / d);
  auto solid = [](int c, int h, int w, std::vector<uint8_t> colour) {
    Image im(c, h, w);
    for (int k = 0; k < c; ++k) std::fill(im.data.begin() + k * h * w, im.data.begin() + (k + 1) * h * w, colour[k]);
    return im;
  };
  sav::save_png(tmp / "cat/a.png", solid(3, 37, 23, {200, 10, 30}));
  sav::save_png(tmp / "cat/b.PNG", solid(3, 50, 70, {1, 2, 3}));
  sav::save_png(tmp / "ant/x.png", solid(1, 23, 37, {77}));            // gray -> RGB
  sav::save_png(tmp / "ant/y.png", solid(4, 16, 16, {9, 99, 199, 5}));  // RGBA -> RGB
  sav::save_png(tmp / "bee/z.png", random_image(3, 70, 50, 40));
  sav::save_png(tmp / ".hidden/h.png", solid(3, 20, 20, {0, 0, 0}));
  write_bytes(tmp / "bee/notes.txt", {'h', 'i'}, false);  // ignored
  sav::save_png(tmp / "stray.png", solid(3, 20, 20, {0, 0, 0}));  // not in a class folder: ignored

  const Dataset ds = sav::load_image_folder(tmp.path.string(), 16);
  EXPECT_EQ(ds.n, 5);
  EXPECT_EQ(ds.channels, 3);
  EXPECT_EQ(ds.height, 16);
  EXPECT_EQ(ds.width, 16);
  EXPECT_EQ(ds.num_classes, 3);
  EXPECT_EQ(ds.class_names, (std::vector<std::string>{"ant", "bee", "cat"}));
  EXPECT_EQ(ds.labels, (std::vector<int>{0, 0, 1, 2, 2}));
  ASSERT_EQ(ds.pixels.size(), size_t(5) * 3 * 16 * 16);
  // Solid colours survive resize (16 * 256 / 224 = 18) and crop exactly.
  const std::vector<std::vector<uint8_t>> colours = {{77, 77, 77}, {9, 99, 199}, {}, {200, 10, 30}, {1, 2, 3}};
  for (int i : {0, 1, 3, 4})
    for (int c = 0; c < 3; ++c)
      for (int p = 0; p < 256; ++p) ASSERT_EQ(ds.image(i)[c * 256 + p], colours[i][c]) << "image " << i << " c " << c;
  // The random image equals the single-image pipeline.
  Image ref = sav::load_image(tmp / "bee/z.png", 3);
  ref = sav::center_crop(sav::resize_shorter_side(ref, 18), 16, 16);
  EXPECT_TRUE(std::equal(ref.data.begin(), ref.data.end(), ds.image(2)));
  // Gray output, explicit resize_to.
  const Dataset g = sav::load_image_folder(tmp.path.string(), 8, 1, 8);
  EXPECT_EQ(g.channels, 1);
  EXPECT_EQ(g.image(0)[0], 77);
  EXPECT_EQ(sav::dataset_image(g, 4).height, 8);
}

TEST(Dataset, ImageFolderErrors) {
  TempDir tmp;
  std::string msg = error_of([&] { sav::load_image_folder(tmp / "nope", 16); });
  EXPECT_HAS(msg, tmp / "nope");
  EXPECT_HAS(msg, "does not exist");
  msg = error_of([&] { sav::load_image_folder(tmp.path.string(), 16); });
  EXPECT_HAS(msg, "no class subfolders");
  fs::create_directories(tmp.path / "a");
  fs::create_directories(tmp.path / "b");
  msg = error_of([&] { sav::load_image_folder(tmp.path.string(), 16); });
  EXPECT_HAS(msg, "no .jpg/.jpeg/.png files");
  // A corrupt image names the file.
  for (int i = 0; i < 6; ++i) sav::save_png(tmp / ("a/" + std::to_string(i) + ".png"), random_image(3, 20, 20, 50 + i));
  write_bytes(tmp / "b/broken.jpg", {0xff, 0xd8, 0xff, 0xe0, 0, 1, 2, 3}, false);
  msg = error_of([&] { sav::load_image_folder(tmp.path.string(), 16); });
  EXPECT_HAS(msg, tmp / "b/broken.jpg");
  EXPECT_HAS(msg, "cannot decode");
  msg = error_of([&] { sav::load_image_folder(tmp.path.string(), 16, 3, 8); });
  EXPECT_HAS(msg, "resize_to");
}

// ------------------------------------------------------------------------------------------------ batches

TEST(Dataset, MakeBatchNormalisation) {
  const Dataset ds = random_dataset(9, 3, 5, 7, 4, 60);
  const int idx[] = {8, 0, 3, 3};
  const int B = 4, per = 3 * 5 * 7;
  std::vector<float> x(B * per);
  std::vector<int> y(B);
  const sav::Normalize norm = sav::Normalize::imagenet();
  sav::make_batch(ds, idx, B, norm, {}, nullptr, x.data(), y.data());
  double max_err = 0;
  for (int b = 0; b < B; ++b) {
    EXPECT_EQ(y[b], ds.labels[idx[b]]);
    for (int c = 0; c < 3; ++c)
      for (int p = 0; p < 35; ++p) {
        const double want = (ds.image(idx[b])[c * 35 + p] / 255.0 - norm.mean[c]) / norm.std[c];
        max_err = std::max(max_err, std::fabs(x[b * per + c * 35 + p] - want));
      }
  }
  EXPECT_LT(max_err, 1e-5);  // |values| <= ~2.7, float rounding
  // Known values: Fashion-MNIST preset on pixel 0 and 255 (augmentation settings ignored without rng).
  Dataset one = random_dataset(1, 1, 1, 2, 1, 61);
  one.pixels = {0, 255};
  float v[2];
  int l;
  sav::make_batch(one, idx + 1, 1, sav::Normalize::fashion_mnist(), {.pad_crop = 1, .hflip = true}, nullptr, v, &l);
  EXPECT_NEAR(v[0], -0.2860 / 0.3530, 1e-6);
  EXPECT_NEAR(v[1], (1 - 0.2860) / 0.3530, 1e-6);
}

TEST(Dataset, MakeBatchAugmentDeterministic) {
  const Dataset ds = random_dataset(20, 3, 9, 11, 5, 70);
  const int B = 16, per = 3 * 9 * 11;
  std::vector<int> idx(B);
  for (int b = 0; b < B; ++b) idx[b] = (b * 7) % 20;
  const sav::Augment aug{.pad_crop = 2, .hflip = true};
  std::vector<float> x1(B * per), x2(B * per), x3(B * per);
  std::vector<int> y1(B), y2(B), y3(B);
  sav::Rng r1(123), r2(123), r3(124);
  sav::make_batch(ds, idx.data(), B, sav::Normalize::imagenet(), aug, &r1, x1.data(), y1.data());
  sav::make_batch(ds, idx.data(), B, sav::Normalize::imagenet(), aug, &r2, x2.data(), y2.data());
  sav::make_batch(ds, idx.data(), B, sav::Normalize::imagenet(), aug, &r3, x3.data(), y3.data());
  EXPECT_EQ(x1, x2);
  EXPECT_EQ(y1, y2);
  EXPECT_EQ(r1.next_u64(), r2.next_u64());  // same number of draws
  EXPECT_NE(x1, x3);                         // a different seed gives a different batch
  EXPECT_EQ(y1, y3);
}

// Crop offsets and flips against a direct per-pixel computation, replaying the documented draw order.
TEST(Dataset, MakeBatchPadCropAndFlip) {
  const int C = 2, H = 5, W = 6, B = 32, P = 2;
  Dataset ds = random_dataset(3, C, H, W, 3, 80);
  for (auto& p : ds.pixels) p = std::max<uint8_t>(p, 1);  // so padding (value 0) is distinguishable
  std::vector<int> idx(B);
  for (int b = 0; b < B; ++b) idx[b] = b % 3;
  const sav::Normalize norm = sav::Normalize::none();
  for (const sav::Augment aug : {sav::Augment{.pad_crop = 0, .hflip = true}, sav::Augment{.pad_crop = P, .hflip = true},
                                 sav::Augment{.pad_crop = P, .hflip = false}}) {
    sav::Rng rng(7), replay(7);
    std::vector<float> x(B * C * H * W);
    std::vector<int> y(B);
    sav::make_batch(ds, idx.data(), B, norm, aug, &rng, x.data(), y.data());
    int n_flipped = 0, n_shifted = 0;
    for (int b = 0; b < B; ++b) {
      int dy = aug.pad_crop, dx = aug.pad_crop, flip = 0;
      if (aug.pad_crop) {
        dy = int(replay.below(2 * aug.pad_crop + 1));
        dx = int(replay.below(2 * aug.pad_crop + 1));
      }
      if (aug.hflip) flip = int(replay.below(2));
      n_flipped += flip;
      n_shifted += (dy != aug.pad_crop || dx != aug.pad_crop);
      for (int c = 0; c < C; ++c)
        for (int yy = 0; yy < H; ++yy)
          for (int xx = 0; xx < W; ++xx) {
            // crop from the padded image, then mirror
            const int cx = flip ? W - 1 - xx : xx;
            const int sy = yy + dy - aug.pad_crop, sx = cx + dx - aug.pad_crop;
            const int pix = (sy >= 0 && sy < H && sx >= 0 && sx < W) ? ds.image(idx[b])[(c * H + sy) * W + sx] : 0;
            ASSERT_FLOAT_EQ(x[((b * C + c) * H + yy) * W + xx], pix / 255.0f)
                << "b " << b << " c " << c << " y " << yy << " x " << xx << " dy " << dy << " dx " << dx << " flip " << flip;
          }
    }
    if (aug.hflip) {
      EXPECT_GT(n_flipped, 4);
      EXPECT_LT(n_flipped, B - 4);
    }
    if (aug.pad_crop) {
      EXPECT_GT(n_shifted, B / 2);
    }
  }
  // Flip on a known pattern: one row 0..W-1 becomes W-1..0 in flipped images.
  Dataset ramp = random_dataset(1, 1, 1, W, 1, 81);
  for (int x = 0; x < W; ++x) ramp.pixels[x] = uint8_t(x);
  std::vector<int> zeros(B, 0);
  std::vector<float> x(B * W);
  std::vector<int> y(B);
  sav::Rng rng(9);
  sav::make_batch(ramp, zeros.data(), B, norm, {.pad_crop = 0, .hflip = true}, &rng, x.data(), y.data());
  int seen_flip = 0, seen_plain = 0;
  for (int b = 0; b < B; ++b) {
    const bool flipped = x[b * W] * 255.0f > 0.5f;
    (flipped ? seen_flip : seen_plain)++;
    for (int i = 0; i < W; ++i) EXPECT_FLOAT_EQ(x[b * W + i] * 255.0f, float(flipped ? W - 1 - i : i));
  }
  EXPECT_GT(seen_flip, 0);
  EXPECT_GT(seen_plain, 0);
}

TEST(Dataset, MakeBatchErrors) {
  const Dataset ds = random_dataset(4, 3, 2, 2, 2, 90);
  float x[12];
  int y;
  const int bad = 4;
  std::string msg = error_of([&] { sav::make_batch(ds, &bad, 1, sav::Normalize::imagenet(), {}, nullptr, x, &y); });
  EXPECT_HAS(msg, "index 4");
  const int ok = 0;
  const sav::Normalize two{{0.5f, 0.5f}, {0.5f, 0.5f}};
  msg = error_of([&] { sav::make_batch(ds, &ok, 1, two, {}, nullptr, x, &y); });
  EXPECT_HAS(msg, "3 channels");
}
