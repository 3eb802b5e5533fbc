// moelab CUDA backend: GEMMs through cuBLAS (gemm, grouped_gemm, grouped_gemm_wgrad).
//
// Row-major mapping: moelab's tensors are row-major, cuBLAS is column-major. A row-major
// matrix M [r, c] read column-major is M^T with leading dimension c, so the row-major product
// C = op(A) op(B) is computed as the column-major product C^T = op(B)^T op(A)^T: swap the
// operands, swap m and n, keep each operand's transpose flag, and pass each row length as its
// leading dimension.
//
// Precision: cublasGemmEx with CUBLAS_COMPUTE_32F for f32 (no TF32: the handle keeps the default
// math mode) and for bf16 (bf16 in and out, fp32 accumulation, alpha / beta in fp32).
//
// Grouped GEMMs (the MoE experts): every non-empty expert is one row-major problem; the list of
// problems runs as one cublasGemmEx per problem (PerExpert), as a single
// cublasGemmGroupedBatchedEx (GroupedBatched; its pointer arrays are copied to the device, its
// shape arrays stay on the host), or cut into equal chunks of rows for one cublasGemmBatchedEx
// plus a grouped call for the remainders (Chunked, run_chunked); Auto picks PerExpert or Chunked
// by the mean FLOPs per problem (run_list).
// Offsets are host values, so no path synchronises. An expert with no rows contributes
// beta * dW[e] to the weight gradient (a scale kernel).
// Mma: moelab's own kernel (grouped_gemm_mma.cu) for bf16 operands it can take: the host offsets
// are copied to a device int32 array (stream-ordered, no sync) and one launch does every expert;
// operands it cannot take (f32, widths not multiples of 8, unaligned views) go the Auto way.
// Wgmma: the same with grouped_gemm_wgmma.cu's kernel, on a device of compute capability 9.0;
// Auto picks it there for the products of few experts with a long reduction, for other small
// bf16 calls and for the weight gradients of all but very large experts (own_kernel).
//
// The router's GEMMs (router_logits, router_input_grads): bf16 activations against the f32
// router weight, in f32 precision on the bf16 tensor cores (split_bf16 below).
#include <cublasLt.h>

#include <vector>

#include "backends/cuda/cuda_kernels.cuh"

namespace moelab::cuda {
namespace {

cudaDataType_t cuda_type(DType dt) {
  switch (dt) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    default: throw NotSupported(std::string("cuda gemm: no ") + to_string(dt) + " GEMM");
  }
}

int as_int(int64_t v, const char* what) {
  MOELAB_CHECK(v >= 0 && v <= INT32_MAX, "cuda gemm: ", what, " = ", v, " exceeds cuBLAS's int range");
  return int(v);
}

// One row-major problem C [m, n] = alpha op(A) op(B) + beta C, lda / ldb / ldc row lengths.
struct Problem {
  bool ta, tb;
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* c;
  int64_t ldc;
};

size_t elem_size(DType dt) { return dtype_size(dt); }

// k == 0: C = beta C (cuBLAS is not asked to handle empty inner dimensions).
void run_one(Ctx& c, DType dt, const Problem& p, float alpha, float beta) {
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {
    MOELAB_CHECK(p.ldc == p.n, "cuda gemm: strided C with k = 0");
    scale(c, dt, p.c, p.m * p.n, beta);
    return;
  }
  const cudaDataType_t ty = cuda_type(dt);
  CUBLAS_CHECK(cublasGemmEx(c.blas, p.tb ? CUBLAS_OP_T : CUBLAS_OP_N, p.ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                            as_int(p.n, "n"), as_int(p.m, "m"), as_int(p.k, "k"), &alpha, p.b, ty,
                            as_int(p.ldb, "ldb"), p.a, ty, as_int(p.lda, "lda"), &beta, p.c, ty,
                            as_int(p.ldc, "ldc"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ---- per-expert GEMMs through cuBLASLt, the kernel choice cached per shape class --------------
// cublasGemmEx looks up a kernel for every shape it has not seen, about 100 us of host time, and
// the routing gives every expert new row counts each step: config F's ~120 per-expert calls a
// step took 8.0 ms of host time against 17.2 ms of expert GEMMs on the GPU (ninth session,
// `moelab bench --breakdown`, 30 warm-up steps), and the GPU waited for the host after every
// sync; through the cache, 2.6 ms (docs/performance.md). Here cuBLASLt's
// heuristic runs once per class: the rows (m, and k where it is the rows: weight gradients)
// rounded up to 8 buckets per octave, the pointers' alignment, and everything else exact; the
// chosen algorithm then runs any m and k of its bucket (cublasLtMatmul checks that it can; a call
// it refuses goes to cublasGemmEx). Rounding up keeps the workspace the bucket needed enough for
// every shape in it. Only GEMMs below kAlgoCacheMaxFlops: above it the lookup is small against
// the GEMM, and the exact shape's choice was faster (config C's 1 TFLOP experts, ninth session:
// 77.95 ms a step through the cache against 76.2 and 76.5 without).
}  // namespace

struct GemmAlgoCache {
  struct Key {
    int dt, align;
    bool ta, tb;
    int64_t m, n, k, lda, ldb, ldc;
    bool operator==(const Key& o) const {
      return dt == o.dt && align == o.align && ta == o.ta && tb == o.tb && m == o.m && n == o.n && k == o.k &&
             lda == o.lda && ldb == o.ldb && ldc == o.ldc;
    }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const {
      size_t h = size_t(k.dt) * 31 + size_t(k.align) * 7 + (k.ta ? 2 : 0) + (k.tb ? 1 : 0);
      for (int64_t v : {k.m, k.n, k.k, k.lda, k.ldb, k.ldc}) h = h * 1000003u ^ std::hash<int64_t>()(v);
      return h;
    }
  };
  struct Entry {
    bool ok = false;  // false: cuBLASLt found nothing; the class runs on cublasGemmEx
    cublasLtMatmulAlgo_t algo{};
    size_t workspace = 0;
  };
  cublasLtHandle_t lt = nullptr;
  cublasLtMatmulDesc_t desc[2][2] = {};  // [tb][ta]: fp32 compute and scale, as cublasGemmEx's
  std::unordered_map<Key, Entry, KeyHash> entries;
  GemmAlgoCacheStats stats;
  ~GemmAlgoCache() {
    for (auto& row : desc)
      for (cublasLtMatmulDesc_t d : row)
        if (d) cublasLtMatmulDescDestroy(d);
    if (lt) cublasLtDestroy(lt);
  }
};

namespace {

// The bucket of m rows: m rounded up to a multiple of 2^(floor(log2 m) - 3) (8 per octave), of 16
// below 128.
int64_t rows_bucket(int64_t m) {
  if (m <= 128) return (m + 15) / 16 * 16;
  int lg = 0;
  while ((int64_t(1) << (lg + 1)) <= m) ++lg;
  const int64_t q = int64_t(1) << (lg - 3);
  return (m + q - 1) / q * q;
}

// The largest power of two up to 256 dividing every address and row length in bytes.
int alignment_of(const Problem& p, size_t es) {
  uintptr_t bits = reinterpret_cast<uintptr_t>(p.a) | reinterpret_cast<uintptr_t>(p.b) |
                   reinterpret_cast<uintptr_t>(p.c) | uintptr_t(size_t(p.lda) * es) |
                   uintptr_t(size_t(p.ldb) * es) | uintptr_t(size_t(p.ldc) * es) | uintptr_t(256);
  return int(bits & (~bits + 1));
}

struct LtLayouts {
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  LtLayouts(const Problem& p, int64_t m, int64_t k, cudaDataType_t ty) {
    // run_one's column-major view: A' = p.b (op tb), B' = p.a (op ta), C' = p.c [n, m].
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&a, ty, uint64_t(p.tb ? k : p.n), uint64_t(p.tb ? p.n : k), p.ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&b, ty, uint64_t(p.ta ? m : k), uint64_t(p.ta ? k : m), p.lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&c, ty, uint64_t(p.n), uint64_t(m), p.ldc));
  }
  ~LtLayouts() {
    for (cublasLtMatrixLayout_t l : {a, b, c})
      if (l) cublasLtMatrixLayoutDestroy(l);
  }
  LtLayouts(const LtLayouts&) = delete;
  LtLayouts& operator=(const LtLayouts&) = delete;
};

GemmAlgoCache& algo_cache(Ctx& c) {
  if (!c.algo_cache) {
    auto cache = std::make_shared<GemmAlgoCache>();
    CUBLAS_CHECK(cublasLtCreate(&cache->lt));
    for (int tb = 0; tb < 2; ++tb)
      for (int ta = 0; ta < 2; ++ta) {
        cublasLtMatmulDesc_t& d = cache->desc[tb][ta];
        CUBLAS_CHECK(cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        const cublasOperation_t oa = tb ? CUBLAS_OP_T : CUBLAS_OP_N, ob = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, &oa, sizeof oa));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSB, &ob, sizeof ob));
      }
    c.algo_cache = std::move(cache);
  }
  return *c.algo_cache;
}

constexpr size_t kLtMaxWorkspace = size_t(32) << 20;  // cuBLAS's own default on Hopper
constexpr double kAlgoCacheMaxFlops = 256e9;          // 2 m n k: ~0.4 ms at 650 TFLOP/s

// One problem (k > 0, m, n > 0) of a grouped call: cuBLASLt with the cached choice of its class.
void run_one_cached(Ctx& c, DType dt, const Problem& p, float beta) {
  if (!c.gemm_algo_cache || p.k == 0 || p.m == 0 || p.n == 0 ||
      2.0 * double(p.m) * double(p.n) * double(p.k) >= kAlgoCacheMaxFlops) {
    run_one(c, dt, p, 1.0f, beta);
    return;
  }
  GemmAlgoCache& cache = algo_cache(c);
  const cudaDataType_t ty = cuda_type(dt);
  const int align = alignment_of(p, elem_size(dt));
  // k is bucketed where it counts rows of both operands (a weight gradient: X^T dY), never where
  // it is a contiguous width (the bucket would exceed the row length).
  const int64_t kb = p.ta && !p.tb ? rows_bucket(p.k) : p.k;
  const GemmAlgoCache::Key key{int(dt), align, p.ta, p.tb, rows_bucket(p.m), p.n, kb, p.lda, p.ldb, p.ldc};
  ++cache.stats.calls;
  auto it = cache.entries.find(key);
  if (it == cache.entries.end()) {
    ++cache.stats.heuristics;
    GemmAlgoCache::Entry e;
    LtLayouts bucket(p, key.m, key.k, ty);
    cublasLtMatmulPreference_t pref = nullptr;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint32_t al = uint32_t(align);
    const size_t ws = kLtMaxWorkspace;
    bool set = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws) ==
               CUBLAS_STATUS_SUCCESS;
    for (cublasLtMatmulPreferenceAttributes_t at :
         {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
          CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      set = set && cublasLtMatmulPreferenceSetAttribute(pref, at, &al, sizeof al) == CUBLAS_STATUS_SUCCESS;
    cublasLtMatmulHeuristicResult_t res{};
    int found = 0;
    if (set && cublasLtMatmulAlgoGetHeuristic(cache.lt, cache.desc[p.tb][p.ta], bucket.a, bucket.b, bucket.c, bucket.c,
                                              pref, 1, &res, &found) == CUBLAS_STATUS_SUCCESS &&
        found > 0 && res.state == CUBLAS_STATUS_SUCCESS) {
      e.ok = true;
      e.algo = res.algo;
      e.workspace = res.workspaceSize;
    }
    cublasLtMatmulPreferenceDestroy(pref);
    it = cache.entries.emplace(key, e).first;
  }
  const GemmAlgoCache::Entry& e = it->second;
  if (e.ok) {
    LtLayouts l(p, p.m, p.k, ty);
    Buf<char> ws(c, int64_t(e.workspace));
    const float alpha = 1.0f;
    if (cublasLtMatmul(cache.lt, cache.desc[p.tb][p.ta], &alpha, p.b, l.a, p.a, l.b, &beta, p.c, l.c, p.c, l.c,
                       &e.algo, e.workspace ? ws.get() : nullptr, e.workspace, c.stream) == CUBLAS_STATUS_SUCCESS)
      return;
  }
  ++cache.stats.fallbacks;
  run_one(c, dt, p, 1.0f, beta);
}

// Auto: per-expert cuBLAS calls for a few GEMMs (at most 16) of at least 4 GFLOP each, else the
// chunked batched call. Before the per-expert calls went through cuBLASLt with a cached kernel
// choice (GemmAlgoCache, ninth session), a call cost ~100 us of host time (cuBLAS looked up a
// kernel for every new row count), and per-expert calls paid only from 64 GFLOP a GEMM up: config
// A took 28.5 ms a step per expert and 17.1 ms grouped then (docs/performance.md, 2026-11-30).
// With the cache, per-expert beat the chunked call on few experts at every size measured
// (eleventh session, whole steps, ms: A 10.36-10.53 against 12.4-15.3 chunked; F and B 0.3-0.5 ms
// faster than chunked W2 GEMMs); config D's 64 experts stay chunked (90.4 against 70.4 ms a step).
constexpr size_t kPerExpertMaxGemms = 16;
constexpr double kPerExpertMinFlops = 4e9;  // mean 2 m n k per problem

// Auto on compute capability 9.0 runs moelab's wgmma kernel for a bf16 grouped call of less than
// 256 GFLOP (2 R K N) that it can take. cuBLAS spends 0.1-0.2 ms of host time per call there (a
// kernel lookup per new shape), as long as the GEMMs take on the GPU, so the GPU waits for the
// host; the kernel is one launch. Whole steps, same call (H200, docs/performance.md, seventh
// session): config A (69-137 GFLOP calls) 12.7 / 12.4 ms against 15.1 / 12.7 with cuBLAS, its
// expert phase's host time 0.3-0.5 ms against 5-7; on larger calls cuBLAS is as fast or faster
// (E at parity, B and D 3% slower with the kernel).
constexpr double kWgmmaMaxFlops = 256e9;
// 64 GFLOP a GEMM and up: the per-expert kind, whose products and weight gradients stay on
// cuBLAS's per-expert calls.
constexpr double kLargeExpertGemmFlops = 64e9;
// Weight gradients written with beta 0 (a step's first backward: ParamStore defers the experts'
// zero to it) ran faster on the kernel than on every cuBLAS path whenever the experts are not
// the per-expert kind (kLargeExpertGemmFlops), in the same call (eighth session, TFLOP/s, kernel
// against cuBLAS's best): config E 128 x 512, W1 576 / 426, W2 556 / 276; fine 64 x 1408, W1 619 /
// 601, W2 636 / 537; A W1 670 / 671, W2 592 / 530; Mixtral's 1 TFLOP per-expert GEMMs 603 / 685 and
// 650 / 750 stay on cuBLAS. Whole steps: E 29.27 -> 28.47 ms, D 40.52 -> 40.17.
// Products (forward, data gradient) over few experts (at most kPerExpertMaxGemms) of 4 to 64
// GFLOP each run on the kernel when the reduction is long (K >= 2048) and as per-expert cuBLAS
// calls when it is short: the kernel's pipeline fill and unoverlapped epilogue weigh on a short K.
// TFLOP/s, same call (eleventh session, `moelab_gpu_tests "[bench][ggemm]"`, kernel / per-expert /
// chunked): A (K 512) 436 / 508 / 534, B and F W1 (K 1024) 490 / 649 / 632; A's K 2048 and 4096
// products 604 / 508 and 700 / 594, B and F's K 4096 719 / 654 / 580. Whole steps, ms: A 10.62,
// 10.77 -> 10.30, 10.42; B 29.07, 29.22 -> 28.51, 28.39. From 64 GFLOP a GEMM (config C, the
// Mixtral shape) cuBLAS's per-expert calls stay: with C's products on the kernel the step went
// 76.2 -> 78.3 ms.
constexpr int64_t kWgmmaFewExpertsMinK = 2048;

// Which of moelab's own kernels runs a grouped call (x [R, K], w or dy, out [.., N]; E experts), if
// any: Mma and Wgmma where the operands (and for Wgmma the device) allow; Auto's Wgmma for the
// products of few experts with a long reduction (kWgmmaFewExpertsMinK), for other small calls
// and for weight gradients written with beta 0 (WgradWrite) of experts below the per-expert size
// (above; beta 1 was not measured faster); None leaves the call to cuBLAS.
enum class Own { None, Mma, Wgmma };
enum class GemmKind { Product, WgradWrite, WgradAccumulate };
Own own_kernel(const Ctx& c, GroupedGemmImpl impl, const Tensor& x, const Tensor& w, const Tensor& out,
               int64_t E, GemmKind kind) {
  if (impl != GroupedGemmImpl::Mma && impl != GroupedGemmImpl::Wgmma && impl != GroupedGemmImpl::Auto) return Own::None;
  if (!mma_grouped_can_implement(x, w, out)) return Own::None;
  if (impl == GroupedGemmImpl::Mma) return Own::Mma;
  if (!wgmma_grouped_available(c)) return Own::None;
  if (impl == GroupedGemmImpl::Wgmma) return Own::Wgmma;
  const double flops = 2.0 * double(x.dim(0)) * double(x.dim(1)) * double(out.dim(-1));
  const double per_expert = flops / double(E > 0 ? E : 1);
  if (kind == GemmKind::Product && E <= int64_t(kPerExpertMaxGemms) && per_expert >= kPerExpertMinFlops &&
      per_expert < kLargeExpertGemmFlops)
    return x.dim(1) >= kWgmmaFewExpertsMinK ? Own::Wgmma : Own::None;
  if (flops < kWgmmaMaxFlops) return Own::Wgmma;
  return kind == GemmKind::WgradWrite && per_expert < kLargeExpertGemmFlops ? Own::Wgmma : Own::None;
}
// The cuBLAS paths take Mma and Wgmma calls they could not run as Auto.
GroupedGemmImpl cublas_impl(GroupedGemmImpl impl) {
  return impl == GroupedGemmImpl::Mma || impl == GroupedGemmImpl::Wgmma ? GroupedGemmImpl::Auto : impl;
}

// One cublasGemmGroupedBatchedEx over `real` (k > 0, nothing empty); a single problem runs alone.
void run_grouped(Ctx& c, DType dt, const std::vector<Problem>& real, float beta) {
  if (real.empty()) return;
  if (real.size() == 1) {
    run_one_cached(c, dt, real[0], beta);
    return;
  }
  const int G = int(real.size());
  std::vector<cublasOperation_t> opa(G), opb(G);
  std::vector<int> m(G), n(G), k(G), lda(G), ldb(G), ldc(G), size(G, 1);
  std::vector<float> alpha(G, 1.0f), betas(G, beta);
  std::vector<void*> ptrs(size_t(3 * G));
  for (int i = 0; i < G; ++i) {  // column-major view: operands swapped, as in run_one
    const Problem& p = real[i];
    opa[i] = p.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    opb[i] = p.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    m[i] = as_int(p.n, "n");
    n[i] = as_int(p.m, "m");
    k[i] = as_int(p.k, "k");
    lda[i] = as_int(p.ldb, "ldb");
    ldb[i] = as_int(p.lda, "lda");
    ldc[i] = as_int(p.ldc, "ldc");
    ptrs[i] = const_cast<void*>(p.b);
    ptrs[G + i] = const_cast<void*>(p.a);
    ptrs[2 * G + i] = p.c;
  }
  Buf<void*> dptrs(c, 3 * G);
  c.to_device_async(dptrs.get(), ptrs.data(), ptrs.size() * sizeof(void*));
  const cudaDataType_t ty = cuda_type(dt);
  CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
      c.blas, opa.data(), opb.data(), m.data(), n.data(), k.data(), alpha.data(), dptrs.get(), ty,
      lda.data(), dptrs.get() + G, ty, ldb.data(), betas.data(), dptrs.get() + 2 * G, ty,
      ldc.data(), G, size.data(), CUBLAS_COMPUTE_32F));
}

// Chunked: problems whose rows are A's rows (not transposed) are cut into chunks of `rows`
// rows; the full chunks share one shape (they differ only in their pointers: the rows of A and
// C move by the chunk, the expert's B stays) and run as one batched GEMM, the remainders
// grouped. Problems of another shape (weight gradients) run grouped. Every output element is
// still one dot product over the same k, so only the kernel, not the arithmetic, changes.
void run_chunked(Ctx& c, DType dt, const std::vector<Problem>& real, float beta, int64_t rows) {
  std::vector<Problem> rest;
  std::vector<const void*> pa, pb;
  std::vector<void*> pc;
  const Problem* shape = nullptr;
  const size_t es = elem_size(dt);
  // cuBLAS cannot see the alignment of the pointers in a batched call's device arrays: chunk only
  // problems whose every row starts on 16 bytes.
  for (const Problem& p : real) {
    const bool same = shape && p.tb == shape->tb && p.n == shape->n && p.k == shape->k &&
                      p.lda == shape->lda && p.ldb == shape->ldb && p.ldc == shape->ldc;
    const bool aligned = aligned16(p.a) && aligned16(p.b) && aligned16(p.c) && (p.lda * es) % 16 == 0 &&
                         (p.ldc * es) % 16 == 0;
    if (p.ta || p.m < rows || !aligned || (shape && !same)) {
      rest.push_back(p);
      continue;
    }
    if (!shape) shape = &p;
    const int64_t full = p.m / rows;
    for (int64_t i = 0; i < full; ++i) {
      pa.push_back(static_cast<const char*>(p.a) + size_t(i * rows * p.lda) * es);
      pb.push_back(p.b);
      pc.push_back(static_cast<char*>(p.c) + size_t(i * rows * p.ldc) * es);
    }
    if (p.m > full * rows) {
      Problem r = p;
      r.m = p.m - full * rows;
      r.a = static_cast<const char*>(p.a) + size_t(full * rows * p.lda) * es;
      r.c = static_cast<char*>(p.c) + size_t(full * rows * p.ldc) * es;
      rest.push_back(r);
    }
  }
  if (!pc.empty())
    gemm_batched(c, false, shape->tb, rows, shape->n, shape->k, 1.0, dt, pa, shape->lda, pb, shape->ldb,
                 beta, dt, pc, shape->ldc);
  run_grouped(c, dt, rest, beta);
}

void run_list(Ctx& c, GroupedGemmImpl impl, DType dt, const std::vector<Problem>& list, float beta) {
  // Problems with k == 0 (or nothing to write) never go to the grouped call.
  std::vector<Problem> real;
  real.reserve(list.size());
  double flops = 0;
  for (const Problem& p : list) {
    if (p.m == 0 || p.n == 0) continue;
    if (p.k == 0) run_one(c, dt, p, 1.0f, beta);
    else {
      real.push_back(p);
      flops += 2.0 * double(p.m) * double(p.n) * double(p.k);
    }
  }
  if (real.empty()) return;
  if (impl == GroupedGemmImpl::Auto)
    impl = real.size() <= kPerExpertMaxGemms && flops / double(real.size()) >= kPerExpertMinFlops
               ? GroupedGemmImpl::PerExpert
               : GroupedGemmImpl::Chunked;
  if (impl == GroupedGemmImpl::PerExpert) {
    for (const Problem& p : real) run_one_cached(c, dt, p, beta);
    return;
  }
  if (impl == GroupedGemmImpl::Chunked) {
    run_chunked(c, dt, real, beta, c.gemm_chunk_rows);
    return;
  }
  run_grouped(c, dt, real, beta);
}

// Mma: the offsets as a device int32 array (valid on the stream until the scratch is released,
// which the caching allocator orders after the kernels queued before it).
Buf<int32_t> device_offsets(Ctx& c, const std::vector<int64_t>& off) {
  std::vector<int32_t> o32(off.size());
  for (size_t i = 0; i < off.size(); ++i) {
    MOELAB_CHECK(off[i] >= 0 && off[i] <= INT32_MAX, "cuda grouped gemm: offset ", off[i], " out of int32 range");
    o32[i] = int32_t(off[i]);
  }
  Buf<int32_t> d(c, int64_t(o32.size()));
  c.to_device_async(d.get(), o32.data(), o32.size() * sizeof(int32_t));
  return d;
}

// ---- the router's GEMMs ------------------------------------------------------------------------
// An f32 value v is hi + mid + lo with hi = bf16(v), mid = bf16(v - hi), lo = bf16(v - hi - mid):
// three bf16 of 8 significant bits each, carrying v to within about 2^-24 |v| (each remainder is
// exact in f32 and at most half an ulp of the part before). A bf16 times a bf16 is exact in fp32,
// so x w = x hi + x mid + x lo, bf16 products accumulated in fp32 and the three added smallest first,
// has the precision of an f32 GEMM of x and w (the GPU op test holds it to the f32 threshold).
// The parts are side by side in one operand, so each product is one GEMM (of 3E or 4E columns)
// whose fp32 partials a small kernel adds. f32 GEMMs run on the CUDA cores at about 50 TFLOP/s:
// config E's router (d 2048, 128 experts) took 2.5 ms a step there (eighth session); cuBLAS's own
// BF16x9 emulation did not engage on the H200 (same time).
enum : int { kHi = 0, kMid = 1, kLo = 2 };
struct SplitSlots {
  int n;
  int part[4];
};
// dst[r * ld + s * cols + col] = part slots.part[s] of src[r * cols + col], for s < slots.n.
__global__ void split_bf16_kernel(const float* src, int64_t rows, int64_t cols, int64_t ld,
                                  SplitSlots slots, bf16_t* dst) {
  MOELAB_GRID_STRIDE(i, rows * cols) {
    const int64_t r = i / cols, col = i - r * cols;
    const float v = src[i];
    const bf16_t hi = __float2bfloat16_rn(v);
    const float r1 = v - __bfloat162float(hi);
    const bf16_t mid = __float2bfloat16_rn(r1);
    const bf16_t lo = __float2bfloat16_rn(r1 - __bfloat162float(mid));
    for (int s = 0; s < slots.n; ++s) {
      const int p = slots.part[s];
      dst[r * ld + s * cols + col] = p == kHi ? hi : p == kMid ? mid : lo;
    }
  }
}

void split_bf16(Ctx& c, const Tensor& src, SplitSlots slots, bf16_t* dst) {
  const int64_t rows = src.dim(0), cols = src.dim(1);
  if (rows * cols == 0) return;
  split_bf16_kernel<<<grid_for(rows * cols), kThreads, 0, c.stream>>>(cptr<float>(src), rows, cols,
                                                                       slots.n * cols, slots, dst);
  CUDA_CHECK_LAUNCH();
}

// Row-major C [m, n] (ctype) = op(A) op(B) + beta C with bf16 A and B (leading dimensions lda, ldb)
// and fp32 accumulation: run_one's column-major mapping for operands of two types.
void gemm_bf16_into(Ctx& c, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const bf16_t* a, int64_t lda,
                    const bf16_t* b, int64_t ldb, float beta, void* cm, cudaDataType_t ctype, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const float alpha = 1.0f;
  CUBLAS_CHECK(cublasGemmEx(c.blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                            as_int(n, "n"), as_int(m, "m"), as_int(k, "k"), &alpha, b, CUDA_R_16BF,
                            as_int(ldb, "ldb"), a, CUDA_R_16BF, as_int(lda, "lda"), &beta, cm, ctype,
                            as_int(ldc, "ldc"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// out [rows, E] = beta out + ((lo + mid) + hi) for partials [rows, 3E] = [hi | mid | lo] (fp32).
__global__ void sum3_kernel(const float* prod, int64_t rows, int64_t E, float beta, float* out) {
  MOELAB_GRID_STRIDE(i, rows * E) {
    const int64_t r = i / E, e = i - r * E;
    const float* p = prod + r * 3 * E + e;
    const float v = (p[2 * E] + p[E]) + p[0];
    out[i] = beta == 0.0f ? v : out[i] + v;
  }
}
void sum3(Ctx& c, const float* prod, int64_t rows, int64_t E, float beta, float* out) {
  if (rows * E == 0) return;
  sum3_kernel<<<grid_for(rows * E), kThreads, 0, c.stream>>>(prod, rows, E, beta, out);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

GemmAlgoCacheStats gemm_algo_cache_stats(const Ctx& c) {
  return c.algo_cache ? c.algo_cache->stats : GemmAlgoCacheStats{};
}

bool router_gemms_on_tensor_cores(const Tensor& x, const Tensor& w) {
  return x.dtype() == DType::BF16 && w.dtype() == DType::F32 && x.dim(0) > 0;
}

// out [T, E] = x [T, D] w [D, E] as one GEMM against [w_hi | w_mid | w_lo] ([D, 3E]) into fp32
// partial products [T, 3E], then out = (lo + mid) + hi per element (sum3_kernel). Three GEMMs of
// E columns each, accumulating with beta 1, cost three cuBLAS launches of a few microseconds for
// config A's 8 experts (eighth session).
void router_logits(Ctx& c, const Tensor& x, const Tensor& w, const Tensor& out) {
  const int64_t T = x.dim(0), D = x.dim(1), E = w.dim(1);
  Buf<bf16_t> parts(c, D * 3 * E);  // [D, 3E] = [hi | mid | lo]
  split_bf16(c, w, SplitSlots{3, {kHi, kMid, kLo, 0}}, parts.get());
  Buf<float> prod(c, T * 3 * E);
  gemm_bf16_into(c, false, false, T, 3 * E, D, cptr<bf16_t>(x), D, parts.get(), 3 * E, 0.0f, prod.get(), CUDA_R_32F,
                 3 * E);
  sum3(c, prod.get(), T, E, 0.0f, mptr<float>(out));
}

// dw [D, E] += x^T dlogits: one GEMM of x^T against [d_hi | d_mid | d_lo | d_hi] (its first 3E
// columns) into fp32 partials [D, 3E], then dw += (lo + mid) + hi. dx [T, D] (bf16) += dlogits w^T
// as one GEMM over 4E: [d_hi | d_mid | d_lo | d_hi] [w_hi | w_hi | w_hi | w_mid]^T, the products
// down to 2^-16 of the largest (dx is rounded to bf16, 2^-9, once).
void router_input_grads(Ctx& c, const Tensor& x, const Tensor& dlogits, const Tensor& w, const Tensor& dw,
                        const Tensor& dx) {
  const int64_t T = x.dim(0), D = x.dim(1), E = w.dim(1);
  Buf<bf16_t> dparts(c, T * 4 * E), wparts(c, D * 4 * E);
  split_bf16(c, dlogits, SplitSlots{4, {kHi, kMid, kLo, kHi}}, dparts.get());
  split_bf16(c, w, SplitSlots{4, {kHi, kHi, kHi, kMid}}, wparts.get());
  const bf16_t* xb = cptr<bf16_t>(x);
  Buf<float> prod(c, D * 3 * E);
  gemm_bf16_into(c, true, false, D, 3 * E, T, xb, D, dparts.get(), 4 * E, 0.0f, prod.get(), CUDA_R_32F, 3 * E);
  sum3(c, prod.get(), D, E, 1.0f, mptr<float>(dw));
  gemm_bf16_into(c, false, true, T, D, 4 * E, dparts.get(), 4 * E, wparts.get(), 4 * E, 1.0f, dx.data(),
                 CUDA_R_16BF, D);
}

void gemm(Ctx& c, bool ta, bool tb, double alpha, const Tensor& a, const Tensor& b, double beta,
          const Tensor& cm) {
  const int64_t m = cm.dim(0), n = cm.dim(1), k = ta ? a.dim(0) : a.dim(1);
  Problem p{ta, tb, m, n, k, a.data(), a.dim(1), b.data(), b.dim(1), cm.data(), n};
  run_one(c, a.dtype(), p, float(alpha), float(beta));
}

// Y[rows of e] = X[rows of e] op(W[e]) + beta Y[rows of e].
void grouped_gemm(Ctx& c, GroupedGemmImpl impl, const Tensor& x, const Tensor& w,
                  const std::vector<int64_t>& off, const Tensor& y, bool trans_w, double beta) {
  const DType dt = x.dtype();
  const int64_t kin = x.dim(1), n = y.dim(1), E = w.dim(0);
  if (const Own own = own_kernel(c, impl, x, w, y, E, GemmKind::Product); own != Own::None) {
    Buf<int32_t> d_off = device_offsets(c, off);
    if (own == Own::Wgmma) wgmma_grouped_gemm(c, x, w, d_off.get(), E, y, trans_w, beta);
    else mma_grouped_gemm(c, x, w, d_off.get(), E, y, trans_w, beta);
    return;
  }
  const size_t es = elem_size(dt);
  const char* xb = static_cast<const char*>(x.data());
  const char* wb = static_cast<const char*>(w.data());
  char* yb = static_cast<char*>(y.data());
  std::vector<Problem> list;
  list.reserve(size_t(E));
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    list.push_back(Problem{false, trans_w, rows, n, kin, xb + size_t(r0 * kin) * es, kin,
                           wb + size_t(e * w.dim(1) * w.dim(2)) * es, w.dim(2),
                           yb + size_t(r0 * n) * es, n});
  }
  run_list(c, cublas_impl(impl), dt, list, float(beta));
}

// dW[e] = X[rows of e]^T dY[rows of e] + beta dW[e]; an expert without rows gets beta dW[e].
void grouped_gemm_wgrad(Ctx& c, GroupedGemmImpl impl, const Tensor& x, const Tensor& dy,
                        const std::vector<int64_t>& off, const Tensor& dw, double beta) {
  const DType dt = x.dtype();
  const int64_t kin = x.dim(1), n = dy.dim(1), E = dw.dim(0);
  if (const Own own = own_kernel(c, impl, x, dy, dw, E, beta == 0.0 ? GemmKind::WgradWrite : GemmKind::WgradAccumulate); own != Own::None) {
    Buf<int32_t> d_off = device_offsets(c, off);
    if (own == Own::Wgmma) wgmma_grouped_gemm_wgrad(c, x, dy, d_off.get(), E, dw, beta);
    else mma_grouped_gemm_wgrad(c, x, dy, d_off.get(), E, dw, beta);
    return;
  }
  const size_t es = elem_size(dt);
  const char* xb = static_cast<const char*>(x.data());
  const char* db = static_cast<const char*>(dy.data());
  char* wb = static_cast<char*>(dw.data());
  std::vector<Problem> list;
  list.reserve(size_t(E));
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], rows = off[e + 1] - off[e];
    // rows == 0 is a k == 0 problem: run_list scales dW[e] by beta.
    list.push_back(Problem{true, false, kin, n, rows, xb + size_t(r0 * kin) * es, kin,
                           db + size_t(r0 * n) * es, n, wb + size_t(e * kin * n) * es, n});
  }
  run_list(c, cublas_impl(impl), dt, list, float(beta));
}

void gemm_batched(Ctx& c, bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
                  DType ab_type, const std::vector<const void*>& a, int64_t lda,
                  const std::vector<const void*>& b, int64_t ldb, double beta, DType c_type,
                  const std::vector<void*>& cm, int64_t ldc) {
  const size_t count = cm.size();
  if (count == 0 || m == 0 || n == 0) return;
  MOELAB_CHECK(k > 0, "cuda gemm_batched: empty inner dimension");
  MOELAB_CHECK(a.size() == count && b.size() == count, "cuda gemm_batched: pointer lists differ");
  // Column-major view: C^T = op(B)^T op(A)^T, so the device array holds B's pointers first.
  std::vector<void*> ptrs(3 * count);
  for (size_t i = 0; i < count; ++i) {
    ptrs[i] = const_cast<void*>(b[i]);
    ptrs[count + i] = const_cast<void*>(a[i]);
    ptrs[2 * count + i] = cm[i];
  }
  Buf<void*> dptrs(c, int64_t(3 * count));
  c.to_device_async(dptrs.get(), ptrs.data(), ptrs.size() * sizeof(void*));
  const float al = float(alpha), be = float(beta);
  const cudaDataType_t ty = cuda_type(ab_type), cty = cuda_type(c_type);
  CUBLAS_CHECK(cublasGemmBatchedEx(c.blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                   as_int(n, "n"), as_int(m, "m"), as_int(k, "k"), &al, dptrs.get(),
                                   ty, as_int(ldb, "ldb"), dptrs.get() + count, ty,
                                   as_int(lda, "lda"), &be, dptrs.get() + 2 * count, cty,
                                   as_int(ldc, "ldc"), as_int(int64_t(count), "batch"),
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace moelab::cuda
