// moelab: CUDA device discovery. A machine without a GPU (or without a driver) reports zero
// devices instead of failing, so CPU-only CI runs the same binary.
#include <cuda_runtime.h>

#include "backends/cuda/cuda_backend.h"

namespace moelab {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device / no driver" error
    return 0;
  }
  return n;
}

}  // namespace moelab
