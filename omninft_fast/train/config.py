"""Typed trainer configuration: dataclasses loaded from YAML with ``key=value`` command-line overrides.

Every option lives in ``TrainConfig``; nested sections are dataclasses, so ``nft.beta=0.5`` or
``rewards.1.weight=2`` address one field. Unknown keys and values of the wrong type or outside their choices raise
``ConfigError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omninft_fast.ops.advantages import ROUTING_MODES, STD_MODES
from omninft_fast.task.synthetic import TaskSpec

LADDER = ("vanilla", "routing", "surgery", "full")


class ConfigError(ValueError):
    """A bad configuration key or value."""


@dataclass
class ModelConfig:
    """The tiny ltx-core LTX-2 (``kind: ltx_tiny``) or a released one (``kind: ltx``, from ``checkpoint``).

    With ``kind: ltx`` the architecture comes from the checkpoint's ``config`` metadata: ``num_layers``, the head
    sizes and ``init_seed`` are not used, and the ``ltx`` section configures the clip, text and decoders.
    """

    kind: str = "ltx_tiny"
    num_layers: int = 4
    video_heads: int = 4
    video_head_dim: int = 16
    audio_heads: int = 4
    audio_head_dim: int = 8
    init_seed: int = 0
    checkpoint: str | None = "checkpoints/tiny_t2av_base.safetensors"
    gradient_checkpointing: bool = False


DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LTXConfig:
    """The released LTX-2 (``model.kind: ltx``): clip size, text contexts and decoders (all files local; the
    ``task`` section is the synthetic task's and is not used).

    Args:
        frames, height, width, fps: clip to generate; ``frames = 8 k + 1``, sizes multiples of 32 (121 frames of
            768x512 at 24 fps: 6144 video and 126 audio tokens).
        text_cache: precomputed text contexts (``omninft_fast.train.ltx_pipeline.write_text_cache``); without
            ``prompts``/``prompt_file`` the run uses every prompt it holds.
        gemma_root: local Gemma directory (weights and tokenizer) to encode prompts missing from the cache.
        text_encoder_device: where Gemma runs (default: ``device``).
        dtype: transformer weights (``bfloat16`` for the 19B model; LoRA keeps them frozen).
        decoder_device, decoder_dtype: where and how the VAE decoders and the vocoder run (default: ``device``).
        decode_batch: samples per decoder call.
        decode_tiling: decode video tile by tile (ltx-core's default tiling; less memory).
        decode_seed: seed of the video decoder's noise injection.
    """

    frames: int = 121
    height: int = 512
    width: int = 768
    fps: float = 24.0
    text_cache: str | None = None
    gemma_root: str | None = None
    text_encoder_device: str | None = None
    dtype: str = "bfloat16"
    decoder_device: str | None = None
    decoder_dtype: str = "bfloat16"
    decode_batch: int = 1
    decode_tiling: bool = False
    decode_seed: int = 0


@dataclass
class RewardConfig:
    """One reward plugin (``omninft_fast.rewards`` registry)."""

    name: str = "synthetic_colour"
    weight: float = 1.0
    device: str = "cpu"
    dtype: str = "float32"
    micro_batch: int = 64
    checkpoint_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplingConfig:
    """Euler ODE sampler (Eq 1-2)."""

    num_steps: int = 10
    shift: float = 1.0


@dataclass
class AdvantageConfig:
    """Eq 6-7: per-reward group advantages (``Z + eps`` normalisation), routing to branches, optimality probability.

    A larger ``eps`` keeps a saturated reward (all samples nearly equal) from turning its noise into advantages.
    """

    routing: str = "modality"
    std: str = "global"
    eps: float = 1e-6
    clip: float = 1.0


@dataclass
class SurgeryConfig:
    """Eq 8-9: partial detach of A2V keys/values in layers ``< boundary`` (or an explicit ``spec``)."""

    enabled: bool = True
    boundary: int = 2
    alpha: float = 0.1
    spec: str | None = None


@dataclass
class ReweightConfig:
    """Eq 10-11: V2A key mass of layers ``>= boundary`` over the last sampling steps, to video token weights."""

    enabled: bool = True
    lam: float = 1.5
    last_steps: int = 3
    boundary: int = 2


@dataclass
class NFTConfig:
    """The DiffusionNFT objective and old-policy update."""

    beta: float = 1.0
    timesteps: str = "grid_shuffled"
    timesteps_per_sample: int = 2
    mini_batch: int = 16
    adaptive_weight: bool = True
    inverse_beta_scale: bool = False
    kl_weight: float = 0.0
    eta_rate: float = 0.001
    eta_max: float = 0.5


@dataclass
class OptimConfig:
    """AdamW (fused, foreach, or NVIDIA apex's FusedAdam) with gradient clipping."""

    lr: float = 3e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    impl: str = "auto"


@dataclass
class FinetuneConfig:
    """``full`` (old policy = EMA copy) or ``lora`` through peft (old policy = a second adapter)."""

    mode: str = "full"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class EvalConfig:
    """Fixed evaluation set (every task prompt, ``samples_per_prompt`` seeds) before and after training."""

    samples_per_prompt: int = 8
    seed: int = 2024
    write_samples: int = 4


@dataclass
class TrainConfig:
    """Everything the ``train`` command reads.

    ``prompts`` (a list) or ``prompt_file`` (one prompt a line) set the prompts drawn each iteration and evaluated;
    by default the synthetic task's prompts (``ltx_tiny``) or those of ``ltx.text_cache`` (``ltx``).
    """

    seed: int = 0
    device: str = "cpu"
    iterations: int = 40
    prompts_per_iter: int = 8
    group_size: int = 8
    ladder: str | None = None
    output_dir: str = "runs/cpu_default"
    checkpoint_every: int = 5
    autocast: str = "auto"
    threads: int = 0
    progress: bool = True
    tensorboard: bool = True
    wandb: bool = False
    prompts: list[str] | None = None
    prompt_file: str | None = None
    task: TaskSpec = field(default_factory=TaskSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    ltx: LTXConfig = field(default_factory=LTXConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rewards: list[RewardConfig] = field(
        default_factory=lambda: [
            RewardConfig(name="synthetic_colour"),
            RewardConfig(name="synthetic_pitch"),
            RewardConfig(name="synthetic_sync"),
        ]
    )
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check choices and ranges; apply the ``ladder`` preset (Table 3's rows) to the three flags."""
        choices = {
            "ladder": (self.ladder, (None, *LADDER)),
            "autocast": (self.autocast, ("auto", "bf16", "off")),
            "model.kind": (self.model.kind, ("ltx_tiny", "ltx")),
            "advantage.routing": (self.advantage.routing, ROUTING_MODES),
            "advantage.std": (self.advantage.std, STD_MODES),
            "nft.timesteps": (self.nft.timesteps, ("grid_shuffled", "uniform")),
            "optim.impl": (self.optim.impl, ("auto", "fused", "foreach", "apex", "plain")),
            "finetune.mode": (self.finetune.mode, ("full", "lora")),
            "ltx.dtype": (self.ltx.dtype, DTYPES),
            "ltx.decoder_dtype": (self.ltx.decoder_dtype, DTYPES),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
        positive = {
            "iterations": self.iterations,
            "prompts_per_iter": self.prompts_per_iter,
            "checkpoint_every": self.checkpoint_every,
            "sampling.num_steps": self.sampling.num_steps,
            "sampling.shift": self.sampling.shift,
            "advantage.clip": self.advantage.clip,
            "nft.beta": self.nft.beta,
            "nft.timesteps_per_sample": self.nft.timesteps_per_sample,
            "nft.mini_batch": self.nft.mini_batch,
            "optim.lr": self.optim.lr,
            "optim.grad_clip": self.optim.grad_clip,
            "reweight.last_steps": self.reweight.last_steps,
            "eval.samples_per_prompt": self.eval.samples_per_prompt,
            "finetune.lora_rank": self.finetune.lora_rank,
            "ltx.frames": self.ltx.frames,
            "ltx.height": self.ltx.height,
            "ltx.width": self.ltx.width,
            "ltx.fps": self.ltx.fps,
            "ltx.decode_batch": self.ltx.decode_batch,
        }
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{key} must be > 0, got {value!r}")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (advantages compare samples of a group), got {self.group_size}")
        if self.reweight.last_steps > self.sampling.num_steps:
            raise ConfigError(
                f"reweight.last_steps ({self.reweight.last_steps}) must be <= sampling.num_steps "
                f"({self.sampling.num_steps})"
            )
        if self.nft.timesteps == "grid_shuffled" and self.nft.timesteps_per_sample > self.sampling.num_steps:
            raise ConfigError(
                f"nft.timesteps_per_sample ({self.nft.timesteps_per_sample}) must be <= sampling.num_steps "
                f"({self.sampling.num_steps}) with nft.timesteps=grid_shuffled"
            )
        for key, value in (("surgery.alpha", self.surgery.alpha), ("nft.eta_max", self.nft.eta_max)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1], got {value!r}")
        for key, value in (
            ("nft.eta_rate", self.nft.eta_rate),
            ("nft.kl_weight", self.nft.kl_weight),
            ("reweight.lam", self.reweight.lam),
            ("optim.weight_decay", self.optim.weight_decay),
            ("advantage.eps", self.advantage.eps),
            ("surgery.boundary", self.surgery.boundary),
            ("reweight.boundary", self.reweight.boundary),
        ):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value!r}")
        if not self.rewards:
            raise ConfigError("rewards must name at least one reward")
        if self.prompts is not None and self.prompt_file is not None:
            raise ConfigError("give prompts or prompt_file, not both")
        if self.prompts is not None and not self.prompts:
            raise ConfigError("prompts must not be empty")
        if self.model.kind == "ltx":
            if not self.model.checkpoint:
                raise ConfigError("model.checkpoint must name the LTX-2 safetensors file with model.kind=ltx")
            if self.ltx.text_cache is None and self.ltx.gemma_root is None:
                raise ConfigError("model.kind=ltx needs ltx.text_cache or ltx.gemma_root for the text contexts")
            if self.prompts is None and self.prompt_file is None and self.ltx.text_cache is None:
                raise ConfigError("model.kind=ltx needs prompts, prompt_file or ltx.text_cache to draw prompts from")
            if (self.ltx.frames - 1) % 8:
                raise ConfigError(f"ltx.frames must be 8 k + 1, got {self.ltx.frames}")
            for key, value in (("ltx.height", self.ltx.height), ("ltx.width", self.ltx.width)):
                if value % 32:
                    raise ConfigError(f"{key} must be a multiple of 32, got {value}")
        if self.ladder is not None:
            rung = LADDER.index(self.ladder)
            self.advantage.routing = "shared" if rung == 0 else "modality"
            self.surgery.enabled = rung >= 2
            self.reweight.enabled = rung >= 3
            self.ladder = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (building nested dataclasses) and return it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}.{i}", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}; valid keys here: {names}")
        kwargs[key] = _coerce(dotted, value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{prefix or cls.__name__}: {error}") from None


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][...] = value`` for ``dotted = "a.b..."``; integer parts index lists."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: index must be in 0..{len(node) - 1}")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{where} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{dotted}: index must be in 0..{len(node) - 1}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{'.'.join(parts[:-1])} is a value, not a section")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read ``path`` (YAML; defaults when ``None``) and apply ``key=value`` overrides (values parsed as YAML)."""
    data: dict[str, Any] = dataclasses.asdict(TrainConfig())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
        _merge(data, loaded, "")
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({error})") from None
        _set(data, key.strip(), value)
    return _build(TrainConfig, data)


def _merge(base: dict[str, Any], update: dict[str, Any], prefix: str) -> None:
    """Deep-merge ``update`` into ``base`` (sections merge, everything else replaces)."""
    for key, value in update.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in base:
            raise ConfigError(f"unknown config key {dotted!r}; valid keys here: {sorted(base)}")
        if isinstance(base[key], dict) and isinstance(value, dict) and key != "options":
            _merge(base[key], value, dotted)
        else:
            base[key] = value


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
