// moelab: a per-phase time breakdown of the work queued on a backend (moelab bench --breakdown).
//
// Code marks phases with ProfileScope (router, permute, experts, attention, ...). Scopes nest: a
// stretch of the queue belongs to the innermost open scope, so the phases partition the step.
// With no profiler attached to the backend (the normal case) a scope costs one pointer test.
// With one, every scope boundary records a timing mark on the backend's queue (CUDA: an event on
// its stream, so the times are GPU times; CPU: the host clock), and end_step() reads them back.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"

namespace moelab {

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
  // Synchronises the backend and returns milliseconds per phase of the step, plus the host
  // syncs of the step under "host syncs (count)".
  std::map<std::string, double> end_step();

 private:
  void mark();
  Backend& b_;
  std::vector<const char*> stack_;
  std::vector<std::pair<std::shared_ptr<void>, const char*>> marks_;  // mark, phase from it on
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
