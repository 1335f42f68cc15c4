"""Distributed training: iteration time and per-rank memory of the trainer at 1 and 2 ranks, FSDP2 and DeepSpeed
ZeRO-3 against one process without an engine.

Every run is the trainer itself (``python -m omninft_fast train``; two ranks under ``torchrun``, gloo on CPU) on
the micro config's synthetic task with a wider, deeper model (``WORKLOAD``), ``--iterations`` iterations. Reported
per run: the median of ``time/iteration`` over the iterations after the first, the parameter and optimiser bytes
rank 0 holds (``memory/param_optim_bytes``, read from the engine's own state) and the peak RSS of the largest
process. On this 2-core machine two ranks share the cores another process would have alone (one thread each), so
the times show the shape of the scaling, not a speed-up.

``engine_overhead`` is the GPU check's ``distributed`` section: the same iteration with world size 1 through each
engine against no engine (target: at most 5% slower).

Usage: ``python benchmarks/bench_distributed.py [--iterations 6] [--threads 1]``; writes
``benchmarks/results/distributed_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
MICRO = REPO / "configs" / "micro.yaml"
WORKLOAD = [
    "model.num_layers=4",
    "model.video_heads=4",
    "model.video_head_dim=16",
    "model.audio_heads=4",
    "model.audio_head_dim=8",
    "task.text_dim_video=64",
    "task.text_dim_audio=32",
    "prompts_per_iter=4",
    "group_size=4",
    "nft.mini_batch=8",
    "sampling.num_steps=4",
    "eval.samples_per_prompt=1",
    "eval.write_samples=0",
]
GPU_WORKLOAD = [
    "model.num_layers=8",
    "model.video_heads=16",
    "model.video_head_dim=64",
    "model.audio_heads=8",
    "model.audio_head_dim=64",
    "task.text_dim_video=1024",
    "task.text_dim_audio=512",
    "prompts_per_iter=4",
    "group_size=8",
    "nft.mini_batch=16",
    "sampling.num_steps=8",
    "eval.samples_per_prompt=1",
    "eval.write_samples=0",
]
RUNS = [("none", 1), ("fsdp2", 1), ("fsdp2", 2), ("deepspeed", 1), ("deepspeed", 2)]


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def launch(backend: str, ranks: int, out: Path, overrides: list[str], threads: int) -> dict:
    """Train ``backend`` on ``ranks`` processes into ``out``; the run's timing and memory (see the module doc)."""
    train = ["-m", "omninft_fast", "train", "--config", str(MICRO), f"output_dir={out}", "progress=false"]
    train += [f"distributed.backend={backend}", f"threads={threads}", *overrides]
    if ranks > 1:
        train = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={_port()}", *train]
    # A child launches the run, so RUSAGE_CHILDREN's peak RSS is this run's largest process.
    wrapper = (
        "import resource, subprocess, sys; "
        f"code = subprocess.run([sys.executable, *{train!r}], stdout=subprocess.DEVNULL).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
    )
    # ``threads=0`` keeps torch's own thread count (OpenMP refuses OMP_NUM_THREADS=0).
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads > 0 else {})}
    done = subprocess.run(
        [sys.executable, "-c", wrapper], cwd=out.parent, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"{backend} x{ranks} failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [line["time/iteration"] for line in lines]
    return {
        "backend": backend,
        "ranks": ranks,
        "iteration_s": statistics.median(times[1:] if len(times) > 1 else times),
        "all_iteration_s": times,
        "param_optim_bytes": lines[-1]["memory/param_optim_bytes"],
        "peak_rss_mib": int(done.stdout.split()[-1]) / 1024,
    }


def engine_overhead(dry_run: bool) -> dict:
    """World size 1 through FSDP2 and DeepSpeed ZeRO-3 against no engine, same iterations (CUDA; CPU on a dry
    run); DeepSpeed is skipped where it is not installed."""
    device = "cpu" if dry_run else "cuda"
    overrides = [f"device={device}", f"iterations={2 if dry_run else 6}", *(WORKLOAD if dry_run else GPU_WORKLOAD)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("none", "fsdp2", "deepspeed"):
            if backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
                rows.append({"backend": backend, "note": "deepspeed not installed"})
                continue
            rows.append(launch(backend, 1, Path(tmp) / backend, overrides, threads=0 if not dry_run else 1))
    base = rows[0]["iteration_s"]
    for row in rows:
        if "iteration_s" in row:
            row["overhead_vs_none"] = row["iteration_s"] / base - 1
            row["within_5_percent"] = row["overhead_vs_none"] <= 0.05
    return {"device": device, "rows": rows}


def _machine() -> str:
    return f"{os.cpu_count()}-core CPU ({platform.machine()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend, ranks in RUNS:
            out = Path(tmp) / f"{backend}-{ranks}"
            rows.append(launch(backend, ranks, out, [f"iterations={args.iterations}", *WORKLOAD], args.threads))
            print(rows[-1])
    load_after = os.getloadavg()[0]
    base = rows[0]
    for row in rows:
        row["time_vs_none"] = row["iteration_s"] / base["iteration_s"]
        row["bytes_vs_none"] = row["param_optim_bytes"] / base["param_optim_bytes"]
    same_engine = {(r["backend"], r["ranks"]): r for r in rows}
    command = f"python benchmarks/bench_distributed.py --iterations {args.iterations} --threads {args.threads}"
    meta = {
        "machine": _machine(),
        "command": command,
        "torch": __import__("torch").__version__,
        "workload": WORKLOAD,
        "load_before": load,
        "load_after": load_after,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Distributed training at 1 and 2 ranks ({meta['machine']})",
        "",
        f"`{command}`; torch {meta['torch']}; the micro config with {' '.join(WORKLOAD)}; {args.threads} thread(s) "
        f"per rank; gloo; 1-minute load average {load:.1f} before, {load_after:.1f} after (the machine is shared).",
        "",
        "| engine | ranks | median iteration (s) | iterations (s) | vs none | param + optimiser bytes (rank 0) "
        "| vs none | vs the engine on 1 rank | peak RSS, largest process (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        alone = same_engine[(row["backend"], 1)]["param_optim_bytes"]
        lines.append(
            f"| {row['backend']} | {row['ranks']} | {row['iteration_s']:.3f} | "
            f"{', '.join(f'{t:.2f}' for t in row['all_iteration_s'])} | {row['time_vs_none']:.2f}x | "
            f"{int(row['param_optim_bytes'])} | {row['bytes_vs_none']:.3f} | {row['param_optim_bytes'] / alone:.3f} | "
            f"{row['peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        "Bytes are what rank 0 holds of the trained model's parameters and the optimiser state. DeepSpeed keeps a "
        "compute partition beside its fp32 master partition, so in fp32 its one-rank state is 4/3 of the engine-less "
        "one; two ranks halve each engine's own. Two ranks on two shared cores are slower per iteration than one: "
        "the numbers show the scaling's shape (each rank samples and trains on half of the batch, plus the "
        "collectives), not a speed-up.",
    ]
    (RESULTS / "distributed_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
