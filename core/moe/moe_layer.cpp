// moelab: MoE layer composition (only core composes ops; backends implement them).
#include "core/moe/moe_layer.h"

#include "core/profile.h"

#include <cmath>

#include "core/rng.h"

namespace moelab {
namespace {
enum : uint64_t { kRouterStream = 10, kExpertDropoutStream = 11, kSharedDropoutStream = 12 };

DType router_dtype_for(DType model) { return model == DType::F64 ? DType::F64 : DType::F32; }

}  // namespace

MoELayer::MoELayer(Backend& backend, const MoEConfig& cfg, DType dtype,
                   std::unique_ptr<Dispatcher> dispatcher, Communicator* batch_group,
                   double loss_grad_weight)
    : b_(backend),
      cfg_(cfg),
      dtype_(dtype),
      router_(backend, cfg, router_dtype_for(dtype)),
      dispatcher_(dispatcher ? std::move(dispatcher)
                             : std::make_unique<LocalDispatcher>(backend, cfg.experts)),
      experts_(backend, dispatcher_->local_experts(), cfg.d_model, cfg.d_expert, dtype) {
  router_.set_batch_group(batch_group, loss_grad_weight);
  if (cfg.shared_experts > 0) {
    shared_ = std::make_unique<SwiGLUExperts>(backend, 1, cfg.d_model, cfg.shared_hidden(), dtype);
    if (cfg.shared_gate) {
      w_shared_gate_ = b_.zeros(Shape{cfg.d_model, 1}, dtype);
      dw_shared_gate_ = b_.zeros(Shape{cfg.d_model, 1}, dtype);
    }
  }
}

std::vector<ParamSlot> MoELayer::param_slots() {
  RouterParams& rp = router_.params();
  std::vector<ParamSlot> ps{{"router.w", &rp.w_router, &rp.dw_router}};
  if (rp.w_noise.defined()) ps.push_back({"router.w_noise", &rp.w_noise, &rp.dw_noise});
  ps.push_back({"experts.w1", &experts_.w1(), &experts_.dw1()});
  ps.push_back({"experts.w2", &experts_.w2(), &experts_.dw2()});
  if (shared_) {
    ps.push_back({"shared.w1", &shared_->w1(), &shared_->dw1()});
    ps.push_back({"shared.w2", &shared_->w2(), &shared_->dw2()});
    if (w_shared_gate_.defined()) ps.push_back({"shared.gate", &w_shared_gate_, &dw_shared_gate_});
  }
  return ps;
}

std::vector<ParamRef> MoELayer::params() {
  std::vector<ParamRef> ps;
  for (const ParamSlot& s : param_slots()) ps.push_back({s.name, *s.value, *s.grad});
  return ps;
}

void MoELayer::init(uint64_t seed, double scale) {
  uint64_t tag = 0;
  for (ParamRef& p : params()) {
    // fan_in: the second-to-last dimension of every weight here ([.., in, out]).
    const int64_t fan_in = p.value.dim(p.value.ndim() - 2);
    const double std = scale / std::sqrt(double(fan_in));
    const uint64_t s = rng::derive(seed, ++tag);
    // Sharded experts: this rank's slice of the all-experts stream.
    const uint64_t first = p.name.rfind("experts.", 0) == 0
                               ? uint64_t(dispatcher_->first_expert()) * uint64_t(p.value.numel() / p.value.dim(0))
                               : 0;
    b_.fill_normal(p.value, std, s, first);
  }
}

void MoELayer::zero_grad(bool defer_routed_experts) {
  for (const ParamSlot& s : param_slots())
    if (!defer_routed_experts || (s.grad != &experts_.dw1() && s.grad != &experts_.dw2())) b_.fill(*s.grad, 0.0);
  if (defer_routed_experts) experts_.defer_grad_zero();
}

MoEOutput MoELayer::forward(const Tensor& x, const MoEForwardArgs& args) {
  MOELAB_CHECK(x.ndim() == 2 && x.dim(1) == cfg_.d_model && x.dtype() == dtype_,
               "moe layer: input is ", x.describe(), ", expected ", to_string(dtype_),
               "[tokens, d_model = ", cfg_.d_model, "]");
  const int64_t T = x.dim(0);
  MoECache& c = cache_;
  c = MoECache{};
  c.args = args;
  c.x = x;
  {
    ProfileScope ps(b_, "moe router");
    c.route = router_.forward_begin(x, args.training, args.seq_len, rng::derive(args.seed, kRouterStream));
  }
  RouterState& st = c.route;

  const int64_t pad = cfg_.router.pad_to_capacity ? st.capacity : 0;
  Tensor xe;
  {
    ProfileScope ps(b_, "moe permute (plan, dispatch)");
    c.layout = dispatcher_->plan(st.idx, st.keep, st.expert_choice, pad);
    xe = dispatcher_->dispatch(x, c.layout);
  }
  {
    // The plan waited for the expert counts, so the router's statistics are on the host already.
    ProfileScope ps(b_, "moe router");
    router_.forward_end(st);
  }
  const double p_drop = args.training ? cfg_.expert_dropout : 0.0;
  Tensor ye;
  {
    ProfileScope ps(b_, "moe experts (grouped GEMMs, SwiGLU)");
    ye = experts_.forward(xe, c.layout.expert_offsets, p_drop, rng::derive(args.seed, kExpertDropoutStream),
                          c.experts);
  }
  // Combine on the source rank: y[t] = sum over t's kept assignments of gate * expert output.
  Tensor y = b_.empty(Shape{T, cfg_.d_model}, dtype_);
  {
    ProfileScope ps(b_, "moe unpermute (gather back, combine)");
    c.yp = dispatcher_->gather_back(ye, c.layout);
    c.gates = b_.as_dtype(st.gates, dtype_).reshape(Shape{st.gates.numel()});
    b_.unpermute_forward(c.yp, c.layout.send, c.gates, y);
  }

  ProfileScope ps(b_, "moe shared experts");
  if (shared_) {
    c.ys = shared_->forward(x, {0, T}, p_drop, rng::derive(args.seed, kSharedDropoutStream),
                            c.shared);
    if (w_shared_gate_.defined()) {  // Qwen2-MoE: y += sigmoid(x w_sg) * Shared(x)
      Tensor logit = b_.empty(Shape{T, 1}, dtype_);
      b_.gemm(false, false, 1.0, x, w_shared_gate_, 0.0, logit);
      c.shared_gate = b_.empty(Shape{T, 1}, dtype_);
      b_.sigmoid_forward(logit, c.shared_gate);
      Tensor gated = b_.empty(Shape{T, cfg_.d_model}, dtype_);
      b_.row_scale_forward(c.shared_gate, c.ys, gated);
      b_.axpy(1.0, gated, y);
    } else {
      b_.axpy(1.0, c.ys, y);
    }
  }

  MoEOutput out;
  out.y = y;
  out.losses = st.losses;
  out.stats = st.stats;
  out.capacity = st.capacity;
  out.sinkhorn_iters = st.sinkhorn_iters;
  return out;
}

void MoELayer::backward(const Tensor& dy, const Tensor& dx) {
  const MoECache& c = cache_;
  MOELAB_CHECK(c.x.defined(), "moe layer: backward without a forward");
  MOELAB_CHECK(dy.shape() == c.x.shape() && dy.dtype() == dtype_ && dx.shape() == c.x.shape(),
               "moe layer backward: dy ", dy.describe(), " / dx ", dx.describe(),
               " must match the input ", c.x.describe());
  const int64_t T = c.x.dim(0), D = cfg_.d_model;
  const double p_drop = c.args.training ? cfg_.expert_dropout : 0.0;

  // Routed experts: combine -> experts -> dispatch, back to token order.
  Tensor dyp = b_.empty(c.yp.shape(), dtype_), dgates = b_.empty(c.gates.shape(), dtype_);
  Tensor dye;
  {
    ProfileScope ps(b_, "moe unpermute (gather back, combine)");
    b_.unpermute_backward(dy, c.yp, c.layout.send, c.gates, dyp, dgates);
    dye = dispatcher_->gather_back_backward(dyp, c.layout);
  }
  Tensor dxe = b_.empty(dye.shape(), dtype_);
  {
    ProfileScope ps(b_, "moe experts (grouped GEMMs, SwiGLU)");
    experts_.backward(c.experts, dye, p_drop, dxe);
  }
  {
    ProfileScope ps(b_, "moe permute (plan, dispatch)");
    dispatcher_->dispatch_backward(dxe, c.layout, dx);
  }

  // Router: gradient through the gates plus the router losses.
  {
    ProfileScope ps(b_, "moe router");
    const RouterState& st = c.route;
    Tensor dgates_r = b_.as_dtype(dgates, router_.dtype()).reshape(st.gates.shape());
    router_.backward(st, c.x, dgates_r, c.args.seq_len, dx);  // dx += the router's part
  }

  ProfileScope ps(b_, "moe shared experts");
  if (shared_) {
    Tensor dys = dy;
    if (w_shared_gate_.defined()) {
      dys = b_.empty(Shape{T, D}, dtype_);
      Tensor dgate = b_.empty(Shape{T, 1}, dtype_), dlogit = b_.empty(Shape{T, 1}, dtype_);
      b_.row_scale_backward(c.shared_gate, c.ys, dy, dgate, dys);
      b_.sigmoid_backward(c.shared_gate, dgate, dlogit);
      b_.gemm(true, false, 1.0, c.x, dlogit, 1.0, dw_shared_gate_);
      b_.gemm(false, true, 1.0, dlogit, w_shared_gate_, 1.0, dx);
    }
    Tensor dxs = b_.empty(Shape{T, D}, dtype_);
    shared_->backward(c.shared, dys, p_drop, dxs);
    b_.axpy(1.0, dxs, dx);
  }
}

void MoELayer::update_bias() { router_.update_bias(cache_.route.stats); }
void MoELayer::update_bias(const RouterStats& step_stats) { router_.update_bias(step_stats); }

}  // namespace moelab
