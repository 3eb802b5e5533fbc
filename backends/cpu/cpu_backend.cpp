// moelab: CPU reference backend. Float ops are templated on the storage type T (double or
// float); every reduction accumulates in double. Shapes were checked by core/backend.cpp.
//
// Results do not depend on the number of threads (issue 13; tests/test_threads.cpp):
//   - Eigen never parallelises a product itself (EIGEN_DONT_PARALLELIZE below): its OpenMP GEMM
//     picks another depth blocking kc for 2+ threads than for 1 (for f32 here: 288 against 264),
//     so every output element summed its k terms in other chunks and the last bits changed
//     with the thread count. Every product here is computed whole by one thread, exactly as a
//     one-thread run computed it before (same bits as earlier single-threaded runs).
//   - Eigen's blocking depends on the L1 and L2 sizes it reads from cpuid, so the same binary
//     could sum in other chunks on another CPU; pin_eigen_blocking() fixes them to the sizes
//     this project's results were made with (32 KiB L1, 1 MiB L2).
//   - Threads work only on independent items whose partition is fixed by the shapes: the
//     experts of a grouped GEMM, the (sequence, head) pairs of attention. Each item is computed
//     whole by one thread into its own output, so the schedule cannot change a bit.
// Every other op is a plain serial loop.
#define EIGEN_DONT_PARALLELIZE
#include "backends/cpu/cpu_backend.h"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <numeric>
#include <type_traits>
#include <unordered_map>

// A loop (_2: two nested loops) over independent items (see the header): run by the OpenMP team
// when `cond` holds.
#ifdef _OPENMP
#define MOELAB_PRAGMA(x) _Pragma(#x)
#define MOELAB_PARALLEL_FOR(cond) MOELAB_PRAGMA(omp parallel for schedule(dynamic, 1) if(cond))
#define MOELAB_PARALLEL_FOR_2(cond) MOELAB_PRAGMA(omp parallel for collapse(2) schedule(dynamic, 1) if(cond))
#else
#define MOELAB_PARALLEL_FOR(cond)
#define MOELAB_PARALLEL_FOR_2(cond)
#endif

#include "core/rng.h"

namespace moelab {
namespace {

template <class T>
using MatMap = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;

// Multiply-adds below which a loop over independent items stays on one thread (the team's
// start-up costs more than it saves). Changes speed only, never a result.
constexpr int64_t kParallelWork = int64_t(1) << 18;

// Eigen's GEMM blocking (depth kc, panel widths mc and nc) is computed from the L1 and L2 cache
// sizes, which Eigen reads from cpuid at run time: other sizes sum the k terms of a product in
// other chunks. Pinned to the sizes Eigen 3.4 read on the machine the README's CPU results were
// made on (AMD EPYC, 32 KiB L1d, 1 MiB L2; L3 only has to be non-zero single-threaded), so the
// same binary gives the same bits on any x86-64 CPU. Once per process, before any product.
void pin_eigen_blocking() {
  static std::once_flag once;
  std::call_once(once, [] {
    Eigen::initParallel();
    Eigen::setCpuCacheSizes(std::ptrdiff_t(32) << 10, std::ptrdiff_t(1) << 20, std::ptrdiff_t(32) << 20);
  });
}

// Calls f(T{}) with T the C++ type of a float dtype.
template <class F> void dispatch_float(DType dt, F&& f) {
  switch (dt) {
    case DType::F64: f(double{}); return;
    case DType::F32: f(float{}); return;
    default: throw NotSupported(std::string("cpu: dtype ") + to_string(dt));
  }
}
template <class R, class F> R dispatch_float_r(DType dt, F&& f) {
  switch (dt) {
    case DType::F64: return f(double{});
    case DType::F32: return f(float{});
    default: throw NotSupported(std::string("cpu: dtype ") + to_string(dt));
  }
}

double sigmoid(double x) { return x >= 0 ? 1.0 / (1.0 + std::exp(-x)) : std::exp(x) / (1.0 + std::exp(x)); }
double normal_pdf(double z) { return std::exp(-0.5 * z * z) * 0.3989422804014327; }
double normal_cdf(double z) { return 0.5 * std::erfc(-z * 0.7071067811865476); }

template <class T> double logsumexp_row(const T* l, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, double(l[j]));
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(double(l[j]) - m);
  return m + std::log(s);
}

// CV^2 = Var(x) / mean(x)^2 (population variance) and its gradient d CV^2 / d x_e.
double cv2(const std::vector<double>& x, std::vector<double>* grad) {
  const double n = double(x.size());
  const double m = std::accumulate(x.begin(), x.end(), 0.0) / n;
  if (grad) grad->assign(x.size(), 0.0);
  if (m == 0) return 0.0;
  double v = 0;
  for (double xi : x) v += (xi - m) * (xi - m);
  v /= n;
  if (grad)
    for (size_t e = 0; e < x.size(); ++e)
      (*grad)[e] = (2.0 / n) * (x[e] - m) / (m * m) - 2.0 * v / (m * m * m) / n;
  return v / (m * m);
}

class CpuBackend final : public Backend {
  std::unordered_map<size_t, std::vector<void*>> free_blocks_;
  std::unordered_map<void*, size_t> block_size_;
  int64_t live_ = 0, peak_ = 0;  // bytes in live tensors (peak_bytes)

 public:
  std::string name() const override { return "cpu"; }
  Device device() const override { return Device::CPU; }
  void synchronize() override {}

  bool supports(Op op, DType dt) const override {
    switch (op) {
      case Op::Fill: case Op::Copy: return true;
      case Op::Cast: return true;
      case Op::DispatchPlan: case Op::BalancedAssign: return dt == DType::I32;
      default: return dt == DType::F64 || dt == DType::F32;
    }
  }

 protected:
  // A caching allocator: a training step frees and re-allocates the same sizes every step, and
  // returning large blocks to the OS costs a page fault per 4 KiB on the next touch (measured:
  // ~20% of a step). Freed blocks wait in per-size free lists; memory stays at the peak.
  void* alloc_bytes(size_t bytes) override {
    const size_t size = (bytes + 63) / 64 * 64;
    live_ += int64_t(size);
    peak_ = std::max(peak_, live_);
    auto it = free_blocks_.find(size);
    if (it != free_blocks_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      block_size_[p] = size;
      return p;
    }
    void* p = std::aligned_alloc(64, size);
    MOELAB_CHECK(p, "cpu: out of memory allocating ", bytes, " bytes");
    block_size_[p] = size;
    return p;
  }
  void free_bytes(void* p) override {
    auto it = block_size_.find(p);
    if (it == block_size_.end()) return;
    live_ -= int64_t(it->second);
    free_blocks_[it->second].push_back(p);
    block_size_.erase(it);
  }

 public:
  // The most bytes in live tensors at once (not the cache's footprint): moelab bench's peak.
  int64_t peak_bytes() const override { return peak_; }
  void reset_peak_bytes() override { peak_ = live_; }
  ~CpuBackend() override {
    for (auto& [size, list] : free_blocks_)
      for (void* p : list) std::free(p);
  }

 protected:
  void copy_bytes(void* dst, bool, const void* src, bool, size_t n) override {
    if (n) std::memcpy(dst, src, n);
  }

  // ---- elementwise and GEMM --------------------------------------------------------------

  void fill_impl(const Tensor& x, double v) override {
    const int64_t n = x.numel();
    switch (x.dtype()) {
      case DType::F64: std::fill_n(x.ptr<double>(), n, v); break;
      case DType::F32: std::fill_n(x.ptr<float>(), n, float(v)); break;
      case DType::BF16: std::fill_n(x.ptr<bf16>(), n, bf16::from_float(float(v))); break;
      case DType::I32: std::fill_n(x.ptr<int32_t>(), n, int32_t(v)); break;
    }
  }

  static double load(const Tensor& t, int64_t i) {
    switch (t.dtype()) {
      case DType::F64: return t.ptr<double>()[i];
      case DType::F32: return t.ptr<float>()[i];
      case DType::BF16: return t.ptr<bf16>()[i].to_float();
      case DType::I32: return t.ptr<int32_t>()[i];
    }
    return 0;
  }
  void cast_impl(const Tensor& src, const Tensor& dst) override {
    const int64_t n = src.numel();
    for (int64_t i = 0; i < n; ++i) {
      const double v = load(src, i);
      switch (dst.dtype()) {
        case DType::F64: dst.ptr<double>()[i] = v; break;
        case DType::F32: dst.ptr<float>()[i] = float(v); break;
        case DType::BF16: dst.ptr<bf16>()[i] = bf16::from_float(float(v)); break;
        case DType::I32: dst.ptr<int32_t>()[i] = int32_t(v); break;
      }
    }
  }

  void axpy_impl(double alpha, const Tensor& x, const Tensor& y) override {
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const T* xp = x.ptr<T>();
      T* yp = y.ptr<T>();
      for (int64_t i = 0; i < x.numel(); ++i) yp[i] = T(yp[i] + alpha * xp[i]);
    });
  }

  void transpose_impl(const Tensor& x, const Tensor& y) override {
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t M = x.dim(0), N = x.dim(1);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) y.ptr<T>()[j * M + i] = x.ptr<T>()[i * N + j];
    });
  }

  void gemm_impl(bool ta, bool tb, double alpha, const Tensor& a, const Tensor& b, double beta,
                 const Tensor& c) override {
    dispatch_float(a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      MatMap<T> A(a.ptr<T>(), a.dim(0), a.dim(1)), B(b.ptr<T>(), b.dim(0), b.dim(1));
      MatMap<T> C(c.ptr<T>(), c.dim(0), c.dim(1));
      gemm_into<T>(ta, tb, T(alpha), A, B, T(beta), C);
    });
  }

  // C = alpha op(A) op(B) + beta C. beta == 0 ignores C's old contents (even NaN).
  template <class T, class MA, class MB, class MC>
  static void gemm_into(bool ta, bool tb, T alpha, const MA& A, const MB& B, T beta, MC& C) {
    if (C.size() == 0) return;
    if ((A.cols() == 0 && !ta) || (A.rows() == 0 && ta)) {  // empty inner dimension: C = beta C
      if (beta == T(0)) C.setZero();
      else C *= beta;
      return;
    }
    // beta == 0 ignores C's old contents (even NaN) without a separate memset.
    auto run = [&](const auto& product) {
      if (beta == T(0)) C.noalias() = alpha * product;
      else {
        if (beta != T(1)) C *= beta;
        C.noalias() += alpha * product;
      }
    };
    if (!ta && !tb) run(A * B);
    else if (ta && !tb) run(A.transpose() * B);
    else if (!ta && tb) run(A * B.transpose());
    else run(A.transpose() * B.transpose());
  }

  void grouped_gemm_impl(const Tensor& x, const Tensor& w, const std::vector<int64_t>& off,
                         const Tensor& y, bool trans_w, double beta) override {
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t kin = x.dim(1), n = y.dim(1), E = w.dim(0);
      MOELAB_PARALLEL_FOR(E > 1 && x.dim(0) * kin * n >= kParallelWork)
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r0 = off[e], rows = off[e + 1] - off[e];
        if (rows == 0) continue;
        MatMap<T> X(x.ptr<T>() + r0 * kin, rows, kin), Y(y.ptr<T>() + r0 * n, rows, n);
        MatMap<T> W(w.ptr<T>() + e * w.dim(1) * w.dim(2), w.dim(1), w.dim(2));
        gemm_into<T>(false, trans_w, T(1), X, W, T(beta), Y);
      }
    });
  }

  void grouped_gemm_wgrad_impl(const Tensor& x, const Tensor& dy, const std::vector<int64_t>& off,
                               const Tensor& dw, double beta) override {
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t kin = x.dim(1), n = dy.dim(1), E = dw.dim(0);
      MOELAB_PARALLEL_FOR(E > 1 && x.dim(0) * kin * n >= kParallelWork)
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r0 = off[e], rows = off[e + 1] - off[e];
        MatMap<T> X(x.ptr<T>() + r0 * kin, rows, kin), DY(dy.ptr<T>() + r0 * n, rows, n);
        MatMap<T> DW(dw.ptr<T>() + e * kin * n, kin, n);
        gemm_into<T>(true, false, T(1), X, DY, T(beta), DW);
      }
    });
  }

  void swiglu_forward_impl(const Tensor& ab, const Tensor& h) override {
    dispatch_float(ab.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = h.dim(0), F = h.dim(1);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t f = 0; f < F; ++f) {
          const double g = ab.ptr<T>()[r * 2 * F + f], u = ab.ptr<T>()[r * 2 * F + F + f];
          h.ptr<T>()[r * F + f] = T(g * sigmoid(g) * u);
        }
    });
  }

  void swiglu_backward_impl(const Tensor& ab, const Tensor& dh, const Tensor& dab) override {
    dispatch_float(ab.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = dh.dim(0), F = dh.dim(1);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t f = 0; f < F; ++f) {
          const double g = ab.ptr<T>()[r * 2 * F + f], u = ab.ptr<T>()[r * 2 * F + F + f];
          const double s = sigmoid(g), d = dh.ptr<T>()[r * F + f];
          dab.ptr<T>()[r * 2 * F + f] = T(d * u * s * (1.0 + g * (1.0 - s)));  // d silu / dg
          dab.ptr<T>()[r * 2 * F + F + f] = T(d * g * s);
        }
    });
  }

  void softmax_forward_impl(const Tensor& l, const Tensor& p) override {
    dispatch_float(l.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = l.dim(0), N = l.dim(1);
      for (int64_t r = 0; r < R; ++r) {
        const T* lr = l.ptr<T>() + r * N;
        const double lse = logsumexp_row(lr, N);
        for (int64_t j = 0; j < N; ++j) p.ptr<T>()[r * N + j] = T(std::exp(double(lr[j]) - lse));
      }
    });
  }

  void softmax_backward_impl(const Tensor& p, const Tensor& dp, const Tensor& dl) override {
    dispatch_float(p.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = p.dim(0), N = p.dim(1);
      for (int64_t r = 0; r < R; ++r) {
        const T *pr = p.ptr<T>() + r * N, *dpr = dp.ptr<T>() + r * N;
        double dot = 0;
        for (int64_t j = 0; j < N; ++j) dot += double(pr[j]) * dpr[j];
        for (int64_t j = 0; j < N; ++j) dl.ptr<T>()[r * N + j] = T(pr[j] * (dpr[j] - dot));
      }
    });
  }

  template <class Fn> void elementwise(const Tensor& x, const Tensor& y, Fn fn) {
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (int64_t i = 0; i < x.numel(); ++i) y.ptr<T>()[i] = T(fn(double(x.ptr<T>()[i]), i));
    });
  }
  template <class Fn>
  void elementwise2(const Tensor& a, const Tensor& b, const Tensor& y, Fn fn) {
    dispatch_float(a.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (int64_t i = 0; i < a.numel(); ++i)
        y.ptr<T>()[i] = T(fn(double(a.ptr<T>()[i]), double(b.ptr<T>()[i]), i));
    });
  }

  void sigmoid_forward_impl(const Tensor& x, const Tensor& y) override {
    elementwise(x, y, [](double v, int64_t) { return sigmoid(v); });
  }
  void sigmoid_backward_impl(const Tensor& y, const Tensor& dy, const Tensor& dx) override {
    elementwise2(y, dy, dx, [](double s, double d, int64_t) { return d * s * (1.0 - s); });
  }
  void softplus_forward_impl(const Tensor& x, const Tensor& y) override {
    elementwise(x, y, [](double v, int64_t) { return std::max(v, 0.0) + std::log1p(std::exp(-std::abs(v))); });
  }
  void softplus_backward_impl(const Tensor& x, const Tensor& dy, const Tensor& dx) override {
    elementwise2(x, dy, dx, [](double v, double d, int64_t) { return d * sigmoid(v); });
  }

  void row_normalize_forward_impl(const Tensor& x, const Tensor& y) override {
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = x.dim(0), N = x.dim(1);
      for (int64_t r = 0; r < R; ++r) {
        double s = 0;
        for (int64_t j = 0; j < N; ++j) s += x.ptr<T>()[r * N + j];
        for (int64_t j = 0; j < N; ++j) y.ptr<T>()[r * N + j] = T(x.ptr<T>()[r * N + j] / s);
      }
    });
  }
  void row_normalize_backward_impl(const Tensor& x, const Tensor& dy, const Tensor& dx) override {
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = x.dim(0), N = x.dim(1);
      for (int64_t r = 0; r < R; ++r) {
        double s = 0, dot = 0;
        for (int64_t j = 0; j < N; ++j) {
          s += x.ptr<T>()[r * N + j];
          dot += double(dy.ptr<T>()[r * N + j]) * x.ptr<T>()[r * N + j];
        }
        for (int64_t j = 0; j < N; ++j)
          dx.ptr<T>()[r * N + j] = T(dy.ptr<T>()[r * N + j] / s - dot / (s * s));
      }
    });
  }

  void row_scale_forward_impl(const Tensor& s, const Tensor& x, const Tensor& y) override {
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = x.dim(0), N = x.dim(1);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < N; ++j)
          y.ptr<T>()[r * N + j] = T(double(s.ptr<T>()[r]) * x.ptr<T>()[r * N + j]);
    });
  }
  void row_scale_backward_impl(const Tensor& s, const Tensor& x, const Tensor& dy,
                               const Tensor& ds, const Tensor& dx) override {
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = x.dim(0), N = x.dim(1);
      for (int64_t r = 0; r < R; ++r) {
        double acc = 0;
        for (int64_t j = 0; j < N; ++j) {
          acc += double(dy.ptr<T>()[r * N + j]) * x.ptr<T>()[r * N + j];
          dx.ptr<T>()[r * N + j] = T(double(s.ptr<T>()[r]) * dy.ptr<T>()[r * N + j]);
        }
        ds.ptr<T>()[r] = T(acc);
      }
    });
  }

  void dropout_forward_impl(const Tensor& x, double p, uint64_t seed, const Tensor& y) override {
    elementwise(x, y, [&](double v, int64_t i) {
      return rng::uniform(seed, uint64_t(i)) >= p ? v / (1.0 - p) : 0.0;
    });
  }
  void dropout_backward_impl(const Tensor& dy, double p, uint64_t seed, const Tensor& dx) override {
    dropout_forward_impl(dy, p, seed, dx);  // the same mask and scale
  }
  void jitter_forward_impl(const Tensor& x, double eps, uint64_t seed, const Tensor& y,
                           uint64_t offset) override {
    elementwise(x, y, [&](double v, int64_t i) {
      return v * (1.0 - eps + 2.0 * eps * rng::uniform(seed, offset + uint64_t(i)));
    });
  }
  void jitter_backward_impl(const Tensor& dy, double eps, uint64_t seed, const Tensor& dx,
                            uint64_t offset) override {
    jitter_forward_impl(dy, eps, seed, dx, offset);  // linear in x: the same multiplier
  }

  void noisy_logits_forward_impl(const Tensor& clean, const Tensor& std, double sigma,
                                 uint64_t seed, const Tensor& h, uint64_t offset) override {
    dispatch_float(clean.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (int64_t i = 0; i < clean.numel(); ++i) {
        const double s = std.defined() ? double(std.ptr<T>()[i]) : sigma;
        h.ptr<T>()[i] = T(clean.ptr<T>()[i] + rng::normal(seed, offset + uint64_t(i)) * s);
      }
    });
  }
  void noisy_logits_backward_impl(const Tensor& dh, const Tensor& std, uint64_t seed,
                                  const Tensor& dclean, const Tensor& dstd, uint64_t offset) override {
    dispatch_float(dh.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (int64_t i = 0; i < dh.numel(); ++i) {
        dclean.ptr<T>()[i] = dh.ptr<T>()[i];
        if (std.defined()) dstd.ptr<T>()[i] = T(dh.ptr<T>()[i] * rng::normal(seed, offset + uint64_t(i)));
      }
    });
  }

  // ---- routing ---------------------------------------------------------------------------

  // Indices of the k largest values of v[0..n) in descending order, ties to the lower index.
  static void topk_row(const double* v, int64_t n, int64_t k, int32_t* out) {
    std::vector<int32_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return v[a] > v[b] || (v[a] == v[b] && a < b);
    });
    std::copy_n(order.begin(), k, out);
  }

  void topk_impl(const Tensor& scores, const Tensor& bias, const Tensor& idx) override {
    dispatch_float(scores.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = scores.dim(0), E = scores.dim(1), K = idx.dim(1);
      std::vector<double> row(static_cast<size_t>(E));
      for (int64_t t = 0; t < R; ++t) {
        for (int64_t e = 0; e < E; ++e)
          row[e] = double(scores.ptr<T>()[t * E + e]) + (bias.defined() ? bias.ptr<float>()[e] : 0.0);
        topk_row(row.data(), E, K, idx.ptr<int32_t>() + t * K);
      }
    });
  }

  // Assignment a = (offset + t) K + j goes to expert a mod E.
  void balanced_assign_impl(const Tensor& idx, int64_t experts, int64_t offset) override {
    const int64_t R = idx.dim(0), K = idx.dim(1);
    int32_t* out = idx.ptr<int32_t>();
    for (int64_t t = 0; t < R; ++t)
      for (int64_t j = 0; j < K; ++j) out[t * K + j] = int32_t(((offset + t) * K + j) % experts);
  }

  void gates_forward_impl(const Tensor& scores, const Tensor& idx, bool normalize, double scale,
                          const Tensor& gates) override {
    dispatch_float(scores.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = scores.dim(0), E = scores.dim(1), K = idx.dim(1);
      for (int64_t t = 0; t < R; ++t) {
        const int32_t* it = idx.ptr<int32_t>() + t * K;
        double z = 0;
        for (int64_t j = 0; j < K; ++j) z += scores.ptr<T>()[t * E + it[j]];
        if (!normalize) z = 1.0;
        for (int64_t j = 0; j < K; ++j)
          gates.ptr<T>()[t * K + j] = T(scale * scores.ptr<T>()[t * E + it[j]] / z);
      }
    });
  }

  void gates_backward_impl(const Tensor& scores, const Tensor& idx, const Tensor& dgates,
                           bool normalize, double scale, const Tensor& dscores) override {
    dispatch_float(scores.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = scores.dim(0), E = scores.dim(1), K = idx.dim(1);
      std::fill_n(dscores.ptr<T>(), dscores.numel(), T(0));
      for (int64_t t = 0; t < R; ++t) {
        const int32_t* it = idx.ptr<int32_t>() + t * K;
        const T* dg = dgates.ptr<T>() + t * K;
        T* ds = dscores.ptr<T>() + t * E;
        if (!normalize) {
          for (int64_t j = 0; j < K; ++j) ds[it[j]] = T(ds[it[j]] + scale * dg[j]);
          continue;
        }
        // g_j = s_j / z, z = sum_i s_i: dL/ds_j = (dg_j - sum_i dg_i g_i / scale) / z * scale.
        double z = 0, dot = 0;
        for (int64_t j = 0; j < K; ++j) z += scores.ptr<T>()[t * E + it[j]];
        for (int64_t j = 0; j < K; ++j) dot += double(dg[j]) * scores.ptr<T>()[t * E + it[j]];
        for (int64_t j = 0; j < K; ++j)
          ds[it[j]] = T(ds[it[j]] + scale * (dg[j] / z - dot / (z * z)));
      }
    });
  }

  void random_top2_mask_impl(const Tensor& gates, double tau, uint64_t seed,
                             const Tensor& keep, uint64_t offset) override {
    dispatch_float(gates.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (int64_t t = 0; t < gates.dim(0); ++t) {
        const double g1 = gates.ptr<T>()[2 * t], g2 = gates.ptr<T>()[2 * t + 1];
        const double g2n = g1 + g2 > 0 ? g2 / (g1 + g2) : 0.0;
        keep.ptr<int32_t>()[2 * t] = 1;
        keep.ptr<int32_t>()[2 * t + 1] = rng::uniform(seed, offset + uint64_t(t)) < std::min(1.0, g2n / tau);
      }
    });
  }

  void capacity_mask_impl(const Tensor& idx, const Tensor& gates, int64_t experts,
                          int64_t capacity, DropPolicy policy, const Tensor& keep) override {
    dispatch_float(gates.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t A = idx.numel();
      const int32_t* ex = idx.ptr<int32_t>();
      int32_t* kp = keep.ptr<int32_t>();
      if (policy == DropPolicy::Position) {
        // Served in assignment order = token order (Megatron's "position" policy).
        std::vector<int64_t> used(size_t(experts), 0);
        for (int64_t a = 0; a < A; ++a)
          if (kp[a]) kp[a] = used[ex[a]]++ < capacity;
        return;
      }
      // Probs: per expert, keep the `capacity` assignments with the largest gate.
      std::vector<std::vector<int64_t>> by_expert(static_cast<size_t>(experts));
      for (int64_t a = 0; a < A; ++a)
        if (kp[a]) by_expert[ex[a]].push_back(a);
      const T* g = gates.ptr<T>();
      for (auto& list : by_expert) {
        std::stable_sort(list.begin(), list.end(), [&](int64_t a, int64_t b) { return g[a] > g[b]; });
        for (size_t i = size_t(capacity); i < list.size(); ++i) kp[list[i]] = 0;
      }
    });
  }

  int sinkhorn_impl(const Tensor& logits, double tol, int max_iters, const Tensor& out) override {
    return dispatch_float_r<int>(logits.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = logits.dim(0), E = logits.dim(1);
      // C = exp(l - max l): the global shift only rescales d0, keeping exp() finite.
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t i = 0; i < R * E; ++i) mx = std::max(mx, double(logits.ptr<T>()[i]));
      std::vector<double> c(size_t(R * E)), d0(size_t(R), 1.0), d1(size_t(E), 1.0);
      for (int64_t i = 0; i < R * E; ++i) c[i] = std::exp(double(logits.ptr<T>()[i]) - mx);
      const double eps = 1e-8;
      int it = 0;
      for (; it < max_iters;) {
        ++it;
        for (int64_t t = 0; t < R; ++t) {
          double s = 0;
          for (int64_t e = 0; e < E; ++e) s += c[t * E + e] * d1[e];
          d0[t] = (1.0 / R) / (s + eps);
        }
        double err = 0;
        for (int64_t e = 0; e < E; ++e) {
          double s = 0;
          for (int64_t t = 0; t < R; ++t) s += d0[t] * c[t * E + e];
          const double nd1 = (1.0 / E) / (s + eps);
          err += std::abs(nd1 - d1[e]);
          d1[e] = nd1;
        }
        if (err / E < tol) break;
      }
      for (int64_t t = 0; t < R; ++t)
        for (int64_t e = 0; e < E; ++e) out.ptr<T>()[t * E + e] = T(d0[t] * c[t * E + e] * d1[e]);
      return it;
    });
  }

  void expert_choice_impl(const Tensor& scores, const Tensor& chosen) override {
    dispatch_float(scores.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = scores.dim(0), E = scores.dim(1), C = chosen.dim(1);
      std::vector<double> col(static_cast<size_t>(R));
      for (int64_t e = 0; e < E; ++e) {
        for (int64_t t = 0; t < R; ++t) col[t] = scores.ptr<T>()[t * E + e];
        topk_row(col.data(), R, C, chosen.ptr<int32_t>() + e * C);
      }
    });
  }

  DispatchPlan dispatch_plan_impl(const Tensor& idx, const Tensor& keep, bool expert_choice,
                                  int64_t experts, int64_t pad) override {
    const int64_t n0 = idx.dim(0), n1 = idx.dim(1);
    const int32_t *ix = idx.ptr<int32_t>(), *kp = keep.ptr<int32_t>();
    auto expert_of = [&](int64_t a) { return expert_choice ? int32_t(a / n1) : ix[a]; };
    auto token_of = [&](int64_t a) { return expert_choice ? ix[a] : int32_t(a / n1); };
    std::vector<int64_t> count(size_t(experts), 0);
    for (int64_t a = 0; a < n0 * n1; ++a)
      if (kp[a]) {
        const int32_t e = expert_of(a);
        MOELAB_CHECK(e >= 0 && e < experts, "dispatch_plan: expert index ", e, " out of range");
        ++count[e];
      }
    DispatchPlan p;
    p.offsets.assign(size_t(experts + 1), 0);
    for (int64_t e = 0; e < experts; ++e) {
      MOELAB_CHECK(pad == 0 || count[e] <= pad, "dispatch_plan: expert ", e, " has ", count[e],
                   " kept assignments, more than pad capacity ", pad);
      p.offsets[e + 1] = p.offsets[e] + (pad ? pad : count[e]);
    }
    p.row_token = empty(Shape{p.rows()}, DType::I32);
    p.row_assign = empty(Shape{p.rows()}, DType::I32);
    std::fill_n(p.row_token.ptr<int32_t>(), p.rows(), -1);
    std::fill_n(p.row_assign.ptr<int32_t>(), p.rows(), -1);
    std::vector<int64_t> next(p.offsets.begin(), p.offsets.end() - 1);
    for (int64_t a = 0; a < n0 * n1; ++a)
      if (kp[a]) {
        const int64_t r = next[expert_of(a)]++;
        p.row_token.ptr<int32_t>()[r] = token_of(a);
        p.row_assign.ptr<int32_t>()[r] = int32_t(a);
      }
    return p;
  }

  void permute_forward_impl(const Tensor& x, const DispatchPlan& plan, const Tensor& xp) override {
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t D = x.dim(1);
      for (int64_t r = 0; r < plan.rows(); ++r) {
        const int32_t t = plan.row_token.ptr<int32_t>()[r];
        T* dst = xp.ptr<T>() + r * D;
        if (t < 0) std::fill_n(dst, D, T(0));
        else std::copy_n(x.ptr<T>() + t * D, D, dst);
      }
    });
  }

  void permute_backward_impl(const Tensor& dxp, const DispatchPlan& plan,
                             const Tensor& dx) override {
    dispatch_float(dx.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t D = dx.dim(1);
      std::fill_n(dx.ptr<T>(), dx.numel(), T(0));
      for (int64_t r = 0; r < plan.rows(); ++r) {
        const int32_t t = plan.row_token.ptr<int32_t>()[r];
        if (t < 0) continue;
        for (int64_t d = 0; d < D; ++d) dx.ptr<T>()[t * D + d] += dxp.ptr<T>()[r * D + d];
      }
    });
  }

  void unpermute_forward_impl(const Tensor& yp, const DispatchPlan& plan, const Tensor& gates,
                              const Tensor& y) override {
    dispatch_float(yp.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t D = yp.dim(1);
      std::fill_n(y.ptr<T>(), y.numel(), T(0));
      for (int64_t r = 0; r < plan.rows(); ++r) {
        const int32_t t = plan.row_token.ptr<int32_t>()[r], a = plan.row_assign.ptr<int32_t>()[r];
        if (t < 0) continue;
        MOELAB_CHECK(t < y.dim(0) && a < gates.numel(), "unpermute_forward: plan row ", r,
                     " points outside y or gates");
        const double g = gates.ptr<T>()[a];
        for (int64_t d = 0; d < D; ++d) y.ptr<T>()[t * D + d] += T(g * yp.ptr<T>()[r * D + d]);
      }
    });
  }

  void unpermute_backward_impl(const Tensor& dy, const Tensor& yp, const DispatchPlan& plan,
                               const Tensor& gates, const Tensor& dyp,
                               const Tensor& dgates) override {
    dispatch_float(dy.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t D = dy.dim(1);
      std::fill_n(dgates.ptr<T>(), dgates.numel(), T(0));
      for (int64_t r = 0; r < plan.rows(); ++r) {
        const int32_t t = plan.row_token.ptr<int32_t>()[r], a = plan.row_assign.ptr<int32_t>()[r];
        T* dst = dyp.ptr<T>() + r * D;
        if (t < 0) {
          std::fill_n(dst, D, T(0));
          continue;
        }
        const double g = gates.ptr<T>()[a];
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = T(g * dy.ptr<T>()[t * D + d]);
          dot += double(dy.ptr<T>()[t * D + d]) * yp.ptr<T>()[r * D + d];
        }
        dgates.ptr<T>()[a] = T(dot);
      }
    });
  }

  // ---- losses ----------------------------------------------------------------------------

  // Per-sequence f_i = c_i / (S K) for the aux loss; returns [nseq][E].
  static std::vector<std::vector<double>> aux_fractions(const Tensor& idx, int64_t T_, int64_t E,
                                                        int64_t S) {
    const int64_t K = idx.dim(1), nseq = T_ / S;
    std::vector<std::vector<double>> f(size_t(nseq), std::vector<double>(size_t(E), 0.0));
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t j = 0; j < K; ++j) f[t / S][idx.ptr<int32_t>()[t * K + j]] += 1.0 / double(S * K);
    return f;
  }

  double aux_loss_forward_impl(const Tensor& probs, const Tensor& idx, int64_t seq_len) override {
    return dispatch_float_r<double>(probs.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t T_ = probs.dim(0), E = probs.dim(1), S = seq_len ? seq_len : T_;
      const auto f = aux_fractions(idx, T_, E, S);
      double total = 0;
      for (size_t s = 0; s < f.size(); ++s)
        for (int64_t e = 0; e < E; ++e) {
          double P = 0;
          for (int64_t t = int64_t(s) * S; t < int64_t(s + 1) * S; ++t) P += probs.ptr<T>()[t * E + e];
          total += double(E) * f[s][e] * P / double(S);
        }
      return total / double(f.size());
    });
  }

  void aux_loss_backward_impl(const Tensor& probs, const Tensor& idx, int64_t seq_len,
                              double scale, const Tensor& dprobs) override {
    dispatch_float(probs.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t T_ = probs.dim(0), E = probs.dim(1), S = seq_len ? seq_len : T_;
      const auto f = aux_fractions(idx, T_, E, S);
      const double nseq = double(f.size());
      for (int64_t t = 0; t < T_; ++t)
        for (int64_t e = 0; e < E; ++e)
          dprobs.ptr<T>()[t * E + e] += T(scale * double(E) * f[t / S][e] / double(S) / nseq);
    });
  }

  double z_loss_forward_impl(const Tensor& logits) override {
    return dispatch_float_r<double>(logits.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = logits.dim(0), E = logits.dim(1);
      double acc = 0;
      for (int64_t t = 0; t < R; ++t) {
        const double lse = logsumexp_row(logits.ptr<T>() + t * E, E);
        acc += lse * lse;
      }
      return acc / double(R);
    });
  }

  void z_loss_backward_impl(const Tensor& logits, double scale, const Tensor& dlogits) override {
    dispatch_float(logits.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = logits.dim(0), E = logits.dim(1);
      for (int64_t t = 0; t < R; ++t) {
        const T* l = logits.ptr<T>() + t * E;
        const double lse = logsumexp_row(l, E);
        for (int64_t e = 0; e < E; ++e)  // d lse^2 / dl = 2 lse softmax(l)
          dlogits.ptr<T>()[t * E + e] += T(scale * 2.0 * lse * std::exp(double(l[e]) - lse) / double(R));
      }
    });
  }

  template <class T> static std::vector<double> importance(const Tensor& gates, const Tensor& idx,
                                                           int64_t experts) {
    std::vector<double> imp(size_t(experts), 0.0);
    for (int64_t a = 0; a < gates.numel(); ++a) imp[idx.ptr<int32_t>()[a]] += gates.ptr<T>()[a];
    return imp;
  }

  double cv2_loss_forward_impl(const Tensor& gates, const Tensor& idx, int64_t experts) override {
    return dispatch_float_r<double>(gates.dtype(), [&](auto tag) {
      using T = decltype(tag);
      return cv2(importance<T>(gates, idx, experts), nullptr);
    });
  }

  void cv2_loss_backward_impl(const Tensor& gates, const Tensor& idx, int64_t experts,
                              double scale, const Tensor& dgates) override {
    dispatch_float(gates.dtype(), [&](auto tag) {
      using T = decltype(tag);
      std::vector<double> grad;
      cv2(importance<T>(gates, idx, experts), &grad);
      for (int64_t a = 0; a < gates.numel(); ++a)
        dgates.ptr<T>()[a] += T(scale * grad[idx.ptr<int32_t>()[a]]);
    });
  }

  // For token t and expert e: the index j* != e holding the K-th largest h[t, :] among the
  // others (Shazeer's kth_excluding). Rows sorted once per token.
  template <class T> struct LoadTerms {
    std::vector<double> z;    // [T*E] (clean - thr) / std
    std::vector<int32_t> jx;  // [T*E] j*
    std::vector<double> load; // [E]
  };
  template <class T>
  static LoadTerms<T> load_terms(const Tensor& clean, const Tensor& h, const Tensor& std,
                                 double sigma, int64_t k) {
    const int64_t R = clean.dim(0), E = clean.dim(1);
    LoadTerms<T> lt;
    lt.z.resize(size_t(R * E));
    lt.jx.resize(size_t(R * E));
    lt.load.assign(size_t(E), 0.0);
    std::vector<double> row(static_cast<size_t>(E));
    std::vector<int32_t> order(static_cast<size_t>(E));
    for (int64_t t = 0; t < R; ++t) {
      for (int64_t e = 0; e < E; ++e) row[e] = h.ptr<T>()[t * E + e];
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
        return row[a] > row[b] || (row[a] == row[b] && a < b);
      });
      for (int64_t e = 0; e < E; ++e) {
        int64_t seen = 0;
        int32_t js = -1;
        for (int32_t j : order) {
          if (j == e) continue;
          if (++seen == k) { js = j; break; }
        }
        const double s = std.defined() ? double(std.ptr<T>()[t * E + e]) : sigma;
        const double z = (double(clean.ptr<T>()[t * E + e]) - row[js]) / s;
        lt.z[t * E + e] = z;
        lt.jx[t * E + e] = js;
        lt.load[e] += normal_cdf(z);
      }
    }
    return lt;
  }

  double load_loss_forward_impl(const Tensor& clean, const Tensor& h, const Tensor& std,
                                double sigma, int64_t k) override {
    return dispatch_float_r<double>(clean.dtype(), [&](auto tag) {
      using T = decltype(tag);
      return cv2(load_terms<T>(clean, h, std, sigma, k).load, nullptr);
    });
  }

  void load_loss_backward_impl(const Tensor& clean, const Tensor& h, const Tensor& std,
                               double sigma, int64_t k, double scale, const Tensor& dclean,
                               const Tensor& dstd, const Tensor& dh) override {
    dispatch_float(clean.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = clean.dim(0), E = clean.dim(1);
      auto lt = load_terms<T>(clean, h, std, sigma, k);
      std::vector<double> g;
      cv2(lt.load, &g);
      for (int64_t t = 0; t < R; ++t)
        for (int64_t e = 0; e < E; ++e) {
          const int64_t i = t * E + e;
          const double s = std.defined() ? double(std.ptr<T>()[i]) : sigma;
          const double dz = scale * g[e] * normal_pdf(lt.z[i]);  // dL/dz
          dclean.ptr<T>()[i] += T(dz / s);
          dh.ptr<T>()[t * E + lt.jx[i]] -= T(dz / s);
          if (std.defined()) dstd.ptr<T>()[i] -= T(dz * lt.z[i] / s);
        }
    });
  }

  RouterStats router_stats_impl(const Tensor& logits, const Tensor& probs, const Tensor& idx,
                                const Tensor& keep, bool expert_choice, int64_t E) override {
    return dispatch_float_r<RouterStats>(logits.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = logits.dim(0), n1 = idx.dim(1);
      RouterStats st;
      st.routed.assign(size_t(E), 0);
      st.kept.assign(size_t(E), 0);
      st.mean_prob.assign(size_t(E), 0.0);
      std::vector<char> has_expert(size_t(R), 0);
      for (int64_t a = 0; a < idx.numel(); ++a) {
        const int32_t e = expert_choice ? int32_t(a / n1) : idx.ptr<int32_t>()[a];
        const int32_t t = expert_choice ? idx.ptr<int32_t>()[a] : int32_t(a / n1);
        ++st.routed[e];
        if (keep.ptr<int32_t>()[a]) {
          ++st.kept[e];
          has_expert[t] = 1;
        }
      }
      for (char c : has_expert) st.tokens_unrouted += !c;
      double sq = 0;
      for (int64_t t = 0; t < R; ++t) {
        double ent = 0, top = 0;
        for (int64_t e = 0; e < E; ++e) {
          const double p = probs.ptr<T>()[t * E + e], l = logits.ptr<T>()[t * E + e];
          st.mean_prob[e] += p / double(R);
          if (p > 0) ent -= p * std::log(p);
          top = std::max(top, p);
          sq += l * l;
          st.logit_max = std::max(st.logit_max, std::abs(l));
        }
        st.entropy += ent / double(R);
        st.top1_prob += top / double(R);
      }
      st.logit_rms = std::sqrt(sq / double(R * E));
      return st;
    });
  }

  // ---- transformer ops -------------------------------------------------------------------

  void scale_impl(const Tensor& x, double alpha) override {
    elementwise(x, x, [&](double v, int64_t) { return v * alpha; });
  }

  double sum_squares_impl(const Tensor& x) override {
    return dispatch_float_r<double>(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      double s = 0;
      for (int64_t i = 0; i < x.numel(); ++i) s += double(x.ptr<T>()[i]) * x.ptr<T>()[i];
      return s;
    });
  }

  void embedding_forward_impl(const Tensor& tokens, const Tensor& table, const Tensor& out) override {
    dispatch_float(table.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t V = table.dim(0), D = table.dim(1);
      for (int64_t t = 0; t < tokens.dim(0); ++t) {
        const int32_t id = tokens.ptr<int32_t>()[t];
        MOELAB_CHECK(id >= 0 && id < V, "embedding: token ", id, " outside the vocabulary [0, ", V, ")");
        std::copy_n(table.ptr<T>() + id * D, D, out.ptr<T>() + t * D);
      }
    });
  }

  void embedding_backward_impl(const Tensor& tokens, const Tensor& dout, const Tensor& dtable) override {
    dispatch_float(dtable.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t D = dtable.dim(1);
      for (int64_t t = 0; t < tokens.dim(0); ++t) {
        const int32_t id = tokens.ptr<int32_t>()[t];
        for (int64_t d = 0; d < D; ++d) dtable.ptr<T>()[id * D + d] += dout.ptr<T>()[t * D + d];
      }
    });
  }

  void rmsnorm_forward_impl(const Tensor& x, const Tensor& w, double eps, const Tensor& y,
                            const Tensor& rstd) override {
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = x.dim(0), D = x.dim(1);
      for (int64_t t = 0; t < R; ++t) {
        const T* xr = x.ptr<T>() + t * D;
        double ss = 0;
        for (int64_t d = 0; d < D; ++d) ss += double(xr[d]) * xr[d];
        const double r = 1.0 / std::sqrt(ss / double(D) + eps);
        rstd.ptr<T>()[t] = T(r);
        for (int64_t d = 0; d < D; ++d) y.ptr<T>()[t * D + d] = T(xr[d] * r * w.ptr<T>()[d]);
      }
    });
  }

  void rmsnorm_backward_impl(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy,
                             const Tensor& dx, const Tensor& dw) override {
    // y_d = x_d r w_d, r = (mean x^2 + eps)^(-1/2):  dx_d = r (w_d dy_d - x_d r^2 mean_j(w_j dy_j x_j)).
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = x.dim(0), D = x.dim(1);
      for (int64_t t = 0; t < R; ++t) {
        const T *xr = x.ptr<T>() + t * D, *dyr = dy.ptr<T>() + t * D;
        const double r = rstd.ptr<T>()[t];
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) {
          dot += double(w.ptr<T>()[d]) * dyr[d] * xr[d];
          dw.ptr<T>()[d] += T(double(dyr[d]) * xr[d] * r);
        }
        for (int64_t d = 0; d < D; ++d)
          dx.ptr<T>()[t * D + d] = T(r * (double(w.ptr<T>()[d]) * dyr[d] - xr[d] * r * r * dot / double(D)));
      }
    });
  }

  void rope_impl(const Tensor& x, int64_t heads, int64_t seq_len, double theta, bool inverse,
                 const Tensor& y, const Tensor& positions) override {
    const int32_t* given = positions.defined() ? positions.ptr<int32_t>() : nullptr;
    dispatch_float(x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = x.dim(0), W = x.dim(1), dh = W / heads, half = dh / 2;
      for (int64_t t = 0; t < R; ++t) {
        MOELAB_CHECK(!given || given[t] >= 0, "rope: position ", given ? given[t] : 0, " of token ", t,
                     " is negative");
        const double pos = given ? double(given[t]) : double(t % seq_len);
        for (int64_t i = 0; i < half; ++i) {
          const double ang = pos * std::pow(theta, -2.0 * double(i) / double(dh));
          const double c = std::cos(ang), sn = inverse ? -std::sin(ang) : std::sin(ang);
          for (int64_t h = 0; h < heads; ++h) {
            const int64_t o = t * W + h * dh + i;
            const double a = x.ptr<T>()[o], b = x.ptr<T>()[o + half];
            y.ptr<T>()[o] = T(a * c - b * sn);
            y.ptr<T>()[o + half] = T(a * sn + b * c);
          }
        }
      }
    });
  }

  template <class T>
  using StridedMap = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
                                Eigen::OuterStride<>>;

  // The [S, Dh] slice of head `head` of sequence b in a [T, heads*Dh] tensor.
  template <class T>
  static StridedMap<T> head_view(const Tensor& t, int64_t b, int64_t head, int64_t S, int64_t dh) {
    const int64_t W = t.dim(1);
    return StridedMap<T>(t.ptr<T>() + b * S * W + head * dh, S, dh, Eigen::OuterStride<>(W));
  }

  // The [S, Dh] slice of one head as an f64 matrix (the reference computes attention in f64).
  template <class T>
  static Eigen::MatrixXd head_f64(const Tensor& t, int64_t b, int64_t head, int64_t S, int64_t dh) {
    return head_view<T>(t, b, head, S, dh).template cast<double>();
  }

  // Whether query i may attend to key j (both in sequence b): causal, and with segments the
  // same segment (packed records).
  static bool visible(const int32_t* seg, int64_t b, int64_t S, int64_t i, int64_t j) {
    return j <= i && (!seg || seg[b * S + j] == seg[b * S + i]);
  }

  // Forward: scores, causal (and segment) masked softmax by rows, P V, all in f64;
  // lse[i] = m + log sum exp(s - m) over the visible keys.
  void attention_forward_impl(const Tensor& q, const Tensor& k, const Tensor& v, int64_t H,
                              int64_t Hkv, int64_t S, const Tensor& out, const Tensor& lse,
                              const Tensor& segments) override {
    const int32_t* seg = segments.defined() ? segments.ptr<int32_t>() : nullptr;
    dispatch_float(q.dtype(), [&](auto tag) {
      using T = decltype(tag);
      using L = std::conditional_t<std::is_same_v<T, double>, double, float>;  // lse dtype
      const int64_t B = q.dim(0) / S, dh = q.dim(1) / H;
      const double scale = 1.0 / std::sqrt(double(dh));
      MOELAB_PARALLEL_FOR_2(B * H > 1 && B * H * S * S * dh >= kParallelWork)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {  // one (sequence, head) pair per item
          const int64_t g = h / (H / Hkv);  // the kv head this query head reads
          Eigen::MatrixXd P(S, S);
          const Eigen::MatrixXd Q = head_f64<T>(q, b, h, S, dh), K = head_f64<T>(k, b, g, S, dh);
          const Eigen::MatrixXd V = head_f64<T>(v, b, g, S, dh);
          P.noalias() = scale * Q * K.transpose();
          L* lrow = lse.ptr<L>() + (b * H + h) * S;
          for (int64_t i = 0; i < S; ++i) {  // softmax over the visible keys (j = i always is)
            double m = -std::numeric_limits<double>::infinity(), z = 0;
            for (int64_t j = 0; j <= i; ++j)
              if (visible(seg, b, S, i, j)) m = std::max(m, P(i, j));
            for (int64_t j = 0; j <= i; ++j)
              if (visible(seg, b, S, i, j)) z += std::exp(P(i, j) - m);
            const double l = m + std::log(z);
            lrow[i] = L(l);
            for (int64_t j = 0; j < S; ++j) P(i, j) = visible(seg, b, S, i, j) ? std::exp(P(i, j) - l) : 0.0;
          }
          head_view<T>(out, b, h, S, dh) = (P * V).template cast<T>();
        }
    });
  }

  // Backward from the saved lse, as FlashAttention-2 computes it (in f64): P = exp(scale Q K^T -
  // lse) on j <= i, dV += P^T dO, dP = dO V^T, D_i = sum_d dO_id O_id (from the given out),
  // dS = P (dP - D), dQ = scale dS K, dK += scale dS^T Q; a kv head sums over its group.
  void attention_backward_impl(const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& out, const Tensor& lse, const Tensor& dout,
                               int64_t H, int64_t Hkv, int64_t S, const Tensor& dq,
                               const Tensor& dk, const Tensor& dv, const Tensor& segments) override {
    const int32_t* seg = segments.defined() ? segments.ptr<int32_t>() : nullptr;
    dispatch_float(q.dtype(), [&](auto tag) {
      using T = decltype(tag);
      using L = std::conditional_t<std::is_same_v<T, double>, double, float>;
      const int64_t B = q.dim(0) / S, dh = q.dim(1) / H, G = H / Hkv;
      const double scale = 1.0 / std::sqrt(double(dh));
      MOELAB_PARALLEL_FOR_2(B * Hkv > 1 && B * H * S * S * dh >= kParallelWork)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t g = 0; g < Hkv; ++g) {  // one (sequence, kv head) pair per item
          Eigen::MatrixXd P(S, S), dP(S, S);
          const Eigen::MatrixXd K = head_f64<T>(k, b, g, S, dh), V = head_f64<T>(v, b, g, S, dh);
          Eigen::MatrixXd dK = Eigen::MatrixXd::Zero(S, dh), dV = Eigen::MatrixXd::Zero(S, dh);
          for (int64_t h = g * G; h < (g + 1) * G; ++h) {
            const Eigen::MatrixXd Q = head_f64<T>(q, b, h, S, dh), O = head_f64<T>(out, b, h, S, dh);
            const Eigen::MatrixXd dO = head_f64<T>(dout, b, h, S, dh);
            const L* lrow = lse.ptr<L>() + (b * H + h) * S;
            P.noalias() = scale * Q * K.transpose();
            for (int64_t i = 0; i < S; ++i)
              for (int64_t j = 0; j < S; ++j)
                P(i, j) = visible(seg, b, S, i, j) ? std::exp(P(i, j) - double(lrow[i])) : 0.0;
            dV.noalias() += P.transpose() * dO;  // O = P V
            dP.noalias() = dO * V.transpose();
            for (int64_t i = 0; i < S; ++i) {    // softmax backward, D_i = dO_i . O_i
              const double D = dO.row(i).dot(O.row(i));
              for (int64_t j = 0; j < S; ++j) dP(i, j) = P(i, j) * (dP(i, j) - D);
            }
            head_view<T>(dq, b, h, S, dh) = (scale * dP * K).template cast<T>();  // scores = scale Q K^T
            dK.noalias() += scale * dP.transpose() * Q;
          }
          head_view<T>(dk, b, g, S, dh) = dK.template cast<T>();
          head_view<T>(dv, b, g, S, dh) = dV.template cast<T>();
        }
    });
  }

  double cross_entropy_forward_impl(const Tensor& logits, const Tensor& targets) override {
    return dispatch_float_r<double>(logits.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = logits.dim(0), V = logits.dim(1);
      double total = 0;
      int64_t n = 0;  // rows bearing loss
      for (int64_t t = 0; t < R; ++t) {
        const int32_t y = targets.ptr<int32_t>()[t];
        if (y == kIgnoreTarget) continue;
        MOELAB_CHECK(y >= 0 && y < V, "cross_entropy: target ", y, " outside [0, ", V, ")");
        const T* l = logits.ptr<T>() + t * V;
        total += logsumexp_row(l, V) - double(l[y]);
        ++n;
      }
      return n ? total / double(n) : 0.0;
    });
  }

  void cross_entropy_backward_impl(const Tensor& logits, const Tensor& targets, double scale,
                                   const Tensor& dlogits) override {
    dispatch_float(logits.dtype(), [&](auto tag) {
      using T = decltype(tag);
      const int64_t R = logits.dim(0), V = logits.dim(1);
      const int32_t* y = targets.ptr<int32_t>();
      int64_t n = 0;  // rows bearing loss
      for (int64_t t = 0; t < R; ++t) {
        MOELAB_CHECK(y[t] == kIgnoreTarget || (y[t] >= 0 && y[t] < V), "cross_entropy: target ", y[t],
                     " outside [0, ", V, ")");
        n += y[t] != kIgnoreTarget;
      }
      for (int64_t t = 0; t < R; ++t) {
        T* d = dlogits.ptr<T>() + t * V;
        if (y[t] == kIgnoreTarget) {
          std::fill(d, d + V, T(0));
          continue;
        }
        const T* l = logits.ptr<T>() + t * V;
        const double lse = logsumexp_row(l, V), c = scale / double(n);
        for (int64_t j = 0; j < V; ++j) d[j] = T(c * std::exp(double(l[j]) - lse));
        d[y[t]] -= T(c);
      }
    });
  }

  void adamw_impl(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                  double lr, double b1, double b2, double eps, double wd, int64_t step,
                  const Tensor& cast_to) override {
    dispatch_float(param.dtype(), [&](auto tag) {
      using T = decltype(tag);
      using S = std::conditional_t<std::is_same_v<T, double>, double, float>;  // state type
      const double c1 = 1.0 - std::pow(b1, double(step)), c2 = 1.0 - std::pow(b2, double(step));
      T* p = param.ptr<T>();
      S *mm = m.ptr<S>(), *vv = v.ptr<S>();
      for (int64_t i = 0; i < param.numel(); ++i) {
        const double g = load(grad, i);
        mm[i] = S(b1 * mm[i] + (1.0 - b1) * g);
        vv[i] = S(b2 * vv[i] + (1.0 - b2) * g * g);
        const double upd = (double(mm[i]) / c1) / (std::sqrt(double(vv[i]) / c2) + eps) + wd * double(p[i]);
        p[i] = T(double(p[i]) - lr * upd);
      }
    });
    if (cast_to.defined()) cast_impl(param, cast_to);
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() {
  pin_eigen_blocking();
  return std::make_unique<CpuBackend>();
}

}  // namespace moelab
