// moelab tests: what the trainer tests share: the tiny model (the same as tests/tiny_model.ini,
// which the command-line tests use) and quiet training options.
#pragma once
#include <string>
#include <vector>

#include "core/trainer.h"

namespace moelab::test {

// --set assignments of the tiny model (2 blocks, width 16, 4 experts top-2 of width 16, MoE in
// every block), followed by `more`.
inline std::vector<std::string> tiny_model_sets(std::vector<std::string> more = {}) {
  std::vector<std::string> sets = {"model.layers=2", "model.d_model=16", "model.heads=2",
                                   "model.experts=4", "model.top_k=2",   "model.d_expert=16",
                                   "model.moe_every=1"};
  sets.insert(sets.end(), more.begin(), more.end());
  return sets;
}

// No progress lines; optionally a checkpoint to resume and --overwrite.
inline TrainOptions quiet_options(std::string resume = "", bool overwrite = false) {
  TrainOptions o;
  o.quiet = true;
  o.resume = std::move(resume);
  o.overwrite = overwrite;
  return o;
}

}  // namespace moelab::test
