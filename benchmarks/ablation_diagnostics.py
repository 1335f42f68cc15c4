"""What the ablation task gives each of OmniNFT's mechanisms to work on, measured on a base policy and on trained
ones (``--runs``, e.g. the ladder's runs), over every prompt x ``group_size`` samples of the config:

- routing: the share of samples whose video and audio group advantages (Eq 6, before routing) have opposite signs
  (Fig 2a) and the mean within-prompt Pearson correlation of the colour and pitch rewards, on the conflicting
  prompts (``task.conflict_fraction``) and on the others;
- reweighting: the mean share of each frame's Eq 10 score (V2A key mass, deep blocks, last steps) that falls on the
  beacon's token (a uniform score gives ``1 / (H W)``), and how often the beacon's token scores highest in its frame.

Writes ``benchmarks/results/ablation_<name>_diagnostics.{json,md}``.

    python benchmarks/ablation_diagnostics.py --config configs/cpu_ablation.yaml --runs runs/ablation/full_seed0
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from omninft_fast.generate import load_policy, resolve_config
from omninft_fast.task.synthetic import all_prompts, beacon_path, conflict_prompts
from omninft_fast.train.builders import build_rewards
from omninft_fast.train.stages import advantages, rollout, score


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``(P, G)`` ``a`` and ``b`` (0 where either row is constant)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    denom = (a.square().sum(dim=1) * b.square().sum(dim=1)).sqrt()
    return torch.where(denom > 0, (a * b).sum(dim=1) / denom.clamp_min(1e-12), torch.zeros_like(denom))


def diagnose(
    config_path: str, run: str | None, *, seed: int = 0, overrides: list[str] | None = None
) -> dict[str, float]:
    """The measures above for the base policy (``run=None``) or a training run's final policy (``overrides``:
    ``key=value`` config overrides)."""
    config = resolve_config(config_path, run, overrides or [])
    loaded = load_policy(config, run)
    model, spec = loaded.model, loaded.task.spec
    handle = model.patch(region_layers=list(range(config.reweight.boundary, model.num_layers)))
    rewards = build_rewards(config)
    prompts, group = all_prompts(), config.group_size
    generator = torch.Generator().manual_seed(seed)
    values: dict[str, list[torch.Tensor]] = {"colour": [], "pitch": [], "opposite": [], "scores": []}
    with torch.no_grad():
        for lo in range(0, len(prompts), config.prompts_per_iter):
            part = prompts[lo : lo + config.prompts_per_iter]
            texts = [p for p in part for _ in range(group)]
            samples = rollout(
                model,
                loaded.task,
                texts,
                generator,
                sampling=config.sampling,
                device=loaded.device,
                handle=handle,
                last_steps=config.reweight.last_steps,
            )
            scores = score(loaded.task, rewards, samples)
            adv = advantages(scores, len(part), config.advantage, loaded.device)
            values["colour"].append(scores.values["colour"].view(len(part), group))
            values["pitch"].append(scores.values["pitch"].view(len(part), group))
            values["opposite"].append((adv.video * adv.audio < 0).float().view(len(part), group).cpu())
            values["scores"].append(samples.region_scores.float().cpu())
    colour, pitch = torch.cat(values["colour"]), torch.cat(values["pitch"])
    opposite, correlation = torch.cat(values["opposite"]).mean(dim=1), _correlation(colour, pitch)
    conflicts = torch.tensor([p in set(conflict_prompts(spec.conflict_fraction)) for p in prompts])
    result = {}
    for name, picks in (("conflict", conflicts), ("other", ~conflicts)):
        if picks.any():
            result[f"opposite share ({name})"] = float(opposite[picks].mean())
            result[f"colour-pitch corr ({name})"] = float(correlation[picks].mean())
    if spec.beacon:
        frames = torch.cat(values["scores"]).view(-1, spec.frames, spec.height * spec.width)
        share = frames / frames.sum(dim=-1, keepdim=True)
        path = beacon_path(spec.frames, spec.height, spec.width)
        index = torch.tensor([i * spec.width + j for i, j in path])
        on_beacon = share.gather(2, index.view(1, -1, 1).expand(share.shape[0], -1, 1)).squeeze(-1)
        result["beacon share of Eq 10 score"] = float(on_beacon.mean())
        result["beacon is top token"] = float((share.argmax(dim=-1) == index).float().mean())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu_ablation.yaml")
    parser.add_argument("--runs", nargs="*", default=[], help="training runs' output_dirs (the base policy always)")
    parser.add_argument("--name", default="cpu_ablation", help="results file suffix")
    parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ablation_ladder import cpu_name, table

    rows = {"base policy": diagnose(args.config, None, seed=args.seed)}
    for run in args.runs:
        rows[Path(run).name] = diagnose(args.config, run, seed=args.seed)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"ablation_{args.name}_diagnostics.json").write_text(json.dumps(rows, indent=2) + "\n")
    columns = list(rows["base policy"])
    command = "python benchmarks/ablation_diagnostics.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# What the ablation task gives each mechanism, on `{args.config}`",
        "",
        f"Command: `{command.strip()}`; {platform.machine()} {cpu_name()}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. Every prompt x group_size samples, sampling seed {args.seed}.",
        "",
        *table(["policy", *columns], [[name, *(f"{row[c]:.3f}" for c in columns)] for name, row in rows.items()]),
    ]
    by_rung: dict[str, list[dict[str, float]]] = {}
    for name, row in rows.items():
        if "_seed" in name:
            by_rung.setdefault(name.split("_seed")[0], []).append(row)
    if by_rung:
        lines += ["", "Mean over seeds per rung:", "", "| rung | " + " | ".join(columns) + " |"]
        lines.append("|---|" + "---|" * len(columns))
        for rung, group in by_rung.items():
            cells = " | ".join(f"{statistics.fmean(r[c] for r in group):.3f}" for c in columns)
            lines.append(f"| {rung} ({len(group)} seeds) | {cells} |")
    (results / f"ablation_{args.name}_diagnostics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
