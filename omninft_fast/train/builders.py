"""What a run is made of, built from a ``TrainConfig``: task, prompts, rewards, policies and optimiser.

Relative paths in a config (``model.checkpoint``, ``prompt_file``, ...) are read from the working directory, else
from the files shipped inside the package (the tiny base policy ``checkpoints/tiny_t2av_base.safetensors``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import omninft_fast
from omninft_fast._checks import check_device
from omninft_fast.ltx2.attention_backends import set_attention_backend
from omninft_fast.rewards import RewardModel, build_reward
from omninft_fast.task.synthetic import SyntheticAVTask, all_prompts
from omninft_fast.train.checkpoint import Stateful, load_weights
from omninft_fast.train.config import TrainConfig
from omninft_fast.train.lora import OLD, AdapterView, LoraAdapters
from omninft_fast.train.ltx_pipeline import GemmaPromptEncoder, LTX2Pipeline, text_cache_prompts
from omninft_fast.train.model import AVTask, AVVelocityModel, LTXAVModel

PACKAGE_DIR = Path(omninft_fast.__file__).resolve().parent
STREAMS = ("video", "audio", "cross_modal")


def resolve_path(path: str) -> Path:
    """``path`` as given when it is absolute or exists, else the file of that name shipped in the package (when
    there is one)."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    shipped = PACKAGE_DIR / given
    return shipped if shipped.exists() else given


def build_task(config: TrainConfig) -> AVTask:
    """The task of ``model.kind``: the synthetic task (``ltx_tiny``) or the released LTX-2's pipeline (``ltx``)."""
    if config.model.kind == "ltx":
        return build_ltx_pipeline(config)
    spec = config.task
    dims = (
        config.model.video_heads * config.model.video_head_dim,
        config.model.audio_heads * config.model.audio_head_dim,
    )
    if (spec.text_dim_video, spec.text_dim_audio) != dims:
        raise ValueError(
            f"task.text_dim_video/text_dim_audio {spec.text_dim_video, spec.text_dim_audio} must equal the model's "
            f"video/audio widths {dims} (heads * head_dim)"
        )
    return SyntheticAVTask(spec)


def build_prompt_encoder(config: TrainConfig) -> GemmaPromptEncoder:
    """Gemma from ``ltx.gemma_root`` with the text connectors of ``model.checkpoint``."""
    x = config.ltx
    device = x.text_encoder_device or config.device
    check_device(device, "ltx.text_encoder_device")
    return GemmaPromptEncoder.from_files(
        resolve_path(config.model.checkpoint or ""),
        resolve_path(x.gemma_root or ""),
        device=device,
        dtype=getattr(torch, x.dtype),
    )


def build_ltx_pipeline(config: TrainConfig) -> AVTask:
    """``LTX2Pipeline`` from ``model.checkpoint`` and the ``ltx`` section (text cache and/or Gemma, decoders)."""
    x = config.ltx
    return LTX2Pipeline(
        resolve_path(config.model.checkpoint or ""),
        frames=x.frames,
        height=x.height,
        width=x.width,
        fps=x.fps,
        text_cache=None if x.text_cache is None else resolve_path(x.text_cache),
        prompt_encoder=None if x.gemma_root is None else build_prompt_encoder(config),
        decoder_device=check_device(x.decoder_device or config.device, "ltx.decoder_device"),
        decoder_dtype=getattr(torch, x.decoder_dtype),
        decode_batch=x.decode_batch,
        decode_tiling=x.decode_tiling,
        decode_seed=x.decode_seed,
    )


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: ``av`` conditions the model, ``video`` and ``audio`` are what video and audio rewards judge."""

    av: str
    video: str
    audio: str
    id: str | None = None


def read_prompt_file(path: Path) -> list[PromptRecord]:
    """Prompts of ``path``: JSON lines (``prompt_av``, optional ``prompt_v``/``prompt_a`` defaulting to it, optional
    ``id`` or ``sample_id``) when the first non-empty line starts with ``{``, else one plain prompt a line."""
    lines = [(number, line.strip()) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"prompt_file {str(path)!r} holds no prompt")
    if not lines[0][1].startswith("{"):
        return [PromptRecord(text, text, text) for _, text in lines]
    records = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"prompt_file {str(path)!r} line {number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt_av"), str) or not row["prompt_av"].strip():
            raise ValueError(f"prompt_file {str(path)!r} line {number}: needs a non-empty string prompt_av")
        judged = {key: row.get(key, row["prompt_av"]) for key in ("prompt_v", "prompt_a")}
        for key, value in judged.items():
            if not isinstance(value, str):
                raise ValueError(f"prompt_file {str(path)!r} line {number}: {key} must be a string")
        ident = row.get("id", row.get("sample_id"))
        records.append(
            PromptRecord(
                row["prompt_av"], judged["prompt_v"], judged["prompt_a"], None if ident is None else str(ident)
            )
        )
    return records


def load_prompt_records(config: TrainConfig) -> list[PromptRecord]:
    """``prompts``, else ``prompt_file`` (``read_prompt_file``), else the synthetic task's prompts or
    ``ltx.text_cache``'s (but the empty prompt); plain prompts are judged as they are."""
    if config.prompt_file is not None:
        path = resolve_path(config.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt_file {str(path)!r} does not exist")
        return read_prompt_file(path)
    if config.prompts is not None:
        texts = list(config.prompts)
    elif config.model.kind == "ltx":
        texts = [text for text in text_cache_prompts(resolve_path(config.ltx.text_cache or "")) if text]
    else:
        texts = all_prompts()
    return [PromptRecord(text, text, text) for text in texts]


def load_prompts(config: TrainConfig) -> list[str]:
    """What the model is conditioned on: the ``prompt_av`` of ``load_prompt_records``, and the empty prompt when
    classifier-free guidance is on (``sampling.video_cfg`` or ``audio_cfg`` not 1; the text cache must hold it)."""
    prompts = [record.av for record in load_prompt_records(config)]
    guided = config.sampling.video_cfg != 1.0 or config.sampling.audio_cfg != 1.0
    return [*prompts, ""] if guided else prompts


def build_rewards(config: TrainConfig) -> list[RewardModel]:
    """One plugin per ``rewards`` entry, from the reward registry."""
    return [
        build_reward(
            r.name,
            device=str(check_device(r.device, f"rewards.{i}.device")),
            dtype=r.dtype,
            micro_batch=r.micro_batch,
            weight=r.weight,
            checkpoint_dir=r.checkpoint_dir,
            **r.options,
        )
        for i, r in enumerate(config.rewards)
    ]


def build_policy(config: TrainConfig, task: AVTask, *, load: bool = True) -> LTXAVModel:
    """The policy of ``model.kind``: the tiny ltx-core LTX-2 of the synthetic task (loaded from ``model.checkpoint``
    when ``load``), or the released transformer of ``task``'s checkpoint (on ``device``, in ``ltx.dtype``)."""
    m = config.model
    if m.kind == "ltx":
        if not load:
            raise ValueError("model.kind=ltx always loads the released weights (load=False is for ltx_tiny)")
        model = task.policy(device=config.device, dtype=getattr(torch, config.ltx.dtype))
    else:
        s = task.spec
        model = LTXAVModel.build(
            frames=s.frames,
            height=s.height,
            width=s.width,
            video_channels=s.video_channels,
            audio_tokens=s.audio_tokens,
            audio_channels=s.audio_channels,
            fps=s.fps,
            audio_token_seconds=s.audio_token_seconds,
            num_layers=m.num_layers,
            video_heads=m.video_heads,
            video_head_dim=m.video_head_dim,
            audio_heads=m.audio_heads,
            audio_head_dim=m.audio_head_dim,
            seed=m.init_seed,
        )
        if load and m.checkpoint:
            load_weights(resolve_path(m.checkpoint), model.model)
    model.model.set_gradient_checkpointing(m.gradient_checkpointing)
    return model


def stream_of(name: str) -> str:
    """``cross_modal`` for A2V/V2A attention and their AdaLN, ``audio`` for the audio stream, else ``video``."""
    parts = name.split(".")
    if any(p in ("audio_to_video_attn", "video_to_audio_attn") or "av_ca_" in p or "a2v_ca_" in p for p in parts):
        return "cross_modal"
    return "audio" if any(p.startswith("audio_") for p in parts) else "video"


@dataclass
class Policies:
    """The models Algorithm 1 runs and what the optimiser and checkpoints see.

    Attributes:
        policy: ``theta``, trained; carries the Eq 8 surgery when ``surgery.enabled``.
        old: ``theta_old``, samples the rollouts (an EMA copy, or the policy through its ``old`` LoRA adapter).
        ref: the KL reference (``nft.kl_weight > 0``), else ``None``.
        adapters: the two LoRA adapters (``finetune.mode=lora``), else ``None``.
        policy_handle: the policy's ``ltx2.patch`` handle with surgery on the projected keys/values.
        old_handle: the handle that captures Eq 10 scores while ``old`` samples (``reweight.enabled``).
        trainable: what the optimiser updates.
        parameters: every parameter of the policy (gradient clipping takes those with a gradient).
        streams: the same by stream (``STREAMS``), for per-stream gradient norms.
        attention: the backend of the self- and text-attention (``model.attention`` resolved).
        fp8: the trained policy's ``fp8.patch`` handle (``fp8.enabled`` without ``rollout_only``), else ``None``.
    """

    policy: LTXAVModel
    old: AVVelocityModel
    ref: AVVelocityModel | None
    adapters: LoraAdapters | None
    policy_handle: Any
    old_handle: Any
    trainable: list[torch.nn.Parameter]
    parameters: list[torch.nn.Parameter]
    streams: dict[str, list[torch.nn.Parameter]]
    attention: str = "pytorch"
    fp8: Any = None

    def checkpointed(self) -> dict[str, Stateful]:
        """What a checkpoint holds: with LoRA both adapters only (the frozen base is rebuilt from
        ``model.checkpoint``), else the policy, the old policy and the KL reference."""
        if self.adapters is not None:
            return {"lora": self.adapters}
        modules: dict[str, Stateful] = {"policy": self.policy, "old": self.old}
        if self.ref is not None:
            modules["ref"] = self.ref
        return modules


def build_policies(config: TrainConfig, task: AVTask, device: torch.device) -> Policies:
    """Policy, old policy, KL reference and the ``ltx2.patch`` handles for Eq 8 (``detach_schedule``, Eq 9) and
    Eq 10 (``reweight.boundary`` onwards)."""
    policy = build_policy(config, task).to(device)
    attention = set_attention_backend(policy.model, config.model.attention, device)
    layers = policy.num_layers
    s, rw = config.surgery, config.reweight
    alphas = None
    if s.enabled:
        alphas = omninft_fast.detach_schedule(layers, boundary=s.boundary, alpha=s.alpha, spec=s.spec)
        if s.where == "input":
            policy.detach_a2v_input(alphas)
            alphas = None
    beyond = [block for block in config.sampling.stg_blocks if block >= layers]
    if beyond:
        raise ValueError(f"sampling.stg_blocks {beyond} are past the model's {layers} blocks (0..{layers - 1})")
    region_layers = list(range(rw.boundary, layers))
    if rw.enabled and not region_layers:
        raise ValueError(f"reweight.boundary ({rw.boundary}) leaves no layer of {layers} for Eq 10")
    adapters = None
    if config.finetune.mode == "lora":
        f = config.finetune
        adapters = LoraAdapters(
            policy.model, rank=f.lora_rank, alpha=f.lora_alpha, targets=f.lora_targets, init=f.lora_init
        )
        old: AVVelocityModel = AdapterView(policy, adapters, OLD)
        ref = AdapterView(policy, adapters, None) if config.nft.kl_weight > 0 else None
        projected = alphas is not None
        handle = policy.patch(detach=alphas, region_layers=region_layers) if projected or rw.enabled else None
        policy_handle = handle if projected else None
        old_handle = handle if rw.enabled else None
        trainable = adapters.trainable_parameters()
    else:
        old = copy.deepcopy(policy).requires_grad_(False).eval()
        ref = copy.deepcopy(old) if config.nft.kl_weight > 0 else None
        policy_handle = policy.patch(detach=alphas) if alphas is not None else None
        old_handle = old.patch(region_layers=region_layers) if rw.enabled else None
        trainable = [p for p in policy.parameters() if p.requires_grad]
    fp8_handle = None
    if config.fp8.enabled:
        f = config.fp8
        options = {"backend": f.backend, "recipe": f.recipe, "modules": f.modules, "cache_weights": f.cache_weights}
        # With LoRA the old policy and the reference are adapter views of the policy's one model.
        separate = [] if adapters is not None else [m for m in (old, ref) if m is not None]
        for model in separate:
            model.patch_fp8(**options)
        if not f.rollout_only:
            fp8_handle = policy.patch_fp8(**options)
    if config.model.compile != "none":
        compiled = [old] if config.model.compile == "rollout" else [policy, *(m for m in (old, ref) if m is not None)]
        for model in {id(m.model): m.model for m in compiled if isinstance(m, LTXAVModel)}.values():
            model.compile(backend=config.model.compile_backend)
    named = list(policy.named_parameters())
    streams = {stream: [p for n, p in named if stream_of(n) == stream] for stream in STREAMS}
    parameters = [p for _, p in named]
    return Policies(
        policy, old, ref, adapters, policy_handle, old_handle, trainable, parameters, streams, attention, fp8_handle
    )


def make_optimizer(
    params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW: torch's fused kernel (``impl`` auto/fused: it skips a step with a non-finite gradient norm on the
    device, no host read), its foreach or single-tensor loop, or NVIDIA apex's FusedAdam (``impl=apex``, where
    installed; the norm is then checked on the host every step)."""
    o = config.optim
    kwargs: dict[str, Any] = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay}
    if o.impl == "apex":
        if device.type != "cuda":
            raise ValueError("optim.impl=apex needs a CUDA device")
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise ValueError("optim.impl=apex needs NVIDIA apex built from NVIDIA's sources (not installed)") from None
        return FusedAdam(params, adam_w_mode=True, **kwargs)
    if o.impl == "plain":
        return torch.optim.AdamW(params, foreach=False, **kwargs)
    if o.impl == "foreach":
        return torch.optim.AdamW(params, foreach=True, **kwargs)
    return torch.optim.AdamW(params, fused=True, **kwargs)
