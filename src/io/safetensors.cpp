#include "io/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/error.h"
#include "io/atomic_file.h"

namespace sav {

static_assert(std::endian::native == std::endian::little,
              "safetensors stores little-endian data; this reader/writer assumes a little-endian host");

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// ---- helpers ----

struct Mapping {
  void* addr = nullptr;
  size_t len = 0;
  Mapping(void* a, size_t l) : addr(a), len(l) {}
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (addr) ::munmap(addr, len);
  }
};

struct Entry {
  DType dtype = DType::f32;
  Shape shape;
  uint64_t begin = 0, end = 0;  // relative to the data region
};

std::string errno_str(int e) { return std::string(std::strerror(e)) + " (errno " + std::to_string(e) + ")"; }

// Parses JSON text, rejecting repeated keys in any object (nlohmann would silently keep one of them).
// Parse errors come back as sav::Error prefixed by `what`.
json parse_json_strict(const char* begin, const char* end, const std::string& what) {
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string repeated;
  auto cb = [&](int /*depth*/, json::parse_event_t ev, json& parsed) -> bool {
    switch (ev) {
      case json::parse_event_t::object_start: keys.emplace_back(); break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys.empty() && parsed.is_string() && !keys.back().insert(parsed.get<std::string>()).second &&
            repeated.empty())
          repeated = parsed.get<std::string>();
        break;
      default: break;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(begin, end, cb, /*allow_exceptions=*/true);
  } catch (const json::exception& e) {
    SAV_THROW(what << ": header is not valid JSON: " << e.what());
  }
  SAV_CHECK(repeated.empty(), what << ": the key '" << repeated << "' appears twice in the same JSON object");
  return j;
}

// A JSON value that must be a non-negative integer fitting in int64. `field` names it in errors.
uint64_t json_nonneg_int(const json& v, const std::string& where, const std::string& field) {
  if (v.is_number_unsigned()) {
    uint64_t x = v.get<uint64_t>();
    SAV_CHECK(x <= static_cast<uint64_t>(INT64_MAX), where << ": " << field << " = " << x << " is too large");
    return x;
  }
  if (v.is_number_integer()) {
    int64_t x = v.get<int64_t>();
    SAV_CHECK(x >= 0, where << ": " << field << " = " << x << " is negative");
    return static_cast<uint64_t>(x);
  }
  SAV_THROW(where << ": " << field << " must be a non-negative integer, got " << v.dump());
}

std::string nearest_names(const std::map<std::string, Entry>& m, const std::string& name) {
  if (m.empty()) return "it holds no tensors";
  auto it = m.lower_bound(name);
  std::ostringstream os;
  os << "it holds " << m.size() << " tensors; nearest names:";
  if (it != m.begin()) os << " '" << std::prev(it)->first << "'";
  if (it != m.end()) os << " '" << it->first << "'";
  return os.str();
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

DType safetensors_dtype_from_name(const std::string& name) {
  if (name == "F32") return DType::f32;
  if (name == "F16") return DType::f16;
  if (name == "BF16") return DType::bf16;
  if (name == "I32") return DType::i32;
  if (name == "I64") return DType::i64;
  if (name == "U8") return DType::u8;
  SAV_THROW("unsupported safetensors dtype '" << name << "' (supported: F32, F16, BF16, I32, I64, U8)");
}

// ---- SafeTensors ----

struct SafeTensors::Impl {
  std::string path;
  std::shared_ptr<Mapping> mapping;
  const char* data = nullptr;  // start of the data region
  uint64_t data_size = 0;
  std::map<std::string, Entry> entries;
  std::map<std::string, std::string> metadata;

  const Entry& find(const std::string& name) const {
    auto it = entries.find(name);
    if (it == entries.end())
      SAV_THROW("safetensors file '" << path << "' has no tensor '" << name << "' (" << nearest_names(entries, name)
                                     << ")");
    return it->second;
  }
};

SafeTensors SafeTensors::open(const std::string& path) {
  const std::string what = "safetensors file '" + path + "'";
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    SAV_THROW("cannot open " << what << ": " << errno_str(e));
  }
  struct stat sb;
  if (::fstat(fd, &sb) != 0) {
    int e = errno;
    ::close(fd);
    SAV_THROW("cannot stat " << what << ": " << errno_str(e));
  }
  if (!S_ISREG(sb.st_mode)) {
    ::close(fd);
    SAV_THROW(what << " is not a regular file" << (S_ISDIR(sb.st_mode) ? " (it is a folder)" : ""));
  }
  const uint64_t file_size = static_cast<uint64_t>(sb.st_size);
  if (file_size < 8) {
    ::close(fd);
    SAV_THROW(what << " is " << file_size << " bytes, too short: a safetensors file starts with an 8-byte header length");
  }
  // Copy-on-write: views handed out may be written to without touching the file.
  void* addr = ::mmap(nullptr, file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);  // the mapping stays valid without the descriptor
  if (addr == MAP_FAILED) SAV_THROW("cannot memory-map " << what << ": " << errno_str(map_errno));

  auto impl = std::make_shared<Impl>();
  impl->path = path;
  impl->mapping = std::make_shared<Mapping>(addr, file_size);
  const char* base = static_cast<const char*>(addr);

  uint64_t n = 0;
  std::memcpy(&n, base, 8);
  SAV_CHECK(n <= k_safetensors_max_header_bytes,
            what << ": header length " << n << " exceeds the limit of " << k_safetensors_max_header_bytes
                 << " bytes (100 MB); the file is corrupt or not safetensors");
  SAV_CHECK(n <= file_size - 8, what << ": header length " << n << " is larger than the file (" << file_size
                                     << " bytes) minus 8; the file is truncated or corrupt");
  impl->data = base + 8 + n;
  impl->data_size = file_size - 8 - n;

  // Valid JSON never holds a raw NUL byte, but nlohmann stops parsing at one: "{}\0<anything>" would pass.
  SAV_CHECK(std::memchr(base + 8, 0, n) == nullptr,
            what << ": header is not valid JSON: it contains a NUL byte (padding must be spaces)");
  json header = parse_json_strict(base + 8, base + 8 + n, what);
  SAV_CHECK(header.is_object(), what << ": header must be a JSON object, got " << header.type_name());

  struct Span {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Span> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      SAV_CHECK(v.is_object(), what << ": __metadata__ must be a JSON object, got " << v.type_name());
      for (auto m = v.begin(); m != v.end(); ++m) {
        SAV_CHECK(m.value().is_string(), what << ": __metadata__ value of '" << m.key()
                                              << "' must be a string, got " << m.value().dump());
        impl->metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = what + ", tensor '" + name + "'";
    SAV_CHECK(v.is_object(), where << ": entry must be a JSON object, got " << v.type_name());
    for (const char* field : {"dtype", "shape", "data_offsets"})
      SAV_CHECK(v.contains(field), where << ": entry lacks \"" << field << "\"");

    const json& jd = v["dtype"];
    SAV_CHECK(jd.is_string(), where << ": dtype must be a string, got " << jd.dump());
    Entry e;
    const std::string dname = jd.get<std::string>();
    try {
      e.dtype = safetensors_dtype_from_name(dname);
    } catch (const Error&) {
      SAV_THROW(where << ": unknown or unsupported dtype '" << dname << "' (supported: F32, F16, BF16, I32, I64, U8)");
    }

    const json& js = v["shape"];
    SAV_CHECK(js.is_array(), where << ": shape must be a JSON array, got " << js.dump());
    // Product of the non-zero dimensions must fit in int64 even when another dimension is 0, so that
    // any later shape arithmetic (shape_numel) cannot overflow.
    uint64_t numel = 1;
    bool overflow = false, has_zero = false;
    for (size_t i = 0; i < js.size(); ++i) {
      uint64_t d = json_nonneg_int(js[i], where, "shape[" + std::to_string(i) + "]");
      e.shape.push_back(static_cast<int64_t>(d));
      if (d == 0) { has_zero = true; continue; }
      uint64_t prod;
      if (__builtin_mul_overflow(numel, d, &prod) || prod > static_cast<uint64_t>(INT64_MAX)) overflow = true;
      else numel = prod;
    }
    SAV_CHECK(!overflow, where << ": shape " << shape_str(e.shape) << " has more than 2^63 elements (numel overflow)");
    if (has_zero) numel = 0;
    uint64_t bytes;
    SAV_CHECK(!__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(e.dtype)), &bytes),
              where << ": shape " << shape_str(e.shape) << " of " << dname << " overflows the byte count");

    const json& jo = v["data_offsets"];
    SAV_CHECK(jo.is_array() && jo.size() == 2,
              where << ": data_offsets must be an array [begin, end], got " << jo.dump());
    e.begin = json_nonneg_int(jo[0], where, "data_offsets[0] (begin)");
    e.end = json_nonneg_int(jo[1], where, "data_offsets[1] (end)");
    SAV_CHECK(e.begin <= e.end, where << ": data_offsets begin " << e.begin << " > end " << e.end);
    SAV_CHECK(e.end <= impl->data_size, where << ": data_offsets [" << e.begin << ", " << e.end
                                              << ") run out of the data region (" << impl->data_size
                                              << " bytes); the file is truncated or corrupt");
    SAV_CHECK(e.end - e.begin == bytes, where << ": data_offsets span " << (e.end - e.begin) << " bytes but shape "
                                              << shape_str(e.shape) << " of " << dname << " needs " << bytes);
    auto [pos, inserted] = impl->entries.emplace(name, std::move(e));
    SAV_CHECK(inserted, where << ": the name appears twice");
    if (pos->second.end > pos->second.begin) spans.push_back({pos->second.begin, pos->second.end, &pos->first});
  }

  // Overlap: sorted by begin, each tensor must start at or after the end of the previous one.
  // Empty tensors own no bytes and cannot overlap anything.
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (size_t i = 1; i < spans.size(); ++i)
    SAV_CHECK(spans[i].begin >= spans[i - 1].end,
              what << ": tensors '" << *spans[i - 1].name << "' [" << spans[i - 1].begin << ", " << spans[i - 1].end
                   << ") and '" << *spans[i].name << "' [" << spans[i].begin << ", " << spans[i].end
                   << ") overlap in the data region");
  return SafeTensors(std::move(impl));
}

std::vector<std::string> SafeTensors::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->entries.size());
  for (const auto& kv : impl_->entries) out.push_back(kv.first);
  return out;
}

bool SafeTensors::contains(const std::string& name) const { return impl_->entries.count(name) != 0; }
size_t SafeTensors::size() const { return impl_->entries.size(); }
Shape SafeTensors::shape(const std::string& name) const { return impl_->find(name).shape; }
DType SafeTensors::dtype(const std::string& name) const { return impl_->find(name).dtype; }
size_t SafeTensors::nbytes(const std::string& name) const {
  const Entry& e = impl_->find(name);
  return static_cast<size_t>(e.end - e.begin);
}
const std::map<std::string, std::string>& SafeTensors::metadata() const { return impl_->metadata; }
std::string SafeTensors::path() const { return impl_->path; }

Tensor SafeTensors::get_raw(const std::string& name) const {
  const Entry& e = impl_->find(name);
  const size_t bytes = static_cast<size_t>(e.end - e.begin);
  if (bytes == 0) return Tensor::empty(e.shape, e.dtype);
  const char* p = impl_->data + e.begin;
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(e.dtype) == 0) {
    // Zero-copy: the Storage holds the mapping alive. The mapping is private and writable (see open()).
    auto st = Storage::borrow(const_cast<char*>(p), bytes, std::shared_ptr<void>(impl_->mapping));
    return Tensor::from_storage(std::move(st), e.shape, e.dtype);
  }
  Tensor t = Tensor::empty(e.shape, e.dtype);
  std::memcpy(t.data(), p, bytes);
  return t;
}

Tensor SafeTensors::get(const std::string& name) const {
  Tensor raw = get_raw(name);
  return raw.dtype() == DType::f32 ? raw : raw.to_f32();
}

// ---- writer ----

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  const std::string what = "saving safetensors file '" + path + "'";
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    SAV_CHECK(!name.empty(), what << ": a tensor has an empty name");
    SAV_CHECK(name != "__metadata__", what << ": \"__metadata__\" is reserved and cannot name a tensor");
    SAV_CHECK(seen.insert(name).second, what << ": the tensor name '" << name << "' is given twice");
    SAV_CHECK(t.defined(), what << ": tensor '" << name << "' is undefined");
    SAV_CHECK(t.device() == Device::cpu, what << ": tensor '" << name << "' lives on " << device_name(t.device())
                                              << "; copy it to the CPU first");
  }

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    uint64_t bytes = t.nbytes();
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = dtype_name(t.dtype());
    entry["shape"] = t.shape();
    entry["data_offsets"] = {offset, offset + bytes};
    header[name] = std::move(entry);
    offset += bytes;
  }
  std::string text;
  try {
    text = header.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::strict);
  } catch (const nlohmann::ordered_json::exception& e) {
    SAV_THROW(what << ": a tensor name or metadata string is not valid UTF-8: " << e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  SAV_CHECK(text.size() <= k_safetensors_max_header_bytes,
            what << ": the header would be " << text.size() << " bytes, over the 100 MB limit of readers");

  AtomicFile f(path);
  uint64_t n = text.size();
  f.write(&n, 8);
  f.write(text.data(), text.size());
  for (const auto& [name, t] : tensors)
    if (t.nbytes() > 0) f.write(t.data(), t.nbytes());
  f.commit();
}

// ---- Checkpoint ----

Checkpoint Checkpoint::open(const std::string& path) {
  std::error_code ec;
  fs::file_status status = fs::status(path, ec);
  SAV_CHECK(fs::exists(status), "checkpoint '" << path << "' does not exist");

  if (fs::is_directory(status)) {
    fs::path single = fs::path(path) / "model.safetensors";
    fs::path index = fs::path(path) / "model.safetensors.index.json";
    if (fs::is_regular_file(single, ec)) return open(single.string());
    if (fs::is_regular_file(index, ec)) return open(index.string());
    SAV_THROW("checkpoint folder '" << path
                                    << "' holds neither model.safetensors nor model.safetensors.index.json");
  }

  Checkpoint ck;
  ck.path_ = path;
  if (!ends_with(path, ".json")) {
    ck.shards_.push_back(SafeTensors::open(path));
    for (const std::string& name : ck.shards_[0].names()) ck.where_[name] = 0;
    ck.metadata_ = ck.shards_[0].metadata();
    return ck;
  }

  // Sharded: read and validate the index.
  const std::string what = "safetensors index '" + path + "'";
  std::ifstream in(path, std::ios::binary);
  SAV_CHECK(in, "cannot open " << what << ": " << errno_str(errno));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  SAV_CHECK(!in.bad(), "cannot read " << what);
  SAV_CHECK(text.find('\0') == std::string::npos, what << ": not valid JSON: it contains a NUL byte");
  json index = parse_json_strict(text.data(), text.data() + text.size(), what);
  SAV_CHECK(index.is_object(), what << ": must be a JSON object, got " << index.type_name());
  SAV_CHECK(index.contains("weight_map") && index["weight_map"].is_object(),
            what << ": lacks a \"weight_map\" object (tensor name -> shard file)");
  const json& wm = index["weight_map"];
  SAV_CHECK(!wm.empty(), what << ": weight_map is empty");
  if (index.contains("metadata")) {
    const json& m = index["metadata"];
    SAV_CHECK(m.is_object(), what << ": \"metadata\" must be a JSON object, got " << m.type_name());
    for (auto it = m.begin(); it != m.end(); ++it)
      ck.metadata_[it.key()] = it.value().is_string() ? it.value().get<std::string>() : it.value().dump();
  }

  const fs::path folder = fs::path(path).parent_path();
  std::map<std::string, size_t> shard_ids;  // shard file name (as in the map) -> index in shards_
  std::vector<std::string> shard_names;
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    SAV_CHECK(it.value().is_string(),
              what << ": weight_map entry of tensor '" << it.key() << "' must be a file name, got " << it.value().dump());
    const std::string shard = it.value().get<std::string>();
    if (shard_ids.count(shard)) continue;
    fs::path rel(shard);
    bool escapes = std::any_of(rel.begin(), rel.end(), [](const fs::path& c) { return c == ".."; });
    SAV_CHECK(!shard.empty() && rel.is_relative() && !escapes,
              what << ": shard '" << shard << "' (of tensor '" << it.key()
                   << "') must be a file name relative to the index's folder");
    fs::path full = folder / rel;
    SAV_CHECK(fs::is_regular_file(full, ec), what << ": shard '" << shard << "' (of tensor '" << it.key()
                                                  << "') does not exist: no file '" << full.string() << "'");
    shard_ids[shard] = shard_names.size();
    shard_names.push_back(shard);
  }
  for (const std::string& shard : shard_names) ck.shards_.push_back(SafeTensors::open((folder / shard).string()));

  for (size_t s = 0; s < ck.shards_.size(); ++s) {
    for (const std::string& name : ck.shards_[s].names()) {
      auto [pos, inserted] = ck.where_.emplace(name, s);
      SAV_CHECK(inserted, what << ": tensor '" << name << "' is in two shards, '" << shard_names[pos->second]
                               << "' and '" << shard_names[s] << "'");
    }
  }
  for (const auto& [name, s] : ck.where_)
    SAV_CHECK(wm.contains(name),
              what << ": tensor '" << name << "' is in shard '" << shard_names[s] << "' but not in the weight_map");
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    const std::string shard = it.value().get<std::string>();
    auto pos = ck.where_.find(it.key());
    SAV_CHECK(pos != ck.where_.end() && pos->second == shard_ids[shard],
              what << ": weight_map puts tensor '" << it.key() << "' in shard '" << shard << "', but that shard "
                   << "does not hold it");
  }
  return ck;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}

bool Checkpoint::contains(const std::string& name) const { return where_.count(name) != 0; }
size_t Checkpoint::size() const { return where_.size(); }

const SafeTensors& Checkpoint::shard_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    std::ostringstream os;
    os << "checkpoint '" << path_ << "' has no tensor '" << name << "' (it holds " << where_.size() << " tensors";
    auto nb = where_.lower_bound(name);
    if (!where_.empty()) os << "; nearest names:";
    if (nb != where_.begin() && !where_.empty()) os << " '" << std::prev(nb)->first << "'";
    if (nb != where_.end()) os << " '" << nb->first << "'";
    os << ")";
    SAV_THROW(os.str());
  }
  return shards_[it->second];
}

Shape Checkpoint::shape(const std::string& name) const { return shard_of(name).shape(name); }
DType Checkpoint::dtype(const std::string& name) const { return shard_of(name).dtype(name); }
Tensor Checkpoint::get(const std::string& name) const { return shard_of(name).get(name); }
Tensor Checkpoint::get_raw(const std::string& name) const { return shard_of(name).get_raw(name); }

}  // namespace sav
