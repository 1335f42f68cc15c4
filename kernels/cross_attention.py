"""Triton cross-attention for LTX-2's skewed cross-modal shapes: forward, split-K combine, op registration.

A2V has many video queries and few audio keys (6144 x 126); V2A is the mirror. Each kernel parallelises over the
long axis as usual, and *splits the axis it walks* when the grid would underfill the GPU (``choose_split``):
partial results go to float32 buffers that a second small kernel reduces in a fixed order, so every result is
deterministic. The forward combine writes the log-sum-exp; the backward (``cross_attention_bwd``) reduces dK/dV
partials and applies ``kv_grad_scale`` in that epilogue; ``key_mass`` recomputes probabilities from the stored
log-sum-exp, so the ``(Nq, Nk)`` map never exists.

Layouts: ``q (B, Nq, H, D)``, ``k, v (B, Nk, H, D)`` with unit stride on ``D``; the log-sum-exp is ``(B, H, Nq)``
float32 in natural-log units. Inside the kernels logits are in base 2 (``qk_scale = softmax_scale * log2(e)``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omninft_fast.dispatch import triton_interpreting

# Streaming multiprocessors assumed when the tensors are not on a GPU (an H100 SXM).
DEFAULT_SM_COUNT = 132
# A split must walk at least this many blocks, so its partial write stays small next to its work.
MIN_BLOCKS_PER_SPLIT = 4
LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def choose_split(parallel_programs: int, walked_blocks: int, sm_count: int = DEFAULT_SM_COUNT) -> int:
    """How many chunks to cut the walked axis into, so the grid fills about two waves of the GPU.

    A kernel that runs ``parallel_programs`` programs, each walking ``walked_blocks`` blocks, is left alone when
    it already has at least ``sm_count`` programs. Otherwise the walked axis is split into
    ``ceil(2 * sm_count / parallel_programs)`` chunks, but never so many that a chunk walks fewer than
    ``MIN_BLOCKS_PER_SPLIT`` blocks. Examples on an H100 (132 SMs), 32 heads, B = 1, 64-wide blocks:
    A2V dK/dV of a 5 s clip (2 key blocks x 32 heads, 96 query blocks) -> 5 splits; V2A forward at 1280x704
    (2 query blocks x 32 heads, 220 key blocks) -> 5 splits; A2V forward (96 x 32 programs) -> 1 (no split).
    """
    if parallel_programs >= sm_count:
        return 1
    wanted = triton.cdiv(2 * sm_count, parallel_programs)
    return max(1, min(wanted, walked_blocks // MIN_BLOCKS_PER_SPLIT))


def split_chunk(length: int, split: int, block: int) -> tuple[int, int]:
    """``(rows per chunk, number of chunks)`` cutting ``length`` rows into ``split`` block-aligned, non-empty chunks."""
    if split < 1:
        raise ValueError(f"split must be >= 1, got {split}")
    chunk = triton.cdiv(triton.cdiv(length, split), block) * block
    return chunk, triton.cdiv(length, chunk)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``DEFAULT_SM_COUNT`` off the GPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: float32 inputs use three TF32 products (near-float32 accuracy on tensor cores;
    plain ``ieee`` float32 dots fall back to FMA loops that spill heavily), half types are exact anyway."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def block_config(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """One launch configuration per head dim and dtype (no autotuning: results must not depend on timing).

    Returns ``BLOCK_M`` (queries), ``BLOCK_N`` (keys), ``num_warps`` and ``num_stages``. Head dims above 64 take
    8 warps. float32 inputs (three TF32 products per dot, twice the bytes per tile) take 32 x 32 single-stage tiles
    and 8 warps above head dim 32; half types compile without spills, float32 still spills a little at head dims
    32 and 128 (see ``benchmarks/results/cross_attention_cpu.md``).
    """
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8 if head_dim > 32 else 4, "num_stages": 1}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8 if head_dim > 64 else 4, "num_stages": 2}


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """What these kernels add to ``cross_attention``'s checks: dtype, head dim and device."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q: the triton backend takes float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"q: the triton backend takes head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("q: Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")


def _head_dim_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def _load_rows(base, rows, row_stride, cols, mask):
    """The masked tile ``base[rows[:, None] * row_stride + cols[None, :]]``, zero where masked."""
    return tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


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

    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, offs_d, m_valid[:, None] & d_valid[None, :])
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
        v = _load_rows(v_base, offs_n, stride_vn, offs_d, n_valid[:, None] & d_valid[None, :])
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and log-sum-exp.

    Args:
        q: ``(B, Nq, H, D)``; k, v: ``(B, Nk, H, D)``; unit stride on ``D``.
        softmax_scale: logit scale.
        split: key chunks (flash-decoding); ``None`` picks ``choose_split``; 1 disables the combine kernel.
        out, lse: optional preallocated ``(B, Nq, H, D)`` (q's dtype, contiguous) and ``(B, H, Nq)`` float32.

    Returns:
        ``out (B, Nq, H, D)`` in q's dtype and ``lse (B, H, Nq)`` float32, natural log.
    """
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    cfg = block_config(head_dim, q.dtype)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
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
    block_d = _head_dim_block(head_dim)
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
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
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


# ---------------------------------------------------------------------------------------------------------------
# torch.library ops (fake implementations for torch.compile / FSDP tracing) and autograd.


@torch.library.custom_op("omninft_fast::cross_attention_fwd", mutates_args=())
def cross_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, kv_grad_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Nq, H, D), lse (B, H, Nq) float32)``; ``kv_grad_scale`` only matters to the backward."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return attention_forward(q, k, v, softmax_scale)


@cross_attention_fwd.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, kv_grad_scale: float):
    batch, n_q, heads, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (batch, heads, n_q), dtype=torch.float32
    )


@torch.library.custom_op("omninft_fast::cross_attention_bwd", mutates_args=())
def cross_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    kv_grad_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the inputs' dtype; ``dk`` and ``dv`` already multiplied by ``kv_grad_scale``."""
    from omninft_fast.kernels.cross_attention_bwd import attention_backward

    grad_out, q, k, v, out = (x if x.stride(-1) == 1 else x.contiguous() for x in (grad_out, q, k, v, out))
    return attention_backward(grad_out, q, k, v, out, lse, softmax_scale, kv_grad_scale)


@cross_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, softmax_scale, kv_grad_scale):
    contiguous = torch.contiguous_format
    return (
        torch.empty_like(q, memory_format=contiguous),
        torch.empty_like(k, memory_format=contiguous),
        torch.empty_like(v, memory_format=contiguous),
    )


@torch.library.custom_op("omninft_fast::cross_attention_key_mass", mutates_args=())
def cross_attention_key_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """``(B, Nk)`` float32: softmax probability per key summed over queries, averaged over heads."""
    from omninft_fast.kernels.key_mass import attention_key_mass

    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    return attention_key_mass(q, k, lse, softmax_scale)


@cross_attention_key_mass.register_fake
def _(q, k, lse, softmax_scale):
    return q.new_empty((k.shape[0], k.shape[1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, softmax_scale, kv_grad_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale = softmax_scale
    ctx.kv_grad_scale = kv_grad_scale


def _backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = cross_attention_bwd(grad_out, q, k, v, out, lse, ctx.softmax_scale, ctx.kv_grad_scale)
    return dq, dk, dv, None, None


cross_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def cross_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    kv_grad_scale: float,
    return_key_mass: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton backend of ``omninft_fast.cross_attention`` (inputs already validated there).

    Args:
        q: ``(B, Nq, H, D)``; k, v: ``(B, Nk, H, D)``; float16, bfloat16 or float32, CUDA (or CPU when
            ``TRITON_INTERPRET=1``).
        softmax_scale: logit scale.
        kv_grad_scale: multiplies the gradients of ``k`` and ``v`` (0 skips their kernels: exact zeros).
        return_key_mass: also compute the ``(B, Nk)`` float32 key mass (one extra pass, no gradient).

    Returns:
        ``out (B, Nq, H, D)`` in q's dtype and the key mass or ``None``.

    Split heuristic (``choose_split``, per kernel, from the shape and the SM count, 132 off the GPU): a kernel whose
    grid has fewer programs than SMs cuts the axis it walks into ``ceil(2 * SMs / programs)`` chunks of at least
    ``MIN_BLOCKS_PER_SPLIT`` blocks. In practice the forward and dQ split the key axis for V2A (few audio queries,
    many video keys) and dK/dV split the query axis for A2V (many video queries, few audio keys); A2V forward/dQ
    and V2A dK/dV already fill the GPU and run unsplit. Partials are float32 and reduced in a fixed order.
    """
    check_inputs(q, k, v)
    out, lse = torch.ops.omninft_fast.cross_attention_fwd(q, k, v, float(softmax_scale), float(kv_grad_scale))
    key_mass = None
    if return_key_mass:
        key_mass = torch.ops.omninft_fast.cross_attention_key_mass(q.detach(), k.detach(), lse.detach(), softmax_scale)
    return out, key_mass


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_FLOAT32_POINTERS = {"Lse", "Delta", "Mass", "Part", "PartAcc", "PartMax", "PartSum", "PartDK", "PartDV", "PartDQ"}
_FLOAT_SCALARS = {"qk_scale", "softmax_scale", "kv_grad_scale", "scale"}


def sm90_kernel_specs(
    head_dims: tuple[int, ...] = (32, 64, 128), dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES
) -> list:
    """Every kernel specialisation the backend launches for these head dims and dtypes, as ``KernelSpec``s for
    ``omninft_fast.kernels.compile_check.compile_specs_for_sm90`` (both values of each ``SPLIT`` flag)."""
    from omninft_fast.kernels import cross_attention_bwd, key_mass
    from omninft_fast.kernels.compile_check import KernelSpec, kernel_path

    specs = []
    for dtype in dtypes:
        for head_dim in head_dims:
            cfg = block_config(head_dim, dtype)
            blocks = {"HEAD_DIM": head_dim, "BLOCK_D": _head_dim_block(head_dim)}
            tiles = {**blocks, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "PRECISION": dot_precision(dtype)}
            launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
            kernels = [
                (_attn_fwd_kernel, {**tiles, "SPLIT": False}, launch),
                (_attn_fwd_kernel, {**tiles, "SPLIT": True}, launch),
                (_attn_combine_kernel, {**blocks, "BLOCK_M": cfg["BLOCK_M"]}, {"num_warps": 4}),
                (cross_attention_bwd._attn_bwd_delta_kernel, {**blocks, "BLOCK_M": cfg["BLOCK_M"]}, {"num_warps": 4}),
                (cross_attention_bwd._attn_bwd_dq_kernel, {**tiles, "SPLIT": False}, launch),
                (cross_attention_bwd._attn_bwd_dq_kernel, {**tiles, "SPLIT": True}, launch),
                (cross_attention_bwd._attn_bwd_dkdv_kernel, {**tiles, "SPLIT": False}, launch),
                (cross_attention_bwd._attn_bwd_dkdv_kernel, {**tiles, "SPLIT": True}, launch),
                (key_mass._key_mass_kernel, tiles, launch),
            ]
            if head_dim == head_dims[0]:
                block = {"BLOCK": cross_attention_bwd.SPLIT_SUM_BLOCK}
                kernels.append((cross_attention_bwd._split_sum_kernel, block, {"num_warps": 4}))
            for kernel, constexprs, options in kernels:
                signature = {}
                for arg in kernel.arg_names:
                    if arg in constexprs:
                        continue
                    if arg[0].isupper():
                        signature[arg] = "*fp32" if arg in _FLOAT32_POINTERS else f"*{_TRITON_TYPES[dtype]}"
                    else:
                        signature[arg] = "fp32" if arg in _FLOAT_SCALARS else "i32"
                split = f" split={constexprs['SPLIT']}" if "SPLIT" in constexprs else ""
                label = f"{_TRITON_TYPES[dtype]} D={head_dim}{split}"
                specs.append(KernelSpec(kernel_path(kernel), signature, constexprs, label=label, **options))
    return specs


__all__ = [
    "attention_forward",
    "choose_split",
    "cross_attention_triton",
    "sm90_kernel_specs",
    "split_chunk",
]
