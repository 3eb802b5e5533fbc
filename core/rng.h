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
#include <cstring>

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

// ---- exactly rounded arithmetic, the same bits on the host and the device --------------------
// normal() below must give the CPU and GPU backends bit-identical draws (initial weights, gating
// noise), so it uses only IEEE-754 operations that every platform rounds the same way: +, *, /,
// sqrt, with no a*b+c contracted into an fma (nvcc contracts by default in device code: the
// intrinsics below never are; host C++ is built with -ffp-contract=off, CMakeLists.txt). The
// C library's log and cos are not usable: glibc's and CUDA's differ in the last bit.
namespace exact {

MOELAB_HD double add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
MOELAB_HD double mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
MOELAB_HD double div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
MOELAB_HD double sqrt(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);  // IEEE-754 requires sqrt to be correctly rounded
#endif
}
MOELAB_HD uint64_t bits_of(double x) {
#if defined(__CUDA_ARCH__)
  return uint64_t(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, 8);
  return u;
#endif
}
MOELAB_HD double double_of(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double((long long)u);
#else
  double x;
  std::memcpy(&x, &u, 8);
  return x;
#endif
}

// Natural log of a positive normal double (the uniforms below are in [2^-54, 1)), to a few ulp.
// x = m 2^e with m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...)
// with s = (m - 1) / (m + 1), |s| <= 0.172: the series to s^22 is below 1e-18.
MOELAB_HD double log_pos(double x) {
  const uint64_t b = bits_of(x);
  int e = int((b >> 52) & 0x7ff) - 1023;
  double m = double_of((b & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);  // [1, 2)
  if (m > 1.4142135623730951) {
    m = mul(m, 0.5);  // exact
    ++e;
  }
  const double f = add(m, -1.0);  // exact (Sterbenz)
  const double s = div(f, add(2.0, f));
  const double z = mul(s, s);
  double p = 1.0 / 23.0;
  p = add(mul(p, z), 1.0 / 21.0);
  p = add(mul(p, z), 1.0 / 19.0);
  p = add(mul(p, z), 1.0 / 17.0);
  p = add(mul(p, z), 1.0 / 15.0);
  p = add(mul(p, z), 1.0 / 13.0);
  p = add(mul(p, z), 1.0 / 11.0);
  p = add(mul(p, z), 1.0 / 9.0);
  p = add(mul(p, z), 1.0 / 7.0);
  p = add(mul(p, z), 1.0 / 5.0);
  p = add(mul(p, z), 1.0 / 3.0);
  const double ln_m = mul(mul(2.0, s), add(mul(p, z), 1.0));
  // e ln 2 with ln 2 split (fdlibm's constants): e * kLn2Hi is exact for |e| < 2^11.
  constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  return add(mul(double(e), kLn2Hi), add(mul(double(e), kLn2Lo), ln_m));
}

// sin t and cos t for t in [0, pi/4] by their Taylor series (the first omitted terms are below
// 1e-19), Horner in t^2.
MOELAB_HD double sin_small(double t) {
  const double z = mul(t, t);
  double p = -1.0 / 121645100408832000.0;   // -1/19!
  p = add(mul(p, z), 1.0 / 355687428096000.0);  // 1/17!
  p = add(mul(p, z), -1.0 / 1307674368000.0);   // -1/15!
  p = add(mul(p, z), 1.0 / 6227020800.0);       // 1/13!
  p = add(mul(p, z), -1.0 / 39916800.0);        // -1/11!
  p = add(mul(p, z), 1.0 / 362880.0);           // 1/9!
  p = add(mul(p, z), -1.0 / 5040.0);            // -1/7!
  p = add(mul(p, z), 1.0 / 120.0);              // 1/5!
  p = add(mul(p, z), -1.0 / 6.0);               // -1/3!
  return add(t, mul(mul(t, z), p));
}
MOELAB_HD double cos_small(double t) {
  const double z = mul(t, t);
  double p = 1.0 / 6402373705728000.0;        // 1/18!
  p = add(mul(p, z), -1.0 / 20922789888000.0);  // -1/16!
  p = add(mul(p, z), 1.0 / 87178291200.0);      // 1/14!
  p = add(mul(p, z), -1.0 / 479001600.0);       // -1/12!
  p = add(mul(p, z), 1.0 / 3628800.0);          // 1/10!
  p = add(mul(p, z), -1.0 / 40320.0);           // -1/8!
  p = add(mul(p, z), 1.0 / 720.0);              // 1/6!
  p = add(mul(p, z), -1.0 / 24.0);              // -1/4!
  p = add(mul(p, z), 0.5);
  return add(1.0, -mul(z, p));
}

// cos(2 pi u) for u in [0, 1). The reduction works on u, where it is exact (each subtraction
// is of numbers within a factor 2: Sterbenz), down to an angle in [0, pi/4].
MOELAB_HD double cos_2pi(double u) {
  double y = u > 0.5 ? add(1.0, -u) : u;  // cos(2 pi (1 - u)) = cos(2 pi u); y in [0, 1/2]
  double sign = 1.0;
  if (y > 0.25) {  // cos(2 pi y) = -cos(2 pi (1/2 - y))
    y = add(0.5, -y);
    sign = -1.0;
  }
  constexpr double kTwoPi = 6.283185307179586;
  const double r = y > 0.125 ? sin_small(mul(add(0.25, -y), kTwoPi))  // cos(pi/2 - a) = sin a
                             : cos_small(mul(y, kTwoPi));
  return sign * r;
}

}  // namespace exact

// Standard normal by Box-Muller from two uniforms of the stream (indices 2i and 2i+1), in exact
// arithmetic (above): the same bits on every backend.
MOELAB_HD double normal(uint64_t seed, uint64_t i) {
  const double u1 = uniform(seed, 2 * i), u2 = uniform(seed, 2 * i + 1);
  return exact::mul(exact::sqrt(-2.0 * exact::log_pos(u1)), exact::cos_2pi(u2));
}

}  // namespace moelab::rng
