// moelab: the HDF5 run log. Design, invariants and crash-safety argument in run_log.h; the file
// layout in docs/run-log.md. Rows are kept column-wise in memory (one vector per dataset) and
// every flush writes all of them to a new file that replaces the old one by rename().
#include "core/io/run_log.h"

#include <H5Cpp.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <limits>
#include <set>

#include "core/check.h"
#include "core/io/fault.h"
#include "core/io/output_file.h"

namespace fs = std::filesystem;

namespace moelab {

std::string run_log_layer_name(int layer) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "layer_%02d", layer);
  return buf;
}

namespace {

// Silences HDF5's automatic error-stack printing while alive (errors become moelab::Error).
struct H5Quiet {
  H5E_auto2_t func = nullptr;
  void* data = nullptr;
  H5Quiet() {
    H5Eget_auto2(H5E_DEFAULT, &func, &data);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~H5Quiet() { H5Eset_auto2(H5E_DEFAULT, func, data); }
  H5Quiet(const H5Quiet&) = delete;
  H5Quiet& operator=(const H5Quiet&) = delete;
};

const H5::PredType& file_type(int64_t) { return H5::PredType::STD_I64LE; }
const H5::PredType& file_type(double) { return H5::PredType::IEEE_F64LE; }
const H5::PredType& mem_type(int64_t) { return H5::PredType::NATIVE_INT64; }
const H5::PredType& mem_type(double) { return H5::PredType::NATIVE_DOUBLE; }

// Writes `data` (row-major, dims) as a new dataset `name` of `g` (contiguous layout: the file
// is written once and never extended).
template <class T>
void write_dataset(H5::Group& g, const std::string& name, const std::vector<hsize_t>& dims,
                   const std::vector<T>& data) {
  hsize_t n = 1;
  for (hsize_t d : dims) n *= d;
  MOELAB_CHECK(n == data.size(), "run log dataset ", name, ": ", data.size(),
               " values for shape of ", n);
  fault::point("log.hdf5");
  H5::DataSpace space(int(dims.size()), dims.data());
  H5::DataSet ds = g.createDataSet(name, file_type(T{}), space);
  if (n > 0) ds.write(data.data(), mem_type(T{}));
}

H5::StrType vlen_utf8() {
  H5::StrType t(H5::PredType::C_S1, H5T_VARIABLE);
  t.setCset(H5T_CSET_UTF8);
  return t;
}

void write_string_attr(H5::H5Object& obj, const std::string& name, const std::string& value) {
  fault::point("log.hdf5");
  H5::StrType t = vlen_utf8();
  H5::Attribute a = obj.createAttribute(name, t, H5::DataSpace(H5S_SCALAR));
  a.write(t, value);
}

void write_strings_attr(H5::H5Object& obj, const std::string& name,
                        const std::vector<std::string>& values) {
  fault::point("log.hdf5");
  H5::StrType t = vlen_utf8();
  hsize_t n = values.size();
  H5::Attribute a = obj.createAttribute(name, t, H5::DataSpace(1, &n));
  std::vector<const char*> ptrs;
  for (const auto& s : values) ptrs.push_back(s.c_str());
  a.write(t, ptrs.data());
}

void write_i64_attr(H5::H5Object& obj, const std::string& name, int64_t v) {
  fault::point("log.hdf5");
  H5::Attribute a = obj.createAttribute(name, H5::PredType::STD_I64LE, H5::DataSpace(H5S_SCALAR));
  a.write(H5::PredType::NATIVE_INT64, &v);
}

void write_i64s_attr(H5::H5Object& obj, const std::string& name, const std::vector<int64_t>& v) {
  fault::point("log.hdf5");
  hsize_t n = v.size();
  H5::Attribute a = obj.createAttribute(name, H5::PredType::STD_I64LE, H5::DataSpace(1, &n));
  if (n > 0) a.write(H5::PredType::NATIVE_INT64, v.data());
}

// Reads a whole dataset of `g` as T; dims must have `rank` axes.
template <class T>
std::vector<T> read_dataset(const H5::Group& g, const std::string& name, int rank,
                            std::vector<hsize_t>& dims) {
  H5::DataSet ds = g.openDataSet(name);
  H5::DataSpace space = ds.getSpace();
  MOELAB_CHECK(space.getSimpleExtentNdims() == rank, "dataset ", name, " has ",
               space.getSimpleExtentNdims(), " axes, expected ", rank);
  dims.assign(size_t(rank), 0);
  space.getSimpleExtentDims(dims.data());
  hsize_t n = 1;
  for (hsize_t d : dims) n *= d;
  std::vector<T> out(n);
  if (n > 0) ds.read(out.data(), mem_type(T{}));
  return out;
}

std::string read_string_attr(const H5::H5Object& obj, const std::string& name) {
  H5::Attribute a = obj.openAttribute(name);
  std::string v;
  a.read(a.getStrType(), v);
  return v;
}

int64_t read_i64_attr(const H5::H5Object& obj, const std::string& name) {
  H5::Attribute a = obj.openAttribute(name);
  int64_t v = 0;
  a.read(H5::PredType::NATIVE_INT64, &v);
  return v;
}

std::vector<std::string> read_strings_attr(const H5::H5Object& obj, const std::string& name) {
  H5::Attribute a = obj.openAttribute(name);
  H5::DataSpace space = a.getSpace();
  MOELAB_CHECK(space.getSimpleExtentNdims() == 1, "attribute ", name, " is not a list");
  hsize_t n = 0;
  space.getSimpleExtentDims(&n);
  std::vector<char*> ptrs(n, nullptr);
  H5::StrType t = vlen_utf8();
  if (n) a.read(t, ptrs.data());
  std::vector<std::string> out;
  for (char* p : ptrs) out.emplace_back(p ? p : "");
  if (n) H5Dvlen_reclaim(t.getId(), space.getId(), H5P_DEFAULT, ptrs.data());
  return out;
}

// Makes a rename in `dir` durable. Best effort: some file systems cannot open or fsync a folder.
void fsync_folder(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0 && err != EINVAL && err != EBADF && err != EROFS)
    MOELAB_FAIL("run log: fsync of folder ", dir, " failed: ", std::strerror(err));
}

}  // namespace

// ---- in-memory columns --------------------------------------------------------------------

struct LayerColumns {
  std::vector<int64_t> routed, kept;  // [N*E]
  std::vector<double> mean_prob;      // [N*E]
  std::vector<double> aux_loss, z_loss, importance_loss, load_loss, weighted_loss;  // [N]
  std::vector<double> entropy, top1_prob, logit_rms, logit_max;                     // [N]
  std::vector<int64_t> dropped, capacity, tokens_unrouted;                          // [N]
  std::vector<int64_t> category_counts;                                             // [M*E*C]
};

struct RunLog::Impl {
  std::string path;    // as the user gave it (messages)
  std::string target;  // the file written: path, or the final target of its symlink chain
  OutputLock lock;     // one writer per target
  RunLogInfo info;
  std::vector<std::string> resume_changes;  // root attribute: the old log's, then this run's
  int64_t E = 0, C = 0;
  // /train, [N]
  std::vector<int64_t> step;
  std::vector<double> loss, lr, grad_norm, tokens_per_sec;
  std::vector<int64_t> loss_tokens;
  std::string init_from, init_from_run_id;  // root attributes (this run's, or the old log's)
  int64_t init_from_step = -1;
  // /eval, [M]
  std::vector<int64_t> eval_step;
  std::vector<double> eval_loss, eval_bpb, eval_resp;
  bool any_bpb = false, any_resp = false;
  std::vector<LayerColumns> layers;  // one per info.moe_layers
  // /parallel, [N * ranks] (ranks > 1 only)
  std::vector<int64_t> rank_sent, rank_recv;
  std::vector<double> rank_comm, rank_a2a;
  int64_t since_flush = 0;           // train rows logged since the last flush
  int64_t flushed_n = 0;
  bool dirty = true;
  bool failed = false;  // a flush failed: the file on disk is the last good one; stop writing
  bool logged = false;  // any row logged by this RunLog (an existing file is replaced, or
                        // trimmed to the resume step, only once this run has something to add)

  int64_t n() const { return int64_t(step.size()); }
  int64_t m() const { return int64_t(eval_step.size()); }

  void write_file(const std::string& file) const;
  void write_contents(H5::H5File& f) const;
  void read_back(const std::string& file) const;
  void load(const std::string& file, int64_t resume_step);
  void flush();
};

// HDF5 never touches the disk here. The file is built in memory (the core driver, no backing
// store) and its image is written with plain write()/fsync(), every status checked. Why: when
// HDF5 itself writes to a disk that fills up, the failure surfaces in destructors (which only
// print), the library keeps a half-closed file with dirty metadata, and the process later dies
// with SIGSEGV when HDF5 tries again at exit. In memory, every HDF5 call either succeeds or
// throws H5::Exception, and the I/O errors are ours to report.
void RunLog::Impl::write_file(const std::string& file) const {
  std::vector<char> image;
  {
    fault::point("log.hdf5");
    H5::FileAccPropList fapl;
    fapl.setCore(1 << 20, /*backing_store=*/false);
    H5::H5File f(file, H5F_ACC_TRUNC, H5::FileCreatPropList::DEFAULT, fapl);
    write_contents(f);
    f.flush(H5F_SCOPE_GLOBAL);
    const ssize_t size = H5Fget_file_image(f.getId(), nullptr, 0);
    MOELAB_CHECK(size > 0, "HDF5 could not report the size of the file image");
    image.resize(size_t(size));
    MOELAB_CHECK(H5Fget_file_image(f.getId(), image.data(), image.size()) == size,
                 "HDF5 could not copy the file image");
    f.close();
  }
  fault::point("log.write");
  const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) MOELAB_FAIL("cannot create ", file, ": ", std::strerror(errno));
  const char* p = image.data();
  size_t left = image.size();
  while (left > 0) {
    const ssize_t w = ::write(fd, p, left);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const int err = w < 0 ? errno : ENOSPC;
      ::close(fd);
      MOELAB_FAIL("writing ", file, " failed after ", image.size() - left, " of ", image.size(),
                  " bytes: ", std::strerror(err));
    }
    p += w;
    left -= size_t(w);
  }
  fault::point("log.fsync");
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    MOELAB_FAIL("fsync of ", file, " failed: ", std::strerror(err));
  }
  if (::close(fd) != 0) MOELAB_FAIL("close of ", file, " failed: ", std::strerror(errno));
}

void RunLog::Impl::write_contents(H5::H5File& f) const {
  const hsize_t N = hsize_t(n()), M = hsize_t(m()), HE = hsize_t(E), HC = hsize_t(C);
  write_string_attr(f, "config", info.config_ini);
  if (!info.run_id.empty()) write_string_attr(f, "run_id", info.run_id);
  if (!resume_changes.empty()) write_strings_attr(f, "resume_changes", resume_changes);
  write_string_attr(f, "moelab_version", info.moelab_version);
  write_string_attr(f, "backend", info.backend);
  if (!info.category_names.empty()) write_strings_attr(f, "category_names", info.category_names);
  if (!info.sweep_name.empty()) write_string_attr(f, "sweep_name", info.sweep_name);
  if (!init_from.empty()) {
    write_string_attr(f, "init_from", init_from);
    write_string_attr(f, "init_from_run_id", init_from_run_id);
    write_i64_attr(f, "init_from_step", init_from_step);
  }
  if (info.skipped_records >= 0) write_i64_attr(f, "data_skipped_records", info.skipped_records);
  write_i64_attr(f, "experts", E);
  write_i64_attr(f, "flush_every", info.flush_every);
  if (!info.moe_layers.empty())
    write_i64s_attr(f, "moe_layers",
                    std::vector<int64_t>(info.moe_layers.begin(), info.moe_layers.end()));

  H5::Group tg = f.createGroup("/train");
  write_dataset(tg, "step", {N}, step);
  write_dataset(tg, "loss", {N}, loss);
  write_dataset(tg, "lr", {N}, lr);
  write_dataset(tg, "grad_norm", {N}, grad_norm);
  write_dataset(tg, "tokens_per_sec", {N}, tokens_per_sec);
  write_dataset(tg, "loss_tokens", {N}, loss_tokens);

  if (info.ranks > 1) {
    write_i64_attr(f, "parallel_ep", info.parallel_ep);
    write_i64_attr(f, "parallel_dp", info.parallel_dp);
    const hsize_t W = hsize_t(info.ranks);
    H5::Group pg = f.createGroup("/parallel");
    write_dataset(pg, "a2a_sent_bytes", {N, W}, rank_sent);
    write_dataset(pg, "a2a_recv_bytes", {N, W}, rank_recv);
    write_dataset(pg, "comm_seconds", {N, W}, rank_comm);
    write_dataset(pg, "a2a_seconds", {N, W}, rank_a2a);
  }

  H5::Group eg = f.createGroup("/eval");
  write_dataset(eg, "step", {M}, eval_step);
  write_dataset(eg, "loss", {M}, eval_loss);
  if (any_bpb) write_dataset(eg, "bits_per_byte", {M}, eval_bpb);
  if (any_resp) write_dataset(eg, "response_loss", {M}, eval_resp);

  H5::Group rg = f.createGroup("/router");
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerColumns& c = layers[l];
    H5::Group g = rg.createGroup(run_log_layer_name(info.moe_layers[l]));
    write_i64_attr(g, "layer_index", info.moe_layers[l]);
    write_dataset(g, "routed", {N, HE}, c.routed);
    write_dataset(g, "kept", {N, HE}, c.kept);
    write_dataset(g, "mean_prob", {N, HE}, c.mean_prob);
    write_dataset(g, "aux_loss", {N}, c.aux_loss);
    write_dataset(g, "z_loss", {N}, c.z_loss);
    write_dataset(g, "importance_loss", {N}, c.importance_loss);
    write_dataset(g, "load_loss", {N}, c.load_loss);
    write_dataset(g, "weighted_loss", {N}, c.weighted_loss);
    write_dataset(g, "entropy", {N}, c.entropy);
    write_dataset(g, "top1_prob", {N}, c.top1_prob);
    write_dataset(g, "logit_rms", {N}, c.logit_rms);
    write_dataset(g, "logit_max", {N}, c.logit_max);
    write_dataset(g, "dropped", {N}, c.dropped);
    write_dataset(g, "capacity", {N}, c.capacity);
    write_dataset(g, "tokens_unrouted", {N}, c.tokens_unrouted);
    if (C > 0) {
      write_dataset(g, "category_counts", {M, HE, HC}, c.category_counts);
      H5::DataSet cc = g.openDataSet("category_counts");
      write_strings_attr(cc, "category_names", info.category_names);
    }
  }
}

// Reopens a freshly written file and checks that its row counts and last step are the ones in
// memory: a file that HDF5 could not complete is never renamed over the previous good log.
void RunLog::Impl::read_back(const std::string& file) const {
  fault::point("log.verify");
  H5::H5File f(file, H5F_ACC_RDONLY);
  std::vector<hsize_t> d;
  const auto steps = read_dataset<int64_t>(f.openGroup("/train"), "step", 1, d);
  const auto evals = read_dataset<int64_t>(f.openGroup("/eval"), "step", 1, d);
  MOELAB_CHECK(steps == step && evals == eval_step, "the written file holds ", steps.size(),
               " train rows and ", evals.size(), " eval rows, expected ", step.size(), " and ",
               eval_step.size());
  MOELAB_CHECK(f.openGroup("/router").getNumObjs() == hsize_t(layers.size()),
               "the written file lacks router groups");
  f.close();
}

void RunLog::Impl::flush() {
  if (!dirty) return;
  if (failed)
    MOELAB_FAIL("run log ", path, ": an earlier flush failed; the file keeps the rows of the last "
                "good flush (", flushed_n, " train rows)");
  const std::string tmp = target + ".tmp";
  try {
    try {
      H5Quiet quiet;
      write_file(tmp);
      read_back(tmp);
    } catch (const H5::Exception& e) {
      MOELAB_FAIL("HDF5 ", e.getFuncName(), " failed while writing ", tmp, ": ", e.getDetailMsg());
    }
    fault::point("log.rename");
    if (std::rename(tmp.c_str(), target.c_str()) != 0)
      MOELAB_FAIL("cannot rename ", tmp, " over it: ", std::strerror(errno));
  } catch (const Error& e) {
    ::unlink(tmp.c_str());  // ours; the previous good log at `target` is untouched
    failed = true;
    MOELAB_FAIL("run log ", path, ": flush failed, the file keeps the rows of the last good flush (",
                flushed_n, " train rows): ", e.what());
  }
  fs::path parent = fs::path(target).parent_path();
  fsync_folder(parent.empty() ? "." : parent.string());
  flushed_n = n();
  since_flush = 0;
  dirty = false;
}

// Loads the rows of an existing log with step <= resume_step (train and eval) into the columns.
void RunLog::Impl::load(const std::string& file, int64_t resume_step) {
  try {
    H5Quiet quiet;
    H5::H5File f(file, H5F_ACC_RDONLY);
    // The log must be this run's: rows of another run would be spliced under this run's config.
    const std::string old_id = f.attrExists("run_id") ? read_string_attr(f, "run_id") : std::string();
    if (old_id != info.run_id)
      MOELAB_FAIL("it belongs to ", old_id.empty() ? std::string("a run without a run id (older moelab)")
                                                   : "run " + old_id,
                  ", the checkpoint to run ", info.run_id,
                  "; resume into the log of the run the checkpoint came from, or give a new --out");
    if (f.attrExists("resume_changes")) resume_changes = read_strings_attr(f, "resume_changes");
    if (init_from.empty() && f.attrExists("init_from")) {
      init_from = read_string_attr(f, "init_from");
      if (f.attrExists("init_from_run_id")) init_from_run_id = read_string_attr(f, "init_from_run_id");
      if (f.attrExists("init_from_step")) init_from_step = read_i64_attr(f, "init_from_step");
    }
    std::vector<hsize_t> d;
    H5::Group tg = f.openGroup("/train");
    step = read_dataset<int64_t>(tg, "step", 1, d);
    const size_t N0 = step.size();
    auto series = [&](const H5::Group& g, const char* name, size_t len) {
      auto v = read_dataset<double>(g, name, 1, d);
      MOELAB_CHECK(v.size() == len, name, " has ", v.size(), " rows, expected ", len);
      return v;
    };
    auto iseries = [&](const H5::Group& g, const char* name, size_t len) {
      auto v = read_dataset<int64_t>(g, name, 1, d);
      MOELAB_CHECK(v.size() == len, name, " has ", v.size(), " rows, expected ", len);
      return v;
    };
    loss = series(tg, "loss", N0);
    lr = series(tg, "lr", N0);
    grad_norm = series(tg, "grad_norm", N0);
    tokens_per_sec = series(tg, "tokens_per_sec", N0);
    // Logs written before /train/loss_tokens existed: their rows were not counted (-1).
    loss_tokens = tg.nameExists("loss_tokens") ? iseries(tg, "loss_tokens", N0) : std::vector<int64_t>(N0, -1);

    // Per-rank rows: kept when the old log has the same number of ranks; a resume at another
    // layout (checkpoints reshard) fills the old rows with -1 bytes and NaN seconds.
    if (info.ranks > 1) {
      const size_t W = size_t(info.ranks);
      if (f.nameExists("/parallel")) {
        H5::Group pg = f.openGroup("/parallel");
        rank_sent = read_dataset<int64_t>(pg, "a2a_sent_bytes", 2, d);
        const bool same = d[0] == N0 && d[1] == W;
        rank_recv = read_dataset<int64_t>(pg, "a2a_recv_bytes", 2, d);
        rank_comm = read_dataset<double>(pg, "comm_seconds", 2, d);
        rank_a2a = read_dataset<double>(pg, "a2a_seconds", 2, d);
        if (!same) rank_sent.clear();
      }
      if (rank_sent.size() != N0 * W) {
        rank_sent.assign(N0 * W, -1);
        rank_recv.assign(N0 * W, -1);
        rank_comm.assign(N0 * W, std::numeric_limits<double>::quiet_NaN());
        rank_a2a.assign(N0 * W, std::numeric_limits<double>::quiet_NaN());
      }
    }
    H5::Group eg = f.openGroup("/eval");
    eval_step = read_dataset<int64_t>(eg, "step", 1, d);
    const size_t M0 = eval_step.size();
    eval_loss = series(eg, "loss", M0);
    any_bpb = eg.nameExists("bits_per_byte");
    any_resp = eg.nameExists("response_loss");
    eval_resp = any_resp ? series(eg, "response_loss", M0)
                         : std::vector<double>(M0, std::numeric_limits<double>::quiet_NaN());
    eval_bpb = any_bpb ? series(eg, "bits_per_byte", M0)
                       : std::vector<double>(M0, std::numeric_limits<double>::quiet_NaN());

    H5::Group rg = f.openGroup("/router");
    MOELAB_CHECK(rg.getNumObjs() == hsize_t(layers.size()), "the old log has ", rg.getNumObjs(),
                 " MoE layer groups, this run has ", layers.size());
    for (size_t l = 0; l < layers.size(); ++l) {
      const std::string name = run_log_layer_name(info.moe_layers[l]);
      MOELAB_CHECK(rg.nameExists(name), "the old log has no /router/", name);
      H5::Group g = rg.openGroup(name);
      LayerColumns& c = layers[l];
      auto matrix_i = [&](const char* nm) {
        auto v = read_dataset<int64_t>(g, nm, 2, d);
        MOELAB_CHECK(d[0] == N0 && int64_t(d[1]) == E, name, "/", nm, " has shape [", d[0], ",",
                     d[1], "], expected [", N0, ",", E, "]");
        return v;
      };
      c.routed = matrix_i("routed");
      c.kept = matrix_i("kept");
      c.mean_prob = read_dataset<double>(g, "mean_prob", 2, d);
      MOELAB_CHECK(d[0] == N0 && int64_t(d[1]) == E, name, "/mean_prob has the wrong shape");
      c.aux_loss = series(g, "aux_loss", N0);
      c.z_loss = series(g, "z_loss", N0);
      c.importance_loss = series(g, "importance_loss", N0);
      c.load_loss = series(g, "load_loss", N0);
      c.weighted_loss = series(g, "weighted_loss", N0);
      c.entropy = series(g, "entropy", N0);
      c.top1_prob = series(g, "top1_prob", N0);
      c.logit_rms = series(g, "logit_rms", N0);
      c.logit_max = series(g, "logit_max", N0);
      c.dropped = iseries(g, "dropped", N0);
      c.capacity = iseries(g, "capacity", N0);
      c.tokens_unrouted = iseries(g, "tokens_unrouted", N0);
      if (C > 0) {
        MOELAB_CHECK(g.nameExists("category_counts"), "the old log has no /router/", name,
                     "/category_counts, this run has ", C, " categories");
        c.category_counts = read_dataset<int64_t>(g, "category_counts", 3, d);
        MOELAB_CHECK(d[0] == M0 && int64_t(d[1]) == E && int64_t(d[2]) == C, name,
                     "/category_counts has shape [", d[0], ",", d[1], ",", d[2], "], expected [",
                     M0, ",", E, ",", C, "]");
      } else {
        MOELAB_CHECK(!g.nameExists("category_counts"),
                     "the old log has category_counts, this run has no categories");
      }
    }
    f.close();
  } catch (const H5::Exception& e) {
    MOELAB_FAIL("run log ", path, ": cannot resume from ", file, ": HDF5 ", e.getFuncName(),
                ": ", e.getDetailMsg());
  } catch (const Error& e) {
    MOELAB_FAIL("run log ", path, ": cannot resume from ", file, ": ", e.what());
  }

  // Keep the prefix of rows with step <= resume_step.
  size_t keep_n = 0;
  while (keep_n < step.size() && step[keep_n] <= resume_step) ++keep_n;
  size_t keep_m = 0;
  while (keep_m < eval_step.size() && eval_step[keep_m] <= resume_step) ++keep_m;
  const size_t e = size_t(E);
  step.resize(keep_n);
  for (auto* v : {&loss, &lr, &grad_norm, &tokens_per_sec}) v->resize(keep_n);
  loss_tokens.resize(keep_n);
  if (info.ranks > 1) {
    rank_sent.resize(keep_n * size_t(info.ranks));
    rank_recv.resize(keep_n * size_t(info.ranks));
    rank_comm.resize(keep_n * size_t(info.ranks));
    rank_a2a.resize(keep_n * size_t(info.ranks));
  }
  eval_step.resize(keep_m);
  eval_loss.resize(keep_m);
  eval_bpb.resize(keep_m);
  eval_resp.resize(keep_m);
  for (LayerColumns& c : layers) {
    c.routed.resize(keep_n * e);
    c.kept.resize(keep_n * e);
    c.mean_prob.resize(keep_n * e);
    for (auto* v : {&c.aux_loss, &c.z_loss, &c.importance_loss, &c.load_loss, &c.weighted_loss,
                    &c.entropy, &c.top1_prob, &c.logit_rms, &c.logit_max})
      v->resize(keep_n);
    for (auto* v : {&c.dropped, &c.capacity, &c.tokens_unrouted}) v->resize(keep_n);
    c.category_counts.resize(keep_m * e * size_t(C));
  }
}

// ---- RunLog --------------------------------------------------------------------------------

RunLog::RunLog(const std::string& path, const RunLogInfo& info) : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.path = path;
  s.info = info;
  s.E = info.experts;
  s.C = int64_t(info.category_names.size());
  if (path.empty()) MOELAB_FAIL("run log: empty output path");
  if (info.experts < 1)
    MOELAB_FAIL("run log ", path, ": experts must be >= 1, got ", info.experts);
  if (info.flush_every < 1)
    MOELAB_FAIL("run log ", path, ": flush_every must be >= 1, got ", info.flush_every);
  std::set<int> seen;
  for (int l : info.moe_layers) {
    if (l < 0) MOELAB_FAIL("run log ", path, ": MoE layer index ", l, " is negative");
    if (!seen.insert(l).second)
      MOELAB_FAIL("run log ", path, ": MoE layer index ", l, " is listed twice");
  }
  s.layers.resize(info.moe_layers.size());

  s.target = resolve_output_target(path, "run log");
  fs::path parent = fs::path(s.target).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    fs::create_directories(parent, ec);
    if (ec)
      MOELAB_FAIL("run log ", path, ": cannot create folder ", parent.string(), ": ",
                  ec.message());
  }
  s.lock = OutputLock(s.target, "run log");
  // Never destroy an existing log implicitly. Resume keeps its rows up to the checkpoint's step;
  // overwrite replaces it, but only at the first flush of this run, so a run that fails before
  // writing anything leaves the old log as it was.
  std::error_code ec;
  const bool exists = fs::exists(s.target, ec);
  if (info.resume_step >= 0 && exists) {
    s.load(s.target, info.resume_step);
  } else if (exists && !info.overwrite) {
    MOELAB_USAGE_FAIL("run log ", path, " exists; pass --overwrite to replace it (at this run's "
                      "first flush), --resume to continue its run, or choose another --out");
  }
  s.resume_changes.insert(s.resume_changes.end(), info.resume_changes.begin(), info.resume_changes.end());
  if (!info.init_from.empty()) {
    s.init_from = info.init_from;
    s.init_from_run_id = info.init_from_run_id;
    s.init_from_step = info.init_from_step;
  }
  // A new file is written at once (zero rows): the name is taken, and a run killed before its
  // first flush still leaves a readable log. An existing one waits for this run's first flush.
  if (!exists) s.flush();
}

RunLog::~RunLog() {
  if (!impl_ || impl_->failed || !impl_->logged) return;
  try {
    impl_->flush();
  } catch (const std::exception& e) {
    std::cerr << "moelab: warning: final flush of the run log failed: " << e.what() << "\n";
  }
}

RunLog::RunLog(RunLog&&) noexcept = default;
RunLog& RunLog::operator=(RunLog&& other) noexcept {
  if (this != &other) {
    if (impl_ && !impl_->failed && impl_->logged) {
      try {
        impl_->flush();
      } catch (const std::exception& e) {
        std::cerr << "moelab: warning: final flush of the run log failed: " << e.what() << "\n";
      }
    }
    impl_ = std::move(other.impl_);
  }
  return *this;
}

void RunLog::log_train(const TrainRow& row) {
  MOELAB_CHECK(impl_, "run log used after move");
  Impl& s = *impl_;
  if (!s.step.empty() && row.step <= s.step.back())
    MOELAB_FAIL("run log ", s.path, ": train step ", row.step, " does not come after step ",
                s.step.back());
  if (row.layers.size() != s.layers.size())
    MOELAB_FAIL("run log ", s.path, ": train row at step ", row.step, " has ", row.layers.size(),
                " layer rows, expected ", s.layers.size(), " (one per MoE layer)");
  const size_t e = size_t(s.E);
  for (size_t l = 0; l < s.layers.size(); ++l) {
    const RouterStats& st = row.layers[l].stats;
    if (st.routed.size() != e || st.kept.size() != e || st.mean_prob.size() != e)
      MOELAB_FAIL("run log ", s.path, ": train row at step ", row.step, ", layer ",
                  run_log_layer_name(s.info.moe_layers[l]), ": routed/kept/mean_prob have ",
                  st.routed.size(), "/", st.kept.size(), "/", st.mean_prob.size(),
                  " entries, expected E = ", e);
  }

  if (s.info.ranks > 1) {
    const size_t W = size_t(s.info.ranks);
    if (row.rank_sent_bytes.size() != W || row.rank_recv_bytes.size() != W ||
        row.rank_comm_seconds.size() != W || row.rank_a2a_seconds.size() != W)
      MOELAB_FAIL("run log ", s.path, ": train row at step ", row.step, " has ", row.rank_sent_bytes.size(),
                  " per-rank entries, expected ", W, " (RunLogInfo::ranks)");
    s.rank_sent.insert(s.rank_sent.end(), row.rank_sent_bytes.begin(), row.rank_sent_bytes.end());
    s.rank_recv.insert(s.rank_recv.end(), row.rank_recv_bytes.begin(), row.rank_recv_bytes.end());
    s.rank_comm.insert(s.rank_comm.end(), row.rank_comm_seconds.begin(), row.rank_comm_seconds.end());
    s.rank_a2a.insert(s.rank_a2a.end(), row.rank_a2a_seconds.begin(), row.rank_a2a_seconds.end());
  }
  s.step.push_back(row.step);
  s.loss.push_back(row.loss);
  s.lr.push_back(row.lr);
  s.grad_norm.push_back(row.grad_norm);
  s.tokens_per_sec.push_back(row.tokens_per_sec);
  s.loss_tokens.push_back(row.loss_tokens);
  for (size_t l = 0; l < s.layers.size(); ++l) {
    const LayerRouterRow& r = row.layers[l];
    LayerColumns& c = s.layers[l];
    int64_t dropped = 0;
    for (size_t i = 0; i < e; ++i) dropped += r.stats.routed[i] - r.stats.kept[i];
    c.routed.insert(c.routed.end(), r.stats.routed.begin(), r.stats.routed.end());
    c.kept.insert(c.kept.end(), r.stats.kept.begin(), r.stats.kept.end());
    c.mean_prob.insert(c.mean_prob.end(), r.stats.mean_prob.begin(), r.stats.mean_prob.end());
    c.aux_loss.push_back(r.losses.aux);
    c.z_loss.push_back(r.losses.z);
    c.importance_loss.push_back(r.losses.importance);
    c.load_loss.push_back(r.losses.load);
    c.weighted_loss.push_back(r.losses.weighted);
    c.entropy.push_back(r.stats.entropy);
    c.top1_prob.push_back(r.stats.top1_prob);
    c.logit_rms.push_back(r.stats.logit_rms);
    c.logit_max.push_back(r.stats.logit_max);
    c.dropped.push_back(dropped);
    c.capacity.push_back(r.capacity);
    c.tokens_unrouted.push_back(r.stats.tokens_unrouted);
  }
  s.dirty = true;
  s.logged = true;
  if (++s.since_flush >= s.info.flush_every) s.flush();
}

void RunLog::log_eval(const EvalRow& row) {
  MOELAB_CHECK(impl_, "run log used after move");
  Impl& s = *impl_;
  if (!s.eval_step.empty() && row.step <= s.eval_step.back())
    MOELAB_FAIL("run log ", s.path, ": eval step ", row.step, " does not come after step ",
                s.eval_step.back());
  const size_t ec = size_t(s.E * s.C);
  if (s.C == 0) {
    for (const auto& v : row.category_counts)
      if (!v.empty())
        MOELAB_FAIL("run log ", s.path, ": eval row at step ", row.step,
                    " has category counts but RunLogInfo::category_names is empty");
  } else {
    if (row.category_counts.size() != s.layers.size())
      MOELAB_FAIL("run log ", s.path, ": eval row at step ", row.step, " has ",
                  row.category_counts.size(), " category count matrices, expected ",
                  s.layers.size(), " (one per MoE layer)");
    for (size_t l = 0; l < s.layers.size(); ++l)
      if (row.category_counts[l].size() != ec)
        MOELAB_FAIL("run log ", s.path, ": eval row at step ", row.step, ", layer ",
                    run_log_layer_name(s.info.moe_layers[l]), ": category_counts has ",
                    row.category_counts[l].size(), " entries, expected E * C = ", s.E, " * ",
                    s.C, " = ", ec);
  }

  s.eval_step.push_back(row.step);
  s.eval_loss.push_back(row.loss);
  s.eval_bpb.push_back(row.bits_per_byte.value_or(std::numeric_limits<double>::quiet_NaN()));
  if (row.bits_per_byte) s.any_bpb = true;
  s.eval_resp.push_back(row.response_loss.value_or(std::numeric_limits<double>::quiet_NaN()));
  if (row.response_loss) s.any_resp = true;
  if (s.C > 0)
    for (size_t l = 0; l < s.layers.size(); ++l) {
      auto& dst = s.layers[l].category_counts;
      dst.insert(dst.end(), row.category_counts[l].begin(), row.category_counts[l].end());
    }
  s.dirty = true;
  s.logged = true;
}

void RunLog::flush() {
  MOELAB_CHECK(impl_, "run log used after move");
  impl_->flush();
}

const std::string& RunLog::path() const { return impl_->path; }
int64_t RunLog::train_rows() const { return impl_->n(); }
int64_t RunLog::eval_rows() const { return impl_->m(); }
int64_t RunLog::flushed_train_rows() const { return impl_->flushed_n; }

}  // namespace moelab
