"""A synthetic text-to-audio-video task generated in code: a flashing coloured square with a beeping tone.

Prompts name three attributes, e.g. ``"a red square flashing fast with a low tone"``:

- colour (red, green, blue) of the square in the centre of the frame,
- rhythm (slow: 2 flashes, fast: 4 flashes per clip),
- pitch (low 220 Hz, mid 440 Hz, high 880 Hz) of a tone that beeps with the flashes.

Latents use ltx-core's token layout: video ``(B, F*H*W, Cv)`` (frame-major), audio ``(B, Na, Ca)`` with
``Na = 2 F`` (two audio tokens per video frame). A fixed decoder (no parameters to learn) turns them into frames
``(B, F, 3, H*p, W*p)`` in [0, 1] and a waveform ``(B, S)`` in [-1, 1]:

- video channels 0-2 are the red/green/blue drive of each ``p x p`` patch (``sigmoid(2 z)``), channels ``3..Cv-1``
  add fixed zero-mean textures;
- audio channel ``k`` is the amplitude (``relu(z)``) of a sinusoid at ``AUDIO_FREQS[k]``, interpolated between
  token centres.

The pre-training data are noisy the way web captions are: each attribute matches the prompt only with probability
``label_accuracy`` (a wrong colour, a wrong pitch, or audio beats shifted by an odd number of frames against
the flashes otherwise), so the
pre-trained policy is a mixture that the rewards can sharpen.

Two options (off by default) make the task exercise OmniNFT's mechanisms (``configs/cpu_ablation.yaml``):

- ``conflict_fraction``: on that share of the prompts (``conflict_prompts``) the data get exactly one of colour and
  pitch right (each half the time): video and audio rewards anti-correlated in the data, where a shared advantage
  would cancel what a routed one keeps (a policy shows it only if it learns to couple the two streams' choices).
- ``beacon``: the square glows steadily, and the rhythm is carried by a one-token white beacon that moves one step
  per frame clockwise around the border tokens (``beacon_path``); the audio beeps with the beacon, and
  ``synthetic_sync`` with ``region: beacon`` reads only the beacon's tokens (a small moving region for Eq 10-11's
  reweighting to find).
- ``sync_noise``: which stream's beats a mis-synced sample shifts, ``audio`` (default) or ``video`` (then the flashes
  are off the prompted beats and the audio is on them, so fixing sync is the video's job).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

COLOURS = ("red", "green", "blue")
RHYTHMS = ("slow", "fast")
PITCHES = ("low", "mid", "high")
PITCH_HZ = {"low": 220.0, "mid": 440.0, "high": 880.0}
AUDIO_FREQS = (150.0, 220.0, 300.0, 440.0, 600.0, 880.0, 1200.0, 1760.0)
BEAT_FRAMES = {"slow": (0, 4), "fast": (0, 2, 4, 6)}
_PROMPT = re.compile(r"^a (\w+) square flashing (\w+) with a (\w+) tone$")


@dataclass(frozen=True)
class Prompt:
    """The three attributes of one prompt."""

    colour: str
    rhythm: str
    pitch: str

    @property
    def text(self) -> str:
        return f"a {self.colour} square flashing {self.rhythm} with a {self.pitch} tone"


def parse_prompt(text: str) -> Prompt:
    """Parse ``"a <colour> square flashing <rhythm> with a <pitch> tone"``."""
    match = _PROMPT.match(text.strip().lower())
    if match is None:
        raise ValueError(f"prompt {text!r} does not read 'a <colour> square flashing <rhythm> with a <pitch> tone'")
    prompt = Prompt(*match.groups())
    for value, allowed in ((prompt.colour, COLOURS), (prompt.rhythm, RHYTHMS), (prompt.pitch, PITCHES)):
        if value not in allowed:
            raise ValueError(f"prompt {text!r}: {value!r} is not one of {allowed}")
    return prompt


def all_prompts() -> list[str]:
    """Every prompt of the task (18), in a fixed order."""
    return [Prompt(c, r, p).text for c in COLOURS for r in RHYTHMS for p in PITCHES]


def conflict_prompts(fraction: float) -> list[str]:
    """The prompts of ``all_prompts`` whose data conflict, spread evenly: index ``i`` when
    ``floor((i + 1) f) > floor(i f)`` (``f = 0.5``: every second prompt; ``f = 0``: none)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"conflict_fraction must be in [0, 1], got {fraction}")
    prompts = all_prompts()
    return [text for i, text in enumerate(prompts) if math.floor((i + 1) * fraction) > math.floor(i * fraction)]


def beacon_path(frames: int, height: int, width: int) -> list[tuple[int, int]]:
    """``(row, column)`` latent token of the beacon in each of ``frames`` frames: the border tokens of the
    ``height x width`` grid clockwise from the top-left corner, one step per frame, wrapping around."""
    ring = [(0, j) for j in range(width)] + [(i, width - 1) for i in range(1, height)]
    ring += [(height - 1, j) for j in range(width - 2, -1, -1)] + [(i, 0) for i in range(height - 2, 0, -1)]
    return [ring[f % len(ring)] for f in range(frames)]


@dataclass(frozen=True)
class TaskSpec:
    """Sizes of the synthetic task.

    Args:
        frames: video frames ``F`` (one latent frame each).
        height, width: video latent grid; the square is the centre token, so both should be odd.
        patch: pixels per latent token side.
        video_channels: ``Cv >= 3``.
        audio_channels: ``Ca <= len(AUDIO_FREQS)``.
        fps: video frame rate; the clip lasts ``frames / fps`` seconds.
        sample_rate: audio sample rate.
        label_accuracy: probability that each attribute of a pre-training sample matches its prompt.
        conflict_fraction: share of the prompts (``conflict_prompts``) whose data get exactly one of colour and pitch
            right.
        beacon: the rhythm flashes on a moving one-token beacon instead of the square.
        sync_noise: ``audio`` or ``video``: the stream whose beats a mis-synced pre-training sample shifts.
        text_dim_video, text_dim_audio: widths of the two text embeddings (the model's video and audio widths).
        seed: seed of the fixed decoder textures and text embeddings.
    """

    frames: int = 8
    height: int = 3
    width: int = 3
    patch: int = 6
    video_channels: int = 8
    audio_channels: int = 8
    fps: float = 8.0
    sample_rate: int = 8000
    label_accuracy: float = 0.5
    conflict_fraction: float = 0.0
    beacon: bool = False
    sync_noise: str = "audio"
    text_dim_video: int = 64
    text_dim_audio: int = 32
    seed: int = 1234

    @property
    def latent_frames(self) -> int:
        return self.frames

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * self.height * self.width

    @property
    def audio_tokens(self) -> int:
        return 2 * self.frames

    @property
    def audio_samples(self) -> int:
        return round(self.frames / self.fps * self.sample_rate)

    @property
    def audio_token_seconds(self) -> float:
        return 1.0 / (2.0 * self.fps)


class SyntheticAVTask:
    """Prompts, text embeddings, pre-training data and the fixed latent decoder of the synthetic task."""

    def __init__(self, spec: TaskSpec | None = None) -> None:
        spec = spec or TaskSpec()
        if spec.video_channels < 3:
            raise ValueError(f"video_channels must be >= 3, got {spec.video_channels}")
        if not 6 <= spec.audio_channels <= len(AUDIO_FREQS):
            raise ValueError(f"audio_channels must be in 6..{len(AUDIO_FREQS)}, got {spec.audio_channels}")
        if spec.height % 2 == 0 or spec.width % 2 == 0:
            raise ValueError(f"height and width must be odd (centre token), got {spec.height}x{spec.width}")
        if not 0.0 <= spec.label_accuracy <= 1.0:
            raise ValueError(f"label_accuracy must be in [0, 1], got {spec.label_accuracy}")
        if spec.beacon and (spec.height < 3 or spec.width < 3):
            raise ValueError(f"beacon needs a grid of at least 3x3, got {spec.height}x{spec.width}")
        if spec.sync_noise not in ("audio", "video"):
            raise ValueError(f"sync_noise must be 'audio' or 'video', got {spec.sync_noise!r}")
        self.conflicts = frozenset(conflict_prompts(spec.conflict_fraction))
        self.spec = spec
        gen = torch.Generator().manual_seed(spec.seed)
        p = spec.patch
        textures = torch.randn(spec.video_channels - 3, 3, p, p, generator=gen)
        self.textures = 0.3 * (textures - textures.mean(dim=(1, 2, 3), keepdim=True))
        words = COLOURS + RHYTHMS + PITCHES
        self.vocab = {w: i for i, w in enumerate(words)}
        self.embed_video = torch.randn(len(words), spec.text_dim_video, generator=gen)
        self.embed_audio = torch.randn(len(words), spec.text_dim_audio, generator=gen)

    # ----- text -----
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed text encoder: ``(B, 3, text_dim_video)`` and ``(B, 3, text_dim_audio)`` word embeddings."""
        ids = []
        for text in prompts:
            prompt = parse_prompt(text)
            ids.append([self.vocab[prompt.colour], self.vocab[prompt.rhythm], self.vocab[prompt.pitch]])
        index = torch.tensor(ids, dtype=torch.long)
        return self.embed_video[index], self.embed_audio[index]

    def unconditional(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier-free guidance's empty prompt: three zero word embeddings per stream (no attribute named)."""
        words = 3
        return torch.zeros(batch, words, self.spec.text_dim_video), torch.zeros(batch, words, self.spec.text_dim_audio)

    # ----- data -----
    def _flash(self, rhythm: str, shift: int = 0) -> torch.Tensor:
        """``(F,)`` flash envelope in [0, 1]: 1 on a beat frame, 0.35 on the next."""
        env = torch.zeros(self.spec.frames)
        for frame in BEAT_FRAMES[rhythm]:
            for offset, level in ((0, 1.0), (1, 0.35)):
                f = (frame * self.spec.frames // 8 + offset + shift) % self.spec.frames
                env[f] = max(float(env[f]), level)
        return env

    def sample_data(self, prompts: list[str], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-training latents for ``prompts`` (attributes correct with probability ``label_accuracy``).

        Returns:
            ``(B, F*H*W, Cv)`` video and ``(B, 2F, Ca)`` audio latents.
        """
        s = self.spec
        batch = len(prompts)
        video = torch.full((batch, s.frames, s.height, s.width, s.video_channels), -1.0)
        texture_shape = (batch, s.frames, s.height, s.width, s.video_channels - 3)
        video[..., 3:] = 0.25 * torch.randn(texture_shape, generator=generator)
        audio = torch.full((batch, s.audio_tokens, s.audio_channels), -1.0)
        ch, cw = s.height // 2, s.width // 2

        def keep() -> bool:
            return bool(torch.rand((), generator=generator) < s.label_accuracy)

        def other(value: str, choices: tuple[str, ...]) -> str:
            rest = [c for c in choices if c != value]
            return rest[int(torch.randint(len(rest), (), generator=generator))]

        path = beacon_path(s.frames, s.height, s.width)
        for b, text in enumerate(prompts):
            prompt = parse_prompt(text)
            if prompt.text in self.conflicts:
                colour_right = bool(torch.rand((), generator=generator) < 0.5)
                colour = prompt.colour if colour_right else other(prompt.colour, COLOURS)
                pitch = other(prompt.pitch, PITCHES) if colour_right else prompt.pitch
            else:
                colour = prompt.colour if keep() else other(prompt.colour, COLOURS)
                pitch = prompt.pitch if keep() else other(prompt.pitch, PITCHES)
            shift = 0 if keep() else 1 + 2 * int(torch.randint(2, (), generator=generator))
            video_shift, audio_shift = (shift, 0) if s.sync_noise == "video" else (0, shift)
            flash = self._flash(prompt.rhythm, video_shift)
            if s.beacon:
                video[b, :, ch, cw, COLOURS.index(colour)] = 1.5
                for f, (i, j) in enumerate(path):
                    video[b, f, i, j, :3] = -1.0 + 2.5 * flash[f]
            else:
                video[b, :, ch, cw, COLOURS.index(colour)] = -0.5 + 2.0 * flash
            beep = self._flash(prompt.rhythm, audio_shift).repeat_interleave(2)
            beep[1::2] *= 0.6
            audio[b, :, AUDIO_FREQS.index(PITCH_HZ[pitch])] = -1.0 + 2.0 * beep
        audio = audio + 0.05 * torch.randn(audio.shape, generator=generator)
        return video.reshape(batch, s.video_tokens, s.video_channels), audio

    # ----- decoder -----
    def decode_video(self, latent: torch.Tensor) -> torch.Tensor:
        """``(B, F*H*W, Cv)`` latents to ``(B, F, 3, H*p, W*p)`` frames in [0, 1]."""
        s = self.spec
        z = latent.float().reshape(-1, s.frames, s.height, s.width, s.video_channels)
        colour = z[..., :3, None, None]
        texture = torch.einsum("bfhwk,kcij->bfhwcij", z[..., 3:], self.textures.to(z.device))
        pixels = torch.sigmoid(2.0 * (colour + texture))
        b, f, h, w, c, p, _ = pixels.shape
        return pixels.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, f, c, h * p, w * p)

    def decode_audio(self, latent: torch.Tensor) -> torch.Tensor:
        """``(B, 2F, Ca)`` latents to ``(B, S)`` waveforms in [-1, 1] (sinusoid bank, amplitudes ``relu(z)``)."""
        s = self.spec
        amp = torch.relu(latent.float())
        n = s.audio_samples
        time = (torch.arange(n, device=amp.device) + 0.5) / s.sample_rate
        position = (time / s.audio_token_seconds - 0.5).clamp(0, s.audio_tokens - 1)
        lo = position.floor().long()
        hi = (lo + 1).clamp(max=s.audio_tokens - 1)
        frac = (position - lo)[None, :, None]
        envelope = amp[:, lo] * (1 - frac) + amp[:, hi] * frac
        freqs = torch.tensor(AUDIO_FREQS[: s.audio_channels], device=amp.device)
        tones = torch.sin(2 * math.pi * time[:, None] * freqs[None, :])
        return torch.tanh(0.5 * (envelope * tones[None]).sum(dim=-1))

    def decode(self, video_latent: torch.Tensor, audio_latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both decoders: frames ``(B, F, 3, H', W')`` in [0, 1] and waveforms ``(B, S)`` in [-1, 1]."""
        return self.decode_video(video_latent), self.decode_audio(audio_latent)
