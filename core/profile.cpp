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
  marks_.emplace_back(b_.timing_mark(), stack_.empty() ? "other" : stack_.back());
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

std::map<std::string, double> Profiler::end_step() {
  MOELAB_CHECK(in_step_, "profiler: end_step() without begin_step()");
  const int64_t syncs = b_.host_syncs() - syncs_at_begin_;
  mark();
  in_step_ = false;
  b_.synchronize();
  std::map<std::string, double> ms;
  for (size_t i = 0; i + 1 < marks_.size(); ++i)
    ms[marks_[i].second] += b_.elapsed_ms(marks_[i].first, marks_[i + 1].first);
  ms["host syncs (count)"] = double(syncs);
  marks_.clear();
  return ms;
}

}  // namespace moelab
