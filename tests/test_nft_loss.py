"""Eq 3-5 and 12: the DiffusionNFT objective with region-weighted token means (PyTorch reference)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omninft_fast import adaptive_x0_weight, dispatch, nft_loss
from omninft_fast.testing import explicit_nft_loss

REF = {"backend": "reference"}


def _inputs(gen: torch.Generator, b: int, n: int, c: int, dtype: torch.dtype = torch.float64) -> tuple:
    v_theta, v_old, target = (torch.randn(b, n, c, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    return v_theta, v_old, target


def test_by_hand_one_token() -> None:
    # v_theta = 2, v_old = 1, target = 0, beta = 0.5: v+ = 1.5, v- = 0.5, errors 2.25 and 0.25.
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    for r, want in ((1.0, 2.25), (0.0, 0.25), (0.25, 0.25 * 2.25 + 0.75 * 0.25)):
        loss = nft_loss(2 * one, one, 0 * one, torch.tensor([r], dtype=torch.float64), beta=0.5, **REF)
        assert float(loss) == pytest.approx(want, rel=1e-15)


def test_by_hand_token_weights_are_normalised() -> None:
    # Two tokens with errors (r = 1, beta = 1, v+ = v_theta): 1 and 9; weights 1 and 3 -> (1 + 27) / 4 = 7.
    v_theta = torch.tensor([[[1.0], [3.0]]], dtype=torch.float64)
    zeros = torch.zeros_like(v_theta)
    loss = nft_loss(
        v_theta, zeros, zeros, torch.ones(1, dtype=torch.float64), beta=1.0, token_weight=torch.tensor([[1.0, 3.0]])
    )
    assert float(loss) == pytest.approx(7.0, rel=1e-15)
    # Scaling every weight of a sample does not change its loss (Eq 12 divides by the sum).
    again = nft_loss(
        v_theta, zeros, zeros, torch.ones(1, dtype=torch.float64), beta=1.0, token_weight=torch.tensor([[5.0, 15.0]])
    )
    assert float(again) == pytest.approx(7.0, rel=1e-15)


def test_gradient_by_hand() -> None:
    # d/dv_theta of r (v+ - t)^2 + (1-r)(v- - t)^2 = 2 beta [r (v+ - t) - (1 - r)(v- - t)].
    v_theta = torch.tensor([[[2.0]]], dtype=torch.float64, requires_grad=True)
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    loss = nft_loss(v_theta, one, 0 * one, torch.tensor([0.25], dtype=torch.float64), beta=0.5, **REF)
    (grad,) = torch.autograd.grad(loss, v_theta)
    assert float(grad) == pytest.approx(2 * 0.5 * (0.25 * 1.5 - 0.75 * 0.5), rel=1e-15)


def test_x0_norm_by_hand_one_token() -> None:
    """v_theta = 2, v_old = 1, target = 0, beta = 0.5, t = 0.5: v+ - v = 1.5, v- - v = 0.5.

    pos = t^2 1.5^2 / (t 1.5) = 0.75 and neg = t 0.5 = 0.25; with the normalisers held constant
    d pos / d v_theta = t^2 2 (1.5) beta / 0.75 = 0.5 and d neg / d v_theta = t^2 2 (0.5) (-beta) / 0.25 = -0.5
    (through the normaliser the gradients would be halved: d(t |v+ - v|) = 0.25).
    """
    v_theta = torch.tensor([[[2.0]]], dtype=torch.float64, requires_grad=True)
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    t = torch.tensor([0.5], dtype=torch.float64)
    for r, want, want_grad in ((1.0, 0.75, 0.5), (0.0, 0.25, -0.5), (0.25, 0.375, -0.25)):
        r_b = torch.tensor([r], dtype=torch.float64)
        loss = nft_loss(v_theta, one, 0 * one, r_b, beta=0.5, x0_norm_t=t, **REF)
        (grad,) = torch.autograd.grad(loss, v_theta)
        assert float(loss.detach()) == pytest.approx(want, rel=1e-15)
        assert float(grad) == pytest.approx(want_grad, rel=1e-15)
    # The release's scale: x5 (adv_clip_max) / beta.
    scaled = nft_loss(
        v_theta, one, 0 * one, torch.ones(1, dtype=torch.float64), beta=0.5, x0_norm_t=t, inverse_beta_scale=True,
        policy_scale=5.0, **REF,
    )  # fmt: skip
    assert float(scaled.detach()) == pytest.approx(0.75 * 5 / 0.5, rel=1e-15)


def test_x0_norm_uses_each_terms_own_normaliser(gen: torch.Generator) -> None:
    """Unlike ``adaptive_x0_weight`` (v+'s error for both terms), the negative term divides by v-'s error."""
    v_theta, v_old, target = _inputs(gen, 2, 9, 4)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    beta = 0.7
    neg = (1 + beta) * v_old - beta * v_theta - target
    zero = torch.zeros(2, dtype=torch.float64)
    got = nft_loss(v_theta, v_old, target, zero, beta=beta, x0_norm_t=t, **REF)
    want = (t**2 * neg.square().mean(dim=(1, 2)) / (t * neg.abs().mean(dim=(1, 2)))).mean()
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_x0_norm_with_region_weights_normalises_by_the_plain_mean(backend: str) -> None:
    """As the release computes it: region weights weigh the squared error, not the normaliser. One sample, two
    tokens with errors 1 and 3 (v_theta = target + e, v_old = target, beta = 1: v+ - target = e), weights 1 and 3,
    t = 1, r = 1: pos = (1 * 1 + 3 * 9) / 4 / ((1 + 3) / 2) = 7 / 2 = 3.5 (the weighted normaliser would give 2.8)."""
    if backend == "cpp" and dispatch._why_not("cpp", torch.device("cpu")):
        pytest.skip(dispatch._why_not("cpp", torch.device("cpu")))
    target = torch.zeros(1, 2, 1, dtype=torch.float64)
    v_theta = torch.tensor([[[1.0], [3.0]]], dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    weights = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    loss = nft_loss(v_theta, target, target, one, beta=1.0, token_weight=weights, x0_norm_t=one, backend=backend)
    assert float(loss) == pytest.approx(3.5, rel=1e-12)


def test_x0_space_kl_by_hand(gen: torch.Generator) -> None:
    v_theta, v_old, target = _inputs(gen, 2, 5, 3)
    v_ref = v_theta + torch.tensor([1.0, 2.0], dtype=torch.float64)[:, None, None]  # distances 1 and 2
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    kw = {"beta": 0.4, "x0_norm_t": t, "v_ref": v_ref, **REF}
    base = nft_loss(v_theta, v_old, target, torch.ones(2, dtype=torch.float64), **kw)
    velocity = nft_loss(v_theta, v_old, target, torch.ones(2, dtype=torch.float64), kl_weight=0.1, **kw)
    x0 = nft_loss(v_theta, v_old, target, torch.ones(2, dtype=torch.float64), kl_weight=0.1, kl_space="x0", **kw)
    assert float(velocity - base) == pytest.approx(0.1 * (1 + 4) / 2, rel=1e-12)
    assert float(x0 - base) == pytest.approx(0.1 * (0.25 * 1 + 0.0625 * 4) / 2, rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("r_kind", ["zero", "one", "mixed"])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("options", ["none", "inverse_beta", "kl", "x0", "x0_kl"])
def test_matches_per_sample_loop(beta: float, r_kind: str, weights: bool, options: str, gen: torch.Generator) -> None:
    b, n, c = 3, 17, 5
    v_theta, v_old, target = _inputs(gen, b, n, c)
    r = {"zero": torch.zeros(b), "one": torch.ones(b), "mixed": torch.rand(b, generator=gen)}[r_kind].double()
    token_weight = torch.rand(b, n, generator=gen, dtype=torch.float64) + 0.1 if weights else None
    sample_weight = torch.rand(b, generator=gen, dtype=torch.float64) + 0.5 if weights else None
    v_ref = torch.randn(b, n, c, generator=gen, dtype=torch.float64)
    kl_weight = 0.3 if options in ("kl", "x0_kl") else 0.0
    inverse = options in ("inverse_beta", "x0_kl")
    t = torch.rand(b, generator=gen, dtype=torch.float64) + 0.05 if options.startswith("x0") else None
    kl_space = "x0" if options == "x0_kl" else "velocity"
    theta = v_theta.clone().requires_grad_()
    got = nft_loss(
        theta, v_old, target, r, beta=beta, token_weight=token_weight, sample_weight=sample_weight,
        inverse_beta_scale=inverse, kl_weight=kl_weight, v_ref=v_ref, x0_norm_t=t, kl_space=kl_space, **REF,
    )  # fmt: skip
    leaf = v_theta.clone().requires_grad_()
    want = explicit_nft_loss(
        leaf, v_old, target, r, beta, token_weight, sample_weight, 1 / beta if inverse else 1.0, kl_weight, v_ref,
        t, kl_space == "x0",
    )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, theta)[0], torch.autograd.grad(want, leaf)[0])


def test_gradcheck_and_no_gradient_to_other_inputs(gen: torch.Generator) -> None:
    v_theta, v_old, target = (x.requires_grad_() for x in _inputs(gen, 2, 4, 3))
    r = torch.tensor([0.2, 0.9], dtype=torch.float64)
    w = torch.rand(2, 4, generator=gen, dtype=torch.float64) + 0.1

    def loss(theta: torch.Tensor) -> torch.Tensor:
        return nft_loss(theta, v_old, target, r, beta=0.3, token_weight=w, **REF)

    assert torch.autograd.gradcheck(loss, (v_theta,))
    loss(v_theta).backward()
    assert v_old.grad is None and target.grad is None


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 4), n=st.integers(1, 40), c=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_ragged_shapes_low_precision(b: int, n: int, c: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    v_theta, v_old, target = _inputs(gen, b, n, c)
    r = torch.rand(b, generator=gen, dtype=torch.float64)
    want = explicit_nft_loss(v_theta, v_old, target, r, 0.7)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        args = [x.to(dtype) for x in (v_theta, v_old, target)]
        got = nft_loss(*args, r.to(dtype), beta=0.7, **REF)
        assert got.dtype == torch.float32
        want_rounded = explicit_nft_loss(*args, r.to(dtype), 0.7)  # same rounded inputs, exact arithmetic
        torch.testing.assert_close(got.double(), want_rounded, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.05)


def test_adaptive_x0_weight(gen: torch.Generator) -> None:
    x_t, x0, v_pos = _inputs(gen, 3, 6, 4)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    w = adaptive_x0_weight(x_t, x0, v_pos, t)
    for b in range(3):
        error = (x_t[b] - t[b] * v_pos[b] - x0[b]).abs().mean()
        assert float(w[b]) == pytest.approx(float(t[b] ** 2 / error), rel=1e-12)
    exact = adaptive_x0_weight(x0 + 0.5 * v_pos, x0, v_pos, torch.full((3,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(exact, torch.full((3,), 0.25 / 1e-5, dtype=torch.float64))


def _valid(gen: torch.Generator) -> dict:
    v_theta, v_old, target = _inputs(gen, 2, 3, 4, torch.float32)
    return {"v_theta": v_theta, "v_old": v_old, "target": target, "r": torch.full((2,), 0.5), "beta": 0.5}


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"v_old": torch.ones(2, 3, 5)}, ValueError, r"v_old must have shape \(2, 3, 4\)"),
        ({"target": torch.ones(2, 3)}, ValueError, "target must have 3 dimensions"),
        ({"r": torch.full((3,), 0.5)}, ValueError, "r must have shape"),
        ({"r": torch.tensor([0.5, 1.5])}, ValueError, r"r\[1\] = 1.5 is outside \[0.0, 1.0\]"),
        ({"r": torch.tensor([0.5, float("nan")])}, ValueError, r"r\[1\] = nan is outside"),
        ({"beta": 0.0}, ValueError, "beta must be > 0"),
        ({"token_weight": torch.ones(2, 4)}, ValueError, "token_weight must have shape"),
        ({"token_weight": torch.tensor([[1.0, 1, 1], [0, 0, 0]])}, ValueError, r"token_weight\[1\] sums to 0"),
        ({"token_weight": torch.tensor([[1.0, -1, 1], [1, 1, 1]])}, ValueError, r"token_weight\[0, 1\] = -1.0"),
        ({"sample_weight": torch.tensor([1.0, float("inf")])}, ValueError, r"sample_weight\[1\] is not finite"),
        ({"kl_weight": 0.1}, ValueError, "v_ref must be given when kl_weight > 0"),
        ({"v_theta": torch.ones(2, 3, 4, dtype=torch.int64)}, TypeError, "v_theta must have a floating dtype"),
        ({"v_old": torch.ones(2, 3, 4, device="meta")}, ValueError, "v_old is on meta but v_theta is on cpu"),
        ({"inverse_beta_scale": 1}, TypeError, "inverse_beta_scale must be a bool"),
        ({"x0_norm_t": torch.ones(3)}, ValueError, "x0_norm_t must have shape"),
        ({"x0_norm_t": torch.tensor([0.5, -0.1])}, ValueError, r"x0_norm_t\[1\] = -0.1\d* must be > 0"),
        ({"x0_norm_t": torch.tensor([0.5, float("nan")])}, ValueError, r"x0_norm_t\[1\] is not finite"),
        ({"kl_space": "x0", "kl_weight": 0.1, "v_ref": torch.ones(2, 3, 4)}, ValueError, "x0_norm_t must be given"),
        ({"kl_space": "x1"}, ValueError, "kl_space='x1' must be"),
        ({"policy_scale": -1.0}, ValueError, "policy_scale must be > 0"),
        ({"backend": "cuda"}, RuntimeError, "backend='cuda' is not one of"),
    ],
)
def test_bad_input(change: dict, error: type, match: str, gen: torch.Generator) -> None:
    kwargs = _valid(gen) | change
    with pytest.raises(error, match=match):
        nft_loss(kwargs.pop("v_theta"), kwargs.pop("v_old"), kwargs.pop("target"), kwargs.pop("r"), **kwargs)
