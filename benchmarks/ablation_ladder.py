"""The paper's Table 3 ablation ladder on the CPU default: vanilla -> +routing -> +surgery -> +reweighting.

Runs ``omninft-fast train`` once per rung (``ladder=<rung>``) with the same config and seeds, then tabulates each
reward's evaluation mean +- standard error after training and writes ``benchmarks/results/ablation_<name>.{json,md}``.

    python benchmarks/ablation_ladder.py --config configs/cpu_default.yaml --seeds 0
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omninft_fast.train.config import LADDER

RUNG_NAMES = {"vanilla": "vanilla", "routing": "+ routing", "surgery": "+ surgery", "full": "+ reweighting (full)"}


def run_rung(config: str, rung: str, seed: int, out_dir: Path) -> dict:
    """Train one rung and return its evaluation before and after training plus the wall time."""
    output = out_dir / f"{rung}_seed{seed}"
    command = [sys.executable, "-m", "omninft_fast", "train", "--config", config, f"ladder={rung}"]
    command += [f"seed={seed}", f"output_dir={output}"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    before = json.loads((output / "eval_before.json").read_text())
    after = json.loads((output / "eval_after.json").read_text())
    return {"rung": rung, "seed": seed, "seconds": seconds, "before": before, "after": after}


def to_markdown(rows: list[dict], config: str, command: str) -> str:
    """One line per (rung, seed): every reward's mean +- SE after training."""
    rewards = list(rows[0]["after"]["mean"])
    lines = [
        f"# Ablation ladder (Table 3) on `{config}`",
        "",
        f"Command: `{command}`; {platform.machine()} CPU, {time.strftime('%Y-%m-%d')}. Evaluation: "
        f"{rows[0]['after']['count']} fixed samples per run, mean +- standard error after training.",
        "",
        "| rung | seed | " + " | ".join(rewards) + " | wall s |",
        "|---|---|" + "---|" * len(rewards) + "---|",
    ]
    first = rows[0]["before"]
    lines.append(
        "| base policy (before) | - | "
        + " | ".join(f"{first['mean'][r]:.4f} +- {first['stderr'][r]:.4f}" for r in rewards)
        + " | - |"
    )
    for row in rows:
        cells = " | ".join(f"{row['after']['mean'][r]:.4f} +- {row['after']['stderr'][r]:.4f}" for r in rewards)
        lines.append(f"| {RUNG_NAMES[row['rung']]} | {row['seed']} | {cells} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu_default.yaml")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--rungs", default=",".join(LADDER), help=f"comma-separated subset of {', '.join(LADDER)}")
    parser.add_argument("--runs-dir", default="runs/ablation")
    parser.add_argument("--name", default="cpu", help="results file suffix")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each trains with the config's threads)")
    args = parser.parse_args(argv)
    rungs = args.rungs.split(",")
    unknown = sorted(set(rungs) - set(LADDER))
    if unknown:
        parser.error(f"--rungs has unknown rungs {unknown}; choose from {', '.join(LADDER)}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    runs = [(args.config, rung, seed, Path(args.runs_dir)) for seed in seeds for rung in rungs]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda run: run_rung(*run), runs))
    command = "python benchmarks/ablation_ladder.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"ablation_{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    markdown = to_markdown(rows, args.config, command.strip())
    (results / f"ablation_{args.name}.md").write_text(markdown)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
