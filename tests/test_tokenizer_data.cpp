// moelab tests: training data through a tokenizer (data.tokenizer): the Brown source's token
// streams and their categories, the model.vocab check, and a tiny train + generate whose prompt
// and samples go through the tokenizer. A ten-file Brown corpus and a tiny tokenizer.json are
// written here.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "backends/registry.h"
#include "catch_compat.h"
#include "core/check.h"
#include "core/io/checkpoint.h"
#include "core/io/data.h"
#include "core/io/tokenizer.h"
#include "core/trainer.h"
#include "temp_dir.h"
#include "train_util.h"

using namespace moelab;
using nlohmann::json;

namespace {

std::string sym(int b) {  // GPT-2's bytes_to_unicode (ASCII printable bytes map to themselves)
  if (b > ' ' && b < 127) return std::string(1, char(b));
  int n = 0;
  for (int k = 0; k < b; ++k)
    if (!((k >= '!' && k <= '~') || (k >= 0xA1 && k <= 0xAC) || (k >= 0xAE && k <= 0xFF))) ++n;
  const int c = (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE) ? b : 256 + n;
  std::string s;
  s += char(0xC0 | (c >> 6));
  s += char(0x80 | (c & 0x3F));
  return s;
}

// 256 byte symbols, then Th (256), The (257), Ġj Ġju Ġjur Ġjury (258..261).
std::string write_tokenizer(const test::TempDir& tmp) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[sym(b)] = b;
  const std::string G = sym(' ');
  const std::vector<std::string> extra = {"Th", "The", G + "j", G + "ju", G + "jur", G + "jury"};
  for (size_t i = 0; i < extra.size(); ++i) vocab[extra[i]] = 256 + int(i);
  json merges = json::array({"T h", "Th e", G + " j", G + "j u", G + "ju r", G + "jur y"});
  json t = {{"added_tokens", json::array()},
            {"normalizer", nullptr},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
            {"decoder", {{"type", "ByteLevel"}}},
            {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
  return tmp.write("tokenizer.json", t.dump());
}

// Ten one-paragraph files: with data.val_fraction 0.1 the tenth (cj01) is validation.
std::string write_brown(const test::TempDir& tmp) {
  std::filesystem::create_directories(tmp.dir / "brown");
  for (int i = 0; i < 10; ++i) {
    const std::string name = std::string("c") + char('a' + i) + "01";
    tmp.write("brown/" + name,
              "\n\n\tThe/at jury/nn said/vbd it/pps did/dod find/vb that/cs " + std::to_string(12 + i) +
                  "/cd of/in Georgia's/np$ laws/nns are/ber outmoded/jj ./.\n\n\tThe/at jury/nn went/vbd home/nr ./.\n");
  }
  return (tmp.dir / "brown").string();
}

std::string usage_error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const UsageError& e) {
    return e.what();
  } catch (const Error& e) {
    return std::string("(not a usage error) ") + e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("tokenizer data: Brown token streams, categories per token, vocabulary", "[tokenizer][data]") {
  test::TempDir tmp("tokdata");
  const std::string brown = write_brown(tmp), tk = write_tokenizer(tmp);
  const Tokenizer tok = Tokenizer::load(tk);
  BrownSource bytes(brown, 0.1, 2, 8, 1, 1);
  BrownSource s(brown, 0.1, 2, 8, 1, 1, tk);
  CHECK(bytes.vocab_size() == 256);
  CHECK(s.vocab_size() == 262);
  // bytes: one token per byte, as before tokenizers.
  REQUIRE(bytes.train_tokens().size() == bytes.train_text().size());
  CHECK(bytes.train_tokens().ids[0] == 'T');
  // The tokenizer's stream is the encoding of the same text, and spells it exactly.
  const TaggedText& text = s.train_text();
  REQUIRE(s.train_tokens().ids == tok.encode(text.text));
  CHECK(tok.decode(s.train_tokens().ids) == text.text);
  CHECK(s.train_tokens().size() < text.size());
  CHECK(s.train_tokens().ids[0] == 257);  // "The"
  CHECK(s.train_tokens().ids[1] == 261);  // " jury"
  // A token's category: its first byte inside a word (" jury" -> noun, not the separator).
  CHECK(s.train_tokens().category[0] == kOther);  // "The": an article
  CHECK(s.train_tokens().category[1] == kNoun);
  size_t pos = 0;
  for (size_t i = 0; i < s.train_tokens().size(); ++i) {
    const std::string b = tok.decode_token(s.train_tokens().ids[i]);
    uint8_t want = kOther;
    for (size_t k = pos; k < pos + b.size(); ++k)
      if (text.tag[k] >= 0) {
        want = text.category[k];
        break;
      }
    REQUIRE(s.train_tokens().category[i] == want);
    pos += b.size();
  }
  CHECK(s.val_tokens().ids == tok.encode(s.val_text().text));
  // Batches are windows of seq+1 tokens of the stream.
  Batch b;
  s.next_train(b);
  for (int64_t r = 0; r < 2; ++r) {
    const auto& ids = s.train_tokens().ids;
    auto it = std::search(ids.begin(), ids.end(), b.tokens.begin() + r * 9, b.tokens.begin() + r * 9 + 9);
    CHECK(it != ids.end());
  }
  // A different tokenizer is different data: a checkpointed data state does not resume on it.
  CHECK_THROWS_WITH(s.set_state(bytes.state()), has_substr("saved for other data"));
}

TEST_CASE("tokenizer data: model.vocab must hold the tokenizer's ids, brown only", "[tokenizer][data]") {
  test::TempDir tmp("tokdata");
  const std::string brown = write_brown(tmp), tk = write_tokenizer(tmp);
  auto cfg = [&](const std::string& vocab) {
    return load_config("", test::tiny_model_sets({"data.source=brown", "data.path=" + brown, "data.tokenizer=" + tk,
                                                  "model.vocab=" + vocab}));
  };
  CHECK(usage_error_of([&] { check_data_vocab(cfg("256")); }) ==
        "config: model.vocab = 256 is smaller than the vocabulary of data.tokenizer = " + tk +
            " (262 ids); set model.vocab = 262 (a larger value pads the embedding with rows no token uses)");
  CHECK_NOTHROW(check_data_vocab(cfg("262")));
  CHECK_NOTHROW(check_data_vocab(cfg("300")));
  CHECK_THAT(usage_error_of([&] { check_data_vocab(load_config("", {"data.source=brown", "model.vocab=200"})); }),
             has_substr("model.vocab = 200 is smaller than the 256 byte tokens of data.tokenizer = bytes"));
  CHECK_THAT(usage_error_of([&] { check_data_vocab(load_config("", {"model.vocab=40"})); }),
             has_substr("model.vocab = 40 is smaller than the 96 token ids of data.source = synthetic"));
  CHECK_THAT(usage_error_of([&] { load_config("", {"data.tokenizer=" + tk}); }),
             has_substr("tokenizes the Brown corpus or JSONL records; with data.source = synthetic set data.tokenizer = bytes"));
  CHECK_THAT(usage_error_of([&] { train(cfg("256"), test::quiet_options()); }),
             has_substr("set model.vocab = 262"));
  // A missing tokenizer file is reported with what data.tokenizer accepts.
  CHECK_THAT(usage_error_of([&] {
               check_data_vocab(load_config("", {"data.source=brown", "data.tokenizer=" + tmp.path("nope.json")}));
             }),
             has_substr("is not a file"));
}

TEST_CASE("tokenizer data: train on tokens, resume, and generate through the tokenizer", "[tokenizer][data][generate]") {
  test::TempDir tmp("tokdata");
  const std::string brown = write_brown(tmp), tk = write_tokenizer(tmp);
  const RunConfig cfg = load_config(
      "", test::tiny_model_sets({"data.source=brown", "data.path=" + brown, "data.tokenizer=" + tk, "model.vocab=264",
                                 "train.steps=3", "train.batch=2", "train.seq=8", "log.eval_every=3",
                                 "log.checkpoint_every=3", "log.out=" + tmp.path("run.h5")}));
  const TrainResult r = train(cfg, test::quiet_options());
  REQUIRE(r.losses.size() == 3);
  CHECK(std::isfinite(r.losses.back()));
  REQUIRE(r.eval_losses.size() == 1);
  const std::string ckpt = r.last_checkpoint;
  REQUIRE(!ckpt.empty());
  // Generation encodes the prompt with the run's tokenizer and writes each sampled token's bytes;
  // ids 262 and 263 (padding rows of model.vocab = 264) have no token and are never sampled.
  const std::string cmd = std::string("'") + MOELAB_BINARY + "' generate --checkpoint '" + ckpt +
                          "' --prompt 'The jury' --tokens 12 --top-k 0 --temperature 5 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = ::pclose(p);
  INFO(out);
  CHECK(status == 0);
  CHECK(out.rfind("The jury", 0) == 0);
  CHECK(out.size() >= 8 + 12 + 1);  // each of the 12 tokens is at least one byte
}
