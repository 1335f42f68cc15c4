"""Cross-modal attention with partial stop-gradient on K/V (Eq 8) and per-key attention mass (Eq 10's inner sum)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from omninft_fast import dispatch
from omninft_fast._checks import (
    check_finite_tensor,
    check_same_device,
    check_scalar,
    check_tensor,
    compute_dtype,
    value_checks_on,
)
from omninft_fast.ops.surgery import partial_detach
from omninft_fast.profiling import nvtx_range

# Queries per tile when the reference sums attention mass: extra memory is B * H * tile * Nk floats.
KEY_MASS_QUERY_TILE = 128
# Scores the reference's check for undefined rows holds at once (64 MiB of float32), and the bound on a score's
# magnitude below which no score can overflow (float32's largest value is 3.4e38).
UNDEFINED_ROWS_FLOATS = 2**24
SCORE_BOUND = 1e37


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    kv_grad_scale: float = 1.0,
    return_key_mass: bool = False,
    backend: str | None = None,
    check_values: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of queries over keys/values of another stream, without mask.

    ``kv_grad_scale`` multiplies the gradients reaching ``k`` and ``v`` and leaves the forward unchanged: Eq 8
    with ``kv_grad_scale = 1 - alpha`` (A2V cross-attention of shallow layers). ``return_key_mass`` also returns,
    for every key, the softmax probability it receives summed over all queries and averaged over heads: Eq 10's
    inner sum when queries are audio and keys are video (V2A). The mass carries no gradient.

    Types, shapes, devices and the Python scalars are checked on every call; that ``q``, ``k`` and ``v`` are finite
    (``check_cross_attention_values``) only when ``check_values`` is on: by default for CPU tensors, never for
    CUDA tensors (the check would wait for the GPU) nor while ``torch.compile`` traces.

    Args:
        q: ``(B, Nq, H, D)`` queries.
        k: ``(B, Nk, H, D)`` keys, same dtype and device as ``q``.
        v: ``(B, Nk, H, D)`` values.
        softmax_scale: logit scale, default ``1 / sqrt(D)``.
        kv_grad_scale: gradient scale for ``k`` and ``v`` in ``[0, 1]``.
        return_key_mass: also return the ``(B, Nk)`` key mass, float32 (float64 for float64 inputs).
        backend: ``auto`` | ``triton`` | ``reference``; default from ``$OMNINFT_BACKEND``.
        check_values: check the values (True / False); None: ``$OMNINFT_CHECK_VALUES`` (``1`` / ``0``) if set, else
            on for CPU tensors. Always off while ``torch.compile`` traces.

    Returns:
        ``out`` of shape ``(B, Nq, H, D)`` in ``q``'s dtype, and the key mass when asked for.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_same_device("q", q, k=k, v=v)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}")
    batch, _, heads, dim = q.shape
    if min(q.shape) < 1:
        raise ValueError(f"q must have non-empty dimensions, got shape {tuple(q.shape)}")
    if k.shape[0] != batch or k.shape[2:] != (heads, dim):
        raise ValueError(f"k must have shape (B={batch}, Nk, H={heads}, D={dim}) to match q, got {tuple(k.shape)}")
    if k.shape[1] < 1:
        raise ValueError(f"k must have at least one key, got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(dim)
    softmax_scale = check_scalar("softmax_scale", softmax_scale, low=0.0, low_inclusive=False)
    kv_grad_scale = check_scalar("kv_grad_scale", kv_grad_scale, low=0.0, high=1.0)
    if not isinstance(return_key_mass, bool):
        raise TypeError(f"return_key_mass must be a bool, got {type(return_key_mass).__name__}")
    if value_checks_on(check_values, q.device):
        check_cross_attention_values(q, k, v)
    name, impl = dispatch.select("cross_attention", q.device, backend)
    with nvtx_range(f"omninft.cross_attention.{name}"):
        out, key_mass = impl(q, k, v, softmax_scale, kv_grad_scale, return_key_mass)
    return (out, key_mass) if return_key_mass else out


def check_cross_attention_values(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The value checks of ``cross_attention``: ``ValueError`` naming the first non-finite element of ``q``, ``k``
    or ``v`` (any shapes). Reads the values, so it waits for a GPU to finish the work queued so far."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_finite_tensor(name, x)


def cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    kv_grad_scale: float,
    return_key_mass: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch reference: SDPA in float32 (float64 for float64 inputs) on partially detached K/V. A row whose
    scores hold a NaN or an infinity has no softmax: its output is NaN, as in the Triton kernels (SDPA alone
    would give zeros).

    Returns ``(out (B, Nq, H, D), key_mass (B, Nk) or None)``, the key mass in the accumulation dtype.
    """
    acc = compute_dtype(q.dtype)
    alpha = 1.0 - kv_grad_scale
    k_s, v_s = partial_detach(k, alpha), partial_detach(v, alpha)
    out = F.scaled_dot_product_attention(
        q.to(acc).transpose(1, 2),
        k_s.to(acc).transpose(1, 2),
        v_s.to(acc).transpose(1, 2),
        scale=softmax_scale,
    )
    out = out.transpose(1, 2)
    undefined = _undefined_rows(q, k, softmax_scale)
    if undefined is not None:
        out = torch.where(undefined[..., None], torch.nan, out)
    out = out.to(q.dtype)
    key_mass = attention_key_mass_reference(q, k, softmax_scale) if return_key_mass else None
    return out, key_mass


@torch.no_grad()
def _undefined_rows(q: torch.Tensor, k: torch.Tensor, softmax_scale: float) -> torch.Tensor | None:
    """``(B, Nq, H)`` bool: query rows whose scores' log-sum-exp is not finite (a NaN, an infinity or all ``-inf``),
    or ``None`` when no row can be one. That is exactly the rows whose largest score is not finite (with a finite
    maximum ``m`` and no NaN, the sum of ``exp(s - m)`` lies in ``[1, Nk]``), and the largest scaled score is the
    scale times the largest score (rounding is monotonic), so one matmul and a max per row decide it, in query tiles
    of at most ``UNDEFINED_ROWS_FLOATS`` scores. Eagerly on a CPU a bound comes first: every partial sum of a score
    is at most ``sum_d |q_d| * max |k|`` in magnitude, so when that bound, times the scale, is finite and far below
    float32's overflow for every row, every score is finite and no row is undefined (reading the bound is a host
    read, free on a CPU; compiled or on a GPU the rows are always computed)."""
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        row_bound = q.abs().sum(dim=-1, dtype=torch.float32)  # (B, Nq, H); NaN or inf for a NaN or inf in q
        key_bound = k.abs().amax(dim=(1, 3)).float()  # (B, H); NaN or inf for a NaN or inf in k
        if bool((row_bound * key_bound[:, None, :] * max(1.0, softmax_scale) <= SCORE_BOUND).all()):
            return None
    acc = compute_dtype(q.dtype)
    kt = k.to(acc).permute(0, 2, 3, 1)  # (B, H, D, Nk)
    tile = max(KEY_MASS_QUERY_TILE, UNDEFINED_ROWS_FLOATS // (q.shape[0] * q.shape[2] * k.shape[1]))
    rows = []
    for start in range(0, q.shape[1], tile):
        q_tile = q[:, start : start + tile].to(acc).transpose(1, 2)  # (B, H, t, D)
        rows.append(~torch.isfinite(torch.matmul(q_tile, kt).amax(dim=-1) * softmax_scale))
    return torch.cat(rows, dim=2).transpose(1, 2)


@torch.no_grad()
def attention_key_mass_reference(q: torch.Tensor, k: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """``sum_i softmax_j(q_i . k_j * scale)`` per key ``j``, averaged over heads, in query tiles.

    Args:
        q: ``(B, Nq, H, D)``; k: ``(B, Nk, H, D)``.

    Returns:
        ``(B, Nk)`` float32 (float64 for float64 inputs); extra memory ``O(B * H * tile * Nk)``.
    """
    acc = compute_dtype(q.dtype)
    kt = k.to(acc).permute(0, 2, 3, 1)  # (B, H, D, Nk)
    mass = torch.zeros(k.shape[0], k.shape[2], k.shape[1], dtype=acc, device=k.device)  # (B, H, Nk)
    for start in range(0, q.shape[1], KEY_MASS_QUERY_TILE):
        q_tile = q[:, start : start + KEY_MASS_QUERY_TILE].to(acc).transpose(1, 2)  # (B, H, t, D)
        probs = torch.softmax(torch.matmul(q_tile, kt) * softmax_scale, dim=-1)  # (B, H, t, Nk)
        mass += probs.sum(dim=2)
    return mass.mean(dim=1).to(torch.float64 if acc == torch.float64 else torch.float32)
