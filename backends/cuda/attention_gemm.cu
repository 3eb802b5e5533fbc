// moelab CUDA backend: f32 causal attention through cuBLAS GEMMs (the f32 path of
// Backend::attention_forward / attention_backward; bf16 runs the flash kernels).
//
// Why a second path: in f32 there are no tensor cores to feed, and the flash kernels' generic
// fp32 bodies (one warp per query row) ran at about 5-7 TFLOP/s, while cuBLAS's fp32 GEMMs run
// near the card's fp32 peak. Measured on one H200 (docs/performance.md): with the generic
// kernels the f32 training steps were 11-34% slower than with the old materialised attention.
//
// Method (same contract as the flash kernels: out and lse forward; backward recomputes P from
// lse, no probabilities kept between the passes):
//   forward   S = scale Q K^T; P = causal softmax(S) (row kernel, also writes lse); O = P V
//   backward  S = scale Q K^T; P = exp(S - lse); dP = dO V^T; dS = P (dP - D), D = rowsum(dO O);
//             dQ = scale dS K; dV[g] = sum_r P_r^T dO_r; dK[g] = scale sum_r dS_r^T Q_r over the
//             group's heads r (first overwrites, the rest add: fixed order, deterministic)
// Causal blocks: the sequence is cut into nb blocks of w rows; block row ib multiplies only
// keys [0, (ib+1) w), so the GEMMs do (nb+1)/(2 nb) of the full S x S work (nb = 8: 56%), and
// the row kernels touch only that part (keys j > i inside it are written as 0).
// Scratch: [chunk, S, S] f32 score buffers (one forward, two backward) over chunks of heads
// (whole kv groups), at most Ctx::attention_scratch_bytes each (1 GiB; at least one group);
// attention_gemm_can_implement refuses shapes where one kv group alone would exceed
// kMaxGroupBytes (the flash kernels take those).
#include <cmath>
#include <vector>

#include "backends/cuda/cuda_kernels.cuh"

namespace moelab::cuda {
namespace {

constexpr int64_t kMaxGroupBytes = int64_t(2) << 30;  // one kv group's buffer at most

// The layout of one call: sizes, block width, and the chunks of heads.
struct Layout {
  int64_t B, S, H, Hkv, G, dh, Wq, Wk;
  int64_t w, nb;      // causal block width and count
  int64_t per_chunk;  // heads (b*H + h items) per chunk: a multiple of G
  double scale;
  int64_t rows_in(int64_t ib) const { return std::min(S, (ib + 1) * w) - ib * w; }
  int64_t keys_to(int64_t ib) const { return std::min(S, (ib + 1) * w); }  // exclusive
};

Layout layout(const Ctx& c, const Tensor& q, const Tensor& k, int64_t H, int64_t Hkv, int64_t S) {
  Layout L;
  L.S = S;
  L.B = q.dim(0) / S;
  L.H = H;
  L.Hkv = Hkv;
  L.G = H / Hkv;
  L.Wq = q.dim(1);
  L.Wk = k.dim(1);
  L.dh = L.Wq / H;
  // Blocks of at least 128 rows (fewer, larger GEMMs), at most 8 of them.
  L.w = std::max<int64_t>(128, (S + 7) / 8);
  L.w = (L.w + 63) / 64 * 64;
  L.nb = (S + L.w - 1) / L.w;
  const int64_t per_head = S * S * 4;
  const int64_t groups = std::max<int64_t>(1, c.attention_scratch_bytes / (per_head * L.G));
  L.per_chunk = std::min(groups * L.G, L.B * H);
  L.scale = 1.0 / std::sqrt(double(L.dh));
  return L;
}

const float* f32_at(const Tensor& t, int64_t elems) { return static_cast<const float*>(t.data()) + elems; }
float* f32_at_mut(const Tensor& t, int64_t elems) { return static_cast<float*>(t.data()) + elems; }

// Row r of a chunk's [n, S, S] buffer: item bh = bh0 + r / S (b = bh / H), query i = r % S. Keys
// j < e = (i / w + 1) w (capped at S) were computed by the block GEMMs; a key is visible when
// j <= i and, with segments, seg[b, j] == seg[b, i].
struct RowCtx {
  int64_t rows, bh0;
  int S, H, w;
  const int32_t* seg;
};

// One warp's row of a row kernel (one warp per row, kWarpsPerBlock rows per block).
struct Row {
  int64_t r, bh;
  int lane, i, b, h, e;
  const int32_t* sg;  // this sequence's segment ids, or null
  __device__ bool valid(const RowCtx& rc) const { return r < rc.rows; }
  __device__ bool visible(int j) const { return j <= i && (!sg || sg[j] == sg[i]); }
};
__device__ __forceinline__ Row row_of(const RowCtx& rc) {
  Row w;
  w.r = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  w.lane = threadIdx.x & 31;
  const int64_t li = w.r / rc.S;
  w.bh = rc.bh0 + li;
  w.i = int(w.r - li * rc.S);
  w.b = int(w.bh / rc.H);
  w.h = int(w.bh - int64_t(w.b) * rc.H);
  w.e = min(rc.S, (w.i / rc.w + 1) * rc.w);
  w.sg = rc.seg ? rc.seg + int64_t(w.b) * rc.S : nullptr;
  return w;
}

// Forward: row <- causal softmax of the row (0 where not visible), lse[bh, i] = max + log sum.
__global__ void softmax_rows_kernel(float* sc, RowCtx rc, float* lse) {
  const Row w = row_of(rc);
  if (!w.valid(rc)) return;
  float* row = sc + w.r * rc.S;
  float mx = -INFINITY;
  for (int j = w.lane; j <= w.i; j += 32)
    if (w.visible(j)) mx = fmaxf(mx, row[j]);
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int j = w.lane; j <= w.i; j += 32)
    if (w.visible(j)) sum += expf(row[j] - mx);
  sum = warp_sum(sum);  // >= 1: key i is always visible
  const float inv = 1.0f / sum;
  for (int j = w.lane; j < w.e; j += 32) row[j] = w.visible(j) ? expf(row[j] - mx) * inv : 0.0f;
  if (w.lane == 0) lse[w.bh * rc.S + w.i] = mx + logf(sum);
}

// Backward: row <- P = exp(S - lse) (0 where not visible).
__global__ void probs_rows_kernel(float* sc, RowCtx rc, const float* lse) {
  const Row w = row_of(rc);
  if (!w.valid(rc)) return;
  const float l = lse[w.bh * rc.S + w.i];
  float* row = sc + w.r * rc.S;
  for (int j = w.lane; j < w.e; j += 32) row[j] = w.visible(j) ? expf(row[j] - l) : 0.0f;
}

// Backward: dp row <- dS = P (dP - D_i), D_i = sum_d dO[t, h, d] O[t, h, d] (t = b S + i).
__global__ void dscores_rows_kernel(const float* p, float* dp, RowCtx rc, const float* o,
                                    const float* dout, int64_t Wq, int dh) {
  const Row w = row_of(rc);
  if (!w.valid(rc)) return;
  const int64_t at = (int64_t(w.b) * rc.S + w.i) * Wq + int64_t(w.h) * dh;
  float d = 0.0f;
  for (int x = w.lane; x < dh; x += 32) d += dout[at + x] * o[at + x];
  d = warp_sum(d);
  const float* prow = p + w.r * rc.S;
  float* drow = dp + w.r * rc.S;
  for (int j = w.lane; j < w.e; j += 32) drow[j] = prow[j] * (drow[j] - d);
}

template <class K, class... A> void launch_rows(Ctx& c, int64_t rows, K kernel, A... args) {
  kernel<<<grid_rows(rows), kThreads, 0, c.stream>>>(args...);
  CUDA_CHECK_LAUNCH();
}

// Per-item pointer lists of one batched GEMM.
struct Ptrs {
  std::vector<const void*> a, b;
  std::vector<void*> c;
  void add(const void* pa, const void* pb, void* pc) {
    a.push_back(pa);
    b.push_back(pb);
    c.push_back(pc);
  }
};

}  // namespace

bool attention_gemm_can_implement(const Tensor& q, int64_t H, int64_t Hkv, int64_t S) {
  if (q.dtype() != DType::F32 || S <= 0 || Hkv <= 0) return false;
  return S * S * 4 * (H / Hkv) <= kMaxGroupBytes;
}

void attention_gemm_forward(Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v, int64_t H,
                            int64_t Hkv, int64_t S, const Tensor& out, const Tensor& lse,
                            const Tensor& segments) {
  const Layout L = layout(c, q, k, H, Hkv, S);
  const int64_t items = L.B * H;
  if (items == 0 || L.dh == 0) return;
  Buf<float> sc(c, L.per_chunk * S * S);
  const int32_t* seg = segments.defined() ? static_cast<const int32_t*>(segments.data()) : nullptr;
  for (int64_t bh0 = 0; bh0 < items; bh0 += L.per_chunk) {
    const int64_t n = std::min(L.per_chunk, items - bh0);
    for (int64_t ib = 0; ib < L.nb; ++ib) {  // S rows of block ib = scale Q_ib K[0, e)^T
      Ptrs p;
      for (int64_t li = 0; li < n; ++li) {
        const int64_t bh = bh0 + li, b = bh / H, h = bh % H, g = h / L.G;
        p.add(f32_at(q, (b * S + ib * L.w) * L.Wq + h * L.dh), f32_at(k, b * S * L.Wk + g * L.dh),
              sc.get() + li * S * S + ib * L.w * S);
      }
      gemm_batched(c, false, true, L.rows_in(ib), L.keys_to(ib), L.dh, L.scale, DType::F32, p.a, L.Wq,
                   p.b, L.Wk, 0.0, DType::F32, p.c, S);
    }
    const RowCtx rc{n * S, bh0, int(S), int(H), int(L.w), seg};
    launch_rows(c, rc.rows, softmax_rows_kernel, sc.get(), rc, static_cast<float*>(lse.data()));
    for (int64_t ib = 0; ib < L.nb; ++ib) {  // O rows of block ib = P_ib[:, 0, e) V[0, e)
      Ptrs p;
      for (int64_t li = 0; li < n; ++li) {
        const int64_t bh = bh0 + li, b = bh / H, h = bh % H, g = h / L.G;
        p.add(sc.get() + li * S * S + ib * L.w * S, f32_at(v, b * S * L.Wk + g * L.dh),
              f32_at_mut(out, (b * S + ib * L.w) * L.Wq + h * L.dh));
      }
      gemm_batched(c, false, false, L.rows_in(ib), L.dh, L.keys_to(ib), 1.0, DType::F32, p.a, S, p.b,
                   L.Wk, 0.0, DType::F32, p.c, L.Wq);
    }
  }
}

void attention_gemm_backward(Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& out, const Tensor& lse, const Tensor& dout, int64_t H,
                             int64_t Hkv, int64_t S, const Tensor& dq, const Tensor& dk,
                             const Tensor& dv, const Tensor& segments) {
  const Layout L = layout(c, q, k, H, Hkv, S);
  const int64_t items = L.B * H;
  if (items == 0 || L.dh == 0) return;
  Buf<float> pb(c, L.per_chunk * S * S), dpb(c, L.per_chunk * S * S);
  const int32_t* seg = segments.defined() ? static_cast<const int32_t*>(segments.data()) : nullptr;
  auto item_at = [&](const float* base, int64_t li) { return base + li * S * S; };
  for (int64_t bh0 = 0; bh0 < items; bh0 += L.per_chunk) {
    const int64_t n = std::min(L.per_chunk, items - bh0);
    // The chunk's P (recomputed) and dP, block row by block row.
    for (int64_t ib = 0; ib < L.nb; ++ib) {
      Ptrs s, d;
      for (int64_t li = 0; li < n; ++li) {
        const int64_t bh = bh0 + li, b = bh / H, h = bh % H, g = h / L.G;
        const int64_t qrow = (b * S + ib * L.w) * L.Wq + h * L.dh, kv = b * S * L.Wk + g * L.dh;
        s.add(f32_at(q, qrow), f32_at(k, kv), pb.get() + li * S * S + ib * L.w * S);
        d.add(f32_at(dout, qrow), f32_at(v, kv), dpb.get() + li * S * S + ib * L.w * S);
      }
      gemm_batched(c, false, true, L.rows_in(ib), L.keys_to(ib), L.dh, L.scale, DType::F32, s.a, L.Wq,
                   s.b, L.Wk, 0.0, DType::F32, s.c, S);
      gemm_batched(c, false, true, L.rows_in(ib), L.keys_to(ib), L.dh, 1.0, DType::F32, d.a, L.Wq, d.b,
                   L.Wk, 0.0, DType::F32, d.c, S);
    }
    const RowCtx rc{n * S, bh0, int(S), int(H), int(L.w), seg};
    launch_rows(c, rc.rows, probs_rows_kernel, pb.get(), rc, static_cast<const float*>(lse.data()));
    launch_rows(c, rc.rows, dscores_rows_kernel, static_cast<const float*>(pb.get()), dpb.get(), rc,
                f32_at(out, 0), f32_at(dout, 0), L.Wq, int(L.dh));
    // dQ rows of block ib = scale dS_ib[:, 0, e) K[0, e).
    for (int64_t ib = 0; ib < L.nb; ++ib) {
      Ptrs p;
      for (int64_t li = 0; li < n; ++li) {
        const int64_t bh = bh0 + li, b = bh / H, h = bh % H, g = h / L.G;
        p.add(item_at(dpb.get(), li) + ib * L.w * S, f32_at(k, b * S * L.Wk + g * L.dh),
              f32_at_mut(dq, (b * S + ib * L.w) * L.Wq + h * L.dh));
      }
      gemm_batched(c, false, false, L.rows_in(ib), L.dh, L.keys_to(ib), L.scale, DType::F32, p.a, S,
                   p.b, L.Wk, 0.0, DType::F32, p.c, L.Wq);
    }
    // dV, dK rows of key block jb: queries i >= jb w see them. One batched call per head r of
    // the groups (distinct outputs within a call); r = 0 overwrites, the rest add.
    for (int64_t r = 0; r < L.G; ++r)
      for (int64_t jb = 0; jb < L.nb; ++jb) {
        const int64_t i0 = jb * L.w, kq = S - i0;
        Ptrs pv, pk;
        for (int64_t li = r; li < n; li += L.G) {  // chunks hold whole groups: li % G == h % G
          const int64_t bh = bh0 + li, b = bh / H, h = bh % H, g = h / L.G;
          const int64_t qrow = (b * S + i0) * L.Wq + h * L.dh, kvrow = (b * S + i0) * L.Wk + g * L.dh;
          pv.add(item_at(pb.get(), li) + i0 * S + i0, f32_at(dout, qrow), f32_at_mut(dv, kvrow));
          pk.add(item_at(dpb.get(), li) + i0 * S + i0, f32_at(q, qrow), f32_at_mut(dk, kvrow));
        }
        const double beta = r == 0 ? 0.0 : 1.0;
        gemm_batched(c, true, false, L.rows_in(jb), L.dh, kq, 1.0, DType::F32, pv.a, S, pv.b, L.Wq, beta,
                     DType::F32, pv.c, L.Wk);
        gemm_batched(c, true, false, L.rows_in(jb), L.dh, kq, L.scale, DType::F32, pk.a, S, pk.b, L.Wq,
                     beta, DType::F32, pk.c, L.Wk);
      }
  }
}

}  // namespace moelab::cuda
