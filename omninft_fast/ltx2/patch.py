"""``patch(model)``: route a loaded LTX-2's A2V/V2A core attention to ``omninft_fast.cross_attention`` in place.

Eq 8-9 (partial stop-gradient on the A2V keys/values of shallow layers) become a per-layer ``kv_grad_scale``;
Eq 10 (V2A key mass of deep layers over the last sampling steps) is captured only inside
``PatchHandle.capture_region_scores``. Weights, parameter names and the forward values stay as they were.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from omninft_fast import dispatch
from omninft_fast._checks import check_scalar
from omninft_fast.ltx_attention import CrossAttentionFunction
from omninft_fast.ops.region import RegionScoreAccumulator
from omninft_fast.ops.surgery import detach_schedule

# Eq 9's two zones and Eq 10's layer set meet at this layer in the paper (48-layer LTX-2).
DEEP_LAYER_BOUNDARY = 10
# ``detach`` value that selects Eq 9's schedule: alpha 0.1 below DEEP_LAYER_BOUNDARY, 0 from there on.
EQ9 = "eq9"
# Attribute set on a patched model; holds its handle.
_MARK = "_omninft_ltx2_handle"

_EXPECTED = (
    "an LTX-2 audio-video transformer: ltx_core.model.transformer.model.LTXModel built with "
    "model_type=LTXModelType.AudioVideo, or diffusers.LTX2VideoTransformer3DModel"
)

DetachSpec = Sequence[float] | str | None


@dataclass(frozen=True)
class _Library:
    """How one library exposes the core attention of an ``Attention`` module.

    ``get`` reads what is installed, ``install`` puts an object there, ``adapt`` turns the shared
    ``CrossAttentionFunction`` core into that object, and ``refusal`` says why a model cannot be patched (or None).
    """

    name: str
    get: Callable[[nn.Module], Any]
    install: Callable[[nn.Module, Any], None]
    adapt: Callable[[CrossAttentionFunction], Any]
    refusal: Callable[[nn.Module], str | None]


def _ltx_core_library() -> _Library:
    def install(module: nn.Module, core: Any) -> None:
        module.attention_function = core

    return _Library("ltx-core", lambda module: module.attention_function, install, lambda core: core, lambda _: None)


def _diffusers_library() -> _Library:
    from omninft_fast.ltx2.diffusers import LTX2CrossAttnProcessor, context_parallel_error

    def refusal(model: nn.Module) -> str | None:
        return context_parallel_error(getattr(model, "_parallel_config", None))

    return _Library(
        "diffusers", lambda module: module.processor, lambda m, p: m.set_processor(p), LTX2CrossAttnProcessor, refusal
    )


# (defining module, class name) -> library; subclasses are recognised through their MRO.
_KNOWN_MODELS: dict[tuple[str, str], Callable[[], _Library]] = {
    ("ltx_core.model.transformer.model", "LTXModel"): _ltx_core_library,
    ("diffusers.models.transformers.transformer_ltx2", "LTX2VideoTransformer3DModel"): _diffusers_library,
}


def _recognise(model: object) -> tuple[_Library, list[nn.Module], list[nn.Module]]:
    """The library of ``model`` and its per-block A2V and V2A attention modules; a clear error otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be {_EXPECTED}; got {type(model).__name__}, which is not a torch.nn.Module")
    factory = next(
        (_KNOWN_MODELS[key] for cls in type(model).__mro__ if (key := (cls.__module__, cls.__name__)) in _KNOWN_MODELS),
        None,
    )
    if factory is None:
        raise TypeError(f"model must be {_EXPECTED}; got {type(model).__module__}.{type(model).__qualname__}")
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(f"model must be {_EXPECTED}; this {type(model).__name__} has no transformer_blocks")
    a2v, v2a = [], []
    for index, block in enumerate(blocks):
        pair = getattr(block, "audio_to_video_attn", None), getattr(block, "video_to_audio_attn", None)
        if not all(isinstance(m, nn.Module) for m in pair):
            raise TypeError(
                f"model must be {_EXPECTED}; transformer_blocks.{index} has no audio_to_video_attn / "
                "video_to_audio_attn (a video-only or audio-only model has no cross-modal attention to patch)"
            )
        a2v.append(pair[0])
        v2a.append(pair[1])
    return factory(), a2v, v2a


def _resolve_detach(detach: DetachSpec, num_layers: int) -> list[float]:
    """Per-layer A2V detach ratios from ``EQ9``, a spec string, a sequence of floats, or None (no surgery)."""
    if detach is None:
        return [0.0] * num_layers
    if isinstance(detach, str):
        if detach.strip().lower() == EQ9:
            return detach_schedule(num_layers, boundary=DEEP_LAYER_BOUNDARY)
        try:
            return detach_schedule(num_layers, spec=detach)
        except ValueError as error:
            raise ValueError(f"detach {detach!r} is neither {EQ9!r} nor a valid spec: {error}") from None
    if not isinstance(detach, Sequence):
        raise TypeError(
            f"detach must be {EQ9!r}, a spec string like '0-9:0.1', a sequence of {num_layers} floats or None, "
            f"got {type(detach).__name__}"
        )
    if len(detach) != num_layers:
        raise ValueError(f"detach must have one alpha per block ({num_layers}), got {len(detach)}")
    return [check_scalar(f"detach[{layer}]", alpha, low=0.0, high=1.0) for layer, alpha in enumerate(detach)]


def _resolve_region_layers(region_layers: Iterable[int] | None, num_layers: int) -> tuple[int, ...]:
    if region_layers is None:
        return tuple(range(DEEP_LAYER_BOUNDARY, num_layers))
    if isinstance(region_layers, (str, bytes)) or not isinstance(region_layers, Iterable):
        raise TypeError(
            f"region_layers must be a sequence of block indices or None, got {type(region_layers).__name__}"
        )
    layers = tuple(region_layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"region_layers must hold block indices in 0..{num_layers - 1}, got {layer!r}")
    return tuple(sorted(set(layers)))


class RegionCapture:
    """Eq 10 scores gathered by ``PatchHandle.capture_region_scores``.

    Set ``step`` (``0 .. num_steps - 1``, sampling order) before each model forward. The first forward after each
    assignment adds the V2A key mass of every region layer at that step when the step is one of the last
    ``last_steps``; later forwards of the same step (guidance passes, checkpoint recomputation) add nothing.
    """

    def __init__(self, handle: PatchHandle, num_steps: int, last_steps: int) -> None:
        self._handle = handle
        self._accumulator = RegionScoreAccumulator(num_steps=num_steps, last_steps=last_steps, boundary=0)
        self._step: int | None = None
        self._armed: set[int] = set()

    @property
    def step(self) -> int | None:
        """The sampling step of the next forward."""
        return self._step

    @step.setter
    def step(self, step: int) -> None:
        if self._handle._capture is not self:
            raise RuntimeError("this capture is closed: set step inside the capture_region_scores block")
        wanted = [layer for layer in self._handle.region_layers if self._accumulator.wants(layer, step)]
        self._step = step
        self._armed = set(wanted)
        self._handle._refresh()

    def armed(self, layer: int) -> bool:
        """Whether the next forward should hand ``layer``'s V2A key mass to ``receive``."""
        return layer in self._armed

    def receive(self, layer: int, key_mass: torch.Tensor) -> bool:
        """Add ``layer``'s ``(B, Nv)`` key mass if it is armed (then disarm it); returns whether it was added."""
        if layer not in self._armed:
            return False
        self._accumulator.add(layer, self._step, key_mass)
        self._armed.discard(layer)
        return True

    @property
    def count(self) -> int:
        """How many (layer, step) key masses were added."""
        return self._accumulator.count

    def scores(self) -> torch.Tensor:
        """``(B, Nv)`` float32 per-video-token scores ``s`` of Eq 10."""
        if self._accumulator.count == 0:
            raise RuntimeError(
                f"no V2A key mass was captured for region layers {list(self._handle.region_layers)} in the last "
                f"{self._accumulator.last_steps} of {self._accumulator.num_steps} steps; set capture.step before "
                "each model forward"
            )
        return self._accumulator.scores()

    def close(self) -> None:
        self._armed = set()


class PatchHandle:
    """The patched state of one model: per-layer A2V detach ratios and the optional region capture.

    Attributes:
        model: the patched model.
        num_layers: transformer blocks of the model.
        region_layers: blocks whose V2A key mass enters Eq 10.
        library: ``"ltx-core"`` or ``"diffusers"``.
    """

    def __init__(
        self,
        model: nn.Module,
        library: _Library,
        a2v: list[nn.Module],
        v2a: list[nn.Module],
        alphas: list[float],
        region_layers: tuple[int, ...],
        backend: str | None,
        check_values: bool | None = None,
    ) -> None:
        self.model = model
        self.library = library.name
        self.num_layers = len(a2v)
        self.region_layers = region_layers
        self._library = library
        self._a2v, self._v2a = a2v, v2a
        self._originals = [library.get(m) for m in a2v], [library.get(m) for m in v2a]
        self._alphas = alphas
        self._capture: RegionCapture | None = None
        self._expand: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._split: int | None = None
        self._parts: dict[int, list[torch.Tensor]] = {}
        # One core (and one key-mass sink) per module for the handle's lifetime; ``_refresh`` only changes their
        # attributes, so a compiled model recompiles once per state (detach ratios, armed sinks), not per capture.
        self._a2v_cores = [CrossAttentionFunction(backend=backend, check_values=check_values) for _ in a2v]
        self._v2a_cores = [CrossAttentionFunction(backend=backend, check_values=check_values) for _ in v2a]
        self._sinks = [functools.partial(self._receive, layer) for layer in range(self.num_layers)]
        for modules, cores in ((a2v, self._a2v_cores), (v2a, self._v2a_cores)):
            for module, core in zip(modules, cores, strict=True):
                library.install(module, library.adapt(core))
        self._patched = True
        self._refresh()
        setattr(model, _MARK, self)

    @property
    def detach_alphas(self) -> list[float]:
        """Per-block A2V detach ratios (``kv_grad_scale = 1 - alpha``)."""
        return list(self._alphas)

    def set_detach(self, schedule: DetachSpec) -> None:
        """Change the per-block A2V detach ratios: ``EQ9``, a spec like ``"0-9:0.1"``, floats, or None (none)."""
        self._check_patched()
        self._alphas = _resolve_detach(schedule, self.num_layers)
        self._refresh()

    @contextmanager
    def capture_region_scores(self, *, num_steps: int, last_steps: int) -> Iterator[RegionCapture]:
        """Capture Eq 10 scores over a sampling run; outside this context no key mass is computed.

        Args:
            num_steps: sampling steps of the run.
            last_steps: how many final steps count (``|T|``).

        Yields:
            ``RegionCapture``: set its ``step`` before each forward, read ``scores()`` (``(B, Nv)``) after.
        """
        self._check_patched()
        if not self.region_layers:
            raise ValueError(
                f"no region layers to capture: the model has {self.num_layers} blocks and the default region is "
                f"blocks >= {DEEP_LAYER_BOUNDARY}; pass region_layers= to patch()"
            )
        if self._capture is not None:
            raise RuntimeError("capture_region_scores is already active on this model; captures cannot nest")
        capture = RegionCapture(self, num_steps, last_steps)
        self._capture = capture
        try:
            yield capture
        finally:
            capture.close()
            self._capture = None
            if self._patched:
                self._refresh()

    @contextmanager
    def expanded_rows(self, expand: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Inside, the blocks run on part of the forward's samples: ``expand`` maps a ``(b, Nv)`` key mass of
        those samples to the ``(B, Nv)`` key mass of all of them (a sample that shares another's blocks gets a
        copy of its mass) before the capture takes it."""
        previous, self._expand = self._expand, expand
        try:
            yield
        finally:
            self._expand = previous

    @contextmanager
    def split_rows(self, rows: int) -> Iterator[None]:
        """Inside, a block runs on the forward's ``rows`` samples in consecutive parts, one call each: a layer's
        ``(b, Nv)`` key masses are joined in call order and reach the capture once they cover all ``rows``."""
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive int, got {rows!r}")
        previous, self._split = self._split, rows
        try:
            yield
        finally:
            self._split = previous
            self._parts.clear()

    def unpatch(self) -> None:
        """Put the model's original attention back; the handle is unusable afterwards."""
        self._check_patched()
        for modules, originals in zip((self._a2v, self._v2a), self._originals, strict=True):
            for module, original in zip(modules, originals, strict=True):
                self._library.install(module, original)
        delattr(self.model, _MARK)
        self._patched = False

    def _check_patched(self) -> None:
        if not self._patched:
            raise RuntimeError("this handle was unpatched; call omninft_fast.ltx2.patch(model) again")

    def _receive(self, layer: int, key_mass: torch.Tensor) -> None:
        """Key-mass sink of ``layer``'s V2A core: hand the mass to the capture, then stop computing it."""
        if self._split is not None:
            parts = self._parts.setdefault(layer, [])
            parts.append(key_mass)
            if sum(part.shape[0] for part in parts) < self._split:
                return
            key_mass = torch.cat(self._parts.pop(layer))
        if self._expand is not None:
            key_mass = self._expand(key_mass)
        if self._capture is not None and self._capture.receive(layer, key_mass):
            self._refresh(layer)

    def _refresh(self, layer: int | None = None) -> None:
        """Set the cores to the current state (detach ratios, armed sinks), on every block or on ``layer`` only."""
        capture = self._capture
        for index in range(self.num_layers) if layer is None else (layer,):
            self._a2v_cores[index].kv_grad_scale = 1.0 - self._alphas[index]
            armed = capture is not None and capture.armed(index)
            self._v2a_cores[index].key_mass_sink = self._sinks[index] if armed else None


def patch(
    model: nn.Module,
    *,
    detach: DetachSpec = EQ9,
    region_layers: Iterable[int] | None = None,
    backend: str | None = None,
    check_values: bool | None = None,
) -> PatchHandle:
    """Make a loaded LTX-2 OmniNFT-ready in place: A2V/V2A core attention runs on ``omninft_fast.cross_attention``.

    Args:
        model: ltx-core ``LTXModel`` (``AudioVideo``) or diffusers ``LTX2VideoTransformer3DModel``.
        detach: A2V detach ratios per block (Eq 8-9): ``"eq9"`` (alpha 0.1 below block 10), a spec string such as
            ``"0-9:0.1"``, one float per block, or None for no surgery.
        region_layers: blocks whose V2A key mass enters Eq 10; default blocks ``>= 10``.
        backend: ``cross_attention`` backend (``auto`` | ``triton`` | ``reference``); None (the default)
            reads ``$OMNINFT_BACKEND`` on every call, as every other op does.
        check_values: the attention's per-call value checks (None: ``cross_attention``'s default, on for CPU
            tensors; False for a caller that validates its results once per iteration, as the trainer does).

    Returns:
        ``PatchHandle`` with ``set_detach``, ``capture_region_scores`` and ``unpatch``.
    """
    existing = getattr(model, _MARK, None)
    if existing is not None:
        raise RuntimeError(
            f"this {type(model).__name__} is already patched by omninft_fast.ltx2; call handle.unpatch() first "
            "or use handle.set_detach() to change the schedule"
        )
    library, a2v, v2a = _recognise(model)
    refusal = library.refusal(model)
    if refusal is not None:
        raise ValueError(refusal)
    dispatch.check_op_backend("cross_attention", backend)
    num_layers = len(a2v)
    return PatchHandle(
        model,
        library,
        a2v,
        v2a,
        _resolve_detach(detach, num_layers),
        _resolve_region_layers(region_layers, num_layers),
        backend,
        check_values,
    )
