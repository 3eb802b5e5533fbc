// moelab CUDA backend: the CUB primitives the routing and dispatch kernels build on, kept in one
// translation unit (CUB is slow to compile). Both are deterministic: the radix sort is stable,
// so equal keys keep their input order (that is how "ties to the lower index" and "rows in
// assignment order" are obtained), and the scan works on integers.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "backends/cuda/cuda_kernels.cuh"

namespace moelab::cuda {

void sort_pairs(Ctx& c, const uint64_t* keys_in, uint64_t* keys_out, const int32_t* vals_in,
                int32_t* vals_out, int64_t n, int end_bit) {
  if (n == 0) return;
  MOELAB_CHECK(n <= INT32_MAX, "cuda sort_pairs: ", n, " items exceed the int range");
  size_t bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys_in, keys_out, vals_in, vals_out,
                                             int(n), 0, end_bit, c.stream));
  Buf<char> tmp(c, int64_t(bytes));
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tmp.get(), bytes, keys_in, keys_out, vals_in,
                                             vals_out, int(n), 0, end_bit, c.stream));
}

void exclusive_sum(Ctx& c, const int32_t* in, int32_t* out, int64_t n) {
  if (n == 0) return;
  MOELAB_CHECK(n <= INT32_MAX, "cuda exclusive_sum: ", n, " items exceed the int range");
  size_t bytes = 0;
  CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, in, out, int(n), c.stream));
  Buf<char> tmp(c, int64_t(bytes));
  CUDA_CHECK(cub::DeviceScan::ExclusiveSum(tmp.get(), bytes, in, out, int(n), c.stream));
}

}  // namespace moelab::cuda
