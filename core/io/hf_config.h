// moelab: a Hugging Face `config.json` of a supported MoE language model, read into a plain
// struct (the import of issue 11 maps it onto moelab's model). Supported: MixtralForCausalLM,
// Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM, in the layouts of transformers 4.x
// (top-level rope_theta, torch_dtype) and 5.x (rope_parameters, dtype). docs/safetensors.md
// lists every key, its default and its checks.
//
// Refused by name (moelab::UsageError whose message names the file and the key): another
// architecture; a missing key that sets a tensor shape (vocab_size, hidden_size,
// num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, the expert
// count, num_experts_per_tok, moe_intermediate_size and shared_expert_intermediate_size where
// the architecture has them); a value of the wrong JSON type or out of range; inconsistent
// values (heads not a multiple of kv heads, k > experts, ...); features moelab does not
// implement: rope scaling other than "default" (linear, dynamic, yarn, llama3, longrope, ...),
// partial rotary embeddings, sliding-window attention (Mixtral sliding_window, Qwen
// use_sliding_window, sliding layer_types), OLMoE clip_qkv, an activation other than silu,
// attention dropout. A key that is absent but has a transformers default that does not set a
// shape (rms_norm_eps, rope_theta, norm_topk_prob, tie_word_embeddings, the biases, ...) takes
// that default (transformers 5.17's, which are also 4.x's) and is listed in `defaulted`.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moelab {

enum class HfArch { Mixtral, Qwen2Moe, Qwen3Moe, Olmoe };
const char* to_string(HfArch a);       // the class name, "MixtralForCausalLM"
const char* hf_model_type(HfArch a);   // "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"

// RMSNorm on queries and keys before rotary embeddings: Qwen3-MoE per head (weights of
// head_dim), OLMoE over the whole projection (num_heads * head_dim for q, kv_heads * head_dim
// for k).
enum class HfQkNorm { None, PerHead, WholeProjection };

struct HfConfig {
  std::string source;        // the file read (for messages)
  HfArch arch = HfArch::Mixtral;
  std::string architecture;  // "MixtralForCausalLM"
  std::string model_type;    // "mixtral"

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  // head_dim, or hidden_size / num_attention_heads when absent or null

  // Dense MLP width: the layers that are not MoE (Qwen's mlp_only_layers and
  // decoder_sparse_step); Mixtral and OLMoE have none and their experts have this width.
  int64_t intermediate_size = 0;
  int64_t moe_intermediate_size = 0;             // each routed expert's width
  int64_t shared_expert_intermediate_size = 0;   // Qwen2-MoE's shared expert; 0 = none
  bool shared_expert_gate = false;               // Qwen2-MoE: sigmoid gate on the shared expert

  int64_t num_experts = 0;          // num_local_experts or num_experts
  int64_t num_experts_per_tok = 0;  // k
  bool norm_topk_prob = true;       // renormalise the top-k gates (Mixtral: always)
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;  // sorted

  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // biases on q, k, v projections
  bool o_bias = false;    // bias on the output projection
  HfQkNorm qk_norm = HfQkNorm::None;

  double rms_norm_eps = 0;
  double rope_theta = 0;
  double router_aux_loss_coef = 0;
  double router_jitter_noise = 0;        // Mixtral: multiplicative input jitter, training only
  int64_t max_position_embeddings = -1;  // -1 when absent
  std::string dtype;                     // "bfloat16", ...; "" when absent or null

  std::vector<std::string> defaulted;  // keys absent from the file that took a default

  // Whether decoder layer `layer` has an MoE block (else a dense MLP of intermediate_size).
  bool is_moe_layer(int64_t layer) const;
};

// Reads `path`: a config.json, or a folder holding one.
HfConfig read_hf_config(const std::string& path);
// Parses the text of a config.json; `source` names it in messages.
HfConfig parse_hf_config(const std::string& json_text, const std::string& source);

}  // namespace moelab
