// moelab CUDA backend: the shared-memory layout of wgmma operands (wgmma.cuh), as plain integer
// arithmetic that compiles for the device and the host, so that the CPU tests check it
// (tests/test_wgmma_layout.cpp).
//
// K-major tiles with the 128-byte swizzle (PTX ISA, "asynchronous warpgroup level matrix shared
// memory layout"): a tile of R rows x C bf16 columns (C a multiple of 64) is C / 64 panels of
// R rows x 128 bytes; the 16-byte chunk c of row r in a panel sits at chunk position c ^ (r % 8)
// (the canonical Swizzle<3, 4, 3>: address bits 4-6 XOR bits 7-9), and every panel starts on a
// 1024-byte boundary. The descriptor names 8-row groups 1024 bytes apart (SBO); a K step of 16
// columns inside a panel moves the start address by 32 bytes, and the hardware applies the
// swizzle to the final address.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MOELAB_WG_FN __host__ __device__ __forceinline__
#else
#define MOELAB_WG_FN inline
#endif

namespace moelab::cuda::wg {

// Byte offset of the 16-byte chunk `cc` (columns 8cc .. 8cc + 7) of row r in a swizzled tile of R
// rows.
MOELAB_WG_FN uint32_t swizzled_chunk(int r, int cc, int R) {
  return uint32_t((cc >> 3) * R * 128 + r * 128 + (((cc & 7) ^ (r & 7)) << 4));
}

// Descriptor of a K-major, 128-byte-swizzled operand starting at shared address `addr`.
MOELAB_WG_FN uint64_t desc_sw128(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4)  // start address, 16-byte units
         | (uint64_t(1) << 16)            // leading byte offset: unused with this swizzle
         | (uint64_t(1024 >> 4) << 32)    // stride byte offset: 8 rows x 128 bytes
         | (uint64_t(1) << 62);           // 128-byte swizzle
}
// Where K step `kk` (columns 16kk .. 16kk + 15) of a K-major tile of R rows starts, in bytes from
// the tile: panel kk / 4, then 32 bytes per step inside the panel's rows.
MOELAB_WG_FN uint32_t k_step_bytes(int R, int kk) { return uint32_t((kk >> 2) * R * 128 + (kk & 3) * 32); }
// The descriptor of K step `kk` of a tile of R rows at `tile`, from row `row0` on (a multiple of 8).
MOELAB_WG_FN uint64_t desc_k(uint32_t tile, int R, int row0, int kk) {
  return desc_sw128(tile + uint32_t(row0 * 128) + k_step_bytes(R, kk));
}

// Descriptor of the same tiles read MN-major (wgmma's transpose flag set): the rows run along K,
// the 128-byte rows along M or N. In CUTLASS's terms the canonical MN-major SW128 layout
// ((8, n), (8, k)) : ((1, LBO), (8, SBO)) in 16-byte units: LBO is the stride between 64-column
// panels (M or N wider than 64), SBO the stride between groups of 8 rows along K.
MOELAB_WG_FN uint64_t desc_mn_sw128(uint32_t addr, uint32_t panel_bytes) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((panel_bytes >> 4) & 0x3FFF) << 16) |
         (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
// Where K step `kk` (rows 16kk .. 16kk + 15) of an MN-major tile starts, in bytes from the tile.
MOELAB_WG_FN uint32_t mn_step_bytes(int kk) { return uint32_t(kk * 16 * 128); }
// The MN-major descriptor of K step `kk` of a tile of R rows at `tile`, from its 64-column panel
// `panel` on.
MOELAB_WG_FN uint64_t desc_mn_k(uint32_t tile, int R, int panel, int kk) {
  return desc_mn_sw128(tile + uint32_t(panel * R * 128) + mn_step_bytes(kk), uint32_t(R * 128));
}

// A descriptor moved by `bytes` (a multiple of 16 that keeps the start address inside shared
// memory): only the start-address field of the low word changes, so one 32-bit add.
MOELAB_WG_FN uint64_t desc_plus(uint64_t d, uint32_t bytes) {
  return (d & 0xFFFFFFFF00000000ull) | uint32_t(uint32_t(d) + (bytes >> 4));
}

}  // namespace moelab::cuda::wg
