// moelab: simulated ranks, the Communicator of core/comm.h for one process: one thread per rank,
// exchanging through shared memory (CPU tensors, host pointers). It runs expert and data
// parallelism with the CPU backend in CI, and is the reference the NCCL communicator is compared
// with (tests/test_nccl_comm.cpp).
//
// How a collective runs: every rank posts its arguments (pointers, shapes, counts) in the group's
// shared slots and waits at a barrier; then each rank validates all the posts the same way (same
// collective, same dtype and sizes, all_to_all_v counts that match their peers': a mismatch
// throws the same moelab::Error on every rank) and reads its peers' buffers directly; a second
// barrier keeps every buffer alive until all peers have read it.
//
// Determinism: reductions add in rank order 0, 1, ..., n-1 (element i of the result is
// ((x0 + x1) + x2) + ...), computed once per element and copied to every rank, so all ranks get
// bit-identical results whatever the thread timing. Accumulation type: f64 in double, f32 in
// float, bf16 in float then rounded to bf16 once (round-to-nearest-even, bf16::from_float), i32
// in 32-bit wrap-around integers. Max propagates NaN. The host reductions (all_reduce_host) add
// doubles in rank order too.
//
// Failure: abort(reason) marks the rank failed in the world shared by every group split from it;
// every pending or later call of any rank then throws moelab::Error "... rank R failed: reason"
// (R = world rank; "world rank R" inside a sub-group). A call that waits longer than the
// timeout marks its own rank failed and throws naming the ranks that never arrived. Failure is
// permanent: after one, the world is unusable.
//
// split(color, key): MPI_Comm_split semantics; a negative color takes part in the split and gets
// nullptr (NCCL_SPLIT_NOCOLOR).
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "core/comm.h"

namespace moelab {

// One communicator per rank, rank r at index r; each is used from one thread (its rank's), and
// all must outlive every call on them. timeout_seconds bounds every wait for peers.
std::vector<std::unique_ptr<Communicator>> make_simulated_world(int ranks,
                                                                double timeout_seconds = 120);

// Runs fn(rank, comm) on `ranks` threads over a fresh simulated world and joins them all.
// Each rank's thread runs one OpenMP thread (omp_set_num_threads(1) where the program links an
// OpenMP runtime: Eigen inside the CPU backend then stays single-threaded per rank). A rank whose
// fn throws calls abort(what()) on its communicator, so the other ranks' calls stop with an
// error naming it. After the join, the root cause is rethrown as moelab::Error
// "rank R: <message>": the rank whose failure was recorded first (a thrown exception, or the
// first timeout), not the ranks that failed because of it.
void run_ranks(int ranks, const std::function<void(int rank, Communicator& comm)>& fn,
               double timeout_seconds = 120);

}  // namespace moelab
