// moelab tests: the NCCL communicator (backends/cuda/nccl_comm.h) on two GPUs, against the
// simulated ranks (core/comm_sim.h) bit for bit; splits; a failing rank and a timeout; two
// processes meeting through an id file (the test binary runs itself twice, as ranks 0 and 1,
// through the hidden case "nccl child: file rendezvous"); launcher variables. A hidden benchmark
// ("[.][bench][nccl]") times all_to_all_v against a plain ncclSend/ncclRecv group, and all_reduce.
//
// Every case WARNs and passes with fewer than 2 CUDA devices (Catch2 2.13 has no SKIP), so the
// binary runs in CPU-only CI. Catch2 assertions are not thread-safe: rank threads record, the
// main thread checks.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "backends/cuda/cuda_backend.h"
#include "catch_compat.h"
#include "core/comm_sim.h"

#if MOELAB_HAVE_NCCL
#include <cuda_runtime.h>
#include <nccl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <filesystem>

#include "backends/cuda/nccl_comm.h"
#include "temp_dir.h"

extern char** environ;
#endif

using namespace moelab;

#if !MOELAB_HAVE_NCCL

TEST_CASE("nccl: communicator (built without NCCL)", "[gpu][nccl]") {
  WARN("moelab was built without NCCL (nccl.h / libnccl not found): NCCL tests skipped");
}

#else

namespace {

#define TWO_GPUS_OR_SKIP()                                                                        \
  do {                                                                                            \
    if (cuda_device_count() < 2) {                                                                \
      WARN("fewer than 2 CUDA devices visible (" << cuda_device_count() << "): NCCL test skipped"); \
      return;                                                                                     \
    }                                                                                             \
  } while (0)

using Bytes = std::vector<uint8_t>;

Bytes bytes_of(const Tensor& host) {
  const auto* p = static_cast<const uint8_t*>(host.data());
  return Bytes(p, p + host.nbytes());
}
template <class T>
Bytes bytes_of(const std::vector<T>& v) {
  const auto* p = reinterpret_cast<const uint8_t*>(v.data());
  return Bytes(p, p + v.size() * sizeof(T));
}

// Moves tensors between the host and the communicator's memory.
struct Io {
  std::function<Tensor(const Tensor&)> up;    // host tensor -> a new tensor where the comm works
  std::function<Tensor(const Tensor&)> down;  // that tensor -> a host tensor
  std::function<void(const Tensor&)> twice;   // t *= 2 where the comm works (NCCL: the backend's stream)
};

// A fixed sequence of every collective on rank r of a 2-rank communicator; every result as bytes.
std::vector<Bytes> suite(int r, Communicator& c, const Io& io) {
  std::vector<Bytes> out;
  auto values = [&](int64_t n, DType dt, int salt) {
    std::vector<double> x(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t k = uint64_t(i) * 7919u + uint64_t(r) * 104729u + uint64_t(salt) * 31u;
      x[size_t(i)] = dt == DType::I32 ? double(int64_t(k % 2001) - 1000)
                                      : std::ldexp(double(k % 1000) - 499.5, int((i + r) % 40) - 20);
    }
    return x;
  };
  for (DType dt : {DType::F64, DType::F32, DType::BF16, DType::I32}) {
    // Sizes: one element, a small vector, and 1M+3 (several NCCL channels and protocols).
    for (int64_t n : {int64_t(1), int64_t(1000), int64_t((1 << 20) + 3)}) {
      const Tensor h = host_tensor(values(n, dt, 1), Shape{n}, dt);
      Tensor t = io.up(h);
      c.all_reduce(t, ReduceOp::Sum);
      out.push_back(bytes_of(io.down(t)));
      t = io.up(h);
      c.all_reduce(t, ReduceOp::Max);
      out.push_back(bytes_of(io.down(t)));
    }
    {  // all_gather [3, 5] -> [6, 5]
      Tensor in = io.up(host_tensor(values(15, dt, 2), Shape{3, 5}, dt));
      Tensor o = io.up(host_tensor(std::vector<double>(30, 0.0), Shape{6, 5}, dt));
      c.all_gather(in, o);
      out.push_back(bytes_of(io.down(o)));
    }
    {  // broadcast from rank 1
      Tensor t = io.up(host_tensor(values(77, dt, 3), Shape{7, 11}, dt));
      c.broadcast(t, 1);
      out.push_back(bytes_of(io.down(t)));
    }
    {  // all_to_all_v, rows of 7: rank 0 sends 2 rows to itself and none to rank 1 (a zero
       // pair); rank 1 sends 3 rows to rank 0 and 1 to itself. One spare row on each side.
      const std::vector<int64_t> send_rows = r == 0 ? std::vector<int64_t>{2, 0} : std::vector<int64_t>{3, 1};
      const std::vector<int64_t> recv_rows = c.exchange_counts(send_rows);
      out.push_back(bytes_of(recv_rows));
      const int64_t sent = send_rows[0] + send_rows[1], got = recv_rows[0] + recv_rows[1];
      Tensor s = io.up(host_tensor(values((sent + 1) * 7, dt, 4), Shape{sent + 1, 7}, dt));
      Tensor d = io.up(host_tensor(std::vector<double>(size_t((got + 1) * 7), -3.0), Shape{got + 1, 7}, dt));
      c.all_to_all_v(s, send_rows, d, recv_rows);
      out.push_back(bytes_of(io.down(d)));
    }
  }
  {  // started reductions: they see the work queued before them (t *= 2 on the stream), complete
     // in wait_started(), or before the next call (all_gather_host below drains the last one).
    std::vector<Tensor> ts;
    // (f32 and bf16: what the trainer reduces on GPUs, and what the CUDA backend scales)
    for (const auto& [dt, n] : std::vector<std::pair<DType, int64_t>>{
             {DType::F32, (1 << 20) + 3}, {DType::BF16, (1 << 20) + 3}, {DType::F32, 1000}, {DType::BF16, 77}}) {
      ts.push_back(io.up(host_tensor(values(n, dt, 5 + int(ts.size())), Shape{n}, dt)));
      io.twice(ts.back());
      c.start_all_reduce(ts.back(), ReduceOp::Sum);
    }
    c.wait_started();
    Tensor last = io.up(host_tensor(values(4096, DType::F32, 9), Shape{4096}, DType::F32));
    c.start_all_reduce(last, ReduceOp::Max);
    ts.push_back(last);
    out.push_back(bytes_of(c.all_gather_host({int64_t(r)})));
    for (const Tensor& t : ts) out.push_back(bytes_of(io.down(t)));
  }
  out.push_back(bytes_of(c.all_gather_host({int64_t(r), int64_t(100 + r), int64_t(-r)})));
  std::vector<double> h{r == 0 ? 1e16 : 1.0, double(r), r == 0 ? -2.0 : std::nan("")};
  c.all_reduce_host(h, ReduceOp::Sum);
  out.push_back(bytes_of(h));
  std::vector<double> m{double(r), -double(r)};
  c.all_reduce_host(m, ReduceOp::Max);
  out.push_back(bytes_of(m));
  c.barrier();
  return out;
}

// Runs f(rank, comm, backend) on one thread per GPU of a fresh 2-GPU NCCL world (each thread
// makes its own CUDA backend and binds it). A rank that throws aborts its communicator; the
// errors come back per rank ("" = fine).
template <class R>
std::vector<std::string> on_gpus(std::vector<R>& out, const std::function<R(int, NcclCommunicator&, Backend&)>& f,
                                 const NcclOptions& opts = {}) {
  auto comms = make_nccl_world_single_process({0, 1}, opts);
  out.assign(2, R{});
  std::vector<std::string> err(2);
  std::vector<std::thread> th;
  for (int r = 0; r < 2; ++r)
    th.emplace_back([&, r] {
      std::unique_ptr<Backend> be;
      try {
        be = make_cuda_backend({r});
        comms[size_t(r)]->bind_backend(*be);
        out[size_t(r)] = f(r, *comms[size_t(r)], *be);
      } catch (const std::exception& e) {
        err[size_t(r)] = e.what();
        comms[size_t(r)]->abort(e.what());
      }
      comms[size_t(r)].reset();  // in its own thread, before the backend whose stream it used
      be.reset();
    });
  for (auto& t : th) t.join();
  return err;
}

std::vector<std::vector<Bytes>> sim_suite() {
  std::vector<std::vector<Bytes>> sim(2);
  const Io host_io{[](const Tensor& h) { return host_tensor(host_values(h), h.shape(), h.dtype()); },
                   [](const Tensor& t) { return t; },
                   [](const Tensor& t) {
                     std::vector<double> v = host_values(t);
                     for (double& x : v) x *= 2;
                     const Tensor d = host_tensor(v, t.shape(), t.dtype());
                     std::memcpy(t.data(), d.data(), size_t(t.nbytes()));
                   }};
  run_ranks(2, [&](int r, Communicator& c) { sim[size_t(r)] = suite(r, c, host_io); });
  return sim;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

TEST_CASE("nccl: every collective on 2 GPUs equals the simulated ranks bit for bit", "[gpu][nccl]") {
  TWO_GPUS_OR_SKIP();
  INFO("NCCL " << nccl_version());
  const auto sim = sim_suite();
  struct Mode { NcclOptions::Sum sum; bool blocking; };
  for (const Mode mode : {Mode{NcclOptions::Sum::Auto, false}, Mode{NcclOptions::Sum::RankOrder, false},
                          Mode{NcclOptions::Sum::Auto, true}}) {
    CAPTURE(int(mode.sum), mode.blocking);
    NcclOptions opts;
    opts.sum = mode.sum;
    opts.blocking = mode.blocking;
    std::vector<std::vector<Bytes>> got;
    const auto err = on_gpus<std::vector<Bytes>>(got, [](int r, NcclCommunicator& c, Backend& be) {
      const Io io{[&](const Tensor& h) { return be.from_host(h); }, [&](const Tensor& t) { return be.to_host(t); },
                  [&](const Tensor& t) { be.scale(t, 2.0); }};
      return suite(r, c, io);
    }, opts);
    REQUIRE(err == std::vector<std::string>{"", ""});
    for (int r = 0; r < 2; ++r) {
      REQUIRE(got[size_t(r)].size() == sim[size_t(r)].size());
      for (size_t k = 0; k < sim[size_t(r)].size(); ++k) {
        CAPTURE(r, k);
        CHECK(got[size_t(r)][k] == sim[size_t(r)][k]);
      }
    }
  }
}

TEST_CASE("nccl: split (reversed order, singletons, no color), collectives inside", "[gpu][nccl]") {
  TWO_GPUS_OR_SKIP();
  struct Got {
    int rev_rank = -1, rev_world_rank = -1, single_size = -1;
    std::vector<int64_t> rev_members;
    double rev_sum = 0, single_sum = 0;
    bool none_null = false;
  };
  for (bool blocking : {false, true}) {
    CAPTURE(blocking);
    NcclOptions opts;
    opts.blocking = blocking;
    std::vector<Got> got;
    const auto err = on_gpus<Got>(
        got,
        [](int r, NcclCommunicator& world, Backend& be) {
          Got g;
          auto rev = world.split(0, -r);    // both ranks, in reverse order
          auto single = world.split(r, 0);  // {0}, {1}
          auto none = world.split(r == 1 ? -1 : 0, 0);
          g.none_null = none == nullptr;
          g.rev_rank = rev->rank();
          g.rev_world_rank = static_cast<NcclCommunicator&>(*rev).world_rank();
          g.single_size = single->size();
          g.rev_members = rev->all_gather_host({int64_t(r)});
          Tensor t = be.from_host(host_tensor({double(r + 1)}, Shape{1}, DType::F32));
          rev->all_reduce(t, ReduceOp::Sum);
          g.rev_sum = host_values(be.to_host(t))[0];
          single->all_reduce(t, ReduceOp::Sum);
          g.single_sum = host_values(be.to_host(t))[0];
          if (none) none->barrier();
          world.barrier();
          return g;
        },
        opts);
    REQUIRE(err == std::vector<std::string>{"", ""});
    for (int r = 0; r < 2; ++r) {
      CAPTURE(r);
      CHECK(got[size_t(r)].rev_rank == 1 - r);
      CHECK(got[size_t(r)].rev_world_rank == r);
      CHECK(got[size_t(r)].rev_members == std::vector<int64_t>{1, 0});
      CHECK(got[size_t(r)].rev_sum == 3.0);
      CHECK(got[size_t(r)].single_sum == 3.0);
      CHECK(got[size_t(r)].single_size == 1);
      CHECK(got[size_t(r)].none_null == (r == 1));
    }
  }
}

TEST_CASE("nccl: a failing rank stops its peer with an error naming it, a timeout names the collective",
          "[gpu][nccl]") {
  TWO_GPUS_OR_SKIP();
  for (bool blocking : {false, true}) {
    CAPTURE(blocking);
    {
      // Rank 1 fails before the all_reduce that rank 0 is already waiting in.
      NcclOptions opts;
      opts.blocking = blocking;
      opts.timeout_s = 60;
      std::vector<int> unused;
      const auto t0 = std::chrono::steady_clock::now();
      const auto err = on_gpus<int>(
          unused,
          [](int r, NcclCommunicator& c, Backend& be) {
            Tensor t = be.from_host(host_tensor({1.0}, Shape{1}, DType::F32));
            c.barrier();
            if (r == 1) {
              std::this_thread::sleep_for(std::chrono::milliseconds(300));
              throw Error("boom: bad batch");
            }
            c.all_reduce(t, ReduceOp::Sum);
            return 0;
          },
          opts);
      CHECK(seconds_since(t0) < 30);
      CHECK(err[1] == "boom: bad batch");
      CHECK_THAT(err[0], has_substr("nccl all_reduce on rank 0 of 2 (device 0): rank 1 failed: boom: bad batch"));
    }
    {
      // Rank 1 never calls: rank 0's barrier ends after the timeout.
      NcclOptions opts;
      opts.blocking = blocking;
      opts.timeout_s = 2;
      std::vector<int> unused;
      std::atomic<bool> done{false};
      const auto t0 = std::chrono::steady_clock::now();
      const auto err = on_gpus<int>(
          unused,
          [&](int r, NcclCommunicator& c, Backend&) {
            if (r == 1) {
              while (!done) std::this_thread::sleep_for(std::chrono::milliseconds(10));
              return 0;
            }
            try {
              c.barrier();
            } catch (...) {
              done = true;
              throw;
            }
            done = true;
            return 0;
          },
          opts);
      const double dt = seconds_since(t0);
      CHECK(dt >= 2);
      CHECK(dt < 30);
      CHECK_THAT(err[0], has_substr("nccl barrier on rank 0 of 2 (device 0): "));
      CHECK_THAT(err[0], has_substr(" did not complete within 2 s: a peer did not take part"));
      CHECK(err[1].empty());
    }
  }
  {
    // After both failures, a fresh world works.
    std::vector<double> sums;
    const auto err = on_gpus<double>(sums, [](int r, NcclCommunicator& c, Backend& be) {
      Tensor t = be.from_host(host_tensor({double(r + 1)}, Shape{1}, DType::F64));
      c.all_reduce(t, ReduceOp::Sum);
      return host_values(be.to_host(t))[0];
    });
    CHECK(err == std::vector<std::string>{"", ""});
    CHECK(sums == std::vector<double>{3.0, 3.0});
  }
}

TEST_CASE("nccl: launcher variables (mpirun, PMI, srun)", "[gpu][nccl]") {
  const char* names[] = {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                         "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
                         "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"};
  std::vector<std::pair<std::string, std::string>> saved;
  for (const char* n : names)
    if (const char* v = std::getenv(n)) saved.emplace_back(n, v);
  auto clear = [&] {
    for (const char* n : names) unsetenv(n);
  };
  clear();
  CHECK_FALSE(launch_rank_from_env().has_value());
  setenv("SLURM_PROCID", "3", 1);
  setenv("SLURM_NTASKS", "8", 1);
  setenv("SLURM_LOCALID", "1", 1);
  auto l = launch_rank_from_env();
  REQUIRE(l.has_value());
  CHECK(l->rank == 3);
  CHECK(l->world == 8);
  CHECK(l->local_rank == 1);
  CHECK(l->source == "SLURM_PROCID/SLURM_NTASKS");
  setenv("PMI_RANK", "5", 1);  // PMI before SLURM
  setenv("PMI_SIZE", "6", 1);
  l = launch_rank_from_env();
  CHECK(l->rank == 5);
  CHECK(l->local_rank == -1);
  setenv("OMPI_COMM_WORLD_RANK", "0", 1);  // Open MPI first
  setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
  l = launch_rank_from_env();
  CHECK(l->rank == 0);
  CHECK(l->world == 2);
  setenv("OMPI_COMM_WORLD_RANK", "2", 1);
  CHECK_THROWS_AS(launch_rank_from_env(), UsageError);
  setenv("OMPI_COMM_WORLD_RANK", "x1", 1);
  CHECK_THROWS_WITH(launch_rank_from_env(), has_substr("OMPI_COMM_WORLD_RANK='x1'"));
  unsetenv("OMPI_COMM_WORLD_SIZE");
  CHECK_THROWS_WITH(launch_rank_from_env(), has_substr("OMPI_COMM_WORLD_SIZE is not"));
  clear();
  for (const auto& [n, v] : saved) setenv(n.c_str(), v.c_str(), 1);
}

// ---- two processes through an id file ------------------------------------------------------

// The child side (hidden; run by the case below with MOELAB_NCCL_CHILD_* set).
// MODE ok: rank/world from the Open MPI variables, an all_reduce and an all_to_all_v.
// MODE die: rank 1 exits right after joining; rank 0 must name it in its error.
TEST_CASE("nccl child: file rendezvous", "[.][nccl_child]") {
  const char* mode = std::getenv("MOELAB_NCCL_CHILD_MODE");
  const char* file = std::getenv("MOELAB_NCCL_CHILD_FILE");
  if (mode == nullptr || file == nullptr) return;
  auto l = launch_rank_from_env();
  REQUIRE(l.has_value());
  NcclOptions opts;
  opts.timeout_s = 60;
  opts.blocking = std::getenv("MOELAB_NCCL_CHILD_BLOCKING") != nullptr;
  auto comm = make_nccl_comm_from_file(l->rank, l->world, file, l->rank, opts);
  auto be = make_cuda_backend({l->rank});
  comm->bind_backend(*be);
  const int r = comm->rank();
  if (std::string(mode) == "die") {
    if (r == 1) {
      std::fflush(stdout);
      _exit(0);  // gone, no abort, no failure file
    }
    Tensor t = be->from_host(host_tensor({1.0}, Shape{1}, DType::F32));
    const auto t0 = std::chrono::steady_clock::now();
    std::string err;
    try {
      comm->all_reduce(t, ReduceOp::Sum);
    } catch (const Error& e) {
      err = e.what();
    }
    CHECK_THAT(err, has_substr("rank 1 failed: its process (pid "));
    CHECK(seconds_since(t0) < 20);
    std::printf("child rank 0 saw: %s\n", err.c_str());
    return;
  }
  Tensor t = be->from_host(host_tensor({double(r + 1), 0.5}, Shape{2}, DType::F64));
  comm->all_reduce(t, ReduceOp::Sum);
  CHECK(host_values(be->to_host(t)) == std::vector<double>{3.0, 1.0});
  const std::vector<int64_t> send_rows{1, 2};
  const auto recv_rows = comm->exchange_counts(send_rows);
  CHECK(recv_rows == (r == 0 ? std::vector<int64_t>{1, 1} : std::vector<int64_t>{2, 2}));
  Tensor s = be->from_host(host_tensor({r * 10.0, r * 10.0 + 1, r * 10.0 + 2}, Shape{3, 1}, DType::F32));
  Tensor d = be->empty(Shape{recv_rows[0] + recv_rows[1], 1}, DType::F32);
  comm->all_to_all_v(s, send_rows, d, recv_rows);
  CHECK(host_values(be->to_host(d)) == (r == 0 ? std::vector<double>{0.0, 10.0} : std::vector<double>{1, 2, 11, 12}));
  comm->barrier();
}

TEST_CASE("nccl: two processes meet through an id file, a process that exits is named", "[gpu][nccl]") {
  TWO_GPUS_OR_SKIP();
  char exe[4096] = {};
  const ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  REQUIRE(len > 0);
  test::TempDir dir("nccl_file");
  for (const char* mode : {"ok", "die", "ok blocking", "die blocking"}) {
    CAPTURE(mode);
    const bool blocking = std::strstr(mode, "blocking") != nullptr;
    const std::string id_file = dir.path(std::string("id_") + (blocking ? "b" : "") + mode[0]);
    pid_t pids[2] = {0, 0};
    for (int r = 0; r < 2; ++r) {
      std::vector<std::string> env;
      for (char** e = environ; *e != nullptr; ++e)
        if (std::strncmp(*e, "OMPI_", 5) != 0 && std::strncmp(*e, "MOELAB_NCCL_CHILD_", 18) != 0) env.emplace_back(*e);
      env.push_back("OMPI_COMM_WORLD_RANK=" + std::to_string(r));
      env.push_back("OMPI_COMM_WORLD_SIZE=2");
      env.push_back(std::string("MOELAB_NCCL_CHILD_MODE=") + (mode[0] == 'o' ? "ok" : "die"));
      if (blocking) env.push_back("MOELAB_NCCL_CHILD_BLOCKING=1");
      env.push_back("MOELAB_NCCL_CHILD_FILE=" + id_file);
      env.push_back("NCCL_NVLS_ENABLE=0");
      std::vector<char*> envp;
      for (auto& s : env) envp.push_back(s.data());
      envp.push_back(nullptr);
      std::string name = "nccl child: file rendezvous";
      char* argv[] = {exe, name.data(), nullptr};
      REQUIRE(posix_spawn(&pids[r], exe, nullptr, nullptr, argv, envp.data()) == 0);
    }
    int status[2] = {-1, -1};
    bool running[2] = {true, true};
    const auto t0 = std::chrono::steady_clock::now();
    while ((running[0] || running[1]) && seconds_since(t0) < 120) {
      for (int r = 0; r < 2; ++r)
        if (running[r] && waitpid(pids[r], &status[r], WNOHANG) == pids[r]) running[r] = false;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    for (int r = 0; r < 2; ++r)
      if (running[r]) {
        kill(pids[r], SIGKILL);
        waitpid(pids[r], &status[r], 0);
      }
    CHECK_FALSE(running[0]);
    CHECK_FALSE(running[1]);
    for (int r = 0; r < 2; ++r) {
      CAPTURE(r);
      CHECK(WIFEXITED(status[r]));
      CHECK(WEXITSTATUS(status[r]) == 0);
    }
    CHECK_FALSE(std::filesystem::exists(id_file));  // rank 0 removed the id once both had joined
  }
}

// ---- benchmark (hidden: moelab_gpu_tests "[bench]" or "[nccl]") ------------------------------

TEST_CASE("nccl bench: all_to_all_v vs a plain ncclSend/ncclRecv group, and all_reduce", "[.][bench][nccl]") {
  TWO_GPUS_OR_SKIP();
  const int warm = 5, iters = 20;
  const int64_t mbs[] = {1, 4, 16, 64, 256};
  // Three worlds: non-blocking (the default), blocking, and rank-order sums.
  NcclOptions bl_opts, ord_opts;
  bl_opts.blocking = true;
  ord_opts.sum = NcclOptions::Sum::RankOrder;
  auto nb = make_nccl_world_single_process({0, 1});  // first: it sets NCCL_NVLS_ENABLE=0
  auto bl = make_nccl_world_single_process({0, 1}, bl_opts);
  auto ord = make_nccl_world_single_process({0, 1}, ord_opts);
  // Plain NCCL comms for the baseline (blocking, as a user of raw NCCL would have them).
  ncclComm_t raw[2];
  const int devs[2] = {0, 1};
  REQUIRE(ncclCommInitAll(raw, 2, devs) == ncclSuccess);
  for (int d = 0; d < 2; ++d) {
    cudaDeviceProp p{};
    cudaGetDeviceProperties(&p, d);
    std::printf("device %d: %s\n", d, p.name);
  }
  std::printf("NCCL %d, NCCL_NVLS_ENABLE=%s, NCCL_RUNTIME_CONNECT=%s; per call: max over the 2 ranks of the CUDA-event "
              "time from before the call to after its return, median of %d after %d warm-ups\n",
              nccl_version(), std::getenv("NCCL_NVLS_ENABLE"), std::getenv("NCCL_RUNTIME_CONNECT"), iters, warm);
  std::printf("S = bytes each rank sends (half to itself, half to the peer); GB/s = S / time; all_reduce busbw = S / "
              "time for 2 ranks\n\n");
  std::printf("| S per rank | a2a_v ms | GB/s | a2a_v blocking ms | GB/s | send/recv group ms | GB/s | all_reduce f32 ms | "
              "busbw | blocking ms | busbw | rank-order ms | busbw |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  enum { kA2a, kA2aBl, kRaw, kAr, kArBl, kArOrd, kKinds };
  for (int64_t mb : mbs) {
    const int64_t bytes = mb << 20;
    // t[kind][iter][rank]
    std::vector<std::vector<std::vector<float>>> t(kKinds, std::vector<std::vector<float>>(iters, std::vector<float>(2, 0.f)));
    std::barrier sync(2);
    std::vector<std::thread> th;
    for (int r = 0; r < 2; ++r)
      th.emplace_back([&, r] {
        auto be = make_cuda_backend({r});
        for (auto* w : {&nb, &bl, &ord}) (*w)[size_t(r)]->bind_backend(*be);
        auto stream = static_cast<cudaStream_t>(cuda_backend_stream(*be));
        const int64_t rows = bytes / 4 / 256;  // f32 rows of 256
        Tensor send = be->zeros(Shape{rows, 256}, DType::F32), recv = be->zeros(Shape{rows, 256}, DType::F32);
        const std::vector<int64_t> split{rows / 2, rows - rows / 2};
        const std::vector<int64_t> rsplit = nb[size_t(r)]->exchange_counts(split);
        Tensor grad = be->zeros(Shape{bytes / 4}, DType::F32);
        cudaEvent_t e0, e1;
        cudaEventCreate(&e0);
        cudaEventCreate(&e1);
        auto timed = [&](int kind, const std::function<void()>& f) {
          for (int i = 0; i < warm + iters; ++i) {
            sync.arrive_and_wait();
            cudaEventRecord(e0, stream);
            f();
            cudaEventRecord(e1, stream);
            cudaEventSynchronize(e1);
            float ms = 0;
            cudaEventElapsedTime(&ms, e0, e1);
            if (i >= warm) t[size_t(kind)][size_t(i - warm)][size_t(r)] = ms;
          }
        };
        timed(kA2a, [&] { nb[size_t(r)]->all_to_all_v(send, split, recv, rsplit); });
        timed(kA2aBl, [&] { bl[size_t(r)]->all_to_all_v(send, split, recv, rsplit); });
        timed(kRaw, [&] {
          const size_t half = size_t(split[0]) * 256 * 4;
          ncclGroupStart();
          for (int p = 0; p < 2; ++p) {
            const size_t off = p == 0 ? 0 : half, n = p == 0 ? half : size_t(bytes) - half;
            ncclSend(static_cast<char*>(send.data()) + off, n, ncclUint8, p, raw[r], stream);
            ncclRecv(static_cast<char*>(recv.data()) + off, n, ncclUint8, p, raw[r], stream);
          }
          ncclGroupEnd();
        });
        timed(kAr, [&] { nb[size_t(r)]->all_reduce(grad, ReduceOp::Sum); });
        timed(kArBl, [&] { bl[size_t(r)]->all_reduce(grad, ReduceOp::Sum); });
        timed(kArOrd, [&] { ord[size_t(r)]->all_reduce(grad, ReduceOp::Sum); });
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
        be->synchronize();
      });
    for (auto& x : th) x.join();
    auto median_ms = [&](int kind) {
      std::vector<float> v;
      for (int i = 0; i < iters; ++i) v.push_back(std::max(t[size_t(kind)][size_t(i)][0], t[size_t(kind)][size_t(i)][1]));
      std::sort(v.begin(), v.end());
      return double(v[v.size() / 2]);
    };
    const double gb = double(bytes) / 1e9;
    auto cell = [&](int kind) {
      const double ms = median_ms(kind);
      char buf[64];
      std::snprintf(buf, sizeof(buf), "%.3f | %.1f", ms, gb / (ms * 1e-3));
      return std::string(buf);
    };
    std::printf("| %lld MiB | %s | %s | %s | %s | %s | %s |\n", (long long)mb, cell(kA2a).c_str(), cell(kA2aBl).c_str(),
                cell(kRaw).c_str(), cell(kAr).c_str(), cell(kArBl).c_str(), cell(kArOrd).c_str());
    std::fflush(stdout);
  }
  std::vector<std::thread> th;  // both ranks' teardown at once (ncclCommDestroy is an intra-node collective)
  for (int r = 0; r < 2; ++r)
    th.emplace_back([&, r] {
      cudaSetDevice(r);
      ncclCommDestroy(raw[r]);
      nb[size_t(r)].reset();
      bl[size_t(r)].reset();
      ord[size_t(r)].reset();
    });
  for (auto& x : th) x.join();
  SUCCEED();
}

#endif  // MOELAB_HAVE_NCCL
