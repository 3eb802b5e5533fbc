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

// Whether the current device runs the wgmma kernels: compute capability 9.0, and
// MOELAB_FLASH_WGMMA is unset or 1 (0 turns them off; any other value is an error).
bool wgmma_attention_enabled();

// The forward pass (out, lse) for bf16, head width 64 or 128, 16-byte aligned q, k, v, out: the
// contract of attention_forward (core/backend.h), with p filled by flash_attention.cu.
void attention_forward_wgmma(Ctx& c, const flash::Params& p);
// dQ of the backward pass (same conditions, p.delta filled): the rest stays with the mma.sync
// kernels.
void attention_dq_wgmma(Ctx& c, const flash::Params& p);

}  // namespace moelab::cuda
