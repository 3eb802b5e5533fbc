// moelab CUDA backend: the terms of the router's logit gradient, written once for the separate
// kernels (gates_bwd_kernel, aux_bwd_kernel, zloss_bwd_kernel) and the one-pass
// router_logits_bwd_kernel, so that both compute the same expressions (and round alike).
#pragma once
#include <cstdint>

#include "backends/cuda/cuda_common.cuh"

namespace moelab::cuda {

// Normalised top-k gates g_j = s_j / z of row t: z = sum_j s_j and dot = sum_j dg_j s_j over the
// row's K chosen experts, in j order (z = 1, dot = 0 without normalisation).
template <class T>
__device__ __forceinline__ void gate_norm(const T* s, const int32_t* it, const T* dg, int64_t t, int64_t E,
                                          int64_t K, bool normalize, double& z, double& dot) {
  z = 1.0;
  dot = 0.0;
  if (!normalize) return;
  z = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    const double sv = load_d(s, t * E + it[j]);
    z += sv;
    dot += load_d(dg, t * K + j) * sv;
  }
}

// dL/ds_j of gate j before the score scale: dg_j / z - dot / z^2, or dg_j without normalisation.
__device__ __forceinline__ double gate_grad(double dg_j, double z, double dot, bool normalize) {
  return normalize ? dg_j / z - dot / (z * z) : dg_j;
}

// The aux loss's term of dL/dp for token t, expert e: scale E f / S / nseq with f = cnt[s, e] / (S K)
// (counts are constants; BACKGROUND.md section 3).
__device__ __forceinline__ double aux_grad_term(const int32_t* cnt, int64_t t, int64_t e, int64_t E, int64_t S,
                                                int64_t K, int64_t nseq, double scale) {
  const double f = double(cnt[(t / S) * E + e]) / double(S * K);
  return scale * double(E) * f / double(S) / double(nseq);
}

// The z-loss's term of dL/dl for a logit l of a row with logsumexp lse, over R rows (ST-MoE:
// z = mean lse^2, dz/dl = 2 lse softmax(l) / R).
__device__ __forceinline__ double zloss_grad_term(double l, double lse, double scale, int64_t R) {
  return scale * 2.0 * lse * exp(l - lse) / double(R);
}

}  // namespace moelab::cuda
