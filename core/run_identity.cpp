// moelab: run identity checks (see run_identity.h).
#include "core/run_identity.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/check.h"
#include "core/io/checkpoint.h"
#include "core/io/fault.h"

namespace fs = std::filesystem;

namespace moelab {

bool resume_may_change(const std::string& key) {
  static const std::set<std::string> safe = {
      "train.steps",  "train.lr",          "train.warmup",       "train.min_lr_ratio",
      "train.weight_decay", "train.grad_clip", "train.beta1",    "train.beta2",
      "train.backend", "router.aux_alpha", "router.aux_loss_type", "router.z_loss",
      "router.importance_weight", "router.load_weight", "router.bias_update_rate", "router.balance_scope", "train.grad_accum", "data.path",
      "train.init_from",   // init_from: read at step 0 only
      "train.recompute"};  // the same results, less memory
  // parallel.*: a checkpoint holds whole tensors, so it loads at any layout that divides it.
  return safe.count(key) || key.rfind("log.", 0) == 0 || key.rfind("parallel.", 0) == 0;
}

std::vector<ConfigChange> check_resume_config(const RunConfig& saved, const RunConfig& now,
                                              const std::string& checkpoint) {
  std::vector<ConfigChange> safe;
  std::ostringstream refused;
  int n_refused = 0;
  for (const ConfigKey& k : config_keys()) {
    const std::string a = k.get(saved), b = k.get(now);
    if (a == b) continue;
    if (resume_may_change(k.key)) {
      safe.push_back({k.key, a, b});
    } else {
      refused << "\n  " << k.key << ": checkpoint " << a << ", this run " << b;
      ++n_refused;
    }
  }
  if (n_refused)
    MOELAB_USAGE_FAIL("--resume ", checkpoint, ": the checkpoint was written by a run with another "
                      "model, data or seed; ", n_refused, n_refused == 1 ? " key differs" : " keys differ",
                      " that a resume may not change:", refused.str(),
                      "\n(a resume may change only the schedule and optimizer keys, the router loss "
                      "weights, train.backend, data.path and log.*; start a new run to change the rest)");
  return safe;
}

bool init_from_must_match(const std::string& key, const RunConfig& saved, const RunConfig& now) {
  if (key == "router.noise")
    return saved.moe.router.noise == NoiseType::Learned || now.moe.router.noise == NoiseType::Learned;
  return key.rfind("model.", 0) == 0 && key != "model.init_scale" && key != "model.dtype" &&
         key != "model.expert_dropout";
}

void check_init_config(const RunConfig& saved, const RunConfig& now, const std::string& checkpoint) {
  std::ostringstream refused;
  int n = 0;
  for (const ConfigKey& k : config_keys()) {
    const std::string a = k.get(saved), b = k.get(now);
    if (a == b || !init_from_must_match(k.key, saved, now)) continue;
    refused << "\n  " << k.key << ": checkpoint " << a << ", this run " << b;
    ++n;
  }
  if (n)
    MOELAB_USAGE_FAIL("train.init_from = ", checkpoint, ": the checkpoint holds another model; ", n,
                      n == 1 ? " key differs" : " keys differ", " that define its weights:", refused.str(),
                      "\n(set them as the checkpoint has them; model.init_scale, model.dtype, "
                      "model.expert_dropout, the router, the data and the schedule may differ)");
}

namespace {
bool is_checkpoint_name(const std::string& name) {
  return name.size() > 10 && name.rfind("step_", 0) == 0 &&
         name.compare(name.size() - 5, 5, ".ckpt") == 0;
}
std::vector<fs::path> checkpoint_files(const std::string& dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (is_checkpoint_name(it->path().filename().string())) out.push_back(it->path());
  return out;
}
}  // namespace

std::string CheckpointFolder::read_owner() const {
  std::ifstream in(fs::path(dir_) / "run_id");
  std::string id;
  if (in) std::getline(in, id);
  return id;
}

// Written to a tmp file and renamed, so a crash leaves the old owner or the new one.
void CheckpointFolder::write_owner() {
  fault::point("ckpt.owner");
  const std::string path = (fs::path(dir_) / "run_id").string(), tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << run_id_ << "\n";
    out.flush();
    if (!out) MOELAB_FAIL("checkpoint folder ", dir_, ": cannot write ", tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    MOELAB_FAIL("checkpoint folder ", dir_, ": cannot rename ", tmp, ": ", std::strerror(errno));
}

CheckpointFolder::CheckpointFolder(std::string dir, std::string run_id, bool overwrite)
    : dir_(std::move(dir)), run_id_(std::move(run_id)) {
  std::error_code ec;
  if (fs::exists(dir_, ec) && !fs::is_directory(dir_, ec))
    MOELAB_USAGE_FAIL("log.checkpoint_dir = ", dir_, " exists and is not a folder");
  fs::create_directories(dir_, ec);
  if (ec) MOELAB_FAIL("log.checkpoint_dir = ", dir_, ": cannot create it: ", ec.message());

  std::string owner = read_owner();
  const std::vector<fs::path> files = checkpoint_files(dir_);
  if (owner.empty() && !files.empty()) {
    // No run_id file (removed, or copied without it): the newest checkpoint says whose it is.
    const std::string latest = latest_checkpoint(dir_);
    if (!latest.empty()) {
      try {
        CheckpointReader ck(latest);
        owner = ck.has_meta("run_id") ? ck.meta("run_id") : "(unknown: written before run ids)";
      } catch (const Error&) {
        owner = "(unknown: " + latest + " is unreadable)";
      }
    }
  }
  if (owner == run_id_) {
    claim_pending_ = read_owner().empty();  // judged by its newest checkpoint: write the file
    return;
  }
  if (!owner.empty() || !files.empty()) {
    if (!overwrite)
      MOELAB_USAGE_FAIL("log.checkpoint_dir = ", dir_, " holds ", files.size(),
                        " checkpoint(s) of another run (run id ", owner.empty() ? "unknown" : owner,
                        "); resume that run with --resume, choose another folder (log.checkpoint_dir, "
                        "or --out, from which the default folder is derived), or pass --overwrite to "
                        "replace them at this run's first checkpoint");
    replace_pending_ = true;
    return;
  }
  claim_pending_ = true;
}

// An empty folder: claimed atomically (O_EXCL) against a run started at the same moment.
void CheckpointFolder::claim() {
  if (!claim_pending_) return;
  claim_pending_ = false;
  const std::string path = (fs::path(dir_) / "run_id").string();
  fault::point("ckpt.owner");
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    if (errno == EEXIST)
      MOELAB_USAGE_FAIL("log.checkpoint_dir = ", dir_, " was just claimed by another run (run id ",
                        read_owner(), "); choose another folder");
    MOELAB_FAIL("log.checkpoint_dir = ", dir_, ": cannot create ", path, ": ", std::strerror(errno));
  }
  const std::string line = run_id_ + "\n";
  const bool ok = ::write(fd, line.data(), line.size()) == ssize_t(line.size());
  ::close(fd);
  if (!ok) MOELAB_FAIL("log.checkpoint_dir = ", dir_, ": cannot write ", path);
}

void CheckpointFolder::before_write() {
  claim();
  if (replace_pending_) {
    // --overwrite: the other run's checkpoints go now, just before this run's first one.
    for (const fs::path& p : checkpoint_files(dir_)) {
      std::error_code ec;
      fs::remove(p, ec);
      if (ec) MOELAB_FAIL("log.checkpoint_dir = ", dir_, ": cannot remove ", p.string(), ": ", ec.message());
    }
    write_owner();
    replace_pending_ = false;
    return;
  }
  const std::string owner = read_owner();
  if (owner != run_id_)
    MOELAB_FAIL("log.checkpoint_dir = ", dir_, " now belongs to another run (run id ",
                owner.empty() ? "none: its run_id file was removed" : owner,
                "); this run (", run_id_, ") stops rather than overwrite its checkpoints");
}

}  // namespace moelab
