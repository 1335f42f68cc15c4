"""The DiffusionNFT objective (Eq 3-5) with OmniNFT's region-weighted token mean (Eq 12)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from omninft_fast import dispatch
from omninft_fast._checks import (
    check_finite_tensor,
    check_range,
    check_same_device,
    check_scalar,
    check_shape,
    check_tensor,
    compute_dtype,
    value_checks_on,
)
from omninft_fast.profiling import nvtx_range


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    *,
    beta: float,
    token_weight: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
    inverse_beta_scale: bool = False,
    policy_scale: float = 1.0,
    x0_norm_t: torch.Tensor | None = None,
    kl_weight: float = 0.0,
    v_ref: torch.Tensor | None = None,
    kl_space: str = "velocity",
    backend: str | None = None,
    check_values: bool | None = None,
) -> torch.Tensor:
    """NFT loss of one modality stream; the gradient flows to ``v_theta`` only.

    With ``v+ = (1 - beta) v_old + beta v_theta``, ``v- = (1 + beta) v_old - beta v_theta`` (Eq 4-5) and the
    weighted token-and-channel mean ``M_b[x] = sum_i w[b, i] mean_c x[b, i, c] / sum_i w[b, i]`` (Eq 12)::

        L[b] = r[b] M_b[(v+ - target)^2] + (1 - r[b]) M_b[(v- - target)^2]                    (Eq 3)
        loss = s * mean_b(sample_weight[b] * L[b]) + KL

    where ``w = token_weight`` (1 when None) and ``s = policy_scale / beta`` if ``inverse_beta_scale``
    (DiffusionNFT's convention) else ``policy_scale``. With ``x0_norm_t = t`` each term is instead self-normalised
    per sample in x0 space, as DiffusionNFT and the authors' release compute it (``x0(u) - x0 = -t (u - target)``)::

        pos[b] = t_b^2 M_b[(v+ - target)^2] / max(t_b mean_{i,c} |v+ - target|, 1e-5)
        neg[b] = t_b^2 M_b[(v- - target)^2] / max(t_b mean_{i,c} |v- - target|, 1e-5)
        L[b]   = r[b] pos[b] + (1 - r[b]) neg[b]

    with the normalisers (the denominators, the sample's plain mean absolute error, as the release computes them:
    region weights weigh only the squared error) under stop-gradient. The release is ``beta=1, inverse_beta_scale=True,
    policy_scale=5`` (its ``adv_clip_max``) with ``r = optimality_probability(adv, clip=5)``.
    ``adaptive_x0_weight`` is the older one-weight approximation (``v+``'s error normalises both terms).
    The regulariser is ``KL = kl_weight * mean (v_theta - v_ref)^2`` (``kl_space="velocity"``) or, in x0 space,
    ``KL = kl_weight * mean_b(t_b^2 mean_{i,c} (v_theta - v_ref)^2)`` (``kl_space="x0"``, ``t = x0_norm_t``).

    Types, shapes, devices and the Python scalars are checked on every call. The values of ``r``, ``token_weight``,
    ``sample_weight`` and ``x0_norm_t`` (``check_nft_loss_values``) are checked only when ``check_values`` is on: by
    default for CPU tensors, never for CUDA tensors (the check would wait for the GPU) nor while ``torch.compile``
    traces.

    Args:
        v_theta: ``(B, N, C)`` velocity of the trained policy.
        v_old: ``(B, N, C)`` velocity of the old policy (no gradient).
        target: ``(B, N, C)`` flow-matching target ``x1 - x0``.
        r: ``(B,)`` optimality probabilities in ``[0, 1]`` (Eq 6).
        beta: mixing strength, ``> 0``.
        token_weight: ``(B, N)`` non-negative per-token weights, each sample's sum ``> 0`` (Eq 11-12).
        sample_weight: ``(B,)`` non-negative per-sample weights (e.g. ``adaptive_x0_weight``).
        inverse_beta_scale: divide the policy term by ``beta``.
        policy_scale: factor on the policy term, ``> 0``.
        x0_norm_t: ``(B,)`` flow time of each sample, ``> 0``: self-normalise each term in x0 space (above).
        kl_weight: weight of the regulariser towards ``v_ref``, ``>= 0``.
        v_ref: ``(B, N, C)`` reference velocity; required when ``kl_weight > 0``.
        kl_space: ``velocity`` | ``x0`` (needs ``x0_norm_t``): where the regulariser measures the distance.
        backend: ``auto`` | ``triton`` | ``cpp`` | ``reference``; default from ``$OMNINFT_BACKEND``.
        check_values: check the values above (True / False); None: ``$OMNINFT_CHECK_VALUES`` (``1`` / ``0``) if
            set, else on for CPU tensors. Always off while ``torch.compile`` traces.

    Returns:
        Scalar loss in float32 (float64 when ``v_theta`` is float64).
    """
    check_tensor("v_theta", v_theta, ndim=3)
    check_tensor("v_old", v_old, ndim=3)
    check_tensor("target", target, ndim=3)
    check_tensor("r", r, ndim=1)
    check_same_device("v_theta", v_theta, v_old=v_old, target=target, r=r)
    if min(v_theta.shape) < 1:
        raise ValueError(f"v_theta must have non-empty dimensions, got shape {tuple(v_theta.shape)}")
    batch, tokens, _ = v_theta.shape
    check_shape("v_old", v_old, v_theta.shape, "the shape of v_theta")
    check_shape("target", target, v_theta.shape, "the shape of v_theta")
    check_shape("r", r, (batch,), "one per sample of v_theta")
    beta = check_scalar("beta", beta, low=0.0, low_inclusive=False)
    policy_scale = check_scalar("policy_scale", policy_scale, low=0.0, low_inclusive=False)
    kl_weight = check_scalar("kl_weight", kl_weight, low=0.0)
    if kl_space not in ("velocity", "x0"):
        raise ValueError(f"kl_space={kl_space!r} must be 'velocity' or 'x0'")
    if x0_norm_t is not None:
        check_tensor("x0_norm_t", x0_norm_t, ndim=1)
        check_same_device("v_theta", v_theta, x0_norm_t=x0_norm_t)
        check_shape("x0_norm_t", x0_norm_t, (batch,), "one per sample of v_theta")
    elif kl_space == "x0":
        raise ValueError("x0_norm_t must be given when kl_space='x0'")
    if token_weight is not None:
        check_tensor("token_weight", token_weight, ndim=2)
        check_same_device("v_theta", v_theta, token_weight=token_weight)
        check_shape("token_weight", token_weight, (batch, tokens), "(B, N) of v_theta")
    if sample_weight is not None:
        check_tensor("sample_weight", sample_weight, ndim=1)
        check_same_device("v_theta", v_theta, sample_weight=sample_weight)
        check_shape("sample_weight", sample_weight, (batch,), "one per sample of v_theta")
    if v_ref is not None:
        check_tensor("v_ref", v_ref, ndim=3)
        check_same_device("v_theta", v_theta, v_ref=v_ref)
        check_shape("v_ref", v_ref, v_theta.shape, "the shape of v_theta")
    elif kl_weight > 0:
        raise ValueError("v_ref must be given when kl_weight > 0")
    if not isinstance(inverse_beta_scale, bool):
        raise TypeError(f"inverse_beta_scale must be a bool, got {type(inverse_beta_scale).__name__}")
    if value_checks_on(check_values, v_theta.device):
        check_nft_loss_values(r, token_weight=token_weight, sample_weight=sample_weight, x0_norm_t=x0_norm_t)
    name, impl = dispatch.select("nft_loss", v_theta.device, backend)
    with nvtx_range(f"omninft.nft_loss.{name}"):
        return impl(
            v_theta,
            v_old,
            target,
            r,
            token_weight=token_weight,
            sample_weight=sample_weight,
            v_ref=v_ref if kl_weight > 0 else None,
            x0_norm_t=x0_norm_t,
            kl_t=x0_norm_t if kl_space == "x0" and kl_weight > 0 else None,
            beta=beta,
            policy_scale=policy_scale / beta if inverse_beta_scale else policy_scale,
            kl_weight=kl_weight,
        )


def check_nft_loss_values(
    r: torch.Tensor,
    *,
    token_weight: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
    x0_norm_t: torch.Tensor | None = None,
) -> None:
    """The value checks of ``nft_loss``, for callers that run them once outside the hot path.

    Raises ``ValueError`` naming the first bad element: ``r`` outside ``[0, 1]``; ``token_weight`` not finite,
    negative, or a sample's weights summing to ``<= 0``; ``sample_weight`` not finite or negative; ``x0_norm_t``
    not finite or ``<= 0``. Reads the values, so it waits for a GPU to finish the work queued so far.

    Args:
        r: ``(B,)`` optimality probabilities.
        token_weight: ``(B, N)`` per-token weights or None.
        sample_weight: ``(B,)`` per-sample weights or None.
        x0_norm_t: ``(B,)`` flow times or None.
    """
    check_tensor("r", r, ndim=1)
    batch = r.shape[0]
    for name, x, ndim in (
        ("token_weight", token_weight, 2),
        ("sample_weight", sample_weight, 1),
        ("x0_norm_t", x0_norm_t, 1),
    ):
        if x is not None:
            check_tensor(name, x, ndim=ndim)
            if x.shape[0] != batch:
                raise ValueError(
                    f"{name} must have r's {batch} samples in its first dimension, got shape {tuple(x.shape)}"
                )
    check_range("r", r, 0.0, 1.0)
    if token_weight is not None:
        check_finite_tensor("token_weight", token_weight)
        check_range("token_weight", token_weight, 0.0, float("inf"))
        sums = token_weight.sum(dim=1)
        if bool((sums <= 0).any()):
            b = int((sums <= 0).nonzero()[0])
            raise ValueError(f"token_weight[{b}] sums to {sums[b].item()}; each sample's weights must sum to > 0")
    if sample_weight is not None:
        check_finite_tensor("sample_weight", sample_weight)
        check_range("sample_weight", sample_weight, 0.0, float("inf"))
    if x0_norm_t is not None:
        check_finite_tensor("x0_norm_t", x0_norm_t)
        if bool((x0_norm_t <= 0).any()):
            b = int((x0_norm_t <= 0).nonzero()[0])
            raise ValueError(f"x0_norm_t[{b}] = {x0_norm_t[b].item()} must be > 0")


# DiffusionNFT's floor on the x0-space mean absolute error that normalises each term.
X0_NORM_MIN_ERROR = 1e-5


def nft_loss_reference(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    *,
    token_weight: torch.Tensor | None,
    sample_weight: torch.Tensor | None,
    v_ref: torch.Tensor | None,
    x0_norm_t: torch.Tensor | None,
    kl_t: torch.Tensor | None,
    beta: float,
    policy_scale: float,
    kl_weight: float,
) -> torch.Tensor:
    """PyTorch reference of ``nft_loss`` (inputs already validated), accumulating in float32 or float64.

    Every ``nft_loss`` backend has this signature; ``policy_scale`` is ``s`` of ``nft_loss``'s formula, ``v_ref``
    is None unless ``kl_weight > 0`` and ``kl_t`` (``(B,)``) is ``x0_norm_t`` for the x0-space KL, else None.
    """
    acc = compute_dtype(v_theta.dtype)
    theta = v_theta.to(acc)
    old = v_old.detach().to(acc)
    tgt = target.detach().to(acc)
    pos = (1.0 - beta) * old + beta * theta - tgt
    neg = (1.0 + beta) * old - beta * theta - tgt
    if token_weight is None:
        w = torch.ones(theta.shape[:2], dtype=acc, device=theta.device)
    else:
        w = token_weight.detach().to(acc)
    w = w / w.sum(dim=1, keepdim=True)

    def sample_mean(x: torch.Tensor) -> torch.Tensor:
        return (w * x.mean(dim=2)).sum(dim=1)

    r_b = r.detach().to(acc)
    pos_term, neg_term = sample_mean(pos.square()), sample_mean(neg.square())
    if x0_norm_t is not None:
        t = x0_norm_t.detach().to(acc)
        with torch.no_grad():
            pos_norm = (t * pos.abs().mean(dim=(1, 2))).clamp_min(X0_NORM_MIN_ERROR)
            neg_norm = (t * neg.abs().mean(dim=(1, 2))).clamp_min(X0_NORM_MIN_ERROR)
        pos_term = t.square() * pos_term / pos_norm
        neg_term = t.square() * neg_term / neg_norm
    per_sample = r_b * pos_term + (1.0 - r_b) * neg_term
    if sample_weight is not None:
        per_sample = sample_weight.detach().to(acc) * per_sample
    loss = policy_scale * per_sample.mean()
    if v_ref is not None:
        kl = (theta - v_ref.detach().to(acc)).square().mean(dim=(1, 2))
        if kl_t is not None:
            kl = kl_t.detach().to(acc).square() * kl
        loss = loss + kl_weight * kl.mean()
    return loss


# A fused forward op: (v_theta, v_old, target, r, token_weight, sample_weight, v_ref, x0_norm_t, kl_t, beta,
# policy_scale, kl_weight) -> (loss (), dloss/dv_theta (B, N, C)).
FusedForward = Callable[..., tuple[torch.Tensor, torch.Tensor]]
Rescale = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def nft_loss_fused_fake(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    token_weight: torch.Tensor | None,
    sample_weight: torch.Tensor | None,
    v_ref: torch.Tensor | None,
    x0_norm_t: torch.Tensor | None,
    kl_t: torch.Tensor | None,
    beta: float,
    policy_scale: float,
    kl_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake (meta) implementation of the fused forward ops: ``(loss (), dloss/dv_theta like v_theta)``."""
    loss = v_theta.new_empty((), dtype=compute_dtype(v_theta.dtype))
    return loss, torch.empty_like(v_theta, memory_format=torch.contiguous_format)


class _FusedNFTLoss(torch.autograd.Function):
    """Forward computes the loss and its gradient in one pass; backward only rescales the saved gradient."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        fused_forward: FusedForward,
        rescale_: Rescale | None,
        v_theta: torch.Tensor,
        v_old: torch.Tensor,
        target: torch.Tensor,
        r: torch.Tensor,
        token_weight: torch.Tensor | None,
        sample_weight: torch.Tensor | None,
        v_ref: torch.Tensor | None,
        x0_norm_t: torch.Tensor | None,
        kl_t: torch.Tensor | None,
        beta: float,
        policy_scale: float,
        kl_weight: float,
    ) -> torch.Tensor:
        loss, grad = fused_forward(
            v_theta,
            v_old,
            target,
            r,
            token_weight,
            sample_weight,
            v_ref,
            x0_norm_t,
            kl_t,
            beta,
            policy_scale,
            kl_weight,
        )
        ctx.save_for_backward(grad)
        ctx.rescale_ = rescale_
        ctx.rescaled = False
        return loss

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        if ctx.rescale_ is not None and not torch.compiler.is_compiling():
            # In place and without reading grad_output on the host: no sync, no pass over the gradient when it is 1.
            if ctx.rescaled:
                raise RuntimeError(
                    "nft_loss: this backend scales its stored gradient in place, so it backpropagates once per "
                    "forward; call the loss again instead of backward(retain_graph=True) twice"
                )
            ctx.rescaled = True
            grad = ctx.rescale_(grad, grad_output.detach().reshape(1))
        elif not (grad_output.device.type == "cpu" and not torch.compiler.is_compiling() and bool(grad_output == 1)):
            # Skipping the usual grad_output == 1 reads its value: done for CPU tensors in eager mode only (a GPU
            # would synchronise, a compiled graph would break).
            grad = grad * grad_output.to(grad.dtype)
        return None, None, grad, *([None] * 11)


class FusedNFTLossBackend:
    """The ``nft_loss`` backend of a fused forward op, shared by the Triton and C++ losses.

    Registers ``nft_loss_fused_fake`` as the fake implementation of ``op_name`` and runs the op under one
    autograd wrapper: forward computes the loss and its gradient, backward rescales the saved gradient. Called
    with ``nft_loss_reference``'s signature.

    Args:
        op_name: ``"namespace::name"`` of a registered op with ``FusedForward``'s schema.
        eager: a plain function with the op's signature that runs instead of the op outside ``torch.compile``
            (it skips the dispatcher's overhead); None always runs the op.
        rescale_: ``(grad, grad_output (1,)) -> grad`` multiplying the saved gradient in place without a host read
            (eager mode; the loss then backpropagates once per forward); None multiplies out of place.
    """

    def __init__(self, op_name: str, eager: FusedForward | None = None, rescale_: Rescale | None = None) -> None:
        torch.library.register_fake(op_name)(nft_loss_fused_fake)
        namespace, name = op_name.split("::")
        self.op = getattr(getattr(torch.ops, namespace), name).default
        self.eager = eager
        self.rescale_ = rescale_

    def _forward(self, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        forward = self.op if self.eager is None or torch.compiler.is_compiling() else self.eager
        return forward(*args)

    def __call__(
        self,
        v_theta: torch.Tensor,
        v_old: torch.Tensor,
        target: torch.Tensor,
        r: torch.Tensor,
        *,
        token_weight: torch.Tensor | None,
        sample_weight: torch.Tensor | None,
        v_ref: torch.Tensor | None,
        x0_norm_t: torch.Tensor | None,
        kl_t: torch.Tensor | None,
        beta: float,
        policy_scale: float,
        kl_weight: float,
    ) -> torch.Tensor:
        """Scalar loss in float32 (float64 for float64 ``v_theta``); its gradient flows to ``v_theta`` only."""
        return _FusedNFTLoss.apply(
            self._forward,
            self.rescale_,
            v_theta,
            v_old.detach(),
            target.detach(),
            r.detach(),
            token_weight,
            sample_weight,
            None if v_ref is None else v_ref.detach(),
            None if x0_norm_t is None else x0_norm_t.detach(),
            None if kl_t is None else kl_t.detach(),
            beta,
            policy_scale,
            kl_weight,
        )

    def __repr__(self) -> str:
        return f"FusedNFTLossBackend({self.op})"


@torch.no_grad()
def adaptive_x0_weight(
    x_t: torch.Tensor, x0: torch.Tensor, v_pos: torch.Tensor, t: torch.Tensor, *, min_error: float = 1e-5
) -> torch.Tensor:
    """DiffusionNFT's adaptive per-sample weight, for ``nft_loss(sample_weight=...)``.

    With ``x0_pred = x_t - t * v+`` the weight is ``t^2 / max(mean |x0_pred - x0|, min_error)``: it turns the
    velocity-space error ``|v+ - v|^2`` into DiffusionNFT's x0-space error ``|x0_pred - x0|^2`` divided by its
    own (detached) mean magnitude. DiffusionNFT normalises its negative term by the error of ``v-`` instead; one
    per-sample weight cannot express that, so this factor (from ``v+``) weights both terms.

    Args:
        x_t, x0, v_pos: ``(B, N, C)`` noisy latent, clean latent and positive velocity ``v+``.
        t: ``(B,)`` flow time of ``x_t``.

    Returns:
        ``(B,)`` weights in float32 (float64 for float64 inputs).
    """
    check_tensor("x_t", x_t, ndim=3)
    check_tensor("x0", x0, ndim=3)
    check_tensor("v_pos", v_pos, ndim=3)
    check_tensor("t", t, ndim=1)
    check_same_device("x_t", x_t, x0=x0, v_pos=v_pos, t=t)
    check_shape("x0", x0, x_t.shape, "the shape of x_t")
    check_shape("v_pos", v_pos, x_t.shape, "the shape of x_t")
    check_shape("t", t, x_t.shape[:1], "one per sample of x_t")
    min_error = check_scalar("min_error", min_error, low=0.0, low_inclusive=False)
    acc = compute_dtype(x_t.dtype)
    t_b = t.to(acc)
    x0_pred = x_t.to(acc) - t_b[:, None, None] * v_pos.to(acc)
    error = (x0_pred - x0.to(acc)).abs().mean(dim=(1, 2)).clamp_min(min_error)
    return t_b.square() / error
