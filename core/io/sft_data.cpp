// moelab: SFT data: JSONL records, rendering, packing (see sft_data.h for the contract).
#include "core/io/sft_data.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/io/json_strict.h"
#include "core/io/tokenizer.h"
#include "core/rng.h"

namespace moelab {
namespace {

constexpr uint64_t kEpochTag = 0x65706f6368736674ULL;  // "epochsft": rng::derive tag per epoch
constexpr size_t kMaxProblems = 20;

[[noreturn]] void bad(const std::string& why) { throw BadRecord(why); }

// Uniform integer in [0, n) from 64 random bits (128-bit multiply, no modulo).
uint64_t below(uint64_t bits, uint64_t n) { return uint64_t((unsigned __int128)bits * n >> 64); }

uint64_t hash_combine(uint64_t h, uint64_t v) { return rng::mix64(h ^ rng::mix64(v + 0x9e37ULL)); }

const nlohmann::json& field(const nlohmann::json& obj, const char* name, const char* where = "the record") {
  auto it = obj.find(name);
  if (it == obj.end()) bad(std::string("missing field \"") + name + "\" in " + where);
  return *it;
}

const std::string& string_field(const nlohmann::json& obj, const char* name, const char* where = "the record") {
  const nlohmann::json& v = field(obj, name, where);
  if (!v.is_string())
    bad(std::string("field \"") + name + "\" in " + where + " is " + a_json_type(v) + ", expected a string");
  return v.get_ref<const std::string&>();
}

struct Piece {
  std::string text;
  bool response = false;
};

// The pieces of one message rendered through the template.
void render_message(const std::string& tmpl, const std::string& role, const std::string& content,
                    std::vector<Piece>& out) {
  const size_t c = tmpl.find("{content}");
  auto subst = [&](std::string s) {
    for (size_t p = s.find("{role}"); p != std::string::npos; p = s.find("{role}", p + role.size()))
      s.replace(p, 6, role);
    return s;
  };
  const bool response = role == "assistant";
  out.push_back({subst(tmpl.substr(0, c)), false});
  out.push_back({content + subst(tmpl.substr(c + 9)), response});
}

// Runs of equal kind joined: a tokenizer encodes whole prompt and response texts.
std::vector<Piece> merge_runs(std::vector<Piece> pieces) {
  std::vector<Piece> runs;
  for (Piece& p : pieces) {
    if (!runs.empty() && runs.back().response == p.response) runs.back().text += p.text;
    else runs.push_back(std::move(p));
  }
  return runs;
}

void append_ids(const std::string& text, bool response, const Tokenizer* tok, SftRecord& r) {
  if (text.empty()) return;
  std::vector<int32_t> ids;
  if (tok) {
    ids = tok->encode(text);
  } else {
    ids.reserve(text.size());
    for (char ch : text) ids.push_back(int32_t(uint8_t(ch)));
  }
  r.ids.insert(r.ids.end(), ids.begin(), ids.end());
  r.response.insert(r.response.end(), ids.size(), uint8_t(response));
}

std::vector<int32_t> id_list(const nlohmann::json& obj, const char* name, int64_t vocab_limit) {
  const nlohmann::json& v = field(obj, name);
  if (!v.is_array()) bad(std::string("field \"") + name + "\" is " + a_json_type(v) + ", expected an array of token ids");
  std::vector<int32_t> ids;
  ids.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const nlohmann::json& x = v[i];
    if (!x.is_number_integer())
      bad(std::string("\"") + name + "\"[" + std::to_string(i) + "] is " + a_json_type(x) + ", expected an integer token id");
    const int64_t id = x.get<int64_t>();
    if (id < 0 || id > INT32_MAX || (vocab_limit > 0 && id >= vocab_limit))
      bad(std::string("\"") + name + "\"[" + std::to_string(i) + "] = " + std::to_string(id) + " is outside [0, " +
          (vocab_limit > 0 ? "model.vocab = " + std::to_string(vocab_limit) : std::string("2^31")) + ")");
    ids.push_back(int32_t(id));
  }
  return ids;
}

}  // namespace

SftRecord parse_sft_record(std::string_view line, const SftLoadOptions& o) {
  nlohmann::json j;
  try {
    j = parse_json_strict(line, "record", 32);
  } catch (const Error& e) {
    std::string msg = e.what();
    for (const char* prefix : {"record is not valid JSON: ", "record: "})
      if (msg.rfind(prefix, 0) == 0) msg = msg.substr(std::string(prefix).size());
    bad("invalid JSON: " + msg);
  }
  if (!j.is_object()) bad("the line is " + a_json_type(j) + ", expected a JSON object (one record per line)");
  SftRecord r;
  switch (o.format) {
    case RecordFormat::PromptResponse: {
      const std::string& prompt = string_field(j, "prompt");
      const std::string& response = string_field(j, "response");
      std::vector<Piece> pieces;
      render_message(o.chat_template, "user", prompt, pieces);
      render_message(o.chat_template, "assistant", response, pieces);
      for (const Piece& p : merge_runs(std::move(pieces))) append_ids(p.text, p.response, o.tokenizer, r);
      break;
    }
    case RecordFormat::Messages: {
      const nlohmann::json& msgs = field(j, "messages");
      if (!msgs.is_array()) bad("field \"messages\" is " + a_json_type(msgs) + ", expected an array of messages");
      if (msgs.empty()) bad("field \"messages\" is an empty list");
      std::vector<Piece> pieces;
      for (size_t i = 0; i < msgs.size(); ++i) {
        const std::string where = "messages[" + std::to_string(i) + "]";
        if (!msgs[i].is_object()) bad(where + " is " + a_json_type(msgs[i]) + ", expected an object {\"role\", \"content\"}");
        render_message(o.chat_template, string_field(msgs[i], "role", where.c_str()),
                       string_field(msgs[i], "content", where.c_str()), pieces);
      }
      for (const Piece& p : merge_runs(std::move(pieces))) append_ids(p.text, p.response, o.tokenizer, r);
      break;
    }
    case RecordFormat::Tokens: {
      const std::vector<int32_t> p = id_list(j, "prompt_ids", o.vocab_limit);
      const std::vector<int32_t> a = id_list(j, "response_ids", o.vocab_limit);
      r.ids = p;
      r.ids.insert(r.ids.end(), a.begin(), a.end());
      r.response.assign(p.size(), 0);
      r.response.insert(r.response.end(), a.size(), 1);
      break;
    }
  }
  const int64_t n = int64_t(r.ids.size());
  if (n < 2) bad("the record has " + std::to_string(n) + " token(s); it needs at least 2 (an input and its target)");
  if (o.max_tokens > 0 && n > o.max_tokens)
    bad("the record has " + std::to_string(n) + " tokens, longer than train.seq = " + std::to_string(o.max_tokens));
  if (o.loss_on == LossOn::Response) {
    int64_t targets = 0;
    for (int64_t i = 1; i < n; ++i) targets += r.response[size_t(i)];
    if (targets == 0) bad("the record has no response token after its first token, so with train.loss_on = response it bears no loss");
  }
  return r;
}

SftFile load_sft_jsonl(const std::string& path, const SftLoadOptions& o, const std::string& key) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    MOELAB_USAGE_FAIL("config: ", key, " = ", path, ": no such JSONL file (one record per line; see data.format)");
  std::ifstream in(path, std::ios::binary);
  if (!in) MOELAB_USAGE_FAIL("config: ", key, " = ", path, ": cannot open it");
  SftFile f;
  f.path = path;
  std::string line;
  int64_t no = 0;
  while (std::getline(in, line)) {
    ++no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    ++f.lines;
    try {
      SftRecord r = parse_sft_record(line, o);
      r.line = no;
      f.records.push_back(std::move(r));
    } catch (const BadRecord& e) {
      const std::string where = path + ":" + std::to_string(no) + ": " + e.what();
      if (o.bad == BadRecords::Stop)
        MOELAB_USAGE_FAIL(key, " = ", where, " (data.bad_records = skip leaves such records out and counts them)");
      ++f.skipped;
      if (f.problems.size() < kMaxProblems) f.problems.push_back(where);
    }
  }
  if (in.bad()) MOELAB_FAIL(key, " = ", path, ": read error after line ", no);
  return f;
}

std::vector<std::vector<int32_t>> pack_records(const std::vector<SftRecord>& records,
                                               const std::vector<int32_t>& order, int64_t seq,
                                               bool pack) {
  std::vector<std::vector<int32_t>> rows;
  int64_t used = 0;
  for (int32_t i : order) {
    const int64_t n = int64_t(records[size_t(i)].ids.size());
    MOELAB_CHECK(n <= seq, "pack_records: record of ", n, " tokens in rows of ", seq);
    if (rows.empty() || !pack || used + n > seq) {
      rows.emplace_back();
      used = 0;
    }
    rows.back().push_back(i);
    used += n;
  }
  return rows;
}

void fill_packed_row(const std::vector<SftRecord>& records, const std::vector<int32_t>& row,
                     LossOn loss_on, Batch& out, int64_t r) {
  const int64_t S = out.seq, L = S + 1;
  int32_t* tok = out.tokens.data() + r * L;
  int32_t* cat = out.category.data() + r * L;
  int32_t* seg = out.segment.data() + r * S;
  int32_t* pos = out.position.data() + r * S;
  uint8_t* loss = out.loss.data() + r * S;
  int64_t j = 0;
  for (size_t k = 0; k < row.size(); ++k) {
    const SftRecord& rec = records[size_t(row[k])];
    const int64_t n = int64_t(rec.ids.size());
    MOELAB_CHECK(j + n <= S, "fill_packed_row: records overflow the row");
    for (int64_t i = 0; i < n; ++i, ++j) {
      tok[j] = rec.ids[size_t(i)];
      cat[j] = rec.response[size_t(i)] ? 1 : 0;
      seg[j] = int32_t(k);
      pos[j] = int32_t(i);
      // The target of input j is token j + 1: it bears loss only inside this record.
      loss[j] = i + 1 < n && (loss_on == LossOn::All || rec.response[size_t(i + 1)]);
    }
  }
  for (int64_t p = 0; j < L; ++j, ++p) {  // padding: token 0, no loss, its own segment
    tok[j] = 0;
    cat[j] = 2;
    if (j < S) {
      seg[j] = -1;
      pos[j] = int32_t(p);
      loss[j] = 0;
    }
  }
}

// ---- JsonlSource -------------------------------------------------------------------------------

JsonlSource::JsonlSource(const DataConfig& data, int64_t batch, int64_t seq, uint64_t seed,
                         int64_t eval_batches, LossOn loss_on, int64_t vocab_limit)
    : DataSource(batch, seq, seed), loss_on_(loss_on), pack_(data.pack) {
  if (data.tokenizer != "bytes" && data.format != RecordFormat::Tokens)
    tokenizer_ = Tokenizer::load_shared(data.tokenizer);
  SftLoadOptions o;
  o.format = data.format;
  o.chat_template = decode_chat_template(data.chat_template);
  o.tokenizer = tokenizer_.get();
  o.max_tokens = seq;
  o.vocab_limit = vocab_limit;
  o.loss_on = loss_on;
  o.bad = data.bad_records;
  SftFile all = load_sft_jsonl(data.path, o, "data.path");
  if (data.val_path.empty()) {
    // Record i (in file order, counting usable records) is validation as Brown's file i would be.
    train_.path = val_.path = all.path;
    train_.skipped = all.skipped;
    train_.problems = all.problems;
    train_.lines = all.lines;
    for (size_t i = 0; i < all.records.size(); ++i)
      (brown_is_validation(int64_t(i), data.val_fraction) ? val_ : train_).records.push_back(std::move(all.records[i]));
  } else {
    train_ = std::move(all);
    val_ = load_sft_jsonl(data.val_path, o, "data.val_path");
  }
  if (train_.records.empty())
    MOELAB_USAGE_FAIL("config: data.path = ", data.path, " has no usable training record (", train_.lines,
                      " records, ", train_.skipped, " skipped", data.val_path.empty() ? ", the rest held out for validation" : "",
                      ")");
  std::vector<int32_t> order(val_.records.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int32_t(i);
  if (!val_.records.empty()) {
    val_rows_ = pack_records(val_.records, order, seq, pack_);
    val_batches_ = std::min<int64_t>(eval_batches, (int64_t(val_rows_.size()) + batch - 1) / batch);
  }
}

std::vector<std::string> JsonlSource::category_names() const { return {"prompt", "response", "padding"}; }

int64_t JsonlSource::vocab_size() const {
  if (tokenizer_) return tokenizer_->vocab_size();
  int32_t top = 255;
  for (const SftFile* f : {&train_, &val_})
    for (const SftRecord& r : f->records)
      for (int32_t id : r.ids) top = std::max(top, id);
  return int64_t(top) + 1;
}

uint64_t JsonlSource::fingerprint() const {
  uint64_t h = hash_combine(kind(), uint64_t(batch_));
  h = hash_combine(h, uint64_t(seq_));
  h = hash_combine(h, uint64_t(pack_));
  h = hash_combine(h, uint64_t(loss_on_));
  for (const SftRecord& r : train_.records) {
    h = hash_combine(h, r.ids.size());
    for (size_t i = 0; i < r.ids.size(); ++i) h = hash_combine(h, uint64_t(r.ids[i]) * 2 + r.response[i]);
  }
  return h;
}

std::vector<std::vector<int32_t>> JsonlSource::epoch_rows(uint64_t epoch) const {
  const size_t n = train_.records.size();
  std::vector<int32_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = int32_t(i);
  const uint64_t stream = rng::derive(train_stream(), kEpochTag + epoch);
  for (size_t i = n; i > 1; --i)  // Fisher-Yates, draw i-1 picks from [0, i)
    std::swap(order[i - 1], order[size_t(below(rng::bits(stream, i - 1), i))]);
  return pack_records(train_.records, order, seq_, pack_);
}

const std::vector<int32_t>& JsonlSource::train_row(uint64_t g) const {
  // The epoch holding row g: extend the table of first rows as far as needed.
  uint64_t e = 0;
  for (;;) {
    if (e + 1 >= epoch_first_.size()) {
      const uint64_t rows = e == cached_epoch_ ? cached_rows_.size() : epoch_rows(e).size();
      epoch_first_.push_back(epoch_first_[e] + rows);
    }
    if (g < epoch_first_[e + 1]) break;
    ++e;
  }
  if (cached_epoch_ != e) {
    cached_rows_ = epoch_rows(e);
    cached_epoch_ = e;
  }
  return cached_rows_[size_t(g - epoch_first_[e])];
}

void JsonlSource::shape_packed(Batch& out) const {
  shape(out);
  out.segment.assign(size_t(batch_ * seq_), -1);
  out.position.assign(size_t(batch_ * seq_), 0);
  out.loss.assign(size_t(batch_ * seq_), 0);
}

void JsonlSource::next_train(Batch& out) {
  shape_packed(out);
  for (int64_t b = 0; b < batch_; ++b)
    fill_packed_row(train_.records, train_row(counter_ * uint64_t(batch_) + uint64_t(b)), loss_on_, out, b);
  ++counter_;
}

void JsonlSource::val_batch(int64_t i, Batch& out) const {
  MOELAB_CHECK(i >= 0 && i < val_batches_, "jsonl: validation batch ", i, " out of range [0, ", val_batches_, ")");
  shape_packed(out);
  static const std::vector<int32_t> empty;
  for (int64_t b = 0; b < batch_; ++b) {
    const size_t r = size_t(i * batch_ + b);
    fill_packed_row(val_.records, r < val_rows_.size() ? val_rows_[r] : empty, loss_on_, out, b);
  }
}

std::vector<std::string> JsonlSource::problems() const {
  std::vector<std::string> p = train_.problems;
  if (val_.path != train_.path) p.insert(p.end(), val_.problems.begin(), val_.problems.end());
  return p;
}

std::string JsonlSource::summary() const {
  const std::vector<std::vector<int32_t>> rows = epoch_rows(0);
  int64_t tokens = 0;
  for (const SftRecord& r : train_.records) tokens += int64_t(r.ids.size());
  char buf[400];
  std::snprintf(buf, sizeof buf,
                "%zu training records (%lld skipped) in %zu rows of %lld (%.0f%% of the input slots "
                "filled, %s), %zu validation records in %zu rows",
                train_.records.size(), (long long)skipped(), rows.size(), (long long)seq_,
                100.0 * double(tokens) / double(std::max<size_t>(1, rows.size()) * size_t(seq_)),
                pack_ ? "packed" : "one record per row", val_.records.size(), val_rows_.size());
  return buf;
}

}  // namespace moelab
