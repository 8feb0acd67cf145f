// shiftaddvit: 8-bit images (decode, resize, crop, PNG out).
//
//   sav::Image im = sav::load_image("cat.jpg", 3);          // (3, H, W) uint8, from a JPEG or PNG file
//   im = sav::resize_shorter_side(im, 256);                  // shorter side -> 256, bilinear, antialiased
//   im = sav::center_crop(im, 224, 224);                     // (3, 224, 224)
//   sav::save_png("out.png", im);
//
// Legend: C channels (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA), H height, W width.
// Layout is planar and row-major, PyTorch order: data[(c * H + y) * W + x].
//
// Resampling follows Pillow's Image.resize(..., BILINEAR), which is what timm/torchvision eval transforms
// run on PIL images: separable triangle filter, pixel centres at (i + 0.5), and when downscaling the
// filter is widened by the scale factor so each output pixel averages its whole footprint (antialiasing).
// Weights falling outside the image are dropped and the rest renormalised, so a solid colour stays exact.
// The fast path uses Pillow's arithmetic (22-bit fixed-point weights, horizontal pass first, rounded to
// uint8 between passes): checked against Pillow 13 it is bit-exact when one axis changes, and within 1
// level otherwise (Pillow sometimes runs the vertical pass first).
//
// Decoding: JPEG through libjpeg-turbo, PNG through libpng (the decoders Pillow itself uses), chosen by the
// file's first bytes, not its name; anything else is refused. A header claiming more than kMaxImagePixels
// pixels is refused before any pixel memory is allocated. Colour conversion on load follows Pillow's
// convert(): gray -> RGB replicates, RGB -> gray is ITU-R 601 luma (299 R + 587 G + 114 B) / 1000, alpha is
// dropped (or 255 when asked for and absent), palettes are expanded, 16-bit PNGs are reduced to 8 bits.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sav {

// Largest image (width x height) the decoders and resize accept: 2^27 = 134 M pixels, e.g. 11585 x 11585.
inline constexpr int64_t kMaxImagePixels = int64_t{1} << 27;

struct Image {
  int channels = 0, height = 0, width = 0;
  std::vector<uint8_t> data;  // (C, H, W)

  Image() = default;
  Image(int c, int h, int w, uint8_t fill = 0);
  uint8_t& at(int c, int y, int x) { return data[(static_cast<size_t>(c) * height + y) * width + x]; }
  uint8_t at(int c, int y, int x) const { return data[(static_cast<size_t>(c) * height + y) * width + x]; }
};

// Decodes a JPEG or PNG file into `channels` (1..4) planar channels. Throws sav::Error naming the file if
// it cannot be read or decoded, is empty (0 x 0) or larger than kMaxImagePixels.
Image load_image(const std::string& path, int channels);
// Same, from bytes already in memory; `name` is only used in error messages. `max_pixels` lowers the
// limit (the fuzz harness uses 2^20 to stay fast).
Image decode_image(const uint8_t* bytes, size_t size, int channels, const std::string& name,
                   int64_t max_pixels = kMaxImagePixels);

// Resize to (h, w), Pillow-style antialiased bilinear (see top). Separable, precomputed fixed-point
// weights, OpenMP over rows.
Image resize_bilinear(const Image& src, int h, int w);
// Reference (the spec): each output pixel is the direct 2-D weighted sum in double precision, weights
// recomputed per pixel, rounded once. Differs from the fast path by at most 1 level (its two roundings).
Image resize_bilinear_ref(const Image& src, int h, int w);
// Shorter side -> `size`, longer side scaled by the same factor and truncated (torchvision's Resize(int)).
// Throws if the result would exceed kMaxImagePixels (a thin strip of an image).
Image resize_shorter_side(const Image& src, int size);

// Crop the centre (h, w) window; offsets are round((H - h) / 2) with ties to even, as torchvision's
// CenterCrop. A window larger than the image is padded with zeros on both sides (torchvision too).
Image center_crop(const Image& src, int h, int w);

// Writes an 8-bit PNG (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA). Throws sav::Error if it cannot write.
void save_png(const std::string& path, const Image& img);

}  // namespace sav
