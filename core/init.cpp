// moelab: parameter initialisation draws (see init.h).
#include "core/init.h"

#include <algorithm>
#include <functional>
#include <thread>
#include <vector>

#include "core/check.h"
#include "core/rng.h"

namespace moelab {

void init_normal(Backend& b, const Tensor& dst, uint64_t stream, uint64_t first, double std) {
  const int64_t n = dst.numel();
  if (n == 0) return;
  const Tensor flat = dst.reshape(Shape{n});
  // Chunks of 8M elements; worker threads draw and convert (as host_tensor does: double -> float
  // -> bf16) chunk k+1 into one host buffer while this thread copies chunk k from the other to
  // the device (the backend is used from this thread only).
  constexpr int64_t kChunk = int64_t(1) << 23;
  const int threads = int(std::max(1u, std::min(32u, std::thread::hardware_concurrency())));
  const DType dt = dst.dtype();
  MOELAB_CHECK(dt != DType::I32, "init_normal: ", dst.describe(), " is not a floating tensor");
  Tensor h[2] = {host_empty(Shape{std::min(kChunk, n)}, dt), host_empty(Shape{std::min(kChunk, n)}, dt)};
  auto draw = [&](const Tensor& buf, int64_t at, int64_t lo, int64_t hi) {
    auto value = [&](int64_t i) { return std * rng::normal(stream, first + uint64_t(at + i)); };
    switch (dt) {
      case DType::F64: for (int64_t i = lo; i < hi; ++i) buf.ptr<double>()[i] = value(i); break;
      case DType::F32: for (int64_t i = lo; i < hi; ++i) buf.ptr<float>()[i] = float(value(i)); break;
      case DType::BF16: for (int64_t i = lo; i < hi; ++i) buf.ptr<bf16>()[i] = bf16::from_float(float(value(i))); break;
      case DType::I32: break;  // refused above
    }
  };
  // Starts drawing chunk `at` into buf on the workers (or draws it here when small).
  auto start = [&](const Tensor& buf, int64_t at, std::vector<std::thread>& pool) {
    const int64_t len = std::min(kChunk, n - at);
    const int parts = len >= (int64_t(1) << 16) ? threads : 1;
    if (parts == 1) return draw(buf, at, 0, len);
    for (int t = 0; t < parts; ++t) pool.emplace_back(draw, std::cref(buf), at, len * t / parts, len * (t + 1) / parts);
  };
  std::vector<std::thread> pool;
  start(h[0], 0, pool);
  for (int64_t at = 0, k = 0; at < n; at += kChunk, ++k) {
    for (std::thread& th : pool) th.join();
    pool.clear();
    const Tensor& cur = h[k % 2];
    if (at + kChunk < n) start(h[(k + 1) % 2], at + kChunk, pool);
    const int64_t len = std::min(kChunk, n - at);
    try {
      b.copy(len == cur.numel() ? cur : cur.view_rows(0, len), flat.view_rows(at, at + len));
    } catch (...) {
      for (std::thread& th : pool) th.join();
      throw;
    }
  }
}

}  // namespace moelab
