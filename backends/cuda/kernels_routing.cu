// moelab CUDA backend: routing kernels (top-k, the forced-balance assignment, gates, GShard
// random top-2, capacity, Sinkhorn, expert choice). No gradient flows through a selection.
//
// Selections compare values in double exactly as the CPU reference does (score + bias formed in
// double), so given the same inputs both backends make the same choices, ties included:
//   - topk: one thread per token, K passes over the row; pass j takes the largest element that
//     comes after pass j-1's pick in the order (value descending, index ascending);
//   - capacity (Probs) and expert choice: a stable radix sort on (expert, value descending) with
//     items in ascending assignment / token order, so ties go to the lower token;
//   - capacity (Position): the same sort on the expert alone (stable: token order).
// Sinkhorn runs in double with the CPU's update order; a device-side flag ends the iterations
// and the host looks at it every 8 iterations (kernels after convergence return at once).
#include <cfloat>

#include "backends/cuda/cuda_kernels.cuh"
#include "backends/cuda/router_grad_terms.cuh"
#include "core/rng.h"

namespace moelab::cuda {
namespace {

// ---- top-k and gates -----------------------------------------------------------------------------

// The element after (pv, pi) in the order (value desc, index asc); pi < 0 asks for the first.
template <class Get>
__device__ __forceinline__ int next_in_order(const Get& get, int64_t E, double pv, int64_t pi,
                                             double* bv) {
  int best = -1;
  double b = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    const double v = get(e);
    if (pi >= 0 && !(v < pv || (v == pv && e > pi))) continue;
    if (best < 0 || v > b) {  // strict: an equal value later in the row loses (lower index wins)
      best = int(e);
      b = v;
    }
  }
  *bv = b;
  return best;
}

template <class T>
__global__ void topk_kernel(const T* s, const float* bias, int64_t R, int64_t E, int64_t K,
                            int32_t* idx) {
  MOELAB_GRID_STRIDE(t, R) {
    const T* row = s + t * E;
    auto get = [&](int64_t e) { return load_d(row, e) + (bias ? double(bias[e]) : 0.0); };
    double pv = 0.0;
    int64_t pi = -1;
    for (int64_t j = 0; j < K; ++j) {
      double v;
      const int e = next_in_order(get, E, pv, pi, &v);
      idx[t * K + j] = e;
      pv = v;
      pi = e;
    }
  }
}

// router.force_balance: assignment a = (offset + t) K + j goes to expert a mod E (one thread per
// assignment; the same integers as the CPU's loop).
__global__ void balanced_assign_kernel(int64_t A, int64_t K, int64_t E, int64_t offset, int32_t* idx) {
  MOELAB_GRID_STRIDE(a, A) {
    const int64_t t = a / K, j = a - t * K;
    idx[a] = int32_t(((offset + t) * K + j) % E);
  }
}

// gates[t,j] = scale s[t, idx[t,j]] / (normalize ? sum_j s[t, idx[t,j]] : 1).
template <class T>
__global__ void gates_fwd_kernel(const T* s, const int32_t* idx, int64_t R, int64_t E, int64_t K,
                                 bool normalize, double scale, T* gates) {
  MOELAB_GRID_STRIDE(t, R) {
    const int32_t* it = idx + t * K;
    double z = 0.0;
    for (int64_t j = 0; j < K; ++j) z += load_d(s, t * E + it[j]);
    if (!normalize) z = 1.0;
    for (int64_t j = 0; j < K; ++j) store_d(gates, t * K + j, scale * load_d(s, t * E + it[j]) / z);
  }
}

// dscores (overwritten): zero except at the chosen experts; normalised gates g_j = s_j / z give
// dL/ds_j = scale (dg_j / z - sum_i dg_i s_i / z^2).
template <class T>
__global__ void gates_bwd_kernel(const T* s, const int32_t* idx, const T* dg, int64_t R,
                                 int64_t E, int64_t K, bool normalize, double scale, T* ds) {
  MOELAB_GRID_STRIDE(t, R) {
    const int32_t* it = idx + t * K;
    for (int64_t e = 0; e < E; ++e) store_d(ds, t * E + e, 0.0);
    double z, dot;
    gate_norm(s, it, dg, t, E, K, normalize, z, dot);
    for (int64_t j = 0; j < K; ++j) {
      const double d = gate_grad(load_d(dg, t * K + j), z, dot, normalize);
      const int64_t i = t * E + it[j];
      store_d(ds, i, load_d(ds, i) + scale * d);
    }
  }
}

// keep[t,0] = 1; keep[t,1] = [u(seed, t) < min(1, g2 / tau)], g2 = gates[t,1] / (g[t,0] + g[t,1]).
template <class T>
__global__ void random_top2_kernel(const T* g, int64_t R, double tau, uint64_t seed, int32_t* keep,
                                   uint64_t offset) {
  MOELAB_GRID_STRIDE(t, R) {
    const double g1 = load_d(g, 2 * t), g2 = load_d(g, 2 * t + 1);
    const double g2n = g1 + g2 > 0 ? g2 / (g1 + g2) : 0.0;
    keep[2 * t] = 1;
    keep[2 * t + 1] = rng::uniform(seed, offset + uint64_t(t)) < fmin(1.0, g2n / tau) ? 1 : 0;
  }
}

// ---- capacity ------------------------------------------------------------------------------------

// Sort keys for the kept assignments: (expert << shift) | (shift ? gate descending : 0); others
// get the sentinel expert E and sort last. Counts kept assignments per expert.
template <class T>
__global__ void capacity_keys_kernel(const int32_t* ex, const int32_t* kp, const T* g, int64_t A,
                                     int64_t E, int shift, uint64_t* keys, int32_t* vals,
                                     int32_t* count) {
  MOELAB_GRID_STRIDE(a, A) {
    const int32_t e = ex[a];
    uint64_t key = uint64_t(E) << shift;
    if (kp[a] && e >= 0 && e < E) {
      key = (uint64_t(e) << shift) | (shift ? uint64_t(desc_key(load_f(g, a))) : 0u);
      atomicAdd(count + e, 1);  // integer: order-independent
    }
    keys[a] = key;
    vals[a] = int32_t(a);
  }
}

// Sorted position i of expert e has rank i - start[e]; ranks >= C are dropped.
__global__ void capacity_apply_kernel(const uint64_t* keys, const int32_t* vals, int64_t A,
                                      int64_t E, int shift, const int32_t* start, int64_t C,
                                      int32_t* kp) {
  MOELAB_GRID_STRIDE(i, A) {
    const int64_t e = int64_t(keys[i] >> shift);
    if (e < E && i - start[e] >= C) kp[vals[i]] = 0;
  }
}

// ---- Sinkhorn ------------------------------------------------------------------------------------

template <class T> __global__ void to_double_kernel(const T* x, double* y, int64_t n) {
  MOELAB_GRID_STRIDE(i, n) y[i] = load_d(x, i);
}

// cm[t,e] = exp(l - max l) in place, and its transpose ct [E, R].
__global__ void sk_exp_kernel(double* cm, double* ct, int64_t R, int64_t E, const double* mx) {
  MOELAB_GRID_STRIDE(i, R * E) {
    const int64_t t = i / E, e = i - t * E;
    const double v = exp(cm[i] - *mx);
    cm[i] = v;
    ct[e * R + t] = v;
  }
}

__global__ void sk_init_kernel(double* d1, int64_t E, int* state) {
  MOELAB_GRID_STRIDE(e, E) d1[e] = 1.0;
  if (blockIdx.x == 0 && threadIdx.x == 0) state[0] = state[1] = 0;  // done, iterations
}

constexpr double kSinkhornEps = 1e-8;

// d0[t] = (1/R) / (sum_e c[t,e] d1[e] + eps); one warp per token.
__global__ void sk_rows_kernel(const double* cm, const double* d1, double* d0, int64_t R,
                               int64_t E, const int* state) {
  if (state[0]) return;
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= R) return;
  const int lane = threadIdx.x & 31;
  double s = 0.0;
  for (int64_t e = lane; e < E; e += 32) s += cm[t * E + e] * d1[e];
  s = warp_sum(s);
  if (lane == 0) d0[t] = (1.0 / double(R)) / (s + kSinkhornEps);
}

// d1[e] = (1/E) / (sum_t d0[t] c[t,e] + eps) and |change|; one block per expert.
__global__ void sk_cols_kernel(const double* ct, const double* d0, double* d1, double* diff,
                               int64_t R, int64_t E, const int* state) {
  if (state[0]) return;
  const int64_t e = blockIdx.x;
  double s = 0.0;
  for (int64_t t = threadIdx.x; t < R; t += blockDim.x) s += d0[t] * ct[e * R + t];
  s = block_sum(s);
  if (threadIdx.x == 0) {
    const double nd1 = (1.0 / double(E)) / (s + kSinkhornEps);
    diff[e] = fabs(nd1 - d1[e]);
    d1[e] = nd1;
  }
}

// One more iteration done; converged when mean |delta d1| < tol.
__global__ void sk_check_kernel(const double* diff, int64_t E, double tol, int* state) {
  if (state[0]) return;
  double s = 0.0;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) s += diff[e];
  s = block_sum(s);
  if (threadIdx.x == 0) {
    state[1] += 1;
    if (s / double(E) < tol) state[0] = 1;
  }
}

template <class T>
__global__ void sk_out_kernel(const double* cm, const double* d0, const double* d1, int64_t R,
                              int64_t E, T* out) {
  MOELAB_GRID_STRIDE(i, R * E) {
    const int64_t t = i / E, e = i - t * E;
    store_d(out, i, d0[t] * cm[i] * d1[e]);
  }
}

// ---- expert choice -------------------------------------------------------------------------------

// Item i = e*R + t: key (e << 32) | score descending, value t (items in token order per expert).
template <class T>
__global__ void ec_keys_kernel(const T* s, int64_t R, int64_t E, uint64_t* keys, int32_t* vals) {
  MOELAB_GRID_STRIDE(i, R * E) {
    const int64_t e = i / R, t = i - e * R;
    keys[i] = (uint64_t(e) << 32) | uint64_t(desc_key(load_f(s, t * E + e)));
    vals[i] = int32_t(t);
  }
}

__global__ void ec_gather_kernel(const int32_t* sorted_tokens, int64_t R, int64_t E, int64_t C,
                                 int32_t* chosen) {
  MOELAB_GRID_STRIDE(i, E * C) {
    const int64_t e = i / C, c = i - e * C;
    chosen[i] = sorted_tokens[e * R + c];
  }
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------

void topk(Ctx& c, const Tensor& scores, const Tensor& bias, const Tensor& idx) {
  const int64_t R = scores.dim(0), E = scores.dim(1), K = idx.dim(1);
  if (R == 0) return;
  dispatch_float(scores.dtype(), "topk", [&](auto tag) {
    using T = decltype(tag);
    topk_kernel<T><<<grid_for(R, 128), 128, 0, c.stream>>>(
        cptr<T>(scores), bias.defined() ? cptr<float>(bias) : nullptr, R, E, K, mptr<int32_t>(idx));
    CUDA_CHECK_LAUNCH();
  });
}

void balanced_assign(Ctx& c, const Tensor& idx, int64_t experts, int64_t offset) {
  const int64_t A = idx.numel(), K = idx.dim(1);
  if (A == 0) return;
  balanced_assign_kernel<<<grid_for(A, 256), 256, 0, c.stream>>>(A, K, experts, offset, mptr<int32_t>(idx));
  CUDA_CHECK_LAUNCH();
}

void gates_forward(Ctx& c, const Tensor& scores, const Tensor& idx, bool normalize, double scale,
                   const Tensor& gates) {
  const int64_t R = scores.dim(0), E = scores.dim(1), K = idx.dim(1);
  if (R == 0) return;
  dispatch_float(scores.dtype(), "gates_forward", [&](auto tag) {
    using T = decltype(tag);
    gates_fwd_kernel<T><<<grid_for(R, 128), 128, 0, c.stream>>>(
        cptr<T>(scores), cptr<int32_t>(idx), R, E, K, normalize, scale, mptr<T>(gates));
    CUDA_CHECK_LAUNCH();
  });
}

void gates_backward(Ctx& c, const Tensor& scores, const Tensor& idx, const Tensor& dgates,
                    bool normalize, double scale, const Tensor& dscores) {
  const int64_t R = scores.dim(0), E = scores.dim(1), K = idx.dim(1);
  if (R == 0) return;
  dispatch_float(scores.dtype(), "gates_backward", [&](auto tag) {
    using T = decltype(tag);
    gates_bwd_kernel<T><<<grid_for(R, 128), 128, 0, c.stream>>>(
        cptr<T>(scores), cptr<int32_t>(idx), cptr<T>(dgates), R, E, K, normalize, scale,
        mptr<T>(dscores));
    CUDA_CHECK_LAUNCH();
  });
}

void random_top2_mask(Ctx& c, const Tensor& gates, double tau, uint64_t seed, const Tensor& keep,
                      uint64_t offset) {
  const int64_t R = gates.dim(0);
  if (R == 0) return;
  dispatch_float(gates.dtype(), "random_top2_mask", [&](auto tag) {
    using T = decltype(tag);
    random_top2_kernel<T><<<grid_for(R), kThreads, 0, c.stream>>>(cptr<T>(gates), R, tau, seed,
                                                                   mptr<int32_t>(keep), offset);
    CUDA_CHECK_LAUNCH();
  });
}

void capacity_mask(Ctx& c, const Tensor& idx, const Tensor& gates, int64_t E, int64_t C,
                   DropPolicy policy, const Tensor& keep) {
  const int64_t A = idx.numel();
  if (A == 0) return;
  const int shift = policy == DropPolicy::Probs ? 32 : 0;
  Buf<uint64_t> keys(c, A), keys_sorted(c, A);
  Buf<int32_t> vals(c, A), vals_sorted(c, A), count(c, E), start(c, E);
  CUDA_CHECK(cudaMemsetAsync(count.get(), 0, size_t(E) * sizeof(int32_t), c.stream));
  dispatch_float(gates.dtype(), "capacity_mask", [&](auto tag) {
    using T = decltype(tag);
    capacity_keys_kernel<T><<<grid_for(A), kThreads, 0, c.stream>>>(
        cptr<int32_t>(idx), cptr<int32_t>(keep), cptr<T>(gates), A, E, shift, keys.get(),
        vals.get(), count.get());
    CUDA_CHECK_LAUNCH();
  });
  sort_pairs(c, keys.get(), keys_sorted.get(), vals.get(), vals_sorted.get(), A,
             shift + bits_for(uint64_t(E)));
  exclusive_sum(c, count.get(), start.get(), E);
  capacity_apply_kernel<<<grid_for(A), kThreads, 0, c.stream>>>(
      keys_sorted.get(), vals_sorted.get(), A, E, shift, start.get(), C, mptr<int32_t>(keep));
  CUDA_CHECK_LAUNCH();
}

int sinkhorn(Ctx& c, const Tensor& logits, double tol, int max_iters, const Tensor& out) {
  const int64_t R = logits.dim(0), E = logits.dim(1), n = R * E;
  if (n == 0) return 0;
  Buf<double> cm(c, n), ct(c, n), d0(c, R), d1(c, E), diff(c, E), mx(c, 1);
  Buf<int> state(c, 2);
  dispatch_float(logits.dtype(), "sinkhorn", [&](auto tag) {
    using T = decltype(tag);
    to_double_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(cptr<T>(logits), cm.get(), n);
    CUDA_CHECK_LAUNCH();
  });
  device_max(c, cm.get(), n, mx.get());
  sk_exp_kernel<<<grid_for(n), kThreads, 0, c.stream>>>(cm.get(), ct.get(), R, E, mx.get());
  CUDA_CHECK_LAUNCH();
  sk_init_kernel<<<grid_for(E), kThreads, 0, c.stream>>>(d1.get(), E, state.get());
  CUDA_CHECK_LAUNCH();
  MOELAB_CHECK(E <= INT32_MAX, "cuda sinkhorn: too many experts");
  int host_state[2] = {0, 0};
  for (int it = 0; it < max_iters; ++it) {
    sk_rows_kernel<<<grid_rows(R), kThreads, 0, c.stream>>>(cm.get(), d1.get(), d0.get(), R, E,
                                                            state.get());
    CUDA_CHECK_LAUNCH();
    sk_cols_kernel<<<unsigned(E), kThreads, 0, c.stream>>>(ct.get(), d0.get(), d1.get(),
                                                           diff.get(), R, E, state.get());
    CUDA_CHECK_LAUNCH();
    sk_check_kernel<<<1, kThreads, 0, c.stream>>>(diff.get(), E, tol, state.get());
    CUDA_CHECK_LAUNCH();
    if ((it + 1) % 8 == 0 && it + 1 < max_iters) {
      c.to_host(host_state, state.get(), sizeof(host_state));
      if (host_state[0]) break;
    }
  }
  dispatch_float(logits.dtype(), "sinkhorn", [&](auto tag) {
    using T = decltype(tag);
    sk_out_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(cm.get(), d0.get(), d1.get(), R, E,
                                                             mptr<T>(out));
    CUDA_CHECK_LAUNCH();
  });
  c.to_host(host_state, state.get(), sizeof(host_state));
  return host_state[1];
}

void expert_choice(Ctx& c, const Tensor& scores, const Tensor& chosen) {
  const int64_t R = scores.dim(0), E = scores.dim(1), C = chosen.dim(1), n = R * E;
  if (n == 0) return;
  Buf<uint64_t> keys(c, n), keys_sorted(c, n);
  Buf<int32_t> vals(c, n), vals_sorted(c, n);
  dispatch_float(scores.dtype(), "expert_choice", [&](auto tag) {
    using T = decltype(tag);
    ec_keys_kernel<T><<<grid_for(n), kThreads, 0, c.stream>>>(cptr<T>(scores), R, E, keys.get(),
                                                              vals.get());
    CUDA_CHECK_LAUNCH();
  });
  sort_pairs(c, keys.get(), keys_sorted.get(), vals.get(), vals_sorted.get(), n,
             32 + bits_for(uint64_t(E - 1)));
  ec_gather_kernel<<<grid_for(E * C), kThreads, 0, c.stream>>>(vals_sorted.get(), R, E, C,
                                                               mptr<int32_t>(chosen));
  CUDA_CHECK_LAUNCH();
}

}  // namespace moelab::cuda
