"""Every public op under ``torch.compile(fullgraph=True)``: one graph (no break, no host sync), eager's numbers.

The ``aot_eager`` backend runs Dynamo, AOTAutograd and the fake implementations, which is where a graph break or a
data-dependent guard would show, without Inductor's code generation. The Triton kernels sit behind custom ops, so
a compiled graph calls them like any op: on CUDA tensors, or on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import omninft_fast as of
from omninft_fast import dispatch
from omninft_fast._checks import CHECK_VALUES_ENV


def _device(backend: str) -> torch.device:
    """The device ``backend`` runs on here (CUDA for Triton when there is a GPU); skips when it cannot run."""
    device = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    reason = dispatch._why_not(backend, device)
    if reason is not None:
        pytest.skip(reason)
    return device


def _compiled(fn: Callable) -> Callable:
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.fixture(autouse=True)
def _default_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHECK_VALUES_ENV, raising=False)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("weighted", [False, True, "x0"])
def test_nft_loss(backend: str, weighted: bool | str) -> None:
    device = _device(backend)
    g = torch.Generator().manual_seed(3)
    theta, old, target, ref = (torch.randn(3, 7, 12, generator=g).to(device) for _ in range(4))
    r = torch.rand(3, generator=g).to(device)
    options = {"beta": 0.3, "backend": backend}
    if weighted:
        options |= {"token_weight": torch.rand(3, 7, generator=g).to(device) + 0.1, "kl_weight": 0.2, "v_ref": ref}
        options |= {"sample_weight": torch.rand(3, generator=g).to(device), "inverse_beta_scale": True}
    if weighted == "x0":
        options |= {"x0_norm_t": torch.rand(3, generator=g).to(device) + 0.1, "kl_space": "x0", "policy_scale": 5.0}

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return 3.0 * of.nft_loss(x, old, target, r, **options)

    results = []
    for fn in (loss_fn, _compiled(loss_fn)):
        x = theta.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (want_loss, want_grad) = results[1], results[0]
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cross_attention(backend: str) -> None:
    device = _device(backend)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, n, 2, 16, generator=g).to(device) for n in (9, 5, 5))
    grad_out = torch.randn(2, 9, 2, 16, generator=g).to(device)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return of.cross_attention(q, k, v, kv_grad_scale=0.25, return_key_mass=True, backend=backend)

    results = []
    for fn in (attend, _compiled(attend)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, mass = fn(*leaves)
        out.backward(grad_out)
        results.append([out.detach(), mass, *(x.grad for x in leaves)])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_reference_only_ops() -> None:
    g = torch.Generator().manual_seed(5)
    rewards = torch.rand(3, 4, generator=g)
    rewards[1] = 0.5  # a flat group

    def chain(rewards: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        adv = of.group_advantages(rewards)
        adv_global = of.group_advantages(rewards, std="global")
        routed = [of.route_advantages(adv, adv_global, adv, mode=mode) for mode in ("modality", "shared", "gdpo")]
        r = of.optimality_probability(routed[0][0], clip=2.0)
        w = of.region_weights(rewards, lam=1.5)
        x0_weight = of.adaptive_x0_weight(x_t, x_t.flip(0), x_t * 0.5, r[:, 0].clone())
        return adv, *(a for pair in routed for a in pair), r, w, x0_weight, of.partial_detach(x_t, 0.3)

    x_t = torch.randn(3, 5, 2, generator=g)
    for got, want in zip(_compiled(chain)(rewards, x_t), chain(rewards, x_t), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_compiled_calls_skip_value_checks_and_the_helpers_catch_them() -> None:
    v = torch.randn(2, 3, 4)
    bad_r = torch.tensor([0.5, 1.5])

    def loss_fn(r: torch.Tensor) -> torch.Tensor:
        return of.nft_loss(v, v * 0.5, v * 0.25, r, beta=0.5, backend="reference", check_values=True)

    assert torch.isfinite(_compiled(loss_fn)(bad_r))
    with pytest.raises(ValueError, match=r"r\[1\] = 1.5 is outside"):
        of.check_nft_loss_values(bad_r)
    with pytest.raises(ValueError, match=r"r\[1\] = 1.5 is outside"):
        loss_fn(bad_r)


def test_environment_backend_is_followed_when_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """``$OMNINFT_BACKEND`` is read inside the graph: changing it recompiles instead of reusing the old choice."""
    x = torch.randn(1, 3, 2, 4)
    attend = _compiled(lambda x: of.cross_attention(x, x, x))
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    attend(x)
    monkeypatch.setenv(dispatch.ENV_VAR, "cpp")
    # fullgraph reports the BackendError raised while tracing as its own error type, with the same message.
    with pytest.raises(Exception, match="has no 'cpp' backend"):
        attend(x)
