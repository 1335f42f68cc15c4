"""``omninft_fast.ltx2.patch`` on tiny random-weight LTX-2 models of ltx-core and diffusers.

Every test runs on both libraries. The references are independent: the unpatched library model, Eq 8 written as
``partial_detach`` on K and V in the unpatched model, and Eq 10 from explicitly materialised float64 V2A maps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from omninft_fast import detach_schedule, partial_detach
from omninft_fast.ops import attention as attention_module
from omninft_fast.testing import explicit_cross_attention

ltx2 = pytest.importorskip("omninft_fast.ltx2")

BATCH, LAYERS = 2, 3
FRAMES, HEIGHT, WIDTH, AUDIO_TOKENS = 2, 2, 3, 10
VIDEO_CHANNELS, AUDIO_CHANNELS, TEXT_TOKENS = 16, 8, 5
BACKEND = "reference"
LIBRARIES = ("ltx-core", "diffusers")


def _init_(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter drawn at random (ltx-core leaves its scale-shift tables uninitialised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model


class TinyLTXCore:
    """ltx-core ``LTXModel`` (AudioVideo, split RoPE): 3 blocks, video 4 x 16, audio 4 x 8."""

    library = "ltx-core"
    expected_changed = (
        "audio_patchify_proj.",
        "audio_adaln_single.",
        "av_ca_audio_scale_shift_adaln_single.",
        "transformer_blocks.0.audio_scale_shift_table",
        "transformer_blocks.0.scale_shift_table_a2v_ca_audio",
        "transformer_blocks.0.audio_attn1.",
        "transformer_blocks.0.audio_attn2.",
        "transformer_blocks.0.audio_to_video_attn.to_k.",
        "transformer_blocks.0.audio_to_video_attn.to_v.",
        "transformer_blocks.0.audio_to_video_attn.k_norm.",
    )

    def __init__(self) -> None:
        mod = pytest.importorskip("ltx_core.model.transformer.model", reason="ltx-core (the ltx2 extra) is missing")
        from ltx_core.components.patchifiers import AudioPatchifier, VideoLatentPatchifier
        from ltx_core.model.transformer.attention import AttentionFunction
        from ltx_core.model.transformer.rope import LTXRopeType
        from ltx_core.tools import AudioLatentTools, VideoLatentTools
        from ltx_core.types import AudioLatentShape, VideoLatentShape

        self.model = _init_(
            mod.LTXModel(
                model_type=mod.LTXModelType.AudioVideo,
                num_layers=LAYERS,
                num_attention_heads=4,
                attention_head_dim=16,
                cross_attention_dim=64,
                in_channels=VIDEO_CHANNELS,
                out_channels=VIDEO_CHANNELS,
                audio_num_attention_heads=4,
                audio_attention_head_dim=8,
                audio_cross_attention_dim=32,
                audio_in_channels=AUDIO_CHANNELS,
                audio_out_channels=AUDIO_CHANNELS,
                rope_type=LTXRopeType.SPLIT,
                attention_type=AttentionFunction.PYTORCH,
            ),
            seed=0,
        )
        shape = VideoLatentShape(BATCH, VIDEO_CHANNELS, FRAMES, HEIGHT, WIDTH)
        video = VideoLatentTools(VideoLatentPatchifier(1), shape, fps=24.0).create_initial_state("cpu", torch.float32)
        audio = AudioLatentTools(
            AudioPatchifier(1), AudioLatentShape(BATCH, 2, AUDIO_TOKENS, AUDIO_CHANNELS // 2)
        ).create_initial_state("cpu", torch.float32)
        self.positions = video.positions, audio.positions

    def inputs(self, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {
            "video": torch.randn(BATCH, FRAMES * HEIGHT * WIDTH, VIDEO_CHANNELS, generator=gen),
            "audio": torch.randn(BATCH, AUDIO_TOKENS, AUDIO_CHANNELS, generator=gen),
            "sigma": torch.rand(BATCH, generator=gen),
            "video_context": torch.randn(BATCH, TEXT_TOKENS, 64, generator=gen),
            "audio_context": torch.randn(BATCH, TEXT_TOKENS, 32, generator=gen),
        }

    def run(self, model: nn.Module, x: dict[str, torch.Tensor], skip_a2v=(), skip_v2a=()) -> tuple[torch.Tensor, ...]:
        """Velocities; ``skip_*`` are ``(sample, block)`` pairs perturbed with LTX-2's skip-cross-attention."""
        from ltx_core.guidance.perturbations import (
            BatchedPerturbationConfig,
            Perturbation,
            PerturbationConfig,
            PerturbationType,
        )
        from ltx_core.model.transformer.modality import Modality

        def sample_config(b: int) -> PerturbationConfig:
            return PerturbationConfig(
                [
                    Perturbation(PerturbationType.SKIP_A2V_CROSS_ATTN, [blk for s, blk in skip_a2v if s == b]),
                    Perturbation(PerturbationType.SKIP_V2A_CROSS_ATTN, [blk for s, blk in skip_v2a if s == b]),
                ]
            )

        sigma = x["sigma"]
        modalities = [
            Modality(
                latent=x[name],
                sigma=sigma,
                timesteps=sigma[:, None].expand(BATCH, x[name].shape[1]),
                positions=positions,
                context=x[f"{name}_context"],
            )
            for name, positions in zip(("video", "audio"), self.positions, strict=True)
        ]
        perturbations = BatchedPerturbationConfig([sample_config(b) for b in range(BATCH)])
        return model(video=modalities[0], audio=modalities[1], perturbations=perturbations)

    @staticmethod
    def eq8_reference(model: nn.Module, alphas: list[float]) -> None:
        """Eq 8 inside the unpatched attention: ``partial_detach`` on K and V of each A2V core call."""
        from ltx_core.model.transformer.attention import PytorchAttention

        def eq8(alpha: float) -> Callable[..., torch.Tensor]:
            def attend(q, k, v, heads, mask=None):
                return PytorchAttention()(q, partial_detach(k, alpha), partial_detach(v, alpha), heads, mask)

            return attend

        for block, alpha in zip(model.transformer_blocks, alphas, strict=True):
            block.audio_to_video_attn.attention_function = eq8(alpha)

    @staticmethod
    def v2a_qk(module: nn.Module, query_input: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``(B, N, H*D)`` of an ltx-core V2A call, recomputed from its inputs."""
        from ltx_core.model.transformer.rope import apply_rotary_emb

        q = apply_rotary_emb(module.q_norm(module.to_q(query_input)), kwargs["pe"], module.rope_type)
        k = apply_rotary_emb(module.k_norm(module.to_k(kwargs["context"])), kwargs["k_pe"], module.rope_type)
        return q, k

    @staticmethod
    def enable_checkpointing(model: nn.Module) -> None:
        model.train()
        model.set_gradient_checkpointing(True)


class TinyDiffusers:
    """diffusers ``LTX2VideoTransformer3DModel`` (split RoPE): 3 blocks, video 4 x 16, audio 4 x 8."""

    library = "diffusers"
    expected_changed = (
        "audio_proj_in.",
        "audio_caption_projection.",
        "audio_time_embed.",
        "av_cross_attn_audio_scale_shift.",
        "transformer_blocks.0.audio_scale_shift_table",
        "transformer_blocks.0.audio_a2v_cross_attn_scale_shift_table",
        "transformer_blocks.0.audio_attn1.",
        "transformer_blocks.0.audio_attn2.",
        "transformer_blocks.0.audio_to_video_attn.to_k.",
        "transformer_blocks.0.audio_to_video_attn.to_v.",
        "transformer_blocks.0.audio_to_video_attn.norm_k.",
    )

    def __init__(self) -> None:
        mod = pytest.importorskip(
            "diffusers.models.transformers.transformer_ltx2", reason="diffusers (the ltx2 extra) is missing"
        )
        self.model = _init_(
            mod.LTX2VideoTransformer3DModel(
                in_channels=VIDEO_CHANNELS,
                out_channels=VIDEO_CHANNELS,
                num_attention_heads=4,
                attention_head_dim=16,
                cross_attention_dim=64,
                audio_in_channels=AUDIO_CHANNELS,
                audio_out_channels=AUDIO_CHANNELS,
                audio_num_attention_heads=4,
                audio_attention_head_dim=8,
                audio_cross_attention_dim=32,
                num_layers=LAYERS,
                caption_channels=24,
                rope_type="split",
            ),
            seed=0,
        )

    def inputs(self, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {
            "hidden_states": torch.randn(BATCH, FRAMES * HEIGHT * WIDTH, VIDEO_CHANNELS, generator=gen),
            "audio_hidden_states": torch.randn(BATCH, AUDIO_TOKENS, AUDIO_CHANNELS, generator=gen),
            "encoder_hidden_states": torch.randn(BATCH, TEXT_TOKENS, 24, generator=gen),
            "audio_encoder_hidden_states": torch.randn(BATCH, TEXT_TOKENS, 24, generator=gen),
            "sigma": torch.rand(BATCH, generator=gen),
        }

    def run(self, model: nn.Module, x: dict[str, torch.Tensor], isolate: bool = False) -> tuple[torch.Tensor, ...]:
        """Velocities; ``isolate`` switches A2V and V2A off (``isolate_modalities``)."""
        inputs = {name: value for name, value in x.items() if name != "sigma"}
        timestep = x["sigma"] * 1000
        return model(
            **inputs,
            timestep=timestep[:, None].expand(BATCH, FRAMES * HEIGHT * WIDTH),
            audio_timestep=timestep,
            num_frames=FRAMES,
            height=HEIGHT,
            width=WIDTH,
            audio_num_frames=AUDIO_TOKENS,
            isolate_modalities=isolate,
            return_dict=False,
        )

    @staticmethod
    def eq8_reference(model: nn.Module, alphas: list[float]) -> None:
        """Eq 8 with forward hooks: ``partial_detach`` on the normalised keys (RoPE is linear) and on the values."""
        for block, alpha in zip(model.transformer_blocks, alphas, strict=True):
            for sub in (block.audio_to_video_attn.norm_k, block.audio_to_video_attn.to_v):
                sub.register_forward_hook(lambda _m, _args, out, a=alpha: partial_detach(out, a))

    @staticmethod
    def v2a_qk(module: nn.Module, query_input: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``(B, N, H*D)`` of a diffusers V2A call, recomputed from its inputs."""
        from diffusers.models.transformers.transformer_ltx2 import apply_split_rotary_emb

        q = apply_split_rotary_emb(module.norm_q(module.to_q(query_input)), kwargs["query_rotary_emb"])
        k = module.norm_k(module.to_k(kwargs["encoder_hidden_states"]))
        return q, apply_split_rotary_emb(k, kwargs["key_rotary_emb"])

    @staticmethod
    def enable_checkpointing(model: nn.Module) -> None:
        model.train()
        model.enable_gradient_checkpointing()


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """The models are tiny: intra-op threads only add synchronisation (and contention on shared CI cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=LIBRARIES)
def tiny(request: pytest.FixtureRequest) -> TinyLTXCore | TinyDiffusers:
    return TinyLTXCore() if request.param == "ltx-core" else TinyDiffusers()


@pytest.fixture
def model(tiny: TinyLTXCore | TinyDiffusers) -> nn.Module:
    """A fresh unpatched copy of the tiny model."""
    return copy.deepcopy(tiny.model)


def _weighted_loss(outputs: tuple[torch.Tensor, ...], seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return sum((out * torch.randn(out.shape, generator=gen)).sum() for out in outputs)


def _grads(tiny, model: nn.Module, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _weighted_loss(tiny.run(model, x)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("detach", [None, "0-1:0.5", "eq9"])
def test_forward_matches_unpatched(tiny, model, detach):
    x = tiny.inputs(1)
    expected = tiny.run(model, x)
    handle = ltx2.patch(model, detach=detach, region_layers=[1, 2], backend=BACKEND)
    assert handle.library == tiny.library and handle.num_layers == LAYERS and handle.region_layers == (1, 2)
    for out, ref in zip(tiny.run(model, x), expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_default_backend_forward(tiny, model):
    x = tiny.inputs(2)
    expected = tiny.run(model, x)
    handle = ltx2.patch(model)
    assert handle.detach_alphas == [0.1] * LAYERS and handle.region_layers == ()
    for out, ref in zip(tiny.run(model, x), expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_gradients_match_independent_eq8(tiny, model):
    x, alphas = tiny.inputs(3), [0.7, 0.3, 0.0]
    reference = copy.deepcopy(model)
    tiny.eq8_reference(reference, alphas)
    handle = ltx2.patch(model, detach=None, backend=BACKEND)
    handle.set_detach(alphas)
    assert handle.detach_alphas == alphas
    _assert_grads_close(_grads(tiny, model, x), _grads(tiny, reference, x))


def test_alpha_zero_gradients_equal_unpatched(tiny, model):
    x = tiny.inputs(4)
    expected = _grads(tiny, copy.deepcopy(model), x)
    ltx2.patch(model, detach="0-2:0.0", backend=BACKEND)
    _assert_grads_close(_grads(tiny, model, x), expected)


def test_only_shallow_a2v_kv_paths_change(tiny, model):
    x = tiny.inputs(5)
    expected = _grads(tiny, copy.deepcopy(model), x)
    ltx2.patch(model, detach=[0.6, 0.0, 0.0], backend=BACKEND)
    actual = _grads(tiny, model, x)
    changed = {
        name
        for name, grad in expected.items()
        if not torch.allclose(actual[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()))
    }
    assert changed, "surgery on block 0 changed no gradient"
    assert all(name.startswith(tiny.expected_changed) for name in changed), sorted(changed)
    a2v = "transformer_blocks.0.audio_to_video_attn"
    assert {f"{a2v}.to_k.weight", f"{a2v}.to_v.weight"} <= changed


def test_set_detach_forms(tiny, model):
    handle = ltx2.patch(model, backend=BACKEND)
    handle.set_detach("1-2:0.25")
    assert handle.detach_alphas == [0.0, 0.25, 0.25]
    handle.set_detach(None)
    assert handle.detach_alphas == [0.0] * LAYERS
    with pytest.raises(ValueError, match="one alpha per block"):
        handle.set_detach([0.1])
    with pytest.raises(ValueError, match=r"detach\[1\] must be <= 1"):
        handle.set_detach([0.1, 1.5, 0.0])
    with pytest.raises(TypeError, match="detach must be"):
        handle.set_detach(0.1)


def _explicit_region_scores(tiny, model, steps, last_steps, region_layers):
    """Eq 10 from float64 V2A maps of the unpatched model: mean over region layers and the last steps."""
    calls: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for index, block in enumerate(model.transformer_blocks):
        module = block.video_to_audio_attn

        def record(mod, args, kwargs, index=index):
            calls[index] = tiny.v2a_qk(mod, args[0], kwargs)

        module.register_forward_pre_hook(record, with_kwargs=True)
    total, count = 0.0, 0
    with torch.no_grad():
        for step, x in enumerate(steps):
            calls.clear()
            tiny.run(model, x)
            if step < len(steps) - last_steps:
                continue
            for layer in region_layers:
                q, k = calls[layer]
                heads = model.transformer_blocks[layer].video_to_audio_attn.heads
                q, k = (t.unflatten(2, (heads, -1)) for t in (q, k))
                _, key_mass = explicit_cross_attention(q, k, k, softmax_scale=q.shape[-1] ** -0.5)
                total, count = total + key_mass, count + 1
    return total / count


def test_captured_key_mass_matches_explicit_maps(tiny, model, monkeypatch):
    num_steps, last_steps, region_layers = 4, 2, [1, 2]
    steps = [tiny.inputs(10 + step) for step in range(num_steps)]
    expected = _explicit_region_scores(tiny, copy.deepcopy(model), steps, last_steps, region_layers)

    mass_calls = []
    original = attention_module.attention_key_mass_reference
    monkeypatch.setattr(
        attention_module, "attention_key_mass_reference", lambda *a: mass_calls.append(1) or original(*a)
    )
    handle = ltx2.patch(model, region_layers=region_layers, backend=BACKEND)
    with torch.no_grad():
        tiny.run(model, steps[0])
        assert not mass_calls, "key mass computed outside capture_region_scores"
        with handle.capture_region_scores(num_steps=num_steps, last_steps=last_steps) as capture:
            for step, x in enumerate(steps):
                capture.step = step
                tiny.run(model, x)
                tiny.run(model, x)  # a second (guidance) pass of the same step adds nothing
        tiny.run(model, steps[0])
    assert len(mass_calls) == capture.count == last_steps * len(region_layers)
    scores = capture.scores()
    assert scores.dtype == torch.float32 and scores.shape == (BATCH, FRAMES * HEIGHT * WIDTH)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)


def test_capture_errors(tiny, model):
    handle = ltx2.patch(model, region_layers=[2], backend=BACKEND)
    with handle.capture_region_scores(num_steps=2, last_steps=1) as capture:
        with pytest.raises(RuntimeError, match="cannot nest"), handle.capture_region_scores(num_steps=2, last_steps=1):
            pass
        with pytest.raises(ValueError, match="step must be an int in 0..1"):
            capture.step = 2
    with pytest.raises(RuntimeError, match="set capture.step before each model forward"):
        capture.scores()
    with pytest.raises(RuntimeError, match="capture is closed"):
        capture.step = 0
    handle.unpatch()
    with (
        pytest.raises(ValueError, match="no region layers"),
        ltx2.patch(model).capture_region_scores(num_steps=2, last_steps=1),
    ):
        pass


def _cores(model: nn.Module) -> list[object]:
    """The core attention of every A2V and V2A module: ltx-core's ``attention_function`` or diffusers' processor."""
    modules = [m for b in model.transformer_blocks for m in (b.audio_to_video_attn, b.video_to_audio_attn)]
    return [m.processor if hasattr(m, "processor") else m.attention_function for m in modules]


def test_unpatch_restores_exactly(tiny, model):
    x = tiny.inputs(6)
    expected = tiny.run(model, x)
    originals = _cores(model)
    handle = ltx2.patch(model, detach="0-1:0.5", backend=BACKEND)
    assert all(a is not b for a, b in zip(_cores(model), originals, strict=True))
    handle.unpatch()
    assert all(a is b for a, b in zip(_cores(model), originals, strict=True))
    for out, ref in zip(tiny.run(model, x), expected, strict=True):
        assert torch.equal(out, ref)
    with pytest.raises(RuntimeError, match="unpatched"):
        handle.unpatch()
    with pytest.raises(RuntimeError, match="unpatched"):
        handle.set_detach(None)
    ltx2.patch(model, backend=BACKEND).unpatch()


def test_double_patch_rejected(model):
    handle = ltx2.patch(model, backend=BACKEND)
    with pytest.raises(RuntimeError, match="already patched"):
        ltx2.patch(model, backend=BACKEND)
    assert handle.detach_alphas == [0.1] * LAYERS


def test_state_dict_unchanged(model):
    before = {name: value.clone() for name, value in model.state_dict().items()}
    names = [name for name, _ in model.named_parameters()]
    handle = ltx2.patch(model, backend=BACKEND)
    state = model.state_dict()
    assert list(state) == list(before)
    assert all(torch.equal(state[name], value) for name, value in before.items())
    assert [name for name, _ in model.named_parameters()] == names
    handle.unpatch()
    assert list(model.state_dict()) == list(before)


def test_gradient_checkpointing(tiny, model):
    x, alphas = tiny.inputs(8), [0.5, 0.2, 0.0]
    reference = copy.deepcopy(model)
    ltx2.patch(reference, detach=alphas, backend=BACKEND)
    expected = _grads(tiny, reference, x)
    tiny.enable_checkpointing(model)
    handle = ltx2.patch(model, detach=alphas, region_layers=[1, 2], backend=BACKEND)
    _assert_grads_close(_grads(tiny, model, x), expected)
    with handle.capture_region_scores(num_steps=1, last_steps=1) as capture:
        capture.step = 0
        _grads(tiny, model, x)  # the backward recomputes the blocks: no second key mass
    assert capture.count == 2


def test_skipped_cross_attention_stays_skipped(tiny, model):
    x = tiny.inputs(9)
    handle = ltx2.patch(copy.deepcopy(model), detach=[1.0, 0.0, 0.0], region_layers=[1, 2], backend=BACKEND)
    patched = handle.model
    if tiny.library == "ltx-core":
        skips = {"skip_a2v": [(0, 0), (1, 0), (0, 1)], "skip_v2a": [(0, 2), (1, 2)]}
    else:
        skips = {"isolate": True}
    expected = tiny.run(model, x, **skips)
    for out, ref in zip(tiny.run(patched, x, **skips), expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    # Block 0's A2V is skipped for every sample, so alpha = 1 there changes nothing.
    grads = []
    for net in (model, patched):
        net.zero_grad(set_to_none=True)
        _weighted_loss(tiny.run(net, x, **skips)).backward()
        grads.append({name: p.grad for name, p in net.named_parameters() if p.grad is not None})
    _assert_grads_close(grads[1], grads[0])

    with torch.no_grad(), handle.capture_region_scores(num_steps=1, last_steps=1) as capture:
        capture.step = 0
        tiny.run(patched, x, **skips)
    assert capture.count == (1 if tiny.library == "ltx-core" else 0)


def test_unknown_models_rejected(tiny):
    with pytest.raises(TypeError, match="model must be an LTX-2 audio-video transformer"):
        ltx2.patch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        ltx2.patch(object())
    if tiny.library == "ltx-core":
        from ltx_core.model.transformer.model import LTXModel, LTXModelType

        video_only = LTXModel(
            model_type=LTXModelType.VideoOnly,
            num_layers=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            in_channels=4,
            out_channels=4,
        )
        with pytest.raises(TypeError, match="no audio_to_video_attn"):
            ltx2.patch(video_only)


def test_bad_arguments_rejected(model):
    with pytest.raises(ValueError, match="region_layers must hold block indices in 0..2"):
        ltx2.patch(model, region_layers=[3])
    with pytest.raises(ValueError, match="one alpha per block"):
        ltx2.patch(model, detach=[0.1, 0.1])
    with pytest.raises(ValueError, match="^detach '0-9' is neither 'eq9' nor a valid spec: spec entry"):
        ltx2.patch(model, detach="0-9")
    with pytest.raises(TypeError, match="^region_layers must be a sequence of block indices or None, got int$"):
        ltx2.patch(model, region_layers=2)
    with pytest.raises(Exception, match="backend='fast'"):
        ltx2.patch(model, backend="fast")
    with pytest.raises(Exception, match="^backend='cpp': op 'cross_attention' has no such backend"):
        ltx2.patch(model, backend="cpp")
    handle = ltx2.patch(model, detach="EQ9", backend=BACKEND)
    assert handle.num_layers == LAYERS and handle.detach_alphas == detach_schedule(LAYERS, boundary=10)
    with pytest.raises(ValueError, match="^rows must be a positive int, got 0$"), handle.split_rows(0):
        pass


def _compiled(fn: Callable) -> Callable:
    """``fullgraph=True``: any graph break (from this package or the library) fails the test. Dynamo's graph runs
    as captured (backend ``eager``): the reference attention has no custom op whose fake implementation AOTAutograd
    would exercise (``test_op_compile.py`` does that for the ops)."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="eager")


def test_compiles_into_one_graph(tiny, model):
    """A patched model compiles with no graph break; outputs, gradients and Eq 10 scores equal eager's."""
    x, steps = tiny.inputs(11), [tiny.inputs(12 + step) for step in range(2)]
    eager = copy.deepcopy(model)
    handles = [ltx2.patch(net, detach=[0.5, 0.2, 0.0], region_layers=[1, 2]) for net in (eager, model)]
    run = _compiled(lambda x: tiny.run(model, x))
    results = []
    for handle, forward, net in zip(handles, (lambda x: tiny.run(eager, x), run), (eager, model), strict=True):
        outputs = forward(x)
        net.zero_grad(set_to_none=True)
        _weighted_loss(outputs).backward()
        grads = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
        with torch.no_grad(), handle.capture_region_scores(num_steps=2, last_steps=1) as capture:
            for step, inputs in enumerate(steps):
                capture.step = step
                forward(inputs)
                forward(inputs)  # a second pass of the same step adds nothing
        results.append((outputs, grads, capture.scores(), capture.count))
    (outputs, grads, scores, count), (want_outputs, want_grads, want_scores, want_count) = results[1], results[0]
    for out, ref in zip(outputs, want_outputs, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    _assert_grads_close(grads, want_grads)
    assert count == want_count == 2
    torch.testing.assert_close(scores, want_scores, rtol=1e-6, atol=1e-7)


def test_environment_backend_reaches_the_patched_attention(tiny, model, monkeypatch):
    """``patch`` without ``backend=`` leaves the choice to ``$OMNINFT_BACKEND`` on every call."""
    from omninft_fast import BackendError, dispatch

    x = tiny.inputs(13)
    ltx2.patch(model)
    chosen = []
    select = dispatch.select

    def spy(op, device, backend=None):
        name, impl = select(op, device, backend)
        chosen.append((op, backend, name))
        return name, impl

    monkeypatch.setattr(dispatch, "select", spy)
    monkeypatch.setenv("OMNINFT_BACKEND", "reference")
    tiny.run(model, x)
    assert chosen and set(chosen) == {("cross_attention", None, "reference")}
    monkeypatch.setenv("OMNINFT_BACKEND", "cpp")
    with pytest.raises(BackendError, match="op 'cross_attention' has no 'cpp' backend"):
        tiny.run(model, x)


def test_float32_queries_under_autocast_match_the_library(tiny, model):
    """CUDA autocast runs RMSNorm in float32, so q/k arrive in float32 beside bfloat16 values (emulated on CPU)."""
    for block in model.transformer_blocks:
        for module in (block.audio_to_video_attn, block.video_to_audio_attn):
            for norm in ("q_norm", "k_norm", "norm_q", "norm_k"):
                if hasattr(module, norm):
                    getattr(module, norm).register_forward_hook(lambda _m, _args, out: out.float())
    x = tiny.inputs(14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = tiny.run(model, x)
        ltx2.patch(model, detach=None, backend=BACKEND)
        outputs = tiny.run(model, x)
    for out, ref in zip(outputs, expected, strict=True):
        assert out.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(out, ref, rtol=0.0, atol=0.0)


def test_diffusers_context_parallelism_refused(tiny, model):
    if tiny.library != "diffusers":
        pytest.skip("context parallelism is a diffusers feature")
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    model._parallel_config = config
    with pytest.raises(ValueError, match="does not support diffusers' context parallelism"):
        ltx2.patch(model)
    model._parallel_config = None
    ltx2.patch(model, backend=BACKEND)
    model.transformer_blocks[1].video_to_audio_attn.processor._parallel_config = config  # as enable_parallelism does
    with pytest.raises(RuntimeError, match="only see this rank's token shard"):
        tiny.run(model, tiny.inputs(15))
