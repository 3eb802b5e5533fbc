// moelab: safetensors read (memory-mapped) and write (atomic); sharded checkpoints. The format
// and the checks are described in safetensors.h and docs/safetensors.md.
#include "core/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>
#include <system_error>
#include <type_traits>

#include "core/io/fault.h"
#include "core/io/json_strict.h"
#include "core/io/output_file.h"

namespace fs = std::filesystem;

namespace moelab {

static_assert(std::endian::native == std::endian::little,
              "safetensors is little-endian; add byte swapping for this host");

namespace {

struct DTypeRow {
  StDType dt;
  const char* name;
  int bits;
};
// The reference's enum order (its writer sorts by it).
constexpr DTypeRow kDTypes[] = {
    {StDType::BOOL, "BOOL", 8},         {StDType::F4, "F4", 4},
    {StDType::F6_E2M3, "F6_E2M3", 6},   {StDType::F6_E3M2, "F6_E3M2", 6},
    {StDType::U8, "U8", 8},             {StDType::I8, "I8", 8},
    {StDType::F8_E5M2, "F8_E5M2", 8},   {StDType::F8_E4M3, "F8_E4M3", 8},
    {StDType::F8_E8M0, "F8_E8M0", 8},   {StDType::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {StDType::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {StDType::I16, "I16", 16},          {StDType::U16, "U16", 16},
    {StDType::F16, "F16", 16},          {StDType::BF16, "BF16", 16},
    {StDType::I32, "I32", 32},          {StDType::U32, "U32", 32},
    {StDType::F32, "F32", 32},          {StDType::C64, "C64", 64},
    {StDType::F64, "F64", 64},          {StDType::I64, "I64", 64},
    {StDType::U64, "U64", 64},
};

std::string known_dtypes() {
  std::string s;
  for (const DTypeRow& r : kDTypes) {
    if (!s.empty()) s += ", ";
    s += r.name;
  }
  return s;
}


std::string qname(const std::string& name) { return "'" + printable_name(name) + "'"; }

std::string shape_text(const std::vector<int64_t>& s) {
  std::string t = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) t += ", ";
    t += std::to_string(s[i]);
  }
  return t + "]";
}

// A JSON value for an error message, cut short.
std::string dump_short(const nlohmann::json& v) {
  std::string d = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return printable_name(d, 80);
}

// A non-negative JSON integer (a float, a negative number or anything else is not one).
bool json_uint(const nlohmann::json& v, uint64_t& out) {
  if (v.is_number_unsigned()) {
    out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    out = uint64_t(v.get<int64_t>());
    return true;
  }
  return false;
}

// A JSON string as serde_json writes it (the reference writer): ", \ and control characters
// escaped (\b \t \n \f \r, others \u00XX in lower-case hex), everything else verbatim.
void put_json_string(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\t': out += "\\t"; break;
      case '\n': out += "\\n"; break;
      case '\f': out += "\\f"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20) {
          char b[8];
          std::snprintf(b, sizeof b, "\\u%04x", c);
          out += b;
        } else {
          out += char(c);
        }
    }
  }
  out += '"';
}

// A JSON string as Python's json.dumps writes it (ensure_ascii: every non-ASCII code point as
// \uXXXX, above U+FFFF as a surrogate pair); used for the index file. `s` is valid UTF-8.
void put_py_json_string(std::string& out, const std::string& s) {
  out += '"';
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0; i < s.size();) {
    const unsigned c = p[i];
    uint32_t cp;
    int len = 1;
    if (c < 0x80) {
      cp = c;
    } else if ((c & 0xe0) == 0xc0) {
      cp = c & 0x1f;
      len = 2;
    } else if ((c & 0xf0) == 0xe0) {
      cp = c & 0x0f;
      len = 3;
    } else {
      cp = c & 0x07;
      len = 4;
    }
    for (int k = 1; k < len; ++k) cp = (cp << 6) | (p[i + k] & 0x3f);
    i += size_t(len);
    char b[16];
    switch (cp) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\b': out += "\\b"; continue;
      case '\t': out += "\\t"; continue;
      case '\n': out += "\\n"; continue;
      case '\f': out += "\\f"; continue;
      case '\r': out += "\\r"; continue;
      default: break;
    }
    if (cp >= 0x20 && cp < 0x7f) {
      out += char(cp);
    } else if (cp < 0x10000) {
      std::snprintf(b, sizeof b, "\\u%04x", cp);
      out += b;
    } else {
      const uint32_t v = cp - 0x10000;
      std::snprintf(b, sizeof b, "\\u%04x\\u%04x", 0xd800 + (v >> 10), 0xdc00 + (v & 0x3ff));
      out += b;
    }
  }
  out += '"';
}

// ---- element conversion ----------------------------------------------------------------------

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: mant * 2^-24, exact in float
      float f = std::ldexp(float(mant), -24);
      std::memcpy(&u, &f, 4);
      u |= sign;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);  // inf, or NaN with its payload
  } else {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// double -> bf16 rounded to nearest even once (not twice through float): round to odd at float
// precision (24 bits >= 8 + 2), then float -> bf16 to nearest even.
bf16 double_to_bf16(double d) {
  if (std::isnan(d)) return bf16::from_float(float(d));
  float f = float(d);
  if (std::isinf(f) && !std::isinf(d)) {
    f = std::copysign(std::numeric_limits<float>::max(), float(d));
  } else if (std::fabs(double(f)) > std::fabs(d)) {
    f = std::nextafter(f, 0.0f);
  }
  if (double(f) != d) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u |= 1u;
    std::memcpy(&f, &u, 4);
  }
  return bf16::from_float(f);
}

// Calls f(i, value) for the n elements of type S at p (memcpy loads: p need not be aligned).
template <class S, class F> void each(const std::byte* p, int64_t n, F&& f) {
  for (int64_t i = 0; i < n; ++i) {
    S v;
    std::memcpy(&v, p + size_t(i) * sizeof(S), sizeof(S));
    f(i, v);
  }
}

// Conversions to a float type T: from a double, from a float (exact sources: F32, F16, BF16),
// from an integer; each rounds once (to nearest even).
template <class T> struct To;
template <> struct To<double> {
  static double d(double x) { return x; }
  static double f(float x) { return x; }
  template <class I> static double i(I x) { return double(x); }
};
template <> struct To<float> {
  static float d(double x) { return float(x); }
  static float f(float x) { return x; }
  template <class I> static float i(I x) { return float(x); }
};
template <> struct To<bf16> {
  static bf16 d(double x) { return double_to_bf16(x); }
  static bf16 f(float x) { return bf16::from_float(x); }
  template <class I> static bf16 i(I x) { return double_to_bf16(double(x)); }  // > 2^53: via f64
};

// Stored floats, integers and BOOL to a float type; false for other source dtypes.
template <class T> bool to_floats(const std::byte* p, StDType s, int64_t n, T* o) {
  switch (s) {
    case StDType::F64: each<double>(p, n, [o](int64_t i, double v) { o[i] = To<T>::d(v); }); return true;
    case StDType::F32: each<float>(p, n, [o](int64_t i, float v) { o[i] = To<T>::f(v); }); return true;
    case StDType::F16: each<uint16_t>(p, n, [o](int64_t i, uint16_t v) { o[i] = To<T>::f(half_to_float(v)); }); return true;
    case StDType::BF16: each<uint16_t>(p, n, [o](int64_t i, uint16_t v) { o[i] = To<T>::f(bf16{v}.to_float()); }); return true;
    case StDType::BOOL: each<uint8_t>(p, n, [o](int64_t i, uint8_t v) { o[i] = To<T>::i(int(v != 0)); }); return true;
    case StDType::U8: each<uint8_t>(p, n, [o](int64_t i, uint8_t v) { o[i] = To<T>::i(v); }); return true;
    case StDType::I8: each<int8_t>(p, n, [o](int64_t i, int8_t v) { o[i] = To<T>::i(v); }); return true;
    case StDType::I16: each<int16_t>(p, n, [o](int64_t i, int16_t v) { o[i] = To<T>::i(v); }); return true;
    case StDType::U16: each<uint16_t>(p, n, [o](int64_t i, uint16_t v) { o[i] = To<T>::i(v); }); return true;
    case StDType::I32: each<int32_t>(p, n, [o](int64_t i, int32_t v) { o[i] = To<T>::i(v); }); return true;
    case StDType::U32: each<uint32_t>(p, n, [o](int64_t i, uint32_t v) { o[i] = To<T>::i(v); }); return true;
    case StDType::I64: each<int64_t>(p, n, [o](int64_t i, int64_t v) { o[i] = To<T>::i(v); }); return true;
    case StDType::U64: each<uint64_t>(p, n, [o](int64_t i, uint64_t v) { o[i] = To<T>::i(v); }); return true;
    default: return false;
  }
}

// Stored integers and BOOL to i32, refusing values out of range; false for other dtypes.
bool to_i32(const std::byte* p, StDType s, int64_t n, int32_t* o, const std::string& who) {
  auto put = [&](int64_t i, auto v) {
    using V = decltype(v);
    if constexpr (std::is_signed_v<V>) {
      if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
        MOELAB_FAIL(who, ": element ", i, " (", v, ") does not fit in i32");
    } else {
      if (uint64_t(v) > uint64_t(std::numeric_limits<int32_t>::max()))
        MOELAB_FAIL(who, ": element ", i, " (", v, ") does not fit in i32");
    }
    o[i] = int32_t(v);
  };
  switch (s) {
    case StDType::BOOL: each<uint8_t>(p, n, [o](int64_t i, uint8_t v) { o[i] = v != 0; }); return true;
    case StDType::U8: each<uint8_t>(p, n, [o](int64_t i, uint8_t v) { o[i] = v; }); return true;
    case StDType::I8: each<int8_t>(p, n, put); return true;
    case StDType::I16: each<int16_t>(p, n, put); return true;
    case StDType::U16: each<uint16_t>(p, n, put); return true;
    case StDType::U32: each<uint32_t>(p, n, put); return true;
    case StDType::I64: each<int64_t>(p, n, put); return true;
    case StDType::U64: each<uint64_t>(p, n, put); return true;
    default: return false;
  }
}

// Converts n elements of `src` (stored dtype s) into `dst` (moelab dtype d). `who` names the
// tensor and the file for errors.
void convert(const std::byte* src, StDType s, int64_t n, void* dst, DType d, const std::string& who) {
  if (st_dtype_of(d) == s) {
    if (n) std::memcpy(dst, src, size_t(n) * dtype_size(d));
    return;
  }
  bool done = false;
  switch (d) {
    case DType::F64: done = to_floats(src, s, n, static_cast<double*>(dst)); break;
    case DType::F32: done = to_floats(src, s, n, static_cast<float*>(dst)); break;
    case DType::BF16: done = to_floats(src, s, n, static_cast<bf16*>(dst)); break;
    case DType::I32:
      done = to_i32(src, s, n, static_cast<int32_t*>(dst), who);
      if (!done && (s == StDType::F64 || s == StDType::F32 || s == StDType::F16 || s == StDType::BF16))
        MOELAB_FAIL(who, ": no conversion from ", to_string(s),
                    " to i32 (moelab never rounds floats to integers silently)");
      break;
  }
  if (!done)
    MOELAB_FAIL(who, ": no conversion from ", to_string(s), " to ", to_string(d),
                " (moelab converts F64, F32, F16, BF16, integer and BOOL tensors)");
}

// Shape of the moelab tensor for a stored shape: 0-d becomes [1]; rank > 4 is refused.
Shape moelab_shape(const SafetensorsTensorInfo& t, const std::string& who) {
  if (t.shape.empty()) return Shape{1};
  if (t.shape.size() > size_t(kMaxDims))
    MOELAB_FAIL(who, " has rank ", t.shape.size(), " (shape ", shape_text(t.shape),
                "); moelab tensors have at most ", kMaxDims, " dimensions");
  return Shape(t.shape);
}

// ---- low-level file writing -------------------------------------------------------------------

// Writes through a 1 MiB buffer; big pieces go straight from the caller's memory.
class FdWriter {
 public:
  FdWriter(int fd, std::string what) : fd_(fd), what_(std::move(what)) { buf_.reserve(kBuf); }
  void write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    written_ += n;
    if (buf_.size() + n <= kBuf) {
      buf_.insert(buf_.end(), p, p + n);
      return;
    }
    flush();
    if (n >= kBuf) {
      raw(p, n);
    } else {
      buf_.insert(buf_.end(), p, p + n);
    }
  }
  void flush() {
    raw(buf_.data(), buf_.size());
    buf_.clear();
  }
  uint64_t written() const { return written_; }

 private:
  static constexpr size_t kBuf = 1 << 20;
  void raw(const char* p, size_t n) {
    if (n > 0) fault::point("st.write");
    write_all(fd_, p, n, what_);
  }
  int fd_;
  std::string what_;
  std::vector<char> buf_;
  uint64_t written_ = 0;
};

// A new temporary file beside `target` (O_EXCL, so nothing existing is ever opened), filled by
// `fill`, fsync()ed and closed. Returns its path; on error it is removed and the error thrown.
template <class Fill>
std::string write_temp_file(const std::string& target, const std::string& what, Fill fill) {
  static std::atomic<uint64_t> counter{0};
  std::string tmp;
  int fd = -1;
  fault::point("st.open");
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    const uint64_t t = uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
    char suffix[64];
    std::snprintf(suffix, sizeof suffix, ".tmp.%d.%llx", int(::getpid()),
                  static_cast<unsigned long long>((t * 0x9e3779b97f4a7c15ull) ^ counter++));
    tmp = target + suffix;
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno != EEXIST) MOELAB_FAIL(what, ": cannot create ", tmp, ": ", errno_text(errno));
  }
  if (fd < 0) MOELAB_FAIL(what, ": cannot create a temporary file beside ", target);
  bool open = true;
  try {
    FdWriter out(fd, what + " (writing " + tmp + ")");
    fill(out);
    out.flush();
    fault::point("st.fsync");
    if (::fsync(fd) != 0) MOELAB_FAIL(what, ": fsync of ", tmp, " failed: ", errno_text(errno));
    open = false;
    if (::close(fd) != 0) MOELAB_FAIL(what, ": close of ", tmp, " failed: ", errno_text(errno));
  } catch (...) {
    if (open) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  return tmp;
}

// Renames `tmp` to `target`; without `overwrite`, atomically refuses an existing target.
void commit_file(const std::string& tmp, const std::string& target, bool overwrite,
                 const std::string& what) {
  fault::point("st.rename");
  if (overwrite) {
    if (::rename(tmp.c_str(), target.c_str()) != 0)
      MOELAB_FAIL(what, ": rename of ", tmp, " to ", target, " failed: ", errno_text(errno));
    return;
  }
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, target.c_str(), RENAME_NOREPLACE) == 0) return;
  int e = errno;
  if (e == EINVAL || e == ENOSYS || e == ENOTSUP) {
    // A file system without RENAME_NOREPLACE: link() also refuses an existing target atomically.
    if (::link(tmp.c_str(), target.c_str()) == 0) {
      ::unlink(tmp.c_str());
      return;
    }
    e = errno;
  }
  if (e == EEXIST)
    MOELAB_USAGE_FAIL(what, ": ", target, " appeared while it was being written; refusing to replace it");
  MOELAB_FAIL(what, ": rename of ", tmp, " to ", target, " failed: ", errno_text(e));
}

void fsync_dir(const std::string& file, const std::string& what) {
  const fs::path parent = fs::path(file).parent_path();
  const std::string dir = parent.empty() ? std::string(".") : parent.string();
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return;
  const int rc = ::fsync(dfd);
  const int e = errno;
  ::close(dfd);
  if (rc != 0 && e != EINVAL && e != EROFS)
    MOELAB_FAIL(what, ": fsync of folder ", dir, " failed: ", errno_text(e));
}

void make_parent(const std::string& path, const std::string& what) {
  const fs::path parent = fs::path(path).parent_path();
  if (parent.empty()) return;
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) MOELAB_FAIL(what, ": cannot create folder ", parent.string(), ": ", ec.message());
}

bool path_exists(const std::string& p) {
  struct stat st;
  return ::lstat(p.c_str(), &st) == 0;
}

}  // namespace

// ---- dtypes ----------------------------------------------------------------------------------

const char* to_string(StDType dt) {
  for (const DTypeRow& r : kDTypes)
    if (r.dt == dt) return r.name;
  return "?";
}

int st_dtype_bits(StDType dt) {
  for (const DTypeRow& r : kDTypes)
    if (r.dt == dt) return r.bits;
  return 0;
}

bool st_dtype_from_name(const std::string& name, StDType& dt) {
  for (const DTypeRow& r : kDTypes)
    if (name == r.name) {
      dt = r.dt;
      return true;
    }
  return false;
}

StDType st_dtype_of(DType dt) {
  switch (dt) {
    case DType::F64: return StDType::F64;
    case DType::F32: return StDType::F32;
    case DType::BF16: return StDType::BF16;
    case DType::I32: return StDType::I32;
  }
  return StDType::F32;
}

// ---- reader ----------------------------------------------------------------------------------

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  const std::string f = "safetensors file " + path;
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) MOELAB_FAIL("cannot open ", f, ": ", errno_text(errno));
  try {
    struct stat st{};
    if (::fstat(fd_, &st) != 0) MOELAB_FAIL("cannot stat ", f, ": ", errno_text(errno));
    if (!S_ISREG(st.st_mode)) MOELAB_FAIL(f, " is not a regular file");
    size_ = uint64_t(st.st_size);
    if (size_ == 0) MOELAB_FAIL(f, " is empty (a safetensors file starts with an 8-byte header length)");
    if (size_ < 8)
      MOELAB_FAIL(f, " is truncated: ", size_, " bytes, fewer than the 8-byte header length");
    unsigned char len[8];
    size_t got = 0;
    while (got < 8) {
      const ssize_t r = ::pread(fd_, len + got, 8 - got, off_t(got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) MOELAB_FAIL("cannot read ", f, ": ", errno_text(errno));
      if (r == 0) MOELAB_FAIL(f, " is truncated: it ended while its header length was read");
      got += size_t(r);
    }
    std::memcpy(&header_len_, len, 8);
    if (header_len_ > kSafetensorsMaxHeader)
      MOELAB_FAIL(f, ": header length ", header_len_, " is larger than the limit of ",
                  kSafetensorsMaxHeader, " bytes (not a safetensors file, or a corrupt one)");
    if (header_len_ > size_ - 8)
      MOELAB_FAIL(f, ": header length ", header_len_, " runs past the end of the file (",
                  size_, " bytes): the file is truncated or not a safetensors file");
    if (header_len_ == 0) MOELAB_FAIL(f, ": the header is empty (length 0; it must be a JSON object)");
    map_ = ::mmap(nullptr, size_t(size_), PROT_READ, MAP_SHARED, fd_, 0);
    if (map_ == MAP_FAILED) {
      map_ = nullptr;
      MOELAB_FAIL("cannot map ", f, " into memory: ", errno_text(errno));
    }
    ::close(fd_);  // the mapping stays valid
    fd_ = -1;
    parse_header(static_cast<const char*>(map_) + 8, size_t(header_len_));
  } catch (...) {
    if (map_) ::munmap(map_, size_t(size_));
    map_ = nullptr;
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    throw;
  }
}

SafetensorsReader::~SafetensorsReader() {
  if (map_) ::munmap(map_, size_t(size_));
  if (fd_ >= 0) ::close(fd_);
}

std::string SafetensorsReader::where(const std::string& tensor) const {
  return "safetensors file " + path_ + ": tensor " + qname(tensor);
}

void SafetensorsReader::parse_header(const char* text, size_t n) {
  const std::string f = "safetensors file " + path_;
  nlohmann::json h;
  try {
    h = parse_json_strict(std::string_view(text, n), f + ": the header");
  } catch (const JsonDuplicateKey& d) {
    if (d.path.empty() && d.key == "__metadata__") MOELAB_FAIL(f, ": the header has two __metadata__ entries");
    if (d.path.empty()) MOELAB_FAIL(where(d.key), " appears twice in the header (duplicate tensor name)");
    if (d.path[0] == "__metadata__")
      MOELAB_FAIL(f, ": __metadata__ has the key ", qname(d.key), " twice (duplicate key)");
    MOELAB_FAIL(where(d.path[0]), ": the field ", qname(d.key), " appears twice (duplicate key)");
  }
  if (!h.is_object())
    MOELAB_FAIL(f, ": the header is ", a_json_type(h),
                ", not an object of tensors (not a safetensors file, or a corrupt one)");

  const uint64_t data_len = size_ - 8 - header_len_;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& v = it.value();
    if (name == "__metadata__") {
      if (v.is_null()) continue;  // the reference accepts null as "no metadata"
      if (!v.is_object())
        MOELAB_FAIL(f, ": __metadata__ is ", a_json_type(v),
                    ", expected an object of string values");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          MOELAB_FAIL(f, ": __metadata__ key ", qname(m.key()), " has ", a_json_type(m.value()),
                      " value (", dump_short(m.value()), "); safetensors metadata values must be strings");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      has_metadata_ = true;
      continue;
    }
    const std::string w = where(name);
    if (!v.is_object())
      MOELAB_FAIL(w, " is ", a_json_type(v), " (", dump_short(v),
                  "), expected an object with dtype, shape and data_offsets");
    for (auto fld = v.begin(); fld != v.end(); ++fld)
      if (fld.key() != "dtype" && fld.key() != "shape" && fld.key() != "data_offsets")
        MOELAB_FAIL(w, " has an unknown field ", qname(fld.key()),
                    " (a tensor has exactly dtype, shape and data_offsets)");
    for (const char* need : {"dtype", "shape", "data_offsets"})
      if (!v.contains(need)) MOELAB_FAIL(w, " has no '", need, "' field");

    SafetensorsTensorInfo t;
    t.name = name;
    const nlohmann::json& dt = v["dtype"];
    if (!dt.is_string())
      MOELAB_FAIL(w, ": dtype is ", a_json_type(dt), " (", dump_short(dt),
                  "), expected a string such as \"F32\"");
    if (!st_dtype_from_name(dt.get<std::string>(), t.dtype))
      MOELAB_FAIL(w, ": unknown dtype ", qname(dt.get<std::string>()), " (known: ", known_dtypes(), ")");

    const nlohmann::json& sh = v["shape"];
    if (!sh.is_array())
      MOELAB_FAIL(w, ": shape is ", a_json_type(sh), " (", dump_short(sh),
                  "), expected a list of non-negative integers");
    // The element count, multiplied in order and refused at the first overflow (as the
    // reference does, even when a later dimension is 0).
    uint64_t numel = 1;
    for (const nlohmann::json& d : sh) {
      uint64_t x;
      if (!json_uint(d, x))
        MOELAB_FAIL(w, ": shape ", dump_short(sh), " has a dimension (", dump_short(d),
                    ") that is not a non-negative integer");
      if (x > uint64_t(std::numeric_limits<int64_t>::max()))
        MOELAB_FAIL(w, ": shape ", dump_short(sh), " has a dimension larger than 2^63 - 1");
      t.shape.push_back(int64_t(x));
      if (x != 0 && numel > uint64_t(std::numeric_limits<int64_t>::max()) / x)
        MOELAB_FAIL(w, ": shape ", dump_short(sh), " has more than 2^63 - 1 elements (overflow)");
      numel *= x;
    }
    t.numel = int64_t(numel);
    const uint64_t bits_per = uint64_t(st_dtype_bits(t.dtype));
    if (numel > std::numeric_limits<uint64_t>::max() / bits_per)
      MOELAB_FAIL(w, ": ", to_string(t.dtype), shape_text(t.shape), " is too large (byte count overflows)");
    const uint64_t bits = numel * bits_per;
    if (bits % 8 != 0)
      MOELAB_FAIL(w, ": ", to_string(t.dtype), shape_text(t.shape), " is ", bits,
                  " bits, not a whole number of bytes");

    const nlohmann::json& off = v["data_offsets"];
    uint64_t b = 0, e = 0;
    if (!off.is_array() || off.size() != 2 || !json_uint(off[0], b) || !json_uint(off[1], e))
      MOELAB_FAIL(w, ": data_offsets ", dump_short(off),
                  " must be two non-negative integers [BEGIN, END]");
    if (e < b)
      MOELAB_FAIL(w, ": data_offsets [", b, ", ", e, "] decrease (BEGIN must be <= END)");
    t.begin = b;
    t.end = e;
    if (e - b != bits / 8)
      MOELAB_FAIL(w, ": dtype ", to_string(t.dtype), " and shape ", shape_text(t.shape), " need ",
                  bits / 8, " bytes, but data_offsets [", b, ", ", e, "] hold ", e - b);
    if (e > data_len)
      MOELAB_FAIL(w, ": data_offsets [", b, ", ", e, "] run past the end of the data (",
                  data_len, " bytes after the header): the file is truncated or the offsets are wrong");
    tensors_.push_back(std::move(t));
  }

  // Layout: the tensors, by offset, must tile [0, data_len) exactly (the reference refuses gaps,
  // overlaps and trailing bytes: "the byte buffer needs to be entirely indexed").
  std::sort(tensors_.begin(), tensors_.end(), [](const SafetensorsTensorInfo& a, const SafetensorsTensorInfo& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  uint64_t pos = 0;
  const SafetensorsTensorInfo* prev = nullptr;
  for (const SafetensorsTensorInfo& t : tensors_) {
    if (t.begin < pos)
      MOELAB_FAIL(f, ": tensors ", qname(prev->name), " [", prev->begin, ", ", prev->end, ") and ",
                  qname(t.name), " [", t.begin, ", ", t.end, ") overlap");
    if (t.begin > pos)
      MOELAB_FAIL(f, ": bytes [", pos, ", ", t.begin, ") of the data, before tensor ", qname(t.name),
                  ", belong to no tensor (a gap; safetensors forbids holes in the data)");
    pos = t.end;
    prev = &t;
  }
  if (pos != data_len)
    MOELAB_FAIL(f, ": the last ", data_len - pos, " bytes of the data (bytes [", pos, ", ", data_len,
                ") after the header) belong to no tensor (trailing bytes; safetensors forbids them)");
  for (size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
}

std::vector<std::string> SafetensorsReader::names() const {
  std::vector<std::string> v;
  v.reserve(tensors_.size());
  for (const auto& t : tensors_) v.push_back(t.name);
  return v;
}

const SafetensorsTensorInfo& SafetensorsReader::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) MOELAB_FAIL("safetensors file ", path_, " has no tensor ", qname(name));
  return tensors_[it->second];
}

std::span<const std::byte> SafetensorsReader::bytes(const std::string& name) const {
  const SafetensorsTensorInfo& t = info(name);
  const std::byte* base = static_cast<const std::byte*>(map_) + data_offset();
  return {base + t.begin, size_t(t.nbytes())};
}

Tensor SafetensorsReader::to_tensor(const std::string& name, DType out) const {
  const SafetensorsTensorInfo& t = info(name);
  const Shape shape = moelab_shape(t, where(name));
  const size_t n = size_t(shape.numel()) * dtype_size(out);
  std::shared_ptr<char[]> buf(new char[n ? n : 1]);
  Tensor result(std::shared_ptr<void>(buf, buf.get()), buf.get(), shape, out, Device::CPU);
  convert(bytes(name).data(), t.dtype, t.numel, buf.get(), out, where(name));
  return result;
}

void SafetensorsReader::copy_into(const std::string& name, const Tensor& dst) const {
  const SafetensorsTensorInfo& t = info(name);
  const Shape shape = moelab_shape(t, where(name));
  if (dst.device() != Device::CPU)
    MOELAB_FAIL(where(name), ": the destination is on ", to_string(dst.device()), "; copy into a CPU tensor");
  if (dst.shape() != shape)
    MOELAB_FAIL(where(name), " has shape ", shape.str(), ", the destination ", dst.describe());
  if (shape.numel() > 0 && dst.data() == nullptr) MOELAB_FAIL(where(name), ": the destination has no data");
  convert(bytes(name).data(), t.dtype, t.numel, dst.data(), dst.dtype(), where(name));
}

void SafetensorsReader::release(const std::string& name) const {
  const SafetensorsTensorInfo& t = info(name);
  const long page = ::sysconf(_SC_PAGESIZE);
  if (page <= 0 || !map_) return;
  const uintptr_t base = reinterpret_cast<uintptr_t>(map_);
  const uintptr_t lo = base + uintptr_t(data_offset() + t.begin);
  const uintptr_t hi = base + uintptr_t(data_offset() + t.end);
  const uintptr_t p = uintptr_t(page);
  const uintptr_t a = (lo + p - 1) / p * p, b = hi / p * p;
  if (a < b) ::madvise(reinterpret_cast<void*>(a), size_t(b - a), MADV_DONTNEED);
}

// ---- writer ----------------------------------------------------------------------------------

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
  MOELAB_CHECK(valid_utf8(key) && valid_utf8(value), "safetensors metadata key ", qname(key),
               ": keys and values must be valid UTF-8");
  metadata_[key] = value;
  has_metadata_ = true;
}

void SafetensorsWriter::add_entry(Entry e) {
  const std::string w = "safetensors writer: tensor " + qname(e.name);
  MOELAB_CHECK(!e.name.empty(), "safetensors writer: a tensor name must not be empty");
  MOELAB_CHECK(e.name != "__metadata__", w, ": the name is reserved for the metadata");
  MOELAB_CHECK(valid_utf8(e.name), w, ": the name is not valid UTF-8");
  MOELAB_CHECK(names_.count(e.name) == 0, w, " was added twice");
  uint64_t numel = 1;
  for (int64_t d : e.shape) {
    MOELAB_CHECK(d >= 0, w, ": negative dimension in shape ", shape_text(e.shape));
    MOELAB_CHECK(d == 0 || numel <= uint64_t(std::numeric_limits<int64_t>::max()) / uint64_t(d), w,
                 ": shape ", shape_text(e.shape), " overflows");
    numel *= uint64_t(d);
  }
  MOELAB_CHECK(numel <= std::numeric_limits<uint64_t>::max() / uint64_t(st_dtype_bits(e.dtype)), w,
               ": shape ", shape_text(e.shape), " overflows");
  const uint64_t bits = numel * uint64_t(st_dtype_bits(e.dtype));
  MOELAB_CHECK(bits % 8 == 0, w, ": ", to_string(e.dtype), shape_text(e.shape),
               " is not a whole number of bytes");
  MOELAB_CHECK(e.nbytes == bits / 8, w, ": ", to_string(e.dtype), shape_text(e.shape), " needs ",
               bits / 8, " bytes, got ", e.nbytes);
  MOELAB_CHECK(e.data != nullptr || e.nbytes == 0, w, ": no data");
  names_[e.name] = entries_.size();
  entries_.push_back(std::move(e));
}

void SafetensorsWriter::add(const std::string& name, StDType dtype, const std::vector<int64_t>& shape,
                            const void* data, uint64_t nbytes) {
  auto copy = std::make_shared<std::vector<std::byte>>(size_t(nbytes));
  if (nbytes) std::memcpy(copy->data(), data, size_t(nbytes));
  Entry e{name, dtype, shape, copy->data(), nbytes, copy};
  add_entry(std::move(e));
}

void SafetensorsWriter::add_view(const std::string& name, StDType dtype, const std::vector<int64_t>& shape,
                                 const void* data, uint64_t nbytes, std::shared_ptr<const void> owner) {
  add_entry(Entry{name, dtype, shape, static_cast<const std::byte*>(data), nbytes, std::move(owner)});
}

void SafetensorsWriter::add_tensor(const std::string& name, const Tensor& t) {
  MOELAB_CHECK(t.device() == Device::CPU, "safetensors writer: tensor ", qname(name), " is on ",
               to_string(t.device()), "; copy it to the CPU first");
  std::vector<int64_t> shape(t.shape().dims.begin(), t.shape().dims.begin() + t.ndim());
  auto keep = std::make_shared<Tensor>(t);
  add_entry(Entry{name, st_dtype_of(t.dtype()), shape, static_cast<const std::byte*>(t.data()),
                  uint64_t(t.nbytes()), std::shared_ptr<const void>(keep, keep.get())});
}

uint64_t SafetensorsWriter::data_bytes() const {
  uint64_t n = 0;
  for (const Entry& e : entries_) n += e.nbytes;
  return n;
}

std::vector<const SafetensorsWriter::Entry*> SafetensorsWriter::sorted() const {
  std::vector<const Entry*> v;
  for (const Entry& e : entries_) v.push_back(&e);
  // The reference writer: dtype descending in its enum order, then name (byte order).
  std::stable_sort(v.begin(), v.end(), [](const Entry* a, const Entry* b) {
    if (a->dtype != b->dtype) return int(a->dtype) > int(b->dtype);
    return a->name < b->name;
  });
  return v;
}

std::string SafetensorsWriter::header() const {
  std::string h = "{";
  bool first = true;
  if (has_metadata_) {
    h += "\"__metadata__\":{";
    bool mfirst = true;
    for (const auto& [k, v] : metadata_) {
      if (!mfirst) h += ',';
      mfirst = false;
      put_json_string(h, k);
      h += ':';
      put_json_string(h, v);
    }
    h += '}';
    first = false;
  }
  uint64_t off = 0;
  for (const Entry* e : sorted()) {
    if (!first) h += ',';
    first = false;
    put_json_string(h, e->name);
    h += ":{\"dtype\":\"";
    h += to_string(e->dtype);
    h += "\",\"shape\":[";
    for (size_t i = 0; i < e->shape.size(); ++i) {
      if (i) h += ',';
      h += std::to_string(e->shape[i]);
    }
    h += "],\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + e->nbytes) + "]}";
    off += e->nbytes;
  }
  h += '}';
  h.append((8 - h.size() % 8) % 8, ' ');
  MOELAB_CHECK(h.size() <= kSafetensorsMaxHeader, "safetensors writer: the header would be ", h.size(),
               " bytes, more than the limit of ", kSafetensorsMaxHeader, " that readers accept");
  return h;
}

namespace {
// Stages a writer's file as a temporary file beside `target`.
std::string stage(const std::vector<const SafetensorsWriter::Entry*>& order,
                  const std::string& header, const std::string& target, const std::string& what) {
  uint64_t expected = 8 + header.size();
  for (const auto* e : order) expected += e->nbytes;
  return write_temp_file(target, what, [&](FdWriter& out) {
    const uint64_t n = header.size();
    out.write(&n, 8);
    out.write(header.data(), header.size());
    for (const auto* e : order)
      if (e->nbytes) out.write(e->data, size_t(e->nbytes));
    MOELAB_CHECK(out.written() == expected, what, ": wrote ", out.written(), " bytes, expected ", expected);
  });
}
}  // namespace

void SafetensorsWriter::write(const std::string& path, bool overwrite) const {
  MOELAB_CHECK(!path.empty(), "safetensors writer: empty output path");
  const std::string what = "cannot write safetensors file " + path;
  const std::string h = header();
  make_parent(path, what);
  const std::string target = resolve_output_target(path, "safetensors file");
  if (!overwrite && path_exists(target))
    MOELAB_USAGE_FAIL("safetensors file ", path, " exists; refusing to replace it (overwrite not given)");
  const std::string tmp = stage(sorted(), h, target, what);
  try {
    commit_file(tmp, target, overwrite, what);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  fsync_dir(target, what);
}

// ---- sharded reader --------------------------------------------------------------------------

namespace {
std::string read_small_file(const std::string& path, const std::string& what, uint64_t limit) {
  const std::vector<char> v = read_regular_file(path, what, limit);
  return std::string(v.begin(), v.end());
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

ShardedSafetensorsReader::ShardedSafetensorsReader(const std::string& path) {
  std::error_code ec;
  std::string index, single;
  if (fs::is_directory(path, ec)) {
    const std::string idx = (fs::path(path) / "model.safetensors.index.json").string();
    const std::string one = (fs::path(path) / "model.safetensors").string();
    const bool has_idx = fs::exists(idx, ec), has_one = fs::exists(one, ec);
    if (has_idx && has_one)
      MOELAB_FAIL("checkpoint folder ", path, " holds both model.safetensors.index.json and "
                  "model.safetensors; which one is the checkpoint is ambiguous (remove one)");
    if (!has_idx && !has_one)
      MOELAB_FAIL("checkpoint folder ", path, " holds neither model.safetensors.index.json nor "
                  "model.safetensors");
    (has_idx ? index : single) = has_idx ? idx : one;
  } else if (ends_with(path, ".json")) {
    index = path;
  } else {
    single = path;
  }

  if (!single.empty()) {
    auto r = std::make_unique<SafetensorsReader>(single);
    for (const std::string& n : r->names()) weight_map_[n] = single;
    total_size_ = int64_t(r->file_size() - r->data_offset());
    shards_[single] = std::move(r);
    return;
  }

  index_path_ = index;
  const std::string what = "safetensors index " + index;
  const std::string text = read_small_file(index, what, kSafetensorsMaxHeader);
  nlohmann::json j;
  try {
    j = parse_json_strict(text, what, 16);
  } catch (const JsonDuplicateKey& d) {
    if (d.path.size() == 1 && d.path[0] == "weight_map")
      MOELAB_FAIL(what, ": weight_map lists tensor ", qname(d.key), " twice");
    throw;
  }
  if (!j.is_object()) MOELAB_FAIL(what, " is ", a_json_type(j), ", expected an object with weight_map");
  if (!j.contains("weight_map")) MOELAB_FAIL(what, " has no weight_map");
  const nlohmann::json& wm = j["weight_map"];
  if (!wm.is_object())
    MOELAB_FAIL(what, ": weight_map is ", a_json_type(wm), ", expected an object {tensor: shard file}");
  if (j.contains("metadata")) {
    const nlohmann::json& m = j["metadata"];
    if (!m.is_null() && !m.is_object()) MOELAB_FAIL(what, ": metadata is ", a_json_type(m), ", expected an object");
    if (m.is_object() && m.contains("total_size")) {
      const nlohmann::json& ts = m["total_size"];
      uint64_t u;
      if (json_uint(ts, u) && u <= uint64_t(std::numeric_limits<int64_t>::max())) {
        total_size_ = int64_t(u);
      } else if (ts.is_number_float() && ts.get<double>() >= 0 && ts.get<double>() < 9.2e18 &&
                 std::floor(ts.get<double>()) == ts.get<double>()) {
        total_size_ = int64_t(ts.get<double>());  // some writers store it as a float
      } else {
        MOELAB_FAIL(what, ": metadata.total_size ", dump_short(ts), " is not a non-negative integer");
      }
    }
  }
  const fs::path folder = fs::path(index).parent_path();
  std::map<std::string, std::string> first_tensor;  // shard -> a tensor it holds, for messages
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    if (!it.value().is_string())
      MOELAB_FAIL(what, ": weight_map[", qname(it.key()), "] is ", a_json_type(it.value()),
                  ", expected the name of a shard file");
    const std::string shard = it.value().get<std::string>();
    const fs::path sp(shard);
    bool bad = shard.empty() || sp.is_absolute() || shard.find('\0') != std::string::npos;
    for (const auto& part : sp)
      if (part == "..") bad = true;
    if (bad)
      MOELAB_FAIL(what, ": weight_map[", qname(it.key()), "] = ", qname(shard),
                  " is not a file name inside the index's folder");
    const std::string full = (folder / sp).string();
    weight_map_[it.key()] = full;
    first_tensor.emplace(full, it.key());
  }
  for (const auto& [shard, tensor] : first_tensor) {
    struct stat st;
    if (::stat(shard.c_str(), &st) != 0)
      MOELAB_FAIL(what, ": shard file ", shard, " (which holds tensor ", qname(tensor),
                  ", says the index) cannot be opened: ", errno_text(errno));
    if (!S_ISREG(st.st_mode))
      MOELAB_FAIL(what, ": shard ", shard, " (which holds tensor ", qname(tensor), ") is not a regular file");
  }
}

std::vector<std::string> ShardedSafetensorsReader::names() const {
  std::vector<std::string> v;
  for (const auto& kv : weight_map_) v.push_back(kv.first);
  return v;
}

const std::string& ShardedSafetensorsReader::shard_path(const std::string& name) const {
  auto it = weight_map_.find(name);
  if (it == weight_map_.end())
    MOELAB_FAIL("checkpoint ", index_path_.empty() ? std::string("file") : index_path_, " has no tensor ", qname(name));
  return it->second;
}

std::vector<std::string> ShardedSafetensorsReader::shard_paths() const {
  std::set<std::string> s;
  for (const auto& kv : weight_map_) s.insert(kv.second);
  return {s.begin(), s.end()};
}

const SafetensorsReader& ShardedSafetensorsReader::open_shard(const std::string& shard) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = shards_.find(shard);
  if (it != shards_.end()) return *it->second;
  auto r = std::make_unique<SafetensorsReader>(shard);
  const std::string idx = "safetensors index " + index_path_;
  for (const auto& [name, s] : weight_map_)
    if (s == shard && !r->has(name))
      MOELAB_FAIL(idx, ": tensor ", qname(name), " is listed for shard ", shard, ", but that shard does not hold it");
  for (const std::string& name : r->names()) {
    auto w = weight_map_.find(name);
    if (w == weight_map_.end())
      MOELAB_FAIL(idx, ": shard ", shard, " holds tensor ", qname(name), ", which the index does not list");
    if (w->second != shard)
      MOELAB_FAIL(idx, ": tensor ", qname(name), " is in shard ", shard, ", but the index maps it to ",
                  w->second, " (a tensor in two shards, or a wrong index)");
  }
  const SafetensorsReader& ref = *r;
  shards_[shard] = std::move(r);
  return ref;
}

const SafetensorsReader& ShardedSafetensorsReader::shard(const std::string& name) const {
  return open_shard(shard_path(name));
}

const SafetensorsTensorInfo& ShardedSafetensorsReader::info(const std::string& name) const {
  return shard(name).info(name);
}

std::span<const std::byte> ShardedSafetensorsReader::bytes(const std::string& name) const {
  return shard(name).bytes(name);
}

Tensor ShardedSafetensorsReader::to_tensor(const std::string& name, DType out) const {
  return shard(name).to_tensor(name, out);
}

void ShardedSafetensorsReader::copy_into(const std::string& name, const Tensor& dst) const {
  shard(name).copy_into(name, dst);
}

void ShardedSafetensorsReader::validate_all() const {
  for (const std::string& s : shard_paths()) open_shard(s);
}

// ---- sharded writer --------------------------------------------------------------------------

ShardedSafetensorsWriter::ShardedSafetensorsWriter(uint64_t max_shard_bytes) : max_shard_bytes_(max_shard_bytes) {
  MOELAB_CHECK(max_shard_bytes > 0, "sharded safetensors writer: the shard size limit must be > 0");
}

void ShardedSafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
  all_.set_metadata(key, value);  // checks
  for (auto& kv : metadata_)
    if (kv.first == key) {
      kv.second = value;
      return;
    }
  metadata_.emplace_back(key, value);
}

void ShardedSafetensorsWriter::add(const std::string& name, StDType dtype, const std::vector<int64_t>& shape,
                                   const void* data, uint64_t nbytes) {
  all_.add(name, dtype, shape, data, nbytes);
}

void ShardedSafetensorsWriter::add_view(const std::string& name, StDType dtype,
                                        const std::vector<int64_t>& shape, const void* data,
                                        uint64_t nbytes, std::shared_ptr<const void> owner) {
  all_.add_view(name, dtype, shape, data, nbytes, std::move(owner));
}

void ShardedSafetensorsWriter::add_tensor(const std::string& name, const Tensor& t) { all_.add_tensor(name, t); }

std::vector<std::string> ShardedSafetensorsWriter::write(const std::string& dir, bool overwrite) const {
  MOELAB_CHECK(!dir.empty(), "sharded safetensors writer: empty output folder");
  const std::string what = "cannot write safetensors checkpoint " + dir;
  // Split in insertion order.
  std::vector<std::vector<const SafetensorsWriter::Entry*>> groups(1);
  uint64_t in_group = 0;
  for (const auto& e : all_.entries()) {
    if (!groups.back().empty() && in_group + e.nbytes > max_shard_bytes_) {
      groups.emplace_back();
      in_group = 0;
    }
    groups.back().push_back(&e);
    in_group += e.nbytes;
  }
  const size_t n = groups.size();
  std::vector<std::string> files;
  for (size_t i = 0; i < n; ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, n);
    files.push_back((fs::path(dir) / (n == 1 ? std::string("model.safetensors") : std::string(name))).string());
  }
  if (n > 1) files.push_back((fs::path(dir) / "model.safetensors.index.json").string());

  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) MOELAB_FAIL(what, ": cannot create folder ", dir, ": ", ec.message());
  std::vector<std::string> targets;
  for (const std::string& f : files) {
    targets.push_back(resolve_output_target(f, "safetensors file"));
    if (!overwrite && path_exists(targets.back()))
      MOELAB_USAGE_FAIL("safetensors checkpoint ", dir, ": ", f, " exists; refusing to replace it (overwrite not given)");
  }

  std::vector<std::string> staged;
  size_t committed = 0;
  try {
    uint64_t total = 0;
    std::string index;
    if (n > 1) index = "{\n  \"metadata\": {\n    \"total_size\": ";
    std::map<std::string, std::string> weight_map;
    for (size_t i = 0; i < n; ++i) {
      SafetensorsWriter w;
      for (const auto& [k, v] : metadata_) w.set_metadata(k, v);
      for (const auto* e : groups[i]) {
        w.add_view(e->name, e->dtype, e->shape, e->data, e->nbytes, e->owner);
        weight_map[e->name] = fs::path(files[i]).filename().string();
        total += e->nbytes;
      }
      staged.push_back(stage(w.sorted(), w.header(), targets[i], what));
    }
    if (n > 1) {
      index += std::to_string(total) + "\n  },\n  \"weight_map\": {";
      bool first = true;
      for (const auto& [name, file] : weight_map) {  // sorted by code point, as sort_keys
        index += first ? "\n    " : ",\n    ";
        first = false;
        put_py_json_string(index, name);
        index += ": ";
        put_py_json_string(index, file);
      }
      index += "\n  }\n}\n";
      staged.push_back(write_temp_file(targets.back(), what, [&](FdWriter& out) {
        out.write(index.data(), index.size());
      }));
    }
    for (; committed < staged.size(); ++committed)
      commit_file(staged[committed], targets[committed], overwrite, what);
  } catch (const Error& e) {
    for (size_t i = committed; i < staged.size(); ++i) ::unlink(staged[i].c_str());
    if (committed == 0) throw;
    std::string done;
    for (size_t i = 0; i < committed; ++i) {
      if (i) done += ", ";
      done += files[i];
    }
    MOELAB_FAIL(e.what(), " (", committed, " of ", staged.size(), " files were already renamed into place: ", done, ")");
  } catch (...) {
    for (size_t i = committed; i < staged.size(); ++i) ::unlink(staged[i].c_str());
    throw;
  }
  fsync_dir(targets.back(), what);
  return files;
}

}  // namespace moelab
