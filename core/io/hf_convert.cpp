// moelab: Hugging Face checkpoint conversion (see hf_convert.h).
#include "core/io/hf_convert.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <set>

#include "core/check.h"
#include "core/io/json_strict.h"
#include "core/io/output_file.h"

namespace moelab {
namespace fs = std::filesystem;

const char* to_string(HfExpertLayout l) { return l == HfExpertLayout::Fused ? "fused" : "per_expert"; }

HfExpertLayout hf_expert_layout_from(const std::string& name) {
  if (name == "per_expert") return HfExpertLayout::PerExpert;
  if (name == "fused") return HfExpertLayout::Fused;
  MOELAB_USAGE_FAIL("expert layout '", name, "' is not one of per_expert|fused");
}

HfArch hf_arch_from(const std::string& name) {
  for (HfArch a : {HfArch::Mixtral, HfArch::Qwen2Moe, HfArch::Qwen3Moe, HfArch::Olmoe})
    if (name == to_string(a) || name == hf_model_type(a)) return a;
  MOELAB_USAGE_FAIL("architecture '", name, "' is not one of MixtralForCausalLM (mixtral), Qwen2MoeForCausalLM "
                    "(qwen2_moe), Qwen3MoeForCausalLM (qwen3_moe), OlmoeForCausalLM (olmoe)");
}

// ---- config ------------------------------------------------------------------------------

RunConfig run_config_from_hf(const HfConfig& hf) {
  const std::string src = "config.json " + hf.source + ": " + hf.architecture;
  if (hf.o_bias)
    MOELAB_USAGE_FAIL(src, " with attention_bias = true is not supported: moelab's output projection has no bias");
  RunConfig c;
  ModelConfig& m = c.model;
  MoEConfig& moe = c.moe;
  m.layers = hf.num_hidden_layers;
  moe.d_model = hf.hidden_size;
  m.heads = hf.num_attention_heads;
  m.kv_heads = hf.num_key_value_heads;
  // head_dim only when it is not d_model / heads (Qwen3's 2048-wide models have 32 heads of 128).
  m.head_dim = hf.hidden_size % hf.num_attention_heads == 0 && hf.head_dim * hf.num_attention_heads == hf.hidden_size
                   ? 0 : hf.head_dim;
  m.vocab = hf.vocab_size;
  m.tie_embeddings = hf.tie_word_embeddings;
  m.rope_theta = hf.rope_theta;
  m.norm_eps = hf.rms_norm_eps;
  m.qkv_bias = hf.qkv_bias;
  m.qk_norm = hf.qk_norm == HfQkNorm::PerHead ? QkNorm::Head
              : hf.qk_norm == HfQkNorm::WholeProjection ? QkNorm::Projection : QkNorm::None;
  m.moe_every = hf.decoder_sparse_step;
  m.dense_layers = hf.mlp_only_layers;
  m.d_ff = hf.arch == HfArch::Qwen2Moe || hf.arch == HfArch::Qwen3Moe ? hf.intermediate_size : 0;
  m.dtype = hf.dtype == "bfloat16" ? DType::BF16 : hf.dtype == "float64" ? DType::F64 : DType::F32;
  moe.experts = hf.num_experts;
  moe.top_k = hf.num_experts_per_tok;
  moe.d_expert = hf.moe_intermediate_size;
  if (hf.shared_expert_intermediate_size > 0) {
    moe.shared_experts = 1;
    moe.shared_width = hf.shared_expert_intermediate_size;
    moe.shared_gate = hf.shared_expert_gate;
  }
  RouterConfig& r = moe.router;
  r.score = ScoreFunc::Softmax;
  r.normalize = hf.norm_topk_prob;
  r.policy = RoutingPolicy::TopK;
  r.aux_alpha = hf.router_aux_loss_coef;
  r.aux_convention = AuxConvention::Hf;
  r.capacity_factor = 0;
  if (hf.router_jitter_noise > 0) {  // Mixtral: multiplicative jitter (moelab: router input only)
    r.noise = NoiseType::Jitter;
    r.noise_eps = hf.router_jitter_noise;
  }
  finalize(c);
  return c;
}

HfConfig hf_config_for(const RunConfig& cfg, HfArch arch) {
  const ModelConfig& m = cfg.model;
  const MoEConfig& moe = cfg.moe;
  const RouterConfig& r = moe.router;
  const std::string cls = to_string(arch);
  auto refuse = [&](const std::string& what, const std::string& why) {
    MOELAB_USAGE_FAIL("export-hf --arch ", cls, ": ", what, " cannot be written: ", why);
  };
  const bool mixtral = arch == HfArch::Mixtral, qwen2 = arch == HfArch::Qwen2Moe,
             qwen3 = arch == HfArch::Qwen3Moe, olmoe = arch == HfArch::Olmoe;
  if (m.moe_every < 1) refuse("model.moe_every = 0 (a dense model)", cls + " is a mixture of experts");
  if ((mixtral || olmoe) && (m.moe_every != 1 || !m.dense_layers.empty()))
    refuse("dense blocks (model.moe_every = " + std::to_string(m.moe_every) + ", model.dense_layers)",
           cls + " has an MoE block in every layer");
  if ((mixtral || olmoe) && m.qkv_bias) refuse("model.qkv_bias = true", cls + " has no q/k/v biases");
  if (qwen3 && m.qkv_bias) refuse("model.qkv_bias = true", cls + "'s attention_bias also adds an o_proj bias, which moelab lacks");
  if (mixtral && m.qk_norm != QkNorm::None) refuse("model.qk_norm", "Mixtral has no q/k norm");
  if (qwen2 && m.qk_norm != QkNorm::None) refuse("model.qk_norm", "Qwen2-MoE has no q/k norm");
  if (qwen3 && m.qk_norm != QkNorm::Head)
    refuse("model.qk_norm = " + std::string(to_string(m.qk_norm)), "Qwen3-MoE always normalises q and k per head (set model.qk_norm = head)");
  if (olmoe && m.qk_norm != QkNorm::Projection)
    refuse("model.qk_norm = " + std::string(to_string(m.qk_norm)), "OLMoE always normalises the whole q and k projections (model.qk_norm = projection)");
  if (!qwen2 && moe.shared_experts > 0) refuse("model.shared_experts > 0", cls + " has no shared expert");
  if (qwen2 && (moe.shared_experts == 0 || !moe.shared_gate))
    refuse("a model without a gated shared expert (model.shared_experts >= 1, model.shared_gate = true)",
           "Qwen2-MoE always has one, with a sigmoid gate");
  if (mixtral && !r.normalize) refuse("router.normalize = false", "Mixtral always renormalises the top-k gates");
  if (r.score != ScoreFunc::Softmax) refuse("router.score = " + std::string(to_string(r.score)), cls + " routes by softmax");
  if (r.score_scale != 1.0) refuse("router.score_scale != 1", cls + " does not scale the gates");
  if (r.policy != RoutingPolicy::TopK && r.policy != RoutingPolicy::RandomTop2)
    refuse("router.policy = " + std::string(to_string(r.policy)), cls + " routes by top-k");
  if (r.capacity_factor > 0) refuse("router.capacity_factor > 0", cls + " is dropless (it would keep tokens moelab drops)");
  if (r.bias_update_rate > 0) refuse("router.bias_update_rate > 0", cls + " has no routing bias");
  if (moe.expert_dropout > 0) { /* training only: nothing to write */ }

  HfConfig h;
  h.arch = arch;
  h.architecture = cls;
  h.model_type = hf_model_type(arch);
  h.vocab_size = m.vocab;
  h.hidden_size = moe.d_model;
  h.num_hidden_layers = m.layers;
  h.num_attention_heads = m.heads;
  h.num_key_value_heads = m.kv_heads > 0 ? m.kv_heads : m.heads;
  h.head_dim = m.head_width(moe.d_model);
  h.num_experts = moe.experts;
  h.num_experts_per_tok = moe.top_k;
  h.moe_intermediate_size = moe.d_expert;
  h.intermediate_size = mixtral || olmoe ? moe.d_expert : (m.d_ff > 0 ? m.d_ff : moe.top_k * moe.d_expert);
  h.shared_expert_intermediate_size = qwen2 ? moe.shared_hidden() : 0;
  h.shared_expert_gate = qwen2;
  h.norm_topk_prob = r.normalize;
  h.decoder_sparse_step = m.moe_every;
  h.mlp_only_layers = m.dense_layers;
  h.tie_word_embeddings = m.tie_embeddings;
  h.qkv_bias = qwen2;  // Qwen2-MoE always has them (zeros when the moelab model has none)
  h.qk_norm = qwen3 ? HfQkNorm::PerHead : olmoe ? HfQkNorm::WholeProjection : HfQkNorm::None;
  h.rms_norm_eps = m.norm_eps;
  h.rope_theta = m.rope_theta;
  h.router_aux_loss_coef = r.aux_alpha;
  h.router_jitter_noise = mixtral && r.noise == NoiseType::Jitter ? r.noise_eps : 0.0;
  h.max_position_embeddings = std::max<int64_t>(4096, cfg.train.seq);
  h.dtype = m.dtype == DType::BF16 ? "bfloat16" : m.dtype == DType::F64 ? "float64" : "float32";
  return h;
}

std::string hf_config_json(const HfConfig& h) {
  nlohmann::ordered_json j;
  j["architectures"] = {h.architecture};
  j["model_type"] = h.model_type;
  j["vocab_size"] = h.vocab_size;
  j["hidden_size"] = h.hidden_size;
  j["num_hidden_layers"] = h.num_hidden_layers;
  j["num_attention_heads"] = h.num_attention_heads;
  j["num_key_value_heads"] = h.num_key_value_heads;
  j["head_dim"] = h.head_dim;
  j["intermediate_size"] = h.intermediate_size;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = h.rms_norm_eps;
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", h.rope_theta}};
  j["max_position_embeddings"] = h.max_position_embeddings;
  j["tie_word_embeddings"] = h.tie_word_embeddings;
  j["attention_dropout"] = 0.0;
  j["router_aux_loss_coef"] = h.router_aux_loss_coef;
  j["num_experts_per_tok"] = h.num_experts_per_tok;
  switch (h.arch) {
    case HfArch::Mixtral:
      j["num_local_experts"] = h.num_experts;
      j["router_jitter_noise"] = h.router_jitter_noise;
      j["sliding_window"] = nullptr;
      break;
    case HfArch::Qwen2Moe:
    case HfArch::Qwen3Moe:
      j["num_experts"] = h.num_experts;
      j["moe_intermediate_size"] = h.moe_intermediate_size;
      if (h.arch == HfArch::Qwen2Moe) {
        j["shared_expert_intermediate_size"] = h.shared_expert_intermediate_size;
        j["qkv_bias"] = h.qkv_bias;
      } else {
        j["attention_bias"] = false;
      }
      j["norm_topk_prob"] = h.norm_topk_prob;
      j["decoder_sparse_step"] = h.decoder_sparse_step;
      j["mlp_only_layers"] = h.mlp_only_layers;
      j["use_sliding_window"] = false;
      break;
    case HfArch::Olmoe:
      j["num_experts"] = h.num_experts;
      j["norm_topk_prob"] = h.norm_topk_prob;
      j["attention_bias"] = false;
      j["clip_qkv"] = nullptr;
      break;
  }
  j["dtype"] = h.dtype;
  return j.dump(2) + "\n";
}

// ---- tensor helpers ----------------------------------------------------------------------

namespace {

// Blocked transposes (a byte copy per element: exact). `src` is [R, ld_src] read from column
// c_src, `dst` is [C, ld_dst] written from column c_dst: dst[c][c_dst + r] = src[r][c_src + c]
// for r < R, c < C. Tiles of 32 x 32 keep both sides in cache.
template <class T>
void transpose_tiles(const T* src, int64_t ld_src, int64_t c_src, int64_t R, int64_t C, T* dst, int64_t ld_dst,
                     int64_t c_dst) {
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < R; r0 += kTile)
    for (int64_t c0 = 0; c0 < C; c0 += kTile) {
      const int64_t r1 = std::min(R, r0 + kTile), c1 = std::min(C, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ld_dst + c_dst + r] = src[r * ld_src + c_src + c];
    }
}

void transpose_general(const std::byte* src, int64_t ld_src, int64_t c_src, int64_t R, int64_t C, size_t es,
                       std::byte* dst, int64_t ld_dst, int64_t c_dst) {
  switch (es) {
    case 2: return transpose_tiles(reinterpret_cast<const uint16_t*>(src), ld_src, c_src, R, C,
                                   reinterpret_cast<uint16_t*>(dst), ld_dst, c_dst);
    case 4: return transpose_tiles(reinterpret_cast<const uint32_t*>(src), ld_src, c_src, R, C,
                                   reinterpret_cast<uint32_t*>(dst), ld_dst, c_dst);
    case 8: return transpose_tiles(reinterpret_cast<const uint64_t*>(src), ld_src, c_src, R, C,
                                   reinterpret_cast<uint64_t*>(dst), ld_dst, c_dst);
    default: MOELAB_FAIL("transpose: element size ", es, " is not 2, 4 or 8");
  }
}

// dst [C, R] = src [R, C]^T.
void transpose_into(const std::byte* src, int64_t R, int64_t C, size_t es, std::byte* dst) {
  transpose_general(src, C, 0, R, C, es, dst, R, 0);
}

// dst [R, ld] columns [c0, c0 + C) = src [C, R]^T.
void transpose_into_cols(const std::byte* src, int64_t C, int64_t R, size_t es, std::byte* dst, int64_t ld,
                         int64_t c0) {
  // dst^T view: dst[r][c0 + c] = src[c][r]: src is [C, R] read whole, written as rows of dst.
  transpose_general(src, R, 0, C, R, es, dst, ld, c0);
}

// dst [C, R] = src [R, ld] columns [c0, c0 + C), transposed.
void transpose_from_cols(const std::byte* src, int64_t R, int64_t ld, int64_t c0, int64_t C, size_t es,
                         std::byte* dst) {
  transpose_general(src, ld, c0, R, C, es, dst, R, 0);
}

std::byte* bytes_of(const Tensor& t) { return static_cast<std::byte*>(t.data()); }

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

// The names of one layer's tensors for `arch` and `layout`.
struct LayerNames {
  std::string p;  // "model.layers.3."
  std::string moe;  // "model.layers.3.mlp." or "...block_sparse_moe."
  std::string gate, up, down;  // per-expert projection names (w1/w3/w2 or gate_proj/up_proj/down_proj)
};

LayerNames layer_names(HfArch arch, int64_t i, HfExpertLayout layout) {
  LayerNames n;
  n.p = "model.layers." + std::to_string(i) + ".";
  const bool mixtral = arch == HfArch::Mixtral;
  n.moe = n.p + (mixtral && layout == HfExpertLayout::PerExpert ? "block_sparse_moe." : "mlp.");
  n.gate = mixtral ? "w1" : "gate_proj";
  n.up = mixtral ? "w3" : "up_proj";
  n.down = mixtral ? "w2" : "down_proj";
  return n;
}

// The per-expert tensor names of a layer's E experts: gate, up and down projections.
struct ExpertNames {
  std::vector<std::string> gate, up, down;
};

ExpertNames expert_names(const LayerNames& n, int64_t E) {
  ExpertNames x;
  for (int64_t e = 0; e < E; ++e) {
    const std::string p = n.moe + "experts." + std::to_string(e) + ".";
    x.gate.push_back(p + n.gate + ".weight");
    x.up.push_back(p + n.up + ".weight");
    x.down.push_back(p + n.down + ".weight");
  }
  return x;
}

}  // namespace

// ---- import ------------------------------------------------------------------------------

HfWeights read_hf_weights(const ShardedSafetensorsReader& st, const HfConfig& hf, DType dtype) {
  MOELAB_CHECK(dtype == DType::F32 || dtype == DType::F64 || dtype == DType::BF16,
               "import: weights are read as f32, f64 or bf16");
  const std::string where = st.index_path().empty() ? "the checkpoint" : st.index_path();
  const std::vector<std::string> all = st.names();
  std::set<std::string> left(all.begin(), all.end());
  HfWeights w;
  const size_t es = dtype_size(dtype);

  // The expert layout: exactly one.
  bool fused = false, per_expert = false;
  for (const std::string& n : all) {
    if (n.ends_with(".mlp.experts.gate_up_proj") || n.ends_with(".mlp.experts.down_proj")) fused = true;
    if (n.find(".experts.0.") != std::string::npos) per_expert = true;
  }
  if (fused && per_expert)
    MOELAB_USAGE_FAIL(where, " holds experts in both layouts (per-expert tensors such as '...experts.0...' and fused "
                      "'...experts.gate_up_proj'): ambiguous, refusing to guess which to use");
  w.layout = fused ? HfExpertLayout::Fused : HfExpertLayout::PerExpert;

  // Reads tensor `name`, which must have shape `shape`, as `dtype`.
  // Reads tensor `name`, which must have shape `shape`, as `dtype`. view: the caller only reads
  // it (to transpose it into a tensor of its own), so when the stored dtype is already `dtype`
  // and aligned, the tensor is a view of the mapped bytes (no copy: the import then holds the
  // model once, plus one tensor's pages); release() drops the pages of what was read.
  std::vector<std::string> to_release;
  auto release = [&] {
    for (const std::string& n : to_release) st.shard(n).release(n);
    to_release.clear();
  };
  auto take = [&](const std::string& name, const std::vector<int64_t>& shape, bool view = true) {
    if (!st.has(name)) MOELAB_USAGE_FAIL(where, " has no tensor '", name, "', which ", hf.architecture, " needs");
    const SafetensorsTensorInfo& info = st.info(name);
    if (info.shape != shape)
      MOELAB_USAGE_FAIL(where, ": tensor '", name, "' has shape ", shape_str(info.shape), ", but config.json implies ",
                        shape_str(shape));
    Tensor t;
    const auto bytes = st.bytes(name);
    if (view && info.dtype == st_dtype_of(dtype) && reinterpret_cast<uintptr_t>(bytes.data()) % es == 0 &&
        !shape.empty()) {
      t = Tensor(std::shared_ptr<void>(), const_cast<std::byte*>(bytes.data()), Shape(shape), dtype, Device::CPU);
    } else {
      t = st.to_tensor(name, dtype);
    }
    w.bytes_read += double(info.nbytes());
    to_release.push_back(name);
    if (!view) release();
    left.erase(name);
    return std::make_pair(t, std::string(to_string(info.dtype)));
  };
  auto add = [&](const std::string& name, Tensor t, const std::string& src_dtype) {
    w.params.emplace_back(name, t);
    w.source_dtypes[name] = src_dtype;
  };
  // moelab [in, out] from Hugging Face's Linear weight [out, in].
  auto linear = [&](const std::string& moe_name, const std::string& hf_name, int64_t in, int64_t out) {
    auto [src, dt] = take(hf_name, {out, in});
    Tensor t = host_empty(Shape{in, out}, dtype);
    transpose_into(bytes_of(src), out, in, es, bytes_of(t));
    release();
    add(moe_name, t, dt);
  };
  auto vec = [&](const std::string& moe_name, const std::string& hf_name, std::vector<int64_t> shape) {
    auto [src, dt] = take(hf_name, shape, /*view=*/false);
    add(moe_name, src, dt);
  };
  // SwiGLU MLP(s) [E, D, 2F] / [E, F, D] from gate/up [F, D] and down [D, F] per expert.
  auto mlp = [&](const std::string& moe_prefix, const std::vector<std::string>& gate,
                 const std::vector<std::string>& up, const std::vector<std::string>& down, int64_t D, int64_t F) {
    const int64_t E = int64_t(gate.size());
    Tensor w1 = host_empty(Shape{E, D, 2 * F}, dtype), w2 = host_empty(Shape{E, F, D}, dtype);
    std::string dt;
    for (int64_t e = 0; e < E; ++e) {
      auto [g, dg] = take(gate[size_t(e)], {F, D});
      auto [u, du] = take(up[size_t(e)], {F, D});
      auto [d, dd] = take(down[size_t(e)], {D, F});
      std::byte* w1e = bytes_of(w1) + size_t(e * D * 2 * F) * es;
      transpose_into_cols(bytes_of(g), F, D, es, w1e, 2 * F, 0);
      transpose_into_cols(bytes_of(u), F, D, es, w1e, 2 * F, F);
      transpose_into(bytes_of(d), D, F, es, bytes_of(w2) + size_t(e * F * D) * es);
      release();
      if (e == 0) dt = dg;
      if (dg != dt || du != dt || dd != dt)
        MOELAB_USAGE_FAIL(where, ": the tensors of ", moe_prefix, " mix dtypes (", dt, ", ", dg, ", ", du, ", ", dd, ")");
    }
    add(moe_prefix + "w1", w1, dt);
    add(moe_prefix + "w2", w2, dt);
  };

  const int64_t V = hf.vocab_size, D = hf.hidden_size, H = hf.num_attention_heads, Hkv = hf.num_key_value_heads;
  const int64_t dh = hf.head_dim, E = hf.num_experts, F = hf.moe_intermediate_size;
  // The untied head first, while little is held: transposing it keeps its source pages mapped
  // (one of the largest tensors) until it is done; it goes to the end of params below.
  std::pair<std::string, Tensor> head;
  if (!hf.tie_word_embeddings) {
    linear("head", "lm_head.weight", D, V);
    head = w.params.back();
    w.params.pop_back();
  }
  vec("embed", "model.embed_tokens.weight", {V, D});
  for (int64_t i = 0; i < hf.num_hidden_layers; ++i) {
    const LayerNames n = layer_names(hf.arch, i, w.layout);
    const std::string b = "block" + std::to_string(i) + ".";
    vec(b + "attn_norm", n.p + "input_layernorm.weight", {D});
    linear(b + "wq", n.p + "self_attn.q_proj.weight", D, H * dh);
    linear(b + "wk", n.p + "self_attn.k_proj.weight", D, Hkv * dh);
    linear(b + "wv", n.p + "self_attn.v_proj.weight", D, Hkv * dh);
    linear(b + "wo", n.p + "self_attn.o_proj.weight", H * dh, D);
    if (hf.qkv_bias) {
      vec(b + "q_bias", n.p + "self_attn.q_proj.bias", {H * dh});
      vec(b + "k_bias", n.p + "self_attn.k_proj.bias", {Hkv * dh});
      vec(b + "v_bias", n.p + "self_attn.v_proj.bias", {Hkv * dh});
    }
    if (hf.qk_norm != HfQkNorm::None) {
      const bool head = hf.qk_norm == HfQkNorm::PerHead;
      vec(b + "q_norm", n.p + "self_attn.q_norm.weight", {head ? dh : H * dh});
      vec(b + "k_norm", n.p + "self_attn.k_norm.weight", {head ? dh : Hkv * dh});
    }
    vec(b + "ffn_norm", n.p + "post_attention_layernorm.weight", {D});
    if (hf.is_moe_layer(i)) {
      linear(b + "moe.router.w", n.moe + "gate.weight", D, E);
      if (w.layout == HfExpertLayout::Fused) {
        auto [gu, dt1] = take(n.moe + "experts.gate_up_proj", {E, 2 * F, D});
        auto [dn, dt2] = take(n.moe + "experts.down_proj", {E, D, F});
        Tensor w1 = host_empty(Shape{E, D, 2 * F}, dtype), w2 = host_empty(Shape{E, F, D}, dtype);
        for (int64_t e = 0; e < E; ++e) {
          transpose_into(bytes_of(gu) + size_t(e * 2 * F * D) * es, 2 * F, D, es, bytes_of(w1) + size_t(e * D * 2 * F) * es);
          transpose_into(bytes_of(dn) + size_t(e * D * F) * es, D, F, es, bytes_of(w2) + size_t(e * F * D) * es);
        }
        release();
        add(b + "moe.experts.w1", w1, dt1);
        add(b + "moe.experts.w2", w2, dt2);
      } else {
        const ExpertNames x = expert_names(n, E);
        mlp(b + "moe.experts.", x.gate, x.up, x.down, D, F);
      }
      if (hf.shared_expert_intermediate_size > 0) {
        const std::string s = n.moe + "shared_expert.";
        mlp(b + "moe.shared.", {s + "gate_proj.weight"}, {s + "up_proj.weight"}, {s + "down_proj.weight"}, D,
            hf.shared_expert_intermediate_size);
        if (hf.shared_expert_gate) linear(b + "moe.shared.gate", n.moe + "shared_expert_gate.weight", D, 1);
      }
    } else {
      const std::string s = n.p + "mlp.";
      mlp(b + "ffn.", {s + "gate_proj.weight"}, {s + "up_proj.weight"}, {s + "down_proj.weight"}, D,
          hf.intermediate_size);
    }
  }
  vec("final_norm", "model.norm.weight", {D});
  if (!hf.tie_word_embeddings) {
    w.params.push_back(head);
  } else if (st.has("lm_head.weight")) {
    // A tied head may be stored anyway; it must then be the embedding, bit for bit.
    const auto a = st.bytes("lm_head.weight"), e = st.bytes("model.embed_tokens.weight");
    if (st.info("lm_head.weight").shape != st.info("model.embed_tokens.weight").shape ||
        st.info("lm_head.weight").dtype != st.info("model.embed_tokens.weight").dtype ||
        std::memcmp(a.data(), e.data(), a.size()) != 0)
      MOELAB_USAGE_FAIL(where, ": config.json says tie_word_embeddings = true, but lm_head.weight differs from "
                        "model.embed_tokens.weight");
    left.erase("lm_head.weight");
  }
  if (!left.empty()) {
    std::string names;
    size_t k = 0;
    for (const std::string& n : left) {
      if (k++ == 5) { names += ", ..."; break; }
      names += (names.empty() ? "'" : ", '") + n + "'";
    }
    MOELAB_USAGE_FAIL(where, " holds ", left.size(), " tensor(s) that ", hf.architecture,
                      " with this config.json does not have (", names, "): refusing to drop weights silently");
  }
  return w;
}

// ---- export ------------------------------------------------------------------------------

namespace {

// The CPU tensor `t` (f32 or f64) converted to the safetensors dtype `dt`, as bytes.
std::vector<std::byte> convert_for_export(const Tensor& t, StDType dt, const std::string& name) {
  const int64_t n = t.numel();
  std::vector<std::byte> out;
  auto get = [&](int64_t i) -> double {
    if (t.dtype() == DType::F64) return t.ptr<double>()[i];
    if (t.dtype() == DType::F32) return double(t.ptr<float>()[i]);
    return double(t.ptr<bf16>()[i].to_float());
  };
  switch (dt) {
    case StDType::F64:
      out.resize(size_t(n) * 8);
      for (int64_t i = 0; i < n; ++i) { const double v = get(i); std::memcpy(&out[size_t(i) * 8], &v, 8); }
      break;
    case StDType::F32:
      out.resize(size_t(n) * 4);
      for (int64_t i = 0; i < n; ++i) { const float v = float(get(i)); std::memcpy(&out[size_t(i) * 4], &v, 4); }
      break;
    case StDType::BF16:
      out.resize(size_t(n) * 2);
      for (int64_t i = 0; i < n; ++i) {
        const bf16 v = bf16::from_float(float(get(i)));  // f64 sources round twice (documented)
        std::memcpy(&out[size_t(i) * 2], &v, 2);
      }
      break;
    default:
      MOELAB_USAGE_FAIL("export-hf: tensor '", name, "' would be written as ", to_string(dt),
                        "; moelab writes F64, F32 and BF16");
  }
  return out;
}

void write_text_atomically(const std::string& path, const std::string& text, bool overwrite) {
  if (!overwrite && fs::exists(path)) MOELAB_USAGE_FAIL("export-hf: ", path, " exists (pass --overwrite to replace it)");
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) MOELAB_FAIL("cannot create ", tmp, ": ", errno_text(errno));
  try {
    write_all(fd, text.data(), text.size(), tmp);
    if (::fsync(fd) != 0) MOELAB_FAIL("cannot fsync ", tmp, ": ", errno_text(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    MOELAB_FAIL("cannot rename ", tmp, " to ", path, ": ", errno_text(e));
  }
}

}  // namespace

std::vector<std::string> write_hf_checkpoint(const std::string& dir, const HfConfig& hf,
                                             const std::map<std::string, Tensor>& params, HfExpertLayout layout,
                                             const std::map<std::string, std::string>& dtypes,
                                             const std::string& default_dtype, uint64_t max_shard_bytes,
                                             bool overwrite) {
  ShardedSafetensorsWriter out(max_shard_bytes);
  out.set_metadata("format", "pt");
  auto param = [&](const std::string& name) -> const Tensor& {
    auto it = params.find(name);
    if (it == params.end()) MOELAB_USAGE_FAIL("export-hf: the checkpoint has no tensor '", name, "', which ", hf.architecture, " needs");
    return it->second;
  };
  auto dtype_for = [&](const std::string& name) {
    auto it = dtypes.find(name);
    StDType dt;
    const std::string s = it != dtypes.end() ? it->second : default_dtype;
    if (!st_dtype_from_name(s, dt)) MOELAB_USAGE_FAIL("export-hf: unknown dtype '", s, "' for '", name, "'");
    return dt;
  };
  std::set<std::string> used;
  auto put = [&](const std::string& hf_name, const std::string& moe_name, const std::vector<int64_t>& shape,
                 const Tensor& host) {
    const StDType dt = dtype_for(moe_name);
    std::vector<std::byte> b = convert_for_export(host, dt, hf_name);
    out.add(hf_name, dt, shape, b.data(), b.size());
  };
  // [out, in] Linear weight from moelab's [in, out].
  auto linear = [&](const std::string& hf_name, const std::string& moe_name) {
    const Tensor& t = param(moe_name);
    used.insert(moe_name);
    const int64_t in = t.dim(0), o = t.numel() / in;
    Tensor tt = host_empty(Shape{o, in}, t.dtype());
    transpose_into(bytes_of(t), in, o, dtype_size(t.dtype()), bytes_of(tt));
    put(hf_name, moe_name, {o, in}, tt);
  };
  auto vec = [&](const std::string& hf_name, const std::string& moe_name) {  // as stored
    const Tensor& t = param(moe_name);
    used.insert(moe_name);
    put(hf_name, moe_name, std::vector<int64_t>(t.shape().dims.begin(), t.shape().dims.begin() + t.ndim()), t);
  };
  // Zero biases where the class always has them and the moelab model has none (exact: + 0).
  auto zeros = [&](const std::string& hf_name, int64_t n) {
    Tensor z = host_empty(Shape{n}, DType::F32);
    std::memset(z.data(), 0, size_t(n) * 4);
    const StDType dt = dtype_for("");
    std::vector<std::byte> b = convert_for_export(z, dt, hf_name);
    out.add(hf_name, dt, {n}, b.data(), b.size());
  };
  // Expert MLPs: per expert gate/up [F, D], down [D, F]; fused gate_up [E, 2F, D], down [E, D, F].
  auto mlp = [&](const std::string& moe_prefix, const std::vector<std::string>& gate, const std::vector<std::string>& up,
                 const std::vector<std::string>& down, const std::string& fused_prefix) {
    const Tensor& w1 = param(moe_prefix + "w1");
    const Tensor& w2 = param(moe_prefix + "w2");
    used.insert(moe_prefix + "w1");
    used.insert(moe_prefix + "w2");
    const int64_t E = w1.dim(0), D = w1.dim(1), F = w2.dim(1);
    const size_t es = dtype_size(w1.dtype());
    if (!fused_prefix.empty()) {
      Tensor gu = host_empty(Shape{E, 2 * F, D}, w1.dtype()), dn = host_empty(Shape{E, D, F}, w2.dtype());
      for (int64_t e = 0; e < E; ++e) {
        transpose_into(bytes_of(w1) + size_t(e * D * 2 * F) * es, D, 2 * F, es, bytes_of(gu) + size_t(e * 2 * F * D) * es);
        transpose_into(bytes_of(w2) + size_t(e * F * D) * es, F, D, es, bytes_of(dn) + size_t(e * D * F) * es);
      }
      put(fused_prefix + "gate_up_proj", moe_prefix + "w1", {E, 2 * F, D}, gu);
      put(fused_prefix + "down_proj", moe_prefix + "w2", {E, D, F}, dn);
      return;
    }
    for (int64_t e = 0; e < E; ++e) {
      const std::byte* w1e = bytes_of(w1) + size_t(e * D * 2 * F) * es;
      Tensor g = host_empty(Shape{F, D}, w1.dtype()), u = host_empty(Shape{F, D}, w1.dtype()),
             d = host_empty(Shape{D, F}, w2.dtype());
      transpose_from_cols(w1e, D, 2 * F, 0, F, es, bytes_of(g));
      transpose_from_cols(w1e, D, 2 * F, F, F, es, bytes_of(u));
      transpose_into(bytes_of(w2) + size_t(e * F * D) * es, F, D, es, bytes_of(d));
      put(gate[size_t(e)], moe_prefix + "w1", {F, D}, g);
      put(up[size_t(e)], moe_prefix + "w1", {F, D}, u);
      put(down[size_t(e)], moe_prefix + "w2", {D, F}, d);
    }
  };

  vec("model.embed_tokens.weight", "embed");
  for (int64_t i = 0; i < hf.num_hidden_layers; ++i) {
    const LayerNames n = layer_names(hf.arch, i, layout);
    const std::string b = "block" + std::to_string(i) + ".";
    vec(n.p + "input_layernorm.weight", b + "attn_norm");
    linear(n.p + "self_attn.q_proj.weight", b + "wq");
    linear(n.p + "self_attn.k_proj.weight", b + "wk");
    linear(n.p + "self_attn.v_proj.weight", b + "wv");
    linear(n.p + "self_attn.o_proj.weight", b + "wo");
    if (params.count(b + "q_bias")) {
      vec(n.p + "self_attn.q_proj.bias", b + "q_bias");
      vec(n.p + "self_attn.k_proj.bias", b + "k_bias");
      vec(n.p + "self_attn.v_proj.bias", b + "v_bias");
    } else if (hf.qkv_bias) {
      const int64_t qn = param(b + "wq").dim(1), kn = param(b + "wk").dim(1);
      zeros(n.p + "self_attn.q_proj.bias", qn);
      zeros(n.p + "self_attn.k_proj.bias", kn);
      zeros(n.p + "self_attn.v_proj.bias", kn);
    }
    if (hf.qk_norm != HfQkNorm::None) {
      vec(n.p + "self_attn.q_norm.weight", b + "q_norm");
      vec(n.p + "self_attn.k_norm.weight", b + "k_norm");
    }
    vec(n.p + "post_attention_layernorm.weight", b + "ffn_norm");
    if (hf.is_moe_layer(i)) {
      linear(n.moe + "gate.weight", b + "moe.router.w");
      const ExpertNames x = expert_names(n, param(b + "moe.experts.w1").dim(0));
      mlp(b + "moe.experts.", x.gate, x.up, x.down, layout == HfExpertLayout::Fused ? n.moe + "experts." : "");
      if (hf.shared_expert_intermediate_size > 0) {
        const std::string s = n.moe + "shared_expert.";
        mlp(b + "moe.shared.", {s + "gate_proj.weight"}, {s + "up_proj.weight"}, {s + "down_proj.weight"}, "");
        if (hf.shared_expert_gate) linear(n.moe + "shared_expert_gate.weight", b + "moe.shared.gate");
      }
    } else {
      const std::string s = n.p + "mlp.";
      mlp(b + "ffn.", {s + "gate_proj.weight"}, {s + "up_proj.weight"}, {s + "down_proj.weight"}, "");
    }
  }
  vec("model.norm.weight", "final_norm");
  if (!hf.tie_word_embeddings) linear("lm_head.weight", "head");
  for (const auto& [name, t] : params)
    if (!used.count(name))
      MOELAB_USAGE_FAIL("export-hf: the checkpoint's tensor '", name, "' has no place in ", hf.architecture,
                        ": refusing to drop it silently");

  fs::create_directories(dir);
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  if (!overwrite && fs::exists(cfg_path)) MOELAB_USAGE_FAIL("export-hf: ", cfg_path, " exists (pass --overwrite to replace it)");
  std::vector<std::string> files = out.write(dir, overwrite);
  write_text_atomically(cfg_path, hf_config_json(hf), overwrite);
  files.push_back(cfg_path);
  return files;
}

}  // namespace moelab
