"""Torch-only preprocessing for reward models: frame sampling, resizing, resampling, log-mel features, windowing.

Everything here works on batched tensors on any device and needs neither torchvision nor torchaudio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from omninft_fast._checks import check_tensor


def sample_frame_indices(
    num_frames: int, fps: float, *, count: int | None = None, target_fps: float | None = None
) -> torch.Tensor:
    """Indices of frames spread evenly over a clip: the centre of each of ``n`` equal time segments.

    ``n`` is ``count`` when given, else ``round(num_frames * target_fps / fps)`` (at least 1); never more than
    ``num_frames``. Returns ``(n,)`` int64 indices ``floor((i + 0.5) * num_frames / n)``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if (count is None) == (target_fps is None):
        raise ValueError("give exactly one of count and target_fps")
    if count is None:
        if not (target_fps > 0 and fps > 0):
            raise ValueError(f"fps and target_fps must be > 0, got {fps} and {target_fps}")
        count = max(1, round(num_frames * target_fps / fps))
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    count = min(count, num_frames)
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * num_frames / count).floor().long()


def resize(frames: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize ``(N, C, H, W)`` frames to ``size = (h, w)`` with antialiasing; values are clamped to [0, 1]."""
    check_tensor("frames", frames, ndim=4)
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    out = F.interpolate(frames, size=size, mode=mode, align_corners=False, antialias=mode in ("bilinear", "bicubic"))
    return out.clamp(0.0, 1.0)


def resize_shorter_side(frames: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize ``(N, C, H, W)`` frames so the shorter side is ``size``, keeping the aspect ratio (rounded)."""
    h, w = frames.shape[-2:]
    scale = size / min(h, w)
    return resize(frames, (max(size, round(h * scale)), max(size, round(w * scale))), mode)


def center_crop(frames: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Centre crop of ``(..., H, W)`` to ``size`` (``int`` for a square); the top-left offset rounds down."""
    ch, cw = (size, size) if isinstance(size, int) else size
    h, w = frames.shape[-2:]
    if ch > h or cw > w:
        raise ValueError(f"crop size {(ch, cw)} is larger than the frames {(h, w)}")
    top, left = (h - ch) // 2, (w - cw) // 2
    return frames[..., top : top + ch, left : left + cw]


def normalize(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel of ``(N, C, H, W)`` frames."""
    m = torch.tensor(mean, dtype=frames.dtype, device=frames.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=frames.dtype, device=frames.device).view(1, -1, 1, 1)
    return (frames - m) / s


def sinc_resample_kernel(
    orig_sr: int, new_sr: int, *, lowpass_filter_width: int = 6, rolloff: float = 0.99
) -> tuple[torch.Tensor, int, int, int]:
    """Polyphase windowed-sinc filters for ``orig_sr -> new_sr`` (rates reduced by their gcd to ``o -> n``).

    Returns ``(kernels (n, 2 * width + o) float64, width, o, n)``: output phase ``j`` of each block of ``o`` input
    samples is the dot product of ``kernels[j]`` with the input from ``width`` samples before the block. The
    low-pass cut-off is ``rolloff * min(o, n) / 2`` cycles per block (the lower Nyquist rate scaled by ``rolloff``),
    the sinc is Hann-windowed over ``lowpass_filter_width`` zero crossings each side (torchaudio's default
    ``sinc_interp_hann`` design).
    """
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be > 0, got orig_sr={orig_sr}, new_sr={new_sr}")
    if lowpass_filter_width < 1 or not 0 < rolloff <= 1:
        raise ValueError(f"need lowpass_filter_width >= 1 and 0 < rolloff <= 1, got {lowpass_filter_width}, {rolloff}")
    gcd = math.gcd(orig_sr, new_sr)
    o, n = orig_sr // gcd, new_sr // gcd
    base = min(o, n) * rolloff
    width = math.ceil(lowpass_filter_width * o / base)
    taps = torch.arange(-width, width + o, dtype=torch.float64) / o
    t = (torch.arange(0, -n, -1, dtype=torch.float64)[:, None] / n + taps[None, :]) * base
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * (math.pi / lowpass_filter_width / 2)).square()
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    return sinc * window * (base / o), width, o, n


def resample(audio: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited polyphase windowed-sinc resampling of ``(B, S)`` waveforms (see ``sinc_resample_kernel``).

    Returns ``(B, ceil(S * new_sr / orig_sr))`` in ``audio``'s dtype; the signal is zero beyond its ends. This is
    the design of torchaudio's ``functional.resample`` defaults, written in torch (torchaudio is not a dependency).
    Computes in float64 for float64 input, else in float32.
    """
    check_tensor("audio", audio, ndim=2)
    kernels, width, o, n = sinc_resample_kernel(orig_sr, new_sr)
    if o == n:
        return audio
    length = audio.shape[-1]
    dtype = torch.float64 if audio.dtype == torch.float64 else torch.float32
    x = F.pad(audio.to(dtype), (width, width + o))[:, None]
    out = F.conv1d(x, kernels.to(x.device, dtype)[:, None], stride=o)  # (B, n, blocks)
    out = out.transpose(1, 2).reshape(audio.shape[0], -1)
    return out[:, : math.ceil(n * length / o)].to(audio.dtype)


def hz_to_mel(hz: torch.Tensor, scale: str = "htk") -> torch.Tensor:
    """Hertz to mels: ``htk`` is ``2595 log10(1 + f / 700)``; ``slaney`` is linear below 1 kHz, log above."""
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + hz / 700.0)
    if scale == "slaney":
        linear = hz * 3.0 / 200.0
        log = 15.0 + torch.log(hz.clamp_min(1e-10) / 1000.0) * (27.0 / math.log(6.4))
        return torch.where(hz >= 1000.0, log, linear)
    raise ValueError(f"scale must be 'htk' or 'slaney', got {scale!r}")


def mel_to_hz(mel: torch.Tensor, scale: str = "htk") -> torch.Tensor:
    """Inverse of ``hz_to_mel``."""
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    if scale == "slaney":
        linear = mel * 200.0 / 3.0
        log = 1000.0 * torch.exp((mel - 15.0) * (math.log(6.4) / 27.0))
        return torch.where(mel >= 15.0, log, linear)
    raise ValueError(f"scale must be 'htk' or 'slaney', got {scale!r}")


def mel_filterbank(
    n_freqs: int,
    n_mels: int,
    sample_rate: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    *,
    scale: str = "htk",
    norm: str | None = None,
) -> torch.Tensor:
    """Triangular mel filters, ``(n_freqs, n_mels)`` float64, for a one-sided spectrum of ``n_freqs`` bins.

    Filter ``m`` rises linearly from mel point ``m`` to ``m + 1`` and falls to ``m + 2``, with ``n_mels + 2``
    points evenly spaced in mels between ``f_min`` and ``f_max`` (default Nyquist). ``norm="slaney"`` scales each
    filter to unit area (``2 / (f[m + 2] - f[m])``).
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}")
    freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)
    lo, hi = hz_to_mel(torch.tensor([f_min, f_max], dtype=torch.float64), scale)
    points = mel_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2, dtype=torch.float64), scale)
    rise = (freqs[:, None] - points[None, :-2]) / (points[1:-1] - points[:-2])
    fall = (points[None, 2:] - freqs[:, None]) / (points[2:] - points[1:-1])
    filters = torch.minimum(rise, fall).clamp_min(0.0)
    if norm == "slaney":
        filters = filters * (2.0 / (points[2:] - points[:-2]))
    elif norm is not None:
        raise ValueError(f"norm must be None or 'slaney', got {norm!r}")
    return filters


def power_spectrogram(
    audio: torch.Tensor, n_fft: int, hop_length: int, win_length: int | None = None, *, center: bool = True
) -> torch.Tensor:
    """``|STFT|^2`` of ``(B, S)`` waveforms with a periodic Hann window: ``(B, n_fft // 2 + 1, frames)``.

    With ``center`` the signal is reflect-padded by ``n_fft // 2`` on both sides, so there are
    ``S // hop_length + 1`` frames.
    """
    check_tensor("audio", audio, ndim=2)
    win_length = n_fft if win_length is None else win_length
    window = torch.hann_window(win_length, periodic=True, dtype=audio.dtype, device=audio.device)
    spec = torch.stft(
        audio, n_fft, hop_length, win_length, window, center=center, pad_mode="reflect", return_complex=True
    )
    return spec.abs().square()


def log_mel_spectrogram(
    audio: torch.Tensor,
    sample_rate: int,
    *,
    n_fft: int,
    hop_length: int,
    n_mels: int,
    win_length: int | None = None,
    f_min: float = 0.0,
    f_max: float | None = None,
    scale: str = "htk",
    norm: str | None = None,
    log: str = "natural",
    eps: float = 1e-6,
    center: bool = True,
) -> torch.Tensor:
    """Log-mel features ``(B, n_mels, frames)`` of ``(B, S)`` waveforms.

    ``log="natural"`` gives ``ln(mel + eps)``; ``log="db"`` gives ``10 log10(max(mel, 1e-10))``.
    """
    power = power_spectrogram(audio, n_fft, hop_length, win_length, center=center)
    filters = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max, scale=scale, norm=norm)
    mel = torch.einsum("bft,fm->bmt", power, filters.to(power))
    if log == "natural":
        return torch.log(mel + eps)
    if log == "db":
        return 10.0 * torch.log10(mel.clamp_min(1e-10))
    raise ValueError(f"log must be 'natural' or 'db', got {log!r}")


def split_windows(audio: torch.Tensor, window: int, hop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut ``(B, S)`` waveforms into windows of ``window`` samples every ``hop`` samples, zero-padding the last.

    Returns ``(windows (B, n, window), mask (B, n, window) bool of real samples, weights (B, n))`` with
    ``n = ceil(S / hop)`` and ``weights`` the fraction of real samples in each window.
    """
    check_tensor("audio", audio, ndim=2)
    if window < 1 or hop < 1:
        raise ValueError(f"window and hop must be >= 1, got window={window}, hop={hop}")
    length = audio.shape[-1]
    count = max(1, math.ceil(length / hop))
    padded = F.pad(audio, (0, (count - 1) * hop + window - length))
    windows = padded.unfold(-1, window, hop)[:, :count]
    position = torch.arange(count, device=audio.device)[:, None] * hop + torch.arange(window, device=audio.device)
    mask = (position < length).expand(audio.shape[0], count, window)
    weights = mask[0].sum(-1).to(audio.dtype).div(window).expand(audio.shape[0], count)
    return windows, mask, weights


def kaldi_fbank(
    audio: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int,
    *,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    low_freq: float = 20.0,
    preemphasis: float = 0.97,
) -> torch.Tensor:
    """Kaldi-style log mel filterbank of ``(B, S)`` waveforms: ``(B, frames, num_mel_bins)``.

    Frames of ``frame_length_ms`` every ``frame_shift_ms`` (no edge padding, ``1 + (S - L) // shift`` frames);
    each frame has its mean removed, is pre-emphasised (``x[i] - p x[i - 1]``, ``x[-1] = x[0]``), windowed by a
    symmetric Hann window and zero-padded to a power of two; the power spectrum goes through triangular filters
    evenly spaced on the ``1127 ln(1 + f / 700)`` mel scale from ``low_freq`` to Nyquist (the Nyquist bin gets no
    weight), and the log is floored at float32 epsilon.
    """
    check_tensor("audio", audio, ndim=2)
    length = round(sample_rate * frame_length_ms / 1000)
    shift = round(sample_rate * frame_shift_ms / 1000)
    if audio.shape[-1] < length:
        raise ValueError(f"audio has {audio.shape[-1]} samples, fewer than one {length}-sample frame")
    frames = audio.unfold(-1, length, shift)  # (B, n, L)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = (frames - preemphasis * previous) * torch.hann_window(
        length, periodic=False, dtype=frames.dtype, device=frames.device
    )
    n_fft = 1 << (length - 1).bit_length()
    power = torch.fft.rfft(frames, n=n_fft).abs().square()  # (B, n, n_fft // 2 + 1)

    def mel(hz: torch.Tensor) -> torch.Tensor:
        return 1127.0 * torch.log1p(hz / 700.0)

    nyquist = sample_rate / 2
    lo, hi = mel(torch.tensor(low_freq, dtype=torch.float64)), mel(torch.tensor(nyquist, dtype=torch.float64))
    delta = (hi - lo) / (num_mel_bins + 1)
    left = lo + delta * torch.arange(num_mel_bins, dtype=torch.float64)
    bins = mel(torch.arange(n_fft // 2, dtype=torch.float64) * sample_rate / n_fft)[:, None]
    up = (bins - left) / delta
    down = (left + 2 * delta - bins) / delta
    filters = torch.minimum(up, down).clamp_min(0.0)
    filters = torch.cat([filters, filters.new_zeros(1, num_mel_bins)])  # the Nyquist bin
    energies = power @ filters.to(power)
    return energies.clamp_min(torch.finfo(torch.float32).eps).log()
