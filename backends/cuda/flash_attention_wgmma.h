// moelab CUDA backend: the Hopper (sm_90a) flash attention kernels, built on warpgroup MMA
// (flash_attention_wgmma.cu). flash_attention.cu calls them for bf16 with head width 64 or 128
// on a device of compute capability 9.0, unless MOELAB_FLASH_WGMMA=0; the mma.sync kernels of
// flash_attention_kernels.h run everywhere else.
#pragma once
#include "backends/cuda/cuda_common.cuh"

namespace moelab::flash {
struct Params;
}

namespace moelab::cuda {

// Which passes of one attention call (sequence length S) run the wgmma kernels, on a device of
// compute capability 9.0 (none elsewhere), by c.flash (CudaBackendOptions::flash):
//   Auto     the forward and dQ for S >= 1024, which measured faster there than the mma.sync
//            kernels (and slower at S 512); MOELAB_FLASH_WGMMA=1 (the same), all (as Wgmma) or 0
//            (as MmaSync) overrides it, any other value is an error naming the variable;
//   Wgmma    forward, dQ and dK / dV at every S (dK / dV measured slower than dkv2s_tc: kept to
//            measure, and as the base of a warp-specialised version);
//   MmaSync  none.
// docs/performance.md has the measurements (fifth session).
//   fused    (head width 128) the whole backward in one kernel (bwd_wg) where the plan has dQ,
//            instead of dQ and dK / dV apart; MOELAB_FLASH_WGMMA=split keeps them apart.
struct WgmmaPlan {
  bool forward = false, dq = false, dkv = false, fused = false;
};
WgmmaPlan wgmma_attention_plan(const Ctx& c, int64_t S, int64_t Dh);

// The forward pass (out, lse) for bf16, head width 64 or 128, 16-byte aligned q, k, v, out: the
// contract of attention_forward (core/backend.h), with p filled by flash_attention.cu.
void attention_forward_wgmma(Ctx& c, const flash::Params& p);
// dQ and dK / dV of the backward pass (same conditions, p.delta filled by the D pre-pass).
void attention_dq_wgmma(Ctx& c, const flash::Params& p);
void attention_dkv_wgmma(Ctx& c, const flash::Params& p);
// dQ, dK and dV in one kernel (head width 128; p.delta filled): dQ's partial sums go to fp32
// buffers, one per block of a kv head, summed in a fixed order: deterministic.
void attention_backward_wgmma(Ctx& c, const flash::Params& p);

}  // namespace moelab::cuda
