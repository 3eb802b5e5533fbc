// moelab: transformer LM forward/backward, composed from backend ops only.
#include "core/model.h"

#include <algorithm>
#include <cmath>

#include "core/profile.h"
#include "core/rng.h"

namespace moelab {

void LMConfig::validate() const {
  moe.validate();
  if (vocab < 2) MOELAB_FAIL("model.vocab = ", vocab, " must be >= 2");
  if (layers < 1) MOELAB_FAIL("model.layers = ", layers, " must be >= 1");
  if (heads < 1) MOELAB_FAIL("model.heads = ", heads, " must be >= 1");
  if (head_dim < 0) MOELAB_FAIL("model.head_dim = ", head_dim, " must be >= 0 (0 = d_model / heads)");
  if (head_dim == 0 && d_model % heads != 0)
    MOELAB_FAIL("model.heads = ", heads, " must divide model.d_model = ", d_model, " (or set model.head_dim)");
  if (head_width() % 2 != 0)
    MOELAB_FAIL("the head width ", head_width(), " (model.head_dim, or model.d_model / model.heads) "
                "must be even (rotary embeddings rotate pairs)");
  for (int64_t l : dense_layers)
    if (l < 0 || l >= layers)
      MOELAB_FAIL("model.dense_layers lists block ", l, ", but blocks are 0 .. ", layers - 1);
  if (kv_heads < 1 || heads % kv_heads != 0)
    MOELAB_FAIL("model.kv_heads = ", kv_heads, " must divide model.heads = ", heads);
  if (moe_every < 0) MOELAB_FAIL("model.moe_every = ", moe_every, " must be >= 0 (0 = dense)");
}

bool LMConfig::is_moe_block(int64_t i) const {
  if (moe_every <= 0 || i % moe_every != moe_every - 1) return false;
  for (int64_t l : dense_layers)
    if (l == i) return false;
  return true;
}

// One transformer block: parameters, their gradients and the activations of the last forward.
struct TransformerLM::Block {
  bool is_moe = false;
  Tensor attn_norm, wq, wk, wv, wo, ffn_norm;      // [D], [D,H*Dh], [D,Hkv*Dh] x2, [H*Dh,D], [D]
  Tensor dattn_norm, dwq, dwk, dwv, dwo, dffn_norm;
  Tensor q_bias, k_bias, v_bias, dq_bias, dk_bias, dv_bias;  // [H*Dh], [Hkv*Dh] x2 (qkv_bias)
  Tensor q_norm, k_norm, dq_norm, dk_norm;  // qk_norm: [Dh] x2 (head), [H*Dh], [Hkv*Dh] (projection)
  std::unique_ptr<SwiGLUExperts> dense;            // E = 1 when the FFN is dense
  std::unique_ptr<MoELayer> moe;
  // Activations (shapes for T tokens):
  Tensor x_in;        // [T,D] block input
  Tensor n1, rstd1;   // [T,D], [T] attention-norm output and its 1/rms
  Tensor q, k, v;     // [T,H*Dh] after RoPE, [T,Hkv*Dh] after RoPE, [T,Hkv*Dh]
  Tensor q_raw, k_raw, rstd_q, rstd_k;  // qk_norm: the projections before their norm, and 1/rms
  Tensor att, lse;    // [T,H*Dh] attention output, [B*H,S] its log-sum-exp per query row
  Tensor x_mid;       // [T,D] after the attention residual
  Tensor n2, rstd2;   // [T,D], [T]
  ExpertsCache dense_cache;
};

TransformerLM::TransformerLM(Backend& backend, const LMConfig& cfg, DType dtype,
                             const ParallelContext* parallel)
    : b_(backend), cfg_(cfg), dtype_(dtype) {
  cfg_.validate();
  MOELAB_CHECK(cfg.moe.d_model == cfg.d_model, "model: MoE d_model ", cfg.moe.d_model,
               " != model d_model ", cfg.d_model);
  const int64_t D = cfg.d_model, V = cfg.vocab, dh = cfg.head_width();
  auto z = [&](Shape s) { return b_.zeros(s, dtype_); };
  embed_ = z({V, D});
  dembed_ = z({V, D});
  final_norm_ = z({D});
  dfinal_norm_ = z({D});
  if (!cfg.tie_embeddings) {
    head_ = z({D, V});
    dhead_ = z({D, V});
  }
  for (int64_t i = 0; i < cfg.layers; ++i) {
    auto blk = std::make_unique<Block>();
    blk->is_moe = cfg.is_moe_block(i);
    blk->attn_norm = z({D});
    blk->dattn_norm = z({D});
    blk->wq = z({D, cfg.heads * dh});
    blk->dwq = z({D, cfg.heads * dh});
    blk->wk = z({D, cfg.kv_heads * dh});
    blk->dwk = z({D, cfg.kv_heads * dh});
    blk->wv = z({D, cfg.kv_heads * dh});
    blk->dwv = z({D, cfg.kv_heads * dh});
    blk->wo = z({cfg.heads * dh, D});
    blk->dwo = z({cfg.heads * dh, D});
    blk->ffn_norm = z({D});
    blk->dffn_norm = z({D});
    if (cfg.qkv_bias) {
      blk->q_bias = z({cfg.heads * dh});
      blk->dq_bias = z({cfg.heads * dh});
      blk->k_bias = z({cfg.kv_heads * dh});
      blk->dk_bias = z({cfg.kv_heads * dh});
      blk->v_bias = z({cfg.kv_heads * dh});
      blk->dv_bias = z({cfg.kv_heads * dh});
    }
    if (cfg.qk_norm != QkNorm::None) {
      const bool head = cfg.qk_norm == QkNorm::Head;
      blk->q_norm = z({head ? dh : cfg.heads * dh});
      blk->dq_norm = z({head ? dh : cfg.heads * dh});
      blk->k_norm = z({head ? dh : cfg.kv_heads * dh});
      blk->dk_norm = z({head ? dh : cfg.kv_heads * dh});
    }
    if (blk->is_moe && parallel && parallel->distributed()) {
      // Experts sharded over the ep group; the router's batch is the world's tokens, and the
      // trainer averages gradients over the world (loss_grad_weight = world).
      std::unique_ptr<Dispatcher> d;
      if (parallel->ep > 1) {
        d = std::make_unique<AllToAllDispatcher>(b_, *parallel->ep_comm, cfg.moe.experts);
        first_expert_ = d->first_expert();
      }
      // router.balance_scope = micro_batch: each rank's router balances its own tokens.
      const bool batch_scope = cfg.moe.router.balance_scope == BalanceScope::Batch;
      blk->moe = std::make_unique<MoELayer>(b_, cfg.moe, dtype_, std::move(d),
                                            batch_scope ? parallel->world_comm : nullptr,
                                            double(parallel->world));
    } else if (blk->is_moe) {
      blk->moe = std::make_unique<MoELayer>(b_, cfg.moe, dtype_);
    }
    if (!blk->is_moe) blk->dense = std::make_unique<SwiGLUExperts>(b_, 1, D, cfg.dense_width(), dtype_);
    const bool mlp = cfg.recompute == Recompute::Mlp || cfg.recompute == Recompute::All;
    if (blk->moe) blk->moe->set_recompute(mlp);
    if (blk->dense) blk->dense->set_recompute(mlp);
    blocks_.push_back(std::move(blk));
  }
}

TransformerLM::~TransformerLM() = default;

std::vector<ParamSlot> TransformerLM::param_slots() {
  std::vector<ParamSlot> ps{{"embed", &embed_, &dembed_}};
  for (size_t i = 0; i < blocks_.size(); ++i) {
    Block& bk = *blocks_[i];
    const std::string p = "block" + std::to_string(i) + ".";
    ps.push_back({p + "attn_norm", &bk.attn_norm, &bk.dattn_norm});
    ps.push_back({p + "wq", &bk.wq, &bk.dwq});
    ps.push_back({p + "wk", &bk.wk, &bk.dwk});
    ps.push_back({p + "wv", &bk.wv, &bk.dwv});
    ps.push_back({p + "wo", &bk.wo, &bk.dwo});
    if (bk.q_bias.defined()) {
      ps.push_back({p + "q_bias", &bk.q_bias, &bk.dq_bias});
      ps.push_back({p + "k_bias", &bk.k_bias, &bk.dk_bias});
      ps.push_back({p + "v_bias", &bk.v_bias, &bk.dv_bias});
    }
    if (bk.q_norm.defined()) {
      ps.push_back({p + "q_norm", &bk.q_norm, &bk.dq_norm});
      ps.push_back({p + "k_norm", &bk.k_norm, &bk.dk_norm});
    }
    ps.push_back({p + "ffn_norm", &bk.ffn_norm, &bk.dffn_norm});
    if (bk.moe) {
      for (ParamSlot& r : bk.moe->param_slots()) ps.push_back({p + "moe." + r.name, r.value, r.grad});
    } else {
      ps.push_back({p + "ffn.w1", &bk.dense->w1(), &bk.dense->dw1()});
      ps.push_back({p + "ffn.w2", &bk.dense->w2(), &bk.dense->dw2()});
    }
  }
  ps.push_back({"final_norm", &final_norm_, &dfinal_norm_});
  if (head_.defined()) ps.push_back({"head", &head_, &dhead_});
  return ps;
}

std::vector<ParamRef> TransformerLM::params() {
  std::vector<ParamRef> ps;
  for (const ParamSlot& s : param_slots()) ps.push_back({s.name, *s.value, *s.grad});
  return ps;
}

int TransformerLM::block_of(const std::string& name) {
  if (!name.starts_with("block")) return -1;
  return std::stoi(name.substr(5, name.find('.') - 5));
}

void TransformerLM::init(uint64_t seed) {
  // Norm weights 1, biases 0; embeddings N(0, (0.02 s)^2); every other matrix N(0, (s / sqrt(fan_in))^2),
  // with the residual-branch outputs (wo, FFN w2) further scaled by 1/sqrt(2 layers) (GPT-2).
  // s = model.init_scale. Each tensor draws from its own stream, derived from its name's index.
  const double s = cfg_.init_scale, resid = 1.0 / std::sqrt(2.0 * double(cfg_.layers));
  uint64_t tag = 0;
  for (ParamRef& p : params()) {
    const uint64_t stream = rng::derive(seed, ++tag);
    const bool is_bias = p.name.ends_with("_bias");
    const bool is_norm = p.value.ndim() == 1 && !is_bias;
    double std = 0;
    if (p.name == "embed") std = 0.02 * s;
    else if (!is_norm && !is_bias) {
      std = s / std::sqrt(double(p.value.dim(p.value.ndim() - 2)));
      const bool out_proj = p.name.ends_with(".wo") || p.name.ends_with("w2");
      if (out_proj) std *= resid;
    }
    // Sharded experts draw their slice of the all-experts stream, so every layout gets the
    // single-rank initialisation.
    const uint64_t first = p.name.find(".moe.experts.") != std::string::npos
                               ? uint64_t(first_expert_) * uint64_t(p.value.numel() / p.value.dim(0))
                               : 0;
    if (is_norm) b_.fill(p.value, 1.0);
    else if (is_bias) b_.fill(p.value, 0.0);
    else b_.fill_normal(p.value, std, stream, first);
  }
}

void TransformerLM::zero_grad() {
  for (ParamRef& p : params()) b_.fill(p.grad, 0.0);
}

std::vector<int> TransformerLM::moe_blocks() const {
  std::vector<int> out;
  for (size_t i = 0; i < blocks_.size(); ++i)
    if (blocks_[i]->is_moe) out.push_back(int(i));
  return out;
}

MoELayer& TransformerLM::moe_layer(size_t i) {
  size_t n = 0;
  for (auto& bk : blocks_)
    if (bk->is_moe && n++ == i) return *bk->moe;
  MOELAB_FAIL("model: no MoE layer number ", i);
}

const Tensor& TransformerLM::logits() const { return logits_; }

std::vector<std::pair<std::string, Tensor>> TransformerLM::activations() {
  std::vector<std::pair<std::string, Tensor>> out;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    Block& bk = *blocks_[i];
    const std::string p = "block" + std::to_string(i) + ".";
    out.insert(out.end(), {{p + "attn_norm", bk.n1}, {p + "q", bk.q}, {p + "k", bk.k},
                           {p + "v", bk.v}, {p + "attn", bk.att}, {p + "x_mid", bk.x_mid},
                           {p + "ffn_norm", bk.n2}});
    if (bk.moe) {
      const RouterState& rs = bk.moe->last_routing();
      out.insert(out.end(), {{p + "moe.router.logits", rs.logits}, {p + "moe.router.probs", rs.scores},
                             {p + "moe.gates", rs.gates}});
    }
  }
  out.push_back({"final_norm", xn_final_});
  out.push_back({"logits", logits_});
  // Dropped ones (train.recompute) are not listed.
  out.erase(std::remove_if(out.begin(), out.end(), [](const auto& a) { return !a.second.defined(); }), out.end());
  return out;
}

// Hugging Face's load_balancing_loss_func (transformers' Mixtral, Qwen-MoE, OLMoE): the router
// outputs of all L MoE layers are concatenated into one batch of L*T rows, so
//   aux_hf = E * sum_i F_i * P_i,  F_i = sum_l routed_l,i / (L T),  P_i = mean_l P_l,i
// (F sums to k: k assignments per token), and dL/dp_l,t,i = alpha * E * F_i / (L T) for every
// layer and token. Counts and P are the batch's (the routers' batch group, if any).
void TransformerLM::pooled_aux_loss(LMForward& out) {
  const int64_t E = cfg_.moe.experts, L = int64_t(out.moe.size());
  const int64_t T = moe_layer(0).last_routing().batch_tokens;  // out.moe is not empty
  std::vector<double> F(size_t(E), 0.0), P(size_t(E), 0.0);
  for (const MoEOutput& mo : out.moe)
    for (int64_t i = 0; i < E; ++i) {
      F[size_t(i)] += double(mo.stats.routed[size_t(i)]);
      P[size_t(i)] += mo.stats.mean_prob[size_t(i)];
    }
  double aux = 0;
  for (int64_t i = 0; i < E; ++i) {
    F[size_t(i)] /= double(L) * double(T);
    P[size_t(i)] /= double(L);
    aux += F[size_t(i)] * P[size_t(i)];
  }
  out.hf_aux = double(E) * aux;
  const RouterConfig& rc = cfg_.moe.router;
  if (rc.aux_convention != AuxConvention::Hf) return;
  out.router_loss += rc.aux_alpha * out.hf_aux;
  std::vector<double> g(static_cast<size_t>(E), 0.0);
  for (int64_t i = 0; i < E; ++i) g[size_t(i)] = rc.aux_alpha * double(E) * F[size_t(i)] / (double(L) * double(T));
  for (size_t l = 0; l < out.moe.size(); ++l) moe_layer(l).router().set_pooled_aux_grad(g);
}

LMForward TransformerLM::forward(const Tensor& tokens, const Tensor& targets, int64_t seq_len,
                                 bool training, uint64_t seed, const PackedLayout& packed) {
  const int64_t T = tokens.numel(), D = cfg_.d_model;
  MOELAB_CHECK(seq_len >= 1 && T % seq_len == 0, "model: ", T, " tokens do not split into sequences of ",
               seq_len);
  MOELAB_CHECK(targets.numel() == T, "model: ", targets.numel(), " targets for ", T, " tokens");
  tokens_ = tokens;
  targets_ = targets;
  seq_len_ = seq_len;
  packed_ = packed;
  auto e = [&](Shape s) { return b_.empty(s, dtype_); };
  // q/k/v biases: a column of ones, shared by every block's rank-1 GEMMs.
  Tensor ones;
  if (cfg_.qkv_bias) {
    ones = e({T, 1});
    b_.fill(ones, 1.0);
  }

  Tensor x = e({T, D});
  {
    ProfileScope ps(b_, "embedding");
    b_.embedding_forward(tokens, embed_, x);
  }
  LMForward out;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    Block& bk = *blocks_[i];
    bk.x_in = x;
    bk.n1 = e({T, D});
    bk.rstd1 = e({T});
    {
      ProfileScope ps(b_, "norms");
      b_.rmsnorm_forward(x, bk.attn_norm, cfg_.norm_eps, bk.n1, bk.rstd1);
    }
    attention_forward_block(bk, ones, seq_len, packed);
    bk.x_mid = e({T, D});
    {
      ProfileScope ps(b_, "attention projections");
      b_.copy(x, bk.x_mid);
      b_.gemm(false, false, 1.0, bk.att, bk.wo, 1.0, bk.x_mid);  // x_mid = x + att Wo
    }
    if (recompute_attention()) drop_attention(bk);  // backward recomputes it from n1

    bk.n2 = e({T, D});
    bk.rstd2 = e({T});
    {
      ProfileScope ps(b_, "norms");
      b_.rmsnorm_forward(bk.x_mid, bk.ffn_norm, cfg_.norm_eps, bk.n2, bk.rstd2);
    }
    Tensor f;
    if (bk.moe) {
      MoEOutput mo = bk.moe->forward(bk.n2, {training, seq_len, rng::derive(seed, 100 + i)});
      f = mo.y;
      out.router_loss += mo.losses.weighted;
      out.moe.push_back(std::move(mo));
    } else {
      ProfileScope ps(b_, "dense ffn");
      f = bk.dense->forward(bk.n2, {0, T}, 0.0, 0, bk.dense_cache);
    }
    Tensor x_out = e({T, D});
    {
      ProfileScope ps(b_, "residual");
      b_.copy(bk.x_mid, x_out);
      b_.axpy(1.0, f, x_out);
    }
    x = x_out;
  }
  if (!out.moe.empty()) pooled_aux_loss(out);
  x_final_ = x;
  xn_final_ = e({T, D});
  rstd_final_ = e({T});
  {
    ProfileScope ps(b_, "norms");
    b_.rmsnorm_forward(x, final_norm_, cfg_.norm_eps, xn_final_, rstd_final_);
  }
  ProfileScope ps(b_, "head and loss");
  logits_ = e({T, cfg_.vocab});
  if (cfg_.tie_embeddings) b_.gemm(false, true, 1.0, xn_final_, embed_, 0.0, logits_);
  else b_.gemm(false, false, 1.0, xn_final_, head_, 0.0, logits_);
  out.ce_loss = b_.cross_entropy_forward(logits_, targets);
  return out;
}

void TransformerLM::drop_attention(Block& bk) {
  bk.q = bk.k = bk.v = bk.att = bk.lse = Tensor();
  bk.q_raw = bk.k_raw = bk.rstd_q = bk.rstd_k = Tensor();
}

void TransformerLM::attention_forward_block(Block& bk, const Tensor& ones, int64_t seq_len,
                                            const PackedLayout& packed) {
  const int64_t T = bk.n1.dim(0), H = cfg_.heads, Hkv = cfg_.kv_heads, dh = cfg_.head_width();
  auto e = [&](Shape s) { return b_.empty(s, dtype_); };
  Tensor q = e({T, H * dh}), k = e({T, Hkv * dh});
  bk.v = e({T, Hkv * dh});
  {
    ProfileScope ps(b_, "attention projections");
    b_.gemm(false, false, 1.0, bk.n1, bk.wq, 0.0, q);
    b_.gemm(false, false, 1.0, bk.n1, bk.wk, 0.0, k);
    b_.gemm(false, false, 1.0, bk.n1, bk.wv, 0.0, bk.v);
    if (bk.q_bias.defined()) {  // + ones [T,1] x bias [1,N]: a rank-1 GEMM, no extra op
      b_.gemm(false, false, 1.0, ones, bk.q_bias.reshape({1, H * dh}), 1.0, q);
      b_.gemm(false, false, 1.0, ones, bk.k_bias.reshape({1, Hkv * dh}), 1.0, k);
      b_.gemm(false, false, 1.0, ones, bk.v_bias.reshape({1, Hkv * dh}), 1.0, bk.v);
    }
  }
  if (bk.q_norm.defined()) {
    // RMSNorm per head (rows of Dh) or over the whole projection (rows of H*Dh), then RoPE.
    ProfileScope ps(b_, "norms");
    const bool head = cfg_.qk_norm == QkNorm::Head;
    bk.q_raw = q;
    bk.k_raw = k;
    q = e({T, H * dh});
    k = e({T, Hkv * dh});
    bk.rstd_q = e({head ? T * H : T});
    bk.rstd_k = e({head ? T * Hkv : T});
    const Shape qs = head ? Shape{T * H, dh} : Shape{T, H * dh};
    const Shape ks = head ? Shape{T * Hkv, dh} : Shape{T, Hkv * dh};
    b_.rmsnorm_forward(bk.q_raw.reshape(qs), bk.q_norm, cfg_.norm_eps, q.reshape(qs), bk.rstd_q);
    b_.rmsnorm_forward(bk.k_raw.reshape(ks), bk.k_norm, cfg_.norm_eps, k.reshape(ks), bk.rstd_k);
  }
  bk.q = e({T, H * dh});
  bk.k = e({T, Hkv * dh});
  bk.att = e({T, H * dh});
  bk.lse = b_.empty({T / seq_len * H, seq_len}, attention_lse_dtype(dtype_));
  {
    ProfileScope ps(b_, "attention (rope, scores, softmax, values)");
    b_.rope_forward(q, H, seq_len, cfg_.rope_theta, bk.q, packed.positions);
    b_.rope_forward(k, Hkv, seq_len, cfg_.rope_theta, bk.k, packed.positions);
    b_.attention_forward(bk.q, bk.k, bk.v, H, Hkv, seq_len, bk.att, bk.lse, packed.segments);
  }
}

void TransformerLM::backward(const std::function<void(int block)>& block_done, double ce_scale) {
  MOELAB_CHECK(logits_.defined(), "model: backward without a forward");
  const int64_t T = tokens_.numel(), D = cfg_.d_model, H = cfg_.heads, Hkv = cfg_.kv_heads;
  const int64_t dh = cfg_.head_width(), S = seq_len_;
  auto e = [&](Shape s) { return b_.empty(s, dtype_); };
  // q/k/v biases: a column of ones, shared by every block's rank-1 GEMMs.
  Tensor ones;
  if (cfg_.qkv_bias) {
    ones = e({T, 1});
    b_.fill(ones, 1.0);
  }

  Tensor dlogits = e({T, cfg_.vocab});
  Tensor dxn = e({T, D});
  {
    ProfileScope ps(b_, "head and loss");
    b_.cross_entropy_backward(logits_, targets_, ce_scale, dlogits);
    if (cfg_.tie_embeddings) {
      b_.gemm(false, false, 1.0, dlogits, embed_, 0.0, dxn);         // dxn = dlogits E
      b_.gemm(true, false, 1.0, dlogits, xn_final_, 1.0, dembed_);   // dE += dlogits^T xn
    } else {
      b_.gemm(false, true, 1.0, dlogits, head_, 0.0, dxn);
      b_.gemm(true, false, 1.0, xn_final_, dlogits, 1.0, dhead_);
    }
  }
  Tensor dx = e({T, D});
  {
    ProfileScope ps(b_, "norms");
    b_.rmsnorm_backward(x_final_, final_norm_, rstd_final_, dxn, dx, dfinal_norm_);
  }

  Tensor tmp = e({T, D});
  for (size_t i = blocks_.size(); i-- > 0;) {
    Block& bk = *blocks_[i];
    // x_out = x_mid + FFN(n2): dx_mid = dx + d(n2 path).
    Tensor dn2 = e({T, D});
    if (bk.moe) {
      bk.moe->backward(dx, dn2);
    } else {
      ProfileScope ps(b_, "dense ffn");
      bk.dense->backward(bk.dense_cache, dx, 0.0, dn2);
    }
    {
      ProfileScope ps(b_, "norms");
      b_.rmsnorm_backward(bk.x_mid, bk.ffn_norm, bk.rstd2, dn2, tmp, bk.dffn_norm);
      b_.axpy(1.0, tmp, dx);  // dx is now d x_mid
    }

    // Dropped by forward (train.recompute = attention | all): computed again from n1, the same
    // ops on the same inputs, so the same bits.
    if (!bk.att.defined()) attention_forward_block(bk, ones, S, packed_);
    // x_mid = x_in + att Wo.
    Tensor datt = e({T, H * dh});
    Tensor dq = e({T, H * dh}), dk = e({T, Hkv * dh}), dv = e({T, Hkv * dh});
    {
      ProfileScope ps(b_, "attention projections");
      b_.gemm(false, true, 1.0, dx, bk.wo, 0.0, datt);
      b_.gemm(true, false, 1.0, bk.att, dx, 1.0, bk.dwo);
    }
    {
      ProfileScope ps(b_, "attention (rope, scores, softmax, values)");
      b_.attention_backward(bk.q, bk.k, bk.v, bk.att, bk.lse, datt, H, Hkv, S, dq, dk, dv,
                            packed_.segments);
      b_.rope_backward(dq, H, S, cfg_.rope_theta, dq, packed_.positions);
      b_.rope_backward(dk, Hkv, S, cfg_.rope_theta, dk, packed_.positions);
    }
    if (bk.q_norm.defined()) {  // dq, dk are w.r.t. the normed projections: back through the norms
      ProfileScope ps(b_, "norms");
      const bool head = cfg_.qk_norm == QkNorm::Head;
      const Shape qs = head ? Shape{T * H, dh} : Shape{T, H * dh};
      const Shape ks = head ? Shape{T * Hkv, dh} : Shape{T, Hkv * dh};
      Tensor dq_raw = e({T, H * dh}), dk_raw = e({T, Hkv * dh});
      b_.rmsnorm_backward(bk.q_raw.reshape(qs), bk.q_norm, bk.rstd_q, dq.reshape(qs), dq_raw.reshape(qs),
                          bk.dq_norm);
      b_.rmsnorm_backward(bk.k_raw.reshape(ks), bk.k_norm, bk.rstd_k, dk.reshape(ks), dk_raw.reshape(ks),
                          bk.dk_norm);
      dq = dq_raw;
      dk = dk_raw;
    }
    Tensor dn1 = e({T, D});
    {
      ProfileScope ps(b_, "attention projections");
      if (bk.q_bias.defined()) {  // d bias += ones^T d(projection)
        b_.gemm(true, false, 1.0, ones, dq, 1.0, bk.dq_bias.reshape({1, H * dh}));
        b_.gemm(true, false, 1.0, ones, dk, 1.0, bk.dk_bias.reshape({1, Hkv * dh}));
        b_.gemm(true, false, 1.0, ones, dv, 1.0, bk.dv_bias.reshape({1, Hkv * dh}));
      }
      b_.gemm(true, false, 1.0, bk.n1, dq, 1.0, bk.dwq);
      b_.gemm(true, false, 1.0, bk.n1, dk, 1.0, bk.dwk);
      b_.gemm(true, false, 1.0, bk.n1, dv, 1.0, bk.dwv);
      b_.gemm(false, true, 1.0, dq, bk.wq, 0.0, dn1);
      b_.gemm(false, true, 1.0, dk, bk.wk, 1.0, dn1);
      b_.gemm(false, true, 1.0, dv, bk.wv, 1.0, dn1);
    }
    {
      ProfileScope ps(b_, "norms");
      b_.rmsnorm_backward(bk.x_in, bk.attn_norm, bk.rstd1, dn1, tmp, bk.dattn_norm);
    }
    if (recompute_attention()) drop_attention(bk);  // one block's recomputed attention at a time
    if (block_done) block_done(int(i));
    ProfileScope ps(b_, "residual");
    b_.axpy(1.0, tmp, dx);  // dx is now d x_in
  }
  ProfileScope ps(b_, "embedding");
  b_.embedding_backward(tokens_, dx, dembed_);
}

}  // namespace moelab
