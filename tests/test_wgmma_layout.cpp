// moelab tests: the shared-memory layout of the Hopper wgmma kernels (backends/cuda/
// wgmma_layout.h), which the GPU cannot show when it is wrong except as wrong products: the
// swizzled chunk placement against the canonical Swizzle<3, 4, 3> of the PTX ISA, every tile
// filled exactly once, and the matrix descriptors' bit fields and K steps.
#include <cstdint>
#include <set>

#include "backends/cuda/attention_plan.h"
#include "backends/cuda/wgmma_layout.h"
#include "catch_compat.h"

namespace wg = moelab::cuda::wg;

namespace {

// The 128-byte swizzle on a byte offset from a 1024-byte-aligned base: bits 4-6 ^= bits 7-9.
uint32_t swizzle128(uint32_t linear) { return linear ^ (((linear >> 7) & 7u) << 4); }

uint64_t bits(uint64_t x, int lo, int n) { return (x >> lo) & ((uint64_t(1) << n) - 1); }

}  // namespace

TEST_CASE("wgmma layout: chunks sit where the 128-byte swizzle puts them", "[wgmma]") {
  for (int R : {64, 128})
    for (int C : {64, 128}) {
      INFO("tile " << R << " x " << C);
      std::set<uint32_t> seen;
      for (int r = 0; r < R; ++r)
        for (int cc = 0; cc < C / 8; ++cc) {
          // Row-major inside each 64-column panel; panels of R rows one after the other.
          const uint32_t linear = uint32_t((cc / 8) * R * 128 + r * 128 + (cc % 8) * 16);
          const uint32_t at = wg::swizzled_chunk(r, cc, R);
          REQUIRE(at == swizzle128(linear));
          REQUIRE(at % 16 == 0);
          REQUIRE(at < uint32_t(R * C * 2));
          seen.insert(at);
        }
      CHECK(seen.size() == size_t(R * C / 8));  // every 16-byte chunk of the tile exactly once
      CHECK((R * 128) % 1024 == 0);             // every panel starts on a swizzle atom
    }
  // A row of 8 chunks is a permutation within its own 128 bytes.
  for (int r = 0; r < 8; ++r) {
    std::set<uint32_t> row;
    for (int cc = 0; cc < 8; ++cc) row.insert(wg::swizzled_chunk(r, cc, 64) - uint32_t(r * 128));
    CHECK(row == std::set<uint32_t>{0, 16, 32, 48, 64, 80, 96, 112});
  }
}

TEST_CASE("wgmma layout: descriptor fields and K steps", "[wgmma]") {
  const uint32_t base = 0x1C400;  // a 1024-byte-aligned shared address
  const uint64_t d = wg::desc_sw128(base);
  CHECK(bits(d, 0, 14) == (base >> 4));  // start address, 16-byte units
  CHECK(bits(d, 16, 14) == 1);           // leading byte offset (unused with the swizzle)
  CHECK(bits(d, 32, 14) == 1024 >> 4);   // stride byte offset: 8 rows x 128 bytes
  CHECK(bits(d, 49, 3) == 0);            // base offset: atoms are aligned
  CHECK(bits(d, 62, 2) == 1);            // 128-byte swizzle
  CHECK(bits(d, 14, 2) == 0);
  CHECK(bits(d, 30, 2) == 0);
  CHECK(bits(d, 46, 3) == 0);
  CHECK(bits(d, 52, 10) == 0);
  // Start addresses are 18-bit shared addresses in 16-byte units.
  CHECK(bits(wg::desc_sw128(0x3FFF0), 0, 14) == 0x3FFF);

  for (int R : {64, 128})
    for (int row0 : {0, 64})
      for (int kk = 0; kk < 8; ++kk) {
        if (row0 >= R) continue;
        INFO("R " << R << " row0 " << row0 << " kk " << kk);
        const uint64_t dk = wg::desc_k(base, R, row0, kk);
        // K step kk: panel kk / 4 (R x 128 bytes each), 32 bytes per step inside the panel.
        const uint32_t start = base + uint32_t((kk / 4) * R * 128 + row0 * 128 + (kk % 4) * 32);
        CHECK(bits(dk, 0, 14) == (start >> 4));
        CHECK((dk & ~uint64_t(0x3FFF)) == (d & ~uint64_t(0x3FFF)));  // only the start moves
        // The first step of each panel starts on a swizzle atom; the others inside its first row.
        if (kk % 4 == 0) CHECK(start % 1024 == 0);
        else CHECK(start % 128 == uint32_t(kk % 4) * 32);
      }
}

// The MN-major view of the same tiles (the fused backward reads dO, Q and K with the rows along K):
// element (k, mn) of a tile of R rows sits in row k, 64-column panel mn / 64; CUTLASS's canonical
// MN-major SW128 layout ((8, n), (8, k)) : ((1, LBO), (8, SBO)) in 16-byte units, swizzled, puts
// it at the same byte when LBO is the panel stride and SBO 8 rows.
TEST_CASE("wgmma layout: MN-major descriptors of the same tiles", "[wgmma]") {
  const uint32_t base = 0x08000;
  for (int R : {64, 128})
    for (int panel : {0, 1})
      for (int kk = 0; kk < R / 16; ++kk) {
        INFO("R " << R << " panel " << panel << " kk " << kk);
        const uint64_t d = wg::desc_mn_k(base, R, panel, kk);
        const uint32_t start = base + uint32_t(panel * R * 128 + kk * 2048);
        CHECK(bits(d, 0, 14) == (start >> 4));
        CHECK(bits(d, 16, 14) == uint32_t(R * 128 / 16));  // LBO: the next 64-column panel
        CHECK(bits(d, 32, 14) == 1024 >> 4);                // SBO: the next 8 rows along K
        CHECK(bits(d, 49, 3) == 0);
        CHECK(bits(d, 62, 2) == 1);
        CHECK(start % 1024 == 0);  // every K step starts on a swizzle atom
        // The canonical layout's element (k, mn) of this step, from its start address and the
        // strides, lands where swizzled_chunk stored row 16 kk + k, chunk mn / 8 of the tile.
        const uint32_t lbo = uint32_t(bits(d, 16, 14) << 4), sbo = uint32_t(bits(d, 32, 14) << 4);
        for (int k = 0; k < 16; ++k)
          for (int mn = 0; mn < 128; mn += 8) {
            if (panel == 1 && mn >= 64) continue;  // a tile has at most two panels
            const uint32_t linear = (start - base) + uint32_t((mn / 64) * lbo + (k / 8) * sbo + (k % 8) * 128 +
                                                              ((mn % 64) / 8) * 16);
            const int row = 16 * kk + k, cc = panel * 8 + mn / 8;
            REQUIRE(swizzle128(linear) == wg::swizzled_chunk(row, cc, R));
          }
      }
}

// The one-kernel attention backward's plan (backends/cuda/attention_plan.h), on an H200's 132 SMs
// with the default 1 GiB budget for its fp32 dQ buffers.
TEST_CASE("attention backward plan: splits, buffer budget, and when the separate kernels run", "[wgmma]") {
  using moelab::cuda::attention_backward_plan;
  const int64_t sms = 132, GiB = int64_t(1) << 30;
  auto dq = [](int64_t B, int64_t S, int64_t H, int64_t Dh) { return B * S * H * Dh; };
  // The bench's shapes: about one wave of blocks, all fused.
  auto p = attention_backward_plan(sms, 8, 8, 2048, 128, dq(8, 2048, 32, 128), GiB, false, 0);  // C
  CHECK(p.fused);
  CHECK(p.n_split == 2);
  p = attention_backward_plan(sms, 4, 8, 4096, 128, dq(4, 4096, 8, 128), GiB, false, 0);  // F
  CHECK(p.fused);
  CHECK(p.n_split == 4);
  p = attention_backward_plan(sms, 8, 16, 2048, 128, dq(8, 2048, 16, 128), GiB, false, 0);  // D
  CHECK(p.fused);
  CHECK(p.n_split == 1);
  p = attention_backward_plan(sms, 32, 8, 512, 128, dq(32, 512, 8, 64), GiB, false, 0);  // A
  CHECK(p.fused);
  CHECK(p.n_split == 1);
  // One long sequence: 17 buffers of 512 MiB would be wanted; 1 GiB holds 2, and 16 blocks fill
  // too little of the GPU, so the separate kernels run. A 16 GiB budget allows the 17.
  p = attention_backward_plan(sms, 1, 8, 32768, 128, dq(1, 32768, 32, 128), GiB, false, 0);
  CHECK(p.n_split == 2);
  CHECK_FALSE(p.fused);
  p = attention_backward_plan(sms, 1, 8, 32768, 128, dq(1, 32768, 32, 128), 16 * GiB, false, 0);
  CHECK(p.n_split == 17);
  CHECK(p.fused);
  // Small problems: at most one split per key tile; too few blocks unless forced.
  p = attention_backward_plan(sms, 1, 2, 1100, 128, dq(1, 1100, 4, 128), GiB, false, 0);
  CHECK(p.n_split == 9);
  CHECK_FALSE(p.fused);
  p = attention_backward_plan(sms, 1, 2, 1100, 128, dq(1, 1100, 4, 128), GiB, true, 0);
  CHECK(p.fused);
  // Fixed splits (tests) ignore the budget but not the key tiles; never fewer than one split.
  CHECK(attention_backward_plan(sms, 1, 2, 1100, 128, dq(1, 1100, 4, 128), 1, true, 4).n_split == 4);
  CHECK(attention_backward_plan(sms, 1, 2, 300, 128, dq(1, 300, 4, 128), GiB, true, 4).n_split == 3);
  CHECK(attention_backward_plan(sms, 1, 2, 1100, 128, dq(1, 1100, 4, 128), 1, false, 0).n_split == 1);
  CHECK(attention_backward_plan(sms, 1, 1, 1, 128, 128, GiB, false, 0).n_split == 1);
}

// The attention backward's fp32 dQ buffer (attention_plan.h): every (sequence, head, position,
// column) has its own element inside the buffer; four columns from a multiple of 4 are one
// 16-byte chunk (the finish kernel's float4 reads); the 16 rows x DH / 2 columns that one warp
// sends with one bulk copy are one contiguous block; and the 8-byte shared-memory stores of a
// half-warp (4 rows x 4 column pairs of one k step) hit each of the 32 banks once.
TEST_CASE("attention backward dQ buffer: a bijection with whole chunks and warp blocks and spread banks", "[wgmma]") {
  using moelab::cuda::dq_buffer_elems;
  using moelab::cuda::dq_buffer_offset;
  for (int DH : {64, 128})
    for (int S : {64, 100, 130}) {
      INFO("DH " << DH << ", S " << S);
      const int B = 2, H = 3, half = DH / 2;
      const int64_t elems = dq_buffer_elems(B, H, S, DH);
      CHECK(elems == int64_t(B) * H * ((S + 63) / 64) * 64 * DH);
      std::set<int64_t> seen;
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
          for (int pos = 0; pos < S; ++pos)
            for (int d = 0; d < DH; ++d) {
              const int64_t o = dq_buffer_offset(b, h, pos, d, H, S, DH);
              REQUIRE(o >= 0);
              REQUIRE(o < elems);
              REQUIRE(seen.insert(o).second);
              if (d % 4 == 0) {
                REQUIRE(o % 4 == 0);
                for (int e = 1; e < 4; ++e) REQUIRE(dq_buffer_offset(b, h, pos, d + e, H, S, DH) == o + e);
              }
              // The warp block of (tile, half, 16-row group) starts at its first row's first chunk slot.
              const int row = pos % 64, w = d / half;
              const int64_t block = ((int64_t(b) * H + h) * ((S + 63) / 64) + pos / 64) * (64 * DH) +
                                    int64_t(w * 64 + row / 16 * 16) * half;
              REQUIRE(o >= block);
              REQUIRE(o < block + 16 * half);
            }
      CHECK(int64_t(seen.size()) == int64_t(B) * H * S * DH);
      // Banks: lanes (r = lane / 4 in 0..3, tq = lane % 4) store columns 8 nb + 2 tq, + 1 of row r.
      for (int nb = 0; nb < half / 8; ++nb) {
        std::set<int64_t> banks;
        for (int r = 0; r < 4; ++r)
          for (int tq = 0; tq < 4; ++tq) {
            const int64_t o = dq_buffer_offset(0, 0, r, 8 * nb + 2 * tq, H, S, DH);
            banks.insert(o % 32);
            banks.insert((o + 1) % 32);
          }
        CHECK(banks.size() == 32);
      }
    }
}
