// moelab CUDA backend: the launchers, one declaration per op, grouped by the file that holds them.
//
// Every launcher enqueues its kernels on ctx.stream and returns without synchronising, except
// where a result must reach the host (losses, router statistics, dispatch offsets, Sinkhorn's
// iteration count). Shapes, dtypes and devices were checked by core/backend.cpp; the semantics
// of each op are the comments in core/backend.h, which these kernels match against the CPU
// reference (backends/cpu/cpu_backend.cpp).
#pragma once
#include <functional>

#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/cuda_common.cuh"

namespace moelab::ggemm {
struct Params;  // grouped_gemm_kernels.h
}

namespace moelab::cuda {

// ---- kernels_elementwise.cu ----------------------------------------------------------------
void fill(Ctx& c, const Tensor& x, double v);
void fill_normal(Ctx& c, const Tensor& x, double std, uint64_t stream, uint64_t first);
void cast(Ctx& c, const Tensor& src, const Tensor& dst);
void axpy(Ctx& c, double alpha, const Tensor& x, const Tensor& y);
// y[0..n) = beta y (beta == 0 writes exact zeros, ignoring NaN in y). dt: f32 or bf16.
void scale(Ctx& c, DType dt, void* y, int64_t n, double beta);
void transpose(Ctx& c, const Tensor& x, const Tensor& y);
void swiglu_forward(Ctx& c, const Tensor& ab, const Tensor& h);
void swiglu_backward(Ctx& c, const Tensor& ab, const Tensor& dh, const Tensor& dab);
void sigmoid_forward(Ctx& c, const Tensor& x, const Tensor& y);
void sigmoid_backward(Ctx& c, const Tensor& y, const Tensor& dy, const Tensor& dx);
void softplus_forward(Ctx& c, const Tensor& x, const Tensor& y);
void softplus_backward(Ctx& c, const Tensor& x, const Tensor& dy, const Tensor& dx);
void dropout(Ctx& c, const Tensor& x, double p, uint64_t seed, const Tensor& y);
// offset: the counter of element 0 (core/backend.h: randomness keyed by global token position).
void jitter(Ctx& c, const Tensor& x, double eps, uint64_t seed, const Tensor& y, uint64_t offset);
void noisy_logits_forward(Ctx& c, const Tensor& clean, const Tensor& std, double sigma,
                          uint64_t seed, const Tensor& h, uint64_t offset);
void noisy_logits_backward(Ctx& c, const Tensor& dh, const Tensor& std, uint64_t seed,
                           const Tensor& dclean, const Tensor& dstd, uint64_t offset);

// ---- kernels_rows.cu: one warp per row, and deterministic reductions ---------------------------
void softmax_forward(Ctx& c, const Tensor& l, const Tensor& p);
void softmax_backward(Ctx& c, const Tensor& p, const Tensor& dp, const Tensor& dl);
void row_normalize_forward(Ctx& c, const Tensor& x, const Tensor& y);
void row_normalize_backward(Ctx& c, const Tensor& x, const Tensor& dy, const Tensor& dx);
void row_scale_forward(Ctx& c, const Tensor& s, const Tensor& x, const Tensor& y);
void row_scale_backward(Ctx& c, const Tensor& s, const Tensor& x, const Tensor& dy,
                        const Tensor& ds, const Tensor& dx);
// out[s, e] = sum over rows r of segment s (rows [s*seg, (s+1)*seg)) of m[r, e]; m [R, E] of
// dtype dt (f32, bf16, or f64 for scratch), seg divides R. Fixed summation order.
void column_sums(Ctx& c, DType dt, const void* m, int64_t R, int64_t E, int64_t seg,
                 double* out);
// *out = sum (or max) of x[0..n), fixed order; out is device memory.
void device_sum(Ctx& c, const double* x, int64_t n, double* out);
void device_max(Ctx& c, const double* x, int64_t n, double* out);

// ---- gemm.cu: cuBLAS ---------------------------------------------------------------------------
GemmAlgoCacheStats gemm_algo_cache_stats(const Ctx& c);  // gemm.cu
void gemm(Ctx& c, bool ta, bool tb, double alpha, const Tensor& a, const Tensor& b, double beta,
          const Tensor& cm);
void grouped_gemm(Ctx& c, GroupedGemmImpl impl, const Tensor& x, const Tensor& w,
                  const std::vector<int64_t>& offsets, const Tensor& y, bool trans_w,
                  double beta);
void grouped_gemm_wgrad(Ctx& c, GroupedGemmImpl impl, const Tensor& x, const Tensor& dy,
                        const std::vector<int64_t>& offsets, const Tensor& dw, double beta);
// Backend::router_logits / router_input_grads for bf16 x and an f32 weight (the only case taken:
// router_gemms_on_tensor_cores), in f32 precision on the bf16 tensor cores.
bool router_gemms_on_tensor_cores(const Tensor& x, const Tensor& w);
void router_logits(Ctx& c, const Tensor& x, const Tensor& w, const Tensor& out);
void router_input_grads(Ctx& c, const Tensor& x, const Tensor& dlogits, const Tensor& w, const Tensor& dw,
                        const Tensor& dx);
// ---- grouped_gemm_mma.cu: moelab's own grouped GEMM (GroupedGemmImpl::Mma) --------------------
// bf16 only; offsets d_off [E+1] int32 in device memory (never read on the host). Semantics as
// grouped_gemm / grouped_gemm_wgrad above. can_implement(x, w or dy, y or dw): bf16 operands,
// K = x.dim(1) and N = out.dim(-1) multiples of 8, 16-byte aligned bases; else use cuBLAS.
bool mma_grouped_can_implement(const Tensor& x, const Tensor& w, const Tensor& out);
// The kernel parameters of one call (either own kernel): x, w (or dy), y (or dw) as above,
// K = x.dim(1), N = the output's width.
ggemm::Params grouped_gemm_params(const Tensor& x, const Tensor& w, const int32_t* d_off, int64_t E,
                                  const Tensor& y, int64_t K, int64_t N, double beta);
void mma_grouped_gemm(Ctx& c, const Tensor& x, const Tensor& w, const int32_t* d_off, int64_t E,
                      const Tensor& y, bool trans_w, double beta);
void mma_grouped_gemm_wgrad(Ctx& c, const Tensor& x, const Tensor& dy, const int32_t* d_off,
                            int64_t E, const Tensor& dw, double beta);
// ---- grouped_gemm_wgmma.cu: the same on Hopper's warpgroup MMA (GroupedGemmImpl::Wgmma) --------
// Same contract and can_implement (mma_grouped_can_implement); runs only where
// wgmma_grouped_available (compute capability 9.0).
bool wgmma_grouped_available(const Ctx& c);
void wgmma_grouped_gemm(Ctx& c, const Tensor& x, const Tensor& w, const int32_t* d_off, int64_t E,
                        const Tensor& y, bool trans_w, double beta);
void wgmma_grouped_gemm_wgrad(Ctx& c, const Tensor& x, const Tensor& dy, const int32_t* d_off,
                              int64_t E, const Tensor& dw, double beta);
// Row-major batched product with one pointer per item (cublasGemmBatchedEx):
// C_i [m, n] = alpha op(A_i) op(B_i) + beta C_i. A and B share ab_type; C may be f32 while A, B
// are bf16 (fp32 scores from bf16 operands). lda / ldb / ldc are row lengths.
void gemm_batched(Ctx& c, bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
                  DType ab_type, const std::vector<const void*>& a, int64_t lda,
                  const std::vector<const void*>& b, int64_t ldb, double beta, DType c_type,
                  const std::vector<void*>& cm, int64_t ldc);

// ---- sort.cu: CUB wrappers (the only file that includes CUB) -----------------------------------
// Stable radix sort of (key, value) pairs by the low end_bit bits of the key.
void sort_pairs(Ctx& c, const uint64_t* keys_in, uint64_t* keys_out, const int32_t* vals_in,
                int32_t* vals_out, int64_t n, int end_bit);
void exclusive_sum(Ctx& c, const int32_t* in, int32_t* out, int64_t n);

// ---- kernels_routing.cu ------------------------------------------------------------------------
void topk(Ctx& c, const Tensor& scores, const Tensor& bias, const Tensor& idx);
void balanced_assign(Ctx& c, const Tensor& idx, int64_t experts, int64_t offset);
void gates_forward(Ctx& c, const Tensor& scores, const Tensor& idx, bool normalize, double scale,
                   const Tensor& gates);
void gates_backward(Ctx& c, const Tensor& scores, const Tensor& idx, const Tensor& dgates,
                    bool normalize, double scale, const Tensor& dscores);
void random_top2_mask(Ctx& c, const Tensor& gates, double tau, uint64_t seed, const Tensor& keep,
                      uint64_t offset);
void capacity_mask(Ctx& c, const Tensor& idx, const Tensor& gates, int64_t experts,
                   int64_t capacity, DropPolicy policy, const Tensor& keep);
int sinkhorn(Ctx& c, const Tensor& logits, double tol, int max_iters, const Tensor& out);
void expert_choice(Ctx& c, const Tensor& scores, const Tensor& chosen);

// ---- kernels_dispatch.cu -----------------------------------------------------------------------
using EmptyFn = std::function<Tensor(Shape, DType)>;
DispatchPlan dispatch_plan(Ctx& c, const EmptyFn& empty, const Tensor& idx, const Tensor& keep,
                           bool expert_choice, int64_t experts, int64_t pad_capacity);
void permute_forward(Ctx& c, const Tensor& x, const DispatchPlan& plan, const Tensor& xp);
void permute_backward(Ctx& c, const Tensor& dxp, const DispatchPlan& plan, const Tensor& dx);
void unpermute_forward(Ctx& c, const Tensor& yp, const DispatchPlan& plan, const Tensor& gates,
                       const Tensor& y);
void unpermute_backward(Ctx& c, const Tensor& dy, const Tensor& yp, const DispatchPlan& plan,
                        const Tensor& gates, const Tensor& dyp, const Tensor& dgates);

// ---- kernels_losses.cu -------------------------------------------------------------------------
double aux_loss_forward(Ctx& c, const Tensor& probs, const Tensor& idx, int64_t seq_len);
void aux_loss_backward(Ctx& c, const Tensor& probs, const Tensor& idx, int64_t seq_len,
                       double scale, const Tensor& dprobs);
double z_loss_forward(Ctx& c, const Tensor& logits);
void z_loss_backward(Ctx& c, const Tensor& logits, double scale, const Tensor& dlogits);
// Backend::router_logits_backward in one kernel for f32 scores of up to 256 experts (the case
// router_logits_backward_fused takes).
bool router_logits_backward_fused(const Tensor& scores);
void router_logits_backward(Ctx& c, const Tensor& scores, const Tensor& logits, const Tensor& idx,
                            const Tensor& dgates, bool normalize, double score_scale, int64_t aux_seq_len,
                            double aux_scale, double z_scale, const Tensor& dlogits);
double cv2_loss_forward(Ctx& c, const Tensor& gates, const Tensor& idx, int64_t experts);
void cv2_loss_backward(Ctx& c, const Tensor& gates, const Tensor& idx, int64_t experts,
                       double scale, const Tensor& dgates);
double load_loss_forward(Ctx& c, const Tensor& clean, const Tensor& h, const Tensor& std,
                         double sigma, int64_t k);
void load_loss_backward(Ctx& c, const Tensor& clean, const Tensor& h, const Tensor& std,
                        double sigma, int64_t k, double scale, const Tensor& dclean,
                        const Tensor& dstd, const Tensor& dh);
RouterStats router_stats(Ctx& c, const Tensor& logits, const Tensor& probs, const Tensor& idx,
                         const Tensor& keep, bool expert_choice, int64_t experts);
// router_stats, z, and optionally aux and importance, with one device-to-host copy that does not
// wait (Backend::router_summary_begin).
PendingRouterSummary router_summary_begin(Ctx& c, const Tensor& logits, const Tensor& probs, const Tensor& idx,
                                          const Tensor& keep, const Tensor& gates, bool expert_choice,
                                          int64_t experts, int64_t aux_seq_len, bool want_aux, bool want_importance);


// ---- kernels_transformer.cu --------------------------------------------------------------------
void mul_scalar(Ctx& c, const Tensor& x, double alpha);  // x *= alpha (the Scale op)
double sum_squares(Ctx& c, const Tensor& x);
void embedding_forward(Ctx& c, const Tensor& tokens, const Tensor& table, const Tensor& out);
void embedding_backward(Ctx& c, const Tensor& tokens, const Tensor& dout, const Tensor& dtable);
void rmsnorm_forward(Ctx& c, const Tensor& x, const Tensor& w, double eps, const Tensor& y,
                     const Tensor& rstd);
void rmsnorm_backward(Ctx& c, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      const Tensor& dy, const Tensor& dx, const Tensor& dw);
void rope(Ctx& c, const Tensor& x, int64_t heads, int64_t seq_len, double theta, bool inverse,
          const Tensor& y, const Tensor& positions);
// Flash attention (flash_attention.cu): lse f32 [B*H, S] instead of the probabilities;
// segments (i32 [T], or undefined) masks keys of other packed records.
void attention_forward(Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads,
                       int64_t kv_heads, int64_t seq_len, const Tensor& out, const Tensor& lse,
                       const Tensor& segments);
void attention_backward(Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const Tensor& lse, const Tensor& dout, int64_t heads,
                        int64_t kv_heads, int64_t seq_len, const Tensor& dq, const Tensor& dk,
                        const Tensor& dv, const Tensor& segments);
// f32 attention through cuBLAS GEMMs (attention_gemm.cu), same contract as the flash kernels;
// can_implement: f32, and one kv group's S x S scores fit the scratch limit.
bool attention_gemm_can_implement(const Tensor& q, int64_t heads, int64_t kv_heads, int64_t seq_len);
void attention_gemm_forward(Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads,
                            int64_t kv_heads, int64_t seq_len, const Tensor& out, const Tensor& lse,
                            const Tensor& segments);
void attention_gemm_backward(Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& out, const Tensor& lse, const Tensor& dout, int64_t heads,
                             int64_t kv_heads, int64_t seq_len, const Tensor& dq, const Tensor& dk,
                             const Tensor& dv, const Tensor& segments);
double cross_entropy_forward(Ctx& c, const Tensor& logits, const Tensor& targets);
void cross_entropy_backward(Ctx& c, const Tensor& logits, const Tensor& targets, double scale,
                            const Tensor& dlogits);
void adamw(Ctx& c, const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
           double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
           const Tensor& cast_to);

}  // namespace moelab::cuda
