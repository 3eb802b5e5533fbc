// moelab CUDA backend: the CUDA platform of the tensor-core kernel bodies that are written once
// for the GPU and for a CPU emulation (tests/flash_emu.h): flash_attention_kernels.h and
// grouped_gemm_kernels.h. Each primitive is one PTX instruction or a trivial conversion:
// ldmatrix (.x4, with and without .trans), mma.sync m16n8k16 bf16 -> fp32, cp.async (16 / 4 bytes,
// zero-fill when not valid), commit / wait_group, shuffles, bf16 conversions, 4-byte loads and
// stores. FA_DEV is their qualifier; the emulation defines the same names for the host.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#define FA_DEV __device__ __forceinline__

namespace moelab::flash {

FA_DEV void fa_sync() { __syncthreads(); }
FA_DEV float fa_shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
FA_DEV float fa_shfl(float v, int src) { return __shfl_sync(0xffffffffu, v, src); }

FA_DEV uint32_t fa_smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Four 8x8 b16 matrices; lanes 8i..8i+7 address the rows of matrix i.
FA_DEV void fa_ldsm_x4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(fa_smem_addr(p)));
}
FA_DEV void fa_ldsm_x4_t(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(fa_smem_addr(p)));
}
// D = A B + D, A 16x16 bf16 (row), B 16x8 bf16 (col), D fp32.
FA_DEV void fa_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 16 bytes global -> shared, asynchronous; valid = false writes 16 zero bytes (src-size 0).
FA_DEV void fa_cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fa_smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
// 4 bytes global -> shared, asynchronous (zero when not valid).
FA_DEV void fa_cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(fa_smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}
FA_DEV void fa_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> FA_DEV void fa_cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

FA_DEV float fa_bf16_to_f(uint16_t x) { return __uint_as_float(uint32_t(x) << 16); }
FA_DEV uint16_t fa_f_to_bf16(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
FA_DEV uint32_t fa_pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}
FA_DEV void fa_st32(void* p, uint32_t v) { *static_cast<uint32_t*>(p) = v; }
FA_DEV uint32_t fa_ld32(const void* p) { return *static_cast<const uint32_t*>(p); }
// A read-only int32 of global memory, through the non-coherent (texture) path.
FA_DEV int32_t fa_ldg(const int32_t* p) { return __ldg(p); }
// 16 bytes of global memory (16-byte aligned) in one load.
FA_DEV void fa_ld128(const void* p, uint32_t (&w)[4]) {
  const uint4 q = *static_cast<const uint4*>(p);
  w[0] = q.x, w[1] = q.y, w[2] = q.z, w[3] = q.w;
}
FA_DEV float fa_exp2(float x) { return exp2f(x); }
FA_DEV float fa_log2(float x) { return log2f(x); }

}  // namespace moelab::flash
