// moelab: the MoE layer's configuration, one field per config key of DESIGN.md.
//
// Every field here maps 1:1 to an INI key ([model] or [router]); core/io/config.cpp parses and
// validates them (accepted values, ranges) and MoEConfig::validate() re-checks the invariants
// that the layer itself relies on, so a programmatic caller gets the same clear errors.
#pragma once
#include "core/drop_policy.h"
#include <cstdint>
#include <string>

namespace moelab {

enum class ScoreFunc { Softmax, Sigmoid };                         // router.score
enum class RoutingPolicy { TopK, RandomTop2, Sinkhorn, ExpertChoice };  // router.policy
enum class NoiseType { None, Jitter, Gaussian, Learned };         // router.noise
// DropPolicy (router.drop_policy) is in core/drop_policy.h, below the backend interface that
// takes it.
enum class AuxLossType { Global, Sequence };                       // router.aux_loss_type
enum class BalanceScope { Batch, MicroBatch };                     // router.balance_scope
// router.aux_convention: how the Switch load-balancing loss is formed. moelab: per MoE layer,
// E * sum_i f_i P_i with f_i = routed_i / (T K) (1 at perfect balance), summed over layers.
// hf: Hugging Face's load_balancing_loss_func (Mixtral, Qwen-MoE, OLMoE): the counts and the
// probabilities pooled over all MoE layers' tokens, f_i = routed_i / (L T) (k assignments per
// token, so k at perfect balance), one loss for the model.
enum class AuxConvention { Moelab, Hf };
// model.qk_norm: RMSNorm on queries and keys before the rotary embedding. head: per head, weights
// of head_dim (Qwen3-MoE); projection: over the whole q / k projection (OLMoE).
enum class QkNorm { None, Head, Projection };

// train.recompute: activations that forward drops and backward recomputes, for memory (the
// results are bit-identical: the same ops on the same inputs). mlp: the expert and dense FFN
// hidden activations (X W1 and SwiGLU's output, R x 3F per MoE layer); attention: the
// projections, RoPE'd q and k, the attention output and its log-sum-exp; all: both.
enum class Recompute { None, Mlp, Attention, All };

const char* to_string(ScoreFunc v);
const char* to_string(RoutingPolicy v);
const char* to_string(NoiseType v);
const char* to_string(DropPolicy v);
const char* to_string(AuxLossType v);
const char* to_string(BalanceScope v);
const char* to_string(AuxConvention v);
const char* to_string(QkNorm v);
const char* to_string(Recompute v);

struct RouterConfig {
  ScoreFunc score = ScoreFunc::Softmax;          // router.score
  bool normalize = true;                         // router.normalize: renormalise the top-k gates
  double score_scale = 1.0;                      // router.score_scale: gates *= this (DeepSeek-V3)
  RoutingPolicy policy = RoutingPolicy::TopK;    // router.policy
  double random_top2_threshold = 0.5;            // router.random_top2_threshold (tau), see router.cpp
  NoiseType noise = NoiseType::None;             // router.noise (training only)
  double noise_eps = 1e-2;                       // router.noise_eps: jitter eps / Gaussian sigma
  double aux_alpha = 0.0;                        // router.aux_alpha: Switch load-balancing weight
  AuxConvention aux_convention = AuxConvention::Moelab;  // router.aux_convention
  AuxLossType aux_loss_type = AuxLossType::Global;  // router.aux_loss_type
  // router.balance_scope: the tokens whose counts the balancing losses, the z-loss mean and the
  // statistics cover: the step's whole batch across ranks (Megatron-Core's global-batch aux
  // loss), or each router call's own tokens (one rank's share, one gradient-accumulation
  // micro-batch: GShard's per-group losses). The same on one rank without accumulation.
  BalanceScope balance_scope = BalanceScope::Batch;
  double z_loss = 0.0;                           // router.z_loss: ST-MoE router z-loss weight beta
  double importance_weight = 0.0;                // router.importance_weight: Shazeer CV^2(importance)
  double load_weight = 0.0;                      // router.load_weight: Shazeer CV^2(load)
  double capacity_factor = 0.0;                  // router.capacity_factor: 0 = dropless
  DropPolicy drop_policy = DropPolicy::Position; // router.drop_policy
  bool pad_to_capacity = false;                  // router.pad_to_capacity
  double bias_update_rate = 0.0;                 // router.bias_update_rate: 0 = no aux-free bias
  int sinkhorn_max_iters = 100;                  // router.sinkhorn_max_iters
  double sinkhorn_tol = 1e-4;                    // router.sinkhorn_tol
  // router.force_balance (speed studies only, as Megatron-Core benchmarks throughput): the
  // router computes everything as usual (logits, scores, top-k, losses, statistics), then the
  // chosen experts are replaced by the round-robin assignment expert((t K + j) mod E) and the
  // gates taken from the scores of those experts. Training and evaluation alike.
  bool force_balance = false;
};

struct MoEConfig {
  int64_t d_model = 64;          // model.d_model (D)
  int64_t experts = 8;           // model.experts (E)
  int64_t top_k = 2;             // model.top_k (K)
  int64_t d_expert = 128;        // model.d_expert (F)
  int64_t shared_experts = 0;    // model.shared_experts: always-on experts, width d_expert each
  bool shared_gate = false;      // model.shared_gate: sigmoid gate on the shared output (Qwen2-MoE)
  int64_t shared_width = 0;      // model.shared_width: the shared MLP's hidden width; 0 =
                                 // shared_experts * d_expert (Qwen2-MoE sets its own)
  int64_t shared_hidden() const { return shared_width > 0 ? shared_width : shared_experts * d_expert; }
  double expert_dropout = 0.0;   // model.expert_dropout: dropout on the expert hidden (training)
  RouterConfig router;

  // Throws moelab::Error naming the offending key when the combination is invalid.
  void validate() const;
};

}  // namespace moelab
