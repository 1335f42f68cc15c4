"""Guided rollouts whose STG pass shares the conditional pass's blocks before the first STG block."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("ltx_core")

from omninft_fast.ltx2.patch import RegionCapture
from omninft_fast.train import stages
from omninft_fast.train.config import load_config
from omninft_fast.train.model import Condition
from omninft_fast.train.sampler import Guidance, guide, guided_velocity
from omninft_fast.train.trainer import Trainer

MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")
LAYERS = 4
# Shared or not, a sample's values differ only by the GEMM batch they ran in (2B rows instead of 3B, B rows at
# batch 1 being one GEMM row fewer): float32 reassociation, a few ulps of the outputs.
ATOL = 1e-6


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """The micro run with 4 blocks, cfg and STG on block 2, Eq 10 over blocks 1-3 (block 1 is shared)."""
    out = tmp_path_factory.mktemp("stg") / "run"
    overrides = [f"model.num_layers={LAYERS}", "sampling.video_cfg=1.5", "sampling.audio_cfg=3.0"]
    overrides += ["sampling.stg_scale=1.0", "sampling.stg_blocks=[2]", "sampling.num_steps=2", "reweight.last_steps=2"]
    return Trainer(load_config(MICRO, [f"output_dir={out}", *overrides]))


def _inputs(trainer: Trainer, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Condition, Condition]:
    spec, gen = trainer.task.spec, torch.Generator().manual_seed(batch)
    xv = torch.randn((batch, spec.video_tokens, spec.video_channels), generator=gen)
    xa = torch.randn((batch, spec.audio_tokens, spec.audio_channels), generator=gen)
    texts = [trainer.prompts[i % len(trainer.prompts)] for i in range(batch)]
    cond = stages.condition(trainer.task, texts, trainer.device)
    uncond = Condition(*trainer.task.unconditional(batch))
    return xv, xa, torch.full((batch,), 0.7), cond, uncond


@contextmanager
def _block_rows(trainer: Trainer) -> Iterator[list[int]]:
    """Rows of the video stream entering each transformer block, in call order."""
    rows: list[int] = []
    blocks = trainer.policies.old.model.transformer_blocks
    hooks = [
        b.register_forward_pre_hook(lambda _m, _a, kw: rows.append(kw["video"].x.shape[0]), with_kwargs=True)
        for b in blocks
    ]
    try:
        yield rows
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("stg_block", [2, 0, LAYERS - 1])
def test_shared_prefix_gives_the_guided_velocities_of_separate_passes(
    trainer: Trainer, batch: int, stg_block: int
) -> None:
    xv, xa, t, cond, uncond = _inputs(trainer, batch)
    guidance = Guidance(uncond, 1.5, 3.0, 1.0, (stg_block,))
    with torch.no_grad(), _block_rows(trainer) as rows:
        shared = guided_velocity(trainer.policies.old, xv, xa, t, cond, guidance)
        separate = guided_velocity(
            trainer.policies.old, xv, xa, t, cond, dataclasses.replace(guidance, stg_shared_prefix=False)
        )
    # Shared: the STG rows join at their block, which they run apart as they skip its self-attention.
    after = [3 * batch] * (LAYERS - stg_block - 1)
    assert rows == [2 * batch] * stg_block + [2 * batch, batch] + after + [3 * batch] * LAYERS
    for got, want in zip(shared, separate, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_stg_without_cfg_shares_with_the_conditional_pass_alone(trainer: Trainer) -> None:
    xv, xa, t, cond, _ = _inputs(trainer, 2)
    guidance = Guidance(None, stg_scale=1.0, stg_blocks=(2,))
    with torch.no_grad(), _block_rows(trainer) as rows:
        shared = guided_velocity(trainer.policies.old, xv, xa, t, cond, guidance)
        separate = guided_velocity(
            trainer.policies.old, xv, xa, t, cond, dataclasses.replace(guidance, stg_shared_prefix=False)
        )
    assert rows == [2, 2, 2, 2, 4] + [4] * LAYERS
    for got, want in zip(shared, separate, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_switch_off_is_the_separate_passes_forward(trainer: Trainer) -> None:
    model = trainer.policies.old
    xv, xa, t, cond, uncond = _inputs(trainer, 2)
    guidance = Guidance(uncond, 1.5, 3.0, 1.0, (2,), stg_shared_prefix=False)
    calls: list[dict] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(kw), with_kwargs=True)
    with torch.no_grad():
        got = guided_velocity(model, xv, xa, t, cond, guidance)
        hook.remove()
        skip = [[]] * 4 + [[2]] * 2
        v = model(xv.repeat(3, 1, 1), xa.repeat(3, 1, 1), t.repeat(3), Condition.cat([cond, uncond, cond]), skip)
    assert calls == [{}]  # no copied_rows: ltx-core's forward of all rows
    for g, out, cfg in zip(got, v, (1.5, 3.0), strict=True):
        c, u, p = out.chunk(3)
        assert torch.equal(g, guide(c, u, p, cfg, 1.0))


def test_stg_rows_compute_no_self_attention_in_their_block(trainer: Trainer) -> None:
    """ltx-core attends for every sample of a batch where only some skip the self-attention; the shared forward
    runs the skipping STG rows apart, through ltx-core's path that computes only the value projection."""
    xv, xa, t, cond, uncond = _inputs(trainer, 2)
    calls: list[tuple[str, int, bool]] = []
    block = trainer.policies.old.model.transformer_blocks[2]
    hooks = [
        attention.register_forward_pre_hook(
            lambda _m, args, kw, name=name: calls.append((name, args[0].shape[0], kw["all_perturbed"])),
            with_kwargs=True,
        )
        for name, attention in (("video", block.attn1), ("audio", block.audio_attn1))
    ]
    try:
        with torch.no_grad():
            guided_velocity(trainer.policies.old, xv, xa, t, cond, Guidance(uncond, 1.5, 3.0, 1.0, (2,)))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [("video", 4, False), ("audio", 4, False), ("video", 2, True), ("audio", 2, True)]


def test_copied_rows_must_fit_the_batch(trainer: Trainer) -> None:
    xv, xa, t, cond, _ = _inputs(trainer, 3)
    with pytest.raises(ValueError, match="copied_rows"):
        trainer.policies.old(xv, xa, t, cond, [[], [], [2]], copied_rows=2)


def _rollout(trainer: Trainer, shared: bool, passes: str) -> stages.Rollout:
    return stages.rollout(
        trainer.policies.old,
        trainer.task,
        trainer.prompts[:2],
        torch.Generator().manual_seed(0),
        sampling=dataclasses.replace(trainer.config.sampling, stg_shared_prefix=shared),
        device=trainer.device,
        handle=trainer.policies.old_handle,
        last_steps=2,
        passes=passes,
    )


@pytest.mark.parametrize("passes", ["cond", "all"])
def test_rollout_samples_and_region_scores_are_those_of_separate_passes(trainer: Trainer, passes: str) -> None:
    assert trainer.policies.old_handle.region_layers == (1, 2, 3)  # block 1 shared, blocks 2-3 not
    with _block_rows(trainer) as rows:
        shared = _rollout(trainer, True, passes)
    assert rows == [4, 4, 4, 2, 6] * trainer.config.sampling.num_steps
    separate = _rollout(trainer, False, passes)
    for name in ("video", "audio", "region_scores"):
        torch.testing.assert_close(getattr(shared, name), getattr(separate, name), rtol=0, atol=ATOL)
    assert shared.region_scores.shape == (2, trainer.task.spec.video_tokens)


def test_shared_blocks_capture_the_conditional_key_mass_for_the_stg_rows(
    trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = trainer.policies.old_handle
    xv, xa, t, cond, uncond = _inputs(trainer, 2)
    received: dict[bool, dict[int, torch.Tensor]] = {True: {}, False: {}}
    original = RegionCapture.receive

    def receive(capture: RegionCapture, layer: int, key_mass: torch.Tensor) -> bool:
        received[shared][layer] = key_mass.clone()
        return original(capture, layer, key_mass)

    monkeypatch.setattr(RegionCapture, "receive", receive)
    for shared in (True, False):
        guidance = Guidance(uncond, 1.5, 3.0, 1.0, (2,), stg_shared_prefix=shared)
        with torch.no_grad(), handle.capture_region_scores(num_steps=1, last_steps=1) as capture:
            capture.step = 0
            guided_velocity(trainer.policies.old, xv, xa, t, cond, guidance)
    assert sorted(received[True]) == sorted(received[False]) == [1, 2, 3]
    assert torch.equal(received[True][1][4:], received[True][1][:2])  # block 1: the STG rows are copies
    for layer in (1, 2, 3):
        assert received[True][layer].shape == (6, trainer.task.spec.video_tokens)
        torch.testing.assert_close(received[True][layer], received[False][layer], rtol=0, atol=ATOL)


def test_compiled_rollout_model_shares_the_prefix(trainer: Trainer, tmp_path: Path) -> None:
    """``model.compile=rollout`` (backend ``eager``: Dynamo's graph as captured) runs the shared prefix inside the
    compiled model, gives the separate passes' velocities, and reuses its graph on the next call."""
    torch._dynamo.reset()
    overrides = [f"output_dir={tmp_path}", "model.compile=rollout", "model.compile_backend=eager"]
    model = Trainer(load_config(MICRO, [*overrides, "model.num_layers=2"])).policies.old
    assert model.model._compiled_call_impl is not None
    xv, xa, t, cond, uncond = _inputs(trainer, 2)
    guidance = Guidance(uncond, 1.5, 3.0, 1.0, (1,))
    counters = torch._dynamo.utils.counters["stats"]
    with torch.no_grad():
        got = guided_velocity(model, xv, xa, t, cond, guidance)
        graphs = counters["unique_graphs"]
        again = guided_velocity(model, xv, xa, t, cond, guidance)
        assert counters["unique_graphs"] == graphs
        want = guided_velocity(model, xv, xa, t, cond, dataclasses.replace(guidance, stg_shared_prefix=False))
    for g, a, w in zip(got, again, want, strict=True):
        assert torch.equal(g, a)
        torch.testing.assert_close(g, w, rtol=0, atol=ATOL)


def test_shared_forward_runs_through_ltx_cores_own_forward(trainer: Trainer) -> None:
    """The sharing replaces only the block loop: ltx-core's ``LTXModel.forward`` (and its hooks, through which a
    sharded engine gathers the model's own parameters) runs once per guided forward."""
    xv, xa, t, cond, uncond = _inputs(trainer, 2)
    model = trainer.policies.old
    calls: list[int] = []
    hook = model.model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(kw["video"].latent.shape[0]), with_kwargs=True
    )
    try:
        with torch.no_grad(), _block_rows(trainer) as rows:
            guided_velocity(model, xv, xa, t, cond, Guidance(uncond, 1.5, 3.0, 1.0, (2,)))
    finally:
        hook.remove()
    assert calls == [6] and rows == [4, 4, 4, 2, 6]
    assert model.model._omninft_share is None
