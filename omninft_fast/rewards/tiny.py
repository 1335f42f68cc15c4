"""Tiny random-weight checkpoints in the released layouts of each reward model, built offline.

They exercise the real loading and scoring paths (tests, smoke runs of ``evaluation``) without any download;
their scores mean nothing. Every writer takes a directory, fills it, and returns it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def _byte_units() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, one per byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def write_clap(path: str | Path, seed: int = 0) -> Path:
    """A tiny ``ClapModel`` + ``ClapProcessor`` (8 kHz, 1 s clips, 16 mel bins, byte-level tokenizer)."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    path = Path(path)
    units = _byte_units()
    vocab = {token: i for i, token in enumerate([*SPECIALS, *units])}
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[], model_max_length=32)
    extractor = ClapFeatureExtractor(
        feature_size=16, sampling_rate=8000, hop_length=80, max_length_s=1, fft_window_size=256, frequency_max=4000
    )
    config = ClapConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 48,
            "max_position_embeddings": 40,
            "projection_dim": 16,
        },
        audio_config={
            "window_size": 4,
            "num_mel_bins": 16,
            "spec_size": 64,
            "patch_size": 2,
            "patch_stride": 2,
            "hidden_size": 32,
            "patch_embeds_hidden_size": 16,
            "projection_dim": 16,
            "depths": [1, 1],
            "num_attention_heads": [2, 2],
            "num_hidden_layers": 2,
            "num_classes": 4,
        },
        projection_dim=16,
    )
    _seeded(seed)
    ClapModel(config).eval().save_pretrained(path)
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(path)
    return path


def clip_tokenizer(max_length: int) -> object:
    """A byte-level CLIP tokenizer without merges (end-of-text has the largest id, as in CLIP)."""
    from transformers import CLIPTokenizer

    units = _byte_units()
    tokens = [*units, *(u + "</w>" for u in units), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length)


def write_clip(path: str | Path, seed: int = 0) -> Path:
    """A tiny ``CLIPModel`` (32 px images) with its processor files and a byte-level tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = Path(path)
    tokenizer = clip_tokenizer(24)
    vocab = tokenizer.get_vocab()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 24,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    _seeded(seed)
    CLIPModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


AUDIOBOX_WAVLM = {
    "encoder_layers": 2,
    "encoder_embed_dim": 32,
    "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 2,
    "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 2",
    "conv_pos": 16,
    "conv_pos_groups": 4,
    "num_buckets": 32,
    "max_distance": 64,
}


def write_audiobox(path: str | Path, seed: int = 0) -> Path:
    """A tiny Audiobox Aesthetics checkpoint (2-layer WavLM) in the released ``config.json`` + safetensors layout."""
    from safetensors.torch import save_file

    from omninft_fast.rewards.audiobox import AXES, build_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "proj_num_layer": 1,
        "proj_ln": False,
        "proj_act_fn": "gelu",
        "proj_dropout": 0,
        "nth_layer": AUDIOBOX_WAVLM["encoder_layers"] + 1,
        "use_weighted_layer_sum": True,
        "precision": "32",
        "normalize_embed": True,
        "output_dim": 1,
        "target_transform": {axis: {"mean": 5.0 + i, "std": 1.5} for i, axis in enumerate(AXES)},
        "wavlm_config": AUDIOBOX_WAVLM,
    }
    _seeded(seed)
    model = build_model(config)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path / "model.safetensors"))
    write_json(path / "config.json", config)
    return path


QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _write_qwen2vl(path: Path, extra_tokens: list[str], head: torch.nn.Module, weights: Path) -> None:
    """Base files of a tiny Qwen2-VL (config, byte-level tokenizer, preprocessor config) in ``path``, and the
    reward model's weights (base vocabulary plus ``extra_tokens``, released key names) in ``weights``."""
    from safetensors.torch import save_file
    from transformers import Qwen2Tokenizer, Qwen2VLConfig

    from omninft_fast.rewards.qwen2vl import Qwen2VLReward

    vocab = {token: i for i, token in enumerate([*_byte_units(), *QWEN_SPECIALS])}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_tokens(list(QWEN_SPECIALS), special_tokens=True)
    tokenizer.save_pretrained(path)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "bos_token_id": vocab["<|endoftext|>"],
            "eos_token_id": vocab["<|im_end|>"],
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    config.save_pretrained(path)
    write_json(
        path / "preprocessor_config.json",
        {
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "min_pixels": 56 * 56,
            "max_pixels": 112 * 112,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        },
    )
    config.text_config.vocab_size = len(vocab) + len(extra_tokens)
    model = Qwen2VLReward(config, head)
    released = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone.language_model."):
            key = "model." + key[len("backbone.language_model.") :]
        elif key.startswith("backbone.visual."):
            key = key[len("backbone.") :]
        released[key] = value.contiguous()
    released["lm_head.weight"] = torch.randn(config.text_config.vocab_size, 32)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(released, str(weights))


def write_videoalign(path: str | Path, seed: int = 0) -> Path:
    """A tiny VideoAlign checkpoint: ``model_config.json``, ``checkpoint-7/model.safetensors``, base Qwen2-VL
    files and a stand-in ``prompt_template.txt``."""
    from omninft_fast.rewards.videoalign import TOKENS

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _seeded(seed)
    _write_qwen2vl(path, TOKENS, torch.nn.Linear(32, 1, bias=False), path / "checkpoint-7" / "model.safetensors")
    write_json(
        path / "model_config.json",
        {
            "data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": 56 * 56},
            "model_config": {"output_dim": 1},
            "inference_config": {
                "VQ_mean": 0.5,
                "VQ_std": 2.0,
                "MQ_mean": -0.5,
                "MQ_std": 1.5,
                "TA_mean": 0.1,
                "TA_std": 0.5,
            },
        },
    )
    (path / "prompt_template.txt").write_text(
        "Rate this video made for: {text_prompt}\nVisual quality <|VQ_reward|> motion quality <|MQ_reward|> "
        "text alignment <|TA_reward|>",
        encoding="utf-8",
    )
    return path


def write_hpsv3(path: str | Path, seed: int = 0) -> Path:
    """A tiny HPSv3 checkpoint: ``HPSv3.safetensors``, base Qwen2-VL files and a stand-in ``prompt_template.txt``."""
    from omninft_fast.rewards.hpsv3 import TOKEN, ranking_head

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _seeded(seed)
    _write_qwen2vl(path, [TOKEN], ranking_head(32), path / "HPSv3.safetensors")
    (path / "prompt_template.txt").write_text(
        "How well does this image show: {text_prompt}? <|Reward|>", encoding="utf-8"
    )
    return path


IMAGEBIND = {
    "vision_dim": 32,
    "vision_blocks": 1,
    "vision_heads": 2,
    "text_dim": 32,
    "text_blocks": 1,
    "text_heads": 2,
    "audio_dim": 32,
    "audio_blocks": 1,
    "audio_heads": 2,
    "out_dim": 16,
    "image_size": 28,
    "patch_size": 14,
    "context_length": 16,
    "vocab_size": 514,
    "mel_bins": 32,
    "audio_frames": 24,
    "audio_kernel": 16,
    "audio_stride": 8,
}


def write_imagebind(path: str | Path, seed: int = 0) -> Path:
    """A tiny ImageBind checkpoint: ``imagebind_huge.pth`` (with stand-in depth weights, as the release holds),
    ``imagebind_config.json`` and a CLIP tokenizer."""
    from omninft_fast.rewards.imagebind import ImageBind

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _seeded(seed)
    model = ImageBind(IMAGEBIND)
    for name, param in model.named_parameters():
        if "pos_embed" in name or "cls_token" in name or "log_logit_scale" in name:
            param.data.normal_(std=0.5)
    state = dict(model.state_dict())
    state["modality_trunks.depth.blocks.0.norm_1.weight"] = torch.ones(8)
    torch.save(state, path / "imagebind_huge.pth")
    write_json(path / "imagebind_config.json", IMAGEBIND)
    clip_tokenizer(IMAGEBIND["context_length"]).save_pretrained(path)
    return path


SYNCHFORMER = {
    "dim": 32,
    "vision_blocks": 1,
    "vision_heads": 2,
    "image_size": 32,
    "patch_size": 16,
    "audio_blocks": 1,
    "audio_heads": 2,
    "mel_bins": 32,
    "sync_dim": 24,
    "sync_blocks": 1,
    "sync_heads": 2,
    "offsets": 21,
}


def write_synchformer(path: str | Path, seed: int = 0) -> Path:
    """A tiny Synchformer checkpoint: ``synchformer_state_dict.pth`` (the released flat state dict layout) and
    ``synchformer_config.json``."""
    from omninft_fast.rewards.synchformer import Synchformer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _seeded(seed)
    model = Synchformer(SYNCHFORMER)
    for param in model.parameters():
        if param.dim() == 3 and param.shape[0] == 1:  # class tokens and position embeddings start at zero
            param.data.normal_(std=0.5)
    torch.save(dict(model.state_dict()), path / "synchformer_state_dict.pth")
    write_json(path / "synchformer_config.json", SYNCHFORMER)
    return path
