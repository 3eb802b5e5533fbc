// moelab tests: the checkpoint container (core/io/checkpoint.h): format 2 (a safetensors file)
// as written now, and format 1 (moelab's binary layout) as still read, from the files of the
// format-1 writer in tests/golden/checkpoint.
//
// Round trips are compared byte for byte (memcmp), not by value, so NaN payloads, -0 and bf16
// bit patterns count. Damaged files are made by editing the bytes of a good one; every error is
// checked by message content, because the message is what the user sees. Files go to
// temp_directory_path()/moelab_test_checkpoint_<pid>/ and are removed at the end of each test.
// Tests run as root, so write failures are provoked in root-proof ways: `path.tmp` made a
// folder (open fails with EISDIR) or a symlink to /dev/full (write fails with ENOSPC).
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "temp_dir.h"
#include "catch_compat.h"
#include "core/check.h"
#include "core/io/checkpoint.h"
#include "core/io/safetensors.h"
#include "core/io/sha256.h"
#include "core/tensor.h"

namespace fs = std::filesystem;
using namespace moelab;
using moelab::test::TempDir;

namespace {

const std::string kGolden = std::string(MOELAB_GOLDEN_DIR) + "/checkpoint/";


std::vector<char> read_bytes(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& p, const std::vector<char>& b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(b.data(), std::streamsize(b.size()));
}

// A CPU tensor of `dtype` whose bytes are exactly `raw` (bit patterns host_tensor would not make).
Tensor raw_tensor(const void* raw, Shape shape, DType dtype) {
  Tensor t = host_tensor(std::vector<double>(size_t(shape.numel()), 0.0), shape, dtype);
  std::memcpy(t.data(), raw, t.nbytes());
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && a.nbytes() == b.nbytes() &&
         std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

// The small checkpoint that the damage tests start from.
struct Sample {
  Tensor w1, emb, bias, ids;
  std::vector<uint64_t> rng{0x0123456789abcdefull, 0, ~0ull, 42};

  Sample() {
    std::vector<double> v(32);
    for (size_t i = 0; i < v.size(); ++i) v[i] = 0.25 * double(i) - 3.0;
    w1 = host_tensor(v, {4, 8}, DType::F32);
    emb = host_tensor(std::vector<double>(v.begin(), v.begin() + 12), {3, 4}, DType::F64);
    bias = host_tensor(std::vector<double>(v.begin(), v.begin() + 6), {6}, DType::BF16);
    ids = host_tensor({1, -2, 3, 2147483647}, {2, 2}, DType::I32);
  }
  void write(const std::string& path) const {
    CheckpointWriter w;
    w.set_meta("step", "20");
    w.set_meta("model", "layers=2 d_model=8");
    w.add_tensor("layer0.w1", w1);
    w.add_tensor("embedding", emb);
    w.add_blob("rng", rng);
    w.add_tensor("layer0.bias", bias);
    w.add_tensor("data.ids", ids);
    w.write(path);
  }
};

// Byte offset of the first occurrence of `needle` in `b` (entry names are stored verbatim).
size_t find_bytes(const std::vector<char>& b, const std::string& needle) {
  auto it = std::search(b.begin(), b.end(), needle.begin(), needle.end());
  REQUIRE(it != b.end());
  return size_t(it - b.begin());
}

// Format 2: the byte offset in the file of a tensor's data (safetensors name).
size_t data_at(const std::string& path, const std::string& stored_name) {
  SafetensorsReader r(path);
  return size_t(r.data_offset() + r.info(stored_name).begin);
}

// Format 2: the header length N (the first 8 bytes).
uint64_t header_len(const std::vector<char>& b) {
  uint64_t n;
  std::memcpy(&n, b.data(), 8);
  return n;
}

// Format 2: replaces `from` by `to` (same length) in the JSON header and recomputes the header
// checksum, as a writer of that content would have: the file is well-formed but says `to`.
std::vector<char> edit_header(std::vector<char> b, const std::string& from, const std::string& to) {
  REQUIRE(from.size() == to.size());
  const uint64_t n = header_len(b);
  std::string header(b.begin() + 8, b.begin() + 8 + long(n));
  const size_t at = header.find(from);
  REQUIRE(at != std::string::npos);
  header.replace(at, from.size(), to);
  const std::string key = "\"checkpoint.header_sha256\":\"";
  const size_t hv = header.find(key) + key.size();
  std::string zeroed = header;
  std::fill(zeroed.begin() + long(hv), zeroed.begin() + long(hv + 64), '0');
  Sha256 h;
  h.update(&n, 8);
  h.update(zeroed.data(), zeroed.size());
  header.replace(hv, 64, h.finish_hex());
  std::copy(header.begin(), header.end(), b.begin() + 8);
  return b;
}

// The file `cut` holding `bytes` cut to every shorter length is refused, naming the file.
// Shrinking one file in place (no rewrite: ext4 flushes a file rewritten from length 0).
void every_truncation_is_refused(const std::string& cut, const std::vector<char>& bytes) {
  const size_t n = bytes.size();
  write_bytes(cut, bytes);
  for (size_t len = n; len-- > 0;) {
    fs::resize_file(cut, len);
    INFO("truncated to " << len << " of " << n << " bytes");
    REQUIRE_THROWS_WITH(CheckpointReader(cut), has_substr(cut) && has_substr("is "));
  }
}

// `bytes` with any one byte changed (two bit positions each) is refused as file `bad`; edited in
// place in one file (fast on any file system), which holds `bytes` again afterwards.
void every_bit_flip_is_refused(const std::string& bad, const std::vector<char>& bytes) {
  write_bytes(bad, bytes);
  std::fstream f(bad, std::ios::in | std::ios::out | std::ios::binary);
  auto put_byte = [&](size_t at, char c) {
    f.seekp(std::streamoff(at));
    f.put(c);
    f.flush();
    REQUIRE(f.good());
  };
  for (size_t at = 0; at < bytes.size(); ++at) {
    for (unsigned char mask : {0x01, 0x80}) {
      put_byte(at, char(bytes[at] ^ mask));
      INFO("byte " << at << " of " << bytes.size() << " xor " << int(mask));
      REQUIRE_THROWS_AS(CheckpointReader(bad), Error);
      REQUIRE_THROWS_WITH(CheckpointReader(bad), has_substr("checkpoint " + bad));
      put_byte(at, bytes[at]);
    }
  }
  f.close();
  CHECK(read_bytes(bad) == bytes);
  CHECK_NOTHROW(CheckpointReader(bad));
}

}  // namespace

TEST_CASE("checkpoint round trip of f64/f32/bf16/i32 tensors, blobs and meta is bit-exact",
          "[checkpoint]") {
  TempDir tmp;
  const std::string path = tmp.path("step_000020.ckpt");

  // Awkward bit patterns: NaN with a payload, -0, infinities, denormals, extremes.
  uint64_t d_bits[6] = {0x7ff8dead0000beefull, 0x8000000000000000ull, 0x7ff0000000000000ull,
                        0x0000000000000001ull, 0x3fb999999999999aull, 0xfff0000000000000ull};
  uint32_t f_bits[8] = {0x7fc00123u, 0x80000000u, 0x00000001u, 0x7f7fffffu,
                        0xff800000u, 0x3dcccccdu, 0x12345678u, 0xdeadbeefu};
  uint16_t b_bits[4] = {0x7fc1u, 0x8000u, 0x0001u, 0x3f80u};
  int32_t i_vals[6] = {0, -1, std::numeric_limits<int32_t>::min(),
                       std::numeric_limits<int32_t>::max(), 255, -7};
  const Tensor d = raw_tensor(d_bits, {2, 3}, DType::F64);
  const Tensor f = raw_tensor(f_bits, {2, 2, 2}, DType::F32);
  const Tensor b = raw_tensor(b_bits, {4}, DType::BF16);
  const Tensor i = raw_tensor(i_vals, {1, 2, 3, 1}, DType::I32);
  const Tensor empty = host_tensor({}, {0, 5}, DType::F32);
  const std::vector<uint64_t> rng = {0xffffffffffffffffull, 0, 0x8000000000000001ull};
  const std::string binary_meta("a\0b\n\xff", 5);

  {
    CheckpointWriter w;
    w.add_tensor("layer0.w1", d);
    w.add_tensor("layer0.w2", f);
    w.add_tensor("norm.bf16", b);
    w.add_tensor("data.ids", i);
    w.add_tensor("empty", empty);
    w.add_blob("rng", rng);
    w.add_blob("no_words", {});
    w.set_meta("step", "20");
    w.set_meta("config", "[model]\nlayers = 2\n");
    w.set_meta("binary", binary_meta);
    w.set_meta("step", "21");  // replaces
    w.write(path);
  }
  REQUIRE(fs::exists(path));
  REQUIRE_FALSE(fs::exists(path + ".tmp"));

  CheckpointReader r(path);
  CHECK(r.format_version() == 2);
  CHECK(r.path() == path);
  CHECK(same_bytes(r.tensor("layer0.w1", {2, 3}, DType::F64), d));
  CHECK(same_bytes(r.tensor("layer0.w2", {2, 2, 2}, DType::F32), f));
  CHECK(same_bytes(r.tensor("norm.bf16", {4}, DType::BF16), b));
  CHECK(same_bytes(r.tensor("data.ids", {1, 2, 3, 1}, DType::I32), i));
  CHECK(r.tensor("empty", {0, 5}, DType::F32).numel() == 0);
  CHECK(r.tensor("layer0.w1", {2, 3}, DType::F64).device() == Device::CPU);
  CHECK(r.blob("rng") == rng);
  CHECK(r.blob("no_words").empty());
  CHECK(r.meta("step") == "21");
  CHECK(r.meta("config") == "[model]\nlayers = 2\n");
  CHECK(r.meta("binary") == binary_meta);
  CHECK(r.meta_keys() == std::vector<std::string>{"binary", "config", "step"});
  CHECK(r.has_meta("config"));
  CHECK_FALSE(r.has_meta("layer0.w1"));
  CHECK(r.names() == std::vector<std::string>{"layer0.w1", "layer0.w2", "norm.bf16", "data.ids",
                                              "empty", "rng", "no_words"});
  CHECK(r.has("rng"));
  CHECK(r.has("layer0.w1"));
  CHECK_FALSE(r.has("step"));  // meta keys are a separate namespace
  CHECK(r.is_tensor("layer0.w1"));
  CHECK_FALSE(r.is_tensor("rng"));
  CHECK(r.tensor_shape("layer0.w2") == Shape{2, 2, 2});
  CHECK(r.tensor_dtype("norm.bf16") == DType::BF16);

  // Each call returns a fresh copy: writing into one does not change the next.
  Tensor t1 = r.tensor("layer0.w2", {2, 2, 2}, DType::F32);
  t1.ptr<float>()[0] = 1.0f;
  CHECK(same_bytes(r.tensor("layer0.w2", {2, 2, 2}, DType::F32), f));
}

TEST_CASE("checkpoint writer copies tensor bytes when they are added", "[checkpoint]") {
  TempDir tmp;
  const std::string path = tmp.path("c.ckpt");
  Tensor t = host_tensor({1, 2, 3}, {3}, DType::F32);
  CheckpointWriter w;
  w.add_tensor("t", t);
  t.ptr<float>()[0] = 99.0f;  // after add_tensor: must not reach the file
  w.write(path);
  CHECK(host_values(CheckpointReader(path).tensor("t", {3}, DType::F32)) ==
        std::vector<double>{1, 2, 3});

  // Names are unique across tensors and blobs; set_meta may repeat.
  REQUIRE_THROWS_WITH(w.add_tensor("t", t), has_substr("duplicate name 't'"));
  REQUIRE_THROWS_WITH(w.add_blob("t", {1}), has_substr("duplicate name 't'"));
  REQUIRE_THROWS_AS(w.add_tensor("", t), Error);

  // write() can be called again (a second file with the same content).
  const std::string again = tmp.path("again.ckpt");
  w.write(again);
  CHECK(read_bytes(again) == read_bytes(path));
}

TEST_CASE("checkpoint writer can keep a reference instead of a copy (add_tensor_ref)", "[checkpoint]") {
  TempDir tmp;
  Tensor t = host_tensor({1, 2, 3}, {3}, DType::F32);
  Tensor u = host_tensor({4, 5}, {2}, DType::F64);
  CheckpointWriter w;
  w.add_tensor_ref("t", t);
  w.add_tensor("u", u);
  t.ptr<float>()[0] = 99.0f;  // before write(): reaches the file (a reference)
  u.ptr<double>()[0] = 99.0;  // a copy: does not
  w.write(tmp.path("ref.ckpt"));
  CheckpointReader r(tmp.path("ref.ckpt"));
  CHECK(host_values(r.tensor("t", {3}, DType::F32)) == std::vector<double>{99, 2, 3});
  CHECK(host_values(r.tensor("u", {2}, DType::F64)) == std::vector<double>{4, 5});
  REQUIRE_THROWS_WITH(w.add_tensor_ref("t", t), has_substr("duplicate name 't'"));
  // The same bytes as a copy would have given.
  CheckpointWriter c;
  c.add_tensor("t", t);
  c.add_tensor("u", host_tensor({4, 5}, {2}, DType::F64));
  c.write(tmp.path("copy.ckpt"));
  CHECK(read_bytes(tmp.path("copy.ckpt")) == read_bytes(tmp.path("ref.ckpt")));
}

TEST_CASE("checkpoint write creates the parent folders", "[checkpoint]") {
  TempDir tmp;
  const std::string path = tmp.path("runs/quickstart/ckpt/step_000100.ckpt");
  CheckpointWriter w;
  w.set_meta("step", "100");
  w.write(path);
  CHECK(CheckpointReader(path).meta("step") == "100");

  // A parent that is a file cannot be created: the error names the checkpoint.
  write_bytes(tmp.path("afile"), {'x'});
  const std::string bad = tmp.path("afile/sub/step_000001.ckpt");
  REQUIRE_THROWS_WITH(w.write(bad), has_substr("cannot write checkpoint " + bad));
}

TEST_CASE("truncated checkpoint is refused with the expected and found sizes", "[checkpoint]") {
  TempDir tmp;
  const std::string good = tmp.path("step_000020.ckpt");
  Sample().write(good);
  const std::vector<char> bytes = read_bytes(good);
  const size_t n = bytes.size();
  const size_t data_start = 8 + size_t(header_len(bytes));
  const std::string cut = tmp.path("cut_step_000020.ckpt");
  auto truncate_to = [&](size_t len) {
    write_bytes(cut, std::vector<char>(bytes.begin(), bytes.begin() + long(len)));
  };

  SECTION("in the header") {
    truncate_to(20);
    REQUIRE_THROWS_WITH(CheckpointReader(cut),
                        has_substr("checkpoint " + cut + " is truncated (expected at least " +
                                   std::to_string(data_start) + " bytes, found 20)"));
    truncate_to(0);
    REQUIRE_THROWS_WITH(CheckpointReader(cut), has_substr(cut + " is empty"));
    truncate_to(5);  // inside the 8-byte header length
    REQUIRE_THROWS_WITH(CheckpointReader(cut),
                        has_substr("is truncated (expected at least 8 bytes, found 5)"));
    truncate_to(data_start - 1);
    REQUIRE_THROWS_WITH(CheckpointReader(cut), has_substr("is truncated (expected at least " +
                                                          std::to_string(data_start) + " bytes"));
  }
  SECTION("in the middle of a payload") {
    const size_t mid = data_at(good, "layer0.w1") + 50;  // inside its 128 payload bytes
    truncate_to(mid);
    REQUIRE_THROWS_WITH(CheckpointReader(cut),
                        has_substr("checkpoint " + cut + " is truncated (expected " +
                                   std::to_string(n) + " bytes, found " + std::to_string(mid) +
                                   ")"));
  }
  SECTION("at the end") {
    for (size_t len : {n - 1, n - 8, n - 20, data_start}) {
      truncate_to(len);
      REQUIRE_THROWS_WITH(CheckpointReader(cut),
                          has_substr("is truncated (expected " + std::to_string(n) +
                                     " bytes, found " + std::to_string(len) + ")"));
    }
  }
  SECTION("at every length") { every_truncation_is_refused(cut, bytes); }
  SECTION("bytes appended") {
    std::vector<char> longer = bytes;
    longer.push_back('\0');
    write_bytes(cut, longer);
    REQUIRE_THROWS_WITH(CheckpointReader(cut), has_substr("1 bytes of trailing garbage"));
  }
  CHECK_NOTHROW(CheckpointReader(good));
}

TEST_CASE("a single flipped byte is refused by a checksum", "[checkpoint]") {
  TempDir tmp;
  const std::string good = tmp.path("good.ckpt");
  Sample().write(good);
  const std::vector<char> bytes = read_bytes(good);
  const std::string bad = tmp.path("bad.ckpt");
  auto flip = [&](size_t at, unsigned char mask = 0x01) {
    std::vector<char> b = bytes;
    b[at] = char(b[at] ^ mask);
    write_bytes(bad, b);
  };

  SECTION("in a tensor payload") {
    flip(data_at(good, "layer0.w1") + 17);
    REQUIRE_THROWS_WITH(CheckpointReader(bad),
                        has_substr("checkpoint " + bad) &&
                            has_substr("checksum mismatch in tensor 'layer0.w1'"));
    flip(data_at(good, "data.ids"), 0x80);
    REQUIRE_THROWS_WITH(CheckpointReader(bad), has_substr("checksum mismatch in tensor 'data.ids'"));
    flip(data_at(good, "layer0.bias") + 11, 0x80);  // the last byte of the last tensor
    REQUIRE_THROWS_WITH(CheckpointReader(bad), has_substr("checksum mismatch in tensor 'layer0.bias'"));
  }
  SECTION("in a tensor's shape") {
    flip(find_bytes(bytes, "\"embedding\":{\"dtype\":\"F64\",\"shape\":[3") + 36, 0x06);  // 3 -> 5
    REQUIRE_THROWS_WITH(CheckpointReader(bad),
                        has_substr("checkpoint " + bad + " is corrupted: checksum mismatch in the header"));
  }
  SECTION("in a blob") {
    flip(data_at(good, "__blob__.rng") + 5, 0x80);
    REQUIRE_THROWS_WITH(CheckpointReader(bad), has_substr("checksum mismatch in blob 'rng'"));
  }
  SECTION("in a meta value") {
    flip(find_bytes(bytes, "layers=2"));
    REQUIRE_THROWS_WITH(CheckpointReader(bad), has_substr("checksum mismatch in the header"));
  }
  SECTION("in a tensor's checksum, the file size or the header checksum") {
    flip(find_bytes(bytes, "\"checkpoint.sha256.layer0.w1\":\"") + 31, 0x01);
    REQUIRE_THROWS_WITH(CheckpointReader(bad), has_substr("checksum mismatch in the header"));
    flip(find_bytes(bytes, "\"checkpoint.file_size\":\"") + 40, 0x01);
    REQUIRE_THROWS_WITH(CheckpointReader(bad), has_substr("checksum mismatch in the header"));
    flip(find_bytes(bytes, "\"checkpoint.header_sha256\":\"") + 40, 0x01);
    REQUIRE_THROWS_WITH(CheckpointReader(bad), has_substr("checksum mismatch in the header"));
  }
  SECTION("in the header length") {
    flip(0, 0x08);  // N + 8 or N - 8: another span is taken for the header
    REQUIRE_THROWS_WITH(CheckpointReader(bad), has_substr("checksum mismatch in the header"));
    flip(7, 0x01);  // N + 2^56
    REQUIRE_THROWS_WITH(CheckpointReader(bad), has_substr("is not a moelab checkpoint"));
  }
  SECTION("anywhere") { every_bit_flip_is_refused(bad, bytes); }
}

TEST_CASE("a file that is not a moelab checkpoint is refused", "[checkpoint]") {
  TempDir tmp;
  const std::string p = tmp.path("step_000020.ckpt");

  write_bytes(p, std::vector<char>(100, 'x'));
  REQUIRE_THROWS_WITH(CheckpointReader(p),
                      has_substr("checkpoint " + p + " is not a moelab checkpoint"));

  std::vector<char> h5(512, '\0');
  std::memcpy(h5.data(), "\x89HDF\r\n\x1a\n", 8);  // an HDF5 run log is not a checkpoint
  write_bytes(p, h5);
  REQUIRE_THROWS_WITH(CheckpointReader(p), has_substr("not a moelab checkpoint"));

  // A format-1 checkpoint with one magic byte changed.
  std::vector<char> b = read_bytes(kGolden + "v1_sample.ckpt");
  b[0] = 'm';
  write_bytes(p, b);
  REQUIRE_THROWS_WITH(CheckpointReader(p), has_substr("not a moelab checkpoint"));

  // A safetensors file of another tool (a Hugging Face model, say).
  {
    SafetensorsWriter w;
    w.set_metadata("format", "pt");
    const float x[2] = {1, 2};
    w.add("w", StDType::F32, {2}, x, sizeof x);
    w.write(p, true);
  }
  REQUIRE_THROWS_WITH(CheckpointReader(p),
                      has_substr("checkpoint " + p + " is not a moelab checkpoint (no checkpoint.header_sha256"));

  // A well-formed file whose metadata names another format.
  Sample().write(p);
  write_bytes(p, edit_header(read_bytes(p), "\"checkpoint.format\":\"moelab\"", "\"checkpoint.format\":\"other!\""));
  REQUIRE_THROWS_WITH(CheckpointReader(p), has_substr("is not a moelab checkpoint (its metadata "
                                                      "checkpoint.format is 'other!', expected 'moelab')"));

  // Missing file and a folder.
  const std::string missing = tmp.path("nope/step_000001.ckpt");
  REQUIRE_THROWS_WITH(CheckpointReader(missing), has_substr("cannot open checkpoint " + missing));
  REQUIRE_THROWS_WITH(CheckpointReader(tmp.dir.string()), has_substr("checkpoint"));
}

TEST_CASE("a checkpoint of a newer format version is refused", "[checkpoint]") {
  TempDir tmp;
  const std::string p = tmp.path("future.ckpt");
  Sample().write(p);
  CHECK(CheckpointReader(p).format_version() == int(kCheckpointVersion));
  const std::vector<char> b = read_bytes(p);
  CHECK(find_bytes(b, "\"checkpoint.version\":\"2\"") > 0);

  // A well-formed file of version 3 (its header checksum recomputed).
  write_bytes(p, edit_header(b, "\"checkpoint.version\":\"2\"", "\"checkpoint.version\":\"3\""));
  REQUIRE_THROWS_WITH(CheckpointReader(p),
                      has_substr("checkpoint " + p + " has format version 3, newer than the version 2") &&
                          has_substr("use a newer moelab"));
  // Versions 0 and 1 are not safetensors files.
  write_bytes(p, edit_header(b, "\"checkpoint.version\":\"2\"", "\"checkpoint.version\":\"1\""));
  REQUIRE_THROWS_WITH(CheckpointReader(p), has_substr("unsupported format version 1"));
}

TEST_CASE("format 2: a header that is well-formed but wrong is refused", "[checkpoint]") {
  TempDir tmp;
  const std::string p = tmp.path("step_000020.ckpt");
  Sample().write(p);
  const std::vector<char> b = read_bytes(p);

  // checkpoint.order with one name changed: lists a tensor the file lacks, and misses one.
  write_bytes(p, edit_header(b, "\"checkpoint.order\":\"[\\\"layer0.w1", "\"checkpoint.order\":\"[\\\"layer0.w9"));
  REQUIRE_THROWS_WITH(CheckpointReader(p),
                      has_substr("is corrupted: checkpoint.order lists 'layer0.w9', which the file does not hold"));
  // An unknown key of the format.
  write_bytes(p, edit_header(b, "\"checkpoint.format\"", "\"checkpoint.formax\""));
  REQUIRE_THROWS_WITH(CheckpointReader(p), has_substr("not a moelab checkpoint"));
  write_bytes(p, edit_header(b, "\"checkpoint.sha256.data.ids\"", "\"checkpoint.sha256.data.idz\""));
  REQUIRE_THROWS_WITH(CheckpointReader(p),
                      has_substr("tensor 'data.ids' has no checksum (checkpoint.sha256.data.ids is absent)"));
  // A tensor's checksum that disagrees with its bytes (the header checksum recomputed).
  const std::string key = "\"checkpoint.sha256.embedding\":\"";
  const size_t at = find_bytes(b, key) + key.size();
  std::string digits(b.begin() + long(at), b.begin() + long(at + 64));
  std::string other = digits;
  other[0] = other[0] == '0' ? '1' : '0';
  write_bytes(p, edit_header(b, key + digits, key + other));
  REQUIRE_THROWS_WITH(CheckpointReader(p), has_substr("checksum mismatch in tensor 'embedding'"));
  // The untouched file still reads.
  write_bytes(p, b);
  CHECK_NOTHROW(CheckpointReader(p));
}

TEST_CASE("format 2: a checkpoint is a standard safetensors file", "[checkpoint]") {
  TempDir tmp;
  const std::string p = tmp.path("step_000020.ckpt");
  const Sample sample;
  sample.write(p);

  // Any safetensors reader opens it: moelab's, with every check of the reference reader.
  SafetensorsReader st(p);
  CHECK(st.names().size() == 5);
  CHECK(st.info("layer0.w1").dtype == StDType::F32);
  CHECK(st.info("layer0.w1").shape == std::vector<int64_t>{4, 8});
  CHECK(st.info("embedding").dtype == StDType::F64);
  CHECK(st.info("layer0.bias").dtype == StDType::BF16);
  CHECK(st.info("data.ids").dtype == StDType::I32);
  CHECK(st.info("__blob__.rng").dtype == StDType::U64);
  CHECK(st.info("__blob__.rng").shape == std::vector<int64_t>{4});
  CHECK(std::memcmp(st.bytes("__blob__.rng").data(), sample.rng.data(), 32) == 0);
  CHECK(std::memcmp(st.bytes("layer0.w1").data(), sample.w1.data(), sample.w1.nbytes()) == 0);
  // Tensors sorted by dtype as the reference writer does, so each is aligned to its size.
  for (const std::string& n : st.names())
    CHECK((st.data_offset() + st.info(n).begin) % uint64_t(st_dtype_bits(st.info(n).dtype) / 8) == 0);
  // The caller's metadata verbatim; the format's under "checkpoint."; a SHA-256 per tensor that
  // anyone can recompute (hashlib, sha256sum) from the bytes.
  const auto& md = st.metadata();
  CHECK(md.at("step") == "20");
  CHECK(md.at("model") == "layers=2 d_model=8");
  CHECK(md.at("checkpoint.format") == "moelab");
  CHECK(md.at("checkpoint.version") == "2");
  CHECK(md.at("checkpoint.order") ==
        "[\"layer0.w1\",\"embedding\",\"__blob__.rng\",\"layer0.bias\",\"data.ids\"]");
  CHECK(md.at("checkpoint.file_size") == std::string(20 - std::to_string(fs::file_size(p)).size(), '0') +
                                             std::to_string(fs::file_size(p)));
  for (const std::string& n : st.names())
    CHECK(md.at("checkpoint.sha256." + n) == sha256_hex(st.bytes(n).data(), st.bytes(n).size()));
  CHECK(md.size() == 2 + 5 + 5);

  // The same bytes written twice give the same file (no time or randomness in it).
  const std::string again = tmp.path("again.ckpt");
  sample.write(again);
  CHECK(read_bytes(again) == read_bytes(p));
}

TEST_CASE("format 2: names and meta keys the format reserves, non-UTF-8 meta", "[checkpoint]") {
  TempDir tmp;
  CheckpointWriter w;
  const Tensor t = host_tensor({1, 2}, {2}, DType::F32);
  REQUIRE_THROWS_WITH(w.set_meta("checkpoint.order", "x"),
                      has_substr("keys starting with \"checkpoint.\" are reserved"));
  REQUIRE_THROWS_WITH(w.add_tensor("__blob__.rng", t), has_substr("'__blob__.rng' is reserved"));
  REQUIRE_THROWS_WITH(w.add_tensor("__metadata__", t), has_substr("'__metadata__' is reserved"));
  REQUIRE_THROWS_WITH(w.add_tensor(std::string("w\xff", 2), t), has_substr("is not valid UTF-8"));
  REQUIRE_THROWS_WITH(w.add_blob(std::string("b\xc3", 2), {1}), has_substr("is not valid UTF-8"));
  // A blob may be called like a tensor elsewhere; names with any UTF-8 are fine.
  w.add_blob("__metadata__", {7});
  w.add_tensor("блок.w", t);
  // Meta keys and values that are not valid UTF-8 (safetensors metadata must be) survive.
  const std::string k(std::string("bin\xfe\0key", 8)), v(std::string("\xff\0\x01", 3));
  w.set_meta(k, v);
  w.set_meta("text", "line 1\nline \"2\"\t\\ ünïcode");
  w.set_meta("empty", "");
  // Keys and values that contain the format's keys as text (the reader finds its entries in the
  // raw header before parsing it: these must not confuse it).
  w.set_meta("a\"checkpoint.header_sha256", "\"checkpoint.file_size\":\"00000000000000000001\"");
  w.set_meta("z", ",\"checkpoint.header_sha256\":\"" + std::string(64, '0') + "\"");
  const std::string p = tmp.path("step_000001.ckpt");
  w.write(p);
  CheckpointReader r(p);
  CHECK(r.meta("a\"checkpoint.header_sha256") == "\"checkpoint.file_size\":\"00000000000000000001\"");
  CHECK(r.meta("z") == ",\"checkpoint.header_sha256\":\"" + std::string(64, '0') + "\"");
  CHECK(r.meta(k) == v);
  CHECK(r.meta("text") == "line 1\nline \"2\"\t\\ ünïcode");
  CHECK(r.meta("empty").empty());
  CHECK(r.meta_keys() == std::vector<std::string>{"a\"checkpoint.header_sha256", k, "empty", "text", "z"});
  CHECK(r.blob("__metadata__") == std::vector<uint64_t>{7});
  CHECK(host_values(r.tensor("блок.w", {2}, DType::F32)) == std::vector<double>{1, 2});
  CHECK(r.names() == std::vector<std::string>{"__metadata__", "блок.w"});
}

TEST_CASE("format 2: a large checkpoint is hashed on several threads and read back exactly", "[checkpoint]") {
  // 24 MiB: above the size from which tensors are hashed in parallel.
  TempDir tmp;
  auto nm = [](int i) { return std::string("t").append(std::to_string(i)); };
  const std::string p = tmp.path("step_000001.ckpt");
  std::vector<Tensor> ts;
  CheckpointWriter w;
  for (int i = 0; i < 12; ++i) {
    Tensor t = host_tensor(std::vector<double>(size_t(512 * 1024), 0.0), {512, 1024}, DType::F32);
    for (int64_t k = 0; k < t.numel(); ++k) t.ptr<float>()[k] = float((k * 7 + i) % 1013) - 500.0f;
    w.add_tensor(nm(i), t);
    ts.push_back(t);
  }
  w.write(p);
  CheckpointReader r(p);
  for (int i = 0; i < 12; ++i) CHECK(same_bytes(r.tensor(nm(i), {512, 1024}, DType::F32), ts[size_t(i)]));
  // A flipped byte in the last tensor is still found.
  std::vector<char> b = read_bytes(p);
  const size_t at = data_at(p, "t9") + 1024 * 1024 + 3;
  b[at] = char(b[at] ^ 0x10);
  write_bytes(p, b);
  REQUIRE_THROWS_WITH(CheckpointReader(p), has_substr("checksum mismatch in tensor 't9'"));
}

TEST_CASE("SHA-256 matches FIPS 180-4 on both code paths", "[checkpoint]") {
  std::string million(1000000, 'a');
  for (bool hw : {true, false}) {
    Sha256::allow_hardware(hw);
    INFO("hardware path " << Sha256::hardware());
    CHECK(sha256_hex("", 0) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    CHECK(sha256_hex("abc", 3) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const std::string two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    CHECK(sha256_hex(two.data(), two.size()) ==
          "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    CHECK(sha256_hex(million.data(), million.size()) ==
          "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    // In pieces of every awkward size.
    Sha256 h;
    for (size_t at = 0, step = 1; at < million.size(); at += step, step = step * 3 % 1031 + 1)
      h.update(million.data() + at, std::min(step, million.size() - at));
    CHECK(h.finish_hex() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  }
  Sha256::allow_hardware(true);
}

TEST_CASE("format 2: files of this writer (tests/golden/checkpoint) stay readable and byte-identical", "[checkpoint]") {
  // v2_sample.ckpt: Sample() written by the first format-2 writer. Writing the same content
  // again must give the same bytes: a writer change that alters the file must be deliberate
  // (a new format version, and new golden files).
  TempDir tmp;
  Sample().write(tmp.path("now.ckpt"));
  CHECK(read_bytes(tmp.path("now.ckpt")) == read_bytes(kGolden + "v2_sample.ckpt"));
  CheckpointReader s(kGolden + "v2_sample.ckpt");
  CHECK(s.format_version() == 2);
  CHECK(same_bytes(s.tensor("layer0.w1", {4, 8}, DType::F32), Sample().w1));
  CHECK(s.blob("rng") == Sample().rng);

  CheckpointReader r(kGolden + "v2_roundtrip.ckpt");
  CHECK(r.format_version() == 2);
  CHECK(r.names() == std::vector<std::string>{"layer0.w1", "layer0.w2", "norm.bf16", "data.ids",
                                              "empty", "rng", "no_words"});
  CHECK(r.meta("binary") == std::string("a\0b\n\xff", 5));
  CheckpointReader v1(kGolden + "v1_roundtrip.ckpt");
  for (const std::string& n : v1.names()) {
    if (v1.is_tensor(n)) {
      CHECK(same_bytes(r.tensor(n, v1.tensor_shape(n), v1.tensor_dtype(n)),
                       v1.tensor(n, v1.tensor_shape(n), v1.tensor_dtype(n))));
    } else {
      CHECK(r.blob(n) == v1.blob(n));
    }
  }
  for (const std::string& k : v1.meta_keys()) CHECK(r.meta(k) == v1.meta(k));

  // A training state written by `moelab train` (tests/golden/checkpoint/README.md).
  CheckpointReader t(kGolden + "tiny_run_step_000002.ckpt");
  CHECK(t.meta("kind") == "moelab-train-state-1");
  CHECK(t.meta("step") == "2");
  CHECK(t.has("block0.moe.experts.w1"));
  CHECK(t.tensor_shape("block0.moe.experts.w1") == Shape{4, 8, 16});
  CHECK(t.blob("data_state").size() == 5);
}

// ---- format 1 (moelab's binary layout, read only): the files of the format-1 writer ----------

TEST_CASE("format 1: the old writer's files are read bit-exactly", "[checkpoint]") {
  // v1_roundtrip.ckpt holds what the round-trip case above writes, written by the format-1
  // writer (moelab ff7008d).
  uint64_t d_bits[6] = {0x7ff8dead0000beefull, 0x8000000000000000ull, 0x7ff0000000000000ull,
                        0x0000000000000001ull, 0x3fb999999999999aull, 0xfff0000000000000ull};
  uint32_t f_bits[8] = {0x7fc00123u, 0x80000000u, 0x00000001u, 0x7f7fffffu,
                        0xff800000u, 0x3dcccccdu, 0x12345678u, 0xdeadbeefu};
  uint16_t b_bits[4] = {0x7fc1u, 0x8000u, 0x0001u, 0x3f80u};
  int32_t i_vals[6] = {0, -1, std::numeric_limits<int32_t>::min(),
                       std::numeric_limits<int32_t>::max(), 255, -7};
  CheckpointReader r(kGolden + "v1_roundtrip.ckpt");
  CHECK(r.format_version() == 1);
  CHECK(same_bytes(r.tensor("layer0.w1", {2, 3}, DType::F64), raw_tensor(d_bits, {2, 3}, DType::F64)));
  CHECK(same_bytes(r.tensor("layer0.w2", {2, 2, 2}, DType::F32), raw_tensor(f_bits, {2, 2, 2}, DType::F32)));
  CHECK(same_bytes(r.tensor("norm.bf16", {4}, DType::BF16), raw_tensor(b_bits, {4}, DType::BF16)));
  CHECK(same_bytes(r.tensor("data.ids", {1, 2, 3, 1}, DType::I32), raw_tensor(i_vals, {1, 2, 3, 1}, DType::I32)));
  CHECK(r.tensor("empty", {0, 5}, DType::F32).numel() == 0);
  CHECK(r.blob("rng") == std::vector<uint64_t>{0xffffffffffffffffull, 0, 0x8000000000000001ull});
  CHECK(r.blob("no_words").empty());
  CHECK(r.meta("step") == "21");
  CHECK(r.meta("config") == "[model]\nlayers = 2\n");
  CHECK(r.meta("binary") == std::string("a\0b\n\xff", 5));
  CHECK(r.meta_keys() == std::vector<std::string>{"binary", "config", "step"});
  CHECK(r.names() == std::vector<std::string>{"layer0.w1", "layer0.w2", "norm.bf16", "data.ids",
                                              "empty", "rng", "no_words"});
  CHECK_FALSE(r.is_tensor("rng"));
  REQUIRE_THROWS_WITH(r.tensor("layer0.w2", {2, 4}, DType::F32),
                      has_substr("tensor 'layer0.w2' is f32[2, 2, 2], expected f32[2, 4]"));

  // Converting it: read format 1, write the same content as format 2.
  TempDir tmp;
  CheckpointWriter w;
  for (const std::string& n : r.names()) {
    if (r.is_tensor(n)) {
      w.add_tensor(n, r.tensor(n, r.tensor_shape(n), r.tensor_dtype(n)));
    } else {
      w.add_blob(n, r.blob(n));
    }
  }
  for (const std::string& k : r.meta_keys()) w.set_meta(k, r.meta(k));
  w.write(tmp.path("v2.ckpt"));
  CheckpointReader r2(tmp.path("v2.ckpt"));
  CHECK(r2.format_version() == 2);
  CHECK(r2.names() == r.names());
  CHECK(r2.meta_keys() == r.meta_keys());
  for (const std::string& n : r.names())
    if (r.is_tensor(n))
      CHECK(same_bytes(r2.tensor(n, r.tensor_shape(n), r.tensor_dtype(n)),
                       r.tensor(n, r.tensor_shape(n), r.tensor_dtype(n))));
  CHECK(r2.meta("binary") == r.meta("binary"));
}

TEST_CASE("format 1: a truncated file is refused with the expected and found sizes", "[checkpoint]") {
  TempDir tmp;
  const std::string good = tmp.path("step_000020.ckpt");
  write_bytes(good, read_bytes(kGolden + "v1_sample.ckpt"));
  const std::vector<char> bytes = read_bytes(good);
  const size_t n = bytes.size();
  const std::string cut = tmp.path("cut_step_000020.ckpt");
  auto truncate_to = [&](size_t len) {
    write_bytes(cut, std::vector<char>(bytes.begin(), bytes.begin() + long(len)));
  };

  SECTION("in the header") {
    truncate_to(20);
    REQUIRE_THROWS_WITH(CheckpointReader(cut),
                        has_substr("checkpoint " + cut + " is truncated (expected at least 32 "
                                   "bytes, found 20)"));
    truncate_to(0);
    REQUIRE_THROWS_WITH(CheckpointReader(cut), has_substr(cut + " is empty"));
    truncate_to(5);  // a prefix of the magic: still truncated, not "not a checkpoint"
    REQUIRE_THROWS_WITH(CheckpointReader(cut), has_substr("is truncated"));
  }
  SECTION("in the middle of a payload") {
    const size_t mid = find_bytes(bytes, "layer0.w1") + 9 + 50;  // inside its 128 payload bytes
    truncate_to(mid);
    REQUIRE_THROWS_WITH(CheckpointReader(cut),
                        has_substr("checkpoint " + cut + " is truncated (expected " +
                                   std::to_string(n) + " bytes, found " + std::to_string(mid) +
                                   ")"));
  }
  SECTION("in the trailer") {
    for (size_t len : {n - 1, n - 8, n - 20, n - 24}) {
      truncate_to(len);
      REQUIRE_THROWS_WITH(CheckpointReader(cut),
                          has_substr("is truncated (expected " + std::to_string(n) +
                                     " bytes, found " + std::to_string(len) + ")"));
    }
  }
  SECTION("at every length") { every_truncation_is_refused(cut, bytes); }
  SECTION("bytes appended") {
    std::vector<char> longer = bytes;
    longer.push_back('\0');
    write_bytes(cut, longer);
    REQUIRE_THROWS_WITH(CheckpointReader(cut), has_substr("1 bytes of trailing garbage"));
  }
  CHECK_NOTHROW(CheckpointReader(good));
  CHECK(CheckpointReader(good).format_version() == 1);
}

TEST_CASE("format 1: a single flipped byte is refused by a checksum", "[checkpoint]") {
  TempDir tmp;
  const std::string good = tmp.path("good.ckpt");
  write_bytes(good, read_bytes(kGolden + "v1_sample.ckpt"));
  const std::vector<char> bytes = read_bytes(good);
  const std::string bad = tmp.path("bad.ckpt");
  auto flip = [&](size_t at, unsigned char mask = 0x01) {
    std::vector<char> b = bytes;
    b[at] = char(b[at] ^ mask);
    write_bytes(bad, b);
  };

  SECTION("in a tensor payload") {
    flip(find_bytes(bytes, "layer0.w1") + 9 + 8 + 17);  // name, header hash, payload byte 17
    REQUIRE_THROWS_WITH(CheckpointReader(bad),
                        has_substr("checkpoint " + bad) &&
                            has_substr("checksum mismatch in tensor 'layer0.w1'"));
  }
  SECTION("in a tensor's shape") {
    flip(find_bytes(bytes, "embedding") - 40, 0x02);  // dims[0] of the entry header
    REQUIRE_THROWS_WITH(CheckpointReader(bad),
                        has_substr("checksum mismatch in the header or name of entry #1 at byte") &&
                            has_substr(", after tensor 'layer0.w1'"));
  }
  SECTION("in a blob") {
    flip(find_bytes(bytes, "rng") + 3 + 8 + 5, 0x80);
    REQUIRE_THROWS_WITH(CheckpointReader(bad), has_substr("checksum mismatch in blob 'rng'"));
  }
  SECTION("in a meta value") {
    flip(find_bytes(bytes, "layers=2"));
    REQUIRE_THROWS_WITH(CheckpointReader(bad),
                        has_substr("checksum mismatch in meta key 'model'"));
  }
  SECTION("in the file header") {
    flip(17);  // the recorded file size
    REQUIRE_THROWS_WITH(CheckpointReader(bad),
                        has_substr("checksum mismatch in the file header"));
    flip(8, 0x80);  // the version: corrupted, not "newer"
    REQUIRE_THROWS_WITH(CheckpointReader(bad),
                        has_substr("checksum mismatch in the file header"));
  }
  SECTION("in an entry's payload length") {
    flip(find_bytes(bytes, "rng") - 8, 0x01);  // payload length of the blob
    REQUIRE_THROWS_WITH(CheckpointReader(bad),
                        has_substr("checksum mismatch in the header or name of entry #2"));
  }
  SECTION("in the trailer") {
    flip(bytes.size() - 1);
    REQUIRE_THROWS_WITH(CheckpointReader(bad), has_substr("whole-file checksum mismatch"));
    flip(bytes.size() - 16);  // the entry count
    REQUIRE_THROWS_WITH(CheckpointReader(bad), has_substr("whole-file checksum mismatch"));
  }
  SECTION("anywhere") { every_bit_flip_is_refused(bad, bytes); }
}

TEST_CASE("format 1: a changed magic is not a moelab checkpoint", "[checkpoint]") {
  TempDir tmp;
  const std::string p = tmp.path("step_000020.ckpt");

  // A good checkpoint with one magic byte changed.
  write_bytes(p, read_bytes(kGolden + "v1_sample.ckpt"));
  std::vector<char> b = read_bytes(p);
  b[0] = 'm';
  write_bytes(p, b);
  REQUIRE_THROWS_WITH(CheckpointReader(p), has_substr("not a moelab checkpoint"));
  // Truncated inside the magic: still format 1, and truncated.
  b[0] = 'M';
  write_bytes(p, std::vector<char>(b.begin(), b.begin() + 5));
  REQUIRE_THROWS_WITH(CheckpointReader(p), has_substr("is truncated (expected at least 32 bytes, found 5)"));
}

TEST_CASE("format 1: a newer version in the binary layout is refused", "[checkpoint]") {
  TempDir tmp;
  const std::string p = tmp.path("future.ckpt");
  write_bytes(p, read_bytes(kGolden + "v1_sample.ckpt"));
  std::vector<char> b = read_bytes(p);
  REQUIRE(b.size() > 32);
  uint32_t v;
  std::memcpy(&v, b.data() + 8, 4);
  CHECK(v == 1);

  // A well-formed header of version 2 (its checksum recomputed).
  v = 2;
  std::memcpy(b.data() + 8, &v, 4);
  const uint64_t h = fnv1a64(b.data(), 24);
  std::memcpy(b.data() + 24, &h, 8);
  write_bytes(p, b);
  REQUIRE_THROWS_WITH(CheckpointReader(p),
                      has_substr("checkpoint " + p + " has format version 2 in moelab's binary layout, newer than") &&
                          has_substr("use a newer moelab"));

  // Version 0 does not exist.
  v = 0;
  std::memcpy(b.data() + 8, &v, 4);
  const uint64_t h0 = fnv1a64(b.data(), 24);
  std::memcpy(b.data() + 24, &h0, 8);
  write_bytes(p, b);
  REQUIRE_THROWS_WITH(CheckpointReader(p), has_substr("unsupported format version 0"));
}

TEST_CASE("a tensor of another shape or dtype is refused naming it and both shapes",
          "[checkpoint]") {
  TempDir tmp;
  const std::string p = tmp.path("runs/x/step_000020.ckpt");
  Sample().write(p);
  CheckpointReader r(p);

  REQUIRE_THROWS_WITH(r.tensor("layer0.w1", {4, 16}, DType::F32),
                      has_substr("checkpoint " + p) && has_substr("tensor 'layer0.w1'") &&
                          has_substr("f32[4, 8]") && has_substr("expected f32[4, 16]"));
  REQUIRE_THROWS_WITH(r.tensor("layer0.w1", {4, 8, 1}, DType::F32),
                      has_substr("f32[4, 8]") && has_substr("expected f32[4, 8, 1]"));
  REQUIRE_THROWS_WITH(r.tensor("layer0.w1", {4, 8}, DType::BF16),
                      has_substr("tensor 'layer0.w1' is f32[4, 8], expected bf16[4, 8]"));
  REQUIRE_THROWS_WITH(r.tensor("embedding", {4, 3}, DType::F64),
                      has_substr("'embedding' is f64[3, 4], expected f64[4, 3]"));
  // The good request still works after the refusals.
  CHECK(same_bytes(r.tensor("layer0.w1", {4, 8}, DType::F32), Sample().w1));
}

TEST_CASE("a missing tensor, blob or meta key is named with the file", "[checkpoint]") {
  TempDir tmp;
  const std::string p = tmp.path("step_000020.ckpt");
  Sample().write(p);
  CheckpointReader r(p);

  REQUIRE_THROWS_WITH(r.tensor("layer9.w1", {4, 8}, DType::F32),
                      has_substr("checkpoint " + p + " has no tensor 'layer9.w1'"));
  REQUIRE_THROWS_WITH(r.blob("adam.state"), has_substr("has no blob 'adam.state'"));
  REQUIRE_THROWS_WITH(r.meta("seed"), has_substr("checkpoint " + p + " has no meta key 'seed'"));
  REQUIRE_THROWS_WITH(r.tensor("rng", {4}, DType::F64),
                      has_substr("'rng' is a blob, not a tensor"));
  REQUIRE_THROWS_WITH(r.blob("layer0.w1"), has_substr("'layer0.w1' is a tensor, not a blob"));
  REQUIRE_THROWS_WITH(r.tensor_shape("nope"), has_substr("has no tensor 'nope'"));
  CHECK_FALSE(r.has("layer9.w1"));
}

TEST_CASE("a failed checkpoint write keeps the previous checkpoint intact", "[checkpoint]") {
  TempDir tmp;
  const std::string path = tmp.path("ckpt/step_000020.ckpt");
  const std::string tmp_path = path + ".tmp";
  Sample().write(path);
  const std::vector<char> before = read_bytes(path);

  CheckpointWriter next;
  next.set_meta("step", "40");
  next.add_tensor("layer0.w1", host_tensor(std::vector<double>(32, 7.0), {4, 8}, DType::F32));

  SECTION("the tmp file cannot be created (it is a folder)") {
    fs::create_directories(fs::path(tmp_path) / "keep");
    REQUIRE_THROWS_WITH(next.write(path),
                        has_substr("cannot write checkpoint " + path) && has_substr(tmp_path));
    CHECK(fs::is_directory(fs::path(tmp_path) / "keep"));  // not ours: left alone
  }
  SECTION("the disk fills up mid-write (tmp is a symlink to /dev/full)") {
    if (!fs::exists("/dev/full")) {
      WARN("no /dev/full on this machine; skipped");
      return;
    }
    fs::create_symlink("/dev/full", tmp_path);
    REQUIRE_THROWS_WITH(next.write(path),
                        has_substr("cannot write checkpoint " + path) && has_substr("write"));
    CHECK_FALSE(fs::exists(fs::symlink_status(tmp_path)));  // the tmp entry is removed
    CHECK(fs::exists("/dev/full"));
  }
  SECTION("the target is a folder: refused before anything is written") {
    const std::string other = tmp.path("ckpt/step_000040.ckpt");
    fs::create_directories(fs::path(other) / "x");
    REQUIRE_THROWS_WITH(next.write(other), has_substr("checkpoint " + other) && has_substr("is a folder"));
    CHECK_FALSE(fs::exists(other + ".tmp"));
    CHECK(fs::is_directory(fs::path(other) / "x"));
  }
  // Whatever failed, the previous checkpoint is byte for byte what it was, and still reads.
  CHECK(read_bytes(path) == before);
  CheckpointReader r(path);
  CHECK(r.meta("step") == "20");
  CHECK(same_bytes(r.tensor("layer0.w1", {4, 8}, DType::F32), Sample().w1));
}

TEST_CASE("a stale tmp file from a crashed write is ignored and replaced", "[checkpoint]") {
  TempDir tmp;
  const std::string dir = tmp.path("ckpt");
  Sample().write(checkpoint_path(dir, 20));
  // A crash mid-write of step 40 left half a file behind.
  const std::string stale = checkpoint_path(dir, 40) + ".tmp";
  const std::vector<char> good = read_bytes(checkpoint_path(dir, 20));
  write_bytes(stale, std::vector<char>(good.begin(), good.begin() + 100));

  CHECK(latest_checkpoint(dir) == checkpoint_path(dir, 20));
  CHECK(CheckpointReader(latest_checkpoint(dir)).meta("step") == "20");

  CheckpointWriter w;
  w.set_meta("step", "40");
  w.write(checkpoint_path(dir, 40));
  CHECK_FALSE(fs::exists(stale));
  CHECK(latest_checkpoint(dir) == checkpoint_path(dir, 40));
  CHECK(CheckpointReader(checkpoint_path(dir, 40)).meta("step") == "40");

  // Overwriting an existing checkpoint replaces it whole.
  w.set_meta("step", "40b");
  w.write(checkpoint_path(dir, 40));
  CHECK(CheckpointReader(checkpoint_path(dir, 40)).meta("step") == "40b");
}

TEST_CASE("checkpoint_path, latest_checkpoint and checkpoint_step", "[checkpoint]") {
  CHECK(checkpoint_path("runs/x", 20) == "runs/x/step_000020.ckpt");
  CHECK(checkpoint_path("runs/x/", 0) == "runs/x/step_000000.ckpt");
  CHECK(checkpoint_path("runs/x", 1234567) == "runs/x/step_1234567.ckpt");
  REQUIRE_THROWS_AS(checkpoint_path("runs/x", -1), Error);

  CHECK(checkpoint_step("runs/x/step_000020.ckpt") == 20);
  CHECK(checkpoint_step("step_1234567.ckpt") == 1234567);
  CHECK(checkpoint_step("/abs/best_step_000300.ckpt") == 300);
  CHECK(checkpoint_step("runs/step_5/step_000007.ckpt") == 7);  // the file name, not the folder
  CHECK(checkpoint_step(checkpoint_path("d", 99)) == 99);
  REQUIRE_THROWS_WITH(checkpoint_step("runs/x/model.ckpt"),
                      has_substr("cannot tell the step of checkpoint runs/x/model.ckpt"));
  REQUIRE_THROWS_AS(checkpoint_step("runs/step_3/final.ckpt"), Error);
  REQUIRE_THROWS_AS(checkpoint_step("step_.ckpt"), Error);

  TempDir tmp;
  const std::string dir = tmp.path("ckpt");
  CHECK(latest_checkpoint(dir).empty());  // does not exist
  fs::create_directories(dir);
  CHECK(latest_checkpoint(dir).empty());  // empty
  CheckpointWriter w;
  for (int64_t s : {20, 100, 40}) w.write(checkpoint_path(dir, s));
  // Not checkpoints: a tmp file of a higher step, other names, a folder, too few digits.
  write_bytes(checkpoint_path(dir, 900) + ".tmp", {'x'});
  write_bytes(dir + "/step_000800.ckpt.bak", {'x'});
  write_bytes(dir + "/step_80.ckpt", {'x'});
  write_bytes(dir + "/notes.txt", {'x'});
  fs::create_directories(dir + "/step_000999.ckpt");
  CHECK(latest_checkpoint(dir) == checkpoint_path(dir, 100));
  CHECK(latest_checkpoint(dir + "/") == checkpoint_path(dir, 100));
  CHECK(checkpoint_step(latest_checkpoint(dir)) == 100);
  w.write(checkpoint_path(dir, 1000000));  // 7 digits beats 6
  CHECK(latest_checkpoint(dir) == checkpoint_path(dir, 1000000));
}
