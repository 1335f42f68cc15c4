"""The OmniNFT trainer (Algorithm 1): config, builders, stages, model interface, Euler sampler, checkpoints, report."""

from omninft_fast.train.config import ConfigError, TrainConfig, load_config
from omninft_fast.train.model import AVVelocityModel, Condition, LTXAVModel
from omninft_fast.train.report import EvalResult, format_table
from omninft_fast.train.sampler import euler_sample, time_grid
from omninft_fast.train.trainer import Trainer
from omninft_fast.train.validation import TrainingDiverged

__all__ = [
    "AVVelocityModel",
    "Condition",
    "ConfigError",
    "EvalResult",
    "LTXAVModel",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "euler_sample",
    "format_table",
    "load_config",
    "time_grid",
]
