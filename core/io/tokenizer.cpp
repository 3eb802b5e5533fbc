// moelab: byte-level BPE tokenizers (see tokenizer.h for the algorithm and its contract).
//
// Internally everything after normalization works on raw bytes: byte-level symbols are GPT-2's
// bytes_to_unicode characters, a bijection on bytes, so a vocabulary token made only of such
// characters is stored as the bytes it stands for (token_bytes), BPE runs on byte pieces, and
// the merge cache is keyed by a word's raw bytes. Tokens with other characters (added tokens,
// DeepSeek's <｜...｜> markers) can never come out of BPE; they decode to their own UTF-8.
#include "core/io/tokenizer.h"

#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
// Oniguruma would otherwise #define UChar, which is ICU's UTF-16 code unit type.
#define ONIG_ESCAPE_UCHAR_COLLISION 1
#include <oniguruma.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <filesystem>
#include <functional>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "core/check.h"

namespace moelab {

using nlohmann::json;

namespace {

// ---- UTF-8 ------------------------------------------------------------------------------------

// Length of the valid UTF-8 sequence at s[i], or 0 when s[i] starts an invalid one; `bad` gets
// the length of the maximal invalid subpart (>= 1) in that case (Unicode 15, section 3.9, U+FFFD
// substitution of maximal subparts).
size_t utf8_step(std::string_view s, size_t i, size_t& bad) {
  const auto b = [&](size_t k) { return uint8_t(s[k]); };
  const uint8_t c = b(i);
  if (c < 0x80) return 1;
  size_t need = 0;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) need = 1;
  else if (c == 0xE0) need = 2, lo = 0xA0;
  else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) need = 2;
  else if (c == 0xED) need = 2, hi = 0x9F;
  else if (c == 0xF0) need = 3, lo = 0x90;
  else if (c >= 0xF1 && c <= 0xF3) need = 3;
  else if (c == 0xF4) need = 3, hi = 0x8F;
  else {
    bad = 1;
    return 0;
  }
  size_t k = 1;
  for (; k <= need; ++k) {
    if (i + k >= s.size()) break;
    const uint8_t x = b(i + k);
    const bool ok = k == 1 ? (x >= lo && x <= hi) : (x >= 0x80 && x <= 0xBF);
    if (!ok) break;
  }
  if (k > need) return need + 1;
  bad = k;  // the lead byte and the continuation bytes that were still possible
  return 0;
}

// The code point at s[i] (valid UTF-8 assumed) and its length.
char32_t utf8_at(std::string_view s, size_t i, size_t& len) {
  const uint8_t c = uint8_t(s[i]);
  if (c < 0x80) return len = 1, c;
  if (c < 0xE0) return len = 2, char32_t(c & 0x1F) << 6 | (uint8_t(s[i + 1]) & 0x3F);
  if (c < 0xF0)
    return len = 3, char32_t(c & 0x0F) << 12 | char32_t(uint8_t(s[i + 1]) & 0x3F) << 6 |
                        (uint8_t(s[i + 2]) & 0x3F);
  return len = 4, char32_t(c & 0x07) << 18 | char32_t(uint8_t(s[i + 1]) & 0x3F) << 12 |
                      char32_t(uint8_t(s[i + 2]) & 0x3F) << 6 | (uint8_t(s[i + 3]) & 0x3F);
}

// The code point that ends at s[end) (valid UTF-8 assumed).
char32_t utf8_before(std::string_view s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (uint8_t(s[i]) & 0xC0) == 0x80) --i;
  size_t len = 0;
  return utf8_at(s, i, len);
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += char(c);
  } else if (c < 0x800) {
    out += char(0xC0 | (c >> 6));
    out += char(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += char(0xE0 | (c >> 12));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  } else {
    out += char(0xF0 | (c >> 18));
    out += char(0x80 | ((c >> 12) & 0x3F));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  }
}

// Rust's char::is_whitespace (White_Space) and is_alphanumeric (Alphabetic or Numeric), which
// Hugging Face uses for lstrip/rstrip and single_word.
bool is_space(char32_t c) { return u_isUWhiteSpace(UChar32(c)); }
bool is_word(char32_t c) {
  if (c == '_' || u_hasBinaryProperty(UChar32(c), UCHAR_ALPHABETIC)) return true;
  const int8_t t = u_charType(UChar32(c));
  return t == U_DECIMAL_DIGIT_NUMBER || t == U_LETTER_NUMBER || t == U_OTHER_NUMBER;
}

// ---- GPT-2's bytes_to_unicode -----------------------------------------------------------------

struct ByteMap {
  std::array<char32_t, 256> to_char{};
  std::unordered_map<char32_t, uint8_t> to_byte;
  ByteMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_char[size_t(b)] = keep ? char32_t(b) : char32_t(256 + n++);
      to_byte[to_char[size_t(b)]] = uint8_t(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

// A token's raw bytes when every character is a byte-level symbol.
std::optional<std::string> symbols_to_bytes(std::string_view token) {
  if (find_invalid_utf8(token) != std::string_view::npos) return std::nullopt;
  const ByteMap& m = byte_map();
  std::string out;
  for (size_t i = 0; i < token.size();) {
    size_t len = 0;
    const char32_t c = utf8_at(token, i, len);
    auto it = m.to_byte.find(c);
    if (it == m.to_byte.end()) return std::nullopt;
    out += char(it->second);
    i += len;
  }
  return out;
}

std::string byte_symbol(uint8_t b) {
  std::string s;
  append_utf8(s, byte_map().to_char[b]);
  return s;
}

// ---- Oniguruma --------------------------------------------------------------------------------

void onig_init_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    OnigEncoding enc[] = {ONIG_ENCODING_UTF8};
    onig_initialize(enc, 1);
  });
}

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    onig_init_once();
    OnigErrorInfo info;
    const auto* p = reinterpret_cast<const OnigUChar*>(pattern.data());
    const int r = onig_new(&re_, p, p + pattern.size(), ONIG_OPTION_NONE, ONIG_ENCODING_UTF8,
                           ONIG_SYNTAX_DEFAULT, &info);
    if (r != ONIG_NORMAL) {
      OnigUChar msg[ONIG_MAX_ERROR_MESSAGE_LEN];
      onig_error_code_to_str(msg, r, &info);
      re_ = nullptr;
      MOELAB_FAIL(where, ": Oniguruma cannot compile /", pattern, "/: ", reinterpret_cast<char*>(msg));
    }
  }
  ~Regex() {
    if (re_) onig_free(re_);
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // The leftmost match in s at or after `from` ([start, end) byte offsets), lookarounds seeing
  // all of s; false when there is none.
  bool search(std::string_view s, size_t from, size_t& start, size_t& end, OnigRegion* region) const {
    const auto* b = reinterpret_cast<const OnigUChar*>(s.data());
    const OnigUChar* e = b + s.size();
    const int r = onig_search(re_, b, e, b + from, e, region, ONIG_OPTION_NONE);
    if (r == ONIG_MISMATCH) return false;
    if (r < 0) {
      OnigUChar msg[ONIG_MAX_ERROR_MESSAGE_LEN];
      onig_error_code_to_str(msg, r);
      MOELAB_FAIL("tokenizer: regex search failed at byte ", from, ": ", reinterpret_cast<char*>(msg));
    }
    start = size_t(region->beg[0]);
    end = size_t(region->end[0]);
    return true;
  }

 private:
  regex_t* re_ = nullptr;
};

struct Region {
  OnigRegion* r = onig_region_new();
  ~Region() { onig_region_free(r, 1); }
};

const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---- JSON field access naming the field -------------------------------------------------------

struct Where {
  std::string origin;  // the file
  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    MOELAB_FAIL("tokenizer ", origin, ": ", field, " ", what);
  }
};

std::string type_name(const json& j) { return j.type_name(); }

const json& need(const json& obj, const std::string& key, const std::string& field, const Where& w) {
  auto it = obj.find(key);
  if (it == obj.end()) w.fail(field.empty() ? key : field + "." + key, "is missing");
  return *it;
}

bool get_bool(const json& obj, const std::string& key, bool dflt, const std::string& field, const Where& w) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return dflt;
  if (!it->is_boolean()) w.fail(field + "." + key, "must be true or false (is " + type_name(*it) + ")");
  return it->get<bool>();
}

std::optional<std::string> get_opt_string(const json& obj, const std::string& key, const std::string& field,
                                          const Where& w) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::nullopt;
  if (!it->is_string()) w.fail(field + "." + key, "must be a string (is " + type_name(*it) + ")");
  return it->get<std::string>();
}

std::string get_type(const json& obj, const std::string& field, const Where& w) {
  if (!obj.is_object()) w.fail(field, "must be an object (is " + type_name(obj) + ")");
  auto t = get_opt_string(obj, "type", field, w);
  if (!t) w.fail(field + ".type", "is missing");
  return *t;
}

int32_t get_id(const json& j, const std::string& field, const Where& w) {
  if (!j.is_number_integer()) w.fail(field, "must be an integer id (is " + type_name(j) + ")");
  const int64_t v = j.get<int64_t>();
  if (v < 0 || v > INT32_MAX) w.fail(field, "= " + std::to_string(v) + " is not an id in [0, 2^31)");
  return int32_t(v);
}

std::string read_file(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    MOELAB_FAIL("tokenizer: '", path, "' is not a file (data.tokenizer / --tokenizer takes a tokenizer.json, an "
                "encoder.json with vocab.bpe beside it, or a folder holding them; `make data` fetches the "
                "Qwen3, DeepSeek-V3 and GPT-2 ones into data/tokenizers/)");
  std::ifstream in(path, std::ios::binary);
  if (!in) MOELAB_FAIL("tokenizer: cannot read '", path, "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json parse_json(const std::string& text, const std::string& origin) {
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    MOELAB_FAIL("tokenizer ", origin, ": not valid JSON (", e.what(), ")");
  }
}

}  // namespace

size_t find_invalid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    if (uint8_t(s[i]) < 0x80) {  // ASCII fast path
      ++i;
      continue;
    }
    size_t bad = 0;
    const size_t n = utf8_step(s, i, bad);
    if (!n) return i;
    i += n;
  }
  return std::string_view::npos;
}

std::string replace_invalid_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t bad = 0;
    const size_t n = utf8_step(s, i, bad);
    if (n) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      i += bad;
    }
  }
  return out;
}

// ---- the tokenizer ------------------------------------------------------------------------------

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

struct PreTokenizerStep {
  bool byte_level = false;
  // ByteLevel
  bool add_prefix_space = false, use_regex = true;
  // Split (and ByteLevel's regex): a regex or a literal
  std::shared_ptr<Regex> regex;
  std::string literal;
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  std::string describe;
};

// Leftmost-longest matcher of added tokens over bytes (a trie).
struct TokenTrie {
  struct Node {
    std::map<uint8_t, int32_t> next;
    int32_t token = -1;  // index into Impl::added
  };
  std::vector<Node> nodes{Node{}};
  std::array<bool, 256> first{};  // a token starts with this byte
  bool empty() const { return nodes.size() == 1; }
  void add(std::string_view s, int32_t token) {
    int32_t n = 0;
    for (char ch : s) {
      auto it = nodes[size_t(n)].next.find(uint8_t(ch));
      if (it == nodes[size_t(n)].next.end()) {
        nodes.push_back(Node{});
        const int32_t k = int32_t(nodes.size() - 1);
        nodes[size_t(n)].next[uint8_t(ch)] = k;
        n = k;
      } else {
        n = it->second;
      }
    }
    if (nodes[size_t(n)].token < 0) nodes[size_t(n)].token = token;  // first listed wins
    if (!s.empty()) first[uint8_t(s[0])] = true;
  }
  // Longest token starting at s[i]: its length, and the token in `token`; 0 when none.
  size_t longest(std::string_view s, size_t i, int32_t& token) const {
    if (!first[uint8_t(s[i])]) return 0;
    int32_t n = 0;
    size_t best = 0;
    for (size_t k = i; k < s.size(); ++k) {
      auto it = nodes[size_t(n)].next.find(uint8_t(s[k]));
      if (it == nodes[size_t(n)].next.end()) break;
      n = it->second;
      if (nodes[size_t(n)].token >= 0) {
        best = k + 1 - i;
        token = nodes[size_t(n)].token;
      }
    }
    return best;
  }
};

struct Tokenizer::Impl {
  std::string origin;
  // normalizer: ICU forms applied in order
  std::vector<const icu::Normalizer2*> normalizers;
  std::vector<std::string> normalizer_names;
  std::vector<PreTokenizerStep> pre;
  // model
  std::vector<std::string> id_token;        // [vocab_size] the token's text ("" for a gap)
  std::vector<uint8_t> id_present;          // [vocab_size] 1 when the id has a token
  std::vector<std::string> id_bytes;        // [vocab_size] what the id decodes to
  std::unordered_map<std::string, int32_t> token_id;    // model vocabulary, by text
  std::unordered_map<std::string, int32_t> bytes_id;    // byte-level tokens, by raw bytes
  std::array<int32_t, 256> byte_id{};       // the single-byte symbol's id, -1 when missing
  std::array<int32_t, 256> fallback_id{};   // <0xXX>, -1 when missing
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a, b) -> (rank, merged)
  size_t merge_count = 0;
  int64_t model_vocab = 0;
  std::optional<int32_t> unk;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  bool decoder_byte_fallback = false;
  std::string post_processor = "none";
  // added tokens
  std::vector<AddedToken> added;
  std::unordered_map<int32_t, size_t> added_by_id;
  TokenTrie raw_trie, normalized_trie;
  int64_t size = 0;
  // word cache
  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  static uint64_t pair_key(int32_t a, int32_t b) { return uint64_t(uint32_t(a)) << 32 | uint32_t(b); }

  void finish();  // id tables, byte tables, added-token tries
  std::string normalize(std::string_view s) const;
  void split_added(std::string_view s, const TokenTrie& trie,
                   const std::function<void(std::string_view, const AddedToken*)>& emit) const;
  void pretokenize(size_t step, std::string_view piece, std::vector<int32_t>& out) const;
  void split(const PreTokenizerStep& st, std::string_view s,
             const std::function<void(std::string_view)>& emit) const;
  void word(std::string_view w, std::vector<int32_t>& out) const;
  void bpe(std::string_view w, std::vector<int32_t>& out) const;
};

void Tokenizer::Impl::finish() {
  int64_t n = model_vocab;
  for (const AddedToken& t : added) n = std::max<int64_t>(n, int64_t(t.id) + 1);
  size = n;
  id_token.assign(size_t(n), "");
  id_present.assign(size_t(n), 0);
  id_bytes.assign(size_t(n), "");
  for (const auto& [tok, id] : token_id) {
    id_token[size_t(id)] = tok;
    id_present[size_t(id)] = 1;
    if (auto b = symbols_to_bytes(tok)) {
      id_bytes[size_t(id)] = *b;
      bytes_id.emplace(*b, id);
    } else {
      id_bytes[size_t(id)] = tok;  // Hugging Face's ByteLevel decoder: such a token as it is
    }
  }
  for (size_t i = 0; i < added.size(); ++i) {
    const AddedToken& t = added[i];
    id_token[size_t(t.id)] = t.content;
    id_present[size_t(t.id)] = 1;
    id_bytes[size_t(t.id)] = t.content;
    added_by_id[t.id] = i;
  }
  for (int b = 0; b < 256; ++b) {
    auto it = token_id.find(byte_symbol(uint8_t(b)));
    byte_id[size_t(b)] = it == token_id.end() ? -1 : it->second;
    char hex[8];
    std::snprintf(hex, sizeof hex, "<0x%02X>", b);
    auto f = token_id.find(hex);
    fallback_id[size_t(b)] = f == token_id.end() ? -1 : f->second;
  }
  for (size_t i = 0; i < added.size(); ++i) {
    const AddedToken& t = added[i];
    if (t.normalized && !normalizers.empty())
      normalized_trie.add(normalize(t.content), int32_t(i));
    else if (t.normalized)
      normalized_trie.add(t.content, int32_t(i));
    else
      raw_trie.add(t.content, int32_t(i));
  }
}

std::string Tokenizer::Impl::normalize(std::string_view s) const {
  if (normalizers.empty()) return std::string(s);
  bool ascii = true;
  for (char c : s)
    if (uint8_t(c) >= 0x80) {
      ascii = false;
      break;
    }
  if (ascii) return std::string(s);  // every Unicode normal form leaves ASCII as it is
  std::string cur(s);
  for (const icu::Normalizer2* n : normalizers) {
    std::string out;
    icu::StringByteSink<std::string> sink(&out, int32_t(cur.size()));
    UErrorCode status = U_ZERO_ERROR;
    n->normalizeUTF8(0, icu::StringPiece(cur.data(), int32_t(cur.size())), sink, nullptr, status);
    if (U_FAILURE(status)) MOELAB_FAIL("tokenizer ", origin, ": normalization failed (", u_errorName(status), ")");
    cur.swap(out);
  }
  return cur;
}

// Hugging Face's AddedVocabulary::find_matches: leftmost-longest matches; single_word keeps a
// match only between non-word characters; lstrip / rstrip extend it over the whitespace beside it.
void Tokenizer::Impl::split_added(std::string_view s, const TokenTrie& trie,
                                  const std::function<void(std::string_view, const AddedToken*)>& emit) const {
  if (trie.empty()) {
    if (!s.empty()) emit(s, nullptr);
    return;
  }
  size_t done = 0;  // s[0, done) has been emitted
  for (size_t i = 0; i < s.size();) {
    int32_t tk = -1;
    const size_t len = trie.longest(s, i, tk);
    if (!len) {
      ++i;
      continue;
    }
    const AddedToken& t = added[size_t(tk)];
    size_t start = i, stop = i + len;
    if (t.single_word) {
      const bool left_ok = start == 0 || !is_word(utf8_before(s, start));
      size_t l = 0;
      const bool right_ok = stop == s.size() || !is_word(utf8_at(s, stop, l));
      if (!left_ok || !right_ok) {
        ++i;
        continue;
      }
    }
    if (t.lstrip) {
      size_t ns = start;
      while (ns > done) {
        size_t p = ns - 1;
        while (p > 0 && (uint8_t(s[p]) & 0xC0) == 0x80) --p;
        size_t l = 0;
        if (!is_space(utf8_at(s, p, l))) break;
        ns = p;
      }
      start = ns;
    }
    if (t.rstrip) {
      while (stop < s.size()) {
        size_t l = 0;
        if (!is_space(utf8_at(s, stop, l))) break;
        stop += l;
      }
    }
    if (start > done) emit(s.substr(done, start - done), nullptr);
    emit(s.substr(start, stop - start), &t);
    done = i = stop;
  }
  if (done < s.size()) emit(s.substr(done), nullptr);
}

// Hugging Face's NormalizedString::split over the pattern's matches.
void Tokenizer::Impl::split(const PreTokenizerStep& st, std::string_view s,
                            const std::function<void(std::string_view)>& emit) const {
  struct Part {
    size_t b, e;
    bool match;
  };
  std::vector<Part> parts;
  {
    thread_local Region region;  // reused: nested splits run only after this loop
    size_t prev = 0, pos = 0;
    while (pos <= s.size()) {
      size_t ms = 0, me = 0;
      bool found;
      if (st.regex) {
        found = st.regex->search(s, pos, ms, me, region.r);
      } else {
        const size_t f = st.literal.empty() ? std::string_view::npos : s.find(st.literal, pos);
        found = f != std::string_view::npos;
        if (found) ms = f, me = f + st.literal.size();
      }
      if (!found) break;
      if (me == ms) {  // an empty match splits nothing: step over one character
        if (ms >= s.size()) break;
        size_t l = 0;
        utf8_at(s, ms, l);
        pos = ms + l;
        continue;
      }
      if (ms > prev) parts.push_back({prev, ms, false});
      parts.push_back({ms, me, true});
      prev = pos = me;
    }
    if (prev < s.size()) parts.push_back({prev, s.size(), false});
  }
  if (st.invert)
    for (Part& p : parts) p.match = !p.match;
  // (begin, end, removed)
  std::vector<Part> out;
  switch (st.behavior) {
    case SplitBehavior::Isolated:
      for (const Part& p : parts) out.push_back({p.b, p.e, false});
      break;
    case SplitBehavior::Removed:
      out = parts;
      break;
    case SplitBehavior::Contiguous: {
      bool prev_match = false;
      for (const Part& p : parts) {
        if (p.match == prev_match && !out.empty())
          out.back().e = p.e;
        else
          out.push_back({p.b, p.e, false});
        prev_match = p.match;
      }
      break;
    }
    case SplitBehavior::MergedWithPrevious: {
      bool prev_match = false;
      for (const Part& p : parts) {
        if (p.match && !prev_match && !out.empty())
          out.back().e = p.e;
        else
          out.push_back({p.b, p.e, false});
        prev_match = p.match;
      }
      break;
    }
    case SplitBehavior::MergedWithNext: {
      bool prev_match = false;
      for (size_t k = parts.size(); k-- > 0;) {
        const Part& p = parts[k];
        if (p.match && !prev_match && !out.empty())
          out.back().b = p.b;
        else
          out.push_back({p.b, p.e, false});
        prev_match = p.match;
      }
      std::reverse(out.begin(), out.end());
      break;
    }
  }
  for (const Part& p : out)
    if (!p.match && p.e > p.b) emit(s.substr(p.b, p.e - p.b));
}

void Tokenizer::Impl::pretokenize(size_t step, std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (step == pre.size()) {
    word(piece, out);
    return;
  }
  const PreTokenizerStep& st = pre[step];
  if (st.byte_level) {
    std::string prefixed;
    if (st.add_prefix_space && piece[0] != ' ') {
      prefixed = " " + std::string(piece);
      piece = prefixed;
    }
    if (st.use_regex)
      split(st, piece, [&](std::string_view w) { pretokenize(step + 1, w, out); });
    else
      pretokenize(step + 1, piece, out);
    return;
  }
  split(st, piece, [&](std::string_view w) { pretokenize(step + 1, w, out); });
}

void Tokenizer::Impl::word(std::string_view w, std::vector<int32_t>& out) const {
  if (w.size() == 1 && byte_id[uint8_t(w[0])] >= 0) {
    out.push_back(byte_id[uint8_t(w[0])]);
    return;
  }
  const bool cacheable = w.size() <= 256;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu);
    auto it = cache.find(std::string(w));
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = out.size();
  if (ignore_merges) {
    auto it = bytes_id.find(std::string(w));
    if (it != bytes_id.end())
      out.push_back(it->second);
    else
      bpe(w, out);
  } else {
    bpe(w, out);
  }
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu);
    if (cache.size() >= (1u << 20)) cache.clear();
    cache.emplace(std::string(w), std::vector<int32_t>(out.begin() + long(first), out.end()));
  }
}

// BPE over one word's bytes: the initial symbols are the bytes' symbols (or their byte-fallback
// / unknown tokens), then the lowest-rank pair is merged, leftmost first, until none is left
// (Hugging Face's Word::merge_all: a heap of (rank, position) with stale entries skipped).
void Tokenizer::Impl::bpe(std::string_view w, std::vector<int32_t>& out) const {
  struct Sym {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  std::vector<Sym> sym;
  sym.reserve(w.size());
  bool last_unk = false;
  for (size_t i = 0; i < w.size(); ++i) {
    const uint8_t b = uint8_t(w[i]);
    if (byte_id[b] >= 0) {
      sym.push_back({byte_id[b], 0, 0, true});
      last_unk = false;
      continue;
    }
    if (byte_fallback) {  // Hugging Face: the <0xXX> tokens of the symbol character's UTF-8
      const std::string ch = byte_symbol(b);
      bool all = true;
      for (char c : ch) all = all && fallback_id[uint8_t(c)] >= 0;
      if (all) {
        for (char c : ch) sym.push_back({fallback_id[uint8_t(c)], 0, 0, true});
        last_unk = false;
        continue;
      }
    }
    if (unk) {
      if (!(fuse_unk && last_unk)) sym.push_back({*unk, 0, 0, true});
      last_unk = true;
      continue;
    }
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02X", b);
    MOELAB_FAIL("tokenizer ", origin, ": byte ", hex, " (symbol '", byte_symbol(b),
                "') is not in the vocabulary, and the model has neither unk_token nor byte_fallback");
  }
  const int32_t n = int32_t(sym.size());
  for (int32_t i = 0; i < n; ++i) {
    sym[size_t(i)].prev = i - 1;
    sym[size_t(i)].next = i + 1 < n ? i + 1 : -1;
  }
  struct Cand {
    int32_t rank, pos, left, right, merged;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int32_t pos) {
    const int32_t nx = sym[size_t(pos)].next;
    if (nx < 0) return;
    auto it = merges.find(pair_key(sym[size_t(pos)].id, sym[size_t(nx)].id));
    if (it != merges.end())
      heap.push({it->second.first, pos, sym[size_t(pos)].id, sym[size_t(nx)].id, it->second.second});
  };
  for (int32_t i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Sym& a = sym[size_t(c.pos)];
    if (!a.alive || a.id != c.left || a.next < 0) continue;
    Sym& b = sym[size_t(a.next)];
    if (b.id != c.right) continue;
    a.id = c.merged;
    b.alive = false;
    a.next = b.next;
    if (b.next >= 0) sym[size_t(b.next)].prev = c.pos;
    if (a.prev >= 0) push(a.prev);
    push(c.pos);
  }
  for (int32_t i = n ? 0 : -1; i >= 0; i = sym[size_t(i)].next) out.push_back(sym[size_t(i)].id);
}

// ---- loading ------------------------------------------------------------------------------------

namespace {

const icu::Normalizer2* icu_form(const std::string& type, const std::string& field, const Where& w) {
  UErrorCode st = U_ZERO_ERROR;
  const icu::Normalizer2* n = nullptr;
  if (type == "NFC") n = icu::Normalizer2::getNFCInstance(st);
  else if (type == "NFD") n = icu::Normalizer2::getNFDInstance(st);
  else if (type == "NFKC") n = icu::Normalizer2::getNFKCInstance(st);
  else if (type == "NFKD") n = icu::Normalizer2::getNFKDInstance(st);
  else w.fail(field + ".type", "= '" + type + "' is not supported (supported normalizers: NFC, NFD, NFKC, NFKD, Sequence)");
  if (U_FAILURE(st)) w.fail(field, std::string("cannot load ICU's ") + type + " data (" + u_errorName(st) + ")");
  return n;
}

void load_normalizer(const json& j, const std::string& field, const Where& w, Tokenizer::Impl& t) {
  if (j.is_null()) return;
  const std::string type = get_type(j, field, w);
  if (type == "Sequence") {
    const json& list = need(j, "normalizers", field, w);
    if (!list.is_array()) w.fail(field + ".normalizers", "must be an array");
    for (size_t i = 0; i < list.size(); ++i)
      load_normalizer(list[i], field + ".normalizers[" + std::to_string(i) + "]", w, t);
    return;
  }
  t.normalizers.push_back(icu_form(type, field, w));
  t.normalizer_names.push_back(type);
}

SplitBehavior parse_behavior(const std::string& s, const std::string& field, const Where& w) {
  if (s == "Removed") return SplitBehavior::Removed;
  if (s == "Isolated") return SplitBehavior::Isolated;
  if (s == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (s == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (s == "Contiguous") return SplitBehavior::Contiguous;
  w.fail(field, "= '" + s + "' is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous");
}

void load_pre_tokenizer(const json& j, const std::string& field, const Where& w,
                        std::vector<PreTokenizerStep>& steps) {
  const std::string type = get_type(j, field, w);
  if (type == "Sequence") {
    const json& list = need(j, "pretokenizers", field, w);
    if (!list.is_array()) w.fail(field + ".pretokenizers", "must be an array");
    for (size_t i = 0; i < list.size(); ++i)
      load_pre_tokenizer(list[i], field + ".pretokenizers[" + std::to_string(i) + "]", w, steps);
    return;
  }
  PreTokenizerStep st;
  if (type == "ByteLevel") {
    st.byte_level = true;
    st.add_prefix_space = get_bool(j, "add_prefix_space", false, field, w);
    st.use_regex = get_bool(j, "use_regex", true, field, w);
    if (st.use_regex) st.regex = std::make_shared<Regex>(kGpt2Pattern, "GPT-2 pattern");
    st.behavior = SplitBehavior::Isolated;
    st.describe = std::string("ByteLevel") + (st.use_regex ? "(GPT-2 regex)" : "");
  } else if (type == "Split") {
    const json& pat = need(j, "pattern", field, w);
    if (!pat.is_object()) w.fail(field + ".pattern", "must be an object {\"Regex\": ...} or {\"String\": ...}");
    if (auto r = get_opt_string(pat, "Regex", field + ".pattern", w)) {
      st.regex = std::make_shared<Regex>(*r, "tokenizer " + w.origin + ": " + field + ".pattern.Regex");
    } else if (auto s = get_opt_string(pat, "String", field + ".pattern", w)) {
      st.literal = *s;
    } else {
      w.fail(field + ".pattern", "has neither \"Regex\" nor \"String\"");
    }
    auto b = get_opt_string(j, "behavior", field, w);
    if (!b) w.fail(field + ".behavior", "is missing");
    st.behavior = parse_behavior(*b, field + ".behavior", w);
    st.invert = get_bool(j, "invert", false, field, w);
    st.describe = "Split(" + *b + ")";
  } else {
    w.fail(field + ".type", "= '" + type + "' is not supported (supported pre-tokenizers: ByteLevel, Split, Sequence)");
  }
  steps.push_back(std::move(st));
}

void load_decoder(const json& j, const std::string& field, const Where& w, bool& byte_level, bool& fallback) {
  if (j.is_null())
    w.fail(field, "is null; a byte-level BPE tokenizer needs the ByteLevel decoder");
  const std::string type = get_type(j, field, w);
  if (type == "Sequence") {
    const json& list = need(j, "decoders", field, w);
    if (!list.is_array()) w.fail(field + ".decoders", "must be an array");
    for (size_t i = 0; i < list.size(); ++i)
      load_decoder(list[i], field + ".decoders[" + std::to_string(i) + "]", w, byte_level, fallback);
  } else if (type == "ByteLevel") {
    byte_level = true;
  } else if (type == "ByteFallback") {
    fallback = true;
  } else {
    w.fail(field + ".type", "= '" + type + "' is not supported (supported decoders: ByteLevel, ByteFallback, Sequence)");
  }
}

// "a b" (one space) or ["a", "b"].
std::pair<std::string, std::string> parse_merge(const json& m, const std::string& field, const Where& w) {
  if (m.is_string()) {
    const std::string s = m.get<std::string>();
    const size_t sp = s.find(' ');
    if (sp == std::string::npos || sp == 0 || sp + 1 == s.size() || s.find(' ', sp + 1) != std::string::npos)
      w.fail(field, "= '" + s + "' is not two tokens separated by one space");
    return {s.substr(0, sp), s.substr(sp + 1)};
  }
  if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string())
    return {m[0].get<std::string>(), m[1].get<std::string>()};
  w.fail(field, "must be \"A B\" or [\"A\", \"B\"] (is " + m.dump().substr(0, 60) + ")");
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

namespace {

// The BPE model's vocabulary and merges into t; shared by tokenizer.json and the GPT-2 pair.
void load_vocab(const json& vocab, const std::string& field, const Where& w, Tokenizer::Impl& t) {
  if (!vocab.is_object()) w.fail(field, "must be an object token -> id (is " + type_name(vocab) + ")");
  std::unordered_map<int32_t, std::string> seen;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const int32_t id = get_id(it.value(), field + "[\"" + it.key() + "\"]", w);
    auto [s, fresh] = seen.emplace(id, it.key());
    if (!fresh) w.fail(field, "gives id " + std::to_string(id) + " to both '" + s->second + "' and '" + it.key() + "'");
    t.token_id.emplace(it.key(), id);
    t.model_vocab = std::max<int64_t>(t.model_vocab, int64_t(id) + 1);
  }
  if (t.token_id.empty()) w.fail(field, "is empty");
}

void add_merge(Tokenizer::Impl& t, const std::string& a, const std::string& b, size_t rank,
               const std::string& field, const Where& w) {
  auto ia = t.token_id.find(a), ib = t.token_id.find(b), im = t.token_id.find(a + b);
  if (ia == t.token_id.end()) w.fail(field, "uses '" + a + "', which is not in model.vocab");
  if (ib == t.token_id.end()) w.fail(field, "uses '" + b + "', which is not in model.vocab");
  if (im == t.token_id.end()) w.fail(field, "makes '" + a + b + "', which is not in model.vocab");
  t.merges[Tokenizer::Impl::pair_key(ia->second, ib->second)] = {int32_t(rank), im->second};
  ++t.merge_count;
}

void check_added(const Tokenizer::Impl& t, const Where& w) {
  std::unordered_map<int32_t, size_t> ids;
  std::unordered_map<int32_t, const std::string*> by_id;
  for (const auto& [tok, id] : t.token_id) by_id[id] = &tok;
  for (size_t i = 0; i < t.added.size(); ++i) {
    const AddedToken& a = t.added[i];
    const std::string field = "added_tokens[" + std::to_string(i) + "]";
    if (a.content.empty()) w.fail(field + ".content", "is empty");
    if (find_invalid_utf8(a.content) != std::string::npos) w.fail(field + ".content", "is not valid UTF-8");
    auto [it, fresh] = ids.emplace(a.id, i);
    if (!fresh) w.fail(field + ".id", "= " + std::to_string(a.id) + " is also added_tokens[" + std::to_string(it->second) + "]'s id");
    auto v = t.token_id.find(a.content);
    if (v != t.token_id.end() && v->second != a.id)
      w.fail(field, "'" + a.content + "' has id " + std::to_string(a.id) + " but model.vocab gives it " +
                        std::to_string(v->second));
    if (auto o = by_id.find(a.id); v == t.token_id.end() && o != by_id.end())
      w.fail(field, "'" + a.content + "' has id " + std::to_string(a.id) + ", which model.vocab gives to '" +
                        *o->second + "'");
  }
}

}  // namespace

Tokenizer Tokenizer::from_json(const std::string& text, const std::string& origin) {
  return from_root(parse_json(text, origin), origin);
}

Tokenizer Tokenizer::from_root(const json& root, const std::string& origin) {
  const Where w{origin};
  if (!root.is_object()) w.fail("the top level", "must be an object (is " + type_name(root) + ")");
  auto t = std::make_unique<Impl>();
  t->origin = origin;
  if (root.contains("truncation") && !root["truncation"].is_null())
    w.fail("truncation", "is set; moelab encodes whole texts (set it to null)");

  const json& model = need(root, "model", "", w);
  if (!model.is_object()) w.fail("model", "must be an object");
  if (auto type = get_opt_string(model, "type", "model", w); type && *type != "BPE")
    w.fail("model.type", "= '" + *type + "' is not supported (moelab reads byte-level BPE tokenizers)");
  if (auto it = model.find("dropout"); it != model.end() && !it->is_null() &&
                                      !(it->is_number() && it->get<double>() == 0.0))
    w.fail("model.dropout", "= " + it->dump() + " is not supported (BPE dropout is random; use null)");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (auto s = get_opt_string(model, k, "model", w); s && !s->empty())
      w.fail(std::string("model.") + k, "= '" + *s + "' is not supported (byte-level BPE uses none)");
  load_vocab(need(model, "vocab", "model", w), "model.vocab", w, *t);
  const json& merges = need(model, "merges", "model", w);
  if (!merges.is_array()) w.fail("model.merges", "must be an array");
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string field = "model.merges[" + std::to_string(i) + "]";
    auto [a, b] = parse_merge(merges[i], field, w);
    add_merge(*t, a, b, i, field, w);
  }
  if (auto u = get_opt_string(model, "unk_token", "model", w)) {
    auto it = t->token_id.find(*u);
    if (it == t->token_id.end()) w.fail("model.unk_token", "= '" + *u + "' is not in model.vocab");
    t->unk = it->second;
  }
  t->fuse_unk = get_bool(model, "fuse_unk", false, "model", w);
  t->byte_fallback = get_bool(model, "byte_fallback", false, "model", w);
  t->ignore_merges = get_bool(model, "ignore_merges", false, "model", w);

  if (auto it = root.find("added_tokens"); it != root.end() && !it->is_null()) {
    if (!it->is_array()) w.fail("added_tokens", "must be an array");
    for (size_t i = 0; i < it->size(); ++i) {
      const json& a = (*it)[i];
      const std::string field = "added_tokens[" + std::to_string(i) + "]";
      if (!a.is_object()) w.fail(field, "must be an object");
      AddedToken tok;
      tok.id = get_id(need(a, "id", field, w), field + ".id", w);
      const json& c = need(a, "content", field, w);
      if (!c.is_string()) w.fail(field + ".content", "must be a string");
      tok.content = c.get<std::string>();
      tok.single_word = get_bool(a, "single_word", false, field, w);
      tok.lstrip = get_bool(a, "lstrip", false, field, w);
      tok.rstrip = get_bool(a, "rstrip", false, field, w);
      tok.normalized = get_bool(a, "normalized", true, field, w);
      tok.special = get_bool(a, "special", false, field, w);
      t->added.push_back(std::move(tok));
    }
  }
  check_added(*t, w);

  load_normalizer(root.value("normalizer", json()), "normalizer", w, *t);
  const json pre = root.value("pre_tokenizer", json());
  if (pre.is_null()) w.fail("pre_tokenizer", "is null; a byte-level BPE tokenizer needs a ByteLevel pre-tokenizer");
  load_pre_tokenizer(pre, "pre_tokenizer", w, t->pre);
  for (size_t i = 0; i < t->pre.size(); ++i)
    if (t->pre[i].byte_level && i + 1 != t->pre.size())
      w.fail("pre_tokenizer", "has ByteLevel before its last step; moelab needs it last");
  if (t->pre.empty() || !t->pre.back().byte_level)
    w.fail("pre_tokenizer", "has no ByteLevel step; moelab reads byte-level BPE tokenizers only");
  bool byte_level_decoder = false;
  load_decoder(root.value("decoder", json()), "decoder", w, byte_level_decoder, t->decoder_byte_fallback);
  if (!byte_level_decoder) w.fail("decoder", "has no ByteLevel step; moelab reads byte-level BPE tokenizers only");
  const json post = root.value("post_processor", json());
  if (post.is_object() && post.contains("type") && post["type"].is_string())
    t->post_processor = post["type"].get<std::string>();
  t->finish();
  return Tokenizer(std::move(t));
}

Tokenizer Tokenizer::from_gpt2(const std::string& encoder_json, const std::string& vocab_bpe,
                               const std::string& origin) {
  const Where w{origin};
  auto t = std::make_unique<Impl>();
  t->origin = origin;
  const json enc = parse_json(encoder_json, origin + " (encoder.json)");
  load_vocab(enc, "encoder.json", w, *t);
  std::istringstream in(vocab_bpe);
  std::string line;
  size_t line_no = 0, rank = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    const std::string field = "vocab.bpe line " + std::to_string(line_no);
    auto [a, b] = parse_merge(json(line), field, w);
    add_merge(*t, a, b, rank++, field, w);
  }
  if (auto it = t->token_id.find("<|endoftext|>"); it != t->token_id.end()) {
    AddedToken eot;
    eot.id = it->second;
    eot.content = "<|endoftext|>";
    eot.special = true;
    eot.normalized = true;
    t->added.push_back(eot);
  }
  PreTokenizerStep st;
  st.byte_level = true;
  st.regex = std::make_shared<Regex>(kGpt2Pattern, "GPT-2 pattern");
  st.describe = "ByteLevel(GPT-2 regex)";
  t->pre.push_back(std::move(st));
  t->post_processor = "ByteLevel";
  t->finish();
  return Tokenizer(std::move(t));
}

Tokenizer Tokenizer::load(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path p(path);
  if (fs::is_directory(p, ec)) {
    if (fs::exists(p / "tokenizer.json", ec)) return load((p / "tokenizer.json").string());
    if (fs::exists(p / "encoder.json", ec)) return load((p / "encoder.json").string());
    MOELAB_FAIL("tokenizer: folder '", path, "' holds neither tokenizer.json nor encoder.json + vocab.bpe");
  }
  const std::string text = read_file(path);
  const json probe = parse_json(text, path);
  if (probe.is_object() && probe.contains("model") && probe["model"].is_object()) return from_root(probe, path);
  if (probe.is_object() && (p.filename() == "encoder.json" || (!probe.empty() && probe.begin()->is_number_integer()))) {
    const fs::path bpe = p.parent_path() / "vocab.bpe";
    if (!fs::is_regular_file(bpe, ec))
      MOELAB_FAIL("tokenizer ", path, ": a GPT-2 encoder.json needs its vocab.bpe beside it (", bpe.string(),
                  " is missing)");
    return from_gpt2(text, read_file(bpe.string()), path);
  }
  return from_root(probe, path);  // names what a tokenizer.json lacks
}

std::shared_ptr<const Tokenizer> Tokenizer::load_shared(const std::string& path) {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<const Tokenizer>> loaded;
  std::error_code ec;
  std::string key = std::filesystem::weakly_canonical(path, ec).string();
  if (ec) key = path;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = loaded.find(key);
    if (it != loaded.end()) return it->second;
  }
  auto t = std::make_shared<const Tokenizer>(load(path));
  std::lock_guard<std::mutex> lock(mu);
  return loaded.emplace(key, t).first->second;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, InvalidUtf8 policy) const {
  const Impl& t = *impl_;
  std::string replaced;
  if (const size_t bad = find_invalid_utf8(text); bad != std::string_view::npos) {
    if (policy == InvalidUtf8::Refuse) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02X", unsigned(uint8_t(text[bad])));
      MOELAB_FAIL("tokenizer: invalid UTF-8 at byte offset ", bad, " (byte ", hex,
                  "); the text must be UTF-8 (or replace invalid bytes by U+FFFD: --invalid-utf8 replace)");
    }
    replaced = replace_invalid_utf8(text);
    text = replaced;
  }
  std::vector<int32_t> out;
  out.reserve(text.size() / 3);
  t.split_added(text, t.raw_trie, [&](std::string_view piece, const AddedToken* tok) {
    if (tok) {
      out.push_back(tok->id);
      return;
    }
    const std::string norm = t.normalize(piece);
    t.split_added(norm, t.normalized_trie, [&](std::string_view p, const AddedToken* tk) {
      if (tk)
        out.push_back(tk->id);
      else
        t.pretokenize(0, p, out);
    });
  });
  return out;
}

std::string Tokenizer::decode_token(int32_t id) const {
  return decode(std::vector<int32_t>{id});
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const Impl& t = *impl_;
  std::string out;
  std::string fallback_run;  // bytes of consecutive <0xXX> tokens (ByteFallback decoder)
  auto flush_run = [&] {
    if (fallback_run.empty()) return;
    // Hugging Face: ByteFallback turns the run into text, then ByteLevel maps its symbol
    // characters back to bytes (other characters stay as they are).
    if (auto b = symbols_to_bytes(fallback_run))
      out += *b;
    else
      out += fallback_run;
    fallback_run.clear();
  };
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id >= t.size || !t.id_present[size_t(id)])
      MOELAB_FAIL("tokenizer ", t.origin, ": cannot decode id ", id, " at position ", i,
                  id < 0 || id >= t.size ? " (outside the vocabulary [0, " + std::to_string(t.size) + "))"
                                         : std::string(" (no token has this id)"));
    if (t.decoder_byte_fallback && !t.added_by_id.count(id)) {
      const std::string& tok = t.id_token[size_t(id)];
      if (tok.size() == 6 && tok.rfind("<0x", 0) == 0 && tok[5] == '>' && std::isxdigit(uint8_t(tok[3])) &&
          std::isxdigit(uint8_t(tok[4]))) {
        fallback_run += char(std::stoi(tok.substr(3, 2), nullptr, 16));
        continue;
      }
    }
    flush_run();
    out += t.id_bytes[size_t(id)];
  }
  flush_run();
  return out;
}

int64_t Tokenizer::vocab_size() const { return impl_->size; }

bool Tokenizer::has_id(int32_t id) const {
  return id >= 0 && id < impl_->size && impl_->id_present[size_t(id)];
}

std::optional<int32_t> Tokenizer::token_to_id(const std::string& token) const {
  for (const AddedToken& a : impl_->added)
    if (a.content == token) return a.id;
  auto it = impl_->token_id.find(token);
  if (it == impl_->token_id.end()) return std::nullopt;
  return it->second;
}

const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }
const std::string& Tokenizer::origin() const { return impl_->origin; }

std::string Tokenizer::summary() const {
  const Impl& t = *impl_;
  std::ostringstream os;
  size_t special = 0;
  for (const AddedToken& a : t.added) special += a.special;
  os << "BPE, " << t.size << " ids (" << t.token_id.size() << " tokens + " << t.added.size() << " added, "
     << special << " special), " << t.merge_count << " merges, normalizer ";
  if (t.normalizer_names.empty()) os << "none";
  for (size_t i = 0; i < t.normalizer_names.size(); ++i) os << (i ? "+" : "") << t.normalizer_names[i];
  os << ", pre-tokenizer ";
  for (size_t i = 0; i < t.pre.size(); ++i) os << (i ? " > " : "") << t.pre[i].describe;
  if (t.ignore_merges) os << ", ignore_merges";
  if (t.byte_fallback) os << ", byte_fallback";
  if (t.unk) os << ", unk " << *t.unk;
  os << ", post-processor " << t.post_processor << " (not applied: encode adds no special tokens)";
  return os.str();
}

}  // namespace moelab
