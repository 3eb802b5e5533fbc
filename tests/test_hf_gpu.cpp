// moelab GPU tests: imported Hugging Face models (tests/golden/hf_parity, see test_hf_import.cpp)
// on the CUDA backend, f32 and bf16, against transformers' f64 logits and router logits, at
// `moelab crosscheck`'s NMSE thresholds (f32 1e-7, bf16 1e-2). Skips without a CUDA device.
#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "backends/registry.h"
#include "core/io/hf_convert.h"
#include "core/model.h"
#include "core/trainer.h"
#include "test_util.h"

using namespace moelab;
using namespace moelab::test;

namespace {

std::string hf_golden_root() {
  if (const char* e = std::getenv("MOELAB_HF_GOLDEN")) return e;
  return std::string(MOELAB_GOLDEN_DIR) + "/hf_parity";
}

// sum (a - b)^2 / sum b^2.
double nmse(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return num / den;
}

}  // namespace

TEST_CASE("gpu hf: imported models on CUDA (f32, bf16) match transformers' f64 logits at crosscheck's "
          "thresholds", "[gpu][hf]") {
  if (cuda_devices() < 1) {
    WARN("no CUDA device visible; skipped");
    return;
  }
  auto gpu = make_backend("cuda");
  for (const std::string c : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}) {
    const std::string dir = hf_golden_root() + "/" + c + "/per_expert";
    REQUIRE(std::filesystem::exists(dir));
    const HfConfig hf = read_hf_config(dir);
    const RunConfig cfg = run_config_from_hf(hf);
    ShardedSafetensorsReader st(dir);
    const HfWeights w = read_hf_weights(st, hf, DType::F32);
    SafetensorsReader g(hf_golden_root() + "/" + c + "/golden.safetensors");
    const std::vector<double> want = host_values(g.to_tensor("logits_f64", DType::F64));
    for (DType dt : {DType::F32, DType::BF16}) {
      INFO(c << " " << to_string(dt));
      TransformerLM lm(*gpu, lm_config(cfg), dt);
      std::vector<ParamRef> params = lm.params();
      REQUIRE(params.size() == w.params.size());
      for (size_t i = 0; i < params.size(); ++i) {
        REQUIRE(params[i].name == w.params[i].first);
        Tensor dev = gpu->from_host(w.params[i].second);
        gpu->cast(dev, params[i].value);
      }
      Tensor ids = gpu->from_host(g.to_tensor("input_ids", DType::I32));
      Tensor tg = gpu->from_host(g.to_tensor("targets", DType::I32));
      const int64_t S = g.info("input_ids").shape[1], T = ids.numel();
      lm.forward(ids.reshape(Shape{T}), tg.reshape(Shape{T}), S, false, 0);
      Tensor logits = gpu->empty(lm.logits().shape(), DType::F32);
      gpu->cast(lm.logits(), logits);
      const double e = nmse(host_values(gpu->to_host(logits)), want);
      double er = 0;
      const std::vector<int> blocks = lm.moe_blocks();
      for (size_t j = 0; j < blocks.size(); ++j) {
        const std::vector<double> rw =
            host_values(g.to_tensor("router_logits_f64_" + std::to_string(blocks[j]), DType::F64));
        er = std::max(er, nmse(host_values(gpu->to_host(lm.moe_layer(j).last_routing().logits)), rw));
      }
      std::printf("gpu hf parity %-9s %s: logits NMSE %.2e, router logits NMSE %.2e\n", c.c_str(), to_string(dt), e, er);
      const double thr = dt == DType::F32 ? 1e-7 : 1e-2;
      CHECK(e <= thr);
      CHECK(er <= thr);
    }
  }
}
