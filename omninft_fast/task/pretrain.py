"""Flow-matching pre-training of the tiny base policy on the synthetic task (the RL run starts from it)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from omninft_fast._checks import check_device
from omninft_fast.task.synthetic import all_prompts
from omninft_fast.train.builders import build_policy, build_task
from omninft_fast.train.checkpoint import save_weights
from omninft_fast.train.config import TrainConfig
from omninft_fast.train.model import Condition


def pretrain(
    config: TrainConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    output: str | Path,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``x_t = (1 - t) x0 + t x1`` velocity regression (``v = x1 - x0``, both streams, ``t ~ U(0, 1)``) on
    data drawn from the task, with AdamW and a cosine learning-rate decay; write the weights to ``output``.

    Returns:
        The loss of every step.
    """
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps, batch_size and lr must be positive, got {steps}, {batch_size}, {lr}")
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    device = check_device(config.device, "device")
    task = build_task(config)
    model = build_policy(config, task, load=False).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / steps)))
    )
    generator = torch.Generator().manual_seed(seed)
    prompts = all_prompts()
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        picks = torch.randint(len(prompts), (batch_size,), generator=generator)
        texts = [prompts[int(i)] for i in picks]
        x0_video, x0_audio = task.sample_data(texts, generator)
        noise_video = torch.randn(x0_video.shape, generator=generator)
        noise_audio = torch.randn(x0_audio.shape, generator=generator)
        t = torch.rand(batch_size, generator=generator)
        tb = t[:, None, None]
        xt_video = (1 - tb) * x0_video + tb * noise_video
        xt_audio = (1 - tb) * x0_audio + tb * noise_audio
        cond = Condition(*task.encode(texts)).to(device)
        v_video, v_audio = model(xt_video.to(device), xt_audio.to(device), t.to(device), cond)
        loss_video = (v_video - (noise_video - x0_video).to(device)).square().mean()
        loss_audio = (v_audio - (noise_audio - x0_audio).to(device)).square().mean()
        loss = loss_video + loss_audio
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(video=f"{loss_video.item():.4f}", audio=f"{loss_audio.item():.4f}")
    metadata = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "seconds": time.perf_counter() - start,
        "task": config.task.__dict__,
        "model": config.model.__dict__,
    }
    save_weights(output, model.model, metadata)
    return losses
