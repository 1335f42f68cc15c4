"""JavisBench-style evaluation of generated audio-video samples with the reward models whose checkpoints are set.

Folder format (everything readable without torchvision or torchaudio)::

    samples/
      prompts.jsonl      one JSON object a line: {"id": "0001", "prompt": "...", optional "video_prompt",
                         "audio_prompt", "fps"}
      0001.wav           PCM WAV (8/16/24/32-bit integer, any channel count: channels are averaged)
      0001.mp4           video (its first video stream; fps from the file; needs PyAV)   \\
      0001.npy           or video as (T, H, W, 3) uint8 or float in [0, 1]                \\ one of
      0001.gif           or an animated GIF (fps from its frame duration)                  /  these
      0001/              or a folder of frames 000.png, 001.png, ...                      /

``fps`` of ``.npy`` and frame folders comes from the prompt line, else ``--fps``. Each metric is the mean over
samples of one score of one reward plugin; metrics whose reward has no ``--checkpoint`` are reported as
"not configured". The CLIP column is the plain mean cosine, as JavisBench reports it; DeSync (seconds, lower is
better) is minus the mean ``neg_desync`` reward of ``synchformer``, with the training defaults (every clip padded or
cut to 8 s, the windows 0-4.8 s and 3.2-8 s, as the trainer's ``synchformer`` reward). Every reward runs with
its plugin's defaults unless ``--options`` changes them. Writes ``results.md`` and ``results.json`` to ``--out``
(refused up front where either exists: nothing is overwritten) and prints the markdown table::

    python -m omninft_fast.evaluation samples/ --checkpoint clap=ckpt/clap --checkpoint clip_score=ckpt/clip
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omninft_fast.media import read_mp4, refuse_existing
from omninft_fast.media import write_wav as write_wav  # part of this module's interface
from omninft_fast.rewards import (  # the adapters register themselves on import
    RewardBatch,
    audiobox,  # noqa: F401
    available_rewards,
    build_reward,
    clap,  # noqa: F401
    clip_score,  # noqa: F401
    hpsv3,  # noqa: F401
    imagebind,  # noqa: F401
    synchformer,  # noqa: F401
    videoalign,  # noqa: F401
)


@dataclass(frozen=True)
class Metric:
    """One table column: score ``key`` of reward ``reward`` (negated if ``negate``); ``higher`` tells the better
    direction."""

    name: str
    reward: str
    key: str
    higher: bool = True
    negate: bool = False


METRICS = (
    Metric("VQ", "videoalign", "vq"),
    Metric("MQ", "videoalign", "mq"),
    Metric("TA", "videoalign", "ta"),
    Metric("AQ", "audiobox", "pq"),
    Metric("HPSv3", "hpsv3", "hpsv3"),
    Metric("TV-IB", "imagebind", "ib_tv"),
    Metric("TA-IB", "imagebind", "ib_ta"),
    Metric("CLIP", "clip_score", "clip_score"),
    Metric("CLAP", "clap", "clap"),
    Metric("AV-IB", "imagebind", "ib_av"),
    Metric("AVHScore", "imagebind", "avh"),
    Metric("JavisScore", "imagebind", "javis"),
    Metric("DeSync", "synchformer", "neg_desync", higher=False, negate=True),
)
NOT_CONFIGURED = "not configured"
NOT_AVAILABLE = "not available"
NOT_FINITE = "not finite"
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"clip_score": {"scale": 1.0}}  # JavisBench's CLIP is the cosine


@dataclass
class Sample:
    """One decoded sample: ``video (T, C, H, W)`` in [0, 1] and mono ``audio (S,)`` in [-1, 1]."""

    id: str
    prompt: str
    video_prompt: str | None
    audio_prompt: str | None
    video: torch.Tensor
    fps: float
    audio: torch.Tensor
    sample_rate: int


def read_wav(path: Path) -> tuple[torch.Tensor, int]:
    """Mono ``(S,)`` float32 in [-1, 1] and the sample rate of an integer PCM WAV file (``ValueError`` naming the
    file when it is unreadable or holds no samples)."""
    try:
        with wave.open(str(path), "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as error:
        raise ValueError(f"{path}: not a readable PCM WAV file ({error or 'it ends early'})") from None
    if not raw:
        raise ValueError(f"{path}: holds no audio samples")
    if width == 1:
        data = np.frombuffer(raw, dtype=np.uint8).astype(np.float32) / 128.0 - 1.0
    elif width == 3:
        bytes3 = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = bytes3[:, 0] | (bytes3[:, 1] << 8) | (bytes3[:, 2] << 16)
        data = (np.where(value >= 1 << 23, value - (1 << 24), value) / float(1 << 23)).astype(np.float32)
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        data = np.frombuffer(raw, dtype=dtype).astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise ValueError(f"{path}: unsupported WAV sample width {width} bytes")
    return torch.from_numpy(data.reshape(-1, channels).mean(axis=1)), rate


def _frames_to_tensor(frames: np.ndarray, source: Path) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 or float array -> ``(T, 3, H, W)`` float32 in [0, 1]."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"{source}: video must be (T, H, W, 3) with T >= 1, got shape {frames.shape}")
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    return video.float() / 255.0 if frames.dtype == np.uint8 else video.float().clamp(0, 1)


def read_video(folder: Path, sample_id: str, fps: float | None) -> tuple[torch.Tensor, float]:
    """``(T, 3, H, W)`` frames and fps of sample ``sample_id`` (``.mp4``, ``.npy``, ``.gif`` or a folder of PNGs)."""
    from PIL import Image, ImageSequence

    mp4, npy, gif = folder / f"{sample_id}.mp4", folder / f"{sample_id}.npy", folder / f"{sample_id}.gif"
    frames_dir = folder / sample_id
    if mp4.exists():
        return read_mp4(mp4)
    if npy.exists():
        if fps is None:
            raise ValueError(f"{npy}: no fps in prompts.jsonl and no --fps")
        return _frames_to_tensor(np.load(npy), npy), fps
    if gif.exists():
        with Image.open(gif) as image:
            frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
            duration_ms = image.info.get("duration") or 0
        gif_fps = 1000.0 / duration_ms if duration_ms else fps
        if gif_fps is None:
            raise ValueError(f"{gif}: no frame duration, no fps in prompts.jsonl and no --fps")
        return _frames_to_tensor(np.stack(frames), gif), gif_fps
    if frames_dir.is_dir():
        files = sorted(frames_dir.glob("*.png"))
        if not files or fps is None:
            raise ValueError(f"{frames_dir}: needs PNG frames and an fps (prompts.jsonl or --fps)")
        frames = [np.asarray(Image.open(file).convert("RGB")) for file in files]
        return _frames_to_tensor(np.stack(frames), frames_dir), fps
    raise FileNotFoundError(
        f"no video for sample {sample_id!r}: expected {mp4.name}, {npy.name}, {gif.name} or {frames_dir.name}/"
    )


def load_samples(folder: str | Path, fps: float | None = None) -> list[Sample]:
    """Every sample listed in ``folder/prompts.jsonl``, decoded."""
    folder = Path(folder)
    listing = folder / "prompts.jsonl"
    if not listing.exists():
        raise FileNotFoundError(f"{listing} does not exist (see the folder format in omninft_fast.evaluation)")
    samples, seen = [], {}
    for number, line in enumerate(listing.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{listing}:{number}: not a JSON line ({error.msg})") from None
        if not isinstance(entry, dict) or "id" not in entry or "prompt" not in entry:
            raise ValueError(f"{listing}:{number}: each line needs 'id' and 'prompt'")
        sample_id = str(entry["id"])
        if Path(sample_id).name != sample_id or sample_id in ("", ".", ".."):
            raise ValueError(f"{listing}:{number}: id {sample_id!r} must be a file name inside the folder")
        if sample_id in seen:
            raise ValueError(f"{listing}:{number}: id {sample_id!r} repeats line {seen[sample_id]}")
        seen[sample_id] = number
        own_fps = entry.get("fps")
        if own_fps is not None and not (
            isinstance(own_fps, int | float) and not isinstance(own_fps, bool) and 0 < own_fps < math.inf
        ):
            raise ValueError(f"{listing}:{number}: fps must be a positive number, got {own_fps!r}")
        video, video_fps = read_video(folder, sample_id, fps if own_fps is None else own_fps)
        audio, rate = read_wav(folder / f"{sample_id}.wav")
        samples.append(
            Sample(
                sample_id,
                entry["prompt"],
                entry.get("video_prompt"),
                entry.get("audio_prompt"),
                video,
                float(video_fps),
                audio,
                rate,
            )
        )
    if not samples:
        raise ValueError(f"{listing} lists no samples")
    return samples


def _groups(samples: list[Sample], batch_size: int) -> list[list[int]]:
    """Indices of samples batched together: same shapes and rates, at most ``batch_size`` each."""
    by_shape: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        by_shape.setdefault((tuple(s.video.shape), s.fps, s.audio.shape[0], s.sample_rate), []).append(i)
    return [ids[k : k + batch_size] for ids in by_shape.values() for k in range(0, len(ids), batch_size)]


def _batch(samples: list[Sample]) -> RewardBatch:
    def optional(values: list[str | None], fallback: list[str]) -> list[str] | None:
        return None if all(v is None for v in values) else [v or f for v, f in zip(values, fallback, strict=True)]

    prompts = [s.prompt for s in samples]
    return RewardBatch(
        video=torch.stack([s.video for s in samples]),
        fps=samples[0].fps,
        audio=torch.stack([s.audio for s in samples]),
        sample_rate=samples[0].sample_rate,
        prompts=prompts,
        video_prompts=optional([s.video_prompt for s in samples], prompts),
        audio_prompts=optional([s.audio_prompt for s in samples], prompts),
    )


def evaluate(
    samples: list[Sample],
    checkpoints: dict[str, str],
    *,
    options: dict[str, dict[str, Any]] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 4,
) -> dict[str, Any]:
    """Score ``samples`` with every reward in ``checkpoints`` (name -> directory) and fill the metric table."""
    options = options or {}
    known = {metric.reward for metric in METRICS}
    unknown = sorted(set(checkpoints) - known)
    if unknown:
        raise ValueError(f"--checkpoint names unknown rewards {unknown}; known: {sorted(known)}")
    missing = sorted(set(checkpoints) - set(available_rewards()))
    if missing:
        raise ValueError(f"rewards {missing} have no adapter in this package yet")
    per_sample: dict[str, dict[str, float | None]] = {s.id: {} for s in samples}
    for name, directory in checkpoints.items():
        settings = {**DEFAULT_OPTIONS.get(name, {}), **options.get(name, {})}
        reward = build_reward(
            name, checkpoint_dir=directory, device=device, dtype=dtype, micro_batch=batch_size, **settings
        )
        for group in _groups(samples, batch_size):
            scores = reward(_batch([samples[i] for i in group]))
            for key, values in scores.items():
                for i, value in zip(group, values.tolist(), strict=True):
                    per_sample[samples[i].id][f"{name}.{key}"] = value if math.isfinite(value) else None
    table = {}
    for metric in METRICS:
        column = f"{metric.reward}.{metric.key}"
        if metric.reward not in checkpoints:
            status = NOT_CONFIGURED if metric.reward in available_rewards() else NOT_AVAILABLE
            table[metric.name] = {"value": None, "status": status, "source": column}
            continue
        values = [scores[column] for scores in per_sample.values() if column in scores]
        bad = sum(v is None for v in values)
        value = sum(values) / len(values) if values and not bad else None
        if value is not None and metric.negate:
            value = -value
        table[metric.name] = {
            "value": value,
            "status": f"{NOT_FINITE} on {bad} of {len(values)} samples" if bad else "ok",
            "source": column,
            "higher_is_better": metric.higher,
        }
    return {"samples": len(samples), "metrics": table, "per_sample": per_sample}


def to_markdown(result: dict[str, Any]) -> str:
    """The metric table of an ``evaluate`` result as markdown."""
    lines = [
        f"JavisBench-style evaluation over {result['samples']} samples",
        "",
        "| Metric | Value | Better | Source |",
        "| --- | --- | --- | --- |",
    ]
    for name, entry in result["metrics"].items():
        if entry["status"] in (NOT_CONFIGURED, NOT_AVAILABLE):
            lines.append(f"| {name} | {entry['status']} | | {entry['source']} |")
        else:
            value = entry["status"] if entry["value"] is None else f"{entry['value']:.4f}"
            better = "higher" if entry["higher_is_better"] else "lower"
            lines.append(f"| {name} | {value} | {better} | {entry['source']} |")
    return "\n".join(lines) + "\n"


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag} expects NAME=VALUE, got {item!r}")
        out[name] = value
    return out


# Arguments ``evaluate`` passes to every reward itself: ``--options`` cannot set them.
RESERVED_OPTIONS = ("checkpoint_dir", "device", "dtype", "micro_batch")
RESULT_FILES = ("results.md", "results.json")


def _options(name: str, text: str) -> dict[str, Any]:
    """The JSON object of ``--options NAME=JSON``; one line naming ``NAME`` for anything else."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--options {name}=...: not JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"--options {name}=... must be a JSON object, got {text!r}")
    reserved = sorted(set(value) & set(RESERVED_OPTIONS))
    if reserved:
        raise SystemExit(
            f"--options {name}=... cannot set {reserved} (--checkpoint, --device, --dtype and --batch-size do)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``omninft-fast eval``."""
    parser = argparse.ArgumentParser(
        prog="omninft-fast eval",
        description="JavisBench-style metrics over a folder of generated video+audio samples with prompts.",
    )
    parser.add_argument("folder", help="folder with prompts.jsonl, <id>.wav and <id>.mp4|.npy|.gif|/ per sample")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="REWARD=DIR",
        help="local checkpoint directory of a reward (clap, clip_score, audiobox, videoalign, hpsv3, imagebind, "
        "synchformer); repeat for several",
    )
    parser.add_argument(
        "--options", action="append", default=[], metavar="REWARD=JSON", help="plugin options as a JSON object"
    )
    parser.add_argument(
        "--out", default=None, help="where results.md and results.json go, never overwritten (default: FOLDER)"
    )
    parser.add_argument("--fps", type=float, default=None, help="fps of .npy and PNG-folder videos without one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=4)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the evaluation for parsed ``build_parser`` arguments; returns the process exit status."""
    checkpoints = _pairs(args.checkpoint, "--checkpoint")
    options = {name: _options(name, text) for name, text in _pairs(args.options, "--options").items()}
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.fps is not None and not 0 < args.fps < math.inf:
        raise SystemExit(f"--fps must be a positive number, got {args.fps}")
    out = Path(args.out or args.folder)
    refuse_existing(out, RESULT_FILES)
    samples = load_samples(args.folder, args.fps)
    result = evaluate(
        samples, checkpoints, options=options, device=args.device, dtype=args.dtype, batch_size=args.batch_size
    )
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(result)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(result, indent=2, allow_nan=False), encoding="utf-8")
    print(markdown, end="")
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``omninft-fast eval`` on ``argv`` (default: the command line); returns the process exit status."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
