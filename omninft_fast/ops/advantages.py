"""Advantages: Eq 6 (group-normalised advantage and optimality probability) and Eq 7 (modality routing)."""

from __future__ import annotations

import torch

from omninft_fast._checks import (
    check_finite_tensor,
    check_same_device,
    check_scalar,
    check_shape,
    check_tensor,
    compute_dtype,
    value_checks_on,
)

STD_MODES = ("group", "global")
ROUTING_MODES = ("modality", "shared", "gdpo")


def _centered(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``x - mean(x)`` over ``dim`` (all elements when ``None``), exactly 0 where the values are all equal."""
    if dim is None:
        mean, lo, hi = x.mean(), x.min(), x.max()
    else:
        mean = x.mean(dim=dim, keepdim=True)
        lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    return torch.where(lo == hi, torch.zeros_like(x), x - mean)


def _safe_divide(centered: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``centered / z``, exactly 0 where ``z == 0`` (then ``centered`` is 0 too: a flat group or batch)."""
    return torch.where(z > 0, centered / torch.where(z > 0, z, 1.0), 0.0)


def group_advantages(
    rewards: torch.Tensor, *, std: str = "group", eps: float = 1e-6, check_values: bool | None = None
) -> torch.Tensor:
    """Eq 6's advantage ``A = (R - mean_group(R)) / (Z + eps)`` for each of ``G`` samples of ``P`` prompts.

    ``Z`` is the population standard deviation of each group (``std="group"``) or of all rewards
    (``std="global"``, DiffusionNFT's choice). A group whose rewards are all equal gets exactly 0.

    That ``rewards`` is finite (``check_group_advantages_values``) is checked only when ``check_values`` is on: by
    default for CPU tensors, never for CUDA tensors (the check would wait for the GPU) nor while ``torch.compile``
    traces.

    Args:
        rewards: ``(P, G)`` raw rewards, any real dtype.
        std: ``"group"`` or ``"global"``.
        eps: added to ``Z``, ``>= 0``.
        check_values: check the values (True / False); None: ``$OMNINFT_CHECK_VALUES`` (``1`` / ``0``) if set, else
            on for CPU tensors. Always off while ``torch.compile`` traces.

    Returns:
        ``(P, G)`` advantages in float32 (float64 for float64 rewards).
    """
    check_tensor("rewards", rewards, ndim=2, floating=False)
    if rewards.dtype.is_complex or rewards.dtype == torch.bool:
        raise TypeError(f"rewards must be real-valued, got {rewards.dtype}")
    if rewards.numel() == 0:
        raise ValueError(f"rewards must be non-empty, got shape {tuple(rewards.shape)}")
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    eps = check_scalar("eps", eps, low=0.0)
    if value_checks_on(check_values, rewards.device):
        check_group_advantages_values(rewards)
    x = rewards.detach().to(compute_dtype(rewards.dtype) if rewards.is_floating_point() else torch.float32)
    centered = _centered(x, dim=1)
    z = x.std(dim=1, keepdim=True, correction=0) if std == "group" else x.std(correction=0)
    return _safe_divide(centered, z + eps)


def check_group_advantages_values(rewards: torch.Tensor) -> None:
    """The value check of ``group_advantages``: ``ValueError`` naming the first non-finite reward (any shape).
    Reads the values, so it waits for a GPU to finish the work queued so far."""
    check_finite_tensor("rewards", rewards)


def optimality_probability(adv: torch.Tensor, *, clip: float = 1.0) -> torch.Tensor:
    """Eq 6: ``r = 1/2 + 1/2 * clamp(adv / clip, -1, 1) = 1/2 + clamp(adv, -clip, clip) / (2 clip)``, in ``[0, 1]``.

    ``clip = 1`` is the paper's form; DiffusionNFT and the authors' release clip advantages at 5 (``clip=5``).

    Args:
        adv: advantages of any shape.
        clip: advantage magnitude that maps to ``r = 0`` or ``1``, ``> 0``.
    """
    check_tensor("adv", adv)
    clip = check_scalar("clip", clip, low=0.0, low_inclusive=False)
    return 0.5 + 0.5 * torch.clamp(adv.detach() / clip, -1.0, 1.0)


def route_advantages(
    adv_video: torch.Tensor,
    adv_audio: torch.Tensor,
    adv_av: torch.Tensor,
    *,
    mode: str = "modality",
    eps: float = 1e-6,
    check_values: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq 7: combine per-reward advantages into one advantage per branch.

    - ``modality`` (OmniNFT): video branch ``Av + Aav``, audio branch ``Aa + Aav``.
    - ``shared`` (vanilla baseline): both branches ``Av + Aa + Aav``.
    - ``gdpo``: ``Av + Aa + Aav`` whitened over all samples (``(s - mean) / (std + eps)``) to both branches.

    That the advantages are finite (``check_route_advantages_values``) is checked only when ``check_values`` is on:
    by default for CPU tensors, never for CUDA tensors (the check would wait for the GPU) nor while
    ``torch.compile`` traces.

    Args:
        adv_video, adv_audio, adv_av: advantages of the same shape, e.g. ``(P, G)`` from ``group_advantages``.
        mode: ``modality``, ``shared`` or ``gdpo``.
        eps: added to the standard deviation of ``gdpo``, ``>= 0``.
        check_values: check the values (True / False); None: ``$OMNINFT_CHECK_VALUES`` (``1`` / ``0``) if set, else
            on for CPU tensors. Always off while ``torch.compile`` traces.

    Returns:
        ``(adv_for_video_branch, adv_for_audio_branch)``, each of the input shape.
    """
    check_tensor("adv_video", adv_video)
    check_tensor("adv_audio", adv_audio)
    check_tensor("adv_av", adv_av)
    check_shape("adv_audio", adv_audio, adv_video.shape, "the shape of adv_video")
    check_shape("adv_av", adv_av, adv_video.shape, "the shape of adv_video")
    check_same_device("adv_video", adv_video, adv_audio=adv_audio, adv_av=adv_av)
    if mode not in ROUTING_MODES:
        raise ValueError(f"mode must be one of {ROUTING_MODES}, got {mode!r}")
    if mode == "gdpo" and adv_video.numel() == 0:
        raise ValueError(
            f"mode 'gdpo' whitens over the samples and needs at least one, got shape {tuple(adv_video.shape)}"
        )
    eps = check_scalar("eps", eps, low=0.0)
    if value_checks_on(check_values, adv_video.device):
        check_route_advantages_values(adv_video, adv_audio, adv_av)
    if mode == "modality":
        return adv_video + adv_av, adv_audio + adv_av
    total = adv_video + adv_audio + adv_av
    if mode == "gdpo":
        total = _safe_divide(_centered(total, dim=None), total.std(correction=0) + eps)
    return total, total.clone()


def check_route_advantages_values(adv_video: torch.Tensor, adv_audio: torch.Tensor, adv_av: torch.Tensor) -> None:
    """The value check of ``route_advantages``: ``ValueError`` naming the first non-finite element of
    ``adv_video``, ``adv_audio`` or ``adv_av``. Reads the values, so it waits for a GPU to finish the work queued so
    far."""
    for name, adv in (("adv_video", adv_video), ("adv_audio", adv_audio), ("adv_av", adv_av)):
        check_finite_tensor(name, adv)
