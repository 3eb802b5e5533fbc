// moelab CUDA backend: row-wise kernels (softmax, row normalisation, row scaling; one warp per
// row, fp32 arithmetic on f32 / bf16 storage) and the deterministic reductions the losses and
// statistics build on (column sums by segment, sum and max of a double array).
//
// Determinism: every reduction here has a fixed shape (grid size a function of the problem size
// only, fixed shuffle trees, partials summed in index order), so a result is bit-identical from
// run to run; no floating-point atomics.
#include <cfloat>

#include "backends/cuda/cuda_kernels.cuh"

namespace moelab::cuda {
namespace {

// Row index of this warp, or -1 past the end.
__device__ __forceinline__ int64_t warp_row(int64_t rows) {
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  return r < rows ? r : -1;
}

// ---- softmax ---------------------------------------------------------------------------------

template <class T> __global__ void softmax_fwd_kernel(const T* l, T* p, int64_t R, int64_t N) {
  const int64_t r = warp_row(R);
  if (r < 0) return;
  const int lane = threadIdx.x & 31;
  const T* lr = l + r * N;
  float m = -INFINITY;
  for (int64_t j = lane; j < N; j += 32) m = fmaxf(m, load_f(lr, j));
  m = warp_max(m);
  float s = 0.0f;
  for (int64_t j = lane; j < N; j += 32) s += expf(load_f(lr, j) - m);
  const float inv = 1.0f / warp_sum(s);
  for (int64_t j = lane; j < N; j += 32) store_f(p, r * N + j, expf(load_f(lr, j) - m) * inv);
}

// dL = P * (dP - sum(P dP)).
template <class T>
__global__ void softmax_bwd_kernel(const T* p, const T* dp, T* dl, int64_t R, int64_t N) {
  const int64_t r = warp_row(R);
  if (r < 0) return;
  const int lane = threadIdx.x & 31;
  float dot = 0.0f;
  for (int64_t j = lane; j < N; j += 32) dot += load_f(p, r * N + j) * load_f(dp, r * N + j);
  dot = warp_sum(dot);
  for (int64_t j = lane; j < N; j += 32) {
    const int64_t i = r * N + j;
    store_f(dl, i, load_f(p, i) * (load_f(dp, i) - dot));
  }
}

// ---- row normalisation and scaling -------------------------------------------------------------

template <class T> __global__ void rownorm_fwd_kernel(const T* x, T* y, int64_t R, int64_t N) {
  const int64_t r = warp_row(R);
  if (r < 0) return;
  const int lane = threadIdx.x & 31;
  float s = 0.0f;
  for (int64_t j = lane; j < N; j += 32) s += load_f(x, r * N + j);
  s = warp_sum(s);
  for (int64_t j = lane; j < N; j += 32) store_f(y, r * N + j, load_f(x, r * N + j) / s);
}

// dX = dY / s - <dY, X> / s^2, s = sum_j X.
template <class T>
__global__ void rownorm_bwd_kernel(const T* x, const T* dy, T* dx, int64_t R, int64_t N) {
  const int64_t r = warp_row(R);
  if (r < 0) return;
  const int lane = threadIdx.x & 31;
  float s = 0.0f, dot = 0.0f;
  for (int64_t j = lane; j < N; j += 32) {
    const float xv = load_f(x, r * N + j);
    s += xv;
    dot += load_f(dy, r * N + j) * xv;
  }
  s = warp_sum(s);
  dot = warp_sum(dot);
  for (int64_t j = lane; j < N; j += 32)
    store_f(dx, r * N + j, load_f(dy, r * N + j) / s - dot / (s * s));
}

template <class T>
__global__ void rowscale_fwd_kernel(const T* s, const T* x, T* y, int64_t R, int64_t N) {
  MOELAB_GRID_STRIDE(i, R * N) store_f(y, i, load_f(s, i / N) * load_f(x, i));
}

// dX = s dY; ds = <dY, X> per row.
template <class T>
__global__ void rowscale_bwd_kernel(const T* s, const T* x, const T* dy, T* ds, T* dx, int64_t R,
                                    int64_t N) {
  const int64_t r = warp_row(R);
  if (r < 0) return;
  const int lane = threadIdx.x & 31;
  const float sr = load_f(s, r);
  float acc = 0.0f;
  for (int64_t j = lane; j < N; j += 32) {
    const int64_t i = r * N + j;
    const float d = load_f(dy, i);
    acc += d * load_f(x, i);
    store_f(dx, i, sr * d);
  }
  acc = warp_sum(acc);
  if (lane == 0) store_f(ds, r, acc);
}

// ---- deterministic reductions --------------------------------------------------------------------

__device__ __forceinline__ double as_double(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double as_double(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double as_double(const bf16_t* p, int64_t i) {
  return __bfloat162float(p[i]);
}

// Column partial sums: block (32 columns x 8 row lanes) over one chunk of `ch` rows inside one
// segment; partial[chunk_global, e]. Rows are visited in a fixed order per lane and the 8 lanes
// are added in lane order.
template <class T>
__global__ void colsum_partial_kernel(const T* m, int64_t E, int64_t seg, int64_t ch,
                                      int64_t chunks_per_seg, double* partial) {
  __shared__ double sh[8][33];
  const int64_t s = blockIdx.y / chunks_per_seg, k = blockIdx.y % chunks_per_seg;
  const int64_t r0 = s * seg + k * ch, r1 = min(r0 + ch, (s + 1) * seg);
  const int64_t e = int64_t(blockIdx.x) * 32 + threadIdx.x;
  double acc = 0.0;
  if (e < E)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) acc += as_double(m, r * E + e);
  sh[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && e < E) {
    double t = 0.0;
    for (int j = 0; j < 8; ++j) t += sh[j][threadIdx.x];
    partial[int64_t(blockIdx.y) * E + e] = t;
  }
}

// One warp per output: lanes add chunks lane, lane + 32, ... in order, then a fixed shuffle tree
// (deterministic). One thread per output walking all chunks was a chain of dependent loads (8.8 us
// a call for 64 chunks of 8 columns; kernel census, docs/performance.md, eighth session).
__global__ void colsum_final_kernel(const double* partial, int64_t nseg, int64_t E,
                                    int64_t chunks_per_seg, double* out) {
  const int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (i >= nseg * E) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  const int64_t s = i / E, e = i - s * E;
  double t = 0.0;
  for (int64_t k = lane; k < chunks_per_seg; k += 32) t += partial[(s * chunks_per_seg + k) * E + e];
  t = warp_sum(t);
  if (lane == 0) out[i] = t;
}

constexpr int kReduceBlocks = 256;

template <bool kMax> __global__ void reduce_partial_kernel(const double* x, int64_t n, double* partial) {
  double v = kMax ? -DBL_MAX : 0.0;
  MOELAB_GRID_STRIDE(i, n) v = kMax ? fmax(v, x[i]) : v + x[i];
  v = kMax ? block_max(v, -DBL_MAX) : block_sum(v);
  if (threadIdx.x == 0) partial[blockIdx.x] = v;
}

template <bool kMax> __global__ void reduce_final_kernel(const double* partial, int n, double* out) {
  double v = kMax ? -DBL_MAX : 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) v = kMax ? fmax(v, partial[i]) : v + partial[i];
  v = kMax ? block_max(v, -DBL_MAX) : block_sum(v);
  if (threadIdx.x == 0) *out = v;
}

template <bool kMax> void reduce(Ctx& c, const double* x, int64_t n, double* out) {
  const int64_t want = (n + kThreads - 1) / kThreads;
  const int blocks = int(want < 1 ? 1 : (want > kReduceBlocks ? kReduceBlocks : want));
  Buf<double> partial(c, blocks);
  reduce_partial_kernel<kMax><<<blocks, kThreads, 0, c.stream>>>(x, n, partial.get());
  CUDA_CHECK_LAUNCH();
  reduce_final_kernel<kMax><<<1, kThreads, 0, c.stream>>>(partial.get(), blocks, out);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------

void softmax_forward(Ctx& c, const Tensor& l, const Tensor& p) {
  const int64_t R = l.dim(0), N = l.dim(1);
  if (R * N == 0) return;
  dispatch_float(l.dtype(), "softmax_forward", [&](auto tag) {
    using T = decltype(tag);
    softmax_fwd_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(cptr<T>(l), mptr<T>(p), R, N);
    CUDA_CHECK_LAUNCH();
  });
}

void softmax_backward(Ctx& c, const Tensor& p, const Tensor& dp, const Tensor& dl) {
  const int64_t R = p.dim(0), N = p.dim(1);
  if (R * N == 0) return;
  dispatch_float(p.dtype(), "softmax_backward", [&](auto tag) {
    using T = decltype(tag);
    softmax_bwd_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(cptr<T>(p), cptr<T>(dp),
                                                                    mptr<T>(dl), R, N);
    CUDA_CHECK_LAUNCH();
  });
}

void row_normalize_forward(Ctx& c, const Tensor& x, const Tensor& y) {
  const int64_t R = x.dim(0), N = x.dim(1);
  if (R * N == 0) return;
  dispatch_float(x.dtype(), "row_normalize_forward", [&](auto tag) {
    using T = decltype(tag);
    rownorm_fwd_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(cptr<T>(x), mptr<T>(y), R, N);
    CUDA_CHECK_LAUNCH();
  });
}

void row_normalize_backward(Ctx& c, const Tensor& x, const Tensor& dy, const Tensor& dx) {
  const int64_t R = x.dim(0), N = x.dim(1);
  if (R * N == 0) return;
  dispatch_float(x.dtype(), "row_normalize_backward", [&](auto tag) {
    using T = decltype(tag);
    rownorm_bwd_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(cptr<T>(x), cptr<T>(dy),
                                                                    mptr<T>(dx), R, N);
    CUDA_CHECK_LAUNCH();
  });
}

void row_scale_forward(Ctx& c, const Tensor& s, const Tensor& x, const Tensor& y) {
  const int64_t R = x.dim(0), N = x.dim(1);
  if (R * N == 0) return;
  dispatch_float(x.dtype(), "row_scale_forward", [&](auto tag) {
    using T = decltype(tag);
    rowscale_fwd_kernel<T><<<grid_for(R * N), kThreads, 0, c.stream>>>(cptr<T>(s), cptr<T>(x),
                                                                        mptr<T>(y), R, N);
    CUDA_CHECK_LAUNCH();
  });
}

void row_scale_backward(Ctx& c, const Tensor& s, const Tensor& x, const Tensor& dy,
                        const Tensor& ds, const Tensor& dx) {
  const int64_t R = x.dim(0), N = x.dim(1);
  if (R == 0) return;
  dispatch_float(x.dtype(), "row_scale_backward", [&](auto tag) {
    using T = decltype(tag);
    rowscale_bwd_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(
        cptr<T>(s), cptr<T>(x), cptr<T>(dy), mptr<T>(ds), mptr<T>(dx), R, N);
    CUDA_CHECK_LAUNCH();
  });
}

void column_sums(Ctx& c, DType dt, const void* m, int64_t R, int64_t E, int64_t seg, double* out) {
  MOELAB_CHECK(seg >= 1 && R % seg == 0, "cuda column_sums: segment ", seg, " must divide ", R);
  const int64_t nseg = R / seg;
  if (nseg * E == 0) return;
  // Chunk length: 64 rows (short dependent chains per thread; the final pass adds the chunks by
  // warps), doubled until the grid's y extent fits.
  int64_t ch = 64, cps = (seg + ch - 1) / ch;
  while (nseg * cps > 65535) {
    ch *= 2;
    cps = (seg + ch - 1) / ch;
  }
  MOELAB_CHECK((E + 31) / 32 <= INT32_MAX, "cuda column_sums: too many columns");
  Buf<double> partial(c, nseg * cps * E);
  const dim3 grid(unsigned((E + 31) / 32), unsigned(nseg * cps)), block(32, 8);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    colsum_partial_kernel<T><<<grid, block, 0, c.stream>>>(static_cast<const T*>(m), E, seg, ch,
                                                          cps, partial.get());
    CUDA_CHECK_LAUNCH();
  };
  switch (dt) {
    case DType::F64: run(double{}); break;
    case DType::F32: run(float{}); break;
    case DType::BF16: run(bf16_t{}); break;
    default: throw NotSupported("cuda column_sums: integer dtype");
  }
  colsum_final_kernel<<<grid_rows(nseg * E), kThreads, 0, c.stream>>>(partial.get(), nseg, E, cps, out);
  CUDA_CHECK_LAUNCH();
}

void device_sum(Ctx& c, const double* x, int64_t n, double* out) { reduce<false>(c, x, n, out); }
void device_max(Ctx& c, const double* x, int64_t n, double* out) { reduce<true>(c, x, n, out); }

}  // namespace moelab::cuda
