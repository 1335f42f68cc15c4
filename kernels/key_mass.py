"""Per-key attention mass without the attention map (Eq 10's inner sum, V2A: audio queries, video keys).

``mass[b, j] = mean_h sum_i exp(q_i . k_j * scale - lse_i)`` with the forward's log-sum-exp: one program owns a key
block of one batch element and walks every head and query block, so the ``(Nq, Nk)`` map never exists and the only
extra memory is the ``(B, Nk)`` float32 output. It runs only when asked for (sampling time, no gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omninft_fast.kernels.common import LOG2E, TileConfig, dot_precision, head_dim_block, load_rows, tile_config


@triton.jit
def _key_mass_kernel(
    Q,
    K,
    Lse,
    Mass,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    num_heads,
    n_q,
    n_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Key mass of one key block of one batch element. Grid ``(cdiv(Nk, BLOCK_N), B)``; ``Mass`` is ``(B, Nk)``."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < n_k
    d_valid = offs_d < HEAD_DIM

    k_mask = n_valid[:, None] & d_valid[None, :]

    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h in range(num_heads):
        k = load_rows(K + b * stride_kb + h * stride_kh, offs_n, stride_kn, offs_d, k_mask)
        q_base = Q + b * stride_qb + h * stride_qh
        lse_base = Lse + (b * num_heads + h) * n_q
        for start_m in range(0, n_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < n_q
            q = load_rows(q_base, offs_m, stride_qn, offs_d, m_valid[:, None] & d_valid[None, :])
            lse2 = tl.load(lse_base + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            p_t = tl.where(m_valid[None, :], tl.exp2(s_t - lse2[None, :]), 0.0)
            mass += tl.sum(p_t, 1)
    tl.store(Mass + b * n_k + offs_n, mass / num_heads, mask=n_valid)


def attention_key_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    mass: torch.Tensor | None = None,
    tile: TileConfig | None = None,
) -> torch.Tensor:
    """Softmax probability each key receives, summed over queries and averaged over heads.

    Args:
        q: ``(B, Nq, H, D)``; k: ``(B, Nk, H, D)``; unit stride on ``D``.
        lse: ``(B, H, Nq)`` float32 log-sum-exp from ``attention_forward``.
        softmax_scale: the forward's logit scale.
        mass: optional preallocated contiguous ``(B, Nk)`` float32 output.
        tile: launch configuration; ``None`` takes ``tile_config(D, dtype, "key_mass")``.

    Returns:
        ``(B, Nk)`` float32.
    """
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    tile = tile_config(head_dim, q.dtype, "key_mass") if tile is None else tile
    mass = torch.empty(batch, n_k, dtype=torch.float32, device=q.device) if mass is None else mass
    _key_mass_kernel[(triton.cdiv(n_k, tile.block_n), batch)](
        q,
        k,
        lse,
        mass,
        *q.stride()[:3],
        *k.stride()[:3],
        heads,
        n_q,
        n_k,
        softmax_scale * LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_D=head_dim_block(head_dim),
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        PRECISION=dot_precision(q.dtype),
        **tile.launch,
    )
    return mass
