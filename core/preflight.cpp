// moelab: size, overflow and memory checks before a run starts (see preflight.h).
#include "core/preflight.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <thread>
#include <vector>

#include "core/check.h"
#include "core/io/data.h"
#include "core/moe/router.h"

namespace moelab {

int64_t checked_mul(int64_t a, int64_t b, const std::string& what) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r))
    MOELAB_USAGE_FAIL("config: ", what, " = ", a, " * ", b,
                      " overflows 64-bit integers; lower the values");
  return r;
}

int64_t checked_add(int64_t a, int64_t b, const std::string& what) {
  int64_t r = 0;
  if (__builtin_add_overflow(a, b, &r))
    MOELAB_USAGE_FAIL("config: ", what, " = ", a, " + ", b,
                      " overflows 64-bit integers; lower the values");
  return r;
}

namespace {

// A size and the config keys it was computed from, so that an overflow or an oversized term
// names the keys to lower.
struct Q {
  int64_t v = 0;
  std::vector<std::string> keys;
};

class Sizer {
 public:
  explicit Sizer(const RunConfig& cfg) : cfg_(cfg) {}

  Q key(const std::string& k, int64_t v) const { return {v, {k}}; }
  static Q lit(int64_t v) { return {v, {}}; }

  // The product / sum of the operands; `what` names the quantity in the overflow message.
  template <class... Qs>
  Q mul(const std::string& what, const Q& a, const Qs&... rest) const {
    Q r = a;
    ((r = combine(r, rest, what, true)), ...);
    return r;
  }
  template <class... Qs>
  Q add(const std::string& what, const Q& a, const Qs&... rest) const {
    Q r = a;
    ((r = combine(r, rest, what, false)), ...);
    return r;
  }

  // "model.layers = 1000000, model.d_model = 64"
  std::string describe(const std::vector<std::string>& keys) const {
    std::string s;
    for (const std::string& k : keys) s += (s.empty() ? "" : ", ") + k + " = " + get_value(cfg_, k);
    return s;
  }

 private:
  Q combine(const Q& a, const Q& b, const std::string& what, bool multiply) const {
    Q r;
    r.keys = a.keys;
    for (const std::string& k : b.keys)
      if (std::find(r.keys.begin(), r.keys.end(), k) == r.keys.end()) r.keys.push_back(k);
    const bool overflow = multiply ? __builtin_mul_overflow(a.v, b.v, &r.v)
                                   : __builtin_add_overflow(a.v, b.v, &r.v);
    if (overflow)
      MOELAB_USAGE_FAIL("config: ", what, " overflows 64-bit integers (", describe(r.keys),
                        "); lower ", r.keys.size() == 1 ? "it" : "them");
    return r;
  }
  const RunConfig& cfg_;
};

std::string format_bytes(int64_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = double(b);
  int u = 0;
  while (v >= 1024 && u < 6) v /= 1024, ++u;
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.1f %s" : "%.0f %s", v, units[u]);
  return buf;
}

}  // namespace

MemoryEstimate estimate_memory(const RunConfig& cfg) {
  const Sizer z(cfg);
  const ModelConfig& m = cfg.model;
  const MoEConfig& moe = cfg.moe;
  const int64_t heads = m.heads, kv = m.kv_heads > 0 ? m.kv_heads : m.heads;
  const bool bf16 = m.dtype == DType::BF16, f64 = m.dtype == DType::F64;
  const Q e = Sizer::lit(f64 ? 8 : bf16 ? 2 : 4), s = Sizer::lit(f64 ? 8 : 4), r = s;

  const Q V = z.key("model.vocab", m.vocab), D = z.key("model.d_model", moe.d_model);
  const Q L = z.key("model.layers", m.layers);
  const Q H = z.key("model.heads", heads), Hkv = z.key("model.kv_heads", kv);
  const Q dh = m.head_dim > 0 ? z.key("model.head_dim", m.head_dim)
                              : Q{heads > 0 ? moe.d_model / heads : moe.d_model, {"model.d_model", "model.heads"}};
  const Q E = z.key("model.experts", moe.experts), K = z.key("model.top_k", moe.top_k);
  const Q F = z.key("model.d_expert", moe.d_expert);
  const Q Fs = moe.shared_width > 0 ? z.key("model.shared_width", moe.shared_width)
                                    : z.mul("model.shared_experts * model.d_expert",
                                            z.key("model.shared_experts", moe.shared_experts), F);
  const Q Fd = m.d_ff > 0 ? z.key("model.d_ff", m.d_ff) : z.mul("model.top_k * model.d_expert", K, F);
  const Q B = z.key("train.batch", cfg.train.batch), S = z.key("train.seq", cfg.train.seq);
  // MoE blocks are i % moe_every == moe_every - 1, less model.dense_layers (core/model.h).
  const int64_t n_moe = m.moe_every > 0 && m.layers < (int64_t(1) << 24) ? m.moe_block_count()
                        : m.moe_every > 0 ? m.layers / m.moe_every : 0;
  const Q Lm{n_moe, {"model.layers", "model.moe_every"}};
  const Q Ld{m.layers - n_moe, {"model.layers", "model.moe_every"}};

  // Every size the run allocates from the token count, first, so that a batch x seq overflow
  // names only those two keys.
  const Q T = z.mul("train.batch * train.seq (tokens per step)", B, S);
  (void)z.mul("train.batch * (train.seq + 1) (tokens per data batch)", B,
              z.add("train.seq + 1", S, Sizer::lit(1)));

  // ---- parameters ----
  const std::string pc = "the parameter count";
  const Q two = Sizer::lit(2), three = Sizer::lit(3);
  const Q embed = z.add(pc, z.mul(pc, V, D, Sizer::lit(m.tie_embeddings ? 1 : 2)), D);
  Q attn_block = z.add(pc, z.mul(pc, two, D), z.mul(pc, D, H, dh), z.mul(pc, two, D, Hkv, dh),
                       z.mul(pc, H, dh, D));
  if (m.qkv_bias) attn_block = z.add(pc, attn_block, z.mul(pc, H, dh), z.mul(pc, two, Hkv, dh));
  if (m.qk_norm != QkNorm::None)
    attn_block = z.add(pc, attn_block, m.qk_norm == QkNorm::Head ? z.mul(pc, two, dh) : z.mul(pc, z.add(pc, H, Hkv), dh));
  const Q attn = z.mul(pc, L, attn_block);
  const bool learned = moe.router.noise == NoiseType::Learned;
  Q moe_block = z.add(pc, z.mul(pc, D, E, Sizer::lit(learned ? 2 : 1)), z.mul(pc, three, E, D, F));
  if (moe.shared_experts > 0) {  // only then, so that the message names no key that is off
    moe_block = z.add(pc, moe_block, z.mul(pc, three, D, Fs));
    if (moe.shared_gate) moe_block = z.add(pc, moe_block, D);
  }
  const Q experts = z.mul(pc, Lm, moe_block);
  const Q dense = z.mul(pc, Ld, three, D, Fd);
  const Q P = z.add(pc, embed, attn, experts, dense);

  // Per parameter: value and gradient (dtype), AdamW m and v (state), bf16's fp32 master.
  const Q per_param = Sizer::lit(2 * e.v + 2 * s.v + (bf16 ? 4 : 0));
  const std::string wb = "the weight and optimizer memory";
  struct Term {
    std::string what;
    Q bytes;
  };
  const std::vector<Term> weight_terms = {
      {"token embedding and output head", z.mul(wb, embed, per_param)},
      {"attention weights", z.mul(wb, attn, per_param)},
      {"expert weights", z.mul(wb, experts, per_param)},
      {"dense FFN weights", z.mul(wb, dense, per_param)},
  };
  const Q weights = z.mul(wb, P, per_param);

  // ---- activations ----
  const std::string ab = "the activation memory";
  // train.recompute drops attention's q, k, v, output and lse (attention) and the FFN / expert
  // hidden activations X W1 and SwiGLU's output (mlp) until backward needs them again.
  const Recompute rc = cfg.train.recompute;
  const bool re_attn = rc == Recompute::Attention || rc == Recompute::All;
  const bool re_mlp = rc == Recompute::Mlp || rc == Recompute::All;
  const Q attn_full = z.add(ab, z.mul(ab, T, z.add(ab, z.mul(ab, Sizer::lit(6), D), z.mul(ab, two, Hkv, dh), two), e),
                            z.mul(ab, B, H, S, s));  // attention's saved lse: f32 (f64)
  const Q attn_act = re_attn ? z.mul(ab, T, z.add(ab, z.mul(ab, Sizer::lit(4), D), two), e) : attn_full;
  const int64_t C = Router::capacity_for(moe, T.v);  // clamped to [1, T] (0 = dropless)
  const bool ec = moe.router.policy == RoutingPolicy::ExpertChoice;
  const Q EC = z.mul(ab, E, z.key("router.capacity_factor", C));
  const Q A = ec ? EC : z.mul(ab, T, K);
  const Q R = ec || (moe.router.pad_to_capacity && C > 0) ? EC : A;
  // Routing tensors, then the expert rows: permuted input and output (2D), X W1 and SwiGLU (3F).
  auto moe_act_with = [&](bool drop_hidden) {
    return z.add(ab, z.mul(ab, Sizer::lit(4), T, E, r), z.mul(ab, three, A, r),
                 z.mul(ab, R, drop_hidden ? z.mul(ab, two, D) : z.add(ab, z.mul(ab, two, D), z.mul(ab, three, F)), e),
                 z.mul(ab, T, moe.shared_experts > 0 ? (drop_hidden ? D : z.add(ab, z.mul(ab, three, Fs), D))
                                                     : Sizer::lit(0), e));
  };
  const Q moe_act = moe_act_with(re_mlp), moe_full = moe_act_with(false);
  const Q dense_full = z.mul(ab, T, z.add(ab, z.mul(ab, three, Fd), D), e);
  const Q dense_act = re_mlp ? z.mul(ab, T, D, e) : dense_full;
  const Q moe_blocks = z.mul(ab, Lm, z.add(ab, attn_act, moe_act));
  const Q dense_blocks = z.mul(ab, Ld, z.add(ab, attn_act, dense_act));
  // Backward's temporaries: about one block's activations at a time, recomputed ones included.
  const Q one_block = z.add(ab, attn_full, n_moe > 0 ? moe_full : dense_full);
  const Q head_act = z.mul(ab, T, z.add(ab, z.mul(ab, three, V), z.mul(ab, two, D)), e);
  const std::vector<Term> activation_terms = {
      {"attention and MoE activations", moe_blocks},
      {"attention and dense FFN activations", dense_blocks},
      {"logits", head_act},
  };
  const Q acts = z.add(ab, moe_blocks, dense_blocks, one_block, head_act);

  MemoryEstimate est;
  est.params = P.v;
  est.weight_bytes = weights.v;
  est.activation_bytes = acts.v;
  const bool device = cfg.train.backend == "cuda";
  est.total_bytes = device ? weights.v : z.add("the memory estimate", weights, acts).v;
  // Name the largest term of what is compared (on cuda, the weights only).
  const Term* big = &weight_terms[0];
  for (const Term& t : weight_terms)
    if (t.bytes.v > big->bytes.v) big = &t;
  if (!device)
    for (const Term& t : activation_terms)
      if (t.bytes.v > big->bytes.v) big = &t;
  est.largest = big->what + " " + format_bytes(big->bytes.v) + " (" + z.describe(big->bytes.keys) + ")";
  return est;
}

int64_t memory_limit_bytes() {
  if (const char* env = std::getenv("MOELAB_MEMORY_LIMIT_BYTES")) {
    const std::string t = env;
    int64_t v = 0;
    auto res = std::from_chars(t.data(), t.data() + t.size(), v);
    if (t.empty() || res.ec != std::errc() || res.ptr != t.data() + t.size() || v <= 0)
      MOELAB_USAGE_FAIL("MOELAB_MEMORY_LIMIT_BYTES = '", t, "' is not a positive integer (bytes)");
    return v;
  }
  int64_t limit = std::numeric_limits<int64_t>::max();
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0 && int64_t(pages) <= limit / int64_t(page)) limit = int64_t(pages) * page;
  // A container's cgroup v2 limit ("max" when none): above it the OOM killer ends the process.
  std::ifstream cg("/sys/fs/cgroup/memory.max");
  std::string text;
  if (cg >> text) {
    int64_t v = 0;
    auto res = std::from_chars(text.data(), text.data() + text.size(), v);
    if (res.ec == std::errc() && res.ptr == text.data() + text.size() && v > 0) limit = std::min(limit, v);
  }
  return limit;
}

JobPlan plan_jobs(int64_t runs, int64_t threads_per_run, int64_t cores, int64_t bytes_per_run,
                  int64_t memory_limit, int64_t requested) {
  runs = std::max<int64_t>(1, runs);
  threads_per_run = std::max<int64_t>(1, threads_per_run);
  cores = std::max<int64_t>(1, cores);
  bytes_per_run = std::max<int64_t>(1, bytes_per_run);
  JobPlan plan;
  const std::string each = "one thread per " + std::string(threads_per_run > 1 ? "simulated rank, " : "run, ") +
                           std::to_string(threads_per_run) + " per run; about " +
                           format_bytes(bytes_per_run) + " per run";
  if (requested > 0) {
    plan.jobs = std::min(requested, runs);
    if (plan.jobs > memory_limit / bytes_per_run)
      MOELAB_USAGE_FAIL("train: --jobs ", requested, ": ", plan.jobs, " runs at once need about ",
                        format_bytes(plan.jobs > 0 && bytes_per_run <= std::numeric_limits<int64_t>::max() / plan.jobs
                                         ? plan.jobs * bytes_per_run
                                         : std::numeric_limits<int64_t>::max()),
                        " of memory, more than the ", format_bytes(memory_limit),
                        " available; lower --jobs or leave it out (moelab then chooses)");
    plan.why = "--jobs " + std::to_string(requested) + " (" + std::to_string(cores) + " cores; " + each + ")";
    return plan;
  }
  const int64_t by_cores = std::max<int64_t>(1, cores / threads_per_run);
  const int64_t by_memory = std::max<int64_t>(1, memory_limit / 2 / bytes_per_run);
  plan.jobs = std::min({runs, by_cores, by_memory});
  plan.why = std::to_string(cores) + " cores / " + std::to_string(threads_per_run) + " thread" +
             (threads_per_run > 1 ? "s" : "") + " per run = " + std::to_string(by_cores) + "; half of " +
             format_bytes(memory_limit) + " memory / " + format_bytes(bytes_per_run) + " per run = " +
             std::to_string(by_memory) + "; " + std::to_string(runs) + " runs";
  return plan;
}

int64_t cpu_cores() {
  int64_t n = 0;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
  if (n <= 0) n = std::max<int64_t>(1, int64_t(std::thread::hardware_concurrency()));
  // cgroup v2 "QUOTA PERIOD" (or "max PERIOD" when unlimited).
  std::ifstream cg("/sys/fs/cgroup/cpu.max");
  std::string quota, period;
  if (cg >> quota >> period && quota != "max") {
    const double q = std::atof(quota.c_str()), p = std::atof(period.c_str());
    if (q > 0 && p > 0) n = std::min<int64_t>(n, std::max<int64_t>(1, int64_t(q / p)));
  }
  return n;
}

void preflight_check(const RunConfig& cfg) {
  const MemoryEstimate est = estimate_memory(cfg);
  const int64_t limit = memory_limit_bytes();
  if (est.total_bytes > limit)
    MOELAB_USAGE_FAIL("config: this run needs at least ", format_bytes(est.total_bytes), " of ",
                      cfg.train.backend == "cuda" ? "host " : "", "memory (", est.params,
                      " parameters: ", format_bytes(est.weight_bytes),
                      " with gradients and optimizer state; activations ",
                      format_bytes(est.activation_bytes), "), more than the ", format_bytes(limit),
                      " available (", std::getenv("MOELAB_MEMORY_LIMIT_BYTES")
                                          ? "MOELAB_MEMORY_LIMIT_BYTES"
                                          : "physical memory; MOELAB_MEMORY_LIMIT_BYTES overrides",
                      "). The largest part is the ", est.largest, "; lower those keys");
}

void check_eval_data(const RunConfig& cfg, const DataSource& data) {
  if (cfg.log.eval_every <= 0 || data.val_batches() > 0) return;
  const double f = cfg.data.val_fraction;
  std::string why;
  if (const auto* brown = dynamic_cast<const BrownSource*>(&data)) {
    const size_t files = brown->train_files().size() + brown->val_files().size();
    if (f <= 0)
      why = "data.val_fraction = 0 holds no file of the corpus out";
    else
      why = "the Brown corpus in data.path = '" + cfg.data.path + "' has " + std::to_string(files) +
            " files, and with data.val_fraction = " + get_value(cfg, "data.val_fraction") +
            " none of them is validation (it needs at least " +
            std::to_string(int64_t(std::ceil(1.0 / f - 1e-9))) + " files)";
  } else {
    why = "the " + data.name() + " data source has no validation batches";
  }
  MOELAB_USAGE_FAIL("config: log.eval_every = ", cfg.log.eval_every,
                    " evaluates on validation data, but ", why,
                    ". Set log.eval_every = 0 to train without evaluation, or give validation data "
                    "(raise data.val_fraction, or point data.path at a fuller corpus)");
}

}  // namespace moelab
