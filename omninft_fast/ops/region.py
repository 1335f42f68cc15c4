"""Region-wise reweighting: Eq 10 (per-video-token V2A scores) and Eq 11 (scores to loss weights)."""

from __future__ import annotations

import torch

from omninft_fast._checks import check_finite_tensor, check_scalar, check_tensor, value_checks_on


def _check_int(name: str, value: object, low: int = 0, upper: int | None = None) -> int:
    """Check ``low <= value < upper`` for an int ``value``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (upper is not None and value >= upper):
        bound = f"in {low}..{upper - 1}" if upper is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return value


class RegionScoreAccumulator:
    """Eq 10: ``s_i = mean over l >= boundary and the last `last_steps` sampling steps of key_mass[l, t][i]``.

    Sampling steps are numbered ``0 .. num_steps - 1`` in sampling order, so the last ``last_steps`` are the least
    noisy. ``add`` ignores any (layer, step) outside that set; ``wants`` tells a sampler whether to compute the
    key mass at all.

    Args:
        num_steps: sampling steps per trajectory.
        last_steps: how many of the final steps count (``|T|``), ``1 .. num_steps``.
        boundary: first deep layer ``L``; layers ``l >= L`` count.
    """

    def __init__(self, *, num_steps: int, last_steps: int, boundary: int = 10) -> None:
        self.num_steps = _check_int("num_steps", num_steps, low=1)
        self.last_steps = _check_int("last_steps", last_steps, low=1, upper=num_steps + 1)
        self.boundary = _check_int("boundary", boundary)
        self.reset()

    def reset(self) -> None:
        """Forget everything added so far (start of a new batch of trajectories)."""
        self._sum: torch.Tensor | None = None
        self.count = 0

    def wants(self, layer: int, step: int) -> bool:
        """Whether the key mass of ``layer`` at sampling ``step`` enters Eq 10."""
        _check_int("layer", layer)
        _check_int("step", step, upper=self.num_steps)
        return layer >= self.boundary and step >= self.num_steps - self.last_steps

    def add(self, layer: int, step: int, key_mass: torch.Tensor) -> bool:
        """Add one layer's V2A key mass ``(B, Nv)`` at sampling ``step``; returns whether it was kept."""
        if not self.wants(layer, step):
            return False
        check_tensor("key_mass", key_mass, ndim=2)
        if self._sum is None:
            self._sum = key_mass.detach().to(torch.float64 if key_mass.dtype == torch.float64 else torch.float32)
        else:
            if key_mass.shape != self._sum.shape or key_mass.device != self._sum.device:
                raise ValueError(
                    f"key_mass has shape {tuple(key_mass.shape)} on {key_mass.device}, but earlier ones had "
                    f"{tuple(self._sum.shape)} on {self._sum.device}"
                )
            self._sum = self._sum + key_mass.detach().to(self._sum.dtype)
        self.count += 1
        return True

    def scores(self) -> torch.Tensor:
        """``(B, Nv)`` per-token scores ``s`` (the mean of everything kept)."""
        if self._sum is None:
            raise RuntimeError(
                f"no key mass was added for layers >= {self.boundary} in the last {self.last_steps} of "
                f"{self.num_steps} steps"
            )
        return self._sum / self.count


def region_weights(scores: torch.Tensor, *, lam: float = 1.5, check_values: bool | None = None) -> torch.Tensor:
    """Eq 11: ``w_i = 1 + lam * (s_i - min s) / (max s - min s)`` per sample, in ``[1, 1 + lam]``.

    A sample whose scores are all equal gets weights of exactly 1. ``nft_loss(token_weight=w)`` then applies
    Eq 12's ``w / sum(w)``.

    That ``scores`` is finite (``check_region_weights_values``) is checked only when ``check_values`` is on: by
    default for CPU tensors, never for CUDA tensors (the check would wait for the GPU) nor while ``torch.compile``
    traces.

    Args:
        scores: ``(B, N)`` per-token scores (``RegionScoreAccumulator.scores()``).
        lam: reweighting strength, ``>= 0``.
        check_values: check the values (True / False); None: ``$OMNINFT_CHECK_VALUES`` (``1`` / ``0``) if set, else
            on for CPU tensors. Always off while ``torch.compile`` traces.

    Returns:
        ``(B, N)`` weights, float32 (float64 for float64 scores).
    """
    check_tensor("scores", scores, ndim=2)
    if scores.shape[1] < 1:
        raise ValueError(f"scores must have at least one token per sample, got shape {tuple(scores.shape)}")
    lam = check_scalar("lam", lam, low=0.0)
    if value_checks_on(check_values, scores.device):
        check_region_weights_values(scores)
    s = scores.detach().to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    # Halves first: differences of finite scores stay finite (the same quotient otherwise, halving being exact).
    half, lo = s / 2, s.amin(dim=1, keepdim=True) / 2
    span = s.amax(dim=1, keepdim=True) / 2 - lo
    normalised = torch.where(span > 0, (half - lo) / torch.where(span > 0, span, 1.0), 0.0)
    return 1.0 + lam * normalised


def frame_region_weights(
    scores: torch.Tensor,
    *,
    frames: int,
    w_max: float = 1.5,
    ramp: float = 1.0,
    check_values: bool | None = None,
) -> torch.Tensor:
    """The authors' released alternative to Eq 11: per latent frame, the z-score ``z`` of the scores over that
    frame's tokens (unbiased standard deviation), ``w = 1 + (m - 1) * sigmoid(z (m - 1))`` with the largest weight
    warmed up as the release does, ``m = 1 + ramp (w_max - 1)`` (the sigmoid's slope ramps with it).

    A frame whose scores are all equal gets ``z = 0``. Value checks as ``region_weights``.

    Args:
        scores: ``(B, N)`` per-token scores, frame-major (``N = frames * tokens_per_frame``).
        frames: latent frames per sample, dividing ``N``.
        w_max: largest weight, ``>= 1``.
        ramp: warm-up factor in ``[0, 1]`` (the release: ``iteration / 400``, capped at 1).
        check_values: as ``region_weights``.

    Returns:
        ``(B, N)`` weights in ``[1, m)``, float32 (float64 for float64 scores).
    """
    check_tensor("scores", scores, ndim=2)
    if scores.shape[1] == 0:
        raise ValueError(f"scores must have at least one token per sample, got shape {tuple(scores.shape)}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or scores.shape[1] % frames:
        raise ValueError(f"frames must be a positive int dividing {scores.shape[1]} tokens, got {frames!r}")
    w_max = check_scalar("w_max", w_max, low=1.0)
    ramp = check_scalar("ramp", ramp, low=0.0, high=1.0)
    if value_checks_on(check_values, scores.device):
        check_region_weights_values(scores)
    s = scores.detach().to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    if s.shape[0] == 0:
        return s.clone()
    per_frame = s.view(s.shape[0], frames, scores.shape[1] // frames)
    std = per_frame.std(dim=2, keepdim=True, correction=1)  # NaN for a one-token frame, which is flat
    # Flat exactly where min == max (a rounded std of equal values need not be 0).
    spread = (per_frame.amax(dim=2, keepdim=True) > per_frame.amin(dim=2, keepdim=True)) & (std > 0)
    z = torch.where(spread, (per_frame - per_frame.mean(dim=2, keepdim=True)) / torch.where(spread, std, 1.0), 0.0)
    top = ramp * (w_max - 1.0)  # m - 1
    return (1.0 + top * torch.sigmoid(z * top)).view_as(s)


def check_region_weights_values(scores: torch.Tensor) -> None:
    """The value check of ``region_weights``: ``ValueError`` naming the first non-finite element of ``scores``.
    Reads the values, so it waits for a GPU to finish the work queued so far."""
    check_finite_tensor("scores", scores)
