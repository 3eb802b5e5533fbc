// moelab: `moelab train` (one resolved run; main() expands sweeps) and `moelab generate`.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include "backends/registry.h"
#include "core/io/checkpoint.h"
#include "core/io/tokenizer.h"
#include "core/rng.h"
#include "core/trainer.h"
#include "experiments/commands.h"

using namespace moelab;

int run_train(const RunConfig& cfg, const TrainCliOptions& opts) {
  TrainOptions to;
  to.resume = opts.resume;
  to.sweep_name = opts.sweep_name;
  to.overwrite = opts.overwrite;
  RunEnvironment env;
  if (opts.process) {
    // One process per GPU: the node-local rank picks the GPU (else the rank, modulo the GPUs).
    const int gpus = std::max(1, cuda_devices()), p = opts.process->local_rank;
    const int device = (p >= 0 ? p : opts.process->rank) % gpus;
    std::printf("moelab train: rank %d of %d (%s) on GPU %d, NCCL id file %s\n", opts.process->rank,
                opts.process->world, opts.process->source.c_str(), device, opts.nccl_id.c_str());
    env = process_environment(cfg, opts.process->rank, opts.process->world, opts.nccl_id, device);
  } else {
    env = default_environment(cfg);
  }
  TrainResult r = train(cfg, to, env);
  if (opts.process && opts.process->rank != 0) return 0;  // rank 0 reports
  char val[80] = "val - (log.eval_every = 0)";
  if (!r.eval_losses.empty())
    std::snprintf(val, sizeof val,
                  cfg.data.tokenizer == "bytes" ? "val %.4f nats/byte = %.3f bits/byte"
                                                : "val %.4f nats/token = %.3f bits/token",
                  r.eval_losses.back(),
                  r.eval_losses.back() / std::log(2.0));
  std::printf("summary: %lld steps in %.1f s (%.0f tok/s) | final loss %.4f nats | %s | imbalance %.2f | "
              "drop %.1f%% | logit rms %.2f\n",
              (long long)r.steps.size(), r.seconds, r.tokens_per_sec,
              r.losses.empty() ? std::nan("") : r.losses.back(), val, r.imbalance,
              100.0 * r.drop_fraction, r.logit_rms);
  std::printf("log: %s\n", r.log_path.c_str());
  if (!r.last_checkpoint.empty()) std::printf("checkpoint: %s\n", r.last_checkpoint.c_str());
  return 0;
}

// Writes n raw bytes to stdout and flushes them, so that a pipe or an interrupted run still gets
// everything produced so far (NUL bytes included: printf("%s") stopped at the first one).
static void emit(const char* bytes, size_t n) {
  if ((n && std::fwrite(bytes, 1, n, stdout) != n) || std::fflush(stdout) != 0)
    MOELAB_FAIL("generate: cannot write to standard output");
}

void load_checkpoint_weights(const CheckpointReader& ck, const RunConfig& cfg, TransformerLM& model,
                             Backend& b) {
  // The checkpoint's tensors must be exactly this model's parameters, plus the trainer's AdamW
  // state (adam.*) and one router bias per MoE block: anything else was written by another model.
  std::vector<ParamRef> params = model.params();
  const std::vector<int> moe_blocks = model.moe_blocks();
  std::set<std::string> expected;
  for (const ParamRef& p : params) expected.insert(p.name);
  for (int blk : moe_blocks) expected.insert("router_bias." + std::to_string(blk));
  for (const std::string& name : ck.names()) {
    if (!ck.is_tensor(name) || name.rfind("adam.", 0) == 0 || expected.count(name)) continue;
    MOELAB_FAIL("checkpoint ", ck.path(), " has tensor '", name,
                "' that the model of its config does not have: it was written by another model");
  }
  for (const ParamRef& p : params) {
    if (!ck.has(p.name))
      MOELAB_FAIL("checkpoint ", ck.path(), " has no tensor '", p.name,
                  "': it was written by another model than its config describes");
    b.copy(ck.tensor(p.name, p.value.shape(), p.value.dtype()), p.value);
  }
  // The aux-loss-free routing bias (router.bias_update_rate > 0) is part of the trained model:
  // without it routing, and so the output, differs from the model that was trained.
  for (size_t i = 0; i < moe_blocks.size(); ++i) {
    const std::string name = "router_bias." + std::to_string(moe_blocks[i]);
    Tensor& bias = model.moe_layer(i).router().params().bias;
    if (ck.has(name))
      b.copy(ck.tensor(name, bias.shape(), DType::F32), bias);
    else if (cfg.moe.router.bias_update_rate > 0)
      MOELAB_FAIL("checkpoint ", ck.path(), " has no tensor '", name,
                  "', the router bias its config (router.bias_update_rate > 0) routes with");
  }
}

CheckpointModel load_checkpoint_model(const CheckpointReader& ck, const RunConfig& cfg, const std::string& backend) {
  CheckpointModel m;
  m.backend = make_backend(backend.empty() ? "cpu" : backend);
  const DType dtype = cfg.model.dtype == DType::F64 ? DType::F64 : DType::F32;
  m.model = std::make_unique<TransformerLM>(*m.backend, lm_config(cfg), dtype);
  load_checkpoint_weights(ck, cfg, *m.model, *m.backend);
  if (cfg.data.tokenizer != "bytes") m.tokenizer = Tokenizer::load_shared(cfg.data.tokenizer);
  return m;
}

int run_generate(const GenerateCliOptions& g) {
  CheckpointReader ck(g.checkpoint);
  MOELAB_CHECK(ck.has_meta("config"), "checkpoint ", g.checkpoint, " carries no config");
  RunConfig cfg = config_from_text(ck.meta("config"));
  {
    RunConfig one = cfg;  // generation runs one sequence; this only checks the sizes for overflow
    one.train.batch = 1;
    (void)estimate_memory(one);
  }
  // Tokens: bytes, or the run's data.tokenizer (the prompt is encoded with it, and each sampled
  // id is written as the bytes it decodes to; ids that no token has, such as padding rows of a
  // model.vocab larger than the tokenizer's, are never sampled).
  CheckpointModel cm = load_checkpoint_model(ck, cfg, g.backend);
  Backend& b = *cm.backend;
  TransformerLM& model = *cm.model;
  const Tokenizer* tok = cm.tokenizer.get();
  std::vector<int32_t> ctx;
  if (tok) {
    ctx = tok->encode(g.prompt.empty() ? std::string("\n") : g.prompt);
  } else {
    ctx.assign(g.prompt.begin(), g.prompt.end());
    for (auto& c : ctx) c = int32_t(uint8_t(c));
    if (ctx.empty()) ctx.push_back('\n');
  }
  emit(g.prompt.data(), g.prompt.size());
  const int64_t window = cfg.train.seq, V = cfg.model.vocab;
  for (int64_t i = 0; i < g.tokens; ++i) {
    const int64_t n = std::min<int64_t>(window, int64_t(ctx.size()));
    std::vector<double> in(ctx.end() - n, ctx.end());
    Tensor tk = b.from_host(host_tensor(in, Shape{n}, DType::I32));
    model.forward(tk, tk, n, false, 0);
    auto logits = host_values(b.to_host(model.logits()));
    // Temperature and top-k sampling over the last position's logits.
    std::vector<std::pair<double, int>> cand;
    for (int64_t v = 0; v < V; ++v)
      if (!tok || tok->has_id(int32_t(v))) cand.push_back({logits[(n - 1) * V + v] / g.temperature, int(v)});
    std::sort(cand.begin(), cand.end(), [](auto& a, auto& c) { return a.first > c.first; });
    if (g.top_k > 0 && g.top_k < int64_t(cand.size())) cand.resize(size_t(g.top_k));
    double z = 0;
    for (auto& c : cand) z += std::exp(c.first - cand[0].first);
    double u = rng::uniform(g.seed, uint64_t(i)) * z, acc = 0;
    int pick = cand.back().second;
    for (auto& c : cand) {
      acc += std::exp(c.first - cand[0].first);
      if (u <= acc) { pick = c.second; break; }
    }
    ctx.push_back(pick);
    if (tok) {
      const std::string bytes = tok->decode_token(pick);
      emit(bytes.data(), bytes.size());
    } else {
      const char byte = char(pick);
      emit(&byte, 1);
    }
  }
  emit("\n", 1);
  return 0;
}
