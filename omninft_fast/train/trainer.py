"""OmniNFT's Algorithm 1: the run (build, evaluate, iterate, checkpoint, report) around the stages of
``train/stages.py``.

One iteration: ``rollout`` of the old policy with Eq 10 capture -> ``score`` -> ``advantages`` (Eq 6-7) ->
``token_weights`` (Eq 11) -> value checks -> ``nft_update`` (Eq 3-5, 12) -> ``update_old_policy``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from omninft_fast.media import MissingDependency
from omninft_fast.train import distributed, stages
from omninft_fast.train.builders import (
    build_policies,
    build_rewards,
    build_task,
    load_prompt_records,
    make_optimizer,
)
from omninft_fast.train.checkpoint import checkpoint_metadata, load_checkpoint, save_checkpoint
from omninft_fast.train.config import TrainConfig, save_config, times_per_sample
from omninft_fast.train.metrics import MetricsLogger, progress_bar
from omninft_fast.train.report import EvalResult, evaluate, format_table, write_reward_curves, write_samples
from omninft_fast.train.rollouts import micro_batches, sample_and_score
from omninft_fast.train.validation import TrainingDiverged, check_loss_inputs, check_rewards

CHECKPOINT = "checkpoint.safetensors"
RUN_FILES = ("config.yaml", "metrics.jsonl", CHECKPOINT)
FIXED_ON_RESUME = ("model.", "task.", "finetune.")  # the checkpoint's weights and adapters depend on these
# How the model runs or how a fresh adapter starts, not what the checkpoint holds: free to change on resume.
FREE_ON_RESUME = (
    "model.gradient_checkpointing",
    "model.attention",
    "model.compile",
    "model.compile_backend",
    "finetune.lora_init",
)
NOT_COMPARED = ("output_dir",)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run; the message says which iteration ``--resume`` continues from."""


def _flat(tree: Any, where: str = "") -> dict[str, Any]:
    """A nested dict/list tree as ``{dotted key: leaf}``."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {where: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flat(value, f"{where}.{key}" if where else str(key)))
    return out


def _write_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file renamed over it, so a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def move_aside(folder: Path) -> Path:
    """Rename ``folder`` to the first free ``<name>.replaced-<n>`` beside it (nothing is deleted); returns it.
    ``ValueError`` when it holds the current folder (the run would follow it)."""
    folder = folder.absolute()
    if Path.cwd().resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"cannot move {str(folder)!r} aside while it holds the current folder; run from outside it")
    n = 1
    while (target := folder.with_name(f"{folder.name}.replaced-{n}")).exists():
        n += 1
    folder.rename(target)
    return target


def resume_changes(
    saved: dict[str, Any], config: TrainConfig, *, reading: str | None = None
) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (checkpoint's value, new value)}`` for every setting ``config`` changes against the
    checkpoint's ``saved`` config (``reading``: the run a command other than ``train --resume`` reads, for the
    message).

    Raises:
        ValueError: a changed key fixes the checkpoint's weights (model size, LoRA vs full, rank); names them all.
    """
    old, new = _flat(saved), _flat(config.to_dict())
    changes = {
        key: (old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not key.startswith(NOT_COMPARED)
    }
    fixed = [
        f"{key} ({a!r} in the checkpoint, {b!r} now)"
        for key, (a, b) in changes.items()
        if key.startswith(FIXED_ON_RESUME) and key not in FREE_ON_RESUME
    ]
    if fixed and reading is not None:
        raise ValueError(f"the weights of {reading} fix {', '.join(fixed)}; leave them as the run has them")
    if fixed:
        raise ValueError(f"--resume cannot change {', '.join(fixed)}; start a new run for that")
    return changes


# What defines the evaluation set that the before/after table compares (prompts, seeds, sampler, reward terms).
EVALUATION = re.compile(
    r"(prompts|prompt_file|eval\.(samples_per_prompt|seed)|sampling\.(shift|video_cfg|audio_cfg|stg_scale|stg_blocks)"
    r"|rewards\.\d+\.(name|outputs|checkpoint_dir|options))(\.|$)"
)


def _evaluation_setup(flat: dict[str, Any]) -> dict[str, Any]:
    """The settings of a flattened config that define its evaluation, with the sampler's effective step count."""
    setup = {key: value for key, value in flat.items() if EVALUATION.match(key)}
    steps = flat.get("sampling.eval_steps")
    setup["sampling.eval_steps"] = flat.get("sampling.num_steps") if steps is None else steps
    return setup


def check_evaluation_unchanged(saved: dict[str, Any], config: TrainConfig) -> None:
    """``ValueError`` naming every setting that would make a resumed run's final evaluation differ from the one its
    "before" column was computed with (the table compares the two)."""
    old, new = _evaluation_setup(_flat(saved)), _evaluation_setup(_flat(config.to_dict()))
    changed = [
        f"{key} ({old.get(key)!r} -> {new.get(key)!r})"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]
    if changed:
        raise ValueError(
            f"--resume cannot change {', '.join(changed)}: the final table compares the policy before and after "
            "training on one evaluation set; start a new run for that"
        )


@contextlib.contextmanager
def stop_on_signal(on_second: Callable[[str], None]) -> Iterator[dict[str, str]]:
    """While inside, the first SIGINT or SIGTERM only records its name in the yielded dict (key ``"signal"``) for
    the caller to stop at its next safe point; a second one calls ``on_second(name)`` at once (which raises). Outside
    the main thread, signals keep their handlers."""
    state: dict[str, str] = {}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(number: int, _frame: object) -> None:
        name = signal.Signals(number).name
        if state:
            on_second(name)
        state["signal"] = name

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


class Trainer:
    """Algorithm 1 on an ``AVVelocityModel`` with reward plugins, configured by a ``TrainConfig``.

    Args:
        config: the run configuration.
        resume: continue from ``output_dir/checkpoint.safetensors`` with ``config`` (optimiser settings and
            the like may change; model, task and fine-tuning settings may not).
        overwrite: move a run already in ``output_dir`` aside to ``<output_dir>.replaced-<n>`` and start afresh;
            without it (or ``resume``) ``output_dir`` must not hold a run.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> None:
        self.config = config
        if resume and overwrite:
            raise ValueError("--resume continues the run in output_dir and --overwrite moves it aside: give one")
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.dist = distributed.init(config)
        try:
            self._build(config, resume=resume, overwrite=overwrite)
        except BaseException:
            self.dist.close(wait=False)
            raise

    def _build(self, config: TrainConfig, *, resume: bool, overwrite: bool) -> None:
        self.device = self.dist.device
        self.out = Path(config.output_dir)
        run_files = (*RUN_FILES, distributed.DCP_CHECKPOINT, distributed.DEEPSPEED_CHECKPOINT)
        held = [name for name in run_files if (self.out / name).exists()]
        if resume and not held:
            raise FileNotFoundError(f"output_dir {str(self.out)!r} holds no run to resume")
        if held and not resume and not overwrite:
            raise FileExistsError(
                f"output_dir {str(self.out)!r} already holds a run ({', '.join(held)}); continue it with "
                "--resume, or start afresh with --overwrite (moves the old run aside, deletes nothing)"
            )
        found = distributed.latest_checkpoint(self.out, CHECKPOINT) if resume else None
        # Every rank has looked before the main one moves anything. A run without a checkpoint to resume (killed
        # before its first, or its checkpoint removed) starts afresh beside its old files, never over them.
        self.dist.barrier()
        if self.dist.main and held and (overwrite or found is None):
            moved = str(move_aside(self.out))
            if overwrite:
                print(f"moved the run in {str(self.out)!r} to {moved!r}")
            else:
                print(
                    f"note: {str(self.out)!r} holds no checkpoint to resume; its files were moved to {moved!r} and "
                    "the run starts from iteration 0"
                )
        self.dist.barrier()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / f".write-test-{self.dist.rank}").touch()
            (self.out / f".write-test-{self.dist.rank}").unlink()
        except OSError as error:
            raise PermissionError(f"output_dir {str(self.out)!r} is not writable ({error.strerror})") from None
        if found is not None:
            distributed.readable(found[0], config.distributed.backend, found[1])
            saved = (
                checkpoint_metadata(found[1]) if found[0] == "safetensors" else distributed.folder_metadata(found[1])
            )
        changes = resume_changes(saved["config"], config) if found is not None else {}
        if found is not None:
            check_evaluation_unchanged(saved["config"], config)
            kl = saved["config"]["nft"]["kl_weight"], config.nft.kl_weight
            why = None
            if config.finetune.mode == "full" and kl[0] == 0 < kl[1]:
                why = "turn the KL term on", "a full fine-tune stores its reference weights only with one"
            elif config.finetune.mode == "full" and kl[1] == 0 < kl[0] and found[0] == "deepspeed":
                why = (
                    "turn the KL term off",
                    "a DeepSpeed checkpoint keeps the reference in one list with the old policy",
                )
            if why is not None:
                raise ValueError(
                    f"--resume cannot {why[0]} (nft.kl_weight {kl[0]!r} in the checkpoint, {kl[1]!r} now): {why[1]}; "
                    "start a new run for that"
                )
            if found[0] == "deepspeed":
                distributed.check_deepspeed_resume(saved["config"], config, found[1])
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.autocast_dtype = (
            torch.bfloat16
            if config.autocast == "bf16" or (config.autocast == "auto" and self.device.type == "cuda")
            else None
        )
        self.task = build_task(config)
        self.records = load_prompt_records(config)
        self.prompts = [record.av for record in self.records]
        if config.prompts_per_iter > len(self.prompts):
            raise ValueError(f"prompts_per_iter must be <= {len(self.prompts)} (distinct prompts of the task)")
        self.rewards = build_rewards(config)
        self.policies = build_policies(config, self.task, self.device)
        self.engine: distributed.Engine | None = None
        if self.dist.sharded:
            self.policies, self.engine = distributed.wrap(
                self.policies, config, self.dist, lambda params: make_optimizer(params, config, self.device)
            )
            self.policies = self.engine.policies
            self.optimizer = self.engine.optimizer
        else:
            self.optimizer = make_optimizer(self.policies.trainable, config, self.device)
            if self.policies.fp8 is not None:
                self.policies.fp8.watch(self.optimizer)  # fused AdamW updates weights without bumping their version
        self.policy = self.policies.policy
        if self.dist.main:
            print(f"attention: {self.policies.attention} (model.attention={config.model.attention})")
        self.start_iteration = 0
        if found is not None:
            kind, path = found
            # This run's optimiser settings (lr, betas, fused / foreach, ...), which loading the state would replace.
            settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
            if self.engine is not None:
                meta = self.engine.load(path, self.generator)
            elif kind == "fsdp2":
                meta = distributed.load_dcp(path, self.policies, self.optimizer, self.generator)
            else:
                meta = load_checkpoint(
                    path, modules=self.policies.checkpointed(), optimizer=self.optimizer, generator=self.generator
                )
            self.start_iteration = meta["iteration"] + 1
            for group, own in zip(self.optimizer.param_groups, settings, strict=True):
                group.update(own)
            if changes:
                lines = [f"{key}: {a!r} -> {b!r}" for key, (a, b) in changes.items()]
                if self.dist.main:
                    print(f"resume from iteration {self.start_iteration} changes {'; '.join(lines)}")
                    with (self.out / "resume.log").open("a") as handle:
                        handle.write(f"iteration {self.start_iteration}: {'; '.join(lines)}\n")
        self.saved_iteration: int | None = self.start_iteration - 1 if found is not None else None
        self.logger: MetricsLogger | None = None
        if self.dist.main:
            save_config(config, self.out / "config.yaml")
            self.logger = MetricsLogger(
                self.out,
                tensorboard=config.tensorboard,
                wandb=config.wandb,
                config=config.to_dict(),
                resume_iteration=self.start_iteration - 1 if found is not None else None,
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
        start = time.perf_counter()
        picks = torch.randperm(len(self.prompts), generator=self.generator)[: cfg.prompts_per_iter]
        chosen = [self.records[int(i)] for i in picks for _ in range(cfg.group_size)]
        # Each rank samples and scores its share of the prompt groups (its rows of the whole batch's noise).
        local = self.dist.local(chosen)

        self.policy.eval()
        total_steps = len(micro_batches(len(local), cfg.sampling)) * cfg.sampling.num_steps
        with progress_bar(total_steps, f"sampling {len(local)}", enabled=cfg.progress) as bar:
            samples, scores, timer = sample_and_score(
                p.old,
                self.task,
                self.rewards,
                chosen,
                self.generator,
                sampling=cfg.sampling,
                device=self.device,
                terms=[dict(r.outputs) for r in cfg.rewards],
                autocast_dtype=self.autocast_dtype,
                handle=p.old_handle,
                last_steps=cfg.reweight.last_steps,
                last_step=cfg.reweight.last_step,
                passes=cfg.reweight.passes,
                on_step=lambda _: bar.update(),
                share=self.dist.local,
            )
        mark = time.perf_counter()
        samples, scores = distributed.gather_rollout(
            self.dist, samples, scores, [r.av for r in chosen], [r.video for r in chosen], [r.audio for r in chosen]
        )
        texts = samples.texts
        groups, dropped = cfg.prompts_per_iter, {}
        if cfg.on_nonfinite == "drop":
            samples, scores, dropped = stages.drop_nonfinite_groups(samples, scores, groups)
            if dropped:
                texts = samples.texts
                groups = len(texts) // cfg.group_size
                named = ", ".join(f"{name} on {count}" for name, count in dropped.items())
                print(
                    f"warning: iteration {iteration}: non-finite rewards ({named} samples); "
                    f"dropped {cfg.prompts_per_iter - groups} of {cfg.prompts_per_iter} groups",
                    file=sys.stderr,
                )
                if not groups:
                    raise TrainingDiverged("every group holds a non-finite reward")
        check_rewards(scores.values)
        adv = stages.advantages(scores, groups, cfg.advantage, self.device)
        token_weight = stages.token_weights(
            samples.region_scores,
            cfg.reweight,
            self.device,
            frames=self.task.spec.latent_frames,
            iteration=iteration,
        )
        check_loss_inputs(adv.r_video, adv.r_audio, token_weight)
        timer["advantages"] = time.perf_counter() - mark

        self.policy.train()
        batch = stages.UpdateBatch(
            stages.condition(self.task, texts, self.device),
            samples.video,
            samples.audio,
            adv.r_video,
            adv.r_audio,
            token_weight,
        )
        steps = math.ceil(len(texts) * times_per_sample(cfg.nft, cfg.sampling) / cfg.nft.mini_batch)
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
                engine=self.engine,
            )
        timer["old_ref"], timer["train"] = update.pop("time/old_ref"), update.pop("time/train")

        mark = time.perf_counter()
        eta = stages.old_policy_eta(iteration, cfg.nft)
        if self.engine is None:
            stages.update_old_policy(p, eta)
        else:
            self.engine.update_old_policy(eta)
        timer["old_policy_update"] = time.perf_counter() - mark
        total = time.perf_counter() - start

        metrics: dict[str, float] = {}
        for name, value in scores.values.items():
            metrics[f"reward/{name}/mean"] = float(value.mean())
            metrics[f"reward/{name}/std"] = float(value.std(correction=0))
        for name, value in scores.outputs.items():
            if name not in scores.values:
                metrics[f"reward_output/{name}/mean"] = float(value.mean())
        metrics["advantage/conflict_rate"] = float(((adv.video * adv.audio) < 0).float().mean())
        metrics["advantage/r_video_mean"] = float(adv.r_video.mean())
        metrics["advantage/r_audio_mean"] = float(adv.r_audio.mean())
        metrics.update(update)
        metrics["eta"] = eta
        held = (
            self.engine.state_bytes() if self.engine is not None else distributed.state_bytes(p.policy, self.optimizer)
        )
        metrics["memory/param_optim_bytes"] = float(held)
        metrics["dropped_groups"] = float(cfg.prompts_per_iter - groups)
        for phase, seconds in timer.items():
            metrics[f"time/{phase}"] = seconds
        metrics["time/iteration"] = total
        metrics["samples_per_second"] = len(texts) / total
        return metrics

    @staticmethod
    def summary(iteration: int, metrics: dict[str, float]) -> str:
        """One line per iteration: rewards, losses, samples/s and seconds per phase."""
        rewards = " ".join(
            f"{key.split('/')[1]} {value:.3f}"
            for key, value in metrics.items()
            if key.startswith("reward/") and key.endswith("/mean")
        )
        phases = " ".join(
            f"{key.split('/')[1]} {value:.2f}"
            for key, value in metrics.items()
            if key.startswith("time/") and key != "time/iteration"
        )
        return (
            f"iter {iteration}: {rewards} | loss v {metrics['loss/video']:.4f} a {metrics['loss/audio']:.4f} | "
            f"{metrics['samples_per_second']:.2f} samples/s, {metrics['time/iteration']:.1f} s ({phases})"
        )

    def evaluate(self) -> tuple[EvalResult, stages.Rollout]:
        """The policy on the fixed evaluation set (``report.evaluate``) with ``sampling.eval_steps`` steps."""
        config = self.config
        if config.sampling.eval_steps is not None:
            config = copy.deepcopy(config)
            config.sampling.num_steps = config.sampling.eval_steps
        return evaluate(self.policy, self.task, self.rewards, self.records, config, self.device, self.autocast_dtype)

    def save(self, iteration: int) -> None:
        """Checkpoint after ``iteration``: models, optimiser, generator and config (an engine's sharded folder on a
        distributed run)."""
        metadata = {"iteration": iteration, "config": self.config.to_dict()}
        if self.engine is not None:
            self.engine.save(self.out, self.generator, metadata)
            self.saved_iteration = iteration
            return
        save_checkpoint(
            self.out / CHECKPOINT,
            modules=self.policies.checkpointed(),
            optimizer=self.optimizer,
            generator=self.generator,
            metadata=metadata,
        )
        self.saved_iteration = iteration

    def _write_samples(self, tag: str, samples: stages.Rollout) -> None:
        if not self.dist.main:
            return
        spec, folder = self.task.spec, self.out / "samples" / tag
        if folder.exists():
            print(f"moved earlier samples {str(folder)!r} to {str(move_aside(folder))!r}")
        try:
            write_samples(
                folder,
                self.task.decode,
                samples,
                samples_per_prompt=self.config.eval.samples_per_prompt,
                count=self.config.eval.write_samples,
                fps=spec.fps,
                sample_rate=spec.sample_rate,
            )
        except MissingDependency as error:
            print(f"note: no {tag} samples written ({error})")

    def run(self) -> tuple[EvalResult, EvalResult]:
        """Evaluate, train ``iterations`` (from the checkpoint when resuming), evaluate; write the artifacts.

        Raises:
            TrainingInterrupted: SIGINT or SIGTERM arrived. The first stops at the next iteration boundary after
                checkpointing it; a second stops at once (the last complete checkpoint stays valid).
        """

        def at_once(name: str) -> None:
            if self.saved_iteration is None:
                raise TrainingInterrupted(f"stopped at once by a second {name} before the first checkpoint")
            raise TrainingInterrupted(
                f"stopped at once by a second {name}; --resume continues from iteration {self.saved_iteration + 1}"
            )

        with stop_on_signal(at_once) as stop:
            try:
                result = self._run(stop)
            except BaseException:
                self.dist.close(wait=False)
                raise
        self.dist.close()
        return result

    def _stop_point(self, stop: dict[str, str], iteration: int) -> None:
        """Before ``iteration``: if a signal arrived (on any rank), checkpoint the state after ``iteration - 1``
        and stop."""
        if self.dist.agree(bool(stop)):
            stop.setdefault("signal", "a signal on another rank")
            if self.saved_iteration != iteration - 1:
                self.save(iteration - 1)
            raise TrainingInterrupted(f"stopped by {stop['signal']}; --resume continues from iteration {iteration}")

    def _run(self, stop: dict[str, str]) -> tuple[EvalResult, EvalResult]:
        cfg = self.config
        before_path = self.out / "eval_before.json"
        if self.start_iteration == 0 or not before_path.exists():
            before, samples = self.evaluate()
            self._write_samples("before", samples)
            if self.dist.main:
                _write_text(before_path, json.dumps(before.__dict__))
        else:
            before = EvalResult(**json.loads(before_path.read_text()))
        bar = tqdm(
            range(self.start_iteration, cfg.iterations), desc="OmniNFT", disable=not cfg.progress, dynamic_ncols=True
        )
        for it in bar:
            self._stop_point(stop, it)
            metrics = self.iteration(it)
            if self.logger is not None:
                self.logger.log(it, metrics)
                tqdm.write(self.summary(it, metrics))
            bar.set_postfix({k.split("/")[1]: f"{v:.3f}" for k, v in metrics.items() if k.endswith("/mean")})
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
                self.save(it)
        self._stop_point(stop, cfg.iterations)
        after, samples = self.evaluate()
        if self.engine is not None:
            self.engine.export(self.out / distributed.EXPORT, cfg.iterations - 1)
        self._write_samples("after", samples)
        if self.logger is not None:
            _write_text(self.out / "eval_after.json", json.dumps(after.__dict__))
            write_reward_curves(self.out / "reward_curve.png", self.logger.history())
            self.logger.close()
            _write_text(self.out / "eval_table.md", format_table(before, after) + "\n")
        return before, after
