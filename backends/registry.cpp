// moelab: backend registry and run environments (see registry.h). The only place that knows
// which backends (and whether NCCL) were compiled in.
#include "backends/registry.h"

#include <cstdlib>
#include <mutex>
#include <numeric>
#include <thread>

#include "backends/cpu/cpu_backend.h"
#include "core/comm_sim.h"
#if MOELAB_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif
#if MOELAB_HAVE_NCCL
#include "backends/cuda/nccl_comm.h"
#endif

namespace moelab {

int cuda_devices() {
#if MOELAB_HAVE_CUDA
  return cuda_device_count();
#else
  return 0;
#endif
}

bool backend_available(const std::string& name) {
  if (name == "cpu") return true;
  if (name == "cuda") return cuda_devices() > 0;
  return false;
}

std::unique_ptr<Backend> make_backend(const std::string& name, int device) {
  if (name == "cpu") return make_cpu_backend();
  if (name == "cuda") {
#if MOELAB_HAVE_CUDA
    MOELAB_CHECK(cuda_device_count() > 0, "backend cuda: no CUDA device is visible");
    CudaBackendOptions o;
    o.device = device;
    // MOELAB_GROUPED_GEMM=auto|per_expert|grouped|chunked|mma|wgmma overrides the expert-GEMM choice (for
    // measuring it; cuda_backend.h says what Auto picks).
    if (const char* g = std::getenv("MOELAB_GROUPED_GEMM")) {
      const std::string v = g;
      if (v == "per_expert") o.grouped_gemm = GroupedGemmImpl::PerExpert;
      else if (v == "grouped") o.grouped_gemm = GroupedGemmImpl::GroupedBatched;
      else if (v == "mma") o.grouped_gemm = GroupedGemmImpl::Mma;
      else if (v == "chunked") o.grouped_gemm = GroupedGemmImpl::Chunked;
      else if (v == "wgmma") o.grouped_gemm = GroupedGemmImpl::Wgmma;
      else if (v != "auto" && !v.empty())
        MOELAB_USAGE_FAIL("MOELAB_GROUPED_GEMM = '", v, "' (accepted: auto|per_expert|grouped|chunked|mma|wgmma)");
    }
    // MOELAB_GEMM_ALGO_CACHE=0 runs the per-expert GEMMs on cublasGemmEx (a kernel lookup per
    // new shape) instead of cuBLASLt with cached choices (for measuring it).
    if (const char* g = std::getenv("MOELAB_GEMM_ALGO_CACHE")) {
      const std::string v = g;
      if (v == "0") o.gemm_algo_cache = false;
      else if (v != "1" && !v.empty()) MOELAB_USAGE_FAIL("MOELAB_GEMM_ALGO_CACHE = '", v, "' (accepted: 0|1)");
    }
    if (const char* r = std::getenv("MOELAB_GEMM_CHUNK_ROWS")) {
      char* end = nullptr;
      const long long v = std::strtoll(r, &end, 10);
      if (end == r || *end != '\0' || v < 8 || v % 8 != 0 || v > (1 << 20))
        MOELAB_USAGE_FAIL("MOELAB_GEMM_CHUNK_ROWS = '", r, "' (accepted: a multiple of 8 from 8 to 1048576)");
      o.chunk_rows = v;
    }
    return make_cuda_backend(o);
#else
    (void)device;
    MOELAB_FAIL("backend cuda: this moelab was built without CUDA (MOELAB_CUDA=OFF or no nvcc)");
#endif
  }
  MOELAB_FAIL("unknown backend '", name, "' (accepted: cpu|cuda)");
}

namespace {
#if MOELAB_HAVE_NCCL
// MOELAB_NCCL_BLOCKING=1: blocking NCCL communicators, about 0.1 ms less per call (NCCL starts a
// thread per call on a non-blocking one), for throughput runs; a peer that dies can then hang
// the others instead of ending their calls with an error naming it.
NcclOptions nccl_options() {
  NcclOptions o;
  const char* v = std::getenv("MOELAB_NCCL_BLOCKING");
  o.blocking = v && std::string(v) == "1";
  return o;
}

// One thread per GPU over an NCCL world made in this process; the first failure (in time) is
// rethrown naming its rank: the others fail because of it, and their errors name it too.
void run_nccl_world(int ranks, const std::function<void(int, Communicator&)>& fn) {
  const int gpus = cuda_device_count();
  if (ranks > gpus)
    MOELAB_USAGE_FAIL("parallel.ep x parallel.dp = ", ranks, " ranks need ", ranks, " GPUs (one per rank), but ",
                      gpus, gpus == 1 ? " is" : " are", " visible; lower parallel.ep / parallel.dp or use more GPUs");
  std::vector<int> devices(static_cast<size_t>(ranks), 0);
  std::iota(devices.begin(), devices.end(), 0);
  auto comms = make_nccl_world_single_process(devices, nccl_options());
  std::mutex mu;
  int first = -1;
  std::string first_error;
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      std::string what;
      try {
        fn(r, *comms[size_t(r)]);
        return;
      } catch (const std::exception& e) {
        what = e.what();
      }
      {
        std::lock_guard<std::mutex> lock(mu);
        if (first < 0) {
          first = r;
          first_error = what;
        }
      }
      comms[size_t(r)]->abort(what);
    });
  for (auto& t : threads) t.join();
  if (first >= 0) MOELAB_FAIL("rank ", first, ": ", first_error);
}
#endif
}  // namespace

RunEnvironment default_environment(const RunConfig& cfg) {
  RunEnvironment env;
  const std::string name = cfg.train.backend;
  env.make_backend = [name](int rank) { return make_backend(name, name == "cuda" ? rank : 0); };
  if (name == "cuda" && cfg.parallel.world() > 1) {
#if MOELAB_HAVE_NCCL
    env.run_world = run_nccl_world;
    env.bind = [](Communicator& world, Backend& backend) {
      static_cast<NcclCommunicator&>(world).bind_backend(backend);
    };
#else
    env.run_world = [](int, const std::function<void(int, Communicator&)>&) {
      MOELAB_USAGE_FAIL("parallel.ep x parallel.dp > 1 on train.backend = cuda needs NCCL, and this moelab "
                        "was built without it (nccl.h / libnccl not found at configure time)");
    };
#endif
  }
  return env;
}

std::optional<ProcessRank> process_rank_from_env() {
#if MOELAB_HAVE_NCCL
  if (auto l = launch_rank_from_env()) return ProcessRank{l->rank, l->world, l->local_rank, l->source};
#endif
  return std::nullopt;
}

RunEnvironment process_environment(const RunConfig& cfg, int rank, int world, const std::string& id_file,
                                   int device) {
  if (cfg.train.backend != "cuda")
    MOELAB_USAGE_FAIL("one process per rank (--rank/--world or a launcher's variables) needs train.backend = cuda; "
                      "simulated CPU ranks run as threads of one process");
  if (world != cfg.parallel.world())
    MOELAB_USAGE_FAIL("the launch has ", world, " ranks but parallel.ep x parallel.dp = ", cfg.parallel.ep, " x ",
                      cfg.parallel.dp, " = ", cfg.parallel.world());
#if MOELAB_HAVE_NCCL
  RunEnvironment env;
  env.make_backend = [device](int) { return make_backend("cuda", device); };
  auto comm = std::shared_ptr<NcclCommunicator>(make_nccl_comm_from_file(rank, world, id_file, device, nccl_options()));
  env.run_world = [comm, rank](int, const std::function<void(int, Communicator&)>& fn) {
    try {
      fn(rank, *comm);
    } catch (const std::exception& e) {
      comm->abort(e.what());  // the other processes stop with an error naming this rank
      throw;
    }
  };
  env.bind = [](Communicator& world_comm, Backend& backend) {
    static_cast<NcclCommunicator&>(world_comm).bind_backend(backend);
  };
  return env;
#else
  (void)rank, (void)id_file, (void)device;
  MOELAB_USAGE_FAIL("one process per rank needs NCCL, and this moelab was built without it");
#endif
}

TrainResult train(const RunConfig& cfg, const TrainOptions& opts) {
  return train(cfg, opts, default_environment(cfg));
}

}  // namespace moelab
