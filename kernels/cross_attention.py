"""Triton cross-attention as ``torch.library`` ops: forward, backward with partial stop-gradient, key mass.

The kernels live in ``cross_attention_fwd`` (forward and split-K combine), ``cross_attention_bwd`` (dQ, dK/dV with
``kv_grad_scale``) and ``key_mass`` (Eq 10's per-key mass from the stored log-sum-exp, no ``(Nq, Nk)`` map). This
module registers them as custom ops with fake implementations (``torch.compile``, FSDP tracing) and autograd, and
exposes ``cross_attention_triton``, the Triton backend of ``omninft_fast.cross_attention``.

Layouts: ``q (B, Nq, H, D)``, ``k, v (B, Nk, H, D)``; the log-sum-exp is ``(B, H, Nq)`` float32, natural log.
"""

from __future__ import annotations

import torch

from omninft_fast.kernels import cross_attention_bwd as bwd_kernels
from omninft_fast.kernels import cross_attention_fwd as fwd_kernels
from omninft_fast.kernels import key_mass as key_mass_kernels
from omninft_fast.kernels.common import (
    SUPPORTED_DTYPES,
    TileConfig,
    check_inputs,
    dot_precision,
    head_dim_block,
    tile_config,
)
from omninft_fast.kernels.compile_check import KernelSpec, kernel_path


@torch.library.custom_op("omninft_fast::cross_attention_fwd", mutates_args=())
def cross_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, kv_grad_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Nq, H, D), lse (B, H, Nq) float32)``; ``kv_grad_scale`` only matters to the backward."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return fwd_kernels.attention_forward(q, k, v, softmax_scale)


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
    grad_out, q, k, v, out = (x if x.stride(-1) == 1 else x.contiguous() for x in (grad_out, q, k, v, out))
    return bwd_kernels.attention_backward(grad_out, q, k, v, out, lse, softmax_scale, kv_grad_scale)


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
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    return key_mass_kernels.attention_key_mass(q, k, lse, softmax_scale)


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
    specs = []
    for dtype in dtypes:
        for head_dim in head_dims:
            blocks = {"HEAD_DIM": head_dim, "BLOCK_D": head_dim_block(head_dim)}

            def tiled(tile: TileConfig, blocks: dict = blocks, dtype: torch.dtype = dtype) -> dict:
                return {**blocks, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "PRECISION": dot_precision(dtype)}

            tile = tile_config(head_dim, dtype)
            mass = tile_config(head_dim, dtype, "key_mass")
            kernels = [
                (fwd_kernels._attn_fwd_kernel, {**tiled(tile), "SPLIT": False}, tile.launch),
                (fwd_kernels._attn_fwd_kernel, {**tiled(tile), "SPLIT": True}, tile.launch),
                (fwd_kernels._attn_combine_kernel, {**blocks, "BLOCK_M": tile.block_m}, {"num_warps": 4}),
                (bwd_kernels._attn_bwd_delta_kernel, {**blocks, "BLOCK_M": tile.block_m}, {"num_warps": 4}),
                (bwd_kernels._attn_bwd_dq_kernel, {**tiled(tile), "SPLIT": False}, tile.launch),
                (bwd_kernels._attn_bwd_dq_kernel, {**tiled(tile), "SPLIT": True}, tile.launch),
                (bwd_kernels._attn_bwd_dkdv_kernel, {**tiled(tile), "SPLIT": False}, tile.launch),
                (bwd_kernels._attn_bwd_dkdv_kernel, {**tiled(tile), "SPLIT": True}, tile.launch),
                (key_mass_kernels._key_mass_kernel, tiled(mass), mass.launch),
            ]
            if head_dim == head_dims[0]:
                block = {"BLOCK": bwd_kernels.SPLIT_SUM_BLOCK}
                kernels.append((bwd_kernels._split_sum_kernel, block, {"num_warps": 4}))
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


__all__ = ["cross_attention_triton", "sm90_kernel_specs"]
