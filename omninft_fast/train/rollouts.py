"""An iteration's rollouts in micro-batches, each decoded and scored while the next one samples.

``sample_and_score`` draws the noise of every sample at once (so ``sampling.batch_size`` changes how the work is cut,
not what is sampled), runs ``stages.rollout`` on micro-batches of ``sampling.batch_size`` (every guidance pass of a
step in one batched forward, Eq 10 capture only on the passes and steps that need it), and hands each finished
micro-batch to one worker thread that decodes and scores it (``stages.score``) while the sampler goes on. On CUDA the
worker runs on its own stream, ordered after the micro-batch's sampling by an event. Results are concatenated in
sample order, so they are the same with and without the overlap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from omninft_fast.rewards import RewardModel
from omninft_fast.train import stages
from omninft_fast.train.builders import PromptRecord
from omninft_fast.train.config import SamplingConfig
from omninft_fast.train.model import AVTask, AVVelocityModel
from omninft_fast.train.stages import Rollout, Scores, concat_rollouts, concat_scores


class _Scorer:
    """One worker thread (``overlap``) or the caller's thread that decodes and scores micro-batches, adding its busy
    seconds to ``times["decode"]`` and ``times["reward"]``."""

    def __init__(
        self,
        task: AVTask,
        rewards: list[RewardModel],
        terms: list[dict[str, float] | None] | None,
        device: torch.device,
        overlap: bool,
    ) -> None:
        self.task, self.rewards, self.terms = task, rewards, terms
        self.times = {"decode": 0.0, "reward": 0.0}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="omninft-score") if overlap else None
        self.stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None

    def _score(self, part: Rollout, ready: torch.cuda.Event | None) -> Scores:
        with torch.no_grad():
            if self.stream is None:
                return stages.score(self.task, self.rewards, part, self.terms, times=self.times)
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                out = stages.score(self.task, self.rewards, part, self.terms, times=self.times)
            self.stream.synchronize()
            return out

    def submit(self, part: Rollout) -> Future[Scores] | Scores:
        """Score ``part`` now, or queue it on the worker (after the sampling stream's work so far on CUDA)."""
        if self.pool is None:
            return self._score(part, None)
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        return self.pool.submit(self._score, part, ready)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def micro_batches(count: int, sampling: SamplingConfig) -> range:
    """The first sample of each rollout micro-batch of ``count`` samples (``sampling.batch_size``; 0: one batch)."""
    return range(0, count, max(1, sampling.batch_size or count))


def sample_and_score(
    model: AVVelocityModel,
    task: AVTask,
    rewards: list[RewardModel],
    records: list[PromptRecord],
    generator: torch.Generator,
    *,
    sampling: SamplingConfig,
    device: torch.device,
    terms: list[dict[str, float] | None] | None = None,
    autocast_dtype: torch.dtype | None = None,
    handle: Any = None,
    last_steps: int = 1,
    last_step: int | None = None,
    passes: str = "cond",
    on_step: Callable[[int], None] | None = None,
    share: Callable[[Any], Any] | None = None,
) -> tuple[Rollout, Scores, dict[str, float]]:
    """Sample one rollout per record (``prompt_av`` conditions; ``prompt_v`` / ``prompt_a`` reach the rewards) in
    micro-batches of ``sampling.batch_size`` (0: all at once) and score them, overlapped with ``sampling.overlap``.
    ``share`` keeps this rank's part of the records and of the whole batch's noise (``distributed.Dist.local``).

    Returns:
        The ``B`` samples, their scores, and seconds per phase: ``rollout`` (sampling on the caller's thread),
        ``decode`` and ``reward`` (the scorer's busy time), ``score_wait`` (the caller waiting for the scorer after
        the last micro-batch). Times on CUDA are host times at these points (the last wait synchronises).
    """
    noise_video, noise_audio = stages.draw_noise(task.spec, len(records), generator, device)
    if share is not None:
        records, noise_video, noise_audio = share(records), share(noise_video), share(noise_audio)
    starts = micro_batches(len(records), sampling)
    size = starts.step
    scorer = _Scorer(task, rewards, terms, device, sampling.overlap and len(starts) > 1)
    parts: list[Rollout] = []
    pending: list[Future[Scores] | Scores] = []
    sampling_seconds = 0.0
    try:
        for lo in starts:
            for finished in pending:  # a scoring error surfaces before the next micro-batch is sampled
                if isinstance(finished, Future) and finished.done():
                    finished.result()
            chunk = records[lo : lo + size]
            start = time.perf_counter()
            parts.append(
                stages.rollout(
                    model,
                    task,
                    [r.av for r in chunk],
                    generator,
                    sampling=sampling,
                    device=device,
                    autocast_dtype=autocast_dtype,
                    handle=handle,
                    last_steps=last_steps,
                    last_step=last_step,
                    passes=passes,
                    on_step=on_step,
                    video_prompts=[r.video for r in chunk],
                    audio_prompts=[r.audio for r in chunk],
                    noise=(noise_video[lo : lo + size], noise_audio[lo : lo + size]),
                )
            )
            sampling_seconds += time.perf_counter() - start
            pending.append(scorer.submit(parts[-1]))
        start = time.perf_counter()
        scores = [p.result() if isinstance(p, Future) else p for p in pending]
        wait = time.perf_counter() - start
    finally:
        scorer.close()
    times = {"rollout": sampling_seconds, **scorer.times, "score_wait": wait if scorer.pool is not None else 0.0}
    return concat_rollouts(parts), concat_scores(scores), times
