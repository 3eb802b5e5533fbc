// moelab: grouped GEMM kernels for the MoE expert MLPs (bf16 in, fp32 accumulation, bf16 out),
// written once for two platforms, like flash_attention_kernels.h: the bodies call the primitives
// of backends/cuda/mma_platform.cuh (the GPU: ldmatrix, mma.sync m16n8k16, cp.async) or of
// tests/flash_emu.h (a CPU emulation, one fiber per CUDA thread), whichever the includer included
// first. The launchers are in grouped_gemm_mma.cu; test_grouped_gemm_emulated.cpp runs these
// bodies on the CPU.
//
// Semantics (core/backend.h, Backend::grouped_gemm / grouped_gemm_wgrad), with the per-expert row
// offsets off [E+1] (int32, nondecreasing, off[0] = 0, off[E] = R) read from DEVICE memory, so
// the host never needs the row counts:
//   forward (trans_w = false):  Y[off[e]:off[e+1]] = X[off[e]:off[e+1]] W[e]   + beta Y[...]
//   dgrad   (trans_w = true):   Y[off[e]:off[e+1]] = X[off[e]:off[e+1]] W[e]^T + beta Y[...]
//   wgrad:                      dW[e] = X[rows of e]^T dY[rows of e] + beta dW[e]
//   X [R, K] row-major; W [E, K, N] (forward) or [E, N, K] (dgrad); Y [R, N]; dY [R, N];
//   dW [E, K, N]. An expert without rows gets beta dW[e] from wgrad and nothing from the others.
// Requirements (the launchers' can_implement): K % 8 == 0, N % 8 == 0, 16-byte aligned bases, so
// that every 16-byte chunk of a row lies wholly inside or wholly outside the matrix.
//
// One kernel shape for all three: a block computes a BM x BN tile of C = A B over a reduction of
// length Kr, A and B staged in shared memory by a STAGES-deep cp.async pipeline (BK along the
// reduction per stage), warps on a WARPS_M x WARPS_N grid, each warp (BM/WARPS_M) x
// (BN/WARPS_N) of fp32 accumulators in mma.sync m16n8k16 fragments. The operands' layouts:
//   A [m][k] (k contiguous; forward/dgrad: X rows)        -> ldmatrix
//   A [k][m] (m contiguous; wgrad: X^T, k = the rows)     -> ldmatrix.trans
//   B [k][n] (n contiguous; forward: W[e]; wgrad: dY)     -> ldmatrix.trans
//   B [n][k] (k contiguous; dgrad: W[e] stored [N, K])    -> ldmatrix
// Shared-memory rows are padded by 8 bf16 (16 bytes): with 80- or 272-byte row strides the 8
// row addresses of one 8x8 ldmatrix fall into 8 distinct 16-byte bank groups (conflict-free).
// Chunks past a matrix's edge (rows past an expert's end, k past K, n past N) are zero-filled by
// cp.async with src-size 0, so they add nothing to the products, and their outputs are never
// stored.
//
// Tile scheduling without host counts (forward/dgrad): a 1-D grid of slots x n-tiles, ordered by
// gg_raster (groups of GROUP_N n-tiles; inside a group n fastest, then slots), so that the blocks
// running together share a few tiles of X rows and a strip of one expert's W through L2.
// Expert e owns the slots [start(e), start(e+1)) with start(e) = floor(off[e] / BM) + e:
// strictly increasing, start(e+1) - start(e) = floor(off[e+1]/BM) - floor(off[e]/BM) + 1 >=
// ceil(rows_e / BM), and start(E) = floor(R / BM) + E, an upper bound the host knows. A block
// finds its expert in one parallel pass (each thread tests a few experts against its slot; exactly
// one matches), takes the slot's m-tile at rows off[e] + j BM, and exits when that tile starts at
// or past the expert's end (at most one surplus slot per expert, plus none past start(E)).
// Wgrad: one block per (expert, K-tile, N-tile), looping over that expert's rows in BK steps.
//
// Epilogue: fp32 accumulators (+ beta * old, beta != 0 only: with beta 0 the output is never
// read, so NaN there is harmless) -> bf16, 4-byte stores (two columns per lane; four lanes cover
// 16 contiguous bytes of a row).
// Determinism: no atomics, no split reduction; each output element is written by one thread after
// a fixed-order loop over the reduction, so results are bit-identical run to run.
#pragma once
#include <cstddef>
#include <cstdint>

#ifndef FA_DEV
#error "grouped_gemm_kernels.h: include a platform (mma_platform.cuh or tests/flash_emu.h) first"
#endif

#if defined(__CUDACC__)
#define GG_UNROLL _Pragma("unroll")
#else
#define GG_UNROLL
#endif

namespace moelab::ggemm {

using namespace moelab::flash;  // the platform's fa_* primitives

// ---- tile configuration (shared with the launchers and the emulation test) ---------------------

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_, int GROUP_N_>
struct Cfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_;
  static constexpr int GROUP_N = GROUP_N_;  // rasterization: n-tiles per group (gg_raster)
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // one warp's tile
  static constexpr int MI = WM / 16, NI = WN / 8;              // its mma fragments
  static_assert(BM % (16 * WARPS_M) == 0 && BN % (16 * WARPS_N) == 0 && BK % 16 == 0, "tile");
  static_assert(STAGES >= 2, "pipeline");
  // Padded row lengths (elements) of the staged tiles: [rows][cols + 8].
  static constexpr int LD_MK = BK + 8;  // A [m][k]: BM rows; B [n][k]: BN rows
  static constexpr int LD_KM = BM + 8;  // A [k][m]: BK rows
  static constexpr int LD_KN = BN + 8;  // B [k][n]: BK rows
  static constexpr int kMaxA = BM * LD_MK > BK * LD_KM ? BM * LD_MK : BK * LD_KM;
  static constexpr int kMaxB = BN * LD_MK > BK * LD_KN ? BN * LD_MK : BK * LD_KN;
  static constexpr size_t kStageBytes = size_t(kMaxA + kMaxB) * 2;
  static constexpr size_t kSmem = STAGES * kStageBytes + 16;  // + the block's schedule word
};

// The production tile: 128 x 128 x 32, 8 warps of 64 x 32, 4 stages (80 KiB of shared memory,
// two blocks per SM), n-tiles rasterized in groups of 16 (2048 columns).
using Big = Cfg<128, 128, 32, 2, 4, 4, 16>;

struct Params {
  const void* x = nullptr;      // [R, K]
  const void* w = nullptr;      // forward: [E, K, N]; dgrad: [E, N, K]; wgrad: dY [R, N]
  void* y = nullptr;            // forward / dgrad: Y [R, N]; wgrad: dW [E, K, N]
  const int32_t* off = nullptr;  // [E + 1], device
  int E = 0, R = 0, K = 0, N = 0;
  float beta = 0;
};

FA_DEV int gg_min(int a, int b) { return a < b ? a : b; }
FA_DEV int gg_cdiv(int a, int b) { return (a + b - 1) / b; }

// Block order over an m_tiles x n_tiles grid (bid < m_tiles n_tiles): the n-tiles in groups of
// G = GROUP_N (the last group narrower), and inside a group, n fastest and then m. The blocks that
// run together then share a few n-tiles of B (G BN columns) and a few m-tiles of A, which both
// stay in L2, instead of sweeping all of a wide B once per m-tile (a 4096 x 28672 W[e] is 235 MB;
// L2 holds 50). Returns the m-tile; *n_tile gets the n-tile.
template <int G> FA_DEV int gg_raster(int64_t bid, int m_tiles, int n_tiles, int* n_tile) {
  const int64_t per_group = int64_t(G) * m_tiles;
  const int g = int(bid / per_group), rem = int(bid - g * per_group);
  const int width = gg_min(G, n_tiles - g * G);
  *n_tile = g * G + rem % width;
  return rem / width;
}

// The expert that owns forward / dgrad slot `slot` (slot < floor(R / BM) + E): the last e with
// start(e) = floor(off[e] / BM) + e <= slot, by binary search (the starts strictly increase and
// start(0) = 0). What the wgmma kernel's blocks compute (grouped_gemm_wgmma.cu); the mma.sync
// kernel finds the same expert with one parallel test per expert (forward, below). The slot's
// m-tile starts at row off[e] + (slot - start(e)) BM, past the expert's rows for its one surplus
// slot.
template <int BM> FA_DEV int gg_slot_expert(const int32_t* off, int E, int slot) {
  int lo = 0, hi = E;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (fa_ldg(off + mid) / BM + mid <= slot) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Grid sizes (1-D), for the launchers and the emulation.
template <class C> constexpr int64_t fwd_blocks(int64_t R, int64_t E, int64_t N) {
  return (R / C::BM + E) * ((N + C::BN - 1) / C::BN);
}
template <class C> constexpr int64_t wgrad_blocks(int64_t E, int64_t K, int64_t N) {
  return E * ((K + C::BM - 1) / C::BM) * ((N + C::BN - 1) / C::BN);
}

// Stages a ROWS x COLS tile of a bf16 matrix (src: its element (0, 0); row stride ld elements)
// into shared memory [ROWS][LDS], 16 bytes per cp.async; row r / column c are real when
// r < row_lim and c < col_lim (col_lim a multiple of 8), zero-filled otherwise. A zero-filled
// chunk still names an aligned source address (src itself), never one past the matrix.
template <int ROWS, int COLS, int LDS, int NT>
FA_DEV void gg_stage(uint16_t* dst, const uint16_t* src, int64_t ld, int row_lim, int col_lim,
                     int tid) {
  constexpr int CH = COLS / 8, N = ROWS * CH;
  static_assert(N % NT == 0, "chunks per thread");
GG_UNROLL
  for (int i = 0; i < N / NT; ++i) {
    const int c = tid + i * NT, r = c / CH, cc = (c - r * CH) * 8;
    const bool ok = r < row_lim && cc < col_lim;
    fa_cp_async16(dst + r * LDS + cc, ok ? src + int64_t(r) * ld + cc : src, ok);
  }
}

// The main loop: acc (this warp's MI x NI fragments) = A B over the reduction k in [0, Kr).
//   A_KM = false: A element (m, k) at a[m * lda + k]; = true: at a[k * lda + m].
//   B_NK = false: B element (k, n) at b[k * ldb + n]; = true: at b[n * ldb + k].
//   m_lim / n_lim: the real rows / columns of this tile (the rest is zero-filled).
template <class C, bool A_KM, bool B_NK>
FA_DEV void gg_mainloop(float (&acc)[C::MI][C::NI][4], const uint16_t* a, int64_t lda, int m_lim,
                        const uint16_t* b, int64_t ldb, int n_lim, int Kr, char* smem, int tid) {
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, NT = C::kThreads, S = C::STAGES;
  constexpr int LDA = A_KM ? C::LD_KM : C::LD_MK, LDB = B_NK ? C::LD_MK : C::LD_KN;
  const int warp = tid >> 5, lane = tid & 31;
  const int wm = (warp / C::WARPS_N) * C::WM, wn = (warp % C::WARPS_N) * C::WN;
GG_UNROLL
  for (int i = 0; i < C::MI; ++i)
GG_UNROLL
    for (int j = 0; j < C::NI; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

  auto sA = [&](int st) { return reinterpret_cast<uint16_t*>(smem + size_t(st) * C::kStageBytes); };
  auto sB = [&](int st) { return sA(st) + C::kMaxA; };
  // Stages reduction tile kt (k0 = kt BK) into stage st.
  auto load = [&](int kt, int st) {
    const int k0 = kt * BK, k_lim = Kr - k0;
    if constexpr (A_KM) gg_stage<BK, BM, LDA, NT>(sA(st), a + int64_t(k0) * lda, lda, k_lim, m_lim, tid);
    else gg_stage<BM, BK, LDA, NT>(sA(st), a + k0, lda, m_lim, k_lim, tid);
    if constexpr (B_NK) gg_stage<BN, BK, LDB, NT>(sB(st), b + k0, ldb, n_lim, k_lim, tid);
    else gg_stage<BK, BN, LDB, NT>(sB(st), b + int64_t(k0) * ldb, ldb, k_lim, n_lim, tid);
  };

  const int kt_n = gg_cdiv(Kr, BK);
  // Prologue: tiles 0 .. S-2 in flight (one commit group each, empty past the end, so that the
  // group count, and with it wait_group's meaning, is the same in every iteration).
GG_UNROLL
  for (int s = 0; s < S - 1; ++s) {
    if (s < kt_n) load(s, s);
    fa_cp_commit();
  }
  const int mi8 = lane >> 3, r8 = lane & 7;  // ldmatrix: this lane addresses row r8 of matrix mi8
  for (int kt = 0; kt < kt_n; ++kt) {
    fa_cp_wait<S - 2>();  // this thread's copies of tile kt have landed ...
    fa_sync();            // ... everyone's have, and stage (kt - 1) % S is no longer being read
    {
      const int nk = kt + S - 1;
      if (nk < kt_n) load(nk, nk % S);
      fa_cp_commit();
    }
    const uint16_t* tA = sA(kt % S);
    const uint16_t* tB = sB(kt % S);
GG_UNROLL
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[C::MI][4], bf[C::NI / 2][4];
GG_UNROLL
      for (int i = 0; i < C::MI; ++i) {
        const int m0 = wm + 16 * i;
        // Fragment matrices a0..a3: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15).
        if constexpr (A_KM) fa_ldsm_x4_t(af[i], tA + (kk + (mi8 >> 1) * 8 + r8) * LDA + m0 + (mi8 & 1) * 8);
        else fa_ldsm_x4(af[i], tA + (m0 + (lane & 15)) * LDA + kk + (lane >> 4) * 8);
      }
GG_UNROLL
      for (int j = 0; j < C::NI / 2; ++j) {
        const int n0 = wn + 16 * j;
        // b0..b3: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
        if constexpr (B_NK) fa_ldsm_x4(bf[j], tB + (n0 + (mi8 >> 1) * 8 + r8) * LDB + kk + (mi8 & 1) * 8);
        else fa_ldsm_x4_t(bf[j], tB + (kk + (mi8 & 1) * 8 + r8) * LDB + n0 + (mi8 >> 1) * 8);
      }
GG_UNROLL
      for (int i = 0; i < C::MI; ++i)
GG_UNROLL
        for (int j = 0; j < C::NI; ++j) fa_mma(acc[i][j], af[i], bf[j / 2][2 * (j & 1)], bf[j / 2][2 * (j & 1) + 1]);
    }
  }
  fa_cp_wait<0>();  // nothing but empty groups can be left; no copy outlives the block
}

// Stores this warp's fragments of the tile whose element (0, 0) is out[0] (row stride ldo):
// rows < m_lim and columns < n_lim only (n_lim even), value acc + beta * old.
template <class C>
FA_DEV void gg_store(uint16_t* out, int64_t ldo, int m_lim, int n_lim, float beta,
                     const float (&acc)[C::MI][C::NI][4], int tid) {
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wm = (warp / C::WARPS_N) * C::WM, wn = (warp % C::WARPS_N) * C::WN;
GG_UNROLL
  for (int i = 0; i < C::MI; ++i)
GG_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int r = wm + 16 * i + g + 8 * h;
      if (r >= m_lim) continue;
      uint16_t* row = out + int64_t(r) * ldo;
GG_UNROLL
      for (int j = 0; j < C::NI; ++j) {
        const int col = wn + 8 * j + 2 * t;
        if (col >= n_lim) continue;
        float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
        if (beta != 0.0f) {
          const uint32_t old = fa_ld32(row + col);
          v0 += beta * fa_bf16_to_f(uint16_t(old & 0xFFFFu));
          v1 += beta * fa_bf16_to_f(uint16_t(old >> 16));
        }
        fa_st32(row + col, fa_pack_bf16(v0, v1));
      }
    }
}

// ---- kernel bodies ------------------------------------------------------------------------------

// Forward (TRANS_W = false) and dgrad (TRANS_W = true); block `bid` of fwd_blocks<C>(R, E, N).
template <class C, bool TRANS_W>
FA_DEV void forward(const Params& p, char* smem, int tid, int64_t bid) {
  int n_tile = 0;
  const int slot = gg_raster<C::GROUP_N>(bid, p.R / C::BM + p.E, gg_cdiv(p.N, C::BN), &n_tile);
  const int n0 = n_tile * C::BN;
  int* s_expert = reinterpret_cast<int*>(smem + C::STAGES * C::kStageBytes);
  if (tid == 0) *s_expert = -1;
  fa_sync();
  // Expert e owns slots [floor(off[e]/BM) + e, floor(off[e+1]/BM) + e + 1): exactly one e matches
  // a slot below floor(R/BM) + E.
  for (int e = tid; e < p.E; e += C::kThreads) {
    const int lo = p.off[e] / C::BM + e, hi = p.off[e + 1] / C::BM + e + 1;
    if (slot >= lo && slot < hi) *s_expert = e;
  }
  fa_sync();
  const int e = *s_expert;
  if (e < 0) return;  // block-uniform exits
  const int r_begin = p.off[e], r_end = p.off[e + 1];
  const int row0 = r_begin + (slot - (r_begin / C::BM + e)) * C::BM;
  if (row0 >= r_end) return;
  const int m_lim = gg_min(C::BM, r_end - row0), n_lim = gg_min(C::BN, p.N - n0);
  const uint16_t* X = static_cast<const uint16_t*>(p.x);
  const uint16_t* W = static_cast<const uint16_t*>(p.w) + int64_t(e) * p.K * p.N;
  float acc[C::MI][C::NI][4];
  if constexpr (TRANS_W)  // W[e] [N, K]: B element (k, n) at W[n * K + k]
    gg_mainloop<C, false, true>(acc, X + int64_t(row0) * p.K, p.K, m_lim, W + int64_t(n0) * p.K,
                                p.K, n_lim, p.K, smem, tid);
  else  // W[e] [K, N]: B element (k, n) at W[k * N + n]
    gg_mainloop<C, false, false>(acc, X + int64_t(row0) * p.K, p.K, m_lim, W + n0, p.N, n_lim,
                                 p.K, smem, tid);
  gg_store<C>(static_cast<uint16_t*>(p.y) + int64_t(row0) * p.N + n0, p.N, m_lim, n_lim, p.beta,
              acc, tid);
}

// Weight gradient; block `bid` of wgrad_blocks<C>(E, K, N): expert-major, and inside an expert
// the (K-tile, N-tile) grid in gg_raster's order.
template <class C>
FA_DEV void wgrad(const Params& p, char* smem, int tid, int64_t bid) {
  const int n_tiles = gg_cdiv(p.N, C::BN), m_tiles = gg_cdiv(p.K, C::BM);
  const int64_t per_expert = int64_t(m_tiles) * n_tiles;
  const int e = int(bid / per_expert);
  int n_tile = 0;
  const int m0 = gg_raster<C::GROUP_N>(bid - e * per_expert, m_tiles, n_tiles, &n_tile) * C::BM;
  const int n0 = n_tile * C::BN;
  const int r_begin = p.off[e], rows = p.off[e + 1] - r_begin;
  const int m_lim = gg_min(C::BM, p.K - m0), n_lim = gg_min(C::BN, p.N - n0);
  const uint16_t* X = static_cast<const uint16_t*>(p.x) + int64_t(r_begin) * p.K + m0;
  const uint16_t* dY = static_cast<const uint16_t*>(p.w) + int64_t(r_begin) * p.N + n0;
  float acc[C::MI][C::NI][4];
  // A = X^T: element (m, k) = X[k, m], stored [k][m]; B = dY: element (k, n), stored [k][n].
  gg_mainloop<C, true, false>(acc, X, p.K, m_lim, dY, p.N, n_lim, rows, smem, tid);
  gg_store<C>(static_cast<uint16_t*>(p.y) + int64_t(e) * p.K * p.N + int64_t(m0) * p.N + n0, p.N,
              m_lim, n_lim, p.beta, acc, tid);
}

}  // namespace moelab::ggemm
