// moelab tests: shared helpers (random tensors, dot products, central finite differences).
#pragma once
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "catch_compat.h"
#include "core/backend.h"
#include "core/rng.h"

namespace moelab::test {

inline Backend& cpu() {
  static std::unique_ptr<Backend> b = make_cpu_backend();
  return *b;
}

// N(0, scale^2) values, deterministic from seed, as a CPU tensor of dtype dt.
inline Tensor randn(Shape s, uint64_t seed, double scale = 1.0, DType dt = DType::F64) {
  std::vector<double> v(size_t(s.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = scale * rng::normal(seed, i);
  return host_tensor(v, s, dt);
}

inline Tensor full(Shape s, double value, DType dt = DType::F64) {
  return host_tensor(std::vector<double>(size_t(s.numel()), value), s, dt);
}

inline Tensor ints(const std::vector<int>& v, Shape s) {
  return host_tensor(std::vector<double>(v.begin(), v.end()), s, DType::I32);
}

inline double dot(const Tensor& a, const Tensor& b) {
  auto va = host_values(a), vb = host_values(b);
  double s = 0;
  for (size_t i = 0; i < va.size(); ++i) s += va[i] * vb[i];
  return s;
}

// The message of the moelab::Error that f throws, or "" (and a failed check) if none.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  FAIL_CHECK("expected a moelab::Error");
  return "";
}

inline Tensor clone(const Tensor& t) { return host_tensor(host_values(t), t.shape(), t.dtype()); }

// Central finite differences of the scalar objective f() with respect to every entry of x
// (an f64 CPU tensor, perturbed in place), compared with the analytic gradient `grad`:
// |num - ana| <= atol + rtol * max(|num|, |ana|). h = 1e-5 balances the O(h^2) truncation
// error against the O(eps / h) rounding error in f64 (both ~1e-10 for O(1) objectives).
inline void check_gradient(const std::string& what, const std::function<double()>& f,
                           const Tensor& x, const Tensor& grad, double rtol = 1e-5,
                           double atol = 1e-7, double h = 1e-5) {
  REQUIRE(x.dtype() == DType::F64);
  REQUIRE(x.shape() == grad.shape());
  auto g = host_values(grad);
  double* p = x.ptr<double>();
  int bad = 0;
  double worst = 0;
  std::string report;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double keep = p[i];
    p[i] = keep + h;
    const double fp = f();
    p[i] = keep - h;
    const double fm = f();
    p[i] = keep;
    const double num = (fp - fm) / (2 * h);
    const double err = std::abs(num - g[i]);
    const double tol = atol + rtol * std::max(std::abs(num), std::abs(g[i]));
    if (err > tol) {
      if (bad++ < 3)
        report += what + "[" + std::to_string(i) + "]: numeric " + std::to_string(num) +
                  " analytic " + std::to_string(g[i]) + "\n";
    }
    worst = std::max(worst, err / tol);
  }
  INFO(what << ": " << bad << " of " << x.numel() << " entries off; worst err/tol " << worst
            << "\n" << report);
  CHECK(bad == 0);
}

}  // namespace moelab::test
