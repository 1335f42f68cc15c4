"""The ``omninft-fast`` command line. Each command imports its modules when it runs, so ``selfcheck`` needs only
torch and the trainer's libraries are needed only by the trainer's commands."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from omninft_fast import analysis, evaluation, generate, merge
from omninft_fast._checks import check_device
from omninft_fast.dispatch import BackendError
from omninft_fast.media import MissingDependency
from omninft_fast.rewards import check as reward_check

if TYPE_CHECKING:
    from omninft_fast.train.config import TrainConfig


def _selfcheck(args: argparse.Namespace) -> int:
    from omninft_fast.selfcheck import format_rows, run_selfcheck

    torch.manual_seed(args.seed)
    rows = run_selfcheck(seed=args.seed, device=args.device)
    print(f"omninft-fast selfcheck (torch {torch.__version__}, device {args.device}, seed {args.seed})")
    print(format_rows(rows))
    failed = [row for row in rows if not row.ok]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


USER_ERRORS = (ValueError, KeyError, OSError, NotImplementedError, MissingDependency, BackendError)


def _user_error(error: Exception) -> str:
    """One line for an error a user can fix (a ``KeyError``'s message without the quotes ``str`` adds)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split())


def _load(args: argparse.Namespace) -> TrainConfig | None:
    """The config of ``--config`` and the overrides; prints the error and returns ``None`` when it is bad."""
    from omninft_fast.train.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as error:
        if getattr(args, "debug", False):
            raise
        print(f"config error: {error}", file=sys.stderr)
        return None


def _train(args: argparse.Namespace) -> int:
    from omninft_fast.train import Trainer, TrainingDiverged, format_table
    from omninft_fast.train.trainer import TrainingInterrupted

    start = time.perf_counter()
    config = _load(args)
    if config is None:
        return 2
    trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite)
    try:
        before, after = trainer.run()
    except TrainingDiverged as error:
        saved = trainer.saved_iteration
        kept = "no checkpoint was written yet" if saved is None else f"the checkpoint after iteration {saved} is kept"
        print(f"training stopped: {error}; {kept} in {config.output_dir}", file=sys.stderr)
        return 1
    except TrainingInterrupted as error:
        print(f"train: {error} (output_dir {config.output_dir})", file=sys.stderr)
        return 130
    if not trainer.dist.main:
        return 0
    print(
        f"\nEvaluation on {after.count} samples (every task prompt x {config.eval.samples_per_prompt} seeds, "
        f"eval seed {config.eval.seed}), run seed {config.seed}:"
    )
    print(format_table(before, after))
    print(f"wall time {time.perf_counter() - start:.1f} s; outputs in {config.output_dir}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from omninft_fast.task.pretrain import pretrain

    config = _load(args)
    if config is None:
        return 2
    output = args.output or config.model.checkpoint
    if not output:
        print("pretrain needs --output or model.checkpoint", file=sys.stderr)
        return 2
    if Path(output).exists():
        print(f"pretrain: {output} exists; choose another --output (nothing is overwritten)", file=sys.stderr)
        return 2
    losses = pretrain(config, steps=args.steps, batch_size=args.batch_size, lr=args.lr, output=output, seed=args.seed)
    print(f"pretrained {args.steps} steps, final loss {sum(losses[-50:]) / len(losses[-50:]):.4f}; wrote {output}")
    return 0


def _text_cache(args: argparse.Namespace) -> int:
    from omninft_fast.train.builders import build_prompt_encoder, load_prompts
    from omninft_fast.train.ltx_pipeline import precompute_text_cache, text_cache_prompts

    config = _load(args)
    if config is None:
        return 2
    x = config.ltx
    output = args.output or x.text_cache
    problems = [
        (config.model.kind != "ltx", f"needs model.kind=ltx, got {config.model.kind!r}"),
        (x.gemma_root is None, "needs ltx.gemma_root (the local Gemma directory), e.g. ltx.gemma_root=/models/gemma"),
        (config.prompts is None and config.prompt_file is None, "needs prompts or prompt_file to encode"),
        (not output, "needs --output or ltx.text_cache"),
        (output and Path(output).exists(), f"output {output} exists; choose another --output (nothing is overwritten)"),
    ]
    for failed, message in problems:
        if failed:
            print(f"text-cache {message}", file=sys.stderr)
            return 2
    prompts = load_prompts(config)
    encoder = build_prompt_encoder(config)
    written = precompute_text_cache(encoder, prompts, output)
    print(f"encoded {len(text_cache_prompts(written))} distinct prompts; wrote {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omninft-fast", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "selfcheck", parents=[common], help="run every op on every usable backend against float64 oracles"
    )
    check.add_argument("--device", default="cpu", help="device for the inputs (default: cpu)")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=_selfcheck)
    train = commands.add_parser("train", parents=[common], help="run OmniNFT (Algorithm 1) from a YAML config")
    train.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from output_dir/checkpoint.safetensors (overrides such as optim.lr=1e-4 apply from there)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="move a run already in output_dir aside to <output_dir>.replaced-<n> and start afresh",
    )
    train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # DeepSpeed's launcher
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. nft.beta=0.5 advantage.routing=shared")
    train.set_defaults(func=_train)
    pre = commands.add_parser(
        "pretrain", parents=[common], help="flow-matching pre-training of the tiny base policy on the task"
    )
    pre.add_argument("--config", default=None, help="YAML config (task and model sections are used)")
    pre.add_argument("--steps", type=int, default=600)
    pre.add_argument("--batch-size", type=int, default=32)
    pre.add_argument("--lr", type=float, default=2e-3)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--output", default=None, help="weights file (default: model.checkpoint)")
    pre.add_argument("overrides", nargs="*", help="key=value config overrides")
    pre.set_defaults(func=_pretrain)
    cache = commands.add_parser(
        "text-cache", parents=[common], help="encode the prompts with Gemma once into ltx.text_cache (model.kind=ltx)"
    )
    cache.add_argument("--config", default=None, help="YAML config (model, ltx and prompt sections are used)")
    cache.add_argument(
        "--output", default=None, help="text cache file to write, never overwritten (default: ltx.text_cache)"
    )
    cache.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. ltx.gemma_root=/models/gemma")
    cache.set_defaults(func=_text_cache)
    evaluate = commands.add_parser(
        "eval",
        parents=[evaluation.build_parser(), common],
        add_help=False,
        help="JavisBench-style metrics over a folder of generated samples",
    )
    evaluate.set_defaults(func=evaluation.run)
    generate.add_parser(commands, common)
    analysis.add_parser(commands, common)
    merge.add_parser(commands, common)
    reward_check.add_commands(
        commands.add_parser("rewards", help="reward checkpoints: rewards check <dir|config>"), common
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error prints one line to stderr and returns 2 (the traceback only with ``--debug``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device, "--device")
        return args.func(args)
    except USER_ERRORS as error:
        if getattr(args, "debug", False):
            raise
        print(f"{args.command}: {_user_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"{args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as error:  # a command's own usage message
        if not isinstance(error.code, str):
            raise
        print(f"{args.command}: {error.code}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
