"""The ``omninft-fast`` command line."""

from __future__ import annotations

import argparse
import sys

import torch


def _selfcheck(args: argparse.Namespace) -> int:
    from omninft_fast.selfcheck import format_rows, run_selfcheck

    torch.manual_seed(args.seed)
    rows = run_selfcheck(seed=args.seed, device=args.device)
    print(f"omninft-fast selfcheck (torch {torch.__version__}, device {args.device}, seed {args.seed})")
    print(format_rows(rows))
    failed = [row for row in rows if not row.ok]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omninft-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("selfcheck", help="run every op on every usable backend against float64 oracles")
    check.add_argument("--device", default="cpu", help="device for the inputs (default: cpu)")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=_selfcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
