// moelab tests: the INI config layer (core/io/config.h) and MoEConfig::validate().
//
// Errors are checked by message content because the message is the user interface: it must
// name the key, the bad value and what is accepted. Temporary INI files go to
// temp_directory_path()/moelab_test_config_<pid>/ and are removed at the end of each test.
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "temp_dir.h"
#include "test_util.h"
#include "catch_compat.h"
#include "core/check.h"
#include "core/io/config.h"

namespace fs = std::filesystem;
using namespace moelab;
using moelab::test::TempDir;
using moelab::test::error_of;

namespace {


bool has(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// One non-default value for every key, consistent with the cross-key rules.
const std::vector<std::string> kEveryKeyChanged = {
    "model.layers=3", "model.d_model=96", "model.heads=6", "model.kv_heads=2",
    "model.experts=16", "model.top_k=2", "model.d_ff=24", "model.d_expert=48", "model.moe_every=1",
    "model.shared_experts=2", "model.shared_gate=true", "model.expert_dropout=0.25",
    "model.vocab=300", "model.tie_embeddings=false", "model.init_scale=0.1", "model.dtype=f64",
    "model.head_dim=8", "model.qkv_bias=true", "model.qk_norm=head", "model.dense_layers=0, 2",
    "model.rope_theta=500000", "model.norm_eps=1e-6", "model.shared_width=40",
    "router.score=sigmoid", "router.normalize=false", "router.score_scale=2.5",
    "router.policy=random_top2", "router.random_top2_threshold=0.25", "router.noise=gaussian",
    "router.noise_eps=0.02", "router.aux_alpha=0.01", "router.aux_loss_type=sequence",
    "router.z_loss=0.001", "router.importance_weight=0.1", "router.load_weight=0.2",
    "router.capacity_factor=1.25", "router.drop_policy=probs", "router.pad_to_capacity=true",
    "router.bias_update_rate=0.001", "router.sinkhorn_max_iters=50", "router.sinkhorn_tol=1e-6",
    "train.steps=7", "train.batch=3", "train.seq=17", "train.lr=0.1234567890123",
    "train.warmup=2", "train.seed=18446744073709551615", "train.weight_decay=0",
    "train.grad_clip=0.5", "train.beta1=0.8", "train.beta2=0.999", "train.min_lr_ratio=0",
    "train.backend=cuda", "train.init_from=ck/pre/step_000100.ckpt", "train.recompute=all", "data.source=brown",
    "data.path=my data/brown", "data.tokenizer=my data/tok.json", "data.genres=a-c, k",
    "data.synthetic_sources=3", "data.synthetic_alphabet=5", "data.val_fraction=0.2",
    "log.every=2", "log.eval_every=0", "log.eval_batches=8", "log.checkpoint_every=5",
    "log.checkpoint_dir=ck/x", "log.out=o/r.h5", "log.flush_every=3"};

}  // namespace

TEST_CASE("config: defaults without a file", "[config]") {
  RunConfig c = load_config("");
  CHECK(c.model.layers == 2);
  CHECK(c.model.heads == 4);
  CHECK(c.model.kv_heads == 4);  // 0 resolves to heads
  CHECK(c.model.moe_every == 2);
  CHECK(c.model.vocab == 256);
  CHECK(c.model.dtype == DType::F32);
  CHECK(c.moe.d_model == 64);
  CHECK(c.moe.experts == 8);
  CHECK(c.moe.top_k == 2);
  CHECK(c.moe.d_expert == 128);
  CHECK(c.moe.router.policy == RoutingPolicy::TopK);
  CHECK(c.moe.router.score == ScoreFunc::Softmax);
  CHECK(c.moe.router.capacity_factor == 0.0);
  CHECK(c.train.backend == "cpu");
  CHECK(c.data.path == "data/brown");
  CHECK(c.data.synthetic_sources == 4);
  CHECK(c.data.synthetic_alphabet == 16);
  CHECK(c.sweep.empty());
  // The struct defaults of config.h are the INI defaults (one source of truth).
  RunConfig plain;
  plain.model.kv_heads = plain.model.heads;
  CHECK(to_ini(c) == to_ini(plain));
}

TEST_CASE("config: every DESIGN.md key exists", "[config]") {
  std::set<std::string> keys;
  for (const ConfigKey& k : config_keys()) keys.insert(k.key);
  for (const char* k :
       {"model.layers", "model.d_model", "model.heads", "model.experts", "model.top_k",
        "model.d_expert", "model.moe_every", "model.shared_experts", "router.score",
        "router.normalize", "router.policy", "router.noise", "router.noise_eps",
        "router.aux_alpha", "router.z_loss", "router.capacity_factor", "router.drop_policy",
        "router.bias_update_rate", "train.steps", "train.batch", "train.seq", "train.lr",
        "train.warmup", "train.seed", "data.source", "log.every", "log.eval_every",
        "log.checkpoint_every", "log.checkpoint_dir"}) {
    INFO(k);
    CHECK(keys.count(k) == 1);
  }
  CHECK(keys.size() == config_keys().size());  // no key registered twice
}

TEST_CASE("config: file parse with comments in every section", "[config]") {
  TempDir tmp;
  std::string path = tmp.write("parse.ini",
                               "# a comment\n"
                               "[model]\nlayers = 4\nd_model=128 # inline comment\nheads = 8\n"
                               "kv_heads = 2\nexperts = 16\ntop_k = 1\n"
                               "[router]\nscore = sigmoid\nnormalize = false\npolicy = sinkhorn\n"
                               "noise = gaussian\nnoise_eps = 0.5\ncapacity_factor = 1.25\n"
                               "drop_policy = probs\naux_loss_type = sequence\n"
                               "[train]\nsteps = 20\nlr = 1e-3\nseed = 7\n"
                               "[data]\nsource = brown\npath = corpora/brown\n"
                               "[log]\nevery = 5\ncheckpoint_dir = ck\n");
  RunConfig c = load_config(path);
  CHECK(c.model.layers == 4);
  CHECK(c.moe.d_model == 128);
  CHECK(c.model.heads == 8);
  CHECK(c.model.kv_heads == 2);
  CHECK(c.moe.experts == 16);
  CHECK(c.moe.top_k == 1);
  CHECK(c.moe.router.score == ScoreFunc::Sigmoid);
  CHECK_FALSE(c.moe.router.normalize);
  CHECK(c.moe.router.policy == RoutingPolicy::Sinkhorn);
  CHECK(c.moe.router.noise == NoiseType::Gaussian);
  CHECK(c.moe.router.noise_eps == 0.5);
  CHECK(c.moe.router.capacity_factor == 1.25);
  CHECK(c.moe.router.drop_policy == DropPolicy::Probs);
  CHECK(c.moe.router.aux_loss_type == AuxLossType::Sequence);
  CHECK(c.train.steps == 20);
  CHECK(c.train.lr == 1e-3);
  CHECK(c.train.seed == 7u);
  CHECK(c.data.source == "brown");
  CHECK(c.data.path == "corpora/brown");
  CHECK(c.log.every == 5);
  CHECK(c.log.checkpoint_dir == "ck");
  CHECK(c.train.batch == 8);  // untouched keys keep their defaults
}

TEST_CASE("config: --set overrides win over the file and over earlier --set", "[config]") {
  TempDir tmp;
  std::string path = tmp.write("ovr.ini", "[router]\naux_alpha = 0.5\n[train]\nsteps = 10\n");
  RunConfig c = load_config(path, {"router.aux_alpha=0.01", "train.steps = 3", "train.steps=4"});
  CHECK(c.moe.router.aux_alpha == 0.01);
  CHECK(c.train.steps == 4);
  // apply_override follows the same rules.
  apply_override(c, "model.experts=4");
  CHECK(c.moe.experts == 4);
}

TEST_CASE("config: unknown keys and sections are errors naming them", "[config]") {
  TempDir tmp;
  std::string path = tmp.write("unk.ini", "[router]\naux_alfa = 0.1\n");
  std::string msg = error_of([&] { load_config(path); });
  INFO(msg);
  CHECK(has(msg, "config: unknown key 'router.aux_alfa' (in file " + path + ")"));
  CHECK(has(msg, "did you mean 'router.aux_alpha'"));

  msg = error_of([&] { load_config(tmp.write("sec.ini", "[modle]\nlayers = 2\n")); });
  CHECK(has(msg, "unknown section '[modle]'"));
  msg = error_of([&] { load_config(tmp.write("nosec.ini", "layers = 2\n")); });
  CHECK(has(msg, "'layers' is outside any [section]"));
  msg = error_of([&] { load_config(tmp.write("dup.ini", "[train]\nsteps = 1\nsteps = 2\n")); });
  CHECK(has(msg, "'train.steps' is given twice"));
  msg = error_of([&] { load_config(tmp.write("junk.ini", "[train]\nnot a key value line\n")); });
  CHECK(has(msg, "invalid line"));
  msg = error_of([&] { load_config((tmp.dir / "missing.ini").string()); });
  CHECK(has(msg, "cannot open"));

  msg = error_of([&] { load_config("", {"train.experts=3"}); });
  CHECK(has(msg, "unknown key 'train.experts' (in --set train.experts=3)"));
  CHECK(has(msg, "did you mean 'model.experts'"));
  msg = error_of([&] { load_config("", {"router.aux_alpha"}); });
  CHECK(has(msg, "--set 'router.aux_alpha' has no '='"));
  msg = error_of([&] { load_config("", {"aux_alpha=1"}); });
  CHECK(has(msg, "--set 'aux_alpha=1' has no 'section.'"));
}

TEST_CASE("config: bad values name the key and the accepted values", "[config]") {
  std::string msg = error_of([] { load_config("", {"router.policy=foo"}); });
  CHECK(has(msg, "config: router.policy = 'foo' is not one of topk|random_top2|sinkhorn|expert_choice"));
  msg = error_of([] { load_config("", {"router.score=relu"}); });
  CHECK(has(msg, "router.score = 'relu' is not one of softmax|sigmoid"));
  msg = error_of([] { load_config("", {"router.noise=loud"}); });
  CHECK(has(msg, "none|jitter|gaussian|learned"));
  msg = error_of([] { load_config("", {"router.drop_policy=random"}); });
  CHECK(has(msg, "position|probs"));
  msg = error_of([] { load_config("", {"router.aux_loss_type=x"}); });
  CHECK(has(msg, "global|sequence"));
  msg = error_of([] { load_config("", {"data.source=wiki"}); });
  CHECK(has(msg, "data.source = 'wiki' is not one of brown|synthetic"));
  msg = error_of([] { load_config("", {"train.backend=tpu"}); });
  CHECK(has(msg, "cpu|cuda"));
  msg = error_of([] { load_config("", {"model.dtype=f16"}); });
  CHECK(has(msg, "f32|f64|bf16"));
  msg = error_of([] { load_config("", {"train.steps=abc"}); });
  CHECK(has(msg, "train.steps = 'abc' is not an integer"));
  msg = error_of([] { load_config("", {"train.steps=2.5"}); });
  CHECK(has(msg, "train.steps = '2.5' is not an integer"));
  msg = error_of([] { load_config("", {"train.seed=-1"}); });
  CHECK(has(msg, "train.seed"));
  msg = error_of([] { load_config("", {"train.lr=fast"}); });
  CHECK(has(msg, "train.lr = 'fast' is not a finite number (accepted: number > 0)"));
  msg = error_of([] { load_config("", {"train.lr=inf"}); });
  CHECK(has(msg, "train.lr"));
  msg = error_of([] { load_config("", {"model.layers=0"}); });
  CHECK(has(msg, "model.layers = 0 must be >= 1"));
  msg = error_of([] { load_config("", {"model.expert_dropout=1"}); });
  CHECK(has(msg, "model.expert_dropout = 1 must be in [0, 1)"));
  msg = error_of([] { load_config("", {"log.out="}); });
  CHECK(has(msg, "log.out"));
}

TEST_CASE("config: top_k > experts is an error naming both", "[config]") {
  std::string msg = error_of([] { load_config("", {"model.top_k=9"}); });
  CHECK(has(msg, "config: model.top_k = 9 must be <= model.experts = 8"));
  // Fine once experts is large enough, whatever the order of the overrides.
  CHECK(load_config("", {"model.top_k=9", "model.experts=9"}).moe.top_k == 9);
  msg = error_of([] { load_config("", {"router.policy=random_top2", "model.top_k=1"}); });
  CHECK(has(msg, "router.policy = random_top2 requires model.top_k = 2"));
}

TEST_CASE("config: negative capacity factor is an error", "[config]") {
  TempDir tmp;
  std::string path = tmp.write("cap.ini", "[router]\ncapacity_factor = -1\n");
  std::string msg = error_of([&] { load_config(path); });
  CHECK(has(msg, "config: router.capacity_factor = -1 must be >= 0"));
  CHECK(has(msg, path));
  CHECK(load_config("", {"router.capacity_factor=0"}).moe.router.capacity_factor == 0.0);
}

TEST_CASE("config: bool parsing", "[config]") {
  for (const char* t : {"true", "1", "yes", "True", "YES"})
    CHECK(load_config("", {std::string("router.normalize=") + t}).moe.router.normalize);
  for (const char* f : {"false", "0", "no", "FALSE", "No"})
    CHECK_FALSE(load_config("", {std::string("router.normalize=") + f}).moe.router.normalize);
  std::string msg = error_of([] { load_config("", {"router.normalize=maybe"}); });
  CHECK(has(msg, "router.normalize = 'maybe' is not a bool (true|false|1|0|yes|no)"));
  msg = error_of([] { load_config("", {"model.tie_embeddings=2"}); });
  CHECK(has(msg, "model.tie_embeddings"));
}

TEST_CASE("config: cross-key rules", "[config]") {
  CHECK(has(error_of([] { load_config("", {"model.heads=5"}); }),
            "model.d_model = 64 must be a multiple of model.heads = 5"));
  CHECK(has(error_of([] { load_config("", {"model.kv_heads=3"}); }),
            "model.kv_heads = 3 must divide model.heads = 4"));
  CHECK(has(error_of([] { load_config("", {"model.shared_gate=true"}); }), "model.shared_gate"));
  CHECK(has(error_of([] { load_config("", {"router.pad_to_capacity=true"}); }),
            "router.pad_to_capacity"));
  CHECK(has(error_of([] { load_config("", {"router.policy=expert_choice", "router.score=sigmoid"}); }),
            "set router.score = softmax"));
  CHECK(has(error_of([] { load_config("", {"router.policy=expert_choice", "router.aux_alpha=0.01"}); }),
            "balanced by construction"));
  CHECK(has(error_of([] { load_config("", {"router.load_weight=0.1"}); }),
            "router.load_weight > 0 needs router.noise = gaussian or learned"));
  CHECK(has(error_of([] { load_config("", {"router.policy=sinkhorn", "router.bias_update_rate=0.001"}); }),
            "aux-loss-free balancing"));
  CHECK(has(error_of([] { load_config("", {"model.d_model=24", "model.heads=8"}); }),
            "must be even"));
  // router.force_balance replaces a top-k selection: refused where there is none to replace,
  // or where the knob acts only through the selection; each message names the keys.
  for (const char* policy : {"sinkhorn", "expert_choice"}) {
    const std::string msg = error_of([&] {
      load_config("", {"router.force_balance=true", std::string("router.policy=") + policy, "router.aux_alpha=0"});
    });
    CHECK(has(msg, std::string("router.force_balance = true needs router.policy = topk, got ") + policy));
  }
  CHECK(has(error_of([] { load_config("", {"router.force_balance=true", "router.policy=random_top2"}); }),
            "router.force_balance = true needs router.policy = topk, got random_top2"));
  CHECK(has(error_of([] { load_config("", {"router.force_balance=true", "router.bias_update_rate=0.001"}); }),
            "router.force_balance = true cannot be combined with router.bias_update_rate > 0"));
  CHECK(load_config("", {"router.force_balance=true", "router.capacity_factor=1", "router.noise=jitter",
                         "router.aux_alpha=0.01"}).moe.router.force_balance);
  CHECK(load_config("", {"router.policy=expert_choice"}).moe.router.capacity_factor == 0.0);
  CHECK(load_config("", {"model.kv_heads=2"}).model.kv_heads == 2);
}

TEST_CASE("config: sweep expansion grid size and order", "[config][sweep]") {
  TempDir tmp;
  std::string path = tmp.write("sweep.ini",
                               "[router]\naux_alpha = 0.5\n[log]\nout = runs/s.h5\ncheckpoint_dir = ck\n"
                               "[sweep]\nrouter.aux_alpha = 0, 0.001, 0.01\nmodel.top_k = 1, 2\n");
  RunConfig base = load_config(path);
  REQUIRE(base.sweep.size() == 2);
  CHECK(base.sweep[0].key == "router.aux_alpha");
  CHECK(base.sweep[0].values == std::vector<std::string>{"0", "0.001", "0.01"});
  CHECK(base.moe.router.aux_alpha == 0.5);  // the base keeps its own value

  std::vector<SweepRun> runs = expand_sweep(base);
  REQUIRE(runs.size() == 6);
  // First axis slowest.
  const double alphas[] = {0, 0, 0.001, 0.001, 0.01, 0.01};
  const int64_t ks[] = {1, 2, 1, 2, 1, 2};
  std::set<std::string> names, outs;
  for (size_t i = 0; i < runs.size(); ++i) {
    INFO(runs[i].name);
    CHECK(runs[i].config.moe.router.aux_alpha == alphas[i]);
    CHECK(runs[i].config.moe.top_k == ks[i]);
    CHECK(runs[i].config.sweep.empty());
    CHECK(runs[i].config.model.kv_heads == 4);  // resolved per run
    names.insert(runs[i].name);
    outs.insert(runs[i].config.log.out);
  }
  CHECK(runs[0].name == "aux_alpha=0_top_k=1");
  CHECK(runs[3].name == "aux_alpha=0.001_top_k=2");
  CHECK(runs[3].config.log.out == "runs/s_aux_alpha=0.001_top_k=2.h5");
  CHECK(runs[3].config.log.checkpoint_dir == "ck/aux_alpha=0.001_top_k=2");
  CHECK(names.size() == 6);
  CHECK(outs.size() == 6);  // no two runs share a log file

  // --set replaces an axis, or removes it with an empty list; a plain --set of a swept key
  // would be ignored by every run, so it is an error.
  CHECK(expand_sweep(load_config(path, {"sweep.model.top_k=2"})).size() == 3);
  RunConfig no_axis = load_config(path, {"sweep.model.top_k="});
  CHECK(no_axis.sweep.size() == 1);
  CHECK(has(error_of([&] { load_config(path, {"model.top_k=1"}); }),
            "conflicts with the [sweep] axis model.top_k"));
  // Without a sweep: one run called "base", paths unchanged.
  std::vector<SweepRun> one = expand_sweep(load_config(""));
  REQUIRE(one.size() == 1);
  CHECK(one[0].name == "base");
  CHECK(one[0].config.log.out == RunConfig{}.log.out);
}

TEST_CASE("config: sweep errors are found at load time", "[config][sweep]") {
  TempDir tmp;
  CHECK(has(error_of([&] { load_config(tmp.write("a.ini", "[sweep]\nmodel.top_k = 2, 9\n")); }),
            "sweep run 'top_k=9': model.top_k = 9 must be <= model.experts = 8"));
  CHECK(has(error_of([&] { load_config(tmp.write("b.ini", "[sweep]\naux_alpha = 0, 1\n")); }),
            "did you mean 'router.aux_alpha'"));
  CHECK(has(error_of([&] { load_config(tmp.write("c.ini", "[sweep]\nrouter.aux_alpha = 0, x\n")); }),
            "router.aux_alpha = 'x' is not a finite number"));
  CHECK(has(error_of([&] { load_config(tmp.write("d.ini", "[sweep]\nrouter.aux_alpha =\n")); }),
            "has no values"));
  CHECK(has(error_of([] { load_config("", {"sweep.router.aux_alpha=0,1,"}); }),
            "has an empty value"));
  CHECK(has(error_of([&] { load_config(tmp.write("e.ini", "[sweep]\nrouter.aux_alpha = 0.10, 0.1\n")); }),
            "lists 0.1 twice"));
}

TEST_CASE("config: to_ini round-trips through load_config", "[config]") {
  TempDir tmp;
  RunConfig changed = load_config("", kEveryKeyChanged);
  // random_top2 needs top_k = 2, the default: a second config changes top_k (and the policy to
  // one that allows it), so that together the two change every key.
  std::vector<std::string> other = kEveryKeyChanged;
  for (std::string& s : other) {
    if (s == "model.top_k=2") s = "model.top_k=4";
    if (s == "router.policy=random_top2") s = "router.policy=topk";
  }
  RunConfig changed_k = load_config("", other);
  // The parallel layout needs a router without per-rank random draws: a third config.
  // ... and train.seeds (which replaces train.seed, so not in the first two), and
  // router.force_balance (which needs policy topk without the aux-loss-free bias).
  RunConfig changed_par = load_config(
      "", {"parallel.ep=2", "parallel.dp=2", "train.grad_accum=2", "router.balance_scope=micro_batch",
           "parallel.overlap_grad_reduce=false", "train.seeds=3, 1", "router.force_balance=true",
           // Hugging Face's pooled aux loss needs softmax scores and the global loss.
           "router.aux_convention=hf",
           // SFT records (data.source = jsonl): the keys that only apply to them.
           "data.source=jsonl", "train.loss_on=response", "data.val_path=sft/val.jsonl", "data.format=messages",
           "data.chat_template=<|{role}|>\\n{content}<|end|>\\x23", "data.pack=false", "data.bad_records=skip"});
  // Together they really change every key (so the round trip covers them all).
  const RunConfig defaults;
  for (const ConfigKey& k : config_keys()) {
    INFO(k.key);
    CHECK((k.get(changed) != k.get(defaults) || k.get(changed_k) != k.get(defaults) ||
           k.get(changed_par) != k.get(defaults)));
  }
  for (const RunConfig& c : {load_config(""), changed, changed_k, changed_par}) {
    std::string ini = to_ini(c);
    RunConfig back = load_config(tmp.write("rt.ini", ini));
    CHECK(to_ini(back) == ini);
  }
  CHECK(changed.train.lr == 0.1234567890123);  // doubles are printed exactly
  CHECK(changed.train.seed == 18446744073709551615ull);
  CHECK(changed.data.path == "my data/brown");

  // Sections in order, every key present.
  std::string ini = to_ini(changed);
  size_t pos = 0;
  for (const char* s : {"[model]", "[router]", "[train]", "[data]", "[log]"}) {
    size_t at = ini.find(s);
    INFO(s);
    REQUIRE(at != std::string::npos);
    CHECK(at >= pos);
    pos = at;
  }
  CHECK(ini.find("[sweep]") == std::string::npos);
  for (const ConfigKey& k : config_keys()) {
    // Built with append: GCC 12 -O2 warns (-Wrestrict, a false positive) on "lit" + string.
    std::string line(1, '\n');
    line.append(k.key, k.key.find('.') + 1).append(" = ");
    // Of train.seed and train.seeds only the one in effect is written.
    INFO(k.key);
    CHECK(has(ini, line) == (k.key != "train.seeds"));
    CHECK(has(to_ini(changed_par), line) == (k.key != "train.seed"));
  }
  CHECK(has(to_ini(changed_par), "\nseeds = 3, 1\n"));

  // With a sweep the [sweep] section comes last and round-trips too.
  RunConfig swept = load_config("", {"sweep.router.aux_alpha=0, 1e-3", "sweep.model.top_k=1,2"});
  std::string sini = to_ini(swept);
  CHECK(has(sini, "[sweep]\nrouter.aux_alpha = 0, 0.001\nmodel.top_k = 1, 2\n"));
  CHECK(to_ini(load_config(tmp.write("rt2.ini", sini))) == sini);
  CHECK(get_value(swept, "sweep.model.top_k") == "1, 2");
  CHECK(get_value(changed, "log.out") == "o/r.h5");
}

TEST_CASE("config: MoEConfig::validate names the key", "[config][moe]") {
  MoEConfig ok;
  CHECK_NOTHROW(ok.validate());

  auto msg_of = [](auto mutate) {
    MoEConfig m;
    mutate(m);
    return error_of([&] { m.validate(); });
  };
  CHECK(msg_of([](MoEConfig& m) { m.top_k = 9; }) == "model.top_k = 9 must be <= model.experts = 8");
  CHECK(has(msg_of([](MoEConfig& m) { m.top_k = 0; }), "model.top_k = 0 must be >= 1"));
  CHECK(has(msg_of([](MoEConfig& m) { m.experts = 0; }), "model.experts = 0 must be >= 1"));
  CHECK(has(msg_of([](MoEConfig& m) { m.d_model = 0; }), "model.d_model = 0 must be > 0"));
  CHECK(has(msg_of([](MoEConfig& m) { m.d_expert = -1; }), "model.d_expert = -1 must be > 0"));
  CHECK(has(msg_of([](MoEConfig& m) { m.router.capacity_factor = -1; }),
            "router.capacity_factor = -1 must be >= 0"));
  CHECK(has(msg_of([](MoEConfig& m) { m.router.noise_eps = -0.5; }),
            "router.noise_eps = -0.5 must be >= 0"));
  CHECK(has(msg_of([](MoEConfig& m) { m.expert_dropout = 1.0; }),
            "model.expert_dropout = 1 must be in [0, 1)"));
  CHECK(has(msg_of([](MoEConfig& m) {
              m.router.policy = RoutingPolicy::RandomTop2;
              m.top_k = 3;
            }),
            "router.policy = random_top2 requires model.top_k = 2"));
  CHECK(has(msg_of([](MoEConfig& m) { m.router.sinkhorn_max_iters = 0; }),
            "router.sinkhorn_max_iters = 0 must be >= 1"));
  CHECK(has(msg_of([](MoEConfig& m) { m.router.score_scale = 0; }),
            "router.score_scale = 0 must be > 0"));
  CHECK(has(msg_of([](MoEConfig& m) { m.router.capacity_factor = std::nan(""); }),
            "router.capacity_factor"));  // NaN never passes

  MoEConfig top2;
  top2.router.policy = RoutingPolicy::RandomTop2;
  CHECK_NOTHROW(top2.validate());
}

TEST_CASE("config: enum names", "[config][moe]") {
  CHECK(std::string(to_string(ScoreFunc::Sigmoid)) == "sigmoid");
  CHECK(std::string(to_string(RoutingPolicy::ExpertChoice)) == "expert_choice");
  CHECK(std::string(to_string(NoiseType::Learned)) == "learned");
  CHECK(std::string(to_string(DropPolicy::Probs)) == "probs");
  CHECK(std::string(to_string(AuxLossType::Sequence)) == "sequence");
}

TEST_CASE("config: the quickstart preset loads", "[config]") {
  // Found next to this source file (CMake passes absolute paths) or above the working folder.
  const fs::path rel = fs::path("experiments") / "configs" / "quickstart.ini";
  fs::path preset = fs::path(__FILE__).parent_path().parent_path() / rel;
  for (fs::path d = fs::current_path(); !fs::exists(preset) && d.has_relative_path();
       d = d.parent_path())
    preset = d / rel;
  INFO(preset.string());
  REQUIRE(fs::exists(preset));
  RunConfig c = load_config(preset.string());
  CHECK(c.model.layers == 2);
  CHECK(c.moe.d_model == 64);
  CHECK(c.moe.experts == 8);
  CHECK(c.moe.top_k == 2);
  CHECK(c.data.source == "brown");
  CHECK(c.sweep.empty());
  // Every preset beside it loads and every grid point of its sweep is valid.
  int presets = 0;
  for (const auto& entry : fs::directory_iterator(preset.parent_path())) {
    if (entry.path().extension() != ".ini") continue;
    INFO(entry.path().string());
    std::vector<SweepRun> runs = expand_sweep(load_config(entry.path().string()));
    CHECK(!runs.empty());
    ++presets;
  }
  CHECK(presets >= 8);
  // The GPU presets (experiments/configs/gpu/): the seeded GPU study is 7 grid points x 3 seeds,
  // the routing speed study 15 runs, 3 of them with router.force_balance.
  const fs::path gpu = preset.parent_path() / "gpu";
  std::vector<SweepRun> seeded = expand_sweep(load_config((gpu / "seeded_gpu.ini").string()));
  CHECK(seeded.size() == 21);
  CHECK(seeded.front().config.model.dtype == DType::BF16);
  std::vector<SweepRun> speed = expand_sweep(load_config((gpu / "routing_speed.ini").string()));
  CHECK(speed.size() == 15);
  int forced = 0;
  for (const SweepRun& r : speed) forced += r.config.moe.router.force_balance;
  CHECK(forced == 3);
}

// ---- train.seeds: every grid point once per seed (issue 13) ----

TEST_CASE("config: train.seeds runs every grid point once per seed, seeds outermost", "[config][sweep][seeds]") {
  TempDir tmp;
  const std::string path = tmp.write("seeds.ini",
                                     "[train]\nseeds = 7, 3\n[log]\nout = runs/s.h5\ncheckpoint_dir = ck\n"
                                     "[sweep]\nrouter.aux_alpha = 0, 0.01\nbaseline = aux_alpha=0.01\n");
  const RunConfig base = load_config(path);
  CHECK(base.train.seeds == std::vector<uint64_t>{7, 3});
  CHECK(base.sweep_baseline == "aux_alpha=0.01");
  CHECK(base.is_study());
  const std::vector<SweepRun> runs = expand_sweep(base);
  REQUIRE(runs.size() == 4);
  const char* names[] = {"aux_alpha=0_seed=7", "aux_alpha=0.01_seed=7", "aux_alpha=0_seed=3", "aux_alpha=0.01_seed=3"};
  const char* points[] = {"aux_alpha=0", "aux_alpha=0.01", "aux_alpha=0", "aux_alpha=0.01"};
  const uint64_t seeds[] = {7, 7, 3, 3};
  for (size_t i = 0; i < runs.size(); ++i) {
    INFO(runs[i].name);
    CHECK(runs[i].name == names[i]);
    CHECK(runs[i].point == points[i]);  // the grouping: the grid point without its seed
    CHECK(runs[i].seeded);
    CHECK(runs[i].config.train.seed == seeds[i]);
    CHECK(runs[i].config.train.seeds.empty());  // each run is one resolved run
    CHECK(runs[i].config.sweep.empty());
    CHECK(runs[i].config.sweep_baseline.empty());
    CHECK(runs[i].values == std::vector<std::string>{i % 2 ? "0.01" : "0"});
    // The seed is visible in the log's and the checkpoint folder's names.
    CHECK(runs[i].config.log.out == std::string("runs/s_") + names[i] + ".h5");
    CHECK(runs[i].config.log.checkpoint_dir == std::string("ck/") + names[i]);
    // A run's stored config is a plain single run (what a checkpoint and a resume compare).
    const std::string ini = to_ini(runs[i].config);
    CHECK(has(ini, "\nseed = " + std::to_string(seeds[i]) + "\n"));
    CHECK(!has(ini, "\nseeds = "));
  }
  // Seeds alone (no sweep): "seed=S", one grid point.
  const std::vector<SweepRun> alone = expand_sweep(load_config("", {"train.seeds=5,6", "log.out=r/x.h5"}));
  REQUIRE(alone.size() == 2);
  CHECK(alone[0].name == "seed=5");
  CHECK(alone[1].config.log.out == "r/x_seed=6.h5");
  CHECK(alone[1].config.train.seed == 6);
  CHECK(alone[1].point.empty());
  // One seed is still a study: the seed shows in the name.
  const std::vector<SweepRun> one = expand_sweep(load_config("", {"train.seeds=9"}));
  REQUIRE(one.size() == 1);
  CHECK(one[0].name == "seed=9");
  // expand_grid (bench, crosscheck): the grid points once, with the first seed.
  const std::vector<SweepRun> grid = expand_grid(base);
  REQUIRE(grid.size() == 2);
  CHECK(grid[1].name == "aux_alpha=0.01");
  CHECK(grid[1].config.train.seed == 7);
  CHECK(grid[1].config.log.out == "runs/s_aux_alpha=0.01.h5");
  CHECK(expand_grid(load_config("", {"train.seeds=4,2"})).front().config.train.seed == 4);
  // Variants: the point is the variant's name; the values name the variant.
  const std::vector<SweepRun> var =
      expand_sweep(load_config("", {"sweep.variant=a: train.lr=0.1, b: train.lr=0.2", "train.seeds=1,2"}));
  REQUIRE(var.size() == 4);
  CHECK(var[3].name == "b_seed=2");
  CHECK(var[3].point == "b");
  CHECK(var[3].values == std::vector<std::string>{"b"});
  CHECK(var[3].config.train.lr == 0.2);
}

TEST_CASE("config: train.seed and train.seeds: the later one wins, both in one file is an error", "[config][seeds]") {
  TempDir tmp;
  const std::string seeded = tmp.write("a.ini", "[train]\nseeds = 1, 2\n");
  const std::string plain = tmp.write("b.ini", "[train]\nseed = 42\n");
  // --set after the file wins.
  RunConfig c = load_config(seeded, {"train.seed=5"});
  CHECK(c.train.seeds.empty());
  CHECK(c.train.seed == 5);
  CHECK(!c.is_study());
  c = load_config(plain, {"train.seeds=8, 9"});
  CHECK(c.train.seeds == std::vector<uint64_t>{8, 9});
  CHECK(expand_sweep(c)[1].config.train.seed == 9);
  // Both in one file: neither is later.
  CHECK(has(error_of([&] { load_config(tmp.write("c.ini", "[train]\nseed = 1\nseeds = 1, 2\n")); }),
            "train.seed and train.seeds are both given (in file"));
  CHECK(has(error_of([&] { load_config(tmp.write("d.ini", "[train]\nseeds = 1, 2\nseed = 1\n")); }),
            "keep one of them"));
  // Round trip: only the one in effect is written, so the text loads again.
  const RunConfig s = load_config(seeded, {"sweep.router.aux_alpha=0,0.1", "sweep.baseline=aux_alpha=0.1"});
  const std::string ini = to_ini(s);
  CHECK(has(ini, "\nseeds = 1, 2\n"));
  CHECK(!has(ini, "\nseed = "));
  CHECK(has(ini, "[sweep]\nrouter.aux_alpha = 0, 0.1\nbaseline = aux_alpha=0.1\n"));
  CHECK(to_ini(load_config(tmp.write("rt.ini", ini))) == ini);
  CHECK(get_value(s, "train.seeds") == "1, 2");
  CHECK(get_value(s, "sweep.baseline") == "aux_alpha=0.1");
}

TEST_CASE("config: bad train.seeds are errors naming the key", "[config][seeds]") {
  TempDir tmp;
  auto err = [](const std::string& set) { return error_of([&] { load_config("", {set}); }); };
  CHECK(has(err("train.seeds="), "config: train.seeds is empty: give one or more seeds"));
  CHECK(has(error_of([&] { load_config(tmp.write("e.ini", "[train]\nseeds =\n")); }), "train.seeds is empty"));
  CHECK(has(err("train.seeds=1,2,1"), "config: train.seeds lists seed 1 twice"));
  CHECK(has(err("train.seeds=1, 01"), "config: train.seeds lists seed 1 twice"));
  CHECK(has(err("train.seeds=1,x"), "config: train.seeds: 'x' is not an integer >= 0"));
  CHECK(has(err("train.seeds=1.5"), "config: train.seeds: '1.5' is not an integer >= 0"));
  CHECK(has(err("train.seeds=-1"), "config: train.seeds: '-1' is not an integer >= 0"));
  CHECK(has(err("train.seeds=1 2"), "config: train.seeds: '1 2' is not an integer >= 0"));
  CHECK(has(err("train.seeds=99999999999999999999"), "config: train.seeds: '99999999999999999999' is out of range"));
  CHECK(has(err("train.seeds=1,2,"), "config: train.seeds = '1,2,' has an empty value"));
  CHECK(has(err("train.seeds=1,,2"), "has an empty value"));
  CHECK(has(err("train.seeds=1,x"), "(in --set train.seeds=1,x)"));  // and where it came from
  // Not a sweep axis, not inside a variant; the seed is not swept twice.
  CHECK(has(err("sweep.train.seeds=1,2"), "train.seeds cannot be a [sweep] axis"));
  CHECK(has(err("sweep.variant=a: train.seeds=1 + train.lr=0.1"), "sweep.variant 'a' sets train.seeds"));
  CHECK(has(error_of([] { load_config("", {"sweep.train.seed=1,2", "train.seeds=3,4"}); }),
            "a [sweep] axis train.seed and train.seeds = 3, 4 both set the seed"));
  CHECK(has(error_of([] { load_config("", {"sweep.variant=a: train.seed=1, b: train.lr=0.1", "train.seeds=3"}); }),
            "sweep.variant 'a' sets train.seed, which train.seeds = 3 sets for every run"));
  // Grid points whose names collide are refused with seeds as without.
  CHECK(has(error_of([] { load_config("", {"sweep.data.path=a/b,a_b", "train.seeds=1,2"}); }),
            "have the same name 'path=a_b'"));
}

TEST_CASE("config: sweep.baseline names a grid point", "[config][sweep][seeds]") {
  CHECK(load_config("", {"sweep.router.aux_alpha=0,0.01", "sweep.baseline=aux_alpha=0"}).sweep_baseline ==
        "aux_alpha=0");
  CHECK(has(error_of([] { load_config("", {"sweep.router.aux_alpha=0,0.01", "sweep.baseline=aux_alpha=1"}); }),
            "sweep.baseline = 'aux_alpha=1' is not a grid point of this sweep (grid points: aux_alpha=0, aux_alpha=0.01)"));
  CHECK(has(error_of([] { load_config("", {"sweep.baseline=x"}); }),
            "sweep.baseline = 'x' names a grid point, but there is no [sweep] axis"));
  // Removing an axis that the baseline names is caught too; --set sweep.baseline= removes it.
  CHECK(has(error_of([] {
              load_config("", {"sweep.router.aux_alpha=0,0.01", "sweep.baseline=aux_alpha=0",
                               "sweep.router.aux_alpha=0.1,0.2"});
            }),
            "is not a grid point"));
  CHECK(load_config("", {"sweep.router.aux_alpha=0,0.01", "sweep.baseline=aux_alpha=0", "sweep.baseline="})
            .sweep_baseline.empty());
}

TEST_CASE("config: the keys of imported architectures (head_dim, qk_norm, dense_layers, aux_convention) "
          "are checked by name", "[config][hf]") {
  auto err = [](std::vector<std::string> sets) { return error_of([&] { load_config("", sets); }); };
  RunConfig c = load_config("", {"model.layers=4", "model.moe_every=1", "model.dense_layers=3, 0"});
  CHECK(c.model.dense_layers == std::vector<int64_t>{0, 3});  // sorted
  CHECK(!c.model.is_moe_block(0));
  CHECK(c.model.is_moe_block(1));
  CHECK(c.model.moe_block_count() == 2);
  CHECK(load_config("", {"model.dense_layers="}).model.dense_layers.empty());
  CHECK_THAT(err({"model.dense_layers=1, 1"}), has_substr("model.dense_layers lists block 1 twice"));
  CHECK_THAT(err({"model.dense_layers=x"}), has_substr("'x' is not a block index"));
  CHECK_THAT(err({"model.dense_layers=-1"}), has_substr("'-1' is not a block index"));
  CHECK_THAT(err({"model.layers=2", "model.dense_layers=2"}), has_substr("model.dense_layers lists block 2, but model.layers = 2"));
  // head_dim lifts "heads divides d_model" and must be even.
  CHECK(load_config("", {"model.d_model=20", "model.heads=4", "model.head_dim=8"}).model.head_dim == 8);
  CHECK_THAT(err({"model.d_model=20", "model.heads=3"}), has_substr("or set model.head_dim"));
  CHECK_THAT(err({"model.head_dim=7"}), has_substr("the head width 7 (model.head_dim) must be even"));
  CHECK_THAT(err({"model.qk_norm=rms"}), has_substr("model.qk_norm = 'rms' is not one of none|head|projection"));
  CHECK_THAT(err({"router.aux_convention=hf", "router.score=sigmoid"}), has_substr("router.aux_convention = hf"));
  CHECK_THAT(err({"router.aux_convention=hf", "router.aux_loss_type=sequence"}), has_substr("router.aux_loss_type = global"));
  CHECK_THAT(err({"model.shared_width=8"}), has_substr("model.shared_width = 8 needs model.shared_experts >= 1"));
  CHECK_THAT(err({"model.rope_theta=0"}), has_substr("model.rope_theta"));
}
