"""Verifiable rewards of the synthetic text-to-audio-video task, one per modality kind.

Each is computed from the decoded output alone and the prompt's words (``omninft_fast.task``):

- ``synthetic_colour`` (video): how much the square in the centre third of the frame shows the prompted colour,
  ``mean over frames and centre pixels of (x[prompted] - mean(x[other two]))``, in [-1, 1].
- ``synthetic_pitch`` (audio): fraction of the waveform's spectral energy within ``band_hz`` of the prompted
  pitch, in [0, 1].
- ``synthetic_sync`` (av): Pearson correlation, over video frames, between the square's brightness and the audio
  RMS in that frame's time window (audio beeps on the flashes), in [-1, 1]. With ``region="beacon"`` (the task's
  ``beacon`` option) the brightness is that of the moving beacon's token in each frame (``beacon_path`` on a
  ``grid`` of latent tokens) and nothing else of the frame counts.
"""

from __future__ import annotations

import torch

from omninft_fast.rewards.base import RewardBatch, RewardModel, register_reward
from omninft_fast.task.synthetic import COLOURS, PITCH_HZ, beacon_path, parse_prompt


def _centre(video: torch.Tensor) -> torch.Tensor:
    """``(B, T, C, H, W)`` -> ``(B, T, C, h, w)``: the centre third of each frame."""
    h, w = video.shape[-2:]
    return video[..., h // 3 : h - h // 3, w // 3 : w - w // 3]


@register_reward("synthetic_colour")
class ColourReward(RewardModel):
    """Video reward: the centre square has the prompted colour."""

    modality = "video"

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        centre = _centre(batch.video.float()).mean(dim=(-1, -2))  # (B, T, C)
        index = torch.tensor([COLOURS.index(parse_prompt(p).colour) for p in batch.prompts_for("video")])
        onehot = torch.nn.functional.one_hot(index, 3).to(centre)[:, None, :]
        prompted = (centre * onehot).sum(dim=-1)
        others = (centre * (1 - onehot)).sum(dim=-1) / 2
        return {"colour": (prompted - others).mean(dim=1)}


@register_reward("synthetic_pitch")
class PitchReward(RewardModel):
    """Audio reward: spectral energy at the prompted pitch."""

    modality = "audio"

    def __init__(self, *, band_hz: float = 20.0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if not band_hz > 0:
            raise ValueError(f"band_hz must be > 0, got {band_hz!r}")
        self.band_hz = float(band_hz)

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        audio = batch.audio.float()
        power = torch.fft.rfft(audio, dim=-1).abs().square()
        freqs = torch.fft.rfftfreq(audio.shape[-1], d=1.0 / batch.sample_rate).to(audio.device)
        target = torch.tensor([PITCH_HZ[parse_prompt(p).pitch] for p in batch.prompts_for("audio")]).to(audio)
        in_band = ((freqs[None, :] - target[:, None]).abs() <= self.band_hz).to(power)
        return {"pitch": (power * in_band).sum(dim=-1) / power.sum(dim=-1).clamp_min(1e-12)}


@register_reward("synthetic_sync")
class SyncReward(RewardModel):
    """Audio-video reward: audio loudness follows the flashes of the square (``region="centre"``) or of the moving
    beacon (``region="beacon"``, on a ``grid = (rows, columns)`` of latent tokens) frame by frame."""

    modality = "av"

    def __init__(self, *, region: str = "centre", grid: tuple[int, int] = (3, 3), **kwargs: object) -> None:
        super().__init__(**kwargs)
        if region not in ("centre", "beacon"):
            raise ValueError(f"region must be 'centre' or 'beacon', got {region!r}")
        rows, columns = (int(n) for n in grid)
        if min(rows, columns) < 3:
            raise ValueError(f"grid must be at least (3, 3), got {tuple(grid)}")
        self.region = region
        self.grid = (rows, columns)

    def _brightness(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, C, H, W)`` frames -> ``(B, T)`` mean brightness of the region read in each frame."""
        if self.region == "centre":
            return _centre(video).mean(dim=(2, 3, 4))
        rows, columns = self.grid
        frames, height, width = video.shape[1], video.shape[-2], video.shape[-1]
        if height % rows or width % columns:
            raise ValueError(f"frames of {height}x{width} pixels do not split into a {rows}x{columns} token grid")
        tiles = video.reshape(*video.shape[:3], rows, height // rows, columns, width // columns).mean(dim=(2, 4, 6))
        path = torch.tensor(beacon_path(frames, rows, columns), device=video.device)  # (T, 2)
        return tiles[:, torch.arange(frames, device=video.device), path[:, 0], path[:, 1]]

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        brightness = self._brightness(batch.video.float())  # (B, T)
        frames = brightness.shape[1]
        audio = batch.audio.float()
        window = audio.shape[1] // frames
        loudness = audio[:, : window * frames].reshape(len(batch), frames, window).square().mean(dim=-1).sqrt()
        b = brightness - brightness.mean(dim=1, keepdim=True)
        a = loudness - loudness.mean(dim=1, keepdim=True)
        denom = (b.square().sum(dim=1) * a.square().sum(dim=1)).sqrt()
        # A flat stream has no correlation (0); a non-finite one none either (NaN, which the trainer reports).
        corr = torch.where(denom > 1e-8, (a * b).sum(dim=1) / denom.clamp_min(1e-8), torch.zeros_like(denom))
        corr = torch.where(denom.isfinite(), corr, torch.nan)
        return {"sync": corr}
