// moelab: `moelab eval`: a checkpoint's validation loss on its (or an overridden) data, or its
// score on task records.
//
// Task records (--data FILE.jsonl, in data.format, rendered with data.chat_template, both from the
// checkpoint's config or --set): every record is run once, teacher-forced (records packed as in
// training, attention and positions reset per record, so a record's logits do not depend on its
// neighbours), and at each response token the model's most likely next token is compared with
// the reference:
//   token accuracy  the share of response tokens predicted right;
//   exact match     the share of records whose response tokens are ALL predicted right. Under
//                   greedy decoding that is exactly "the model writes the reference response"
//                   (each generated token is then the reference's, so the next prediction sees
//                   the reference prefix, as here); the response includes the template's end
//                   marker, so it also means the model stops where the reference stops;
//   response loss   the mean cross-entropy of the response tokens (nats per token).
// --samples N also greedy-decodes the first N records from their prompts (free running).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>

#include <nlohmann/json.hpp>

#include "backends/registry.h"
#include "core/io/checkpoint.h"
#include "core/io/data.h"
#include "core/io/sft_data.h"
#include "core/io/tokenizer.h"
#include "core/trainer.h"
#include "experiments/commands.h"

using namespace moelab;

namespace {

std::string decode(const Tokenizer* tok, const std::vector<int32_t>& ids) {
  if (tok) {
    std::string out;
    for (int32_t id : ids) out += tok->has_id(id) ? tok->decode_token(id) : std::string("\xEF\xBF\xBD");
    return out;
  }
  std::string out;
  for (int32_t id : ids) out += char(uint8_t(id));
  return out;
}

void write_text(const std::string& path, const std::string& text, const char* what) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.flush();
  if (!out) MOELAB_FAIL("eval: cannot write ", what, " ", path);
}

std::string dump(const nlohmann::json& j) { return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

// The validation loss of the config's data (as the trainer evaluates it).
nlohmann::json validation_loss(const RunConfig& cfg, TransformerLM& model, Backend& b) {
  auto data = make_data_source(cfg.data, cfg.train.batch, cfg.train.seq, cfg.train.seed, cfg.log.eval_batches,
                               cfg.train.loss_on, cfg.model.vocab);
  check_eval_data(cfg, *data);
  double total = 0, counted = 0;
  Batch vb;
  const int64_t n = data->val_batches();
  for (int64_t i = 0; i < n; ++i) {
    data->val_batch(i, vb);
    Tensor in, tg;
    PackedLayout layout;
    batch_tensors(b, vb, in, tg, &layout);
    const LMForward f = model.forward(in, tg, cfg.train.seq, false, 0, layout);
    const double w = double(vb.loss_tokens(0, vb.batch));
    total += f.ce_loss * w;
    counted += w;
  }
  const double loss = counted > 0 ? total / counted : 0.0;
  std::printf("eval: validation loss %.4f nats per token = %.4f bits (%lld batches of %lld x %lld, %.0f loss-bearing tokens, data.source = %s%s)\n",
              loss, loss / std::log(2.0), (long long)n, (long long)cfg.train.batch, (long long)cfg.train.seq,
              counted, cfg.data.source.c_str(),
              cfg.data.source == "brown" ? (", data.genres = " + cfg.data.genres).c_str() : "");
  return {{"val_loss", loss}, {"val_bits", loss / std::log(2.0)}, {"batches", n}, {"tokens", counted},
          {"source", cfg.data.source}, {"genres", cfg.data.genres}};
}

struct RecordScore {
  int64_t tokens = 0, correct = 0;
  double loss = 0;
  std::vector<int32_t> pred;  // teacher-forced argmax at each response position
};

nlohmann::json task_scores(const RunConfig& cfg, const EvalCliOptions& o, TransformerLM& model, Backend& b,
                           const Tokenizer* tok) {
  SftLoadOptions lo;
  lo.format = cfg.data.format;
  lo.chat_template = decode_chat_template(cfg.data.chat_template);
  lo.tokenizer = cfg.data.format == RecordFormat::Tokens ? nullptr : tok;
  lo.max_tokens = cfg.train.seq;
  lo.vocab_limit = cfg.model.vocab;
  lo.loss_on = LossOn::Response;
  lo.bad = cfg.data.bad_records;
  const SftFile file = load_sft_jsonl(o.data, lo, "--data");
  MOELAB_CHECK(!file.records.empty(), "eval: --data ", o.data, " has no usable record");
  const std::vector<SftRecord>& recs = file.records;
  std::vector<int32_t> order(recs.size());
  std::iota(order.begin(), order.end(), 0);
  const int64_t S = cfg.train.seq, V = cfg.model.vocab;
  const auto rows = pack_records(recs, order, S, cfg.data.pack);
  const int64_t per = cfg.train.batch;  // rows per forward
  std::vector<RecordScore> score(recs.size());
  for (size_t r0 = 0; r0 < rows.size(); r0 += size_t(per)) {
    const int64_t nb = std::min<int64_t>(per, int64_t(rows.size() - r0));
    Batch batch;
    batch.batch = nb;
    batch.seq = S;
    batch.tokens.assign(size_t(nb * (S + 1)), 0);
    batch.category.assign(size_t(nb * (S + 1)), 0);
    batch.segment.assign(size_t(nb * S), -1);
    batch.position.assign(size_t(nb * S), 0);
    batch.loss.assign(size_t(nb * S), 0);
    for (int64_t r = 0; r < nb; ++r) fill_packed_row(recs, rows[r0 + size_t(r)], LossOn::Response, batch, r);
    Tensor in, tg;
    PackedLayout layout;
    batch_tensors(b, batch, in, tg, &layout);
    model.forward(in, tg, S, false, 0, layout);
    // Only the logits of the response positions come to the host, a run of rows at a time (the
    // whole [T, V] would be gigabytes for a real vocabulary).
    for (int64_t r = 0; r < nb; ++r)
      for (int64_t j = 0; j < S;) {
        if (!batch.loss[size_t(r * S + j)]) {
          ++j;
          continue;
        }
        int64_t j1 = j;
        while (j1 < S && batch.loss[size_t(r * S + j1)]) ++j1;
        const Tensor lg = b.to_host(model.logits().view_rows(r * S + j, r * S + j1));
        for (int64_t k = j; k < j1; ++k) {
          const size_t at = size_t(r * S + k), off = size_t(k - j) * size_t(V);
          const int32_t rec = rows[r0 + size_t(r)][size_t(batch.segment[at])];
          const int32_t y = batch.tokens[size_t(r * (S + 1) + k + 1)];
          std::vector<double> row(static_cast<size_t>(V));
          for (int64_t v = 0; v < V; ++v)
            row[size_t(v)] = lg.dtype() == DType::F64 ? lg.ptr<double>()[off + size_t(v)] : double(lg.ptr<float>()[off + size_t(v)]);
          const int64_t arg = std::max_element(row.begin(), row.end()) - row.begin();
          const double m = row[size_t(arg)];
          double z = 0;
          for (double x : row) z += std::exp(x - m);
          RecordScore& sc = score[size_t(rec)];
          sc.tokens += 1;
          sc.correct += arg == y;
          sc.loss += m + std::log(z) - row[size_t(y)];
          sc.pred.push_back(int32_t(arg));
        }
        j = j1;
      }
  }
  int64_t tokens = 0, correct = 0, exact = 0;
  double loss = 0;
  std::string per_record;
  for (size_t i = 0; i < recs.size(); ++i) {
    const RecordScore& s = score[i];
    tokens += s.tokens;
    correct += s.correct;
    loss += s.loss;
    exact += s.tokens > 0 && s.correct == s.tokens;
    if (!o.per_record.empty())
      per_record += dump({{"line", recs[i].line}, {"tokens", s.tokens}, {"correct", s.correct},
                          {"exact", s.tokens > 0 && s.correct == s.tokens}, {"loss", s.loss},
                          {"pred", decode(tok, s.pred)}}) + "\n";
  }
  if (!o.per_record.empty()) write_text(o.per_record, per_record, "--per-record");
  const double n = double(recs.size());
  std::printf("eval: %zu records (%lld skipped), %lld response tokens | response loss %.4f nats/token | "
              "token accuracy %.2f%% | exact match %.2f%% (%lld of %zu)\n",
              recs.size(), (long long)file.skipped, (long long)tokens, tokens ? loss / double(tokens) : 0.0,
              tokens ? 100.0 * double(correct) / double(tokens) : 0.0, 100.0 * double(exact) / n,
              (long long)exact, recs.size());

  // Free-running greedy generations of the first records, from the tokens before their first
  // response token.
  nlohmann::json samples = nlohmann::json::array();
  for (size_t i = 0; i < recs.size() && int64_t(i) < o.samples; ++i) {
    const SftRecord& rec = recs[i];
    const size_t cut = size_t(std::find(rec.response.begin(), rec.response.end(), uint8_t(1)) - rec.response.begin());
    std::vector<int32_t> ctx(rec.ids.begin(), rec.ids.begin() + long(cut));
    const std::vector<int32_t> gold(rec.ids.begin() + long(cut), rec.ids.end());
    const int64_t steps = o.max_new > 0 ? o.max_new : int64_t(gold.size());
    std::vector<int32_t> out;
    for (int64_t k = 0; k < steps; ++k) {
      const int64_t n_ctx = std::min<int64_t>(S, int64_t(ctx.size()));
      std::vector<int32_t> window(ctx.end() - n_ctx, ctx.end());
      Tensor t = b.from_vector<int32_t>(window, Shape{n_ctx});
      model.forward(t, t, n_ctx, false, 0);
      const Tensor lg = b.to_host(model.logits().view_rows(n_ctx - 1, n_ctx));
      int32_t best = 0;
      double bv = -INFINITY;
      for (int64_t v = 0; v < V; ++v) {
        if (tok && !tok->has_id(int32_t(v))) continue;
        const double x = lg.dtype() == DType::F64 ? lg.ptr<double>()[v] : double(lg.ptr<float>()[v]);
        if (x > bv) bv = x, best = int32_t(v);
      }
      ctx.push_back(best);
      out.push_back(best);
    }
    const std::string prompt = decode(tok, std::vector<int32_t>(rec.ids.begin(), rec.ids.begin() + long(cut)));
    std::printf("--- sample %zu (line %lld)\n[prompt]\n%s\n[reference]\n%s\n[model, greedy]\n%s\n", i + 1,
                (long long)rec.line, prompt.c_str(), decode(tok, gold).c_str(), decode(tok, out).c_str());
    samples.push_back({{"line", rec.line}, {"prompt", prompt}, {"reference", decode(tok, gold)}, {"model", decode(tok, out)}});
  }
  return {{"records", recs.size()}, {"skipped", file.skipped}, {"response_tokens", tokens},
          {"loss", tokens ? loss / double(tokens) : 0.0},
          {"token_accuracy", tokens ? double(correct) / double(tokens) : 0.0},
          {"exact_match", double(exact) / n}, {"exact_count", exact}, {"samples", samples}};
}

}  // namespace

int run_eval(const EvalCliOptions& o) {
  CheckpointReader ck(o.checkpoint);
  MOELAB_CHECK(ck.has_meta("config"), "checkpoint ", o.checkpoint, " carries no config");
  RunConfig cfg = config_from_text(ck.meta("config"), o.checkpoint);
  for (const std::string& s : o.sets) apply_override(cfg, s);
  finalize(cfg);
  CheckpointModel cm = load_checkpoint_model(ck, cfg, o.backend);
  nlohmann::json result = o.data.empty() ? validation_loss(cfg, *cm.model, *cm.backend)
                                         : task_scores(cfg, o, *cm.model, *cm.backend, cm.tokenizer.get());
  result["checkpoint"] = o.checkpoint;
  if (ck.has_meta("step")) result["step"] = std::stoll(ck.meta("step"));
  if (ck.has_meta("run_id")) result["run_id"] = ck.meta("run_id");
  if (!o.data.empty()) result["data"] = o.data;
  if (!o.json_out.empty()) write_text(o.json_out, dump(result) + "\n", "--json");
  return 0;
}
