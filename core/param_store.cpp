// moelab: parameter store and gradient reduction (see param_store.h).
#include "core/param_store.h"

#include <algorithm>
#include <chrono>

#include "core/check.h"
#include "core/model.h"

namespace moelab {

GradGroup grad_group_of(const std::string& name) {
  return name.find(".moe.experts.") != std::string::npos ? GradGroup::Expert : GradGroup::Replicated;
}

namespace {
constexpr DType kGradDtypes[] = {DType::F64, DType::F32, DType::BF16};
}

ParamStore::ParamStore(Backend& b, TransformerLM& model) : b_(b), layers_(int(model.config().layers)) {
  std::vector<ParamSlot> slots = model.param_slots();
  std::vector<int> block(slots.size());
  groups_.resize(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    block[i] = TransformerLM::block_of(slots[i].name);
    groups_[i] = grad_group_of(slots[i].name);
  }
  // Backward order of the buckets: the last block first, the rest (-1) last.
  std::vector<int> order;
  for (int l = layers_ - 1; l >= 0; --l) order.push_back(l);
  order.push_back(-1);
  for (auto& g : buckets_) g.assign(size_t(layers_) + 1, {});

  for (GradGroup g : {GradGroup::Replicated, GradGroup::Expert})
    for (DType dt : kGradDtypes) {
      int64_t n = 0;
      for (size_t i = 0; i < slots.size(); ++i)
        if (groups_[i] == g && slots[i].grad->dtype() == dt) n += slots[i].grad->numel();
      if (n == 0) continue;
      Tensor flat = b_.zeros(Shape{n}, dt);
      int64_t at = 0;
      for (int blk : order) {
        const int64_t begin = at;
        for (size_t i = 0; i < slots.size(); ++i) {
          Tensor& grad = *slots[i].grad;
          if (groups_[i] != g || grad.dtype() != dt || block[i] != blk) continue;
          const int64_t k = grad.numel();
          // The backward accumulates into gradients (zero_grad, then +=), so the layers keep
          // working on the views.
          grad = flat.view_rows(at, at + k).reshape(grad.shape());
          at += k;
        }
        if (at > begin) buckets_[size_t(g)][size_t(blk + 1)].push_back(flat.view_rows(begin, at));
      }
      MOELAB_CHECK(at == n, "parameter store: laid out ", at, " of ", n, " gradient elements");
      buffers_.push_back(flat);
      buffer_groups_.push_back(g);
    }
  params_ = model.params();

  // The expert group's gradients are deferred-zero only if they are exactly the routed experts'
  // dW1 and dW2 of every MoE layer (a parameter of another kind there would stay stale).
  std::vector<SwiGLUExperts*> experts;
  std::vector<const Tensor*> owned;
  for (int i = 0; i < int(model.moe_blocks().size()); ++i) {
    SwiGLUExperts& x = model.moe_layer(size_t(i)).routed_experts();
    experts.push_back(&x);
    owned.push_back(&x.dw1());
    owned.push_back(&x.dw2());
  }
  size_t expert_slots = 0;
  bool all_owned = true;
  for (size_t i = 0; i < slots.size(); ++i) {
    if (groups_[i] != GradGroup::Expert) continue;
    ++expert_slots;
    all_owned = all_owned && std::find(owned.begin(), owned.end(), slots[i].grad) != owned.end();
  }
  if (all_owned && expert_slots == owned.size()) deferred_ = experts;
}

void ParamStore::zero_grads() {
  for (size_t i = 0; i < buffers_.size(); ++i)
    if (deferred_.empty() || buffer_groups_[i] != GradGroup::Expert) b_.fill(buffers_[i], 0.0);
  for (SwiGLUExperts* x : deferred_) x->defer_grad_zero();
}

void ParamStore::settle() const {
  for (SwiGLUExperts* x : deferred_) x->settle_grad_zero();
}

void ParamStore::scale_grads(double s) {
  settle();
  for (Tensor& t : buffers_) b_.scale(t, s);
}

double ParamStore::sum_squares(GradGroup g) const {
  settle();
  double sq = 0;
  for (size_t i = 0; i < buffers_.size(); ++i)
    if (buffer_groups_[i] == g) sq += b_.sum_squares(buffers_[i]);
  return sq;
}

const std::vector<Tensor>& ParamStore::bucket(GradGroup g, int block) const {
  MOELAB_CHECK(block >= -1 && block < layers_, "parameter store: no bucket for block ", block);
  return buckets_[size_t(g)][size_t(block + 1)];
}

void GradientReducer::start(int block) {
  for (GradGroup g : {GradGroup::Replicated, GradGroup::Expert}) {
    Communicator* c = comm_[size_t(g)];
    if (c == nullptr || c->size() == 1) continue;
    for (const Tensor& t : store_.bucket(g, block)) c->start_all_reduce(t, ReduceOp::Sum);
  }
}

void GradientReducer::block_done(int block) {
  MOELAB_CHECK(block >= 0 && block < store_.layers() && !started_[size_t(block)],
               "gradient reducer: block ", block, " reported done twice or out of range");
  started_[size_t(block)] = true;
  start(block);
}

void GradientReducer::finish(Backend& compute) {
  // Blocks whose completion was not reported (a backward without the hook) go now, in
  // backward order, then the rest. (block_done's blocks had their backward: nothing deferred.)
  store_.settle();
  for (int l = store_.layers() - 1; l >= 0; --l)
    if (!started_[size_t(l)]) start(l);
  start(-1);
  started_.assign(started_.size(), false);
  // What the compute stream still has queued is not communication: wait for it first, then
  // time what is left of the reductions (the part the overlap did not hide).
  compute.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (Communicator* c : comm_)
    if (c != nullptr) c->wait_started();
  wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace moelab
