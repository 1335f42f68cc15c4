// Fused NFT loss (DiffusionNFT Eq 3-5 with OmniNFT's region-weighted token mean, Eq 12) on CPU.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace omninft {

// One pass over (B, N, C) velocities: returns the scalar loss (float32, float64 for float64 inputs) and
// dloss/dv_theta (B, N, C) in v_theta's dtype.
//
//   v+ = (1 - beta) v_old + beta v_theta,   v- = (1 + beta) v_old - beta v_theta
//   l[b, i] = r[b] mean_c (v+ - target)^2 + (1 - r[b]) mean_c (v- - target)^2
//   loss = policy_scale mean_b(sample_weight[b] sum_i w[b, i] l[b, i] / sum_i w[b, i])
//          + kl_weight mean (v_theta - v_ref)^2
//
// token_weight (B, N) and sample_weight (B,) default to ones; v_ref is used only when kl_weight > 0.
// The result is bit-identical on repeat, whatever the number of threads.
std::tuple<at::Tensor, at::Tensor> nft_loss_forward(const at::Tensor& v_theta, const at::Tensor& v_old,
                                                    const at::Tensor& target, const at::Tensor& r,
                                                    const std::optional<at::Tensor>& token_weight,
                                                    const std::optional<at::Tensor>& sample_weight,
                                                    const std::optional<at::Tensor>& v_ref, double beta,
                                                    double policy_scale, double kl_weight);

// The same, writing the gradient into `grad` (contiguous, shape and dtype of v_theta); returns the loss.
at::Tensor nft_loss_forward_out(at::Tensor& grad, const at::Tensor& v_theta, const at::Tensor& v_old,
                                const at::Tensor& target, const at::Tensor& r,
                                const std::optional<at::Tensor>& token_weight,
                                const std::optional<at::Tensor>& sample_weight, const std::optional<at::Tensor>& v_ref,
                                double beta, double policy_scale, double kl_weight);

}  // namespace omninft
