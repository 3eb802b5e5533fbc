// moelab: a per-phase time breakdown of the work queued on a backend (moelab bench --breakdown).
//
// Code marks phases with ProfileScope (router, permute, experts, attention, ...). Scopes nest: a
// stretch of the queue belongs to the innermost open scope, so the phases partition the step.
// With no profiler attached to the backend (the normal case) a scope costs one pointer test.
// With one, every scope boundary records a timing mark on the backend's queue (CUDA: an event on
// its stream, so the times are GPU times; CPU: the host clock), and end_step() reads them back,
// with the host's time in each phase beside (a phase whose host time exceeds its GPU time keeps
// the GPU waiting: launches, host loops, blocking copies).
#pragma once
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"

namespace moelab {

struct StepProfile {
  std::map<std::string, double> gpu_ms;   // per phase, on the backend's queue
  std::map<std::string, double> host_ms;  // per phase, host wall time between the same marks
  int64_t host_syncs = 0;                 // blocking waits for the device during the step
};

class Profiler {
 public:
  // Attaches itself to `backend` (backend.profiler) until destroyed.
  explicit Profiler(Backend& backend);
  ~Profiler();
  Profiler(const Profiler&) = delete;
  Profiler& operator=(const Profiler&) = delete;

  void enter(const char* phase);
  void leave();
  // Starts a step: work queued from now on is timed ("other" outside every scope).
  void begin_step();
  // Synchronises the backend and returns the step's milliseconds per phase.
  StepProfile end_step();

 private:
  void mark();
  Backend& b_;
  std::vector<const char*> stack_;
  struct Mark {
    std::shared_ptr<void> queue;                  // backend timing mark
    std::chrono::steady_clock::time_point host;   // host clock at the same moment
    const char* phase;                            // the phase from here to the next mark
  };
  std::vector<Mark> marks_;
  int64_t syncs_at_begin_ = 0;
  bool in_step_ = false;
};

// Marks the work queued during its lifetime as `phase` (a string literal).
class ProfileScope {
 public:
  ProfileScope(Backend& b, const char* phase) : p_(b.profiler) {
    if (p_) p_->enter(phase);
  }
  ~ProfileScope() {
    if (p_) p_->leave();
  }
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;

 private:
  Profiler* p_;
};

}  // namespace moelab
