// moelab: the training loop. See trainer.h for the determinism contract.
#include "core/trainer.h"

#include "core/param_store.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <numeric>
#include <optional>
#include <set>

#include "core/comm_sim.h"
#include "core/io/checkpoint.h"
#include "core/io/data.h"
#include "core/io/run_log.h"
#include "core/io/sft_data.h"
#include "core/io/output_file.h"
#include "core/param_store.h"
#include "core/rng.h"
#include "core/run_identity.h"

namespace moelab {
namespace {

enum : uint64_t { kInitStream = 1, kStepStream = 1000000, kEvalStream = 2000000 };

using Clock = std::chrono::steady_clock;

std::string format_duration(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.0fs", s);
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%dm%02ds", int(s / 60), int(s) % 60);
  else std::snprintf(buf, sizeof buf, "%dh%02dm", int(s / 3600), int(s / 60) % 60);
  return buf;
}

// Expert x category counts of the kept assignments of one router call; categories of the
// input tokens (batch.category[:, :S]).
void count_categories(Backend& b, const RouterState& rs, const Batch& batch, int64_t E, int64_t C,
                      std::vector<int64_t>& counts) {
  const auto idx = b.to_vector<int32_t>(rs.idx), keep = b.to_vector<int32_t>(rs.keep);
  const int64_t n1 = rs.idx.dim(1), S = batch.seq;
  for (size_t a = 0; a < idx.size(); ++a) {
    if (!keep[a]) continue;
    const int64_t e = rs.expert_choice ? int64_t(a) / n1 : idx[a];
    const int64_t t = rs.expert_choice ? idx[a] : int64_t(a) / n1;
    const int64_t cat = batch.category[(t / S) * (S + 1) + t % S];
    if (cat >= 0 && cat < C && e >= 0 && e < E) ++counts[e * C + cat];
  }
}

struct OptimizerState {
  std::vector<Tensor> m, v;  // fp32 (f64 for f64 params), one pair per parameter
};

bool decays(const ParamRef& p) { return p.value.ndim() >= 2; }  // no decay on norm weights

}  // namespace

// Inputs tokens[:, :S] and targets tokens[:, 1:] of a [B, S+1] batch, on the backend. A packed
// batch (SFT records) also gives its layout, and targets that bear no loss become kIgnoreTarget.
void batch_tensors(Backend& b, const Batch& batch, Tensor& inputs, Tensor& targets,
                   PackedLayout* packed) {
  const int64_t B = batch.batch, S = batch.seq;
  std::vector<double> in(static_cast<size_t>(B * S)), tg(static_cast<size_t>(B * S));
  for (int64_t r = 0; r < B; ++r)
    for (int64_t s = 0; s < S; ++s) {
      in[r * S + s] = batch.tokens[r * (S + 1) + s];
      tg[r * S + s] = batch.tokens[r * (S + 1) + s + 1];
      if (batch.packed() && !batch.loss[size_t(r * S + s)]) tg[r * S + s] = kIgnoreTarget;
    }
  inputs = b.from_host(host_tensor(in, Shape{B * S}, DType::I32));
  targets = b.from_host(host_tensor(tg, Shape{B * S}, DType::I32));
  if (packed) *packed = {};
  if (packed && batch.packed()) {
    packed->segments = b.from_vector<int32_t>(batch.segment, Shape{B * S});
    packed->positions = b.from_vector<int32_t>(batch.position, Shape{B * S});
  }
}

LMConfig lm_config(const RunConfig& cfg) {
  LMConfig c;
  c.vocab = cfg.model.vocab;
  c.d_model = cfg.moe.d_model;
  c.layers = cfg.model.layers;
  c.heads = cfg.model.heads;
  c.kv_heads = cfg.model.kv_heads > 0 ? cfg.model.kv_heads : cfg.model.heads;
  c.moe_every = cfg.model.moe_every;
  c.d_ff = cfg.model.d_ff;
  c.tie_embeddings = cfg.model.tie_embeddings;
  c.init_scale = cfg.model.init_scale;
  c.rope_theta = cfg.model.rope_theta;
  c.norm_eps = cfg.model.norm_eps;
  c.head_dim = cfg.model.head_dim;
  c.qkv_bias = cfg.model.qkv_bias;
  c.qk_norm = cfg.model.qk_norm;
  c.recompute = cfg.train.recompute;
  c.dense_layers = cfg.model.dense_layers;
  c.moe = cfg.moe;
  return c;
}

double learning_rate(const TrainConfig& t, int64_t step) {
  if (t.warmup > 0 && step <= t.warmup) return t.lr * double(step) / double(t.warmup);
  const double span = double(std::max<int64_t>(1, t.steps - t.warmup));
  const double progress = std::clamp(double(step - t.warmup) / span, 0.0, 1.0);
  const double floor = t.lr * t.min_lr_ratio;
  return floor + (t.lr - floor) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

namespace {

// The rows [part * B/parts, (part+1) * B/parts) of a batch of B whole sequences: the share of
// one rank of a data-parallel run (every rank reads the same global batch and keeps its part,
// so the data each token sees does not depend on the layout).
Batch slice_batch(const Batch& full, int part, int parts) {
  if (parts == 1) return full;
  Batch b = full;
  const int64_t per = full.batch / parts, row = full.seq + 1, S = full.seq;
  b.batch = per;
  b.tokens.assign(full.tokens.begin() + part * per * row, full.tokens.begin() + (part + 1) * per * row);
  if (!full.category.empty())
    b.category.assign(full.category.begin() + part * per * row, full.category.begin() + (part + 1) * per * row);
  if (full.packed()) {
    b.segment.assign(full.segment.begin() + part * per * S, full.segment.begin() + (part + 1) * per * S);
    b.position.assign(full.position.begin() + part * per * S, full.position.begin() + (part + 1) * per * S);
    b.loss.assign(full.loss.begin() + part * per * S, full.loss.begin() + (part + 1) * per * S);
  }
  return b;
}

bool is_expert_param(const std::string& name) { return grad_group_of(name) == GradGroup::Expert; }

TrainResult train_rank(const RunConfig& cfg, const TrainOptions& opts, const ParallelContext* par,
                       Backend& b) {
  const bool dist = par && par->distributed();
  const int W = dist ? par->world : 1, rank = dist ? par->rank : 0, ep = dist ? par->ep : 1;
  const bool lead = rank == 0;
  const bool quiet = opts.quiet || !lead;
  const DType dtype = cfg.model.dtype;
  const DType state_dtype = dtype == DType::F64 ? DType::F64 : DType::F32;
  MOELAB_CHECK(b.supports(Op::AttentionForward, dtype), "model.dtype = ", to_string(cfg.model.dtype),
               " is not supported by backend ", b.name(), " (bf16 needs train.backend = cuda)");
  const TrainConfig& tc = cfg.train;
  const uint64_t seed = tc.seed;
  // T: this rank's tokens per step; the batch's are T * W.
  const int64_t T = tc.batch / W * tc.seq, E = cfg.moe.experts;

  auto data = make_data_source(cfg.data, tc.batch, tc.seq, seed, cfg.log.eval_batches, tc.loss_on,
                               cfg.model.vocab);
  check_eval_data(cfg, *data);
  int64_t skipped_records = -1;  // jsonl: bad records left out (data.bad_records = skip)
  if (const auto* js = dynamic_cast<const JsonlSource*>(data.get())) {
    skipped_records = js->skipped();
    if (!quiet) {
      std::printf("moelab train: data: %s\n", js->summary().c_str());
      if (js->skipped() > 0) {
        std::printf("moelab train: data: skipped %lld bad record(s) (data.bad_records = skip)%s:\n",
                    (long long)js->skipped(), js->skipped() > 20 ? ", the first 20" : "");
        const auto& pr = js->problems();
        for (const std::string& p : pr) std::printf("  %s\n", p.c_str());
      }
    }
  }
  TransformerLM model(b, lm_config(cfg), dtype, par);
  model.init(rng::derive(seed, kInitStream));
  // Gradients live in the store's flat buffers (one per reduction group and dtype).
  ParamStore store(b, model);
  std::vector<ParamRef>& params = store.params();
  OptimizerState opt;
  // bf16 mixed precision: bf16 parameters are the compute copies of fp32 master weights, which
  // AdamW updates (fp32 state) and casts back after each step. No loss scaling is needed: bf16
  // has fp32's exponent range, so small gradients do not underflow as they would in fp16.
  std::vector<Tensor> master(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamRef& p = params[i];
    opt.m.push_back(b.zeros(p.value.shape(), state_dtype));
    opt.v.push_back(b.zeros(p.value.shape(), state_dtype));
    if (p.value.dtype() == DType::BF16) {
      master[i] = b.empty(p.value.shape(), DType::F32);
      b.cast(p.value, master[i]);
    }
  }
  // The full-precision value of parameter i (what AdamW updates and checkpoints store).
  auto master_of = [&](size_t i) -> Tensor& { return master[i].defined() ? master[i] : params[i].value; };
  const std::vector<int> moe_blocks = model.moe_blocks();
  auto bias_of = [&](size_t i) -> Tensor& { return model.moe_layer(i).router().params().bias; };
  // Expert tensors are sharded over the ep group: checkpoints hold whole tensors [E, ...], this
  // rank the rows [e0, e0 + E/ep).
  const int64_t e0 = dist ? int64_t(par->ep_rank()) * (E / ep) : 0;
  auto whole_shape = [&](const Tensor& t, const std::string& name) {
    if (!is_expert_param(name) || ep == 1) return t.shape();
    Shape s = t.shape();
    s.dims[0] *= ep;
    return s;
  };
  auto read_param = [&](const CheckpointReader& ck, const std::string& key, const std::string& name,
                        const Tensor& dst) {
    Tensor whole = ck.tensor(key, whole_shape(dst, name), dst.dtype());
    b.copy(is_expert_param(name) && ep > 1 ? whole.view_rows(e0, e0 + dst.dim(0)) : whole, dst);
  };

  // ---- init_from: another run's weights, a new run (core/trainer.h) --------------------------
  std::string init_from_run_id;
  int64_t init_from_step = -1;
  std::string init_from = opts.resume.empty() ? tc.init_from : std::string();
  if (!init_from.empty()) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(init_from, ec))
      MOELAB_USAGE_FAIL("config: train.init_from = ", init_from, ": no such checkpoint file");
    CheckpointReader ck(init_from);
    if (ck.has_meta("config"))
      check_init_config(config_from_text(ck.meta("config"), init_from), cfg, init_from);
    if (ck.has_meta("run_id")) init_from_run_id = ck.meta("run_id");
    if (ck.has_meta("step")) init_from_step = std::stoll(ck.meta("step"));
    // Every stored tensor must be a parameter of this model, a router bias, or optimizer state
    // (not used: a new run starts its own); parameters must all be there with their shapes.
    std::set<std::string> known;
    for (const ParamRef& p : params) known.insert(p.name);
    for (int blk : moe_blocks) known.insert("router_bias." + std::to_string(blk));
    for (const std::string& name : ck.names())
      if (ck.is_tensor(name) && !known.count(name) && name.rfind("adam.", 0) != 0)
        MOELAB_USAGE_FAIL("train.init_from = ", init_from, " holds tensor '", name,
                          "', which this model does not have: it was written by another model");
    for (size_t i = 0; i < params.size(); ++i) {
      const ParamRef& p = params[i];
      Tensor& dst = master_of(i);
      const Shape want = whole_shape(dst, p.name);
      if (!ck.has(p.name) || !ck.is_tensor(p.name))
        MOELAB_USAGE_FAIL("train.init_from = ", init_from, " has no tensor '", p.name,
                          "': it was written by a model of another shape");
      if (!(ck.tensor_shape(p.name) == want))
        MOELAB_USAGE_FAIL("train.init_from = ", init_from, ": tensor '", p.name, "' has shape ",
                          ck.tensor_shape(p.name).str(), ", this model's is ", want.str());
      Tensor whole = ck.tensor(p.name, want, ck.tensor_dtype(p.name));
      if (is_expert_param(p.name) && ep > 1) whole = whole.view_rows(e0, e0 + dst.dim(0));
      if (whole.dtype() == dst.dtype()) {
        b.copy(whole, dst);
      } else {  // e.g. an f32 checkpoint into an f64 model: cast on the backend
        Tensor staged = b.from_host(whole);
        b.cast(staged, dst);
      }
      if (master[i].defined()) b.cast(master[i], p.value);
    }
    // The aux-loss-free router biases are part of the trained model (they steer selection), so
    // they carry over: the run starts from exactly the checkpoint's model. They keep moving only
    // if this run's router.bias_update_rate > 0. A checkpoint without them (an imported model)
    // leaves them at 0.
    for (size_t i = 0; i < moe_blocks.size(); ++i) {
      const std::string name = "router_bias." + std::to_string(moe_blocks[i]);
      if (ck.has(name)) b.copy(ck.tensor(name, Shape{E}, DType::F32), bias_of(i));
    }
    if (!quiet)
      std::printf("moelab train: init_from %s (run %s, step %lld): weights%s loaded; new schedule, "
                  "optimizer state and step count\n",
                  init_from.c_str(), init_from_run_id.empty() ? "?" : init_from_run_id.c_str(),
                  (long long)init_from_step, moe_blocks.empty() ? "" : " and router biases");
  }

  // ---- resume --------------------------------------------------------------------------
  int64_t start = 0;
  std::string run_id = new_run_id();
  std::vector<std::string> resume_changes;  // "step N: key: before -> after"
  if (!opts.resume.empty()) {
    CheckpointReader ck(opts.resume);
    if (!ck.has_meta("kind") || ck.meta("kind") != kCheckpointKind)
      MOELAB_USAGE_FAIL("--resume ", opts.resume, " is not a moelab training state (kind '",
                        ck.has_meta("kind") ? ck.meta("kind") : std::string("none"), "')");
    if (!ck.has_meta("run_id") || !ck.has_meta("config"))
      MOELAB_USAGE_FAIL("--resume ", opts.resume, " has no run id or config (written by moelab "
                        "before 0.2), so it cannot be checked against this run; start a new run");
    run_id = ck.meta("run_id");
    start = std::stoll(ck.meta("step"));
    // The whole model-defining config must match (every differing key is named), then the
    // exact set of stored tensors (so no stored tensor is silently ignored).
    for (const ConfigChange& c : check_resume_config(config_from_text(ck.meta("config"), opts.resume), cfg, opts.resume))
      resume_changes.push_back("step " + std::to_string(start) + ": " + c.key + ": " + c.before + " -> " + c.after);
    std::set<std::string> expected = {"data_state"};
    for (const ParamRef& p : params)
      for (const char* prefix : {"", "adam.m.", "adam.v."}) expected.insert(prefix + p.name);
    for (int blk : moe_blocks) expected.insert("router_bias." + std::to_string(blk));
    for (const std::string& name : ck.names())
      if (!expected.count(name))
        MOELAB_USAGE_FAIL("--resume ", opts.resume, " holds tensor '", name, "', which this model "
                          "does not have: it was written by another model");
    for (size_t i = 0; i < params.size(); ++i) {
      const ParamRef& p = params[i];
      MOELAB_CHECK(ck.has(p.name), "checkpoint ", opts.resume, " has no tensor '", p.name,
                   "': it was written by a model of another shape (this config has ",
                   params.size(), " parameter tensors)");
      read_param(ck, p.name, p.name, master_of(i));
      if (master[i].defined()) b.cast(master[i], p.value);
      read_param(ck, "adam.m." + p.name, p.name, opt.m[i]);
      read_param(ck, "adam.v." + p.name, p.name, opt.v[i]);
    }
    for (size_t i = 0; i < moe_blocks.size(); ++i)
      b.copy(ck.tensor("router_bias." + std::to_string(moe_blocks[i]), Shape{E}, DType::F32), bias_of(i));
    data->set_state(ck.blob("data_state"));
    // The run started from another checkpoint: its log says so again after the resume.
    if (ck.has_meta("init_from")) {
      init_from = ck.meta("init_from");
      if (ck.has_meta("init_from_run_id")) init_from_run_id = ck.meta("init_from_run_id");
      if (ck.has_meta("init_from_step")) init_from_step = std::stoll(ck.meta("init_from_step"));
    }
    MOELAB_CHECK(start >= 0 && start <= tc.steps, "checkpoint ", opts.resume, " is at step ", start,
                 ", beyond train.steps = ", tc.steps);
  }

  // ---- run log ----------------------------------------------------------------------------
  RunLogInfo info;
  info.config_ini = to_ini(cfg);
  info.backend = b.name();
  info.moelab_version = kVersion;
  info.moe_layers = moe_blocks;
  info.experts = E;
  info.category_names = data->category_names();
  info.flush_every = cfg.log.flush_every;
  info.sweep_name = opts.sweep_name;
  info.resume_step = opts.resume.empty() ? -1 : start;
  info.overwrite = opts.overwrite;
  info.run_id = run_id;
  info.ranks = W;
  info.parallel_ep = ep;
  info.parallel_dp = dist ? par->dp : 1;
  info.resume_changes = resume_changes;
  info.init_from = init_from;
  info.init_from_run_id = init_from_run_id;
  info.init_from_step = init_from_step;
  info.skipped_records = skipped_records;
  if (!quiet)
    for (const std::string& c : resume_changes) std::printf("moelab train: resume changes %s\n", c.c_str());
  // Rank 0 writes the log and the checkpoints. Checked before the log is created, claimed
  // after: a refusal of either leaves nothing behind.
  std::optional<CheckpointFolder> ckpt_folder;
  if (lead && cfg.log.checkpoint_every > 0) ckpt_folder.emplace(checkpoint_dir_of(cfg), run_id, opts.overwrite);
  std::optional<RunLog> log;
  if (lead) log.emplace(cfg.log.out, info);
  if (ckpt_folder) ckpt_folder->claim();

  TrainResult res;
  res.log_path = cfg.log.out;
  const int64_t C = int64_t(info.category_names.size());

  auto evaluate = [&](int64_t step) {
    double total = 0, counted = 0;  // packed batches: the loss summed over loss-bearing tokens
    double resp_total = 0, resp_counted = 0;  // ... and over the responses' tokens alone
    std::vector<std::vector<int64_t>> counts(moe_blocks.size(), std::vector<int64_t>(size_t(E * C), 0));
    Batch vb;
    const int64_t n = data->val_batches();
    MOELAB_CHECK(n > 0, "evaluation without validation batches (check_eval_data refuses this at startup)");
    const auto t_eval = Clock::now();
    auto last_line = t_eval;
    for (int64_t i = 0; i < n; ++i) {
      // A long evaluation says where it is, so a big eval set never looks like a hang.
      const auto now = Clock::now();
      if (!quiet && std::chrono::duration<double>(now - last_line).count() >= 5.0) {
        std::printf("eval at step %lld: batch %lld/%lld (%s)\n", (long long)step, (long long)i,
                    (long long)n, format_duration(std::chrono::duration<double>(now - t_eval).count()).c_str());
        std::fflush(stdout);
        last_line = now;
      }
      data->val_batch(i, vb);
      vb = slice_batch(vb, rank, W);
      Tensor in, tg;
      PackedLayout layout;
      batch_tensors(b, vb, in, tg, &layout);
      LMForward f = model.forward(in, tg, tc.seq, false, rng::derive(seed, kEvalStream + uint64_t(i)), layout);
      if (vb.packed()) {
        const double n = double(vb.loss_tokens(0, vb.batch));
        total += f.ce_loss * n;
        counted += n;
        // The answer-only loss from the same logits (what train.loss_on = response trains), so
        // that runs with either train.loss_on have a comparable curve.
        std::vector<int32_t> resp(size_t(vb.batch * vb.seq), kIgnoreTarget);
        int64_t nr = 0;
        for (int64_t r = 0; r < vb.batch; ++r)
          for (int64_t j = 0; j < vb.seq; ++j) {
            const size_t at = size_t(r * vb.seq + j), next = size_t(r * (vb.seq + 1) + j + 1);
            if (vb.loss[at] && vb.category[next] == 1) {
              resp[at] = vb.tokens[next];
              ++nr;
            }
          }
        if (nr > 0) {
          resp_total += b.cross_entropy_forward(model.logits(), b.from_vector<int32_t>(resp, Shape{vb.batch * vb.seq})) * double(nr);
          resp_counted += double(nr);
        }
      } else {
        total += f.ce_loss;
      }
      for (size_t l = 0; l < moe_blocks.size(); ++l)
        count_categories(b, model.moe_layer(l).last_routing(), vb, E, C, counts[l]);
    }
    const bool packed = vb.packed();
    if (dist) {  // the batch's mean loss and the counts of all its tokens
      std::vector<double> v = {total, counted, resp_total, resp_counted};
      for (const auto& layer : counts)
        for (int64_t c : layer) v.push_back(double(c));
      par->world_comm->all_reduce_host(v, ReduceOp::Sum);
      total = packed ? v[0] : v[0] / double(W);
      counted = v[1];
      resp_total = v[2];
      resp_counted = v[3];
      size_t at = 4;
      for (auto& layer : counts)
        for (int64_t& c : layer) c = int64_t(v[at++]);
    }
    EvalRow row;
    row.step = step;
    row.loss = packed ? (counted > 0 ? total / counted : 0.0) : total / double(n);
    if (packed && dynamic_cast<const JsonlSource*>(data.get())) row.response_loss = resp_counted > 0 ? resp_total / resp_counted : 0.0;
    row.bits_per_byte = row.loss / std::log(2.0);
    row.category_counts = counts;
    if (log) log->log_eval(row);
    res.eval_steps.push_back(step);
    res.eval_losses.push_back(row.loss);
    return row.loss;
  };

  auto save_checkpoint = [&](int64_t step) {
    CheckpointWriter w;
    w.set_meta("kind", kCheckpointKind);
    w.set_meta("step", std::to_string(step));
    w.set_meta("config", to_ini(cfg));
    w.set_meta("moelab_version", kVersion);
    w.set_meta("run_id", run_id);
    if (!init_from.empty()) {
      w.set_meta("init_from", init_from);
      w.set_meta("init_from_run_id", init_from_run_id);
      w.set_meta("init_from_step", std::to_string(init_from_step));
    }
    // Whole tensors: sharded experts are gathered over the ep group (a collective, so every
    // rank takes part; only rank 0 writes).
    auto whole = [&](const Tensor& t, const std::string& name) {
      if (!is_expert_param(name) || ep == 1) return b.to_host(t);
      Tensor all = b.empty(whole_shape(t, name), t.dtype());
      par->ep_comm->all_gather(t, all);
      return b.to_host(all);
    };
    for (size_t i = 0; i < params.size(); ++i) {
      w.add_tensor(params[i].name, whole(master_of(i), params[i].name));
      w.add_tensor("adam.m." + params[i].name, whole(opt.m[i], params[i].name));
      w.add_tensor("adam.v." + params[i].name, whole(opt.v[i], params[i].name));
    }
    if (!lead) return;
    for (size_t i = 0; i < moe_blocks.size(); ++i)
      w.add_tensor("router_bias." + std::to_string(moe_blocks[i]), b.to_host(bias_of(i)));
    w.add_blob("data_state", data->state());
    // The log first: the log on disk must always cover the latest checkpoint, because a resume
    // keeps the log's rows up to the checkpoint's step and recomputes only what comes after.
    // (Checkpoint first, then a failed flush, would lose the rows in between for good.)
    log->flush();
    ckpt_folder->before_write();
    const std::string path = checkpoint_path(ckpt_folder->dir(), step);
    w.write(path);
    res.last_checkpoint = path;
  };

  if (!quiet)
    std::printf("moelab train: %s backend, %s, %lld params, %lld MoE blocks of %lld, %s data, "
                "%lld steps of %lld tokens -> %s\n",
                b.name().c_str(), to_string(dtype),
                (long long)std::accumulate(params.begin(), params.end(), int64_t(0),
                                           [](int64_t a, const ParamRef& p) { return a + p.value.numel(); }),
                (long long)moe_blocks.size(), (long long)cfg.model.layers, data->name().c_str(),
                (long long)tc.steps, (long long)(T * W), cfg.log.out.c_str());
  if (!quiet && dist)
    std::printf("moelab train: %d ranks (parallel.ep = %d x parallel.dp = %d, %s), %lld sequences per rank\n",
                W, ep, par->dp, par->world_comm->kind().c_str(), (long long)(tc.batch / W));

  // Data parallelism: gradients are reduced during the last micro-batch's backward pass.
  std::optional<GradientReducer> reducer;
  if (dist) reducer.emplace(store, par->grad_world_comm.get(), par->grad_expert_dp_comm.get());

  // Communication counters of this rank: the all-to-all dispatchers' (every MoE layer) and the
  // gradient all-reduce's (the time the step waits for it after the backward pass: what the
  // overlap did not hide).
  struct CommTotals {
    int64_t sent = 0, recv = 0;
    double seconds = 0, a2a_seconds = 0;
  };
  double reduce_seconds = 0;
  std::vector<AllToAllDispatcher*> a2a;
  for (size_t i = 0; i < moe_blocks.size(); ++i)
    if (auto* d = dynamic_cast<AllToAllDispatcher*>(&model.moe_layer(i).dispatcher())) {
      d->time_with_sync(b.device() != Device::CPU);
      a2a.push_back(d);
    }
  auto comm_totals = [&] {
    CommTotals t;
    t.seconds = reduce_seconds;
    for (const AllToAllDispatcher* d : a2a) {
      t.sent += d->sent_bytes();
      t.recv += d->received_bytes();
      t.seconds += d->comm_seconds();
      t.a2a_seconds += d->comm_seconds();
    }
    return t;
  };

  // ---- the loop ---------------------------------------------------------------------------
  const auto t_start = Clock::now();
  double last_val = std::nan(""), window_time = 0;
  int64_t window_steps = 0;
  // A run from another checkpoint's weights logs their validation loss on this run's data first
  // (eval step 0): where continued pretraining or fine-tuning starts.
  if (opts.resume.empty() && !init_from.empty() && cfg.log.eval_every > 0) {
    last_val = evaluate(0);
    if (!quiet)
      std::printf(cfg.data.tokenizer == "bytes" ? "step     0/%lld | val %.3f bpb (init_from: the starting model, before any update)\n"
                                                : "step     0/%lld | val %.3f b/tok (init_from: the starting model, before any update)\n",
                  (long long)tc.steps, last_val / std::log(2.0));
  }
  Batch batch;
  std::vector<double> imb_hist, drop_hist, rms_hist;
  for (int64_t step = start + 1; step <= tc.steps; ++step) {
    const auto t0 = Clock::now();
    const double lr = learning_rate(tc, step);
    data->next_train(batch);
    const CommTotals comm_before = comm_totals();
    // This rank's share of the batch, in A micro-batches whose gradients add up (backward
    // accumulates) before one update; the objective is the mean over ranks and micro-batches.
    const int64_t A = tc.grad_accum;
    const Batch share = slice_batch(batch, rank, W);
    // Packed SFT batches: the objective is the mean over the step's loss-bearing tokens (all
    // ranks and micro-batches), so a micro-batch's cross-entropy gradient is weighted by its
    // share of them (A W n_m / N: the reduction below divides by A W again). Plain batches have
    // the same number of tokens everywhere and keep the mean of the means.
    const int64_t loss_tokens = batch.loss_tokens(0, batch.batch);
    store.zero_grads();
    LMForward f;
    std::vector<RouterStatsSum> step_stats(moe_blocks.size());
    double ce_sum = 0;
    for (int64_t m = 0; m < A; ++m) {
      Tensor in, tg;
      PackedLayout layout;
      const Batch micro = slice_batch(share, int(m), int(A));
      batch_tensors(b, micro, in, tg, &layout);
      f = model.forward(in, tg, tc.seq, true, rng::derive(seed, kStepStream + uint64_t(step)), layout);
      const double n_m = double(micro.loss_tokens(0, micro.batch));
      const double ce_scale = micro.packed() ? (loss_tokens > 0 ? double(A * W) * n_m / double(loss_tokens) : 0.0) : 1.0;
      // The last micro-batch completes the gradients: each block's are reduced as soon as its
      // backward is done, beside the backward of the blocks below it.
      if (reducer && m == A - 1 && cfg.parallel.overlap_grad_reduce) model.backward([&](int block) { reducer->block_done(block); }, ce_scale);
      else model.backward({}, ce_scale);
      ce_sum += micro.packed() ? f.ce_loss * n_m : f.ce_loss;
      for (size_t l = 0; l < f.moe.size(); ++l) step_stats[l].add(f.moe[l].stats, f.moe[l].losses, T / A);
    }
    // Packed: this rank's loss summed over its tokens, times W so that the mean over ranks below
    // gives the sum over all of them, over the step's count: the token mean.
    f.ce_loss = batch.packed() ? (loss_tokens > 0 ? ce_sum * double(W) / double(loss_tokens) : 0.0)
                               : ce_sum / double(A);
    // The statistics of the step's whole batch: already so with router.balance_scope = batch
    // (the router reduced them over the ranks); merged over micro-batches and ranks otherwise.
    if (cfg.moe.router.balance_scope == BalanceScope::MicroBatch)
      for (size_t l = 0; l < f.moe.size(); ++l) {
        if (dist) step_stats[l].reduce(*par->world_comm);
        step_stats[l].result(f.moe[l].stats, f.moe[l].losses);
      }
    if (!dist && A > 1) store.scale_grads(1.0 / double(A));

    double sq = 0;
    if (dist) {
      // Data parallelism: the objective is the mean over ranks of their losses, so gradients
      // are summed (replicated parameters over the world, experts over their expert-dp group:
      // the all-to-all already summed the ep group's tokens into them) and divided by W.
      reducer->finish(b);
      reduce_seconds = reducer->wait_seconds();
      store.scale_grads(1.0 / double(W * A));
      // The global norm: replicated gradients are equal everywhere, expert shards add up.
      std::vector<double> shard = {store.sum_squares(GradGroup::Expert)};
      if (ep > 1) par->ep_comm->all_reduce_host(shard, ReduceOp::Sum);
      sq = store.sum_squares(GradGroup::Replicated) + shard[0];
      std::vector<double> loss = {f.ce_loss};
      par->world_comm->all_reduce_host(loss, ReduceOp::Sum);
      f.ce_loss = loss[0] / double(W);
    } else {
      sq = store.sum_squares(GradGroup::Replicated) + store.sum_squares(GradGroup::Expert);
    }
    const double gnorm = std::sqrt(sq);
    // This step's communication, per rank (gathered to every rank; rank 0 logs it).
    std::vector<int64_t> rank_comm;
    if (dist) {
      const CommTotals now = comm_totals();
      rank_comm = par->world_comm->all_gather_host(
          {now.sent - comm_before.sent, now.recv - comm_before.recv,
           int64_t(1e9 * (now.seconds - comm_before.seconds)),
           int64_t(1e9 * (now.a2a_seconds - comm_before.a2a_seconds))});
    }
    if (opts.on_gradients) opts.on_gradients(StepView{rank, ep, dist ? par->dp : 1, step, params, model, b});
    MOELAB_CHECK(std::isfinite(f.ce_loss) && std::isfinite(gnorm), "training diverged at step ",
                 step, ": loss ", f.ce_loss, ", gradient norm ", gnorm,
                 " (try a lower train.lr, model.init_scale or router.z_loss > 0)");
    if (tc.grad_clip > 0 && gnorm > tc.grad_clip) store.scale_grads(tc.grad_clip / gnorm);
    for (size_t i = 0; i < params.size(); ++i) {
      // (bf16: the update of the fp32 master and its cast to the bf16 compute copy, one pass)
      b.adamw(master_of(i), params[i].grad, opt.m[i], opt.v[i], lr, tc.beta1, tc.beta2, 1e-8,
              decays(params[i]) ? tc.weight_decay : 0.0, step, master[i].defined() ? params[i].value : Tensor());
    }
    for (size_t i = 0; i < moe_blocks.size(); ++i) model.moe_layer(i).update_bias(f.moe[i].stats);
    b.synchronize();
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    window_time += dt;
    ++window_steps;

    res.steps.push_back(step);
    res.losses.push_back(f.ce_loss);
    res.step_seconds.push_back(dt);
    if (dist) {
      double most = 0;
      for (int r = 0; r < W; ++r) most = std::max(most, 1e-9 * double(rank_comm[size_t(4 * r + 2)]));
      res.comm_seconds.push_back(most);
    }
    double imb = 0, drop = 0, rms = 0;
    TrainRow row;
    row.step = step;
    row.loss = f.ce_loss;
    row.lr = lr;
    row.grad_norm = gnorm;
    row.tokens_per_sec = double(T * W) / dt;
    row.loss_tokens = loss_tokens;
    for (int r = 0; r < (dist ? W : 0); ++r) {
      row.rank_sent_bytes.push_back(rank_comm[size_t(4 * r)]);
      row.rank_recv_bytes.push_back(rank_comm[size_t(4 * r + 1)]);
      row.rank_comm_seconds.push_back(1e-9 * double(rank_comm[size_t(4 * r + 2)]));
      row.rank_a2a_seconds.push_back(1e-9 * double(rank_comm[size_t(4 * r + 3)]));
    }
    for (const MoEOutput& mo : f.moe) {
      row.layers.push_back({mo.stats, mo.losses, mo.capacity});
      const int64_t routed = std::accumulate(mo.stats.routed.begin(), mo.stats.routed.end(), int64_t(0));
      const int64_t kept = std::accumulate(mo.stats.kept.begin(), mo.stats.kept.end(), int64_t(0));
      const int64_t mx = *std::max_element(mo.stats.routed.begin(), mo.stats.routed.end());
      imb += routed ? double(mx) * double(E) / double(routed) : 0.0;
      drop += routed ? double(routed - kept) / double(routed) : 0.0;
      rms += mo.stats.logit_rms;
    }
    const double nl = std::max<double>(1.0, double(f.moe.size()));
    imb_hist.push_back(imb / nl);
    drop_hist.push_back(drop / nl);
    rms_hist.push_back(rms / nl);
    if (log && cfg.log.every > 0 && (step % cfg.log.every == 0 || step == tc.steps)) log->log_train(row);

    const bool do_eval = cfg.log.eval_every > 0 && (step % cfg.log.eval_every == 0 || step == tc.steps);
    if (do_eval) last_val = evaluate(step);
    if (cfg.log.checkpoint_every > 0 && (step % cfg.log.checkpoint_every == 0 || step == tc.steps))
      save_checkpoint(step);

    if (!quiet && (step == start + 1 || step % std::max<int64_t>(1, cfg.log.every) == 0 ||
                        step == tc.steps || do_eval)) {
      const double per_step = window_time / double(window_steps);
      char val[32] = "   -    ";
      // bits per byte for bytes; with data.tokenizer the loss is per token (bits per token).
      if (!std::isnan(last_val))
        std::snprintf(val, sizeof val, cfg.data.tokenizer == "bytes" ? "%.3f bpb" : "%.3f b/tok",
                      last_val / std::log(2.0));
      std::printf("step %5lld/%lld | loss %.4f | val %s | lr %.2e | gnorm %.2f | imbalance %.2f | "
                  "drop %.1f%% | %.0f tok/s | left %s\n",
                  (long long)step, (long long)tc.steps, f.ce_loss,
                  val,
                  lr, gnorm, imb / nl, 100.0 * drop / nl, double(T * W) / per_step,
                  format_duration(per_step * double(tc.steps - step)).c_str());
      std::fflush(stdout);
    }
  }
  if (log) log->flush();
  res.seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  res.tokens_per_sec = res.seconds > 0 ? double(res.steps.size() * T * W) / res.seconds : 0;
  const size_t n = imb_hist.size(), tail = std::max<size_t>(1, n / 10);
  auto tail_mean = [&](const std::vector<double>& v) {
    return n ? std::accumulate(v.end() - long(std::min(tail, n)), v.end(), 0.0) / double(std::min(tail, n)) : 0.0;
  };
  res.imbalance = tail_mean(imb_hist);
  res.drop_fraction = tail_mean(drop_hist);
  res.logit_rms = tail_mean(rms_hist);
  return res;
}

}  // namespace

TrainResult train(const RunConfig& cfg, const TrainOptions& opts, const RunEnvironment& env) {
  MOELAB_CHECK(env.make_backend, "train: the run environment has no backend factory");
  preflight_check(cfg);
  check_data_vocab(cfg);  // token ids must fit model.vocab (loads data.tokenizer once, shared)
  const ParallelConfig& pc = cfg.parallel;
  if (pc.world() == 1) {
    auto backend = env.make_backend(0);
    return train_rank(cfg, opts, nullptr, *backend);
  }
  // One thread per rank, each with its own backend (simulated ranks: a CPU backend with one
  // OpenMP thread; NCCL: the GPU of its rank).
  TrainResult result;
  auto per_rank = [&](int rank, Communicator& world) {
    auto backend = env.make_backend(rank);
    if (env.bind) env.bind(world, *backend);
    ParallelContext ctx = ParallelContext::make(world, int(pc.ep), int(pc.dp));
    TrainResult r = train_rank(cfg, opts, &ctx, *backend);
    if (rank == 0) result = std::move(r);
  };
  if (env.run_world) env.run_world(int(pc.world()), per_rank);
  else run_ranks(int(pc.world()), per_rank);
  return result;
}

}  // namespace moelab
