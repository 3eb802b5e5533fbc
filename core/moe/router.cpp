// moelab: router forward/backward. Formulas and sources are in BACKGROUND.md sections 2-4; the
// per-op math is documented at each op in core/backend.h. Conventions chosen where published
// systems disagree are noted inline.
#include "core/moe/router.h"

#include <algorithm>
#include <cmath>

#include "core/comm.h"
#include "core/rng.h"

namespace moelab {

// The weight of this router's own Switch loss in its weighted sum: 0 under Hugging Face's
// convention, whose pooled loss the model adds once for all layers.
static double own_aux_weight(const RouterConfig& rc) {
  return rc.aux_convention == AuxConvention::Hf ? 0.0 : rc.aux_alpha;
}
namespace {

// Purposes of the per-call random streams, so that each draw is independent.
enum : uint64_t { kJitterStream = 1, kNoiseStream = 2, kTop2Stream = 3 };

bool noisy_logits(const MoEConfig& cfg, bool training) {
  return training && (cfg.router.noise == NoiseType::Gaussian || cfg.router.noise == NoiseType::Learned);
}

// Shazeer's CV^2 of a count vector (value only: counts carry no gradient).
double cv2_of_counts(const std::vector<int64_t>& c) {
  double m = 0, v = 0;
  for (int64_t x : c) m += double(x);
  m /= double(c.size());
  if (m == 0) return 0;
  for (int64_t x : c) v += (double(x) - m) * (double(x) - m);
  return v / double(c.size()) / (m * m);
}

}  // namespace

Router::Router(Backend& backend, const MoEConfig& cfg, DType router_dtype)
    : b_(backend), cfg_(cfg), dtype_(router_dtype) {
  cfg_.validate();
  MOELAB_CHECK(router_dtype == DType::F32 || router_dtype == DType::F64,
               "router dtype must be f32 or f64, got ", to_string(router_dtype));
  const int64_t D = cfg.d_model, E = cfg.experts;
  p_.w_router = b_.zeros(Shape{D, E}, dtype_);
  p_.dw_router = b_.zeros(Shape{D, E}, dtype_);
  if (cfg.router.noise == NoiseType::Learned) {
    p_.w_noise = b_.zeros(Shape{D, E}, dtype_);
    p_.dw_noise = b_.zeros(Shape{D, E}, dtype_);
  }
  p_.bias = b_.zeros(Shape{E}, DType::F32);
}

int64_t Router::capacity_for(const MoEConfig& cfg, int64_t tokens) {
  const double cf = cfg.router.capacity_factor;
  const double E = double(cfg.experts), K = double(cfg.top_k);
  if (cfg.router.policy == RoutingPolicy::ExpertChoice) {
    // Zhou et al. 2022: C = c * T / E, c = the average experts per token; cf = 0 means c = K.
    const double c = cf > 0 ? cf : K;
    // Clamped as a double before the cast: an absurd cf (1e300) would overflow int64.
    return int64_t(std::clamp(std::ceil(c * double(tokens) / E - 1e-9), 1.0, double(tokens)));
  }
  if (cf <= 0) return 0;  // dropless
  // C = ceil(cf * T * K / E), clamped as a double before the cast (cf = 1e300 overflowed int64).
  // An expert gets at most one assignment per token (top-k picks distinct experts), so C = T
  // already keeps everything; C >= 1 so that a tiny cf never reads as 0 = dropless.
  return int64_t(std::clamp(std::ceil(cf * double(tokens) * K / E - 1e-9), 1.0, double(tokens)));
}

RouterState Router::forward(const Tensor& x, bool training, int64_t seq_len, uint64_t seed) {
  RouterState st = forward_begin(x, training, seq_len, seed);
  forward_end(st);
  return st;
}

RouterState Router::forward_begin(const Tensor& x, bool training, int64_t seq_len, uint64_t seed) {
  const RouterConfig& rc = cfg_.router;
  const int64_t T = x.dim(0), E = cfg_.experts, K = cfg_.top_k;
  MOELAB_CHECK(x.ndim() == 2 && x.dim(1) == cfg_.d_model, "router: input is ", x.describe(),
               ", expected [tokens, d_model = ", cfg_.d_model, "]");
  MOELAB_CHECK(T >= 1, "router: no tokens");
  RouterState st;
  st.training = training;
  st.seed = seed;
  st.expert_choice = rc.policy == RoutingPolicy::ExpertChoice;

  // The router computes in its dtype (Switch "selective precision"). Its input is x itself:
  // router_logits reads it as the router dtype (exact: a bf16 or f32 value is an f32 or f64
  // one). Jitter (training only) and learned noise need x in the router dtype: a cast copy.
  const bool jitter = training && rc.noise == NoiseType::Jitter;
  const Tensor x_in = jitter || rc.noise == NoiseType::Learned ? b_.as_dtype(x, dtype_) : x;
  // Random draws are keyed by the global token position: with a batch group, this rank's first
  // token follows the lower ranks' tokens, so every layout draws the single-rank numbers.
  const bool draws = training && (rc.noise != NoiseType::None || rc.policy == RoutingPolicy::RandomTop2);
  if (group_ && (draws || rc.force_balance)) {  // force_balance continues the lower ranks' round
    const std::vector<int64_t> sizes = group_->all_gather_host({T});
    for (int r = 0; r < group_->rank(); ++r) st.token_offset += sizes[size_t(r)];
  }
  const uint64_t t0 = uint64_t(st.token_offset);
  if (jitter) {
    st.x_r = b_.empty(x.shape(), dtype_);
    b_.jitter_forward(x_in, rc.noise_eps, rng::derive(seed, kJitterStream), st.x_r, t0 * uint64_t(cfg_.d_model));
  } else {
    st.x_r = x_in;
  }

  st.clean = b_.empty(Shape{T, E}, dtype_);
  b_.router_logits(st.x_r, p_.w_router, st.clean);
  if (noisy_logits(cfg_, training)) {
    st.logits = b_.empty(Shape{T, E}, dtype_);
    if (rc.noise == NoiseType::Learned) {  // Shazeer: H = x W_g + N(0,1) softplus(x W_noise)
      st.noise_raw = b_.empty(Shape{T, E}, dtype_);
      st.noise_std = b_.empty(Shape{T, E}, dtype_);
      b_.gemm(false, false, 1.0, st.x_r, p_.w_noise, 0.0, st.noise_raw);
      b_.softplus_forward(st.noise_raw, st.noise_std);
    }
    b_.noisy_logits_forward(st.clean, st.noise_std, rc.noise_eps, rng::derive(seed, kNoiseStream),
                            st.logits, t0 * uint64_t(E));
  } else {
    st.logits = st.clean;
  }

  // Scores. Sinkhorn's gates come from softmax (K > 1) or sigmoid (K = 1) of the raw logits
  // (Megatron-Core); expert choice always uses softmax (Zhou et al.).
  st.score = rc.score;
  st.normalize = rc.normalize;
  if (rc.policy == RoutingPolicy::Sinkhorn) {
    st.score = K == 1 ? ScoreFunc::Sigmoid : ScoreFunc::Softmax;
    st.normalize = K > 1 && rc.normalize;
  }
  st.scores = b_.empty(Shape{T, E}, dtype_);
  if (st.score == ScoreFunc::Softmax) {
    b_.softmax_forward(st.logits, st.scores);
    st.dist = st.scores;
  } else {
    b_.sigmoid_forward(st.logits, st.scores);
    st.dist = b_.empty(Shape{T, E}, dtype_);  // DeepSeek-V3: P from s / sum_j s
    b_.row_normalize_forward(st.scores, st.dist);
  }

  // Selection.
  st.capacity = capacity_for(cfg_, T);
  if (st.expert_choice) {
    const int64_t C = st.capacity;
    st.idx = b_.empty(Shape{E, C}, DType::I32);
    b_.expert_choice(st.scores, st.idx);
    st.keep = b_.empty(Shape{E, C}, DType::I32);
    b_.fill(st.keep, 1);
    Tensor scores_t = b_.empty(Shape{E, T}, dtype_);
    b_.transpose(st.scores, scores_t);
    st.gates = b_.empty(Shape{E, C}, dtype_);  // g[e,c] = S[token, e], no renormalisation
    b_.gates_forward(scores_t, st.idx, false, rc.score_scale, st.gates);
  } else {
    Tensor select_from = st.scores;
    if (rc.policy == RoutingPolicy::Sinkhorn && training) {
      // BASE layers / Megatron: balanced assignment by Sinkhorn in training, no gradient
      // through selection; evaluation selects by the plain scores.
      select_from = b_.empty(Shape{T, E}, dtype_);
      st.sinkhorn_iters = b_.sinkhorn(st.logits, rc.sinkhorn_tol, rc.sinkhorn_max_iters, select_from);
    }
    st.idx = b_.empty(Shape{T, K}, DType::I32);
    // The aux-loss-free bias steers selection whenever it is set: trained here (bias_update_rate
    // > 0) or loaded with a model's weights (train.init_from, generate); it is 0 otherwise.
    b_.topk(select_from, p_.bias, st.idx);
    // Speed studies: the top-k above is computed (its cost counts) and then replaced by the
    // round-robin assignment; the gates below are the scores of the assigned experts.
    if (rc.force_balance) b_.balanced_assign(st.idx, E, st.token_offset);
    st.gates = b_.empty(Shape{T, K}, dtype_);
    b_.gates_forward(st.scores, st.idx, st.normalize, rc.score_scale, st.gates);
    st.keep = b_.empty(Shape{T, K}, DType::I32);
    b_.fill(st.keep, 1);
    if (rc.policy == RoutingPolicy::RandomTop2 && training)
      b_.random_top2_mask(st.gates, rc.random_top2_threshold, rng::derive(seed, kTop2Stream), st.keep, t0);
    if (st.capacity > 0)
      b_.capacity_mask(st.idx, st.gates, E, st.capacity, rc.drop_policy, st.keep);
  }

  // Statistics and losses (values un-scaled; BACKGROUND.md sections 3 and 6).
  // One router_summary call: a device backend copies all of it to the host at once, without
  // waiting; forward_end collects it.
  st.batch_tokens = T;
  const int64_t aux_seq = rc.aux_loss_type == AuxLossType::Sequence ? seq_len : 0;
  const bool seq_aux_only = group_ != nullptr;  // a batch group forms the global aux from counts
  const bool want_aux = !st.expert_choice && (!seq_aux_only || aux_seq > 0);
  st.summary = b_.router_summary_begin(st.logits, st.dist, st.idx, st.keep, st.gates, st.expert_choice, E, aux_seq,
                                       want_aux, !st.expert_choice && !group_);
  if (group_) {
    const RouterSummary sum = st.summary.get();
    st.summary = PendingRouterSummary();
    st.stats = sum.stats;
    reduce_over_group(st, seq_len, sum);
  }
  return st;
}

void Router::forward_end(RouterState& st) {
  if (!st.summary.valid()) return;  // done already (a batch group, or a second call)
  const RouterConfig& rc = cfg_.router;
  const int64_t E = cfg_.experts, K = cfg_.top_k;
  const RouterSummary sum = st.summary.get();
  st.summary = PendingRouterSummary();
  st.stats = sum.stats;
  RouterLosses& L = st.losses;
  if (!st.expert_choice) {
    L.aux = sum.aux;
    L.importance = sum.importance;
  } else {
    // Expert choice: E * sum_i f_i P_i with f_i = c_i / sum c (logged; balanced by construction).
    double total = 0;
    for (int64_t c : st.stats.routed) total += double(c);
    for (int64_t e = 0; e < E; ++e)
      L.aux += double(E) * double(st.stats.routed[e]) / total * st.stats.mean_prob[e];
  }
  L.z = sum.z;
  if (rc.load_weight > 0 && noisy_logits(cfg_, st.training))
    L.load = b_.load_loss_forward(st.clean, st.logits, st.noise_std, rc.noise_eps, K);
  else
    L.load = cv2_of_counts(st.stats.routed);
  L.weighted = own_aux_weight(rc) * L.aux + rc.z_loss * L.z + rc.importance_weight * L.importance +
               rc.load_weight * L.load;
}

// d[t, :] += g for every row t: a rank-1 GEMM, ones [T,1] x g [1,E].
void Router::add_row_to_every_token(const std::vector<double>& g, const Tensor& d) {
  Tensor gt = b_.from_host(host_tensor(g, Shape{1, int64_t(g.size())}, dtype_));
  Tensor ones = b_.empty(Shape{d.dim(0), 1}, dtype_);
  b_.fill(ones, 1.0);
  b_.gemm(false, false, 1.0, ones, gt, 1.0, d);
}

// dlogits from dgates and the router losses, every score function and policy (Router::backward
// takes the common case through Backend::router_logits_backward).
void Router::logits_grad(const RouterState& st, const Tensor& dgates, int64_t aux_seq, double share,
                         const Tensor& dlogits) {
  const RouterConfig& rc = cfg_.router;
  const int64_t T = st.scores.dim(0), E = cfg_.experts, K = cfg_.top_k;
  // d objective / d gates, plus Shazeer's importance loss (its gradient flows through gates).
  Tensor dg = b_.empty(dgates.shape(), dtype_);
  b_.copy(dgates, dg);
  if (rc.importance_weight > 0 && !st.expert_choice)
    b_.cv2_loss_backward(st.gates, st.idx, E, rc.importance_weight, dg);

  Tensor dscores = b_.empty(Shape{T, E}, dtype_);
  if (st.expert_choice) {
    Tensor scores_t = b_.empty(Shape{E, T}, dtype_), dscores_t = b_.empty(Shape{E, T}, dtype_);
    b_.transpose(st.scores, scores_t);
    b_.gates_backward(scores_t, st.idx, dg, false, rc.score_scale, dscores_t);
    b_.transpose(dscores_t, dscores);
  } else {
    b_.gates_backward(st.scores, st.idx, dg, st.normalize, rc.score_scale, dscores);
  }

  // Switch load-balancing loss: the gradient flows through P only (counts are constants).
  if (rc.aux_alpha > 0 && !st.expert_choice && rc.aux_convention == AuxConvention::Hf) {
    // The model's pooled loss (see set_pooled_aux_grad): one row g, broadcast to every token.
    MOELAB_CHECK(int64_t(pooled_aux_grad_.size()) == E, "router backward: router.aux_convention = hf "
                 "but the model set no pooled aux gradient for this forward");
    std::vector<double> g = pooled_aux_grad_;
    for (double& x : g) x *= group_weight_;
    add_row_to_every_token(g, dscores);  // softmax scores (validate() checks)
  } else if (rc.aux_alpha > 0 && !st.expert_choice) {
    auto add_aux_grad = [&](const Tensor& d) {
      if (group_ && aux_seq == 0) {
        // dL/dp_t,i = alpha E f_i / T_batch with the batch's f_i = routed_i / (T_batch K):
        // one row, broadcast to every token by a rank-1 GEMM (ones [T,1] x g [1,E]).
        std::vector<double> g(static_cast<size_t>(E), 0.0);
        for (int64_t e = 0; e < E; ++e)
          g[e] = rc.aux_alpha * group_weight_ * double(E) * double(st.stats.routed[e]) /
                 (double(st.batch_tokens) * double(K)) / double(st.batch_tokens);
        add_row_to_every_token(g, d);
      } else {  // local, or per sequence (whole sequences live on one rank)
        b_.aux_loss_backward(st.dist, st.idx, aux_seq, rc.aux_alpha * share, d);
      }
    };
    if (st.score == ScoreFunc::Softmax) {
      add_aux_grad(dscores);
    } else {
      Tensor ddist = b_.zeros(Shape{T, E}, dtype_), dtmp = b_.empty(Shape{T, E}, dtype_);
      add_aux_grad(ddist);
      b_.row_normalize_backward(st.scores, ddist, dtmp);
      b_.axpy(1.0, dtmp, dscores);
    }
  }

  if (st.score == ScoreFunc::Softmax) b_.softmax_backward(st.scores, dscores, dlogits);
  else b_.sigmoid_backward(st.scores, dscores, dlogits);
  if (rc.z_loss > 0) b_.z_loss_backward(st.logits, rc.z_loss * share, dlogits);
}

void Router::backward(const RouterState& st, const Tensor& x, const Tensor& dgates,
                      int64_t seq_len, const Tensor& dx) {
  const RouterConfig& rc = cfg_.router;
  const int64_t T = x.dim(0), E = cfg_.experts, K = cfg_.top_k;
  MOELAB_CHECK(dgates.shape() == st.gates.shape() && dgates.dtype() == dtype_,
               "router backward: dgates is ", dgates.describe(), ", expected ",
               st.gates.describe());
  MOELAB_CHECK(!st.summary.valid(), "router backward: the state's forward was begun but not ended "
               "(call Router::forward_end before backward)");

  // With a batch group, this rank's tokens carry the share T / T_batch of the batch's loss.
  const double share = double(T) / double(st.batch_tokens) * group_weight_;
  const int64_t aux_seq = rc.aux_loss_type == AuxLossType::Sequence ? seq_len : 0;
  const bool aux = rc.aux_alpha > 0 && !st.expert_choice;
  Tensor dlogits = b_.empty(Shape{T, E}, dtype_);
  // The common case in one composite (one kernel on a device backend): softmax scores, top-k
  // gates, no importance loss, the aux loss this call's own (local or per sequence).
  if (!st.expert_choice && st.score == ScoreFunc::Softmax && !(rc.importance_weight > 0) &&
      !(aux && (rc.aux_convention == AuxConvention::Hf || (group_ && aux_seq == 0))))
    b_.router_logits_backward(st.scores, st.logits, st.idx, dgates, st.normalize, rc.score_scale, aux_seq,
                              aux ? rc.aux_alpha * share : 0.0, rc.z_loss > 0 ? rc.z_loss * share : 0.0, dlogits);
  else
    logits_grad(st, dgates, aux_seq, share, dlogits);

  // Through the noise to the clean logits (and the learned noise scale).
  Tensor dclean = dlogits, dstd;
  if (noisy_logits(cfg_, st.training)) {
    const bool learned = rc.noise == NoiseType::Learned;
    Tensor dclean_load, dstd_load;
    if (rc.load_weight > 0) {
      dclean_load = b_.zeros(Shape{T, E}, dtype_);
      if (learned) dstd_load = b_.zeros(Shape{T, E}, dtype_);
      b_.load_loss_backward(st.clean, st.logits, st.noise_std, rc.noise_eps, K, rc.load_weight,
                            dclean_load, dstd_load, dlogits);
    }
    dclean = b_.empty(Shape{T, E}, dtype_);
    if (learned) dstd = b_.empty(Shape{T, E}, dtype_);
    b_.noisy_logits_backward(dlogits, st.noise_std, rng::derive(st.seed, kNoiseStream), dclean, dstd,
                             uint64_t(st.token_offset) * uint64_t(E));
    if (dclean_load.defined()) b_.axpy(1.0, dclean_load, dclean);
    if (dstd_load.defined()) b_.axpy(1.0, dstd_load, dstd);
  }

  const bool jitter = st.training && rc.noise == NoiseType::Jitter;
  if (!dstd.defined() && !jitter) {  // dW_r += x_r^T dclean, dx += dclean W_r^T
    b_.router_input_grads(st.x_r, dclean, p_.w_router, p_.dw_router, dx);
    return;
  }
  b_.gemm(true, false, 1.0, st.x_r, dclean, 1.0, p_.dw_router);  // dW_r += x_r^T dclean
  Tensor dx_r = b_.empty(Shape{T, cfg_.d_model}, dtype_);
  b_.gemm(false, true, 1.0, dclean, p_.w_router, 0.0, dx_r);     // dx_r = dclean W_r^T
  if (dstd.defined()) {
    Tensor draw = b_.empty(Shape{T, E}, dtype_);
    b_.softplus_backward(st.noise_raw, dstd, draw);
    b_.gemm(true, false, 1.0, st.x_r, draw, 1.0, p_.dw_noise);
    b_.gemm(false, true, 1.0, draw, p_.w_noise, 1.0, dx_r);
  }
  if (jitter)
    b_.jitter_backward(dx_r, rc.noise_eps, rng::derive(st.seed, kJitterStream), dx_r,
                       uint64_t(st.token_offset) * uint64_t(cfg_.d_model));
  b_.axpy(1.0, b_.as_dtype(dx_r, dx.dtype()), dx);
}

void Router::check_batch_group(const MoEConfig& cfg) {
  const RouterConfig& rc = cfg.router;
  if (rc.policy == RoutingPolicy::ExpertChoice || rc.policy == RoutingPolicy::Sinkhorn)
    MOELAB_USAGE_FAIL("router.policy = ", rc.policy == RoutingPolicy::Sinkhorn ? "sinkhorn" : "expert_choice",
                      " is not supported with expert or data parallelism yet: its selection couples "
                      "the tokens of the whole batch (every expert's top-C tokens, or Sinkhorn's "
                      "column sums), which would need a selection across ranks");
  if (rc.importance_weight > 0 || rc.load_weight > 0)
    MOELAB_USAGE_FAIL("router.importance_weight and router.load_weight (Shazeer's CV^2 losses) are not "
                      "supported with expert or data parallelism yet: their batch statistics are not "
                      "reduced across ranks");
  if (cfg.expert_dropout > 0)
    MOELAB_USAGE_FAIL("model.expert_dropout is not supported with expert or data parallelism yet: its "
                      "draws are keyed by the expert-sorted row, which differs between layouts");
}

void Router::set_batch_group(Communicator* group, double loss_grad_weight) {
  if (group) check_batch_group(cfg_);
  group_ = group;
  group_weight_ = group ? loss_grad_weight : 1.0;
}

// The batch's statistics and losses from every rank's local ones. Local values are exact sums
// or token means of this rank's T tokens, so the batch's are token-weighted sums over ranks
// (the communicator adds in rank order: every rank gets the same bits).
void RouterStatsSum::add(const RouterStats& s, const RouterLosses& l, int64_t tokens) {
  const double t = double(tokens);
  std::vector<double> x = {t};
  for (int64_t c : s.routed) x.push_back(double(c));
  for (int64_t c : s.kept) x.push_back(double(c));
  for (double p : s.mean_prob) x.push_back(p * t);
  for (double y : {s.entropy, s.top1_prob, s.logit_rms * s.logit_rms}) x.push_back(y * t);
  x.push_back(double(s.tokens_unrouted));
  for (double y : {l.aux, l.z, l.importance, l.load, l.weighted}) x.push_back(y * t);
  if (v_.empty()) {
    v_.assign(x.size(), 0.0);
    logit_max_ = s.logit_max;
  }
  MOELAB_CHECK(x.size() == v_.size(), "router statistics of different expert counts cannot be merged");
  for (size_t i = 0; i < x.size(); ++i) v_[i] += x[i];
  logit_max_ = std::max(logit_max_, s.logit_max);
}

void RouterStatsSum::reduce(Communicator& group) {
  group.all_reduce_host(v_, ReduceOp::Sum);
  std::vector<double> mx = {logit_max_};
  group.all_reduce_host(mx, ReduceOp::Max);
  logit_max_ = mx[0];
}

int64_t RouterStatsSum::tokens() const { return v_.empty() ? 0 : int64_t(v_[0]); }

void RouterStatsSum::result(RouterStats& s, RouterLosses& l) const {
  const size_t E = s.routed.size();
  size_t at = 0;
  const double t = v_[at++];
  for (size_t e = 0; e < E; ++e) s.routed[e] = int64_t(v_[at++]);
  for (size_t e = 0; e < E; ++e) s.kept[e] = int64_t(v_[at++]);
  for (size_t e = 0; e < E; ++e) s.mean_prob[e] = v_[at++] / t;
  s.entropy = v_[at++] / t;
  s.top1_prob = v_[at++] / t;
  s.logit_rms = std::sqrt(v_[at++] / t);
  s.tokens_unrouted = int64_t(v_[at++]);
  s.logit_max = logit_max_;
  for (double* y : {&l.aux, &l.z, &l.importance, &l.load, &l.weighted}) *y = v_[at++] / t;
}

// The batch's statistics and losses from every rank's local ones (the communicator adds in
// rank order: every rank gets the same bits). The aux loss of the whole batch is formed from
// the reduced counts (Switch / Megatron: E sum_i f_i P_i, f_i = routed_i / (T K)); the
// sequence-level one is the token-weighted mean of the ranks' (whole sequences per rank).
void Router::reduce_over_group(RouterState& st, int64_t seq_len, const RouterSummary& mine) {
  const RouterConfig& rc = cfg_.router;
  const int64_t E = cfg_.experts, K = cfg_.top_k, T = st.scores.dim(0);
  const bool seq_aux = rc.aux_loss_type == AuxLossType::Sequence && seq_len > 0;
  RouterLosses local;
  local.z = mine.z;
  local.aux = seq_aux ? mine.aux : 0.0;
  RouterStatsSum sum;
  sum.add(st.stats, local, T);
  sum.reduce(*group_);
  st.batch_tokens = sum.tokens();
  RouterLosses& L = st.losses;
  L = RouterLosses{};
  sum.result(st.stats, L);
  const RouterStats& s = st.stats;
  if (!seq_aux) {
    L.aux = 0;
    for (int64_t e = 0; e < E; ++e)
      L.aux += double(E) * double(s.routed[e]) / (double(st.batch_tokens) * double(K)) * s.mean_prob[e];
  }
  L.importance = 0;
  L.load = cv2_of_counts(s.routed);  // logged only (load_weight is refused with a group)
  L.weighted = own_aux_weight(rc) * L.aux + rc.z_loss * L.z;
}

void Router::update_bias(const RouterStats& stats) {
  const double u = cfg_.router.bias_update_rate;
  if (u <= 0) return;
  std::vector<float> b = b_.to_vector<float>(p_.bias);
  double mean = 0;
  for (int64_t c : stats.routed) mean += double(c);
  mean /= double(stats.routed.size());
  for (size_t e = 0; e < b.size(); ++e) {
    const double diff = mean - double(stats.routed[e]);
    b[e] += float(u * double((diff > 0) - (diff < 0)));  // b_i += u sign(mean(c) - c_i)
  }
  Tensor host = Tensor(std::shared_ptr<void>(), b.data(), p_.bias.shape(), DType::F32, Device::CPU);
  b_.copy(host, p_.bias);
}

}  // namespace moelab
