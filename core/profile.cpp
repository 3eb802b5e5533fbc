// moelab: per-phase time breakdown (see profile.h).
#include "core/profile.h"

#include "core/check.h"

namespace moelab {

Profiler::Profiler(Backend& backend) : b_(backend) {
  MOELAB_CHECK(b_.profiler == nullptr, "profiler: backend ", b_.name(), " already has one");
  b_.profiler = this;
}

Profiler::~Profiler() { b_.profiler = nullptr; }

void Profiler::mark() {
  if (!in_step_) return;
  marks_.push_back(Mark{b_.timing_mark(), std::chrono::steady_clock::now(), stack_.empty() ? "other" : stack_.back()});
}

void Profiler::enter(const char* phase) {
  stack_.push_back(phase);
  mark();
}

void Profiler::leave() {
  MOELAB_CHECK(!stack_.empty(), "profiler: leave() without enter()");
  stack_.pop_back();
  mark();
}

void Profiler::begin_step() {
  marks_.clear();
  in_step_ = true;
  syncs_at_begin_ = b_.host_syncs();
  mark();
}

StepProfile Profiler::end_step() {
  MOELAB_CHECK(in_step_, "profiler: end_step() without begin_step()");
  StepProfile r;
  r.host_syncs = b_.host_syncs() - syncs_at_begin_;
  mark();
  in_step_ = false;
  b_.synchronize();
  for (size_t i = 0; i + 1 < marks_.size(); ++i) {
    r.gpu_ms[marks_[i].phase] += b_.elapsed_ms(marks_[i].queue, marks_[i + 1].queue);
    r.host_ms[marks_[i].phase] +=
        std::chrono::duration<double, std::milli>(marks_[i + 1].host - marks_[i].host).count();
  }
  marks_.clear();
  return r;
}

}  // namespace moelab
