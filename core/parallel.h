// moelab: the parallel context of one rank: which rank it is, and the communicators of its
// groups. Built once per run (collective: it splits the world) and passed down to the model and
// the trainer, never a global.
//
// Layout (Megatron-Core's order, experts innermost): world = ep * dp ranks,
//   rank = dp_index * ep + ep_index.
//   ep group:        the ep ranks with the same dp_index; the experts are sharded over them
//                    (rank ep_index holds experts [ep_index E/ep, (ep_index+1) E/ep)) and tokens
//                    travel between them by all-to-all.
//   expert-dp group: the dp ranks with the same ep_index; they hold the same experts, so the
//                    expert gradients are all-reduced over them.
//   world:           every rank; the global batch is split over all of them, so attention,
//                    norms, embeddings and the router (replicated everywhere) are all-reduced
//                    over the world, and the router's batch statistics too.
#pragma once
#include <memory>

#include "core/comm.h"

namespace moelab {

struct ParallelContext {
  int rank = 0, world = 1, ep = 1, dp = 1;
  Communicator* world_comm = nullptr;             // null for a single-rank run without one
  std::unique_ptr<Communicator> ep_comm;          // size ep
  std::unique_ptr<Communicator> expert_dp_comm;   // size dp
  // The gradient reduction's own copies of world and expert-dp (the latter only when dp > 1):
  // the reductions it starts during the backward pass (Communicator::start_all_reduce) run
  // beside the MoE layers' calls on the groups above, which must not queue behind them.
  std::unique_ptr<Communicator> grad_world_comm;
  std::unique_ptr<Communicator> grad_expert_dp_comm;

  int ep_rank() const { return rank % ep; }
  int dp_rank() const { return rank / ep; }
  bool distributed() const { return world_comm != nullptr && world > 1; }

  // Collective over `world` (its size must be ep * dp): splits the groups.
  static ParallelContext make(Communicator& world, int ep, int dp);
};

}  // namespace moelab
