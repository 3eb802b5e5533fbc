// moelab: the CPU reference backend (Eigen), f64 for gradient checks and f32 for experiments.
//
// DESIGN.md rule 4: clear loops and Eigen expressions, reductions accumulated in double, no fast
// paths that make it hard to trust. Every other backend is checked against this one in f64.
#pragma once
#include "core/backend.h"

namespace moelab {

std::unique_ptr<Backend> make_cpu_backend();

}  // namespace moelab
