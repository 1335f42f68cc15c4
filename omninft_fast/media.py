"""Sample files: one ``<id>.mp4`` (H.264 video + AAC audio, through PyAV) and ``<id>.wav`` per sample, with the
``prompts.jsonl`` index that ``omninft-fast eval`` reads; reading such an mp4 back; and writing files that never
replace one already there.

PyAV is optional at import: the first call that needs it raises ``MissingDependency`` (one line) when it is absent.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import wave
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

MIN_SIDE = 64  # frames are upscaled (nearest, whole factor) until the shorter side reaches this
AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


def aac_rate(sample_rate: int) -> int:
    """The lowest AAC sampling rate at or above ``sample_rate`` (96 kHz at most): the mp4's audio rate."""
    return next((rate for rate in AAC_RATES if rate >= sample_rate), AAC_RATES[-1])


class MissingDependency(ImportError):
    """An optional library that a command needs is not installed (the message says how to install it)."""


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise MissingDependency("writing and reading mp4 needs PyAV: pip install av") from None
    return av


def display_size(height: int, width: int, *, min_side: int = MIN_SIDE) -> tuple[int, int, int]:
    """``(scale, H', W')``: the whole nearest-neighbour factor that brings the shorter side to ``min_side`` (1 when
    it is already there) and the even frame size (H.264's 4:2:0 needs even sides) after padding by edge copies."""
    scale = max(1, math.ceil(min_side / min(height, width)))
    return scale, (height * scale + 1) // 2 * 2, (width * scale + 1) // 2 * 2


def _frame_pixels(frame: torch.Tensor, scale: int, height: int, width: int) -> np.ndarray:
    """``(3, H, W)`` in [0, 1] -> ``(height, width, 3)`` uint8, upscaled ``scale`` times, edge-padded to size."""
    pixels = (frame.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    pixels = pixels.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    pad = (0, width - pixels.shape[2], 0, height - pixels.shape[1])
    if any(pad):
        pixels = torch.nn.functional.pad(pixels[None].float(), pad, mode="replicate")[0].to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())


def write_wav(path: str | Path, audio: torch.Tensor, sample_rate: int) -> None:
    """Write mono ``(S,)`` audio in [-1, 1] as 16-bit PCM WAV."""
    pcm = (audio.detach().float().cpu() * 32768).round().clamp(-32768, 32767).to(torch.int16).numpy()
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.tobytes())


def write_mp4(
    path: str | Path,
    frames: torch.Tensor,
    fps: float,
    audio: torch.Tensor | None = None,
    sample_rate: int | None = None,
    *,
    min_side: int = MIN_SIDE,
    crf: int = 18,
) -> None:
    """Encode ``(T, 3, H, W)`` frames in [0, 1] (H.264, yuv420p) and an optional ``(S,)`` waveform in [-1, 1]
    (AAC, mono, resampled by FFmpeg to ``aac_rate(sample_rate)`` when AAC lacks that rate) into one mp4. Frames
    are converted one at a time (no whole upscaled clip in memory); small frames are upscaled by a whole factor
    (``display_size``) and odd sides padded by copying the last row/column."""
    av = _av()
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be (T, 3, H, W) with T >= 1, got {tuple(frames.shape)}")
    scale, height, width = display_size(frames.shape[2], frames.shape[3], min_side=min_side)
    rate = round(fps) if float(fps).is_integer() else None
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=rate or _fraction(fps))
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"crf": str(crf)}
        sound = None
        if audio is not None:
            if sample_rate is None:
                raise ValueError("write_mp4 needs sample_rate with audio")
            sound = container.add_stream("aac", rate=aac_rate(sample_rate), layout="mono")
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(_frame_pixels(frame, scale, height, width), format="rgb24")
            container.mux(video.encode(picture))
        container.mux(video.encode())
        if sound is not None:
            pcm = audio.detach().float().clamp(-1, 1).cpu().numpy().reshape(1, -1)
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=sound.rate)
            for start in range(0, pcm.shape[1], 1024):
                piece = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(pcm[:, start : start + 1024]), format="fltp", layout="mono"
                )
                piece.sample_rate, piece.pts = sample_rate, start
                for resampled in resampler.resample(piece):
                    container.mux(sound.encode(resampled))
            for resampled in resampler.resample(None):
                container.mux(sound.encode(resampled))
            container.mux(sound.encode())


def _fraction(fps: float) -> Any:
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def read_mp4(path: str | Path) -> tuple[torch.Tensor, float]:
    """``(T, 3, H, W)`` float32 frames in [0, 1] and the frame rate of an mp4's first video stream."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: holds no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except av.error.FFmpegError as error:
        raise ValueError(f"{path}: not a readable video ({error})") from None
    if not frames or not fps:
        raise ValueError(f"{path}: holds no decodable frames or no frame rate")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0, fps


def sample_files(ids: Sequence[str]) -> list[str]:
    """The names a sample folder of ``ids`` holds: ``<id>.mp4``, ``<id>.wav`` each and ``prompts.jsonl``."""
    return [f"{i}{ext}" for i in ids for ext in (".mp4", ".wav")] + ["prompts.jsonl"]


def refuse_existing(folder: str | Path, names: Sequence[str]) -> None:
    """``FileExistsError`` naming the first few of ``names`` that already exist in ``folder`` (nothing is
    overwritten); ``NotADirectoryError`` when ``folder`` is a file."""
    if Path(folder).exists() and not Path(folder).is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder; choose another folder")
    held = [name for name in names if (Path(folder) / name).exists()]
    if held:
        more = " ..." if len(held) > 3 else ""
        raise FileExistsError(f"{folder} already holds {', '.join(held[:3])}{more}; choose another folder")


@contextlib.contextmanager
def temporary_beside(path: Path) -> Iterator[Path]:
    """A fresh, empty temporary file in ``path``'s folder (created with it), named after ``path``; removed on exit
    unless it was renamed or linked into place (then only its extra name goes). ``with_umask`` it once written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def with_umask(path: Path) -> None:
    """Give ``path`` the permissions the user's umask gives a new file (a temporary file has owner-only ones)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def link_new(tmp: Path, path: Path) -> None:
    """Give the finished file ``tmp`` the name ``path`` only while ``path`` does not exist (``FileExistsError``): a
    hard link, or on a file system without them a rename after a check."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)


def write_new(path: str | Path, write: Callable[[Path], object], *, hint: str = "") -> Path:
    """Create ``path`` by ``write(temporary)`` on a fresh file beside it, linked into place only while ``path`` does
    not exist: nothing is ever overwritten (``FileExistsError`` naming ``path``, then ``hint``) and a kill leaves no
    half-written ``path``. Returns ``path``."""
    path = Path(path)
    with temporary_beside(path) as tmp:
        write(tmp)
        with_umask(tmp)
        try:
            link_new(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} exists{hint} (nothing is overwritten)") from None
    return path


def write_sample(
    folder: str | Path, sample_id: str, frames: torch.Tensor, waveform: torch.Tensor, *, fps: float, sample_rate: int
) -> None:
    """``<id>.mp4`` (``(T, 3, H, W)`` frames + ``(S,)`` waveform) and ``<id>.wav`` in ``folder``."""
    folder = Path(folder)
    write_mp4(folder / f"{sample_id}.mp4", frames, fps, waveform, sample_rate)
    write_wav(folder / f"{sample_id}.wav", waveform, sample_rate)


def write_index(folder: str | Path, entries: Sequence[dict[str, Any]]) -> None:
    """``prompts.jsonl``: one JSON object a line (``id``, ``prompt``, ``fps`` and any other fields)."""
    text = "".join(json.dumps(entry) + "\n" for entry in entries)
    (Path(folder) / "prompts.jsonl").write_text(text, encoding="utf-8")


def write_sample_folder(
    folder: str | Path,
    ids: Sequence[str],
    prompts: Sequence[str],
    frames: torch.Tensor,
    waveforms: torch.Tensor,
    *,
    fps: float,
    sample_rate: int,
) -> None:
    """Write ``<id>.mp4`` (video + audio) and ``<id>.wav`` for each sample and the ``prompts.jsonl`` index.

    Args:
        folder: created if missing; ``FileExistsError`` (before anything is written) when it already holds any of
            the files this call would write.
        ids: ``B`` file names without extension.
        prompts: ``B`` prompt texts.
        frames: ``(B, T, 3, H, W)`` in [0, 1] at ``fps``.
        waveforms: ``(B, S)`` in [-1, 1] at ``sample_rate``.
    """
    refuse_existing(folder, sample_files(ids))
    _av()
    Path(folder).mkdir(parents=True, exist_ok=True)
    for k, sample_id in enumerate(ids):
        write_sample(folder, sample_id, frames[k], waveforms[k], fps=fps, sample_rate=sample_rate)
    write_index(folder, [{"id": i, "prompt": p, "fps": fps} for i, p in zip(ids, prompts, strict=True)])
