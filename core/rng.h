// moelab: counter-based random numbers, identical on every backend.
//
// Every random draw in the model (noise, jitter, random top-2, dropout) is a pure function of
// (seed, index): hash(seed, i) -> uniform / normal. So a forward pass is reproducible, the
// backward pass regenerates masks instead of storing them, finite-difference checks see the same
// noise on every evaluation, and a CUDA kernel computes exactly the same draws as the CPU.
// The hash is SplitMix64's finaliser (Steele et al. 2014), applied to seed ^ golden * (i + 1).
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MOELAB_HD __host__ __device__ __forceinline__
#else
#define MOELAB_HD inline
#endif

namespace moelab::rng {

MOELAB_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Derive an independent stream seed from a parent seed and a tag (layer, step, purpose).
MOELAB_HD uint64_t derive(uint64_t seed, uint64_t tag) {
  return mix64(seed ^ mix64(tag + 0x9e3779b97f4a7c15ULL));
}

MOELAB_HD uint64_t bits(uint64_t seed, uint64_t i) {
  return mix64(seed + 0x9e3779b97f4a7c15ULL * (i + 1));
}

// Uniform in (0, 1): 53 random bits, never exactly 0 or 1.
MOELAB_HD double uniform(uint64_t seed, uint64_t i) {
  return (double(bits(seed, i) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

// Standard normal by Box-Muller from two uniforms of the stream (indices 2i and 2i+1).
MOELAB_HD double normal(uint64_t seed, uint64_t i) {
  const double u1 = uniform(seed, 2 * i), u2 = uniform(seed, 2 * i + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace moelab::rng
