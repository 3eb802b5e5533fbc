// moelab: `moelab bench` -- times one training step of a config's model on a backend: forward,
// backward and the AdamW update, as medians over --iters steps after 3 warm-up steps.
//
// Tokens are random bytes (counter-based, from train.seed): the step's cost does not depend on
// the text, and no corpus is needed. Each phase ends with backend.synchronize() and is timed
// with a steady clock, so the GPU's queued work is inside the measurement.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include "backends/registry.h"
#include "core/rng.h"
#include "core/trainer.h"
#include "experiments/commands.h"

using namespace moelab;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

// ep x dp ranks: whole training steps (forward, backward, gradient all-reduce, AdamW) through
// the trainer on synthetic tokens, into a scratch log that is removed afterwards; the phases are
// not split, and "comm ms" is the most any rank spent communicating in a step.
void bench_parallel(const SweepRun& run, const BenchCliOptions& opts) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("moelab_bench_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  RunConfig c = run.config;
  c.train.steps = 3 + opts.iters;
  c.data.source = "synthetic";
  c.log.eval_every = 0;
  c.log.checkpoint_every = 0;
  c.log.flush_every = c.train.steps;
  c.log.out = (dir / "bench.h5").string();
  c.log.checkpoint_dir = (dir / "ck").string();
  TrainOptions o;
  o.quiet = true;
  TrainResult r;
  try {
    r = train(c, o);
  } catch (...) {
    fs::remove_all(dir);
    throw;
  }
  fs::remove_all(dir);
  const std::vector<double> steps(r.step_seconds.begin() + 3, r.step_seconds.end());
  const std::vector<double> comm(r.comm_seconds.begin() + 3, r.comm_seconds.end());
  const double st = 1000.0 * median(steps), T = double(c.train.batch * c.train.seq);
  std::printf("%-28s %-7s %-5s %7lld %10s %10s %10s %10.3f %12.0f  ep %lld x dp %lld, comm %.3f ms (%.0f%%)\n",
              run.name.c_str(), c.train.backend.c_str(), to_string(c.model.dtype), (long long)T, "-", "-", "-", st,
              T / (st / 1000.0), (long long)c.parallel.ep, (long long)c.parallel.dp, 1000.0 * median(comm),
              100.0 * median(comm) * 1000.0 / st);
  std::fflush(stdout);
}

int run_bench(const RunConfig& cfg_in, const BenchCliOptions& opts) {
  std::printf("%-28s %-7s %-5s %7s %10s %10s %10s %10s %12s\n", "run", "backend", "dtype", "tokens",
              "fwd ms", "bwd ms", "adamw ms", "step ms", "tokens/s");
  // Absurd sizes are refused before any run starts (core/preflight.h).
  for (const SweepRun& run : expand_grid(cfg_in)) preflight_check(run.config);
  for (const SweepRun& run : expand_grid(cfg_in)) {
    const RunConfig& cfg = run.config;
    if (cfg.parallel.world() > 1) {
      bench_parallel(run, opts);
      continue;
    }
    auto backend = make_backend(cfg.train.backend);
    Backend& b = *backend;
    const DType dt = cfg.model.dtype;
    MOELAB_CHECK(b.supports(Op::AttentionForward, dt), "bench: model.dtype = ", to_string(cfg.model.dtype),
                 " is not supported by backend ", b.name());
    const int64_t S = cfg.train.seq, T = cfg.train.batch * S;
    TransformerLM model(b, lm_config(cfg), dt);
    model.init(rng::derive(cfg.train.seed, 1));
    std::vector<ParamRef> params = model.params();
    std::vector<Tensor> m, v;
    for (ParamRef& p : params) {
      const DType st = p.value.dtype() == DType::F64 ? DType::F64 : DType::F32;
      m.push_back(b.zeros(p.value.shape(), st));
      v.push_back(b.zeros(p.value.shape(), st));
    }
    std::vector<double> tok(static_cast<size_t>(T)), tgt(static_cast<size_t>(T));
    for (int64_t i = 0; i < T; ++i) {
      tok[i] = double(rng::bits(cfg.train.seed, uint64_t(i)) % uint64_t(cfg.model.vocab));
      tgt[i] = double(rng::bits(cfg.train.seed + 1, uint64_t(i)) % uint64_t(cfg.model.vocab));
    }
    Tensor tokens = b.from_host(host_tensor(tok, Shape{T}, DType::I32));
    Tensor targets = b.from_host(host_tensor(tgt, Shape{T}, DType::I32));

    using Clock = std::chrono::steady_clock;
    auto ms = [](Clock::time_point a, Clock::time_point c) {
      return std::chrono::duration<double, std::milli>(c - a).count();
    };
    std::vector<double> fwd, bwd, opt, step;
    const int64_t warmup = 3;
    for (int64_t it = 0; it < warmup + opts.iters; ++it) {
      const auto t0 = Clock::now();
      model.forward(tokens, targets, S, true, rng::derive(cfg.train.seed, 1000000 + uint64_t(it)));
      b.synchronize();
      const auto t1 = Clock::now();
      model.zero_grad();
      model.backward();
      b.synchronize();
      const auto t2 = Clock::now();
      for (size_t i = 0; i < params.size(); ++i)
        b.adamw(params[i].value, params[i].grad, m[i], v[i], 1e-4, 0.9, 0.95, 1e-8, 0.0, it + 1);
      b.synchronize();
      const auto t3 = Clock::now();
      if (it < warmup) continue;
      fwd.push_back(ms(t0, t1));
      bwd.push_back(ms(t1, t2));
      opt.push_back(ms(t2, t3));
      step.push_back(ms(t0, t3));
    }
    const double st = median(step);
    std::printf("%-28s %-7s %-5s %7lld %10.3f %10.3f %10.3f %10.3f %12.0f\n", run.name.c_str(),
                b.name().c_str(), to_string(cfg.model.dtype), (long long)T, median(fwd), median(bwd),
                median(opt), st, double(T) / (st / 1000.0));
    std::fflush(stdout);
  }
  return 0;
}
