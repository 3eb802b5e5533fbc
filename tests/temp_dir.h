// moelab tests: a scratch folder that disappears with the test (unique per process and object).
#pragma once
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>

namespace moelab::test {

struct TempDir {
  std::filesystem::path dir;
  explicit TempDir(const std::string& tag = "test") {
    static std::atomic<int> counter{0};
    dir = std::filesystem::temp_directory_path() /
          ("moelab_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string path(const std::string& name) const { return (dir / name).string(); }
  // Writes `text` (bytes as given) to dir/name and returns that path.
  std::string write(const std::string& name, const std::string& text) const {
    std::ofstream(dir / name, std::ios::binary) << text;
    return path(name);
  }
};

}  // namespace moelab::test
