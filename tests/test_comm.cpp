// moelab tests: the simulated-rank communicator (core/comm_sim.h), every collective on worlds of
// 1, 2, 3, 4 and 8 ranks against hand-computed values; rank-order reductions (values where the
// order shows: 1e16 + 1 - 1e16 + 1); bit-identical results across ranks and repeated runs;
// all_to_all_v with zero-size pairs; EP x DP sub-groups; argument mismatches; abort propagation
// and timeouts. Catch2 assertions are not thread-safe, so ranks only record what they see and the
// main thread checks it after run_ranks has joined them.
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "catch_compat.h"
#include "core/comm_sim.h"
#ifdef _OPENMP
#include <omp.h>
#endif

using namespace moelab;

namespace {

const int kWorlds[] = {1, 2, 3, 4, 8};
const DType kDtypes[] = {DType::F64, DType::F32, DType::BF16, DType::I32};

// Runs f on n simulated ranks and returns what each rank returned.
template <class R>
std::vector<R> on_ranks(int n, const std::function<R(int, Communicator&)>& f, double timeout_s = 20) {
  std::vector<R> out(static_cast<size_t>(n));
  run_ranks(n, [&](int r, Communicator& c) { out[size_t(r)] = f(r, c); }, timeout_s);
  return out;
}

std::vector<uint8_t> bytes_of(const Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.data());
  return std::vector<uint8_t>(p, p + t.nbytes());
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The message of the Error that f throws, or "" if none.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("comm sim: all_reduce sum and max, every dtype, worlds of 1..8 ranks", "[comm]") {
  for (int n : kWorlds)
    for (DType dt : kDtypes) {
      CAPTURE(n, to_string(dt));
      // Rank r holds x_r[i] = 10 (r + 1) + i (integers, exact in bf16 up to 256 for n <= 8, i < 6).
      const int64_t m = 6;
      auto res = on_ranks<std::vector<std::vector<double>>>(n, [&](int r, Communicator& c) {
        std::vector<double> x(static_cast<size_t>(m));
        for (int64_t i = 0; i < m; ++i) x[size_t(i)] = 10.0 * (r + 1) + double(i);
        Tensor s = host_tensor(x, Shape{2, 3}, dt), mx = host_tensor(x, Shape{2, 3}, dt);
        c.all_reduce(s, ReduceOp::Sum);
        c.all_reduce(mx, ReduceOp::Max);
        return std::vector<std::vector<double>>{host_values(s), host_values(mx)};
      });
      for (int r = 0; r < n; ++r)
        for (int64_t i = 0; i < m; ++i) {
          CHECK(res[size_t(r)][0][size_t(i)] == 10.0 * n * (n + 1) / 2 + double(n * i));
          CHECK(res[size_t(r)][1][size_t(i)] == 10.0 * n + double(i));
        }
    }
}

TEST_CASE("comm sim: reductions add in rank order, bit-identical across ranks and runs", "[comm]") {
  // Rank order: ((x0 + x1) + x2) + x3. With x = {big, 1, -big, 1} only that order gives 1 in f64
  // and f32 (big + 1 rounds back to big); bf16 accumulates in float and rounds once, so 256, 1,
  // -256, 1 gives exactly 2 (bf16 accumulation would round 257 to 256 and give 1).
  struct Case { DType dt; double big, expect; };
  for (const Case& k : {Case{DType::F64, 1e16, 1.0}, Case{DType::F32, 1e8, 1.0}, Case{DType::BF16, 256, 2.0}}) {
    CAPTURE(to_string(k.dt));
    auto res = on_ranks<double>(4, [&](int r, Communicator& c) {
      const double v[] = {k.big, 1.0, -k.big, 1.0};
      Tensor t = host_tensor({v[r]}, Shape{1}, k.dt);
      c.all_reduce(t, ReduceOp::Sum);
      return host_values(t)[0];
    });
    for (double v : res) CHECK(v == k.expect);
  }
  // Host reductions too.
  auto host = on_ranks<double>(4, [](int r, Communicator& c) {
    const double v[] = {1e16, 1.0, -1e16, 1.0};
    std::vector<double> x{v[r], double(r)};
    c.all_reduce_host(x, ReduceOp::Sum);
    return x[0] + 1000.0 * x[1];
  });
  for (double v : host) CHECK(v == 1.0 + 1000.0 * 6);

  // Random values of mixed magnitude (the sum depends on the order), 8 ranks, 5 runs: every
  // rank of every run holds the same bytes.
  for (DType dt : {DType::F64, DType::F32, DType::BF16}) {
    CAPTURE(to_string(dt));
    std::vector<uint8_t> first;
    for (int run = 0; run < 5; ++run) {
      auto res = on_ranks<std::vector<uint8_t>>(8, [&](int r, Communicator& c) {
        std::vector<double> x(1000);
        for (size_t i = 0; i < x.size(); ++i)
          x[i] = std::ldexp(double((i * 7919 + size_t(r) * 104729) % 1000) - 499.5, int((i + size_t(r)) % 40) - 20);
        Tensor t = host_tensor(x, Shape{1000}, dt);
        c.all_reduce(t, ReduceOp::Sum);
        return bytes_of(t);
      });
      if (run == 0) first.swap(res[0]);  // rank 0 of run 0: the reference (swap: GCC 12 warns falsely on a copy)
      else CHECK(res[0] == first);
      for (size_t k = 1; k < res.size(); ++k) CHECK(res[k] == first);
    }
  }
}

TEST_CASE("comm sim: all_gather and broadcast, worlds of 1..8 ranks", "[comm]") {
  for (int n : kWorlds)
    for (DType dt : kDtypes) {
      CAPTURE(n, to_string(dt));
      // all_gather: rank r contributes 2 rows of 3: r * 10 + j; out [2n, 3] in rank order.
      // broadcast: from every root in turn, t = root's values (root * 7 + i).
      auto res = on_ranks<std::vector<std::vector<double>>>(n, [&](int r, Communicator& c) {
        std::vector<double> x(6);
        for (size_t j = 0; j < 6; ++j) x[j] = r * 10.0 + double(j);
        Tensor in = host_tensor(x, Shape{2, 3}, dt);
        Tensor out = host_tensor(std::vector<double>(size_t(6 * n), -1.0), Shape{2 * n, 3}, dt);
        c.all_gather(in, out);
        std::vector<std::vector<double>> got{host_values(out)};
        for (int root = 0; root < n; ++root) {
          Tensor b = host_tensor({r * 7.0, r * 7.0 + 1, r * 7.0 + 2}, Shape{3}, dt);
          c.broadcast(b, root);
          got.push_back(host_values(b));
        }
        return got;
      });
      for (int r = 0; r < n; ++r) {
        for (int s = 0; s < n; ++s)
          for (int j = 0; j < 6; ++j) CHECK(res[size_t(r)][0][size_t(s * 6 + j)] == s * 10.0 + j);
        for (int root = 0; root < n; ++root)
          for (int i = 0; i < 3; ++i) CHECK(res[size_t(r)][size_t(1 + root)][size_t(i)] == root * 7.0 + i);
      }
    }
}

TEST_CASE("comm sim: all_to_all_v with zero-size pairs, counts from exchange_counts", "[comm]") {
  for (int n : kWorlds)
    for (DType dt : {DType::F32, DType::I32, DType::BF16, DType::F64}) {
      CAPTURE(n, to_string(dt));
      // Rank s sends c(s, d) = (s + 2 d) % 3 rows to rank d (zero for a third of the pairs, the
      // self pair included for some ranks); row j of that message holds (s, d, j) encoded.
      auto cnt = [](int s, int d) { return int64_t((s + 2 * d) % 3); };
      auto code = [](int s, int d, int64_t j) { return double(s * 16 + d * 2 + j); };  // +0.5 < 128: exact in bf16
      struct Got { std::vector<int64_t> recv_rows; std::vector<double> recv; };
      auto res = on_ranks<Got>(n, [&](int s, Communicator& c) {
        std::vector<int64_t> send_rows(static_cast<size_t>(n));
        std::vector<double> x;
        for (int d = 0; d < n; ++d) {
          send_rows[size_t(d)] = cnt(s, d);
          for (int64_t j = 0; j < cnt(s, d); ++j)
            for (int w = 0; w < 2; ++w) x.push_back(code(s, d, j) + 0.5 * w);
        }
        const int64_t rows = int64_t(x.size() / 2);
        x.resize(x.size() + 4, -7.0);  // 2 spare rows beyond the sent ones (allowed)
        Tensor send = host_tensor(x, Shape{rows + 2, 2}, dt);
        Got g;
        g.recv_rows = c.exchange_counts(send_rows);
        int64_t total = 0;
        for (int64_t v : g.recv_rows) total += v;
        Tensor recv = host_tensor(std::vector<double>(size_t(2 * total + 2), -9.0), Shape{total + 1, 2}, dt);
        c.all_to_all_v(send, send_rows, recv, g.recv_rows);
        g.recv = host_values(recv);
        return g;
      });
      for (int d = 0; d < n; ++d) {
        const Got& g = res[size_t(d)];
        REQUIRE(g.recv_rows.size() == size_t(n));
        size_t k = 0;
        for (int s = 0; s < n; ++s) {
          CHECK(g.recv_rows[size_t(s)] == cnt(s, d));
          for (int64_t j = 0; j < cnt(s, d); ++j) {
            CHECK(g.recv[k++] == code(s, d, j));
            CHECK(g.recv[k++] == code(s, d, j) + (dt == DType::I32 ? 0.0 : 0.5));
          }
        }
        CHECK(g.recv[k] == -9.0);  // the spare row is untouched
        CHECK(g.recv[k + 1] == -9.0);
      }
    }
}

TEST_CASE("comm sim: host exchanges (exchange_counts, all_gather_host, all_reduce_host max)", "[comm]") {
  for (int n : kWorlds) {
    CAPTURE(n);
    struct Got { std::vector<int64_t> counts, gathered; std::vector<double> mx; };
    auto res = on_ranks<Got>(n, [&](int r, Communicator& c) {
      std::vector<int64_t> send;
      for (int d = 0; d < n; ++d) send.push_back(100 * r + d);
      Got g;
      g.counts = c.exchange_counts(send);
      g.gathered = c.all_gather_host({int64_t(r), int64_t(-r)});
      g.mx = {double(r), -double(r), r == n - 1 ? 5.5 : 0.0};
      c.all_reduce_host(g.mx, ReduceOp::Max);
      return g;
    });
    for (int r = 0; r < n; ++r) {
      for (int s = 0; s < n; ++s) {
        CHECK(res[size_t(r)].counts[size_t(s)] == 100 * s + r);  // the transpose
        CHECK(res[size_t(r)].gathered[size_t(2 * s)] == s);
        CHECK(res[size_t(r)].gathered[size_t(2 * s + 1)] == -s);
      }
      CHECK(res[size_t(r)].mx == std::vector<double>{double(n - 1), 0.0, 5.5});
    }
  }
}

TEST_CASE("comm sim: split into EP and DP groups (world 8 = ep 4 x dp 2), collectives inside", "[comm]") {
  struct Got {
    int ep_rank = -1, ep_size = -1, dp_rank = -1, dp_size = -1, rev_rank = -1;
    std::vector<int64_t> ep_members, dp_members, rev_members;
    double ep_sum = 0, dp_sum = 0;
    bool none_is_null = false;
    std::vector<double> a2a;
  };
  auto res = on_ranks<Got>(8, [](int r, Communicator& world) {
    Got g;
    auto ep = world.split(r / 4, r);  // {0..3}, {4..7}
    auto dp = world.split(r % 4, r);  // {0,4}, {1,5}, {2,6}, {3,7}
    auto rev = world.split(0, -r);    // everyone, in reverse order
    auto none = world.split(r == 3 ? -1 : 0, r);  // rank 3 takes part but joins nothing
    g.none_is_null = (none == nullptr);
    g.ep_rank = ep->rank();
    g.ep_size = ep->size();
    g.dp_rank = dp->rank();
    g.dp_size = dp->size();
    g.rev_rank = rev->rank();
    g.ep_members = ep->all_gather_host({int64_t(r)});
    g.dp_members = dp->all_gather_host({int64_t(r)});
    g.rev_members = rev->all_gather_host({int64_t(r)});
    Tensor t = host_tensor({double(r)}, Shape{1}, DType::F64);
    ep->all_reduce(t, ReduceOp::Sum);
    g.ep_sum = host_values(t)[0];
    Tensor u = host_tensor({double(r)}, Shape{1}, DType::F64);
    dp->all_reduce(u, ReduceOp::Sum);
    g.dp_sum = host_values(u)[0];
    // An all-to-all inside the EP group: one row (the world rank) to every peer.
    Tensor send = host_tensor(std::vector<double>(4, double(r)), Shape{4, 1}, DType::F32);
    Tensor recv = host_tensor(std::vector<double>(4, -1.0), Shape{4, 1}, DType::F32);
    ep->all_to_all_v(send, {1, 1, 1, 1}, recv, {1, 1, 1, 1});
    g.a2a = host_values(recv);
    if (none) none->barrier();
    return g;
  });
  for (int r = 0; r < 8; ++r) {
    CAPTURE(r);
    const Got& g = res[size_t(r)];
    const int e0 = r / 4 * 4;
    CHECK(g.ep_size == 4);
    CHECK(g.ep_rank == r % 4);
    CHECK(g.dp_size == 2);
    CHECK(g.dp_rank == r / 4);
    CHECK(g.rev_rank == 7 - r);
    CHECK(g.ep_members == std::vector<int64_t>{e0, e0 + 1, e0 + 2, e0 + 3});
    CHECK(g.dp_members == std::vector<int64_t>{r % 4, r % 4 + 4});
    CHECK(g.rev_members == std::vector<int64_t>{7, 6, 5, 4, 3, 2, 1, 0});
    CHECK(g.ep_sum == 4.0 * e0 + 6);
    CHECK(g.dp_sum == 2.0 * (r % 4) + 4);
    CHECK(g.none_is_null == (r == 3));
    CHECK(g.a2a == std::vector<double>{double(e0), double(e0 + 1), double(e0 + 2), double(e0 + 3)});
  }
}

TEST_CASE("comm sim: a single rank is its own world", "[comm]") {
  auto w = make_simulated_world(1);
  Communicator& c = *w[0];
  Tensor t = host_tensor({1.5, -2}, Shape{2}, DType::F32);
  c.all_reduce(t, ReduceOp::Sum);
  CHECK(host_values(t) == std::vector<double>{1.5, -2});
  Tensor out = host_tensor({0, 0}, Shape{2}, DType::F32);
  c.all_gather(t, out);
  CHECK(host_values(out) == std::vector<double>{1.5, -2});
  c.broadcast(t, 0);
  c.barrier();
  CHECK(c.exchange_counts({3}) == std::vector<int64_t>{3});
  Tensor recv = host_tensor({0, 0}, Shape{2}, DType::F32);
  c.all_to_all_v(t, {2}, recv, {2});
  CHECK(host_values(recv) == std::vector<double>{1.5, -2});
  auto s = c.split(0, 0);
  CHECK(s->size() == 1);
  CHECK(c.kind() == "sim");
}

TEST_CASE("comm sim: mismatched arguments throw the same error on every rank, the world lives on", "[comm]") {
  auto w = make_simulated_world(3, 10);
  std::vector<std::string> err(3), err2(3), err3(3);
  std::vector<double> after(3);
  std::vector<std::thread> th;
  for (int r = 0; r < 3; ++r)
    th.emplace_back([&, r] {
      Communicator& c = *w[size_t(r)];
      // Rank 2 passes 3 elements where the others pass 2.
      err[size_t(r)] = error_of([&] {
        Tensor t = host_tensor(std::vector<double>(r == 2 ? 3 : 2, 1.0), Shape{r == 2 ? 3 : 2}, DType::F32);
        c.all_reduce(t, ReduceOp::Sum);
      });
      // recv_rows that do not match what the peers send.
      err2[size_t(r)] = error_of([&] {
        Tensor s = host_tensor({1, 2, 3}, Shape{3, 1}, DType::F32), d = host_tensor({0, 0, 0, 0}, Shape{4, 1}, DType::F32);
        c.all_to_all_v(s, {1, 1, 1}, d, {1, 1, r == 1 ? 2 : 1});
      });
      // Collectives out of order: rank 0 calls barrier, the others all_reduce.
      err3[size_t(r)] = error_of([&] {
        Tensor t = host_tensor({1.0}, Shape{1}, DType::F64);
        if (r == 0) c.barrier();
        else c.all_reduce(t, ReduceOp::Sum);
      });
      std::vector<double> v{double(r)};
      c.all_reduce_host(v, ReduceOp::Sum);
      after[size_t(r)] = v[0];
    });
  for (auto& t : th) t.join();
  for (int r = 0; r < 3; ++r) {
    CAPTURE(r);
    CHECK_THAT(err[size_t(r)], has_substr("arguments differ between rank 0 and rank 2: 3 elements vs 2"));
    CHECK_THAT(err2[size_t(r)], has_substr("rank 1 expects 2 rows from rank 2, which sends it 1"));
    CHECK_THAT(err3[size_t(r)], has_substr("rank 1 called all_reduce while rank 0 called barrier"));
    CHECK(after[size_t(r)] == 3.0);
  }
  // A local argument error is reported to every rank too.
  std::vector<std::string> err4(2);
  auto w2 = make_simulated_world(2, 10);
  std::thread t1([&] {
    err4[0] = error_of([&] { w2[0]->exchange_counts({1, 2, 3}); });
  });
  err4[1] = error_of([&] { w2[1]->exchange_counts({1, 2}); });
  t1.join();
  CHECK_THAT(err4[0], has_substr("rank 0: exchange_counts: 3 counts for 2 ranks"));
  CHECK_THAT(err4[1], has_substr("rank 0: exchange_counts: 3 counts for 2 ranks"));
}

TEST_CASE("comm sim: a rank that throws stops the others with an error naming it", "[comm]") {
  for (int n : {3, 4, 8}) {
    CAPTURE(n);
    std::vector<std::string> seen(static_cast<size_t>(n));
    const auto t0 = std::chrono::steady_clock::now();
    const std::string err = error_of([&] {
      run_ranks(n, [&](int r, Communicator& world) {
        auto ep = world.split(r % 2, r);  // the failure crosses groups: ranks 0, 2, 4, ... and 1, 3, ...
        try {
          world.barrier();
          if (r == 2) throw Error("boom: bad batch");
          if (r == 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));  // a pending call
          Tensor t = host_tensor({1.0}, Shape{1}, DType::F32);
          ep->all_reduce(t, ReduceOp::Sum);
          world.all_reduce(t, ReduceOp::Sum);
        } catch (const Error& e) {
          seen[size_t(r)] = e.what();
          throw;
        }
      }, 30);
    });
    CHECK(seconds_since(t0) < 5);  // far inside the 30 s timeout
    CHECK_THAT(err, has_substr("rank 2: boom: bad batch"));
    CHECK(err.rfind("rank 2: ", 0) == 0);
    for (int r = 0; r < n; ++r) {
      CAPTURE(r, seen[size_t(r)]);
      if (r == 2) continue;
      CHECK_THAT(seen[size_t(r)], has_substr("rank 2 failed: boom: bad batch"));
    }
  }
  // A non-Error exception is named too.
  CHECK_THAT(error_of([] {
               run_ranks(2, [](int r, Communicator& c) {
                 if (r == 1) throw std::runtime_error("plain failure");
                 c.barrier();
               });
             }),
             has_substr("rank 1: plain failure"));
}

TEST_CASE("comm sim: a rank that never arrives ends in a timeout naming it", "[comm]") {
  std::vector<std::string> seen(4);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string err = error_of([&] {
    run_ranks(4, [&](int r, Communicator& c) {
      if (r == 3) return;  // skips the collective and ends
      try {
        c.barrier();
      } catch (const Error& e) {
        seen[size_t(r)] = e.what();
        throw;
      }
    }, 0.3);
  });
  const double dt = seconds_since(t0);
  CHECK(dt >= 0.29);
  CHECK(dt < 3);
  CHECK_THAT(err, has_substr("timed out after 0.3 s; rank 3 never arrived"));
  for (int r = 0; r < 3; ++r) CHECK_THAT(seen[size_t(r)], has_substr("rank 3 never arrived"));

  // Inside a sub-group the world rank is named as well.
  const std::string err2 = error_of([&] {
    run_ranks(4, [&](int r, Communicator& c) {
      auto g = c.split(r / 2, r);
      if (r == 3) return;
      if (r == 2) g->barrier();
    }, 0.2);
  });
  CHECK_THAT(err2, has_substr("rank 2: sim barrier on rank 0 of 2 (world rank 2)"));
  CHECK_THAT(err2, has_substr("rank 1 (world rank 3) never arrived"));
}

TEST_CASE("comm sim: run_ranks gives each rank one OpenMP thread, abort() names the rank", "[comm]") {
#ifdef _OPENMP
  auto threads = on_ranks<int>(2, [](int, Communicator&) { return omp_get_max_threads(); });
  CHECK(threads == std::vector<int>{1, 1});
#endif
  // abort() called directly (no exception) is reported with its reason.
  std::vector<std::string> seen(2);
  const std::string err = error_of([&] {
    run_ranks(2, [&](int r, Communicator& c) {
      if (r == 0) {
        c.abort("out of patience");
        seen[0] = error_of([&] { c.barrier(); });
        return;
      }
      seen[1] = error_of([&] { c.barrier(); });
    }, 10);
  });
  CHECK_THAT(err, has_substr("rank 0: out of patience"));
  CHECK_THAT(seen[0], has_substr("this rank was aborted: out of patience"));
  CHECK_THAT(seen[1], has_substr("rank 0 failed: out of patience"));
}
