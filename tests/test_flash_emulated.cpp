// moelab tests: the CUDA flash attention kernels (backends/cuda/flash_attention_kernels.h), run
// on the CPU through the warp/block emulation of tests/flash_emu.h, against the CPU reference
// backend in f64. Every kernel of the CUDA backend's attention runs here: the tensor-core forward,
// dQ and dK/dV kernels (bf16, head widths 64 and 128), the generic fp32 kernels (f32 and bf16
// storage, any head width) and the D = rowsum(dO * O) pre-pass, with the launchers' grids.
// The thresholds are the GPU op test's (tests/test_backend_ops.cpp): NMSE 5e-5 for bf16, 1e-10
// for f32. Outputs start as NaN between guard regions: an element a kernel forgets to write, or
// one written outside its output, fails.
#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "flash_emu.h"
// The kernels: after the emulated platform above.
#include "backends/cuda/flash_attention_kernels.h"
#include "test_util.h"

using namespace moelab;
using namespace moelab::test;
namespace fl = moelab::flash;

namespace {

constexpr int64_t kGuard = 64;

// A host buffer of element type E with guard regions on both sides.
template <class E> struct Buf {
  std::vector<E> all;
  int64_t n = 0;
  explicit Buf(int64_t count, float init) : all(size_t(count + 2 * kGuard)), n(count) {
    std::memset(all.data(), 0xA5, all.size() * sizeof(E));
    for (int64_t i = 0; i < n; ++i) fl::fa_st(data(), i, init);
  }
  E* data() { return all.data() + kGuard; }
  bool guards_ok() const {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(all.data());
    const size_t gb = size_t(kGuard) * sizeof(E), total = all.size() * sizeof(E);
    for (size_t i = 0; i < gb; ++i)
      if (p[i] != 0xA5 || p[total - 1 - i] != 0xA5) return false;
    return true;
  }
  std::vector<double> values() {
    std::vector<double> v(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) v[size_t(i)] = fl::fa_ld(data(), i);
    return v;
  }
};
// Random values exactly representable in E.
template <class E> std::vector<double> draw(int64_t n, uint64_t seed) {
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const float x = float(rng::normal(seed, uint64_t(i)));
    if constexpr (std::is_same_v<E, float>) v[size_t(i)] = x;
    else v[size_t(i)] = fl::fa_bf16_to_f(fl::fa_f_to_bf16(x));
  }
  return v;
}
template <class E> Buf<E> to_buf(const std::vector<double>& v) {
  Buf<E> b(int64_t(v.size()), 0.0f);
  for (size_t i = 0; i < v.size(); ++i) fl::fa_st(b.data(), int64_t(i), float(v[i]));
  return b;
}

double nmse(const std::vector<double>& a, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? num / den : num;
}

struct Shape5 {
  int64_t B, S, H, Hkv, Dh;
};

// Launches one kernel body over a grid (x fastest), one emulated block at a time.
void grid(int64_t gx, int64_t gy, int threads, size_t smem, bool reverse,
          const std::function<void(int tid, char* smem, int bx, int by)>& body) {
  for (int64_t by = 0; by < gy; ++by)
    for (int64_t bx = 0; bx < gx; ++bx)
      fl::emu::run_block(threads, smem, [&](int tid, char* sm) { body(tid, sm, int(bx), int(by)); },
                         reverse);
}

// Runs forward and backward through the emulated kernels (tensor-core path when tc) and checks
// them against the CPU reference.
// Packed records: per row, segments of the given lengths (cycled) and then padding (-1).
std::vector<int32_t> packed_segments(int64_t B, int64_t S, const std::vector<int64_t>& lens) {
  std::vector<int32_t> seg;
  size_t li = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t t = 0;
    for (int32_t id = 0; t < S; ++id) {
      const int64_t n = lens[li++ % lens.size()];
      if (n <= 0 || t + n > S) break;  // the rest of the row is padding
      for (int64_t i = 0; i < n; ++i, ++t) seg.push_back(id);
    }
    for (; t < S; ++t) seg.push_back(-1);
  }
  return seg;
}

// Every output's bytes (guards included), to compare two runs bit for bit.
struct Bits {
  std::vector<unsigned char> out, lse, dq, dk, dv;
};
template <class E> std::vector<unsigned char> bytes(const Buf<E>& b) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(b.all.data());
  return std::vector<unsigned char>(p, p + b.all.size() * sizeof(E));
}

// tc: the tensor-core kernels that flash_attention.cu launches for the head width (64 or 128);
// else the generic ones.
template <class E>
Bits check_case(const Shape5& c, bool tc, bool reverse, uint64_t seed, const std::vector<int32_t>& seg = {}) {
  const int64_t B = c.B, S = c.S, H = c.H, Hkv = c.Hkv, Dh = c.Dh, T = B * S;
  INFO("B=" << B << " S=" << S << " H=" << H << " Hkv=" << Hkv << " Dh=" << Dh
            << (tc ? " tensor cores" : " generic") << (std::is_same_v<E, float> ? " f32" : " bf16")
            << (reverse ? " (reverse schedule)" : "") << (seg.empty() ? "" : " segments"));
  REQUIRE((seg.empty() || int64_t(seg.size()) == T));
  const double thr = std::is_same_v<E, float> ? 1e-10 : 5e-5;
  const auto qv = draw<E>(T * H * Dh, seed), kv = draw<E>(T * Hkv * Dh, seed + 1);
  const auto vv = draw<E>(T * Hkv * Dh, seed + 2), dov = draw<E>(T * H * Dh, seed + 3);
  Buf<E> q = to_buf<E>(qv), k = to_buf<E>(kv), v = to_buf<E>(vv), dout = to_buf<E>(dov);
  Buf<E> out(T * H * Dh, NAN), dq(T * H * Dh, NAN), dk(T * Hkv * Dh, NAN), dv(T * Hkv * Dh, NAN);
  Buf<float> lse(B * H * S, NAN), delta(B * H * S, NAN);

  fl::Params p;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.o = out.data();
  p.dout = dout.data();
  p.lse = lse.data();
  p.delta = delta.data();
  p.dq = dq.data();
  p.dk = dk.data();
  p.dv = dv.data();
  p.seg = seg.empty() ? nullptr : seg.data();
  p.B = int(B);
  p.S = int(S);
  p.H = int(H);
  p.Hkv = int(Hkv);
  p.Dh = int(Dh);
  p.scale = float(1.0 / std::sqrt(double(Dh)));
  p.scale_log2 = p.scale * fl::kLog2e;

  if constexpr (std::is_same_v<E, uint16_t>) {
    if (tc) {  // as flash_attention.cu launches them
      REQUIRE((Dh == 64 || Dh == 128));
      if (Dh == 64) {
        using F = fl::FwdTc<64>;
        grid(B * H, (S + F::BR - 1) / F::BR, F::kThreads, F::kSmem, reverse,
             [&](int tid, char* sm, int bx, int by) { fl::fwd_tc<64>(p, sm, tid, bx, by); });
      } else {
        using F = fl::Fwd2Tc<128>;
        grid(B * H, (S + F::BR - 1) / F::BR, F::kThreads, F::kSmem, reverse,
             [&](int tid, char* sm, int bx, int by) { fl::fwd2_tc<128>(p, sm, tid, bx, by); });
      }
      grid((T + fl::kDeltaWarps - 1) / fl::kDeltaWarps, 1, 32 * fl::kDeltaWarps, 0, reverse,
           [&](int tid, char*, int bx, int) { fl::delta_rows_vec(p, tid, bx); });
      auto backward = [&](auto dh) {
        constexpr int DH = decltype(dh)::value;
        using Q = fl::Dq2Tc<DH>;
        grid(B * H, (S + Q::BR - 1) / Q::BR, Q::kThreads, Q::kSmem, reverse,
             [&](int tid, char* sm, int bx, int by) { fl::dq2_tc<DH>(p, sm, tid, bx, by); });
        if constexpr (DH == 64) {
          using K = fl::Dkv2Tc<DH>;
          grid(B * Hkv, (S + K::BC - 1) / K::BC, K::kThreads, K::kSmem, reverse,
               [&](int tid, char* sm, int bx, int by) { fl::dkv2_tc<DH>(p, sm, tid, bx, by); });
        } else {
          using K = fl::Dkv2sTc<DH>;
          grid(B * Hkv, (S + K::BC - 1) / K::BC, K::kThreads, K::kSmem, reverse,
               [&](int tid, char* sm, int bx, int by) { fl::dkv2s_tc<DH>(p, sm, tid, bx, by); });
        }
      };
      if (Dh == 64) backward(std::integral_constant<int, 64>{});
      else backward(std::integral_constant<int, 128>{});
    }
  }
  if (!tc) {
    using G = fl::Gen;
    const int dh = int(Dh);
    grid(B * H, (S + G::QR - 1) / G::QR, G::kThreads, G::fwd_smem(dh), reverse,
         [&](int tid, char* sm, int bx, int by) { fl::fwd_gen<E>(p, sm, tid, bx, by); });
    grid((T * H + fl::kDeltaWarps - 1) / fl::kDeltaWarps, 1, 32 * fl::kDeltaWarps, 0, reverse,
         [&](int tid, char*, int bx, int) { fl::delta_rows<E>(p, tid, bx); });
    grid(B * H, (S + G::QR - 1) / G::QR, G::kThreads, G::dq_smem(dh), reverse,
         [&](int tid, char* sm, int bx, int by) { fl::dq_gen<E>(p, sm, tid, bx, by); });
    grid(B * Hkv, (S + G::KR - 1) / G::KR, G::kThreads, G::dkv_smem(dh), reverse,
         [&](int tid, char* sm, int bx, int by) { fl::dkv_gen<E>(p, sm, tid, bx, by); });
  }

  // The reference: forward from the same inputs; backward from the kernels' own out and lse
  // (what the model passes), so that each half is measured on its own.
  Backend& cb = cpu();
  const Tensor qc = host_tensor(qv, Shape{T, H * Dh}, DType::F64), kc = host_tensor(kv, Shape{T, Hkv * Dh}, DType::F64);
  const Tensor vc = host_tensor(vv, Shape{T, Hkv * Dh}, DType::F64), doc = host_tensor(dov, Shape{T, H * Dh}, DType::F64);
  Tensor oc = cb.empty(Shape{T, H * Dh}, DType::F64), lc = cb.empty(Shape{B * H, S}, DType::F64);
  Tensor segc;
  if (!seg.empty()) segc = host_tensor(std::vector<double>(seg.begin(), seg.end()), Shape{T}, DType::I32);
  cb.attention_forward(qc, kc, vc, H, Hkv, S, oc, lc, segc);
  CHECK(out.guards_ok());
  CHECK(lse.guards_ok());
  CHECK(nmse(out.values(), host_values(oc)) <= thr);
  CHECK(nmse(lse.values(), host_values(lc)) <= thr);

  const Tensor og = host_tensor(out.values(), Shape{T, H * Dh}, DType::F64);
  const Tensor lg = host_tensor(lse.values(), Shape{B * H, S}, DType::F64);
  Tensor dqc = cb.empty(Shape{T, H * Dh}, DType::F64), dkc = cb.empty(Shape{T, Hkv * Dh}, DType::F64);
  Tensor dvc = cb.empty(Shape{T, Hkv * Dh}, DType::F64);
  cb.attention_backward(qc, kc, vc, og, lg, doc, H, Hkv, S, dqc, dkc, dvc, segc);
  // D from the same out, in f64.
  std::vector<double> dref(static_cast<size_t>(B * H * S));
  const auto ov = out.values();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      double s = 0;
      for (int64_t d = 0; d < Dh; ++d) s += dov[size_t(t * H * Dh + h * Dh + d)] * ov[size_t(t * H * Dh + h * Dh + d)];
      dref[size_t(((t / S) * H + h) * S + t % S)] = s;
    }
  CHECK(delta.guards_ok());
  CHECK(nmse(delta.values(), dref) <= 1e-10);
  CHECK(dq.guards_ok());
  CHECK(dk.guards_ok());
  CHECK(dv.guards_ok());
  const double e_dq = nmse(dq.values(), host_values(dqc)), e_dk = nmse(dk.values(), host_values(dkc));
  const double e_dv = nmse(dv.values(), host_values(dvc));
  INFO("NMSE dq " << e_dq << " dk " << e_dk << " dv " << e_dv);
  // Every query seeing only itself (S = 1, or records of one token): P = 1 and dS = dP - D = 0,
  // so dq and dk are 0 up to rounding and an NMSE against the reference's ~1e-17 says nothing.
  bool singletons = S == 1;
  if (!seg.empty()) {
    singletons = true;
    for (int64_t t = 0; t < T; ++t)
      if (t % S > 0 && seg[size_t(t)] == seg[size_t(t - 1)]) singletons = false;
  }
  if (singletons) {
    double worst = 0;
    for (double x : dq.values()) worst = std::max(worst, std::abs(x));
    for (double x : dk.values()) worst = std::max(worst, std::abs(x));
    INFO("max |dq|, |dk| " << worst);
    CHECK(worst <= 1e-4);
  } else {
    CHECK(e_dq <= thr);
    CHECK(e_dk <= thr);
  }
  CHECK(e_dv <= thr);
  return Bits{bytes(out), bytes(lse), bytes(dq), bytes(dk), bytes(dv)};
}

// The same case twice, in the two schedule orders: every output bit-identical.
template <class E>
void check_repeat(const Shape5& c, bool tc, uint64_t seed, const std::vector<int32_t>& seg = {}) {
  const Bits a = check_case<E>(c, tc, false, seed, seg);
  const Bits b = check_case<E>(c, tc, true, seed, seg);
  CHECK(a.out == b.out);
  CHECK(a.lse == b.lse);
  CHECK(a.dq == b.dq);
  CHECK(a.dk == b.dk);
  CHECK(a.dv == b.dv);
}

}  // namespace

// The tensor-core kernels: S not a multiple of any tile (1, 7, 17, 65, 100, 130, 150, 200, 257),
// groups of 1, 2 and 4 heads, one and two sequences.
TEST_CASE("flash attention (emulated): tensor-core kernels, bf16, head width 64", "[flash][attention]") {
  for (const Shape5& c : {Shape5{1, 1, 2, 1, 64}, Shape5{2, 65, 4, 2, 64}, Shape5{1, 200, 2, 1, 64},
                          Shape5{1, 64, 2, 2, 64}, Shape5{2, 17, 4, 1, 64}, Shape5{1, 100, 2, 2, 64},
                          Shape5{1, 257, 1, 1, 64}})
    check_case<uint16_t>(c, true, false, 101 + uint64_t(c.S));
}

TEST_CASE("flash attention (emulated): tensor-core kernels, bf16, head width 128", "[flash][attention]") {
  for (const Shape5& c : {Shape5{1, 7, 2, 2, 128}, Shape5{1, 150, 4, 1, 128}, Shape5{1, 1, 4, 1, 128},
                          Shape5{2, 17, 2, 2, 128}, Shape5{1, 100, 4, 1, 128}, Shape5{1, 130, 2, 1, 128},
                          Shape5{1, 257, 1, 1, 128}})
    check_case<uint16_t>(c, true, false, 202 + uint64_t(c.S));
}

TEST_CASE("flash attention (emulated): the other schedule order gives the same result", "[flash][attention]") {
  check_case<uint16_t>(Shape5{1, 130, 2, 1, 64}, true, true, 303);
  check_case<float>(Shape5{1, 40, 2, 1, 24}, false, true, 304);
  check_repeat<uint16_t>(Shape5{1, 130, 4, 2, 64}, true, 313, packed_segments(1, 130, {50, 7, 60}));
  check_repeat<uint16_t>(Shape5{1, 100, 2, 1, 128}, true, 314);
}

TEST_CASE("flash attention (emulated): generic kernels, f32 and bf16, any head width", "[flash][attention]") {
  for (const Shape5& c : {Shape5{2, 37, 4, 2, 16}, Shape5{1, 70, 2, 1, 40}, Shape5{1, 1, 1, 1, 8},
                          Shape5{1, 33, 2, 2, 256}})
    check_case<float>(c, false, false, 404 + uint64_t(c.Dh));
  for (const Shape5& c : {Shape5{2, 45, 4, 1, 64}, Shape5{1, 20, 2, 2, 32}})
    check_case<uint16_t>(c, false, false, 505 + uint64_t(c.Dh));
}

// Packed records (segments): keys of other records are masked in every tile, including the tiles
// below the diagonal that plain causal attention never masks; records cross tile boundaries,
// some are one token long, rows end in padding, and a whole key tile can belong to other records
// (the generic forward's running max stays -inf there).
TEST_CASE("flash attention (emulated): packed records (segment mask), every kernel", "[flash][attention][sft]") {
  const std::vector<int64_t> lens = {70, 1, 33, 64, 2, 5};
  check_case<uint16_t>(Shape5{2, 200, 2, 1, 64}, true, false, 701, packed_segments(2, 200, lens));
  check_case<uint16_t>(Shape5{1, 150, 2, 2, 128}, true, false, 702, packed_segments(1, 150, {40, 90, 3}));
  check_case<float>(Shape5{2, 100, 4, 2, 16}, false, false, 703, packed_segments(2, 100, lens));
  check_case<uint16_t>(Shape5{1, 70, 2, 1, 40}, false, false, 704, packed_segments(1, 70, {1, 36, 20}));
  // Every token its own record: each query sees only itself.
  check_case<float>(Shape5{1, 40, 2, 1, 8}, false, false, 705, packed_segments(1, 40, {1}));
  check_case<uint16_t>(Shape5{1, 130, 2, 1, 64}, true, true, 706, packed_segments(1, 130, {1}));
  check_case<uint16_t>(Shape5{1, 130, 2, 1, 128}, true, false, 716, packed_segments(1, 130, {1}));
}

// Larger shapes (several query and key tiles per block row, groups of 4 heads); hidden because
// the emulation takes about a minute: `moelab_tests "[flash][slow]"`.
TEST_CASE("flash attention (emulated): larger shapes", "[.][flash][slow]") {
  check_case<uint16_t>(Shape5{3, 256, 8, 2, 128}, true, false, 606);
  check_case<uint16_t>(Shape5{2, 300, 4, 4, 64}, true, false, 607);
  check_case<uint16_t>(Shape5{1, 200, 8, 2, 128}, false, false, 608);
  check_case<float>(Shape5{2, 256, 4, 1, 64}, false, false, 609);
  check_case<uint16_t>(Shape5{1, 385, 4, 1, 64}, true, false, 618, packed_segments(1, 385, {100, 3, 200}));
  check_repeat<uint16_t>(Shape5{1, 300, 2, 1, 128}, true, 619, packed_segments(1, 300, {129, 1, 64}));
}
