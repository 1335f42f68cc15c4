"""Torch-only reward preprocessing against hand-computed cases and the transformers numpy reference."""

from __future__ import annotations

import math

import pytest
import torch

from omninft_fast.rewards import preprocess as pp


def test_sample_frame_indices_segment_centres() -> None:
    assert pp.sample_frame_indices(10, 24.0, count=5).tolist() == [1, 3, 5, 7, 9]
    assert pp.sample_frame_indices(48, 24.0, target_fps=2.0).tolist() == [6, 18, 30, 42]
    assert pp.sample_frame_indices(3, 24.0, count=8).tolist() == [0, 1, 2]
    assert pp.sample_frame_indices(7, 24.0, count=1).tolist() == [3]


def test_sample_frame_indices_errors() -> None:
    with pytest.raises(ValueError, match="num_frames"):
        pp.sample_frame_indices(0, 24.0, count=2)
    with pytest.raises(ValueError, match="exactly one of count and target_fps"):
        pp.sample_frame_indices(4, 24.0)


def test_resize_keeps_constant_frames_and_shapes() -> None:
    frames = torch.full((2, 3, 20, 30), 0.25)
    out = pp.resize_shorter_side(frames, 10)
    assert out.shape == (2, 3, 10, 15)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))
    assert pp.resize(frames, (7, 9), mode="bilinear").shape == (2, 3, 7, 9)
    with pytest.raises(ValueError, match="frames must have 4 dimensions"):
        pp.resize(frames[0], (4, 4))


def test_center_crop_and_normalize_by_hand() -> None:
    image = torch.arange(30.0).reshape(1, 1, 5, 6)
    torch.testing.assert_close(pp.center_crop(image, 3), image[..., 1:4, 1:4])
    torch.testing.assert_close(pp.center_crop(image, (2, 4)), image[..., 1:3, 1:5])
    with pytest.raises(ValueError, match="larger than the frames"):
        pp.center_crop(image, 6)
    frames = torch.tensor([0.5, 0.2]).view(1, 2, 1, 1)
    torch.testing.assert_close(pp.normalize(frames, [0.25, 0.2], [0.5, 0.1]), torch.tensor([0.5, 0.0]).view(1, 2, 1, 1))


@pytest.mark.parametrize(("orig", "new"), [(800, 400), (800, 1200), (800, 800), (1000, 640)])
def test_resample_band_limited_sine_away_from_the_ends(orig: int, new: int) -> None:
    def sine(rate: int) -> torch.Tensor:
        t = torch.arange(rate, dtype=torch.float64) / rate
        return (0.6 * torch.sin(2 * math.pi * 50 * t + 0.3) + 0.2 * torch.cos(2 * math.pi * 120 * t))[None]

    out = pp.resample(sine(orig), orig, new)
    assert out.shape == (1, new)
    if orig == new:
        assert torch.equal(out, sine(orig))
    edge = new // 20  # the windowed sinc sees zeros beyond the ends
    torch.testing.assert_close(out[:, edge:-edge], sine(new)[:, edge:-edge], atol=3e-3, rtol=0)


def test_resample_kernel_is_a_unit_gain_low_pass() -> None:
    kernels, width, o, n = pp.sinc_resample_kernel(48000, 16000)
    assert (o, n) == (3, 1) and kernels.shape == (1, 2 * width + 3)
    torch.testing.assert_close(kernels.sum(), torch.tensor(1.0, dtype=torch.float64), atol=2e-3, rtol=0)


def test_resample_errors() -> None:
    with pytest.raises(ValueError, match="sample rates"):
        pp.resample(torch.zeros(1, 8), 0, 16)
    with pytest.raises(ValueError, match="audio must have 2 dimensions"):
        pp.resample(torch.zeros(8), 8, 16)


def test_mel_scales_by_hand() -> None:
    hz = torch.tensor([0.0, 700.0, 1000.0, 6400.0], dtype=torch.float64)
    torch.testing.assert_close(pp.hz_to_mel(hz, "htk")[1], torch.tensor(2595 * math.log10(2), dtype=torch.float64))
    torch.testing.assert_close(pp.hz_to_mel(hz, "slaney")[2:], torch.tensor([15.0, 42.0], dtype=torch.float64))
    for scale in ("htk", "slaney"):
        torch.testing.assert_close(pp.mel_to_hz(pp.hz_to_mel(hz, scale), scale), hz)
    with pytest.raises(ValueError, match="scale"):
        pp.hz_to_mel(hz, "bark")


@pytest.mark.parametrize(("scale", "norm"), [("htk", None), ("slaney", "slaney")])
def test_mel_filterbank_matches_transformers(scale: str, norm: str | None) -> None:
    audio_utils = pytest.importorskip("transformers.audio_utils", reason="transformers is not installed")
    ours = pp.mel_filterbank(257, 40, 16000, 50.0, 7600.0, scale=scale, norm=norm)
    theirs = audio_utils.mel_filter_bank(
        num_frequency_bins=257,
        num_mel_filters=40,
        min_frequency=50.0,
        max_frequency=7600.0,
        sampling_rate=16000,
        norm=norm,
        mel_scale=scale,
    )
    torch.testing.assert_close(ours, torch.from_numpy(theirs), atol=1e-10, rtol=1e-7)


def test_power_spectrogram_peaks_at_the_tone_bin() -> None:
    rate, n_fft, hop = 1000, 100, 25
    t = torch.arange(400, dtype=torch.float64) / rate
    power = pp.power_spectrogram(torch.sin(2 * math.pi * 100 * t)[None], n_fft, hop)
    assert power.shape == (1, n_fft // 2 + 1, 400 // hop + 1)
    assert (power[0, :, 4:-4].argmax(dim=0) == 10).all()


def test_log_mel_spectrogram_is_log_of_filtered_power() -> None:
    audio = torch.sin(torch.arange(800, dtype=torch.float64) * 0.3)[None]
    out = pp.log_mel_spectrogram(audio, 8000, n_fft=64, hop_length=16, n_mels=8, eps=1e-6)
    power = pp.power_spectrogram(audio, 64, 16)
    expected = torch.log(torch.einsum("bft,fm->bmt", power, pp.mel_filterbank(33, 8, 8000)) + 1e-6)
    torch.testing.assert_close(out, expected)
    db = pp.log_mel_spectrogram(audio, 8000, n_fft=64, hop_length=16, n_mels=8, log="db")
    torch.testing.assert_close(db, 10 * torch.log10(torch.exp(expected) - 1e-6).clamp_min(-100.0))


def test_split_windows_pads_masks_and_weights() -> None:
    audio = torch.arange(1.0, 11.0).repeat(2, 1)
    windows, mask, weights = pp.split_windows(audio, 4, 4)
    assert windows.shape == (2, 3, 4)
    torch.testing.assert_close(windows[0, 2], torch.tensor([9.0, 10.0, 0.0, 0.0]))
    assert mask[1, 2].tolist() == [True, True, False, False]
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.0, 0.5], [1.0, 1.0, 0.5]]))
    overlap, _, w = pp.split_windows(audio[:, :6], 4, 2)
    torch.testing.assert_close(overlap[0, 1], torch.tensor([3.0, 4.0, 5.0, 6.0]))
    torch.testing.assert_close(w[0], torch.tensor([1.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="window and hop"):
        pp.split_windows(audio, 0, 1)


def _fbank_loops(wave: list[float], rate: int, bins: int) -> torch.Tensor:
    """Kaldi filterbank written out frame by frame in float64 (the reference for ``kaldi_fbank``)."""
    length, shift = rate * 25 // 1000, rate * 10 // 1000
    n_fft = 1
    while n_fft < length:
        n_fft *= 2

    def mel(f: float) -> float:
        return 1127.0 * math.log(1.0 + f / 700.0)

    lo, hi = mel(20.0), mel(rate / 2)
    delta = (hi - lo) / (bins + 1)
    rows = []
    for start in range(0, len(wave) - length + 1, shift):
        frame = wave[start : start + length]
        mean = sum(frame) / length
        frame = [x - mean for x in frame]
        frame = [frame[i] - 0.97 * frame[max(i - 1, 0)] for i in range(length)]
        frame = [x * (0.5 - 0.5 * math.cos(2 * math.pi * i / (length - 1))) for i, x in enumerate(frame)]
        spectrum = torch.fft.rfft(torch.tensor(frame + [0.0] * (n_fft - length), dtype=torch.float64))
        power = spectrum.abs().square().tolist()
        row = []
        for m in range(bins):
            left, centre, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
            total = 0.0
            for k in range(n_fft // 2):
                f = mel(k * rate / n_fft)
                weight = max(0.0, min((f - left) / (centre - left), (right - f) / (right - centre)))
                total += weight * power[k]
            row.append(math.log(max(total, 1.1920928955078125e-07)))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def test_kaldi_fbank_matches_a_frame_by_frame_reference(gen: torch.Generator) -> None:
    rate = 8000
    audio = torch.rand(2, 1000, generator=gen, dtype=torch.float64) * 2 - 1
    out = pp.kaldi_fbank(audio, rate, 10)
    assert out.shape == (2, 1 + (1000 - 200) // 80, 10)
    for b in range(2):
        torch.testing.assert_close(out[b], _fbank_loops(audio[b].tolist(), rate, 10), rtol=1e-9, atol=1e-9)


def test_kaldi_fbank_silence_and_tone() -> None:
    rate = 16000
    silent = pp.kaldi_fbank(torch.full((1, 1600), 0.3, dtype=torch.float64), rate, 16)
    torch.testing.assert_close(silent, torch.full_like(silent, math.log(torch.finfo(torch.float32).eps)))
    t = torch.arange(4000, dtype=torch.float64) / rate
    tone = pp.kaldi_fbank(torch.sin(2 * math.pi * 1000 * t)[None], rate, 40)
    lo, hi = 1127 * math.log1p(20 / 700), 1127 * math.log1p(8000 / 700)
    delta = (hi - lo) / 41
    expected = round((1127 * math.log1p(1000 / 700) - lo) / delta) - 1
    assert (tone[0].argmax(dim=-1) == expected).all()
    with pytest.raises(ValueError, match="fewer than one 400-sample frame"):
        pp.kaldi_fbank(torch.zeros(1, 100), rate, 8)
