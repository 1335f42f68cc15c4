"""Value checks the trainer runs once per iteration on what it already holds.

The ops check shapes and arguments but not tensor values (a value check is a host sync on a GPU), so the trainer
checks rewards, optimality probabilities and region weights here, once per iteration, with the ops' own checks
(``omninft_fast._checks``): a bad value raises ``TrainingDiverged`` carrying the ops' ``ValueError`` naming the
value and its first bad element.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from omninft_fast._checks import check_finite_tensor, check_range


class TrainingDiverged(RuntimeError):
    """A reward, optimality probability, region weight, loss or gradient norm became invalid (NaN, infinite or
    out of range)."""


def _diverged(check: Callable[..., None], *args: object) -> None:
    """Run ``check(*args)``; turn its ``ValueError`` into ``TrainingDiverged`` (the cause keeps the original)."""
    try:
        check(*args)
    except ValueError as error:
        raise TrainingDiverged(str(error)) from error


def check_finite(source: str, value: torch.Tensor) -> None:
    """A loss or gradient norm: raise ``TrainingDiverged`` when ``value`` holds a NaN or infinity."""
    if not bool(torch.isfinite(value).all()):
        raise TrainingDiverged(f"{source} is not finite ({value.flatten()[:4].tolist()})")


def check_rewards(values: dict[str, torch.Tensor]) -> None:
    """Every ``(B,)`` reward is finite (``rewards['name'][i]`` names the first bad one)."""
    for name, value in values.items():
        _diverged(check_finite_tensor, f"rewards[{name!r}]", value)


def check_optimality(r_video: torch.Tensor, r_audio: torch.Tensor) -> None:
    """Both ``(B,)`` optimality probabilities are finite and in [0, 1]."""
    for name, r in (("r_video", r_video), ("r_audio", r_audio)):
        _diverged(check_finite_tensor, name, r)
        _diverged(check_range, name, r, 0.0, 1.0)


def _check_positive_sums(name: str, weight: torch.Tensor) -> None:
    sums = weight.sum(dim=1)
    if bool((sums <= 0).any()):
        b = int((sums <= 0).nonzero()[0])
        raise ValueError(f"{name}[{b}] sums to {sums[b].item()}; each sample's weights must sum to > 0")


def check_token_weights(weight: torch.Tensor | None) -> None:
    """``(B, Nv)`` region weights are finite and non-negative, and each sample's sum to more than 0."""
    if weight is None:
        return
    _diverged(check_finite_tensor, "token_weight", weight)
    _diverged(check_range, "token_weight", weight, 0.0, float("inf"))
    _diverged(_check_positive_sums, "token_weight", weight)
