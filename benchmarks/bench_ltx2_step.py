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
import json
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
FRAMES, HEIGHT, WIDTH, AUDIO_TOKENS, CHANNELS = 16, 16, 24, 126, 128
VIDEO_HEADS, VIDEO_HEAD_DIM, AUDIO_HEADS, AUDIO_HEAD_DIM = 2, 32, 2, 16
ALPHA, BETA, LAM = 0.1, 1.0, 1.5


def _build(layers: int, batch: int, device: str) -> tuple[nn.Module, dict]:
    """A random tiny-width ``LTXModel`` and one batch of step inputs."""
    from ltx_core.components.patchifiers import AudioPatchifier, VideoLatentPatchifier
    from ltx_core.guidance.perturbations import BatchedPerturbationConfig
    from ltx_core.model.transformer.attention import AttentionFunction
    from ltx_core.model.transformer.modality import Modality
    from ltx_core.model.transformer.model import LTXModel, LTXModelType
    from ltx_core.model.transformer.rope import LTXRopeType
    from ltx_core.tools import AudioLatentTools, VideoLatentTools
    from ltx_core.types import AudioLatentShape, VideoLatentShape

    video_dim, audio_dim = VIDEO_HEADS * VIDEO_HEAD_DIM, AUDIO_HEADS * AUDIO_HEAD_DIM
    model = LTXModel(
        model_type=LTXModelType.AudioVideo,
        num_layers=layers,
        num_attention_heads=VIDEO_HEADS,
        attention_head_dim=VIDEO_HEAD_DIM,
        cross_attention_dim=video_dim,
        audio_num_attention_heads=AUDIO_HEADS,
        audio_attention_head_dim=AUDIO_HEAD_DIM,
        audio_cross_attention_dim=audio_dim,
        rope_type=LTXRopeType.SPLIT,
        attention_type=AttentionFunction.PYTORCH,
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    model.to(device)

    video = VideoLatentTools(
        VideoLatentPatchifier(1), VideoLatentShape(batch, CHANNELS, FRAMES, HEIGHT, WIDTH), fps=24.0
    ).create_initial_state(device, torch.float32)
    audio = AudioLatentTools(
        AudioPatchifier(1), AudioLatentShape(batch, 8, AUDIO_TOKENS, CHANNELS // 8)
    ).create_initial_state(device, torch.float32)
    sigma = torch.rand(batch, generator=gen).to(device)

    def modality(state, width: int) -> Modality:
        latent = torch.randn(state.latent.shape, generator=gen).to(device)
        timesteps = sigma[:, None].expand(batch, latent.shape[1])
        context = torch.randn(batch, 16, width, generator=gen).to(device)
        return Modality(latent=latent, sigma=sigma, timesteps=timesteps, positions=state.positions, context=context)

    inputs = {
        "video": modality(video, video_dim),
        "audio": modality(audio, audio_dim),
        "perturbations": BatchedPerturbationConfig.empty(batch),
    }
    targets = [torch.randn(batch, n, CHANNELS, generator=gen).to(device) for n in (FRAMES * HEIGHT * WIDTH, 126)]
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


def _measure(name: str, layers: int, batch: int, repeats: int, device: str, threads: int, queue) -> None:
    """Runs in a child process: build, warm up, time ``repeats`` steps, report time, memory and a checksum."""
    torch.set_num_threads(threads)
    model, data = _build(layers, batch, device)
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
    queue.put(
        {
            "impl": name,
            "warmup_s": warm,
            "times_s": times,
            "median_s": statistics.median(times),
            "peak_mib": (peak - base) / 2**20,
            "loss": loss,
            "grad_norms": grad_norms,
        }
    )


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
            "video_tokens": FRAMES * HEIGHT * WIDTH,
            "audio_tokens": AUDIO_TOKENS,
            "video_width": f"{VIDEO_HEADS}x{VIDEO_HEAD_DIM}",
            "audio_width": f"{AUDIO_HEADS}x{AUDIO_HEAD_DIM}",
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
        f"`{command}`; torch {torch.__version__}; video {VIDEO_HEADS}x{VIDEO_HEAD_DIM}, audio "
        f"{AUDIO_HEADS}x{AUDIO_HEAD_DIM}, {args.layers} blocks, batch {args.batch}; 1-minute load average "
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
