"""Synthetic task, its decoder, the reward plugins and registry, and base-policy pre-training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omninft_fast.rewards import RewardBatch, RewardModel, available_rewards, build_reward, register_reward
from omninft_fast.task import SyntheticAVTask, TaskSpec, all_prompts, parse_prompt


def _batch(task: SyntheticAVTask, video: torch.Tensor, audio: torch.Tensor, prompts: list[str]) -> RewardBatch:
    frames, waveform = task.decode(video, audio)
    return RewardBatch(frames, task.spec.fps, waveform, task.spec.sample_rate, prompts)


def test_decoder_ranges_and_shapes(gen: torch.Generator) -> None:
    task = SyntheticAVTask()
    prompts = all_prompts()[:5]
    video, audio = task.sample_data(prompts, gen)
    frames, waveform = task.decode(
        3 * torch.randn(video.shape, generator=gen), 3 * torch.randn(audio.shape, generator=gen)
    )
    s = task.spec
    assert frames.shape == (5, s.frames, 3, s.height * s.patch, s.width * s.patch)
    assert waveform.shape == (5, s.audio_samples)
    assert frames.min() >= 0 and frames.max() <= 1 and waveform.abs().max() <= 1


def test_rewards_prefer_what_the_prompt_asks_for(gen: torch.Generator) -> None:
    """Data drawn with every attribute right score higher than data with every attribute wrong, per reward."""
    prompts = all_prompts() * 2
    right, wrong = SyntheticAVTask(TaskSpec(label_accuracy=1.0)), SyntheticAVTask(TaskSpec(label_accuracy=0.0))
    good = _batch(right, *right.sample_data(prompts, gen), prompts)
    bad = _batch(wrong, *wrong.sample_data(prompts, gen), prompts)
    for name in ("synthetic_colour", "synthetic_pitch", "synthetic_sync"):
        reward = build_reward(name, micro_batch=7)
        (key,) = reward(good)
        high, low = reward(good)[key], reward(bad)[key]
        assert high.dtype == torch.float32 and high.shape == (len(prompts),)
        assert high.min() > low.max(), name


def test_reward_modalities_and_registry() -> None:
    assert {"synthetic_colour", "synthetic_pitch", "synthetic_sync"} <= set(available_rewards())
    assert [build_reward(n).modality for n in ("synthetic_colour", "synthetic_pitch", "synthetic_sync")] == [
        "video",
        "audio",
        "av",
    ]
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        build_reward("nope")
    with pytest.raises(ValueError, match="micro_batch must be a positive int"):
        build_reward("synthetic_colour", micro_batch=0)
    with pytest.raises(ValueError, match="unknown options"):
        build_reward("synthetic_colour", colour_space="hsv")


def test_plugin_output_is_checked(gen: torch.Generator) -> None:
    @register_reward("test_bad_shape")
    class BadShape(RewardModel):
        modality = "video"

        def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
            return {"bad": torch.zeros(len(batch) + 1)}

    task = SyntheticAVTask()
    prompts = all_prompts()[:2]
    with pytest.raises(ValueError, match=r"score 'bad' must have shape \(2,\)"):
        build_reward("test_bad_shape")(_batch(task, *task.sample_data(prompts, gen), prompts))


def test_reward_batch_validation() -> None:
    with pytest.raises(ValueError, match="video must be a"):
        RewardBatch(torch.zeros(2, 3, 4), 8.0, torch.zeros(2, 10), 8000, ["a", "b"])
    with pytest.raises(ValueError, match="prompts has 1 entries for 2 samples"):
        RewardBatch(torch.zeros(2, 1, 3, 4, 4), 8.0, torch.zeros(2, 10), 8000, ["a"])


def test_prompt_parsing() -> None:
    assert parse_prompt("a blue square flashing fast with a high tone").pitch == "high"
    with pytest.raises(ValueError, match="does not read"):
        parse_prompt("a dog barking")
    with pytest.raises(ValueError, match="'purple' is not one of"):
        parse_prompt("a purple square flashing fast with a high tone")


def test_pretrain_writes_loadable_weights(tmp_path: Path) -> None:
    pytest.importorskip("ltx_core")
    from omninft_fast.task.pretrain import pretrain
    from omninft_fast.train.builders import build_policy, build_task
    from omninft_fast.train.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")
    out = tmp_path / "base.safetensors"
    losses = pretrain(config, steps=3, batch_size=4, lr=1e-3, output=out, progress=False)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    config.model.checkpoint = str(out)
    model = build_policy(config, build_task(config))
    trained = build_policy(config, build_task(config), load=False)
    assert not torch.equal(next(model.parameters()), next(trained.parameters()))


def test_synthetic_sync_of_a_non_finite_sample_is_nan(gen: torch.Generator) -> None:
    prompts = all_prompts()[:3]
    task = SyntheticAVTask(TaskSpec(label_accuracy=1.0))
    batch = _batch(task, *task.sample_data(prompts, gen), prompts)
    reward = build_reward("synthetic_sync")
    clean = reward(batch)["sync"]
    batch.audio[1, 7] = float("nan")
    out = reward(batch)["sync"]
    assert bool(out[1].isnan()) and torch.equal(out[[0, 2]], clean[[0, 2]])
