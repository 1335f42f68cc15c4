"""VideoAlign (VideoReward) video reward: visual quality (VQ), motion quality (MQ) and text alignment (TA).

A Qwen2-VL backbone (transformers ``Qwen2VLModel``) reads the video and an instruction holding the prompt and
the special tokens ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``; a bias-free linear reward head on the
last hidden state at each special token gives that dimension's raw reward, normalised as
``(r - mean) / std`` with the ``inference_config`` means and stds of the release.

Checkpoint directory (the released ``KwaiVGI/VideoReward`` layout plus its base model's files):

- ``model_config.json``: the release's config (``data_config`` fps / num_frames / max_frame_pixels,
  ``model_config`` output_dim, ``peft_lora_config`` lora_alpha, ``inference_config`` normalisation);
- ``checkpoint-<step>/model.pth`` as released (the highest step is used): the peft-wrapped Qwen2-VL-2B reward
  model's full state with LoRA factors, merged into the base weights in memory at load time (``merge_lora``); or a
  merged ``model.safetensors`` (or sharded ``.index.json``) there or in the directory itself;
- ``config.json``, ``preprocessor_config.json``, ``tokenizer_config.json`` and ``tokenizer.json`` (or
  ``vocab.json`` + ``merges.txt``) of the base model, Qwen2-VL-2B-Instruct, here or in ``base_model_dir``;
- ``prompt_template.txt``: the release's ``detailed_special`` instruction text with ``{text_prompt}`` where the
  prompt goes (taken from the VideoAlign sources by the user).

Frames follow the release's inference path (Qwen2-VL's video sampler): ``n`` frames at ``sample_fps`` (the
authors' trainer passes the clip's own rate, ``"clip"``, which keeps 120 of LTX-2's 121 frames), rounded to an
even count in ``[4, min(768, T)]`` (at most ``T``), at ``round(linspace(0, T - 1, n))``; each frame resized
(bicubic, antialiased) to multiples of 28 within the pixel budget ``[128 * 28 * 28, max_frame_pixels]``, where
a release without ``max_frame_pixels`` gets ``max(min(768 * 28 * 28, 24576 * 28 * 28 * 2 / n), 1.05 * 128 * 28 *
28)``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from omninft_fast.rewards._loading import CheckpointError, checkpoint_path, read_json, read_state_dict, require_files
from omninft_fast.rewards.base import RewardBatch, RewardModel, register_reward
from omninft_fast.rewards.qwen2vl import (
    LAYOUT,
    check_positions,
    encode,
    load_backbone,
    merge_lora,
    patchify,
    read_template,
)

TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
DIMENSIONS = ("VQ", "MQ", "TA")
SCORES = ("vq", "mq", "ta", "overall")
FRAME_FACTOR, MIN_FRAMES, MAX_FRAMES = 2, 4, 768
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS = 128 * 28 * 28, 768 * 28 * 28, 24576 * 28 * 28
WEIGHT_NAMES = ("model.pth", "model.safetensors", "model.safetensors.index.json")


def frame_count(num_frames: int, fps: float, sample_fps: float | None, count: int | None) -> int:
    """Frames the release's video sampler keeps of ``num_frames`` at ``fps``: ``count`` rounded to even, or
    ``num_frames / fps * sample_fps`` clamped to ``[4, min(768, num_frames)]`` (even bounds) and rounded to even;
    never more than ``num_frames``. Rounding is Python's (half to even), as in the release."""
    if count:
        n = round(count / FRAME_FACTOR) * FRAME_FACTOR
    else:
        low = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(min(MAX_FRAMES, num_frames) / FRAME_FACTOR) * FRAME_FACTOR
        n = round(min(max(num_frames / fps * sample_fps, low), high) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(n, num_frames)
    if not FRAME_FACTOR <= n <= num_frames:
        raise ValueError(f"reward 'videoalign' needs at least {FRAME_FACTOR} frames per clip, got {num_frames}")
    return n


def video_frame_indices(num_frames: int, fps: float, sample_fps: float | None, count: int | None) -> torch.Tensor:
    """``(n,)`` indices ``round(linspace(0, num_frames - 1, n))`` (float32, as the release) with ``n = frame_count``."""
    n = frame_count(num_frames, fps, sample_fps, count)
    return torch.linspace(0, num_frames - 1, n).round().long()


def frame_pixels(count: int, max_frame_pixels: int | None) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of each of ``count`` frames: the release's ``max_frame_pixels`` when set, else
    the video pixel budget shared by the frames."""
    if max_frame_pixels:
        return VIDEO_MIN_PIXELS, int(max_frame_pixels)
    budget = max(min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / count * FRAME_FACTOR), int(VIDEO_MIN_PIXELS * 1.05))
    return VIDEO_MIN_PIXELS, int(budget)


def weights_file(path: Path) -> Path:
    """Weights in ``checkpoint-<highest step>/`` under ``path`` (else in ``path``): ``model.pth`` (peft-wrapped,
    as released), ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""
    steps = [p for p in path.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    folder = max(steps, key=lambda p: int(p.name.split("-")[1])) if steps else path
    for name in WEIGHT_NAMES:
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(
        f"reward 'videoalign': checkpoint {path} lacks {[f'checkpoint-<step>/{n}' for n in WEIGHT_NAMES]} "
        f"(looked in {folder})"
    )


def read_weights(path: Path, release: dict, reward: str) -> dict[str, torch.Tensor]:
    """The released state dict under ``path``, LoRA factors merged with the release's ``lora_alpha``."""
    file = weights_file(path)
    state = read_state_dict(file, reward)
    if not any(".lora_A." in key for key in state):
        return state
    lora = release.get("peft_lora_config") or {}
    if "lora_alpha" not in lora:
        raise CheckpointError(
            f"reward {reward!r}: {file} holds LoRA factors but {path / 'model_config.json'} has no "
            "peft_lora_config.lora_alpha"
        )
    return merge_lora(state, float(lora["lora_alpha"]), file, reward, rslora=bool(lora.get("use_rslora", False)))


@register_reward("videoalign")
class VideoAlignReward(RewardModel):
    """``{"vq", "mq", "ta"}`` per sample, and ``overall = vq + mq + ta`` when asked for.

    Args:
        scores: which of ``vq``, ``mq``, ``ta``, ``overall`` to return (each returned score is its own reward in
            training, so ``overall`` is off by default).
        normalize: apply the release's ``(r - mean) / std`` normalisation (as its inference does by default).
        sample_fps: frame rate the frames are sampled at: ``"clip"`` (the clip's own rate, as the OmniNFT
            authors' trainer calls it), ``"release"`` (``data_config.fps`` of ``model_config.json``) or a number.
        num_frames: sample exactly this many frames instead (rounded to even); default ``data_config.num_frames``
            when ``sample_fps="release"``.
        positions: ``"sequential"`` (as the release was trained and is run) or ``"mrope"``; see ``qwen2vl``.
        base_model_dir: directory of the base Qwen2-VL files when they are not in ``checkpoint_dir``.
    """

    modality = "video"
    release_files = (
        ("model_config.json",),
        ("prompt_template.txt",),
        (*(f"checkpoint-*/{name}" for name in WEIGHT_NAMES), "model.safetensors", "model.safetensors.index.json"),
    )
    base_files = LAYOUT

    def __init__(
        self,
        *,
        scores: tuple[str, ...] | list[str] = SCORES[:3],
        normalize: bool = True,
        sample_fps: float | str = "clip",
        num_frames: int | None = None,
        positions: str = "sequential",
        base_model_dir: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        if not scores or any(s not in SCORES for s in scores):
            raise ValueError(f"scores must be a non-empty subset of {SCORES}, got {list(scores)}")
        if not (sample_fps in ("clip", "release") or (isinstance(sample_fps, (int, float)) and sample_fps > 0)):
            raise ValueError(f"sample_fps must be 'clip', 'release' or a positive number, got {sample_fps!r}")
        if num_frames is not None and (
            isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 2
        ):
            raise ValueError(f"num_frames must be an int >= 2 or null, got {num_frames!r}")
        self.scores = tuple(scores)
        self.positions = check_positions(positions)
        path = checkpoint_path(self.checkpoint_dir, self.name)
        base = checkpoint_path(base_model_dir, self.name) if base_model_dir else path
        require_files(path, self.name, ["model_config.json"])
        release = read_json(path / "model_config.json")
        data = release.get("data_config", {})
        output_dim = int(release.get("model_config", {}).get("output_dim", 1))
        if output_dim not in (1, len(TOKENS)):
            raise ValueError(f"reward {self.name!r}: output_dim must be 1 or 3, got {output_dim}")
        self.model, self.tokenizer, self.processor = load_backbone(
            base,
            read_weights(path, release, self.name),
            self.name,
            lambda h: nn.Linear(h, output_dim, bias=False),
            TOKENS,
            self.dtype,
        )
        self.model.to(self.device)
        self.token_ids = self.tokenizer.convert_tokens_to_ids(TOKENS)
        self.template = read_template(path, self.name, TOKENS)
        self.sample_fps = float(data.get("fps") or 2.0) if sample_fps == "release" else sample_fps
        self.num_frames = num_frames or (data.get("num_frames") if sample_fps == "release" else None)
        self.max_frame_pixels = data.get("max_frame_pixels")
        stats = release.get("inference_config") if normalize else None
        self.mean = torch.tensor([float(stats[f"{d}_mean"]) for d in DIMENSIONS]) if stats else torch.zeros(3)
        self.std = torch.tensor([float(stats[f"{d}_std"]) for d in DIMENSIONS]) if stats else torch.ones(3)

    def frame_indices(self, num_frames: int, fps: float) -> torch.Tensor:
        """``(n,)`` indices of the frames scored of a ``num_frames`` clip at ``fps``."""
        sample_fps = fps if self.sample_fps == "clip" else self.sample_fps
        return video_frame_indices(num_frames, fps, sample_fps, self.num_frames)

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        index = self.frame_indices(batch.video.shape[1], batch.fps).to(batch.video.device)
        min_pixels, max_pixels = frame_pixels(index.numel(), self.max_frame_pixels)
        visuals = [
            patchify(clip.index_select(0, index), self.processor, max_pixels, min_pixels) for clip in batch.video
        ]
        texts = [self.template.replace("{text_prompt}", prompt) for prompt in batch.prompts_for("video")]
        config = self.model.backbone.config
        inputs = encode(self.tokenizer, texts, visuals, True, config, self.device, self.dtype, self.positions)
        heads = self.model(inputs, self.token_ids).float()  # (B, 3, output_dim)
        raw = heads[..., 0] if heads.shape[-1] == 1 else heads.diagonal(dim1=1, dim2=2)
        rewards = (raw - self.mean.to(raw.device)) / self.std.to(raw.device)
        vq, mq, ta = rewards.unbind(dim=1)
        out = {"vq": vq, "mq": mq, "ta": ta, "overall": vq + mq + ta}
        return {key: out[key] for key in self.scores}
