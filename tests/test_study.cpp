// moelab tests: how many runs of a CPU study run at once (plan_jobs, core/preflight.h).
#include "catch_compat.h"
#include "core/check.h"
#include "core/preflight.h"
#include "test_util.h"

using namespace moelab;

namespace {
bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }
constexpr int64_t MiB = int64_t(1) << 20, GiB = int64_t(1) << 30;
}  // namespace

TEST_CASE("study: jobs follow the cores, the threads of a run, the memory and the runs", "[study]") {
  // The CI machine: 2 cores, the presets' runs (about 300 MiB each with the process).
  JobPlan p = plan_jobs(150, 1, 2, 300 * MiB, 23 * GiB, 0);
  CHECK(p.jobs == 2);
  CHECK(has(p.why, "2 cores / 1 thread per run = 2"));
  CHECK(plan_jobs(150, 1, 16, 300 * MiB, 64 * GiB, 0).jobs == 16);
  CHECK(plan_jobs(3, 1, 16, 300 * MiB, 64 * GiB, 0).jobs == 3);             // no more jobs than runs
  CHECK(plan_jobs(40, 4, 16, 300 * MiB, 64 * GiB, 0).jobs == 4);            // ep x dp = 4 threads a run
  CHECK(plan_jobs(40, 32, 16, 300 * MiB, 64 * GiB, 0).jobs == 1);           // at least one
  // Big models: half of the memory limit bounds the runs in flight.
  p = plan_jobs(40, 1, 16, 10 * GiB, 64 * GiB, 0);
  CHECK(p.jobs == 3);
  CHECK(has(p.why, "half of 64.0 GiB memory / 10.0 GiB per run = 3"));
  CHECK(plan_jobs(40, 1, 16, 100 * GiB, 64 * GiB, 0).jobs == 1);  // preflight refuses the run itself
  // --jobs N is taken as given (up to the runs), unless the runs would not fit in memory at all.
  CHECK(plan_jobs(150, 1, 2, 300 * MiB, 23 * GiB, 4).jobs == 4);
  CHECK(plan_jobs(3, 1, 2, 300 * MiB, 23 * GiB, 8).jobs == 3);
  CHECK(has(plan_jobs(150, 1, 2, 300 * MiB, 23 * GiB, 4).why, "--jobs 4"));
  CHECK(has(test::error_of([] { plan_jobs(40, 1, 16, 10 * GiB, 64 * GiB, 8); }),
            "train: --jobs 8: 8 runs at once need about 80.0 GiB of memory, more than the 64.0 GiB available"));
  CHECK(cpu_cores() >= 1);
}
