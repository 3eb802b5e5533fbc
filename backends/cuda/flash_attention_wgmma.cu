// moelab CUDA backend: flash attention forward on Hopper's warpgroup MMA (wgmma, sm_90a).
//
// The contract is flash_attention_kernels.h's (causal, grouped-query, optional segments; out and
// the natural-log lse per query row), and so is the arithmetic: scores in base 2 (s * scale *
// log2 e), online softmax in fp32 registers, P rounded to bf16 for P V, fp32 accumulation. What
// changes is the tensor-core instruction: mma.sync issues a 16 x 8 x 16 product per warp and
// waits for it; wgmma issues a 64 x N x 16 product per warpgroup (4 warps) straight from shared
// memory, asynchronously, at the rate the Hopper tensor cores were built for.
//
// fwd_wg<DH> (DH 64 or 128): a block of 2 warpgroups owns 128 query rows (64 each) of one
// (batch, head); key tiles of 128 stream through a two-stage cp.async pipeline (all 256 threads
// load; the next tile's copy runs under this tile's math). Per tile and warpgroup:
//   S = Q K^T   DH / 16 wgmma m64n128k16, Q and K from shared memory;
//   softmax     causal and segment masks, running max and sum, O rescaled (registers);
//   O += P V    8 wgmma m64nDHk16, P from registers (the accumulator layout of S is the A layout),
//               V^T from shared memory.
// V^T: wgmma reads B K-major, i.e. V^T [DH][keys]; a pre-pass writes V^T per (batch, kv head),
// keys padded with zeros to a multiple of 128 (so no V tile load is ever partial). The tiles are
// stored with the 128-byte swizzle of wgmma.cuh; cp.async writes them through the generic proxy,
// so each thread fences them to the async proxy before the barrier that precedes the wgmma.
// Query tiles run in reverse order (the longest rows first). No atomics: bit-identical run to run.
#include "backends/cuda/flash_attention_wgmma.h"

#include <cuda_bf16.h>

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

template <int N> __device__ __forceinline__ void mma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db,
                                                        int accumulate) {
  if constexpr (N == 64) wg::mma_rs_n64(d, a, db, accumulate);
  else wg::mma_rs_n128(d, a, db, accumulate);
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
    fl::fa_cp_wait<0>();
    wg::fence_proxy_async();
    __syncthreads();  // tile j is in; both warpgroups are done with tile j - 1's stage
    if (j + 1 < n_kt) {
      load_tile<BC, DH, NT>(sK + (st ^ 1) * C::kK, K + int64_t(j + 1) * BC * ldk, ldk, S - (j + 1) * BC, tid);
      load_tile<DH, BC, NT>(sV + (st ^ 1) * C::kV, Vt + (j + 1) * BC, sp, DH, tid);
    }
    fl::fa_cp_commit();
    const int k0 = j * BC;
    if (w0 >= S || k0 > w_last) continue;  // warpgroup-uniform: nothing of this tile is visible

    float s[BC / 2];
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk)
      wg::mma_ss_n128(s, wg::desc_k(sQ, BR, 64 * wgi, kk), wg::desc_k(sK + st * C::kK, BC, 0, kk), kk > 0);
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
#pragma unroll
    for (int i = 0; i < BC / 16; ++i)
#pragma unroll
      for (int r = 0; r < 4; ++r) a[i][r] = fl::fa_pack_bf16(s[8 * i + 2 * r], s[8 * i + 2 * r + 1]);
    wg::fence_operands(o);
    wg::fence();
#pragma unroll
    for (int i = 0; i < BC / 16; ++i) mma_rs<DH>(o, a[i], wg::desc_k(sV + st * C::kV, DH, 0, i), 1);
    wg::commit();
    wg::wait<0>();
    wg::fence_operands(o);
  }

  uint16_t* O = static_cast<uint16_t*>(p.out) + int64_t(b) * S * ldq + h * DH;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = row0 + 8 * hr;
    float lt = l[hr];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    if (row >= S) continue;
    const float inv = 1.0f / lt;
    if (tq == 0) p.lse[int64_t(bh) * S + row] = (m[hr] + log2f(lt)) * fl::kLn2;
#pragma unroll
    for (int db = 0; db < DH / 8; ++db)
      fl::fa_st32(O + int64_t(row) * ldq + 8 * db + 2 * tq,
                  fl::fa_pack_bf16(o[4 * db + 2 * hr] * inv, o[4 * db + 2 * hr + 1] * inv));
  }
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
    fl::fa_cp_wait<0>();
    wg::fence_proxy_async();
    __syncthreads();
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
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk)
      wg::mma_ss_n64(s, wg::desc_k(sQ, BR, 64 * wgi, kk), wg::desc_k(sK + st * C::kK, BC, 0, kk), kk > 0);
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk)
      wg::mma_ss_n64(dp, wg::desc_k(sdO, BR, 64 * wgi, kk), wg::desc_k(sV + st * C::kK, BC, 0, kk), kk > 0);
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
#pragma unroll
    for (int i = 0; i < BC / 16; ++i)
#pragma unroll
      for (int r = 0; r < 4; ++r) a[i][r] = fl::fa_pack_bf16(s[8 * i + 2 * r], s[8 * i + 2 * r + 1]);
    wg::fence_operands(dq);
    wg::fence();
#pragma unroll
    for (int i = 0; i < BC / 16; ++i) mma_rs<DH>(dq, a[i], wg::desc_k(sKt + st * C::kK, DH, 0, i), 1);
    wg::commit();
    wg::wait<0>();
    wg::fence_operands(dq);
  }

  uint16_t* dQ = static_cast<uint16_t*>(p.dq) + int64_t(b) * S * ldq + h * DH;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = row0 + 8 * hr;
    if (row >= S) continue;
#pragma unroll
    for (int db = 0; db < DH / 8; ++db)
      fl::fa_st32(dQ + int64_t(row) * ldq + 8 * db + 2 * tq,
                  fl::fa_pack_bf16(dq[4 * db + 2 * hr] * p.scale, dq[4 * db + 2 * hr + 1] * p.scale));
  }
#endif
}

// vt[(b Hkv + g) DH + d][s] = v[b S + s][g DH + d] for s < S, 0 for S <= s < sp: 32 x 32 tiles
// through shared memory (both sides coalesced).
__global__ void transpose_kv_kernel(const uint16_t* v, uint16_t* vt, int S, int sp, int Hkv, int DH) {
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

int device_major_minor() {
  int dev = 0, major = 0, minor = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return 10 * major + minor;
}

}  // namespace

bool wgmma_attention_enabled() {
  static const bool allowed = [] {
    const char* e = std::getenv("MOELAB_FLASH_WGMMA");
    if (!e || std::string(e) == "1") return true;
    if (std::string(e) == "0") return false;
    throw Error(std::string("MOELAB_FLASH_WGMMA=") + e +
                ": expected 1 (the Hopper wgmma attention kernels where the device has them, the "
                "default) or 0 (the mma.sync kernels everywhere)");
  }();
  return allowed && device_major_minor() == 90;
}

namespace {

// x^T per (batch, kv head): [B Hkv][DH][sp] with keys padded by zeros to sp, a multiple of 128.
Buf<uint16_t> transposed_kv(Ctx& c, const fl::Params& p, const void* x, int sp) {
  const int64_t BG = int64_t(p.B) * p.Hkv, dh = p.Dh;
  MOELAB_CHECK(BG <= 65535, "attention (wgmma): batch x kv heads ", BG, " > 65535");
  Buf<uint16_t> t(c, BG * dh * sp);
  transpose_kv_kernel<<<dim3(unsigned(sp / 32), unsigned(dh / 32), unsigned(BG)), dim3(32, 8), 0, c.stream>>>(
      static_cast<const uint16_t*>(x), t.get(), p.S, sp, p.Hkv, int(dh));
  CUDA_CHECK_LAUNCH();
  return t;
}

// Runs kernel<<<(B H, query tiles of BR), NT, smem>>>(p, t, sp).
template <class Kern>
void launch_rows(Ctx& c, Kern kernel, const fl::Params& p, int BR, int NT, size_t smem, const uint16_t* t, int sp) {
  const int64_t BH = int64_t(p.B) * p.H;
  MOELAB_CHECK(BH <= INT32_MAX, "attention (wgmma): grid out of range");
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<dim3(unsigned(BH), unsigned((p.S + BR - 1) / BR)), NT, smem, c.stream>>>(p, t, sp);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void attention_forward_wgmma(Ctx& c, const fl::Params& p) {
  MOELAB_CHECK(p.Dh == 64 || p.Dh == 128, "attention_forward_wgmma: head width ", p.Dh);
  const int sp = (p.S + 127) / 128 * 128;  // a multiple of every key tile
  Buf<uint16_t> vt = transposed_kv(c, p, p.v, sp);
  if (p.Dh == 64) {
    using C = FwdWg<64>;
    launch_rows(c, fwd_wg_kernel<64>, p, C::BR, C::kThreads, C::kSmem, vt.get(), sp);
  } else {
    using C = FwdWg<128>;
    launch_rows(c, fwd_wg_kernel<128>, p, C::BR, C::kThreads, C::kSmem, vt.get(), sp);
  }
}

void attention_dq_wgmma(Ctx& c, const fl::Params& p) {
  MOELAB_CHECK(p.Dh == 64 || p.Dh == 128, "attention_dq_wgmma: head width ", p.Dh);
  const int sp = (p.S + 127) / 128 * 128;
  Buf<uint16_t> kt = transposed_kv(c, p, p.k, sp);
  if (p.Dh == 64) {
    using C = DqWg<64>;
    launch_rows(c, dq_wg_kernel<64>, p, C::BR, C::kThreads, C::kSmem, kt.get(), sp);
  } else {
    using C = DqWg<128>;
    launch_rows(c, dq_wg_kernel<128>, p, C::BR, C::kThreads, C::kSmem, kt.get(), sp);
  }
}

}  // namespace moelab::cuda
