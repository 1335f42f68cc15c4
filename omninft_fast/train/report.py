"""Evaluation on the fixed set and the run's report: before/after table, reward curves, mp4 + WAV samples."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omninft_fast.media import write_sample_folder
from omninft_fast.rewards import RewardModel
from omninft_fast.train.builders import PromptRecord
from omninft_fast.train.config import TrainConfig
from omninft_fast.train.metrics import progress_bar
from omninft_fast.train.model import AVTask, AVVelocityModel
from omninft_fast.train.rollouts import micro_batches, sample_and_score
from omninft_fast.train.stages import Rollout, concat_rollouts, concat_scores


@dataclass
class EvalResult:
    """Per-reward mean and standard error on the fixed evaluation set, each reward's modality, and each reward's
    mean per prompt (``prompt_mean[name][i]`` over the samples of ``prompts[i]``)."""

    mean: dict[str, float]
    stderr: dict[str, float]
    count: int
    modality: dict[str, str] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    prompt_mean: dict[str, list[float]] = field(default_factory=dict)


@torch.no_grad()
def evaluate(
    model: AVVelocityModel,
    task: AVTask,
    rewards: list[RewardModel],
    prompts: list[PromptRecord],
    config: TrainConfig,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> tuple[EvalResult, Rollout]:
    """Each reward term's mean and standard error over every prompt x ``eval.samples_per_prompt`` samples drawn from
    ``eval.seed``, sampled in chunks of one iteration's batch, conditioned and judged as in training (``prompt_av``
    conditions, ``prompt_v`` / ``prompt_a`` reach the rewards, ``rewards.N.outputs`` form the terms); also returns the
    samples."""
    records = [p for p in prompts for _ in range(config.eval.samples_per_prompt)]
    texts = [record.av for record in records]
    terms = [dict(r.outputs) for r in config.rewards]
    generator = torch.Generator().manual_seed(config.eval.seed)
    model.eval()
    samples, scores = [], []
    chunk = config.prompts_per_iter * config.group_size
    for lo in range(0, len(texts), chunk):
        # Sampled and scored as training's rollouts are: the chunk's noise first, then micro-batches of
        # sampling.batch_size (it changes the memory a forward takes, not the samples).
        part = records[lo : lo + chunk]
        steps = config.sampling.num_steps * len(micro_batches(len(part), config.sampling))
        with progress_bar(steps, f"sampling {len(part)}", enabled=config.progress) as bar:
            rollout, scored, _ = sample_and_score(
                model,
                task,
                rewards,
                part,
                generator,
                sampling=config.sampling,
                device=device,
                terms=terms,
                autocast_dtype=autocast_dtype,
                on_step=lambda _, bar=bar: bar.update(),
            )
        samples.append(rollout)
        scores.append(scored)
    merged = concat_scores(scores).values
    n = len(texts)
    mean = {key: float(v.mean()) for key, v in merged.items()}
    stderr = {key: float(v.std(correction=1)) / math.sqrt(n) for key, v in merged.items()}
    per_prompt = {key: v.reshape(len(prompts), -1).mean(dim=1).tolist() for key, v in merged.items()}
    result = EvalResult(mean, stderr, n, scores[0].modality, [p.av for p in prompts], per_prompt)
    return result, concat_rollouts(samples)


def format_table(before: EvalResult, after: EvalResult) -> str:
    """Markdown table of each reward before/after with standard errors and the rise in combined standard errors."""
    rows = [
        "| reward | modality | before (mean ± SE) | after (mean ± SE) | change | change / SE |",
        "|---|---|---|---|---|---|",
    ]
    for name in before.mean:
        delta = after.mean[name] - before.mean[name]
        se = math.sqrt(before.stderr[name] ** 2 + after.stderr[name] ** 2)
        z = delta / se if se > 0 else math.copysign(math.inf, delta) if delta else 0.0
        rows.append(
            f"| {name} | {after.modality[name]} | {before.mean[name]:.4f} ± {before.stderr[name]:.4f} | "
            f"{after.mean[name]:.4f} ± {after.stderr[name]:.4f} | {delta:+.4f} | {z:+.2f} |"
        )
    return "\n".join(rows)


def write_samples(
    folder: Path,
    decode: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    samples: Rollout,
    *,
    samples_per_prompt: int,
    count: int,
    fps: float,
    sample_rate: int,
) -> None:
    """``count`` evaluation prompts spread over the prompt list (first sample each) as ``<id>.mp4`` (video + audio)
    + ``<id>.wav`` in ``folder``, named by the prompt's index (never by its text), with the ``prompts.jsonl`` index
    that ``omninft-fast eval`` reads (``media.write_sample_folder``)."""
    prompts = len(samples.texts) // samples_per_prompt
    n = min(count, prompts)
    chosen = [i * prompts // n for i in range(n)]  # evenly spaced, distinct
    rows = [prompt * samples_per_prompt for prompt in chosen]
    frames, waveform = decode(samples.video[rows], samples.audio[rows])
    write_sample_folder(
        folder,
        [f"{prompt:04d}" for prompt in chosen],
        [samples.texts[k] for k in rows],
        frames,
        waveform,
        fps=fps,
        sample_rate=sample_rate,
    )


def write_reward_curves(path: Path, history: list[dict[str, float]]) -> None:
    """Each reward's per-iteration mean (``reward/<name>/mean`` of the metrics history) as a PNG line chart."""
    from omninft_fast.train.plotting import plot_curves  # matplotlib only where a figure is drawn

    if not history:
        return
    keys = [k for k in history[0] if k.startswith("reward/") and k.endswith("/mean")]
    curves = {k[len("reward/") : -len("/mean")]: [h[k] for h in history] for k in keys}
    plot_curves(path, [int(h["iteration"]) for h in history], curves)
