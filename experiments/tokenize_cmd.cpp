// moelab: `moelab tokenize` - encode text files to token ids, or decode ids to bytes, with a
// tokenizer.json or GPT-2's encoder.json + vocab.bpe (core/io/tokenizer.h).
//
// Encode: each --in FILE is one text; its ids go on one line, separated by spaces (to --out or
// stdout; with --out-dir, to DIR/<file name>.ids). Decode (--decode): each --in FILE holds ids
// separated by whitespace; the bytes they decode to go to --out or stdout, concatenated (with
// --out-dir, to DIR/<file name>.txt). A summary goes to stderr: the tokenizer, its load time, and
// the bytes, tokens, seconds and MB/s of the encoding or decoding alone (no file I/O).
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/check.h"
#include "core/io/tokenizer.h"
#include "experiments/commands.h"

using namespace moelab;

namespace {

std::string slurp(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) MOELAB_USAGE_FAIL("tokenize: --in '", path, "' is not a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) MOELAB_FAIL("tokenize: cannot read '", path, "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<int32_t> parse_ids(const std::string& text, const std::string& path) {
  std::vector<int32_t> ids;
  size_t i = 0, line = 1;
  while (i < text.size()) {
    const char c = text[i];
    if (c == '\n') ++line;
    if (c == ' ' || c == '\n' || c == '\t' || c == '\r') {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < text.size() && text[j] >= '0' && text[j] <= '9') ++j;
    if (j == i || j - i > 10 || (j < text.size() && !std::isspace(uint8_t(text[j]))))
      MOELAB_FAIL("tokenize --decode: ", path, ":", line, ": '", text.substr(i, std::min<size_t>(20, text.size() - i)),
                  "' is not a token id");
    const long long v = std::stoll(text.substr(i, j - i));
    if (v > INT32_MAX) MOELAB_FAIL("tokenize --decode: ", path, ":", line, ": id ", v, " is too large");
    ids.push_back(int32_t(v));
    i = j;
  }
  return ids;
}

class Output {
 public:
  explicit Output(const std::string& path) : path_(path) {
    if (!path.empty()) {
      file_.open(path, std::ios::binary | std::ios::trunc);
      if (!file_) MOELAB_FAIL("tokenize: cannot write '", path, "'");
    }
  }
  void write(const std::string& s) {
    if (path_.empty()) {
      if (!s.empty() && std::fwrite(s.data(), 1, s.size(), stdout) != s.size())
        MOELAB_FAIL("tokenize: cannot write to standard output");
    } else {
      file_.write(s.data(), std::streamsize(s.size()));
      if (!file_) MOELAB_FAIL("tokenize: cannot write '", path_, "' (is the disk full?)");
    }
  }
  void close() {
    if (path_.empty()) {
      if (std::fflush(stdout) != 0) MOELAB_FAIL("tokenize: cannot write to standard output");
    } else {
      file_.close();
      if (!file_) MOELAB_FAIL("tokenize: cannot write '", path_, "' (is the disk full?)");
    }
  }

 private:
  std::string path_;
  std::ofstream file_;
};

}  // namespace

int run_tokenize(const TokenizeCliOptions& o) {
  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  const Tokenizer tok = Tokenizer::load(o.tokenizer);
  const double load_s = std::chrono::duration<double>(clock::now() - t0).count();
  std::fprintf(stderr, "tokenize: %s: %s; loaded in %.2f s\n", o.tokenizer.c_str(), tok.summary().c_str(), load_s);
  if (o.info) {
    std::printf("vocab_size %lld\n", (long long)tok.vocab_size());
    return 0;
  }
  if (!o.out_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(o.out_dir, ec);
    if (ec || !std::filesystem::is_directory(o.out_dir)) MOELAB_FAIL("tokenize: cannot create --out-dir '", o.out_dir, "'");
  }
  Output single(o.out_dir.empty() ? o.out : std::string());
  double seconds = 0;
  size_t bytes = 0, tokens = 0;
  for (const std::string& in : o.inputs) {
    const std::string text = slurp(in);
    const std::string name = std::filesystem::path(in).filename().string();
    std::string result;
    if (o.decode) {
      const std::vector<int32_t> ids = parse_ids(text, in);
      auto t = clock::now();
      try {
        result = tok.decode(ids);
      } catch (const Error& e) {
        MOELAB_FAIL(in, ": ", e.what());
      }
      seconds += std::chrono::duration<double>(clock::now() - t).count();
      tokens += ids.size();
      bytes += result.size();
    } else {
      auto t = clock::now();
      std::vector<int32_t> ids;
      try {
        ids = tok.encode(text, o.replace_invalid ? InvalidUtf8::Replace : InvalidUtf8::Refuse);
      } catch (const Error& e) {
        MOELAB_FAIL(in, ": ", e.what());
      }
      seconds += std::chrono::duration<double>(clock::now() - t).count();
      bytes += text.size();
      tokens += ids.size();
      result.reserve(ids.size() * 7);
      char buf[16];
      for (size_t i = 0; i < ids.size(); ++i) {
        const int n = std::snprintf(buf, sizeof buf, i ? " %d" : "%d", ids[i]);
        result.append(buf, size_t(n));
      }
      result += '\n';
    }
    if (!o.out_dir.empty()) {
      Output each((std::filesystem::path(o.out_dir) / (name + (o.decode ? ".txt" : ".ids"))).string());
      each.write(result);
      each.close();
    } else {
      single.write(result);
    }
  }
  single.close();
  std::fprintf(stderr, "tokenize: %s %zu file(s): %zu bytes %s %zu tokens in %.3f s (%.2f MB/s)\n",
               o.decode ? "decoded" : "encoded", o.inputs.size(), bytes, o.decode ? "from" : "->", tokens, seconds,
               seconds > 0 ? double(bytes) / 1e6 / seconds : 0.0);
  return 0;
}
