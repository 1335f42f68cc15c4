"""Deterministic Euler ODE sampler over a shared timestep (Eq 1-2), separate noise per modality."""

from __future__ import annotations

from collections.abc import Callable
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
        capture: optional region-score capture; its ``step`` is set before each forward.
        autocast_dtype: run the model under autocast in this dtype (e.g. bfloat16 on GPU).
        on_step: called with each finished step's index (progress bars).

    Returns:
        ``(x0_video, x0_audio)`` in float32.
    """
    grid = time_grid(num_steps, shift=shift, device=noise_video.device)
    x_video, x_audio = noise_video.float(), noise_audio.float()
    batch = x_video.shape[0]
    for step in range(num_steps):
        if capture is not None:
            capture.step = step
        t = grid[step].expand(batch)
        with torch.autocast(x_video.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            v_video, v_audio = model(x_video, x_audio, t, cond)
        dt = grid[step + 1] - grid[step]
        x_video = x_video + dt * v_video.float()
        x_audio = x_audio + dt * v_audio.float()
        if on_step is not None:
            on_step(step)
    return x_video, x_audio
