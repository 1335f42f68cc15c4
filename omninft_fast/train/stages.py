"""The stages of Algorithm 1, each a function from explicit inputs to explicit outputs.

- rollout with region capture: ``rollout`` (Eq 1-2 through ``euler_sample``; Eq 10 through the handle's capture)
- scoring: ``score`` (the reward plugins, their outputs combined into reward terms by ``reward_term``)
- advantages and routing: ``advantages`` (Eq 6 ``group_advantages``, ``optimality_probability``; Eq 7
  ``route_advantages``)
- region weights: ``token_weights`` (Eq 11 ``region_weights``, or ``frame_region_weights``)
- NFT update: ``nft_update`` -> ``nft_backward`` -> ``nft_losses`` (Eq 3-5 and Eq 12: ``nft_loss`` with the
  region weights on the video stream, ``adaptive_x0_weight``), ``optimizer_step`` per micro-batch or per iteration
- old-policy update: ``update_old_policy`` (``theta_old <- eta theta_old + (1 - eta) theta``)

What passes between stages is a small dataclass (``Rollout``, ``Scores``, ``Advantages``, ``UpdateBatch``), so a
stage can be replaced on its own: batched guided rollouts return a ``Rollout``, a distributed step replaces
``optimizer_step``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

import omninft_fast
from omninft_fast.rewards import RewardBatch, RewardModel
from omninft_fast.train.builders import STREAMS, Policies
from omninft_fast.train.config import AdvantageConfig, NFTConfig, ReweightConfig, SamplingConfig, times_per_sample
from omninft_fast.train.model import AVTask, AVVelocityModel, Condition, LatentSpec, to_device
from omninft_fast.train.sampler import Guidance, euler_sample, time_grid
from omninft_fast.train.validation import TrainingDiverged, check_finite

MODALITIES = ("video", "audio", "av")


@dataclass
class Rollout:
    """Samples of the old policy.

    Attributes:
        texts: ``B`` prompts, ``G`` consecutive samples per prompt.
        video, audio: ``(B, Nv, Cv)`` and ``(B, Na, Ca)`` clean latents ``x0``.
        region_scores: ``(B, Nv)`` Eq 10 scores captured while sampling, or ``None``.
        video_prompts, audio_prompts: ``B`` prompts that video and audio rewards judge (default: ``texts``).
    """

    texts: list[str]
    video: torch.Tensor
    audio: torch.Tensor
    region_scores: torch.Tensor | None
    video_prompts: list[str] | None = None
    audio_prompts: list[str] | None = None


@dataclass
class Scores:
    """Named ``(B,)`` float32 reward terms (one advantage each) with the modality and term weight of the plugin
    that gave each, and every plugin's raw named outputs (for the logs)."""

    values: dict[str, torch.Tensor]
    modality: dict[str, str]
    weight: dict[str, float]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Advantages:
    """Eq 6-7 per sample.

    Attributes:
        video, audio: ``(B,)`` weighted sums of the group advantages of each modality's rewards (before routing).
        r_video, r_audio: ``(B,)`` optimality probabilities of the routed video and audio branches, on the device.
    """

    video: torch.Tensor
    audio: torch.Tensor
    r_video: torch.Tensor
    r_audio: torch.Tensor


@dataclass
class UpdateBatch:
    """What the NFT update trains on: the rollout's latents and condition with their ``r`` and video token weights.

    Attributes:
        cond: condition of the ``B`` samples.
        video, audio: ``(B, Nv, Cv)`` and ``(B, Na, Ca)`` clean latents.
        r_video, r_audio: ``(B,)`` optimality probabilities.
        token_weight: ``(B, Nv)`` Eq 11 video token weights, or ``None`` (uniform).
    """

    cond: Condition
    video: torch.Tensor
    audio: torch.Tensor
    r_video: torch.Tensor
    r_audio: torch.Tensor
    token_weight: torch.Tensor | None


def draw_noise(
    spec: LatentSpec, batch: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, Nv, Cv)`` video then ``(B, Na, Ca)`` audio standard normal noise (separate per modality).

    On the CPU both come from ``generator`` itself. On another device they are drawn there, from a generator of
    that device seeded by one draw of ``generator`` (CPU noise for a GPU batch costs more than its rollout at small
    widths: 0.5 s for 96 samples of LTX-2's token counts); the same seed gives the same noise on every rank."""
    video_shape = (batch, spec.video_tokens, spec.video_channels)
    audio_shape = (batch, spec.audio_tokens, spec.audio_channels)
    if device.type == "cpu":
        return torch.randn(video_shape, generator=generator), torch.randn(audio_shape, generator=generator)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    local = torch.Generator(device=device).manual_seed(seed)
    return (
        torch.randn(video_shape, generator=local, device=device),
        torch.randn(audio_shape, generator=local, device=device),
    )


def condition(task: AVTask, texts: list[str], device: torch.device) -> Condition:
    """The task's text condition of ``texts`` on ``device``."""
    return Condition(*task.encode(texts)).to(device)


def rollout(
    model: AVVelocityModel,
    task: AVTask,
    texts: list[str],
    generator: torch.Generator,
    *,
    sampling: SamplingConfig,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    handle: Any = None,
    last_steps: int = 1,
    last_step: int | None = None,
    passes: str = "cond",
    on_step: Callable[[int], None] | None = None,
    video_prompts: list[str] | None = None,
    audio_prompts: list[str] | None = None,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Rollout:
    """Euler-sample ``texts`` with ``model`` from ``noise`` (``(B, Nv, Cv)``, ``(B, Na, Ca)``; default fresh from
    ``generator``) (Eq 1-2) and ``sampling``'s guidance; with the ``ltx2.patch`` ``handle`` of the sampling model
    also capture the ``(B, Nv)`` Eq 10 scores of the ``last_steps`` steps ending at ``last_step`` (default the final
    one), from the conditional pass or the mean of ``all`` passes. ``video_prompts`` and ``audio_prompts`` ride
    along for the rewards."""
    cond = condition(task, texts, device)
    noise_video, noise_audio = noise if noise is not None else draw_noise(task.spec, len(texts), generator, device)
    uses_uncond = sampling.video_cfg != 1.0 or sampling.audio_cfg != 1.0
    guidance = Guidance(
        Condition(*task.unconditional(len(texts))).to(device) if uses_uncond else None,
        sampling.video_cfg,
        sampling.audio_cfg,
        sampling.stg_scale,
        tuple(sampling.stg_blocks),
        sampling.stg_shared_prefix,
    )
    kwargs: dict[str, Any] = {
        "num_steps": sampling.num_steps,
        "shift": sampling.shift,
        "guidance": guidance,
        "autocast_dtype": autocast_dtype,
        "on_step": on_step,
    }
    if handle is None:
        video, audio = euler_sample(model, cond, noise_video, noise_audio, **kwargs)
        return Rollout(texts, video, audio, None, video_prompts, audio_prompts)
    until = sampling.num_steps if last_step is None else last_step + 1
    with handle.capture_region_scores(num_steps=until, last_steps=last_steps) as capture:
        video, audio = euler_sample(
            model, cond, noise_video, noise_audio, capture=capture, capture_until=until, **kwargs
        )
        per_pass = capture.scores().float().view(guidance.passes, len(texts), -1)
        scores = per_pass.mean(dim=0) if passes == "all" else per_pass[0]
        return Rollout(texts, video, audio, scores, video_prompts, audio_prompts)


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """The micro-batches' rollouts as one, in order."""
    scores = [p.region_scores for p in parts]

    def prompts(name: str) -> list[str] | None:
        lists = [getattr(p, name) for p in parts]
        return None if any(item is None for item in lists) else [x for item in lists for x in item]

    return Rollout(
        [t for p in parts for t in p.texts],
        torch.cat([p.video for p in parts]),
        torch.cat([p.audio for p in parts]),
        None if any(s is None for s in scores) else torch.cat(scores),
        prompts("video_prompts"),
        prompts("audio_prompts"),
    )


def concat_scores(parts: list[Scores]) -> Scores:
    """The micro-batches' reward terms and outputs as one, in order."""
    first = parts[0]
    return Scores(
        {k: torch.cat([p.values[k] for p in parts]) for k in first.values},
        first.modality,
        first.weight,
        {k: torch.cat([p.outputs[k] for p in parts]) for k in first.outputs},
    )


def reward_term(outputs: dict[str, torch.Tensor], signed: dict[str, float], reward: str) -> torch.Tensor:
    """One reward term ``sum_k signed[k] * outputs[k]`` of a plugin's ``(B,)`` named outputs (``reward`` names the
    plugin in errors)."""
    missing = sorted(set(signed) - set(outputs))
    if missing:
        raise ValueError(f"reward {reward!r} has no output named {missing[0]!r} (it gives {sorted(outputs)})")
    return sum((w * outputs[k] for k, w in signed.items()), torch.zeros_like(next(iter(outputs.values()))))


def score(
    task: AVTask,
    rewards: list[RewardModel],
    batch: Rollout,
    terms: list[dict[str, float] | None] | None = None,
    *,
    times: dict[str, float] | None = None,
) -> Scores:
    """Decode the rollout and score it with every reward plugin (video and audio rewards read the rollout's
    per-modality prompts). ``terms[i]`` (signed weights of plugin ``i``'s named outputs) makes that plugin one
    reward term named after it (``reward_term``); without it every output is its own term. ``times`` gets the
    seconds spent decoding and scoring added to its ``decode`` and ``reward`` entries."""
    start = time.perf_counter()
    frames, waveform = task.decode(batch.video, batch.audio)
    decoded = time.perf_counter()
    media = RewardBatch(
        frames,
        task.spec.fps,
        waveform,
        task.spec.sample_rate,
        batch.texts,
        video_prompts=batch.video_prompts,
        audio_prompts=batch.audio_prompts,
    )
    scores = Scores({}, {}, {})
    for i, reward in enumerate(rewards):
        outputs = reward(media)
        for key, value in outputs.items():
            if key in scores.outputs:
                raise ValueError(f"two rewards return a score named {key!r}")
            scores.outputs[key] = value
        signed = None if terms is None else terms[i]
        named = {reward.name: reward_term(outputs, signed, reward.name)} if signed else outputs
        for key, value in named.items():
            if key in scores.values:
                raise ValueError(f"two reward terms are named {key!r}")
            scores.values[key] = value
            scores.modality[key] = reward.modality
            scores.weight[key] = reward.weight
    if times is not None:
        times["decode"] = times.get("decode", 0.0) + decoded - start
        times["reward"] = times.get("reward", 0.0) + time.perf_counter() - decoded
    return scores


def drop_nonfinite_groups(samples: Rollout, scores: Scores, groups: int) -> tuple[Rollout, Scores, dict[str, int]]:
    """Remove every group (``groups`` prompts of ``B / groups`` consecutive samples) in which some reward is NaN or
    infinite: a group's advantages need all its samples. Returns the kept samples and scores and, per reward, how
    many samples it scored non-finite (empty when nothing was dropped). One host read of the rewards."""
    bad = {name: ~torch.isfinite(value) for name, value in scores.values.items()}
    counts = {name: int(mask.sum()) for name, mask in bad.items() if mask.any()}
    if not counts:
        return samples, scores, {}
    keep_group = ~torch.stack(list(bad.values())).any(dim=0).view(groups, -1).any(dim=1)
    keep = keep_group.repeat_interleave(len(samples.texts) // groups)
    kept = Rollout(
        [text for text, k in zip(samples.texts, keep.tolist(), strict=True) if k],
        samples.video[keep.to(samples.video.device)],
        samples.audio[keep.to(samples.audio.device)],
        None if samples.region_scores is None else samples.region_scores[keep.to(samples.region_scores.device)],
        *(
            None if prompts is None else [p for p, k in zip(prompts, keep.tolist(), strict=True) if k]
            for prompts in (samples.video_prompts, samples.audio_prompts)
        ),
    )
    values = {name: value[keep.to(value.device)] for name, value in scores.values.items()}
    outputs = {name: value[keep.to(value.device)] for name, value in scores.outputs.items()}
    return kept, Scores(values, scores.modality, scores.weight, outputs), counts


def advantages(scores: Scores, groups: int, config: AdvantageConfig, device: torch.device) -> Advantages:
    """Eq 6-7: one group advantage per reward term (``groups`` prompts; ``advantage.std`` and ``eps``), summed per
    modality with the term weights, routed to the video and audio branches (``gdpo`` whitens the sum with the same
    ``eps``) and turned into optimality probabilities ``r``."""
    size = len(next(iter(scores.values.values()))) // groups
    per_modality = {m: torch.zeros(groups, size) for m in MODALITIES}
    for name, value in scores.values.items():
        adv = omninft_fast.group_advantages(value.view(groups, -1), std=config.std, eps=config.eps)
        modality = scores.modality[name]
        per_modality[modality] = per_modality[modality] + scores.weight[name] * adv
    adv_v, adv_a, adv_av = per_modality["video"], per_modality["audio"], per_modality["av"]
    routed_v, routed_a = omninft_fast.route_advantages(adv_v, adv_a, adv_av, mode=config.routing, eps=config.eps)
    return Advantages(
        adv_v.flatten(),
        adv_a.flatten(),
        to_device(omninft_fast.optimality_probability(routed_v, clip=config.clip).flatten(), device),
        to_device(omninft_fast.optimality_probability(routed_a, clip=config.clip).flatten(), device),
    )


def token_weights(
    region_scores: torch.Tensor | None,
    reweight: ReweightConfig,
    device: torch.device,
    *,
    frames: int = 1,
    iteration: int = 0,
) -> torch.Tensor | None:
    """Eq 11: ``(B, Nv)`` min-max region weights of the Eq 10 scores, or the release's per-frame z-score form over
    ``frames`` latent frames ramped in over ``reweight.warmup`` iterations (``None`` without reweighting)."""
    if region_scores is None:
        return None
    if reweight.form == "minmax":
        weights = omninft_fast.region_weights(region_scores, lam=reweight.lam)
    else:
        ramp = min(iteration / reweight.warmup, 1.0) if reweight.warmup > 0 else 1.0
        weights = omninft_fast.frame_region_weights(region_scores, frames=frames, w_max=reweight.w_max, ramp=ramp)
    return to_device(weights, device)


def training_times(
    batch: int, generator: torch.Generator, nft: NFTConfig, sampling: SamplingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B * K,)`` sample indices and flow times in a random order: ``K`` distinct sampler-grid times per sample
    (``grid_shuffled``), ``K`` uniform times in the grid's range (``uniform``), or every one of the first ``K`` grid
    times (``grid_first``; ``K = times_per_sample``)."""
    k, steps = times_per_sample(nft, sampling), sampling.num_steps
    grid = time_grid(steps, shift=sampling.shift)[:-1]
    if nft.timesteps == "grid_first":
        times = grid[:k].expand(batch, k)
    elif nft.timesteps == "grid_shuffled":
        picks = torch.stack([torch.randperm(steps, generator=generator)[:k] for _ in range(batch)])
        times = grid[picks]
    else:
        lo = float(grid[-1])
        times = lo + (1.0 - lo) * torch.rand((batch, k), generator=generator)
    index = torch.arange(batch)[:, None].expand(batch, k).flatten()
    order = torch.randperm(batch * k, generator=generator)
    return index[order], times.flatten()[order]


@dataclass
class OldPredictions:
    """The old policy's (and the KL reference's) velocities of ``P`` (sample, time) pairs, computed before the
    training loop (``old_predictions``).

    Attributes:
        video, audio: ``(P, Nv, Cv)`` and ``(P, Na, Ca)`` old-policy velocities.
        ref_video, ref_audio: the reference's, or ``None`` without the KL term.
    """

    video: torch.Tensor
    audio: torch.Tensor
    ref_video: torch.Tensor | None
    ref_audio: torch.Tensor | None

    def __getitem__(self, rows: slice) -> OldPredictions:
        fields = (self.video, self.audio, self.ref_video, self.ref_audio)
        return OldPredictions(*(None if x is None else x[rows] for x in fields))


def noised(
    batch: UpdateBatch, index: torch.Tensor, t: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t = (1 - t) x0 + t noise`` of ``batch``'s samples ``index`` (``(b,)``) at times ``t`` (``(b,)``):
    ``(b, Nv, Cv)`` video and ``(b, Na, Ca)`` audio."""
    tb = t[:, None, None]
    return (1 - tb) * batch.video[index] + tb * noise[0], (1 - tb) * batch.audio[index] + tb * noise[1]


@torch.no_grad()
def old_predictions(
    policies: Policies,
    batch: UpdateBatch,
    index: torch.Tensor,
    t: torch.Tensor,
    noise: tuple[torch.Tensor, torch.Tensor],
    *,
    chunk: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> OldPredictions:
    """The old policy's and the reference's velocities at every ``(index[p], t[p], noise[p])`` pair (``(P,)``,
    ``(P,)``, ``(P, Nv, Cv)`` / ``(P, Na, Ca)``) in no-grad forwards of ``chunk`` pairs. Neither depends on the
    parameters being trained, so the training step needs only the policy's forward and backward."""
    parts = []
    for lo in range(0, len(index), chunk):
        rows = slice(lo, lo + chunk)
        x_video, x_audio = noised(batch, index[rows], t[rows], (noise[0][rows], noise[1][rows]))
        cond = batch.cond[index[rows]]
        with autocast():
            old = policies.old(x_video, x_audio, t[rows], cond)
            ref = policies.ref(x_video, x_audio, t[rows], cond) if policies.ref is not None else (None, None)
        parts.append((*old, *ref))
    return OldPredictions(*(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True)))


def nft_losses(
    policies: Policies,
    batch: UpdateBatch,
    index: torch.Tensor,
    t: torch.Tensor,
    noise: tuple[torch.Tensor, torch.Tensor],
    nft: NFTConfig,
    autocast: Callable[[], contextlib.AbstractContextManager],
    old: OldPredictions | None = None,
) -> dict[str, torch.Tensor]:
    """Eq 12 on one mini-batch: the region-weighted video NFT loss and the unweighted audio NFT loss (Eq 3-5).

    Args:
        policies: ``policy`` (trained), ``old`` and the optional KL ``ref``.
        batch: the iteration's update batch.
        index: ``(b,)`` samples of ``batch`` in this mini-batch, on the device.
        t: ``(b,)`` flow times, on the device.
        noise: ``(b, Nv, Cv)`` video and ``(b, Na, Ca)`` audio noise.
        nft: beta, adaptive weight or x0-space normalisation, scales, KL weight and space.
        autocast: the run's autocast context.
        old: the mini-batch's old-policy and reference velocities (``old_predictions``); ``None``: computed here.

    Returns:
        ``{"video": loss, "audio": loss}``, scalar tensors.
    """
    x0_video, x0_audio = batch.video[index], batch.audio[index]
    noise_video, noise_audio = noise
    xt_video, xt_audio = noised(batch, index, t, noise)
    c = batch.cond[index]
    if old is None:
        old = old_predictions(policies, batch, index, t, noise, chunk=len(index), autocast=autocast)
    with autocast():
        v_video, v_audio = policies.policy(xt_video, xt_audio, t, c)
    streams = (
        ("video", v_video, old.video, noise_video - x0_video, xt_video, x0_video, batch.r_video, batch.token_weight),
        ("audio", v_audio, old.audio, noise_audio - x0_audio, xt_audio, x0_audio, batch.r_audio, None),
    )
    losses = {}
    for (name, v, v_old, target, xt, x0, r, weight), v_ref in zip(streams, (old.ref_video, old.ref_audio), strict=True):
        v, v_old = v.float(), v_old.float()
        sample_weight = None
        if nft.adaptive_weight:
            v_pos = (1 - nft.beta) * v_old + nft.beta * v.detach()
            sample_weight = omninft_fast.adaptive_x0_weight(xt, x0, v_pos, t)
        losses[name] = omninft_fast.nft_loss(
            v,
            v_old,
            target,
            r[index],
            beta=nft.beta,
            token_weight=None if weight is None else weight[index],
            sample_weight=sample_weight,
            inverse_beta_scale=nft.inverse_beta_scale,
            policy_scale=nft.policy_scale,
            x0_norm_t=t if nft.x0_norm else None,
            kl_weight=nft.kl_weight,
            v_ref=None if v_ref is None else v_ref.float(),
            kl_space=nft.kl_space,
            # Validated once per iteration instead: r and token weights (check_loss_inputs); a non-finite velocity
            # or sample weight reaches nft_update's check of the losses and the gradient norm.
            check_values=False,
        )
    return losses


def modality_loss(losses: dict[str, torch.Tensor], nft: NFTConfig) -> torch.Tensor:
    """The step's loss from ``nft_losses``: the weighted sum of the video and audio losses, or their weighted mean
    with ``nft.modality_reduction == "mean"``."""
    loss = nft.video_weight * losses["video"] + nft.audio_weight * losses["audio"]
    return loss / (nft.video_weight + nft.audio_weight) if nft.modality_reduction == "mean" else loss


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of the gradients of ``params`` (0 for none), a scalar on their device."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def nft_backward(
    policies: Policies,
    batch: UpdateBatch,
    index: torch.Tensor,
    t: torch.Tensor,
    noise: tuple[torch.Tensor, torch.Tensor],
    *,
    nft: NFTConfig,
    autocast: Callable[[], contextlib.AbstractContextManager],
    scale: float = 1.0,
    old: OldPredictions | None = None,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> dict[str, torch.Tensor]:
    """Back-propagate (``backward``: an engine's) ``scale`` times one micro-batch's Eq 12 loss (``modality_loss``),
    adding to the gradients; ``scale = 1 / micro-batches per optimiser step`` keeps the gradient of an accumulated
    step that of the mean loss; ``old`` as in ``nft_losses``. Returns the detached ``{"video", "audio"}`` losses
    (unscaled)."""
    losses = nft_losses(policies, batch, index, t, noise, nft, autocast, old)
    backward(modality_loss(losses, nft) * scale)
    return {name: loss.detach() for name, loss in losses.items()}


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` takes a ``found_inf`` flag and skips its step on the device (torch's fused AdamW)."""
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def optimizer_step(policies: Policies, optimizer: torch.optim.Optimizer, grad_clip: float) -> dict[str, torch.Tensor]:
    """Clip the accumulated gradients, step and clear them; returns the gradient norms (total and per stream) as
    device scalars. A non-finite norm skips the step on the device with torch's fused AdamW (parameters and
    optimiser state untouched, no host read; ``nft_update`` reports it once per iteration); other optimisers check
    it on the host here."""
    norms = {f"grad_norm/{stream}_params": _grad_norm(policies.streams[stream]) for stream in STREAMS}
    with_grad = [p for p in policies.parameters if p.grad is not None]
    grad_total = torch.nn.utils.clip_grad_norm_(with_grad, grad_clip)
    step_if_finite(optimizer, grad_total)
    return {"grad_norm/total": grad_total.detach(), **norms}


def step_if_finite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
    """``optimizer.step()`` and clear the gradients, unless ``grad_norm`` (a device scalar) is not finite: torch's
    fused AdamW skips the step on the device (no host read); other optimisers check the norm on the host."""
    if _skips_on_device(optimizer):
        optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    else:
        check_finite("gradient norm", grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _device_seconds(device: torch.device, start: float) -> float:
    """Seconds since ``start`` (``time.perf_counter``) once ``device`` has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class UpdateEngine(Protocol):
    """How ``nft_update`` runs on several ranks (``train/distributed.py``): this rank's share of a micro-batch,
    the no-sync context until the accumulation boundary, the engine's backward and step, metrics over ranks."""

    def local(
        self, part: torch.Tensor, t: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]: ...

    def micro_batch(self, boundary: bool) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> dict[str, torch.Tensor]: ...

    def mean(self, value: torch.Tensor) -> torch.Tensor: ...


def nft_update(
    policies: Policies,
    optimizer: torch.optim.Optimizer,
    batch: UpdateBatch,
    generator: torch.Generator,
    spec: LatentSpec,
    *,
    nft: NFTConfig,
    sampling: SamplingConfig,
    grad_clip: float,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    on_step: Callable[[], None] | None = None,
    engine: UpdateEngine | None = None,
) -> dict[str, float]:
    """The NFT update of one iteration: ``K`` training times per sample (``training_times``), shuffled into
    micro-batches of ``nft.mini_batch`` with fresh noise each, one optimiser step per micro-batch or per iteration
    (``nft.accumulate``). With an ``engine`` each rank trains on its share of every micro-batch (``optimizer`` is
    the engine's) and the losses are averaged over the ranks.

    With ``nft.precompute_old`` the old policy's and the reference's velocities of every (sample, time) pair are
    computed first, in no-grad batches of ``nft.predict_batch`` (``old_predictions``), so each training step runs
    one forward and one backward; otherwise each step computes them itself (same values with
    ``predict_batch = mini_batch``). The losses and gradient norms stay on the device until one host read at the
    end, which raises ``TrainingDiverged`` when one is not finite.

    Returns:
        The losses averaged over the micro-batches, the gradient norms over the steps, and the seconds of the
        old/reference predictions (``time/old_ref``) and of the training steps (``time/train``).
    """
    index, times = training_times(len(batch.video), generator, nft, sampling)
    starts = range(0, len(index), nft.mini_batch)
    noises = [draw_noise(spec, len(index[lo : lo + nft.mini_batch]), generator, device) for lo in starts]
    index, times = to_device(index, device), to_device(times, device)
    parts = [
        (index[lo : lo + nft.mini_batch], times[lo : lo + nft.mini_batch], noises[i]) for i, lo in enumerate(starts)
    ]
    if engine is not None:
        parts = [engine.local(*part) for part in parts]
    start = time.perf_counter()
    old = None
    if nft.precompute_old:
        noise = (torch.cat([p[2][0] for p in parts]), torch.cat([p[2][1] for p in parts]))
        chunk = nft.predict_batch or nft.mini_batch
        pairs, pair_times = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        old = old_predictions(policies, batch, pairs, pair_times, noise, chunk=chunk, autocast=autocast)
    old_seconds = _device_seconds(device, start)
    start = time.perf_counter()
    per_step = len(starts) if nft.accumulate == "iteration" else 1
    losses, steps, lo = [], [], 0
    optimizer.zero_grad(set_to_none=True)
    for i, (part, t, noise) in enumerate(parts):
        rows, lo = slice(lo, lo + len(part)), lo + len(part)
        boundary = (i + 1) % per_step == 0
        with contextlib.nullcontext() if engine is None else engine.micro_batch(boundary):
            losses.append(
                nft_backward(
                    policies,
                    batch,
                    part,
                    t,
                    noise,
                    nft=nft,
                    autocast=autocast,
                    scale=1.0 / per_step,
                    old=None if old is None else old[rows],
                    backward=torch.Tensor.backward if engine is None else engine.backward,
                )
            )
        if boundary:
            steps.append(optimizer_step(policies, optimizer, grad_clip) if engine is None else engine.step())
        if on_step is not None:
            on_step()
    means = {f"loss/{name}": torch.stack([m[name] for m in losses]).mean() for name in ("video", "audio")}
    if engine is not None:
        means = {key: engine.mean(value) for key, value in means.items()}
    norms = {key: torch.stack([step[key].to(device) for step in steps]).mean() for key in steps[0]}
    values = dict(zip([*means, *norms], torch.stack([*means.values(), *norms.values()]).tolist(), strict=True))
    for key in ("loss/video", "loss/audio", "grad_norm/total"):
        if not math.isfinite(values[key]):
            name = "gradient norm" if key == "grad_norm/total" else f"{key.split('/')[1]} loss"
            raise TrainingDiverged(f"{name} is not finite ({values[key]})")
    return values | {"time/old_ref": old_seconds, "time/train": _device_seconds(device, start)}


def old_policy_eta(iteration: int, nft: NFTConfig) -> float:
    """``eta = min(eta_rate * iteration, eta_max)``: how much of ``theta_old`` an update keeps."""
    return min(nft.eta_rate * iteration, nft.eta_max)


@torch.no_grad()
def update_old_policy(policies: Policies, eta: float) -> None:
    """``theta_old <- eta theta_old + (1 - eta) theta`` (the EMA copy in full fine-tuning, the ``old`` adapter
    with LoRA)."""
    if policies.adapters is not None:
        policies.adapters.blend_old(eta)
        return
    old = list(policies.old.parameters())
    new = [p.detach() for p in policies.policy.parameters()]
    torch._foreach_lerp_(old, new, 1.0 - eta)
