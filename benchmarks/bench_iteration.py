"""One OmniNFT iteration: the engine (``Trainer.iteration``) against a straightforward loop written here the way
the released training code works, same seeds, same rewards, side by side in one run.

The model is a tiny-width ltx-core LTX-2 at LTX-2's token counts (about 6144 video / 126 audio tokens: the synthetic
task with 63 latent frames of 9 x 11 tokens, 128 video channels), with LTX-2's guidance (video cfg 1.5, audio cfg
3, STG on the last block: three passes per step), Eq 10 capture, a KL reference, rewards, training over K times and
the old-policy blend.

The straightforward loop samples one rollout at a time (batch 1), runs the guidance passes one after another,
re-encodes the prompt for every rollout, records the V2A attention maps of every pass, region block and step through
an attention hook that recomputes them and copies them to the host, decodes and scores each rollout before the next
one, and computes the old and reference predictions inside every training step. The engine samples in micro-batches
with the passes batched, captures only the key mass it needs, scores in a worker thread, and precomputes the old and
reference predictions in large no-grad batches.

    python benchmarks/bench_iteration.py            # CPU; writes benchmarks/results/iteration_cpu.{md,json}
    python benchmarks/bench_iteration.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils import flop_counter

from omninft_fast.train import stages
from omninft_fast.train.config import load_config, times_per_sample
from omninft_fast.train.model import Condition
from omninft_fast.train.sampler import guide, time_grid
from omninft_fast.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
SHAPE = [
    "task.frames=63",
    "task.height=9",
    "task.width=11",
    "task.patch=2",
    "task.video_channels=128",
    "task.audio_channels=8",
    "model.checkpoint=null",
]
METHOD = [
    "sampling.video_cfg=1.5",
    "sampling.audio_cfg=3.0",
    "sampling.stg_scale=1.0",
    "sampling.stg_blocks=[1]",
    "nft.kl_weight=0.01",
    "nft.timesteps_per_sample=2",
]
DEVICE_SIZES = {
    "dry-run": ["sampling.num_steps=3", "prompts_per_iter=2", "group_size=2", "nft.mini_batch=2"],
    "cpu": ["sampling.num_steps=4", "prompts_per_iter=2", "group_size=4", "nft.mini_batch=4", "threads=0"],
    "cuda": ["sampling.num_steps=10", "prompts_per_iter=4", "group_size=8", "nft.mini_batch=8", "autocast=bf16"],
}
ENGINE = {
    "dry-run": ["sampling.batch_size=2", "nft.predict_batch=4"],
    "cpu": ["sampling.batch_size=8", "nft.predict_batch=16"],
    "cuda": ["sampling.batch_size=32", "nft.predict_batch=64"],
}


# PyTorch's FLOP counter knows the CUDA attention kernels but not the CPU flash-attention pair (arguments as shapes).
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, out_shape=None, **__: (
        flop_counter.sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *_, out_shape=None, **__: (
        flop_counter.sdpa_backward_flop_count(g, q, k, v)
    ),
}


def count_flops(run: Callable[[], object]) -> dict[str, float]:
    """FLOPs of one call of ``run`` (PyTorch's FLOP counter: matmuls and attention, forward and backward), split into
    attention (every scaled-dot-product kernel) and the rest (the linear layers and the baseline's explicit maps)."""
    mode = flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with mode:
        run()
    counts = mode.get_flop_counts()["Global"]
    attention = sum(flops for op, flops in counts.items() if "attention" in str(op))
    total = mode.get_total_flops()
    return {"attention": attention, "other": total - attention, "total": total}


class MapHook:
    """The released way of capturing V2A attention: an attention callable that returns SDPA's output and also
    recomputes the ``(B, H, Na, Nv)`` map and copies it to the host, for every pass and step (``maps``)."""

    def __init__(self, layer: int, maps: list[tuple[int, int, int, torch.Tensor]], where: dict[str, int]) -> None:
        self.layer, self.maps, self.where = layer, maps, where

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, nq, width = q.shape
        qh, kh, vh = (x.view(b, -1, heads, width // heads).transpose(1, 2) for x in (q, k, v))
        attn = torch.softmax((qh.float() @ kh.float().transpose(-1, -2)) / math.sqrt(width // heads), dim=-1)
        self.maps.append((self.where["step"], self.where["pass"], self.layer, attn.to("cpu", copy=True)))
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh.to(qh.dtype), vh)
        return out.transpose(1, 2).reshape(b, nq, width)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def baseline_iteration(trainer: Trainer, iteration: int, hooks: dict) -> dict[str, float]:
    """The straightforward loop of one iteration on ``trainer``'s models; ``hooks`` holds the map list and position."""
    cfg, p, task, device = trainer.config, trainer.policies, trainer.task, trainer.device
    start = time.perf_counter()
    picks = torch.randperm(len(trainer.prompts), generator=trainer.generator)[: cfg.prompts_per_iter]
    chosen = [trainer.records[int(i)] for i in picks for _ in range(cfg.group_size)]
    noise_video, noise_audio = stages.draw_noise(task.spec, len(chosen), trainer.generator, device)
    s, rw = cfg.sampling, cfg.reweight
    grid = time_grid(s.num_steps, shift=s.shift, device=device)
    first = s.num_steps - rw.last_steps
    videos, audios, regions, scores = [], [], [], []
    for b, record in enumerate(chosen):
        cond = stages.condition(task, [record.av], device)
        uncond = Condition(*task.unconditional(1)).to(device)
        x_video, x_audio = noise_video[b : b + 1].float(), noise_audio[b : b + 1].float()
        hooks["maps"].clear()
        for step in range(s.num_steps):
            hooks["where"]["step"] = step
            t = grid[step].expand(1)
            with torch.no_grad(), trainer._autocast():
                hooks["where"]["pass"] = 0
                v_cond = p.old(x_video, x_audio, t, cond)
                hooks["where"]["pass"] = 1
                v_uncond = p.old(x_video, x_audio, t, uncond)
                hooks["where"]["pass"] = 2
                v_stg = p.old(x_video, x_audio, t, cond, [list(s.stg_blocks)])
            v_video = guide(v_cond[0].float(), v_uncond[0].float(), v_stg[0].float(), s.video_cfg, s.stg_scale)
            v_audio = guide(v_cond[1].float(), v_uncond[1].float(), v_stg[1].float(), s.audio_cfg, s.stg_scale)
            dt = grid[step + 1] - grid[step]
            x_video, x_audio = x_video + dt * v_video, x_audio + dt * v_audio
        kept = [m for st, ps, layer, m in hooks["maps"] if ps == 0 and st >= first and layer >= rw.boundary]
        regions.append(torch.stack([m.sum(dim=2).mean(dim=1) for m in kept]).mean(dim=0).to(device))
        rollout = stages.Rollout([record.av], x_video, x_audio, None, [record.video], [record.audio])
        scores.append(stages.score(task, trainer.rewards, rollout, [dict(r.outputs) for r in cfg.rewards]))
        videos.append(x_video)
        audios.append(x_audio)
    hooks["bytes"] = max(hooks.get("bytes", 0), sum(m.nbytes for *_, m in hooks["maps"]))
    merged = stages.concat_scores(scores)
    adv = stages.advantages(merged, cfg.prompts_per_iter, cfg.advantage, device)
    weights = stages.token_weights(torch.cat(regions), rw, device)
    _sync(device)
    rollout_seconds = time.perf_counter() - start
    batch = stages.UpdateBatch(
        stages.condition(task, [r.av for r in chosen], device),
        torch.cat(videos),
        torch.cat(audios),
        adv.r_video,
        adv.r_audio,
        weights,
    )
    nft = cfg.nft
    index, times = stages.training_times(len(chosen), trainer.generator, nft, s)
    losses = []
    trainer.policy.train()
    for lo in range(0, len(index), nft.mini_batch):
        part = index[lo : lo + nft.mini_batch].to(device)
        noise = stages.draw_noise(task.spec, len(part), trainer.generator, device)
        t = times[lo : lo + nft.mini_batch].to(device)
        losses.append(stages.nft_backward(p, batch, part, t, noise, nft=nft, autocast=trainer._autocast))
        stages.optimizer_step(p, trainer.optimizer, cfg.optim.grad_clip)
    stages.update_old_policy(p, stages.old_policy_eta(iteration, nft))
    trainer.policy.eval()
    _sync(device)
    total = time.perf_counter() - start
    metrics = {f"reward/{k}/mean": float(v.mean()) for k, v in merged.values.items()}
    for name in ("video", "audio"):
        metrics[f"loss/{name}"] = float(torch.stack([m[name] for m in losses]).mean())
    return metrics | {"time/rollout_and_score": rollout_seconds, "time/iteration": total}


def _trainer(size: str, device: str, out: Path, engine: bool) -> Trainer:
    shape = [] if size == "dry-run" else SHAPE
    overrides = [*shape, *METHOD, *DEVICE_SIZES[size], f"device={device}", f"output_dir={out}", "progress=false"]
    if engine:
        overrides += ENGINE[size]
    with contextlib.redirect_stdout(io.StringIO()):
        return Trainer(load_config(REPO / "configs" / "micro.yaml", overrides))


def compare(device: str, iterations: int = 1, *, warmup: int = 0, dry_run: bool = False, flops: bool = False) -> dict:
    """Both loops for ``warmup + iterations`` iterations each, alternating, from the same seeds and weights; times
    and peaks from the last ``iterations`` (the first pays Triton's compilation and the libraries' start-up on a GPU),
    losses from all (``dry_run``: the micro config's sizes on the CPU). ``flops``: one further, untimed iteration of
    each loop under PyTorch's FLOP counter (``count_flops``), for the arithmetic each loop does."""
    size = "dry-run" if dry_run else device
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        engine = _trainer(size, device, Path(tmp) / "engine", True)
        baseline = _trainer(size, device, Path(tmp) / "base", False)
        hooks: dict = {"maps": [], "where": {"step": 0, "pass": 0}}
        for layer, block in enumerate(baseline.policies.old.model.transformer_blocks):
            block.video_to_audio_attn.attention_function = MapHook(layer, hooks["maps"], hooks["where"])
        rows = {"engine": [], "baseline": []}
        peaks = {"engine": 0, "baseline": 0}
        for it in range(warmup + iterations):
            for name, run in (
                ("engine", lambda it=it: engine.iteration(it)),
                ("baseline", lambda it=it: baseline_iteration(baseline, it, hooks)),
            ):
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    start_bytes = torch.cuda.memory_allocated()
                rows[name].append(run())
                if device == "cuda" and it >= warmup:
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() - start_bytes)
        counted = warmup + iterations
        arithmetic = (
            {
                "engine": count_flops(lambda: engine.iteration(counted)),
                "baseline": count_flops(lambda: baseline_iteration(baseline, counted, hooks)),
            }
            if flops
            else None
        )
        cfg = engine.config
    samples = cfg.prompts_per_iter * cfg.group_size
    spec = engine.task.spec
    out: dict = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "config": (
            f"{samples} samples ({cfg.prompts_per_iter} prompts x {cfg.group_size}), {spec.video_tokens} video / "
            f"{spec.audio_tokens} audio tokens, {cfg.model.num_layers} blocks, {cfg.sampling.num_steps} steps x 3 "
            f"guidance passes, K={times_per_sample(cfg.nft, cfg.sampling)} training times, mini-batch "
            f"{cfg.nft.mini_batch}, KL reference on"
        ),
        "iterations": iterations,
        "warmup_iterations": warmup,
        "load_average_1min": [load_before, os.getloadavg()[0]],
    }
    for name, runs in rows.items():
        seconds = sum(r["time/iteration"] for r in runs[warmup:]) / iterations
        out[name] = {
            "iteration_s": seconds,
            "samples_per_s": samples / seconds,
            "loss_video": [r["loss/video"] for r in runs],
            "loss_audio": [r["loss/audio"] for r in runs],
            "rewards": {k: [r[k] for r in runs] for k in runs[0] if k.startswith("reward/") and k.endswith("/mean")},
            "peak_cuda_bytes": peaks[name] if device == "cuda" else None,
        }
        if arithmetic is not None:
            out[name]["flops"] = arithmetic[name]
            out[name]["achieved_gflops_per_s"] = arithmetic[name]["total"] / seconds / 1e9
    out["engine"]["phases_s"] = {k[5:]: rows["engine"][-1][k] for k in rows["engine"][-1] if k.startswith("time/")}
    out["engine"]["capture_bytes"] = samples * spec.video_tokens * 4
    out["baseline"]["capture_bytes"] = hooks["bytes"]
    out["speedup"] = out["engine"]["samples_per_s"] / out["baseline"]["samples_per_s"]
    first = [
        abs(out["engine"][k][0] - out["baseline"][k][0]) / abs(out["baseline"][k][0])
        for k in ("loss_video", "loss_audio")
    ]
    out["first_iteration_loss_rel_diff"] = max(first)
    if arithmetic is not None:
        out["flops_ratio"] = arithmetic["baseline"]["total"] / arithmetic["engine"]["total"]
    return out


def to_markdown(result: dict) -> str:
    """The comparison as a short Markdown report."""
    e, b = result["engine"], result["baseline"]
    lines = [
        "# One OmniNFT iteration: engine vs straightforward loop",
        "",
        f"Device: {result['device']}, torch {result['torch']}, {time.strftime('%Y-%m-%d')}. {result['config']}. "
        f"{result['iterations']} timed iteration(s) each after {result['warmup_iterations']} untimed, "
        "alternating, same seeds. 1-minute load average "
        f"{result['load_average_1min'][0]:.1f} before, {result['load_average_1min'][1]:.1f} after (other work on the "
        "machine skews the comparison: the batch-1 loop suffers more from shared cores).",
        "",
        "| loop | iteration s | samples/s | capture bytes | peak CUDA bytes | loss video (it 0) | loss audio (it 0) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in (("engine", e), ("straightforward", b)):
        peak = "-" if row["peak_cuda_bytes"] is None else f"{row['peak_cuda_bytes']:,}"
        lines.append(
            f"| {name} | {row['iteration_s']:.2f} | {row['samples_per_s']:.3f} | {row['capture_bytes']:,} | {peak} | "
            f"{row['loss_video'][0]:.6f} | {row['loss_audio'][0]:.6f} |"
        )
    phases = ", ".join(f"{k} {v:.2f}" for k, v in e["phases_s"].items())
    lines += [
        "",
        f"Throughput ratio engine / straightforward: **{result['speedup']:.2f}x**. First-iteration losses differ by "
        f"{result['first_iteration_loss_rel_diff']:.1e} relative (batched vs batch-1 float rounding of the rollouts).",
        f"Engine phases (s, last iteration): {phases}.",
    ]
    if "flops_ratio" in result:
        counts = {name: row["flops"] for name, row in (("engine", e), ("straightforward", b))}
        lines += [
            "",
            "Arithmetic of one iteration (PyTorch's FLOP counter, one further untimed iteration of each loop): "
            + "; ".join(
                f"{name} {c['total'] / 1e9:.1f} GFLOP ({c['attention'] / c['total']:.0%} in attention), "
                f"{row['achieved_gflops_per_s']:.1f} GFLOP/s achieved"
                for (name, c), row in zip(counts.items(), (e, b), strict=True)
            )
            + f". The straightforward loop does **{result['flops_ratio']:.2f}x** the engine's arithmetic: the "
            "throughput ratio where both loops are bound by arithmetic rather than by launches, copies or syncs.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iterations", type=int, default=1, help="timed iterations of each loop")
    parser.add_argument("--warmup", type=int, default=0, help="untimed iterations of each loop first")
    parser.add_argument(
        "--no-flops", dest="flops", action="store_false", help="skip the counted iteration of each loop"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    result = compare(args.device, args.iterations, warmup=args.warmup, flops=args.flops)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"iteration_{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"iteration_{args.device}.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
