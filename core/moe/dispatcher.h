// moelab: the token dispatcher (Megatron-Core's split): bring every kept assignment's token row
// to the rank that owns its expert, and bring the expert outputs back. The combine (un-permute,
// weight by the gate, sum) always happens on the source rank, in MoELayer.
//
//   forward:  x --dispatch--> expert input rows --experts--> expert output rows --gather_back-->
//             rows in send order --combine (MoELayer)--> y
//   backward: the same steps reversed (gather_back_backward, experts backward, dispatch_backward).
//
// LocalDispatcher keeps all experts on this backend (the exchanges are identities).
// AllToAllDispatcher shards the experts over the ranks of an expert-parallel communicator:
// rank r owns experts [r E/ep, (r+1) E/ep), and token rows travel by a variable all-to-all.
// Activation gradients overwrite.
#pragma once
#include <vector>

#include "core/backend.h"

namespace moelab {

class Communicator;

// The layout of one dispatch.
//   send: this rank's kept assignments grouped by (global) expert; since experts are sharded
//         contiguously, the rows for rank r are one block (send_rows[r] rows, in rank order).
//   receive: the rows this rank's experts compute come from every source rank, recv_rows[s]
//         from rank s (each block expert-sorted); regroup reorders them expert-major, and
//         expert_offsets [E_local + 1] delimit each local expert's rows in that order.
struct DispatchLayout {
  DispatchPlan send;
  std::vector<int64_t> send_rows, recv_rows;  // [ep]
  DispatchPlan regroup;                       // row_token[j] = received row of expert row j
                                              // (undefined for the local dispatcher)
  std::vector<int64_t> expert_offsets;        // [E_local + 1]
  std::vector<int64_t> count_matrix;          // [ep * E] kept rows per (source rank, expert)
};

class Dispatcher {
 public:
  virtual ~Dispatcher() = default;
  // Collective for all-to-all dispatchers. pad_capacity > 0 pads every expert to that many rows.
  virtual DispatchLayout plan(const Tensor& idx, const Tensor& keep, bool expert_choice,
                              int64_t pad_capacity) = 0;
  // x [T,D] -> the expert input rows [R_in, D] (layout.expert_offsets).
  virtual Tensor dispatch(const Tensor& x, const DispatchLayout& layout) = 0;
  // Expert output rows [R_in, D] -> rows in send order [layout.send.rows(), D].
  virtual Tensor gather_back(const Tensor& ye, const DispatchLayout& layout) = 0;
  // Backward of gather_back: d(send-order rows) -> d(expert output rows).
  virtual Tensor gather_back_backward(const Tensor& dys, const DispatchLayout& layout) = 0;
  // Backward of dispatch: d(expert input rows) -> dx [T,D].
  virtual void dispatch_backward(const Tensor& dxe, const DispatchLayout& layout,
                                 const Tensor& dx) = 0;
  virtual int64_t local_experts() const = 0;
  virtual int64_t first_expert() const = 0;  // global index of this rank's first expert
};

class LocalDispatcher final : public Dispatcher {
 public:
  LocalDispatcher(Backend& backend, int64_t experts) : b_(backend), experts_(experts) {}
  DispatchLayout plan(const Tensor& idx, const Tensor& keep, bool expert_choice,
                      int64_t pad_capacity) override;
  Tensor dispatch(const Tensor& x, const DispatchLayout& layout) override;
  Tensor gather_back(const Tensor& ye, const DispatchLayout&) override { return ye; }
  Tensor gather_back_backward(const Tensor& dys, const DispatchLayout&) override { return dys; }
  void dispatch_backward(const Tensor& dxe, const DispatchLayout& layout, const Tensor& dx) override;
  int64_t local_experts() const override { return experts_; }
  int64_t first_expert() const override { return 0; }

 private:
  Backend& b_;
  int64_t experts_;
};

// Expert parallelism over `ep` (its size divides the expert count). Bytes moved per call are
// recorded for the run log (sent_bytes/received_bytes, forward and backward together).
class AllToAllDispatcher final : public Dispatcher {
 public:
  AllToAllDispatcher(Backend& backend, Communicator& ep, int64_t experts);
  DispatchLayout plan(const Tensor& idx, const Tensor& keep, bool expert_choice,
                      int64_t pad_capacity) override;
  Tensor dispatch(const Tensor& x, const DispatchLayout& layout) override;
  Tensor gather_back(const Tensor& ye, const DispatchLayout& layout) override;
  Tensor gather_back_backward(const Tensor& dys, const DispatchLayout& layout) override;
  void dispatch_backward(const Tensor& dxe, const DispatchLayout& layout, const Tensor& dx) override;
  int64_t local_experts() const override { return local_; }
  int64_t first_expert() const override;

  // Totals since construction (callers take differences per step).
  int64_t sent_bytes() const { return sent_bytes_; }
  int64_t received_bytes() const { return received_bytes_; }
  // Wall seconds inside the all-to-all calls (waiting for peers included); with
  // time_with_sync, the backend is synchronised before and after each call, so that on a GPU
  // the figure is the exchange's and not the launch's (it costs two synchronisations a call).
  double comm_seconds() const { return comm_seconds_; }
  void time_with_sync(bool on) { sync_ = on; }

 private:
  // rows [sum send_rows] of `send` -> a new [sum recv_rows, D] tensor (and counts the bytes).
  Tensor exchange(const Tensor& send, const std::vector<int64_t>& send_rows,
                  const std::vector<int64_t>& recv_rows);
  Backend& b_;
  Communicator& ep_;
  int64_t experts_, local_;
  int64_t sent_bytes_ = 0, received_bytes_ = 0;
  double comm_seconds_ = 0;
  bool sync_ = false;
};

}  // namespace moelab
