"""Odd inputs to ``cross_attention``: every backend gives NaN for a row without a softmax (a NaN, or scores all
``-inf``); ``softmax_scale`` must be finite and positive; bfloat16 is refused under the Triton interpreter."""

from __future__ import annotations

import math

import pytest
import torch

import omninft_fast as of
from omninft_fast.dispatch import triton_interpreting

needs_triton = pytest.mark.skipif(
    not (triton_interpreting() or torch.cuda.is_available()), reason="Triton needs CUDA or TRITON_INTERPRET=1"
)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    device = "cpu" if triton_interpreting() else "cuda" if torch.cuda.is_available() else "cpu"
    return tuple(torch.randn(1, n, 2, 16, generator=generator).to(device) for n in (4, 5, 5))


def _all_neg_inf_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    q[0, 1, 0, 0], k[0, :, 0, 0] = math.inf, -1.0  # query 1, head 0: every score is -inf


def _nan_in(name: str, index: tuple[int, ...]) -> object:
    def poison(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        {"q": q, "k": k, "v": v}[name][index] = math.nan

    return poison


@needs_triton
@pytest.mark.parametrize(
    "poison",
    [_all_neg_inf_row, _nan_in("q", (0, 2, 1, 3)), _nan_in("k", (0, 3, 1, 2)), _nan_in("v", (0, 3, 1, 2))],
    ids=["all_-inf_row", "nan_q", "nan_k", "nan_v"],
)
def test_reference_and_triton_agree_on_non_finite_rows(poison: object) -> None:
    q, k, v = _inputs()
    poison(q, k, v)
    ref = of.cross_attention(q, k, v, backend="reference", check_values=False, return_key_mass=True)
    tri = of.cross_attention(q, k, v, backend="triton", check_values=False, return_key_mass=True)
    for name, a, b in (("out", ref[0], tri[0]), ("key mass", ref[1], tri[1])):
        assert torch.equal(a.isnan(), b.isnan()), name
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), atol=2e-5, rtol=2e-5, msg=name)
    assert ref[0].isnan().any()


@pytest.mark.parametrize(("scale", "message"), [(math.inf, "finite"), (math.nan, "finite"), (0.0, "> 0.0")])
def test_softmax_scale_must_be_finite_and_positive(scale: float, message: str) -> None:
    q, k, v = (torch.randn(1, 2, 1, 8) for _ in range(3))
    with pytest.raises(ValueError, match=f"softmax_scale must be {message}"):
        of.cross_attention(q, k, v, softmax_scale=scale, backend="reference")


@pytest.mark.skipif(not triton_interpreting(), reason="the refusal concerns the Triton interpreter")
def test_bfloat16_under_the_interpreter_is_refused() -> None:
    q, k, v = (torch.randn(1, 2, 1, 16, dtype=torch.bfloat16) for _ in range(3))
    with pytest.raises(TypeError, match=r"q: the Triton interpreter \(TRITON_INTERPRET=1\) multiplies bfloat16"):
        of.cross_attention(q, k, v, backend="triton")


def test_undefined_rows_are_those_whose_log_sum_exp_is_not_finite(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference's cheap test (the largest scaled score is not finite) against the definition, over several
    query tiles, with NaNs, infinities, all-``-inf`` rows and scores that overflow float32."""
    from omninft_fast.ops import attention

    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 300, 3, 8, generator=generator), torch.randn(2, 7, 3, 8, generator=generator)
    q[0, 5, 1, 3], q[1, 7, 0, 0], k[1, 2, 2, 1] = math.nan, math.inf, -math.inf
    q[0, 9, 2, 0], k[0, :, 2, 0] = math.inf, -1.0  # every score of that row is -inf
    q[1, 250, 0], k[1, 3, 0] = 1e20, 1e20  # a score that overflows float32
    scale = 0.5
    scores = torch.einsum("bqhd,bkhd->bqhk", q.double(), k.double()).float() * scale
    want = ~torch.isfinite(torch.logsumexp(scores, dim=-1))
    monkeypatch.setattr(attention, "UNDEFINED_ROWS_FLOATS", 2 * 3 * 7 * 64)  # tiles of 128 rows: 3 tiles
    got = attention._undefined_rows(q, k, scale)
    assert want.sum() >= 5 and torch.equal(got, want)


def test_undefined_rows_bound_skips_the_scores_only_when_no_score_can_overflow() -> None:
    """On a CPU, finite inputs whose bound on every score is far below overflow have no undefined row (``None``:
    nothing to mask); large finite inputs beyond the bound go through the scores, which decide no row is undefined
    when none overflows, and the op's output is then SDPA's either way."""
    from omninft_fast.ops import attention

    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, n, 3, 16, generator=generator) for n in (40, 9, 9))
    assert attention._undefined_rows(q, k, 0.25) is None
    big_q, big_k = q * 1e18, k * 1e18  # scores near 1e36: finite, but the bound is above SCORE_BOUND
    undefined = attention._undefined_rows(big_q, big_k, 0.25)
    assert undefined is not None and undefined.shape == (2, 40, 3) and not undefined.any()
    for a, b in ((q, k), (big_q, big_k)):
        out = of.cross_attention(a, b, v, softmax_scale=0.25, backend="reference", check_values=False)
        want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (a, b, v)), scale=0.25)
        assert torch.equal(out, want.transpose(1, 2))
