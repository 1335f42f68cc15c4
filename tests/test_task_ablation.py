"""The ablation task's mechanisms: conflicting prompts (routing) and the moving beacon read by the sync reward
(reweighting), in the data, the reward and the shipped base policy."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from omninft_fast.rewards import RewardBatch, build_reward
from omninft_fast.task import SyntheticAVTask, TaskSpec, all_prompts
from omninft_fast.task.synthetic import beacon_path, conflict_prompts

ABLATION = str(Path(__file__).resolve().parents[1] / "configs" / "cpu_ablation.yaml")


def _batch(task: SyntheticAVTask, video: torch.Tensor, audio: torch.Tensor, prompts: list[str]) -> RewardBatch:
    frames, waveform = task.decode(video, audio)
    return RewardBatch(frames, task.spec.fps, waveform, task.spec.sample_rate, prompts)


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``(P, G)`` ``a`` and ``b``."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.square().sum(dim=1) * b.square().sum(dim=1)).sqrt()


def test_conflict_prompts_are_spread_evenly() -> None:
    prompts = all_prompts()
    assert conflict_prompts(0.0) == []
    assert conflict_prompts(1.0) == prompts
    assert conflict_prompts(0.5) == prompts[1::2]
    assert len(conflict_prompts(1 / 3)) == 6
    with pytest.raises(ValueError, match="conflict_fraction"):
        conflict_prompts(1.5)


def test_conflicting_data_get_exactly_one_of_colour_and_pitch_right(gen: torch.Generator) -> None:
    task = SyntheticAVTask(TaskSpec(conflict_fraction=0.5))
    prompts = [p for p in all_prompts() for _ in range(16)]
    batch = _batch(task, *task.sample_data(prompts, gen), prompts)
    colour = build_reward("synthetic_colour")(batch)["colour"] > 0.3
    pitch = build_reward("synthetic_pitch")(batch)["pitch"] > 0.5
    conflict = torch.tensor([p in task.conflicts for p in prompts])
    assert torch.all(colour[conflict] ^ pitch[conflict])
    assert 0.3 < colour[conflict].float().mean() < 0.7
    others = ~conflict
    assert torch.any(colour[others] & pitch[others]) and torch.any(~colour[others] & ~pitch[others])


def test_beacon_path_walks_the_border_one_step_per_frame() -> None:
    path = beacon_path(10, 3, 5)
    ring = set(path[:12])
    assert len(set(beacon_path(12, 3, 5))) == 12 and (1, 2) not in ring
    assert all(i in (0, 2) or j in (0, 4) for i, j in ring)
    steps = itertools.pairwise(path)
    assert all(abs(i - k) + abs(j - m) == 1 for (i, j), (k, m) in steps)


def test_beacon_sync_reads_only_the_beacon_tokens(gen: torch.Generator) -> None:
    spec = TaskSpec(beacon=True, label_accuracy=1.0)
    task = SyntheticAVTask(spec)
    prompts = all_prompts()[:4]
    frames, waveform = task.decode(*task.sample_data(prompts, gen))
    reward = build_reward("synthetic_sync", region="beacon", grid=(spec.height, spec.width))
    base = reward(RewardBatch(frames, spec.fps, waveform, spec.sample_rate, prompts))["sync"]
    assert base.min() > 0.8  # beeps on the beacon's flashes
    p = spec.patch
    mask = torch.ones_like(frames, dtype=torch.bool)
    for f, (i, j) in enumerate(beacon_path(spec.frames, spec.height, spec.width)):
        mask[:, f, :, i * p : (i + 1) * p, j * p : (j + 1) * p] = False
    noise = torch.rand(frames.shape, generator=gen)
    elsewhere = torch.where(mask, noise, frames)
    same = reward(RewardBatch(elsewhere, spec.fps, waveform, spec.sample_rate, prompts))["sync"]
    torch.testing.assert_close(same, base, rtol=0, atol=1e-6)
    on_beacon = torch.where(mask, frames, noise)
    moved = reward(RewardBatch(on_beacon, spec.fps, waveform, spec.sample_rate, prompts))["sync"]
    assert (moved - base).abs().min() > 0.05


def test_beacon_sync_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="region"):
        build_reward("synthetic_sync", region="corner")
    with pytest.raises(ValueError, match="grid"):
        build_reward("synthetic_sync", region="beacon", grid=(1, 3))


def test_sync_noise_picks_the_stream_whose_beats_shift() -> None:
    prompts = all_prompts()
    synced = SyntheticAVTask(TaskSpec(beacon=True, label_accuracy=1.0))
    data = {"synced": synced.sample_data(prompts, torch.Generator().manual_seed(0))}
    for stream in ("audio", "video"):
        task = SyntheticAVTask(TaskSpec(beacon=True, label_accuracy=0.0, sync_noise=stream))
        data[stream] = task.sample_data(prompts, torch.Generator().manual_seed(0))
    reward = build_reward("synthetic_sync", region="beacon", grid=(3, 3))
    sync = {k: reward(_batch(synced, *v, prompts))["sync"] for k, v in data.items()}
    assert sync["synced"].min() > 0.8 and sync["audio"].max() < 0.5 and sync["video"].max() < 0.5
    beeps = {k: v[1].amax(dim=-1) for k, v in data.items()}  # (B, 2F): the loudest channel per audio token
    torch.testing.assert_close(beeps["video"], beeps["synced"], rtol=0, atol=0.3)
    assert (beeps["audio"] - beeps["synced"]).abs().max() > 1.0
    flashes = {k: v[0][..., :3].amax(dim=(1, 2)) for k, v in data.items()}  # (B,) brightest colour drive
    beacon = {k: v[0].view(len(prompts), 8, 9, -1)[:, :, 0, 0] for k, v in data.items()}  # frame-0 top-left token
    assert torch.equal(beacon["audio"], beacon["synced"]) and not torch.equal(beacon["video"], beacon["synced"])
    assert all(flashes[k].min() > 1.0 for k in flashes)
    with pytest.raises(ValueError, match="sync_noise"):
        SyntheticAVTask(TaskSpec(sync_noise="both"))
