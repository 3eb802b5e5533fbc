// moelab: the rules for files moelab writes where a user pointed it (--out, log.checkpoint_dir).
//
// Nothing a user wrote is destroyed implicitly:
//   - resolve_output_target(): a symlink is written *through* (the file it points to is
//     replaced, the link stays); a device, FIFO, socket or folder is refused, because the
//     write-new-then-rename() that keeps logs crash-safe would replace the node itself (as root,
//     `--out /dev/null` once replaced the system's /dev/null).
//   - OutputLock: one writer per output. An flock() on `TARGET.lock` (released by the kernel
//     when the process dies, so a SIGKILL never leaves a stale lock); the file holds the
//     owner's pid so the refusal can name the other process.
//   - new_run_id(): the identity stored in every checkpoint and log of one run, so a resume
//     can refuse a checkpoint folder or a log that belongs to another run.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moelab {

// The whole content of the regular file `path` (read with EINTR retries), named `what` in the
// errors: cannot open, not a regular file, larger than `limit` bytes, a read error.
std::vector<char> read_regular_file(const std::string& path, const std::string& what,
                                    uint64_t limit = UINT64_MAX);

// errno's text ("No space left on device").
std::string errno_text(int e);

// Writes all n bytes at p to fd (EINTR retried, at most 1 GiB per write() call); errors name
// `what`: a failed write (with errno's text) or a write that made no progress.
void write_all(int fd, const char* p, size_t n, const std::string& what);

// The path to write for `path`: `path` itself, or the final target of its symlink chain (a
// relative link is resolved against the link's folder). Throws moelab::UsageError naming `what`
// and the path when the target exists and is not a regular file, or the chain loops.
std::string resolve_output_target(const std::string& path, const std::string& what);

class OutputLock {
 public:
  OutputLock() = default;
  // Locks `target + ".lock"` (created if missing). Throws moelab::Error naming `what`, the
  // path and the pid of the process holding it.
  OutputLock(const std::string& target, const std::string& what);
  ~OutputLock();  // unlocks and removes the lock file
  OutputLock(OutputLock&& o) noexcept;
  OutputLock& operator=(OutputLock&& o) noexcept;
  OutputLock(const OutputLock&) = delete;
  OutputLock& operator=(const OutputLock&) = delete;

 private:
  void release();
  int fd_ = -1;
  std::string lock_path_;
};

// 32 hex digits from the OS's random source, the time and the pid.
std::string new_run_id();

}  // namespace moelab
