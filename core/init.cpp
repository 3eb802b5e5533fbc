// moelab: parameter initialisation draws (see init.h).
#include "core/init.h"

#include <algorithm>
#include <thread>
#include <vector>

#include "core/check.h"
#include "core/rng.h"

namespace moelab {

void init_normal(Backend& b, const Tensor& dst, uint64_t stream, uint64_t first, double std) {
  const int64_t n = dst.numel();
  if (n == 0) return;
  const Tensor flat = dst.reshape(Shape{n});
  // Chunks of 8M elements; threads draw and convert (as host_tensor does: double -> float ->
  // bf16) into the chunk's host buffer, which is then copied to the device.
  constexpr int64_t kChunk = int64_t(1) << 23;
  const int threads = int(std::max(1u, std::min(32u, std::thread::hardware_concurrency())));
  const DType dt = dst.dtype();
  MOELAB_CHECK(dt != DType::I32, "init_normal: ", dst.describe(), " is not a floating tensor");
  Tensor h = host_empty(Shape{std::min(kChunk, n)}, dt);
  for (int64_t at = 0; at < n; at += kChunk) {
    const int64_t len = std::min(kChunk, n - at);
    auto draw = [&](int64_t lo, int64_t hi) {
      auto value = [&](int64_t i) { return std * rng::normal(stream, first + uint64_t(at + i)); };
      switch (dt) {
        case DType::F64: for (int64_t i = lo; i < hi; ++i) h.ptr<double>()[i] = value(i); break;
        case DType::F32: for (int64_t i = lo; i < hi; ++i) h.ptr<float>()[i] = float(value(i)); break;
        case DType::BF16: for (int64_t i = lo; i < hi; ++i) h.ptr<bf16>()[i] = bf16::from_float(float(value(i))); break;
        case DType::I32: break;  // refused above
      }
    };
    const int parts = len >= (int64_t(1) << 16) ? threads : 1;
    if (parts == 1) {
      draw(0, len);
    } else {
      std::vector<std::thread> pool;
      for (int t = 0; t < parts; ++t) pool.emplace_back(draw, len * t / parts, len * (t + 1) / parts);
      for (std::thread& th : pool) th.join();
    }
    b.copy(len == h.numel() ? h : h.view_rows(0, len), flat.view_rows(at, at + len));
  }
}

}  // namespace moelab
