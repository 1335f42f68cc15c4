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
) -> torch.Tensor:
    """Eq 3-5 and 12 one sample at a time in float64, with the region weights normalised first."""
    theta = v_theta.double()
    batch, tokens, channels = theta.shape
    total = theta.new_zeros(())
    for b in range(batch):
        v_plus = (1 - beta) * v_old[b].double() + beta * theta[b]
        v_minus = (1 + beta) * v_old[b].double() - beta * theta[b]
        err_plus = ((v_plus - target[b].double()) ** 2).sum(dim=1) / channels
        err_minus = ((v_minus - target[b].double()) ** 2).sum(dim=1) / channels
        w = torch.ones(tokens, dtype=torch.float64) if token_weight is None else token_weight[b].double()
        w_normalised = w / w.sum()
        sample_loss = (
            float(r[b]) * (w_normalised * err_plus).sum() + (1 - float(r[b])) * (w_normalised * err_minus).sum()
        )
        sw = 1.0 if sample_weight is None else float(sample_weight[b])
        total = total + sw * sample_loss
    loss = policy_scale * total / batch
    if v_ref is not None and kl_weight > 0:
        loss = loss + kl_weight * ((theta - v_ref.double()) ** 2).sum() / theta.numel()
    return loss


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
