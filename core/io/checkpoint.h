// moelab: the checkpoint container. A file of named CPU tensors, word blobs (RNG state, data
// position, ...) and string metadata, independent of the model: the trainer decides what goes in.
// Since format 2 the file is a safetensors file (docs/checkpoints.md), so standard tools open it:
// `safetensors.safe_open(path, "np")`, Hugging Face's viewers, or analysis/moelab_analysis
// (load_checkpoint) with numpy alone. Format 1 (moelab's own binary layout, below) is still read.
//
// Guarantees
//   - Bit-exact: tensors are stored as their raw bytes (f64, f32, bf16, i32), blobs as raw
//     64-bit words, metadata as raw strings; reading gives back exactly what was written.
//   - Verified: CheckpointReader checks the whole file when it is opened (a SHA-256 of every
//     tensor and blob and of the header) and refuses, with a message that names the file, a file
//     that is no moelab checkpoint ("is not a moelab checkpoint"), a newer format version, a
//     truncated file ("is truncated (expected N bytes, found M)"), bytes appended ("trailing
//     garbage"), a flipped byte ("checksum mismatch in tensor 'layer0.w1'", "... in the header")
//     and a tensor of another shape or dtype than the caller expects (the message names the
//     tensor and both shapes/dtypes).
//   - Atomic: CheckpointWriter::write(path) creates the parent folders, writes `path.tmp` in the
//     same folder, fsyncs it, rename()s it over `path` (atomic on POSIX) and fsyncs the folder.
//     A crash or an I/O error mid-write never touches an existing `path`; on error the tmp file
//     is removed and moelab::Error names the path. A stale `path.tmp` left by a crash is simply
//     overwritten (and latest_checkpoint() never picks one). Writes go through POSIX
//     write()/fsync() on a file descriptor, so there is no stdio buffer to fflush. Fault sites
//     (core/io/fault.h): ckpt.open, ckpt.write, ckpt.fsync, ckpt.close, ckpt.rename.
//   - Memory: the reader maps the file (SafetensorsReader, mmap) instead of reading it, verifies
//     tensor by tensor and drops each tensor's pages again (madvise), so a checkpoint is never held
//     twice; tensor() copies one tensor out of the mapping and drops its pages again (reading a
//     100 MB checkpoint tensor by tensor peaks at 9 MB resident; format 1 held the whole file).
//   - Cost: SHA-256 runs on the CPU's SHA instructions where it has them (about 1 GB/s a core,
//     0.15-0.3 GB/s without); tensors are hashed on up to 8 threads. Figures for a 100 MB
//     checkpoint against format 1: docs/checkpoints.md.
//
// File format 2: a safetensors file (core/io/safetensors.h; written with SafetensorsWriter's
// header, so tensors are sorted by dtype then name and aligned, byte for byte what the reference
// Python writer makes). All checkpoint bookkeeping lives in `__metadata__` under keys starting
// with "checkpoint." (reserved: set_meta refuses them):
//     checkpoint.format          "moelab"
//     checkpoint.version         "2"
//     checkpoint.order           JSON array of the safetensors tensor names in the order they
//                                were added (names() gives this order back)
//     checkpoint.sha256.NAME     SHA-256 (64 lower-case hex digits) of tensor NAME's bytes
//     checkpoint.file_size       the file's size in bytes, 20 decimal digits (zero-padded)
//     checkpoint.header_sha256   SHA-256 of the first 8 + N bytes (the length and the JSON header)
//                                with these 64 hex digits replaced by '0' (the header covers
//                                every other key, so every tensor's hash too)
//     checkpoint.meta_hex.HEX    a meta entry whose key or value is not valid UTF-8 (safetensors
//                                metadata must be): HEX is the key in hex, the value in hex
//   Every other metadata key is a set_meta() key with its value, verbatim (config, step, run_id,
//   kind, moelab_version, ...). Tensors keep their names and dtypes (F64, F32, BF16, I32; a
//   moelab shape of rank 0..4); a blob NAME is a U64 tensor "__blob__.NAME" of shape [words].
//   Reading checks, in order: the 8-byte header length (plausible, inside the file), the header
//   checksum, the recorded size against the actual size (truncated / trailing bytes), every check
//   of SafetensorsReader (docs/safetensors.md), format and version, checkpoint.order against the
//   tensors, each tensor's dtype/rank and checksum.
//
// File format 1 (written by moelab before format 2; read only). All integers little-endian;
// "hash" is FNV-1a 64 (fnv1a64 below: h = 0xcbf29ce484222325; for each byte b: h ^= b;
// h *= 0x100000001b3).
//
//   header, 32 bytes (this layout and its hash are frozen across format versions, so a reader
//   can trust the version field once the hash matches):
//     0  char[8]  magic "MOELABCK"
//     8  u32      format version (1)
//    12  u32      header size in bytes (32)
//    16  u64      total file size in bytes (lets a truncated file be told apart from a corrupt one)
//    24  u64      hash of bytes [0, 24)
//   entries, back to back, each:
//     0  u8       kind: 1 tensor, 2 blob, 3 meta
//     1  u8       dtype (tensors): 0 f64, 1 f32, 2 bf16, 3 i32; 255 for blobs and meta
//     2  u8       ndim (tensors, 0..4); 0 otherwise
//     3  u8       reserved, 0
//     4  u32      name length in bytes (1..65536)
//     8  i64[4]   shape, unused dimensions 0
//    40  u64      payload length in bytes (tensors: numel * dtype size; blobs: 8 * words;
//                 meta: the value's length)
//    48  name bytes (UTF-8, not NUL-terminated)
//        u64 hash of the 48 header bytes and the name (so lengths and name are verified before
//            they are used, and error messages can trust the name)
//        payload bytes
//        u64 hash of the payload
//   trailer, 24 bytes:
//     0  char[8]  "CKPT_END"
//     8  u64      number of entries
//    16  u64      hash of every byte of the file before this field
//
// Entries: tensors and blobs in the order they were added, then meta keys sorted. Reading
// checks, in order: magic, header hash, version, recorded size against the actual size
// (truncated / trailing bytes), each entry's header hash and payload hash, the trailer. The
// format is told by content: a file starting with "MOELABCK" is format 1, anything else is
// read as format 2. tests/golden/checkpoint/v1_*.ckpt are files of the format-1 writer.
//
// Tensors and blobs share one namespace of names (has(), names()); meta keys have their own.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace moelab {

class SafetensorsReader;

constexpr char kCheckpointMagic[8] = {'M', 'O', 'E', 'L', 'A', 'B', 'C', 'K'};  // format 1
constexpr uint32_t kCheckpointVersion = 2;  // the format written
constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ull;
// Format 2: the safetensors name of blob NAME is kCheckpointBlobPrefix + NAME; metadata keys
// starting with kCheckpointReservedMeta belong to the format.
constexpr const char* kCheckpointBlobPrefix = "__blob__.";
constexpr const char* kCheckpointReservedMeta = "checkpoint.";

// FNV-1a 64 of `n` bytes, continuing from `h` (pass a previous result to hash in pieces). The
// checksum of format 1.
uint64_t fnv1a64(const void* data, size_t n, uint64_t h = kFnvOffset);

class CheckpointWriter {
 public:
  // String metadata (config text, step, model shape, ...). Setting a key again replaces it.
  // Keys starting with "checkpoint." are the format's and refused.
  void set_meta(const std::string& key, const std::string& value);
  // A CPU tensor; its bytes are copied now. Throws if the name is taken, is not valid UTF-8,
  // starts with "__blob__.", or the tensor is not on the CPU.
  void add_tensor(const std::string& name, const Tensor& host_tensor);
  // The same without copying: the tensor's storage is kept alive and its bytes are read by
  // write(), so the caller must not change them before (an import that writes a large model
  // once then holds it once, not twice).
  void add_tensor_ref(const std::string& name, const Tensor& host_tensor);
  // 64-bit words (RNG state, data position, ...). Throws if the name is taken or not UTF-8.
  void add_blob(const std::string& name, const std::vector<uint64_t>& words);
  // Writes everything added so far to `path` atomically (see above). May be called again.
  void write(const std::string& path) const;

 private:
  struct Entry {
    uint8_t kind = 0;
    DType dtype = DType::F32;
    Shape shape;
    std::string name;
    std::vector<char> payload;  // the bytes (a copy), or
    Tensor ref;                 // the tensor whose bytes are written (add_tensor_ref)
    bool by_ref = false;
    const char* data() const { return by_ref ? static_cast<const char*>(ref.data()) : payload.data(); }
    size_t size() const { return by_ref ? ref.nbytes() : payload.size(); }
  };
  void check_new_name(const std::string& name, const char* what) const;
  std::vector<Entry> entries_;               // tensors and blobs, in insertion order
  std::map<std::string, std::string> meta_;  // sorted by key
};

class CheckpointReader {
 public:
  // Opens and verifies the whole file (either format); throws moelab::Error naming the file on
  // any defect.
  explicit CheckpointReader(const std::string& path);

  const std::string& path() const { return path_; }
  // 1 (moelab's binary layout) or 2 (safetensors).
  int format_version() const { return version_; }
  // The value of a meta key; throws naming the key and the file if absent.
  std::string meta(const std::string& key) const;
  bool has_meta(const std::string& key) const;
  std::vector<std::string> meta_keys() const;  // sorted

  // Whether a tensor or blob of that name exists.
  bool has(const std::string& name) const;
  bool is_tensor(const std::string& name) const;
  // Tensor and blob names, in the order they were added.
  std::vector<std::string> names() const;

  // A new CPU tensor with the stored bytes. Throws, naming the tensor, the file and both
  // shapes/dtypes, if the stored tensor's shape or dtype is not the expected one; throws naming
  // the tensor and the file if it is absent or is a blob.
  Tensor tensor(const std::string& name, Shape expected_shape, DType expected_dtype) const;
  // The stored shape/dtype of a tensor, for callers that discover rather than expect.
  Shape tensor_shape(const std::string& name) const;
  DType tensor_dtype(const std::string& name) const;
  // The words of a blob; throws naming it and the file if absent or a tensor.
  std::vector<uint64_t> blob(const std::string& name) const;

 private:
  struct Entry {
    uint8_t kind = 0;
    DType dtype = DType::F32;
    Shape shape;
    std::string name;
    std::string stored_name;  // format 2: the safetensors name ("__blob__.NAME" for a blob)
    size_t offset = 0;        // format 1: of the payload in bytes_
    size_t length = 0;
  };
  void read_v1();
  void read_v2(int fd, uint64_t size);
  const Entry& find(const std::string& name, const char* wanted) const;
  const char* payload(const Entry& e) const;

  std::string path_;
  int version_ = 0;
  std::vector<char> bytes_;                      // format 1: the whole file
  std::shared_ptr<const SafetensorsReader> st_;  // format 2: the mapped file (shared by copies)
  std::vector<Entry> entries_;
  std::map<std::string, size_t> index_;  // name -> entries_ index
  std::map<std::string, std::string> meta_;
};

// dir + "/step_%06lld.ckpt" (no doubled '/' when dir ends with one). Throws if step < 0.
std::string checkpoint_path(const std::string& dir, int64_t step);
// The checkpoint of the highest step in `dir`: regular files named step_<6+ digits>.ckpt
// (so stale `.tmp` files are ignored). "" if there is none or `dir` does not exist.
std::string latest_checkpoint(const std::string& dir);
// The step in a checkpoint's file name: the digits after the last "step_" in the name (DESIGN.md:
// the name contains the zero-padded step). Throws naming the path if there is none.
int64_t checkpoint_step(const std::string& path);

}  // namespace moelab
