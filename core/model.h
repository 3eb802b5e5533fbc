// moelab: the decoder-only MoE language model (Mixtral style), explicit forward and backward.
//
//   x0 = embed[tokens]
//   block i:  x += Wo Attention(RoPE(Wq n), RoPE(Wk n), Wv n),  n = RMSNorm(x)   (causal, GQA)
//             (optionally q, k, v + biases (Qwen2-MoE) and q, k RMSNorm-ed before RoPE, per head
//             (Qwen3-MoE) or over the whole projection (OLMoE))
//             x += FFN_i(RMSNorm(x)),  FFN_i = MoE layer if block i is an MoE block, else a dense
//             SwiGLU (GShard alternates: block i is MoE when moe_every > 0 and
//             i % moe_every == moe_every - 1; moe_every = 0 is a dense model; dense_layers
//             forces blocks dense, as Qwen's mlp_only_layers)
//   logits = RMSNorm(x_L) W_head   (W_head = embed^T when tied)
//   objective = CE(logits, targets) + sum over MoE blocks of their weighted router losses
//
// forward() keeps the activations backward() needs (one Activations struct per block);
// backward() accumulates (+=) every parameter gradient; call zero_grad() between steps.
// Dimension letters: T tokens (B sequences of S), D width, H heads, Hkv kv heads, Dh head width,
// F dense FFN width, V vocabulary.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/moe/moe_layer.h"
#include "core/parallel.h"

namespace moelab {

struct LMConfig {
  int64_t vocab = 256;
  int64_t d_model = 64;
  int64_t layers = 2;
  int64_t heads = 4;
  int64_t kv_heads = 4;
  int64_t moe_every = 1;       // see the header comment; 0 = dense model
  int64_t d_ff = 0;            // dense FFN width; 0 = top_k * d_expert (equal active params)
  bool tie_embeddings = true;
  double init_scale = 1.0;     // multiplies every init std (Switch: 0.1 for stability)
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  int64_t head_dim = 0;            // 0 = d_model / heads (Qwen3 sets its own: H * Dh != D)
  bool qkv_bias = false;           // q, k, v projections have biases (Qwen2-MoE)
  QkNorm qk_norm = QkNorm::None;   // RMSNorm of q and k before RoPE (Qwen3-MoE head, OLMoE projection)
  Recompute recompute = Recompute::None;  // train.recompute (core/moe/config.h)
  std::vector<int64_t> dense_layers;  // blocks forced dense whatever moe_every says
  MoEConfig moe;
  void validate() const;
  bool is_moe_block(int64_t i) const;
  int64_t dense_width() const { return d_ff > 0 ? d_ff : moe.top_k * moe.d_expert; }
  int64_t head_width() const { return head_dim > 0 ? head_dim : d_model / heads; }
};

// Records packed into one sequence (SFT, data.pack): per token, its record (segment) and its
// position inside the record, i32 [T] each on the model's backend. Attention then sees only keys
// of the query's own record and rotary embeddings restart at 0 with every record, so a packed
// record's logits are those of the record run alone. Undefined tensors: plain sequences.
struct PackedLayout {
  Tensor segments;   // i32 [T]
  Tensor positions;  // i32 [T], >= 0
};

struct LMForward {
  double ce_loss = 0;              // mean cross-entropy, nats per token
  double router_loss = 0;          // sum of the MoE blocks' weighted router losses (with
                                   // router.aux_convention = hf: + aux_alpha * hf_aux)
  double hf_aux = 0;               // Hugging Face's pooled load-balancing loss (un-weighted;
                                   // computed for every MoE model, used with aux_convention = hf)
  std::vector<MoEOutput> moe;      // one per MoE block, in block order
};

class TransformerLM {
 public:
  // parallel: this rank's context in a distributed run (null or one rank: everything local).
  // Then the MoE blocks hold only this rank's experts and route the world's batch.
  TransformerLM(Backend& backend, const LMConfig& cfg, DType dtype,
                const ParallelContext* parallel = nullptr);
  ~TransformerLM();

  void init(uint64_t seed);
  std::vector<ParamRef> params();  // stable names and order (checkpoints rely on it)
  std::vector<ParamSlot> param_slots();  // params() as slots (ParamStore rebinds the gradients)
  // The block (0 .. layers-1) whose backward completes parameter `name`'s gradient, or -1 for
  // the embedding, the final norm and the head (complete only when backward() returns).
  static int block_of(const std::string& name);
  void zero_grad();

  // tokens, targets: i32 [T] on this backend, T = B * seq_len. A target of kIgnoreTarget bears
  // no loss (ce_loss is the mean over the others). training: noise, random routing draws and
  // dropout on; seed drives them. packed: see PackedLayout (kept for backward()).
  LMForward forward(const Tensor& tokens, const Tensor& targets, int64_t seq_len, bool training,
                    uint64_t seed, const PackedLayout& packed = {});
  // Logits of the last forward, [T,V] (for sampling).
  const Tensor& logits() const;
  // The named activations of the last forward in forward order (for cross-backend checks):
  // per block attn_norm, q, k (after RoPE), v, attn, x_mid, ffn_norm, and for MoE blocks the
  // router's logits, probs and gates; then final_norm and logits.
  std::vector<std::pair<std::string, Tensor>> activations();
  // block_done(i), if given, is called once block i's parameter gradients are complete (blocks
  // in backward order, layers-1 down to 0), so they can be reduced while backward goes on.
  // ce_scale multiplies the cross-entropy's gradient (not the router losses'): the trainer
  // weights a micro-batch by its share of the step's loss-bearing tokens.
  void backward(const std::function<void(int block)>& block_done = {}, double ce_scale = 1.0);

  const LMConfig& config() const { return cfg_; }
  std::vector<int> moe_blocks() const;           // block indices with an MoE FFN
  MoELayer& moe_layer(size_t i);                 // i-th MoE block's layer
  DType dtype() const { return dtype_; }

 private:
  struct Block;
  void pooled_aux_loss(LMForward& out);  // out.hf_aux, and the hf convention's gradients
  // Attention of block bk from its normed input bk.n1: q, k, v (with biases and q/k norms),
  // RoPE, and the attention output and log-sum-exp (forward, and backward's recomputation).
  void attention_forward_block(Block& bk, const Tensor& ones, int64_t seq_len, const PackedLayout& packed);
  static void drop_attention(Block& bk);  // releases what attention_forward_block made
  bool recompute_attention() const {
    return cfg_.recompute == Recompute::Attention || cfg_.recompute == Recompute::All;
  }
  Backend& b_;
  LMConfig cfg_;
  DType dtype_;
  Tensor embed_, dembed_, final_norm_, dfinal_norm_, head_, dhead_;
  std::vector<std::unique_ptr<Block>> blocks_;
  // Activations of the last forward.
  Tensor tokens_, targets_, x_final_, xn_final_, rstd_final_, logits_;
  PackedLayout packed_;
  int64_t seq_len_ = 0;
  int64_t first_expert_ = 0;  // global index of this rank's first expert (expert parallelism)
};

}  // namespace moelab
