"""Reward plugins: the interface, the registry, and the verifiable rewards of the synthetic task."""

from omninft_fast.rewards import synthetic
from omninft_fast.rewards.base import (
    MODALITIES,
    RewardBatch,
    RewardModel,
    available_rewards,
    build_reward,
    register_reward,
)

__all__ = [
    "MODALITIES",
    "RewardBatch",
    "RewardModel",
    "available_rewards",
    "build_reward",
    "register_reward",
    "synthetic",
]
