"""The fused NFT loss on CPU: the ``omninft_fast._C`` extension behind ``torch.library`` and autograd.

Importing ``omninft_fast._C`` registers the op ``omninft_fast::nft_loss_cpp_forward`` (CPU kernel in C++); this
module adds its fake implementation, for ``torch.compile`` and ``opcheck``, and the autograd wrapper.
"""

from __future__ import annotations

import torch

from omninft_fast import _C  # noqa: F401  (registers torch.ops.omninft_fast.nft_loss_cpp_forward)
from omninft_fast._checks import compute_dtype

nft_loss_cpp_forward = torch.ops.omninft_fast.nft_loss_cpp_forward.default


@torch.library.register_fake("omninft_fast::nft_loss_cpp_forward")
def _(
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
    loss = v_theta.new_empty((), dtype=compute_dtype(v_theta.dtype))
    return loss, torch.empty_like(v_theta, memory_format=torch.contiguous_format)


class NFTLossCppFunction(torch.autograd.Function):
    """Forward computes the loss and its gradient together; backward only rescales the saved gradient."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        v_theta: torch.Tensor,
        v_old: torch.Tensor,
        target: torch.Tensor,
        r: torch.Tensor,
        beta: float,
        token_weight: torch.Tensor | None,
        sample_weight: torch.Tensor | None,
        policy_scale: float,
        kl_weight: float,
        v_ref: torch.Tensor | None,
    ) -> torch.Tensor:
        loss, grad = nft_loss_cpp_forward(
            v_theta, v_old, target, r, token_weight, sample_weight, v_ref, beta, policy_scale, kl_weight
        )
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        # Compiled graphs always rescale: a data-dependent branch would break the graph.
        if torch.compiler.is_compiling() or grad_output.item() != 1.0:
            grad = grad * grad_output.to(grad.dtype)
        return grad, None, None, None, None, None, None, None, None, None


def nft_loss_cpp(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    token_weight: torch.Tensor | None,
    sample_weight: torch.Tensor | None,
    policy_scale: float,
    kl_weight: float,
    v_ref: torch.Tensor | None,
) -> torch.Tensor:
    """C++ implementation of ``nft_loss`` (inputs already validated).

    Args:
        v_theta, v_old, target: ``(B, N, C)`` CPU velocities; ``v_ref`` the same shape or ``None``.
        r: ``(B,)``; token_weight: ``(B, N)`` or ``None``; sample_weight: ``(B,)`` or ``None``.

    Returns:
        Scalar loss in float32 (float64 for float64 ``v_theta``); its gradient flows to ``v_theta`` only.
    """
    return NFTLossCppFunction.apply(
        v_theta,
        v_old.detach(),
        target.detach(),
        r.detach(),
        beta,
        token_weight,
        sample_weight,
        policy_scale,
        kl_weight,
        None if v_ref is None else v_ref.detach(),
    )
