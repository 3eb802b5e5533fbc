// moelab tests: every backward op against central finite differences in f64 (DESIGN.md rule 6).
// Each check uses the objective L = <forward(inputs), R> with a fixed random R, so that
// backward(R) must equal dL/dinputs. Inputs are drawn away from kinks and ties.
#include "test_util.h"

using namespace moelab;
using namespace moelab::test;

namespace {

using Fwd = std::function<Tensor()>;                          // output from current inputs
using Bwd = std::function<std::vector<Tensor>(const Tensor&)>;  // dout -> one grad per input

// Checks every input's gradient. The output shape is taken from one forward call.
void op_grad_check(const std::string& name, const std::vector<Tensor>& inputs, const Fwd& fwd,
                   const Bwd& bwd, uint64_t seed = 99) {
  Tensor out = fwd();
  Tensor r = randn(out.shape(), seed);
  auto grads = bwd(r);
  REQUIRE(grads.size() == inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!grads[i].defined()) continue;
    check_gradient(name + " input " + std::to_string(i), [&] { return dot(fwd(), r); },
                   inputs[i], grads[i]);
  }
}

Backend& B() { return cpu(); }
Tensor like(const Tensor& t) { return B().empty(t.shape(), t.dtype()); }

}  // namespace

TEST_CASE("grad: gemm in all four transpose modes", "[grad][gemm]") {
  for (int mode = 0; mode < 4; ++mode) {
    const bool ta = mode & 1, tb = mode & 2;
    Tensor a = randn(ta ? Shape{4, 3} : Shape{3, 4}, 1), b = randn(tb ? Shape{5, 4} : Shape{4, 5}, 2);
    Fwd fwd = [&] {
      Tensor c = B().empty(Shape{3, 5}, DType::F64);
      B().gemm(ta, tb, 0.7, a, b, 0.0, c);
      return c;
    };
    Bwd bwd = [&](const Tensor& dc) {
      // C = 0.7 op(A) op(B): dop(A) = 0.7 dC op(B)^T, dop(B) = 0.7 op(A)^T dC.
      Tensor da = like(a), db = like(b);
      if (!ta) B().gemm(false, !tb, 0.7, dc, b, 0.0, da);
      else B().gemm(tb, true, 0.7, b, dc, 0.0, da);
      if (!tb) B().gemm(!ta, false, 0.7, a, dc, 0.0, db);
      else B().gemm(true, ta, 0.7, dc, a, 0.0, db);
      return std::vector<Tensor>{da, db};
    };
    op_grad_check("gemm mode " + std::to_string(mode), {a, b}, fwd, bwd);
  }
}

TEST_CASE("grad: grouped gemm and its weight gradient (with an empty expert)", "[grad][gemm]") {
  const std::vector<int64_t> off{0, 3, 3, 7};  // expert 1 receives no rows
  Tensor x = randn(Shape{7, 4}, 3), w = randn(Shape{3, 4, 5}, 4);
  Fwd fwd = [&] {
    Tensor y = B().empty(Shape{7, 5}, DType::F64);
    B().grouped_gemm(x, w, off, y, false, 0.0);
    return y;
  };
  Bwd bwd = [&](const Tensor& dy) {
    Tensor dx = like(x), dw = like(w);
    B().grouped_gemm(dy, w, off, dx, true, 0.0);
    B().grouped_gemm_wgrad(x, dy, off, dw, 0.0);
    return std::vector<Tensor>{dx, dw};
  };
  op_grad_check("grouped_gemm", {x, w}, fwd, bwd);
}

TEST_CASE("grad: swiglu", "[grad][elementwise]") {
  Tensor ab = randn(Shape{5, 6}, 5, 1.5);
  Fwd fwd = [&] {
    Tensor h = B().empty(Shape{5, 3}, DType::F64);
    B().swiglu_forward(ab, h);
    return h;
  };
  Bwd bwd = [&](const Tensor& dh) {
    Tensor dab = like(ab);
    B().swiglu_backward(ab, dh, dab);
    return std::vector<Tensor>{dab};
  };
  op_grad_check("swiglu", {ab}, fwd, bwd);
}

TEST_CASE("grad: softmax, sigmoid, softplus, row normalise", "[grad][elementwise]") {
  Tensor l = randn(Shape{4, 6}, 6, 2.0);
  op_grad_check("softmax", {l}, [&] { Tensor p = like(l); B().softmax_forward(l, p); return p; },
                [&](const Tensor& dp) {
                  Tensor p = like(l), dl = like(l);
                  B().softmax_forward(l, p);
                  B().softmax_backward(p, dp, dl);
                  return std::vector<Tensor>{dl};
                });
  op_grad_check("sigmoid", {l}, [&] { Tensor y = like(l); B().sigmoid_forward(l, y); return y; },
                [&](const Tensor& dy) {
                  Tensor y = like(l), dx = like(l);
                  B().sigmoid_forward(l, y);
                  B().sigmoid_backward(y, dy, dx);
                  return std::vector<Tensor>{dx};
                });
  op_grad_check("softplus", {l}, [&] { Tensor y = like(l); B().softplus_forward(l, y); return y; },
                [&](const Tensor& dy) {
                  Tensor dx = like(l);
                  B().softplus_backward(l, dy, dx);
                  return std::vector<Tensor>{dx};
                });
  Tensor pos = full(Shape{4, 6}, 0.5);
  for (int64_t i = 0; i < pos.numel(); ++i) pos.ptr<double>()[i] += rng::uniform(8, i);
  op_grad_check("row_normalize", {pos},
                [&] { Tensor y = like(pos); B().row_normalize_forward(pos, y); return y; },
                [&](const Tensor& dy) {
                  Tensor dx = like(pos);
                  B().row_normalize_backward(pos, dy, dx);
                  return std::vector<Tensor>{dx};
                });
}

TEST_CASE("grad: row scale (the shared-expert gate)", "[grad][elementwise]") {
  Tensor s = randn(Shape{5, 1}, 9), x = randn(Shape{5, 3}, 10);
  op_grad_check("row_scale", {s, x},
                [&] { Tensor y = like(x); B().row_scale_forward(s, x, y); return y; },
                [&](const Tensor& dy) {
                  Tensor ds = like(s), dx = like(x);
                  B().row_scale_backward(s, x, dy, ds, dx);
                  return std::vector<Tensor>{ds, dx};
                });
}

TEST_CASE("grad: dropout, jitter and noisy logits reuse their counter-based draws", "[grad][noise]") {
  Tensor x = randn(Shape{6, 5}, 11);
  op_grad_check("dropout", {x}, [&] { Tensor y = like(x); B().dropout_forward(x, 0.3, 77, y); return y; },
                [&](const Tensor& dy) {
                  Tensor dx = like(x);
                  B().dropout_backward(dy, 0.3, 77, dx);
                  return std::vector<Tensor>{dx};
                });
  op_grad_check("jitter", {x}, [&] { Tensor y = like(x); B().jitter_forward(x, 0.1, 78, y); return y; },
                [&](const Tensor& dy) {
                  Tensor dx = like(x);
                  B().jitter_backward(dy, 0.1, 78, dx);
                  return std::vector<Tensor>{dx};
                });
  Tensor std_ = full(Shape{6, 5}, 0.3);
  for (int64_t i = 0; i < std_.numel(); ++i) std_.ptr<double>()[i] += rng::uniform(12, i);
  op_grad_check("noisy_logits (learned std)", {x, std_},
                [&] { Tensor h = like(x); B().noisy_logits_forward(x, std_, 0.0, 79, h); return h; },
                [&](const Tensor& dh) {
                  Tensor dc = like(x), ds = like(std_);
                  B().noisy_logits_backward(dh, std_, 79, dc, ds);
                  return std::vector<Tensor>{dc, ds};
                });
  // Dropout keeps about 1 - p of the entries and scales them by 1 / (1 - p).
  Tensor ones = full(Shape{100, 100}, 1.0), y = like(ones);
  B().dropout_forward(ones, 0.3, 5, y);
  double kept = 0, sum = 0;
  for (double v : host_values(y)) {
    kept += v != 0;
    sum += v;
  }
  REQUIRE(kept / 1e4 == Approx(0.7).margin(0.02));  // binomial sd 0.0046
  REQUIRE(sum / 1e4 == Approx(1.0).margin(0.03));
}

TEST_CASE("grad: gate weights, normalised and not, with a score scale", "[grad][router]") {
  Tensor s = full(Shape{4, 5}, 0.2);
  for (int64_t i = 0; i < s.numel(); ++i) s.ptr<double>()[i] += rng::uniform(13, i);
  Tensor idx = ints({0, 3, 1, 2, 4, 0, 2, 3}, Shape{4, 2});
  for (bool normalize : {true, false}) {
    op_grad_check(std::string("gates normalize=") + (normalize ? "true" : "false"), {s},
                  [&] { Tensor g = B().empty(Shape{4, 2}, DType::F64); B().gates_forward(s, idx, normalize, 2.5, g); return g; },
                  [&](const Tensor& dg) {
                    Tensor ds = like(s);
                    B().gates_backward(s, idx, dg, normalize, 2.5, ds);
                    return std::vector<Tensor>{ds};
                  });
  }
}

TEST_CASE("grad: permute and un-permute (combine) through a dispatch plan", "[grad][dispatch]") {
  // 4 tokens, top-2 over 3 experts; token 2's second assignment dropped.
  Tensor idx = ints({0, 2, 1, 0, 2, 1, 0, 1}, Shape{4, 2});
  Tensor keep = ints({1, 1, 1, 1, 1, 0, 1, 1}, Shape{4, 2});
  DispatchPlan plan = B().dispatch_plan(idx, keep, false, 3, 0);
  Tensor x = randn(Shape{4, 3}, 14), gates = randn(Shape{8}, 15);
  op_grad_check("permute", {x},
                [&] { Tensor xp = B().empty(Shape{plan.rows(), 3}, DType::F64); B().permute_forward(x, plan, xp); return xp; },
                [&](const Tensor& dxp) {
                  Tensor dx = like(x);
                  B().permute_backward(dxp, plan, dx);
                  return std::vector<Tensor>{dx};
                });
  Tensor yp = randn(Shape{plan.rows(), 3}, 16);
  op_grad_check("unpermute", {yp, gates},
                [&] { Tensor y = B().empty(Shape{4, 3}, DType::F64); B().unpermute_forward(yp, plan, gates, y); return y; },
                [&](const Tensor& dy) {
                  Tensor dyp = like(yp), dg = like(gates);
                  B().unpermute_backward(dy, yp, plan, gates, dyp, dg);
                  return std::vector<Tensor>{dyp, dg};
                });
}

TEST_CASE("grad: aux loss (global and per sequence) flows through P only", "[grad][loss]") {
  Tensor l = randn(Shape{6, 4}, 17), p = like(l);
  B().softmax_forward(l, p);
  Tensor idx = ints({0, 1, 0, 2, 3, 0, 1, 2, 0, 3, 2, 1}, Shape{6, 2});
  for (int64_t seq : {0, 3}) {
    Tensor dp = B().zeros(p.shape(), DType::F64);
    B().aux_loss_backward(p, idx, seq, 1.0, dp);
    check_gradient("aux_loss seq=" + std::to_string(seq), [&] { return B().aux_loss_forward(p, idx, seq); }, p, dp);
  }
}

TEST_CASE("grad: router z-loss", "[grad][loss]") {
  Tensor l = randn(Shape{5, 4}, 18, 3.0), dl = B().zeros(Shape{5, 4}, DType::F64);
  B().z_loss_backward(l, 1.0, dl);
  check_gradient("z_loss", [&] { return B().z_loss_forward(l); }, l, dl);
}

TEST_CASE("grad: Shazeer importance CV^2 and smooth load CV^2", "[grad][loss]") {
  Tensor g = full(Shape{6, 2}, 0.1);
  for (int64_t i = 0; i < g.numel(); ++i) g.ptr<double>()[i] += rng::uniform(19, i);
  Tensor idx = ints({0, 1, 2, 0, 1, 3, 3, 2, 0, 2, 1, 0}, Shape{6, 2});
  Tensor dg = B().zeros(g.shape(), DType::F64);
  B().cv2_loss_backward(g, idx, 4, 1.0, dg);
  check_gradient("importance cv2", [&] { return B().cv2_loss_forward(g, idx, 4); }, g, dg);

  // Load: inputs clean, std, h independent here (the router chains h = clean + n std).
  Tensor clean = randn(Shape{6, 5}, 20), h = randn(Shape{6, 5}, 21);
  Tensor std_ = full(Shape{6, 5}, 0.5);
  for (int64_t i = 0; i < std_.numel(); ++i) std_.ptr<double>()[i] += rng::uniform(22, i);
  Tensor dc = B().zeros(clean.shape(), DType::F64), ds = like(dc), dh = like(dc);
  B().fill(ds, 0);
  B().fill(dh, 0);
  B().load_loss_backward(clean, h, std_, 0.0, 2, 1.0, dc, ds, dh);
  auto f = [&] { return B().load_loss_forward(clean, h, std_, 0.0, 2); };
  check_gradient("load cv2 d clean", f, clean, dc);
  check_gradient("load cv2 d std", f, std_, ds);
  check_gradient("load cv2 d h", f, h, dh);
}

TEST_CASE("ops: transpose and axpy are exact", "[ops]") {
  Tensor x = randn(Shape{3, 4}, 23), y = B().empty(Shape{4, 3}, DType::F64);
  B().transpose(x, y);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) REQUIRE(y.ptr<double>()[j * 3 + i] == x.ptr<double>()[i * 4 + j]);
  Tensor z = clone(x);
  B().axpy(-1.0, x, z);
  for (double v : host_values(z)) REQUIRE(v == 0.0);
}
