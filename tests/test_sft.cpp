// moelab tests: the training stages after pretraining (issue 12, items 3-4): the packed-record
// contract of the ops (segments in attention, positions in RoPE, ignored targets in the
// cross-entropy), a packed batch against its records run one by one (logits and gradients), the
// answer-only loss (prompt tokens weigh nothing), JSONL records (formats, chat template, bad
// records with their line numbers), packing, the data stream's determinism and resume,
// train.init_from (weights, router biases, refusals, log attributes) and Brown genre selection.
#include <H5Cpp.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <numeric>

#include "backends/registry.h"
#include "core/io/checkpoint.h"
#include "core/io/config.h"
#include "core/io/data.h"
#include "core/io/sft_data.h"
#include "core/io/tokenizer.h"
#include "core/model.h"
#include "core/trainer.h"
#include "temp_dir.h"
#include "test_util.h"
#include "train_util.h"

using namespace moelab;
using namespace moelab::test;
namespace fs = std::filesystem;

namespace {

Backend& B() { return cpu(); }
Tensor like(const Tensor& t) { return B().empty(t.shape(), t.dtype()); }

// Rows [r0, r1) of a [T, W] host tensor as a new tensor.
Tensor rows(const Tensor& t, int64_t r0, int64_t r1) { return clone(t.view_rows(r0, r1)); }

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

std::vector<double> values(const Tensor& t) { return host_values(t); }

// Segment ids and positions of records of the given lengths packed into one row of S (padding
// gets segment -1 and positions counting from 0).
void layout_of(const std::vector<int64_t>& lens, int64_t S, std::vector<int>& seg, std::vector<int>& pos) {
  seg.clear();
  pos.clear();
  for (size_t r = 0; r < lens.size(); ++r)
    for (int64_t i = 0; i < lens[r]; ++i) {
      seg.push_back(int(r));
      pos.push_back(int(i));
    }
  for (int p = 0; int64_t(seg.size()) < S; ++p) {
    seg.push_back(-1);
    pos.push_back(p);
  }
}

}  // namespace

// ---- ops ----------------------------------------------------------------------------------------

TEST_CASE("sft ops: segmented attention equals each segment run as its own sequence", "[sft][attention]") {
  // One row of S = 12 holding records of 3, 5 and 2 tokens and 2 padding tokens; GQA 4 / 2 heads.
  const int64_t S = 12, H = 4, Hkv = 2, dh = 3;
  const std::vector<int64_t> lens = {3, 5, 2, 2};  // the last "record" is the padding
  std::vector<int> seg, pos;
  layout_of({3, 5, 2}, S, seg, pos);
  const Tensor segments = ints(seg, Shape{S});
  Tensor q = randn(Shape{S, H * dh}, 31), k = randn(Shape{S, Hkv * dh}, 32), v = randn(Shape{S, Hkv * dh}, 33);
  Tensor dout = randn(Shape{S, H * dh}, 34);
  Tensor out = like(q), lse = B().empty(Shape{H, S}, DType::F64);
  B().attention_forward(q, k, v, H, Hkv, S, out, lse, segments);
  Tensor dq = like(q), dk = like(k), dv = like(v);
  B().attention_backward(q, k, v, out, lse, dout, H, Hkv, S, dq, dk, dv, segments);
  int64_t t0 = 0;
  for (int64_t n : lens) {
    INFO("segment at " << t0 << " of " << n << " tokens");
    const Tensor qs = rows(q, t0, t0 + n), ks = rows(k, t0, t0 + n), vs = rows(v, t0, t0 + n);
    Tensor o = like(qs), l = B().empty(Shape{H, n}, DType::F64);
    B().attention_forward(qs, ks, vs, H, Hkv, n, o, l);
    Tensor gq = like(qs), gk = like(ks), gv = like(vs);
    B().attention_backward(qs, ks, vs, o, l, rows(dout, t0, t0 + n), H, Hkv, n, gq, gk, gv);
    CHECK(max_abs_diff(values(rows(out, t0, t0 + n)), values(o)) < 1e-12);
    CHECK(max_abs_diff(values(rows(dq, t0, t0 + n)), values(gq)) < 1e-12);
    CHECK(max_abs_diff(values(rows(dk, t0, t0 + n)), values(gk)) < 1e-12);
    CHECK(max_abs_diff(values(rows(dv, t0, t0 + n)), values(gv)) < 1e-12);
    const auto lv = values(lse), ls = values(l);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < n; ++i) CHECK(std::abs(lv[size_t(h * S + t0 + i)] - ls[size_t(h * n + i)]) < 1e-12);
    t0 += n;
  }
}

TEST_CASE("grad: segmented attention (two rows, GQA)", "[sft][grad][attention]") {
  const int64_t S = 6, Bn = 2, H = 2, Hkv = 1, dh = 2, T = S * Bn;
  // Row 0: records of 2 and 4 tokens; row 1: 3 tokens and 3 of padding.
  const Tensor segments = ints({0, 0, 1, 1, 1, 1, 0, 0, 0, -1, -1, -1}, Shape{T});
  Tensor q = randn(Shape{T, H * dh}, 41), k = randn(Shape{T, Hkv * dh}, 42), v = randn(Shape{T, Hkv * dh}, 43);
  Tensor r = randn(Shape{T, H * dh}, 44);
  auto f = [&] {
    Tensor o = like(q), l = B().empty(Shape{Bn * H, S}, DType::F64);
    B().attention_forward(q, k, v, H, Hkv, S, o, l, segments);
    return dot(o, r);
  };
  Tensor o = like(q), lse = B().empty(Shape{Bn * H, S}, DType::F64);
  B().attention_forward(q, k, v, H, Hkv, S, o, lse, segments);
  Tensor dq = like(q), dk = like(k), dv = like(v);
  B().attention_backward(q, k, v, o, lse, r, H, Hkv, S, dq, dk, dv, segments);
  check_gradient("segmented attention dq", f, q, dq);
  check_gradient("segmented attention dk", f, k, dk);
  check_gradient("segmented attention dv", f, v, dv);
  // The first token of every segment sees only itself: its output is its value row.
  const auto ov = values(o), vv = values(v);
  for (int64_t t : {0, 2, 6, 9})
    for (int64_t d = 0; d < dh; ++d) CHECK(ov[size_t(t * H * dh + d)] == Approx(vv[size_t(t * Hkv * dh + d)]).epsilon(1e-12));
  // Bad segments: wrong dtype or length, named.
  Tensor bad = ints({0, 0}, Shape{2});
  CHECK_THROWS_WITH(B().attention_forward(q, k, v, H, Hkv, S, o, lse, bad), has_substr("segments has shape"));
}

TEST_CASE("sft ops: RoPE with positions equals RoPE of each record on its own", "[sft][rope]") {
  const int64_t S = 9, H = 2, dh = 4;
  std::vector<int> seg, pos;
  layout_of({4, 3}, S, seg, pos);
  const Tensor positions = ints(pos, Shape{S});
  Tensor x = randn(Shape{S, H * dh}, 51), y = like(x), dx = like(x);
  B().rope_forward(x, H, S, 10000.0, y, positions);
  B().rope_backward(x, H, S, 10000.0, dx, positions);
  int64_t t0 = 0;
  for (int64_t n : {4, 3, 2}) {
    const Tensor xs = rows(x, t0, t0 + n);
    Tensor ys = like(xs), ds = like(xs);
    B().rope_forward(xs, H, n, 10000.0, ys);
    B().rope_backward(xs, H, n, 10000.0, ds);
    CHECK(max_abs_diff(values(rows(y, t0, t0 + n)), values(ys)) < 1e-14);
    CHECK(max_abs_diff(values(rows(dx, t0, t0 + n)), values(ds)) < 1e-14);
    t0 += n;
  }
  CHECK_THROWS_WITH(B().rope_forward(x, H, S, 10000.0, y, ints({-1, 0, 0, 0, 0, 0, 0, 0, 0}, Shape{S})),
                    has_substr("negative"));
}

TEST_CASE("sft ops: cross-entropy ignores targets of -1 (mean over the rest, zero gradient rows)", "[sft][grad][loss]") {
  Tensor l = randn(Shape{6, 5}, 61, 2.0);
  const Tensor y = ints({0, kIgnoreTarget, 2, kIgnoreTarget, 1, 3}, Shape{6});
  Tensor dl = like(l);
  B().cross_entropy_backward(l, y, 0.5, dl);
  check_gradient("cross_entropy with ignored rows", [&] { return 0.5 * B().cross_entropy_forward(l, y); }, l, dl);
  const auto g = values(dl);
  for (int64_t t : {1, 3})
    for (int64_t j = 0; j < 5; ++j) CHECK(g[size_t(t * 5 + j)] == 0.0);
  // The value is the mean over the four rows that bear loss.
  const Tensor y4 = ints({0, 2, 1, 3}, Shape{4});
  Tensor l4 = B().empty(Shape{4, 5}, DType::F64);
  const auto lv = values(l);
  std::vector<double> kept;
  for (int64_t t : {0, 2, 4, 5})
    for (int64_t j = 0; j < 5; ++j) kept.push_back(lv[size_t(t * 5 + j)]);
  l4 = host_tensor(kept, Shape{4, 5}, DType::F64);
  CHECK(B().cross_entropy_forward(l, y) == Approx(B().cross_entropy_forward(l4, y4)).epsilon(1e-14));
  // No row bearing loss: 0 and a zero gradient; another negative target is still an error.
  const Tensor none = ints({-1, -1}, Shape{2});
  Tensor l2 = randn(Shape{2, 5}, 62), d2 = like(l2);
  CHECK(B().cross_entropy_forward(l2, none) == 0.0);
  B().cross_entropy_backward(l2, none, 1.0, d2);
  CHECK(B().sum_squares(d2) == 0.0);
  CHECK_THROWS_WITH(B().cross_entropy_forward(l2, ints({-2, 0}, Shape{2})), has_substr("target -2 outside"));
}

// ---- model: packed batch = records one by one -----------------------------------------------------

namespace {

LMConfig packing_lm() {
  LMConfig c;
  c.vocab = 13;
  c.d_model = 8;
  c.layers = 2;
  c.heads = 2;
  c.kv_heads = 1;
  c.moe_every = 1;
  c.tie_embeddings = false;
  c.moe.d_model = 8;
  c.moe.experts = 4;
  c.moe.top_k = 2;
  c.moe.d_expert = 6;
  // Token choice, dropless, no router losses: a token's output depends only on its own routing.
  // (The load-balancing and z losses are batch statistics, so they do couple records, as they
  // couple any tokens of a batch.)
  return c;
}

struct Rec {
  std::vector<int> tokens;   // the record
  std::vector<int> targets;  // per position: the next token, or -1 (no loss)
};

}  // namespace

TEST_CASE("sft model: a packed batch equals its records run one by one (logits and gradients)", "[sft][model][packing]") {
  const LMConfig cfg = packing_lm();
  TransformerLM lm(B(), cfg, DType::F64);
  lm.init(7);
  const int64_t S = 10;
  // Row 0: records of 3, 4 and 2 tokens + 1 padding; row 1: records of 6 and 4 tokens. The
  // targets of record r: its next tokens, the last -1; record 1 also masks its first target
  // (a prompt token under train.loss_on = response).
  std::vector<Rec> recs = {{{1, 2, 3}, {}}, {{4, 5, 6, 7}, {}}, {{8, 9}, {}}, {{10, 11, 12, 1, 2, 3}, {}}, {{5, 5, 6, 6}, {}}};
  for (Rec& r : recs) {
    for (size_t i = 0; i < r.tokens.size(); ++i) r.targets.push_back(i + 1 < r.tokens.size() ? r.tokens[i + 1] : -1);
  }
  recs[1].targets[0] = -1;
  const std::vector<std::vector<int>> rowrecs = {{0, 1, 2}, {3, 4}};
  std::vector<int> tok, tg, seg, pos;
  std::vector<std::pair<int, int>> where(recs.size());  // record -> (row, offset)
  for (size_t row = 0; row < rowrecs.size(); ++row) {
    std::vector<int64_t> lens;
    int64_t off = 0;
    for (int r : rowrecs[row]) {
      where[size_t(r)] = {int(row), int(off)};
      lens.push_back(int64_t(recs[size_t(r)].tokens.size()));
      tok.insert(tok.end(), recs[size_t(r)].tokens.begin(), recs[size_t(r)].tokens.end());
      tg.insert(tg.end(), recs[size_t(r)].targets.begin(), recs[size_t(r)].targets.end());
      off += lens.back();
    }
    std::vector<int> s, p;
    layout_of(lens, S, s, p);
    seg.insert(seg.end(), s.begin(), s.end());
    pos.insert(pos.end(), p.begin(), p.end());
    for (int64_t j = off; j < S; ++j) {
      tok.push_back(0);
      tg.push_back(-1);
    }
  }
  const int64_t T = int64_t(tok.size());
  REQUIRE(T == 2 * S);
  int64_t N = 0;
  for (int y : tg) N += y >= 0;

  PackedLayout packed{ints(seg, Shape{T}), ints(pos, Shape{T})};
  lm.zero_grad();
  const LMForward fp = lm.forward(ints(tok, Shape{T}), ints(tg, Shape{T}), S, true, 3, packed);
  const auto logits_packed = values(lm.logits());
  lm.backward();
  std::vector<std::vector<double>> grads_packed;
  for (ParamRef& p : lm.params()) grads_packed.push_back(values(p.grad));

  // One by one: each record is its own sequence; its gradient weighs n_r / N (the trainer's
  // micro-batch weighting), so that the sum is the gradient of the mean over all N targets.
  lm.zero_grad();
  double loss_sum = 0;
  for (size_t r = 0; r < recs.size(); ++r) {
    const int64_t n = int64_t(recs[r].tokens.size());
    int64_t nr = 0;
    for (int y : recs[r].targets) nr += y >= 0;
    const LMForward f = lm.forward(ints(recs[r].tokens, Shape{n}), ints(recs[r].targets, Shape{n}), n, true, 3);
    loss_sum += f.ce_loss * double(nr);
    const auto lr = values(lm.logits());
    const auto [row, off] = where[r];
    const int64_t V = cfg.vocab, at = (row * S + off) * V;
    INFO("record " << r);
    CHECK(max_abs_diff(std::vector<double>(logits_packed.begin() + at, logits_packed.begin() + at + n * V), lr) < 1e-12);
    lm.backward({}, double(nr) / double(N));
  }
  CHECK(fp.ce_loss == Approx(loss_sum / double(N)).epsilon(1e-12));
  size_t i = 0;
  for (ParamRef& p : lm.params()) {
    INFO(p.name);
    const auto g = values(p.grad);
    double scale = 1e-300;
    for (double x : g) scale = std::max(scale, std::abs(x));
    CHECK(max_abs_diff(grads_packed[i++], g) <= 1e-11 * std::max(1.0, scale));
  }
}

TEST_CASE("sft model: answer-only loss - prompt targets weigh nothing", "[sft][model][answer-only]") {
  // A record rendered from JSONL with the answer-only mask: the loss is the mean over the
  // response's targets alone, and the gradient of the objective with respect to the logits of
  // every other position (prompt, template, record end, padding) is exactly zero.
  SftLoadOptions o;
  o.chat_template = "<{role}>{content}|";
  o.loss_on = LossOn::Response;
  const SftRecord rec = parse_sft_record(R"({"prompt": "ab", "response": "cd"})", o);
  // <user>ab|<assistant>cd|  : the response is "cd|" (content to the template's end).
  const std::string text = "<user>ab|<assistant>cd|";
  REQUIRE(rec.ids.size() == text.size());
  for (size_t i = 0; i < text.size(); ++i) CHECK(rec.ids[i] == int32_t(uint8_t(text[i])));
  const int64_t first = int64_t(text.find("cd|")), n = int64_t(text.size());
  for (int64_t i = 0; i < n; ++i) CHECK(rec.response[size_t(i)] == (i >= first ? 1 : 0));

  const int64_t S = 28, V = 128;
  LMConfig cfg = packing_lm();
  cfg.vocab = V;
  TransformerLM lm(B(), cfg, DType::F64);
  lm.init(11);
  struct Run {
    double loss;
    std::vector<uint8_t> mask;
    std::vector<double> logits, dlogits;
  };
  auto run = [&](LossOn on) {
    Batch b;
    b.batch = 1;
    b.seq = S;
    b.tokens.assign(S + 1, 0);
    b.category.assign(S + 1, 0);
    b.segment.assign(S, -1);
    b.position.assign(S, 0);
    b.loss.assign(S, 0);
    fill_packed_row({rec}, {0}, on, b, 0);
    Tensor in, tg;
    PackedLayout layout;
    batch_tensors(B(), b, in, tg, &layout);
    const double loss = lm.forward(in, tg, S, true, 1, layout).ce_loss;
    Tensor dl = like(lm.logits());
    B().cross_entropy_backward(lm.logits(), tg, 1.0, dl);  // what the model's backward starts from
    return Run{loss, b.loss, values(lm.logits()), values(dl)};
  };
  const Run resp = run(LossOn::Response), all = run(LossOn::All);
  // The targets bearing loss: the inputs whose next token is c, d, | (inputs first-1 .. n-2).
  for (int64_t j = 0; j < S; ++j) CHECK(resp.mask[size_t(j)] == (j >= first - 1 && j + 1 < n ? 1 : 0));
  for (int64_t j = 0; j < S; ++j) CHECK(all.mask[size_t(j)] == (j + 1 < n ? 1 : 0));
  // The loss by hand: the mean over the three response targets of -log softmax.
  double by_hand = 0;
  for (int64_t j = first - 1; j + 1 < n; ++j) {
    const double* l = resp.logits.data() + j * V;
    const double m = *std::max_element(l, l + V);
    double z = 0;
    for (int64_t v = 0; v < V; ++v) z += std::exp(l[v] - m);
    by_hand += m + std::log(z) - l[rec.ids[size_t(j + 1)]];
  }
  CHECK(resp.loss == Approx(by_hand / 3.0).epsilon(1e-12));
  CHECK(resp.loss != all.loss);
  // Zero gradient at every position whose target is not a response token; nonzero at the others.
  for (int64_t j = 0; j < S; ++j) {
    double norm = 0;
    for (int64_t v = 0; v < V; ++v) norm += std::abs(resp.dlogits[size_t(j * V + v)]);
    INFO("position " << j);
    if (resp.mask[size_t(j)]) CHECK(norm > 0);
    else CHECK(norm == 0.0);
  }
}

// ---- JSONL records ----------------------------------------------------------------------------

TEST_CASE("sft data: record formats, chat template, tokens", "[sft][data]") {
  SftLoadOptions o;
  // prompt_response with the default template: prompt + response, byte for byte.
  SftRecord r = parse_sft_record(R"({"prompt": "Q:", "response": "A\n", "id": 7})", o);
  CHECK(r.ids == std::vector<int32_t>{'Q', ':', 'A', '\n'});
  CHECK(r.response == std::vector<uint8_t>{0, 0, 1, 1});
  // messages through a ChatML-like template (escapes decoded from the config value).
  o.format = RecordFormat::Messages;
  o.chat_template = decode_chat_template("<|{role}|>\\n{content}<|end|>\\n");
  CHECK(o.chat_template == "<|{role}|>\n{content}<|end|>\n");
  r = parse_sft_record(R"({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                         {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"},
                                         {"role": "assistant", "content": "B"}]})", o);
  std::string text(r.ids.begin(), r.ids.end()), resp;
  for (size_t i = 0; i < r.ids.size(); ++i)
    if (r.response[i]) resp += char(r.ids[i]);
  CHECK(text == "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\nA<|end|>\n<|user|>\nV<|end|>\n<|assistant|>\nB<|end|>\n");
  CHECK(resp == "A<|end|>\nB<|end|>\n");
  // token ids
  o.format = RecordFormat::Tokens;
  o.vocab_limit = 100;
  r = parse_sft_record(R"({"prompt_ids": [5, 6], "response_ids": [99]})", o);
  CHECK(r.ids == std::vector<int32_t>{5, 6, 99});
  CHECK(r.response == std::vector<uint8_t>{0, 0, 1});
  // Template errors name the key.
  CHECK_THROWS_WITH(decode_chat_template("no content"), has_substr("data.chat_template"));
  CHECK_THROWS_WITH(decode_chat_template("{content}\\q"), has_substr("unknown escape \\q"));
  CHECK_THROWS_WITH(decode_chat_template("{content}\\x4"), has_substr("two hex digits"));
  CHECK(decode_chat_template("\\x23 {content}\\x20") == "# {content} ");
}

TEST_CASE("sft data: with a tokenizer, prompt and response are encoded apart (no token straddles them)", "[sft][data][tokenizer]") {
  // A tiny byte-level BPE: 256 byte symbols (printable ASCII maps to itself), then "Th" (256) and
  // "The" (257).
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) {
    std::string sym;
    if (b > ' ' && b < 127) {
      sym = std::string(1, char(b));
    } else {  // GPT-2's bytes_to_unicode for the rest
      int n = 0;
      for (int k = 0; k < b; ++k)
        if (!((k >= '!' && k <= '~') || (k >= 0xA1 && k <= 0xAC) || (k >= 0xAE && k <= 0xFF))) ++n;
      const int c = (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE) ? b : 256 + n;
      sym += char(0xC0 | (c >> 6));
      sym += char(0x80 | (c & 0x3F));
    }
    vocab[sym] = b;
  }
  vocab["Th"] = 256;
  vocab["The"] = 257;
  const nlohmann::json t = {{"added_tokens", nlohmann::json::array()}, {"normalizer", nullptr},
                            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
                            {"decoder", {{"type", "ByteLevel"}}},
                            {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array({"T h", "Th e"})}}}};
  const Tokenizer tok = Tokenizer::from_json(t.dump(), "tiny");
  SftLoadOptions o;
  o.tokenizer = &tok;
  SftRecord r = parse_sft_record(R"({"prompt": "The", "response": "The"})", o);
  CHECK(r.ids == std::vector<int32_t>{257, 257});
  CHECK(r.response == std::vector<uint8_t>{0, 1});
  // "Th" | "e": encoded as one text it would be "The" (257); apart, "Th" then "e".
  r = parse_sft_record(R"({"prompt": "Th", "response": "e!"})", o);
  CHECK(r.ids == std::vector<int32_t>{256, 'e', '!'});
  CHECK(r.response == std::vector<uint8_t>{0, 1, 1});
}

TEST_CASE("sft data: bad records are reported with their line, stopped or skipped and counted", "[sft][data][errors]") {
  TempDir tmp;
  const std::string path = tmp.write("d.jsonl",
                                     "{\"prompt\": \"ab\", \"response\": \"cd\"}\n"
                                     "\n"                                     // blank: skipped silently
                                     "{\"prompt\": \"ab\"\n"                  // 3: invalid JSON
                                     "{\"prompt\": \"ab\"}\n"                 // 4: no response
                                     "{\"prompt\": 5, \"response\": \"x\"}\n" // 5: not a string
                                     "[1, 2]\n"                               // 6: not an object
                                     "{\"prompt\": \"abcdefghij\", \"response\": \"x\"}\n"  // 7: > seq
                                     "{\"prompt\": \"\", \"response\": \"z\"}\n"  // 8: 1 token
                                     "{\"prompt\": \"ab\", \"response\": \"\"}\n"  // 9: no response token
                                     "{\"prompt\": \"x\", \"response\": \"y\"}\r\n");
  SftLoadOptions o;
  o.max_tokens = 8;
  o.loss_on = LossOn::Response;
  CHECK_THROWS_WITH(load_sft_jsonl(path, o), has_substr(path + ":3: invalid JSON"));
  o.bad = BadRecords::Skip;
  const SftFile f = load_sft_jsonl(path, o);
  CHECK(f.records.size() == 2);
  CHECK(f.records[0].line == 1);
  CHECK(f.records[1].line == 10);
  CHECK(f.lines == 9);
  CHECK(f.skipped == 7);
  REQUIRE(f.problems.size() == 7);
  CHECK_THAT(f.problems[0], has_substr(":3: invalid JSON"));
  CHECK_THAT(f.problems[1], has_substr(":4: missing field \"response\""));
  CHECK_THAT(f.problems[2], has_substr(":5: field \"prompt\" in the record is a number, expected a string"));
  CHECK_THAT(f.problems[3], has_substr(":6: the line is an array"));
  CHECK_THAT(f.problems[4], has_substr(":7: the record has 11 tokens, longer than train.seq = 8"));
  CHECK_THAT(f.problems[5], has_substr(":8: the record has 1 token(s)"));
  CHECK_THAT(f.problems[6], has_substr(":9: the record has no response token"));
  // Token ids outside the vocabulary, messages without a list, a message without a role.
  SftLoadOptions t;
  t.format = RecordFormat::Tokens;
  t.vocab_limit = 10;
  CHECK_THROWS_WITH(parse_sft_record(R"({"prompt_ids": [1], "response_ids": [10]})", t),
                    has_substr("\"response_ids\"[0] = 10 is outside [0, model.vocab = 10)"));
  CHECK_THROWS_WITH(parse_sft_record(R"({"prompt_ids": [1.5], "response_ids": [1]})", t), has_substr("expected an integer"));
  SftLoadOptions m;
  m.format = RecordFormat::Messages;
  CHECK_THROWS_WITH(parse_sft_record(R"({"messages": []})", m), has_substr("empty list"));
  CHECK_THROWS_WITH(parse_sft_record(R"({"messages": [{"content": "x"}]})", m),
                    has_substr("missing field \"role\" in messages[0]"));
  CHECK_THROWS_WITH(load_sft_jsonl(tmp.path("none.jsonl"), o), has_substr("no such JSONL file"));
}

TEST_CASE("sft data: packing keeps records whole, masks record boundaries and pads", "[sft][data][packing]") {
  std::vector<SftRecord> recs(4);
  const std::vector<int> lens = {4, 3, 5, 2};
  for (size_t r = 0; r < recs.size(); ++r) {
    for (int i = 0; i < lens[r]; ++i) {
      recs[r].ids.push_back(int32_t(10 * (r + 1) + i));
      recs[r].response.push_back(i >= 1);
    }
  }
  const std::vector<int32_t> order = {0, 1, 2, 3};
  CHECK(pack_records(recs, order, 8, true) == std::vector<std::vector<int32_t>>{{0, 1}, {2, 3}});
  CHECK(pack_records(recs, order, 8, false) == std::vector<std::vector<int32_t>>{{0}, {1}, {2}, {3}});
  CHECK(pack_records(recs, {2, 0, 3, 1}, 8, true) == std::vector<std::vector<int32_t>>{{2}, {0, 3}, {1}});
  Batch b;
  b.batch = 1;
  b.seq = 8;
  b.tokens.assign(9, -5);
  b.category.assign(9, -5);
  b.segment.assign(8, -5);
  b.position.assign(8, -5);
  b.loss.assign(8, 9);
  fill_packed_row(recs, {0, 1}, LossOn::All, b, 0);
  CHECK(b.tokens == std::vector<int32_t>{10, 11, 12, 13, 20, 21, 22, 0, 0});
  CHECK(b.segment == std::vector<int32_t>{0, 0, 0, 0, 1, 1, 1, -1});
  CHECK(b.position == std::vector<int32_t>{0, 1, 2, 3, 0, 1, 2, 0});
  // No target crosses into the next record (input 3's target would be record 1's first token).
  CHECK(b.loss == std::vector<uint8_t>{1, 1, 1, 0, 1, 1, 0, 0});
  CHECK(b.category == std::vector<int32_t>{0, 1, 1, 1, 0, 1, 1, 2, 2});
  fill_packed_row(recs, {0, 1}, LossOn::Response, b, 0);
  CHECK(b.loss == std::vector<uint8_t>{1, 1, 1, 0, 1, 1, 0, 0});  // responses start at token 1
  recs[0].response = {0, 0, 1, 1};
  fill_packed_row(recs, {0, 1}, LossOn::Response, b, 0);
  CHECK(b.loss == std::vector<uint8_t>{0, 1, 1, 0, 1, 1, 0, 0});
  CHECK(b.loss_tokens(0, 1) == 4);
}

namespace {
DataConfig jsonl_data(const std::string& path) {
  DataConfig d;
  d.source = "jsonl";
  d.path = path;
  d.val_fraction = 0.2;
  return d;
}
std::string toy_jsonl(const TempDir& tmp, int n = 40) {
  std::string text;
  for (int i = 0; i < n; ++i)
    text += "{\"prompt\": \"" + std::string(size_t(1 + i % 5), char('a' + i % 7)) + "=\", \"response\": \"" +
            std::to_string(i) + "\\n\"}\n";
  return tmp.write("toy.jsonl", text);
}
}  // namespace

TEST_CASE("sft data: the JSONL source is deterministic, covers every record per epoch and resumes", "[sft][data]") {
  TempDir tmp;
  const DataConfig d = jsonl_data(toy_jsonl(tmp));
  JsonlSource a(d, 3, 12, 5, 4, LossOn::Response, 256), b(d, 3, 12, 5, 4, LossOn::Response, 256);
  CHECK(a.train_records().size() == 32);  // every 5th record (val_fraction 0.2) is held out
  CHECK(a.val_records().size() == 8);
  Batch x, y;
  for (int i = 0; i < 7; ++i) {
    a.next_train(x);
    b.next_train(y);
    CHECK(x.tokens == y.tokens);
    CHECK(x.loss == y.loss);
  }
  // Resume: a fresh source at the saved state continues identically.
  JsonlSource c(d, 3, 12, 5, 4, LossOn::Response, 256);
  c.set_state(a.state());
  a.next_train(x);
  c.next_train(y);
  CHECK(x.tokens == y.tokens);
  CHECK(x.segment == y.segment);
  // Every epoch holds every training record exactly once, in a seeded order.
  for (uint64_t e : {0, 1}) {
    std::vector<int32_t> seen;
    for (const auto& row : a.epoch_rows(e)) seen.insert(seen.end(), row.begin(), row.end());
    std::vector<int32_t> sorted = seen;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int32_t> all(32);
    std::iota(all.begin(), all.end(), 0);
    CHECK(sorted == all);
  }
  CHECK(a.epoch_rows(0) != a.epoch_rows(1));
  JsonlSource other_seed(d, 3, 12, 6, 4, LossOn::Response, 256);
  CHECK(other_seed.epoch_rows(0) != a.epoch_rows(0));
  // Validation: file order, fixed, the last batch padded with empty rows.
  REQUIRE(a.val_batches() >= 1);
  Batch v1, v2;
  a.val_batch(0, v1);
  b.val_batch(0, v2);
  CHECK(v1.tokens == v2.tokens);
  CHECK(a.category_names() == std::vector<std::string>{"prompt", "response", "padding"});
  // A state of another source is refused.
  DataConfig unpacked = d;
  unpacked.pack = false;
  JsonlSource packed_off(unpacked, 3, 12, 5, 4, LossOn::Response, 256);
  CHECK_THROWS_WITH(packed_off.set_state(a.state()), has_substr("other data"));
}

// ---- trainer: SFT, init_from ------------------------------------------------------------------

namespace {
RunConfig sft_config(const TempDir& tmp, const std::string& data, std::vector<std::string> extra = {}) {
  std::vector<std::string> sets = tiny_model_sets({
      "model.dtype=f64", "data.source=jsonl", "data.path=" + data, "data.val_fraction=0.2", "train.loss_on=response",
      "train.batch=4", "train.seq=16", "train.steps=4", "train.lr=0.01", "train.warmup=1",
      "log.eval_every=2", "log.eval_batches=2", "log.flush_every=1",
      "log.out=" + tmp.path("sft.h5"), "log.checkpoint_dir=" + tmp.path("sft_ck")});
  sets.insert(sets.end(), extra.begin(), extra.end());
  return load_config("", sets);
}

std::vector<int64_t> read_i64(const std::string& file, const std::string& path) {
  H5::H5File f(file, H5F_ACC_RDONLY);
  H5::DataSet d = f.openDataSet(path);
  hsize_t n = 0;
  d.getSpace().getSimpleExtentDims(&n);
  std::vector<int64_t> v(n);
  d.read(v.data(), H5::PredType::NATIVE_INT64);
  return v;
}

std::string read_attr(const std::string& file, const std::string& name) {
  H5::H5File f(file, H5F_ACC_RDONLY);
  H5::Attribute a = f.openAttribute(name);
  std::string v;
  a.read(a.getStrType(), v);
  return v;
}
}  // namespace

TEST_CASE("sft train: loss-bearing tokens are logged, micro-batches and ranks weigh them alike", "[sft][train]") {
  TempDir tmp;
  const std::string data = toy_jsonl(tmp);
  TrainResult one = train(sft_config(tmp, data), quiet_options());
  const auto counts = read_i64(tmp.path("sft.h5"), "/train/loss_tokens");
  REQUIRE(counts.size() == 4);
  // Each step's count is what its batch holds: recompute from the data source.
  JsonlSource src(sft_config(tmp, data).data, 4, 16, 1234, 2, LossOn::Response, 256);
  Batch b;
  for (size_t s = 0; s < counts.size(); ++s) {
    src.next_train(b);
    CHECK(counts[s] == b.loss_tokens(0, 4));
    CHECK(counts[s] > 0);
  }
  // The objective is the mean over the step's loss-bearing tokens, however the batch is split:
  // two micro-batches, or two simulated data-parallel ranks, whose records bear different numbers
  // of loss tokens, train exactly as one batch (no router loss here, so nothing else differs), up
  // to the rounding of the sums.
  TrainOptions again = quiet_options("", true);
  auto variant = [&](const std::string& name, std::vector<std::string> sets) {
    sets.push_back("log.out=" + tmp.path(name + ".h5"));
    sets.push_back("log.checkpoint_dir=" + tmp.path(name + "_ck"));
    sets.push_back("router.balance_scope=micro_batch");
    return train(sft_config(tmp, data, sets), again);
  };
  const TrainResult accum = variant("accum", {"train.grad_accum=2"});
  const TrainResult ranks = variant("ranks", {"parallel.dp=2"});
  REQUIRE(accum.losses.size() == one.losses.size());
  REQUIRE(ranks.losses.size() == one.losses.size());
  for (size_t s = 0; s < one.losses.size(); ++s) {
    INFO("step " << s + 1);
    CHECK(accum.losses[s] == Approx(one.losses[s]).epsilon(1e-9));
    CHECK(ranks.losses[s] == Approx(one.losses[s]).epsilon(1e-9));
  }
  CHECK(accum.eval_losses.back() == Approx(one.eval_losses.back()).epsilon(1e-9));
}

TEST_CASE("sft train: init_from starts from a checkpoint's weights and biases with a new schedule", "[sft][train][init_from]") {
  TempDir tmp;
  // The source run: synthetic pretraining with aux-loss-free router biases.
  RunConfig src = load_config("", tiny_model_sets({"train.batch=2", "train.seq=16", "train.steps=4", "train.lr=0.01",
                                                   "router.bias_update_rate=0.01", "log.eval_every=4", "log.eval_batches=1",
                                                   "log.checkpoint_every=4", "log.out=" + tmp.path("pre.h5"),
                                                   "log.checkpoint_dir=" + tmp.path("pre_ck")}));
  TrainResult pre = train(src, quiet_options());
  const std::string ck = checkpoint_path(tmp.path("pre_ck"), 4);
  REQUIRE(fs::exists(ck));
  CheckpointReader reader(ck);
  // The continued run: same model, new data seed and schedule, no bias updates.
  RunConfig cont = load_config("", tiny_model_sets({"train.batch=2", "train.seq=16", "train.steps=3", "train.lr=0.001",
                                                    "train.seed=77", "log.eval_every=3", "log.eval_batches=1",
                                                    "train.init_from=" + ck, "log.out=" + tmp.path("cont.h5"),
                                                    "log.checkpoint_every=3", "log.checkpoint_dir=" + tmp.path("cont_ck")}));
  bool checked = false;
  TrainOptions o = quiet_options();
  o.on_gradients = [&](const StepView& v) {
    if (v.step != 1) return;
    // Before the first update: every parameter is the checkpoint's, and so is every router bias.
    for (const ParamRef& p : v.params) {
      INFO(p.name);
      CHECK(values(v.backend.to_host(p.value)) == values(reader.tensor(p.name, p.value.shape(), p.value.dtype())));
    }
    const std::vector<int> blocks = v.model.moe_blocks();
    bool any = false;
    for (size_t i = 0; i < blocks.size(); ++i) {
      const auto bias = values(v.backend.to_host(v.model.moe_layer(i).router().params().bias));
      CHECK(bias == values(reader.tensor("router_bias." + std::to_string(blocks[i]), Shape{4}, DType::F32)));
      any = any || std::any_of(bias.begin(), bias.end(), [](double x) { return x != 0; });
    }
    CHECK(any);  // the source run did move them
    checked = true;
  };
  TrainResult r = train(cont, o);
  CHECK(checked);
  CHECK(r.steps == std::vector<int64_t>{1, 2, 3});  // a new step count
  // Eval at step 0 is the checkpoint's model on this run's validation data: the source run's last
  // evaluation (same synthetic validation set, which does not depend on the seed).
  REQUIRE(r.eval_steps.front() == 0);
  CHECK(r.eval_losses.front() == Approx(pre.eval_losses.back()).epsilon(1e-12));
  CHECK(read_attr(tmp.path("cont.h5"), "init_from") == ck);
  CHECK(read_attr(tmp.path("cont.h5"), "init_from_run_id") == reader.meta("run_id"));
  // The new run's checkpoint says where it started, and has fresh optimizer state (step 3 of its
  // own schedule); it is another run.
  CheckpointReader mine(checkpoint_path(tmp.path("cont_ck"), 3));
  CHECK(mine.meta("init_from") == ck);
  CHECK(mine.meta("run_id") != reader.meta("run_id"));

  // Refusals: another model shape names the key and both values; a missing file names the key.
  RunConfig wider = cont;
  wider.moe.d_expert = 32;
  wider.log.out = tmp.path("w.h5");
  wider.log.checkpoint_dir = tmp.path("w_ck");
  CHECK_THROWS_WITH(train(wider, quiet_options()), has_substr("model.d_expert: checkpoint 16, this run 32"));
  RunConfig missing = cont;
  missing.train.init_from = tmp.path("nope.ckpt");
  CHECK_THROWS_WITH(train(missing, quiet_options("", true)), has_substr("train.init_from = " + tmp.path("nope.ckpt")));
}

// ---- Brown genres -------------------------------------------------------------------------------

TEST_CASE("data.genres selects Brown genres, the split does not move", "[sft][data][brown]") {
  CHECK(brown_genres("a-c, k") == "abck");
  CHECK(brown_genres("k-r") == "klmnopqr");
  CHECK(brown_genres("b,a,a") == "ab");
  CHECK_THROWS_WITH(brown_genres("a-z"), has_substr("'z' is not a Brown genre letter"));
  CHECK_THROWS_WITH(brown_genres("j-a"), has_substr("runs backwards"));
  CHECK_THROWS_WITH(brown_genres("a,,b"), has_substr("empty item"));
  CHECK_THROWS_WITH(load_config("", {"data.genres=x"}), has_substr("data.genres"));
  CHECK_THROWS_WITH(load_config("", {"data.genres=a-j"}), has_substr("data.source = synthetic"));
  CHECK_THROWS_WITH(load_config("", {"train.loss_on=response"}), has_substr("train.loss_on = response needs data.source = jsonl"));
  TempDir tmp;
  // Ten files over two genres: with val_fraction 0.2 files 4 and 9 (ca05, cb05) are held out.
  const char* kLine = "\n\n\tThe/at cat/nn sat/vbd ./.\n";
  for (char g : {'a', 'b'})
    for (int i = 1; i <= 5; ++i) tmp.write(std::string("c") + g + "0" + std::to_string(i), kLine);
  BrownSource all(tmp.dir.string(), 0.2, 1, 4, 1, 1);
  CHECK(all.val_files() == std::vector<std::string>{"ca05", "cb05"});
  BrownSource b_only(tmp.dir.string(), 0.2, 1, 4, 1, 1, "bytes", "b");
  CHECK(b_only.train_files() == std::vector<std::string>{"cb01", "cb02", "cb03", "cb04"});
  CHECK(b_only.val_files() == std::vector<std::string>{"cb05"});
  CHECK_THROWS_WITH(BrownSource(tmp.dir.string(), 0.2, 1, 4, 1, 1, "bytes", "k"), has_substr("no training files"));
}
