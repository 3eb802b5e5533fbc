// moelab tests: fault injection at every write of the run log and the checkpoints (issue
// "Nothing lost, ever"). Each round makes one write fail (core/io/fault.h), then checks that
// nothing written before is lost (the log reads, holds a prefix of the reference run's rows with
// bit-identical values; every checkpoint on disk reads and verifies; no tmp file is left), then
// resumes from the newest checkpoint and checks that the finished log is bit-identical to an
// uninterrupted run. The schedule: every hit of every site except the ~60 HDF5 calls per flush,
// of which a seeded sample (MOELAB_FAULT_SEED overrides the seed; it is printed on failure).
// The kill-mid-write rounds need a process to die: tests/fault_kill.sh.
#include <H5Cpp.h>

#include <cstdlib>
#include <filesystem>
#include <random>

#include "backends/registry.h"
#include "catch_compat.h"
#include "core/io/checkpoint.h"
#include "core/io/config.h"
#include "core/io/fault.h"
#include "core/trainer.h"
#include "temp_dir.h"
#include "train_util.h"

using namespace moelab;
using moelab::test::TempDir;
using moelab::test::quiet_options;
using moelab::test::tiny_model_sets;
namespace fs = std::filesystem;

namespace {

RunConfig config(const TempDir& tmp) {
  return load_config("", tiny_model_sets({"train.batch=2", "train.seq=16", "train.steps=6",
                                          "train.lr=0.01", "train.warmup=1", "router.aux_alpha=0.01",
                                          "router.bias_update_rate=0.001", "log.eval_every=3",
                                          "log.eval_batches=1", "log.flush_every=2",
                                          "log.checkpoint_every=2", "log.out=" + tmp.path("run.h5")}));
}

struct Series {
  std::vector<int64_t> step, eval_step;
  std::vector<double> loss, grad_norm, eval_loss;
};

template <class T>
std::vector<T> read_1d(H5::H5File& f, const char* name, const H5::PredType& type) {
  H5::DataSet d = f.openDataSet(name);
  hsize_t n = 0;
  d.getSpace().getSimpleExtentDims(&n);
  std::vector<T> v(n);
  if (n) d.read(v.data(), type);
  return v;
}

Series read_log(const std::string& path) {
  H5::H5File f(path, H5F_ACC_RDONLY);
  Series s;
  s.step = read_1d<int64_t>(f, "/train/step", H5::PredType::NATIVE_INT64);
  s.loss = read_1d<double>(f, "/train/loss", H5::PredType::NATIVE_DOUBLE);
  s.grad_norm = read_1d<double>(f, "/train/grad_norm", H5::PredType::NATIVE_DOUBLE);
  s.eval_step = read_1d<int64_t>(f, "/eval/step", H5::PredType::NATIVE_INT64);
  s.eval_loss = read_1d<double>(f, "/eval/loss", H5::PredType::NATIVE_DOUBLE);
  return s;
}

template <class T>
bool is_prefix(const std::vector<T>& a, const std::vector<T>& full) {
  return a.size() <= full.size() && std::equal(a.begin(), a.end(), full.begin());
}

int64_t count_hits(const std::string& prefix) {
  TempDir tmp("fault_count");
  fault::arm(prefix, 0);
  train(config(tmp), quiet_options());
  const int64_t n = fault::hits(prefix);
  fault::disarm();
  return n;
}

}  // namespace

TEST_CASE("fault injection: a failed write at any point loses nothing, and resume is bit-identical", "[fault][nothing_lost]") {
  TempDir ref_dir("fault_ref");
  train(config(ref_dir), quiet_options());
  const Series ref = read_log(ref_dir.path("run.h5"));
  REQUIRE(ref.step.size() == 6);

  uint64_t seed = 20261130;
  if (const char* s = std::getenv("MOELAB_FAULT_SEED")) seed = std::strtoull(s, nullptr, 10);
  std::mt19937_64 rng(seed);
  std::vector<std::pair<std::string, int64_t>> schedule;
  for (const char* site : {"log.write", "log.fsync", "log.verify", "log.rename", "ckpt.open", "ckpt.write",
                           "ckpt.fsync", "ckpt.close", "ckpt.rename", "ckpt.owner"}) {
    const int64_t n = count_hits(site);
    REQUIRE(n > 0);  // every site is on the path of a run, or this schedule misses it
    for (int64_t i = 1; i <= n; ++i) schedule.push_back({site, i});
  }
  const int64_t n_hdf5 = count_hits("log.hdf5");
  for (int i = 0; i < 12; ++i) schedule.push_back({"log.hdf5", 1 + int64_t(rng() % uint64_t(n_hdf5))});

  for (const auto& [site, hit] : schedule) {
    INFO("fault schedule seed " << seed << ": failing hit " << hit << " of " << site);
    TempDir tmp("fault");
    const RunConfig cfg = config(tmp);
    const std::string log = tmp.path("run.h5"), dir = checkpoint_dir_of(cfg);
    fault::arm(site, hit);
    std::string error;
    try {
      train(cfg, quiet_options());
    } catch (const Error& e) {
      error = e.what();
    }
    const bool fired = fault::fired();
    fault::disarm();
    REQUIRE(fired);
    CHECK_THAT(error, has_substr("injected fault at " + site));  // never swallowed

    // Nothing lost: what is on disk is whole and equals the reference run's beginning.
    if (fs::exists(log)) {
      const Series s = read_log(log);
      CHECK(is_prefix(s.step, ref.step));
      CHECK(is_prefix(s.loss, ref.loss));
      CHECK(is_prefix(s.grad_norm, ref.grad_norm));
      CHECK(is_prefix(s.eval_loss, ref.eval_loss));
    }
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string name = it->path().filename().string();
      CHECK(name.find(".tmp") == std::string::npos);
      if (name.rfind("step_", 0) == 0) CHECK_NOTHROW(CheckpointReader(it->path().string()));
    }
    CHECK_FALSE(fs::exists(log + ".tmp"));

    // Resume from the newest checkpoint (or start again when there is none): bit-identical.
    const std::string latest = latest_checkpoint(dir);
    train(cfg, latest.empty() ? quiet_options("", true) : quiet_options(latest));
    const Series done = read_log(log);
    CHECK(done.step == ref.step);
    CHECK(done.loss == ref.loss);
    CHECK(done.grad_norm == ref.grad_norm);
    CHECK(done.eval_step == ref.eval_step);
    CHECK(done.eval_loss == ref.eval_loss);
  }
}
