"""The one-shot GPU check runs end to end on the CPU (``--dry-run``: tiny shapes, Triton's interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECTIONS = (
    "environment",
    "tests",
    "attention",
    "nft_loss",
    "ltx2_block",
    "omninft_step",
    "tiles",
    "block_profile",
    "fp8",
    "fp8_compiled",
    "fp8_profile",
    "iteration",
    "distributed",
)


def _env() -> dict:
    return {**os.environ, "TRITON_INTERPRET": "1"}


def test_dry_run_every_section(tmp_path: Path) -> None:
    pytest.importorskip("ltx_core", reason="the LTX-2 sections need ltx-core (the ltx2 extra)")
    out = tmp_path / "check"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--dry-run", "--sections", "all"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert list(results) == list(SECTIONS)
    for name, result in results.items():
        assert result["status"] == "ok", f"{name}: {result.get('traceback', result)}"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = (out / "gpu_check.md").read_text()
    for name in SECTIONS:
        assert f"## {name} (ok" in report
    attention = results["attention"]["rows"]
    assert {row["impl"] for row in attention} >= {"triton", "sdpa-math", "triton fwd + key mass"}
    assert all(row["ms"] > 0 for row in attention)
    assert all(row["max_rel_diff_vs_unpatched"] < 1e-5 for row in results["ltx2_block"]["rows"])
    assert results["omninft_step"]["loss_relative_difference"] < 1e-4
    assert all("error" not in row and row["err_out"] < 1e-5 for row in results["tiles"]["rows"])
    fp8_rows = results["fp8"]["rows"]
    assert sorted({row["batch"] for row in fp8_rows}) == [1, 2]
    assert {row["frozen_linears"] for row in fp8_rows} == {True, False}
    for row in fp8_rows:
        bf16 = row["variant"].startswith("bf16")
        assert row["scaled_mm_per_forward"] == row["fp8_layers"] and (row["fp8_layers"] == 0) == bf16, row
        assert row["velocity_rel_error_vs_bf16"] < 0.15 and (row["velocity_rel_error_vs_bf16"] == 0) == bf16, row
        assert (row["fp8_weight_copies_MiB"] == 0) == bf16, row
    assert {row["recipe"] for row in results["fp8"]["quantize"]} == {"rowwise", "tensorwise"}
    compiled = results["fp8_compiled"]["rows"]
    assert [(row["variant"], row["frozen_linears"]) for row in compiled] == [
        ("bf16, frozen linears", True),
        ("bf16 compiled, frozen linears", True),
        ("fp8 rowwise compiled, frozen linears", True),
        ("bf16", False),
        ("bf16 compiled", False),
        ("fp8 tensorwise compiled", False),
        ("fp8 rowwise compiled", False),
    ]
    for row in compiled:
        fp8_row = row["variant"].startswith("fp8")
        assert (row["velocity_rel_error_vs_bf16"] < 1e-5) != fp8_row and row["velocity_rel_error_vs_bf16"] < 0.15, row
        assert row["rollout_vs_compiled_bf16"] > 0 and row["fwd+bwd_vs_eager_bf16"] > 0 and row["fwd+bwd_ms"] > 0, row
    assert set(results["fp8_compiled"]["profiles"]) == {r["variant"] for r in compiled if "compiled" in r["variant"]}
    assert all(profile["top"] for profile in results["fp8_compiled"]["profiles"].values())
    assert all(results["fp8_profile"][name]["top"] for name in ("bf16", "fp8 rowwise", "fp8 tensorwise"))
    iteration = results["iteration"]
    assert iteration["first_iteration_loss_rel_diff"] < 1e-5 and iteration["speedup"] > 0
    assert 0 < iteration["engine"]["capture_bytes"] < iteration["baseline"]["capture_bytes"]
    engines = results["distributed"]["rows"]
    assert [row["backend"] for row in engines] == ["none", "fsdp2", "deepspeed"]
    assert all(row["iteration_s"] > 0 and row["param_optim_bytes"] > 0 for row in engines)
    assert engines[0]["overhead_vs_none"] == 0.0
    assert all(isinstance(row["within_5_percent"], bool) for row in engines)


def test_shell_entry_and_refusals(tmp_path: Path) -> None:
    """``scripts/gpu_check.sh`` builds the package into a temporary folder and runs; an existing check is kept."""
    out = tmp_path / "check"
    command = ["bash", "scripts/gpu_check.sh", str(out), "--dry-run", "--sections", "environment"]
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "gpu_check.json").read_text())["environment"]["status"] == "ok"
    again = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already holds a GPU check" in again.stderr
    bad = [sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "x"), "--sections", "nope"]
    refused = subprocess.run(bad, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--sections: unknown ['nope']" in refused.stderr


def _check(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "benchmarks/gpu_check.py", "--out", str(out), *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_a_section_left_without_time_is_reported_as_skipped(tmp_path: Path) -> None:
    done = _check(tmp_path / "check", "--dry-run", "--sections", "environment,iteration", "--budget-s", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert [(k, v["status"]) for k, v in results.items()] == [("environment", "skipped"), ("iteration", "skipped")]
    assert (
        "iteration: skipped" in done.stdout
        and "## iteration (skipped" in (tmp_path / "check" / "gpu_check.md").read_text()
    )


def test_the_tests_section_stops_pytest_before_its_deadline_and_keeps_what_ran(tmp_path: Path) -> None:
    """pytest is interrupted 20 s before the section's limit and its report still lists the tests that ran (the
    section as on a GPU, with a test file of its own)."""
    tests = tmp_path / "test_slow.py"
    marker = tmp_path / "slow_started"
    tests.write_text(
        "import time\nfrom pathlib import Path\n\n\ndef test_fast():\n    pass\n\n\n"
        f"def test_slow():\n    Path({str(marker)!r}).touch()\n    time.sleep(120)\n"
    )
    started = time.monotonic()
    done = _check(tmp_path / "check", "--sections", "tests", "--budget-s", "30", "--tests", str(tests), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 60 and marker.exists()
    result = json.loads((tmp_path / "check" / "gpu_check.json").read_text())["tests"]
    assert result["status"] == "ok" and "interrupted" in result
    assert [(row["test"], row["outcome"]) for row in result["tests"]][:1] == [("test_slow::test_fast", "passed")]


def test_a_run_without_the_environment_section_is_titled_with_nvidia_smis_device_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    answers = {
        "found": subprocess.CompletedProcess([], 0, "NVIDIA H100 80GB HBM3\n", ""),
        "failed": subprocess.CompletedProcess([], 9, "", "NVIDIA-SMI has failed"),
    }
    for case, want in (("found", "NVIDIA H100 80GB HBM3"), ("failed", "unknown device")):
        monkeypatch.setattr(gpu_check, "_nvidia_smi", lambda query, case=case: answers[case])
        title = gpu_check._render({"tests": {"status": "skipped"}}, None).splitlines()[0]
        assert title == f"# GPU check: {want}"

    def missing(query: str) -> subprocess.CompletedProcess:
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(gpu_check, "_nvidia_smi", missing)
    assert gpu_check._device_name() == "unknown device"
