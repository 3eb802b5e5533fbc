// moelab tests: the parameter store (core/param_store.h): gradients as views of flat buffers,
// bucketed in backward order, the same gradients as without the store, and the gradient
// reducer starting each block's reduction during the backward pass.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <stdexcept>

#include "core/model.h"
#include "core/param_store.h"
#include "core/rng.h"
#include "test_util.h"

using namespace moelab;
using namespace moelab::test;

namespace {
Backend& B() { return cpu(); }

LMConfig store_lm(bool tie) {
  LMConfig c;
  c.vocab = 11;
  c.d_model = 8;
  c.layers = 3;
  c.heads = 2;
  c.kv_heads = 1;
  c.moe_every = 2;  // dense, MoE, dense: both kinds of bucket
  c.tie_embeddings = tie;
  c.moe.d_model = 8;
  c.moe.experts = 4;
  c.moe.top_k = 2;
  c.moe.d_expert = 6;
  c.moe.shared_experts = 1;
  c.moe.router.aux_alpha = 0.1;
  return c;
}

struct Batch10 {
  Tensor tokens, targets;
  explicit Batch10(uint64_t seed) {
    std::vector<double> tk, tg;
    for (int t = 0; t < 10; ++t) {
      tk.push_back(double(rng::bits(seed, uint64_t(t)) % 11));
      tg.push_back(double(rng::bits(seed + 1, uint64_t(t)) % 11));
    }
    tokens = host_tensor(tk, Shape{10}, DType::I32);
    targets = host_tensor(tg, Shape{10}, DType::I32);
  }
};

// Records start_all_reduce calls (their sizes); nothing else is used by the reducer.
class RecordingComm final : public Communicator {
 public:
  std::vector<int64_t> started;
  int waits = 0;
  int rank() const override { return 0; }
  int size() const override { return 2; }
  std::string kind() const override { return "recording"; }
  void all_reduce(const Tensor&, ReduceOp) override { fail(); }
  void start_all_reduce(const Tensor& t, ReduceOp) override { started.push_back(t.numel()); }
  void wait_started() override { ++waits; }
  void all_gather(const Tensor&, const Tensor&) override { fail(); }
  void broadcast(const Tensor&, int) override { fail(); }
  void all_to_all_v(const Tensor&, const std::vector<int64_t>&, const Tensor&, const std::vector<int64_t>&) override {
    fail();
  }
  void barrier() override { fail(); }
  std::vector<int64_t> exchange_counts(const std::vector<int64_t>&) override { fail(); }
  std::vector<int64_t> all_gather_host(const std::vector<int64_t>&) override { fail(); }
  void all_reduce_host(std::vector<double>&, ReduceOp) override { fail(); }
  std::unique_ptr<Communicator> split(int, int) override { fail(); }
  void abort(const std::string&) noexcept override {}

 private:
  [[noreturn]] static void fail() { throw std::logic_error("RecordingComm: unexpected call"); }
};
}  // namespace

TEST_CASE("param store: every gradient is a view of one flat buffer, bucketed in backward order", "[param_store]") {
  for (bool tie : {true, false}) {
    CAPTURE(tie);
    TransformerLM lm(B(), store_lm(tie), DType::F64);
    lm.init(5);
    ParamStore store(B(), lm);
    int64_t total = 0, in_buffers = 0;
    for (const Tensor& f : store.buffers()) in_buffers += f.numel();
    std::vector<std::pair<const char*, const char*>> spans;
    for (size_t i = 0; i < store.params().size(); ++i) {
      const ParamRef& p = store.params()[i];
      CAPTURE(p.name);
      total += p.grad.numel();
      REQUIRE(p.grad.shape() == p.value.shape());
      REQUIRE(store.group(i) == (p.name.find(".moe.experts.") != std::string::npos ? GradGroup::Expert
                                                                                     : GradGroup::Replicated));
      const char* a = static_cast<const char*>(p.grad.data());
      spans.push_back({a, a + p.grad.nbytes()});
      int inside = 0;  // in exactly one buffer
      for (const Tensor& f : store.buffers()) {
        const char* fa = static_cast<const char*>(f.data());
        inside += a >= fa && a + p.grad.nbytes() <= fa + f.nbytes();
      }
      REQUIRE(inside == 1);
    }
    REQUIRE(total == in_buffers);
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i) REQUIRE(spans[i - 1].second <= spans[i].first);  // no overlap

    // The buckets partition the buffers, the last block first: block 2's gradients sit at the
    // start of the replicated buffer, the rest (embedding, final norm, head) at its end.
    int64_t bucketed = 0;
    for (GradGroup g : {GradGroup::Replicated, GradGroup::Expert})
      for (int blk = -1; blk < store.layers(); ++blk)
        for (const Tensor& t : store.bucket(g, blk)) bucketed += t.numel();
    REQUIRE(bucketed == in_buffers);
    REQUIRE(store.bucket(GradGroup::Expert, 0).empty());  // block 0 is dense
    REQUIRE(store.bucket(GradGroup::Expert, 1).size() == 1);
    const Tensor& rep = store.buffers()[0];
    REQUIRE(store.bucket(GradGroup::Replicated, 2)[0].data() == rep.data());
    const Tensor& rest = store.bucket(GradGroup::Replicated, -1)[0];
    REQUIRE(static_cast<const char*>(rest.data()) + rest.nbytes() ==
            static_cast<const char*>(rep.data()) + rep.nbytes());
    REQUIRE_THROWS_WITH(store.bucket(GradGroup::Replicated, 3), has_substr("no bucket for block 3"));
  }
}

TEST_CASE("param store: gradients, zeroing, scaling and norms equal the model's own tensors", "[param_store]") {
  const LMConfig cfg = store_lm(false);
  const Batch10 batch(7);
  TransformerLM plain(B(), cfg, DType::F64), stored(B(), cfg, DType::F64);
  plain.init(9);
  stored.init(9);
  ParamStore store(B(), stored);
  for (int rep = 0; rep < 2; ++rep) {  // twice: zeroing works, and backward accumulates in place
    plain.zero_grad();
    store.zero_grads();
    for (int m = 0; m < 2; ++m) {  // two micro-batches accumulate
      plain.forward(batch.tokens, batch.targets, 5, true, 3);
      plain.backward();
      stored.forward(batch.tokens, batch.targets, 5, true, 3);
      stored.backward();
    }
  }
  std::vector<ParamRef> a = plain.params();
  std::vector<ParamRef>& b = store.params();
  REQUIRE(a.size() == b.size());
  double sq_rep = 0, sq_exp = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    CAPTURE(a[i].name);
    REQUIRE(a[i].name == b[i].name);
    REQUIRE(host_values(a[i].grad) == host_values(b[i].grad));  // bit for bit
    (store.group(i) == GradGroup::Expert ? sq_exp : sq_rep) += B().sum_squares(a[i].grad);
  }
  REQUIRE(sq_exp > 0);
  REQUIRE(store.sum_squares(GradGroup::Expert) == Approx(sq_exp).epsilon(1e-14));
  REQUIRE(store.sum_squares(GradGroup::Replicated) == Approx(sq_rep).epsilon(1e-14));
  store.scale_grads(0.5);
  REQUIRE(store.sum_squares(GradGroup::Replicated) == Approx(0.25 * sq_rep).epsilon(1e-14));
  store.zero_grads();
  store.settle();  // no backward took up the experts' deferred zero: settle fills them
  for (const ParamRef& p : store.params()) REQUIRE(B().sum_squares(p.grad) == 0.0);
}

TEST_CASE("param store: the experts' gradients are zeroed by their next backward, not by a fill", "[param_store]") {
  const LMConfig cfg = store_lm(false);
  const Batch10 batch(5);
  TransformerLM plain(B(), cfg, DType::F64), stored(B(), cfg, DType::F64);
  plain.init(4);
  stored.init(4);
  ParamStore store(B(), stored);
  SwiGLUExperts& routed = stored.moe_layer(0).routed_experts();
  std::vector<size_t> expert_params;
  for (size_t i = 0; i < store.params().size(); ++i)
    if (store.group(i) == GradGroup::Expert) expert_params.push_back(i);
  REQUIRE(expert_params.size() == 2);  // experts.w1, experts.w2 of the one MoE block
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int micro : {1, 2}) {
    CAPTURE(micro);
    // Stale memory: every gradient NaN. zero_grads fills the replicated ones and defers the rest.
    for (const ParamRef& p : store.params()) B().fill(p.grad, nan);
    store.zero_grads();
    REQUIRE(routed.grad_zero_deferred());
    for (size_t i : expert_params) REQUIRE(std::isnan(B().sum_squares(store.params()[i].grad)));
    plain.zero_grad();
    for (int m = 0; m < micro; ++m) {  // the first backward writes, the second adds
      plain.forward(batch.tokens, batch.targets, 5, true, 3);
      plain.backward();
      stored.forward(batch.tokens, batch.targets, 5, true, 3);
      stored.backward();
      REQUIRE_FALSE(routed.grad_zero_deferred());
    }
    std::vector<ParamRef> a = plain.params();
    for (size_t i = 0; i < a.size(); ++i) {
      CAPTURE(a[i].name);
      REQUIRE(host_values(a[i].grad) == host_values(store.params()[i].grad));  // bit for bit
    }
  }
  // An expert that gets no rows still ends with a zero gradient: a router whose bias steers
  // every token to experts 0 and 1 (top-2 of 4) leaves experts 2 and 3 empty.
  Tensor& bias = stored.moe_layer(0).router().params().bias;
  B().copy(host_tensor({1e6, 1e6, 0.0, 0.0}, Shape{4}, DType::F32), bias);
  for (const ParamRef& p : store.params()) B().fill(p.grad, nan);
  store.zero_grads();
  stored.forward(batch.tokens, batch.targets, 5, true, 3);
  stored.backward();
  const std::vector<int64_t>& routed_counts = stored.moe_layer(0).last_routing().stats.routed;
  REQUIRE(routed_counts[2] == 0);
  REQUIRE(routed_counts[3] == 0);
  const int64_t D = cfg.d_model, F = cfg.moe.d_expert;
  const std::vector<double> dw1 = host_values(routed.dw1()), dw2 = host_values(routed.dw2());
  for (int64_t e = 0; e < 4; ++e) {
    double sq1 = 0, sq2 = 0;
    for (int64_t j = 0; j < D * 2 * F; ++j) sq1 += dw1[size_t(e * D * 2 * F + j)] * dw1[size_t(e * D * 2 * F + j)];
    for (int64_t j = 0; j < F * D; ++j) sq2 += dw2[size_t(e * F * D + j)] * dw2[size_t(e * F * D + j)];
    CAPTURE(e);
    if (e < 2) REQUIRE(sq1 > 0);
    else REQUIRE((sq1 == 0 && sq2 == 0));  // not NaN: written as zeros
  }
  // zero_grads without a backward: the store's readers settle the deferred zero first.
  for (const ParamRef& p : store.params()) B().fill(p.grad, nan);
  store.zero_grads();
  REQUIRE(store.sum_squares(GradGroup::Expert) == 0.0);
  REQUIRE_FALSE(routed.grad_zero_deferred());
  for (const ParamRef& p : store.params()) B().fill(p.grad, nan);
  store.zero_grads();
  store.scale_grads(2.0);
  for (const ParamRef& p : store.params()) REQUIRE(B().sum_squares(p.grad) == 0.0);
}

TEST_CASE("gradient reducer: each block's bucket starts when its backward completes, the rest last", "[param_store]") {
  TransformerLM lm(B(), store_lm(true), DType::F64);
  lm.init(3);
  ParamStore store(B(), lm);
  RecordingComm world, experts;
  GradientReducer reducer(store, &world, &experts);
  const Batch10 batch(1);
  lm.forward(batch.tokens, batch.targets, 5, true, 3);
  std::vector<int> done;
  std::vector<size_t> started_when_done;
  lm.backward([&](int blk) {
    done.push_back(blk);
    reducer.block_done(blk);
    started_when_done.push_back(world.started.size());
  });
  REQUIRE(done == std::vector<int>{2, 1, 0});
  // Each block's replicated bucket (one dtype here) is started in its hook, before the backward
  // of the blocks below it runs.
  REQUIRE(started_when_done == std::vector<size_t>{1, 2, 3});
  REQUIRE(experts.started == std::vector<int64_t>{store.bucket(GradGroup::Expert, 1)[0].numel()});
  REQUIRE(world.waits == 0);
  reducer.finish(B());
  REQUIRE(world.waits == 1);
  REQUIRE(experts.waits == 1);
  std::vector<int64_t> want;
  for (int blk : {2, 1, 0, -1}) want.push_back(store.bucket(GradGroup::Replicated, blk)[0].numel());
  REQUIRE(world.started == want);

  // A backward without the hook: finish() starts every bucket, in the same order.
  world.started.clear();
  lm.forward(batch.tokens, batch.targets, 5, true, 3);
  lm.backward();
  reducer.finish(B());
  REQUIRE(world.started == want);
  lm.forward(batch.tokens, batch.targets, 5, true, 3);
  lm.backward([&](int blk) {
    if (blk == 1) reducer.block_done(blk);  // a partial report: 2 and 0 follow in finish()
  });
  world.started.clear();
  reducer.finish(B());
  REQUIRE(world.started == std::vector<int64_t>{want[0], want[2], want[3]});
  reducer.block_done(0);
  REQUIRE_THROWS_WITH(reducer.block_done(0), has_substr("block 0 reported done twice"));
}

TEST_CASE("fill_normal: the element-wise draws, across chunk and thread boundaries, in every dtype", "[init]") {
  // 2^23 + 1001 elements: two chunks, each split over the host's threads.
  const int64_t n = (int64_t(1) << 23) + 1001;
  const uint64_t stream = 77, first = 12345;
  for (DType dt : {DType::F32, DType::BF16, DType::F64}) {
    CAPTURE(to_string(dt));
    const int64_t m = dt == DType::F32 ? n : 70001;  // the big case once (time)
    Tensor t = B().empty(Shape{m}, dt);
    B().fill_normal(t, 0.02, stream, first);
    std::vector<double> want(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) want[size_t(i)] = 0.02 * rng::normal(stream, first + uint64_t(i));
    const Tensor ref = host_tensor(want, Shape{m}, dt);
    REQUIRE(std::memcmp(ref.data(), t.data(), size_t(t.nbytes())) == 0);
  }
  REQUIRE_THROWS_WITH(B().fill_normal(B().empty(Shape{4}, DType::I32), 1.0, 1, 0), has_substr("not a floating tensor"));
}
