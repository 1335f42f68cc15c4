"""Eq 10 (accumulated V2A key mass per video token) and Eq 11 (min-max normalised region weights)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omninft_fast import RegionScoreAccumulator, frame_region_weights, region_weights
from omninft_fast.testing import explicit_region_weights


def test_region_weights_by_hand() -> None:
    scores = torch.tensor([[0.0, 1.0, 2.0, 4.0], [3.0, 3.0, 3.0, 3.0]])
    want = torch.tensor([[1.0, 1.375, 1.75, 2.5], [1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(region_weights(scores, lam=1.5), want)


def test_region_weights_lambda_zero_is_uniform(gen: torch.Generator) -> None:
    assert torch.equal(region_weights(torch.rand(2, 9, generator=gen), lam=0.0), torch.ones(2, 9))


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 4), tokens=st.integers(1, 50), lam=st.floats(0, 4), seed=st.integers(0, 2**31 - 1))
def test_region_weights_match_loop(batch: int, tokens: int, lam: float, seed: int) -> None:
    scores = torch.rand(batch, tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = region_weights(scores, lam=lam)
    torch.testing.assert_close(got, explicit_region_weights(scores, lam), rtol=1e-12, atol=1e-12)
    assert float(got.min()) >= 1.0 and float(got.max()) <= 1.0 + lam + 1e-12


def test_region_weights_bad_input() -> None:
    with pytest.raises(ValueError, match="scores must have 2 dimensions"):
        region_weights(torch.ones(3))
    with pytest.raises(ValueError, match=r"scores\[0, 1\] is not finite"):
        region_weights(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match="lam must be >= 0"):
        region_weights(torch.ones(1, 2), lam=-1.0)
    with pytest.raises(ValueError, match="at least one token"):
        region_weights(torch.ones(2, 0))


def test_accumulator_keeps_deep_layers_and_last_steps(gen: torch.Generator) -> None:
    num_layers, num_steps = 6, 5
    acc = RegionScoreAccumulator(num_steps=num_steps, last_steps=2, boundary=4)
    masses = torch.rand(num_layers, num_steps, 2, 7, generator=gen, dtype=torch.float64)
    kept = [
        (layer, step)
        for step in range(num_steps)
        for layer in range(num_layers)
        if acc.add(layer, step, masses[layer, step])
    ]
    assert kept == [(4, 3), (5, 3), (4, 4), (5, 4)]
    assert acc.count == 4
    torch.testing.assert_close(acc.scores(), masses[4:, 3:].mean(dim=(0, 1)))
    acc.reset()
    with pytest.raises(RuntimeError, match="no key mass was added"):
        acc.scores()


def test_frame_region_weights_refuse_samples_without_tokens_and_take_batches_without_samples() -> None:
    with pytest.raises(ValueError, match=r"^scores must have at least one token per sample, got shape \(2, 0\)$"):
        frame_region_weights(torch.zeros(2, 0), frames=1)
    assert frame_region_weights(torch.zeros(0, 6), frames=2).shape == (0, 6)


def test_accumulator_wants_and_errors() -> None:
    acc = RegionScoreAccumulator(num_steps=10, last_steps=3)
    assert acc.wants(10, 7) and not acc.wants(9, 9) and not acc.wants(47, 6)
    with pytest.raises(ValueError, match="last_steps must be an int in 1..10"):
        RegionScoreAccumulator(num_steps=10, last_steps=11)
    with pytest.raises(ValueError, match="step must be an int in 0..9"):
        acc.wants(10, 10)
    acc.add(10, 9, torch.ones(2, 5))
    with pytest.raises(ValueError, match="key_mass has shape"):
        acc.add(11, 9, torch.ones(2, 4))


def test_region_weights_of_scores_spanning_float32() -> None:
    """A span larger than float32's range still maps the smallest score to 1 and the largest to 1 + lam."""
    w = region_weights(torch.tensor([[-3e38, 0.0, 3e38]]), lam=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.75, 2.5]]))


@pytest.mark.parametrize("value", [0.1, 0.0205, 1e-30, 7.0])
@pytest.mark.parametrize("tokens", [7, 880])
def test_a_flat_frame_gets_the_middle_weight(value: float, tokens: int) -> None:
    """All-equal scores in a frame are z = 0 exactly (their rounded float32 std need not be 0)."""
    scores = torch.cat([torch.full((1, tokens), value), torch.linspace(0, 1, tokens)[None]], dim=1)
    w = frame_region_weights(scores, frames=2, w_max=1.5)
    assert torch.equal(w[:, :tokens], torch.full((1, tokens), 1.25))
    assert torch.equal(frame_region_weights(scores[:, :tokens], frames=1), torch.full((1, tokens), 1.25))
