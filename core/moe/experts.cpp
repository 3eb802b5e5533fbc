// moelab: SwiGLU experts as grouped GEMMs (no per-token host loop).
#include "core/moe/experts.h"

namespace moelab {

SwiGLUExperts::SwiGLUExperts(Backend& backend, int64_t experts, int64_t d_model, int64_t d_hidden,
                             DType dtype)
    : b_(backend), E_(experts), D_(d_model), F_(d_hidden), dtype_(dtype) {
  w1_ = b_.zeros(Shape{E_, D_, 2 * F_}, dtype_);
  w2_ = b_.zeros(Shape{E_, F_, D_}, dtype_);
  dw1_ = b_.zeros(Shape{E_, D_, 2 * F_}, dtype_);
  dw2_ = b_.zeros(Shape{E_, F_, D_}, dtype_);
}

void SwiGLUExperts::hidden(const Tensor& x, const std::vector<int64_t>& offsets, bool dropout,
                           double dropout_rate, uint64_t dropout_seed, Tensor& ab, Tensor& h) {
  const int64_t R = x.dim(0);
  ab = b_.empty(Shape{R, 2 * F_}, dtype_);
  b_.grouped_gemm(x, w1_, offsets, ab, false, 0.0);
  h = b_.empty(Shape{R, F_}, dtype_);
  b_.swiglu_forward(ab, h);
  if (dropout) b_.dropout_forward(h, dropout_rate, dropout_seed, h);
}

Tensor SwiGLUExperts::forward(const Tensor& x, const std::vector<int64_t>& offsets,
                              double dropout_rate, uint64_t dropout_seed, ExpertsCache& cache) {
  const int64_t R = x.dim(0);
  cache.offsets = offsets;
  cache.x = x;
  cache.dropout = dropout_rate > 0;
  cache.dropout_seed = dropout_seed;
  Tensor ab, h;
  hidden(x, offsets, cache.dropout, dropout_rate, dropout_seed, ab, h);
  Tensor y = b_.empty(Shape{R, D_}, dtype_);
  b_.grouped_gemm(h, w2_, offsets, y, false, 0.0);
  cache.ab = recompute_ ? Tensor() : ab;
  cache.h = recompute_ ? Tensor() : h;
  return y;
}

void SwiGLUExperts::settle_grad_zero() {
  if (!grad_zero_deferred_) return;
  b_.fill(dw1_, 0.0);
  b_.fill(dw2_, 0.0);
  grad_zero_deferred_ = false;
}

void SwiGLUExperts::backward(const ExpertsCache& cache, const Tensor& dy, double dropout_rate,
                             const Tensor& dx) {
  const int64_t R = dy.dim(0);
  Tensor ab = cache.ab, h = cache.h;
  if (!ab.defined()) hidden(cache.x, cache.offsets, cache.dropout, dropout_rate, cache.dropout_seed, ab, h);
  // beta 0 after a deferred zero: the GEMMs write the gradients, experts without rows get zeros.
  const double beta = grad_zero_deferred_ ? 0.0 : 1.0;
  grad_zero_deferred_ = false;
  b_.grouped_gemm_wgrad(h, dy, cache.offsets, dw2_, beta);        // dW2_e += H_e^T dY_e
  Tensor dh = b_.empty(Shape{R, F_}, dtype_);
  b_.grouped_gemm(dy, w2_, cache.offsets, dh, true, 0.0);          // dH_e = dY_e W2_e^T
  if (cache.dropout) b_.dropout_backward(dh, dropout_rate, cache.dropout_seed, dh);
  Tensor dab = b_.empty(Shape{R, 2 * F_}, dtype_);
  b_.swiglu_backward(ab, dh, dab);
  b_.grouped_gemm_wgrad(cache.x, dab, cache.offsets, dw1_, beta); // dW1_e += X_e^T dAB_e
  b_.grouped_gemm(dab, w1_, cache.offsets, dx, true, 0.0);         // dX_e = dAB_e W1_e^T
}

}  // namespace moelab
