// Fused NFT loss on CPU: one pass reads v_theta, v_old, target (and v_ref) once and writes the gradient once.
// With x0_norm_t a first pass over v_theta, v_old and target reduces each sample's weighted sums of |v+ - target|
// and |v- - target| (its x0-space normalisers); the loss pass then weights the two terms per sample.
//
// Rows (b, i) are cut into fixed chunks of about kChunkElements values (per sample in the first pass); every
// chunk writes its own partial sums and the partials are added in chunk order, so the result does not depend on
// how threads share the chunks.
#include "nft_loss.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace omninft {
namespace {

constexpr int64_t kChunkElements = 1 << 15;
// DiffusionNFT's floor on the x0-space mean absolute error that normalises each term.
constexpr double kX0MinError = 1e-5;

struct Partial {
  double policy = 0.0;  // sum over the chunk of coef[row] * sum_c (a p^2 + c m^2)
  double kl = 0.0;      // sum over the chunk of k_b (v_theta - v_ref)^2
};

// Per-sample weights of the two terms: L[b] = pos (v+ - target)^2 + neg (v- - target)^2 summed over a row, and
// the gradient's factors d_coef = pos - neg, e_coef = pos + neg (exactly 2 r - 1 and 1 without x0_norm_t).
struct TermWeights {
  std::vector<double> pos, neg, d_coef, e_coef;
};

// One row of C channels. With d = v_old - target and e = beta (v_theta - v_old), v+ - target = d + e and
// v- - target = d - e; returns sum_c (a (d + e)^2 + c (d - e)^2), adds sum_c (v_theta - v_ref)^2 to `kl` and writes
// grad[c] = grad_coef ((a - c) d + (a + c) e) + kl_coef (v_theta - v_ref), with a = pos, c = neg.
template <typename scalar_t, typename acc_t, bool kHasRef>
inline acc_t nft_row(const scalar_t* __restrict__ theta, const scalar_t* __restrict__ old,
                     const scalar_t* __restrict__ target, const scalar_t* __restrict__ ref,
                     scalar_t* __restrict__ grad, int64_t channels, acc_t beta, acc_t pos, acc_t neg, acc_t d_coef,
                     acc_t e_coef, acc_t grad_coef, acc_t kl_coef, acc_t& kl_row_out) {
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
    acc_t g = grad_coef * (d_coef * d + e_coef * e);
    if constexpr (kHasRef) {
      const acc_t diff = th - static_cast<acc_t>(ref[c]);
      kl_row += diff * diff;
      g += kl_coef * diff;
    }
    grad[c] = static_cast<scalar_t>(g);
  }
  kl_row_out = kl_row;
  return pos * pos_sq + neg * neg_sq;
}

// Sum over each sample's rows of sum_c |v+ - target| and sum_c |v- - target| (unweighted: the x0 normalisers are
// plain means, region weights weigh only the squared error): (B, 2) in sample order.
template <typename scalar_t>
std::vector<double> x0_abs_sums(const at::Tensor& v_theta, const at::Tensor& v_old, const at::Tensor& target,
                                double beta) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = v_theta.size(0);
  const int64_t tokens = v_theta.size(1);
  const int64_t channels = v_theta.size(2);
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElements / channels);
  const int64_t chunks_per_sample = (tokens + rows_per_chunk - 1) / rows_per_chunk;
  const scalar_t* theta = v_theta.const_data_ptr<scalar_t>();
  const scalar_t* old = v_old.const_data_ptr<scalar_t>();
  const scalar_t* tgt = target.const_data_ptr<scalar_t>();
  const acc_t b_acc = static_cast<acc_t>(beta);

  std::vector<double> partials(batch * chunks_per_sample * 2);
  at::parallel_for(0, batch * chunks_per_sample, 1, [&](int64_t task_begin, int64_t task_end) {
    for (const auto task : c10::irange(task_begin, task_end)) {
      const int64_t b = task / chunks_per_sample;
      const int64_t token_begin = (task % chunks_per_sample) * rows_per_chunk;
      const int64_t token_end = std::min(tokens, token_begin + rows_per_chunk);
      double pos_sum = 0.0;
      double neg_sum = 0.0;
      for (int64_t row = b * tokens + token_begin; row < b * tokens + token_end; ++row) {
        const int64_t offset = row * channels;
        acc_t pos_abs = 0;
        acc_t neg_abs = 0;
#pragma omp simd reduction(+ : pos_abs, neg_abs)
        for (int64_t c = 0; c < channels; ++c) {
          const acc_t o = static_cast<acc_t>(old[offset + c]);
          const acc_t d = o - static_cast<acc_t>(tgt[offset + c]);
          const acc_t e = b_acc * (static_cast<acc_t>(theta[offset + c]) - o);
          pos_abs += std::abs(d + e);
          neg_abs += std::abs(d - e);
        }
        pos_sum += static_cast<double>(pos_abs);
        neg_sum += static_cast<double>(neg_abs);
      }
      partials[task * 2] = pos_sum;
      partials[task * 2 + 1] = neg_sum;
    }
  });
  std::vector<double> sums(batch * 2, 0.0);
  for (const auto task : c10::irange(batch * chunks_per_sample)) {
    sums[(task / chunks_per_sample) * 2] += partials[task * 2];
    sums[(task / chunks_per_sample) * 2 + 1] += partials[task * 2 + 1];
  }
  return sums;
}

template <typename scalar_t, bool kHasRef>
std::vector<Partial> nft_loss_chunks(const at::Tensor& v_theta, const at::Tensor& v_old, const at::Tensor& target,
                                     const at::Tensor& v_ref, at::Tensor& grad, const TermWeights& terms,
                                     const std::vector<double>& sample_coef, const std::vector<double>& kl_scale,
                                     const double* token_weight, double beta, double kl_coef) {
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
        acc_t kl_row = 0;
        const acc_t row_sum = nft_row<scalar_t, acc_t, kHasRef>(
            theta + offset, old + offset, tgt + offset, kHasRef ? ref + offset : nullptr, out + offset, channels,
            static_cast<acc_t>(beta), static_cast<acc_t>(terms.pos[b]), static_cast<acc_t>(terms.neg[b]),
            static_cast<acc_t>(terms.d_coef[b]), static_cast<acc_t>(terms.e_coef[b]),
            static_cast<acc_t>(2.0 * beta * coef), static_cast<acc_t>(2.0 * kl_coef * kl_scale[b]), kl_row);
        policy += coef * static_cast<double>(row_sum);
        kl += kl_scale[b] * static_cast<double>(kl_row);
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

void check_per_sample(const char* name, const at::Tensor& x, int64_t batch) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == batch, name, " must have shape (", batch, "), got ", x.sizes());
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
                                const std::optional<at::Tensor>& x0_norm_t, const std::optional<at::Tensor>& kl_t,
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
  std::vector<double> kl_scale(batch, 1.0);
  if (has_ref && kl_t.has_value()) {
    check_per_sample("kl_t", *kl_t, batch);
    const std::vector<double> t = to_host_doubles(*kl_t);
    for (const auto b : c10::irange(batch)) {
      kl_scale[b] = t[b] * t[b];
    }
  }

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
  TermWeights terms{r_host, std::vector<double>(batch), std::vector<double>(batch), std::vector<double>(batch, 1.0)};
  for (const auto b : c10::irange(batch)) {
    terms.neg[b] = 1.0 - r_host[b];
    terms.d_coef[b] = 2.0 * r_host[b] - 1.0;
  }
  std::vector<double> abs_sums;
  if (x0_norm_t.has_value()) {
    check_per_sample("x0_norm_t", *x0_norm_t, batch);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, run_dtype, "nft_loss_x0_sums",
                                    [&] { abs_sums = x0_abs_sums<scalar_t>(theta, old, tgt, beta); });
    const std::vector<double> t = to_host_doubles(*x0_norm_t);
    for (const auto b : c10::irange(batch)) {
      // mean_{i,c} |.| = (sum_i sum_c |.|) / (C N).
      const double count = static_cast<double>(channels) * static_cast<double>(tokens);
      const double pos_norm = std::max(t[b] * abs_sums[b * 2] / count, kX0MinError);
      const double neg_norm = std::max(t[b] * abs_sums[b * 2 + 1] / count, kX0MinError);
      terms.pos[b] = r_host[b] * t[b] * t[b] / pos_norm;
      terms.neg[b] = (1.0 - r_host[b]) * t[b] * t[b] / neg_norm;
      terms.d_coef[b] = terms.pos[b] - terms.neg[b];
      terms.e_coef[b] = terms.pos[b] + terms.neg[b];
    }
  }
  std::vector<Partial> partials;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, run_dtype, "nft_loss_forward", [&] {
    partials = has_ref ? nft_loss_chunks<scalar_t, true>(theta, old, tgt, ref, out, terms, sample_coef, kl_scale, tw,
                                                         beta, kl_coef)
                       : nft_loss_chunks<scalar_t, false>(theta, old, tgt, ref, out, terms, sample_coef, kl_scale, tw,
                                                          beta, kl_coef);
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
                                                    const std::optional<at::Tensor>& v_ref,
                                                    const std::optional<at::Tensor>& x0_norm_t,
                                                    const std::optional<at::Tensor>& kl_t, double beta,
                                                    double policy_scale, double kl_weight) {
  at::Tensor grad = at::empty_like(v_theta, at::MemoryFormat::Contiguous);
  at::Tensor loss = nft_loss_forward_out(grad, v_theta, v_old, target, r, token_weight, sample_weight, v_ref,
                                         x0_norm_t, kl_t, beta, policy_scale, kl_weight);
  return {loss, grad};
}

}  // namespace omninft
