"""A run is never lost: refused and moved-aside output folders, resume with changed settings, torn metrics lines,
SIGINT/SIGTERM, checkpoint files, samples named by prompt id, and one line on stderr for every user error."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("ltx_core")

from safetensors.torch import load_file

from omninft_fast.cli import main
from omninft_fast.train import stages
from omninft_fast.train.checkpoint import save_weights
from omninft_fast.train.config import load_config
from omninft_fast.train.report import EvalResult, format_table, write_samples
from omninft_fast.train.trainer import CHECKPOINT, Trainer

MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")


def train(out: Path, *args: str) -> int:
    return main(["train", "--config", MICRO, f"output_dir={out}", *args])


def iterations(out: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def on_training_score(
    monkeypatch: pytest.MonkeyPatch, hook: Callable[[int, int, stages.Scores], None]
) -> Callable[[], None]:
    """Run ``hook(iteration, call, scores)`` after each ``stages.score`` call inside a training iteration (``call``
    counts that iteration's calls from 0; the evaluations before and after training score too, and are left alone);
    returns what undoes it."""
    score, iteration, current = stages.score, Trainer.iteration, {"iteration": None, "calls": 0}

    def tracked(self: Trainer, it: int) -> dict[str, float]:
        current.update(iteration=it, calls=0)
        try:
            return iteration(self, it)
        finally:
            current["iteration"] = None

    def hooked(*args: object, **kwargs: object) -> stages.Scores:
        scores = score(*args, **kwargs)
        if current["iteration"] is not None:
            hook(current["iteration"], current["calls"], scores)
            current["calls"] += 1
        return scores

    monkeypatch.setattr(Trainer, "iteration", tracked)
    monkeypatch.setattr(stages, "score", hooked)
    return lambda: (monkeypatch.setattr(Trainer, "iteration", iteration), monkeypatch.setattr(stages, "score", score))


def test_a_held_folder_is_refused_by_name_and_overwrite_moves_it_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert train(out, "iterations=1") == 0
    first = (out / CHECKPOINT).read_bytes()
    assert train(out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"output_dir {str(out)!r} already holds a run" in err
    assert "--resume" in err and "--overwrite" in err
    assert train(out, "--resume", "--overwrite") == 2
    assert "give one" in capsys.readouterr().err
    assert train(out, "--overwrite", "iterations=1") == 0
    assert f"to {str(tmp_path / 'run.replaced-1')!r}" in capsys.readouterr().out
    assert (tmp_path / "run.replaced-1" / CHECKPOINT).read_bytes() == first
    assert iterations(out) == [0]


def test_resume_applies_new_optimiser_settings_and_records_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(tmp_path, "iterations=1") == 0
    capsys.readouterr()
    trainer = Trainer(
        load_config(MICRO, [f"output_dir={tmp_path}", "optim.lr=1e-5", "optim.beta2=0.99", "optim.weight_decay=0.1"]),
        resume=True,
    )
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-5, (0.9, 0.99), 0.1)
    out = capsys.readouterr().out
    assert "optim.lr: 0.0003 -> 1e-05" in out and "optim.weight_decay: 0.0 -> 0.1" in out
    assert load_config(tmp_path / "config.yaml").optim.lr == 1e-5
    assert "optim.beta2: 0.999 -> 0.99" in (tmp_path / "resume.log").read_text()
    with pytest.raises(ValueError, match=r"--resume cannot change model.num_layers \(2 in the checkpoint, 3 now\)"):
        Trainer(load_config(MICRO, [f"output_dir={tmp_path}", "model.num_layers=3"]), resume=True)


def test_resume_takes_the_new_optimiser_kernel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The saved state's kernel flags (fused / foreach) give way to this run's ``optim.impl``, and it trains."""
    assert train(tmp_path, "iterations=1", "optim.impl=plain") == 0
    trainer = Trainer(load_config(MICRO, [f"output_dir={tmp_path}", "optim.impl=auto", "iterations=2"]), resume=True)
    group = trainer.optimizer.param_groups[0]
    assert (group["fused"], group["foreach"]) == (True, None)
    trainer.run()
    assert iterations(tmp_path) == [0, 1]
    capsys.readouterr()
    assert train(tmp_path, "--resume", "iterations=3", "optim.impl=foreach") == 0
    assert "optim.impl: 'auto' -> 'foreach'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("eval.seed=7", "eval.seed (2024 -> 7)"),
        ("sampling.eval_steps=2", "sampling.eval_steps (3 -> 2)"),
        ("rewards=[{name: synthetic_colour}]", "rewards.1.name ('synthetic_pitch' -> None)"),
    ],
)
def test_resume_refuses_a_different_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, named: str
) -> None:
    assert train(tmp_path, "iterations=1") == 0
    capsys.readouterr()
    assert train(tmp_path, "--resume", "iterations=2", override) == 2
    err = capsys.readouterr().err
    assert err.startswith("train: --resume cannot change ") and named in err and "one evaluation set" in err
    assert iterations(tmp_path) == [0]
    assert train(tmp_path, "--resume", "iterations=2", "eval.write_samples=1", "sampling.batch_size=2") == 0


def test_resume_may_change_how_the_model_runs_but_not_turn_a_full_runs_kl_term_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(tmp_path, "iterations=1", "nft.kl_weight=0") == 0
    capsys.readouterr()
    assert train(tmp_path, "--resume", "iterations=2", "nft.kl_weight=0.1") == 2
    assert capsys.readouterr().err == (
        "train: --resume cannot turn the KL term on (nft.kl_weight 0.0 in the checkpoint, 0.1 now): a full fine-tune "
        "stores its reference weights only with one; start a new run for that\n"
    )
    runtime = ["model.attention=pytorch", "model.gradient_checkpointing=true", "model.compile_backend=aot_eager"]
    assert train(tmp_path, "--resume", "iterations=2", *runtime) == 0
    assert iterations(tmp_path) == [0, 1]


def test_overrides_after_resume_are_accepted(tmp_path: Path) -> None:
    assert train(tmp_path, "iterations=1") == 0
    assert main(["train", f"output_dir={tmp_path}", "--resume", "--config", MICRO, "iterations=2"]) == 0
    assert iterations(tmp_path) == [0, 1]


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path, "iterations=1") == 0
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"iteration": 1, "loss/vid')
    assert train(tmp_path, "--resume", "iterations=2") == 0
    assert f"dropped the torn last line 2 of {tmp_path / 'metrics.jsonl'}" in capsys.readouterr().err
    assert iterations(tmp_path) == [0, 1]


def test_sigterm_stops_at_the_next_iteration_and_resume_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def signalled(iteration: int, call: int, scores: stages.Scores) -> None:
        if iteration == 0 and call == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    undo = on_training_score(monkeypatch, signalled)
    assert train(tmp_path, "iterations=3", "checkpoint_every=5") == 130
    assert "stopped by SIGTERM; --resume continues from iteration 1" in capsys.readouterr().err
    assert iterations(tmp_path) == [0]
    undo()
    assert train(tmp_path, "--resume", "iterations=3", "checkpoint_every=5") == 0
    assert iterations(tmp_path) == [0, 1, 2]


def test_a_second_signal_stops_at_once_and_names_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def signalled(iteration: int, call: int, scores: stages.Scores) -> None:
        if iteration == 1 and call == 0:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    on_training_score(monkeypatch, signalled)
    assert train(tmp_path, "iterations=3") == 130
    assert "stopped at once by a second SIGINT; --resume continues from iteration 1" in capsys.readouterr().err
    assert iterations(tmp_path) == [0]


def test_checkpoints_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        micro = Trainer(load_config(MICRO, [f"output_dir={tmp_path}"]))
        micro.save(0)
    finally:
        os.umask(old)
    assert (tmp_path / CHECKPOINT).stat().st_mode & 0o777 == 0o640
    assert not list(tmp_path.glob("*.tmp"))


def test_samples_are_named_by_prompt_id_with_an_index(tmp_path: Path) -> None:
    prompts = ["red/blue " + "x" * 300, "../green"]
    samples = stages.Rollout([p for p in prompts for _ in range(2)], torch.zeros(4, 1), torch.zeros(4, 1), None)

    def decode(video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(len(video), 2, 3, 4, 4), torch.rand(len(audio), 80) * 2 - 1

    write_samples(tmp_path, decode, samples, samples_per_prompt=2, count=2, fps=8.0, sample_rate=8000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "0000.mp4",
        "0000.wav",
        "0001.mp4",
        "0001.wav",
        "prompts.jsonl",
    ]
    index = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert [(entry["id"], entry["prompt"]) for entry in index] == [("0000", prompts[0]), ("0001", prompts[1])]


@pytest.mark.parametrize(
    ("prompts", "count", "ids"), [(14, 4, [0, 3, 7, 10]), (7, 7, list(range(7))), (3, 5, [0, 1, 2])]
)
def test_the_samples_written_are_count_distinct_prompts(
    tmp_path: Path, prompts: int, count: int, ids: list[int]
) -> None:
    samples = stages.Rollout([f"p{i}" for i in range(prompts)], torch.zeros(prompts, 1), torch.zeros(prompts, 1), None)

    def decode(video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(len(video), 2, 3, 4, 4), torch.rand(len(audio), 80) * 2 - 1

    write_samples(tmp_path, decode, samples, samples_per_prompt=1, count=count, fps=8.0, sample_rate=8000)
    index = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert [(entry["id"], entry["prompt"]) for entry in index] == [(f"{i:04d}", f"p{i}") for i in ids]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["nft.beta=inf"], "config error: nft.beta must be finite, got inf"),
        (["task.frames=0"], "config error: task.frames must be > 0, got 0"),
        (["device=tpu9"], "config error: device must name a torch device such as cpu or cuda:0, got 'tpu9'"),
    ],
)
def test_bad_values_are_refused_at_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    assert train(tmp_path, *overrides) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not tmp_path.joinpath("config.yaml").exists()


@pytest.mark.skipif(torch.accelerator.is_available(), reason="needs a machine without an accelerator")
@pytest.mark.parametrize("device", ["cuda:0", "mps", "meta"])
def test_an_unavailable_device_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str) -> None:
    assert train(tmp_path, f"device={device}") == 2
    assert capsys.readouterr().err == f"train: device {device!r} is not available on this machine (it has only a CPU)\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_apex_is_asked_for_by_name_and_needs_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path, "optim.impl=apex") == 2
    assert capsys.readouterr().err == "train: optim.impl=apex needs a CUDA device\n"


def test_stg_blocks_past_the_model_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path, "sampling.stg_scale=1.0", "sampling.stg_blocks=[1, 2, 5]") == 2
    assert capsys.readouterr().err == "train: sampling.stg_blocks [2, 5] are past the model's 2 blocks (0..1)\n"


@pytest.mark.skipif(torch.accelerator.is_available(), reason="needs a machine without an accelerator")
def test_an_unavailable_reward_device_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path, "rewards.1.device=cuda") == 2
    err = capsys.readouterr().err
    assert err == "train: rewards.1.device 'cuda' is not available on this machine (it has only a CPU)\n"


def test_an_interrupt_while_building_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("omninft_fast.train.trainer.build_policies", interrupted)
    assert train(tmp_path) == 130
    assert capsys.readouterr().err == "train: interrupted\n"


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("seed: 0\nnft: {beta: 1\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config file {str(config)!r} is not valid YAML at line 3" in err


def test_unwritable_output_folder_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    assert train(tmp_path / "file" / "run") == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"train: output_dir {str(tmp_path / 'file' / 'run')!r} is not writable") and err.count("\n") == 1
    )


def test_missing_and_truncated_checkpoints_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path / "none", "--resume") == 2
    assert f"output_dir {str(tmp_path / 'none')!r} holds no run to resume" in capsys.readouterr().err
    assert train(tmp_path, "iterations=1") == 0
    path = tmp_path / CHECKPOINT
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    assert train(tmp_path, "--resume") == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"train: checkpoint {str(path)!r} is not a readable safetensors file") and err.count("\n") == 1
    )
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        train(tmp_path, "--resume", "--debug")


def test_weights_of_another_model_size_name_the_key_and_both_shapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = Trainer(
        load_config(MICRO, [f"output_dir={tmp_path / 'other'}", "model.video_head_dim=4", "task.text_dim_video=8"])
    )
    save_weights(tmp_path / "base.safetensors", other.policy.model)
    assert train(tmp_path / "run", f"model.checkpoint={tmp_path / 'base.safetensors'}") == 2
    err = capsys.readouterr().err
    assert f"weights {str(tmp_path / 'base.safetensors')!r} fit another model size: " in err
    assert "scale_shift_table is (2, 8) there, (2, 16) in this model" in err and err.count("\n") == 1


def test_a_run_killed_before_its_first_checkpoint_resumes_from_zero_beside_its_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    Trainer(load_config(MICRO, [f"output_dir={out}"]))
    assert train(out, "--resume", "iterations=1") == 0
    moved = tmp_path / "run.replaced-1"
    assert (
        f"note: {str(out)!r} holds no checkpoint to resume; its files were moved to {str(moved)!r} and the run "
        "starts from iteration 0"
    ) in capsys.readouterr().out
    assert iterations(out) == [0] and (moved / "config.yaml").exists()


def test_overwrite_refuses_to_move_the_current_folder_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run would follow the folder it runs in; one line says so and nothing moves."""
    Trainer(load_config(MICRO, [f"output_dir={tmp_path}"]))
    monkeypatch.chdir(tmp_path)
    assert train(Path("."), "--overwrite", "iterations=1") == 2
    assert capsys.readouterr().err == (
        f"train: cannot move {str(tmp_path)!r} aside while it holds the current folder; run from outside it\n"
    )
    assert (tmp_path / "config.yaml").exists() and not list(tmp_path.parent.glob(f"{tmp_path.name}.replaced-*"))


def test_resume_of_a_run_whose_checkpoint_is_gone_keeps_its_results(tmp_path: Path) -> None:
    """A finished run without its checkpoint (removed, or a folder in its place) is not trained over: its metrics and
    evaluation move aside untouched."""
    out = tmp_path / "run"
    assert train(out, "iterations=2") == 0
    kept = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "eval_table.md", "config.yaml")}
    (out / "checkpoint.safetensors").unlink()
    (out / "checkpoint.safetensors").mkdir()
    assert train(out, "--resume", "iterations=1") == 0
    moved = tmp_path / "run.replaced-1"
    assert {name: (moved / name).read_bytes() for name in kept} == kept
    assert iterations(moved) == [0, 1] and iterations(out) == [0]


def _progress(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.stat().st_size if metrics.exists() else -1


def test_sigkill_at_random_points_then_resume_ends_bit_identical(tmp_path: Path) -> None:
    """Three SIGKILLs at random points (the first may land before the first checkpoint), a torn checkpoint write
    and a torn metrics line, each followed by ``--resume``: the final checkpoint, metrics and evaluation equal an
    uninterrupted run's bit for bit."""
    args = ["--config", MICRO, "iterations=6", "progress=false"]
    assert main(["train", *args, f"output_dir={tmp_path / 'straight'}"]) == 0
    out, rng = tmp_path / "killed", random.Random(12)
    for kill in range(3):
        command = [sys.executable, "-m", "omninft_fast", "train", *args, f"output_dir={out}"]
        start, deadline = _progress(out), time.monotonic() + 60
        process = subprocess.Popen([*command, *(["--resume"] if kill else [])], stdout=subprocess.DEVNULL)
        while process.poll() is None and time.monotonic() < deadline:
            if (kill == 0 and (out / "config.yaml").exists()) or (kill > 0 and _progress(out) > start):
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.8 if kill == 0 else 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait()
    if (out / CHECKPOINT).exists():  # what a kill inside a checkpoint write or a metrics write leaves
        (out / f".{CHECKPOINT}.killed.tmp").write_bytes((out / CHECKPOINT).read_bytes()[:1000])
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"iteration": 9, "reward/col')
    assert main(["train", *args, f"output_dir={out}", "--resume"]) == 0

    straight, killed = load_file(str(tmp_path / "straight" / CHECKPOINT)), load_file(str(out / CHECKPOINT))
    assert straight.keys() == killed.keys()
    for key, value in straight.items():
        assert torch.equal(value, killed[key]), key

    def metrics(folder: Path) -> list[dict[str, float]]:
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if not k.startswith(("time/", "samples_per"))} for line in lines]

    assert metrics(out) == metrics(tmp_path / "straight")
    for name in ("eval_before.json", "eval_after.json"):
        assert (out / name).read_text() == (tmp_path / "straight" / name).read_text(), name


def test_on_nonfinite_drop_leaves_out_the_groups_and_names_the_reward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def poisoned(iteration: int, call: int, scores: stages.Scores) -> None:
        if iteration == 0 and call == 0:  # the rollout of iteration 0
            scores.values["pitch"][5] = float("inf")

    on_training_score(monkeypatch, poisoned)
    assert train(tmp_path, "on_nonfinite=drop") == 0
    assert "warning: iteration 0: non-finite rewards (pitch on 1 samples); dropped 1 of 2 groups" in (
        capsys.readouterr().err
    )
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["dropped_groups"] for line in lines] == [1.0, 0.0]
    assert train(tmp_path / "bad", "on_nonfinite=skip") == 2
    assert "on_nonfinite must be one of ['stop', 'drop'], got 'skip'" in capsys.readouterr().err


def test_a_reward_that_does_not_change_shows_a_change_of_zero() -> None:
    same = EvalResult({"colour": 1.0}, {"colour": 0.0}, 4, {"colour": "video"})
    assert (
        format_table(same, same).splitlines()[-1]
        == "| colour | video | 1.0000 ± 0.0000 | 1.0000 ± 0.0000 | +0.0000 | +0.00 |"
    )
