"""The released recipe's options: paired prompts, reward terms, training times and gradient accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("ltx_core")

import omninft_fast
from omninft_fast.rewards import RewardModel
from omninft_fast.task.synthetic import all_prompts
from omninft_fast.train import stages
from omninft_fast.train.builders import PromptRecord, read_prompt_file
from omninft_fast.train.config import ConfigError, load_config
from omninft_fast.train.sampler import Guidance, euler_sample, guided_velocity, time_grid
from omninft_fast.train.trainer import Trainer

MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")


def micro(tmp_path: Path, *overrides: str) -> Trainer:
    out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    return Trainer(load_config(MICRO, [f"output_dir={out}", *overrides]))


def test_prompt_file_reads_json_lines_and_plain_text(tmp_path: Path) -> None:
    rows = [
        {"prompt_av": "joint", "prompt_v": "seen", "prompt_a": "heard", "sample_id": 7},
        {"prompt_av": "only", "id": "x"},
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_prompt_file(jsonl) == [
        PromptRecord("joint", "seen", "heard", "7"),
        PromptRecord("only", "only", "only", "x"),
    ]
    plain = tmp_path / "p.txt"
    plain.write_text("a\n\n b \n")
    assert read_prompt_file(plain) == [PromptRecord("a", "a", "a"), PromptRecord("b", "b", "b")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_av": "ok"}\n{"prompt_v": "no joint"}\n')
    with pytest.raises(ValueError, match="line 2: needs a non-empty string prompt_av"):
        read_prompt_file(bad)


def test_rewards_read_the_per_modality_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = all_prompts()
    rows = [
        {"prompt_av": p, "prompt_v": prompts[-1 - i], "prompt_a": prompts[i + 1]} for i, p in enumerate(prompts[:4])
    ]
    path = tmp_path / "paired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = micro(tmp_path, f"prompt_file={path}")
    seen = []
    original = RewardModel.__call__

    def spy(self: RewardModel, batch: object) -> dict[str, torch.Tensor]:
        seen.append(batch)
        return original(self, batch)

    monkeypatch.setattr(RewardModel, "__call__", spy)
    trainer.iteration(0)
    trainer.evaluate()
    by_av = {r["prompt_av"]: r for r in rows}
    for batch in (seen[0], seen[-1]):  # a training iteration and the fixed evaluation set
        for av, v, a in zip(batch.prompts, batch.prompts_for("video"), batch.prompts_for("audio"), strict=True):
            assert (v, a) == (by_av[av]["prompt_v"], by_av[av]["prompt_a"])


def test_reward_term_combines_signed_outputs_into_one_advantage() -> None:
    outputs = {"CE": torch.tensor([1.0, 2.0]), "PC": torch.tensor([4.0, 0.0]), "PQ": torch.tensor([3.0, 3.0])}
    term = stages.reward_term(outputs, {"CE": 0.025, "PQ": 0.025, "PC": -0.025}, "audiobox")
    torch.testing.assert_close(term, torch.tensor([0.0, 0.125]))
    with pytest.raises(ValueError, match="'audiobox' has no output named 'CU'"):
        stages.reward_term(outputs, {"CU": 1.0}, "audiobox")


def test_reward_terms_in_the_trainer(tmp_path: Path) -> None:
    trainer = micro(tmp_path, "rewards.0.outputs={colour: 2.0}", "rewards.0.weight=1.5")
    samples = stages.rollout(
        trainer.policies.old,
        trainer.task,
        trainer.prompts[:4],
        torch.Generator().manual_seed(0),
        sampling=trainer.config.sampling,
        device=trainer.device,
    )
    terms = [dict(r.outputs) for r in trainer.config.rewards]
    scores = stages.score(trainer.task, trainer.rewards, samples, terms)
    assert set(scores.values) == {"synthetic_colour", "pitch", "sync"}
    assert set(scores.outputs) == {"colour", "pitch", "sync"}
    torch.testing.assert_close(scores.values["synthetic_colour"], 2.0 * scores.outputs["colour"])
    assert scores.weight["synthetic_colour"] == 1.5


def test_gdpo_routing_uses_the_configured_eps() -> None:
    adv = torch.tensor([[1.0, -1.0], [0.5, -0.5]])
    zero = torch.zeros_like(adv)
    loose, _ = omninft_fast.route_advantages(adv, zero, zero, mode="gdpo", eps=10.0)
    tight, _ = omninft_fast.route_advantages(adv, zero, zero, mode="gdpo", eps=0.0)
    scores = stages.Scores({"a": adv.flatten()}, {"a": "video"}, {"a": 1.0})
    config = load_config(MICRO, ["ladder=vanilla", "advantage.eps=10", "advantage.std=group"]).advantage
    got = stages.advantages(scores, 2, config, torch.device("cpu"))
    group = omninft_fast.group_advantages(adv, std="group", eps=10.0)
    expected, _ = omninft_fast.route_advantages(group, zero, zero, mode="gdpo", eps=10.0)
    torch.testing.assert_close(got.r_video, omninft_fast.optimality_probability(expected).flatten())
    assert not torch.allclose(loose, tight)


def test_grid_first_takes_every_highest_noise_time_once_per_sample() -> None:
    config = load_config(MICRO, ["sampling.num_steps=20", "nft.timesteps=grid_first", "nft.timestep_fraction=0.4"])
    index, times = stages.training_times(3, torch.Generator().manual_seed(0), config.nft, config.sampling)
    grid = time_grid(20)[:8]
    assert len(index) == 24
    for b in range(3):
        torch.testing.assert_close(times[index == b].sort().values, grid.sort().values)
    with pytest.raises(ConfigError, match="nft.timestep_fraction"):
        load_config(MICRO, ["nft.timesteps=grid_first", "nft.timestep_fraction=0.01"])


def _grads(trainer: Trainer) -> list[torch.Tensor]:
    return [p.grad.clone() for p in trainer.policies.trainable if p.grad is not None]


def test_accumulated_micro_batches_give_the_gradient_of_the_mean_loss(tmp_path: Path) -> None:
    trainer = micro(tmp_path, "nft.x0_norm=true", "nft.adaptive_weight=false", "reweight.enabled=false")
    spec, gen = trainer.task.spec, torch.Generator().manual_seed(3)
    texts = trainer.prompts[:4]
    batch = stages.UpdateBatch(
        stages.condition(trainer.task, texts, trainer.device),
        torch.randn((4, spec.video_tokens, spec.video_channels), generator=gen),
        torch.randn((4, spec.audio_tokens, spec.audio_channels), generator=gen),
        torch.tensor([0.1, 0.9, 0.5, 0.7]),
        torch.tensor([0.8, 0.2, 0.4, 1.0]),
        None,
    )
    index, t = torch.arange(4), torch.tensor([0.9, 0.6, 0.95, 0.3])
    noise = stages.draw_noise(spec, 4, gen, trainer.device)
    kwargs = {"nft": trainer.config.nft, "autocast": trainer._autocast}
    trainer.optimizer.zero_grad(set_to_none=True)
    stages.nft_backward(trainer.policies, batch, index, t, noise, **kwargs)
    whole = _grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    for half in (slice(0, 2), slice(2, 4)):
        part = tuple(n[half] for n in noise)
        stages.nft_backward(trainer.policies, batch, index[half], t[half], part, scale=0.5, **kwargs)
    for a, b in zip(whole, _grads(trainer), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("accumulate", "steps"), [("mini_batch", 2), ("iteration", 1)])
def test_one_optimizer_step_per_iteration_or_per_mini_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accumulate: str, steps: int
) -> None:
    trainer = micro(tmp_path, f"nft.accumulate={accumulate}")
    calls = []
    original = stages.optimizer_step
    monkeypatch.setattr(stages, "optimizer_step", lambda *a: calls.append(1) or original(*a))
    trainer.iteration(0)
    assert len(calls) == steps  # micro: 8 samples x 1 time in mini-batches of 4


def _guided_trainer(tmp_path: Path, *overrides: str) -> Trainer:
    return micro(
        tmp_path,
        "sampling.video_cfg=1.5",
        "sampling.audio_cfg=3.0",
        "sampling.stg_scale=1.0",
        "sampling.stg_blocks=[1]",
        *overrides,
    )


def test_guidance_is_ltx2s_multimodal_guider_in_one_batched_forward(tmp_path: Path) -> None:
    from ltx_core.components.guiders import MultiModalGuider, MultiModalGuiderParams

    trainer = _guided_trainer(tmp_path)
    model, task, spec = trainer.policies.old, trainer.task, trainer.task.spec
    gen = torch.Generator().manual_seed(1)
    xv = torch.randn((2, spec.video_tokens, spec.video_channels), generator=gen)
    xa = torch.randn((2, spec.audio_tokens, spec.audio_channels), generator=gen)
    t = torch.tensor([0.7, 0.7])
    cond = stages.condition(task, trainer.prompts[:2], trainer.device)
    uncond = stages.Condition(*task.unconditional(2))
    guidance = Guidance(uncond, 1.5, 3.0, 1.0, (1,))
    calls = []
    handle = model.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    with torch.no_grad():
        v_video, v_audio = guided_velocity(model, xv, xa, t, cond, guidance)
        handle.remove()
        c = model(xv, xa, t, cond)
        u = model(xv, xa, t, uncond)
        p = model(xv, xa, t, cond, [[1], [1]])
    assert calls == [6]  # three passes of two samples, one forward
    assert not torch.allclose(p[0], c[0])
    for got, k, cfg in ((v_video, 0, 1.5), (v_audio, 1, 3.0)):
        guider = MultiModalGuider(MultiModalGuiderParams(cfg_scale=cfg, stg_scale=1.0, stg_blocks=[1]))
        torch.testing.assert_close(got, guider.calculate(c[k], u[k], p[k], 0.0), rtol=1e-4, atol=1e-5)


class _Capture:
    def __init__(self) -> None:
        self.steps: list[int] = []

    @property
    def step(self) -> int:
        return self.steps[-1]

    @step.setter
    def step(self, value: int) -> None:
        self.steps.append(value)


def test_capture_takes_the_named_steps_and_passes(tmp_path: Path) -> None:
    trainer = _guided_trainer(tmp_path, "sampling.num_steps=5", "reweight.last_steps=2", "reweight.last_step=3")
    spec, cond = trainer.task.spec, stages.condition(trainer.task, trainer.prompts[:2], trainer.device)
    noise = stages.draw_noise(spec, 2, torch.Generator().manual_seed(0), trainer.device)
    capture = _Capture()
    euler_sample(trainer.policies.old, cond, *noise, num_steps=5, capture=capture, capture_until=4)
    assert capture.steps == [0, 1, 2, 3]
    texts = trainer.prompts[:2]
    scores = {}
    for passes in ("cond", "all"):
        samples = stages.rollout(
            trainer.policies.old,
            trainer.task,
            texts,
            torch.Generator().manual_seed(0),
            sampling=trainer.config.sampling,
            device=trainer.device,
            handle=trainer.policies.old_handle,
            last_steps=2,
            last_step=3,
            passes=passes,
        )
        scores[passes] = samples.region_scores
    assert scores["cond"].shape == (2, spec.video_tokens)
    assert not torch.allclose(scores["cond"], scores["all"])


def test_evaluation_uses_eval_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from omninft_fast.train import trainer as trainer_module

    trainer = micro(tmp_path, "sampling.eval_steps=5")
    seen = []
    monkeypatch.setattr(trainer_module, "evaluate", lambda *a: seen.append(a[4].sampling.num_steps))
    trainer.evaluate()
    assert seen == [5] and trainer.config.sampling.num_steps == 3


def _a2v_grads(trainer: Trainer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of the A2V key/value projections and of the audio patchify layer for a fixed loss."""
    gen = torch.Generator().manual_seed(0)
    spec = trainer.task.spec
    cond = stages.condition(trainer.task, trainer.prompts[:2], trainer.device)
    xv = torch.randn((2, spec.video_tokens, spec.video_channels), generator=gen)
    xa = torch.randn((2, spec.audio_tokens, spec.audio_channels), generator=gen)
    trainer.policy.zero_grad()
    vv, _ = trainer.policy(xv, xa, torch.tensor([0.4, 0.8]), cond)
    vv.square().mean().backward()  # the video loss reaches the audio stream only through A2V
    blocks = trainer.policy.model.transformer_blocks
    kv = [b.audio_to_video_attn.to_k.weight.grad.clone() for b in blocks]
    audio = [p.grad.clone() for n, p in trainer.policy.model.named_parameters() if n.startswith("audio_patchify")]
    return kv, audio


def test_input_surgery_keeps_the_a2v_projection_gradients(tmp_path: Path) -> None:
    plain = _a2v_grads(micro(tmp_path, "surgery.enabled=false"))
    spec = "surgery.spec='0:0.75'"  # block 0: a quarter of the gradient passes
    projected = _a2v_grads(micro(tmp_path, spec))
    entering = _a2v_grads(micro(tmp_path, spec, "surgery.where=input"))
    torch.testing.assert_close(entering[0][0], plain[0][0])  # the A2V k projection keeps its gradient
    torch.testing.assert_close(projected[0][0], 0.25 * plain[0][0])  # Eq 8 on projected K/V scales it too
    for got, full in zip(entering[1], plain[1], strict=True):  # less gradient reaches the audio stream
        assert not torch.allclose(got, full)


def test_frame_zscore_weights_and_warmup(tmp_path: Path) -> None:
    scores = torch.tensor([[1.0, 3.0, 5.0, 2.0, 2.0, 2.0]])
    w = omninft_fast.frame_region_weights(scores, frames=2, w_max=1.5)
    z = torch.tensor([-1.0, 0.0, 1.0])  # (1, 3, 5): mean 3, unbiased std 2
    torch.testing.assert_close(w[0, :3], 1 + 0.5 * torch.sigmoid(0.5 * z))
    torch.testing.assert_close(w[0, 3:], torch.full((3,), 1.25))  # a flat frame: z = 0
    half = omninft_fast.frame_region_weights(scores, frames=2, w_max=1.5, ramp=0.5)
    # The release warms up the largest weight: w_max 1.25 halfway, the sigmoid's slope halved with it.
    torch.testing.assert_close(half[0, :3], 1 + 0.25 * torch.sigmoid(0.25 * z))
    torch.testing.assert_close(half[0, 3:], torch.full((3,), 1.125))
    torch.testing.assert_close(omninft_fast.frame_region_weights(scores, frames=2, ramp=0.0), torch.ones(1, 6))
    config = load_config(MICRO, ["reweight.form=frame_zscore", "reweight.warmup=4"]).reweight
    got = stages.token_weights(scores, config, torch.device("cpu"), frames=2, iteration=2)
    torch.testing.assert_close(got, half)
    trainer = micro(tmp_path, "reweight.form=frame_zscore", "reweight.warmup=2")
    trainer.iteration(1)


def test_the_text_cache_prompts_include_the_empty_prompt_under_guidance() -> None:
    from omninft_fast.train.builders import load_prompts

    plain = load_prompts(load_config(MICRO))
    guided = load_prompts(load_config(MICRO, ["sampling.audio_cfg=3.0"]))
    assert "" not in plain and guided == [*plain, ""]
