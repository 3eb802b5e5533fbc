// moelab CUDA backend: the transformer ops (scale, sum of squares, embedding, RMSNorm, rotary
// embeddings, cross-entropy, AdamW). Semantics: core/backend.h. Attention: flash_attention.cu.
//
// Precision: storage f32 or bf16, arithmetic fp32 with double where the CPU reference's result
// depends on it cheaply (sums of squares, RoPE angles, AdamW's update, cross-entropy totals).
// Determinism: no floating-point atomics. Embedding backward sums a token's rows in ascending
// position order after a stable sort; RMSNorm's dw sums rows in fixed chunks.
// Invalid token ids / targets (the CPU throws) are reported through a device flag read back
// with the result, so embedding_forward and cross_entropy_forward synchronise once.
#include <cfloat>
#include <climits>
#include <cmath>
#include <type_traits>

#include "backends/cuda/cuda_kernels.cuh"

namespace moelab::cuda {
namespace {

__device__ __forceinline__ int64_t warp_row(int64_t rows) {
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  return r < rows ? r : -1;
}

// ---- scale, sum of squares -------------------------------------------------------------------------

template <class T> __global__ void mul_kernel(T* x, int64_t n, double alpha) {
  MOELAB_GRID_STRIDE(i, n) store_d(x, i, load_d(x, i) * alpha);
}

template <class T> __global__ void sumsq_partial_kernel(const T* x, int64_t n, double* partial) {
  double s = 0.0;
  MOELAB_GRID_STRIDE(i, n) {
    const double v = load_d(x, i);
    s += v * v;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// The same over 16-byte vectors (x 16-byte aligned), then the n % N tail. The gradient norm reads
// every gradient once a step: with scalar loads and 256 blocks it ran at 0.35 TB/s on an H200
// (6.4 ms for config D's 1.1 B expert gradients; kernel census, docs/performance.md).
template <class T> __global__ void sumsq_partial_vec_kernel(const T* x, int64_t n, double* partial) {
  constexpr int N = Vec<T>::N;
  const int64_t nv = n / N;
  double s = 0.0;
  MOELAB_GRID_STRIDE(i, nv) {
    float v[N];
    Vec<T>::load(x + i * N, v);
#pragma unroll
    for (int q = 0; q < N; ++q) s += double(v[q]) * double(v[q]);
  }
  for (int64_t i = nv * N + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const double v = load_d(x, i);
    s += v * v;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// ---- embedding --------------------------------------------------------------------------------------

// N elements of one row of T at p as floats (N = 1: one element; else one 16-byte vector).
template <class T, int N> __device__ __forceinline__ void load_n(const T* p, float* v) {
  if constexpr (N == 1) v[0] = load_f(p, 0);
  else Vec<T>::load(p, v);
}
template <class T, int N> __device__ __forceinline__ void store_n(T* p, const float* v) {
  if constexpr (N == 1) store_f(p, 0, v[0]);
  else Vec<T>::store(p, v);
}

// One thread per N consecutive elements of an output row (16-byte vectors where rows allow: the
// scalar form ran at a quarter of the memory speed, config E 124 us a call; eighth session).
template <class T, int N>
__global__ void embed_fwd_kernel(const int32_t* tok, const T* table, int64_t Tn, int64_t V,
                                 int64_t D, T* out, int32_t* bad) {
  const int64_t DV = D / N;
  MOELAB_GRID_STRIDE(i, Tn * DV) {
    const int64_t t = i / DV, d = (i - t * DV) * N;
    const int32_t id = tok[t];
    float v[N];
    if (id >= 0 && id < V) {
      load_n<T, N>(table + int64_t(id) * D + d, v);
    } else {
      for (int q = 0; q < N; ++q) v[q] = 0.0f;
      if (d == 0) atomicCAS(bad, INT_MIN, id);
    }
    store_n<T, N>(out + t * D + d, v);
  }
}

__global__ void embed_keys_kernel(const int32_t* tok, int64_t Tn, int64_t V, uint64_t* keys,
                                  int32_t* vals) {
  MOELAB_GRID_STRIDE(t, Tn) {
    const int32_t id = tok[t];
    keys[t] = (id >= 0 && id < V) ? uint64_t(id) : uint64_t(V);
    vals[t] = int32_t(t);
  }
}

// Sorted position p heads a run of equal ids: dtable[id, d..d+N) += sum of dout[t, d..d+N) over
// the run, in the run's order (the same sums at every N).
template <class T, int N>
__global__ void embed_bwd_kernel(const uint64_t* keys, const int32_t* pos, const T* dout,
                                 int64_t Tn, int64_t V, int64_t D, T* dtable) {
  const int64_t DV = D / N;
  MOELAB_GRID_STRIDE(i, Tn * DV) {
    const int64_t p = i / DV, d = (i - p * DV) * N;
    const uint64_t id = keys[p];
    if (id >= uint64_t(V) || (p > 0 && keys[p - 1] == id)) continue;
    float acc[N], v[N];
    for (int q = 0; q < N; ++q) acc[q] = 0.0f;
    for (int64_t j = p; j < Tn && keys[j] == id; ++j) {
      load_n<T, N>(dout + int64_t(pos[j]) * D + d, v);
      for (int q = 0; q < N; ++q) acc[q] += v[q];
    }
    T* row = dtable + int64_t(id) * D + d;
    load_n<T, N>(row, v);
    for (int q = 0; q < N; ++q) v[q] += acc[q];
    store_n<T, N>(row, v);
  }
}

// ---- RMSNorm ----------------------------------------------------------------------------------------

// y = x r w, r = 1 / sqrt(mean x^2 + eps); one warp per row.
template <class T>
__global__ void rms_fwd_kernel(const T* x, const T* w, int64_t R, int64_t D, double eps, T* y,
                               T* rstd) {
  const int64_t t = warp_row(R);
  if (t < 0) return;
  const int lane = threadIdx.x & 31;
  float ss = 0.0f;
  for (int64_t d = lane; d < D; d += 32) {
    const float v = load_f(x, t * D + d);
    ss += v * v;
  }
  ss = warp_sum(ss);
  const float r = float(1.0 / sqrt(double(ss) / double(D) + eps));
  if (lane == 0) store_f(rstd, t, r);
  for (int64_t d = lane; d < D; d += 32) store_f(y, t * D + d, load_f(x, t * D + d) * r * load_f(w, d));
}

// dx_d = r (w_d dy_d - x_d r^2 mean_j(w_j dy_j x_j)), r the saved rstd; one warp per row.
template <class T>
__global__ void rms_bwd_dx_kernel(const T* x, const T* w, const T* rstd, const T* dy, int64_t R,
                                  int64_t D, T* dx) {
  const int64_t t = warp_row(R);
  if (t < 0) return;
  const int lane = threadIdx.x & 31;
  const float r = load_f(rstd, t);
  float dot = 0.0f;
  for (int64_t d = lane; d < D; d += 32)
    dot += load_f(w, d) * load_f(dy, t * D + d) * load_f(x, t * D + d);
  dot = warp_sum(dot) / float(D);
  for (int64_t d = lane; d < D; d += 32) {
    const int64_t i = t * D + d;
    store_f(dx, i, r * (load_f(w, d) * load_f(dy, i) - load_f(x, i) * r * r * dot));
  }
}

// The same two kernels with each lane over 16-byte vectors of the row (D a multiple of
// Vec<T>::N, rows aligned): the scalar ones read 2-byte elements at 1.5 TB/s on an H200 (kernel
// census). Per element the same arithmetic; the row sums are added in another order.
template <class T>
__global__ void rms_fwd_vec_kernel(const T* x, const T* w, int64_t R, int64_t D, double eps, T* y,
                                   T* rstd) {
  constexpr int N = Vec<T>::N;
  const int64_t t = warp_row(R);
  if (t < 0) return;
  const int lane = threadIdx.x & 31;
  float ss = 0.0f;
  for (int64_t d = lane * N; d < D; d += 32 * N) {
    float v[N];
    Vec<T>::load(x + t * D + d, v);
#pragma unroll
    for (int q = 0; q < N; ++q) ss += v[q] * v[q];
  }
  ss = warp_sum(ss);
  const float r = float(1.0 / sqrt(double(ss) / double(D) + eps));
  if (lane == 0) store_f(rstd, t, r);
  for (int64_t d = lane * N; d < D; d += 32 * N) {
    float v[N], g[N];
    Vec<T>::load(x + t * D + d, v);
    Vec<T>::load(w + d, g);
#pragma unroll
    for (int q = 0; q < N; ++q) v[q] = v[q] * r * g[q];
    Vec<T>::store(y + t * D + d, v);
  }
}

template <class T>
__global__ void rms_bwd_dx_vec_kernel(const T* x, const T* w, const T* rstd, const T* dy, int64_t R,
                                      int64_t D, T* dx) {
  constexpr int N = Vec<T>::N;
  const int64_t t = warp_row(R);
  if (t < 0) return;
  const int lane = threadIdx.x & 31;
  const float r = load_f(rstd, t);
  float dot = 0.0f;
  for (int64_t d = lane * N; d < D; d += 32 * N) {
    float g[N], e[N], v[N];
    Vec<T>::load(w + d, g);
    Vec<T>::load(dy + t * D + d, e);
    Vec<T>::load(x + t * D + d, v);
#pragma unroll
    for (int q = 0; q < N; ++q) dot += g[q] * e[q] * v[q];
  }
  dot = warp_sum(dot) / float(D);
  for (int64_t d = lane * N; d < D; d += 32 * N) {
    float g[N], e[N], v[N], o[N];
    Vec<T>::load(w + d, g);
    Vec<T>::load(dy + t * D + d, e);
    Vec<T>::load(x + t * D + d, v);
#pragma unroll
    for (int q = 0; q < N; ++q) o[q] = r * (g[q] * e[q] - v[q] * r * r * dot);
    Vec<T>::store(dx + t * D + d, o);
  }
}

// partial[chunk, d] = sum over the chunk's rows of dy x r (block: 32 column groups x 8 row lanes;
// a thread's group is N consecutive columns, 16-byte vectors where rows allow). Each column's sum
// is the same at every N: row lane y adds rows r0 + y, r0 + y + 8, ... in double, then lane 0 adds
// the 8 lanes in order. (Scalar 2-byte loads of one column per thread ran at half the memory
// speed: config E 55 us a call; eighth session.)
template <class T, int N>
__global__ void rms_dw_partial_kernel(const T* x, const T* rstd, const T* dy, int64_t R,
                                      int64_t D, int64_t ch, double* partial) {
  __shared__ double sh[8][32 * N + 1];
  const int64_t r0 = int64_t(blockIdx.y) * ch, r1 = min(r0 + ch, R);
  const int64_t d0 = (int64_t(blockIdx.x) * 32 + threadIdx.x) * N;
  double acc[N];
  for (int q = 0; q < N; ++q) acc[q] = 0.0;
  if (d0 < D)
    for (int64_t t = r0 + threadIdx.y; t < r1; t += 8) {
      float e[N], v[N];
      load_n<T, N>(dy + t * D + d0, e);
      load_n<T, N>(x + t * D + d0, v);
      const float r = load_f(rstd, t);
      for (int q = 0; q < N; ++q) acc[q] += double(e[q]) * v[q] * r;
    }
  for (int q = 0; q < N; ++q) sh[threadIdx.y][threadIdx.x * N + q] = acc[q];
  __syncthreads();
  if (threadIdx.y == 0 && d0 < D)
    for (int q = 0; q < N; ++q) {
      double s = 0.0;
      for (int j = 0; j < 8; ++j) s += sh[j][threadIdx.x * N + q];
      partial[int64_t(blockIdx.y) * D + d0 + q] = s;
    }
}

// dw[d] += sum over chunks of partial[chunk, d]: one warp per column, lanes over the chunks in
// order, then a fixed shuffle tree (a thread walking all chunks was a chain of dependent loads).
template <class T>
__global__ void rms_dw_final_kernel(const double* partial, int64_t chunks, int64_t D, T* dw) {
  const int64_t d = warp_row(D);
  if (d < 0) return;
  const int lane = threadIdx.x & 31;
  double s = 0.0;
  for (int64_t k = lane; k < chunks; k += 32) s += partial[k * D + d];
  s = warp_sum(s);
  if (lane == 0) store_d(dw, d, load_d(dw, d) + s);
}

// ---- rotary embeddings ------------------------------------------------------------------------------

// Pairs (i, i + Dh/2) of every head rotate by angle p theta^(-2i/Dh), p = t mod S or
// positions[t] when given (not checked here: the CPU reference refuses a negative position, this
// kernel rotates by its negative angle); the inverse rotates by the negative angle. The angle
// depends on (p, i) only, so its pow and sincos (in double, as the CPU reference computes them)
// run once per (position, i) into a table, not once per token and head (per token they were most
// of the kernel's time: 0.35 ms a call on config D; kernel censuses in docs/performance.md).
// Positions outside [0, S) compute theirs inline.
// Arithmetic: f32 tensors rotate in double, as the CPU reference does (one rounding). bf16 ones
// rotate in float with cos and sin rounded to float (error below 2^-22 relative, so the bf16 result
// equals the double path's except within that distance of a rounding tie): in double, the
// conversions and the registers they took held the kernel at a third of the memory speed (config
// A: 25 us a call for 32 MB; eighth session).
template <class A> struct RopePair;  // (cos, sin) in the accumulation type A
template <> struct RopePair<double> { using type = double2; };
template <> struct RopePair<float> { using type = float2; };

// Not inlined: positions outside [0, S) are rare (packed records stay inside their row), and an
// inlined pow and sincos took registers from the kernel below.
template <class A>
__device__ __noinline__ typename RopePair<A>::type rope_angle(double pos, int64_t i, int64_t dh, double theta) {
  const double ang = pos * pow(theta, -2.0 * double(i) / double(dh));
  double sn, cs;
  sincos(ang, &sn, &cs);
  return {A(cs), A(sn)};
}

template <class A>
__global__ void rope_table_kernel(int64_t S, int64_t half, int64_t dh, double theta, typename RopePair<A>::type* tab) {
  MOELAB_GRID_STRIDE(j, S * half) {
    const int64_t p = j / half;
    tab[j] = rope_angle<A>(double(p), j - p * half, dh, theta);
  }
}

// One warp per token; its lanes take the token's pairs of N-element vectors (N = 8 for bf16 and
// 4 for f32 as 16-byte vectors, where rows allow; 1 otherwise): pair p is vector p % hv of the
// first and of the second half of head p / hv.
template <class T, int N, class A>
__global__ void rope_kernel(const T* x, int64_t R, int64_t W, int64_t heads, int64_t S, double theta,
                            bool inverse, const int32_t* positions, const typename RopePair<A>::type* tab, T* y) {
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= R) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  const int dh = int(W / heads), half = dh / 2, hv = half / N, pairs = int(heads) * hv;
  const int64_t pos = positions ? int64_t(positions[t]) : t % S;
  const bool in_table = pos >= 0 && pos < S;  // warp-uniform
  const auto* row = tab + (in_table ? pos * half : 0);
  for (int p = lane; p < pairs; p += 32) {
    const int h = p / hv, i0 = (p - h * hv) * N;
    const int64_t o = t * W + int64_t(h) * dh + i0;
    float fa[N], fb[N];
    if constexpr (N == 1) {
      fa[0] = load_f(x, o);
      fb[0] = load_f(x, o + half);
    } else {
      Vec<T>::load(x + o, fa);
      Vec<T>::load(x + o + half, fb);
    }
    auto rotate = [&](int q, typename RopePair<A>::type r) {
      const A a = fa[q], b = fb[q], cs = r.x, sn = inverse ? -r.y : r.y;
      fa[q] = float(a * cs - b * sn);  // for f32 in double: double -> float, store_d's rounding
      fb[q] = float(a * sn + b * cs);
    };
    if (in_table) {  // two loops, so that the table's has no call (whose registers it would keep)
#pragma unroll
      for (int q = 0; q < N; ++q) rotate(q, row[i0 + q]);
    } else {
      for (int q = 0; q < N; ++q) rotate(q, rope_angle<A>(double(pos), i0 + q, dh, theta));
    }
    if constexpr (N == 1) {
      store_f(y, o, fa[0]);
      store_f(y, o + half, fb[0]);
    } else {
      Vec<T>::store(y + o, fa);
      Vec<T>::store(y + o + half, fb);
    }
  }
}

// ---- cross-entropy ------------------------------------------------------------------------------------

template <class T> __device__ double row_lse(const T* l, int64_t V, int lane) {
  float m = -INFINITY;
  for (int64_t j = lane; j < V; j += 32) m = fmaxf(m, load_f(l, j));
  m = warp_max(m);
  double s = 0.0;
  for (int64_t j = lane; j < V; j += 32) s += double(expf(load_f(l, j) - m));
  return double(m) + log(warp_sum(s));
}

// loss[t] = lse - l[y] on rows bearing loss (counted[t] = 1), 0 on ignored rows (counted 0).
template <class T>
__global__ void ce_fwd_kernel(const T* l, const int32_t* y, int64_t R, int64_t V, double* loss,
                              double* counted, int32_t* bad) {
  const int64_t t = warp_row(R);
  if (t < 0) return;
  const int lane = threadIdx.x & 31;
  const double lse = row_lse(l + t * V, V, lane);
  if (lane == 0) {
    const int32_t yt = y[t];
    if (yt >= 0 && yt < V) {
      loss[t] = lse - load_d(l, t * V + yt);
      counted[t] = 1.0;
    } else {
      loss[t] = 0.0;
      counted[t] = 0.0;
      if (yt != kIgnoreTarget) atomicCAS(bad, INT_MIN, yt);
    }
  }
}

// n[0] = the number of targets bearing loss (!= kIgnoreTarget): one block, fixed order.
__global__ void ce_count_kernel(const int32_t* y, int64_t R, int64_t* n) {
  __shared__ int64_t part[kThreads];
  int64_t c = 0;
  for (int64_t t = threadIdx.x; t < R; t += blockDim.x) c += y[t] != kIgnoreTarget;
  part[threadIdx.x] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t s = 0;
    for (int i = 0; i < int(blockDim.x); ++i) s += part[i];
    *n = s;
  }
}

// dlogits = scale (softmax - onehot) / N on rows bearing loss (N = *n), 0 on ignored rows.
template <class T>
__global__ void ce_bwd_kernel(const T* l, const int32_t* y, int64_t R, int64_t V, double scale,
                              const int64_t* n, T* dl) {
  const int64_t t = warp_row(R);
  if (t < 0) return;
  const int lane = threadIdx.x & 31;
  const int32_t yt = y[t];
  if (yt == kIgnoreTarget) {
    for (int64_t j = lane; j < V; j += 32) store_f(dl, t * V + j, 0.0f);
    return;
  }
  const T* lr = l + t * V;
  const double lse = row_lse(lr, V, lane);
  const float c = float(scale / double(*n));
  for (int64_t j = lane; j < V; j += 32) {
    const float p = expf(float(double(load_f(lr, j)) - lse));
    store_f(dl, t * V + j, c * p - (j == yt ? c : 0.0f));
  }
}

// ---- AdamW ---------------------------------------------------------------------------------------------

// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr (m/c1 / (sqrt(v/c2) + eps) + wd p), and
// (C = bf16 or f32) out = p, the compute copy, in the same pass. fp32 arithmetic: the kernel is
// bound by memory (28 bytes per bf16-mastered parameter) only if it does not run in fp64, which
// the H200 executes at 1/64 of the fp32 rate for sqrt and division; the result differs from the
// CPU's f64 arithmetic by rounding only (op test "adamw").
template <class P, class G, class C>
__global__ void adamw_kernel(P* p, const G* g, float* m, float* v, C* out, int64_t n, float lr, float b1,
                             float b2, float eps, float wd, float inv_c1, float inv_c2) {
  MOELAB_GRID_STRIDE(i, n) {
    const float gi = load_f(g, i);
    const float mi = fmaf(b1, m[i], (1.0f - b1) * gi);
    const float vi = fmaf(b2, v[i], (1.0f - b2) * gi * gi);
    m[i] = mi;
    v[i] = vi;
    const float pi = load_f(p, i);
    const float upd = (mi * inv_c1) / (sqrtf(vi * inv_c2) + eps) + wd * pi;
    const float np = pi - lr * upd;
    store_f(p, i, np);
    if constexpr (!std::is_same_v<C, void>) store_f(out, i, load_f(p, i));
  }
}

// The same, 4 elements per thread with 16-byte loads of the fp32 master and state (the common
// case: f32 master, bf16 or f32 gradient and copy, 16-byte aligned, n % 4 == 0). The arithmetic
// is the scalar kernel's, element by element, so the results are the same bits. An 8-wide version
// (8 adjacent elements per thread: two float4 of each fp32 array, the bf16 gradient and copy as
// one 16-byte vector) was slower on an H200 (ninth session, optimizer phase: config C 10.67 ->
// 11.27 ms, D 8.35 -> 8.74): each of its float4 loads used half of every sector a warp touched.
template <class G, class C>
__global__ void adamw4_kernel(float* p, const G* g, float* m, float* v, C* out, int64_t n4, float lr, float b1,
                              float b2, float eps, float wd, float inv_c1, float inv_c2) {
  MOELAB_GRID_STRIDE(j, n4) {
    float4 pv = reinterpret_cast<float4*>(p)[j], mv = reinterpret_cast<float4*>(m)[j],
           vv = reinterpret_cast<float4*>(v)[j];
    float gv[4];
    for (int q = 0; q < 4; ++q) gv[q] = load_f(g, 4 * j + q);
    float* pp = &pv.x;
    float* mp = &mv.x;
    float* vp = &vv.x;
    for (int q = 0; q < 4; ++q) {
      const float mi = fmaf(b1, mp[q], (1.0f - b1) * gv[q]);
      const float vi = fmaf(b2, vp[q], (1.0f - b2) * gv[q] * gv[q]);
      mp[q] = mi;
      vp[q] = vi;
      const float upd = (mi * inv_c1) / (sqrtf(vi * inv_c2) + eps) + wd * pp[q];
      pp[q] = pp[q] - lr * upd;
    }
    reinterpret_cast<float4*>(p)[j] = pv;
    reinterpret_cast<float4*>(m)[j] = mv;
    reinterpret_cast<float4*>(v)[j] = vv;
    if constexpr (!std::is_same_v<C, void>)
      for (int q = 0; q < 4; ++q) store_f(out, 4 * j + q, pp[q]);
  }
}

}  // namespace

// ---- launchers ------------------------------------------------------------------------------------

void mul_scalar(Ctx& c, const Tensor& x, double alpha) {
  const int64_t n = x.numel();
  if (n == 0) return;
  dispatch_float(x.dtype(), "scale", [&](auto tag) {
    using T = decltype(tag);
    mul_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(mptr<T>(x), n, alpha);
    CUDA_CHECK_LAUNCH();
  });
}

double sum_squares(Ctx& c, const Tensor& x) {
  const int64_t n = x.numel();
  if (n == 0) return 0.0;
  // A fixed grid for a given n (not the device's SM count), so the sum's order, and its bits,
  // are the same run to run and card to card.
  const int64_t want = (n + 8 * kThreads - 1) / (8 * kThreads);
  const int blocks = int(want > 2048 ? 2048 : want);
  Buf<double> partial(c, blocks), out(c, 1);
  dispatch_float(x.dtype(), "sum_squares", [&](auto tag) {
    using T = decltype(tag);
    if (vec_ok<T>(0, {x.data()}))
      sumsq_partial_vec_kernel<T><<<blocks, kThreads, 0, c.stream>>>(cptr<T>(x), n, partial.get());
    else
      sumsq_partial_kernel<T><<<blocks, kThreads, 0, c.stream>>>(cptr<T>(x), n, partial.get());
    CUDA_CHECK_LAUNCH();
  });
  device_sum(c, partial.get(), blocks, out.get());
  double v = 0.0;
  c.to_host(&v, out.get(), sizeof(double));
  return v;
}

void embedding_forward(Ctx& c, const Tensor& tokens, const Tensor& table, const Tensor& out) {
  const int64_t Tn = tokens.dim(0), V = table.dim(0), D = table.dim(1);
  if (Tn * D == 0) return;
  Buf<int32_t> bad(c, 1);
  const int32_t none = INT_MIN;
  c.to_device_async(bad.get(), &none, sizeof(none));
  dispatch_float(table.dtype(), "embedding_forward", [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = Vec<T>::N;
    if (vec_ok<T>(D, {table.data(), out.data()}))
      embed_fwd_kernel<T, N><<<grid_for(Tn * D / N), kThreads, 0, c.stream>>>(
          cptr<int32_t>(tokens), cptr<T>(table), Tn, V, D, mptr<T>(out), bad.get());
    else
      embed_fwd_kernel<T, 1><<<grid_for(Tn * D), kThreads, 0, c.stream>>>(
          cptr<int32_t>(tokens), cptr<T>(table), Tn, V, D, mptr<T>(out), bad.get());
    CUDA_CHECK_LAUNCH();
  });
  int32_t b = INT_MIN;
  c.to_host(&b, bad.get(), sizeof(b));
  MOELAB_CHECK(b == INT_MIN, "embedding: token ", b, " outside the vocabulary [0, ", V, ")");
}

void embedding_backward(Ctx& c, const Tensor& tokens, const Tensor& dout, const Tensor& dtable) {
  const int64_t Tn = tokens.dim(0), V = dtable.dim(0), D = dtable.dim(1);
  if (Tn * D == 0) return;
  Buf<uint64_t> keys(c, Tn), keys_sorted(c, Tn);
  Buf<int32_t> vals(c, Tn), pos(c, Tn);
  embed_keys_kernel<<<grid_for(Tn), kThreads, 0, c.stream>>>(cptr<int32_t>(tokens), Tn, V,
                                                             keys.get(), vals.get());
  CUDA_CHECK_LAUNCH();
  sort_pairs(c, keys.get(), keys_sorted.get(), vals.get(), pos.get(), Tn, bits_for(uint64_t(V)));
  dispatch_float(dtable.dtype(), "embedding_backward", [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = Vec<T>::N;
    if (vec_ok<T>(D, {dout.data(), dtable.data()}))
      embed_bwd_kernel<T, N><<<grid_for(Tn * D / N), kThreads, 0, c.stream>>>(
          keys_sorted.get(), pos.get(), cptr<T>(dout), Tn, V, D, mptr<T>(dtable));
    else
      embed_bwd_kernel<T, 1><<<grid_for(Tn * D), kThreads, 0, c.stream>>>(
          keys_sorted.get(), pos.get(), cptr<T>(dout), Tn, V, D, mptr<T>(dtable));
    CUDA_CHECK_LAUNCH();
  });
}

void rmsnorm_forward(Ctx& c, const Tensor& x, const Tensor& w, double eps, const Tensor& y,
                     const Tensor& rstd) {
  const int64_t R = x.dim(0), D = x.dim(1);
  if (R == 0) return;
  dispatch_float(x.dtype(), "rmsnorm_forward", [&](auto tag) {
    using T = decltype(tag);
    if (vec_ok<T>(D, {x.data(), w.data(), y.data()}))
      rms_fwd_vec_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(cptr<T>(x), cptr<T>(w), R, D, eps,
                                                                     mptr<T>(y), mptr<T>(rstd));
    else
      rms_fwd_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(cptr<T>(x), cptr<T>(w), R, D, eps,
                                                                 mptr<T>(y), mptr<T>(rstd));
    CUDA_CHECK_LAUNCH();
  });
}

void rmsnorm_backward(Ctx& c, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      const Tensor& dy, const Tensor& dx, const Tensor& dw) {
  const int64_t R = x.dim(0), D = x.dim(1);
  if (R == 0 || D == 0) return;
  // Chunks of 64 rows: enough blocks to keep loads in flight (the final pass adds the chunks by
  // warps), doubled until the grid's y extent fits.
  int64_t ch = 64, chunks = (R + ch - 1) / ch;
  while (chunks > 65535) {
    ch *= 2;
    chunks = (R + ch - 1) / ch;
  }
  Buf<double> partial(c, chunks * D);
  dispatch_float(x.dtype(), "rmsnorm_backward", [&](auto tag) {
    using T = decltype(tag);
    if (vec_ok<T>(D, {x.data(), w.data(), dy.data(), dx.data()}))
      rms_bwd_dx_vec_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(
          cptr<T>(x), cptr<T>(w), cptr<T>(rstd), cptr<T>(dy), R, D, mptr<T>(dx));
    else
      rms_bwd_dx_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(
          cptr<T>(x), cptr<T>(w), cptr<T>(rstd), cptr<T>(dy), R, D, mptr<T>(dx));
    CUDA_CHECK_LAUNCH();
    constexpr int N = Vec<T>::N;
    const dim3 block(32, 8);
    if (vec_ok<T>(D, {x.data(), dy.data()})) {
      const dim3 grid(unsigned((D + 32 * N - 1) / (32 * N)), unsigned(chunks));
      rms_dw_partial_kernel<T, N><<<grid, block, 0, c.stream>>>(cptr<T>(x), cptr<T>(rstd), cptr<T>(dy), R, D, ch,
                                                                partial.get());
    } else {
      const dim3 grid(unsigned((D + 31) / 32), unsigned(chunks));
      rms_dw_partial_kernel<T, 1><<<grid, block, 0, c.stream>>>(cptr<T>(x), cptr<T>(rstd), cptr<T>(dy), R, D, ch,
                                                                partial.get());
    }
    CUDA_CHECK_LAUNCH();
    rms_dw_final_kernel<T><<<grid_rows(D), kThreads, 0, c.stream>>>(partial.get(), chunks, D, mptr<T>(dw));
    CUDA_CHECK_LAUNCH();
  });
}

void rope(Ctx& c, const Tensor& x, int64_t heads, int64_t seq_len, double theta, bool inverse,
          const Tensor& y, const Tensor& positions) {
  const int64_t R = x.dim(0), W = x.dim(1);
  if (R * W == 0) return;
  const int64_t dh = W / heads, half = dh / 2;
  const int32_t* pos = positions.defined() ? cptr<int32_t>(positions) : nullptr;
  dispatch_float(x.dtype(), inverse ? "rope_backward" : "rope_forward", [&](auto tag) {
    using T = decltype(tag);
    using A = std::conditional_t<std::is_same_v<T, float>, double, float>;
    using Pair = typename RopePair<A>::type;
    Buf<Pair> tab(c, seq_len * half);
    rope_table_kernel<A><<<grid_for(seq_len * half), kThreads, 0, c.stream>>>(seq_len, half, dh, theta, tab.get());
    CUDA_CHECK_LAUNCH();
    constexpr int N = Vec<T>::N;
    // Vectors: every half-head a whole number of 16-byte vectors (half % N, W % N: row starts).
    if (half % N == 0 && vec_ok<T>(W, {x.data(), y.data()}))
      rope_kernel<T, N, A><<<grid_rows(R), kThreads, 0, c.stream>>>(cptr<T>(x), R, W, heads, seq_len, theta,
                                                                    inverse, pos, tab.get(), mptr<T>(y));
    else
      rope_kernel<T, 1, A><<<grid_rows(R), kThreads, 0, c.stream>>>(cptr<T>(x), R, W, heads, seq_len, theta,
                                                                    inverse, pos, tab.get(), mptr<T>(y));
    CUDA_CHECK_LAUNCH();
  });
}

double cross_entropy_forward(Ctx& c, const Tensor& logits, const Tensor& targets) {
  const int64_t R = logits.dim(0), V = logits.dim(1);
  if (R == 0) return 0.0;
  Buf<double> loss(c, R), counted(c, R), out(c, 2);
  Buf<int32_t> bad(c, 1);
  const int32_t none = INT_MIN;
  c.to_device_async(bad.get(), &none, sizeof(none));
  dispatch_float(logits.dtype(), "cross_entropy_forward", [&](auto tag) {
    using T = decltype(tag);
    ce_fwd_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(cptr<T>(logits),
                                                              cptr<int32_t>(targets), R, V,
                                                              loss.get(), counted.get(), bad.get());
    CUDA_CHECK_LAUNCH();
  });
  device_sum(c, loss.get(), R, out.get());
  device_sum(c, counted.get(), R, out.get() + 1);
  double total[2] = {0.0, 0.0};
  int32_t b = INT_MIN;
  c.to_host(total, out.get(), 2 * sizeof(double));
  c.to_host(&b, bad.get(), sizeof(b));
  MOELAB_CHECK(b == INT_MIN, "cross_entropy: target ", b, " outside [0, ", V, ")");
  return total[1] > 0 ? total[0] / total[1] : 0.0;
}

void cross_entropy_backward(Ctx& c, const Tensor& logits, const Tensor& targets, double scale,
                            const Tensor& dlogits) {
  const int64_t R = logits.dim(0), V = logits.dim(1);
  if (R == 0) return;
  Buf<int64_t> n(c, 1);
  ce_count_kernel<<<1, kThreads, 0, c.stream>>>(cptr<int32_t>(targets), R, n.get());
  CUDA_CHECK_LAUNCH();
  dispatch_float(logits.dtype(), "cross_entropy_backward", [&](auto tag) {
    using T = decltype(tag);
    ce_bwd_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(
        cptr<T>(logits), cptr<int32_t>(targets), R, V, scale,
        n.get(), mptr<T>(dlogits));
    CUDA_CHECK_LAUNCH();
  });
}

void adamw(Ctx& c, const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
           double lr, double b1, double b2, double eps, double wd, int64_t step, const Tensor& cast_to) {
  const int64_t n = param.numel();
  if (n == 0) return;
  MOELAB_CHECK(m.dtype() == DType::F32, "cuda adamw: optimizer state must be f32");
  const double c1 = 1.0 - std::pow(b1, double(step)), c2 = 1.0 - std::pow(b2, double(step));
  dispatch_float(param.dtype(), "adamw", [&](auto ptag) {
    using P = decltype(ptag);
    dispatch_float(grad.dtype(), "adamw (grad)", [&](auto gtag) {
      using G = decltype(gtag);
      auto launch = [&](auto* out) {
        using C = std::remove_pointer_t<decltype(out)>;
        auto aligned = [](const void* q, size_t bytes) { return reinterpret_cast<uintptr_t>(q) % bytes == 0; };
        if constexpr (std::is_same_v<P, float>) {
          const size_t gb = 4 * sizeof(G);
          if (n % 4 == 0 && aligned(param.data(), 16) && aligned(m.data(), 16) && aligned(v.data(), 16) &&
              aligned(grad.data(), gb) && (out == nullptr || aligned(out, 4 * sizeof(std::conditional_t<std::is_same_v<C, void>, char, C>)))) {
            adamw4_kernel<G, C><<<grid_for(n / 4), kThreads, 0, c.stream>>>(
                mptr<float>(param), cptr<G>(grad), mptr<float>(m), mptr<float>(v), out, n / 4, float(lr),
                float(b1), float(b2), float(eps), float(wd), float(1.0 / c1), float(1.0 / c2));
            CUDA_CHECK_LAUNCH();
            return;
          }
        }
        adamw_kernel<P, G, C><<<grid_for(n), kThreads, 0, c.stream>>>(
            mptr<P>(param), cptr<G>(grad), mptr<float>(m), mptr<float>(v), out, n, float(lr), float(b1),
            float(b2), float(eps), float(wd), float(1.0 / c1), float(1.0 / c2));
        CUDA_CHECK_LAUNCH();
      };
      if (!cast_to.defined()) {
        launch(static_cast<void*>(nullptr));
      } else {
        dispatch_float(cast_to.dtype(), "adamw (cast_to)", [&](auto ctag) {
          using C = decltype(ctag);
          launch(mptr<C>(cast_to));
        });
      }
    });
  });
}

}  // namespace moelab::cuda
