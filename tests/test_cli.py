"""The command line: ``omninft-fast selfcheck`` checks every usable backend against the float64 oracles; no command
overwrites what a user made."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omninft_fast._checks import check_device
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


def test_pretrain_leaves_a_file_beside_its_output_alone(tmp_path: Path) -> None:
    """The weights are written through a fresh temporary file: a user's ``<output>.tmp`` stays as it was."""
    output, mine = tmp_path / "base.safetensors", tmp_path / "base.safetensors.tmp"
    mine.write_text("my notes")
    config = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")
    assert main(["pretrain", "--config", config, "--output", str(output), "--steps", "1", "--batch-size", "2"]) == 0
    assert mine.read_text() == "my notes" and output.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "base.safetensors.tmp"]
    from omninft_fast.train.checkpoint import save_weights

    before = output.read_bytes()
    with pytest.raises(FileExistsError):  # a file that appeared after the command's check is not replaced either
        save_weights(output, torch.nn.Linear(2, 2))
    assert output.read_bytes() == before and len(list(tmp_path.iterdir())) == 2


def test_pretrain_never_overwrites_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "base.safetensors"
    existing.write_bytes(b"weights")
    config = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")
    assert main(["pretrain", "--config", config, "--output", str(existing), "--steps", "1"]) == 2
    assert "exists; choose another --output" in capsys.readouterr().err
    assert existing.read_bytes() == b"weights"


@pytest.mark.skipif(torch.accelerator.is_available(), reason="needs a machine without an accelerator")
@pytest.mark.parametrize("device", ["cuda", "mps", "meta"])
def test_selfcheck_names_an_unavailable_device(capsys: pytest.CaptureFixture[str], device: str) -> None:
    assert main(["selfcheck", "--device", device]) == 2
    assert capsys.readouterr().err == (
        f"selfcheck: --device {device!r} is not available on this machine (it has only a CPU)\n"
    )


def test_generate_names_an_unavailable_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    args = ["generate", "--config", config, "--prompts", str(prompts), "--out", str(tmp_path / "out"), "device=xpu:3"]
    assert main(args) == 2
    assert "generate: device 'xpu:3' is not available on this machine" in capsys.readouterr().err


def test_check_device_on_a_machine_with_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    assert check_device("cuda", "--device") == torch.device("cuda")
    assert check_device("cuda:0", "--device") == torch.device("cuda", 0)
    assert check_device("cpu", "--device") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^--device 'cuda:1' is not available on this machine \(it has 1 cuda\)$"):
        check_device("cuda:1", "--device")
    with pytest.raises(ValueError, match=r"^device 'mps' is not available on this machine \(it has a cuda device, not"):
        check_device("mps", "device")
    with pytest.raises(ValueError, match="^--device must name a torch device such as cpu or cuda:0, got 'gpu0'$"):
        check_device("gpu0", "--device")
