// moelab: the NCCL communicator (backends/cuda/nccl_comm.h): non-blocking NCCL communicators,
// every call waited for on the host with NCCL's async error state, the peers' failure state and
// the timeout polled meanwhile, so that no call hangs.
#include "backends/cuda/nccl_comm.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nccl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <mutex>
#include <sstream>
#include <thread>

#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/cuda_common.cuh"

namespace moelab {

namespace {

using Clock = std::chrono::steady_clock;
using cuda::bf16_t;

// ---- kernels: bf16 <-> f32 for fp32 sums, and the rank-order sum of gathered parts ----------

__global__ void k_bf16_to_f32(const bf16_t* in, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __bfloat162float(in[i]);
}
__global__ void k_f32_to_bf16(const float* in, bf16_t* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}
// out[i] = ((parts[0][i] + parts[1][i]) + parts[2][i]) + ..., accumulated in Acc (double for
// f64, float for f32 and bf16), rounded to T once.
template <class T, class Acc>
__device__ Acc load_acc(T v) { return Acc(v); }
template <>
__device__ float load_acc<bf16_t, float>(bf16_t v) { return __bfloat162float(v); }
template <class T, class Acc>
__device__ T store_acc(Acc v) { return T(v); }
template <>
__device__ bf16_t store_acc<bf16_t, float>(float v) { return __float2bfloat16_rn(v); }

template <class T, class Acc>
__global__ void k_sum_ranks(const T* parts, T* out, int64_t n, int ranks) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    Acc acc = load_acc<T, Acc>(parts[i]);
    for (int s = 1; s < ranks; ++s) acc = acc + load_acc<T, Acc>(parts[int64_t(s) * n + i]);
    out[i] = store_acc<T, Acc>(acc);
  }
}

// ---- helpers --------------------------------------------------------------------------------

ncclDataType_t nccl_dtype(DType dt) {
  switch (dt) {
    case DType::F64: return ncclFloat64;
    case DType::F32: return ncclFloat32;
    case DType::BF16: return ncclBfloat16;
    case DType::I32: return ncclInt32;
  }
  return ncclFloat32;
}

// Sets the device for a scope and restores the caller's.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
    CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
};

ncclConfig_t make_config(const char* name, bool blocking) {
  ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
  cfg.blocking = blocking ? 1 : 0;
  cfg.commName = name;
  return cfg;
}

// The environment NCCL reads once, at its first initialisation in the process:
//   - NVLink multicast must stay off (it can take a shared host's GPUs out of service):
//     NCCL_NVLS_ENABLE=0 whatever the caller had;
//   - NCCL_RUNTIME_CONNECT=0 unless the caller set it: rings and trees are connected during
//     initialisation (which has a timeout here), not by the first collective that uses them
//     (which, on a blocking communicator, could wait without end for a peer that has gone).
void nvls_off() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* v = std::getenv("NCCL_NVLS_ENABLE");
    if (v != nullptr && std::strcmp(v, "0") != 0)
      std::fprintf(stderr, "moelab: NCCL_NVLS_ENABLE=%s overridden to 0 (NVLink multicast stays off)\n", v);
    setenv("NCCL_NVLS_ENABLE", "0", 1);
    setenv("NCCL_RUNTIME_CONNECT", "0", 0);
  });
  const char* v = std::getenv("NCCL_NVLS_ENABLE");
  MOELAB_CHECK(v != nullptr && std::strcmp(v, "0") == 0,
               "NCCL_NVLS_ENABLE was changed to '", v ? v : "", "' after moelab set it to 0; refused");
}

// A call on a helper thread (on `device`) that the caller can stop waiting for: a blocking NCCL
// call cannot be polled, so the caller watches the clock and the peers meanwhile.
struct HelperCall {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  ncclResult_t result = ncclSuccess;

  static std::shared_ptr<HelperCall> start(int device, std::function<ncclResult_t()> fn) {
    auto st = std::make_shared<HelperCall>();
    std::thread([st, device, fn = std::move(fn)] {
      cudaSetDevice(device);
      const ncclResult_t r = fn();
      {
        std::lock_guard<std::mutex> lk(st->mu);
        st->result = r;
        st->done = true;
      }
      st->cv.notify_all();
    }).detach();
    return st;
  }
  // True once the call has returned (then `result` holds its value); waits up to `seconds`.
  bool wait_for(double seconds) {
    std::unique_lock<std::mutex> lk(mu);
    return cv.wait_for(lk, std::chrono::duration<double>(seconds), [&] { return done; });
  }
};

// ncclCommAbort on a helper thread, waited for at most `seconds`: recent NCCL versions
// synchronise the ranks of a node even in an abort, so it can block when a peer never aborts.
// Returns false (and leaves the thread and the communicator behind) when it did not return.
bool abort_bounded(ncclComm_t comm, int device, double seconds) noexcept {
  if (comm == nullptr) return true;
  try {
    return HelperCall::start(device, [comm] { return ncclCommAbort(comm); })->wait_for(seconds);
  } catch (...) {
    return false;
  }
}

std::string host_name() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "?";
  return buf;
}

bool file_exists(const std::string& path) {
  struct stat s;
  return ::stat(path.c_str(), &s) == 0;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

// Writes `text` to `path` atomically (a temporary beside it, then rename). False on failure.
bool write_atomic(const std::string& path, const std::string& text) noexcept {
  try {
    const std::string tmp = path + ".tmp." + std::to_string(::getpid());
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (f == nullptr) return false;
    const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
    if (std::fclose(f) != 0 || !ok) {
      std::remove(tmp.c_str());
      return false;
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      std::remove(tmp.c_str());
      return false;
    }
    return true;
  } catch (...) {
    return false;
  }
}

// Whether process `pid` of this host still runs (a zombie counts as exited).
bool process_alive(long pid) {
  if (pid <= 0) return true;  // unknown: assume alive
  if (::kill(pid_t(pid), 0) != 0 && errno == ESRCH) return false;
  const std::string stat = read_file("/proc/" + std::to_string(pid) + "/stat");
  const size_t p = stat.rfind(')');
  if (p != std::string::npos && p + 2 < stat.size() && stat[p + 2] == 'Z') return false;
  return true;
}

// ---- the world: failure state shared by the communicators of one process --------------------

struct NcclWorld {
  NcclWorld(int n, double timeout) : size(n), timeout_s(timeout), failed(size_t(n), 0), reason(size_t(n)) {}
  ~NcclWorld();

  const int size;
  const double timeout_s;
  std::mutex mu;
  std::vector<char> failed;         // per world rank, as known in this process
  std::vector<std::string> reason;  // per world rank
  int first_failed = -1;

  // File launch (one rank per process): the id file and the peers' pid and host.
  std::string id_file;  // "" for a single-process world
  int my_rank = -1;
  std::string host;
  struct Peer {
    long pid = 0;
    std::string host;
  };
  std::vector<Peer> peers;

  // Communicators whose ncclCommFinalize has been called; destroyed when the world ends, so
  // that communicators of one process may be destroyed in any order from one thread
  // (ncclCommDestroy is an intra-node collective).
  struct Finalizing {
    ncclComm_t comm;
    int device;
  };
  std::vector<Finalizing> finalizing;  // non-blocking communicators, ncclCommFinalize called
  std::vector<Finalizing> to_destroy;  // blocking communicators

  std::string rank_file(int r) const { return id_file + ".rank" + std::to_string(r); }
  std::string failed_file(int r) const { return rank_file(r) + ".failed"; }

  void mark_failed(int world_rank, const std::string& why) noexcept {
    try {
      {
        std::lock_guard<std::mutex> lk(mu);
        if (failed[size_t(world_rank)]) return;
        failed[size_t(world_rank)] = 1;
        reason[size_t(world_rank)] = why;
        if (first_failed < 0) first_failed = world_rank;
      }
      if (!id_file.empty()) write_atomic(failed_file(world_rank), why);
    } catch (...) {
    }
  }
  bool any_failed() {
    std::lock_guard<std::mutex> lk(mu);
    return first_failed >= 0;
  }
  // The failed peer known in this process ("" if none): {world rank, reason}.
  bool peer_failed(int me, int& who, std::string& why) {
    std::lock_guard<std::mutex> lk(mu);
    if (first_failed < 0 || first_failed == me) return false;
    who = first_failed;
    why = reason[size_t(who)];
    return true;
  }
  // File launch: a peer's failure file, or a peer on this host whose process is gone.
  bool peer_failed_on_disk(int me, int& who, std::string& why) {
    if (id_file.empty()) return false;
    for (int r = 0; r < size; ++r) {
      if (r == me) continue;
      if (file_exists(failed_file(r))) {
        who = r;
        why = read_file(failed_file(r));
        return true;
      }
      const Peer& p = peers.empty() ? Peer{} : peers[size_t(r)];
      if (!p.host.empty() && p.host == host && !process_alive(p.pid)) {
        who = r;
        why = detail::concat("its process (pid ", p.pid, " on ", p.host, ") exited without reporting a reason");
        return true;
      }
    }
    return false;
  }
};

NcclWorld::~NcclWorld() {
  int prev = -1;
  if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
  // Wait for every finalising communicator (they progress together), then free them.
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(std::min(timeout_s, 60.0)));
  for (Finalizing& f : finalizing) {
    cudaSetDevice(f.device);
    ncclResult_t st = ncclInProgress;
    while (ncclCommGetAsyncError(f.comm, &st) == ncclSuccess && st == ncclInProgress && Clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    if (st == ncclSuccess) {
      ncclCommDestroy(f.comm);
    } else {
      abort_bounded(f.comm, f.device, 10);
    }
  }
  // Blocking communicators: ncclCommDestroy (an intra-node collective) of all at once.
  std::vector<std::shared_ptr<HelperCall>> calls;
  for (Finalizing& f : to_destroy) {
    ncclComm_t c = f.comm;
    calls.push_back(HelperCall::start(f.device, [c] { return ncclCommDestroy(c); }));
  }
  for (auto& c : calls) {
    const double left = std::chrono::duration<double>(deadline - Clock::now()).count();
    if (!c->wait_for(std::max(left, 0.1))) break;  // left behind: the process is ending its use of NCCL
  }
  if (!id_file.empty() && my_rank >= 0) std::remove(rank_file(my_rank).c_str());
  if (prev >= 0) cudaSetDevice(prev);
}

// ---- the communicator -----------------------------------------------------------------------

class NcclComm final : public NcclCommunicator {
 public:
  NcclComm(ncclComm_t comm, int device, int rank, int size, std::shared_ptr<NcclWorld> world,
           std::vector<int> world_ranks, const NcclOptions& opts, bool is_world)
      : comm_(comm), device_(device), rank_(rank), size_(size), world_(std::move(world)),
        world_ranks_(std::move(world_ranks)), opts_(opts), is_world_(is_world) {
    try {
      DeviceGuard g(device_);
      CUDA_CHECK(cudaStreamCreateWithFlags(&own_stream_, cudaStreamNonBlocking));
      CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
      stream_ = own_stream_;
    } catch (...) {
      abort_bounded(comm_, device_, 10);
      comm_ = nullptr;
      release();
      throw;
    }
  }

  ~NcclComm() override {
    int prev = -1;
    if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
    cudaSetDevice(device_);
    if (comm_ != nullptr) {
      // A healthy world finalises (peers flush together) and is destroyed with the world; after
      // a failure the peers may never finalise, so abort.
      if (world_->any_failed()) {
        abort_bounded(comm_, device_, 10);
      } else if (opts_.blocking) {
        std::lock_guard<std::mutex> lk(world_->mu);
        world_->to_destroy.push_back({comm_, device_});
      } else {
        const ncclResult_t r = ncclCommFinalize(comm_);
        if (r == ncclSuccess || r == ncclInProgress) {
          std::lock_guard<std::mutex> lk(world_->mu);
          world_->finalizing.push_back({comm_, device_});
        } else {
          abort_bounded(comm_, device_, 10);
        }
      }
      comm_ = nullptr;
    }
    release();
    if (prev >= 0) cudaSetDevice(prev);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string kind() const override { return "nccl"; }
  int device() const override { return device_; }
  int world_rank() const override { return world_ranks_[size_t(rank_)]; }

  void bind_backend(Backend& cuda) override {
    MOELAB_CHECK(cuda.device() == Device::CUDA, "nccl bind_backend: backend '", cuda.name(), "' is not a CUDA backend");
    const int dev = cuda_backend_device(cuda);
    MOELAB_CHECK(dev == device_, "nccl bind_backend: the backend is on device ", dev, ", this rank on device ", device_);
    std::lock_guard<std::mutex> lk(call_mu_);
    stream_ = static_cast<cudaStream_t>(cuda_backend_stream(cuda));
  }

  // ---- collectives ------------------------------------------------------------------------

  void all_reduce(const Tensor& t, ReduceOp op) override {
    Scope s(*this, "all_reduce");
    check_tensor(t, "t");
    if (t.numel() == 0 || size_ == 1) return;
    enqueue_all_reduce(t, op, stream_, scratch(all_reduce_scratch_bytes(t, op)));
    wait();
  }

  // On the side stream: it waits for the work queued on stream_ so far (an event), then runs
  // beside whatever the caller queues next. Reductions on the side stream run in the order
  // started, so they share one scratch buffer, grown only while none is pending.
  void start_all_reduce(const Tensor& t, ReduceOp op) override {
    Scope s(*this, "start_all_reduce", /*drain=*/false);
    check_tensor(t, "t");
    if (t.numel() == 0 || size_ == 1) return;
    if (side_ == nullptr) {
      CUDA_CHECK(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking));
      CUDA_CHECK(cudaEventCreateWithFlags(&side_in_, cudaEventDisableTiming));
      CUDA_CHECK(cudaEventCreateWithFlags(&side_done_, cudaEventDisableTiming));
    }
    const size_t need = all_reduce_scratch_bytes(t, op);
    if (need > side_scratch_bytes_ && pending_ > 0) wait_side();
    void* sc = grow(side_scratch_, side_scratch_bytes_, need);
    CUDA_CHECK(cudaEventRecord(side_in_, stream_));
    CUDA_CHECK(cudaStreamWaitEvent(side_, side_in_, 0));
    enqueue_all_reduce(t, op, side_, sc);
    ++pending_;
  }

  void wait_started() override {
    Scope s(*this, "wait_started", /*drain=*/false);
    if (pending_ > 0) wait_side();
  }

  // Bytes of scratch enqueue_all_reduce needs for t.
  size_t all_reduce_scratch_bytes(const Tensor& t, ReduceOp op) const {
    const size_t n = size_t(t.numel());
    if (rank_order_sum(t, op)) return n * dtype_size(t.dtype()) * size_t(size_);
    if (bf16_via_f32(t, op)) return n * sizeof(float);
    return 0;
  }
  bool float_sum(const Tensor& t, ReduceOp op) const { return op == ReduceOp::Sum && t.dtype() != DType::I32; }
  bool rank_order_sum(const Tensor& t, ReduceOp op) const {
    return float_sum(t, op) &&
           (opts_.sum == NcclOptions::Sum::RankOrder || (opts_.sum == NcclOptions::Sum::Auto && size_ > 2));
  }
  // A native bf16 sum of 2 ranks is one addition rounded once (x0 + x1 exactly, then to bf16),
  // which is what the fp32 sum rounded to bf16 gives (two bf16 values add exactly in fp32 unless
  // their exponents differ by more than 15, and then the smaller is far below half an ulp of the
  // larger in bf16): so 2 ranks reduce bf16 natively, at half the traffic; more ranks add in
  // fp32 (native ring sums would round at every hop).
  bool bf16_via_f32(const Tensor& t, ReduceOp op) const {
    return float_sum(t, op) && t.dtype() == DType::BF16 && !rank_order_sum(t, op) && size_ > 2;
  }

  // Enqueues the reduction of t on stream st with scratch sc (all_reduce_scratch_bytes).
  void enqueue_all_reduce(const Tensor& t, ReduceOp op, cudaStream_t st, void* sc) {
    const int64_t n = t.numel();
    const unsigned grid = cuda::grid_for(n);
    if (rank_order_sum(t, op)) {
      nccl(ncclAllGather(t.data(), sc, size_t(n), nccl_dtype(t.dtype()), comm_, st), "ncclAllGather");
      switch (t.dtype()) {
        case DType::F64:
          k_sum_ranks<double, double><<<grid, cuda::kThreads, 0, st>>>(static_cast<const double*>(sc), t.ptr<double>(), n, size_);
          break;
        case DType::F32:
          k_sum_ranks<float, float><<<grid, cuda::kThreads, 0, st>>>(static_cast<const float*>(sc), t.ptr<float>(), n, size_);
          break;
        default:
          k_sum_ranks<bf16_t, float><<<grid, cuda::kThreads, 0, st>>>(static_cast<const bf16_t*>(sc),
                                                                        static_cast<bf16_t*>(t.data()), n, size_);
      }
      CUDA_CHECK_LAUNCH();
    } else if (bf16_via_f32(t, op)) {  // sum in fp32, round once
      float* f = static_cast<float*>(sc);
      k_bf16_to_f32<<<grid, cuda::kThreads, 0, st>>>(static_cast<const bf16_t*>(t.data()), f, n);
      CUDA_CHECK_LAUNCH();
      nccl(ncclAllReduce(f, f, size_t(n), ncclFloat32, ncclSum, comm_, st), "ncclAllReduce");
      k_f32_to_bf16<<<grid, cuda::kThreads, 0, st>>>(f, static_cast<bf16_t*>(t.data()), n);
      CUDA_CHECK_LAUNCH();
    } else {
      nccl(ncclAllReduce(t.data(), t.data(), size_t(n), nccl_dtype(t.dtype()), op == ReduceOp::Sum ? ncclSum : ncclMax,
                         comm_, st),
           "ncclAllReduce");
    }
  }

  void all_gather(const Tensor& in, const Tensor& out) override {
    Scope s(*this, "all_gather");
    check_tensor(in, "in");
    check_tensor(out, "out");
    bool ok = out.dtype() == in.dtype() && out.ndim() == in.ndim() && out.dim(0) == size_ * in.dim(0);
    for (int i = 1; ok && i < in.ndim(); ++i) ok = out.dim(i) == in.dim(i);
    MOELAB_CHECK(ok, where(), ": out ", out.describe(), " must be ", to_string(in.dtype()), " [", size_, " * ",
                 in.dim(0), ", ...] for in ", in.describe());
    if (in.nbytes() == 0) return;
    nccl(ncclAllGather(in.data(), out.data(), in.nbytes(), ncclUint8, comm_, stream_), "ncclAllGather");
    wait();
  }

  void broadcast(const Tensor& t, int root) override {
    Scope s(*this, "broadcast");
    check_tensor(t, "t");
    MOELAB_CHECK(root >= 0 && root < size_, where(), ": root ", root, " out of range for ", size_, " ranks");
    if (t.nbytes() == 0 || size_ == 1) return;
    nccl(ncclBroadcast(t.data(), t.data(), t.nbytes(), ncclUint8, root, comm_, stream_), "ncclBroadcast");
    wait();
  }

  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows, const Tensor& recv,
                    const std::vector<int64_t>& recv_rows) override {
    Scope s(*this, "all_to_all_v");
    check_tensor(send, "send");
    check_tensor(recv, "recv");
    int64_t row = 1;
    for (int i = 1; i < send.ndim(); ++i) row *= send.dim(i);
    int64_t rrow = 1;
    for (int i = 1; i < recv.ndim(); ++i) rrow *= recv.dim(i);
    MOELAB_CHECK(send.dtype() == recv.dtype() && row == rrow, where(), ": send ", send.describe(), " and recv ",
                 recv.describe(), " differ in dtype or row width");
    MOELAB_CHECK(int64_t(send_rows.size()) == size_ && int64_t(recv_rows.size()) == size_, where(), ": ",
                 send_rows.size(), " send counts and ", recv_rows.size(), " recv counts for ", size_, " ranks");
    const size_t rb = size_t(row) * dtype_size(send.dtype());
    std::vector<size_t> soff(size_t(size_) + 1, 0), roff(size_t(size_) + 1, 0);
    for (int r = 0; r < size_; ++r) {
      MOELAB_CHECK(send_rows[size_t(r)] >= 0 && recv_rows[size_t(r)] >= 0, where(), ": negative row count");
      soff[size_t(r) + 1] = soff[size_t(r)] + size_t(send_rows[size_t(r)]);
      roff[size_t(r) + 1] = roff[size_t(r)] + size_t(recv_rows[size_t(r)]);
    }
    MOELAB_CHECK(int64_t(soff.back()) <= send.dim(0), where(), ": sends ", soff.back(), " rows from ", send.describe());
    MOELAB_CHECK(int64_t(roff.back()) <= recv.dim(0), where(), ": receives ", roff.back(), " rows into ", recv.describe());
    char* sp = static_cast<char*>(send.data());
    char* rp = static_cast<char*>(recv.data());
    const size_t me = size_t(rank_);
    MOELAB_CHECK(send_rows[me] == recv_rows[me], where(), ": sends ", send_rows[me], " rows to itself but expects ",
                 recv_rows[me]);
    bool enqueued = false;
    if (send_rows[me] > 0) {
      CUDA_CHECK(cudaMemcpyAsync(rp + roff[me] * rb, sp + soff[me] * rb, size_t(send_rows[me]) * rb,
                                 cudaMemcpyDeviceToDevice, stream_));
      enqueued = true;
    }
    bool any = false;
    for (int r = 0; r < size_; ++r)
      if (r != rank_ && (send_rows[size_t(r)] > 0 || recv_rows[size_t(r)] > 0)) any = true;
    if (any) {
      ncclResult_t first = ncclSuccess;
      auto keep = [&](ncclResult_t e) {
        if (first == ncclSuccess && e != ncclSuccess && e != ncclInProgress) first = e;
      };
      keep(ncclGroupStart());
      for (int r = 0; r < size_; ++r) {  // zero-size pairs are skipped
        if (r == rank_) continue;
        const size_t ur = size_t(r);
        if (send_rows[ur] > 0) keep(ncclSend(sp + soff[ur] * rb, size_t(send_rows[ur]) * rb, ncclUint8, r, comm_, stream_));
        if (recv_rows[ur] > 0) keep(ncclRecv(rp + roff[ur] * rb, size_t(recv_rows[ur]) * rb, ncclUint8, r, comm_, stream_));
      }
      const ncclResult_t end = ncclGroupEnd();
      if (first != ncclSuccess) fail_nccl(first, "ncclSend/ncclRecv");
      nccl(end, "ncclGroupEnd (all_to_all_v)");
      enqueued = true;
    }
    if (enqueued) wait();
  }

  void barrier() override {
    Scope s(*this, "barrier");
    if (size_ == 1) return;
    void* one = scratch(sizeof(int32_t));
    nccl(ncclAllReduce(one, one, 1, ncclInt32, ncclSum, comm_, stream_), "ncclAllReduce (barrier)");
    wait();
  }

  std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send) override {
    Scope s(*this, "exchange_counts");
    MOELAB_CHECK(int64_t(send.size()) == size_, where(), ": ", send.size(), " counts for ", size_, " ranks");
    std::vector<int64_t> all(size_t(size_) * size_t(size_));
    gather_host(send.data(), send.size() * sizeof(int64_t), all.data());
    std::vector<int64_t> out(static_cast<size_t>(size_));
    for (int r = 0; r < size_; ++r) out[size_t(r)] = all[size_t(r) * size_t(size_) + size_t(rank_)];
    return out;
  }

  std::vector<int64_t> all_gather_host(const std::vector<int64_t>& v) override {
    Scope s(*this, "all_gather_host");
    std::vector<int64_t> all(v.size() * size_t(size_));
    gather_host(v.data(), v.size() * sizeof(int64_t), all.data());
    return all;
  }

  void all_reduce_host(std::vector<double>& v, ReduceOp op) override {
    Scope s(*this, "all_reduce_host");
    const size_t n = v.size();
    std::vector<double> all(n * size_t(size_));
    gather_host(v.data(), n * sizeof(double), all.data());
    for (size_t i = 0; i < n; ++i) {  // rank order, as the simulated ranks
      double acc = all[i];
      for (int r = 1; r < size_; ++r) {
        const double x = all[size_t(r) * n + i];
        if (op == ReduceOp::Sum) acc += x;
        else if (std::isnan(x) || x > acc) acc = x;
      }
      v[i] = acc;
    }
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    std::unique_ptr<NcclComm> child;
    {
      Scope s(*this, "split");
      ncclComm_t nc = nullptr;
      ncclComm_t parent = comm_;
      const int c = color < 0 ? NCCL_SPLIT_NOCOLOR : color;
      if (opts_.blocking) {
        auto nc_box = std::make_shared<ncclComm_t>(nullptr);
        const bool blocking = true;
        blocking_call("ncclCommSplit", [parent, c, key, nc_box, blocking] {
          ncclConfig_t cfg = make_config("moelab split", blocking);
          return ncclCommSplit(parent, c, key, nc_box.get(), &cfg);
        });
        nc = *nc_box;
      } else {
        ncclConfig_t cfg = make_config("moelab split", false);
        const ncclResult_t r = ncclCommSplit(parent, c, key, &nc, &cfg);
        if (r != ncclSuccess && r != ncclInProgress) fail_nccl(r, "ncclCommSplit");
        ready(comm_, "ncclCommSplit");
      }
      if (nc == nullptr) return nullptr;
      try {
        ready(nc, "ncclCommSplit (new communicator)");
      } catch (...) {
        abort_bounded(nc, device_, 10);
        throw;
      }
      int nrank = 0, nsize = 0;
      if (ncclCommUserRank(nc, &nrank) != ncclSuccess || ncclCommCount(nc, &nsize) != ncclSuccess) {
        abort_bounded(nc, device_, 10);
        fail(detail::concat(where(), ": ncclCommUserRank/ncclCommCount failed on the new communicator"), true);
      }
      std::vector<int> placeholder(size_t(nsize), -1);
      placeholder[size_t(nrank)] = world_rank();
      child = std::make_unique<NcclComm>(nc, device_, nrank, nsize, world_, std::move(placeholder), opts_, false);
      child->stream_ = stream_;
    }
    // Blocking: connect every pair of the new communicator now (see warm_up).
    if (opts_.blocking) child->warm_up();
    // The world ranks of the new communicator's members, for messages.
    const std::vector<int64_t> wr = child->all_gather_host({int64_t(world_rank())});
    for (size_t i = 0; i < wr.size(); ++i) child->world_ranks_[i] = int(wr[i]);
    return child;
  }

  void abort(const std::string& reason) noexcept override {
    try {
      world_->mark_failed(world_rank(), reason);
      std::unique_lock<std::mutex> lk(call_mu_, std::try_to_lock);
      if (lk.owns_lock()) {
        if (comm_ != nullptr) {
          abort_bounded(comm_, device_, 10);
          comm_ = nullptr;
        }
      } else {
        abort_requested_ = true;  // the call in progress aborts and throws
      }
    } catch (...) {
    }
  }

  // Blocking communicators: one byte to and from every peer (ncclSend/ncclRecv connect all the
  // point-to-point channels of a pair on its first use) and a barrier, under blocking_call.
  // Afterwards no enqueue waits for a peer: rings and trees were connected at initialisation
  // (NCCL_RUNTIME_CONNECT=0), so a peer that fails later is noticed by wait().
  void warm_up() {
    Scope s(*this, "warm-up");
    if (size_ == 1) return;
    char* buf = static_cast<char*>(scratch(size_t(2 * size_)));
    ncclComm_t c = comm_;
    const int n = size_, me = rank_;
    cudaStream_t st = stream_;
    blocking_call("warm-up ncclSend/ncclRecv", [c, n, me, buf, st] {
      ncclResult_t first = ncclGroupStart();
      for (int r = 0; r < n; ++r) {
        if (r == me) continue;
        const ncclResult_t a = ncclSend(buf + r, 1, ncclUint8, r, c, st);
        const ncclResult_t b = ncclRecv(buf + n + r, 1, ncclUint8, r, c, st);
        if (first == ncclSuccess) first = a != ncclSuccess ? a : b;
      }
      const ncclResult_t end = ncclGroupEnd();
      return first != ncclSuccess ? first : end;
    });
    wait();
    blocking_call("warm-up ncclAllReduce", [c, buf, st] { return ncclAllReduce(buf, buf, 1, ncclUint8, ncclSum, c, st); });
    wait();
  }

 private:
  // Blocking mode: runs fn (a blocking NCCL call on comm_) on a helper thread while this thread
  // polls the peers' failure state and the clock; a failure aborts comm_ (which ends the call)
  // and throws. Returns when fn returned ncclSuccess.
  void blocking_call(const char* what, std::function<ncclResult_t()> fn) {
    auto call = HelperCall::start(device_, std::move(fn));
    const auto t0 = Clock::now();
    auto next = t0;
    while (!call->wait_for(0.001)) {
      int who = -1;
      std::string why;
      const int me = world_rank();
      const auto now = Clock::now();
      bool peer = world_->peer_failed(me, who, why);
      if (!peer && now >= next) {
        peer = world_->peer_failed_on_disk(me, who, why);
        next = now + std::chrono::milliseconds(100);
      }
      if (abort_requested_ || own_failed()) fail(detail::concat(where(), ": this rank was aborted: ", own_reason()), false);
      if (peer) fail(detail::concat(where(), ": ", name_world_rank(who), " failed: ", why, "; the communicator was aborted"), false);
      if (std::chrono::duration<double>(now - t0).count() > opts_.timeout_s)
        fail(detail::concat(where(), ": ", what, " did not complete within ", opts_.timeout_s,
                            " s: a peer did not take part; the communicator was aborted"),
             true);
    }
    if (call->result != ncclSuccess) fail_nccl(call->result, what);
  }

  // One call: this communicator's lock, its device, and a usable state.
  struct Scope {
    // drain: first wait for the reductions started with start_all_reduce (every other call
    // runs after them, as NCCL needs calls on one communicator in one order).
    Scope(NcclComm& c, const char* op, bool drain = true) : lock(c.call_mu_), dev(c.device_) {
      c.op_ = op;
      c.check_usable();
      if (drain && c.pending_ > 0) c.wait_side();
    }
    std::unique_lock<std::mutex> lock;
    DeviceGuard dev;
  };

  std::string where() const {
    std::string s = detail::concat("nccl ", op_, " on rank ", rank_, " of ", size_, " (device ", device_);
    if (!is_world_) s += detail::concat(", world rank ", world_rank());
    return s + ")";
  }
  std::string name_world_rank(int wr) const { return detail::concat(is_world_ ? "rank " : "world rank ", wr); }

  void check_tensor(const Tensor& t, const char* what) const {
    MOELAB_CHECK(t.defined(), where(), ": ", what, " is undefined");
    MOELAB_CHECK(t.device() == Device::CUDA, where(), ": ", what, " must be a CUDA tensor, got ", t.describe());
    if (t.nbytes() == 0) return;
    cudaPointerAttributes a{};
    if (cudaPointerGetAttributes(&a, t.data()) == cudaSuccess) {
      MOELAB_CHECK(a.type == cudaMemoryTypeDevice && a.device == device_, where(), ": ", what, " ", t.describe(),
                   " is not memory of device ", device_);
    } else {
      cudaGetLastError();
    }
  }

  // Throws when this rank aborted or a peer failed (then aborting this communicator too).
  void check_usable() {
    const int me = world_rank();
    if (comm_ == nullptr) MOELAB_FAIL(where(), ": this rank was aborted: ", own_reason());
    if (abort_requested_ || own_failed()) fail(detail::concat(where(), ": this rank was aborted: ", own_reason()), false);
    int who = -1;
    std::string why;
    if (world_->peer_failed(me, who, why))  // (the files of a file launch: polled while waiting)
      fail(detail::concat(where(), ": ", name_world_rank(who), " failed: ", why, "; the communicator was aborted"), false);
  }
  bool own_failed() {
    std::lock_guard<std::mutex> lk(world_->mu);
    return world_->failed[size_t(world_rank())] != 0;
  }
  std::string own_reason() {
    std::lock_guard<std::mutex> lk(world_->mu);
    const std::string& r = world_->reason[size_t(world_rank())];
    return r.empty() ? std::string("(no reason given)") : r;
  }

  // Aborts this communicator and throws `msg`; mark_self: record this rank as failed with it
  // (so that the peers name it), for failures that start here (timeouts, NCCL errors).
  [[noreturn]] void fail(const std::string& msg, bool mark_self) {
    if (mark_self) world_->mark_failed(world_rank(), msg);
    if (comm_ != nullptr) {
      abort_bounded(comm_, device_, 10);
      comm_ = nullptr;
    }
    MOELAB_FAIL(msg);
  }
  [[noreturn]] void fail_nccl(ncclResult_t r, const char* what) {
    const char* last = comm_ != nullptr ? ncclGetLastError(comm_) : nullptr;
    fail(detail::concat(where(), ": ", what, " failed: ", ncclGetErrorString(r),
                        (last && *last) ? detail::concat(" (", last, ")") : std::string()),
         true);
  }

  // The result of an enqueueing NCCL call: in progress (non-blocking) means wait until the
  // communicator is ready again.
  void nccl(ncclResult_t r, const char* what) {
    if (r == ncclSuccess) return;
    if (r == ncclInProgress) return ready(comm_, what);
    fail_nccl(r, what);
  }

  // Polled while waiting: NCCL's async error, abort requests, failed peers, the deadline.
  void poll(ncclComm_t c, const char* what, Clock::time_point t0, Clock::time_point& next_disk_check) {
    ncclResult_t st = ncclSuccess;
    const ncclResult_t q = ncclCommGetAsyncError(c, &st);
    const int me = world_rank();
    int who = -1;
    std::string why;
    if (q != ncclSuccess || (st != ncclSuccess && st != ncclInProgress)) {
      // NCCL noticed something (often a peer that went away): name the peer when we can.
      const ncclResult_t e = q != ncclSuccess ? q : st;
      if (world_->peer_failed(me, who, why) || world_->peer_failed_on_disk(me, who, why))
        fail(detail::concat(where(), ": ", name_world_rank(who), " failed: ", why, " (NCCL: ", ncclGetErrorString(e),
                            "); the communicator was aborted"),
             false);
      fail_nccl(e, what);
    }
    if (abort_requested_ || own_failed()) fail(detail::concat(where(), ": this rank was aborted: ", own_reason()), false);
    const auto now = Clock::now();
    bool peer = world_->peer_failed(me, who, why);
    if (!peer && now >= next_disk_check) {
      peer = world_->peer_failed_on_disk(me, who, why);
      next_disk_check = now + std::chrono::milliseconds(100);
    }
    if (peer) fail(detail::concat(where(), ": ", name_world_rank(who), " failed: ", why, "; the communicator was aborted"), false);
    if (std::chrono::duration<double>(now - t0).count() > opts_.timeout_s)
      fail(detail::concat(where(), ": ", what, " did not complete within ", opts_.timeout_s,
                          " s: a peer did not take part (it hung, died without notice, or called another "
                          "collective or other sizes); the communicator was aborted"),
           true);
  }
  static void backoff(int64_t& spins) {
    ++spins;
    if (spins < 2000) return;
    if (spins < 20000) std::this_thread::yield();
    else std::this_thread::sleep_for(std::chrono::microseconds(50));
  }

  // Until communicator c is ready after a non-blocking call.
  void ready(ncclComm_t c, const char* what) {
    const auto t0 = Clock::now();
    auto next = t0;
    int64_t spins = 0;
    for (;;) {
      ncclResult_t st = ncclSuccess;
      const ncclResult_t q = ncclCommGetAsyncError(c, &st);
      if (q == ncclSuccess && st == ncclSuccess) return;
      poll(c, what, t0, next);
      backoff(spins);
    }
  }

  // Until everything enqueued on the stream so far is complete.
  void wait() { wait_stream(stream_, done_); }
  // Until the started reductions are complete; the bound stream's later work then sees them.
  void wait_side() {
    wait_stream(side_, side_done_);
    pending_ = 0;
    CUDA_CHECK(cudaStreamWaitEvent(stream_, side_done_, 0));
  }
  void wait_stream(cudaStream_t st, cudaEvent_t ev) {
    CUDA_CHECK(cudaEventRecord(ev, st));
    const auto t0 = Clock::now();
    auto next = t0 + std::chrono::milliseconds(100);
    int64_t spins = 0;
    for (;;) {
      const cudaError_t q = cudaEventQuery(ev);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) {
        cudaGetLastError();
        fail(detail::concat(where(), ": waiting for the stream: ", cudaGetErrorName(q), " (", cudaGetErrorString(q), ")"), true);
      }
      poll(comm_, op_, t0, next);
      backoff(spins);
    }
  }

  // Device scratch (grown on demand; every call completes before it returns, so the old
  // buffer is idle when it is replaced).
  void* scratch(size_t bytes) { return grow(scratch_, scratch_bytes_, bytes); }
  char* pinned(size_t bytes) { return static_cast<char*>(grow(pinned_, pinned_bytes_, bytes, /*host=*/true)); }
  // buf holds at least `bytes` (1.25x, at least 1 MiB device / 64 KiB pinned host) afterwards.
  static void* grow(void*& buf, size_t& have, size_t bytes, bool host = false) {
    if (bytes > have || (buf == nullptr && bytes > 0)) {
      if (buf != nullptr) CUDA_CHECK(host ? cudaFreeHost(buf) : cudaFree(buf));
      buf = nullptr;
      have = 0;
      const size_t want = std::max(bytes + bytes / 4, host ? size_t(1) << 16 : size_t(1) << 20);
      CUDA_CHECK(host ? cudaMallocHost(&buf, want) : cudaMalloc(&buf, want));
      have = want;
    }
    return buf;
  }

  // All-gathers `bytes` host bytes of every rank into dst (size_ * bytes), in rank order.
  void gather_host(const void* src, size_t bytes, void* dst) {
    if (bytes == 0) return;
    if (size_ == 1) {
      std::memcpy(dst, src, bytes);
      return;
    }
    const size_t total = bytes * size_t(size_);
    char* pin = pinned(bytes + total);
    char* dev = static_cast<char*>(scratch(bytes + total));
    std::memcpy(pin, src, bytes);
    CUDA_CHECK(cudaMemcpyAsync(dev, pin, bytes, cudaMemcpyHostToDevice, stream_));
    nccl(ncclAllGather(dev, dev + bytes, bytes, ncclUint8, comm_, stream_), "ncclAllGather");
    CUDA_CHECK(cudaMemcpyAsync(pin + bytes, dev + bytes, total, cudaMemcpyDeviceToHost, stream_));
    wait();
    std::memcpy(dst, pin + bytes, total);
  }

  void release() noexcept {
    if (done_ != nullptr) cudaEventDestroy(done_);
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    if (own_stream_ != nullptr) cudaStreamDestroy(own_stream_);
    if (side_scratch_ != nullptr) cudaFree(side_scratch_);
    if (side_ != nullptr) cudaStreamDestroy(side_);
    if (side_in_ != nullptr) cudaEventDestroy(side_in_);
    if (side_done_ != nullptr) cudaEventDestroy(side_done_);
    side_scratch_ = nullptr;
    side_ = nullptr;
    side_in_ = side_done_ = nullptr;
    done_ = nullptr;
    scratch_ = nullptr;
    pinned_ = nullptr;
    own_stream_ = nullptr;
  }

  ncclComm_t comm_ = nullptr;
  const int device_;
  const int rank_, size_;
  std::shared_ptr<NcclWorld> world_;
  std::vector<int> world_ranks_;  // rank -> world rank
  const NcclOptions opts_;
  const bool is_world_;
  std::mutex call_mu_;
  std::atomic<bool> abort_requested_{false};
  const char* op_ = "";
  cudaStream_t stream_ = nullptr;
  cudaStream_t own_stream_ = nullptr;
  cudaEvent_t done_ = nullptr;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  void* pinned_ = nullptr;
  size_t pinned_bytes_ = 0;
  // start_all_reduce: a stream of its own, its scratch, and the reductions not yet waited for.
  cudaStream_t side_ = nullptr;
  cudaEvent_t side_in_ = nullptr, side_done_ = nullptr;
  void* side_scratch_ = nullptr;
  size_t side_scratch_bytes_ = 0;
  int pending_ = 0;
};

// Polls freshly initialised communicators until they are ready (or fail, or time out).
void wait_init(const std::vector<ncclComm_t>& comms, const std::vector<int>& devices, double timeout_s,
               const std::string& who) {
  const auto t0 = Clock::now();
  for (size_t i = 0; i < comms.size(); ++i) {
    for (;;) {
      ncclResult_t st = ncclInProgress;
      const ncclResult_t q = ncclCommGetAsyncError(comms[i], &st);
      if (q == ncclSuccess && st == ncclSuccess) break;
      if (q != ncclSuccess || st != ncclInProgress) {
        const char* last = ncclGetLastError(comms[i]);
        const std::string msg = detail::concat(who, ": NCCL initialisation failed: ",
                                               ncclGetErrorString(q != ncclSuccess ? q : st),
                                               (last && *last) ? detail::concat(" (", last, ")") : std::string());
        for (size_t j = 0; j < comms.size(); ++j) abort_bounded(comms[j], devices[j], 10);
        MOELAB_FAIL(msg);
      }
      if (std::chrono::duration<double>(Clock::now() - t0).count() > timeout_s) {
        for (size_t j = 0; j < comms.size(); ++j) abort_bounded(comms[j], devices[j], 10);
        MOELAB_FAIL(who, ": NCCL initialisation did not complete within ", timeout_s,
                    " s (a rank that never joined? a stale id file from an earlier launch?)");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
  }
}

void check_device(int device, const std::string& who) {
  const int n = cuda_device_count();
  MOELAB_CHECK(device >= 0 && device < n, who, ": CUDA device ", device, " does not exist (", n, " visible)");
}

}  // namespace

std::vector<std::unique_ptr<NcclCommunicator>> make_nccl_world_single_process(const std::vector<int>& devices,
                                                                              const NcclOptions& opts) {
  const int n = int(devices.size());
  MOELAB_CHECK(n >= 1, "nccl world: no devices");
  MOELAB_CHECK(opts.timeout_s > 0, "nccl world: timeout ", opts.timeout_s, " s");
  for (int i = 0; i < n; ++i) {
    check_device(devices[size_t(i)], "nccl world");
    for (int j = 0; j < i; ++j)
      MOELAB_CHECK(devices[size_t(i)] != devices[size_t(j)], "nccl world: device ", devices[size_t(i)],
                   " listed twice (one rank per GPU)");
  }
  nvls_off();
  int prev = -1;
  if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
  ncclUniqueId id;
  ncclResult_t r = ncclGetUniqueId(&id);
  MOELAB_CHECK(r == ncclSuccess, "nccl world: ncclGetUniqueId failed: ", ncclGetErrorString(r));
  std::vector<ncclComm_t> comms(size_t(n), nullptr);
  ncclConfig_t cfg = make_config("moelab world", opts.blocking);
  ncclResult_t first = ncclGroupStart();
  for (int i = 0; i < n; ++i) {
    cudaSetDevice(devices[size_t(i)]);
    const ncclResult_t e = ncclCommInitRankConfig(&comms[size_t(i)], n, id, i, &cfg);
    if (first == ncclSuccess && e != ncclSuccess && e != ncclInProgress) first = e;
  }
  r = ncclGroupEnd();
  if (prev >= 0) cudaSetDevice(prev);
  if ((first != ncclSuccess && first != ncclInProgress) || (r != ncclSuccess && r != ncclInProgress)) {
    for (int i = 0; i < n; ++i) abort_bounded(comms[size_t(i)], devices[size_t(i)], 10);
    MOELAB_FAIL("nccl world: ncclCommInitRankConfig failed: ", ncclGetErrorString(first != ncclSuccess ? first : r));
  }
  wait_init(comms, devices, opts.timeout_s, detail::concat("nccl world of ", n, " GPUs"));
  auto world = std::make_shared<NcclWorld>(n, opts.timeout_s);
  std::vector<int> ranks(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) ranks[size_t(i)] = i;
  std::vector<std::unique_ptr<NcclCommunicator>> out;
  for (int i = 0; i < n; ++i)
    out.push_back(std::make_unique<NcclComm>(comms[size_t(i)], devices[size_t(i)], i, n, world, ranks, opts, true));
  if (opts.blocking && n > 1) {  // every rank at once (connection setup pairs them)
    std::vector<std::string> errors(static_cast<size_t>(n));
    std::vector<std::thread> th;
    for (int i = 0; i < n; ++i)
      th.emplace_back([&, i] {
        try {
          static_cast<NcclComm&>(*out[size_t(i)]).warm_up();
        } catch (const std::exception& e) {
          errors[size_t(i)] = e.what();
          out[size_t(i)]->abort(e.what());
        }
      });
    for (auto& t : th) t.join();
    for (int i = 0; i < n; ++i)
      if (!errors[size_t(i)].empty()) MOELAB_FAIL("nccl world: rank ", i, ": ", errors[size_t(i)]);
  }
  return out;
}

std::unique_ptr<NcclCommunicator> make_nccl_comm_from_file(int rank, int world, const std::string& id_file, int device,
                                                           const NcclOptions& opts) {
  const std::string who = detail::concat("nccl rank ", rank, " of ", world);
  if (world < 1 || rank < 0 || rank >= world) MOELAB_USAGE_FAIL("nccl: rank ", rank, " out of range for world ", world);
  if (id_file.empty()) MOELAB_USAGE_FAIL("nccl: no id file given");
  MOELAB_CHECK(opts.timeout_s > 0, who, ": timeout ", opts.timeout_s, " s");
  check_device(device, who);
  nvls_off();
  auto w = std::make_shared<NcclWorld>(world, opts.timeout_s);
  w->id_file = id_file;
  w->my_rank = rank;
  w->host = host_name();
  // This rank's liveness file (pid, host); a stale failure file of an earlier launch goes first.
  std::remove(w->failed_file(rank).c_str());
  MOELAB_CHECK(write_atomic(w->rank_file(rank), detail::concat(long(::getpid()), " ", w->host, "\n")), who,
               ": cannot write ", w->rank_file(rank), ": ", std::strerror(errno));
  static const char kMagic[] = "moelab-nccl-id v1 world ";
  const std::string header = detail::concat(kMagic, world, "\n");
  ncclUniqueId id;
  if (rank == 0) {
    const ncclResult_t r = ncclGetUniqueId(&id);
    MOELAB_CHECK(r == ncclSuccess, who, ": ncclGetUniqueId failed: ", ncclGetErrorString(r));
    MOELAB_CHECK(write_atomic(id_file, header + std::string(id.internal, sizeof(id.internal))), who,
                 ": cannot write the id file ", id_file, ": ", std::strerror(errno));
  } else {
    const auto t0 = Clock::now();
    for (;;) {
      const std::string text = file_exists(id_file) ? read_file(id_file) : std::string();
      if (!text.empty()) {
        MOELAB_CHECK(text.size() == header.size() + sizeof(id.internal) && text.compare(0, header.size(), header) == 0,
                     who, ": ", id_file, " is not an id file of a world of ", world, " ranks");
        std::memcpy(id.internal, text.data() + header.size(), sizeof(id.internal));
        break;
      }
      MOELAB_CHECK(std::chrono::duration<double>(Clock::now() - t0).count() < opts.timeout_s, who,
                   ": no NCCL id in ", id_file, " after ", opts.timeout_s,
                   " s (is rank 0 running, with the same id file?)");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  ncclComm_t comm = nullptr;
  if (opts.blocking) {  // a blocking init cannot be polled: on a helper thread, with the timeout
    auto box = std::make_shared<ncclComm_t>(nullptr);
    auto call = HelperCall::start(device, [box, world, id, rank] {
      ncclConfig_t cfg = make_config("moelab world", true);
      return ncclCommInitRankConfig(box.get(), world, id, rank, &cfg);
    });
    if (!call->wait_for(opts.timeout_s))
      MOELAB_FAIL(who, ": NCCL initialisation did not complete within ", opts.timeout_s,
                  " s (a rank that never joined? a stale id file from an earlier launch?)");
    if (call->result != ncclSuccess) {
      abort_bounded(*box, device, 10);
      MOELAB_FAIL(who, ": ncclCommInitRankConfig failed: ", ncclGetErrorString(call->result));
    }
    comm = *box;
  } else {
    DeviceGuard g(device);
    ncclConfig_t cfg = make_config("moelab world", false);
    const ncclResult_t r = ncclCommInitRankConfig(&comm, world, id, rank, &cfg);
    if (r != ncclSuccess && r != ncclInProgress) {
      abort_bounded(comm, device, 10);
      MOELAB_FAIL(who, ": ncclCommInitRankConfig failed: ", ncclGetErrorString(r));
    }
    wait_init({comm}, {device}, opts.timeout_s, who);
  }
  // Every rank has joined: its liveness file is there.
  w->peers.resize(size_t(world));
  for (int r = 0; r < world; ++r) {
    std::istringstream is(read_file(w->rank_file(r)));
    is >> w->peers[size_t(r)].pid >> w->peers[size_t(r)].host;
  }
  if (rank == 0) std::remove(id_file.c_str());
  std::vector<int> ranks(static_cast<size_t>(world));
  for (int i = 0; i < world; ++i) ranks[size_t(i)] = i;
  auto out = std::make_unique<NcclComm>(comm, device, rank, world, w, ranks, opts, true);
  if (opts.blocking) out->warm_up();
  return out;
}

std::optional<LaunchRank> launch_rank_from_env() {
  struct Vars { const char *rank, *size, *local1, *local2; };
  const Vars vars[] = {{"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", nullptr},
                       {"PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"},
                       {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", nullptr}};
  auto parse = [](const char* name, const char* text) {
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v < 0 || v > 1000000)
      MOELAB_USAGE_FAIL("launcher variable ", name, "='", text, "' is not a rank or size");
    return int(v);
  };
  for (const Vars& v : vars) {
    const char* r = std::getenv(v.rank);
    if (r == nullptr) continue;
    const char* s = std::getenv(v.size);
    if (s == nullptr) MOELAB_USAGE_FAIL("launcher variable ", v.rank, " is set but ", v.size, " is not");
    LaunchRank out;
    out.rank = parse(v.rank, r);
    out.world = parse(v.size, s);
    out.source = detail::concat(v.rank, "/", v.size);
    if (out.world < 1 || out.rank >= out.world)
      MOELAB_USAGE_FAIL("launcher variables ", v.rank, "=", r, " and ", v.size, "=", s, " are out of range");
    for (const char* l : {v.local1, v.local2})
      if (l != nullptr && std::getenv(l) != nullptr) {
        out.local_rank = parse(l, std::getenv(l));
        break;
      }
    return out;
  }
  return std::nullopt;
}

int nccl_version() {
  int v = 0;
  ncclGetVersion(&v);
  return v;
}

}  // namespace moelab
