// C++ test of omninft::nft_loss_forward against a float64 ATen reference written independently of the kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>

#include "nft_loss.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  }
}

struct Inputs {
  at::Tensor v_theta, v_old, target, r, v_ref;
  std::optional<at::Tensor> token_weight, sample_weight, x0_norm_t, kl_t;
  double beta = 0.3, policy_scale = 1.0, kl_weight = 0.0;
};

Inputs make_inputs(int64_t batch, int64_t tokens, int64_t channels, at::ScalarType dtype, bool weights, bool kl,
                   double beta, bool x0 = false) {
  Inputs in;
  const auto opts = at::TensorOptions().dtype(dtype);
  in.v_theta = at::randn({batch, tokens, channels}).to(opts);
  in.v_old = at::randn({batch, tokens, channels}).to(opts);
  in.target = at::randn({batch, tokens, channels}).to(opts);
  in.v_ref = at::randn({batch, tokens, channels}).to(opts);
  in.r = at::rand({batch});
  in.r[0] = 1.0;
  in.beta = beta;
  if (weights) {
    in.token_weight = at::rand({batch, tokens}) + 0.1;
    in.sample_weight = at::rand({batch}) * 2;
    in.policy_scale = 1.0 / beta;
  }
  if (kl) {
    in.kl_weight = 0.4;
  }
  if (x0) {
    in.r[1] = 0.0;
    in.x0_norm_t = at::rand({batch}) + 0.05;
    if (kl) {
      in.kl_t = in.x0_norm_t;
    }
  }
  return in;
}

// Eq 3-5 and 12 in float64 with ATen ops; returns (loss, dloss/dv_theta) by the closed-form derivative. With
// x0_norm_t the two terms get the constant per-sample factors t^2 / max(t mean |v+- - target|, 1e-5) (a plain mean).
std::tuple<at::Tensor, at::Tensor> reference(const Inputs& in) {
  const at::Tensor theta = in.v_theta.to(at::kDouble);
  const at::Tensor old = in.v_old.to(at::kDouble);
  const at::Tensor target = in.target.to(at::kDouble);
  const at::Tensor r = in.r.to(at::kDouble).view({-1, 1, 1});
  const int64_t batch = theta.size(0), tokens = theta.size(1), channels = theta.size(2);
  const at::Tensor pos = (1 - in.beta) * old + in.beta * theta - target;
  const at::Tensor neg = (1 + in.beta) * old - in.beta * theta - target;
  at::Tensor w = in.token_weight ? in.token_weight->to(at::kDouble) : at::ones({batch, tokens}, at::kDouble);
  w = w / w.sum(1, true);
  at::Tensor sw = in.sample_weight ? in.sample_weight->to(at::kDouble) : at::ones({batch}, at::kDouble);
  const at::Tensor coef = (in.policy_scale / (batch * channels)) * sw.view({-1, 1, 1}) * w.unsqueeze(2);
  at::Tensor a = r;
  at::Tensor c = 1 - r;
  if (in.x0_norm_t) {
    const at::Tensor t = in.x0_norm_t->to(at::kDouble).view({-1, 1, 1});
    const auto norm = [&](const at::Tensor& err) {
      return (t * err.abs().mean({1, 2}, true)).clamp_min(1e-5);
    };
    a = a * t * t / norm(pos);
    c = c * t * t / norm(neg);
  }
  at::Tensor loss = (coef * (a * pos * pos + c * neg * neg)).sum();
  at::Tensor grad = coef * 2 * in.beta * (a * pos - c * neg);
  if (in.kl_weight > 0) {
    const at::Tensor diff = theta - in.v_ref.to(at::kDouble);
    const at::Tensor k =
        in.kl_t ? in.kl_t->to(at::kDouble).square().view({-1, 1, 1}) : at::ones({1, 1, 1}, at::kDouble);
    loss = loss + in.kl_weight * (k * diff.square()).mean();
    grad = grad + (2 * in.kl_weight / theta.numel()) * k * diff;
  }
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> run(const Inputs& in) {
  return omninft::nft_loss_forward(in.v_theta, in.v_old, in.target, in.r, in.token_weight, in.sample_weight,
                                   in.v_ref, in.x0_norm_t, in.kl_t, in.beta, in.policy_scale, in.kl_weight);
}

void test_against_reference() {
  const at::ScalarType dtypes[] = {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16};
  const double grad_tol[] = {1e-12, 2e-6, 1e-3, 8e-3};
  for (int d = 0; d < 4; ++d) {
    for (const bool weights : {false, true}) {
      for (const bool kl : {false, true}) {
        for (const double beta : {0.1, 1.0}) {
          for (const bool x0 : {false, true}) {
            const Inputs in = make_inputs(3, 29 + d, 37 + 31 * d, dtypes[d], weights, kl, beta, x0);
            auto [loss, grad] = run(in);
            auto [ref_loss, ref_grad] = reference(in);
            const std::string name = std::string(c10::toString(dtypes[d])) + (weights ? " weights" : "") +
                                     (kl ? " kl" : "") + (x0 ? " x0" : "") + " beta=" + std::to_string(beta);
            const double loss_err = std::abs(loss.item<double>() - ref_loss.item<double>()) / ref_loss.item<double>();
            const double grad_err =
                (grad.to(at::kDouble) - ref_grad).abs().max().item<double>() / ref_grad.abs().max().item<double>();
            expect(loss_err < (d == 0 ? 1e-12 : 2e-5), name + ": loss relative error " + std::to_string(loss_err));
            expect(grad_err < grad_tol[d], name + ": gradient error " + std::to_string(grad_err));
            expect(grad.scalar_type() == dtypes[d], name + ": gradient dtype");
            expect(loss.scalar_type() == (d == 0 ? at::kDouble : at::kFloat), name + ": loss dtype");
          }
        }
      }
    }
  }
}

void test_poisoned_output_and_repeats() {
  for (const bool x0 : {false, true}) {
    const Inputs in = make_inputs(2, 1000, 70, at::kFloat, true, true, 0.1, x0);
    at::Tensor grad = at::full_like(in.v_theta, NAN);
    const at::Tensor loss = omninft::nft_loss_forward_out(grad, in.v_theta, in.v_old, in.target, in.r,
                                                          in.token_weight, in.sample_weight, in.v_ref, in.x0_norm_t,
                                                          in.kl_t, in.beta, in.policy_scale, in.kl_weight);
    expect(at::isfinite(grad).all().item<bool>(), "poisoned gradient fully written");
    const int threads = at::get_num_threads();
    for (const int n : {1, 2, 3}) {
      at::set_num_threads(n);
      auto [again, again_grad] = run(in);
      expect(at::equal(loss, again) && at::equal(grad, again_grad),
             "bit-identical with " + std::to_string(n) + " threads" + (x0 ? " (x0)" : ""));
    }
    at::set_num_threads(threads);
  }
}

void expect_error(const std::string& argument, const std::function<void()>& call) {
  try {
    call();
    expect(false, "no error for bad " + argument);
  } catch (const c10::Error& err) {
    expect(std::string(err.what()).find(argument) != std::string::npos, "error names " + argument);
  }
}

void test_errors() {
  Inputs in = make_inputs(2, 5, 4, at::kFloat, false, false, 0.5);
  const auto call = [&](const at::Tensor& old, const at::Tensor& r, const std::optional<at::Tensor>& tw) {
    return [&, old, r, tw] {
      omninft::nft_loss_forward(in.v_theta, old, in.target, r, tw, std::nullopt, std::nullopt, std::nullopt,
                                std::nullopt, 0.5, 1.0, 0.0);
    };
  };
  expect_error("v_old", call(in.v_old.narrow(1, 0, 4), in.r, std::nullopt));
  expect_error("r", call(in.v_old, at::ones({3}), std::nullopt));
  expect_error("token_weight", call(in.v_old, in.r, at::zeros({2, 5})));
  expect_error("token_weight", call(in.v_old, in.r, at::ones({2, 4})));
  expect_error("x0_norm_t", [&] {
    omninft::nft_loss_forward(in.v_theta, in.v_old, in.target, in.r, std::nullopt, std::nullopt, std::nullopt,
                              at::ones({3}), std::nullopt, 0.5, 1.0, 0.0);
  });
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_against_reference();
  test_poisoned_output_and_repeats();
  test_errors();
  if (failures == 0) {
    std::printf("test_nft_loss: all checks passed\n");
  }
  return failures == 0 ? 0 : 1;
}
