// moelab: the CUDA backend's entry points (implemented under backends/cuda/).
//
// Plain C++17 (no CUDA types): included by the registry, the tests and the command line, which
// are compiled by the host compiler. The backend object owns its stream, cuBLAS handle and
// caching allocator; nothing CUDA-related is global.
#pragma once
#include <memory>

#include "core/backend.h"

namespace moelab {

// Number of visible CUDA devices; 0 when there is no device or no driver (never throws).
int cuda_device_count();

// How grouped_gemm / grouped_gemm_wgrad run their per-expert GEMMs (both without a per-token
// host loop; offsets are host values, so neither needs a device->host sync):
//   PerExpert:      one GEMM per non-empty expert, all on the backend's stream: cuBLASLt with
//                   the kernel choice cached per shape class below 256 GFLOP (gemm_algo_cache
//                   below), cublasGemmEx above;
//   GroupedBatched: one cublasGemmGroupedBatchedEx call (pointer arrays copied to the device);
//   Chunked:        the forward and activation-gradient GEMMs cut into chunks of chunk_rows
//                   rows of one expert: every full chunk has the same shape, so all of them are
//                   one cublasGemmBatchedEx (cuBLAS's Hopper kernels), and the remainders (one
//                   per expert, fewer rows) one grouped call; weight gradients (their shapes are
//                   the same for every expert already) go grouped. cuBLAS's grouped call with
//                   unequal shapes runs an sm80 kernel at ~300 TFLOP/s on an H200.
//   Auto:           on compute capability 9.0 for bf16 calls it can take: the products
//                   (forward, data gradient) of at most 16 experts of 4 to 64 GFLOP each on
//                   Wgmma when K >= 2048, else PerExpert (a short reduction is where cuBLAS's
//                   tuned kernels win); other calls under 256 GFLOP and most weight gradients on Wgmma
//                   (gemm.cu, own_kernel). Everything else: PerExpert when at most 16 experts
//                   have rows and their GEMMs average >= 4 GFLOP (each call's kernel choice is
//                   cached: cheap on the host), else Chunked (two launches: gemm.cu, run_list).
//                   Measured on an H200: docs/gpu-results.md and docs/performance.md.
//   Mma:            moelab's own kernel (grouped_gemm_mma.cu: mma.sync tensor cores, one launch,
//                   offsets read from device memory) for bf16 with widths that are multiples of
//                   8 and 16-byte aligned operands; anything else goes the way Auto picks.
//                   Not chosen by Auto: slower than cuBLAS (docs/performance.md).
//   Wgmma:          the same contract on Hopper's warpgroup MMA (grouped_gemm_wgmma.cu, sm_90a),
//                   on a device of compute capability 9.0; elsewhere, and for what it cannot
//                   take, the way Auto picks.
//                   MOELAB_GROUPED_GEMM=auto|per_expert|grouped|chunked|mma|wgmma overrides it,
//                   and MOELAB_GEMM_CHUNK_ROWS the chunk (backends/registry).
enum class GroupedGemmImpl { Auto, PerExpert, GroupedBatched, Mma, Chunked, Wgmma };

struct CudaBackendOptions {
  int device = 0;                                        // CUDA device ordinal
  GroupedGemmImpl grouped_gemm = GroupedGemmImpl::Auto;
  int64_t chunk_rows = 128;  // Chunked: rows per batched chunk (a multiple of 8, >= 8)
  // f32 attention (attention_gemm.cu): bytes of one S x S score buffer; heads are taken in
  // chunks of whole kv groups that fit (at least one group). Tests make it tiny. The Hopper
  // bf16 attention backward keeps its fp32 dQ buffers within it too (attention_plan.h).
  int64_t attention_scratch_bytes = int64_t(1) << 30;
  // bf16 flash attention (flash_attention.cu) on a device of compute capability 9.0: Auto runs
  // the Hopper wgmma kernels (flash_attention_wgmma.h: faster than the mma.sync ones at every
  // length measured), the one-kernel backward where its blocks fill at least half the SMs
  // (attention_plan.h); Wgmma runs that backward always (tests, measurements); MmaSync the
  // mma.sync kernels. MOELAB_FLASH_WGMMA=1 (as Wgmma) or 0 (as MmaSync) overrides Auto.
  enum class Flash { Auto, MmaSync, Wgmma };
  Flash flash = Flash::Auto;
  // The one-kernel bf16 attention backward (head width 128 on compute capability 9.0): blocks
  // per kv head, each owning every n-th key tile and its own fp32 dQ buffer. 0: enough for about
  // one wave of the device's SMs. Tests set it to reach several key tiles per block.
  int attention_bwd_splits = 0;
  // The per-expert GEMMs (PerExpert, and a grouped call of one problem) through cuBLASLt, its
  // kernel choice made once per shape class (rows in 8 buckets per octave) and reused
  // (gemm.cu, GemmAlgoCache): cublasGemmEx looks up a kernel for every new row count, about
  // 100 us of host time per call. MOELAB_GEMM_ALGO_CACHE=0 turns it off (registry).
  bool gemm_algo_cache = true;
};

// What the per-expert GEMMs' cache (CudaBackendOptions::gemm_algo_cache) did on a CUDA backend:
// calls through it, heuristic lookups (one per new shape class) and calls that cuBLASLt refused
// (run on cublasGemmEx instead). Throws moelab::Error when `b` is not the CUDA backend.
struct GemmAlgoCacheStats {
  int64_t calls = 0, heuristics = 0, fallbacks = 0;
};
GemmAlgoCacheStats cuda_gemm_algo_cache_stats(Backend& b);

// The CUDA backend on `opts.device`. Throws moelab::Error when no device is usable.
std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& opts = {});

// The cudaStream_t (as void*) that every op of the CUDA backend `b` runs on, and its device
// ordinal; for libraries that enqueue work of their own in the backend's order (NCCL,
// backends/cuda/nccl_comm.h). The backend's ops do not call cudaSetDevice: a thread that uses a
// backend of another device than its current one sets the device first (creating the backend
// in that thread does it). Throw moelab::Error when `b` is not the CUDA backend.
void* cuda_backend_stream(Backend& b);
int cuda_backend_device(Backend& b);

}  // namespace moelab
