// moelab tests: CPU results do not depend on the number of OpenMP threads (issue 13 item 6).
// The same run with 1, 2 and 3 threads must give the same losses, validation losses, parameters
// and gradients at every step, bit for bit. The model is sized so that its GEMMs are large
// enough for a parallel GEMM to split them (T = 512 tokens: Eigen's own OpenMP GEMM chose
// another depth blocking for 2 threads than for 1 here, and the losses differed in the last
// bits), with several experts per MoE layer and several attention heads (the backend's own
// parallel loops). Three threads on a two-core machine oversubscribe it; that is fine.
#include <cstring>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "backends/registry.h"
#include "catch_compat.h"
#include "core/trainer.h"
#include "temp_dir.h"
#include "train_util.h"

using namespace moelab;
using moelab::test::TempDir;

namespace {

// Every step's parameters and gradients as raw bytes (before that step's update), in the
// model's parameter order, plus the run's losses.
struct Trace {
  TrainResult result;
  std::vector<std::vector<unsigned char>> bytes;  // [step] concatenated values and gradients
};

void append_bytes(Backend& b, const Tensor& t, std::vector<unsigned char>& out) {
  const Tensor h = b.to_host(t);
  const auto* p = static_cast<const unsigned char*>(h.data());
  out.insert(out.end(), p, p + h.nbytes());
}

Trace run_with_threads(int threads, const TempDir& tmp, const std::vector<std::string>& extra) {
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  std::vector<std::string> sets = {
      "model.layers=2", "model.d_model=64", "model.heads=4", "model.experts=8", "model.top_k=2",
      "model.d_expert=128", "model.moe_every=1", "train.batch=8", "train.seq=64", "train.steps=3",
      "train.lr=0.003", "train.warmup=1", "router.aux_alpha=0.01", "router.z_loss=0.001",
      "log.eval_every=3", "log.eval_batches=1",
      "log.out=" + tmp.path("t" + std::to_string(threads) + ".h5")};
  sets.insert(sets.end(), extra.begin(), extra.end());
  Trace tr;
  TrainOptions o = moelab::test::quiet_options();
  o.overwrite = true;
  o.on_gradients = [&](const StepView& v) {
    std::vector<unsigned char> all;
    for (const ParamRef& p : v.params) {
      append_bytes(v.backend, p.value, all);
      append_bytes(v.backend, p.grad, all);
    }
    tr.bytes.push_back(std::move(all));
  };
  tr.result = train(load_config("", sets), o);
#ifdef _OPENMP
  omp_set_num_threads(omp_get_num_procs());
#endif
  return tr;
}

}  // namespace

TEST_CASE("threads: 1, 2 and 3 OpenMP threads give bit-identical losses, weights and gradients", "[train][determinism][threads]") {
#ifndef _OPENMP
  WARN("built without OpenMP: every run is single-threaded, nothing to compare");
#endif
  for (const std::string dtype : {"f64", "f32"}) {
    for (const std::vector<std::string>& extra :
         std::vector<std::vector<std::string>>{{}, {"model.heads=8", "model.kv_heads=2", "router.capacity_factor=1.25"}}) {
      INFO("model.dtype = " << dtype << (extra.empty() ? "" : ", GQA and capacity"));
      TempDir tmp("threads");
      std::vector<std::string> sets = extra;
      sets.push_back("model.dtype=" + dtype);
      const Trace one = run_with_threads(1, tmp, sets);
      REQUIRE(one.result.losses.size() == 3);
      REQUIRE(one.bytes.size() == 3);
      for (int threads : {2, 3}) {
        INFO(threads << " threads against 1");
        const Trace other = run_with_threads(threads, tmp, sets);
        CHECK(other.result.losses == one.result.losses);  // exact
        CHECK(other.result.eval_losses == one.result.eval_losses);
        REQUIRE(other.bytes.size() == one.bytes.size());
        for (size_t s = 0; s < one.bytes.size(); ++s) {
          INFO("step " << s + 1 << ": parameters and gradients");
          REQUIRE(other.bytes[s].size() == one.bytes[s].size());
          CHECK(std::memcmp(other.bytes[s].data(), one.bytes[s].data(), one.bytes[s].size()) == 0);
        }
      }
    }
  }
}
