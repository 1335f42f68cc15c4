"""VideoAlign (VideoReward) video reward: visual quality (VQ), motion quality (MQ) and text alignment (TA).

A Qwen2-VL backbone (transformers ``Qwen2VLModel``) reads the video and an instruction holding the prompt and
the special tokens ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``; a bias-free linear reward head on the
last hidden state at each special token gives that dimension's raw reward, normalised as
``(r - mean) / std`` with the ``inference_config`` means and stds of the release.

Checkpoint directory (the released ``KwaiVGI/VideoReward`` layout plus its base model's files):

- ``model_config.json``: the release's config (``data_config`` fps / num_frames / max_frame_pixels,
  ``model_config`` output_dim, ``inference_config`` normalisation);
- ``checkpoint-<step>/model.safetensors`` (the highest step is used), or ``model.safetensors``;
- ``config.json``, ``preprocessor_config.json`` and tokenizer files of the base Qwen2-VL model;
- ``prompt_template.txt``: the release's ``detailed_special`` instruction text with ``{text_prompt}`` where the
  prompt goes (taken from the VideoAlign sources by the user).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from omninft_fast.rewards._loading import CheckpointError, checkpoint_path, read_json, require_files
from omninft_fast.rewards.base import RewardBatch, RewardModel, register_reward
from omninft_fast.rewards.qwen2vl import encode, load_backbone, patchify, read_template

TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
DIMENSIONS = ("VQ", "MQ", "TA")
SCORES = ("vq", "mq", "ta", "overall")


def video_frame_indices(num_frames: int, fps: float, target_fps: float, count: int | None) -> torch.Tensor:
    """Evenly spread indices of an even number of frames (``count``, or ``target_fps`` worth; at least 2)."""
    n = count if count else round(num_frames / fps * target_fps)
    n = max(2, 2 * round(n / 2))
    return torch.linspace(0, num_frames - 1, n).round().long()


def weights_file(path: Path) -> Path:
    """Weights in ``checkpoint-<highest step>/`` under ``path`` (else in ``path``): ``model.safetensors`` or a
    sharded ``model.safetensors.index.json``."""
    steps = [p for p in path.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    folder = max(steps, key=lambda p: int(p.name.split("-")[1])) if steps else path
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(
        f"reward 'videoalign': checkpoint {path} lacks ['checkpoint-<step>/model.safetensors' or 'model.safetensors']"
    )


@register_reward("videoalign")
class VideoAlignReward(RewardModel):
    """``{"vq", "mq", "ta"}`` per sample, and ``overall = vq + mq + ta`` when asked for.

    Args:
        scores: which of ``vq``, ``mq``, ``ta``, ``overall`` to return (each returned score is its own reward in
            training, so ``overall`` is off by default).
        normalize: apply the release's ``(r - mean) / std`` normalisation (as its inference does by default).
    """

    modality = "video"

    def __init__(
        self, *, scores: tuple[str, ...] | list[str] = SCORES[:3], normalize: bool = True, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)
        if not scores or any(s not in SCORES for s in scores):
            raise ValueError(f"scores must be a non-empty subset of {SCORES}, got {list(scores)}")
        self.scores = tuple(scores)
        path = checkpoint_path(self.checkpoint_dir, self.name)
        require_files(path, self.name, ["model_config.json"])
        release = read_json(path / "model_config.json")
        data = release.get("data_config", {})
        output_dim = int(release.get("model_config", {}).get("output_dim", 1))
        if output_dim not in (1, len(TOKENS)):
            raise ValueError(f"reward {self.name!r}: output_dim must be 1 or 3, got {output_dim}")
        self.model, self.tokenizer, self.processor = load_backbone(
            path, weights_file(path), self.name, lambda h: nn.Linear(h, output_dim, bias=False), TOKENS, self.dtype
        )
        self.model.to(self.device)
        self.token_ids = self.tokenizer.convert_tokens_to_ids(TOKENS)
        self.template = read_template(path, self.name, TOKENS)
        self.fps = float(data.get("fps") or 2.0)
        self.num_frames = data.get("num_frames")
        self.max_pixels = data.get("max_frame_pixels")
        stats = release.get("inference_config") if normalize else None
        self.mean = torch.tensor([float(stats[f"{d}_mean"]) for d in DIMENSIONS]) if stats else torch.zeros(3)
        self.std = torch.tensor([float(stats[f"{d}_std"]) for d in DIMENSIONS]) if stats else torch.ones(3)

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        index = video_frame_indices(batch.video.shape[1], batch.fps, self.fps, self.num_frames).to(batch.video.device)
        visuals = [patchify(clip.index_select(0, index), self.processor, self.max_pixels) for clip in batch.video]
        texts = [self.template.replace("{text_prompt}", prompt) for prompt in batch.prompts_for("video")]
        inputs = encode(self.tokenizer, texts, visuals, True, self.model.backbone.config, self.device, self.dtype)
        heads = self.model(inputs, self.token_ids).float()  # (B, 3, output_dim)
        raw = heads[..., 0] if heads.shape[-1] == 1 else heads.diagonal(dim1=1, dim2=2)
        rewards = (raw - self.mean.to(raw.device)) / self.std.to(raw.device)
        vq, mq, ta = rewards.unbind(dim=1)
        out = {"vq": vq, "mq": mq, "ta": ta, "overall": vq + mq + ta}
        return {key: out[key] for key in self.scores}
