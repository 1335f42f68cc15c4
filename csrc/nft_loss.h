// Fused NFT loss (DiffusionNFT Eq 3-5 with OmniNFT's region-weighted token mean, Eq 12) on CPU.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace omninft {

// One pass over (B, N, C) velocities (two with x0_norm_t): returns the scalar loss (float32, float64 for float64
// inputs) and dloss/dv_theta (B, N, C) in v_theta's dtype. With M_b[x] = sum_i w[b, i] mean_c x / sum_i w[b, i]:
//
//   v+ = (1 - beta) v_old + beta v_theta,   v- = (1 + beta) v_old - beta v_theta
//   L[b] = r[b] M_b[(v+ - target)^2] + (1 - r[b]) M_b[(v- - target)^2]
//   loss = policy_scale mean_b(sample_weight[b] L[b]) + kl_weight mean_b(k_b mean_{i,c} (v_theta - v_ref)^2)
//
// With x0_norm_t = t (B,), each term is self-normalised in x0 space with a constant (no-gradient) normaliser:
//   L[b] = r[b] t^2 M_b[(v+ - target)^2] / max(t M_b[|v+ - target|], 1e-5) + (1 - r[b]) (the same with v-)
// k_b = kl_t[b]^2 with kl_t (B,) (the KL in x0 space), else 1.
// token_weight (B, N) and sample_weight (B,) default to ones; v_ref is used only when kl_weight > 0.
// The result is bit-identical on repeat, whatever the number of threads.
std::tuple<at::Tensor, at::Tensor> nft_loss_forward(const at::Tensor& v_theta, const at::Tensor& v_old,
                                                    const at::Tensor& target, const at::Tensor& r,
                                                    const std::optional<at::Tensor>& token_weight,
                                                    const std::optional<at::Tensor>& sample_weight,
                                                    const std::optional<at::Tensor>& v_ref,
                                                    const std::optional<at::Tensor>& x0_norm_t,
                                                    const std::optional<at::Tensor>& kl_t, double beta,
                                                    double policy_scale, double kl_weight);

// The same, writing the gradient into `grad` (contiguous, shape and dtype of v_theta); returns the loss.
at::Tensor nft_loss_forward_out(at::Tensor& grad, const at::Tensor& v_theta, const at::Tensor& v_old,
                                const at::Tensor& target, const at::Tensor& r,
                                const std::optional<at::Tensor>& token_weight,
                                const std::optional<at::Tensor>& sample_weight, const std::optional<at::Tensor>& v_ref,
                                const std::optional<at::Tensor>& x0_norm_t, const std::optional<at::Tensor>& kl_t,
                                double beta, double policy_scale, double kl_weight);

}  // namespace omninft
