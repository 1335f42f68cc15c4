"""OmniNFT's Algorithm 1: the run (build, evaluate, iterate, checkpoint, report) around the stages of
``train/stages.py``.

One iteration: ``rollout`` of the old policy with Eq 10 capture -> ``score`` -> ``advantages`` (Eq 6-7) ->
``token_weights`` (Eq 11) -> value checks -> ``nft_update`` (Eq 3-5, 12) -> ``update_old_policy``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from omninft_fast.train import stages
from omninft_fast.train.builders import (
    build_policies,
    build_rewards,
    build_task,
    load_prompts,
    make_optimizer,
)
from omninft_fast.train.checkpoint import load_checkpoint, save_checkpoint
from omninft_fast.train.config import TrainConfig, save_config
from omninft_fast.train.metrics import MetricsLogger, progress_bar
from omninft_fast.train.report import EvalResult, evaluate, format_table, write_reward_curves, write_samples
from omninft_fast.train.validation import TrainingDiverged, check_loss_inputs, check_rewards

CHECKPOINT = "checkpoint.safetensors"
RUN_FILES = ("config.yaml", "metrics.jsonl", CHECKPOINT)


class Trainer:
    """Algorithm 1 on an ``AVVelocityModel`` with reward plugins, configured by a ``TrainConfig``.

    Args:
        config: the run configuration.
        resume: continue from ``output_dir/checkpoint.safetensors``; without it ``output_dir`` must not hold a run.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False) -> None:
        self.config = config
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.device = torch.device(config.device)
        self.out = Path(config.output_dir)
        held = [name for name in RUN_FILES if (self.out / name).exists()]
        if held and not resume:
            raise FileExistsError(
                f"output_dir {str(self.out)!r} already holds a run ({', '.join(held)}); continue it with --resume "
                "or choose another output_dir"
            )
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
        self.rewards = build_rewards(config)
        self.policies = build_policies(config, self.task, self.device)
        self.policy = self.policies.policy
        self.optimizer = make_optimizer(self.policies.trainable, config, self.device)
        self.start_iteration = 0
        if resume:
            meta = load_checkpoint(
                self.out / CHECKPOINT,
                modules=self.policies.checkpointed(),
                optimizer=self.optimizer,
                generator=self.generator,
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

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def iteration(self, iteration: int) -> dict[str, float]:
        """One pass of Algorithm 1's loop body; returns the iteration's metrics.

        Raises:
            TrainingDiverged: a reward, ``r``, region weight, loss or gradient norm is invalid (the message names
                the iteration and the value).
        """
        try:
            return self._iteration(iteration)
        except TrainingDiverged as error:
            raise TrainingDiverged(f"iteration {iteration}: {error}") from error.__cause__

    def _iteration(self, iteration: int) -> dict[str, float]:
        cfg, p = self.config, self.policies
        timer: dict[str, float] = {}
        start = time.perf_counter()
        picks = torch.randperm(len(self.prompts), generator=self.generator)[: cfg.prompts_per_iter]
        texts = [self.prompts[int(i)] for i in picks for _ in range(cfg.group_size)]

        self.policy.eval()
        with progress_bar(cfg.sampling.num_steps, f"sampling {len(texts)}", enabled=cfg.progress) as bar:
            samples = stages.rollout(
                p.old,
                self.task,
                texts,
                self.generator,
                sampling=cfg.sampling,
                device=self.device,
                autocast_dtype=self.autocast_dtype,
                handle=p.old_handle,
                last_steps=cfg.reweight.last_steps,
                on_step=lambda _: bar.update(),
            )
        timer["sampling"] = time.perf_counter() - start

        mark = time.perf_counter()
        scores = stages.score(self.task, self.rewards, samples)
        check_rewards(scores.values)
        adv = stages.advantages(scores, cfg.prompts_per_iter, cfg.advantage, self.device)
        token_weight = stages.token_weights(samples.region_scores, cfg.reweight.lam, self.device)
        check_loss_inputs(adv.r_video, adv.r_audio, token_weight)
        timer["rewards"] = time.perf_counter() - mark

        mark = time.perf_counter()
        self.policy.train()
        batch = stages.UpdateBatch(
            stages.condition(self.task, texts, self.device),
            samples.video,
            samples.audio,
            adv.r_video,
            adv.r_audio,
            token_weight,
        )
        steps = math.ceil(len(texts) * cfg.nft.timesteps_per_sample / cfg.nft.mini_batch)
        with progress_bar(steps, f"iter {iteration} train", enabled=cfg.progress) as bar:
            update = stages.nft_update(
                p,
                self.optimizer,
                batch,
                self.generator,
                self.task.spec,
                nft=cfg.nft,
                sampling=cfg.sampling,
                grad_clip=cfg.optim.grad_clip,
                device=self.device,
                autocast=self._autocast,
                on_step=bar.update,
            )
        timer["training"] = time.perf_counter() - mark

        mark = time.perf_counter()
        eta = stages.old_policy_eta(iteration, cfg.nft)
        stages.update_old_policy(p, eta)
        timer["old_policy_update"] = time.perf_counter() - mark
        total = time.perf_counter() - start

        metrics: dict[str, float] = {}
        for name, value in scores.values.items():
            metrics[f"reward/{name}/mean"] = float(value.mean())
            metrics[f"reward/{name}/std"] = float(value.std(correction=0))
        metrics["advantage/conflict_rate"] = float(((adv.video * adv.audio) < 0).float().mean())
        metrics["advantage/r_video_mean"] = float(adv.r_video.mean())
        metrics["advantage/r_audio_mean"] = float(adv.r_audio.mean())
        metrics.update(update)
        metrics["eta"] = eta
        for phase, seconds in timer.items():
            metrics[f"time/{phase}"] = seconds
        metrics["time/iteration"] = total
        metrics["samples_per_second"] = len(texts) / total
        return metrics

    def evaluate(self) -> tuple[EvalResult, stages.Rollout]:
        """The policy on the fixed evaluation set (``report.evaluate``)."""
        return evaluate(
            self.policy, self.task, self.rewards, self.prompts, self.config, self.device, self.autocast_dtype
        )

    def save(self, iteration: int) -> None:
        """Checkpoint after ``iteration``: models, optimiser, generator and config."""
        save_checkpoint(
            self.out / CHECKPOINT,
            modules=self.policies.checkpointed(),
            optimizer=self.optimizer,
            generator=self.generator,
            metadata={"iteration": iteration, "config": self.config.to_dict()},
        )

    def _write_samples(self, tag: str, samples: stages.Rollout) -> None:
        spec = self.task.spec
        write_samples(
            self.out / "samples" / tag,
            self.task.decode,
            samples,
            samples_per_prompt=self.config.eval.samples_per_prompt,
            count=self.config.eval.write_samples,
            fps=spec.fps,
            sample_rate=spec.sample_rate,
        )

    def run(self) -> tuple[EvalResult, EvalResult]:
        """Evaluate, train ``iterations`` (from the checkpoint when resuming), evaluate; write the artifacts."""
        cfg = self.config
        before_path = self.out / "eval_before.json"
        if self.start_iteration == 0 or not before_path.exists():
            before, samples = self.evaluate()
            before_path.write_text(json.dumps(before.__dict__))
            self._write_samples("before", samples)
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
        after, samples = self.evaluate()
        (self.out / "eval_after.json").write_text(json.dumps(after.__dict__))
        self._write_samples("after", samples)
        write_reward_curves(self.out / "reward_curve.png", self.logger.history())
        self.logger.close()
        (self.out / "eval_table.md").write_text(format_table(before, after) + "\n")
        return before, after
