// moelab CUDA backend: the Backend object. It owns one CUDA stream, one cuBLAS handle, a caching
// device allocator and pinned host memory (no globals), answers supports(op, dtype), and
// forwards every `*_impl` to the launchers in the kernel files (cuda_kernels.cuh lists them).
//
// Precision (DESIGN.md): f32 throughout, or bf16 storage with fp32 accumulation (GEMMs in
// cuBLAS with fp32 compute; kernels load bf16, compute in fp32 or double, round once on store).
// Router kernels (selection, Sinkhorn, losses, statistics) compute in double whatever the
// storage, so routing decisions match the CPU reference given the same inputs.
//
// Supported: fill, copy, cast for f64, f32, bf16, i32; dispatch_plan for i32 (its index inputs);
// every other op for f32 and bf16. Anything else answers supports() == false, and the checked
// entry in core/backend.cpp throws NotSupported naming the op: never a crash.
#include <algorithm>
#include <cstring>

#include "backends/cuda/cuda_kernels.cuh"

namespace moelab {
namespace cuda {

// ---- DeviceAllocator -------------------------------------------------------------------------------

size_t DeviceAllocator::round_up(size_t bytes) {
  const size_t q = bytes < (size_t(1) << 20) ? 512 : (size_t(1) << 20);
  if (bytes == 0) bytes = 1;
  return (bytes + q - 1) / q * q;
}

void* DeviceAllocator::allocate(size_t bytes) {
  const size_t size = round_up(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  // Best fit among cached blocks no more than twice the request.
  auto it = free_.lower_bound(size);
  if (it != free_.end() && it->first <= 2 * size) {
    void* p = it->second;
    const size_t bs = it->first;
    free_.erase(it);
    live_[p] = bs;
    cached_ -= bs;
    in_use_ += bs;
    peak_ = std::max(peak_, in_use_);
    return p;
  }
  void* p = nullptr;
  if (cudaMalloc(&p, size) != cudaSuccess) {
    cudaGetLastError();  // clear the out-of-memory error, give the cache back, try once more
    for (auto& kv : free_) cudaFree(kv.second);
    free_.clear();
    cached_ = 0;
    const cudaError_t e = cudaMalloc(&p, size);
    MOELAB_CHECK(e == cudaSuccess, "cuda: cudaMalloc of ", size, " bytes failed: ",
                 cudaGetErrorString(e), " (", in_use_, " bytes in use)");
  }
  live_[p] = size;
  in_use_ += size;
  peak_ = std::max(peak_, in_use_);
  return p;
}

void DeviceAllocator::release(void* p) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(p);
  if (it == live_.end()) return;
  free_.emplace(it->second, p);
  cached_ += it->second;
  in_use_ -= it->second;
  live_.erase(it);
}

void DeviceAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& kv : free_) cudaFree(kv.second);
  free_.clear();
  cached_ = 0;
}

DeviceAllocator::~DeviceAllocator() {
  for (auto& kv : free_) cudaFree(kv.second);
  // Blocks still live belong to tensors that outlived their backend; they are left alone.
}

// ---- Ctx ------------------------------------------------------------------------------------------

void Ctx::to_host(void* dst, const void* src_dev, size_t bytes) {
  if (bytes == 0) return;
  HostCopy copy = to_host_async(src_dev, bytes);
  sync();  // a blocking read is one host sync, found done or not
  std::memcpy(dst, copy.wait(), bytes);
}

// Pinned blocks of finished (or dropped) to_host_async copies, reused by later ones.
struct PinnedPool {
  std::mutex mu;
  std::vector<HostCopy::Block*> free;
  ~PinnedPool() {  // no throwing: the context may already be gone at exit
    for (HostCopy::Block* b : free) {
      if (b->host) cudaFreeHost(b->host);
      if (b->done) cudaEventDestroy(b->done);
      delete b;
    }
  }
};

HostCopy Ctx::to_host_async(const void* src_dev, size_t bytes) {
  if (!pinned_pool) pinned_pool = std::make_shared<PinnedPool>();
  HostCopy::Block* b = nullptr;
  {
    std::lock_guard<std::mutex> lock(pinned_pool->mu);
    if (!pinned_pool->free.empty()) {
      b = pinned_pool->free.back();
      pinned_pool->free.pop_back();
    }
  }
  if (!b) {
    b = new HostCopy::Block;
    const cudaError_t e = cudaEventCreateWithFlags(&b->done, cudaEventDisableTiming);
    if (e != cudaSuccess) {
      delete b;
      CUDA_CHECK(e);
    }
  } else {
    const cudaError_t q = cudaEventQuery(b->done);  // a dropped handle's copy may still be in flight
    if (q == cudaErrorNotReady) {
      ++syncs;
      CUDA_CHECK(cudaEventSynchronize(b->done));
    } else {
      CUDA_CHECK(q);
    }
  }
  std::shared_ptr<PinnedPool> pool = pinned_pool;
  std::shared_ptr<HostCopy::Block> block(b, [pool](HostCopy::Block* p) {
    std::lock_guard<std::mutex> lock(pool->mu);
    pool->free.push_back(p);
  });
  if (bytes > b->bytes) {
    if (b->host) CUDA_CHECK(cudaFreeHost(b->host));
    b->host = nullptr;
    b->bytes = 0;
    const size_t n = bytes > 4096 ? bytes : 4096;
    CUDA_CHECK(cudaMallocHost(&b->host, n));
    b->bytes = n;
  }
  if (bytes > 0) CUDA_CHECK(cudaMemcpyAsync(b->host, src_dev, bytes, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaEventRecord(b->done, stream));
  return HostCopy(std::move(block), this);
}

const void* HostCopy::wait() {
  if (!arrived_) {
    const cudaError_t q = cudaEventQuery(block_->done);
    if (q == cudaErrorNotReady) {
      ++ctx_->syncs;
      CUDA_CHECK(cudaEventSynchronize(block_->done));
    } else {
      CUDA_CHECK(q);
    }
    arrived_ = true;
  }
  return block_->host;
}

void Ctx::to_device_async(void* dst_dev, const void* src, size_t bytes) {
  if (bytes == 0) return;
  // Each slot is reused only after its copy ran, so the host can be at most kSlots uploads ahead
  // of the GPU: a training step makes about a dozen per MoE layer (GEMM pointer arrays, dispatch
  // metadata), and 8 slots made the host wait for the GPU inside a layer.
  constexpr size_t kSlots = 64;
  if (ring_.empty()) {
    ring_.resize(kSlots);
    for (Slot& s : ring_) CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
  }
  Slot& s = ring_[ring_next_++ % kSlots];
  CUDA_CHECK(cudaEventSynchronize(s.done));  // the slot's previous copy has been consumed
  if (bytes > s.bytes) {
    if (s.host) CUDA_CHECK(cudaFreeHost(s.host));
    s.host = nullptr;
    const size_t n = bytes > 4096 ? bytes : 4096;
    CUDA_CHECK(cudaMallocHost(&s.host, n));
    s.bytes = n;
  }
  std::memcpy(s.host, src, bytes);
  CUDA_CHECK(cudaMemcpyAsync(dst_dev, s.host, bytes, cudaMemcpyHostToDevice, stream));
  CUDA_CHECK(cudaEventRecord(s.done, stream));
}

void Ctx::release() {
  for (Slot& s : ring_) {
    if (s.done) cudaEventDestroy(s.done);
    if (s.host) cudaFreeHost(s.host);
  }
  ring_.clear();
}

}  // namespace cuda

namespace {

using cuda::Ctx;

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& opts) : opts_(opts) {
    CUDA_CHECK(cudaSetDevice(opts.device));
    CUDA_CHECK(cudaStreamCreateWithFlags(&ctx_.stream, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&ctx_.blas));
    CUBLAS_CHECK(cublasSetStream(ctx_.blas, ctx_.stream));
    CUBLAS_CHECK(cublasSetPointerMode(ctx_.blas, CUBLAS_POINTER_MODE_HOST));
    ctx_.alloc = &alloc_;
    ctx_.gemm_chunk_rows = opts.chunk_rows;
    ctx_.attention_scratch_bytes = opts.attention_scratch_bytes;
    ctx_.flash = int(opts.flash);
    MOELAB_CHECK(opts.attention_bwd_splits >= 0, "CudaBackendOptions::attention_bwd_splits = ",
                 opts.attention_bwd_splits, " < 0");
    ctx_.attention_bwd_splits = opts.attention_bwd_splits;
    ctx_.gemm_algo_cache = opts.gemm_algo_cache;
    int major = 0, minor = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, opts.device));
    CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, opts.device));
    ctx_.compute_capability = 10 * major + minor;
    CUDA_CHECK(cudaDeviceGetAttribute(&ctx_.sm_count, cudaDevAttrMultiProcessorCount, opts.device));
  }

  ~CudaBackend() override {
    // No throwing here: report nothing, release everything.
    cudaStreamSynchronize(ctx_.stream);
    ctx_.release();
    if (ctx_.blas) cublasDestroy(ctx_.blas);
    if (ctx_.stream) cudaStreamDestroy(ctx_.stream);
  }

  std::string name() const override { return "cuda"; }
  Device device() const override { return Device::CUDA; }
  cudaStream_t stream() const { return ctx_.stream; }
  int ordinal() const { return opts_.device; }
  GemmAlgoCacheStats gemm_algo_cache_stats() const { return cuda::gemm_algo_cache_stats(ctx_); }
  void synchronize() override { ctx_.sync(); }

  std::shared_ptr<void> timing_mark() override {
    cudaEvent_t e = nullptr;
    CUDA_CHECK(cudaEventCreate(&e));
    CUDA_CHECK(cudaEventRecord(e, ctx_.stream));
    return std::shared_ptr<void>(e, [](void* p) { cudaEventDestroy(static_cast<cudaEvent_t>(p)); });
  }
  double elapsed_ms(const std::shared_ptr<void>& a, const std::shared_ptr<void>& b) override {
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(a.get()), static_cast<cudaEvent_t>(b.get())));
    return double(ms);
  }
  int64_t host_syncs() const override { return ctx_.syncs; }
  int64_t peak_bytes() const override { return int64_t(alloc_.peak_bytes()); }
  void reset_peak_bytes() override { alloc_.reset_peak(); }

  bool supports(Op op, DType dt) const override {
    switch (op) {
      case Op::Fill: case Op::Copy: case Op::Cast: return true;
      case Op::DispatchPlan: case Op::BalancedAssign: return dt == DType::I32;
      default: return dt == DType::F32 || dt == DType::BF16;
    }
  }

 protected:
  void* alloc_bytes(size_t bytes) override { return alloc_.allocate(bytes); }
  void free_bytes(void* p) override { alloc_.release(p); }

  void copy_bytes(void* dst, bool dst_dev, const void* src, bool src_dev, size_t n) override {
    if (n == 0) return;
    if (!dst_dev && !src_dev) {
      std::memcpy(dst, src, n);
      return;
    }
    const cudaMemcpyKind kind = dst_dev ? (src_dev ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                                        : cudaMemcpyDeviceToHost;
    CUDA_CHECK(cudaMemcpyAsync(dst, src, n, kind, ctx_.stream));
    // Blocking by contract where the host is involved (its buffer may be freed or read at once).
    // A copy within the device only has to be ordered on the stream, as every kernel is: waiting
    // for it drained the queue twice per block (the residual copies) and once per router backward.
    if (!(dst_dev && src_dev)) ctx_.sync();
  }

  // ---- elementwise and GEMM ----------------------------------------------------------------
  void fill_impl(const Tensor& x, double v) override { cuda::fill(ctx_, x, v); }
  void fill_normal_impl(const Tensor& x, double std, uint64_t stream, uint64_t first) override {
    cuda::fill_normal(ctx_, x, std, stream, first);
  }
  void cast_impl(const Tensor& s, const Tensor& d) override { cuda::cast(ctx_, s, d); }
  void axpy_impl(double a, const Tensor& x, const Tensor& y) override { cuda::axpy(ctx_, a, x, y); }
  void transpose_impl(const Tensor& x, const Tensor& y) override { cuda::transpose(ctx_, x, y); }
  void gemm_impl(bool ta, bool tb, double alpha, const Tensor& a, const Tensor& b, double beta,
                 const Tensor& c) override {
    cuda::gemm(ctx_, ta, tb, alpha, a, b, beta, c);
  }
  void router_logits_impl(const Tensor& x, const Tensor& w, const Tensor& out) override {
    if (!cuda::router_gemms_on_tensor_cores(x, w)) return Backend::router_logits_impl(x, w, out);
    cuda::router_logits(ctx_, x, w, out);
  }
  void router_input_grads_impl(const Tensor& x, const Tensor& dlogits, const Tensor& w, const Tensor& dw,
                               const Tensor& dx) override {
    if (!cuda::router_gemms_on_tensor_cores(x, w)) return Backend::router_input_grads_impl(x, dlogits, w, dw, dx);
    cuda::router_input_grads(ctx_, x, dlogits, w, dw, dx);
  }
  void grouped_gemm_impl(const Tensor& x, const Tensor& w, const std::vector<int64_t>& off,
                         const Tensor& y, bool trans_w, double beta) override {
    cuda::grouped_gemm(ctx_, opts_.grouped_gemm, x, w, off, y, trans_w, beta);
  }
  void grouped_gemm_wgrad_impl(const Tensor& x, const Tensor& dy, const std::vector<int64_t>& off,
                               const Tensor& dw, double beta) override {
    cuda::grouped_gemm_wgrad(ctx_, opts_.grouped_gemm, x, dy, off, dw, beta);
  }
  void swiglu_forward_impl(const Tensor& ab, const Tensor& h) override {
    cuda::swiglu_forward(ctx_, ab, h);
  }
  void swiglu_backward_impl(const Tensor& ab, const Tensor& dh, const Tensor& dab) override {
    cuda::swiglu_backward(ctx_, ab, dh, dab);
  }
  void softmax_forward_impl(const Tensor& l, const Tensor& p) override {
    cuda::softmax_forward(ctx_, l, p);
  }
  void softmax_backward_impl(const Tensor& p, const Tensor& dp, const Tensor& dl) override {
    cuda::softmax_backward(ctx_, p, dp, dl);
  }
  void sigmoid_forward_impl(const Tensor& x, const Tensor& y) override {
    cuda::sigmoid_forward(ctx_, x, y);
  }
  void sigmoid_backward_impl(const Tensor& y, const Tensor& dy, const Tensor& dx) override {
    cuda::sigmoid_backward(ctx_, y, dy, dx);
  }
  void softplus_forward_impl(const Tensor& x, const Tensor& y) override {
    cuda::softplus_forward(ctx_, x, y);
  }
  void softplus_backward_impl(const Tensor& x, const Tensor& dy, const Tensor& dx) override {
    cuda::softplus_backward(ctx_, x, dy, dx);
  }
  void row_normalize_forward_impl(const Tensor& x, const Tensor& y) override {
    cuda::row_normalize_forward(ctx_, x, y);
  }
  void row_normalize_backward_impl(const Tensor& x, const Tensor& dy, const Tensor& dx) override {
    cuda::row_normalize_backward(ctx_, x, dy, dx);
  }
  void row_scale_forward_impl(const Tensor& s, const Tensor& x, const Tensor& y) override {
    cuda::row_scale_forward(ctx_, s, x, y);
  }
  void row_scale_backward_impl(const Tensor& s, const Tensor& x, const Tensor& dy,
                               const Tensor& ds, const Tensor& dx) override {
    cuda::row_scale_backward(ctx_, s, x, dy, ds, dx);
  }
  void dropout_forward_impl(const Tensor& x, double p, uint64_t seed, const Tensor& y) override {
    cuda::dropout(ctx_, x, p, seed, y);
  }
  void dropout_backward_impl(const Tensor& dy, double p, uint64_t seed, const Tensor& dx) override {
    cuda::dropout(ctx_, dy, p, seed, dx);  // the same mask and scale
  }
  void jitter_forward_impl(const Tensor& x, double eps, uint64_t seed, const Tensor& y,
                           uint64_t offset) override {
    cuda::jitter(ctx_, x, eps, seed, y, offset);
  }
  void jitter_backward_impl(const Tensor& dy, double eps, uint64_t seed, const Tensor& dx,
                            uint64_t offset) override {
    cuda::jitter(ctx_, dy, eps, seed, dx, offset);  // linear in x: the same multiplier
  }
  void noisy_logits_forward_impl(const Tensor& clean, const Tensor& std, double sigma,
                                 uint64_t seed, const Tensor& h, uint64_t offset) override {
    cuda::noisy_logits_forward(ctx_, clean, std, sigma, seed, h, offset);
  }
  void noisy_logits_backward_impl(const Tensor& dh, const Tensor& std, uint64_t seed,
                                  const Tensor& dclean, const Tensor& dstd, uint64_t offset) override {
    cuda::noisy_logits_backward(ctx_, dh, std, seed, dclean, dstd, offset);
  }

  // ---- routing -------------------------------------------------------------------------------
  void topk_impl(const Tensor& s, const Tensor& bias, const Tensor& idx) override {
    cuda::topk(ctx_, s, bias, idx);
  }
  void balanced_assign_impl(const Tensor& idx, int64_t experts, int64_t offset) override {
    cuda::balanced_assign(ctx_, idx, experts, offset);
  }
  void gates_forward_impl(const Tensor& s, const Tensor& idx, bool normalize, double scale,
                          const Tensor& g) override {
    cuda::gates_forward(ctx_, s, idx, normalize, scale, g);
  }
  void gates_backward_impl(const Tensor& s, const Tensor& idx, const Tensor& dg, bool normalize,
                           double scale, const Tensor& ds) override {
    cuda::gates_backward(ctx_, s, idx, dg, normalize, scale, ds);
  }
  void random_top2_mask_impl(const Tensor& g, double tau, uint64_t seed,
                             const Tensor& keep, uint64_t offset) override {
    cuda::random_top2_mask(ctx_, g, tau, seed, keep, offset);
  }
  void capacity_mask_impl(const Tensor& idx, const Tensor& g, int64_t experts, int64_t capacity,
                          DropPolicy policy, const Tensor& keep) override {
    cuda::capacity_mask(ctx_, idx, g, experts, capacity, policy, keep);
  }
  int sinkhorn_impl(const Tensor& l, double tol, int max_iters, const Tensor& out) override {
    return cuda::sinkhorn(ctx_, l, tol, max_iters, out);
  }
  void expert_choice_impl(const Tensor& s, const Tensor& chosen) override {
    cuda::expert_choice(ctx_, s, chosen);
  }
  DispatchPlan dispatch_plan_impl(const Tensor& idx, const Tensor& keep, bool ec, int64_t experts,
                                  int64_t pad) override {
    return cuda::dispatch_plan(
        ctx_, [this](Shape s, DType d) { return empty(s, d); }, idx, keep, ec, experts, pad);
  }
  void permute_forward_impl(const Tensor& x, const DispatchPlan& p, const Tensor& xp) override {
    cuda::permute_forward(ctx_, x, p, xp);
  }
  void permute_backward_impl(const Tensor& dxp, const DispatchPlan& p, const Tensor& dx) override {
    cuda::permute_backward(ctx_, dxp, p, dx);
  }
  void unpermute_forward_impl(const Tensor& yp, const DispatchPlan& p, const Tensor& g,
                              const Tensor& y) override {
    cuda::unpermute_forward(ctx_, yp, p, g, y);
  }
  void unpermute_backward_impl(const Tensor& dy, const Tensor& yp, const DispatchPlan& p,
                               const Tensor& g, const Tensor& dyp, const Tensor& dg) override {
    cuda::unpermute_backward(ctx_, dy, yp, p, g, dyp, dg);
  }

  // ---- losses and statistics -------------------------------------------------------------------
  double aux_loss_forward_impl(const Tensor& p, const Tensor& idx, int64_t seq_len) override {
    return cuda::aux_loss_forward(ctx_, p, idx, seq_len);
  }
  void aux_loss_backward_impl(const Tensor& p, const Tensor& idx, int64_t seq_len, double scale,
                              const Tensor& dp) override {
    cuda::aux_loss_backward(ctx_, p, idx, seq_len, scale, dp);
  }
  double z_loss_forward_impl(const Tensor& l) override { return cuda::z_loss_forward(ctx_, l); }
  void router_logits_backward_impl(const Tensor& scores, const Tensor& logits, const Tensor& idx,
                                   const Tensor& dgates, bool normalize, double score_scale, int64_t aux_seq,
                                   double aux_scale, double z_scale, const Tensor& dlogits) override {
    if (!cuda::router_logits_backward_fused(scores))
      return Backend::router_logits_backward_impl(scores, logits, idx, dgates, normalize, score_scale, aux_seq,
                                                  aux_scale, z_scale, dlogits);
    cuda::router_logits_backward(ctx_, scores, logits, idx, dgates, normalize, score_scale, aux_seq, aux_scale,
                                 z_scale, dlogits);
  }
  void z_loss_backward_impl(const Tensor& l, double scale, const Tensor& dl) override {
    cuda::z_loss_backward(ctx_, l, scale, dl);
  }
  double cv2_loss_forward_impl(const Tensor& g, const Tensor& idx, int64_t experts) override {
    return cuda::cv2_loss_forward(ctx_, g, idx, experts);
  }
  void cv2_loss_backward_impl(const Tensor& g, const Tensor& idx, int64_t experts, double scale,
                              const Tensor& dg) override {
    cuda::cv2_loss_backward(ctx_, g, idx, experts, scale, dg);
  }
  double load_loss_forward_impl(const Tensor& clean, const Tensor& h, const Tensor& std,
                                double sigma, int64_t k) override {
    return cuda::load_loss_forward(ctx_, clean, h, std, sigma, k);
  }
  void load_loss_backward_impl(const Tensor& clean, const Tensor& h, const Tensor& std,
                               double sigma, int64_t k, double scale, const Tensor& dclean,
                               const Tensor& dstd, const Tensor& dh) override {
    cuda::load_loss_backward(ctx_, clean, h, std, sigma, k, scale, dclean, dstd, dh);
  }
  RouterStats router_stats_impl(const Tensor& l, const Tensor& p, const Tensor& idx,
                                const Tensor& keep, bool ec, int64_t experts) override {
    return cuda::router_stats(ctx_, l, p, idx, keep, ec, experts);
  }
  // One host copy per router call, which does not wait (collected after the dispatch plan's).
  // MOELAB_ROUTER_SUMMARY=separate takes the composite (one waiting copy per quantity) instead,
  // to measure what the fusion buys in one call.
  PendingRouterSummary router_summary_begin_impl(const Tensor& l, const Tensor& p, const Tensor& idx,
                                                 const Tensor& keep, const Tensor& g, bool ec, int64_t experts,
                                                 int64_t aux_seq, bool want_aux, bool want_imp) override {
    static const bool separate = [] {
      const char* e = std::getenv("MOELAB_ROUTER_SUMMARY");
      return e && std::string(e) == "separate";
    }();
    if (separate)
      return Backend::router_summary_begin_impl(l, p, idx, keep, g, ec, experts, aux_seq, want_aux, want_imp);
    return cuda::router_summary_begin(ctx_, l, p, idx, keep, g, ec, experts, aux_seq, want_aux, want_imp);
  }

  // ---- transformer ops -------------------------------------------------------------------------
  void scale_impl(const Tensor& x, double alpha) override { cuda::mul_scalar(ctx_, x, alpha); }
  double sum_squares_impl(const Tensor& x) override { return cuda::sum_squares(ctx_, x); }
  void embedding_forward_impl(const Tensor& tokens, const Tensor& table,
                              const Tensor& out) override {
    cuda::embedding_forward(ctx_, tokens, table, out);
  }
  void embedding_backward_impl(const Tensor& tokens, const Tensor& dout,
                               const Tensor& dtable) override {
    cuda::embedding_backward(ctx_, tokens, dout, dtable);
  }
  void rmsnorm_forward_impl(const Tensor& x, const Tensor& w, double eps, const Tensor& y,
                            const Tensor& rstd) override {
    cuda::rmsnorm_forward(ctx_, x, w, eps, y, rstd);
  }
  void rmsnorm_backward_impl(const Tensor& x, const Tensor& w, const Tensor& rstd,
                             const Tensor& dy, const Tensor& dx, const Tensor& dw) override {
    cuda::rmsnorm_backward(ctx_, x, w, rstd, dy, dx, dw);
  }
  void rope_impl(const Tensor& x, int64_t heads, int64_t seq_len, double theta, bool inverse,
                 const Tensor& y, const Tensor& positions) override {
    cuda::rope(ctx_, x, heads, seq_len, theta, inverse, y, positions);
  }
  void attention_forward_impl(const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads,
                              int64_t kv_heads, int64_t seq_len, const Tensor& out,
                              const Tensor& lse, const Tensor& segments) override {
    // f32: cuBLAS GEMMs (attention_gemm.cu says why).
    if (cuda::attention_gemm_can_implement(q, heads, kv_heads, seq_len))
      return cuda::attention_gemm_forward(ctx_, q, k, v, heads, kv_heads, seq_len, out, lse, segments);
    cuda::attention_forward(ctx_, q, k, v, heads, kv_heads, seq_len, out, lse, segments);
  }
  void attention_backward_impl(const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& out, const Tensor& lse, const Tensor& dout,
                               int64_t heads, int64_t kv_heads, int64_t seq_len, const Tensor& dq,
                               const Tensor& dk, const Tensor& dv, const Tensor& segments) override {
    if (cuda::attention_gemm_can_implement(q, heads, kv_heads, seq_len))
      return cuda::attention_gemm_backward(ctx_, q, k, v, out, lse, dout, heads, kv_heads, seq_len, dq, dk,
                                           dv, segments);
    cuda::attention_backward(ctx_, q, k, v, out, lse, dout, heads, kv_heads, seq_len, dq, dk, dv,
                             segments);
  }
  double cross_entropy_forward_impl(const Tensor& logits, const Tensor& targets) override {
    return cuda::cross_entropy_forward(ctx_, logits, targets);
  }
  void cross_entropy_backward_impl(const Tensor& logits, const Tensor& targets, double scale,
                                   const Tensor& dlogits) override {
    cuda::cross_entropy_backward(ctx_, logits, targets, scale, dlogits);
  }
  void adamw_impl(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                  double lr, double beta1, double beta2, double eps, double weight_decay,
                  int64_t step, const Tensor& cast_to) override {
    MOELAB_CHECK(grad.dtype() == DType::F32 || grad.dtype() == DType::BF16,
                 "adamw: cuda takes f32 or bf16 gradients, got ", to_string(grad.dtype()));
    cuda::adamw(ctx_, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, cast_to);
  }

 private:
  CudaBackendOptions opts_;
  cuda::DeviceAllocator alloc_;  // destroyed last: after the stream and handle
  Ctx ctx_;
};

}  // namespace

void* cuda_backend_stream(Backend& b) {
  auto* c = dynamic_cast<CudaBackend*>(&b);
  MOELAB_CHECK(c != nullptr, "cuda_backend_stream: backend '", b.name(), "' is not the CUDA backend");
  return c->stream();
}

GemmAlgoCacheStats cuda_gemm_algo_cache_stats(Backend& b) {
  auto* c = dynamic_cast<CudaBackend*>(&b);
  MOELAB_CHECK(c != nullptr, "cuda_gemm_algo_cache_stats: backend '", b.name(), "' is not the CUDA backend");
  return c->gemm_algo_cache_stats();
}

int cuda_backend_device(Backend& b) {
  auto* c = dynamic_cast<CudaBackend*>(&b);
  MOELAB_CHECK(c != nullptr, "cuda_backend_device: backend '", b.name(), "' is not the CUDA backend");
  return c->ordinal();
}

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& opts) {
  const int n = cuda_device_count();
  MOELAB_CHECK(n > 0, "backend cuda: no CUDA device is visible");
  MOELAB_CHECK(opts.device >= 0 && opts.device < n, "backend cuda: device ", opts.device,
               " does not exist (", n, " visible)");
  return std::make_unique<CudaBackend>(opts);
}

}  // namespace moelab
