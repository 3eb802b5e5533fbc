// moelab: the checked entry of every Backend op: shapes, dtypes, devices, then the backend impl.
// A failed check throws moelab::Error naming the op and the offending tensor; an op the backend
// does not implement throws NotSupported.
#include "core/backend.h"

#include <algorithm>
#include <chrono>
#include <functional>
#include <limits>
#include <thread>
#include <vector>

#include "core/rng.h"

namespace moelab {

std::shared_ptr<void> Backend::timing_mark() {
  return std::make_shared<std::chrono::steady_clock::time_point>(std::chrono::steady_clock::now());
}

double Backend::elapsed_ms(const std::shared_ptr<void>& a, const std::shared_ptr<void>& b) {
  using TP = std::chrono::steady_clock::time_point;
  return std::chrono::duration<double, std::milli>(*static_cast<TP*>(b.get()) - *static_cast<TP*>(a.get())).count();
}

const char* to_string(Op op) {
  static const char* names[] = {
      "fill", "copy", "cast", "axpy", "transpose",
      "gemm", "grouped_gemm", "grouped_gemm_wgrad",
      "swiglu_forward", "swiglu_backward",
      "softmax_forward", "softmax_backward",
      "sigmoid_forward", "sigmoid_backward",
      "softplus_forward", "softplus_backward",
      "row_normalize_forward", "row_normalize_backward",
      "row_scale_forward", "row_scale_backward",
      "dropout_forward", "dropout_backward",
      "jitter_forward", "jitter_backward",
      "noisy_logits_forward", "noisy_logits_backward",
      "topk", "balanced_assign", "gates_forward", "gates_backward", "random_top2_mask", "capacity_mask", "sinkhorn",
      "expert_choice",
      "dispatch_plan", "permute_forward", "permute_backward", "unpermute_forward",
      "unpermute_backward",
      "aux_loss_forward", "aux_loss_backward", "z_loss_forward", "z_loss_backward",
      "cv2_loss_forward", "cv2_loss_backward", "load_loss_forward", "load_loss_backward",
      "router_stats", "router_logits", "router_input_grads", "router_logits_backward",
      "scale", "sum_squares", "embedding_forward", "embedding_backward", "rmsnorm_forward",
      "rmsnorm_backward", "rope_forward", "rope_backward", "attention_forward",
      "attention_backward", "cross_entropy_forward", "cross_entropy_backward", "adamw"};
  static_assert(sizeof(names) / sizeof(names[0]) == size_t(Op::kCount), "Op names out of sync");
  return names[size_t(op)];
}

namespace {

// Shape/dtype/device checks shared by the op entries. `what` names the op and the argument.
struct Checker {
  const Backend& b;
  Op op;
  void on_device(const Tensor& t, const char* arg) const {
    MOELAB_CHECK(t.defined(), to_string(op), ": ", arg, " is undefined");
    MOELAB_CHECK(t.device() == b.device(), to_string(op), ": ", arg, " is on ",
                 to_string(t.device()), ", backend ", b.name(), " is on ", to_string(b.device()));
  }
  void shape(const Tensor& t, const char* arg, Shape want) const {
    on_device(t, arg);
    MOELAB_CHECK(t.shape() == want, to_string(op), ": ", arg, " has shape ", t.shape().str(),
                 ", expected ", want.str());
  }
  void same(const Tensor& a, const char* an, const Tensor& t, const char* arg) const {
    shape(t, arg, a.shape());
    MOELAB_CHECK(t.dtype() == a.dtype(), to_string(op), ": ", arg, " is ", to_string(t.dtype()),
                 ", ", an, " is ", to_string(a.dtype()));
  }
  void rank(const Tensor& t, const char* arg, int r) const {
    on_device(t, arg);
    MOELAB_CHECK(t.ndim() == r, to_string(op), ": ", arg, " must be ", r, "-D, got ",
                 t.shape().str());
  }
  void dtype(const Tensor& t, const char* arg, DType dt) const {
    MOELAB_CHECK(t.dtype() == dt, to_string(op), ": ", arg, " must be ", to_string(dt), ", got ",
                 to_string(t.dtype()));
  }
  void floating(const Tensor& t, const char* arg) const {
    MOELAB_CHECK(is_float(t.dtype()), to_string(op), ": ", arg, " must be floating point");
  }
  void offsets(const std::vector<int64_t>& off, int64_t experts, int64_t rows) const {
    MOELAB_CHECK(int64_t(off.size()) == experts + 1, to_string(op), ": offsets has ", off.size(),
                 " entries, expected experts + 1 = ", experts + 1);
    MOELAB_CHECK(off.front() == 0 && off.back() == rows, to_string(op),
                 ": offsets must run from 0 to the row count ", rows);
    for (size_t e = 1; e < off.size(); ++e)
      MOELAB_CHECK(off[e] >= off[e - 1], to_string(op), ": offsets decrease at expert ", e - 1);
  }
  void plan(const DispatchPlan& p) const {
    shape(p.row_token, "plan.row_token", Shape{p.rows()});
    shape(p.row_assign, "plan.row_assign", Shape{p.rows()});
  }
  void topk_pair(const Tensor& scores, const Tensor& idx) const {
    rank(scores, "scores", 2);
    floating(scores, "scores");
    rank(idx, "idx", 2);
    dtype(idx, "idx", DType::I32);
    MOELAB_CHECK(idx.dim(0) == scores.dim(0), to_string(op), ": idx has ", idx.dim(0),
                 " rows, scores ", scores.dim(0));
    MOELAB_CHECK(idx.dim(1) >= 1 && idx.dim(1) <= scores.dim(1), to_string(op), ": k = ",
                 idx.dim(1), " must be in [1, experts = ", scores.dim(1), "]");
  }
};

}  // namespace

void Backend::require(Op op, DType dtype) const {
  if (!supports(op, dtype))
    throw NotSupported(std::string(to_string(op)) + " (" + to_string(dtype) +
                       ") is not supported by backend " + name());
}

// ---- memory --------------------------------------------------------------------------------

Tensor Backend::empty(Shape shape, DType dtype) {
  const size_t bytes = size_t(shape.numel()) * dtype_size(dtype);
  void* p = alloc_bytes(bytes ? bytes : 1);
  std::shared_ptr<void> storage(p, [this](void* q) { free_bytes(q); });
  return Tensor(std::move(storage), p, shape, dtype, device());
}

Tensor Backend::zeros(Shape shape, DType dtype) {
  Tensor t = empty(shape, dtype);
  fill(t, 0.0);
  return t;
}

void Backend::copy(const Tensor& src, const Tensor& dst) {
  MOELAB_CHECK(src.dtype() == dst.dtype() && src.numel() == dst.numel(), "copy: ",
               src.describe(), " -> ", dst.describe(), " needs the same dtype and numel");
  const bool s_dev = src.device() != Device::CPU, d_dev = dst.device() != Device::CPU;
  MOELAB_CHECK((!s_dev || src.device() == device()) && (!d_dev || dst.device() == device()),
               "copy: a tensor is on a device other than backend ", name(), "'s");
  copy_bytes(dst.data(), d_dev, src.data(), s_dev, src.nbytes());
}

Tensor Backend::to_host(const Tensor& src) {
  auto bytes = src.nbytes();
  std::shared_ptr<char[]> buf(new char[bytes ? bytes : 1]);
  Tensor t(std::static_pointer_cast<void>(std::shared_ptr<char>(buf, buf.get())), buf.get(),
           src.shape(), src.dtype(), Device::CPU);
  copy(src, t);
  return t;
}

Tensor Backend::from_host(const Tensor& host_src) {
  MOELAB_CHECK(host_src.device() == Device::CPU, "from_host: source is on ",
               to_string(host_src.device()));
  Tensor t = empty(host_src.shape(), host_src.dtype());
  copy(host_src, t);
  return t;
}

// ---- elementwise and GEMM ------------------------------------------------------------------

void Backend::fill(const Tensor& x, double value) {
  Checker c{*this, Op::Fill};
  c.on_device(x, "x");
  require(Op::Fill, x.dtype());
  fill_impl(x, value);
}

void Backend::fill_normal(const Tensor& x, double std, uint64_t stream, uint64_t first) {
  Checker c{*this, Op::Fill};
  c.on_device(x, "x");
  MOELAB_CHECK(is_float(x.dtype()), "fill_normal: ", x.describe(), " is not a floating tensor");
  require(Op::Fill, x.dtype());
  if (x.numel() > 0) fill_normal_impl(x, std, stream, first);
}

void Backend::fill_normal_impl(const Tensor& x, double std, uint64_t stream, uint64_t first) {
  const int64_t n = x.numel();
  const Tensor flat = x.reshape(Shape{n});
  // Chunks of 8M elements; worker threads draw and convert (as host_tensor does: double -> float
  // -> bf16) chunk k+1 into one host buffer while this thread copies chunk k from the other to
  // the backend (which is used from this thread only). A 7B-class expert tensor never exists in
  // double on the host.
  constexpr int64_t kChunk = int64_t(1) << 23;
  const int threads = int(std::max(1u, std::min(32u, std::thread::hardware_concurrency())));
  const DType dt = x.dtype();
  Tensor h[2] = {host_empty(Shape{std::min(kChunk, n)}, dt), host_empty(Shape{std::min(kChunk, n)}, dt)};
  auto draw = [&](const Tensor& buf, int64_t at, int64_t lo, int64_t hi) {
    auto value = [&](int64_t i) { return std * rng::normal(stream, first + uint64_t(at + i)); };
    switch (dt) {
      case DType::F64: for (int64_t i = lo; i < hi; ++i) buf.ptr<double>()[i] = value(i); break;
      case DType::F32: for (int64_t i = lo; i < hi; ++i) buf.ptr<float>()[i] = float(value(i)); break;
      case DType::BF16: for (int64_t i = lo; i < hi; ++i) buf.ptr<bf16>()[i] = bf16::from_float(float(value(i))); break;
      case DType::I32: break;  // refused by fill_normal
    }
  };
  // Starts drawing chunk `at` into buf on the workers (or draws it here when small).
  auto start = [&](const Tensor& buf, int64_t at, std::vector<std::thread>& pool) {
    const int64_t len = std::min(kChunk, n - at);
    const int parts = len >= (int64_t(1) << 16) ? threads : 1;
    if (parts == 1) return draw(buf, at, 0, len);
    for (int t = 0; t < parts; ++t) pool.emplace_back(draw, std::cref(buf), at, len * t / parts, len * (t + 1) / parts);
  };
  std::vector<std::thread> pool;
  start(h[0], 0, pool);
  for (int64_t at = 0, k = 0; at < n; at += kChunk, ++k) {
    for (std::thread& th : pool) th.join();
    pool.clear();
    const Tensor& cur = h[k % 2];
    if (at + kChunk < n) start(h[(k + 1) % 2], at + kChunk, pool);
    const int64_t len = std::min(kChunk, n - at);
    try {
      copy(len == cur.numel() ? cur : cur.view_rows(0, len), flat.view_rows(at, at + len));
    } catch (...) {
      for (std::thread& th : pool) th.join();
      throw;
    }
  }
}

Tensor Backend::as_dtype(const Tensor& src, DType dt) {
  if (src.dtype() == dt) return src;
  Tensor out = empty(src.shape(), dt);
  cast(src, out);
  return out;
}

void Backend::cast(const Tensor& src, const Tensor& dst) {
  Checker c{*this, Op::Cast};
  c.on_device(src, "src");
  c.shape(dst, "dst", src.shape());
  require(Op::Cast, src.dtype());
  require(Op::Cast, dst.dtype());
  cast_impl(src, dst);
}

void Backend::axpy(double alpha, const Tensor& x, const Tensor& y) {
  Checker c{*this, Op::Axpy};
  c.on_device(x, "x");
  c.floating(x, "x");
  c.same(x, "x", y, "y");
  require(Op::Axpy, x.dtype());
  axpy_impl(alpha, x, y);
}

void Backend::transpose(const Tensor& x, const Tensor& y) {
  Checker c{*this, Op::Transpose};
  c.rank(x, "x", 2);
  c.floating(x, "x");
  c.shape(y, "y", Shape{x.dim(1), x.dim(0)});
  c.dtype(y, "y", x.dtype());
  require(Op::Transpose, x.dtype());
  transpose_impl(x, y);
}

void Backend::gemm(bool ta, bool tb, double alpha, const Tensor& a, const Tensor& b,
                   double beta, const Tensor& c_) {
  Checker c{*this, Op::Gemm};
  c.rank(a, "A", 2);
  c.rank(b, "B", 2);
  c.rank(c_, "C", 2);
  c.floating(a, "A");
  c.dtype(b, "B", a.dtype());
  c.dtype(c_, "C", a.dtype());
  const int64_t m = ta ? a.dim(1) : a.dim(0), ka = ta ? a.dim(0) : a.dim(1);
  const int64_t kb = tb ? b.dim(1) : b.dim(0), n = tb ? b.dim(0) : b.dim(1);
  MOELAB_CHECK(ka == kb, "gemm: inner dimensions differ: op(A) is [", m, ", ", ka, "], op(B) is [",
               kb, ", ", n, "]");
  c.shape(c_, "C", Shape{m, n});
  require(Op::Gemm, a.dtype());
  gemm_impl(ta, tb, alpha, a, b, beta, c_);
}

void Backend::router_logits(const Tensor& x, const Tensor& w, const Tensor& out) {
  Checker c{*this, Op::RouterLogits};
  c.rank(x, "x", 2);
  c.rank(w, "w", 2);
  c.floating(x, "x");
  c.floating(w, "w");
  MOELAB_CHECK(x.dim(1) == w.dim(0), "router_logits: x is ", x.describe(), ", w ", w.describe(),
               ": inner dimensions differ");
  c.shape(out, "out", Shape{x.dim(0), w.dim(1)});
  c.dtype(out, "out", w.dtype());
  require(Op::RouterLogits, w.dtype());
  router_logits_impl(x, w, out);
}

void Backend::router_input_grads(const Tensor& x, const Tensor& dlogits, const Tensor& w, const Tensor& dw,
                                 const Tensor& dx) {
  Checker c{*this, Op::RouterInputGrads};
  c.rank(x, "x", 2);
  c.floating(x, "x");
  c.rank(w, "w", 2);
  c.floating(w, "w");
  MOELAB_CHECK(x.dim(1) == w.dim(0), "router_input_grads: x is ", x.describe(), ", w ", w.describe(),
               ": inner dimensions differ");
  c.shape(dlogits, "dlogits", Shape{x.dim(0), w.dim(1)});
  c.dtype(dlogits, "dlogits", w.dtype());
  c.shape(dw, "dw", w.shape());
  c.dtype(dw, "dw", w.dtype());
  c.shape(dx, "dx", x.shape());
  c.dtype(dx, "dx", x.dtype());
  require(Op::RouterInputGrads, w.dtype());
  router_input_grads_impl(x, dlogits, w, dw, dx);
}

void Backend::router_logits_impl(const Tensor& x, const Tensor& w, const Tensor& out) {
  gemm(false, false, 1.0, as_dtype(x, w.dtype()), w, 0.0, out);
}

void Backend::router_input_grads_impl(const Tensor& x, const Tensor& dlogits, const Tensor& w,
                                      const Tensor& dw, const Tensor& dx) {
  gemm(true, false, 1.0, as_dtype(x, w.dtype()), dlogits, 1.0, dw);
  Tensor dxr = empty(dx.shape(), w.dtype());
  gemm(false, true, 1.0, dlogits, w, 0.0, dxr);
  axpy(1.0, as_dtype(dxr, dx.dtype()), dx);
}

void Backend::grouped_gemm(const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets,
                           const Tensor& y, bool trans_w, double beta) {
  Checker c{*this, Op::GroupedGemm};
  c.rank(x, "X", 2);
  c.rank(w, "W", 3);
  c.floating(x, "X");
  c.dtype(w, "W", x.dtype());
  const int64_t kin = trans_w ? w.dim(2) : w.dim(1), n = trans_w ? w.dim(1) : w.dim(2);
  MOELAB_CHECK(x.dim(1) == kin, "grouped_gemm: X has ", x.dim(1), " columns, op(W[e]) has ", kin,
               " rows");
  c.offsets(offsets, w.dim(0), x.dim(0));
  c.shape(y, "Y", Shape{x.dim(0), n});
  c.dtype(y, "Y", x.dtype());
  require(Op::GroupedGemm, x.dtype());
  grouped_gemm_impl(x, w, offsets, y, trans_w, beta);
}

void Backend::grouped_gemm_wgrad(const Tensor& x, const Tensor& dy,
                                 const std::vector<int64_t>& offsets, const Tensor& dw,
                                 double beta) {
  Checker c{*this, Op::GroupedGemmWgrad};
  c.rank(x, "X", 2);
  c.rank(dy, "dY", 2);
  c.rank(dw, "dW", 3);
  c.floating(x, "X");
  c.dtype(dy, "dY", x.dtype());
  c.dtype(dw, "dW", x.dtype());
  MOELAB_CHECK(dy.dim(0) == x.dim(0), "grouped_gemm_wgrad: X has ", x.dim(0), " rows, dY ",
               dy.dim(0));
  c.shape(dw, "dW", Shape{dw.dim(0), x.dim(1), dy.dim(1)});
  c.offsets(offsets, dw.dim(0), x.dim(0));
  require(Op::GroupedGemmWgrad, x.dtype());
  grouped_gemm_wgrad_impl(x, dy, offsets, dw, beta);
}

void Backend::swiglu_forward(const Tensor& ab, const Tensor& h) {
  Checker c{*this, Op::SwigluForward};
  c.rank(ab, "AB", 2);
  c.floating(ab, "AB");
  MOELAB_CHECK(ab.dim(1) % 2 == 0, "swiglu_forward: AB width ", ab.dim(1), " is odd");
  c.shape(h, "H", Shape{ab.dim(0), ab.dim(1) / 2});
  c.dtype(h, "H", ab.dtype());
  require(Op::SwigluForward, ab.dtype());
  swiglu_forward_impl(ab, h);
}

void Backend::swiglu_backward(const Tensor& ab, const Tensor& dh, const Tensor& dab) {
  Checker c{*this, Op::SwigluBackward};
  c.rank(ab, "AB", 2);
  c.floating(ab, "AB");
  MOELAB_CHECK(ab.dim(1) % 2 == 0, "swiglu_backward: AB width ", ab.dim(1), " is odd");
  c.shape(dh, "dH", Shape{ab.dim(0), ab.dim(1) / 2});
  c.dtype(dh, "dH", ab.dtype());
  c.same(ab, "AB", dab, "dAB");
  require(Op::SwigluBackward, ab.dtype());
  swiglu_backward_impl(ab, dh, dab);
}

#define MOELAB_UNARY_ENTRY(OP, fn, in, out)                         \
  void Backend::fn(const Tensor& in, const Tensor& out) {           \
    Checker c{*this, Op::OP};                                       \
    c.on_device(in, #in);                                           \
    c.floating(in, #in);                                            \
    c.same(in, #in, out, #out);                                     \
    require(Op::OP, in.dtype());                                    \
    fn##_impl(in, out);                                             \
  }
#define MOELAB_BINARY_ENTRY(OP, fn, a, b, out)                      \
  void Backend::fn(const Tensor& a, const Tensor& b, const Tensor& out) { \
    Checker c{*this, Op::OP};                                       \
    c.on_device(a, #a);                                             \
    c.floating(a, #a);                                              \
    c.same(a, #a, b, #b);                                           \
    c.same(a, #a, out, #out);                                       \
    require(Op::OP, a.dtype());                                     \
    fn##_impl(a, b, out);                                           \
  }

MOELAB_UNARY_ENTRY(SigmoidForward, sigmoid_forward, x, y)
MOELAB_BINARY_ENTRY(SigmoidBackward, sigmoid_backward, y, dy, dx)
MOELAB_UNARY_ENTRY(SoftplusForward, softplus_forward, x, y)
MOELAB_BINARY_ENTRY(SoftplusBackward, softplus_backward, x, dy, dx)

void Backend::softmax_forward(const Tensor& l, const Tensor& p) {
  Checker c{*this, Op::SoftmaxForward};
  c.rank(l, "logits", 2);
  c.floating(l, "logits");
  c.same(l, "logits", p, "probs");
  require(Op::SoftmaxForward, l.dtype());
  softmax_forward_impl(l, p);
}

void Backend::softmax_backward(const Tensor& p, const Tensor& dp, const Tensor& dl) {
  Checker c{*this, Op::SoftmaxBackward};
  c.rank(p, "probs", 2);
  c.floating(p, "probs");
  c.same(p, "probs", dp, "dprobs");
  c.same(p, "probs", dl, "dlogits");
  require(Op::SoftmaxBackward, p.dtype());
  softmax_backward_impl(p, dp, dl);
}

void Backend::row_normalize_forward(const Tensor& x, const Tensor& y) {
  Checker c{*this, Op::RowNormalizeForward};
  c.rank(x, "x", 2);
  c.floating(x, "x");
  c.same(x, "x", y, "y");
  require(Op::RowNormalizeForward, x.dtype());
  row_normalize_forward_impl(x, y);
}

void Backend::row_normalize_backward(const Tensor& x, const Tensor& dy, const Tensor& dx) {
  Checker c{*this, Op::RowNormalizeBackward};
  c.rank(x, "x", 2);
  c.floating(x, "x");
  c.same(x, "x", dy, "dy");
  c.same(x, "x", dx, "dx");
  require(Op::RowNormalizeBackward, x.dtype());
  row_normalize_backward_impl(x, dy, dx);
}

void Backend::row_scale_forward(const Tensor& s, const Tensor& x, const Tensor& y) {
  Checker c{*this, Op::RowScaleForward};
  c.rank(x, "x", 2);
  c.floating(x, "x");
  c.on_device(s, "s");
  c.dtype(s, "s", x.dtype());
  MOELAB_CHECK(s.numel() == x.dim(0), "row_scale_forward: s has ", s.numel(), " entries, x has ",
               x.dim(0), " rows");
  c.same(x, "x", y, "y");
  require(Op::RowScaleForward, x.dtype());
  row_scale_forward_impl(s, x, y);
}

void Backend::row_scale_backward(const Tensor& s, const Tensor& x, const Tensor& dy,
                                 const Tensor& ds, const Tensor& dx) {
  Checker c{*this, Op::RowScaleBackward};
  c.rank(x, "x", 2);
  c.floating(x, "x");
  c.on_device(s, "s");
  c.dtype(s, "s", x.dtype());
  MOELAB_CHECK(s.numel() == x.dim(0), "row_scale_backward: s has ", s.numel(),
               " entries, x has ", x.dim(0), " rows");
  c.same(s, "s", ds, "ds");
  c.same(x, "x", dy, "dy");
  c.same(x, "x", dx, "dx");
  require(Op::RowScaleBackward, x.dtype());
  row_scale_backward_impl(s, x, dy, ds, dx);
}

void Backend::dropout_forward(const Tensor& x, double p, uint64_t seed, const Tensor& y) {
  Checker c{*this, Op::DropoutForward};
  c.on_device(x, "x");
  c.floating(x, "x");
  c.same(x, "x", y, "y");
  MOELAB_CHECK(p >= 0 && p < 1, "dropout_forward: rate ", p, " must be in [0, 1)");
  require(Op::DropoutForward, x.dtype());
  dropout_forward_impl(x, p, seed, y);
}

void Backend::dropout_backward(const Tensor& dy, double p, uint64_t seed, const Tensor& dx) {
  Checker c{*this, Op::DropoutBackward};
  c.on_device(dy, "dy");
  c.floating(dy, "dy");
  c.same(dy, "dy", dx, "dx");
  MOELAB_CHECK(p >= 0 && p < 1, "dropout_backward: rate ", p, " must be in [0, 1)");
  require(Op::DropoutBackward, dy.dtype());
  dropout_backward_impl(dy, p, seed, dx);
}

void Backend::jitter_forward(const Tensor& x, double eps, uint64_t seed, const Tensor& y, uint64_t offset) {
  Checker c{*this, Op::JitterForward};
  c.on_device(x, "x");
  c.floating(x, "x");
  c.same(x, "x", y, "y");
  MOELAB_CHECK(eps >= 0 && eps < 1, "jitter_forward: eps ", eps, " must be in [0, 1)");
  require(Op::JitterForward, x.dtype());
  jitter_forward_impl(x, eps, seed, y, offset);
}

void Backend::jitter_backward(const Tensor& dy, double eps, uint64_t seed, const Tensor& dx, uint64_t offset) {
  Checker c{*this, Op::JitterBackward};
  c.on_device(dy, "dy");
  c.floating(dy, "dy");
  c.same(dy, "dy", dx, "dx");
  require(Op::JitterBackward, dy.dtype());
  jitter_backward_impl(dy, eps, seed, dx, offset);
}

void Backend::noisy_logits_forward(const Tensor& clean, const Tensor& std, double sigma,
                                   uint64_t seed, const Tensor& h, uint64_t offset) {
  Checker c{*this, Op::NoisyLogitsForward};
  c.rank(clean, "clean", 2);
  c.floating(clean, "clean");
  if (std.defined()) c.same(clean, "clean", std, "std");
  c.same(clean, "clean", h, "h");
  MOELAB_CHECK(sigma >= 0, "noisy_logits_forward: sigma ", sigma, " must be >= 0");
  require(Op::NoisyLogitsForward, clean.dtype());
  noisy_logits_forward_impl(clean, std, sigma, seed, h, offset);
}

void Backend::noisy_logits_backward(const Tensor& dh, const Tensor& std, uint64_t seed,
                                    const Tensor& dclean, const Tensor& dstd, uint64_t offset) {
  Checker c{*this, Op::NoisyLogitsBackward};
  c.rank(dh, "dh", 2);
  c.floating(dh, "dh");
  c.same(dh, "dh", dclean, "dclean");
  if (std.defined()) {
    c.same(dh, "dh", std, "std");
    c.same(dh, "dh", dstd, "dstd");
  }
  require(Op::NoisyLogitsBackward, dh.dtype());
  noisy_logits_backward_impl(dh, std, seed, dclean, dstd, offset);
}

// ---- routing -------------------------------------------------------------------------------

void Backend::topk(const Tensor& scores, const Tensor& bias, const Tensor& idx) {
  Checker c{*this, Op::TopK};
  c.topk_pair(scores, idx);
  if (bias.defined()) {
    c.shape(bias, "bias", Shape{scores.dim(1)});
    c.dtype(bias, "bias", DType::F32);
  }
  require(Op::TopK, scores.dtype());
  topk_impl(scores, bias, idx);
}

void Backend::balanced_assign(const Tensor& idx, int64_t experts, int64_t offset) {
  Checker c{*this, Op::BalancedAssign};
  c.rank(idx, "idx", 2);
  c.dtype(idx, "idx", DType::I32);
  MOELAB_CHECK(experts >= 1 && experts <= std::numeric_limits<int32_t>::max(),
               "balanced_assign: experts = ", experts, " must be in [1, 2^31)");
  MOELAB_CHECK(idx.dim(1) <= experts, "balanced_assign: ", idx.dim(1),
               " experts per token cannot be distinct among ", experts);
  MOELAB_CHECK(offset >= 0, "balanced_assign: offset ", offset, " must be >= 0");
  require(Op::BalancedAssign, DType::I32);
  balanced_assign_impl(idx, experts, offset);
}

void Backend::gates_forward(const Tensor& scores, const Tensor& idx, bool normalize,
                            double scale, const Tensor& gates) {
  Checker c{*this, Op::GatesForward};
  c.topk_pair(scores, idx);
  c.shape(gates, "gates", idx.shape());
  c.dtype(gates, "gates", scores.dtype());
  require(Op::GatesForward, scores.dtype());
  gates_forward_impl(scores, idx, normalize, scale, gates);
}

void Backend::gates_backward(const Tensor& scores, const Tensor& idx, const Tensor& dgates,
                             bool normalize, double scale, const Tensor& dscores) {
  Checker c{*this, Op::GatesBackward};
  c.topk_pair(scores, idx);
  c.shape(dgates, "dgates", idx.shape());
  c.dtype(dgates, "dgates", scores.dtype());
  c.same(scores, "scores", dscores, "dscores");
  require(Op::GatesBackward, scores.dtype());
  gates_backward_impl(scores, idx, dgates, normalize, scale, dscores);
}

void Backend::random_top2_mask(const Tensor& gates, double tau, uint64_t seed,
                               const Tensor& keep, uint64_t offset) {
  Checker c{*this, Op::RandomTop2Mask};
  c.rank(gates, "gates", 2);
  c.floating(gates, "gates");
  MOELAB_CHECK(gates.dim(1) == 2, "random_top2_mask: needs top_k = 2, gates is ",
               gates.shape().str());
  MOELAB_CHECK(tau > 0, "random_top2_mask: threshold ", tau, " must be > 0");
  c.shape(keep, "keep", gates.shape());
  c.dtype(keep, "keep", DType::I32);
  require(Op::RandomTop2Mask, gates.dtype());
  random_top2_mask_impl(gates, tau, seed, keep, offset);
}

void Backend::capacity_mask(const Tensor& idx, const Tensor& gates, int64_t experts,
                            int64_t capacity, DropPolicy policy, const Tensor& keep) {
  Checker c{*this, Op::CapacityMask};
  c.rank(idx, "idx", 2);
  c.dtype(idx, "idx", DType::I32);
  c.shape(gates, "gates", idx.shape());
  c.floating(gates, "gates");
  c.shape(keep, "keep", idx.shape());
  c.dtype(keep, "keep", DType::I32);
  MOELAB_CHECK(experts >= 1, "capacity_mask: experts = ", experts);
  MOELAB_CHECK(capacity >= 0, "capacity_mask: capacity ", capacity, " must be >= 0");
  require(Op::CapacityMask, gates.dtype());
  capacity_mask_impl(idx, gates, experts, capacity, policy, keep);
}

int Backend::sinkhorn(const Tensor& logits, double tol, int max_iters, const Tensor& out) {
  Checker c{*this, Op::Sinkhorn};
  c.rank(logits, "logits", 2);
  c.floating(logits, "logits");
  c.same(logits, "logits", out, "out");
  MOELAB_CHECK(max_iters >= 1 && tol > 0, "sinkhorn: needs max_iters >= 1 and tol > 0");
  require(Op::Sinkhorn, logits.dtype());
  return sinkhorn_impl(logits, tol, max_iters, out);
}

void Backend::expert_choice(const Tensor& scores, const Tensor& chosen) {
  Checker c{*this, Op::ExpertChoice};
  c.rank(scores, "scores", 2);
  c.floating(scores, "scores");
  c.rank(chosen, "chosen", 2);
  c.dtype(chosen, "chosen", DType::I32);
  MOELAB_CHECK(chosen.dim(0) == scores.dim(1), "expert_choice: chosen has ", chosen.dim(0),
               " rows, scores has ", scores.dim(1), " experts");
  MOELAB_CHECK(chosen.dim(1) >= 1 && chosen.dim(1) <= scores.dim(0),
               "expert_choice: capacity ", chosen.dim(1), " must be in [1, tokens = ",
               scores.dim(0), "]");
  require(Op::ExpertChoice, scores.dtype());
  expert_choice_impl(scores, chosen);
}

DispatchPlan Backend::dispatch_plan(const Tensor& idx, const Tensor& keep, bool expert_choice,
                                    int64_t experts, int64_t pad_capacity) {
  Checker c{*this, Op::DispatchPlan};
  c.rank(idx, "idx", 2);
  c.dtype(idx, "idx", DType::I32);
  c.same(idx, "idx", keep, "keep");
  MOELAB_CHECK(experts >= 1, "dispatch_plan: experts = ", experts);
  MOELAB_CHECK(!expert_choice || idx.dim(0) == experts, "dispatch_plan: expert-choice idx has ",
               idx.dim(0), " rows, expected experts = ", experts);
  MOELAB_CHECK(pad_capacity >= 0, "dispatch_plan: pad_capacity ", pad_capacity, " < 0");
  require(Op::DispatchPlan, DType::I32);
  DispatchPlan p = dispatch_plan_impl(idx, keep, expert_choice, experts, pad_capacity);
  c.offsets(p.offsets, experts, p.rows());
  return p;
}

void Backend::permute_forward(const Tensor& x, const DispatchPlan& plan, const Tensor& xp) {
  Checker c{*this, Op::PermuteForward};
  c.rank(x, "x", 2);
  c.floating(x, "x");
  c.plan(plan);
  c.shape(xp, "xp", Shape{plan.rows(), x.dim(1)});
  c.dtype(xp, "xp", x.dtype());
  require(Op::PermuteForward, x.dtype());
  permute_forward_impl(x, plan, xp);
}

void Backend::permute_backward(const Tensor& dxp, const DispatchPlan& plan, const Tensor& dx) {
  Checker c{*this, Op::PermuteBackward};
  c.rank(dx, "dx", 2);
  c.floating(dx, "dx");
  c.plan(plan);
  c.shape(dxp, "dxp", Shape{plan.rows(), dx.dim(1)});
  c.dtype(dxp, "dxp", dx.dtype());
  require(Op::PermuteBackward, dx.dtype());
  permute_backward_impl(dxp, plan, dx);
}

void Backend::unpermute_forward(const Tensor& yp, const DispatchPlan& plan, const Tensor& gates,
                                const Tensor& y) {
  Checker c{*this, Op::UnpermuteForward};
  c.rank(yp, "yp", 2);
  c.floating(yp, "yp");
  c.plan(plan);
  MOELAB_CHECK(yp.dim(0) == plan.rows(), "unpermute_forward: yp has ", yp.dim(0),
               " rows, plan has ", plan.rows());
  c.on_device(gates, "gates");
  c.dtype(gates, "gates", yp.dtype());
  c.rank(y, "y", 2);
  c.dtype(y, "y", yp.dtype());
  MOELAB_CHECK(y.dim(1) == yp.dim(1), "unpermute_forward: y width ", y.dim(1), " != yp width ",
               yp.dim(1));
  require(Op::UnpermuteForward, yp.dtype());
  unpermute_forward_impl(yp, plan, gates, y);
}

void Backend::unpermute_backward(const Tensor& dy, const Tensor& yp, const DispatchPlan& plan,
                                 const Tensor& gates, const Tensor& dyp, const Tensor& dgates) {
  Checker c{*this, Op::UnpermuteBackward};
  c.rank(dy, "dy", 2);
  c.floating(dy, "dy");
  c.plan(plan);
  c.shape(yp, "yp", Shape{plan.rows(), dy.dim(1)});
  c.dtype(yp, "yp", dy.dtype());
  c.same(yp, "yp", dyp, "dyp");
  c.on_device(gates, "gates");
  c.same(gates, "gates", dgates, "dgates");
  c.dtype(gates, "gates", dy.dtype());
  require(Op::UnpermuteBackward, dy.dtype());
  unpermute_backward_impl(dy, yp, plan, gates, dyp, dgates);
}

// ---- losses --------------------------------------------------------------------------------

double Backend::aux_loss_forward(const Tensor& probs, const Tensor& idx, int64_t seq_len) {
  Checker c{*this, Op::AuxLossForward};
  c.topk_pair(probs, idx);
  MOELAB_CHECK(seq_len >= 0 && (seq_len == 0 || probs.dim(0) % seq_len == 0),
               "aux_loss_forward: seq_len ", seq_len, " must divide the token count ",
               probs.dim(0));
  require(Op::AuxLossForward, probs.dtype());
  return aux_loss_forward_impl(probs, idx, seq_len);
}

void Backend::aux_loss_backward(const Tensor& probs, const Tensor& idx, int64_t seq_len,
                                double scale, const Tensor& dprobs) {
  Checker c{*this, Op::AuxLossBackward};
  c.topk_pair(probs, idx);
  c.same(probs, "probs", dprobs, "dprobs");
  MOELAB_CHECK(seq_len >= 0 && (seq_len == 0 || probs.dim(0) % seq_len == 0),
               "aux_loss_backward: seq_len ", seq_len, " must divide the token count ",
               probs.dim(0));
  require(Op::AuxLossBackward, probs.dtype());
  aux_loss_backward_impl(probs, idx, seq_len, scale, dprobs);
}

double Backend::z_loss_forward(const Tensor& logits) {
  Checker c{*this, Op::ZLossForward};
  c.rank(logits, "logits", 2);
  c.floating(logits, "logits");
  require(Op::ZLossForward, logits.dtype());
  return z_loss_forward_impl(logits);
}

void Backend::z_loss_backward(const Tensor& logits, double scale, const Tensor& dlogits) {
  Checker c{*this, Op::ZLossBackward};
  c.rank(logits, "logits", 2);
  c.floating(logits, "logits");
  c.same(logits, "logits", dlogits, "dlogits");
  require(Op::ZLossBackward, logits.dtype());
  z_loss_backward_impl(logits, scale, dlogits);
}

double Backend::cv2_loss_forward(const Tensor& gates, const Tensor& idx, int64_t experts) {
  Checker c{*this, Op::Cv2LossForward};
  c.rank(gates, "gates", 2);
  c.floating(gates, "gates");
  c.shape(idx, "idx", gates.shape());
  c.dtype(idx, "idx", DType::I32);
  MOELAB_CHECK(experts >= 1, "cv2_loss_forward: experts = ", experts);
  require(Op::Cv2LossForward, gates.dtype());
  return cv2_loss_forward_impl(gates, idx, experts);
}

void Backend::cv2_loss_backward(const Tensor& gates, const Tensor& idx, int64_t experts,
                                double scale, const Tensor& dgates) {
  Checker c{*this, Op::Cv2LossBackward};
  c.rank(gates, "gates", 2);
  c.floating(gates, "gates");
  c.shape(idx, "idx", gates.shape());
  c.dtype(idx, "idx", DType::I32);
  c.same(gates, "gates", dgates, "dgates");
  require(Op::Cv2LossBackward, gates.dtype());
  cv2_loss_backward_impl(gates, idx, experts, scale, dgates);
}

double Backend::load_loss_forward(const Tensor& clean, const Tensor& h, const Tensor& std,
                                  double sigma, int64_t k) {
  Checker c{*this, Op::LoadLossForward};
  c.rank(clean, "clean", 2);
  c.floating(clean, "clean");
  c.same(clean, "clean", h, "h");
  if (std.defined()) c.same(clean, "clean", std, "std");
  else MOELAB_CHECK(sigma > 0, "load_loss_forward: needs std or sigma > 0");
  MOELAB_CHECK(k >= 1 && k < clean.dim(1), "load_loss_forward: k = ", k,
               " must be in [1, experts - 1]");
  require(Op::LoadLossForward, clean.dtype());
  return load_loss_forward_impl(clean, h, std, sigma, k);
}

void Backend::load_loss_backward(const Tensor& clean, const Tensor& h, const Tensor& std,
                                 double sigma, int64_t k, double scale, const Tensor& dclean,
                                 const Tensor& dstd, const Tensor& dh) {
  Checker c{*this, Op::LoadLossBackward};
  c.rank(clean, "clean", 2);
  c.floating(clean, "clean");
  c.same(clean, "clean", h, "h");
  c.same(clean, "clean", dclean, "dclean");
  c.same(clean, "clean", dh, "dh");
  if (std.defined()) {
    c.same(clean, "clean", std, "std");
    c.same(clean, "clean", dstd, "dstd");
  } else {
    MOELAB_CHECK(sigma > 0, "load_loss_backward: needs std or sigma > 0");
  }
  MOELAB_CHECK(k >= 1 && k < clean.dim(1), "load_loss_backward: k = ", k,
               " must be in [1, experts - 1]");
  require(Op::LoadLossBackward, clean.dtype());
  load_loss_backward_impl(clean, h, std, sigma, k, scale, dclean, dstd, dh);
}

RouterStats Backend::router_stats(const Tensor& logits, const Tensor& probs, const Tensor& idx,
                                  const Tensor& keep, bool expert_choice, int64_t experts) {
  Checker c{*this, Op::RouterStats};
  c.rank(logits, "logits", 2);
  c.floating(logits, "logits");
  c.same(logits, "logits", probs, "probs");
  c.rank(idx, "idx", 2);
  c.dtype(idx, "idx", DType::I32);
  c.same(idx, "idx", keep, "keep");
  MOELAB_CHECK(logits.dim(1) == experts, "router_stats: logits has ", logits.dim(1),
               " columns, experts = ", experts);
  require(Op::RouterStats, logits.dtype());
  return router_stats_impl(logits, probs, idx, keep, expert_choice, experts);
}

void Backend::router_logits_backward(const Tensor& scores, const Tensor& logits, const Tensor& idx,
                                     const Tensor& dgates, bool normalize, double score_scale,
                                     int64_t aux_seq_len, double aux_scale, double z_scale,
                                     const Tensor& dlogits) {
  // The composite's parts check their own arguments; this checks what they share.
  Checker c{*this, Op::RouterLogitsBackward};
  c.topk_pair(scores, idx);
  c.same(scores, "scores", logits, "logits");
  c.same(scores, "scores", dlogits, "dlogits");
  c.shape(dgates, "dgates", idx.shape());
  c.dtype(dgates, "dgates", scores.dtype());
  MOELAB_CHECK(aux_seq_len >= 0 && (aux_seq_len == 0 || scores.dim(0) % aux_seq_len == 0),
               "router_logits_backward: seq_len ", aux_seq_len, " must divide the token count ",
               scores.dim(0));
  require(Op::RouterLogitsBackward, scores.dtype());
  router_logits_backward_impl(scores, logits, idx, dgates, normalize, score_scale, aux_seq_len, aux_scale,
                              z_scale, dlogits);
}

void Backend::router_logits_backward_impl(const Tensor& scores, const Tensor& logits, const Tensor& idx,
                                          const Tensor& dgates, bool normalize, double score_scale,
                                          int64_t aux_seq_len, double aux_scale, double z_scale,
                                          const Tensor& dlogits) {
  Tensor dscores = empty(scores.shape(), scores.dtype());
  gates_backward(scores, idx, dgates, normalize, score_scale, dscores);
  if (aux_scale != 0) aux_loss_backward(scores, idx, aux_seq_len, aux_scale, dscores);
  softmax_backward(scores, dscores, dlogits);
  if (z_scale != 0) z_loss_backward(logits, z_scale, dlogits);
}

RouterSummary Backend::router_summary(const Tensor& logits, const Tensor& probs, const Tensor& idx,
                                      const Tensor& keep, const Tensor& gates, bool expert_choice,
                                      int64_t experts, int64_t aux_seq_len, bool want_aux,
                                      bool want_importance) {
  return router_summary_begin(logits, probs, idx, keep, gates, expert_choice, experts, aux_seq_len, want_aux,
                              want_importance)
      .get();
}

PendingRouterSummary Backend::router_summary_begin(const Tensor& logits, const Tensor& probs, const Tensor& idx,
                                                   const Tensor& keep, const Tensor& gates, bool expert_choice,
                                                   int64_t experts, int64_t aux_seq_len, bool want_aux,
                                                   bool want_importance) {
  // The composite's parts check their own arguments; the summary checks what they share.
  Checker c{*this, Op::RouterStats};
  c.rank(logits, "logits", 2);
  c.floating(logits, "logits");
  c.same(logits, "logits", probs, "probs");
  MOELAB_CHECK(logits.dim(1) == experts, "router_summary: logits has ", logits.dim(1),
               " columns, experts = ", experts);
  if (want_importance) c.shape(gates, "gates", idx.shape());
  MOELAB_CHECK(aux_seq_len >= 0 && (aux_seq_len == 0 || probs.dim(0) % aux_seq_len == 0),
               "router_summary: seq_len ", aux_seq_len, " must divide the token count ", probs.dim(0));
  require(Op::RouterStats, logits.dtype());
  return router_summary_begin_impl(logits, probs, idx, keep, gates, expert_choice, experts, aux_seq_len, want_aux,
                                   want_importance);
}

PendingRouterSummary Backend::router_summary_begin_impl(const Tensor& logits, const Tensor& probs,
                                                        const Tensor& idx, const Tensor& keep, const Tensor& gates,
                                                        bool expert_choice, int64_t experts, int64_t aux_seq_len,
                                                        bool want_aux, bool want_importance) {
  return PendingRouterSummary(router_summary_impl(logits, probs, idx, keep, gates, expert_choice, experts,
                                                  aux_seq_len, want_aux, want_importance));
}

RouterSummary Backend::router_summary_impl(const Tensor& logits, const Tensor& probs, const Tensor& idx,
                                           const Tensor& keep, const Tensor& gates, bool expert_choice,
                                           int64_t experts, int64_t aux_seq_len, bool want_aux,
                                           bool want_importance) {
  RouterSummary s;
  s.stats = router_stats(logits, probs, idx, keep, expert_choice, experts);
  if (want_aux) s.aux = aux_loss_forward(probs, idx, aux_seq_len);
  if (want_importance) s.importance = cv2_loss_forward(gates, idx, experts);
  s.z = z_loss_forward(logits);
  return s;
}

// ---- transformer ops -----------------------------------------------------------------------

void Backend::scale(const Tensor& x, double alpha) {
  Checker c{*this, Op::Scale};
  c.on_device(x, "x");
  c.floating(x, "x");
  require(Op::Scale, x.dtype());
  scale_impl(x, alpha);
}

double Backend::sum_squares(const Tensor& x) {
  Checker c{*this, Op::SumSquares};
  c.on_device(x, "x");
  c.floating(x, "x");
  require(Op::SumSquares, x.dtype());
  return sum_squares_impl(x);
}

void Backend::embedding_forward(const Tensor& tokens, const Tensor& table, const Tensor& out) {
  Checker c{*this, Op::EmbeddingForward};
  c.rank(tokens, "tokens", 1);
  c.dtype(tokens, "tokens", DType::I32);
  c.rank(table, "table", 2);
  c.floating(table, "table");
  c.shape(out, "out", Shape{tokens.dim(0), table.dim(1)});
  c.dtype(out, "out", table.dtype());
  require(Op::EmbeddingForward, table.dtype());
  embedding_forward_impl(tokens, table, out);
}

void Backend::embedding_backward(const Tensor& tokens, const Tensor& dout, const Tensor& dtable) {
  Checker c{*this, Op::EmbeddingBackward};
  c.rank(tokens, "tokens", 1);
  c.dtype(tokens, "tokens", DType::I32);
  c.rank(dtable, "dtable", 2);
  c.floating(dtable, "dtable");
  c.shape(dout, "dout", Shape{tokens.dim(0), dtable.dim(1)});
  c.dtype(dout, "dout", dtable.dtype());
  require(Op::EmbeddingBackward, dtable.dtype());
  embedding_backward_impl(tokens, dout, dtable);
}

void Backend::rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, const Tensor& y,
                              const Tensor& rstd) {
  Checker c{*this, Op::RmsNormForward};
  c.rank(x, "x", 2);
  c.floating(x, "x");
  c.shape(w, "w", Shape{x.dim(1)});
  c.dtype(w, "w", x.dtype());
  c.same(x, "x", y, "y");
  c.shape(rstd, "rstd", Shape{x.dim(0)});
  c.dtype(rstd, "rstd", x.dtype());
  MOELAB_CHECK(eps > 0, "rmsnorm_forward: eps ", eps, " must be > 0");
  require(Op::RmsNormForward, x.dtype());
  rmsnorm_forward_impl(x, w, eps, y, rstd);
}

void Backend::rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd,
                               const Tensor& dy, const Tensor& dx, const Tensor& dw) {
  Checker c{*this, Op::RmsNormBackward};
  c.rank(x, "x", 2);
  c.floating(x, "x");
  c.shape(w, "w", Shape{x.dim(1)});
  c.dtype(w, "w", x.dtype());
  c.same(w, "w", dw, "dw");
  c.shape(rstd, "rstd", Shape{x.dim(0)});
  c.dtype(rstd, "rstd", x.dtype());
  c.same(x, "x", dy, "dy");
  c.same(x, "x", dx, "dx");
  require(Op::RmsNormBackward, x.dtype());
  rmsnorm_backward_impl(x, w, rstd, dy, dx, dw);
}

namespace {
// Optional per-token i32 [T] companions of a [T, ...] activation (positions, segments).
void check_per_token(const Checker& c, const Tensor& t, const char* arg, int64_t T) {
  if (!t.defined()) return;
  c.shape(t, arg, Shape{T});
  c.dtype(t, arg, DType::I32);
}

void check_rope(const Checker& c, const Tensor& x, int64_t heads, int64_t seq_len, double theta,
                const Tensor& y) {
  c.rank(x, "x", 2);
  c.floating(x, "x");
  c.same(x, "x", y, "y");
  MOELAB_CHECK(heads >= 1 && x.dim(1) % heads == 0 && (x.dim(1) / heads) % 2 == 0,
               to_string(c.op), ": width ", x.dim(1), " must split into ", heads,
               " heads of even width");
  MOELAB_CHECK(seq_len >= 1 && x.dim(0) % seq_len == 0, to_string(c.op), ": seq_len ", seq_len,
               " must divide the token count ", x.dim(0));
  MOELAB_CHECK(theta > 0, to_string(c.op), ": theta must be > 0");
}

void check_attention(const Checker& c, const Tensor& q, const Tensor& k, const Tensor& v,
                     int64_t heads, int64_t kv_heads, int64_t seq_len, const Tensor& lse) {
  c.rank(q, "q", 2);
  c.floating(q, "q");
  MOELAB_CHECK(heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0, to_string(c.op), ": heads ",
               heads, " must be a multiple of kv_heads ", kv_heads);
  MOELAB_CHECK(q.dim(1) % heads == 0, to_string(c.op), ": q width ", q.dim(1),
               " does not split into ", heads, " heads");
  const int64_t dh = q.dim(1) / heads, T = q.dim(0);
  MOELAB_CHECK(seq_len >= 1 && T % seq_len == 0, to_string(c.op), ": seq_len ", seq_len,
               " must divide the token count ", T);
  c.shape(k, "k", Shape{T, kv_heads * dh});
  c.dtype(k, "k", q.dtype());
  c.same(k, "k", v, "v");
  c.shape(lse, "lse", Shape{T / seq_len * heads, seq_len});
  c.dtype(lse, "lse", attention_lse_dtype(q.dtype()));
}
}  // namespace

void Backend::rope_forward(const Tensor& x, int64_t heads, int64_t seq_len, double theta,
                           const Tensor& y, const Tensor& positions) {
  Checker c{*this, Op::RopeForward};
  check_rope(c, x, heads, seq_len, theta, y);
  check_per_token(c, positions, "positions", x.dim(0));
  require(Op::RopeForward, x.dtype());
  rope_impl(x, heads, seq_len, theta, false, y, positions);
}

void Backend::rope_backward(const Tensor& dy, int64_t heads, int64_t seq_len, double theta,
                            const Tensor& dx, const Tensor& positions) {
  Checker c{*this, Op::RopeBackward};
  check_rope(c, dy, heads, seq_len, theta, dx);
  check_per_token(c, positions, "positions", dy.dim(0));
  require(Op::RopeBackward, dy.dtype());
  rope_impl(dy, heads, seq_len, theta, true, dx, positions);
}

void Backend::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads,
                                int64_t kv_heads, int64_t seq_len, const Tensor& out,
                                const Tensor& lse, const Tensor& segments) {
  Checker c{*this, Op::AttentionForward};
  check_attention(c, q, k, v, heads, kv_heads, seq_len, lse);
  c.same(q, "q", out, "out");
  check_per_token(c, segments, "segments", q.dim(0));
  require(Op::AttentionForward, q.dtype());
  attention_forward_impl(q, k, v, heads, kv_heads, seq_len, out, lse, segments);
}

void Backend::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& out, const Tensor& lse, const Tensor& dout,
                                 int64_t heads, int64_t kv_heads, int64_t seq_len,
                                 const Tensor& dq, const Tensor& dk, const Tensor& dv,
                                 const Tensor& segments) {
  Checker c{*this, Op::AttentionBackward};
  check_attention(c, q, k, v, heads, kv_heads, seq_len, lse);
  c.same(q, "q", out, "out");
  c.same(q, "q", dout, "dout");
  c.same(q, "q", dq, "dq");
  c.same(k, "k", dk, "dk");
  c.same(v, "v", dv, "dv");
  check_per_token(c, segments, "segments", q.dim(0));
  require(Op::AttentionBackward, q.dtype());
  attention_backward_impl(q, k, v, out, lse, dout, heads, kv_heads, seq_len, dq, dk, dv, segments);
}

double Backend::cross_entropy_forward(const Tensor& logits, const Tensor& targets) {
  Checker c{*this, Op::CrossEntropyForward};
  c.rank(logits, "logits", 2);
  c.floating(logits, "logits");
  c.shape(targets, "targets", Shape{logits.dim(0)});
  c.dtype(targets, "targets", DType::I32);
  require(Op::CrossEntropyForward, logits.dtype());
  return cross_entropy_forward_impl(logits, targets);
}

void Backend::cross_entropy_backward(const Tensor& logits, const Tensor& targets, double scale,
                                     const Tensor& dlogits) {
  Checker c{*this, Op::CrossEntropyBackward};
  c.rank(logits, "logits", 2);
  c.floating(logits, "logits");
  c.shape(targets, "targets", Shape{logits.dim(0)});
  c.dtype(targets, "targets", DType::I32);
  c.same(logits, "logits", dlogits, "dlogits");
  require(Op::CrossEntropyBackward, logits.dtype());
  cross_entropy_backward_impl(logits, targets, scale, dlogits);
}

void Backend::adamw(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                    double lr, double beta1, double beta2, double eps, double weight_decay,
                    int64_t step, const Tensor& cast_to) {
  Checker c{*this, Op::AdamW};
  c.on_device(param, "param");
  c.floating(param, "param");
  c.shape(grad, "grad", param.shape());
  c.floating(grad, "grad");
  const DType state = param.dtype() == DType::F64 ? DType::F64 : DType::F32;
  c.shape(m, "m", param.shape());
  c.dtype(m, "m", state);
  c.same(m, "m", v, "v");
  MOELAB_CHECK(step >= 1, "adamw: step ", step, " must be >= 1");
  MOELAB_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1 && eps > 0,
               "adamw: needs 0 <= beta < 1 and eps > 0");
  if (cast_to.defined()) {
    c.on_device(cast_to, "cast_to");
    c.shape(cast_to, "cast_to", param.shape());
    c.floating(cast_to, "cast_to");
  }
  require(Op::AdamW, param.dtype());
  adamw_impl(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, cast_to);
}

}  // namespace moelab
