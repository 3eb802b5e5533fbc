// moelab: `moelab bench` -- times one training step of a config's model on a backend: forward,
// backward and the optimizer (gradient norm, AdamW on fp32 master weights, cast back: what the
// trainer does), as medians over --iters steps after --warmup (3) untimed ones; with --breakdown, the
// median time per phase (core/profile.h) over --iters more steps. `moelab bench moe-layer`
// times the MoE layer alone.
//
// Tokens are random bytes (counter-based, from train.seed): the step's cost does not depend on
// the text, and no corpus is needed. Each phase ends with backend.synchronize() and is timed
// with a steady clock, so the GPU's queued work is inside the measurement.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include "backends/registry.h"
#include "core/model.h"
#include "core/param_store.h"
#include "core/profile.h"
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

// ep x dp ranks: whole training steps (forward, backward, gradient all-reduce, AdamW) through
// the trainer on synthetic tokens, into a scratch log that is removed afterwards; the phases are
// not split, and "comm ms" is the most any rank spent communicating in a step.
void bench_parallel(const SweepRun& run, const BenchCliOptions& opts) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("moelab_bench_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  RunConfig c = run.config;
  c.train.steps = opts.warmup + opts.iters;
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
  const std::vector<double> steps(r.step_seconds.begin() + opts.warmup, r.step_seconds.end());
  const std::vector<double> comm(r.comm_seconds.begin() + opts.warmup, r.comm_seconds.end());
  const double st = 1000.0 * median(steps), T = double(c.train.batch * c.train.seq);
  std::printf("%-28s %-7s %-5s %7lld %10s %10s %10s %10.3f %12.0f  ep %lld x dp %lld, comm %.3f ms (%.0f%%)\n",
              run.name.c_str(), c.train.backend.c_str(), to_string(c.model.dtype), (long long)T, "-", "-", "-", st,
              T / (st / 1000.0), (long long)c.parallel.ep, (long long)c.parallel.dp, 1000.0 * median(comm),
              100.0 * median(comm) * 1000.0 / st);
  std::fflush(stdout);
}

using Clock = std::chrono::steady_clock;
double ms_between(Clock::time_point a, Clock::time_point c) {
  return std::chrono::duration<double, std::milli>(c - a).count();
}

// Median per phase over profiled steps, printed as a table: GPU ms (CUDA events on cuda), its
// share of the step, and the host's ms in the same phase (host > GPU: the GPU waited for it).
void print_breakdown(const std::vector<StepProfile>& steps) {
  std::map<std::string, std::vector<double>> gpu, host;
  std::vector<double> totals, host_totals, syncs;
  for (const StepProfile& st : steps) {
    double total = 0, htotal = 0;
    for (const auto& [k, v] : st.gpu_ms) {
      gpu[k].push_back(v);
      total += v;
    }
    for (const auto& [k, v] : st.host_ms) {
      host[k].push_back(v);
      htotal += v;
    }
    totals.push_back(total);
    host_totals.push_back(htotal);
    syncs.push_back(double(st.host_syncs));
  }
  const double total = median(totals);
  std::vector<std::pair<double, std::string>> rows;
  for (auto& [k, v] : gpu) rows.push_back({median(v), k});
  std::sort(rows.rbegin(), rows.rend());
  std::printf("  breakdown (median of %zu profiled steps; ms between scope marks, device: CUDA events on cuda):\n",
              steps.size());
  std::printf("  %-42s %10s %7s %10s\n", "phase", "device ms", "share", "host ms");
  for (const auto& [ms, k] : rows)
    std::printf("  %-42s %10.3f %6.1f%% %10.3f\n", k.c_str(), ms, 100.0 * ms / total, median(host[k]));
  std::printf("  %-42s %10.3f %7s %10.3f\n", "step (sum of phases)", total, "", median(host_totals));
  std::printf("  %-42s %10.0f\n", "host syncs per step", median(syncs));
  std::fflush(stdout);
}

Tensor random_tensor(Backend& b, Shape s, DType dt, uint64_t seed) {
  std::vector<double> v(static_cast<size_t>(s.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = rng::normal(seed, i);
  return b.from_host(host_tensor(v, s, dt));
}

// Dense bf16 (or the model dtype) GEMM throughput of this backend: 8192^3 (4096^3 for f64 on
// the CPU would take too long: CPU backends use 1024^3), median TFLOP/s of 10 after 2 warm-ups.
double gemm_peak_tflops(Backend& b, DType dt) {
  const int64_t n = b.device() == Device::CPU ? 1024 : 8192;
  Tensor x = b.zeros(Shape{n, n}, dt), y = b.zeros(Shape{n, n}, dt), z = b.zeros(Shape{n, n}, dt);
  b.fill(x, 0.01);
  b.fill(y, 0.01);
  std::vector<double> t;
  for (int i = 0; i < 12; ++i) {
    b.synchronize();
    const auto t0 = Clock::now();
    b.gemm(false, false, 1.0, x, y, 0.0, z);
    b.synchronize();
    if (i >= 2) t.push_back(ms_between(t0, Clock::now()));
  }
  return 2.0 * double(n) * double(n) * double(n) / (median(t) / 1000.0) / 1e12;
}

// One training step as the trainer takes it: forward, backward into the parameter store, the
// global gradient norm (read on the host, as the trainer does for clipping and the log), AdamW on
// the fp32 master weights of bf16 parameters and the cast back.
void bench_model(const SweepRun& run, const BenchCliOptions& opts) {
  const RunConfig& cfg = run.config;
  auto backend = make_backend(cfg.train.backend);
  Backend& b = *backend;
  const DType dt = cfg.model.dtype;
  MOELAB_CHECK(b.supports(Op::AttentionForward, dt), "bench: model.dtype = ", to_string(cfg.model.dtype),
               " is not supported by backend ", b.name());
  const int64_t S = cfg.train.seq, T = cfg.train.batch * S;
  const auto t_init = Clock::now();
  TransformerLM model(b, lm_config(cfg), dt);
  model.init(rng::derive(cfg.train.seed, 1));
  b.synchronize();
  const double init_s = ms_between(t_init, Clock::now()) / 1000.0;
  ParamStore store(b, model);
  std::vector<ParamRef>& params = store.params();
  std::vector<Tensor> m, v, master(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamRef& p = params[i];
    const DType st = p.value.dtype() == DType::F64 ? DType::F64 : DType::F32;
    m.push_back(b.zeros(p.value.shape(), st));
    v.push_back(b.zeros(p.value.shape(), st));
    if (p.value.dtype() == DType::BF16) {
      master[i] = b.empty(p.value.shape(), DType::F32);
      b.cast(p.value, master[i]);
    }
  }
  std::vector<double> tok(static_cast<size_t>(T)), tgt(static_cast<size_t>(T));
  for (int64_t i = 0; i < T; ++i) {
    tok[i] = double(rng::bits(cfg.train.seed, uint64_t(i)) % uint64_t(cfg.model.vocab));
    tgt[i] = double(rng::bits(cfg.train.seed + 1, uint64_t(i)) % uint64_t(cfg.model.vocab));
  }
  Tensor tokens = b.from_host(host_tensor(tok, Shape{T}, DType::I32));
  Tensor targets = b.from_host(host_tensor(tgt, Shape{T}, DType::I32));

  auto optimizer_step = [&](int64_t step) {
    ProfileScope ps(b, "optimizer (norm, AdamW, cast)");
    const double gnorm = std::sqrt(store.sum_squares(GradGroup::Replicated) + store.sum_squares(GradGroup::Expert));
    MOELAB_CHECK(std::isfinite(gnorm), "bench: gradient norm ", gnorm);
    for (size_t i = 0; i < params.size(); ++i) {
      const Tensor& w = master[i].defined() ? master[i] : params[i].value;
      b.adamw(w, params[i].grad, m[i], v[i], 1e-4, 0.9, 0.95, 1e-8, 0.0, step,
              master[i].defined() ? params[i].value : Tensor());
    }
  };
  b.reset_peak_bytes();
  std::vector<double> fwd, bwd, opt, step;
  const int64_t warmup = opts.warmup;
  for (int64_t it = 0; it < warmup + opts.iters; ++it) {
    const auto t0 = Clock::now();
    model.forward(tokens, targets, S, true, rng::derive(cfg.train.seed, 1000000 + uint64_t(it)));
    b.synchronize();
    const auto t1 = Clock::now();
    store.zero_grads();
    model.backward();
    b.synchronize();
    const auto t2 = Clock::now();
    optimizer_step(it + 1);
    b.synchronize();
    const auto t3 = Clock::now();
    if (it < warmup) continue;
    fwd.push_back(ms_between(t0, t1));
    bwd.push_back(ms_between(t1, t2));
    opt.push_back(ms_between(t2, t3));
    step.push_back(ms_between(t0, t3));
  }
  const double st = median(step);
  std::printf("%-28s %-7s %-5s %7lld %10.3f %10.3f %10.3f %10.3f %12.0f", run.name.c_str(), b.name().c_str(),
              to_string(cfg.model.dtype), (long long)T, median(fwd), median(bwd), median(opt), st,
              double(T) / (st / 1000.0));
  if (b.peak_bytes() > 0) std::printf("  peak %.3f GB", double(b.peak_bytes()) / 1e9);
  std::printf("  init %.2f s\n", init_s);
  std::fflush(stdout);
  if (!opts.breakdown) return;
  Profiler prof(b);
  std::vector<StepProfile> steps;
  for (int64_t it = 0; it < opts.iters; ++it) {
    prof.begin_step();
    model.forward(tokens, targets, S, true, rng::derive(cfg.train.seed, 2000000 + uint64_t(it)));
    store.zero_grads();
    model.backward();
    optimizer_step(warmup + opts.iters + it + 1);
    steps.push_back(prof.end_step());
  }
  print_breakdown(steps);
}

// `moelab bench moe-layer`: the MoE layer alone on T = train.batch x train.seq tokens of width
// model.d_model: router, permute, experts, un-permute, forward and backward. Prints the step,
// the expert GEMMs' share and TFLOP/s (18 R D F FLOPs for R routed rows: 3 GEMMs of 2 R D F each
// way, 2 more backward), and this backend's dense GEMM peak measured in the same call.
void bench_moe_layer(const SweepRun& run, const BenchCliOptions& opts) {
  const RunConfig& cfg = run.config;
  auto backend = make_backend(cfg.train.backend);
  Backend& b = *backend;
  const DType dt = cfg.model.dtype;
  const LMConfig lm = lm_config(cfg);
  const int64_t S = cfg.train.seq, T = cfg.train.batch * S, D = lm.d_model;
  MoELayer layer(b, lm.moe, dt);
  layer.init(rng::derive(cfg.train.seed, 1), 1.0);
  const Tensor x = random_tensor(b, Shape{T, D}, dt, rng::derive(cfg.train.seed, 2));
  const Tensor dy = random_tensor(b, Shape{T, D}, dt, rng::derive(cfg.train.seed, 3));
  const Tensor dx = b.empty(Shape{T, D}, dt);
  int64_t routed = 0;
  auto one = [&](int64_t it) {
    layer.zero_grad(true);  // as the trainer's ParamStore: the routed experts' by their backward
    MoEOutput o = layer.forward(x, {true, S, rng::derive(cfg.train.seed, 100 + uint64_t(it))});
    layer.backward(dy, dx);
    routed = layer.last_layout().expert_offsets.back();
  };
  b.reset_peak_bytes();
  std::vector<double> fwd_bwd;
  for (int64_t it = 0; it < opts.warmup + opts.iters; ++it) {
    b.synchronize();
    const auto t0 = Clock::now();
    one(it);
    b.synchronize();
    if (it >= opts.warmup) fwd_bwd.push_back(ms_between(t0, Clock::now()));
  }
  std::vector<StepProfile> steps;
  std::vector<double> expert_ms;
  {
    Profiler prof(b);
    for (int64_t it = 0; it < opts.iters; ++it) {
      prof.begin_step();
      one(1000 + it);
      steps.push_back(prof.end_step());
      expert_ms.push_back(steps.back().gpu_ms["moe experts (grouped GEMMs, SwiGLU)"]);
    }
  }
  const double F = double(lm.moe.d_expert), flops = 18.0 * double(routed) * double(D) * F;
  const double step = median(fwd_bwd), ex = median(expert_ms);
  const double peak = gemm_peak_tflops(b, dt == DType::F64 ? DType::F64 : dt);
  std::printf("moe-layer %-18s %-5s tokens %lld d %lld experts %lld x %lld top-%lld: %.3f ms fwd+bwd "
              "(%.0f tokens/s), experts %.3f ms = %.1f TFLOP/s (%.0f%% of the %.1f TFLOP/s dense GEMM peak here)",
              b.name().c_str(), to_string(dt), (long long)T, (long long)D, (long long)lm.moe.experts,
              (long long)lm.moe.d_expert, (long long)lm.moe.top_k, step, double(T) / (step / 1000.0), ex,
              flops / (ex / 1000.0) / 1e12, 100.0 * flops / (ex / 1000.0) / 1e12 / peak, peak);
  if (b.peak_bytes() > 0) std::printf(", peak %.2f GB", double(b.peak_bytes()) / 1e9);
  std::printf("\n");
  if (opts.breakdown) print_breakdown(steps);
  std::fflush(stdout);
}

}  // namespace

int run_bench(const RunConfig& cfg_in, const BenchCliOptions& opts) {
  // Absurd sizes are refused before any run starts (core/preflight.h).
  for (const SweepRun& run : expand_grid(cfg_in)) preflight_check(run.config);
  if (opts.moe_layer) {
    for (const SweepRun& run : expand_grid(cfg_in)) {
      MOELAB_CHECK(run.config.parallel.world() == 1, "bench moe-layer: runs on one device (parallel.ep x parallel.dp = ",
                   run.config.parallel.world(), ")");
      bench_moe_layer(run, opts);
    }
    return 0;
  }
  std::printf("%-28s %-7s %-5s %7s %10s %10s %10s %10s %12s\n", "run", "backend", "dtype", "tokens",
              "fwd ms", "bwd ms", "adamw ms", "step ms", "tokens/s");
  for (const SweepRun& run : expand_grid(cfg_in)) {
    if (run.config.parallel.world() > 1) bench_parallel(run, opts);
    else bench_model(run, opts);
  }
  return 0;
}
