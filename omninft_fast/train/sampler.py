"""Deterministic Euler ODE sampler over a shared timestep (Eq 1-2), separate noise per modality, with LTX-2's
classifier-free guidance and STG as an option."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from omninft_fast.train.model import AVVelocityModel, Condition


def time_grid(num_steps: int, *, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(num_steps + 1,)`` decreasing times from 1 to 0, shifted by ``t' = s t / (1 + (s - 1) t)``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, device=device, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


@dataclass(frozen=True)
class Guidance:
    """LTX-2's guidance of a rollout: classifier-free guidance per modality and STG.

    Attributes:
        uncond: the ``B`` samples' unconditional (empty prompt) condition; needed when a cfg scale is not 1.
        video_cfg, audio_cfg: classifier-free guidance scales (1: off).
        stg_scale: STG scale (0: off); its pass skips the self-attention of ``stg_blocks``.
        stg_shared_prefix: the perturbed pass shares the conditional pass's blocks before the first of
            ``stg_blocks`` (``AVVelocityModel.forward``'s ``copied_rows``); off, every pass runs every block.
    """

    uncond: Condition | None
    video_cfg: float = 1.0
    audio_cfg: float = 1.0
    stg_scale: float = 0.0
    stg_blocks: tuple[int, ...] = ()
    stg_shared_prefix: bool = True

    @property
    def uses_uncond(self) -> bool:
        return self.video_cfg != 1.0 or self.audio_cfg != 1.0

    @property
    def uses_stg(self) -> bool:
        return self.stg_scale != 0.0

    @property
    def passes(self) -> int:
        """Model passes per step: conditional, then unconditional and perturbed where used."""
        return 1 + self.uses_uncond + self.uses_stg


def guide(
    cond: torch.Tensor, uncond: torch.Tensor | None, perturbed: torch.Tensor | None, cfg: float, stg: float
) -> torch.Tensor:
    """LTX-2's multi-modal guider (no rescaling) on one modality's predictions of one shape:
    ``cond + (cfg - 1) (cond - uncond) + stg (cond - perturbed)``. Its weights sum to 1, so velocities and
    denoised predictions guide alike."""
    out = cond
    if uncond is not None:
        out = out + (cfg - 1.0) * (cond - uncond)
    if perturbed is not None:
        out = out + stg * (cond - perturbed)
    return out


def guided_velocity(
    model: AVVelocityModel,
    x_video: torch.Tensor,
    x_audio: torch.Tensor,
    t: torch.Tensor,
    cond: Condition,
    guidance: Guidance | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided ``(B, Nv, Cv)`` and ``(B, Na, Ca)`` velocities: every pass of ``guidance`` in one batched
    forward of ``passes * B`` samples (conditional, unconditional, perturbed), combined by ``guide``. The perturbed
    rows come last and repeat the conditional rows' inputs, so with ``stg_shared_prefix`` the model runs them as
    copies of the first ``B`` rows (``copied_rows``)."""
    if guidance is None or guidance.passes == 1:
        return model(x_video, x_audio, t, cond)
    batch, passes = x_video.shape[0], guidance.passes
    if guidance.uses_uncond and guidance.uncond is None:
        raise ValueError("classifier-free guidance needs guidance.uncond (the empty prompt's condition)")
    conds = [cond] + [guidance.uncond] * guidance.uses_uncond + [cond] * guidance.uses_stg
    skip = [[] for _ in range(batch * (passes - guidance.uses_stg))]
    skip += [list(guidance.stg_blocks) for _ in range(batch * guidance.uses_stg)]
    inputs = (x_video.repeat(passes, 1, 1), x_audio.repeat(passes, 1, 1), t.repeat(passes), Condition.cat(conds), skip)
    shared = guidance.uses_stg and guidance.stg_shared_prefix
    v_video, v_audio = model(*inputs, copied_rows=batch) if shared else model(*inputs)
    out = []
    for v, cfg in ((v_video, guidance.video_cfg), (v_audio, guidance.audio_cfg)):
        parts = list(v.chunk(passes))
        uncond = parts[1] if guidance.uses_uncond else None
        perturbed = parts[-1] if guidance.uses_stg else None
        out.append(guide(parts[0], uncond, perturbed, cfg, guidance.stg_scale))
    return out[0], out[1]


@torch.no_grad()
def euler_sample(
    model: AVVelocityModel,
    cond: Condition,
    noise_video: torch.Tensor,
    noise_audio: torch.Tensor,
    *,
    num_steps: int,
    shift: float = 1.0,
    capture: Any = None,
    capture_until: int | None = None,
    guidance: Guidance | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate ``dx^m = v^m(x^a, x^v, t, c) dt`` for both streams from ``t = 1`` (noise) to ``t = 0``.

    Args:
        model: the dual-stream velocity model.
        cond: condition of the ``B`` samples.
        noise_video: ``(B, Nv, Cv)`` video prior sample ``x1^v``.
        noise_audio: ``(B, Na, Ca)`` audio prior sample ``x1^a`` (drawn separately).
        num_steps: Euler steps on ``time_grid(num_steps, shift=shift)``.
        capture: optional region-score capture; its ``step`` is set before each forward of the first
            ``capture_until`` steps (default: all).
        guidance: classifier-free guidance and STG (``guided_velocity``), or ``None``.
        autocast_dtype: run the model under autocast in this dtype (e.g. bfloat16 on GPU).
        on_step: called with each finished step's index (progress bars).

    Returns:
        ``(x0_video, x0_audio)`` in float32.
    """
    grid = time_grid(num_steps, shift=shift, device=noise_video.device)
    x_video, x_audio = noise_video.float(), noise_audio.float()
    batch = x_video.shape[0]
    until = num_steps if capture_until is None else capture_until
    for step in range(num_steps):
        if capture is not None and step < until:
            capture.step = step
        t = grid[step].expand(batch)
        with torch.autocast(x_video.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            v_video, v_audio = guided_velocity(model, x_video, x_audio, t, cond, guidance)
        dt = grid[step + 1] - grid[step]
        x_video = x_video + dt * v_video.float()
        x_audio = x_audio + dt * v_audio.float()
        if on_step is not None:
            on_step(step)
    return x_video, x_audio
