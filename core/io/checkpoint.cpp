// moelab: the checkpoint container (format documented in checkpoint.h).
#include "core/io/checkpoint.h"
#include "core/io/fault.h"
#include "core/io/output_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <system_error>

namespace fs = std::filesystem;

namespace moelab {

static_assert(std::endian::native == std::endian::little,
              "the checkpoint format is little-endian; add byte swapping for this host");

namespace {

constexpr uint8_t kKindTensor = 1, kKindBlob = 2, kKindMeta = 3;
constexpr uint8_t kNoDType = 255;
constexpr size_t kHeaderSize = 32;
constexpr size_t kEntryHeaderSize = 48;
constexpr size_t kTrailerSize = 24;
constexpr size_t kMaxNameLength = 65536;
constexpr char kTrailerMagic[8] = {'C', 'K', 'P', 'T', '_', 'E', 'N', 'D'};

uint8_t dtype_code(DType dt) {
  switch (dt) {
    case DType::F64: return 0;
    case DType::F32: return 1;
    case DType::BF16: return 2;
    case DType::I32: return 3;
  }
  return kNoDType;
}

bool dtype_from_code(uint8_t c, DType& dt) {
  switch (c) {
    case 0: dt = DType::F64; return true;
    case 1: dt = DType::F32; return true;
    case 2: dt = DType::BF16; return true;
    case 3: dt = DType::I32; return true;
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

template <class T> void put(char* p, T v) { std::memcpy(p, &v, sizeof(T)); }
template <class T> T get(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// The 48-byte entry header.
void encode_entry_header(char* h, uint8_t kind, uint8_t dtype, const Shape& shape,
                         size_t name_len, size_t payload_len) {
  std::memset(h, 0, kEntryHeaderSize);
  h[0] = char(kind);
  h[1] = char(dtype);
  h[2] = char(kind == kKindTensor ? shape.ndim : 0);
  put<uint32_t>(h + 4, uint32_t(name_len));
  if (kind == kKindTensor)
    for (int i = 0; i < shape.ndim; ++i) put<int64_t>(h + 8 + 8 * i, shape.dims[i]);
  put<uint64_t>(h + 40, uint64_t(payload_len));
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


// Writes to a file descriptor through a buffer, hashing every byte written.
class HashedFileWriter {
 public:
  HashedFileWriter(int fd, const std::string& what) : fd_(fd), what_(what) { buf_.reserve(kBuf); }
  // Writes n bytes, adding them to the file hash and, if `also` is set, to *also.
  void write(const void* data, size_t n, uint64_t* also = nullptr) {
    if (also) {
      fnv1a64_2(data, n, *also, hash_);
    } else {
      hash_ = fnv1a64(data, n, hash_);
    }
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
  // Bytes that are written but not hashed (the trailer's file hash itself).
  void write_unhashed(const void* data, size_t n) {
    const uint64_t h = hash_;
    write(data, n);
    hash_ = h;
  }
  void flush() {
    raw_write(buf_.data(), buf_.size());
    buf_.clear();
  }
  uint64_t hash() const { return hash_; }
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
  uint64_t hash_ = kFnvOffset;
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
  meta_[key] = value;
}

void CheckpointWriter::add_tensor(const std::string& name, const Tensor& t) {
  MOELAB_CHECK(!name.empty() && name.size() <= kMaxNameLength, "checkpoint tensor name '",
               printable(name), "' must have 1..", kMaxNameLength, " bytes");
  for (const Entry& e : entries_)
    MOELAB_CHECK(e.name != name, "checkpoint: duplicate name '", name, "' (already a ",
                 kind_name(e.kind), ")");
  MOELAB_CHECK(t.device() == Device::CPU, "checkpoint tensor '", name, "' is on ",
               to_string(t.device()), "; copy it to the CPU first");
  MOELAB_CHECK(t.data() != nullptr || t.nbytes() == 0, "checkpoint tensor '", name,
               "' has no data");
  Entry e;
  e.kind = kKindTensor;
  e.dtype = t.dtype();
  e.shape = t.shape();
  e.name = name;
  const char* p = static_cast<const char*>(t.data());
  e.payload.assign(p, p + t.nbytes());
  entries_.push_back(std::move(e));
}

void CheckpointWriter::add_blob(const std::string& name, const std::vector<uint64_t>& words) {
  MOELAB_CHECK(!name.empty() && name.size() <= kMaxNameLength, "checkpoint blob name '",
               printable(name), "' must have 1..", kMaxNameLength, " bytes");
  for (const Entry& e : entries_)
    MOELAB_CHECK(e.name != name, "checkpoint: duplicate name '", name, "' (already a ",
                 kind_name(e.kind), ")");
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

  // Total size, known before writing so the header can record it.
  uint64_t total = kHeaderSize + kTrailerSize;
  for (const Entry& e : entries_) total += kEntryHeaderSize + e.name.size() + e.payload.size() + 16;
  for (const auto& [k, v] : meta_) total += kEntryHeaderSize + k.size() + v.size() + 16;

  const std::string written = resolve_output_target(path, "checkpoint");
  const std::string tmp = written + ".tmp";
  fault::point("ckpt.open");
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) MOELAB_FAIL(what, ": cannot create ", tmp, ": ", errno_text(errno));
  bool fd_open = true;
  try {
    HashedFileWriter out(fd, what + " (writing " + tmp + ")");
    char header[kHeaderSize] = {};
    std::memcpy(header, kCheckpointMagic, 8);
    put<uint32_t>(header + 8, kCheckpointVersion);
    put<uint32_t>(header + 12, uint32_t(kHeaderSize));
    put<uint64_t>(header + 16, total);
    put<uint64_t>(header + 24, fnv1a64(header, 24));
    out.write(header, kHeaderSize);

    uint64_t count = 0;
    auto write_entry = [&](uint8_t kind, uint8_t dtype, const Shape& shape,
                           const std::string& name, const char* payload, size_t len) {
      char h[kEntryHeaderSize];
      encode_entry_header(h, kind, dtype, shape, name.size(), len);
      uint64_t head_hash = kFnvOffset, payload_hash = kFnvOffset;
      out.write(h, kEntryHeaderSize, &head_hash);
      out.write(name.data(), name.size(), &head_hash);
      out.write(&head_hash, 8);
      out.write(payload, len, &payload_hash);
      out.write(&payload_hash, 8);
      ++count;
    };
    for (const Entry& e : entries_)
      write_entry(e.kind, e.kind == kKindTensor ? dtype_code(e.dtype) : kNoDType, e.shape, e.name,
                  e.payload.data(), e.payload.size());
    for (const auto& [k, v] : meta_) write_entry(kKindMeta, kNoDType, Shape{}, k, v.data(), v.size());

    char trailer[kTrailerSize];
    std::memcpy(trailer, kTrailerMagic, 8);
    put<uint64_t>(trailer + 8, count);
    out.write(trailer, 16);
    const uint64_t file_hash = out.hash();
    out.write_unhashed(&file_hash, 8);
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
  bytes_ = read_regular_file(path, ck);
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
  if (version > kCheckpointVersion)
    MOELAB_FAIL(ck, " has format version ", version, ", newer than the version ",
                kCheckpointVersion, " this moelab reads; use a newer moelab");
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

Tensor CheckpointReader::tensor(const std::string& name, Shape expected_shape,
                                DType expected_dtype) const {
  const Entry& e = find(name, "tensor");
  if (e.shape != expected_shape || e.dtype != expected_dtype)
    MOELAB_FAIL("checkpoint ", path_, ": tensor '", name, "' is ", to_string(e.dtype),
                e.shape.str(), ", expected ", to_string(expected_dtype), expected_shape.str(),
                " (was it written for another model shape or precision?)");
  std::shared_ptr<char[]> buf(new char[e.length ? e.length : 1]);
  std::memcpy(buf.get(), bytes_.data() + e.offset, e.length);
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
  if (e.length) std::memcpy(words.data(), bytes_.data() + e.offset, e.length);
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
