// moelab: conversion between Hugging Face MoE checkpoints (MixtralForCausalLM,
// Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM) and moelab's parameters.
//
// Config: run_config_from_hf maps config.json key by key onto moelab's [model] and [router]
// keys (docs/hf-import.md has the table) and refuses, by name, what moelab cannot represent;
// hf_config_for goes the other way for `export-hf --arch`, refusing the moelab features the
// Hugging Face class does not have.
//
// Weights: Hugging Face's nn.Linear stores [out, in]; moelab's matrices are [in, out], so every
// projection is transposed (exactly: a copy). Experts on disk come in two layouts:
//   per_expert  one tensor per expert and projection (w1/w3/w2 for Mixtral under
//               block_sparse_moe, gate_proj/up_proj/down_proj under mlp for the others) —
//               what the published checkpoints hold;
//   fused       mlp.experts.gate_up_proj [E, 2I, H] (gate rows first, then up) and
//               mlp.experts.down_proj [E, H, I] — what transformers 5 holds in memory and can write.
// moelab's experts.w1 [E, D, 2F] holds [gate | up] side by side and experts.w2 is [E, F, D].
// Import accepts exactly one layout (both at once is refused as ambiguous) and refuses any
// tensor it does not consume, any missing tensor, and any shape other than the one the config
// implies, naming the tensor. Values are converted to the requested dtype (exactly for bf16 or
// f32 sources into f32 or f64); export writes each tensor back in its original dtype, so import
// then export reproduces the original bytes.
#pragma once
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/io/config.h"
#include "core/io/hf_config.h"
#include "core/io/safetensors.h"
#include "core/tensor.h"

namespace moelab {

enum class HfExpertLayout { PerExpert, Fused };
const char* to_string(HfExpertLayout l);  // "per_expert", "fused"
HfExpertLayout hf_expert_layout_from(const std::string& name);  // refuses other names

// The moelab config of the model (model and router keys; train/data/log keys at their
// defaults, model.dtype bf16 when the checkpoint is bf16, else f32).
RunConfig run_config_from_hf(const HfConfig& hf);
// The Hugging Face config of a moelab model written as `arch`; refuses by name (UsageError) the
// features `arch` does not have (shared experts outside Qwen2-MoE, a missing q/k norm on
// Qwen3-MoE or OLMoE, capacity drops, non-softmax scores, ...).
HfConfig hf_config_for(const RunConfig& cfg, HfArch arch);
// config.json text (transformers 5 layout: rope_parameters, dtype) of `hf`.
std::string hf_config_json(const HfConfig& hf);
HfArch hf_arch_from(const std::string& name);  // "MixtralForCausalLM" or "mixtral"; refuses others

struct HfWeights {
  HfExpertLayout layout = HfExpertLayout::PerExpert;
  // moelab parameter name -> CPU tensor of the requested dtype, in moelab's parameter order.
  std::vector<std::pair<std::string, Tensor>> params;
  // moelab parameter name -> the safetensors dtype of the tensor(s) it came from ("BF16", ...).
  std::map<std::string, std::string> source_dtypes;
  double bytes_read = 0;  // bytes of tensor data read
};

// Reads every tensor of `st` into moelab's parameters (see above), tensor by tensor, releasing
// each source tensor's pages once converted.
HfWeights read_hf_weights(const ShardedSafetensorsReader& st, const HfConfig& hf, DType dtype);

// Writes `params` (moelab names -> CPU tensors) as `hf` in `layout` into DIR (config.json and
// model.safetensors, or shards of at most max_shard_bytes with an index). Each tensor gets the
// dtype `dtypes` names for its moelab parameter, else `default_dtype` ("F32", "BF16", ...).
// Refuses an existing file unless overwrite. Returns the files written.
std::vector<std::string> write_hf_checkpoint(const std::string& dir, const HfConfig& hf,
                                             const std::map<std::string, Tensor>& params,
                                             HfExpertLayout layout,
                                             const std::map<std::string, std::string>& dtypes,
                                             const std::string& default_dtype, uint64_t max_shard_bytes,
                                             bool overwrite);

}  // namespace moelab
