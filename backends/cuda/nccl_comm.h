// moelab: the NCCL communicator (core/comm.h on CUDA devices, one GPU per rank). Plain C++17, no
// CUDA or NCCL types: included by the tests and the command line. Built only where NCCL was found
// (MOELAB_HAVE_NCCL=1).
//
// Two ways to start, neither needs MPI:
//   - make_nccl_world_single_process(devices): one process drives all its GPUs, one thread per
//     GPU afterwards (communicator i belongs to the thread that runs rank i);
//   - make_nccl_comm_from_file(rank, world, id_file, device): one process per GPU; rank 0 writes
//     the NCCL unique id to id_file (tmp + rename), the others wait for it. rank and world come
//     from the command line or from the launcher's variables (launch_rank_from_env: mpirun, srun,
//     PMI), so one node or many launch the same way.
//
// Execution: every collective is enqueued on the bound CUDA backend's stream (bind_backend: work
// queued there before the call runs first) and the call returns once its result is complete on
// the device: the host polls the stream, NCCL's asynchronous error state and the peers' failure
// state until then. So a collective never hangs: a peer that failed (abort(), an exception in
// another rank thread, a process that exited) or a wait longer than the timeout ends in
// moelab::Error naming the rank (or, when NCCL cannot tell which, the collective) after
// ncclCommAbort. The communicators are non-blocking NCCL communicators (ncclConfig_t blocking =
// 0) by default, so that no NCCL call can wait for a peer out of sight of that watch;
// NcclOptions::blocking trades that for less time per call (see there).
//
// Reductions: bit-identical on every rank; float sums add in rank order as core/comm.h requires:
// for 2 ranks ncclAllReduce gives x0 + x1 (one addition, commutative), for more ranks (or
// NcclOptions::sum = RankOrder) the communicator all-gathers and sums in rank order on the device
// (n times the memory of the tensor and (n-1)/n * 2 the traffic of a ring all-reduce). bf16 sums
// run in fp32 and are rounded to bf16 once, as the simulated ranks do; results then equal
// core/comm_sim.h's bit for bit (f64, f32, bf16 and i32). Max is elementwise (NaN handling is
// NCCL's). Host reductions (all_reduce_host) gather and add in rank order on the host.
//
// Not checked on NCCL (the simulated ranks check them): that all ranks call the same collective
// with matching sizes, and that recv_rows matches what the peers send. A mismatch corrupts data
// or ends in the timeout.
//
// NVLink multicast (NVLS) stays off: both factories set NCCL_NVLS_ENABLE=0 in the process
// environment before NCCL reads it, overriding (with a warning on stderr) any other value.
//
// Thread model: one thread per communicator (the ranks of one process each on their own
// thread); the communicators split from it belong to the same thread. abort() alone may be
// called from another thread. Every call sets its device (cudaSetDevice) and restores the
// caller's.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/comm.h"

namespace moelab {

struct NcclOptions {
  double timeout_s = 120;  // the longest wait of one call (init included) for its peers
  // Float sums (see above): Auto = ncclAllReduce for 2 ranks, gather + rank-order sum for more.
  enum class Sum { Auto, Native, RankOrder };
  Sum sum = Sum::Auto;
  // Blocking NCCL communicators. On a non-blocking one (the default) NCCL 2.28 starts a thread
  // for every call, ~0.1 ms per collective (docs/gpu-results.md); blocking ones save that. Their
  // one hazard, a blocking NCCL call that waits for a peer (initialisation, ncclCommSplit, the
  // first connection of a pair), is covered: those calls run on a helper thread under the same
  // watch (timeout, failed peers), and each new communicator connects every pair at once
  // (one byte each way, and rings and trees at initialisation: NCCL_RUNTIME_CONNECT=0 unless
  // set otherwise). What stays uncovered: a peer that dies inside NCCL's own connection code
  // later, e.g. with NCCL_RUNTIME_CONNECT=1 set by the user.
  bool blocking = false;
};

class NcclCommunicator : public Communicator {
 public:
  // Run the collectives on the CUDA backend `cuda` (its stream; it must live on device()).
  // Without it the communicator runs on a stream of its own and the caller synchronises its
  // work before each call. Communicators split from this one inherit the stream.
  virtual void bind_backend(Backend& cuda) = 0;
  virtual int device() const = 0;
  // This rank's number in the world it was split from (rank() for the world itself).
  virtual int world_rank() const = 0;
};

// One communicator per entry of `devices` (distinct CUDA ordinals), rank i on devices[i],
// created together in this thread (ncclCommInitRankConfig in one group, as ncclCommInitAll
// does, but non-blocking). Hand communicator i to the thread that runs rank i; destroy them
// in any order and from any thread (the last one of the world finishes NCCL's teardown).
std::vector<std::unique_ptr<NcclCommunicator>> make_nccl_world_single_process(
    const std::vector<int>& devices, const NcclOptions& opts = {});

// Rank `rank` of `world` processes on CUDA device `device`. Rank 0 writes the id to `id_file`
// (which must be on a file system every rank sees; a fresh path per launch, e.g. with the job
// id: a stale file from a crashed launch makes the others wait for the wrong rank 0 until the
// timeout). The others poll for it for up to opts.timeout_s. Beside it, each rank writes
// `id_file.rank<R>` (its pid and host: a peer on the same host that exits is named at once)
// and, when it aborts, `id_file.rank<R>.failed` (its reason, which the others report). Rank 0
// removes id_file once every rank has joined; each rank removes its .rank<R> file on destruction.
std::unique_ptr<NcclCommunicator> make_nccl_comm_from_file(int rank, int world, const std::string& id_file,
                                                           int device, const NcclOptions& opts = {});

// rank / world (and the rank within the node, -1 if unknown) from the variables that launchers
// set: OMPI_COMM_WORLD_RANK/SIZE (Open MPI's mpirun; local: OMPI_COMM_WORLD_LOCAL_RANK),
// PMI_RANK/PMI_SIZE (MPICH, Intel MPI, srun --mpi=pmi2; local: MPI_LOCALRANKID, PMI_LOCAL_RANK),
// SLURM_PROCID/SLURM_NTASKS (srun; local: SLURM_LOCALID), first match in that order. nullopt
// when none is set; UsageError naming the variable when one is malformed or out of range.
struct LaunchRank {
  int rank = 0, world = 1, local_rank = -1;
  std::string source;  // "OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE", ...
};
std::optional<LaunchRank> launch_rank_from_env();

// The NCCL library's version (e.g. 22809 for 2.28.9).
int nccl_version();

}  // namespace moelab
