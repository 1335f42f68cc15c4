"""``omninft-fast analyze``: each analysis writes its PNG and numbers on the micro model; A2V/V2A skips are real."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("ltx_core")

from omninft_fast.analysis import block_ranges, latent_grid
from omninft_fast.cli import main
from omninft_fast.train.builders import build_policy, build_task, load_prompts
from omninft_fast.train.config import load_config
from omninft_fast.train.model import Condition

MICRO = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.txt"
    path.write_text("\n".join(load_prompts(load_config(MICRO, []))[:2]) + "\n")
    return path


def _analyze(name: str, out: Path, prompts: Path, *extra: str) -> int:
    return main(["analyze", name, "--config", MICRO, "--out", str(out), "--prompts", str(prompts), *extra])


def test_conflicts_counts_opposite_signs(tmp_path: Path, prompts: Path) -> None:
    assert _analyze("conflicts", tmp_path, prompts) == 0
    rows = list(csv.DictReader((tmp_path / "conflicts.csv").open()))
    summary = json.loads((tmp_path / "conflicts.json").read_text())
    assert len(rows) == summary["samples"] == 2 * 4
    opposite = sum(float(r["adv_video"]) * float(r["adv_audio"]) < 0 for r in rows) / len(rows)
    assert summary["opposite_share"] == pytest.approx(opposite)
    assert (tmp_path / "conflicts.png").stat().st_size > 0


def test_grad_norms_surgery_only_lowers_the_detached_blocks(tmp_path: Path, prompts: Path) -> None:
    assert _analyze("grad-norms", tmp_path, prompts, "surgery.alpha=1.0") == 0
    rows = json.loads((tmp_path / "grad_norms.json").read_text())["per_block"]
    assert [r["block"] for r in rows] == [0, 1]
    assert all(r["without_surgery"] > 0 for r in rows)
    assert rows[0]["with_surgery"] < rows[0]["without_surgery"]
    assert rows[1]["with_surgery"] == pytest.approx(rows[1]["without_surgery"], rel=1e-6)
    assert (tmp_path / "grad_norms.png").is_file()


def test_kv_blocking_and_v2a_maps_write_their_files(tmp_path: Path, prompts: Path) -> None:
    assert _analyze("kv-blocking", tmp_path / "kv", prompts, "--ranges", "2") == 0
    changes = json.loads((tmp_path / "kv" / "kv_blocking.json").read_text())["changes"]
    assert {(r["skip"], r["blocks"]) for r in changes} == {(k, b) for k in ("a2v", "v2a") for b in ("0-0", "1-1")}
    assert _analyze("v2a-maps", tmp_path / "maps", prompts, "--samples", "1") == 0
    maps = json.loads((tmp_path / "maps" / "v2a_maps.json").read_text())
    assert torch.tensor(maps["scores"]).shape == (1, 8, 3, 3)
    assert (tmp_path / "maps" / "v2a_maps.png").is_file() and (tmp_path / "maps" / "v2a_0.mp4").is_file()
    assert _analyze("v2a-maps", tmp_path / "maps", prompts) == 2


def test_skip_cross_attention_changes_the_other_stream_only_through_that_path() -> None:
    config = load_config(MICRO, [])
    task = build_task(config)
    model = build_policy(config, task)
    spec, gen = task.spec, torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name or "scale_shift" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    xv = torch.randn(2, spec.video_tokens, spec.video_channels, generator=gen)
    xa = torch.randn(2, spec.audio_tokens, spec.audio_channels, generator=gen)
    cond, t = Condition(*task.encode(load_prompts(config)[:2])), torch.full((2,), 0.5)
    base = model(xv, xa, t, cond)
    with model.skip_cross_attention(a2v=[1]):
        a2v = model(xv, xa, t, cond)
    with model.skip_cross_attention(v2a=[1]):
        v2a = model(xv, xa, t, cond)
    assert torch.equal(a2v[1], base[1]) and not torch.equal(a2v[0], base[0])
    assert torch.equal(v2a[0], base[0]) and not torch.equal(v2a[1], base[1])
    assert torch.equal(model(xv, xa, t, cond)[0], base[0])
    with pytest.raises(ValueError, match="outside"), model.skip_cross_attention(a2v=[5]):
        pass


def test_block_ranges_and_latent_grid() -> None:
    assert block_ranges(48, 4) == [(0, 12), (12, 24), (24, 36), (36, 48)]
    assert block_ranges(2, 4) == [(0, 1), (1, 2)]
    config = load_config(MICRO, [])
    assert latent_grid(build_policy(config, build_task(config)).video_positions) == (8, 3, 3)


def test_v2a_maps_never_overwrites_a_sample_video(
    tmp_path: Path, prompts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every ``v2a_<k>.mp4`` it would write is refused up front, before any sampling."""
    out = tmp_path / "maps"
    out.mkdir()
    (out / "v2a_1.mp4").write_text("mine")
    assert _analyze("v2a-maps", out, prompts, "--samples", "3") == 2
    assert capsys.readouterr().err == f"analyze: {out} already holds v2a_1.mp4; choose another folder\n"
    assert sorted(p.name for p in out.iterdir()) == ["v2a_1.mp4"] and (out / "v2a_1.mp4").read_text() == "mine"


@pytest.mark.parametrize(("flag", "name"), [("--samples", "v2a-maps"), ("--ranges", "kv-blocking")])
def test_counts_below_one_are_one_line(
    tmp_path: Path, prompts: Path, capsys: pytest.CaptureFixture[str], flag: str, name: str
) -> None:
    assert _analyze(name, tmp_path / "out", prompts, flag, "0") == 2
    assert capsys.readouterr().err == f"analyze: {flag} must be >= 1, got 0\n"
    assert not (tmp_path / "out").exists()
