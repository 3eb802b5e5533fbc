// moelab: dispatchers (see dispatcher.h).
#include "core/moe/dispatcher.h"

#include <chrono>
#include <numeric>

#include "core/comm.h"

namespace moelab {

// ---- local --------------------------------------------------------------------------------

DispatchLayout LocalDispatcher::plan(const Tensor& idx, const Tensor& keep, bool expert_choice,
                                     int64_t pad_capacity) {
  DispatchLayout l;
  l.send = b_.dispatch_plan(idx, keep, expert_choice, experts_, pad_capacity);
  l.send_rows = l.recv_rows = {l.send.rows()};
  l.expert_offsets = l.send.offsets;
  for (int64_t e = 0; e < experts_; ++e) l.count_matrix.push_back(l.send.offsets[e + 1] - l.send.offsets[e]);
  return l;
}

Tensor LocalDispatcher::dispatch(const Tensor& x, const DispatchLayout& l) {
  Tensor xp = b_.empty(Shape{l.send.rows(), x.dim(1)}, x.dtype());
  b_.permute_forward(x, l.send, xp);
  return xp;
}

void LocalDispatcher::dispatch_backward(const Tensor& dxe, const DispatchLayout& l, const Tensor& dx) {
  b_.permute_backward(dxe, l.send, dx);
}

// ---- all-to-all (expert parallelism) -----------------------------------------------------------

AllToAllDispatcher::AllToAllDispatcher(Backend& backend, Communicator& ep, int64_t experts)
    : b_(backend), ep_(ep), experts_(experts), local_(experts / ep.size()) {
  MOELAB_CHECK(experts % ep.size() == 0, "expert parallelism: ", experts, " experts do not split over ",
               ep.size(), " ranks (model.experts must be divisible by parallel.ep)");
}

int64_t AllToAllDispatcher::first_expert() const { return int64_t(ep_.rank()) * local_; }

DispatchLayout AllToAllDispatcher::plan(const Tensor& idx, const Tensor& keep, bool expert_choice,
                                        int64_t pad_capacity) {
  const int ep = ep_.size(), me = ep_.rank();
  DispatchLayout l;
  l.send = b_.dispatch_plan(idx, keep, expert_choice, experts_, pad_capacity);
  std::vector<int64_t> mine(static_cast<size_t>(experts_), 0);
  for (int64_t e = 0; e < experts_; ++e) mine[e] = l.send.offsets[e + 1] - l.send.offsets[e];
  // Every rank learns every rank's per-expert counts: the send and receive layouts, and the
  // all-to-all volumes the run log records, follow from this one [ep, E] matrix.
  l.count_matrix = ep_.all_gather_host(mine);
  auto count = [&](int src, int64_t e) { return l.count_matrix[size_t(src) * experts_ + e]; };
  l.send_rows.assign(size_t(ep), 0);
  l.recv_rows.assign(size_t(ep), 0);
  for (int r = 0; r < ep; ++r)
    for (int64_t j = 0; j < local_; ++j) {
      l.send_rows[r] += count(me, r * local_ + j);
      l.recv_rows[r] += count(r, me * local_ + j);
    }
  // Received rows are source-major (each source's block expert-sorted); the experts want them
  // expert-major. row_token[j] = received row of the j-th expert-major row.
  std::vector<int64_t> block_start(size_t(ep), 0);
  for (int s = 1; s < ep; ++s) block_start[s] = block_start[s - 1] + l.recv_rows[s - 1];
  const int64_t R = std::accumulate(l.recv_rows.begin(), l.recv_rows.end(), int64_t(0));
  std::vector<double> order;
  order.reserve(size_t(R));
  l.expert_offsets.assign(size_t(local_ + 1), 0);
  for (int64_t j = 0; j < local_; ++j) {
    for (int s = 0; s < ep; ++s) {
      int64_t at = block_start[s];
      for (int64_t jj = 0; jj < j; ++jj) at += count(s, me * local_ + jj);
      for (int64_t i = 0; i < count(s, me * local_ + j); ++i) order.push_back(double(at + i));
    }
    l.expert_offsets[j + 1] = int64_t(order.size());
  }
  l.regroup.row_token = b_.from_host(host_tensor(order, Shape{R}, DType::I32));
  l.regroup.row_assign = l.regroup.row_token;
  l.regroup.offsets = {0, R};
  return l;
}

Tensor AllToAllDispatcher::exchange(const Tensor& send, const std::vector<int64_t>& send_rows,
                                    const std::vector<int64_t>& recv_rows) {
  const int64_t D = send.dim(1);
  const int64_t R = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t(0));
  Tensor recv = b_.empty(Shape{R, D}, send.dtype());
  if (sync_) b_.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  ep_.all_to_all_v(send, send_rows, recv, recv_rows);
  if (sync_) b_.synchronize();
  comm_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int64_t row_bytes = D * int64_t(dtype_size(send.dtype()));
  for (int r = 0; r < ep_.size(); ++r) {
    if (r == ep_.rank()) continue;  // rows a rank keeps do not cross a link
    sent_bytes_ += send_rows[r] * row_bytes;
    received_bytes_ += recv_rows[r] * row_bytes;
  }
  return recv;
}

Tensor AllToAllDispatcher::dispatch(const Tensor& x, const DispatchLayout& l) {
  Tensor xs = b_.empty(Shape{l.send.rows(), x.dim(1)}, x.dtype());
  b_.permute_forward(x, l.send, xs);
  Tensor xr = exchange(xs, l.send_rows, l.recv_rows);
  Tensor xe = b_.empty(xr.shape(), xr.dtype());
  b_.permute_forward(xr, l.regroup, xe);
  return xe;
}

Tensor AllToAllDispatcher::gather_back(const Tensor& ye, const DispatchLayout& l) {
  Tensor yr = b_.empty(ye.shape(), ye.dtype());
  b_.permute_backward(ye, l.regroup, yr);  // a permutation: the scatter is its inverse
  return exchange(yr, l.recv_rows, l.send_rows);
}

Tensor AllToAllDispatcher::gather_back_backward(const Tensor& dys, const DispatchLayout& l) {
  Tensor dyr = exchange(dys, l.send_rows, l.recv_rows);
  Tensor dye = b_.empty(dyr.shape(), dyr.dtype());
  b_.permute_forward(dyr, l.regroup, dye);
  return dye;
}

void AllToAllDispatcher::dispatch_backward(const Tensor& dxe, const DispatchLayout& l, const Tensor& dx) {
  Tensor dxr = b_.empty(dxe.shape(), dxe.dtype());
  b_.permute_backward(dxe, l.regroup, dxr);
  Tensor dxs = exchange(dxr, l.recv_rows, l.send_rows);
  b_.permute_backward(dxs, l.send, dx);
}

}  // namespace moelab
