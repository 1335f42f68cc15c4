"""Reward plugin interface and registry.

A reward plugin scores a batch of decoded samples and returns named per-sample float32 scores. It declares the
modality it judges (``video``, ``audio`` or ``av``), which is what advantage routing (Eq 7) uses. Plugins are
built by name from the trainer's config through the registry::

    @register_reward("my_reward")
    class MyReward(RewardModel):
        modality = "video"

        def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
            return {"my_reward": batch.video.mean(dim=(1, 2, 3, 4))}

    reward = build_reward("my_reward", device="cpu", micro_batch=8, weight=1.0)
    scores = reward(batch)  # {"my_reward": (B,) float32}
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

MODALITIES = ("video", "audio", "av")
_REGISTRY: dict[str, type[RewardModel]] = {}


@dataclass(frozen=True)
class RewardBatch:
    """Decoded samples to score.

    Args:
        video: ``(B, T, C, H, W)`` float frames in [0, 1].
        fps: video frame rate.
        audio: ``(B, S)`` float waveforms in [-1, 1].
        sample_rate: audio sample rate in Hz.
        prompts: ``B`` text prompts.
        video_prompts, audio_prompts: optional separate prompts per modality (default: ``prompts``).
    """

    video: torch.Tensor
    fps: float
    audio: torch.Tensor
    sample_rate: int
    prompts: list[str]
    video_prompts: list[str] | None = None
    audio_prompts: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.video, torch.Tensor) or self.video.dim() != 5:
            raise ValueError(f"video must be a (B, T, C, H, W) tensor, got {_describe(self.video)}")
        if not isinstance(self.audio, torch.Tensor) or self.audio.dim() != 2:
            raise ValueError(f"audio must be a (B, S) tensor, got {_describe(self.audio)}")
        batch = self.video.shape[0]
        if self.audio.shape[0] != batch:
            raise ValueError(f"audio has {self.audio.shape[0]} samples but video has {batch}")
        for name in ("prompts", "video_prompts", "audio_prompts"):
            value = getattr(self, name)
            if value is not None and len(value) != batch:
                raise ValueError(f"{name} has {len(value)} entries for {batch} samples")
        if not (isinstance(self.fps, (int, float)) and self.fps > 0):
            raise ValueError(f"fps must be a positive number, got {self.fps!r}")
        if not (isinstance(self.sample_rate, int) and self.sample_rate > 0):
            raise ValueError(f"sample_rate must be a positive int, got {self.sample_rate!r}")

    def __len__(self) -> int:
        return self.video.shape[0]

    def slice(self, start: int, stop: int, device: torch.device | str | None = None) -> RewardBatch:
        """Samples ``start:stop``, with the tensors moved to ``device``."""

        def cut(items: list[str] | None) -> list[str] | None:
            return None if items is None else items[start:stop]

        return replace(
            self,
            video=self.video[start:stop].to(device) if device else self.video[start:stop],
            audio=self.audio[start:stop].to(device) if device else self.audio[start:stop],
            prompts=self.prompts[start:stop],
            video_prompts=cut(self.video_prompts),
            audio_prompts=cut(self.audio_prompts),
        )

    def prompts_for(self, modality: str) -> list[str]:
        """The prompts a ``video`` or ``audio`` judge should read (the shared prompt when none is separate)."""
        if modality == "video" and self.video_prompts is not None:
            return self.video_prompts
        if modality == "audio" and self.audio_prompts is not None:
            return self.audio_prompts
        return self.prompts


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


class RewardModel(ABC):
    """Base class of reward plugins.

    Subclasses set ``modality`` and implement ``score`` on one micro-batch already on ``self.device``; calling
    the plugin splits the batch into micro-batches, checks every score and returns them on the CPU.

    Args:
        device: where scoring runs.
        dtype: compute dtype name for models (``float32``, ``bfloat16``, ``float16``).
        micro_batch: samples per ``score`` call, ``>= 1``.
        weight: weight of this reward's advantage when several rewards judge one modality, ``> 0``.
        checkpoint_dir: local directory of the reward model's weights (plugins that need one).
        codec_roundtrip: score frames after an H.264 (4:2:0) encode and decode (``roundtrip``), as scores of
            samples written to mp4 files are; needs PyAV. Audio is left as it is (the released scorers read the
            WAV written beside the mp4), so audio-only rewards ignore it.
        options: plugin-specific settings.
    """

    modality: ClassVar[str]
    name: ClassVar[str] = ""
    # The released checkpoint layout, one tuple of alternatives (glob patterns) per needed file, and the files of a
    # base model that may live in ``base_model_dir`` instead (``omninft-fast rewards check`` lists absent ones).
    release_files: ClassVar[tuple[tuple[str, ...], ...]] = ()
    base_files: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def __init__(
        self,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        micro_batch: int = 64,
        weight: float = 1.0,
        checkpoint_dir: str | None = None,
        codec_roundtrip: bool = False,
        **options: Any,
    ) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"{type(self).__name__}.modality must be one of {MODALITIES}, got {self.modality!r}")
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive int, got {micro_batch!r}")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (weight > 0 and math.isfinite(weight))
        ):
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        if dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype!r}")
        if options:
            raise ValueError(f"reward {self.name!r} got unknown options {sorted(options)}")
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.micro_batch = micro_batch
        self.weight = float(weight)
        self.checkpoint_dir = checkpoint_dir
        self.codec_roundtrip = bool(codec_roundtrip)

    def roundtrip(self, video: torch.Tensor, fps: float) -> torch.Tensor:
        """``(B, T, C, H, W)`` frames as decoded from the file they would be scored from (H.264 by default)."""
        from omninft_fast.rewards.codec import h264_roundtrip

        return h264_roundtrip(video, fps)

    @abstractmethod
    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        """Named ``(b,)`` scores of one micro-batch (on ``self.device``); higher is better."""

    @torch.no_grad()
    def __call__(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        """Named ``(B,)`` float32 CPU scores of the whole batch."""
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(batch), self.micro_batch):
            stop = min(start + self.micro_batch, len(batch))
            part = batch.slice(start, stop)
            if self.codec_roundtrip and self.modality != "audio":
                part = replace(part, video=self.roundtrip(part.video, part.fps))
            scores = self.score(part.slice(0, stop - start, self.device))
            for key, value in scores.items():
                if not isinstance(value, torch.Tensor) or value.shape != (stop - start,):
                    raise ValueError(
                        f"reward {self.name!r} score {key!r} must have shape ({stop - start},), got {_describe(value)}"
                    )
                parts.setdefault(key, []).append(value.detach().float().cpu())
        return {key: torch.cat(values) for key, values in parts.items()}


def register_reward(name: str) -> Callable[[type[RewardModel]], type[RewardModel]]:
    """Class decorator adding a plugin to the registry under ``name``."""

    def add(cls: type[RewardModel]) -> type[RewardModel]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"reward {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available_rewards() -> list[str]:
    """Names of every registered plugin."""
    return sorted(_REGISTRY)


def reward_class(name: str) -> type[RewardModel]:
    """The plugin class registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered: {available_rewards()}")
    return _REGISTRY[name]


def build_reward(name: str, **kwargs: Any) -> RewardModel:
    """Build the plugin registered as ``name`` with the keyword settings of ``RewardModel``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered: {available_rewards()}")
    return _REGISTRY[name](**kwargs)
