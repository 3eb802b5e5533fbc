// moelab tests: the CUDA grouped GEMM kernels (backends/cuda/grouped_gemm_kernels.h: forward,
// dgrad, wgrad of the MoE experts, offsets read from device memory), run on the CPU through the
// warp/block emulation of tests/flash_emu.h, against a double-precision reference computed from
// the same bf16 inputs. Each kernel runs over the launchers' 1-D grids (surplus blocks included),
// for the production tile (ggemm::Big) and a smaller one (faster, more tiles per shape).
//
// What is checked: every output element within bf16 rounding of the reference
// (|got - ref| <= 2^-8 |ref| + 1e-4 rms(ref): the kernel's only error beyond fp32 accumulation is
// the final rounding to bf16), no NaN (with beta 0 the output starts as NaN, so an element nobody
// writes fails), untouched guard regions around every buffer (no write outside the output), and,
// for wgrad, experts without rows (beta dW[e]: zero or unchanged).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "flash_emu.h"
// The kernels: after the emulated platform above.
#include "backends/cuda/grouped_gemm_kernels.h"
#include "test_util.h"

using namespace moelab;
using namespace moelab::test;
namespace gg = moelab::ggemm;
namespace fl = moelab::flash;

namespace {

constexpr int64_t kGuard = 64;           // elements each side
constexpr uint16_t kGuardBits = 0xA5A5;  // guard pattern
constexpr uint16_t kNaN = 0x7FC0;        // bf16 quiet NaN: the "never written" marker

// A bf16 host buffer (raw bits) with guard regions on both sides; 16-byte aligned data.
struct Bf16Buf {
  std::vector<uint16_t> all;
  int64_t n = 0;
  explicit Bf16Buf(int64_t count) : all(size_t(count + 2 * kGuard + 8), kGuardBits), n(count) {}
  uint16_t* data() {
    uint16_t* p = all.data() + kGuard;
    while (reinterpret_cast<uintptr_t>(p) % 16) ++p;
    return p;
  }
  bool guards_ok() {
    const uint16_t* d = data();
    for (const uint16_t* p = all.data(); p < d; ++p)
      if (*p != kGuardBits) return false;
    for (const uint16_t* p = d + n; p < all.data() + all.size(); ++p)
      if (*p != kGuardBits) return false;
    return true;
  }
  double at(int64_t i) { return fl::fa_bf16_to_f(data()[i]); }
};

// A buffer of n random bf16 values (seeded); returns their exact values.
std::vector<double> fill_random(Bf16Buf& b, uint64_t seed) {
  std::vector<double> v(size_t(b.n));
  for (int64_t i = 0; i < b.n; ++i) {
    b.data()[i] = fl::fa_f_to_bf16(float(rng::normal(seed, uint64_t(i))));
    v[size_t(i)] = fl::fa_bf16_to_f(b.data()[i]);
  }
  return v;
}

std::vector<int32_t> offsets_of(const std::vector<int>& rows) {
  std::vector<int32_t> off(rows.size() + 1, 0);
  for (size_t e = 0; e < rows.size(); ++e) off[e + 1] = off[e] + rows[e];
  return off;
}

// Runs blocks 0 .. blocks-1 of a kernel body, one emulated block at a time.
template <class C>
void grid(int64_t blocks, bool reverse, const std::function<void(int, char*, int64_t)>& body) {
  for (int64_t b = 0; b < blocks; ++b)
    fl::emu::run_block(C::kThreads, C::kSmem, [&](int tid, char* sm) { body(tid, sm, b); }, reverse);
}

// Compares out (n elements) with ref; returns a description of the first failure, or "".
std::string compare(Bf16Buf& out, const std::vector<double>& ref) {
  double ss = 0;
  for (double r : ref) ss += r * r;
  const double rms = std::sqrt(ss / double(ref.size()));
  double worst = 0;
  for (int64_t i = 0; i < out.n; ++i) {
    const double got = out.at(i), r = ref[size_t(i)], d = std::fabs(got - r);
    if (!std::isfinite(got) || d > std::ldexp(std::fabs(r), -8) * 1.001 + 1e-4 * rms)
      return "element " + std::to_string(i) + ": got " + std::to_string(got) + ", expected " +
             std::to_string(r) + " (rms " + std::to_string(rms) + ")";
    worst = std::fmax(worst, d);
  }
  if (!out.guards_ok()) return "a write outside the output (guard region changed)";
  INFO("max |d| / rms(ref) = " << worst / rms);
  CHECK(worst / rms < 2e-2);
  return "";
}

enum class Kind { Forward, Dgrad, Wgrad };
const char* name(Kind k) { return k == Kind::Forward ? "forward" : k == Kind::Dgrad ? "dgrad" : "wgrad"; }

// One grouped GEMM of the given kind through the emulated kernel of tile C, checked against the
// reference. rows: per-expert row counts; K, N: the GEMM's inner / output widths as in
// core/backend.h (forward/dgrad: X [R, K], Y [R, N]; wgrad: X [R, K], dY [R, N], dW [E, K, N]).
template <class C>
void check_case(Kind kind, const std::vector<int>& rows, int K, int N, float beta, uint64_t seed,
                bool reverse = false) {
  const std::vector<int32_t> off = offsets_of(rows);
  const int E = int(rows.size()), R = off.back();
  INFO(name(kind) << " tile " << C::BM << "x" << C::BN << "x" << C::BK << " E=" << E << " R=" << R
                  << " K=" << K << " N=" << N << " beta=" << beta << (reverse ? " (reverse schedule)" : ""));
  Bf16Buf x(int64_t(R) * K);
  const std::vector<double> xv = fill_random(x, seed);
  // The second operand: W [E, K, N] or [E, N, K] (same size), or dY [R, N] for wgrad.
  Bf16Buf w(kind == Kind::Wgrad ? int64_t(R) * N : int64_t(E) * K * N);
  const std::vector<double> wv = fill_random(w, seed + 1);
  Bf16Buf y(kind == Kind::Wgrad ? int64_t(E) * K * N : int64_t(R) * N);
  std::vector<double> old(size_t(y.n), 0.0);
  if (beta != 0.0f) old = fill_random(y, seed + 2);
  else
    for (int64_t i = 0; i < y.n; ++i) y.data()[i] = kNaN;
  // Offsets live in their own buffer, as on the device.
  std::vector<int32_t> doff(off);

  gg::Params p;
  p.x = x.data();
  p.w = w.data();
  p.y = y.data();
  p.off = doff.data();
  p.E = E;
  p.R = R;
  p.K = K;
  p.N = N;
  p.beta = beta;

  std::vector<double> ref(size_t(y.n));
  if (kind == Kind::Wgrad) {
    for (int e = 0; e < E; ++e)
      for (int k = 0; k < K; ++k)
        for (int n = 0; n < N; ++n) {
          double s = 0;
          for (int r = off[size_t(e)]; r < off[size_t(e) + 1]; ++r)
            s += xv[size_t(int64_t(r) * K + k)] * wv[size_t(int64_t(r) * N + n)];
          const size_t i = size_t((int64_t(e) * K + k) * N + n);
          ref[i] = s + double(beta) * old[i];
        }
    grid<C>(gg::wgrad_blocks<C>(E, K, N), reverse,
            [&](int tid, char* sm, int64_t b) { gg::wgrad<C>(p, sm, tid, b); });
  } else {
    const bool tw = kind == Kind::Dgrad;
    for (int e = 0; e < E; ++e)
      for (int r = off[size_t(e)]; r < off[size_t(e) + 1]; ++r)
        for (int n = 0; n < N; ++n) {
          double s = 0;
          for (int k = 0; k < K; ++k) {
            const int64_t wi = tw ? (int64_t(e) * N + n) * K + k : (int64_t(e) * K + k) * N + n;
            s += xv[size_t(int64_t(r) * K + k)] * wv[size_t(wi)];
          }
          const size_t i = size_t(int64_t(r) * N + n);
          ref[i] = s + double(beta) * old[i];
        }
    const int64_t blocks = gg::fwd_blocks<C>(R, E, N);
    if (tw)
      grid<C>(blocks, reverse, [&](int tid, char* sm, int64_t b) { gg::forward<C, true>(p, sm, tid, b); });
    else
      grid<C>(blocks, reverse, [&](int tid, char* sm, int64_t b) { gg::forward<C, false>(p, sm, tid, b); });
  }
  const std::string err = compare(y, ref);
  INFO(err);
  CHECK(err.empty());
  CHECK(x.guards_ok());
  CHECK(w.guards_ok());
}

// A 64 x 64 x 32 tile, 4 warps of 32 x 32, 3 stages, n-tiles rasterized in groups of 2 (so that
// 3 n-tiles make a full and a partial group): the same code with more tiles per shape.
using Small = gg::Cfg<64, 64, 32, 2, 2, 3, 2>;

template <class C> void all_kinds(const std::vector<int>& rows, int K, int N, uint64_t seed) {
  for (Kind kind : {Kind::Forward, Kind::Dgrad, Kind::Wgrad})
    for (float beta : {0.0f, 1.0f}) check_case<C>(kind, rows, K, N, beta, seed);
}

}  // namespace

TEST_CASE("grouped gemm (emulated): uneven experts, empty ones, edges of every tile", "[ggemm]") {
  // Experts with 37, 0, 1, 130, 0 and 64 rows: an empty expert in the middle, a 1-row expert,
  // counts that are and are not multiples of the tile; K = 72 (two k-tiles and a quarter), N = 136
  // (two n-tiles and 8 columns).
  all_kinds<Small>({37, 0, 1, 130, 0, 64}, 72, 136, 101);
}

TEST_CASE("grouped gemm (emulated): one expert, and more experts than tiles", "[ggemm]") {
  all_kinds<Small>({100}, 40, 24, 202);                           // E = 1, N below one tile
  all_kinds<Small>({0, 3, 0, 0, 5, 0, 1, 0, 0, 2, 0}, 16, 8, 303);  // E = 11, R = 11: first and last empty
}

TEST_CASE("grouped gemm (emulated): the production tile (128 x 128 x 32, 8 warps, 4 stages)", "[ggemm]") {
  all_kinds<gg::Big>({130, 1, 0, 200}, 168, 136, 404);
}

TEST_CASE("grouped gemm (emulated): the other schedule order gives the same result", "[ggemm]") {
  check_case<Small>(Kind::Forward, {70, 9}, 48, 72, 1.0f, 505, true);
  check_case<Small>(Kind::Dgrad, {70, 9}, 48, 72, 0.0f, 506, true);
  check_case<Small>(Kind::Wgrad, {70, 0, 9}, 48, 72, 1.0f, 507, true);
}

TEST_CASE("grouped gemm (emulated): larger shapes", "[.][ggemm][slow]") {
  all_kinds<gg::Big>({300, 0, 517, 1, 129, 256, 0, 40}, 264, 392, 606);
  all_kinds<Small>({1000, 3, 0, 250}, 200, 200, 707);
}

// The wgmma kernel's slot lookup (gg_slot_expert: a binary search over the slot starts) against
// the definition the mma.sync kernel tests slot by slot (expert e owns slots [floor(off[e] / BM) +
// e, floor(off[e+1] / BM) + e + 1)), and the tiles it yields cover every row of every expert
// exactly once: hand-made layouts (one expert, all empty, counts at and around the tile) and
// random ones with many empty experts.
TEST_CASE("grouped gemm: the wgmma kernel's slot lookup covers every row once", "[ggemm]") {
  constexpr int BM = 128;
  std::vector<std::vector<int32_t>> layouts = {
      {0}, {5}, {0, 0, 0}, {128}, {129, 0, 127, 128, 1}, {0, 0, 256, 0, 0}, {1, 1, 1, 1, 1, 1, 1}};
  for (int E : {7, 64, 300})
    for (uint64_t seed = 0; seed < 3; ++seed) {
      std::vector<int32_t> rows(static_cast<size_t>(E));
      for (int e = 0; e < E; ++e) {
        const uint64_t c = uint64_t(E) * 1000 + seed * 100000 + uint64_t(e);
        rows[size_t(e)] = rng::uniform(31, c) < 0.4 ? 0 : 1 + int32_t(400.0 * rng::uniform(32, c));
      }
      layouts.push_back(rows);
    }
  for (const auto& rows : layouts) {
    const int E = int(rows.size());
    std::vector<int32_t> off(rows.size() + 1, 0);
    for (size_t e = 0; e < rows.size(); ++e) off[e + 1] = off[e] + rows[e];
    const int R = off.back(), slots = R / BM + E;
    auto start = [&](int e) { return off[size_t(e)] / BM + e; };
    std::vector<int> covered(size_t(R), 0);
    int mismatches = 0;
    for (int slot = 0; slot < slots; ++slot) {
      const int e = gg::gg_slot_expert<BM>(off.data(), E, slot);
      int def = -1, owners = 0;
      for (int x = 0; x < E; ++x)
        if (slot >= start(x) && slot < off[size_t(x) + 1] / BM + x + 1) def = x, ++owners;
      if (e != def || owners != 1) ++mismatches;
      const int row0 = off[size_t(e)] + (slot - start(e)) * BM;
      for (int r = row0; r < std::min(row0 + BM, off[size_t(e) + 1]); ++r) ++covered[size_t(r)];
    }
    INFO("E = " << E << ", R = " << R);
    CHECK(mismatches == 0);
    CHECK(std::count(covered.begin(), covered.end(), 1) == R);
  }
}
