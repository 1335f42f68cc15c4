// Fused NFT loss on CPU: one pass reads v_theta, v_old, target (and v_ref) once and writes the gradient once.
//
// Rows (b, i) are cut into fixed chunks of about kChunkElements values; every chunk writes its own partial sums
// and the partials are added in chunk order, so the result does not depend on how threads share the chunks.
#include "nft_loss.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <vector>

namespace omninft {
namespace {

constexpr int64_t kChunkElements = 1 << 15;

struct Partial {
  double policy = 0.0;  // sum over the chunk of coef[row] * sum_c (r p^2 + (1 - r) m^2)
  double kl = 0.0;      // sum over the chunk of (v_theta - v_ref)^2
};

// One row of C channels. With d = v_old - target and e = beta (v_theta - v_old), v+ - target = d + e and
// v- - target = d - e; returns sum_c (r (d + e)^2 + (1 - r) (d - e)^2), adds sum_c (v_theta - v_ref)^2 to `kl` and
// writes grad[c] = grad_coef ((2 r - 1) d + e) + kl_coef (v_theta - v_ref).
template <typename scalar_t, typename acc_t, bool kHasRef>
inline acc_t nft_row(const scalar_t* __restrict__ theta, const scalar_t* __restrict__ old,
                     const scalar_t* __restrict__ target, const scalar_t* __restrict__ ref,
                     scalar_t* __restrict__ grad, int64_t channels, acc_t beta, acc_t r, acc_t grad_coef,
                     acc_t kl_coef, double& kl) {
  const acc_t sign = acc_t(2) * r - acc_t(1);
  acc_t pos_sq = 0;
  acc_t neg_sq = 0;
  acc_t kl_row = 0;
#pragma omp simd reduction(+ : pos_sq, neg_sq, kl_row)
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t th = static_cast<acc_t>(theta[c]);
    const acc_t o = static_cast<acc_t>(old[c]);
    const acc_t d = o - static_cast<acc_t>(target[c]);
    const acc_t e = beta * (th - o);
    pos_sq += (d + e) * (d + e);
    neg_sq += (d - e) * (d - e);
    acc_t g = grad_coef * (sign * d + e);
    if constexpr (kHasRef) {
      const acc_t diff = th - static_cast<acc_t>(ref[c]);
      kl_row += diff * diff;
      g += kl_coef * diff;
    }
    grad[c] = static_cast<scalar_t>(g);
  }
  kl += static_cast<double>(kl_row);
  return r * pos_sq + (acc_t(1) - r) * neg_sq;
}

template <typename scalar_t, bool kHasRef>
std::vector<Partial> nft_loss_chunks(const at::Tensor& v_theta, const at::Tensor& v_old, const at::Tensor& target,
                                     const at::Tensor& v_ref, at::Tensor& grad, const std::vector<double>& r,
                                     const std::vector<double>& sample_coef, const double* token_weight,
                                     double beta, double kl_coef) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tokens = v_theta.size(1);
  const int64_t channels = v_theta.size(2);
  const int64_t rows = v_theta.size(0) * tokens;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElements / channels);
  const int64_t num_chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;

  const scalar_t* theta = v_theta.const_data_ptr<scalar_t>();
  const scalar_t* old = v_old.const_data_ptr<scalar_t>();
  const scalar_t* tgt = target.const_data_ptr<scalar_t>();
  const scalar_t* ref = kHasRef ? v_ref.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();

  std::vector<Partial> partials(num_chunks);
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (const auto chunk : c10::irange(chunk_begin, chunk_end)) {
      const int64_t row_end = std::min(rows, (chunk + 1) * rows_per_chunk);
      double policy = 0.0;
      double kl = 0.0;
      for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) {
        const int64_t b = row / tokens;
        const double coef = sample_coef[b] * (token_weight ? token_weight[row] : 1.0);
        const int64_t offset = row * channels;
        const acc_t row_sum = nft_row<scalar_t, acc_t, kHasRef>(
            theta + offset, old + offset, tgt + offset, kHasRef ? ref + offset : nullptr, out + offset, channels,
            static_cast<acc_t>(beta), static_cast<acc_t>(r[b]), static_cast<acc_t>(2.0 * beta * coef),
            static_cast<acc_t>(2.0 * kl_coef), kl);
        policy += coef * static_cast<double>(row_sum);
      }
      partials[chunk] = Partial{policy, kl};
    }
  });
  return partials;
}

std::vector<double> to_host_doubles(const at::Tensor& x) {
  const at::Tensor d = x.to(at::kDouble).contiguous();
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

void check_input(const char* name, const at::Tensor& x, const at::Tensor& v_theta) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.sizes() == v_theta.sizes(), name, " must have shape ", v_theta.sizes(), " (the shape of v_theta), got ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, " must have a floating dtype, got ", x.scalar_type());
}

}  // namespace

at::Tensor nft_loss_forward_out(at::Tensor& grad, const at::Tensor& v_theta, const at::Tensor& v_old,
                                const at::Tensor& target, const at::Tensor& r,
                                const std::optional<at::Tensor>& token_weight,
                                const std::optional<at::Tensor>& sample_weight, const std::optional<at::Tensor>& v_ref,
                                double beta, double policy_scale, double kl_weight) {
  TORCH_CHECK(v_theta.dim() == 3, "v_theta must have 3 dimensions (B, N, C), got shape ", v_theta.sizes());
  TORCH_CHECK(v_theta.numel() > 0, "v_theta must have non-empty dimensions, got shape ", v_theta.sizes());
  check_input("v_theta", v_theta, v_theta);
  check_input("v_old", v_old, v_theta);
  check_input("target", target, v_theta);
  check_input("grad", grad, v_theta);
  TORCH_CHECK(grad.scalar_type() == v_theta.scalar_type() && grad.is_contiguous(),
              "grad must be contiguous with the dtype of v_theta (", v_theta.scalar_type(), ")");
  const int64_t batch = v_theta.size(0);
  const int64_t tokens = v_theta.size(1);
  const int64_t channels = v_theta.size(2);
  TORCH_CHECK(r.dim() == 1 && r.size(0) == batch, "r must have shape (", batch, "), got ", r.sizes());
  TORCH_CHECK(beta > 0.0, "beta must be > 0, got ", beta);
  TORCH_CHECK(kl_weight >= 0.0, "kl_weight must be >= 0, got ", kl_weight);
  const bool has_ref = v_ref.has_value() && kl_weight > 0.0;
  if (has_ref) {
    check_input("v_ref", *v_ref, v_theta);
  }

  // Per-sample factor policy_scale * sample_weight[b] / (B * C * sum_i w[b, i]); token weights go in per row.
  std::vector<double> sample_coef(batch, policy_scale / static_cast<double>(batch * channels * tokens));
  std::vector<double> weights;
  if (token_weight.has_value()) {
    TORCH_CHECK(token_weight->dim() == 2 && token_weight->size(0) == batch && token_weight->size(1) == tokens,
                "token_weight must have shape (", batch, ", ", tokens, "), got ", token_weight->sizes());
    weights = to_host_doubles(*token_weight);
    for (const auto b : c10::irange(batch)) {
      double sum = 0.0;
      for (const auto i : c10::irange(tokens)) {
        sum += weights[b * tokens + i];
      }
      TORCH_CHECK(sum > 0.0, "token_weight[", b, "] sums to ", sum, "; each sample's weights must sum to > 0");
      sample_coef[b] = policy_scale / (static_cast<double>(batch * channels) * sum);
    }
  }
  if (sample_weight.has_value()) {
    TORCH_CHECK(sample_weight->dim() == 1 && sample_weight->size(0) == batch, "sample_weight must have shape (",
                batch, "), got ", sample_weight->sizes());
    const std::vector<double> sw = to_host_doubles(*sample_weight);
    for (const auto b : c10::irange(batch)) {
      sample_coef[b] *= sw[b];
    }
  }
  const std::vector<double> r_host = to_host_doubles(r);

  // Mixed input dtypes run in the accumulation dtype; the usual case (one dtype) reads the tensors as they are.
  const auto dtype = v_theta.scalar_type();
  const bool same = v_old.scalar_type() == dtype && target.scalar_type() == dtype &&
                    (!has_ref || v_ref->scalar_type() == dtype);
  const auto run_dtype = same ? dtype : at::toOpMathType(dtype);
  const at::Tensor theta = v_theta.to(run_dtype).contiguous();
  const at::Tensor old = v_old.to(run_dtype).contiguous();
  const at::Tensor tgt = target.to(run_dtype).contiguous();
  const at::Tensor ref = has_ref ? v_ref->to(run_dtype).contiguous() : at::Tensor();
  at::Tensor out = same ? grad : at::empty_like(theta, at::MemoryFormat::Contiguous);

  const double kl_coef = has_ref ? kl_weight / static_cast<double>(v_theta.numel()) : 0.0;
  const double* tw = token_weight.has_value() ? weights.data() : nullptr;
  std::vector<Partial> partials;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, run_dtype, "nft_loss_forward", [&] {
    partials = has_ref ? nft_loss_chunks<scalar_t, true>(theta, old, tgt, ref, out, r_host, sample_coef, tw, beta,
                                                         kl_coef)
                       : nft_loss_chunks<scalar_t, false>(theta, old, tgt, ref, out, r_host, sample_coef, tw, beta,
                                                          kl_coef);
  });
  double policy = 0.0;
  double kl = 0.0;
  for (const Partial& part : partials) {
    policy += part.policy;
    kl += part.kl;
  }
  const auto loss_dtype = at::toOpMathType(dtype);
  if (!same) {
    grad.copy_(out);
  }
  return at::scalar_tensor(policy + kl_coef * kl, v_theta.options().dtype(loss_dtype));
}

std::tuple<at::Tensor, at::Tensor> nft_loss_forward(const at::Tensor& v_theta, const at::Tensor& v_old,
                                                    const at::Tensor& target, const at::Tensor& r,
                                                    const std::optional<at::Tensor>& token_weight,
                                                    const std::optional<at::Tensor>& sample_weight,
                                                    const std::optional<at::Tensor>& v_ref, double beta,
                                                    double policy_scale, double kl_weight) {
  at::Tensor grad = at::empty_like(v_theta, at::MemoryFormat::Contiguous);
  at::Tensor loss = nft_loss_forward_out(grad, v_theta, v_old, target, r, token_weight, sample_weight, v_ref, beta,
                                         policy_scale, kl_weight);
  return {loss, grad};
}

}  // namespace omninft
