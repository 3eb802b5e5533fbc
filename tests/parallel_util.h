// moelab tests: helpers of the expert/data-parallel equivalence tests (CPU simulated ranks in
// test_parallel_train.cpp, GPUs over NCCL in test_parallel_gpu.cpp).
#pragma once
#include <cmath>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "backends/registry.h"
#include "catch_compat.h"
#include "core/io/config.h"
#include "core/trainer.h"
#include "temp_dir.h"

namespace moelab::test {

// A 2-block model with 8 experts of width 8, a global batch of 16 sequences of 8 tokens, one
// step, the global aux and z losses; `extra` overrides (backend, dtype, layout, router).
inline RunConfig config(const TempDir& tmp, const std::string& name, std::vector<std::string> extra) {
  std::vector<std::string> sets = {
      "model.layers=2", "model.d_model=16", "model.heads=2", "model.experts=8", "model.top_k=2",
      "model.d_expert=8", "model.moe_every=1", "train.batch=16", "train.seq=8", "train.steps=1",
      "train.lr=0.01", "train.warmup=1", "log.eval_every=0", "log.flush_every=1",
      "router.aux_alpha=0.01", "router.z_loss=0.001", "log.out=" + tmp.path(name + ".h5")};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return load_config("", sets);
}

inline bool is_expert(const std::string& n) { return n.find(".moe.experts.") != std::string::npos; }

// Whole gradients of step 1: replicated tensors from rank 0, expert tensors assembled from the
// shards of the ep ranks of dp group 0 (rank = dp_index * ep + ep_index).
inline std::map<std::string, std::vector<double>> step_gradients(const RunConfig& cfg, int64_t experts,
                                                          TrainResult* result = nullptr) {
  std::map<std::string, std::vector<double>> whole;
  std::mutex mu;
  TrainOptions o;
  o.quiet = true;
  o.overwrite = true;
  o.on_gradients = [&](const StepView& v) {
    const int rank = v.rank, ep = v.ep;
    if (v.step != 1) return;
    std::lock_guard<std::mutex> lock(mu);
    for (ParamRef& p : v.params) {
      const std::vector<double> g = host_values(v.backend.to_host(p.grad));
      if (is_expert(p.name)) {
        CHECK(p.value.dim(0) == experts / ep);  // only this rank's experts
        if (rank >= ep) continue;
        auto& dst = whole[p.name];
        dst.resize(g.size() * size_t(ep));
        std::copy(g.begin(), g.end(), dst.begin() + rank * int64_t(g.size()));
      } else if (rank == 0) {
        whole[p.name] = g;
      }
    }
  };
  TrainResult r = train(cfg, o);
  if (result) *result = r;
  return whole;
}

inline double rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double rms = 0, worst = 0;
  for (double x : b) rms += x * x;
  rms = std::sqrt(rms / double(b.size()));
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return rms > 0 ? worst / rms : worst;
}

}  // namespace moelab::test
