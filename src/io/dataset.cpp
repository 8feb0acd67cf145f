// shiftaddvit: in-memory image data sets and batches. See dataset.h.
#include "io/dataset.h"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <new>

#include "core/error.h"

namespace fs = std::filesystem;

namespace sav {

const char* const kFashionMnistClasses[10] = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                              "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

Image dataset_image(const Dataset& ds, int i) {
  SAV_CHECK(i >= 0 && i < ds.n, "dataset_image: index " << i << " out of range [0, " << ds.n << ")");
  Image im(ds.channels, ds.height, ds.width);
  std::memcpy(im.data.data(), ds.image(i), ds.image_size());
  return im;
}

// ------------------------------------------------------------------------------------------------ IDX

namespace {

constexpr uint32_t kIdxImagesMagic = 0x00000803;  // unsigned byte, 3 dimensions
constexpr uint32_t kIdxLabelsMagic = 0x00000801;  // unsigned byte, 1 dimension

// A gzipped or plain file read through zlib (gzread passes plain files through unchanged).
class GzReader {
 public:
  explicit GzReader(const std::string& path) : path_(path) {
    std::error_code ec;
    SAV_CHECK(fs::exists(path, ec), "IDX file '" << path << "' does not exist");
    SAV_CHECK(!fs::is_directory(path, ec), "IDX file '" << path << "' is a directory, expected a file");
    f_ = gzopen(path.c_str(), "rb");
    SAV_CHECK(f_ != nullptr, "cannot open IDX file '" << path << "' (" << std::strerror(errno) << ")");
    gzbuffer(f_, 1 << 18);
  }
  ~GzReader() {
    if (f_) gzclose(f_);
  }
  GzReader(const GzReader&) = delete;
  GzReader& operator=(const GzReader&) = delete;

  // Reads up to n bytes; returns how many were read (fewer only at the end of the data). A gzip stream
  // that ends early counts as the end of the data (and sets stream_truncated()); other zlib errors throw.
  size_t read(void* dst, size_t n) {
    size_t got = 0;
    while (got < n && !eof_) {
      const unsigned chunk = static_cast<unsigned>(std::min<size_t>(n - got, 1u << 30));
      const int r = gzread(f_, static_cast<char*>(dst) + got, chunk);
      if (r < 0) {
        int err = 0;
        const char* msg = gzerror(f_, &err);
        if (err == Z_BUF_ERROR) {  // "unexpected end of file": truncated gzip stream
          truncated_ = true;
          eof_ = true;
          break;
        }
        SAV_THROW("error reading '" << path_ << "': " << (msg ? msg : "zlib error")
                                    << " (corrupt gzip data? re-download or reinstall the file)");
      }
      if (r == 0) {
        eof_ = true;
        int err = 0;
        gzerror(f_, &err);
        if (err == Z_BUF_ERROR) truncated_ = true;
        break;
      }
      got += static_cast<size_t>(r);
    }
    return got;
  }
  bool compressed() const { return gzdirect(f_) == 0; }
  bool stream_truncated() const { return truncated_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  gzFile f_ = nullptr;
  bool eof_ = false, truncated_ = false;
};

uint32_t read_be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// " (after gzip decompression; the gzip stream itself ends early)" etc., to append to size messages.
std::string size_note(const GzReader& r) {
  if (!r.compressed()) return "";
  return r.stream_truncated() ? " after gzip decompression; the gzip stream itself ends early"
                              : " after gzip decompression";
}

// Reads the header (magic + dims) of an IDX file and checks the magic.
void read_idx_header(GzReader& r, uint32_t want_magic, int ndims, uint32_t* dims) {
  const size_t header = 4 + 4 * static_cast<size_t>(ndims);
  uint8_t buf[16];
  const size_t got = r.read(buf, header);
  const char* kind = want_magic == kIdxImagesMagic ? "IDX3 unsigned-byte images" : "IDX1 unsigned-byte labels";
  if (got >= 4) {
    const uint32_t magic = read_be32(buf);
    if (magic != want_magic) {
      if (magic == kIdxImagesMagic || magic == kIdxLabelsMagic)
        SAV_THROW("'" << r.path() << "' has magic " << hex32(magic) << " ("
                      << (magic == kIdxImagesMagic ? "an IDX3 image file" : "an IDX1 label file") << "), expected "
                      << hex32(want_magic) << " (" << kind << "); are the images and labels paths swapped?");
      SAV_THROW("'" << r.path() << "' is not an " << kind << " file: magic number " << hex32(magic)
                    << ", expected " << hex32(want_magic));
    }
  }
  SAV_CHECK(got == header, "IDX file '" << r.path() << "' is truncated: expected at least " << header
                                        << " bytes of header, found " << got << size_note(r));
  for (int d = 0; d < ndims; ++d) dims[d] = read_be32(buf + 4 + 4 * d);
}

// Reads exactly `expected` body bytes into out (grown as data arrives, so a lying header cannot make us
// allocate more than the file holds plus one chunk), then checks nothing follows.
void read_idx_body(GzReader& r, size_t header, size_t expected, const std::string& what,
                   std::vector<uint8_t>& out) {
  constexpr size_t kChunk = size_t(1) << 24;
  out.clear();
  size_t got = 0;
  while (got < expected) {
    const size_t want = std::min(kChunk, expected - got);
    out.resize(got + want);
    const size_t r_got = r.read(out.data() + got, want);
    got += r_got;
    if (r_got < want) break;
  }
  out.resize(got);
  SAV_CHECK(got == expected, "IDX file '" << r.path() << "' is truncated: expected " << header + expected
                                          << " bytes (" << header << "-byte header + " << what << "), found "
                                          << header + got << size_note(r)
                                          << "; re-download or reinstall the file");
  uint8_t extra;
  SAV_CHECK(r.read(&extra, 1) == 0, "IDX file '" << r.path() << "' has data after the expected "
                                                 << header + expected << " bytes (" << header
                                                 << "-byte header + " << what << "); is it the right file?");
}

}  // namespace

Dataset load_idx(const std::string& images_path, const std::string& labels_path) {
  Dataset ds;
  uint32_t n_images = 0;
  {
    GzReader r(images_path);
    uint32_t dims[3];
    read_idx_header(r, kIdxImagesMagic, 3, dims);
    n_images = dims[0];
    const uint32_t rows = dims[1], cols = dims[2];
    SAV_CHECK(n_images >= 1 && n_images <= uint32_t(INT_MAX),
              "IDX file '" << images_path << "' claims " << n_images << " images; expected 1.." << INT_MAX);
    SAV_CHECK(rows >= 1 && cols >= 1 && rows <= 65535 && cols <= 65535,
              "IDX file '" << images_path << "' claims images of " << rows << " x " << cols
                           << "; expected 1..65535 per side");
    const size_t expected = size_t(n_images) * rows * cols;
    const std::string what = std::to_string(n_images) + " x " + std::to_string(rows) + " x " +
                             std::to_string(cols) + " pixels";
    read_idx_body(r, 16, expected, what, ds.pixels);
    ds.n = static_cast<int>(n_images);
    ds.channels = 1;
    ds.height = static_cast<int>(rows);
    ds.width = static_cast<int>(cols);
  }
  {
    GzReader r(labels_path);
    uint32_t dims[1];
    read_idx_header(r, kIdxLabelsMagic, 1, dims);
    const uint32_t n_labels = dims[0];
    SAV_CHECK(n_labels == n_images, "images file '" << images_path << "' has " << n_images
                                                    << " images but labels file '" << labels_path << "' has "
                                                    << n_labels << " labels; the counts must be equal");
    std::vector<uint8_t> raw;
    read_idx_body(r, 8, n_labels, std::to_string(n_labels) + " labels", raw);
    ds.labels.assign(raw.begin(), raw.end());  // u8, so every label is < 256
  }
  const int max_label = *std::max_element(ds.labels.begin(), ds.labels.end());
  ds.num_classes = max_label + 1;
  for (int k = 0; k < ds.num_classes; ++k) ds.class_names.push_back(std::to_string(k));
  ds.source = images_path;
  return ds;
}

Dataset load_fashion_mnist(const std::string& dir_in, bool train) {
  const std::string dir = dir_in.empty() ? std::string(kFashionMnistDir) : dir_in;
  const char* hint = "install it with: apt-get install dataset-fashion-mnist (or pass --data DIR)";
  std::error_code ec;
  SAV_CHECK(fs::is_directory(dir, ec), "Fashion-MNIST folder '" << dir << "' is missing; " << hint);
  auto find = [&](const std::string& name) {
    const fs::path gz = fs::path(dir) / (name + ".gz"), plain = fs::path(dir) / name;
    if (fs::is_regular_file(gz, ec)) return gz.string();
    if (fs::is_regular_file(plain, ec)) return plain.string();
    SAV_THROW("Fashion-MNIST file '" << gz.string() << "' is missing (nor is there an uncompressed '" << name
                                     << "'); " << hint);
  };
  const std::string split = train ? "train" : "t10k";
  const std::string images = find(split + "-images-idx3-ubyte"), labels = find(split + "-labels-idx1-ubyte");
  Dataset ds = load_idx(images, labels);
  SAV_CHECK(ds.height == 28 && ds.width == 28,
            "'" << images << "' holds " << ds.height << " x " << ds.width << " images; Fashion-MNIST is 28 x 28");
  SAV_CHECK(ds.num_classes <= 10, "'" << labels << "' has label " << ds.num_classes - 1
                                      << "; Fashion-MNIST labels are 0..9");
  ds.num_classes = 10;
  ds.class_names.assign(kFashionMnistClasses, kFashionMnistClasses + 10);
  ds.source = "fashion-mnist " + split + " (" + dir + ")";
  return ds;
}

// ------------------------------------------------------------------------------------------------ folder

namespace {

bool is_image_file(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char ch) { return std::tolower(ch); });
  return ext == ".jpg" || ext == ".jpeg" || ext == ".png";
}

}  // namespace

Dataset load_image_folder(const std::string& root, int image_size, int channels, int resize_to) {
  SAV_CHECK(image_size >= 1, "load_image_folder: image_size must be positive, got " << image_size);
  SAV_CHECK(channels >= 1 && channels <= 4, "load_image_folder: channels must be 1..4, got " << channels);
  if (resize_to == 0) resize_to = image_size * 256 / 224;
  SAV_CHECK(resize_to >= image_size, "load_image_folder: resize_to (" << resize_to
                                         << ") must be at least image_size (" << image_size << ")");
  std::error_code ec;
  SAV_CHECK(fs::exists(root, ec), "image folder '" << root << "' does not exist");
  SAV_CHECK(fs::is_directory(root, ec), "image folder '" << root << "' is not a directory");

  // Class folders (hidden ones skipped), sorted by name.
  // Lists a folder; filesystem errors (permissions, races) become sav::Error naming the folder.
  auto list = [](const fs::path& dir) {
    std::error_code ec;
    std::vector<fs::directory_entry> entries;
    fs::directory_iterator it(dir, ec), end;
    for (; !ec && it != end; it.increment(ec)) entries.push_back(*it);
    SAV_CHECK(!ec, "cannot list folder '" << dir.string() << "': " << ec.message());
    return entries;
  };
  std::vector<std::string> classes;
  for (const auto& e : list(root)) {
    const std::string name = e.path().filename().string();
    if (!name.empty() && name[0] != '.' && e.is_directory(ec)) classes.push_back(name);
  }
  std::sort(classes.begin(), classes.end());
  SAV_CHECK(!classes.empty(), "image folder '" << root << "' has no class subfolders; expected the ImageNet "
                                               << "layout root/<class>/<image>.jpg");

  std::vector<std::string> files;
  std::vector<int> labels;
  for (size_t k = 0; k < classes.size(); ++k) {
    std::vector<std::string> cls_files;
    for (const auto& e : list(fs::path(root) / classes[k])) {
      const std::string name = e.path().filename().string();
      if (!name.empty() && name[0] != '.' && e.is_regular_file(ec) && is_image_file(e.path()))
        cls_files.push_back(e.path().string());
    }
    std::sort(cls_files.begin(), cls_files.end());
    files.insert(files.end(), cls_files.begin(), cls_files.end());
    labels.insert(labels.end(), cls_files.size(), static_cast<int>(k));
  }
  SAV_CHECK(!files.empty(), "image folder '" << root << "' has " << classes.size()
                                             << " class folders but no .jpg/.jpeg/.png files in them");
  SAV_CHECK(files.size() <= size_t(INT_MAX), "image folder '" << root << "' has too many images");

  Dataset ds;
  ds.n = static_cast<int>(files.size());
  ds.channels = channels;
  ds.height = ds.width = image_size;
  ds.num_classes = static_cast<int>(classes.size());
  ds.class_names = classes;
  ds.labels = std::move(labels);
  ds.source = root;
  const size_t per = ds.image_size();
  try {
    ds.pixels.resize(per * ds.n);
  } catch (const std::bad_alloc&) {
    SAV_THROW("image folder '" << root << "': " << ds.n << " images of " << channels << " x " << image_size
                               << " x " << image_size << " need " << (per * ds.n) / (1 << 20)
                               << " MiB, which cannot be allocated");
  }

  // Decode in parallel; exceptions cannot leave an OpenMP region, so keep the first failure (by index,
  // for a deterministic message) and count the rest.
  int first_bad = -1, n_bad = 0;
  std::string first_msg;
#pragma omp parallel for schedule(dynamic, 4)
  for (int i = 0; i < ds.n; ++i) {
    try {
      Image im = load_image(files[i], channels);
      im = resize_shorter_side(im, resize_to);
      im = center_crop(im, image_size, image_size);
      std::memcpy(ds.pixels.data() + per * i, im.data.data(), per);
    } catch (const std::exception& e) {
#pragma omp critical(sav_image_folder_error)
      {
        ++n_bad;
        if (first_bad < 0 || i < first_bad) {
          first_bad = i;
          first_msg = e.what();
        }
      }
    }
  }
  if (first_bad >= 0) {
    if (n_bad > 1) SAV_THROW(first_msg << " (and " << n_bad - 1 << " more files in '" << root << "' failed)");
    SAV_THROW(first_msg);
  }
  return ds;
}

// ------------------------------------------------------------------------------------------------ batches

void make_batch(const Dataset& ds, const int* indices, int B, const Normalize& norm, const Augment& aug,
                Rng* rng, float* images, int* labels) {
  SAV_CHECK(B >= 0, "make_batch: batch size must be >= 0, got " << B);
  if (B == 0) return;
  SAV_CHECK(indices && images && labels, "make_batch: null indices/images/labels pointer");
  const int C = ds.channels, H = ds.height, W = ds.width;
  SAV_CHECK(ds.n > 0 && ds.pixels.size() == size_t(ds.n) * ds.image_size() && ds.labels.size() == size_t(ds.n),
            "make_batch: data set '" << ds.source << "' is empty or inconsistent");
  SAV_CHECK(norm.mean.size() == norm.std.size() && (norm.mean.size() == size_t(C) || norm.mean.size() == 1),
            "make_batch: Normalize has " << norm.mean.size() << " means and " << norm.std.size()
                                         << " stds; the data set has " << C << " channels (give " << C
                                         << " or 1 of each)");
  SAV_CHECK(aug.pad_crop >= 0, "make_batch: pad_crop must be >= 0, got " << aug.pad_crop);
  for (int b = 0; b < B; ++b)
    SAV_CHECK(indices[b] >= 0 && indices[b] < ds.n,
              "make_batch: index " << indices[b] << " at batch position " << b << " out of range [0, " << ds.n << ")");

  // value = pixel * scale[c] + bias[c] = (pixel / 255 - mean) / std
  std::vector<float> scale(C), bias(C);
  for (int c = 0; c < C; ++c) {
    const float m = norm.mean.size() == 1 ? norm.mean[0] : norm.mean[c];
    const float s = norm.std.size() == 1 ? norm.std[0] : norm.std[c];
    SAV_CHECK(s > 0.0f, "make_batch: Normalize std must be positive, got " << s << " for channel " << c);
    scale[c] = 1.0f / (255.0f * s);
    bias[c] = -m / s;
  }

  // All random numbers first, serially, in a fixed order: per image dy, dx (if pad_crop), flip (if hflip).
  const int P = aug.pad_crop;
  std::vector<int> dy(B, P), dx(B, P);  // offsets into the padded image; P = no shift
  std::vector<uint8_t> flip(B, 0);
  if (rng) {
    for (int b = 0; b < B; ++b) {
      if (P > 0 && (b == 0 || !aug.crop_per_batch)) {
        dy[b] = static_cast<int>(rng->below(2 * P + 1));
        dx[b] = static_cast<int>(rng->below(2 * P + 1));
      } else if (P > 0) {
        dy[b] = dy[0];
        dx[b] = dx[0];
      }
      if (aug.hflip) flip[b] = static_cast<uint8_t>(rng->below(2));
    }
  }

  // out(y, x) = padded(y + dy, x' + dx) with x' = flip ? W-1-x : x (crop, then flip, as torchvision's
  // RandomCrop -> RandomHorizontalFlip); padded(Y, X) = src(Y - P, X - P), 0 outside.
  const size_t per = ds.image_size();
#pragma omp parallel for schedule(static)
  for (int b = 0; b < B; ++b) {
    const uint8_t* src = ds.image(indices[b]);
    float* out = images + per * b;
    const int oy = dy[b] - P, ox = dx[b] - P;
    for (int c = 0; c < C; ++c) {
      const float sc = scale[c], bi = bias[c];
      for (int y = 0; y < H; ++y) {
        float* o = out + (size_t(c) * H + y) * W;
        const int sy = y + oy;
        if (sy < 0 || sy >= H) {
          for (int x = 0; x < W; ++x) o[x] = bi;
          continue;
        }
        const uint8_t* row = src + (size_t(c) * H + sy) * W;
        if (!flip[b] && ox == 0) {
          for (int x = 0; x < W; ++x) o[x] = row[x] * sc + bi;
          continue;
        }
        for (int x = 0; x < W; ++x) {
          const int sx = (flip[b] ? W - 1 - x : x) + ox;
          o[x] = (sx >= 0 && sx < W) ? row[sx] * sc + bi : bi;
        }
      }
    }
    labels[b] = ds.labels[indices[b]];
  }
}

}  // namespace sav
