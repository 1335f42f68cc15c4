"""``omninft-fast analyze <name>``: the paper's diagnoses (Fig 2, Fig 4) for any policy and prompt set, each as a
PNG in the trainer's plotting style plus the numbers behind it (JSON, CSV), through the trainer's stages and the
model interface.

- ``conflicts`` (Fig 2a): per-sample video vs audio group advantages (Eq 6), share with opposite signs.
- ``grad-norms`` (Fig 2c/2e): per-block norms of the gradient that the video-branch NFT loss sends into the audio
  stream's parameters, without and with the Eq 8 surgery.
- ``kv-blocking`` (Fig 2b/2d): reward change when A2V or V2A cross-attention is skipped in a range of blocks.
- ``v2a-maps`` (Fig 4): the Eq 10 key-mass score per video token over the decoded frames (grid PNG and mp4).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from omninft_fast.generate import Loaded, load_policy, read_prompts, resolve_config
from omninft_fast.media import refuse_existing

if TYPE_CHECKING:
    from omninft_fast.rewards import RewardModel
    from omninft_fast.train.stages import Rollout, Scores


def _prompts(loaded: Loaded, path: str | None) -> list[str]:
    from omninft_fast.train.builders import load_prompts

    return [p for _, p in read_prompts(path)] if path else load_prompts(loaded.config)


def _sample_groups(
    loaded: Loaded, prompts: list[str], seed: int, *, handle: Any = None, rewards: list[RewardModel] | None = None
) -> list[tuple[Rollout, Scores, int]]:
    """``group_size`` samples of every prompt, ``prompts_per_iter`` prompts a batch: ``(rollout, scores, groups)``
    (``rewards``: the config's reward plugins, built here when not given)."""
    from omninft_fast.train.builders import build_rewards
    from omninft_fast.train.stages import rollout, score

    config = loaded.config
    rewards = build_rewards(config) if rewards is None else rewards
    generator = torch.Generator().manual_seed(seed)
    out = []
    for lo in range(0, len(prompts), config.prompts_per_iter):
        part = prompts[lo : lo + config.prompts_per_iter]
        texts = [p for p in part for _ in range(config.group_size)]
        samples = rollout(
            loaded.model,
            loaded.task,
            texts,
            generator,
            sampling=config.sampling,
            device=loaded.device,
            autocast_dtype=loaded.autocast_dtype,
            handle=handle,
            last_steps=config.reweight.last_steps,
        )
        out.append((samples, score(loaded.task, rewards, samples), len(part)))
    return out


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def conflicts(loaded: Loaded, prompts: list[str], out: Path, *, seed: int) -> dict[str, Any]:
    """Fig 2a: each sample's weighted video and audio group advantages (Eq 6, before routing) and the share of
    samples whose two advantages have opposite signs; ``conflicts.{csv,json,png}``."""
    from omninft_fast.train.plotting import new_figure, save_figure
    from omninft_fast.train.stages import advantages

    rows = []
    for samples, scores, groups in _sample_groups(loaded, prompts, seed):
        if not {"video", "audio"} <= set(scores.modality.values()):
            raise ValueError("conflicts needs at least one video reward and one audio reward in the config")
        adv = advantages(scores, groups, loaded.config.advantage, loaded.device)
        for k, text in enumerate(samples.texts):
            rows.append({"prompt": text, "adv_video": float(adv.video[k]), "adv_audio": float(adv.audio[k])})
    product = torch.tensor([r["adv_video"] * r["adv_audio"] for r in rows])
    summary = {
        "samples": len(rows),
        "prompts": len(prompts),
        "group_size": loaded.config.group_size,
        "opposite_share": float((product < 0).float().mean()),
    }
    _write_csv(out / "conflicts.csv", rows)
    _write_json(out / "conflicts.json", summary)
    figure = new_figure()
    axes = figure.add_subplot()
    v, a = [r["adv_video"] for r in rows], [r["adv_audio"] for r in rows]
    axes.scatter(v, a, s=10, c=["#dc322f" if x * y < 0 else "#268bd2" for x, y in zip(v, a, strict=True)])
    axes.axhline(0, color="0.5", linewidth=0.8)
    axes.axvline(0, color="0.5", linewidth=0.8)
    axes.set_xlabel("video advantage")
    axes.set_ylabel("audio advantage")
    axes.set_title(f"opposite signs: {100 * summary['opposite_share']:.1f}% of {len(rows)} samples")
    save_figure(figure, out / "conflicts.png")
    return summary


def _block(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("transformer_blocks") + 1]) if "transformer_blocks" in parts else None


def grad_norms(loaded: Loaded, prompts: list[str], out: Path, *, seed: int) -> dict[str, Any]:
    """Fig 2c/2e: per block, the norm of the gradient of the video-branch NFT loss alone w.r.t. the audio stream's
    parameters (``stream_of == "audio"``), without and with the Eq 8 surgery (the policy's detach schedule switched
    off and on); the same rollout, advantages, times and noise for both. ``grad_norms.{csv,json,png}``."""
    from omninft_fast.train.builders import stream_of
    from omninft_fast.train.plotting import new_figure, save_figure
    from omninft_fast.train.stages import UpdateBatch, advantages, condition, draw_noise, nft_losses, training_times

    config, policies, device = loaded.config, loaded.policies, loaded.device
    handle = None if policies is None else policies.policy_handle
    if handle is None:
        raise ValueError("grad-norms needs surgery.enabled=true (its detach schedule is what it compares)")
    alphas = handle.detach_alphas
    samples, scores, groups = _sample_groups(loaded, prompts[: config.prompts_per_iter], seed)[0]
    adv = advantages(scores, groups, config.advantage, device)
    batch = UpdateBatch(
        condition(loaded.task, samples.texts, device), samples.video, samples.audio, adv.r_video, adv.r_audio, None
    )
    generator = torch.Generator().manual_seed(seed + 1)
    index, times = training_times(len(samples.texts), generator, config.nft, config.sampling)
    noise = draw_noise(loaded.task.spec, len(index), generator, device)

    def autocast() -> Any:
        dtype = loaded.autocast_dtype
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    norms: dict[str, dict[int, float]] = {}
    try:
        for surgery in (False, True):
            handle.set_detach(alphas if surgery else None)
            for p in policies.parameters:
                p.grad = None
            losses = nft_losses(policies, batch, index.to(device), times.to(device), noise, config.nft, autocast)
            losses["video"].backward()
            per_block: dict[int, list[torch.Tensor]] = {}
            for name, param in policies.policy.named_parameters():
                block = _block(name)
                if param.grad is not None and block is not None and stream_of(name) == "audio":
                    per_block.setdefault(block, []).append(param.grad.detach().float().norm())
            norms["with" if surgery else "without"] = {
                b: float(torch.stack(per_block[b]).norm()) if b in per_block else 0.0
                for b in range(policies.policy.num_layers)
            }
    finally:
        handle.set_detach(alphas)
    rows = [
        {"block": b, "without_surgery": norms["without"][b], "with_surgery": norms["with"][b]}
        for b in sorted(norms["without"])
    ]
    summary = {
        "total_without_surgery": float(torch.tensor([r["without_surgery"] for r in rows]).norm()),
        "total_with_surgery": float(torch.tensor([r["with_surgery"] for r in rows]).norm()),
        "blocks": len(rows),
    }
    _write_csv(out / "grad_norms.csv", rows)
    _write_json(out / "grad_norms.json", {**summary, "per_block": rows})
    figure = new_figure()
    axes = figure.add_subplot()
    blocks = torch.arange(len(rows)).float()
    axes.bar(blocks - 0.2, [r["without_surgery"] for r in rows], width=0.4, label="without surgery")
    axes.bar(blocks + 0.2, [r["with_surgery"] for r in rows], width=0.4, label="with surgery (Eq 8)")
    axes.set_xlabel("block")
    axes.set_ylabel("|grad| of the video loss in audio params")
    axes.set_title("gradient the video branch sends into the audio stream")
    axes.legend(loc="best")
    save_figure(figure, out / "grad_norms.png")
    return summary


def block_ranges(layers: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` (at most ``layers``) contiguous ``[lo, hi)`` block ranges covering ``0..layers``."""
    parts = max(1, min(parts, layers))
    edges = [round(k * layers / parts) for k in range(parts + 1)]
    return list(itertools.pairwise(edges))


def kv_blocking(loaded: Loaded, prompts: list[str], out: Path, *, seed: int, parts: int) -> dict[str, Any]:
    """Fig 2b/2d: each reward's mean change (against no skip, same noise) when the A2V or the V2A cross-attention
    of a block range is skipped; ``kv_blocking.{csv,json,png}``."""
    from omninft_fast.train.builders import build_rewards
    from omninft_fast.train.plotting import new_figure, save_figure

    rewards = build_rewards(loaded.config)

    def means() -> dict[str, float]:
        merged: dict[str, list[torch.Tensor]] = {}
        for _, scores, _ in _sample_groups(loaded, prompts, seed, rewards=rewards):
            for key, value in scores.values.items():
                merged.setdefault(key, []).append(value)
        return {key: float(torch.cat(v).mean()) for key, v in merged.items()}

    model = loaded.model
    base = means()
    rows = []
    for lo, hi in block_ranges(model.num_layers, parts):
        for kind in ("a2v", "v2a"):
            with model.skip_cross_attention(**{kind: list(range(lo, hi))}):
                skipped = means()
            for key, value in skipped.items():
                rows.append({"skip": kind, "blocks": f"{lo}-{hi - 1}", "reward": key, "change": value - base[key]})
    _write_csv(out / "kv_blocking.csv", rows)
    summary = {"baseline": base, "changes": rows}
    _write_json(out / "kv_blocking.json", summary)
    figure = new_figure()
    ranges = sorted({r["blocks"] for r in rows}, key=lambda s: int(s.split("-")[0]))
    for k, kind in enumerate(("a2v", "v2a")):
        axes = figure.add_subplot(1, 2, k + 1)
        for j, key in enumerate(base):
            values = [
                next(r["change"] for r in rows if (r["skip"], r["blocks"], r["reward"]) == (kind, b, key))
                for b in ranges
            ]
            width = 0.8 / len(base)
            axes.bar(
                [i + (j - (len(base) - 1) / 2) * width for i in range(len(ranges))], values, width=width, label=key
            )
        axes.set_xticks(range(len(ranges)), ranges)
        axes.set_xlabel(f"blocks with {kind.upper()} skipped")
        axes.set_ylabel("reward change")
        axes.set_title(f"skip {kind.upper()}")
    axes.legend(loc="best")
    save_figure(figure, out / "kv_blocking.png")
    return summary


def latent_grid(positions: torch.Tensor) -> tuple[int, int, int]:
    """``(F, H, W)`` of the video latent from ``(1, 3, Nv, 2)`` token bounds (distinct starts per axis)."""
    sizes = tuple(int(positions[0, axis, :, 0].unique().numel()) for axis in range(3))
    if sizes[0] * sizes[1] * sizes[2] != positions.shape[2]:
        raise ValueError(f"video tokens {positions.shape[2]} are not a full {sizes} grid")
    return sizes


def v2a_maps(loaded: Loaded, prompts: list[str], out: Path, *, seed: int, samples: int) -> dict[str, Any]:
    """Fig 4: the Eq 10 score of each video token (V2A key mass, deep blocks, last steps) captured while sampling,
    as a heatmap over each decoded frame: ``v2a_maps.png`` (a row of frames per sample), ``v2a_<k>.mp4``,
    ``v2a_maps.json``."""
    from matplotlib import colormaps

    from omninft_fast.media import write_mp4
    from omninft_fast.train.plotting import new_figure, save_figure

    config, model = loaded.config, loaded.model
    handle = model.patch(region_layers=list(range(config.reweight.boundary, model.num_layers)))
    samples_, _, _ = _sample_groups(loaded, prompts[:1], seed, handle=handle)[0]
    count = min(samples, len(samples_.texts))
    frames, waveforms = loaded.task.decode(samples_.video[:count], samples_.audio[:count])
    grid = latent_grid(model.video_positions)
    scores = samples_.region_scores[:count].float().view(count, *grid)
    lo, hi = scores.amin(dim=(1, 2, 3), keepdim=True), scores.amax(dim=(1, 2, 3), keepdim=True)
    heat = (scores - lo) / (hi - lo).clamp_min(1e-12)
    steps, height, width = frames.shape[1], frames.shape[3], frames.shape[4]
    latent_of = [min(grid[0] - 1, i * grid[0] // steps) for i in range(steps)]
    maps = torch.nn.functional.interpolate(heat[:, latent_of], size=(height, width), mode="nearest")
    colour = torch.from_numpy(colormaps["inferno"](maps.numpy())[..., :3]).permute(0, 1, 4, 2, 3).float()
    overlay = 0.5 * frames.cpu().float() + 0.5 * colour
    figure = new_figure()
    figure.set_size_inches(1.2 * steps, 1.3 * count)
    for k in range(count):
        for i in range(steps):
            axes = figure.add_subplot(count, steps, k * steps + i + 1)
            axes.imshow(overlay[k, i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            axes.set_axis_off()
            axes.set_title(f"#{k} frame {i}", fontsize=6)
    save_figure(figure, out / "v2a_maps.png")
    spec = loaded.task.spec
    for k in range(count):
        write_mp4(out / f"v2a_{k}.mp4", overlay[k], spec.fps, waveforms[k], spec.sample_rate)
    summary = {
        "prompt": samples_.texts[0],
        "latent_grid": list(grid),
        "region_blocks": list(handle.region_layers),
        "scores": scores.tolist(),
    }
    _write_json(out / "v2a_maps.json", summary)
    return {"prompt": summary["prompt"], "samples": count}


ANALYSES = ("conflicts", "grad-norms", "kv-blocking", "v2a-maps")
OUTPUTS = {
    "conflicts": ["conflicts.csv", "conflicts.json", "conflicts.png"],
    "grad-norms": ["grad_norms.csv", "grad_norms.json", "grad_norms.png"],
    "kv-blocking": ["kv_blocking.csv", "kv_blocking.json", "kv_blocking.png"],
    "v2a-maps": ["v2a_maps.png", "v2a_maps.json"],
}


def _run(args: argparse.Namespace) -> int:
    for name, value in (("--samples", args.samples), ("--ranges", args.ranges)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    surgery = ["surgery.enabled=true"] if args.name == "grad-norms" else []
    config = resolve_config(args.config, args.run, [*args.overrides, *surgery])
    out = Path(args.out)
    videos = [f"v2a_{k}.mp4" for k in range(min(args.samples, config.group_size))] if args.name == "v2a-maps" else []
    refuse_existing(out, [*OUTPUTS[args.name], *videos])

    loaded = load_policy(config, args.run, training=args.name == "grad-norms")
    prompts = _prompts(loaded, args.prompts)
    out.mkdir(parents=True, exist_ok=True)
    if args.name == "conflicts":
        summary = conflicts(loaded, prompts, out, seed=args.seed)
    elif args.name == "grad-norms":
        summary = grad_norms(loaded, prompts, out, seed=args.seed)
    elif args.name == "kv-blocking":
        summary = kv_blocking(loaded, prompts, out, seed=args.seed, parts=args.ranges)
    else:
        summary = v2a_maps(loaded, prompts, out, seed=args.seed, samples=args.samples)
    brief = {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
    print(f"analyze {args.name}: {json.dumps(brief)}; wrote {out}")
    return 0


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``analyze`` on the CLI's subcommands."""
    parser = commands.add_parser(
        "analyze", parents=[common], help="the paper's analyses (Fig 2a-e, Fig 4) as PNG + JSON/CSV for a policy"
    )
    parser.add_argument("name", choices=ANALYSES)
    parser.add_argument("--config", default=None, help="YAML config (default: the run's config.yaml, else built-in)")
    parser.add_argument("--out", required=True, help="output folder (files already there are never overwritten)")
    parser.add_argument("--run", default=None, help="a training run's output_dir (default: the base policy)")
    parser.add_argument("--prompts", default=None, help=".jsonl or .txt prompts (default: the config's prompts)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--ranges", type=int, default=4, help="kv-blocking: number of block ranges")
    parser.add_argument("--samples", type=int, default=2, help="v2a-maps: samples of the first prompt to show")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.set_defaults(func=_run)
