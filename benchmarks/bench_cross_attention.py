"""Cross-attention kernels at LTX-2's cross-modal shapes: resources, key-mass memory, and (on CUDA) timings.

Writes ``benchmarks/results/cross_attention_<machine>.json`` and ``.md``. Sections:

1. sm_90a compile check (no GPU needed): registers, spills and shared memory of every kernel specialisation.
2. Peak extra memory of the key mass (the Triton op) versus the naive "materialise the map, then column-sum",
   counted by a dispatch mode that tracks live tensor bytes. The Triton op runs for real (interpreter on CPU) at
   LTX-2 token counts; on CPU only one head runs, as its allocations do not depend on the head count, and the naive
   path runs on fake tensors (exact sizes, no memory).
3. On CUDA only: forward, backward and forward+backward times against SDPA (flash backend) and flash-attn when
   installed, and key mass against the naive path, with ms, TFLOP/s, GB/s and the fraction of the memory floor.

Run: ``TRITON_INTERPRET=1 python benchmarks/bench_cross_attention.py`` on CPU, plain ``python ...`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import weakref
from pathlib import Path

import torch
from timing import device_ms
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import omninft_fast
from omninft_fast.kernels.common import TileConfig
from omninft_fast.kernels.compile_check import compile_specs_for_sm90
from omninft_fast.kernels.cross_attention import sm90_kernel_specs
from omninft_fast.kernels.cross_attention_bwd import attention_backward
from omninft_fast.kernels.cross_attention_fwd import attention_forward
from omninft_fast.kernels.key_mass import attention_key_mass

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, HEAD_DIM = 32, 64
# (name, video tokens, audio tokens): 5 s 768x512, 5 s 1280x704, 10 s 768x512.
CLIPS = [("5s-768x512", 6144, 126), ("5s-1280x704", 14080, 126), ("10s-768x512", 11904, 251)]


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors created inside the mode and still alive (views are not counted twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, x in zip(returns, outputs, strict=False):
            if isinstance(x, torch.Tensor) and ret.alias_info is None:
                nbytes = x.numel() * x.element_size()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(x, self._release, nbytes)
        return out


def naive_key_mass(q: torch.Tensor, k: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Materialise the ``(B, H, Nq, Nk)`` map in float32, then sum over queries and average over heads."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * softmax_scale
    return torch.softmax(logits, dim=-1).sum(dim=2).mean(dim=1)


def compile_table() -> list[dict]:
    specs = sm90_kernel_specs(head_dims=(32, 64, 128), dtypes=(torch.bfloat16, torch.float32))
    return [
        {
            "kernel": r.name,
            "spec": r.label,
            "registers": r.registers,
            "spill_bytes": r.spills,
            "shared_bytes": r.shared_bytes,
            "num_warps": r.num_warps,
            "num_stages": r.num_stages,
        }
        for r in compile_specs_for_sm90(specs)
    ]


def key_mass_memory(device: torch.device, batches: tuple[int, ...]) -> list[dict]:
    """Peak extra bytes of the key-mass op and of the naive map, V2A (audio queries, video keys)."""
    rows = []
    op_heads = HEADS if device.type == "cuda" else 1
    for batch in batches:
        for clip, video, audio in CLIPS:
            gen = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(batch, audio, op_heads, HEAD_DIM, device=device, generator=gen, dtype=torch.float16)
            k = torch.randn(batch, video, op_heads, HEAD_DIM, device=device, generator=gen, dtype=torch.float16)
            lse = (torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * HEAD_DIM**-0.5).logsumexp(dim=-1)
            with LiveBytes() as tracker:
                mass = attention_key_mass(q, k, lse, HEAD_DIM**-0.5)
            del mass
            with FakeTensorMode():
                fq = torch.empty(batch, audio, HEADS, HEAD_DIM, dtype=torch.bfloat16)
                fk = torch.empty(batch, video, HEADS, HEAD_DIM, dtype=torch.bfloat16)
                with LiveBytes() as naive:
                    naive_key_mass(fq, fk, HEAD_DIM**-0.5)
            rows.append(
                {
                    "clip": clip,
                    "B": batch,
                    "H": HEADS,
                    "Nq (audio)": audio,
                    "Nk (video)": video,
                    "key_mass_peak_extra_bytes": tracker.peak,
                    "key_mass_heads_run": op_heads,
                    "naive_map_peak_extra_bytes": naive.peak,
                    "ratio": float(f"{tracker.peak / naive.peak:.3g}"),
                }
            )
    return rows


# Tile configurations the sweep tries (the default first); bf16, head dim 64.
TILE_CANDIDATES = [
    TileConfig(64, 64, 4, 2),
    TileConfig(64, 64, 4, 3),
    TileConfig(64, 64, 8, 2),
    TileConfig(128, 64, 8, 2),
    TileConfig(128, 64, 4, 3),
    TileConfig(64, 128, 4, 2),
    TileConfig(128, 128, 8, 2),
    TileConfig(32, 64, 4, 2),
    TileConfig(64, 32, 4, 3),
    TileConfig(128, 32, 4, 3),
]


def _setting(dry_run: bool) -> dict:
    """Shapes, heads, head dim, dtype and device of the comparison (tiny float32 CPU ones for a dry run)."""
    if dry_run:
        return {"clips": [("tiny", 100, 10)], "batches": (1,), "heads": 2, "dim": 32, "dtype": torch.float32}
    return {"clips": CLIPS, "batches": (1, 4), "heads": HEADS, "dim": HEAD_DIM, "dtype": torch.bfloat16}


def _qkv(batch: int, n_q: int, n_k: int, setting: dict, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(seed)
    heads, dim, dtype = setting["heads"], setting["dim"], setting["dtype"]
    q = torch.randn(batch, n_q, heads, dim, device=device, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(batch, n_k, heads, dim, device=device, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(batch, n_k, heads, dim, device=device, generator=gen).to(dtype).requires_grad_()
    return q, k, v, torch.randn(batch, n_q, heads, dim, device=device, generator=gen).to(dtype)


def _sdpa_backends(dry_run: bool) -> dict:
    from torch.nn.attention import SDPBackend

    if dry_run:
        return {"sdpa-math": SDPBackend.MATH}
    return {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    }


def _sdpa(backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)


def _extra_bytes(fn, dry_run: bool) -> int | None:
    """Peak bytes ``fn`` allocates on the GPU beyond what was allocated before it (``None`` on a dry run)."""
    if dry_run:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _shape_rows(batch: int, n_q: int, n_k: int, kv_grad_scale: float, setting: dict, dry_run: bool) -> list[dict]:
    """``(impl, phase, ms, error)`` rows of every implementation at one shape; V2A adds forward + key mass."""
    device = "cpu" if dry_run else "cuda"
    q, k, v, grad = _qkv(batch, n_q, n_k, setting, device)
    scale = setting["dim"] ** -0.5
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    rows: list[dict] = []

    def ours() -> torch.Tensor:
        return omninft_fast.cross_attention(q, k, v, kv_grad_scale=kv_grad_scale, backend="triton")

    out_t, lse = attention_forward(qd, kd, vd, scale)
    reference = None
    impls = {"triton": ours}
    impls |= {name: (lambda b=b: _sdpa(b, q, k, v, scale)) for name, b in _sdpa_backends(dry_run).items()}
    if not dry_run:
        try:
            from flash_attn import flash_attn_func

            impls["flash-attn"] = lambda: flash_attn_func(q, k, v, softmax_scale=scale)
        except ImportError:
            pass
    for name, fn in impls.items():
        try:
            with torch.no_grad():
                out = fn()
            if reference is None:
                reference = out.float()
            error = float((out.float() - reference).abs().max()) if name != "triton" else None
            if name == "triton":
                fwd = device_ms(lambda: attention_forward(qd, kd, vd, scale), dry_run)
                bwd = device_ms(lambda: attention_backward(grad, qd, kd, vd, out_t, lse, scale, kv_grad_scale), dry_run)
            else:
                with torch.no_grad():
                    fwd = device_ms(fn, dry_run)
                live = fn()
                bwd = device_ms(
                    lambda live=live: torch.autograd.grad(live, (q, k, v), grad, retain_graph=True), dry_run
                )
            both = device_ms(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), grad), dry_run)
        except Exception as exc:  # a backend that cannot run this shape is a row, not a crash
            rows.append({"impl": name, "phase": "fwd", "ms": None, "error": f"{type(exc).__name__}: {exc}"[:160]})
            continue
        rows += [
            {"impl": name, "phase": p, "ms": ms, "max_abs_diff_vs_triton": error}
            for p, ms in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", both))
        ]
    sdpa_fwd = [r for r in rows if r["impl"].startswith("sdpa") and r["phase"] == "fwd" and r["ms"]]
    if n_q < n_k and sdpa_fwd:
        best = min(sdpa_fwd, key=lambda r: r["ms"])
        backend = _sdpa_backends(dry_run)[best["impl"]]

        def ours_mass() -> torch.Tensor:
            _, lse = attention_forward(qd, kd, vd, scale)
            return attention_key_mass(qd, kd, lse, scale)

        def naive_mass() -> torch.Tensor:
            with torch.no_grad():
                _sdpa(backend, qd, kd, vd, scale)
                return naive_key_mass(qd, kd, scale)

        mass_only = {
            "triton": lambda: attention_key_mass(qd, kd, lse, scale),
            "naive": lambda: naive_key_mass(qd, kd, scale),
        }
        for (name, fn), alone in zip(
            (("triton fwd + key mass", ours_mass), (f"{best['impl']} + map column sum", naive_mass)),
            mass_only.values(),
            strict=True,
        ):
            rows.append(
                {
                    "impl": name,
                    "phase": "fwd+key mass",
                    "ms": device_ms(fn, dry_run),
                    "key_mass_extra_bytes": _extra_bytes(alone, dry_run),
                }
            )
    return rows


def attention_comparison(dry_run: bool, copy_bytes_per_s: float | None = None) -> list[dict]:
    """Every implementation and phase at LTX-2's cross-modal shapes (A2V with ``kv_grad_scale`` 0.9, V2A with key
    mass), with TFLOP/s, achieved TB/s, the fraction of the memory floor (bytes each input is read and each output
    written once, at the measured copy bandwidth) and the speed-up over the fastest SDPA backend of the phase."""
    setting = _setting(dry_run)
    heads, dim = setting["heads"], setting["dim"]
    element = torch.finfo(setting["dtype"]).bits // 8
    table = []
    for batch in setting["batches"]:
        for clip, video, audio in setting["clips"]:
            for direction, n_q, n_k, kv in (("A2V", video, audio, 0.9), ("V2A", audio, video, 1.0)):
                rows = _shape_rows(batch, n_q, n_k, kv, setting, dry_run)
                flops_fwd = 4 * batch * heads * n_q * n_k * dim
                q_bytes, k_bytes = batch * n_q * heads * dim * element, batch * n_k * heads * dim * element
                io = {"fwd": 2 * q_bytes + 2 * k_bytes, "bwd": 4 * q_bytes + 4 * k_bytes}
                io |= {"fwd+bwd": io["fwd"] + io["bwd"], "fwd+key mass": q_bytes * 2 + k_bytes * 2}
                flops = {"fwd": flops_fwd, "bwd": 2.5 * flops_fwd, "fwd+bwd": 3.5 * flops_fwd}
                flops["fwd+key mass"] = 1.5 * flops_fwd
                sdpa_best = {}
                for row in rows:
                    if row["impl"].startswith("sdpa") and row["ms"] and "+" not in row["impl"]:
                        sdpa_best[row["phase"]] = min(sdpa_best.get(row["phase"], float("inf")), row["ms"])
                for row in rows:
                    ms = row["ms"]
                    entry = {"clip": clip, "direction": direction, "B": batch, "Nq": n_q, "Nk": n_k, **row}
                    if ms:
                        phase = row["phase"]
                        entry["TFLOP/s"] = flops[phase] / ms / 1e9
                        entry["TB/s"] = io[phase] / ms / 1e9
                        if copy_bytes_per_s:
                            entry["memory_floor_fraction"] = io[phase] / copy_bytes_per_s * 1e3 / ms
                        baseline = sdpa_best.get(phase)
                        if phase == "fwd+key mass":
                            baseline = next((r["ms"] for r in rows if "column sum" in r["impl"]), None)
                        entry["speedup_vs_sdpa_best"] = baseline / ms if baseline else None
                    table.append(entry)
    return table


def _tile_row(tile: TileConfig, q, k, v, grad, ref, ref_grads, dry_run: bool) -> dict:
    """Times and largest errors (against SDPA's output and gradients) of one tile configuration."""
    scale = q.shape[-1] ** -0.5
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    row: dict = {"tile": f"{tile.block_m}x{tile.block_n} w{tile.num_warps} s{tile.num_stages}"}
    try:
        out, lse = attention_forward(qd, kd, vd, scale, tile=tile)
        grads = attention_backward(grad, qd, kd, vd, out, lse, scale, 1.0, tile=tile)
        row["fwd_ms"] = device_ms(lambda: attention_forward(qd, kd, vd, scale, tile=tile), dry_run)
        row["bwd_ms"] = device_ms(
            lambda: attention_backward(grad, qd, kd, vd, out, lse, scale, 1.0, tile=tile), dry_run
        )
        row["key_mass_ms"] = device_ms(lambda: attention_key_mass(qd, kd, lse, scale, tile=tile), dry_run)
        row["err_out"] = float((out.float() - ref.float()).abs().max())
        for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
            row[f"err_{name}"] = float((got.float() - want.float()).abs().max())
    except Exception as exc:  # a tile that does not compile or fit is a row
        row["error"] = f"{type(exc).__name__}: {exc}"[:160]
    return row


def tile_sweep(dry_run: bool) -> list[dict]:
    """Forward, backward and key-mass time of each candidate tile at the 5 s clip (B = 1), A2V and V2A, with the
    largest difference from SDPA's output and gradients: the data for a tuned tile table."""
    setting = _setting(dry_run)
    device = "cpu" if dry_run else "cuda"
    candidates = TILE_CANDIDATES[:2] if dry_run else TILE_CANDIDATES
    clip, video, audio = setting["clips"][0]
    backend = next(iter(_sdpa_backends(dry_run).values())) if dry_run else _sdpa_backends(False)["sdpa-efficient"]
    rows = []
    for direction, n_q, n_k in (("A2V", video, audio), ("V2A", audio, video)):
        q, k, v, grad = _qkv(1, n_q, n_k, setting, device, seed=1)
        ref = _sdpa(backend, q, k, v, q.shape[-1] ** -0.5)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
        for tile in candidates:
            row = _tile_row(tile, q, k, v, grad, ref.detach(), ref_grads, dry_run)
            rows.append({"clip": clip, "direction": direction, **row})
    return rows


def _markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _command() -> str:
    prefix = "TRITON_INTERPRET=1 " if os.environ.get("TRITON_INTERPRET") == "1" else ""
    return f"{prefix}python {' '.join(sys.argv)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--skip-compile", action="store_true", help="skip the sm_90a compile table")
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("without CUDA, run with TRITON_INTERPRET=1")
    device = torch.device("cuda" if cuda else "cpu")
    machine = (
        torch.cuda.get_device_name(device) if cuda else f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU"
    )
    report: dict = {"machine": machine, "torch": torch.__version__, "command": _command()}
    started = time.time()
    report["compile_check_sm90a"] = [] if args.skip_compile else compile_table()
    report["key_mass_memory"] = key_mass_memory(device, batches)
    report["gpu_timings"] = attention_comparison(False) if cuda else "GPU timings need a CUDA device"
    report["seconds"] = round(time.time() - started, 1)

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"cross_attention_{'gpu' if cuda else 'cpu'}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# Cross-attention kernels ({machine})\n", f"Command: `{report['command']}`, torch {torch.__version__}.\n"]
    md += ["## sm_90a compile check\n", _markdown_table(report["compile_check_sm90a"])]
    md += ["## Peak extra memory: key mass vs materialised map (V2A, H=32, D=64)\n"]
    if not cuda:
        md.append(
            "The key-mass op ran for real at these token counts with one head (its allocations do not depend on "
            "the head count); the naive path ran on fake tensors with 32 heads.\n"
        )
    md.append(_markdown_table(report["key_mass_memory"]))
    md += ["## GPU timings\n"]
    timings = report["gpu_timings"]
    md.append(_markdown_table(timings) if isinstance(timings, list) else timings + ".\n")
    stem.with_suffix(".md").write_text("\n".join(md))
    print(stem.with_suffix(".md").read_text())
    worst = max(row["ratio"] for row in report["key_mass_memory"])
    seconds = math.ceil(report["seconds"])
    print(f"worst key-mass / naive-map memory ratio: {worst:.2e} (target < {1 / 50:.2e}); {seconds} s")


if __name__ == "__main__":
    main()
