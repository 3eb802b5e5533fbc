// moelab: the parameter store and the data-parallel gradient reduction.
//
// ParamStore holds the model's parameters as the trainer sees them and puts every gradient in a
// flat buffer, one per (reduction group, dtype): the gradients of replicated parameters
// (attention, norms, embeddings, router, dense and shared FFNs; all-reduced over the world) and
// those of expert parameters (sharded over the ep group; all-reduced over the expert-dp group).
// The model's gradient tensors become views of these buffers, so its backward accumulates
// straight into them: zeroing, scaling and the norm are one call per buffer, and a reduction
// needs no packing copies.
//
// Inside each buffer the gradients lie in buckets in the order the backward pass completes them:
// block layers-1, ..., block 0, then the rest (embedding, final norm, head). GradientReducer
// starts a bucket's reduction as soon as the backward pass has finished its block
// (TransformerLM::backward's block_done), so the reduction of block l runs on the network while
// block l-1 computes (PyTorch DDP's bucketed overlap, with a block as the bucket).
#pragma once
#include <array>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/comm.h"
#include "core/moe/moe_layer.h"

namespace moelab {

class TransformerLM;

enum class GradGroup { Replicated = 0, Expert = 1 };

// The reduction group of a parameter, by name (experts live under ".moe.experts.").
GradGroup grad_group_of(const std::string& param_name);

class ParamStore {
 public:
  // Rebinds every gradient of `model` into the flat buffers (zeroed). The model must outlive
  // the store; its parameter set must not change afterwards.
  ParamStore(Backend& backend, TransformerLM& model);

  std::vector<ParamRef>& params() { return params_; }
  GradGroup group(size_t i) const { return groups_[i]; }

  // Zeroes every gradient. The routed experts' gradients are zeroed lazily: their next backward
  // writes them instead of adding (SwiGLUExperts::defer_grad_zero), which saves a fill of most of
  // an MoE model's gradient memory and the GEMMs' reads of it. The store's own readers (scale,
  // sum of squares, the reducer) settle a zero that no backward has taken up yet.
  void zero_grads();
  // Zero-fills the gradients whose deferred zero no backward has taken up (after zero_grads()
  // without a backward): call before reading gradients other than through the store.
  void settle() const;
  void scale_grads(double s);
  // Sum of squares of the gradients of one group (this rank's).
  double sum_squares(GradGroup g) const;

  // The flat views of bucket `block` (0 .. layers-1, or -1 for the rest) in group g, one per
  // dtype that has gradients there (empty when none).
  const std::vector<Tensor>& bucket(GradGroup g, int block) const;
  int layers() const { return layers_; }
  // Every flat buffer (all groups and dtypes).
  const std::vector<Tensor>& buffers() const { return buffers_; }

 private:
  Backend& b_;
  int layers_ = 0;
  std::vector<ParamRef> params_;
  std::vector<GradGroup> groups_;
  std::vector<Tensor> buffers_;
  std::vector<GradGroup> buffer_groups_;
  // buckets_[group][block + 1]: views, one per dtype.
  std::array<std::vector<std::vector<Tensor>>, 2> buckets_;
  // The routed experts whose gradients zero_grads() defers: every MoE layer's, when they are
  // exactly the expert group's gradients (empty otherwise: the expert buffers are filled).
  std::vector<SwiGLUExperts*> deferred_;
};

// Sums the gradients of a ParamStore over the data-parallel ranks, overlapping the backward
// pass: call block_done(i) when the last micro-batch's backward completes block i (the model's
// backward hook), then finish() after it returns. Replicated gradients are reduced over
// `replicated` (the world), expert gradients over `experts` (the expert-dp group; null when it
// has one rank). Results are those of one all_reduce per buffer, whatever the overlap: each
// element is reduced once, by the same deterministic sum.
class GradientReducer {
 public:
  GradientReducer(ParamStore& store, Communicator* replicated, Communicator* experts)
      : store_(store), comm_{replicated, experts}, started_(size_t(store.layers()), false) {}
  void block_done(int block);
  // Starts the blocks not reported done (all of them after a backward without the hook), then
  // the rest (embedding, final norm, head), and waits for every started reduction. `compute`
  // (the backend whose work the gradients come from) is synchronised first, so that
  // wait_seconds() counts only communication.
  void finish(Backend& compute);
  // Seconds spent in finish() waiting for the reductions after the compute was done (the part
  // of the communication that the overlap did not hide), summed over calls.
  double wait_seconds() const { return wait_seconds_; }

 private:
  void start(int block);
  ParamStore& store_;
  std::array<Communicator*, 2> comm_;
  std::vector<bool> started_;  // per block, this step
  double wait_seconds_ = 0;
};

}  // namespace moelab
