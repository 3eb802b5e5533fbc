// moelab tests: nothing a user wrote is lost (issue "Nothing lost, ever"). One case per failure
// mode the adversarial pass found: each of them failed before its fix.
#include <H5Cpp.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>

#include "backends/registry.h"
#include "catch_compat.h"
#include "core/io/checkpoint.h"
#include "core/io/config.h"
#include "core/io/output_file.h"
#include "core/io/run_log.h"
#include "core/run_identity.h"
#include "core/trainer.h"
#include "temp_dir.h"
#include "train_util.h"
#include "test_util.h"

using namespace moelab;
using moelab::test::TempDir;
using moelab::test::quiet_options;
using moelab::test::tiny_model_sets;
using moelab::test::error_of;
namespace fs = std::filesystem;

namespace {

RunLogInfo log_info() {
  RunLogInfo info;
  info.config_ini = "[model]\n";
  info.backend = "cpu";
  info.moelab_version = "test";
  info.moe_layers = {0};
  info.experts = 2;
  info.flush_every = 1000;  // flushes only when asked
  return info;
}

TrainRow row(int64_t step) {
  TrainRow r;
  r.step = step;
  r.loss = 1.0 / double(step + 1);
  LayerRouterRow l;
  l.stats.routed = {int64_t(step), 1};
  l.stats.kept = {int64_t(step), 1};
  l.stats.mean_prob = {0.5, 0.5};
  r.layers.push_back(l);
  return r;
}

std::vector<int64_t> steps_on_disk(const std::string& path) {
  H5::H5File f(path, H5F_ACC_RDONLY);
  H5::DataSet d = f.openDataSet("/train/step");
  hsize_t n = 0;
  d.getSpace().getSimpleExtentDims(&n);
  std::vector<int64_t> v(n);
  if (n) d.read(v.data(), H5::PredType::NATIVE_INT64);
  return v;
}

std::string root_attr(const std::string& path, const std::string& name) {
  H5::H5File f(path, H5F_ACC_RDONLY);
  H5::Attribute a = f.openAttribute(name);
  std::string v;
  a.read(a.getStrType(), v);
  return v;
}

RunConfig tiny(const TempDir& tmp, std::vector<std::string> extra = {}) {
  std::vector<std::string> sets = tiny_model_sets({
      "train.batch=2", "train.seq=16", "train.steps=4",
      "train.lr=0.01", "train.warmup=1", "log.eval_every=2", "log.eval_batches=1",
      "log.flush_every=1", "log.checkpoint_every=2", "log.out=" + tmp.path("run.h5")});
  sets.insert(sets.end(), extra.begin(), extra.end());
  return load_config("", sets);
}

// Limits the size of any file this process writes (as a full disk would), for one scope.
struct FileSizeLimit {
  rlimit old{};
  void (*old_handler)(int) = nullptr;
  explicit FileSizeLimit(rlim_t bytes) {
    getrlimit(RLIMIT_FSIZE, &old);
    old_handler = std::signal(SIGXFSZ, SIG_IGN);  // write() then fails with EFBIG
    rlimit lim = old;
    lim.rlim_cur = bytes;
    setrlimit(RLIMIT_FSIZE, &lim);
  }
  ~FileSizeLimit() {
    setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, old_handler);
  }
};

}  // namespace

TEST_CASE("nothing lost 1: a disk full during a flush keeps the last good log and stops the log", "[nothing_lost]") {
  TempDir tmp;
  const std::string path = tmp.path("run.h5");
  RunLog log(path, log_info());
  for (int64_t s = 1; s <= 3; ++s) log.log_train(row(s));
  log.flush();
  const auto size = fs::file_size(path);
  for (int64_t s = 4; s <= 400; ++s) log.log_train(row(s));  // a much larger file
  {
    FileSizeLimit full(size + 1024);
    REQUIRE_THROWS_WITH(log.flush(), has_substr("run log " + path) && has_substr("flush failed") &&
                                         has_substr("3 train rows") && has_substr("File too large"));
  }
  CHECK(steps_on_disk(path) == std::vector<int64_t>{1, 2, 3});  // the last good log, whole
  CHECK_FALSE(fs::exists(path + ".tmp"));
  // Later flushes are refused, not retried into a half-broken state; the destructor is silent.
  log.log_train(row(401));
  REQUIRE_THROWS_WITH(log.flush(), has_substr("an earlier flush failed"));
}

TEST_CASE("nothing lost 1: a training run whose log cannot be flushed stops with the log intact", "[nothing_lost][train]") {
  TempDir tmp;
  RunConfig cfg = tiny(tmp, {"train.steps=200", "log.checkpoint_every=0", "log.eval_every=0",
                             "log.flush_every=5"});
  FileSizeLimit full(40 * 1024);
  REQUIRE_THROWS_WITH(train(cfg, quiet_options()), has_substr("flush failed"));
  const auto steps = steps_on_disk(tmp.path("run.h5"));
  REQUIRE(steps.size() >= 5);
  CHECK(steps.size() % 5 == 0);  // whole flushes only
  CHECK(steps.back() == int64_t(steps.size()));
}

TEST_CASE("nothing lost 2: devices, FIFOs and folders are refused as outputs, links are written through", "[nothing_lost]") {
  TempDir tmp;
  // A private device node (the same numbers as /dev/null), never the real one.
  const std::string dev = tmp.path("null");
  if (::mknod(dev.c_str(), S_IFCHR | 0666, makedev(1, 3)) == 0) {
    CHECK_THROWS_WITH(RunLog(dev, log_info()), has_substr(dev) && has_substr("character device"));
    struct stat st;
    REQUIRE(::stat(dev.c_str(), &st) == 0);
    CHECK(S_ISCHR(st.st_mode));  // still the device
    const std::string link = tmp.path("link_to_null.h5");
    fs::create_symlink(dev, link);
    CHECK_THROWS_WITH(RunLog(link, log_info()), has_substr("through its link") && has_substr("character device"));
  } else {
    WARN("mknod is not permitted here (no CAP_MKNOD); the device case is covered by the FIFO case");
  }
  const std::string fifo = tmp.path("fifo.h5");
  REQUIRE(::mkfifo(fifo.c_str(), 0644) == 0);
  CHECK_THROWS_WITH(RunLog(fifo, log_info()), has_substr("is a FIFO"));
  CHECK(fs::is_fifo(fifo));
  fs::create_directories(tmp.path("dir.h5"));
  CHECK_THROWS_WITH(RunLog(tmp.path("dir.h5"), log_info()), has_substr("is a folder"));

  // A symlink is written through: the target becomes the log, the link stays a link.
  fs::create_directories(tmp.path("elsewhere"));
  fs::create_symlink("elsewhere/real.h5", tmp.path("link.h5"));  // relative, and dangling now
  {
    RunLog log(tmp.path("link.h5"), log_info());
    log.log_train(row(1));
  }
  CHECK(fs::is_symlink(tmp.path("link.h5")));
  CHECK(steps_on_disk(tmp.path("elsewhere/real.h5")) == std::vector<int64_t>{1});
  // Checkpoints follow the same rules.
  CheckpointWriter w;
  w.set_meta("k", "v");
  CHECK_THROWS_WITH(w.write(fifo), has_substr("is a FIFO"));
}

TEST_CASE("nothing lost 3: an existing log is refused without overwrite, and kept until the first flush with it", "[nothing_lost]") {
  TempDir tmp;
  const std::string path = tmp.path("run.h5");
  {
    RunLog log(path, log_info());
    for (int64_t s = 1; s <= 5; ++s) log.log_train(row(s));
  }
  REQUIRE(steps_on_disk(path).size() == 5);
  CHECK_THROWS_WITH(RunLog(path, log_info()), has_substr("exists; pass --overwrite"));
  RunLogInfo over = log_info();
  over.overwrite = true;
  {
    RunLog log(path, over);  // a run that fails before logging anything...
  }
  CHECK(steps_on_disk(path).size() == 5);  // ...leaves the old log whole
  {
    RunLog log(path, over);
    log.log_train(row(1));
    CHECK(steps_on_disk(path).size() == 5);  // still the old one until the first flush
    log.flush();
    CHECK(steps_on_disk(path) == std::vector<int64_t>{1});
  }
  // The trainer: a second run on the same --out is refused before it trains, the first log kept.
  RunConfig cfg = tiny(tmp, {"log.out=" + tmp.path("t.h5"), "log.checkpoint_every=0"});
  train(cfg, quiet_options());
  const auto before = steps_on_disk(tmp.path("t.h5"));
  CHECK_THROWS_WITH(train(cfg, quiet_options()), has_substr("exists"));
  CHECK(steps_on_disk(tmp.path("t.h5")) == before);
}

TEST_CASE("nothing lost 4: runs never share a checkpoint folder", "[nothing_lost][train]") {
  TempDir tmp;
  // The default folder follows --out, so two runs with different --out have their own.
  RunConfig a = tiny(tmp, {"log.out=" + tmp.path("a.h5")});
  RunConfig b = tiny(tmp, {"log.out=" + tmp.path("b.h5")});
  CHECK(checkpoint_dir_of(a) == tmp.path("a_checkpoints"));
  train(a, quiet_options());
  train(b, quiet_options());
  const std::string ck_a = checkpoint_path(tmp.path("a_checkpoints"), 4);
  const std::string ck_b = checkpoint_path(tmp.path("b_checkpoints"), 4);
  const std::string id_a = CheckpointReader(ck_a).meta("run_id");
  CHECK(id_a != CheckpointReader(ck_b).meta("run_id"));
  // An explicit shared folder: the second run is refused at startup, naming the other run.
  RunConfig c = tiny(tmp, {"log.out=" + tmp.path("c.h5"), "log.checkpoint_dir=" + tmp.path("a_checkpoints")});
  CHECK_THROWS_WITH(train(c, quiet_options()), has_substr("holds 2 checkpoint(s) of another run (run id " + id_a));
  CHECK(CheckpointReader(ck_a).meta("run_id") == id_a);
  // A folder whose run_id file was removed is judged by its newest checkpoint.
  fs::remove(tmp.path("a_checkpoints/run_id"));
  CHECK_THROWS_WITH(train(c, quiet_options()), has_substr(id_a));
  // --overwrite replaces the other run's checkpoints, at the first checkpoint of the new run.
  train(c, quiet_options("", true));
  CHECK(CheckpointReader(ck_a).meta("run_id") != id_a);
  // Two folder objects of different runs: the second cannot claim a claimed folder, and the
  // first notices a takeover before it writes.
  CheckpointFolder f1(tmp.path("shared"), "run-one", false);
  CheckpointFolder racer(tmp.path("shared"), "run-three", false);  // checked at the same moment
  f1.claim();
  CHECK_THROWS_WITH(racer.claim(), has_substr("just claimed by another run (run id run-one"));
  CHECK_THROWS_WITH(CheckpointFolder(tmp.path("shared"), "run-two", false), has_substr("run-one"));
  CheckpointFolder f2(tmp.path("shared"), "run-two", true);
  f2.before_write();
  CHECK_THROWS_WITH(f1.before_write(), has_substr("now belongs to another run (run id run-two"));
}

TEST_CASE("nothing lost 5: sweep grid points whose names collide are refused", "[nothing_lost][config]") {
  CHECK_THROWS_WITH(load_config("", {"sweep.data.path=a/b,a_b"}),
                    has_substr("data.path = a/b") && has_substr("data.path = a_b") &&
                        has_substr("same name 'path=a_b'"));
  CHECK_THROWS_WITH(load_config("", {"sweep.variant=big: train.lr=0.1, big: train.lr=0.2"}),
                    has_substr("same name 'big'"));
  CHECK_THROWS_WITH(load_config("", {"sweep.variant=x y: train.lr=0.1, x_y: train.lr=0.2"}),
                    has_substr("same name 'x_y'"));
  CHECK(expand_sweep(load_config("", {"sweep.train.lr=0.1,0.2"})).size() == 2);
}

TEST_CASE("nothing lost 6: resume refuses another model, seed or run, names every key, logs safe changes", "[nothing_lost][train]") {
  TempDir tmp;
  RunConfig cfg = tiny(tmp);
  train(cfg, quiet_options());
  const std::string ck = checkpoint_path(checkpoint_dir_of(cfg), 2);
  const std::string out2 = "log.out=" + tmp.path("r.h5");
  // Fewer layers (the checkpoint's extra tensors would be ignored), another head count with
  // the same width, another seed: refused, each key named with both values.
  CHECK_THROWS_WITH(train(tiny(tmp, {out2, "model.layers=1"}), quiet_options(ck)), has_substr("model.layers: checkpoint 2, this run 1"));
  CHECK_THROWS_WITH(train(tiny(tmp, {out2, "model.heads=4"}), quiet_options(ck)), has_substr("model.heads: checkpoint 2, this run 4"));
  const std::string both = error_of([&] { train(tiny(tmp, {out2, "train.seed=7", "model.top_k=1"}), quiet_options(ck)); });
  CHECK_THAT(both, has_substr("train.seed: checkpoint 1234, this run 7"));
  CHECK_THAT(both, has_substr("model.top_k: checkpoint 2, this run 1"));
  CHECK_THAT(both, has_substr("2 keys differ"));
  // Resume into another run's log: refused, the rows are not spliced.
  RunConfig other = tiny(tmp, {"log.out=" + tmp.path("other.h5")});
  train(other, quiet_options());
  const auto other_steps = steps_on_disk(tmp.path("other.h5"));
  RunConfig into_other = tiny(tmp, {"log.out=" + tmp.path("other.h5"), "log.checkpoint_every=0"});
  CHECK_THROWS_WITH(train(into_other, quiet_options(ck)), has_substr("belongs to run") && has_substr("the checkpoint to run"));
  CHECK(steps_on_disk(tmp.path("other.h5")) == other_steps);
  // Safe changes (schedule, loss weights) are allowed and logged in the log and on stdout.
  train(tiny(tmp, {"train.lr=0.02", "router.aux_alpha=0.05", "train.steps=5"}), quiet_options(ck));
  const std::string log = tmp.path("run.h5");
  CHECK(steps_on_disk(log) == std::vector<int64_t>{1, 2, 3, 4, 5});
  H5::H5File f(log, H5F_ACC_RDONLY);
  H5::Attribute a = f.openAttribute("resume_changes");
  hsize_t n = 0;
  a.getSpace().getSimpleExtentDims(&n);
  CHECK(n == 3);
  CHECK(root_attr(log, "run_id") == CheckpointReader(ck).meta("run_id"));
}

TEST_CASE("nothing lost 11: a second writer of one log is refused, naming the first", "[nothing_lost]") {
  TempDir tmp;
  const std::string path = tmp.path("run.h5");
  RunLog first(path, log_info());
  RunLogInfo over = log_info();
  over.overwrite = true;
  CHECK_THROWS_WITH(RunLog(path, over), has_substr("being written by another moelab process (pid " +
                                                   std::to_string(::getpid())));
}
