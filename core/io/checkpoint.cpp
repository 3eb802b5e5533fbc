// moelab: the checkpoint container (formats documented in checkpoint.h and docs/checkpoints.md).
#include "core/io/checkpoint.h"
#include "core/io/fault.h"
#include "core/io/json_strict.h"
#include "core/io/output_file.h"
#include "core/io/safetensors.h"
#include "core/io/sha256.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <set>
#include <system_error>
#include <thread>

namespace fs = std::filesystem;

namespace moelab {

static_assert(std::endian::native == std::endian::little,
              "the checkpoint format is little-endian; add byte swapping for this host");

namespace {

constexpr uint8_t kKindTensor = 1, kKindBlob = 2, kKindMeta = 3;
constexpr uint8_t kNoDType = 255;
constexpr size_t kMaxNameLength = 65536;

// Format 1.
constexpr size_t kHeaderSize = 32;
constexpr size_t kEntryHeaderSize = 48;
constexpr size_t kTrailerSize = 24;
constexpr char kTrailerMagic[8] = {'C', 'K', 'P', 'T', '_', 'E', 'N', 'D'};

// Format 2: the reserved metadata keys.
const std::string kMetaFormat = "checkpoint.format";
const std::string kMetaVersion = "checkpoint.version";
const std::string kMetaOrder = "checkpoint.order";
const std::string kMetaFileSize = "checkpoint.file_size";
const std::string kMetaHeaderHash = "checkpoint.header_sha256";
const std::string kMetaHashPrefix = "checkpoint.sha256.";
const std::string kMetaHexPrefix = "checkpoint.meta_hex.";
constexpr const char* kFormatName = "moelab";
constexpr size_t kFileSizeDigits = 20;
constexpr size_t kHashDigits = 64;

bool dtype_from_code(uint8_t c, DType& dt) {
  switch (c) {
    case 0: dt = DType::F64; return true;
    case 1: dt = DType::F32; return true;
    case 2: dt = DType::BF16; return true;
    case 3: dt = DType::I32; return true;
    default: return false;
  }
}

bool dtype_from_st(StDType st, DType& dt) {
  switch (st) {
    case StDType::F64: dt = DType::F64; return true;
    case StDType::F32: dt = DType::F32; return true;
    case StDType::BF16: dt = DType::BF16; return true;
    case StDType::I32: dt = DType::I32; return true;
    default: return false;
  }
}

const char* kind_name(uint8_t kind) {
  switch (kind) {
    case kKindTensor: return "tensor";
    case kKindBlob: return "blob";
    case kKindMeta: return "meta key";
    default: return "entry";
  }
}

template <class T> T get(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// fnv1a64 of the same bytes into two running hashes in one pass (the entry's and the file's):
// two independent multiply chains, so about the speed of one.
void fnv1a64_2(const void* data, size_t n, uint64_t& a, uint64_t& b) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint64_t x = a, y = b;
  for (size_t i = 0; i < n; ++i) {
    x = (x ^ p[i]) * 0x100000001b3ull;
    y = (y ^ p[i]) * 0x100000001b3ull;
  }
  a = x;
  b = y;
}

// Writes to a file descriptor through a buffer (fault site ckpt.write before each write()).
class FileWriter {
 public:
  FileWriter(int fd, const std::string& what) : fd_(fd), what_(what) { buf_.reserve(kBuf); }
  void write(const void* data, size_t n) {
    written_ += n;
    const char* p = static_cast<const char*>(data);
    if (buf_.size() + n <= kBuf) {
      buf_.insert(buf_.end(), p, p + n);
      return;
    }
    flush();
    if (n >= kBuf) {
      raw_write(p, n);
    } else {
      buf_.insert(buf_.end(), p, p + n);
    }
  }
  void flush() {
    raw_write(buf_.data(), buf_.size());
    buf_.clear();
  }
  uint64_t written() const { return written_; }

 private:
  static constexpr size_t kBuf = 1 << 20;
  void raw_write(const char* p, size_t n) {
    if (n > 0) fault::point("ckpt.write");
    write_all(fd_, p, n, what_);
  }
  int fd_;
  std::string what_;
  std::vector<char> buf_;
  uint64_t written_ = 0;
};

std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f) {
      out += char(c);
    } else {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      out += b;
    }
  }
  return out;
}

std::string to_hex(const std::string& s) {
  static const char* kHex = "0123456789abcdef";
  std::string h;
  h.reserve(2 * s.size());
  for (unsigned char c : s) {
    h += kHex[c >> 4];
    h += kHex[c & 15];
  }
  return h;
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

// Lower-case hex to bytes; false if `h` is not that.
bool from_hex(const std::string& h, std::string& out) {
  if (h.size() % 2) return false;
  out.clear();
  for (size_t i = 0; i < h.size(); i += 2) {
    const int a = hex_digit(h[i]), b = hex_digit(h[i + 1]);
    if (a < 0 || b < 0) return false;
    out += char(a * 16 + b);
  }
  return true;
}

bool is_hash(std::string_view s) {
  return s.size() == kHashDigits &&
         std::all_of(s.begin(), s.end(), [](char c) { return hex_digit(c) >= 0; });
}

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

// SHA-256 of each piece, on up to 8 threads when there is enough to hash (results in order).
std::vector<std::string> sha256_all(const std::vector<std::pair<const void*, size_t>>& pieces,
                                    const std::function<void(size_t)>& after = nullptr) {
  std::vector<std::string> out(pieces.size());
  uint64_t total = 0;
  for (const auto& p : pieces) total += p.second;
  size_t threads = std::min<size_t>({size_t(std::max(1u, std::thread::hardware_concurrency())),
                                     size_t(8), pieces.size()});
  if (total < (16u << 20)) threads = 1;
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < pieces.size();) {
      out[i] = sha256_hex(pieces[i].first, pieces[i].second);
      if (after) after(i);
    }
  };
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  return out;
}

// The position of the value of metadata entry KEY in a safetensors header (JSON text as
// SafetensorsWriter writes it: compact, one object of string values): the text `"KEY":"` right
// after '{' or ','. Inside a JSON string every '"' is escaped, so '{' or ',' followed by '"'
// never occurs there: a hit is the entry itself (a key that merely contains `"KEY":"`, escaped,
// is not one). npos if absent; `count` gets the number of hits.
size_t find_meta_value(const std::string& header, const std::string& key, int& count) {
  const std::string pat = "\"" + key + "\":\"";
  count = 0;
  size_t first = std::string::npos;
  for (size_t at = header.find(pat); at != std::string::npos; at = header.find(pat, at + 1)) {
    if (at == 0 || (header[at - 1] != '{' && header[at - 1] != ',')) continue;
    if (count++ == 0) first = at + pat.size();
  }
  return first;
}

void pread_all(int fd, char* p, size_t n, uint64_t offset, const std::string& what) {
  size_t got = 0;
  while (got < n) {
    const ssize_t r = ::pread(fd, p + got, n - got, off_t(offset + got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) MOELAB_FAIL("cannot read ", what, ": ", errno_text(errno));
    if (r == 0) MOELAB_FAIL("cannot read ", what, ": it shrank while being read");
    got += size_t(r);
  }
}

}  // namespace

uint64_t fnv1a64(const void* data, size_t n, uint64_t h) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

// ---- writer ---------------------------------------------------------------------------------

void CheckpointWriter::set_meta(const std::string& key, const std::string& value) {
  MOELAB_CHECK(!key.empty() && key.size() <= kMaxNameLength, "checkpoint meta key '",
               printable(key), "' must have 1..", kMaxNameLength, " bytes");
  MOELAB_CHECK(!starts_with(key, kCheckpointReservedMeta), "checkpoint meta key '", printable(key),
               "': keys starting with \"", kCheckpointReservedMeta,
               "\" are reserved for the checkpoint format");
  meta_[key] = value;
}

void CheckpointWriter::check_new_name(const std::string& name, const char* what) const {
  MOELAB_CHECK(!name.empty() && name.size() <= kMaxNameLength, "checkpoint ", what, " name '",
               printable(name), "' must have 1..", kMaxNameLength, " bytes");
  MOELAB_CHECK(valid_utf8(name), "checkpoint ", what, " name '", printable(name),
               "' is not valid UTF-8 (safetensors names must be)");
  for (const Entry& e : entries_)
    MOELAB_CHECK(e.name != name, "checkpoint: duplicate name '", name, "' (already a ",
                 kind_name(e.kind), ")");
}

void CheckpointWriter::add_tensor(const std::string& name, const Tensor& t) {
  add_tensor_ref(name, t);
  Entry& e = entries_.back();
  const char* p = static_cast<const char*>(t.data());
  e.payload.assign(p, p + t.nbytes());
  e.ref = Tensor();
  e.by_ref = false;
}

void CheckpointWriter::add_tensor_ref(const std::string& name, const Tensor& t) {
  check_new_name(name, "tensor");
  MOELAB_CHECK(name != "__metadata__" && !starts_with(name, kCheckpointBlobPrefix),
               "checkpoint tensor name '", name, "' is reserved (\"__metadata__\" and names starting with \"",
               kCheckpointBlobPrefix, "\" belong to the file format)");
  MOELAB_CHECK(t.device() == Device::CPU, "checkpoint tensor '", name, "' is on ",
               to_string(t.device()), "; copy it to the CPU first");
  MOELAB_CHECK(t.data() != nullptr || t.nbytes() == 0, "checkpoint tensor '", name,
               "' has no data");
  Entry e;
  e.kind = kKindTensor;
  e.dtype = t.dtype();
  e.shape = t.shape();
  e.name = name;
  e.ref = t;
  e.by_ref = true;
  entries_.push_back(std::move(e));
}

void CheckpointWriter::add_blob(const std::string& name, const std::vector<uint64_t>& words) {
  check_new_name(name, "blob");
  Entry e;
  e.kind = kKindBlob;
  e.name = name;
  const char* p = reinterpret_cast<const char*>(words.data());
  e.payload.assign(p, p + words.size() * sizeof(uint64_t));
  entries_.push_back(std::move(e));
}

void CheckpointWriter::write(const std::string& path) const {
  MOELAB_CHECK(!path.empty(), "checkpoint path is empty");
  const std::string what = "cannot write checkpoint " + path;
  const fs::path target(path);
  const fs::path parent = target.parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    fs::create_directories(parent, ec);
    if (ec) MOELAB_FAIL(what, ": cannot create folder ", parent.string(), ": ", ec.message());
  }

  // The safetensors header: tensors and blobs, their checksums, the metadata.
  SafetensorsWriter st;
  nlohmann::json order = nlohmann::json::array();
  std::vector<std::pair<const void*, size_t>> pieces;
  for (const Entry& e : entries_) {
    const std::string stored = e.kind == kKindBlob ? kCheckpointBlobPrefix + e.name : e.name;
    std::vector<int64_t> shape;
    if (e.kind == kKindBlob) {
      shape.push_back(int64_t(e.size() / 8));
    } else {
      shape.assign(e.shape.dims.begin(), e.shape.dims.begin() + e.shape.ndim);
    }
    st.add_view(stored, e.kind == kKindBlob ? StDType::U64 : st_dtype_of(e.dtype), shape,
                e.data(), e.size(), nullptr);
    order.push_back(stored);
    pieces.push_back({e.data(), e.size()});
  }
  const std::vector<std::string> hashes = sha256_all(pieces);
  for (size_t i = 0; i < entries_.size(); ++i)
    st.set_metadata(kMetaHashPrefix + order[i].get<std::string>(), hashes[i]);
  for (const auto& [k, v] : meta_) {
    if (valid_utf8(k) && valid_utf8(v)) {
      st.set_metadata(k, v);
    } else {
      st.set_metadata(kMetaHexPrefix + to_hex(k), to_hex(v));
    }
  }
  st.set_metadata(kMetaFormat, kFormatName);
  st.set_metadata(kMetaVersion, std::to_string(kCheckpointVersion));
  st.set_metadata(kMetaOrder, order.dump());
  // Fixed-width values, so the header's length does not depend on them: first the size, then
  // the header's own checksum (over the header with its 64 digits zero).
  st.set_metadata(kMetaFileSize, std::string(kFileSizeDigits, '0'));
  st.set_metadata(kMetaHeaderHash, std::string(kHashDigits, '0'));
  const uint64_t header_len = st.header().size();
  const uint64_t total = 8 + header_len + st.data_bytes();
  char digits[32];
  std::snprintf(digits, sizeof digits, "%020llu", static_cast<unsigned long long>(total));
  st.set_metadata(kMetaFileSize, digits);
  std::string header = st.header();
  Sha256 hh;
  hh.update(&header_len, 8);
  hh.update(header.data(), header.size());
  st.set_metadata(kMetaHeaderHash, hh.finish_hex());
  header = st.header();
  MOELAB_CHECK(header.size() == header_len, "checkpoint writer: the header changed length");

  const std::string written = resolve_output_target(path, "checkpoint");
  const std::string tmp = written + ".tmp";
  fault::point("ckpt.open");
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) MOELAB_FAIL(what, ": cannot create ", tmp, ": ", errno_text(errno));
  bool fd_open = true;
  try {
    FileWriter out(fd, what + " (writing " + tmp + ")");
    out.write(&header_len, 8);
    out.write(header.data(), header.size());
    for (const SafetensorsWriter::Entry* e : st.sorted())
      if (e->nbytes) out.write(e->data, size_t(e->nbytes));
    out.flush();
    MOELAB_CHECK(out.written() == total, "checkpoint writer: wrote ", out.written(),
                 " bytes, computed ", total);

    fault::point("ckpt.fsync");
    if (::fsync(fd) != 0) MOELAB_FAIL(what, ": fsync of ", tmp, " failed: ", errno_text(errno));
    fault::point("ckpt.close");
    fd_open = false;
    if (::close(fd) != 0) MOELAB_FAIL(what, ": close of ", tmp, " failed: ", errno_text(errno));
    fault::point("ckpt.rename");
    if (::rename(tmp.c_str(), written.c_str()) != 0)
      MOELAB_FAIL(what, ": rename of ", tmp, " failed: ", errno_text(errno));
  } catch (...) {
    if (fd_open) ::close(fd);
    ::unlink(tmp.c_str());  // the tmp file is ours (we opened it); `path` is untouched
    throw;
  }

  // Make the rename durable. Some file systems cannot fsync a folder (EINVAL); the data itself
  // is already on disk then, so only real I/O errors count.
  const std::string dir = parent.empty() ? std::string(".") : parent.string();
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    const int rc = ::fsync(dfd);
    const int e = errno;
    ::close(dfd);
    if (rc != 0 && e != EINVAL && e != EROFS)
      MOELAB_FAIL(what, ": fsync of folder ", dir, " failed: ", errno_text(e));
  }
}

// ---- reader ---------------------------------------------------------------------------------

CheckpointReader::CheckpointReader(const std::string& path) : path_(path) {
  const std::string ck = "checkpoint " + path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) MOELAB_FAIL("cannot open ", ck, ": ", errno_text(errno));
  struct Closer {
    int& fd;
    ~Closer() {
      if (fd >= 0) ::close(fd);
    }
  } closer{fd};
  struct stat st{};
  if (::fstat(fd, &st) != 0) MOELAB_FAIL("cannot stat ", ck, ": ", errno_text(errno));
  if (!S_ISREG(st.st_mode)) MOELAB_FAIL(ck, " is not a regular file");
  const uint64_t size = uint64_t(st.st_size);
  if (size == 0) MOELAB_FAIL(ck, " is empty (truncated: a checkpoint has at least 8 bytes)");
  // The format, by content: "MOELABCK" (or a prefix of it, a truncated file) is format 1.
  char head[8] = {};
  const size_t n = size_t(std::min<uint64_t>(size, 8));
  pread_all(fd, head, n, 0, ck);
  if (std::memcmp(head, kCheckpointMagic, n) == 0) {
    ::close(fd);
    fd = -1;
    read_v1();
  } else {
    read_v2(fd, size);
  }
}

void CheckpointReader::read_v2(int fd, uint64_t size) {
  const std::string ck = "checkpoint " + path_;
  version_ = 2;
  if (size < 8)
    MOELAB_FAIL(ck, " is truncated (expected at least 8 bytes, found ", size,
                "), or not a moelab checkpoint");
  uint64_t n = 0;
  pread_all(fd, reinterpret_cast<char*>(&n), 8, 0, ck);
  if (n < 2 || n > kSafetensorsMaxHeader)
    MOELAB_FAIL(ck, " is not a moelab checkpoint (it starts with neither \"MOELABCK\", format 1, "
                "nor the header length of a safetensors file, format 2)");
  if (8 + n > size)
    MOELAB_FAIL(ck, " is truncated (expected at least ", 8 + n, " bytes, found ", size, ")");

  // The header's checksum, on the raw bytes, before anything in them is trusted.
  std::string header(size_t(n), '\0');
  pread_all(fd, header.data(), header.size(), 8, ck);
  int count = 0;
  const size_t hv = find_meta_value(header, kMetaHeaderHash, count);
  if (count == 0)
    MOELAB_FAIL(ck, " is not a moelab checkpoint (no ", kMetaHeaderHash, " in its safetensors "
                "metadata: a safetensors file of another tool, or a checkpoint whose header is corrupted)");
  if (count > 1 || hv + kHashDigits >= header.size() || header[hv + kHashDigits] != '"' ||
      !is_hash(std::string_view(header).substr(hv, kHashDigits)))
    MOELAB_FAIL(ck, " is corrupted: checksum mismatch in the header (", kMetaHeaderHash,
                " is not one value of 64 hex digits)");
  const std::string stored_hash = header.substr(hv, kHashDigits);
  {
    std::string zeroed = header;
    std::fill(zeroed.begin() + long(hv), zeroed.begin() + long(hv + kHashDigits), '0');
    Sha256 h;
    h.update(&n, 8);
    h.update(zeroed.data(), zeroed.size());
    if (h.finish_hex() != stored_hash)
      MOELAB_FAIL(ck, " is corrupted: checksum mismatch in the header (the JSON with the tensor "
                  "names, dtypes, shapes, offsets, checksums and metadata)");
  }
  const size_t sv = find_meta_value(header, kMetaFileSize, count);
  uint64_t expected = 0;
  bool size_ok = count == 1 && sv + kFileSizeDigits < header.size() && header[sv + kFileSizeDigits] == '"';
  for (size_t i = 0; size_ok && i < kFileSizeDigits; ++i) {
    const char c = header[sv + i];
    size_ok = c >= '0' && c <= '9' && expected <= (std::numeric_limits<uint64_t>::max() - 9) / 10;
    expected = expected * 10 + uint64_t(c - '0');
  }
  if (!size_ok)
    MOELAB_FAIL(ck, " is not a moelab checkpoint (", kMetaFileSize, " is missing or not ",
                kFileSizeDigits, " digits)");
  if (size < expected)
    MOELAB_FAIL(ck, " is truncated (expected ", expected, " bytes, found ", size, ")");
  if (size > expected)
    MOELAB_FAIL(ck, " is corrupted: it has ", size - expected, " bytes of trailing garbage "
                "(expected ", expected, " bytes, found ", size, ")");

  // The safetensors checks (docs/safetensors.md) on the mapped file.
  try {
    st_ = std::make_shared<SafetensorsReader>(path_);
  } catch (const Error& e) {
    MOELAB_FAIL(ck, " is corrupted: ", e.what());
  }
  const SafetensorsReader& st = *st_;
  const std::map<std::string, std::string>& md = st.metadata();
  auto md_value = [&](const std::string& key) -> const std::string* {
    auto it = md.find(key);
    return it == md.end() ? nullptr : &it->second;
  };
  {
    const std::string* h = md_value(kMetaHeaderHash);
    if (st.file_size() != size || st.header_size() != n || !h || *h != stored_hash)
      MOELAB_FAIL(ck, " changed while it was being read (another process replaced it); read it again");
  }
  const std::string* format = md_value(kMetaFormat);
  if (!format || *format != kFormatName)
    MOELAB_FAIL(ck, " is not a moelab checkpoint (its metadata ", kMetaFormat, " is ",
                format ? "'" + printable(*format) + "'" : std::string("absent"), ", expected '",
                kFormatName, "')");
  const std::string* vtext = md_value(kMetaVersion);
  uint64_t version = 0;
  bool vok = vtext && !vtext->empty() && vtext->size() <= 9;
  for (size_t i = 0; vok && i < vtext->size(); ++i) {
    vok = (*vtext)[i] >= '0' && (*vtext)[i] <= '9';
    version = version * 10 + uint64_t((*vtext)[i] - '0');
  }
  if (!vok)
    MOELAB_FAIL(ck, " is corrupted: ", kMetaVersion, " is ",
                vtext ? "'" + printable(*vtext) + "'" : std::string("absent"), ", not a number");
  if (version > kCheckpointVersion)
    MOELAB_FAIL(ck, " has format version ", version, ", newer than the version ",
                kCheckpointVersion, " this moelab reads; use a newer moelab");
  if (version < 2)
    MOELAB_FAIL(ck, " has unsupported format version ", version, " in a safetensors file "
                "(format 1 files start with \"MOELABCK\")");

  // checkpoint.order: every tensor once, in the order they were added.
  const std::string* order_text = md_value(kMetaOrder);
  if (!order_text) MOELAB_FAIL(ck, " is corrupted: its metadata has no ", kMetaOrder);
  const nlohmann::json order = parse_json_strict(*order_text, ck + ": " + kMetaOrder, 4);
  if (!order.is_array()) MOELAB_FAIL(ck, " is corrupted: ", kMetaOrder, " is not a JSON array");
  std::set<std::string> stored_names;
  for (const nlohmann::json& j : order) {
    if (!j.is_string()) MOELAB_FAIL(ck, " is corrupted: ", kMetaOrder, " holds a non-string");
    const std::string sn = j.get<std::string>();
    if (!st.has(sn))
      MOELAB_FAIL(ck, " is corrupted: ", kMetaOrder, " lists '", printable(sn),
                  "', which the file does not hold");
    if (!stored_names.insert(sn).second)
      MOELAB_FAIL(ck, " is corrupted: ", kMetaOrder, " lists '", printable(sn), "' twice");
  }
  for (const std::string& sn : st.names())
    if (!stored_names.count(sn))
      MOELAB_FAIL(ck, " is corrupted: it holds tensor '", printable(sn), "', which ", kMetaOrder,
                  " does not list");

  std::vector<std::pair<const void*, size_t>> pieces;
  std::vector<std::string> wanted;
  for (const nlohmann::json& j : order) {
    const std::string sn = j.get<std::string>();
    const SafetensorsTensorInfo& info = st.info(sn);
    Entry e;
    e.stored_name = sn;
    e.length = size_t(info.nbytes());
    const std::string bad = ck + " is corrupted: tensor '" + printable(sn) + "' ";
    if (starts_with(sn, kCheckpointBlobPrefix)) {
      e.kind = kKindBlob;
      e.name = sn.substr(std::strlen(kCheckpointBlobPrefix));
      if (info.dtype != StDType::U64 || info.shape.size() != 1)
        MOELAB_FAIL(bad, "is ", to_string(info.dtype), " of rank ", info.shape.size(),
                    "; a blob is a U64 tensor of rank 1");
    } else {
      e.kind = kKindTensor;
      e.name = sn;
      if (!dtype_from_st(info.dtype, e.dtype))
        MOELAB_FAIL(bad, "has dtype ", to_string(info.dtype), " (checkpoint tensors are F64, F32, BF16 or I32)");
      if (info.shape.size() > size_t(kMaxDims))
        MOELAB_FAIL(bad, "has rank ", info.shape.size(), " > ", kMaxDims);
      e.shape = Shape(info.shape);
    }
    if (e.name.empty() || e.name.size() > kMaxNameLength) MOELAB_FAIL(bad, "has a bad name length");
    if (index_.count(e.name)) MOELAB_FAIL(bad, "is a duplicate name");
    const std::string* h = md_value(kMetaHashPrefix + sn);
    if (!h || !is_hash(*h))
      MOELAB_FAIL(bad, "has no checksum (", kMetaHashPrefix, printable(sn), " is ",
                  h ? "not 64 hex digits" : "absent", ")");
    wanted.push_back(*h);
    pieces.push_back({st.bytes(sn).data(), e.length});
    index_[e.name] = entries_.size();
    entries_.push_back(std::move(e));
  }
  // Every tensor's checksum (each tensor's pages are dropped again once hashed: the file is
  // never held in memory whole).
  const std::vector<std::string> got =
      sha256_all(pieces, [&](size_t i) { st.release(entries_[i].stored_name); });
  for (size_t i = 0; i < entries_.size(); ++i)
    if (got[i] != wanted[i])
      MOELAB_FAIL(ck, " is corrupted: checksum mismatch in ", kind_name(entries_[i].kind), " '",
                  printable(entries_[i].name), "'");

  // Metadata: reserved keys must be the format's; the rest is the caller's.
  for (const auto& [k, v] : md) {
    if (!starts_with(k, kCheckpointReservedMeta)) {
      meta_[k] = v;
      continue;
    }
    if (k == kMetaFormat || k == kMetaVersion || k == kMetaOrder || k == kMetaFileSize ||
        k == kMetaHeaderHash)
      continue;
    if (starts_with(k, kMetaHashPrefix) && stored_names.count(k.substr(kMetaHashPrefix.size())))
      continue;
    std::string key, value;
    if (starts_with(k, kMetaHexPrefix) && from_hex(k.substr(kMetaHexPrefix.size()), key) &&
        !key.empty() && from_hex(v, value)) {
      meta_[key] = value;
      continue;
    }
    MOELAB_FAIL(ck, " is corrupted: unknown metadata key '", printable(k), "' (keys starting with \"",
                kCheckpointReservedMeta, "\" belong to the format)");
  }
}

void CheckpointReader::read_v1() {
  const std::string ck = "checkpoint " + path_;
  version_ = 1;
  bytes_ = read_regular_file(path_, ck);
  const char* b = bytes_.data();
  const size_t size = bytes_.size();

  // Header: magic, size, header checksum, version, recorded size. The 32-byte header layout is
  // frozen across versions, so its checksum is checked before the version is trusted.
  if (size == 0) MOELAB_FAIL(ck, " is empty (truncated: expected at least ", kHeaderSize, " bytes)");
  if (std::memcmp(b, kCheckpointMagic, std::min<size_t>(size, 8)) != 0)
    MOELAB_FAIL(ck, " is not a moelab checkpoint (bad magic: the file does not start with "
                "\"MOELABCK\")");
  if (size < kHeaderSize)
    MOELAB_FAIL(ck, " is truncated (expected at least ", kHeaderSize, " bytes, found ", size, ")");
  if (get<uint64_t>(b + 24) != fnv1a64(b, 24))
    MOELAB_FAIL(ck, " is corrupted: checksum mismatch in the file header");
  const uint32_t version = get<uint32_t>(b + 8);
  if (version > 1)
    MOELAB_FAIL(ck, " has format version ", version, " in moelab's binary layout, newer than the "
                "version 1 this moelab reads there; use a newer moelab");
  if (version < 1) MOELAB_FAIL(ck, " has unsupported format version ", version);
  if (get<uint32_t>(b + 12) != kHeaderSize)
    MOELAB_FAIL(ck, " is corrupted: header size ", get<uint32_t>(b + 12), ", expected ",
                kHeaderSize);
  const uint64_t expected = get<uint64_t>(b + 16);
  if (size < expected)
    MOELAB_FAIL(ck, " is truncated (expected ", expected, " bytes, found ", size, ")");
  if (size > expected)
    MOELAB_FAIL(ck, " is corrupted: it has ", size - expected, " bytes of trailing garbage "
                "(expected ", expected, " bytes, found ", size, ")");
  if (expected < kHeaderSize + kTrailerSize)
    MOELAB_FAIL(ck, " is corrupted: the header records an impossible size of ", expected,
                " bytes");

  // Entries. The whole-file hash is accumulated along the way (payload bytes are hashed into
  // the entry's and the file's hash in one pass).
  uint64_t file_hash = fnv1a64(b, kHeaderSize);
  const size_t end = size - kTrailerSize;
  size_t off = kHeaderSize;
  std::string previous;  // where the last good entry was, for messages about the next one
  while (off < end) {
    const size_t index = entries_.size() + meta_.size();
    const std::string where = "entry #" + std::to_string(index) + " at byte " +
                              std::to_string(off) +
                              (previous.empty() ? std::string() : ", after " + previous);
    const char* h = b + off;
    const size_t room = end - off;  // bytes left before the trailer
    if (room < kEntryHeaderSize + 8 ||
        get<uint32_t>(h + 4) > room - kEntryHeaderSize - 8)
      MOELAB_FAIL(ck, " is corrupted: an entry runs past the end of the entries (", where, ")");
    const size_t name_len = get<uint32_t>(h + 4);
    const size_t head_len = kEntryHeaderSize + name_len;
    const uint64_t head_hash = fnv1a64(h, head_len);
    if (get<uint64_t>(h + head_len) != head_hash)
      MOELAB_FAIL(ck, " is corrupted: checksum mismatch in the header or name of ", where);
    file_hash = fnv1a64(h, head_len + 8, file_hash);

    // The entry header is as written now; anything odd is a writer bug or a foreign file.
    const uint8_t kind = uint8_t(h[0]), dcode = uint8_t(h[1]), ndim = uint8_t(h[2]);
    const uint64_t len = get<uint64_t>(h + 40);
    const std::string name(h + kEntryHeaderSize, name_len);
    const std::string what = std::string(kind_name(kind)) + " '" + printable(name) + "'";
    const std::string bad = ck + " is corrupted: " + what + " (" + where + ") ";
    if (len > room - head_len - 8 || room - head_len - 8 - len < 8)
      MOELAB_FAIL(bad, "declares ", len, " payload bytes, more than the ",
                  room - head_len - 16, " bytes left");
    const char* payload = h + head_len + 8;
    uint64_t payload_hash = kFnvOffset;
    fnv1a64_2(payload, size_t(len), payload_hash, file_hash);
    if (get<uint64_t>(payload + len) != payload_hash)
      MOELAB_FAIL(ck, " is corrupted: checksum mismatch in ", what, " (", where, ")");
    file_hash = fnv1a64(payload + len, 8, file_hash);

    if (name.empty() || name_len > kMaxNameLength) MOELAB_FAIL(bad, "has a bad name length");
    if (kind == kKindMeta) {
      if (meta_.count(name)) MOELAB_FAIL(bad, "is a duplicate meta key");
      meta_[name] = std::string(payload, size_t(len));
    } else if (kind == kKindTensor || kind == kKindBlob) {
      if (index_.count(name)) MOELAB_FAIL(bad, "is a duplicate name");
      Entry e;
      e.kind = kind;
      e.name = name;
      e.offset = size_t(payload - b);
      e.length = size_t(len);
      if (kind == kKindTensor) {
        if (!dtype_from_code(dcode, e.dtype)) MOELAB_FAIL(bad, "has unknown dtype code ", int(dcode));
        if (ndim > kMaxDims) MOELAB_FAIL(bad, "has rank ", int(ndim), " > ", kMaxDims);
        e.shape.ndim = ndim;
        // numel * dtype size must equal the payload length, without overflow.
        uint64_t n = dtype_size(e.dtype);
        for (int i = 0; i < ndim; ++i) {
          const int64_t d = get<int64_t>(h + 8 + 8 * i);
          if (d < 0) MOELAB_FAIL(bad, "has a negative dimension");
          e.shape.dims[i] = d;
          if (d != 0 && n > std::numeric_limits<uint64_t>::max() / uint64_t(d))
            MOELAB_FAIL(bad, "has an impossible shape");
          n *= uint64_t(d);
        }
        if (n != len)
          MOELAB_FAIL(bad, "holds ", len, " bytes, but ", to_string(e.dtype), e.shape.str(),
                      " needs ", n);
      } else if (len % 8 != 0) {
        MOELAB_FAIL(bad, "has ", len, " bytes, not a multiple of 8");
      }
      index_[name] = entries_.size();
      entries_.push_back(std::move(e));
    } else {
      MOELAB_FAIL(bad, "has unknown kind ", int(kind));
    }
    previous = what;
    off += head_len + 8 + len + 8;
  }

  // Trailer.
  const char* t = b + end;
  if (std::memcmp(t, kTrailerMagic, 8) != 0)
    MOELAB_FAIL(ck, " is corrupted: bad trailer (no \"CKPT_END\" at byte ", end, ")");
  file_hash = fnv1a64(t, 16, file_hash);
  if (get<uint64_t>(t + 16) != file_hash)
    MOELAB_FAIL(ck, " is corrupted: whole-file checksum mismatch");
  const uint64_t count = get<uint64_t>(t + 8);
  if (count != entries_.size() + meta_.size())
    MOELAB_FAIL(ck, " is corrupted: the trailer records ", count, " entries, found ",
                entries_.size() + meta_.size());
}

std::string CheckpointReader::meta(const std::string& key) const {
  auto it = meta_.find(key);
  if (it == meta_.end()) MOELAB_FAIL("checkpoint ", path_, " has no meta key '", key, "'");
  return it->second;
}

bool CheckpointReader::has_meta(const std::string& key) const { return meta_.count(key) != 0; }

std::vector<std::string> CheckpointReader::meta_keys() const {
  std::vector<std::string> keys;
  for (const auto& kv : meta_) keys.push_back(kv.first);
  return keys;
}

bool CheckpointReader::has(const std::string& name) const { return index_.count(name) != 0; }

bool CheckpointReader::is_tensor(const std::string& name) const {
  auto it = index_.find(name);
  return it != index_.end() && entries_[it->second].kind == kKindTensor;
}

std::vector<std::string> CheckpointReader::names() const {
  std::vector<std::string> v;
  for (const Entry& e : entries_) v.push_back(e.name);
  return v;
}

const CheckpointReader::Entry& CheckpointReader::find(const std::string& name,
                                                      const char* wanted) const {
  auto it = index_.find(name);
  if (it == index_.end()) MOELAB_FAIL("checkpoint ", path_, " has no ", wanted, " '", name, "'");
  const Entry& e = entries_[it->second];
  if (std::strcmp(kind_name(e.kind), wanted) != 0)
    MOELAB_FAIL("checkpoint ", path_, ": '", name, "' is a ", kind_name(e.kind), ", not a ",
                wanted);
  return e;
}

const char* CheckpointReader::payload(const Entry& e) const {
  if (st_) return reinterpret_cast<const char*>(st_->bytes(e.stored_name).data());
  return bytes_.data() + e.offset;
}

Tensor CheckpointReader::tensor(const std::string& name, Shape expected_shape,
                                DType expected_dtype) const {
  const Entry& e = find(name, "tensor");
  if (e.shape != expected_shape || e.dtype != expected_dtype)
    MOELAB_FAIL("checkpoint ", path_, ": tensor '", name, "' is ", to_string(e.dtype),
                e.shape.str(), ", expected ", to_string(expected_dtype), expected_shape.str(),
                " (was it written for another model shape or precision?)");
  std::shared_ptr<char[]> buf(new char[e.length ? e.length : 1]);
  if (e.length) std::memcpy(buf.get(), payload(e), e.length);
  if (st_) st_->release(e.stored_name);  // the mapping's pages of it leave this process again
  return Tensor(std::shared_ptr<void>(buf, buf.get()), buf.get(), e.shape, e.dtype, Device::CPU);
}

Shape CheckpointReader::tensor_shape(const std::string& name) const {
  return find(name, "tensor").shape;
}

DType CheckpointReader::tensor_dtype(const std::string& name) const {
  return find(name, "tensor").dtype;
}

std::vector<uint64_t> CheckpointReader::blob(const std::string& name) const {
  const Entry& e = find(name, "blob");
  std::vector<uint64_t> words(e.length / 8);
  if (e.length) std::memcpy(words.data(), payload(e), e.length);
  return words;
}

// ---- naming ---------------------------------------------------------------------------------

std::string checkpoint_path(const std::string& dir, int64_t step) {
  MOELAB_CHECK(step >= 0, "checkpoint step must be >= 0, got ", step);
  char name[64];
  std::snprintf(name, sizeof name, "step_%06lld.ckpt", static_cast<long long>(step));
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

namespace {
// Parses the run of digits at s[i..]; false if there is none or it overflows int64.
bool parse_digits(const std::string& s, size_t i, int64_t& value, size_t& ndigits) {
  value = 0;
  ndigits = 0;
  for (; i < s.size() && s[i] >= '0' && s[i] <= '9'; ++i, ++ndigits) {
    const int d = s[i] - '0';
    if (value > (std::numeric_limits<int64_t>::max() - d) / 10) return false;
    value = value * 10 + d;
  }
  return ndigits > 0;
}
}  // namespace

std::string latest_checkpoint(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return "";
  std::string best;
  int64_t best_step = -1;
  for (fs::directory_iterator it(dir, ec), stop; !ec && it != stop; it.increment(ec)) {
    std::error_code ec2;
    if (!it->is_regular_file(ec2)) continue;
    const std::string name = it->path().filename().string();
    const std::string prefix = "step_", suffix = ".ckpt";
    if (name.size() <= prefix.size() + suffix.size() || name.rfind(prefix, 0) != 0 ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    int64_t step;
    size_t ndigits;
    if (!parse_digits(name, prefix.size(), step, ndigits) || ndigits < 6 ||
        prefix.size() + ndigits + suffix.size() != name.size())
      continue;
    const std::string p = dir.back() == '/' ? dir + name : dir + "/" + name;
    if (step > best_step || (step == best_step && p > best)) {
      best_step = step;
      best = p;
    }
  }
  if (ec) MOELAB_FAIL("cannot list checkpoint folder ", dir, ": ", ec.message());
  return best;
}

int64_t checkpoint_step(const std::string& path) {
  const std::string name = fs::path(path).filename().string();
  // The last "step_" that is followed by digits.
  for (size_t at = name.rfind("step_"); at != std::string::npos;
       at = at ? name.rfind("step_", at - 1) : std::string::npos) {
    int64_t step;
    size_t ndigits;
    if (parse_digits(name, at + 5, step, ndigits)) return step;
  }
  MOELAB_FAIL("cannot tell the step of checkpoint ", path,
                ": its name does not contain step_<digits> (for example step_000020.ckpt)");
}

}  // namespace moelab
