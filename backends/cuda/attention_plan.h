// moelab CUDA backend: how the one-kernel Hopper attention backward (flash_attention_wgmma.cu,
// bwd_wg) is laid out, as plain host arithmetic that the CPU tests check
// (tests/test_wgmma_layout.cpp).
//
// bwd_wg runs B Hkv x n_split blocks; each owns every n_split-th key tile of one kv head (a snake)
// and its own fp32 buffer of dQ (dq_buffer_elems), which is what keeps dQ deterministic. More
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

#include "backends/cuda/wgmma_layout.h"  // MOELAB_WG_FN: host and device, as the other layout functions

namespace moelab::cuda {

// One split's fp32 dQ buffer, in the layout bwd_wg stages dQ's partial sums in shared memory, so
// that each warp sends its part of a query tile with one bulk copy: [b][h][query tile of 64 rows]
// [column half w of DH / 2 columns (warpgroup w computes it)][64 rows][DH / 2], where the 16-byte
// chunks of row r are swizzled, chunk c stored at c ^ (2 r & 7) (the 8-byte stores of a warp's
// rows then fall into distinct banks). Rows past S in the last tile are padding.
MOELAB_WG_FN int64_t dq_buffer_elems(int64_t B, int64_t H, int64_t S, int64_t DH) {
  return B * H * ((S + 63) / 64) * 64 * DH;
}
// Where 16-byte chunk c of row `row` (of a query tile) sits within its half row.
MOELAB_WG_FN int dq_swizzled_chunk(int row, int c) { return c ^ ((2 * row) & 7); }
// The element of (sequence b, head h, position pos, column d); DH 64 or 128 (at least 8 chunks
// per half row, which the swizzle permutes).
MOELAB_WG_FN int64_t dq_buffer_offset(int64_t b, int h, int pos, int d, int H, int S, int DH) {
  const int half = DH / 2, w = d / half, c = d - w * half, row = pos % 64;
  const int chunk = dq_swizzled_chunk(row, c / 4);
  return ((b * H + h) * ((S + 63) / 64) + pos / 64) * (int64_t(64) * DH) + int64_t(w * 64 + row) * half +
         4 * chunk + c % 4;
}

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
