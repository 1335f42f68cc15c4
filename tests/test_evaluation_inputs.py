"""``omninft-fast eval`` on bad folders: every problem is one line naming the file, line or id; non-finite scores
never reach the table or the JSON as numbers."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from omninft_fast import evaluation
from omninft_fast.cli import main


def make_folder(root: Path, lines: list[str], *, bom: bool = False) -> Path:
    """Samples "a" and "b" (4 black frames at 4 fps, 0.1 s of silence) and ``prompts.jsonl`` holding ``lines``."""
    root.mkdir()
    for name in ("a", "b"):
        np.save(root / f"{name}.npy", np.zeros((4, 8, 8, 3), dtype=np.uint8))
        evaluation.write_wav(root / f"{name}.wav", torch.zeros(800), 8000)
    (root / "prompts.jsonl").write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return root


A, B = '{"id": "a", "prompt": "rain", "fps": 4}', '{"id": "b", "prompt": "wind", "fps": 4}'


def eval_error(folder: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["eval", str(folder), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eval: ") and err.count("\n") == 1
    return err


def test_duplicate_ids_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_folder(tmp_path / "s", [A, B, A])
    assert f"{folder / 'prompts.jsonl'}:3: id 'a' repeats line 1" in eval_error(folder, capsys)


def test_malformed_lines_are_named_by_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_folder(tmp_path / "s", [A, '{"id": "b", "prompt": '])
    assert f"{folder / 'prompts.jsonl'}:2: not a JSON line" in eval_error(folder, capsys)
    listing = folder / "prompts.jsonl"
    listing.write_text(f"{A}\n[1, 2]\n")
    assert f"{listing}:2: each line needs 'id' and 'prompt'" in eval_error(folder, capsys)


def test_a_utf8_bom_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_folder(tmp_path / "s", [A, B], bom=True)
    assert main(["eval", str(folder)]) == 0
    assert "over 2 samples" in capsys.readouterr().out


def test_ids_cannot_reach_outside_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_folder(tmp_path / "s", [A, '{"id": "../b", "prompt": "x", "fps": 4}'])
    assert "id '../b' must be a file name inside the folder" in eval_error(folder, capsys)


def test_empty_and_unreadable_wavs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_folder(tmp_path / "s", [A, B])
    with wave.open(str(folder / "b.wav"), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(8000)
    assert f"{folder / 'b.wav'}: holds no audio samples" in eval_error(folder, capsys)
    (folder / "b.wav").write_bytes(b"RIFF")
    assert f"{folder / 'b.wav'}: not a readable PCM WAV file" in eval_error(folder, capsys)


def test_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_folder(tmp_path / "s", [A, B])
    assert "--checkpoint expects NAME=VALUE, got 'clap'" in eval_error(folder, capsys, "--checkpoint", "clap")
    assert "unknown rewards ['nope']" in eval_error(folder, capsys, "--checkpoint", f"nope={tmp_path}")
    assert "--device must name a torch device such as cpu or cuda:0, got 'gpu0'" in eval_error(
        folder, capsys, "--device", "gpu0"
    )


def test_non_finite_scores_never_reach_the_table_or_json_as_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_folder(tmp_path / "s", [A, B])

    def build(name: str, **_: object) -> object:
        return lambda batch: {"clap": torch.tensor([0.5, float("nan")])[: len(batch.prompts)]}

    monkeypatch.setattr(evaluation, "build_reward", build)
    monkeypatch.setattr(evaluation, "available_rewards", lambda: ["clap"])
    assert main(["eval", str(folder), "--checkpoint", f"clap={tmp_path}"]) == 0
    assert "| CLAP | not finite on 1 of 2 samples | higher |" in capsys.readouterr().out
    result = json.loads((folder / "results.json").read_text())
    assert result["metrics"]["CLAP"]["value"] is None
    assert result["per_sample"] == {"a": {"clap.clap": 0.5}, "b": {"clap.clap": None}}


def test_results_are_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_folder(tmp_path / "s", [A, B])
    assert main(["eval", str(folder)]) == 0
    first = (folder / "results.json").read_text()
    capsys.readouterr()
    assert f"{folder} already holds results.md, results.json; choose another folder" in eval_error(folder, capsys)
    assert (folder / "results.json").read_text() == first
    other = tmp_path / "second"
    assert main(["eval", str(folder), "--out", str(other)]) == 0
    assert json.loads((other / "results.json").read_text()) == json.loads(first)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("clap=5", "--options clap=... must be a JSON object, got '5'"),
        ("clap={", "--options clap=...: not JSON (Expecting property name enclosed in double quotes)"),
        ('clap={"device": "cpu"}', "--options clap=... cannot set ['device'] (--checkpoint, --device, --dtype and"),
    ],
)
def test_bad_options_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: str, message: str
) -> None:
    folder = make_folder(tmp_path / "s", [A, B])
    assert message in eval_error(folder, capsys, "--options", options)


def test_a_null_fps_falls_back_to_the_flag_and_a_bad_one_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_folder(tmp_path / "s", ['{"id": "a", "prompt": "rain", "fps": null}', B])
    assert main(["eval", str(folder), "--fps", "4", "--out", str(tmp_path / "r")]) == 0
    listing = folder / "prompts.jsonl"
    for bad in ("[8]", "0", "true", '"8"'):
        listing.write_text(f'{{"id": "a", "prompt": "rain", "fps": {bad}}}\n{B}\n')
        assert f"{listing}:1: fps must be a positive number, got " in eval_error(folder, capsys, "--fps", "4")
    assert "--fps must be a positive number, got -1.0" in eval_error(folder, capsys, "--fps", "-1")
