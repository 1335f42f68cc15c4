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
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import omninft_fast
from omninft_fast.kernels.compile_check import compile_specs_for_sm90
from omninft_fast.kernels.cross_attention import sm90_kernel_specs
from omninft_fast.kernels.cross_attention_bwd import attention_backward
from omninft_fast.kernels.cross_attention_fwd import attention_forward
from omninft_fast.kernels.key_mass import attention_key_mass

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, HEAD_DIM = 32, 64
# (name, video tokens, audio tokens): 5 s 768x512, 5 s 1280x704, 10 s 768x512.
CLIPS = [("5s-768x512", 6144, 126), ("5s-1280x704", 14080, 126), ("10s-768x512", 11904, 251)]
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


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


def _bandwidth(device: torch.device) -> float:
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), PEAK_BANDWIDTH["H100"])


def _time_shape(batch: int, n_q: int, n_k: int, device: torch.device) -> list[tuple[str, str, float, float, int]]:
    """``(impl, phase, ms, flops, bytes)`` for every implementation and phase at one bf16 shape."""
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    bench = triton.testing.do_bench
    q = torch.randn(batch, n_q, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, n_k, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad = torch.randn_like(q)
    scale = HEAD_DIM**-0.5
    flops_fwd = 4 * batch * HEADS * n_q * n_k * HEAD_DIM
    qo_bytes, kv_bytes = q.numel() * 2, k.numel() * 2
    io = {"fwd": 2 * qo_bytes + 2 * kv_bytes, "bwd": 4 * qo_bytes + 4 * kv_bytes}
    io["fwd+bwd"] = io["fwd"] + io["bwd"]
    flops = {"fwd": flops_fwd, "bwd": 2.5 * flops_fwd, "fwd+bwd": 3.5 * flops_fwd}

    def sdpa() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)

    def ours() -> torch.Tensor:
        return omninft_fast.cross_attention(q, k, v, backend="triton")

    impls = {"triton": ours, "sdpa-flash": sdpa}
    if flash_attn_func is not None:
        impls["flash-attn"] = lambda: flash_attn_func(q, k, v, softmax_scale=scale)
    rows = []
    out_t, lse = attention_forward(q.detach(), k.detach(), v.detach(), scale)
    for name, fn in impls.items():
        out = fn()
        if name == "triton":
            ms_fwd = bench(lambda: attention_forward(q.detach(), k.detach(), v.detach(), scale))
            ms_bwd = bench(lambda: attention_backward(grad, q.detach(), k.detach(), v.detach(), out_t, lse, scale, 1.0))
        else:
            with torch.no_grad():
                ms_fwd = bench(fn)
            ms_bwd = bench(lambda out=out: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
        ms_both = bench(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), grad))
        for phase, ms in (("fwd", ms_fwd), ("bwd", ms_bwd), ("fwd+bwd", ms_both)):
            rows.append((name, phase, ms, flops[phase], io[phase]))
    with torch.no_grad():
        ms = bench(lambda: attention_key_mass(q, k, lse, scale))
        rows.append(("triton key mass", "key mass", ms, flops_fwd / 2, qo_bytes + kv_bytes))
        ms = bench(lambda: naive_key_mass(q, k, scale))
        rows.append(("naive map + column sum", "key mass", ms, flops_fwd / 2, qo_bytes + kv_bytes))
    return rows


def gpu_timings(device: torch.device, batches: tuple[int, ...]) -> list[dict]:
    """ms, TFLOP/s, GB/s and fraction of the memory floor of each implementation at each shape (bf16)."""
    peak_bw = _bandwidth(device)
    rows = []
    for batch in batches:
        for clip, video, audio in CLIPS:
            for direction, n_q, n_k in (("A2V", video, audio), ("V2A", audio, video)):
                shape = (batch, HEADS, n_q, n_k, HEAD_DIM)
                for impl, phase, ms, flops, io_bytes in _time_shape(batch, n_q, n_k, device):
                    rows.append(
                        {
                            "clip": clip,
                            "direction": direction,
                            "B,H,Nq,Nk,D": shape,
                            "impl": impl,
                            "phase": phase,
                            "ms": round(ms, 4),
                            "TFLOP/s": round(flops / ms / 1e9, 1),
                            "GB/s": round(io_bytes / ms / 1e6, 1),
                            "memory_floor_fraction": round(io_bytes / peak_bw * 1e3 / ms, 3),
                        }
                    )
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
    report["gpu_timings"] = gpu_timings(device, batches) if cuda else "GPU timings need a CUDA device"
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
