// moelab CUDA backend: Hopper warpgroup MMA (wgmma, sm_90a) primitives, for the kernels of
// flash_attention_wgmma.cu. Only code compiled for sm_90a may issue them: MOELAB_WGMMA_DEVICE is
// 1 in that device pass and 0 everywhere else (host pass, other architectures), where every
// primitive below compiles to nothing; the launchers check the device before they run a kernel.
//
// Operand tiles in shared memory are K-major with the 128-byte swizzle: wgmma_layout.h has the
// layout and the descriptors (host-testable, tests/test_wgmma_layout.cpp).
//
// Accumulators (m64nN, f32) follow mma.sync's m16n8 C layout per warp: warp w of the warpgroup
// holds rows 16w + lane/4 (and + 8), and d[4j + 2hr + e] is row + 8hr, column 8j + 2(lane%4) + e.
// That is also the A-operand layout of the next product, so P = softmax(S) feeds P V from
// registers without a trip through shared memory.
#pragma once
#include <cstdint>

#include "backends/cuda/wgmma_layout.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOELAB_WGMMA_DEVICE 1
#else
#define MOELAB_WGMMA_DEVICE 0
#endif

namespace moelab::cuda::wg {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Orders this thread's earlier register writes (accumulators, A fragments) before the wgmma
// that follow.
__device__ __forceinline__ void fence() {
#if MOELAB_WGMMA_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit() {
#if MOELAB_WGMMA_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N committed groups of this warpgroup are still running.
template <int N> __device__ __forceinline__ void wait() {
#if MOELAB_WGMMA_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Shared memory written by this thread through the generic proxy (st.shared, cp.async) becomes
// visible to the async proxy that wgmma reads through (then a barrier for the other threads).
__device__ __forceinline__ void fence_proxy_async() {
#if MOELAB_WGMMA_DEVICE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving reads or writes of accumulators across a wait (the registers
// change behind its back while a wgmma runs).
template <int N> __device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for A fragments in registers, which a running wgmma still reads: fenced after the
// wait, they stay live (and unmodified) until the product is done.
template <int N> __device__ __forceinline__ void fence_operands(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(a[i][r])::"memory");
}

// The operand lists of an m64nN f32 accumulator (N / 2 registers per thread): the "%0, .., %K "
// register list of the asm text and the d[0] .. d[K] constraints.
#define MOELAB_WG_REGS16 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15 "
#define MOELAB_WG_REGS32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31 "
#define MOELAB_WG_REGS64 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63 "
#define MOELAB_WG_REGS128 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127 "
#define MOELAB_WG_ACC8(d, i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define MOELAB_WG_ACC16(d) MOELAB_WG_ACC8(d, 0), MOELAB_WG_ACC8(d, 8)
#define MOELAB_WG_ACC32(d) MOELAB_WG_ACC16(d), MOELAB_WG_ACC8(d, 16), MOELAB_WG_ACC8(d, 24)
#define MOELAB_WG_ACC64(d) \
  MOELAB_WG_ACC32(d), MOELAB_WG_ACC8(d, 32), MOELAB_WG_ACC8(d, 40), MOELAB_WG_ACC8(d, 48), MOELAB_WG_ACC8(d, 56)
#define MOELAB_WG_ACC128(d) \
  MOELAB_WG_ACC64(d), MOELAB_WG_ACC8(d, 64), MOELAB_WG_ACC8(d, 72), MOELAB_WG_ACC8(d, 80), MOELAB_WG_ACC8(d, 88), \
      MOELAB_WG_ACC8(d, 96), MOELAB_WG_ACC8(d, 104), MOELAB_WG_ACC8(d, 112), MOELAB_WG_ACC8(d, 120)

// The products, one wrapper per shape, made by two macros: the asm text needs literal operand
// numbers, which follow from the accumulator count NA = N / 2 (operands 0 .. NA - 1 are the
// accumulators, then the A descriptor or A's four registers, B's descriptor, the accumulate flag
// and the transpose immediates).
//   mma_ss_nN<TA, TB>(d, da, db, accumulate): D[64 x N] (+)= A[64 x 16] B[16 x N], A and B in
//     shared memory (descriptors). TA / TB: 0 for a K-major operand, 1 for an MN-major one
//     (transposed; bf16 only), with the matching descriptor.
//   mma_rs_nN<TB>(d, a, db, accumulate): the same with A in registers (four bf16x2 per thread in
//     mma.sync's m16n8k16 A layout, warp w of the warpgroup holding rows 16w..16w+15).
#if MOELAB_WGMMA_DEVICE
#define MOELAB_WG_ASM(...) asm volatile(__VA_ARGS__)
#else
#define MOELAB_WG_ASM(...) ((void)0)
#endif
#define MOELAB_WG_MMA_SS(N, NA, REGS, ACC, DA, DB, P, TAI, TBI)                                                   \
  template <int TA = 0, int TB = 0>                                                                             \
  __device__ __forceinline__ void mma_ss_n##N(float(&d)[NA], uint64_t da, uint64_t db, int accumulate) {        \
    MOELAB_WG_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P ", 0;\n"                                               \
                  "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 {" REGS "}, %" #DA ", %" #DB        \
                  ", p, 1, 1, %" #TAI ", %" #TBI ";\n}\n"                                                       \
                  : ACC(d)                                                                                      \
                  : "l"(da), "l"(db), "r"(accumulate), "n"(TA), "n"(TB));                                       \
  }
#define MOELAB_WG_MMA_RS(N, NA, REGS, ACC, A0, A1, A2, A3, DB, P, TBI)                                            \
  template <int TB = 0>                                                                                         \
  __device__ __forceinline__ void mma_rs_n##N(float(&d)[NA], const uint32_t(&a)[4], uint64_t db, int accumulate) { \
    MOELAB_WG_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P ", 0;\n"                                               \
                  "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 {" REGS "}, {%" #A0 ", %" #A1       \
                  ", %" #A2 ", %" #A3 "}, %" #DB ", p, 1, 1, %" #TBI ";\n}\n"                                   \
                  : ACC(d)                                                                                      \
                  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate), "n"(TB));             \
  }

MOELAB_WG_MMA_SS(32, 16, MOELAB_WG_REGS16, MOELAB_WG_ACC16, 16, 17, 18, 19, 20)
MOELAB_WG_MMA_SS(64, 32, MOELAB_WG_REGS32, MOELAB_WG_ACC32, 32, 33, 34, 35, 36)
MOELAB_WG_MMA_SS(128, 64, MOELAB_WG_REGS64, MOELAB_WG_ACC64, 64, 65, 66, 67, 68)
MOELAB_WG_MMA_SS(256, 128, MOELAB_WG_REGS128, MOELAB_WG_ACC128, 128, 129, 130, 131, 132)
MOELAB_WG_MMA_RS(64, 32, MOELAB_WG_REGS32, MOELAB_WG_ACC32, 32, 33, 34, 35, 36, 37, 38)
MOELAB_WG_MMA_RS(128, 64, MOELAB_WG_REGS64, MOELAB_WG_ACC64, 64, 65, 66, 67, 68, 69, 70)

// A tile of R rows x C bf16 columns (C a multiple of 64) of a row-major matrix (src: its element
// (0, 0); row stride ld elements) into the swizzled layout at shared address `tile`, 16 bytes
// per cp.async by the NT threads of the block. Rows from row_lim on and columns from col_lim on
// (a multiple of 8) are zeros; a zero-filled chunk names src itself, never an address past the
// matrix. The caller commits the group and later fences it to the async proxy (fence_proxy_async)
// before the barrier that precedes the wgmma reading it.
//
// Thread t's chunks are column t % (C / 8) of rows t / (C / 8) + k NT / (C / 8): the column, the
// swizzle (the row mod 8) and both addresses' strides are the same for all of them, so each chunk
// costs a compare, two selects and an add. (Deriving row and column of every chunk from a running
// index, as before, took about 25 PTX instructions a chunk, in a loop the compiler could not
// unroll; docs/performance.md, tenth session.)
template <int R, int C, int NT>
__device__ __forceinline__ void load_tile(uint32_t tile, const uint16_t* src, int64_t ld, int row_lim,
                                          int col_lim, int tid) {
  constexpr int CC = C / 8;  // 16-byte chunks per row
  static_assert((R * CC) % NT == 0, "load_tile: chunks not a multiple of the threads");
  static_assert(NT % CC == 0, "load_tile: a thread's chunks must share one column");
  constexpr int kRowStep = NT / CC, kPasses = R * CC / NT;
  static_assert(kRowStep % 8 == 0, "load_tile: a thread's rows must share their swizzle");
  const int cc = tid % CC, r0 = tid / CC;
  const bool col_ok = col_lim >= C || cc * 8 < col_lim;  // folds for col_lim = C
  const uint32_t dst = tile + swizzled_chunk(r0, cc, R);
  // Offsets in elements from src (a tile's rows times ld fit in 32 bits), advanced through an
  // empty asm so that the compiler keeps one running offset instead of hoisting every pass's
  // product out of the caller's loop into registers of their own.
  int off = r0 * int(ld) + cc * 8;
  const int step = kRowStep * int(ld);
#pragma unroll
  for (int k = 0; k < kPasses; ++k) {
    const bool ok = col_ok && r0 + k * kRowStep < row_lim;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst + uint32_t(k * kRowStep * 128)),
                 "l"(ok ? src + off : src), "r"(ok ? 16 : 0));
    off += step;
    asm("" : "+r"(off));
  }
}

// Bulk copies from shared to global memory (the TMA unit, sm_90; no tensor map): `bytes` (a
// multiple of 16, both addresses 16-byte aligned) from shared address src to dst, stored or added
// (f32, performed in L2) asynchronously. The issuing thread owns them: bulk_commit closes its
// group, bulk_wait_read<N> waits until all but its N newest groups have read shared memory (the
// source may be written again), bulk_wait<N> until they are complete in global memory. The
// writers of src fence it to the async proxy (fence_proxy_async) before the issuing thread
// issues.
__device__ __forceinline__ void bulk_store(float* dst, uint32_t src, uint32_t bytes) {
#if MOELAB_WGMMA_DEVICE
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst), "r"(src), "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void bulk_add_f32(float* dst, uint32_t src, uint32_t bytes) {
#if MOELAB_WGMMA_DEVICE
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if MOELAB_WGMMA_DEVICE
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void bulk_wait_read() {
#if MOELAB_WGMMA_DEVICE
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#endif
}
template <int N> __device__ __forceinline__ void bulk_wait() {
#if MOELAB_WGMMA_DEVICE
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace moelab::cuda::wg
