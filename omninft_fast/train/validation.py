"""Value checks the trainer runs once per iteration on what it already holds.

The ops check shapes and arguments but not tensor values (a value check is a host sync on a GPU), so the trainer
checks rewards, optimality probabilities and region weights here, once per iteration, with the ops' public value
checks (``of.check_*_values``): a bad value raises ``TrainingDiverged`` carrying the ops' ``ValueError`` naming the
value and its first bad element.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import omninft_fast as of


class TrainingDiverged(RuntimeError):
    """A reward, optimality probability, region weight, loss or gradient norm became invalid (NaN, infinite or
    out of range)."""


def _diverged(label: str | None, check: Callable[..., None], *args: object, **kwargs: object) -> None:
    """Run ``check``; turn its ``ValueError`` into ``TrainingDiverged`` (prefixed by ``label``, the cause kept)."""
    try:
        check(*args, **kwargs)
    except ValueError as error:
        raise TrainingDiverged(f"{label}: {error}" if label else str(error)) from error


def check_finite(source: str, value: torch.Tensor) -> None:
    """A loss or gradient norm: raise ``TrainingDiverged`` when ``value`` holds a NaN or infinity."""
    if not bool(torch.isfinite(value).all()):
        raise TrainingDiverged(f"{source} is not finite ({value.flatten()[:4].tolist()})")


def check_rewards(values: dict[str, torch.Tensor]) -> None:
    """Every ``(B,)`` reward is finite (the message names the reward and its first bad element)."""
    for name, value in values.items():
        _diverged(f"reward {name!r}", of.check_group_advantages_values, value)


def check_loss_inputs(r_video: torch.Tensor, r_audio: torch.Tensor, token_weight: torch.Tensor | None) -> None:
    """What the NFT losses take: both ``(B,)`` optimality probabilities in [0, 1]; the ``(B, Nv)`` region weights
    finite and non-negative with each sample's sum above 0 (``of.check_nft_loss_values``)."""
    _diverged("r_video", of.check_nft_loss_values, r_video, token_weight=token_weight)
    _diverged("r_audio", of.check_nft_loss_values, r_audio)
