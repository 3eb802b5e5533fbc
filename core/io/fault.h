// moelab: fault injection for the write paths (run log, checkpoints, sweep index).
//
// Every place where a write can fail for real (an HDF5 call of the run log, a write(), fsync(),
// close() or rename() of a checkpoint, ...) calls fault::point("SITE") first, with SITE a dotted
// name such as "log.dataset" or "ckpt.write". Unarmed, a point only counts its hits (cheap: one
// string compare). Armed, the N-th hit of a site whose name starts with a prefix either throws
// moelab::Error("injected fault at SITE (hit N)"), which the caller handles exactly like a real
// I/O error, or raises SIGKILL there, a crash in the middle of the write.
//
// Arming: MOELAB_FAULT="PREFIX:N[:fail|kill]" in the environment (read at the first point; the
// command-line fault tests use it), or fault::arm() (the in-process tests). N = 0 arms nothing
// and prints "moelab: fault points: K hits of 'PREFIX'" to stderr at exit, so a test can learn
// how many points a run passes and choose among them. Sites in use: log.create, log.write,
// log.flush, log.close, log.fsync, log.verify, log.rename (run_log.cpp); ckpt.open, ckpt.write,
// ckpt.fsync, ckpt.close, ckpt.rename (checkpoint.cpp); ckpt.owner (the folder's run-id file);
// sweep.index (sweep.json); st.open, st.write, st.fsync, st.rename (safetensors.cpp).
#pragma once
#include <cstdint>
#include <string>

namespace moelab::fault {

enum class Action { Fail, Kill };

// Counts a hit of `site` and fails or kills when it is the armed one.
void point(const char* site);

// Arms the n-th (1-based, counted from now) hit of any site starting with `prefix`. Resets counts.
void arm(const std::string& prefix, int64_t n, Action action = Action::Fail);
// Disarms and resets the counts.
void disarm();
// Hits since the last arm()/disarm() of sites starting with `prefix` ("" = all).
int64_t hits(const std::string& prefix = "");
// Whether the armed fault has fired since the last arm().
bool fired();

}  // namespace moelab::fault
