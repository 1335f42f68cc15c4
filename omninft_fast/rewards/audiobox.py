"""Meta Audiobox Aesthetics audio reward: CE (content enjoyment), CU (content usefulness), PC (production
complexity) and PQ (production quality), on the released 1-10 scale.

Uses the ``audiobox-aesthetics`` package's model class (``AesMultiOutput``: WavLM encoder, per-axis weighted
layer sums and projection heads). The checkpoint directory holds either release:

- Meta's ``checkpoint.pt`` (as the package's ``initialize_predictor`` reads it): ``state_dict`` (keys prefixed
  ``model.``), ``model_cfg`` (the model's fields) and ``target_transform`` (each axis's mean and std); read here
  with ``torch.load(weights_only=True)``, nothing else of the package's loader (which would download a missing file);
- or the Hugging Face layout: ``config.json`` (the model's fields, including ``target_transform``) and
  ``model.safetensors``.

An optional ``wavlm_config`` entry of the config overrides the encoder's WavLM settings (small test checkpoints use
it; the released ones have none).

Audio is resampled to 16 kHz and scored in windows of ``window_s`` seconds (10 by default) every ``window_s``
seconds, the last one zero-padded and masked; a clip's score is the mean of its windows' scores weighted by
their share of real samples.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from omninft_fast.rewards._loading import (
    CheckpointError,
    checkpoint_path,
    first_line,
    load_strict,
    read_json,
    read_state_dict,
)
from omninft_fast.rewards.base import RewardBatch, RewardModel, register_reward
from omninft_fast.rewards.preprocess import resample, split_windows

AXES = ("CE", "CU", "PC", "PQ")
CHECKPOINT = "checkpoint.pt"
MODEL_FIELDS = (
    "proj_num_layer",
    "proj_ln",
    "proj_act_fn",
    "proj_dropout",
    "nth_layer",
    "use_weighted_layer_sum",
    "precision",
    "normalize_embed",
    "output_dim",
)
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


def read_release(path: Path, reward: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """``(model config with target_transform, state dict, weights file)`` of either release in ``path``."""
    file = path / CHECKPOINT
    if file.exists():
        try:
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"reward {reward!r}: cannot read {file}: {first_line(error)}") from error
        missing = [key for key in ("state_dict", "model_cfg", "target_transform") if key not in ckpt]
        if missing:
            raise CheckpointError(f"reward {reward!r}: {file} lacks the entries {missing}")
        absent = [key for key in MODEL_FIELDS if key not in ckpt["model_cfg"]]
        if absent:
            raise CheckpointError(f"reward {reward!r}: model_cfg of {file} lacks {absent}")
        config = {key: ckpt["model_cfg"][key] for key in MODEL_FIELDS} | {"target_transform": ckpt["target_transform"]}
        if "wavlm_config" in ckpt["model_cfg"]:
            config["wavlm_config"] = ckpt["model_cfg"]["wavlm_config"]
        state = {key.removeprefix("model."): value for key, value in ckpt["state_dict"].items()}
        return config, state, file
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        file = path / "model.safetensors"
        return read_json(path / "config.json"), read_state_dict(file, reward), file
    raise CheckpointError(
        f"reward {reward!r}: checkpoint {path} lacks ['{CHECKPOINT}' or 'config.json' + 'model.safetensors']"
    )


@register_reward("audiobox")
class AudioboxReward(RewardModel):
    """``{"ce", "cu", "pc", "pq"}`` (the chosen ``axes``), each ``(B,)`` on the 1-10 scale.

    Args:
        axes: which of CE, CU, PC, PQ to return (default all four).
        window_s: scoring window and hop in seconds (the released model's is 10).
    """

    modality = "audio"
    release_files = ((CHECKPOINT, "model.safetensors"),)

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
        config, state, file = read_release(path, self.name)
        transform = config.get("target_transform") or {}
        missing = [axis for axis in AXES if axis not in transform]
        if missing:
            raise CheckpointError(f"reward {self.name!r}: the config of {file} has no target_transform for {missing}")
        self.mean = {axis: float(transform[axis]["mean"]) for axis in AXES}
        self.std = {axis: float(transform[axis]["std"]) for axis in AXES}
        model = build_model({**config, "precision": "32"})
        load_strict(model, state, file, self.name)
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
