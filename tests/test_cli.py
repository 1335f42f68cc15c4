"""The command line: ``omninft-fast selfcheck`` checks every usable backend against the float64 oracles; no command
overwrites what a user made."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from omninft_fast.cli import main


def test_selfcheck_passes_and_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["selfcheck", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    for op in ("cross_attention", "nft_loss", "group_advantages", "region_weights"):
        assert op in out
    assert "0 failed" in out


def test_module_entry_point_reports_usage() -> None:
    result = subprocess.run([sys.executable, "-m", "omninft_fast", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "selfcheck" in result.stdout


def test_unknown_command_fails() -> None:
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_pretrain_never_overwrites_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "base.safetensors"
    existing.write_bytes(b"weights")
    config = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")
    assert main(["pretrain", "--config", config, "--output", str(existing), "--steps", "1"]) == 2
    assert "exists; choose another --output" in capsys.readouterr().err
    assert existing.read_bytes() == b"weights"
