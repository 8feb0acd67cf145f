// shiftaddvit: 8-bit images. See image.h.
#include "io/image.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>

#include "core/error.h"

// The one place stb_image / stb_image_write are compiled. Their code is not ours: silence -Wall/-Wextra.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wtype-limits"
#pragma GCC diagnostic ignored "-Wdouble-promotion"
#define STB_IMAGE_IMPLEMENTATION
#define STBI_FAILURE_USERMSG
#include <stb_image.h>
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb_image_write.h>
#pragma GCC diagnostic pop

namespace sav {

Image::Image(int c, int h, int w, uint8_t fill) : channels(c), height(h), width(w) {
  SAV_CHECK(c >= 1 && h >= 0 && w >= 0, "bad image shape (" << c << ", " << h << ", " << w << ")");
  data.assign(static_cast<size_t>(c) * h * w, fill);
}

static void check_image(const Image& im, const char* what) {
  SAV_CHECK(im.channels >= 1 && im.height >= 1 && im.width >= 1,
            what << ": empty or malformed image (" << im.channels << ", " << im.height << ", " << im.width << ")");
  SAV_CHECK(im.data.size() == static_cast<size_t>(im.channels) * im.height * im.width,
            what << ": image data holds " << im.data.size() << " bytes, shape (" << im.channels << ", "
                 << im.height << ", " << im.width << ") needs " << static_cast<size_t>(im.channels) * im.height * im.width);
}

// ------------------------------------------------------------------------------------------------ decode

Image decode_image(const uint8_t* bytes, size_t size, int channels, const std::string& name) {
  SAV_CHECK(channels >= 1 && channels <= 4, "load_image: channels must be 1..4, got " << channels);
  SAV_CHECK(size > 0, "cannot decode image '" << name << "': the file is empty");
  SAV_CHECK(size <= static_cast<size_t>(std::numeric_limits<int>::max()),
            "cannot decode image '" << name << "': file of " << size << " bytes is too large");
  int w = 0, h = 0, file_channels = 0;
  uint8_t* pix = stbi_load_from_memory(bytes, static_cast<int>(size), &w, &h, &file_channels, channels);
  if (!pix) {
    const char* why = stbi_failure_reason();
    SAV_THROW("cannot decode image '" << name << "': " << (why ? why : "unknown error")
                                      << " (is it a valid JPEG/PNG file?)");
  }
  Image im;
  try {
    im = Image(channels, h, w);
  } catch (...) {
    stbi_image_free(pix);
    throw;
  }
  const size_t hw = static_cast<size_t>(h) * w;
  for (int c = 0; c < channels; ++c) {
    uint8_t* dst = im.data.data() + c * hw;
    for (size_t i = 0; i < hw; ++i) dst[i] = pix[i * channels + c];
  }
  stbi_image_free(pix);
  return im;
}

Image load_image(const std::string& path, int channels) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  SAV_CHECK(f, "cannot open image file '" << path << "' (missing or unreadable)");
  const std::streamoff size = f.tellg();
  SAV_CHECK(size >= 0, "cannot read image file '" << path << "'");
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  f.seekg(0);
  if (size > 0) f.read(reinterpret_cast<char*>(bytes.data()), size);
  SAV_CHECK(f, "cannot read image file '" << path << "' (read failed)");
  return decode_image(bytes.data(), bytes.size(), channels, path);
}

// ------------------------------------------------------------------------------------------------ resize

namespace {

double triangle(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

// Fixed-point weights, as PIL's 8-bit path: w / 2^22 (8 bits of pixel + 22 of weight fit in int32).
constexpr int kWeightBits = 22;

// The coefficients of one axis: output index i reads inputs [start[i], start[i] + count[i]) with
// weights w[i * ksize + k] / 2^kWeightBits, which sum to ~1.
struct ResampleAxis {
  int ksize = 0;
  std::vector<int> start, count;
  std::vector<int32_t> w;
};

ResampleAxis resample_axis(int in, int out) {
  const double scale = static_cast<double>(in) / out;
  const double filterscale = std::max(scale, 1.0);  // widen the filter when downscaling (antialiasing)
  const double support = 1.0 * filterscale;         // the triangle's support is 1
  ResampleAxis a;
  a.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  a.start.resize(out);
  a.count.resize(out);
  a.w.assign(static_cast<size_t>(out) * a.ksize, 0);
  std::vector<double> wd(a.ksize);
  for (int i = 0; i < out; ++i) {
    const double center = (i + 0.5) * scale;
    const int lo = std::max(static_cast<int>(center - support + 0.5), 0);
    const int hi = std::min(static_cast<int>(center + support + 0.5), in);
    const int n = std::min(hi - lo, a.ksize);
    // Operation order (multiply by the reciprocal, add 0.5 last) as PIL, so the weights round the same.
    const double inv = 1.0 / filterscale;
    double sum = 0;
    for (int k = 0; k < n; ++k) {
      wd[k] = triangle((lo + k - center + 0.5) * inv);
      sum += wd[k];
    }
    int32_t* w = &a.w[static_cast<size_t>(i) * a.ksize];
    for (int k = 0; k < n; ++k) {
      const double v = sum != 0.0 ? wd[k] / sum : wd[k];  // >= 0 for the triangle
      w[k] = static_cast<int32_t>(0.5 + v * (1 << kWeightBits));
    }
    a.start[i] = lo;
    a.count[i] = n;
  }
  return a;
}

// Rounded (the accumulator starts at 2^21) fixed-point sum back to a clamped 8-bit value.
inline uint8_t fixed_to_u8(int32_t acc) {
  if (acc <= 0) return 0;
  if (acc >= (255 << kWeightBits)) return 255;
  return static_cast<uint8_t>(acc >> kWeightBits);
}

inline uint8_t to_u8(double v) {
  v = std::min(std::max(v, 0.0), 255.0);
  return static_cast<uint8_t>(v + 0.5);
}

}  // namespace

Image resize_bilinear(const Image& src, int h, int w) {
  check_image(src, "resize_bilinear");
  SAV_CHECK(h >= 1 && w >= 1, "resize_bilinear: target size must be positive, got " << h << "x" << w);
  const int C = src.channels, H = src.height, W = src.width;
  const ResampleAxis ax = resample_axis(W, w), ay = resample_axis(H, h);
  constexpr int32_t kHalf = 1 << (kWeightBits - 1);
  // Pass 1, horizontal: tmp (C, H, w), rounded to uint8 as PIL does between its passes.
  std::vector<uint8_t> tmp(static_cast<size_t>(C) * H * w);
#pragma omp parallel for schedule(static)
  for (int r = 0; r < C * H; ++r) {
    const uint8_t* in = src.data.data() + static_cast<size_t>(r) * W;
    uint8_t* o = tmp.data() + static_cast<size_t>(r) * w;
    for (int x = 0; x < w; ++x) {
      const int32_t* k = &ax.w[static_cast<size_t>(x) * ax.ksize];
      const uint8_t* p = in + ax.start[x];
      int32_t s = kHalf;
      for (int j = 0; j < ax.count[x]; ++j) s += k[j] * p[j];
      o[x] = fixed_to_u8(s);
    }
  }
  // Pass 2, vertical: out (C, h, w); the inner loop runs along x (contiguous, vectorisable).
  Image out(C, h, w);
#pragma omp parallel
  {
    std::vector<int32_t> acc(w);
#pragma omp for schedule(static)
    for (int r = 0; r < C * h; ++r) {
      const int c = r / h, y = r % h;
      std::fill(acc.begin(), acc.end(), kHalf);
      const int32_t* k = &ay.w[static_cast<size_t>(y) * ay.ksize];
      for (int j = 0; j < ay.count[y]; ++j) {
        const int32_t kj = k[j];
        const uint8_t* row = tmp.data() + (static_cast<size_t>(c) * H + ay.start[y] + j) * w;
        for (int x = 0; x < w; ++x) acc[x] += kj * row[x];
      }
      uint8_t* o = out.data.data() + static_cast<size_t>(r) * w;
      for (int x = 0; x < w; ++x) o[x] = fixed_to_u8(acc[x]);
    }
  }
  return out;
}

Image resize_bilinear_ref(const Image& src, int h, int w) {
  check_image(src, "resize_bilinear_ref");
  SAV_CHECK(h >= 1 && w >= 1, "resize_bilinear_ref: target size must be positive, got " << h << "x" << w);
  const int C = src.channels, H = src.height, W = src.width;
  const double sy = static_cast<double>(H) / h, sx = static_cast<double>(W) / w;
  const double fy = std::max(sy, 1.0), fx = std::max(sx, 1.0);  // filter widths (antialiasing)
  Image out(C, h, w);
  for (int c = 0; c < C; ++c)
    for (int oy = 0; oy < h; ++oy)
      for (int ox = 0; ox < w; ++ox) {
        const double cy = (oy + 0.5) * sy, cx = (ox + 0.5) * sx;  // footprint centre in input pixels
        double num = 0, den = 0;
        for (int y = 0; y < H; ++y)
          for (int x = 0; x < W; ++x) {
            const double wy = triangle((y + 0.5 - cy) / fy);
            const double wx = triangle((x + 0.5 - cx) / fx);
            num += wy * wx * src.at(c, y, x);
            den += wy * wx;
          }
        out.at(c, oy, ox) = to_u8(num / den);
      }
  return out;
}

Image resize_shorter_side(const Image& src, int size) {
  check_image(src, "resize_shorter_side");
  SAV_CHECK(size >= 1, "resize_shorter_side: size must be positive, got " << size);
  int h, w;
  if (src.height <= src.width) {
    h = size;
    w = static_cast<int>(static_cast<int64_t>(size) * src.width / src.height);
  } else {
    w = size;
    h = static_cast<int>(static_cast<int64_t>(size) * src.height / src.width);
  }
  if (h == src.height && w == src.width) return src;
  return resize_bilinear(src, h, w);
}

// ------------------------------------------------------------------------------------------------ crop

Image center_crop(const Image& src, int h, int w) {
  check_image(src, "center_crop");
  SAV_CHECK(h >= 1 && w >= 1, "center_crop: crop size must be positive, got " << h << "x" << w);
  // Offset of the window in the source; negative when the window is larger (zero padding).
  const int top = static_cast<int>(std::nearbyint((src.height - h) / 2.0));
  const int left = static_cast<int>(std::nearbyint((src.width - w) / 2.0));
  Image out(src.channels, h, w, 0);
  for (int c = 0; c < src.channels; ++c)
    for (int y = 0; y < h; ++y) {
      const int sy = y + top;
      if (sy < 0 || sy >= src.height) continue;
      for (int x = 0; x < w; ++x) {
        const int sx = x + left;
        if (sx >= 0 && sx < src.width) out.at(c, y, x) = src.at(c, sy, sx);
      }
    }
  return out;
}

// ------------------------------------------------------------------------------------------------ PNG

void save_png(const std::string& path, const Image& img) {
  check_image(img, "save_png");
  SAV_CHECK(img.channels <= 4, "save_png: PNG holds 1..4 channels, image has " << img.channels);
  const int C = img.channels;
  const size_t hw = static_cast<size_t>(img.height) * img.width;
  std::vector<uint8_t> interleaved(hw * C);
  for (int c = 0; c < C; ++c)
    for (size_t i = 0; i < hw; ++i) interleaved[i * C + c] = img.data[c * hw + i];
  const int ok = stbi_write_png(path.c_str(), img.width, img.height, C, interleaved.data(), img.width * C);
  SAV_CHECK(ok, "cannot write PNG '" << path << "' (does the folder exist and is it writable?)");
}

}  // namespace sav
