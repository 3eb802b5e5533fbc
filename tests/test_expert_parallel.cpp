// moelab tests: expert parallelism in the MoE layer on simulated ranks (CPU, f64). The global
// batch of T tokens is split into ep contiguous slices; rank r routes its slice, its experts
// are E/ep of the E, and tokens travel by the all-to-all dispatcher. Against the single-rank
// layer on all T tokens: the output rows, dx, the losses (the batch's, through the batch
// group), the router gradient summed over ranks and each rank's slice of the expert gradients
// agree to 1e-12 of their RMS, for ep = 2, 4, 8.
#include <cmath>
#include <map>
#include <mutex>

#include "backends/registry.h"
#include "core/comm.h"
#include "core/comm_sim.h"
#include "core/moe/moe_layer.h"
#include "test_util.h"

using namespace moelab;
using namespace moelab::test;

namespace {

constexpr int64_t kTokens = 48, kSeq = 12;

MoEConfig ep_config() {
  MoEConfig c;
  c.d_model = 16;
  c.experts = 8;
  c.top_k = 2;
  c.d_expert = 12;
  c.router.aux_alpha = 0.01;
  c.router.z_loss = 0.001;
  return c;
}

std::vector<double> rows(const std::vector<double>& v, int64_t width, int64_t begin, int64_t end) {
  return std::vector<double>(v.begin() + begin * width, v.begin() + end * width);
}

double max_rel(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double rms = 0, worst = 0;
  for (double x : b) rms += x * x;
  rms = std::sqrt(rms / double(std::max<size_t>(1, b.size())));
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return rms > 0 ? worst / rms : worst;
}

struct Result {
  std::vector<double> y, dx;                              // [T, D], rows in token order
  std::map<std::string, std::vector<double>> grads;       // router: summed; experts: all E
  RouterLosses losses;
  std::vector<int64_t> routed, kept;
  int64_t sent_bytes = 0, implied_bytes = 0;
};

Result single_rank(const MoEConfig& cfg, uint64_t seed) {
  auto backend = make_backend("cpu");
  Backend& b = *backend;
  MoELayer layer(b, cfg, DType::F64);
  layer.init(seed, 1.0);
  Tensor x = randn(Shape{kTokens, cfg.d_model}, seed + 1), dy = randn(Shape{kTokens, cfg.d_model}, seed + 3);
  MoEOutput out = layer.forward(x, {true, kSeq, seed + 2});
  layer.zero_grad();
  Tensor dx = b.empty(x.shape(), DType::F64);
  layer.backward(dy, dx);
  Result r;
  r.y = host_values(out.y);
  r.dx = host_values(dx);
  for (ParamRef& p : layer.params()) r.grads[p.name] = host_values(p.grad);
  r.losses = out.losses;
  r.routed = out.stats.routed;
  r.kept = out.stats.kept;
  return r;
}

Result expert_parallel(const MoEConfig& cfg, uint64_t seed, int ep) {
  const std::vector<double> x_all = host_values(randn(Shape{kTokens, cfg.d_model}, seed + 1));
  const std::vector<double> dy_all = host_values(randn(Shape{kTokens, cfg.d_model}, seed + 3));
  const int64_t D = cfg.d_model, Tl = kTokens / ep;
  Result res;
  res.y.assign(x_all.size(), 0);
  res.dx.assign(x_all.size(), 0);
  std::mutex mu;
  run_ranks(ep, [&](int rank, Communicator& comm) {
    auto backend = make_backend("cpu");
    Backend& b = *backend;
    auto disp = std::make_unique<AllToAllDispatcher>(b, comm, cfg.experts);
    AllToAllDispatcher* dispatcher = disp.get();
    MoELayer layer(b, cfg, DType::F64, std::move(disp), &comm);
    layer.init(seed, 1.0);
    Tensor x = host_tensor(rows(x_all, D, rank * Tl, (rank + 1) * Tl), Shape{Tl, D}, DType::F64);
    Tensor dy = host_tensor(rows(dy_all, D, rank * Tl, (rank + 1) * Tl), Shape{Tl, D}, DType::F64);
    MoEOutput out = layer.forward(x, {true, kSeq, seed + 2});
    layer.zero_grad();
    Tensor dx = b.empty(x.shape(), DType::F64);
    layer.backward(dy, dx);
    // Each rank holds only its E/ep experts' weights.
    CHECK(layer.params()[1].value.dim(0) == cfg.experts / ep);
    const auto y = host_values(out.y), g = host_values(dx);
    // Bytes this rank sent to other ranks, as its count matrix implies (forward and backward
    // each move every remote row twice: there and back).
    const auto& m = layer.last_layout().count_matrix;
    const int64_t El = cfg.experts / ep;
    int64_t remote_rows = 0, remote_back = 0;
    for (int r = 0; r < ep; ++r)
      for (int64_t j = 0; j < El; ++j)
        if (r != rank) {
          remote_rows += m[size_t(rank) * cfg.experts + r * El + j];
          remote_back += m[size_t(r) * cfg.experts + rank * El + j];
        }
    std::lock_guard<std::mutex> lock(mu);
    std::copy(y.begin(), y.end(), res.y.begin() + rank * Tl * D);
    std::copy(g.begin(), g.end(), res.dx.begin() + rank * Tl * D);
    for (ParamRef& p : layer.params()) {
      const auto v = host_values(p.grad);
      auto& dst = res.grads[p.name];
      if (p.name.rfind("experts.", 0) == 0) {
        dst.resize(v.size() * size_t(ep));
        std::copy(v.begin(), v.end(), dst.begin() + rank * int64_t(v.size()));
      } else {
        dst.resize(v.size());
        for (size_t i = 0; i < v.size(); ++i) dst[i] += v[i];  // the DP all-reduce's job
      }
    }
    if (rank == 0) {
      res.losses = out.losses;
      res.routed = out.stats.routed;
      res.kept = out.stats.kept;
    }
    res.sent_bytes += dispatcher->sent_bytes();
    res.implied_bytes += 2 * (remote_rows + remote_back) * D * int64_t(sizeof(double));
  });
  return res;
}

void check_equivalent(const std::string& name, const MoEConfig& cfg, uint64_t seed,
                      const std::vector<int>& eps = {2, 4, 8}) {
  const Result ref = single_rank(cfg, seed);
  for (int ep : eps) {
    INFO(name << ", ep = " << ep);
    const Result r = expert_parallel(cfg, seed, ep);
    CHECK(max_rel(r.y, ref.y) <= 1e-12);
    CHECK(max_rel(r.dx, ref.dx) <= 1e-12);
    for (const auto& [pname, g] : ref.grads) {
      INFO("gradient " << pname);
      REQUIRE(r.grads.count(pname));
      CHECK(max_rel(r.grads.at(pname), g) <= 1e-12);
    }
    CHECK(r.routed == ref.routed);
    CHECK(r.kept == ref.kept);
    CHECK(std::abs(r.losses.weighted - ref.losses.weighted) <= 1e-12 * std::abs(ref.losses.weighted));
    CHECK(std::abs(r.losses.aux - ref.losses.aux) <= 1e-12);
    CHECK(std::abs(r.losses.z - ref.losses.z) <= 1e-12 * ref.losses.z);
    CHECK(r.sent_bytes == r.implied_bytes);
  }
}

}  // namespace

TEST_CASE("expert parallel: softmax top-2, dropless, global aux + z loss equal the single rank", "[ep]") {
  check_equivalent("softmax top-2", ep_config(), 11);
}

TEST_CASE("expert parallel: sequence-level aux loss, sigmoid scores, shared experts with a gate", "[ep]") {
  MoEConfig c = ep_config();
  c.router.aux_loss_type = AuxLossType::Sequence;
  check_equivalent("sequence aux", c, 21, {2, 4});  // whole sequences of 12 per rank
  c = ep_config();
  c.router.score = ScoreFunc::Sigmoid;
  c.top_k = 3;
  check_equivalent("sigmoid top-3", c, 31);
  c = ep_config();
  c.shared_experts = 1;
  c.shared_gate = true;
  c.router.normalize = false;
  check_equivalent("shared experts", c, 41);
}

TEST_CASE("expert parallel: router noise and random top-2 draw by global token position", "[ep]") {
  // The ops: a slice of tokens with offset t0 * width draws exactly the rows of the whole call.
  Backend& b = cpu();
  const int64_t T = 12, D = 5, t0 = 7;
  Tensor x = randn(Shape{T, D}, 3), y = b.empty(x.shape(), DType::F64);
  b.jitter_forward(x, 0.1, 99, y);
  Tensor part = host_tensor(rows(host_values(x), D, t0, T), Shape{T - t0, D}, DType::F64);
  Tensor yp = b.empty(part.shape(), DType::F64);
  b.jitter_forward(part, 0.1, 99, yp, uint64_t(t0 * D));
  CHECK(host_values(yp) == rows(host_values(y), D, t0, T));
  b.noisy_logits_forward(x, Tensor(), 0.5, 98, y);
  b.noisy_logits_forward(part, Tensor(), 0.5, 98, yp, uint64_t(t0 * D));
  CHECK(host_values(yp) == rows(host_values(y), D, t0, T));
  // The layer: jitter + Gaussian logit noise, and random top-2, equal the single rank.
  MoEConfig c = ep_config();
  c.router.noise = NoiseType::Jitter;
  check_equivalent("jitter", c, 61);
  c.router.noise = NoiseType::Gaussian;
  check_equivalent("gaussian noise", c, 62);
  c = ep_config();
  c.router.policy = RoutingPolicy::RandomTop2;
  check_equivalent("random top-2", c, 63);
}

TEST_CASE("expert parallel: router.force_balance continues the lower ranks' round (layout-invariant)", "[ep][force_balance]") {
  MoEConfig c = ep_config();
  c.router.force_balance = true;
  c.top_k = 3;  // a rank's 12 x 3 (ep 4) or 6 x 3 (ep 8) assignments are not a multiple of E = 8:
                // without the offset its round would restart at expert 0
  check_equivalent("force_balance", c, 71);
}

TEST_CASE("expert parallel: capacity is per source rank (each rank's own T), as in Megatron-Core", "[ep]") {
  // With capacity, a rank drops from its own tokens with C = ceil(cf * T_rank * k / E), before
  // the exchange. So the forward output of a rank's tokens is the single-rank layer's output on
  // that rank's slice alone (routing and experts are per token; only the drops depend on which
  // tokens share a rank), and the kept counts are the sums of the slices' kept counts.
  MoEConfig c = ep_config();
  c.router.capacity_factor = 1.0;
  const uint64_t seed = 51;
  const int ep = 4;
  const Result r = expert_parallel(c, seed, ep);
  const std::vector<double> x_all = host_values(randn(Shape{kTokens, c.d_model}, seed + 1));
  const int64_t Tl = kTokens / ep, D = c.d_model;
  std::vector<int64_t> kept(size_t(c.experts), 0);
  int64_t dropped = 0;
  for (int rank = 0; rank < ep; ++rank) {
    MoELayer layer(cpu(), c, DType::F64);
    layer.init(seed, 1.0);
    Tensor x = host_tensor(rows(x_all, D, rank * Tl, (rank + 1) * Tl), Shape{Tl, D}, DType::F64);
    MoEOutput out = layer.forward(x, {true, kSeq, seed + 2});
    CHECK(max_rel(rows(r.y, D, rank * Tl, (rank + 1) * Tl), host_values(out.y)) <= 1e-12);
    for (int64_t e = 0; e < c.experts; ++e) {
      kept[e] += out.stats.kept[e];
      dropped += out.stats.routed[e] - out.stats.kept[e];
    }
  }
  CHECK(r.kept == kept);
  CHECK(dropped > 0);  // the case exercises drops
}

TEST_CASE("expert parallel: what it cannot do yet is refused by name", "[ep]") {
  for (auto set : std::vector<std::function<void(MoEConfig&)>>{
           [](MoEConfig& c) { c.router.policy = RoutingPolicy::ExpertChoice; c.router.aux_alpha = 0; c.router.z_loss = 0; },
           [](MoEConfig& c) { c.router.policy = RoutingPolicy::Sinkhorn; },
           [](MoEConfig& c) { c.expert_dropout = 0.1; },
           [](MoEConfig& c) { c.router.importance_weight = 0.1; }}) {
    MoEConfig c = ep_config();
    set(c);
    CHECK_THROWS_AS(Router::check_batch_group(c), UsageError);
  }
  MoEConfig c = ep_config();
  c.experts = 6;
  CHECK_THROWS_WITH(run_ranks(4, [&](int, Communicator& comm) { AllToAllDispatcher d(cpu(), comm, 6); }),
                    has_substr("6 experts do not split over 4 ranks"));
}
