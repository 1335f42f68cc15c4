"""HPSv3 video reward: the human preference score of sampled frames, averaged.

HPSv3 is a Qwen2-VL image preference model (transformers ``Qwen2VLModel`` backbone) with a ranking head
(``hidden -> 1024 -> 16 -> 2`` MLP with ReLUs) read at the ``<|Reward|>`` token; its first output is the
preference mean ``mu`` (the second the uncertainty), which is the score. A video's score is the mean of
``mu`` over ``num_frames`` evenly sampled frames, each scored as an image with the video prompt.

Checkpoint directory: the released ``HPSv3.safetensors``; ``config.json``, ``preprocessor_config.json`` and
tokenizer files of its base model (Qwen2-VL-7B-Instruct); and ``prompt_template.txt``, the release's
instruction text with ``{text_prompt}`` where the prompt goes and the ``<|Reward|>`` token (taken from the
HPSv3 sources by the user).
"""

from __future__ import annotations

import torch
from torch import nn

from omninft_fast.rewards._loading import checkpoint_path, require_files
from omninft_fast.rewards.base import RewardBatch, RewardModel, register_reward
from omninft_fast.rewards.preprocess import sample_frame_indices
from omninft_fast.rewards.qwen2vl import encode, load_backbone, patchify, read_template

TOKEN = "<|Reward|>"
MAX_PIXELS = 256 * 28 * 28


def ranking_head(hidden: int) -> nn.Sequential:
    """The HPSv3 ranking head: ``hidden -> 1024 -> 16 -> 2`` (keys ``0``, ``3``, ``5``)."""
    return nn.Sequential(
        nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
    )


@register_reward("hpsv3")
class HPSv3Reward(RewardModel):
    """``{"hpsv3": (B,)}``: mean preference score over sampled frames.

    Args:
        num_frames: frames scored per clip.
        max_pixels: largest frame area given to the vision encoder (the release's is ``256 * 28 * 28``).
    """

    modality = "video"

    def __init__(self, *, num_frames: int = 4, max_pixels: int = MAX_PIXELS, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        self.num_frames = num_frames
        self.max_pixels = int(max_pixels)
        path = checkpoint_path(self.checkpoint_dir, self.name)
        require_files(path, self.name, ["HPSv3.safetensors"])
        self.model, self.tokenizer, self.processor = load_backbone(
            path, path / "HPSv3.safetensors", self.name, ranking_head, [TOKEN], self.dtype
        )
        self.model.rm_head.float()
        self.model.to(self.device)
        self.token_id = self.tokenizer.convert_tokens_to_ids(TOKEN)
        self.template = read_template(path, self.name, [TOKEN])

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        index = sample_frame_indices(batch.video.shape[1], batch.fps, count=self.num_frames).to(batch.video.device)
        frames = batch.video.index_select(1, index)  # (B, n, C, H, W)
        visuals = [patchify(frame[None], self.processor, self.max_pixels) for frame in frames.flatten(0, 1)]
        texts = [self.template.replace("{text_prompt}", p) for p in batch.prompts_for("video") for _ in index]
        inputs = encode(self.tokenizer, texts, visuals, False, self.model.backbone.config, self.device, self.dtype)
        mu = self.model(inputs, [self.token_id])[:, 0, 0].float()
        return {"hpsv3": mu.unflatten(0, frames.shape[:2]).mean(dim=1)}
