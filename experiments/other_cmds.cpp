// moelab: `moelab bench`, which waits on later work: it fails with a message that says what to
// use meanwhile (main() prints moelab::Error as `moelab: error: ...` and exits 2).
#include "core/check.h"
#include "experiments/commands.h"

int run_bench(const moelab::RunConfig&, const BenchCliOptions&) {
  MOELAB_FAIL("bench is not available yet: meanwhile `moelab train` reports tokens/s and "
              "`moelab_gpu_tests \"[bench]\"` times the grouped expert GEMMs");
}
