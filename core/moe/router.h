// moelab: the MoE router (Megatron-Core's split: scores -> selection -> capacity -> losses).
//
// The router always runs in fp32 (f64 when the model is f64, for gradient checks), whatever the
// model dtype: its input is cast up and its gate weights are cast back for the combine.
// Parameter gradients accumulate (+=); the returned dx overwrites.
//
// Dimension letters: T tokens, D width, E experts, K top-k, C capacity, A assignments
// (T*K for token choice, E*C for expert choice).
#pragma once
#include <cstdint>

#include "core/backend.h"
#include "core/moe/config.h"

namespace moelab {

class Communicator;

// Un-scaled router loss values (what the run log records) and the weighted sum that the layer
// adds to the training objective.
struct RouterLosses {
  double aux = 0;         // E * sum_i f_i P_i (1 at perfect balance)
  double z = 0;           // mean_t logsumexp(l_t)^2
  double importance = 0;  // CV(importance)^2
  double load = 0;        // CV(load)^2 (smooth estimator with noise, counts otherwise)
  double weighted = 0;    // aux_alpha aux + z_loss z + importance_weight imp + load_weight load
};

struct RouterParams {
  Tensor w_router;  // [D,E] router dtype
  Tensor w_noise;   // [D,E] router dtype, learned noisy top-k only
  Tensor bias;      // [E] f32, aux-loss-free balancing (selection only, no gradient)
  Tensor dw_router, dw_noise;
};

// Everything the backward pass needs, plus the routing result. Shapes in comments.
struct RouterState {
  bool training = false;
  int64_t batch_tokens = 0;  // T of the whole batch (T of this call without a batch group)
  int64_t token_offset = 0;  // global position of this call's first token (batch group: the
                             // tokens of the lower ranks); keys the random draws
  bool expert_choice = false;
  ScoreFunc score = ScoreFunc::Softmax;  // effective score function (Sinkhorn may override)
  bool normalize = true;                 // effective top-k renormalisation
  int64_t capacity = 0;                  // C (0 = dropless)
  int sinkhorn_iters = 0;
  uint64_t seed = 0;                     // base seed of this call's noise draws
  Tensor x_r;        // [T,D] router input: x itself, or in router dtype after jitter / for learned noise
  Tensor clean;      // [T,E] x_r W_r
  Tensor noise_raw;  // [T,E] x_r W_noise (learned noise)
  Tensor noise_std;  // [T,E] softplus(noise_raw)
  Tensor logits;     // [T,E] the logits that feed the scores (noisy in training)
  Tensor scores;     // [T,E] softmax or sigmoid of logits
  Tensor dist;       // [T,E] distribution for P_i and stats (scores, or row-normalised sigmoid)
  Tensor idx;        // i32 [T,K] experts (token choice) or [E,C] tokens (expert choice)
  Tensor keep;       // i32, same shape as idx: 1 = assignment kept
  Tensor gates;      // [T,K] or [E,C] router dtype; the flat [A] gate vector of the combine
  RouterLosses losses;  // with stats: valid once Router::forward_end has run
  RouterStats stats;
  PendingRouterSummary summary;  // between forward_begin and forward_end: the values on their way
};

// Token-weighted sums of router statistics and losses, to merge several router calls (ranks,
// micro-batches) into the statistics of their union: counts add, means are weighted by tokens,
// the logit maximum is the maximum. The one place such merges happen (the router's batch group,
// the trainer's micro-batches).
class RouterStatsSum {
 public:
  void add(const RouterStats& s, const RouterLosses& l, int64_t tokens);
  // Sums over the ranks of `group` (and the maximum of the logit maximum).
  void reduce(Communicator& group);
  int64_t tokens() const;
  // The merged statistics and token-weighted mean losses (s must have E entries per vector).
  void result(RouterStats& s, RouterLosses& l) const;

 private:
  std::vector<double> v_;  // [T, routed E, kept E, P*T E, entropy*T, top1*T, rms^2*T, unrouted,
                           //  aux*T, z*T, importance*T, load*T, weighted*T]
  double logit_max_ = 0;
};

class Router {
 public:
  Router(Backend& backend, const MoEConfig& cfg, DType router_dtype);
  RouterParams& params() { return p_; }
  DType dtype() const { return dtype_; }

  // The ranks whose tokens make up one batch (expert and data parallelism: the global batch is
  // split over them). When set, the statistics, the counts the losses use and the losses are
  // those of the whole batch (Megatron-Core's global-batch aux loss): counts and probability
  // sums are all-reduced over `group` before the losses are formed, and the loss gradients are
  // scaled by this rank's share of the tokens, so that the sum over ranks of every gradient is
  // the single-rank gradient; random draws (noise, random top-2) are keyed by the global token
  // position (the group's ranks hold the batch's tokens in rank order). Policies whose selection
  // couples tokens across the batch (expert choice, Sinkhorn), the Shazeer losses and expert
  // dropout are refused (check_batch_group).
  // loss_grad_weight multiplies this rank's router-loss gradients: 1 when the caller sums the
  // ranks' gradients (the layer test), the number of ranks W when it averages them (the
  // trainer's data-parallel mean), so that either way the batch's loss enters once.
  void set_batch_group(Communicator* group, double loss_grad_weight = 1.0);
  // Throws moelab::UsageError naming the keys when `cfg` cannot run with a batch group.
  static void check_batch_group(const MoEConfig& cfg);

  // x [T,D] in any float dtype. seq_len splits T for the sequence-level aux loss (0 = global).
  // seed: the draws of this call (noise, random top-2); derive it from (run seed, layer, step).
  RouterState forward(const Tensor& x, bool training, int64_t seq_len, uint64_t seed);
  // forward in two halves: begin queues the device work (the statistics and loss values start
  // their way to the host without waiting for them); end fills st.stats and st.losses. The MoE
  // layer runs the dispatch plan between them, whose copy of the expert counts waits for the
  // device anyway, so a layer waits once. With a batch group, begin does it all (the ranks
  // exchange their statistics on the host).
  RouterState forward_begin(const Tensor& x, bool training, int64_t seq_len, uint64_t seed);
  void forward_end(RouterState& st);
  // dgates: gradient of the objective w.r.t. st.gates (router dtype, same shape). Adds the
  // router-loss gradients with their config weights. Adds the input gradient to dx [T,D] (x's
  // dtype) and accumulates dw_router / dw_noise.
  void backward(const RouterState& st, const Tensor& x, const Tensor& dgates, int64_t seq_len,
                const Tensor& dx);
  // router.aux_convention = hf: the load-balancing loss is formed by the model from every MoE
  // layer's counts (Hugging Face's pooled loss), so this router's weighted loss leaves it out and
  // its backward adds the gradient the model computed: dL/dp_t,i = g[i] for every token t of this
  // call (times loss_grad_weight). Set once per forward, before backward.
  void set_pooled_aux_grad(std::vector<double> g) { pooled_aux_grad_ = std::move(g); }

  // DeepSeek-V3 aux-loss-free balancing, after the optimizer step:
  //   b_i <- b_i + u * sign(mean(c) - c_i), c = routed counts of the last call.
  void update_bias(const RouterStats& stats);

  // Capacity C = ceil(cf * T * K / E) (token choice) or ceil(cf * T / E) (expert choice, with
  // cf = 0 read as K so that compute matches top-K), clamped to [1, T]. 0 = dropless.
  static int64_t capacity_for(const MoEConfig& cfg, int64_t tokens);

 private:
  // Replaces st's local statistics and losses by the batch's (group_ set).
  void reduce_over_group(RouterState& st, int64_t seq_len, const RouterSummary& mine);
  void add_row_to_every_token(const std::vector<double>& g, const Tensor& d);
  void logits_grad(const RouterState& st, const Tensor& dgates, int64_t aux_seq, double share,
                   const Tensor& dlogits);

  Backend& b_;
  MoEConfig cfg_;
  DType dtype_;
  RouterParams p_;
  Communicator* group_ = nullptr;
  double group_weight_ = 1.0;
  std::vector<double> pooled_aux_grad_;  // [E], router.aux_convention = hf
};

}  // namespace moelab
