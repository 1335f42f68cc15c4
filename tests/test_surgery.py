"""Eq 8 (partial stop-gradient) and Eq 9 (the per-layer detach schedule)."""

from __future__ import annotations

import pytest
import torch

from omninft_fast import detach_schedule, partial_detach


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_partial_detach_is_eq8(alpha: float, gen: torch.Generator) -> None:
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    y = partial_detach(x, alpha)
    assert torch.equal(y, x)  # forward unchanged, bit for bit
    literal = alpha * x.detach() + (1 - alpha) * x
    if alpha == 1.0:
        assert not y.requires_grad
        return
    (got,) = torch.autograd.grad((weight * y).sum(), x)
    (want,) = torch.autograd.grad((weight * literal).sum(), x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    torch.testing.assert_close(got, (1 - alpha) * weight)


def test_partial_detach_zero_returns_input_itself() -> None:
    x = torch.ones(2, requires_grad=True)
    assert partial_detach(x, 0.0) is x


def test_partial_detach_gradcheck(gen: torch.Generator) -> None:
    x = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    # gradcheck compares against finite differences of the forward, which is the identity: scaled gradients
    # must therefore fail it, and a scale of 1 (alpha = 0) must pass.
    assert torch.autograd.gradcheck(lambda t: partial_detach(t, 0.0) * 2, (x,))
    assert not torch.autograd.gradcheck(lambda t: partial_detach(t, 0.3) * 2, (x,), raise_exception=False)


def test_partial_detach_bad_alpha() -> None:
    with pytest.raises(ValueError, match="alpha must be <= 1.0"):
        partial_detach(torch.ones(2), 1.5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        partial_detach([1.0], 0.1)


def test_schedule_default_is_eq9() -> None:
    alphas = detach_schedule(48)
    assert alphas == [0.1] * 10 + [0.0] * 38


def test_schedule_boundary_and_alpha() -> None:
    assert detach_schedule(4, boundary=2, alpha=0.5) == [0.5, 0.5, 0.0, 0.0]
    assert detach_schedule(3, boundary=10) == [0.1, 0.1, 0.1]


def test_schedule_spec() -> None:
    alphas = detach_schedule(48, spec="0-9:0.1, 40-47:0.3,20:1")
    assert alphas[:10] == [0.1] * 10
    assert alphas[10:20] == [0.0] * 10 and alphas[20] == 1.0 and alphas[21:40] == [0.0] * 19
    assert alphas[40:] == [0.3] * 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_layers": 0}, "num_layers must be a positive int"),
        ({"num_layers": 4, "boundary": -1}, "boundary must be a non-negative int"),
        ({"num_layers": 4, "alpha": 2.0}, "alpha must be <= 1.0"),
        ({"num_layers": 4, "spec": "0-9:0.1"}, "layers must satisfy 0 <= first <= last < 4"),
        ({"num_layers": 4, "spec": "0-1"}, "must look like 'first-last:alpha'"),
        ({"num_layers": 4, "spec": "a-b:0.1"}, "must look like 'first-last:alpha'"),
        ({"num_layers": 4, "spec": "0-1:1.5"}, "spec alpha for layers 0-1 must be <= 1.0"),
        ({"num_layers": 4, "spec": " "}, "spec must be a non-empty string"),
    ],
)
def test_schedule_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        detach_schedule(**kwargs)
