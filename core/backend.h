// moelab: the Backend interface (ggml's pattern: backends implement ops, only core composes them).
//
// Every op is declared once, here, as a public non-virtual method that checks shapes, dtypes and
// devices (backend.cpp) and then calls the backend's protected `*_impl`. A backend that lacks an
// op answers supports(op, dtype) == false and the checked entry throws NotSupported naming the op:
// a missing op never crashes. Backward ops are ops too (ggml's *_BACK), so one harness tests them.
//
// Conventions for every op below:
//   - outputs are overwritten unless the comment says "accumulates" (+=);
//   - all tensors of one call live on this backend's device and are contiguous, row-major;
//   - float tensors of one call share one dtype unless stated (router tensors: f32, or f64 in
//     f64 checks; index tensors are i32);
//   - dimension letters: T tokens, D width, F expert hidden width, E experts, K top-k,
//     C capacity, A assignments (T*K for token choice, E*C for expert choice), R dispatched rows.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/drop_policy.h"
#include "core/tensor.h"

namespace moelab {

enum class Op {
  Fill, Copy, Cast, Axpy, Transpose,
  Gemm, GroupedGemm, GroupedGemmWgrad,
  SwigluForward, SwigluBackward,
  SoftmaxForward, SoftmaxBackward,
  SigmoidForward, SigmoidBackward,
  SoftplusForward, SoftplusBackward,
  RowNormalizeForward, RowNormalizeBackward,
  RowScaleForward, RowScaleBackward,
  DropoutForward, DropoutBackward,
  JitterForward, JitterBackward,
  NoisyLogitsForward, NoisyLogitsBackward,
  TopK, BalancedAssign, GatesForward, GatesBackward, RandomTop2Mask, CapacityMask, Sinkhorn, ExpertChoice,
  DispatchPlan, PermuteForward, PermuteBackward, UnpermuteForward, UnpermuteBackward,
  AuxLossForward, AuxLossBackward, ZLossForward, ZLossBackward,
  Cv2LossForward, Cv2LossBackward, LoadLossForward, LoadLossBackward,
  RouterStats, RouterLogits, RouterInputGrads, RouterLogitsBackward,
  Scale, SumSquares, EmbeddingForward, EmbeddingBackward, RmsNormForward, RmsNormBackward,
  RopeForward, RopeBackward, AttentionForward, AttentionBackward,
  CrossEntropyForward, CrossEntropyBackward, AdamW,
  kCount
};
const char* to_string(Op op);

// The permutation that groups assignments by expert (Megatron's "permute" step). Row r of the
// expert-sorted activations holds token row_token[r] for assignment row_assign[r]; rows of expert
// e are [offsets[e], offsets[e+1]). Within an expert, rows follow assignment order (token order
// for token choice). Padding rows (pad-to-capacity) have row_token = row_assign = -1.
struct DispatchPlan {
  Tensor row_token;              // i32 [R]
  Tensor row_assign;             // i32 [R]  index into the flat gate vector [A]
  std::vector<int64_t> offsets;  // host [E+1]
  int64_t rows() const { return offsets.empty() ? 0 : offsets.back(); }
};

// Per-call router statistics (BACKGROUND.md section 6); counts are exact integers.
// The statistics and loss values of one router call together (Backend::router_summary).
struct RouterSummary;

struct RouterStats {
  std::vector<int64_t> routed;     // [E] assignments before capacity
  std::vector<int64_t> kept;       // [E] assignments after capacity (and random top-2)
  std::vector<double> mean_prob;   // [E] P_i = mean_t p_t,i of the full score distribution
  double entropy = 0;              // mean_t -sum_i p log p (nats)
  double top1_prob = 0;            // mean_t max_i p_t,i
  double logit_rms = 0;            // sqrt(mean l^2)
  double logit_max = 0;            // max |l|
  int64_t tokens_unrouted = 0;     // tokens with no kept assignment (dropped or never chosen)
};

// See Backend::router_summary.
struct RouterSummary {
  RouterStats stats;
  double aux = 0;         // aux_loss_forward(dist, idx, aux_seq_len), when asked for
  double z = 0;           // z_loss_forward(logits)
  double importance = 0;  // cv2_loss_forward(gates, idx, experts), when asked for
};

// A router summary on its way to the host (Backend::router_summary_begin): get() returns it,
// waiting for the device only if it has not arrived yet (a device backend copies it without
// waiting). Valid while its backend lives.
class PendingRouterSummary {
 public:
  PendingRouterSummary() = default;
  explicit PendingRouterSummary(RouterSummary ready) : value_(std::move(ready)), has_value_(true) {}
  explicit PendingRouterSummary(std::function<RouterSummary()> arrive) : arrive_(std::move(arrive)) {}
  bool valid() const { return has_value_ || bool(arrive_); }
  const RouterSummary& get() {
    if (!has_value_ && arrive_) {
      value_ = arrive_();
      arrive_ = nullptr;
      has_value_ = true;
    }
    return value_;
  }

 private:
  std::function<RouterSummary()> arrive_;
  RouterSummary value_;
  bool has_value_ = false;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual Device device() const = 0;
  virtual bool supports(Op op, DType dtype) const = 0;
  virtual void synchronize() = 0;

  // ---- profiling (core/profile.h; moelab bench's breakdown) ---------------------------------
  // A point in this backend's queue of work: CUDA records an event on its stream; the default
  // (CPU, whose ops are synchronous) reads the host clock. elapsed_ms(a, b) after synchronize().
  virtual std::shared_ptr<void> timing_mark();
  virtual double elapsed_ms(const std::shared_ptr<void>& a, const std::shared_ptr<void>& b);
  // Blocking waits of the host for the device so far (device -> host copies included).
  virtual int64_t host_syncs() const { return 0; }
  // The most device memory in tensors at once since reset_peak_bytes() (0: not tracked).
  virtual int64_t peak_bytes() const { return 0; }
  virtual void reset_peak_bytes() {}
  // The profiler that ProfileScopes on this backend report to (null: scopes cost nothing).
  class Profiler* profiler = nullptr;

  // ---- memory ----------------------------------------------------------------------------
  Tensor empty(Shape shape, DType dtype);
  Tensor zeros(Shape shape, DType dtype);
  // Host <-> this backend, any direction, same dtype and numel. Blocking when the host is a side
  // (its buffer may be reused or read at once); a copy within the device is ordered after the
  // work queued before it, like any op, and the host does not wait for it.
  void copy(const Tensor& src, const Tensor& dst);
  Tensor to_host(const Tensor& src);                       // new CPU tensor
  Tensor from_host(const Tensor& host_src);                // new tensor on this backend
  template <class T> std::vector<T> to_vector(const Tensor& src);
  template <class T> Tensor from_vector(const std::vector<T>& v, Shape shape);

  // ---- elementwise and GEMM ----------------------------------------------------------------
  void fill(const Tensor& x, double value);
  // x[i] = std * rng::normal(stream, first + i) (core/rng.h), x contiguous and floating: the
  // parameter initialisation draw. The value is computed in double and rounded as host_tensor
  // does (double -> float -> bf16), so every backend writes the same bits. The default draws on
  // the host in chunks (worker threads) and copies them in; a device backend overrides it.
  void fill_normal(const Tensor& x, double std, uint64_t stream, uint64_t first);
  void cast(const Tensor& src, const Tensor& dst);  // dtype conversion, same shape
  // src in dtype dt: src itself when it has it, else a cast copy.
  Tensor as_dtype(const Tensor& src, DType dt);
  void axpy(double alpha, const Tensor& x, const Tensor& y);  // y += alpha x (accumulates)
  void transpose(const Tensor& x, const Tensor& y);            // Y [N,M] = X [M,N]^T
  // C = alpha op(A) op(B) + beta C; A, B, C 2-D; op = transpose when the flag is set.
  void gemm(bool trans_a, bool trans_b, double alpha, const Tensor& a, const Tensor& b,
            double beta, const Tensor& c);
  // The router's GEMMs in its own precision (Switch's selective precision: the router runs in
  // f32 whatever the model dtype), for activations in the model dtype:
  //   router_logits:      out [T,E] = x [T,D] w [D,E]       (x as w's dtype; out in w's dtype)
  //   router_input_grads: dw [D,E] += x^T dlogits,  dx [T,D] += dlogits w^T (dx in x's dtype)
  // Composites whose default casts x to w's dtype and runs gemm (and cast, axpy for dx); a device
  // backend may compute them another way of the same precision without the f32 copies of x and
  // dx (CUDA: bf16 x against w split into bf16 parts on the tensor cores).
  void router_logits(const Tensor& x, const Tensor& w, const Tensor& out);
  void router_input_grads(const Tensor& x, const Tensor& dlogits, const Tensor& w, const Tensor& dw,
                          const Tensor& dx);
  // Per-expert GEMM on expert-sorted rows (the MoE expert MLPs, no per-token host loop):
  // for each e: Y[rows of e] = X[rows of e] op(W[e]) + beta Y[rows of e].
  // X [R,Kin], W [E,Kin,N] (or [E,N,Kin] with trans_w), Y [R,N], offsets [E+1].
  void grouped_gemm(const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets,
                    const Tensor& y, bool trans_w, double beta);
  // Weight gradient: dW[e] = X[rows of e]^T dY[rows of e] + beta dW[e]. X [R,Kin], dY [R,N],
  // dW [E,Kin,N].
  void grouped_gemm_wgrad(const Tensor& x, const Tensor& dy, const std::vector<int64_t>& offsets,
                          const Tensor& dw, double beta);

  // SwiGLU (Shazeer 2020): H = silu(G) * U where AB = [G | U], AB [R,2F], H [R,F].
  void swiglu_forward(const Tensor& ab, const Tensor& h);
  void swiglu_backward(const Tensor& ab, const Tensor& dh, const Tensor& dab);

  // Row softmax P = softmax(L) over the last dim; backward dL = P * (dP - sum(P dP)).
  void softmax_forward(const Tensor& logits, const Tensor& probs);
  void softmax_backward(const Tensor& probs, const Tensor& dprobs, const Tensor& dlogits);
  // Elementwise sigmoid; backward takes the output Y: dX = dY * Y (1 - Y).
  void sigmoid_forward(const Tensor& x, const Tensor& y);
  void sigmoid_backward(const Tensor& y, const Tensor& dy, const Tensor& dx);
  // Elementwise softplus(x) = log(1 + e^x); backward dX = dY * sigmoid(X).
  void softplus_forward(const Tensor& x, const Tensor& y);
  void softplus_backward(const Tensor& x, const Tensor& dy, const Tensor& dx);
  // Row normalisation Y = X / sum_j X (positive X, e.g. sigmoid scores -> a distribution).
  void row_normalize_forward(const Tensor& x, const Tensor& y);
  void row_normalize_backward(const Tensor& x, const Tensor& dy, const Tensor& dx);
  // Y[t,:] = s[t] X[t,:]; s [T] (or [T,1]), X, Y [T,D]. Backward gives ds [T] and dX.
  void row_scale_forward(const Tensor& s, const Tensor& x, const Tensor& y);
  void row_scale_backward(const Tensor& s, const Tensor& x, const Tensor& dy, const Tensor& ds,
                          const Tensor& dx);

  // Inverted dropout with a counter-based mask: Y = X * m / (1 - p), m_i = [u(seed,i) >= p].
  void dropout_forward(const Tensor& x, double p, uint64_t seed, const Tensor& y);
  void dropout_backward(const Tensor& dy, double p, uint64_t seed, const Tensor& dx);
  // Input jitter (Switch): Y = X * u, u_i ~ U[1-eps, 1+eps] from (seed, offset + i).
  // offset (here and in the noise and random top-2 ops): the counter of element 0. A rank whose
  // tokens start at global token t0 passes t0 * (row width), so that its draws are the
  // single-rank draws of its tokens: randomness keyed by the global token position.
  void jitter_forward(const Tensor& x, double eps, uint64_t seed, const Tensor& y, uint64_t offset = 0);
  void jitter_backward(const Tensor& dy, double eps, uint64_t seed, const Tensor& dx, uint64_t offset = 0);
  // Noisy logits: H = clean + n * std, n_i ~ N(0,1) from (seed, offset + i); std [T,E] is a
  // tensor (Shazeer's learned softplus(x W_noise)) or, when undefined, the constant sigma.
  void noisy_logits_forward(const Tensor& clean, const Tensor& std, double sigma, uint64_t seed,
                            const Tensor& h, uint64_t offset = 0);
  // dclean = dH; dstd = dH * n (dstd only when std is defined).
  void noisy_logits_backward(const Tensor& dh, const Tensor& std, uint64_t seed,
                             const Tensor& dclean, const Tensor& dstd, uint64_t offset = 0);

  // ---- routing (no gradient through selection) ----------------------------------------------
  // idx [T,K] = the K largest of scores + bias per row (bias [E] f32, optional: undefined = 0),
  // in descending order, ties to the lower expert index.
  void topk(const Tensor& scores, const Tensor& bias, const Tensor& idx);
  // router.force_balance (speed studies): overwrites idx [T,K] with the round-robin assignment
  // idx[t,j] = ((offset + t) K + j) mod E, as if routing were perfectly balanced. A token's K
  // experts are distinct (K <= E) and the T K assignments of a call, and of any run of
  // consecutive tokens, give every expert the same count up to 1. offset = the global position
  // of the first token (a rank's share of a batch continues the lower ranks' round).
  void balanced_assign(const Tensor& idx, int64_t experts, int64_t offset = 0);
  // gates[t,j] = scale * s[t, idx[t,j]] / (normalize ? sum_j s[t, idx[t,j]] : 1).
  void gates_forward(const Tensor& scores, const Tensor& idx, bool normalize, double scale,
                     const Tensor& gates);
  void gates_backward(const Tensor& scores, const Tensor& idx, const Tensor& dgates,
                      bool normalize, double scale, const Tensor& dscores);
  // GShard random top-2: keep[t,0] = 1; keep[t,1] = [u(seed, offset + t) < min(1, g2 / tau)]
  // where g2 = gates[t,1] / (gates[t,0] + gates[t,1]). keep i32 [T,2].
  void random_top2_mask(const Tensor& gates, double tau, uint64_t seed, const Tensor& keep,
                        uint64_t offset = 0);
  // Expert capacity C: among assignments with keep == 1, each expert keeps at most C
  // (policy Position: the first C in token order; Probs: the C with the largest gate, ties to
  // the lower token). Clears keep of the rest. idx, keep i32 [T,K]; gates [T,K].
  void capacity_mask(const Tensor& idx, const Tensor& gates, int64_t experts, int64_t capacity,
                     DropPolicy policy, const Tensor& keep);
  // Sinkhorn balancing (BASE layers, Megatron): out = diag(d0) exp(L) diag(d1) after
  // alternating normalisation until mean |delta d1| < tol. Returns the iterations used.
  int sinkhorn(const Tensor& logits, double tol, int max_iters, const Tensor& out);
  // Expert choice (Zhou et al. 2022): chosen[e, :] = the C tokens with the largest S[:, e],
  // descending, ties to the lower token. chosen i32 [E,C].
  void expert_choice(const Tensor& scores, const Tensor& chosen);
  // Build the dispatch permutation from assignments. Token choice: idx[t,j] = expert of
  // assignment a = t*K + j. Expert choice (expert_choice = true): idx[e,c] = token of
  // assignment a = e*C + c. Only keep == 1 assignments get rows. pad_capacity > 0 pads every
  // expert to exactly that many rows (padding rows: token and assignment -1).
  DispatchPlan dispatch_plan(const Tensor& idx, const Tensor& keep, bool expert_choice,
                             int64_t experts, int64_t pad_capacity);
  // Xp[r] = X[row_token[r]] (zero for padding rows). X [T,D], Xp [R,D].
  void permute_forward(const Tensor& x, const DispatchPlan& plan, const Tensor& xp);
  // dX[t] = sum of dXp[r] over rows r of token t. dX [T,D].
  void permute_backward(const Tensor& dxp, const DispatchPlan& plan, const Tensor& dx);
  // Combine: Y[t] = sum over rows r of token t of gates[row_assign[r]] * Yp[r]. gates [A].
  void unpermute_forward(const Tensor& yp, const DispatchPlan& plan, const Tensor& gates,
                         const Tensor& y);
  // dYp[r] = gates[a] dY[t]; dgates[a] = <dY[t], Yp[r]> (zero for assignments without a row).
  void unpermute_backward(const Tensor& dy, const Tensor& yp, const DispatchPlan& plan,
                          const Tensor& gates, const Tensor& dyp, const Tensor& dgates);

  // ---- router losses (values un-scaled; backward accumulates scale * dL) ------------------
  // Switch load-balancing loss, Megatron convention (BACKGROUND.md section 3):
  //   L = E * sum_i f_i P_i,  f_i = c_i / (T K) (c_i from idx, before capacity, no gradient),
  //   P_i = mean_t probs[t,i].  seq_len > 0: the same per sequence of seq_len tokens, averaged
  //   over sequences (DeepSeek sequence-level aux loss). probs [T,E], idx i32 [T,K].
  double aux_loss_forward(const Tensor& probs, const Tensor& idx, int64_t seq_len);
  void aux_loss_backward(const Tensor& probs, const Tensor& idx, int64_t seq_len, double scale,
                         const Tensor& dprobs);
  // Router z-loss (ST-MoE, Zoph et al. 2022): L = (1/T) sum_t (logsumexp_j l_tj)^2.
  double z_loss_forward(const Tensor& logits);
  void z_loss_backward(const Tensor& logits, double scale, const Tensor& dlogits);
  // Shazeer's importance loss: CV(imp)^2, imp_e = sum_{t,j: idx[t,j]=e} gates[t,j]
  // (population variance / mean^2). gates [T,K].
  double cv2_loss_forward(const Tensor& gates, const Tensor& idx, int64_t experts);
  void cv2_loss_backward(const Tensor& gates, const Tensor& idx, int64_t experts, double scale,
                         const Tensor& dgates);
  // Shazeer's smooth load loss: CV(load)^2, load_e = sum_t Phi((clean_te - thr_te) / std_te),
  // thr_te = the K-th largest of h[t, :] excluding e (h = the noisy logits). std [T,E] or
  // undefined = the constant sigma. Backward accumulates into dclean, dstd (if defined), dh.
  double load_loss_forward(const Tensor& clean, const Tensor& h, const Tensor& std, double sigma,
                           int64_t k);
  void load_loss_backward(const Tensor& clean, const Tensor& h, const Tensor& std, double sigma,
                          int64_t k, double scale, const Tensor& dclean, const Tensor& dstd,
                          const Tensor& dh);

  // The router's logit gradient for softmax scores and top-k gates (Router::backward's common
  // case), a composite of the ops above: dscores = gates_backward(scores, idx, dgates, normalize,
  // score_scale) + aux_loss_backward(scores, idx, aux_seq_len, aux_scale) (none for aux_scale 0);
  // dlogits = softmax_backward(scores, dscores) + z_loss_backward(logits, z_scale) (none for
  // z_scale 0). A device backend may run it as one pass with the same roundings.
  void router_logits_backward(const Tensor& scores, const Tensor& logits, const Tensor& idx,
                              const Tensor& dgates, bool normalize, double score_scale, int64_t aux_seq_len,
                              double aux_scale, double z_scale, const Tensor& dlogits);

  // Statistics of one router call; idx/keep as in dispatch_plan.
  RouterStats router_stats(const Tensor& logits, const Tensor& probs, const Tensor& idx,
                           const Tensor& keep, bool expert_choice, int64_t experts);
  // router_stats, z_loss_forward(logits) and, when asked for, aux_loss_forward(probs, idx,
  // aux_seq_len) and cv2_loss_forward(gates, idx, experts), in one call: a composite whose
  // default is those four ops (one host copy each); a device backend overrides it to copy all
  // of them to the host at once, one synchronisation per router call instead of five.
  RouterSummary router_summary(const Tensor& logits, const Tensor& probs, const Tensor& idx,
                               const Tensor& keep, const Tensor& gates, bool expert_choice,
                               int64_t experts, int64_t aux_seq_len, bool want_aux,
                               bool want_importance);
  // router_summary without waiting for it: a device backend queues the work and the copy to the
  // host, and the host goes on (the MoE layer collects it after the dispatch plan's copy of the
  // expert counts, which waits anyway: one wait per layer instead of two). The default computes it
  // at once. The tensors need not outlive the call.
  PendingRouterSummary router_summary_begin(const Tensor& logits, const Tensor& probs, const Tensor& idx,
                                            const Tensor& keep, const Tensor& gates, bool expert_choice,
                                            int64_t experts, int64_t aux_seq_len, bool want_aux,
                                            bool want_importance);

  // ---- transformer ops (S sequence length, B = T / S sequences, H heads, Hkv kv heads,
  //      Dh head width, V vocabulary) --------------------------------------------------------
  void scale(const Tensor& x, double alpha);  // x *= alpha (in place)
  double sum_squares(const Tensor& x);       // sum x^2, accumulated in f64
  // out[t] = table[tokens[t]]; tokens i32 [T], table [V,D], out [T,D].
  void embedding_forward(const Tensor& tokens, const Tensor& table, const Tensor& out);
  // dtable[tokens[t]] += dout[t] (accumulates).
  void embedding_backward(const Tensor& tokens, const Tensor& dout, const Tensor& dtable);
  // RMSNorm (Zhang & Sennrich 2019): y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps).
  // x, y [T,D], w [D], rstd [T] (saved for backward).
  void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, const Tensor& y,
                       const Tensor& rstd);
  // dx overwrites, dw accumulates.
  void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy,
                        const Tensor& dx, const Tensor& dw);
  // Rotary embeddings (Su et al. 2021), rotate-half pairing (i, i + Dh/2) as in Llama/Mixtral:
  // angle p_t * theta^(-2i/Dh) with p_t = t mod S, or p_t = positions[t] when `positions` (i32
  // [T], every value >= 0) is given: packed records restart their positions at 0 (SFT packing).
  // x, y [T, heads * Dh].
  void rope_forward(const Tensor& x, int64_t heads, int64_t seq_len, double theta,
                    const Tensor& y, const Tensor& positions = Tensor());
  // The inverse rotation (the transpose): dx = R^T dy.
  void rope_backward(const Tensor& dy, int64_t heads, int64_t seq_len, double theta,
                     const Tensor& dx, const Tensor& positions = Tensor());
  // Causal softmax attention with grouped-query heads (head h reads kv head h / (H / Hkv)),
  // scale 1/sqrt(Dh). q [T, H*Dh], k, v [T, Hkv*Dh], out [T, H*Dh]. Query i of a sequence
  // attends to the keys j <= i of its sequence; with `segments` (i32 [T]) only to those with
  // segments[j] == segments[i] (records packed into one sequence see nothing of each other; a
  // query always sees itself, so every row has at least one key). What forward saves for
  // backward is the log-sum-exp of each query row, not the [B*H, S, S] probabilities:
  //   lse[b*H + h, i] = log sum_{j <= i, same segment} exp(scale q_i . k_j)   (natural log)
  // lse is [B*H, S] in attention_lse_dtype(q.dtype()): f32 (f64 when q is f64).
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads,
                         int64_t kv_heads, int64_t seq_len, const Tensor& out, const Tensor& lse,
                         const Tensor& segments = Tensor());
  // Backward from forward's out and lse (FlashAttention-2's recomputation: P = exp(scale q k^T
  // - lse), D = rowsum(dout * out)), with forward's segments; dq, dk, dv overwrite.
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                          const Tensor& lse, const Tensor& dout, int64_t heads, int64_t kv_heads,
                          int64_t seq_len, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                          const Tensor& segments = Tensor());
  // Mean cross-entropy in nats over the rows that bear loss: -(1/N) sum_{t: targets_t >= 0}
  // log softmax(logits_t)[targets_t], N = the number of such rows. A target of kIgnoreTarget
  // (-1: padding, a record's last token, a prompt token under train.loss_on = response) bears no
  // loss; any other target outside [0, V) is an error. No row bearing loss gives 0. logits [T,V].
  double cross_entropy_forward(const Tensor& logits, const Tensor& targets);
  // dlogits = scale * (softmax(logits) - onehot(targets)) / N on the rows bearing loss, 0 on the
  // others (overwrite). With every target >= 0, N = T.
  void cross_entropy_backward(const Tensor& logits, const Tensor& targets, double scale,
                              const Tensor& dlogits);
  // AdamW (Loshchilov & Hutter 2019), bias-corrected, decoupled weight decay:
  //   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)
  // m, v: f32 (the fp32 optimizer state), or f64 when the parameter is f64. step counts from 1.
  // cast_to, when given (the bf16 compute copy of an fp32 master `param`): cast_to = param after
  // the update, as cast() would, in the same pass where the backend fuses them.
  void adamw(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v, double lr,
             double beta1, double beta2, double eps, double weight_decay, int64_t step,
             const Tensor& cast_to = Tensor());

 protected:
  virtual void* alloc_bytes(size_t bytes) = 0;
  virtual void free_bytes(void* p) = 0;
  // Copy nbytes between host and this device; the flags say which side is on the device.
  virtual void copy_bytes(void* dst, bool dst_on_device, const void* src, bool src_on_device,
                          size_t nbytes) = 0;

  virtual void fill_impl(const Tensor& x, double value) = 0;
  virtual void fill_normal_impl(const Tensor& x, double std, uint64_t stream, uint64_t first);
  virtual void cast_impl(const Tensor& src, const Tensor& dst) = 0;
  virtual void axpy_impl(double alpha, const Tensor& x, const Tensor& y) = 0;
  virtual void transpose_impl(const Tensor& x, const Tensor& y) = 0;
  virtual void gemm_impl(bool ta, bool tb, double alpha, const Tensor& a, const Tensor& b,
                         double beta, const Tensor& c) = 0;
  virtual void router_logits_impl(const Tensor& x, const Tensor& w, const Tensor& out);
  virtual void router_input_grads_impl(const Tensor& x, const Tensor& dlogits, const Tensor& w,
                                       const Tensor& dw, const Tensor& dx);
  virtual void grouped_gemm_impl(const Tensor& x, const Tensor& w,
                                 const std::vector<int64_t>& offsets, const Tensor& y,
                                 bool trans_w, double beta) = 0;
  virtual void grouped_gemm_wgrad_impl(const Tensor& x, const Tensor& dy,
                                       const std::vector<int64_t>& offsets, const Tensor& dw,
                                       double beta) = 0;
  virtual void swiglu_forward_impl(const Tensor& ab, const Tensor& h) = 0;
  virtual void swiglu_backward_impl(const Tensor& ab, const Tensor& dh, const Tensor& dab) = 0;
  virtual void softmax_forward_impl(const Tensor& l, const Tensor& p) = 0;
  virtual void softmax_backward_impl(const Tensor& p, const Tensor& dp, const Tensor& dl) = 0;
  virtual void sigmoid_forward_impl(const Tensor& x, const Tensor& y) = 0;
  virtual void sigmoid_backward_impl(const Tensor& y, const Tensor& dy, const Tensor& dx) = 0;
  virtual void softplus_forward_impl(const Tensor& x, const Tensor& y) = 0;
  virtual void softplus_backward_impl(const Tensor& x, const Tensor& dy, const Tensor& dx) = 0;
  virtual void row_normalize_forward_impl(const Tensor& x, const Tensor& y) = 0;
  virtual void row_normalize_backward_impl(const Tensor& x, const Tensor& dy,
                                           const Tensor& dx) = 0;
  virtual void row_scale_forward_impl(const Tensor& s, const Tensor& x, const Tensor& y) = 0;
  virtual void row_scale_backward_impl(const Tensor& s, const Tensor& x, const Tensor& dy,
                                       const Tensor& ds, const Tensor& dx) = 0;
  virtual void dropout_forward_impl(const Tensor& x, double p, uint64_t seed,
                                    const Tensor& y) = 0;
  virtual void dropout_backward_impl(const Tensor& dy, double p, uint64_t seed,
                                     const Tensor& dx) = 0;
  virtual void jitter_forward_impl(const Tensor& x, double eps, uint64_t seed,
                                   const Tensor& y, uint64_t offset) = 0;
  virtual void jitter_backward_impl(const Tensor& dy, double eps, uint64_t seed,
                                    const Tensor& dx, uint64_t offset) = 0;
  virtual void noisy_logits_forward_impl(const Tensor& clean, const Tensor& std, double sigma,
                                         uint64_t seed, const Tensor& h, uint64_t offset) = 0;
  virtual void noisy_logits_backward_impl(const Tensor& dh, const Tensor& std, uint64_t seed,
                                          const Tensor& dclean, const Tensor& dstd,
                                          uint64_t offset) = 0;
  virtual void topk_impl(const Tensor& scores, const Tensor& bias, const Tensor& idx) = 0;
  virtual void balanced_assign_impl(const Tensor& idx, int64_t experts, int64_t offset) = 0;
  virtual void gates_forward_impl(const Tensor& scores, const Tensor& idx, bool normalize,
                                  double scale, const Tensor& gates) = 0;
  virtual void gates_backward_impl(const Tensor& scores, const Tensor& idx, const Tensor& dgates,
                                   bool normalize, double scale, const Tensor& dscores) = 0;
  virtual void random_top2_mask_impl(const Tensor& gates, double tau, uint64_t seed,
                                     const Tensor& keep, uint64_t offset) = 0;
  virtual void capacity_mask_impl(const Tensor& idx, const Tensor& gates, int64_t experts,
                                   int64_t capacity, DropPolicy policy, const Tensor& keep) = 0;
  virtual int sinkhorn_impl(const Tensor& logits, double tol, int max_iters,
                            const Tensor& out) = 0;
  virtual void expert_choice_impl(const Tensor& scores, const Tensor& chosen) = 0;
  virtual DispatchPlan dispatch_plan_impl(const Tensor& idx, const Tensor& keep,
                                          bool expert_choice, int64_t experts,
                                          int64_t pad_capacity) = 0;
  virtual void permute_forward_impl(const Tensor& x, const DispatchPlan& plan,
                                    const Tensor& xp) = 0;
  virtual void permute_backward_impl(const Tensor& dxp, const DispatchPlan& plan,
                                     const Tensor& dx) = 0;
  virtual void unpermute_forward_impl(const Tensor& yp, const DispatchPlan& plan,
                                      const Tensor& gates, const Tensor& y) = 0;
  virtual void unpermute_backward_impl(const Tensor& dy, const Tensor& yp,
                                       const DispatchPlan& plan, const Tensor& gates,
                                       const Tensor& dyp, const Tensor& dgates) = 0;
  virtual double aux_loss_forward_impl(const Tensor& probs, const Tensor& idx,
                                       int64_t seq_len) = 0;
  virtual void aux_loss_backward_impl(const Tensor& probs, const Tensor& idx, int64_t seq_len,
                                      double scale, const Tensor& dprobs) = 0;
  virtual double z_loss_forward_impl(const Tensor& logits) = 0;
  virtual void z_loss_backward_impl(const Tensor& logits, double scale,
                                    const Tensor& dlogits) = 0;
  virtual double cv2_loss_forward_impl(const Tensor& gates, const Tensor& idx,
                                       int64_t experts) = 0;
  virtual void cv2_loss_backward_impl(const Tensor& gates, const Tensor& idx, int64_t experts,
                                      double scale, const Tensor& dgates) = 0;
  virtual double load_loss_forward_impl(const Tensor& clean, const Tensor& h, const Tensor& std,
                                        double sigma, int64_t k) = 0;
  virtual void load_loss_backward_impl(const Tensor& clean, const Tensor& h, const Tensor& std,
                                       double sigma, int64_t k, double scale,
                                       const Tensor& dclean, const Tensor& dstd,
                                       const Tensor& dh) = 0;
  virtual void router_logits_backward_impl(const Tensor& scores, const Tensor& logits, const Tensor& idx,
                                           const Tensor& dgates, bool normalize, double score_scale,
                                           int64_t aux_seq_len, double aux_scale, double z_scale,
                                           const Tensor& dlogits);
  virtual RouterStats router_stats_impl(const Tensor& logits, const Tensor& probs,
                                        const Tensor& idx, const Tensor& keep,
                                        bool expert_choice, int64_t experts) = 0;
  virtual RouterSummary router_summary_impl(const Tensor& logits, const Tensor& probs,
                                            const Tensor& idx, const Tensor& keep,
                                            const Tensor& gates, bool expert_choice, int64_t experts,
                                            int64_t aux_seq_len, bool want_aux, bool want_importance);
  virtual PendingRouterSummary router_summary_begin_impl(const Tensor& logits, const Tensor& probs,
                                                         const Tensor& idx, const Tensor& keep,
                                                         const Tensor& gates, bool expert_choice,
                                                         int64_t experts, int64_t aux_seq_len, bool want_aux,
                                                         bool want_importance);
  virtual void scale_impl(const Tensor& x, double alpha) = 0;
  virtual double sum_squares_impl(const Tensor& x) = 0;
  virtual void embedding_forward_impl(const Tensor& tokens, const Tensor& table,
                                      const Tensor& out) = 0;
  virtual void embedding_backward_impl(const Tensor& tokens, const Tensor& dout,
                                       const Tensor& dtable) = 0;
  virtual void rmsnorm_forward_impl(const Tensor& x, const Tensor& w, double eps,
                                    const Tensor& y, const Tensor& rstd) = 0;
  virtual void rmsnorm_backward_impl(const Tensor& x, const Tensor& w, const Tensor& rstd,
                                     const Tensor& dy, const Tensor& dx, const Tensor& dw) = 0;
  // positions / segments: undefined when the caller gave none (plain causal sequences).
  virtual void rope_impl(const Tensor& x, int64_t heads, int64_t seq_len, double theta,
                         bool inverse, const Tensor& y, const Tensor& positions) = 0;
  virtual void attention_forward_impl(const Tensor& q, const Tensor& k, const Tensor& v,
                                      int64_t heads, int64_t kv_heads, int64_t seq_len,
                                      const Tensor& out, const Tensor& lse,
                                      const Tensor& segments) = 0;
  virtual void attention_backward_impl(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& out, const Tensor& lse, const Tensor& dout,
                                       int64_t heads, int64_t kv_heads, int64_t seq_len,
                                       const Tensor& dq, const Tensor& dk, const Tensor& dv,
                                       const Tensor& segments) = 0;
  virtual double cross_entropy_forward_impl(const Tensor& logits, const Tensor& targets) = 0;
  virtual void cross_entropy_backward_impl(const Tensor& logits, const Tensor& targets,
                                           double scale, const Tensor& dlogits) = 0;
  virtual void adamw_impl(const Tensor& param, const Tensor& grad, const Tensor& m,
                          const Tensor& v, double lr, double beta1, double beta2, double eps,
                          double weight_decay, int64_t step, const Tensor& cast_to) = 0;

 private:
  void require(Op op, DType dtype) const;
};

// The target id that bears no loss (cross_entropy_forward / backward).
constexpr int32_t kIgnoreTarget = -1;

// The dtype of attention's saved log-sum-exp for inputs of dtype dt: f32, or f64 for f64 inputs
// (the f64 finite-difference checks need it exact).
inline DType attention_lse_dtype(DType dt) { return dt == DType::F64 ? DType::F64 : DType::F32; }

// Making a backend by name is the registry's job (backends/registry.h): core/ composes ops on
// whatever backend it is given and links without any backend.

template <class T> std::vector<T> Backend::to_vector(const Tensor& src) {
  MOELAB_CHECK(src.dtype() == dtype_of<T>(), "to_vector: dtype ", to_string(src.dtype()));
  std::vector<T> v(size_t(src.numel()));
  copy_bytes(v.data(), false, src.data(), src.device() != Device::CPU, src.nbytes());
  return v;
}

template <class T> Tensor Backend::from_vector(const std::vector<T>& v, Shape shape) {
  MOELAB_CHECK(int64_t(v.size()) == shape.numel(), "from_vector: ", v.size(), " values for ",
               shape.str());
  Tensor t = empty(shape, dtype_of<T>());
  copy_bytes(t.data(), device() != Device::CPU, v.data(), false, t.nbytes());
  return t;
}

}  // namespace moelab
