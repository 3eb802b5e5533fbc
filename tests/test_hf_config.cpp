// moelab tests: Hugging Face config.json (core/io/hf_config.h).
//
// Two layouts: configs saved by transformers 5.17 (tests/golden/hf/<arch>/config.json, tiny models
// made by tests/reference/make_safetensors_golden.py, and default_config.json, each class's
// defaults), and transformers 4.x configs written here in the shape of the published ones
// (Mixtral-8x7B, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, OLMoE-1B-7B: top-level rope_theta,
// torch_dtype). Every refusal is checked by its message.
#include <algorithm>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "catch_compat.h"
#include "core/check.h"
#include "core/io/hf_config.h"
#include "temp_dir.h"

using namespace moelab;
using moelab::test::TempDir;

namespace {

const std::string kData = MOELAB_GOLDEN_DIR;

template <class F> std::string error_of(F&& f) {
  try {
    f();
  } catch (const moelab::UsageError& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("expected a moelab::UsageError, got: " << e.what());
  }
  FAIL("expected a moelab::UsageError, nothing was thrown");
  return "";
}

bool has(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

// transformers 4.x configs in the shape of the published ones.
const char* kMixtral4 = R"({
  "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
  "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
  "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
  "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": false,
  "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
  "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.36.0", "use_cache": true, "vocab_size": 32000})";

const char* kQwen2Moe4 = R"({
  "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
  "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21,
  "model_type": "qwen2_moe", "num_attention_heads": 16, "num_hidden_layers": 24,
  "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
  "sliding_window": 32768, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.40.0", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 151936, "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
  "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
  "norm_topk_prob": false, "output_router_logits": false, "router_aux_loss_coef": 0.001})";

const char* kQwen3Moe4 = R"({
  "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
  "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
  "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
  "norm_topk_prob": true, "num_attention_heads": 32, "num_experts": 128,
  "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
  "output_router_logits": false, "rms_norm_eps": 1e-06, "rope_scaling": null,
  "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": null,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
  "use_cache": true, "use_sliding_window": false, "vocab_size": 151936})";

const char* kOlmoe4 = R"({
  "architectures": ["OlmoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "clip_qkv": null, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
  "initializer_range": 0.02, "intermediate_size": 1024, "max_position_embeddings": 4096,
  "model_type": "olmoe", "norm_topk_prob": false, "num_attention_heads": 16, "num_experts": 64,
  "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16,
  "output_router_logits": false, "pad_token_id": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
  "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": false,
  "torch_dtype": "float32", "transformers_version": "4.43.0", "use_cache": true, "vocab_size": 50304})";

// `base` with top-level keys replaced or added (null values kept as null), or removed.
std::string edit(const char* base, const nlohmann::json& set, const std::vector<std::string>& remove = {}) {
  nlohmann::json j = nlohmann::json::parse(base);
  for (auto it = set.begin(); it != set.end(); ++it) j[it.key()] = it.value();
  for (const std::string& k : remove) j.erase(k);
  return j.dump();
}

}  // namespace

TEST_CASE("hf config: configs saved by transformers 5.17, four architectures") {
  HfConfig m = read_hf_config(kData + "/hf/mixtral");  // a folder: its config.json
  CHECK(m.arch == HfArch::Mixtral);
  CHECK(m.architecture == "MixtralForCausalLM");
  CHECK(m.vocab_size == 96);
  CHECK(m.hidden_size == 16);
  CHECK(m.num_hidden_layers == 2);
  CHECK(m.num_attention_heads == 4);
  CHECK(m.num_key_value_heads == 2);
  CHECK(m.head_dim == 4);  // "head_dim": null
  CHECK(m.intermediate_size == 24);
  CHECK(m.moe_intermediate_size == 24);
  CHECK(m.num_experts == 4);
  CHECK(m.num_experts_per_tok == 2);
  CHECK(m.norm_topk_prob);
  CHECK(m.rope_theta == 1e6);
  CHECK(m.rms_norm_eps == 1e-5);
  CHECK(m.router_aux_loss_coef == 0.001);
  CHECK(m.router_jitter_noise == 0.0);
  CHECK(m.dtype == "bfloat16");
  CHECK(m.max_position_embeddings == 64);
  CHECK_FALSE(m.tie_word_embeddings);
  CHECK_FALSE(m.qkv_bias);
  CHECK(m.qk_norm == HfQkNorm::None);
  CHECK(m.is_moe_layer(0));
  CHECK(m.is_moe_layer(1));
  CHECK(m.defaulted.empty());

  HfConfig q2 = read_hf_config(kData + "/hf/qwen2_moe/config.json");
  CHECK(q2.arch == HfArch::Qwen2Moe);
  CHECK(q2.intermediate_size == 40);
  CHECK(q2.moe_intermediate_size == 12);
  CHECK(q2.shared_expert_intermediate_size == 20);
  CHECK(q2.shared_expert_gate);
  CHECK(q2.num_experts == 4);
  CHECK_FALSE(q2.norm_topk_prob);
  CHECK(q2.mlp_only_layers == std::vector<int64_t>{0});
  CHECK_FALSE(q2.is_moe_layer(0));
  CHECK(q2.is_moe_layer(1));
  CHECK(q2.qkv_bias);
  CHECK_FALSE(q2.o_bias);
  CHECK(q2.rope_theta == 1e4);
  CHECK(q2.rms_norm_eps == 1e-6);
  CHECK(q2.defaulted.empty());

  HfConfig q3 = read_hf_config(kData + "/hf/qwen3_moe/config.json");
  CHECK(q3.arch == HfArch::Qwen3Moe);
  CHECK(q3.head_dim == 8);  // not hidden_size / heads = 4
  CHECK(q3.num_experts == 4);  // saved as num_local_experts
  CHECK(q3.norm_topk_prob);
  CHECK(q3.qk_norm == HfQkNorm::PerHead);
  CHECK_FALSE(q3.qkv_bias);
  CHECK(q3.mlp_only_layers.empty());
  CHECK(q3.is_moe_layer(0));

  HfConfig o = read_hf_config(kData + "/hf/olmoe/config.json");
  CHECK(o.arch == HfArch::Olmoe);
  CHECK(o.qk_norm == HfQkNorm::WholeProjection);
  CHECK(o.moe_intermediate_size == 12);
  CHECK(o.router_aux_loss_coef == 0.01);
  CHECK_FALSE(o.norm_topk_prob);
  CHECK(o.shared_expert_intermediate_size == 0);
}

TEST_CASE("hf config: each class's defaults as transformers 5.17 writes them (model_type, no architectures)") {
  HfConfig m = read_hf_config(kData + "/hf/mixtral/default_config.json");
  CHECK(m.arch == HfArch::Mixtral);
  CHECK(m.vocab_size == 32000);
  CHECK(m.hidden_size == 4096);
  CHECK(m.intermediate_size == 14336);
  CHECK(m.num_key_value_heads == 8);
  CHECK(m.head_dim == 128);
  CHECK(m.num_experts == 8);
  CHECK(m.rope_theta == 1e6);
  HfConfig q2 = read_hf_config(kData + "/hf/qwen2_moe/default_config.json");
  CHECK(q2.num_experts == 60);
  CHECK(q2.num_experts_per_tok == 4);
  CHECK(q2.moe_intermediate_size == 1408);
  CHECK(q2.shared_expert_intermediate_size == 5632);
  CHECK(q2.qkv_bias);
  HfConfig q3 = read_hf_config(kData + "/hf/qwen3_moe/default_config.json");
  CHECK(q3.num_experts == 128);
  CHECK(q3.num_key_value_heads == 4);
  CHECK(q3.head_dim == 64);
  HfConfig o = read_hf_config(kData + "/hf/olmoe/default_config.json");
  CHECK(o.num_experts == 64);
  CHECK(o.num_experts_per_tok == 8);
  CHECK(o.vocab_size == 50304);
}

TEST_CASE("hf config: transformers 4.x layout (top-level rope_theta, torch_dtype)") {
  HfConfig m = parse_hf_config(kMixtral4, "mixtral.json");
  CHECK(m.num_experts == 8);
  CHECK(m.head_dim == 128);
  CHECK(m.rope_theta == 1e6);
  CHECK(m.router_aux_loss_coef == 0.02);
  CHECK(m.dtype == "bfloat16");
  CHECK(m.defaulted == std::vector<std::string>{"router_jitter_noise"});

  HfConfig q2 = parse_hf_config(kQwen2Moe4, "qwen2.json");
  CHECK(q2.num_experts == 60);
  CHECK(q2.qkv_bias);  // absent in 4.x configs: Qwen2-MoE attention always has q/k/v biases
  CHECK(has(q2.defaulted, "qkv_bias"));
  CHECK(has(q2.defaulted, "mlp_only_layers"));
  CHECK(q2.rope_theta == 1e6);
  CHECK(q2.max_position_embeddings == 8192);
  for (int l = 0; l < 24; ++l) CHECK(q2.is_moe_layer(l));

  HfConfig q3 = parse_hf_config(kQwen3Moe4, "qwen3.json");
  CHECK(q3.head_dim == 128);
  CHECK(q3.num_key_value_heads == 4);
  CHECK(q3.norm_topk_prob);
  CHECK(q3.defaulted.empty());

  HfConfig o = parse_hf_config(kOlmoe4, "olmoe.json");
  CHECK(o.intermediate_size == 1024);
  CHECK(o.dtype == "float32");
  CHECK(o.rope_theta == 1e4);

  // rope_parameters and rope_theta may both be given when they agree; a null rope_scaling or a
  // "default" one is fine; dtype and torch_dtype likewise.
  HfConfig both = parse_hf_config(edit(kMixtral4, {{"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 1e6}}},
                                                   {"rope_scaling", {{"type", "default"}}}, {"dtype", "bfloat16"}}),
                                  "x");
  CHECK(both.rope_theta == 1e6);
  // Defaults for absent keys that set no shape, listed.
  HfConfig d = parse_hf_config(edit(kOlmoe4, {}, {"rms_norm_eps", "rope_theta", "norm_topk_prob", "tie_word_embeddings", "attention_bias"}), "x");
  CHECK(d.rms_norm_eps == 1e-5);
  CHECK(d.rope_theta == 1e4);
  CHECK_FALSE(d.norm_topk_prob);
  for (const char* k : {"rms_norm_eps", "rope_theta", "norm_topk_prob", "tie_word_embeddings", "attention_bias"}) CHECK(has(d.defaulted, k));
  // num_key_value_heads null means multi-head attention (Mixtral, OLMoE).
  CHECK(parse_hf_config(edit(kOlmoe4, {{"num_key_value_heads", nullptr}}), "x").num_key_value_heads == 16);
  // decoder_sparse_step and mlp_only_layers (Qwen).
  HfConfig sp = parse_hf_config(edit(kQwen2Moe4, {{"decoder_sparse_step", 2}, {"mlp_only_layers", {5, 1}}}), "x");
  CHECK(sp.mlp_only_layers == std::vector<int64_t>{1, 5});
  CHECK_FALSE(sp.is_moe_layer(0));
  CHECK_FALSE(sp.is_moe_layer(1));  // listed
  CHECK(sp.is_moe_layer(3));
  CHECK_FALSE(sp.is_moe_layer(5));  // listed
  CHECK(sp.is_moe_layer(7));
}

TEST_CASE("hf config: unsupported architectures and features are refused by name") {
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"architectures", {"DeepseekV3ForCausalLM"}}}), "c.json"); }),
             has_substr("config.json c.json: architecture 'DeepseekV3ForCausalLM' is not supported (supported: "
                        "MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM)"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"architectures", {"MixtralForCausalLM", "X"}}}), "c"); }),
             has_substr("'architectures' names 2 classes"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"model_type", "llama"}}, {"architectures"}), "c"); }),
             has_substr("model_type 'llama' is not supported"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"model_type", "qwen2_moe"}}), "c"); }),
             has_substr("'model_type' = 'qwen2_moe' does not match the architecture MixtralForCausalLM"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {}, {"architectures", "model_type"}), "c"); }),
             has_substr("names no architecture"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"rope_scaling", {{"type", "yarn"}, {"factor", 4.0}}}}), "c"); }),
             has_substr("MixtralForCausalLM with rope_scaling.type = 'yarn' is not supported"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kQwen3Moe4, {{"rope_parameters", {{"rope_type", "linear"}, {"factor", 2.0}}}}), "c"); }),
             has_substr("Qwen3MoeForCausalLM with rope_parameters.rope_type = 'linear' is not supported"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kQwen3Moe4, {{"rope_parameters", {{"full_attention", {{"rope_type", "default"}}}}}}), "c"); }),
             has_substr("rope_parameters.full_attention is not supported: per-layer-type rope parameters"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kOlmoe4, {{"partial_rotary_factor", 0.5}}), "c"); }),
             has_substr("partial_rotary_factor = 0.5 is not supported"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"sliding_window", 4096}}), "c"); }),
             has_substr("MixtralForCausalLM with sliding_window = 4096 is not supported: moelab has no sliding-window attention"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kQwen2Moe4, {{"use_sliding_window", true}}), "c"); }),
             has_substr("Qwen2MoeForCausalLM with use_sliding_window = true is not supported"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kQwen2Moe4, {{"layer_types", {"full_attention", "sliding_attention"}}}), "c"); }),
             has_substr("layer_types containing \"sliding_attention\" is not supported"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kOlmoe4, {{"clip_qkv", 8.0}}), "c"); }),
             has_substr("OlmoeForCausalLM with clip_qkv = 8.0 is not supported"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"quantization_config", {{"quant_method", "gptq"}, {"bits", 4}}}}), "c"); }),
             has_substr("MixtralForCausalLM with quantization_config (quant_method 'gptq') is not supported"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kOlmoe4, {{"hidden_act", "gelu"}}), "c"); }),
             has_substr("hidden_act = 'gelu' is not supported"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kOlmoe4, {{"attention_dropout", 0.1}}), "c"); }),
             has_substr("attention_dropout = 0.1 is not supported"));
}

TEST_CASE("hf config: missing keys, wrong types and inconsistent values are named") {
  for (const char* key : {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "intermediate_size", "num_experts_per_tok"}) {
    INFO(key);
    CHECK_THAT(error_of([&] { parse_hf_config(edit(kQwen3Moe4, {}, {key}), "c"); }),
               has_substr(std::string("'") + key + "' is missing (Qwen3MoeForCausalLM needs it"));
  }
  CHECK_THAT(error_of([] { parse_hf_config(edit(kQwen3Moe4, {}, {"moe_intermediate_size"}), "c"); }),
             has_substr("'moe_intermediate_size' is missing"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kQwen2Moe4, {}, {"shared_expert_intermediate_size"}), "c"); }),
             has_substr("'shared_expert_intermediate_size' is missing"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {}, {"num_local_experts"}), "c"); }),
             has_substr("'num_experts' is missing (nor is there num_local_experts"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kQwen2Moe4, {{"num_key_value_heads", nullptr}}), "c"); }),
             has_substr("'num_key_value_heads' is null"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"hidden_size", 4096.0}}), "c"); }),
             has_substr("'hidden_size' = 4096.0 must be an integer"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"hidden_size", "4096"}}), "c"); }),
             has_substr("'hidden_size' = \"4096\" must be an integer"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"num_hidden_layers", 0}}), "c"); }),
             has_substr("'num_hidden_layers' = 0 must be >= 1"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"tie_word_embeddings", 1}}), "c"); }),
             has_substr("'tie_word_embeddings' = 1 must be true or false"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"rms_norm_eps", 0}}), "c"); }),
             has_substr("'rms_norm_eps' = 0 must be > 0"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"num_key_value_heads", 5}}), "c"); }),
             has_substr("'num_key_value_heads' = 5 must divide num_attention_heads = 32"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"num_experts_per_tok", 9}}), "c"); }),
             has_substr("'num_experts_per_tok' = 9 exceeds the 8 experts"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"num_experts", 16}}), "c"); }),
             has_substr("'num_experts' = 16 disagrees with num_local_experts = 8"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"hidden_size", 4095}}), "c"); }),
             has_substr("'hidden_size' = 4095 is not a multiple of num_attention_heads = 32 and there is no head_dim"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"rope_parameters", {{"rope_theta", 10000.0}}}}), "c"); }),
             has_substr("'rope_parameters.rope_theta' = 10000.0 disagrees with rope_theta = 1000000.0"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"rope_theta", -1}}), "c"); }),
             has_substr("'rope_theta' = -1 must be > 0"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kQwen2Moe4, {{"mlp_only_layers", {0, 24}}}), "c"); }),
             has_substr("'mlp_only_layers' has layer 24, but there are 24 layers"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kQwen2Moe4, {{"mlp_only_layers", {3, 3}}}), "c"); }),
             has_substr("'mlp_only_layers' lists layer 3 twice"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kQwen2Moe4, {{"decoder_sparse_step", 0}}), "c"); }),
             has_substr("'decoder_sparse_step' = 0 must be >= 1"));
  CHECK_THAT(error_of([] { parse_hf_config(edit(kMixtral4, {{"dtype", "float32"}}), "c"); }),
             has_substr("'dtype' = 'float32' disagrees with torch_dtype = 'bfloat16'"));
  CHECK_THAT(error_of([] { parse_hf_config(R"({"hidden_size": 1, "hidden_size": 2})", "c"); }),
             has_substr("config.json c: duplicate key 'hidden_size' in the top-level object"));
  CHECK_THAT(error_of([] { parse_hf_config("{\"a\":", "c"); }), has_substr("config.json c is not valid JSON"));
  CHECK_THAT(error_of([] { parse_hf_config("[1]", "c"); }), has_substr("is an array, expected an object"));

  // Files: a missing one is an I/O error (not a usage error).
  TempDir tmp("hf");
  CHECK_THROWS_AS(read_hf_config(tmp.path("nope.json")), Error);
  const std::string p = tmp.write("config.json", kOlmoe4);
  CHECK(read_hf_config(tmp.dir.string()).source == p);
}
