// moelab: the token dispatcher (Megatron-Core's split): permute tokens into expert-sorted rows,
// and combine (un-permute, weight by the gate, sum) after the experts.
//
// The interface hides where experts live. LocalDispatcher keeps all experts on this backend; an
// all-to-all dispatcher for expert parallelism implements the same four calls, exchanging rows
// through a Communicator between permute and the expert GEMMs (and back before the combine).
// Activation gradients overwrite.
#pragma once
#include "core/backend.h"

namespace moelab {

class Dispatcher {
 public:
  virtual ~Dispatcher() = default;
  // The row layout for this call's kept assignments (see DispatchPlan).
  virtual DispatchPlan plan(const Tensor& idx, const Tensor& keep, bool expert_choice,
                            int64_t pad_capacity) = 0;
  // x [T,D] -> xp [R,D] expert-sorted rows (of this rank's experts).
  virtual Tensor dispatch(const Tensor& x, const DispatchPlan& plan) = 0;
  // yp [R,D], gates [A] -> y [T,D] = sum over a token's rows of gate * row.
  virtual Tensor combine(const Tensor& yp, const DispatchPlan& plan, const Tensor& gates,
                         int64_t tokens) = 0;
  // Backward of combine: dy [T,D] -> dyp [R,D] and dgates [A].
  virtual void combine_backward(const Tensor& dy, const Tensor& yp, const DispatchPlan& plan,
                                const Tensor& gates, const Tensor& dyp, const Tensor& dgates) = 0;
  // Backward of dispatch: dxp [R,D] -> dx [T,D].
  virtual void dispatch_backward(const Tensor& dxp, const DispatchPlan& plan, const Tensor& dx) = 0;
  // How many experts this rank computes (all of them for the local dispatcher).
  virtual int64_t local_experts() const = 0;
};

class LocalDispatcher final : public Dispatcher {
 public:
  LocalDispatcher(Backend& backend, int64_t experts) : b_(backend), experts_(experts) {}
  DispatchPlan plan(const Tensor& idx, const Tensor& keep, bool expert_choice,
                    int64_t pad_capacity) override;
  Tensor dispatch(const Tensor& x, const DispatchPlan& plan) override;
  Tensor combine(const Tensor& yp, const DispatchPlan& plan, const Tensor& gates,
                 int64_t tokens) override;
  void combine_backward(const Tensor& dy, const Tensor& yp, const DispatchPlan& plan,
                        const Tensor& gates, const Tensor& dyp, const Tensor& dgates) override;
  void dispatch_backward(const Tensor& dxp, const DispatchPlan& plan, const Tensor& dx) override;
  int64_t local_experts() const override { return experts_; }

 private:
  Backend& b_;
  int64_t experts_;
};

}  // namespace moelab
