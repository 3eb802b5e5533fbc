// moelab: the backend registry, the one place that knows which backends were compiled in, and
// the run environment it gives the trainer (core/ knows neither the backends nor NCCL).
#pragma once
#include <memory>
#include <optional>
#include <string>

#include "core/backend.h"
#include "core/trainer.h"

namespace moelab {

// "cpu" always; "cuda" where moelab was built with MOELAB_CUDA and a device is present
// (device: the CUDA device ordinal; ignored by the CPU backend).
std::unique_ptr<Backend> make_backend(const std::string& name, int device = 0);
// Whether a backend can be made here (compiled in and, for cuda, a device present).
bool backend_available(const std::string& name);
// Visible CUDA devices (0 without CUDA).
int cuda_devices();

// The environment of a run of `cfg`: its backend per rank (cuda: rank r on device r), and for
// several ranks the world (cpu: simulated ranks, one thread each; cuda: one thread per GPU over
// NCCL in this process). More ranks than visible GPUs is refused naming both numbers.
RunEnvironment default_environment(const RunConfig& cfg);

// This process's rank, world and rank within its node (-1 if unknown), from a launcher's
// variables (mpirun, srun, PMI; see backends/cuda/nccl_comm.h); nullopt when none is set or
// moelab was built without NCCL.
struct ProcessRank {
  int rank = 0, world = 1, local_rank = -1;
  std::string source;
};
std::optional<ProcessRank> process_rank_from_env();

// One rank of a run launched as one process per GPU (mpirun, srun, or by hand): this process
// is rank `rank` of `world`, on CUDA device `device`; the NCCL unique id travels through
// `id_file` (rank 0 writes it; a fresh path per launch on a file system every rank sees).
RunEnvironment process_environment(const RunConfig& cfg, int rank, int world, const std::string& id_file,
                                   int device);

// train(cfg, opts, default_environment(cfg)).
TrainResult train(const RunConfig& cfg, const TrainOptions& opts);

}  // namespace moelab
