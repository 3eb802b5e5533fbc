// moelab: Hugging Face config.json of MoE language models (see hf_config.h).
#include "core/io/hf_config.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>

#include "core/check.h"
#include "core/io/json_strict.h"

namespace fs = std::filesystem;

namespace moelab {

namespace {

struct ArchRow {
  HfArch arch;
  const char* cls;
  const char* model_type;
};
constexpr ArchRow kArchs[] = {
    {HfArch::Mixtral, "MixtralForCausalLM", "mixtral"},
    {HfArch::Qwen2Moe, "Qwen2MoeForCausalLM", "qwen2_moe"},
    {HfArch::Qwen3Moe, "Qwen3MoeForCausalLM", "qwen3_moe"},
    {HfArch::Olmoe, "OlmoeForCausalLM", "olmoe"},
};

std::string supported() {
  std::string s;
  for (const ArchRow& r : kArchs) {
    if (!s.empty()) s += ", ";
    s += r.cls;
  }
  return s;
}

std::string dump_short(const nlohmann::json& v) {
  return printable_name(v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace), 80);
}

// Typed access to the keys of one config object, with messages that name the file and the key.
class Keys {
 public:
  Keys(const nlohmann::json& j, std::string src, std::string arch, std::vector<std::string>& defaulted)
      : j_(j), src_(std::move(src)), arch_(std::move(arch)), defaulted_(defaulted) {}

  [[noreturn]] void fail(const std::string& key, const std::string& problem) const {
    MOELAB_USAGE_FAIL("config.json ", src_, ": '", key, "' ", problem);
  }
  [[noreturn]] void refuse(const std::string& key, const std::string& why) const {
    MOELAB_USAGE_FAIL("config.json ", src_, ": ", arch_, " with ", key, " is not supported: ", why);
  }

  bool present(const std::string& key) const { return j_.contains(key) && !j_.at(key).is_null(); }
  const nlohmann::json& at(const std::string& key) const { return j_.at(key); }

  int64_t required_int(const std::string& key, int64_t min) const {
    if (!j_.contains(key)) fail(key, "is missing (" + arch_ + " needs it: it sets tensor shapes)");
    if (j_.at(key).is_null()) fail(key, "is null (" + arch_ + " needs it: it sets tensor shapes)");
    return as_int(key, j_.at(key), min);
  }
  int64_t optional_int(const std::string& key, int64_t def, int64_t min) {
    if (!j_.contains(key)) {
      defaulted_.push_back(key);
      return def;
    }
    if (j_.at(key).is_null()) fail(key, "is null, expected an integer");
    return as_int(key, j_.at(key), min);
  }
  double optional_number(const std::string& key, double def, double min, bool min_exclusive) {
    if (!j_.contains(key)) {
      defaulted_.push_back(key);
      return def;
    }
    return as_number(key, j_.at(key), min, min_exclusive);
  }
  bool optional_bool(const std::string& key, bool def) {
    if (!j_.contains(key)) {
      defaulted_.push_back(key);
      return def;
    }
    const nlohmann::json& v = j_.at(key);
    if (!v.is_boolean()) fail(key, "= " + dump_short(v) + " must be true or false");
    return v.get<bool>();
  }
  std::string optional_string(const std::string& key) const {
    if (!present(key)) return "";
    const nlohmann::json& v = j_.at(key);
    if (!v.is_string()) fail(key, "= " + dump_short(v) + " must be a string");
    return v.get<std::string>();
  }

  int64_t as_int(const std::string& key, const nlohmann::json& v, int64_t min) const {
    if (!v.is_number_integer()) fail(key, "= " + dump_short(v) + " must be an integer");
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)) fail(key, "= " + dump_short(v) + " is too large");
    const int64_t x = v.get<int64_t>();
    if (x < min) fail(key, "= " + std::to_string(x) + " must be >= " + std::to_string(min));
    return x;
  }
  double as_number(const std::string& key, const nlohmann::json& v, double min, bool min_exclusive) const {
    if (!v.is_number()) fail(key, "= " + dump_short(v) + " must be a number");
    const double x = v.get<double>();
    if (!std::isfinite(x)) fail(key, "= " + dump_short(v) + " must be finite");
    if (x < min || (min_exclusive && x == min))
      fail(key, "= " + dump_short(v) + " must be " + (min_exclusive ? "> " : ">= ") + dump_short(nlohmann::json(min)));
    return x;
  }

 private:
  const nlohmann::json& j_;
  std::string src_, arch_;
  std::vector<std::string>& defaulted_;
};

// rope_theta from the top level (transformers 4.x) and/or rope_parameters / rope_scaling
// (5.x; 4.x's scaling), refusing every scaling but the default.
double read_rope(Keys& k, const nlohmann::json& j, double def) {
  bool have = false;
  double theta = def;
  std::string theta_from;
  auto take_theta = [&](const std::string& where, const nlohmann::json& v) {
    const double t = k.as_number(where, v, 0.0, true);
    if (have && t != theta)
      k.fail(where, "= " + dump_short(v) + " disagrees with " + theta_from + " = " + dump_short(nlohmann::json(theta)));
    have = true;
    theta = t;
    theta_from = where;
  };
  if (k.present("rope_theta")) take_theta("rope_theta", j.at("rope_theta"));
  for (const char* block : {"rope_parameters", "rope_scaling"}) {
    if (!k.present(block)) continue;
    const nlohmann::json& r = j.at(block);
    const std::string b = block;
    if (!r.is_object()) k.fail(b, "= " + dump_short(r) + " must be an object or null");
    // transformers 5 may give one set of parameters per attention type; moelab has one.
    for (auto it = r.begin(); it != r.end(); ++it)
      if (it.value().is_object())
        k.refuse(b + "." + it.key(), "per-layer-type rope parameters (moelab has one rotary embedding)");
    std::string type = "default";
    for (const char* tk : {"rope_type", "type"}) {
      if (!r.contains(tk)) continue;
      const nlohmann::json& t = r.at(tk);
      if (!t.is_string()) k.fail(b + "." + tk, "= " + dump_short(t) + " must be a string");
      type = t.get<std::string>();
      if (type != "default")
        k.refuse(b + "." + tk + " = '" + printable_name(type) + "'",
                 "moelab implements only the default rotary embedding (no linear, dynamic, yarn, "
                 "llama3 or longrope scaling)");
    }
    if (r.contains("rope_theta") && !r.at("rope_theta").is_null()) take_theta(b + ".rope_theta", r.at("rope_theta"));
    if (r.contains("partial_rotary_factor") && !r.at("partial_rotary_factor").is_null() &&
        k.as_number(b + ".partial_rotary_factor", r.at("partial_rotary_factor"), 0.0, true) != 1.0)
      k.refuse(b + ".partial_rotary_factor = " + dump_short(r.at("partial_rotary_factor")),
               "moelab rotates the whole head");
  }
  if (k.present("partial_rotary_factor") &&
      k.as_number("partial_rotary_factor", j.at("partial_rotary_factor"), 0.0, true) != 1.0)
    k.refuse("partial_rotary_factor = " + dump_short(j.at("partial_rotary_factor")), "moelab rotates the whole head");
  return theta;
}

}  // namespace

const char* to_string(HfArch a) {
  for (const ArchRow& r : kArchs)
    if (r.arch == a) return r.cls;
  return "?";
}

const char* hf_model_type(HfArch a) {
  for (const ArchRow& r : kArchs)
    if (r.arch == a) return r.model_type;
  return "?";
}

bool HfConfig::is_moe_layer(int64_t layer) const {
  if (arch == HfArch::Mixtral || arch == HfArch::Olmoe) return true;
  if (std::binary_search(mlp_only_layers.begin(), mlp_only_layers.end(), layer)) return false;
  return num_experts > 0 && (layer + 1) % decoder_sparse_step == 0;
}

HfConfig parse_hf_config(const std::string& text, const std::string& source) {
  const std::string what = "config.json " + source;
  nlohmann::json j;
  try {
    j = parse_json_strict(text, what, 32);
  } catch (const UsageError&) {
    throw;
  } catch (const Error& e) {
    throw UsageError(e.what());  // a defect of the file given, refused before any work
  }
  if (!j.is_object()) MOELAB_USAGE_FAIL(what, " is ", a_json_type(j), ", expected an object");

  HfConfig c;
  c.source = source;

  // The architecture: "architectures" (one class name), else "model_type".
  const ArchRow* row = nullptr;
  if (j.contains("architectures") && !j.at("architectures").is_null()) {
    const nlohmann::json& a = j.at("architectures");
    if (!a.is_array() || a.empty() || !std::all_of(a.begin(), a.end(), [](const nlohmann::json& x) { return x.is_string(); }))
      MOELAB_USAGE_FAIL(what, ": 'architectures' = ", dump_short(a), " must be a list of class names");
    if (a.size() != 1)
      MOELAB_USAGE_FAIL(what, ": 'architectures' names ", a.size(), " classes (", dump_short(a),
                        "); moelab imports exactly one of ", supported());
    const std::string cls = a[0].get<std::string>();
    for (const ArchRow& r : kArchs)
      if (cls == r.cls) row = &r;
    if (!row)
      MOELAB_USAGE_FAIL(what, ": architecture '", printable_name(cls), "' is not supported (supported: ",
                        supported(), ")");
  } else if (j.contains("model_type") && j.at("model_type").is_string()) {
    const std::string mt = j.at("model_type").get<std::string>();
    for (const ArchRow& r : kArchs)
      if (mt == r.model_type) row = &r;
    if (!row)
      MOELAB_USAGE_FAIL(what, ": model_type '", printable_name(mt), "' is not supported (supported: ",
                        supported(), ")");
  } else {
    MOELAB_USAGE_FAIL(what, " names no architecture (no 'architectures' and no 'model_type')");
  }
  c.arch = row->arch;
  c.architecture = row->cls;
  c.model_type = row->model_type;
  const bool mixtral = c.arch == HfArch::Mixtral, qwen2 = c.arch == HfArch::Qwen2Moe,
             qwen3 = c.arch == HfArch::Qwen3Moe, olmoe = c.arch == HfArch::Olmoe;
  Keys k(j, source, c.architecture, c.defaulted);
  if (k.present("model_type")) {
    const std::string mt = k.optional_string("model_type");
    if (mt != c.model_type)
      k.fail("model_type", "= '" + printable_name(mt) + "' does not match the architecture " + c.architecture +
                               " (model_type '" + c.model_type + "')");
  }

  // Shapes.
  c.vocab_size = k.required_int("vocab_size", 1);
  c.hidden_size = k.required_int("hidden_size", 1);
  c.num_hidden_layers = k.required_int("num_hidden_layers", 1);
  c.num_attention_heads = k.required_int("num_attention_heads", 1);
  if (j.contains("num_key_value_heads") && j.at("num_key_value_heads").is_null() && (mixtral || olmoe)) {
    c.num_key_value_heads = c.num_attention_heads;  // transformers: None means multi-head attention
  } else {
    c.num_key_value_heads = k.required_int("num_key_value_heads", 1);
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    k.fail("num_key_value_heads", "= " + std::to_string(c.num_key_value_heads) +
                                      " must divide num_attention_heads = " + std::to_string(c.num_attention_heads));
  if (k.present("head_dim")) {
    c.head_dim = k.as_int("head_dim", j.at("head_dim"), 1);
  } else {
    if (c.hidden_size % c.num_attention_heads != 0)
      k.fail("hidden_size", "= " + std::to_string(c.hidden_size) + " is not a multiple of num_attention_heads = " +
                                std::to_string(c.num_attention_heads) + " and there is no head_dim");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim % 2 != 0) k.fail("head_dim", "= " + std::to_string(c.head_dim) + " must be even (rotary embeddings)");
  c.intermediate_size = k.required_int("intermediate_size", 1);

  // Experts.
  const bool has_local = k.present("num_local_experts"), has_num = k.present("num_experts");
  if (!has_local && !has_num) k.fail("num_experts", "is missing (nor is there num_local_experts; " + c.architecture + " needs one)");
  if (has_local) c.num_experts = k.as_int("num_local_experts", j.at("num_local_experts"), 1);
  if (has_num) {
    const int64_t e = k.as_int("num_experts", j.at("num_experts"), 1);
    if (has_local && e != c.num_experts)
      k.fail("num_experts", "= " + std::to_string(e) + " disagrees with num_local_experts = " + std::to_string(c.num_experts));
    c.num_experts = e;
  }
  c.num_experts_per_tok = k.required_int("num_experts_per_tok", 1);
  if (c.num_experts_per_tok > c.num_experts)
    k.fail("num_experts_per_tok", "= " + std::to_string(c.num_experts_per_tok) + " exceeds the " +
                                      std::to_string(c.num_experts) + " experts");
  if (qwen2 || qwen3) {
    c.moe_intermediate_size = k.required_int("moe_intermediate_size", 1);
  } else {
    c.moe_intermediate_size = c.intermediate_size;
  }
  if (qwen2) {
    c.shared_expert_intermediate_size = k.required_int("shared_expert_intermediate_size", 1);
    c.shared_expert_gate = true;
  }
  // Mixtral always renormalises the top-k gates (softmax over the k selected logits).
  c.norm_topk_prob = mixtral ? true : k.optional_bool("norm_topk_prob", false);
  if (qwen2 || qwen3) {
    c.decoder_sparse_step = k.optional_int("decoder_sparse_step", 1, 1);
    if (k.present("mlp_only_layers")) {
      const nlohmann::json& m = j.at("mlp_only_layers");
      if (!m.is_array()) k.fail("mlp_only_layers", "= " + dump_short(m) + " must be a list of layer indices");
      std::set<int64_t> seen;
      for (const nlohmann::json& x : m) {
        const int64_t l = k.as_int("mlp_only_layers", x, 0);
        if (l >= c.num_hidden_layers)
          k.fail("mlp_only_layers", "has layer " + std::to_string(l) + ", but there are " +
                                        std::to_string(c.num_hidden_layers) + " layers (0-based)");
        if (!seen.insert(l).second) k.fail("mlp_only_layers", "lists layer " + std::to_string(l) + " twice");
      }
      c.mlp_only_layers.assign(seen.begin(), seen.end());
    } else if (!j.contains("mlp_only_layers")) {
      c.defaulted.push_back("mlp_only_layers");
    }
  }

  // Attention.
  if (qwen2) {
    c.qkv_bias = k.optional_bool("qkv_bias", true);  // older configs lack it: always biased
    c.o_bias = false;
  } else if (qwen3 || olmoe) {
    c.qkv_bias = c.o_bias = k.optional_bool("attention_bias", false);
  }
  c.qk_norm = qwen3 ? HfQkNorm::PerHead : olmoe ? HfQkNorm::WholeProjection : HfQkNorm::None;
  c.tie_word_embeddings = k.optional_bool("tie_word_embeddings", false);
  c.rms_norm_eps = k.optional_number("rms_norm_eps", (mixtral || olmoe) ? 1e-5 : 1e-6, 0.0, true);
  if (!k.present("rope_theta") && !k.present("rope_parameters")) c.defaulted.push_back("rope_theta");
  c.rope_theta = read_rope(k, j, mixtral ? 1e6 : 1e4);
  c.router_aux_loss_coef = k.optional_number("router_aux_loss_coef", olmoe ? 0.01 : 0.001, 0.0, false);
  if (mixtral) c.router_jitter_noise = k.optional_number("router_jitter_noise", 0.0, 0.0, false);
  if (k.present("max_position_embeddings")) c.max_position_embeddings = k.as_int("max_position_embeddings", j.at("max_position_embeddings"), 1);

  // Features moelab does not have.
  const std::string act = k.present("hidden_act") ? k.optional_string("hidden_act") : "silu";
  if (act != "silu") k.refuse("hidden_act = '" + printable_name(act) + "'", "moelab's MLPs and experts use SwiGLU (silu)");
  if (k.present("attention_dropout") && k.as_number("attention_dropout", j.at("attention_dropout"), 0.0, false) != 0.0)
    k.refuse("attention_dropout = " + dump_short(j.at("attention_dropout")), "moelab has no attention dropout");
  if (mixtral && k.present("sliding_window"))
    k.refuse("sliding_window = " + dump_short(j.at("sliding_window")), "moelab has no sliding-window attention");
  if ((qwen2 || qwen3) && k.present("use_sliding_window") && k.optional_bool("use_sliding_window", false))
    k.refuse("use_sliding_window = true", "moelab has no sliding-window attention");
  if (k.present("layer_types")) {
    const nlohmann::json& lt = j.at("layer_types");
    if (!lt.is_array()) k.fail("layer_types", "= " + dump_short(lt) + " must be a list");
    for (const nlohmann::json& t : lt)
      if (!t.is_string() || t.get<std::string>() != "full_attention")
        k.refuse("layer_types containing " + dump_short(t), "moelab has only full attention");
  }
  if (k.present("quantization_config")) {
    const nlohmann::json& q = j.at("quantization_config");
    const std::string method = q.is_object() && q.contains("quant_method") && q.at("quant_method").is_string()
                                   ? q.at("quant_method").get<std::string>() : std::string("?");
    k.refuse("quantization_config (quant_method '" + printable_name(method) + "')",
             "moelab imports unquantized weights only");
  }
  if (olmoe && k.present("clip_qkv"))
    k.refuse("clip_qkv = " + dump_short(j.at("clip_qkv")), "moelab does not clip q, k and v");

  // dtype (5.x) / torch_dtype (4.x).
  const std::string d5 = k.optional_string("dtype"), d4 = k.optional_string("torch_dtype");
  if (!d5.empty() && !d4.empty() && d5 != d4)
    k.fail("dtype", "= '" + printable_name(d5) + "' disagrees with torch_dtype = '" + printable_name(d4) + "'");
  c.dtype = d5.empty() ? d4 : d5;
  return c;
}

HfConfig read_hf_config(const std::string& path) {
  std::error_code ec;
  std::string file = path;
  if (fs::is_directory(path, ec)) file = (fs::path(path) / "config.json").string();
  const auto size = fs::file_size(file, ec);
  if (ec) MOELAB_FAIL("cannot open config.json ", file, ": ", ec.message());
  if (size > (16u << 20)) MOELAB_USAGE_FAIL("config.json ", file, " is ", size, " bytes, larger than 16 MiB");
  std::ifstream in(file, std::ios::binary);
  if (!in) MOELAB_FAIL("cannot open config.json ", file);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) MOELAB_FAIL("cannot read config.json ", file);
  return parse_hf_config(ss.str(), file);
}

}  // namespace moelab
