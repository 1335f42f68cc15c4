"""Synchformer audio-visual synchronisation reward and JavisBench's DeSync metric.

Synchformer (Iashin et al., 2024) classifies the offset between the audio and video of a 4.8 s clip into 21 classes,
-2.0 s .. +2.0 s in 0.2 s steps (positive: the audio runs ahead of the video). There is no package for it; this
module is an independent implementation of the published architecture:

- video: 14 overlapping segments of 16 frames at 25 fps (0.64 s every 0.32 s), 224x224, each through a Motionformer
  ViT-B/16 with 2x16x16 tubelets, separate spatial and temporal position embeddings and divided space-time
  attention (time attention, then space attention, then the MLP; the class token attends to every token), then a
  pre-norm transformer layer pooling each of the 8 time steps over space through its own class token;
- audio: the matching 14 segments of 10240 samples at 16 kHz as 128-bin log-mels of 66 frames through an AST
  (16x16 patches, stride 10, class and distillation tokens), then a layer pooling each of the 6 time steps over
  frequency likewise;
- synchronisation: both sequences projected and layer-normalised, concatenated as ``[OFF, video, MOD, audio]`` with
  learned positions (198 tokens), three pre-norm blocks, and a linear offset head on the ``OFF`` token.

Module names follow the released state dict, which loads with strict key and shape checks. The Motionformer
variant is the one the release uses (divided space-time attention, as in the ``divided_224_16x4`` configuration it
was initialised from), not the trajectory attention of the Motionformer paper. Only the inference path of that
configuration is implemented: dropout, drop-path, content masks, trajectory and joint attention and the unused
segment-level aggregation options of the reference code are left out; the 2D patch embedding ``patch_embed`` is
unused by the video path and kept because the release holds it.

Checkpoint directory: ``synchformer_state_dict.pth``, the flat state dict of the AudioSet model
``24-01-04T16-39-21`` as released with MMAudio and used by av-benchmark and JavisBench (the original release
``24-01-04T16-39-21.pt`` holds the same keys under ``"model"``; save that entry under this name). Code and weights
are MIT; the Motionformer part is Apache-2.0. Optionally ``synchformer_config.json`` overrides the architecture sizes
(tests use it).

Scores (higher is better), with ``d`` JavisBench's DeSync (the mean absolute predicted offset in seconds over the
two 4.8 s windows of a clip padded or cut to 8 s: segments 0-13 and 10-23, i.e. 0-4.8 s and 3.2-8 s):
``neg_desync = -d`` (the evaluation metric) and ``inv_desync = 1 / (1 + d)`` (the OmniNFT authors' training reward).
Training and ``omninft-fast eval`` use the same defaults.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omninft_fast.rewards._loading import checkpoint_path, load_strict, read_json, read_state_dict, require_files
from omninft_fast.rewards.base import RewardBatch, RewardModel, register_reward
from omninft_fast.rewards.preprocess import center_crop, log_mel_spectrogram, normalize, resample, resize_shorter_side

RELEASE = {
    "dim": 768,
    "vision_blocks": 12,
    "vision_heads": 12,
    "image_size": 224,
    "patch_size": 16,
    "audio_blocks": 12,
    "audio_heads": 12,
    "mel_bins": 128,
    "sync_dim": 768,
    "sync_blocks": 3,
    "sync_heads": 8,
    "offsets": 21,
}
WEIGHTS = "synchformer_state_dict.pth"
CONFIG = "synchformer_config.json"
VIDEO_FPS = 25
AUDIO_RATE = 16_000
SEGMENT_FRAMES, FRAME_STEP = 16, 8  # 0.64 s segments every 0.32 s
SEGMENT_SAMPLES, SAMPLE_STEP = 10_240, 5_120
WINDOW = 14  # segments per 4.8 s window
TUBELET = 2
SPEC_FRAMES = 66
AUDIO_PATCH, AUDIO_STRIDE = 16, 10
MEL_MEAN, MEL_STD = -4.2677393, 4.5689974
MAX_OFFSET_S = 2.0
PIXEL_MEAN = PIXEL_STD = (0.5, 0.5, 0.5)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(..., L, H * d)`` -> ``(..., H, L, d)``."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(..., H, L, d)`` -> ``(..., L, H * d)``."""
    return x.transpose(-3, -2).flatten(-2)


class _DividedAttention(nn.Module):
    """Attention within frames (``space``) or within patch positions (``time``); the class token sees all."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, frames: int, axis: str) -> torch.Tensor:
        """``(N, 1 + frames * P, D)`` tokens (class token first, frame-major) -> same shape."""
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))  # (N, H, L, d)
        cls = F.scaled_dot_product_attention(q[:, :, :1], k, v)

        def group(t: torch.Tensor) -> torch.Tensor:  # (N, H, G, Lg, d): G frames of P or P positions of frames
            t = t[:, :, 1:].unflatten(2, (frames, -1))
            return t.transpose(2, 3) if axis == "time" else t

        qg, kg, vg = group(q), group(k), group(v)
        shape = (-1, -1, kg.shape[2], -1, -1)
        kg = torch.cat([k[:, :, None, :1].expand(shape), kg], dim=3)
        vg = torch.cat([v[:, :, None, :1].expand(shape), vg], dim=3)
        out = F.scaled_dot_product_attention(qg, kg, vg)
        if axis == "time":
            out = out.transpose(2, 3)
        return self.proj(_merge_heads(torch.cat([cls, out.flatten(2, 3)], dim=2)))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _DividedBlock(nn.Module):
    """Time attention, space attention, MLP; each pre-norm and residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _DividedAttention(dim, heads)
        self.timeattn = _DividedAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, 4 * dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        x = x + self.timeattn(self.norm3(x), frames, "time")
        x = x + self.attn(self.norm1(x), frames, "space")
        return x + self.mlp(self.norm2(x))


class _Stem(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj


class _PoolLayer(nn.Module):
    """Pre-norm transformer encoder layer (GELU) over a class token and ``L`` tokens, returning the class token."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, D)`` -> ``(N, D)``."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        x = x + self.linear2(F.gelu(self.linear1(self.norm2(x))))
        return x[:, 0]


class MotionFormer(nn.Module):
    """Video segment encoder: ``(N, 3, 16, S, S)`` pixels -> ``(N, 8, D)``, one feature per tubelet time step."""

    def __init__(self, cfg: dict[str, int]) -> None:
        super().__init__()
        dim, p, heads = cfg["dim"], cfg["patch_size"], cfg["vision_heads"]
        side = cfg["image_size"] // p
        self.patch_embed = _Stem(nn.Conv2d(3, dim, p, stride=p))  # unused by the video path; part of the release
        self.patch_embed_3d = _Stem(nn.Conv3d(3, dim, (TUBELET, p, p), stride=(TUBELET, p, p)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side + 1, dim))
        self.temp_embed = nn.Parameter(torch.zeros(1, SEGMENT_FRAMES // TUBELET, dim))
        self.blocks = nn.ModuleList(_DividedBlock(dim, heads) for _ in range(cfg["vision_blocks"]))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.spatial_attn_agg = _PoolLayer(dim, heads)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed_3d.proj(clips)  # (N, D, t, h, w)
        n, dim, t, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (N, t * h * w, D), frame-major
        pos = self.pos_embed[:, 1:].repeat(1, t, 1) + self.temp_embed.repeat_interleave(h * w, dim=1)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
        x = torch.cat([cls, x + pos], dim=1)
        for block in self.blocks:
            x = block(x, t)
        x = self.norm(x[:, 1:]).reshape(n * t, h * w, dim)
        return self.spatial_attn_agg(x).view(n, t, dim)


class _Dense(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim_in, dim_out)


class _ASTSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.query, self.key, self.value))
        return _merge_heads(F.scaled_dot_product_attention(q, k, v))


class _ASTAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = _ASTSelfAttention(dim, heads)
        self.output = _Dense(dim, dim)


class _ASTLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = _ASTAttention(dim, heads)
        self.intermediate = _Dense(dim, 4 * dim)
        self.output = _Dense(4 * dim, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=1e-12)
        self.layernorm_after = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = self.attention
        x = x + attention.output.dense(attention.attention(self.layernorm_before(x)))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class _ASTEncoder(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_ASTLayer(dim, heads) for _ in range(depth))


class _ASTPatches(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(1, dim, AUDIO_PATCH, stride=AUDIO_STRIDE)


class _ASTEmbeddings(nn.Module):
    def __init__(self, dim: int, patches: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embeddings = _ASTPatches(dim)
        self.position_embeddings = nn.Parameter(torch.zeros(1, patches + 2, dim))


class _AST(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int, patches: int) -> None:
        super().__init__()
        self.embeddings = _ASTEmbeddings(dim, patches)
        self.encoder = _ASTEncoder(dim, heads, depth)
        self.layernorm = nn.LayerNorm(dim, eps=1e-12)


class AST(nn.Module):
    """Audio segment encoder: ``(N, mel_bins, 66)`` log-mels -> ``(N, 6, D)``, one feature per patch time step."""

    def __init__(self, cfg: dict[str, int]) -> None:
        super().__init__()
        dim = cfg["dim"]
        self.freqs = (cfg["mel_bins"] - AUDIO_PATCH) // AUDIO_STRIDE + 1
        self.times = (SPEC_FRAMES - AUDIO_PATCH) // AUDIO_STRIDE + 1
        self.ast = _AST(dim, cfg["audio_heads"], cfg["audio_blocks"], self.freqs * self.times)
        self.freq_attn_agg = _PoolLayer(dim, cfg["audio_heads"])

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        emb = self.ast.embeddings
        x = emb.patch_embeddings.projection(spec[:, None]).flatten(2).transpose(1, 2)  # (N, f * t, D), f-major
        n, _, dim = x.shape
        aux = torch.cat([emb.cls_token, emb.distillation_token], dim=1).expand(n, -1, -1)
        x = torch.cat([aux, x], dim=1) + emb.position_embeddings
        for layer in self.ast.encoder.layer:
            x = layer(x)
        x = self.ast.layernorm(x)[:, 2:].view(n, self.freqs, self.times, dim)
        x = x.transpose(1, 2).reshape(n * self.times, self.freqs, dim)
        return self.freq_attn_agg(x).view(n, self.times, dim)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.query, self.key, self.value))
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class _SyncBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _Positions(nn.Module):
    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.pos_emb = nn.Parameter(torch.zeros(1, tokens, dim))


class GlobalTransformer(nn.Module):
    """Offset classifier over ``[OFF, video, MOD, audio]`` tokens: ``(B, Nv, D)``, ``(B, Na, D)`` -> ``(B, C)``."""

    def __init__(self, dim: int, heads: int, depth: int, tokens: int, classes: int) -> None:
        super().__init__()
        self.vis_in_lnorm = nn.LayerNorm(dim)
        self.aud_in_lnorm = nn.LayerNorm(dim)
        self.OFF_tok = nn.Parameter(torch.zeros(1, 1, dim))
        self.MOD_tok = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_emb_cfg = _Positions(tokens, dim)
        self.blocks = nn.Sequential(*(_SyncBlock(dim, heads) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(dim)
        self.off_head = nn.Linear(dim, classes)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        b = video.shape[0]
        off, mod = self.OFF_tok.expand(b, -1, -1), self.MOD_tok.expand(b, -1, -1)
        x = torch.cat([off, self.vis_in_lnorm(video), mod, self.aud_in_lnorm(audio)], dim=1)
        x = self.ln_f(self.blocks(x + self.pos_emb_cfg.pos_emb))
        return self.off_head(x[:, 0])


class Synchformer(nn.Module):
    """Segment feature extractors and the offset classifier of one 14-segment (4.8 s) window."""

    def __init__(self, cfg: dict[str, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.vfeat_extractor = MotionFormer(cfg)
        self.afeat_extractor = AST(cfg)
        self.vproj = nn.Linear(cfg["dim"], cfg["sync_dim"])
        self.aproj = nn.Linear(cfg["dim"], cfg["sync_dim"])
        tokens = 2 + WINDOW * (SEGMENT_FRAMES // TUBELET + self.afeat_extractor.times)
        self.transformer = GlobalTransformer(
            cfg["sync_dim"], cfg["sync_heads"], cfg["sync_blocks"], tokens, cfg["offsets"]
        )

    def offset_logits(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """``(B, 14, 8, D)`` video and ``(B, 14, 6, D)`` audio segment features -> ``(B, offsets)`` logits."""
        return self.transformer(self.vproj(video).flatten(1, 2), self.aproj(audio).flatten(1, 2))


def offset_grid(classes: int) -> torch.Tensor:
    """The offsets in seconds of the ``classes`` classes, evenly from -2 s to +2 s."""
    return torch.linspace(-MAX_OFFSET_S, MAX_OFFSET_S, classes, dtype=torch.float64).float()


def frame_index_25fps(num_frames: int, fps: float) -> torch.Tensor:
    """Indices of the frames shown at ``k / 25`` s for ``k < floor(num_frames * 25 / fps)`` (at least one)."""
    count = max(1, math.floor(num_frames * VIDEO_FPS / fps + 1e-6))
    index = torch.floor(torch.arange(count, dtype=torch.float64) * fps / VIDEO_FPS + 1e-6).long()
    return index.clamp(max=num_frames - 1)


def segment_count(frames: int, samples: int) -> int:
    """Segments both streams hold: 16 frames (25 fps) and 10240 samples (16 kHz) every 0.32 s."""
    return max(0, min((frames - SEGMENT_FRAMES) // FRAME_STEP, (samples - SEGMENT_SAMPLES) // SAMPLE_STEP) + 1)


def window_segments(count: int) -> torch.Tensor:
    """Segment indices ``(W, 14)`` of the windows DeSync averages over ``count >= 1`` segments.

    Two windows, the first and the last 14 segments (the first and last 4.8 s), when ``count > 14``; otherwise one,
    the segments repeated cyclically up to 14.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count <= WINDOW:
        return (torch.arange(WINDOW) % count)[None]
    return torch.stack([torch.arange(WINDOW), torch.arange(count - WINDOW, count)])


def load_synchformer(path: Path, reward: str) -> Synchformer:
    """The strictly loaded model from checkpoint directory ``path``."""
    require_files(path, reward, [WEIGHTS])
    cfg = dict(RELEASE)
    if (path / CONFIG).exists():
        cfg.update(read_json(path / CONFIG))
    model = Synchformer(cfg)
    load_strict(model, read_state_dict(path / WEIGHTS, reward), path / WEIGHTS, reward)
    return model.eval()


SCORES = ("neg_desync", "inv_desync")


@register_reward("synchformer")
class SynchformerReward(RewardModel):
    """``{"neg_desync"}`` (``-d``, ``(B,)`` in [-2, 0] s) and/or ``{"inv_desync"}`` (``1 / (1 + d)`` in [1/3, 1]).

    Frames are taken at 25 fps (the frame shown at each ``k / 25`` s), shorter side resized to the model's size
    (bicubic), centre cropped and scaled to [-1, 1]; audio is resampled to 16 kHz. Both are cut to ``max_length_s``.
    With ``pad`` (the default) every clip is zero-padded or cut to ``max_length_s`` (8 s: 24 segments, windows
    0-13 and 10-23), as JavisBench's loader and the OmniNFT authors' reward do; without it only clips shorter than one
    0.64 s segment are padded (to one). The remaining differences are their ffmpeg frame-rate conversion and
    resizing of 8-bit frames (``codec_roundtrip`` reproduces the 8-bit H.264 frames).

    Args:
        soft: score the expected absolute offset under the softmax of each window instead of the absolute offset of
            its most likely class (JavisBench's definition; piecewise constant in the input).
        max_length_s: seconds of each clip scored (JavisBench: 8).
        pad: zero-pad every clip to ``max_length_s`` first, as JavisBench's loader does (black frames, silence).
        scores: which of ``neg_desync`` and ``inv_desync`` to return (each returned score is its own reward in
            training).
    """

    modality = "av"
    release_files = ((WEIGHTS,),)

    def __init__(
        self,
        *,
        soft: bool = False,
        max_length_s: float = 8.0,
        pad: bool = True,
        scores: tuple[str, ...] | list[str] = SCORES[:1],
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        if not scores or any(s not in SCORES for s in scores):
            raise ValueError(f"scores must be a non-empty subset of {SCORES}, got {list(scores)}")
        self.scores = tuple(scores)
        if not max_length_s >= SEGMENT_FRAMES / VIDEO_FPS:
            raise ValueError(f"max_length_s must be >= {SEGMENT_FRAMES / VIDEO_FPS}, got {max_length_s!r}")
        self.soft, self.max_length_s, self.pad = bool(soft), float(max_length_s), bool(pad)
        model = load_synchformer(checkpoint_path(self.checkpoint_dir, self.name), self.name)
        self.model = model.to(self.device, self.dtype)
        self.cfg = model.cfg
        self.grid = offset_grid(self.cfg["offsets"]).to(self.device)

    def _streams(self, batch: RewardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, 3, H, W)`` frames at 25 fps and ``(B, S)`` 16 kHz audio, cut and padded."""
        video = batch.video[:, frame_index_25fps(batch.video.shape[1], batch.fps).to(batch.video.device)]
        audio = resample(batch.audio.float(), batch.sample_rate, AUDIO_RATE)
        frames, samples = round(self.max_length_s * VIDEO_FPS), round(self.max_length_s * AUDIO_RATE)
        video, audio = video[:, :frames], audio[:, :samples]
        if not self.pad:
            frames, samples = SEGMENT_FRAMES, SEGMENT_SAMPLES
        video = F.pad(video, (0, 0, 0, 0, 0, 0, 0, max(0, frames - video.shape[1])))
        audio = F.pad(audio, (0, max(0, samples - audio.shape[1])))
        return video, audio

    def _pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] -> ``(N, 3, S, S)`` in [-1, 1]."""
        size = self.cfg["image_size"]
        frames = center_crop(resize_shorter_side(frames.float(), size, mode="bicubic"), size)
        return normalize(frames, PIXEL_MEAN, PIXEL_STD)

    def _mels(self, clips: torch.Tensor) -> torch.Tensor:
        """``(N, 10240)`` 16 kHz clips -> ``(N, mel_bins, 66)`` normalised log-mels."""
        mel = log_mel_spectrogram(
            clips, AUDIO_RATE, n_fft=1024, hop_length=160, win_length=400, n_mels=self.cfg["mel_bins"], eps=1e-6
        )
        mel = F.pad(mel, (0, SPEC_FRAMES - mel.shape[-1])) if mel.shape[-1] < SPEC_FRAMES else mel[..., :SPEC_FRAMES]
        return (mel - MEL_MEAN) / (2 * MEL_STD)

    def window_logits(self, batch: RewardBatch) -> torch.Tensor:
        """``(B, W, offsets)`` float32 offset logits of each DeSync window (see ``window_segments``)."""
        video, audio = self._streams(batch)
        windows = window_segments(segment_count(video.shape[1], audio.shape[1])).to(video.device)
        used = windows.unique()  # sorted segment indices
        b, n = video.shape[0], used.numel()
        frames = (used[:, None] * FRAME_STEP + torch.arange(SEGMENT_FRAMES, device=video.device)).flatten()
        pixels = self._pixels(video[:, frames].flatten(0, 1)).unflatten(0, (b * n, SEGMENT_FRAMES))
        v = self.model.vfeat_extractor(pixels.transpose(1, 2).to(self.dtype)).unflatten(0, (b, n))
        clips = audio.unfold(-1, SEGMENT_SAMPLES, SAMPLE_STEP)[:, used]  # (B, n, 10240)
        a = self.model.afeat_extractor(self._mels(clips.flatten(0, 1)).to(self.dtype)).unflatten(0, (b, n))
        slot = torch.searchsorted(used, windows)  # (W, 14) positions in `used`
        logits = self.model.offset_logits(v[:, slot].flatten(0, 1), a[:, slot].flatten(0, 1))
        return logits.float().unflatten(0, (b, windows.shape[0]))

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        logits = self.window_logits(batch)
        grid = self.grid.abs()
        desync = logits.softmax(dim=-1) @ grid if self.soft else grid[logits.argmax(dim=-1)]
        # A window without finite logits has no offset (argmax would name class 0): its sample's score is NaN.
        desync = torch.where(logits.isfinite().all(dim=-1), desync, torch.nan).mean(dim=1)
        out = {"neg_desync": -desync, "inv_desync": 1.0 / (1.0 + desync)}
        return {key: out[key] for key in self.scores}
