// moelab: the training loop (AdamW, warm-up + cosine schedule, global-norm clipping, evaluation,
// HDF5 run log, checkpoints and bit-identical resume).
//
// Stages (README "Training stages"): train.init_from starts a NEW run from a checkpoint's weights
// and router biases (new run id, step count, schedule and AdamW state; the model keys must match:
// run_identity.h check_init_config) and evaluates once at step 0; --resume continues the SAME
// run. SFT records (data.source = jsonl) arrive packed (Batch::packed): the model gets their
// segments and positions, targets without loss become kIgnoreTarget, and the step's objective is
// the mean over its loss-bearing tokens across micro-batches and ranks (each micro-batch's
// cross-entropy gradient weighted by its share of them; /train/loss_tokens logs the count).
//
// Determinism: every random draw is a counter-based function of (train.seed, step, purpose)
// (core/rng.h), the data source's position is part of the checkpoint, and the CPU backend's
// reductions have a fixed order, so the same config and seed give bit-identical losses on the
// CPU, and a resumed run continues bit-identically.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/io/config.h"
#include "core/model.h"
#include "core/preflight.h"  // train() runs preflight_check and check_eval_data first

namespace moelab {

// The checkpoint's "kind" meta value of a training state (the trainer's checkpoints, and the
// weights-only checkpoints `moelab import-hf` writes).
inline constexpr const char* kCheckpointKind = "moelab-train-state-1";
inline constexpr const char* kVersion = "0.1.0";  // moelab's version, in logs and checkpoints

// What TrainOptions::on_gradients sees: the rank, its layout (0, 1, 1 on one rank), the step,
// the parameters with their reduced gradients, and the model (its MoE layers' last routing and
// dispatch layout are this step's training forward).
struct StepView {
  int rank = 0, ep = 1, dp = 1;
  int64_t step = 0;
  std::vector<ParamRef>& params;
  TransformerLM& model;
  Backend& backend;  // where params live (to_host to read them)
};

struct TrainOptions {
  std::string resume;      // checkpoint path to continue from ("" = fresh run)
  std::string sweep_name;  // recorded in the log ("" = not part of a sweep)
  bool quiet = false;      // no progress lines
  // Called on every rank after each step's gradients are complete (reduced over the ranks,
  // before clipping). For tests and diagnostics; it must not change anything.
  std::function<void(const StepView&)> on_gradients;
  bool overwrite = false;  // replace an existing log (at its first flush) and another run's
                           // checkpoints in the folder (at the first checkpoint)
};

struct TrainResult {
  std::vector<int64_t> steps;        // every optimizer step run in this call
  std::vector<double> losses;        // LM loss (nats per token) at those steps
  std::vector<int64_t> eval_steps;
  std::vector<double> eval_losses;   // validation nats per token
  double seconds = 0;
  double tokens_per_sec = 0;
  // Means over the last 10% of steps (at least one), per MoE layer averaged over layers:
  double imbalance = 0;      // max_i c_i / mean_i c_i of the routed counts
  double drop_fraction = 0;  // (routed - kept) / routed
  double logit_rms = 0;
  std::vector<double> step_seconds;   // wall time of each step run in this call (rank 0's)
  std::vector<double> comm_seconds;   // per step, the most any rank spent communicating (ranks > 1)
  std::string log_path;
  std::string last_checkpoint;
};

// Inputs tokens[:, :S] and targets tokens[:, 1:] of a [B, S+1] batch as i32 [B*S] tensors on the
// backend. A packed batch (SFT records) sets *packed (segments, positions) and turns the targets
// that bear no loss into kIgnoreTarget; otherwise *packed is left empty.
struct Batch;
void batch_tensors(Backend& b, const Batch& batch, Tensor& inputs, Tensor& targets,
                   PackedLayout* packed = nullptr);

// The model shape of a run config.
LMConfig lm_config(const RunConfig& cfg);

// Learning rate at optimizer step `step` (1-based): linear warm-up from lr/warmup to lr over
// `warmup` steps, then cosine decay to lr * min_lr_ratio at train.steps.
double learning_rate(const TrainConfig& t, int64_t step);

// Where a run's backends and, for several ranks, its communicators come from. The command line
// builds it from the backend registry (backends/registry.h default_environment); core/ knows
// neither the backends nor NCCL, so the core library links alone.
struct RunEnvironment {
  // The backend of `rank` (for a CUDA rank: the GPU it runs on). Required.
  std::function<std::unique_ptr<Backend>(int rank)> make_backend;
  // Runs fn(rank, world) once per rank of a world of `ranks` ranks, joins them, and rethrows the
  // first failure as moelab::Error "rank R: ...". Empty: simulated ranks (core/comm_sim.h).
  std::function<void(int ranks, const std::function<void(int rank, Communicator& world)>& fn)> run_world;
  // Called on every rank with its world and its backend before any collective (NCCL binds the
  // backend's stream here). Optional.
  std::function<void(Communicator& world, Backend& backend)> bind;
};

// Trains `cfg` (parallel.ep x parallel.dp ranks when that is more than one). Throws
// moelab::UsageError for a refused config or resume, moelab::Error for failures while running.
TrainResult train(const RunConfig& cfg, const TrainOptions& opts, const RunEnvironment& env);

}  // namespace moelab
