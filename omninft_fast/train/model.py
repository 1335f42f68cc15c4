"""The model side of the trainer: velocity of both streams given both noisy latents, ``t`` and the condition.

The trainer only talks to ``AVVelocityModel``: ``forward`` for velocities, ``patch`` for the attention surgery and
region-score capture handle (``omninft_fast.ltx2.patch`` for ltx-core models). ``LTXAVModel`` adapts ltx-core's
``LTXModel``. What it needs from a task (prompts to conditions, latent sizes, latents to media for the rewards) is
the ``AVTask`` protocol, met by the synthetic task and by the released LTX-2's ``LTX2Pipeline``.
"""

from __future__ import annotations

import contextlib
import itertools
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import torch
from torch import nn

from omninft_fast import fp8


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``. From the host to a GPU the copy goes through pinned memory and does not wait: a copy from
    pageable memory first waits for every kernel queued on the GPU."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


@dataclass(frozen=True)
class Condition:
    """Text condition of a batch: one context sequence per stream.

    Args:
        video: ``(B, Lv, Dv)`` context for the video stream.
        audio: ``(B, La, Da)`` context for the audio stream.
    """

    video: torch.Tensor
    audio: torch.Tensor

    def __getitem__(self, index: torch.Tensor | slice) -> Condition:
        return Condition(self.video[index], self.audio[index])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Condition:
        """Both contexts on ``device`` (``to_device``), then cast to ``dtype`` there."""
        return Condition(*(to_device(x, device).to(dtype or x.dtype) for x in (self.video, self.audio)))

    @staticmethod
    def cat(conditions: list[Condition]) -> Condition:
        """The conditions of ``conditions`` one batch after another."""
        return Condition(torch.cat([c.video for c in conditions]), torch.cat([c.audio for c in conditions]))


def _rows(args: Any, rows: slice) -> Any:
    """ltx-core ``TransformerArgs`` of the samples ``rows``: every tensor (or tuple of tensors, such as rotary
    embeddings) with the batch in dim 0 is cut; fields broadcast over the batch stay as they are."""
    batch = args.x.shape[0]

    def cut(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(cut(item) for item in value)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value[rows]
        return value

    return replace(args, **{f.name: cut(getattr(args, f.name)) for f in fields(args)})


def _self_attention_skips(perturbations: Any, block: int) -> list[tuple[bool, bool]]:
    """Per sample: whether it skips its video and its audio self-attention in ``block``."""
    from ltx_core.guidance.perturbations import PerturbationType

    kinds = (PerturbationType.SKIP_VIDEO_SELF_ATTN, PerturbationType.SKIP_AUDIO_SELF_ATTN)
    return [tuple(config.is_perturbed(kind, block) for kind in kinds) for config in perturbations.perturbations]


def _block_by_skips(block: nn.Module, video: Any, audio: Any, perturbations: Any, handle: Any) -> tuple[Any, Any]:
    """``block`` on every sample, once per run of consecutive samples with the same self-attention skips: ltx-core
    computes a batch's self-attention for every sample when only some skip it (then blends), so the skipping
    samples would pay for attention they throw away. The patch handle joins the runs' key masses
    (``split_rows``)."""
    from ltx_core.guidance.perturbations import BatchedPerturbationConfig

    skips = _self_attention_skips(perturbations, block.idx)
    bounds = [0] + [i for i in range(1, len(skips)) if skips[i] != skips[i - 1]] + [len(skips)]
    if len(bounds) == 2:
        return block(video=video, audio=audio, perturbations=perturbations)
    outputs = []
    with contextlib.nullcontext() if handle is None else handle.split_rows(len(skips)):
        for lo, hi in itertools.pairwise(bounds):
            rows = slice(lo, hi)
            part = BatchedPerturbationConfig(perturbations.perturbations[rows])
            outputs.append(block(video=_rows(video, rows), audio=_rows(audio, rows), perturbations=part))
    v, a = (torch.cat([out[i].x for out in outputs]) for i in (0, 1))
    return replace(video, x=v), replace(audio, x=a)


def _rope(preprocessor: Any, positions: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """ltx-core's ``TransformerArgsPreprocessor._prepare_positional_embeddings`` in place on an ``LTXAVModel``'s
    model, computed once per position tensor, device and dtype. ltx-core recomputes every sample's rotary embeddings
    in every forward after copying its host-cached frequency grid to the device (four copies a forward, each of which
    waits for the GPU). The model's samples share one position tensor (``LTXAVModel`` expands its own), so a batch
    gets the first sample's cosines and sines expanded, not a copy per sample. Other positions, and a compiled
    model's trace, take ltx-core's path."""
    prepare = type(preprocessor)._prepare_positional_embeddings
    if torch.compiler.is_compiling() or (positions.shape[0] > 1 and positions.stride(0) != 0):
        return prepare(preprocessor, positions=positions, **kwargs)
    key = (positions.data_ptr(), positions.device, positions.shape[1:], positions.stride()[1:], repr(kwargs))
    cache = preprocessor._omninft_rope
    if key not in cache:
        # One position tensor per preprocessor: entries of another (a moved or copied model's) are dropped. A new
        # entry is a plain tensor whatever the mode.
        for stale in [k for k in cache if k[:2] != key[:2]]:
            del cache[stale]
        with torch.inference_mode(False), torch.no_grad():
            cache[key] = prepare(preprocessor, positions=positions[:1], **kwargs)
    return tuple(pe.expand(positions.shape[0], *pe.shape[1:]) for pe in cache[key])


def _blocks(model: nn.Module, video: Any, audio: Any, perturbations: Any) -> tuple[Any, Any]:
    """ltx-core's ``LTXModel._process_transformer_blocks`` in place on an ``LTXAVModel``'s model: the model's own loop,
    or, while ``LTXAVModel.forward`` shares a prefix (``model._omninft_share = (copied_rows, first, handle)``), blocks
    ``0 .. first - 1`` on all but the last ``copied_rows`` samples and the rest on all of them, the last samples
    joining at block ``first`` as copies of the first ``copied_rows`` samples' state. The patch handle's key masses
    of the shared blocks get the same copies (``expanded_rows``). From block ``first`` on, samples that skip a
    block's self-attention run that block apart from those that do not (``_block_by_skips``). Guided rollouts run
    without gradients: these blocks run without gradient checkpointing."""
    from ltx_core.guidance.perturbations import BatchedPerturbationConfig

    share = model._omninft_share
    if share is None:
        return type(model)._process_transformer_blocks(model, video=video, audio=audio, perturbations=perturbations)
    copied_rows, first, handle = share
    kept = video.x.shape[0] - copied_rows

    def expand(rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows, rows[:copied_rows]])

    v, a = _rows(video, slice(kept)), _rows(audio, slice(kept))
    kept_perturbations = BatchedPerturbationConfig(perturbations.perturbations[:kept])
    with contextlib.nullcontext() if handle is None else handle.expanded_rows(expand):
        for block in model.transformer_blocks[:first]:
            v, a = block(video=v, audio=a, perturbations=kept_perturbations)
    v, a = replace(video, x=expand(v.x)), replace(audio, x=expand(a.x))
    for block in model.transformer_blocks[first:]:
        v, a = _block_by_skips(block, v, a, perturbations, handle)
    return v, a


class LatentSpec(Protocol):
    """Sizes the trainer reads from a task: token counts and channels of both streams, decoded media rates."""

    @property
    def latent_frames(self) -> int: ...

    @property
    def video_tokens(self) -> int: ...

    @property
    def video_channels(self) -> int: ...

    @property
    def audio_tokens(self) -> int: ...

    @property
    def audio_channels(self) -> int: ...

    @property
    def fps(self) -> float: ...

    @property
    def sample_rate(self) -> int: ...


class AVTask(Protocol):
    """A text-to-audio-video task as the trainer sees it.

    ``encode(prompts)`` gives the ``(B, Lv, Dv)`` video and ``(B, La, Da)`` audio text contexts; ``decode(video
    (B, Nv, Cv), audio (B, Na, Ca))`` gives frames ``(B, T, C, H, W)`` in [0, 1] at ``spec.fps`` and waveforms
    ``(B, S)`` in [-1, 1] at ``spec.sample_rate`` (the reward plugins' ``RewardBatch``). ``unconditional(B)``
    gives the contexts of classifier-free guidance's unconditional pass, shaped as ``encode``'s.
    """

    @property
    def spec(self) -> LatentSpec: ...

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def unconditional(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode(self, video_latent: torch.Tensor, audio_latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class AVVelocityModel(nn.Module):
    """Interface of a dual-stream flow model (Eq 2's ``v_theta``).

    ``forward(x_video (B, Nv, Cv), x_audio (B, Na, Ca), t (B,), cond, skip_blocks=None, copied_rows=0) ->
    (v_video, v_audio)`` with the velocity convention ``v = x1 - x0`` (``x_t = (1 - t) x0 + t x1``); ``skip_blocks[b]``
    lists the blocks whose video and audio self-attention sample ``b`` skips (STG's perturbed pass); the last
    ``copied_rows`` samples repeat the inputs of the first ``copied_rows`` (a model may share the work of the blocks
    where their skips agree; only guided rollouts pass it). ``patch`` returns the handle
    that applies Eq 8 to the A2V keys/values (``set_detach``) and captures Eq 10 scores during sampling
    (``capture_region_scores``).
    """

    num_layers: int

    def patch(self, *, detach: list[float] | None = None, region_layers: list[int] | None = None) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no attention surgery handle")

    def patch_fp8(
        self, *, backend: str = "torch", recipe: str = "rowwise", modules: str | None = None, cache_weights: bool = True
    ) -> Any:
        """Run the transformer's linear layers in FP8 (``omninft_fast.fp8.patch``); returns its handle."""
        raise NotImplementedError(f"{type(self).__name__} has no FP8 layers")

    def detach_a2v_input(self, alphas: list[float]) -> None:
        """Eq 8 on the audio stream entering each block's A2V attention (before its key/value projections, which
        keep their full gradient): ``partial_detach(audio, alphas[block])``."""
        raise NotImplementedError(f"{type(self).__name__} has no A2V input surgery")


class LTXAVModel(AVVelocityModel):
    """ltx-core's audio-video ``LTXModel`` behind ``AVVelocityModel``.

    Args:
        model: an ``LTXModel`` of type ``AudioVideo``.
        video_positions: ``(1, 3, Nv, 2)`` video token bounds (ltx-core's ``VideoLatentTools``).
        audio_positions: ``(1, 1, Na, 2)`` audio token bounds (ltx-core's ``AudioLatentTools``).
    """

    def __init__(self, model: nn.Module, video_positions: torch.Tensor, audio_positions: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("video_positions", video_positions, persistent=False)
        self.register_buffer("audio_positions", audio_positions, persistent=False)
        self.num_layers = len(model.transformer_blocks)
        self._handle: Any = None
        self._skip: dict[str, list[int]] = {}
        # ltx-core's block loop, through ``_blocks``: its own loop unless ``forward`` shares a prefix (a bound method
        # of the model, so deep copies rebind it; a compiled model guards on ``_omninft_share``).
        model._omninft_share = None
        model._process_transformer_blocks = types.MethodType(_blocks, model)
        for stream in (model.video_args_preprocessor, model.audio_args_preprocessor):
            preprocessor = getattr(stream, "simple_preprocessor", stream)
            preprocessor._omninft_rope = {}
            preprocessor._prepare_positional_embeddings = types.MethodType(_rope, preprocessor)

    @classmethod
    def build(
        cls,
        *,
        frames: int,
        height: int,
        width: int,
        video_channels: int,
        audio_tokens: int,
        audio_channels: int,
        fps: float,
        audio_token_seconds: float,
        num_layers: int,
        video_heads: int,
        video_head_dim: int,
        audio_heads: int,
        audio_head_dim: int,
        seed: int = 0,
    ) -> LTXAVModel:
        """A randomly initialised ltx-core LTX-2 (``AudioVideo``, split RoPE, PyTorch attention).

        The video latent is ``(frames, height, width)`` tokens of ``video_channels``; audio tokens last
        ``audio_token_seconds`` each, so both streams share one time axis in seconds for A2V/V2A RoPE.
        """
        from ltx_core.components.patchifiers import (
            AudioLatentShape,
            AudioPatchifier,
            VideoLatentPatchifier,
            VideoLatentShape,
        )
        from ltx_core.model.transformer.attention import AttentionFunction
        from ltx_core.model.transformer.model import LTXModel, LTXModelType
        from ltx_core.model.transformer.rope import LTXRopeType
        from ltx_core.tools import AudioLatentTools, VideoLatentTools

        video_dim, audio_dim = video_heads * video_head_dim, audio_heads * audio_head_dim
        model = LTXModel(
            model_type=LTXModelType.AudioVideo,
            num_layers=num_layers,
            num_attention_heads=video_heads,
            attention_head_dim=video_head_dim,
            cross_attention_dim=video_dim,
            in_channels=video_channels,
            out_channels=video_channels,
            audio_num_attention_heads=audio_heads,
            audio_attention_head_dim=audio_head_dim,
            audio_cross_attention_dim=audio_dim,
            audio_in_channels=audio_channels,
            audio_out_channels=audio_channels,
            rope_type=LTXRopeType.SPLIT,
            attention_type=AttentionFunction.PYTORCH,
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif param.dim() >= 2 or "scale_shift_table" in name:
                    param.copy_(0.02 * torch.randn(param.shape, generator=gen))
                else:
                    param.zero_()
        # Pixel frames per latent frame is ltx-core's temporal factor 8, so fps * 8 keeps positions in seconds.
        video_state = VideoLatentTools(
            VideoLatentPatchifier(1), VideoLatentShape(1, video_channels, frames, height, width), fps=fps * 8
        ).create_initial_state("cpu", torch.float32)
        hop = round(audio_token_seconds * 16000 / 4)
        audio_state = AudioLatentTools(
            AudioPatchifier(1, sample_rate=16000, hop_length=hop), AudioLatentShape(1, 1, audio_tokens, audio_channels)
        ).create_initial_state("cpu", torch.float32)
        return cls(model, video_state.positions, audio_state.positions)

    def forward(
        self,
        x_video: torch.Tensor,
        x_audio: torch.Tensor,
        t: torch.Tensor,
        cond: Condition,
        skip_blocks: list[list[int]] | None = None,
        copied_rows: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, Nv, Cv)``, ``(B, Na, Ca)``, ``(B,)`` -> velocities of the same shapes.

        One timestep per sample (``timesteps`` of shape ``(B, 1)``): ltx-core then embeds it once, not per token.
        ``skip_blocks[b]``: blocks whose video and audio self-attention sample ``b`` skips (ltx-core's perturbation
        config), ``None``: none. ``copied_rows = k``: samples ``B - k + r`` repeat the inputs of samples ``r < k``
        (STG's pass of the conditional one), so the blocks before the first block where their skips differ run on
        the first ``B - k`` samples only, and later blocks once per run of samples with the same skips, the
        skipping ones computing no self-attention (``_blocks``).
        """
        from ltx_core.model.transformer.modality import Modality

        batch = x_video.shape[0]
        t = t.to(x_video.dtype)
        video = Modality(
            latent=x_video,
            sigma=t,
            timesteps=t[:, None],
            positions=self.video_positions.expand(batch, -1, -1, -1),
            context=cond.video.to(x_video.dtype),
        )
        audio = Modality(
            latent=x_audio,
            sigma=t,
            timesteps=t[:, None],
            positions=self.audio_positions.expand(batch, -1, -1, -1),
            context=cond.audio.to(x_audio.dtype),
        )
        perturbations = self._perturbations(batch, skip_blocks)
        fp8.prepare_compiled(self.model)
        if copied_rows:
            first = self._first_own_block(batch, skip_blocks, copied_rows)
            # Through ltx-core's own forward (its hooks, e.g. a sharded engine's gathers, run as always).
            self.model._omninft_share = (copied_rows, first, self._handle)
            try:
                return self.model(video=video, audio=audio, perturbations=perturbations)
            finally:
                self.model._omninft_share = None
        v_video, v_audio = self.model(video=video, audio=audio, perturbations=perturbations)
        return v_video, v_audio

    def _first_own_block(self, batch: int, skip_blocks: Sequence[Sequence[int]] | None, copied_rows: int) -> int:
        """The first block where a copied sample's skips differ from those of the sample it copies
        (``num_layers``: none)."""
        if not 0 < copied_rows <= batch // 2:
            raise ValueError(f"copied_rows must be in 1..{batch // 2} for a batch of {batch}, got {copied_rows}")
        if skip_blocks is None:
            return self.num_layers
        own = (set(skip_blocks[batch - copied_rows + r]) ^ set(skip_blocks[r]) for r in range(copied_rows))
        return min(min(blocks, default=self.num_layers) for blocks in own)

    @contextlib.contextmanager
    def skip_cross_attention(self, *, a2v: Sequence[int] = (), v2a: Sequence[int] = ()) -> Iterator[None]:
        """Inside, every forward skips the A2V / V2A cross-attention of the listed blocks (ltx-core's
        ``SKIP_A2V_CROSS_ATTN`` / ``SKIP_V2A_CROSS_ATTN`` perturbations) for every sample."""
        bad = [b for b in (*a2v, *v2a) if not 0 <= b < self.num_layers]
        if bad:
            raise ValueError(f"blocks {bad} are outside the model's {self.num_layers} blocks")
        previous, self._skip = self._skip, {"a2v": list(a2v), "v2a": list(v2a)}
        try:
            yield
        finally:
            self._skip = previous

    def _perturbations(self, batch: int, skip_blocks: Sequence[Sequence[int]] | None) -> Any:
        """ltx-core's batched perturbation config: the cross-attention skips of ``skip_cross_attention`` for every
        sample, plus sample ``b``'s video and audio self-attention skips ``skip_blocks[b]`` (STG); empty otherwise."""
        from ltx_core.guidance.perturbations import (
            BatchedPerturbationConfig,
            Perturbation,
            PerturbationConfig,
            PerturbationType,
        )

        cross = {"a2v": PerturbationType.SKIP_A2V_CROSS_ATTN, "v2a": PerturbationType.SKIP_V2A_CROSS_ATTN}
        shared = [Perturbation(cross[k], list(b)) for k, b in self._skip.items() if b]
        if not shared and skip_blocks is None:
            return BatchedPerturbationConfig.empty(batch)
        own = (PerturbationType.SKIP_VIDEO_SELF_ATTN, PerturbationType.SKIP_AUDIO_SELF_ATTN)
        return BatchedPerturbationConfig(
            [
                PerturbationConfig(
                    shared + ([] if skip_blocks is None else [Perturbation(k, list(skip_blocks[b])) for k in own])
                )
                for b in range(batch)
            ]
        )

    def patch(self, *, detach: list[float] | None = None, region_layers: list[int] | None = None) -> Any:
        """Attach ``omninft_fast.ltx2``'s surgery/capture handle (A2V detach ratios per block, Eq 10 region blocks).

        The first call patches the model; later calls only change the detach ratios and return the same handle
        (its region blocks stay those of the first call).
        """
        if self._handle is None:
            from omninft_fast import ltx2

            # No per-call value checks: the trainer validates once per iteration (rewards, loss inputs, losses,
            # gradient norm), which a non-finite attention output reaches.
            self._handle = ltx2.patch(self.model, detach=detach, region_layers=region_layers, check_values=False)
        else:
            self._handle.set_detach(detach)
        return self._handle

    def detach_a2v_input(self, alphas: list[float]) -> None:
        """Eq 8 on the A2V context (the audio stream) of every block with ``alphas[block] > 0``: a forward pre-hook
        on ``audio_to_video_attn`` (value unchanged, gradient scaled by ``1 - alpha``)."""
        import omninft_fast

        if len(alphas) != self.num_layers:
            raise ValueError(f"alphas must have one value per block ({self.num_layers}), got {len(alphas)}")

        def hook(alpha: float) -> Callable[..., Any]:
            def scale(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
                return args, {**kwargs, "context": omninft_fast.partial_detach(kwargs["context"], alpha)}

            return scale

        for block, alpha in zip(self.model.transformer_blocks, alphas, strict=True):
            if alpha > 0:
                block.audio_to_video_attn.register_forward_pre_hook(hook(alpha), with_kwargs=True)

    def patch_fp8(
        self, *, backend: str = "torch", recipe: str = "rowwise", modules: str | None = None, cache_weights: bool = True
    ) -> Any:
        """``omninft_fast.fp8.patch`` on the layers ``modules`` names (default: the blocks' attention projections
        and feed-forward layers)."""
        modules = modules or fp8.DEFAULT_MODULES
        return fp8.patch(self.model, backend=backend, recipe=recipe, modules=modules, cache_weights=cache_weights)
