// moelab tests: the byte-level BPE tokenizer (core/io/tokenizer.h) on tiny tokenizer.json files
// written here, where every expected id can be checked by hand. The real tokenizers are checked
// against Hugging Face's own implementation by tests/tokenizer_oracle.sh.
//
// The tiny vocabulary: ids 0..255 are the 256 byte-level symbols in byte order (id == byte), so
// an unmerged byte b encodes to id b; merges add ids from 256 on.
#include <nlohmann/json.hpp>

#include "catch_compat.h"
#include "core/check.h"
#include "core/io/tokenizer.h"
#include "temp_dir.h"

using moelab::InvalidUtf8;
using moelab::Tokenizer;
using nlohmann::json;
using Ids = std::vector<int32_t>;

namespace {

// GPT-2's bytes_to_unicode, written out independently of the library.
std::string sym(int b) {
  const bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  int n = 0, c = b;
  if (!keep) {
    for (int k = 0; k < b; ++k)
      if (!((k >= '!' && k <= '~') || (k >= 0xA1 && k <= 0xAC) || (k >= 0xAE && k <= 0xFF))) ++n;
    c = 256 + n;
  }
  std::string s;
  if (c < 0x80) {
    s += char(c);
  } else {
    s += char(0xC0 | (c >> 6));
    s += char(0x80 | (c & 0x3F));
  }
  return s;
}

// vocab: the 256 byte symbols + `extra` tokens (ids 256, 257, ... in order); merges as given.
json tiny(const std::vector<std::string>& extra, const std::vector<std::pair<std::string, std::string>>& merges,
          bool pair_format = false) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[sym(b)] = b;
  for (size_t i = 0; i < extra.size(); ++i) vocab[extra[i]] = 256 + int(i);
  json m = json::array();
  for (const auto& [a, b] : merges) m.push_back(pair_format ? json::array({a, b}) : json(a + " " + b));
  return json{
      {"version", "1.0"},
      {"truncation", nullptr},
      {"added_tokens", json::array()},
      {"normalizer", {{"type", "NFC"}}},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         json::array({{{"type", "Split"},
                       {"pattern", {{"Regex", R"( ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)"}}},
                       {"behavior", "Isolated"},
                       {"invert", false}},
                      {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}}},
      {"post_processor", {{"type", "ByteLevel"}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"fuse_unk", false},
        {"byte_fallback", false}, {"vocab", vocab}, {"merges", m}}}};
}

Tokenizer make(const json& j) { return Tokenizer::from_json(j.dump(), "tiny.json"); }

json added(int id, const std::string& content, bool special = true, bool normalized = false) {
  return json{{"id", id}, {"content", content}, {"single_word", false}, {"lstrip", false},
              {"rstrip", false}, {"normalized", normalized}, {"special", special}};
}

Ids bytes(const std::string& s) {
  Ids ids;
  for (char c : s) ids.push_back(int32_t(uint8_t(c)));
  return ids;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const moelab::Error& e) {
    return e.what();
  }
  return "(no error)";
}

const std::vector<std::string> kHello = {"ll", "he", "hell", "hello", sym(' ') + "w", "ab", "bc", "aa"};
const std::vector<std::pair<std::string, std::string>> kHelloMerges = {
    {"l", "l"}, {"h", "e"}, {"he", "ll"}, {"hell", "o"}, {sym(' '), "w"}, {"a", "b"}, {"b", "c"}, {"a", "a"}};

}  // namespace

TEST_CASE("tokenizer: merges apply by rank, lowest first, leftmost on ties", "[tokenizer]") {
  const Tokenizer t = make(tiny(kHello, kHelloMerges));
  CHECK(t.vocab_size() == 256 + int64_t(kHello.size()));
  CHECK(t.encode("hello") == Ids{259});
  // "hello world" splits into "hello" and " world"; " w" merges, "orld" stays bytes.
  CHECK(t.encode("hello world") == Ids{259, 260, 'o', 'r', 'l', 'd'});
  // a b (rank 5) before b c (rank 6): "abc" -> ab c.
  CHECK(t.encode("abc") == Ids{261, 'c'});
  // The same merges with b c ranked first: a bc.
  const Tokenizer swapped = make(tiny({"bc", "ab"}, {{"b", "c"}, {"a", "b"}}));
  CHECK(swapped.encode("abc") == Ids{'a', 256});
  // Ties: "aaa" merges the leftmost pair: aa a; "aaaa": aa aa.
  CHECK(t.encode("aaa") == Ids{263, 'a'});
  CHECK(t.encode("aaaa") == Ids{263, 263});
  // Merges build on merges only through ranks: "hell" needs "he" and "ll" first.
  CHECK(t.encode("hell") == Ids{258});
  CHECK(t.encode("helo") == Ids{257, 'l', 'o'});
  CHECK(t.decode(t.encode("hello world")) == "hello world");
  // A long word (heap-based merging) and the word cache give the same ids as a fresh encode.
  const std::string longw(3000, 'a');
  const Ids once = t.encode(longw);
  CHECK(once == Ids(1500, 263));
  CHECK(t.encode(longw) == once);
}

TEST_CASE("tokenizer: \"a b\" strings and [a, b] pairs are the same merges", "[tokenizer]") {
  const Tokenizer s = make(tiny(kHello, kHelloMerges, false));
  const Tokenizer p = make(tiny(kHello, kHelloMerges, true));
  for (const std::string text : {"hello world", "abc aaa hell", "  x\n\ny"}) CHECK(s.encode(text) == p.encode(text));
  // Only the pair format can hold a token with a space in it.
  json j = tiny({"a b", "a bc"}, {{"a", " b"}}, true);
  j["model"]["vocab"].erase("a b");
  j["model"]["vocab"]["a b"] = 256;
  j["model"]["vocab"][" b"] = 258;
  j["model"]["merges"] = json::array({json::array({"a", " b"})});
  CHECK_NOTHROW(make(j));
}

TEST_CASE("tokenizer: a later duplicate of a merge sets its rank (as Hugging Face)", "[tokenizer]") {
  // b c is listed first and again after a b: its rank is the later one, so a b wins.
  const Tokenizer t = make(tiny({"bc", "ab"}, {{"b", "c"}, {"a", "b"}, {"b", "c"}}));
  CHECK(t.encode("abc") == Ids{257, 'c'});
}

TEST_CASE("tokenizer: unseen characters fall back to their bytes", "[tokenizer]") {
  const Tokenizer t = make(tiny(kHello, kHelloMerges));
  // No merge covers them: each UTF-8 byte is its own byte-level symbol.
  CHECK(t.encode("é") == Ids{0xC3, 0xA9});
  CHECK(t.encode("🦀") == Ids{0xF0, 0x9F, 0xA6, 0x80});
  CHECK(t.encode("\x01\x7f") == Ids{0x01, 0x7F});
  const std::string mixed = "hello 🦀\tcafé\n";
  CHECK(t.decode(t.encode(mixed)) == mixed);
  // A token cut inside a character decodes to its raw bytes (nothing replaced).
  CHECK(t.decode_token(0xC3) == "\xC3");
}

TEST_CASE("tokenizer: model.byte_fallback, unk_token, fuse_unk, and a missing symbol", "[tokenizer]") {
  json j = tiny({"<0x7A>", "<unk>"}, {});
  j["model"]["vocab"].erase("z");  // no symbol for byte 'z' (id 122 becomes a gap)
  j["model"]["byte_fallback"] = true;
  j["decoder"] = {{"type", "Sequence"},
                  {"decoders", json::array({{{"type", "ByteFallback"}}, {{"type", "ByteLevel"}}})}};
  const Tokenizer fb = make(j);
  CHECK(fb.encode("zaz") == Ids{256, 'a', 256});
  CHECK(fb.decode({256, 'a', 256}) == "zaz");
  CHECK_FALSE(fb.has_id(122));

  j["model"]["byte_fallback"] = false;
  j["model"]["unk_token"] = "<unk>";
  CHECK(make(j).encode("zza") == Ids{257, 257, 'a'});
  j["model"]["fuse_unk"] = true;
  CHECK(make(j).encode("zza") == Ids{257, 'a'});

  j["model"]["unk_token"] = nullptr;
  const Tokenizer none = make(j);
  CHECK_THAT(error_of([&] { none.encode("az"); }), has_substr("byte 0x7A (symbol 'z') is not in the vocabulary"));
}

TEST_CASE("tokenizer: ignore_merges keeps a word that is a token whole", "[tokenizer]") {
  // "hello" is a token, but no merge chain reaches it from "he" + "llo".
  json j = tiny({"he", "hello"}, {{"h", "e"}});
  CHECK(make(j).encode("hello") == Ids{256, 'l', 'l', 'o'});
  j["model"]["ignore_merges"] = true;
  CHECK(make(j).encode("hello") == Ids{257});
}

TEST_CASE("tokenizer: added tokens are split out before pre-tokenization, honouring their flags", "[tokenizer]") {
  json j = tiny(kHello, kHelloMerges);
  j["added_tokens"] = json::array({added(300, "<|eot|>"), added(301, "<|e"), added(302, "@@")});
  const Tokenizer t = make(j);
  CHECK(t.vocab_size() == 303);
  // Longest match wins over a prefix; an added token inside a word still splits it.
  CHECK(t.encode("a<|eot|>b") == Ids{'a', 300, 'b'});
  CHECK(t.encode("<|e") == Ids{301});
  CHECK(t.encode("<|eo") == Ids{301, 'o'});
  CHECK(t.encode("x@@y") == Ids{'x', 302, 'y'});
  CHECK(t.encode("<|eot|><|eot|>") == Ids{300, 300});
  CHECK(t.decode({'a', 300, 'b'}) == "a<|eot|>b");
  CHECK(t.token_to_id("<|eot|>") == 300);

  // lstrip / rstrip take the whitespace beside the token; single_word needs non-word neighbours.
  json k = tiny({}, {});
  json strip = added(256, "<m>");
  strip["lstrip"] = true;
  strip["rstrip"] = true;
  json word = added(257, "<w>");
  word["single_word"] = true;
  k["added_tokens"] = json::array({strip, word});
  const Tokenizer f = make(k);
  CHECK(f.encode("a  <m> \n b") == Ids{'a', 256, 'b'});
  CHECK(f.encode("x<w>") == bytes("x<w>"));
  CHECK(f.encode("<w>y") == bytes("<w>y"));
  CHECK(f.encode("x <w>.") == Ids{'x', ' ', 257, '.'});

  // normalized: true tokens are matched after normalization (NFC here).
  json n = tiny({}, {});
  n["added_tokens"] = json::array({added(256, "é!", false, true), added(257, "e\u0301?", false, false)});
  const Tokenizer norm = make(n);
  CHECK(norm.encode("e\u0301!") == Ids{256});         // NFC(e + U+0301) = é, then "é!" matches
  CHECK(norm.encode("e\u0301?") == Ids{257});         // matched on the raw text, before NFC
  CHECK(norm.encode("é?") == Ids{0xC3, 0xA9, '?'});   // the raw token does not match NFC text
}

TEST_CASE("tokenizer: the normalizer (NFC) runs before splitting", "[tokenizer]") {
  const Tokenizer t = make(tiny({}, {}));
  CHECK(t.encode("e\u0301") == t.encode("é"));
  CHECK(t.decode(t.encode("cafe\u0301")) == "café");
  json j = tiny({}, {});
  j["normalizer"] = nullptr;
  CHECK(make(j).encode("e\u0301") == Ids{'e', 0xCC, 0x81});
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array({{{"type", "NFKC"}}})}};
  CHECK(make(j).encode("ﬁ") == Ids{'f', 'i'});
}

TEST_CASE("tokenizer: split behaviours and invert (Hugging Face's Split pre-tokenizer)", "[tokenizer]") {
  // Words are made of the pieces the split leaves; merges join "a-" only within one piece.
  auto with = [](const std::string& behavior, bool invert) {
    json j = tiny({"a-", "-b"}, {{"a", "-"}, {"-", "b"}});
    j["pre_tokenizer"]["pretokenizers"][0] = {
        {"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", behavior}, {"invert", invert}};
    return make(j);
  };
  CHECK(with("Isolated", false).encode("a-b") == Ids{'a', '-', 'b'});
  CHECK(with("Removed", false).encode("a-b") == Ids{'a', 'b'});
  CHECK(with("MergedWithPrevious", false).encode("a-b") == Ids{256, 'b'});
  CHECK(with("MergedWithNext", false).encode("a-b") == Ids{'a', 257});
  CHECK(with("Contiguous", false).encode("a--b") == Ids{'a', '-', '-', 'b'});
  CHECK(with("Removed", true).encode("a-b") == Ids{'-'});
}

TEST_CASE("tokenizer: invalid UTF-8 is refused with its offset, or replaced by U+FFFD", "[tokenizer]") {
  const Tokenizer t = make(tiny({}, {}));
  CHECK_THAT(error_of([&] { t.encode("ab\xFF" "c"); }), has_substr("invalid UTF-8 at byte offset 2 (byte 0xFF)"));
  CHECK_THAT(error_of([&] { t.encode("ok \xE2\x82"); }), has_substr("invalid UTF-8 at byte offset 3 (byte 0xE2)"));
  CHECK(t.encode("ab\xFF" "c", InvalidUtf8::Replace) == t.encode("ab\uFFFD" "c"));
  // Maximal subparts: a truncated sequence is one U+FFFD; bytes that can never start or continue
  // one (C0, F8, a surrogate's ED A0) are one each.
  CHECK(moelab::replace_invalid_utf8("\xE2\x82 x") == "\uFFFD x");
  CHECK(moelab::replace_invalid_utf8("\xF0\x9F\x98!") == "\uFFFD!");
  CHECK(moelab::replace_invalid_utf8("\xED\xA0\x80") == "\uFFFD\uFFFD\uFFFD");
  CHECK(moelab::replace_invalid_utf8("\xC0\xAF\xF8") == "\uFFFD\uFFFD\uFFFD");
  CHECK(moelab::replace_invalid_utf8("ok é 🦀") == "ok é 🦀");
  CHECK(moelab::find_invalid_utf8("é\xC3") == 2);
  CHECK(moelab::find_invalid_utf8("\xF4\x90\x80\x80") == 0);  // above U+10FFFF
  CHECK(moelab::find_invalid_utf8("ok") == std::string::npos);
}

TEST_CASE("tokenizer: decode refuses ids it has no token for, naming the position", "[tokenizer]") {
  const Tokenizer t = make(tiny({}, {}));
  CHECK_THAT(error_of([&] { t.decode({'a', 999}); }), has_substr("cannot decode id 999 at position 1"));
  CHECK_THAT(error_of([&] { t.decode({-1}); }), has_substr("outside the vocabulary [0, 256)"));
}

TEST_CASE("tokenizer: GPT-2's encoder.json + vocab.bpe pair", "[tokenizer]") {
  json enc = json::object();
  for (int b = 0; b < 256; ++b) enc[sym(b)] = b;
  enc[sym(' ') + "t"] = 256;
  enc[sym(' ') + "th"] = 257;
  enc["<|endoftext|>"] = 258;
  const std::string bpe = "#version: 0.2\n" + sym(' ') + " t\n" + sym(' ') + "t h\n";
  moelab::test::TempDir dir("tokenizer");
  dir.write("encoder.json", enc.dump());
  dir.write("vocab.bpe", bpe);
  for (const std::string& path : {dir.path("encoder.json"), dir.dir.string()}) {
    const Tokenizer t = Tokenizer::load(path);
    // GPT-2's regex: " the" is one word; 's is a contraction; <|endoftext|> is special.
    CHECK(t.encode("a the") == Ids{'a', 257, 'e'});
    CHECK(t.encode("it's") == Ids{'i', 't', '\'', 's'});
    CHECK(t.encode("x<|endoftext|>y") == Ids{'x', 258, 'y'});
    CHECK(t.vocab_size() == 259);
  }
  CHECK_THAT(error_of([&] {
               moelab::test::TempDir d2("tokenizer");
               d2.write("encoder.json", enc.dump());
               Tokenizer::load(d2.path("encoder.json"));
             }),
             has_substr("needs its vocab.bpe beside it"));
}

TEST_CASE("tokenizer: malformed files are refused naming the file and the field", "[tokenizer]") {
  moelab::test::TempDir dir("tokenizer");
  auto err = [&](const json& j) {
    const std::string p = dir.write("tokenizer.json", j.dump());
    return error_of([&] { Tokenizer::load(p); });
  };
  const std::string file = dir.path("tokenizer.json");
  CHECK_THAT(error_of([&] { Tokenizer::load(dir.write("tokenizer.json", "{\"model\": ")); }),
             has_substr("tokenizer " + file + ": not valid JSON"));
  CHECK_THAT(error_of([&] { Tokenizer::load(dir.path("missing.json")); }), has_substr("is not a file"));
  json j = tiny({}, {});
  j.erase("model");
  CHECK_THAT(err(j), has_substr(file + ": model is missing"));
  j = tiny({}, {});
  j["model"]["merges"] = json::array({"ab"});
  CHECK_THAT(err(j), has_substr("model.merges[0] = 'ab' is not two tokens separated by one space"));
  j["model"]["merges"] = json::array({"a q"});
  j["model"]["vocab"].erase("q");
  CHECK_THAT(err(j), has_substr("model.merges[0] uses 'q', which is not in model.vocab"));
  j = tiny({}, {});
  j["model"]["merges"] = json::array({"a b"});
  CHECK_THAT(err(j), has_substr("model.merges[0] makes 'ab', which is not in model.vocab"));
  j = tiny({}, {});
  j["model"]["vocab"]["a"] = "x";
  CHECK_THAT(err(j), has_substr("model.vocab[\"a\"] must be an integer id"));
  j = tiny({}, {});
  j["model"]["type"] = "WordPiece";
  CHECK_THAT(err(j), has_substr("model.type = 'WordPiece' is not supported"));
  j = tiny({}, {});
  j["pre_tokenizer"]["pretokenizers"][0]["type"] = "Metaspace";
  CHECK_THAT(err(j), has_substr("pre_tokenizer.pretokenizers[0].type = 'Metaspace' is not supported"));
  j = tiny({}, {});
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  CHECK_THAT(err(j), has_substr("pre_tokenizer.pretokenizers[0].pattern.Regex: Oniguruma cannot compile"));
  j = tiny({}, {});
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways";
  CHECK_THAT(err(j), has_substr("pre_tokenizer.pretokenizers[0].behavior = 'Sideways' is not one of"));
  j = tiny({}, {});
  j["normalizer"] = {{"type", "Lowercase"}};
  CHECK_THAT(err(j), has_substr("normalizer.type = 'Lowercase' is not supported"));
  j = tiny({}, {});
  j["decoder"] = nullptr;
  CHECK_THAT(err(j), has_substr("decoder is null"));
  j = tiny({}, {});
  j["added_tokens"] = json::array({added(300, "<a>"), added(300, "<b>")});
  CHECK_THAT(err(j), has_substr("added_tokens[1].id = 300 is also added_tokens[0]'s id"));
  j["added_tokens"] = json::array({added(97, "<a>")});
  CHECK_THAT(err(j), has_substr("added_tokens[0] '<a>' has id 97, which model.vocab gives to 'a'"));
  j["added_tokens"] = json::array({{{"id", 300}}});
  CHECK_THAT(err(j), has_substr("added_tokens[0].content is missing"));
  j = tiny({}, {});
  j["model"]["dropout"] = 0.1;
  CHECK_THAT(err(j), has_substr("model.dropout = 0.1 is not supported"));
  j = tiny({}, {});
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"String", " "}}}, {"behavior", "Isolated"}};
  CHECK_THAT(err(j), has_substr("has no ByteLevel step"));
}
