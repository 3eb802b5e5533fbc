// moelab CUDA backend: flash attention (causal, grouped-query), forward and backward, keeping
// the log-sum-exp per query row instead of the [B*H, S, S] probabilities. The kernel bodies are
// in flash_attention_kernels.h (shared with a CPU emulation in the tests); the CUDA primitives
// they use (ldmatrix, mma.sync m16n8k16 bf16 -> fp32, cp.async, shuffles) are in mma_platform.cuh;
// this file holds the __global__ wrappers and the launchers.
//
// Segments (packed records, core/backend.h): Params::seg, masked in every kernel below.
// Paths: bf16 with head width 64 or 128 and 16-byte aligned tensors (every model tensor; a view
// at an odd offset is not) run the tensor-core kernels; everything else (f32, other widths up to
// 256, unaligned views) the generic fp32 kernels. Backward: D = rowsum(dO * O) pre-pass, then a
// dQ kernel over query tiles and a dK/dV kernel over key tiles: three launches, no atomics, the
// same bits on every run (see the header for the tiles and the masking). Tensor-core kernels
// per head width: forward fwd_tc<64> / fwd2_tc<128>, backward dq2_tc and dkv2_tc<64> /
// dkv2s_tc<128> (the fastest measured on an H200, docs/performance.md). On Hopper (compute
// capability 9.0) the tensor-core passes run the wgmma kernels of flash_attention_wgmma.cu
// instead: a pipelined forward and a one-kernel backward (use_wgmma_attention).
#include <cuda_bf16.h>

#include <cmath>
#include <string>
#include <type_traits>

#include "backends/cuda/cuda_kernels.cuh"
#include "backends/cuda/flash_attention_wgmma.h"

// ---- the platform of flash_attention_kernels.h: backends/cuda/mma_platform.cuh ----------------
#include "backends/cuda/mma_platform.cuh"

#include "backends/cuda/flash_attention_kernels.h"

namespace moelab::cuda {
namespace {

namespace fl = moelab::flash;

template <int DH> __global__ void __launch_bounds__(256, 1) fwd_tc_kernel(fl::Params p) {
  extern __shared__ __align__(16) char smem[];
  fl::fwd_tc<DH>(p, smem, threadIdx.x, blockIdx.x, blockIdx.y);
}
// The two-tile kernels: 128 threads, 2 blocks per SM (255 registers per thread at most).
template <int DH> __global__ void __launch_bounds__(128, 2) fwd2_tc_kernel(fl::Params p) {
  extern __shared__ __align__(16) char smem[];
  fl::fwd2_tc<DH>(p, smem, threadIdx.x, blockIdx.x, blockIdx.y);
}
template <int DH> __global__ void __launch_bounds__(128, 2) dq2_tc_kernel(fl::Params p) {
  extern __shared__ __align__(16) char smem[];
  fl::dq2_tc<DH>(p, smem, threadIdx.x, blockIdx.x, blockIdx.y);
}
template <int DH> __global__ void __launch_bounds__(128, 2) dkv2_tc_kernel(fl::Params p) {
  extern __shared__ __align__(16) char smem[];
  fl::dkv2_tc<DH>(p, smem, threadIdx.x, blockIdx.x, blockIdx.y);
}
// dkv2s (head width 128): 8 warps, 173 KiB of shared memory, one block per SM.
template <int DH> __global__ void __launch_bounds__(256, 1) dkv2s_tc_kernel(fl::Params p) {
  extern __shared__ __align__(16) char smem[];
  fl::dkv2s_tc<DH>(p, smem, threadIdx.x, blockIdx.x, blockIdx.y);
}
template <class E> __global__ void __launch_bounds__(fl::Gen::kThreads) fwd_gen_kernel(fl::Params p) {
  extern __shared__ __align__(16) char smem[];
  fl::fwd_gen<E>(p, smem, threadIdx.x, blockIdx.x, blockIdx.y);
}
template <class E> __global__ void __launch_bounds__(fl::Gen::kThreads) dq_gen_kernel(fl::Params p) {
  extern __shared__ __align__(16) char smem[];
  fl::dq_gen<E>(p, smem, threadIdx.x, blockIdx.x, blockIdx.y);
}
template <class E> __global__ void __launch_bounds__(fl::Gen::kThreads) dkv_gen_kernel(fl::Params p) {
  extern __shared__ __align__(16) char smem[];
  fl::dkv_gen<E>(p, smem, threadIdx.x, blockIdx.x, blockIdx.y);
}
template <class E> __global__ void __launch_bounds__(32 * fl::kDeltaWarps) delta_kernel(fl::Params p) {
  fl::delta_rows<E>(p, threadIdx.x, blockIdx.x);
}
__global__ void __launch_bounds__(32 * fl::kDeltaWarps) delta_vec_kernel(fl::Params p) {
  fl::delta_rows_vec(p, threadIdx.x, blockIdx.x);
}

// The tensor-core kernels: bf16, head width 64 or 128, every operand 16-byte aligned (cp.async
// and the 4-byte output stores; row strides H*Dh*2 bytes are then multiples of 16).
bool tensor_cores(DType dt, int64_t dh, std::initializer_list<const Tensor*> ts) {
  if (dt != DType::BF16 || (dh != 64 && dh != 128)) return false;
  for (const Tensor* t : ts)
    if (!aligned16(t->data())) return false;
  return true;
}

fl::Params params(const Tensor& q, const Tensor& k, const Tensor& v, int64_t H, int64_t Hkv,
                  int64_t S, const Tensor& segments) {
  const int64_t T = q.dim(0), dh = q.dim(1) / H;
  MOELAB_CHECK(T / S <= INT32_MAX && S <= INT32_MAX && H <= INT32_MAX, "cuda attention: sizes out of range");
  if (dh > fl::Gen::kMaxDh)
    throw NotSupported("cuda attention: head width " + std::to_string(dh) + " > " +
                       std::to_string(fl::Gen::kMaxDh) + " has no kernel");
  fl::Params p;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.seg = segments.defined() ? static_cast<const int32_t*>(segments.data()) : nullptr;
  p.B = int(T / S);
  p.S = int(S);
  p.H = int(H);
  p.Hkv = int(Hkv);
  p.Dh = int(dh);
  p.scale = float(1.0 / std::sqrt(double(dh)));
  p.scale_log2 = float(1.4426950408889634 / std::sqrt(double(dh)));
  return p;
}

// Calls f(E{}) with E the kernels' element type: float, or uint16_t bits for bf16.
template <class F> void dispatch_elem(DType dt, const char* op, F&& f) {
  dispatch_float(dt, op, [&](auto tag) {
    using T = decltype(tag);
    using E = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;
    f(E{});
  });
}

}  // namespace

void attention_forward(Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v, int64_t H,
                       int64_t Hkv, int64_t S, const Tensor& out, const Tensor& lse,
                       const Tensor& segments) {
  const int64_t T = q.dim(0);
  if (T == 0) return;
  fl::Params p = params(q, k, v, H, Hkv, S, segments);
  p.out = out.data();
  p.lse = static_cast<float*>(lse.data());
  const int64_t BH = int64_t(p.B) * H, dh = p.Dh;
  if (tensor_cores(q.dtype(), dh, {&q, &k, &v, &out})) {
    if (use_wgmma_attention(c)) {
      attention_forward_wgmma(c, p);
      return;
    }
    if (dh == 64) {
      using C = fl::FwdTc<64>;
      launch_2d(c, "cuda attention", fwd_tc_kernel<64>, BH, (S + C::BR - 1) / C::BR, C::kThreads, C::kSmem, p);
    } else {
      using C = fl::Fwd2Tc<128>;
      launch_2d(c, "cuda attention", fwd2_tc_kernel<128>, BH, (S + C::BR - 1) / C::BR, C::kThreads, C::kSmem, p);
    }
    return;
  }
  dispatch_elem(q.dtype(), "attention_forward", [&](auto tag) {
    using E = decltype(tag);
    using G = fl::Gen;
    launch_2d(c, "cuda attention", fwd_gen_kernel<E>, BH, (S + G::QR - 1) / G::QR, G::kThreads, G::fwd_smem(p.Dh), p);
  });
}

void attention_backward(Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const Tensor& lse, const Tensor& dout, int64_t H,
                        int64_t Hkv, int64_t S, const Tensor& dq, const Tensor& dk,
                        const Tensor& dv, const Tensor& segments) {
  const int64_t T = q.dim(0);
  if (T == 0) return;
  fl::Params p = params(q, k, v, H, Hkv, S, segments);
  p.o = out.data();
  p.dout = dout.data();
  p.lse = static_cast<float*>(lse.data());
  p.dq = dq.data();
  p.dk = dk.data();
  p.dv = dv.data();
  const int64_t BH = int64_t(p.B) * H, BG = int64_t(p.B) * Hkv, dh = p.Dh;
  Buf<float> delta(c, BH * S);
  p.delta = delta.get();
  const bool tc = tensor_cores(q.dtype(), dh, {&q, &k, &v, &out, &dout, &dq, &dk, &dv});
  if (tc) {
    launch_2d(c, "cuda attention", delta_vec_kernel, (T + fl::kDeltaWarps - 1) / fl::kDeltaWarps, 1,
              32 * fl::kDeltaWarps, 0, p);
  } else {
    dispatch_elem(q.dtype(), "attention_backward", [&](auto tag) {
      using E = decltype(tag);
      launch_2d(c, "cuda attention", delta_kernel<E>, (T * H + fl::kDeltaWarps - 1) / fl::kDeltaWarps, 1,
                32 * fl::kDeltaWarps, 0, p);
    });
  }
  if (tc) {
    if (use_wgmma_attention(c)) {
      const AttentionBackwardPlan plan = wgmma_backward_plan(c, p);
      if (plan.fused) {
        attention_backward_wgmma(c, p, plan);
        return;
      }  // too few blocks to fill the GPU: the separate kernels below
    }
    auto run = [&](auto dhc) {
      constexpr int DH = decltype(dhc)::value;
      using Q = fl::Dq2Tc<DH>;
      launch_2d(c, "cuda attention", dq2_tc_kernel<DH>, BH, (S + Q::BR - 1) / Q::BR, Q::kThreads, Q::kSmem, p);
      if constexpr (DH == 64) {
        using K = fl::Dkv2Tc<DH>;
        launch_2d(c, "cuda attention", dkv2_tc_kernel<DH>, BG, (S + K::BC - 1) / K::BC, K::kThreads, K::kSmem, p);
      } else {
        using K = fl::Dkv2sTc<DH>;
        launch_2d(c, "cuda attention", dkv2s_tc_kernel<DH>, BG, (S + K::BC - 1) / K::BC, K::kThreads, K::kSmem, p);
      }
    };
    if (dh == 64) run(std::integral_constant<int, 64>{});
    else run(std::integral_constant<int, 128>{});
    return;
  }
  dispatch_elem(q.dtype(), "attention_backward", [&](auto tag) {
    using E = decltype(tag);
    using G = fl::Gen;
    launch_2d(c, "cuda attention", dq_gen_kernel<E>, BH, (S + G::QR - 1) / G::QR, G::kThreads, G::dq_smem(p.Dh), p);
    launch_2d(c, "cuda attention", dkv_gen_kernel<E>, BG, (S + G::KR - 1) / G::KR, G::kThreads, G::dkv_smem(p.Dh), p);
  });
}

}  // namespace moelab::cuda
