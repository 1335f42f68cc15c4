"""Shared Qwen2-VL pieces of the VLM reward models (VideoAlign, HPSv3): torch-only visual patching, prompt
building, and a ``Qwen2VLModel`` backbone with a reward head loaded strictly from the released state dicts.

Released checkpoints were saved from ``Qwen2VLForConditionalGeneration`` subclasses, so their keys are
``model.*`` (language model), ``visual.*``, ``lm_head.weight`` and ``rm_head.*``; newer layouts use
``model.language_model.*`` and ``model.visual.*``. Both map onto ``backbone.language_model.*``,
``backbone.visual.*`` and ``rm_head.*``; ``lm_head.weight`` (the unused generation head) is dropped.

Positions: the released reward models were trained, and are run by their authors, by calling the text decoder on
the token embeddings with the visual features scattered in and no position ids, so every token sits at its plain
sequential position ``0..L-1`` on all three rotary axes. ``positions="sequential"`` (the default) reproduces that;
``positions="mrope"`` uses Qwen2-VL's 3-D M-RoPE positions (``get_rope_index``) for models trained with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from omninft_fast.rewards._loading import CheckpointError, load_strict, read_json, read_state_dict, require_files
from omninft_fast.rewards.preprocess import normalize, resize

BASE_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # tokenizer.json, or vocab.json with merges.txt
LAYOUT = (*((name,) for name in BASE_FILES), TOKENIZER_FILES)  # the base files as ``RewardModel.base_files``
SYSTEM = "You are a helpful assistant."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
POSITIONS = ("sequential", "mrope")


def check_positions(positions: str) -> str:
    """``positions`` if it is one of ``POSITIONS``, else ``ValueError``."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    return positions


class Qwen2VLReward(nn.Module):
    """A ``Qwen2VLModel`` backbone and a reward head applied to the last hidden state at reward tokens."""

    def __init__(self, config: object, head: nn.Module) -> None:
        super().__init__()
        from transformers import Qwen2VLModel

        self.backbone = Qwen2VLModel(config)
        self.rm_head = head

    def forward(self, inputs: Mapping[str, torch.Tensor], reward_ids: list[int]) -> torch.Tensor:
        """Head outputs at the reward tokens: ``(B, len(reward_ids), D)``; each sample holds each token once."""
        hidden = self.backbone(**inputs, use_cache=False).last_hidden_state
        ids = inputs["input_ids"]
        rows = []
        for token in reward_ids:
            hits = (ids == token).int()
            if not bool((hits.sum(dim=1) == 1).all()):
                raise ValueError(f"every prompt must contain reward token id {token} exactly once")
            rows.append(hidden[torch.arange(ids.shape[0], device=ids.device), hits.argmax(dim=1)])
        return self.rm_head(torch.stack(rows, dim=1).to(self.rm_head_dtype))

    @property
    def rm_head_dtype(self) -> torch.dtype:
        return next(self.rm_head.parameters()).dtype


def remap_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released reward-model keys -> ``Qwen2VLReward`` keys (``lm_head.weight`` dropped)."""
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            continue
        if key.startswith("rm_head."):
            out[key] = value
        elif key.startswith(("model.language_model.", "model.visual.")):
            out["backbone." + key[len("model.") :]] = value
        elif key.startswith("visual."):
            out["backbone." + key] = value
        elif key.startswith("model."):
            out["backbone.language_model." + key[len("model.") :]] = value
        else:
            out[key] = value
    return out


def merge_lora(
    state: Mapping[str, torch.Tensor], alpha: float, path: Path, reward: str, *, rslora: bool = False
) -> dict[str, torch.Tensor]:
    """A peft-wrapped state dict with the LoRA deltas merged into the base weights, under the unwrapped names.

    Keys lose the ``base_model.model.`` prefix; ``<m>.base_layer.<p>`` becomes ``<m>.<p>`` with, for the weight,
    ``+ scale * lora_B @ lora_A`` added (``scale = alpha / r``, or ``alpha / sqrt(r)`` with ``rslora``; ``r`` is
    ``lora_A``'s row count); ``<m>.modules_to_save.<adapter>.<p>`` becomes ``<m>.<p>`` and the frozen
    ``<m>.original_module.*`` copies are dropped. A LoRA factor without its partner or its base weight raises
    ``CheckpointError`` naming ``path`` and the keys.
    """
    plain: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.")
        parts = key.split(".")
        if "lora_A" in parts or "lora_B" in parts:
            at = parts.index("lora_A") if "lora_A" in parts else parts.index("lora_B")
            if parts[at + 2 :] != ["weight"]:
                raise CheckpointError(f"reward {reward!r}: checkpoint {path} has an unsupported LoRA key {key!r}")
            factors.setdefault(".".join(parts[:at]), {})[parts[at]] = value
        elif "original_module" in parts:
            continue
        elif "modules_to_save" in parts:
            at = parts.index("modules_to_save")
            plain[".".join(parts[:at] + parts[at + 2 :])] = value
        else:
            plain[key.replace(".base_layer.", ".")] = value
    broken = [f"{m}.lora_{'B' if 'lora_A' in f else 'A'}" for m, f in factors.items() if len(f) != 2]
    broken += [f"{m}.base_layer.weight" for m in factors if f"{m}.weight" not in plain]
    if broken:
        raise CheckpointError(f"reward {reward!r}: checkpoint {path} lacks LoRA keys {sorted(broken)}")
    for module, f in factors.items():
        down, up = f["lora_A"].double(), f["lora_B"].double()
        scale = alpha / (math.sqrt(down.shape[0]) if rslora else down.shape[0])
        base = plain[f"{module}.weight"]
        plain[f"{module}.weight"] = (base.double() + scale * up @ down).to(base.dtype)
    return plain


def load_backbone(
    path: Path,
    weights: Path | Mapping[str, torch.Tensor],
    reward: str,
    head: Callable[[int], nn.Module],
    special_tokens: list[str],
    dtype: torch.dtype,
) -> tuple[Qwen2VLReward, object, dict]:
    """Tokenizer (with ``special_tokens`` added), strictly loaded ``Qwen2VLReward`` and the preprocessor config.

    ``head(hidden_size)`` builds the reward head; the base files (``BASE_FILES`` and a tokenizer, see
    ``TOKENIZER_FILES``, of the Qwen2-VL model the reward was trained from) live in ``path``; ``weights`` is the
    weight file, or its already-read released state dict.
    """
    from transformers import AutoTokenizer, Qwen2VLConfig

    require_files(path, reward, BASE_FILES, TOKENIZER_FILES)
    if not (path / "tokenizer.json").exists():
        require_files(path, reward, ["merges.txt"])
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    missing = [t for t in special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    tokenizer.padding_side = "right"
    config = Qwen2VLConfig.from_pretrained(str(path), local_files_only=True)
    config.text_config.vocab_size = len(tokenizer)
    model = Qwen2VLReward(config, head(config.text_config.hidden_size))
    state = weights if isinstance(weights, Mapping) else read_state_dict(weights, reward)
    load_strict(model, remap_keys(state), path if isinstance(weights, Mapping) else weights, reward)
    return model.eval().to(dtype), tokenizer, read_json(path / "preprocessor_config.json")


def smart_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Nearest size with both sides multiples of ``factor`` and area in ``[min_pixels, max_pixels]``."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(
    frames: torch.Tensor, processor: Mapping, max_pixels: int | None = None, min_pixels: int | None = None
) -> tuple[torch.Tensor, list[int]]:
    """``(T, C, H, W)`` frames in [0, 1] -> Qwen2-VL patches ``(t * h * w, C * tp * p * p)`` and grid ``[t, h, w]``.

    Frames are resized to ``smart_size``, normalised, padded to a multiple of the temporal patch by repeating
    the last frame, and cut into ``tp x p x p`` patches ordered so that each ``merge x merge`` block is contiguous.
    """
    patch = int(processor.get("patch_size", 14))
    temporal = int(processor.get("temporal_patch_size", 2))
    merge = int(processor.get("merge_size", 2))
    size = processor.get("size", {})
    min_pixels = int(min_pixels or processor.get("min_pixels", size.get("shortest_edge", 56 * 56)))
    max_pixels = int(max_pixels or processor.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280)))
    h, w = smart_size(frames.shape[-2], frames.shape[-1], patch * merge, min_pixels, max_pixels)
    x = normalize(
        resize(frames.float(), (h, w)), processor.get("image_mean", CLIP_MEAN), processor.get("image_std", CLIP_STD)
    )
    if x.shape[0] % temporal:
        x = torch.cat([x, x[-1:].expand(temporal - x.shape[0] % temporal, -1, -1, -1)])
    t, c = x.shape[0] // temporal, x.shape[1]
    gh, gw = h // patch, w // patch
    x = x.reshape(t, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * gh * gw, c * temporal * patch * patch), [t, gh, gw]


def chat_text(user_text: str, pad_token: str, count: int) -> str:
    """Qwen2-VL chat layout of one user turn: the visual block of ``count`` pad tokens, then ``user_text``."""
    visual = "<|vision_start|>" + pad_token * count + "<|vision_end|>"
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{visual}{user_text}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def read_template(path: Path, reward: str, tokens: list[str]) -> str:
    """The model's instruction template ``prompt_template.txt``: must hold ``{text_prompt}`` and ``tokens``."""
    require_files(path, reward, ["prompt_template.txt"])
    template = (path / "prompt_template.txt").read_text(encoding="utf-8")
    missing = [t for t in ["{text_prompt}", *tokens] if t not in template]
    if missing:
        raise ValueError(f"reward {reward!r}: {path / 'prompt_template.txt'} lacks {missing}")
    return template


def encode(
    tokenizer: object,
    texts: list[str],
    visuals: list[tuple[torch.Tensor, list[int]]],
    video: bool,
    config: object,
    device: torch.device,
    dtype: torch.dtype,
    positions: str = "sequential",
) -> dict[str, torch.Tensor]:
    """Model inputs for one visual (patches, grid) per text: ids, mask, pixels, grids and the positions.

    ``positions="sequential"`` passes ``position_ids`` ``(3, B, L)`` = ``0..L-1`` on every axis (how the released
    reward models were trained); ``"mrope"`` passes the modality types that make the model compute M-RoPE positions.
    """
    merge = config.vision_config.spatial_merge_size
    pad = "<|video_pad|>" if video else "<|image_pad|>"
    prompts = [
        chat_text(text, pad, math.prod(grid) // merge**2) for text, (_, grid) in zip(texts, visuals, strict=True)
    ]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    ids = tokens["input_ids"]
    types = torch.where(ids == config.video_token_id, 2, torch.where(ids == config.image_token_id, 1, 0))
    pixels = torch.cat([p for p, _ in visuals]).to(device, dtype)
    grid = torch.tensor([g for _, g in visuals], device=device)
    key = "video" if video else "image"
    inputs = {
        "input_ids": ids.to(device),
        "attention_mask": tokens["attention_mask"].to(device),
        f"pixel_values{'_videos' if video else ''}": pixels,
        f"{key}_grid_thw": grid,
    }
    if check_positions(positions) == "mrope":
        inputs["mm_token_type_ids"] = types.int().to(device)
    else:
        inputs["position_ids"] = torch.arange(ids.shape[1], device=device).expand(3, ids.shape[0], -1)
    return inputs
