"""The fused NFT loss on CPU: the ``omninft_fast._C`` extension behind ``torch.library`` and autograd.

Importing ``omninft_fast._C`` registers the op ``omninft_fast::nft_loss_cpp_forward`` (CPU kernel in C++); this
module adds its fake implementation, for ``torch.compile`` and ``opcheck``, and runs it under the shared autograd
wrapper of the fused losses.
"""

from __future__ import annotations

import torch

from omninft_fast import _C  # noqa: F401  (registers torch.ops.omninft_fast.nft_loss_cpp_forward)
from omninft_fast.ops.nft_loss import apply_fused_nft_loss, nft_loss_fused_fake

nft_loss_cpp_forward = torch.ops.omninft_fast.nft_loss_cpp_forward.default


torch.library.register_fake("omninft_fast::nft_loss_cpp_forward")(nft_loss_fused_fake)


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
    return apply_fused_nft_loss(
        nft_loss_cpp_forward,
        v_theta,
        v_old,
        target,
        r,
        beta,
        token_weight,
        sample_weight,
        policy_scale,
        kl_weight,
        v_ref,
    )
