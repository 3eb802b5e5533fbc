// moelab: simulated ranks (core/comm_sim.h): one thread per rank, shared memory, fixed-order
// reductions, barriers on one mutex and condition variable per world.
#include "core/comm_sim.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <numeric>
#include <sstream>
#include <thread>

// OpenMP without linking it: moelab_core is built without OpenMP, the CPU backend links it. A weak
// reference resolves to the runtime when the program has one and stays null otherwise.
#if defined(__GNUC__) && defined(__ELF__)
extern "C" void omp_set_num_threads(int) __attribute__((weak));
#define MOELAB_WEAK_OMP 1
#endif

namespace moelab {

namespace {

using Clock = std::chrono::steady_clock;

// Shared by every group split from one world: the failure state and the one lock.
struct World {
  explicit World(int n, double timeout) : size(n), timeout_s(timeout), failed(size_t(n), 0), reason(size_t(n)) {}
  const int size;
  const double timeout_s;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<char> failed;         // per world rank
  std::vector<std::string> reason;  // per world rank
  int first_failed = -1;            // world rank whose failure was recorded first
};

struct Group;

// What one rank posts for the collective in progress (read by its peers between the barriers).
struct Post {
  const char* op = "";
  std::string err;  // this rank's own argument error ("" = fine)
  const void* in = nullptr;
  void* out = nullptr;
  DType dtype = DType::F32;
  int64_t count = 0;      // elements (all_reduce, broadcast) or bytes (all_gather)
  int64_t row_bytes = 0;  // all_to_all_v
  int root = 0;
  ReduceOp rop = ReduceOp::Sum;
  std::vector<int64_t> a, b;  // counts / host vectors (copies)
  std::vector<double> d;
  void* scratch = nullptr;  // all_reduce: this rank's reduced chunk
  int color = 0, key = 0;
  std::shared_ptr<Group> made;
};

struct Group {
  Group(std::shared_ptr<World> w, std::vector<int> ranks, bool is_world_group)
      : world(std::move(w)), world_ranks(std::move(ranks)), world_group(is_world_group),
        arrived_gen(world_ranks.size(), -1), posts(world_ranks.size()) {}
  std::shared_ptr<World> world;
  std::vector<int> world_ranks;  // group rank -> world rank
  const bool world_group;        // made by make_simulated_world (not by split)
  int64_t gen = 0;               // barrier generation
  int arrived = 0;
  std::vector<int64_t> arrived_gen;  // per group rank: the generation it last arrived at
  std::vector<Post> posts;
  int size() const { return int(world_ranks.size()); }
  bool is_world() const { return world_group; }
};

int64_t row_elems(const Tensor& t) {
  int64_t r = 1;
  for (int i = 1; i < t.ndim(); ++i) r *= t.dim(i);
  return r;
}

// Element i of the reduction over ranks 0..n-1 in order, for i in [lo, hi), into out[i - lo].
template <class T>
void reduce_range(const std::vector<const void*>& ins, void* out, int64_t lo, int64_t hi, ReduceOp op) {
  T* o = static_cast<T*>(out);
  const size_t n = ins.size();
  for (int64_t i = lo; i < hi; ++i) {
    if constexpr (std::is_same_v<T, bf16>) {
      float acc = static_cast<const bf16*>(ins[0])[i].to_float();
      for (size_t s = 1; s < n; ++s) {
        const float v = static_cast<const bf16*>(ins[s])[i].to_float();
        if (op == ReduceOp::Sum) acc += v;
        else if (std::isnan(v) || v > acc) acc = v;
      }
      o[i - lo] = bf16::from_float(acc);
    } else if constexpr (std::is_same_v<T, int32_t>) {
      uint32_t acc = uint32_t(static_cast<const int32_t*>(ins[0])[i]);
      for (size_t s = 1; s < n; ++s) {
        const int32_t v = static_cast<const int32_t*>(ins[s])[i];
        if (op == ReduceOp::Sum) acc += uint32_t(v);
        else if (v > int32_t(acc)) acc = uint32_t(v);
      }
      o[i - lo] = int32_t(acc);
    } else {
      T acc = static_cast<const T*>(ins[0])[i];
      for (size_t s = 1; s < n; ++s) {
        const T v = static_cast<const T*>(ins[s])[i];
        if (op == ReduceOp::Sum) acc += v;
        else if (std::isnan(v) || v > acc) acc = v;
      }
      o[i - lo] = acc;
    }
  }
}

void reduce_range(DType dt, const std::vector<const void*>& ins, void* out, int64_t lo, int64_t hi,
                  ReduceOp op) {
  switch (dt) {
    case DType::F64: reduce_range<double>(ins, out, lo, hi, op); break;
    case DType::F32: reduce_range<float>(ins, out, lo, hi, op); break;
    case DType::BF16: reduce_range<bf16>(ins, out, lo, hi, op); break;
    case DType::I32: reduce_range<int32_t>(ins, out, lo, hi, op); break;
  }
}

const char* op_name(ReduceOp op) { return op == ReduceOp::Sum ? "sum" : "max"; }

class SimComm final : public Communicator {
 public:
  SimComm(std::shared_ptr<Group> g, int rank) : g_(std::move(g)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return g_->size(); }
  std::string kind() const override { return "sim"; }

  void all_reduce(const Tensor& t, ReduceOp op) override {
    const int n = size();
    std::string err = local_tensor_error("all_reduce", t);
    // This rank reduces elements [lo(rank), lo(rank + 1)) for everyone.
    const int64_t numel = err.empty() ? t.numel() : 0;
    auto lo = [&](int r) { return numel * r / n; };
    std::vector<char> scratch(size_t(lo(rank_ + 1) - lo(rank_)) * (err.empty() ? dtype_size(t.dtype()) : 1) + 1);
    Post& p = begin("all_reduce", std::move(err));
    if (p.err.empty()) {
      p.in = t.data();
      p.dtype = t.dtype();
      p.count = t.numel();
      p.rop = op;
      p.scratch = scratch.data();
    }
    sync("all_reduce", true);
    std::string bad = mismatch([&](const Post& q, const Post& r0) {
      if (q.dtype != r0.dtype) return detail::concat("dtype ", to_string(q.dtype), " vs ", to_string(r0.dtype));
      if (q.count != r0.count) return detail::concat(q.count, " elements vs ", r0.count);
      if (q.rop != r0.rop) return detail::concat("op ", op_name(q.rop), " vs ", op_name(r0.rop));
      return std::string();
    });
    if (!bad.empty()) fail_after_sync("all_reduce", bad);
    std::vector<const void*> ins(static_cast<size_t>(n));
    for (int s = 0; s < n; ++s) ins[size_t(s)] = g_->posts[size_t(s)].in;
    reduce_range(t.dtype(), ins, scratch.data(), lo(rank_), lo(rank_ + 1), op);
    sync("all_reduce", false);
    const size_t es = dtype_size(t.dtype());
    for (int s = 0; s < n; ++s)
      std::memcpy(static_cast<char*>(t.data()) + size_t(lo(s)) * es, g_->posts[size_t(s)].scratch,
                  size_t(lo(s + 1) - lo(s)) * es);
    sync("all_reduce", false);  // peers' scratch chunks stay alive until every rank has copied
  }

  void all_gather(const Tensor& in, const Tensor& out) override {
    std::string err = local_tensor_error("all_gather", in);
    if (err.empty()) err = local_tensor_error("all_gather", out);
    if (err.empty()) {
      bool ok = out.dtype() == in.dtype() && out.ndim() == in.ndim() && out.dim(0) == size() * in.dim(0);
      for (int i = 1; ok && i < in.ndim(); ++i) ok = out.dim(i) == in.dim(i);
      if (!ok)
        err = detail::concat("all_gather: out ", out.describe(), " must be ", to_string(in.dtype()),
                             " [", size(), " * ", in.dim(0), ", ...] for in ", in.describe());
    }
    Post& p = begin("all_gather", std::move(err));
    if (p.err.empty()) {
      p.in = in.data();
      p.dtype = in.dtype();
      p.count = int64_t(in.nbytes());
    }
    sync("all_gather", true);
    std::string bad = mismatch([&](const Post& q, const Post& r0) {
      if (q.dtype != r0.dtype) return detail::concat("dtype ", to_string(q.dtype), " vs ", to_string(r0.dtype));
      if (q.count != r0.count) return detail::concat(q.count, " bytes vs ", r0.count);
      return std::string();
    });
    if (!bad.empty()) fail_after_sync("all_gather", bad);
    for (int s = 0; s < size(); ++s) {
      char* dst = static_cast<char*>(out.data()) + size_t(s) * size_t(in.nbytes());
      const void* src = g_->posts[size_t(s)].in;
      if (dst != src) std::memmove(dst, src, in.nbytes());
    }
    sync("all_gather", false);
  }

  void broadcast(const Tensor& t, int root) override {
    std::string err = local_tensor_error("broadcast", t);
    if (err.empty() && (root < 0 || root >= size()))
      err = detail::concat("broadcast: root ", root, " out of range for ", size(), " ranks");
    Post& p = begin("broadcast", std::move(err));
    if (p.err.empty()) {
      p.in = t.data();
      p.dtype = t.dtype();
      p.count = t.numel();
      p.root = root;
    }
    sync("broadcast", true);
    std::string bad = mismatch([&](const Post& q, const Post& r0) {
      if (q.root != r0.root) return detail::concat("root ", q.root, " vs ", r0.root);
      if (q.dtype != r0.dtype) return detail::concat("dtype ", to_string(q.dtype), " vs ", to_string(r0.dtype));
      if (q.count != r0.count) return detail::concat(q.count, " elements vs ", r0.count);
      return std::string();
    });
    if (!bad.empty()) fail_after_sync("broadcast", bad);
    if (rank_ != root) std::memcpy(t.data(), g_->posts[size_t(root)].in, t.nbytes());
    sync("broadcast", false);
  }

  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows, const Tensor& recv,
                    const std::vector<int64_t>& recv_rows) override {
    const int n = size();
    std::string err = local_tensor_error("all_to_all_v", send);
    if (err.empty()) err = local_tensor_error("all_to_all_v", recv);
    if (err.empty()) err = a2a_local_error(send, send_rows, recv, recv_rows, n);
    Post& p = begin("all_to_all_v", std::move(err));
    if (p.err.empty()) {
      p.in = send.data();
      p.dtype = send.dtype();
      p.row_bytes = row_elems(send) * int64_t(dtype_size(send.dtype()));
      p.a = send_rows;
      p.b = recv_rows;
    }
    sync("all_to_all_v", true);
    std::string bad = mismatch([&](const Post& q, const Post& r0) {
      if (q.dtype != r0.dtype) return detail::concat("dtype ", to_string(q.dtype), " vs ", to_string(r0.dtype));
      if (q.row_bytes != r0.row_bytes) return detail::concat("row of ", q.row_bytes, " bytes vs ", r0.row_bytes);
      return std::string();
    });
    if (bad.empty())  // recv_rows[s] of rank r must be what rank s sends to r (checked by everyone)
      for (int r = 0; r < n && bad.empty(); ++r)
        for (int s = 0; s < n; ++s) {
          const int64_t sent = g_->posts[size_t(s)].a[size_t(r)], expect = g_->posts[size_t(r)].b[size_t(s)];
          if (sent != expect) {
            bad = detail::concat(where("all_to_all_v"), ": rank ", r, " expects ", expect,
                                 " rows from rank ", s, ", which sends it ", sent,
                                 " (recv_rows must come from exchange_counts)");
            break;
          }
        }
    if (!bad.empty()) fail_after_sync("all_to_all_v", bad);
    const int64_t rb = p.row_bytes;
    int64_t dst_row = 0;
    for (int s = 0; s < n; ++s) {
      const Post& q = g_->posts[size_t(s)];
      const int64_t rows = recv_rows[size_t(s)];
      if (rows > 0) {
        int64_t src_row = 0;
        for (int r = 0; r < rank_; ++r) src_row += q.a[size_t(r)];
        std::memcpy(static_cast<char*>(recv.data()) + size_t(dst_row * rb),
                    static_cast<const char*>(q.in) + size_t(src_row * rb), size_t(rows * rb));
      }
      dst_row += rows;
    }
    sync("all_to_all_v", false);
  }

  void barrier() override {
    begin("barrier", "");
    sync("barrier", true);
    const std::string bad = mismatch([](const Post&, const Post&) { return std::string(); });
    if (!bad.empty()) fail_after_sync("barrier", bad);
    sync("barrier", false);
  }

  std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send) override {
    std::string err;
    if (int64_t(send.size()) != size())
      err = detail::concat("exchange_counts: ", send.size(), " counts for ", size(), " ranks");
    Post& p = begin("exchange_counts", std::move(err));
    if (p.err.empty()) p.a = send;
    sync("exchange_counts", true);
    const std::string bad = mismatch([](const Post&, const Post&) { return std::string(); });
    if (!bad.empty()) fail_after_sync("exchange_counts", bad);
    std::vector<int64_t> out;
    for (int s = 0; s < size(); ++s) out.push_back(g_->posts[size_t(s)].a[size_t(rank_)]);
    sync("exchange_counts", false);
    return out;
  }

  std::vector<int64_t> all_gather_host(const std::vector<int64_t>& v) override {
    Post& p = begin("all_gather_host", "");
    p.a = v;
    sync("all_gather_host", true);
    const std::string bad = mismatch([](const Post& q, const Post& r0) {
      return q.a.size() == r0.a.size() ? std::string()
                                       : detail::concat(q.a.size(), " values vs ", r0.a.size());
    });
    if (!bad.empty()) fail_after_sync("all_gather_host", bad);
    std::vector<int64_t> out;
    for (int s = 0; s < size(); ++s) out.insert(out.end(), g_->posts[size_t(s)].a.begin(), g_->posts[size_t(s)].a.end());
    sync("all_gather_host", false);
    return out;
  }

  void all_reduce_host(std::vector<double>& v, ReduceOp op) override {
    Post& p = begin("all_reduce_host", "");
    p.d = v;
    p.rop = op;
    sync("all_reduce_host", true);
    const std::string bad = mismatch([](const Post& q, const Post& r0) {
      if (q.d.size() != r0.d.size()) return detail::concat(q.d.size(), " values vs ", r0.d.size());
      if (q.rop != r0.rop) return detail::concat("op ", op_name(q.rop), " vs ", op_name(r0.rop));
      return std::string();
    });
    if (!bad.empty()) fail_after_sync("all_reduce_host", bad);
    std::vector<const void*> ins;
    for (int s = 0; s < size(); ++s) ins.push_back(g_->posts[size_t(s)].d.data());
    std::vector<double> out(v.size());
    reduce_range(DType::F64, ins, out.data(), 0, int64_t(v.size()), op);
    sync("all_reduce_host", false);
    v = std::move(out);
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    const int n = size();
    Post& p = begin("split", "");
    p.color = color;
    p.key = key;
    sync("split", true);
    const std::string bad = mismatch([](const Post&, const Post&) { return std::string(); });
    if (!bad.empty()) fail_after_sync("split", bad);
    std::vector<int> members;  // old ranks of my color, in new order
    if (color >= 0) {
      for (int s = 0; s < n; ++s)
        if (g_->posts[size_t(s)].color == color) members.push_back(s);
      std::stable_sort(members.begin(), members.end(), [&](int a, int b) {
        return g_->posts[size_t(a)].key < g_->posts[size_t(b)].key;  // ties: old rank (stable)
      });
      if (members.front() == rank_) {  // the leader makes the group
        std::vector<int> wr;
        for (int s : members) wr.push_back(g_->world_ranks[size_t(s)]);
        p.made = std::make_shared<Group>(g_->world, std::move(wr), false);
      }
    }
    sync("split", false);
    std::shared_ptr<Group> mine;
    if (!members.empty()) mine = g_->posts[size_t(members.front())].made;
    sync("split", false);  // the leader keeps its post until everyone has taken the group
    p.made.reset();
    if (!mine) return nullptr;
    const int new_rank = int(std::find(members.begin(), members.end(), rank_) - members.begin());
    return std::make_unique<SimComm>(std::move(mine), new_rank);
  }

  void abort(const std::string& reason) noexcept override {
    try {
      World& w = *g_->world;
      {
        std::lock_guard<std::mutex> lk(w.mu);
        const int wr = world_rank();
        if (!w.failed[size_t(wr)]) {
          w.failed[size_t(wr)] = 1;
          w.reason[size_t(wr)] = reason;
          if (w.first_failed < 0) w.first_failed = wr;
        }
      }
      w.cv.notify_all();
    } catch (...) {
    }
  }

  int world_rank() const { return g_->world_ranks[size_t(rank_)]; }
  const std::shared_ptr<Group>& group() const { return g_; }

 private:
  // "sim all_reduce on rank 1 of 4" (plus the world rank inside a sub-group).
  std::string where(const char* op) const {
    std::string s = detail::concat("sim ", op, " on rank ", rank_, " of ", size());
    if (!g_->is_world()) s += detail::concat(" (world rank ", world_rank(), ")");
    return s;
  }
  std::string name_rank(int group_rank) const {
    if (g_->is_world()) return detail::concat("rank ", group_rank);
    return detail::concat("rank ", group_rank, " (world rank ", g_->world_ranks[size_t(group_rank)], ")");
  }

  std::string local_tensor_error(const char* op, const Tensor& t) const {
    if (!t.defined()) return detail::concat(op, ": undefined tensor");
    if (t.device() != Device::CPU)
      return detail::concat(op, ": the sim communicator takes CPU tensors, got ", t.describe());
    return "";
  }

  static std::string a2a_local_error(const Tensor& send, const std::vector<int64_t>& send_rows,
                                     const Tensor& recv, const std::vector<int64_t>& recv_rows, int n) {
    if (send.dtype() != recv.dtype())
      return detail::concat("all_to_all_v: send ", send.describe(), " and recv ", recv.describe(), " differ in dtype");
    if (row_elems(send) != row_elems(recv))
      return detail::concat("all_to_all_v: send ", send.describe(), " and recv ", recv.describe(), " differ in row width");
    if (int64_t(send_rows.size()) != n || int64_t(recv_rows.size()) != n)
      return detail::concat("all_to_all_v: ", send_rows.size(), " send counts and ", recv_rows.size(),
                            " recv counts for ", n, " ranks");
    int64_t ss = 0, rs = 0;
    for (int r = 0; r < n; ++r) {
      if (send_rows[size_t(r)] < 0 || recv_rows[size_t(r)] < 0) return "all_to_all_v: negative row count";
      ss += send_rows[size_t(r)];
      rs += recv_rows[size_t(r)];
    }
    if (ss > send.dim(0)) return detail::concat("all_to_all_v: sends ", ss, " rows from ", send.describe());
    if (rs > recv.dim(0)) return detail::concat("all_to_all_v: receives ", rs, " rows into ", recv.describe());
    return "";
  }

  // Fills this rank's post for `op` (after the previous collective's last barrier, so no peer
  // still reads it).
  Post& begin(const char* op, std::string err) {
    Post& p = g_->posts[size_t(rank_)];
    p = Post{};
    p.op = op;
    p.err = std::move(err);
    return p;
  }

  // After the entry barrier: the same verdict on every rank. A rank that called another
  // collective, or any rank's own argument error, or check(post, rank 0's post) != "".
  template <class F>
  std::string mismatch(F check) const {
    const int n = size();
    const Post& p0 = g_->posts[0];
    for (int s = 0; s < n; ++s) {
      const Post& q = g_->posts[size_t(s)];
      if (std::strcmp(q.op, p0.op) != 0)
        return detail::concat(where(p0.op), ": ", name_rank(s), " called ", q.op, " while ",
                              name_rank(0), " called ", p0.op, " (collectives out of order)");
    }
    for (int s = 0; s < n; ++s) {
      const Post& q = g_->posts[size_t(s)];
      if (!q.err.empty()) return detail::concat(where(p0.op), ": ", name_rank(s), ": ", q.err);
    }
    for (int s = 1; s < n; ++s) {
      const std::string e = check(g_->posts[size_t(s)], p0);
      if (!e.empty())
        return detail::concat(where(p0.op), ": arguments differ between ", name_rank(0), " and ", name_rank(s), ": ", e);
    }
    return "";
  }

  // Every rank reached the same verdict `bad` after the entry barrier: one more barrier (peers may
  // still be reading this rank's post), then the same Error on every rank.
  [[noreturn]] void fail_after_sync(const char* op, const std::string& bad) {
    sync(op, false);
    MOELAB_FAIL(bad);
  }

  // The error for a failure recorded in the world (lock held).
  std::string failure_message(const char* op) const {
    const World& w = *g_->world;
    const int me = world_rank();
    const int f = w.failed[size_t(me)] ? me : w.first_failed;
    if (f == me) return detail::concat(where(op), ": this rank was aborted: ", w.reason[size_t(f)]);
    return detail::concat(where(op), ": ", g_->is_world() ? "rank " : "world rank ", f, " failed: ", w.reason[size_t(f)]);
  }

  // Barrier over the group. entry = true: the first barrier of a collective, before any peer
  // reads this rank's buffers; a recorded failure or the timeout ends it with an Error. entry =
  // false: buffers are shared, so the rank waits for its peers without giving up (they only do
  // bounded local work before reaching this barrier).
  void sync(const char* op, bool entry) {
    World& w = *g_->world;
    Group& g = *g_;
    std::unique_lock<std::mutex> lk(w.mu);
    if (entry && w.first_failed >= 0) MOELAB_FAIL(failure_message(op));
    const int64_t my = g.gen;
    g.arrived_gen[size_t(rank_)] = my;
    if (++g.arrived == g.size()) {
      g.arrived = 0;
      ++g.gen;
      lk.unlock();
      w.cv.notify_all();
      return;
    }
    if (!entry) {
      w.cv.wait(lk, [&] { return g.gen != my; });
      return;
    }
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(w.timeout_s));
    while (g.gen == my) {
      if (w.first_failed >= 0) MOELAB_FAIL(failure_message(op));
      if (w.cv.wait_until(lk, deadline) == std::cv_status::timeout && g.gen == my && w.first_failed < 0) {
        std::vector<std::string> missing;
        for (int s = 0; s < g.size(); ++s)
          if (g.arrived_gen[size_t(s)] != my) missing.push_back(name_rank(s));
        std::ostringstream os;
        os << where(op) << ": timed out after " << w.timeout_s << " s; ";
        for (size_t i = 0; i < missing.size(); ++i) os << (i ? ", " : "") << missing[i];
        os << " never arrived";
        const std::string msg = os.str();
        const int me = world_rank();
        if (!w.failed[size_t(me)]) {  // permanent: the peers that arrive later name this rank
          w.failed[size_t(me)] = 1;
          w.reason[size_t(me)] = msg;
          if (w.first_failed < 0) w.first_failed = me;
        }
        lk.unlock();
        w.cv.notify_all();
        MOELAB_FAIL(msg);
      }
    }
  }

  std::shared_ptr<Group> g_;
  int rank_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_simulated_world(int ranks, double timeout_seconds) {
  MOELAB_CHECK(ranks >= 1, "simulated world: ", ranks, " ranks");
  MOELAB_CHECK(timeout_seconds > 0, "simulated world: timeout ", timeout_seconds, " s");
  std::vector<int> wr(static_cast<size_t>(ranks));
  std::iota(wr.begin(), wr.end(), 0);
  auto g = std::make_shared<Group>(std::make_shared<World>(ranks, timeout_seconds), std::move(wr), true);
  std::vector<std::unique_ptr<Communicator>> out;
  for (int r = 0; r < ranks; ++r) out.push_back(std::make_unique<SimComm>(g, r));
  return out;
}

void run_ranks(int ranks, const std::function<void(int rank, Communicator& comm)>& fn, double timeout_seconds) {
  auto comms = make_simulated_world(ranks, timeout_seconds);
  std::vector<std::string> errors(static_cast<size_t>(ranks));
  std::vector<char> failed(size_t(ranks), 0);
  std::vector<std::thread> threads;
  threads.reserve(size_t(ranks));
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
#ifdef MOELAB_WEAK_OMP
      if (omp_set_num_threads) omp_set_num_threads(1);  // per thread: this rank's ICV only
#endif
      Communicator& c = *comms[size_t(r)];
      try {
        fn(r, c);
        return;
      } catch (const std::exception& e) {
        errors[size_t(r)] = e.what();
      } catch (...) {
        errors[size_t(r)] = "unknown exception";
      }
      failed[size_t(r)] = 1;
      c.abort(errors[size_t(r)]);
    });
  for (auto& t : threads) t.join();
  // The root cause: the rank whose failure the world recorded first (its exception, or the reason
  // it gave abort() itself), else the lowest rank that threw.
  const World& w = *static_cast<SimComm&>(*comms[0]).group()->world;
  const int first = w.first_failed;
  if (first >= 0) MOELAB_FAIL("rank ", first, ": ", failed[size_t(first)] ? errors[size_t(first)] : w.reason[size_t(first)]);
  for (int r = 0; r < ranks; ++r)
    if (failed[size_t(r)]) MOELAB_FAIL("rank ", r, ": ", errors[size_t(r)]);
}

}  // namespace moelab
