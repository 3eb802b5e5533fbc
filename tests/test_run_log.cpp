// moelab tests: the HDF5 run log (core/io/run_log.h, docs/run-log.md).
//
// Files are read back with the HDF5 C++ API, independently of the writer: values, dtypes,
// shapes and attributes. The SIGKILL test forks a child that logs and flushes every row, kills it
// at several moments and checks that the file left behind opens with every /train and /router
// per-step dataset of the same length (with h5py too, when /usr/bin/python3 has it).
// Scratch files go to temp_directory_path()/moelab_test_run_log_<pid>_<n>/.
#include <H5Cpp.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "temp_dir.h"
#include "test_util.h"
#include "catch_compat.h"
#include "core/check.h"
#include "core/io/run_log.h"

namespace fs = std::filesystem;
using namespace moelab;
using moelab::test::TempDir;
using moelab::test::error_of;

namespace {


RunLogInfo make_info(int64_t experts, std::vector<int> layers, int64_t categories,
                     int64_t flush_every) {
  RunLogInfo info;
  info.config_ini = "[model]\nexperts = " + std::to_string(experts) + "\n[train]\nsteps = 10\n";
  info.backend = "cpu";
  info.moelab_version = "0.1.0-test";
  info.moe_layers = std::move(layers);
  info.experts = experts;
  for (int64_t c = 0; c < categories; ++c)
    info.category_names.push_back("cat_" + std::to_string(c));
  info.flush_every = flush_every;
  return info;
}

// A deterministic train row: every value is a function of (step, layer, expert), so a reader
// can check any row it finds without knowing how many were written.
TrainRow make_row(int64_t step, int64_t E, size_t L) {
  TrainRow r;
  r.step = step;
  r.loss = 5.0 - 0.01 * double(step);
  r.lr = 1e-3 * double(step + 1);
  r.grad_norm = 0.5 + 0.25 * double(step);
  r.tokens_per_sec = 1000.0 + double(step);
  r.loss_tokens = 500 + step;
  for (size_t l = 0; l < L; ++l) {
    LayerRouterRow lr;
    double psum = 0;
    for (int64_t i = 0; i < E; ++i) {
      int64_t routed = 100 * int64_t(l) + 10 * step + i;
      lr.stats.routed.push_back(routed);
      lr.stats.kept.push_back(routed - (i % 3 == 0 ? 1 : 0));
      lr.stats.mean_prob.push_back(double(i + 1 + l));
      psum += double(i + 1 + l);
    }
    for (double& p : lr.stats.mean_prob) p /= psum;
    lr.stats.entropy = 1.0 + 0.001 * double(step) + double(l);
    lr.stats.top1_prob = 0.3 + 0.0001 * double(step);
    lr.stats.logit_rms = 0.7 + 0.002 * double(step) + 0.1 * double(l);
    lr.stats.logit_max = 2.5 + 0.003 * double(step);
    lr.stats.tokens_unrouted = step % 4 + int64_t(l);
    lr.losses.aux = 1.0 + 1e-4 * double(step);
    lr.losses.z = 3.0 + 1e-3 * double(step);
    lr.losses.importance = 0.01 * double(l + 1);
    lr.losses.load = 0.02 * double(l + 1);
    lr.losses.weighted = 0.01 * lr.losses.aux + 0.001 * lr.losses.z;
    lr.capacity = 16 + int64_t(l);
    r.layers.push_back(lr);
  }
  return r;
}

EvalRow make_eval(int64_t step, int64_t E, int64_t C, size_t L) {
  EvalRow r;
  r.step = step;
  r.loss = 2.0 + 1.0 / double(step + 1);
  for (size_t l = 0; l < L && C > 0; ++l) {
    std::vector<int64_t> counts(size_t(E * C));
    for (int64_t i = 0; i < E * C; ++i) counts[size_t(i)] = step * 1000 + int64_t(l) * 100 + i;
    r.category_counts.push_back(counts);
  }
  return r;
}

// ---- reading back with the HDF5 C++ API ------------------------------------------------------

struct Data {
  std::vector<hsize_t> dims;
  std::vector<int64_t> i;  // filled for integer datasets
  std::vector<double> f;   // filled for float datasets
  H5T_class_t cls = H5T_NO_CLASS;
  size_t size = 0;  // bytes per element in the file
};

Data read(const H5::H5File& f, const std::string& path) {
  H5::DataSet ds = f.openDataSet(path);
  Data d;
  H5::DataSpace sp = ds.getSpace();
  d.dims.resize(size_t(sp.getSimpleExtentNdims()));
  sp.getSimpleExtentDims(d.dims.data());
  hsize_t n = 1;
  for (hsize_t x : d.dims) n *= x;
  d.cls = ds.getTypeClass();
  d.size = ds.getDataType().getSize();
  if (d.cls == H5T_INTEGER) {
    d.i.resize(n);
    if (n) ds.read(d.i.data(), H5::PredType::NATIVE_INT64);
  } else {
    d.f.resize(n);
    if (n) ds.read(d.f.data(), H5::PredType::NATIVE_DOUBLE);
  }
  return d;
}

std::string read_str_attr(const H5::H5Object& obj, const std::string& name) {
  H5::Attribute a = obj.openAttribute(name);
  std::string s;
  a.read(a.getStrType(), s);
  return s;
}

std::vector<std::string> read_strs_attr(const H5::H5Object& obj, const std::string& name) {
  H5::Attribute a = obj.openAttribute(name);
  hsize_t n = 0;
  a.getSpace().getSimpleExtentDims(&n);
  std::vector<char*> ptrs(n);
  H5::StrType t(H5::PredType::C_S1, H5T_VARIABLE);
  a.read(t, ptrs.data());
  std::vector<std::string> out(ptrs.begin(), ptrs.end());
  H5::DataSet::vlenReclaim(ptrs.data(), t, a.getSpace());
  return out;
}

// Every dataset under `group` (recursively): path -> first dimension.
void walk(const H5::Group& g, const std::string& prefix, std::map<std::string, hsize_t>& out) {
  for (hsize_t k = 0; k < g.getNumObjs(); ++k) {
    std::string name = g.getObjnameByIdx(k);
    std::string path = prefix + "/" + name;
    H5G_obj_t type = g.getObjTypeByIdx(k);
    if (type == H5G_GROUP) {
      walk(g.openGroup(name), path, out);
    } else if (type == H5G_DATASET) {
      H5::DataSpace sp = g.openDataSet(name).getSpace();
      std::vector<hsize_t> dims(size_t(sp.getSimpleExtentNdims()));
      sp.getSimpleExtentDims(dims.data());
      out[path] = dims.empty() ? 1 : dims[0];
    }
  }
}

// First dimension of every per-step dataset under /train and /router (category_counts, which is
// per evaluation, excluded).
std::map<std::string, hsize_t> per_step_lengths(const H5::H5File& f) {
  std::map<std::string, hsize_t> all, out;
  walk(f.openGroup("/train"), "/train", all);
  walk(f.openGroup("/router"), "/router", all);
  for (auto& [k, v] : all)
    if (k.find("category_counts") == std::string::npos) out[k] = v;
  return out;
}

hsize_t rows_on_disk(const std::string& path) {
  H5::H5File f(path, H5F_ACC_RDONLY);
  return read(f, "/train/step").dims.at(0);
}

const char* kRouterFloat[] = {"aux_loss",  "z_loss",     "entropy",   "logit_rms",
                              "logit_max", "top1_prob",  "importance_loss", "load_loss",
                              "weighted_loss"};
const char* kRouterInt[] = {"dropped", "capacity", "tokens_unrouted"};

// Checks that rows 0..n-1 of the file equal make_row(steps[r]) (E experts, layers) and returns n.
hsize_t check_rows(const H5::H5File& f, int64_t E, const std::vector<int>& layers,
                   const std::vector<int64_t>& steps) {
  Data step = read(f, "/train/step");
  const hsize_t n = step.dims[0];
  REQUIRE(n <= steps.size());
  for (hsize_t r = 0; r < n; ++r) REQUIRE(step.i[r] == steps[r]);
  Data loss = read(f, "/train/loss"), lr = read(f, "/train/lr"),
       gn = read(f, "/train/grad_norm"), tps = read(f, "/train/tokens_per_sec");
  for (hsize_t r = 0; r < n; ++r) {
    TrainRow want = make_row(steps[r], E, layers.size());
    CHECK(loss.f[r] == want.loss);
    CHECK(lr.f[r] == want.lr);
    CHECK(gn.f[r] == want.grad_norm);
    CHECK(tps.f[r] == want.tokens_per_sec);
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    std::string g = "/router/" + run_log_layer_name(layers[l]) + "/";
    Data routed = read(f, g + "routed"), kept = read(f, g + "kept"),
         mp = read(f, g + "mean_prob");
    std::map<std::string, Data> s;
    for (const char* k : kRouterFloat) s[k] = read(f, g + k);
    for (const char* k : kRouterInt) s[k] = read(f, g + k);
    REQUIRE(routed.dims == std::vector<hsize_t>{n, hsize_t(E)});
    REQUIRE(kept.dims == std::vector<hsize_t>{n, hsize_t(E)});
    REQUIRE(mp.dims == std::vector<hsize_t>{n, hsize_t(E)});
    for (hsize_t r = 0; r < n; ++r) {
      const LayerRouterRow want = make_row(steps[r], E, layers.size()).layers[l];
      int64_t dropped = 0;
      for (int64_t i = 0; i < E; ++i) {
        size_t at = size_t(r) * size_t(E) + size_t(i);
        CHECK(routed.i[at] == want.stats.routed[size_t(i)]);
        CHECK(kept.i[at] == want.stats.kept[size_t(i)]);
        CHECK(mp.f[at] == want.stats.mean_prob[size_t(i)]);
        dropped += want.stats.routed[size_t(i)] - want.stats.kept[size_t(i)];
      }
      CHECK(s["aux_loss"].f[r] == want.losses.aux);
      CHECK(s["z_loss"].f[r] == want.losses.z);
      CHECK(s["importance_loss"].f[r] == want.losses.importance);
      CHECK(s["load_loss"].f[r] == want.losses.load);
      CHECK(s["weighted_loss"].f[r] == want.losses.weighted);
      CHECK(s["entropy"].f[r] == want.stats.entropy);
      CHECK(s["top1_prob"].f[r] == want.stats.top1_prob);
      CHECK(s["logit_rms"].f[r] == want.stats.logit_rms);
      CHECK(s["logit_max"].f[r] == want.stats.logit_max);
      CHECK(s["dropped"].i[r] == dropped);
      CHECK(s["capacity"].i[r] == want.capacity);
      CHECK(s["tokens_unrouted"].i[r] == want.stats.tokens_unrouted);
    }
  }
  return n;
}

// Runs /usr/bin/python3 with h5py on `path`: every dataset under /train and /router except
// category_counts has one length n > 0. Returns "skip" when python3 or h5py is missing, "ok" or
// the script's output.
std::string h5py_check(const std::string& path) {
  if (!fs::exists("/usr/bin/python3")) return "skip";
  const std::string script =
      "import sys\n"
      "try:\n"
      "    import h5py\n"
      "except ImportError:\n"
      "    sys.exit(77)\n"
      "lens = {}\n"
      "with h5py.File(sys.argv[1], 'r') as f:\n"
      "    for top in ('train', 'router'):\n"
      "        def visit(name, obj, top=top):\n"
      "            if isinstance(obj, h5py.Dataset) and not name.endswith('category_counts'):\n"
      "                lens[top + '/' + name] = obj.shape[0]\n"
      "                obj[()]\n"
      "        f[top].visititems(visit)\n"
      "    assert f.attrs['config'] and f.attrs['backend'] == 'cpu', dict(f.attrs)\n"
      "    assert f['eval/step'].shape[0] == f['eval/loss'].shape[0]\n"
      "ns = set(lens.values())\n"
      "assert len(ns) == 1 and min(ns) > 0 and len(lens) > 5, lens\n"
      "print('ok')\n";
  std::string cmd = "/usr/bin/python3 -c \"$MOELAB_H5PY_CHECK\" '" + path + "' 2>&1";
  ::setenv("MOELAB_H5PY_CHECK", script.c_str(), 1);
  std::FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return "popen failed";
  std::string out;
  char buf[512];
  while (size_t k = std::fread(buf, 1, sizeof buf, p)) out.append(buf, k);
  int status = ::pclose(p);
  ::unsetenv("MOELAB_H5PY_CHECK");
  if (WIFEXITED(status) && WEXITSTATUS(status) == 77) return "skip";
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && out.find("ok") != std::string::npos)
    return "ok";
  return out.empty() ? "python3 failed" : out;
}

}  // namespace

TEST_CASE("run log: round trip of train, eval and router rows", "[runlog]") {
  TempDir tmp;
  const std::string path = tmp.path("sub/dir/run.h5");  // parent folders are created
  const int64_t E = 4, C = 3, N = 10;
  const std::vector<int> layers = {1, 3};
  RunLogInfo info = make_info(E, layers, C, 4);
  info.sweep_name = "aux_alpha_sweep";
  info.init_from = "runs/pre_checkpoints/step_000600.ckpt";
  info.init_from_run_id = "0123abcd";
  info.init_from_step = 600;
  info.skipped_records = 3;
  info.config_ini += "# padding past the 64 KiB compact attribute limit\n" +
                     std::string(100000, '#') + "\n";
  std::vector<int64_t> steps;
  std::vector<EvalRow> evals;
  {
    RunLog log(path, info);
    for (int64_t k = 0; k < N; ++k) {
      steps.push_back(2 * k + 1);
      log.log_train(make_row(2 * k + 1, E, layers.size()));
      if (k % 4 == 1) {
        EvalRow e = make_eval(2 * k + 1, E, C, layers.size());
        if (k != 5) e.bits_per_byte = e.loss / std::log(2.0);
        if (k != 1) e.response_loss = e.loss + 0.5;
        evals.push_back(e);
        log.log_eval(e);
      }
    }
    CHECK(log.train_rows() == N);
    CHECK(log.eval_rows() == int64_t(evals.size()));
  }  // the destructor flushes the last rows
  REQUIRE(fs::exists(path));
  CHECK_FALSE(fs::exists(path + ".tmp"));

  H5::H5File f(path, H5F_ACC_RDONLY);
  CHECK(read_str_attr(f, "config") == info.config_ini);
  CHECK(read_str_attr(f, "moelab_version") == "0.1.0-test");
  CHECK(read_str_attr(f, "backend") == "cpu");
  CHECK(read_str_attr(f, "sweep_name") == "aux_alpha_sweep");
  CHECK(read_strs_attr(f, "category_names") == info.category_names);
  CHECK(read_str_attr(f, "init_from") == info.init_from);
  CHECK(read_str_attr(f, "init_from_run_id") == "0123abcd");
  {
    int64_t v = 0;
    f.openAttribute("init_from_step").read(H5::PredType::NATIVE_INT64, &v);
    CHECK(v == 600);
    f.openAttribute("data_skipped_records").read(H5::PredType::NATIVE_INT64, &v);
    CHECK(v == 3);
  }
  {
    Data lt = read(f, "/train/loss_tokens");
    REQUIRE(lt.dims == std::vector<hsize_t>{hsize_t(N)});
    CHECK(lt.cls == H5T_INTEGER);
    for (int64_t k = 0; k < N; ++k) CHECK(lt.i[size_t(k)] == 500 + 2 * k + 1);
  }

  // Dtypes: int64 steps and counts, float64 values.
  for (const char* p : {"/train/step", "/eval/step", "/router/layer_01/routed",
                        "/router/layer_03/kept", "/router/layer_01/dropped",
                        "/router/layer_03/capacity", "/router/layer_01/category_counts"}) {
    Data d = read(f, p);
    INFO(p);
    CHECK(d.cls == H5T_INTEGER);
    CHECK(d.size == 8);
  }
  for (const char* p : {"/train/loss", "/train/lr", "/train/grad_norm", "/train/tokens_per_sec",
                        "/eval/loss", "/eval/bits_per_byte", "/router/layer_01/mean_prob",
                        "/router/layer_03/aux_loss", "/router/layer_03/logit_max"}) {
    Data d = read(f, p);
    INFO(p);
    CHECK(d.cls == H5T_FLOAT);
    CHECK(d.size == 8);
  }

  CHECK(check_rows(f, E, layers, steps) == hsize_t(N));
  auto lens = per_step_lengths(f);
  CHECK(lens.size() == 6 + layers.size() * 15);
  for (auto& [name, n] : lens) {
    INFO(name);
    CHECK(n == hsize_t(N));
  }

  // Eval rows and the [M, E, C] category counts aligned with /eval/step.
  const hsize_t M = evals.size();
  Data es = read(f, "/eval/step"), el = read(f, "/eval/loss"), eb = read(f, "/eval/bits_per_byte");
  REQUIRE(es.dims == std::vector<hsize_t>{M});
  REQUIRE(el.dims == std::vector<hsize_t>{M});
  REQUIRE(eb.dims == std::vector<hsize_t>{M});
  for (size_t m = 0; m < M; ++m) {
    CHECK(es.i[m] == evals[m].step);
    CHECK(el.f[m] == evals[m].loss);
    if (evals[m].bits_per_byte)
      CHECK(eb.f[m] == *evals[m].bits_per_byte);
    else
      CHECK(std::isnan(eb.f[m]));
  }
  {
    Data er = read(f, "/eval/response_loss");
    REQUIRE(er.dims == std::vector<hsize_t>{M});
    for (size_t m = 0; m < M; ++m) {
      if (evals[m].response_loss) CHECK(er.f[m] == *evals[m].response_loss);
      else CHECK(std::isnan(er.f[m]));
    }
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    std::string g = "/router/" + run_log_layer_name(layers[l]);
    Data cc = read(f, g + "/category_counts");
    REQUIRE(cc.dims == std::vector<hsize_t>{M, hsize_t(E), hsize_t(C)});
    for (size_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < E * C; ++i)
        CHECK(cc.i[m * size_t(E * C) + size_t(i)] == evals[m].category_counts[l][size_t(i)]);
    CHECK(read_strs_attr(f.openDataSet(g + "/category_counts"), "category_names") ==
          info.category_names);
  }
}

TEST_CASE("run log: the file holds exactly the flushed rows between flushes", "[runlog]") {
  TempDir tmp;
  const std::string path = tmp.path("run.h5");
  const int64_t E = 3;
  const std::vector<int> layers = {0};
  RunLog log(path, make_info(E, layers, 0, 3));
  // The constructor writes a valid, empty log at once.
  CHECK(rows_on_disk(path) == 0);
  {
    H5::H5File f(path, H5F_ACC_RDONLY);
    CHECK(read(f, "/router/layer_00/routed").dims == std::vector<hsize_t>{0, 3});
    CHECK(read(f, "/eval/step").dims == std::vector<hsize_t>{0});
  }
  std::vector<int64_t> steps;
  auto add = [&](int64_t s) {
    steps.push_back(s);
    log.log_train(make_row(s, E, layers.size()));
  };
  add(0);
  add(1);
  CHECK(rows_on_disk(path) == 0);
  CHECK(log.flushed_train_rows() == 0);
  add(2);  // third row: flush
  CHECK(rows_on_disk(path) == 3);
  CHECK(log.flushed_train_rows() == 3);
  add(3);
  log.log_eval(make_eval(3, E, 0, layers.size()));
  add(4);
  {
    H5::H5File f(path, H5F_ACC_RDONLY);
    CHECK(check_rows(f, E, layers, steps) == 3);
    CHECK(read(f, "/eval/step").dims[0] == 0);  // the eval row waits for the next flush
  }
  add(5);
  CHECK(rows_on_disk(path) == 6);
  {
    H5::H5File f(path, H5F_ACC_RDONLY);
    CHECK(check_rows(f, E, layers, steps) == 6);
    CHECK(read(f, "/eval/step").i == std::vector<int64_t>{3});
  }
  add(6);
  log.flush();  // an explicit flush writes everything and restarts the interval
  CHECK(rows_on_disk(path) == 7);
  add(7);
  add(8);
  CHECK(rows_on_disk(path) == 7);
  add(9);
  CHECK(rows_on_disk(path) == 10);
  CHECK_FALSE(fs::exists(path + ".tmp"));
}

TEST_CASE("run log: a run killed with SIGKILL leaves a readable file", "[runlog]") {
  TempDir tmp;
  const int64_t E = 64, C = 6;
  const std::vector<int> layers = {1, 3, 5, 7};
  // Kill at several moments; the rows grow, so later kills tend to land inside a rewrite.
  for (int delay_ms : {0, 3, 11, 37, 90, 200}) {
    DYNAMIC_SECTION("killed " << delay_ms << " ms after the first rows") {
      const std::string path = tmp.path("killed_" + std::to_string(delay_ms) + "/run.h5");
      int fds[2];
      REQUIRE(::pipe(fds) == 0);
      std::fflush(nullptr);
      pid_t pid = ::fork();
      REQUIRE(pid >= 0);
      if (pid == 0) {  // child: log rows forever, flushing every row
        ::close(fds[0]);
        try {
          RunLog log(path, make_info(E, layers, C, 1));
          for (int64_t s = 0; s < 1000000; ++s) {
            log.log_train(make_row(s, E, layers.size()));
            if (s % 5 == 0) log.log_eval(make_eval(s, E, C, layers.size()));
            if (s == 2) {
              char b = 1;
              if (::write(fds[1], &b, 1) != 1) ::_exit(3);
            }
            ::usleep(500);
          }
        } catch (...) {
          ::_exit(2);
        }
        ::_exit(0);
      }
      ::close(fds[1]);
      pollfd pfd{fds[0], POLLIN, 0};
      int ready = ::poll(&pfd, 1, 20000);
      char b = 0;
      bool started = ready == 1 && ::read(fds[0], &b, 1) == 1;
      ::close(fds[0]);
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
      ::kill(pid, SIGKILL);
      int status = 0;
      ::waitpid(pid, &status, 0);
      REQUIRE(started);
      REQUIRE(WIFSIGNALED(status));
      CHECK(WTERMSIG(status) == SIGKILL);

      REQUIRE(fs::exists(path));
      H5::H5File f(path, H5F_ACC_RDONLY);
      auto lens = per_step_lengths(f);
      REQUIRE(lens.size() == 6 + layers.size() * 15);
      const hsize_t n = lens.begin()->second;
      CHECK(n > 0);
      for (auto& [name, len] : lens) {
        INFO(name);
        CHECK(len == n);
      }
      std::vector<int64_t> steps(n);
      for (hsize_t s = 0; s < n; ++s) steps[s] = int64_t(s);
      CHECK(check_rows(f, E, layers, steps) == n);
      const hsize_t m = read(f, "/eval/step").dims[0];
      // Eval rows of steps 0, 5, 10, ... are logged after that step's flush, so the file holds
      // those of steps <= n - 2.
      CHECK(m == (n + 3) / 5);
      CHECK(read(f, "/eval/loss").dims[0] == m);
      for (int l : layers)
        CHECK(read(f, "/router/" + run_log_layer_name(l) + "/category_counts").dims ==
              std::vector<hsize_t>{m, hsize_t(E), hsize_t(C)});
      CHECK_FALSE(read_str_attr(f, "config").empty());
      f.close();

      std::string py = h5py_check(path);
      if (py == "skip")
        WARN("/usr/bin/python3 with h5py not found: h5py check skipped");
      else
        CHECK(py == "ok");
    }
  }
}

TEST_CASE("run log: an unwritable path is an error naming the path", "[runlog]") {
  TempDir tmp;
  const RunLogInfo info = make_info(2, {1}, 0, 1);
  // A regular file where a folder should be (root ignores permission bits, not this).
  std::ofstream(tmp.path("a_file")) << "x";
  const std::string bad = tmp.path("a_file/sub/run.h5");
  std::string msg = error_of([&] { RunLog log(bad, info); });
  CHECK_THAT(msg, has_substr(bad));
  CHECK_THAT(msg, has_substr("cannot create folder"));

  const std::string bad2 = tmp.path("a_file/run.h5");
  msg = error_of([&] { RunLog log(bad2, info); });
  CHECK_THAT(msg, has_substr(bad2));

  const std::string proc = "/proc/moelab_no_such_dir/run.h5";
  msg = error_of([&] { RunLog log(proc, info); });
  CHECK_THAT(msg, has_substr(proc));

  // A folder in the way of the file itself.
  fs::create_directories(tmp.path("is_a_dir.h5"));
  msg = error_of([&] { RunLog log(tmp.path("is_a_dir.h5"), info); });
  CHECK_THAT(msg, has_substr("is_a_dir.h5"));
}

TEST_CASE("run log: rows that do not match the layout are refused", "[runlog]") {
  TempDir tmp;
  const std::string path = tmp.path("run.h5");
  CHECK_THAT(error_of([&] { RunLog log(path, make_info(0, {1}, 0, 1)); }),
             has_substr("experts must be >= 1"));
  CHECK_THAT(error_of([&] { RunLog log(path, make_info(2, {1}, 0, 0)); }),
             has_substr("flush_every must be >= 1"));
  CHECK_THAT(error_of([&] { RunLog log(path, make_info(2, {1, 1}, 0, 1)); }),
             has_substr("listed twice"));

  const int64_t E = 4;
  RunLog log(path, make_info(E, {1, 3}, 2, 1));
  log.log_train(make_row(5, E, 2));
  std::string msg = error_of([&] { log.log_train(make_row(6, E, 1)); });
  CHECK_THAT(msg, has_substr("1 layer rows, expected 2"));
  CHECK_THAT(msg, has_substr(path));
  CHECK_THAT(error_of([&] { log.log_train(make_row(6, E + 1, 2)); }),
             has_substr("expected E = 4"));
  CHECK_THAT(error_of([&] { log.log_train(make_row(5, E, 2)); }),
             has_substr("train step 5 does not come after step 5"));
  EvalRow e = make_eval(5, E, 3, 2);  // 3 categories, the log has 2
  CHECK_THAT(error_of([&] { log.log_eval(e); }), has_substr("expected E * C = 4 * 2 = 8"));
  e = make_eval(5, E, 2, 1);
  CHECK_THAT(error_of([&] { log.log_eval(e); }), has_substr("expected 2 (one per MoE layer)"));
  // Nothing refused reached the file; every dataset still has one row.
  log.log_eval(make_eval(5, E, 2, 2));
  log.flush();
  H5::H5File f(path, H5F_ACC_RDONLY);
  for (auto& [name, n] : per_step_lengths(f)) {
    INFO(name);
    CHECK(n == 1);
  }
  CHECK(read(f, "/router/layer_03/category_counts").dims == std::vector<hsize_t>{1, 4, 2});
}

TEST_CASE("run log: resume keeps the rows up to the resume step", "[runlog]") {
  TempDir tmp;
  const std::string path = tmp.path("run.h5");
  const int64_t E = 2, C = 2;
  const std::vector<int> layers = {1};
  {
    RunLog log(path, make_info(E, layers, C, 4));
    for (int64_t s = 0; s < 10; ++s) {
      log.log_train(make_row(s, E, 1));
      if (s % 4 == 3) log.log_eval(make_eval(s, E, C, 1));
    }
  }
  RunLogInfo info = make_info(E, layers, C, 4);
  info.resume_step = 5;
  {
    RunLog log(path, info);
    CHECK(log.train_rows() == 6);
    CHECK(log.eval_rows() == 1);  // the eval at step 3 (step 7 is after the checkpoint)
    CHECK(rows_on_disk(path) == 10);  // the old log stays whole until this run's first flush
    for (int64_t s = 6; s < 12; ++s) {
      log.log_train(make_row(s, E, 1));
      if (s % 4 == 3) log.log_eval(make_eval(s, E, C, 1));
    }
  }
  {
    H5::H5File f(path, H5F_ACC_RDONLY);
    std::vector<int64_t> steps;
    for (int64_t s = 0; s < 12; ++s) steps.push_back(s);
    CHECK(check_rows(f, E, layers, steps) == 12);
    CHECK(read(f, "/eval/step").i == std::vector<int64_t>{3, 7, 11});
    Data cc = read(f, "/router/layer_01/category_counts");
    REQUIRE(cc.dims == std::vector<hsize_t>{3, 2, 2});
    CHECK(cc.i[4] == make_eval(7, E, C, 1).category_counts[0][0]);
  }
  // A log of another layout is refused, naming the path; a missing file starts a new log.
  RunLogInfo other = make_info(E + 1, layers, C, 4);
  other.resume_step = 5;
  CHECK_THAT(error_of([&] { RunLog log(path, other); }), has_substr("cannot resume from " + path));
  other.resume_step = 0;
  RunLog fresh(tmp.path("new.h5"), other);
  CHECK(fresh.train_rows() == 0);
}

TEST_CASE("run log: a dense model logs an empty /router and no category counts", "[runlog]") {
  TempDir tmp;
  const std::string path = tmp.path("dense.h5");
  {
    RunLog log(path, make_info(1, {}, 0, 2));
    for (int64_t s = 0; s < 3; ++s) log.log_train(make_row(s, 1, 0));
    log.log_eval(make_eval(2, 1, 0, 0));
  }
  H5::H5File f(path, H5F_ACC_RDONLY);
  CHECK(f.openGroup("/router").getNumObjs() == 0);
  CHECK(read(f, "/train/step").i == std::vector<int64_t>{0, 1, 2});
  CHECK(read(f, "/eval/step").i == std::vector<int64_t>{2});
  CHECK_FALSE(f.nameExists("/eval/bits_per_byte"));
  CHECK_FALSE(f.attrExists("category_names"));
  CHECK_FALSE(f.attrExists("sweep_name"));
}
