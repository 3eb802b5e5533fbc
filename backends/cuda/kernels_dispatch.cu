// moelab CUDA backend: the dispatch permutation (dispatch_plan) and permute / un-permute.
//
// dispatch_plan is a counting sort: each kept assignment gets the key of its expert, a stable
// radix sort groups them by expert in assignment order (token order for token choice), and the
// per-expert counts come back to the host for the offsets (one synchronisation per plan: the
// offsets are host data by contract). Padding rows (pad-to-capacity) are token = assignment = -1.
//
// The reductions over a token's rows (permute backward, un-permute forward) are deterministic
// gathers, not atomics: a token -> rows index (CSR) is built by a second stable sort of the rows
// by token, and each output element sums its rows in ascending row order, the CPU's order.
// Rows whose token is negative or out of range are treated as padding.
#include <climits>

#include "backends/cuda/cuda_kernels.cuh"

namespace moelab::cuda {
namespace {

// ---- dispatch plan -------------------------------------------------------------------------------

// Expert counts in a block histogram when they fit (kShared): a global atomic per assignment on 8
// counters serialised (config A: 11 us a call for 32768 assignments; eighth session).

template <bool kShared>
__global__ void plan_keys_kernel(const int32_t* ix, const int32_t* kp, int64_t A, int64_t n1,
                                 bool ec, int64_t E, uint64_t* keys, int32_t* vals,
                                 int32_t* count /* [E+1]; count[E] = first bad expert */) {
  extern __shared__ int32_t hist[];
  if constexpr (kShared) block_hist_zero(hist, E);
  MOELAB_GRID_STRIDE(a, A) {
    uint64_t key = uint64_t(E);
    if (kp[a]) {
      const int64_t e = ec ? a / n1 : ix[a];
      if (e >= 0 && e < E) {
        key = uint64_t(e);
        if constexpr (kShared) atomicAdd(hist + e, 1);
        else atomicAdd(count + e, 1);
      } else {
        atomicCAS(count + E, INT_MIN, int32_t(e));
      }
    }
    keys[a] = key;
    vals[a] = int32_t(a);
  }
  if constexpr (kShared) block_hist_flush(hist, E, count);
}

// Sorted position i (< kept) of expert e goes to row off[e] + (i - start[e]).
__global__ void plan_rows_kernel(const uint64_t* keys, const int32_t* vals, int64_t kept,
                                 const int32_t* ix, int64_t n1, bool ec, const int64_t* start,
                                 const int64_t* off, int32_t* row_token, int32_t* row_assign) {
  MOELAB_GRID_STRIDE(i, kept) {
    const int64_t e = int64_t(keys[i]);
    const int32_t a = vals[i];
    const int64_t r = off[e] + (i - start[e]);
    row_token[r] = ec ? ix[a] : int32_t(a / n1);
    row_assign[r] = a;
  }
}

__global__ void fill_i32_kernel(int32_t* p, int64_t n, int32_t v) {
  MOELAB_GRID_STRIDE(i, n) p[i] = v;
}

// ---- token -> rows index ---------------------------------------------------------------------------

__global__ void csr_count_kernel(const int32_t* row_token, int64_t R, int64_t T, int32_t* count) {
  MOELAB_GRID_STRIDE(r, R) {
    const int32_t t = row_token[r];
    if (t >= 0 && t < T) atomicAdd(count + t, 1);
  }
}

// Row r into a free slot of its token's segment (slots claimed in any order; sorted below).
__global__ void csr_scatter_kernel(const int32_t* row_token, int64_t R, int64_t T, const int32_t* start,
                                   int32_t* fill, int32_t* rows) {
  MOELAB_GRID_STRIDE(r, R) {
    const int32_t t = row_token[r];
    if (t >= 0 && t < T) rows[start[t] + atomicAdd(fill + t, 1)] = int32_t(r);
  }
}

// Each token's rows ascending (insertion sort: a token has top-k rows, or a few more under expert
// choice), so the result does not depend on the order the slots were claimed in.
__global__ void csr_sort_kernel(const int32_t* start, int64_t T, int32_t* rows) {
  MOELAB_GRID_STRIDE(t, T) {
    const int32_t b = start[t], e = start[t + 1];
    for (int32_t i = b + 1; i < e; ++i) {
      const int32_t v = rows[i];
      int32_t j = i - 1;
      for (; j >= b && rows[j] > v; --j) rows[j + 1] = rows[j];
      rows[j + 1] = v;
    }
  }
}

// Rows of token t: rows[start[t] .. start[t+1]), ascending; rows with no token (padding) are in
// no segment. Counted, scanned and scattered, then sorted per token: a radix sort of the rows by
// token (two passes of 64-bit keys) took about 35 us per call on config A (eighth session).
struct TokenCsr {
  Buf<int32_t> rows, start;
  TokenCsr(Ctx& c, const Tensor& row_token, int64_t T) : rows(c, row_token.numel()), start(c, T + 1) {
    const int64_t R = row_token.numel();
    Buf<int32_t> count(c, 2 * (T + 1));  // counts, then the scatter's fill levels
    CUDA_CHECK(cudaMemsetAsync(count.get(), 0, size_t(2 * (T + 1)) * sizeof(int32_t), c.stream));
    const int32_t* rt = cptr<int32_t>(row_token);
    if (R > 0) {
      csr_count_kernel<<<grid_for(R), kThreads, 0, c.stream>>>(rt, R, T, count.get());
      CUDA_CHECK_LAUNCH();
    }
    exclusive_sum(c, count.get(), start.get(), T + 1);
    if (R > 0) {
      csr_scatter_kernel<<<grid_for(R), kThreads, 0, c.stream>>>(rt, R, T, start.get(), count.get() + T + 1,
                                                                  rows.get());
      CUDA_CHECK_LAUNCH();
      csr_sort_kernel<<<grid_for(T), kThreads, 0, c.stream>>>(start.get(), T, rows.get());
      CUDA_CHECK_LAUNCH();
    }
  }
};

// ---- permute / un-permute -------------------------------------------------------------------------

template <class T>
__global__ void permute_fwd_kernel(const T* x, const int32_t* row_token, int64_t R, int64_t D,
                                   int64_t Tn, T* xp) {
  MOELAB_GRID_STRIDE(i, R * D) {
    const int64_t r = i / D, d = i - r * D;
    const int32_t t = row_token[r];
    if (t >= 0 && t < Tn) xp[i] = x[int64_t(t) * D + d];
    else store_f(xp, i, 0.0f);
  }
}

// Out[t] = sum over the rows r of t (CSR rows / start) of g_r Src[r], g_r = gates[row_assign[r]],
// or 1 without gates. Un-permute forward combines the experts' outputs with the gate weights;
// permute backward (gates null) sums a token's row gradients: g * v with g = 1 is v exactly, so
// both keep the bits of their former separate kernels.
template <class T>
__global__ void gather_sum_kernel(const T* src, const T* gates, const int32_t* row_assign,
                                  const int32_t* rows, const int32_t* start, int64_t Tn, int64_t D,
                                  T* out) {
  MOELAB_GRID_STRIDE(i, Tn * D) {
    const int64_t t = i / D, d = i - t * D;
    float acc = 0.0f;
    for (int32_t j = start[t]; j < start[t + 1]; ++j) {
      const int64_t r = rows[j];
      const float g = gates ? load_f(gates, row_assign[r]) : 1.0f;
      acc += g * load_f(src, r * D + d);
    }
    store_f(out, i, acc);
  }
}

// dYp[r] = gates[a] dY[t]; dgates[a] = <dY[t], Yp[r]> (dgates pre-zeroed); one warp per row.
template <class T>
__global__ void unpermute_bwd_kernel(const T* dy, const T* yp, const T* gates,
                                     const int32_t* row_token, const int32_t* row_assign,
                                     int64_t R, int64_t D, int64_t Tn, T* dyp, T* dgates) {
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= R) return;
  const int lane = threadIdx.x & 31;
  const int32_t t = row_token[r];
  if (t < 0 || t >= Tn) {
    for (int64_t d = lane; d < D; d += 32) store_f(dyp, r * D + d, 0.0f);
    return;
  }
  const int32_t a = row_assign[r];
  const float g = load_f(gates, a);
  float dot = 0.0f;
  for (int64_t d = lane; d < D; d += 32) {
    const float v = load_f(dy, int64_t(t) * D + d);
    dot += v * load_f(yp, r * D + d);
    store_f(dyp, r * D + d, g * v);
  }
  dot = warp_sum(dot);
  if (lane == 0) store_f(dgates, a, dot);
}


// The same three kernels over 16-byte vectors of a row (D a multiple of Vec<T>::N, rows
// aligned): one thread per (row, vector) with one 64-bit division per vector, not per element.
// The scalar kernels ran at 0.4-1 TB/s on an H200 (kernel census, docs/performance.md). Each
// output element is the scalar kernel's sum in the scalar kernel's order, so the bits are the
// same; unpermute_bwd's dot product for dgates is summed in another order (lanes over vectors).
template <class T>
__global__ void permute_fwd_vec_kernel(const T* x, const int32_t* row_token, int64_t R, int64_t D,
                                       int64_t Tn, T* xp) {
  constexpr int N = Vec<T>::N;
  const int64_t DV = D / N;
  MOELAB_GRID_STRIDE(i, R * DV) {
    const int64_t r = i / DV, d = (i - r * DV) * N;
    const int32_t t = row_token[r];
    uint4 v = make_uint4(0, 0, 0, 0);  // zero bits: +0 in f32 and bf16 (padding rows)
    if (t >= 0 && t < Tn) v = *reinterpret_cast<const uint4*>(x + int64_t(t) * D + d);
    *reinterpret_cast<uint4*>(xp + r * D + d) = v;
  }
}

// gather_sum_kernel over 16-byte vectors.
template <class T>
__global__ void gather_sum_vec_kernel(const T* src, const T* gates, const int32_t* row_assign,
                                      const int32_t* rows, const int32_t* start, int64_t Tn,
                                      int64_t D, T* out) {
  constexpr int N = Vec<T>::N;
  const int64_t DV = D / N;
  MOELAB_GRID_STRIDE(i, Tn * DV) {
    const int64_t t = i / DV, d = (i - t * DV) * N;
    float acc[N], v[N];
#pragma unroll
    for (int q = 0; q < N; ++q) acc[q] = 0.0f;
    for (int32_t j = start[t]; j < start[t + 1]; ++j) {
      const int64_t r = rows[j];
      const float g = gates ? load_f(gates, row_assign[r]) : 1.0f;
      Vec<T>::load(src + r * D + d, v);
#pragma unroll
      for (int q = 0; q < N; ++q) acc[q] += g * v[q];
    }
    Vec<T>::store(out + t * D + d, acc);
  }
}

template <class T>
__global__ void unpermute_bwd_vec_kernel(const T* dy, const T* yp, const T* gates,
                                         const int32_t* row_token, const int32_t* row_assign,
                                         int64_t R, int64_t D, int64_t Tn, T* dyp, T* dgates) {
  constexpr int N = Vec<T>::N;
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= R) return;
  const int lane = threadIdx.x & 31;
  const int32_t t = row_token[r];
  if (t < 0 || t >= Tn) {
    for (int64_t d = lane * N; d < D; d += 32 * N) *reinterpret_cast<uint4*>(dyp + r * D + d) = make_uint4(0, 0, 0, 0);
    return;
  }
  const int32_t a = row_assign[r];
  const float g = load_f(gates, a);
  float dot = 0.0f;
  for (int64_t d = lane * N; d < D; d += 32 * N) {
    float v[N], w[N], o[N];
    Vec<T>::load(dy + int64_t(t) * D + d, v);
    Vec<T>::load(yp + r * D + d, w);
#pragma unroll
    for (int q = 0; q < N; ++q) {
      dot += v[q] * w[q];
      o[q] = g * v[q];
    }
    Vec<T>::store(dyp + r * D + d, o);
  }
  dot = warp_sum(dot);
  if (lane == 0) store_f(dgates, a, dot);
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------

DispatchPlan dispatch_plan(Ctx& c, const EmptyFn& empty, const Tensor& idx, const Tensor& keep,
                           bool ec, int64_t E, int64_t pad) {
  const int64_t n1 = idx.dim(1), A = idx.numel();
  MOELAB_CHECK(A <= INT32_MAX && E < INT32_MAX, "cuda dispatch_plan: too many assignments");
  Buf<uint64_t> keys(c, A), keys_sorted(c, A);
  Buf<int32_t> vals(c, A), vals_sorted(c, A), count(c, E + 1);
  CUDA_CHECK(cudaMemsetAsync(count.get(), 0, size_t(E) * sizeof(int32_t), c.stream));
  const int32_t no_error = INT_MIN;
  c.to_device_async(count.get() + E, &no_error, sizeof(int32_t));
  if (A > 0) {
    if (E <= kBlockHistMaxCounters)
      plan_keys_kernel<true><<<grid_for(A), kThreads, size_t(E) * sizeof(int32_t), c.stream>>>(
          cptr<int32_t>(idx), cptr<int32_t>(keep), A, n1, ec, E, keys.get(), vals.get(), count.get());
    else
      plan_keys_kernel<false><<<grid_for(A), kThreads, 0, c.stream>>>(
          cptr<int32_t>(idx), cptr<int32_t>(keep), A, n1, ec, E, keys.get(), vals.get(), count.get());
    CUDA_CHECK_LAUNCH();
    sort_pairs(c, keys.get(), keys_sorted.get(), vals.get(), vals_sorted.get(), A,
               bits_for(uint64_t(E)));
  }
  std::vector<int32_t> cnt(size_t(E + 1));
  c.to_host(cnt.data(), count.get(), cnt.size() * sizeof(int32_t));
  MOELAB_CHECK(cnt[E] == INT_MIN, "dispatch_plan: expert index ", cnt[E], " out of range");

  DispatchPlan p;
  p.offsets.assign(size_t(E + 1), 0);
  std::vector<int64_t> meta(size_t(2 * E));  // [start (unpadded) | offsets]
  int64_t kept = 0;
  for (int64_t e = 0; e < E; ++e) {
    MOELAB_CHECK(pad == 0 || cnt[e] <= pad, "dispatch_plan: expert ", e, " has ", cnt[e],
                 " kept assignments, more than pad capacity ", pad);
    meta[e] = kept;
    meta[E + e] = p.offsets[e];
    kept += cnt[e];
    p.offsets[e + 1] = p.offsets[e] + (pad ? pad : cnt[e]);
  }
  const int64_t R = p.rows();
  p.row_token = empty(Shape{R}, DType::I32);
  p.row_assign = empty(Shape{R}, DType::I32);
  if (R > kept) {
    fill_i32_kernel<<<grid_for(R), kThreads, 0, c.stream>>>(mptr<int32_t>(p.row_token), R, -1);
    CUDA_CHECK_LAUNCH();
    fill_i32_kernel<<<grid_for(R), kThreads, 0, c.stream>>>(mptr<int32_t>(p.row_assign), R, -1);
    CUDA_CHECK_LAUNCH();
  }
  if (kept > 0) {
    Buf<int64_t> dmeta(c, 2 * E);
    c.to_device_async(dmeta.get(), meta.data(), meta.size() * sizeof(int64_t));
    plan_rows_kernel<<<grid_for(kept), kThreads, 0, c.stream>>>(
        keys_sorted.get(), vals_sorted.get(), kept, cptr<int32_t>(idx), n1, ec, dmeta.get(),
        dmeta.get() + E, mptr<int32_t>(p.row_token), mptr<int32_t>(p.row_assign));
    CUDA_CHECK_LAUNCH();
  }
  return p;
}

void permute_forward(Ctx& c, const Tensor& x, const DispatchPlan& plan, const Tensor& xp) {
  const int64_t R = plan.rows(), D = x.dim(1), Tn = x.dim(0);
  if (R * D == 0) return;
  dispatch_float(x.dtype(), "permute_forward", [&](auto tag) {
    using T = decltype(tag);
    if (vec_ok<T>(D, {x.data(), xp.data()}))
      permute_fwd_vec_kernel<T><<<grid_for(R * D / Vec<T>::N), kThreads, 0, c.stream>>>(
          cptr<T>(x), cptr<int32_t>(plan.row_token), R, D, Tn, mptr<T>(xp));
    else
      permute_fwd_kernel<T><<<grid_for(R * D), kThreads, 0, c.stream>>>(
          cptr<T>(x), cptr<int32_t>(plan.row_token), R, D, Tn, mptr<T>(xp));
    CUDA_CHECK_LAUNCH();
  });
}

// out [Tn, D] = the gate-weighted (gates defined) or plain sum of each token's rows of src.
static void gather_sum(Ctx& c, const Tensor& src, const DispatchPlan& plan, const Tensor& gates,
                       const Tensor& out, const char* op) {
  const int64_t Tn = out.dim(0), D = out.dim(1);
  if (Tn * D == 0) return;
  TokenCsr csr(c, plan.row_token, Tn);
  dispatch_float(out.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* g = gates.defined() ? cptr<T>(gates) : nullptr;
    const int32_t* ra = gates.defined() ? cptr<int32_t>(plan.row_assign) : nullptr;
    if (vec_ok<T>(D, {src.data(), out.data()}))
      gather_sum_vec_kernel<T><<<grid_for(Tn * D / Vec<T>::N), kThreads, 0, c.stream>>>(
          cptr<T>(src), g, ra, csr.rows.get(), csr.start.get(), Tn, D, mptr<T>(out));
    else
      gather_sum_kernel<T><<<grid_for(Tn * D), kThreads, 0, c.stream>>>(
          cptr<T>(src), g, ra, csr.rows.get(), csr.start.get(), Tn, D, mptr<T>(out));
    CUDA_CHECK_LAUNCH();
  });
}

void permute_backward(Ctx& c, const Tensor& dxp, const DispatchPlan& plan, const Tensor& dx) {
  gather_sum(c, dxp, plan, Tensor(), dx, "permute_backward");
}

void unpermute_forward(Ctx& c, const Tensor& yp, const DispatchPlan& plan, const Tensor& gates,
                       const Tensor& y) {
  gather_sum(c, yp, plan, gates, y, "unpermute_forward");
}

void unpermute_backward(Ctx& c, const Tensor& dy, const Tensor& yp, const DispatchPlan& plan,
                        const Tensor& gates, const Tensor& dyp, const Tensor& dgates) {
  const int64_t R = plan.rows(), D = dy.dim(1), Tn = dy.dim(0);
  fill(c, dgates, 0.0);
  if (R == 0) return;
  dispatch_float(dy.dtype(), "unpermute_backward", [&](auto tag) {
    using T = decltype(tag);
    if (vec_ok<T>(D, {dy.data(), yp.data(), dyp.data()}))
      unpermute_bwd_vec_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(
          cptr<T>(dy), cptr<T>(yp), cptr<T>(gates), cptr<int32_t>(plan.row_token),
          cptr<int32_t>(plan.row_assign), R, D, Tn, mptr<T>(dyp), mptr<T>(dgates));
    else
      unpermute_bwd_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(
          cptr<T>(dy), cptr<T>(yp), cptr<T>(gates), cptr<int32_t>(plan.row_token),
          cptr<int32_t>(plan.row_assign), R, D, Tn, mptr<T>(dyp), mptr<T>(dgates));
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace moelab::cuda
