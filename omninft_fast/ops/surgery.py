"""Layer-wise gradient surgery: Eq 8 (partial stop-gradient) and Eq 9 (its per-layer schedule)."""

from __future__ import annotations

import torch

from omninft_fast._checks import check_scalar, check_tensor


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def partial_detach(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq 8: ``alpha * sg(x) + (1 - alpha) * x``.

    The value is ``x`` exactly (bit for bit); the gradient reaching ``x`` is scaled by ``1 - alpha``.
    ``alpha = 0`` returns ``x`` itself and ``alpha = 1`` returns ``x.detach()``.

    Args:
        x: any tensor.
        alpha: detach ratio in ``[0, 1]``.
    """
    check_tensor("x", x, floating=False)
    alpha = check_scalar("alpha", alpha, low=0.0, high=1.0)
    if alpha == 0.0:
        return x
    if alpha == 1.0:
        return x.detach()
    return _ScaleGrad.apply(x, 1.0 - alpha)


def _parse_spec(spec: str, num_layers: int) -> list[float]:
    alphas = [0.0] * num_layers
    for part in spec.split(","):
        entry = part.strip()
        malformed = f"spec entry {entry!r} must look like 'first-last:alpha' or 'layer:alpha'"
        layers, sep, value = entry.partition(":")
        if not sep:
            raise ValueError(malformed)
        first, _, last = layers.partition("-")
        try:
            lo, hi = int(first), int(last or first)
            alpha = float(value)
        except ValueError:
            raise ValueError(malformed) from None
        if not 0 <= lo <= hi < num_layers:
            raise ValueError(f"spec entry {entry!r}: layers must satisfy 0 <= first <= last < {num_layers}")
        alpha = check_scalar(f"spec alpha for layers {lo}-{hi}", alpha, low=0.0, high=1.0)
        for layer in range(lo, hi + 1):
            alphas[layer] = alpha
    return alphas


def detach_schedule(num_layers: int, *, boundary: int = 10, alpha: float = 0.1, spec: str | None = None) -> list[float]:
    """Eq 9: the detach ratio of each layer, ``alpha`` for layers ``l < boundary`` and 0 from there on.

    ``spec`` replaces the two-zone rule with explicit ranges, e.g. ``"0-9:0.1,40-47:0.3"``; layers it does not
    name get 0.

    Returns:
        ``num_layers`` floats in ``[0, 1]``; A2V cross-attention of layer ``l`` uses ``kv_grad_scale = 1 - a[l]``.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if spec is not None:
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"spec must be a non-empty string such as '0-9:0.1', got {spec!r}")
        return _parse_spec(spec, num_layers)
    if isinstance(boundary, bool) or not isinstance(boundary, int) or boundary < 0:
        raise ValueError(f"boundary must be a non-negative int, got {boundary!r}")
    alpha = check_scalar("alpha", alpha, low=0.0, high=1.0)
    return [alpha if layer < boundary else 0.0 for layer in range(num_layers)]
