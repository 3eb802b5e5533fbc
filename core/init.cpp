// moelab: parameter initialisation draws (see init.h).
#include "core/init.h"

#include <algorithm>
#include <thread>
#include <vector>

#include "core/rng.h"

namespace moelab {

void init_normal(Backend& b, const Tensor& dst, uint64_t stream, uint64_t first, double std) {
  const int64_t n = dst.numel();
  if (n == 0) return;
  const Tensor flat = dst.reshape(Shape{n});
  // Chunks of 8M elements (64 MB of doubles); threads split each chunk.
  constexpr int64_t kChunk = int64_t(1) << 23;
  const int threads = int(std::max(1u, std::min(32u, std::thread::hardware_concurrency())));
  std::vector<double> v;
  for (int64_t at = 0; at < n; at += kChunk) {
    const int64_t len = std::min(kChunk, n - at);
    v.resize(size_t(len));
    auto draw = [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) v[size_t(i)] = std * rng::normal(stream, first + uint64_t(at + i));
    };
    const int parts = len >= (int64_t(1) << 16) ? threads : 1;
    if (parts == 1) {
      draw(0, len);
    } else {
      std::vector<std::thread> pool;
      for (int t = 0; t < parts; ++t) pool.emplace_back(draw, len * t / parts, len * (t + 1) / parts);
      for (std::thread& th : pool) th.join();
    }
    b.copy(host_tensor(v, Shape{len}, dst.dtype()), flat.view_rows(at, at + len));
  }
}

}  // namespace moelab
