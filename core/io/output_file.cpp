// moelab: output targets, locks and run ids (see output_file.h).
#include "core/io/output_file.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <system_error>

#include "core/check.h"

namespace fs = std::filesystem;

namespace moelab {

std::string errno_text(int e) { return std::error_code(e, std::generic_category()).message(); }

void write_all(int fd, const char* p, size_t n, const std::string& what) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t(1) << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      MOELAB_FAIL(what, ": write failed: ", errno_text(errno));
    }
    if (w == 0) MOELAB_FAIL(what, ": write made no progress");
    p += w;
    n -= size_t(w);
  }
}

std::vector<char> read_regular_file(const std::string& path, const std::string& what, uint64_t limit) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) MOELAB_FAIL("cannot open ", what, ": ", errno_text(errno));
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    MOELAB_FAIL("cannot stat ", what, ": ", errno_text(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    MOELAB_FAIL(what, " is not a regular file");
  }
  if (uint64_t(st.st_size) > limit) {
    ::close(fd);
    MOELAB_FAIL(what, " is ", uint64_t(st.st_size), " bytes, more than the limit of ", limit);
  }
  std::vector<char> s(size_t(st.st_size));
  size_t got = 0;
  while (got < s.size()) {
    const ssize_t r = ::read(fd, s.data() + got, s.size() - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const int e = errno;
      ::close(fd);
      MOELAB_FAIL("cannot read ", what, ": ", errno_text(e));
    }
    if (r == 0) break;
    got += size_t(r);
  }
  ::close(fd);
  s.resize(got);
  return s;
}

namespace {
const char* node_kind(mode_t m) {
  if (S_ISDIR(m)) return "a folder";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISSOCK(m)) return "a socket";
  return "not a regular file";
}
}  // namespace

std::string resolve_output_target(const std::string& path, const std::string& what) {
  if (path.empty()) MOELAB_USAGE_FAIL(what, ": empty output path");
  fs::path p(path);
  for (int depth = 0;; ++depth) {
    struct stat st;
    if (::lstat(p.c_str(), &st) != 0) {
      // A new file (possibly a dangling link's target); ENOTDIR: a file where a folder should
      // be, which creating the folders will report with a clearer message.
      if (errno == ENOENT || errno == ENOTDIR) return p.string();
      MOELAB_FAIL(what, " ", path, ": cannot inspect ", p.string(), ": ", std::strerror(errno));
    }
    if (S_ISREG(st.st_mode)) return p.string();
    if (!S_ISLNK(st.st_mode))
      MOELAB_USAGE_FAIL(what, " ", path, (p.string() == path ? "" : " (through its link, " + p.string() + ")"),
                        " is ", node_kind(st.st_mode),
                        ", not a regular file; moelab replaces its output file atomically and will "
                        "not replace that: give a file path");
    if (depth >= 40) MOELAB_USAGE_FAIL(what, " ", path, ": too many levels of symbolic links");
    std::error_code ec;
    const fs::path link = fs::read_symlink(p, ec);
    if (ec) MOELAB_FAIL(what, " ", path, ": cannot read link ", p.string(), ": ", ec.message());
    p = link.is_absolute() ? link : p.parent_path() / link;
  }
}

OutputLock::OutputLock(const std::string& target, const std::string& what) : lock_path_(target + ".lock") {
  fd_ = ::open(lock_path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) MOELAB_FAIL(what, " ", target, ": cannot create lock file ", lock_path_, ": ", std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[32] = {};
    const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK)
      MOELAB_FAIL(what, " ", target, " is being written by another moelab process (pid ",
                  n > 0 ? std::string(buf, size_t(n)) : std::string("unknown"), ", lock file ",
                  lock_path_, "); wait for it or choose another output");
    MOELAB_FAIL(what, " ", target, ": cannot lock ", lock_path_, ": ", std::strerror(err));
  }
  const std::string pid = std::to_string(::getpid());
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) != ssize_t(pid.size())) {
    // The pid is only for the message of a refused second writer; the lock itself holds.
  }
}

void OutputLock::release() {
  if (fd_ < 0) return;
  // Removed while still locked. A writer that opened the file in this very instant locks a
  // removed inode; this process has finished writing by then, so no two writers overlap.
  ::unlink(lock_path_.c_str());
  ::close(fd_);
  fd_ = -1;
}

OutputLock::~OutputLock() { release(); }

OutputLock::OutputLock(OutputLock&& o) noexcept : fd_(o.fd_), lock_path_(std::move(o.lock_path_)) { o.fd_ = -1; }

OutputLock& OutputLock::operator=(OutputLock&& o) noexcept {
  if (this != &o) {
    release();
    fd_ = o.fd_;
    lock_path_ = std::move(o.lock_path_);
    o.fd_ = -1;
  }
  return *this;
}

std::string new_run_id() {
  std::random_device rd;
  uint64_t a = (uint64_t(rd()) << 32) ^ rd();
  uint64_t b = (uint64_t(rd()) << 32) ^ rd();
  a ^= uint64_t(std::chrono::system_clock::now().time_since_epoch().count());
  b ^= uint64_t(::getpid()) * 0x9e3779b97f4a7c15ull;
  char buf[40];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", (unsigned long long)a, (unsigned long long)b);
  return buf;
}

}  // namespace moelab
