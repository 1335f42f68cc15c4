"""``omninft-fast merge-lora``: the merged base-layout weights give the LoRA model's velocities."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("ltx_core")
pytest.importorskip("peft")

from omninft_fast.cli import main
from omninft_fast.train.builders import build_policy, build_task, load_prompts
from omninft_fast.train.checkpoint import load_weights
from omninft_fast.train.config import load_config
from omninft_fast.train.model import Condition
from omninft_fast.train.trainer import Trainer

MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")


def test_merged_weights_reproduce_the_lora_velocities(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    lora = ["finetune.mode=lora", "finetune.lora_rank=4"]
    trainer = Trainer(load_config(MICRO, [f"output_dir={run}", *lora]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.policies.adapters.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    trainer.save(0)
    out = tmp_path / "merged.safetensors"
    assert main(["merge-lora", "--run", str(run), "--out", str(out)]) == 0
    config = load_config(MICRO, [])
    task = build_task(config)
    merged = build_policy(config, task)
    load_weights(out, merged.model)
    spec = task.spec
    xv = torch.randn(2, spec.video_tokens, spec.video_channels, generator=gen)
    xa = torch.randn(2, spec.audio_tokens, spec.audio_channels, generator=gen)
    cond, t = Condition(*task.encode(load_prompts(config)[:2])), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        expected = trainer.policy(xv, xa, t, cond)
        got = merged(xv, xa, t, cond)
        base = build_policy(config, task)(xv, xa, t, cond)
    for e, g, b in zip(expected, got, base, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(b, e, rtol=1e-5, atol=1e-6)
    before = out.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors", "run"]
    capsys.readouterr()
    assert main(["merge-lora", "--run", str(run), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before


def test_a_full_run_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    Trainer(load_config(MICRO, [f"output_dir={run}"])).save(0)
    assert main(["merge-lora", "--run", str(run), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "finetune.mode=full" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_a_file_beside_the_output_is_never_touched(tmp_path: Path) -> None:
    """The merged weights are written through a fresh temporary file: a user's ``<out>.tmp`` stays as it was."""
    run = tmp_path / "run"
    Trainer(load_config(MICRO, [f"output_dir={run}", "finetune.mode=lora", "finetune.lora_rank=4"])).save(0)
    out, mine = tmp_path / "merged.safetensors", tmp_path / "merged.safetensors.tmp"
    mine.write_text("my notes")
    assert main(["merge-lora", "--run", str(run), "--out", str(out)]) == 0
    assert mine.read_text() == "my notes" and out.stat().st_size > 0
