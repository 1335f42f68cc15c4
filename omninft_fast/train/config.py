"""Typed trainer configuration: OmegaConf structured configs built from dataclasses, YAML files and ``key=value``
command-line overrides.

Every option lives in ``TrainConfig``; nested sections are dataclasses, so ``nft.beta=0.5`` or
``rewards.1.weight=2`` address one field. Files and override values are read as YAML 1.2 (``1e-4`` is a float,
``1:0.5`` a string) and converted to each field's type by OmegaConf. Unknown keys, values of the wrong type and
values outside their choices raise ``ConfigError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from omninft_fast._checks import parse_device
from omninft_fast.fp8 import DEFAULT_MODULES, RECIPES, TE_RECIPES, modules_pattern
from omninft_fast.ltx2.attention_backends import ATTENTION_BACKENDS
from omninft_fast.ops.advantages import ROUTING_MODES, STD_MODES
from omninft_fast.task.synthetic import TaskSpec

TIMESTEP_MODES = ("grid_shuffled", "uniform", "grid_first")
LADDER = ("vanilla", "routing", "surgery", "full")
MODEL_SIZES = ("num_layers", "video_heads", "video_head_dim", "audio_heads", "audio_head_dim")
TASK_SIZES = ("frames", "height", "width", "patch", "video_channels", "audio_channels", "fps", "sample_rate")


def ladder_preset(rung: str) -> dict[str, Any]:
    """The three flags of Table 3's row ``rung``: routing, gradient surgery, region reweighting. The vanilla row is
    GDPO aggregation (Table 1's "LTX-2 + GDPO" equals Table 3's vanilla row): per-reward normalisation, summed and
    whitened (GDPO's batch normalisation), one advantage shared by both branches. The authors' release sums without
    whitening (``advantage.routing=shared``), about twice the scale at its reward weights."""
    index = LADDER.index(rung)
    return {
        "advantage.routing": "gdpo" if index == 0 else "modality",
        "surgery.enabled": index >= 2,
        "reweight.enabled": index >= 3,
    }


class ConfigError(ValueError):
    """A bad configuration key or value."""


@dataclass
class ModelConfig:
    """The tiny ltx-core LTX-2 (``kind: ltx_tiny``) or a released one (``kind: ltx``, from ``checkpoint``).

    With ``kind: ltx`` the architecture comes from the checkpoint's ``config`` metadata: ``num_layers``, the head
    sizes and ``init_seed`` are not used, and the ``ltx`` section configures the clip, text and decoders.

    ``attention``: the backend of the blocks' self- and text-attention (``omninft_fast.attention_backends``:
    ``auto`` picks FlashAttention-3, then flash-attn, then xformers where installed and usable, else PyTorch SDPA;
    A2V / V2A run through the patched cross-attention). ``compile``: ``torch.compile`` the transformer for
    rollouts (``rollout``: the old policy's sampling) or for every forward (``all``), or not (``none``), with
    ``compile_backend`` (``inductor``; ``aot_eager`` traces the same graphs without generating code).
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
    attention: str = "auto"
    compile: str = "none"
    compile_backend: str = "inductor"


DTYPES = ("float32", "bfloat16", "float16")
LORA_INITS = ("default", "gaussian")


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
        decode_batch: samples per decoder call (1 with a noise-injecting, timestep-conditioned video decoder).
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
    """One reward plugin (``omninft_fast.rewards`` registry) and the reward term(s) it gives.

    ``outputs`` (signed weights of the plugin's named outputs, e.g. ``{VQ: 0.5, TA: 0.5}``) makes the plugin one
    term named ``name``, ``sum_k w_k output_k``; empty, every output is its own term. ``weight`` is the term weight
    (each term gets one advantage, Eq 6).
    """

    name: str = "synthetic_colour"
    weight: float = 1.0
    outputs: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    micro_batch: int = 64
    checkpoint_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplingConfig:
    """Euler ODE sampler (Eq 1-2) of rollouts (``num_steps``) and evaluation (``eval_steps``, default
    ``num_steps``), with LTX-2's guidance as an option (off by default: the paper samples without it).

    Per modality ``cond + (cfg - 1) (cond - uncond) + stg_scale (cond - perturbed)`` (ltx-core's multi-modal guider
    without rescaling; ``video_cfg``/``audio_cfg``), where ``uncond`` is the pass on the empty prompt and
    ``perturbed`` the pass skipping the video and audio self-attention of ``stg_blocks``; the passes of a step run
    as one batched forward (the release: 1.5 / 3.0, STG 1.0 at block 29). With ``stg_shared_prefix`` the perturbed
    pass shares the conditional pass's blocks before the first of ``stg_blocks`` (they compute the same) and joins
    it there as a copy; off, every pass runs every block.

    An iteration's rollouts run in micro-batches of ``batch_size`` samples (0: all at once; the noise of every
    sample is drawn first, so the cut does not change what is sampled); with ``overlap`` one worker thread decodes
    and scores micro-batch k while micro-batch k+1 samples.
    """

    num_steps: int = 10
    shift: float = 1.0
    eval_steps: int | None = None
    video_cfg: float = 1.0
    audio_cfg: float = 1.0
    stg_scale: float = 0.0
    stg_blocks: list[int] = field(default_factory=list)
    stg_shared_prefix: bool = True
    batch_size: int = 0
    overlap: bool = True


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
    """Eq 8-9: partial detach in A2V of layers ``< boundary`` with ``alpha`` (or an explicit ``spec`` such as
    ``"0:1,1-10:0.9,40-47:0.7"``, the release's gradient factors 0 / 0.1 / 0.3 as alphas).

    ``where``: ``projected`` (the paper's Eq 8 on the projected keys/values) or ``input`` (the release: the audio
    stream entering A2V, so the A2V key/value projections keep their full gradient).
    """

    enabled: bool = True
    where: str = "projected"
    boundary: int = 2
    alpha: float = 0.1
    spec: str | None = None


@dataclass
class ReweightConfig:
    """Eq 10-11: V2A key mass of layers ``>= boundary`` over ``last_steps`` sampling steps, to video token weights.

    The steps counted end at ``last_step`` (0-based; default the final step; the release: 9 steps ending at 18 of
    20). With guided rollouts ``passes`` is ``cond`` (the conditional pass) or ``all`` (the mean over passes, the
    release). ``form``: ``minmax`` (Eq 11 with ``lam``) or ``frame_zscore`` (the release: per latent frame
    z-score sigmoid up to ``w_max``, ramped in linearly over the first ``warmup`` iterations).
    """

    enabled: bool = True
    lam: float = 1.5
    last_steps: int = 3
    boundary: int = 2
    last_step: int | None = None
    passes: str = "cond"
    form: str = "minmax"
    w_max: float = 1.5
    warmup: int = 0


@dataclass
class NFTConfig:
    """The DiffusionNFT objective, its training times and steps, and the old-policy update.

    Training times per sample: ``grid_shuffled`` draws ``timesteps_per_sample`` distinct sampler-grid times,
    ``uniform`` that many uniform times in the grid's range, ``grid_first`` takes every one of the first
    ``round(timestep_fraction * sampling.num_steps)`` grid times (the highest noise; the release: 0.4 of 20 = 8),
    each with fresh noise. ``accumulate``: one optimiser step per ``mini_batch`` (``mini_batch``) or per iteration
    (``iteration``, the release), each micro-batch's loss divided by the number of micro-batches in the step.

    ``x0_norm`` self-normalises each term per sample in x0 space (``nft_loss(x0_norm_t=t)``, DiffusionNFT's and
    the authors' form; it replaces ``adaptive_weight``); ``policy_scale`` multiplies the policy term (the release:
    5); ``kl_space`` is ``velocity`` or ``x0``. The step's loss is ``video_weight * video + audio_weight * audio``,
    divided by ``video_weight + audio_weight`` with ``modality_reduction: mean`` (the release: weights 1, mean).

    ``precompute_old``: the old policy's and the reference's velocities of every (sample, time) pair come from
    no-grad forwards of ``predict_batch`` pairs (0: ``mini_batch``) before the training steps, which then run one
    forward and one backward each; ``false`` computes them inside every step (the release's way).
    """

    beta: float = 1.0
    timesteps: str = "grid_shuffled"
    timesteps_per_sample: int = 2
    timestep_fraction: float = 0.4
    mini_batch: int = 16
    accumulate: str = "mini_batch"
    adaptive_weight: bool = True
    x0_norm: bool = False
    inverse_beta_scale: bool = False
    policy_scale: float = 1.0
    kl_weight: float = 0.0
    kl_space: str = "velocity"
    video_weight: float = 1.0
    audio_weight: float = 1.0
    modality_reduction: str = "sum"
    eta_rate: float = 0.001
    eta_max: float = 0.5
    precompute_old: bool = True
    predict_batch: int = 0


def times_per_sample(nft: NFTConfig, sampling: SamplingConfig) -> int:
    """Training times per sample: ``round(timestep_fraction * num_steps)`` with ``grid_first``, else
    ``timesteps_per_sample``."""
    if nft.timesteps == "grid_first":
        return round(nft.timestep_fraction * sampling.num_steps)
    return nft.timesteps_per_sample


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
    """``full`` (old policy = EMA copy) or ``lora`` through peft (old policy = a second adapter). ``lora_init``: the
    down projection's initialisation, peft's default (Kaiming-uniform) or ``gaussian`` (std ``1 / rank``, the
    release's); the up projection starts at zero either way, so the starting policy is the base."""

    mode: str = "full"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lora_init: str = "default"


@dataclass
class FP8Config:
    """FP8 linear layers (``omninft_fast.fp8``) in the transformer blocks of the policy, the old policy and the KL
    reference; ``rollout_only`` keeps the trained policy's layers as they are (full fine-tuning only: with LoRA the
    three share one model); ``modules``: a regular expression over the linear layers' qualified names (default:
    the blocks' attention projections and feed-forward layers, ``fp8.DEFAULT_MODULES``). ``recipe``: ``rowwise`` or
    ``tensorwise`` with ``backend: torch``; ``delayed``, ``current`` or ``block`` with ``backend: te`` (Transformer
    Engine, CUDA only). ``cache_weights`` (``backend: torch``): keep the weights' FP8 copies between uses (2 bytes per
    patched parameter); ``false`` quantises them on every use, for models whose memory cannot hold the copies."""

    enabled: bool = False
    backend: str = "torch"
    recipe: str = "rowwise"
    rollout_only: bool = False
    modules: str = DEFAULT_MODULES
    cache_weights: bool = True


@dataclass
class DistributedConfig:
    """Training on several processes (``train/distributed.py``): ``backend`` ``none`` (one process), ``fsdp2``
    (PyTorch ``fully_shard``) or ``deepspeed`` (ZeRO ``zero_stage`` 2 or 3), launched with ``torchrun``.
    ``mixed_precision``: ``auto`` is bf16 compute with fp32 gradient reduction and master weights on CUDA and fp32
    on CPU; ``timeout_s`` bounds a collective's wait."""

    backend: str = "none"
    zero_stage: int = 3
    mixed_precision: str = "auto"
    timeout_s: int = 600


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
    ``on_nonfinite``: a NaN or infinite reward stops the run (``stop``), or its samples' groups are left out of that
    iteration's update with a warning naming the reward (``drop``).
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
    on_nonfinite: str = "stop"
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
    fp8: FP8Config = field(default_factory=FP8Config)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check choices, ranges and that the three flags agree with ``ladder`` (``load_config`` applies it)."""
        choices = {
            "ladder": (self.ladder, (None, *LADDER)),
            "autocast": (self.autocast, ("auto", "bf16", "off")),
            "on_nonfinite": (self.on_nonfinite, ("stop", "drop")),
            "model.kind": (self.model.kind, ("ltx_tiny", "ltx")),
            "model.attention": (self.model.attention, ATTENTION_BACKENDS),
            "model.compile": (self.model.compile, ("none", "rollout", "all")),
            "model.compile_backend": (self.model.compile_backend, tuple(torch._dynamo.list_backends(exclude_tags=()))),
            "advantage.routing": (self.advantage.routing, ROUTING_MODES),
            "advantage.std": (self.advantage.std, STD_MODES),
            "nft.timesteps": (self.nft.timesteps, TIMESTEP_MODES),
            "nft.accumulate": (self.nft.accumulate, ("mini_batch", "iteration")),
            "reweight.passes": (self.reweight.passes, ("cond", "all")),
            "surgery.where": (self.surgery.where, ("projected", "input")),
            "reweight.form": (self.reweight.form, ("minmax", "frame_zscore")),
            "nft.kl_space": (self.nft.kl_space, ("velocity", "x0")),
            "nft.modality_reduction": (self.nft.modality_reduction, ("sum", "mean")),
            "optim.impl": (self.optim.impl, ("auto", "fused", "foreach", "apex", "plain")),
            "finetune.mode": (self.finetune.mode, ("full", "lora")),
            "fp8.backend": (self.fp8.backend, ("torch", "te")),
            "fp8.recipe": (self.fp8.recipe, TE_RECIPES if self.fp8.backend == "te" else RECIPES),
            "ltx.dtype": (self.ltx.dtype, DTYPES),
            "ltx.decoder_dtype": (self.ltx.decoder_dtype, DTYPES),
            "distributed.backend": (self.distributed.backend, ("none", "fsdp2", "deepspeed")),
            "distributed.zero_stage": (self.distributed.zero_stage, (2, 3)),
            "finetune.lora_init": (self.finetune.lora_init, LORA_INITS),
            "distributed.mixed_precision": (self.distributed.mixed_precision, ("auto", "bf16", "off")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
        for key, value in _floats(self.to_dict()):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be finite, got {value!r}")
        devices = [("device", self.device), *((f"rewards.{i}.device", r.device) for i, r in enumerate(self.rewards))]
        devices += [
            ("ltx.text_encoder_device", self.ltx.text_encoder_device),
            ("ltx.decoder_device", self.ltx.decoder_device),
        ]
        for key, device in devices:
            try:
                if device is not None:
                    parse_device(device, key)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        positive = {
            "iterations": self.iterations,
            "prompts_per_iter": self.prompts_per_iter,
            "checkpoint_every": self.checkpoint_every,
            "sampling.num_steps": self.sampling.num_steps,
            "sampling.shift": self.sampling.shift,
            "sampling.eval_steps": 1 if self.sampling.eval_steps is None else self.sampling.eval_steps,
            "advantage.clip": self.advantage.clip,
            "nft.beta": self.nft.beta,
            "nft.policy_scale": self.nft.policy_scale,
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
            "distributed.timeout_s": self.distributed.timeout_s,
            **{f"task.{name}": getattr(self.task, name) for name in TASK_SIZES},
            **{f"model.{name}": getattr(self.model, name) for name in MODEL_SIZES},
        }
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{key} must be > 0, got {value!r}")
        try:
            modules_pattern(self.fp8.modules)
        except ValueError as error:
            raise ConfigError(f"fp8.{error}") from None
        if self.fp8.backend == "te" and not self.fp8.cache_weights:
            raise ConfigError(
                "fp8.cache_weights=false applies to fp8.backend=torch (Transformer Engine keeps its own FP8 weights)"
            )
        if self.fp8.enabled and self.fp8.rollout_only and self.finetune.mode == "lora":
            raise ConfigError(
                "fp8.rollout_only needs finetune.mode=full: with LoRA the trained and the old policy share one model"
            )
        if self.model.compile == "rollout" and self.finetune.mode == "lora":
            raise ConfigError(
                "model.compile=rollout needs finetune.mode=full: with LoRA the old policy is the policy's own model "
                "(use model.compile=all)"
            )
        if self.distributed.backend != "none" and self.on_nonfinite == "drop":
            raise ConfigError(
                "on_nonfinite=drop needs distributed.backend=none (dropped groups would split unevenly over ranks)"
            )
        cuda = torch.device(self.device).type == "cuda"
        precision = self.distributed.mixed_precision
        bf16_engine = precision == "bf16" or (precision == "auto" and cuda)
        autocast_on = self.autocast == "bf16" or (self.autocast == "auto" and cuda)
        if self.model.kind == "ltx" and self.ltx.dtype != "float32" and not autocast_on:
            raise ConfigError(
                f"ltx.dtype={self.ltx.dtype} needs autocast=bf16 (or auto on a CUDA device): the sampler's latents are "
                "float32"
            )
        if self.distributed.backend == "deepspeed" and bf16_engine and not autocast_on:
            raise ConfigError(
                "distributed.backend=deepspeed with bf16 (distributed.mixed_precision) needs autocast=bf16: DeepSpeed "
                "holds the model in bf16"
            )
        single = (("fp8.enabled", self.fp8.enabled, False), ("model.compile", self.model.compile, "none"))
        for key, value, off in single:
            if self.distributed.backend != "none" and value != off:
                raise ConfigError(f"{key}={value} needs distributed.backend=none")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (advantages compare samples of a group), got {self.group_size}")
        last_step = self.sampling.num_steps - 1 if self.reweight.last_step is None else self.reweight.last_step
        if not 0 <= last_step < self.sampling.num_steps:
            raise ConfigError(f"reweight.last_step must be in 0..{self.sampling.num_steps - 1}, got {last_step}")
        if self.reweight.last_steps > last_step + 1:
            bound = "sampling.num_steps" if self.reweight.last_step is None else "reweight.last_step + 1"
            raise ConfigError(f"reweight.last_steps ({self.reweight.last_steps}) must be <= {bound} ({last_step + 1})")
        for block in self.sampling.stg_blocks:
            if block < 0:
                raise ConfigError(f"sampling.stg_blocks must hold block indices >= 0, got {block}")
        if self.sampling.stg_scale != 0 and not self.sampling.stg_blocks:
            raise ConfigError("sampling.stg_scale needs sampling.stg_blocks (the blocks whose self-attention to skip)")
        if self.nft.timesteps == "grid_shuffled" and self.nft.timesteps_per_sample > self.sampling.num_steps:
            raise ConfigError(
                f"nft.timesteps_per_sample ({self.nft.timesteps_per_sample}) must be <= sampling.num_steps "
                f"({self.sampling.num_steps}) with nft.timesteps=grid_shuffled"
            )
        if (
            self.nft.timesteps == "grid_first"
            and not 1 <= times_per_sample(self.nft, self.sampling) <= self.sampling.num_steps
        ):
            raise ConfigError(
                f"nft.timestep_fraction ({self.nft.timestep_fraction}) must keep 1..sampling.num_steps grid times"
            )
        if self.reweight.w_max < 1:
            raise ConfigError(f"reweight.w_max must be >= 1, got {self.reweight.w_max!r}")
        for key, value in (("surgery.alpha", self.surgery.alpha), ("nft.eta_max", self.nft.eta_max)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1], got {value!r}")
        for key, value in (
            ("nft.eta_rate", self.nft.eta_rate),
            ("nft.kl_weight", self.nft.kl_weight),
            ("nft.video_weight", self.nft.video_weight),
            ("sampling.video_cfg", self.sampling.video_cfg),
            ("sampling.audio_cfg", self.sampling.audio_cfg),
            ("nft.audio_weight", self.nft.audio_weight),
            ("reweight.lam", self.reweight.lam),
            ("reweight.warmup", self.reweight.warmup),
            ("optim.weight_decay", self.optim.weight_decay),
            ("optim.eps", self.optim.eps),
            ("advantage.eps", self.advantage.eps),
            ("surgery.boundary", self.surgery.boundary),
            ("reweight.boundary", self.reweight.boundary),
            ("sampling.batch_size", self.sampling.batch_size),
            ("nft.predict_batch", self.nft.predict_batch),
            ("eval.write_samples", self.eval.write_samples),
        ):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value!r}")
        if not str(self.output_dir).strip():
            raise ConfigError("output_dir must name a folder, got ''")
        if not self.nft.video_weight + self.nft.audio_weight > 0:
            raise ConfigError("nft.video_weight + nft.audio_weight must be > 0")
        if self.nft.x0_norm and self.nft.adaptive_weight:
            raise ConfigError("nft.x0_norm replaces nft.adaptive_weight: set nft.adaptive_weight=false")
        if self.nft.kl_space == "x0" and not self.nft.x0_norm:
            raise ConfigError("nft.kl_space=x0 needs nft.x0_norm=true (both use the flow time of each sample)")
        if not self.rewards:
            raise ConfigError("rewards must name at least one reward")
        for i, reward in enumerate(self.rewards):
            for name, weight in reward.outputs.items():
                if isinstance(weight, bool) or not isinstance(weight, int | float):
                    raise ConfigError(f"rewards.{i}.outputs.{name} must be a number, got {weight!r}")
        for key, items in (("finetune.lora_targets", self.finetune.lora_targets), ("prompts", self.prompts or [])):
            for j, item in enumerate(items):
                if not isinstance(item, str):
                    raise ConfigError(f"{key}.{j} must be a string, got {item!r}")
        for key, value in (("optim.beta1", self.optim.beta1), ("optim.beta2", self.optim.beta2)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {value!r}")
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
            flags = {
                "advantage.routing": self.advantage.routing,
                "surgery.enabled": self.surgery.enabled,
                "reweight.enabled": self.reweight.enabled,
            }
            preset = ladder_preset(self.ladder)
            if flags != preset:
                raise ConfigError(f"ladder={self.ladder} sets {preset}, got {flags}")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as nested plain dicts and lists."""
        return dataclasses.asdict(self)


_YAML = YAML(typ="safe", pure=True)
_YAML.default_flow_style = False
_YAML.representer.sort_base_mapping_type_on_output = False
_ABSENT = object()


def _floats(tree: Any, where: str = "") -> list[tuple[str, float]]:
    """Every float of a nested dict/list tree with its dotted key."""
    if isinstance(tree, dict):
        return [item for key, value in tree.items() for item in _floats(value, f"{where}.{key}" if where else key)]
    if isinstance(tree, list):
        return [item for index, value in enumerate(tree) for item in _floats(value, f"{where}.{index}")]
    return [(where, tree)] if isinstance(tree, float) else []


def _first_line(error: Exception) -> str:
    """An OmegaConf (or other) error's message, its first line."""
    return str(getattr(error, "msg", None) or error).splitlines()[0]


def _typed(schema: DictConfig, data: DictConfig | dict[str, Any], where: str) -> DictConfig:
    """``data`` merged onto ``schema``: keys and types checked against the dataclasses. Errors name the dotted key,
    under ``where`` (an override's key) when OmegaConf names it relative to a value that ``where`` replaced."""
    try:
        return OmegaConf.merge(schema, data)
    except OmegaConfBaseException as error:
        key = str(getattr(error, "full_key", "") or "")
        if where and not key.startswith(where.split(".")[0]):
            # Relative to the list element ``where`` reaches into, else to the section it replaced.
            parts = where.split(".")
            indices = [i for i, part in enumerate(parts) if part.isdigit()]
            key = ".".join([*parts[: indices[-1] + 1 if indices else len(parts)], key]) if key else where
        message = _first_line(error)
        if isinstance(error, (ConfigKeyError, ConfigAttributeError)):
            raise ConfigError(f"unknown config key {key!r} ({message})") from None
        raise ConfigError(f"{key}: {message}") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where or 'config'}: {_first_line(error)}") from None


def _check_path(tree: DictConfig, key: str) -> None:
    """Raise when ``key`` indexes a list out of range or descends into a value."""
    parts = key.split(".")
    for depth in range(1, len(parts)):
        where = ".".join(parts[:depth])
        node = OmegaConf.select(tree, where, default=_ABSENT)
        if node is _ABSENT:
            return
        if isinstance(node, ListConfig):
            if not parts[depth].isdigit() or int(parts[depth]) >= len(node):
                raise ConfigError(f"{where}.{parts[depth]}: index must be in 0..{len(node) - 1}")
        elif not isinstance(node, DictConfig):
            raise ConfigError(f"{where} is a value, not a section")


def _read_yaml(text: str | Path, what: str) -> Any:
    try:
        return _YAML.load(text)
    except YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if isinstance(text, Path) and mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read ``path`` (YAML; defaults when ``None``), apply ``key=value`` overrides (values read as YAML), then the
    ``ladder`` preset (Table 3's row sets the routing, surgery and reweighting flags)."""
    schema = OmegaConf.structured(TrainConfig)
    tree = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = _read_yaml(path, f"config file {str(path)!r}")
        if not isinstance(loaded, dict | None):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
        tree = _typed(schema, loaded or {}, "")
    for item in overrides or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        plain = OmegaConf.create(OmegaConf.to_container(tree))
        _check_path(plain, key)
        # A section (a dataclass) takes the keys given; a plain mapping (reward outputs, options) is replaced whole.
        node = OmegaConf.select(tree, key, default=None)
        merge = not (isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict)
        value = _read_yaml(text, f"override {item!r}")
        for kind, python, example in ((DictConfig, dict, "{name: value}"), (ListConfig, list, "[a, b]")):
            if isinstance(node, kind) and value is not None and not isinstance(value, python):
                got = type(value).__name__
                raise ConfigError(f"{key} takes a {python.__name__} like {key}={example}, got {got} {text.strip()!r}")
        try:
            OmegaConf.update(plain, key, value, merge=merge)
        except (OmegaConfBaseException, TypeError, ValueError) as error:
            raise ConfigError(f"{key}: {_first_line(error)}") from None
        tree = _typed(schema, plain, key)
    if tree.ladder in LADDER:
        for key, value in ladder_preset(tree.ladder).items():
            OmegaConf.update(tree, key, value)
    return OmegaConf.to_object(tree)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config`` as YAML that ``load_config`` reads back to an equal configuration."""
    _YAML.dump(config.to_dict(), Path(path))
