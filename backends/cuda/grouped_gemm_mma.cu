// moelab CUDA backend: moelab's own grouped GEMM for the MoE experts (bf16 in, fp32 accumulation,
// bf16 out), with the per-expert row offsets read from device memory. The kernel bodies are in
// grouped_gemm_kernels.h (shared with a CPU emulation in the tests), the CUDA primitives in
// mma_platform.cuh; this file holds the __global__ wrappers and the launchers that gemm.cu calls
// for GroupedGemmImpl::Mma (cuda_backend.h).
//
// Grids (1-D, sized from host-known bounds only, so no offsets are ever read on the host):
//   forward / dgrad: (floor(R / BM) + E) slots x ceil(N / BN) n-tiles; surplus blocks exit at once.
//   wgrad:           E x ceil(K / BM) x ceil(N / BN), each block looping over its expert's rows.
#include <cstdint>

#include "backends/cuda/cuda_kernels.cuh"
#include "backends/cuda/mma_platform.cuh"
// The kernels: after the platform above.
#include "backends/cuda/grouped_gemm_kernels.h"

namespace moelab::cuda {
namespace {

namespace gg = moelab::ggemm;
using Tile = gg::Big;

// Two blocks per SM: 2 x 80 KiB of shared memory, at most 128 registers a thread.
template <bool TRANS_W>
__global__ void __launch_bounds__(Tile::kThreads, 2) ggemm_fwd_kernel(gg::Params p) {
  extern __shared__ __align__(16) char smem[];
  gg::forward<Tile, TRANS_W>(p, smem, int(threadIdx.x), int64_t(blockIdx.x));
}
__global__ void __launch_bounds__(Tile::kThreads, 2) ggemm_wgrad_kernel(gg::Params p) {
  extern __shared__ __align__(16) char smem[];
  gg::wgrad<Tile>(p, smem, int(threadIdx.x), int64_t(blockIdx.x));
}

template <class K> void launch(Ctx& c, K kernel, int64_t blocks, const gg::Params& p) {
  if (blocks == 0) return;
  MOELAB_CHECK(blocks <= INT32_MAX, "cuda grouped gemm (mma): grid of ", blocks, " blocks");
  static_assert(Tile::kSmem > 48 * 1024, "the attribute below is needed");
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Tile::kSmem)));
  kernel<<<unsigned(blocks), Tile::kThreads, Tile::kSmem, c.stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

gg::Params grouped_gemm_params(const Tensor& x, const Tensor& w, const int32_t* d_off, int64_t E, const Tensor& y,
                  int64_t K, int64_t N, double beta) {
  gg::Params p;
  p.x = x.data();
  p.w = w.data();
  p.y = y.data();
  p.off = d_off;
  p.E = int(E);
  p.R = int(x.dim(0));
  p.K = int(K);
  p.N = int(N);
  p.beta = float(beta);
  return p;
}


bool mma_grouped_can_implement(const Tensor& x, const Tensor& w, const Tensor& y) {
  if (x.dtype() != DType::BF16 || w.dtype() != DType::BF16 || y.dtype() != DType::BF16) return false;
  if (x.ndim() != 2 || y.ndim() < 2) return false;
  const int64_t K = x.dim(1), N = y.dim(-1);
  if (K % 8 != 0 || N % 8 != 0) return false;  // 16-byte chunks never straddle a row's end
  // int32 indices inside the kernel: rows, widths, expert counts.
  if (x.dim(0) > INT32_MAX || K > INT32_MAX || N > INT32_MAX || w.dim(0) > INT32_MAX) return false;
  return aligned16(x.data()) && aligned16(w.data()) && aligned16(y.data());
}

void mma_grouped_gemm(Ctx& c, const Tensor& x, const Tensor& w, const int32_t* d_off, int64_t E,
                      const Tensor& y, bool trans_w, double beta) {
  const int64_t R = x.dim(0), K = x.dim(1), N = y.dim(1);
  if (R == 0 || N == 0 || E == 0) return;  // nothing to write (K == 0 runs: Y = beta Y)
  const gg::Params p = grouped_gemm_params(x, w, d_off, E, y, K, N, beta);
  const int64_t blocks = gg::fwd_blocks<Tile>(R, E, N);
  if (trans_w) launch(c, ggemm_fwd_kernel<true>, blocks, p);
  else launch(c, ggemm_fwd_kernel<false>, blocks, p);
}

void mma_grouped_gemm_wgrad(Ctx& c, const Tensor& x, const Tensor& dy, const int32_t* d_off,
                            int64_t E, const Tensor& dw, double beta) {
  const int64_t K = x.dim(1), N = dy.dim(1);
  if (E == 0 || K == 0 || N == 0) return;
  const gg::Params p = grouped_gemm_params(x, dy, d_off, E, dw, K, N, beta);
  launch(c, ggemm_wgrad_kernel, gg::wgrad_blocks<Tile>(E, K, N), p);
}

}  // namespace moelab::cuda
