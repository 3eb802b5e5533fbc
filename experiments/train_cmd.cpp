// moelab: `moelab train` -- until the language-model trainer lands (issue 3), an MoE-layer
// demonstration that honours every [model] MoE key and [router] key, train.steps/batch/seq/lr/
// warmup/seed and log.every.
//
// Task: tokens come from K = data.synthetic_sources latent sources (x_t = mu_s + 0.5 n, D dims);
// the target is y*_t = x_t + A_s x_t with a random linear map A_s per source. The student is
// y = x + MoE(x) (the residual carries dropped tokens), trained with Adam on
// 0.5 mean ||y - y*||^2 + the weighted router losses. The progress line shows the router's
// balance and, at the end, which experts took which source (specialisation has a ground truth).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "core/backend.h"
#include "core/moe/moe_layer.h"
#include "core/rng.h"
#include "experiments/commands.h"

using namespace moelab;

namespace {

struct Adam {  // Adam (Kingma & Ba 2015) on host tensors; the LM trainer brings AdamW (issue 3).
  std::vector<std::vector<double>> m, v;
  double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  int64_t t = 0;
  void step(std::vector<ParamRef>& ps, double lr) {
    if (m.empty())
      for (auto& p : ps) {
        m.emplace_back(size_t(p.value.numel()), 0.0);
        v.emplace_back(size_t(p.value.numel()), 0.0);
      }
    ++t;
    for (size_t i = 0; i < ps.size(); ++i) {
      auto w = host_values(ps[i].value), g = host_values(ps[i].grad);
      for (size_t j = 0; j < w.size(); ++j) {
        m[i][j] = b1 * m[i][j] + (1 - b1) * g[j];
        v[i][j] = b2 * v[i][j] + (1 - b2) * g[j] * g[j];
        const double mh = m[i][j] / (1 - std::pow(b1, double(t))), vh = v[i][j] / (1 - std::pow(b2, double(t)));
        w[j] -= lr * mh / (std::sqrt(vh) + eps);
      }
      Tensor h = host_tensor(w, ps[i].value.shape(), ps[i].value.dtype());
      std::memcpy(ps[i].value.data(), h.data(), h.nbytes());
    }
  }
};

}  // namespace

int run_train(const RunConfig& cfg, const TrainCliOptions& opts) {
  MOELAB_CHECK(cfg.train.backend == "cpu",
               "train.backend = ", cfg.train.backend, ": the MoE-layer demonstration runs on the cpu "
               "backend; the CUDA backend arrives with issue 5");
  if (!opts.resume.empty()) MOELAB_FAIL("--resume needs checkpoints, which arrive with the LM trainer (issue 3)");
  auto backend = make_backend("cpu");
  Backend& b = *backend;
  const DType dt = cfg.model.dtype == "f64" ? DType::F64 : DType::F32;
  const MoEConfig& mc = cfg.moe;
  const int64_t T = cfg.train.batch * cfg.train.seq, D = mc.d_model, E = mc.experts;
  const int64_t S = cfg.data.synthetic_sources;

  std::printf("moelab train: MoE-layer demonstration (the LM trainer lands with issue 3)\n");
  std::printf("  layer: D=%lld E=%lld K=%lld F=%lld shared=%lld | router: %s %s%s, noise %s, "
              "capacity_factor %.3g (%s), aux_alpha %g, z_loss %g\n",
              (long long)D, (long long)E, (long long)mc.top_k, (long long)mc.d_expert,
              (long long)mc.shared_experts, to_string(mc.router.policy), to_string(mc.router.score),
              mc.router.normalize ? " renormalised" : "", to_string(mc.router.noise),
              mc.router.capacity_factor, to_string(mc.router.drop_policy), mc.router.aux_alpha,
              mc.router.z_loss);
  std::printf("  task: %lld tokens/step from %lld synthetic sources, %lld steps, lr %g\n",
              (long long)T, (long long)S, (long long)cfg.train.steps, cfg.train.lr);

  // Teacher: source means and maps, fixed by the seed.
  const uint64_t seed = cfg.train.seed;
  std::vector<double> mu(size_t(S * D)), A(size_t(S * D * D));
  for (size_t i = 0; i < mu.size(); ++i) mu[i] = 2.0 * rng::normal(rng::derive(seed, 101), i);
  for (size_t i = 0; i < A.size(); ++i) A[i] = rng::normal(rng::derive(seed, 102), i) / std::sqrt(double(D));

  MoELayer layer(b, mc, dt);
  layer.init(rng::derive(seed, 1), cfg.model.init_scale);
  Adam opt;
  std::vector<std::vector<int64_t>> expert_by_source(size_t(E), std::vector<int64_t>(size_t(S), 0));
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t step = 1; step <= cfg.train.steps; ++step) {
    const uint64_t bs = rng::derive(seed, 1000 + uint64_t(step));
    std::vector<double> x(size_t(T * D)), ystar(size_t(T * D));
    std::vector<int> src(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) {
      src[t] = int(rng::bits(bs, uint64_t(t)) % uint64_t(S));
      for (int64_t d = 0; d < D; ++d)
        x[t * D + d] = mu[src[t] * D + d] + 0.5 * rng::normal(bs, uint64_t(T + t * D + d));
      for (int64_t i = 0; i < D; ++i) {
        double acc = x[t * D + i];
        for (int64_t j = 0; j < D; ++j) acc += A[(src[t] * D + i) * D + j] * x[t * D + j];
        ystar[t * D + i] = acc;
      }
    }
    Tensor xt = b.from_host(host_tensor(x, Shape{T, D}, dt));
    MoEOutput out = layer.forward(xt, {true, cfg.train.seq, rng::derive(seed, 2000 + uint64_t(step))});
    auto y = host_values(out.y);
    std::vector<double> dy(y.size());
    double mse = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      const double r = x[i] + y[i] - ystar[i];  // residual: prediction = x + MoE(x)
      mse += 0.5 * r * r / double(T);
      dy[i] = r / double(T);
    }
    layer.zero_grad();
    Tensor dx = b.empty(Shape{T, D}, dt);
    layer.backward(b.from_host(host_tensor(dy, Shape{T, D}, dt)), dx);
    const double warm = cfg.train.warmup > 0 ? std::min(1.0, double(step) / double(cfg.train.warmup)) : 1.0;
    auto params = layer.params();
    opt.step(params, cfg.train.lr * warm);
    layer.update_bias();

    const RouterStats& st = out.stats;
    const double mean_c = double(T * mc.top_k) / double(E);
    const int64_t routed = std::accumulate(st.routed.begin(), st.routed.end(), int64_t(0));
    const int64_t kept = std::accumulate(st.kept.begin(), st.kept.end(), int64_t(0));
    const int64_t max_c = *std::max_element(st.routed.begin(), st.routed.end());
    if (step > cfg.train.steps / 2) {  // specialisation over the second half
      const RouterState& rs = layer.last_routing();
      auto idx = host_values(rs.idx), keep = host_values(rs.keep);
      const int64_t n1 = rs.idx.dim(1);
      for (size_t a = 0; a < idx.size(); ++a) {
        if (!keep[a]) continue;
        const int64_t e = rs.expert_choice ? int64_t(a) / n1 : int64_t(idx[a]);
        const int64_t t = rs.expert_choice ? int64_t(idx[a]) : int64_t(a) / n1;
        ++expert_by_source[e][src[t]];
      }
    }
    if (step == 1 || step % cfg.log.every == 0 || step == cfg.train.steps) {
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("step %5lld | mse %.4f | aux %.3f z %.3f | imbalance %.2f | dropped %.1f%% | "
                  "entropy %.3f | logit rms %.2f | %.0f tok/s\n",
                  (long long)step, mse, out.losses.aux, out.losses.z, double(max_c) / mean_c,
                  100.0 * double(routed - kept) / double(routed), st.entropy, st.logit_rms,
                  double(step * T) / std::max(secs, 1e-9));
    }
  }
  std::printf("expert x source assignments (second half of training):\n        ");
  for (int64_t s = 0; s < S; ++s) std::printf(" src%-5lld", (long long)s);
  std::printf("\n");
  for (int64_t e = 0; e < E; ++e) {
    std::printf("  e%-4lld", (long long)e);
    for (int64_t s = 0; s < S; ++s) std::printf(" %8lld", (long long)expert_by_source[e][s]);
    std::printf("\n");
  }
  std::printf("done in %.1f s (no HDF5 log yet: the run log arrives with issue 3)\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return 0;
}
