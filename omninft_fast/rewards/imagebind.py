"""ImageBind audio-video reward and JavisBench metrics: TV-IB, TA-IB, AV-IB, AVHScore and JavisScore.

There is no usable ImageBind package (the published ``imagebind`` package is an empty stub; the upstream code needs
torchvision, torchaudio, pytorchvideo and timm). This module is an independent implementation of the published
architecture for the three modalities the metrics use (vision, text, audio): pre-norm ViT trunks with
sequence-first ``nn.MultiheadAttention`` (learned key/value biases in the audio trunk), a 2x14x14 ``Conv3d``
patch stem on two-frame clips, a 16x16 stride-10 ``Conv2d`` stem with LayerNorm on 128-bin log-mel
spectrograms, a causal text transformer pooled at the end-of-text token, and linear heads into one 1024-d space.
Module names follow the released ``imagebind_huge.pth`` state dict, which loads with strict key and shape checks;
the depth, thermal and IMU weights it also holds are set aside.

Checkpoint directory: ``imagebind_huge.pth`` (the release; CC-BY-NC 4.0, non-commercial use only), CLIP BPE
tokenizer files (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, e.g. from ``openai/clip-vit-large-patch14``,
the same vocabulary), and optionally ``imagebind_config.json`` overriding the architecture sizes (tests use it).

Scores (JavisBench definitions; higher is better):

- ``ib_tv`` / ``ib_ta``: cosine between the video (audio) embedding and its prompt's text embedding;
- ``ib_av``: cosine between the video and audio embeddings;
- ``avh`` (AVHScore): mean over frames of the cosine between each frame (as an image) and the whole audio;
- ``javis`` (JavisScore): in 0.5 s windows, the mean of the lowest 40% frame-to-window-audio cosines,
  averaged over windows.

Video embedding, as the release's video transform: five 2 s clips spread over the video, each its first and last
frame, shorter side scaled to 224 with plain bilinear interpolation (no antialiasing; the longer side
``floor(long / short * 224)``), CLIP normalisation, and three 224 crops (left, centre, right of a landscape
frame; top, centre, bottom of a portrait one; centre offset rounded up); the unit embeddings of the 5 x 3 views
are averaged. Per-frame embeddings (``avh``, ``javis``) use the centre crop. Audio embedding: 16 kHz, three 2 s
clips, Kaldi log-mel (128 bins, 25 ms / 10 ms), padded or cut to 204 frames, normalised with mean -4.268 and std
9.138; averaged likewise. Stereo: the release's loader computes the filterbank of the first (left) channel only;
reward batches carry mono audio (the trainer's decoded audio and ``omninft-fast eval``'s WAV reader average the
channels), so a stereo clip is scored on its channel mean. Pass the left channel as the batch's audio to score as
the release's loader does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omninft_fast.rewards._loading import checkpoint_path, load_strict, read_json, read_state_dict, require_files
from omninft_fast.rewards.base import RewardBatch, RewardModel, register_reward
from omninft_fast.rewards.preprocess import kaldi_fbank, normalize, resample

HUGE = {
    "vision_dim": 1280,
    "vision_blocks": 32,
    "vision_heads": 16,
    "text_dim": 1024,
    "text_blocks": 24,
    "text_heads": 16,
    "audio_dim": 768,
    "audio_blocks": 12,
    "audio_heads": 12,
    "out_dim": 1024,
    "image_size": 224,
    "patch_size": 14,
    "context_length": 77,
    "vocab_size": 49408,
    "mel_bins": 128,
    "audio_frames": 204,
    "audio_kernel": 16,
    "audio_stride": 10,
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AUDIO_RATE = 16_000
AUDIO_MEAN, AUDIO_STD = -4.268, 9.138
CLIP_S = 2.0
FBANK_WINDOW = 400  # samples of one 25 ms Kaldi fbank window at 16 kHz: the shortest clip with a frame
SCORES = ("ib_tv", "ib_ta", "ib_av", "avh", "javis")
UNUSED_MODALITIES = ("depth", "thermal", "imu")


class _Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm transformer block on ``(L, N, D)`` tokens."""

    def __init__(self, dim: int, heads: int, bias_kv: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, bias=True, add_bias_kv=bias_kv)
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.norm_2(x))


class _Trunk(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, *, bias_kv: bool, pre_norm: bool) -> None:
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(dim, eps=1e-6)) if pre_norm else nn.Sequential()
        self.blocks = nn.ModuleList(_Block(dim, heads, bias_kv) for _ in range(depth))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, L, D)`` -> ``(N, L, D)``."""
        x = self.pre_transformer_layer(tokens).transpose(0, 1)
        for block in self.blocks:
            x = block(x, mask)
        return x.transpose(0, 1)


class _Stem(nn.Module):
    def __init__(self, proj: nn.Module, norm: nn.Module | None) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return tokens if self.norm_layer is None else self.norm_layer(tokens)


class _PosEmbed(nn.Module):
    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))


class _PatchTokens(nn.Module):
    """Stem tokens with a leading class token and learned positions."""

    def __init__(self, stem: _Stem, patches: int, dim: int) -> None:
        super().__init__()
        self.rgbt_stem = stem
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding_helper = _PosEmbed(patches + 1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.rgbt_stem(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.pos_embedding_helper.pos_embed


class _TextTokens(nn.Module):
    def __init__(self, vocab: int, context: int, dim: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, context, dim))
        self.register_buffer("mask", torch.full((context, context), float("-inf")).triu(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.pos_embed


class _FirstToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class _TextHead(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out, bias=False))


class _LogitScale(nn.Module):
    def __init__(self, learnable: bool) -> None:
        super().__init__()
        if learnable:
            self.log_logit_scale = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("log_logit_scale", torch.zeros(()))


def _head(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim, eps=1e-6), _FirstToken(), nn.Linear(dim, out, bias=False))


class ImageBind(nn.Module):
    """Vision, text and audio encoders of ImageBind into one unit-norm embedding space."""

    def __init__(self, cfg: dict[str, int]) -> None:
        super().__init__()
        self.cfg = cfg
        v, t, a = cfg["vision_dim"], cfg["text_dim"], cfg["audio_dim"]
        side = cfg["image_size"] // cfg["patch_size"]
        kernel, stride = cfg["audio_kernel"], cfg["audio_stride"]
        audio_patches = ((cfg["mel_bins"] - kernel) // stride + 1) * ((cfg["audio_frames"] - kernel) // stride + 1)
        p = cfg["patch_size"]
        vision_proj = nn.Sequential(nn.Identity(), nn.Conv3d(3, v, (2, p, p), stride=(2, p, p), bias=False))
        audio_proj = nn.Conv2d(1, a, kernel, stride=stride, bias=False)
        self.modality_preprocessors = nn.ModuleDict(
            {
                "vision": _PatchTokens(_Stem(vision_proj, None), side * side, v),
                "text": _TextTokens(cfg["vocab_size"], cfg["context_length"], t),
                "audio": _PatchTokens(_Stem(audio_proj, nn.LayerNorm(a)), audio_patches, a),
            }
        )
        self.modality_trunks = nn.ModuleDict(
            {
                "vision": _Trunk(v, cfg["vision_blocks"], cfg["vision_heads"], bias_kv=False, pre_norm=True),
                "text": _Trunk(t, cfg["text_blocks"], cfg["text_heads"], bias_kv=False, pre_norm=False),
                "audio": _Trunk(a, cfg["audio_blocks"], cfg["audio_heads"], bias_kv=True, pre_norm=False),
            }
        )
        out = cfg["out_dim"]
        self.modality_heads = nn.ModuleDict(
            {"vision": _head(v, out), "text": _TextHead(t, out), "audio": _head(a, out)}
        )
        self.modality_postprocessors = nn.ModuleDict(
            {
                "text": nn.Sequential(nn.Identity(), _LogitScale(learnable=True)),
                "audio": nn.Sequential(nn.Identity(), _LogitScale(learnable=False)),
            }
        )

    def embed_vision(self, clips: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 2, S, S)`` normalised two-frame clips -> ``(N, out_dim)`` unit vectors."""
        tokens = self.modality_trunks["vision"](self.modality_preprocessors["vision"](clips))
        return F.normalize(self.modality_heads["vision"](tokens), dim=-1)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """``(N, context_length)`` token ids (end-of-text has the largest id) -> ``(N, out_dim)`` unit vectors."""
        pre = self.modality_preprocessors["text"]
        tokens = self.modality_trunks["text"](pre(ids), pre.mask)
        pooled = tokens[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return F.normalize(self.modality_heads["text"].proj(pooled), dim=-1)

    def embed_audio(self, mels: torch.Tensor) -> torch.Tensor:
        """``(N, 1, mel_bins, audio_frames)`` normalised log-mels -> ``(N, out_dim)`` unit vectors."""
        tokens = self.modality_trunks["audio"](self.modality_preprocessors["audio"](mels))
        return F.normalize(self.modality_heads["audio"](tokens), dim=-1)


def short_side_scale(frames: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> shorter side ``size``, longer ``floor(long / short * size)``; bilinear, no antialiasing."""
    h, w = frames.shape[-2:]
    shape = (size, math.floor(w / h * size)) if h <= w else (math.floor(h / w * size), size)
    return F.interpolate(frames, size=shape, mode="bilinear", align_corners=False)


def spatial_crops(frames: torch.Tensor, size: int, count: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, count, C, size, size)``: the centre crop (``count=1``) or the three crops along
    the longer side (start, centre, end; ``count=3``), centre offsets rounded up."""
    h, w = frames.shape[-2:]
    top, left = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    if count == 1:
        offsets = [(top, left)]
    elif h > w:
        offsets = [(0, left), (top, left), (h - size, left)]
    else:
        offsets = [(top, 0), (top, left), (top, w - size)]
    return torch.stack([frames[..., y : y + size, x : x + size] for y, x in offsets], dim=1)


def clip_starts(duration: float, count: int) -> list[float]:
    """Start times of ``count`` clips of ``CLIP_S`` seconds spread evenly over ``duration`` seconds."""
    span = max(duration - CLIP_S, 0.0)
    return [span * i / max(count - 1, 1) for i in range(count)]


def audio_features(audio: torch.Tensor, cfg: dict[str, int]) -> torch.Tensor:
    """``(N, S)`` 16 kHz clips -> ``(N, 1, mel_bins, audio_frames)`` normalised Kaldi log-mels."""
    audio = audio - audio.mean(dim=-1, keepdim=True)
    mel = kaldi_fbank(audio, AUDIO_RATE, cfg["mel_bins"]).transpose(1, 2)
    frames = cfg["audio_frames"]
    mel = F.pad(mel, (0, frames - mel.shape[-1])) if mel.shape[-1] < frames else mel[..., :frames]
    return ((mel - AUDIO_MEAN) / AUDIO_STD)[:, None]


def load_imagebind(path: Path, reward: str) -> tuple[ImageBind, Any]:
    """The strictly loaded model and its CLIP tokenizer from checkpoint directory ``path``."""
    from transformers import AutoTokenizer

    require_files(path, reward, ["imagebind_huge.pth"], ["tokenizer.json", "vocab.json"])
    cfg = dict(HUGE)
    if (path / "imagebind_config.json").exists():
        cfg.update(read_json(path / "imagebind_config.json"))
    model = ImageBind(cfg)
    state = read_state_dict(path / "imagebind_huge.pth", reward)
    state = {k: v for k, v in state.items() if k.partition(".")[2].split(".")[0] not in UNUSED_MODALITIES}
    load_strict(model, state, path / "imagebind_huge.pth", reward)
    return model.eval(), AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@register_reward("imagebind")
class ImageBindReward(RewardModel):
    """``{"ib_tv", "ib_ta", "ib_av", "avh", "javis"}`` (the chosen ``scores``), each ``(B,)`` in [-1, 1].

    Args:
        scores: which scores to compute (``avh`` and ``javis`` embed every frame and cost the most).
        video_clips: two-frame clips averaged into the video embedding.
        audio_clips: 2 s clips averaged into the audio embedding.
        max_frames: frames embedded for ``avh`` and ``javis`` (evenly subsampled when the video has more).
        window_s: JavisScore window length.
        lowest: fraction of each window's lowest frame cosines averaged by JavisScore.
        crops: spatial crops per clip in the video embedding, 3 (the release's transform) or 1 (centre only).
    """

    modality = "av"
    release_files = (("imagebind_huge.pth",), ("tokenizer.json", "vocab.json"))

    def __init__(
        self,
        *,
        scores: tuple[str, ...] | list[str] = SCORES,
        video_clips: int = 5,
        audio_clips: int = 3,
        max_frames: int = 48,
        window_s: float = 0.5,
        lowest: float = 0.4,
        crops: int = 3,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        if crops not in (1, 3):
            raise ValueError(f"crops must be 1 or 3, got {crops!r}")
        self.crops = crops
        if not scores or any(s not in SCORES for s in scores):
            raise ValueError(f"scores must be a non-empty subset of {SCORES}, got {list(scores)}")
        if min(video_clips, audio_clips, max_frames) < 1 or not window_s > 0 or not 0 < lowest <= 1:
            raise ValueError("video_clips, audio_clips and max_frames must be >= 1, window_s > 0, 0 < lowest <= 1")
        self.scores = tuple(scores)
        self.video_clips, self.audio_clips, self.max_frames = video_clips, audio_clips, max_frames
        self.window_s, self.lowest = float(window_s), float(lowest)
        path = checkpoint_path(self.checkpoint_dir, self.name)
        model, self.tokenizer = load_imagebind(path, self.name)
        self.model = model.to(self.device, self.dtype)
        self.cfg = model.cfg

    def _pixels(self, frames: torch.Tensor, crops: int = 1) -> torch.Tensor:
        """``(N, C, H, W)`` frames in [0, 1] -> normalised ``(N, crops, C, S, S)``."""
        size = self.cfg["image_size"]
        frames = normalize(short_side_scale(frames.float(), size), CLIP_MEAN, CLIP_STD)
        return spatial_crops(frames, size, crops).to(self.dtype)

    def _text(self, prompts: list[str]) -> torch.Tensor:
        context = self.cfg["context_length"]
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=context, return_tensors="pt")
        return self.model.embed_text(ids["input_ids"].to(self.device))

    def _video(self, video: torch.Tensor, fps: float) -> torch.Tensor:
        """``(B, T, C, H, W)`` -> ``(B, out_dim)`` mean of the clip embeddings."""
        frames = video.shape[1]
        index = []
        for start in clip_starts(frames / fps, self.video_clips):
            first = min(math.ceil(start * fps), frames - 1)  # the clip's first frame at or after its start
            last = max(first, min(math.ceil((start + CLIP_S) * fps) - 1, frames - 1))
            index += [first, last]
        clips = video[:, index].flatten(0, 1)  # (B * clips * 2, C, H, W)
        pixels = self._pixels(clips, self.crops).unflatten(0, (-1, 2))  # (B * clips, 2, crops, C, S, S)
        pixels = pixels.permute(0, 2, 3, 1, 4, 5).flatten(0, 1)  # (B * clips * crops, C, 2, S, S)
        return self.model.embed_vision(pixels).unflatten(0, (video.shape[0], -1)).mean(dim=1)

    def _audio(self, audio: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` 16 kHz -> ``(B, out_dim)`` mean of the clip embeddings. Clips are cut as the release cuts them,
        ``audio[int(start * rate) : int(end * rate)]``: audio shorter than a clip is not padded, its spectrogram is
        (to one fbank window at least)."""
        mels = []
        for start in clip_starts(audio.shape[-1] / AUDIO_RATE, self.audio_clips):
            clip = audio[:, int(start * AUDIO_RATE) : int((start + CLIP_S) * AUDIO_RATE)]
            clip = F.pad(clip, (0, max(0, FBANK_WINDOW - clip.shape[-1])))
            mels.append(audio_features(clip.float(), self.cfg))
        mels = torch.stack(mels, 1).flatten(0, 1).to(self.dtype)  # (B * clips, 1, mel_bins, frames)
        return self.model.embed_audio(mels).unflatten(0, (audio.shape[0], -1)).mean(dim=1)

    def _frame_scores(self, video: torch.Tensor, fps: float, audio: torch.Tensor, whole: torch.Tensor) -> dict:
        """AVHScore and JavisScore of each sample."""
        frames = video.shape[1]
        index = torch.linspace(0, frames - 1, min(frames, self.max_frames)).round().long().to(video.device)
        times = index.double() / fps
        images = self._pixels(video[:, index].flatten(0, 1))[:, 0]
        embeds = self.model.embed_vision(images[:, :, None].expand(-1, -1, 2, -1, -1))
        embeds = embeds.unflatten(0, (video.shape[0], len(index))).float()  # (B, n, D)
        avh = torch.einsum("bnd,bd->bn", embeds, F.normalize(whole, dim=-1)).mean(dim=1)
        window = round(self.window_s * AUDIO_RATE)
        count = max(1, min(audio.shape[-1] // window, math.ceil(frames / fps / self.window_s)))
        pieces = F.pad(audio, (0, max(0, count * window - audio.shape[-1])))[:, : count * window]
        mels = audio_features(pieces.reshape(-1, window).float(), self.cfg).to(self.dtype)
        windows = self.model.embed_audio(mels).unflatten(0, (audio.shape[0], count)).float()  # (B, M, D)
        javis = []
        for b in range(video.shape[0]):
            per_window = []
            for m in range(count):
                inside = (times >= m * self.window_s) & (times < (m + 1) * self.window_s)
                if not bool(inside.any()):
                    continue
                cos = embeds[b, inside] @ windows[b, m]
                k = max(1, int(cos.numel() * self.lowest))
                per_window.append(cos.topk(k, largest=False).values.mean())
            javis.append(torch.stack(per_window).mean())
        return {"avh": avh, "javis": torch.stack(javis)}

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        audio = resample(batch.audio.float(), batch.sample_rate, AUDIO_RATE)
        video_embed = self._video(batch.video, batch.fps).float()
        audio_embed = self._audio(audio).float()
        out: dict[str, torch.Tensor] = {}
        if "ib_tv" in self.scores:
            out["ib_tv"] = F.cosine_similarity(self._text(batch.prompts_for("video")).float(), video_embed, dim=-1)
        if "ib_ta" in self.scores:
            out["ib_ta"] = F.cosine_similarity(self._text(batch.prompts_for("audio")).float(), audio_embed, dim=-1)
        if "ib_av" in self.scores:
            out["ib_av"] = F.cosine_similarity(video_embed, audio_embed, dim=-1)
        if "avh" in self.scores or "javis" in self.scores:
            extra = self._frame_scores(batch.video, batch.fps, audio, audio_embed)
            out.update({key: value for key, value in extra.items() if key in self.scores})
        return {key: out[key] for key in SCORES if key in out}
