"""Benchmark of the fused NFT loss (forward + backward, as a training step runs it).

CPU (``main``): the eager PyTorch reference vs the C++ extension at velocity sizes from the LTX-2 audio stream up to
1 GiB per tensor, each with a ``clone()`` of the same bytes measured in the same run. Achieved bandwidth counts the
bytes the fused op must move (``v_theta``, ``v_old``, ``target`` read once, the gradient written once: 4x the
tensor) and is reported as a fraction of the clone's (2x the tensor). CUDA (``gpu_comparison``, run by
``benchmarks/gpu_check.py``): Triton vs eager vs ``torch.compile`` of the reference vs a device copy.

Usage: ``python benchmarks/bench_nft_loss.py [--max-mib 1024] [--repeats 5]``; writes
``benchmarks/results/nft_loss_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timing import device_ms

from omninft_fast.ops.nft_loss import nft_loss_reference

RESULTS = Path(__file__).resolve().parent / "results"
CHANNELS = 128
# (label, tokens) at B=1: LTX-2's audio and video streams of a 121-frame 768x512 clip, then powers of two in MiB.
LTX2_CASES = [("ltx2 audio 126x128", 126), ("ltx2 video 6144x128", 6144)]
MIB_CASES = [1, 4, 16, 64, 256, 1024]
# Full-size buffers the eager reference step allocates beyond its inputs at its peak (measured: about 6).
EAGER_EXTRA_BUFFERS = 7


def _best(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def _step(impl: Callable, theta: torch.Tensor, args: tuple, options: dict) -> Callable[[], None]:
    def run() -> None:
        theta.grad = None
        impl(theta, *args, **options).backward()

    return run


def _inputs(tokens: int, device: str) -> tuple[torch.Tensor, tuple, dict]:
    """``v_theta`` and the other arguments of an ``nft_loss`` backend: ``(v_old, target, r)`` and the options."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, tokens, CHANNELS)
    theta = torch.randn(shape, generator=g, device=device).requires_grad_()
    old, target = (torch.randn(shape, generator=g, device=device) for _ in range(2))
    r = torch.rand(1, generator=g, device=device)
    token_weight = torch.rand(1, tokens, generator=g, device=device) + 0.5
    options = {"token_weight": token_weight, "sample_weight": None, "v_ref": None, "x0_norm_t": None, "kl_t": None}
    return theta, (old, target, r), options | {"beta": 1.0, "policy_scale": 1.0, "kl_weight": 0.0}


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def _cases(max_mib: int) -> list[tuple[str, int]]:
    cases = list(LTX2_CASES)
    cases += [(f"{mib} MiB", mib * 2**20 // (4 * CHANNELS)) for mib in MIB_CASES if mib <= max_mib]
    return sorted(cases, key=lambda case: case[1])


def _cpu_case(label: str, tokens: int, repeats: int, threads: int) -> dict:
    from omninft_fast import _C
    from omninft_fast.ops.nft_loss_cpp import nft_loss_cpp

    theta, args, options = _inputs(tokens, "cpu")
    nbytes = theta.numel() * theta.element_size()
    reps = 10 * repeats if nbytes <= 2**24 else repeats if nbytes < 2**30 else max(1, repeats - 1)
    x, (old, target, r) = theta.detach(), args
    beta, token_weight = options["beta"], options["token_weight"]
    grad, dst = torch.empty_like(x), torch.empty_like(x)
    times = {
        "clone": _best(x.clone, reps),
        "copy": _best(lambda: dst.copy_(x), reps),
        "cpp": _best(_step(nft_loss_cpp, theta, args, options), reps),
        "cpp_kernel": _best(
            lambda: _C.nft_loss_forward_out(
                grad, x, old, target, r, token_weight, None, None, None, None, beta, 1.0, 0.0
            ),
            reps,
        ),
    }
    if EAGER_EXTRA_BUFFERS * nbytes < 0.8 * _available_bytes():
        times["eager"] = _best(_step(nft_loss_reference, theta, args, options), reps)
    return {
        "case": label,
        "threads": threads,
        "shape": [1, tokens, CHANNELS],
        "mib_per_tensor": nbytes / 2**20,
        **{f"{name}_ms": t * 1e3 for name, t in times.items()},
        "speedup_vs_eager": times["eager"] / times["cpp"] if "eager" in times else None,
        "cpp_gb_per_s": 4 * nbytes / times["cpp"] / 1e9,
        "fraction_of_clone_bandwidth": (4 * nbytes / times["cpp"]) / (2 * nbytes / times["clone"]),
        "kernel_fraction_of_copy_bandwidth": (4 * nbytes / times["cpp_kernel"]) / (2 * nbytes / times["copy"]),
    }


def bench_cpu(max_mib: int, repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for label, tokens in _cases(max_mib):
        rows.append(_cpu_case(label, tokens, repeats, threads))
        print(_format_row(rows[-1]), flush=True)
    return rows


# (label, shape, dtype) of the GPU comparison: LTX-2's streams (5 s 768x512 audio and video, B = 1 and 4; 5 s
# 1280x704 video), then fp32 tensors of 16 MiB to 1 GiB, and bf16 at the large sizes.
GPU_CASES = [
    ("ltx2 audio B=1", (1, 126, CHANNELS), torch.float32),
    ("ltx2 video B=1", (1, 6144, CHANNELS), torch.float32),
    ("ltx2 video B=4", (4, 6144, CHANNELS), torch.float32),
    ("ltx2 video 1280x704 B=4", (4, 14080, CHANNELS), torch.float32),
    ("ltx2 video B=4 bf16", (4, 6144, CHANNELS), torch.bfloat16),
    *((f"{mib} MiB", (1, mib * 2**20 // (4 * CHANNELS), CHANNELS), torch.float32) for mib in (16, 64, 256, 1024)),
    ("256 MiB-of-fp32 in bf16", (1, 2**28 // (4 * CHANNELS), CHANNELS), torch.bfloat16),
]
DRY_RUN_CASES = [("tiny", (2, 50, CHANNELS), torch.float32), ("ltx2 audio B=1", (1, 126, CHANNELS), torch.float32)]


def gpu_comparison(dry_run: bool = False, copy_bytes_per_s: float | None = None) -> list[dict]:
    """Fused NFT loss step (forward + backward, fresh gradient) through ``omninft_fast.nft_loss``: Triton vs the
    eager reference vs ``torch.compile`` of the reference vs a device copy of the same bytes, all timed in one run.
    The fused step must read ``v_theta``, ``v_old``, ``target`` once and write the gradient once (4x the tensor);
    its bandwidth is quoted against the copy of this run and the environment's measured copy bandwidth."""
    import functools

    import omninft_fast

    device = "cpu" if dry_run else "cuda"
    impls = {
        "triton": functools.partial(omninft_fast.nft_loss, backend="triton"),
        "eager": functools.partial(omninft_fast.nft_loss, backend="reference"),
    }
    if not dry_run:
        impls["compile"] = torch.compile(functools.partial(omninft_fast.nft_loss, backend="reference"), dynamic=True)
    rows = []
    for label, shape, dtype in DRY_RUN_CASES if dry_run else GPU_CASES:
        g = torch.Generator(device=device).manual_seed(0)
        theta = torch.randn(shape, generator=g, device=device).to(dtype).requires_grad_()
        old, target = (torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(2))
        r = torch.rand(shape[0], generator=g, device=device)
        weight = torch.rand(shape[:2], generator=g, device=device) + 0.5
        nbytes = theta.numel() * theta.element_size()
        dst = torch.empty_like(theta)
        times = {"copy": device_ms(lambda dst=dst, theta=theta: dst.copy_(theta), dry_run)}
        for name, impl in impls.items():

            def step(impl=impl, theta=theta, old=old, target=target, r=r, weight=weight) -> None:
                theta.grad = None
                impl(theta, old, target, r, beta=1.0, token_weight=weight).backward()

            times[name] = device_ms(step, dry_run)
        row = {"case": label, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "MiB": nbytes / 2**20}
        row |= {f"{name}_ms": ms for name, ms in times.items()}
        fused_bw = 4 * nbytes / (times["triton"] * 1e-3)
        row["triton_TB/s"] = fused_bw / 1e12
        row["fraction_of_copy_here"] = fused_bw / (2 * nbytes / (times["copy"] * 1e-3))
        if copy_bytes_per_s:
            row["fraction_of_peak_copy"] = fused_bw / copy_bytes_per_s
        row["speedup_vs_eager"] = times["eager"] / times["triton"]
        if "compile" in times:
            row["speedup_vs_compile"] = times["compile"] / times["triton"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    eager = "skipped (memory)" if row.get("eager_ms") is None else f"{row['eager_ms']:.2f}"
    speedup = "-" if row["speedup_vs_eager"] is None else f"{row['speedup_vs_eager']:.1f}x"
    cells = [
        row["case"],
        row["threads"],
        f"{row['mib_per_tensor']:.2f}",
        eager,
        f"{row['cpp_ms']:.2f}",
        speedup,
        f"{row['clone_ms']:.2f}",
        f"{row['fraction_of_clone_bandwidth']:.0%}",
        f"{row['cpp_kernel_ms']:.2f}",
        f"{row['copy_ms']:.2f}",
        f"{row['kernel_fraction_of_copy_bandwidth']:.0%}",
    ]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _environment() -> dict:
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-mib", type=int, default=1024, help="largest velocity tensor, MiB")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case (best is kept)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to run")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = _environment()
    header = (
        "| case (B=1, 128 ch) | threads | MiB/tensor | eager ms | C++ ms | speedup | clone ms | vs clone BW "
        "| C++ kernel ms | copy_ ms | kernel vs copy_ BW |\n" + "|---" * 11 + "|"
    )
    print(header, flush=True)
    rows = [row for threads in args.threads for row in bench_cpu(args.max_mib, args.repeats, threads)]
    env["load_average_at_end"] = os.getloadavg()
    (RESULTS / "nft_loss_cpu.json").write_text(json.dumps({"env": env, "note": args.note, "rows": rows}, indent=2))
    lines = [
        "# NFT loss on CPU: eager reference vs C++ extension (forward + backward)",
        "",
        f"`python benchmarks/bench_nft_loss.py --max-mib {args.max_mib} --repeats {args.repeats} "
        f"--threads {' '.join(map(str, args.threads))}`, {env['cpu_count']} cores, torch {env['torch']}, "
        f"load average {env['load_average_at_start'][0]:.1f} at start and "
        f"{env['load_average_at_end'][0]:.1f} at the end, {env['time_utc']}. {args.note}",
        "",
        "Best of the repeats. *eager* and *C++* time a training step (forward + backward, fresh gradient) of the "
        "reference and of the C++ extension; *vs clone BW* is the step's bandwidth (3 reads and 1 write of the "
        "velocity tensor) as a fraction of a `clone()` (1 read, 1 write, fresh memory) of the same tensor in the same "
        "run. *C++ kernel* writes the gradient into a preallocated buffer and is compared with `copy_` into a "
        "preallocated buffer, which excludes page faults of fresh memory from both.",
        "",
        header,
        *(_format_row(row) for row in rows),
        "",
    ]
    (RESULTS / "nft_loss_cpu.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
