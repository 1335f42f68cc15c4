"""Trainer: 2-iteration smoke run, bit-identical resume, value checks once per iteration, no overwritten run, and
that every equation comes from the ops."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("ltx_core")

import omninft_fast
from omninft_fast.cli import main
from omninft_fast.train import stages
from omninft_fast.train.config import load_config
from omninft_fast.train.trainer import CHECKPOINT, Trainer
from omninft_fast.train.validation import TrainingDiverged

MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")


def micro(tmp_path: Path, *overrides: str) -> Trainer:
    return Trainer(load_config(MICRO, [f"output_dir={tmp_path}", *overrides]))


def test_smoke_two_iterations_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", MICRO, f"output_dir={tmp_path}", "tensorboard=true"]) == 0
    out = capsys.readouterr().out
    assert "| colour | video |" in out and "| pitch | audio |" in out and "| sync | av |" in out
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [0, 1]
    for key in (
        "loss/video",
        "loss/audio",
        "grad_norm/total",
        "eta",
        "advantage/conflict_rate",
        "reward/colour/std",
        "time/rollout",
        "time/old_ref",
        "samples_per_second",
    ):
        assert all(torch.isfinite(torch.tensor(line[key])) for line in lines), key
    for name in (CHECKPOINT, "reward_curve.png", "eval_table.md", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    with Image.open(tmp_path / "reward_curve.png") as curve:
        assert curve.format == "PNG" and curve.size == (640, 400)
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((tmp_path / "tensorboard").iterdir())
    assert list((tmp_path / "samples" / "after").glob("*.mp4")) and list((tmp_path / "samples" / "after").glob("*.wav"))


def test_resume_reproduces_the_next_iteration_bit_identically(tmp_path: Path) -> None:
    straight = micro(tmp_path / "straight")
    first = straight.iteration(0)
    second = straight.iteration(1)

    interrupted = micro(tmp_path / "resumed")
    assert interrupted.iteration(0)["loss/video"] == first["loss/video"]
    interrupted.save(0)
    resumed = Trainer(load_config(MICRO, [f"output_dir={tmp_path / 'resumed'}"]), resume=True)
    assert resumed.start_iteration == 1
    again = resumed.iteration(1)
    for key in second:
        if not key.startswith(("time/", "samples_per_second")):
            assert again[key] == second[key], key


def test_nan_reward_stops_with_iteration_and_source_and_keeps_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = micro(tmp_path, "iterations=3")
    score, log = stages.score, trainer.logger.log
    logged: list[int] = []

    def poisoned(*args: object, **kwargs: object) -> stages.Scores:
        scores = score(*args, **kwargs)
        if logged == [0]:  # the rollout of iteration 1
            scores.values["pitch"][1] = float("nan")
        return scores

    def log_and_count(iteration: int, metrics: dict[str, float]) -> None:
        logged.append(iteration)
        log(iteration, metrics)

    monkeypatch.setattr(stages, "score", poisoned)
    monkeypatch.setattr(trainer.logger, "log", log_and_count)
    with pytest.raises(
        TrainingDiverged, match=r"^iteration 1: reward 'pitch': rewards\[1\] is not finite \(nan\)$"
    ) as caught:
        trainer.run()
    assert isinstance(caught.value.__cause__, ValueError)
    saved = Trainer(load_config(MICRO, [f"output_dir={tmp_path}", "iterations=3"]), resume=True)
    assert saved.start_iteration == 1


def _poison_advantages(adv: stages.Advantages) -> None:
    adv.r_audio[2] = 1.5


def _poison_weight(weight: torch.Tensor) -> None:
    weight[0, 3] = float("inf")


def _poison_weight_sum(weight: torch.Tensor) -> None:
    weight[1] = 0.0


@pytest.mark.parametrize(
    ("stage", "poison", "message"),
    [
        ("advantages", _poison_advantages, r"r_audio: r\[2\] = 1.5 is outside \[0.0, 1.0\]"),
        ("token_weights", _poison_weight, r"r_video: token_weight\[0, 3\] is not finite \(inf\)"),
        (
            "token_weights",
            _poison_weight_sum,
            r"r_video: token_weight\[1\] sums to 0.0; each sample's weights must sum to > 0",
        ),
    ],
)
def test_bad_values_are_caught_once_per_iteration_with_the_ops_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, poison: object, message: str
) -> None:
    """The ops no longer check tensor values on every call: the trainer checks what it holds, once per iteration,
    and names the value the way the ops' own checks do."""
    original = getattr(stages, stage)

    def poisoned(*args: object, **kwargs: object) -> object:
        out = original(*args, **kwargs)
        poison(out)
        return out

    monkeypatch.setattr(stages, stage, poisoned)
    with pytest.raises(TrainingDiverged, match=rf"^iteration 0: {message}$") as caught:
        micro(tmp_path).iteration(0)
    assert isinstance(caught.value.__cause__, ValueError) and str(caught.value.__cause__) in str(caught.value)


def test_a_fresh_run_never_overwrites_an_existing_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    micro(tmp_path)
    with pytest.raises(FileExistsError, match=r"holds a run \(config.yaml, metrics.jsonl\); continue it with --resume"):
        micro(tmp_path)
    assert main(["train", "--config", MICRO, f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith("train: output_dir")


def test_trainer_calls_the_public_ops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = (
        "group_advantages",
        "route_advantages",
        "optimality_probability",
        "nft_loss",
        "adaptive_x0_weight",
        "region_weights",
        "detach_schedule",
    )
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(omninft_fast, name)

        def counted(*args: object, _name: str = name, _original: object = original, **kwargs: object) -> object:
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(omninft_fast, name, counted)
    trainer = micro(tmp_path)
    trainer.iteration(0)
    assert all(count > 0 for count in calls.values()), calls
    assert calls["group_advantages"] == 3  # one per reward
    assert calls["nft_loss"] == 2 * 2  # two streams x two mini-batches


def test_cli_resume_continues_where_the_checkpoint_stops(tmp_path: Path) -> None:
    assert main(["train", "--config", MICRO, f"output_dir={tmp_path}"]) == 0
    assert main(["train", "--config", MICRO, "--resume", f"output_dir={tmp_path}", "iterations=3"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [0, 1, 2]
    assert json.loads((tmp_path / "eval_before.json").read_text())["count"] == 18


def test_lora_trains_only_the_adapter_and_blends_the_old_adapter(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    trainer = micro(tmp_path, "finetune.mode=lora", "finetune.lora_rank=4", "nft.eta_rate=0.3")
    named = dict(trainer.policy.named_parameters())
    before = {k: v.detach().clone() for k, v in named.items()}
    trainer.iteration(0)  # eta = 0: the old adapter becomes the trained one
    changed = {k for k, v in named.items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    adapters = trainer.policies.adapters
    for trained, old in adapters.pairs:
        assert torch.equal(trained, old)
    trained_now = [t.detach().clone() for t, _ in adapters.pairs]
    old_now = [o.detach().clone() for _, o in adapters.pairs]
    trainer.iteration(1)  # eta = 0.3
    for (trained, old), o0 in zip(adapters.pairs, old_now, strict=True):
        torch.testing.assert_close(old, 0.3 * o0 + 0.7 * trained)
    assert any(not torch.equal(t0, t) for t0, (t, _) in zip(trained_now, adapters.pairs, strict=True))


def test_released_loss_options_reach_nft_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``nft.x0_norm`` passes each mini-batch's flow times as ``x0_norm_t`` (no adaptive weight), with the KL in
    x0 space and the release's scale; the step's loss is the modality mean."""
    seen: list[dict] = []
    original = omninft_fast.nft_loss

    def recorded(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(omninft_fast, "nft_loss", recorded)
    monkeypatch.setattr(omninft_fast, "adaptive_x0_weight", None)  # must not be called
    overrides = ["nft.x0_norm=true", "nft.adaptive_weight=false", "nft.kl_space=x0", "nft.kl_weight=1e-4"]
    overrides += ["nft.inverse_beta_scale=true", "nft.policy_scale=5", "nft.modality_reduction=mean"]
    trainer = micro(tmp_path, *overrides, "advantage.clip=5")
    trainer.iteration(0)
    assert len(seen) == 4
    for kwargs in seen:
        t = kwargs["x0_norm_t"]
        assert t is not None and bool((t > 0).all()) and bool((t <= 1).all())
        assert kwargs["kl_space"] == "x0" and kwargs["policy_scale"] == 5.0 and kwargs["sample_weight"] is None


def test_modality_loss_sum_or_weighted_mean() -> None:
    from omninft_fast.train.config import NFTConfig

    losses = {"video": torch.tensor(2.0), "audio": torch.tensor(5.0)}
    assert float(stages.modality_loss(losses, NFTConfig())) == 7.0
    mean = NFTConfig(video_weight=3.0, audio_weight=1.0, modality_reduction="mean")
    assert float(stages.modality_loss(losses, mean)) == (3 * 2.0 + 5.0) / 4


@pytest.mark.parametrize(
    ("diverges_at", "kept"), [(0, "no checkpoint was written yet"), (1, "the checkpoint after iteration 0 is kept")]
)
def test_a_diverged_run_says_which_checkpoint_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], diverges_at: int, kept: str
) -> None:
    iteration = Trainer.iteration

    def diverging(self: Trainer, it: int) -> dict[str, float]:
        if it == diverges_at:
            raise TrainingDiverged("gradient norm is not finite (nan)")
        return iteration(self, it)

    monkeypatch.setattr(Trainer, "iteration", diverging)
    assert main(["train", "--config", MICRO, f"output_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err == f"training stopped: gradient norm is not finite (nan); {kept} in {tmp_path}\n"
    assert (tmp_path / CHECKPOINT).exists() == (diverges_at > 0)
