// moelab: Tensor, a typed view of device memory with shared ownership of its storage.
//
// A Tensor is cheap to copy (it shares storage); `view_rows` makes sub-views without copying.
// Tensors are row-major and contiguous. The data lives on `device`; host code may only touch
// `data` when device == Device::CPU. Storage is allocated by a Backend (core/backend.h).
#pragma once
#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/check.h"

namespace moelab {

// bf16 storage type: the top 16 bits of an IEEE float, round-to-nearest-even on conversion.
struct bf16 {
  uint16_t bits = 0;
  static bf16 from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return bf16{uint16_t(u >> 16)};
  }
  float to_float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

enum class DType { F64, F32, BF16, I32 };
enum class Device { CPU, CUDA };

size_t dtype_size(DType dt);
const char* to_string(DType dt);
const char* to_string(Device dv);
bool is_float(DType dt);

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<bf16>() { return DType::BF16; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }

constexpr int kMaxDims = 4;

struct Shape {
  std::array<int64_t, kMaxDims> dims{};
  int ndim = 0;
  Shape() = default;
  Shape(std::initializer_list<int64_t> d);
  explicit Shape(const std::vector<int64_t>& d);
  int64_t operator[](int i) const { return dims[i]; }
  int64_t numel() const;
  bool operator==(const Shape& o) const;
  bool operator!=(const Shape& o) const { return !(*this == o); }
  std::string str() const;  // "[T=.., ..]" style: "[4, 8]"
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<void> storage, void* data, Shape shape, DType dtype, Device device)
      : storage_(std::move(storage)), data_(data), shape_(shape), dtype_(dtype), device_(device) {}

  bool defined() const { return shape_.ndim > 0; }
  void* data() const { return data_; }
  template <class T> T* ptr() const {
    MOELAB_CHECK(dtype_of<T>() == dtype_, "tensor dtype is ", to_string(dtype_), ", accessed as ",
                 to_string(dtype_of<T>()));
    return static_cast<T*>(data_);
  }
  const Shape& shape() const { return shape_; }
  int ndim() const { return shape_.ndim; }
  int64_t dim(int i) const { return shape_[i < 0 ? shape_.ndim + i : i]; }
  int64_t numel() const { return shape_.numel(); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

  // Rows [begin, end) of the leading dimension, sharing storage.
  Tensor view_rows(int64_t begin, int64_t end) const;
  // Same storage with another shape of the same numel.
  Tensor reshape(Shape s) const;
  std::string describe() const;  // "f32[4, 8]@cpu"

 private:
  std::shared_ptr<void> storage_;
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
};

// Host helpers: a new CPU tensor of `dtype` holding `values` (converted), and the values of a
// CPU tensor as doubles. Used for initialisation, tests and logging; not on hot paths.
Tensor host_tensor(const std::vector<double>& values, Shape shape, DType dtype);
// An uninitialised host tensor.
Tensor host_empty(Shape shape, DType dtype);
std::vector<double> host_values(const Tensor& host);

}  // namespace moelab
