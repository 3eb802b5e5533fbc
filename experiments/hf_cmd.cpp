// moelab: `moelab import-hf` and `moelab export-hf` - Hugging Face checkpoints to and from
// moelab checkpoints (core/io/hf_convert.h; docs/hf-import.md).
//
// import-hf DIR --out CHECKPOINT: DIR holds config.json and model.safetensors (or shards with
// model.safetensors.index.json). The checkpoint holds the weights (f32 masters, or f64 with
// --dtype f64), the moelab config, a new run id and step 0, plus what export needs to write the
// original back: the architecture, the expert layout, each tensor's original dtype and the
// original config.json. It is a training state without optimizer state: `generate`, `train`
// with train.init_from, `crosscheck`-style loading all read it; `--resume` refuses it.
//
// export-hf CHECKPOINT --out DIR: writes config.json and safetensors. An imported checkpoint
// goes back as its architecture, layout and dtypes; any moelab checkpoint goes out with --arch.
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "core/check.h"
#include "core/io/checkpoint.h"
#include "core/io/hf_convert.h"
#include "core/io/json_strict.h"
#include "core/io/output_file.h"
#include "core/trainer.h"
#include "experiments/commands.h"

using namespace moelab;
namespace fs = std::filesystem;

int run_import_hf(const ImportHfCliOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  if (!o.overwrite && fs::exists(o.out))
    MOELAB_USAGE_FAIL("import-hf: --out ", o.out, " exists (pass --overwrite to replace it)");
  const HfConfig hf = read_hf_config(o.dir);
  RunConfig cfg = run_config_from_hf(hf);
  if (o.f64) cfg.model.dtype = DType::F64;
  const ShardedSafetensorsReader st(o.dir);
  const DType master = o.f64 ? DType::F64 : DType::F32;
  HfWeights w = read_hf_weights(st, hf, master);
  const double read_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  CheckpointWriter ck;
  ck.set_meta("kind", kCheckpointKind);
  ck.set_meta("step", "0");
  ck.set_meta("config", to_ini(cfg));
  ck.set_meta("moelab_version", kVersion);
  ck.set_meta("run_id", new_run_id());
  ck.set_meta("origin", "import-hf " + fs::absolute(o.dir).string());
  ck.set_meta("hf_arch", to_string(hf.arch));
  ck.set_meta("hf_layout", to_string(w.layout));
  nlohmann::ordered_json dt(w.source_dtypes);
  ck.set_meta("hf_source_dtypes", dt.dump());
  ck.set_meta("hf_dtype", hf.dtype);
  // By reference: the converted weights are held once (the source pages were released as each
  // tensor was converted), so the import peaks near the size of the checkpoint it writes.
  for (const auto& [name, t] : w.params) ck.add_tensor_ref(name, t);
  ck.write(o.out);
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int64_t n = 0;
  for (const auto& p : w.params) n += p.second.numel();
  std::printf("import-hf: %s (%s experts, %s) -> %s\n", to_string(hf.arch), to_string(w.layout),
              hf.dtype.empty() ? "dtype unstated" : hf.dtype.c_str(), o.out.c_str());
  std::printf("import-hf: %lld parameters in %zu tensors; read %.3f GB in %.2f s (%.2f GB/s), %.2f s in all\n",
              (long long)n, w.params.size(), w.bytes_read / 1e9, read_s, w.bytes_read / 1e9 / read_s, total_s);
  if (!hf.defaulted.empty()) {
    std::string keys;
    for (const std::string& k : hf.defaulted) keys += (keys.empty() ? "" : ", ") + k;
    std::printf("import-hf: config.json lacks %s: transformers' defaults used\n", keys.c_str());
  }
  return 0;
}

int run_export_hf(const ExportHfCliOptions& o) {
  const CheckpointReader ck(o.checkpoint);
  if (!ck.has_meta("config")) MOELAB_USAGE_FAIL("export-hf: ", o.checkpoint, " carries no config");
  const RunConfig cfg = config_from_text(ck.meta("config"), o.checkpoint);
  std::string arch_name = o.arch;
  if (arch_name.empty() && ck.has_meta("hf_arch")) arch_name = ck.meta("hf_arch");
  if (arch_name.empty())
    MOELAB_USAGE_FAIL("export-hf: ", o.checkpoint, " was not imported from Hugging Face: give --arch "
                      "(MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM or OlmoeForCausalLM)");
  const HfArch arch = hf_arch_from(arch_name);
  HfConfig hf = hf_config_for(cfg, arch);
  const bool same_arch = ck.has_meta("hf_arch") && ck.meta("hf_arch") == to_string(arch);
  if (same_arch && ck.has_meta("hf_dtype")) hf.dtype = ck.meta("hf_dtype");
  if (!o.dtype.empty())
    hf.dtype = o.dtype == "BF16" ? "bfloat16" : o.dtype == "F64" ? "float64" : "float32";

  std::string layout_name = o.layout;
  if (layout_name.empty()) layout_name = same_arch && ck.has_meta("hf_layout") ? ck.meta("hf_layout") : "per_expert";
  const HfExpertLayout layout = hf_expert_layout_from(layout_name);

  // Each tensor in its original dtype (imported checkpoints), else --dtype, else the model's.
  std::map<std::string, std::string> dtypes;
  if (same_arch && o.dtype.empty() && ck.has_meta("hf_source_dtypes")) {
    const nlohmann::json j = parse_json_strict(ck.meta("hf_source_dtypes"), o.checkpoint + " meta hf_source_dtypes");
    for (auto it = j.begin(); it != j.end(); ++it) dtypes[it.key()] = it.value().get<std::string>();
  }
  const std::string def = !o.dtype.empty() ? o.dtype
                          : cfg.model.dtype == DType::BF16 ? "BF16" : cfg.model.dtype == DType::F64 ? "F64" : "F32";

  std::map<std::string, Tensor> params;
  for (const std::string& name : ck.names()) {
    if (!ck.is_tensor(name) || name.rfind("adam.", 0) == 0) continue;
    if (name.rfind("router_bias.", 0) == 0) continue;  // zero unless bias_update_rate > 0 (refused)
    params[name] = ck.tensor(name, ck.tensor_shape(name), ck.tensor_dtype(name));
  }
  const std::vector<std::string> files =
      write_hf_checkpoint(o.out, hf, params, layout, dtypes, def, o.shard_bytes, o.overwrite);
  std::printf("export-hf: %s as %s (%s experts) -> %s (%zu files)\n", o.checkpoint.c_str(), to_string(arch),
              to_string(layout), o.out.c_str(), files.size());
  return 0;
}
