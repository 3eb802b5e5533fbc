// moelab: local (single-device) dispatcher: permute / un-permute through backend ops.
#include "core/moe/dispatcher.h"

namespace moelab {

DispatchPlan LocalDispatcher::plan(const Tensor& idx, const Tensor& keep, bool expert_choice,
                                   int64_t pad_capacity) {
  return b_.dispatch_plan(idx, keep, expert_choice, experts_, pad_capacity);
}

Tensor LocalDispatcher::dispatch(const Tensor& x, const DispatchPlan& plan) {
  Tensor xp = b_.empty(Shape{plan.rows(), x.dim(1)}, x.dtype());
  b_.permute_forward(x, plan, xp);
  return xp;
}

Tensor LocalDispatcher::combine(const Tensor& yp, const DispatchPlan& plan, const Tensor& gates,
                                int64_t tokens) {
  Tensor y = b_.empty(Shape{tokens, yp.dim(1)}, yp.dtype());
  b_.unpermute_forward(yp, plan, gates, y);
  return y;
}

void LocalDispatcher::combine_backward(const Tensor& dy, const Tensor& yp,
                                       const DispatchPlan& plan, const Tensor& gates,
                                       const Tensor& dyp, const Tensor& dgates) {
  b_.unpermute_backward(dy, yp, plan, gates, dyp, dgates);
}

void LocalDispatcher::dispatch_backward(const Tensor& dxp, const DispatchPlan& plan,
                                        const Tensor& dx) {
  b_.permute_backward(dxp, plan, dx);
}

}  // namespace moelab
