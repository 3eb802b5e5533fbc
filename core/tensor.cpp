// moelab: Tensor and Shape helpers.
#include "core/tensor.h"

#include <sstream>

namespace moelab {

size_t dtype_size(DType dt) {
  switch (dt) {
    case DType::F64: return 8;
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::I32: return 4;
  }
  return 0;
}

const char* to_string(DType dt) {
  switch (dt) {
    case DType::F64: return "f64";
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
  }
  return "?";
}

const char* to_string(Device dv) { return dv == Device::CPU ? "cpu" : "cuda"; }

bool is_float(DType dt) { return dt != DType::I32; }

Shape::Shape(std::initializer_list<int64_t> d) {
  MOELAB_CHECK(d.size() <= size_t(kMaxDims), "tensor rank ", d.size(), " > ", kMaxDims);
  for (int64_t v : d) {
    MOELAB_CHECK(v >= 0, "negative dimension ", v);
    dims[ndim++] = v;
  }
}

Shape::Shape(const std::vector<int64_t>& d) {
  MOELAB_CHECK(d.size() <= size_t(kMaxDims), "tensor rank ", d.size(), " > ", kMaxDims);
  for (int64_t v : d) {
    MOELAB_CHECK(v >= 0, "negative dimension ", v);
    dims[ndim++] = v;
  }
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= dims[i];
  return n;
}

bool Shape::operator==(const Shape& o) const {
  if (ndim != o.ndim) return false;
  for (int i = 0; i < ndim; ++i)
    if (dims[i] != o.dims[i]) return false;
  return true;
}

std::string Shape::str() const {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << dims[i];
  os << "]";
  return os.str();
}

Tensor Tensor::view_rows(int64_t begin, int64_t end) const {
  MOELAB_CHECK(ndim() >= 1 && 0 <= begin && begin <= end && end <= dim(0), "view_rows [", begin,
               ", ", end, ") out of range for ", describe());
  Shape s = shape_;
  s.dims[0] = end - begin;
  const int64_t row = dim(0) ? numel() / dim(0) : 0;
  char* base = static_cast<char*>(data_) + size_t(begin * row) * dtype_size(dtype_);
  return Tensor(storage_, base, s, dtype_, device_);
}

Tensor Tensor::reshape(Shape s) const {
  MOELAB_CHECK(s.numel() == numel(), "reshape ", shape_.str(), " -> ", s.str(), " changes numel");
  return Tensor(storage_, data_, s, dtype_, device_);
}

std::string Tensor::describe() const {
  return std::string(to_string(dtype_)) + shape_.str() + "@" + to_string(device_);
}

Tensor host_empty(Shape shape, DType dtype) {
  const size_t bytes = size_t(shape.numel()) * dtype_size(dtype);
  std::shared_ptr<char[]> buf(new char[bytes ? bytes : 1]);
  return Tensor(std::shared_ptr<void>(buf, buf.get()), buf.get(), shape, dtype, Device::CPU);
}

Tensor host_tensor(const std::vector<double>& values, Shape shape, DType dtype) {
  MOELAB_CHECK(int64_t(values.size()) == shape.numel(), "host_tensor: ", values.size(),
               " values for shape ", shape.str());
  Tensor t = host_empty(shape, dtype);
  for (size_t i = 0; i < values.size(); ++i) {
    switch (dtype) {
      case DType::F64: t.ptr<double>()[i] = values[i]; break;
      case DType::F32: t.ptr<float>()[i] = float(values[i]); break;
      case DType::BF16: t.ptr<bf16>()[i] = bf16::from_float(float(values[i])); break;
      case DType::I32: t.ptr<int32_t>()[i] = int32_t(values[i]); break;
    }
  }
  return t;
}

std::vector<double> host_values(const Tensor& t) {
  MOELAB_CHECK(t.device() == Device::CPU, "host_values: tensor is on ", to_string(t.device()));
  std::vector<double> v(size_t(t.numel()));
  for (size_t i = 0; i < v.size(); ++i) {
    switch (t.dtype()) {
      case DType::F64: v[i] = t.ptr<double>()[i]; break;
      case DType::F32: v[i] = t.ptr<float>()[i]; break;
      case DType::BF16: v[i] = t.ptr<bf16>()[i].to_float(); break;
      case DType::I32: v[i] = t.ptr<int32_t>()[i]; break;
    }
  }
  return v;
}

}  // namespace moelab
