// moelab: safetensors files (Hugging Face's tensor container), read memory-mapped and written
// atomically; sharded checkpoints with `model.safetensors.index.json`. docs/safetensors.md
// describes the format and every check.
//
// Format: 8 bytes N (u64 little-endian), N bytes of JSON header, then the data buffer. The header
// is an object {"NAME": {"dtype": "F32", "shape": [2, 3], "data_offsets": [BEGIN, END]}, ...}
// with an optional "__metadata__": {string: string}; offsets are relative to the data buffer,
// END one past the last byte. The tensors must tile the buffer exactly (no gap, no overlap, no
// trailing byte), as the reference implementation (huggingface/safetensors) requires.
//
// Reading (SafetensorsReader): the file is mmap()ed read-only once; the header is parsed and
// checked completely before anything is handed out, so a pointer the reader gives is always in
// bounds. Nothing is read twice: bytes() is a view into the mapping, and to_tensor()/copy_into()
// convert straight from the mapping into the destination (release() drops a tensor's pages
// from the process afterwards). Refusals are moelab::Error naming the file and, where there is
// one, the tensor.
//
// Writing (SafetensorsWriter): the same bytes as the reference Python writer
// (safetensors.torch.save_file): tensors sorted by dtype (8-byte types first, the reference's
// order) then name, compact JSON, header padded with spaces to a multiple of 8, so every tensor
// is aligned to its element size when the data starts 8-aligned. The file goes to a new
// temporary file beside the target, is fsync()ed and renamed over the target; an existing target
// is refused unless `overwrite` is set (the refusal is atomic: rename without replace). On any
// error the temporary file is removed and the target is untouched.
//
// Caveat of memory mapping: a file that another process truncates while it is mapped makes the
// reading process crash (SIGBUS) when it touches the lost pages. moelab's writers never truncate
// in place (they rename a new file over the old one, which leaves the mapping valid).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace moelab {

// Every dtype of the reference implementation, in its order (the writer sorts by it, largest
// alignment first). F4 and F6 are sub-byte types: a tensor of them must fill whole bytes.
enum class StDType {
  BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ,
  I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64
};
const char* to_string(StDType dt);   // "F32", ...
int st_dtype_bits(StDType dt);       // bits per element
// The dtype named `name` (exactly as in a header: "BF16"); false if there is none.
bool st_dtype_from_name(const std::string& name, StDType& dt);
// moelab's dtype <-> safetensors' (F64, F32, BF16, I32 map one to one).
StDType st_dtype_of(DType dt);

// The stated maximum header size of the reference implementation (100 MB).
constexpr uint64_t kSafetensorsMaxHeader = 100'000'000;

struct SafetensorsTensorInfo {
  std::string name;
  StDType dtype = StDType::F32;
  std::vector<int64_t> shape;  // [] for a 0-d tensor
  int64_t numel = 1;
  uint64_t begin = 0, end = 0;  // data_offsets: relative to the data buffer
  uint64_t nbytes() const { return end - begin; }
};

class SafetensorsReader {
 public:
  // Maps and validates the whole header (see docs/safetensors.md for the checks).
  explicit SafetensorsReader(const std::string& path);
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  uint64_t header_size() const { return header_len_; }  // N
  uint64_t data_offset() const { return 8 + header_len_; }

  // Tensor names in file order (increasing offsets).
  std::vector<std::string> names() const;
  size_t size() const { return tensors_.size(); }
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  // Throws naming the tensor and the file if absent.
  const SafetensorsTensorInfo& info(const std::string& name) const;

  // The stored bytes, a view into the mapping (valid while the reader lives). Tensors written by
  // the reference writer are aligned to their element size; others need not be (copy with
  // memcpy, as the converters here do).
  std::span<const std::byte> bytes(const std::string& name) const;

  // "__metadata__": has_metadata() is false when the header has none (or null).
  bool has_metadata() const { return has_metadata_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // A new CPU tensor of dtype `out` (F64, F32, BF16 or I32) holding the stored values converted:
  // floats from F64/F32/F16/BF16 (rounded to nearest even, once, when `out` is narrower),
  // integers and BOOL exactly (to I32 only when every value fits; floats never to I32). A 0-d
  // tensor becomes shape [1] (moelab tensors have rank >= 1); rank > 4 is refused. Same dtype:
  // a byte copy. Throws naming the tensor, the file and both dtypes when there is no conversion
  // (F8, F4, F6, C64, ...).
  Tensor to_tensor(const std::string& name, DType out) const;
  // The same conversion into an existing CPU tensor (a model parameter, say) whose shape must be
  // the stored shape ([1] for a 0-d tensor); no intermediate copy.
  void copy_into(const std::string& name, const Tensor& dst) const;
  // Tells the kernel this process is done with the tensor's pages (madvise DONTNEED on the whole
  // pages inside it): streaming a checkpoint tensor by tensor then keeps the resident set small.
  // The bytes stay readable (they are paged in again on access).
  void release(const std::string& name) const;

 private:
  void parse_header(const char* text, size_t n);
  std::string where(const std::string& tensor) const;  // "safetensors file P: tensor 'x'"

  std::string path_;
  int fd_ = -1;
  void* map_ = nullptr;
  uint64_t size_ = 0;
  uint64_t header_len_ = 0;
  std::vector<SafetensorsTensorInfo> tensors_;  // sorted by offsets
  std::map<std::string, size_t> index_;
  bool has_metadata_ = false;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsWriter {
 public:
  // "__metadata__" entries (written sorted by key). Keys and values must be valid UTF-8.
  void set_metadata(const std::string& key, const std::string& value);
  // A tensor from raw bytes, copied now. `nbytes` must be what dtype and shape need. Names must
  // be non-empty valid UTF-8, not "__metadata__", and unique.
  void add(const std::string& name, StDType dtype, const std::vector<int64_t>& shape,
           const void* data, uint64_t nbytes);
  // The same without copying: `data` is read at write(); `owner` (may be null) is kept alive
  // until then; the caller keeps the bytes unchanged.
  void add_view(const std::string& name, StDType dtype, const std::vector<int64_t>& shape,
                const void* data, uint64_t nbytes, std::shared_ptr<const void> owner);
  // A CPU tensor, not copied (the Tensor keeps its storage alive; its bytes are read at write()).
  void add_tensor(const std::string& name, const Tensor& host_tensor);

  size_t size() const { return entries_.size(); }
  uint64_t data_bytes() const;  // the data buffer's size
  // The header as it will be written: JSON padded with spaces to a multiple of 8 (what the
  // 8-byte length counts). Throws if it exceeds kSafetensorsMaxHeader.
  std::string header() const;
  uint64_t file_size() const { return 8 + header().size() + data_bytes(); }

  // Writes the file atomically (see above). Refuses an existing `path` (moelab::UsageError
  // naming it) unless `overwrite`; a symlink is written through, and a path that exists but is
  // not a regular file is refused (core/io/output_file.h). Creates missing parent folders.
  void write(const std::string& path, bool overwrite = false) const;

  struct Entry {
    std::string name;
    StDType dtype = StDType::F32;
    std::vector<int64_t> shape;
    const std::byte* data = nullptr;
    uint64_t nbytes = 0;
    std::shared_ptr<const void> owner;
  };
  // The tensors in the order they were added.
  const std::vector<Entry>& entries() const { return entries_; }
  // The tensors in the order they are written (the reference's): dtype descending in StDType
  // order, then name.
  std::vector<const Entry*> sorted() const;

 private:
  void add_entry(Entry e);
  std::map<std::string, std::string> metadata_;
  bool has_metadata_ = false;
  std::vector<Entry> entries_;
  std::map<std::string, size_t> names_;
};

// A checkpoint of one or more safetensors files: `model.safetensors.index.json`
// ({"metadata": {"total_size": ...}, "weight_map": {tensor: shard file}}) beside its shards, or a
// single model.safetensors. Shards are opened when first needed; opening one checks it against
// the index: every tensor the index maps to it is there, and it holds no tensor that the index
// does not map to it (which also finds a tensor stored in two shards). Thread-safe.
class ShardedSafetensorsReader {
 public:
  // `path`: an index json, a single .safetensors file, or a folder holding exactly one of
  // model.safetensors.index.json and model.safetensors. The index is checked now (valid JSON,
  // no duplicate key, weight_map of strings naming plain files in the index's folder) and so is
  // the existence of every shard file; shard headers are read lazily.
  explicit ShardedSafetensorsReader(const std::string& path);

  const std::string& index_path() const { return index_path_; }  // "" for a single file
  std::vector<std::string> names() const;  // sorted
  bool has(const std::string& name) const { return weight_map_.count(name) != 0; }
  // The shard file (full path) that holds `name`; throws naming it if absent.
  const std::string& shard_path(const std::string& name) const;
  std::vector<std::string> shard_paths() const;  // sorted, unique
  // The index's metadata.total_size, or -1 when it has none.
  int64_t total_size() const { return total_size_; }

  // The open shard reader holding `name` (opened and checked on first use).
  const SafetensorsReader& shard(const std::string& name) const;
  const SafetensorsTensorInfo& info(const std::string& name) const;
  std::span<const std::byte> bytes(const std::string& name) const;
  Tensor to_tensor(const std::string& name, DType out) const;
  void copy_into(const std::string& name, const Tensor& dst) const;
  // Opens and checks every shard.
  void validate_all() const;

 private:
  const SafetensorsReader& open_shard(const std::string& shard) const;
  std::string index_path_;
  std::map<std::string, std::string> weight_map_;  // tensor -> shard path
  int64_t total_size_ = -1;
  mutable std::mutex mu_;
  mutable std::map<std::string, std::unique_ptr<SafetensorsReader>> shards_;
};

// Writes a checkpoint split into shards of at most `max_shard_bytes` of tensor data each (a
// tensor larger than that gets a shard of its own), in the order tensors were added:
// DIR/model-00001-of-0000N.safetensors ... and DIR/model.safetensors.index.json (Hugging Face's
// names and index layout: json.dumps(indent=2, sort_keys=True) + "\n"); one shard is written as
// DIR/model.safetensors with no index. Every file is first written to a temporary file and
// fsync()ed; only when all are on disk are they renamed into place, the index last. Existing
// targets are refused (all checked before anything is written) unless `overwrite`.
class ShardedSafetensorsWriter {
 public:
  explicit ShardedSafetensorsWriter(uint64_t max_shard_bytes);
  // Metadata written into every shard (Hugging Face writes {"format": "pt"}).
  void set_metadata(const std::string& key, const std::string& value);
  void add(const std::string& name, StDType dtype, const std::vector<int64_t>& shape,
           const void* data, uint64_t nbytes);
  void add_view(const std::string& name, StDType dtype, const std::vector<int64_t>& shape,
                const void* data, uint64_t nbytes, std::shared_ptr<const void> owner);
  void add_tensor(const std::string& name, const Tensor& host_tensor);
  // The files written (shards, then the index if any), full paths.
  std::vector<std::string> write(const std::string& dir, bool overwrite = false) const;

 private:
  uint64_t max_shard_bytes_;
  std::vector<std::pair<std::string, std::string>> metadata_;
  SafetensorsWriter all_;  // every tensor, checked as it is added
};

}  // namespace moelab
