"""The released LTX-2 as the trainer's task: text conditions, latent layout and decoders, built from ltx-core.

``LTX2Pipeline`` implements the trainer's ``AVTask`` protocol (``omninft_fast.train.model``) for a released
single-file checkpoint (transformer, video VAE, audio VAE and vocoder in one safetensors file whose ``config``
metadata describes them):

- ``encode``: prompts to the two text contexts of the transformer, read from a precomputed cache file
  (``write_text_cache``; the Gemma encoder stays out of memory during RL) or computed through ltx-core's Gemma
  encoder and embeddings processor (``GemmaPromptEncoder``) and memoised;
- ``spec``: token counts and channels of both streams for a configured clip (``LTX2Spec``), plus the decoded
  frame rate and sample rate;
- ``decode``: patchified latents to frames ``(B, T, 3, H, W)`` in [0, 1] (video VAE decoder) and mono waveforms
  ``(B, S)`` in [-1, 1] (audio VAE decoder + vocoder), the ``RewardBatch`` layout;
- ``policy``: the transformer behind ``LTXAVModel`` with its token positions.

Every component is built by ltx-core's configurator from the file's metadata and loaded with ltx-core's
state-dict loader and key maps; a key missing from the file is an error naming the file and the keys.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omninft_fast.media import write_new
from omninft_fast.train.checkpoint import header_metadata
from omninft_fast.train.model import LTXAVModel

TEXT_CACHE_FORMAT = "omninft-ltx2-text-cache-1"
# ltx-core's fixed compression factors: 8x in time and 32x in space for video, 4x in time for audio (mel frames).
VIDEO_TIME_FACTOR, VIDEO_SPACE_FACTOR, AUDIO_TIME_FACTOR = 8, 32, 4


class MissingWeightsError(KeyError):
    """A component's weights are missing from the checkpoint file."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class LTX2Spec:
    """Latent layout of one clip and the rates of the decoded media.

    Args:
        frames, height, width: decoded clip size in pixels; ``frames = 8 k + 1``, ``height``/``width``
            multiples of 32.
        fps: decoded frame rate.
        video_channels: video latent channels (the transformer's ``in_channels``).
        audio_latent_channels, audio_latent_mel_bins: audio latent ``(C, F)``; a token holds ``C * F`` values.
        audio_latent_rate: audio latent frames per second (``sampling_rate / hop_length / 4``).
        sample_rate: sample rate of the decoded waveform (the vocoder's output rate).
    """

    frames: int
    height: int
    width: int
    fps: float
    video_channels: int
    audio_latent_channels: int
    audio_latent_mel_bins: int
    audio_latent_rate: float
    sample_rate: int

    def __post_init__(self) -> None:
        if self.frames < 1 or (self.frames - 1) % VIDEO_TIME_FACTOR:
            raise ValueError(f"ltx.frames must be 8 k + 1 (the VAE's time factor), got {self.frames}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < VIDEO_SPACE_FACTOR or value % VIDEO_SPACE_FACTOR:
                raise ValueError(f"ltx.{name} must be a positive multiple of {VIDEO_SPACE_FACTOR}, got {value}")
        if not self.fps > 0:
            raise ValueError(f"ltx.fps must be > 0, got {self.fps}")

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // VIDEO_TIME_FACTOR + 1

    @property
    def latent_height(self) -> int:
        return self.height // VIDEO_SPACE_FACTOR

    @property
    def latent_width(self) -> int:
        return self.width // VIDEO_SPACE_FACTOR

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * self.latent_height * self.latent_width

    @property
    def audio_tokens(self) -> int:
        return round(self.frames / self.fps * self.audio_latent_rate)

    @property
    def audio_channels(self) -> int:
        return self.audio_latent_channels * self.audio_latent_mel_bins


# ----- loading -----
def _audio_vae() -> types.ModuleType:
    """ltx-core's ``model.audio_vae`` package.

    Its encoder-side ``AudioProcessor`` imports torchaudio at module level, which this project does not install
    (ltx-core's pin would replace torch) and decoding never uses: when torchaudio is absent, a placeholder that
    fails on first use stands in for it during that one import and is removed from ``sys.modules`` afterwards.
    """
    name = "ltx_core.model.audio_vae"
    if name in sys.modules or importlib.util.find_spec("torchaudio") is not None:
        return importlib.import_module(name)

    def missing(attr: str) -> Any:
        raise ImportError(f"torchaudio.{attr}: torchaudio is not installed (ltx-core's audio encoder needs it)")

    placeholder = types.ModuleType("torchaudio")
    placeholder.__getattr__ = missing  # type: ignore[method-assign]
    sys.modules["torchaudio"] = placeholder
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get("torchaudio") is placeholder:
            del sys.modules["torchaudio"]


def checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The ``config`` metadata of a released checkpoint (sections ``transformer``, ``vae``, ``audio_vae``, ...)."""
    meta = header_metadata(Path(path), "LTX-2 checkpoint")
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as error:
        raise ValueError(f"LTX-2 checkpoint {str(path)!r} has 'config' metadata that is not JSON ({error})") from None
    if not config:
        raise ValueError(f"LTX-2 checkpoint {str(path)!r} has no 'config' metadata (not a released single-file model)")
    return config


def load_component(
    path: str | Path | list[str],
    configurator: Any,
    sd_ops: Any,
    *,
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    module_ops: tuple[Any, ...] = (),
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """Build one component with ltx-core's ``configurator`` and load its weights through ltx-core's loader.

    Args:
        path: safetensors file (or shards) holding the component's weights.
        configurator: ltx-core ``ModelConfigurator`` (e.g. ``LTXModelConfigurator``).
        sd_ops: ltx-core key map selecting and renaming the component's keys (e.g. ``LTXV_MODEL_COMFY_RENAMING_MAP``).
        name: component name for error messages.
        device, dtype: where and in which dtype the weights land (``None``: as stored).
        module_ops: ltx-core module operations applied to the model built on the meta device.
        config: model config (default: the first file's ``config`` metadata).

    Raises:
        MissingWeightsError: a parameter or buffer of the component has no tensor in the file.
    """
    from ltx_core.loader import SingleGPUModelBuilder

    paths = [str(p) for p in path] if isinstance(path, list) else [str(path)]
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{name}: weights file {p!r} does not exist")
    builder = SingleGPUModelBuilder(
        model_class_configurator=configurator, model_path=tuple(paths), model_sd_ops=sd_ops, module_ops=module_ops
    )
    model = builder.meta_model(checkpoint_config(paths[0]) if config is None else config, module_ops)
    state = builder.load_sd(paths, registry=builder.registry, device=torch.device(device), sd_ops=sd_ops).sd
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    # Tensors that neither the file nor a module op (e.g. Gemma's rotary tables) filled are still on the meta device.
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise MissingWeightsError(
            f"{name}: {len(missing)} weights missing from {', '.join(repr(p) for p in paths)} "
            f"(after ltx-core's key map {getattr(sd_ops, 'name', None)!r}): {shown}"
        )
    return model.to(device)


def load_transformer(path: str | Path, *, device: torch.device | str, dtype: torch.dtype | None) -> nn.Module:
    """The audio-video ``LTXModel`` of a released checkpoint."""
    from ltx_core.model.transformer.model_configurator import LTXV_MODEL_COMFY_RENAMING_MAP, LTXModelConfigurator

    return load_component(
        path, LTXModelConfigurator, LTXV_MODEL_COMFY_RENAMING_MAP, name="transformer", device=device, dtype=dtype
    )


# ----- text -----
def write_text_cache(path: str | Path, prompts: list[str], video: torch.Tensor, audio: torch.Tensor) -> Path:
    """Write precomputed text contexts: ``video (N, L, Dv)`` and ``audio (N, L, Da)`` for ``N`` distinct prompts, to a
    new file (``FileExistsError`` if ``path`` exists)."""
    from safetensors.torch import save_file

    if len(set(prompts)) != len(prompts):
        raise ValueError("prompts of a text cache must be distinct")
    for key, value in (("video", video), ("audio", audio)):
        if value.dim() != 3 or value.shape[0] != len(prompts):
            raise ValueError(f"{key} must be (N={len(prompts)}, L, D), got {tuple(value.shape)}")
    meta = {"format": TEXT_CACHE_FORMAT, "prompts": json.dumps(prompts)}
    tensors = {"video": video.detach().cpu().contiguous(), "audio": audio.detach().cpu().contiguous()}
    return write_new(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_text_cache(path: str | Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``write_text_cache``'s prompts and ``(N, L, D)`` video/audio contexts."""
    from safetensors import safe_open

    prompts = text_cache_prompts(path)
    with safe_open(str(path), framework="pt") as handle:
        if set(handle.keys()) != {"video", "audio"}:
            raise ValueError(f"ltx.text_cache {str(path)!r} is not a text cache written by write_text_cache")
        return prompts, handle.get_tensor("video"), handle.get_tensor("audio")


def text_cache_prompts(path: str | Path) -> list[str]:
    """The prompts a text cache holds (reads the header only; a missing or unreadable file is one error naming
    ``ltx.text_cache``)."""
    meta = header_metadata(Path(path), "ltx.text_cache")
    if meta.get("format") != TEXT_CACHE_FORMAT:
        raise ValueError(f"ltx.text_cache {str(path)!r} is not a text cache written by write_text_cache")
    return json.loads(meta["prompts"])


class GemmaPromptEncoder:
    """ltx-core's text path: Gemma hidden states -> feature extractor -> video/audio embeddings connectors.

    Args:
        text_encoder: object with ltx-core ``GemmaTextEncoder.encode(text) -> (hidden_states, mask)``.
        processor: ltx-core ``EmbeddingsProcessor`` (feature extractor + both connectors).
    """

    def __init__(self, text_encoder: Any, processor: nn.Module) -> None:
        self.text_encoder = text_encoder
        self.processor = processor

    @classmethod
    def from_files(
        cls, checkpoint: str | Path, gemma_root: str | Path, *, device: torch.device | str, dtype: torch.dtype
    ) -> GemmaPromptEncoder:
        """Gemma from ``gemma_root`` (its safetensors and tokenizer files), the projection and connectors from the
        LTX-2 ``checkpoint``."""
        from ltx_core.text_encoders.gemma import (
            EMBEDDINGS_PROCESSOR_KEY_OPS,
            GEMMA_LLM_KEY_OPS,
            GEMMA_MODEL_OPS,
            EmbeddingsProcessorConfigurator,
            GemmaTextEncoderConfigurator,
            module_ops_from_gemma_root,
        )

        root = Path(gemma_root)
        shards = sorted(str(p) for p in root.rglob("*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"ltx.gemma_root {str(root)!r} holds no .safetensors weights")
        gemma = load_component(
            shards,
            GemmaTextEncoderConfigurator,
            GEMMA_LLM_KEY_OPS,
            name="Gemma text encoder",
            device=device,
            dtype=dtype,
            module_ops=(GEMMA_MODEL_OPS, *module_ops_from_gemma_root(str(root))),
            config={},
        )
        processor = load_component(
            checkpoint,
            EmbeddingsProcessorConfigurator,
            EMBEDDINGS_PROCESSOR_KEY_OPS,
            name="text embeddings processor",
            device=device,
            dtype=dtype,
        )
        return cls(gemma.eval(), processor.eval())

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``B`` prompts -> video ``(B, L, Dv)`` and audio ``(B, L, Da)`` contexts (on the CPU), one prompt at a
        time (the connectors replace padding per sequence)."""
        videos, audios = [], []
        for text in prompts:
            hidden, mask = self.text_encoder.encode(text)
            out = self.processor.process_hidden_states(hidden, mask)
            if out.audio_encoding is None:
                raise ValueError("the embeddings processor has no audio connector (not an audio-video checkpoint)")
            videos.append(out.video_encoding.cpu())
            audios.append(out.audio_encoding.cpu())
        return torch.cat(videos), torch.cat(audios)


def precompute_text_cache(
    encoder: GemmaPromptEncoder, prompts: list[str], path: str | Path, *, chunk: int = 16
) -> Path:
    """Encode the distinct ``prompts`` with ``encoder`` (``chunk`` at a time) and write them as a text cache (each
    prompt as given: the trainer's ``load_prompts`` lists the empty prompt too when guidance needs it).

    Example (on the GPU, once before RL; the run then keeps Gemma out of memory)::

        encoder = GemmaPromptEncoder.from_files("ltx-2-19b-dev.safetensors", "gemma-3-12b-it", device="cuda",
                                                dtype=torch.bfloat16)
        precompute_text_cache(encoder, Path("prompts.txt").read_text().splitlines(), "ltx2_text_cache.safetensors")
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    # Exactly as the trainer looks them up: not stripped, and the empty prompt kept (guidance's unconditional pass).
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise ValueError("prompts holds no prompt")
    parts = [encoder(prompts[lo : lo + chunk]) for lo in range(0, len(prompts), chunk)]
    return write_text_cache(path, prompts, torch.cat([v for v, _ in parts]), torch.cat([a for _, a in parts]))


# ----- the pipeline -----
class LTX2Pipeline:
    """Text-to-audio-video task of a released LTX-2 checkpoint (the trainer's ``AVTask``).

    Args:
        checkpoint: the single-file LTX-2 checkpoint.
        frames, height, width, fps: clip to generate (e.g. 121 frames of 768x512 at 24 fps: 6144 video tokens
            and 126 audio tokens).
        text_cache: precomputed contexts (``write_text_cache``); prompts found there are not re-encoded.
        prompt_encoder: encodes prompts missing from the cache (``GemmaPromptEncoder``); ``None``: none may miss.
        decoder_device, decoder_dtype: where the VAE decoders and the vocoder run.
        decode_batch: samples per decoder call.
        decode_tiling: decode video with ltx-core's default spatial/temporal tiling (less memory).
        decode_seed: seed of the video decoder's noise injection, drawn anew for each decoder call (decoding is
            deterministic for a given ``decode_batch``).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        frames: int,
        height: int,
        width: int,
        fps: float,
        text_cache: str | Path | None = None,
        prompt_encoder: GemmaPromptEncoder | None = None,
        decoder_device: torch.device | str = "cpu",
        decoder_dtype: torch.dtype = torch.float32,
        decode_batch: int = 1,
        decode_tiling: bool = False,
        decode_seed: int = 0,
    ) -> None:
        from ltx_core.model.video_vae import VAE_DECODER_COMFY_KEYS_FILTER, VideoDecoderConfigurator

        audio_vae = _audio_vae()
        if decode_batch < 1:
            raise ValueError(f"ltx.decode_batch must be >= 1, got {decode_batch}")
        self.checkpoint = Path(checkpoint)
        self.config = checkpoint_config(self.checkpoint)
        if text_cache is None and prompt_encoder is None:
            raise ValueError("LTX-2 prompts need ltx.text_cache or ltx.gemma_root (an encoder), got neither")
        self.decoder_device = torch.device(decoder_device)
        self.decoder_dtype = decoder_dtype
        self.decode_batch = decode_batch
        self.decode_tiling = decode_tiling
        self.decode_seed = decode_seed
        self.prompt_encoder = prompt_encoder
        self._contexts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.text_cache = None if text_cache is None else Path(text_cache)
        if self.text_cache is not None:
            prompts, video, audio = read_text_cache(self.text_cache)
            self._contexts = {p: (video[i], audio[i]) for i, p in enumerate(prompts)}
        kwargs = {"device": self.decoder_device, "dtype": decoder_dtype}
        self.video_decoder = load_component(
            self.checkpoint, VideoDecoderConfigurator, VAE_DECODER_COMFY_KEYS_FILTER, name="video VAE decoder", **kwargs
        ).eval()
        self.audio_decoder = load_component(
            self.checkpoint,
            audio_vae.AudioDecoderConfigurator,
            audio_vae.AUDIO_VAE_DECODER_COMFY_KEYS_FILTER,
            name="audio VAE decoder",
            **kwargs,
        ).eval()
        self.vocoder = load_component(
            self.checkpoint,
            audio_vae.VocoderConfigurator,
            audio_vae.VOCODER_COMFY_KEYS_FILTER,
            name="vocoder",
            **kwargs,
        ).eval()
        transformer = self.config.get("transformer", {})
        audio_channels = transformer.get("audio_in_channels", 128)
        z_channels = self.audio_decoder.z_channels
        if audio_channels % z_channels:
            raise ValueError(
                f"{self.checkpoint}: transformer audio_in_channels ({audio_channels}) is not a multiple of the audio "
                f"VAE's z_channels ({z_channels})"
            )
        decoder = self.audio_decoder
        self.spec = LTX2Spec(
            frames=frames,
            height=height,
            width=width,
            fps=float(fps),
            video_channels=transformer.get("in_channels", 128),
            audio_latent_channels=z_channels,
            audio_latent_mel_bins=audio_channels // z_channels,
            audio_latent_rate=decoder.sample_rate / decoder.mel_hop_length / AUDIO_TIME_FACTOR,
            sample_rate=int(self.vocoder.output_sampling_rate),
        )

    # ----- AVTask -----
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``B`` prompts -> the transformer's video ``(B, L, Dv)`` and audio ``(B, L, Da)`` text contexts."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._contexts))
        if missing:
            if self.prompt_encoder is None:
                raise KeyError(
                    f"prompt {missing[0]!r} is not in ltx.text_cache {str(self.text_cache)!r} and no text encoder is "
                    f"configured (ltx.gemma_root); {len(missing)} prompt(s) missing"
                )
            video, audio = self.prompt_encoder(missing)
            self._contexts.update({p: (video[i], audio[i]) for i, p in enumerate(missing)})
        return (
            torch.stack([self._contexts[p][0] for p in prompts]),
            torch.stack([self._contexts[p][1] for p in prompts]),
        )

    def unconditional(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier-free guidance's contexts: the empty prompt ``""`` (in the text cache or encoded by Gemma)."""
        return self.encode([""] * batch)

    @torch.no_grad()
    def decode_video(self, latent: torch.Tensor) -> torch.Tensor:
        """``(B, Nv, Cv)`` tokens -> ``(B, T, 3, H, W)`` float32 frames in [0, 1] on the CPU."""
        from ltx_core.components.patchifiers import VideoLatentPatchifier, VideoLatentShape
        from ltx_core.model.video_vae import TilingConfig

        s = self.spec
        shape = VideoLatentShape(latent.shape[0], s.video_channels, s.latent_frames, s.latent_height, s.latent_width)
        grid = VideoLatentPatchifier(1).unpatchify(latent, output_shape=shape)
        # A decoder with timestep conditioning adds noise drawn for its whole input: samples then decode one at a
        # time, each with the decode_seed noise, so a sample's frames (and rewards) never depend on its batch-mates.
        size = 1 if getattr(self.video_decoder, "timestep_conditioning", False) else self.decode_batch
        out = []
        for chunk in grid.split(size):
            generator = torch.Generator(self.decoder_device).manual_seed(self.decode_seed)
            chunk = chunk.to(self.decoder_device, self.decoder_dtype)
            if self.decode_tiling:
                pixels = torch.cat(
                    list(self.video_decoder.tiled_decode(chunk, TilingConfig.default(), generator=generator)), dim=2
                )
            else:
                pixels = self.video_decoder(chunk, generator=generator)
            out.append(((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 1, 3, 4).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode_audio(self, latent: torch.Tensor) -> torch.Tensor:
        """``(B, Na, Ca)`` tokens -> ``(B, S)`` float32 mono waveforms in [-1, 1] on the CPU (stereo averaged)."""
        from ltx_core.components.patchifiers import AudioLatentShape, AudioPatchifier

        s = self.spec
        shape = AudioLatentShape(latent.shape[0], s.audio_latent_channels, latent.shape[1], s.audio_latent_mel_bins)
        grid = AudioPatchifier(1).unpatchify(latent, output_shape=shape)
        out = []
        for chunk in grid.split(self.decode_batch):
            mel = self.audio_decoder(chunk.to(self.decoder_device, self.decoder_dtype))
            wave = self.vocoder(mel).float()
            out.append(wave.mean(dim=1).clamp(-1.0, 1.0).cpu())
        return torch.cat(out)

    def decode(self, video_latent: torch.Tensor, audio_latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both decoders: frames ``(B, T, 3, H, W)`` in [0, 1] and waveforms ``(B, S)`` in [-1, 1]."""
        return self.decode_video(video_latent), self.decode_audio(audio_latent)

    # ----- policy -----
    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, 3, Nv, 2)`` video and ``(1, 1, Na, 2)`` audio token bounds (ltx-core's latent tools)."""
        from ltx_core.components.patchifiers import (
            AudioLatentShape,
            AudioPatchifier,
            VideoLatentPatchifier,
            VideoLatentShape,
        )
        from ltx_core.tools import AudioLatentTools, VideoLatentTools

        s, decoder = self.spec, self.audio_decoder
        video = VideoLatentTools(
            VideoLatentPatchifier(1),
            VideoLatentShape(1, s.video_channels, s.latent_frames, s.latent_height, s.latent_width),
            fps=s.fps,
        ).create_initial_state("cpu", torch.float32)
        audio_patchifier = AudioPatchifier(
            1, sample_rate=decoder.sample_rate, hop_length=decoder.mel_hop_length, is_causal=decoder.is_causal
        )
        audio = AudioLatentTools(
            audio_patchifier, AudioLatentShape(1, s.audio_latent_channels, s.audio_tokens, s.audio_latent_mel_bins)
        ).create_initial_state("cpu", torch.float32)
        return video.positions, audio.positions

    def policy(self, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> LTXAVModel:
        """The checkpoint's transformer behind ``LTXAVModel`` (weights in ``dtype``; ``None``: as stored)."""
        model = load_transformer(self.checkpoint, device=device, dtype=dtype)
        video, audio = self.positions()
        return LTXAVModel(model, video, audio)


__all__ = [
    "GemmaPromptEncoder",
    "LTX2Pipeline",
    "LTX2Spec",
    "MissingWeightsError",
    "checkpoint_config",
    "load_component",
    "load_transformer",
    "precompute_text_cache",
    "read_text_cache",
    "text_cache_prompts",
    "write_text_cache",
]
