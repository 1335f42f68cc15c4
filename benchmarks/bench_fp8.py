"""FP8 linear layers in one LTX-2 block: bf16 vs ``omninft_fast.fp8`` (PyTorch's scaled FP8 GEMMs, rowwise and
tensorwise; quantisation by the Triton kernel, and once by PyTorch's ops), forward + backward and a no-grad rollout
forward; and the quantisation alone, kernel against PyTorch.

On a GPU (the GPU check's ``fp8`` section): one block at the 19B model's widths (video 4096 with a 16384 FFN, audio
2048), 6144 video / 126 audio tokens, bf16 autocast, timed with CUDA events; targets >= 1.3x block fwd+bwd and
>= 1.5x rollout forward against bf16 on an H100. On a CPU (``--dry-run``, or ``python benchmarks/bench_fp8.py``): a
toy block, for correctness (velocity error against bf16) and the FP8 GEMM count per forward only. Transformer
Engine's recipes (delayed, current, block scaling) get rows where TE imports.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable
from unittest import mock

import torch
from bench_ltx2_step import LTX2_19B, TOY, _block_step, profile_steps
from timing import device_ms

from omninft_fast import dispatch, fp8


def _quantize_backend(name: str | None) -> contextlib.AbstractContextManager:
    """Run the block with the FP8 quantisation of ``name`` (``reference``: PyTorch ops) instead of the default."""
    return mock.patch.dict(os.environ, {} if name is None else {dispatch.ENV_VAR: name})


def quantize_comparison(dry_run: bool, copy_bytes_per_s: float | None) -> list[dict]:
    """The quantisation alone at the 19B block's activation shape (6144 x 4096 bf16), per recipe and orientation:
    the Triton kernel against PyTorch's ops, and the kernel's bytes moved (read once, FP8 written) per second."""
    rows, cols = (48, 64) if dry_run else (6144, 4096)
    device = "cpu" if dry_run else "cuda"
    x = torch.randn(rows, cols, device=device).to(torch.bfloat16)
    out = []
    for recipe in fp8.RECIPES:
        for orientation, view in (("rows", x), ("transposed view", x.t())):
            times = {}
            for backend in ("triton", "reference") if not dry_run else ("reference",):
                times[backend] = device_ms(
                    lambda view=view, backend=backend, rowwise=recipe == "rowwise": fp8.quantize(
                        view, fp8.E4M3, rowwise, backend
                    ),
                    dry_run,
                )
            row = {"recipe": recipe, "operand": orientation, "shape": [*view.shape], "pytorch_ms": times["reference"]}
            if "triton" in times:
                moved = x.numel() * (x.element_size() + 1)
                per_s = moved / times["triton"] * 1e3
                row |= {
                    "triton_ms": times["triton"],
                    "speedup": times["reference"] / times["triton"],
                    "triton_TB/s": per_s / 1e12,
                    "fraction_of_copy": per_s / copy_bytes_per_s if copy_bytes_per_s else None,
                }
            out.append(row)
    return out


def _peak_extra_bytes(fn: Callable[[], object]) -> int:
    """CUDA memory ``fn`` allocates at its peak beyond what was allocated before it (activations kept for backward,
    workspaces)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _weight_copies_bytes(model: torch.nn.Module) -> int:
    """Bytes of the FP8 copies of weights (``W`` and, once a backward has run, ``W^T``) the patched layers keep."""
    caches = (getattr(m, "_omninft_fp8_cache", None) for m in model.modules())
    return sum(t.nbytes for c in caches if c is not None for pair in c.value.values() for t in pair)


def _host_issue_ms(fn: Callable[[], object], repeats: int = 10) -> float:
    """Median host milliseconds to issue ``fn`` (returning before the GPU finishes); close to its device time, the
    call is bound by the host (Python and launches), not by the GPU."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def _rollout(model: torch.nn.Module, data: dict, autocast: bool) -> Callable[[], list[torch.Tensor]]:
    """A no-grad forward of ``model`` on ``data``'s inputs (bf16 autocast on a GPU), returning float32 velocities."""

    def rollout() -> list[torch.Tensor]:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return [x.float() for x in model(**data["inputs"])]

    return rollout


def _relative_error(velocities: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest relative error (Frobenius norm) of the streams' velocities against the reference variant's."""
    return max(float((v - r).norm() / r.norm()) for v, r in zip(velocities, reference, strict=True))


def _timings(step: Callable[[], object], rollout: Callable[[], object], dry_run: bool) -> dict:
    """fwd+bwd and rollout-forward device ms (1 s windows) and the host's issue time of a rollout forward."""
    return {
        "fwd+bwd_ms": device_ms(step, dry_run, rep_ms=1000),
        "rollout_fwd_ms": device_ms(rollout, dry_run, rep_ms=1000),
        "rollout_host_issue_ms": None if dry_run else _host_issue_ms(rollout),
    }


def _freeze_fp8_linears(model: torch.nn.Module) -> None:
    """LoRA's case: the weights of the layers FP8 patches get no gradient (their backward computes input gradients
    only; norms, tables and biases still train, so gradients flow through every layer)."""
    pattern = re.compile(fp8.DEFAULT_MODULES)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.search(name):
            module.weight.requires_grad_(False)


def fp8_comparison(dry_run: bool, copy_bytes_per_s: float | None = None) -> dict:
    """Per batch and variant: fwd+bwd and rollout-forward ms (and the host's issue time of a rollout forward), FP8
    GEMMs per forward, velocity error against the bf16 block; and the quantisation kernel alone
    (``quantize_comparison``). Batch 1 is what one sample costs; batch 4 is nearer the engine's rollouts, whose
    guidance passes and micro-batches run together. "frozen linears": the patched layers' weights frozen, as the base
    of a LoRA run (the 19B recipe), whose backward computes input gradients only."""
    size, device = (TOY, "cpu") if dry_run else (LTX2_19B, "cuda")
    # (name, backend, recipe, quantisation backend, linear weights frozen as a LoRA run's base)
    variants = [
        ("bf16", "torch", None, None, False),
        ("fp8 rowwise", "torch", "rowwise", None, False),
        ("fp8 tensorwise", "torch", "tensorwise", None, False),
        ("fp8 rowwise, PyTorch quantisation", "torch", "rowwise", "reference", False),
        ("bf16, frozen linears", "torch", None, None, True),
        ("fp8 rowwise, frozen linears", "torch", "rowwise", None, True),
    ]
    te = not dry_run and importlib.util.find_spec("transformer_engine") is not None
    variants += [(f"te {recipe}", "te", recipe, None, False) for recipe in fp8.TE_RECIPES] if te else []
    rows = []
    for batch in (1, 2) if dry_run else (1, 4):
        reference, first = None, len(rows)
        for name, backend, recipe, quantize_backend, frozen in variants:
            step, model, data = _block_step("unpatched", None, size, device, autocast=not dry_run, batch=batch)
            if frozen:
                _freeze_fp8_linears(model)
            layers = 0 if recipe is None else len(fp8.patch(model, backend=backend, recipe=recipe).layers)

            rollout = _rollout(model, data, autocast=not dry_run)
            with _quantize_backend(quantize_backend):
                with fp8.ScaledMMCounter() as counter:
                    velocities = rollout()
                reference = velocities if reference is None else reference
                rows.append(
                    {
                        "batch": batch,
                        "variant": name,
                        "frozen_linears": frozen,
                        "fp8_layers": layers,
                        "scaled_mm_per_forward": counter.calls,
                        "velocity_rel_error_vs_bf16": _relative_error(velocities, reference),
                        **_timings(step, rollout, dry_run),
                        "fwd+bwd_peak_extra_MiB": None if dry_run else _peak_extra_bytes(step) / 2**20,
                        "fp8_weight_copies_MiB": _weight_copies_bytes(model) / 2**20,
                    }
                )
            del model
        for row in rows[first:]:
            # Against the bf16 row of the same batch with the same weights trained.
            same = [r for r in rows[first:] if r["frozen_linears"] == row["frozen_linears"]]
            base = next(r for r in same if r["fp8_layers"] == 0)
            row["fwd+bwd_speedup"] = base["fwd+bwd_ms"] / row["fwd+bwd_ms"]
            row["rollout_speedup"] = base["rollout_fwd_ms"] / row["rollout_fwd_ms"]
    precision = "float32 (dry run)" if dry_run else "bf16 autocast"
    note = "" if te else "; Transformer Engine rows only where it imports on a GPU (not here)"
    return {
        "config": f"1 block, {size.describe()}, {precision}{note}",
        "rows": rows,
        "quantize": quantize_comparison(dry_run, copy_bytes_per_s),
    }


def fp8_compiled(dry_run: bool) -> dict:
    """The block under ``torch.compile`` (inductor on a GPU; ``aot_eager`` on a dry run, which traces the same graphs
    without generating code) at batch 4 (2 on a dry run): with the patched layers' weights frozen (a LoRA run's base,
    the 19B recipe) bf16 eager and compiled and FP8 rowwise compiled; then trained, bf16 eager and compiled, FP8
    tensorwise and rowwise compiled. Each compiled variant costs a minute or more of compilation on the GPU machine, so
    the rows go in order of interest and each is printed as measured. Compiled, the FP8 layers' quantisation is
    generated by the compiler and fused into the kernels producing each activation (the norm and modulation before the
    projections, the GELU before the FFN's second layer), the part of the FP8 forward eager mode runs as separate
    passes; the bf16 block gets the same fusions, so "vs compiled bf16" is what FP8 itself gains. Frozen weights' FP8
    copies are graph inputs (``handle.prepare``), trained weights are quantised in the graph. ``profiles``: the kernels
    with the most device time of one compiled fwd+bwd (``profile_steps``, self time) per compiled variant: where FP8's
    time goes."""
    size, device, batch = (TOY, "cpu", 2) if dry_run else (LTX2_19B, "cuda", 4)
    backend = "aot_eager" if dry_run else "inductor"
    rows, profiles, reference = [], {}, None
    # (name, recipe, compiled, linear weights frozen as a LoRA run's base)
    for name, recipe, compiled, frozen in (
        ("bf16, frozen linears", None, False, True),
        ("bf16 compiled, frozen linears", None, True, True),
        ("fp8 rowwise compiled, frozen linears", "rowwise", True, True),
        ("bf16", None, False, False),
        ("bf16 compiled", None, True, False),
        ("fp8 tensorwise compiled", "tensorwise", True, False),
        ("fp8 rowwise compiled", "rowwise", True, False),
    ):
        torch._dynamo.reset()
        step, model, data = _block_step("unpatched", None, size, device, autocast=not dry_run, batch=batch)
        if frozen:
            _freeze_fp8_linears(model)
        if recipe is not None:
            handle = fp8.patch(model, recipe=recipe)
            # The graphs read the frozen weights' FP8 copies (W, and W^T for the backward), as the trainer's
            # compiled models do (it prepares before each call; these weights never change).
            handle.prepare(transposed=True)
        if compiled:
            model.compile(backend=backend)
        rollout = _rollout(model, data, autocast=not dry_run)
        start = time.perf_counter()
        try:
            velocities = rollout()
            step()
        except Exception as error:  # a variant the compiler fails on is a result: record it, measure the others
            rows.append({"variant": name, "frozen_linears": frozen, "error": f"{type(error).__name__}: {error}"[:300]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        if not dry_run:
            torch.cuda.synchronize()
        first_calls_s = time.perf_counter() - start
        reference = velocities if reference is None else reference
        rows.append(
            {
                "variant": name,
                "frozen_linears": frozen,
                "first_calls_s": first_calls_s,
                "velocity_rel_error_vs_bf16": _relative_error(velocities, reference),
                **_timings(step, rollout, dry_run),
            }
        )
        # Each row to the log as it is measured: a section stopped by its time limit still leaves them.
        print(json.dumps(rows[-1]), flush=True)
        if compiled:
            profiles[name] = profile_steps(step, dry_run, steps=2, top=10, self_time=True)
        del model
    measured = [r for r in rows if "error" not in r]
    for row in measured:
        # Against the bf16 rows with the same weights trained (eager and compiled).
        same = [r for r in measured if r["frozen_linears"] == row["frozen_linears"] and r["variant"].startswith("bf16")]
        for label, compiled in (("eager_bf16", False), ("compiled_bf16", True)):
            base = next((r for r in same if ("compiled" in r["variant"]) == compiled), None)
            for what, key in (("fwd+bwd", "fwd+bwd_ms"), ("rollout", "rollout_fwd_ms")):
                row[f"{what}_vs_{label}"] = None if base is None else base[key] / row[key]
    precision = "float32 (dry run)" if dry_run else "bf16 autocast"
    return {
        "config": f"1 block, {size.describe()}, batch {batch}, {precision}, torch.compile backend {backend}; "
        "first_calls_s: the first rollout forward and training step (the compilation)",
        "rows": rows,
        "profiles": profiles,
    }


def fp8_profile(dry_run: bool, steps: int = 3) -> dict:
    """Where a no-grad rollout forward of the block spends its time, bf16 vs FP8 rowwise and tensorwise
    (``bench_ltx2_step.profile_steps``: the 12 kernels with the most device time, device total, syncs)."""
    size, device = (TOY, "cpu") if dry_run else (LTX2_19B, "cuda")
    result: dict = {"config": f"1 block rollout forward, {size.describe()}, {steps} profiled steps after 2 warm-up"}
    for name, recipe in (("bf16", None), ("fp8 rowwise", "rowwise"), ("fp8 tensorwise", "tensorwise")):
        _, model, data = _block_step("unpatched", None, size, device, autocast=not dry_run)
        if recipe is not None:
            fp8.patch(model, recipe=recipe)
        rollout = _rollout(model, data, autocast=not dry_run)
        start = time.perf_counter()
        rollout()
        if not dry_run:
            torch.cuda.synchronize()
        result[name] = profile_steps(rollout, dry_run, steps, top=12)
        result[name]["first_call_s"] = time.perf_counter() - start
        del model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy block on the CPU (correctness and counts)")
    args = parser.parse_args()
    dry_run = args.dry_run or not torch.cuda.is_available()
    print(json.dumps(fp8_comparison(dry_run), indent=2))


if __name__ == "__main__":
    main()
