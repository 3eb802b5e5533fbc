// moelab: supervised fine-tuning data (data.source = jsonl). JSONL records become token ids with a
// response mask, and the records are packed into training sequences.
//
// Records (data.format), one JSON object per line of data.path (blank lines are skipped; keys
// other than those below are ignored):
//   prompt_response  {"prompt": "...", "response": "..."}: the messages [user: prompt,
//                    assistant: response];
//   messages         {"messages": [{"role": "...", "content": "..."}, ...]}: any roles, at least
//                    one message; the role "assistant" marks a response;
//   tokens           {"prompt_ids": [...], "response_ids": [...]}: token ids (integers in
//                    [0, model.vocab)); prompt_ids may be empty.
// Rendering (text formats): each message becomes data.chat_template (decode_chat_template) with
// {role} and {content} replaced, and the record is the concatenation of its messages. The text up
// to {content} is prompt; the content and the rest of the template (the end-of-turn marker the
// model must learn to emit) is response for an assistant message and prompt otherwise. The
// default template "{content}" makes a prompt_response record prompt + response, byte for byte.
// Tokens: bytes 0..255 (data.tokenizer = bytes), or each maximal run of prompt text and of response
// text encoded separately by data.tokenizer (so a token never straddles the boundary, as in most
// SFT pipelines) and the ids concatenated.
//
// Bad records (data.bad_records = stop: the run stops with "FILE:LINE: reason"; skip: the record
// is left out, counted, and the first problems are printed): invalid JSON, not an object, a
// missing or mistyped field, an empty messages list, a token id outside [0, model.vocab), fewer
// than 2 tokens, more than train.seq tokens, and, with train.loss_on = response, a record whose
// response gives no target (nothing to learn).
//
// Sequences: row r holds train.seq inputs and one more token (the last target). Packing
// (data.pack = true) fills a row with whole records in order while they fit (first fit in
// order: a record that does not fit starts the next row) and pads the rest; data.pack = false puts
// one record per row. Per input position (Batch::segment, position, loss): the record's index in
// the row (-1 for padding), the position inside the record, and whether the target bears loss:
// the next token of the SAME record (never the first token of the next record) and, with
// train.loss_on = response, a response token. The model masks attention across segments and
// restarts rotary positions per record (core/model.h PackedLayout), so a packed record gives the
// logits it gives alone. Categories (category_names): prompt 0, response 1, padding 2.
//
// Order: epoch e visits the training records in a permutation drawn from (train.seed, e)
// (Fisher-Yates over counter-based draws) and packs them in that order; the row stream is the
// epochs one after another and batch n is rows [n B, (n+1) B), so a batch may span two epochs and
// a resume needs only the batch counter. Validation: the validation records (data.val_path, or
// the records i of data.path with brown_is_validation(i, data.val_fraction)) packed in file
// order; val_batches() = min(log.eval_batches, ceil(rows / B)), the last batch padded with empty
// rows; evaluation averages over loss-bearing tokens.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/io/config.h"
#include "core/io/data.h"

namespace moelab {

class Tokenizer;

struct SftRecord {
  std::vector<int32_t> ids;       // the record's tokens
  std::vector<uint8_t> response;  // per token: 1 inside a response
  int64_t line = 0;               // 1-based line in its file
};

struct SftLoadOptions {
  RecordFormat format = RecordFormat::PromptResponse;
  std::string chat_template = "{content}";  // decoded (decode_chat_template)
  const Tokenizer* tokenizer = nullptr;     // null: bytes
  int64_t max_tokens = 0;                   // train.seq; 0 = no limit
  int64_t vocab_limit = 0;                  // tokens format: ids below this (0 = no check)
  LossOn loss_on = LossOn::All;
  BadRecords bad = BadRecords::Stop;
};

// A record that cannot be used; what() is the reason without the file and line.
struct BadRecord : Error {
  using Error::Error;
};

// One line's record (throws BadRecord naming what is wrong).
SftRecord parse_sft_record(std::string_view line, const SftLoadOptions& o);

struct SftFile {
  std::string path;
  std::vector<SftRecord> records;
  int64_t lines = 0;                  // non-blank lines
  int64_t skipped = 0;                // bad records left out (data.bad_records = skip)
  std::vector<std::string> problems;  // "PATH:LINE: reason" of the first skipped records (<= 20)
};
// Reads a JSONL file. data.bad_records = stop: the first bad record throws UsageError
// "data.path = PATH:LINE: reason"; skip: it is counted. A missing file throws naming it.
SftFile load_sft_jsonl(const std::string& path, const SftLoadOptions& o, const std::string& key = "data.path");

// Packs records in the given order into rows of `seq` inputs: each row lists record indices.
std::vector<std::vector<int32_t>> pack_records(const std::vector<SftRecord>& records,
                                               const std::vector<int32_t>& order, int64_t seq,
                                               bool pack);
// Fills row r of a packed batch (tokens, category, segment, position, loss; sized by the caller:
// tokens/category [B, seq+1], the others [B, seq]) with the records of `row` (empty: padding).
void fill_packed_row(const std::vector<SftRecord>& records, const std::vector<int32_t>& row,
                     LossOn loss_on, Batch& out, int64_t r);

class JsonlSource : public DataSource {
 public:
  // vocab_limit: model.vocab (token ids of the tokens format are checked against it; 0 = none).
  JsonlSource(const DataConfig& data, int64_t batch, int64_t seq, uint64_t seed,
              int64_t eval_batches, LossOn loss_on, int64_t vocab_limit);
  std::string name() const override { return "jsonl"; }
  std::vector<std::string> category_names() const override;
  int64_t vocab_size() const override;
  void next_train(Batch& out) override;
  int64_t val_batches() const override { return val_batches_; }
  void val_batch(int64_t i, Batch& out) const override;

  const std::vector<SftRecord>& train_records() const { return train_.records; }
  const std::vector<SftRecord>& val_records() const { return val_.records; }
  int64_t skipped() const { return train_.skipped + val_.skipped; }
  // "PATH:LINE: reason" of the first skipped records (training file, then validation file).
  std::vector<std::string> problems() const;
  // One line: records, skipped, rows per epoch, the share of input slots records fill.
  std::string summary() const;
  // Training rows of epoch e (record indices), packed from its permutation.
  std::vector<std::vector<int32_t>> epoch_rows(uint64_t epoch) const;

 protected:
  uint64_t kind() const override { return 3; }
  uint64_t fingerprint() const override;

 private:
  void shape_packed(Batch& out) const;
  const std::vector<int32_t>& train_row(uint64_t g) const;  // global row index g of the stream
  SftFile train_, val_;
  std::shared_ptr<const Tokenizer> tokenizer_;
  LossOn loss_on_;
  bool pack_;
  std::vector<std::vector<int32_t>> val_rows_;
  int64_t val_batches_ = 0;
  // Row stream: first row index of each epoch computed so far, and the rows of the cached epoch.
  mutable std::vector<uint64_t> epoch_first_{0};
  mutable uint64_t cached_epoch_ = UINT64_MAX;
  mutable std::vector<std::vector<int32_t>> cached_rows_;
};

}  // namespace moelab
