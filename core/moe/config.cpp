// moelab: names of the MoE config enums and MoEConfig::validate().
//
// The enum names here are the INI spellings: core/io/config.cpp parses by comparing against
// to_string(), so adding an enum value means adding its name here and nowhere else.
// validate() messages name the INI key ("model.top_k = 9 must be <= model.experts = 8") so a
// programmatic caller gets the same diagnostics as a config-file user.
#include "core/moe/config.h"

#include <charconv>
#include <cmath>

#include "core/check.h"

namespace moelab {

const char* to_string(ScoreFunc v) {
  switch (v) {
    case ScoreFunc::Softmax: return "softmax";
    case ScoreFunc::Sigmoid: return "sigmoid";
  }
  return "?";
}

const char* to_string(RoutingPolicy v) {
  switch (v) {
    case RoutingPolicy::TopK: return "topk";
    case RoutingPolicy::RandomTop2: return "random_top2";
    case RoutingPolicy::Sinkhorn: return "sinkhorn";
    case RoutingPolicy::ExpertChoice: return "expert_choice";
  }
  return "?";
}

const char* to_string(NoiseType v) {
  switch (v) {
    case NoiseType::None: return "none";
    case NoiseType::Jitter: return "jitter";
    case NoiseType::Gaussian: return "gaussian";
    case NoiseType::Learned: return "learned";
  }
  return "?";
}

const char* to_string(DropPolicy v) {
  switch (v) {
    case DropPolicy::Position: return "position";
    case DropPolicy::Probs: return "probs";
  }
  return "?";
}

const char* to_string(BalanceScope v) {
  switch (v) {
    case BalanceScope::Batch: return "batch";
    case BalanceScope::MicroBatch: return "micro_batch";
  }
  return "?";
}

const char* to_string(AuxConvention v) {
  switch (v) {
    case AuxConvention::Moelab: return "moelab";
    case AuxConvention::Hf: return "hf";
  }
  return "?";
}

const char* to_string(Recompute v) {
  switch (v) {
    case Recompute::None: return "none";
    case Recompute::Mlp: return "mlp";
    case Recompute::Attention: return "attention";
    case Recompute::All: return "all";
  }
  return "?";
}

const char* to_string(QkNorm v) {
  switch (v) {
    case QkNorm::None: return "none";
    case QkNorm::Head: return "head";
    case QkNorm::Projection: return "projection";
  }
  return "?";
}

const char* to_string(AuxLossType v) {
  switch (v) {
    case AuxLossType::Global: return "global";
    case AuxLossType::Sequence: return "sequence";
  }
  return "?";
}

namespace {

// Shortest text that reads back to the same double (so messages show what the user wrote).
std::string num(double v) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

// `!(v >= lo)` rather than `v < lo` so that NaN fails every check.
void require_ge(const char* key, double v, double lo) {
  if (!(v >= lo)) MOELAB_USAGE_FAIL(key, " = ", num(v), " must be >= ", num(lo));
}
void require_gt(const char* key, double v, double lo) {
  if (!(v > lo)) MOELAB_USAGE_FAIL(key, " = ", num(v), " must be > ", num(lo));
}

}  // namespace

void MoEConfig::validate() const {
  if (experts < 1) MOELAB_USAGE_FAIL("model.experts = ", experts, " must be >= 1");
  if (top_k < 1) MOELAB_USAGE_FAIL("model.top_k = ", top_k, " must be >= 1");
  if (top_k > experts)
    MOELAB_USAGE_FAIL("model.top_k = ", top_k, " must be <= model.experts = ", experts);
  if (d_model < 1) MOELAB_USAGE_FAIL("model.d_model = ", d_model, " must be > 0");
  if (d_expert < 1) MOELAB_USAGE_FAIL("model.d_expert = ", d_expert, " must be > 0");
  if (shared_experts < 0) MOELAB_USAGE_FAIL("model.shared_experts = ", shared_experts, " must be >= 0");
  if (shared_gate && shared_experts == 0)
    MOELAB_USAGE_FAIL("model.shared_gate = true needs model.shared_experts >= 1 (it gates their output)");
  if (shared_width < 0) MOELAB_USAGE_FAIL("model.shared_width = ", shared_width, " must be >= 0 (0 = shared_experts * d_expert)");
  if (shared_width > 0 && shared_experts == 0)
    MOELAB_USAGE_FAIL("model.shared_width = ", shared_width, " needs model.shared_experts >= 1 (it is their width)");
  if (!(expert_dropout >= 0.0 && expert_dropout < 1.0))
    MOELAB_USAGE_FAIL("model.expert_dropout = ", num(expert_dropout), " must be in [0, 1)");

  const RouterConfig& r = router;
  require_gt("router.score_scale", r.score_scale, 0.0);
  require_gt("router.random_top2_threshold", r.random_top2_threshold, 0.0);
  require_ge("router.noise_eps", r.noise_eps, 0.0);
  require_ge("router.aux_alpha", r.aux_alpha, 0.0);
  require_ge("router.z_loss", r.z_loss, 0.0);
  require_ge("router.importance_weight", r.importance_weight, 0.0);
  require_ge("router.load_weight", r.load_weight, 0.0);
  require_ge("router.capacity_factor", r.capacity_factor, 0.0);
  require_ge("router.bias_update_rate", r.bias_update_rate, 0.0);
  require_gt("router.sinkhorn_tol", r.sinkhorn_tol, 0.0);
  if (r.sinkhorn_max_iters < 1)
    MOELAB_USAGE_FAIL("router.sinkhorn_max_iters = ", r.sinkhorn_max_iters, " must be >= 1");
  if (r.policy == RoutingPolicy::RandomTop2 && top_k != 2)
    MOELAB_USAGE_FAIL("router.policy = random_top2 requires model.top_k = 2 (got ", top_k, ")");
  const bool expert_choice = r.policy == RoutingPolicy::ExpertChoice;
  if (expert_choice && r.score != ScoreFunc::Softmax)
    MOELAB_USAGE_FAIL("router.policy = expert_choice uses softmax scores (Zhou et al. 2022); "
                "set router.score = softmax");
  // Token-choice balancing losses have no meaning when experts pick tokens (balanced by
  // construction): refuse rather than silently ignore the weight.
  if (expert_choice && (r.aux_alpha > 0 || r.importance_weight > 0 || r.load_weight > 0))
    MOELAB_USAGE_FAIL("router.aux_alpha / importance_weight / load_weight must be 0 with router.policy = "
                "expert_choice (it is balanced by construction)");
  if (r.bias_update_rate > 0 && r.policy != RoutingPolicy::TopK && r.policy != RoutingPolicy::RandomTop2)
    MOELAB_USAGE_FAIL("router.bias_update_rate > 0 (aux-loss-free balancing) needs router.policy = topk "
                "or random_top2, got ", to_string(r.policy));
  // Shazeer's smooth load estimator needs noise (it is a probability over the noise draw) and a
  // k-th largest competitor among the other experts.
  if (r.load_weight > 0 && r.noise != NoiseType::Gaussian && r.noise != NoiseType::Learned)
    MOELAB_USAGE_FAIL("router.load_weight > 0 needs router.noise = gaussian or learned (the smooth load "
                "estimator is a probability over the noise), got ", to_string(r.noise));
  if (r.load_weight > 0 && r.noise == NoiseType::Gaussian && !(r.noise_eps > 0))
    MOELAB_USAGE_FAIL("router.load_weight > 0 with router.noise = gaussian needs router.noise_eps > 0");
  if (r.load_weight > 0 && top_k >= experts)
    MOELAB_USAGE_FAIL("router.load_weight > 0 needs model.top_k < model.experts");
  // Forced balance replaces a token-choice top-k selection; where the selection is something
  // else, or where a knob only acts through the selection, the combination measures nothing.
  if (r.force_balance) {
    if (r.policy != RoutingPolicy::TopK)
      MOELAB_USAGE_FAIL("router.force_balance = true needs router.policy = topk, got ", to_string(r.policy),
                        r.policy == RoutingPolicy::ExpertChoice
                            ? " (expert choice is balanced by construction; compare it as it is)"
                        : r.policy == RoutingPolicy::Sinkhorn
                            ? " (the Sinkhorn selection would be computed and thrown away)"
                            : " (the random drop of the second expert would unbalance the assignment)");
    if (r.bias_update_rate > 0)
      MOELAB_USAGE_FAIL("router.force_balance = true cannot be combined with router.bias_update_rate > 0: "
                        "the aux-loss-free bias only moves the selection, which force_balance replaces");
  }
  // Padding to capacity is meaningless when dropless (there is no capacity to pad to).
  if (r.pad_to_capacity && r.capacity_factor == 0.0)
    MOELAB_USAGE_FAIL("router.pad_to_capacity = true needs router.capacity_factor > 0 (0 = dropless)");
  // Hugging Face's pooled loss is the global Switch loss over softmax top-k assignments.
  if (r.aux_convention == AuxConvention::Hf &&
      (expert_choice || r.aux_loss_type != AuxLossType::Global || r.score != ScoreFunc::Softmax))
    MOELAB_USAGE_FAIL("router.aux_convention = hf (Hugging Face's pooled load-balancing loss) needs "
                      "router.score = softmax, router.aux_loss_type = global and a token-choice policy");
}

}  // namespace moelab
