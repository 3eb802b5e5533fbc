// moelab tests: the transformer ops (embedding, RMSNorm, RoPE, causal attention with GQA,
// cross-entropy, AdamW) and the whole language model, against finite differences in f64.
#include <algorithm>
#include <cstring>
#include <functional>
#include <map>

#include "core/model.h"
#include "test_util.h"

using namespace moelab;
using namespace moelab::test;

namespace {
Backend& B() { return cpu(); }
Tensor like(const Tensor& t) { return B().empty(t.shape(), t.dtype()); }
}  // namespace

TEST_CASE("grad: rmsnorm (input and weight)", "[grad][model]") {
  Tensor x = randn(Shape{5, 8}, 1), w = randn(Shape{8}, 2), r = randn(Shape{5, 8}, 3);
  auto f = [&] {
    Tensor y = like(x), rs = B().empty(Shape{5}, DType::F64);
    B().rmsnorm_forward(x, w, 1e-5, y, rs);
    return dot(y, r);
  };
  Tensor y = like(x), rs = B().empty(Shape{5}, DType::F64), dx = like(x), dw = B().zeros(Shape{8}, DType::F64);
  B().rmsnorm_forward(x, w, 1e-5, y, rs);
  B().rmsnorm_backward(x, w, rs, r, dx, dw);
  check_gradient("rmsnorm dx", f, x, dx);
  check_gradient("rmsnorm dw", f, w, dw);
}

TEST_CASE("grad: rotary embedding is a rotation (backward = transpose)", "[grad][model]") {
  Tensor x = randn(Shape{6, 8}, 4), r = randn(Shape{6, 8}, 5);  // 2 heads of width 4, S = 3
  auto f = [&] { Tensor y = like(x); B().rope_forward(x, 2, 3, 10000.0, y); return dot(y, r); };
  Tensor dx = like(x);
  B().rope_backward(r, 2, 3, 10000.0, dx);
  check_gradient("rope", f, x, dx);
  // Norm preserving, and position 0 is the identity.
  Tensor y = like(x);
  B().rope_forward(x, 2, 3, 10000.0, y);
  REQUIRE(B().sum_squares(y) == Approx(B().sum_squares(x)).epsilon(1e-12));
  for (int d = 0; d < 8; ++d) REQUIRE(y.ptr<double>()[d] == x.ptr<double>()[d]);
}

TEST_CASE("grad: causal attention with grouped-query heads", "[grad][model]") {
  const int64_t S = 4, B_ = 2, H = 4, Hkv = 2, dh = 3, T = S * B_;
  Tensor q = randn(Shape{T, H * dh}, 6), k = randn(Shape{T, Hkv * dh}, 7), v = randn(Shape{T, Hkv * dh}, 8);
  Tensor r = randn(Shape{T, H * dh}, 9);
  auto f = [&] {
    Tensor o = like(q), l = B().empty(Shape{B_ * H, S}, DType::F64);
    B().attention_forward(q, k, v, H, Hkv, S, o, l);
    return dot(o, r);
  };
  Tensor o = like(q), lse = B().empty(Shape{B_ * H, S}, DType::F64);
  B().attention_forward(q, k, v, H, Hkv, S, o, lse);
  Tensor dq = like(q), dk = like(k), dv = like(v);
  B().attention_backward(q, k, v, o, lse, r, H, Hkv, S, dq, dk, dv);
  check_gradient("attention dq", f, q, dq);
  check_gradient("attention dk", f, k, dk);
  check_gradient("attention dv", f, v, dv);
  // Causality: the first token of each sequence attends only to itself, so its output is its
  // kv head's value row and its lse is its own scaled score.
  const auto qv = host_values(q), kv = host_values(k), vv = host_values(v), ov = host_values(o);
  const auto lv = host_values(lse);
  for (int64_t b = 0; b < B_; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / Hkv), t = b * S;
      double s = 0;
      for (int64_t d = 0; d < dh; ++d) {
        s += qv[size_t(t * H * dh + h * dh + d)] * kv[size_t(t * Hkv * dh + g * dh + d)];
        REQUIRE(ov[size_t(t * H * dh + h * dh + d)] == Approx(vv[size_t(t * Hkv * dh + g * dh + d)]).epsilon(1e-12));
      }
      REQUIRE(lv[size_t((b * H + h) * S)] == Approx(s / std::sqrt(double(dh))).epsilon(1e-12));
    }
  // The last row's lse is the log-sum-exp over the whole sequence.
  {
    const int64_t b = 1, h = 3, g = h / (H / Hkv), i = S - 1;
    double m = -1e300, z = 0;
    std::vector<double> sc;
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      for (int64_t d = 0; d < dh; ++d)
        s += qv[size_t((b * S + i) * H * dh + h * dh + d)] * kv[size_t((b * S + j) * Hkv * dh + g * dh + d)];
      sc.push_back(s / std::sqrt(double(dh)));
      m = std::max(m, sc.back());
    }
    for (double s : sc) z += std::exp(s - m);
    REQUIRE(lv[size_t((b * H + h) * S + i)] == Approx(m + std::log(z)).epsilon(1e-12));
  }
}

TEST_CASE("grad: cross-entropy and embedding", "[grad][model]") {
  Tensor l = randn(Shape{6, 5}, 10, 2.0);
  Tensor y = ints({0, 4, 2, 2, 1, 3}, Shape{6});
  Tensor dl = like(l);
  B().cross_entropy_backward(l, y, 1.0, dl);
  check_gradient("cross_entropy", [&] { return B().cross_entropy_forward(l, y); }, l, dl);
  // Uniform logits give log V.
  Tensor u = full(Shape{3, 5}, 0.7);
  REQUIRE(B().cross_entropy_forward(u, ints({0, 1, 2}, Shape{3})) == Approx(std::log(5.0)).epsilon(1e-12));

  Tensor table = randn(Shape{5, 3}, 11), tok = ints({1, 4, 1, 0}, Shape{4}), r = randn(Shape{4, 3}, 12);
  auto f = [&] { Tensor o = B().empty(Shape{4, 3}, DType::F64); B().embedding_forward(tok, table, o); return dot(o, r); };
  Tensor dt = B().zeros(table.shape(), DType::F64);
  B().embedding_backward(tok, r, dt);
  check_gradient("embedding", f, table, dt);
  Tensor bad = ints({7}, Shape{1}), o = B().empty(Shape{1, 3}, DType::F64);
  REQUIRE_THROWS_WITH(B().embedding_forward(bad, table, o), has_substr("token 7 outside the vocabulary"));
}

TEST_CASE("adamw: one step by hand, decoupled weight decay", "[model][optim]") {
  Tensor p = full(Shape{2}, 1.0, DType::F32), g = host_tensor({0.5, -2.0}, Shape{2}, DType::F32);
  Tensor m = full(Shape{2}, 0.0, DType::F32), v = full(Shape{2}, 0.0, DType::F32);
  B().adamw(p, g, m, v, 0.1, 0.9, 0.95, 1e-8, 0.01, 1);
  // Step 1: m_hat = g, v_hat = g^2, update = sign(g) (up to eps) + wd * p.
  auto pv = host_values(p);
  REQUIRE(pv[0] == Approx(1.0 - 0.1 * (1.0 + 0.01)).epsilon(1e-6));
  REQUIRE(pv[1] == Approx(1.0 - 0.1 * (-1.0 + 0.01)).epsilon(1e-6));
  REQUIRE(host_values(m)[0] == Approx(0.05).epsilon(1e-6));
  REQUIRE(host_values(v)[1] == Approx(0.05 * 4.0).epsilon(1e-6));
}

namespace {
LMConfig tiny_lm(int64_t moe_every, bool tie) {
  LMConfig c;
  c.vocab = 11;
  c.d_model = 8;
  c.layers = 2;
  c.heads = 2;
  c.kv_heads = 1;
  c.moe_every = moe_every;
  c.tie_embeddings = tie;
  c.moe.d_model = 8;
  c.moe.experts = 4;
  c.moe.top_k = 2;
  c.moe.d_expert = 6;
  c.moe.router.aux_alpha = 0.1;
  c.moe.router.z_loss = 0.01;
  return c;
}

// prepare(lm), if given, runs after init (to give zero-initialised parameters values).
void check_lm(const LMConfig& cfg, uint64_t seed, const std::function<void(TransformerLM&)>& prepare = {}) {
  TransformerLM lm(B(), cfg, DType::F64);
  lm.init(seed);
  if (prepare) prepare(lm);
  const int64_t S = 5, T = 10;
  std::vector<double> tk, tg;
  for (int t = 0; t < T; ++t) {
    tk.push_back(double(rng::bits(seed, t) % 11));
    tg.push_back(double(rng::bits(seed + 1, t) % 11));
  }
  Tensor tokens = host_tensor(tk, Shape{T}, DType::I32), targets = host_tensor(tg, Shape{T}, DType::I32);
  lm.forward(tokens, targets, S, true, 3);
  lm.zero_grad();
  lm.backward();
  auto f = [&] {
    LMForward o = lm.forward(tokens, targets, S, true, 3);
    return o.ce_loss + o.router_loss;
  };
  for (ParamRef& p : lm.params()) check_gradient(p.name, f, p.value, p.grad, 1e-5, 1e-8);
}
}  // namespace

TEST_CASE("lm grad: MoE every block, tied embeddings, GQA", "[grad][model][lm]") { check_lm(tiny_lm(1, true), 21); }

TEST_CASE("lm grad: GShard alternation (dense, MoE), untied head", "[grad][model][lm]") {
  check_lm(tiny_lm(2, false), 22);
}

TEST_CASE("lm grad: Qwen2-MoE features (q/k/v biases, a dense block by dense_layers, a gated shared "
          "expert of its own width, Hugging Face's pooled aux loss)", "[grad][model][lm][hf]") {
  LMConfig c = tiny_lm(1, false);
  c.layers = 3;
  c.qkv_bias = true;
  c.dense_layers = {1};
  c.d_ff = 7;
  c.moe.shared_experts = 1;
  c.moe.shared_width = 5;
  c.moe.shared_gate = true;
  c.moe.router.normalize = false;
  c.moe.router.aux_convention = AuxConvention::Hf;
  c.moe.router.aux_alpha = 0.3;
  c.rope_theta = 1e6;
  c.norm_eps = 1e-6;
  REQUIRE(TransformerLM(B(), c, DType::F64).moe_blocks() == std::vector<int>{0, 2});
  // Biases start at zero; give them values so that the check sees them act.
  check_lm(c, 23, [](TransformerLM& lm) {
    uint64_t k = 77;
    for (ParamRef& p : lm.params())
      if (p.name.ends_with("_bias")) B().copy(randn(p.value.shape(), k++), p.value);
  });
}

TEST_CASE("lm grad: Qwen3-MoE features (per-head q/k RMSNorm, head_dim 6 with d_model 8)",
          "[grad][model][lm][hf]") {
  LMConfig c = tiny_lm(1, true);
  c.qk_norm = QkNorm::Head;
  c.head_dim = 6;
  c.moe.top_k = 1;
  check_lm(c, 24);
}

TEST_CASE("lm grad: OLMoE features (q/k RMSNorm over the whole projection), k = 3", "[grad][model][lm][hf]") {
  LMConfig c = tiny_lm(1, false);
  c.qk_norm = QkNorm::Projection;
  c.moe.top_k = 3;
  c.moe.router.aux_convention = AuxConvention::Hf;
  check_lm(c, 25);
}

TEST_CASE("lm: Hugging Face's pooled aux loss by hand (two layers, counts and probabilities pooled)",
          "[model][hf]") {
  LMConfig c = tiny_lm(1, true);
  c.moe.router.aux_convention = AuxConvention::Hf;
  TransformerLM lm(B(), c, DType::F64);
  lm.init(5);
  const int64_t T = 10;
  std::vector<double> tk;
  for (int t = 0; t < T; ++t) tk.push_back(double(rng::bits(9, t) % 11));
  Tensor tokens = host_tensor(tk, Shape{T}, DType::I32);
  LMForward o = lm.forward(tokens, tokens, 5, false, 1);
  // E * sum_i (sum_l routed_l,i / (L T)) (mean_l P_l,i), from the layers' own statistics.
  const int64_t E = c.moe.experts, L = 2;
  double want = 0;
  for (int64_t i = 0; i < E; ++i) {
    double f = 0, p = 0;
    for (int64_t l = 0; l < L; ++l) {
      f += double(o.moe[size_t(l)].stats.routed[size_t(i)]) / double(L * T);
      p += o.moe[size_t(l)].stats.mean_prob[size_t(i)] / double(L);
    }
    want += f * p;
  }
  want *= double(E);
  REQUIRE(o.hf_aux == Approx(want).epsilon(1e-14));
  // k assignments per token: F sums to k, so a perfectly balanced router gives k, not 1.
  double per_layer_sum = 0;
  for (const MoEOutput& m : o.moe) per_layer_sum += m.losses.weighted;
  // The layers' own weighted losses leave the Switch term out (z-loss only); the model adds
  // alpha * hf_aux once.
  REQUIRE(o.router_loss == Approx(per_layer_sum + c.moe.router.aux_alpha * o.hf_aux).epsilon(1e-14));
  for (const MoEOutput& m : o.moe) REQUIRE(m.losses.weighted == Approx(c.moe.router.z_loss * m.losses.z).epsilon(1e-14));
}

TEST_CASE("lm: bad model shapes are refused with the key's name", "[model][errors]") {
  LMConfig c = tiny_lm(1, true);
  c.heads = 3;
  REQUIRE_THROWS_WITH(TransformerLM(B(), c, DType::F64), has_substr("model.heads = 3 must divide model.d_model = 8"));
  c.head_dim = 4;  // an explicit head width lifts that requirement
  REQUIRE_NOTHROW(TransformerLM(B(), c, DType::F64));
  c.head_dim = 5;
  REQUIRE_THROWS_WITH(TransformerLM(B(), c, DType::F64), has_substr("must be even"));
  c = tiny_lm(1, true);
  c.dense_layers = {2};
  REQUIRE_THROWS_WITH(TransformerLM(B(), c, DType::F64), has_substr("model.dense_layers lists block 2"));
  c = tiny_lm(1, true);
  c.kv_heads = 3;
  c.heads = 4;
  REQUIRE_THROWS_WITH(TransformerLM(B(), c, DType::F64), has_substr("model.kv_heads"));
}

// train.recompute: forward drops activations and backward computes them again; the same ops on
// the same inputs, so the loss and every gradient are the same bits as keeping them, over two
// steps (the second backward recomputes again). The model has every block kind the recompute
// touches: MoE blocks with a gated shared expert and expert dropout, a dense block, q/k/v biases
// and per-head q/k norms (the attention's optional parts).
TEST_CASE("lm: train.recompute (mlp, attention, all) gives bit-identical losses and gradients",
          "[model][lm][recompute]") {
  LMConfig c = tiny_lm(1, false);
  c.layers = 3;
  c.dense_layers = {1};
  c.qkv_bias = true;
  c.qk_norm = QkNorm::Head;
  c.moe.shared_experts = 1;
  c.moe.shared_gate = true;
  c.moe.expert_dropout = 0.2;
  const int64_t S = 5, T = 10;
  std::vector<double> tk, tg;
  for (int t = 0; t < T; ++t) {
    tk.push_back(double(rng::bits(31, t) % 11));
    tg.push_back(double(rng::bits(32, t) % 11));
  }
  const Tensor tokens = host_tensor(tk, Shape{T}, DType::I32), targets = host_tensor(tg, Shape{T}, DType::I32);
  for (DType dt : {DType::F64, DType::F32}) {
    std::map<Recompute, int64_t> peak;  // the CPU backend's most live tensor bytes in the steps
    auto run = [&](Recompute r, std::vector<std::string>* act_names) {
      LMConfig cr = c;
      cr.recompute = r;
      TransformerLM lm(B(), cr, dt);
      lm.init(41);
      uint64_t k = 90;  // biases start at zero: give them values
      for (ParamRef& p : lm.params())
        if (p.name.ends_with("_bias")) B().copy(randn(p.value.shape(), k++, 1.0, dt), p.value);
      B().reset_peak_bytes();
      const int64_t before = B().peak_bytes();
      std::vector<double> out;
      for (uint64_t step = 0; step < 2; ++step) {
        LMForward f = lm.forward(tokens, targets, S, true, 7 + step);
        if (act_names) {
          act_names->clear();
          for (auto& [name, t] : lm.activations()) act_names->push_back(name);
        }
        out.push_back(f.ce_loss);
        out.push_back(f.router_loss);
        lm.zero_grad();
        lm.backward();
        for (ParamRef& p : lm.params()) {
          const std::vector<double> g = host_values(p.grad);
          out.insert(out.end(), g.begin(), g.end());
        }
      }
      peak[r] = B().peak_bytes() - before;
      return out;
    };
    std::vector<std::string> kept, dropped;
    const std::vector<double> ref = run(Recompute::None, &kept);
    for (Recompute r : {Recompute::Mlp, Recompute::Attention, Recompute::All}) {
      INFO("recompute " << to_string(r) << ", " << to_string(dt));
      const std::vector<double> got = run(r, &dropped);
      REQUIRE(got.size() == ref.size());
      size_t differ = 0;
      for (size_t i = 0; i < ref.size(); ++i) differ += std::memcmp(&got[i], &ref[i], sizeof(double)) != 0;
      CHECK(differ == 0);
      // Attention's saved tensors are gone after forward when it is recomputed.
      const bool attn = r != Recompute::Mlp;
      CHECK((std::find(dropped.begin(), dropped.end(), "block0.q") == dropped.end()) == attn);
      CHECK(std::find(kept.begin(), kept.end(), "block0.q") != kept.end());
      INFO("peak bytes above the weights: " << peak[r] << " recomputing, " << peak[Recompute::None] << " keeping");
      CHECK(peak[r] < peak[Recompute::None]);
    }
    CHECK(peak[Recompute::All] < peak[Recompute::Mlp]);
    CHECK(peak[Recompute::All] < peak[Recompute::Attention]);
  }
}
