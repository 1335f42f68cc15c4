"""Independent float64 oracles, written differently from the ops, used by the tests and ``omninft-fast selfcheck``.

Each one follows the paper's equations literally (explicit attention maps, per-sample loops) so that agreement
with the ops is evidence, not a tautology. They are slow and memory-hungry by design: small shapes only.
"""

from __future__ import annotations

import torch


def explicit_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, kv_grad_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention through the materialised map, Eq 8 written as ``alpha sg(K) + (1 - alpha) K``.

    Args:
        q: ``(B, Nq, H, D)``; k, v: ``(B, Nk, H, D)``.

    Returns:
        ``out (B, Nq, H, D)`` and ``key_mass (B, Nk)``, in float64.
    """
    alpha = 1.0 - kv_grad_scale
    q, k, v = q.double(), k.double(), v.double()
    k_t = alpha * k.detach() + (1.0 - alpha) * k
    v_t = alpha * v.detach() + (1.0 - alpha) * v
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k_t) * softmax_scale
    attn = torch.exp(logits - logits.logsumexp(dim=-1, keepdim=True))  # (B, H, Nq, Nk)
    out = torch.einsum("bhqk,bkhd->bqhd", attn, v_t)
    key_mass = attn.detach().sum(dim=2).mean(dim=1)
    return out, key_mass


def explicit_nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    token_weight: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
    policy_scale: float = 1.0,
    kl_weight: float = 0.0,
    v_ref: torch.Tensor | None = None,
    x0_norm_t: torch.Tensor | None = None,
    kl_x0: bool = False,
) -> torch.Tensor:
    """Eq 3-5 and 12 one sample at a time in float64, with the region weights normalised first.

    With ``x0_norm_t`` each term follows DiffusionNFT literally: from ``x_t = x0 + t * target`` (any ``x0``; here
    ``v_old``) the denoised prediction ``x0(u) = x_t - t u`` of each velocity ``u``, and
    ``weighted_mean((x0(u) - x0)^2) / max(mean |x0(u) - x0|, 1e-5)`` with the (unweighted) denominator detached.
    ``kl_x0`` measures the regulariser between ``x0(v_theta)`` and ``x0(v_ref)`` (needs ``x0_norm_t``).
    """
    theta = v_theta.double()
    batch, tokens, _ = theta.shape
    total = theta.new_zeros(())
    kl_total = theta.new_zeros(())
    for b in range(batch):
        v_plus = (1 - beta) * v_old[b].double() + beta * theta[b]
        v_minus = (1 + beta) * v_old[b].double() - beta * theta[b]
        w = torch.ones(tokens, dtype=torch.float64) if token_weight is None else token_weight[b].double()
        w_normalised = w / w.sum()

        if x0_norm_t is None:
            term_plus = _weighted_mean(w_normalised, (v_plus - target[b].double()) ** 2)
            term_minus = _weighted_mean(w_normalised, (v_minus - target[b].double()) ** 2)
        else:
            t = float(x0_norm_t[b])
            x0 = v_old[b].double()
            x_t = x0 + t * target[b].double()
            terms = []
            for v in (v_plus, v_minus):
                x0_error = (x_t - t * v) - x0
                normaliser = max(float(x0_error.detach().abs().mean()), 1e-5)
                terms.append(_weighted_mean(w_normalised, x0_error**2) / normaliser)
            term_plus, term_minus = terms
        sample_loss = float(r[b]) * term_plus + (1 - float(r[b])) * term_minus
        sw = 1.0 if sample_weight is None else float(sample_weight[b])
        total = total + sw * sample_loss
        if v_ref is not None and kl_weight > 0:
            diff = theta[b] - v_ref[b].double()
            if kl_x0:
                t = float(x0_norm_t[b])
                diff = (-t * theta[b]) - (-t * v_ref[b].double())  # x0(v_theta) - x0(v_ref), x_t cancels
            kl_total = kl_total + (diff**2).sum()
    loss = policy_scale * total / batch
    if v_ref is not None and kl_weight > 0:
        loss = loss + kl_weight * kl_total / theta.numel()
    return loss


def _weighted_mean(w_normalised: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Eq 12's token mean of the channel mean of ``x`` ``(N, C)`` with normalised weights ``(N,)``."""
    return (w_normalised * x.sum(dim=1) / x.shape[1]).sum()


def explicit_group_advantages(rewards: torch.Tensor, std: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Eq 6's group advantage with Python loops over prompts, float64, population standard deviations."""
    x = rewards.double()
    rows = []
    global_std = float(((x - x.mean()) ** 2).mean().sqrt())
    for group in x:
        mean = float(group.sum()) / len(group)
        if float(group.max()) == float(group.min()):
            rows.append(torch.zeros_like(group))
            continue
        z = float(((group - mean) ** 2).mean().sqrt()) if std == "group" else global_std
        rows.append((group - mean) / (z + eps))
    return torch.stack(rows)


def explicit_region_weights(scores: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq 11 with a loop over samples, float64."""
    out = []
    for s in scores.double():
        lo, hi = float(s.min()), float(s.max())
        out.append(torch.ones_like(s) if hi == lo else 1 + lam * (s - lo) / (hi - lo))
    return torch.stack(out)
