"""HPSv3 video reward: the human preference score of sampled frames, as the OmniNFT authors aggregate it.

HPSv3 is a Qwen2-VL image preference model (transformers ``Qwen2VLModel`` backbone) with a ranking head
(``hidden -> 1024 -> 16 -> 2`` MLP with ReLUs) read at the ``<|Reward|>`` token; its first output is the
preference mean ``mu`` (the second the uncertainty), which is the score. A video's score follows the authors'
trainer: ``num_frames`` (5) frames at ``round(i (T - 1) / (num_frames - 1))``, each scored as an image with the
video prompt and capped at ``frame_cap`` (15), then the mean of the ``top_k`` (2, the top 30 %) highest.

Checkpoint directory: the released ``HPSv3.safetensors``; beside it (or in ``base_model_dir``) these files of its
base model, Qwen2-VL-7B-Instruct: ``config.json``, ``preprocessor_config.json``, ``tokenizer_config.json`` and
``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``); and ``prompt_template.txt``, the release's instruction
text with ``{text_prompt}`` where the prompt goes and the ``<|Reward|>`` token (taken from the HPSv3 sources by
the user). ``codec_roundtrip: true`` scores frames decoded from H.264 and then JPEG (quality 75), as the authors'
frames are.
"""

from __future__ import annotations

import torch
from torch import nn

from omninft_fast.rewards._loading import checkpoint_path, require_files
from omninft_fast.rewards.base import RewardBatch, RewardModel, register_reward
from omninft_fast.rewards.codec import jpeg_roundtrip
from omninft_fast.rewards.qwen2vl import LAYOUT, check_positions, encode, load_backbone, patchify, read_template

TOKEN = "<|Reward|>"
MAX_PIXELS = 256 * 28 * 28
JPEG_QUALITY = 75


def ranking_head(hidden: int) -> nn.Sequential:
    """The HPSv3 ranking head: ``hidden -> 1024 -> 16 -> 2`` (keys ``0``, ``3``, ``5``)."""
    return nn.Sequential(
        nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
    )


def frame_indices(num_frames: int, count: int) -> torch.Tensor:
    """``(count,)`` indices ``round(i (num_frames - 1) / (count - 1))`` (Python rounding, half to even)."""
    if num_frames < 1 or count < 1:
        raise ValueError(f"need num_frames >= 1 and count >= 1, got {num_frames} and {count}")
    if count == 1:
        return torch.tensor([round((num_frames - 1) / 2)])
    return torch.tensor([round(i * (num_frames - 1) / (count - 1)) for i in range(count)])


def aggregate(frame_scores: torch.Tensor, top_k: int, cap: float | None) -> torch.Tensor:
    """``(B, n)`` frame scores -> ``(B,)``: each capped at ``cap`` (if set), mean of the ``top_k`` largest."""
    if cap is not None:
        frame_scores = frame_scores.clamp(max=cap)
    return frame_scores.topk(min(top_k, frame_scores.shape[1]), dim=1).values.mean(dim=1)


@register_reward("hpsv3")
class HPSv3Reward(RewardModel):
    """``{"hpsv3": (B,)}``: the mean of the ``top_k`` capped frame scores.

    Args:
        num_frames: frames scored per clip (the authors' 5).
        top_k: how many of the highest frame scores are averaged (the authors' 2; ``num_frames`` for a plain mean).
        frame_cap: each frame's score is capped at this (the authors' 15; ``null`` for none).
        max_pixels: largest frame area given to the vision encoder (the release's is ``256 * 28 * 28``).
        positions: ``"sequential"`` (as the release was trained and is run) or ``"mrope"``; see ``qwen2vl``.
        base_model_dir: directory of the base Qwen2-VL files when they are not in ``checkpoint_dir``.
    """

    modality = "video"
    release_files = (("HPSv3.safetensors",), ("prompt_template.txt",))
    base_files = LAYOUT

    def __init__(
        self,
        *,
        num_frames: int = 5,
        top_k: int = 2,
        frame_cap: float | None = 15.0,
        max_pixels: int = MAX_PIXELS,
        positions: str = "sequential",
        base_model_dir: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        for key, value in (("num_frames", num_frames), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        self.num_frames, self.top_k = num_frames, top_k
        self.frame_cap = None if frame_cap is None else float(frame_cap)
        self.max_pixels = int(max_pixels)
        self.positions = check_positions(positions)
        path = checkpoint_path(self.checkpoint_dir, self.name)
        base = checkpoint_path(base_model_dir, self.name) if base_model_dir else path
        require_files(path, self.name, ["HPSv3.safetensors"])
        self.model, self.tokenizer, self.processor = load_backbone(
            base, path / "HPSv3.safetensors", self.name, ranking_head, [TOKEN], self.dtype
        )
        self.model.rm_head.float()
        self.model.to(self.device)
        self.token_id = self.tokenizer.convert_tokens_to_ids(TOKEN)
        self.template = read_template(path, self.name, [TOKEN])

    def roundtrip(self, video: torch.Tensor, fps: float) -> torch.Tensor:
        """H.264 (the base class's round trip), then JPEG at quality 75 of every frame."""
        return jpeg_roundtrip(super().roundtrip(video, fps), JPEG_QUALITY)

    def frame_scores(self, batch: RewardBatch) -> torch.Tensor:
        """``(B, num_frames)`` uncapped ``mu`` of the sampled frames."""
        index = frame_indices(batch.video.shape[1], self.num_frames).to(batch.video.device)
        frames = batch.video.index_select(1, index)  # (B, n, C, H, W)
        visuals = [patchify(frame[None], self.processor, self.max_pixels) for frame in frames.flatten(0, 1)]
        texts = [self.template.replace("{text_prompt}", p) for p in batch.prompts_for("video") for _ in index]
        config = self.model.backbone.config
        inputs = encode(self.tokenizer, texts, visuals, False, config, self.device, self.dtype, self.positions)
        mu = self.model(inputs, [self.token_id])[:, 0, 0].float()
        return mu.unflatten(0, frames.shape[:2])

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        return {"hpsv3": aggregate(self.frame_scores(batch), self.top_k, self.frame_cap)}
