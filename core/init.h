// moelab: parameter initialisation draws. Element i of a tensor gets std * rng::normal(stream,
// first + i): counter-based, so any chunking or thread count gives the same values, and the CPU
// and GPU backends start from bit-identical weights.
#pragma once
#include <cstdint>

#include "core/backend.h"

namespace moelab {

// dst (contiguous, on backend b) = std * normal(stream, first + i) for element i. Drawn on the
// host in chunks, by up to hardware_concurrency threads, converted to dst's dtype and copied in
// (a 7B-class expert tensor never exists in double on the host).
void init_normal(Backend& b, const Tensor& dst, uint64_t stream, uint64_t first, double std);

}  // namespace moelab
