// moelab CUDA backend: flash attention on Hopper's warpgroup MMA (wgmma, sm_90a).
//
// The contract is flash_attention_kernels.h's (causal, grouped-query, optional segments; out and
// the natural-log lse per query row; dQ, dK, dV from lse and D = rowsum(dO * O)), and so is the
// arithmetic: scores in base 2 (s * scale * log2 e), fp32 softmax and gradients in registers, P
// and dS rounded to bf16 for their products, fp32 accumulation. What changes is the tensor-core
// instruction: mma.sync issues a 16 x 8 x 16 product per warp and waits for it; wgmma issues a
// 64 x N x 16 product per warpgroup (4 warps) straight from shared memory, asynchronously.
//
// Kernels (blocks of 2 warpgroups, 256 threads, one block per SM; tiles stored with the 128-byte
// swizzle of wgmma_layout.h, loaded with cp.async by every thread, which fences them to the async
// proxy before the barrier that precedes the wgmma reading them):
//   fwd_wg<DH>  128 query rows (64 per warpgroup; query tiles in reverse order, the longest rows
//               first), key tiles of 128, K and V double-buffered. S = Q K^T (wgmma m64n128k16,
//               Q and K K-major from shared memory); online softmax; O += P V (wgmma m64nDHk16,
//               P from registers: S's accumulator layout is the A layout; V read MN-major, i.e.
//               wgmma's transpose). Pipelined inside each warpgroup: S_{j+1} is issued with
//               P_j V_j, and its softmax runs while P_j V_j is on the tensor cores.
//   bwd_wg<DH>  the whole backward: a block owns key tiles of 128 of one kv head (64 keys per
//               warpgroup) and visits, for every head of the group, the query tiles of 64 from
//               the diagonal down (Q, dO, lse, D through three stages): S^T = K Q^T and
//               dP^T = V dO^T, P^T and dS^T in registers, dV += P^T dO, dK += dS^T Q, and
//               dQ_i += dS K with dS^T handed over in shared memory; dQ's partial sums go to
//               fp32 buffers (bwd_wg_kernel says how that stays deterministic).
// No atomics race: bit-identical run to run.
//
// Speed (H200, docs/performance.md; B 8, S 2048, H 32 / 8, Dh 128): forward 0.783 ms (351
// TFLOP/s), backward 2.04 ms (338 TFLOP/s by FlashAttention's count of 2.5x the forward) in the
// tenth session, from 0.955 / 2.35 in the sixth, against 1.24 / 4.33 ms for the mma.sync kernels
// and 1.03 / 4.11 for the wgmma kernels of the fifth session (forward without the pipelining;
// separate dQ and dK / dV kernels, 7 products instead of 5, transposed copies of V, K, Q and dO).
// What they still lack against FlashAttention-3: producer warps with TMA, register reallocation
// (setmaxnreg), and the two warpgroups out of lockstep (in the backward they meet at two barriers
// an iteration, a fifth of its stalls). (A ping-pong forward without the first two ran slower:
// commit 067261b has it.)
#include "backends/cuda/flash_attention_wgmma.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "backends/cuda/attention_plan.h"
#include "backends/cuda/mma_platform.cuh"
#include "backends/cuda/flash_attention_kernels.h"
#include "backends/cuda/wgmma.cuh"

namespace moelab::cuda {
namespace {

namespace fl = moelab::flash;

template <int DH> struct FwdWg {
  static_assert(DH == 64 || DH == 128, "fwd_wg: head width 64 or 128");
  // 2 warpgroups x 64 query rows. (Measured on an H200, docs/performance.md: one warpgroup of
  // 64 rows per block with key tiles of 64 and Q in registers, 2 blocks per SM, ran at 2/3 of
  // this.)
  static constexpr int kThreads = 256, BR = 128, BC = 128;
  static constexpr int kQ = BR * DH * 2, kK = BC * DH * 2, kV = BC * DH * 2;  // bytes per tile
  static constexpr size_t kSmem = size_t(kQ) + 2 * size_t(kK + kV) + 1024;  // + 1024-byte alignment
};

// A tile of R rows x C columns (bf16) from global memory (row stride ld elements) into the
// swizzled layout at shared address `tile`, asynchronously; rows from `valid` on are zeros.
template <int R, int C, int NT>
__device__ __forceinline__ void load_tile(uint32_t tile, const uint16_t* src, int64_t ld, int valid, int tid) {
  wg::load_tile<R, C, NT>(tile, src, ld, valid, C, tid);  // every column is real
}

template <int N, int TB = 0>
__device__ __forceinline__ void mma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int accumulate) {
  if constexpr (N == 64) wg::mma_rs_n64<TB>(d, a, db, accumulate);
  else wg::mma_rs_n128<TB>(d, a, db, accumulate);
}

template <int N, int TA = 0, int TB = 0>
__device__ __forceinline__ void mma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int accumulate) {
  if constexpr (N == 32) wg::mma_ss_n32<TA, TB>(d, da, db, accumulate);
  else if constexpr (N == 64) wg::mma_ss_n64<TA, TB>(d, da, db, accumulate);
  else wg::mma_ss_n128<TA, TB>(d, da, db, accumulate);
}

// A 64 x K accumulator as bf16 A fragments of its K / 16 k steps (the layouts coincide).
template <int K> __device__ __forceinline__ void acc_to_frags(const float (&acc)[K / 2], uint32_t (&a)[K / 16][4]) {
#pragma unroll
  for (int i = 0; i < K / 16; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) a[i][r] = fl::fa_pack_bf16(acc[8 * i + 2 * r], acc[8 * i + 2 * r + 1]);
}

// Waits for every issued product of this warpgroup; tile j's stage is then in for all threads
// and every thread is done with the stage it overwrites next (the pipeline step of the kernels).
__device__ __forceinline__ void stage_ready() {
  fl::fa_cp_wait<0>();
  wg::fence_proxy_async();
  __syncthreads();
}

// Stores this thread's two rows (row0, row0 + 8; those < S) of a 64 x DH accumulator as bf16,
// row r scaled by scale[r]: dst + row * ld.
template <int DH>
__device__ __forceinline__ void store_rows(uint16_t* dst, int64_t ld, int row0, int S, const float (&acc)[DH / 2],
                                           const float (&scale)[2], int tq) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = row0 + 8 * hr;
    if (row >= S) continue;
#pragma unroll
    for (int db = 0; db < DH / 8; ++db)
      fl::fa_st32(dst + int64_t(row) * ld + 8 * db + 2 * tq,
                  fl::fa_pack_bf16(acc[4 * db + 2 * hr] * scale[hr], acc[4 * db + 2 * hr + 1] * scale[hr]));
  }
}

// One online-softmax step of a warpgroup's key tile in s (raw scores in, P = exp2(s - m) out):
// the row maxima m and partial sums l move on, alpha[hr] is the factor for O. MASKED: the tile
// crosses the warpgroup's diagonal or there are records; else no test at all.
template <bool MASKED, int BC>
__device__ __forceinline__ void fwd_softmax(float (&s)[BC / 2], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                            float scale_log2, int k0, int row0, int tq, int S, const int32_t* sg) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = row0 + 8 * hr;
    float mx = -INFINITY;
#pragma unroll
    for (int nb = 0; nb < BC / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float x = s[4 * nb + 2 * hr + e] * scale_log2;
        if constexpr (MASKED) {
          const int col = k0 + 8 * nb + 2 * tq + e;
          if (col > row || !fl::fa_seg_ok(sg, S, row, col)) x = -INFINITY;
        }
        s[4 * nb + 2 * hr + e] = x;
        mx = fmaxf(mx, x);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mn = fmaxf(m[hr], mx);
    const float ms = mn == -INFINITY ? 0.0f : mn;  // a row with nothing visible yet: no NaN
    alpha[hr] = exp2f(m[hr] - ms);
    m[hr] = mn;
    float sum = 0.0f;
#pragma unroll
    for (int nb = 0; nb < BC / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pe = exp2f(s[4 * nb + 2 * hr + e] - ms);
        s[4 * nb + 2 * hr + e] = pe;
        sum += pe;
      }
    l[hr] = l[hr] * alpha[hr] + sum;
  }
}

// The forward, software-pipelined inside each warpgroup (FlashAttention-3's intra-warpgroup
// overlap): while O += P_j V_j runs on the tensor cores, the warpgroup already has
// S_{j+1} = Q K_{j+1}^T and does its softmax; O is rescaled once P_j V_j is done. K and V tiles
// are double-buffered: at the top of iteration j, K_{j+1} and V_j are in, and K_{j+2} and V_{j+1}
// start loading into the stages of K_j and V_{j-1}. V is read MN-major (no transposed copy).
template <int DH>
__global__ void __launch_bounds__(256, 1) fwd_wg_kernel(fl::Params p) {
#if MOELAB_WGMMA_DEVICE
  using C = FwdWg<DH>;
  constexpr int BR = C::BR, BC = C::BC, NT = C::kThreads;
  extern __shared__ __align__(1024) char smem_raw[];
  const uint32_t sQ = (wg::smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t sK = sQ + C::kQ, sV = sK + 2 * C::kK;  // stage st at sK + st kK, sV + st kV
  const int tid = threadIdx.x, wgi = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, tq = lane & 3;
  const int S = p.S, H = p.H, bh = blockIdx.x;
  const int b = bh / H, h = bh - b * H, g = h / (H / p.Hkv);
  const int n_qt = (S + BR - 1) / BR, q0 = (n_qt - 1 - int(blockIdx.y)) * BR;
  const int64_t ldq = int64_t(H) * DH, ldk = int64_t(p.Hkv) * DH;
  const uint16_t* K = static_cast<const uint16_t*>(p.k) + int64_t(b) * S * ldk + g * DH;
  const uint16_t* V = static_cast<const uint16_t*>(p.v) + int64_t(b) * S * ldk + g * DH;
  const int32_t* sg = p.seg ? p.seg + int64_t(b) * S : nullptr;
  const int n_kt = (min(q0 + BR, S) - 1) / BC + 1;
  auto load_k = [&](int j) { load_tile<BC, DH, NT>(sK + (j & 1) * C::kK, K + int64_t(j) * BC * ldk, ldk, S - j * BC, tid); };
  auto load_v = [&](int j) { load_tile<BC, DH, NT>(sV + (j & 1) * C::kV, V + int64_t(j) * BC * ldk, ldk, S - j * BC, tid); };

  load_tile<BR, DH, NT>(sQ, static_cast<const uint16_t*>(p.q) + (int64_t(b) * S + q0) * ldq + h * DH, ldq,
                        S - q0, tid);
  load_k(0);
  load_v(0);
  if (n_kt > 1) load_k(1);
  fl::fa_cp_commit();

  const int w0 = q0 + 64 * wgi;                   // this warpgroup's rows
  const int row0 = w0 + 16 * warp + (lane >> 2);  // this thread's rows: + 0, + 8
  const bool live = w0 < S;                       // warpgroup-uniform: it has rows to compute
  const float scale_log2 = p.scale_log2;
  float o[DH / 2];
#pragma unroll
  for (int i = 0; i < DH / 2; ++i) o[i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, alpha[2];  // l: this thread's partial sums
  // Scores of tile j into s, then its softmax step. Every tile has keys visible to every live
  // warpgroup (its last is the diagonal one); a tile is masked where it crosses the diagonal.
  // Descriptors built once, moved by constant bytes (desc_plus): Q's rows of this warpgroup,
  // K stage 0 (K-major), V stage 0 (MN-major).
  const uint64_t dQ_a = wg::desc_sw128(sQ + 64 * wgi * 128), dK_b = wg::desc_sw128(sK);
  const uint64_t dV_mn = wg::desc_mn_sw128(sV, BC * 128);
  auto scores = [&](float (&s)[BC / 2], int j) {
    const uint32_t ko = uint32_t((j & 1) * C::kK);
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk) {
      mma_ss<BC>(s, wg::desc_plus(dQ_a, wg::k_step_bytes(BR, kk)), wg::desc_plus(dK_b, ko + wg::k_step_bytes(BC, kk)), kk > 0);
    }
    wg::commit();
  };
  auto softmax = [&](float (&s)[BC / 2], int j) {
    const int k0 = j * BC;
    if (sg || k0 + BC - 1 > w0) fwd_softmax<true, BC>(s, m, l, alpha, scale_log2, k0, row0, tq, S, sg);
    else fwd_softmax<false, BC>(s, m, l, alpha, scale_log2, k0, row0, tq, S, sg);
  };

  uint32_t a[BC / 16][4];  // P_j in bf16, as A fragments of the k steps of 16 keys
  stage_ready();
  if (live) {
    float s[BC / 2];
    scores(s, 0);
    wg::wait<0>();
    wg::fence_operands(s);
    softmax(s, 0);
    acc_to_frags<BC>(s, a);
  }
  auto pv = [&](int j) {  // O += P_j V_j, issued (V read MN-major)
    wg::fence_operands(o);
    wg::fence();
#pragma unroll
    for (int i = 0; i < BC / 16; ++i)
      mma_rs<DH, 1>(o, a[i], wg::desc_plus(dV_mn, uint32_t((j & 1) * C::kV) + wg::mn_step_bytes(i)), 1);
    wg::commit();
  };
  for (int j = 0; j + 1 < n_kt; ++j) {
    stage_ready();  // K_{j+1} and V_j are in; both warpgroups are done with iteration j - 1 (or S_0)
    if (j + 2 < n_kt) load_k(j + 2);
    load_v(j + 1);
    fl::fa_cp_commit();
    if (!live) continue;
    float s[BC / 2];
    scores(s, j + 1);
    pv(j);
    wg::wait<1>();  // S_{j+1} is done; P_j V_j may still run
    wg::fence_operands(s);
    softmax(s, j + 1);
    wg::wait<0>();
    wg::fence_operands(o);
    wg::fence_operands(a);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
#pragma unroll
      for (int db = 0; db < DH / 8; ++db) {
        o[4 * db + 2 * hr] *= alpha[hr];
        o[4 * db + 2 * hr + 1] *= alpha[hr];
      }
    acc_to_frags<BC>(s, a);
  }
  if (n_kt > 1) stage_ready();  // V of the last tile is in
  if (!live) return;
  pv(n_kt - 1);
  wg::wait<0>();
  wg::fence_operands(o);
  wg::fence_operands(a);

  float inv[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = row0 + 8 * hr;
    float lt = l[hr];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    inv[hr] = 1.0f / lt;
    if (tq == 0 && row < S) p.lse[int64_t(bh) * S + row] = (m[hr] + log2f(lt)) * fl::kLn2;
  }
  store_rows<DH>(static_cast<uint16_t*>(p.out) + int64_t(b) * S * ldq + h * DH, ldq, row0, S, o, inv, tq);
#endif
}

template <int DH> struct BwdWg {
  // 2 warpgroups x 64 keys of one kv head; query tiles of 64 rows, for every head of the group.
  // Each warpgroup computes DH / 2 columns of dQ. One block per SM at both widths (two at head
  // width 64 would cap the registers at 128: spills, and ptxas serialises the wgmma).
  static_assert(DH == 64 || DH == 128, "bwd_wg: head width 64 or 128");
  static constexpr int kThreads = 256, BC = 128, BR = 64, kStages = 3;  // Q / dO / lse / D stages
  static constexpr int kKV = BC * DH * 2, kT = BR * DH * 2, kS = BC * BR * 2;  // bytes: K or V; Q or dO; dS^T
  static_assert(BR == 64, "bwd_wg: dq_buffer_offset's query tiles are 64 rows");
  static constexpr int kDQ = BR * DH * 4;  // dQ's fp32 partial sums of a query tile, as dq_buffer_offset lays them out
  static constexpr size_t kSmem =
      2 * size_t(kKV) + kStages * 2 * size_t(kT) + size_t(kS) + kStages * 2 * BR * 4 + size_t(kDQ) + 1024;
};

// Which of the n_split blocks of a kv head runs key tile j: a snake over the splits (0 1 .. n-1
// n-1 .. 1 0 0 1 ..), so that the long tiles near the start and the short ones near the end
// spread evenly.
__device__ __forceinline__ int bwd_split_of(int j, int n_split) {
  const int r = j % n_split;
  return (j / n_split) % 2 == 0 ? r : n_split - 1 - r;
}

// The whole backward in one kernel: dK, dV and dQ from one S and dP per tile (FlashAttention-2's 5
// products; separate dQ and dK / dV kernels need 7, recomputing S and dP in each):
//   S^T = K Q^T, dP^T = V dO^T   2 x DH / 16 wgmma m64n64k16 (K, V, Q, dO K-major);
//   dV += P^T dO                 4 wgmma m64nDHk16, P^T from registers, dO read MN-major
//                                (wgmma's transpose) from the same tile: no transposed copies;
//   dS^T -> shared memory (bf16), then dK += dS^T Q (4 wgmma m64nDHk16, Q read MN-major) and
//   dQ_i = dS K: warpgroup w the columns DH/2 w .. + DH/2 - 1, 8 wgmma m64n(DH/2)k16 with dS^T
//                                and K both read MN-major.
// dQ's partial sums: each warp writes its 16 rows x DH / 2 columns to shared memory in the layout
// of the fp32 buffer (attention_plan.h, dq_buffer_offset), and its lane 0 sends them with one
// bulk copy (cp.reduce.async.bulk: the TMA unit adds them in L2; the first key tile's copy
// stores). With one red.add per element from every thread instead, F's backward took 1.14 ms
// where this takes 0.98 (H200, docs/performance.md, tenth session).
// Determinism without atomics racing: block (b g, split s) owns the key tiles j with
// bwd_split_of(j) = s and adds into its own buffer (split s); every element of a buffer is added
// to by one lane's copies, in the block's fixed order (key tiles ascending, then heads, then query
// tiles): a key tile visits each (head, query tile) once, and the lane waits for its previous key
// tile's copies to complete before it issues the next one's (at the first iteration, when the
// wait is long over). The block's first key tile is tile s (bwd_split_of): it stores instead of
// adding, so no buffer is cleared first, and rows before s BC of buffer s are never written (no
// key tile of block s reaches them). bwd_dq_finish_kernel sums the buffers in split order, buffer
// s from row s BC on. Grid: x = b Hkv + g, y = s. Q, dO, lse and D stream through kStages stages.
// P^T = exp2(S^T scale_log2 - lse2) of one warpgroup's 64 keys x 64 queries in place, then
// dS^T = P^T (dP^T - D) in dpT. MASKED: some score of the tile is causally masked, past S or
// of another record (the diagonal tiles, the last one, packed records); else no test at all.
template <bool MASKED, int BR>
__device__ __forceinline__ void bwd_probs(float (&sT)[BR / 2], float (&dpT)[BR / 2], const float* L, const float* D,
                                          float scale_log2, int q0, int krow, int tq, int S, const int32_t* sg) {
#pragma unroll
  for (int nb = 0; nb < BR / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int ql = 8 * nb + 2 * tq + e;
      const float l2 = L[ql] * fl::kLog2e, d = D[ql];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int i = 4 * nb + 2 * hr + e;
        float pe = exp2f(sT[i] * scale_log2 - l2);
        if constexpr (MASKED) {
          const int qc = q0 + ql, kr = krow + 8 * hr;
          if (qc < kr || qc >= S || !fl::fa_seg_ok(sg, S, qc, kr)) pe = 0.0f;
        }
        sT[i] = pe;
        dpT[i] = pe * (dpT[i] - d);
      }
    }
}

template <int DH>
__global__ void __launch_bounds__(256, 1) bwd_wg_kernel(fl::Params p, float* acc, int n_split) {
#if MOELAB_WGMMA_DEVICE
  using C = BwdWg<DH>;
  constexpr int BC = C::BC, BR = C::BR, NT = C::kThreads;
  extern __shared__ __align__(1024) char smem_raw[];
  char* const smem = smem_raw + (((wg::smem_addr(smem_raw) + 1023u) & ~1023u) - wg::smem_addr(smem_raw));
  const uint32_t sK = wg::smem_addr(smem), sV = sK + C::kKV, sT0 = sV + C::kKV;  // stage st: Q, dO
  const uint32_t sdS = sT0 + 2 * C::kStages * C::kT;                              // [BC keys][BR queries]
  float* sL = reinterpret_cast<float*>(smem + 2 * C::kKV + 2 * C::kStages * C::kT + C::kS);  // [stages][BR] lse
  float* sD = sL + C::kStages * BR;                                                // [stages][BR] D
  const uint32_t sDQ = wg::smem_addr(sD + C::kStages * BR);                        // [2 halves][BR][DH / 2]
  const int tid = threadIdx.x, wgi = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, tq = lane & 3;
  const int S = p.S, H = p.H, G = H / p.Hkv, bg = blockIdx.x, split = blockIdx.y;
  const int b = bg / p.Hkv, g = bg - b * p.Hkv;
  const int64_t ldq = int64_t(H) * DH, ldk = int64_t(p.Hkv) * DH;
  const uint16_t* Qb = static_cast<const uint16_t*>(p.q) + int64_t(b) * S * ldq;
  const uint16_t* dOb = static_cast<const uint16_t*>(p.dout) + int64_t(b) * S * ldq;
  const int64_t tile_elems = int64_t(BR) * DH;  // one (b, h, query tile) of the dQ buffer
  float* accb = acc + int64_t(split) * dq_buffer_elems(p.B, H, S, DH) + int64_t(b) * H * ((S + BR - 1) / BR) * tile_elems;
  constexpr int NS = C::kStages;
  const int32_t* sg = p.seg ? p.seg + int64_t(b) * S : nullptr;
  const int n_kt = (S + BC - 1) / BC, n_qt = (S + BR - 1) / BR;
  const float scale_log2 = p.scale_log2;

  // The operand descriptors, built once; each product moves them by constant bytes (desc_plus).
  // Stage st's Q / dO tiles are 2 st kT bytes on.
  const uint64_t dK_a = wg::desc_sw128(sK + 64 * wgi * 128), dV_a = wg::desc_sw128(sV + 64 * wgi * 128);
  const uint64_t dQ_b = wg::desc_sw128(sT0), dO_b = wg::desc_sw128(sT0 + C::kT);  // K-major, stage 0
  const uint64_t dO_mn = wg::desc_mn_sw128(sT0 + C::kT, BR * 128), dQ_mn = wg::desc_mn_sw128(sT0, BR * 128);
  const uint64_t dS_a = wg::desc_sw128(sdS + 64 * wgi * 128);  // dS^T rows of this warpgroup, K-major
  const uint64_t dS_mn = wg::desc_mn_sw128(sdS, BC * 128);     // dS^T read as dS (MN-major A)
  // K's columns DQN wgi .. + DQN - 1, MN-major B: panel wgi (DH 128), or half of the one panel.
  constexpr int DQN = DH / 2;
  const uint64_t dKp_mn = wg::desc_mn_sw128(sK + (DH == 128 ? wgi * BC * 128 : wgi * DQN * 2), BC * 128);
  const uint32_t myS = sdS + uint32_t(64 * wgi * 128);  // this warpgroup's 64 key rows of dS^T
  const uint32_t myDQ = sDQ + uint32_t((64 * wgi + 16 * warp) * DQN * 4);  // this warp's 16 rows of dQ

  for (int j = 0; j < n_kt; ++j) {
    if (bwd_split_of(j, n_split) != split) continue;
    const int key0 = j * BC, qt0 = key0 / BR, nq = n_qt - qt0, total = G * nq;
    // Iteration it: head h, query rows from r0 (query tile qt0 + it % nq), into stage st.
    auto issue = [&](int h, int r0, int st) {
      const uint32_t t = sT0 + 2 * st * C::kT;
      load_tile<BR, DH, NT>(t, Qb + int64_t(r0) * ldq + h * DH, ldq, S - r0, tid);
      load_tile<BR, DH, NT>(t + C::kT, dOb + int64_t(r0) * ldq + h * DH, ldq, S - r0, tid);
      if (tid < 2 * BR) {  // lse (threads 0..BR-1) and D (BR..2BR-1) of the tile's rows
        const int i = tid % BR, r = r0 + i;
        const float* src = (tid < BR ? p.lse : p.delta) + (int64_t(b) * H + h) * S + (r < S ? r : 0);
        fl::fa_cp_async4((tid < BR ? sL : sD) + st * BR + i, src, r < S);
      }
    };
    __syncthreads();  // the previous key tile's products are done with K, V and the stages
    const uint16_t* K = static_cast<const uint16_t*>(p.k) + (int64_t(b) * S + key0) * ldk + g * DH;
    const uint16_t* V = static_cast<const uint16_t*>(p.v) + (int64_t(b) * S + key0) * ldk + g * DH;
    load_tile<BC, DH, NT>(sK, K, ldk, S - key0, tid);
    load_tile<BC, DH, NT>(sV, V, ldk, S - key0, tid);
    // Iterations 0 and 1 into stages 0 and 1 (one commit group each; K and V join the first).
    int hp = g * G, qtp = qt0;  // the next iteration to prefetch: head, query tile
    for (int s0 = 0; s0 < NS - 1; ++s0) {
      if (s0 < total) issue(hp, qtp * BR, s0);
      fl::fa_cp_commit();
      if (++qtp == n_qt) qtp = qt0, ++hp;
    }
    const bool first = j == split;  // this block's first key tile: store, do not add

    const int kw0 = key0 + 64 * wgi;                // this warpgroup's first key
    const int krow = kw0 + 16 * warp + (lane >> 2);  // this thread's keys: + 0, + 8
    float dk[DH / 2], dv[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; ++i) dk[i] = dv[i] = 0.0f;

    int h = g * G, qt = qt0;  // iteration it's head and query tile
    for (int it = 0, st = 0; it < total; ++it, st = st + 1 == NS ? 0 : st + 1) {
      // Iteration it's stage is in (later prefetches may still run); every thread is done with
      // iteration it - 1, so its stage takes iteration it + NS - 1, and dS^T is free.
      fl::fa_cp_wait<NS - 2>();
      wg::fence_proxy_async();
      __syncthreads();
      if (it + NS - 1 < total) issue(hp, qtp * BR, st == 0 ? NS - 1 : st - 1);
      fl::fa_cp_commit();
      if (++qtp == n_qt) qtp = qt0, ++hp;
      const int q0 = qt * BR;
      const float* L = sL + st * BR;
      const float* D = sD + st * BR;
      const uint32_t so = uint32_t(2 * st * C::kT);  // stage offset of the Q / dO tiles

      if (kw0 < S && q0 + BR - 1 >= kw0) {  // warpgroup-uniform: some P_ij of its keys is nonzero
        float sT[BR / 2], dpT[BR / 2];
        wg::fence();
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk) {
          wg::mma_ss_n64(sT, wg::desc_plus(dK_a, wg::k_step_bytes(BC, kk)), wg::desc_plus(dQ_b, so + wg::k_step_bytes(BR, kk)),
                         kk > 0);
        }
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk) {
          wg::mma_ss_n64(dpT, wg::desc_plus(dV_a, wg::k_step_bytes(BC, kk)), wg::desc_plus(dO_b, so + wg::k_step_bytes(BR, kk)),
                         kk > 0);
        }
        wg::commit();
        wg::wait<0>();
        wg::fence_operands(sT);
        wg::fence_operands(dpT);

        if (sg || q0 < kw0 + 63 || q0 + BR > S)
          bwd_probs<true, BR>(sT, dpT, L, D, scale_log2, q0, krow, tq, S, sg);
        else
          bwd_probs<false, BR>(sT, dpT, L, D, scale_log2, q0, krow, tq, S, sg);
        uint32_t a[BR / 16][4];  // P^T in bf16, A fragments of the k steps of 16 queries
        acc_to_frags<BR>(sT, a);
        wg::fence_operands(dv);
        wg::fence();
#pragma unroll
        for (int i = 0; i < BR / 16; ++i) mma_rs<DH, 1>(dv, a[i], wg::desc_plus(dO_mn, so + wg::mn_step_bytes(i)), 1);
        wg::commit();  // dV runs while dS^T goes to shared memory

        // dS^T in bf16 into shared memory (row = key, 64 query columns, swizzled), where dK's
        // product and dQ's read it: no registers held for it while they run.
#pragma unroll
        for (int nb = 0; nb < BR / 8; ++nb)
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int row = 16 * warp + (lane >> 2) + 8 * hr;
            const uint32_t at = myS + wg::swizzled_chunk(row, nb, 64) + uint32_t(4 * tq);
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at),
                         "r"(fl::fa_pack_bf16(dpT[4 * nb + 2 * hr], dpT[4 * nb + 2 * hr + 1])));
          }
        wg::fence_proxy_async();
        // This warpgroup's dS^T rows are in (named barriers 1 and 2: one per warpgroup).
        if (wgi == 0) asm volatile("bar.sync 1, 128;\n" ::: "memory");
        else asm volatile("bar.sync 2, 128;\n" ::: "memory");
        wg::fence_operands(dk);
        wg::fence();
#pragma unroll
        for (int i = 0; i < BR / 16; ++i)
          mma_ss<DH, 0, 1>(dk, wg::desc_plus(dS_a, wg::k_step_bytes(BC, i)), wg::desc_plus(dQ_mn, so + wg::mn_step_bytes(i)), 1);
        wg::commit();
        wg::fence_operands(a);
      } else {  // every P_ij of this warpgroup's keys is 0: so are its rows of dS^T
        for (int i = tid & 127; i < 64 * 8; i += 128)
          asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(myS + uint32_t(16 * i)), "r"(0));
        wg::fence_proxy_async();
      }
      __syncthreads();  // dS^T of all 128 keys is in shared memory

      // dQ_i[:, DQN wgi .. + DQN - 1] = dS K: A = dS (queries x keys) is dS^T read MN-major, B =
      // the warpgroup's columns of K, read MN-major (rows along the keys).
      float dqp[DQN / 2];
      wg::fence();
#pragma unroll
      for (int kk = 0; kk < BC / 16; ++kk)
        mma_ss<DQN, 1, 1>(dqp, wg::desc_plus(dS_mn, wg::mn_step_bytes(kk)), wg::desc_plus(dKp_mn, wg::mn_step_bytes(kk)), kk > 0);
      wg::commit();
      wg::wait<0>();  // dQ, and this iteration's dV and dK
      wg::fence_operands(dqp);
      wg::fence_operands(dv);
      wg::fence_operands(dk);
      // Lane 0's copy of the previous iteration has read the warp's rows (and in the key tile's
      // first iteration, the previous key tile's copies are complete: they add to the same rows).
      if (lane == 0) {
        if (it == 0) wg::bulk_wait<0>();
        else wg::bulk_wait_read<0>();
      }
      __syncwarp();
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int r = (lane >> 2) + 8 * hr;
#pragma unroll
        for (int nb = 0; nb < DQN / 8; ++nb) {
          const int col = 8 * nb + 2 * tq, chunk = dq_swizzled_chunk(r, col >> 2);  // r = the tile row mod 16: the same swizzle
          asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(myDQ + uint32_t((r * DQN + 4 * chunk + (col & 3)) * 4)),
                       "f"(dqp[4 * nb + 2 * hr]), "f"(dqp[4 * nb + 2 * hr + 1])
                       : "memory");
        }
      }
      wg::fence_proxy_async();
      __syncwarp();
      if (lane == 0) {
        float* dst = accb + (int64_t(h) * n_qt + qt) * tile_elems + (64 * wgi + 16 * warp) * DQN;
        if (first) wg::bulk_store(dst, myDQ, 16 * DQN * 4);
        else wg::bulk_add_f32(dst, myDQ, 16 * DQN * 4);
        wg::bulk_commit();
      }
      if (++qt == n_qt) qt = qt0, ++h;
    }

    const float sk[2] = {p.scale, p.scale}, sv[2] = {1.0f, 1.0f};
    const int64_t kv = int64_t(b) * S * ldk + g * DH;
    store_rows<DH>(static_cast<uint16_t*>(p.dk) + kv, ldk, krow, S, dk, sk, tq);
    store_rows<DH>(static_cast<uint16_t*>(p.dv) + kv, ldk, krow, S, dv, sv, tq);
  }
  if (lane == 0) wg::bulk_wait<0>();  // the last copies are complete before the block exits
#endif
}

// dQ = bf16(scale sum_s acc[s]) over the n_split buffers of bwd_wg_kernel (dq_buffer_offset's
// layout, buffer_elems each), in split order, buffer s only from position s BC of each sequence on
// (bwd_wg_kernel writes nothing before). Four columns per thread (one 16-byte chunk of a buffer;
// consecutive threads along dq's rows); n = T H DH.
template <int DH>
__global__ void bwd_dq_finish_kernel(const float* acc, int n_split, int64_t buffer_elems, int64_t n, int H, int S,
                                     int bc, float scale, uint16_t* dq) {
  const int row4 = H * DH / 4;
  MOELAB_GRID_STRIDE(i4, n / 4) {
    const int64_t t = i4 / row4;
    const int j = int(i4 - t * row4), h = j / (DH / 4), d = 4 * (j % (DH / 4));
    const int pos = int(t % S);
    const int64_t off = dq_buffer_offset(t / S, h, pos, d, H, S, DH);
    float4 s = *reinterpret_cast<const float4*>(acc + off);
    const int n_valid = min(n_split, pos / bc + 1);
    for (int k = 1; k < n_valid; ++k) {
      const float4 x = *reinterpret_cast<const float4*>(acc + int64_t(k) * buffer_elems + off);
      s.x += x.x;
      s.y += x.y;
      s.z += x.z;
      s.w += x.w;
    }
    uint2 o;
    o.x = fl::fa_pack_bf16(s.x * scale, s.y * scale);
    o.y = fl::fa_pack_bf16(s.z * scale, s.w * scale);
    reinterpret_cast<uint2*>(dq)[i4] = o;
  }
}

}  // namespace

namespace {

enum FlashMode { Auto, Off, On };  // the values of CudaBackendOptions::Flash: Auto, MmaSync, Wgmma
constexpr int Wgmma = On;

// MOELAB_FLASH_WGMMA, read once: unset Auto, 1 On, 0 Off.
int env_flash_wgmma() {
  static const int env = [] {
    const char* e = std::getenv("MOELAB_FLASH_WGMMA");
    if (!e) return int(Auto);
    const std::string v = e;
    if (v == "1") return int(On);
    if (v == "0") return int(Off);
    throw Error("MOELAB_FLASH_WGMMA=" + v +
                ": expected 1 (the Hopper wgmma attention kernels everywhere, the one-kernel "
                "backward too where it would fill less than half the SMs) or 0 (the mma.sync "
                "kernels); unset, the wgmma kernels run on compute capability 9.0 with the "
                "backward chosen by attention_backward_plan");
  }();
  return env;
}

}  // namespace

namespace {

// wg::load_tile addresses a tile's chunks by 32-bit offsets: 128 rows of H Dh elements must fit.
void check_tile_offsets(const fl::Params& p, const char* what) {
  MOELAB_CHECK(int64_t(p.H) * p.Dh * 128 < (int64_t(1) << 31), what, ": H x head width = ", int64_t(p.H) * p.Dh,
               " is too wide for the kernels' 32-bit tile offsets (at most 2^24 - 1)");
}

}  // namespace

bool use_wgmma_attention(const Ctx& c) {
  const int mode = c.flash == Auto ? env_flash_wgmma() : c.flash;
  return mode != Off && c.compute_capability == 90;
}

void attention_forward_wgmma(Ctx& c, const fl::Params& p) {
  MOELAB_CHECK(p.Dh == 64 || p.Dh == 128, "attention (wgmma): head width ", p.Dh);
  check_tile_offsets(p, "attention (wgmma)");
  const int64_t BH = int64_t(p.B) * p.H;
  if (p.Dh == 64)
    launch_2d(c, "attention (wgmma)", fwd_wg_kernel<64>, BH, (p.S + FwdWg<64>::BR - 1) / FwdWg<64>::BR,
              FwdWg<64>::kThreads, FwdWg<64>::kSmem, p);
  else
    launch_2d(c, "attention (wgmma)", fwd_wg_kernel<128>, BH, (p.S + FwdWg<128>::BR - 1) / FwdWg<128>::BR,
              FwdWg<128>::kThreads, FwdWg<128>::kSmem, p);
}

namespace {

template <int DH> void run_backward(Ctx& c, const fl::Params& p, int64_t n_split) {
  using C = BwdWg<DH>;
  const int64_t BG = int64_t(p.B) * p.Hkv, n = int64_t(p.B) * p.S * p.H * p.Dh;
  const int64_t buffer_elems = dq_buffer_elems(p.B, p.H, p.S, DH);
  Buf<float> acc(c, n_split * buffer_elems);  // not cleared: see bwd_wg_kernel
  launch_2d(c, "attention (wgmma)", bwd_wg_kernel<DH>, BG, n_split, C::kThreads, C::kSmem, p, acc.get(),
            int(n_split));
  const int64_t blocks = std::min<int64_t>((n / 4 + 255) / 256, int64_t(c.sm_count) * 16);
  launch_2d(c, "attention (wgmma)", bwd_dq_finish_kernel<DH>, blocks, 1, 256, 0, static_cast<const float*>(acc.get()),
            int(n_split), buffer_elems, n, p.H, p.S, C::BC, p.scale, static_cast<uint16_t*>(p.dq));
}

}  // namespace

AttentionBackwardPlan wgmma_backward_plan(const Ctx& c, const fl::Params& p) {
  return attention_backward_plan(c.sm_count, p.B, p.Hkv, p.S, BwdWg<128>::BC, dq_buffer_elems(p.B, p.H, p.S, p.Dh),
                                 c.attention_scratch_bytes, c.flash == Wgmma || env_flash_wgmma() == On,
                                 c.attention_bwd_splits);
}

void attention_backward_wgmma(Ctx& c, const fl::Params& p, const AttentionBackwardPlan& plan) {
  MOELAB_CHECK(p.Dh == 64 || p.Dh == 128, "attention_backward_wgmma: head width ", p.Dh);
  check_tile_offsets(p, "attention_backward_wgmma");
  MOELAB_CHECK(plan.fused && plan.n_split >= 1, "attention_backward_wgmma: not planned for this call");
  if (p.Dh == 64) run_backward<64>(c, p, plan.n_split);
  else run_backward<128>(c, p, plan.n_split);
}

}  // namespace moelab::cuda
