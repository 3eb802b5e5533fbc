// moelab tests: the cross-backend op test (ggml's test-backend-ops; DESIGN.md rule 5).
//
// Every Backend op, forward and backward, runs on the CUDA backend in f32 and in bf16 and on the
// CPU reference in f64, on the same inputs: random values drawn from a fresh seed each run (set
// MOELAB_TEST_SEED to replay one; the seed is printed with every failure), rounded to the GPU
// dtype first, so that the comparison measures the op and not the rounding of its inputs.
//
// Comparison, per output:
//   - floats: normalised MSE = sum (gpu - cpu)^2 / sum cpu^2 under the dtype's threshold below
//     (sum cpu^2 == 0: the plain sum of squares); a NaN or Inf on the GPU never passes;
//   - integers (capacity masks, dispatch rows, counts): exactly;
//   - expert choices (top-k indices, expert-choice tokens): as sets per row;
//   - losses and statistics: the scalar's squared relative error against the same threshold.
// Each GPU output lives between two guard regions filled with a byte pattern; a write outside
// the output changes them and fails the op. Outputs that an op overwrites start as NaN on the
// GPU, so an element the kernel forgets to write fails too.
//
// One TEST_CASE per op family, tag [gpu]. Without a CUDA device each test WARNs and returns
// (Catch2 2.13 has no SKIP), so CPU-only CI passes. Each family ends with one report that names
// the first op that diverged; MOELAB_GPU_REPORT=FILE appends every comparison to FILE as
// markdown table rows (op, dtype, output, NMSE, threshold, result).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_runtime.h>  // events for the [bench][ggemm] case

#include "backends/cpu/cpu_backend.h"
#include "core/moe/config.h"
#include "core/moe/moe_layer.h"
#include "backends/cuda/cuda_backend.h"
#include "catch_compat.h"
#include "core/backend.h"
#include "core/rng.h"

using namespace moelab;

namespace {

// ---- thresholds ------------------------------------------------------------------------------
// f32: rounding an exact result to f32 alone gives NMSE ~ 2^-48 (~4e-15); fp32 kernels add a
// few ulps per element, and fp32 accumulation over K terms grows it to ~K * 2^-48 (~1e-12 for
// the K <= 200 used here). 1e-10 leaves two orders of margin, while one wrong element among
// a thousand (NMSE ~1e-3) or a wrong expert (~1e-2) fails by seven orders.
// bf16: 8 significant bits; rounding an exact result to bf16 alone gives NMSE ~ 2^-16 / 12 *
// ~0.6 (~3e-6; measured on the H200: 1e-6 .. 5e-6); ops whose second stage reads an
// intermediate rounded to bf16 (flash attention: the probabilities before P V, the score
// gradient before dS K and dS^T Q) add about as much again (measured up to 6e-6 with the
// earlier attention; the CPU emulation of the flash kernels gives 2e-6 .. 6e-6). 5e-5 leaves ~10x over that, and a single wrong
// element among a thousand still fails by more than an order of magnitude.
constexpr double kNmseF32 = 1e-10;
constexpr double kNmseBf16 = 5e-5;
double threshold(DType dt) { return dt == DType::BF16 ? kNmseBf16 : kNmseF32; }

const DType kDtypes[] = {DType::F32, DType::BF16};

uint64_t run_seed() {
  static const uint64_t seed = [] {
    if (const char* s = std::getenv("MOELAB_TEST_SEED")) return uint64_t(std::strtoull(s, nullptr, 0));
    std::random_device rd;
    const uint64_t t = uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
    return rng::mix64((uint64_t(rd()) << 32) ^ rd() ^ t);
  }();
  return seed;
}

Backend& cpu() {
  static std::unique_ptr<Backend> b = make_cpu_backend();
  return *b;
}
bool gpu_present() { return cuda_device_count() > 0; }
// Never destroyed: tearing a cuBLAS handle down after the CUDA runtime has begun its own exit
// teardown is not safe, and the process is ending anyway.
Backend& gpu() {
  static Backend* b = make_cuda_backend().release();
  return *b;
}

// N(0, scale^2) draws, deterministic from seed (rng::normal(seed, i) for element i), as a tensor
// of dtype dt on backend b.
Tensor normal_on(Backend& b, Shape s, uint64_t seed, DType dt, double scale = 1.0) {
  std::vector<double> v(static_cast<size_t>(s.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = scale * rng::normal(seed, i);
  return b.from_host(host_tensor(v, s, dt));
}

#define GPU_OR_SKIP()                                                               \
  do {                                                                              \
    if (!gpu_present()) {                                                           \
      WARN("no CUDA device visible: GPU op test skipped");                          \
      return;                                                                       \
    }                                                                               \
  } while (0)

uint64_t hash_str(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (char ch : s) h = (h ^ uint64_t(uint8_t(ch))) * 1099511628211ULL;
  return h;
}

std::string fmt(double v) {
  std::ostringstream os;
  os.precision(3);
  os << std::scientific << v;
  return os.str();
}

// ---- report ------------------------------------------------------------------------------------

struct Result {
  std::string op, dtype, output, kind;  // kind: nmse | exact | sets | scalar
  double nmse = 0, threshold = 0;
  bool pass = true;
  std::string note;
};

// One op family (one TEST_CASE): collects the comparisons and names the first divergence.
class Family {
 public:
  explicit Family(std::string name) : name_(std::move(name)) {}
  void add(Result r) { results_.push_back(std::move(r)); }

  void finish() {
    write_report();
    const Result* first = nullptr;
    int failed = 0;
    std::ostringstream all;
    for (const Result& r : results_)
      if (!r.pass) {
        if (!first) first = &r;
        ++failed;
        all << "  " << r.op << " (" << r.dtype << ") " << r.output << ": " << describe(r) << "\n";
      }
    if (first) {
      FAIL_CHECK(name_ << ": " << failed << " of " << results_.size()
                       << " comparisons failed; first diverging op: " << first->op << " ("
                       << first->dtype << ") output " << first->output << ": " << describe(*first)
                       << " [seed " << run_seed() << ", rerun with MOELAB_TEST_SEED=" << run_seed()
                       << "]\n" << all.str());
    }
    CHECK(failed == 0);
    CHECK(!results_.empty());
  }

 private:
  static std::string describe(const Result& r) {
    std::string s;
    if (r.kind == "exact" || r.kind == "sets")
      s = r.pass ? "match" : "mismatch";
    else
      s = "NMSE " + fmt(r.nmse) + (r.pass ? " <= " : " > ") + fmt(r.threshold);
    return r.note.empty() ? s : s + " (" + r.note + ")";
  }

  void write_report() const {
    const char* path = std::getenv("MOELAB_GPU_REPORT");
    if (!path) return;
    std::ofstream f(path, std::ios::app);
    for (const Result& r : results_) {
      const bool exact = r.kind == "exact" || r.kind == "sets";
      f << "| " << name_ << " | " << r.op << " | " << r.dtype << " | " << r.output << " | "
        << (exact ? (r.kind == "sets" ? "sets per row" : "exact") : fmt(r.nmse)) << " | "
        << (exact ? "-" : fmt(r.threshold)) << " | " << (r.pass ? "pass" : "FAIL")
        << (r.note.empty() ? "" : " (" + r.note + ")") << " |\n";
    }
  }

  std::string name_;
  std::vector<Result> results_;
};

// ---- one op on one dtype --------------------------------------------------------------------------

struct Pair {  // the same input on both backends
  Tensor c;    // CPU reference (f64, or i32 / f32 where the op fixes the dtype)
  Tensor g;    // GPU (the case's dtype, or fixed)
};

struct Out {
  std::string name;
  Tensor c, g;     // g is the interior of `full`
  Tensor full;     // [guard | output | guard] on the GPU, 1-D
  int64_t guard = 0;
};

constexpr int64_t kGuard = 64;     // elements of guard on each side
constexpr uint8_t kGuardByte = 0xA5;

class Case {
 public:
  Case(Family& fam, Backend& g, std::string op, DType dt)
      : gpu(g), dt(dt), fam_(fam), op_(std::move(op)),
        seed_(rng::derive(run_seed(), hash_str(op_ + to_string(dt)))) {}

  Backend& gpu;
  const DType dt;

  // Whether the GPU runs `op` in this case's dtype; if not, the call must throw NotSupported
  // (checked with `gpu_call`) and the case is recorded as such.
  bool supported(Op op, const std::function<void()>& gpu_call) {
    if (gpu.supports(op, dt)) return true;
    bool threw = false;
    try {
      gpu_call();
    } catch (const NotSupported&) {
      threw = true;
    }
    fam_.add(Result{op_, to_string(dt), "-", "exact", 0, 0, threw,
                    threw ? "not supported: throws NotSupported" : "unsupported but did not throw"});
    return false;
  }

  // ---- inputs ----------------------------------------------------------------------------------
  Pair values(Shape s, const std::vector<double>& v, DType gdt) {
    Tensor hg = host_tensor(v, s, gdt);
    const DType cdt = gdt == DType::I32 ? DType::I32 : DType::F64;
    return Pair{host_tensor(host_values(hg), s, cdt), gpu.from_host(hg)};
  }
  Pair values(Shape s, const std::vector<double>& v) { return values(s, v, dt); }
  Pair gen(Shape s, const std::function<double(int64_t)>& f, DType gdt) {
    std::vector<double> v(size_t(s.numel()));
    for (int64_t i = 0; i < s.numel(); ++i) v[size_t(i)] = f(i);
    return values(s, v, gdt);
  }
  Pair randn(Shape s, double scale = 1.0, double shift = 0.0) {
    const uint64_t sd = next_seed();
    return gen(s, [&](int64_t i) { return shift + scale * rng::normal(sd, uint64_t(i)); }, dt);
  }
  // N(0, scale^2) values in another dtype than the case's (mixed-precision ops).
  Pair randn_as(DType gdt, Shape s, double scale = 1.0) {
    const uint64_t sd = next_seed();
    return gen(s, [&](int64_t i) { return scale * rng::normal(sd, uint64_t(i)); }, gdt);
  }
  Pair uniform(Shape s, double lo, double hi, DType gdt) {
    const uint64_t sd = next_seed();
    return gen(s, [&](int64_t i) { return lo + (hi - lo) * rng::uniform(sd, uint64_t(i)); }, gdt);
  }
  Pair uniform(Shape s, double lo, double hi) { return uniform(s, lo, hi, dt); }
  Pair ints(Shape s, const std::vector<int>& v) {
    return values(s, std::vector<double>(v.begin(), v.end()), DType::I32);
  }
  // The same values in a GPU tensor that starts 1 element past an allocation (off 16-byte
  // alignment): kernels with aligned fast paths must fall back.
  Pair unaligned(const Pair& p) {
    const int64_t n = p.g.numel();
    Tensor flat = gpu.empty(Shape{n + 1}, p.g.dtype());
    Tensor view = flat.view_rows(1, n + 1).reshape(p.g.shape());
    gpu.copy(host_tensor(host_values(p.c), p.g.shape(), p.g.dtype()), view);
    return Pair{p.c, view};
  }
  // A CPU f64 (or i32) result used as the next op's input, rounded to the case's dtype.
  Pair from_cpu(const Tensor& c) {
    return values(c.shape(), host_values(c), c.dtype() == DType::I32 ? DType::I32 : dt);
  }
  // Row-wise softmax of N(0, scale^2) logits: router-like probabilities.
  Pair probs(int64_t T, int64_t E, double scale = 1.5) {
    const uint64_t sd = next_seed();
    std::vector<double> v(size_t(T * E));
    for (int64_t t = 0; t < T; ++t) {
      double m = -1e300, z = 0;
      for (int64_t e = 0; e < E; ++e) m = std::max(m, v[t * E + e] = scale * rng::normal(sd, uint64_t(t * E + e)));
      for (int64_t e = 0; e < E; ++e) z += (v[t * E + e] = std::exp(v[t * E + e] - m));
      for (int64_t e = 0; e < E; ++e) v[t * E + e] /= z;
    }
    return values(Shape{T, E}, v);
  }

  // ---- outputs -----------------------------------------------------------------------------------
  // Overwritten output: NaN (float) or a sentinel (i32) inside the guards on the GPU.
  Out out(const std::string& name, Shape s, DType gdt) {
    const int64_t n = s.numel();
    std::vector<double> init(size_t(n), gdt == DType::I32 ? -123456789.0
                                                          : std::numeric_limits<double>::quiet_NaN());
    return make_out(name, s, gdt, init);
  }
  Out out(const std::string& name, Shape s) { return out(name, s, dt); }
  // Accumulated (or in/out) output: the same initial values on both sides.
  Out acc(const std::string& name, const Pair& init) {
    return make_out(name, init.c.shape(), init.g.dtype(), host_values(init.c));
  }
  Out acc(const std::string& name, Shape s, double scale = 1.0) { return acc(name, randn(s, scale)); }

  // ---- checks ----------------------------------------------------------------------------------------
  void close(const Out& o) {
    std::string note;
    const bool guards = guards_ok(o, &note);
    const auto a = gpu_values(o), b = host_values(o.c);
    double num = 0, den = 0;
    bool finite = true;
    for (size_t i = 0; i < a.size(); ++i) {
      if (!std::isfinite(a[i])) finite = false;
      num += (a[i] - b[i]) * (a[i] - b[i]);
      den += b[i] * b[i];
    }
    const double nmse = finite ? (den > 0 ? num / den : num) : std::numeric_limits<double>::infinity();
    if (!finite) note = join(note, "non-finite values on the GPU");
    // A bf16 output (a cast to bf16 from an f32 case) carries bf16 rounding whatever the inputs.
    const double thr = o.g.dtype() == DType::BF16 ? kNmseBf16 : threshold(dt);
    fam_.add(Result{op_, to_string(dt), o.name, "nmse", nmse, thr, finite && guards && nmse <= thr, note});
  }

  // An output whose reference is zero up to f64 rounding (NMSE has no scale there): every GPU
  // value within atol.
  void near_zero(const Out& o, double atol) {
    std::string note;
    const bool guards = guards_ok(o, &note);
    const auto a = gpu_values(o), b = host_values(o.c);
    double worst = 0, ref = 0;
    bool finite = true;
    for (size_t i = 0; i < a.size(); ++i) {
      if (!std::isfinite(a[i])) finite = false;
      worst = std::max(worst, std::abs(a[i]));
      ref = std::max(ref, std::abs(b[i]));
    }
    note = join(note, "reference ~0 (max " + fmt(ref) + "): max |gpu| " + fmt(worst) + " vs " + fmt(atol));
    fam_.add(Result{op_, to_string(dt), o.name, "nmse", worst, atol,
                    finite && guards && ref <= 1e-12 && worst <= atol, note});
  }

  void exact(const Out& o) {
    std::string note;
    const bool guards = guards_ok(o, &note);
    const auto a = gpu_values(o), b = host_values(o.c);
    int64_t bad = 0, first = -1;
    for (size_t i = 0; i < a.size(); ++i)
      if (a[i] != b[i]) {
        if (first < 0) first = int64_t(i);
        ++bad;
      }
    if (bad)
      note = join(note, std::to_string(bad) + " of " + std::to_string(a.size()) +
                            " differ, first at " + std::to_string(first) + ": gpu " +
                            std::to_string(a[first]) + " cpu " + std::to_string(b[first]));
    fam_.add(Result{op_, to_string(dt), o.name, "exact", 0, 0, guards && bad == 0, note});
  }

  // Rows of a 2-D index output compared as sets; a row in another order is noted, not failed.
  void sets(const Out& o) {
    std::string note;
    const bool guards = guards_ok(o, &note);
    auto a = gpu_values(o), b = host_values(o.c);
    const int64_t rows = o.c.dim(0), k = o.c.dim(1);
    int64_t bad = 0, reordered = 0, first = -1;
    for (int64_t r = 0; r < rows; ++r) {
      auto ra = std::vector<double>(a.begin() + r * k, a.begin() + (r + 1) * k);
      auto rb = std::vector<double>(b.begin() + r * k, b.begin() + (r + 1) * k);
      const bool same_order = ra == rb;
      std::sort(ra.begin(), ra.end());
      std::sort(rb.begin(), rb.end());
      if (ra != rb) {
        if (first < 0) first = r;
        ++bad;
      } else if (!same_order) {
        ++reordered;
      }
    }
    if (bad) note = join(note, std::to_string(bad) + " of " + std::to_string(rows) + " rows differ, first row " + std::to_string(first));
    if (reordered) note = join(note, std::to_string(reordered) + " rows in another order");
    fam_.add(Result{op_, to_string(dt), o.name, "sets", 0, 0, guards && bad == 0, note});
  }

  void scalar(const std::string& name, double g, double c) {
    const bool finite = std::isfinite(g);
    const double err = (g - c) * (g - c), nmse = finite ? (c != 0 ? err / (c * c) : err)
                                                        : std::numeric_limits<double>::infinity();
    const double thr = threshold(dt);
    fam_.add(Result{op_, to_string(dt), name, "scalar", nmse, thr, finite && nmse <= thr,
                    "gpu " + fmt(g) + " cpu " + fmt(c)});
  }

  void vec(const std::string& name, const std::vector<double>& g, const std::vector<double>& c) {
    double num = 0, den = 0;
    bool finite = g.size() == c.size();
    for (size_t i = 0; finite && i < g.size(); ++i) {
      if (!std::isfinite(g[i])) finite = false;
      num += (g[i] - c[i]) * (g[i] - c[i]);
      den += c[i] * c[i];
    }
    const double nmse = finite ? (den > 0 ? num / den : num) : std::numeric_limits<double>::infinity();
    const double thr = threshold(dt);
    fam_.add(Result{op_, to_string(dt), name, "nmse", nmse, thr, finite && nmse <= thr, ""});
  }

  template <class V> void exact_vec(const std::string& name, const V& g, const V& c) {
    const bool ok = g == c;
    fam_.add(Result{op_, to_string(dt), name, "exact", 0, 0, ok, ok ? "" : "values differ"});
  }
  void exact_value(const std::string& name, int64_t g, int64_t c) {
    fam_.add(Result{op_, to_string(dt), name, "exact", 0, 0, g == c,
                    g == c ? "" : "gpu " + std::to_string(g) + " cpu " + std::to_string(c)});
  }

 private:
  uint64_t next_seed() { return rng::derive(seed_, ++draws_); }

  static std::string join(const std::string& a, const std::string& b) {
    return a.empty() ? b : a + "; " + b;
  }

  Out make_out(const std::string& name, Shape s, DType gdt, const std::vector<double>& init) {
    const int64_t n = s.numel();
    Out o;
    o.name = name;
    o.guard = kGuard;
    o.c = host_tensor(init, s, gdt == DType::I32 ? DType::I32 : DType::F64);
    // Guard pattern over the whole buffer, then the initial values in the interior.
    Tensor pattern = host_tensor(std::vector<double>(size_t(n + 2 * kGuard), 0.0),
                                 Shape{n + 2 * kGuard}, gdt);
    std::memset(pattern.data(), kGuardByte, pattern.nbytes());
    o.full = gpu.from_host(pattern);
    o.g = o.full.view_rows(kGuard, kGuard + n).reshape(s);
    gpu.copy(host_tensor(init, s, gdt), o.g);
    return o;
  }

  bool guards_ok(const Out& o, std::string* note) const {
    Tensor h = gpu.to_host(o.full);
    const size_t es = dtype_size(h.dtype()), gb = size_t(o.guard) * es;
    const auto* p = static_cast<const uint8_t*>(h.data());
    const size_t total = h.nbytes();
    size_t bad_lo = 0, bad_hi = 0;
    for (size_t i = 0; i < gb; ++i) {
      bad_lo += p[i] != kGuardByte;
      bad_hi += p[total - gb + i] != kGuardByte;
    }
    if (bad_lo || bad_hi)
      *note = "guard bytes overwritten: " + std::to_string(bad_lo) + " before, " +
              std::to_string(bad_hi) + " after the output";
    return bad_lo == 0 && bad_hi == 0;
  }

  std::vector<double> gpu_values(const Out& o) const {
    Tensor h = gpu.to_host(o.full);
    const auto all = host_values(h);
    return std::vector<double>(all.begin() + o.guard, all.end() - o.guard);
  }

  Family& fam_;
  std::string op_;
  uint64_t seed_;
  uint64_t draws_ = 0;
};

#define SEED_INFO() INFO("seed " << run_seed() << " (replay with MOELAB_TEST_SEED=" << run_seed() << ")")

// Integer helpers for routing inputs built on the CPU reference.
Tensor cpu_topk(const Tensor& scores_f64, int64_t k) {
  Tensor idx = cpu().empty(Shape{scores_f64.dim(0), k}, DType::I32);
  cpu().topk(scores_f64, Tensor(), idx);
  return idx;
}

}  // namespace

// =====================================================================================================

TEST_CASE("gpu ops: fill, cast, axpy, transpose, scale, sum_squares", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("elementwise");
  Backend& g = gpu();
  for (DType dt : kDtypes) {
    {
      Case k(fam, g, "fill", dt);
      Out o = k.out("x", Shape{37, 19});
      cpu().fill(o.c, 0.37);
      g.fill(o.g, 0.37);
      k.close(o);
      Out oi = k.out("x (i32)", Shape{5, 7}, DType::I32);
      cpu().fill(oi.c, -7);
      g.fill(oi.g, -7);
      k.exact(oi);
    }
    for (DType to : {DType::F32, DType::BF16, DType::F64, DType::I32}) {
      Case k(fam, g, std::string("cast to ") + to_string(to), dt);
      Pair x = k.randn(Shape{23, 31}, 3.0);
      Out o = k.out("dst", Shape{23, 31}, to);
      cpu().cast(x.c, o.c);
      g.cast(x.g, o.g);
      if (to == DType::I32) k.exact(o);
      else k.close(o);
    }
    for (Shape s : {Shape{41, 29}, Shape{40, 32}}) {  // scalar, and 16-byte vectors
      Case k(fam, g, "axpy " + std::to_string(s.numel()), dt);
      Pair x = k.randn(s);
      Out y = k.acc("y", s);
      if (k.supported(Op::Axpy, [&] { g.axpy(0.7, x.g, y.g); })) {
        cpu().axpy(0.7, x.c, y.c);
        g.axpy(0.7, x.g, y.g);
        k.close(y);
      }
    }
    {
      Case k(fam, g, "transpose", dt);
      Pair x = k.randn(Shape{37, 53});
      Out y = k.out("y", Shape{53, 37});
      cpu().transpose(x.c, y.c);
      g.transpose(x.g, y.g);
      k.close(y);
    }
    {
      Case k(fam, g, "scale", dt);
      Out x = k.acc("x", Shape{31, 17});
      cpu().scale(x.c, -1.3);
      g.scale(x.g, -1.3);
      k.close(x);
    }
    {
      // 16-byte vectors with no tail, with a tail, and over many blocks
      for (Shape s : {Shape{1000, 7}, Shape{1001, 7}, Shape{3001, 1001}}) {
        Case k(fam, g, "sum_squares " + std::to_string(s.numel()), dt);
        Pair x = k.randn(s);
        k.scalar("value", g.sum_squares(x.g), cpu().sum_squares(x.c));
      }
    }
  }
  fam.finish();
}

TEST_CASE("gpu ops: gemm", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("gemm");
  Backend& g = gpu();
  const int64_t M = 67, N = 45, K = 129;
  for (DType dt : kDtypes)
    for (int t = 0; t < 4; ++t)
      for (double beta : {0.0, 0.5}) {
        const bool ta = t & 1, tb = t & 2;
        Case k(fam, g, std::string("gemm ") + (ta ? "T" : "N") + (tb ? "T" : "N") + " beta " + (beta ? "0.5" : "0"), dt);
        Pair a = k.randn(ta ? Shape{K, M} : Shape{M, K});
        Pair b = k.randn(tb ? Shape{N, K} : Shape{K, N});
        Out c = beta ? k.acc("C", Shape{M, N}) : k.out("C", Shape{M, N});  // beta 0 ignores NaN C
        cpu().gemm(ta, tb, 0.8, a.c, b.c, beta, c.c);
        g.gemm(ta, tb, 0.8, a.g, b.g, beta, c.g);
        k.close(c);
      }
  fam.finish();
}

// The router's GEMMs on bf16 activations and an f32 weight (CUDA: the weight and dlogits split into
// bf16 parts on the tensor cores), held to the f32 threshold against the CPU in f64; dx is bf16.
// E 8 and 40, D 72 and 70 (rows of bf16 not on 16 bytes); and the same ops with f32 activations
// (the default composite: cast-free f32 GEMMs).
TEST_CASE("gpu ops: router_logits and router_input_grads (bf16 x, f32 weight)", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("router gemms");
  Backend& g = gpu();
  for (DType xdt : {DType::BF16, DType::F32})
    for (auto [T, D, E] : {std::array<int64_t, 3>{300, 72, 8}, {129, 70, 40}}) {
      const std::string tag = " T " + std::to_string(T) + " D " + std::to_string(D) + " E " + std::to_string(E) +
                              " x " + to_string(xdt);
      Case k(fam, g, "router_logits" + tag, DType::F32);
      Pair x = k.randn_as(xdt, Shape{T, D});
      Pair w = k.randn(Shape{D, E}, 0.3);
      Out logits = k.out("logits", Shape{T, E});
      cpu().router_logits(x.c, w.c, logits.c);
      g.router_logits(x.g, w.g, logits.g);
      k.close(logits);
      Case kb(fam, g, "router_input_grads" + tag, DType::F32);
      Pair dl = kb.randn(Shape{T, E}, 0.01);
      Out dw = kb.acc("dw", Shape{D, E});
      Out dx = kb.acc("dx", kb.randn_as(xdt, Shape{T, D}, 0.05));
      cpu().router_input_grads(x.c, dl.c, w.c, dw.c, dx.c);
      g.router_input_grads(x.g, dl.g, w.g, dw.g, dx.g);
      kb.close(dw);
      kb.close(dx);
    }
  fam.finish();
}

// grouped_gemm (plain and trans_w, each with the forward betas) and grouped_gemm_wgrad (beta 0
// and 1) on backend g against the CPU, for experts with row offsets `off`.
static void grouped_gemm_cases(Family& fam, Backend& g, const std::vector<int64_t>& off, int64_t Kin, int64_t N,
                        const std::string& tag, DType dt, std::initializer_list<double> fwd_betas) {
  const int64_t E = int64_t(off.size()) - 1, R = off.back();
  auto beta_tag = [](double b) { return b == 0 ? std::string() : b == 1 ? std::string(" beta 1") : " beta " + std::to_string(b).substr(0, 3); };
  for (bool tw : {false, true})
    for (double beta : fwd_betas) {
      Case k(fam, g, std::string("grouped_gemm") + (tw ? " trans_w" : "") + beta_tag(beta) + tag, dt);
      Pair x = k.randn(Shape{R, Kin});
      Pair w = k.randn(tw ? Shape{E, N, Kin} : Shape{E, Kin, N});
      Out y = beta ? k.acc("Y", Shape{R, N}) : k.out("Y", Shape{R, N});
      cpu().grouped_gemm(x.c, w.c, off, y.c, tw, beta);
      g.grouped_gemm(x.g, w.g, off, y.g, tw, beta);
      k.close(y);
    }
  for (double beta : {0.0, 1.0}) {
    Case k(fam, g, std::string("grouped_gemm_wgrad") + beta_tag(beta) + tag, dt);
    Pair x = k.randn(Shape{R, Kin});
    Pair dy = k.randn(Shape{R, N});
    Out dw = beta ? k.acc("dW", Shape{E, Kin, N}) : k.out("dW", Shape{E, Kin, N});
    cpu().grouped_gemm_wgrad(x.c, dy.c, off, dw.c, beta);
    g.grouped_gemm_wgrad(x.g, dy.g, off, dw.g, beta);
    k.close(dw);
  }
}

TEST_CASE("gpu ops: grouped_gemm and grouped_gemm_wgrad (every cuBLAS path and the mma kernel)", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("grouped_gemm");
  const std::vector<int64_t> off = {0, 17, 17, 50, 55, 79};  // expert 1 empty
  const int64_t Kin = 48, N = 40;  // 5 experts, 79 rows
  // Mma runs moelab's kernel for bf16 (K, N multiples of 8) and falls back to cuBLAS for f32.
  // Chunked with chunks of 8 rows: experts of 17, 33 and 24 rows give full chunks (one batched
  // call) and remainders of 1 (grouped), the expert of 5 rows is all remainder.
  const std::pair<GroupedGemmImpl, int64_t> impls[] = {
      {GroupedGemmImpl::PerExpert, 128}, {GroupedGemmImpl::GroupedBatched, 128}, {GroupedGemmImpl::Auto, 128},
      {GroupedGemmImpl::Mma, 128}, {GroupedGemmImpl::Chunked, 8}, {GroupedGemmImpl::Wgmma, 128}};
  for (const auto& [impl, chunk] : impls) {
    auto owned = make_cuda_backend({0, impl, chunk});
    Backend& g = *owned;
    const std::string tag = impl == GroupedGemmImpl::PerExpert        ? " [per-expert]"
                            : impl == GroupedGemmImpl::GroupedBatched ? " [grouped-batched]"
                            : impl == GroupedGemmImpl::Mma            ? " [mma]"
                            : impl == GroupedGemmImpl::Chunked        ? " [chunked 8]"
                            : impl == GroupedGemmImpl::Wgmma          ? " [wgmma]"
                                                                      : " [auto]";
    for (DType dt : kDtypes) grouped_gemm_cases(fam, g, off, Kin, N, tag, dt, {0.0, 0.5});
  }
  fam.finish();
}

// The per-expert GEMMs through cuBLASLt with the kernel choice cached per shape class
// (CudaBackendOptions::gemm_algo_cache, gemm.cu): experts of 130 and 140 rows share a bucket (144;
// the rows are m in the forward and k in the weight gradient), 150 rows has its own, so the
// second call of a class reuses the first one's choice; against the CPU in both dtypes and both
// betas; then experts of 0, 1 and 33 rows with odd widths (addresses aligned to 2 bytes only,
// where cuBLASLt may refuse and cublasGemmEx runs), and the cache off runs nothing through it.
TEST_CASE("gpu ops: per-expert GEMMs through cuBLASLt, the kernel choice cached per shape class", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("grouped_gemm_lt");
  auto owned = make_cuda_backend({0, GroupedGemmImpl::PerExpert});
  Backend& g = *owned;
  const std::vector<int64_t> off = {0, 130, 270, 420};  // 130, 140 and 150 rows
  for (DType dt : kDtypes) grouped_gemm_cases(fam, g, off, 64, 48, " [lt]", dt, {0.0, 1.0});
  const GemmAlgoCacheStats s = cuda_gemm_algo_cache_stats(g);
  INFO("calls " << s.calls << ", heuristic lookups " << s.heuristics << ", refused " << s.fallbacks);
  CHECK(s.calls > 0);
  CHECK(s.heuristics < s.calls);
  CHECK(s.fallbacks == 0);
  grouped_gemm_cases(fam, g, {0, 0, 1, 34}, 37, 21, " [lt, odd widths]", DType::BF16, {0.0, 1.0});
  CHECK(cuda_gemm_algo_cache_stats(g).calls > s.calls);
  CudaBackendOptions off_opts;
  off_opts.grouped_gemm = GroupedGemmImpl::PerExpert;
  off_opts.gemm_algo_cache = false;
  auto plain = make_cuda_backend(off_opts);
  grouped_gemm_cases(fam, *plain, off, 64, 48, " [cublasGemmEx]", DType::BF16, {0.0});
  CHECK(cuda_gemm_algo_cache_stats(*plain).calls == 0);
  fam.finish();
}

// Auto's expert-GEMM choice for few experts (gemm.cu, own_kernel): products of 4 to 64 GFLOP per
// expert run as per-expert cuBLAS calls (through the cached cuBLASLt choice, which counts them)
// when K < 2048, on the wgmma kernel when K >= 2048 (no cuBLAS call) on a device that has it, and
// small products on the kernel; weight gradients written with beta 0 on the kernel. Each result
// against the CPU.
TEST_CASE("gpu ops: grouped_gemm Auto for few experts (per-expert below K 2048, kernel above)", "[gpu][ggemm]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("grouped_gemm_auto");
  auto owned = make_cuda_backend({0, GroupedGemmImpl::Auto});
  Backend& g = *owned;
  int major = 0, minor = 0;  // the wgmma kernel runs on compute capability 9.0 (the backend's device 0)
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
  const bool wgmma = major == 9 && minor == 0;
  const DType dt = DType::BF16;
  const std::vector<int64_t> off = {0, 2048, 4096};  // 2 experts of 2048 rows
  auto lt_calls = [&] { return cuda_gemm_algo_cache_stats(g).calls; };
  struct Shp {
    int64_t kin, n;
    bool per_expert;  // on a device with the kernel
    const char* what;
  };
  const Shp shapes[] = {{512, 2048, true, "K 512, 4.3 GFLOP an expert: per-expert"},
                        {2048, 512, false, "K 2048, 4.3 GFLOP an expert: the kernel"},
                        {512, 64, false, "K 512, 0.13 GFLOP an expert: the kernel"}};
  for (const Shp& sh : shapes) {
    INFO(sh.what);
    Case k(fam, g, std::string("grouped_gemm auto, ") + sh.what, dt);
    Pair x = k.randn(Shape{off.back(), sh.kin}), w = k.randn(Shape{2, sh.kin, sh.n}, 0.05);
    Out y = k.out("Y", Shape{off.back(), sh.n});
    cpu().grouped_gemm(x.c, w.c, off, y.c, false, 0.0);
    const int64_t before = lt_calls();
    g.grouped_gemm(x.g, w.g, off, y.g, false, 0.0);
    const int64_t calls = lt_calls() - before;
    k.close(y);
    if (wgmma) CHECK(calls == (sh.per_expert ? 2 : 0));
    // The weight gradient (beta 0) of the same shapes: on the kernel where there is one.
    const int64_t before_w = lt_calls();
    Tensor dw = g.empty(Shape{2, sh.kin, sh.n}, dt);
    g.grouped_gemm_wgrad(x.g, y.g, off, dw, 0.0);
    if (wgmma) CHECK(lt_calls() == before_w);
  }
  fam.finish();
}

// moelab's own kernels (the mma.sync one, backends/cuda/grouped_gemm_kernels.h, and the wgmma one,
// grouped_gemm_wgmma.cu; on a GPU without wgmma that backend runs the Auto path) over several
// tiles in every direction: experts of 0, 1, 37, 129 and 300 rows, K and N multiples of 8 but not
// of the tile, K below one reduction tile and over many, more experts than m-tiles; and
// bit-identical outputs run to run.
TEST_CASE("gpu ops: grouped_gemm mma and wgmma kernels, multi-tile shapes and determinism", "[gpu][ggemm]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("grouped_gemm_own");
  const DType dt = DType::BF16;
  struct Shp {
    std::vector<int64_t> rows;
    int64_t kin, n;
  };
  const Shp shapes[] = {{{300, 0, 37, 1, 129, 0, 256, 40}, 264, 392},
                        {{0, 2, 0, 0, 5, 0, 1, 0, 0, 3, 0, 0}, 136, 8},
                        {{517}, 32, 1048},
                        {{700, 3, 0, 260}, 1000, 136}};
  struct Impl {
    GroupedGemmImpl impl;
    const char* name;
  };
  const Impl impls[] = {{GroupedGemmImpl::Mma, " [mma]"}, {GroupedGemmImpl::Wgmma, " [wgmma]"}};
  for (const Impl& im : impls) {
    auto owned = make_cuda_backend({0, im.impl});
    Backend& g = *owned;
    for (const Shp& s : shapes) {
      const int64_t E = int64_t(s.rows.size());
      std::vector<int64_t> off(s.rows.size() + 1, 0);
      for (size_t e = 0; e < s.rows.size(); ++e) off[e + 1] = off[e] + s.rows[e];
      const int64_t R = off.back(), Kin = s.kin, N = s.n;
      const std::string sh = std::string(im.name) + " E=" + std::to_string(E) + " R=" + std::to_string(R) +
                             " K=" + std::to_string(Kin) + " N=" + std::to_string(N);
      grouped_gemm_cases(fam, g, off, Kin, N, sh, dt, {0.0, 1.0});
      // Determinism: the same inputs twice give the same bits (difference exactly zero).
      Tensor x = normal_on(g, Shape{R, Kin}, 7, dt);
      Tensor w = normal_on(g, Shape{E, Kin, N}, 8, dt);
      Tensor y1 = g.empty(Shape{R, N}, dt), y2 = g.empty(Shape{R, N}, dt);
      Tensor d1 = g.empty(Shape{E, Kin, N}, dt), d2 = g.empty(Shape{E, Kin, N}, dt);
      g.grouped_gemm(x, w, off, y1, false, 0.0);
      g.grouped_gemm(x, w, off, y2, false, 0.0);
      g.grouped_gemm_wgrad(x, y1, off, d1, 0.0);
      g.grouped_gemm_wgrad(x, y1, off, d2, 0.0);
      g.axpy(-1.0, y1, y2);
      g.axpy(-1.0, d1, d2);
      INFO("determinism" << sh);
      CHECK(g.sum_squares(y1) > 0.0);
      CHECK(g.sum_squares(y2) == 0.0);
      CHECK(g.sum_squares(d2) == 0.0);
    }
  }
  fam.finish();
}

TEST_CASE("gpu ops: swiglu forward and backward", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("swiglu");
  Backend& g = gpu();
  for (DType dt : kDtypes)
    for (int64_t F : {37, 40}) {  // 40: the 16-byte vector kernels (f32 and bf16); 37: scalar
      Case k(fam, g, "swiglu F " + std::to_string(F), dt);
      Pair ab = k.randn(Shape{29, 2 * F}, 2.0);
      Out h = k.out("H", Shape{29, F});
      cpu().swiglu_forward(ab.c, h.c);
      g.swiglu_forward(ab.g, h.g);
      k.close(h);
      Pair dh = k.randn(Shape{29, F});
      Out dab = k.out("dAB", Shape{29, 2 * F});
      cpu().swiglu_backward(ab.c, dh.c, dab.c);
      g.swiglu_backward(ab.g, dh.g, dab.g);
      k.close(dab);
    }
  fam.finish();
}

TEST_CASE("gpu ops: softmax, sigmoid, softplus, row_normalize, row_scale", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("activations");
  Backend& g = gpu();
  for (DType dt : kDtypes) {
    const Shape s{53, 13};
    {
      Case k(fam, g, "softmax", dt);
      Pair l = k.randn(s, 2.0);
      Out p = k.out("probs", s);
      cpu().softmax_forward(l.c, p.c);
      g.softmax_forward(l.g, p.g);
      k.close(p);
      Pair pin = k.from_cpu(p.c), dp = k.randn(s);
      Out dl = k.out("dlogits", s);
      cpu().softmax_backward(pin.c, dp.c, dl.c);
      g.softmax_backward(pin.g, dp.g, dl.g);
      k.close(dl);
    }
    {
      Case k(fam, g, "softmax (wide rows)", dt);  // rows wider than a warp
      Pair l = k.randn(Shape{7, 1000}, 3.0);
      Out p = k.out("probs", Shape{7, 1000});
      cpu().softmax_forward(l.c, p.c);
      g.softmax_forward(l.g, p.g);
      k.close(p);
    }
    {
      Case k(fam, g, "sigmoid", dt);
      Pair x = k.randn(s, 3.0);
      Out y = k.out("y", s);
      cpu().sigmoid_forward(x.c, y.c);
      g.sigmoid_forward(x.g, y.g);
      k.close(y);
      Pair yin = k.from_cpu(y.c), dy = k.randn(s);
      Out dx = k.out("dx", s);
      cpu().sigmoid_backward(yin.c, dy.c, dx.c);
      g.sigmoid_backward(yin.g, dy.g, dx.g);
      k.close(dx);
    }
    {
      Case k(fam, g, "softplus", dt);
      Pair x = k.randn(s, 3.0);
      Out y = k.out("y", s);
      cpu().softplus_forward(x.c, y.c);
      g.softplus_forward(x.g, y.g);
      k.close(y);
      Pair dy = k.randn(s);
      Out dx = k.out("dx", s);
      cpu().softplus_backward(x.c, dy.c, dx.c);
      g.softplus_backward(x.g, dy.g, dx.g);
      k.close(dx);
    }
    {
      Case k(fam, g, "row_normalize", dt);
      Pair x = k.uniform(s, 0.05, 1.0);
      Out y = k.out("y", s);
      cpu().row_normalize_forward(x.c, y.c);
      g.row_normalize_forward(x.g, y.g);
      k.close(y);
      Pair dy = k.randn(s);
      Out dx = k.out("dx", s);
      cpu().row_normalize_backward(x.c, dy.c, dx.c);
      g.row_normalize_backward(x.g, dy.g, dx.g);
      k.close(dx);
    }
    {
      Case k(fam, g, "row_scale", dt);
      Pair sc = k.randn(Shape{53});
      Pair x = k.randn(s);
      Out y = k.out("y", s);
      cpu().row_scale_forward(sc.c, x.c, y.c);
      g.row_scale_forward(sc.g, x.g, y.g);
      k.close(y);
      Pair dy = k.randn(s);
      Out ds = k.out("ds", Shape{53}), dx = k.out("dx", s);
      cpu().row_scale_backward(sc.c, x.c, dy.c, ds.c, dx.c);
      g.row_scale_backward(sc.g, x.g, dy.g, ds.g, dx.g);
      k.close(ds);
      k.close(dx);
    }
  }
  fam.finish();
}

TEST_CASE("gpu ops: dropout, jitter, noisy_logits (counter-based RNG)", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("random");
  Backend& g = gpu();
  const uint64_t seed = rng::derive(run_seed(), 99);
  for (DType dt : kDtypes) {
    const Shape s{61, 24};
    {
      Case k(fam, g, "dropout", dt);
      Pair x = k.randn(s);
      Out y = k.out("y", s), dx = k.out("dx", s);
      cpu().dropout_forward(x.c, 0.3, seed, y.c);
      g.dropout_forward(x.g, 0.3, seed, y.g);
      k.close(y);
      cpu().dropout_backward(x.c, 0.3, seed, dx.c);
      g.dropout_backward(x.g, 0.3, seed, dx.g);
      k.close(dx);
    }
    {
      Case k(fam, g, "jitter", dt);
      Pair x = k.randn(s);
      Out y = k.out("y", s), dx = k.out("dx", s);
      cpu().jitter_forward(x.c, 0.1, seed, y.c);
      g.jitter_forward(x.g, 0.1, seed, y.g);
      k.close(y);
      cpu().jitter_backward(x.c, 0.1, seed, dx.c);
      g.jitter_backward(x.g, 0.1, seed, dx.g);
      k.close(dx);
    }
    for (bool learned : {false, true}) {
      Case k(fam, g, learned ? "noisy_logits (learned std)" : "noisy_logits (sigma)", dt);
      Pair clean = k.randn(s), sd = k.uniform(s, 0.1, 1.0), dh = k.randn(s);
      const Tensor std_c = learned ? sd.c : Tensor(), std_g = learned ? sd.g : Tensor();
      Out h = k.out("h", s);
      cpu().noisy_logits_forward(clean.c, std_c, 0.5, seed, h.c);
      g.noisy_logits_forward(clean.g, std_g, 0.5, seed, h.g);
      k.close(h);
      Out dclean = k.out("dclean", s), dstd = k.out("dstd", s);
      cpu().noisy_logits_backward(dh.c, std_c, seed, dclean.c, learned ? dstd.c : Tensor());
      g.noisy_logits_backward(dh.g, std_g, seed, dclean.g, learned ? dstd.g : Tensor());
      k.close(dclean);
      if (learned) k.close(dstd);
    }
  }
  fam.finish();
}

// The parameter initialisation draw: the GPU kernel must write the CPU's bits exactly (the two
// backends start training from bit-identical weights), in every float dtype, from any offset
// into the stream, over more elements than the grid-stride kernel has threads.
TEST_CASE("gpu ops: fill_normal writes the CPU's bits", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Backend& g = gpu();
  const uint64_t stream = rng::derive(run_seed(), 7), first = run_seed() % 1000003;
  for (DType dt : {DType::F32, DType::BF16, DType::F64}) {
    for (int64_t n : {int64_t(1), int64_t(1001), (int64_t(1) << 24) + 3}) {
      CAPTURE(to_string(dt), n);
      const Tensor want = host_empty(Shape{n}, dt);
      cpu().fill_normal(want, 0.02, stream, first);
      const Tensor x = g.empty(Shape{n}, dt);
      g.fill_normal(x, 0.02, stream, first);
      const Tensor got = g.to_host(x);
      int64_t differ = 0;
      const size_t es = dtype_size(dt);
      for (int64_t i = 0; i < n; ++i)
        differ += std::memcmp(static_cast<const char*>(got.data()) + size_t(i) * es,
                              static_cast<const char*>(want.data()) + size_t(i) * es, es) != 0;
      REQUIRE(differ == 0);
    }
  }
  REQUIRE_THROWS_WITH(g.fill_normal(g.empty(Shape{4}, DType::I32), 1.0, 1, 0), has_substr("not a floating tensor"));
}

TEST_CASE("gpu ops: topk, balanced_assign, gates, random_top2_mask", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("selection");
  Backend& g = gpu();
  const int64_t T = 97, E = 16;
  for (DType dt : kDtypes) {
    for (int64_t K : {1, 2, 4, 16})
      for (bool with_bias : {false, true}) {
        Case k(fam, g, "topk k=" + std::to_string(K) + (with_bias ? " bias" : ""), dt);
        Pair s = k.probs(T, E);
        Pair bias = k.uniform(Shape{E}, -0.05, 0.05, DType::F32);
        // The CPU reference takes an f32 bias too (the op fixes its dtype).
        Tensor bias_c = host_tensor(host_values(bias.c), Shape{E}, DType::F32);
        Out idx = k.out("idx", Shape{T, K}, DType::I32);
        cpu().topk(s.c, with_bias ? bias_c : Tensor(), idx.c);
        g.topk(s.g, with_bias ? bias.g : Tensor(), idx.g);
        k.sets(idx);
      }
    for (int64_t K : {1, 3, 16})  // router.force_balance's round-robin, with an offset (a rank's share)
      for (int64_t offset : {int64_t(0), int64_t(12345)}) {
        Case k(fam, g, "balanced_assign k=" + std::to_string(K) + " offset=" + std::to_string(offset), dt);
        Out idx = k.out("idx", Shape{T, K}, DType::I32);
        cpu().balanced_assign(idx.c, E, offset);
        g.balanced_assign(idx.g, E, offset);
        k.exact(idx);
      }
    for (bool norm : {true, false}) {
      Case k(fam, g, std::string("gates") + (norm ? " normalized" : ""), dt);
      const int64_t K = 3;
      Pair s = k.probs(T, E);
      Pair idx = k.from_cpu(cpu_topk(s.c, K));
      Out gates = k.out("gates", Shape{T, K});
      cpu().gates_forward(s.c, idx.c, norm, 1.7, gates.c);
      g.gates_forward(s.g, idx.g, norm, 1.7, gates.g);
      k.close(gates);
      Pair dg = k.randn(Shape{T, K});
      Out ds = k.out("dscores", Shape{T, E});
      cpu().gates_backward(s.c, idx.c, dg.c, norm, 1.7, ds.c);
      g.gates_backward(s.g, idx.g, dg.g, norm, 1.7, ds.g);
      k.close(ds);
    }
    {
      Case k(fam, g, "random_top2_mask", dt);
      Pair gt = k.uniform(Shape{T, 2}, 0.01, 1.0);
      Out keep = k.out("keep", Shape{T, 2}, DType::I32);
      const uint64_t seed = rng::derive(run_seed(), 7);
      cpu().random_top2_mask(gt.c, 0.4, seed, keep.c);
      g.random_top2_mask(gt.g, 0.4, seed, keep.g);
      k.exact(keep);
    }
  }
  fam.finish();
}

TEST_CASE("gpu ops: capacity_mask, sinkhorn, expert_choice", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("capacity");
  Backend& g = gpu();
  const int64_t T = 100, E = 8, K = 2;
  for (DType dt : kDtypes) {
    for (DropPolicy pol : {DropPolicy::Position, DropPolicy::Probs})
      for (int64_t C : {0, 7, 20, 200}) {
        Case k(fam, g, std::string("capacity_mask ") + to_string(pol) + " C=" + std::to_string(C), dt);
        Pair s = k.probs(T, E, 2.0);
        Pair idx = k.from_cpu(cpu_topk(s.c, K));
        Pair gates = k.uniform(Shape{T, K}, 0.0, 1.0);
        // keep: the second choice of every fifth token already dropped (random top-2 style).
        std::vector<int> kv(size_t(T * K), 1);
        for (int64_t t = 0; t < T; t += 5) kv[size_t(t * K + 1)] = 0;
        Out keep = k.acc("keep", k.ints(Shape{T, K}, kv));
        cpu().capacity_mask(idx.c, gates.c, E, C, pol, keep.c);
        g.capacity_mask(idx.g, gates.g, E, C, pol, keep.g);
        k.exact(keep);
      }
    for (int64_t rows : {64, 1000}) {
      Case k(fam, g, "sinkhorn T=" + std::to_string(rows), dt);
      Pair l = k.randn(Shape{rows, E}, 1.5);
      Out out = k.out("out", Shape{rows, E});
      const int ic = cpu().sinkhorn(l.c, 1e-4, 100, out.c);
      const int ig = g.sinkhorn(l.g, 1e-4, 100, out.g);
      k.exact_value("iterations", ig, ic);
      k.close(out);
    }
    for (int64_t C : {1, 17, 50}) {
      Case k(fam, g, "expert_choice C=" + std::to_string(C), dt);
      Pair s = k.probs(50, 6);
      Out chosen = k.out("chosen", Shape{6, C}, DType::I32);
      cpu().expert_choice(s.c, chosen.c);
      g.expert_choice(s.g, chosen.g);
      k.sets(chosen);
    }
  }
  fam.finish();
}

TEST_CASE("gpu ops: dispatch_plan, permute, unpermute", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("dispatch");
  Backend& g = gpu();
  const int64_t T = 41, E = 6, K = 2;
  for (DType dt : kDtypes)
    for (int variant = 0; variant < 4; ++variant) {  // token choice, padded token choice, expert choice
      const bool ec = variant == 2;
      const int64_t pad = variant == 1 ? 12 : 0;
      // D 24: the 16-byte vector kernels (f32 and bf16); D 21 (variant 3): the scalar ones
      const int64_t D = variant == 3 ? 21 : 24;
      const std::string what = ec ? " (expert choice)" : pad ? " (padded)" : variant == 3 ? " (D 21)" : "";
      Case k(fam, g, "dispatch_plan" + what, dt);
      Pair s = k.probs(T, E, 2.0);
      Tensor idx_c, keep_c;
      if (ec) {
        idx_c = cpu().empty(Shape{E, 9}, DType::I32);
        cpu().expert_choice(s.c, idx_c);
        keep_c = host_tensor(std::vector<double>(size_t(E * 9), 1.0), Shape{E, 9}, DType::I32);
      } else {
        idx_c = cpu_topk(s.c, K);
        keep_c = host_tensor(std::vector<double>(size_t(T * K), 1.0), Shape{T, K}, DType::I32);
        Tensor gates = host_tensor(std::vector<double>(size_t(T * K), 0.5), Shape{T, K}, DType::F64);
        cpu().capacity_mask(idx_c, gates, E, 12, DropPolicy::Position, keep_c);
      }
      Pair idx = k.from_cpu(idx_c), keep = k.from_cpu(keep_c);
      DispatchPlan pc = cpu().dispatch_plan(idx.c, keep.c, ec, E, pad);
      DispatchPlan pg = g.dispatch_plan(idx.g, keep.g, ec, E, pad);
      k.exact_vec("offsets", pg.offsets, pc.offsets);
      k.exact_vec("row_token", host_values(g.to_host(pg.row_token)), host_values(pc.row_token));
      k.exact_vec("row_assign", host_values(g.to_host(pg.row_assign)), host_values(pc.row_assign));
      if (pg.offsets != pc.offsets) continue;
      const int64_t R = pc.rows(), A = idx_c.numel();

      Case kp(fam, g, "permute" + what, dt);
      Pair x = kp.randn(Shape{T, D});
      Out xp = kp.out("xp", Shape{R, D});
      cpu().permute_forward(x.c, pc, xp.c);
      g.permute_forward(x.g, pg, xp.g);
      kp.close(xp);
      Pair dxp = kp.randn(Shape{R, D});
      Out dx = kp.out("dx", Shape{T, D});
      cpu().permute_backward(dxp.c, pc, dx.c);
      g.permute_backward(dxp.g, pg, dx.g);
      kp.close(dx);

      Case ku(fam, g, "unpermute" + what, dt);
      Pair yp = ku.randn(Shape{R, D});
      Pair gates = ku.uniform(Shape{A}, 0.05, 1.0);
      Out y = ku.out("y", Shape{T, D});
      cpu().unpermute_forward(yp.c, pc, gates.c, y.c);
      g.unpermute_forward(yp.g, pg, gates.g, y.g);
      ku.close(y);
      Pair dy = ku.randn(Shape{T, D});
      Out dyp = ku.out("dyp", Shape{R, D}), dg = ku.out("dgates", Shape{A});
      cpu().unpermute_backward(dy.c, yp.c, pc, gates.c, dyp.c, dg.c);
      g.unpermute_backward(dy.g, yp.g, pg, gates.g, dyp.g, dg.g);
      ku.close(dyp);
      ku.close(dg);
    }
  fam.finish();
}

TEST_CASE("gpu ops: aux, z, cv2 and load losses", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("losses");
  Backend& g = gpu();
  const int64_t T = 96, E = 8, K = 2;
  for (DType dt : kDtypes) {
    for (int64_t seq : {0, 24}) {
      Case k(fam, g, seq ? "aux_loss (per sequence)" : "aux_loss", dt);
      Pair p = k.probs(T, E);
      Pair idx = k.from_cpu(cpu_topk(p.c, K));
      k.scalar("value", g.aux_loss_forward(p.g, idx.g, seq), cpu().aux_loss_forward(p.c, idx.c, seq));
      Out dp = k.acc("dprobs", Shape{T, E}, 0.01);
      cpu().aux_loss_backward(p.c, idx.c, seq, 0.3, dp.c);
      g.aux_loss_backward(p.g, idx.g, seq, 0.3, dp.g);
      k.close(dp);
    }
    {
      Case k(fam, g, "z_loss", dt);
      Pair l = k.randn(Shape{T, E}, 2.0);
      k.scalar("value", g.z_loss_forward(l.g), cpu().z_loss_forward(l.c));
      Out dl = k.acc("dlogits", Shape{T, E}, 0.01);
      cpu().z_loss_backward(l.c, 0.3, dl.c);
      g.z_loss_backward(l.g, 0.3, dl.g);
      k.close(dl);
    }
    {
      Case k(fam, g, "cv2_loss", dt);
      Pair p = k.probs(T, E);
      Pair idx = k.from_cpu(cpu_topk(p.c, K));
      Pair gates = k.uniform(Shape{T, K}, 0.05, 1.0);
      k.scalar("value", g.cv2_loss_forward(gates.g, idx.g, E), cpu().cv2_loss_forward(gates.c, idx.c, E));
      Out dg = k.acc("dgates", Shape{T, K}, 0.01);
      cpu().cv2_loss_backward(gates.c, idx.c, E, 0.3, dg.c);
      g.cv2_loss_backward(gates.g, idx.g, E, 0.3, dg.g);
      k.close(dg);
    }
    for (bool learned : {false, true}) {
      Case k(fam, g, learned ? "load_loss (learned std)" : "load_loss (sigma)", dt);
      const int64_t Tl = 40;
      Pair clean = k.randn(Shape{Tl, E}), sd = k.uniform(Shape{Tl, E}, 0.2, 1.0);
      Pair noise = k.randn(Shape{Tl, E}, 0.3);
      // h = clean + noise, formed on the host and rounded to the dtype.
      auto hv = host_values(clean.c), nv = host_values(noise.c);
      for (size_t i = 0; i < hv.size(); ++i) hv[i] += nv[i];
      Pair h = k.values(Shape{Tl, E}, hv);
      const Tensor std_c = learned ? sd.c : Tensor(), std_g = learned ? sd.g : Tensor();
      k.scalar("value", g.load_loss_forward(clean.g, h.g, std_g, 0.5, K),
               cpu().load_loss_forward(clean.c, h.c, std_c, 0.5, K));
      Out dclean = k.acc("dclean", Shape{Tl, E}, 0.01), dstd = k.acc("dstd", Shape{Tl, E}, 0.01);
      Out dh = k.acc("dh", Shape{Tl, E}, 0.01);
      cpu().load_loss_backward(clean.c, h.c, std_c, 0.5, K, 0.3, dclean.c, learned ? dstd.c : Tensor(), dh.c);
      g.load_loss_backward(clean.g, h.g, std_g, 0.5, K, 0.3, dclean.g, learned ? dstd.g : Tensor(), dh.g);
      k.close(dclean);
      k.close(dh);
      if (learned) k.close(dstd);
    }
  }
  fam.finish();
}

// Backend::router_logits_backward (one kernel on the GPU for f32 and up to 256 experts) against the
// CPU in f64, and against the composite of its four ops run on the GPU (the same roundings: NMSE
// within f32 rounding of the sum order, 1e-12); E 8, 40 and 300 (the composite itself), with and
// without normalisation, the aux loss (global, per sequence of 11) and the z-loss.
TEST_CASE("gpu ops: router_logits_backward", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("router_logits_backward");
  Backend& g = gpu();
  const int64_t T = 77, K = 2;
  for (int64_t E : {8, 40, 300})
    for (bool normalize : {true, false})
      for (auto [seq, aux, z] : {std::array<double, 3>{0, 0.01, 0.001}, {11, 0.01, 0.0}, {0, 0.0, 0.001}}) {
        Case k(fam, g, "router_logits_backward E " + std::to_string(E) + (normalize ? " normalize" : "") +
                           " seq " + std::to_string(int(seq)) + (aux ? " aux" : "") + (z ? " z" : ""),
               DType::F32);
        Pair l = k.randn(Shape{T, E}, 2.0);
        Tensor pc = cpu().empty(Shape{T, E}, DType::F64);
        cpu().softmax_forward(l.c, pc);
        Pair p = k.from_cpu(pc);
        Pair idx = k.from_cpu(cpu_topk(p.c, K));
        Pair dg = k.randn(Shape{T, K}, 0.5);
        Out dl = k.out("dlogits", Shape{T, E});
        cpu().router_logits_backward(p.c, l.c, idx.c, dg.c, normalize, 1.5, int64_t(seq), aux, z, dl.c);
        g.router_logits_backward(p.g, l.g, idx.g, dg.g, normalize, 1.5, int64_t(seq), aux, z, dl.g);
        k.close(dl);
        // The composite's four ops on the GPU.
        Tensor ds = g.empty(Shape{T, E}, DType::F32), ref = g.empty(Shape{T, E}, DType::F32);
        g.gates_backward(p.g, idx.g, dg.g, normalize, 1.5, ds);
        if (aux) g.aux_loss_backward(p.g, idx.g, int64_t(seq), aux, ds);
        g.softmax_backward(p.g, ds, ref);
        if (z) g.z_loss_backward(l.g, z, ref);
        const double den = g.sum_squares(ref);
        g.axpy(-1.0, dl.g, ref);
        const double nmse = g.sum_squares(ref) / den;
        CAPTURE(E, normalize, seq, aux, z, nmse);
        CHECK(nmse <= 1e-12);
      }
  fam.finish();
}

TEST_CASE("gpu ops: router_stats", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("router_stats");
  Backend& g = gpu();
  const int64_t T = 77;
  // E 8 and 40: the summary's one-pass row kernel (one and two columns per lane); 300: the
  // separate row kernels it keeps for more than 256 experts.
  for (int64_t E : {8, 40, 300})
  for (DType dt : kDtypes)
    for (bool ec : {false, true}) {
      Case k(fam, g, std::string(ec ? "router_stats (expert choice)" : "router_stats") + " E " + std::to_string(E), dt);
      Pair l = k.randn(Shape{T, E}, 2.0);
      Tensor pc = cpu().empty(Shape{T, E}, DType::F64);
      cpu().softmax_forward(l.c, pc);
      Pair p = k.from_cpu(pc);
      Tensor idx_c, keep_c;
      if (ec) {
        idx_c = cpu().empty(Shape{E, 12}, DType::I32);
        cpu().expert_choice(p.c, idx_c);
        keep_c = host_tensor(std::vector<double>(size_t(E * 12), 1.0), Shape{E, 12}, DType::I32);
      } else {
        idx_c = cpu_topk(p.c, 2);
        keep_c = host_tensor(std::vector<double>(size_t(T * 2), 1.0), Shape{T, 2}, DType::I32);
        Tensor gates = host_tensor(std::vector<double>(size_t(T * 2), 0.5), Shape{T, 2}, DType::F64);
        cpu().capacity_mask(idx_c, gates, E, 15, DropPolicy::Position, keep_c);
      }
      Pair idx = k.from_cpu(idx_c), keep = k.from_cpu(keep_c);
      const RouterStats sc = cpu().router_stats(l.c, p.c, idx.c, keep.c, ec, E);
      const RouterStats sg = g.router_stats(l.g, p.g, idx.g, keep.g, ec, E);
      k.exact_vec("routed", sg.routed, sc.routed);
      k.exact_vec("kept", sg.kept, sc.kept);
      k.exact_value("tokens_unrouted", sg.tokens_unrouted, sc.tokens_unrouted);
      k.vec("mean_prob", sg.mean_prob, sc.mean_prob);
      k.scalar("entropy", sg.entropy, sc.entropy);
      k.scalar("top1_prob", sg.top1_prob, sc.top1_prob);
      k.scalar("logit_rms", sg.logit_rms, sc.logit_rms);
      k.scalar("logit_max", sg.logit_max, sc.logit_max);
      // The one-copy summary (the CUDA backend's fused path) against the CPU's composite of
      // router_stats, aux, z and importance; the sequence-level aux on 7 sequences of 11.
      Pair gates = k.randn(idx_c.shape(), 1.0);
      for (int64_t seq : {int64_t(0), int64_t(11)}) {
        if (ec && seq) continue;
        const RouterSummary uc = cpu().router_summary(l.c, p.c, idx.c, keep.c, gates.c, ec, E, seq, !ec, !ec);
        const RouterSummary ug = g.router_summary(l.g, p.g, idx.g, keep.g, gates.g, ec, E, seq, !ec, !ec);
        k.exact_vec("summary routed", ug.stats.routed, uc.stats.routed);
        k.exact_vec("summary kept", ug.stats.kept, uc.stats.kept);
        k.exact_value("summary tokens_unrouted", ug.stats.tokens_unrouted, uc.stats.tokens_unrouted);
        k.vec("summary mean_prob", ug.stats.mean_prob, uc.stats.mean_prob);
        k.scalar("summary entropy", ug.stats.entropy, uc.stats.entropy);
        k.scalar("summary top1_prob", ug.stats.top1_prob, uc.stats.top1_prob);
        k.scalar("summary logit_rms", ug.stats.logit_rms, uc.stats.logit_rms);
        k.scalar("summary logit_max", ug.stats.logit_max, uc.stats.logit_max);
        k.scalar("summary z", ug.z, uc.z);
        k.scalar("summary aux", ug.aux, uc.aux);
        k.scalar("summary importance", ug.importance, uc.importance);
        if (!ec) {
          REQUIRE(uc.aux == cpu().aux_loss_forward(p.c, idx.c, seq));
          REQUIRE(uc.z == cpu().z_loss_forward(l.c));
        }
      }
    }
  fam.finish();
}

// The MoE layer's forward waits for the device once (the dispatch plan's expert counts; the
// router's statistics, copied without waiting, have arrived with them) and its backward never;
// the statistics and losses it returns are router_summary's, waited for at once.
TEST_CASE("gpu moe layer: one host wait per forward, none in backward", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Backend& g = gpu();
  MoEConfig cfg;
  cfg.d_model = 64;
  cfg.experts = 8;
  cfg.top_k = 2;
  cfg.d_expert = 32;
  cfg.router.aux_alpha = 0.01;
  cfg.router.z_loss = 0.001;
  const int64_t T = 256;
  MoELayer layer(g, cfg, DType::BF16);
  layer.init(3, 1.0);
  Tensor x = normal_on(g, Shape{T, cfg.d_model}, 11, DType::BF16);
  Tensor dy = normal_on(g, Shape{T, cfg.d_model}, 12, DType::BF16);
  Tensor dx = g.empty(Shape{T, cfg.d_model}, DType::BF16);
  const MoEForwardArgs args{true, 64, 5};
  layer.forward(x, args);  // warm-up: allocations, cuBLAS
  layer.backward(dy, dx);
  g.synchronize();
  const int64_t s0 = g.host_syncs();
  MoEOutput out = layer.forward(x, args);
  const int64_t s1 = g.host_syncs();
  layer.backward(dy, dx);
  const int64_t s2 = g.host_syncs();
  CHECK(s1 - s0 == 1);
  CHECK(s2 - s1 == 0);
  const RouterState& st = layer.last_routing();
  const RouterSummary ref = g.router_summary(st.logits, st.dist, st.idx, st.keep, st.gates, false, cfg.experts, 0,
                                             true, true);
  CHECK(std::accumulate(out.stats.routed.begin(), out.stats.routed.end(), int64_t(0)) == T * cfg.top_k);
  CHECK(out.stats.routed == ref.stats.routed);
  CHECK(out.stats.kept == ref.stats.kept);
  CHECK(out.stats.mean_prob == ref.stats.mean_prob);
  CHECK(out.stats.entropy == ref.stats.entropy);
  CHECK(out.stats.logit_max == ref.stats.logit_max);
  CHECK(out.losses.aux == ref.aux);
  CHECK(out.losses.z == ref.z);
  CHECK(out.losses.importance == ref.importance);
  CHECK(out.losses.aux > 0.0);
}

TEST_CASE("gpu ops: embedding, rmsnorm, rope", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("transformer");
  Backend& g = gpu();
  for (DType dt : kDtypes) {
    // D 24: 16-byte vector kernels; 21: the scalar ones
    for (int64_t D : {24, 21}) {
      Case k(fam, g, "embedding D " + std::to_string(D), dt);
      const int64_t T = 57, V = 50;
      std::vector<int> tok(static_cast<size_t>(T));
      for (int64_t t = 0; t < T; ++t) tok[size_t(t)] = int((t * 7 + t / 3) % 23);  // repeats
      tok[0] = V - 1;
      Pair tokens = k.ints(Shape{T}, tok);
      Pair table = k.randn(Shape{V, D});
      Out out = k.out("out", Shape{T, D});
      cpu().embedding_forward(tokens.c, table.c, out.c);
      g.embedding_forward(tokens.g, table.g, out.g);
      k.close(out);
      Pair dout = k.randn(Shape{T, D});
      Out dtable = k.acc("dtable", Shape{V, D}, 0.1);
      cpu().embedding_backward(tokens.c, dout.c, dtable.c);
      g.embedding_backward(tokens.g, dout.g, dtable.g);
      k.close(dtable);
    }
    // D 96 and 520: 16-byte vector kernels (520: several vectors per lane); 93: the scalar ones
    for (int64_t D : {96, 93, 520}) {
      Case k(fam, g, "rmsnorm D " + std::to_string(D), dt);
      const int64_t T = 45;
      Pair x = k.randn(Shape{T, D}, 2.0), w = k.randn(Shape{D}, 0.3, 1.0);
      Out y = k.out("y", Shape{T, D}), rstd = k.out("rstd", Shape{T});
      cpu().rmsnorm_forward(x.c, w.c, 1e-5, y.c, rstd.c);
      g.rmsnorm_forward(x.g, w.g, 1e-5, y.g, rstd.g);
      k.close(y);
      k.close(rstd);
      Pair r = k.from_cpu(rstd.c), dy = k.randn(Shape{T, D});
      Out dx = k.out("dx", Shape{T, D}), dw = k.acc("dw", Shape{D}, 0.1);
      cpu().rmsnorm_backward(x.c, w.c, r.c, dy.c, dx.c, dw.c);
      g.rmsnorm_backward(x.g, w.g, r.g, dy.g, dx.g, dw.g);
      k.close(dx);
      k.close(dw);
    }
    // Dh 16 and 64: 16-byte vectors (one and several per half-head); 12: the scalar kernel
    for (int64_t Dh : {16, 12, 64}) {
      Case k(fam, g, "rope Dh " + std::to_string(Dh), dt);
      const int64_t S = 8, T = 24, H = 3;
      Pair x = k.randn(Shape{T, H * Dh});
      Out y = k.out("y", Shape{T, H * Dh}), dx = k.out("dx", Shape{T, H * Dh});
      cpu().rope_forward(x.c, H, S, 10000.0, y.c);
      g.rope_forward(x.g, H, S, 10000.0, y.g);
      k.close(y);
      cpu().rope_backward(x.c, H, S, 10000.0, dx.c);
      g.rope_backward(x.g, H, S, 10000.0, dx.g);
      k.close(dx);
    }
    {
      // Packed records: positions restart at every record (SFT packing).
      Case k(fam, g, "rope (positions of packed records)", dt);
      const int64_t S = 12, T = 24, H = 2, Dh = 16;
      std::vector<int> pos;
      for (int64_t t = 0; t < T; ++t) pos.push_back(int(t % 12 < 5 ? t % 12 : t % 12 < 9 ? t % 12 - 5 : t % 12 - 9));
      pos[3] = 15;  // past S: the kernel's angle table ends at S, so this one is computed inline
      Pair positions = k.ints(Shape{T}, pos);
      Pair x = k.randn(Shape{T, H * Dh});
      Out y = k.out("y", Shape{T, H * Dh}), dx = k.out("dx", Shape{T, H * Dh});
      cpu().rope_forward(x.c, H, S, 10000.0, y.c, positions.c);
      g.rope_forward(x.g, H, S, 10000.0, y.g, positions.g);
      k.close(y);
      cpu().rope_backward(x.c, H, S, 10000.0, dx.c, positions.c);
      g.rope_backward(x.g, H, S, 10000.0, dx.g, positions.g);
      k.close(dx);
    }
  }
  fam.finish();
}

namespace {

// One flash attention case against the CPU reference in f64: forward (out, lse), then backward
// (dq, dk, dv) from the reference's out and lse rounded to what the GPU keeps (the case's dtype,
// f32), so that each half is measured on its own. bf16 with head width 64 or 128 runs the
// tensor-core kernels, everything else (and unaligned inputs) the generic ones.
// seg: packed records' segment ids [T] (empty: plain causal attention).
void attention_case(Family& fam, Backend& g, DType dt, int64_t B, int64_t S, int64_t H, int64_t Hkv,
                    int64_t Dh, bool unaligned = false, const std::vector<int>& seg = {}) {
  const int64_t T = B * S;
  std::ostringstream name;
  name << "attention B=" << B << " S=" << S << " H=" << H << " Hkv=" << Hkv << " Dh=" << Dh
       << (unaligned ? " (unaligned inputs: generic kernels)" : "") << (seg.empty() ? "" : " (packed records)");
  Case k(fam, g, name.str(), dt);
  Pair segments;
  if (!seg.empty()) segments = k.ints(Shape{T}, seg);
  Pair q = k.randn(Shape{T, H * Dh}), kk = k.randn(Shape{T, Hkv * Dh}), v = k.randn(Shape{T, Hkv * Dh});
  if (unaligned) {
    q = k.unaligned(q);
    kk = k.unaligned(kk);
    v = k.unaligned(v);
  }
  Out out = k.out("out", Shape{T, H * Dh}), lse = k.out("lse", Shape{B * H, S}, DType::F32);
  cpu().attention_forward(q.c, kk.c, v.c, H, Hkv, S, out.c, lse.c, segments.c);
  g.attention_forward(q.g, kk.g, v.g, H, Hkv, S, out.g, lse.g, segments.g);
  k.close(out);
  k.close(lse);
  Pair o = k.from_cpu(out.c), l = k.values(Shape{B * H, S}, host_values(lse.c), DType::F32);
  Pair dout = k.randn(Shape{T, H * Dh});
  if (unaligned) dout = k.unaligned(dout);
  Out dq = k.out("dq", Shape{T, H * Dh}), dk = k.out("dk", Shape{T, Hkv * Dh}),
      dv = k.out("dv", Shape{T, Hkv * Dh});
  cpu().attention_backward(q.c, kk.c, v.c, o.c, l.c, dout.c, H, Hkv, S, dq.c, dk.c, dv.c, segments.c);
  g.attention_backward(q.g, kk.g, v.g, o.g, l.g, dout.g, H, Hkv, S, dq.g, dk.g, dv.g, segments.g);
  if (S == 1) {  // one key per query: P = 1, dS = dP - D = 0 exactly, up to the GPU's rounding
    k.near_zero(dq, 1e-4);
    k.near_zero(dk, 1e-4);
  } else {
    k.close(dq);
    k.close(dk);
  }
  k.close(dv);
}

// Segment ids of B rows of S positions packed with records of the given lengths, in turn (one
// crossing several 64- and 128-row tiles, one-token records, a key tile wholly of other records),
// and trailing padding (-1).
std::vector<int> packed(int64_t B, int64_t S, const std::vector<int64_t>& lens) {
  std::vector<int> seg;
  size_t li = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t t = 0;
    for (int id = 0;; ++id) {
      const int64_t n = lens[li++ % lens.size()];
      if (t + n > S) break;
      for (int64_t i = 0; i < n; ++i, ++t) seg.push_back(id);
    }
    for (; t < S; ++t) seg.push_back(-1);
  }
  return seg;
}

// A CUDA backend with the attention kernels chosen by `flash` (made once, never destroyed: see
// gpu()). On compute capability 9.0 the default backend runs the Hopper wgmma forward and plans
// the backward (attention_plan.h: the one kernel only where its blocks fill half the GPU, which
// the test shapes do not):
//   wgmma_backend()     Flash::Wgmma: the wgmma kernels with the one-kernel backward at every
//                       shape;
//   mma_sync_backend()  Flash::MmaSync: the mma.sync kernels, which every other GPU runs.
// Elsewhere than on compute capability 9.0 both run the mma.sync kernels.
Backend& flash_backend(CudaBackendOptions::Flash flash) {
  static Backend* made[3] = {};
  Backend*& b = made[int(flash)];
  if (!b) {
    CudaBackendOptions opts;
    opts.flash = flash;
    b = make_cuda_backend(opts).release();
  }
  return *b;
}
Backend& wgmma_backend() { return flash_backend(CudaBackendOptions::Flash::Wgmma); }
Backend& mma_sync_backend() { return flash_backend(CudaBackendOptions::Flash::MmaSync); }

std::vector<uint8_t> bytes_of(Backend& g, const Tensor& t) {
  Tensor h = g.to_host(t);
  const auto* p = static_cast<const uint8_t*>(h.data());
  return std::vector<uint8_t>(p, p + h.nbytes());
}

}  // namespace

TEST_CASE("gpu ops: flash attention (causal, grouped-query) against the CPU", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("attention");
  Backend& g = gpu();
  struct Heads {
    int64_t H, Hkv;
  };
  const Heads heads[] = {{2, 2}, {4, 1}, {8, 2}};
  int n = 0;
  for (DType dt : kDtypes)
    for (int64_t Dh : {16, 32, 64, 128})
      for (int64_t S : {1, 7, 64, 65, 200, 256})
        for (const Heads& hd : heads) attention_case(fam, g, dt, 1 + (n++ % 3), S, hd.H, hd.Hkv, Dh);
  // bf16 at the tensor-core widths, but off 16-byte alignment: the generic kernels.
  for (int64_t Dh : {64, 128}) attention_case(fam, g, DType::BF16, 2, 65, 4, 2, Dh, true);
  // Several 128-row query and key tiles (the wgmma kernels' tiles on Hopper), a partial last one.
  for (int64_t Dh : {64, 128}) attention_case(fam, g, DType::BF16, 2, 700, 4, 2, Dh);
  fam.finish();
}

// f32 attention runs on cuBLAS GEMMs over chunks of heads (attention_gemm.cu); the default 1 GiB
// scratch holds every head of the shapes above in one chunk. A backend with a 1-byte scratch
// takes one kv group per chunk, so the chunk loop, the head offsets of later chunks and the
// group sums of dK / dV across chunks are compared with the CPU too.
TEST_CASE("gpu ops: f32 attention over many scratch chunks against the CPU", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("attention (f32, one kv group per chunk)");
  CudaBackendOptions opts;
  opts.attention_scratch_bytes = 1;
  static Backend* small = make_cuda_backend(opts).release();  // never destroyed: see gpu()
  attention_case(fam, *small, DType::F32, 3, 200, 8, 2, 32);   // 6 chunks of 4 heads, 2 blocks
  attention_case(fam, *small, DType::F32, 2, 300, 4, 4, 16);   // MHA: 8 chunks, 3 causal blocks
  attention_case(fam, *small, DType::F32, 2, 65, 6, 1, 64);    // one group of 6 heads per chunk
  fam.finish();
}

TEST_CASE("gpu ops: flash attention over packed records (segment mask) against the CPU", "[gpu][sft]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("attention (packed records)");
  Backend& g = gpu();
  for (DType dt : kDtypes)
    for (int64_t Dh : {32, 64, 128}) {
      attention_case(fam, g, dt, 2, 256, 4, 2, Dh, false, packed(2, 256, {100, 1, 37, 70, 3}));
      attention_case(fam, g, dt, 1, 200, 2, 1, Dh, false, packed(1, 200, {150, 2, 30}));
    }
  attention_case(fam, g, DType::BF16, 2, 130, 4, 2, 64, true, packed(2, 130, {60, 1, 50}));
  fam.finish();
}

// On compute capability 9.0 the default backend runs the Hopper wgmma forward and, at the small
// shapes above, the mma.sync backward (attention_plan.h). Here the wgmma kernels with the
// one-kernel backward on every bf16 shape of those cases and packed records; the mma.sync
// forward, which every other GPU runs, on some of them; long sequences on the default backend;
// and the one-kernel backward with several key tiles per block.
TEST_CASE("gpu ops: flash attention on the Hopper and mma.sync kernels against the CPU", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("attention (wgmma with the one-kernel backward; mma.sync; long sequences)");
  Backend& g = wgmma_backend();
  struct Heads {
    int64_t H, Hkv;
  };
  int n = 0;
  for (int64_t Dh : {64, 128})
    for (int64_t S : {1, 7, 64, 65, 200, 256, 700})
      for (const Heads& hd : {Heads{2, 2}, Heads{4, 1}, Heads{8, 2}})
        attention_case(fam, g, DType::BF16, 1 + (n++ % 3), S, hd.H, hd.Hkv, Dh);
  for (int64_t Dh : {64, 128}) {
    attention_case(fam, g, DType::BF16, 2, 256, 4, 2, Dh, false, packed(2, 256, {100, 1, 37, 70, 3}));
    attention_case(fam, g, DType::BF16, 1, 200, 2, 1, Dh, false, packed(1, 200, {150, 2, 30}));
  }
  attention_case(fam, g, DType::BF16, 1, 1100, 4, 2, 128);
  for (int64_t Dh : {64, 128}) {
    attention_case(fam, mma_sync_backend(), DType::BF16, 2, 200, 8, 2, Dh);
    attention_case(fam, mma_sync_backend(), DType::BF16, 1, 700, 4, 1, Dh);
    attention_case(fam, mma_sync_backend(), DType::BF16, 1, 200, 2, 1, Dh, false, packed(1, 200, {150, 2, 30}));
    attention_case(fam, gpu(), DType::BF16, 1, 1100, 4, 2, Dh);
  }
  // The one-kernel backward with several key tiles per block (9 tiles over 2 and 4 blocks per kv
  // head: the snake order, the fp32 dQ buffers summed), with and without packed records.
  for (int splits : {2, 4}) {
    CudaBackendOptions opts;
    opts.flash = CudaBackendOptions::Flash::Wgmma;
    opts.attention_bwd_splits = splits;
    std::unique_ptr<Backend> gs = make_cuda_backend(opts);
    for (int64_t Dh : {64, 128}) {
      attention_case(fam, *gs, DType::BF16, 2, 1100, 4, 2, Dh);
      attention_case(fam, *gs, DType::BF16, 1, 1100, 2, 1, Dh, false, packed(1, 1100, {300, 1, 500, 77}));
    }
    gs->synchronize();
  }
  fam.finish();
}

TEST_CASE("gpu ops: flash attention is bit-identical run to run", "[gpu]") {
  GPU_OR_SKIP();
  for (Backend* gp : {&gpu(), &wgmma_backend(), &mma_sync_backend()}) {
    Backend& g = *gp;
    INFO((gp == &gpu() ? "default backend" : gp == &wgmma_backend() ? "wgmma backend" : "mma.sync backend"));
    struct Cfg {
      DType dt;
      int64_t B, S, H, Hkv, Dh;
    };
    for (const Cfg& c : {Cfg{DType::BF16, 2, 300, 8, 2, 128}, Cfg{DType::BF16, 2, 300, 8, 2, 64},
                         Cfg{DType::BF16, 1, 77, 4, 4, 16}, Cfg{DType::F32, 2, 100, 4, 1, 32},
                         Cfg{DType::F32, 1, 130, 2, 1, 128}, Cfg{DType::BF16, 1, 1100, 4, 2, 128}}) {
      INFO(to_string(c.dt) << " B=" << c.B << " S=" << c.S << " H=" << c.H << " Hkv=" << c.Hkv << " Dh=" << c.Dh);
      const int64_t T = c.B * c.S;
      auto rnd = [&](Shape s, uint64_t seed) { return normal_on(g, s, seed, c.dt); };
      const Tensor q = rnd(Shape{T, c.H * c.Dh}, 1), k = rnd(Shape{T, c.Hkv * c.Dh}, 2);
      const Tensor v = rnd(Shape{T, c.Hkv * c.Dh}, 3), dout = rnd(Shape{T, c.H * c.Dh}, 4);
      auto run = [&] {
        Tensor out = g.empty(q.shape(), c.dt), lse = g.empty(Shape{c.B * c.H, c.S}, DType::F32);
        Tensor dq = g.empty(q.shape(), c.dt), dk = g.empty(k.shape(), c.dt), dv = g.empty(v.shape(), c.dt);
        g.attention_forward(q, k, v, c.H, c.Hkv, c.S, out, lse);
        g.attention_backward(q, k, v, out, lse, dout, c.H, c.Hkv, c.S, dq, dk, dv);
        std::vector<std::vector<uint8_t>> all;
        for (const Tensor* t : {&out, &lse, &dq, &dk, &dv}) all.push_back(bytes_of(g, *t));
        return all;
      };
      const auto a = run(), b = run();
      for (size_t i = 0; i < a.size(); ++i) {
        INFO("output " << i << " (out, lse, dq, dk, dv)");
        CHECK(a[i] == b[i]);
      }
    }
  }
}

// ---- flash attention benchmark (hidden: `moelab_gpu_tests "[bench][attention]"`) --------------
// bf16, the causal FLOPs of the issue: forward 2 * 2 * B * H * S^2 * Dh / 2 (Q K^T and P V over
// the lower triangle), backward 2.5x forward (what FlashAttention-2 reports: its 5 products,
// which the Hopper backward does too; the mma.sync kernels do 7, recomputing P and dP^T in the dQ
// kernel). MOELAB_FLASH_WGMMA=0 times the mma.sync kernels.
// CUDA events around `reps` calls after 2 warm-ups.
TEST_CASE("gpu bench: flash attention forward and backward (bf16, causal)", "[.][bench][attention]") {
  GPU_OR_SKIP();
  Backend& g = gpu();
  const int reps = 10;
  struct Cfg {
    int64_t B, S, H, Hkv, Dh;
  };
  std::printf("| B | S | H | Hkv | Dh | forward ms | TFLOP/s | backward ms | TFLOP/s |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  for (const Cfg& c : {Cfg{8, 2048, 32, 8, 128}, Cfg{8, 2048, 16, 16, 128}, Cfg{8, 2048, 32, 8, 64},
                       Cfg{4, 4096, 8, 8, 128}, Cfg{32, 512, 8, 8, 128},      // F, B
                       Cfg{32, 512, 8, 8, 64}}) {                             // A
    const int64_t T = c.B * c.S;
    auto rnd = [&](Shape s, uint64_t seed) {  // cheap host values in [-1, 1), as bf16
      std::vector<double> v(static_cast<size_t>(s.numel()));
      uint64_t x = rng::mix64(seed);
      for (size_t i = 0; i < v.size(); ++i) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        v[i] = double(int64_t(x >> 40) - (int64_t(1) << 23)) / double(int64_t(1) << 23);
      }
      return g.from_host(host_tensor(v, s, DType::BF16));
    };
    const Tensor q = rnd(Shape{T, c.H * c.Dh}, 1), k = rnd(Shape{T, c.Hkv * c.Dh}, 2);
    const Tensor v = rnd(Shape{T, c.Hkv * c.Dh}, 3), dout = rnd(Shape{T, c.H * c.Dh}, 4);
    Tensor out = g.empty(q.shape(), DType::BF16), lse = g.empty(Shape{c.B * c.H, c.S}, DType::F32);
    Tensor dq = g.empty(q.shape(), DType::BF16), dk = g.empty(k.shape(), DType::BF16);
    Tensor dv = g.empty(v.shape(), DType::BF16);
    auto fwd = [&] { g.attention_forward(q, k, v, c.H, c.Hkv, c.S, out, lse); };
    auto bwd = [&] { g.attention_backward(q, k, v, out, lse, dout, c.H, c.Hkv, c.S, dq, dk, dv); };
    auto time_ms = [&](const std::function<void()>& f) {
      for (int i = 0; i < 2; ++i) f();
      auto a = g.timing_mark();
      for (int i = 0; i < reps; ++i) f();
      auto b = g.timing_mark();
      g.synchronize();
      return g.elapsed_ms(a, b) / reps;
    };
    const double tf = time_ms(fwd), tb = time_ms(bwd);
    const double flops = 2.0 * 2.0 * double(c.B * c.H) * double(c.S) * double(c.S) * double(c.Dh) / 2.0;
    std::printf("| %lld | %lld | %lld | %lld | %lld | %.3f | %.1f | %.3f | %.1f |\n", (long long)c.B,
                (long long)c.S, (long long)c.H, (long long)c.Hkv, (long long)c.Dh, tf, flops / tf * 1e-9, tb,
                2.5 * flops / tb * 1e-9);
    std::fflush(stdout);
  }
  SUCCEED();
}

TEST_CASE("gpu ops: cross_entropy, adamw", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Family fam("loss_optim");
  Backend& g = gpu();
  for (DType dt : kDtypes) {
    {
      Case k(fam, g, "cross_entropy", dt);
      const int64_t T = 33, V = 997;
      std::vector<int> y(static_cast<size_t>(T));
      for (int64_t t = 0; t < T; ++t) y[size_t(t)] = int((t * 131 + 7) % V);
      Pair logits = k.randn(Shape{T, V}, 2.0);
      Pair targets = k.ints(Shape{T}, y);
      k.scalar("value", g.cross_entropy_forward(logits.g, targets.g),
               cpu().cross_entropy_forward(logits.c, targets.c));
      Out dl = k.out("dlogits", Shape{T, V});
      cpu().cross_entropy_backward(logits.c, targets.c, 0.7, dl.c);
      g.cross_entropy_backward(logits.g, targets.g, 0.7, dl.g);
      k.close(dl);
    }
    {
      // Targets of -1 (answer-only loss, record ends, padding) bear no loss: mean over the rest.
      Case k(fam, g, "cross_entropy (ignored targets)", dt);
      const int64_t T = 41, V = 300;
      std::vector<int> y(static_cast<size_t>(T));
      for (int64_t t = 0; t < T; ++t) y[size_t(t)] = t % 3 == 1 ? -1 : int((t * 37 + 5) % V);
      Pair logits = k.randn(Shape{T, V}, 2.0);
      Pair targets = k.ints(Shape{T}, y);
      k.scalar("value", g.cross_entropy_forward(logits.g, targets.g),
               cpu().cross_entropy_forward(logits.c, targets.c));
      Out dl = k.out("dlogits", Shape{T, V});
      cpu().cross_entropy_backward(logits.c, targets.c, 1.3, dl.c);
      g.cross_entropy_backward(logits.g, targets.g, 1.3, dl.g);
      k.close(dl);
      Pair none = k.ints(Shape{2}, {-1, -1});
      Pair l2 = k.randn(Shape{2, V});
      k.scalar("value (no target bears loss)", g.cross_entropy_forward(l2.g, none.g) + 1.0,
               cpu().cross_entropy_forward(l2.c, none.c) + 1.0);
    }
    {
      Case k(fam, g, "adamw", dt);
      const Shape s{37, 29};
      Out p = k.acc("param", s);
      Pair grad = k.randn(s, 0.1);
      // fp32 optimizer state on the GPU, f64 on the CPU reference (the op fixes both).
      Pair m0 = k.randn(s, 0.01), v0 = k.uniform(s, 1e-5, 1e-3);
      Out m = k.acc("m", k.values(s, host_values(m0.c), DType::F32));
      Out v = k.acc("v", k.values(s, host_values(v0.c), DType::F32));
      cpu().adamw(p.c, grad.c, m.c, v.c, 1e-2, 0.9, 0.95, 1e-8, 0.1, 3);
      g.adamw(p.g, grad.g, m.g, v.g, 1e-2, 0.9, 0.95, 1e-8, 0.1, 3);
      k.close(p);
      k.close(m);
      k.close(v);
    }
    // the trainer's mixed-precision step: an f32 master, its copy in the case dtype written in
    // the same pass (cast_to); 1073 elements take the scalar kernel, 928 the 4-wide one
    for (const Shape s : {Shape{37, 29}, Shape{32, 29}}) {
      Case k(fam, g, s.numel() % 4 ? "adamw (f32 master, cast_to)" : "adamw (f32 master, cast_to, 4-wide)", dt);
      Pair p0 = k.randn(s);
      Out p = k.acc("param", k.values(s, host_values(p0.c), DType::F32));
      Pair grad = k.randn(s, 0.1);
      Pair m0 = k.randn(s, 0.01), v0 = k.uniform(s, 1e-5, 1e-3);
      Out m = k.acc("m", k.values(s, host_values(m0.c), DType::F32));
      Out v = k.acc("v", k.values(s, host_values(v0.c), DType::F32));
      Out copy = k.out("cast_to", s);
      cpu().adamw(p.c, grad.c, m.c, v.c, 1e-2, 0.9, 0.95, 1e-8, 0.1, 3, copy.c);
      g.adamw(p.g, grad.g, m.g, v.g, 1e-2, 0.9, 0.95, 1e-8, 0.1, 3, copy.g);
      k.close(p);
      k.close(m);
      k.close(v);
      k.close(copy);
    }
    // The two kernels agree bit for bit: 932 elements take the 4-wide one, 933 the scalar one, on
    // the same values element by element (the first 932 compared).
    {
      std::vector<std::vector<double>> outs;
      for (int64_t n : {932, 933}) {
        Tensor p = normal_on(g, Shape{n}, 1, DType::F32);
        Tensor grad = normal_on(g, Shape{n}, 2, dt, 0.1);
        Tensor m = normal_on(g, Shape{n}, 3, DType::F32, 0.01);
        std::vector<double> v0 = host_values(normal_on(cpu(), Shape{n}, 4, DType::F64, 1e-4));
        for (double& x : v0) x = x * x + 1e-5;
        Tensor v = g.from_host(host_tensor(v0, Shape{n}, DType::F32));
        Tensor copy = g.empty(Shape{n}, dt);
        g.adamw(p, grad, m, v, 1e-2, 0.9, 0.95, 1e-8, 0.1, 3, copy);
        std::vector<double> all;
        for (const Tensor* t : {&p, &m, &v, &copy}) {
          const std::vector<double> h = host_values(g.to_host(*t));
          all.insert(all.end(), h.begin(), h.begin() + 932);
        }
        outs.push_back(all);
      }
      INFO("adamw kernels agree, " << to_string(dt));
      CHECK(outs[0] == outs[1]);
    }
  }
  fam.finish();
}

TEST_CASE("gpu ops: supports() and NotSupported for other dtypes", "[gpu]") {
  GPU_OR_SKIP();
  SEED_INFO();
  Backend& g = gpu();
  // Every op is offered in f32 and bf16 (dispatch_plan and balanced_assign, which work on
  // expert indices, in i32); f64 and i32 only for fill/cast.
  for (int i = 0; i < int(Op::kCount); ++i) {
    const Op op = Op(i);
    INFO("op " << to_string(op));
    if (op == Op::DispatchPlan || op == Op::BalancedAssign) {
      CHECK(g.supports(op, DType::I32));
      continue;
    }
    CHECK(g.supports(op, DType::F32));
    CHECK(g.supports(op, DType::BF16));
    if (op != Op::Fill && op != Op::Copy && op != Op::Cast) CHECK_FALSE(g.supports(op, DType::F64));
  }
  // An unsupported combination throws NotSupported naming the op; it never crashes.
  Tensor a = g.zeros(Shape{4, 4}, DType::F64), c = g.zeros(Shape{4, 4}, DType::F64);
  REQUIRE_THROWS_AS(g.gemm(false, false, 1.0, a, a, 0.0, c), NotSupported);
  REQUIRE_THROWS_WITH(g.softmax_forward(a, c), has_substr("softmax_forward"));
  // f64 fill and cast are offered, so a crosscheck can move f64 data through the GPU.
  Tensor f = g.zeros(Shape{3}, DType::F32);
  g.fill(a, 2.5);
  g.cast(a.reshape(Shape{16}).view_rows(0, 3), f);
  CHECK(g.to_vector<float>(f) == std::vector<float>{2.5f, 2.5f, 2.5f});
}

// ---- grouped-GEMM benchmark (hidden: run with `moelab_gpu_tests "[bench]"`) -----------------------
// PerExpert (one cublasGemmEx per expert) against GroupedBatched (one cublasGemmGroupedBatchedEx),
// forward and weight gradient, f32 and bf16, MoE shapes with uneven loads and one empty expert.
// Milliseconds per call: host wall time over `reps` calls after 3 warm-ups, bracketed by
// synchronize(), so launch overhead counts (it is what separates the two paths).
TEST_CASE("gpu bench: grouped GEMM, per-expert vs grouped-batched cuBLAS (and auto)", "[.][bench][gpu]") {
  GPU_OR_SKIP();
  const int reps = 20;
  auto per = make_cuda_backend({0, GroupedGemmImpl::PerExpert});
  auto grp = make_cuda_backend({0, GroupedGemmImpl::GroupedBatched});
  auto aut = make_cuda_backend({0, GroupedGemmImpl::Auto});
  auto offsets = [](int64_t rows, int64_t E) {
    std::vector<double> w(static_cast<size_t>(E));
    double sum = 0;
    for (int64_t e = 0; e < E; ++e)
      sum += (w[size_t(e)] = (E >= 8 && e == 3) ? 0.0 : 0.25 + 1.5 * rng::uniform(11, uint64_t(e)));
    std::vector<int64_t> off(static_cast<size_t>(E + 1), 0);
    for (int64_t e = 0; e < E; ++e) off[size_t(e + 1)] = off[size_t(e)] + int64_t(double(rows) * w[size_t(e)] / sum);
    off[size_t(E)] = rows;
    return off;
  };
  auto random = [](Shape s, DType dt, uint64_t seed) {  // host tensor, uploaded to both backends
    std::vector<double> v(static_cast<size_t>(s.numel()));
    for (size_t i = 0; i < v.size(); ++i) v[i] = 0.05 * (2.0 * rng::uniform(seed, i) - 1.0);
    return host_tensor(v, s, dt);
  };
  auto time_ms = [&](Backend& b, const std::function<void()>& f) {
    for (int i = 0; i < 3; ++i) f();
    b.synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    b.synchronize();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
  };
  auto nmse = [](const std::vector<double>& a, const std::vector<double>& r) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      num += (a[i] - r[i]) * (a[i] - r[i]);
      den += r[i] * r[i];
    }
    return den > 0 ? num / den : num;
  };
  std::printf("| pass | dtype | E | rows | Kin | N | per-expert ms | TFLOP/s | grouped ms | TFLOP/s | auto ms | NMSE between |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  struct Shp { int64_t E, rows, kin, n; };
  const Shp shapes[] = {{8, 16384, 1024, 2048}, {32, 16384, 1024, 1024}, {64, 8192, 512, 512},
                        {128, 8192, 512, 512}, {256, 4096, 256, 256}};
  for (DType dt : {DType::BF16, DType::F32})
    for (const Shp& cs : shapes) {
      const auto off = offsets(cs.rows, cs.E);
      const double flops = 2.0 * double(cs.rows) * double(cs.kin) * double(cs.n);
      const Tensor xh = random(Shape{cs.rows, cs.kin}, dt, 1), wh = random(Shape{cs.E, cs.kin, cs.n}, dt, 2);
      Tensor x1 = per->from_host(xh), w1 = per->from_host(wh);
      Tensor x2 = grp->from_host(xh), w2 = grp->from_host(wh);
      Tensor x3 = aut->from_host(xh), w3 = aut->from_host(wh);
      Tensor y1 = per->empty(Shape{cs.rows, cs.n}, dt), y2 = grp->empty(Shape{cs.rows, cs.n}, dt);
      Tensor y3 = aut->empty(Shape{cs.rows, cs.n}, dt);
      const double tp = time_ms(*per, [&] { per->grouped_gemm(x1, w1, off, y1, false, 0.0); });
      const double tg = time_ms(*grp, [&] { grp->grouped_gemm(x2, w2, off, y2, false, 0.0); });
      const double ta = time_ms(*aut, [&] { aut->grouped_gemm(x3, w3, off, y3, false, 0.0); });
      std::printf("| fwd | %s | %lld | %lld | %lld | %lld | %.4f | %.1f | %.4f | %.1f | %.4f | %.1e |\n",
                  to_string(dt), (long long)cs.E, (long long)cs.rows, (long long)cs.kin, (long long)cs.n,
                  tp, flops / tp * 1e-9, tg, flops / tg * 1e-9, ta,
                  nmse(host_values(grp->to_host(y2)), host_values(per->to_host(y1))));
      Tensor dw1 = per->empty(Shape{cs.E, cs.kin, cs.n}, dt), dw2 = grp->empty(Shape{cs.E, cs.kin, cs.n}, dt);
      Tensor dw3 = aut->empty(Shape{cs.E, cs.kin, cs.n}, dt);
      const double tpw = time_ms(*per, [&] { per->grouped_gemm_wgrad(x1, y1, off, dw1, 0.0); });
      const double tgw = time_ms(*grp, [&] { grp->grouped_gemm_wgrad(x2, y2, off, dw2, 0.0); });
      const double taw = time_ms(*aut, [&] { aut->grouped_gemm_wgrad(x3, y3, off, dw3, 0.0); });
      std::printf("| wgrad | %s | %lld | %lld | %lld | %lld | %.4f | %.1f | %.4f | %.1f | %.4f | %.1e |\n",
                  to_string(dt), (long long)cs.E, (long long)cs.rows, (long long)cs.kin, (long long)cs.n,
                  tpw, flops / tpw * 1e-9, tgw, flops / tgw * 1e-9, taw,
                  nmse(host_values(grp->to_host(dw2)), host_values(per->to_host(dw1))));
      std::fflush(stdout);
    }
  SUCCEED();
}

// ---- moelab's mma grouped GEMM against cuBLAS (hidden: `moelab_gpu_tests "[bench][ggemm]"`) -----
// The expert GEMMs of one MoE layer at 16384 tokens, bf16: W1 forward (X [R, d] W1 [E, d, 2f]),
// W1 dgrad (dAB [R, 2f] W1^T), W1 and W2 wgrad (dW1 = X^T dAB, dW2 = H^T dY: beta 0, as a step's first
// backward writes them) and W2 forward (H [R, f] W2),
// R = tokens x top-k rows routed with mildly uneven (balanced-ish random) loads. Each variant is
// timed with CUDA events on its backend's stream around one call: median of 10 after 3 warm-ups
// (a per-expert call's host gaps between its cuBLAS launches count, as they do in training).
// NMSE: the mma output against the grouped-batched one (both bf16).
TEST_CASE("gpu bench: grouped GEMM, mma and wgmma kernels vs cuBLAS grouped-batched vs per-expert vs chunked", "[.][bench][ggemm][gpu]") {
  GPU_OR_SKIP();
  const DType dt = DType::BF16;
  constexpr int kImpls = 6;
  const GroupedGemmImpl impls[kImpls] = {GroupedGemmImpl::Mma,     GroupedGemmImpl::GroupedBatched,
                                         GroupedGemmImpl::PerExpert, GroupedGemmImpl::Chunked,
                                         GroupedGemmImpl::Chunked,   GroupedGemmImpl::Wgmma};
  const int64_t chunks[kImpls] = {128, 128, 128, 128, 256, 128};
  std::unique_ptr<Backend> be[kImpls];
  for (int i = 0; i < kImpls; ++i) be[i] = make_cuda_backend({0, impls[i], chunks[i]});
  struct Model {
    const char* name;
    int64_t tokens, topk, d, E, f;
  };
  const Model models[] = {{"fine 64x1408 top-6", 16384, 6, 2048, 64, 1408},
                          {"Mixtral 8x14336 top-2", 16384, 2, 4096, 8, 14336},
                          {"config A 8x2048 top-2", 16384, 2, 512, 8, 2048},
                          {"configs B, F 8x4096 top-2", 16384, 2, 1024, 8, 4096},
                          {"config E 128x512 top-8", 16384, 8, 2048, 128, 512}};
  // Host bf16 tensor of uniform values in [-1, 1) (a hash per element: fast for 10^9 elements).
  auto random_bf16 = [](Shape s, uint64_t seed) {
    Tensor t = host_empty(s, DType::BF16);
    uint16_t* p = static_cast<uint16_t*>(t.data());
    for (int64_t i = 0; i < s.numel(); ++i) {
      uint64_t z = (uint64_t(i) + seed * 0x632BE59BD9B4E019ULL) * 0x9E3779B97F4A7C15ULL;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
      z ^= z >> 31;
      const float f = float(int64_t(z >> 40) - (int64_t(1) << 23)) * (1.0f / float(1 << 23));
      uint32_t u;
      std::memcpy(&u, &f, 4);
      p[i] = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
    return t;
  };
  auto median_ms = [](Backend& b, const std::function<void()>& f) {
    auto stream = static_cast<cudaStream_t>(cuda_backend_stream(b));
    for (int i = 0; i < 3; ++i) f();
    b.synchronize();
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    std::vector<float> ms;
    for (int i = 0; i < 10; ++i) {
      cudaEventRecord(e0, stream);
      f();
      cudaEventRecord(e1, stream);
      cudaEventSynchronize(e1);
      float t = 0;
      cudaEventElapsedTime(&t, e0, e1);
      ms.push_back(t);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    std::sort(ms.begin(), ms.end());
    return 0.5 * double(ms[4] + ms[5]);
  };
  std::printf("TFLOP/s per call\n");
  std::printf("| shape | GEMM | E | rows | K | N | mma | grouped | per-expert | chunked 128 | chunked 256 "
              "| wgmma | NMSE mma vs grouped | NMSE chunked | NMSE wgmma |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Model& m : models) {
    const int64_t R = m.tokens * m.topk, d = m.d, E = m.E, f = m.f, f2 = 2 * m.f;
    std::vector<int64_t> off(static_cast<size_t>(E + 1), 0);
    {
      std::vector<double> w(static_cast<size_t>(E));
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += (w[size_t(e)] = 0.75 + 0.5 * rng::uniform(23, uint64_t(e)));
      for (int64_t e = 0; e < E; ++e) off[size_t(e + 1)] = off[size_t(e)] + int64_t(double(R) * w[size_t(e)] / sum);
      off[size_t(E)] = R;
    }
    const Tensor xh = random_bf16(Shape{R, d}, 1), w1h = random_bf16(Shape{E, d, f2}, 2);
    const Tensor dabh = random_bf16(Shape{R, f2}, 3), hh = random_bf16(Shape{R, f}, 4);
    const Tensor w2h = random_bf16(Shape{E, f, d}, 5);
    struct Set {
      Tensor x, w1, dab, h, w2, ab, dx, dw1, y, dw2;
    } t[kImpls];
    for (int i = 0; i < kImpls; ++i) {
      Backend& b = *be[i];
      t[i] = Set{b.from_host(xh), b.from_host(w1h), b.from_host(dabh), b.from_host(hh), b.from_host(w2h),
                 b.empty(Shape{R, f2}, dt), b.empty(Shape{R, d}, dt), b.zeros(Shape{E, d, f2}, dt),
                 b.empty(Shape{R, d}, dt), b.zeros(Shape{E, f, d}, dt)};
    }
    struct Gemm {
      const char* name;
      int64_t K, N;
      std::function<void(Backend&, Set&)> run;
      Tensor Set::*out;
    };
    const Gemm gemms[] = {
        {"W1 fwd", d, f2, [&](Backend& b, Set& s) { b.grouped_gemm(s.x, s.w1, off, s.ab, false, 0.0); }, &Set::ab},
        {"W1 dgrad", f2, d, [&](Backend& b, Set& s) { b.grouped_gemm(s.dab, s.w1, off, s.dx, true, 0.0); }, &Set::dx},
        // beta 0: a step's first backward writes the expert gradients (ParamStore's deferred zero)
        {"W1 wgrad", d, f2, [&](Backend& b, Set& s) { b.grouped_gemm_wgrad(s.x, s.dab, off, s.dw1, 0.0); }, &Set::dw1},
        {"W2 wgrad", f, d, [&](Backend& b, Set& s) { b.grouped_gemm_wgrad(s.h, s.x, off, s.dw2, 0.0); }, &Set::dw2},
        {"W2 fwd", f, d, [&](Backend& b, Set& s) { b.grouped_gemm(s.h, s.w2, off, s.y, false, 0.0); }, &Set::y}};
    for (const Gemm& gm : gemms) {
      const double flops = 2.0 * double(R) * double(gm.K) * double(gm.N);
      double ms[kImpls];
      for (int i = 0; i < kImpls; ++i) ms[i] = median_ms(*be[i], [&] { gm.run(*be[i], t[i]); });
      // NMSE of an output against the grouped-batched one, on that output's backend.
      auto nmse_vs_grouped = [&](int i) {
        Tensor ref = be[i]->from_host(be[1]->to_host(t[1].*gm.out));
        const double den = be[i]->sum_squares(ref);
        be[i]->axpy(-1.0, t[i].*gm.out, ref);
        return den > 0 ? be[i]->sum_squares(ref) / den : -1.0;
      };
      std::printf("| %s | %s | %lld | %lld | %lld | %lld |", m.name, gm.name, (long long)E, (long long)R,
                  (long long)gm.K, (long long)gm.N);
      for (int i = 0; i < kImpls; ++i) std::printf(" %.0f |", flops / ms[i] * 1e-9);
      std::printf(" %.1e | %.1e | %.1e |\n", nmse_vs_grouped(0), nmse_vs_grouped(3), nmse_vs_grouped(5));
      std::fflush(stdout);
    }
  }
  SUCCEED();
}
