"""Eq 6 (group advantage, optimality probability) and Eq 7 (modality-wise routing)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omninft_fast import group_advantages, optimality_probability, route_advantages
from omninft_fast.testing import explicit_group_advantages


def test_group_advantage_by_hand() -> None:
    # Group [1, 3]: mean 2, population std 1 -> [-1, 1]. Group [0, 0, ...] is flat -> exact zeros.
    rewards = torch.tensor([[1.0, 3.0], [5.0, 5.0]], dtype=torch.float64)
    adv = group_advantages(rewards, eps=0.0)
    assert torch.equal(adv, torch.tensor([[-1.0, 1.0], [0.0, 0.0]], dtype=torch.float64))


def test_global_std_uses_all_rewards() -> None:
    # Rewards [[1, 3], [5, 7]]: group means 2 and 6; global population std of {1,3,5,7} = sqrt(5).
    rewards = torch.tensor([[1.0, 3.0], [5.0, 7.0]], dtype=torch.float64)
    adv = group_advantages(rewards, std="global", eps=0.0)
    s = math.sqrt(5.0)
    torch.testing.assert_close(adv, torch.tensor([[-1 / s, 1 / s], [-1 / s, 1 / s]], dtype=torch.float64))


def test_flat_group_never_nan() -> None:
    adv = group_advantages(torch.full((3, 4), 0.7), eps=0.0)
    assert torch.equal(adv, torch.zeros(3, 4))


def test_integer_rewards_accepted() -> None:
    adv = group_advantages(torch.tensor([[0, 1], [2, 2]]))
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 1.0], [0.0, 0.0]]), atol=1e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    prompts=st.integers(1, 7),
    group=st.integers(1, 9),
    std=st.sampled_from(["group", "global"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_group_advantages_match_loop(prompts: int, group: int, std: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(prompts, group, generator=g, dtype=torch.float64) * 3 + 1
    rewards[0] = rewards[0, 0]  # always include one flat group
    got = group_advantages(rewards, std=std)
    torch.testing.assert_close(got, explicit_group_advantages(rewards, std=std), rtol=1e-12, atol=1e-12)


def test_group_advantages_float32_accumulates_in_float32(gen: torch.Generator) -> None:
    rewards = torch.randn(4, 8, generator=gen).to(torch.bfloat16)
    adv = group_advantages(rewards)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), explicit_group_advantages(rewards.float()), atol=1e-5, rtol=1e-5)


def test_non_finite_reward_named_by_position() -> None:
    rewards = torch.ones(3, 4)
    rewards[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"rewards\[2, 1\] is not finite"):
        group_advantages(rewards)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rewards": torch.ones(4)}, ValueError, "rewards must have 2 dimensions"),
        ({"rewards": torch.ones(0, 3)}, ValueError, "rewards must be non-empty"),
        ({"rewards": [[1.0, 2.0]]}, TypeError, "rewards must be a torch.Tensor"),
        ({"rewards": torch.ones(2, 2, dtype=torch.bool)}, TypeError, "rewards must be real-valued"),
        ({"rewards": torch.ones(2, 2), "std": "batch"}, ValueError, "std must be one of"),
        ({"rewards": torch.ones(2, 2), "eps": -1.0}, ValueError, "eps must be >= 0"),
    ],
)
def test_group_advantages_bad_input(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        group_advantages(**kwargs)


def test_optimality_probability_by_hand() -> None:
    adv = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    torch.testing.assert_close(optimality_probability(adv), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    # DiffusionNFT's convention: clip at 5, so A = 2.5 gives r = 0.75.
    torch.testing.assert_close(optimality_probability(torch.tensor([2.5, -10.0]), clip=5.0), torch.tensor([0.75, 0.0]))
    # The release's r = 1/2 + clip(A, -5, 5) / 10 on both sides of and beyond the clip.
    adv = torch.tensor([-7.0, -5.0, -1.0, 0.0, 1.0, 4.0, 5.0, 6.0])
    want = 0.5 + adv.clamp(-5.0, 5.0) / 10.0
    torch.testing.assert_close(optimality_probability(adv, clip=5.0), want)
    torch.testing.assert_close(want, torch.tensor([0.0, 0.0, 0.4, 0.5, 0.6, 0.9, 1.0, 1.0]))


def test_optimality_probability_bad_clip() -> None:
    with pytest.raises(ValueError, match="clip must be > 0"):
        optimality_probability(torch.zeros(2), clip=0.0)


def test_routing_modality_is_eq7() -> None:
    av, aa, aav = torch.tensor([1.0, -2.0]), torch.tensor([-1.0, 0.5]), torch.tensor([0.25, 0.25])
    video, audio = route_advantages(av, aa, aav, mode="modality")
    torch.testing.assert_close(video, torch.tensor([1.25, -1.75]))
    torch.testing.assert_close(audio, torch.tensor([-0.75, 0.75]))


def test_routing_shared_gives_both_branches_the_sum() -> None:
    av, aa, aav = torch.tensor([1.0, -2.0]), torch.tensor([-1.0, 0.5]), torch.tensor([0.25, 0.25])
    video, audio = route_advantages(av, aa, aav, mode="shared")
    torch.testing.assert_close(video, torch.tensor([0.25, -1.25]))
    assert torch.equal(video, audio)


def test_routing_gdpo_whitens_the_sum(gen: torch.Generator) -> None:
    av, aa, aav = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    video, audio = route_advantages(av, aa, aav, mode="gdpo", eps=0.0)
    total = av + aa + aav
    want = (total - total.mean()) / total.std(correction=0)
    torch.testing.assert_close(video, want)
    assert torch.equal(video, audio)
    assert abs(float(video.mean())) < 1e-12 and abs(float(video.std(correction=0)) - 1) < 1e-12


def test_routing_bad_input() -> None:
    with pytest.raises(ValueError, match="adv_audio must have shape"):
        route_advantages(torch.zeros(2), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="mode must be one of"):
        route_advantages(torch.zeros(2), torch.zeros(2), torch.zeros(2), mode="sum")
    for mode in ("modality", "shared", "gdpo"):  # eps is checked whichever mode reads it
        with pytest.raises(ValueError, match="eps must be >= 0.0, got -1.0"):
            route_advantages(torch.zeros(2), torch.zeros(2), torch.zeros(2), mode=mode, eps=-1)
    with pytest.raises(ValueError, match="^adv_av is on meta but adv_video is on cpu$"):
        route_advantages(torch.zeros(2), torch.zeros(2), torch.zeros(2, device="meta"))
    with pytest.raises(
        ValueError, match=r"^mode 'gdpo' whitens over the samples and needs at least one, got shape \(0, 3\)$"
    ):
        route_advantages(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), mode="gdpo")


def test_numpy_scalars_are_real_numbers() -> None:
    np = pytest.importorskip("numpy")
    rewards = torch.tensor([[1.0, 2.0, 4.0]])
    want = group_advantages(rewards, eps=1e-4)
    assert torch.equal(group_advantages(rewards, eps=np.float32(1e-4)), want)
    assert torch.equal(optimality_probability(want, clip=np.int64(1)), optimality_probability(want, clip=1.0))
    with pytest.raises(TypeError, match="eps must be a real number, got bool$"):
        group_advantages(rewards, eps=np.bool_(True))
