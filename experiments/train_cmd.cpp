// moelab: `moelab train` (one resolved run; main() expands sweeps) and `moelab generate`.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "core/io/checkpoint.h"
#include "core/rng.h"
#include "core/trainer.h"
#include "experiments/commands.h"

using namespace moelab;

int run_train(const RunConfig& cfg, const TrainCliOptions& opts) {
  TrainOptions to;
  to.resume = opts.resume;
  to.sweep_name = opts.sweep_name;
  TrainResult r = train(cfg, to);
  const double val = r.eval_losses.empty() ? std::nan("") : r.eval_losses.back();
  std::printf("summary: %lld steps in %.1f s (%.0f tok/s) | final loss %.4f nats | val %.4f nats/byte "
              "= %.3f bits/byte | imbalance %.2f | drop %.1f%% | logit rms %.2f\n",
              (long long)r.steps.size(), r.seconds, r.tokens_per_sec,
              r.losses.empty() ? std::nan("") : r.losses.back(), val, val / std::log(2.0),
              r.imbalance, 100.0 * r.drop_fraction, r.logit_rms);
  std::printf("log: %s\n", r.log_path.c_str());
  if (!r.last_checkpoint.empty()) std::printf("checkpoint: %s\n", r.last_checkpoint.c_str());
  return 0;
}

int run_generate(const GenerateCliOptions& g) {
  CheckpointReader ck(g.checkpoint);
  MOELAB_CHECK(ck.has_meta("config"), "checkpoint ", g.checkpoint, " carries no config");
  RunConfig cfg = config_from_text(ck.meta("config"));
  auto backend = make_backend(g.backend.empty() ? "cpu" : g.backend);
  Backend& b = *backend;
  const DType dtype = cfg.model.dtype == "f64" ? DType::F64 : DType::F32;
  TransformerLM model(b, lm_config(cfg), dtype);
  for (ParamRef& p : model.params()) b.copy(ck.tensor(p.name, p.value.shape(), p.value.dtype()), p.value);

  std::vector<int32_t> ctx(g.prompt.begin(), g.prompt.end());
  for (auto& c : ctx) c = int32_t(uint8_t(c));
  if (ctx.empty()) ctx.push_back('\n');
  std::string out = g.prompt;
  const int64_t window = cfg.train.seq, V = cfg.model.vocab;
  for (int64_t i = 0; i < g.tokens; ++i) {
    const int64_t n = std::min<int64_t>(window, int64_t(ctx.size()));
    std::vector<double> in(ctx.end() - n, ctx.end());
    Tensor tk = b.from_host(host_tensor(in, Shape{n}, DType::I32));
    model.forward(tk, tk, n, false, 0);
    auto logits = host_values(b.to_host(model.logits()));
    // Temperature and top-k sampling over the last position's logits.
    std::vector<std::pair<double, int>> cand;
    for (int64_t v = 0; v < V; ++v) cand.push_back({logits[(n - 1) * V + v] / g.temperature, int(v)});
    std::sort(cand.begin(), cand.end(), [](auto& a, auto& c) { return a.first > c.first; });
    if (g.top_k > 0 && g.top_k < V) cand.resize(size_t(g.top_k));
    double z = 0;
    for (auto& c : cand) z += std::exp(c.first - cand[0].first);
    double u = rng::uniform(g.seed, uint64_t(i)) * z, acc = 0;
    int pick = cand.back().second;
    for (auto& c : cand) {
      acc += std::exp(c.first - cand[0].first);
      if (u <= acc) { pick = c.second; break; }
    }
    ctx.push_back(pick);
    out.push_back(char(pick));
  }
  std::printf("%s\n", out.c_str());
  return 0;
}
