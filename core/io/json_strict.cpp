// moelab: strict JSON parsing (see json_strict.h).
#include "core/io/json_strict.h"

#include <cstdio>
#include <set>

namespace moelab {

namespace {
struct Frame {
  bool is_object = false;
  std::set<std::string> keys;
  std::string last_key;
};

std::string path_text(const std::vector<std::string>& path) {
  if (path.empty()) return "the top-level object";
  std::string s = "object ";
  for (size_t i = 0; i < path.size(); ++i) {
    if (path[i] == "[]") {
      s += "[]";
    } else {
      if (i) s += '.';
      s += '\'';
      s += printable_name(path[i], 80);
      s += '\'';
    }
  }
  return s;
}
}  // namespace

nlohmann::json parse_json_strict(std::string_view text, const std::string& what, int max_depth) {
  std::vector<Frame> stack;
  auto keys_path = [&stack]() {
    std::vector<std::string> path;
    // The key under which each open container (but the innermost) holds the next one.
    for (size_t i = 0; i + 1 < stack.size(); ++i) path.push_back(stack[i].is_object ? stack[i].last_key : "[]");
    return path;
  };
  nlohmann::json::parser_callback_t cb = [&](int /*depth*/, nlohmann::json::parse_event_t event,
                                             nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    switch (event) {
      case E::object_start:
      case E::array_start:
        if (int(stack.size()) >= max_depth)
          MOELAB_FAIL(what, ": JSON nested deeper than ", max_depth, " levels");
        stack.push_back(Frame{event == E::object_start, {}, {}});
        break;
      case E::object_end:
      case E::array_end:
        if (!stack.empty()) stack.pop_back();
        break;
      case E::key: {
        Frame& f = stack.back();
        std::string k = parsed.get<std::string>();
        if (!f.keys.insert(k).second) {
          std::vector<std::string> path = keys_path();
          std::string msg = what + ": duplicate key '" + printable_name(k) + "' in " + path_text(path);
          throw JsonDuplicateKey(std::move(msg), std::move(path), std::move(k));
        }
        f.last_key = std::move(k);
        break;
      }
      case E::value:
        break;
    }
    return true;
  };
  // nlohmann stops at a NUL byte as if the input ended there, which would accept
  // "{...}\0anything"; a raw NUL is never valid JSON (not even inside a string).
  const size_t nul = text.find('\0');
  if (nul != std::string_view::npos)
    MOELAB_FAIL(what, " is not valid JSON: a NUL byte at offset ", nul);
  try {
    return nlohmann::json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/true,
                                 /*ignore_comments=*/false);
  } catch (const nlohmann::json::exception& e) {
    // nlohmann's messages start with "[json.exception.parse_error.101] parse error at ...".
    std::string m = e.what();
    const size_t close = m.find("] ");
    if (m.rfind("[json.exception.", 0) == 0 && close != std::string::npos) m = m.substr(close + 2);
    MOELAB_FAIL(what, " is not valid JSON: ", printable_name(m, 300));
  }
}

bool valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    uint32_t cp;
    if ((c & 0xe0) == 0xc0) {
      len = 2;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + size_t(len) > n) return false;
    for (int k = 1; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3f);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += size_t(len);
  }
  return true;
}

std::string printable_name(const std::string& s, size_t max_len) {
  // Valid UTF-8 stays as it is (names are often non-ASCII); otherwise every byte >= 0x80 is
  // escaped too, so a message never carries broken UTF-8 to the terminal.
  const bool utf8 = valid_utf8(s);
  std::string out;
  size_t i = 0;
  for (; i < s.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    // Cut at max_len bytes of input, but not inside a UTF-8 sequence.
    if (i >= max_len && !(utf8 && (c & 0xc0) == 0x80)) break;
    if (c < 0x20 || c == 0x7f || (c >= 0x80 && !utf8)) {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      out += b;
    } else {
      out += char(c);
    }
  }
  if (i < s.size()) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

const char* json_type(const nlohmann::json& v) {
  if (v.is_number()) return "number";
  return v.type_name();
}

std::string a_json_type(const nlohmann::json& v) {
  return std::string(v.is_object() || v.is_array() ? "an " : "a ") + json_type(v);
}

}  // namespace moelab
