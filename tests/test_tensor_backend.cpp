// moelab tests: Tensor views, the Backend's memory calls, and its checked op entries (clear
// errors for bad shapes, dtypes and unsupported ops).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "backends/registry.h"
#include "test_util.h"

using namespace moelab;
using namespace moelab::test;

TEST_CASE("tensor: shape, views and reshape share storage", "[tensor]") {
  Tensor t = cpu().zeros(Shape{4, 3}, DType::F64);
  REQUIRE(t.numel() == 12);
  REQUIRE(t.nbytes() == 96);
  Tensor v = t.view_rows(1, 3);
  REQUIRE(v.shape() == Shape{2, 3});
  v.ptr<double>()[0] = 5.0;
  REQUIRE(t.ptr<double>()[3] == 5.0);
  REQUIRE(t.reshape(Shape{12}).ptr<double>()[3] == 5.0);
  REQUIRE_THROWS_AS(t.reshape(Shape{5}), Error);
  REQUIRE_THROWS_AS(t.view_rows(2, 5), Error);
  REQUIRE_THROWS_AS(t.ptr<float>(), Error);  // wrong dtype access is an error, not UB
  REQUIRE(t.describe() == "f64[4, 3]@cpu");
}

TEST_CASE("tensor: bf16 rounds to nearest even and keeps NaN", "[tensor]") {
  REQUIRE(bf16::from_float(1.0f).to_float() == 1.0f);
  // 1 + 2^-8 is exactly halfway between two bf16 values (1 and 1 + 2^-7): ties go to even (1).
  REQUIRE(bf16::from_float(1.0f + 1.0f / 256).to_float() == 1.0f);
  REQUIRE(bf16::from_float(1.0f + 3.0f / 256).to_float() == 1.0f + 4.0f / 256);
  REQUIRE(std::isnan(bf16::from_float(std::nanf("")).to_float()));
}

TEST_CASE("backend: copy, cast and host helpers round-trip", "[backend]") {
  Tensor h = randn(Shape{3, 5}, 7);
  Tensor d = cpu().from_host(h);
  Tensor f = cpu().empty(Shape{3, 5}, DType::F32);
  cpu().cast(d, f);
  auto hv = host_values(h), fv = host_values(f);
  for (size_t i = 0; i < hv.size(); ++i) REQUIRE(fv[i] == Approx(hv[i]).epsilon(1e-6));
  auto back = cpu().to_vector<double>(d);
  REQUIRE(back == hv);
}

TEST_CASE("backend: bad shapes and dtypes give errors that name the op", "[backend][errors]") {
  Backend& b = cpu();
  Tensor a = b.zeros(Shape{2, 3}, DType::F64), w = b.zeros(Shape{4, 5}, DType::F64);
  Tensor c = b.zeros(Shape{2, 5}, DType::F64);
  try {
    b.gemm(false, false, 1.0, a, w, 0.0, c);
    FAIL("gemm with mismatched inner dimensions did not throw");
  } catch (const Error& e) {
    REQUIRE(std::string(e.what()).find("gemm: inner dimensions differ") != std::string::npos);
  }
  Tensor s = b.zeros(Shape{4, 3}, DType::F64);
  Tensor idx = b.zeros(Shape{4, 4}, DType::I32);  // k = 4 > E = 3
  try {
    b.topk(s, Tensor(), idx);
    FAIL("topk with k > experts did not throw");
  } catch (const Error& e) {
    REQUIRE(std::string(e.what()).find("k = 4 must be in [1, experts = 3]") != std::string::npos);
  }
  Tensor f32 = b.zeros(Shape{2, 3}, DType::F32);
  REQUIRE_THROWS_WITH(b.axpy(1.0, a, f32), has_substr("axpy: y is f32, x is f64"));
  Tensor keep = b.zeros(Shape{4, 1}, DType::I32), g = b.zeros(Shape{4, 1}, DType::F64);
  REQUIRE_THROWS_WITH(b.capacity_mask(keep, g, 3, -1, DropPolicy::Position, keep),
                      has_substr("capacity -1 must be >= 0"));
  // The router's composites name themselves and the argument.
  Tensor x = b.zeros(Shape{4, 3}, DType::F64), wr = b.zeros(Shape{3, 2}, DType::F64);
  REQUIRE_THROWS_WITH(b.router_logits(x, b.zeros(Shape{4, 2}, DType::F64), b.zeros(Shape{4, 2}, DType::F64)),
                      has_substr("router_logits: x is f64[4, 3]@cpu, w f64[4, 2]@cpu: inner dimensions differ"));
  REQUIRE_THROWS_WITH(b.router_logits(x, wr, b.zeros(Shape{4, 2}, DType::F32)),
                      has_substr("router_logits: out must be f64, got f32"));
  REQUIRE_THROWS_WITH(b.router_input_grads(x, b.zeros(Shape{4, 2}, DType::F64), wr, b.zeros(Shape{3, 2}, DType::F64),
                                           b.zeros(Shape{4, 4}, DType::F64)),
                      has_substr("router_input_grads: dx has shape [4, 4], expected [4, 3]"));
  Tensor sc = b.zeros(Shape{4, 3}, DType::F64), ix = b.zeros(Shape{4, 2}, DType::I32);
  Tensor dgr = b.zeros(Shape{4, 2}, DType::F64);
  REQUIRE_THROWS_WITH(b.router_logits_backward(sc, sc, ix, dgr, true, 1.0, 3, 0.01, 0.0, sc),
                      has_substr("router_logits_backward: seq_len 3 must divide the token count 4"));
  REQUIRE_THROWS_WITH(b.router_logits_backward(sc, sc, ix, b.zeros(Shape{4, 1}, DType::F64), true, 1.0, 0, 0.0, 0.0, sc),
                      has_substr("router_logits_backward: dgates has shape [4, 1], expected [4, 2]"));
}

TEST_CASE("backend: an unsupported dtype reports NotSupported, never crashes", "[backend][errors]") {
  Backend& b = cpu();
  REQUIRE_FALSE(b.supports(Op::Gemm, DType::BF16));
  Tensor a = b.zeros(Shape{2, 2}, DType::BF16);
  REQUIRE_THROWS_AS(b.gemm(false, false, 1.0, a, a, 0.0, a), NotSupported);
  REQUIRE_THROWS_WITH(b.softmax_forward(a, a), has_substr("softmax_forward (bf16) is not supported"));
}

TEST_CASE("backend: registry knows cpu, refuses unknown names", "[backend]") {
  REQUIRE(backend_available("cpu"));
  REQUIRE(make_backend("cpu")->name() == "cpu");
  REQUIRE_THROWS_WITH(make_backend("tpu"), has_substr("unknown backend 'tpu'"));
}

TEST_CASE("rng: counter-based draws are reproducible and well distributed", "[rng]") {
  double mean = 0, var = 0, umin = 1, umax = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double z = rng::normal(42, uint64_t(i));
    mean += z / n;
    var += z * z / n;
    const double u = rng::uniform(42, uint64_t(i));
    umin = std::min(umin, u);
    umax = std::max(umax, u);
  }
  // Standard errors: mean 1/sqrt(n) = 0.0022, variance sqrt(2/n) = 0.0032; allow ~4.5 sigma.
  REQUIRE(std::abs(mean) < 0.01);
  REQUIRE(std::abs(var - 1.0) < 0.015);
  REQUIRE(umin > 0.0);
  REQUIRE(umax < 1.0);
  REQUIRE(rng::normal(42, 17) == rng::normal(42, 17));
  REQUIRE(rng::derive(1, 2) != rng::derive(2, 1));
}

// normal() computes log and cos itself (core/rng.h: the C library's differ between the host and
// the device in the last bit). They must be accurate, and their bits must never change with the
// build (ISA level, compiler, inlining): the draws are the model's initial weights.
TEST_CASE("rng: the exact log and cos are accurate to a few ulp, and the draws' bits are fixed", "[rng]") {
  double worst_log = 0, worst_cos = 0;
  auto check = [&](double u) {
    const long double want_log = std::log(static_cast<long double>(u));
    worst_log = std::max(worst_log, double(std::fabs((rng::exact::log_pos(u) - want_log) / want_log)));
    const long double two_pi = 6.283185307179586476925286766559L;
    const long double want_cos = std::cos(two_pi * static_cast<long double>(u));
    worst_cos = std::max(worst_cos, double(std::fabs(rng::exact::cos_2pi(u) - want_cos)));
  };
  for (int i = 0; i < 300000; ++i) check(rng::uniform(5, uint64_t(i)));
  // The edges of every branch: the smallest and largest uniforms, the mantissa split at sqrt(2),
  // and the reduction's folds at 1/8, 1/4, 1/2 (and their neighbours).
  for (double u : {0x1p-54, 1.0 - 0x1p-53, 0.5, 0.25, 0.125, 0.375, 0.625, 0.75, 0.875, 1e-300,
                   0.7071067811865475, 0.7071067811865476, 1.4142135623730951 / 2, 0.999})
    for (double v : {std::nextafter(u, 0.0), u, std::nextafter(u, 1.0)})
      if (v > 0 && v < 1) check(v);
  CAPTURE(worst_log, worst_cos);
  CHECK(worst_log < 4e-16);  // relative; 1 ulp is 1.1e-16 .. 2.2e-16
  CHECK(worst_cos < 4e-16);  // absolute, |cos| <= 1
  // Bits of a few draws, recorded when this implementation was written: a build that contracts
  // a*b+c into an fma, reorders the series or swaps in the C library fails here.
  const uint64_t want[] = {0x3fda8ac4b546f502ULL, 0x3ffc6940ed0aa15bULL, 0xbfeb39549983678aULL,
                           0xbfe1fa68e21c7bc2ULL, 0x3ffa46af1c3230d9ULL, 0xbfe68a7d5e302239ULL};
  for (int i = 0; i < 6; ++i) {
    const double z = rng::normal(42, uint64_t(i) * 1000003);
    uint64_t b;
    std::memcpy(&b, &z, 8);
    CAPTURE(i, z);
    CHECK(b == want[i]);
  }
}
