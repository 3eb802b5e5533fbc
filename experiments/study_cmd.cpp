// moelab: the runs of a study (a [sweep] and/or train.seeds) for `moelab train`, and its index
// sweep.json.
//
// CPU studies: every run is a child process (fork, after the config is parsed and the outputs
// checked, before any OpenMP, HDF5 or backend work) with one OpenMP thread, `jobs` of them at
// once (plan_jobs in core/preflight.h says how many and why). A run's numbers are therefore
// the same whatever --jobs is, and runs share nothing: each has its own log, lock, checkpoint
// folder and fault-injection counts. With jobs > 1 a child's stdout and stderr come through a
// pipe and are printed line by line with the run's name in front ("[aux_alpha=0_seed=2] step
// ..."); with one job the child writes straight to the terminal. A child dies with the parent
// (PR_SET_PDEATHSIG), so an interrupted study leaves no orphan runs.
// A failed run stops the study from starting more runs; the runs in flight finish (their work
// is kept), the index lists every finished run, and the exit status is the failed run's.
// CUDA studies run one after the other in this process (the GPU path of issue 13 part 4 is not
// here).
//
// sweep.json (analysis/moelab_analysis/reader.py reads it), rewritten after every finished run
// through a temporary file and a rename:
//   {"axes": [swept keys], "seeds": [train.seeds, [] without], "baseline": "NAME" or null,
//    "planned_runs": N, "finished_runs": n,
//    "groups": [{"point": NAME, "values": {key: value}, "seeds": [finished seeds],
//                "files": [their logs]}, ...]                    every grid point, in grid order
//    "runs": [{"file", "name", "point", "seed", "values"}, ...]}  the finished runs, in run order
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include "backends/registry.h"
#include "core/check.h"
#include "core/io/fault.h"
#include "core/io/output_file.h"
#include "core/preflight.h"
#include "experiments/commands.h"

#if defined(__GNUC__) && defined(__ELF__)
extern "C" void omp_set_num_threads(int) __attribute__((weak));
#define MOELAB_WEAK_OMP 1
#endif

using moelab::RunConfig;
using moelab::SweepRun;

std::filesystem::path sweep_index_path(const std::vector<SweepRun>& runs) {
  const std::filesystem::path dir = std::filesystem::path(runs.front().config.log.out).parent_path();
  return (dir.empty() ? std::filesystem::path(".") : dir) / "sweep.json";
}

namespace {

std::string json_str(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

// {"key": "value", ...} of one run's swept values (a variant axis: the variant's name).
std::string values_json(const RunConfig& base, const SweepRun& run) {
  std::string js = "{";
  for (size_t a = 0; a < base.sweep.size() && a < run.values.size(); ++a)
    js += (a ? ", " : "") + json_str(base.sweep[a].key) + ": " + json_str(run.values[a]);
  return js + "}";
}

}  // namespace

void write_sweep_index(const RunConfig& base, const std::vector<SweepRun>& runs, const std::vector<bool>& done) {
  namespace fs = std::filesystem;
  size_t finished = 0;
  for (bool d : done) finished += d;
  std::ostringstream js;
  js << "{\n  \"axes\": [";
  for (size_t a = 0; a < base.sweep.size(); ++a) js << (a ? ", " : "") << json_str(base.sweep[a].key);
  js << "],\n  \"seeds\": [";
  for (size_t i = 0; i < base.train.seeds.size(); ++i) js << (i ? ", " : "") << base.train.seeds[i];
  js << "],\n  \"baseline\": " << (base.sweep_baseline.empty() ? "null" : json_str(base.sweep_baseline))
     << ",\n  \"planned_runs\": " << runs.size() << ",\n  \"finished_runs\": " << finished
     << ",\n  \"groups\": [\n";
  // Grid points in grid order (the runs of the first seed come in that order).
  std::vector<std::string> points;
  std::map<std::string, size_t> first_run;
  for (size_t i = 0; i < runs.size(); ++i)
    if (first_run.emplace(runs[i].point, i).second) points.push_back(runs[i].point);
  for (size_t p = 0; p < points.size(); ++p) {
    std::string seeds, files;
    for (size_t i = 0; i < runs.size(); ++i) {
      if (!done[i] || runs[i].point != points[p]) continue;
      seeds += (seeds.empty() ? "" : ", ") + std::to_string(runs[i].config.train.seed);
      files += (files.empty() ? "" : ", ") + json_str(fs::path(runs[i].config.log.out).filename().string());
    }
    js << "    {\"point\": " << json_str(points[p]) << ", \"values\": " << values_json(base, runs[first_run[points[p]]])
       << ", \"seeds\": [" << seeds << "], \"files\": [" << files << "]}" << (p + 1 < points.size() ? "," : "")
       << "\n";
  }
  js << "  ],\n  \"runs\": [\n";
  size_t written = 0;
  for (size_t i = 0; i < runs.size(); ++i) {
    if (!done[i]) continue;
    js << "    {\"file\": " << json_str(fs::path(runs[i].config.log.out).filename().string())
       << ", \"name\": " << json_str(runs[i].name) << ", \"point\": " << json_str(runs[i].point)
       << ", \"seed\": " << runs[i].config.train.seed << ", \"values\": " << values_json(base, runs[i]) << "}"
       << (++written < finished ? "," : "") << "\n";
  }
  js << "  ]\n}\n";
  const std::string path = moelab::resolve_output_target(sweep_index_path(runs).string(), "sweep index");
  const std::string tmp = path + ".tmp";
  moelab::fault::point("sweep.index");
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << js.str();
    out.flush();
    if (!out) {
      out.close();
      std::remove(tmp.c_str());
      MOELAB_FAIL("sweep index ", path, ": cannot write ", tmp, " (is the disk full?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    MOELAB_FAIL("sweep index ", path, ": cannot rename ", tmp, " over it");
}

namespace {

// The exit status main() would give for what a run threw (moelab.cpp's main).
int run_in_child(const SweepRun& run, const TrainCliOptions& cli) {
  try {
    return run_train(run.config, cli);
  } catch (const moelab::UsageError& e) {
    std::cerr << "moelab: error: " << e.what() << "\n";
    return 2;
  } catch (const std::bad_alloc&) {
    std::cerr << "moelab: error: out of memory (std::bad_alloc)\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "moelab: error: " << e.what() << "\n";
    return 1;
  }
}

struct Child {
  pid_t pid = -1;
  size_t run = 0;
  int fd = -1;          // read end of the child's output pipe (-1: it writes to the terminal)
  std::string partial;  // output after the last newline
};

// Prints complete lines of `c`'s output with its run's name in front; `eof` flushes the rest.
void relay(Child& c, const std::string& name, const char* data, size_t n, bool eof) {
  c.partial.append(data, n);
  size_t start = 0, nl;
  while ((nl = c.partial.find('\n', start)) != std::string::npos) {
    std::cout << "[" << name << "] " << c.partial.substr(start, nl - start) << "\n";
    start = nl + 1;
  }
  c.partial.erase(0, start);
  if (eof && !c.partial.empty()) {
    std::cout << "[" << name << "] " << c.partial << "\n";
    c.partial.clear();
  }
  std::cout.flush();
}

int exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 1;  // killed by a signal
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exit status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("killed by signal ") + std::to_string(WTERMSIG(status)) + " (" +
                                  strsignal(WTERMSIG(status)) + ")";
  return "stopped";
}

}  // namespace

int run_study(const RunConfig& base, const std::vector<SweepRun>& runs, const TrainCliOptions& cli,
              int64_t jobs_requested, bool write_index) {
  const size_t n = runs.size();
  std::vector<bool> done(n, false);
  auto start_line = [&](size_t i) {
    std::cout << "moelab: sweep run " << i + 1 << "/" << n << " '" << runs[i].name << "' -> "
              << runs[i].config.log.out << std::endl;
  };
  auto options_of = [&](size_t i) {
    TrainCliOptions o = cli;
    o.out = runs[i].config.log.out;
    o.sweep_name = runs[i].name;
    return o;
  };

  if (base.train.backend != "cpu") {  // CUDA: one run after the other, here
    for (size_t i = 0; i < n; ++i) {
      start_line(i);
      const int rc = run_train(runs[i].config, options_of(i));
      if (rc != 0) return rc;
      done[i] = true;
      if (write_index) write_sweep_index(base, runs, done);
    }
    return 0;
  }

  int64_t threads = 1, bytes = 0;
  for (const SweepRun& r : runs) {
    threads = std::max(threads, r.config.parallel.world());
    bytes = std::max(bytes, moelab::estimate_memory(r.config).total_bytes + moelab::kProcessBytes);
  }
  const moelab::JobPlan plan = moelab::plan_jobs(int64_t(n), threads, moelab::cpu_cores(), bytes,
                                                 moelab::memory_limit_bytes(), jobs_requested);
  const bool piped = plan.jobs > 1;
  std::cout << "moelab: " << n << (n == 1 ? " run" : " runs") << ", " << plan.jobs << " at a time, each "
            << "single-threaded (" << plan.why << ")" << std::endl;

  const pid_t parent = ::getpid();
  std::vector<Child> active;
  size_t next = 0;
  int failure = 0;
  std::string failed_run;
  auto start = [&](size_t i) {
    start_line(i);
    int fds[2] = {-1, -1};
    if (piped && ::pipe2(fds, O_CLOEXEC) != 0) MOELAB_FAIL("sweep: cannot create a pipe: ", std::strerror(errno));
    std::cout.flush();
    std::fflush(nullptr);  // nothing buffered may be printed twice
    const pid_t pid = ::fork();
    if (pid < 0) MOELAB_FAIL("sweep: cannot start run '", runs[i].name, "': fork: ", std::strerror(errno));
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (::getppid() != parent) std::_Exit(1);  // the parent died before prctl
      if (piped) {
        ::dup2(fds[1], STDOUT_FILENO);
        ::dup2(fds[1], STDERR_FILENO);
        ::close(fds[0]);
        ::close(fds[1]);
        std::setvbuf(stdout, nullptr, _IOLBF, 0);
      }
#ifdef MOELAB_WEAK_OMP
      if (omp_set_num_threads) omp_set_num_threads(1);
#endif
      const int rc = run_in_child(runs[i], options_of(i));
      std::cout.flush();
      std::fflush(nullptr);
      std::exit(rc);
    }
    Child c;
    c.pid = pid;
    c.run = i;
    if (piped) {
      ::close(fds[1]);
      c.fd = fds[0];
    }
    active.push_back(std::move(c));
  };
  auto finish = [&](Child& c) {
    int status = 0;
    while (::waitpid(c.pid, &status, 0) < 0 && errno == EINTR) {
    }
    const size_t i = c.run;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
      done[i] = true;
      size_t k = 0;
      for (bool d : done) k += d;
      std::cout << "moelab: sweep run " << i + 1 << "/" << n << " '" << runs[i].name << "' finished (" << k << " of "
                << n << " done)" << std::endl;
      if (write_index) write_sweep_index(base, runs, done);
    } else {
      std::cout << "moelab: sweep run " << i + 1 << "/" << n << " '" << runs[i].name << "' failed ("
                << describe_status(status) << ")" << std::endl;
      if (!failure) {
        failure = exit_code(status);
        if (failure == 0) failure = 1;
        failed_run = runs[i].name;
      }
    }
  };

  while (true) {
    while (!failure && next < n && int64_t(active.size()) < plan.jobs) start(next++);
    if (active.empty()) break;
    if (!piped) {
      finish(active.front());
      active.clear();
      continue;
    }
    std::vector<pollfd> pfds;
    for (const Child& c : active) pfds.push_back({c.fd, POLLIN, 0});
    if (::poll(pfds.data(), pfds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      MOELAB_FAIL("sweep: poll: ", std::strerror(errno));
    }
    for (size_t k = 0; k < active.size();) {
      Child& c = active[k];
      if (!(pfds[k].revents & (POLLIN | POLLHUP | POLLERR))) {
        ++k;
        continue;
      }
      char buf[65536];
      const ssize_t got = ::read(c.fd, buf, sizeof buf);
      if (got > 0) {
        relay(c, runs[c.run].name, buf, size_t(got), false);
        ++k;
        continue;
      }
      if (got < 0 && errno == EINTR) {
        ++k;
        continue;
      }
      relay(c, runs[c.run].name, nullptr, 0, true);  // end of output: the child is exiting
      ::close(c.fd);
      finish(c);
      active.erase(active.begin() + std::ptrdiff_t(k));
      pfds.erase(pfds.begin() + std::ptrdiff_t(k));
    }
  }
  if (failure) {
    size_t k = 0;
    for (bool d : done) k += d;
    std::cout << "moelab: run '" << failed_run << "' failed; " << k << " of " << n
              << " runs finished, the rest were not started" << std::endl;
  }
  return failure;
}
