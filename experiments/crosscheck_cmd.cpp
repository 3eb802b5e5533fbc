// moelab: `moelab crosscheck` -- the same weights and batch through the whole model on the CPU
// reference (f64) and on the CUDA backend (f32, then bf16): every named activation in forward
// order, the losses, then every parameter gradient, compared by max abs error, max error
// relative to the reference's largest magnitude, and NMSE = sum (a-b)^2 / sum b^2.
//
// Routing decisions are compared assignment by assignment. A "flip" (a token whose set of kept
// experts differs) is expected where the reference's selection scores nearly tie, and is a bug
// where the margin is wide; flips are listed with their margins, and every activation row of a
// flipped token and of the later tokens of its sequence (attention carries the difference
// forward) is left out of the comparison from the flip's layer on. Exits 1 beyond tolerance.
#include <H5Cpp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>

#include "backends/registry.h"
#include "core/io/data.h"
#include "core/io/output_file.h"
#include "core/rng.h"
#include "core/trainer.h"
#include "experiments/commands.h"

using namespace moelab;

namespace {

struct Tolerance {
  DType dtype;
  double activation_nmse, gradient_nmse, margin;
  const char* reason;
};

// NMSE thresholds. A real bug (wrong index, missing term, wrong scale) gives NMSE of order
// 1e-2 .. 1; rounding gives NMSE ~ (unit roundoff)^2 times the growth through the network.
// f32: u = 6e-8; after ~30 ops and reductions of up to 2048 terms the measured NMSE on the
//   H200 is <= 6e-13 for activations and <= 1e-12 for gradients (docs/gpu-results.md); 1e-7
//   leaves room for other shapes. A flip margin below 1e-4 (score units) is within f32 noise.
// bf16: u = 3.9e-3 per stored value, NMSE per op ~1e-5, compounding over the blocks; measured
//   <= 1.3e-4 on activations (6e-3 with Sinkhorn, whose balancing amplifies logit errors) and
//   <= 2.6e-4 on gradients without flips. Flips with margins below 2e-2 are expected in bf16.
const Tolerance kTolerances[] = {
    {DType::F32, 1e-7, 1e-7, 1e-4, "f32: unit roundoff 6e-8, ~30 ops deep"},
    {DType::BF16, 1e-2, 5e-2, 2e-2, "bf16: unit roundoff 3.9e-3 per stored value, fp32 accumulation"},
};

struct Comparison {
  std::string name, kind;  // kind: activation | loss | gradient
  double max_abs = 0, max_rel = 0, nmse = 0, threshold = 0;
  int64_t rows_excluded = 0;
  bool checked = true, passed = true;
};

struct Flip {
  int layer;
  int64_t token;
  double margin;
  bool expected;     // near tie, or a consequence of an earlier flip (see classify_flips)
  const char* why = "";
};

// A flip is expected when its own selection margin is a near tie, or when it is downstream of an
// expected flip: the same sequence at a later (or the same) position in a later layer
// (attention carries the difference forward), or, with expert capacity, a later token of the
// same layer (a changed count shifts which later assignments fit). Anything else is a bug.
// ordered_layers: capacity with drop policy 'position' (a changed count moves later tokens);
// coupled_layers: capacity with 'probs' (each expert keeps its C largest gates) and Sinkhorn
// (the balancing couples every token): a flip anywhere in the layer can move any other.
void classify_flips(std::vector<Flip>& flips, int64_t seq_len, const std::set<int>& ordered_layers,
                    const std::set<int>& coupled_layers, double tol_margin) {
  std::sort(flips.begin(), flips.end(), [](const Flip& a, const Flip& b) {
    return a.layer != b.layer ? a.layer < b.layer : a.token < b.token;
  });
  for (Flip& f : flips) {
    f.expected = f.margin < tol_margin;
    f.why = f.expected ? "near tie" : "WIDE: a bug";
  }
  // Propagate until nothing changes.
  for (bool changed = true; changed;) {
    changed = false;
    for (Flip& f : flips) {
      if (f.expected) continue;
      for (const Flip& e : flips) {
        if (!e.expected || &e == &f) continue;
        if (e.layer < f.layer && e.token / seq_len == f.token / seq_len && e.token <= f.token) {
          f.why = "downstream of an earlier layer's flip";
        } else if (e.layer == f.layer && ((ordered_layers.count(f.layer) && e.token < f.token) ||
                                           coupled_layers.count(f.layer))) {
          f.why = "capacity or balancing shifted by another flip";
        } else {
          continue;
        }
        f.expected = changed = true;
        break;
      }
    }
  }
}

// ref, test: host values of the same shape; rows_ok (size = first dim, may be empty): rows to use.
Comparison compare(const std::string& name, const std::string& kind, const std::vector<double>& ref,
                   const std::vector<double>& test, int64_t rows, const std::vector<char>& rows_ok) {
  Comparison c{name, kind};
  const int64_t per_row = rows > 0 ? int64_t(ref.size()) / rows : int64_t(ref.size());
  double num = 0, den = 0, ref_max = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const int64_t r = per_row ? int64_t(i) / per_row : 0;
    if (!rows_ok.empty() && !rows_ok[r]) continue;
    const double d = test[i] - ref[i];
    if (!std::isfinite(test[i])) num = INFINITY;  // NaN or Inf never passes
    num += d * d;
    den += ref[i] * ref[i];
    c.max_abs = std::max(c.max_abs, std::abs(d));
    ref_max = std::max(ref_max, std::abs(ref[i]));
  }
  if (!rows_ok.empty())
    for (char ok : rows_ok) c.rows_excluded += !ok;
  c.nmse = den > 0 ? num / den : (num > 0 ? INFINITY : 0.0);
  if (std::isnan(c.nmse)) c.nmse = INFINITY;
  c.max_rel = ref_max > 0 ? c.max_abs / ref_max : c.max_abs;
  return c;
}

// Tokens (token choice) whose kept expert set differs, with the reference's selection margin:
// the gap between the K-th and (K+1)-th largest of the selection scores (scores + bias).
void find_flips(int layer, const RouterState& ref, const RouterState& test, Backend& cpu, Backend& gpu,
                const Tensor& bias, double top2_tau, const RouterConfig* sinkhorn,
                std::vector<Flip>& flips) {
  auto ri = host_values(cpu.to_host(ref.idx)), rk = host_values(cpu.to_host(ref.keep));
  auto ti = host_values(gpu.to_host(test.idx)), tk = host_values(gpu.to_host(test.keep));
  auto sc = host_values(cpu.to_host(ref.scores));
  if (sinkhorn) {  // selection was on the Sinkhorn matrix: margins there, each row scaled to sum 1
    Tensor bal = cpu.empty(ref.logits.shape(), ref.logits.dtype());
    cpu.sinkhorn(ref.logits, sinkhorn->sinkhorn_tol, sinkhorn->sinkhorn_max_iters, bal);
    sc = host_values(cpu.to_host(bal));
    const int64_t Tn = ref.logits.dim(0), En = ref.logits.dim(1);
    for (int64_t t = 0; t < Tn; ++t) {
      double z = 0;
      for (int64_t e = 0; e < En; ++e) z += sc[t * En + e];
      for (int64_t e = 0; e < En; ++e) sc[t * En + e] /= z;
    }
  }
  std::vector<double> b = bias.defined() ? host_values(cpu.to_host(bias)) : std::vector<double>{};
  const int64_t n0 = ref.idx.dim(0), n1 = ref.idx.dim(1), E = ref.scores.dim(1), T = ref.scores.dim(0);
  if (!ref.expert_choice) {
    for (int64_t t = 0; t < n0; ++t) {
      std::set<std::pair<int, int>> a, c;
      for (int64_t j = 0; j < n1; ++j) {
        a.insert({int(ri[t * n1 + j]), int(rk[t * n1 + j])});
        c.insert({int(ti[t * n1 + j]), int(tk[t * n1 + j])});
      }
      if (a == c) continue;
      // Same experts, only the random top-2 keep differs: the margin is the draw's distance to
      // the keep probability (router.cpp: u(seed, t) < min(1, g2 / tau)).
      bool same_experts = true;
      for (int64_t j = 0; j < n1; ++j) same_experts = same_experts && ri[t * n1 + j] == ti[t * n1 + j];
      if (same_experts && top2_tau > 0) {
        auto g = host_values(cpu.to_host(ref.gates));
        const double g2n = g[t * 2 + 1] / (g[t * 2] + g[t * 2 + 1]);
        const double u = rng::uniform(rng::derive(ref.seed, 3), uint64_t(t));
        flips.push_back({layer, t, std::abs(u - std::min(1.0, g2n / top2_tau)), false});
        continue;
      }
      std::vector<double> v(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) v[e] = sc[t * E + e] + (b.empty() ? 0.0 : b[e]);
      std::sort(v.begin(), v.end(), std::greater<>());
      const double margin = n1 < E ? v[n1 - 1] - v[n1] : 0.0;
      flips.push_back({layer, t, margin, false});
    }
    return;
  }
  // Expert choice: per expert the chosen token sets; a token in the symmetric difference flips.
  for (int64_t e = 0; e < n0; ++e) {
    std::set<int64_t> a, c;
    for (int64_t j = 0; j < n1; ++j) {
      a.insert(int64_t(ri[e * n1 + j]));
      c.insert(int64_t(ti[e * n1 + j]));
    }
    if (a == c) continue;
    std::vector<double> col(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) col[t] = sc[t * E + e];
    std::sort(col.begin(), col.end(), std::greater<>());
    const double margin = n1 < T ? col[n1 - 1] - col[n1] : 0.0;
    for (int64_t t : a)
      if (!c.count(t)) flips.push_back({layer, t, margin, false});
    for (int64_t t : c)
      if (!a.count(t)) flips.push_back({layer, t, margin, false});
  }
}

void write_h5(const std::string& path, const std::string& config, const std::string& dtype,
              const std::vector<Comparison>& cs, const std::vector<Flip>& flips, bool passed) {
  namespace fs = std::filesystem;
  if (fs::path(path).has_parent_path()) fs::create_directories(fs::path(path).parent_path());
  const bool exists = fs::exists(path);
  H5::H5File f(path, exists ? H5F_ACC_RDWR : H5F_ACC_TRUNC);
  H5::StrType str(H5::PredType::C_S1, H5T_VARIABLE);
  H5::DataSpace scalar(H5S_SCALAR);
  if (!exists) f.createAttribute("config", str, scalar).write(str, config);
  if (f.nameExists(dtype)) f.unlink(dtype);
  H5::Group g = f.createGroup(dtype);
  const int passed_flag = passed;
  g.createAttribute("passed", H5::PredType::NATIVE_INT, scalar).write(H5::PredType::NATIVE_INT, &passed_flag);
  auto put = [&](const char* n, const std::vector<double>& v) {
    hsize_t dims[1] = {v.size()};
    g.createDataSet(n, H5::PredType::NATIVE_DOUBLE, H5::DataSpace(1, dims)).write(v.data(), H5::PredType::NATIVE_DOUBLE);
  };
  std::vector<const char*> names;
  std::vector<double> max_abs, max_rel, nmse, thr, ok;
  for (const Comparison& c : cs) {
    names.push_back(c.name.c_str());
    max_abs.push_back(c.max_abs);
    max_rel.push_back(c.max_rel);
    nmse.push_back(c.nmse);
    thr.push_back(c.threshold);
    ok.push_back(c.checked ? double(c.passed) : -1.0);
  }
  hsize_t n[1] = {names.size()};
  g.createDataSet("tensor", str, H5::DataSpace(1, n)).write(names.data(), str);
  put("max_abs", max_abs);
  put("max_rel", max_rel);
  put("nmse", nmse);
  put("threshold", thr);
  put("passed", ok);  // 1 passed, 0 failed, -1 reported only
  std::vector<double> fl, ft, fm, fe;
  for (const Flip& x : flips) {
    fl.push_back(x.layer);
    ft.push_back(double(x.token));
    fm.push_back(x.margin);
    fe.push_back(x.expected);
  }
  put("flip_layer", fl);
  put("flip_token", ft);
  put("flip_margin", fm);
  put("flip_expected", fe);
}

}  // namespace

int run_crosscheck(const RunConfig& cfg, const CrosscheckCliOptions& opts) {
  MOELAB_CHECK(backend_available("cuda"), "crosscheck needs the CUDA backend and a visible device");
  preflight_check(cfg);  // absurd sizes are refused before anything is allocated
  check_data_vocab(cfg);
  // The findings go to OUT.tmp, renamed over OUT at the end: an existing OUT (refused without
  // --overwrite) is never touched by a crosscheck that fails halfway.
  const std::string target = resolve_output_target(opts.out, "crosscheck --out");
  if (std::filesystem::exists(target) && !opts.overwrite)
    MOELAB_USAGE_FAIL("crosscheck --out ", opts.out, " exists; pass --overwrite to replace it or choose another --out");
  const std::string tmp_out = target + ".tmp";
  std::filesystem::remove(tmp_out);
  auto cpu = make_backend("cpu");
  auto gpu = make_backend("cuda");
  const TrainConfig& tc = cfg.train;
  const uint64_t seed = tc.seed;
  const LMConfig lm = lm_config(cfg);
  auto data = make_data_source(cfg.data, tc.batch, tc.seq, seed, 1);
  Batch batch;
  data->next_train(batch);
  const int64_t S = tc.seq, T = tc.batch * tc.seq;
  std::vector<double> in(static_cast<size_t>(T)), tg(static_cast<size_t>(T));
  for (int64_t r = 0; r < tc.batch; ++r)
    for (int64_t s = 0; s < S; ++s) {
      in[r * S + s] = batch.tokens[r * (S + 1) + s];
      tg[r * S + s] = batch.tokens[r * (S + 1) + s + 1];
    }
  // The trainer's first step: the same init stream and the same per-step draws.
  const uint64_t init_seed = rng::derive(seed, 1), step_seed = rng::derive(seed, 1000000 + 1);

  auto run_model = [&](Backend& b, DType dt, LMForward& fwd) {
    auto m = std::make_unique<TransformerLM>(b, lm, dt);
    m->init(init_seed);
    Tensor ti = b.from_host(host_tensor(in, Shape{T}, DType::I32));
    Tensor tt = b.from_host(host_tensor(tg, Shape{T}, DType::I32));
    fwd = m->forward(ti, tt, S, true, step_seed);
    m->zero_grad();
    m->backward();
    return m;
  };
  LMForward ref_fwd;
  auto ref = run_model(*cpu, DType::F64, ref_fwd);
  auto ref_acts = ref->activations();
  auto ref_params = ref->params();
  const std::vector<int> moe_blocks = ref->moe_blocks();

  bool all_passed = true;
  std::printf("moelab crosscheck: %lld tokens, %lld layers (%zu MoE), reference cpu f64\n",
              (long long)T, (long long)lm.layers, moe_blocks.size());
  for (const Tolerance& tol : kTolerances) {
    if (!gpu->supports(Op::AttentionForward, tol.dtype)) continue;
    LMForward fwd;
    auto test = run_model(*gpu, tol.dtype, fwd);
    auto acts = test->activations();
    auto params = test->params();

    std::vector<Flip> flips;
    std::set<int> ordered_layers, coupled_layers;
    for (size_t l = 0; l < moe_blocks.size(); ++l) {
      MoELayer& rl = ref->moe_layer(l);
      find_flips(moe_blocks[l], rl.last_routing(), test->moe_layer(l).last_routing(), *cpu, *gpu,
                 lm.moe.router.bias_update_rate > 0 ? rl.router().params().bias : Tensor(),
                 lm.moe.router.policy == RoutingPolicy::RandomTop2 ? lm.moe.router.random_top2_threshold : 0.0,
                 lm.moe.router.policy == RoutingPolicy::Sinkhorn ? &lm.moe.router : nullptr, flips);
      const RouterState& rs = rl.last_routing();
      const bool capacity = rs.capacity > 0 && !rs.expert_choice;
      if (lm.moe.router.policy == RoutingPolicy::Sinkhorn || (capacity && lm.moe.router.drop_policy == DropPolicy::Probs))
        coupled_layers.insert(moe_blocks[l]);
      else if (capacity)
        ordered_layers.insert(moe_blocks[l]);
    }
    classify_flips(flips, S, ordered_layers, coupled_layers, tol.margin);
    // Rows excluded from the first flipped layer on: each flipped token and the rest of its sequence.
    std::vector<char> rows_ok(static_cast<size_t>(T), 1);
    int first_flip_layer = 1 << 30;
    for (const Flip& f : flips) {
      first_flip_layer = std::min(first_flip_layer, f.layer);
      for (int64_t t = f.token; t < (f.token / S + 1) * S; ++t) rows_ok[t] = 0;
    }

    std::vector<Comparison> cs;
    for (size_t i = 0; i < acts.size(); ++i) {
      const std::string& name = acts[i].first;
      const int block = name.rfind("block", 0) == 0 ? std::atoi(name.c_str() + 5) : 1 << 29;
      const Tensor& rt = ref_acts[i].second;
      const bool per_token = rt.dim(0) == T;
      const bool masked = !flips.empty() && block >= first_flip_layer && per_token;
      Comparison c = compare(name, "activation", host_values(cpu->to_host(rt)),
                             host_values(gpu->to_host(acts[i].second)), rt.dim(0),
                             masked ? rows_ok : std::vector<char>{});
      c.threshold = tol.activation_nmse;
      // Tensors that are not per token (expert-choice gates) cannot drop rows: report only.
      c.checked = flips.empty() || block < first_flip_layer || per_token;
      c.passed = !c.checked || c.nmse <= c.threshold;
      cs.push_back(c);
    }
    for (auto [name, a, b] : {std::tuple{"loss.ce", ref_fwd.ce_loss, fwd.ce_loss},
                              std::tuple{"loss.router", ref_fwd.router_loss, fwd.router_loss}}) {
      Comparison c = compare(name, "loss", {a}, {b}, 0, {});
      c.threshold = tol.activation_nmse;
      c.checked = flips.empty();
      c.passed = !c.checked || c.nmse <= c.threshold;
      cs.push_back(c);
    }
    for (size_t i = 0; i < params.size(); ++i) {
      Comparison c = compare("d" + params[i].name, "gradient", host_values(cpu->to_host(ref_params[i].grad)),
                             host_values(gpu->to_host(params[i].grad)), 0, {});
      c.threshold = tol.gradient_nmse;
      c.checked = flips.empty();  // a flip changes every gradient downstream of it
      c.passed = !c.checked || c.nmse <= c.threshold;
      cs.push_back(c);
    }

    int wide = 0, failed = 0;
    for (const Flip& f : flips) wide += !f.expected;
    std::printf("\n== cuda %s vs cpu f64 (%s)\n", to_string(tol.dtype), tol.reason);
    std::printf("%-28s %-10s %11s %11s %11s %9s %s\n", "tensor", "kind", "max abs", "max rel", "NMSE",
                "limit", "");
    for (const Comparison& c : cs) {
      failed += !c.passed;
      std::printf("%-28s %-10s %11.3e %11.3e %11.3e %9.0e %s%s\n", c.name.c_str(), c.kind.c_str(), c.max_abs,
                  c.max_rel, c.nmse, c.threshold, !c.checked ? "reported" : c.passed ? "ok" : "FAIL",
                  c.rows_excluded ? (" (" + std::to_string(c.rows_excluded) + " rows excluded)").c_str() : "");
    }
    std::printf("route flips: %zu (%d unexplained: margin >= %.0e and not downstream of a near tie)\n",
                flips.size(), wide, tol.margin);
    int shown = 0;
    for (int pass = 0; pass < 2; ++pass)  // unexplained flips first, then up to 10 in all
      for (const Flip& f : flips)
        if ((pass == 0) != f.expected && (pass == 0 || shown < 10)) {
          std::printf("  layer %d token %lld margin %.3e (%s)\n", f.layer, (long long)f.token, f.margin, f.why);
          ++shown;
        }
    const bool passed = failed == 0 && wide == 0;
    std::printf("%s %s: %d of %zu comparisons beyond tolerance, %d wide flips\n", passed ? "PASS" : "FAIL",
                to_string(tol.dtype), failed, cs.size(), wide);
    all_passed = all_passed && passed;
    write_h5(tmp_out, to_ini(cfg), to_string(tol.dtype), cs, flips, passed);
  }
  if (std::rename(tmp_out.c_str(), target.c_str()) != 0)
    MOELAB_FAIL("crosscheck: cannot rename ", tmp_out, " over ", target);
  std::printf("\nfindings: %s\n", opts.out.c_str());
  return all_passed ? 0 : 1;
}
