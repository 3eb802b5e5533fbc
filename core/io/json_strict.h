// moelab: strict JSON parsing for the files moelab reads from other tools (safetensors headers,
// model.safetensors.index.json, Hugging Face config.json). nlohmann::json (Debian's
// nlohmann-json3-dev) does the parsing; on top of it this refuses what it would accept silently:
// a key given twice in one object (nlohmann keeps the last) and nesting deeper than a limit (so a
// hostile file cannot make the parser or the destructor recurse without bound).
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <string_view>
#include <vector>

#include "core/check.h"

namespace moelab {

// A key given twice in one object. `path` is the chain of keys from the top-level object to
// the object holding the duplicate (empty: the top-level object itself); array levels appear
// as "[]". what() is a complete message; callers that know what the keys mean rephrase it.
struct JsonDuplicateKey : Error {
  JsonDuplicateKey(std::string message, std::vector<std::string> path_, std::string key_)
      : Error(std::move(message)), path(std::move(path_)), key(std::move(key_)) {}
  std::vector<std::string> path;
  std::string key;
};

// Parses `text` (the whole of it: trailing whitespace allowed, anything else refused). Throws
// moelab::Error "`what`: <problem>" for invalid JSON (nlohmann's message, with the byte
// position), for nesting deeper than `max_depth` arrays/objects, and JsonDuplicateKey.
nlohmann::json parse_json_strict(std::string_view text, const std::string& what, int max_depth = 64);

// `s` for an error message: control bytes and DEL escaped as \xNN (and every byte >= 0x80 when
// `s` is not valid UTF-8), cut after about `max_len` bytes with "... (N bytes)" (names in files
// can be arbitrarily long).
std::string printable_name(const std::string& s, size_t max_len = 200);

// Valid UTF-8: no overlong forms, surrogates or code points above U+10FFFF.
bool valid_utf8(std::string_view s);

// JSON's name for the type of `v` ("object", "array", "string", "number", "boolean", "null").
const char* json_type(const nlohmann::json& v);
// The same with its article: "an object", "a number", ...
std::string a_json_type(const nlohmann::json& v);

}  // namespace moelab
