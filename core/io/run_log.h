// moelab: the HDF5 run log (DESIGN.md "HDF5 run log"; every path is documented in
// docs/run-log.md).
//
// One RunLog writes one file: training curves (/train), evaluation curves (/eval) and, per MoE
// layer and per logged step, every router statistic (/router/layer_XX), plus an expert x
// category count matrix per layer at every evaluation. Steps and counts are int64, values
// float64. N = logged training rows, M = logged evaluation rows, E = experts,
// C = categories (category_names).
//
// Invariants:
//   - every dataset under /train and every per-step dataset under /router has length N;
//     /eval/* and /router/layer_XX/category_counts have length M (aligned with /eval/step);
//   - the file at `path` is always a complete HDF5 file, whatever moment the process dies at
//     (SIGKILL, power loss after the rename reached the disk).
//
// Crash-safety design ("write a new file, then rename"): all rows live in memory. A flush
// writes a complete new file to `path + ".tmp"`, flushes and closes it with every HDF5 status
// checked, fsync()s it, reads its row counts back, rename()s it over `path` (atomic on POSIX: a
// reader or a crash sees the old file or the new one, never a mix) and fsync()s the folder. A
// failed flush (disk full, I/O error) removes the tmp file, keeps the previous good log, throws
// moelab::Error and refuses every later flush (the destructor does not retry). For a new `path`
// the constructor already writes a valid file with zero rows, so a run killed before its first
// flush still leaves a readable log; an existing file (resume, overwrite) is left as it is
// until the first flush. A kill during a flush leaves the previous complete file plus a stale
// `path.tmp`, which the next flush overwrites.
//
// Output rules (core/io/output_file.h): a symlink `path` is written through to its target; a
// device, FIFO, socket or folder is refused; `path + ".lock"` (flock) keeps a second writer out
// and names the pid of the first.
// Cost: memory holds the whole log, and each flush rewrites it, O(rows so far) bytes, so a
// run writes about N^2 / (2 * flush_every) row-writes in total. A row is
// 40 + L * (24 E + 96) bytes (L MoE layers): 500 steps, 2 layers, 8 experts is 0.3 MB; a
// rewrite of a 10 MB file takes about 80 ms here. Pick flush_every so that N / flush_every
// stays in the hundreds for long runs.
//
// Flushes happen after every flush_every-th log_train() call; eval rows are written at the
// next flush (or by flush() / the destructor). Errors (bad path, inconsistent rows) throw
// moelab::Error naming the file.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/moe/router.h"

namespace moelab {

struct RunLogInfo {
  std::string config_ini;                   // root attribute config: the resolved INI text
  std::string backend;                      // root attribute backend ("cpu", "cuda")
  std::string moelab_version;               // root attribute moelab_version
  std::vector<int> moe_layers;              // transformer block indices with an MoE FFN, in the
                                            // order of TrainRow::layers; group /router/layer_XX
  int64_t experts = 0;                      // E
  std::vector<std::string> category_names;  // C names of category_counts' last axis (may be
                                            // empty: then no category_counts are written)
  int64_t flush_every = 1;                  // flush after every flush_every-th train row (>= 1)
  std::string sweep_name;                   // optional root attribute sweep_name ("" = none)
  // Resume: >= 0 keeps the rows of an existing log at `path` whose step <= resume_step (train
  // and eval) and appends after them; the layout (layers, E, C) and run_id must match. A missing
  // file starts a new log. -1 (default): a new log.
  int64_t resume_step = -1;
  // An existing file at `path` (not resuming) is refused (moelab::UsageError) unless overwrite;
  // with overwrite it stays untouched until this log's first flush replaces it.
  bool overwrite = false;
  std::string run_id;                       // root attribute run_id ("" = none)
  int64_t ranks = 1;                        // > 1: /parallel/* per-rank datasets [N, ranks]
  int64_t parallel_ep = 1, parallel_dp = 1; // root attributes parallel_ep, parallel_dp
  std::vector<std::string> resume_changes;  // appended to root attribute resume_changes: the
                                            // config keys a resume changed, one line each
  // train.init_from: root attributes init_from (the checkpoint path), init_from_run_id and
  // init_from_step (the run and step that wrote it), written when init_from is not empty. A
  // resumed log keeps the attributes it has when these are empty.
  std::string init_from, init_from_run_id;
  int64_t init_from_step = -1;
  int64_t skipped_records = -1;             // >= 0: root attribute data_skipped_records (jsonl)
};

struct LayerRouterRow {
  RouterStats stats;     // routed/kept/mean_prob [E], scalars as in core/backend.h
  RouterLosses losses;   // un-scaled aux, z, importance, load and the weighted sum
  int64_t capacity = 0;  // expert capacity C of this step (0 = dropless)
};

struct TrainRow {
  int64_t step = 0;                    // strictly increasing across calls
  double loss = 0;                     // language-model loss only (nats per token)
  double lr = 0;
  double grad_norm = 0;                // global gradient norm before clipping
  double tokens_per_sec = 0;
  int64_t loss_tokens = -1;            // /train/loss_tokens: targets bearing loss in the step's
                                       // batch (-1: not counted, e.g. rows of an older log)
  std::vector<LayerRouterRow> layers;  // one per MoE layer, in RunLogInfo::moe_layers order
  // Parallel runs (RunLogInfo::ranks > 1), one entry per rank: all-to-all bytes this rank sent to
  // and received from other ranks in this step (every MoE layer, forward and backward), and the
  // wall seconds it spent in communication (all-to-all and gradient all-reduce), and the
  // all-to-all's part of them.
  std::vector<int64_t> rank_sent_bytes, rank_recv_bytes;
  std::vector<double> rank_comm_seconds;
  std::vector<double> rank_a2a_seconds;  // the all-to-all part of rank_comm_seconds
};

struct EvalRow {
  int64_t step = 0;  // strictly increasing across calls
  double loss = 0;   // nats per token
  // per MoE layer: [E * C] row-major expert x category counts of kept assignments over the eval
  // set. Must be one per layer when C > 0, empty when C == 0.
  std::vector<std::vector<int64_t>> category_counts;
  std::optional<double> bits_per_byte;  // /eval/bits_per_byte, written when any row has it
                                        // (NaN in rows without it)
  std::optional<double> response_loss;  // /eval/response_loss (SFT records): the answer-only
                                        // loss of the validation records, whatever
                                        // train.loss_on is; written like bits_per_byte
};

class RunLog {
 public:
  // Validates info, resolves and locks the target, creates the parent folders and, for a new
  // file, writes a valid file with zero rows. Throws moelab::Error naming the path if it cannot
  // (moelab::UsageError for an existing log without overwrite or resume, or a non-regular target).
  RunLog(const std::string& path, const RunLogInfo& info);
  // Flushes the rows not yet on disk; does nothing when this RunLog logged no row (an existing
  // file stays as it was) or a flush failed. An error here is printed to stderr, never thrown.
  ~RunLog();
  RunLog(RunLog&&) noexcept;
  RunLog& operator=(RunLog&&) noexcept;
  RunLog(const RunLog&) = delete;
  RunLog& operator=(const RunLog&) = delete;

  // Appends one training row; flushes after every flush_every-th call. Throws moelab::Error on
  // a row that does not match the layout (layer count, E) or a step that does not increase.
  void log_train(const TrainRow& row);
  // Appends one evaluation row (written at the next flush). Same checks (category counts E*C).
  void log_eval(const EvalRow& row);
  // Writes everything logged so far (atomic replace, see above). A no-op when nothing changed.
  void flush();

  const std::string& path() const;
  int64_t train_rows() const;          // N logged so far (in memory)
  int64_t eval_rows() const;           // M logged so far (in memory)
  int64_t flushed_train_rows() const;  // N of the file on disk

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// "layer_07": the group name of transformer block `layer` under /router.
std::string run_log_layer_name(int layer);

}  // namespace moelab
