"""Reward plugins: the interface, the registry, the synthetic task's verifiable rewards and the paper's models.

Importing this package registers every plugin; the model adapters load their libraries (transformers,
audiobox-aesthetics) only when a plugin is built.
"""

from omninft_fast.rewards import (
    audiobox,
    clap,
    clip_score,
    hpsv3,
    imagebind,
    synchformer,
    synthetic,
    videoalign,
)
from omninft_fast.rewards.base import (
    MODALITIES,
    RewardBatch,
    RewardModel,
    available_rewards,
    build_reward,
    register_reward,
    reward_class,
)

__all__ = [
    "MODALITIES",
    "RewardBatch",
    "RewardModel",
    "audiobox",
    "available_rewards",
    "build_reward",
    "clap",
    "clip_score",
    "hpsv3",
    "imagebind",
    "register_reward",
    "reward_class",
    "synchformer",
    "synthetic",
    "videoalign",
]
