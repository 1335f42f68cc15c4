"""Sample files: mp4 (H.264 + AAC) + WAV + index, read back by the evaluation."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from omninft_fast import evaluation, media

av = pytest.importorskip("av")


def test_mp4_holds_h264_video_and_aac_audio_at_an_even_size(tmp_path: Path) -> None:
    frames = torch.full((5, 3, 5, 7), 0.5)
    audio = 0.5 * torch.sin(torch.arange(8000) / 5.0)
    media.write_mp4(tmp_path / "a.mp4", frames, 8.0, audio, 8000, min_side=9)
    with av.open(str(tmp_path / "a.mp4")) as container:
        assert [s.codec_context.name for s in container.streams] == ["h264", "aac"]
        assert sum(f.samples for f in container.decode(container.streams.audio[0])) >= 8000
    video, fps = media.read_mp4(tmp_path / "a.mp4")
    assert fps == 8.0 and video.shape == (5, 3, 10, 14)
    assert (video - 0.5).abs().max() < 0.02


def test_audio_at_a_rate_aac_lacks_is_resampled(tmp_path: Path) -> None:
    media.write_mp4(tmp_path / "a.mp4", torch.rand(2, 3, 4, 4), 8.0, torch.rand(400) - 0.5, 400)
    with av.open(str(tmp_path / "a.mp4")) as container:
        stream = container.streams.audio[0]
        assert stream.rate == 7350
        assert sum(f.samples for f in container.decode(stream)) >= 7350
    assert media.aac_rate(16000) == 16000 and media.aac_rate(22000) == 22050 and media.aac_rate(192000) == 96000


def test_display_size_upscales_small_frames_and_keeps_large_ones() -> None:
    assert media.display_size(6, 6) == (11, 66, 66)
    assert media.display_size(512, 767) == (1, 512, 768)


def test_sample_folder_is_what_eval_reads_and_is_never_overwritten(tmp_path: Path) -> None:
    frames, audio = torch.rand(2, 3, 3, 6, 6), torch.rand(2, 800) - 0.5
    media.write_sample_folder(tmp_path, ["0000", "0001"], ["a", "b"], frames, audio, fps=8.0, sample_rate=8000)
    index = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert [(e["id"], e["prompt"], e["fps"]) for e in index] == [("0000", "a", 8.0), ("0001", "b", 8.0)]
    samples = evaluation.load_samples(tmp_path)
    assert [s.video.shape[0] for s in samples] == [3, 3] and samples[0].fps == 8.0
    torch.testing.assert_close(samples[1].audio, audio[1], atol=1e-4, rtol=0)
    before = (tmp_path / "0000.mp4").read_bytes()
    with pytest.raises(FileExistsError, match="already holds 0000.mp4"):
        media.write_sample_folder(tmp_path, ["0000"], ["c"], frames[:1], audio[:1], fps=8.0, sample_rate=8000)
    assert (tmp_path / "0000.mp4").read_bytes() == before
    with pytest.raises(NotADirectoryError, match=r"^\S+/0000.mp4 is a file, not a folder; choose another folder$"):
        media.write_sample_folder(
            tmp_path / "0000.mp4", ["0002"], ["c"], frames[:1], audio[:1], fps=8.0, sample_rate=8000
        )
    assert (tmp_path / "0000.mp4").read_bytes() == before


def test_missing_pyav_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(media.MissingDependency, match="needs PyAV: pip install av"):
        media.write_mp4(tmp_path / "a.mp4", torch.rand(1, 3, 2, 2), 8.0)


def test_write_new_never_replaces_a_file_and_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "weights.bin"
    old = os.umask(0o027)
    try:
        assert media.write_new(path, lambda tmp: tmp.write_bytes(b"first")) == path
    finally:
        os.umask(old)
    assert path.read_bytes() == b"first" and path.stat().st_mode & 0o777 == 0o640  # the umask's, not owner-only
    with pytest.raises(FileExistsError, match=r"weights.bin exists; choose another --out \(nothing is overwritten\)$"):
        media.write_new(path, lambda tmp: tmp.write_bytes(b"second"), hint="; choose another --out")
    assert path.read_bytes() == b"first"

    def fails(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        media.write_new(tmp_path / "other.bin", fails)
    assert sorted(p.name for p in path.parent.iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_write_new_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without hard links: a rename after the check, still never over an existing file."""

    def no_links(*_: object) -> None:
        raise PermissionError("Operation not permitted")

    monkeypatch.setattr(media.os, "link", no_links)
    path = tmp_path / "w.bin"
    media.write_new(path, lambda tmp: tmp.write_bytes(b"one"))
    with pytest.raises(FileExistsError, match="w.bin exists"):
        media.write_new(path, lambda tmp: tmp.write_bytes(b"two"))
    assert path.read_bytes() == b"one" and sorted(p.name for p in tmp_path.iterdir()) == ["w.bin"]
