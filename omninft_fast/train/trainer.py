"""OmniNFT's Algorithm 1: sample groups with the old policy, score, route advantages, train with NFT, blend.

Every equation comes from the public ops: ``group_advantages`` / ``route_advantages`` /
``optimality_probability`` (Eq 6-7), ``region_weights`` (Eq 11) on the handle's Eq 10 scores, ``detach_schedule``
(Eq 9) for the handle's Eq 8 surgery, and ``nft_loss`` / ``adaptive_x0_weight`` (Eq 3-5, 12).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import omninft_fast
from omninft_fast.rewards import RewardBatch, RewardModel, build_reward
from omninft_fast.task.synthetic import SyntheticAVTask, all_prompts
from omninft_fast.train.checkpoint import Stateful, load_checkpoint, load_weights, save_checkpoint
from omninft_fast.train.config import TrainConfig, save_config
from omninft_fast.train.lora import OLD, AdapterView, LoraAdapters
from omninft_fast.train.metrics import MetricsLogger, plot_curves, write_gif, write_wav
from omninft_fast.train.model import AVTask, AVVelocityModel, Condition, LTXAVModel
from omninft_fast.train.sampler import euler_sample, time_grid

CHECKPOINT = "checkpoint.safetensors"


class TrainingDiverged(RuntimeError):
    """A loss, reward or gradient norm became NaN or infinite."""


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


def build_ltx_pipeline(config: TrainConfig) -> AVTask:
    """``LTX2Pipeline`` from ``model.checkpoint`` and the ``ltx`` section (text cache and/or Gemma, decoders)."""
    from omninft_fast.train.ltx_pipeline import GemmaPromptEncoder, LTX2Pipeline

    x = config.ltx
    checkpoint = resolve_path(config.model.checkpoint or "")
    encoder = None
    if x.gemma_root is not None:
        encoder = GemmaPromptEncoder.from_files(
            checkpoint,
            resolve_path(x.gemma_root),
            device=x.text_encoder_device or config.device,
            dtype=getattr(torch, x.dtype),
        )
    return LTX2Pipeline(
        checkpoint,
        frames=x.frames,
        height=x.height,
        width=x.width,
        fps=x.fps,
        text_cache=None if x.text_cache is None else resolve_path(x.text_cache),
        prompt_encoder=encoder,
        decoder_device=x.decoder_device or config.device,
        decoder_dtype=getattr(torch, x.decoder_dtype),
        decode_batch=x.decode_batch,
        decode_tiling=x.decode_tiling,
        decode_seed=x.decode_seed,
    )


def load_prompts(config: TrainConfig) -> list[str]:
    """``prompts``, else the lines of ``prompt_file``, else the synthetic task's prompts or ``ltx.text_cache``'s."""
    if config.prompts is not None:
        return list(config.prompts)
    if config.prompt_file is not None:
        path = resolve_path(config.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt_file {str(path)!r} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt_file {str(path)!r} holds no prompt")
        return prompts
    if config.model.kind == "ltx":
        from omninft_fast.train.ltx_pipeline import text_cache_prompts

        return text_cache_prompts(resolve_path(config.ltx.text_cache or ""))
    return all_prompts()


def resolve_path(path: str) -> Path:
    """``path`` as given when it exists, else relative to the repository root (where the committed files live)."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    in_repo = Path(omninft_fast.__file__).resolve().parents[1] / given
    return in_repo if in_repo.exists() else given


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


def make_optimizer(
    params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW: NVIDIA apex's FusedAdam when installed (``impl`` auto/apex), else torch's fused or foreach kernel."""
    o = config.optim
    kwargs: dict[str, Any] = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay}
    if o.impl in ("auto", "apex") and device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            if o.impl == "apex":
                raise
        else:
            return FusedAdam(params, adam_w_mode=True, **kwargs)
    if o.impl == "apex" and device.type != "cuda":
        raise ValueError("optim.impl=apex needs a CUDA device")
    if o.impl == "plain":
        return torch.optim.AdamW(params, foreach=False, **kwargs)
    if o.impl == "foreach":
        return torch.optim.AdamW(params, foreach=True, **kwargs)
    return torch.optim.AdamW(params, fused=True, **kwargs)


def _check_finite(iteration: int, source: str, value: torch.Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise TrainingDiverged(f"iteration {iteration}: {source} is not finite ({value.flatten()[:4].tolist()})")


def _stream_of(name: str) -> str:
    """``cross_modal`` for A2V/V2A attention and their AdaLN, ``audio`` for the audio stream, else ``video``."""
    parts = name.split(".")
    if any(p in ("audio_to_video_attn", "video_to_audio_attn") or "av_ca_" in p or "a2v_ca_" in p for p in parts):
        return "cross_modal"
    return "audio" if any(p.startswith("audio_") for p in parts) else "video"


def _grad_norm(params: list[torch.nn.Parameter]) -> float:
    """L2 norm of the gradients of ``params`` (0 for none)."""
    if not params:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


@dataclass
class EvalResult:
    """Per-reward mean and standard error on the fixed evaluation set."""

    mean: dict[str, float]
    stderr: dict[str, float]
    count: int


def format_table(before: EvalResult, after: EvalResult, modalities: dict[str, str]) -> str:
    """Markdown table of each reward before/after with standard errors and the rise in combined standard errors."""
    rows = [
        "| reward | modality | before (mean ± SE) | after (mean ± SE) | change | change / SE |",
        "|---|---|---|---|---|---|",
    ]
    for name in before.mean:
        delta = after.mean[name] - before.mean[name]
        se = math.sqrt(before.stderr[name] ** 2 + after.stderr[name] ** 2)
        z = delta / se if se > 0 else float("inf") * (1 if delta > 0 else -1)
        rows.append(
            f"| {name} | {modalities[name]} | {before.mean[name]:.4f} ± {before.stderr[name]:.4f} | "
            f"{after.mean[name]:.4f} ± {after.stderr[name]:.4f} | {delta:+.4f} | {z:+.2f} |"
        )
    return "\n".join(rows)


class Trainer:
    """Algorithm 1 on an ``AVVelocityModel`` with reward plugins, configured by a ``TrainConfig``.

    Args:
        config: the run configuration.
        resume: continue from ``output_dir/checkpoint.safetensors``.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False) -> None:
        self.config = config
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.device = torch.device(config.device)
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.autocast_dtype = (
            torch.bfloat16
            if config.autocast == "bf16" or (config.autocast == "auto" and self.device.type == "cuda")
            else None
        )
        self.task = build_task(config)
        self.prompts = load_prompts(config)
        if config.prompts_per_iter > len(self.prompts):
            raise ValueError(f"prompts_per_iter must be <= {len(self.prompts)} (distinct prompts of the task)")
        self.rewards: list[RewardModel] = [
            build_reward(
                r.name,
                device=r.device,
                dtype=r.dtype,
                micro_batch=r.micro_batch,
                weight=r.weight,
                checkpoint_dir=r.checkpoint_dir,
                **r.options,
            )
            for r in config.rewards
        ]
        self.policy = build_policy(config, self.task).to(self.device)
        layers = self.policy.num_layers
        s, rw = config.surgery, config.reweight
        self.alphas = (
            omninft_fast.detach_schedule(layers, boundary=s.boundary, alpha=s.alpha, spec=s.spec) if s.enabled else None
        )
        self.region_layers = list(range(rw.boundary, layers))
        if rw.enabled and not self.region_layers:
            raise ValueError(f"reweight.boundary ({rw.boundary}) leaves no layer of {layers} for Eq 10")
        self.adapters: LoraAdapters | None = None
        if config.finetune.mode == "lora":
            f = config.finetune
            self.adapters = LoraAdapters(
                self.policy.model, rank=f.lora_rank, alpha=f.lora_alpha, targets=f.lora_targets
            )
            self.old: AVVelocityModel = AdapterView(self.policy, self.adapters, OLD)
            self.ref = AdapterView(self.policy, self.adapters, None) if config.nft.kl_weight > 0 else None
            handle = (
                self.policy.patch(detach=self.alphas, region_layers=self.region_layers)
                if s.enabled or rw.enabled
                else None
            )
            self.policy_handle = handle if s.enabled else None
            self.old_handle = handle if rw.enabled else None
            params = self.adapters.trainable_parameters()
        else:
            self.old = copy.deepcopy(self.policy).requires_grad_(False).eval()
            self.ref = copy.deepcopy(self.old) if config.nft.kl_weight > 0 else None
            self.policy_handle = self.policy.patch(detach=self.alphas) if s.enabled else None
            self.old_handle = self.old.patch(region_layers=self.region_layers) if rw.enabled else None
            params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, config, self.device)
        self.start_iteration = 0
        if resume:
            meta = load_checkpoint(
                self.out / CHECKPOINT, modules=self._modules(), optimizer=self.optimizer, generator=self.generator
            )
            self.start_iteration = meta["iteration"] + 1
        else:
            save_config(config, self.out / "config.yaml")
        self.logger = MetricsLogger(
            self.out,
            tensorboard=config.tensorboard,
            wandb=config.wandb,
            config=config.to_dict(),
            resume_iteration=self.start_iteration - 1 if resume else None,
        )

    def _modules(self) -> dict[str, Stateful]:
        """What a checkpoint holds: with LoRA both adapters only (the frozen base is rebuilt from
        ``model.checkpoint``), else the policy, the old policy and the KL reference."""
        if self.adapters is not None:
            return {"lora": self.adapters}
        modules: dict[str, Stateful] = {"policy": self.policy, "old": self.old}
        if self.ref is not None:
            modules["ref"] = self.ref
        return modules

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, leave=False, disable=not self.config.progress, dynamic_ncols=True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    # ----- Algorithm 1 stages -----
    def _condition(self, texts: list[str]) -> Condition:
        return Condition(*self.task.encode(texts)).to(self.device)

    def _noise(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.task.spec
        video = torch.randn((batch, s.video_tokens, s.video_channels), generator=generator)
        audio = torch.randn((batch, s.audio_tokens, s.audio_channels), generator=generator)
        return video.to(self.device), audio.to(self.device)

    def sample(
        self, model: AVVelocityModel, texts: list[str], generator: torch.Generator, handle: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Euler-sample ``texts`` with ``model``; with a capture ``handle`` also return the ``(B, Nv)`` Eq 10 scores."""
        cond = self._condition(texts)
        noise_video, noise_audio = self._noise(len(texts), generator)
        steps = self.config.sampling.num_steps
        bar = self._bar(steps, f"sampling {len(texts)}")
        kwargs = {
            "num_steps": steps,
            "shift": self.config.sampling.shift,
            "autocast_dtype": self.autocast_dtype,
            "on_step": lambda _: bar.update(),
        }
        with contextlib.ExitStack() as stack:
            stack.callback(bar.close)
            if handle is None:
                video, audio = euler_sample(model, cond, noise_video, noise_audio, **kwargs)
                return video, audio, None
            capture = stack.enter_context(
                handle.capture_region_scores(num_steps=steps, last_steps=self.config.reweight.last_steps)
            )
            video, audio = euler_sample(model, cond, noise_video, noise_audio, capture=capture, **kwargs)
            return video, audio, capture.scores().float()

    def score(self, video: torch.Tensor, audio: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
        """Decode and score with every reward plugin: named ``(B,)`` float32 scores."""
        frames, waveform = self.task.decode(video, audio)
        batch = RewardBatch(frames, self.task.spec.fps, waveform, self.task.spec.sample_rate, texts)
        scores: dict[str, torch.Tensor] = {}
        self.reward_of: dict[str, RewardModel] = {}
        for reward in self.rewards:
            for key, value in reward(batch).items():
                if key in scores:
                    raise ValueError(f"two rewards return a score named {key!r}")
                scores[key] = value
                self.reward_of[key] = reward
        return scores

    def advantages(self, scores: dict[str, torch.Tensor], iteration: int) -> dict[str, torch.Tensor]:
        """Eq 6-7: one group advantage per reward, summed per modality (weighted), routed, turned into ``r``."""
        cfg, groups = self.config.advantage, self.config.prompts_per_iter
        per_modality = {m: torch.zeros(groups, self.config.group_size) for m in ("video", "audio", "av")}
        for name, value in scores.items():
            _check_finite(iteration, f"reward {name!r}", value)
            reward = self.reward_of[name]
            adv = omninft_fast.group_advantages(value.view(groups, -1), std=cfg.std, eps=cfg.eps)
            per_modality[reward.modality] = per_modality[reward.modality] + reward.weight * adv
        adv_v, adv_a, adv_av = per_modality["video"], per_modality["audio"], per_modality["av"]
        routed_v, routed_a = omninft_fast.route_advantages(adv_v, adv_a, adv_av, mode=cfg.routing)
        return {
            "adv_video": adv_v.flatten(),
            "adv_audio": adv_a.flatten(),
            "r_video": omninft_fast.optimality_probability(routed_v, clip=cfg.clip).flatten().to(self.device),
            "r_audio": omninft_fast.optimality_probability(routed_a, clip=cfg.clip).flatten().to(self.device),
        }

    def training_times(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B * K,)`` sample indices and flow times: ``K`` distinct sampler-grid times per sample (shuffled) or
        ``K`` uniform times in the grid's range, in a random order."""
        k = self.config.nft.timesteps_per_sample
        steps = self.config.sampling.num_steps
        grid = time_grid(steps, shift=self.config.sampling.shift)[:-1]
        if self.config.nft.timesteps == "grid_shuffled":
            picks = torch.stack([torch.randperm(steps, generator=self.generator)[:k] for _ in range(batch)])
            times = grid[picks]
        else:
            lo = float(grid[-1])
            times = lo + (1.0 - lo) * torch.rand((batch, k), generator=self.generator)
        index = torch.arange(batch)[:, None].expand(batch, k).flatten()
        order = torch.randperm(batch * k, generator=self.generator)
        return index[order], times.flatten()[order]

    def train_step(
        self,
        iteration: int,
        cond: Condition,
        x0: tuple[torch.Tensor, torch.Tensor],
        r: tuple[torch.Tensor, torch.Tensor],
        token_weight: torch.Tensor | None,
        index: torch.Tensor,
        t: torch.Tensor,
    ) -> dict[str, float]:
        """One mini-batch of Eq 12: region-weighted video NFT loss + audio NFT loss, one optimiser step."""
        nft = self.config.nft
        index_dev, t = index.to(self.device), t.to(self.device)
        x0_video, x0_audio = x0[0][index_dev], x0[1][index_dev]
        noise_video, noise_audio = self._noise(len(index), self.generator)
        tb = t[:, None, None]
        xt_video = (1 - tb) * x0_video + tb * noise_video
        xt_audio = (1 - tb) * x0_audio + tb * noise_audio
        c = cond[index_dev]
        with torch.no_grad(), self._autocast():
            old_video, old_audio = self.old(xt_video, xt_audio, t, c)
            ref = self.ref(xt_video, xt_audio, t, c) if self.ref is not None else (None, None)
        with self._autocast():
            v_video, v_audio = self.policy(xt_video, xt_audio, t, c)
        losses = {}
        streams = (
            ("video", v_video, old_video, noise_video - x0_video, xt_video, x0_video, r[0], token_weight, ref[0]),
            ("audio", v_audio, old_audio, noise_audio - x0_audio, xt_audio, x0_audio, r[1], None, ref[1]),
        )
        for name, v, v_old, target, xt, x0_m, r_m, weight, v_ref in streams:
            v, v_old = v.float(), v_old.float()
            sample_weight = None
            if nft.adaptive_weight:
                v_pos = (1 - nft.beta) * v_old + nft.beta * v.detach()
                sample_weight = omninft_fast.adaptive_x0_weight(xt, x0_m, v_pos, t)
            losses[name] = omninft_fast.nft_loss(
                v,
                v_old,
                target,
                r_m[index_dev],
                beta=nft.beta,
                token_weight=None if weight is None else weight[index_dev],
                sample_weight=sample_weight,
                inverse_beta_scale=nft.inverse_beta_scale,
                kl_weight=nft.kl_weight,
                v_ref=None if v_ref is None else v_ref.float(),
            )
            _check_finite(iteration, f"{name} loss", losses[name])
        loss = losses["video"] + losses["audio"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with_grad = [(n, p) for n, p in self.policy.named_parameters() if p.grad is not None]
        norms = {
            f"grad_norm/{stream}_params": _grad_norm([p for n, p in with_grad if _stream_of(n) == stream])
            for stream in ("video", "audio", "cross_modal")
        }
        grad_total = torch.nn.utils.clip_grad_norm_([p for _, p in with_grad], self.config.optim.grad_clip)
        _check_finite(iteration, "gradient norm", grad_total)
        self.optimizer.step()
        return {
            "loss/video": losses["video"].item(),
            "loss/audio": losses["audio"].item(),
            "grad_norm/total": float(grad_total),
            **norms,
        }

    @torch.no_grad()
    def blend_old(self, iteration: int) -> float:
        """``theta_old <- eta theta_old + (1 - eta) theta`` with ``eta = min(eta_rate * iteration, eta_max)`` (the
        EMA copy in full fine-tuning, the ``old`` adapter with LoRA)."""
        eta = min(self.config.nft.eta_rate * iteration, self.config.nft.eta_max)
        if self.adapters is not None:
            self.adapters.blend_old(eta)
            return eta
        old = list(self.old.parameters())
        new = [p.detach() for p in self.policy.parameters()]
        torch._foreach_lerp_(old, new, 1.0 - eta)
        return eta

    def iteration(self, iteration: int) -> dict[str, float]:
        """One pass of Algorithm 1's loop body; returns the iteration's metrics."""
        cfg = self.config
        timer: dict[str, float] = {}
        start = time.perf_counter()
        picks = torch.randperm(len(self.prompts), generator=self.generator)[: cfg.prompts_per_iter]
        texts = [self.prompts[int(i)] for i in picks for _ in range(cfg.group_size)]
        batch = len(texts)

        self.policy.eval()
        video, audio, region_scores = self.sample(self.old, texts, self.generator, self.old_handle)
        timer["sampling"] = time.perf_counter() - start

        mark = time.perf_counter()
        scores = self.score(video, audio, texts)
        adv = self.advantages(scores, iteration)
        token_weight = None
        if region_scores is not None:
            _check_finite(iteration, "region scores", region_scores)
            token_weight = omninft_fast.region_weights(region_scores, lam=cfg.reweight.lam).to(self.device)
        timer["rewards"] = time.perf_counter() - mark

        mark = time.perf_counter()
        self.policy.train()
        cond = self._condition(texts)
        index, times = self.training_times(batch)
        step_metrics: list[dict[str, float]] = []
        bar = self._bar(math.ceil(len(index) / cfg.nft.mini_batch), f"iter {iteration} train")
        for lo in range(0, len(index), cfg.nft.mini_batch):
            sl = slice(lo, lo + cfg.nft.mini_batch)
            step_metrics.append(
                self.train_step(
                    iteration,
                    cond,
                    (video, audio),
                    (adv["r_video"], adv["r_audio"]),
                    token_weight,
                    index[sl],
                    times[sl],
                )
            )
            bar.update()
        bar.close()
        timer["training"] = time.perf_counter() - mark

        mark = time.perf_counter()
        eta = self.blend_old(iteration)
        timer["old_policy_update"] = time.perf_counter() - mark
        total = time.perf_counter() - start

        metrics: dict[str, float] = {}
        for name, value in scores.items():
            metrics[f"reward/{name}/mean"] = float(value.mean())
            metrics[f"reward/{name}/std"] = float(value.std(correction=0))
        conflict = (adv["adv_video"] * adv["adv_audio"]) < 0
        metrics["advantage/conflict_rate"] = float(conflict.float().mean())
        metrics["advantage/r_video_mean"] = float(adv["r_video"].mean())
        metrics["advantage/r_audio_mean"] = float(adv["r_audio"].mean())
        for key in step_metrics[0]:
            metrics[key] = sum(m[key] for m in step_metrics) / len(step_metrics)
        metrics["eta"] = eta
        for phase, seconds in timer.items():
            metrics[f"time/{phase}"] = seconds
        metrics["time/iteration"] = total
        metrics["samples_per_second"] = batch / total
        return metrics

    # ----- evaluation and the run -----
    @torch.no_grad()
    def evaluate(self, model: AVVelocityModel) -> tuple[EvalResult, torch.Tensor, torch.Tensor, list[str]]:
        """Each reward's mean and standard error over every task prompt x ``eval.samples_per_prompt`` fixed seeds."""
        texts = [p for p in self.prompts for _ in range(self.config.eval.samples_per_prompt)]
        generator = torch.Generator().manual_seed(self.config.eval.seed)
        model.eval()
        videos, audios, scores = [], [], []
        chunk = self.config.prompts_per_iter * self.config.group_size
        for lo in range(0, len(texts), chunk):
            video, audio, _ = self.sample(model, texts[lo : lo + chunk], generator)
            videos.append(video)
            audios.append(audio)
            scores.append(self.score(video, audio, texts[lo : lo + chunk]))
        merged = {key: torch.cat([s[key] for s in scores]) for key in scores[0]}
        n = len(texts)
        mean = {key: float(v.mean()) for key, v in merged.items()}
        stderr = {key: float(v.std(correction=1)) / math.sqrt(n) for key, v in merged.items()}
        return EvalResult(mean, stderr, n), torch.cat(videos), torch.cat(audios), texts

    def save(self, iteration: int) -> None:
        meta = {"iteration": iteration, "config": self.config.to_dict()}
        save_checkpoint(
            self.out / CHECKPOINT,
            modules=self._modules(),
            optimizer=self.optimizer,
            generator=self.generator,
            metadata=meta,
        )

    def write_samples(self, tag: str, video: torch.Tensor, audio: torch.Tensor, texts: list[str]) -> None:
        """``eval.write_samples`` evaluation prompts spread over the prompt list (first seed each) as GIF + WAV."""
        folder = self.out / "samples" / tag
        folder.mkdir(parents=True, exist_ok=True)
        frames, waveform = self.task.decode(video, audio)
        step, count = self.config.eval.samples_per_prompt, len(texts) // self.config.eval.samples_per_prompt
        index = [(7 * i % count) * step for i in range(min(self.config.eval.write_samples, count))]
        for k in index:
            stem = texts[k].replace(" ", "_")
            write_gif(folder / f"{stem}.gif", frames[k], self.task.spec.fps)
            write_wav(folder / f"{stem}.wav", waveform[k], self.task.spec.sample_rate)

    def run(self) -> tuple[EvalResult, EvalResult]:
        """Evaluate, train ``iterations`` (from the checkpoint when resuming), evaluate; write the artifacts."""
        cfg = self.config
        before_path = self.out / "eval_before.json"
        if self.start_iteration == 0 or not before_path.exists():
            before, video, audio, texts = self.evaluate(self.policy)
            before_path.write_text(json.dumps(before.__dict__))
            self.write_samples("before", video, audio, texts)
        else:
            before = EvalResult(**json.loads(before_path.read_text()))
        bar = tqdm(
            range(self.start_iteration, cfg.iterations), desc="OmniNFT", disable=not cfg.progress, dynamic_ncols=True
        )
        for it in bar:
            metrics = self.iteration(it)
            self.logger.log(it, metrics)
            bar.set_postfix({k.split("/")[1]: f"{v:.3f}" for k, v in metrics.items() if k.endswith("/mean")})
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
                self.save(it)
        after, video, audio, texts = self.evaluate(self.policy)
        (self.out / "eval_after.json").write_text(json.dumps(after.__dict__))
        self.write_samples("after", video, audio, texts)
        history = self.logger.history()
        curves = (
            {k[len("reward/") : -len("/mean")]: [h[k] for h in history] for k in history[0] if k.endswith("/mean")}
            if history
            else {}
        )
        if curves:
            plot_curves(self.out / "reward_curve.png", curves)
        self.logger.close()
        modalities = {name: reward.modality for name, reward in self.reward_of.items()}
        table = format_table(before, after, modalities)
        (self.out / "eval_table.md").write_text(table + "\n")
        return before, after
