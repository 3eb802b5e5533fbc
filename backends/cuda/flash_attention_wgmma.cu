// moelab CUDA backend: flash attention on Hopper's warpgroup MMA (wgmma, sm_90a).
//
// The contract is flash_attention_kernels.h's (causal, grouped-query, optional segments; out and
// the natural-log lse per query row; dQ, dK, dV from lse and D = rowsum(dO * O)), and so is the
// arithmetic: scores in base 2 (s * scale * log2 e), fp32 softmax and gradients in registers, P
// and dS rounded to bf16 for their products, fp32 accumulation. What changes is the tensor-core
// instruction: mma.sync issues a 16 x 8 x 16 product per warp and waits for it; wgmma issues a
// 64 x N x 16 product per warpgroup (4 warps) straight from shared memory, asynchronously.
//
// Kernels (blocks of 2 warpgroups, 256 threads, one block per SM; the tiles stream through a
// two-stage cp.async pipeline that every thread feeds; query tiles in reverse order, the longest
// rows first):
//   fwd_wg<DH>  128 query rows (64 per warpgroup), key tiles of 128: S = Q K^T (DH / 16 wgmma
//               m64n128k16, Q and K from shared memory); online softmax; O += P V (8 wgmma
//               m64nDHk16, P from registers: S's accumulator layout is the A layout).
//   dq_wg<DH>   128 query rows, key tiles of 64: S = Q K^T and dP = dO V^T, dS = P (dP - D) in
//               registers, dQ += dS K.
//   dkv_wg<DH>  128 keys of a kv head (64 per warpgroup), every head of the group, query tiles
//               of 64 from the diagonal down: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO (issued
//               before dS^T is computed, so that it runs under that math), dK += dS^T Q.
// wgmma reads B K-major, so the products whose B is V, K, Q or dO along the sequence read
// transposed copies ([B heads][DH][positions padded with zeros to a multiple of 128]) that a
// pre-pass writes per call. The tiles are stored with the 128-byte swizzle of wgmma.cuh; cp.async
// writes them through the generic proxy, so each thread fences them to the async proxy before
// the barrier that precedes the wgmma. No atomics: bit-identical run to run.
//
// Speed (H200, docs/performance.md, fifth session): the forward and dQ beat the mma.sync kernels
// at sequences of 2048 and 4096 (forward 1.24 -> 1.01 ms at B 8, S 2048, H 32 / 8, Dh 128) and
// lose at 512; dK / dV is slower than dkv2s_tc everywhere. wgmma_attention_plan picks from that.
// What they lack against FlashAttention-3: producer warps with TMA, register reallocation
// (setmaxnreg), and the two warpgroups ping-ponging. (A ping-pong forward without the first two,
// three stages handed over with mbarriers and turns taken with named barriers, ran slower than
// fwd_wg: commit 067261b has it.)
#include "backends/cuda/flash_attention_wgmma.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdlib>
#include <string>

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
  static constexpr int kQ = BR * DH * 2, kK = BC * DH * 2, kV = DH * BC * 2;  // bytes per tile
  static constexpr size_t kSmem = size_t(kQ) + 2 * size_t(kK + kV) + 1024;  // + 1024-byte alignment
};

// A tile of R rows x C columns (bf16) from global memory (row stride ld elements) into the
// swizzled layout at shared address `tile`, asynchronously; rows from `valid` on are zeros.
template <int R, int C, int NT>
__device__ __forceinline__ void load_tile(uint32_t tile, const uint16_t* src, int64_t ld, int valid, int tid) {
  constexpr int CC = C / 8;  // 16-byte chunks per row
  static_assert((R * CC) % NT == 0, "load_tile: chunks not a multiple of the threads");
#pragma unroll
  for (int i = tid; i < R * CC; i += NT) {
    const int r = i / CC, cc = i - r * CC;
    const bool ok = r < valid;
    const uint16_t* s = ok ? src + int64_t(r) * ld + cc * 8 : src;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(tile + wg::swizzled_chunk(r, cc, R)),
                 "l"(s), "r"(ok ? 16 : 0));
  }
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

// Issues d = A B^T over K = 16 KS columns (no wait): A is rows ra.. of the swizzled tile `ta`
// (RA rows), B the N rows of tile `tb` (RB rows from rb).
template <int N, int KS>
__device__ __forceinline__ void issue_ss(float (&d)[N / 2], uint32_t ta, int RA, int ra, uint32_t tb, int RB,
                                         int rb) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) mma_ss<N>(d, wg::desc_k(ta, RA, ra, kk), wg::desc_k(tb, RB, rb, kk), kk > 0);
}

// Issues d += A B with A the fragments `a` (K = 16 KS) and B^T the N rows of tile `tb` (no wait;
// a must stay untouched until the wait: fence_operands(a) after it).
template <int N, int KS>
__device__ __forceinline__ void issue_rs(float (&d)[N / 2], const uint32_t (&a)[KS][4], uint32_t tb) {
  wg::fence_operands(d);
  wg::fence();
#pragma unroll
  for (int i = 0; i < KS; ++i) mma_rs<N>(d, a[i], wg::desc_k(tb, N, 0, i), 1);
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

template <int DH>
__global__ void __launch_bounds__(256, 1) fwd_wg_kernel(fl::Params p, const uint16_t* vt, int sp) {
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
  const uint16_t* Vt = vt + (int64_t(b) * p.Hkv + g) * DH * sp;
  const int32_t* sg = p.seg ? p.seg + int64_t(b) * S : nullptr;
  const int n_kt = (min(q0 + BR, S) - 1) / BC + 1;

  load_tile<BR, DH, NT>(sQ, static_cast<const uint16_t*>(p.q) + (int64_t(b) * S + q0) * ldq + h * DH, ldq,
                        S - q0, tid);
  load_tile<BC, DH, NT>(sK, K, ldk, S, tid);
  load_tile<DH, BC, NT>(sV, Vt, sp, DH, tid);
  fl::fa_cp_commit();

  const int w0 = q0 + 64 * wgi, w_last = min(w0 + 63, S - 1);  // this warpgroup's rows
  const int row0 = w0 + 16 * warp + (lane >> 2);                 // this thread's rows: + 0, + 8
  float o[DH / 2];
#pragma unroll
  for (int i = 0; i < DH / 2; ++i) o[i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // l: this thread's partial sums

  for (int j = 0; j < n_kt; ++j) {
    const int st = j & 1;
    stage_ready();  // tile j is in; both warpgroups are done with tile j - 1's stage
    if (j + 1 < n_kt) {
      load_tile<BC, DH, NT>(sK + (st ^ 1) * C::kK, K + int64_t(j + 1) * BC * ldk, ldk, S - (j + 1) * BC, tid);
      load_tile<DH, BC, NT>(sV + (st ^ 1) * C::kV, Vt + (j + 1) * BC, sp, DH, tid);
    }
    fl::fa_cp_commit();
    const int k0 = j * BC;
    if (w0 >= S || k0 > w_last) continue;  // warpgroup-uniform: nothing of this tile is visible

    float s[BC / 2];
    wg::fence();
    issue_ss<BC, DH / 16>(s, sQ, BR, 64 * wgi, sK + st * C::kK, BC, 0);
    wg::commit();
    wg::wait<0>();
    wg::fence_operands(s);

    const bool mask = k0 + BC - 1 > w0;  // the tile crosses this warpgroup's diagonal
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int row = row0 + 8 * hr;
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < BC / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = s[4 * nb + 2 * hr + e] * p.scale_log2;
          const int col = k0 + 8 * nb + 2 * tq + e;
          if ((mask && col > row) || !fl::fa_seg_ok(sg, S, row, col)) x = -INFINITY;
          s[4 * nb + 2 * hr + e] = x;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mn = fmaxf(m[hr], mx);
      const float ms = mn == -INFINITY ? 0.0f : mn;  // a row with nothing visible yet: no NaN
      const float alpha = exp2f(m[hr] - ms);
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
      l[hr] = l[hr] * alpha + sum;
#pragma unroll
      for (int db = 0; db < DH / 8; ++db) {
        o[4 * db + 2 * hr] *= alpha;
        o[4 * db + 2 * hr + 1] *= alpha;
      }
    }
    uint32_t a[BC / 16][4];  // P in bf16, as A fragments of the k steps of 16 keys
    acc_to_frags<BC>(s, a);
    issue_rs<DH, BC / 16>(o, a, sV + st * C::kV);
    wg::commit();
    wg::wait<0>();
    wg::fence_operands(o);
    wg::fence_operands(a);
  }

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

template <int DH> struct DqWg {
  // 2 warpgroups x 64 query rows; key tiles of 64 (K and V^T tiles of 128 keys would not fit
  // beside Q and dO in shared memory).
  static_assert(DH == 64 || DH == 128, "dq_wg: head width 64 or 128");
  static constexpr int kThreads = 256, BR = 128, BC = 64;
  static constexpr int kQ = BR * DH * 2, kK = BC * DH * 2;  // bytes: Q or dO; K, V or K^T tile
  static constexpr size_t kSmem = 2 * size_t(kQ) + 2 * 3 * size_t(kK) + 1024;
};

// dQ = scale sum_j dS_ij K_j, dS = P (dP - D), P = exp2(s2 - lse2), dP = dO V^T: the math of
// dq2_tc (flash_attention_kernels.h), on wgmma. Per key tile and warpgroup: S = Q K^T and
// dP = dO V^T (2 x DH / 16 wgmma m64n64k16, both from shared memory), dS in registers, then
// dQ += dS K (4 wgmma m64nDHk16, dS from registers, K^T from shared memory: a pre-pass writes K^T
// as it does V^T for the forward).
template <int DH>
__global__ void __launch_bounds__(256, 1) dq_wg_kernel(fl::Params p, const uint16_t* kt, int sp) {
#if MOELAB_WGMMA_DEVICE
  using C = DqWg<DH>;
  constexpr int BR = C::BR, BC = C::BC, NT = C::kThreads;
  extern __shared__ __align__(1024) char smem_raw[];
  const uint32_t sQ = (wg::smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t sdO = sQ + C::kQ, sK = sdO + C::kQ, sV = sK + 2 * C::kK, sKt = sV + 2 * C::kK;
  const int tid = threadIdx.x, wgi = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, tq = lane & 3;
  const int S = p.S, H = p.H, bh = blockIdx.x;
  const int b = bh / H, h = bh - b * H, g = h / (H / p.Hkv);
  const int n_qt = (S + BR - 1) / BR, q0 = (n_qt - 1 - int(blockIdx.y)) * BR;
  const int64_t ldq = int64_t(H) * DH, ldk = int64_t(p.Hkv) * DH;
  const int64_t qoff = (int64_t(b) * S + q0) * ldq + h * DH;
  const uint16_t* K = static_cast<const uint16_t*>(p.k) + int64_t(b) * S * ldk + g * DH;
  const uint16_t* V = static_cast<const uint16_t*>(p.v) + int64_t(b) * S * ldk + g * DH;
  const uint16_t* Kt = kt + (int64_t(b) * p.Hkv + g) * DH * sp;
  const int32_t* sg = p.seg ? p.seg + int64_t(b) * S : nullptr;
  const int n_kt = (min(q0 + BR, S) - 1) / BC + 1;

  load_tile<BR, DH, NT>(sQ, static_cast<const uint16_t*>(p.q) + qoff, ldq, S - q0, tid);
  load_tile<BR, DH, NT>(sdO, static_cast<const uint16_t*>(p.dout) + qoff, ldq, S - q0, tid);
  load_tile<BC, DH, NT>(sK, K, ldk, S, tid);
  load_tile<BC, DH, NT>(sV, V, ldk, S, tid);
  load_tile<DH, BC, NT>(sKt, Kt, sp, DH, tid);
  fl::fa_cp_commit();

  const int w0 = q0 + 64 * wgi, w_last = min(w0 + 63, S - 1);
  const int row0 = w0 + 16 * warp + (lane >> 2);
  float lse2[2], dr[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = row0 + 8 * hr;
    lse2[hr] = row < S ? p.lse[int64_t(bh) * S + row] * fl::kLog2e : 0.0f;
    dr[hr] = row < S ? p.delta[int64_t(bh) * S + row] : 0.0f;
  }
  float dq[DH / 2];
#pragma unroll
  for (int i = 0; i < DH / 2; ++i) dq[i] = 0.0f;

  for (int j = 0; j < n_kt; ++j) {
    const int st = j & 1;
    stage_ready();
    if (j + 1 < n_kt) {
      const int64_t next = int64_t(j + 1) * BC;
      load_tile<BC, DH, NT>(sK + (st ^ 1) * C::kK, K + next * ldk, ldk, S - int(next), tid);
      load_tile<BC, DH, NT>(sV + (st ^ 1) * C::kK, V + next * ldk, ldk, S - int(next), tid);
      load_tile<DH, BC, NT>(sKt + (st ^ 1) * C::kK, Kt + next, sp, DH, tid);
    }
    fl::fa_cp_commit();
    const int k0 = j * BC;
    if (w0 >= S || k0 > w_last) continue;  // warpgroup-uniform

    float s[BC / 2], dp[BC / 2];
    wg::fence();
    issue_ss<BC, DH / 16>(s, sQ, BR, 64 * wgi, sK + st * C::kK, BC, 0);
    issue_ss<BC, DH / 16>(dp, sdO, BR, 64 * wgi, sV + st * C::kK, BC, 0);
    wg::commit();
    wg::wait<0>();
    wg::fence_operands(s);
    wg::fence_operands(dp);

    const bool mask = k0 + BC - 1 > w0 || w0 + 63 >= S;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int row = row0 + 8 * hr;
#pragma unroll
      for (int nb = 0; nb < BC / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = k0 + 8 * nb + 2 * tq + e, i = 4 * nb + 2 * hr + e;
          const bool off = (mask && (col > row || row >= S)) || !fl::fa_seg_ok(sg, S, row, col);
          const float pe = off ? 0.0f : exp2f(s[i] * p.scale_log2 - lse2[hr]);
          s[i] = pe * (dp[i] - dr[hr]);  // dS
        }
    }
    uint32_t a[BC / 16][4];  // dS in bf16, as A fragments of the k steps of 16 keys
    acc_to_frags<BC>(s, a);
    issue_rs<DH, BC / 16>(dq, a, sKt + st * C::kK);
    wg::commit();
    wg::wait<0>();
    wg::fence_operands(dq);
    wg::fence_operands(a);
  }

  const float sc[2] = {p.scale, p.scale};
  store_rows<DH>(static_cast<uint16_t*>(p.dq) + int64_t(b) * S * ldq + h * DH, ldq, row0, S, dq, sc, tq);
#endif
}

template <int DH> struct DkvWg {
  // 2 warpgroups x 64 keys of one kv head; query tiles of 64 rows, for every head of the group.
  static_assert(DH == 64 || DH == 128, "dkv_wg: head width 64 or 128");
  static constexpr int kThreads = 256, BC = 128, BR = 64;
  static constexpr int kKV = BC * DH * 2, kT = BR * DH * 2;  // bytes: K or V; one query-side tile
  static constexpr size_t kSmem = 2 * size_t(kKV) + 2 * 4 * size_t(kT) + 2 * 2 * BR * 4 + 1024;
};

// dV = sum_i P_ij dO_i, dK = scale sum_i dS_ij Q_i over the queries i of every head of the group:
// the math of dkv2s_tc (flash_attention_kernels.h), on wgmma, computing the transposed products
// directly. Grid: x = b Hkv + g, y = tile of 128 keys (tile 0, the most work, first); warpgroup w
// owns keys key0 + 64w .. + 63. Per (head, query tile from the diagonal down), double-buffered:
//   S^T = K Q^T, dP^T = V dO^T   2 x DH / 16 wgmma m64n64k16, K / V and Q / dO from shared memory;
//   P^T, then dV += P^T dO       4 wgmma m64nDHk16, P^T from registers, dO^T from shared memory,
//                                issued before dS^T is computed (it runs under that math);
//   dS^T = P^T (dP^T - D), then dK += dS^T Q   the same with Q^T.
// Q^T and dO^T come from a pre-pass ([B H][DH][queries padded to 128], like V^T and K^T).
template <int DH>
__global__ void __launch_bounds__(256, 1) dkv_wg_kernel(fl::Params p, const uint16_t* qt, const uint16_t* dot,
                                                        int sp) {
#if MOELAB_WGMMA_DEVICE
  using C = DkvWg<DH>;
  constexpr int BC = C::BC, BR = C::BR, NT = C::kThreads;
  extern __shared__ __align__(1024) char smem_raw[];
  char* const smem = smem_raw + (((wg::smem_addr(smem_raw) + 1023u) & ~1023u) - wg::smem_addr(smem_raw));
  const uint32_t sK = wg::smem_addr(smem), sV = sK + C::kKV;
  const uint32_t sT0 = sV + C::kKV;  // stage st: Q, dO, Q^T, dO^T at sT0 + (4 st + i) kT
  float* sL = reinterpret_cast<float*>(smem + 2 * C::kKV + 8 * C::kT);  // [2][BR] lse
  float* sD = sL + 2 * BR;                                               // [2][BR] D
  const int tid = threadIdx.x, wgi = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, tq = lane & 3;
  const int S = p.S, H = p.H, G = H / p.Hkv, bg = blockIdx.x;
  const int b = bg / p.Hkv, g = bg - b * p.Hkv, key0 = int(blockIdx.y) * BC;
  const int64_t ldq = int64_t(H) * DH, ldk = int64_t(p.Hkv) * DH;
  const uint16_t* Qb = static_cast<const uint16_t*>(p.q) + int64_t(b) * S * ldq;
  const uint16_t* dOb = static_cast<const uint16_t*>(p.dout) + int64_t(b) * S * ldq;
  const int32_t* sg = p.seg ? p.seg + int64_t(b) * S : nullptr;
  const int qt0 = key0 / BR, nq = (S + BR - 1) / BR - qt0, total = G * nq;

  // Iteration it: head g G + it / nq, query rows from (qt0 + it % nq) BR, into stage st.
  auto issue = [&](int it, int st) {
    const int h = g * G + it / nq, r0 = (qt0 + it % nq) * BR;
    const uint32_t t = sT0 + 4 * st * C::kT;
    load_tile<BR, DH, NT>(t, Qb + int64_t(r0) * ldq + h * DH, ldq, S - r0, tid);
    load_tile<BR, DH, NT>(t + C::kT, dOb + int64_t(r0) * ldq + h * DH, ldq, S - r0, tid);
    const int64_t tr = (int64_t(b) * H + h) * DH * sp + r0;
    load_tile<DH, BR, NT>(t + 2 * C::kT, qt + tr, sp, DH, tid);
    load_tile<DH, BR, NT>(t + 3 * C::kT, dot + tr, sp, DH, tid);
    if (tid < 2 * BR) {  // lse (threads 0..BR-1) and D (BR..2BR-1) of the tile's rows
      const int i = tid % BR, r = r0 + i;
      const float* src = (tid < BR ? p.lse : p.delta) + (int64_t(b) * H + h) * S + (r < S ? r : 0);
      fl::fa_cp_async4((tid < BR ? sL : sD) + st * BR + i, src, r < S);
    }
  };
  const uint16_t* K = static_cast<const uint16_t*>(p.k) + (int64_t(b) * S + key0) * ldk + g * DH;
  const uint16_t* V = static_cast<const uint16_t*>(p.v) + (int64_t(b) * S + key0) * ldk + g * DH;
  load_tile<BC, DH, NT>(sK, K, ldk, S - key0, tid);
  load_tile<BC, DH, NT>(sV, V, ldk, S - key0, tid);
  issue(0, 0);
  fl::fa_cp_commit();

  const int kw0 = key0 + 64 * wgi;                // this warpgroup's first key
  const int krow = kw0 + 16 * warp + (lane >> 2);  // this thread's keys: + 0, + 8
  float dk[DH / 2], dv[DH / 2];
#pragma unroll
  for (int i = 0; i < DH / 2; ++i) dk[i] = dv[i] = 0.0f;

  for (int it = 0; it < total; ++it) {
    const int st = it & 1;
    stage_ready();
    if (it + 1 < total) issue(it + 1, st ^ 1);
    fl::fa_cp_commit();
    const int q0 = (qt0 + it % nq) * BR;
    if (kw0 >= S || q0 + BR - 1 < kw0) continue;  // warpgroup-uniform: every P_ij is 0
    const uint32_t tQ = sT0 + 4 * st * C::kT, tdO = tQ + C::kT, tQt = tQ + 2 * C::kT, tdOt = tQ + 3 * C::kT;
    const float* L = sL + st * BR;
    const float* D = sD + st * BR;

    float sT[BR / 2], dpT[BR / 2];
    wg::fence();
    issue_ss<BR, DH / 16>(sT, sK, BC, 64 * wgi, tQ, BR, 0);
    issue_ss<BR, DH / 16>(dpT, sV, BC, 64 * wgi, tdO, BR, 0);
    wg::commit();
    wg::wait<0>();
    wg::fence_operands(sT);
    wg::fence_operands(dpT);

    const bool mask = q0 < kw0 + 63 || q0 + BR > S;
#pragma unroll
    for (int nb = 0; nb < BR / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int ql = 8 * nb + 2 * tq + e, qc = q0 + ql;
        const float l2 = L[ql] * fl::kLog2e;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int kr = krow + 8 * hr, i = 4 * nb + 2 * hr + e;
          const bool off = (mask && (qc < kr || qc >= S)) || !fl::fa_seg_ok(sg, S, qc, kr);
          sT[i] = off ? 0.0f : exp2f(sT[i] * p.scale_log2 - l2);  // P^T
        }
      }
    uint32_t a[BR / 16][4];  // P^T in bf16, A fragments of the k steps of 16 queries
    acc_to_frags<BR>(sT, a);
    issue_rs<DH, BR / 16>(dv, a, tdOt);
    wg::commit();  // dV runs while dS^T is computed

#pragma unroll
    for (int nb = 0; nb < BR / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float dq = D[8 * nb + 2 * tq + e];
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int i = 4 * nb + 2 * hr + e;
          dpT[i] = sT[i] * (dpT[i] - dq);  // dS^T
        }
      }
    uint32_t ads[BR / 16][4];  // dS^T (a still feeds the running dV product)
    acc_to_frags<BR>(dpT, ads);
    issue_rs<DH, BR / 16>(dk, ads, tQt);
    wg::commit();
    wg::wait<0>();
    wg::fence_operands(dv);
    wg::fence_operands(dk);
    wg::fence_operands(a);
    wg::fence_operands(ads);
  }

  const float sk[2] = {p.scale, p.scale}, sv[2] = {1.0f, 1.0f};
  const int64_t kv = int64_t(b) * S * ldk + g * DH;
  store_rows<DH>(static_cast<uint16_t*>(p.dk) + kv, ldk, krow, S, dk, sk, tq);
  store_rows<DH>(static_cast<uint16_t*>(p.dv) + kv, ldk, krow, S, dv, sv, tq);
#endif
}

template <int DH> struct BwdWg {
  // 2 warpgroups x 64 keys of one kv head; query tiles of 64 rows, for every head of the group.
  // Each warpgroup computes DH / 2 columns of dQ. (Two blocks per SM at head width 64 would cap
  // the registers at 128: spills, and ptxas serialises the wgmma.)
  static_assert(DH == 64 || DH == 128, "bwd_wg: head width 64 or 128");
  static constexpr int kThreads = 256, BC = 128, BR = 64, kStages = 3;  // Q / dO / lse / D stages
  static constexpr int kBlocksPerSm = 1;
  static constexpr int kKV = BC * DH * 2, kT = BR * DH * 2, kS = BC * BR * 2;  // bytes: K or V; Q or dO; dS^T
  static constexpr size_t kSmem =
      2 * size_t(kKV) + kStages * 2 * size_t(kT) + size_t(kS) + kStages * 2 * BR * 4 + 1024;
};

// Which of the n_split blocks of a kv head runs key tile j: a snake over the splits (0 1 .. n-1
// n-1 .. 1 0 0 1 ..), so that the long tiles near the start and the short ones near the end
// spread evenly.
__device__ __forceinline__ int bwd_split_of(int j, int n_split) {
  const int r = j % n_split;
  return (j / n_split) % 2 == 0 ? r : n_split - 1 - r;
}

// The whole backward in one kernel: dK and dV as dkv_wg computes them, and dQ from the same dS,
// without recomputing S and dP (FlashAttention-2's 5 products instead of the 7 of dq_wg + dkv):
//   S^T = K Q^T, dP^T = V dO^T   2 x DH / 16 wgmma m64n64k16 (K, V, Q, dO K-major);
//   dV += P^T dO, dK += dS^T Q   4 wgmma m64nDHk16 each, P^T / dS^T from registers, dO and Q
//                                read MN-major (wgmma's transpose) from the same tiles: no
//                                transposed copies;
//   dS^T -> shared memory (bf16), then dQ_i = dS K: warpgroup w the columns 64w .. 64w + 63,
//                                8 wgmma m64n64k16 with dS^T and K both read MN-major.
// Determinism without atomics racing: block (b g, split s) owns the key tiles j with
// bwd_split_of(j) = s and adds its dQ partials into its own fp32 buffer acc + s T H DH with
// red.add; every element of a buffer is added to by one thread, in the block's fixed order
// (key tiles ascending, then heads, then query tiles), and a fence after each key tile orders
// those adds. The block's first key tile is tile s (bwd_split_of): it stores instead of adding,
// so no buffer is cleared first, and rows before s BC of buffer s are never written (no key tile
// of block s reaches them). bwd_dq_finish_kernel sums the buffers in split order, buffer s from
// row s BC on. Grid: x = b Hkv + g, y = s. Q, dO, lse and D stream through kStages stages.
// A descriptor moved by `bytes` (a multiple of 16 that keeps the start address inside shared
// memory): only the start-address field of the low word changes, so one 32-bit add.
__device__ __forceinline__ uint64_t desc_plus(uint64_t d, uint32_t bytes) {
  return (d & 0xFFFFFFFF00000000ull) | uint32_t(uint32_t(d) + (bytes >> 4));
}

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
__global__ void __launch_bounds__(256, BwdWg<DH>::kBlocksPerSm) bwd_wg_kernel(fl::Params p, float* acc, int n_split) {
#if MOELAB_WGMMA_DEVICE
  using C = BwdWg<DH>;
  constexpr int BC = C::BC, BR = C::BR, NT = C::kThreads;
  extern __shared__ __align__(1024) char smem_raw[];
  char* const smem = smem_raw + (((wg::smem_addr(smem_raw) + 1023u) & ~1023u) - wg::smem_addr(smem_raw));
  const uint32_t sK = wg::smem_addr(smem), sV = sK + C::kKV, sT0 = sV + C::kKV;  // stage st: Q, dO
  const uint32_t sdS = sT0 + 2 * C::kStages * C::kT;                              // [BC keys][BR queries]
  float* sL = reinterpret_cast<float*>(smem + 2 * C::kKV + 2 * C::kStages * C::kT + C::kS);  // [stages][BR] lse
  float* sD = sL + C::kStages * BR;                                                // [stages][BR] D
  const int tid = threadIdx.x, wgi = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, tq = lane & 3;
  const int S = p.S, H = p.H, G = H / p.Hkv, bg = blockIdx.x, split = blockIdx.y;
  const int b = bg / p.Hkv, g = bg - b * p.Hkv;
  const int64_t ldq = int64_t(H) * DH, ldk = int64_t(p.Hkv) * DH;
  const uint16_t* Qb = static_cast<const uint16_t*>(p.q) + int64_t(b) * S * ldq;
  const uint16_t* dOb = static_cast<const uint16_t*>(p.dout) + int64_t(b) * S * ldq;
  float* accb = acc + int64_t(split) * p.B * S * ldq + int64_t(b) * S * ldq;
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
          const uint32_t ko = uint32_t((kk >> 2) * 1024 * (BC / 8) + (kk & 3) * 32);  // A: K / V, BC rows
          const uint32_t qo = so + uint32_t((kk >> 2) * 1024 * (BR / 8) + (kk & 3) * 32);  // B: Q / dO, BR rows
          wg::mma_ss_n64(sT, desc_plus(dK_a, ko), desc_plus(dQ_b, qo), kk > 0);
        }
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk) {
          const uint32_t ko = uint32_t((kk >> 2) * 1024 * (BC / 8) + (kk & 3) * 32);
          const uint32_t qo = so + uint32_t((kk >> 2) * 1024 * (BR / 8) + (kk & 3) * 32);
          wg::mma_ss_n64(dpT, desc_plus(dV_a, ko), desc_plus(dO_b, qo), kk > 0);
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
        for (int i = 0; i < BR / 16; ++i) mma_rs<DH, 1>(dv, a[i], desc_plus(dO_mn, so + uint32_t(i * 2048)), 1);
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
          mma_ss<DH, 0, 1>(dk, desc_plus(dS_a, uint32_t(i * 32)), desc_plus(dQ_mn, so + uint32_t(i * 2048)), 1);
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
        mma_ss<DQN, 1, 1>(dqp, desc_plus(dS_mn, uint32_t(kk * 2048)), desc_plus(dKp_mn, uint32_t(kk * 2048)), kk > 0);
      wg::commit();
      wg::wait<0>();  // dQ, and this iteration's dV and dK
      wg::fence_operands(dqp);
      wg::fence_operands(dv);
      wg::fence_operands(dk);
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int q = q0 + 16 * warp + (lane >> 2) + 8 * hr;
        if (q >= S) continue;
        float* dst = accb + int64_t(q) * ldq + h * DH + DQN * wgi + 2 * tq;
        if (first) {
#pragma unroll
          for (int nb = 0; nb < DQN / 8; ++nb)
            *reinterpret_cast<float2*>(dst + 8 * nb) = make_float2(dqp[4 * nb + 2 * hr], dqp[4 * nb + 2 * hr + 1]);
        } else {
#pragma unroll
          for (int nb = 0; nb < DQN / 8; ++nb)  // red: no value comes back, nothing to wait for
            asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst + 8 * nb), "f"(dqp[4 * nb + 2 * hr]),
                         "f"(dqp[4 * nb + 2 * hr + 1])
                         : "memory");
        }
      }
      if (++qt == n_qt) qt = qt0, ++h;
    }
    __threadfence();  // this key tile's adds before the next one's (the same addresses)

    const float sk[2] = {p.scale, p.scale}, sv[2] = {1.0f, 1.0f};
    const int64_t kv = int64_t(b) * S * ldk + g * DH;
    store_rows<DH>(static_cast<uint16_t*>(p.dk) + kv, ldk, krow, S, dk, sk, tq);
    store_rows<DH>(static_cast<uint16_t*>(p.dv) + kv, ldk, krow, S, dv, sv, tq);
  }
#endif
}

// dQ = bf16(scale sum_s acc[s]) over the n_split buffers of bwd_wg_kernel, in split order,
// buffer s only from position s BC of each sequence on (bwd_wg_kernel writes nothing before);
// n is T H DH, ld = H DH, both multiples of 4.
__global__ void bwd_dq_finish_kernel(const float* acc, int n_split, int64_t n, int64_t ld, int S, int bc,
                                     float scale, uint16_t* dq) {
  MOELAB_GRID_STRIDE(i4, n / 4) {
    float4 s = reinterpret_cast<const float4*>(acc)[i4];
    const int pos = int((i4 * 4 / ld) % S), n_valid = min(n_split, pos / bc + 1);
    for (int k = 1; k < n_valid; ++k) {
      const float4 x = reinterpret_cast<const float4*>(acc + int64_t(k) * n)[i4];
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

// xt[(b nh + g) DH + d][s] = x[b S + s][g DH + d] for s < S, 0 for S <= s < sp (x has nh heads of
// width DH per row): 32 x 32 tiles through shared memory (both sides coalesced).
__global__ void transpose_heads_kernel(const uint16_t* v, uint16_t* vt, int S, int sp, int Hkv, int DH) {
  __shared__ uint16_t t[32][34];
  const int bg = blockIdx.z, b = bg / Hkv, g = bg - b * Hkv;
  const int s0 = blockIdx.x * 32, d0 = blockIdx.y * 32, tx = threadIdx.x, ty = threadIdx.y;
  const int64_t ld = int64_t(Hkv) * DH;
  for (int i = ty; i < 32; i += 8) {
    const int s = s0 + i;
    t[i][tx] = s < S ? v[(int64_t(b) * S + s) * ld + int64_t(g) * DH + d0 + tx] : uint16_t(0);
  }
  __syncthreads();
  for (int i = ty; i < 32; i += 8) {
    const int s = s0 + tx;
    if (s < sp) vt[(int64_t(bg) * DH + d0 + i) * sp + s] = t[tx][i];
  }
}

}  // namespace

WgmmaPlan wgmma_attention_plan(const Ctx& c, int64_t S, int64_t Dh) {
  enum Mode { Auto, Off, All, Split };  // Auto, Off, All: the values of CudaBackendOptions::Flash
  static const int env = [] {
    const char* e = std::getenv("MOELAB_FLASH_WGMMA");
    if (!e) return int(Auto);
    const std::string v = e;
    if (v == "1") return int(Auto);
    if (v == "0") return int(Off);
    if (v == "all") return int(All);
    if (v == "split") return int(Split);
    throw Error("MOELAB_FLASH_WGMMA=" + v +
                ": expected 1 (the Hopper wgmma attention kernels where they measured faster, the "
                "default), all (every pass at every length), split (the separate dQ and dK / dV "
                "kernels instead of the one-kernel backward) or 0 (the mma.sync kernels only)");
  }();
  const int mode = c.flash == Auto ? env : c.flash;
  WgmmaPlan plan;
  if (mode == Off || c.compute_capability != 90) return plan;
  const bool here = mode == All || S >= 1024;
  plan.forward = plan.dq = here;
  plan.fused = (Dh == 64 || Dh == 128) && mode != Split;
  plan.dkv = mode == All && !plan.fused;
  return plan;
}

namespace {

// x^T per (batch, head) of x [T, nh DH]: [B nh][DH][sp], positions padded by zeros to sp, a
// multiple of 128.
Buf<uint16_t> transposed_heads(Ctx& c, const fl::Params& p, const void* x, int nh, int sp) {
  const int64_t BG = int64_t(p.B) * nh, dh = p.Dh;
  MOELAB_CHECK(BG <= 65535, "attention (wgmma): batch x heads ", BG, " > 65535");
  Buf<uint16_t> t(c, BG * dh * sp);
  transpose_heads_kernel<<<dim3(unsigned(sp / 32), unsigned(dh / 32), unsigned(BG)), dim3(32, 8), 0, c.stream>>>(
      static_cast<const uint16_t*>(x), t.get(), p.S, sp, nh, int(dh));
  CUDA_CHECK_LAUNCH();
  return t;
}

// Runs the query-row kernel of head width p.Dh (Cfg<DH>: BR rows of kThreads threads, kSmem
// bytes) with x^T, the transposed operand it reads from shared memory.
template <template <int> class Cfg, class K64, class K128>
void run_rows(Ctx& c, const fl::Params& p, const void* x, K64 kernel64, K128 kernel128) {
  MOELAB_CHECK(p.Dh == 64 || p.Dh == 128, "attention (wgmma): head width ", p.Dh);
  const int sp = (p.S + 127) / 128 * 128;  // a multiple of every key tile
  Buf<uint16_t> t = transposed_heads(c, p, x, p.Hkv, sp);
  const int64_t BH = int64_t(p.B) * p.H;
  if (p.Dh == 64)
    launch_2d(c, "attention (wgmma)", kernel64, BH, (p.S + Cfg<64>::BR - 1) / Cfg<64>::BR, Cfg<64>::kThreads,
              Cfg<64>::kSmem, p, t.get(), sp);
  else
    launch_2d(c, "attention (wgmma)", kernel128, BH, (p.S + Cfg<128>::BR - 1) / Cfg<128>::BR, Cfg<128>::kThreads,
              Cfg<128>::kSmem, p, t.get(), sp);
}

}  // namespace

void attention_forward_wgmma(Ctx& c, const fl::Params& p) {
  run_rows<FwdWg>(c, p, p.v, fwd_wg_kernel<64>, fwd_wg_kernel<128>);
}

void attention_dq_wgmma(Ctx& c, const fl::Params& p) {
  run_rows<DqWg>(c, p, p.k, dq_wg_kernel<64>, dq_wg_kernel<128>);
}

template <int DH> void run_backward(Ctx& c, const fl::Params& p) {
  using C = BwdWg<DH>;
  const int64_t BG = int64_t(p.B) * p.Hkv, n_kt = (p.S + C::BC - 1) / C::BC;
  // Blocks per kv head: about one wave of the device's SMs in all (the dQ buffers cost n_split
  // fp32 copies of dQ and one pass to sum them).
  const int64_t slots = int64_t(c.sm_count) * C::kBlocksPerSm;
  const int64_t want = c.attention_bwd_splits > 0 ? c.attention_bwd_splits : (slots + BG / 2) / BG;
  const int64_t n_split = std::max<int64_t>(1, std::min<int64_t>(n_kt, want));
  const int64_t n = int64_t(p.B) * p.S * p.H * p.Dh;
  Buf<float> acc(c, n_split * n);  // not cleared: see bwd_wg_kernel
  launch_2d(c, "attention (wgmma)", bwd_wg_kernel<DH>, BG, n_split, C::kThreads, C::kSmem, p, acc.get(),
            int(n_split));
  const int64_t blocks = std::min<int64_t>((n / 4 + 255) / 256, int64_t(c.sm_count) * 16);
  launch_2d(c, "attention (wgmma)", bwd_dq_finish_kernel, blocks, 1, 256, 0, static_cast<const float*>(acc.get()),
            int(n_split), n, int64_t(p.H) * p.Dh, p.S, C::BC, p.scale, static_cast<uint16_t*>(p.dq));
}

void attention_backward_wgmma(Ctx& c, const fl::Params& p) {
  MOELAB_CHECK(p.Dh == 64 || p.Dh == 128, "attention_backward_wgmma: head width ", p.Dh);
  if (p.Dh == 64) run_backward<64>(c, p);
  else run_backward<128>(c, p);
}

void attention_dkv_wgmma(Ctx& c, const fl::Params& p) {
  MOELAB_CHECK(p.Dh == 64 || p.Dh == 128, "attention_dkv_wgmma: head width ", p.Dh);
  const int sp = (p.S + 127) / 128 * 128;
  const int64_t BG = int64_t(p.B) * p.Hkv;
  Buf<uint16_t> qt = transposed_heads(c, p, p.q, p.H, sp), dot = transposed_heads(c, p, p.dout, p.H, sp);
  if (p.Dh == 64)
    launch_2d(c, "attention (wgmma)", dkv_wg_kernel<64>, BG, sp / DkvWg<64>::BC, DkvWg<64>::kThreads,
              DkvWg<64>::kSmem, p, qt.get(), dot.get(), sp);
  else
    launch_2d(c, "attention (wgmma)", dkv_wg_kernel<128>, BG, sp / DkvWg<128>::BC, DkvWg<128>::kThreads,
              DkvWg<128>::kSmem, p, qt.get(), dot.get(), sp);
}

}  // namespace moelab::cuda
