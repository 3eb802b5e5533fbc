// moelab tests: router cases small enough to compute by hand, and routing invariants.
// The router weight is the identity (d_model = E), so the input rows are the logits.
#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

#include "core/moe/router.h"
#include "test_util.h"

using namespace moelab;
using namespace moelab::test;

namespace {

MoEConfig small_config(int64_t E, int64_t K) {
  MoEConfig c;
  c.d_model = E;
  c.experts = E;
  c.top_k = K;
  c.d_expert = 4;
  return c;
}

// A router whose logits equal its input (W_r = I).
struct IdentityRouter {
  Router router;
  explicit IdentityRouter(const MoEConfig& cfg) : router(cpu(), cfg, DType::F64) {
    const int64_t E = cfg.experts;
    std::vector<double> eye(size_t(E * E), 0.0);
    for (int64_t e = 0; e < E; ++e) eye[e * E + e] = 1.0;
    cpu().copy(host_tensor(eye, Shape{E, E}, DType::F64), router.params().w_router);
  }
  RouterState route(const std::vector<double>& logits, int64_t T, bool training = false,
                    uint64_t seed = 1) {
    const int64_t E = router.params().w_router.dim(0);
    return router.forward(host_tensor(logits, Shape{T, E}, DType::F64), training, 0, seed);
  }
};

std::vector<int> ivec(const Tensor& t) {
  auto v = host_values(t);
  return std::vector<int>(v.begin(), v.end());
}

std::vector<double> softmax(std::vector<double> l) {
  double m = *std::max_element(l.begin(), l.end()), s = 0;
  for (double& v : l) s += (v = std::exp(v - m));
  for (double& v : l) v /= s;
  return l;
}

}  // namespace

TEST_CASE("router: softmax top-2 picks the two largest and renormalises (Mixtral)", "[router]") {
  IdentityRouter r(small_config(4, 2));
  RouterState st = r.route({1.0, 3.0, 0.5, 2.0,   // token 0: experts 1, 3
                            0.0, -1.0, 2.0, 1.5},  // token 1: experts 2, 3
                           2);
  REQUIRE(ivec(st.idx) == std::vector<int>{1, 3, 2, 3});
  auto g = host_values(st.gates);
  // Renormalised top-2 of softmax = softmax over the two chosen logits.
  REQUIRE(g[0] == Approx(1.0 / (1.0 + std::exp(-1.0))).epsilon(1e-12));
  REQUIRE(g[1] == Approx(1.0 / (1.0 + std::exp(1.0))).epsilon(1e-12));
  REQUIRE(g[2] + g[3] == Approx(1.0).epsilon(1e-12));
  REQUIRE(g[2] == Approx(1.0 / (1.0 + std::exp(-0.5))).epsilon(1e-12));
  REQUIRE(ivec(st.keep) == std::vector<int>{1, 1, 1, 1});
}

TEST_CASE("router: top-1 without renormalisation keeps p_top1 (Switch)", "[router]") {
  MoEConfig cfg = small_config(3, 1);
  cfg.router.normalize = false;
  IdentityRouter r(cfg);
  RouterState st = r.route({0.2, 1.2, -0.3}, 1);
  auto p = softmax({0.2, 1.2, -0.3});
  REQUIRE(ivec(st.idx) == std::vector<int>{1});
  REQUIRE(host_values(st.gates)[0] == Approx(p[1]).epsilon(1e-12));
}

TEST_CASE("router: sigmoid scores, bias changes selection but never the gates (DeepSeek-V3)", "[router]") {
  MoEConfig cfg = small_config(4, 2);
  cfg.router.score = ScoreFunc::Sigmoid;
  cfg.router.bias_update_rate = 0.1;
  IdentityRouter r(cfg);
  const std::vector<double> l{2.0, 1.0, 0.0, -1.0};
  RouterState st = r.route(l, 1);
  REQUIRE(ivec(st.idx) == std::vector<int>{0, 1});
  // A bias of +3 on expert 3 moves it into the top 2; its gate is still its own sigmoid score.
  cpu().copy(host_tensor({0, 0, 0, 3.0}, Shape{4}, DType::F32), r.router.params().bias);
  st = r.route(l, 1);
  REQUIRE(ivec(st.idx) == std::vector<int>{3, 0});
  auto sig = [](double x) { return 1 / (1 + std::exp(-x)); };
  auto g = host_values(st.gates);
  REQUIRE(g[0] == Approx(sig(-1.0) / (sig(-1.0) + sig(2.0))).epsilon(1e-12));
  REQUIRE(g[1] == Approx(sig(2.0) / (sig(-1.0) + sig(2.0))).epsilon(1e-12));
}

TEST_CASE("router: capacity with drop policy 'position' serves tokens in order", "[router][capacity]") {
  MoEConfig cfg = small_config(2, 1);
  cfg.router.capacity_factor = 2.0 / 3.0;  // C = ceil(2/3 * 6 * 1 / 2) = 2
  IdentityRouter r(cfg);
  // Tokens 0,1,3,4 prefer expert 0; tokens 2,5 prefer expert 1.
  RouterState st = r.route({1, 0, 2, 0, 0, 1, 3, 0, 0.5, 0, 0, 4}, 6);
  REQUIRE(st.capacity == 2);
  REQUIRE(ivec(st.idx) == std::vector<int>{0, 0, 1, 0, 0, 1});
  REQUIRE(ivec(st.keep) == std::vector<int>{1, 1, 1, 0, 0, 1});  // tokens 3, 4 arrive too late
  REQUIRE(st.stats.routed == std::vector<int64_t>{4, 2});
  REQUIRE(st.stats.kept == std::vector<int64_t>{2, 2});
  REQUIRE(st.stats.tokens_unrouted == 2);
}

TEST_CASE("router: capacity with drop policy 'probs' keeps the most confident", "[router][capacity]") {
  MoEConfig cfg = small_config(2, 1);
  cfg.router.capacity_factor = 2.0 / 3.0;
  cfg.router.normalize = false;  // top-1 gates = p_top1, so 'probs' has something to rank
  cfg.router.drop_policy = DropPolicy::Probs;
  IdentityRouter r(cfg);
  RouterState st = r.route({1, 0, 2, 0, 0, 1, 3, 0, 0.5, 0, 0, 4}, 6);
  // Expert 0's candidates by margin: token 3 (3), token 0 (1), token 4 (0.5), token 1 (0.5)...
  // token 1 has logits (2, 0): margin 2. Order: 3 (3), 1 (2), 0 (1), 4 (0.5): keep 3 and 1.
  REQUIRE(ivec(st.keep) == std::vector<int>{0, 1, 1, 1, 0, 1});
}

TEST_CASE("router: dropless keeps every assignment, kept + dropped = routed = T*K", "[router][capacity]") {
  MoEConfig cfg = small_config(5, 2);
  for (double cf : {0.0, 0.5, 1.0, 1.25}) {
    cfg.router.capacity_factor = cf;
    IdentityRouter r(cfg);
    Tensor x = randn(Shape{40, 5}, 31, 2.0);
    RouterState st = r.router.forward(x, false, 0, 1);
    const int64_t routed = std::accumulate(st.stats.routed.begin(), st.stats.routed.end(), int64_t(0));
    const int64_t kept = std::accumulate(st.stats.kept.begin(), st.stats.kept.end(), int64_t(0));
    auto keep = ivec(st.keep);
    const int64_t kept_mask = std::accumulate(keep.begin(), keep.end(), int64_t(0));
    REQUIRE(routed == 40 * 2);
    REQUIRE(kept == kept_mask);
    REQUIRE(kept <= routed);
    if (cf == 0) REQUIRE(kept == routed);
    for (int64_t e = 0; e < 5; ++e) {
      REQUIRE(st.stats.kept[e] <= st.stats.routed[e]);
      if (cf > 0) REQUIRE(st.stats.kept[e] <= st.capacity);
    }
    // Gate weights of a token sum to 1 with renormalisation.
    auto g = host_values(st.gates);
    for (int t = 0; t < 40; ++t) REQUIRE(g[2 * t] + g[2 * t + 1] == Approx(1.0).epsilon(1e-12));
  }
}

TEST_CASE("router: force_balance assigns round-robin, kept counts per expert differ by at most 1", "[router][force_balance]") {
  // Every token prefers expert 0 (+3 on its logit): real routing piles onto it, forced balance
  // gives token t the experts (t K + j) mod E, distinct per token, with the gates of those
  // experts; the losses and statistics are still computed (routed counts are the forced ones).
  for (auto [E, K, T] : std::vector<std::array<int64_t, 3>>{{8, 2, 37}, {5, 3, 40}, {6, 1, 13}, {4, 4, 9}}) {
    for (double cf : {0.0, 1.0, 1.25}) {
      INFO("E = " << E << ", K = " << K << ", T = " << T << ", capacity factor " << cf);
      MoEConfig cfg = small_config(E, K);
      cfg.router.capacity_factor = cf;
      cfg.router.aux_alpha = 0.01;
      Tensor x = randn(Shape{T, E}, 7, 1.0);
      for (int64_t t = 0; t < T; ++t) x.ptr<double>()[t * E] += 3.0;
      IdentityRouter real(cfg);
      RouterState st_real = real.router.forward(x, true, 0, 1);
      cfg.router.force_balance = true;
      IdentityRouter forced(cfg);
      RouterState st = forced.router.forward(x, true, 0, 1);
      const auto idx = ivec(st.idx);
      for (int64_t t = 0; t < T; ++t) {
        std::vector<int> row(idx.begin() + t * K, idx.begin() + (t + 1) * K);
        for (int64_t j = 0; j < K; ++j) REQUIRE(row[size_t(j)] == int((t * K + j) % E));
        std::sort(row.begin(), row.end());
        REQUIRE(std::adjacent_find(row.begin(), row.end()) == row.end());  // distinct experts
      }
      const auto [kmin, kmax] = std::minmax_element(st.stats.kept.begin(), st.stats.kept.end());
      REQUIRE(*kmax - *kmin <= 1);
      const auto [rmin, rmax] = std::minmax_element(st.stats.routed.begin(), st.stats.routed.end());
      REQUIRE(*rmax - *rmin <= 1);
      // Capacity C = ceil(cf T K / E) >= ceil(T K / E): nothing is dropped at cf >= 1.
      REQUIRE(std::accumulate(st.stats.kept.begin(), st.stats.kept.end(), int64_t(0)) == T * K);
      // The real routing of the same logits is unbalanced (the test means something).
      if (K < E) REQUIRE(st_real.stats.routed[0] >= 3 * T / 4);
      // Gates: the (renormalised) softmax scores of the assigned experts.
      const auto g = host_values(st.gates);
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> l(x.ptr<double>() + t * E, x.ptr<double>() + (t + 1) * E);
        const std::vector<double> p = softmax(l);
        double z = 0;
        for (int64_t j = 0; j < K; ++j) z += p[size_t(idx[size_t(t * K + j)])];
        for (int64_t j = 0; j < K; ++j)
          REQUIRE(g[size_t(t * K + j)] == Approx(p[size_t(idx[size_t(t * K + j)])] / z).epsilon(1e-12));
      }
      // The losses are those of the forced assignment (balanced counts: aux = sum_i P_i = 1
      // up to the +-1 of the round-robin), and the z-loss is the real router's.
      REQUIRE(st.losses.aux == Approx(1.0).epsilon(double(E) / double(T * K)));
      REQUIRE(st.losses.z == st_real.losses.z);
    }
  }
  // A rank's share of the batch continues the round of the lower ranks (the offset): on the
  // backend op, tokens 5.. with offset 5 equal the tail of one call over all tokens.
  Tensor all = cpu().empty(Shape{12, 3}, DType::I32), tail = cpu().empty(Shape{7, 3}, DType::I32);
  cpu().balanced_assign(all, 7);
  cpu().balanced_assign(tail, 7, 5);
  const auto a = ivec(all), b = ivec(tail);
  REQUIRE(std::vector<int>(a.begin() + 15, a.end()) == b);
  CHECK_THROWS_WITH(cpu().balanced_assign(all, 2), has_substr("3 experts per token cannot be distinct among 2"));
}

TEST_CASE("router: expert choice - each expert takes its top-C tokens", "[router]") {
  MoEConfig cfg = small_config(2, 1);
  cfg.router.policy = RoutingPolicy::ExpertChoice;
  cfg.router.capacity_factor = 1.0;  // C = ceil(1 * 4 / 2) = 2
  IdentityRouter r(cfg);
  // softmax column of expert 0 is monotone in (l0 - l1): tokens' margins 2, -1, 0.5, 3.
  RouterState st = r.route({2, 0, 0, 1, 0.5, 0, 3, 0}, 4);
  REQUIRE(st.capacity == 2);
  REQUIRE(ivec(st.idx) == std::vector<int>{3, 0, 1, 2});  // expert 0: tokens 3, 0; expert 1: 1, 2
  auto g = host_values(st.gates);
  REQUIRE(g[0] == Approx(softmax({3, 0})[0]).epsilon(1e-12));  // S[3, 0], not renormalised
  REQUIRE(g[2] == Approx(softmax({0, 1})[1]).epsilon(1e-12));  // S[1, 1]
  REQUIRE(st.stats.kept == std::vector<int64_t>{2, 2});
  REQUIRE(st.stats.tokens_unrouted == 0);
}

TEST_CASE("router: Sinkhorn balances the marginals and the selection", "[router]") {
  Tensor l = randn(Shape{64, 4}, 41, 1.0);
  for (int t = 0; t < 64; ++t) l.ptr<double>()[t * 4] += 2.0;  // every token prefers expert 0
  Tensor out = cpu().empty(l.shape(), DType::F64);
  // Megatron's stopping rule: mean |delta d1| < tol, on d1 of order 1 here. (The eps in the
  // denominators breaks the d0/d1 scale symmetry, so d1 keeps drifting at ~5e-8 per iteration:
  // tolerances far below 1e-7 are never met. The marginals converge all the same.)
  const int iters = cpu().sinkhorn(l, 1e-6, 5000, out);
  INFO("sinkhorn iterations: " << iters);
  REQUIRE(iters < 5000);
  auto v = host_values(out);
  for (int t = 0; t < 64; ++t) {
    double row = 0;
    for (int e = 0; e < 4; ++e) row += v[t * 4 + e];
    REQUIRE(row == Approx(1.0 / 64).epsilon(1e-4));
  }
  for (int e = 0; e < 4; ++e) {
    double col = 0;
    for (int t = 0; t < 64; ++t) col += v[t * 4 + e];
    REQUIRE(col == Approx(1.0 / 4).epsilon(1e-4));
  }
  // Through the router: plain top-1 sends (almost) everything to expert 0, Sinkhorn does not.
  MoEConfig cfg = small_config(4, 1);
  cfg.router.policy = RoutingPolicy::Sinkhorn;
  cfg.router.sinkhorn_tol = 1e-6;
  cfg.router.sinkhorn_max_iters = 5000;
  IdentityRouter r(cfg);
  RouterState eval = r.router.forward(l, false, 0, 1), train = r.router.forward(l, true, 0, 1);
  const int64_t max_eval = *std::max_element(eval.stats.routed.begin(), eval.stats.routed.end());
  const int64_t max_train = *std::max_element(train.stats.routed.begin(), train.stats.routed.end());
  REQUIRE(max_eval >= 40);  // 3 of 4 tokens on one expert
  REQUIRE(max_train <= 24);  // balanced would be 16
  REQUIRE(train.score == ScoreFunc::Sigmoid);  // K = 1: gates from sigmoid of the raw logits
}

TEST_CASE("router: random top-2 keeps the second expert with probability min(1, g2/tau)", "[router][statistical]") {
  MoEConfig cfg = small_config(3, 2);
  cfg.router.policy = RoutingPolicy::RandomTop2;
  cfg.router.random_top2_threshold = 0.5;
  IdentityRouter r(cfg);
  // Every token: logits (log 3, 0, -inf-ish): normalised g2 = 1/4, keep rate 0.5.
  const int64_t T = 20000;
  std::vector<double> l;
  for (int64_t t = 0; t < T; ++t) l.insert(l.end(), {std::log(3.0), 0.0, -30.0});
  RouterState st = r.route(l, T, true, 7);
  auto keep = ivec(st.keep);
  double second = 0;
  for (int64_t t = 0; t < T; ++t) {
    REQUIRE(keep[2 * t] == 1);
    second += keep[2 * t + 1];
  }
  // Binomial(20000, 0.5): sd = 0.0035 in rate; 5 sigma = 0.018.
  REQUIRE(second / T == Approx(0.5).margin(0.018));
  // In evaluation there are no random drops.
  RouterState ev = r.route(l, T, false, 7);
  auto kev = ivec(ev.keep);
  REQUIRE(std::accumulate(kev.begin(), kev.end(), 0) == 2 * T);
}

TEST_CASE("router: aux loss and z-loss values by hand", "[router][loss]") {
  MoEConfig cfg = small_config(2, 1);
  cfg.router.normalize = false;
  IdentityRouter r(cfg);
  // Perfect balance with uniform probabilities: L_aux / alpha = E * sum (1/E)(1/E) = 1.
  RouterState st = r.route({0, 0, 0, 0}, 2);
  REQUIRE(st.losses.aux == Approx(1.0).epsilon(1e-12));
  REQUIRE(st.losses.z == Approx(std::log(2.0) * std::log(2.0)).epsilon(1e-12));
  // Two tokens both to expert 0 with p0 = sigma(1), sigma(2): f = (1, 0),
  // L = 2 * 1 * mean(p0) = sigma(1) + sigma(2).
  st = r.route({1, 0, 2, 0}, 2);
  auto sig = [](double x) { return 1 / (1 + std::exp(-x)); };
  REQUIRE(st.losses.aux == Approx(sig(1.0) + sig(2.0)).epsilon(1e-12));
  const double lse1 = std::log(std::exp(1.0) + 1), lse2 = std::log(std::exp(2.0) + 1);
  REQUIRE(st.losses.z == Approx((lse1 * lse1 + lse2 * lse2) / 2).epsilon(1e-12));
  // Megatron convention: f is divided by K. With K = 2 of 2 experts every token routes to both,
  // f = (1/2, 1/2) and L = 2 * (P0 + P1) / 2 = 1 whatever the probabilities.
  IdentityRouter r2(small_config(2, 2));
  REQUIRE(r2.route({1, 0, 2, 0}, 2).losses.aux == Approx(1.0).epsilon(1e-12));
}

TEST_CASE("router: aux-loss-free bias moves against the load", "[router]") {
  MoEConfig cfg = small_config(4, 1);
  cfg.router.bias_update_rate = 0.01;
  IdentityRouter r(cfg);
  RouterStats stats;
  stats.routed = {5, 1, 3, 3};  // mean 3
  r.router.update_bias(stats);
  auto b = host_values(r.router.params().bias);
  REQUIRE(b[0] == Approx(-0.01f));  // overloaded: down
  REQUIRE(b[1] == Approx(0.01f));   // underloaded: up
  REQUIRE(b[2] == 0.0);
  REQUIRE(b[3] == 0.0);
}

TEST_CASE("router: statistics by hand", "[router][stats]") {
  IdentityRouter r(small_config(2, 1));
  RouterState st = r.route({0, 0, 3, -1}, 2);
  const double p = 1 / (1 + std::exp(-4.0));
  REQUIRE(st.stats.mean_prob[0] == Approx((0.5 + p) / 2).epsilon(1e-12));
  REQUIRE(st.stats.entropy == Approx((std::log(2.0) - p * std::log(p) - (1 - p) * std::log(1 - p)) / 2).epsilon(1e-12));
  REQUIRE(st.stats.top1_prob == Approx((0.5 + p) / 2).epsilon(1e-12));
  REQUIRE(st.stats.logit_rms == Approx(std::sqrt(10.0 / 4)).epsilon(1e-12));
  REQUIRE(st.stats.logit_max == 3.0);
}

TEST_CASE("dispatch: un-permute of permute is the identity, padding rows are zero", "[dispatch]") {
  Backend& b = cpu();
  Tensor idx = ints({2, 0, 1, 2, 0}, Shape{5, 1}), keep = ints({1, 1, 1, 1, 1}, Shape{5, 1});
  DispatchPlan plan = b.dispatch_plan(idx, keep, false, 3, 3);  // pad every expert to 3 rows
  REQUIRE(plan.offsets == std::vector<int64_t>{0, 3, 6, 9});
  REQUIRE(ivec(plan.row_token) == std::vector<int>{1, 4, -1, 2, -1, -1, 0, 3, -1});
  Tensor x = randn(Shape{5, 3}, 51), xp = b.empty(Shape{9, 3}, DType::F64);
  b.permute_forward(x, plan, xp);
  for (int d = 0; d < 3; ++d) REQUIRE(xp.ptr<double>()[2 * 3 + d] == 0.0);
  Tensor ones = full(Shape{5}, 1.0), y = b.empty(Shape{5, 3}, DType::F64);
  b.unpermute_forward(xp, plan, ones, y);
  REQUIRE(host_values(y) == host_values(x));
  // Padding capacity smaller than a kept count is a clear error.
  REQUIRE_THROWS_WITH(b.dispatch_plan(idx, keep, false, 3, 1), has_substr("more than pad capacity"));
}

// Router::forward in two halves (the MoE layer runs the dispatch plan between them): the same
// statistics and losses as forward, none before forward_end, and backward refuses a state whose
// forward was not ended.
TEST_CASE("router: forward_begin and forward_end give forward's statistics and losses", "[router]") {
  MoEConfig cfg = small_config(4, 2);
  cfg.router.aux_alpha = 0.01;
  cfg.router.z_loss = 0.001;
  IdentityRouter r(cfg);
  const std::vector<double> logits = {1.0, 3.0, 0.5, 2.0, 0.0, -1.0, 2.0, 1.5, 0.3, 0.2, 0.1, -0.4};
  const Tensor x = host_tensor(logits, Shape{3, 4}, DType::F64);
  const RouterState whole = r.router.forward(x, true, 0, 7);
  RouterState st = r.router.forward_begin(x, true, 0, 7);
  CHECK(st.summary.valid());
  CHECK(st.stats.routed.empty());
  Tensor dg = cpu().zeros(st.gates.shape(), DType::F64), dx = cpu().zeros(x.shape(), DType::F64);
  CHECK_THROWS_WITH(r.router.backward(st, x, dg, 0, dx), has_substr("forward_end"));
  r.router.forward_end(st);
  CHECK_FALSE(st.summary.valid());
  CHECK(st.stats.routed == whole.stats.routed);
  CHECK(st.stats.kept == whole.stats.kept);
  CHECK(st.stats.mean_prob == whole.stats.mean_prob);
  CHECK(st.stats.entropy == whole.stats.entropy);
  CHECK(st.losses.aux == whole.losses.aux);
  CHECK(st.losses.z == whole.losses.z);
  CHECK(st.losses.weighted == whole.losses.weighted);
  CHECK(st.losses.aux > 0.0);
  r.router.forward_end(st);  // a second call changes nothing
  CHECK(st.stats.routed == whole.stats.routed);
  CHECK_NOTHROW(r.router.backward(st, x, dg, 0, dx));
}
