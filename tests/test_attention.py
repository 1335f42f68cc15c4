"""Cross-modal attention with partial stop-gradient on K/V (Eq 8) and per-key mass (Eq 10's inner sum).

These tests pin down the PyTorch reference; the Triton kernels are checked against the same oracle in
``test_triton_cross_attention.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omninft_fast import cross_attention
from omninft_fast.ops import attention as attention_module
from omninft_fast.testing import explicit_cross_attention

REF = {"backend": "reference"}


def _qkv(gen: torch.Generator, b: int, nq: int, nk: int, h: int, d: int, dtype: torch.dtype = torch.float64) -> list:
    return [torch.randn(b, n, h, d, generator=gen, dtype=torch.float64).to(dtype) for n in (nq, nk, nk)]


def test_by_hand_two_keys() -> None:
    # One query, two keys with logits 0 and log 3 -> probabilities 1/4 and 3/4.
    q = torch.tensor([[[[1.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[0.0]], [[math.log(3.0)]]]], dtype=torch.float64)
    v = torch.tensor([[[[4.0]], [[8.0]]]], dtype=torch.float64)
    out, mass = cross_attention(q, k, v, softmax_scale=1.0, return_key_mass=True, **REF)
    assert float(out) == pytest.approx(0.25 * 4 + 0.75 * 8, rel=1e-15)
    torch.testing.assert_close(mass, torch.tensor([[0.25, 0.75]], dtype=torch.float64))


def test_key_mass_sums_to_number_of_queries(gen: torch.Generator) -> None:
    q, k, v = _qkv(gen, 2, 300, 19, 3, 8, torch.float32)
    _, mass = cross_attention(q, k, v, return_key_mass=True, **REF)
    assert mass.dtype == torch.float32 and mass.shape == (2, 19)
    torch.testing.assert_close(mass.sum(dim=1), torch.full((2,), 300.0))


@pytest.mark.parametrize("kv_grad_scale", [0.0, 0.9, 1.0])
def test_matches_explicit_map(kv_grad_scale: float, gen: torch.Generator) -> None:
    q, k, v = _qkv(gen, 2, 150, 23, 3, 16)  # 150 queries: two query tiles of the key-mass loop, ragged
    grad_out = torch.randn(2, 150, 3, 16, generator=gen, dtype=torch.float64)
    scale = 0.3
    got_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, mass = cross_attention(
        *got_leaves, softmax_scale=scale, kv_grad_scale=kv_grad_scale, return_key_mass=True, **REF
    )
    want_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want_out, want_mass = explicit_cross_attention(*want_leaves, scale, kv_grad_scale)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mass, want_mass, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(out, got_leaves, grad_out, materialize_grads=True)
    want = torch.autograd.grad(want_out, want_leaves, grad_out, materialize_grads=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if kv_grad_scale == 0.0:
        assert torch.count_nonzero(got[1]) == 0 and torch.count_nonzero(got[2]) == 0


def test_kv_grad_scale_scales_only_k_and_v(gen: torch.Generator) -> None:
    q, k, v = (x.requires_grad_() for x in _qkv(gen, 1, 7, 5, 2, 4))
    grad_out = torch.randn(1, 7, 2, 4, generator=gen, dtype=torch.float64)
    plain = torch.autograd.grad(cross_attention(q, k, v, **REF), (q, k, v), grad_out)
    scaled = torch.autograd.grad(cross_attention(q, k, v, kv_grad_scale=0.9, **REF), (q, k, v), grad_out)
    assert torch.equal(plain[0], scaled[0])
    torch.testing.assert_close(scaled[1], 0.9 * plain[1], rtol=1e-14, atol=0)
    torch.testing.assert_close(scaled[2], 0.9 * plain[2], rtol=1e-14, atol=0)


def test_forward_unchanged_by_kv_grad_scale(gen: torch.Generator) -> None:
    q, k, v = _qkv(gen, 2, 9, 4, 2, 8, torch.float32)
    assert torch.equal(cross_attention(q, k, v, **REF), cross_attention(q, k, v, kv_grad_scale=0.0, **REF))


def test_gradcheck(gen: torch.Generator) -> None:
    q, k, v = (x.requires_grad_() for x in _qkv(gen, 1, 5, 3, 2, 4))
    assert torch.autograd.gradcheck(lambda a, b, c: cross_attention(a, b, c, **REF), (q, k, v))


def test_key_mass_carries_no_gradient_and_stays_tiled(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = (x.requires_grad_() for x in _qkv(gen, 1, 70, 6, 2, 4))
    monkeypatch.setattr(attention_module, "KEY_MASS_QUERY_TILE", 16)  # 5 tiles, the last one ragged
    _, mass = cross_attention(q, k, v, return_key_mass=True, **REF)
    assert not mass.requires_grad
    _, want = explicit_cross_attention(q, k, v, 1 / math.sqrt(4))
    torch.testing.assert_close(mass, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2),
    nq=st.integers(1, 140),
    nk=st.integers(1, 40),
    h=st.integers(1, 3),
    d=st.sampled_from([8, 16, 32]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_ragged_shapes_and_dtypes(b: int, nq: int, nk: int, h: int, d: int, dtype: torch.dtype, seed: int) -> None:
    q, k, v = _qkv(torch.Generator().manual_seed(seed), b, nq, nk, h, d, dtype)
    out, mass = cross_attention(q, k, v, return_key_mass=True, **REF)
    want_out, want_mass = explicit_cross_attention(q, k, v, 1 / math.sqrt(d))
    assert out.dtype == dtype and out.shape == (b, nq, h, d)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), want_out, rtol=tol, atol=tol)
    torch.testing.assert_close(mass.double(), want_mass, rtol=1e-4, atol=1e-4 * nq)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"q": torch.ones(2, 3, 4)}, ValueError, "q must have 4 dimensions"),
        ({"k": torch.ones(2, 5, 3, 8)}, ValueError, r"k must have shape \(B=2, Nk, H=4, D=8\)"),
        ({"k": torch.ones(2, 0, 4, 8)}, ValueError, "k must have at least one key"),
        ({"v": torch.ones(2, 6, 4, 8)}, ValueError, "v must have the shape of k"),
        ({"v": torch.ones(2, 5, 4, 8, dtype=torch.float64)}, TypeError, "v has dtype torch.float64 but q has"),
        ({"k": torch.ones(2, 5, 4, 8, device="meta")}, ValueError, "k is on meta but q is on cpu"),
        ({"softmax_scale": 0.0}, ValueError, "softmax_scale must be > 0"),
        ({"kv_grad_scale": 1.1}, ValueError, "kv_grad_scale must be <= 1.0"),
        ({"kv_grad_scale": -0.1}, ValueError, "kv_grad_scale must be >= 0.0"),
        ({"return_key_mass": 1}, TypeError, "return_key_mass must be a bool"),
        ({"backend": "cpp"}, RuntimeError, "backend='cpp': op 'cross_attention' has no such backend"),
    ],
)
def test_bad_input(change: dict, error: type, match: str) -> None:
    kwargs = {"q": torch.ones(2, 3, 4, 8), "k": torch.ones(2, 5, 4, 8), "v": torch.ones(2, 5, 4, 8)} | change
    with pytest.raises(error, match=match):
        cross_attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)
