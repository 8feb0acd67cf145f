// shiftaddvit: tensors.
//
// A Tensor is a shape, a dtype, a device and a shared contiguous buffer (plus an element offset, so a
// view of rows of a larger tensor shares memory). Shapes are row-major, PyTorch order. The CPU is the
// only device with storage today; Device::cuda is the seam where the CUDA backend plugs in.
//
//   sav::Tensor w = sav::Tensor::zeros({192, 64});      // f32 on the CPU
//   float* p = w.f32();                                   // raw pointer for the ops
//   sav::Tensor rows = w.rows(10, 20);                    // view of rows 10..19, shares the buffer
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sav {

enum class DType : uint8_t { f32, f16, bf16, i32, i64, u8 };
enum class Device : uint8_t { cpu, cuda };

size_t dtype_size(DType t);
const char* dtype_name(DType t);
const char* device_name(Device d);

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

// Owns (or borrows, for memory-mapped files) a block of bytes. Alignment is 64 bytes.
class Storage {
 public:
  static std::shared_ptr<Storage> allocate(size_t bytes, Device dev = Device::cpu);
  // Borrow external memory; `keep_alive` holds whatever owns it (a mapping, a file).
  static std::shared_ptr<Storage> borrow(void* data, size_t bytes, std::shared_ptr<void> keep_alive);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  Storage() = default;
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_ = Device::cpu;
  bool owned_ = false;
  std::shared_ptr<void> keep_alive_;
};

class Tensor {
 public:
  Tensor() = default;
  static Tensor empty(const Shape& shape, DType dtype = DType::f32, Device dev = Device::cpu);
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device dev = Device::cpu);
  static Tensor from_storage(std::shared_ptr<Storage> st, const Shape& shape, DType dtype, size_t byte_offset = 0);
  static Tensor from_vector(const std::vector<float>& v, const Shape& shape);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const;  // negative i counts from the end
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::cpu; }

  void* data() const;
  float* f32() const;  // throws unless dtype is f32 and the tensor lives on the CPU
  template <class T> T* as() const { return static_cast<T*>(data()); }

  // Views that share the buffer.
  Tensor reshape(const Shape& shape) const;
  Tensor rows(int64_t begin, int64_t end) const;  // rows of dim 0

  Tensor clone() const;
  Tensor to_f32() const;  // converts f16/bf16 to f32 (copy); f32 returns a copy
  void fill(float v) const;  // writes the data (the handle is const, the buffer is not)
  void copy_from(const Tensor& other) const;  // same numel, f32
  std::vector<float> to_vector() const;

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;  // bytes
  Shape shape_;
  DType dtype_ = DType::f32;
};

// Checks that `t` has exactly `shape`, naming `what` in the error.
void check_shape(const Tensor& t, const Shape& shape, const std::string& what);

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
float bf16_to_float(uint16_t h);
uint16_t float_to_bf16(float f);

}  // namespace sav
