"""``omninft-fast rewards check <dir or config>``: can each configured reward model be loaded and run?

For a trainer config (YAML) every ``rewards`` entry with a ``checkpoint_dir`` is checked with its settings; for a
directory, every sub-folder named after a registered reward (``videoalign/``, ``hpsv3/``, ``audiobox/``, ...) is
checked with default settings. Each row lists every file of the reward's released layout that is absent (the
``release_files`` and ``base_files`` of its plugin), then the reward is built through the public loading path (so
a missing file, or a missing, unexpected or mis-shaped key, is reported as the loader names it) and scores a
synthetic clip (a moving colour ramp with a tone). Exits 1 if any reward is unusable, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omninft_fast.rewards.base import RewardBatch, available_rewards, build_reward, reward_class


@dataclass
class CheckResult:
    """The outcome for one reward: ``ok``, its scores on the synthetic clip, or the error that made it unusable."""

    name: str
    checkpoint_dir: str
    ok: bool
    scores: dict[str, float] = field(default_factory=dict)
    error: str = ""
    missing: list[str] = field(default_factory=list)


MAX_SECONDS = 60.0  # the synthetic clip's longest length (a minute of 128 x 192 frames at 24 fps: 425 MB of float32)


def synthetic_clip(
    seconds: float = 2.0, fps: float = 24.0, size: tuple[int, int] = (128, 192), sample_rate: int = 16_000
) -> RewardBatch:
    """One clip: a colour ramp sliding right over ``(T, 3, H, W)`` frames and a 440 Hz tone, prompt to match."""
    frames = max(2, round(seconds * fps))
    h, w = size
    t = torch.arange(frames, dtype=torch.float32)[:, None, None] / frames
    x = torch.linspace(0, 1, w)[None, None, :].expand(frames, h, w)
    y = torch.linspace(0, 1, h)[None, :, None].expand(frames, h, w)
    video = torch.stack([(x + t) % 1, y, 1 - (x + t) % 1], dim=1)[None]
    time = torch.arange(round(seconds * sample_rate), dtype=torch.float32) / sample_rate
    audio = (0.3 * torch.sin(2 * math.pi * 440 * time))[None]
    prompt = ["a colourful gradient slides to the right while a steady tone plays"]
    return RewardBatch(video=video, fps=fps, audio=audio, sample_rate=sample_rate, prompts=prompt)


def entries_from(target: Path) -> list[dict[str, Any]]:
    """Reward entries (``name``, ``checkpoint_dir`` and settings) of a trainer config file or a folder of folders."""
    if target.is_dir():
        entries = [
            {"name": folder.name, "checkpoint_dir": str(folder)}
            for folder in sorted(target.iterdir())
            if folder.is_dir() and folder.name in available_rewards()
        ]
        if not entries:
            raise ValueError(f"{target} has no sub-folder named after a reward; expected some of {available_rewards()}")
        return entries
    if not target.is_file():
        raise FileNotFoundError(f"{target} is neither a directory nor a config file")
    from omninft_fast.train.config import load_config

    config = load_config(target)
    entries = [
        {
            "name": r.name,
            "checkpoint_dir": r.checkpoint_dir,
            "device": r.device,
            "dtype": r.dtype,
            "micro_batch": r.micro_batch,
            **dict(r.options),
        }
        for r in config.rewards
        if r.checkpoint_dir
    ]
    if not entries:
        raise ValueError(f"{target}: no reward entry has a checkpoint_dir")
    return entries


def missing_files(name: str, checkpoint_dir: str | Path, base_model_dir: str | Path | None = None) -> list[str]:
    """The files of reward ``name``'s released layout absent from its directories (``a or b`` for alternatives)."""
    cls = reward_class(name)
    folder = Path(checkpoint_dir).expanduser()
    base = Path(base_model_dir).expanduser() if base_model_dir else folder
    absent = []
    for where, layout in ((folder, cls.release_files), (base, cls.base_files)):
        for options in layout:
            if not any(next(where.glob(pattern), None) for pattern in options):
                absent.append(" or ".join(str(where / pattern) for pattern in options))
    return absent


def check_reward(entry: dict[str, Any], clip: RewardBatch, device: str | None = None) -> CheckResult:
    """Build the reward of ``entry`` and score ``clip``; any failure is recorded, not raised (a diagnosis must
    cover every reward, whatever breaks: a missing file, a key mismatch, an absent device or library)."""
    settings = dict(entry)
    name, directory = settings.pop("name"), settings.get("checkpoint_dir", "")
    if device is not None:
        settings["device"] = device
    try:
        missing = missing_files(name, directory, settings.get("base_model_dir"))
    except ValueError as error:
        return CheckResult(name, str(directory), False, error=str(error))
    try:
        reward = build_reward(name, **settings)
        scores = {key: float(value[0]) for key, value in reward(clip).items()}
    except Exception as error:
        return CheckResult(name, str(directory), False, error=f"{type(error).__name__}: {error}", missing=missing)
    bad = [key for key, value in scores.items() if not math.isfinite(value)]
    if bad:
        return CheckResult(name, str(directory), False, scores, f"non-finite scores {bad}", missing)
    return CheckResult(name, str(directory), True, scores, missing=missing)


def format_results(results: list[CheckResult]) -> str:
    """A markdown table: reward, checkpoint, status, absent files of the released layout, and the scores on the
    synthetic clip or the error."""
    lines = [
        "| reward | checkpoint | status | missing files | synthetic clip scores / problem |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        detail = ", ".join(f"{k} {v:.4f}" for k, v in r.scores.items()) if r.ok else r.error.replace("|", "\\|")
        missing = "; ".join(r.missing) if r.missing else "-"
        lines.append(f"| {r.name} | {r.checkpoint_dir} | {'ok' if r.ok else 'UNUSABLE'} | {missing} | {detail} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The ``rewards check`` command: 0 if every reward is usable, 1 if one is not, 2 on a usage error."""
    from omninft_fast.train.config import ConfigError

    if not 0 < args.seconds <= MAX_SECONDS:
        print(f"rewards check: --seconds must be in (0, {MAX_SECONDS:g}], got {args.seconds}", file=sys.stderr)
        return 2
    try:
        entries = entries_from(Path(args.target).expanduser())
    except (ConfigError, ValueError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"rewards check: {error}", file=sys.stderr)
        return 2
    clip = synthetic_clip(seconds=args.seconds)
    results = [check_reward(entry, clip, args.device) for entry in entries]
    print(format_results(results))
    unusable = [r.name for r in results if not r.ok]
    print(f"{len(results) - len(unusable)} usable, {len(unusable)} unusable{f': {unusable}' if unusable else ''}")
    return 1 if unusable else 0


def add_commands(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """Add the ``check`` sub-command (with the options of ``common``, such as ``--debug``) to the ``rewards``
    command's parser."""
    commands = parser.add_subparsers(dest="rewards_command", required=True)
    check = commands.add_parser(
        "check", parents=[common], help="load every configured reward and score a synthetic clip"
    )
    check.add_argument("target", help="trainer config (YAML) or a folder with one sub-folder per reward")
    check.add_argument("--device", default=None, help="run every reward here (default: each entry's device)")
    check.add_argument(
        "--seconds", type=float, default=2.0, help=f"length of the synthetic clip (at most {MAX_SECONDS:g})"
    )
    check.set_defaults(func=run)
