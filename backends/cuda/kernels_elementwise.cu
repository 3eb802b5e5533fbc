// moelab CUDA backend: elementwise kernels (fill, cast, axpy, scale, transpose, SwiGLU, sigmoid,
// softplus) and the counter-based random ones (dropout, jitter, noisy logits).
//
// Storage is f32 or bf16; arithmetic is fp32, except the random ops, which work in double like
// the CPU reference so that a mask or a noise draw is the same decision on both backends: the
// draws come from moelab::rng (core/rng.h), a pure function of (seed, element index), so the
// GPU computes the CPU's exact uniforms (and its normals up to the last bit of log / cos).
#include <cmath>
#include <type_traits>

#include "backends/cuda/cuda_kernels.cuh"
#include "core/rng.h"

namespace moelab::cuda {
namespace {

// ---- fill, cast, axpy, scale ------------------------------------------------------------------

template <class T> __global__ void fill_kernel(T* x, int64_t n, double v) {
  MOELAB_GRID_STRIDE(i, n) store_d(x, i, v);
}

// x[i] = std * normal(stream, first + i): core/rng.h's exact arithmetic, so the same bits as the
// host's draw (Backend::fill_normal).
template <class T>
__global__ void fill_normal_kernel(T* x, int64_t n, double std, uint64_t stream, uint64_t first) {
  MOELAB_GRID_STRIDE(i, n) store_d(x, i, rng::exact::mul(std, rng::normal(stream, first + uint64_t(i))));
}

template <class S, class D> __global__ void cast_kernel(const S* s, D* d, int64_t n) {
  MOELAB_GRID_STRIDE(i, n) store_d(d, i, load_d(s, i));
}

template <class T> __global__ void axpy_kernel(float alpha, const T* x, T* y, int64_t n) {
  MOELAB_GRID_STRIDE(i, n) store_f(y, i, fmaf(alpha, load_f(x, i), load_f(y, i)));
}

// The same over 16-byte vectors (n a multiple of Vec<T>::N, x and y aligned): the residual adds.
template <class T> __global__ void axpy_vec_kernel(float alpha, const T* x, T* y, int64_t n) {
  constexpr int N = Vec<T>::N;
  MOELAB_GRID_STRIDE(i, n / N) {
    float a[N], b[N];
    Vec<T>::load(x + i * N, a);
    Vec<T>::load(y + i * N, b);
#pragma unroll
    for (int q = 0; q < N; ++q) b[q] = fmaf(alpha, a[q], b[q]);
    Vec<T>::store(y + i * N, b);
  }
}

template <class T> __global__ void scale_kernel(T* y, int64_t n, float beta) {
  MOELAB_GRID_STRIDE(i, n) store_f(y, i, beta == 0.0f ? 0.0f : beta * load_f(y, i));
}

// Y [N, M] = X [M, N]^T through a 32 x 33 shared tile (the padding column avoids bank conflicts).
template <class T> __global__ void transpose_kernel(const T* x, T* y, int64_t M, int64_t N) {
  __shared__ T tile[32][33];
  const int64_t bx = int64_t(blockIdx.x) * 32, by = int64_t(blockIdx.y) * 32;
  for (int j = threadIdx.y; j < 32; j += 8) {
    const int64_t r = by + j, col = bx + threadIdx.x;
    if (r < M && col < N) tile[j][threadIdx.x] = x[r * N + col];
  }
  __syncthreads();
  for (int j = threadIdx.y; j < 32; j += 8) {
    const int64_t r = bx + j, col = by + threadIdx.x;  // y row = x column
    if (r < N && col < M) y[r * M + col] = tile[threadIdx.x][j];
  }
}

// ---- activations ------------------------------------------------------------------------------

__device__ __forceinline__ float sigmoidf_(float x) {
  return x >= 0.0f ? 1.0f / (1.0f + expf(-x)) : expf(x) / (1.0f + expf(x));
}

// H = silu(G) * U, AB = [G | U] per row.
// SwiGLU on rows of AB = [G | U]. One thread per Vec<T>::N consecutive columns of a row (16-byte
// loads and stores, one 64-bit division per vector): the scalar kernels below ran at 1.3-1.6
// TB/s on an H200 (kernel census, docs/performance.md). The arithmetic per element is the
// scalar kernels', so both give the same bits; the scalar ones serve unaligned views.
// The sigmoid of bf16 data: the hardware exp2 and reciprocal (__expf, __frcp_rn: a few ulp of
// f32, far below bf16's rounding of the result). The accurate expf and IEEE division made the
// vector forward issue-bound (2.6 TB/s against Triton's 4.2 for the same op, same H200;
// docs/performance.md). f32 keeps sigmoidf_.
template <class T> __device__ __forceinline__ float swiglu_sigmoid(float x) {
  if constexpr (std::is_same_v<T, bf16_t>) return __frcp_rn(1.0f + __expf(-x));  // rcp(inf) = 0
  else return sigmoidf_(x);
}
template <class T> __device__ __forceinline__ float swiglu_h(float g, float u) {
  return g * swiglu_sigmoid<T>(g) * u;
}
template <class T> __device__ __forceinline__ void swiglu_grads(float g, float u, float d, float& dg, float& du) {
  const float s = swiglu_sigmoid<T>(g);
  dg = d * u * s * (1.0f + g * (1.0f - s));  // d silu / dg
  du = d * g * s;
}

template <class T> __global__ void swiglu_fwd_kernel(const T* ab, T* h, int64_t R, int64_t F) {
  MOELAB_GRID_STRIDE(i, R * F) {
    const int64_t r = i / F, f = i - r * F;
    store_f(h, i, swiglu_h<T>(load_f(ab, r * 2 * F + f), load_f(ab, r * 2 * F + F + f)));
  }
}

template <class T>
__global__ void swiglu_bwd_kernel(const T* ab, const T* dh, T* dab, int64_t R, int64_t F) {
  MOELAB_GRID_STRIDE(i, R * F) {
    const int64_t r = i / F, f = i - r * F;
    float dg, du;
    swiglu_grads<T>(load_f(ab, r * 2 * F + f), load_f(ab, r * 2 * F + F + f), load_f(dh, i), dg, du);
    store_f(dab, r * 2 * F + f, dg);
    store_f(dab, r * 2 * F + F + f, du);
  }
}

template <class T> __global__ void swiglu_fwd_vec_kernel(const T* ab, T* h, int64_t R, int64_t F) {
  constexpr int N = Vec<T>::N;
  const int64_t FV = F / N;
  MOELAB_GRID_STRIDE(i, R * FV) {
    const int64_t r = i / FV, f = (i - r * FV) * N;
    float g[N], u[N], o[N];
    Vec<T>::load(ab + r * 2 * F + f, g);
    Vec<T>::load(ab + r * 2 * F + F + f, u);
#pragma unroll
    for (int q = 0; q < N; ++q) o[q] = swiglu_h<T>(g[q], u[q]);
    Vec<T>::store(h + r * F + f, o);
  }
}

template <class T>
__global__ void swiglu_bwd_vec_kernel(const T* ab, const T* dh, T* dab, int64_t R, int64_t F) {
  constexpr int N = Vec<T>::N;
  const int64_t FV = F / N;
  MOELAB_GRID_STRIDE(i, R * FV) {
    const int64_t r = i / FV, f = (i - r * FV) * N;
    float g[N], u[N], d[N], dg[N], du[N];
    Vec<T>::load(ab + r * 2 * F + f, g);
    Vec<T>::load(ab + r * 2 * F + F + f, u);
    Vec<T>::load(dh + r * F + f, d);
#pragma unroll
    for (int q = 0; q < N; ++q) swiglu_grads<T>(g[q], u[q], d[q], dg[q], du[q]);
    Vec<T>::store(dab + r * 2 * F + f, dg);
    Vec<T>::store(dab + r * 2 * F + F + f, du);
  }
}

template <class T> __global__ void sigmoid_fwd_kernel(const T* x, T* y, int64_t n) {
  MOELAB_GRID_STRIDE(i, n) store_f(y, i, sigmoidf_(load_f(x, i)));
}
template <class T> __global__ void sigmoid_bwd_kernel(const T* y, const T* dy, T* dx, int64_t n) {
  MOELAB_GRID_STRIDE(i, n) {
    const float s = load_f(y, i);
    store_f(dx, i, load_f(dy, i) * s * (1.0f - s));
  }
}
template <class T> __global__ void softplus_fwd_kernel(const T* x, T* y, int64_t n) {
  MOELAB_GRID_STRIDE(i, n) {
    const float v = load_f(x, i);
    store_f(y, i, fmaxf(v, 0.0f) + log1pf(expf(-fabsf(v))));
  }
}
template <class T> __global__ void softplus_bwd_kernel(const T* x, const T* dy, T* dx, int64_t n) {
  MOELAB_GRID_STRIDE(i, n) store_f(dx, i, load_f(dy, i) * sigmoidf_(load_f(x, i)));
}

// ---- random -----------------------------------------------------------------------------------

// Y = X * m / (1 - p), m_i = [u(seed, i) >= p]; the backward applies the same mask to dY.
template <class T> __global__ void dropout_kernel(const T* x, T* y, int64_t n, double p, uint64_t seed) {
  MOELAB_GRID_STRIDE(i, n) {
    const double u = rng::uniform(seed, uint64_t(i));
    store_d(y, i, u >= p ? load_d(x, i) / (1.0 - p) : 0.0);
  }
}

// Y = X * (1 - eps + 2 eps u_i); linear in X, so the backward is the same kernel on dY.
template <class T>
__global__ void jitter_kernel(const T* x, T* y, int64_t n, double eps, uint64_t seed, uint64_t offset) {
  MOELAB_GRID_STRIDE(i, n) {
    store_d(y, i, load_d(x, i) * (1.0 - eps + 2.0 * eps * rng::uniform(seed, offset + uint64_t(i))));
  }
}

// H = clean + n_i * std_i (std == nullptr: the constant sigma).
template <class T>
__global__ void noisy_fwd_kernel(const T* clean, const T* std, double sigma, uint64_t seed, T* h,
                                 int64_t n, uint64_t offset) {
  MOELAB_GRID_STRIDE(i, n) {
    const double s = std ? load_d(std, i) : sigma;
    store_d(h, i, load_d(clean, i) + rng::normal(seed, offset + uint64_t(i)) * s);
  }
}

template <class T>
__global__ void noisy_bwd_kernel(const T* dh, uint64_t seed, T* dclean, T* dstd, int64_t n,
                                 uint64_t offset) {
  MOELAB_GRID_STRIDE(i, n) {
    const double d = load_d(dh, i);
    store_d(dclean, i, d);
    if (dstd) store_d(dstd, i, d * rng::normal(seed, offset + uint64_t(i)));
  }
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------

void fill(Ctx& c, const Tensor& x, double v) {
  const int64_t n = x.numel();
  if (n == 0) return;
  if (v == 0.0 && !std::signbit(v)) {  // all-zero bits are +0 in every dtype; memset runs near the copy-engine peak
    CUDA_CHECK(cudaMemsetAsync(x.data(), 0, x.nbytes(), c.stream));
    return;
  }
  dispatch_any(x.dtype(), "fill", [&](auto tag) {
    using T = decltype(tag);
    fill_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(mptr<T>(x), n, v);
    CUDA_CHECK_LAUNCH();
  });
}

void fill_normal(Ctx& c, const Tensor& x, double std, uint64_t stream, uint64_t first) {
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch_any(x.dtype(), "fill_normal", [&](auto tag) {  // i32 is refused by Backend::fill_normal
    using T = decltype(tag);
    fill_normal_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(mptr<T>(x), n, std, stream, first);
    CUDA_CHECK_LAUNCH();
  });
}

void cast(Ctx& c, const Tensor& src, const Tensor& dst) {
  const int64_t n = src.numel();
  if (n == 0) return;
  dispatch_any(src.dtype(), "cast", [&](auto stag) {
    using S = decltype(stag);
    dispatch_any(dst.dtype(), "cast", [&](auto dtag) {
      using D = decltype(dtag);
      cast_kernel<S, D><<<grid_for(n), kThreads, 0, c.stream>>>(cptr<S>(src), mptr<D>(dst), n);
      CUDA_CHECK_LAUNCH();
    });
  });
}

void axpy(Ctx& c, double alpha, const Tensor& x, const Tensor& y) {
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float(x.dtype(), "axpy", [&](auto tag) {
    using T = decltype(tag);
    if (vec_ok<T>(n, {x.data(), y.data()}))
      axpy_vec_kernel<T><<<grid_for(n / Vec<T>::N), kThreads, 0, c.stream>>>(float(alpha), cptr<T>(x), mptr<T>(y), n);
    else
      axpy_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(float(alpha), cptr<T>(x), mptr<T>(y), n);
    CUDA_CHECK_LAUNCH();
  });
}

void scale(Ctx& c, DType dt, void* y, int64_t n, double beta) {
  if (n == 0 || beta == 1.0) return;
  dispatch_float(dt, "scale", [&](auto tag) {
    using T = decltype(tag);
    scale_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(static_cast<T*>(y), n, float(beta));
    CUDA_CHECK_LAUNCH();
  });
}

void transpose(Ctx& c, const Tensor& x, const Tensor& y) {
  const int64_t M = x.dim(0), N = x.dim(1);
  if (M == 0 || N == 0) return;
  MOELAB_CHECK((N + 31) / 32 <= INT32_MAX && (M + 31) / 32 <= 65535, "cuda transpose: ",
               x.describe(), " exceeds the grid limits");
  dispatch_float(x.dtype(), "transpose", [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(unsigned((N + 31) / 32), unsigned((M + 31) / 32)), block(32, 8);
    transpose_kernel<T><<<grid, block, 0, c.stream>>>(cptr<T>(x), mptr<T>(y), M, N);
    CUDA_CHECK_LAUNCH();
  });
}

void swiglu_forward(Ctx& c, const Tensor& ab, const Tensor& h) {
  const int64_t R = h.dim(0), F = h.dim(1);
  if (R * F == 0) return;
  dispatch_float(ab.dtype(), "swiglu_forward", [&](auto tag) {
    using T = decltype(tag);
    if (vec_ok<T>(F, {ab.data(), h.data()}))
      swiglu_fwd_vec_kernel<T><<<grid_for(R * F / Vec<T>::N), kThreads, 0, c.stream>>>(cptr<T>(ab), mptr<T>(h), R, F);
    else
      swiglu_fwd_kernel<T><<<grid_for(R * F), kThreads, 0, c.stream>>>(cptr<T>(ab), mptr<T>(h), R, F);
    CUDA_CHECK_LAUNCH();
  });
}

void swiglu_backward(Ctx& c, const Tensor& ab, const Tensor& dh, const Tensor& dab) {
  const int64_t R = dh.dim(0), F = dh.dim(1);
  if (R * F == 0) return;
  dispatch_float(ab.dtype(), "swiglu_backward", [&](auto tag) {
    using T = decltype(tag);
    if (vec_ok<T>(F, {ab.data(), dh.data(), dab.data()}))
      swiglu_bwd_vec_kernel<T><<<grid_for(R * F / Vec<T>::N), kThreads, 0, c.stream>>>(
          cptr<T>(ab), cptr<T>(dh), mptr<T>(dab), R, F);
    else
      swiglu_bwd_kernel<T><<<grid_for(R * F), kThreads, 0, c.stream>>>(cptr<T>(ab), cptr<T>(dh),
                                                                        mptr<T>(dab), R, F);
    CUDA_CHECK_LAUNCH();
  });
}

void sigmoid_forward(Ctx& c, const Tensor& x, const Tensor& y) {
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float(x.dtype(), "sigmoid_forward", [&](auto tag) {
    using T = decltype(tag);
    sigmoid_fwd_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(cptr<T>(x), mptr<T>(y), n);
    CUDA_CHECK_LAUNCH();
  });
}

void sigmoid_backward(Ctx& c, const Tensor& y, const Tensor& dy, const Tensor& dx) {
  const int64_t n = y.numel();
  if (n == 0) return;
  dispatch_float(y.dtype(), "sigmoid_backward", [&](auto tag) {
    using T = decltype(tag);
    sigmoid_bwd_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(cptr<T>(y), cptr<T>(dy),
                                                                   mptr<T>(dx), n);
    CUDA_CHECK_LAUNCH();
  });
}

void softplus_forward(Ctx& c, const Tensor& x, const Tensor& y) {
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float(x.dtype(), "softplus_forward", [&](auto tag) {
    using T = decltype(tag);
    softplus_fwd_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(cptr<T>(x), mptr<T>(y), n);
    CUDA_CHECK_LAUNCH();
  });
}

void softplus_backward(Ctx& c, const Tensor& x, const Tensor& dy, const Tensor& dx) {
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float(x.dtype(), "softplus_backward", [&](auto tag) {
    using T = decltype(tag);
    softplus_bwd_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(cptr<T>(x), cptr<T>(dy),
                                                                    mptr<T>(dx), n);
    CUDA_CHECK_LAUNCH();
  });
}

void dropout(Ctx& c, const Tensor& x, double p, uint64_t seed, const Tensor& y) {
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float(x.dtype(), "dropout", [&](auto tag) {
    using T = decltype(tag);
    dropout_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(cptr<T>(x), mptr<T>(y), n, p, seed);
    CUDA_CHECK_LAUNCH();
  });
}

void jitter(Ctx& c, const Tensor& x, double eps, uint64_t seed, const Tensor& y, uint64_t offset) {
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float(x.dtype(), "jitter", [&](auto tag) {
    using T = decltype(tag);
    jitter_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(cptr<T>(x), mptr<T>(y), n, eps, seed, offset);
    CUDA_CHECK_LAUNCH();
  });
}

void noisy_logits_forward(Ctx& c, const Tensor& clean, const Tensor& std, double sigma,
                          uint64_t seed, const Tensor& h, uint64_t offset) {
  const int64_t n = clean.numel();
  if (n == 0) return;
  dispatch_float(clean.dtype(), "noisy_logits_forward", [&](auto tag) {
    using T = decltype(tag);
    noisy_fwd_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(
        cptr<T>(clean), std.defined() ? cptr<T>(std) : nullptr, sigma, seed, mptr<T>(h), n, offset);
    CUDA_CHECK_LAUNCH();
  });
}

void noisy_logits_backward(Ctx& c, const Tensor& dh, const Tensor& std, uint64_t seed,
                           const Tensor& dclean, const Tensor& dstd, uint64_t offset) {
  const int64_t n = dh.numel();
  if (n == 0) return;
  dispatch_float(dh.dtype(), "noisy_logits_backward", [&](auto tag) {
    using T = decltype(tag);
    noisy_bwd_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(
        cptr<T>(dh), seed, mptr<T>(dclean), std.defined() ? mptr<T>(dstd) : nullptr, n, offset);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace moelab::cuda
