"""FP8 linear layers (``omninft_fast.fp8``, PyTorch's scaled FP8 GEMMs) against float64, per layer and per model."""

from __future__ import annotations

import importlib.util
import sys
import types
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from omninft_fast import fp8
from omninft_fast.dispatch import BackendError

# Bounds derived in omninft_fast.fp8's docstring: e4m3 x e4m3 products within 13% of |x| |w|, e5m2 x e4m3 within 20%.
FORWARD_BOUND, BACKWARD_BOUND = 0.13, 0.2


def _activations(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """LTX-2-like activations: Gaussian with a few outlier channels 30x larger."""
    x = torch.randn(shape, generator=gen)
    x[..., :: max(1, shape[-1] // 4)] *= 30
    return x


@pytest.mark.parametrize("recipe", fp8.RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)
def test_linear_and_gradients_within_fp8_bounds(
    recipe: str, dtype: torch.dtype, device: str, gen: torch.Generator
) -> None:
    """On CUDA the quantisation runs in the Triton kernel and the GEMMs in cuBLAS; on CPU both in PyTorch."""
    if device == "cpu" and recipe == "rowwise" and fp8.cpu_rowwise_error():
        pytest.skip(fp8.cpu_rowwise_error())
    x = _activations(gen, (2, 37, 64)).to(device, dtype).requires_grad_()  # 74 rows: the weight GEMM pads to 80
    weight = (torch.randn(48, 64, generator=gen) * 0.1).to(device, dtype).requires_grad_()
    bias = torch.randn(48, generator=gen).to(device, dtype).requires_grad_()
    grad = torch.randn(2, 37, 48, generator=gen).to(device, dtype)
    out = fp8.fp8_linear(x, weight, bias, recipe=recipe)
    out.backward(grad)
    xd, wd, bd, gd = (t.detach().double() for t in (x, weight, bias, grad))
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-20  # the result's own rounding, relative
    want = xd @ wd.T + bd
    bound = FORWARD_BOUND * (xd.abs() @ wd.abs().T) + rounding * want.abs() + 1e-6
    assert out.dtype == dtype and bool(((out.double() - want).abs() <= bound).all())
    want_dx, want_dw = gd @ wd, gd.reshape(-1, 48).T @ xd.reshape(-1, 64)
    dx_bound = BACKWARD_BOUND * (gd.abs() @ wd.abs()) + rounding * want_dx.abs() + 1e-6
    dw_bound = BACKWARD_BOUND * (gd.abs().reshape(-1, 48).T @ xd.abs().reshape(-1, 64)) + rounding * want_dw.abs()
    assert bool(((x.grad.double() - want_dx).abs() <= dx_bound).all())
    assert bool(((weight.grad.double() - want_dw).abs() <= dw_bound + 1e-6).all())
    torch.testing.assert_close(bias.grad.double(), gd.sum((0, 1)), rtol=2 * rounding, atol=1e-5)
    # Far from exact, far from garbage: the relative error is that of 3 mantissa bits.
    error = float((out.detach().double() - want).norm() / want.norm())
    assert 1e-4 < error < 0.08


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_an_input_without_tokens_is_linear_of_nothing(recipe: str, gen: torch.Generator) -> None:
    """Zero tokens: an empty output and zero weight and bias gradients, as ``F.linear`` gives (no scale exists)."""
    if recipe == "rowwise" and fp8.cpu_rowwise_error():
        pytest.skip(fp8.cpu_rowwise_error())
    x = torch.randn(2, 0, 32, generator=gen, requires_grad=True)
    weight = torch.randn(48, 32, generator=gen, requires_grad=True)
    bias = torch.randn(48, generator=gen, requires_grad=True)
    out = fp8.fp8_linear(x, weight, bias, recipe=recipe)
    out.backward(torch.ones_like(out))
    assert out.shape == (2, 0, 48) and x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


def test_tensorwise_backward_reuses_the_forward_and_gradient_quantisations(gen: torch.Generator) -> None:
    """Tensorwise, one scale serves both orientations, so the weight gradient's ``X^T`` and ``G^T`` are the byte
    transposes of the FP8 copies the forward and the input gradient made: gradients equal, bit for bit, the GEMMs
    of independently quantised transposes (74 rows: padded to 80 for the weight gradient)."""
    x = _activations(gen, (2, 37, 64)).requires_grad_()
    weight = (torch.randn(48, 64, generator=gen) * 0.1).requires_grad_()
    grad = torch.randn(2, 37, 48, generator=gen)
    fp8.fp8_linear(x, weight, recipe="tensorwise").backward(grad)
    x2d, g2d = x.detach().reshape(-1, 64), grad.reshape(-1, 48)
    wq_t, sw = fp8.quantize_reference(weight.detach().t(), fp8.E4M3, False)
    gq, sg = fp8.quantize_reference(g2d, fp8.E5M2, False)
    want_dx = torch._scaled_mm(gq, wq_t.t(), scale_a=sg, scale_b=sw, out_dtype=torch.float32)
    gq_t, sg_t = fp8.quantize_reference(fp8._pad_rows(g2d).t(), fp8.E5M2, False)
    xq_t, sx_t = fp8.quantize_reference(fp8._pad_rows(x2d).t(), fp8.E4M3, False)
    want_dw = torch._scaled_mm(gq_t, xq_t.t(), scale_a=sg_t, scale_b=sx_t, out_dtype=torch.float32)
    assert torch.equal(x.grad, want_dx.reshape(x.shape)) and torch.equal(weight.grad, want_dw)


@pytest.mark.parametrize("case", ["frozen", "tensorwise", "rowwise"])
def test_what_the_backward_keeps_of_the_input(case: str, gen: torch.Generator) -> None:
    """A frozen weight's layer keeps nothing of its input for backward (the input gradient needs only ``W``);
    tensorwise keeps the forward's FP8 copy and its scale (1 byte per value); rowwise the input itself, which the
    weight gradient quantises again per column."""
    if case == "rowwise" and fp8.cpu_rowwise_error():
        pytest.skip(fp8.cpu_rowwise_error())
    model = nn.Sequential(nn.Linear(64, 48))
    model[0].weight.requires_grad_(case != "frozen")
    fp8.patch(model, recipe="tensorwise" if case != "rowwise" else "rowwise", modules=r"^0$")
    kept: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() != model[0].weight.data_ptr():
            kept.append((t.dtype, tuple(t.shape)))
        return t

    x = _activations(gen, (3, 16, 64)).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model[0](x)
    out.sum().backward()
    assert x.grad is not None and (model[0].weight.grad is None) == (case == "frozen")
    want = {
        "frozen": [],
        "tensorwise": [(fp8.E4M3, (48, 64)), (torch.float32, ())],
        "rowwise": [(torch.float32, (48, 64))],
    }
    assert kept == want[case]


def test_quantize_saturates_and_scales(gen: torch.Generator) -> None:
    x = torch.randn(8, 32, generator=gen) * 1000
    q, scale = fp8.quantize(x, fp8.E4M3, rowwise=True)
    assert q.dtype == fp8.E4M3 and scale.shape == (8, 1)
    assert torch.equal(q.float().abs().amax(1), torch.full((8,), fp8.E4M3_MAX))
    q, scale = fp8.quantize(x, fp8.E5M2, rowwise=False)
    assert scale.shape == () and float(q.float().abs().max()) == fp8.E5M2_MAX


@pytest.fixture(params=["ltx-core", "diffusers"])
def tiny(request: pytest.FixtureRequest):
    from test_ltx2_patch import TinyDiffusers, TinyLTXCore

    return TinyLTXCore() if request.param == "ltx-core" else TinyDiffusers()


def test_patched_model_runs_fp8_and_stays_close(tiny) -> None:
    model, x = tiny.model, tiny.inputs(seed=3)
    with torch.no_grad():
        want = tiny.run(model, x)
    handle = fp8.patch(model)
    names = list(handle.layers)
    assert names and all(".transformer_blocks." in f".{name}" for name in names)
    assert not any(part in name for name in names for part in ("patchify", "proj_out", "adaln", "norm"))
    with torch.no_grad(), fp8.ScaledMMCounter() as counter:
        got = tiny.run(model, x)
    assert counter.calls == len(handle.layers) - _skipped_calls(tiny, handle)
    for g, w in zip(got, want, strict=True):
        # Model-level tolerance (measured 3-8% on these random tiny models): each layer adds 3-4% relative error.
        assert float((g - w).norm() / w.norm()) < 0.15
    handle.unpatch()
    with torch.no_grad():
        again = tiny.run(model, x)
    assert all(torch.equal(a, w) for a, w in zip(again, want, strict=True))


def _skipped_calls(tiny, handle: fp8.FP8Handle) -> int:
    """Patched layers that this tiny model never calls (a block's unused branch), counted by a forward hook."""
    called: set[str] = set()
    hooks = [
        layer.register_forward_hook(lambda *_, name=name: called.add(name)) for name, layer in handle.layers.items()
    ]
    with torch.no_grad():
        tiny.run(tiny.model, tiny.inputs(seed=4))
    for hook in hooks:
        hook.remove()
    return len(handle.layers) - len(called)


def test_weight_quantised_once_per_version(tiny) -> None:
    model, x = tiny.model, tiny.inputs(seed=5)
    handle = fp8.patch(model, recipe="tensorwise")
    layer = next(iter(handle.layers.values()))
    with torch.no_grad():
        tiny.run(model, x)
        first = layer._omninft_fp8_cache.value
        tiny.run(model, x)
        assert layer._omninft_fp8_cache.value is first
        layer.weight.mul_(2)
        tiny.run(model, x)
    assert layer._omninft_fp8_cache.value is not first


def test_uncached_weights_give_the_same_results_and_keep_no_copies() -> None:
    """``cache_weights=False``: the weights are quantised on every use, with the same outputs and gradients as the
    cached copies give, and nothing is kept between uses; Transformer Engine keeps its own, so it is refused there."""
    results = []
    for cache_weights in (True, False):
        gen = torch.Generator().manual_seed(1)
        model = nn.Sequential(nn.Linear(32, 48))
        with torch.no_grad():
            model[0].weight.copy_(torch.randn(48, 32, generator=gen) * 0.1)
            model[0].bias.copy_(torch.randn(48, generator=gen))
        fp8.patch(model, recipe="tensorwise", modules=r"^0$", cache_weights=cache_weights)
        x = _activations(gen, (2, 8, 32)).requires_grad_()
        out = model(x)
        out.square().sum().backward()
        results.append((out, x.grad, model[0].weight.grad))
        assert bool(model[0]._omninft_fp8_cache.value) == cache_weights
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    with torch.inference_mode():  # a model built in inference mode: its weights have no version to key a copy on
        model = nn.Sequential(nn.Linear(32, 48))
        fp8.patch(model, recipe="tensorwise", modules=r"^0$")
        x = torch.randn(2, 32)
        assert torch.equal(model(x), fp8.fp8_linear(x, model[0].weight, model[0].bias, recipe="tensorwise"))
        assert not model[0]._omninft_fp8_cache.value
    with pytest.raises(ValueError, match="^cache_weights: False applies to backend 'torch'"):
        fp8.patch(nn.Sequential(nn.Linear(32, 48)), backend="te", recipe="current", cache_weights=False)


def test_frozen_weight_quantised_once_for_forward_and_once_for_backward(monkeypatch) -> None:
    """A frozen base weight (LoRA) is quantised once as ``W`` and once as ``W^T`` over several training steps."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48))
    model[0].weight.requires_grad_(False)
    handle = fp8.patch(model, modules=r"^0$")
    weights: list[tuple[int, ...]] = []
    quantize = fp8.quantize

    def counting(x, dtype, rowwise, backend=None):
        if x.data_ptr() == model[0].weight.data_ptr():
            weights.append(tuple(x.stride()))
        return quantize(x, dtype, rowwise, backend)

    monkeypatch.setattr(fp8, "quantize", counting)
    for _ in range(3):
        x = torch.randn((16, 32), generator=gen, requires_grad=True)
        model(x).square().sum().backward()
    assert weights == [(32, 1), (1, 32)]
    handle.unpatch()


class _QKV(nn.Module):
    """Three projections of one input (as an attention's q, k, v) and one of another tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.other = (nn.Linear(32, 48) for _ in range(4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.to_q(x) * self.to_k(x) + self.to_v(x) + self.other(y)

    def separately(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``forward`` with each layer's FP8 product from ``fp8_linear``, which quantises its input on its own."""
        q, k, v, other = (
            fp8.fp8_linear(i, m.weight, m.bias, recipe="tensorwise")
            for i, m in ((x, self.to_q), (x, self.to_k), (x, self.to_v), (y, self.other))
        )
        return q * k + v + other


@pytest.mark.parametrize("grad", [False, True])
def test_layers_reading_one_input_quantise_it_once(monkeypatch, grad: bool) -> None:
    """q, k and v of one input share its cast and quantisation (one activation quantisation for them, one for the
    other input), with outputs and gradients identical to each layer quantising on its own; changing the input in
    place, or freeing it, ends the sharing."""
    gen = torch.Generator().manual_seed(2)
    model = _QKV()
    x, y = (_activations(gen, (2, 9, 32)).requires_grad_(grad) for _ in range(2))
    want = model(x, y)
    if grad:
        want.square().sum().backward()
        want_grads = [t.grad.clone() for t in (x, y, *model.parameters())]
        for t in (x, y, *model.parameters()):
            t.grad = None
    handle = fp8.patch(model, recipe="tensorwise", modules=r"^(to_q|to_k|to_v|other)$")
    separate = model.separately(x, y)
    activations: list[torch.Size] = []
    quantize = fp8.quantize

    def counting(t, dtype, rowwise, backend=None):
        if dtype == fp8.E4M3 and t.shape == (18, 32) and t.stride() == (32, 1):
            activations.append(t.shape)
        return quantize(t, dtype, rowwise, backend)

    monkeypatch.setattr(fp8, "quantize", counting)
    with torch.set_grad_enabled(grad):
        got = model(x, y)
    assert len(activations) == 2
    assert torch.equal(got, separate)
    if grad:
        got.square().sum().backward()
        separate_grads = torch.autograd.grad(separate.square().sum(), (x, y, *model.parameters()))
        grads = (x.grad, y.grad, *(p.grad for p in model.parameters()))
        for g, s, w in zip(grads, separate_grads, want_grads, strict=True):
            assert torch.equal(g, s) and float((g - w).norm() / w.norm()) < 0.15
    cache = model.to_q._omninft_fp8_inputs
    holds_y = cache.entry[0]() is y  # (outside ``assert``, whose rewriting would keep a reference to ``y``)
    assert cache is model.other._omninft_fp8_inputs and holds_y
    with torch.no_grad():
        x.mul_(2)
        model(x, y)
    assert len(activations) == 4  # x again (changed in place); y again (the entry had moved on to x)
    del x, y, got, separate, want  # (the other products' autograd graphs hold x and y)
    assert cache.entry is None  # the last input's death dropped the entry
    with torch.inference_mode():  # inference tensors have no version: each layer quantises its own
        x, y = (_activations(gen, (2, 9, 32)) for _ in range(2))
        got = model(x, y)
        assert len(activations) == 8 and cache.entry is None
        assert torch.equal(got, model.separately(x, y))
    handle.unpatch()


def test_patched_layer_follows_autocast_like_linear() -> None:
    """Under autocast the FP8 layer computes from and returns the autocast dtype, as ``nn.Linear`` does."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48))
    x = torch.randn((16, 32), generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        handle = fp8.patch(model, modules=r"^0$")
        got = model(x)
    assert got.dtype == want.dtype == torch.bfloat16
    got.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and bool(torch.isfinite(x.grad).all())
    assert float((got.detach().float() - want.float()).norm() / want.float().norm()) < 0.08
    handle.unpatch()


def test_fp8_linear_compiles_fullgraph(gen: torch.Generator) -> None:
    x, weight = torch.randn(16, 32, generator=gen), torch.randn(48, 32, generator=gen) * 0.1
    compiled = torch.compile(fp8.fp8_linear, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, weight), fp8.fp8_linear(x, weight))


def test_patched_model_compiles_into_one_graph(tiny) -> None:
    """``fullgraph=True`` through every patched layer (no graph break at the weight cache): the one graph holds every
    FP8 GEMM and quantises activations and weights itself with PyTorch's ops, so (``aot_eager``: the graphs inductor
    would compile, without its code generation) forward and gradients equal eager's, which on a CPU quantises with
    the same ops."""
    from torch._dynamo.backends.debugging import aot_eager

    torch._dynamo.reset()
    model, x = tiny.model, tiny.inputs(seed=7)
    handle = fp8.patch(model, recipe="tensorwise")
    graphs = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        # Each FP8 layer's forward and backward are subgraphs of the one graph.
        forwards = [m for name, m in gm.named_modules() if "fwd_body" in name]
        graphs.append(sum(n.target is torch._scaled_mm for m in forwards for n in m.graph.nodes))
        return aot_eager(gm, inputs)

    compiled = torch.compile(lambda inputs: tiny.run(model, inputs), fullgraph=True, backend=backend)
    results = []
    for forward in (lambda inputs: tiny.run(model, inputs), compiled):
        model.zero_grad(set_to_none=True)
        outputs = forward(x)
        sum((out.float() * torch.linspace(-1, 1, out.shape[-1])).sum() for out in outputs).backward()
        results.append((outputs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert graphs == [len(handle.layers) - _skipped_calls(tiny, handle)]
    (want, want_grads), (got, grads) = results
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_step_sends_gradients_through_fp8(tiny) -> None:
    model, x = tiny.model, tiny.inputs(seed=6)
    handle = fp8.patch(model)
    out = tiny.run(model, x)
    sum(o.square().mean() for o in out).backward()
    grads = [layer.weight.grad for layer in handle.layers.values() if layer.weight.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_errors(tiny) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        fp8.patch(tiny.model, backend="fp4")
    with pytest.raises(ValueError, match="recipe must be one of"):
        fp8.patch(tiny.model, recipe="blockwise")
    with pytest.raises(ValueError, match="modules: no nn.Linear"):
        fp8.patch(tiny.model, modules=r"nothing_matches")
    with pytest.raises(ValueError, match=r"^modules '\(' is not a regular expression \(missing \)"):
        fp8.patch(tiny.model, modules="(")
    for bad, message in (
        ({"model": None}, "^model must be a torch.nn.Module, got NoneType$"),
        ({"modules": 3}, "^modules must be a regular expression string, got int$"),
        ({"cache_weights": "no"}, "^cache_weights must be a bool, got str$"),
    ):
        with pytest.raises(TypeError, match=message):
            fp8.patch(**({"model": tiny.model} | bad))
    with pytest.raises(ValueError, match=r"recipe must be one of \('delayed', 'current', 'block'\) with backend 'te'"):
        fp8.patch(tiny.model, backend="te")
    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(BackendError, match="backend: 'te' needs Transformer Engine, which does not import here"):
            fp8.patch(tiny.model, backend="te", recipe="current")
    handle = fp8.patch(tiny.model, modules=r"transformer_blocks\.0\..*to_q$")
    with pytest.raises(RuntimeError, match="already patched"):
        fp8.patch(tiny.model)
    handle.unpatch()
    odd = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Linear(32, 32))
    handle = fp8.patch(odd, modules=r"^\d$")
    assert list(handle.layers) == ["1"] and "not multiples of 16" in handle.skipped["0"]
    with pytest.raises(TypeError, match="^input must have a floating dtype"):
        odd[1](torch.arange(64).reshape(2, 32))
    handle.unpatch()
    with pytest.raises(RuntimeError, match="^this handle was unpatched"):
        handle.unpatch()


def test_bad_inputs_of_fp8_linear_and_quantize_name_the_argument() -> None:
    """Each mistake is one line naming the argument, not a wrong result or an error from inside a GEMM."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 16, generator=gen), torch.randn(32, 16, generator=gen)
    cases = [
        (lambda: fp8.fp8_linear(torch.arange(64).reshape(4, 16), w), TypeError, "^x must have a floating dtype"),
        (lambda: fp8.fp8_linear(x, torch.randn(32, 8)), ValueError, "^x's last dimension must be weight's in_feat"),
        (lambda: fp8.fp8_linear(x, w[0]), ValueError, "^weight must have 2 dimensions"),
        (lambda: fp8.fp8_linear(None, w), TypeError, "^x must be a torch.Tensor, got NoneType$"),
        (lambda: fp8.fp8_linear(x, w, torch.zeros(16)), ValueError, r"^bias must have shape \(32,\) \(weight's out_"),
        (lambda: fp8.fp8_linear(x, w.to("meta")), ValueError, "^weight is on meta but x is on cpu$"),
        (lambda: fp8.quantize(x, torch.float32, True), ValueError, "^dtype must be one of"),
        (lambda: fp8.quantize(x[0], fp8.E4M3, True), ValueError, "^x must have 2 dimensions"),
        (lambda: fp8.quantize(x[:0], fp8.E4M3, False), ValueError, "^x must hold at least one element"),
        (lambda: fp8.quantize(x, fp8.E4M3, "no"), TypeError, "^rowwise must be a bool, got str$"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("watched", [True, False])
def test_the_cached_fp8_weight_follows_a_fused_adamw_step_when_watched(watched: bool) -> None:
    """torch's fused AdamW changes weights in place without bumping their version: ``watch`` drops the stale copy;
    without it the next forward would still use the weight before the step."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48))
    handle = fp8.patch(model, modules=r"^0$")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    if watched:
        handle.watch(optimizer)
    x = torch.randn((16, 32), generator=gen)
    before = model(x)
    before.square().sum().backward()
    optimizer.step()
    after = model(x)
    fresh = fp8.fp8_linear(x, model[0].weight, model[0].bias)
    assert torch.equal(after, fresh) == watched
    assert not torch.equal(before, fresh)


def _stand_in_transformer_engine(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """``transformer_engine`` with its ``pytorch.Linear`` / ``fp8_autocast`` and ``common.recipe`` as plain-PyTorch
    stand-ins that record each autocast's recipe (to check the wiring where TE cannot import)."""
    seen: list[object] = []

    class Linear(nn.Linear):
        def __init__(self, fan_in: int, fan_out: int, *, bias: bool, params_dtype: torch.dtype, device: object) -> None:
            super().__init__(fan_in, fan_out, bias=bias, dtype=params_dtype, device=device)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert seen and seen[-1] is not None, "TE Linear ran outside fp8_autocast"
            return super().forward(x)

    @contextmanager
    def fp8_autocast(enabled: bool, fp8_recipe: object):
        seen.append(fp8_recipe if enabled else None)
        yield

    recipe = types.SimpleNamespace(
        Format=types.SimpleNamespace(HYBRID="HYBRID"),
        DelayedScaling=lambda fp8_format: ("delayed", fp8_format),
        Float8CurrentScaling=lambda fp8_format: ("current", fp8_format),
        Float8BlockScaling=lambda: ("block",),
    )
    modules = {
        "transformer_engine": types.ModuleType("transformer_engine"),
        "transformer_engine.pytorch": types.SimpleNamespace(Linear=Linear, fp8_autocast=fp8_autocast),
        "transformer_engine.common": types.ModuleType("transformer_engine.common"),
        "transformer_engine.common.recipe": recipe,
    }
    modules["transformer_engine"].pytorch = modules["transformer_engine.pytorch"]
    modules["transformer_engine.common"].recipe = recipe
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return seen


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [("delayed", ("delayed", "HYBRID")), ("current", ("current", "HYBRID")), ("block", ("block",))],
)
def test_te_backend_shares_the_layers_parameters_under_fp8_autocast(
    monkeypatch: pytest.MonkeyPatch, recipe: str, expected: tuple
) -> None:
    seen = _stand_in_transformer_engine(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16, bias=False))
    keys = list(model.state_dict())
    x = torch.randn((5, 32), generator=gen)
    plain = model(x)
    handle = fp8.patch(model, backend="te", recipe=recipe, modules=r"^\d$")
    assert list(handle.layers) == ["0", "1"] and list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
    assert seen == [expected, expected]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    optimizer.step()
    patched = model(x)
    handle.unpatch()
    torch.testing.assert_close(patched, model(x), rtol=0, atol=0)
    assert not torch.equal(patched, plain) and list(model.state_dict()) == keys


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="Transformer Engine does not import")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Transformer Engine's FP8 GEMMs need a CUDA GPU")
@pytest.mark.parametrize("recipe", fp8.TE_RECIPES)
def test_te_backend_within_fp8_bounds(recipe: str) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(256, 512).cuda().bfloat16()
    x = _activations(gen, (64, 256)).cuda().bfloat16()
    exact = x.double() @ layer.weight.double().t() + layer.bias.double()
    fp8.patch(nn.Sequential(layer), backend="te", recipe=recipe, modules=r"^0$")
    bound = FORWARD_BOUND * (x.double().abs() @ layer.weight.double().abs().t()) + 1e-2 * exact.abs() + 1e-2
    assert bool(((layer(x).double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_compiled_graph_reads_the_prepared_copies_of_frozen_weights(recipe: str) -> None:
    """After ``handle.prepare(transposed=True)`` a compiled forward + backward through frozen layers takes their FP8
    ``W`` and ``W^T`` as graph inputs (it quantises no weight) and equals eager's outputs and input gradients; a
    frozen weight changed in place and prepared again gives the new results from the same graph (no recompilation);
    a trained weight is quantised inside the graph."""
    from torch._dynamo.backends.debugging import aot_eager

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 64))
    for layer in (model[0], model[2]):
        layer.weight.requires_grad_(False)
    handle = fp8.patch(model, recipe=recipe, modules=r"^(0|2)$")
    fp8_inputs = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        fp8_inputs.append(sorted(tuple(t.shape) for t in inputs if t.dtype == fp8.E4M3))
        return aot_eager(gm, inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)

    def step(forward) -> tuple[torch.Tensor, torch.Tensor]:
        x = _activations(torch.Generator().manual_seed(4), (2, 8, 32)).requires_grad_()
        out = forward(x)
        (out * torch.linspace(-1, 1, 64)).sum().backward()
        return out, x.grad

    for change in (None, 0.5):
        if change is not None:
            with torch.no_grad():
                model[0].weight.mul_(change)
        handle.prepare(transposed=True)
        got, want = step(compiled), step(model)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert fp8_inputs == [[(32, 48), (48, 32), (48, 64), (64, 48)]]  # one graph: W and W^T of both layers
    model[2].weight.requires_grad_(True)
    handle.prepare(transposed=True)
    assert not model[2]._omninft_fp8_cache.compiled and set(model[0]._omninft_fp8_cache.compiled) == {False, True}
    step(compiled)
    assert fp8_inputs[1:] == [[(32, 48), (48, 32)]]  # a new graph, quantising the trained weight itself
    handle.unpatch()


def test_prepare_compiled_prepares_only_a_compiled_patched_model() -> None:
    model = nn.Sequential(nn.Linear(32, 48))
    model[0].weight.requires_grad_(False)
    fp8.patch(model, recipe="tensorwise", modules=r"^0$")
    fp8.prepare_compiled(model)
    assert not model[0]._omninft_fp8_cache.compiled
    model.compile(backend="aot_eager")
    with torch.no_grad():
        fp8.prepare_compiled(model)
    assert set(model[0]._omninft_fp8_cache.compiled) == {False}
    fp8.prepare_compiled(model)
    assert set(model[0]._omninft_fp8_cache.compiled) == {False, True}
    fp8.prepare_compiled(nn.Linear(32, 48))  # not patched: nothing to do
