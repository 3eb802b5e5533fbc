// moelab: the MoE layer = router -> dispatch -> experts -> combine (+ shared experts).
//
//   y = sum_{kept assignments a of token t} g_a * Expert_{e(a)}(x_t)  [+ sigmoid(x w_sg) * Shared(x)]
//
// Explicit forward/backward (llm.c style): forward keeps what backward needs in MoECache;
// backward(dy) overwrites dx and accumulates (+=) every parameter gradient, including the
// gradients of the weighted router losses (so the objective is  <dy, y> + losses.weighted).
// A dropped assignment contributes zero; the token still reaches the next layer through the
// residual connection, which belongs to the caller.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/moe/config.h"
#include "core/moe/dispatcher.h"
#include "core/moe/experts.h"
#include "core/moe/router.h"

namespace moelab {

// A named parameter and its gradient (gradients accumulate until zero_grad()).
struct ParamRef {
  std::string name;
  Tensor value;
  Tensor grad;
};

// Where a parameter and its gradient live (the owning layer's members): a parameter store may
// rebind `*grad` to a view of its flat buffer (same shape and dtype), and the layer's backward
// then accumulates there.
struct ParamSlot {
  std::string name;
  Tensor* value;
  Tensor* grad;
};

struct MoEForwardArgs {
  bool training = false;  // noise, random top-2 draws, Sinkhorn selection and dropout
  int64_t seq_len = 0;    // tokens per sequence, for the sequence-level aux loss (0 = T)
  uint64_t seed = 0;      // per-call randomness; derive from (run seed, layer, step)
};

struct MoEOutput {
  Tensor y;             // [T,D] model dtype
  RouterLosses losses;  // un-scaled values and the weighted sum added to the objective
  RouterStats stats;
  int64_t capacity = 0;     // C used (0 = dropless)
  int sinkhorn_iters = 0;
};

class MoELayer {
 public:
  // dtype: the model dtype (f32 or f64 on the CPU); the router runs in f64 when dtype is f64,
  // in f32 otherwise. The dispatcher decides where experts live: by default a LocalDispatcher
  // (all E experts here); an AllToAllDispatcher shards them over expert-parallel ranks, and
  // this layer then holds only its E / ep experts (parameter "experts.w1" is [E/ep, D, 2F]).
  // batch_group: the ranks that share one batch (see Router::set_batch_group); null = this
  // call's tokens are the whole batch. loss_grad_weight: see Router::set_batch_group.
  MoELayer(Backend& backend, const MoEConfig& cfg, DType dtype,
           std::unique_ptr<Dispatcher> dispatcher = nullptr, Communicator* batch_group = nullptr,
           double loss_grad_weight = 1.0);

  // Normal(0, scale / sqrt(fan_in)) for every weight, deterministic from seed. Element i of a
  // weight is draw i of its stream, counted over all E experts, so a rank holding experts
  // [e0, e1) gets exactly those experts' values of the single-rank initialisation.
  void init(uint64_t seed, double scale);
  std::vector<ParamRef> params();
  std::vector<ParamSlot> param_slots();  // params() as slots, same names and order
  // Zeroes every gradient; with defer_routed_experts, the routed experts' by their next backward
  // (SwiGLUExperts::defer_grad_zero, as ParamStore::zero_grads does).
  void zero_grad(bool defer_routed_experts = false);

  MoEOutput forward(const Tensor& x, const MoEForwardArgs& args);
  void backward(const Tensor& dy, const Tensor& dx);
  // train.recompute = mlp | all: the routed and shared experts' hidden activations are
  // recomputed in backward (SwiGLUExperts::set_recompute).
  void set_recompute(bool on) {
    experts_.set_recompute(on);
    if (shared_) shared_->set_recompute(on);
  }
  // After the optimizer step: aux-loss-free bias update from the last forward's counts.
  void update_bias();
  // The same from given counts (the step's, merged over micro-batches and ranks).
  void update_bias(const RouterStats& step_stats);

  const MoEConfig& config() const { return cfg_; }
  Router& router() { return router_; }
  const RouterState& last_routing() const { return cache_.route; }
  const DispatchPlan& last_plan() const { return cache_.layout.send; }
  const DispatchLayout& last_layout() const { return cache_.layout; }
  Dispatcher& dispatcher() { return *dispatcher_; }
  // The routed experts (their weights are the parameters "experts.w1" / "experts.w2").
  SwiGLUExperts& routed_experts() { return experts_; }

 private:
  struct MoECache {
    MoEForwardArgs args;
    Tensor x;             // [T,D]
    RouterState route;
    DispatchLayout layout;
    Tensor gates;         // [A] gates in the model dtype (the combine weights)
    ExpertsCache experts;
    Tensor yp;            // [R,D] expert outputs back on this rank, in send (expert-sorted) order
    ExpertsCache shared;
    Tensor ys;            // [T,D] shared-expert output (before its gate)
    Tensor shared_gate;   // [T,1] sigmoid(x w_sg)
  };

  Backend& b_;
  MoEConfig cfg_;
  DType dtype_;
  Router router_;
  std::unique_ptr<Dispatcher> dispatcher_;
  SwiGLUExperts experts_;
  std::unique_ptr<SwiGLUExperts> shared_;
  Tensor w_shared_gate_, dw_shared_gate_;  // [D,1]
  MoECache cache_;
};

}  // namespace moelab
