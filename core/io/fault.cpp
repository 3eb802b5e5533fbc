// moelab: fault injection (see fault.h).
#include "core/io/fault.h"

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

#include "core/check.h"

namespace moelab::fault {
namespace {

struct State {
  std::mutex mu;
  bool env_read = false;
  std::string prefix;   // armed prefix ("" with target 0 = nothing armed)
  int64_t target = 0;   // the hit that fails; 0 = count only
  int64_t count = 0;    // hits of `prefix` since arming
  int64_t all = 0;      // hits of every site since arming
  Action action = Action::Fail;
  bool fired = false;
  bool report_at_exit = false;
};

State& state() {
  static State s;
  return s;
}

void report() {
  State& s = state();
  std::fprintf(stderr, "moelab: fault points: %lld hits of '%s'\n", (long long)s.count, s.prefix.c_str());
}

// MOELAB_FAULT=PREFIX:N[:fail|kill]. A malformed value is a usage error: a test that thinks it
// injects faults must not silently run without them.
void read_env(State& s) {
  s.env_read = true;
  const char* v = std::getenv("MOELAB_FAULT");
  if (!v || !*v) return;
  const std::string spec = v;
  const size_t c1 = spec.find(':');
  if (c1 == std::string::npos) MOELAB_USAGE_FAIL("MOELAB_FAULT='", spec, "' must be PREFIX:N[:fail|kill]");
  const size_t c2 = spec.find(':', c1 + 1);
  const std::string n = spec.substr(c1 + 1, c2 == std::string::npos ? std::string::npos : c2 - c1 - 1);
  const std::string act = c2 == std::string::npos ? "fail" : spec.substr(c2 + 1);
  char* end = nullptr;
  const long long target = std::strtoll(n.c_str(), &end, 10);
  if (n.empty() || *end || target < 0 || (act != "fail" && act != "kill"))
    MOELAB_USAGE_FAIL("MOELAB_FAULT='", spec, "' must be PREFIX:N[:fail|kill] with N >= 0");
  s.prefix = spec.substr(0, c1);
  s.target = target;
  s.action = act == "kill" ? Action::Kill : Action::Fail;
  if (target == 0 && !s.report_at_exit) {
    s.report_at_exit = true;
    std::atexit(report);
  }
}

}  // namespace

void point(const char* site) {
  State& s = state();
  std::unique_lock<std::mutex> lock(s.mu);
  if (!s.env_read) read_env(s);
  ++s.all;
  if (std::string(site).rfind(s.prefix, 0) != 0) return;
  ++s.count;
  if (s.target == 0 || s.count != s.target) return;
  s.fired = true;
  if (s.action == Action::Kill) {
    std::fflush(nullptr);
    std::raise(SIGKILL);
  }
  const int64_t n = s.count;
  lock.unlock();
  MOELAB_FAIL("injected fault at ", site, " (hit ", n, " of '", s.prefix, "')");
}

void arm(const std::string& prefix, int64_t n, Action action) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.env_read = true;
  s.prefix = prefix;
  s.target = n;
  s.action = action;
  s.count = s.all = 0;
  s.fired = false;
}

void disarm() { arm("", 0); }

int64_t hits(const std::string& prefix) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  MOELAB_CHECK(prefix.empty() || prefix == s.prefix, "fault::hits('", prefix,
               "'): only the armed prefix '", s.prefix, "' or \"\" is counted");
  return prefix.empty() ? s.all : s.count;
}

bool fired() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.fired;
}

}  // namespace moelab::fault
