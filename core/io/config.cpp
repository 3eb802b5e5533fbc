// moelab: INI config parsing, overrides, sweeps and printing (see config.h for the contract).
//
// Boost.Program_options tokenises the INI file ([section] + `key = value`, `#` comments); every
// known key is registered so Boost knows the schema, but values are kept as text and converted
// here by the key table, because Boost's conversion errors do not name the accepted values.
// Every error message starts with "config: " and names the key; the origin (file or --set) is
// appended where it is known.
#include "core/io/config.h"
#include "core/moe/router.h"

#include <algorithm>
#include <boost/program_options.hpp>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "core/check.h"

namespace po = boost::program_options;

namespace moelab {
namespace {

constexpr const char* kSections[] = {"model", "router", "train", "data", "log", "parallel", "sweep"};

std::string trim(const std::string& s) {
  const char* ws = " \t\r\n";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

// Shortest text that reads back to the same double: to_ini must round-trip exactly.
std::string fmt_double(double v) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

template <class T>
std::string fmt_int(T v) {
  return std::to_string(v);
}

// ---- value parsers: each throws naming the key, the text and what is accepted ----

template <class T>
T parse_int(const std::string& key, const std::string& text, const std::string& accepted) {
  T v{};
  auto r = std::from_chars(text.data(), text.data() + text.size(), v);
  if (r.ec == std::errc::result_out_of_range)
    MOELAB_USAGE_FAIL("config: ", key, " = '", text, "' is out of range (accepted: ", accepted, ")");
  if (text.empty() || r.ec != std::errc() || r.ptr != text.data() + text.size())
    MOELAB_USAGE_FAIL("config: ", key, " = '", text, "' is not an integer (accepted: ", accepted, ")");
  return v;
}

double parse_double(const std::string& key, const std::string& text, const std::string& accepted) {
  double v = 0;
  auto r = std::from_chars(text.data(), text.data() + text.size(), v);
  if (text.empty() || r.ec != std::errc() || r.ptr != text.data() + text.size() ||
      !std::isfinite(v))
    MOELAB_USAGE_FAIL("config: ", key, " = '", text, "' is not a finite number (accepted: ", accepted,
                ")");
  return v;
}

bool parse_bool(const std::string& key, const std::string& text) {
  std::string t = text;
  std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return std::tolower(c); });
  if (t == "true" || t == "1" || t == "yes") return true;
  if (t == "false" || t == "0" || t == "no") return false;
  MOELAB_USAGE_FAIL("config: ", key, " = '", text, "' is not a bool (true|false|1|0|yes|no)");
}

std::string join(const std::vector<std::string>& v, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? sep : "") + v[i];
  return out;
}

// ---- key builders. An accessor is a generic lambda returning a reference to the field, so one
// expression serves both get (const) and set. ----

#define FIELD(expr) [](auto& c) -> auto& { return c.expr; }

template <class T, class Acc>
ConfigKey int_key(std::string key, Acc acc, T lo, std::string help, T hi = std::numeric_limits<T>::max()) {
  std::string range = hi == std::numeric_limits<T>::max()
                          ? ">= " + fmt_int(lo)
                          : "in [" + fmt_int(lo) + ", " + fmt_int(hi) + "]";
  std::string accepted = "integer " + range;
  ConfigKey k{key, accepted, std::move(help), nullptr, nullptr};
  k.get = [acc](const RunConfig& c) { return fmt_int(acc(c)); };
  k.set = [acc, key, accepted, range, lo, hi](RunConfig& c, const std::string& text) {
    T v = parse_int<T>(key, text, accepted);
    if (v < lo || v > hi) MOELAB_USAGE_FAIL("config: ", key, " = ", text, " must be ", range);
    acc(c) = v;
  };
  return k;
}

// A real interval; infinite ends are open and not printed.
struct Range {
  double lo = -INFINITY;
  bool lo_closed = true;
  double hi = INFINITY;
  bool hi_closed = true;
  std::string text() const {
    if (std::isinf(hi)) return std::string(lo_closed ? ">= " : "> ") + fmt_double(lo);
    if (std::isinf(lo)) return std::string(hi_closed ? "<= " : "< ") + fmt_double(hi);
    return std::string("in ") + (lo_closed ? "[" : "(") + fmt_double(lo) + ", " + fmt_double(hi) +
           (hi_closed ? "]" : ")");
  }
  bool contains(double v) const {
    return (lo_closed ? v >= lo : v > lo) && (hi_closed ? v <= hi : v < hi);
  }
};
Range ge(double lo) { return {lo, true, INFINITY, true}; }
Range gt(double lo) { return {lo, false, INFINITY, true}; }
Range closed_open(double lo, double hi) { return {lo, true, hi, false}; }
Range closed(double lo, double hi) { return {lo, true, hi, true}; }

template <class Acc>
ConfigKey real_key(std::string key, Acc acc, Range range, std::string help) {
  std::string accepted = "number " + range.text();
  ConfigKey k{key, accepted, std::move(help), nullptr, nullptr};
  k.get = [acc](const RunConfig& c) { return fmt_double(acc(c)); };
  k.set = [acc, key, accepted, range](RunConfig& c, const std::string& text) {
    double v = parse_double(key, text, accepted);
    if (!range.contains(v)) MOELAB_USAGE_FAIL("config: ", key, " = ", text, " must be ", range.text());
    acc(c) = v;
  };
  return k;
}

template <class Acc>
ConfigKey bool_key(std::string key, Acc acc, std::string help) {
  ConfigKey k{key, "true|false (also 1|0, yes|no)", std::move(help), nullptr, nullptr};
  k.get = [acc](const RunConfig& c) { return std::string(acc(c) ? "true" : "false"); };
  k.set = [acc, key](RunConfig& c, const std::string& text) { acc(c) = parse_bool(key, text); };
  return k;
}

// Enum names come from the to_string() overloads in core/moe/config.cpp: one spelling each.
template <class E, class Acc>
ConfigKey enum_key(std::string key, Acc acc, std::vector<E> values, std::string help) {
  std::vector<std::string> names;
  for (E v : values) names.push_back(to_string(v));
  std::string accepted = join(names, "|");
  ConfigKey k{key, accepted, std::move(help), nullptr, nullptr};
  k.get = [acc](const RunConfig& c) { return std::string(to_string(acc(c))); };
  k.set = [acc, key, accepted, values](RunConfig& c, const std::string& text) {
    for (E v : values)
      if (text == to_string(v)) {
        acc(c) = v;
        return;
      }
    MOELAB_USAGE_FAIL("config: ", key, " = '", text, "' is not one of ", accepted);
  };
  return k;
}

// A string restricted to a fixed set of words (dtype, backend, data source).
template <class Acc>
ConfigKey choice_key(std::string key, Acc acc, std::vector<std::string> choices, std::string help) {
  std::string accepted = join(choices, "|");
  ConfigKey k{key, accepted, std::move(help), nullptr, nullptr};
  k.get = [acc](const RunConfig& c) { return std::string(acc(c)); };
  k.set = [acc, key, accepted, choices](RunConfig& c, const std::string& text) {
    if (std::find(choices.begin(), choices.end(), text) == choices.end())
      MOELAB_USAGE_FAIL("config: ", key, " = '", text, "' is not one of ", accepted);
    acc(c) = text;
  };
  return k;
}

// A free string (a path). Rejects what to_ini could not write back: the INI reader strips
// '#' comments and surrounding spaces, and a value is one line.
template <class Acc>
ConfigKey path_key(std::string key, Acc acc, std::string help, bool allow_empty = false) {
  std::string accepted = allow_empty ? "path without '#' (empty allowed)" : "non-empty path without '#'";
  ConfigKey k{key, accepted, std::move(help), nullptr, nullptr};
  k.get = [acc](const RunConfig& c) { return std::string(acc(c)); };
  k.set = [acc, key, accepted, allow_empty](RunConfig& c, const std::string& text) {
    if ((text.empty() && !allow_empty) || text.find_first_of("#\r\n") != std::string::npos ||
        trim(text) != text)
      MOELAB_USAGE_FAIL("config: ", key, " = '", text, "' must be a ",
                        allow_empty ? "" : "non-empty ",
                        "path without '#', line breaks or surrounding spaces");
    acc(c) = text;
  };
  return k;
}

// A string value that to_ini can write back (no '#', line break or surrounding spaces), checked
// by `check` (which throws naming the key) when not empty.
template <class Acc>
ConfigKey text_key(std::string key, Acc acc, std::string accepted, std::string help,
                   std::function<void(const std::string&)> check) {
  ConfigKey k{key, accepted, std::move(help), nullptr, nullptr};
  k.get = [acc](const RunConfig& c) { return std::string(acc(c)); };
  k.set = [acc, key, check](RunConfig& c, const std::string& text) {
    if (text.find_first_of("#\r\n") != std::string::npos || trim(text) != text)
      MOELAB_USAGE_FAIL("config: ", key, " = '", text, "' holds a '#', a line break or surrounding "
                        "spaces, which an INI value cannot keep");
    if (check) check(text);
    acc(c) = text;
  };
  return k;
}

// train.seeds: "1, 2, 3". Every item an integer >= 0, none twice, at least one, at most
// kMaxSeeds (each seed is a whole run per grid point).
constexpr size_t kMaxSeeds = 1000;

ConfigKey seeds_key() {
  const std::string key = "train.seeds";
  const std::string accepted = "comma-separated integers >= 0, each at most once (1 to " +
                               std::to_string(kMaxSeeds) + " seeds; absent = one run with train.seed)";
  ConfigKey k{key, accepted,
              "every grid point runs once per seed, logs named ..._seed=S (replaces train.seed)",
              nullptr, nullptr};
  k.get = [](const RunConfig& c) {
    std::string out;
    for (size_t i = 0; i < c.train.seeds.size(); ++i) out += (i ? ", " : "") + std::to_string(c.train.seeds[i]);
    return out;
  };
  k.set = [key, accepted](RunConfig& c, const std::string& text) {
    if (trim(text).empty())
      MOELAB_USAGE_FAIL("config: ", key, " is empty: give one or more seeds, e.g. ", key,
                        " = 1, 2, 3 (for one run with one seed leave ", key, " out and set train.seed)");
    if (trim(text).back() == ',') MOELAB_USAGE_FAIL("config: ", key, " = '", text, "' has an empty value");
    std::vector<uint64_t> seeds;
    std::stringstream ss(text);
    std::string item;
    while (std::getline(ss, item, ',')) {
      item = trim(item);
      if (item.empty()) MOELAB_USAGE_FAIL("config: ", key, " = '", text, "' has an empty value");
      uint64_t v = 0;
      auto r = std::from_chars(item.data(), item.data() + item.size(), v);
      if (r.ec == std::errc::result_out_of_range)
        MOELAB_USAGE_FAIL("config: ", key, ": '", item, "' is out of range (accepted: ", accepted, ")");
      if (r.ec != std::errc() || r.ptr != item.data() + item.size())
        MOELAB_USAGE_FAIL("config: ", key, ": '", item, "' is not an integer >= 0 (accepted: ", accepted, ")");
      if (std::find(seeds.begin(), seeds.end(), v) != seeds.end())
        MOELAB_USAGE_FAIL("config: ", key, " lists seed ", v, " twice (each seed would write the same logs)");
      seeds.push_back(v);
      if (seeds.size() > kMaxSeeds)
        MOELAB_USAGE_FAIL("config: ", key, " lists more than ", kMaxSeeds, " seeds");
    }
    c.train.seeds = std::move(seeds);
  };
  return k;
}

// model.dense_layers: "0, 3": block indices, each an integer >= 0, none twice; "" = none. The
// range against model.layers is checked in finalize (the keys may come in any order).
ConfigKey dense_layers_key() {
  const std::string key = "model.dense_layers";
  ConfigKey k{key, "comma-separated block indices >= 0, or empty",
              "blocks with a dense FFN whatever moe_every says (Qwen's mlp_only_layers)", nullptr, nullptr};
  k.get = [](const RunConfig& c) {
    std::string out;
    for (size_t i = 0; i < c.model.dense_layers.size(); ++i)
      out += (i ? ", " : "") + std::to_string(c.model.dense_layers[i]);
    return out;
  };
  k.set = [key](RunConfig& c, const std::string& text) {
    std::vector<int64_t> layers;
    std::stringstream ss(text);
    std::string item;
    if (!trim(text).empty())
      while (std::getline(ss, item, ',')) {
        item = trim(item);
        int64_t v = -1;
        auto r = std::from_chars(item.data(), item.data() + item.size(), v);
        if (item.empty() || r.ec != std::errc() || r.ptr != item.data() + item.size() || v < 0)
          MOELAB_USAGE_FAIL("config: ", key, ": '", item, "' is not a block index (an integer >= 0)");
        if (std::find(layers.begin(), layers.end(), v) != layers.end())
          MOELAB_USAGE_FAIL("config: ", key, " lists block ", v, " twice");
        layers.push_back(v);
      }
    std::sort(layers.begin(), layers.end());
    c.model.dense_layers = std::move(layers);
  };
  return k;
}

std::vector<ConfigKey> build_keys() {
  using RP = RoutingPolicy;
  std::vector<ConfigKey> k;
  // [model]
  k.push_back(int_key<int64_t>("model.layers", FIELD(model.layers), 1, "transformer blocks"));
  k.push_back(int_key<int64_t>("model.d_model", FIELD(moe.d_model), 1, "model width D"));
  k.push_back(int_key<int64_t>("model.heads", FIELD(model.heads), 1,
                               "attention heads (must divide d_model)"));
  k.push_back(int_key<int64_t>("model.kv_heads", FIELD(model.kv_heads), 0,
                               "grouped-query KV heads, must divide heads; 0 = same as heads"));
  k.push_back(int_key<int64_t>("model.experts", FIELD(moe.experts), 1, "routed experts E"));
  k.push_back(int_key<int64_t>("model.top_k", FIELD(moe.top_k), 1,
                               "experts per token k (<= experts)"));
  k.push_back(int_key<int64_t>("model.d_expert", FIELD(moe.d_expert), 1, "expert hidden width F"));
  k.push_back(int_key<int64_t>("model.moe_every", FIELD(model.moe_every), 0,
                               "block i has an MoE FFN when i % moe_every == moe_every - 1, the "
                               "others a dense FFN (1 = all MoE, 2 = GShard alternation, 0 = dense model)"));
  k.push_back(int_key<int64_t>("model.d_ff", FIELD(model.d_ff), 0,
                               "dense FFN hidden width; 0 = top_k * d_expert (same active parameters)"));
  k.push_back(dense_layers_key());
  k.push_back(int_key<int64_t>("model.head_dim", FIELD(model.head_dim), 0,
                               "per-head width; 0 = d_model / heads (Qwen3: heads * head_dim != d_model)"));
  k.push_back(bool_key("model.qkv_bias", FIELD(model.qkv_bias), "biases on the q, k, v projections (Qwen2-MoE)"));
  k.push_back(enum_key("model.qk_norm", FIELD(model.qk_norm),
                       std::vector{QkNorm::None, QkNorm::Head, QkNorm::Projection},
                       "RMSNorm of queries and keys before RoPE: per head (Qwen3-MoE) or over the "
                       "whole projection (OLMoE)"));
  k.push_back(real_key("model.rope_theta", FIELD(model.rope_theta), gt(0), "rotary embedding base theta"));
  k.push_back(real_key("model.norm_eps", FIELD(model.norm_eps), gt(0), "RMSNorm epsilon"));
  k.push_back(int_key<int64_t>("model.shared_width", FIELD(moe.shared_width), 0,
                               "hidden width of the shared-expert MLP; 0 = shared_experts * d_expert"));
  k.push_back(int_key<int64_t>("model.shared_experts", FIELD(moe.shared_experts), 0,
                               "always-on shared experts of width d_expert (DeepSeek-MoE)"));
  k.push_back(bool_key("model.shared_gate", FIELD(moe.shared_gate),
                       "sigmoid gate on the shared-expert output (Qwen2-MoE); needs shared_experts >= 1"));
  k.push_back(real_key("model.expert_dropout", FIELD(moe.expert_dropout), closed_open(0, 1),
                       "dropout on the expert hidden activations (training only)"));
  k.push_back(int_key<int64_t>("model.vocab", FIELD(model.vocab), 2, "vocabulary size"));
  k.push_back(bool_key("model.tie_embeddings", FIELD(model.tie_embeddings),
                       "output projection shares the token embedding"));
  k.push_back(real_key("model.init_scale", FIELD(model.init_scale), gt(0),
                       "multiplies the default init std (Switch: 0.1 for stability)"));
  k.push_back(enum_key("model.dtype", FIELD(model.dtype), std::vector<DType>{DType::F32, DType::F64, DType::BF16},
                         "parameter/activation precision: f64 (CPU checks), f32, bf16 (CUDA: bf16 "
                         "storage, fp32 accumulation, fp32 master weights and optimizer state); "
                         "the router is fp32 or better always"));
  // [router]
  k.push_back(enum_key("router.score", FIELD(moe.router.score),
                       std::vector{ScoreFunc::Softmax, ScoreFunc::Sigmoid},
                       "score function over the router logits"));
  k.push_back(bool_key("router.normalize", FIELD(moe.router.normalize),
                       "renormalise the top-k gates to sum 1 (Mixtral); false = Switch/GShard"));
  k.push_back(real_key("router.score_scale", FIELD(moe.router.score_scale), gt(0),
                       "gates are multiplied by this (DeepSeek-V3 routed scaling factor)"));
  k.push_back(enum_key("router.policy", FIELD(moe.router.policy),
                       std::vector{RP::TopK, RP::RandomTop2, RP::Sinkhorn, RP::ExpertChoice},
                       "routing policy (random_top2 needs top_k = 2; expert_choice takes C = capacity_factor * T / E, capacity_factor 0 meaning top_k)"));
  k.push_back(real_key("router.random_top2_threshold", FIELD(moe.router.random_top2_threshold),
                       gt(0), "tau: keep the 2nd expert with probability min(1, g2 / tau)"));
  k.push_back(enum_key("router.noise", FIELD(moe.router.noise),
                       std::vector{NoiseType::None, NoiseType::Jitter, NoiseType::Gaussian,
                                   NoiseType::Learned},
                       "router noise, training only"));
  k.push_back(real_key("router.noise_eps", FIELD(moe.router.noise_eps), ge(0),
                       "jitter eps (x *= U[1-eps, 1+eps]) or Gaussian logit sigma"));
  k.push_back(real_key("router.aux_alpha", FIELD(moe.router.aux_alpha), ge(0),
                       "Switch load-balancing loss weight alpha (alpha * E * sum f_i P_i)"));
  k.push_back(enum_key("router.aux_convention", FIELD(moe.router.aux_convention),
                       std::vector{AuxConvention::Moelab, AuxConvention::Hf},
                       "moelab: alpha * E * sum f_i P_i per MoE layer; hf: Hugging Face's loss, counts "
                       "and probabilities pooled over all MoE layers (k at perfect balance)"));
  k.push_back(enum_key("router.aux_loss_type", FIELD(moe.router.aux_loss_type),
                       std::vector{AuxLossType::Global, AuxLossType::Sequence},
                       "aux loss over the whole batch or per sequence (DeepSeek)"));
  k.push_back(enum_key("router.balance_scope", FIELD(moe.router.balance_scope),
                       std::vector{BalanceScope::Batch, BalanceScope::MicroBatch},
                       "tokens the balancing counts, z-loss and statistics cover: the step's whole "
                       "batch across ranks (Megatron's global-batch aux loss) or each router call's "
                       "own (one rank's share, one train.grad_accum micro-batch)"));
  k.push_back(real_key("router.z_loss", FIELD(moe.router.z_loss), ge(0),
                       "router z-loss weight beta (ST-MoE, about 1e-3)"));
  k.push_back(real_key("router.importance_weight", FIELD(moe.router.importance_weight), ge(0),
                       "Shazeer importance loss weight, w * CV(importance)^2"));
  k.push_back(real_key("router.load_weight", FIELD(moe.router.load_weight), ge(0),
                       "Shazeer load loss weight, w * CV(load)^2"));
  k.push_back(real_key("router.capacity_factor", FIELD(moe.router.capacity_factor), ge(0),
                       "C = ceil(cf * T * k / E) per expert; 0 = dropless"));
  k.push_back(enum_key("router.drop_policy", FIELD(moe.router.drop_policy),
                       std::vector{DropPolicy::Position, DropPolicy::Probs},
                       "which assignments an over-full expert drops: later tokens or lowest probs"));
  k.push_back(bool_key("router.pad_to_capacity", FIELD(moe.router.pad_to_capacity),
                       "every expert computes exactly C rows; needs capacity_factor > 0"));
  k.push_back(real_key("router.bias_update_rate", FIELD(moe.router.bias_update_rate), ge(0),
                       "aux-loss-free bias step u (DeepSeek-V3); 0 = off"));
  // Upper bounds on the loop counts: an absurd value ran for hours with no progress line.
  k.push_back(int_key<int>("router.sinkhorn_max_iters", FIELD(moe.router.sinkhorn_max_iters), 1,
                           "Sinkhorn iteration cap", 10000));
  k.push_back(real_key("router.sinkhorn_tol", FIELD(moe.router.sinkhorn_tol), gt(0),
                       "Sinkhorn stops when mean |delta d1| < tol"));
  k.push_back(bool_key("router.force_balance", FIELD(moe.router.force_balance),
                       "speed studies only: the router computes as usual, then token t's j-th expert "
                       "is replaced by (t * top_k + j) mod experts (perfect balance, Megatron-Core's "
                       "benchmark mode) with the gates of those experts; needs policy = topk and "
                       "bias_update_rate = 0"));
  // [train]
  k.push_back(int_key<int64_t>("train.steps", FIELD(train.steps), 1, "optimizer steps"));
  k.push_back(int_key<int64_t>("train.batch", FIELD(train.batch), 1, "sequences per step"));
  k.push_back(int_key<int64_t>("train.grad_accum", FIELD(train.grad_accum), 1,
                               "micro-batches per step: gradients of batch / grad_accum sequences "
                               "each, summed before the update (one GPU reproduces a multi-GPU batch)",
                               int64_t(65536)));
  k.push_back(enum_key("train.recompute", FIELD(train.recompute),
                       std::vector{Recompute::None, Recompute::Mlp, Recompute::Attention, Recompute::All},
                       "activations recomputed in backward instead of kept from forward, for memory "
                       "(bit-identical results): mlp = the FFN / expert hidden activations, attention "
                       "= q, k, v and the attention output, all = both"));
  k.push_back(int_key<int64_t>("train.seq", FIELD(train.seq), 1,
                               "tokens per sequence; T = batch * seq tokens per router call"));
  k.push_back(real_key("train.lr", FIELD(train.lr), gt(0), "peak learning rate"));
  k.push_back(int_key<int64_t>("train.warmup", FIELD(train.warmup), 0, "linear warm-up steps"));
  {
    // train.seed and train.seeds are two spellings of one setting, and the later one wins:
    // setting train.seed turns train.seeds off (both in one file is refused in load_stream).
    ConfigKey seed = int_key<uint64_t>("train.seed", FIELD(train.seed), 0,
                                       "random seed of a single run (clears train.seeds)");
    seed.set = [inner = seed.set](RunConfig& c, const std::string& text) {
      inner(c, text);
      c.train.seeds.clear();
    };
    k.push_back(std::move(seed));
    k.push_back(seeds_key());
  }
  k.push_back(real_key("train.weight_decay", FIELD(train.weight_decay), ge(0),
                       "AdamW decoupled weight decay"));
  k.push_back(real_key("train.grad_clip", FIELD(train.grad_clip), ge(0),
                       "clip the global gradient norm to this; 0 = off"));
  k.push_back(real_key("train.beta1", FIELD(train.beta1), closed_open(0, 1), "AdamW beta1"));
  k.push_back(real_key("train.beta2", FIELD(train.beta2), closed_open(0, 1), "AdamW beta2"));
  k.push_back(real_key("train.min_lr_ratio", FIELD(train.min_lr_ratio), closed(0, 1),
                       "cosine decay ends at lr * min_lr_ratio"));
  k.push_back(choice_key("train.backend", FIELD(train.backend), {"cpu", "cuda"},
                         "compute backend (--backend overrides)"));
  k.push_back(enum_key("train.loss_on", FIELD(train.loss_on), std::vector{LossOn::All, LossOn::Response},
                       "targets that bear loss: all tokens, or (data.source = jsonl) only the "
                       "responses' tokens (answer-only loss; prompts and templates weigh 0)"));
  k.push_back(path_key("train.init_from", FIELD(train.init_from),
                       "start from this moelab checkpoint's weights (and router biases) with a new "
                       "schedule, optimizer state and step count (not --resume); its model keys "
                       "must equal this config's; empty = random init",
                       /*allow_empty=*/true));
  // [data]
  k.push_back(choice_key("data.source", FIELD(data.source), {"brown", "synthetic", "jsonl"},
                         "brown = Brown corpus at data.path (`make data`); synthetic = generated; "
                         "jsonl = SFT records (data.format) in the file data.path"));
  k.push_back(path_key("data.path", FIELD(data.path),
                       "Brown corpus folder, or the JSONL file of data.source = jsonl"));
  k.push_back(path_key("data.tokenizer", FIELD(data.tokenizer),
                       "bytes = byte-level tokens 0..255; or a tokenizer.json (byte-level BPE: GPT-2, "
                       "Qwen2/3, DeepSeek-V3), a GPT-2 encoder.json (vocab.bpe beside it) or a folder "
                       "holding either (`make data` fetches them into data/tokenizers/); brown only, "
                       "and model.vocab must be at least its vocabulary size"));
  k.back().accepted = "bytes, or a path without '#'";
  k.push_back(int_key<int64_t>("data.synthetic_sources", FIELD(data.synthetic_sources), 1,
                               "synthetic: K latent sources mixed in the stream"));
  k.push_back(int_key<int64_t>("data.synthetic_alphabet", FIELD(data.synthetic_alphabet), 2,
                               "synthetic: symbols per source"));
  k.push_back(real_key("data.val_fraction", FIELD(data.val_fraction), closed_open(0, 1),
                       "fraction held out for evaluation (jsonl: of data.path's records, unless "
                       "data.val_path is set)"));
  k.push_back(text_key("data.genres", FIELD(data.genres), "all, or Brown genre letters a-r: ranges and lists (a-j, k-r, a,c,f-h)",
                       "Brown genres read (training and validation files alike; the split of "
                       "data.val_fraction is the same as with all genres)",
                       [](const std::string& v) { (void)brown_genres(v); }));
  k.push_back(path_key("data.val_path", FIELD(data.val_path),
                       "jsonl: the validation records' file; empty = split data.path by "
                       "data.val_fraction", /*allow_empty=*/true));
  k.push_back(enum_key("data.format", FIELD(data.format),
                       std::vector{RecordFormat::PromptResponse, RecordFormat::Messages, RecordFormat::Tokens},
                       "jsonl records: {\"prompt\", \"response\"} strings; {\"messages\": [{\"role\", "
                       "\"content\"}]} through data.chat_template; or {\"prompt_ids\", \"response_ids\"} "
                       "token ids"));
  k.push_back(text_key("data.chat_template", FIELD(data.chat_template),
                       "text with {content} once and {role} any number of times; escapes \\n \\t \\\\ \\xHH",
                       "jsonl: each message (a prompt is role user, a response role assistant) "
                       "becomes this text; an assistant message's response (the loss of "
                       "train.loss_on = response) runs from its {content} to the template's end",
                       [](const std::string& v) { (void)decode_chat_template(v); }));
  k.push_back(bool_key("data.pack", FIELD(data.pack),
                       "jsonl: pack several records into one sequence (attention and rotary "
                       "positions restart at each record); false = one record per sequence"));
  k.push_back(enum_key("data.bad_records", FIELD(data.bad_records),
                       std::vector{BadRecords::Stop, BadRecords::Skip},
                       "jsonl: a bad record (invalid JSON, a missing field, longer than train.seq) "
                       "stops the run naming its line, or is skipped and counted"));
  // [log]
  k.push_back(int_key<int64_t>("log.every", FIELD(log.every), 1, "log training metrics every N steps"));
  k.push_back(int_key<int64_t>("log.eval_every", FIELD(log.eval_every), 0,
                               "evaluate every N steps; 0 = never"));
  k.push_back(int_key<int64_t>("log.eval_batches", FIELD(log.eval_batches), 1,
                               "validation batches per evaluation (Brown: at most what its "
                               "validation text holds)", 10000));
  k.push_back(int_key<int64_t>("log.checkpoint_every", FIELD(log.checkpoint_every), 0,
                               "checkpoint every N steps; 0 = never"));
  k.push_back(path_key("log.checkpoint_dir", FIELD(log.checkpoint_dir),
                       "checkpoints go here, named step_NNNNNN; empty = beside log.out, "
                       "<out without .h5>_checkpoints (one folder per run)",
                       /*allow_empty=*/true));
  k.push_back(path_key("log.out", FIELD(log.out), "HDF5 run log (--out overrides)"));
  k.push_back(int_key<int64_t>("log.flush_every", FIELD(log.flush_every), 1,
                               "flush the HDF5 log every N steps"));
  // [parallel]
  k.push_back(int_key<int64_t>("parallel.ep", FIELD(parallel.ep), 1,
                               "expert-parallel ranks: experts sharded over them, tokens exchanged "
                               "by all-to-all; divides model.experts", int64_t(4096)));
  k.push_back(int_key<int64_t>("parallel.dp", FIELD(parallel.dp), 1,
                               "data-parallel replicas of each expert shard; world = ep * dp ranks "
                               "(cpu: simulated ranks, one thread each; cuda: one GPU each)", int64_t(4096)));
  k.push_back(bool_key("parallel.overlap_grad_reduce", FIELD(parallel.overlap_grad_reduce),
                       "start each block's gradient all-reduce as soon as its backward is done "
                       "(false: all after the backward pass; same results, for measuring the overlap)"));
  return k;
}

#undef FIELD

const ConfigKey* find_key(const std::string& key) {
  for (const ConfigKey& k : config_keys())
    if (k.key == key) return &k;
  return nullptr;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// "; did you mean 'router.aux_alpha'?" for typos and for a key put in the wrong section.
std::string suggestion(const std::string& key) {
  auto name_of = [](const std::string& k) {
    size_t dot = k.find('.');
    return dot == std::string::npos ? k : k.substr(dot + 1);
  };
  const ConfigKey* best = nullptr;
  size_t best_d = 3;  // more than 2 edits away is not a typo
  for (const ConfigKey& k : config_keys()) {
    size_t d = name_of(k.key) == name_of(key) ? 0 : edit_distance(k.key, key);
    if (d < best_d) best_d = d, best = &k;
  }
  if (!best) return "";
  return "; did you mean '" + best->key + "'?";
}

[[noreturn]] void fail_unknown_key(const std::string& key, const std::string& origin) {
  size_t dot = key.find('.');
  if (dot == std::string::npos)
    MOELAB_USAGE_FAIL("config: key '", key, "' is outside any [section]", origin, suggestion(key));
  std::string section = key.substr(0, dot);
  if (std::find(std::begin(kSections), std::end(kSections), section) == std::end(kSections))
    MOELAB_USAGE_FAIL("config: unknown section '[", section, "]' in key '", key, "'", origin,
                suggestion(key), "; sections are model, router, train, data, log, parallel, sweep");
  MOELAB_USAGE_FAIL("config: unknown key '", key, "'", origin, suggestion(key));
}

// Runs `f`, appending `origin` to any moelab::Error it throws.
template <class F>
void with_origin(const std::string& origin, F&& f) {
  try {
    f();
  } catch (const Error& e) {
    throw UsageError(std::string(e.what()) + origin);
  }
}

void set_key(RunConfig& cfg, const std::string& key, const std::string& value,
             const std::string& origin) {
  const ConfigKey* k = find_key(key);
  if (!k) fail_unknown_key(key, origin);
  with_origin(origin, [&] { k->set(cfg, value); });
}

// `axis_key` = "router.aux_alpha", `list` = "0, 0.001". An empty list removes the axis when
// `allow_remove` (--set sweep.key= ), else it is an error.
// A "variant" axis value is "NAME: key=value + key=value ...": one grid point that sets several
// keys at once (e.g. aux-loss-free routing = policy topk + bias_update_rate + aux_alpha 0).
struct Variant {
  std::string name;
  std::vector<std::string> assignments;  // "section.key=value"
};

Variant parse_variant(const std::string& item, const std::string& origin) {
  const size_t colon = item.find(':');
  if (colon == std::string::npos || trim(item.substr(0, colon)).empty())
    MOELAB_USAGE_FAIL("config: sweep.variant value '", item, "' must look like 'NAME: section.key=value + ...'",
                origin);
  Variant v{trim(item.substr(0, colon)), {}};
  std::stringstream ss(item.substr(colon + 1));
  std::string a;
  while (std::getline(ss, a, '+')) {
    a = trim(a);
    if (a.empty()) MOELAB_USAGE_FAIL("config: sweep.variant '", v.name, "' has an empty assignment", origin);
    v.assignments.push_back(a);
  }
  return v;
}

// The canonical value of one [sweep] item: a variant's "NAME: k=v + k=v" (every assignment
// checked on a scratch config), or a key's value in the spelling to_ini writes.
std::string canonical_axis_value(const std::string& axis_key, const std::string& item,
                                 const std::string& origin) {
  RunConfig scratch;
  if (axis_key == "variant") {
    Variant v = parse_variant(item, origin);
    for (const std::string& a : v.assignments) {
      if (trim(a.substr(0, a.find('='))) == "train.seeds")
        MOELAB_USAGE_FAIL("config: sweep.variant '", v.name, "' sets train.seeds", origin,
                          "; the seeds are the same for every grid point: set train.seeds in [train]");
      with_origin(origin + " (sweep.variant '" + v.name + "')", [&] { apply_override(scratch, a); });
    }
    std::string canon = v.name + ":";
    for (size_t i = 0; i < v.assignments.size(); ++i) canon += (i ? " + " : " ") + v.assignments[i];
    return canon;
  }
  const ConfigKey& k = *find_key(axis_key);
  with_origin(origin, [&] { k.set(scratch, item); });
  return k.get(scratch);
}

void set_axis(RunConfig& cfg, const std::string& axis_key, const std::string& list,
              const std::string& origin, bool allow_remove) {
  const std::string full = "sweep." + axis_key;
  if (axis_key == "baseline") {  // not an axis: the grid point the analysis compares with
    const std::string name = trim(list);
    if (name.empty() && !allow_remove)
      MOELAB_USAGE_FAIL("config: sweep.baseline has no value", origin,
                        "; name a grid point, e.g. baseline = aux_alpha=0.01");
    if (name.find_first_of("#,\r\n") != std::string::npos)
      MOELAB_USAGE_FAIL("config: sweep.baseline = '", name, "' is not a grid point name", origin);
    cfg.sweep_baseline = name;  // checked against the grid in expand_sweep
    return;
  }
  if (axis_key == "train.seeds")
    MOELAB_USAGE_FAIL("config: train.seeds cannot be a [sweep] axis", origin,
                      "; it is a list of its own: write train.seeds = 1, 2, 3 in [train] (or --set "
                      "train.seeds=1,2,3) and every grid point runs once per seed");
  if (axis_key != "variant" && (axis_key.rfind("sweep.", 0) == 0 || !find_key(axis_key))) {
    std::string hint = suggestion(axis_key);
    MOELAB_USAGE_FAIL("config: [sweep] key '", axis_key, "' is not a config key", origin, hint,
                "; write full keys like router.aux_alpha = 0, 0.01");
  }
  auto it = std::find_if(cfg.sweep.begin(), cfg.sweep.end(),
                         [&](const SweepAxis& a) { return a.key == axis_key; });
  if (trim(list).empty()) {
    if (!allow_remove) MOELAB_USAGE_FAIL("config: ", full, " has no values", origin);
    if (it != cfg.sweep.end()) cfg.sweep.erase(it);
    return;
  }
  // getline drops a trailing empty field, so a trailing comma is caught here.
  if (trim(list).back() == ',')
    MOELAB_USAGE_FAIL("config: ", full, " = '", list, "' has an empty value", origin);
  SweepAxis axis{axis_key, {}};
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item = trim(item);
    if (item.empty()) MOELAB_USAGE_FAIL("config: ", full, " = '", list, "' has an empty value", origin);
    std::string canon = canonical_axis_value(axis_key, item, origin);
    if (std::find(axis.values.begin(), axis.values.end(), canon) != axis.values.end())
      MOELAB_USAGE_FAIL("config: ", full, " lists ", canon, " twice", origin);
    axis.values.push_back(canon);
  }
  if (it != cfg.sweep.end())
    *it = std::move(axis);
  else
    cfg.sweep.push_back(std::move(axis));
}

void load_stream(RunConfig& cfg, std::istream& in, const std::string& path);

void load_file(RunConfig& cfg, const std::string& path) {
  // A directory opens as an empty stream (it read as "all defaults"), and a FIFO or device would
  // block or never end: only a regular file (or a link to one) is a config file.
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (std::filesystem::exists(st) && !std::filesystem::is_regular_file(st))
    MOELAB_USAGE_FAIL("config: config file '", path, "' is ",
                      std::filesystem::is_directory(st) ? "a directory" : "not a regular file",
                      "; give the path of an INI file");
  std::ifstream in(path);
  if (!in) MOELAB_USAGE_FAIL("config: cannot open config file '", path, "'");
  load_stream(cfg, in, path);
  if (in.bad()) MOELAB_USAGE_FAIL("config: cannot read config file '", path, "'");
}

// Parses INI text from `in`; `path` names its origin in messages.
void load_stream(RunConfig& cfg, std::istream& in, const std::string& path) {
  const std::string origin = " (in file " + path + ")";

  po::options_description schema;
  for (const ConfigKey& k : config_keys())
    schema.add_options()(k.key.c_str(), po::value<std::string>(), k.help.c_str());
  po::parsed_options parsed(&schema);
  try {
    // allow_unregistered so that [sweep] lines and unknown keys reach us with their names.
    parsed = po::parse_config_file(in, schema, /*allow_unregistered=*/true);
  } catch (const po::error& e) {
    MOELAB_USAGE_FAIL("config: ", e.what(), origin);
  }

  std::set<std::string> seen;
  for (const po::option& opt : parsed.options) {
    const std::string& key = opt.string_key;
    std::string value = opt.value.empty() ? "" : opt.value.front();
    if (!seen.insert(key).second) MOELAB_USAGE_FAIL("config: key '", key, "' is given twice", origin);
    // Elsewhere the later of the two wins (a --set after the file); in one file neither is later.
    if ((key == "train.seed" && seen.count("train.seeds")) || (key == "train.seeds" && seen.count("train.seed")))
      MOELAB_USAGE_FAIL("config: train.seed and train.seeds are both given", origin,
                        ": train.seeds runs every grid point once per seed (train.seed taking each "
                        "value), train.seed runs once; keep one of them");
    if (key.rfind("sweep.", 0) == 0)
      set_axis(cfg, key.substr(6), value, " (in [sweep], file " + path + ")",
               /*allow_remove=*/false);
    else
      set_key(cfg, key, value, origin);
  }
}

// Applies one --set; returns the key it set ("sweep.x.y" for an axis).
std::string apply_set(RunConfig& cfg, const std::string& assignment) {
  const std::string origin = " (in --set " + assignment + ")";
  size_t eq = assignment.find('=');
  if (eq == std::string::npos)
    MOELAB_USAGE_FAIL("config: --set '", assignment, "' has no '=': write --set section.key=value");
  std::string key = trim(assignment.substr(0, eq));
  std::string value = trim(assignment.substr(eq + 1));
  if (key.find('.') == std::string::npos)
    MOELAB_USAGE_FAIL("config: --set '", assignment, "' has no 'section.' in its key: write --set ",
                "section.key=value", suggestion(key));
  if (key.rfind("sweep.", 0) == 0)
    set_axis(cfg, key.substr(6), value, origin, /*allow_remove=*/true);
  else
    set_key(cfg, key, value, origin);
  return key;
}

std::string sanitize(const std::string& s) {
  std::string out = s;
  for (char& c : out)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-' && c != '+') c = '_';
  return out;
}

}  // namespace

bool ModelConfig::is_moe_block(int64_t i) const {
  if (moe_every <= 0 || i % moe_every != moe_every - 1) return false;
  return std::find(dense_layers.begin(), dense_layers.end(), i) == dense_layers.end();
}

int64_t ModelConfig::moe_block_count() const {
  int64_t n = 0;
  for (int64_t i = 0; i < layers; ++i) n += is_moe_block(i);
  return n;
}

const std::vector<ConfigKey>& config_keys() {
  static const std::vector<ConfigKey> keys = build_keys();
  return keys;
}

void apply_override(RunConfig& cfg, const std::string& assignment) { apply_set(cfg, assignment); }

void finalize(RunConfig& cfg) {
  ModelConfig& m = cfg.model;
  if (m.kv_heads == 0) m.kv_heads = m.heads;
  try {
    cfg.moe.validate();
  } catch (const Error& e) {
    throw UsageError(std::string("config: ") + e.what());
  }
  if (m.head_dim == 0 && cfg.moe.d_model % m.heads != 0)
    MOELAB_USAGE_FAIL("config: model.d_model = ", cfg.moe.d_model, " must be a multiple of model.heads = ",
                m.heads, " (or set model.head_dim)");
  for (int64_t l : m.dense_layers)
    if (l >= m.layers)
      MOELAB_USAGE_FAIL("config: model.dense_layers lists block ", l, ", but model.layers = ", m.layers,
                        " has blocks 0 .. ", m.layers - 1);
  if (m.kv_heads > m.heads || m.heads % m.kv_heads != 0)
    MOELAB_USAGE_FAIL("config: model.kv_heads = ", m.kv_heads, " must divide model.heads = ", m.heads);
  const ParallelConfig& par = cfg.parallel;
  if (cfg.moe.experts % par.ep != 0)
    MOELAB_USAGE_FAIL("config: parallel.ep = ", par.ep, " must divide model.experts = ", cfg.moe.experts,
                      " (every rank holds experts / ep experts)");
  const int64_t accum = cfg.train.grad_accum;
  if (cfg.train.batch % (par.world() * accum) != 0)
    MOELAB_USAGE_FAIL("config: train.batch = ", cfg.train.batch, " must be divisible by parallel.ep x parallel.dp x ",
                      "train.grad_accum = ", par.ep, " x ", par.dp, " x ", accum, " = ", par.world() * accum,
                      " (every rank's micro-batch holds whole sequences)");
  if (accum > 1 && cfg.moe.router.balance_scope == BalanceScope::Batch)
    MOELAB_USAGE_FAIL("config: train.grad_accum = ", accum, " needs router.balance_scope = micro_batch: with "
                      "router.balance_scope = batch a micro-batch's balancing loss would need the counts "
                      "of the micro-batches after it");
  // With router.balance_scope = batch the router balances the whole batch across ranks, which
  // some routers cannot do yet. With micro_batch every router call is on its own, as with
  // grad_accum micro-batches; only expert dropout stays refused under expert parallelism (its
  // draws are keyed by the expert-sorted row, and a rank's rows hold other ranks' tokens).
  if (par.world() > 1 && cfg.moe.router.balance_scope == BalanceScope::Batch) {
    try {
      Router::check_batch_group(cfg.moe);
    } catch (const Error& e) {
      MOELAB_USAGE_FAIL("config: parallel.ep x parallel.dp = ", par.world(), " ranks: ", e.what(),
                        " (router.balance_scope = micro_batch runs it per rank)");
    }
  }
  if (par.ep > 1 && cfg.moe.expert_dropout > 0)
    MOELAB_USAGE_FAIL("config: model.expert_dropout = ", cfg.moe.expert_dropout, " with parallel.ep = ", par.ep,
                      " is not supported yet: dropout draws are keyed by the expert-sorted row, which "
                      "differs between layouts");
  if (cfg.data.tokenizer != "bytes" && cfg.data.source == "synthetic")
    MOELAB_USAGE_FAIL("config: data.tokenizer = ", cfg.data.tokenizer, " tokenizes the Brown corpus or JSONL "
                      "records; with data.source = ", cfg.data.source, " set data.tokenizer = bytes");
  if (cfg.data.genres != "all" && cfg.data.source != "brown")
    MOELAB_USAGE_FAIL("config: data.genres = ", cfg.data.genres, " selects Brown genres; with data.source = ",
                      cfg.data.source, " set data.genres = all");
  if (cfg.train.loss_on == LossOn::Response && cfg.data.source != "jsonl")
    MOELAB_USAGE_FAIL("config: train.loss_on = response needs data.source = jsonl (records with "
                      "responses); data.source = ", cfg.data.source, " has none");
  if (m.head_width(cfg.moe.d_model) % 2 != 0)
    MOELAB_USAGE_FAIL("config: the head width ", m.head_width(cfg.moe.d_model),
                      m.head_dim > 0 ? " (model.head_dim)" : " (model.d_model / model.heads)",
                      " must be even (rotary embeddings rotate pairs of dimensions)");
}

RunConfig config_from_text(const std::string& ini, const std::string& origin) {
  RunConfig cfg;
  std::istringstream in(ini);
  load_stream(cfg, in, origin);
  finalize(cfg);
  return cfg;
}

RunConfig load_config(const std::string& path, const std::vector<std::string>& set_overrides) {
  RunConfig cfg;
  if (!path.empty()) load_file(cfg, path);
  std::vector<std::pair<std::string, std::string>> plain_sets;  // (key, assignment)
  for (const std::string& a : set_overrides) {
    std::string key = apply_set(cfg, a);
    if (key.rfind("sweep.", 0) != 0) plain_sets.emplace_back(key, a);
  }
  // A swept key set by --set would be overwritten by every run: refuse instead of ignoring it.
  for (const auto& [key, a] : plain_sets)
    for (const SweepAxis& axis : cfg.sweep)
      if (axis.key == key)
        MOELAB_USAGE_FAIL("config: --set ", a, " conflicts with the [sweep] axis ", key,
                    "; change the axis with --set sweep.", key, "=v1,v2 or remove it with --set sweep.",
                    key, "=");
  if (!cfg.is_study() && cfg.sweep_baseline.empty())
    finalize(cfg);
  else
    (void)expand_sweep(cfg);  // checks every grid point now, not halfway through a sweep
  return cfg;
}

namespace {

// One grid point: its name, its values as written (for messages) and its config (finalised,
// sweep and seeds cleared, train.seed untouched, paths not yet per run).
struct GridPoint {
  std::string name, raw;
  RunConfig config;
  std::vector<std::string> values;  // per axis (a variant: its name)
};

std::string assignment_key(const std::string& assignment) {
  return trim(assignment.substr(0, assignment.find('=')));
}

// The cartesian product of the axes, first axis slowest; no axes: one point named "".
std::vector<GridPoint> grid_points(const RunConfig& cfg) {
  RunConfig base = cfg;
  base.sweep.clear();
  base.sweep_baseline.clear();
  base.train.seeds.clear();
  const bool seeded = !cfg.train.seeds.empty();
  if (cfg.sweep.empty()) {
    finalize(base);
    return {{"", "", base, {}}};
  }
  // Run names use the short key (after the section) unless two axes share it.
  std::vector<std::string> labels;
  for (const SweepAxis& a : cfg.sweep) {
    std::string shortk = a.key.substr(a.key.find('.') + 1);
    int same = 0;
    for (const SweepAxis& b : cfg.sweep) same += b.key.substr(b.key.find('.') + 1) == shortk;
    labels.push_back(same > 1 ? a.key : shortk);
  }
  for (const SweepAxis& a : cfg.sweep) {
    if (a.values.empty()) MOELAB_USAGE_FAIL("config: sweep.", a.key, " has no values");
    if (seeded && a.key == "train.seed")
      MOELAB_USAGE_FAIL("config: a [sweep] axis train.seed and train.seeds = ", get_value(cfg, "train.seeds"),
                        " both set the seed; remove the axis (train.seeds runs every grid point once per seed)");
  }

  std::vector<GridPoint> points;
  std::vector<size_t> idx(cfg.sweep.size(), 0);
  for (;;) {
    RunConfig run = base;
    std::string name, raw;
    std::vector<std::string> values;
    for (size_t i = 0; i < idx.size(); ++i) {
      const SweepAxis& a = cfg.sweep[i];
      raw += std::string(i ? ", " : "") + a.key + " = " + a.values[idx[i]];
      if (a.key == "variant") {
        const Variant v = parse_variant(a.values[idx[i]], " (sweep axis)");
        for (const std::string& asg : v.assignments) {
          if (seeded && assignment_key(asg) == "train.seed")
            MOELAB_USAGE_FAIL("config: sweep.variant '", v.name, "' sets train.seed, which train.seeds = ",
                              get_value(cfg, "train.seeds"), " sets for every run; remove one of them");
          apply_override(run, asg);
        }
        name += (i ? "_" : "") + sanitize(v.name);
        values.push_back(v.name);
        continue;
      }
      const ConfigKey* k = find_key(a.key);
      if (!k) fail_unknown_key(a.key, " (sweep axis)");
      k->set(run, a.values[idx[i]]);
      name += (i ? "_" : "") + labels[i] + "=" + sanitize(a.values[idx[i]]);
      values.push_back(a.values[idx[i]]);
    }
    // Two grid points with one name would write one log, the second over the first.
    for (const GridPoint& p : points)
      if (p.name == name)
        MOELAB_USAGE_FAIL("config: sweep runs '", p.raw, "' and '", raw, "' have the same name '", name,
                          "' (equal, or equal after replacing characters other than letters, "
                          "digits and . - + by _), so both would write the same log; rename one");
    try {
      finalize(run);
    } catch (const Error& e) {
      std::string msg = e.what();
      if (msg.rfind("config: ", 0) == 0) msg = msg.substr(8);
      MOELAB_USAGE_FAIL("config: sweep run '", name, "': ", msg);
    }
    points.push_back({name, raw, std::move(run), std::move(values)});
    // Odometer increment, last axis fastest.
    size_t i = idx.size();
    while (i > 0 && ++idx[i - 1] == cfg.sweep[i - 1].values.size()) idx[--i] = 0;
    if (i == 0) break;
  }
  if (!cfg.sweep_baseline.empty()) {
    bool found = false;
    std::string names;
    for (size_t i = 0; i < points.size(); ++i) {
      found = found || points[i].name == cfg.sweep_baseline;
      if (i < 12) names += (i ? ", " : "") + points[i].name;
    }
    if (points.size() > 12) names += ", ...";
    if (!found)
      MOELAB_USAGE_FAIL("config: sweep.baseline = '", cfg.sweep_baseline,
                        "' is not a grid point of this sweep (grid points: ", names, ")");
  }
  return points;
}

// A run's per-run paths: log.out "dir/x.h5" -> "dir/x_<name>.h5", checkpoint_dir "d" -> "d/<name>".
SweepRun make_run(const RunConfig& cfg, const std::string& name, const GridPoint& point, bool seeded,
                  RunConfig run) {
  const std::filesystem::path out(cfg.log.out);
  run.log.out = (out.parent_path() / (out.stem().string() + "_" + name + out.extension().string())).string();
  if (!cfg.log.checkpoint_dir.empty())  // empty: derived from the per-run log.out
    run.log.checkpoint_dir = (std::filesystem::path(cfg.log.checkpoint_dir) / name).string();
  return {name, point.name, seeded, point.values, std::move(run)};
}

}  // namespace

std::vector<SweepRun> expand_sweep(const RunConfig& cfg) {
  if (!cfg.sweep_baseline.empty() && cfg.sweep.empty())
    MOELAB_USAGE_FAIL("config: sweep.baseline = '", cfg.sweep_baseline,
                      "' names a grid point, but there is no [sweep] axis");
  std::vector<GridPoint> points = grid_points(cfg);
  if (!cfg.is_study()) return {{"base", "base", false, {}, points.front().config}};
  if (cfg.train.seeds.empty()) {
    std::vector<SweepRun> runs;
    for (GridPoint& p : points) runs.push_back(make_run(cfg, p.name, p, false, p.config));
    return runs;
  }
  // Seeds outermost. A name is "<point>_seed=<S>" with S digits only, so distinct (point, seed)
  // pairs have distinct names; the check below still guards every name that reaches a file.
  std::vector<SweepRun> runs;
  std::set<std::string> names;
  for (uint64_t seed : cfg.train.seeds)
    for (const GridPoint& p : points) {
      const std::string name = (p.name.empty() ? "" : p.name + "_") + "seed=" + std::to_string(seed);
      if (!names.insert(name).second)
        MOELAB_USAGE_FAIL("config: two runs of the study are named '", name, "'; rename a grid point");
      RunConfig run = p.config;
      run.train.seed = seed;
      runs.push_back(make_run(cfg, name, p, true, std::move(run)));
    }
  return runs;
}

std::vector<SweepRun> expand_grid(const RunConfig& cfg) {
  if (!cfg.is_study()) return expand_sweep(cfg);
  std::vector<GridPoint> points = grid_points(cfg);
  std::vector<SweepRun> runs;
  for (GridPoint& p : points) {
    RunConfig run = p.config;
    if (!cfg.train.seeds.empty()) run.train.seed = cfg.train.seeds.front();
    if (cfg.sweep.empty()) {  // seeds alone: the one config, paths unchanged
      runs.push_back({"base", "base", false, {}, std::move(run)});
      continue;
    }
    runs.push_back(make_run(cfg, p.name, p, false, std::move(run)));
  }
  return runs;
}

std::string to_ini(const RunConfig& cfg) {
  std::ostringstream os;
  std::string section;
  for (const ConfigKey& k : config_keys()) {
    // Exactly one of train.seed and train.seeds is in effect, and only that one is written
    // (an empty train.seeds is not a value, and both in one file is refused).
    if (k.key == (cfg.train.seeds.empty() ? "train.seeds" : "train.seed")) continue;
    size_t dot = k.key.find('.');
    std::string s = k.key.substr(0, dot);
    if (s != section) {
      os << (section.empty() ? "" : "\n") << "[" << s << "]\n";
      section = s;
    }
    os << k.key.substr(dot + 1) << " = " << k.get(cfg) << "\n";
  }
  if (!cfg.sweep.empty() || !cfg.sweep_baseline.empty()) {
    os << "\n[sweep]\n";
    for (const SweepAxis& a : cfg.sweep) os << a.key << " = " << join(a.values, ", ") << "\n";
    if (!cfg.sweep_baseline.empty()) os << "baseline = " << cfg.sweep_baseline << "\n";
  }
  return os.str();
}

const char* to_string(LossOn v) { return v == LossOn::All ? "all" : "response"; }
const char* to_string(BadRecords v) { return v == BadRecords::Stop ? "stop" : "skip"; }
const char* to_string(RecordFormat v) {
  switch (v) {
    case RecordFormat::PromptResponse: return "prompt_response";
    case RecordFormat::Messages: return "messages";
    case RecordFormat::Tokens: return "tokens";
  }
  return "?";
}

std::string decode_chat_template(const std::string& text) {
  const char* key = "data.chat_template";
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '\\') {
      out += text[i];
      continue;
    }
    if (i + 1 >= text.size())
      MOELAB_USAGE_FAIL("config: ", key, " = '", text, "' ends in a lone backslash (write \\\\ for one)");
    const char e = text[++i];
    if (e == 'n') out += '\n';
    else if (e == 't') out += '\t';
    else if (e == '\\') out += '\\';
    else if (e == 'x') {
      auto hex = [](char c) {
        return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
      };
      if (i + 2 >= text.size() || hex(text[i + 1]) < 0 || hex(text[i + 2]) < 0)
        MOELAB_USAGE_FAIL("config: ", key, " = '", text, "': \\x must be followed by two hex digits (at byte ", i - 1, ")");
      out += char(hex(text[i + 1]) * 16 + hex(text[i + 2]));
      i += 2;
    } else {
      MOELAB_USAGE_FAIL("config: ", key, " = '", text, "': unknown escape \\", std::string(1, e), " at byte ", i - 1,
                        " (accepted: \\n \\t \\\\ \\xHH)");
    }
  }
  size_t n = 0;
  for (size_t p = out.find("{content}"); p != std::string::npos; p = out.find("{content}", p + 1)) ++n;
  if (n != 1)
    MOELAB_USAGE_FAIL("config: ", key, " = '", text, "' must hold {content} exactly once (it holds it ", n,
                      " times)");
  return out;
}

std::string brown_genres(const std::string& spec) {
  const char* key = "data.genres";
  if (spec == "all") return "abcdefghijklmnopqr";  // the corpus has no files of i, o, q
  std::string out;
  std::stringstream ss(spec);
  std::string item;
  auto genre = [&](const std::string& t) {
    if (t.size() != 1 || t[0] < 'a' || t[0] > 'r')
      MOELAB_USAGE_FAIL("config: ", key, " = '", spec, "': '", t, "' is not a Brown genre letter a-r (or write all)");
    return t[0];
  };
  while (std::getline(ss, item, ',')) {
    item = trim(item);
    if (item.empty()) MOELAB_USAGE_FAIL("config: ", key, " = '", spec, "' has an empty item");
    const size_t dash = item.find('-');
    char a, b;
    if (dash == std::string::npos) {
      a = b = genre(item);
    } else {
      a = genre(trim(item.substr(0, dash)));
      b = genre(trim(item.substr(dash + 1)));
      if (b < a) MOELAB_USAGE_FAIL("config: ", key, " = '", spec, "': range ", item, " runs backwards");
    }
    for (char c = a; c <= b; ++c)
      if (out.find(c) == std::string::npos) out += c;
  }
  std::sort(out.begin(), out.end());
  if (out.empty()) MOELAB_USAGE_FAIL("config: ", key, " = '", spec, "' selects no genre");
  return out;
}

std::string checkpoint_dir_of(const RunConfig& cfg) {
  if (!cfg.log.checkpoint_dir.empty()) return cfg.log.checkpoint_dir;
  const std::filesystem::path out(cfg.log.out);
  return (out.parent_path() / (out.stem().string() + "_checkpoints")).string();
}

std::string get_value(const RunConfig& cfg, const std::string& key) {
  if (key.rfind("sweep.", 0) == 0) {
    if (key == "sweep.baseline") return cfg.sweep_baseline;
    for (const SweepAxis& a : cfg.sweep)
      if ("sweep." + a.key == key) return join(a.values, ", ");
    MOELAB_USAGE_FAIL("config: no sweep axis '", key.substr(6), "'");
  }
  const ConfigKey* k = find_key(key);
  if (!k) fail_unknown_key(key, "");
  return k->get(cfg);
}

namespace {
// '|' separates Markdown table cells.
std::string md_cell(const std::string& text) {
  std::string out;
  for (char c : text) out += c == '|' ? std::string("\\|") : std::string(1, c);
  return out;
}
}  // namespace

std::string config_keys_markdown() {
  const RunConfig defaults;
  std::ostringstream os;
  os << "| key | default | accepted | meaning |\n|---|---|---|---|\n";
  for (const ConfigKey& k : config_keys()) {
    const std::string def = k.get(defaults);
    os << "| `" << k.key << "` | " << (def.empty() ? std::string("(empty)") : "`" + def + "`") << " | "
       << md_cell(k.accepted) << " | "
       << md_cell(k.help) << " |\n";
  }
  return os.str();
}

}  // namespace moelab
