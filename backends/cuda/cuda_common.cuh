// moelab CUDA backend: what every kernel file shares.
//
//   - CUDA_CHECK / CUBLAS_CHECK / CUDA_CHECK_LAUNCH: throw moelab::Error naming file:line, the
//     failing call and the CUDA / cuBLAS error (DESIGN.md rule 10);
//   - Ctx: the backend's stream, cuBLAS handle, caching allocator and pinned host memory,
//     handed to every launcher (no globals);
//   - Buf<T>: a scratch device array from the caching allocator, returned on scope exit. All work
//     runs on the one stream, so a block returned while kernels that use it are still queued is
//     only ever reused by later work on that stream (the caching-allocator rule of PyTorch);
//   - element access: load_f / load_d read f32, bf16 (and f64, i32) as float / double; store_f /
//     store_d write them back (double -> float -> bf16, the CPU's rounding path);
//   - dtype dispatch: dispatch_float(dt, op, f) calls f(T{}) for T = float or __nv_bfloat16;
//   - deterministic warp / block reductions (fixed trees, no atomics on floats).
// Dimension letters as in core/backend.h.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/backend.h"

#define CUDA_CHECK(call)                                                                     \
  do {                                                                                       \
    const cudaError_t e_ = (call);                                                           \
    if (e_ != cudaSuccess)                                                                   \
      throw ::moelab::Error(::moelab::detail::concat(__FILE__, ":", __LINE__, ": ", #call,   \
                                                     " failed: ", cudaGetErrorName(e_), " (", \
                                                     cudaGetErrorString(e_), ")"));          \
  } while (0)

#define CUBLAS_CHECK(call)                                                                   \
  do {                                                                                       \
    const cublasStatus_t s_ = (call);                                                        \
    if (s_ != CUBLAS_STATUS_SUCCESS)                                                         \
      throw ::moelab::Error(::moelab::detail::concat(__FILE__, ":", __LINE__, ": ", #call,   \
                                                     " failed: ", cublasGetStatusName(s_), " (", \
                                                     cublasGetStatusString(s_), ")"));       \
  } while (0)

// After every kernel launch: reports a bad launch configuration at the launch site.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

namespace moelab::cuda {

using bf16_t = __nv_bfloat16;

// ---- memory ------------------------------------------------------------------------------

// Caching device allocator: freed blocks go to a free list keyed by size and are reused by
// later requests of a similar size, so steady-state training does no cudaMalloc at all
// (DESIGN.md rule 8). On cudaMalloc failure the cache is released and the call retried once.
class DeviceAllocator {
 public:
  DeviceAllocator() = default;
  DeviceAllocator(const DeviceAllocator&) = delete;
  DeviceAllocator& operator=(const DeviceAllocator&) = delete;
  ~DeviceAllocator();  // the owner synchronises the device first
  void* allocate(size_t bytes);
  void release(void* p);
  void empty_cache();
  size_t bytes_in_use() const { return in_use_; }
  size_t bytes_cached() const { return cached_; }
  size_t peak_bytes() const { return peak_; }  // most bytes in use at once since reset_peak()
  void reset_peak() { peak_ = in_use_; }

 private:
  static size_t round_up(size_t bytes);
  std::mutex mu_;
  std::multimap<size_t, void*> free_;           // size class -> block
  std::unordered_map<void*, size_t> live_;      // block -> size class
  size_t in_use_ = 0, cached_ = 0, peak_ = 0;
};

struct GemmAlgoCache;  // gemm.cu: the cuBLASLt handle and the per-expert GEMMs' cached kernel choices
struct Ctx;
struct PinnedPool;  // cuda_backend.cu: pinned blocks for Ctx::to_host_async

// A device -> host copy in flight (Ctx::to_host_async). wait() returns the bytes, blocking (and
// counting a host sync) only if the copy has not finished. Valid while its backend lives; the
// pinned block goes back to the pool when the last copy of the handle goes.
class HostCopy {
 public:
  struct Block {
    void* host = nullptr;
    size_t bytes = 0;
    cudaEvent_t done = nullptr;
  };
  HostCopy(std::shared_ptr<Block> block, Ctx* ctx) : block_(std::move(block)), ctx_(ctx) {}
  const void* wait();

 private:
  std::shared_ptr<Block> block_;
  Ctx* ctx_;
  bool arrived_ = false;
};

// What every launcher needs from the backend object.
struct Ctx {
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  DeviceAllocator* alloc = nullptr;
  int64_t gemm_chunk_rows = 128;  // CudaBackendOptions::chunk_rows
  int64_t attention_scratch_bytes = int64_t(1) << 30;  // CudaBackendOptions::attention_scratch_bytes
  int flash = 0;  // CudaBackendOptions::flash: 0 Auto, 1 MmaSync, 2 Wgmma
  int compute_capability = 0;  // of the backend's device: 10 major + minor (90 for H100 / H200)
  int sm_count = 1;             // of the backend's device: streaming multiprocessors
  int attention_bwd_splits = 0;  // CudaBackendOptions::attention_bwd_splits
  bool gemm_algo_cache = true;   // CudaBackendOptions::gemm_algo_cache
  std::shared_ptr<GemmAlgoCache> algo_cache;  // made by gemm.cu on first use
  // Every blocking wait for the stream counts as a host sync (moelab bench reports them).
  void sync() {
    ++syncs;
    CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  int64_t syncs = 0;
  // Device -> host copy that does not wait: queued on the stream into pinned memory that the
  // returned handle owns (small results: losses, counts, statistics).
  HostCopy to_host_async(const void* src_dev, size_t bytes);
  // The same, waited for (one host sync): the bytes are in dst on return.
  void to_host(void* dst, const void* src_dev, size_t bytes);
  std::shared_ptr<PinnedPool> pinned_pool;
  // Host -> device copy of a small argument array, stream-ordered. The host bytes are copied
  // into a ring of pinned slots first, so the caller may free `src` at once.
  void to_device_async(void* dst_dev, const void* src, size_t bytes);

  struct Slot {
    void* host = nullptr;
    size_t bytes = 0;
    cudaEvent_t done = nullptr;
  };
  std::vector<Slot> ring_;  // argument slots for to_device_async
  size_t ring_next_ = 0;
  // Frees the argument slots (the owner synchronises first); the pinned pool goes with its last block.
  void release();
};

// Scratch device array of n elements of T from the caching allocator.
template <class T> class Buf {
 public:
  Buf(Ctx& c, int64_t n) : alloc_(c.alloc), n_(n) {
    p_ = static_cast<T*>(alloc_->allocate(size_t(n > 0 ? n : 1) * sizeof(T)));
  }
  ~Buf() {
    if (p_) alloc_->release(p_);
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept : alloc_(o.alloc_), p_(o.p_), n_(o.n_) { o.p_ = nullptr; }
  T* get() const { return p_; }
  int64_t size() const { return n_; }

 private:
  DeviceAllocator* alloc_;
  T* p_ = nullptr;
  int64_t n_ = 0;
};

// ---- launch configuration ------------------------------------------------------------------

constexpr int kThreads = 256;       // default block size
constexpr int kWarpsPerBlock = kThreads / 32;

// Blocks for a grid-stride loop over n items (capped: the loop covers the rest).
inline unsigned grid_for(int64_t n, int threads = kThreads) {
  const int64_t b = (n + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > 65535 * 16 ? 65535 * 16 : b));
}
// Blocks for one warp per row.
inline unsigned grid_rows(int64_t rows) {
  const int64_t b = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return unsigned(b < 1 ? 1 : b);
}
// Launches kernel<<<(gx, gy), threads, smem, c.stream>>>(args...), raising the kernel's dynamic
// shared-memory limit when it needs more than the default 48 KiB; `what` names the op when the
// grid is out of range.
template <class K, class... A>
void launch_2d(Ctx& c, const char* what, K kernel, int64_t gx, int64_t gy, int threads, size_t smem,
               const A&... args) {
  MOELAB_CHECK(gx >= 1 && gx <= INT32_MAX && gy >= 1 && gy <= 65535, what, ": grid ", gx, " x ", gy,
               " out of range");
  if (smem > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<dim3(unsigned(gx), unsigned(gy)), threads, smem, c.stream>>>(args...);
  CUDA_CHECK_LAUNCH();
}
// Bits needed to hold values 0..x (x >= 0), at least 1: the radix-sort key width.
inline int bits_for(uint64_t x) {
  int b = 1;
  while (b < 64 && (x >> b) != 0) ++b;
  return b;
}

#define MOELAB_GRID_STRIDE(i, n)                                                    \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);         \
       i += int64_t(gridDim.x) * blockDim.x)

// ---- element access ------------------------------------------------------------------------

__device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const bf16_t* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ double load_d(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load_d(const float* p, int64_t i) { return double(p[i]); }
__device__ __forceinline__ double load_d(const bf16_t* p, int64_t i) {
  return double(__bfloat162float(p[i]));
}
__device__ __forceinline__ double load_d(const int32_t* p, int64_t i) { return double(p[i]); }

__device__ __forceinline__ void store_f(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(bf16_t* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
// From double: through float first, exactly as the CPU's bf16::from_float(float(v)).
__device__ __forceinline__ void store_d(double* p, int64_t i, double v) { p[i] = v; }
__device__ __forceinline__ void store_d(float* p, int64_t i, double v) { p[i] = float(v); }
__device__ __forceinline__ void store_d(bf16_t* p, int64_t i, double v) {
  p[i] = __float2bfloat16_rn(float(v));
}
__device__ __forceinline__ void store_d(int32_t* p, int64_t i, double v) { p[i] = int32_t(v); }

// ---- 16-byte vector access (memory-bound kernels) -------------------------------------------
// Vec<T>::N elements of T in one 16-byte load or store (f32: 4, bf16: 8), converted to and from
// float exactly as load_f / store_f convert one element, so a kernel that switches to vectors
// keeps its per-element arithmetic and its results bit for bit. Callers check vec_ok first:
// every row start must be 16-byte aligned (the row length a multiple of N, the base aligned).
template <class T> struct Vec;
template <> struct Vec<float> {
  static constexpr int N = 4;
  __device__ __forceinline__ static void load(const float* p, float* v) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
  }
  __device__ __forceinline__ static void store(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};
template <> struct Vec<bf16_t> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void load(const bf16_t* p, float* v) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&q);
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]);
      v[2 * j] = f.x;
      v[2 * j + 1] = f.y;
    }
  }
  __device__ __forceinline__ static void store(bf16_t* p, const float* v) {
    uint4 q;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&q);
    for (int j = 0; j < 4; ++j) h[j] = __halves2bfloat162(__float2bfloat16_rn(v[2 * j]), __float2bfloat16_rn(v[2 * j + 1]));
    *reinterpret_cast<uint4*>(p) = q;
  }
};
// A block's histogram in shared memory (counting kernels whose counters fit): zero it, count with
// shared atomics, then add each nonzero counter to its global one (a global atomic per item on a
// few counters serialises). Integer sums: the result does not depend on order.
// Counters that fit (4 bytes each: 32 KiB of the default 48 KiB of dynamic shared memory).
constexpr int64_t kBlockHistMaxCounters = 8192;
template <class C> __device__ __forceinline__ void block_hist_zero(C* hist, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) hist[i] = 0;
  __syncthreads();
}
template <class C, class G> __device__ __forceinline__ void block_hist_flush(const C* hist, int64_t n, G* global) {
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    if (hist[i]) atomicAdd(global + i, G(hist[i]));
}

// 16-byte alignment: vector loads and stores, cp.async, and cuBLAS's fastest batched kernels.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
// Rows of `row_elems` elements starting at each pointer can all be read as vectors.
template <class T> inline bool vec_ok(int64_t row_elems, std::initializer_list<const void*> ptrs) {
  if (row_elems % Vec<T>::N != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

template <class T> const T* cptr(const Tensor& t) { return static_cast<const T*>(t.data()); }
template <class T> T* mptr(const Tensor& t) { return static_cast<T*>(t.data()); }

// Calls f(T{}) with T the device type of a float dtype the kernels support (f32, bf16).
template <class F> void dispatch_float(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::F32: f(float{}); return;
    case DType::BF16: f(bf16_t{}); return;
    default: throw NotSupported(std::string("cuda: ") + op + " has no " + to_string(dt) + " kernel");
  }
}
// Any storage dtype (fill, cast).
template <class F> void dispatch_any(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::F64: f(double{}); return;
    case DType::F32: f(float{}); return;
    case DType::BF16: f(bf16_t{}); return;
    case DType::I32: f(int32_t{}); return;
  }
  throw NotSupported(std::string("cuda: ") + op + ": unknown dtype");
}

// ---- deterministic reductions ----------------------------------------------------------------
// Fixed shuffle trees: the same inputs give the same bits on every run.

template <class V> __device__ __forceinline__ V warp_sum(V v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <class V> __device__ __forceinline__ V warp_max(V v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Block-wide sum for blockDim.x a multiple of 32 (<= 1024); every thread gets the result.
template <class V> __device__ V block_sum(V v) {
  __shared__ V sh[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // sh may still be read by a previous call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  V r = lane < nw ? sh[lane] : V(0);
  return warp_sum(r);
}
template <class V> __device__ V block_max(V v, V lowest) {
  __shared__ V sh[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  V r = lane < nw ? sh[lane] : lowest;
  return warp_max(r);
}

// Order key of a float for radix sorts: ascending unsigned order == ascending float order, with
// -0 == +0 (the CPU compares values, not bits). desc_key reverses it.
__device__ __forceinline__ uint32_t asc_key(float f) {
  if (f == 0.0f) f = 0.0f;
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ uint32_t desc_key(float f) { return ~asc_key(f); }

}  // namespace moelab::cuda
