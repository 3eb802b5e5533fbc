// moelab CUDA backend: router losses (forward values, backward accumulations) and router
// statistics. Formulas and sources: core/backend.h and BACKGROUND.md section 3.
//
//   aux   L = E sum_i f_i P_i (per sequence when seq_len > 0, averaged)     Switch / Megatron
//   z     L = (1/T) sum_t logsumexp(l_t)^2                                   ST-MoE
//   cv2   L = CV(importance)^2, importance_e = sum of the gates routed to e  Shazeer 2017
//   load  L = CV(load)^2, load_e = sum_t Phi((clean_te - thr_te) / std_te)   Shazeer 2017
//
// All arithmetic is in double (the router is small: T x E), every reduction is deterministic
// (integer atomics for counts; fixed-order partial sums for reals), and the tiny E-sized tails
// (CV^2 and its gradient, the aux-loss sum) run in one thread in the CPU's order. Forward values
// come back to the host (one synchronisation); backward passes never synchronise.
#include <cfloat>
#include <cmath>

#include "backends/cuda/cuda_kernels.cuh"
#include "backends/cuda/router_grad_terms.cuh"

namespace moelab::cuda {
namespace {

// ---- aux loss -------------------------------------------------------------------------------------

// Counting kernels use a block histogram (block_hist_*) when their counters fit
// (kBlockHistMaxCounters): a global atomic per assignment on a few counters serialised (config A:
// 27 us a call for 32768 assignments on 8 experts, kernel census in docs/performance.md, eighth
// session).

// cnt[s, e] = number of assignments of expert e in sequence s (tokens [s S, (s+1) S)).
template <bool kShared>
__global__ void aux_counts_kernel(const int32_t* idx, int64_t A, int64_t K, int64_t S, int64_t E,
                                  int32_t* cnt) {
  extern __shared__ int32_t hist[];
  const int64_t n = A / (K * S) * E;  // whole sequences only, as the callers size cnt
  if constexpr (kShared) block_hist_zero(hist, n);
  MOELAB_GRID_STRIDE(a, A) {
    const int32_t e = idx[a];
    if (e < 0 || e >= E) continue;
    const int64_t at = (a / K / S) * E + e;
    if (at >= n) continue;
    if constexpr (kShared) atomicAdd(hist + at, 1);
    else atomicAdd(cnt + at, 1);
  }
  if constexpr (kShared) block_hist_flush(hist, n, cnt);
}

// cnt [R / S, E] (zeroed here) = the assignment counts of idx [R, K] per sequence of S tokens.
void aux_counts(Ctx& c, const int32_t* idx, int64_t R, int64_t K, int64_t S, int64_t E, int32_t* cnt) {
  const int64_t n = R / S * E;
  CUDA_CHECK(cudaMemsetAsync(cnt, 0, size_t(n) * sizeof(int32_t), c.stream));
  if (n <= kBlockHistMaxCounters)
    aux_counts_kernel<true><<<grid_for(R * K), kThreads, size_t(n) * sizeof(int32_t), c.stream>>>(idx, R * K, K, S, E, cnt);
  else
    aux_counts_kernel<false><<<grid_for(R * K), kThreads, 0, c.stream>>>(idx, R * K, K, S, E, cnt);
  CUDA_CHECK_LAUNCH();
}

__global__ void aux_value_kernel(const int32_t* cnt, const double* P, int64_t nseq, int64_t E,
                                 int64_t S, int64_t K, double* out) {
  double total = 0.0;
  for (int64_t s = 0; s < nseq; ++s)
    for (int64_t e = 0; e < E; ++e)
      total += double(E) * (double(cnt[s * E + e]) / double(S * K)) * P[s * E + e] / double(S);
  *out = total / double(nseq);
}

template <class T>
__global__ void aux_bwd_kernel(const int32_t* cnt, int64_t R, int64_t E, int64_t S, int64_t K,
                               int64_t nseq, double scale, T* dprobs) {
  MOELAB_GRID_STRIDE(i, R * E) {
    const int64_t t = i / E, e = i - t * E;
    store_d(dprobs, i, load_d(dprobs, i) + aux_grad_term(cnt, t, e, E, S, K, nseq, scale));
  }
}

// ---- z-loss -------------------------------------------------------------------------------------

template <class T> __device__ double warp_logsumexp(const T* l, int64_t E, int lane) {
  double m = -DBL_MAX;
  for (int64_t e = lane; e < E; e += 32) m = fmax(m, load_d(l, e));
  m = warp_max(m);
  double s = 0.0;
  for (int64_t e = lane; e < E; e += 32) s += exp(load_d(l, e) - m);
  return m + log(warp_sum(s));
}

template <class T> __global__ void zloss_rows_kernel(const T* l, int64_t R, int64_t E, double* sq) {
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= R) return;
  const int lane = threadIdx.x & 31;
  const double lse = warp_logsumexp(l + t * E, E, lane);
  if (lane == 0) sq[t] = lse * lse;
}

// d lse^2 / dl = 2 lse softmax(l); accumulates scale / T of it.
template <class T>
__global__ void zloss_bwd_kernel(const T* l, int64_t R, int64_t E, double scale, T* dl) {
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= R) return;
  const int lane = threadIdx.x & 31;
  const double lse = warp_logsumexp(l + t * E, E, lane);
  for (int64_t e = lane; e < E; e += 32) {
    const int64_t i = t * E + e;
    store_d(dl, i, load_d(dl, i) + zloss_grad_term(load_d(l, i), lse, scale, R));
  }
}

// ---- CV^2 (importance and load) -------------------------------------------------------------------

// CV^2 = Var(x) / mean(x)^2 (population variance) and d CV^2 / dx_e, exactly the CPU's formula
// and order. out[0] = value, out[1 + e] = gradient.
__global__ void cv2_kernel(const double* x, int64_t n, double* out) {
  double m = 0.0;
  for (int64_t e = 0; e < n; ++e) m += x[e];
  m /= double(n);
  if (m == 0.0) {
    out[0] = 0.0;
    for (int64_t e = 0; e < n; ++e) out[1 + e] = 0.0;
    return;
  }
  double v = 0.0;
  for (int64_t e = 0; e < n; ++e) v += (x[e] - m) * (x[e] - m);
  v /= double(n);
  for (int64_t e = 0; e < n; ++e)
    out[1 + e] = (2.0 / double(n)) * (x[e] - m) / (m * m) - 2.0 * v / (m * m * m) / double(n);
  out[0] = v / (m * m);
}

constexpr int kImpChunk = 256;

// partial[chunk, e] = sum of the chunk's gates routed to e, in assignment order.
template <class T>
__global__ void importance_partial_kernel(const T* g, const int32_t* idx, int64_t A, int64_t E,
                                          double* partial) {
  __shared__ int32_t is[kImpChunk];
  __shared__ double gs[kImpChunk];
  const int64_t a0 = int64_t(blockIdx.x) * kImpChunk;
  const int len = int(A - a0 < kImpChunk ? A - a0 : kImpChunk);
  if (threadIdx.x < len) {
    is[threadIdx.x] = idx[a0 + threadIdx.x];
    gs[threadIdx.x] = load_d(g, a0 + threadIdx.x);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    double acc = 0.0;
    for (int j = 0; j < len; ++j)
      if (is[j] == e) acc += gs[j];
    partial[int64_t(blockIdx.x) * E + e] = acc;
  }
}

template <class T>
__global__ void cv2_bwd_kernel(const int32_t* idx, int64_t A, int64_t E, const double* grad,
                               double scale, T* dg) {
  MOELAB_GRID_STRIDE(a, A) {
    const int32_t e = idx[a];
    if (e >= 0 && e < E) store_d(dg, a, load_d(dg, a) + scale * grad[e]);
  }
}

// ---- load loss ------------------------------------------------------------------------------------

__device__ __forceinline__ double normal_cdf(double z) { return 0.5 * erfc(-z * 0.7071067811865476); }
__device__ __forceinline__ double normal_pdf(double z) { return exp(-0.5 * z * z) * 0.3989422804014327; }

// The element after (pv, pi) in the order (value desc, index asc) of row h[0..E).
template <class T>
__device__ int next_after(const T* h, int64_t E, double pv, int64_t pi, double* bv) {
  int best = -1;
  double b = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    const double v = load_d(h, e);
    if (pi >= 0 && !(v < pv || (v == pv && e > pi))) continue;
    if (best < 0 || v > b) {
      best = int(e);
      b = v;
    }
  }
  *bv = b;
  return best;
}

// Per token: o_k-1 and o_k, the k-th and (k+1)-th of h's row in (value desc, index asc) order.
// The k-th largest of the row excluding e is o_k when e is among the top k, else o_k-1.
// z[t,e] = (clean - h[thr]) / std, jx = thr, phi = Phi(z).
template <class T>
__global__ void load_terms_kernel(const T* clean, const T* h, const T* std, double sigma,
                                  int64_t R, int64_t E, int64_t k, double* z, int32_t* jx,
                                  double* phi, int32_t* kth) {
  MOELAB_GRID_STRIDE(t, R) {
    const T* hr = h + t * E;
    double pv = 0.0, va = 0.0, vb = 0.0;
    int64_t pi = -1;
    int a = -1, b = -1;
    for (int64_t j = 0; j <= k; ++j) {
      double v;
      const int e = next_after(hr, E, pv, pi, &v);
      if (j == k - 1) { a = e; va = v; }
      if (j == k) { b = e; vb = v; }
      pv = v;
      pi = e;
    }
    kth[2 * t] = a;
    kth[2 * t + 1] = b;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t i = t * E + e;
      const double he = load_d(hr, e);
      const bool in_top = he > va || (he == va && e <= a);
      const int js = in_top ? b : a;
      const double thr = in_top ? vb : va;
      const double s = std ? load_d(std, i) : sigma;
      const double zz = (load_d(clean, i) - thr) / s;
      z[i] = zz;
      jx[i] = js;
      phi[i] = normal_cdf(zz);
    }
  }
}

// dclean += dz / s, dh[thr] -= dz / s, dstd -= dz z / s with dz = scale g_e pdf(z); per token.
template <class T>
__global__ void load_bwd_kernel(const T* std, double sigma, int64_t R, int64_t E,
                                const double* z, const int32_t* jx, const int32_t* kth,
                                const double* grad, double scale, T* dclean, T* dstd, T* dh) {
  MOELAB_GRID_STRIDE(t, R) {
    const int a = kth[2 * t], b = kth[2 * t + 1];
    double acc_a = 0.0, acc_b = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t i = t * E + e;
      const double s = std ? load_d(std, i) : sigma;
      const double dz = scale * grad[e] * normal_pdf(z[i]);
      store_d(dclean, i, load_d(dclean, i) + dz / s);
      if (jx[i] == a) acc_a += dz / s;
      else acc_b += dz / s;
      if (dstd) store_d(dstd, i, load_d(dstd, i) - dz * z[i] / s);
    }
    store_d(dh, t * E + a, load_d(dh, t * E + a) - acc_a);
    store_d(dh, t * E + b, load_d(dh, t * E + b) - acc_b);
  }
}

// ---- router statistics ----------------------------------------------------------------------------

// cnt [routed E | kept E] over the assignments idx (keep: kept or not); has[t] = 1 for tokens
// with a kept assignment.
template <bool kShared>
__global__ void stats_counts_kernel(const int32_t* idx, const int32_t* keep, int64_t A, int64_t n1,
                                    bool ec, int64_t E, int64_t R, unsigned long long* cnt,
                                    int32_t* has) {
  extern __shared__ unsigned int shist[];
  if constexpr (kShared) block_hist_zero(shist, 2 * E);
  MOELAB_GRID_STRIDE(a, A) {
    const int64_t e = ec ? a / n1 : idx[a];
    const int64_t t = ec ? idx[a] : a / n1;
    if (e < 0 || e >= E) continue;
    const bool kept = keep[a] != 0;
    if constexpr (kShared) {
      atomicAdd(shist + e, 1u);
      if (kept) atomicAdd(shist + E + e, 1u);
    } else {
      atomicAdd(cnt + e, 1ull);
      if (kept) atomicAdd(cnt + E + e, 1ull);
    }
    if (kept && t >= 0 && t < R) has[t] = 1;
  }
  if constexpr (kShared) block_hist_flush(shist, 2 * E, cnt);
}

__global__ void count_zero_kernel(const int32_t* has, int64_t R, unsigned long long* out) {
  MOELAB_GRID_STRIDE(t, R) if (!has[t]) atomicAdd(out, 1ull);
}

// One token's statistics, each reduced over the warp: entropy, max prob, sum l^2, max |l|.
// each(k, p) sees the lane's k-th probability (column lane + 32 k), in order.
struct RowStats {
  double ent, top, sq, mx;
};
template <class T, class F>
__device__ __forceinline__ RowStats row_stats(const T* l, const T* p, int64_t t, int64_t E, int lane, F&& each) {
  double ent = 0.0, top = 0.0, sq = 0.0, mx = 0.0;
  int k = 0;
  for (int64_t e = lane; e < E; e += 32, ++k) {
    const double pv = load_d(p, t * E + e), lv = load_d(l, t * E + e);
    if (pv > 0) ent -= pv * log(pv);
    top = fmax(top, pv);
    sq += lv * lv;
    mx = fmax(mx, fabs(lv));
    each(k, pv);
  }
  ent = warp_sum(ent);
  top = warp_max(top);
  sq = warp_sum(sq);
  mx = warp_max(mx);
  return {ent, top, sq, mx};
}

// Per token: entropy, max prob, sum l^2, max |l| into rows [0..4) of v [4, R].
template <class T>
__global__ void stats_rows_kernel(const T* l, const T* p, int64_t R, int64_t E, double* v) {
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= R) return;
  const int lane = threadIdx.x & 31;
  const RowStats r = row_stats(l, p, t, E, lane, [](int, double) {});
  if (lane == 0) {
    v[t] = r.ent;
    v[R + t] = r.top;
    v[2 * R + t] = r.sq;
    v[3 * R + t] = r.mx;
  }
}

// The router's per-row statistics and probability column sums in one pass (router_summary): the
// separate row kernels, column sums and five reductions were 13 launches of a few microseconds
// each per router call (config A: about 50 us a layer; eighth session). Block b takes rows
// [b ch, (b + 1) ch): warp w its rows r0 + w, r0 + w + 8, ..., computing per row what
// stats_rows_kernel and zloss_rows_kernel compute (row_stats: entropy, top-1 probability, sum of
// squared logits, max |logit|; logsumexp^2) and adding them in double; each lane adds the probabilities
// of its columns (lane, lane + 32, ...). The warps add up in order: partial[b] = [those five,
// the column sums (E)]. Deterministic: fixed rows per warp, fixed orders.
constexpr int kRowWarps = 8;
constexpr int kRowMaxColsPerLane = 8;  // E <= 256
constexpr int64_t kRowChunk = 64;

template <class T>
__global__ void __launch_bounds__(32 * kRowWarps)
    router_rows_kernel(const T* l, const T* p, int64_t R, int64_t E, double* partial) {
  __shared__ double sh[kRowWarps][5 + 32 * kRowMaxColsPerLane];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r0 = int64_t(blockIdx.x) * kRowChunk, r1 = min(r0 + kRowChunk, R);
  double ent_s = 0.0, top_s = 0.0, sq_s = 0.0, mx_s = 0.0, z_s = 0.0;
  double col[kRowMaxColsPerLane];
  for (int k = 0; k < kRowMaxColsPerLane; ++k) col[k] = 0.0;
  for (int64_t t = r0 + warp; t < r1; t += kRowWarps) {
    const RowStats r = row_stats(l, p, t, E, lane, [&](int k, double pv) { col[k] += pv; });
    const double lse = warp_logsumexp(l + t * E, E, lane);
    ent_s += r.ent;
    top_s += r.top;
    sq_s += r.sq;
    mx_s = fmax(mx_s, r.mx);
    z_s += lse * lse;
  }
  if (lane == 0) {
    sh[warp][0] = ent_s;
    sh[warp][1] = top_s;
    sh[warp][2] = sq_s;
    sh[warp][3] = mx_s;
    sh[warp][4] = z_s;
  }
  for (int k = 0; k < kRowMaxColsPerLane && lane + 32 * k < E; ++k) sh[warp][5 + lane + 32 * k] = col[k];
  __syncthreads();
  for (int64_t i = threadIdx.x; i < 5 + E; i += blockDim.x) {
    double v = 0.0;
    for (int w = 0; w < kRowWarps; ++w) v = i == 3 ? fmax(v, sh[w][i]) : v + sh[w][i];
    partial[int64_t(blockIdx.x) * (5 + E) + i] = v;
  }
}

// Entry i of the blocks' partials added (entry 3: max) by one warp, lanes over the blocks in
// order then a fixed shuffle tree; written to out[at_rows + 0..3], out[at_z], out[at_p + e].
__global__ void router_rows_final_kernel(const double* partial, int64_t blocks, int64_t E, double* out,
                                         int64_t at_rows, int64_t at_z, int64_t at_p) {
  const int64_t i = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (i >= 5 + E) return;
  const int lane = threadIdx.x & 31;
  double v = 0.0;
  for (int64_t b = lane; b < blocks; b += 32) v = i == 3 ? fmax(v, partial[b * (5 + E) + i]) : v + partial[b * (5 + E) + i];
  v = i == 3 ? warp_max(v) : warp_sum(v);
  if (lane == 0) out[i < 4 ? at_rows + i : i == 4 ? at_z : at_p + (i - 5)] = v;
}

// Backend::router_logits_backward in one pass, one warp per row, lane l holding columns l, l + 32,
// ...: gates_bwd_kernel's dscores, + aux_bwd_kernel's term (cnt null: none), softmax_bwd_kernel's
// dlogits, + zloss_bwd_kernel's term (z_scale 0: none), each term from the same function as its
// kernel's (router_grad_terms.cuh) and rounded to f32 where that kernel stores, and the softmax
// dot product summed in that kernel's lane order. Five
// kernels a layer were about 30 us on config A's 8 experts (eighth session).
__global__ void router_logits_bwd_kernel(const float* p, const float* l, const int32_t* idx, const float* dg,
                                         int64_t R, int64_t E, int64_t K, bool normalize, double scale,
                                         const int32_t* cnt, int64_t S, int64_t nseq, double aux_scale,
                                         double z_scale, float* dl) {
  constexpr int kCols = kRowMaxColsPerLane;
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= R) return;
  const int lane = threadIdx.x & 31;
  const int32_t* it = idx + t * K;
  double z, dot;
  gate_norm(p, it, dg, t, E, K, normalize, z, dot);
  float ds[kCols], pv[kCols];
  for (int k = 0; k < kCols; ++k) {
    const int64_t e = lane + 32 * k;
    pv[k] = e < E ? p[t * E + e] : 0.0f;
    ds[k] = 0.0f;
  }
  for (int64_t j = 0; j < K; ++j) {
    const int64_t e = it[j];
    if (e % 32 != lane) continue;
    const double d = gate_grad(double(dg[t * K + j]), z, dot, normalize);
    ds[e / 32] = float(double(ds[e / 32]) + scale * d);
  }
  if (cnt)
    for (int k = 0; k < kCols; ++k) {
      const int64_t e = lane + 32 * k;
      if (e >= E) break;
      ds[k] = float(double(ds[k]) + aux_grad_term(cnt, t, e, E, S, K, nseq, aux_scale));
    }
  float sdot = 0.0f;
  for (int k = 0; k < kCols && lane + 32 * k < E; ++k) sdot += pv[k] * ds[k];
  sdot = warp_sum(sdot);
  const double lse = z_scale != 0.0 ? warp_logsumexp(l + t * E, E, lane) : 0.0;
  for (int k = 0; k < kCols; ++k) {
    const int64_t e = lane + 32 * k;
    if (e >= E) break;
    float o = pv[k] * (ds[k] - sdot);
    if (z_scale != 0.0) o = float(double(o) + zloss_grad_term(double(l[t * E + e]), lse, z_scale, R));
    dl[t * E + e] = o;
  }
}

// Importance [E] of gates [A] routed by idx, deterministic.
void importance(Ctx& c, const Tensor& gates, const Tensor& idx, int64_t E, double* imp) {
  const int64_t A = gates.numel();
  const int64_t chunks = (A + kImpChunk - 1) / kImpChunk;
  if (chunks == 0) {
    CUDA_CHECK(cudaMemsetAsync(imp, 0, size_t(E) * sizeof(double), c.stream));
    return;
  }
  Buf<double> partial(c, chunks * E);
  dispatch_float(gates.dtype(), "cv2_loss", [&](auto tag) {
    using T = decltype(tag);
    importance_partial_kernel<T><<<unsigned(chunks), kImpChunk, 0, c.stream>>>(
        cptr<T>(gates), cptr<int32_t>(idx), A, E, partial.get());
    CUDA_CHECK_LAUNCH();
  });
  column_sums(c, DType::F64, partial.get(), chunks, E, chunks, imp);
}

// Load terms and CV^2: fills z, jx, kth and res = [value, grad[E]].
struct LoadTerms {
  Buf<double> z, res;
  Buf<int32_t> jx, kth;
  LoadTerms(Ctx& c, const Tensor& clean, const Tensor& h, const Tensor& std, double sigma,
            int64_t k)
      : z(c, clean.numel()), res(c, clean.dim(1) + 1), jx(c, clean.numel()), kth(c, 2 * clean.dim(0)) {
    const int64_t R = clean.dim(0), E = clean.dim(1);
    Buf<double> phi(c, R * E), load(c, E);
    dispatch_float(clean.dtype(), "load_loss", [&](auto tag) {
      using T = decltype(tag);
      load_terms_kernel<T><<<grid_for(R, 128), 128, 0, c.stream>>>(
          cptr<T>(clean), cptr<T>(h), std.defined() ? cptr<T>(std) : nullptr, sigma, R, E, k,
          z.get(), jx.get(), phi.get(), kth.get());
      CUDA_CHECK_LAUNCH();
    });
    column_sums(c, DType::F64, phi.get(), R, E, R, load.get());
    cv2_kernel<<<1, 1, 0, c.stream>>>(load.get(), E, res.get());
    CUDA_CHECK_LAUNCH();
  }
};

__global__ void ull_to_double_kernel(const unsigned long long* x, int64_t n, double* y) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = double(x[i]);  // counts < 2^53: exact
}

double scalar_to_host(Ctx& c, const double* d) {
  double v = 0.0;
  c.to_host(&v, d, sizeof(double));
  return v;
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------

double aux_loss_forward(Ctx& c, const Tensor& probs, const Tensor& idx, int64_t seq_len) {
  const int64_t R = probs.dim(0), E = probs.dim(1), K = idx.dim(1);
  if (R == 0) return 0.0;
  const int64_t S = seq_len ? seq_len : R, nseq = R / S;
  Buf<int32_t> cnt(c, nseq * E);
  Buf<double> P(c, nseq * E), out(c, 1);
  aux_counts(c, cptr<int32_t>(idx), R, K, S, E, cnt.get());
  column_sums(c, probs.dtype(), probs.data(), R, E, S, P.get());
  aux_value_kernel<<<1, 1, 0, c.stream>>>(cnt.get(), P.get(), nseq, E, S, K, out.get());
  CUDA_CHECK_LAUNCH();
  return scalar_to_host(c, out.get());
}

void aux_loss_backward(Ctx& c, const Tensor& probs, const Tensor& idx, int64_t seq_len,
                       double scale, const Tensor& dprobs) {
  const int64_t R = probs.dim(0), E = probs.dim(1), K = idx.dim(1);
  if (R == 0) return;
  const int64_t S = seq_len ? seq_len : R, nseq = R / S;
  Buf<int32_t> cnt(c, nseq * E);
  aux_counts(c, cptr<int32_t>(idx), R, K, S, E, cnt.get());
  dispatch_float(probs.dtype(), "aux_loss_backward", [&](auto tag) {
    using T = decltype(tag);
    aux_bwd_kernel<T><<<grid_for(R * E), kThreads, 0, c.stream>>>(cnt.get(), R, E, S, K, nseq,
                                                                   scale, mptr<T>(dprobs));
    CUDA_CHECK_LAUNCH();
  });
}

double z_loss_forward(Ctx& c, const Tensor& logits) {
  const int64_t R = logits.dim(0), E = logits.dim(1);
  if (R == 0) return 0.0;
  Buf<double> sq(c, R), out(c, 1);
  dispatch_float(logits.dtype(), "z_loss_forward", [&](auto tag) {
    using T = decltype(tag);
    zloss_rows_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(cptr<T>(logits), R, E, sq.get());
    CUDA_CHECK_LAUNCH();
  });
  device_sum(c, sq.get(), R, out.get());
  return scalar_to_host(c, out.get()) / double(R);
}

bool router_logits_backward_fused(const Tensor& scores) {
  return scores.dtype() == DType::F32 && scores.dim(1) <= 32 * kRowMaxColsPerLane;
}

void router_logits_backward(Ctx& c, const Tensor& scores, const Tensor& logits, const Tensor& idx,
                            const Tensor& dgates, bool normalize, double score_scale, int64_t aux_seq_len,
                            double aux_scale, double z_scale, const Tensor& dlogits) {
  const int64_t R = scores.dim(0), E = scores.dim(1), K = idx.dim(1);
  if (R == 0) return;
  const int64_t S = aux_seq_len ? aux_seq_len : R, nseq = R / S;
  Buf<int32_t> cnt(c, aux_scale != 0.0 ? nseq * E : 1);
  if (aux_scale != 0.0) aux_counts(c, cptr<int32_t>(idx), R, K, S, E, cnt.get());
  router_logits_bwd_kernel<<<grid_rows(R), kThreads, 0, c.stream>>>(
      cptr<float>(scores), cptr<float>(logits), cptr<int32_t>(idx), cptr<float>(dgates), R, E, K, normalize,
      score_scale, aux_scale != 0.0 ? cnt.get() : nullptr, S, nseq, aux_scale, z_scale, mptr<float>(dlogits));
  CUDA_CHECK_LAUNCH();
}

void z_loss_backward(Ctx& c, const Tensor& logits, double scale, const Tensor& dlogits) {
  const int64_t R = logits.dim(0), E = logits.dim(1);
  if (R == 0) return;
  dispatch_float(logits.dtype(), "z_loss_backward", [&](auto tag) {
    using T = decltype(tag);
    zloss_bwd_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(cptr<T>(logits), R, E, scale,
                                                                  mptr<T>(dlogits));
    CUDA_CHECK_LAUNCH();
  });
}

double cv2_loss_forward(Ctx& c, const Tensor& gates, const Tensor& idx, int64_t E) {
  Buf<double> imp(c, E), res(c, E + 1);
  importance(c, gates, idx, E, imp.get());
  cv2_kernel<<<1, 1, 0, c.stream>>>(imp.get(), E, res.get());
  CUDA_CHECK_LAUNCH();
  return scalar_to_host(c, res.get());
}

void cv2_loss_backward(Ctx& c, const Tensor& gates, const Tensor& idx, int64_t E, double scale,
                       const Tensor& dgates) {
  const int64_t A = gates.numel();
  Buf<double> imp(c, E), res(c, E + 1);
  importance(c, gates, idx, E, imp.get());
  cv2_kernel<<<1, 1, 0, c.stream>>>(imp.get(), E, res.get());
  CUDA_CHECK_LAUNCH();
  if (A == 0) return;
  dispatch_float(gates.dtype(), "cv2_loss_backward", [&](auto tag) {
    using T = decltype(tag);
    cv2_bwd_kernel<T><<<grid_for(A), kThreads, 0, c.stream>>>(cptr<int32_t>(idx), A, E,
                                                               res.get() + 1, scale, mptr<T>(dgates));
    CUDA_CHECK_LAUNCH();
  });
}

double load_loss_forward(Ctx& c, const Tensor& clean, const Tensor& h, const Tensor& std,
                         double sigma, int64_t k) {
  if (clean.dim(0) == 0) return 0.0;
  LoadTerms lt(c, clean, h, std, sigma, k);
  return scalar_to_host(c, lt.res.get());
}

void load_loss_backward(Ctx& c, const Tensor& clean, const Tensor& h, const Tensor& std,
                        double sigma, int64_t k, double scale, const Tensor& dclean,
                        const Tensor& dstd, const Tensor& dh) {
  const int64_t R = clean.dim(0), E = clean.dim(1);
  if (R == 0) return;
  LoadTerms lt(c, clean, h, std, sigma, k);
  dispatch_float(clean.dtype(), "load_loss_backward", [&](auto tag) {
    using T = decltype(tag);
    load_bwd_kernel<T><<<grid_for(R, 128), 128, 0, c.stream>>>(
        std.defined() ? cptr<T>(std) : nullptr, sigma, R, E, lt.z.get(), lt.jx.get(),
        lt.kth.get(), lt.res.get() + 1, scale, mptr<T>(dclean),
        std.defined() ? mptr<T>(dstd) : nullptr, mptr<T>(dh));
    CUDA_CHECK_LAUNCH();
  });
}

// One buffer on the device, one copy to the host:
//   [routed E | kept E | unrouted 1 | prob sums E | entropy, top-1, logit^2, |logit| max | aux | z sum | cv2]
PendingRouterSummary router_summary_begin(Ctx& c, const Tensor& logits, const Tensor& probs, const Tensor& idx,
                                          const Tensor& keep, const Tensor& gates, bool ec, int64_t E,
                                          int64_t aux_seq_len, bool want_aux, bool want_importance) {
  const int64_t R = logits.dim(0), n1 = idx.dim(1), A = idx.numel();
  RouterSummary s;
  s.stats.routed.assign(size_t(E), 0);
  s.stats.kept.assign(size_t(E), 0);
  s.stats.mean_prob.assign(size_t(E), 0.0);
  if (R == 0) return PendingRouterSummary(std::move(s));
  const int64_t at_p = 2 * E + 1, at_rows = 3 * E + 1, at_aux = 3 * E + 5, n = 3 * E + 8;
  Buf<double> out(c, n);
  CUDA_CHECK(cudaMemsetAsync(out.get(), 0, size_t(n) * sizeof(double), c.stream));
  {  // statistics, as router_stats
    Buf<unsigned long long> cnt(c, 2 * E + 1);
    Buf<int32_t> has(c, R);
    CUDA_CHECK(cudaMemsetAsync(cnt.get(), 0, size_t(2 * E + 1) * sizeof(unsigned long long), c.stream));
    CUDA_CHECK(cudaMemsetAsync(has.get(), 0, size_t(R) * sizeof(int32_t), c.stream));
    if (A > 0) {
      if (2 * E <= kBlockHistMaxCounters)
        stats_counts_kernel<true><<<grid_for(A), kThreads, size_t(2 * E) * sizeof(unsigned), c.stream>>>(
            cptr<int32_t>(idx), cptr<int32_t>(keep), A, n1, ec, E, R, cnt.get(), has.get());
      else
        stats_counts_kernel<false><<<grid_for(A), kThreads, 0, c.stream>>>(
            cptr<int32_t>(idx), cptr<int32_t>(keep), A, n1, ec, E, R, cnt.get(), has.get());
      CUDA_CHECK_LAUNCH();
    }
    count_zero_kernel<<<grid_for(R), kThreads, 0, c.stream>>>(has.get(), R, cnt.get() + 2 * E);
    CUDA_CHECK_LAUNCH();
    ull_to_double_kernel<<<grid_for(2 * E + 1), kThreads, 0, c.stream>>>(cnt.get(), 2 * E + 1, out.get());
    CUDA_CHECK_LAUNCH();
    if (E <= 32 * kRowMaxColsPerLane) {
      const int64_t blocks = (R + kRowChunk - 1) / kRowChunk;
      Buf<double> partial(c, blocks * (5 + E));
      dispatch_float(logits.dtype(), "router_summary", [&](auto tag) {
        using T = decltype(tag);
        router_rows_kernel<T><<<unsigned(blocks), 32 * kRowWarps, 0, c.stream>>>(cptr<T>(logits), cptr<T>(probs),
                                                                               R, E, partial.get());
        CUDA_CHECK_LAUNCH();
      });
      router_rows_final_kernel<<<grid_rows(5 + E), kThreads, 0, c.stream>>>(partial.get(), blocks, E, out.get(),
                                                                             at_rows, at_aux + 1, at_p);
      CUDA_CHECK_LAUNCH();
    } else {
      Buf<double> rows(c, 5 * R);  // entropy, top-1, logit^2, |logit| max per row; then lse^2
      dispatch_float(logits.dtype(), "router_summary", [&](auto tag) {
        using T = decltype(tag);
        stats_rows_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(cptr<T>(logits), cptr<T>(probs), R, E,
                                                                       rows.get());
        CUDA_CHECK_LAUNCH();
        zloss_rows_kernel<T><<<grid_rows(R), kThreads, 0, c.stream>>>(cptr<T>(logits), R, E, rows.get() + 4 * R);
        CUDA_CHECK_LAUNCH();
      });
      column_sums(c, probs.dtype(), probs.data(), R, E, R, out.get() + at_p);
      device_sum(c, rows.get(), R, out.get() + at_rows);
      device_sum(c, rows.get() + R, R, out.get() + at_rows + 1);
      device_sum(c, rows.get() + 2 * R, R, out.get() + at_rows + 2);
      device_max(c, rows.get() + 3 * R, R, out.get() + at_rows + 3);
      device_sum(c, rows.get() + 4 * R, R, out.get() + at_aux + 1);  // z: sum_t logsumexp_t^2
    }
  }
  if (want_aux && A > 0) {  // as aux_loss_forward
    const int64_t K = n1, S = aux_seq_len ? aux_seq_len : R, nseq = R / S;
    Buf<int32_t> acnt(c, nseq * E);
    Buf<double> P(c, nseq * E);
    aux_counts(c, cptr<int32_t>(idx), R, K, S, E, acnt.get());
    // One sequence (the global aux loss): its column sums are the statistics' (out + at_p).
    if (nseq > 1) column_sums(c, probs.dtype(), probs.data(), R, E, S, P.get());
    aux_value_kernel<<<1, 1, 0, c.stream>>>(acnt.get(), nseq > 1 ? P.get() : out.get() + at_p, nseq, E, S, K,
                                            out.get() + at_aux);
    CUDA_CHECK_LAUNCH();
  }
  if (want_importance) {  // as cv2_loss_forward
    Buf<double> imp(c, E), res(c, E + 1);
    importance(c, gates, idx, E, imp.get());
    cv2_kernel<<<1, 1, 0, c.stream>>>(imp.get(), E, res.get());
    CUDA_CHECK_LAUNCH();
    CUDA_CHECK(cudaMemcpyAsync(out.get() + at_aux + 2, res.get(), sizeof(double), cudaMemcpyDeviceToDevice,
                               c.stream));
  }
  HostCopy copy = c.to_host_async(out.get(), size_t(n) * sizeof(double));
  return PendingRouterSummary([copy, s, E, R, at_p, at_rows, at_aux]() mutable {
    const double* h = static_cast<const double*>(copy.wait());
    RouterStats& st = s.stats;
    for (int64_t e = 0; e < E; ++e) {
      st.routed[e] = int64_t(h[e]);
      st.kept[e] = int64_t(h[E + e]);
      st.mean_prob[e] = h[at_p + e] / double(R);
    }
    st.tokens_unrouted = int64_t(h[2 * E]);
    st.entropy = h[at_rows] / double(R);
    st.top1_prob = h[at_rows + 1] / double(R);
    st.logit_rms = std::sqrt(h[at_rows + 2] / double(R * E));
    st.logit_max = h[at_rows + 3];
    s.aux = h[at_aux];
    s.z = h[at_aux + 1] / double(R);
    s.importance = h[at_aux + 2];
    return s;
  });
}

// The statistics alone: the summary without the optional losses (one copy to the host).
RouterStats router_stats(Ctx& c, const Tensor& logits, const Tensor& probs, const Tensor& idx,
                         const Tensor& keep, bool ec, int64_t E) {
  return router_summary_begin(c, logits, probs, idx, keep, Tensor(), ec, E, 0, false, false).get().stats;
}

}  // namespace moelab::cuda
