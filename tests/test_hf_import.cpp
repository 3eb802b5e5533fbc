// moelab tests: Hugging Face checkpoints (core/io/hf_convert.h) against transformers itself.
//
// tests/golden/hf_parity/<case>/ holds small random models of the four architectures that
// transformers 5.17 built and wrote in both expert layouts, with its logits, loss, router logits
// and aux loss for fixed token ids, in f64 and f32 (tests/reference/make_hf_golden.py; the
// README beside the files has the command). Here moelab imports each model and must reproduce
// them: max |difference| / RMS <= 1e-9 in f64 and <= 1e-4 in f32, no route flip in f64.
// MOELAB_HF_GOLDEN=DIR points the tests at freshly generated files instead.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>

#include "core/io/checkpoint.h"
#include "core/io/hf_convert.h"
#include "core/model.h"
#include "core/trainer.h"
#include "temp_dir.h"
#include "test_util.h"

using namespace moelab;
using namespace moelab::test;
namespace fs = std::filesystem;

namespace {

std::string golden_root() {
  if (const char* e = std::getenv("MOELAB_HF_GOLDEN")) return e;
  return std::string(MOELAB_GOLDEN_DIR) + "/hf_parity";
}

const std::vector<std::string> kCases = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"};
const std::vector<std::string> kLayouts = {"per_expert", "fused"};

std::vector<double> values(const Tensor& t) { return host_values(t); }

// max |a - b| / RMS(b).
double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0, ss = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::fabs(a[i] - b[i]));
    ss += b[i] * b[i];
  }
  return m / std::sqrt(ss / double(b.size()));
}

// The top-k expert set of each row of logits [T, E].
std::vector<std::vector<int>> topk_sets(const std::vector<double>& l, int64_t E, int64_t k) {
  std::vector<std::vector<int>> out;
  for (size_t r = 0; r * size_t(E) < l.size(); ++r) {
    std::vector<int> idx(static_cast<size_t>(E));
    for (int i = 0; i < int(E); ++i) idx[size_t(i)] = i;
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                      [&](int a, int b) { return l[r * size_t(E) + size_t(a)] > l[r * size_t(E) + size_t(b)]; });
    idx.resize(size_t(k));
    std::sort(idx.begin(), idx.end());
    out.push_back(idx);
  }
  return out;
}

struct Imported {
  HfConfig hf;
  RunConfig cfg;
  HfWeights w;
};

Imported import_dir(const std::string& dir, DType dt) {
  Imported m;
  m.hf = read_hf_config(dir);
  m.cfg = run_config_from_hf(m.hf);
  ShardedSafetensorsReader st(dir);
  m.w = read_hf_weights(st, m.hf, dt);
  return m;
}

struct Parity {
  double logits = 0, router = 0, aux = 0, ce = 0, hf_loss = 0;
  int64_t flips = 0, routes = 0;
};

// Loads `m` into a CPU model of dtype `dt` (after `tamper`, if given) and compares its forward
// with the golden outputs of precision `tag` ("f64" or "f32").
Parity parity(const Imported& m, DType dt, const std::string& golden, const std::string& tag,
              const std::function<void(TransformerLM&)>& tamper = {}) {
  Backend& b = cpu();
  TransformerLM lm(b, lm_config(m.cfg), dt);
  std::vector<ParamRef> params = lm.params();
  REQUIRE(params.size() == m.w.params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    INFO("parameter " << i << ": moelab " << params[i].name << ", imported " << m.w.params[i].first);
    REQUIRE(params[i].name == m.w.params[i].first);
    REQUIRE(params[i].value.shape() == m.w.params[i].second.shape());
    b.cast(m.w.params[i].second, params[i].value);
  }
  if (tamper) tamper(lm);
  SafetensorsReader g(golden);
  Tensor ids = g.to_tensor("input_ids", DType::I32), tg = g.to_tensor("targets", DType::I32);
  const int64_t B = g.info("input_ids").shape[0], S = g.info("input_ids").shape[1], T = B * S;
  LMForward out = lm.forward(ids.reshape(Shape{T}), tg.reshape(Shape{T}), S, false, 0);
  Parity p;
  const std::vector<double> got = values(lm.logits()), want = values(g.to_tensor("logits_" + tag, DType::F64));
  p.logits = rel_err(got, want);
  const int64_t E = m.hf.num_experts, K = m.hf.num_experts_per_tok;
  const std::vector<int> blocks = lm.moe_blocks();
  for (size_t j = 0; j < blocks.size(); ++j) {
    const std::string name = "router_logits_" + tag + "_" + std::to_string(blocks[j]);
    REQUIRE(g.has(name));
    const std::vector<double> rl = values(lm.moe_layer(j).last_routing().logits), rw = values(g.to_tensor(name, DType::F64));
    p.router = std::max(p.router, rel_err(rl, rw));
    const auto a = topk_sets(rl, E, K), c = topk_sets(rw, E, K);
    for (size_t t = 0; t < a.size(); ++t) p.flips += a[t] != c[t];
    p.routes += int64_t(a.size());
  }
  const double aux = values(g.to_tensor("aux_loss_" + tag, DType::F64))[0];
  p.aux = std::fabs(out.hf_aux - aux) / std::max(1.0, std::fabs(aux));
  const double ce = values(g.to_tensor("ce_all_" + tag, DType::F64))[0];
  p.ce = std::fabs(out.ce_loss - ce) / std::fabs(ce);
  // transformers' loss: cross-entropy of position s predicting token s+1 (S-1 per sequence),
  // plus router_aux_loss_coef * aux.
  double shifted = 0;
  const std::vector<int32_t> tok = b.to_vector<int32_t>(ids.reshape(Shape{T}));
  const int64_t V = m.hf.vocab_size;
  for (int64_t bb = 0; bb < B; ++bb)
    for (int64_t s = 0; s + 1 < S; ++s) {
      const double* row = got.data() + (bb * S + s) * V;
      double mx = row[0], z = 0;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, row[v]);
      for (int64_t v = 0; v < V; ++v) z += std::exp(row[v] - mx);
      shifted += mx + std::log(z) - row[tok[size_t(bb * S + s + 1)]];
    }
  shifted /= double(B * (S - 1));
  const double loss = values(g.to_tensor("loss_" + tag, DType::F64))[0];
  p.hf_loss = std::fabs(shifted + m.hf.router_aux_loss_coef * out.hf_aux - loss) / std::fabs(loss);
  return p;
}

void require_golden() {
  if (!fs::exists(golden_root() + "/mixtral/golden.safetensors"))
    FAIL("the golden files are missing: " << golden_root() << " (tests/reference/make_hf_golden.py makes them)");
}

}  // namespace

TEST_CASE("hf import: moelab reproduces transformers' logits, router logits, loss and aux loss "
          "(4 architectures x 2 expert layouts, f64 and f32)", "[hf][parity]") {
  require_golden();
  for (const std::string& c : kCases)
    for (const std::string& layout : kLayouts) {
      const std::string dir = golden_root() + "/" + c + "/" + layout, golden = golden_root() + "/" + c + "/golden.safetensors";
      for (DType dt : {DType::F64, DType::F32}) {
        const bool f64 = dt == DType::F64;
        INFO(c << " " << layout << " " << (f64 ? "f64" : "f32"));
        Imported m = import_dir(dir, dt);
        REQUIRE(to_string(m.w.layout) == layout);
        const Parity p = parity(m, dt, golden, f64 ? "f64" : "f32");
        const double tol = f64 ? 1e-9 : 1e-4;
        std::printf("hf parity %-9s %-10s %s: logits %.2e router %.2e aux %.2e ce %.2e hf-loss %.2e flips %lld/%lld\n",
                    c.c_str(), layout.c_str(), f64 ? "f64" : "f32", p.logits, p.router, p.aux, p.ce, p.hf_loss,
                    (long long)p.flips, (long long)p.routes);
        CHECK(p.logits <= tol);
        CHECK(p.router <= tol);
        CHECK(p.aux <= tol);
        CHECK(p.ce <= tol);
        CHECK(p.hf_loss <= tol);
        if (f64) CHECK(p.flips == 0);
        else CHECK(p.flips <= p.routes / 100);
      }
    }
}

TEST_CASE("hf import: a converter that loses one expert's weights fails the parity test", "[hf][parity]") {
  require_golden();
  for (const std::string& c : kCases) {
    INFO(c);
    Imported m = import_dir(golden_root() + "/" + c + "/per_expert", DType::F64);
    // Zero expert 1's gate/up projections in the first MoE block, as a broken converter would
    // leave them (uninitialised weights that nobody noticed).
    const Parity p = parity(m, DType::F64, golden_root() + "/" + c + "/golden.safetensors", "f64",
                            [](TransformerLM& lm) {
                              Tensor w1 = lm.moe_layer(0).params()[1].value;  // experts.w1 [E, D, 2F]
                              REQUIRE(lm.moe_layer(0).params()[1].name == "experts.w1");
                              cpu().fill(w1.view_rows(1, 2), 0.0);
                            });
    CHECK(p.logits > 1e-3);
  }
}

TEST_CASE("hf import/export: import then export reproduces every tensor bit for bit, in either layout",
          "[hf][roundtrip]") {
  require_golden();
  TempDir tmp("hf_roundtrip");
  for (const std::string& c : kCases)
    for (const std::string& from : kLayouts)
      for (const std::string& to : kLayouts) {
        INFO(c << ": " << from << " -> " << to);
        const Imported m = import_dir(golden_root() + "/" + c + "/" + from, DType::F32);
        std::map<std::string, Tensor> params(m.w.params.begin(), m.w.params.end());
        const std::string out = tmp.path(c + "_" + from + "_" + to);
        const HfConfig hf = hf_config_for(m.cfg, m.hf.arch);
        write_hf_checkpoint(out, hf, params, hf_expert_layout_from(to), m.w.source_dtypes, "F32", uint64_t(1) << 32,
                            false);
        SafetensorsReader want(golden_root() + "/" + c + "/" + to + "/model.safetensors");
        SafetensorsReader got(out + "/model.safetensors");
        auto wn = want.names(), gn = got.names();
        std::sort(wn.begin(), wn.end());
        std::sort(gn.begin(), gn.end());
        REQUIRE(gn == wn);
        for (const std::string& n : wn) {
          INFO(n);
          REQUIRE(got.info(n).dtype == want.info(n).dtype);
          REQUIRE(got.info(n).shape == want.info(n).shape);
          const auto a = got.bytes(n), bb = want.bytes(n);
          REQUIRE(std::memcmp(a.data(), bb.data(), a.size()) == 0);
        }
        // The config.json written describes the same model.
        const HfConfig back = read_hf_config(out);
        const RunConfig rc = run_config_from_hf(back);
        REQUIRE(to_ini(rc) == to_ini(m.cfg));
      }
}

TEST_CASE("hf import: a converted checkpoint goes through `moelab import-hf`'s checkpoint and back",
          "[hf][roundtrip]") {
  require_golden();
  // The CLI path: weights in a moelab checkpoint (f32 masters), then out again.
  TempDir tmp("hf_ck");
  const std::string src = golden_root() + "/qwen3_moe/per_expert";  // bf16 on disk
  const Imported m = import_dir(src, DType::F32);
  CheckpointWriter w;
  w.set_meta("config", to_ini(m.cfg));
  for (const auto& [n, t] : m.w.params) w.add_tensor(n, t);
  w.write(tmp.path("ck"));
  CheckpointReader r(tmp.path("ck"));
  std::map<std::string, Tensor> params;
  for (const std::string& n : r.names()) params[n] = r.tensor(n, r.tensor_shape(n), r.tensor_dtype(n));
  const RunConfig cfg = config_from_text(r.meta("config"));
  write_hf_checkpoint(tmp.path("out"), hf_config_for(cfg, HfArch::Qwen3Moe), params, HfExpertLayout::PerExpert,
                      m.w.source_dtypes, "F32", uint64_t(1) << 32, false);
  SafetensorsReader want(src + "/model.safetensors"), got(tmp.path("out") + "/model.safetensors");
  for (const std::string& n : want.names()) {
    INFO(n);
    REQUIRE(got.info(n).dtype == StDType::BF16);
    REQUIRE(std::memcmp(got.bytes(n).data(), want.bytes(n).data(), want.bytes(n).size()) == 0);
  }
  // Nothing is overwritten implicitly.
  REQUIRE_THROWS_WITH(write_hf_checkpoint(tmp.path("out"), hf_config_for(cfg, HfArch::Qwen3Moe), params,
                                          HfExpertLayout::PerExpert, m.w.source_dtypes, "F32", uint64_t(1) << 32, false),
                      has_substr("exists"));
}

TEST_CASE("hf import: refusals name the tensor (missing, extra, wrong shape, both layouts at once)", "[hf][errors]") {
  require_golden();
  TempDir tmp("hf_bad");
  const std::string src = golden_root() + "/olmoe/per_expert";
  const HfConfig hf = read_hf_config(src);
  SafetensorsReader in(src + "/model.safetensors");
  // Rewrites the model with `edit` applied to its tensor list, beside the original config.json.
  auto variant = [&](const std::string& name, const std::function<void(SafetensorsWriter&)>& edit,
                     const std::string& skip = "") {
    const std::string d = tmp.path(name);
    fs::create_directories(d);
    fs::copy_file(src + "/config.json", d + "/config.json");
    SafetensorsWriter w;
    for (const std::string& n : in.names()) {
      if (n == skip) continue;
      const SafetensorsTensorInfo& i = in.info(n);
      w.add(n, i.dtype, i.shape, in.bytes(n).data(), i.nbytes());
    }
    edit(w);
    w.write(d + "/model.safetensors");
    return d;
  };
  auto import_error = [&](const std::string& d) {
    return error_of([&] { ShardedSafetensorsReader st(d); read_hf_weights(st, read_hf_config(d), DType::F32); });
  };
  const std::string missing = "model.layers.1.mlp.experts.2.up_proj.weight";
  REQUIRE_THAT(import_error(variant("missing", [](SafetensorsWriter&) {}, missing)),
               has_substr("has no tensor '" + missing + "'"));
  std::vector<float> junk(4, 1.0f);
  REQUIRE_THAT(import_error(variant("extra", [&](SafetensorsWriter& w) {
                 w.add("model.layers.0.mlp.experts.9.up_proj.weight", StDType::F32, {2, 2}, junk.data(), 16);
               })),
               has_substr("does not have ('model.layers.0.mlp.experts.9.up_proj.weight')"));
  REQUIRE_THAT(import_error(variant("fused_too", [&](SafetensorsWriter& w) {
                 w.add("model.layers.0.mlp.experts.gate_up_proj", StDType::F32, {2, 2}, junk.data(), 16);
               })),
               has_substr("ambiguous"));
  // A gate of the wrong shape: the message names it and both shapes.
  const std::string gate = "model.layers.0.mlp.gate.weight";
  REQUIRE_THAT(import_error(variant("shape", [&](SafetensorsWriter& w) {
                 w.add(gate, StDType::F32, {1, 4}, junk.data(), 16);
               }, gate)),
               has_substr("tensor '" + gate + "' has shape [1, 4], but config.json implies [5, 24]"));
  (void)hf;
}

TEST_CASE("hf export: features the architecture does not have are refused by name", "[hf][errors]") {
  RunConfig c;
  c.model.layers = 2;
  c.model.moe_every = 1;
  c.moe.shared_experts = 1;
  finalize(c);
  REQUIRE_THROWS_WITH(hf_config_for(c, HfArch::Mixtral), has_substr("model.shared_experts > 0"));
  c.moe.shared_experts = 0;
  REQUIRE_THROWS_WITH(hf_config_for(c, HfArch::Qwen3Moe), has_substr("model.qk_norm = none"));
  REQUIRE_THROWS_WITH(hf_config_for(c, HfArch::Olmoe), has_substr("model.qk_norm = none"));
  REQUIRE_THROWS_WITH(hf_config_for(c, HfArch::Qwen2Moe), has_substr("gated shared expert"));
  c.moe.router.capacity_factor = 1.0;
  REQUIRE_THROWS_WITH(hf_config_for(c, HfArch::Mixtral), has_substr("router.capacity_factor"));
  c.moe.router.capacity_factor = 0;
  c.model.moe_every = 2;
  REQUIRE_THROWS_WITH(hf_config_for(c, HfArch::Mixtral), has_substr("dense blocks"));
  c.model.moe_every = 1;
  REQUIRE_NOTHROW(hf_config_for(c, HfArch::Mixtral));
  REQUIRE_THROWS_WITH(hf_arch_from("DeepseekV3ForCausalLM"), has_substr("is not one of MixtralForCausalLM"));
}

TEST_CASE("hf export: a moelab model written as each architecture imports back with the same weights and "
          "logits (both layouts)", "[hf][roundtrip]") {
  TempDir tmp("hf_native");
  struct Arch {
    HfArch arch;
    std::vector<std::string> sets;
  };
  const std::vector<Arch> archs = {
      {HfArch::Mixtral, {}},
      {HfArch::Qwen2Moe, {"model.layers=3", "model.dense_layers=1", "model.d_ff=20", "model.qkv_bias=true",
                          "model.shared_experts=1", "model.shared_width=12", "model.shared_gate=true",
                          "router.normalize=false", "model.tie_embeddings=true"}},
      {HfArch::Qwen3Moe, {"model.qk_norm=head", "model.head_dim=12", "model.top_k=1", "model.rope_theta=1000000"}},
      {HfArch::Olmoe, {"model.qk_norm=projection", "router.normalize=false", "model.norm_eps=1e-6"}},
  };
  for (const Arch& a : archs)
    for (HfExpertLayout layout : {HfExpertLayout::PerExpert, HfExpertLayout::Fused}) {
      INFO(to_string(a.arch) << " " << to_string(layout));
      std::vector<std::string> sets = {"model.layers=2", "model.d_model=16", "model.heads=2", "model.kv_heads=1",
                                       "model.experts=4", "model.top_k=2", "model.d_expert=8", "model.moe_every=1",
                                       "model.vocab=50", "model.tie_embeddings=false"};
      sets.insert(sets.end(), a.sets.begin(), a.sets.end());
      const RunConfig cfg = load_config("", sets);
      TransformerLM lm(cpu(), lm_config(cfg), DType::F32);
      lm.init(7);
      std::map<std::string, Tensor> params;
      uint64_t k = 100;
      for (ParamRef& p : lm.params()) {
        if (p.name.ends_with("_bias") || p.name.ends_with("_norm"))  // give them values to carry
          cpu().cast(randn(p.value.shape(), k++), p.value);
        params[p.name] = clone(p.value);
      }
      const std::string dir = tmp.path(std::string(to_string(a.arch)) + "_" + to_string(layout));
      write_hf_checkpoint(dir, hf_config_for(cfg, a.arch), params, layout, {}, "F32", uint64_t(1) << 32, false);
      const Imported m = import_dir(dir, DType::F32);
      REQUIRE(m.w.params.size() == params.size());
      for (const auto& [name, t] : m.w.params) {
        INFO(name);
        REQUIRE(params.count(name) == 1);
        REQUIRE(t.shape() == params[name].shape());
        REQUIRE(std::memcmp(t.data(), params[name].data(), t.nbytes()) == 0);
      }
      // The imported model computes the same logits (its config differs only in router keys
      // that do not change the forward: the aux convention and weight).
      TransformerLM back(cpu(), lm_config(m.cfg), DType::F32);
      std::vector<ParamRef> bp = back.params();
      for (size_t i = 0; i < bp.size(); ++i) cpu().copy(m.w.params[i].second, bp[i].value);
      std::vector<double> tk;
      for (int t = 0; t < 12; ++t) tk.push_back(double((t * 7 + 3) % 50));
      Tensor tokens = host_tensor(tk, Shape{12}, DType::I32);
      lm.forward(tokens, tokens, 6, false, 0);
      back.forward(tokens, tokens, 6, false, 0);
      REQUIRE(values(back.logits()) == values(lm.logits()));
    }
}
