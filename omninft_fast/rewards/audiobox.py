"""Meta Audiobox Aesthetics audio reward: CE (content enjoyment), CU (content usefulness), PC (production
complexity) and PQ (production quality), on the released 1-10 scale.

Uses the ``audiobox-aesthetics`` package's model class (``AesMultiOutput``: WavLM encoder, per-axis weighted
layer sums and projection heads). The checkpoint directory is the released layout: ``config.json`` (the
model's fields, including ``target_transform`` with each axis's mean and std) and ``model.safetensors``. An
optional ``wavlm_config`` entry in ``config.json`` overrides the encoder's WavLM settings (small test
checkpoints use it; the released one has none).

Audio is resampled to 16 kHz and scored in windows of ``window_s`` seconds (10 by default) every ``window_s``
seconds, the last one zero-padded and masked; a clip's score is the mean of its windows' scores weighted by
their share of real samples.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import torch

from omninft_fast.rewards._loading import checkpoint_path, load_strict, read_json, read_state_dict, require_files
from omninft_fast.rewards.base import RewardBatch, RewardModel, register_reward
from omninft_fast.rewards.preprocess import resample, split_windows

AXES = ("CE", "CU", "PC", "PQ")
SAMPLE_RATE = 16_000
WINDOW_S = 10
_BUILD = threading.Lock()


def build_model(config: dict[str, Any]) -> torch.nn.Module:
    """An ``AesMultiOutput`` with the fields of ``config`` (and its ``wavlm_config`` encoder settings if given)."""
    from audiobox_aesthetics.model import aes

    fields = {key: value for key, value in config.items() if key != "wavlm_config"}
    with _BUILD:
        default = aes.DEFAULT_AUDIO_CFG
        if "wavlm_config" in config:
            aes.DEFAULT_AUDIO_CFG = aes.WavLMConfig({**vars(default), **config["wavlm_config"]})
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated", category=FutureWarning)
                return aes.AesMultiOutput(**fields)
        finally:
            aes.DEFAULT_AUDIO_CFG = default


@register_reward("audiobox")
class AudioboxReward(RewardModel):
    """``{"ce", "cu", "pc", "pq"}`` (the chosen ``axes``), each ``(B,)`` on the 1-10 scale.

    Args:
        axes: which of CE, CU, PC, PQ to return (default all four).
        window_s: scoring window and hop in seconds (the released model's is 10).
    """

    modality = "audio"

    def __init__(
        self, *, axes: tuple[str, ...] | list[str] = AXES, window_s: float = WINDOW_S, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)
        if not (isinstance(window_s, (int, float)) and window_s * SAMPLE_RATE >= 400):
            raise ValueError(f"window_s must be at least 0.025 s, got {window_s!r}")
        self.window = round(window_s * SAMPLE_RATE)
        unknown = [axis for axis in axes if axis.upper() not in AXES]
        if not axes or unknown:
            raise ValueError(f"axes must be a non-empty subset of {AXES}, got {list(axes)}")
        self.axes = tuple(axis.upper() for axis in axes)
        path = checkpoint_path(self.checkpoint_dir, self.name)
        require_files(path, self.name, ["config.json", "model.safetensors"])
        config = read_json(path / "config.json")
        transform = config.get("target_transform") or {}
        missing = [axis for axis in AXES if axis not in transform]
        if missing:
            raise ValueError(f"reward {self.name!r}: {path / 'config.json'} has no target_transform for {missing}")
        self.mean = {axis: float(transform[axis]["mean"]) for axis in AXES}
        self.std = {axis: float(transform[axis]["std"]) for axis in AXES}
        model = build_model({**config, "precision": "32"})
        load_strict(model, read_state_dict(path / "model.safetensors", self.name), path, self.name)
        self.model = model.eval().to(self.device, self.dtype)

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        audio = resample(batch.audio.float(), batch.sample_rate, SAMPLE_RATE)
        windows, mask, weights = split_windows(audio, self.window, self.window)
        preds = self.model({"wav": windows.flatten(0, 1)[:, None].to(self.dtype), "mask": mask.flatten(0, 1)[:, None]})
        weights = weights.float()
        out = {}
        for axis in self.axes:
            value = preds[axis].float().unflatten(0, weights.shape) * self.std[axis] + self.mean[axis]
            out[axis.lower()] = (value * weights).sum(dim=1) / weights.sum(dim=1)
        return out
