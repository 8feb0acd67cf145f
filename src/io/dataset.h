// shiftaddvit: in-memory image data sets and training/eval batches.
//
//   sav::Dataset train = sav::load_fashion_mnist("/usr/share/datasets/fashion-mnist", /*train=*/true);
//   sav::Dataset val = sav::load_image_folder("imagenet/val", /*image_size=*/224);  // resize 256, crop 224
//   std::vector<float> x(B * train.channels * train.height * train.width);
//   std::vector<int> y(B);
//   sav::Rng rng(0);
//   sav::make_batch(train, idx.data(), B, sav::Normalize::fashion_mnist(), {.pad_crop = 2, .hflip = true},
//                   &rng, x.data(), y.data());
//
// Legend: n images, c channels, h height, w width, B batch size.
// Pixels are kept as uint8 (c, h, w) per image (Fashion-MNIST train: 60000 x 784 B = 47 MB); they become
// float ((pixel / 255) - mean[c]) / std[c] only in make_batch.
//
// IDX format (LeCun's MNIST files; big-endian; the reader also takes them gzipped):
//   images (IDX3): u32 magic 0x00000803, u32 n, u32 rows, u32 cols, then n*rows*cols u8 pixels, row-major
//   labels (IDX1): u32 magic 0x00000801, u32 n, then n u8 labels
// Image folder (ImageNet / torchvision ImageFolder layout):
//   root/<class name>/<anything>.{jpg,jpeg,png}  (extension case-insensitive; other files are ignored)
//   Class folders sorted by name give labels 0..K-1 (a class folder without images keeps its label);
//   files within a class are taken in name order, so the data set order is deterministic.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"
#include "io/image.h"

namespace sav {

struct Dataset {
  int n = 0, channels = 0, height = 0, width = 0, num_classes = 0;
  std::vector<uint8_t> pixels;  // (n, c, h, w)
  std::vector<int> labels;      // (n), each in [0, num_classes)
  std::vector<std::string> class_names;  // (num_classes)
  std::string source;           // where it was loaded from, for logs

  size_t image_size() const { return static_cast<size_t>(channels) * height * width; }  // c*h*w
  const uint8_t* image(int i) const { return pixels.data() + static_cast<size_t>(i) * image_size(); }
};

// One image of a data set as an Image (e.g. to save_png it).
Image dataset_image(const Dataset& ds, int i);

// Reads an IDX3 ubyte image file and an IDX1 ubyte label file, each gzipped or plain. Checks magic
// numbers, sizes (a truncated file names the file and the bytes expected vs found) and equal counts.
// channels = 1; num_classes = max label + 1; class_names = "0", "1", ...
Dataset load_idx(const std::string& images_path, const std::string& labels_path);

// Fashion-MNIST from `dir` (Debian package dataset-fashion-mnist): train- or t10k-{images-idx3,
// labels-idx1}-ubyte[.gz]. 10 classes with their names. Missing folder or file: sav::Error saying which
// and how to install it.
inline constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";
Dataset load_fashion_mnist(const std::string& dir = kFashionMnistDir, bool train = true);
extern const char* const kFashionMnistClasses[10];

// ImageNet-style folder (layout above). Each image: decoded to `channels`, shorter side resized to
// `resize_to` (0: image_size * 256 / 224, timm's crop_pct 0.875) with antialiased bilinear, then the
// centre image_size x image_size crop. Decoding runs in parallel (OpenMP over files). An undecodable
// file throws sav::Error naming it; so do a missing/empty root and a root without class folders.
Dataset load_image_folder(const std::string& root, int image_size, int channels = 3, int resize_to = 0);

// Per-channel normalisation applied to pixel / 255. A single value applies to every channel.
struct Normalize {
  std::vector<float> mean, std;  // (c) or (1)
  static Normalize fashion_mnist() { return {{0.2860f}, {0.3530f}}; }
  static Normalize imagenet() { return {{0.485f, 0.456f, 0.406f}, {0.229f, 0.224f, 0.225f}}; }
  static Normalize none() { return {{0.0f}, {1.0f}}; }  // pixel / 255
};

// Training augmentation, applied only when make_batch gets an Rng.
struct Augment {
  int pad_crop = 0;    // pad each side with pixel value 0 by this many pixels, then a random h x w crop
  bool hflip = false;  // horizontal flip with probability 1/2
  bool crop_per_batch = false;  // one crop offset for the whole batch (as a batched GPU pipeline does)
};

// Fills a batch: images[b] = normalised (and, if rng, augmented) ds image indices[b]; labels[b] its label.
// Random numbers are drawn serially per image in batch order (crop dy, crop dx, flip), then the pixel work
// runs in parallel, so the batch depends only on the rng state. rng == nullptr: no augmentation.
void make_batch(const Dataset& ds, const int* indices /*(B)*/, int B, const Normalize& norm, const Augment& aug,
                Rng* rng, float* images /*(B, c, h, w)*/, int* labels /*(B)*/);

}  // namespace sav
