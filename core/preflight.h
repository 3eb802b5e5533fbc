// moelab: checks that run before any work starts, so that absurd sizes and impossible requests
// are refused with a moelab::UsageError (exit 2) naming the config keys responsible, instead of
// an int64 overflow (garbage sizes, SIGSEGV), a std::bad_alloc or the kernel's OOM killer hours
// into setting up.
//
// preflight_check(cfg): every size derived from the config is computed with overflow checks,
// then the memory a training run needs is estimated (estimate_memory) and compared with
// memory_limit_bytes(). The estimate, in bytes (e = the model dtype's size, 4 for f32; s = the
// optimizer state's size, 8 for f64 else 4; r = the router's size, 8 for f64 else 4):
//
//   P = V D (x2 when untied) + D                                  embedding, head, final norm
//     + L (2D + D (H dh) + 2 D (Hkv dh) + (H dh) D)                attention + norms per block
//     + Lm (D E (x2 for learned noise) + 3 E D F + 3 D Fs + D [shared gate])   MoE FFN blocks
//     + Ld (3 D Fd)                                                dense FFN blocks
//   weights = P (2e + 2s + [4 for bf16's fp32 master copies])     value, grad, AdamW m and v
//   activations per block (what forward keeps for backward):
//       attention  T (6 D + 2 Hkv dh + 2) e + B H S s   (s: the saved log-sum-exp, f32 or f64)
//       MoE FFN    4 T E r + 3 A r + R (2 D + 3 F) e [+ T (3 Fs + D) e with shared experts]
//       dense FFN  T (3 Fd + D) e
//   total = weights + (sum over blocks) + (one block again: backward's temporaries)
//           + T (3 V + 2 D) e (final norm, logits, their softmax and gradient)
// with V vocab, D d_model, L layers (Lm MoE and Ld dense blocks), H heads, Hkv kv_heads,
// dh = D / H, E experts, K top_k, F d_expert, Fs = shared_experts F, Fd the dense FFN width,
// B batch, S seq, T = B S, A = T K assignments (E C for expert choice), R = A rows through the
// experts (E C when padded to capacity C). It is meant as a lower bound (short-lived
// temporaries, allocator slack and the run log are not counted), so that what it refuses would
// not have fitted. On train.backend = cuda the activations live on the device, whose
// allocator refuses for itself; only the weights (copied to the host for checkpoints) are
// compared with the host's memory.
//
// check_eval_data(cfg, data): evaluation (log.eval_every > 0) needs validation batches; a Brown
// corpus without a validation file would log NaN losses, so it is refused up front.
#pragma once
#include <cstdint>
#include <string>

#include "core/io/config.h"

namespace moelab {

class DataSource;

// a * b, a + b; a UsageError "config: <what> = a * b overflows 64-bit integers" otherwise.
// `what` names the keys, e.g. "train.batch * train.seq".
int64_t checked_mul(int64_t a, int64_t b, const std::string& what);
int64_t checked_add(int64_t a, int64_t b, const std::string& what);

struct MemoryEstimate {
  int64_t params = 0;            // P, the parameter count
  int64_t weight_bytes = 0;      // values, gradients, optimizer state (and bf16 master copies)
  int64_t activation_bytes = 0;  // forward activations plus backward temporaries
  int64_t total_bytes = 0;       // what is compared with the limit (see the header comment)
  std::string largest;           // the largest term: "what (key = value, ...)"
};
// The estimate of the header comment; throws UsageError naming the keys on int64 overflow.
MemoryEstimate estimate_memory(const RunConfig& cfg);

// The memory a run may use: MOELAB_MEMORY_LIMIT_BYTES when set (a positive integer; otherwise a
// UsageError), else the physical memory (sysconf), lowered to a cgroup v2 memory.max if any.
int64_t memory_limit_bytes();

// Overflow checks on every size, then estimate_memory against memory_limit_bytes(). Throws
// UsageError naming the keys responsible. Call before allocating anything.
void preflight_check(const RunConfig& cfg);

// How many runs of a CPU study (a [sweep] or train.seeds) `moelab train` runs at once. Every run
// of a study is single-threaded (one OpenMP thread; simulated ranks one thread each, so
// threads_per_run = parallel.ep x dp) whatever the number of jobs, so that its numbers never
// depend on it (the last bits of a CPU run change with the OpenMP thread count). Independent
// runs need no synchronisation and scale with the cores, and at the presets' size (GEMMs of
// 512 x 64 x 128) one run is faster single-threaded than on Eigen's OpenMP threads (measured on
// the shared 2-core machine: 25 s vs 139 s for 600 steps), so:
//   auto (requested = 0): jobs = min(runs, cores / threads_per_run, memory_limit / 2 /
//                                    bytes_per_run), at least 1;
//   requested = N:        jobs = min(runs, N), refused (UsageError naming --jobs) when
//                         jobs * bytes_per_run exceeds memory_limit.
// bytes_per_run: a run's estimate_memory plus kProcessBytes (corpus, HDF5, the process). The
// model size enters through it: big runs get fewer jobs. `why` says how the number was chosen.
struct JobPlan {
  int64_t jobs = 1;
  std::string why;
};
constexpr int64_t kProcessBytes = int64_t(256) << 20;
JobPlan plan_jobs(int64_t runs, int64_t threads_per_run, int64_t cores, int64_t bytes_per_run,
                  int64_t memory_limit, int64_t requested);

// CPUs this process may use: its affinity mask, lowered to a cgroup v2 cpu.max quota if any.
int64_t cpu_cores();

// Refuses (UsageError naming log.eval_every and data.val_fraction / data.path, saying how to
// fix it) evaluation when `data` has no validation batches.
void check_eval_data(const RunConfig& cfg, const DataSource& data);

}  // namespace moelab
