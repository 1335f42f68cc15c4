"""Codec round trips that reproduce what reward models see when samples are scored from files.

The OmniNFT authors score frames decoded from the H.264 mp4 they write (8-bit, 4:2:0 chroma), and HPSv3 frames
additionally from JPEG at quality 75. ``h264_roundtrip`` encodes and decodes through PyAV (FFmpeg's libx264 inside
the ``av`` wheel, an optional dependency), ``jpeg_roundtrip`` through Pillow; both work in memory.
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from omninft_fast._checks import check_tensor

CRF = 23  # libx264's default quality
PRESET = "medium"


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``(..., C, H, W)`` floats in [0, 1] -> ``(..., H, W, C)`` uint8 (rounded, clamped)."""
    return frames.detach().float().mul(255).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1).cpu().numpy()


def from_uint8(frames: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``(..., H, W, C)`` uint8 -> ``(..., C, H, W)`` in [0, 1] with ``like``'s dtype and device."""
    return torch.from_numpy(frames).movedim(-1, -3).to(like.device, like.dtype) / 255


def h264_roundtrip(video: torch.Tensor, fps: float, *, crf: int = CRF, preset: str = PRESET) -> torch.Tensor:
    """``(B, T, 3, H, W)`` frames in [0, 1] after an in-memory H.264 (yuv420p) mp4 encode and decode.

    Odd sizes are edge-padded to even for 4:2:0 and cropped back. Needs PyAV (``pip install av``).
    """
    check_tensor("video", video, ndim=5)
    try:
        import av
    except ImportError as error:
        raise ImportError("codec_roundtrip needs PyAV: pip install av (see requirements/rewards.txt)") from error
    b, t, c, h, w = video.shape
    if c != 3:
        raise ValueError(f"video must have 3 channels for H.264, got shape {tuple(video.shape)}")
    padded = F.pad(video.flatten(0, 1).float(), (0, w % 2, 0, h % 2), mode="replicate").unflatten(0, (b, t))
    rate = Fraction(fps).limit_denominator(1001)
    out = []
    for clip in to_uint8(padded):
        buffer = io.BytesIO()
        with av.open(buffer, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
            # One encoder thread: the same clip always gives the same bytes (and so the same reward).
            stream.options = {"crf": str(crf), "preset": preset, "threads": "1"}
            for frame in clip:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        buffer.seek(0)
        with av.open(buffer, mode="r") as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        if len(frames) != t:
            raise RuntimeError(f"H.264 round trip returned {len(frames)} frames for {t}")
        out.append(np.stack(frames)[:, :h, :w])
    return from_uint8(np.stack(out), video)


def jpeg_roundtrip(video: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """``(..., 3, H, W)`` frames in [0, 1] after an in-memory JPEG encode and decode at ``quality`` (Pillow)."""
    from PIL import Image

    if video.dim() < 3 or video.shape[-3] != 3:
        raise ValueError(f"frames must be (..., 3, H, W), got shape {tuple(video.shape)}")
    pixels = to_uint8(video)
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    out = np.empty_like(flat)
    for i, frame in enumerate(flat):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return from_uint8(out.reshape(pixels.shape), video)
