#include "core/tensor.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "core/error.h"

namespace sav {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::u8: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "F32";
    case DType::f16: return "F16";
    case DType::bf16: return "BF16";
    case DType::i32: return "I32";
    case DType::i64: return "I64";
    case DType::u8: return "U8";
  }
  return "?";
}

const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  if (s.size() == 1) os << ",";
  os << ")";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    SAV_CHECK(d >= 0, "negative dimension in shape " << shape_str(s));
    n *= d;
  }
  return n;
}

std::shared_ptr<Storage> Storage::allocate(size_t bytes, Device dev) {
  SAV_CHECK(dev == Device::cpu, "the " << device_name(dev) << " backend is not built into this binary");
  auto st = std::shared_ptr<Storage>(new Storage());
  size_t rounded = (bytes + 63) / 64 * 64;
  if (rounded == 0) rounded = 64;
  st->data_ = std::aligned_alloc(64, rounded);
  SAV_CHECK(st->data_ != nullptr, "out of memory allocating " << bytes << " bytes");
  st->bytes_ = bytes;
  st->owned_ = true;
  st->device_ = dev;
  return st;
}

std::shared_ptr<Storage> Storage::borrow(void* data, size_t bytes, std::shared_ptr<void> keep_alive) {
  auto st = std::shared_ptr<Storage>(new Storage());
  st->data_ = data;
  st->bytes_ = bytes;
  st->owned_ = false;
  st->keep_alive_ = std::move(keep_alive);
  return st;
}

Storage::~Storage() {
  if (owned_) std::free(data_);
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device dev) {
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.storage_ = Storage::allocate(static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype), dev);
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device dev) {
  Tensor t = empty(shape, dtype, dev);
  std::memset(t.data(), 0, t.nbytes());
  return t;
}

Tensor Tensor::from_storage(std::shared_ptr<Storage> st, const Shape& shape, DType dtype, size_t byte_offset) {
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  SAV_CHECK(byte_offset + static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype) <= st->bytes(),
            "tensor of shape " << shape_str(shape) << " does not fit its storage");
  t.storage_ = std::move(st);
  t.offset_ = byte_offset;
  return t;
}

Tensor Tensor::from_vector(const std::vector<float>& v, const Shape& shape) {
  SAV_CHECK(static_cast<int64_t>(v.size()) == shape_numel(shape),
            "vector of " << v.size() << " values cannot fill shape " << shape_str(shape));
  Tensor t = empty(shape);
  if (!v.empty()) std::memcpy(t.data(), v.data(), v.size() * sizeof(float));
  return t;
}

int64_t Tensor::dim(int i) const {
  int n = ndim();
  int j = i < 0 ? i + n : i;
  SAV_CHECK(j >= 0 && j < n, "dimension " << i << " out of range for shape " << shape_str(shape_));
  return shape_[j];
}

void* Tensor::data() const {
  SAV_CHECK(storage_ != nullptr, "use of an undefined tensor");
  return static_cast<char*>(storage_->data()) + offset_;
}

float* Tensor::f32() const {
  SAV_CHECK(dtype_ == DType::f32, "expected an F32 tensor, got " << dtype_name(dtype_));
  SAV_CHECK(device() == Device::cpu, "expected a CPU tensor, got one on " << device_name(device()));
  return static_cast<float*>(data());
}

Tensor Tensor::reshape(const Shape& shape) const {
  SAV_CHECK(shape_numel(shape) == numel(),
            "cannot reshape " << shape_str(shape_) << " to " << shape_str(shape));
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  SAV_CHECK(ndim() >= 1 && begin >= 0 && begin <= end && end <= shape_[0],
            "rows [" << begin << ", " << end << ") out of range for shape " << shape_str(shape_));
  Tensor t = *this;
  int64_t row = numel() / std::max<int64_t>(shape_[0], 1);
  t.offset_ = offset_ + static_cast<size_t>(begin * row) * dtype_size(dtype_);
  t.shape_[0] = end - begin;
  return t;
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device());
  std::memcpy(t.data(), data(), nbytes());
  return t;
}

Tensor Tensor::to_f32() const {
  Tensor t = empty(shape_, DType::f32);
  float* out = t.f32();
  int64_t n = numel();
  switch (dtype_) {
    case DType::f32: std::memcpy(out, data(), nbytes()); break;
    case DType::f16: {
      const uint16_t* in = as<uint16_t>();
      for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(in[i]);
      break;
    }
    case DType::bf16: {
      const uint16_t* in = as<uint16_t>();
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(in[i]);
      break;
    }
    case DType::i32: {
      const int32_t* in = as<int32_t>();
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
      break;
    }
    case DType::i64: {
      const int64_t* in = as<int64_t>();
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
      break;
    }
    case DType::u8: {
      const uint8_t* in = as<uint8_t>();
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
      break;
    }
  }
  return t;
}

void Tensor::fill(float v) const {
  float* p = f32();
  for (int64_t i = 0, n = numel(); i < n; ++i) p[i] = v;
}

void Tensor::copy_from(const Tensor& other) const {
  SAV_CHECK(other.numel() == numel(), "copy of " << shape_str(other.shape()) << " into " << shape_str(shape_));
  std::memcpy(f32(), other.f32(), nbytes());
}

std::vector<float> Tensor::to_vector() const {
  Tensor t = dtype_ == DType::f32 ? *this : to_f32();
  const float* p = t.f32();
  return std::vector<float>(p, p + numel());
}

void check_shape(const Tensor& t, const Shape& shape, const std::string& what) {
  SAV_CHECK(t.defined(), what << ": tensor is missing");
  SAV_CHECK(t.shape() == shape,
            what << ": expected shape " << shape_str(shape) << ", got " << shape_str(t.shape()));
}

float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal
      int e = -1;
      do { ++e; mant <<= 1; } while ((mant & 0x400u) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  int32_t exp = static_cast<int32_t>((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (((x >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    uint32_t shift = static_cast<uint32_t>(14 - exp);
    uint32_t half = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) ++half;
  return static_cast<uint16_t>(half);
}

float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // NaN stays NaN
  uint32_t rounding = 0x7fffu + ((x >> 16) & 1);
  return static_cast<uint16_t>((x + rounding) >> 16);
}

}  // namespace sav
