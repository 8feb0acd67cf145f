// shiftaddvit: 8-bit images. See image.h.
#include "io/image.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <cstring>
#include <limits>
#include <new>

#include "core/error.h"

#include <csetjmp>
#include <cstdio>

#include <jpeglib.h>
#include <png.h>

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

namespace {

// Pixels of interleaved 8-bit samples as the decoder produced them, before the channel conversion.
struct Raw {
  int w = 0, h = 0, c = 0;
  std::vector<uint8_t> px;
};

void check_dims(int64_t w, int64_t h, int64_t max_pixels, const std::string& name) {
  SAV_CHECK(w >= 1 && h >= 1, "cannot decode image '" << name << "': it claims a size of " << w << "x" << h);
  SAV_CHECK(w * h <= max_pixels, "cannot decode image '" << name << "': " << w << "x" << h << " is " << w * h
                                                         << " pixels, above the limit of " << max_pixels);
}

// libjpeg reports fatal errors through error_exit, which must not return: jump back to the setjmp in
// jpeg_decode_into. Warnings (corrupt data it can skip) are not printed.
struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_on_error(j_common_ptr cinfo) {
  JpegError* e = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, e->message);
  std::longjmp(e->jump, 1);
}

void jpeg_silent(j_common_ptr) {}

// Plain C control flow only between setjmp and longjmp: no object with a destructor is created in this
// frame, `raw` lives in the caller's. Returns an empty string or the reason of the failure.
std::string jpeg_decode_into(const uint8_t* bytes, size_t size, int64_t max_pixels, Raw& raw,
                             const std::string& name) {
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_on_error;
  err.mgr.output_message = jpeg_silent;
  err.message[0] = '\0';
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return err.message[0] ? err.message : "unknown libjpeg error";
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, bytes, static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);
  const int64_t w = cinfo.image_width, h = cinfo.image_height;
  if (w < 1 || h < 1 || w * h > max_pixels) {
    jpeg_destroy_decompress(&cinfo);
    check_dims(w, h, max_pixels, name);  // throws
  }
  // Gray files stay gray; everything else (YCbCr, RGB, CMYK) comes out as RGB, as Pillow's convert().
  cinfo.out_color_space = cinfo.jpeg_color_space == JCS_GRAYSCALE ? JCS_GRAYSCALE : JCS_RGB;
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) cinfo.out_color_space = JCS_CMYK;
  jpeg_start_decompress(&cinfo);
  raw.w = static_cast<int>(cinfo.output_width);
  raw.h = static_cast<int>(cinfo.output_height);
  raw.c = cinfo.output_components;
  raw.px.resize(static_cast<size_t>(raw.w) * raw.h * raw.c);  // within max_pixels * 4 bytes
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = raw.px.data() + static_cast<size_t>(cinfo.output_scanline) * raw.w * raw.c;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  const bool cmyk = cinfo.out_color_space == JCS_CMYK;
  const bool adobe_inverted = cinfo.saw_Adobe_marker;
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  if (cmyk) {  // CMYK -> RGB as Pillow: Adobe files store inverted CMYK, R = 255 - min(255, C + K) etc.
    std::vector<uint8_t> rgb(static_cast<size_t>(raw.w) * raw.h * 3);
    for (size_t i = 0; i < rgb.size() / 3; ++i) {
      int v[4];
      for (int k = 0; k < 4; ++k) v[k] = adobe_inverted ? 255 - raw.px[i * 4 + k] : raw.px[i * 4 + k];
      for (int k = 0; k < 3; ++k) rgb[i * 3 + k] = static_cast<uint8_t>(255 - std::min(255, v[k] + v[3]));
    }
    raw.px.swap(rgb);
    raw.c = 3;
  }
  return {};
}

Raw decode_jpeg(const uint8_t* bytes, size_t size, int64_t max_pixels, const std::string& name) {
  Raw raw;
  std::string why;
  try {
    why = jpeg_decode_into(bytes, size, max_pixels, raw, name);
  } catch (const std::bad_alloc&) {
    SAV_THROW("cannot decode image '" << name << "': out of memory");
  }
  SAV_CHECK(why.empty(), "cannot decode image '" << name << "': " << why << " (is it a valid JPEG file?)");
  return raw;
}

// libpng's simplified API: no setjmp here, it expands palettes, reduces 16 bits to 8 and adds or keeps
// alpha by itself. Always read as RGBA (or GA for gray files) and convert below.
Raw decode_png(const uint8_t* bytes, size_t size, int64_t max_pixels, const std::string& name) {
  png_image im;
  std::memset(&im, 0, sizeof im);
  im.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&im, bytes, size))
    SAV_THROW("cannot decode image '" << name << "': " << im.message << " (is it a valid PNG file?)");
  const int64_t w = im.width, h = im.height;
  if (w < 1 || h < 1 || w * h > max_pixels) {
    png_image_free(&im);
    check_dims(w, h, max_pixels, name);
  }
  const bool gray = (im.format & PNG_FORMAT_FLAG_COLOR) == 0;
  im.format = gray ? PNG_FORMAT_GA : PNG_FORMAT_RGBA;
  Raw raw;
  raw.w = static_cast<int>(w), raw.h = static_cast<int>(h), raw.c = gray ? 2 : 4;
  try {
    raw.px.resize(PNG_IMAGE_SIZE(im));
  } catch (...) {
    png_image_free(&im);
    throw;
  }
  if (!png_image_finish_read(&im, nullptr, raw.px.data(), 0, nullptr))
    SAV_THROW("cannot decode image '" << name << "': " << im.message << " (is it a valid PNG file?)");
  return raw;
}

// Pillow's convert("L"): L = (299 R + 587 G + 114 B) / 1000, rounded.
inline uint8_t luma(int r, int g, int b) { return static_cast<uint8_t>((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16); }

}  // namespace

Image decode_image(const uint8_t* bytes, size_t size, int channels, const std::string& name, int64_t max_pixels) {
  SAV_CHECK(channels >= 1 && channels <= 4, "load_image: channels must be 1..4, got " << channels);
  SAV_CHECK(size > 0, "cannot decode image '" << name << "': the file is empty");
  static const uint8_t kJpeg[3] = {0xFF, 0xD8, 0xFF}, kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  Raw raw;
  if (size >= 3 && std::memcmp(bytes, kJpeg, 3) == 0)
    raw = decode_jpeg(bytes, size, max_pixels, name);
  else if (size >= 8 && std::memcmp(bytes, kPng, 8) == 0)
    raw = decode_png(bytes, size, max_pixels, name);
  else
    SAV_THROW("cannot decode image '" << name << "': not a JPEG or PNG file (its first bytes are neither)");
  // Interleaved raw.c (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) -> planar `channels`.
  Image im(channels, raw.h, raw.w);
  const size_t hw = static_cast<size_t>(raw.h) * raw.w;
  const bool src_color = raw.c >= 3, src_alpha = raw.c == 2 || raw.c == 4;
  for (size_t i = 0; i < hw; ++i) {
    const uint8_t* p = &raw.px[i * raw.c];
    const uint8_t r = p[0], g = src_color ? p[1] : p[0], b = src_color ? p[2] : p[0];
    const uint8_t a = src_alpha ? p[raw.c - 1] : 255;
    const uint8_t y = src_color ? luma(r, g, b) : r;
    switch (channels) {
      case 1: im.data[i] = y; break;
      case 2: im.data[i] = y, im.data[hw + i] = a; break;
      default:
        im.data[i] = r, im.data[hw + i] = g, im.data[2 * hw + i] = b;
        if (channels == 4) im.data[3 * hw + i] = a;
    }
  }
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
  int64_t h, w;
  if (src.height <= src.width) {
    h = size;
    w = static_cast<int64_t>(size) * src.width / src.height;
  } else {
    w = size;
    h = static_cast<int64_t>(size) * src.height / src.width;
  }
  SAV_CHECK(h * w <= kMaxImagePixels,
            "resize_shorter_side: a " << src.width << "x" << src.height << " image with its shorter side at " << size
                                      << " would be " << w << "x" << h << ", above the limit of " << kMaxImagePixels
                                      << " pixels (is it a thin strip?)");
  if (h == src.height && w == src.width) return src;
  return resize_bilinear(src, static_cast<int>(h), static_cast<int>(w));
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
  png_image out;
  std::memset(&out, 0, sizeof out);
  out.version = PNG_IMAGE_VERSION;
  out.width = static_cast<png_uint_32>(img.width);
  out.height = static_cast<png_uint_32>(img.height);
  static const png_uint_32 kFormat[4] = {PNG_FORMAT_GRAY, PNG_FORMAT_GA, PNG_FORMAT_RGB, PNG_FORMAT_RGBA};
  out.format = kFormat[C - 1];
  const int ok = png_image_write_to_file(&out, path.c_str(), 0, interleaved.data(), 0, nullptr);
  SAV_CHECK(ok, "cannot write PNG '" << path << "': " << out.message << " (does the folder exist and is it writable?)");
}

}  // namespace sav
