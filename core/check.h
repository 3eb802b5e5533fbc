// moelab: error reporting. MOELAB_CHECK throws moelab::Error with file:line and a message; it is
// used for every user-facing check (shapes, config, files) so that bad input never crashes.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace moelab {

struct Error : std::runtime_error {
  using runtime_error::runtime_error;
};

// A usage or configuration error: a bad command line, config key or value, or a combination of
// them that is refused before any work starts. main() exits 2 for these (the README's contract)
// and 1 for every other failure (I/O, divergence, out of memory, ...).
struct UsageError : Error {
  using Error::Error;
};

// Thrown when a backend does not implement an op (ggml: "not supported", never a crash).
struct NotSupported : Error {
  using Error::Error;
};

namespace detail {
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace moelab

// MOELAB_CHECK(cond, parts...): throws moelab::Error("file:line: parts...") when cond is false.
#define MOELAB_CHECK(cond, ...)                                                              \
  do {                                                                                       \
    if (!(cond))                                                                             \
      throw ::moelab::Error(::moelab::detail::concat(__FILE__, ":", __LINE__, ": ", __VA_ARGS__)); \
  } while (0)

// MOELAB_FAIL(parts...): user-facing error without a source location (files, runtime).
#define MOELAB_FAIL(...) throw ::moelab::Error(::moelab::detail::concat(__VA_ARGS__))
// MOELAB_USAGE_FAIL(parts...): a usage/config error (exit code 2), no source location.
#define MOELAB_USAGE_FAIL(...) throw ::moelab::UsageError(::moelab::detail::concat(__VA_ARGS__))
