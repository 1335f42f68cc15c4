"""FP8 linear layers for LTX-2: ``patch(model)`` runs the transformer blocks' projections through scaled FP8 GEMMs.

``backend="torch"`` uses PyTorch's own FP8 (casts to ``float8_e4m3fn`` / ``float8_e5m2`` and ``torch._scaled_mm``),
which runs on CPUs and on H100s with a stock torch. Activations and weights in e4m3, output gradients in e5m2, with
current scaling per tensor (``tensorwise``) or per row of each GEMM operand along its kept axis (``rowwise``: per
token and per output channel in the forward; in the two backward GEMMs per gradient row and weight/activation
column, never along the contracted axis, whose scale could not be factored out of the sum). Tensorwise, the weight
gradient reuses the forward's FP8 input and the input gradient's FP8 output gradient, transposed as bytes (one scale
serves both orientations), so backward keeps 1 byte per input value; a frozen weight's layer keeps none. Amax and
scales stay on the device: nothing syncs with the host. ``backend="te"`` runs each selected layer through a
Transformer Engine ``Linear`` that shares the layer's parameters, inside TE's ``fp8_autocast`` with its delayed,
current or block scaling recipe (TE keeps its own scaling state per layer); it needs a CUDA build of TE.

Selected layers are those LTX's own trainer puts in FP8: the attention q/k/v/out projections of the self-, text- and
cross-modal attentions and the feed-forward layers of every transformer block; patchify, output projection, adaLN /
scale-shift, timestep and caption projections and the norms keep their precision. A layer whose in or out features
are not multiples of 16 stays as it is (logged). Layers reading one tensor (an attention's q, k and v) cast and
quantise it once, for all of them. Quantised weights are cached per weight version: a frozen base
weight (LoRA) is quantised once per load, not per forward; a LoRA branch around a patched base layer stays in its
own precision. Optimisers that update weights without bumping their version (torch's fused AdamW) would leave a
stale copy: ``handle.watch(optimizer)`` (or ``handle.refresh()`` after each step) drops the trained weights' copies
after every step. Under ``torch.compile`` the patched layers trace into one graph (no break): the compiler generates
the quantisation from PyTorch's ops, fused into the kernels producing each activation. A graph cannot key a cache on
a weight's version, so it quantises trained weights in every call (as autocast recasts a 16-bit weight in every
forward) and reads frozen weights' copies as inputs once ``handle.prepare()`` made them (the trainer calls it before
each call of a compiled model; it quantises again only what changed).

Error bound (tests): e4m3 keeps 3 mantissa bits, so each quantised value is within a factor ``1 +- 2**-4`` of the
scaled original (away from the subnormal range), and each product in the forward GEMM within ``(1 + 2**-4)**2 - 1
< 0.13`` of the exact one: ``|y - y_exact| <= 0.13 * (|x| @ |w|^T)`` elementwise, plus the output's own rounding.
e5m2 keeps 2 bits, so a gradient GEMM is within ``(1 + 2**-3) * (1 + 2**-4) - 1 < 0.2`` of ``|g| @ |w|``.
"""

from __future__ import annotations

import functools
import logging
import re
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from omninft_fast._checks import check_same_device, check_shape, check_tensor
from omninft_fast.dispatch import BackendError, select

LOG = logging.getLogger(__name__)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
E4M3_MAX, E5M2_MAX = float(torch.finfo(E4M3).max), float(torch.finfo(E5M2).max)
RECIPES = ("tensorwise", "rowwise")
TE_RECIPES = ("delayed", "current", "block")
BACKENDS = ("torch", "te")
# Linear layers of a transformer block that run in FP8 (ltx-core and diffusers name them alike).
DEFAULT_MODULES = r"transformer_blocks\.\d+\..*\.(to_q|to_k|to_v|to_out\.0|net\.0\.proj|net\.2)(\.base_layer)?$"
_MARK = "_omninft_fp8_handle"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize_reference(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize`` in plain PyTorch (any device): the ground truth of the Triton kernel."""
    top = torch.finfo(dtype).max
    amax = x.abs().amax(dim=1, keepdim=True) if rowwise else x.abs().amax()
    scale = _scale(amax, top)
    return (x.float() / scale).clamp(-top, top).to(dtype).contiguous(), scale


def _scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    """``amax * (1 / top)`` in float32, at least float32's smallest normal (a multiplication by the reciprocal: what
    PyTorch computes for ``amax / top`` on a GPU, and what the kernel computes, on every device)."""
    return (amax.float() * (1.0 / top)).clamp(min=torch.finfo(torch.float32).tiny)


def quantize_triton(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize`` through ``omninft_fast.kernels.fp8_quantize`` (CUDA tensors, or CPU under the interpreter):
    one pass per row tile; tensorwise scales take the tensor's amax from one PyTorch reduction first."""
    from omninft_fast.kernels.fp8_quantize import quantize_fp8

    if rowwise:
        return quantize_fp8(x, dtype)
    top = torch.finfo(dtype).max
    return quantize_fp8(x, dtype, _scale(torch.linalg.vector_norm(x, float("inf"), dtype=torch.float32), top))


def quantize(
    x: torch.Tensor, dtype: torch.dtype, rowwise: bool, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q * scale ~ x`` for a 2-D ``x`` of any strides (a transposed view gives the transposed
    copy): ``q`` contiguous in the FP8 ``dtype``, ``scale`` float32 of shape ``(rows, 1)`` when ``rowwise`` else
    ``()``, chosen so the largest magnitude maps to the format's largest value. ``backend`` as in
    ``omninft_fast.dispatch`` (``auto``: the Triton kernel for CUDA tensors, PyTorch elsewhere). Inside
    ``torch.compile`` always PyTorch's ops, which the compiler fuses into the kernel producing ``x``."""
    check_tensor("x", x, ndim=2)
    if x.numel() == 0:
        raise ValueError(f"x must hold at least one element to take a scale from, got shape {tuple(x.shape)}")
    if dtype not in FP8_DTYPES:
        raise ValueError(f"dtype must be one of {FP8_DTYPES}, got {dtype!r}")
    if not isinstance(rowwise, bool):
        raise TypeError(f"rowwise must be a bool, got {type(rowwise).__name__}")
    if torch.compiler.is_compiling():
        return quantize_reference(x, dtype, rowwise)
    _, implementation = select("fp8_quantize", x.device, backend)
    return implementation(x, dtype, rowwise)


def _pad_rows(x: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """``x`` with zero rows appended up to a multiple of ``multiple`` (a GEMM's contraction length must be one)."""
    extra = -x.shape[0] % multiple
    return x if extra == 0 else torch.cat([x, x.new_zeros(extra, x.shape[1])])


def _transposed_padded(q: torch.Tensor) -> torch.Tensor:
    """An FP8 ``q`` (M, K) as the contiguous ``(K, M')`` of its zero-padded rows, copied as bytes (an FP8 zero is
    the zero byte; byte copies run on every device, whatever its FP8 support)."""
    return _pad_rows(q.view(torch.uint8)).t().contiguous().view(q.dtype)


class _WeightCache:
    """The quantised copies of one weight, ``W`` (forward) and ``W^T`` (input gradient), per (storage, version,
    recipe): each built on first use and rebuilt only after the weight changes; ``enabled=False`` keeps none and
    quantises on every use. ``compiled``: the copies of a frozen weight that ``prepare`` made for compiled graphs,
    which read them as inputs (a graph cannot key anything on a weight's version, so they are only as fresh as the
    last ``prepare``)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.key: tuple | None = None
        self.value: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        self.compiled: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    def clear(self) -> None:
        self.key, self.value = None, {}
        self.compiled.clear()

    def prepare(self, weight: torch.Tensor, rowwise: bool, transposed: bool) -> None:
        """Fill ``compiled`` with the current copies of a frozen ``weight`` (``W``, and ``W^T`` if ``transposed``),
        quantising only what changed since the last call; a trained weight gets none."""
        if not self.enabled or weight.requires_grad or weight.is_inference():
            self.compiled.clear()
            return
        for orientation in (False, True) if transposed else (False,):
            self.compiled[orientation] = self.get(weight, rowwise, orientation)

    def prepared(self, weight: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Inside a compiled graph, the copy of a frozen ``weight`` that ``prepare`` made (a graph input); else
        ``None``."""
        if torch.compiler.is_compiling() and not weight.requires_grad:
            return self.compiled.get(transposed)
        return None

    def get(self, weight: torch.Tensor, rowwise: bool, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # Without a prepared copy the graph quantises the weight itself, in a kernel the compiler generates (as
            # autocast recasts a bf16 weight in every forward).
            copy = self.prepared(weight, transposed)
            return _quantize_weight(weight, rowwise, transposed) if copy is None else copy
        if not self.enabled or weight.is_inference():
            # Nothing keys an inference-mode weight's copy: it has no version.
            return _quantize_weight(weight, rowwise, transposed)
        key = (weight.data_ptr(), weight._version, rowwise, weight.dtype)
        if key != self.key:
            self.key, self.value = key, {}
        value = self.value.get(transposed)
        if value is None:
            value = self.value[transposed] = _quantize_weight(weight, rowwise, transposed)
        return value


def _quantize_weight(weight: torch.Tensor, rowwise: bool, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` (or ``W^T``) in e4m3 with its scale."""
    return quantize(weight.detach().t() if transposed else weight.detach(), E4M3, rowwise)


class _InputCache:
    """The activation the patched layers of one model quantised last, as ``(x in the compute dtype, xq, scale)``:
    q, k and v projections (and a cross-attention's k and v) read one tensor, which is then cast and quantised once
    instead of per layer. Keyed on the caller's tensor itself (a weak reference, whose death drops the entry, so
    the cache never keeps an activation alive), its version, the compute dtype, the recipe and the grad mode. The
    entry is one tuple, replaced whole, so a drop from another thread (autograd's) never leaves half an entry."""

    def __init__(self) -> None:
        self.entry: tuple[weakref.ref, tuple, tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] | None = None

    def _drop(self, ref: weakref.ref) -> None:
        entry = self.entry
        if entry is not None and entry[0] is ref:
            self.entry = None

    def get(
        self, x: torch.Tensor, dtype: torch.dtype, rowwise: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (x._version, dtype, rowwise, torch.is_grad_enabled())
        entry = self.entry
        if entry is None or entry[0]() is not x or entry[1] != key:
            cast = x.to(dtype)
            xq, sx = quantize(cast.detach().reshape(-1, cast.shape[-1]), E4M3, rowwise)
            # ``cast is x`` is not held: a strong reference to ``x`` would keep it, and the entry, alive.
            entry = (weakref.ref(x, self._drop), key, (None if cast is x else cast, xq, sx))
            self.entry = entry
        cast, xq, sx = entry[2]
        return (x if cast is None else cast), xq, sx


def _fp8_forward_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rowwise: bool,
    cache: _WeightCache,
    quantized: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out (M, N), xq, scale)``: the forward GEMM of ``_FP8Linear`` on ``x`` as ``(M, K)``; ``quantized``: ``x``
    already quantised, or ``None``. Without gradients it is the whole layer (no autograd function to set up)."""
    x2d = x.reshape(-1, x.shape[-1])
    xq, sx = quantize(x2d, E4M3, rowwise) if quantized is None else quantized
    wq, sw = cache.get(weight, rowwise)
    # cuBLAS adds a 16-bit bias in the GEMM's epilogue; elsewhere it is one more pass.
    fused_bias = bias is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    out = torch._scaled_mm(
        xq,
        wq.t(),
        scale_a=sx,
        scale_b=sw.t() if rowwise else sw,
        bias=bias.to(x.dtype) if fused_bias else None,
        out_dtype=x.dtype,
    )
    if bias is not None and not fused_bias:
        out = out + bias.to(out.dtype)
    return out, xq, sx


class _FP8Linear(torch.autograd.Function):
    """``x @ weight^T + bias`` with FP8 GEMMs in forward and backward (see the module docstring for the scaling);
    ``quantized``: ``x`` already quantised as ``(xq, scale)``, or ``None``."""

    @staticmethod
    def forward(ctx, x, weight, bias, rowwise: bool, cache: _WeightCache, quantized=None):
        out, xq, sx = _fp8_forward_gemm(x, weight, bias, rowwise, cache, quantized)
        x2d = x.reshape(-1, x.shape[-1])
        # What the weight gradient needs of x: nothing for a frozen weight (a LoRA base); x itself, quantised again
        # per column in backward (rowwise); the forward's FP8 copy (tensorwise: its one scale serves X^T too, so half
        # the bytes are kept and nothing is quantised twice).
        kept = () if not ctx.needs_input_grad[1] else (x2d,) if rowwise else (xq, sx)
        # A compiled graph hands its backward the prepared W^T of a frozen weight as a saved tensor.
        transposed = (cache.prepared(weight, True) if ctx.needs_input_grad[0] else None) or ()
        ctx.transposed = len(transposed)
        ctx.save_for_backward(weight, *transposed, *kept)
        ctx.shape, ctx.dtype, ctx.has_bias, ctx.rowwise, ctx.cache = x.shape, x.dtype, bias is not None, rowwise, cache
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        weight, *saved = ctx.saved_tensors
        transposed, kept = saved[: ctx.transposed], saved[ctx.transposed :]
        rowwise, (need_x, need_w) = ctx.rowwise, ctx.needs_input_grad[:2]
        g2d = grad_out.reshape(-1, weight.shape[0])
        grad_x = grad_w = grad_b = None
        if need_x or (need_w and not rowwise):
            gq, sg = quantize(g2d, E5M2, rowwise)
        if need_x:
            # dX (M, K) = G (M, N) @ W (N, K): G scaled per row, W per column (never along the contracted N).
            wq_t, sw = transposed or ctx.cache.get(weight, rowwise, transposed=True)
            # Straight in the input's dtype (no float32 intermediate for 16-bit inputs).
            grad_x = torch._scaled_mm(gq, wq_t.t(), scale_a=sg, scale_b=sw.t() if rowwise else sw, out_dtype=ctx.dtype)
            grad_x = grad_x.reshape(ctx.shape)
        if need_w:
            # dW (N, K) = G^T (N, M) @ X (M, K): G^T scaled per row, X per column (never along the contracted M).
            if rowwise:
                gq_t, sg_t = quantize(_pad_rows(g2d).t(), E5M2, True)
                xq_t, sx_t = quantize(_pad_rows(kept[0]).t(), E4M3, True)
                sx_t = sx_t.t()
            else:
                (xq, sx_t), sg_t = kept, sg
                gq_t, xq_t = _transposed_padded(gq), _transposed_padded(xq)
            grad_w = torch._scaled_mm(gq_t, xq_t.t(), scale_a=sg_t, scale_b=sx_t, out_dtype=torch.float32)
            grad_w = grad_w.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.float().sum(0).to(grad_out.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, recipe: str = "rowwise"
) -> torch.Tensor:
    """``F.linear`` through FP8 GEMMs (``backend="torch"``).

    Args:
        x: ``(..., K)`` activations; weight: ``(N, K)``; bias: ``(N,)`` or None. ``K`` and ``N`` multiples of 16.
        recipe: ``rowwise`` (a scale per token and per output channel) or ``tensorwise`` (one scale each).

    Returns:
        ``(..., N)`` in ``x``'s dtype.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2)
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x's last dimension must be weight's in_features {weight.shape[1]}, got x of shape {tuple(x.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias)
        check_shape("bias", bias, (weight.shape[0],), "weight's out_features")
    check_same_device("x", x, weight=weight, bias=bias)
    return _apply(x, weight, bias, recipe == "rowwise", _WeightCache())


class ScaledMMCounter(TorchDispatchMode):
    """``with ScaledMMCounter() as counter: ...`` counts the FP8 GEMMs (``aten._scaled_mm``) run inside, to check that
    a patched model really runs FP8."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.aten._scaled_mm.default
        return func(*args, **(kwargs or {}))


@functools.cache
def cpu_rowwise_error() -> str | None:
    """Why this torch cannot run rowwise-scaled FP8 GEMMs on the CPU (older builds take tensorwise scales only), or
    ``None`` when it can; probed once with a 16 x 16 GEMM."""
    a = torch.ones(16, 16).to(E4M3)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return f"torch {torch.__version__} runs rowwise-scaled FP8 GEMMs only on GPUs; use recipe='tensorwise' on CPU"
    return None


def _require_cpu_rowwise() -> None:
    error = cpu_rowwise_error()
    if error is not None:
        raise BackendError(f"recipe: {error}")


def _apply(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rowwise: bool,
    cache: _WeightCache,
    inputs: _InputCache | None = None,
) -> torch.Tensor:
    """``_FP8Linear`` on ``x`` in the autocast dtype where autocast is on for its device (what ``F.linear`` computes
    in); rowwise on a CPU only where this torch has it. ``inputs``: share the cast and quantised ``x`` with the
    other layers reading it (eager only: a compiled graph deduplicates the quantisation itself; not for
    inference-mode tensors, which have no version counter)."""
    kind = x.device.type
    compiling = torch.compiler.is_compiling()
    if rowwise and kind == "cpu" and not compiling:
        _require_cpu_rowwise()
    # The meta device has no autocast to ask about (and torch.amp.is_autocast_available breaks a compiled graph).
    autocast = x.is_floating_point() and kind != "meta" and torch.is_autocast_enabled(kind)
    dtype = torch.get_autocast_dtype(kind) if autocast else x.dtype
    if x.numel() == 0:
        # No token: no scale to take (the amax of nothing); the empty product is the same in any precision.
        return torch.nn.functional.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    # An inference-mode tensor has no version counter to key the shared copy on.
    shared = inputs is not None and not compiling and not x.is_inference()
    quantized = None
    if shared:
        x, xq, sx = inputs.get(x, dtype, rowwise)
        quantized = xq, sx
    else:
        x = x.to(dtype)
    if not torch.is_grad_enabled():  # rollouts and old-policy predictions: the GEMM alone
        out = _fp8_forward_gemm(x, weight, bias, rowwise, cache, quantized)[0]
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return _FP8Linear.apply(x, weight, bias, rowwise, cache, quantized)


def _fp8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    check_tensor("input", x)
    return _apply(
        x, self.weight, self.bias, self._omninft_fp8_rowwise, self._omninft_fp8_cache, self._omninft_fp8_inputs
    )


@dataclass
class FP8Handle:
    """What ``patch`` changed: the FP8 layers by name, the layers left as they were and why; ``unpatch`` undoes it."""

    model: nn.Module
    backend: str
    recipe: str
    layers: dict[str, nn.Linear] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def refresh(self) -> None:
        """Drop the cached FP8 copies of the trainable weights (``requires_grad``): after an optimiser step that
        changed them in place without bumping their version; frozen weights keep theirs."""
        for layer in self.layers.values():
            if layer.weight.requires_grad and hasattr(layer, "_omninft_fp8_cache"):
                layer._omninft_fp8_cache.clear()

    def prepare(self, *, transposed: bool = False) -> None:
        """Give compiled graphs the FP8 copies of the frozen weights (``requires_grad`` off: a LoRA run's base, an
        old policy, a reference), ``W`` and, with ``transposed``, ``W^T`` for a backward through them, so the
        graphs read them instead of quantising the weights in every call. Call it before each call of a compiled
        patched model (only weights changed since the last call are quantised again: one check per layer); a graph
        reads the copies as this call left them. Eager calls need none of it."""
        for layer in self.layers.values():
            cache = getattr(layer, "_omninft_fp8_cache", None)
            if cache is not None:
                cache.prepare(layer.weight, layer._omninft_fp8_rowwise, transposed)

    def watch(self, optimizer: torch.optim.Optimizer) -> torch.utils.hooks.RemovableHandle:
        """``refresh`` after every ``optimizer.step()``; returns the hook's handle."""
        return optimizer.register_step_post_hook(lambda *_: self.refresh())

    def unpatch(self) -> None:
        """Give every patched layer its own forward back (weights were never touched)."""
        if getattr(self.model, _MARK, None) is not self:
            raise RuntimeError("this handle was unpatched; call omninft_fast.fp8.patch(model) again")
        for layer in self.layers.values():
            del layer.forward
            for name in ("_omninft_fp8_rowwise", "_omninft_fp8_cache", "_omninft_fp8_inputs", "_omninft_te"):
                if hasattr(layer, name):
                    delattr(layer, name)
        self.layers.clear()
        delattr(self.model, _MARK)


def prepare_compiled(model: nn.Module) -> None:
    """Before a call of ``model``: ``handle.prepare()`` when ``model`` is FP8-patched and compiled
    (``nn.Module.compile``), with ``W^T`` copies when gradients are on; nothing otherwise."""
    handle = getattr(model, _MARK, None)
    if handle is not None and getattr(model, "_compiled_call_impl", None) is not None:
        handle.prepare(transposed=torch.is_grad_enabled())


def _te_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    te, linear, recipe = self._omninft_te
    with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
        return linear(x)


def _te_recipe(name: str) -> object:
    """Transformer Engine's recipe object for ``name``: ``delayed`` (DelayedScaling, amax history), ``current``
    (Float8CurrentScaling), both e4m3 forward / e5m2 backward (``HYBRID``), or ``block`` (Float8BlockScaling)."""
    from transformer_engine.common import recipe

    if name == "delayed":
        return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID)
    if name == "current":
        return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)
    return recipe.Float8BlockScaling()


def _te_linear(te: types.ModuleType, layer: nn.Linear) -> nn.Module:
    """A Transformer Engine ``Linear`` computing with ``layer``'s own weight and bias parameters (shared, so the
    optimiser, checkpoints and EMA updates see one set of weights)."""
    linear = te.Linear(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        params_dtype=layer.weight.dtype,
        device=layer.weight.device,
    )
    linear.weight = layer.weight
    if layer.bias is not None:
        linear.bias = layer.bias
    return linear


def modules_pattern(pattern: str) -> re.Pattern:
    """``patch``'s ``modules`` compiled; ``ValueError`` naming ``modules`` if it is not a regular expression."""
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"modules {pattern!r} is not a regular expression ({error})") from None


def _selected(model: nn.Module, pattern: str) -> Iterator[tuple[str, nn.Linear]]:
    regex = modules_pattern(pattern)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and regex.search(name) and "lora_" not in name:
            yield name, module


def patch(
    model: nn.Module,
    *,
    backend: str = "torch",
    recipe: str = "rowwise",
    modules: str = DEFAULT_MODULES,
    cache_weights: bool = True,
):
    """Run the transformer blocks' linear layers of an LTX-2 (ltx-core or diffusers) in FP8, in place.

    Args:
        model: any module; the layers patched are the ``nn.Linear`` whose qualified names match ``modules`` (by
            default the blocks' attention projections and feed-forward layers; adapters' LoRA layers never).
        backend: ``torch`` (PyTorch's scaled FP8 GEMMs, CPU and H100) or ``te`` (Transformer Engine's ``Linear`` under
            its ``fp8_autocast``, sharing the layer's parameters; where it imports).
        recipe: ``torch``: ``rowwise`` or ``tensorwise`` current scaling; ``te``: ``delayed``, ``current`` or
            ``block`` scaling (``TE_RECIPES``).
        modules: regular expression searched in each layer's qualified name.
        cache_weights: ``torch``: keep each weight's FP8 copies (``W``, and ``W^T`` once a backward ran: 2 bytes per
            parameter beside the weight) until the weight changes; ``False`` quantises the weights on every use
            instead, for a model whose memory cannot hold them (Transformer Engine keeps its own).

    Returns:
        ``FP8Handle`` listing the patched and the skipped layers; ``handle.unpatch()`` restores the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(modules, str):
        raise TypeError(f"modules must be a regular expression string, got {type(modules).__name__}")
    if not isinstance(cache_weights, bool):
        raise TypeError(f"cache_weights must be a bool, got {type(cache_weights).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    allowed = TE_RECIPES if backend == "te" else RECIPES
    if recipe not in allowed:
        raise ValueError(f"recipe must be one of {allowed} with backend {backend!r}, got {recipe!r}")
    if backend == "te" and not cache_weights:
        raise ValueError(
            "cache_weights: False applies to backend 'torch' (Transformer Engine keeps its own FP8 weights)"
        )
    te = None
    if backend == "te":
        try:
            import transformer_engine.pytorch as te
        except ImportError as error:
            raise BackendError(
                f"backend: 'te' needs Transformer Engine, which does not import here ({error})"
            ) from error
        te_recipe = _te_recipe(recipe)
    if getattr(model, _MARK, None) is not None:
        raise RuntimeError(f"this {type(model).__name__} is already patched by omninft_fast.fp8; unpatch() it first")
    if backend == "torch" and recipe == "rowwise" and any(p.device.type == "cpu" for p in model.parameters()):
        _require_cpu_rowwise()
    handle = FP8Handle(model, backend, recipe)
    inputs = _InputCache()
    for name, layer in _selected(model, modules):
        if layer.in_features % 16 or layer.out_features % 16:
            handle.skipped[name] = f"{layer.in_features} -> {layer.out_features} features are not multiples of 16"
            LOG.info("fp8: %s stays in %s (%s)", name, layer.weight.dtype, handle.skipped[name])
            continue
        if te is not None:
            layer._omninft_te = (te, _te_linear(te, layer), te_recipe)
            layer.forward = types.MethodType(_te_forward, layer)
        else:
            layer._omninft_fp8_rowwise = recipe == "rowwise"
            layer._omninft_fp8_cache = _WeightCache(cache_weights)
            layer._omninft_fp8_inputs = inputs
            layer.forward = types.MethodType(_fp8_forward, layer)
        handle.layers[name] = layer
    if not handle.layers:
        raise ValueError(f"modules: no nn.Linear of this {type(model).__name__} matches {modules!r}")
    setattr(model, _MARK, handle)
    return handle
