// C++ test of aiayn::add_dropout_layer_norm_{fwd,bwd} and aiayn::dropout_mask, called the way a
// C++ user calls them: through the dispatcher, with libaiayn_ops.so only linked (its static
// initialisers register the ops). References are ATen's layer_norm in float64 (aiayn/reference.py
// defines the same semantics). Prints every failed check and exits non-zero if any failed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

#define EXPECT(cond, msg)                                                              \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::ostringstream os_;                                                          \
      os_ << msg;                                                                      \
      std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, os_.str().c_str()); \
      ++failures;                                                                      \
    }                                                                                  \
  } while (0)

using OptTensor = std::optional<at::Tensor>;

auto fwd_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("aiayn::add_dropout_layer_norm_fwd", "")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, double, double,
          const at::Tensor&)>();
}

auto bwd_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("aiayn::add_dropout_layer_norm_bwd", "")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
          const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>();
}

auto mask_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("aiayn::dropout_mask", "")
      .typed<at::Tensor(const at::Tensor&, double, const at::Tensor&)>();
}

at::Tensor seed_tensor(int64_t seed) { return at::full({1}, seed, at::kLong); }

// max |a - b| / (atol + rtol * |b|) <= 1, compared in float64.
bool close(const at::Tensor& a, const at::Tensor& b, double atol, double rtol, double* worst) {
  if (a.sizes() != b.sizes()) {
    *worst = -1;
    return false;
  }
  const at::Tensor ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  *worst = ((ad - bd).abs() / (atol + rtol * bd.abs())).max().item<double>();
  return *worst <= 1.0;
}

#define EXPECT_CLOSE(a, b, atol, rtol, what)                                              \
  do {                                                                                    \
    double worst_;                                                                        \
    EXPECT(close((a), (b), (atol), (rtol), &worst_),                                      \
           what << ": differs from the reference (max |diff| / (atol + rtol |ref|) = "    \
                << worst_ << ", shapes " << (a).sizes() << " vs " << (b).sizes() << ")"); \
  } while (0)

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

// p = 0: out, mean, rstd against float64 ATen, float32 in, for a few shapes.
void test_forward_matches_layer_norm() {
  struct Case {
    std::vector<int64_t> shape;
    bool affine;
  };
  const std::vector<Case> cases = {
      {{4, 7, 64}, true},  // D a multiple of 16
      {{3, 1000}, true},   // D not a multiple of 16
      {{5, 37}, false},    // no weight / bias
      {{1, 513}, true},    // a single row
      {{2, 3}, true},      // D smaller than a vector
  };
  const double eps = 1e-5;
  auto op = fwd_op();
  for (const Case& c : cases) {
    const int64_t d = c.shape.back();
    const at::Tensor x = at::randn(c.shape), r = at::randn(c.shape);
    const OptTensor w = c.affine ? OptTensor(at::randn({d})) : std::nullopt;
    const OptTensor b = c.affine ? OptTensor(at::randn({d})) : std::nullopt;
    auto [out, mean, rstd] = op.call(x, r, w, b, 0.0, eps, seed_tensor(0));

    const at::Tensor h = x.to(at::kDouble) + r.to(at::kDouble);
    const OptTensor wd = w ? OptTensor(w->to(at::kDouble)) : std::nullopt;
    const OptTensor bd = b ? OptTensor(b->to(at::kDouble)) : std::nullopt;
    const at::Tensor ref = at::layer_norm(h, {d}, wd, bd, eps);
    const at::Tensor h2 = h.reshape({-1, d});
    const at::Tensor ref_mean = h2.mean(-1);
    const at::Tensor ref_rstd = (h2.var(-1, /*unbiased=*/false) + eps).rsqrt();
    const std::string what = "fwd shape " + shape_str(c.shape) + (c.affine ? "" : " (no affine)");
    EXPECT(out.scalar_type() == at::kFloat, what << ": out dtype " << out.scalar_type());
    EXPECT_CLOSE(out, ref, 1e-4, 1e-4, what << " out");
    EXPECT_CLOSE(mean, ref_mean, 1e-5, 1e-4, what << " mean");
    EXPECT_CLOSE(rstd, ref_rstd, 1e-5, 1e-4, what << " rstd");
  }
}

// p = 0.5: about half of x kept; the same seed gives the same output, another seed another one;
// the output is layer_norm(residual + x * mask / (1 - p)) with mask = dropout_mask(x, p, seed).
void test_dropout() {
  const double p = 0.5, eps = 1e-5;
  const at::Tensor like = at::empty({100, 1000});  // 100k elements
  const at::Tensor mask = mask_op().call(like, p, seed_tensor(1234));
  EXPECT(mask.scalar_type() == at::kBool && mask.sizes() == like.sizes(),
        "dropout_mask: got dtype " << mask.scalar_type() << " shape " << mask.sizes());
  const double kept = mask.to(at::kDouble).mean().item<double>();
  EXPECT(kept >= 0.45 && kept <= 0.55,
         "dropout_mask p=0.5: kept fraction " << kept << " not in [0.45, 0.55]");
  EXPECT(at::equal(mask, mask_op().call(like, p, seed_tensor(1234))),
         "dropout_mask: the same seed gave two different masks");

  auto op = fwd_op();
  const at::Tensor x = at::randn({64, 300}), r = at::randn({64, 300});
  const at::Tensor w = at::randn({300}), b = at::randn({300});
  const at::Tensor out1 = std::get<0>(op.call(x, r, w, b, p, eps, seed_tensor(42)));
  const at::Tensor out2 = std::get<0>(op.call(x, r, w, b, p, eps, seed_tensor(42)));
  const at::Tensor out3 = std::get<0>(op.call(x, r, w, b, p, eps, seed_tensor(43)));
  EXPECT(at::equal(out1, out2), "fwd p=0.5: the same seed gave two different outputs");
  EXPECT(!at::equal(out1, out3), "fwd p=0.5: seeds 42 and 43 gave the same output");

  const at::Tensor m = mask_op().call(x, p, seed_tensor(42)).to(at::kDouble);
  const at::Tensor h = r.to(at::kDouble) + x.to(at::kDouble) * m / (1.0 - p);
  const at::Tensor ref = at::layer_norm(h, {300}, w.to(at::kDouble), b.to(at::kDouble), eps);
  EXPECT_CLOSE(out1, ref, 1e-4, 1e-4, "fwd p=0.5 against layer_norm(residual + x * mask * 2)");
}

// Backward, float64, against autograd through at::layer_norm (with the same dropout mask).
void test_backward() {
  const double eps = 1e-5;
  for (double p : {0.0, 0.5}) {
    const int64_t d = 37;
    const at::TensorOptions f64 = at::TensorOptions().dtype(at::kDouble);
    const at::Tensor x = at::randn({6, d}, f64), r = at::randn({6, d}, f64);
    const at::Tensor w = at::randn({d}, f64), b = at::randn({d}, f64), g = at::randn({6, d}, f64);
    const at::Tensor seed = seed_tensor(7);
    auto [out, mean, rstd] = fwd_op().call(x, r, w, b, p, eps, seed);
    auto [gx, gr, gw, gb] = bwd_op().call(g, x, r, w, mean, rstd, p, seed);

    const at::Tensor keep =
        p > 0 ? mask_op().call(x, p, seed).to(at::kDouble) / (1.0 - p) : at::ones_like(x);
    at::Tensor xa = x.clone().set_requires_grad(true), ra = r.clone().set_requires_grad(true);
    at::Tensor wa = w.clone().set_requires_grad(true), ba = b.clone().set_requires_grad(true);
    const at::Tensor ref = at::layer_norm(ra + xa * keep, {d}, wa, ba, eps);
    ref.backward(g);
    const std::string what = "bwd float64 p=" + std::to_string(p);
    EXPECT_CLOSE(out, ref.detach(), 1e-12, 1e-10, what << " (its fwd out)");
    EXPECT_CLOSE(gx, xa.grad(), 1e-10, 1e-8, what << " grad_x");
    EXPECT_CLOSE(gr, ra.grad(), 1e-10, 1e-8, what << " grad_residual");
    EXPECT_CLOSE(gw, wa.grad(), 1e-10, 1e-8, what << " grad_weight");
    EXPECT_CLOSE(gb, ba.grad(), 1e-10, 1e-8, what << " grad_bias");
  }
}

}  // namespace

int main() {
  try {
    at::manual_seed(0);
    test_forward_matches_layer_norm();
    test_dropout();
    test_backward();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: exception: %s\n", e.what());
    return 1;
  }
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("test_add_dropout_layer_norm: all checks passed\n");
  return 0;
}
