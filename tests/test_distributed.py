"""Distributed training on CPU (gloo, 2 processes under torchrun): FSDP2 and DeepSpeed ZeRO-3 runs of the micro
config equal the one-process run with the same global batch, shard the parameter and optimiser bytes, survive a
kill mid-iteration; an FSDP2 checkpoint resumes in one process (DCP reshards it) and FSDP2 continues a one-process
checkpoint.

Tolerance: 1e-5 relative on losses, rewards, advantages and the parameters after 3 iterations. Each rank runs the
model on half of every batch and the engines sum gradients across ranks, so float32 results differ from one
process in the last bits (measured: about 1e-8 relative on the parameters, 1e-6 on a reward mean of values near
zero); 1e-5 leaves room for other BLAS builds while any real difference (a wrong share, sample, scale or step)
moves them by far more.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("ltx_core")

from safetensors.torch import load_file

from omninft_fast.cli import main
from omninft_fast.train import distributed
from omninft_fast.train.config import ConfigError, load_config
from omninft_fast.train.trainer import CHECKPOINT, Trainer
from omninft_fast.train.validation import TrainingDiverged

MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")
# One optimiser step per iteration over two micro-batches (the first backward without gradient sync) and
# activation checkpointing per block, as the 19B configs run.
SETTINGS = ["nft.accumulate=iteration", "model.gradient_checkpointing=true"]
ARGS = ["--config", MICRO, "iterations=3", "progress=false", *SETTINGS]
RTOL = 1e-5
SKIP = ("time/", "samples_per_second", "memory/")


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def torchrun(nproc: int, out: Path, *overrides: str) -> list[str]:
    """The command of a ``nproc``-process training run into ``out``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_port()}",
        "-m",
        "omninft_fast",
        "train",
        *ARGS,
        f"output_dir={out}",
        *overrides,
    ]


def run(nproc: int, out: Path, *overrides: str) -> None:
    done = subprocess.run(
        torchrun(nproc, out, *overrides), env=_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def metrics(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * abs(a) + 1e-7


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """3 iterations in one process without an engine, with 2-process FSDP2 and 2-process ZeRO-3; 1 with ZeRO-3 on
    one rank."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *ARGS, f"output_dir={root / 'one'}"]) == 0
    run(2, root / "fsdp2", "distributed.backend=fsdp2")
    run(2, root / "zero3", "distributed.backend=deepspeed", "distributed.zero_stage=3")
    run(1, root / "zero3_one", "distributed.backend=deepspeed", "distributed.zero_stage=3", "iterations=1")
    return {name: root / name for name in ("one", "fsdp2", "zero3", "zero3_one")}


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_two_processes_equal_one_with_the_same_global_batch(runs: dict[str, Path], backend: str) -> None:
    one, two = metrics(runs["one"]), metrics(runs[backend])
    assert [m["iteration"] for m in two] == [0, 1, 2]
    for a, b in zip(one, two, strict=True):
        keys = [k for k in a if not k.startswith(SKIP) and k in b]
        assert {k for k in keys if k.startswith(("reward/", "advantage/", "loss/"))} == {
            k for k in a if k.startswith(("reward/", "advantage/", "loss/"))
        }
        for key in keys:
            assert close(a[key], b[key]), (a["iteration"], key, a[key], b[key])
    # After 3 iterations: the one-process checkpoint against the consolidated export of the 2-process run.
    single, export = load_file(str(runs["one"] / CHECKPOINT)), load_file(str(runs[backend] / distributed.EXPORT))
    assert export.keys() == {k for k in single if k.startswith("policy.")}
    for key, value in export.items():
        assert torch.allclose(value, single[key], rtol=RTOL, atol=1e-7), key
    # The tolerance separates trained parameters from the initial ones.
    start = Trainer(load_config(MICRO, [f"output_dir={runs['one'].parent / f'init-{backend}'}", *SETTINGS])).policy
    moved = [n for n, p in start.named_parameters() if not torch.allclose(p, export[f"policy.{n}"], rtol=RTOL)]
    assert len(moved) > len(export) // 2


@pytest.mark.parametrize(("backend", "baseline"), [("fsdp2", "one"), ("zero3", "zero3_one")])
def test_two_ranks_hold_at_most_0_55_of_the_parameter_and_optimiser_bytes(
    runs: dict[str, Path], backend: str, baseline: str
) -> None:
    """FSDP2 against one process without an engine; ZeRO-3 against itself on one rank, since DeepSpeed keeps a
    compute partition beside its fp32 master partition (in fp32 that is 4 copies of N / 2 against 3 of N)."""
    held = metrics(runs[backend])[-1]["memory/param_optim_bytes"]
    whole = metrics(runs[baseline])[-1]["memory/param_optim_bytes"]
    assert 0 < held <= 0.55 * whole, (held, whole)


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "killed"
    process = subprocess.Popen(
        torchrun(2, out, "distributed.backend=fsdp2"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # in iteration 1: iteration 0 is logged and checkpointed
    process.wait()
    assert not (out / distributed.EXPORT).exists()
    run(2, out, "distributed.backend=fsdp2", "--resume")
    straight = metrics(runs["fsdp2"])
    assert [{k: v for k, v in m.items() if not k.startswith(SKIP)} for m in metrics(out)] == [
        {k: v for k, v in m.items() if not k.startswith(SKIP)} for m in straight
    ]
    a, b = load_file(str(out / distributed.EXPORT)), load_file(str(runs["fsdp2"] / distributed.EXPORT))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_two_rank_fsdp2_checkpoint_resumes_in_one_process(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "resharded"
    for name in ("config.yaml", "metrics.jsonl", "eval_before.json"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes((runs["fsdp2"] / name).read_bytes())
    (out / distributed.DCP_CHECKPOINT).mkdir()
    for part in (runs["fsdp2"] / distributed.DCP_CHECKPOINT).iterdir():
        (out / distributed.DCP_CHECKPOINT / part.name).write_bytes(part.read_bytes())
    trainer = Trainer(load_config(MICRO, [f"output_dir={out}", "iterations=4", *SETTINGS]), resume=True)
    assert trainer.start_iteration == 3
    export = load_file(str(runs["fsdp2"] / distributed.EXPORT))
    for name, param in trainer.policy.named_parameters():
        assert torch.equal(param.detach(), export[f"policy.{name}"]), name
    steps = {float(state["step"]) for state in trainer.optimizer.state.values()}
    assert steps == {float(load_file(str(runs["one"] / CHECKPOINT))["optim.0.step"])}
    trainer.run()
    assert [m["iteration"] for m in metrics(out)] == [0, 1, 2, 3]
    assert (out / CHECKPOINT).exists()


def test_fsdp2_continues_a_one_process_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    """Two iterations in one process, the third on 2 FSDP2 ranks: the one-process run's result."""
    out = tmp_path / "continued"
    assert main(["train", *ARGS, f"output_dir={out}", "iterations=2"]) == 0
    run(2, out, "distributed.backend=fsdp2", "--resume")
    single, export = load_file(str(runs["one"] / CHECKPOINT)), load_file(str(out / distributed.EXPORT))
    assert all(torch.allclose(value, single[key], rtol=RTOL, atol=1e-7) for key, value in export.items())
    assert [m["iteration"] for m in metrics(out)] == [0, 1, 2]


@pytest.fixture
def host_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names the update's host checks of values (``stages.check_finite``) are called with."""
    from omninft_fast.train import stages

    checked: list[str] = []
    check = stages.check_finite
    monkeypatch.setattr(stages, "check_finite", lambda name, value: checked.append(name) or check(name, value))
    return checked


def test_fsdp2_steps_read_no_gradient_norm_on_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host_checks: list[str]
) -> None:
    """With fused AdamW the FSDP2 engine skips a non-finite step on the device, as one process does: four optimiser
    steps per iteration here (8 samples, mini-batches of 2), no host check of the norm (the update checks it once)."""
    overrides = [f"output_dir={tmp_path}", "distributed.backend=fsdp2", "nft.mini_batch=2", "iterations=1"]
    trainer = Trainer(load_config(MICRO, overrides))
    try:
        assert trainer.optimizer.defaults["fused"]
        steps = []
        monkeypatch.setattr(trainer.engine, "step", lambda step=trainer.engine.step: steps.append(1) or step())
        metrics = trainer.iteration(0)
    finally:
        trainer.dist.close()
    assert len(steps) == 4 and host_checks == [] and metrics["grad_norm/total"] > 0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # DeepSpeed's own calls of deprecated torch.distributed APIs
def test_deepspeed_steps_read_no_gradient_norm_on_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host_checks: list[str]
) -> None:
    """DeepSpeed's steps hand their gradient norm on unread; a non-finite one stops the run at the update's end."""
    pytest.importorskip("deepspeed")
    overrides = [f"output_dir={tmp_path}", "distributed.backend=deepspeed", "nft.mini_batch=2", "iterations=1"]
    trainer = Trainer(load_config(MICRO, overrides))
    try:
        norms = [torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(2.0), torch.tensor(3.0)]
        returned = []

        def step(step=trainer.engine.step) -> dict[str, torch.Tensor]:
            monkeypatch.setattr(trainer.engine.engine, "get_global_grad_norm", lambda: norms[len(returned)])
            returned.append(step())
            return returned[-1]

        monkeypatch.setattr(trainer.engine, "step", step)
        with pytest.raises(TrainingDiverged, match=r"^iteration 0: gradient norm is not finite \(nan\)$"):
            trainer.iteration(0)
    finally:
        trainer.dist.close()
    got = torch.stack([r["grad_norm/total"] for r in returned])
    torch.testing.assert_close(got, torch.stack(norms), equal_nan=True)
    assert host_checks == []


@pytest.mark.filterwarnings("ignore::FutureWarning")  # DeepSpeed's own calls of deprecated torch.distributed APIs
def test_a_second_deepspeed_trainer_in_one_process_after_the_first_closed(tmp_path: Path) -> None:
    """Closing leaves the process group through DeepSpeed, which then drops the groups it built on it: before, the
    next DeepSpeed engine in the process failed on a group that no longer existed."""
    pytest.importorskip("deepspeed")
    for name in ("first", "second"):
        trainer = Trainer(load_config(MICRO, [f"output_dir={tmp_path / name}", "distributed.backend=deepspeed"]))
        try:
            assert trainer.iteration(0)["grad_norm/total"] > 0
        finally:
            trainer.dist.close()


def test_bad_distributed_settings_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match=r"distributed.zero_stage must be one of \[2, 3\], got 1"):
        load_config(MICRO, ["distributed.backend=deepspeed", "distributed.zero_stage=1"])
    with pytest.raises(ConfigError, match="on_nonfinite=drop needs distributed.backend=none"):
        load_config(MICRO, ["distributed.backend=fsdp2", "on_nonfinite=drop"])
    with pytest.raises(ConfigError, match="distributed.backend=deepspeed with bf16 .* needs autocast=bf16"):
        load_config(MICRO, ["distributed.backend=deepspeed", "distributed.mixed_precision=bf16", "autocast=off"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    cases = {
        "distributed.backend=none": "distributed.backend=none runs one process, but 2 were launched",
        "distributed.backend=fsdp2 prompts_per_iter=3": "prompts_per_iter (3) must be a multiple of the world size (2)",
        "distributed.backend=fsdp2 nft.mini_batch=3": "nft.mini_batch (3) must be a multiple of the world size (2)",
    }
    for overrides, message in cases.items():
        assert main(["train", *ARGS, f"output_dir={tmp_path / 'run'}", *overrides.split()]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    monkeypatch.setenv("WORLD_SIZE", "1")
    find_spec = distributed.importlib.util.find_spec
    monkeypatch.setattr(
        distributed.importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
    )
    assert main(["train", *ARGS, f"output_dir={tmp_path / 'run'}", "distributed.backend=deepspeed"]) == 2
    err = capsys.readouterr().err
    assert "distributed.backend=deepspeed needs the deepspeed package" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_backend_is_refused_by_name(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "zero3"
    out.mkdir()
    (out / "config.yaml").write_bytes((runs["zero3"] / "config.yaml").read_bytes())
    folder = out / distributed.DEEPSPEED_CHECKPOINT
    folder.mkdir()
    (folder / distributed.META).write_bytes(
        (runs["zero3"] / distributed.DEEPSPEED_CHECKPOINT / "meta.json").read_bytes()
    )
    with pytest.raises(ValueError, match="written with distributed.backend=deepspeed; resume it with that backend"):
        Trainer(load_config(MICRO, [f"output_dir={out}"]), resume=True)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # DeepSpeed's own calls of deprecated torch.distributed APIs
def test_a_deepspeed_checkpoint_refuses_another_layout_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its ZeRO stage and precision fix the shards' layout; its frozen shards hold the reference with the old policy."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    one = ["train", "--config", MICRO, f"output_dir={out}", "distributed.backend=deepspeed", "progress=false"]
    assert main([*one, "iterations=1", "nft.kl_weight=0.1"]) == 0
    capsys.readouterr()
    folder = out / distributed.DEEPSPEED_CHECKPOINT
    refusals = {
        "distributed.zero_stage=2": f"checkpoint {str(folder)!r} was written with distributed.zero_stage=3; resume it "
        "with that (2 now)",
        "nft.kl_weight=0": "--resume cannot turn the KL term off (nft.kl_weight 0.1 in the checkpoint, 0.0 now)",
    }
    for override, message in refusals.items():
        assert main([*one, "iterations=2", "nft.kl_weight=0.1", override, "--resume"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_the_old_policy_blends_from_a_bf16_module_in_its_own_float32() -> None:
    """DeepSpeed ZeRO-2 in bf16 trains a bf16 module beside a float32 old policy: the blend reads each bf16 tensor
    in float32 (as one process would blend the same values)."""
    import types

    gen = torch.Generator().manual_seed(0)
    old, policy = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4).to(torch.bfloat16)
    with torch.no_grad():
        for p in (*old.parameters(), *policy.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen))
    pairs = zip(old.parameters(), policy.parameters(), strict=True)
    want = [o.detach().lerp(n.detach().float(), 0.7) for o, n in pairs]
    policies = types.SimpleNamespace(adapters=None, old=old, policy=policy)
    distributed.Engine(None, policies, None).update_old_policy(0.3)
    for got, expected in zip(old.parameters(), want, strict=True):
        assert got.dtype == torch.float32 and torch.equal(got.detach(), expected)


def test_a_sharded_run_is_read_by_generate_and_analyze(runs: dict[str, Path], tmp_path: Path) -> None:
    """``load_policy`` (generate, analyze, merge-lora) reads a run's newest weights: an FSDP2 folder through DCP, a
    DeepSpeed folder through the run's export of the same iteration; both give the one-process run's policy."""
    from omninft_fast.generate import load_policy, resolve_config

    single = load_file(str(runs["one"] / CHECKPOINT))
    for name in ("fsdp2", "zero3"):
        loaded = load_policy(resolve_config(None, str(runs[name]), []), runs[name])
        state = loaded.model.state_dict()
        for key, value in single.items():
            if key.startswith("policy."):
                torch.testing.assert_close(state[key[len("policy.") :]], value, rtol=RTOL, atol=1e-7)
    out = tmp_path / "zero3"  # the newest checkpoint a DeepSpeed folder, its export of an older iteration
    for entry in ("config.yaml", distributed.EXPORT):
        (out / entry).parent.mkdir(exist_ok=True)
        (out / entry).write_bytes((runs["zero3_one"] / entry).read_bytes())
    folder = out / distributed.DEEPSPEED_CHECKPOINT
    folder.mkdir()
    (folder / distributed.META).write_text(
        (runs["zero3"] / distributed.DEEPSPEED_CHECKPOINT / distributed.META).read_text()
    )
    with pytest.raises(ValueError, match="is a DeepSpeed folder \\(iteration 2\\) without export.safetensors of that"):
        resolve_config(None, str(out), [])


@pytest.mark.parametrize("precision", ["off", "bf16"])
def test_fsdp2_gathers_the_blocks_for_backward_where_it_finds_tensors_only_in_containers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """FSDP2 before torch 2.13 (the GPU machines' 2.11) looked for a block's output tensors through ``tree_flatten``,
    which does not enter ltx-core's ``TransformerArgs`` dataclasses: no block was gathered again for the backward,
    which then read freed parameter storage. The blocks return their tensors flat, so that traversal finds them."""
    from torch.distributed.fsdp._fully_shard import _fsdp_state
    from torch.utils._pytree import tree_flatten

    def tree_flatten_only(output: object) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in tree_flatten(output)[0] if torch.is_tensor(t) and t.requires_grad)

    monkeypatch.setattr(_fsdp_state, "collect_grad_tensors", tree_flatten_only)
    overrides = [
        f"output_dir={tmp_path}",
        "distributed.backend=fsdp2",
        "iterations=1",
        f"distributed.mixed_precision={precision}",
    ]
    trainer = Trainer(load_config(MICRO, overrides))
    try:
        metrics = trainer.iteration(0)
    finally:
        trainer.dist.close()
    assert metrics["grad_norm/total"] > 0
