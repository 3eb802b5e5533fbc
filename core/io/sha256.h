// moelab: SHA-256 (FIPS 180-4), the checksum of the checkpoint format (core/io/checkpoint.h).
//
// SHA-256 because every standard tool has it: Python's hashlib, `sha256sum`, OpenSSL. A
// checkpoint's checksums can be verified without moelab (analysis/moelab_analysis/checkpoint.py
// does it with hashlib). x86-64 CPUs with the SHA extensions (SHA-NI) take a hardware path,
// chosen at run time (about 1.5-2 GB/s a core); others the portable code (about 0.3-0.5 GB/s).
// Both give the same digest (tested against the FIPS 180-4 examples and each other).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace moelab {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  // The digest of everything passed to update(); the object is spent afterwards.
  std::array<uint8_t, 32> finish();
  // The digest as 64 lower-case hex digits.
  std::string finish_hex();

  // Whether the hardware path is in use (for tests and reports).
  static bool hardware();
  // Forces the portable path (tests compare both paths); true restores the choice by CPU.
  static void allow_hardware(bool allow);

 private:
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

// SHA-256 of n bytes as 64 lower-case hex digits.
std::string sha256_hex(const void* data, size_t n);

}  // namespace moelab
