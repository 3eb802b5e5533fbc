// moelab: what makes a training run one run, and the checks that keep runs apart on resume.
//
// Every run has a run id (core/io/output_file.h new_run_id()), chosen at its first step and kept
// by every resume. It is stored in each checkpoint (meta "run_id"), in the log (root attribute
// run_id) and in the checkpoint folder (a file named `run_id`), so that
//   - a folder that holds another run's checkpoints is refused (CheckpointFolder), and two runs
//     can never overwrite each other's checkpoints, even when started at the same moment;
//   - a resume into another run's log is refused (RunLog compares the ids);
//   - a resume whose config differs from the checkpoint's is refused for every key that defines
//     the model, the data or the randomness (check_resume_config), naming each such key.
#pragma once
#include <string>
#include <vector>

#include "core/io/config.h"

namespace moelab {

struct ConfigChange {
  std::string key, before, after;
};

// True for keys a resume may change: they change how training continues, not what the model
// is or which data and random draws it sees: the learning-rate schedule and optimizer
// (train.steps, lr, warmup, min_lr_ratio, weight_decay, grad_clip, beta1, beta2), the router's
// loss weights and bias step (router.aux_alpha, aux_loss_type, z_loss, importance_weight,
// load_weight, bias_update_rate, balance_scope), the micro-batching (train.grad_accum), the backend, the corpus location (data.path), every log.*
// key and the parallel layout (parallel.ep, parallel.dp: checkpoints hold whole tensors).
bool resume_may_change(const std::string& key);

// Compares the config a checkpoint was written with (`saved`) against this run's (`now`).
// Throws moelab::UsageError listing every key that differs and may not change (with both
// values); returns the keys that differ and may (the caller logs them).
std::vector<ConfigChange> check_resume_config(const RunConfig& saved, const RunConfig& now,
                                              const std::string& checkpoint);

// train.init_from: the keys that define what a checkpoint's weights are, i.e. every model.* key
// except model.init_scale, model.dtype and model.expert_dropout (initialisation, precision and
// regularisation, which a new run may choose), plus router.noise when either side is `learned`
// (that one adds a tensor). Other router keys, the data and the schedule may differ (continued
// pretraining and fine-tuning change them on purpose).
bool init_from_must_match(const std::string& key, const RunConfig& saved, const RunConfig& now);

// Compares the config stored in an init_from checkpoint (`saved`) with this run's: throws
// moelab::UsageError listing every key of init_from_must_match that differs, with both values.
void check_init_config(const RunConfig& saved, const RunConfig& now, const std::string& checkpoint);

// The checkpoint folder of one run. The folder's `run_id` file names its owner.
class CheckpointFolder {
 public:
  // Checks that `dir` may hold run `run_id`'s checkpoints (creating the folder), or refuses
  // (moelab::UsageError) when it holds another run's checkpoints, unless `overwrite`: then
  // the other run's step_*.ckpt files are removed at this run's first checkpoint write, not
  // before. A folder with checkpoints but no `run_id` file is judged by its latest checkpoint.
  // Writes nothing else: a run refused later at startup leaves no claim behind.
  CheckpointFolder(std::string dir, std::string run_id, bool overwrite);
  // Claims an unclaimed folder: creates its `run_id` file with O_EXCL, so of two runs started
  // at the same moment the second is refused. Call once the run is past its startup checks.
  void claim();
  // Call before every checkpoint write: verifies that the folder is still this run's (another
  // process may have claimed it), and carries out a pending overwrite. Throws moelab::Error.
  void before_write();
  const std::string& dir() const { return dir_; }

 private:
  std::string read_owner() const;  // "" when there is no run_id file
  void write_owner();
  std::string dir_, run_id_;
  bool replace_pending_ = false;
  bool claim_pending_ = false;
};

}  // namespace moelab
