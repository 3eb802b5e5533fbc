// moelab: the subcommands behind the `moelab` binary (experiments/moelab.cpp parses the command
// line, loads and validates the config, and calls one of these).
//
// Each run_* returns the process exit code (0 = success) and may throw moelab::Error, which
// main() prints as `moelab: error: <message>` with exit code 2. run_train and run_crosscheck get
// one resolved run (RunConfig::sweep is empty): main() expands a [sweep] and calls once per run.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <optional>

#include "backends/registry.h"
#include "core/io/config.h"

// `moelab train` options that are not config keys. out and backend are already applied to the
// config (log.out, train.backend); they are repeated here so a command can tell that they came
// from the command line. resume is an existing checkpoint path, or empty.
struct TrainCliOptions {
  std::string out, backend, resume;
  std::string sweep_name;  // the run's name inside a sweep ("" = no sweep)
  bool overwrite = false;  // --overwrite: replace existing logs / another run's checkpoints
  std::optional<moelab::ProcessRank> process;  // one process per GPU: this process's rank
  std::string nccl_id;                         // ... and the NCCL id file
  bool study = false;  // the config is a study (a [sweep] or train.seeds): named runs, sweep.json
};

// `moelab generate --checkpoint PATH [--prompt TEXT] [--tokens N]`.
struct GenerateCliOptions {
  std::string checkpoint;  // an existing checkpoint path
  std::string prompt;      // may be empty
  int64_t tokens = 200;    // tokens to sample, >= 1
  double temperature = 0.8; // > 0; logits are divided by it
  int64_t top_k = 40;       // sample among the k most likely bytes; 0 = all
  uint64_t seed = 1;        // sampling seed
  std::string backend;      // "" = cpu
};

// `moelab bench [--config FILE] [--set ...] [--backend cpu|cuda] [--iters N] [--warmup N]`.
struct BenchCliOptions {
  std::string backend;  // already applied to the config (train.backend)
  int64_t iters = 20;   // timed iterations per measurement, >= 1
  int64_t warmup = 3;   // untimed steps first, >= 0 (cuBLAS meets new expert shapes in them)
  bool breakdown = false;  // --breakdown: time per phase (core/profile.h) over --iters more steps
  bool moe_layer = false;  // `bench moe-layer`: the MoE layer alone (forward + backward)
};

int run_train(const moelab::RunConfig& cfg, const TrainCliOptions& opts);  // experiments/train_cmd.cpp

// `moelab tokenize --tokenizer PATH --in FILE... [--out FILE | --out-dir DIR] [--decode]
// [--invalid-utf8 refuse|replace] [--info]`.
struct TokenizeCliOptions {
  std::string tokenizer;            // tokenizer.json, encoder.json (vocab.bpe beside), or a folder
  std::vector<std::string> inputs;  // texts to encode, or id files to decode
  std::string out, out_dir;         // one output (default stdout), or one file per input
  bool decode = false;
  bool replace_invalid = false;     // invalid UTF-8 -> U+FFFD instead of an error
  bool info = false;                // print the tokenizer's summary and vocabulary size only
};
int run_tokenize(const TokenizeCliOptions& opts);  // experiments/tokenize_cmd.cpp

// `moelab import-hf DIR --out CHECKPOINT [--dtype f32|f64] [--overwrite]` (experiments/hf_cmd.cpp).
struct ImportHfCliOptions {
  std::string dir, out;
  bool f64 = false;        // f64 master weights (and model.dtype = f64) instead of f32
  bool overwrite = false;
};
int run_import_hf(const ImportHfCliOptions& opts);
// `moelab export-hf CHECKPOINT --out DIR [--arch NAME] [--layout per_expert|fused] [--dtype F32|BF16|F64]
// [--shard-size BYTES] [--overwrite]`.
struct ExportHfCliOptions {
  std::string checkpoint, out, arch, layout, dtype;
  uint64_t shard_bytes = uint64_t(5) << 30;  // Hugging Face's default max_shard_size: 5 GB
  bool overwrite = false;
};
int run_export_hf(const ExportHfCliOptions& opts);
// experiments/study_cmd.cpp: the runs of a study (expand_sweep(base)), `jobs` at a time on the CPU
// (0 = plan_jobs chooses), each single-threaded; sweep.json rewritten after every finished run
// when write_index. Returns 0, or the exit status of the first run that failed.
int run_study(const moelab::RunConfig& base, const std::vector<moelab::SweepRun>& runs,
              const TrainCliOptions& cli, int64_t jobs, bool write_index);
// sweep.json beside the study's logs; done[i]: run i finished (only those are listed).
std::filesystem::path sweep_index_path(const std::vector<moelab::SweepRun>& runs);
void write_sweep_index(const moelab::RunConfig& base, const std::vector<moelab::SweepRun>& runs,
                       const std::vector<bool>& done);
// `moelab crosscheck --config FILE [--set ...] [--out PATH.h5]`.
struct CrosscheckCliOptions {
  std::string out = "runs/crosscheck.h5";  // findings (one group per compared dtype)
  bool overwrite = false;                  // --overwrite: replace an existing findings file
};
int run_crosscheck(const moelab::RunConfig& cfg, const CrosscheckCliOptions& opts);  // experiments/crosscheck_cmd.cpp
int run_generate(const GenerateCliOptions& opts);                          // experiments/train_cmd.cpp
namespace moelab {
class CheckpointReader;
class TransformerLM;
class Backend;
class Tokenizer;
}  // namespace moelab
// Loads a checkpoint's parameters (and router biases) into `model`, built from `cfg` (the
// checkpoint's config): its tensors must be exactly this model's, plus AdamW state (ignored).
void load_checkpoint_weights(const moelab::CheckpointReader& ck, const moelab::RunConfig& cfg,
                             moelab::TransformerLM& model, moelab::Backend& b);  // train_cmd.cpp

// A checkpoint's model ready to run (generate, eval): built from `cfg` (the checkpoint's config)
// on backend `backend` ("" = cpu) with the checkpoint's weights, in f32 (f64 for an f64 run: a
// bf16 run's checkpoint holds its fp32 masters), and the run's tokenizer (null: bytes).
struct CheckpointModel {
  std::unique_ptr<moelab::Backend> backend;
  std::unique_ptr<moelab::TransformerLM> model;  // destroyed before its backend
  std::shared_ptr<const moelab::Tokenizer> tokenizer;
};
CheckpointModel load_checkpoint_model(const moelab::CheckpointReader& ck, const moelab::RunConfig& cfg,
                                      const std::string& backend);  // train_cmd.cpp

// `moelab eval --checkpoint PATH [--data FILE.jsonl] [--set ...]`.
struct EvalCliOptions {
  std::string checkpoint;
  std::vector<std::string> sets;  // overrides of the checkpoint's config (data.*, train.batch, ...)
  std::string data;               // task records (JSONL, data.format); "" = validation loss
  std::string backend;            // "" = cpu
  std::string json_out;           // --json FILE: the figures as one JSON object
  std::string per_record;         // --per-record FILE: one JSON line per record
  int64_t samples = 0;            // greedy generations of the first N records
  int64_t max_new = 0;            // tokens per generation; 0 = the reference response's length
};
int run_eval(const EvalCliOptions& opts);  // experiments/eval_cmd.cpp
int run_bench(const moelab::RunConfig& cfg, const BenchCliOptions& opts);  // experiments/bench_cmd.cpp
