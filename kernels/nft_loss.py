"""Fused NFT loss in Triton: one pass computes the loss and ``dloss/dv_theta``; backward only rescales.

Each program owns ``BLOCK_ROWS`` token rows of the flattened ``(B * N, C)`` velocities, walks their channels in
``BLOCK_C`` steps, writes the gradient and one float32 partial sum; a single-program second stage adds the
partials in a fixed order, so the loss is bit-identical on repeat (no atomics). Accumulation is float32 for every
input dtype (float64 inputs included: their loss is returned as float64, but computed in float32).

With the x0-space self-normalisation (``x0_norm_t``) a first pass over the inputs reduces each sample's sums of
``|v+ - target|`` and ``|v- - target|`` (unweighted: region weights weigh only the squared error): programs own
``BLOCK_ROWS`` tokens of one sample and write one ``(2,)`` partial each; one program per sample adds its partials in
chunk order and turns them into the two per-sample term coefficients ``r t^2 / max(t mean|v+ - target|, 1e-5)`` and
``(1 - r) t^2 / max(...)`` that the loss pass uses in place of ``r`` and ``1 - r`` (the normalisers are constants: no
gradient flows through them).

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
_CHUNK_BLOCK = 128
# DiffusionNFT's floor on the x0-space mean absolute error that normalises each term.
_X0_MIN_ERROR = 1e-5


@triton.jit
def _velocity_errors(theta_ptr, old_ptr, target_ptr, offsets, mask, beta):
    """``(v_theta, v+ - target, v- - target)`` of one masked tile in float32 (Eq 4-5), zero where masked."""
    theta = tl.load(theta_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return theta, (1.0 - beta) * old + beta * theta - target, (1.0 + beta) * old - beta * theta - target


@triton.jit
def _nft_loss_fwd_kernel(
    theta_ptr,
    old_ptr,
    target_ptr,
    ref_ptr,
    grad_ptr,
    r_ptr,
    term_coef_ptr,
    kl_t_ptr,
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
    X0_NORM: tl.constexpr,
    KL_X0: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    sample = rows // tokens
    if X0_NORM:
        # (B, 2) coefficients of the two terms: r t^2 / pos_norm, (1 - r) t^2 / neg_norm.
        w_pos = tl.load(term_coef_ptr + 2 * sample, mask=row_mask, other=0.0)[:, None]
        w_neg = tl.load(term_coef_ptr + 2 * sample + 1, mask=row_mask, other=0.0)[:, None]
    else:
        w_pos = tl.load(r_ptr + sample, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        w_neg = 1.0 - w_pos
    if KL_X0:
        kl_t = tl.load(kl_t_ptr + sample, mask=row_mask, other=0.0).to(tl.float32)
        kl_row_coef = kl_coef * kl_t * kl_t
    else:
        kl_row_coef = kl_coef
    # coef[row] = policy_scale * sample_weight[b] * w[b, i] / (B * C * sum_i w[b, i]); 0 on masked rows.
    coef = tl.load(sample_coef_ptr + sample, mask=row_mask, other=0.0)
    if HAS_TOKEN_WEIGHT:
        coef *= tl.load(token_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    grad_coef = (2.0 * beta * coef)[:, None]
    if X0_NORM:
        # coef w: two live per-row values instead of three (no spills on sm_90a); 2 beta stays a scalar, so a tiny
        # beta never takes the loss below float32's range.
        c_pos = coef[:, None] * w_pos
        c_neg = coef[:, None] * w_neg
    policy = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    kl = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    row_start = rows.to(tl.int64)[:, None] * channels
    for c0 in range(0, channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < channels)[None, :]
        offsets = row_start + cols[None, :]
        theta, pos, neg = _velocity_errors(theta_ptr, old_ptr, target_ptr, offsets, mask, beta)
        if X0_NORM:
            policy += tl.sum(c_pos * pos * pos + c_neg * neg * neg, axis=1)
            grad = (2.0 * beta) * (c_pos * pos - c_neg * neg)
        else:
            policy += tl.sum(w_pos * pos * pos + w_neg * neg * neg, axis=1)
            grad = grad_coef * (w_pos * pos - w_neg * neg)
        if HAS_REF:
            diff = theta - tl.load(ref_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            kl += tl.sum(diff * diff, axis=1)
            if KL_X0:
                grad += (2.0 * kl_row_coef)[:, None] * diff
            else:
                grad += (2.0 * kl_coef) * diff
        tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    partial = tl.sum(policy, axis=0) if X0_NORM else tl.sum(coef * policy, axis=0)
    if HAS_REF:
        if KL_X0:
            partial += tl.sum(kl_row_coef * kl, axis=0)
        else:
            partial += kl_coef * tl.sum(kl, axis=0)
    tl.store(partial_ptr + pid, partial)


@triton.jit
def _nft_x0_sums_kernel(
    theta_ptr,
    old_ptr,
    target_ptr,
    sums_ptr,
    tokens,
    channels,
    beta,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (b, chunk): ``sum |v+ - target|`` and ``sum |v- - target|`` over its tokens of sample b (unweighted:
    the normalisers are plain means)."""
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    token = chunk * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = token < tokens
    rows = sample.to(tl.int64) * tokens + token
    pos_abs = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    neg_abs = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    row_start = rows[:, None] * channels
    for c0 in range(0, channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < channels)[None, :]
        offsets = row_start + cols[None, :]
        _, pos, neg = _velocity_errors(theta_ptr, old_ptr, target_ptr, offsets, mask, beta)
        pos_abs += tl.sum(tl.abs(pos), axis=1)
        neg_abs += tl.sum(tl.abs(neg), axis=1)
    out = (sample * tl.num_programs(1) + chunk) * 2
    tl.store(sums_ptr + out, tl.sum(pos_abs, axis=0))
    tl.store(sums_ptr + out + 1, tl.sum(neg_abs, axis=0))


@triton.jit
def _nft_x0_coef_kernel(sums_ptr, r_ptr, t_ptr, term_coef_ptr, n_chunks, inv_count, min_error, BLOCK: tl.constexpr):
    """Program b: adds sample b's partials in chunk order and writes its two term coefficients."""
    sample = tl.program_id(0)
    pos_acc = tl.zeros([BLOCK], dtype=tl.float32)
    neg_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_chunks, BLOCK):
        chunks = start + tl.arange(0, BLOCK)
        mask = chunks < n_chunks
        base = (sample * n_chunks + chunks) * 2
        pos_acc += tl.load(sums_ptr + base, mask=mask, other=0.0)
        neg_acc += tl.load(sums_ptr + base + 1, mask=mask, other=0.0)
    t = tl.load(t_ptr + sample).to(tl.float32)
    r = tl.load(r_ptr + sample).to(tl.float32)
    pos_norm = tl.maximum(t * (tl.sum(pos_acc, axis=0) * inv_count), min_error)
    neg_norm = tl.maximum(t * (tl.sum(neg_acc, axis=0) * inv_count), min_error)
    tl.store(term_coef_ptr + 2 * sample, r * (t * t) / pos_norm)
    tl.store(term_coef_ptr + 2 * sample + 1, (1.0 - r) * (t * t) / neg_norm)


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
    x0_norm_t: torch.Tensor | None,
    kl_t: torch.Tensor | None,
    beta: float,
    policy_scale: float,
    kl_weight: float,
) -> None:
    """Launch the stages, writing ``grad`` ``(B, N, C)``, ``partials`` ``(num_programs(...),)`` and ``loss`` ``()``.

    ``v_theta``, ``v_old``, ``target``, ``v_ref``, ``r``, ``x0_norm_t``, ``kl_t`` and ``grad`` must be contiguous;
    ``grad`` has ``v_theta``'s dtype. With ``x0_norm_t`` the per-sample pass runs first (two passes over the inputs
    in all); ``kl_t`` (``(B,)``) puts the KL in x0 space.
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
    term_coef = sample_coef
    if x0_norm_t is not None:
        term_coef = _x0_term_coefficients(v_theta, v_old, target, r, x0_norm_t, beta)
    block_rows, block_c = _blocks(batch * tokens, channels)
    _nft_loss_fwd_kernel[(partials.numel(),)](
        v_theta,
        v_old,
        target,
        v_ref if has_ref else v_theta,
        grad,
        r,
        term_coef,
        kl_t if kl_t is not None and has_ref else r,
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
        X0_NORM=x0_norm_t is not None,
        KL_X0=kl_t is not None and has_ref,
        BLOCK_ROWS=block_rows,
        BLOCK_C=block_c,
        num_warps=8,
    )
    _sum_partials_kernel[(1,)](partials, loss, partials.numel(), BLOCK=_REDUCE_BLOCK, num_warps=4)


def _x0_term_coefficients(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The per-sample pass: ``(B, 2)`` float32 coefficients of the positive and negative terms."""
    batch, tokens, channels = v_theta.shape
    block_rows, block_c = _blocks(tokens, channels)
    n_chunks = triton.cdiv(tokens, block_rows)
    sums = torch.empty((batch, n_chunks, 2), dtype=torch.float32, device=v_theta.device)
    _nft_x0_sums_kernel[(batch, n_chunks)](
        v_theta,
        v_old,
        target,
        sums,
        tokens,
        channels,
        beta,
        BLOCK_ROWS=block_rows,
        BLOCK_C=block_c,
        num_warps=8,
    )
    term_coef = torch.empty((batch, 2), dtype=torch.float32, device=v_theta.device)
    _nft_x0_coef_kernel[(batch,)](
        sums, r, t, term_coef, n_chunks, 1.0 / (channels * tokens), _X0_MIN_ERROR, BLOCK=_CHUNK_BLOCK, num_warps=4
    )
    return term_coef


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
    x0_norm_t: torch.Tensor | None,
    kl_t: torch.Tensor | None,
    beta: float,
    policy_scale: float,
    kl_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over ``(B, N, C)`` velocities (two with ``x0_norm_t``): the loss and ``dloss/dv_theta``.

    Args:
        v_theta, v_old, target: ``(B, N, C)`` velocities; ``v_ref`` the same shape or None (used when
            ``kl_weight > 0``).
        r: ``(B,)``; token_weight: ``(B, N)`` or None; sample_weight: ``(B,)`` or None.
        x0_norm_t: ``(B,)`` flow times turning on the x0-space self-normalised terms, or None.
        kl_t: ``(B,)`` flow times putting the KL in x0 space, or None.
        beta, policy_scale, kl_weight: the scalars of ``omninft_fast.nft_loss`` (``policy_scale`` there, divided by
            ``beta`` with ``inverse_beta_scale``).

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
        None if x0_norm_t is None else x0_norm_t.contiguous(),
        None if kl_t is None else kl_t.contiguous(),
        beta,
        policy_scale,
        kl_weight,
    )
    return loss, grad
