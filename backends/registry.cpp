// moelab: backend registry. The only place that knows which backends were compiled in.
#include "backends/cpu/cpu_backend.h"
#include "core/backend.h"
#if MOELAB_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif

namespace moelab {

bool backend_available(const std::string& name) {
  if (name == "cpu") return true;
#if MOELAB_HAVE_CUDA
  if (name == "cuda") return cuda_device_count() > 0;
#endif
  return false;
}

std::unique_ptr<Backend> make_backend(const std::string& name) {
  if (name == "cpu") return make_cpu_backend();
  if (name == "cuda") {
#if MOELAB_HAVE_CUDA
    MOELAB_CHECK(cuda_device_count() > 0, "backend cuda: no CUDA device is visible");
    return make_cuda_backend();
#else
    MOELAB_FAIL("backend cuda: this moelab was built without CUDA (MOELAB_CUDA=OFF or no nvcc)");
#endif
  }
  MOELAB_FAIL("unknown backend '", name, "' (accepted: cpu|cuda)");
}

}  // namespace moelab
