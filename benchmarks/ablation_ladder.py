"""The paper's Table 3 ablation ladder on a CPU task: vanilla (GDPO) -> +routing -> +surgery -> +reweighting.

Runs ``omninft-fast train`` once per rung (``ladder=<rung>``) and seed with the same config, one run after another,
then tabulates each reward's evaluation mean after training: per rung the mean over seeds with a 95% Student t
interval, and per run the mean +- standard error. With ``task.conflict_fraction > 0`` the colour and pitch rewards
are also given on the conflicting prompts alone. Writes ``benchmarks/results/ablation_<name>.{json,md,png}``.

    python benchmarks/ablation_ladder.py --config configs/cpu_ablation.yaml --seeds 0,1,2,3 --name cpu_ablation
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from omninft_fast.task.synthetic import conflict_prompts
from omninft_fast.train.config import LADDER, load_config
from omninft_fast.train.plotting import plot_intervals

RUNG_NAMES = {
    "vanilla": "vanilla (GDPO)",
    "routing": "+ routing",
    "surgery": "+ surgery",
    "full": "+ reweighting (full)",
}
CONFLICT_TERMS = ("colour", "pitch")


def run_rung(config: str, rung: str, seed: int, out_dir: Path, overrides: list[str] | None = None) -> dict:
    """Train one rung (with ``key=value`` ``overrides``) and return its evaluation before and after training, its
    training-batch reward curves and the wall time."""
    output = out_dir / f"{rung}_seed{seed}"
    command = [sys.executable, "-m", "omninft_fast", "train", "--config", config, f"ladder={rung}", *(overrides or [])]
    command += [f"seed={seed}", f"output_dir={output}", "progress=false"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    before = json.loads((output / "eval_before.json").read_text())
    after = json.loads((output / "eval_after.json").read_text())
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    curve = {name: [line[f"reward/{name}/mean"] for line in lines] for name in after["mean"]}
    return {"rung": rung, "seed": seed, "seconds": seconds, "before": before, "after": after, "curve": curve}


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``0.5 < p < 1``) of Student's t with ``df >= 1`` degrees of freedom: bisection on the CDF,
    whose density is integrated with Simpson's rule on ``arctan``-spaced points (exact to ~1e-6)."""
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        # x = tan(u): the density times dx/du = sec^2 u is smooth on [0, atan(x)].
        steps, end = 2000, math.atan(x)
        h = end / steps

        def f(u: float) -> float:
            return math.exp(log_norm - (df + 1) / 2 * math.log1p(math.tan(u) ** 2 / df)) / math.cos(u) ** 2

        total = f(0.0) + f(end) + sum((4 if k % 2 else 2) * f(k * h) for k in range(1, steps))
        return 0.5 + total * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """``(mean, half_width)`` of the Student t interval at ``level`` for the mean of ``values`` (0 half-width for
    one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, t_quantile(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def run_metrics(evaluation: dict, conflicts: set[str]) -> dict[str, float]:
    """Every reward's mean over the evaluation set, and colour / pitch over the conflicting prompts alone."""
    metrics = dict(evaluation["mean"])
    picks = [i for i, text in enumerate(evaluation.get("prompts", [])) if text in conflicts]
    for term in CONFLICT_TERMS:
        if picks and term in evaluation.get("prompt_mean", {}):
            metrics[f"{term} (conflict)"] = statistics.fmean(evaluation["prompt_mean"][term][i] for i in picks)
    return metrics


def curve_metrics(row: dict) -> dict[str, float]:
    """Every reward's training-batch mean averaged over the iterations (the area under the learning curve)."""
    return {name: statistics.fmean(values) for name, values in row["curve"].items()}


def summarise(
    rows: list[dict], conflicts: set[str], *, curves: bool = False
) -> dict[str, dict[str, tuple[float, float]]]:
    """Per rung (in ladder order) and metric: ``(mean over seeds, 95% t half-width)`` of the evaluation after
    training, or with ``curves`` of ``curve_metrics``."""
    per_run = [(row["rung"], curve_metrics(row) if curves else run_metrics(row["after"], conflicts)) for row in rows]
    summary = {}
    for rung in [r for r in LADDER if any(name == r for name, _ in per_run)]:
        runs = [metrics for name, metrics in per_run if name == rung]
        summary[rung] = {key: interval([m[key] for m in runs]) for key in runs[0]}
    return summary


def paired_steps(
    rows: list[dict], conflicts: set[str], *, curves: bool = False
) -> dict[str, dict[str, tuple[float, float]]]:
    """Each rung minus the rung before it, and the full rung minus vanilla, paired by seed (the seeds both rungs
    ran): per step and metric ``(mean difference, 95% t half-width)`` of the evaluation after training, or with
    ``curves`` of ``curve_metrics``."""
    by_key = {
        (row["rung"], row["seed"]): curve_metrics(row) if curves else run_metrics(row["after"], conflicts)
        for row in rows
    }
    rungs = [r for r in LADDER if any(row["rung"] == r for row in rows)]
    pairs = list(itertools.pairwise(rungs))
    if len(rungs) > 2:
        pairs.append((rungs[0], rungs[-1]))
    steps = {}
    for lower, upper in pairs:
        seeds = sorted(
            {seed for rung, seed in by_key if rung == lower} & {seed for rung, seed in by_key if rung == upper}
        )
        if seeds:
            metrics = by_key[(upper, seeds[0])]
            steps[f"{RUNG_NAMES[upper]} - {RUNG_NAMES[lower]}"] = {
                m: interval([by_key[(upper, s)][m] - by_key[(lower, s)][m] for s in seeds]) for m in metrics
            }
    return steps


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` where there is one, else ``platform.processor()``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def table(header: list[str], body: list[list[str]]) -> list[str]:
    """A Markdown table's lines: ``header``, the separator, one row per ``body`` entry."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def interval_cells(values: dict[str, tuple[float, float]], names: list[str], *, signed: bool = False) -> list[str]:
    """``mean +- half-width`` cells of ``values[name] = (mean, half-width)`` in ``names`` order."""
    return [f"{values[m][0]:{'+' if signed else ''}.3f} +- {values[m][1]:.3f}" for m in names]


def to_markdown(
    rows: list[dict], config: str, command: str, conflicts: set[str], plot: str, *, threads: int | None = None
) -> str:
    """The per-rung table (mean over seeds, 95% interval) and the per-run table (mean +- SE)."""
    summary = summarise(rows, conflicts)
    metrics = list(next(iter(summary.values())))
    base = run_metrics(rows[0]["before"], conflicts)
    seeds = sorted({row["seed"] for row in rows})
    total = sum(row["seconds"] for row in rows)
    lines = [
        f"# Ablation ladder (Table 3) on `{config}`",
        "",
        f"Command: `{command}`; {platform.machine()} {cpu_name()}, {os.cpu_count()} cores"
        + (f", {threads} torch thread(s) per run" if threads is not None else "")
        + f", torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
        f"Seeds {', '.join(map(str, seeds))}; runs one after another, {total / 60:.0f} min in all "
        f"({min(r['seconds'] for r in rows):.0f}-{max(r['seconds'] for r in rows):.0f} s per run). Evaluation: "
        f"{rows[0]['after']['count']} fixed samples per run (eval seed fixed, so the base policy's row is the same "
        "for every run).",
    ]
    if conflicts:
        lines.append(
            f"`(conflict)` columns: the {len(conflicts)} prompts whose pre-training data have exactly one of colour "
            "and pitch right."
        )
    lines += ["", f"## Mean over {len(seeds)} seeds, 95% t interval (mean +- half-width)", "", f"![ladder]({plot})", ""]
    body = [["base policy (before)", *(f"{base[m]:.3f}" for m in metrics)]]
    body += [[RUNG_NAMES[rung], *interval_cells(values, metrics)] for rung, values in summary.items()]
    lines += table(["rung", *metrics], body)
    steps = paired_steps(rows, conflicts)
    if steps:
        lines += [
            "",
            "## Each rung against the one before (and full against vanilla), paired by seed: mean difference, "
            "95% t interval",
            "",
            *table(["step", *metrics], [[step, *interval_cells(v, metrics, signed=True)] for step, v in steps.items()]),
        ]
    curves = summarise(rows, conflicts, curves=True)
    names = list(next(iter(curves.values())))
    lines += [
        "",
        f"## Learning speed: training-batch reward averaged over the {len(rows[0]['curve'][names[0]])} iterations, "
        f"mean over {len(seeds)} seeds, 95% t interval",
        "",
        *table(["rung", *names], [[RUNG_NAMES[rung], *interval_cells(v, names)] for rung, v in curves.items()]),
        "",
        "Paired by seed, as above:",
        "",
        *table(
            ["step", *names],
            [
                [step, *interval_cells(v, names, signed=True)]
                for step, v in paired_steps(rows, conflicts, curves=True).items()
            ],
        ),
        "",
        "## Every run: mean +- standard error over the evaluation samples",
        "",
    ]
    body = []
    for row in rows:
        after, stderr = run_metrics(row["after"], conflicts), row["after"]["stderr"]
        cells = [f"{after[m]:.3f}" + (f" +- {stderr[m]:.3f}" if m in stderr else "") for m in metrics]
        body.append([RUNG_NAMES[row["rung"]], str(row["seed"]), *cells, f"{row['seconds']:.0f}"])
    lines += table(["rung", "seed", *metrics, "wall s"], body)
    return "\n".join(lines) + "\n"


def plot_ladder(path: Path, rows: list[dict], conflicts: set[str]) -> None:
    """One panel per metric: each rung's mean over seeds with its 95% interval, the base policy dashed."""
    summary = summarise(rows, conflicts)
    metrics = list(next(iter(summary.values())))
    panels = {m: [summary[rung][m] for rung in summary] for m in metrics}
    plot_intervals(
        path,
        [RUNG_NAMES[rung] for rung in summary],
        panels,
        reference=run_metrics(rows[0]["before"], conflicts),
        reference_label="base policy",
        title="reward after training: mean over seeds, 95% interval",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu_ablation.yaml")
    parser.add_argument("--seeds", default="0,1,2,3", help="comma-separated training seeds")
    parser.add_argument("--rungs", default=",".join(LADDER), help=f"comma-separated subset of {', '.join(LADDER)}")
    parser.add_argument("--runs-dir", default="runs/ablation")
    parser.add_argument("--name", default="cpu_ablation", help="results file suffix")
    parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--from-runs", action="store_true", help="tabulate the finished runs in --runs-dir, train none")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args(argv)
    rungs = args.rungs.split(",")
    unknown = sorted(set(rungs) - set(LADDER))
    if unknown:
        parser.error(f"--rungs has unknown rungs {unknown}; choose from {', '.join(LADDER)}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    runs_dir = Path(args.runs_dir)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        for rung in rungs:
            if args.from_runs:
                rows.append(json.loads((runs_dir / f"{rung}_seed{seed}" / "ladder_row.json").read_text()))
                continue
            rows.append(run_rung(args.config, rung, seed, runs_dir, args.overrides))
            (runs_dir / f"{rung}_seed{seed}" / "ladder_row.json").write_text(json.dumps(rows[-1]) + "\n")
            print(f"{rung} seed {seed}: {rows[-1]['seconds']:.0f} s {rows[-1]['after']['mean']}", flush=True)
    config = load_config(args.config, args.overrides)
    conflicts = set(conflict_prompts(config.task.conflict_fraction))
    command = "python benchmarks/ablation_ladder.py " + " ".join(argv if argv is not None else sys.argv[1:])
    plot = results / f"ablation_{args.name}.png"
    plot_ladder(plot, rows, conflicts)
    (results / f"ablation_{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    markdown = to_markdown(rows, args.config, command.strip(), conflicts, plot.name, threads=config.threads)
    (results / f"ablation_{args.name}.md").write_text(markdown)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
