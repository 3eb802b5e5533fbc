// moelab CUDA backend: the grouped expert GEMM on Hopper's warpgroup MMA (wgmma, sm_90a) with TMA
// loads, the per-expert row offsets read from device memory (GroupedGemmImpl::Wgmma).
//
// Semantics and tile order are those of the mma.sync kernel (grouped_gemm_kernels.h): forward and
// dgrad run (floor(R / BM) + E) slots x n-tiles in gg_raster's order, each block finding its
// expert on the device (surplus slots exit at once); wgrad runs one block per (expert, K-tile,
// N-tile), reducing over that expert's rows. A block computes a 128 x 256 tile with three
// warpgroups: a TMA producer and two wgmma consumers (below). Deterministic: no atomics, no split
// reduction, one fixed-order loop per output element.
//
// Measured on an H200 (docs/performance.md, seventh session): 550-700 TFLOP/s on forward and
// dgrad GEMMs with K >= 1024, within 5% of cuBLAS or faster; weight gradients 390-605 and K = 512
// 410-434, slower than cuBLAS. Auto runs it for small calls only (gemm.cu, own_kernel). Two
// simpler versions measured slower still and were removed: every thread loading with cp.async and
// two barriers per k tile (270-440 TFLOP/s at 128 x 256, and 128 x 128 with two blocks per SM),
// and a persistent launch of this kernel.
#include <cuda.h>  // CUtensorMap (the type and enums only: the encoder comes from the runtime)
#include <cudaTypedefs.h>

#include <cstdint>

#include "backends/cuda/cuda_kernels.cuh"
#include "backends/cuda/mma_platform.cuh"
#include "backends/cuda/wgmma.cuh"
// The scheduling helpers of the mma.sync kernel: after the platform above.
#include "backends/cuda/grouped_gemm_kernels.h"

namespace moelab::cuda {
namespace {

namespace gg = moelab::ggemm;
namespace fl = moelab::flash;

enum Mode { kForward, kDgrad, kWgrad };

// ---- the warp-specialized kernel: TMA loads, mbarriers, wgmma ---------------------------------
// Three warpgroups: warpgroup 0 is the producer (one thread issues the TMA loads of every stage),
// warpgroups 1 and 2 the consumers (rows 0-63 and 64-127 of the tile). Stage s has two
// mbarriers: full[s] (the producer arms it with the stage's bytes; TMA completes them) and
// empty[s] (one arrival per consumer warp once its products reading the stage are done). The
// consumers never wait on a block barrier inside the loop.
//   Tensor maps (host-encoded per call, 128-byte swizzle, out-of-bounds elements zero):
//     forward: A = X [R, K] box 64 x 128 rows; B = W [E, K, N] box 64 (n) x 64 (k), BN / 64 panels
//     dgrad:   A = X as forward;              B = W [E, N, K] box 64 (k) x BN (n)
//     wgrad:   A = X [R, K] box 64 (m) x 64 rows, 2 panels; B = dY [R, N] box 64 x 64, BN / 64 panels
// Rows past an expert's end: in forward / dgrad they are loaded and computed but never stored
// (rows are independent); in wgrad they are the reduction, so the consumers zero those rows of
// dY's tile (the last tile of each expert) before its products.
struct TmaCfg {
  static constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4, kThreads = 384;  // wgmma m64n256k16
  static constexpr int GROUP_N = 2048 / BN;
  static constexpr int kA = BM * BK * 2, kB = BN * BK * 2, kStage = kA + kB;
  static constexpr size_t kSmem = size_t(STAGES) * kStage + 1024 + 2 * STAGES * 8 + 16;
};

struct TmaMaps {
  CUtensorMap a, b;
};

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
  } while (!done);
}
__device__ __forceinline__ void tma_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

// One output tile: tile t of gg's grid order (forward / dgrad: slots x n-tiles through gg_raster,
// the slot's expert from gg_slot_expert; wgrad: expert-major, then gg_raster over K-tiles x
// N-tiles). Every thread computes it; surplus slots come back with ok = false.
struct TileJob {
  bool ok;
  int e, row0, n0, m_lim, n_lim, Kr, a_row;  // a_row: wgrad's first row of X / dY
};
template <int MODE> __device__ __forceinline__ TileJob tile_job(const gg::Params& p, int64_t t) {
  using C = TmaCfg;
  TileJob j{};
  int n_tile = 0;
  if constexpr (MODE == kWgrad) {
    const int n_tiles = gg::gg_cdiv(p.N, C::BN), m_tiles = gg::gg_cdiv(p.K, C::BM);
    const int64_t per_expert = int64_t(m_tiles) * n_tiles;
    j.e = int(t / per_expert);
    j.row0 = gg::gg_raster<C::GROUP_N>(t - j.e * per_expert, m_tiles, n_tiles, &n_tile) * C::BM;
    j.a_row = __ldg(p.off + j.e);
    j.Kr = __ldg(p.off + j.e + 1) - j.a_row;
    j.m_lim = min(C::BM, p.K - j.row0);
    j.ok = true;
  } else {
    const int slot = gg::gg_raster<C::GROUP_N>(t, p.R / C::BM + p.E, gg::gg_cdiv(p.N, C::BN), &n_tile);
    j.e = gg::gg_slot_expert<C::BM>(p.off, p.E, slot);
    const int r_begin = __ldg(p.off + j.e), r_end = __ldg(p.off + j.e + 1);
    j.row0 = r_begin + (slot - (r_begin / C::BM + j.e)) * C::BM;
    j.ok = j.row0 < r_end;
    j.m_lim = min(C::BM, r_end - j.row0);
    j.Kr = p.K;
  }
  j.n0 = n_tile * C::BN;
  j.n_lim = min(C::BN, p.N - j.n0);
  return j;
}

// One block per tile (grid = every tile, surplus slots exit at once). A persistent launch (grid =
// the SMs, each block looping over tiles with the producer running ahead into the next tile)
// measured 10-20% slower on several shapes and no faster on any (docs/performance.md, seventh
// session). Again in the ninth, with the epilogue storing from registers (a 4 x 4 transpose in
// each quad of lanes, 16-byte stores) so that the producer could fill the next tile's stages
// meanwhile: K = 512 414 against 418 TFLOP/s, most shapes 2-7% slower, whole steps A, D and E
// 0-1% slower. Whatever holds K = 512 back, it is not the unoverlapped epilogue.
template <int MODE>
__global__ void __launch_bounds__(384, 1) ggemm_tma_kernel(const __grid_constant__ TmaMaps maps, gg::Params p) {
#if MOELAB_WGMMA_DEVICE
  using C = TmaCfg;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, S = C::STAGES;
  constexpr int TA = MODE == kWgrad ? 1 : 0, TB = MODE == kDgrad ? 0 : 1;
  const TileJob j = tile_job<MODE>(p, blockIdx.x);
  if (!j.ok) return;  // block-uniform
  extern __shared__ __align__(1024) char smem_raw[];
  const uint32_t base = (wg::smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t bars = base + uint32_t(S * C::kStage);  // full[0..S), then empty[0..S)
  auto full = [&](int st) { return bars + 8u * uint32_t(st); };
  auto empty = [&](int st) { return bars + 8u * uint32_t(S + st); };
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int st = 0; st < S; ++st) {
      mbar_init(full(st), 1);
      mbar_init(empty(st), 8);  // the 8 consumer warps
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int wgi = tid >> 7, kt_n = gg::gg_cdiv(j.Kr, BK);

  if (wgi == 0) {  // the producer: one thread
    if (tid != 0) return;
    for (int kt = 0; kt < kt_n; ++kt) {
      const int st = kt % S, k0 = kt * BK;
      if (kt >= S) mbar_wait(empty(st), uint32_t(kt / S - 1) & 1);
      mbar_expect_tx(full(st), uint32_t(C::kStage));
      const uint32_t sa = base + uint32_t(st * C::kStage), sb = sa + C::kA;
      if constexpr (MODE == kWgrad) {
#pragma unroll
        for (int pa = 0; pa < BM / 64; ++pa) tma_2d(sa + pa * 64 * 128, &maps.a, j.row0 + 64 * pa, j.a_row + k0, full(st));
#pragma unroll
        for (int pb = 0; pb < BN / 64; ++pb) tma_2d(sb + pb * 64 * 128, &maps.b, j.n0 + 64 * pb, j.a_row + k0, full(st));
      } else {
        tma_2d(sa, &maps.a, k0, j.row0, full(st));
        if constexpr (MODE == kDgrad) tma_3d(sb, &maps.b, k0, j.n0, j.e, full(st));
        else {
#pragma unroll
          for (int pb = 0; pb < BN / 64; ++pb) tma_3d(sb + pb * 64 * 128, &maps.b, j.n0 + 64 * pb, k0, j.e, full(st));
        }
      }
    }
    return;
  }

  // The consumers: warpgroup w = wgi - 1 computes rows 64w .. 64w + 63 of the tile.
  const int ctid = tid - 128, w = wgi - 1;
  const uint64_t da = MODE == kWgrad ? wg::desc_mn_k(base, BK, w, 0) : wg::desc_k(base, BM, 64 * w, 0);
  const uint64_t db = MODE == kDgrad ? wg::desc_k(base + C::kA, BN, 0, 0) : wg::desc_mn_k(base + C::kA, BK, 0, 0);
  auto a_step = [](int kk) { return MODE == kWgrad ? wg::mn_step_bytes(kk) : wg::k_step_bytes(BM, kk); };
  auto b_step = [](int kk) { return MODE == kDgrad ? wg::k_step_bytes(BN, kk) : wg::mn_step_bytes(kk); };
  const int warp = (tid >> 5) & 3, lane = tid & 31;
  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
  for (int kt = 0; kt < kt_n; ++kt) {
    const int st = kt % S;
    mbar_wait(full(st), uint32_t(kt / S) & 1);
    if constexpr (MODE == kWgrad) {
      const int valid = j.Kr - kt * BK;  // rows of this expert in the tile; the rest are the next's
      if (valid < BK) {
        const uint32_t sb = base + uint32_t(st * C::kStage) + C::kA;
        const int per_panel = (BK - valid) * 8;  // 16-byte chunks
        for (int i = ctid; i < per_panel * (BN / 64); i += 256) {
          const int pb = i / per_panel, rem = i - pb * per_panel;
          const uint32_t addr = sb + uint32_t(pb * 64 * 128 + (valid + rem / 8) * 128 + (rem % 8) * 16);
          asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u) : "memory");
        }
        wg::fence_proxy_async();
        asm volatile("bar.sync 1, 256;\n" ::: "memory");  // the consumers only
      }
    }
    const uint32_t so = uint32_t(st * C::kStage);
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
      wg::mma_ss_n256<TA, TB>(acc, wg::desc_plus(da, so + a_step(kk)), wg::desc_plus(db, so + b_step(kk)), 1);
    wg::commit();
    wg::wait<1>();  // the products of tile kt - 1 are done: release its stage
    if (kt > 0) {
      __syncwarp();
      if (lane == 0) mbar_arrive(empty((kt - 1) % S));
    }
  }
  wg::wait<0>();
  wg::fence_operands(acc);

  // Epilogue through shared memory (every stage is consumed once both warpgroups are here): the
  // fp32 accumulators into rows of BN floats (+ 16 bytes: the 8 rows of a store instruction hit
  // distinct banks), then 8 columns per thread per step, a warp covering a whole row:
  // (acc + beta old) -> bf16, 16-byte coalesced stores. One rounding, as the CPU reference.
  constexpr int LDS = BN * 4 + 16;
  static_assert(BM * LDS <= S * C::kStage, "the staged tile fits in the stages");
  // The other warpgroup's last products may still read the stages: both must be done first.
  wg::fence_proxy_async();
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
  {
    const int r_base = 64 * w + 16 * warp + (lane >> 2), c_base = 2 * (lane & 3);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
#pragma unroll
      for (int jj = 0; jj < BN / 8; ++jj)
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(base + uint32_t((r_base + 8 * hr) * LDS + (8 * jj + c_base) * 4)),
                     "f"(acc[4 * jj + 2 * hr]), "f"(acc[4 * jj + 2 * hr + 1])
                     : "memory");
  }
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
  uint16_t* out = static_cast<uint16_t*>(p.y) + (MODE == kWgrad ? int64_t(j.e) * p.K * p.N : int64_t(0)) +
                  int64_t(j.row0) * p.N + j.n0;
  for (int i = ctid; i < BM * (BN / 8); i += 256) {
    const int row = i / (BN / 8), ch = i - row * (BN / 8);
    if (row >= j.m_lim || ch * 8 >= j.n_lim) continue;
    float v[8];
    const uint32_t src = base + uint32_t(row * LDS + ch * 32);
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n" : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3]) : "r"(src));
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n" : "=f"(v[4]), "=f"(v[5]), "=f"(v[6]), "=f"(v[7]) : "r"(src + 16));
    uint4* dst = reinterpret_cast<uint4*>(out + int64_t(row) * p.N + ch * 8);
    if (p.beta != 0.0f) {
      const uint4 old = *dst;
      const uint32_t o[4] = {old.x, old.y, old.z, old.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        v[2 * q] += p.beta * fl::fa_bf16_to_f(uint16_t(o[q] & 0xFFFFu));
        v[2 * q + 1] += p.beta * fl::fa_bf16_to_f(uint16_t(o[q] >> 16));
      }
    }
    *dst = make_uint4(fl::fa_pack_bf16(v[0], v[1]), fl::fa_pack_bf16(v[2], v[3]), fl::fa_pack_bf16(v[4], v[5]),
                      fl::fa_pack_bf16(v[6], v[7]));
  }
#endif
}

// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
    MOELAB_CHECK(q == cudaDriverEntryPointSuccess && f, "cuda grouped gemm (wgmma): the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A bf16 tensor map of rank 2 or 3 (dims innermost first, in elements), 128-byte swizzle, box
// `box` (the innermost 64 elements = 128 bytes), out-of-bounds elements read as zeros.
CUtensorMap tensor_map(const void* ptr, int rank, const uint64_t* dims, const uint32_t* box) {
  CUtensorMap m;
  cuuint64_t gdim[3], gstride[2];
  cuuint32_t bdim[3], estride[3] = {1, 1, 1};
  uint64_t stride = 2;
  for (int i = 0; i < rank; ++i) {
    gdim[i] = dims[i];
    bdim[i] = box[i];
    if (i + 1 < rank) gstride[i] = stride *= dims[i];
  }
  const CUresult r = tensor_map_encoder()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, cuuint32_t(rank), const_cast<void*>(ptr),
                                          gdim, gstride, bdim, estride, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MOELAB_CHECK(r == CUDA_SUCCESS, "cuda grouped gemm (wgmma): cuTensorMapEncodeTiled failed (", int(r), ")");
  return m;
}

template <int MODE> void run_tma(Ctx& c, const gg::Params& p) {
  using C = TmaCfg;
  const uint64_t R = uint64_t(p.R), K = uint64_t(p.K), N = uint64_t(p.N), E = uint64_t(p.E);
  TmaMaps maps;
  if constexpr (MODE == kWgrad) {
    const uint64_t da[2] = {K, R}, db[2] = {N, R};
    const uint32_t box[2] = {64, 64};
    maps.a = tensor_map(p.x, 2, da, box);
    maps.b = tensor_map(p.w, 2, db, box);
  } else {
    const uint64_t da[2] = {K, R};
    const uint32_t ba[2] = {64, uint32_t(C::BM)};
    maps.a = tensor_map(p.x, 2, da, ba);
    if constexpr (MODE == kDgrad) {
      const uint64_t dbm[3] = {K, N, E};
      const uint32_t bb[3] = {64, uint32_t(C::BN), 1};
      maps.b = tensor_map(p.w, 3, dbm, bb);
    } else {
      const uint64_t dbm[3] = {N, K, E};
      const uint32_t bb[3] = {64, 64, 1};
      maps.b = tensor_map(p.w, 3, dbm, bb);
    }
  }
  const int64_t tiles = MODE == kWgrad ? gg::wgrad_blocks<C>(p.E, p.K, p.N) : gg::fwd_blocks<C>(p.R, p.E, p.N);
  if (tiles == 0) return;
  launch_2d(c, "cuda grouped gemm (wgmma)", ggemm_tma_kernel<MODE>, tiles, 1, C::kThreads, C::kSmem, maps, p);
}

}  // namespace

bool wgmma_grouped_available(const Ctx& c) { return c.compute_capability == 90; }

void wgmma_grouped_gemm(Ctx& c, const Tensor& x, const Tensor& w, const int32_t* d_off, int64_t E,
                        const Tensor& y, bool trans_w, double beta) {
  MOELAB_CHECK(wgmma_grouped_available(c), "cuda grouped gemm (wgmma): needs compute capability 9.0, the device has ",
               c.compute_capability);
  const int64_t R = x.dim(0), K = x.dim(1), N = y.dim(1);
  if (R == 0 || N == 0 || E == 0) return;  // nothing to write
  if (K == 0) {  // no columns (no tensor map of them): every row belongs to an expert, Y = beta Y
    scale(c, DType::BF16, y.data(), R * N, beta);
    return;
  }
  const gg::Params p = grouped_gemm_params(x, w, d_off, E, y, K, N, beta);
  if (trans_w) run_tma<kDgrad>(c, p);
  else run_tma<kForward>(c, p);
}

void wgmma_grouped_gemm_wgrad(Ctx& c, const Tensor& x, const Tensor& dy, const int32_t* d_off, int64_t E,
                              const Tensor& dw, double beta) {
  MOELAB_CHECK(wgmma_grouped_available(c), "cuda grouped gemm (wgmma): needs compute capability 9.0, the device has ",
               c.compute_capability);
  const int64_t K = x.dim(1), N = dy.dim(1);
  if (E == 0 || K == 0 || N == 0) return;
  if (x.dim(0) == 0) {  // no rows at all (no tensor map of them): dW = beta dW
    scale(c, DType::BF16, dw.data(), E * K * N, beta);
    return;
  }
  run_tma<kWgrad>(c, grouped_gemm_params(x, dy, d_off, E, dw, K, N, beta));
}

}  // namespace moelab::cuda
