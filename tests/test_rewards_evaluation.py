"""The JavisBench-style evaluation command on a tiny generated folder, and its file readers."""

from __future__ import annotations

import json
import os
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="transformers is not installed (requirements/rewards.txt)")
pytest.importorskip("audiobox_aesthetics", reason="audiobox-aesthetics is not installed (requirements/rewards.txt)")

from fixtures import tiny

from omninft_fast import evaluation


def _raw_wav(path: Path, width: int, channels: int, frames: bytes, rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(frames)


def test_read_wav_decodes_each_width_by_hand(tmp_path: Path) -> None:
    _raw_wav(tmp_path / "a.wav", 2, 1, np.array([0, 16384, -32768], dtype="<i2").tobytes())
    audio, rate = evaluation.read_wav(tmp_path / "a.wav")
    assert rate == 8000
    torch.testing.assert_close(audio, torch.tensor([0.0, 0.5, -1.0]))
    _raw_wav(tmp_path / "b.wav", 1, 2, bytes([128, 192, 0, 0]))  # stereo 8-bit: (0, 0.5), (-1, -1)
    torch.testing.assert_close(evaluation.read_wav(tmp_path / "b.wav")[0], torch.tensor([0.25, -1.0]))
    _raw_wav(tmp_path / "c.wav", 3, 1, bytes([0, 0, 0x40, 0, 0, 0xC0]))  # 24-bit: 0.5, -0.5
    torch.testing.assert_close(evaluation.read_wav(tmp_path / "c.wav")[0], torch.tensor([0.5, -0.5]))


def test_write_then_read_wav_round_trips(tmp_path: Path) -> None:
    audio = torch.linspace(-0.9, 0.9, 101)
    evaluation.write_wav(tmp_path / "x.wav", audio, 16000)
    back, rate = evaluation.read_wav(tmp_path / "x.wav")
    assert rate == 16000
    torch.testing.assert_close(back, audio, atol=0.5 / 32768, rtol=0)


def make_folder(root: Path) -> Path:
    """Three samples, one per video format: .npy, animated .gif, folder of PNGs."""
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    lines = [
        {"id": "a", "prompt": "a dog barks", "fps": 4},
        {"id": "b", "prompt": "rain on a roof", "audio_prompt": "heavy rain"},
        {"id": "c", "prompt": "a violin plays", "fps": 4},
    ]
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    frames = rng.integers(0, 256, size=(3, 4, 40, 48, 3), dtype=np.uint8)
    np.save(root / "a.npy", frames[0])
    images = [Image.fromarray(f) for f in frames[1]]
    images[0].save(root / "b.gif", save_all=True, append_images=images[1:], duration=250, loop=0)
    (root / "c").mkdir()
    for i, f in enumerate(frames[2]):
        Image.fromarray(f).save(root / "c" / f"{i:03d}.png")
    for sample in "abc":
        evaluation.write_wav(root / f"{sample}.wav", torch.from_numpy(rng.uniform(-0.5, 0.5, 4000)).float(), 8000)
    return root


def test_load_samples_reads_every_format(tmp_path: Path) -> None:
    samples = evaluation.load_samples(make_folder(tmp_path / "s"))
    assert [s.id for s in samples] == ["a", "b", "c"]
    for s in samples:
        assert s.video.shape == (4, 3, 40, 48) and s.fps == 4.0 and s.sample_rate == 8000
        assert float(s.video.min()) >= 0.0 and float(s.video.max()) <= 1.0
    assert samples[1].audio_prompt == "heavy rain"
    np.testing.assert_allclose(samples[0].video.permute(0, 2, 3, 1).numpy() * 255, np.load(tmp_path / "s" / "a.npy"))


def test_load_samples_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prompts.jsonl"):
        evaluation.load_samples(tmp_path)
    folder = make_folder(tmp_path / "s")
    (folder / "a.npy").unlink()
    with pytest.raises(FileNotFoundError, match="no video for sample 'a'"):
        evaluation.load_samples(folder)


def test_eval_command_writes_markdown_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_folder(tmp_path / "samples")
    clip = tiny.write_clip(tmp_path / "clip")
    box = tiny.write_audiobox(tmp_path / "audiobox")
    sync = tiny.write_synchformer(tmp_path / "synchformer")
    out = tmp_path / "out"
    code = evaluation.main(
        [
            str(folder),
            "--checkpoint",
            f"clip_score={clip}",
            "--checkpoint",
            f"audiobox={box}",
            "--checkpoint",
            f"synchformer={sync}",
            "--options",
            'audiobox={"window_s": 0.25}',
            "--out",
            str(out),
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    metrics = result["metrics"]
    assert result["samples"] == 3
    assert metrics["CLIP"]["status"] == "ok" and np.isfinite(metrics["CLIP"]["value"])
    assert metrics["AQ"]["status"] == "ok" and np.isfinite(metrics["AQ"]["value"])
    for name in ("VQ", "CLAP", "TV-IB", "AVHScore", "JavisScore"):
        assert metrics[name] == {"value": None, "status": "not configured", "source": metrics[name]["source"]}
    per_sample = result["per_sample"]
    expected = sum(per_sample[s]["clip_score.clip_score"] for s in "abc") / 3
    assert metrics["CLIP"]["value"] == pytest.approx(expected)
    desync = -sum(per_sample[s]["synchformer.neg_desync"] for s in "abc") / 3
    assert metrics["DeSync"]["status"] == "ok" and metrics["DeSync"]["higher_is_better"] is False
    assert metrics["DeSync"]["value"] == pytest.approx(desync) and 0 <= desync <= 2
    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert f"| DeSync | {desync:.4f} | lower |" in markdown and "| CLAP | not configured |" in markdown
    assert markdown in capsys.readouterr().out


def test_eval_command_rejects_unknown_rewards(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "samples")
    with pytest.raises(ValueError, match="unknown rewards \\['nope'\\]"):
        evaluation.main([str(folder), "--checkpoint", f"nope={tmp_path}"])
    with pytest.raises(SystemExit, match="--checkpoint expects NAME=VALUE"):
        evaluation.main([str(folder), "--checkpoint", "clap"])
