"""Backward of the cross-attention kernels: dQ, and dK/dV with partial stop-gradient, deterministic splits.

``P = exp(q k^T * scale - lse)`` is recomputed from the forward's log-sum-exp, ``delta = rowsum(out * dout)``, and
``dS = P * (dout v^T - delta)``. dK/dV programs own a key block and walk the queries; dQ programs own a query
block and walk the keys. Either walk is split by ``choose_split`` when its grid is too small for the GPU (A2V
dK/dV, V2A dQ): every chunk writes a float32 partial and ``_split_sum_kernel`` adds them in chunk order, then
multiplies by ``kv_grad_scale`` (dK/dV) and casts: same inputs, same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omninft_fast.kernels.common import (
    LOG2E,
    TileConfig,
    choose_split,
    dot_precision,
    head_dim_block,
    load_rows,
    sm_count,
    split_chunk,
    tile_config,
)


@triton.jit
def _attn_bwd_delta_kernel(
    Out,
    DOut,
    Delta,
    stride_ob,
    stride_on,
    stride_oh,
    stride_db,
    stride_dn,
    stride_dh,
    num_heads,
    n_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``Delta (B*H, Nq) = rowsum(out * dout)`` in float32. Grid ``(cdiv(Nq, BLOCK_M), B * H)``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    o = load_rows(Out + b * stride_ob + h * stride_oh, offs_m, stride_on, offs_d, mask)
    do = load_rows(DOut + b * stride_db + h * stride_dh, offs_m, stride_dn, offs_d, mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DK,
    DV,
    PartDK,
    PartDV,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_db,
    stride_dn,
    stride_dh,
    num_heads,
    n_q,
    n_k,
    queries_per_split,
    qk_scale,
    softmax_scale,
    kv_grad_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV of one key block of one (batch, head) over one chunk of queries.

    Grid ``(cdiv(Nk, BLOCK_N), B * H, splits)``. ``DK``/``DV`` are contiguous ``(B, Nk, H, D)``. Without a split
    the result times ``kv_grad_scale`` goes there; with one, the float32 partial goes to
    ``PartDK``/``PartDV (splits, B, Nk, H, D)``.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < n_k
    d_valid = offs_d < HEAD_DIM
    kv_mask = n_valid[:, None] & d_valid[None, :]

    k = load_rows(K + b * stride_kb + h * stride_kh, offs_n, stride_kn, offs_d, kv_mask)
    v = load_rows(V + b * stride_vb + h * stride_vh, offs_n, stride_vn, offs_d, kv_mask)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DOut + b * stride_db + h * stride_dh
    row_base = pid_bh * n_q

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    query_start = pid_s * queries_per_split
    query_end = tl.minimum(query_start + queries_per_split, n_q)
    for start_m in range(query_start, query_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < query_end
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = load_rows(q_base, offs_m, stride_qn, offs_d, q_mask)
        do = load_rows(do_base, offs_m, stride_dn, offs_d, q_mask)
        lse2 = tl.load(Lse + row_base + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + row_base + offs_m, mask=m_valid, other=0.0)

        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.where(m_valid[None, :], tl.exp2(s_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    offs = b * n_k * num_heads * HEAD_DIM + offs_n[:, None] * (num_heads * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    if SPLIT:
        part = pid_s * tl.num_programs(1) * n_k * HEAD_DIM + offs
        tl.store(PartDK + part, dk * softmax_scale, mask=kv_mask)
        tl.store(PartDV + part, dv, mask=kv_mask)
    else:
        tl.store(DK + offs, (dk * (softmax_scale * kv_grad_scale)).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + offs, (dv * kv_grad_scale).to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DQ,
    PartDQ,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_db,
    stride_dn,
    stride_dh,
    num_heads,
    n_q,
    n_k,
    keys_per_split,
    qk_scale,
    softmax_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of one query block of one (batch, head) over one chunk of keys.

    Grid ``(cdiv(Nq, BLOCK_M), B * H, splits)``. ``DQ`` is contiguous ``(B, Nq, H, D)``; with a split the float32
    partial goes to ``PartDQ (splits, B, Nq, H, D)``.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < n_q
    d_valid = offs_d < HEAD_DIM
    q_mask = m_valid[:, None] & d_valid[None, :]

    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, offs_d, q_mask)
    do = load_rows(DOut + b * stride_db + h * stride_dh, offs_m, stride_dn, offs_d, q_mask)
    lse2 = tl.load(Lse + pid_bh * n_q + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh * n_q + offs_m, mask=m_valid, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    key_start = pid_s * keys_per_split
    key_end = tl.minimum(key_start + keys_per_split, n_k)
    for start_n in range(key_start, key_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < key_end
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = load_rows(k_base, offs_n, stride_kn, offs_d, kv_mask)
        v = load_rows(v_base, offs_n, stride_vn, offs_d, kv_mask)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(n_valid[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    offs = b * n_q * num_heads * HEAD_DIM + offs_m[:, None] * (num_heads * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    if SPLIT:
        part = pid_s * tl.num_programs(1) * n_q * HEAD_DIM + offs
        tl.store(PartDQ + part, dq * softmax_scale, mask=q_mask)
    else:
        tl.store(DQ + offs, (dq * softmax_scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _split_sum_kernel(Part, Out, numel, num_splits, scale, BLOCK: tl.constexpr):
    """``Out[i] = scale * sum_s Part[s, i]``, chunks added in order (deterministic). Grid ``(cdiv(numel, BLOCK),)``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(num_splits):
        total += tl.load(Part + split * numel + offs, mask=mask)
    tl.store(Out + offs, (total * scale).to(Out.dtype.element_ty), mask=mask)


SPLIT_SUM_BLOCK = 1024


def _reduce_splits(part: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    numel = out.numel()
    grid = (triton.cdiv(numel, SPLIT_SUM_BLOCK),)
    _split_sum_kernel[grid](part, out, numel, part.shape[0], scale, BLOCK=SPLIT_SUM_BLOCK, num_warps=4)


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    kv_grad_scale: float,
    split_q: int | None = None,
    split_k: int | None = None,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    tile: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``cross_attention`` with ``dk``, ``dv`` multiplied by ``kv_grad_scale``.

    Args:
        grad_out, q, out: ``(B, Nq, H, D)``; k, v: ``(B, Nk, H, D)``; unit stride on ``D``.
        lse: ``(B, H, Nq)`` float32 from ``attention_forward``.
        softmax_scale, kv_grad_scale: as in the forward; ``kv_grad_scale == 0`` returns zero ``dk``, ``dv``
            without running their kernel.
        split_q: query chunks of the dK/dV walk; split_k: key chunks of the dQ walk; ``None`` picks
            ``choose_split``.
        dq, dk, dv: optional preallocated contiguous outputs in the inputs' dtype.
        tile: launch configuration of the dQ and dK/dV kernels; ``None`` takes ``tile_config(D, dtype)``.

    Returns:
        ``(dq, dk, dv)``, contiguous, in the inputs' dtype.
    """
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    device = q.device
    tile = tile_config(head_dim, q.dtype) if tile is None else tile
    block_m, block_n = tile.block_m, tile.block_n
    block_d = head_dim_block(head_dim)
    launch = tile.launch
    consts = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": block_m, "BLOCK_N": block_n}
    precision = dot_precision(q.dtype)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if dq is None else dq
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if dk is None else dk
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if dv is None else dv
    for name, x in (("dq", dq), ("dk", dk), ("dv", dv)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    q_blocks, k_blocks = triton.cdiv(n_q, block_m), triton.cdiv(n_k, block_n)
    sms = sm_count(device)

    delta = torch.empty(batch, heads, n_q, dtype=torch.float32, device=device)
    _attn_bwd_delta_kernel[(q_blocks, batch * heads)](
        out,
        grad_out,
        delta,
        *out.stride()[:3],
        *grad_out.stride()[:3],
        heads,
        n_q,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        num_warps=4,
    )

    if split_k is None:
        split_k = choose_split(q_blocks * batch * heads, k_blocks, sms)
    keys_per_split, splits_k = split_chunk(n_k, split_k, block_n)
    part_dq = torch.empty(splits_k, *dq.shape, dtype=torch.float32, device=device) if splits_k > 1 else dq
    _attn_bwd_dq_kernel[(q_blocks, batch * heads, splits_k)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dq,
        part_dq,
        *strides,
        heads,
        n_q,
        n_k,
        keys_per_split,
        softmax_scale * LOG2E,
        softmax_scale,
        **consts,
        SPLIT=splits_k > 1,
        PRECISION=precision,
        **launch,
    )
    if splits_k > 1:
        _reduce_splits(part_dq, dq, 1.0)

    if kv_grad_scale == 0.0:
        dk.zero_()
        dv.zero_()
        return dq, dk, dv
    if split_q is None:
        split_q = choose_split(k_blocks * batch * heads, q_blocks, sms)
    queries_per_split, splits_q = split_chunk(n_q, split_q, block_m)
    if splits_q > 1:
        part_dk = torch.empty(splits_q, *dk.shape, dtype=torch.float32, device=device)
        part_dv = torch.empty_like(part_dk)
    else:
        part_dk, part_dv = dk, dv
    _attn_bwd_dkdv_kernel[(k_blocks, batch * heads, splits_q)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dk,
        dv,
        part_dk,
        part_dv,
        *strides,
        heads,
        n_q,
        n_k,
        queries_per_split,
        softmax_scale * LOG2E,
        softmax_scale,
        kv_grad_scale,
        **consts,
        SPLIT=splits_q > 1,
        PRECISION=precision,
        **launch,
    )
    if splits_q > 1:
        _reduce_splits(part_dk, dk, kv_grad_scale)
        _reduce_splits(part_dv, dv, kv_grad_scale)
    return dq, dk, dv
