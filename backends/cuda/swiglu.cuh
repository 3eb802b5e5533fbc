// moelab CUDA backend: SwiGLU's arithmetic (Shazeer 2020, h = silu(g) u), for the elementwise
// kernels (kernels_elementwise.cu) and the grouped GEMM's SwiGLU epilogues (grouped_gemm_wgmma.cu).
// One definition, so that the fused and the separate forms give the same bits.
#pragma once

#include <type_traits>

#include "backends/cuda/cuda_common.cuh"

namespace moelab::cuda {

__device__ __forceinline__ float sigmoidf_(float x) {
  return x >= 0.0f ? 1.0f / (1.0f + expf(-x)) : expf(x) / (1.0f + expf(x));
}

// The sigmoid of bf16 data: the hardware exp2 and reciprocal (__expf, __frcp_rn: a few ulp of
// f32, far below bf16's rounding of the result). The accurate expf and IEEE division made the
// vector forward issue-bound (2.6 TB/s against Triton's 4.2 for the same op, same H200;
// docs/performance.md). f32 keeps sigmoidf_.
template <class T> __device__ __forceinline__ float swiglu_sigmoid(float x) {
  if constexpr (std::is_same_v<T, bf16_t>) return __frcp_rn(1.0f + __expf(-x));  // rcp(inf) = 0
  else return sigmoidf_(x);
}
// h = silu(g) u = g sigmoid(g) u.
template <class T> __device__ __forceinline__ float swiglu_h(float g, float u) {
  return g * swiglu_sigmoid<T>(g) * u;
}
// dg = d u s (1 + g (1 - s)) (d silu / dg = s (1 + g (1 - s))), du = d g s, with s = sigmoid(g).
template <class T> __device__ __forceinline__ void swiglu_grads(float g, float u, float d, float& dg, float& du) {
  const float s = swiglu_sigmoid<T>(g);
  dg = d * u * s * (1.0f + g * (1.0f - s));
  du = d * g * s;
}

}  // namespace moelab::cuda
