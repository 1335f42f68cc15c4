"""``omninft-fast generate``: sample a prompt set with the base or a trained policy and write the sample folder that
``omninft-fast eval`` reads (``<id>.mp4`` with sound, ``<id>.wav``, ``prompts.jsonl``).

``load_policy`` (also used by ``analyze`` and ``merge-lora``) rebuilds a run's policy through the trainer's
builders and checkpoint code: the base weights of ``model.checkpoint``, then the run's LoRA adapters or full weights.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from omninft_fast._checks import check_device
from omninft_fast.media import refuse_existing, sample_files, write_index, write_sample

if TYPE_CHECKING:
    from omninft_fast.train.builders import Policies
    from omninft_fast.train.config import TrainConfig
    from omninft_fast.train.lora import LoraAdapters
    from omninft_fast.train.model import AVTask, LTXAVModel


@dataclass
class Loaded:
    """A config's task and trained policy (``model``, with the trained LoRA adapter active when ``adapters``), or
    with ``training=True`` the trainer's whole ``Policies`` (old policy, reference, surgery handle)."""

    config: TrainConfig
    task: AVTask
    model: LTXAVModel
    adapters: LoraAdapters | None
    policies: Policies | None
    device: torch.device
    autocast_dtype: torch.dtype | None


def resolve_config(config: str | None, run: str | None, overrides: list[str]) -> TrainConfig:
    """``config`` with ``overrides``; without ``config``, the run's ``config.yaml`` (else the built-in defaults).
    With a run, settings that fix its weights (``model.``, ``task.``, ``finetune.``) must match its checkpoint."""
    from omninft_fast.train.config import load_config
    from omninft_fast.train.trainer import resume_changes

    if config is None and run is not None:
        config = str(Path(run) / "config.yaml")
        if not Path(config).is_file():
            raise FileNotFoundError(f"{run} holds no config.yaml; pass --config")
    loaded = load_config(config, overrides)
    if run is not None:
        resume_changes(_run_weights(run)[2], loaded, reading=f"--run {run}")
    return loaded


def _run_weights(run: str | Path) -> tuple[str, Path, dict[str, Any]]:
    """The newest weights of training run ``run`` that one process reads, as ``(format, path, the run's config
    then)``: the one-process checkpoint file, an FSDP2 checkpoint folder (``fsdp2``: DCP reshards it here) or, for
    a DeepSpeed checkpoint, the run's export of that iteration (``export``); ``FileNotFoundError`` /
    ``ValueError`` naming the run otherwise."""
    from omninft_fast.train import distributed
    from omninft_fast.train.checkpoint import checkpoint_metadata
    from omninft_fast.train.trainer import CHECKPOINT

    found = distributed.latest_checkpoint(Path(run), CHECKPOINT)
    if found is None:
        raise FileNotFoundError(f"{run} holds no checkpoint (is it a training run's output_dir?)")
    kind, path = found
    if kind == "safetensors":
        return kind, path, checkpoint_metadata(path)["config"]
    meta = distributed.folder_metadata(path)
    if kind == "deepspeed":
        export = Path(run) / distributed.EXPORT
        if distributed.export_iteration(export) != meta["iteration"]:
            raise ValueError(
                f"the newest checkpoint of {run} is a DeepSpeed folder (iteration {meta['iteration']}) without "
                f"{distributed.EXPORT} of that iteration, which a finished run writes; resume the run to its end"
            )
        return "export", export, meta["config"]
    return kind, path, meta["config"]


def load_policy(config: TrainConfig, run: str | Path | None, *, training: bool = False) -> Loaded:
    """Build the task and the policy of ``config`` (base weights from ``model.checkpoint``, LoRA adapters with
    ``finetune.mode=lora``) and, with ``run``, load the policy's weights or adapters from its checkpoint; in eval
    mode. Only with ``training`` are the old policy, the reference and the patch handles built as the trainer
    does (a full fine-tune then holds the model's weights more than once)."""
    from omninft_fast.train.builders import build_policies, build_policy, build_task
    from omninft_fast.train.checkpoint import load_modules
    from omninft_fast.train.lora import LoraAdapters

    device = check_device(config.device, "device")
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    task = build_task(config)
    policies = None
    if training:
        policies = build_policies(config, task, device)
        model, adapters = policies.policy, policies.adapters
        modules = policies.checkpointed()
    else:
        model = build_policy(config, task).to(device)
        f = config.finetune
        adapters = None
        if f.mode == "lora":
            adapters = LoraAdapters(
                model.model, rank=f.lora_rank, alpha=f.lora_alpha, targets=f.lora_targets, init=f.lora_init
            )
        modules = {"lora": adapters} if adapters is not None else {"policy": model}
    if run is not None:
        kind, path, _ = _run_weights(run)
        if kind == "fsdp2":
            from omninft_fast.train.distributed import load_dcp_modules

            load_dcp_modules(path, modules)
        else:
            load_modules(path, modules)
    model.eval()
    autocast = config.autocast == "bf16" or (config.autocast == "auto" and device.type == "cuda")
    return Loaded(config, task, model, adapters, policies, device, torch.bfloat16 if autocast else None)


def read_prompts(path: str | Path) -> list[tuple[str, str]]:
    """``(id, prompt)`` pairs of a ``.jsonl`` file (objects with ``prompt`` and optional ``id``) or of a text file
    (one prompt a line, blank lines skipped); ids default to the 4-digit line index."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1) if line.strip()]
    pairs = []
    for k, (number, line) in enumerate(lines):
        if path.suffix == ".jsonl":
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                raise ValueError(f"{path}:{number}: each line needs a string 'prompt'")
            sample_id = str(entry.get("id", f"{k:04d}"))
        else:
            entry, sample_id = {"prompt": line.strip()}, f"{k:04d}"
        if Path(sample_id).name != sample_id or sample_id in ("", ".", ".."):
            raise ValueError(f"{path}:{number}: id {sample_id!r} must be a file name")
        pairs.append((sample_id, entry["prompt"]))
    if not pairs:
        raise ValueError(f"prompt file {str(path)!r} holds no prompt")
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: ids repeat ({sorted({i for i in ids if ids.count(i) > 1})[:3]})")
    return pairs


def sample_jobs(prompts: list[tuple[str, str]], samples_per_prompt: int) -> list[tuple[str, str]]:
    """``(file id, prompt)`` of every sample: the prompt's id, or ``<id>-<k>`` with several samples a prompt."""
    if samples_per_prompt < 1:
        raise ValueError(f"--samples-per-prompt must be >= 1, got {samples_per_prompt}")
    return [
        (sample_id if samples_per_prompt == 1 else f"{sample_id}-{k}", prompt)
        for sample_id, prompt in prompts
        for k in range(samples_per_prompt)
    ]


@torch.no_grad()
def generate(
    loaded: Loaded, prompts: list[tuple[str, str]], out: str | Path, *, samples_per_prompt: int = 1, seed: int = 0
) -> list[dict[str, object]]:
    """Sample every prompt ``samples_per_prompt`` times (``sampling`` settings of the config, noise from ``seed``,
    in chunks of one training iteration's batch) and write the sample folder ``out``; returns the index entries.

    Raises:
        FileExistsError: ``out`` already holds a file this would write (checked before sampling).
    """
    from omninft_fast.train.stages import rollout

    jobs = sample_jobs(prompts, samples_per_prompt)
    refuse_existing(out, sample_files([i for i, _ in jobs]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config, task, spec = loaded.config, loaded.task, loaded.task.spec
    generator = torch.Generator().manual_seed(seed)
    chunk = config.prompts_per_iter * config.group_size
    entries: list[dict[str, object]] = []
    for lo in range(0, len(jobs), chunk):
        part = jobs[lo : lo + chunk]
        samples = rollout(
            loaded.model,
            task,
            [prompt for _, prompt in part],
            generator,
            sampling=config.sampling,
            device=loaded.device,
            autocast_dtype=loaded.autocast_dtype,
        )
        frames, waveforms = task.decode(samples.video, samples.audio)
        for k, (sample_id, prompt) in enumerate(part):
            write_sample(out, sample_id, frames[k], waveforms[k], fps=spec.fps, sample_rate=spec.sample_rate)
            entries.append({"id": sample_id, "prompt": prompt, "fps": spec.fps, "seed": seed})
    write_index(out, entries)
    return entries


def _run(args: argparse.Namespace) -> int:
    config = resolve_config(args.config, args.run, args.overrides)
    prompts = read_prompts(args.prompts)
    refuse_existing(args.out, sample_files([i for i, _ in sample_jobs(prompts, args.samples_per_prompt)]))
    loaded = load_policy(config, args.run)
    entries = generate(loaded, prompts, args.out, samples_per_prompt=args.samples_per_prompt, seed=args.seed)
    policy = f"run {args.run}" if args.run else "the base policy"
    print(f"generated {len(entries)} samples with {policy}; wrote {args.out} (read it with omninft-fast eval)")
    return 0


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``generate`` on the CLI's subcommands."""
    parser = commands.add_parser(
        "generate",
        parents=[common],
        help="sample prompts with the base or a trained policy into mp4 + wav + prompts.jsonl",
    )
    parser.add_argument("--config", default=None, help="YAML config (default: the run's config.yaml, else built-in)")
    parser.add_argument("--prompts", required=True, help=".jsonl (prompt, optional id) or .txt (one prompt a line)")
    parser.add_argument("--out", required=True, help="output folder (files already there are never overwritten)")
    parser.add_argument("--run", default=None, help="a training run's output_dir: its LoRA or full weights")
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. sampling.num_steps=8")
    parser.set_defaults(func=_run)
