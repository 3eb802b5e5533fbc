// moelab: the command line (contract in docs DESIGN.md, "Command line").
//
//   moelab train      --config FILE [--set section.key=value ...] [--out PATH.h5]
//                     [--backend cpu|cuda] [--resume CHECKPOINT | --overwrite] [--jobs N]
//   moelab crosscheck --config FILE [--set ...] [--out PATH.h5] [--overwrite]
//   moelab generate   --checkpoint PATH [--prompt TEXT] [--tokens N]
//   moelab eval       --checkpoint PATH [--data FILE.jsonl] [--set ...] [--json FILE]
//   moelab bench      [moe-layer] [--config FILE] [--set ...] [--backend cpu|cuda] [--iters N]
//                     [--breakdown]
//   moelab config     [--config FILE] [--set ...] [--get KEY] [--keys]
//   moelab import-hf  DIR --out CHECKPOINT [--dtype f32|f64]
//   moelab export-hf  CHECKPOINT --out DIR [--arch NAME] [--layout per_expert|fused]
//   moelab tokenize   --tokenizer PATH --in FILE... [--out FILE | --out-dir DIR] [--decode]
//
// Exit codes: 0 success; 2 usage or config error (moelab::UsageError; `moelab: error: <message>`
// on stderr); 1 any other failure (I/O, disk full, divergence, out of memory, ...).
// --out and --backend are applied as the last overrides (log.out, train.backend), so the
// resolved config, and the HDF5 `config` attribute, show them.
#include <boost/program_options.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <iostream>
#include <string>
#include <vector>

#include "backends/registry.h"
#include "core/backend.h"
#include "core/check.h"
#include "core/io/checkpoint.h"
#include "core/io/config.h"
#include "core/io/fault.h"
#include "core/io/output_file.h"
#include "experiments/commands.h"

namespace po = boost::program_options;
using moelab::Error;
using moelab::RunConfig;

namespace {

const char* kUsage =
    "usage: moelab <command> [options]\n"
    "\n"
    "commands:\n"
    "  train       train a model from a config, writing the HDF5 run log\n"
    "  crosscheck  compare the CUDA backend against the CPU reference\n"
    "  generate    sample text from a checkpoint\n"
    "  eval        a checkpoint's validation loss, or its accuracy on task records (JSONL)\n"
    "  bench       GPU performance benchmarks\n"
    "  config      print the resolved config as INI, one key, or the table of keys\n"
    "  tokenize    encode text to token ids, or decode ids, with a tokenizer.json\n"
    "  import-hf   convert a Hugging Face MoE checkpoint (Mixtral, Qwen2/3-MoE, OLMoE) to moelab's\n"
    "  export-hf   write a moelab checkpoint as a Hugging Face model\n"
    "  help [CMD]  this text, or the options of CMD\n"
    "\n"
    "'moelab CMD --help' lists the options of CMD.\n";

struct Command {
  std::string name;
  std::string synopsis;  // one usage line, shown by --help
  po::options_description options;
};

void add_config_options(po::options_description& d) {
  d.add_options()("config", po::value<std::string>()->value_name("FILE"), "INI config file")(
      "set", po::value<std::vector<std::string>>()->composing()->value_name("SECTION.KEY=VALUE"),
      "override one config key (repeatable); sweep.SECTION.KEY=v1,v2 sets a sweep axis");
}

// Parses argv[2..]; returns false when --help was printed.
bool parse(Command& cmd, int argc, char** argv, po::variables_map& vm) {
  cmd.options.add_options()("help,h", "show this help");
  // Stray words are collected, then reported by name (Boost's own message does not name them).
  po::options_description hidden;
  hidden.add_options()("stray", po::value<std::vector<std::string>>());
  po::options_description all;
  all.add(cmd.options).add(hidden);
  po::positional_options_description pos;
  pos.add("stray", -1);
  try {
    po::store(po::command_line_parser(argc - 1, argv + 1).options(all).positional(pos).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    MOELAB_USAGE_FAIL(cmd.name, ": ", e.what(), " (see 'moelab ", cmd.name, " --help')");
  }
  if (vm.count("stray"))
    MOELAB_USAGE_FAIL(cmd.name, ": unexpected argument '", vm["stray"].as<std::vector<std::string>>()[0],
                "' (see 'moelab ", cmd.name, " --help')");
  if (vm.count("help")) {
    std::cout << "usage: " << cmd.synopsis << "\n\n" << cmd.options << "\n";
    return false;
  }
  return true;
}

std::string opt(const po::variables_map& vm, const char* name) {
  return vm.count(name) ? vm[name].as<std::string>() : std::string();
}

// Loads --config/--set plus the command-line keys that map to config keys.
// Whether `path` is a moelab checkpoint rather than an INI file: format 1 starts with its magic,
// format 2 (safetensors) with an 8-byte header length that fits the file and then '{'. An INI
// file's first 8 bytes read as that length are far larger than the file.
bool is_checkpoint_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char head[9] = {};
  if (!in.read(head, 9)) return false;
  if (std::memcmp(head, moelab::kCheckpointMagic, 8) == 0) return true;
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(head[i]);
  std::error_code ec;
  const uint64_t size = std::filesystem::file_size(path, ec);
  return !ec && n > 0 && n <= size - 8 && head[8] == '{';
}

RunConfig load(const Command& cmd, const po::variables_map& vm, bool config_required,
               const std::vector<std::string>& extra_sets) {
  std::string path = opt(vm, "config");
  if (config_required && path.empty())
    MOELAB_USAGE_FAIL(cmd.name, ": --config FILE is required (for example experiments/configs/quickstart.ini)");
  std::vector<std::string> sets;
  if (vm.count("set")) sets = vm["set"].as<std::vector<std::string>>();
  sets.insert(sets.end(), extra_sets.begin(), extra_sets.end());
  // --config CHECKPOINT: the config stored in a checkpoint (a trained run's, or an imported
  // Hugging Face model's from import-hf), so that bench, crosscheck and train take its model.
  if (!path.empty() && std::filesystem::is_regular_file(path) && is_checkpoint_file(path)) {
    const moelab::CheckpointReader ck(path);
    if (!ck.has_meta("config")) MOELAB_USAGE_FAIL(cmd.name, ": --config ", path, " is a checkpoint without a config");
    RunConfig cfg = moelab::config_from_text(ck.meta("config"), path);
    for (const std::string& s : sets) moelab::apply_override(cfg, s);
    moelab::finalize(cfg);
    return cfg;
  }
  return moelab::load_config(path, sets);
}

// --backend is checked here so that its error names --backend, not the train.backend it sets.
void check_backend_name(const Command& cmd, const std::string& backend) {
  if (!backend.empty() && backend != "cpu" && backend != "cuda")
    MOELAB_USAGE_FAIL(cmd.name, ": --backend '", backend, "' is not one of cpu|cuda");
}

// Refuses before any work starts, rather than after the data is loaded.
void check_backend(const RunConfig& cfg) {
  if (!moelab::backend_available(cfg.train.backend))
    MOELAB_USAGE_FAIL("backend '", cfg.train.backend, "' is not available here: ",
                cfg.train.backend == "cuda"
                    ? "this moelab was built without CUDA (CMake MOELAB_CUDA, needs nvcc) or no "
                      "CUDA device is visible"
                    : "not compiled in",
                "; use --backend cpu");
}

// Before any run starts: every output must be writable without destroying something. Each log
// target must be a regular file (or a link to one, written through); an existing log is
// refused unless --overwrite (a sweep is refused before its first run if any of its logs, or
// its sweep.json, exists), so a rerun can never wipe a finished log at startup.
void check_outputs(const std::vector<moelab::SweepRun>& runs, const TrainCliOptions& cli) {
  namespace fs = std::filesystem;
  std::vector<std::string> existing;
  for (const moelab::SweepRun& run : runs) {
    const std::string target = moelab::resolve_output_target(run.config.log.out, "--out (log.out)");
    std::error_code ec;
    if (fs::exists(target, ec)) existing.push_back(run.config.log.out);
  }
  if (cli.study) {
    const std::string index = sweep_index_path(runs).string();
    moelab::resolve_output_target(index, "sweep index");
    std::error_code ec;
    if (fs::exists(index, ec)) existing.push_back(index);
  }
  if (existing.empty() || cli.overwrite || !cli.resume.empty()) return;
  std::string list;
  for (size_t i = 0; i < existing.size() && i < 5; ++i) list += "\n  " + existing[i];
  if (existing.size() > 5) list += "\n  ... and " + std::to_string(existing.size() - 5) + " more";
  MOELAB_USAGE_FAIL("train: ", existing.size() == 1 ? "this output exists" : "these outputs exist",
                    ", and a new run would replace ", existing.size() == 1 ? "it" : "them", ":", list,
                    "\npass --overwrite to replace ", existing.size() == 1 ? "it" : "them",
                    " (each log only at its run's first flush), --resume CHECKPOINT to continue a run, "
                    "or choose another --out");
}

int cmd_train(int argc, char** argv) {
  Command cmd{"train",
              "moelab train --config FILE [--set section.key=value ...] [--out PATH.h5] "
              "[--backend cpu|cuda] [--resume CHECKPOINT | --overwrite] [--jobs N]",
              po::options_description("train options")};
  add_config_options(cmd.options);
  cmd.options.add_options()("out", po::value<std::string>()->value_name("PATH.h5"),
                            "HDF5 run log (overrides log.out)")(
      "backend", po::value<std::string>()->value_name("cpu|cuda"),
      "compute backend (overrides train.backend)")(
      "resume", po::value<std::string>()->value_name("CHECKPOINT"),
      "continue from a checkpoint (a step_NNNNNN path inside log.checkpoint_dir)")(
      "overwrite",
      "replace an existing log (kept until this run's first flush) and another run's checkpoints "
      "in the checkpoint folder (kept until this run's first checkpoint)")(
      "rank", po::value<int>()->value_name("R"),
      "one process per GPU: this process is rank R (else from mpirun/srun variables)")(
      "world", po::value<int>()->value_name("W"), "one process per GPU: W processes in all")(
      "jobs", po::value<int64_t>()->value_name("N"),
      "a CPU study (a [sweep] or train.seeds): runs at once, each single-threaded (default: "
      "as many as the cores and memory allow; the choice is printed)")(
      "nccl-id", po::value<std::string>()->value_name("FILE"),
      "one process per GPU: the file through which rank 0 shares the NCCL id (fresh per launch, "
      "on a file system all ranks see; default runs/nccl_id.<launcher job id>)");
  po::variables_map vm;
  if (!parse(cmd, argc, argv, vm)) return 0;

  TrainCliOptions cli{opt(vm, "out"), opt(vm, "backend"), opt(vm, "resume"), "", vm.count("overwrite") > 0};
  // One process per GPU: --rank/--world, or a launcher's variables.
  if (vm.count("rank") != vm.count("world"))
    MOELAB_USAGE_FAIL("train: --rank and --world go together");
  if (vm.count("rank")) {
    cli.process = moelab::ProcessRank{vm["rank"].as<int>(), vm["world"].as<int>(), -1, "--rank/--world"};
    if (cli.process->world < 1 || cli.process->rank < 0 || cli.process->rank >= cli.process->world)
      MOELAB_USAGE_FAIL("train: --rank ", cli.process->rank, " must be in [0, --world = ", cli.process->world, ")");
  } else {
    cli.process = moelab::process_rank_from_env();
  }
  if (cli.process) {
    cli.nccl_id = opt(vm, "nccl-id");
    if (cli.nccl_id.empty()) {
      const char* job = std::getenv("SLURM_JOB_ID");
      if (!job) job = std::getenv("OMPI_MCA_ess_base_jobid");
      if (!job) MOELAB_USAGE_FAIL("train: one process per GPU needs --nccl-id FILE (no launcher job id to name one)");
      cli.nccl_id = std::string("runs/nccl_id.") + job;
    }
  } else if (vm.count("nccl-id")) {
    MOELAB_USAGE_FAIL("train: --nccl-id is for one process per GPU (with --rank/--world or a launcher)");
  }
  check_backend_name(cmd, cli.backend);
  std::vector<std::string> extra;
  if (vm.count("out")) extra.push_back("log.out=" + cli.out);
  if (vm.count("backend")) extra.push_back("train.backend=" + cli.backend);
  RunConfig cfg = load(cmd, vm, /*config_required=*/true, extra);

  if (!cli.resume.empty() && !std::filesystem::exists(cli.resume))
    MOELAB_USAGE_FAIL("train: --resume '", cli.resume, "': no such checkpoint");

  if (cli.overwrite && !cli.resume.empty())
    MOELAB_USAGE_FAIL("train: --overwrite and --resume contradict each other (a resume continues "
                      "its log, it never replaces it)");
  std::vector<moelab::SweepRun> runs = moelab::expand_sweep(cfg);
  cli.study = cfg.is_study();
  // A study's run is resumed by narrowing the study to it (its grid point, its seed), so that
  // its name, log and checkpoint folder are the ones it had.
  if (!cli.resume.empty() && runs.size() > 1)
    MOELAB_USAGE_FAIL("train: --resume continues one run, and this config has ", runs.size(),
                      " (a [sweep] or train.seeds); narrow it to the run, e.g. --set "
                      "sweep.router.aux_alpha=0.01 --set train.seeds=3");
  for (const moelab::SweepRun& run : runs) check_backend(run.config);
  if (cli.process && cli.study)
    MOELAB_USAGE_FAIL("train: one process per GPU runs one config, not a [sweep] or train.seeds (launch each run)");
  int64_t jobs = 0;
  if (vm.count("jobs")) {
    jobs = vm["jobs"].as<int64_t>();
    if (jobs < 1) MOELAB_USAGE_FAIL("train: --jobs = ", jobs, " must be >= 1");
    if (!cli.study)
      MOELAB_USAGE_FAIL("train: --jobs is for a study (a [sweep] or train.seeds); this config is one run");
    if (jobs > 1 && cfg.train.backend != "cpu")
      MOELAB_USAGE_FAIL("train: --jobs ", jobs, " runs CPU studies in parallel; a ", cfg.train.backend,
                        " study runs one run at a time (leave --jobs out)");
  }
  // Rank 0 alone writes, so it alone checks (the others would see the log it just created).
  if (!cli.process || cli.process->rank == 0) check_outputs(runs, cli);
  if (!cli.study) return run_train(runs.front().config, cli);
  // A resumed run of a study leaves the study's sweep.json as it is (it lists the finished runs;
  // rewriting it here would list this one alone).
  return run_study(cfg, runs, cli, jobs, /*write_index=*/cli.resume.empty());
}

int cmd_crosscheck(int argc, char** argv) {
  Command cmd{"crosscheck", "moelab crosscheck --config FILE [--set section.key=value ...] [--out PATH.h5] [--overwrite]",
              po::options_description("crosscheck options")};
  add_config_options(cmd.options);
  cmd.options.add_options()("out", po::value<std::string>()->value_name("PATH.h5"),
                            "findings file (default runs/crosscheck.h5; one per sweep run)")(
      "overwrite", "replace an existing findings file");
  po::variables_map vm;
  if (!parse(cmd, argc, argv, vm)) return 0;
  RunConfig cfg = load(cmd, vm, /*config_required=*/true, {});
  CrosscheckCliOptions cc;
  if (vm.count("out")) cc.out = opt(vm, "out");
  cc.overwrite = vm.count("overwrite") > 0;
  const std::vector<moelab::SweepRun> runs = moelab::expand_grid(cfg);  // seeds do not matter here
  int worst = 0;
  for (const moelab::SweepRun& run : runs) {
    CrosscheckCliOptions per_run = cc;
    if (runs.size() > 1) {
      const std::filesystem::path p(cc.out);
      per_run.out = (p.parent_path() / (p.stem().string() + "_" + run.name + p.extension().string())).string();
      std::cout << "moelab: crosscheck of sweep run '" << run.name << "'" << std::endl;
    }
    worst = std::max(worst, run_crosscheck(run.config, per_run));
  }
  return worst;
}

int cmd_generate(int argc, char** argv) {
  Command cmd{"generate", "moelab generate --checkpoint PATH [--prompt TEXT] [--tokens N]",
              po::options_description("generate options")};
  cmd.options.add_options()("checkpoint", po::value<std::string>()->value_name("PATH"),
                            "checkpoint to sample from")(
      "prompt", po::value<std::string>()->value_name("TEXT"), "text to continue (default empty)")(
      "tokens", po::value<int64_t>()->value_name("N"), "tokens to generate (default 200)")(
      "temperature", po::value<double>()->value_name("T"), "sampling temperature > 0 (default 0.8)")(
      "top-k", po::value<int64_t>()->value_name("K"), "sample among the K most likely bytes, 0 = all (default 40)")(
      "seed", po::value<uint64_t>()->value_name("S"), "sampling seed (default 1)");
  po::variables_map vm;
  if (!parse(cmd, argc, argv, vm)) return 0;
  GenerateCliOptions g;
  g.checkpoint = opt(vm, "checkpoint");
  g.prompt = opt(vm, "prompt");
  if (vm.count("tokens")) g.tokens = vm["tokens"].as<int64_t>();
  if (g.checkpoint.empty()) MOELAB_USAGE_FAIL("generate: --checkpoint PATH is required");
  if (!std::filesystem::exists(g.checkpoint))
    MOELAB_USAGE_FAIL("generate: --checkpoint '", g.checkpoint, "': no such checkpoint");
  if (g.tokens < 1) MOELAB_USAGE_FAIL("generate: --tokens = ", g.tokens, " must be >= 1");
  if (vm.count("temperature")) g.temperature = vm["temperature"].as<double>();
  if (vm.count("top-k")) g.top_k = vm["top-k"].as<int64_t>();
  if (vm.count("seed")) g.seed = vm["seed"].as<uint64_t>();
  if (!(g.temperature > 0)) MOELAB_USAGE_FAIL("generate: --temperature = ", g.temperature, " must be > 0");
  if (g.top_k < 0) MOELAB_USAGE_FAIL("generate: --top-k = ", g.top_k, " must be >= 0");
  return run_generate(g);
}

int cmd_eval(int argc, char** argv) {
  Command cmd{"eval",
              "moelab eval --checkpoint PATH [--data FILE.jsonl] [--set section.key=value ...] "
              "[--backend cpu|cuda] [--json FILE] [--per-record FILE] [--samples N] [--max-new N]",
              po::options_description("eval options")};
  cmd.options.add_options()("checkpoint", po::value<std::string>()->value_name("PATH"),
                            "checkpoint to evaluate (its config, with --set applied, says the data)")(
      "data", po::value<std::string>()->value_name("FILE"),
      "task records (JSONL in data.format): teacher-forced token accuracy, exact match and loss over "
      "the responses; without it: the validation loss of the config's data")(
      "set", po::value<std::vector<std::string>>()->composing()->value_name("SECTION.KEY=VALUE"),
      "override a key of the checkpoint's config (data.genres, data.format, data.chat_template, "
      "train.batch, ...); repeatable")(
      "backend", po::value<std::string>()->value_name("cpu|cuda"), "compute backend (default cpu)")(
      "json", po::value<std::string>()->value_name("FILE"), "also write the figures as one JSON object")(
      "per-record", po::value<std::string>()->value_name("FILE"),
      "with --data: one JSON line per record (line, tokens, correct, exact, loss, teacher-forced prediction)")(
      "samples", po::value<int64_t>()->value_name("N"), "with --data: greedy generations of the first N records")(
      "max-new", po::value<int64_t>()->value_name("N"),
      "tokens per generation (default: the reference response's length)");
  po::variables_map vm;
  if (!parse(cmd, argc, argv, vm)) return 0;
  EvalCliOptions e;
  e.checkpoint = opt(vm, "checkpoint");
  if (e.checkpoint.empty()) MOELAB_USAGE_FAIL("eval: --checkpoint PATH is required");
  if (!std::filesystem::is_regular_file(e.checkpoint))
    MOELAB_USAGE_FAIL("eval: --checkpoint '", e.checkpoint, "': no such checkpoint");
  e.data = opt(vm, "data");
  if (!e.data.empty() && !std::filesystem::is_regular_file(e.data))
    MOELAB_USAGE_FAIL("eval: --data '", e.data, "': no such file");
  if (vm.count("set")) e.sets = vm["set"].as<std::vector<std::string>>();
  e.backend = opt(vm, "backend");
  check_backend_name(cmd, e.backend);
  if (!e.backend.empty() && !moelab::backend_available(e.backend))
    MOELAB_USAGE_FAIL("eval: --backend ", e.backend, " is not available here");
  e.json_out = opt(vm, "json");
  e.per_record = opt(vm, "per-record");
  if (vm.count("samples")) e.samples = vm["samples"].as<int64_t>();
  if (vm.count("max-new")) e.max_new = vm["max-new"].as<int64_t>();
  if (e.samples < 0) MOELAB_USAGE_FAIL("eval: --samples = ", e.samples, " must be >= 0");
  if (e.max_new < 0) MOELAB_USAGE_FAIL("eval: --max-new = ", e.max_new, " must be >= 0");
  if (e.data.empty() && (e.samples > 0 || !e.per_record.empty()))
    MOELAB_USAGE_FAIL("eval: --samples and --per-record need --data FILE.jsonl");
  return run_eval(e);
}

int cmd_bench(int argc_in, char** argv_in) {
  // `moelab bench moe-layer ...`: the MoE layer alone; the word is taken out before parsing.
  std::vector<char*> args(argv_in, argv_in + argc_in);
  const bool moe_layer = args.size() > 2 && std::string(args[2]) == "moe-layer";
  if (moe_layer) args.erase(args.begin() + 2);
  const int argc = int(args.size());
  char** argv = args.data();
  Command cmd{"bench",
              "moelab bench [moe-layer] [--config FILE] [--set section.key=value ...] [--backend cpu|cuda] "
              "[--iters N] [--warmup N] [--breakdown]",
              po::options_description("bench options")};
  add_config_options(cmd.options);
  cmd.options.add_options()("backend", po::value<std::string>()->value_name("cpu|cuda"),
                            "compute backend (overrides train.backend)")(
      "iters", po::value<int64_t>()->value_name("N"), "timed iterations (default 20)")(
      "warmup", po::value<int64_t>()->value_name("N"),
      "untimed steps before the timed ones (default 3): the routing gives cuBLAS new expert "
      "shapes in the first steps, whose kernel lookups cost host time")(
      "breakdown", po::bool_switch(),
      "after the timing, profile --iters more steps and print the median milliseconds per phase "
      "(router, permute, experts, attention, norms, optimizer, ...; GPU times from CUDA events) "
      "and the host syncs per step");
  po::variables_map vm;
  if (!parse(cmd, argc, argv, vm)) return 0;
  BenchCliOptions b;
  b.moe_layer = moe_layer;
  b.breakdown = vm["breakdown"].as<bool>();
  b.backend = opt(vm, "backend");
  check_backend_name(cmd, b.backend);
  if (vm.count("iters")) b.iters = vm["iters"].as<int64_t>();
  if (b.iters < 1) MOELAB_USAGE_FAIL("bench: --iters = ", b.iters, " must be >= 1");
  if (vm.count("warmup")) b.warmup = vm["warmup"].as<int64_t>();
  if (b.warmup < 0) MOELAB_USAGE_FAIL("bench: --warmup = ", b.warmup, " must be >= 0");
  std::vector<std::string> extra;
  if (!b.backend.empty()) extra.push_back("train.backend=" + b.backend);
  RunConfig cfg = load(cmd, vm, /*config_required=*/false, extra);
  for (const moelab::SweepRun& run : moelab::expand_grid(cfg)) check_backend(run.config);
  return run_bench(cfg, b);
}

int cmd_config(int argc, char** argv) {
  Command cmd{"config", "moelab config [--config FILE] [--set section.key=value ...] [--get KEY] [--keys]",
              po::options_description("config options")};
  add_config_options(cmd.options);
  cmd.options.add_options()("get", po::value<std::string>()->value_name("KEY"),
                            "print only this key's resolved value (e.g. log.out)")(
      "keys", "print every key with its default, accepted values and meaning (Markdown)");
  po::variables_map vm;
  if (!parse(cmd, argc, argv, vm)) return 0;
  if (vm.count("keys")) {
    std::cout << moelab::config_keys_markdown();
    return 0;
  }
  RunConfig cfg = load(cmd, vm, /*config_required=*/false, {});
  if (vm.count("get")) {
    std::cout << moelab::get_value(cfg, opt(vm, "get")) << "\n";
    return 0;
  }
  std::cout << moelab::to_ini(cfg);
  if (cfg.is_study()) {
    std::vector<moelab::SweepRun> runs = moelab::expand_sweep(cfg);
    std::cout << "\n# sweep: " << runs.size() << " runs";
    if (!cfg.train.seeds.empty())
      std::cout << " (" << runs.size() / cfg.train.seeds.size() << " grid points x " << cfg.train.seeds.size()
                << " seeds, seeds outermost)";
    std::cout << "\n";
    for (const moelab::SweepRun& r : runs) std::cout << "#   " << r.name << " -> " << r.config.log.out << "\n";
  }
  return 0;
}

int cmd_tokenize(int argc, char** argv) {
  Command cmd{"tokenize",
              "moelab tokenize --tokenizer PATH --in FILE [--in FILE ...] [--out FILE | --out-dir DIR] "
              "[--decode] [--invalid-utf8 refuse|replace] [--info]",
              po::options_description("tokenize options")};
  cmd.options.add_options()("tokenizer", po::value<std::string>()->value_name("PATH"),
                            "tokenizer.json, GPT-2's encoder.json (vocab.bpe beside it), or a folder holding them")(
      "in", po::value<std::vector<std::string>>()->composing()->value_name("FILE"),
      "a text to encode (with --decode: a file of ids); repeatable")(
      "out", po::value<std::string>()->value_name("FILE"),
      "write here instead of stdout (encode: one line of ids per input)")(
      "out-dir", po::value<std::string>()->value_name("DIR"),
      "one output per input: DIR/<name>.ids (encode) or DIR/<name>.txt (decode)")(
      "decode", "decode ids to bytes")(
      "invalid-utf8", po::value<std::string>()->value_name("refuse|replace"),
      "invalid UTF-8 in a text: refuse naming the byte offset (default) or replace by U+FFFD")(
      "info", "print the tokenizer's summary and vocabulary size, then exit");
  po::variables_map vm;
  if (!parse(cmd, argc, argv, vm)) return 0;
  TokenizeCliOptions t;
  t.tokenizer = opt(vm, "tokenizer");
  if (t.tokenizer.empty()) MOELAB_USAGE_FAIL("tokenize: --tokenizer PATH is required (for example data/tokenizers/qwen3/tokenizer.json)");
  if (vm.count("in")) t.inputs = vm["in"].as<std::vector<std::string>>();
  t.out = opt(vm, "out");
  t.out_dir = opt(vm, "out-dir");
  t.decode = vm.count("decode") > 0;
  t.info = vm.count("info") > 0;
  const std::string inv = opt(vm, "invalid-utf8");
  if (!inv.empty() && inv != "refuse" && inv != "replace")
    MOELAB_USAGE_FAIL("tokenize: --invalid-utf8 '", inv, "' is not one of refuse|replace");
  t.replace_invalid = inv == "replace";
  if (!t.out.empty() && !t.out_dir.empty()) MOELAB_USAGE_FAIL("tokenize: give --out or --out-dir, not both");
  if (t.inputs.empty() && !t.info) MOELAB_USAGE_FAIL("tokenize: --in FILE is required");
  return run_tokenize(t);
}

// `moelab CMD OPERAND --opt ...`: the operand (the first word after CMD, if it is not an option)
// becomes `as_option OPERAND`, so that the option parser sees only options.
std::vector<char*> take_first_operand(int argc, char** argv, const char* as_option) {
  std::vector<char*> args(argv, argv + argc);
  if (argc > 2 && argv[2][0] != '-') {
    static std::string opt_name;
    opt_name = as_option;
    args.insert(args.begin() + 2, opt_name.data());
  }
  return args;
}

int cmd_import_hf(int argc, char** argv) {
  Command cmd{"import-hf", "moelab import-hf DIR --out CHECKPOINT [--dtype f32|f64] [--overwrite]",
              po::options_description("import-hf options")};
  cmd.options.add_options()("dir", po::value<std::string>()->value_name("DIR"),
                            "the Hugging Face model folder (config.json, model.safetensors or shards)")(
      "out", po::value<std::string>()->value_name("CHECKPOINT"), "the moelab checkpoint to write")(
      "dtype", po::value<std::string>()->value_name("f32|f64"), "master weights (default f32)")(
      "overwrite", "replace an existing --out");
  std::vector<char*> args = take_first_operand(argc, argv, "--dir");
  po::variables_map vm;
  if (!parse(cmd, int(args.size()), args.data(), vm)) return 0;
  ImportHfCliOptions o;
  o.dir = opt(vm, "dir");
  o.out = opt(vm, "out");
  if (o.dir.empty()) MOELAB_USAGE_FAIL("import-hf: DIR is required (a folder with config.json and safetensors)");
  if (o.out.empty()) MOELAB_USAGE_FAIL("import-hf: --out CHECKPOINT is required");
  const std::string dt = opt(vm, "dtype");
  if (!dt.empty() && dt != "f32" && dt != "f64") MOELAB_USAGE_FAIL("import-hf: --dtype '", dt, "' is not one of f32|f64");
  o.f64 = dt == "f64";
  o.overwrite = vm.count("overwrite") > 0;
  return run_import_hf(o);
}

int cmd_export_hf(int argc, char** argv) {
  Command cmd{"export-hf",
              "moelab export-hf CHECKPOINT --out DIR [--arch NAME] [--layout per_expert|fused] "
              "[--dtype F32|BF16|F64] [--shard-size BYTES] [--overwrite]",
              po::options_description("export-hf options")};
  cmd.options.add_options()("checkpoint", po::value<std::string>()->value_name("CHECKPOINT"),
                            "a moelab checkpoint (trained, or from import-hf)")(
      "out", po::value<std::string>()->value_name("DIR"), "the folder to write config.json and safetensors into")(
      "arch", po::value<std::string>()->value_name("NAME"),
      "MixtralForCausalLM | Qwen2MoeForCausalLM | Qwen3MoeForCausalLM | OlmoeForCausalLM (default: the imported one)")(
      "layout", po::value<std::string>()->value_name("per_expert|fused"),
      "experts one tensor each, or fused gate_up_proj/down_proj (default: as imported, else per_expert)")(
      "dtype", po::value<std::string>()->value_name("F32|BF16|F64"),
      "tensor dtype (default: each tensor's original dtype, else the model's)")(
      "shard-size", po::value<uint64_t>()->value_name("BYTES"), "largest shard (default 5e9)")(
      "overwrite", "replace existing files in DIR");
  std::vector<char*> args = take_first_operand(argc, argv, "--checkpoint");
  po::variables_map vm;
  if (!parse(cmd, int(args.size()), args.data(), vm)) return 0;
  ExportHfCliOptions o;
  o.checkpoint = opt(vm, "checkpoint");
  o.out = opt(vm, "out");
  o.arch = opt(vm, "arch");
  o.layout = opt(vm, "layout");
  o.dtype = opt(vm, "dtype");
  if (o.checkpoint.empty()) MOELAB_USAGE_FAIL("export-hf: CHECKPOINT is required");
  if (o.out.empty()) MOELAB_USAGE_FAIL("export-hf: --out DIR is required");
  if (!std::filesystem::exists(o.checkpoint)) MOELAB_USAGE_FAIL("export-hf: '", o.checkpoint, "': no such checkpoint");
  if (!o.dtype.empty() && o.dtype != "F32" && o.dtype != "BF16" && o.dtype != "F64")
    MOELAB_USAGE_FAIL("export-hf: --dtype '", o.dtype, "' is not one of F32|BF16|F64");
  if (vm.count("shard-size")) {
    o.shard_bytes = vm["shard-size"].as<uint64_t>();
    if (o.shard_bytes == 0) MOELAB_USAGE_FAIL("export-hf: --shard-size must be > 0");
  }
  o.overwrite = vm.count("overwrite") > 0;
  return run_export_hf(o);
}

int dispatch(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsage;
    return 2;
  }
  std::string sub = argv[1];
  if (sub == "help" || sub == "--help" || sub == "-h") {
    if (sub == "help" && argc > 2) {
      // `moelab help train` = `moelab train --help`.
      char help_flag[] = "--help";
      char* args[] = {argv[0], argv[2], help_flag};
      return dispatch(3, args);
    }
    std::cout << kUsage;
    return 0;
  }
  if (sub == "train") return cmd_train(argc, argv);
  if (sub == "crosscheck") return cmd_crosscheck(argc, argv);
  if (sub == "generate") return cmd_generate(argc, argv);
  if (sub == "eval") return cmd_eval(argc, argv);
  if (sub == "bench") return cmd_bench(argc, argv);
  if (sub == "config") return cmd_config(argc, argv);
  if (sub == "tokenize") return cmd_tokenize(argc, argv);
  if (sub == "import-hf") return cmd_import_hf(argc, argv);
  if (sub == "export-hf") return cmd_export_hf(argc, argv);
  MOELAB_USAGE_FAIL("unknown command '", sub,
              "' (commands: train, crosscheck, generate, eval, bench, config, tokenize, import-hf, export-hf, help)");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return dispatch(argc, argv);
  } catch (const moelab::UsageError& e) {
    std::cerr << "moelab: error: " << e.what() << "\n";
    return 2;
  } catch (const std::bad_alloc&) {
    std::cerr << "moelab: error: out of memory (std::bad_alloc) outside any sized allocation "
                 "moelab checks; reduce the model or batch size\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "moelab: error: " << e.what() << "\n";
    return 1;
  }
}
