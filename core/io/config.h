// moelab: the run configuration (INI file + `--set section.key=value` overrides).
//
// One table of keys (config_keys()) is the single source of truth: it parses, validates, prints
// (to_ini) and documents (`moelab config --keys`) every key, so they cannot drift apart.
// Invariants:
//   - every key has a default; a file and --set only override, and nothing is silently ignored:
//     an unknown section or key, a duplicate key in one file, or a bad value throws
//     moelab::Error naming the key and the accepted values;
//   - to_ini(load_config(...)) round-trips: loading its text gives back the same RunConfig;
//   - [sweep] lines `section.key = v1, v2, ...` are axes; expand_sweep() returns one resolved
//     RunConfig per grid point (first axis varies slowest) and seed (train.seeds, slowest of
//     all), each with an empty sweep and no seeds.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/moe/config.h"
#include "core/tensor.h"

namespace moelab {

// [model], beyond the MoE layer's own keys (d_model, experts, top_k, d_expert, shared_experts,
// shared_gate, expert_dropout live in RunConfig::moe but are spelled model.* in the INI).
struct ModelConfig {
  int64_t layers = 2;            // model.layers: transformer blocks
  int64_t heads = 4;             // model.heads: attention heads (d_model % heads == 0)
  int64_t kv_heads = 0;          // model.kv_heads: grouped-query KV heads; 0 = same as heads
                                 // (load_config/expand_sweep resolve 0 to heads)
  int64_t moe_every = 2;         // model.moe_every: block i is MoE when i % N == N - 1 (1 = all,
                                 // 0 = dense model)
  int64_t d_ff = 0;              // model.d_ff: dense FFN width; 0 = top_k * d_expert
  int64_t vocab = 256;           // model.vocab: byte-level by default
  bool tie_embeddings = true;    // model.tie_embeddings: output head shares the embedding
  double init_scale = 1.0;       // model.init_scale: multiplies the default init std
                                 // (Switch recommends 0.1 for stability)
  DType dtype = DType::F32;      // model.dtype: f32 | f64 | bf16 (bf16: CUDA only); parsed once,
                                 // here, from its to_string() spelling
  // Features of imported architectures (issue 11; docs/hf-import.md):
  int64_t head_dim = 0;          // model.head_dim: per-head width; 0 = d_model / heads
  bool qkv_bias = false;         // model.qkv_bias: biases on the q, k, v projections (Qwen2-MoE)
  QkNorm qk_norm = QkNorm::None; // model.qk_norm: none | head (Qwen3-MoE) | projection (OLMoE)
  std::vector<int64_t> dense_layers;  // model.dense_layers: blocks forced dense (Qwen's
                                      // mlp_only_layers), on top of moe_every
  double rope_theta = 10000.0;   // model.rope_theta: rotary base
  double norm_eps = 1e-5;        // model.norm_eps: RMSNorm epsilon
  bool is_moe_block(int64_t i) const;
  int64_t moe_block_count() const;
  int64_t head_width(int64_t d_model) const { return head_dim > 0 ? head_dim : d_model / heads; }
};

// Which targets bear loss (train.loss_on): every token's, or, for SFT records, only the tokens
// of the responses (the answer-only loss).
enum class LossOn { All, Response };
// What a bad JSONL record does (data.bad_records): stop the run naming its line, or skip it and
// count it (the count is printed and logged).
enum class BadRecords { Stop, Skip };
// The records of a JSONL file (data.format): {"prompt": ..., "response": ...}; chat-style
// {"messages": [{"role": ..., "content": ...}, ...]} rendered with data.chat_template; or token
// ids {"prompt_ids": [...], "response_ids": [...]}.
enum class RecordFormat { PromptResponse, Messages, Tokens };
const char* to_string(LossOn v);
const char* to_string(BadRecords v);
const char* to_string(RecordFormat v);

// data.chat_template with its escapes decoded: \n newline, \t tab, \\ backslash, \xHH any byte
// (\x23 is '#', which an INI value cannot hold; \x20 a leading or trailing space). Throws
// moelab::UsageError naming the key for a bad escape, or when {content} is not there exactly once.
std::string decode_chat_template(const std::string& text);

// [train]
struct TrainConfig {
  int64_t steps = 100;           // train.steps: optimizer steps
  int64_t batch = 8;             // train.batch: sequences per step
  int64_t grad_accum = 1;        // train.grad_accum: micro-batches per step
  int64_t seq = 64;              // train.seq: tokens per sequence (T = batch * seq)
  double lr = 3e-4;              // train.lr: peak learning rate
  int64_t warmup = 10;           // train.warmup: linear warm-up steps
  uint64_t seed = 1234;          // train.seed (one run; see seeds)
  std::vector<uint64_t> seeds;   // train.seeds: every grid point runs once per seed, train.seed
                                 // taking each value in turn; empty = one run with train.seed.
                                 // Setting train.seed clears it, setting it replaces train.seed
                                 // (both in one file is an error); to_ini prints the one in effect
  double weight_decay = 0.1;     // train.weight_decay: AdamW decoupled decay
  double grad_clip = 1.0;        // train.grad_clip: global-norm clip; 0 = off
  double beta1 = 0.9;            // train.beta1: AdamW
  double beta2 = 0.95;           // train.beta2: AdamW
  double min_lr_ratio = 0.1;     // train.min_lr_ratio: cosine decay floor = lr * ratio
  std::string backend = "cpu";   // train.backend: cpu | cuda
  LossOn loss_on = LossOn::All;  // train.loss_on: all | response (answer-only, JSONL records)
  Recompute recompute = Recompute::None;  // train.recompute: none | mlp | attention | all
  std::string init_from;         // train.init_from: a moelab checkpoint whose weights start the
                                 // run (new schedule, optimizer state and step count); "" = init
};

// [data]
struct DataConfig {
  std::string source = "synthetic";  // data.source: brown | synthetic (no download needed)
  std::string path = "data/brown";   // data.path: Brown corpus folder (`make data`)
  std::string tokenizer = "bytes";   // data.tokenizer: bytes | a tokenizer.json, GPT-2 encoder.json
                                     // (vocab.bpe beside it) or a folder (core/io/tokenizer.h)
  int64_t synthetic_sources = 4;     // data.synthetic_sources: K latent sources in the mixture
  int64_t synthetic_alphabet = 16;   // data.synthetic_alphabet: symbols per source
  double val_fraction = 0.1;         // data.val_fraction: held out for evaluation
  std::string genres = "all";        // data.genres: Brown genres (letters a-r, ranges "a-j",
                                     // comma lists "a,c,k-r") or all (brown_genres())
  // data.source = jsonl: SFT records, one JSON object per line, from data.path.
  std::string val_path;              // data.val_path: validation records; "" = every record i of
                                     // data.path that brown_is_validation(i, val_fraction) picks
  RecordFormat format = RecordFormat::PromptResponse;  // data.format
  std::string chat_template = "{content}";  // data.chat_template, escapes undecoded
                                            // (decode_chat_template); {role}, {content}
  bool pack = true;                  // data.pack: several records per sequence
  BadRecords bad_records = BadRecords::Stop;  // data.bad_records: stop | skip
};

// [log]
struct LogConfig {
  int64_t every = 1;                             // log.every: log every N steps
  int64_t eval_every = 50;                       // log.eval_every: 0 = never
  int64_t eval_batches = 4;                      // log.eval_batches: batches per evaluation
  int64_t checkpoint_every = 0;                  // log.checkpoint_every: 0 = never
  std::string checkpoint_dir;                    // log.checkpoint_dir; "" = checkpoint_dir_of()
  std::string out = "runs/moelab.h5";            // log.out: HDF5 run log (--out overrides)
  int64_t flush_every = 10;                      // log.flush_every: flush the log every N steps
};

// [parallel]: the ranks of one run. world = ep * dp ranks, rank = dp_index * ep + ep_index.
// The global batch (train.batch sequences) is split, whole sequences, over all ranks; experts
// are sharded over the ep ranks of an expert-parallel group and replicated over dp such groups.
struct ParallelConfig {
  int64_t ep = 1;  // parallel.ep: expert-parallel ranks (divides model.experts)
  int64_t dp = 1;  // parallel.dp: data-parallel replicas of each expert shard
  bool overlap_grad_reduce = true;  // parallel.overlap_grad_reduce: reduce during the backward pass
  int64_t world() const { return ep * dp; }
};

// One [sweep] line: `key = v1, v2, ...`; values are kept in canonical text form.
struct SweepAxis {
  std::string key;                  // e.g. "router.aux_alpha"
  std::vector<std::string> values;  // e.g. {"0", "0.001", "0.01"}
};

struct RunConfig {
  ModelConfig model;
  MoEConfig moe;  // [model] d_model, experts, top_k, d_expert, shared_*, expert_dropout; [router]
  TrainConfig train;
  DataConfig data;
  LogConfig log;
  ParallelConfig parallel;
  std::vector<SweepAxis> sweep;  // [sweep], in file order (then --set order)
  std::string sweep_baseline;    // [sweep] baseline = NAME: the grid point the analysis compares
                                 // the others with (a run name without its seed); "" = none
  // More than one run, or a seeded one: the runs get names, per-run logs and a sweep.json.
  bool is_study() const { return !sweep.empty() || !train.seeds.empty(); }
};

// Loads `path` (empty = defaults only), then applies `set_overrides` ("section.key=value",
// "sweep.section.key=v1,v2" adds/replaces an axis), then checks cross-key invariants.
// Without a sweep the result is resolved (kv_heads 0 -> heads); with one, every grid point is
// checked here and the base is returned unresolved (call expand_sweep).
// Throws moelab::Error naming the key, the value, the accepted values and the origin.
RunConfig load_config(const std::string& path, const std::vector<std::string>& set_overrides = {});

// Parses resolved INI text (what to_ini writes, e.g. a checkpoint's config); `origin` names it
// in error messages. No sweep expansion.
RunConfig config_from_text(const std::string& ini, const std::string& origin = "checkpoint config");

// Applies one "section.key=value" override (same rules as --set); useful in code and tests.
void apply_override(RunConfig& cfg, const std::string& assignment);

// Resolves derived defaults (kv_heads) and checks cross-key invariants; idempotent.
void finalize(RunConfig& cfg);

struct SweepRun {
  std::string name;   // "base" for a lone run, else e.g. "aux_alpha=0.001_top_k=2", with
                      // train.seeds "aux_alpha=0.001_top_k=2_seed=3" (no sweep: "seed=3")
  std::string point;  // the grid point: name without "_seed=S" ("" for a seeded run without a
                      // sweep, "base" for a lone run)
  bool seeded = false;  // from train.seeds; the seed is config.train.seed
  std::vector<std::string> values;  // per [sweep] axis, this run's value (a variant: its name)
  RunConfig config;   // resolved, sweep and seeds empty; log.out and log.checkpoint_dir per run
};

// The cartesian product of the axes, first axis slowest (nested loops in file order), run once
// per seed of train.seeds with the seeds outermost (the whole grid of the first seed, then of
// the second, ...: an interrupted study holds complete seeds). Per run: log.out "dir/x.h5" ->
// "dir/x_<name>.h5", log.checkpoint_dir "d" -> "d/<name>", so runs never overwrite each other.
// No sweep and no seeds: one run named "base", paths unchanged. Refuses (naming both) two runs
// whose names collide, and a sweep.baseline that is no grid point.
std::vector<SweepRun> expand_sweep(const RunConfig& cfg);

// The grid points alone, each once with train.seed = the first of train.seeds (or train.seed):
// for commands where the seed does not matter (bench, crosscheck). Names and paths are those of
// expand_sweep without the seed.
std::vector<SweepRun> expand_grid(const RunConfig& cfg);

// The fully resolved config as INI text: every key, sections in the order model, router,
// train, data, log, then sweep (only when it has axes). load_config round-trips it.
std::string to_ini(const RunConfig& cfg);

// Reads one key as text (the form to_ini writes); throws on an unknown key.
std::string get_value(const RunConfig& cfg, const std::string& key);

// The Brown genres (letters 'a'..'r') that data.genres selects, sorted, without repeats. Throws
// moelab::UsageError naming data.genres for a bad spec or an empty selection.
std::string brown_genres(const std::string& spec);

// The checkpoint folder of a run: log.checkpoint_dir, or when that is empty (the default) the
// folder beside log.out named after it: "runs/x.h5" -> "runs/x_checkpoints". Deriving it from
// the log keeps two runs with different --out from sharing (and overwriting) checkpoints.
std::string checkpoint_dir_of(const RunConfig& cfg);

// The key table, in to_ini order.
struct ConfigKey {
  std::string key;       // "section.name"
  std::string accepted;  // human text: "softmax|sigmoid", "integer >= 1", "number in [0, 1)"
  std::string help;      // one line
  std::function<std::string(const RunConfig&)> get;
  // Parses and range-checks `value`; throws moelab::Error naming the key (origin is appended).
  std::function<void(RunConfig&, const std::string& value)> set;
};
const std::vector<ConfigKey>& config_keys();

// A Markdown table of every key with its default, accepted values and meaning.
std::string config_keys_markdown();

}  // namespace moelab
