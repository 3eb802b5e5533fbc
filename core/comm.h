// moelab: the communicator, the one interface through which ranks exchange data (expert and data
// parallelism). Two implementations: simulated ranks (one thread per rank in one process, CPU
// backend, shared memory; core/comm_sim.h) and NCCL (one GPU per rank; backends/cuda/nccl_comm.h).
//
// Rules for every call:
//   - collective: every rank of the communicator calls it, in the same order, with matching
//     arguments (dtypes, row widths, counts that agree across ranks);
//   - tensors live on the calling rank's backend (host memory for the CPU backend, device memory
//     for CUDA), are contiguous, and are allocated by the caller;
//   - results are deterministic: a reduction adds the ranks' values in rank order 0, 1, ..., so
//     every rank gets bit-identical results whatever the thread or stream timing;
//   - failure: a rank that fails calls abort(); every other rank's pending or later call then
//     throws moelab::Error naming the failed rank and its reason. A call that waits longer than
//     the timeout throws naming the ranks that never arrived.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace moelab {

enum class ReduceOp { Sum, Max };

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "sim" or "nccl", for messages and logs.
  virtual std::string kind() const = 0;

  // In place, elementwise over all ranks (f64, f32, bf16 (sum in fp32 on NCCL), i32).
  virtual void all_reduce(const Tensor& t, ReduceOp op) = 0;
  // all_reduce started without waiting for it, so that it runs beside the caller's next work (the
  // data-parallel gradient reduction overlapping the backward pass). It sees everything the
  // caller queued before the call (NCCL: the bound backend's stream; it runs on a stream of its
  // own); `t` must not be read or written until wait_started() returns. Started reductions
  // complete in the order started, every other call on this communicator waits for them first,
  // and errors surface in wait_started() or the next call. Same results as all_reduce. The
  // default (simulated ranks) reduces at once.
  virtual void start_all_reduce(const Tensor& t, ReduceOp op) { all_reduce(t, op); }
  // Until every started reduction is complete (and visible to the caller's later work).
  virtual void wait_started() {}
  // out [size * in.dim(0), ...] = the ranks' `in` concatenated along dim 0 in rank order.
  virtual void all_gather(const Tensor& in, const Tensor& out) = 0;
  // t = root's t on every rank.
  virtual void broadcast(const Tensor& t, int root) = 0;
  // Variable all-to-all along dim 0 (a row = the trailing dims): rows
  // [sum(send_rows[:r]), sum(send_rows[:r+1])) of `send` go to rank r; `recv` receives from rank
  // r recv_rows[r] rows, placed in rank order. recv_rows must equal what the peers send (use
  // exchange_counts first). Pairs with zero rows exchange nothing.
  virtual void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows,
                            const Tensor& recv, const std::vector<int64_t>& recv_rows) = 0;
  virtual void barrier() = 0;

  // Host-side small exchanges (counts, statistics, flags); no tensors needed.
  // out[r] = what rank r put in send[rank()]: the transpose of the count matrix.
  virtual std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send) = 0;
  // The ranks' vectors (all the same length) concatenated in rank order.
  virtual std::vector<int64_t> all_gather_host(const std::vector<int64_t>& v) = 0;
  virtual void all_reduce_host(std::vector<double>& v, ReduceOp op) = 0;

  // Ranks with the same color form a new communicator, ordered by (key, old rank) as
  // MPI_Comm_split and ncclCommSplit. Collective over this communicator.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // Marks this rank as failed with `reason`; never throws, never blocks.
  virtual void abort(const std::string& reason) noexcept = 0;
};

}  // namespace moelab
