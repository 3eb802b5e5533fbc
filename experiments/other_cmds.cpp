// moelab: the subcommands that wait on later work. Each fails with a message that says what it
// needs, so `moelab crosscheck` on today's build explains itself instead of doing nothing
// (main() prints moelab::Error as `moelab: error: ...` and exits 2).
#include "core/check.h"
#include "experiments/commands.h"

int run_bench(const moelab::RunConfig&, const BenchCliOptions&) {
  MOELAB_FAIL("bench is not available yet: it needs the CUDA backend (issue 5)");
}
