// moelab: the CUDA backend's entry points (implemented under backends/cuda/).
#pragma once
#include <memory>

#include "core/backend.h"

namespace moelab {

// Number of visible CUDA devices; 0 when there is no device or no driver (never throws).
int cuda_device_count();
// The CUDA backend on the current device. Throws NotSupported until its kernels land.
std::unique_ptr<Backend> make_cuda_backend();

}  // namespace moelab
