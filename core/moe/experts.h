// moelab: a group of SwiGLU expert MLPs computed as grouped GEMMs over expert-sorted rows.
//
//   for expert e and its rows X_e [R_e, D]:  H_e = silu(X_e W1g_e) * (X_e W1u_e),  Y_e = H_e W2_e
//   W1 [E, D, 2F] holds [gate | up] side by side, W2 [E, F, D].
// Expert dropout (Switch: higher dropout inside experts) applies to H in training only.
// The shared (always-on) experts of DeepSeek-MoE are the same class with E = 1 and every token
// as its rows. Parameter gradients accumulate (+=); activation gradients overwrite.
#pragma once
#include <cstdint>
#include <vector>

#include "core/backend.h"

namespace moelab {

struct ExpertsCache {
  std::vector<int64_t> offsets;  // [E+1] row ranges per expert
  Tensor x;                      // [R,D] expert-sorted input rows
  Tensor ab;                     // [R,2F] X W1 (undefined under recompute: backward makes it)
  Tensor h;                      // [R,F] swiglu(ab), after dropout when training (likewise)
  bool dropout = false;
  uint64_t dropout_seed = 0;
};

class SwiGLUExperts {
 public:
  SwiGLUExperts(Backend& backend, int64_t experts, int64_t d_model, int64_t d_hidden, DType dtype);
  Tensor& w1() { return w1_; }
  Tensor& w2() { return w2_; }
  Tensor& dw1() { return dw1_; }
  Tensor& dw2() { return dw2_; }

  // x [R,D] rows sorted by expert with `offsets` [E+1]; returns y [R,D].
  Tensor forward(const Tensor& x, const std::vector<int64_t>& offsets, double dropout_rate,
                 uint64_t dropout_seed, ExpertsCache& cache);
  // dy [R,D] -> dx [R,D] (overwrite); dW1, dW2 accumulate.
  void backward(const ExpertsCache& cache, const Tensor& dy, double dropout_rate, const Tensor& dx);
  // train.recompute = mlp | all: forward keeps only its input rows; backward computes X W1 and
  // SwiGLU (with the same dropout mask) again, the same ops on the same inputs: the same bits.
  void set_recompute(bool on) { recompute_ = on; }

  // Zeroing dW1 and dW2 without a pass over their memory (PyTorch's zero_grad(set_to_none)):
  // after defer_grad_zero(), the next backward writes the weight gradients (beta 0) instead of
  // adding to them, which is the same value as adding to zeros. The expert weights are most of
  // an MoE model's parameters, so the fill and the GEMMs' reads of the old values were a pass
  // over most of the gradient memory each step. Until that backward runs, the gradients' memory
  // holds stale values: settle_grad_zero() zero-fills them if a deferred zero is still pending
  // (call it before reading gradients that no backward may have written).
  void defer_grad_zero() { grad_zero_deferred_ = true; }
  bool grad_zero_deferred() const { return grad_zero_deferred_; }
  void settle_grad_zero();

 private:
  Backend& b_;
  int64_t E_, D_, F_;
  DType dtype_;
  Tensor w1_, w2_, dw1_, dw2_;
  bool recompute_ = false;
  bool grad_zero_deferred_ = false;
  // ab = X W1, h = swiglu(ab) (dropped out in training): forward's and the recomputation's.
  void hidden(const Tensor& x, const std::vector<int64_t>& offsets, bool dropout, double dropout_rate,
              uint64_t dropout_seed, Tensor& ab, Tensor& h);
};

}  // namespace moelab
