"""One OmniNFT training step of a tiny-width ltx-core LTX-2 at the real token counts: straightforward vs engine.

The step: the old policy's forward (no gradient), whose region blocks' V2A key mass gives the Eq 10 scores and
Eq 11 token weights; the current policy's forward with Eq 8-9 surgery on the shallow blocks' A2V keys/values; the
NFT loss (Eq 3-5, 12) of both streams; backward. Video 16x16x24 = 6144 tokens and audio 126 tokens (a 121-frame
768x512 clip), 128 channels each, as in LTX-2; only the width and depth are small.

- straightforward: forward hooks computing ``alpha * x.detach() + (1 - alpha) * x`` on the shallow A2V keys
  (after the k-norm; RoPE is linear) and values, V2A key mass from materialised softmax maps in the region blocks,
  Eq 11 and the loss in eager PyTorch ops.
- engine: ``omninft_fast.ltx2.patch`` on both policies, ``capture_region_scores``, ``region_weights`` and
  ``nft_loss`` (``backend="auto"``).

Each implementation runs in its own process, so its peak memory is its own: on CPU the growth of peak RSS over the
steps (``ru_maxrss`` minus the RSS before the first step), on CUDA ``max_memory_allocated`` above the memory held
before the step. Both report the loss and gradient norms of the same step, which must agree.

Usage: ``python benchmarks/bench_ltx2_step.py [--layers 2] [--batch 1] [--repeats 2] [--rounds 3] [--threads N]
[--device cpu|cuda]``; writes ``benchmarks/results/ltx2_step_{cpu,cuda}.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
CHANNELS = 128
ALPHA, BETA, LAM = 0.1, 1.0, 1.5


@dataclasses.dataclass(frozen=True)
class Size:
    """Widths (heads x head dim per stream), latent grid and text tokens of a benchmarked LTX-2."""

    video_heads: int
    video_head_dim: int
    audio_heads: int
    audio_head_dim: int
    frames: int = 16
    height: int = 16
    width: int = 24
    audio_tokens: int = 126
    text_tokens: int = 16

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    def describe(self) -> str:
        return (
            f"video {self.video_heads}x{self.video_head_dim}, audio {self.audio_heads}x{self.audio_head_dim}, "
            f"{self.video_tokens} video / {self.audio_tokens} audio / {self.text_tokens} text tokens, one timestep per "
            "sample"
        )


# Tiny widths at the real token counts of a 121-frame 768x512 clip; the 19B model's widths; a dry run's toy.
TINY = Size(2, 32, 2, 16)
LTX2_19B = Size(32, 128, 32, 64, text_tokens=128)
TOY = Size(2, 32, 2, 16, frames=2, height=4, width=6, audio_tokens=10, text_tokens=4)


def _ltx_model(layers: int, size: Size, video_dim: int, audio_dim: int) -> nn.Module:
    from ltx_core.model.transformer.attention import AttentionFunction
    from ltx_core.model.transformer.model import LTXModel, LTXModelType
    from ltx_core.model.transformer.rope import LTXRopeType

    return LTXModel(
        model_type=LTXModelType.AudioVideo,
        num_layers=layers,
        num_attention_heads=size.video_heads,
        attention_head_dim=size.video_head_dim,
        cross_attention_dim=video_dim,
        audio_num_attention_heads=size.audio_heads,
        audio_attention_head_dim=size.audio_head_dim,
        audio_cross_attention_dim=audio_dim,
        rope_type=LTXRopeType.SPLIT,
        attention_type=AttentionFunction.PYTORCH,
    )


def _build(layers: int, batch: int, device: str, size: Size = TINY) -> tuple[nn.Module, dict]:
    """A random ``LTXModel`` of ``size`` and one batch of step inputs. Parameters are drawn with std 0.1, capped at
    ``2 / sqrt(fan_in)`` for matrices so wide models stay in bf16's range (norm scales: 1 + 0.1 noise)."""
    from ltx_core.components.patchifiers import AudioPatchifier, VideoLatentPatchifier
    from ltx_core.guidance.perturbations import BatchedPerturbationConfig
    from ltx_core.model.transformer.modality import Modality
    from ltx_core.tools import AudioLatentTools, VideoLatentTools
    from ltx_core.types import AudioLatentShape, VideoLatentShape

    video_dim, audio_dim = size.video_heads * size.video_head_dim, size.audio_heads * size.audio_head_dim
    with torch.device(device):
        model = _ltx_model(layers, size, video_dim, audio_dim).to(device)
    param_gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=param_gen, device=device)
            std = min(0.1, 2 / math.sqrt(param.shape[-1])) if param.dim() == 2 else 0.1
            param.copy_(1.0 + 0.1 * noise if "norm" in name else std * noise)
    # Inputs come from a CPU stream: on the CPU the one that drew the parameters, so old results reproduce.
    gen = param_gen if device == "cpu" else torch.Generator().manual_seed(0)

    video = VideoLatentTools(
        VideoLatentPatchifier(1), VideoLatentShape(batch, CHANNELS, size.frames, size.height, size.width), fps=24.0
    ).create_initial_state(device, torch.float32)
    audio = AudioLatentTools(
        AudioPatchifier(1), AudioLatentShape(batch, 8, size.audio_tokens, CHANNELS // 8)
    ).create_initial_state(device, torch.float32)
    sigma = torch.rand(batch, generator=gen).to(device)

    def modality(state, width: int) -> Modality:
        latent = torch.randn(state.latent.shape, generator=gen).to(device)
        # One timestep per sample, as the trainer passes it: per-token timesteps (LTX-2's pipelines) would run the
        # model's adaLN projection over every token, as many FLOPs as a feed-forward layer, once per model forward.
        timesteps = sigma[:, None]
        context = torch.randn(batch, size.text_tokens, width, generator=gen).to(device)
        return Modality(latent=latent, sigma=sigma, timesteps=timesteps, positions=state.positions, context=context)

    inputs = {
        "video": modality(video, video_dim),
        "audio": modality(audio, audio_dim),
        "perturbations": BatchedPerturbationConfig.empty(batch),
    }
    tokens = (size.video_tokens, size.audio_tokens)
    targets = [torch.randn(batch, n, CHANNELS, generator=gen).to(device) for n in tokens]
    r = torch.rand(batch, generator=gen).to(device)
    return model, {"inputs": inputs, "targets": targets, "r": r}


def _eager_nft_loss(v, v_old, target, r, weight=None):
    """Eq 3-5 and 12 in plain PyTorch ops."""
    v_plus = (1 - BETA) * v_old + BETA * v
    v_minus = (1 + BETA) * v_old - BETA * v
    per_token = r[:, None] * ((v_plus - target) ** 2).mean(-1) + (1 - r[:, None]) * ((v_minus - target) ** 2).mean(-1)
    if weight is None:
        return per_token.mean(-1).mean()
    return ((weight * per_token).sum(-1) / weight.sum(-1)).mean()


def _straightforward(model: nn.Module, old: nn.Module, deep: list[int], alphas: list[float]):
    """Hooks for Eq 8, materialised V2A maps for Eq 10, eager Eq 11 and loss."""
    for block, alpha in zip(model.transformer_blocks, alphas, strict=True):
        if alpha > 0:
            for sub in (block.audio_to_video_attn.k_norm, block.audio_to_video_attn.to_v):
                sub.register_forward_hook(lambda _m, _i, out, a=alpha: a * out.detach() + (1 - a) * out)
    masses: list[torch.Tensor] = []

    def materialised(q, k, v, heads, mask=None):
        b, n_q, width = q.shape
        q, k, v = (x.view(b, -1, heads, width // heads).transpose(1, 2) for x in (q, k, v))
        probs = torch.softmax(q @ k.transpose(-1, -2) * (width // heads) ** -0.5, dim=-1)  # (B, H, Nq, Nk)
        masses.append(probs.sum(dim=2).mean(dim=1))
        return (probs @ v).transpose(1, 2).reshape(b, n_q, width)

    for layer in deep:
        old.transformer_blocks[layer].video_to_audio_attn.attention_function = materialised

    def step(data: dict) -> torch.Tensor:
        masses.clear()
        with torch.no_grad():
            v_old, a_old = old(**data["inputs"])
        scores = torch.stack(masses).mean(0)
        lo, hi = scores.amin(1, keepdim=True), scores.amax(1, keepdim=True)
        weight = 1 + LAM * (scores - lo) / (hi - lo)
        v, a = model(**data["inputs"])
        tv, ta = data["targets"]
        loss = _eager_nft_loss(v, v_old, tv, data["r"], weight) + _eager_nft_loss(a, a_old, ta, data["r"])
        loss.backward()
        return loss

    return step


def _engine(model: nn.Module, old: nn.Module, deep: list[int], alphas: list[float]):
    """``omninft_fast.ltx2.patch`` + ``capture_region_scores`` + ``region_weights`` + ``nft_loss``."""
    from omninft_fast import ltx2, nft_loss, region_weights

    ltx2.patch(model, detach=alphas, region_layers=deep)
    old_handle = ltx2.patch(old, detach=None, region_layers=deep)

    def step(data: dict) -> torch.Tensor:
        with torch.no_grad(), old_handle.capture_region_scores(num_steps=1, last_steps=1) as capture:
            capture.step = 0
            v_old, a_old = old(**data["inputs"])
        weight = region_weights(capture.scores(), lam=LAM)
        v, a = model(**data["inputs"])
        tv, ta = data["targets"]
        loss = nft_loss(v, v_old, tv, data["r"], beta=BETA, token_weight=weight)
        loss = loss + nft_loss(a, a_old, ta, data["r"], beta=BETA)
        loss.backward()
        return loss

    return step


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _time_steps(
    name: str, layers: int, batch: int, repeats: int, device: str, size: Size = TINY, bf16: bool = False
) -> dict:
    """Build, warm up, time ``repeats`` steps of one implementation; time, peak memory, loss and gradient norms.

    ``bf16`` runs the step under CUDA bf16 autocast (float32 master weights), as the trainer does on a GPU.
    """
    model, data = _build(layers, batch, device, size)
    old = copy.deepcopy(model).requires_grad_(False)
    boundary = layers // 2
    deep = list(range(boundary, layers))
    alphas = [ALPHA if layer < boundary else 0.0 for layer in range(layers)]
    step = (_straightforward if name == "straightforward" else _engine)(model, old, deep, alphas)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run() -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = step(data)
        sync()
        return time.perf_counter() - start, float(loss.detach())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    warm, loss = run()
    times = [run()[0] for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grad_norms = {
        part: float(torch.stack([p.grad.norm() for n, p in model.named_parameters() if part in n]).norm())
        for part in ("audio_to_video_attn.to_k", "audio_to_video_attn.to_v", "patchify_proj", "proj_out")
    }
    return {
        "impl": name,
        "warmup_s": warm,
        "times_s": times,
        "median_s": statistics.median(times),
        "peak_mib": (peak - base) / 2**20,
        "loss": loss,
        "grad_norms": grad_norms,
    }


def _measure(name: str, layers: int, batch: int, repeats: int, device: str, threads: int, queue) -> None:
    """Runs in a child process: ``_time_steps`` with ``threads`` CPU threads, result to ``queue``."""
    torch.set_num_threads(threads)
    queue.put(_time_steps(name, layers, batch, repeats, device))


def _block_bytes(size: Size) -> int:
    """float32 bytes of one transformer block of ``size`` (built on the meta device)."""
    video_dim, audio_dim = size.video_heads * size.video_head_dim, size.audio_heads * size.audio_head_dim
    with torch.device("meta"):
        block = _ltx_model(1, size, video_dim, audio_dim).transformer_blocks[0]
    return 4 * sum(p.numel() for p in block.parameters())


def step_comparison(dry_run: bool) -> dict:
    """One OmniNFT step (old-policy forward with V2A key mass, current forward with surgery, NFT loss, backward) of
    a reduced-depth LTX-2 at the 19B model's widths in bf16 autocast: straightforward vs engine, in one process.

    Depth: as many blocks as fit in a quarter of the free GPU memory at about 4 block copies each (weights, old
    policy, gradients, bf16 casts), between 2 and 12; a dry run takes 2 tiny blocks on the CPU."""
    if dry_run:
        size, device, layers, repeats = TOY, "cpu", 2, 1
    else:
        size, device, repeats = LTX2_19B, "cuda", 3
        free, _ = torch.cuda.mem_get_info()
        layers = max(2, min(12, int(free / 4 / (4 * _block_bytes(size)))))
    rows = []
    for name in ("straightforward", "engine"):
        rows.append(_time_steps(name, layers, 1, repeats, device, size, bf16=not dry_run))
        if not dry_run:
            torch.cuda.empty_cache()
    base, engine = rows
    return {
        "config": f"{layers} blocks, {size.describe()}, batch 1, " + ("float32" if dry_run else "bf16 autocast"),
        "rows": [{k: v for k, v in row.items() if k != "grad_norms"} for row in rows],
        "speedup_median": base["median_s"] / engine["median_s"],
        "memory_ratio": base["peak_mib"] / engine["peak_mib"] if engine["peak_mib"] > 0 else None,
        "loss_relative_difference": abs(base["loss"] - engine["loss"]) / abs(base["loss"]),
        "grad_norm_relative_differences": {
            k: abs(v - engine["grad_norms"][k]) / max(abs(v), 1e-30) for k, v in base["grad_norms"].items()
        },
    }


def _block_step(name: str, detach: list[float] | None, size: Size, device: str, autocast: bool, batch: int = 1):
    """``(step, model, data)``: forward + backward of one freshly built block on ``batch`` samples, patched unless
    ``name == "unpatched"``."""
    from omninft_fast import ltx2

    model, data = _build(1, batch, device, size)
    if name != "unpatched":
        ltx2.patch(model, detach=detach, backend="triton")
    gen = torch.Generator(device=device).manual_seed(1)
    weights = [torch.randn(t.shape, generator=gen, device=device) for t in data["targets"]]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            v, a = model(**data["inputs"])
        ((v.float() * weights[0]).sum() + (a.float() * weights[1]).sum()).backward()

    return step, model, data


def profile_steps(step, dry_run: bool, steps: int = 3, top: int = 10, self_time: bool = False) -> dict:
    """Where the time of ``step`` goes after 2 warm-up calls, over ``steps`` profiled calls: the ``top`` events with
    the most device time (CPU time on a dry run; ``self_time``: each event's own time, not its children's, so the
    kernels themselves rank, not the operators launching them), the device total and the host-device
    synchronisations per call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([] if dry_run else [ProfilerActivity.CUDA])
    for _ in range(2):
        step()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if not dry_run:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = ("self_" if self_time else "") + ("cpu_time_total" if dry_run else "device_time_total")
    kernels = sorted((e for e in events if getattr(e, key, 0) > 0), key=lambda e: getattr(e, key), reverse=True)
    syncs = {
        e.key: e.count // steps
        for e in events
        if any(word in e.key for word in ("Synchronize", "cudaMemcpy", "item", "_local_scalar_dense"))
    }
    return {
        "top": [
            {"name": e.key[:90], "calls_per_step": e.count / steps, "ms_per_step": getattr(e, key) / 1e3 / steps}
            for e in kernels[:top]
        ],
        "device_ms_per_step": sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3 / steps,
        "syncs_per_step": syncs,
    }


def block_profile(dry_run: bool, steps: int = 3) -> dict:
    """Where the time of one block's forward + backward goes, unpatched vs patched with surgery (``profile_steps``)."""
    size, device = (TOY, "cpu") if dry_run else (LTX2_19B, "cuda")
    result: dict = {"config": f"1 block, {size.describe()}, {steps} profiled steps after 2 warm-up steps"}
    for name, detach in (("unpatched", None), ("patched, surgery alpha=0.1", [ALPHA])):
        step, model, _ = _block_step(name, detach, size, device, autocast=not dry_run)
        result[name] = profile_steps(step, dry_run, steps)
        del model
    return result


def block_comparison(dry_run: bool) -> dict:
    """One LTX-2 block at the 19B model's widths (video 32x128, audio 32x64), 6144 video / 126 audio tokens,
    forward + backward under bf16 autocast: unpatched (ltx-core's SDPA attention) vs ``ltx2.patch`` with and
    without Eq 8 surgery (``alpha = 0.1``) on the Triton backend; times, peak memory and output agreement."""
    size, device = (TOY, "cpu") if dry_run else (LTX2_19B, "cuda")
    variants = {"unpatched": None, "patched, no surgery": [0.0], "patched, surgery alpha=0.1": [ALPHA]}
    rows, outputs = [], {}
    for name, detach in variants.items():
        step, model, data = _block_step(name, detach, size, device, autocast=not dry_run)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=not dry_run):
            outputs[name] = [x.float() for x in model(**data["inputs"])]
        row = {"variant": name}
        if dry_run:
            step()
            start = time.perf_counter()
            step()
            row["ms"] = (time.perf_counter() - start) * 1e3
        else:
            import triton.testing

            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            row["ms"] = triton.testing.do_bench(step, warmup=100, rep=1000, return_mode="median")
        reference = outputs["unpatched"]
        row["max_rel_diff_vs_unpatched"] = max(
            float((x - y).abs().max() / y.abs().max()) for x, y in zip(outputs[name], reference, strict=True)
        )
        rows.append(row)
        del model
    for row in rows:
        row["time_vs_unpatched"] = row["ms"] / rows[0]["ms"]
    return {"config": f"1 block, {size.describe()}, batch 1", "rows": rows}


def _run_child(context, name: str, args: argparse.Namespace) -> dict:
    queue = context.Queue()
    config = (name, args.layers, args.batch, args.repeats, args.device, args.threads, queue)
    child = context.Process(target=_measure, args=config)
    child.start()
    row = queue.get()
    child.join()
    print(json.dumps(row))
    return row


def _summary(runs: list[dict]) -> dict:
    """One implementation over all rounds: every timed step, the best and median, the largest peak."""
    times = [t for run in runs for t in run["times_s"]]
    return {
        "impl": runs[0]["impl"],
        "times_s": times,
        "best_s": min(times),
        "median_s": statistics.median(times),
        "peak_mib": max(run["peak_mib"] for run in runs),
        "loss": runs[0]["loss"],
        "grad_norms": runs[0]["grad_norms"],
    }


def _agree(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * abs(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--layers", type=int, default=2, help="blocks; the first half gets Eq 9's alpha, the rest Eq 10"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per process, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=3, help="processes per implementation, order alternating")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads per process")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    runs: dict[str, list[dict]] = {"straightforward": [], "engine": []}
    load_before = os.getloadavg()[0]
    for round_index in range(args.rounds):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for name in order:
            runs[name].append(_run_child(context, name, args))
    base, engine = (_summary(rows) for rows in runs.values())
    agree = _agree(base["loss"], engine["loss"]) and all(
        _agree(base["grad_norms"][k], v) for k, v in engine["grad_norms"].items()
    )
    machine = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()}-core CPU ({platform.machine()})"
    )
    command = (
        f"python benchmarks/bench_ltx2_step.py --layers {args.layers} --batch {args.batch} --repeats {args.repeats} "
        f"--rounds {args.rounds} --threads {args.threads} --device {args.device}"
    )
    result = {
        "machine": machine,
        "command": command,
        "torch": torch.__version__,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "config": {
            "layers": args.layers,
            "batch": args.batch,
            "video_tokens": TINY.video_tokens,
            "audio_tokens": TINY.audio_tokens,
            "video_width": f"{TINY.video_heads}x{TINY.video_head_dim}",
            "audio_width": f"{TINY.audio_heads}x{TINY.audio_head_dim}",
            "threads": args.threads,
        },
        "results": [base, engine],
        "speedup_best": base["best_s"] / engine["best_s"],
        "speedup_median": base["median_s"] / engine["median_s"],
        "memory_ratio": base["peak_mib"] / engine["peak_mib"] if engine["peak_mib"] > 0 else None,
        "loss_and_grads_agree": agree,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"ltx2_step_{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    memory = "peak RSS growth" if args.device == "cpu" else "peak allocated above the step's start"
    lines = [
        f"# One OmniNFT step, tiny-width LTX-2 at 6144 video / 126 audio tokens ({machine})",
        "",
        f"`{command}`; torch {torch.__version__}; video {TINY.video_heads}x{TINY.video_head_dim}, audio "
        f"{TINY.audio_heads}x{TINY.audio_head_dim}, {args.layers} blocks, batch {args.batch}; 1-minute load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (the machine is shared).",
        "",
        f"| implementation | best step (s) | median step (s) | all steps (s) | {memory} (MiB) | loss |",
        "|---|---|---|---|---|---|",
    ]
    for row in (base, engine):
        times = ", ".join(f"{t:.2f}" for t in row["times_s"])
        lines.append(
            f"| {row['impl']} | {row['best_s']:.2f} | {row['median_s']:.2f} | {times} | {row['peak_mib']:.0f} "
            f"| {row['loss']:.6f} |"
        )
    ratio = result["memory_ratio"]
    lines += [
        "",
        f"Straightforward / engine: time {result['speedup_best']:.2f}x (best), {result['speedup_median']:.2f}x "
        "(median); memory " + (f"{ratio:.2f}x" if ratio is not None else "n/a") + f". Loss and gradient norms of "
        f"the two agree to 1e-4: {agree}.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
