// moelab: flash attention kernels (causal, grouped-query), forward and backward, written once
// for two platforms. The kernel bodies below call a handful of primitives that the includer
// defines first (FA_DEV is their qualifier):
//   fa_sync() (__syncthreads), fa_shfl_xor(v, mask), fa_shfl(v, lane),
//   fa_ldsm_x4 / fa_ldsm_x4_t (ldmatrix .x4 [.trans]), fa_mma (mma.sync m16n8k16 bf16 -> f32),
//   fa_cp_async16 / fa_cp_async4, fa_cp_commit, fa_cp_wait<N>,
//   fa_bf16_to_f, fa_f_to_bf16, fa_pack_bf16 (two floats -> bf16x2), fa_st32, fa_exp2, fa_log2.
// The platforms:
//   - backends/cuda/flash_attention.cu: the CUDA platform (PTX ldmatrix / mma.sync / cp.async);
//   - tests/flash_emu.h: a CPU emulation (one fiber per CUDA thread, warp collectives exchanged
//     through memory) so that the tiling, masking, online softmax and indexing of these bodies
//     are exercised by the CPU test suite against the CPU reference.
// bf16 data is handled as raw uint16_t bits here; the platform converts.
//
// Semantics (core/backend.h): q [T, H*Dh], k, v [T, Hkv*Dh] (T = B*S), head h reads kv head
// h / (H/Hkv), scores s_ij = scale q_i . k_j for j <= i, out = softmax(s) v, and the saved state
// lse[b*H + h, i] = log sum_{j<=i} exp(s_ij) (natural log, f32). Internally the kernels work in
// base 2: s2 = s * scale * log2(e), lse2 = lse * log2(e).
//
// Kernels (flash_attention.cu launches, per head width, the ones that measured fastest on an
// H200; docs/performance.md):
//   fwd_tc<64>   forward, bf16, head width 64: block = 8 warps, 128 query rows (16 per warp), key
//                tiles of 64 staged in shared memory with cp.async (double-buffered); S = Q K^T
//                and O += P V on tensor cores (mma.sync m16n8k16 bf16, fp32 accumulate), online
//                softmax in fp32 registers; P is rounded to bf16 for the P V product.
//   fwd2_tc<128> forward, head width 128: the same with 4 warps x 32 query rows (two m16 tiles,
//                so every K / V fragment that ldmatrix reads feeds two mma), 128 threads, 2
//                blocks per SM. (With 16 rows per warp, about one ldmatrix.x4 per two mma:
//                shared-memory bandwidth bounds it; at width 64 the 8-warp kernel was faster.)
//   delta_rows   D_i = sum_d dO_id O_id (fp32), one warp per (token, head); delta_rows_vec the
//                same for the tensor-core kernels' rows, one warp per token, 16-byte loads.
//   dq2_tc<DH>   dQ = scale sum_j dS_ij K_j: 4 warps x 32 query rows, looping over key tiles up to
//                the diagonal (64 keys for DH 64, 32 for DH 128, for registers), recomputing P
//                and dP = dO V^T.
//   dkv2_tc<64>  dV = sum_i P_ij dO_i, dK = scale sum_i dS_ij Q_i: block per 128 keys of one kv
//                head (4 warps x 32 keys), looping over the group's heads and, for each, over
//                the query tiles (32 rows) from the diagonal down.
//   dkv2s_tc<128> the same for DH 128 (32 keys' dK and dV would need 256 registers): 8 warps over
//                128 keys x query tiles of 64, S^T / dP^T as 4 x 2 warps of 32 x 32, P^T and
//                dS^T handed over in shared memory (bf16), then dK / dV as 4 x 2 warps of 32
//                keys x 64 columns.
//   In the two-tile kernels, blocks of 16 keys (queries) wholly masked for a warp are skipped.
//   *_gen<E>     generic fp32 kernels for f32 or bf16 storage and any head width <= 256: one
//                warp per query row (forward, dQ) or key row (dK, dV), lanes over the keys
//                (queries) of a 32-wide tile in shared memory.
// Causal masking: key tiles above the diagonal are never visited; within a tile that crosses
// the diagonal, scores with j > i get -inf (forward) / probability 0 (backward). Rows and keys
// past S are zero-filled in shared memory and never stored. Segments (Params::seg, packed
// records): in every visited tile, scores of keys from another segment than the query's get
// -inf / probability 0 as well (the key ids are read from global memory, through the cache;
// tiles wholly before a query's segment are still visited, so packing costs what causal
// attention over the whole sequence costs).
// Determinism: no atomics anywhere; every output element is written by one thread after a
// fixed-order loop (dK/dV sum the heads of a group in ascending order inside one block; dQ has
// its own kernel over query tiles), so results are bit-identical run to run.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

#ifndef FA_DEV
#error "flash_attention_kernels.h: include a platform (flash_attention.cu or tests/flash_emu.h) first"
#endif

// Loop unrolling: nvcc's pragma, nothing for a host compiler.
#if defined(__CUDACC__)
#define FA_UNROLL _Pragma("unroll")
#else
#define FA_UNROLL
#endif

namespace moelab::flash {

struct Params {
  const void* q = nullptr;     // [T, H*Dh]
  const void* k = nullptr;     // [T, Hkv*Dh]
  const void* v = nullptr;     // [T, Hkv*Dh]
  const void* o = nullptr;     // backward: forward's output [T, H*Dh]
  const void* dout = nullptr;  // backward: [T, H*Dh]
  void* out = nullptr;         // forward output
  float* lse = nullptr;        // [B*H, S]: written by forward, read by backward
  float* delta = nullptr;      // [B*H, S]: D = rowsum(dO * O), backward scratch
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  // Packed records (optional, i32 [T]): query i sees key j only when seg[i] == seg[j].
  const int32_t* seg = nullptr;
  int B = 0, S = 0, H = 0, Hkv = 0, Dh = 0;
  float scale = 0;       // 1 / sqrt(Dh)
  float scale_log2 = 0;  // scale * log2(e)
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

FA_DEV int fa_imin(int a, int b) { return a < b ? a : b; }
FA_DEV int fa_imax(int a, int b) { return a > b ? a : b; }
FA_DEV float fa_ninf() { return -INFINITY; }

// Segment mask of one sequence (sg = p.seg + b * S, or null: no segments): whether query i may
// see key j as far as the segments go (causality is checked separately). Rows past S are never
// stored and keep the plain causal treatment; keys past S are never visible.
FA_DEV bool fa_seg_ok(const int32_t* sg, int S, int i, int j) {
  return !sg || i >= S || (j < S && sg[i] == sg[j]);
}

FA_DEV float fa_ld(const float* p, int64_t i) { return p[i]; }
FA_DEV float fa_ld(const uint16_t* p, int64_t i) { return fa_bf16_to_f(p[i]); }
FA_DEV void fa_st(float* p, int64_t i, float v) { p[i] = v; }
FA_DEV void fa_st(uint16_t* p, int64_t i, float v) { p[i] = fa_f_to_bf16(v); }

FA_DEV float fa_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += fa_shfl_xor(v, o);
  return v;
}
FA_DEV float fa_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, fa_shfl_xor(v, o));
  return v;
}

// ---- tile configurations (shared with the launchers and the emulation test) -------------------

// Shared-memory rows are padded by 8 bf16 (16 bytes), so that the 8 row addresses of one
// ldmatrix 8x8 load fall into distinct bank groups.
template <int DH> struct FwdTc {
  static_assert(DH == 64, "fwd_tc: head width 64 (fwd2_tc runs 128)");
  static constexpr int kThreads = 256, BR = 128, BC = 64, LDS = DH + 8;
  static constexpr size_t kSmem = size_t(BR + 4 * BC) * LDS * 2;  // Q, 2 stages of K and V
};
struct Gen {
  static constexpr int kThreads = 128;  // 4 warps
  static constexpr int QR = 16;         // forward / dQ: query rows per block (4 per warp)
  static constexpr int KC = 32;         // forward / dQ: keys per tile (one per lane)
  static constexpr int KR = 16;         // dK/dV: keys per block (4 per warp)
  static constexpr int QC = 32;         // dK/dV: queries per tile (one per lane)
  static constexpr int kMaxDh = 256;    // 8 accumulators per lane and row
  static size_t fwd_smem(int dh) { return size_t(QR * dh + KC * (dh + 1) + KC * dh) * 4; }
  static size_t dq_smem(int dh) { return size_t(2 * QR * dh + 2 * KC * (dh + 1)) * 4; }
  static size_t dkv_smem(int dh) { return size_t(2 * KR * dh + 2 * QC * (dh + 1) + 2 * QC) * 4; }
};
constexpr int kDeltaWarps = 8;  // delta_rows: rows per block of 256 threads

// ---- tensor-core helpers ----------------------------------------------------------------------

// Copies rows [r0, r0 + R) of a bf16 matrix (row stride ld elements; DH columns from src) into
// shared memory with row stride LDS, 16 bytes per cp.async; rows >= S are zero-filled.
template <int DH, int LDS, int NT>
FA_DEV void fa_load_rows(uint16_t* dst, const uint16_t* src, int64_t ld, int r0, int R, int S,
                         int tid) {
  constexpr int CH = DH / 8;
  for (int c = tid; c < R * CH; c += NT) {
    const int r = c / CH, cc = c - r * CH, gr = r0 + r;
    const bool ok = gr < S;
    fa_cp_async16(dst + r * LDS + cc * 8, src + int64_t(ok ? gr : 0) * ld + cc * 8, ok);
  }
}

// Key tiles of BC rows of K and V, double-buffered in shared memory (tile j in stage j & 1; tile
// 0 issued by the caller): prefetches tile j + 1 into the other stage, then waits until tile j
// has landed for every thread.
template <int DH, int LDS, int NT, int BC>
FA_DEV void fa_kv_next(uint16_t* sK, uint16_t* sV, const uint16_t* K, const uint16_t* V, int64_t ldk,
                       int j, int n_kt, int S, int tid) {
  const int st = j & 1;
  if (j + 1 < n_kt) {
    fa_load_rows<DH, LDS, NT>(sK + (st ^ 1) * BC * LDS, K, ldk, (j + 1) * BC, BC, S, tid);
    fa_load_rows<DH, LDS, NT>(sV + (st ^ 1) * BC * LDS, V, ldk, (j + 1) * BC, BC, S, tid);
    fa_cp_commit();
    fa_cp_wait<1>();
  } else {
    fa_cp_wait<0>();
  }
  fa_sync();
}

// A operand of mma.m16n8k16 (16 x 16, k contiguous): rows 0..15 and columns 0..15 of the
// row-major shared tile at `base`. Matrices: (rows 0-7 | 8-15) x (cols 0-7 | 8-15), in the order
// a0a1, a2a3, a4a5, a6a7 of the PTX fragment.
template <int LDS> FA_DEV void fa_lds_a(uint32_t (&a)[4], const uint16_t* base, int lane) {
  fa_ldsm_x4(a, base + (lane & 15) * LDS + (lane >> 4) * 8);
}
// B operands of two n8 blocks from a shared tile stored [n][k] (k contiguous): n rows 0..15,
// k columns 0..15. b[0], b[1]: n block 0 (k 0-7, 8-15); b[2], b[3]: n block 1.
template <int LDS> FA_DEV void fa_lds_b_nk(uint32_t (&b)[4], const uint16_t* base, int lane) {
  const int mi = lane >> 3, r = lane & 7;
  fa_ldsm_x4(b, base + (r + (mi >> 1) * 8) * LDS + (mi & 1) * 8);
}
// The same from a tile stored [k][n] (n contiguous): k rows 0..15, n columns 0..15, through
// ldmatrix's transpose.
template <int LDS> FA_DEV void fa_lds_b_kn(uint32_t (&b)[4], const uint16_t* base, int lane) {
  const int mi = lane >> 3, r = lane & 7;
  fa_ldsm_x4_t(b, base + (r + (mi & 1) * 8) * LDS + (mi >> 1) * 8);
}
// The A operand of k block kb from the fp32 accumulators of n8 blocks 2kb (c0) and 2kb+1 (c1):
// the accumulator layout (row g / g+8, columns 2t, 2t+1) is the A layout, rounded to bf16.
FA_DEV void fa_acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = fa_pack_bf16(c0[0], c0[1]);
  a[1] = fa_pack_bf16(c0[2], c0[3]);
  a[2] = fa_pack_bf16(c1[0], c1[1]);
  a[3] = fa_pack_bf16(c1[2], c1[3]);
}

// acc[2nb], acc[2nb+1] += A (16 rows at sA, DH wide) x B^T, B rows n = 0..N-1 at sB ([n][k]).
template <int DH, int LDS, int N>
FA_DEV void fa_mm_abt(float (&acc)[N / 8][4], const uint16_t* sA, const uint16_t* sB, int lane) {
FA_UNROLL
  for (int kk = 0; kk < DH / 16; ++kk) {
    uint32_t a[4];
    fa_lds_a<LDS>(a, sA + kk * 16, lane);
FA_UNROLL
    for (int nb = 0; nb < N / 16; ++nb) {
      uint32_t b[4];
      fa_lds_b_nk<LDS>(b, sB + nb * 16 * LDS + kk * 16, lane);
      fa_mma(acc[2 * nb], a, b[0], b[1]);
      fa_mma(acc[2 * nb + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x DH) += P (16 x K, the bf16 rounding of fp32 accumulators p) x B, B [k][n] at sB
// (K rows, DH columns).
template <int DH, int LDS, int K>
FA_DEV void fa_mm_pb(float (&acc)[DH / 8][4], const float (&p)[K / 8][4], const uint16_t* sB,
                     int lane) {
FA_UNROLL
  for (int kb = 0; kb < K / 16; ++kb) {
    uint32_t a[4];
    fa_acc_to_a(a, p[2 * kb], p[2 * kb + 1]);
FA_UNROLL
    for (int dp = 0; dp < DH / 16; ++dp) {
      uint32_t b[4];
      fa_lds_b_kn<LDS>(b, sB + kb * 16 * LDS + dp * 16, lane);
      fa_mma(acc[2 * dp], a, b[0], b[1]);
      fa_mma(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// Stores 16 rows x DH of fp32 accumulators (times mul) as bf16 rows row0 + g, row0 + g + 8.
template <int DH>
FA_DEV void fa_store_rows(uint16_t* dst, int64_t ld, int row0, int S, const float (&acc)[DH / 8][4],
                          float mul, int lane) {
  const int g = lane >> 2, t = lane & 3;
FA_UNROLL
  for (int hr = 0; hr < 2; ++hr) {
    const int r = row0 + g + 8 * hr;
    if (r >= S) continue;
FA_UNROLL
    for (int db = 0; db < DH / 8; ++db)
      fa_st32(dst + int64_t(r) * ld + db * 8 + 2 * t,
              fa_pack_bf16(acc[db][2 * hr] * mul, acc[db][2 * hr + 1] * mul));
  }
}

// ---- forward, tensor cores ---------------------------------------------------------------------

// Grid: x = b*H + h, y = query tile (reversed: the longest rows start first).
template <int DH>
FA_DEV void fwd_tc(const Params& p, char* smem, int tid, int bh, int ty) {
  using C = FwdTc<DH>;
  constexpr int BR = C::BR, BC = C::BC, LDS = C::LDS, NT = C::kThreads;
  const int S = p.S, H = p.H;
  const int b = bh / H, h = bh - b * H, g = h / (H / p.Hkv);
  const int n_qt = (S + BR - 1) / BR, q0 = (n_qt - 1 - ty) * BR;
  const int64_t ldq = int64_t(H) * DH, ldk = int64_t(p.Hkv) * DH;
  const uint16_t* Q = static_cast<const uint16_t*>(p.q) + int64_t(b) * S * ldq + h * DH;
  const uint16_t* K = static_cast<const uint16_t*>(p.k) + int64_t(b) * S * ldk + g * DH;
  const uint16_t* V = static_cast<const uint16_t*>(p.v) + int64_t(b) * S * ldk + g * DH;
  const int32_t* sg = p.seg ? p.seg + int64_t(b) * S : nullptr;
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sK = sQ + BR * LDS;      // [2][BC][LDS]
  uint16_t* sV = sK + 2 * BC * LDS;  // [2][BC][LDS]
  const int n_kt = (fa_imin(q0 + BR, S) - 1) / BC + 1;  // key tiles up to the diagonal

  fa_load_rows<DH, LDS, NT>(sQ, Q, ldq, q0, BR, S, tid);
  fa_load_rows<DH, LDS, NT>(sK, K, ldk, 0, BC, S, tid);
  fa_load_rows<DH, LDS, NT>(sV, V, ldk, 0, BC, S, tid);
  fa_cp_commit();

  const int warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int w0 = q0 + warp * 16;                      // the warp's first query row
  const int w_last = fa_imin(w0 + 15, S - 1);         // its last valid row
  const int row[2] = {w0 + gq, w0 + gq + 8};          // this lane's rows
  float o[DH / 8][4];
FA_UNROLL
  for (int i = 0; i < DH / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m[2] = {fa_ninf(), fa_ninf()}, l[2] = {0.0f, 0.0f};  // l: this lane's partial sums

  for (int j = 0; j < n_kt; ++j) {
    const int st = j & 1;
    fa_kv_next<DH, LDS, NT, BC>(sK, sV, K, V, ldk, j, n_kt, S, tid);
    const int k0 = j * BC;
    if (w0 < S && k0 <= w_last) {  // warp-uniform: the tile holds keys this warp attends to
      float s[BC / 8][4];
FA_UNROLL
      for (int i = 0; i < BC / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
      fa_mm_abt<DH, LDS, BC>(s, sQ + warp * 16 * LDS, sK + st * BC * LDS, lane);
      const bool mask = k0 + BC - 1 > w0;  // the tile crosses this warp's diagonal
FA_UNROLL
      for (int hr = 0; hr < 2; ++hr) {
        float mx = fa_ninf();
FA_UNROLL
        for (int nb = 0; nb < BC / 8; ++nb)
FA_UNROLL
          for (int e = 0; e < 2; ++e) {
            float x = s[nb][2 * hr + e] * p.scale_log2;
            const int col = k0 + nb * 8 + 2 * tq + e;
            if ((mask && col > row[hr]) || !fa_seg_ok(sg, S, row[hr], col)) x = fa_ninf();
            s[nb][2 * hr + e] = x;
            mx = fmaxf(mx, x);
          }
        mx = fmaxf(mx, fa_shfl_xor(mx, 1));
        mx = fmaxf(mx, fa_shfl_xor(mx, 2));
        const float mn = fmaxf(m[hr], mx);
        const float ms = mn == fa_ninf() ? 0.0f : mn;  // a row with nothing yet: no NaN
        const float alpha = fa_exp2(m[hr] - ms);
        m[hr] = mn;
        float sum = 0.0f;
FA_UNROLL
        for (int nb = 0; nb < BC / 8; ++nb)
FA_UNROLL
          for (int e = 0; e < 2; ++e) {
            const float pe = fa_exp2(s[nb][2 * hr + e] - ms);
            s[nb][2 * hr + e] = pe;
            sum += pe;
          }
        l[hr] = l[hr] * alpha + sum;
FA_UNROLL
        for (int db = 0; db < DH / 8; ++db) {
          o[db][2 * hr] *= alpha;
          o[db][2 * hr + 1] *= alpha;
        }
      }
      fa_mm_pb<DH, LDS, BC>(o, s, sV + st * BC * LDS, lane);
    }
    fa_sync();  // the stage is free for the prefetch of iteration j + 1
  }

  float inv[2];
FA_UNROLL
  for (int hr = 0; hr < 2; ++hr) {
    float lt = l[hr];
    lt += fa_shfl_xor(lt, 1);
    lt += fa_shfl_xor(lt, 2);
    inv[hr] = 1.0f / lt;
    if (tq == 0 && row[hr] < S) p.lse[int64_t(bh) * S + row[hr]] = (m[hr] + fa_log2(lt)) * kLn2;
  }
FA_UNROLL
  for (int db = 0; db < DH / 8; ++db) {
    o[db][0] *= inv[0];
    o[db][1] *= inv[0];
    o[db][2] *= inv[1];
    o[db][3] *= inv[1];
  }
  uint16_t* O = static_cast<uint16_t*>(p.out) + int64_t(b) * S * ldq + h * DH;
  fa_store_rows<DH>(O, ldq, w0, S, o, 1.0f, lane);
}

// ---- backward pre-pass: D = rowsum(dO * O) ------------------------------------------------------

// One warp per row (token t, head h); kDeltaWarps rows per block.
template <class E> FA_DEV void delta_rows(const Params& p, int tid, int blk) {
  const int64_t rows = int64_t(p.B) * p.S * p.H;
  const int64_t r = int64_t(blk) * kDeltaWarps + (tid >> 5);
  if (r >= rows) return;  // warp-uniform
  const int lane = tid & 31;
  const int64_t t = r / p.H, h = r - t * p.H, b = t / p.S, s = t - b * p.S;
  const int64_t ld = int64_t(p.H) * p.Dh;
  const E* dO = static_cast<const E*>(p.dout) + t * ld + h * p.Dh;
  const E* O = static_cast<const E*>(p.o) + t * ld + h * p.Dh;
  float acc = 0.0f;
  for (int d = lane; d < p.Dh; d += 32) acc += fa_ld(dO, d) * fa_ld(O, d);
  acc = fa_warp_sum(acc);
  if (lane == 0) p.delta[(b * p.H + h) * p.S + s] = acc;
}

// The same sums for the tensor-core kernels' bf16 rows (16-byte aligned, Dh 64 or 128): one warp
// per token over all its heads, Dh / 8 lanes per head, each lane adding the products of one
// 16-byte vector of dO and O; a head's lanes add up by shuffles. A warp per (token, head) with
// 2-byte loads ran at a third of the memory speed (A: 31 us a call for 32 MB; kernel census,
// docs/performance.md, eighth session).
FA_DEV void delta_rows_vec(const Params& p, int tid, int blk) {
  const int64_t t = int64_t(blk) * kDeltaWarps + (tid >> 5);
  if (t >= int64_t(p.B) * p.S) return;  // warp-uniform
  const int lane = tid & 31, G = p.Dh / 8, heads_per_pass = 32 / G;
  const int64_t ld = int64_t(p.H) * p.Dh, b = t / p.S, s = t - b * p.S;
  const uint16_t* dO = static_cast<const uint16_t*>(p.dout) + t * ld;
  const uint16_t* O = static_cast<const uint16_t*>(p.o) + t * ld;
  for (int h0 = 0; h0 < p.H; h0 += heads_per_pass) {
    const int h = h0 + lane / G;
    float acc = 0.0f;
    if (h < p.H) {
      const int64_t at = int64_t(h) * p.Dh + (lane % G) * 8;
      uint32_t a[4], o[4];
      fa_ld128(dO + at, a);
      fa_ld128(O + at, o);
      for (int j = 0; j < 4; ++j) {
        acc += fa_bf16_to_f(uint16_t(a[j] & 0xffffu)) * fa_bf16_to_f(uint16_t(o[j] & 0xffffu));
        acc += fa_bf16_to_f(uint16_t(a[j] >> 16)) * fa_bf16_to_f(uint16_t(o[j] >> 16));
      }
    }
    for (int m = 1; m < G; m <<= 1) acc += fa_shfl_xor(acc, m);  // within the head's G lanes
    if (h < p.H && lane % G == 0) p.delta[(b * p.H + h) * p.S + s] = acc;
  }
}

// ---- two m16 tiles per warp: fwd2_tc, dq2_tc, dkv2_tc ------------------------------------------
// Each warp owns 32 rows (forward, dQ: queries; dK/dV: keys) as two m16 tiles, so that every B
// fragment that ldmatrix reads from shared memory feeds two mma instead of one. 4 warps per
// block, 128 threads, at most 255 registers and 102 KiB of shared memory: 2 blocks per SM. dK/dV
// for DH 128: dkv2s_tc below.

template <int DH> struct Fwd2Tc {
  // DH 128 only: at 64, fwd_tc measured faster (even with Q's fragments kept in registers here).
  static_assert(DH == 128, "fwd2_tc: head width 128 (fwd_tc runs 64)");
  static constexpr int kThreads = 128, MT = 2, BR = 128, BC = 64, LDS = DH + 8;
  static constexpr size_t kSmem = size_t(BR + 4 * BC) * LDS * 2;  // Q, 2 stages of K and V
};
template <int DH> struct Dq2Tc {
  // BC 32 for DH 128: dQ (128 accumulators) plus S and dP (2 x 2 x BC / 2) within 255 registers.
  static constexpr int kThreads = 128, MT = 2, BR = 128, BC = DH == 64 ? 64 : 32, LDS = DH + 8;
  static constexpr size_t kSmem = size_t(2 * BR + 4 * BC) * LDS * 2;  // Q, dO, 2 x (K, V)
};
template <int DH> struct Dkv2Tc {
  // DH 64 only: dK and dV of 32 keys take 128 accumulators; for DH 128 they would take 256.
  static_assert(DH == 64, "dkv2_tc: head width 64 only");
  static constexpr int kThreads = 128, MT = 2, BC = 128, BR = 32, LDS = DH + 8;
  static constexpr size_t kSmem = size_t(2 * BC + 4 * BR) * LDS * 2 + size_t(4 * BR) * 4;
};

// acc[mt][n0] += a[mt] x (b[0], b[1]) and acc[mt][n0 + 1] += a[mt] x (b[2], b[3]) for every m
// tile: one ldmatrix.x4 B fragment (two n8 blocks) feeding all MT tiles.
template <int MT, int NA>
FA_DEV void fa_mma_tiles(float (&acc)[MT][NA][4], int n0, const uint32_t (&a)[MT][4],
                         const uint32_t (&b)[4]) {
FA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    fa_mma(acc[mt][n0], a[mt], b[0], b[1]);
    fa_mma(acc[mt][n0 + 1], a[mt], b[2], b[3]);
  }
}

// acc[mt] += A_mt (16 rows at sA + 16 mt rows, DH wide) x B^T, B rows n = 0..N-1 at sB ([n][k]);
// each B fragment feeds MT m tiles. n blocks of 16 outside [nlo, nhi) (warp-uniform: wholly
// masked) are skipped and keep their accumulators.
template <int DH, int LDS, int N, int MT>
FA_DEV void fa_mm_abt2(float (&acc)[MT][N / 8][4], const uint16_t* sA, const uint16_t* sB, int nlo,
                       int nhi, int lane) {
FA_UNROLL
  for (int kk = 0; kk < DH / 16; ++kk) {
    uint32_t a[MT][4];
FA_UNROLL
    for (int mt = 0; mt < MT; ++mt) fa_lds_a<LDS>(a[mt], sA + mt * 16 * LDS + kk * 16, lane);
FA_UNROLL
    for (int nb = 0; nb < N / 16; ++nb) {
      if (nb < nlo || nb >= nhi) continue;
      uint32_t b[4];
      fa_lds_b_nk<LDS>(b, sB + nb * 16 * LDS + kk * 16, lane);
      fa_mma_tiles(acc, 2 * nb, a, b);
    }
  }
}

// acc[mt] (16 x DH) += P_mt (16 x K, bf16 rounding of p[mt]) x B, B [k][n] at sB (K rows, DH
// columns); k blocks of 16 outside [klo, khi) (warp-uniform: P is 0 there) are skipped.
template <int DH, int LDS, int K, int MT>
FA_DEV void fa_mm_pb2(float (&acc)[MT][DH / 8][4], const float (&p)[MT][K / 8][4], const uint16_t* sB,
                      int klo, int khi, int lane) {
FA_UNROLL
  for (int kb = 0; kb < K / 16; ++kb) {
    if (kb < klo || kb >= khi) continue;
    uint32_t a[MT][4];
FA_UNROLL
    for (int mt = 0; mt < MT; ++mt) fa_acc_to_a(a[mt], p[mt][2 * kb], p[mt][2 * kb + 1]);
FA_UNROLL
    for (int dp = 0; dp < DH / 16; ++dp) {
      uint32_t b[4];
      fa_lds_b_kn<LDS>(b, sB + kb * 16 * LDS + dp * 16, lane);
      fa_mma_tiles(acc, 2 * dp, a, b);
    }
  }
}

// Forward, head width 128. Grid as fwd_tc. Warp w owns query rows q0 + 32w .. + 31; in the tile that holds
// its diagonal, key blocks of 16 wholly right of its last row are skipped.
template <int DH>
FA_DEV void fwd2_tc(const Params& p, char* smem, int tid, int bh, int ty) {
  using C = Fwd2Tc<DH>;
  constexpr int BR = C::BR, BC = C::BC, LDS = C::LDS, NT = C::kThreads, MT = C::MT, WR = 16 * MT;
  const int S = p.S, H = p.H;
  const int b = bh / H, h = bh - b * H, g = h / (H / p.Hkv);
  const int n_qt = (S + BR - 1) / BR, q0 = (n_qt - 1 - ty) * BR;
  const int64_t ldq = int64_t(H) * DH, ldk = int64_t(p.Hkv) * DH;
  const uint16_t* Q = static_cast<const uint16_t*>(p.q) + int64_t(b) * S * ldq + h * DH;
  const uint16_t* K = static_cast<const uint16_t*>(p.k) + int64_t(b) * S * ldk + g * DH;
  const uint16_t* V = static_cast<const uint16_t*>(p.v) + int64_t(b) * S * ldk + g * DH;
  const int32_t* sg = p.seg ? p.seg + int64_t(b) * S : nullptr;
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sK = sQ + BR * LDS;      // [2][BC][LDS]
  uint16_t* sV = sK + 2 * BC * LDS;  // [2][BC][LDS]
  const int n_kt = (fa_imin(q0 + BR, S) - 1) / BC + 1;

  fa_load_rows<DH, LDS, NT>(sQ, Q, ldq, q0, BR, S, tid);
  fa_load_rows<DH, LDS, NT>(sK, K, ldk, 0, BC, S, tid);
  fa_load_rows<DH, LDS, NT>(sV, V, ldk, 0, BC, S, tid);
  fa_cp_commit();

  const int warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int w0 = q0 + warp * WR, w_last = fa_imin(w0 + WR - 1, S - 1);
  float o[MT][DH / 8][4];
  float m[MT][2], l[MT][2];  // l: this lane's partial sums
FA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
FA_UNROLL
    for (int i = 0; i < DH / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.0f;
    m[mt][0] = m[mt][1] = fa_ninf();
    l[mt][0] = l[mt][1] = 0.0f;
  }

  for (int j = 0; j < n_kt; ++j) {
    const int st = j & 1;
    fa_kv_next<DH, LDS, NT, BC>(sK, sV, K, V, ldk, j, n_kt, S, tid);
    const int k0 = j * BC;
    if (w0 < S && k0 <= w_last) {  // warp-uniform
      const int nhi = fa_imin(BC / 16, (w_last - k0) / 16 + 1);  // blocks reaching the warp's rows
      float s[MT][BC / 8][4];
FA_UNROLL
      for (int mt = 0; mt < MT; ++mt)
FA_UNROLL
        for (int i = 0; i < BC / 8; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.0f;
      fa_mm_abt2<DH, LDS, BC, MT>(s, sQ + warp * WR * LDS, sK + st * BC * LDS, 0, nhi, lane);
      const bool mask = k0 + BC - 1 > w0;  // the tile crosses this warp's diagonal
FA_UNROLL
      for (int mt = 0; mt < MT; ++mt)
FA_UNROLL
        for (int hr = 0; hr < 2; ++hr) {
          const int row = w0 + mt * 16 + gq + 8 * hr;
          float mx = fa_ninf();
FA_UNROLL
          for (int nb = 0; nb < BC / 8; ++nb)
FA_UNROLL
            for (int e = 0; e < 2; ++e) {
              float x = s[mt][nb][2 * hr + e] * p.scale_log2;
              const int col = k0 + nb * 8 + 2 * tq + e;
              if ((mask && col > row) || !fa_seg_ok(sg, S, row, col)) x = fa_ninf();
              s[mt][nb][2 * hr + e] = x;
              mx = fmaxf(mx, x);
            }
          mx = fmaxf(mx, fa_shfl_xor(mx, 1));
          mx = fmaxf(mx, fa_shfl_xor(mx, 2));
          const float mn = fmaxf(m[mt][hr], mx);
          const float ms = mn == fa_ninf() ? 0.0f : mn;  // a row with nothing yet: no NaN
          const float alpha = fa_exp2(m[mt][hr] - ms);
          m[mt][hr] = mn;
          float sum = 0.0f;
FA_UNROLL
          for (int nb = 0; nb < BC / 8; ++nb)
FA_UNROLL
            for (int e = 0; e < 2; ++e) {
              const float pe = fa_exp2(s[mt][nb][2 * hr + e] - ms);
              s[mt][nb][2 * hr + e] = pe;
              sum += pe;
            }
          l[mt][hr] = l[mt][hr] * alpha + sum;
FA_UNROLL
          for (int db = 0; db < DH / 8; ++db) {
            o[mt][db][2 * hr] *= alpha;
            o[mt][db][2 * hr + 1] *= alpha;
          }
        }
      fa_mm_pb2<DH, LDS, BC, MT>(o, s, sV + st * BC * LDS, 0, nhi, lane);
    }
    fa_sync();  // the stage is free for the prefetch of iteration j + 1
  }

  uint16_t* O = static_cast<uint16_t*>(p.out) + int64_t(b) * S * ldq + h * DH;
FA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2];
FA_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      const int row = w0 + mt * 16 + gq + 8 * hr;
      float lt = l[mt][hr];
      lt += fa_shfl_xor(lt, 1);
      lt += fa_shfl_xor(lt, 2);
      inv[hr] = 1.0f / lt;
      if (tq == 0 && row < S) p.lse[int64_t(bh) * S + row] = (m[mt][hr] + fa_log2(lt)) * kLn2;
    }
FA_UNROLL
    for (int db = 0; db < DH / 8; ++db) {
      o[mt][db][0] *= inv[0];
      o[mt][db][1] *= inv[0];
      o[mt][db][2] *= inv[1];
      o[mt][db][3] *= inv[1];
    }
    fa_store_rows<DH>(O, ldq, w0 + mt * 16, S, o[mt], 1.0f, lane);
  }
}

// dQ. Grid: x = b*H + h, y = query tile (reversed, as the forward); warp w owns query rows
// q0 + 32w .. + 31. dQ_i = scale sum_{j<=i} P_ij (dP_ij - D_i) K_j.
template <int DH>
FA_DEV void dq2_tc(const Params& p, char* smem, int tid, int bh, int ty) {
  using C = Dq2Tc<DH>;
  constexpr int BR = C::BR, BC = C::BC, LDS = C::LDS, NT = C::kThreads, MT = C::MT, WR = 16 * MT;
  const int S = p.S, H = p.H;
  const int b = bh / H, h = bh - b * H, g = h / (H / p.Hkv);
  const int n_qt = (S + BR - 1) / BR, q0 = (n_qt - 1 - ty) * BR;
  const int64_t ldq = int64_t(H) * DH, ldk = int64_t(p.Hkv) * DH;
  const uint16_t* Q = static_cast<const uint16_t*>(p.q) + int64_t(b) * S * ldq + h * DH;
  const uint16_t* dO = static_cast<const uint16_t*>(p.dout) + int64_t(b) * S * ldq + h * DH;
  const uint16_t* K = static_cast<const uint16_t*>(p.k) + int64_t(b) * S * ldk + g * DH;
  const uint16_t* V = static_cast<const uint16_t*>(p.v) + int64_t(b) * S * ldk + g * DH;
  const int32_t* sg = p.seg ? p.seg + int64_t(b) * S : nullptr;
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sdO = sQ + BR * LDS;
  uint16_t* sK = sdO + BR * LDS;     // [2][BC][LDS]
  uint16_t* sV = sK + 2 * BC * LDS;  // [2][BC][LDS]
  const int n_kt = (fa_imin(q0 + BR, S) - 1) / BC + 1;

  fa_load_rows<DH, LDS, NT>(sQ, Q, ldq, q0, BR, S, tid);
  fa_load_rows<DH, LDS, NT>(sdO, dO, ldq, q0, BR, S, tid);
  fa_load_rows<DH, LDS, NT>(sK, K, ldk, 0, BC, S, tid);
  fa_load_rows<DH, LDS, NT>(sV, V, ldk, 0, BC, S, tid);
  fa_cp_commit();

  const int warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int w0 = q0 + warp * WR, w_last = fa_imin(w0 + WR - 1, S - 1);
  float lse2[MT][2], dr[MT][2];
  float dq[MT][DH / 8][4];
FA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
FA_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      const int row = w0 + mt * 16 + gq + 8 * hr;
      const bool ok = row < S;
      lse2[mt][hr] = ok ? p.lse[int64_t(bh) * S + row] * kLog2e : 0.0f;
      dr[mt][hr] = ok ? p.delta[int64_t(bh) * S + row] : 0.0f;
    }
FA_UNROLL
    for (int i = 0; i < DH / 8; ++i) dq[mt][i][0] = dq[mt][i][1] = dq[mt][i][2] = dq[mt][i][3] = 0.0f;
  }

  for (int j = 0; j < n_kt; ++j) {
    const int st = j & 1;
    fa_kv_next<DH, LDS, NT, BC>(sK, sV, K, V, ldk, j, n_kt, S, tid);
    const int k0 = j * BC;
    if (w0 < S && k0 <= w_last) {  // warp-uniform
      const int nhi = fa_imin(BC / 16, (w_last - k0) / 16 + 1);
      float s[MT][BC / 8][4], dp[MT][BC / 8][4];
FA_UNROLL
      for (int mt = 0; mt < MT; ++mt)
FA_UNROLL
        for (int i = 0; i < BC / 8; ++i) {
          s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.0f;
          dp[mt][i][0] = dp[mt][i][1] = dp[mt][i][2] = dp[mt][i][3] = 0.0f;
        }
      fa_mm_abt2<DH, LDS, BC, MT>(s, sQ + warp * WR * LDS, sK + st * BC * LDS, 0, nhi, lane);    // Q K^T
      fa_mm_abt2<DH, LDS, BC, MT>(dp, sdO + warp * WR * LDS, sV + st * BC * LDS, 0, nhi, lane);  // dO V^T
      const bool mask = k0 + BC - 1 > w0 || w0 + WR - 1 >= S;
FA_UNROLL
      for (int mt = 0; mt < MT; ++mt)
FA_UNROLL
        for (int hr = 0; hr < 2; ++hr) {
          const int row = w0 + mt * 16 + gq + 8 * hr;
FA_UNROLL
          for (int nb = 0; nb < BC / 8; ++nb)
FA_UNROLL
            for (int e = 0; e < 2; ++e) {
              const int col = k0 + nb * 8 + 2 * tq + e;
              const bool off = (mask && (col > row || row >= S)) || !fa_seg_ok(sg, S, row, col);
              const float pe = off ? 0.0f : fa_exp2(s[mt][nb][2 * hr + e] * p.scale_log2 - lse2[mt][hr]);
              s[mt][nb][2 * hr + e] = pe * (dp[mt][nb][2 * hr + e] - dr[mt][hr]);  // dS
            }
        }
      fa_mm_pb2<DH, LDS, BC, MT>(dq, s, sK + st * BC * LDS, 0, nhi, lane);  // dS K
    }
    fa_sync();
  }
  uint16_t* dQ = static_cast<uint16_t*>(p.dq) + int64_t(b) * S * ldq + h * DH;
FA_UNROLL
  for (int mt = 0; mt < MT; ++mt) fa_store_rows<DH>(dQ, ldq, w0 + mt * 16, S, dq[mt], p.scale, lane);
}

// The tiles of a dK/dV block (dkv2_tc, dkv2s_tc). Grid: x = b*Hkv + g, y = key tile (tile 0,
// the most work, first). The block keeps keys key0 .. key0 + BC - 1 of K and V in shared memory
// and visits, head-major, every (head of the group, query tile from the diagonal down) pair:
// iteration it is head g*G + it / nq, query tile qt0 + it % nq. Q, dO, lse and D of those tiles
// are double-buffered with cp.async (stage it & 1). Shared memory: K, V [BC][LDS]; Q, dO
// [2][BR][LDS]; lse, D [2][BR] f32; a kernel's own buffers follow from end().
template <int DH, int BC, int BR, int LDS, int NT> struct DkvTiles {
  const Params& p;
  int tid, S, H, G, b, g, key0, qt0, nq, total;
  int64_t ldq, ldk;
  const uint16_t *Qb, *dOb, *K, *V;
  const int32_t* sg;  // this sequence's segment ids, or null
  uint16_t *sK, *sV, *sQ, *sdO;
  float *sL, *sD;

  FA_DEV DkvTiles(const Params& pp, char* smem, int tid_, int bg, int ty) : p(pp), tid(tid_) {
    S = p.S;
    H = p.H;
    G = H / p.Hkv;
    b = bg / p.Hkv;
    g = bg - b * p.Hkv;
    key0 = ty * BC;
    ldq = int64_t(H) * DH;
    ldk = int64_t(p.Hkv) * DH;
    Qb = static_cast<const uint16_t*>(p.q) + int64_t(b) * S * ldq;
    dOb = static_cast<const uint16_t*>(p.dout) + int64_t(b) * S * ldq;
    K = static_cast<const uint16_t*>(p.k) + int64_t(b) * S * ldk + g * DH;
    V = static_cast<const uint16_t*>(p.v) + int64_t(b) * S * ldk + g * DH;
    sg = p.seg ? p.seg + int64_t(b) * S : nullptr;
    sK = reinterpret_cast<uint16_t*>(smem);
    sV = sK + BC * LDS;
    sQ = sV + BC * LDS;
    sdO = sQ + 2 * BR * LDS;
    sL = reinterpret_cast<float*>(sdO + 2 * BR * LDS);
    sD = sL + 2 * BR;
    qt0 = key0 / BR;
    nq = (S + BR - 1) / BR - qt0;
    total = G * nq;
  }
  FA_DEV char* end() const { return reinterpret_cast<char*>(sD + 2 * BR); }
  FA_DEV int head(int it) const { return g * G + it / nq; }
  FA_DEV int query0(int it) const { return (qt0 + it % nq) * BR; }
  // Starts the copies of iteration it's Q, dO (rows past S: 0), lse and D into stage st.
  FA_DEV void issue(int it, int st) const {
    const int h = head(it), r0 = query0(it);
    fa_load_rows<DH, LDS, NT>(sQ + st * BR * LDS, Qb + h * DH, ldq, r0, BR, S, tid);
    fa_load_rows<DH, LDS, NT>(sdO + st * BR * LDS, dOb + h * DH, ldq, r0, BR, S, tid);
    const int64_t lrow = (int64_t(b) * H + h) * S;
    for (int i = tid; i < BR; i += NT) {
      const int r = r0 + i;
      const int64_t src = lrow + (r < S ? r : 0);
      fa_cp_async4(sL + st * BR + i, p.lse + src, r < S);
      fa_cp_async4(sD + st * BR + i, p.delta + src, r < S);
    }
  }
  // K and V of the block's keys, and iteration 0's tiles.
  FA_DEV void start() const {
    fa_load_rows<DH, LDS, NT>(sK, K, ldk, key0, BC, S, tid);
    fa_load_rows<DH, LDS, NT>(sV, V, ldk, key0, BC, S, tid);
    issue(0, 0);
    fa_cp_commit();
  }
  // Iteration it's tiles in shared memory: its first query row, Q and dO [BR][LDS], lse and D.
  struct Stage {
    int q0;
    const uint16_t *Q, *dO;
    const float *L, *D;
  };
  // Prefetches iteration it + 1 into the other stage, waits until iteration it's stage has
  // landed for every thread, and returns it.
  FA_DEV Stage wait_for(int it) const {
    const int st = it & 1;
    if (it + 1 < total) {
      issue(it + 1, st ^ 1);
      fa_cp_commit();
      fa_cp_wait<1>();
    } else {
      fa_cp_wait<0>();
    }
    fa_sync();
    return Stage{query0(it), sQ + st * BR * LDS, sdO + st * BR * LDS, sL + st * BR, sD + st * BR};
  }
};

// dK, dV (DH 64). Grid: x = b*Hkv + g, y = key tile (tile 0, the most work, first); warp w owns
// keys key0 + 32w .. + 31 and computes the transposed products directly: S^T = K Q^T,
// dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Q, each Q / dO fragment feeding
// both key tiles.
template <int DH>
FA_DEV void dkv2_tc(const Params& p, char* smem, int tid, int bg, int ty) {
  using C = Dkv2Tc<DH>;
  constexpr int BC = C::BC, BR = C::BR, LDS = C::LDS, NT = C::kThreads, MT = C::MT, WR = 16 * MT;
  const DkvTiles<DH, BC, BR, LDS, NT> t(p, smem, tid, bg, ty);
  const int S = t.S, key0 = t.key0;
  const int32_t* sg = t.sg;
  t.start();

  const int warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int kw0 = key0 + warp * WR;  // the warp's first key
  float dk[MT][DH / 8][4], dv[MT][DH / 8][4];
FA_UNROLL
  for (int mt = 0; mt < MT; ++mt)
FA_UNROLL
    for (int i = 0; i < DH / 8; ++i) {
      dk[mt][i][0] = dk[mt][i][1] = dk[mt][i][2] = dk[mt][i][3] = 0.0f;
      dv[mt][i][0] = dv[mt][i][1] = dv[mt][i][2] = dv[mt][i][3] = 0.0f;
    }

  for (int it = 0; it < t.total; ++it) {
    const auto [q0, tQ, tdO, tL, tD] = t.wait_for(it);
    if (kw0 < S && q0 + BR - 1 >= kw0) {  // warp-uniform: some query of the tile sees a key
      float sT[MT][BR / 8][4], dpT[MT][BR / 8][4];
FA_UNROLL
      for (int mt = 0; mt < MT; ++mt)
FA_UNROLL
        for (int i = 0; i < BR / 8; ++i) {
          sT[mt][i][0] = sT[mt][i][1] = sT[mt][i][2] = sT[mt][i][3] = 0.0f;
          dpT[mt][i][0] = dpT[mt][i][1] = dpT[mt][i][2] = dpT[mt][i][3] = 0.0f;
        }
      fa_mm_abt2<DH, LDS, BR, MT>(sT, t.sK + warp * WR * LDS, tQ, 0, BR / 16, lane);  // K Q^T
      const bool mask = q0 < kw0 + WR - 1 || q0 + BR > S;
FA_UNROLL
      for (int nb = 0; nb < BR / 8; ++nb)
FA_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int ql = nb * 8 + 2 * tq + e, qc = q0 + ql;
          const float l2 = tL[ql] * kLog2e;
FA_UNROLL
          for (int mt = 0; mt < MT; ++mt)
FA_UNROLL
            for (int hr = 0; hr < 2; ++hr) {
              const int kr = kw0 + mt * 16 + gq + 8 * hr;
              const bool off = (mask && (qc < kr || qc >= S)) || !fa_seg_ok(sg, S, qc, kr);
              sT[mt][nb][2 * hr + e] = off ? 0.0f : fa_exp2(sT[mt][nb][2 * hr + e] * p.scale_log2 - l2);
            }
        }
      fa_mm_pb2<DH, LDS, BR, MT>(dv, sT, tdO, 0, BR / 16, lane);                     // dV += P^T dO
      fa_mm_abt2<DH, LDS, BR, MT>(dpT, t.sV + warp * WR * LDS, tdO, 0, BR / 16, lane);  // V dO^T
FA_UNROLL
      for (int nb = 0; nb < BR / 8; ++nb)
FA_UNROLL
        for (int e = 0; e < 2; ++e) {
          const float dq = tD[nb * 8 + 2 * tq + e];
FA_UNROLL
          for (int mt = 0; mt < MT; ++mt)
FA_UNROLL
            for (int hr = 0; hr < 2; ++hr)
              sT[mt][nb][2 * hr + e] = sT[mt][nb][2 * hr + e] * (dpT[mt][nb][2 * hr + e] - dq);  // dS^T
        }
      fa_mm_pb2<DH, LDS, BR, MT>(dk, sT, tQ, 0, BR / 16, lane);  // dK += dS^T Q
    }
    fa_sync();
  }
  uint16_t* dK = static_cast<uint16_t*>(p.dk) + int64_t(t.b) * S * t.ldk + t.g * DH;
  uint16_t* dV = static_cast<uint16_t*>(p.dv) + int64_t(t.b) * S * t.ldk + t.g * DH;
FA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    fa_store_rows<DH>(dK, t.ldk, kw0 + mt * 16, S, dk[mt], p.scale, lane);
    fa_store_rows<DH>(dV, t.ldk, kw0 + mt * 16, S, dv[mt], 1.0f, lane);
  }
}

// dK, dV for DH 128 (any DH that is a multiple of 32 works): 32 keys per warp would need
// 2 x 2 x DH / 2 accumulators for dK and dV alone, so 8 warps split the work twice over. Block of
// 128 keys, query tiles of 64. Phase 1: warp (wk, wx) computes S^T, dP^T and dS^T for keys
// key0 + 32 wk .. + 31 x queries 32 wx .. + 31 of the tile and writes P^T and dS^T to shared
// memory as bf16 (the rounding any mma operand gets). Phase 2: the same warp
// accumulates dV += P^T dO and dK += dS^T Q for its 32 keys x columns DH/2 wx .. + DH/2 - 1,
// reading P^T and dS^T of all 64 queries. Each fragment feeds two mma in both phases.
template <int DH> struct Dkv2sTc {
  static constexpr int kThreads = 256, MT = 2, BC = 128, BR = 64, LDS = DH + 8, LDP = BR + 8;
  // K, V; 2 stages of Q and dO; P^T and dS^T; 2 stages of lse and D (f32).
  static constexpr size_t kSmem =
      size_t(2 * BC + 4 * BR) * LDS * 2 + size_t(2 * BC) * LDP * 2 + size_t(4 * BR) * 4;
};

// acc[mt] (16 x N) += A_mt (16 rows at sA + 16 mt rows, [m][k], K wide) x B (sB, [k][n], N
// wide); k blocks of 16 outside [klo, khi) (warp-uniform: A is 0 there) are skipped.
template <int N, int LDA, int LDB, int K, int MT>
FA_DEV void fa_mm_ab2(float (&acc)[MT][N / 8][4], const uint16_t* sA, const uint16_t* sB, int klo,
                      int khi, int lane) {
FA_UNROLL
  for (int kb = 0; kb < K / 16; ++kb) {
    if (kb < klo || kb >= khi) continue;
    uint32_t a[MT][4];
FA_UNROLL
    for (int mt = 0; mt < MT; ++mt) fa_lds_a<LDA>(a[mt], sA + mt * 16 * LDA + kb * 16, lane);
FA_UNROLL
    for (int nb = 0; nb < N / 16; ++nb) {
      uint32_t b[4];
      fa_lds_b_kn<LDB>(b, sB + kb * 16 * LDB + nb * 16, lane);
      fa_mma_tiles(acc, 2 * nb, a, b);
    }
  }
}

template <int DH>
FA_DEV void dkv2s_tc(const Params& p, char* smem, int tid, int bg, int ty) {
  using C = Dkv2sTc<DH>;
  constexpr int BC = C::BC, BR = C::BR, LDS = C::LDS, LDP = C::LDP, NT = C::kThreads, MT = C::MT;
  constexpr int DW = DH / 2;  // phase 2: columns per warp
  const DkvTiles<DH, BC, BR, LDS, NT> t(p, smem, tid, bg, ty);
  const int S = t.S, key0 = t.key0;
  const int32_t* sg = t.sg;
  uint16_t* sP = reinterpret_cast<uint16_t*>(t.end());  // [BC][LDP] P^T
  uint16_t* sdS = sP + BC * LDP;                         // [BC][LDP] dS^T
  t.start();

  const int warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int wk = warp >> 1, wx = warp & 1;  // key group; query half (phase 1), column half (phase 2)
  const int kw0 = key0 + wk * 32;           // the warp's first key
  float dk[MT][DW / 8][4], dv[MT][DW / 8][4];
FA_UNROLL
  for (int mt = 0; mt < MT; ++mt)
FA_UNROLL
    for (int i = 0; i < DW / 8; ++i) {
      dk[mt][i][0] = dk[mt][i][1] = dk[mt][i][2] = dk[mt][i][3] = 0.0f;
      dv[mt][i][0] = dv[mt][i][1] = dv[mt][i][2] = dv[mt][i][3] = 0.0f;
    }

  for (int it = 0; it < t.total; ++it) {
    const auto [q0, tQ, tdO, tL, tD] = t.wait_for(it);
    {  // phase 1
      const int qw0 = q0 + wx * 32;  // the warp's first query
      float sT[MT][4][4], dsT[MT][4][4];
FA_UNROLL
      for (int mt = 0; mt < MT; ++mt)
FA_UNROLL
        for (int i = 0; i < 4; ++i) {
          sT[mt][i][0] = sT[mt][i][1] = sT[mt][i][2] = sT[mt][i][3] = 0.0f;
          dsT[mt][i][0] = dsT[mt][i][1] = dsT[mt][i][2] = dsT[mt][i][3] = 0.0f;
        }
      if (kw0 < S && qw0 < S && qw0 + 31 >= kw0) {  // warp-uniform; else P^T = dS^T = 0
        fa_mm_abt2<DH, LDS, 32, MT>(sT, t.sK + wk * 32 * LDS, tQ + wx * 32 * LDS, 0, 2, lane);    // K Q^T
        fa_mm_abt2<DH, LDS, 32, MT>(dsT, t.sV + wk * 32 * LDS, tdO + wx * 32 * LDS, 0, 2, lane);  // V dO^T
        const bool mask = qw0 < kw0 + 31 || qw0 + 32 > S;
FA_UNROLL
        for (int nb = 0; nb < 4; ++nb)
FA_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int ql = wx * 32 + nb * 8 + 2 * tq + e, qc = q0 + ql;
            const float l2 = tL[ql] * kLog2e, dq = tD[ql];
FA_UNROLL
            for (int mt = 0; mt < MT; ++mt)
FA_UNROLL
              for (int hr = 0; hr < 2; ++hr) {
                const int kr = kw0 + mt * 16 + gq + 8 * hr;
                const bool off = (mask && (qc < kr || qc >= S)) || !fa_seg_ok(sg, S, qc, kr);
                const float pe = off ? 0.0f : fa_exp2(sT[mt][nb][2 * hr + e] * p.scale_log2 - l2);
                sT[mt][nb][2 * hr + e] = pe;
                dsT[mt][nb][2 * hr + e] = pe * (dsT[mt][nb][2 * hr + e] - dq);  // dS^T
              }
          }
      }
FA_UNROLL
      for (int mt = 0; mt < MT; ++mt)
FA_UNROLL
        for (int hr = 0; hr < 2; ++hr) {
          const int r = (wk * 32 + mt * 16 + gq + 8 * hr) * LDP + wx * 32 + 2 * tq;
FA_UNROLL
          for (int nb = 0; nb < 4; ++nb) {
            fa_st32(sP + r + nb * 8, fa_pack_bf16(sT[mt][nb][2 * hr], sT[mt][nb][2 * hr + 1]));
            fa_st32(sdS + r + nb * 8, fa_pack_bf16(dsT[mt][nb][2 * hr], dsT[mt][nb][2 * hr + 1]));
          }
        }
    }
    fa_sync();  // P^T and dS^T of the whole tile are in shared memory
    if (kw0 < S && q0 + BR - 1 >= kw0) {  // phase 2; warp-uniform
      const int klo = fa_imax(0, (kw0 - q0) / 16);  // query blocks wholly before the warp's keys
      fa_mm_ab2<DW, LDP, LDS, BR, MT>(dv, sP + wk * 32 * LDP, tdO + wx * DW, klo, BR / 16, lane);
      fa_mm_ab2<DW, LDP, LDS, BR, MT>(dk, sdS + wk * 32 * LDP, tQ + wx * DW, klo, BR / 16, lane);
    }
    fa_sync();  // the stage, P^T and dS^T are free for the next iteration
  }
  uint16_t* dK = static_cast<uint16_t*>(p.dk) + int64_t(t.b) * S * t.ldk + t.g * DH + wx * DW;
  uint16_t* dV = static_cast<uint16_t*>(p.dv) + int64_t(t.b) * S * t.ldk + t.g * DH + wx * DW;
FA_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    fa_store_rows<DW>(dK, t.ldk, kw0 + mt * 16, S, dk[mt], p.scale, lane);
    fa_store_rows<DW>(dV, t.ldk, kw0 + mt * 16, S, dv[mt], 1.0f, lane);
  }
}

// ---- generic fp32 kernels (f32 or bf16 storage E, any head width <= 256) --------------------------

// Forward. Grid: x = b*H + h, y = query tile of Gen::QR rows (reversed); warp w owns rows
// 4w..4w+3 of the tile; for each key tile of 32, lane j scores key j, the warp updates the
// row's running max and sum, and every lane accumulates its output columns lane + 32 c.
template <class E>
FA_DEV void fwd_gen(const Params& p, char* smem, int tid, int bh, int ty) {
  constexpr int QR = Gen::QR, KC = Gen::KC, NT = Gen::kThreads;
  const int S = p.S, H = p.H, Dh = p.Dh, KS = Dh + 1;
  const int b = bh / H, h = bh - b * H, g = h / (H / p.Hkv);
  const int n_qt = (S + QR - 1) / QR, q0 = (n_qt - 1 - ty) * QR;
  const int64_t ldq = int64_t(H) * Dh, ldk = int64_t(p.Hkv) * Dh;
  const E* Q = static_cast<const E*>(p.q) + int64_t(b) * S * ldq + int64_t(h) * Dh;
  const E* K = static_cast<const E*>(p.k) + int64_t(b) * S * ldk + int64_t(g) * Dh;
  const E* V = static_cast<const E*>(p.v) + int64_t(b) * S * ldk + int64_t(g) * Dh;
  const int32_t* sg = p.seg ? p.seg + int64_t(b) * S : nullptr;
  float* sQ = reinterpret_cast<float*>(smem);  // [QR][Dh]
  float* sK = sQ + QR * Dh;                     // [KC][Dh + 1]
  float* sV = sK + KC * KS;                     // [KC][Dh]
  for (int i = tid; i < QR * Dh; i += NT) {
    const int r = i / Dh, d = i - r * Dh, gr = q0 + r;
    sQ[i] = gr < S ? fa_ld(Q, int64_t(gr) * ldq + d) : 0.0f;
  }
  const int warp = tid >> 5, lane = tid & 31;
  float acc[4][8], m[4], l[4];
FA_UNROLL
  for (int i = 0; i < 4; ++i) {
    m[i] = fa_ninf();
    l[i] = 0.0f;
FA_UNROLL
    for (int c = 0; c < 8; ++c) acc[i][c] = 0.0f;
  }
  const int n_kt = (fa_imin(q0 + QR, S) - 1) / KC + 1;
  for (int j = 0; j < n_kt; ++j) {
    const int k0 = j * KC;
    fa_sync();  // the previous tile is no longer read
    for (int i = tid; i < KC * Dh; i += NT) {
      const int r = i / Dh, d = i - r * Dh, gk = k0 + r;
      const bool ok = gk < S;
      sK[r * KS + d] = ok ? fa_ld(K, int64_t(gk) * ldk + d) : 0.0f;
      sV[r * Dh + d] = ok ? fa_ld(V, int64_t(gk) * ldk + d) : 0.0f;
    }
    fa_sync();
FA_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int lr = warp * 4 + i, r = q0 + lr;
      if (r >= S || k0 > r) continue;  // warp-uniform
      const bool ok = k0 + lane <= r && fa_seg_ok(sg, S, r, k0 + lane);
      float x = fa_ninf();
      if (ok) {
        float dot = 0.0f;
        for (int d = 0; d < Dh; ++d) dot += sQ[lr * Dh + d] * sK[lane * KS + d];
        x = dot * p.scale_log2;
      }
      const float mn = fmaxf(m[i], fa_warp_max(x));
      // Without segments key k0 <= r keeps the max finite; a tile of other records' keys only
      // leaves it at -inf, and then nothing changes (no NaN from -inf - -inf).
      const float ms = mn == fa_ninf() ? 0.0f : mn;
      const float alpha = fa_exp2(m[i] - ms);
      const float pe = ok ? fa_exp2(x - ms) : 0.0f;
      l[i] = l[i] * alpha + fa_warp_sum(pe);
      m[i] = mn;
FA_UNROLL
      for (int c = 0; c < 8; ++c) acc[i][c] *= alpha;
      const int jn = fa_imin(KC, r - k0 + 1);
      for (int jj = 0; jj < jn; ++jj) {
        const float pj = fa_shfl(pe, jj);
FA_UNROLL
        for (int c = 0; c < 8; ++c) {
          const int d = lane + 32 * c;
          if (d < Dh) acc[i][c] += pj * sV[jj * Dh + d];
        }
      }
    }
  }
  E* O = static_cast<E*>(p.out) + int64_t(b) * S * ldq + int64_t(h) * Dh;
FA_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int r = q0 + warp * 4 + i;
    if (r >= S) continue;
    const float inv = 1.0f / l[i];
FA_UNROLL
    for (int c = 0; c < 8; ++c) {
      const int d = lane + 32 * c;
      if (d < Dh) fa_st(O, int64_t(r) * ldq + d, acc[i][c] * inv);
    }
    if (lane == 0) p.lse[int64_t(bh) * S + r] = (m[i] + fa_log2(l[i])) * kLn2;
  }
}

// dQ. Grid as fwd_gen. Lane j: P_ij = exp2(s2_ij - lse2_i), dS_ij = P_ij (dO_i . V_j - D_i).
template <class E>
FA_DEV void dq_gen(const Params& p, char* smem, int tid, int bh, int ty) {
  constexpr int QR = Gen::QR, KC = Gen::KC, NT = Gen::kThreads;
  const int S = p.S, H = p.H, Dh = p.Dh, KS = Dh + 1;
  const int b = bh / H, h = bh - b * H, g = h / (H / p.Hkv);
  const int n_qt = (S + QR - 1) / QR, q0 = (n_qt - 1 - ty) * QR;
  const int64_t ldq = int64_t(H) * Dh, ldk = int64_t(p.Hkv) * Dh;
  const E* Q = static_cast<const E*>(p.q) + int64_t(b) * S * ldq + int64_t(h) * Dh;
  const E* dO = static_cast<const E*>(p.dout) + int64_t(b) * S * ldq + int64_t(h) * Dh;
  const E* K = static_cast<const E*>(p.k) + int64_t(b) * S * ldk + int64_t(g) * Dh;
  const E* V = static_cast<const E*>(p.v) + int64_t(b) * S * ldk + int64_t(g) * Dh;
  const int32_t* sg = p.seg ? p.seg + int64_t(b) * S : nullptr;
  float* sQ = reinterpret_cast<float*>(smem);  // [QR][Dh]
  float* sdO = sQ + QR * Dh;                    // [QR][Dh]
  float* sK = sdO + QR * Dh;                    // [KC][Dh + 1]
  float* sV = sK + KC * KS;                     // [KC][Dh + 1]
  for (int i = tid; i < QR * Dh; i += NT) {
    const int r = i / Dh, d = i - r * Dh, gr = q0 + r;
    sQ[i] = gr < S ? fa_ld(Q, int64_t(gr) * ldq + d) : 0.0f;
    sdO[i] = gr < S ? fa_ld(dO, int64_t(gr) * ldq + d) : 0.0f;
  }
  const int warp = tid >> 5, lane = tid & 31;
  float acc[4][8], lse2[4], dr[4];
FA_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int r = q0 + warp * 4 + i;
    lse2[i] = r < S ? p.lse[int64_t(bh) * S + r] * kLog2e : 0.0f;
    dr[i] = r < S ? p.delta[int64_t(bh) * S + r] : 0.0f;
FA_UNROLL
    for (int c = 0; c < 8; ++c) acc[i][c] = 0.0f;
  }
  const int n_kt = (fa_imin(q0 + QR, S) - 1) / KC + 1;
  for (int j = 0; j < n_kt; ++j) {
    const int k0 = j * KC;
    fa_sync();
    for (int i = tid; i < KC * Dh; i += NT) {
      const int r = i / Dh, d = i - r * Dh, gk = k0 + r;
      const bool ok = gk < S;
      sK[r * KS + d] = ok ? fa_ld(K, int64_t(gk) * ldk + d) : 0.0f;
      sV[r * KS + d] = ok ? fa_ld(V, int64_t(gk) * ldk + d) : 0.0f;
    }
    fa_sync();
FA_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int lr = warp * 4 + i, r = q0 + lr;
      if (r >= S || k0 > r) continue;
      float ds = 0.0f;
      if (k0 + lane <= r && fa_seg_ok(sg, S, r, k0 + lane)) {
        float qk = 0.0f, dov = 0.0f;
        for (int d = 0; d < Dh; ++d) {
          qk += sQ[lr * Dh + d] * sK[lane * KS + d];
          dov += sdO[lr * Dh + d] * sV[lane * KS + d];
        }
        ds = fa_exp2(qk * p.scale_log2 - lse2[i]) * (dov - dr[i]);
      }
      const int jn = fa_imin(KC, r - k0 + 1);
      for (int jj = 0; jj < jn; ++jj) {
        const float dsj = fa_shfl(ds, jj);
FA_UNROLL
        for (int c = 0; c < 8; ++c) {
          const int d = lane + 32 * c;
          if (d < Dh) acc[i][c] += dsj * sK[jj * KS + d];
        }
      }
    }
  }
  E* dQ = static_cast<E*>(p.dq) + int64_t(b) * S * ldq + int64_t(h) * Dh;
FA_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int r = q0 + warp * 4 + i;
    if (r >= S) continue;
FA_UNROLL
    for (int c = 0; c < 8; ++c) {
      const int d = lane + 32 * c;
      if (d < Dh) fa_st(dQ, int64_t(r) * ldq + d, acc[i][c] * p.scale);
    }
  }
}

// dK, dV. Grid: x = b*Hkv + g, y = key tile of Gen::KR keys; warp w owns keys 4w..4w+3 and
// loops over the group's heads in ascending order and, for each, over the query tiles of 32
// from the diagonal down; lane i handles query i of the tile.
template <class E>
FA_DEV void dkv_gen(const Params& p, char* smem, int tid, int bg, int ty) {
  constexpr int KR = Gen::KR, QC = Gen::QC, NT = Gen::kThreads;
  const int S = p.S, H = p.H, Hkv = p.Hkv, G = H / Hkv, Dh = p.Dh, KS = Dh + 1;
  const int b = bg / Hkv, g = bg - b * Hkv, key0 = ty * KR;
  const int64_t ldq = int64_t(H) * Dh, ldk = int64_t(Hkv) * Dh;
  const E* K = static_cast<const E*>(p.k) + int64_t(b) * S * ldk + int64_t(g) * Dh;
  const E* V = static_cast<const E*>(p.v) + int64_t(b) * S * ldk + int64_t(g) * Dh;
  const int32_t* sg = p.seg ? p.seg + int64_t(b) * S : nullptr;
  float* sK = reinterpret_cast<float*>(smem);  // [KR][Dh]
  float* sV = sK + KR * Dh;                     // [KR][Dh]
  float* sQ = sV + KR * Dh;                     // [QC][Dh + 1]
  float* sdO = sQ + QC * KS;                    // [QC][Dh + 1]
  float* sL = sdO + QC * KS;                    // [QC] lse2
  float* sD = sL + QC;                          // [QC] D
  for (int i = tid; i < KR * Dh; i += NT) {
    const int r = i / Dh, d = i - r * Dh, gk = key0 + r;
    sK[i] = gk < S ? fa_ld(K, int64_t(gk) * ldk + d) : 0.0f;
    sV[i] = gk < S ? fa_ld(V, int64_t(gk) * ldk + d) : 0.0f;
  }
  const int warp = tid >> 5, lane = tid & 31;
  float ak[4][8], av[4][8];
FA_UNROLL
  for (int i = 0; i < 4; ++i)
FA_UNROLL
    for (int c = 0; c < 8; ++c) ak[i][c] = av[i][c] = 0.0f;
  const int n_qt = (S + QC - 1) / QC, qt0 = key0 / QC;
  for (int hh = 0; hh < G; ++hh) {
    const int h = g * G + hh;
    const E* Q = static_cast<const E*>(p.q) + int64_t(b) * S * ldq + int64_t(h) * Dh;
    const E* dO = static_cast<const E*>(p.dout) + int64_t(b) * S * ldq + int64_t(h) * Dh;
    const int64_t lrow = (int64_t(b) * H + h) * S;
    for (int qt = qt0; qt < n_qt; ++qt) {
      const int q0 = qt * QC;
      fa_sync();
      for (int i = tid; i < QC * Dh; i += NT) {
        const int r = i / Dh, d = i - r * Dh, gr = q0 + r;
        const bool ok = gr < S;
        sQ[r * KS + d] = ok ? fa_ld(Q, int64_t(gr) * ldq + d) : 0.0f;
        sdO[r * KS + d] = ok ? fa_ld(dO, int64_t(gr) * ldq + d) : 0.0f;
      }
      for (int i = tid; i < QC; i += NT) {
        const int r = q0 + i;
        sL[i] = r < S ? p.lse[lrow + r] * kLog2e : 0.0f;
        sD[i] = r < S ? p.delta[lrow + r] : 0.0f;
      }
      fa_sync();
FA_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int kl = warp * 4 + i, kr = key0 + kl;
        if (kr >= S || q0 + QC - 1 < kr) continue;  // warp-uniform
        const int qc = q0 + lane;
        float pe = 0.0f, ds = 0.0f;
        if (qc >= kr && qc < S && fa_seg_ok(sg, S, qc, kr)) {
          float qk = 0.0f, dov = 0.0f;
          for (int d = 0; d < Dh; ++d) {
            qk += sK[kl * Dh + d] * sQ[lane * KS + d];
            dov += sV[kl * Dh + d] * sdO[lane * KS + d];
          }
          pe = fa_exp2(qk * p.scale_log2 - sL[lane]);
          ds = pe * (dov - sD[lane]);
        }
        const int j0 = fa_imax(0, kr - q0), j1 = fa_imin(QC, S - q0);
        for (int jj = j0; jj < j1; ++jj) {
          const float pj = fa_shfl(pe, jj), dj = fa_shfl(ds, jj);
FA_UNROLL
          for (int c = 0; c < 8; ++c) {
            const int d = lane + 32 * c;
            if (d < Dh) {
              av[i][c] += pj * sdO[jj * KS + d];
              ak[i][c] += dj * sQ[jj * KS + d];
            }
          }
        }
      }
    }
  }
  E* dK = static_cast<E*>(p.dk) + int64_t(b) * S * ldk + int64_t(g) * Dh;
  E* dV = static_cast<E*>(p.dv) + int64_t(b) * S * ldk + int64_t(g) * Dh;
FA_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int kr = key0 + warp * 4 + i;
    if (kr >= S) continue;
FA_UNROLL
    for (int c = 0; c < 8; ++c) {
      const int d = lane + 32 * c;
      if (d < Dh) {
        fa_st(dK, int64_t(kr) * ldk + d, ak[i][c] * p.scale);
        fa_st(dV, int64_t(kr) * ldk + d, av[i][c]);
      }
    }
  }
}

}  // namespace moelab::flash
