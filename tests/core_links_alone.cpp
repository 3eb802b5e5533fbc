// moelab: a program that links only moelab_core (no HDF5, no Boost, no backend library). If
// core/ ever calls into the I/O layer or the backend registry again, this stops linking.
#include <cstdio>

#include "core/comm_sim.h"
#include "core/moe/config.h"
#include "core/tensor.h"

int main() {
  moelab::MoEConfig cfg;
  cfg.validate();
  moelab::Tensor t = moelab::host_tensor({1, 2, 3}, moelab::Shape{3}, moelab::DType::F64);
  int ranks_seen = 0;
  moelab::run_ranks(2, [&](int, moelab::Communicator& c) {
    std::vector<double> v = {1.0};
    c.all_reduce_host(v, moelab::ReduceOp::Sum);
    if (v[0] == 2.0 && c.rank() == 0) ranks_seen = c.size();
  });
  std::printf("core links alone: %lld elements, %d ranks\n", (long long)t.numel(), ranks_seen);
  return ranks_seen == 2 ? 0 : 1;
}
