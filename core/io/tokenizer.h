// moelab: byte-level BPE tokenizers read from Hugging Face's tokenizer.json (GPT-2, Qwen2/Qwen3,
// DeepSeek-V3 style) or from GPT-2's encoder.json + vocab.bpe pair.
//
// Encoding follows Hugging Face `tokenizers` (Rust), step by step:
//   1. added tokens whose `normalized` flag is false are split out of the raw text (leftmost,
//      longest match; `single_word`, `lstrip`, `rstrip` honoured);
//   2. each remaining piece is normalized (normalizer: NFC, NFD, NFKC, NFKD, or a Sequence of
//      them; ICU), then added tokens with `normalized` true (their contents normalized too) are
//      split out of it;
//   3. the pre-tokenizer (Split with a regex or a literal string, any of the five split
//      behaviours and `invert`; ByteLevel with `add_prefix_space` and `use_regex`, GPT-2's
//      pattern; or a Sequence of these, ByteLevel last) cuts each piece into words. Regexes are
//      compiled by Oniguruma, the engine Hugging Face's Rust library uses, with its default
//      syntax and UTF-8: \p{L}, \p{N}, (?i:...), lookahead behave as there;
//   4. each word's bytes become byte-level symbols (GPT-2's bytes_to_unicode), which are merged
//      by rank: the pair with the lowest rank first, the leftmost on ties, until no pair has a
//      rank (a heap over a linked list, O(n log n) per word). Merges come as "a b" strings or
//      [a, b] pairs; when one pair is listed twice the later rank counts (as in Hugging Face).
//      `ignore_merges` (a word that is itself a token is kept whole), `byte_fallback` (a missing
//      symbol becomes the <0xXX> tokens of its UTF-8 bytes), `unk_token` and `fuse_unk` are
//      honoured. A symbol that is missing with none of these is an error naming its byte offset
//      (Hugging Face drops it silently).
//   Words are cached (raw bytes -> ids; words up to 256 bytes, up to 1M entries, then the cache
//   starts over), so a corpus encodes at a few MB/s.
// Decoding gives the exact bytes: a token's symbols map back through bytes_to_unicode (a token
// with a character outside that map gives its own UTF-8, as Hugging Face's ByteLevel decoder
// does), an added token gives its content, and with a ByteFallback decoder <0xXX> tokens give
// their byte. Nothing is replaced, so decode(encode(x)) == normalize(x) byte for byte, and a
// token cut inside a multi-byte character decodes to that character's partial bytes.
//
// Invalid UTF-8 in the input (Hugging Face only accepts valid strings): InvalidUtf8::Refuse (the
// default) throws naming the byte offset and value of the first bad byte; InvalidUtf8::Replace
// replaces each maximal invalid subpart by U+FFFD first (the WHATWG / Unicode rule, which is
// what JavaScript's TextDecoder and Rust's String::from_utf8_lossy do).
//
// Not supported (refused at load, naming the file and the field): other model types (WordPiece,
// Unigram), other normalizers and pre-tokenizers, BPE dropout, continuing_subword_prefix and
// end_of_word_suffix, a pre-tokenizer chain without ByteLevel or with ByteLevel before its end.
// Post-processors add no token in the supported files (ByteLevel), so encode() adds none.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace moelab {

enum class InvalidUtf8 { Refuse, Replace };

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
};

class Tokenizer {
 public:
  // A tokenizer.json; an encoder.json (GPT-2's vocab.bpe must lie beside it); or a folder that
  // holds tokenizer.json, or encoder.json and vocab.bpe. Errors name the file and the field.
  static Tokenizer load(const std::string& path);
  // load(), cached per path for the process (sweeps and the vocabulary check reuse one copy).
  static std::shared_ptr<const Tokenizer> load_shared(const std::string& path);
  // From the text of a tokenizer.json; `origin` names it in errors.
  static Tokenizer from_json(const std::string& json_text, const std::string& origin);
  // From GPT-2's pair: encoder.json (token -> id) and vocab.bpe ("#version" line, then merges).
  // Built as Hugging Face's gpt2 tokenizer.json is: no normalizer, ByteLevel pre-tokenizer with
  // GPT-2's regex, and <|endoftext|> (when in encoder.json) as a special added token.
  static Tokenizer from_gpt2(const std::string& encoder_json, const std::string& vocab_bpe,
                             const std::string& origin);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  std::vector<int32_t> encode(std::string_view text, InvalidUtf8 policy = InvalidUtf8::Refuse) const;
  // The exact bytes of the tokens (see the header comment); an id outside [0, vocab_size()) or
  // without a token is an error naming its position.
  std::string decode(const std::vector<int32_t>& ids) const;
  std::string decode_token(int32_t id) const;

  // Largest id + 1 over the model's vocabulary and the added tokens: the embedding rows needed.
  int64_t vocab_size() const;
  bool has_id(int32_t id) const;  // false for ids in a gap of the vocabulary
  std::optional<int32_t> token_to_id(const std::string& token) const;  // model or added token
  const std::vector<AddedToken>& added_tokens() const;
  const std::string& origin() const;
  // One line: "BPE, 151669 ids (151643 + 26 added), 151387 merges, normalizer NFC, ...".
  std::string summary() const;

  struct Impl;  // opaque (tokenizer.cpp)

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  static Tokenizer from_root(const nlohmann::json& root, const std::string& origin);
  std::unique_ptr<Impl> impl_;
};

// The offset of the first byte of s that is not part of valid UTF-8, or npos.
size_t find_invalid_utf8(std::string_view s);
// s with every maximal invalid subpart replaced by U+FFFD (EF BF BD).
std::string replace_invalid_utf8(std::string_view s);

}  // namespace moelab
