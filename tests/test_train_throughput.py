"""Throughput features of an iteration: micro-batched rollouts scored in a worker thread, old/reference
predictions before the training loop, the device-side skip of a non-finite step, attention backends, compile."""

from __future__ import annotations

import importlib.machinery
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("ltx_core")

from omninft_fast.ltx2 import attention_backends
from omninft_fast.rewards import RewardModel
from omninft_fast.train import stages
from omninft_fast.train.config import ConfigError, load_config
from omninft_fast.train.rollouts import sample_and_score
from omninft_fast.train.trainer import Trainer
from omninft_fast.train.validation import TrainingDiverged

MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")


def micro(tmp_path: Path, *overrides: str) -> Trainer:
    out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    return Trainer(load_config(MICRO, [f"output_dir={out}", *overrides]))


def _sample(trainer: Trainer, seed: int = 5) -> tuple[stages.Rollout, stages.Scores, dict[str, float]]:
    cfg, p = trainer.config, trainer.policies
    records = [r for r in trainer.records[:3] for _ in range(2)]
    return sample_and_score(
        p.old,
        trainer.task,
        trainer.rewards,
        records,
        torch.Generator().manual_seed(seed),
        sampling=cfg.sampling,
        device=trainer.device,
        handle=p.old_handle,
        last_steps=cfg.reweight.last_steps,
    )


def test_micro_batched_rollouts_sample_and_score_what_one_batch_does(tmp_path: Path) -> None:
    whole = _sample(micro(tmp_path, "sampling.batch_size=0"))
    overlapped = _sample(micro(tmp_path, "sampling.batch_size=4", "sampling.overlap=true"))
    serial = _sample(micro(tmp_path, "sampling.batch_size=4", "sampling.overlap=false"))
    for (a_samples, a_scores, _), (b_samples, b_scores, _) in ((overlapped, serial), (whole, overlapped)):
        exact = a_samples is overlapped[0]
        check = (
            torch.testing.assert_close if not exact else lambda x, y: torch.testing.assert_close(x, y, rtol=0, atol=0)
        )
        assert a_samples.texts == b_samples.texts and a_samples.video_prompts == b_samples.video_prompts
        for x, y in ((a_samples.video, b_samples.video), (a_samples.audio, b_samples.audio)):
            check(x, y)
        check(a_samples.region_scores, b_samples.region_scores)
        assert a_scores.values.keys() == b_scores.values.keys()
        for key in a_scores.values:
            check(a_scores.values[key], b_scores.values[key])
    assert overlapped[0].video.shape[0] == 6 and overlapped[0].region_scores.shape == (6, overlapped[0].video.shape[1])
    assert set(overlapped[2]) == {"rollout", "decode", "reward", "score_wait"}
    assert all(v >= 0 for v in overlapped[2].values()) and overlapped[2]["rollout"] > 0


def test_scoring_runs_in_a_worker_while_the_next_micro_batch_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = micro(tmp_path, "sampling.batch_size=2", "sampling.overlap=true")
    events: list[tuple[str, str]] = []
    original = RewardModel.__call__

    def slow(self: RewardModel, batch: object) -> dict[str, torch.Tensor]:
        events.append(("reward start", threading.current_thread().name))
        time.sleep(0.2)
        out = original(self, batch)
        events.append(("reward end", threading.current_thread().name))
        return out

    monkeypatch.setattr(RewardModel, "__call__", slow)
    cfg, p = trainer.config, trainer.policies
    sample_and_score(
        p.old,
        trainer.task,
        trainer.rewards[:1],
        trainer.records[:6],
        torch.Generator().manual_seed(0),
        sampling=cfg.sampling,
        device=trainer.device,
        on_step=lambda step: events.append((f"step {step}", threading.current_thread().name)),
    )
    assert {name for kind, name in events if kind.startswith("reward")} == {"omninft-score_0"}
    first_end = events.index(("reward end", "omninft-score_0"))
    sampled_meanwhile = [kind for kind, _ in events[events.index(("reward start", "omninft-score_0")) : first_end]]
    assert sampled_meanwhile.count(f"step {cfg.sampling.num_steps - 1}") >= 1


def _update(trainer: Trainer, seed: int = 11) -> tuple[dict[str, float], list[torch.Tensor]]:
    cfg, spec = trainer.config, trainer.task.spec
    gen = torch.Generator().manual_seed(seed)
    b = 8
    batch = stages.UpdateBatch(
        stages.condition(trainer.task, trainer.prompts[:b], trainer.device),
        torch.randn((b, spec.video_tokens, spec.video_channels), generator=gen),
        torch.randn((b, spec.audio_tokens, spec.audio_channels), generator=gen),
        torch.rand(b, generator=gen),
        torch.rand(b, generator=gen),
        0.5 + torch.rand((b, spec.video_tokens), generator=gen),
    )
    metrics = stages.nft_update(
        trainer.policies,
        trainer.optimizer,
        batch,
        gen,
        spec,
        nft=cfg.nft,
        sampling=cfg.sampling,
        grad_clip=cfg.optim.grad_clip,
        device=trainer.device,
        autocast=trainer._autocast,
    )
    return metrics, [p.detach().clone() for p in trainer.policies.trainable]


@pytest.mark.parametrize("finetune", ["mode=full", "mode=lora"])
def test_precomputed_old_and_reference_predictions_train_exactly_like_the_in_loop_ones(
    tmp_path: Path, finetune: str
) -> None:
    """Same losses, gradient norms and parameters after an update (KL reference on); ``predict_batch`` larger than
    the mini-batch changes only the batching of no-grad forwards: float32 rounding of other batch shapes (rel 1e-5 on
    the losses), which Adam's per-element normalisation can turn into up to a few percent of one step (lr 3e-4) on a
    near-zero gradient element, hence atol 1e-5 on the parameters."""
    common = (f"finetune.{finetune}", "nft.kl_weight=0.1", "nft.timesteps_per_sample=2", "nft.mini_batch=4")
    runs = {
        name: _update(micro(tmp_path, *common, *overrides))
        for name, overrides in {
            "in_loop": ("nft.precompute_old=false",),
            "hoisted": ("nft.precompute_old=true",),
            "hoisted_16": ("nft.precompute_old=true", "nft.predict_batch=16"),
        }.items()
    }
    (ref_metrics, ref_params), (metrics, params) = runs["in_loop"], runs["hoisted"]
    for key in ("loss/video", "loss/audio", "grad_norm/total", "grad_norm/audio_params"):
        assert metrics[key] == ref_metrics[key]
    for a, b in zip(params, ref_params, strict=True):
        assert torch.equal(a, b)
    big_metrics, big_params = runs["hoisted_16"]
    assert big_metrics["loss/video"] == pytest.approx(ref_metrics["loss/video"], rel=1e-5)
    for a, b in zip(big_params, ref_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert metrics["time/old_ref"] > 0 and ref_metrics["time/old_ref"] < metrics["time/old_ref"]


def test_the_training_step_runs_one_forward_when_predictions_are_precomputed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = micro(tmp_path, "nft.kl_weight=0.1", "nft.mini_batch=4")
    sizes = {"old": [], "ref": [], "policy": []}
    for name in sizes:
        model = getattr(trainer.policies, name)
        original = model.forward

        def counted(*args: object, _name: str = name, _orig: object = original, **kwargs: object) -> object:
            sizes[_name].append((torch.is_grad_enabled(), args[0].shape[0]))
            return _orig(*args, **kwargs)

        monkeypatch.setattr(model, "forward", counted)
    _update(trainer)
    pairs = 8 * trainer.config.nft.timesteps_per_sample
    assert sizes["old"] == sizes["ref"] == [(False, 4)] * (pairs // 4)
    assert sizes["policy"] == [(True, 4)] * (pairs // 4)
    trainer.config.nft.predict_batch = pairs
    for calls in sizes.values():
        calls.clear()
    _update(trainer)
    assert sizes["old"] == [(False, pairs)] and sizes["policy"] == [(True, 4)] * (pairs // 4)


def test_a_non_finite_gradient_skips_the_step_on_the_device_and_stops_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = micro(tmp_path, "nft.mini_batch=4")
    before = [p.detach().clone() for p in trainer.policies.trainable]
    calls = []
    original = stages.modality_loss

    def poisoned(losses: dict[str, torch.Tensor], nft: object) -> torch.Tensor:
        calls.append(1)
        loss = original(losses, nft)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(stages, "modality_loss", poisoned)
    reads = []
    monkeypatch.setattr(stages, "check_finite", lambda *a: reads.append(a))
    with pytest.raises(TrainingDiverged, match=r"^gradient norm is not finite \(nan\)$"):
        _update(trainer)
    assert len(calls) == 2 and not reads
    after = [p.detach() for p in trainer.policies.trainable]
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    monkeypatch.setattr(stages, "modality_loss", original)
    plain = micro(tmp_path, "nft.mini_batch=4", "optim.impl=foreach")
    monkeypatch.setattr(stages, "check_finite", lambda *a: reads.append(a))
    _update(plain)
    assert len(reads) == 2


def test_the_patched_attention_leaves_value_checks_to_the_iteration(tmp_path: Path) -> None:
    """The trainer's A2V/V2A attention runs without per-call value checks (on a CPU each would read q, k and v in
    full, in every block of every forward), nor does the loss: a non-finite activation surfaces at the update's own
    check of the loss, as ``TrainingDiverged``, not as an op's ``ValueError``."""
    trainer = micro(tmp_path, "nft.mini_batch=4")
    handle = trainer.policies.policy_handle
    assert all(core.check_values is False for core in (*handle._a2v_cores, *handle._v2a_cores))
    with torch.no_grad():
        trainer.policies.policy.model.transformer_blocks[0].audio_to_video_attn.to_q.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"^video loss is not finite \(nan\)$"):
        _update(trainer)


def test_iteration_metrics_time_every_phase_and_print_one_line(tmp_path: Path) -> None:
    trainer = micro(tmp_path, "sampling.batch_size=4")
    metrics = trainer.iteration(0)
    phases = ("rollout", "decode", "reward", "score_wait", "advantages", "old_ref", "train", "old_policy_update")
    assert all(metrics[f"time/{p}"] >= 0 for p in phases)
    caller = [p for p in phases if p not in ("decode", "reward")]  # those two run in the scoring worker
    assert sum(metrics[f"time/{p}"] for p in caller) <= metrics["time/iteration"]
    assert metrics["samples_per_second"] == pytest.approx(8 / metrics["time/iteration"])
    line = Trainer.summary(0, metrics)
    assert line.startswith("iter 0: colour ") and "samples/s" in line and "old_ref" in line and "\n" not in line


def test_attention_backend_auto_on_cpu_is_sdpa_and_named_backends_say_why_not(tmp_path: Path) -> None:
    trainer = micro(tmp_path)
    assert trainer.policies.attention == "pytorch"
    cpu = torch.device("cpu")
    for name in ("xformers", "flash_attention_3", "flash_attn"):
        with pytest.raises(ValueError, match=rf"^model.attention={name} cannot run here: "):
            attention_backends.resolve(name, cpu)
    with pytest.raises(ConfigError, match="model.attention must be one of"):
        load_config(MICRO, ["model.attention=flash"])
    with pytest.raises(ValueError, match=r"^model.attention=xformers cannot run here: "):
        micro(tmp_path, "model.attention=xformers")


def test_flash_attn_backend_lays_out_heads_like_sdpa_and_leaves_the_cross_modal_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flash-attn's layout with a stand-in ``flash_attn_func`` (SDPA in ``(B, T, H, D)``); masked or float32 calls go
    to SDPA; A2V / V2A keep the patched core."""
    from ltx_core.model.transformer.attention import AttentionFunction

    def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(q.shape)
        out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (q, k, v)))
        return out.transpose(1, 2).to(v.dtype)

    calls: list[torch.Size] = []
    stand_in = types.ModuleType("flash_attn")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    stand_in.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in)
    function = attention_backends.attention_function("flash_attn")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn((2, 7, 12), generator=gen).bfloat16() for _ in range(3))
    torch.testing.assert_close(function(q, k, v, 3), AttentionFunction.PYTORCH(q, k, v, 3), rtol=2e-2, atol=2e-2)
    assert calls == [torch.Size([2, 7, 3, 4])]
    mask = torch.zeros((2, 7, 7))
    function(q.float(), k.float(), v.float(), 3)
    function(q, k, v, 3, mask)
    assert len(calls) == 1
    # One graph when compiled: the package is imported when the backend is chosen, not in each call.
    torch._dynamo.reset()
    compiled = torch.compile(function, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, 3), function(q, k, v, 3), rtol=0, atol=0)
    trainer = micro(tmp_path)
    model = trainer.policies.old.model
    cross = model.transformer_blocks[0].audio_to_video_attn.attention_function
    monkeypatch.setattr(attention_backends, "resolve", lambda name, device: "flash_attn")
    assert attention_backends.set_attention_backend(model, "auto", torch.device("cpu")) == "flash_attn"
    assert model.transformer_blocks[0].attn1.attention_function.name == "flash_attn"
    assert model.transformer_blocks[0].audio_attn2.attention_function.name == "flash_attn"
    assert model.transformer_blocks[0].audio_to_video_attn.attention_function is cross


@pytest.mark.parametrize("returns_lse", [False, True], ids=["out", "out-and-lse"])
def test_flash_attention_3_calls_its_package_even_beside_xformers(
    monkeypatch: pytest.MonkeyPatch, returns_lse: bool
) -> None:
    """ltx-core leaves its own FlashAttention-3 callable disabled where xformers is installed; the backend calls
    ``flash_attn_interface`` itself (older builds return the log-sum-exp too)."""
    from ltx_core.model.transformer import attention as ltx_attention

    def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | tuple:
        out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (q, k, v)))
        out = out.transpose(1, 2).to(v.dtype)
        return (out, torch.zeros(())) if returns_lse else out

    stand_in = types.ModuleType("flash_attn_interface")
    stand_in.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn_interface", stand_in)
    monkeypatch.setattr(ltx_attention, "flash_attn_interface", None)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn((2, 7, 12), generator=gen).bfloat16() for _ in range(3))
    got = attention_backends.attention_function("flash_attention_3")(q, k, v, 3)
    torch.testing.assert_close(got, ltx_attention.AttentionFunction.PYTORCH(q, k, v, 3), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("capability", "runs"),
    [
        ((7, 5), ["xformers"]),
        ((8, 0), ["flash_attn", "xformers"]),
        ((9, 0), ["flash_attention_3", "flash_attn", "xformers"]),
    ],
)
def test_flash_backends_need_their_gpu_generation(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], runs: list[str]
) -> None:
    monkeypatch.setattr(attention_backends.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    usable = [n for n in ("flash_attention_3", "flash_attn", "xformers") if not attention_backends.unavailable(n, cuda)]
    assert usable == runs
    assert attention_backends.resolve("auto", cuda) == usable[0]
    if "flash_attn" not in usable:
        with pytest.raises(ValueError, match="flash_attn cannot run here: flash-attn needs an sm_80 or newer GPU"):
            attention_backends.resolve("flash_attn", cuda)


def test_compiled_transformer_trains_like_eager(tmp_path: Path) -> None:
    """Dynamo and AOT autograd trace the forward and backward graphs (``aot_eager``: the graphs inductor would
    compile, without its code generation, which takes minutes on a CPU)."""
    torch._dynamo.reset()
    common = ("iterations=1", "sampling.num_steps=2", "nft.mini_batch=8")
    eager = micro(tmp_path, *common)
    compiled = micro(tmp_path, *common, "model.compile=all", "model.compile_backend=aot_eager")
    assert compiled.policies.policy.model._compiled_call_impl is not None
    a, b = eager.iteration(0), compiled.iteration(0)
    for key in ("reward/colour/mean", "reward/pitch/mean", "loss/video", "loss/audio"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6)
    with pytest.raises(ConfigError, match="model.compile_backend must be one of"):
        load_config(MICRO, ["model.compile_backend=fast"])
    with pytest.raises(ConfigError, match="model.compile=rollout needs finetune.mode=full"):
        load_config(MICRO, ["model.compile=rollout", "finetune.mode=lora"])


def test_a_scoring_error_stops_sampling_at_the_next_micro_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scorer runs in its worker while the next micro-batch samples; its error is raised before the sampler
    starts the micro-batch after that, not after every rollout of the iteration."""
    trainer = micro(tmp_path, "sampling.batch_size=1", "sampling.overlap=true")
    started: list[int] = []
    rollout = stages.rollout

    def counted(*args: object, **kwargs: object) -> stages.Rollout:
        started.append(1)
        return rollout(*args, **kwargs)

    def failing(self: RewardModel, batch: object) -> dict[str, torch.Tensor]:
        raise RuntimeError("the reward model failed")

    monkeypatch.setattr(stages, "rollout", counted)
    monkeypatch.setattr(RewardModel, "__call__", failing)
    cfg, p = trainer.config, trainer.policies
    slow_steps = lambda step: time.sleep(0.05)  # noqa: E731  # the worker finishes (fails) within a micro-batch
    with pytest.raises(RuntimeError, match="the reward model failed"):
        sample_and_score(
            p.old, trainer.task, trainer.rewards, trainer.records[:8], torch.Generator().manual_seed(0),
            sampling=cfg.sampling, device=trainer.device, on_step=slow_steps,
        )  # fmt: skip
    assert len(started) <= 3 < 8
    assert [t.name for t in threading.enumerate() if t.name.startswith("omninft-score")] == []


def test_evaluation_samples_in_micro_batches_and_gets_the_same_table(tmp_path: Path) -> None:
    """``sampling.batch_size`` bounds the evaluation's forwards too (3 guidance passes x 1 sample), and changes
    nothing it measures."""
    guided = ["sampling.video_cfg=1.5", "sampling.audio_cfg=2.0"]
    whole = micro(tmp_path, *guided).evaluate()[0]
    trainer = micro(tmp_path, *guided, "sampling.batch_size=1")
    rows: list[int] = []
    forward = trainer.policies.policy.forward

    def counted(x_video: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        rows.append(x_video.shape[0])
        return forward(x_video, *args, **kwargs)

    trainer.policies.policy.forward = counted
    split = trainer.evaluate()[0]
    assert max(rows) == 2 and split.count == whole.count  # cond + uncond of one sample
    for key, value in whole.mean.items():
        assert split.mean[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
