// moelab CUDA backend: how the one-kernel Hopper attention backward (flash_attention_wgmma.cu,
// bwd_wg) is laid out, as plain host arithmetic that the CPU tests check
// (tests/test_wgmma_layout.cpp).
//
// bwd_wg runs B Hkv x n_split blocks; each owns every n_split-th key tile of one kv head (a snake)
// and its own fp32 buffer of dQ (B S H Dh elements), which is what keeps dQ deterministic. More
// splits fill more SMs but cost a buffer each. The plan:
//   n_split = B Hkv blocks' share of about one wave (sm_count / (B Hkv), rounded), at least 1, at
//             most the key tiles, and at most what `scratch_bytes` of buffers hold (at least 1);
//   fused   = whether to run bwd_wg at all: not when even so the blocks would fill less than half
//             the SMs (few long sequences: B 1, S 32768, Hkv 8 with a 1 GiB budget would be 16
//             blocks), where the separate dQ and dK / dV kernels, which need no buffers and
//             have blocks over query and key tiles, are faster. `forced` (tests, measurements)
//             runs it anyway; forced_splits > 0 fixes n_split (tests).
#pragma once
#include <algorithm>
#include <cstdint>

namespace moelab::cuda {

struct AttentionBackwardPlan {
  bool fused = false;
  int64_t n_split = 1;
};

inline AttentionBackwardPlan attention_backward_plan(int64_t sm_count, int64_t B, int64_t Hkv, int64_t S,
                                                     int64_t key_tile, int64_t dq_elems, int64_t scratch_bytes,
                                                     bool forced, int64_t forced_splits) {
  AttentionBackwardPlan plan;
  const int64_t BG = B * Hkv, n_kt = (S + key_tile - 1) / key_tile;
  const int64_t buffer_bytes = dq_elems * int64_t(sizeof(float));
  int64_t n = forced_splits > 0 ? forced_splits : (sm_count + BG / 2) / BG;
  if (forced_splits <= 0 && buffer_bytes > 0) n = std::min(n, scratch_bytes / buffer_bytes);
  plan.n_split = std::max<int64_t>(1, std::min(n_kt, n));
  plan.fused = forced || 2 * BG * plan.n_split >= sm_count;
  return plan;
}

}  // namespace moelab::cuda
