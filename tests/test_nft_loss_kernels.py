"""The fused NFT loss backends (Triton, C++ extension) against the float64 oracle ``explicit_nft_loss``."""

from __future__ import annotations

import itertools

import pytest
import torch

from omninft_fast import dispatch, nft_loss
from omninft_fast.testing import explicit_nft_loss


def _triton_reason() -> str | None:
    return dispatch._why_not("triton", torch.device("cpu"))


def _cpp_reason() -> str | None:
    return dispatch._why_not("cpp", torch.device("cpu"))


needs_triton = pytest.mark.skipif(_triton_reason() is not None, reason=str(_triton_reason()))
needs_cpp = pytest.mark.skipif(_cpp_reason() is not None, reason=str(_cpp_reason()))

BACKENDS = [pytest.param("triton", marks=needs_triton), pytest.param("cpp", marks=needs_cpp)]
DTYPES = {
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cpp": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
}
SHAPES = [(2, 37, 45), (3, 19, 128), (1, 5, 3), (4, 11, 200)]
OPTIONS = {
    "plain": {},
    "token_weight": {"token_weight": True},
    "sample_weight": {"sample_weight": True},
    "inverse_beta": {"inverse_beta_scale": True},
    "kl": {"kl_weight": 0.3},
    "all": {"token_weight": True, "sample_weight": True, "inverse_beta_scale": True, "kl_weight": 0.7},
    "x0_norm": {"x0_norm_t": True},
    "x0_all": {
        "x0_norm_t": True,
        "token_weight": True,
        "sample_weight": True,
        "inverse_beta_scale": True,
        "policy_scale": 5.0,
        "kl_weight": 0.7,
        "kl_space": "x0",
    },
}
# (loss rtol, gradient tolerance relative to its largest entry) per dtype: float32 accumulation everywhere except
# float64 in the C++ extension; half-precision gradients are rounded once on store.
TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-6), torch.float16: (2e-5, 1e-3)}
TOLERANCES[torch.bfloat16] = (2e-5, 8e-3)


def _inputs(shape: tuple[int, int, int], dtype: torch.dtype, r_mode: str, seed: int, **options: object) -> dict:
    """Random ragged inputs already rounded to ``dtype``; weights in float32, ``r`` per ``r_mode``."""
    g = torch.Generator().manual_seed(seed)
    batch, tokens, _ = shape

    def velocity() -> torch.Tensor:
        return torch.randn(shape, generator=g).to(dtype)

    if r_mode == "zero":
        r = torch.zeros(batch)
    elif r_mode == "one":
        r = torch.ones(batch)
    else:
        r = torch.rand(batch, generator=g)
        r[0] = 0.5
    kwargs = {"v_theta": velocity(), "v_old": velocity(), "target": velocity(), "r": r}
    if options.get("token_weight"):
        w = torch.rand(batch, tokens, generator=g) + 0.1
        w[:, 0] = 0.0
        kwargs["token_weight"] = w
    if options.get("sample_weight"):
        kwargs["sample_weight"] = torch.rand(batch, generator=g) * 2
    if options.get("inverse_beta_scale"):
        kwargs["inverse_beta_scale"] = True
    if options.get("kl_weight"):
        kwargs["kl_weight"] = options["kl_weight"]
        kwargs["v_ref"] = velocity()
    if options.get("x0_norm_t"):
        kwargs["x0_norm_t"] = torch.rand(batch, generator=g) * 0.9 + 0.05
    for name in ("policy_scale", "kl_space"):
        if name in options:
            kwargs[name] = options[name]
    return kwargs


def _policy_scale(beta: float, kw: dict) -> float:
    scale = kw.get("policy_scale", 1.0)
    return scale / beta if kw.get("inverse_beta_scale") else scale


def _oracle(beta: float, **kw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    theta = kw["v_theta"].double().requires_grad_()
    loss = explicit_nft_loss(
        theta,
        kw["v_old"],
        kw["target"],
        kw["r"],
        beta,
        kw.get("token_weight"),
        kw.get("sample_weight"),
        _policy_scale(beta, kw),
        kw.get("kl_weight", 0.0),
        kw.get("v_ref"),
        kw.get("x0_norm_t"),
        kw.get("kl_space") == "x0",
    )
    (grad,) = torch.autograd.grad(loss, theta)
    return loss.detach(), grad


def _run(backend: str, beta: float, **kw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    theta = kw.pop("v_theta").clone().requires_grad_()
    loss = nft_loss(theta, beta=beta, backend=backend, **kw)
    loss.backward()
    return loss.detach(), theta.grad


def _assert_close(dtype: torch.dtype, loss, grad, ref_loss, ref_grad) -> None:
    loss_rtol, grad_tol = TOLERANCES[dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    # Small gradients are float16 subnormals (spacing 2**-24), rounded once on store.
    floor = 2.0**-25 if dtype == torch.float16 else 0.0
    torch.testing.assert_close(loss.double(), ref_loss, rtol=loss_rtol, atol=0.0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0.0, atol=grad_tol * float(ref_grad.abs().max()) + floor)


CASES = [
    (backend, dtype, option, r_mode, beta)
    for backend in ("triton", "cpp")
    for dtype, option, r_mode, beta in itertools.product(
        DTYPES[backend], OPTIONS, ("zero", "one", "between"), (0.1, 1.0)
    )
]


@pytest.mark.parametrize(
    ("backend", "dtype", "option", "r_mode", "beta"),
    [pytest.param(*case, marks=needs_triton if case[0] == "triton" else needs_cpp) for case in CASES],
)
def test_matches_float64_oracle(backend: str, dtype: torch.dtype, option: str, r_mode: str, beta: float) -> None:
    index = CASES.index((backend, dtype, option, r_mode, beta))
    kw = _inputs(SHAPES[index % len(SHAPES)], dtype, r_mode, seed=index, **OPTIONS[option])
    loss, grad = _run(backend, beta, **kw)
    _assert_close(dtype, loss, grad, *_oracle(beta, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_strided_inputs(backend: str) -> None:
    kw = _inputs((2, 23, 70), torch.float32, "between", seed=7, token_weight=True, kl_weight=0.2)
    kw["v_old"] = kw["v_old"].half()
    kw["target"] = kw["target"].transpose(1, 2).contiguous().transpose(1, 2)
    kw["r"] = torch.stack([kw["r"], kw["r"]], dim=1).double()[:, 0]
    assert not kw["r"].is_contiguous()
    loss, grad = _run(backend, 0.4, **kw)
    _assert_close(torch.float32, loss, grad, *_oracle(0.4, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_rescales_saved_gradient(backend: str) -> None:
    kw = _inputs((2, 9, 33), torch.float32, "between", seed=3, sample_weight=True)
    ref_loss, ref_grad = _oracle(0.5, **kw)
    theta = kw.pop("v_theta").clone().requires_grad_()
    (nft_loss(theta, beta=0.5, backend=backend, **kw) * -2.5).backward()
    torch.testing.assert_close(theta.grad.double(), -2.5 * ref_grad, rtol=0.0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(nft_loss(theta, beta=0.5, backend=backend, **kw).double(), ref_loss)


@needs_triton
def test_triton_rescale_in_place_once() -> None:
    """The Triton backend scales its saved gradient in place (no host read of grad_output): a gradient of 1 leaves
    it bit-identical to the forward's, and a second backward through the same graph is refused."""
    from omninft_fast.kernels.nft_loss import scale_gradient_

    grad = torch.randn(3, 7, 5)
    assert torch.equal(scale_gradient_(grad.clone(), torch.ones(1)), grad)
    assert torch.equal(scale_gradient_(grad.clone(), torch.full((1,), -0.5)), grad * -0.5)
    kw = _inputs((2, 9, 33), torch.float32, "between", seed=4)
    theta = kw.pop("v_theta").clone().requires_grad_()
    loss = nft_loss(theta, beta=0.5, backend="triton", **kw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagates once per forward"):
        loss.backward()


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_x0_norm_floor(backend: str) -> None:
    """Flow times so small that ``t mean|v+- - target|`` falls under 1e-5: both normalisers are the floor."""
    kw = _inputs((2, 13, 40), torch.float32, "between", seed=12, token_weight=True, x0_norm_t=True)
    kw["x0_norm_t"] = torch.tensor([1e-7, 2e-7])
    loss, grad = _run(backend, 0.5, **kw)
    _assert_close(torch.float32, loss, grad, *_oracle(0.5, **kw))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("beta", [1e-20, 1e-40])
def test_x0_norm_with_a_tiny_beta(backend: str, beta: float) -> None:
    """The x0-space loss does not depend on beta's size: no factor of beta leaves float32's range on the way to it
    (its gradient, proportional to beta, is subnormal at beta = 1e-40: exact to float32's smallest spacing)."""
    kw = _inputs((2, 13, 40), torch.float32, "between", seed=13, token_weight=True, x0_norm_t=True)
    loss, grad = _run(backend, beta, **kw)
    ref_loss, ref_grad = _oracle(beta, **kw)
    loss_rtol, grad_tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=loss_rtol, atol=0.0)
    spacing = 2 * torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps
    atol = grad_tol * float(ref_grad.abs().max()) + spacing
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0.0, atol=atol)
    assert loss > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("x0", [False, True])
def test_bit_identical_on_repeat(backend: str, dtype: torch.dtype, x0: bool) -> None:
    kw = _inputs(
        (3, 301, 96), dtype, "between", seed=11, token_weight=True, sample_weight=True, kl_weight=0.1, x0_norm_t=x0
    )
    if x0:
        kw["kl_space"] = "x0"
    first = _run(backend, 0.1, **kw)
    threads = torch.get_num_threads()
    try:
        for n in {1, threads, 2}:
            torch.set_num_threads(n)
            again = _run(backend, 0.1, **kw)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    finally:
        torch.set_num_threads(threads)


def _op_args(kw: dict, beta: float) -> tuple:
    """The fused ops' arguments after ``v_theta``'s gradient buffer: ``FusedForward``'s order."""
    kl_t = kw.get("x0_norm_t") if kw.get("kl_space") == "x0" else None
    return (
        kw["v_theta"], kw["v_old"], kw["target"], kw["r"], kw.get("token_weight"), kw.get("sample_weight"),
        kw.get("v_ref"), kw.get("x0_norm_t"), kl_t, beta, _policy_scale(beta, kw), kw.get("kl_weight", 0.0),
    )  # fmt: skip


def _forward_into(backend: str, grad: torch.Tensor, kw: dict, beta: float) -> torch.Tensor:
    """Call a backend's first stage on caller-provided (poisoned) output buffers; returns the loss."""
    if backend == "cpp":
        from omninft_fast import _C

        return _C.nft_loss_forward_out(grad, *_op_args(kw, beta))
    from omninft_fast.kernels import nft_loss as triton_nft

    partials = torch.full((triton_nft.num_programs(kw["v_theta"]),), float("nan"))
    loss = torch.full((), float("nan"))
    triton_nft.nft_loss_triton_forward_into(grad, partials, loss, *_op_args(kw, beta))
    assert torch.isfinite(partials).all()
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["plain", "all", "x0_all"])
def test_poisoned_outputs_are_fully_written(backend: str, option: str) -> None:
    kw = _inputs((3, 29, 50), torch.float32, "between", seed=5, **OPTIONS[option])
    grad = torch.full_like(kw["v_theta"], float("nan"))
    loss = _forward_into(backend, grad, kw, 0.1)
    assert torch.isfinite(grad).all() and torch.isfinite(loss)
    _assert_close(torch.float32, loss, grad, *_oracle(0.1, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["plain", "all", "x0_all"])
def test_opcheck(backend: str, option: str) -> None:
    if backend == "cpp":
        from omninft_fast.ops.nft_loss_cpp import nft_loss_cpp_forward as op
    else:
        from omninft_fast.ops.nft_loss_triton import nft_loss_triton_forward as op
    kw = _inputs((2, 7, 12), torch.float32, "between", seed=2, **OPTIONS[option])
    torch.library.opcheck(op, _op_args(kw, 0.3))


BAD_INPUTS = [
    ("v_old", lambda kw: kw.update(v_old=kw["v_old"][:, :-1])),
    ("target", lambda kw: kw.update(target=kw["target"][..., :-1])),
    ("r", lambda kw: kw.update(r=torch.tensor([0.5, 1.5]))),
    ("r", lambda kw: kw.update(r=torch.tensor([0.5]))),
    ("token_weight", lambda kw: kw.update(token_weight=torch.ones(2, 6).index_fill_(0, torch.tensor([1]), 0.0))),
    ("token_weight", lambda kw: kw.update(token_weight=-torch.ones(2, 6))),
    ("sample_weight", lambda kw: kw.update(sample_weight=torch.tensor([1.0, -1.0]))),
    ("v_ref", lambda kw: kw.update(kl_weight=0.1)),
    ("v_ref", lambda kw: kw.update(kl_weight=0.1, v_ref=torch.ones(2, 6, 5))),
    ("v_old", lambda kw: kw.update(v_old=kw["v_old"].to("meta"))),
    ("sample_weight", lambda kw: kw.update(sample_weight=torch.ones(2, device="meta"))),
    ("beta", lambda kw: kw.update(beta=0.0)),
    ("kl_weight", lambda kw: kw.update(kl_weight=-1.0)),
    ("x0_norm_t", lambda kw: kw.update(x0_norm_t=torch.ones(3))),
    ("x0_norm_t", lambda kw: kw.update(x0_norm_t=torch.tensor([0.5, 0.0]))),
    ("x0_norm_t", lambda kw: kw.update(kl_weight=0.1, v_ref=kw["v_theta"], kl_space="x0")),
    ("kl_space", lambda kw: kw.update(kl_space="x1")),
    ("policy_scale", lambda kw: kw.update(policy_scale=0.0)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "corrupt"), BAD_INPUTS)
def test_bad_input_names_the_argument(backend: str, name: str, corrupt) -> None:
    kw = _inputs((2, 6, 4), torch.float32, "between", seed=1)
    kw["beta"] = 0.5
    corrupt(kw)
    with pytest.raises((ValueError, TypeError), match=name):
        nft_loss(backend=backend, **kw)


@needs_cpp
def test_extension_checks_name_the_argument() -> None:
    from omninft_fast import _C

    kw = _inputs((2, 6, 4), torch.float32, "between", seed=1)
    args = [kw["v_theta"], kw["v_old"], kw["target"], kw["r"], None, None, None, None, None, 0.5, 1.0, 0.0]
    bad = {1: kw["v_old"][:, :3], 2: kw["target"].int(), 3: torch.ones(3), 4: torch.zeros(2, 6), 5: torch.ones(3)}
    bad[7] = torch.ones(3)
    names = {1: "v_old", 2: "target", 3: "r", 4: "token_weight", 5: "sample_weight", 7: "x0_norm_t"}
    for index, value in bad.items():
        with pytest.raises(RuntimeError, match=names[index]):
            _C.nft_loss_forward(*args[:index], value, *args[index + 1 :])
    grad = torch.empty_like(kw["v_theta"]).half()
    with pytest.raises(RuntimeError, match="grad"):
        _C.nft_loss_forward_out(grad, *args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_x0_weight_gives_diffusionnft_x0_space_loss(backend: str) -> None:
    """With x_t = (1 - t) x0 + t x1 and r = 1, the weighted velocity loss is DiffusionNFT's x0-space loss."""
    from omninft_fast import adaptive_x0_weight

    g = torch.Generator().manual_seed(4)
    shape = (3, 17, 40)
    x0, x1, theta, old = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.rand(3, generator=g, dtype=torch.float64)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
    beta = 0.1
    v_pos = (1 - beta) * old + beta * theta
    x0_pred = x_t - t[:, None, None] * v_pos
    factor = (x0_pred - x0).abs().mean(dim=(1, 2)).clamp_min(1e-5)
    expected = ((x0_pred - x0).square().mean(dim=(1, 2)) / factor).mean() / beta
    weight = adaptive_x0_weight(x_t, x0, v_pos, t)
    kw = {"beta": beta, "sample_weight": weight, "inverse_beta_scale": True, "backend": backend}
    loss = nft_loss(theta.float(), old.float(), (x1 - x0).float(), torch.ones(3), **kw)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=0.0)


@needs_cpp
def test_cpp_backend_compiles_into_one_graph() -> None:
    from omninft_fast.ops.nft_loss_cpp import nft_loss_cpp

    kw = _inputs((2, 8, 24), torch.float32, "between", seed=9, token_weight=True)
    ref_loss, ref_grad = _oracle(0.5, **kw)
    theta = kw["v_theta"].clone().requires_grad_()
    args = (kw["v_old"], kw["target"], kw["r"])
    options = {
        "token_weight": kw["token_weight"],
        "sample_weight": None,
        "v_ref": None,
        "x0_norm_t": None,
        "kl_t": None,
    }
    options |= {"beta": 0.5, "policy_scale": 1.0, "kl_weight": 0.0}

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return 2.0 * nft_loss_cpp(x, *args, **options)

    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(theta)
    loss.backward()
    torch.testing.assert_close(loss.double(), 2 * ref_loss, rtol=2e-5, atol=0.0)
    torch.testing.assert_close(theta.grad.double(), 2 * ref_grad, rtol=0.0, atol=1e-6)


def test_kernels_compile_for_sm90_without_spills() -> None:
    """Every stage on sm_90a: no spills; with 16-aligned channels (128 in LTX-2) at most 128 registers per thread."""
    from omninft_fast.kernels.compile_check import KernelSpec, compile_specs_for_sm90

    kernel = "omninft_fast.kernels.nft_loss:_nft_loss_fwd_kernel"
    velocities = ("theta_ptr", "old_ptr", "target_ptr", "ref_ptr", "grad_ptr")
    small = ("r_ptr", "term_coef_ptr", "kl_t_ptr", "token_weight_ptr", "sample_coef_ptr", "partial_ptr")
    specs = []
    for dtype, weighted, x0, aligned in itertools.product(
        ("*fp32", "*bf16", "*fp16"), (False, True), (False, True), (False, True)
    ):
        signature = {name: dtype for name in velocities} | {name: "*fp32" for name in small}
        signature |= {"n_rows": "i32", "tokens": "i32", "channels": "i32", "beta": "fp32", "kl_coef": "fp32"}
        constexprs = {"HAS_TOKEN_WEIGHT": weighted, "HAS_REF": weighted, "X0_NORM": x0, "KL_X0": x0 and weighted}
        constexprs |= {"BLOCK_ROWS": 32, "BLOCK_C": 128}
        label = f"{dtype} weighted={weighted} x0={x0} aligned={aligned}"
        specs.append(
            KernelSpec(
                kernel,
                signature,
                constexprs,
                num_warps=8,
                label=label,
                aligned=[*velocities, *small, "channels"] if aligned else [*velocities, *small],
            )
        )
    sums_kernel = "omninft_fast.kernels.nft_loss:_nft_x0_sums_kernel"
    sums_inputs = ("theta_ptr", "old_ptr", "target_ptr")
    for dtype, aligned in itertools.product(("*fp32", "*bf16", "*fp16"), (False, True)):
        signature = {name: dtype for name in sums_inputs} | {"sums_ptr": "*fp32"}
        signature |= {"tokens": "i32", "channels": "i32", "beta": "fp32"}
        constexprs = {"BLOCK_ROWS": 32, "BLOCK_C": 128}
        label = f"x0 sums {dtype} aligned={aligned}"
        pointers = [*sums_inputs, "sums_ptr"]
        aligned_args = [*pointers, "channels"] if aligned else pointers
        specs.append(KernelSpec(sums_kernel, signature, constexprs, num_warps=8, label=label, aligned=aligned_args))
    coef_signature = {name: "*fp32" for name in ("sums_ptr", "r_ptr", "t_ptr", "term_coef_ptr")}
    coef_signature |= {"n_chunks": "i32", "inv_count": "fp32", "min_error": "fp32"}
    specs.append(KernelSpec("omninft_fast.kernels.nft_loss:_nft_x0_coef_kernel", coef_signature, {"BLOCK": 128}, 4))
    reduce_signature = {"partial_ptr": "*fp32", "loss_ptr": "*fp32", "n_partials": "i32"}
    specs.append(KernelSpec("omninft_fast.kernels.nft_loss:_sum_partials_kernel", reduce_signature, {"BLOCK": 1024}, 4))
    for spec, result in zip(specs, compile_specs_for_sm90(specs), strict=True):
        assert result.spill_stores == 0 and result.spill_loads == 0, result
        if "aligned=False" not in spec.label:
            assert result.registers <= 128, result


def test_fused_backends_share_one_wiring() -> None:
    """Both fused ops have one schema, and every backend takes ``nft_loss_reference``'s arguments."""
    import inspect

    pytest.importorskip("triton")
    from omninft_fast.ops.nft_loss import FusedNFTLossBackend, nft_loss_reference
    from omninft_fast.ops.nft_loss_triton import nft_loss_triton

    fused = [nft_loss_triton]
    if _cpp_reason() is None:
        from omninft_fast.ops.nft_loss_cpp import nft_loss_cpp

        fused.append(nft_loss_cpp)
    want = inspect.signature(nft_loss_reference).parameters
    for backend in fused:
        assert isinstance(backend, FusedNFTLossBackend)
        assert inspect.signature(backend).parameters == want
        schema = backend.op._schema
        assert str(schema).split("(", 1)[1] == str(fused[0].op._schema).split("(", 1)[1]


def test_kernels_are_leaves() -> None:
    """Kernel modules import nothing of the package but other kernel modules (the layers above import them)."""
    import ast
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            package = [name for name in names if name.split(".")[0] == "omninft_fast"]
            assert all(name.startswith("omninft_fast.kernels") for name in package), f"{path.name} imports {names[0]}"
