"""The one-shot GPU check: every kernel test and benchmark on one H100/H200 in a few minutes, as markdown + JSON.

Sections, each run in its own child process with its own time limit (a failing or hanging section records its error
and the others still run; a CUDA fault cannot poison the rest):

1. ``environment``: GPU, SM count, driver, library versions, and the two ceilings every ratio is quoted against:
   device-to-device copy bandwidth (bytes read + written) and bf16 GEMM TFLOP/s, both measured.
2. ``tests``: the CUDA tests (``tests/test_cuda.py``, the FP8 quantisation kernel and FP8 layers on CUDA tensors, the
   Triton attention tests on CUDA tensors, the sm_90a compile check) through pytest, as a pass/fail table
   (``--tests`` picks files or node ids).
3. ``attention``: A2V (with ``kv_grad_scale``) and V2A cross-attention at LTX-2 shapes against SDPA (flash and
   efficient backends) and flash-attn where installed: fwd, bwd, fwd+bwd; V2A forward + key mass against SDPA plus
   a materialised-map column sum, with its extra memory.
4. ``nft_loss``: the fused NFT loss (forward + backward) against a device copy, eager and ``torch.compile`` of the
   reference.
5. ``ltx2_block``: one LTX-2 block at the 19B model's widths, forward + backward, patched vs unpatched.
6. ``omninft_step``: one OmniNFT step of a reduced-depth 19B-width LTX-2, engine vs straightforward.
7. ``tiles``: a sweep of attention tile configurations at LTX-2 shapes (correctness against SDPA and time), the
   data for the tuned tile table.
8. ``block_profile``: ``torch.profiler`` of the LTX-2 block, unpatched vs patched: top kernels, device time and
   host-device synchronisations per step.
9. ``fp8``: the 19B-width block in bf16 vs ``omninft_fast.fp8`` (rowwise, tensorwise, PyTorch's quantisation) at
   batch 1 and 4: fwd+bwd, rollout forward and its host issue time; the quantisation kernel alone.
10. ``fp8_compiled``: the same block under ``torch.compile`` (inductor) at batch 4, bf16 and FP8 rowwise and
    tensorwise, trained and with frozen linears (LoRA's base), against the eager and the compiled bf16 block (the
    compiler fuses FP8's quantisation into its producers), with the top kernels of each compiled fwd+bwd.
11. ``fp8_profile``: ``torch.profiler`` of the block's rollout forward, bf16 vs FP8 rowwise and tensorwise.
12. ``iteration``: one whole OmniNFT iteration of a tiny-width LTX-2 at LTX-2's token counts, engine vs a
    straightforward loop written the released code's way (``bench_iteration.py``): samples/s, peak memory, losses.
13. ``distributed``: training iterations with world size 1 through FSDP2 and DeepSpeed ZeRO-3 against no engine
    (target: at most 5% slower; ``bench_distributed.py``).

By default a run measures ``DEFAULT_SECTIONS`` (what no run has measured since it changed); ``--sections all`` runs
all 13.
``--dry-run`` runs the sections at tiny shapes on the CPU (Triton through its interpreter), so CI proves the script
works. Usage: ``bash scripts/gpu_check.sh [OUT_DIR]`` on the GPU machine, or
``python benchmarks/gpu_check.py --out DIR [--dry-run] [--sections a,b|all] [--budget-s 540] [--tests f,g]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from timing import device_ms

REPO = Path(__file__).resolve().parent.parent
# Section name -> the most seconds it may take (the run's budget left caps it further).
SECTIONS: dict[str, int] = {
    "environment": 60,
    "tests": 170,
    "attention": 150,
    "nft_loss": 90,
    "ltx2_block": 90,
    "omninft_step": 120,
    "tiles": 150,
    "block_profile": 90,
    "fp8": 120,
    "fp8_compiled": 470,
    "fp8_profile": 90,
    "iteration": 150,
    "distributed": 150,
}
# The parent's deadline for a section (seconds since the epoch), read by the tests section to stop pytest in time.
DEADLINE_ENV = "GPU_CHECK_SECTION_DEADLINE"
INTERRUPT_MARGIN_S = 20.0
# What a run without --sections measures: the sections no run has measured since their code changed, in order of
# priority (a section without time left is reported as skipped); ``--sections all`` runs every section.
DEFAULT_SECTIONS = ("environment", "distributed", "iteration", "fp8_compiled", "tests")
CUDA_TESTS = [
    "tests/test_cuda.py",
    "tests/test_fp8_quantize.py",
    "tests/test_fp8.py::test_linear_and_gradients_within_fp8_bounds",
    "tests/test_triton_cross_attention.py",
    "tests/test_compile_check.py",
]


def _ceilings(work: Path) -> dict:
    """The environment section's measured ceilings (``None`` when it did not run)."""
    path = work / "environment.json"
    if path.exists():
        data = json.loads(path.read_text())
        if "copy_bytes_per_s" in data:
            return data
    return {"copy_bytes_per_s": None, "bf16_gemm_flops": None}


# --------------------------------------------------------------------------------------------------------------
# Sections. Each takes (work folder, dry_run) and returns a JSON-able dict; markdown comes from _render.


def section_environment(work: Path, dry_run: bool) -> dict:
    import torch
    import triton

    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda_runtime": torch.version.cuda,
    }
    for name in ("flash_attn", "transformer_engine", "apex", "deepspeed", "ltx_core", "diffusers"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "installed")
        except Exception as exc:  # an optional library may fail in any way on import
            info[name] = f"missing ({type(exc).__name__})"
    if dry_run:
        device, dtype, n, gemm = "cpu", torch.float32, 2**22, 256
        info["gpu"] = f"none (dry run on {os.cpu_count()}-core {platform.machine()} CPU)"
    else:
        device, dtype, n, gemm = "cuda", torch.bfloat16, 2**30, 8192
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "capability": f"{props.major}.{props.minor}",
        }
        query = "driver_version,clocks.max.sm,clocks.max.mem,power.limit"
        try:
            smi = _nvidia_smi(query)
            info[f"nvidia_smi ({query})"] = smi.stdout.strip() or smi.stderr.strip()
        except OSError as exc:
            info["nvidia_smi"] = f"not available ({exc})"
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    ms = device_ms(lambda: dst.copy_(src), dry_run)
    info["copy_bytes_per_s"] = 2 * src.numel() * 4 / (ms * 1e-3)
    a = torch.randn(gemm, gemm, device=device, dtype=dtype)
    b = torch.randn(gemm, gemm, device=device, dtype=dtype)
    ms = device_ms(lambda: a @ b, dry_run)
    info["bf16_gemm_flops"] = 2 * gemm**3 / (ms * 1e-3)
    info["copy_TB_per_s"] = round(info["copy_bytes_per_s"] / 1e12, 3)
    info["bf16_gemm_TFLOP_per_s"] = round(info["bf16_gemm_flops"] / 1e12, 1)
    return info


def section_tests(work: Path, dry_run: bool) -> dict:
    import xml.etree.ElementTree as ET

    report = work / "tests_junit.xml"
    env = dict(os.environ)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        files = ["tests/test_cuda.py"]
    else:
        env.pop("TRITON_INTERPRET", None)
        chosen = work / "tests.txt"
        files = chosen.read_text().split() if chosen.exists() else CUDA_TESTS
    # -P: the working tree's omninft_fast/ must not shadow the installed package (scripts/gpu_check.sh).
    command = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *files]
    # pytest's output goes to this section's log; near the section's deadline it is interrupted (SIGINT), which
    # still writes the report of the tests that ran.
    pytest = subprocess.Popen(command, cwd=REPO, env=env)
    interrupted = False
    try:
        pytest.wait(timeout=max(1.0, float(os.environ.get(DEADLINE_ENV, "inf")) - time.time() - INTERRUPT_MARGIN_S))
    except subprocess.TimeoutExpired:
        interrupted = True
        pytest.send_signal(signal.SIGINT)
        try:
            pytest.wait(timeout=INTERRUPT_MARGIN_S / 2)
        except subprocess.TimeoutExpired:
            pytest.kill()
            pytest.wait()
    rows = []
    cases = ET.parse(report).getroot().iter("testcase") if report.exists() else []
    for case in cases:
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
        rows.append(
            {
                "test": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}",
                "outcome": outcome,
                "seconds": round(float(case.get("time", 0)), 2),
                "message": message,
            }
        )
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "error", "skipped")}
    result = {"command": " ".join(command[1:]), "exit_code": pytest.returncode, "counts": counts, "tests": rows}
    return result | ({"interrupted": "at the section's deadline; the tests listed ran"} if interrupted else {})


def section_attention(work: Path, dry_run: bool) -> dict:
    from bench_cross_attention import attention_comparison

    return {"rows": attention_comparison(dry_run, _ceilings(work)["copy_bytes_per_s"])}


def section_nft_loss(work: Path, dry_run: bool) -> dict:
    from bench_nft_loss import gpu_comparison

    return {"rows": gpu_comparison(dry_run, _ceilings(work)["copy_bytes_per_s"])}


def section_ltx2_block(work: Path, dry_run: bool) -> dict:
    from bench_ltx2_step import block_comparison

    return block_comparison(dry_run)


def section_omninft_step(work: Path, dry_run: bool) -> dict:
    from bench_ltx2_step import step_comparison

    return step_comparison(dry_run)


def section_block_profile(work: Path, dry_run: bool) -> dict:
    from bench_ltx2_step import block_profile

    return block_profile(dry_run)


def section_fp8(work: Path, dry_run: bool) -> dict:
    from bench_fp8 import fp8_comparison

    return fp8_comparison(dry_run, _ceilings(work)["copy_bytes_per_s"])


def section_fp8_compiled(work: Path, dry_run: bool) -> dict:
    from bench_fp8 import fp8_compiled

    return fp8_compiled(dry_run)


def section_fp8_profile(work: Path, dry_run: bool) -> dict:
    from bench_fp8 import fp8_profile

    return fp8_profile(dry_run)


def section_iteration(work: Path, dry_run: bool) -> dict:
    from bench_iteration import compare

    return compare("cpu" if dry_run else "cuda", 1, warmup=1, dry_run=dry_run)


def section_distributed(work: Path, dry_run: bool) -> dict:
    from bench_distributed import engine_overhead

    return engine_overhead(dry_run)


def section_tiles(work: Path, dry_run: bool) -> dict:
    from bench_cross_attention import tile_sweep

    return {"rows": tile_sweep(dry_run)}


# --------------------------------------------------------------------------------------------------------------
# Driver: one child process per section, then the report.


def _warm_up_gpu(seconds: float = 2.0) -> None:
    """Run bf16 GEMMs for ``seconds`` so the clocks have ramped up before the first timing (an idle GPU starts at a
    few hundred MHz: the first benchmarks of a cold process ran up to 2x slow)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def _run_section(name: str, work: Path, dry_run: bool) -> None:
    """Child process body: run one section, write ``<work>/<name>.json`` (the result or the error)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    started = time.time()
    try:
        if not dry_run and name != "tests":
            _warm_up_gpu()
        result = globals()[f"section_{name}"](work, dry_run)
        result = {"status": "ok", **result}
    except Exception as exc:  # a section's failure is data: record it, let the others run
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result["seconds"] = round(time.time() - started, 1)
    (work / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


def _table(rows: list[dict], keys: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    keys = keys or list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row.get(k):.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _nvidia_smi(query: str) -> subprocess.CompletedProcess:
    """``nvidia-smi --query-gpu=query --format=csv,noheader``, run without starting CUDA in this process;
    ``OSError`` where it is missing."""
    command = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"]
    return subprocess.run(command, capture_output=True, text=True)


def _device_name() -> str:
    """The GPU's name as ``nvidia-smi`` gives it: the title of a run without the ``environment`` section."""
    try:
        smi = _nvidia_smi("name")
    except OSError:
        return "unknown device"
    names = smi.stdout.strip().splitlines() if smi.returncode == 0 else []
    return names[0] if names else "unknown device"


def _render(results: dict[str, dict], args: argparse.Namespace) -> str:
    env = results.get("environment", {})
    lines = [f"# GPU check: {env.get('gpu') or _device_name()}", ""]
    lines += [f"`{' '.join(sys.argv)}` at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    for name, result in results.items():
        lines += [f"## {name} ({result.get('status')}, {result.get('seconds', '?')} s)", ""]
        if result.get("status") != "ok":
            lines += ["```", result.get("error", ""), (result.get("traceback") or "")[-3000:], "```", ""]
            continue
        if name == "environment":
            keys = [k for k in result if k not in ("status", "seconds", "copy_bytes_per_s", "bf16_gemm_flops")]
            lines += [f"- {k}: {result[k]}" for k in keys] + [""]
        elif name == "tests":
            lines += [f"`{result['command']}` exit {result['exit_code']}: {result['counts']}", ""]
            failed = [row for row in result["tests"] if row["outcome"] in ("failed", "error")]
            lines += ["Failures:", "", _table(failed)] if failed else []
            lines += ["All tests:", "", _table(result["tests"])]
        else:
            lines.append(_table(result.get("rows", [])))
            summary = {k: v for k, v in result.items() if k not in ("status", "seconds", "rows")}
            if summary:
                lines += ["```json", json.dumps(summary, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def _run_child(name: str, args: argparse.Namespace, work: Path, env: dict[str, str], limit: float) -> dict:
    """Section ``name`` in a child process of its own session, stopped with everything it started (pytest, compile
    workers) after ``limit`` seconds; its result, or why there is none."""
    command = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--section", name]
    command += ["--work", str(work)] + (["--dry-run"] if args.dry_run else [])
    with (work / f"{name}.log").open("w") as log:
        child = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        try:
            child.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return {"status": "timeout", "error": f"stopped after {limit:.0f} s"}
    path = work / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"status": "error", "error": f"child exited {child.returncode} without a result"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md, .json and gpu_check.log")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    parser.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated sections, run in this order, or 'all' (default: {','.join(DEFAULT_SECTIONS)})",
    )
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget for all sections")
    parser.add_argument("--tests", help="comma-separated pytest files or node ids for the tests section (default: all)")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.section:
        _run_section(args.section, args.work, args.dry_run)
        return
    if (args.out / "gpu_check.json").exists():
        raise SystemExit(f"--out: {args.out} already holds a GPU check; choose another folder")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    names = list(SECTIONS) if args.sections == "all" else [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    if args.tests:
        (work / "tests.txt").write_text("\n".join(t.strip() for t in args.tests.split(",") if t.strip()))
    env = dict(os.environ)
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    deadline = time.time() + args.budget_s
    results: dict[str, dict] = {}
    for name in names:
        left = deadline - time.time()
        limit = min(SECTIONS[name], left)
        started = time.time()
        if limit < 5:
            results[name] = {"status": "skipped", "error": "the run's time budget was spent", "seconds": 0.0}
        else:
            results[name] = _run_child(name, args, work, {**env, DEADLINE_ENV: str(started + limit)}, limit)
        results[name].setdefault("seconds", round(time.time() - started, 1))
        log_path = work / f"{name}.log"
        text = log_path.read_text() if log_path.exists() else ""
        with (args.out / "gpu_check.log").open("a") as logs:
            logs.write(f"===== {name} =====\n{text}\n")
        if results[name]["status"] != "ok":
            results[name].setdefault("traceback", text[-3000:])
        print(f"{name}: {results[name]['status']} in {results[name]['seconds']} s", flush=True)
        # Written after every section, so a run stopped from outside still leaves what it measured.
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (args.out / "gpu_check.md").write_text(_render(results, args))
    print((args.out / "gpu_check.md").read_text()[-6000:])


if __name__ == "__main__":
    main()
