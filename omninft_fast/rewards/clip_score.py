"""CLIP score video reward: mean over sampled frames of ``scale * cos(text embedding, frame embedding)``.

``scale`` is 100 by default (the usual CLIPScore scale); JavisBench reports the plain cosine (``scale=1``).

Loads a transformers ``CLIPModel`` with its tokenizer and ``preprocessor_config.json`` from a local directory
(e.g. a downloaded ``openai/clip-vit-large-patch14``). Frames are preprocessed in torch as the CLIP image
processor does: bicubic resize of the shorter side, centre crop, per-channel normalisation.
"""

from __future__ import annotations

import torch

from omninft_fast.rewards._loading import WEIGHT_FILES, checkpoint_path, hf_from_pretrained, read_json, require_files
from omninft_fast.rewards.base import RewardBatch, RewardModel, register_reward
from omninft_fast.rewards.preprocess import (
    center_crop,
    normalize,
    resize,
    resize_shorter_side,
    sample_frame_indices,
)


def _side(value: int | dict, where: str) -> int | tuple[int, int]:
    """A size from a preprocessor config: an int, ``{"shortest_edge": n}`` or ``{"height": h, "width": w}``;
    ``ValueError`` naming ``where`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    if isinstance(value, dict) and {"height", "width"} <= value.keys():
        return int(value["height"]), int(value["width"])
    raise ValueError(f"{where} must be an int, {{shortest_edge: n}} or {{height: h, width: w}}, got {value!r}")


@register_reward("clip_score")
class ClipScoreReward(RewardModel):
    """``{"clip_score": (B,)}``: ``scale * cos`` between the video prompt and each of ``num_frames`` frames, averaged.

    Args:
        num_frames: frames sampled evenly over the clip (all of them when the clip is shorter).
        scale: factor on the cosine.
    """

    modality = "video"
    release_files = (("config.json",), WEIGHT_FILES, ("preprocessor_config.json",))

    def __init__(self, *, num_frames: int = 8, scale: float = 100.0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        self.scale = float(scale)
        from transformers import AutoTokenizer, CLIPModel

        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        self.num_frames = num_frames
        path = checkpoint_path(self.checkpoint_dir, self.name)
        require_files(path, self.name, ["preprocessor_config.json"])
        config = read_json(path / "preprocessor_config.json")
        where = path / "preprocessor_config.json"
        self.resize_to = _side(config.get("size", 224), f"{where}: size")
        crop = config.get("crop_size")
        self.crop_to = self.resize_to if crop is None else _side(crop, f"{where}: crop_size")
        self.mean = config.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
        self.std = config.get("image_std", [0.26862954, 0.26130258, 0.27577711])
        self.model = hf_from_pretrained(CLIPModel, path, self.name, self.dtype).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def pixels(self, video: torch.Tensor, fps: float) -> torch.Tensor:
        """``(B, T, C, H, W)`` in [0, 1] -> ``(B, n, C, s, s)`` normalised CLIP inputs of the sampled frames."""
        index = sample_frame_indices(video.shape[1], fps, count=self.num_frames).to(video.device)
        frames = video.index_select(1, index).flatten(0, 1).float()
        if isinstance(self.resize_to, int):
            frames = resize_shorter_side(frames, self.resize_to)
        else:
            frames = resize(frames, self.resize_to)
        frames = normalize(center_crop(frames, self.crop_to), self.mean, self.std)
        return frames.unflatten(0, (video.shape[0], len(index)))

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        pixels = self.pixels(batch.video, batch.fps)
        tokens = self.tokenizer(batch.prompts_for("video"), padding=True, truncation=True, return_tensors="pt").to(
            self.device
        )
        text = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        image = self.model.get_image_features(pixel_values=pixels.flatten(0, 1).to(self.dtype))
        text = torch.nn.functional.normalize(text.pooler_output.float(), dim=-1)
        image = torch.nn.functional.normalize(image.pooler_output.float(), dim=-1).unflatten(0, pixels.shape[:2])
        return {"clip_score": self.scale * torch.einsum("bd,bnd->bn", text, image).mean(dim=1)}
