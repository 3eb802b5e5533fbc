// moelab: parallel context (see parallel.h).
#include "core/parallel.h"

#include "core/check.h"

namespace moelab {

ParallelContext ParallelContext::make(Communicator& world, int ep, int dp) {
  MOELAB_CHECK(ep >= 1 && dp >= 1 && world.size() == ep * dp, "parallel context: ", world.size(),
               " ranks cannot be laid out as parallel.ep x parallel.dp = ", ep, " x ", dp);
  ParallelContext c;
  c.rank = world.rank();
  c.world = world.size();
  c.ep = ep;
  c.dp = dp;
  c.world_comm = &world;
  c.ep_comm = world.split(/*color=*/c.dp_rank(), /*key=*/c.ep_rank());
  c.expert_dp_comm = world.split(/*color=*/c.ep_rank(), /*key=*/c.dp_rank());
  if (c.world > 1) c.grad_world_comm = world.split(/*color=*/0, /*key=*/c.rank);
  if (dp > 1) c.grad_expert_dp_comm = world.split(/*color=*/c.ep_rank(), /*key=*/c.dp_rank());
  return c;
}

}  // namespace moelab
