"""Fused NFT loss in Triton: one pass computes the loss and ``dloss/dv_theta``; backward only rescales.

Each program owns ``BLOCK_ROWS`` token rows of the flattened ``(B * N, C)`` velocities, walks their channels in
``BLOCK_C`` steps, writes the gradient and one float32 partial sum; a single-program second stage adds the
partials in a fixed order, so the loss is bit-identical on repeat (no atomics). Accumulation is float32 for every
input dtype (float64 inputs included: their loss is returned as float64, but computed in float32).

``nft_loss_forward`` is a plain launcher (tensors in, tensors out, no autograd); ``omninft_fast.ops.nft_loss_triton``
registers it as an op and wires it into ``nft_loss``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE_ELEMENTS = 4096
_MAX_BLOCK_C = 128
_SCALE_BLOCK = 4096
_REDUCE_BLOCK = 1024


@triton.jit
def _nft_loss_fwd_kernel(
    theta_ptr,
    old_ptr,
    target_ptr,
    ref_ptr,
    grad_ptr,
    r_ptr,
    token_weight_ptr,
    sample_coef_ptr,
    partial_ptr,
    n_rows,
    tokens,
    channels,
    beta,
    kl_coef,
    HAS_TOKEN_WEIGHT: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    sample = rows // tokens
    r = tl.load(r_ptr + sample, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    # coef[row] = policy_scale * sample_weight[b] * w[b, i] / (B * C * sum_i w[b, i]); 0 on masked rows.
    coef = tl.load(sample_coef_ptr + sample, mask=row_mask, other=0.0)
    if HAS_TOKEN_WEIGHT:
        coef *= tl.load(token_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    grad_coef = (2.0 * beta * coef)[:, None]
    policy = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    kl = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    row_start = rows.to(tl.int64)[:, None] * channels
    for c0 in range(0, channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < channels)[None, :]
        offsets = row_start + cols[None, :]
        theta = tl.load(theta_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        target = tl.load(target_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        pos = (1.0 - beta) * old + beta * theta - target  # v+ - target
        neg = (1.0 + beta) * old - beta * theta - target  # v- - target
        policy += tl.sum(r * pos * pos + (1.0 - r) * neg * neg, axis=1)
        grad = grad_coef * (r * pos - (1.0 - r) * neg)
        if HAS_REF:
            diff = theta - tl.load(ref_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            kl += tl.sum(diff * diff, axis=1)
            grad += (2.0 * kl_coef) * diff
        tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    partial = tl.sum(coef * policy, axis=0)
    if HAS_REF:
        partial += kl_coef * tl.sum(kl, axis=0)
    tl.store(partial_ptr + pid, partial)


@triton.jit
def _sum_partials_kernel(partial_ptr, loss_ptr, n_partials, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offsets, mask=offsets < n_partials, other=0.0)
    tl.store(loss_ptr, tl.sum(acc, axis=0).to(loss_ptr.dtype.element_ty))


def nft_loss_triton_forward_into(
    grad: torch.Tensor,
    partials: torch.Tensor,
    loss: torch.Tensor,
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    token_weight: torch.Tensor | None,
    sample_weight: torch.Tensor | None,
    v_ref: torch.Tensor | None,
    beta: float,
    policy_scale: float,
    kl_weight: float,
) -> None:
    """Launch both stages, writing ``grad`` ``(B, N, C)``, ``partials`` ``(num_programs(...),)`` and ``loss`` ``()``.

    ``v_theta``, ``v_old``, ``target``, ``v_ref``, ``r`` and ``grad`` must be contiguous; ``grad`` has ``v_theta``'s
    dtype.
    """
    batch, tokens, channels = v_theta.shape
    has_ref = v_ref is not None and kl_weight > 0
    if token_weight is None:
        sample_coef = torch.full((batch,), policy_scale / (batch * channels * tokens), device=v_theta.device)
        weights = sample_coef
    else:
        weights = token_weight.to(torch.float32).contiguous()
        sample_coef = policy_scale / (batch * channels * weights.sum(dim=1))
    if sample_weight is not None:
        sample_coef = sample_coef * sample_weight.to(torch.float32)
    block_rows, block_c = _blocks(batch * tokens, channels)
    _nft_loss_fwd_kernel[(partials.numel(),)](
        v_theta,
        v_old,
        target,
        v_ref if has_ref else v_theta,
        grad,
        r,
        weights,
        sample_coef.contiguous(),
        partials,
        batch * tokens,
        tokens,
        channels,
        beta,
        kl_weight / v_theta.numel() if has_ref else 0.0,
        HAS_TOKEN_WEIGHT=token_weight is not None,
        HAS_REF=has_ref,
        BLOCK_ROWS=block_rows,
        BLOCK_C=block_c,
        num_warps=8,
    )
    _sum_partials_kernel[(1,)](partials, loss, partials.numel(), BLOCK=_REDUCE_BLOCK, num_warps=4)


@triton.jit
def _scale_unless_one_kernel(grad_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    """``grad *= scale`` in place, skipped (one scalar read per program) when ``scale == 1``."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        values = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(grad_ptr + offsets, (values * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def scale_gradient_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Multiply the contiguous ``grad`` by the one-element ``scale`` in place, without reading ``scale`` on the host:
    for the usual ``scale == 1`` every program stops after one scalar load, so no pass over ``grad`` is made."""
    numel = grad.numel()
    _scale_unless_one_kernel[(triton.cdiv(numel, _SCALE_BLOCK),)](grad, scale, numel, BLOCK=_SCALE_BLOCK, num_warps=8)
    return grad


def _blocks(rows: int, channels: int) -> tuple[int, int]:
    """``(BLOCK_ROWS, BLOCK_C)``: tiles of about ``_TILE_ELEMENTS`` values, at most ``_MAX_BLOCK_C`` channels wide."""
    block_c = min(triton.next_power_of_2(channels), _MAX_BLOCK_C)
    return min(_TILE_ELEMENTS // block_c, triton.next_power_of_2(rows)), block_c


def num_programs(v_theta: torch.Tensor) -> int:
    """Programs (and partial sums) of the first stage for ``(B, N, C)`` velocities."""
    batch, tokens, channels = v_theta.shape
    return triton.cdiv(batch * tokens, _blocks(batch * tokens, channels)[0])


def nft_loss_forward(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    token_weight: torch.Tensor | None,
    sample_weight: torch.Tensor | None,
    v_ref: torch.Tensor | None,
    beta: float,
    policy_scale: float,
    kl_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over ``(B, N, C)`` velocities: the loss and ``dloss/dv_theta``.

    Args:
        v_theta, v_old, target: ``(B, N, C)`` velocities; ``v_ref`` the same shape or None (used when
            ``kl_weight > 0``).
        r: ``(B,)``; token_weight: ``(B, N)`` or None; sample_weight: ``(B,)`` or None.
        beta, policy_scale, kl_weight: the scalars of ``omninft_fast.nft_loss`` (``policy_scale = 1 / beta`` with
            ``inverse_beta_scale``, else 1).

    Returns:
        ``(loss, grad)``: scalar loss in float32 (float64 for float64 ``v_theta``) and the ``(B, N, C)`` gradient
        in ``v_theta``'s dtype.
    """
    v_theta = v_theta.contiguous()
    grad = torch.empty_like(v_theta)
    partials = torch.empty(num_programs(v_theta), dtype=torch.float32, device=v_theta.device)
    loss_dtype = torch.float64 if v_theta.dtype == torch.float64 else torch.float32
    loss = torch.empty((), dtype=loss_dtype, device=v_theta.device)
    nft_loss_triton_forward_into(
        grad,
        partials,
        loss,
        v_theta,
        v_old.contiguous(),
        target.contiguous(),
        r.contiguous(),
        token_weight,
        sample_weight,
        None if v_ref is None else v_ref.contiguous(),
        beta,
        policy_scale,
        kl_weight,
    )
    return loss, grad
