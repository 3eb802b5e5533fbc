// moelab tests: the whole MoE layer. Finite-difference gradient checks of the input and every
// parameter under each routing policy, noise type, capacity setting and loss; f32 against f64;
// bad input.
#include <numeric>

#include "core/moe/moe_layer.h"
#include "test_util.h"

using namespace moelab;
using namespace moelab::test;

namespace {

MoEConfig base_config() {
  MoEConfig c;
  c.d_model = 6;
  c.experts = 4;
  c.top_k = 2;
  c.d_expert = 5;
  return c;
}

// The objective L = <y, R> + weighted router losses; backward(R) must give dL/d(everything).
// Routing must not change under the +-h perturbations: inputs are random (no exact ties), and
// the test first checks that the routing decisions are identical at every perturbed point it
// visits, so a failure means a wrong gradient, not a flipped route.
void check_layer_gradients(const std::string& name, MoEConfig cfg, uint64_t seed,
                           bool training = true, int64_t tokens = 12, int64_t seq_len = 0,
                           const std::function<void(MoELayer&)>& setup = {}) {
  INFO("config: " << name);
  MoELayer layer(cpu(), cfg, DType::F64);
  layer.init(seed, 1.0);
  if (setup) setup(layer);
  Tensor x = randn(Shape{tokens, cfg.d_model}, seed + 1);
  MoEForwardArgs args{training, seq_len, seed + 2};
  MoEOutput out = layer.forward(x, args);
  Tensor r = randn(out.y.shape(), seed + 3);
  const auto idx0 = host_values(layer.last_routing().idx), keep0 = host_values(layer.last_routing().keep);

  layer.zero_grad();
  Tensor dx = cpu().empty(x.shape(), DType::F64);
  layer.backward(r, dx);

  int route_changes = 0;
  auto objective = [&] {
    MoEOutput o = layer.forward(x, args);
    if (host_values(layer.last_routing().idx) != idx0 || host_values(layer.last_routing().keep) != keep0)
      ++route_changes;
    return dot(o.y, r) + o.losses.weighted;
  };
  check_gradient(name + " dx", objective, x, dx);
  for (ParamRef& p : layer.params()) check_gradient(name + " d" + p.name, objective, p.value, p.grad);
  INFO("perturbations that changed the routing: " << route_changes);
  CHECK(route_changes == 0);
}

}  // namespace

TEST_CASE("moe grad: softmax top-2, dropless, aux + z loss", "[moe][grad]") {
  MoEConfig c = base_config();
  c.router.aux_alpha = 0.3;
  c.router.z_loss = 0.05;
  check_layer_gradients("topk2 dropless", c, 100);
}

TEST_CASE("moe grad: Switch top-1 (no renormalisation) with capacity, policy position", "[moe][grad][capacity]") {
  MoEConfig c = base_config();
  c.top_k = 1;
  c.router.normalize = false;
  c.router.capacity_factor = 1.0;
  c.router.aux_alpha = 0.1;
  check_layer_gradients("top1 capacity position", c, 200, true, 16);
}

TEST_CASE("moe grad: capacity, policy probs, padded to capacity", "[moe][grad][capacity]") {
  MoEConfig c = base_config();
  c.router.capacity_factor = 0.75;
  c.router.drop_policy = DropPolicy::Probs;
  c.router.pad_to_capacity = true;
  check_layer_gradients("top2 capacity probs padded", c, 300);
}

TEST_CASE("moe grad: sigmoid scores with bias selection and sequence-level aux loss", "[moe][grad]") {
  MoEConfig c = base_config();
  c.router.score = ScoreFunc::Sigmoid;
  c.router.bias_update_rate = 1e-3;
  c.router.aux_alpha = 0.2;
  c.router.aux_loss_type = AuxLossType::Sequence;
  c.router.score_scale = 2.0;
  check_layer_gradients("sigmoid bias seq-aux", c, 400, true, 12, 4, [](MoELayer& l) {
    cpu().copy(host_tensor({0.3, -0.2, 0.1, 0.0}, Shape{4}, DType::F32), l.router().params().bias);
  });
}

TEST_CASE("moe grad: GShard random top-2", "[moe][grad]") {
  MoEConfig c = base_config();
  c.router.policy = RoutingPolicy::RandomTop2;
  c.router.capacity_factor = 1.25;
  check_layer_gradients("random top2", c, 500);
}

TEST_CASE("moe grad: Sinkhorn selection (k = 2 softmax gates, k = 1 sigmoid gates)", "[moe][grad]") {
  MoEConfig c = base_config();
  c.router.policy = RoutingPolicy::Sinkhorn;
  c.router.sinkhorn_tol = 1e-6;
  c.router.sinkhorn_max_iters = 500;
  check_layer_gradients("sinkhorn k2", c, 600);
  c.top_k = 1;
  check_layer_gradients("sinkhorn k1", c, 650);
}

TEST_CASE("moe grad: expert choice", "[moe][grad]") {
  MoEConfig c = base_config();
  c.router.policy = RoutingPolicy::ExpertChoice;
  c.router.z_loss = 0.01;
  check_layer_gradients("expert choice", c, 700);
}

TEST_CASE("moe grad: learned noisy top-k with importance and load losses (Shazeer)", "[moe][grad][noise]") {
  MoEConfig c = base_config();
  c.router.noise = NoiseType::Learned;
  c.router.importance_weight = 0.5;
  c.router.load_weight = 0.5;
  check_layer_gradients("learned noise", c, 800);
  // In evaluation the noise is off: same input, same output on every call.
  MoELayer layer(cpu(), c, DType::F64);
  layer.init(1, 1.0);
  Tensor x = randn(Shape{8, 6}, 2);
  auto y1 = host_values(layer.forward(x, {false, 0, 1}).y), y2 = host_values(layer.forward(x, {false, 0, 2}).y);
  REQUIRE(y1 == y2);
}

TEST_CASE("moe grad: Gaussian logit noise with smooth load loss, input jitter", "[moe][grad][noise]") {
  MoEConfig c = base_config();
  c.router.noise = NoiseType::Gaussian;
  c.router.noise_eps = 0.5;
  c.router.load_weight = 0.3;
  check_layer_gradients("gaussian noise", c, 900);
  c.router.noise = NoiseType::Jitter;
  c.router.noise_eps = 0.05;
  c.router.load_weight = 0.0;
  check_layer_gradients("jitter", c, 950);
}

TEST_CASE("moe grad: shared experts with a sigmoid gate, expert dropout", "[moe][grad]") {
  MoEConfig c = base_config();
  c.shared_experts = 2;
  c.shared_gate = true;
  c.expert_dropout = 0.25;
  check_layer_gradients("shared + dropout", c, 1000);
  c.shared_gate = false;
  check_layer_gradients("shared, no gate", c, 1050, false);
}

TEST_CASE("moe grad: fine-grained experts are just config (16 narrow experts, top-4)", "[moe][grad]") {
  MoEConfig c = base_config();
  c.experts = 16;
  c.top_k = 4;
  c.d_expert = 2;
  c.router.aux_alpha = 0.1;
  check_layer_gradients("fine-grained", c, 1100, true, 8);
}

TEST_CASE("moe: a dropped assignment contributes zero", "[moe][capacity]") {
  MoEConfig c = base_config();
  c.top_k = 1;
  c.router.capacity_factor = 0.25;  // C = ceil(0.25 * 16 / 4) = 1: most tokens dropped
  MoELayer layer(cpu(), c, DType::F64);
  layer.init(3, 1.0);
  Tensor x = randn(Shape{16, 6}, 4);
  MoEOutput out = layer.forward(x, {false, 0, 1});
  auto keep = host_values(layer.last_routing().keep);
  auto y = host_values(out.y);
  int dropped = 0;
  for (int t = 0; t < 16; ++t) {
    if (keep[t]) continue;
    ++dropped;
    for (int d = 0; d < 6; ++d) REQUIRE(y[t * 6 + d] == 0.0);
  }
  REQUIRE(dropped >= 12);
  const int64_t kept = std::accumulate(out.stats.kept.begin(), out.stats.kept.end(), int64_t(0));
  REQUIRE(kept + dropped == 16);
}

TEST_CASE("moe: f32 agrees with f64 on the same inputs", "[moe][precision]") {
  // Tolerance: f32 has a 6e-8 unit roundoff; a forward pass of depth ~10 ops with sums over
  // D = 32 and F = 64 terms accumulates ~1e-6 relative error. We allow 1e-4 relative to the
  // output's RMS, and require identical routing (inputs are far from ties at this size).
  MoEConfig c = base_config();
  c.d_model = 32;
  c.experts = 8;
  c.d_expert = 64;
  c.shared_experts = 1;
  c.router.aux_alpha = 0.01;
  c.router.z_loss = 0.001;
  MoELayer l64(cpu(), c, DType::F64), l32(cpu(), c, DType::F32);
  l64.init(5, 1.0);
  l32.init(5, 1.0);
  Tensor x64 = randn(Shape{64, 32}, 6), x32 = randn(Shape{64, 32}, 6, 1.0, DType::F32);
  MoEOutput o64 = l64.forward(x64, {true, 0, 9}), o32 = l32.forward(x32, {true, 0, 9});
  REQUIRE(host_values(l64.last_routing().idx) == host_values(l32.last_routing().idx));
  auto y64 = host_values(o64.y), y32 = host_values(o32.y);
  double rms = 0, err = 0;
  for (size_t i = 0; i < y64.size(); ++i) {
    rms += y64[i] * y64[i];
    err = std::max(err, std::abs(y64[i] - y32[i]));
  }
  rms = std::sqrt(rms / double(y64.size()));
  REQUIRE(err < 1e-4 * rms);
  REQUIRE(o32.losses.aux == Approx(o64.losses.aux).epsilon(1e-5));
  REQUIRE(o32.losses.z == Approx(o64.losses.z).epsilon(1e-5));
  // Gradients too.
  Tensor r64 = randn(Shape{64, 32}, 7), r32 = randn(Shape{64, 32}, 7, 1.0, DType::F32);
  Tensor dx64 = cpu().empty(x64.shape(), DType::F64), dx32 = cpu().empty(x32.shape(), DType::F32);
  l64.zero_grad();
  l32.zero_grad();
  l64.backward(r64, dx64);
  l32.backward(r32, dx32);
  auto p64 = l64.params(), p32 = l32.params();
  for (size_t i = 0; i < p64.size(); ++i) {
    auto g64 = host_values(p64[i].grad), g32 = host_values(p32[i].grad);
    double grms = 0, gerr = 0;
    for (size_t j = 0; j < g64.size(); ++j) {
      grms += g64[j] * g64[j];
      gerr = std::max(gerr, std::abs(g64[j] - g32[j]));
    }
    grms = std::sqrt(grms / double(g64.size()));
    INFO(p64[i].name << ": max err " << gerr << " rms " << grms);
    CHECK(gerr < 1e-4 * grms + 1e-12);
  }
}

TEST_CASE("moe: bad input gives clear errors", "[moe][errors]") {
  MoEConfig c = base_config();
  c.top_k = 5;  // > experts
  REQUIRE_THROWS_WITH(MoELayer(cpu(), c, DType::F64), has_substr("model.top_k"));
  c = base_config();
  c.router.capacity_factor = -1;
  REQUIRE_THROWS_WITH(MoELayer(cpu(), c, DType::F64), has_substr("router.capacity_factor"));
  c = base_config();
  MoELayer layer(cpu(), c, DType::F64);
  Tensor wrong = randn(Shape{4, 7}, 1);
  REQUIRE_THROWS_WITH(layer.forward(wrong, {}), has_substr("d_model = 6"));
  Tensor x = randn(Shape{4, 6}, 1);
  Tensor dx = cpu().empty(Shape{4, 6}, DType::F64);
  REQUIRE_THROWS_WITH(layer.backward(x, dx), has_substr("backward without a forward"));
}
