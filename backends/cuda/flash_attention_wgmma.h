// moelab CUDA backend: the Hopper (sm_90a) flash attention kernels, built on warpgroup MMA
// (flash_attention_wgmma.cu). flash_attention.cu calls them for bf16 with head width 64 or 128
// on a device of compute capability 9.0, unless MOELAB_FLASH_WGMMA=0; the mma.sync kernels of
// flash_attention_kernels.h run everywhere else.
#pragma once
#include "backends/cuda/attention_plan.h"
#include "backends/cuda/cuda_common.cuh"

namespace moelab::flash {
struct Params;
}

namespace moelab::cuda {

// Whether bf16 attention of head width 64 or 128 runs on the wgmma kernels below: on a device of
// compute capability 9.0 unless c.flash (CudaBackendOptions::flash) is MmaSync; with Auto,
// MOELAB_FLASH_WGMMA=0 turns them off (1: on; any other value is an error naming the variable).
// They measured faster than the mma.sync kernels at every length from 512 on (docs/performance.md,
// sixth session).
bool use_wgmma_attention(const Ctx& c);
// The one-kernel backward's plan for this call (attention_plan.h): with c.flash == Wgmma or
// MOELAB_FLASH_WGMMA=1 it runs whatever the occupancy; c.attention_scratch_bytes bounds its dQ
// buffers, c.attention_bwd_splits fixes their number.
AttentionBackwardPlan wgmma_backward_plan(const Ctx& c, const flash::Params& p);

// The forward pass (out, lse) for bf16, head width 64 or 128, 16-byte aligned q, k, v, out: the
// contract of attention_forward (core/backend.h), with p filled by flash_attention.cu.
void attention_forward_wgmma(Ctx& c, const flash::Params& p);
// dQ, dK and dV in one kernel (same conditions, p.delta filled by the D pre-pass, plan.fused):
// dQ's partial sums go to fp32 buffers, one per block of a kv head, summed in a fixed order:
// deterministic.
void attention_backward_wgmma(Ctx& c, const flash::Params& p, const AttentionBackwardPlan& plan);

}  // namespace moelab::cuda
