"""Forward cross-attention kernels for LTX-2's skewed cross-modal shapes, with a split-K combine.

A2V has many video queries and few audio keys (6144 x 126); V2A is the mirror. The forward kernel parallelises
over query blocks and *splits the key axis* when the grid would underfill the GPU (``choose_split``): partial
results go to float32 buffers that ``_attn_combine_kernel`` reduces in a fixed order and turns into the output and
the log-sum-exp, so every result is deterministic.

Layouts: ``q (B, Nq, H, D)``, ``k, v (B, Nk, H, D)`` with unit stride on ``D``; the log-sum-exp is ``(B, H, Nq)``
float32 in natural-log units. Inside the kernels logits are in base 2 (``qk_scale = softmax_scale * log2(e)``).
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
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    PartAcc,
    PartMax,
    PartSum,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_on,
    stride_oh,
    num_heads,
    n_q,
    n_k,
    keys_per_split,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One query block of one (batch, head) over one chunk of keys: online softmax in base 2.

    Grid ``(cdiv(Nq, BLOCK_M), B * H, splits)``. Without a split it writes the normalised output and the
    log-sum-exp; with one it writes the unnormalised float32 accumulator, running max and sum of its chunk to
    ``PartAcc (splits, B*H, Nq, D)``, ``PartMax`` and ``PartSum (splits, B*H, Nq)`` for ``_attn_combine_kernel``.
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

    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, offs_d, m_valid[:, None] & d_valid[None, :])
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    key_start = pid_s * keys_per_split
    key_end = tl.minimum(key_start + keys_per_split, n_k)
    for start_n in range(key_start, key_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < key_end
        k_t = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=n_valid[None, :] & d_valid[:, None], other=0.0
        )
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(v_base, offs_n, stride_vn, offs_d, n_valid[:, None] & d_valid[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if SPLIT:
        row = (pid_s * tl.num_programs(1) + pid_bh) * n_q + offs_m
        tl.store(PartMax + row, m_i, mask=m_valid)
        tl.store(PartSum + row, l_i, mask=m_valid)
        acc_ptrs = PartAcc + row[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(acc_ptrs, acc, mask=m_valid[:, None] & d_valid[None, :])
    else:
        out = acc / l_i[:, None]
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
        tl.store(Lse + pid_bh * n_q + offs_m, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=m_valid)


@triton.jit
def _attn_combine_kernel(
    Out,
    Lse,
    PartAcc,
    PartMax,
    PartSum,
    stride_ob,
    stride_on,
    stride_oh,
    num_heads,
    n_q,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Merge the key chunks of ``_attn_fwd_kernel`` in chunk order; write the output and the log-sum-exp.

    Grid ``(cdiv(Nq, BLOCK_M), B * H)``.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < n_q
    mask = m_valid[:, None] & (offs_d[None, :] < HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split in range(num_splits):
        row = (split * tl.num_programs(1) + pid_bh) * n_q + offs_m
        m_s = tl.load(PartMax + row, mask=m_valid, other=0.0)
        l_s = tl.load(PartSum + row, mask=m_valid, other=0.0)
        acc_s = tl.load(PartAcc + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_s - m_new)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new

    l_i = tl.where(m_valid, l_i, 1.0)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse + pid_bh * n_q + offs_m, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=m_valid)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    split: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    tile: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and log-sum-exp.

    Args:
        q: ``(B, Nq, H, D)``; k, v: ``(B, Nk, H, D)``; unit stride on ``D``.
        softmax_scale: logit scale.
        split: key chunks (flash-decoding); ``None`` picks ``choose_split``; 1 disables the combine kernel.
        out, lse: optional preallocated ``(B, Nq, H, D)`` (q's dtype, contiguous) and ``(B, H, Nq)`` float32.
        tile: launch configuration; ``None`` takes ``tile_config(D, dtype)``.

    Returns:
        ``out (B, Nq, H, D)`` in q's dtype and ``lse (B, H, Nq)`` float32, natural log.
    """
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    tile = tile_config(head_dim, q.dtype) if tile is None else tile
    block_m, block_n = tile.block_m, tile.block_n
    q_blocks = triton.cdiv(n_q, block_m)
    if split is None:
        split = choose_split(q_blocks * batch * heads, triton.cdiv(n_k, block_n), sm_count(q.device))
    keys_per_split, splits = split_chunk(n_k, split, block_n)
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    lse = torch.empty(batch, heads, n_q, dtype=torch.float32, device=q.device) if lse is None else lse
    if splits > 1:
        part_acc = torch.empty(splits, batch * heads, n_q, head_dim, dtype=torch.float32, device=q.device)
        part_max = torch.empty(splits, batch * heads, n_q, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = lse
    block_d = head_dim_block(head_dim)
    _attn_fwd_kernel[(q_blocks, batch * heads, splits)](
        q,
        k,
        v,
        out,
        lse,
        part_acc,
        part_max,
        part_sum,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        heads,
        n_q,
        n_k,
        keys_per_split,
        softmax_scale * LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SPLIT=splits > 1,
        PRECISION=dot_precision(q.dtype),
        **tile.launch,
    )
    if splits > 1:
        _attn_combine_kernel[(q_blocks, batch * heads)](
            out,
            lse,
            part_acc,
            part_max,
            part_sum,
            *out.stride()[:3],
            heads,
            n_q,
            splits,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_M=block_m,
            num_warps=4,
        )
    return out, lse
