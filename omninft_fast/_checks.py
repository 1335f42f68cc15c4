"""Argument validation shared by the public ops: every error names the offending argument.

Two kinds of checks: free ones (types, shapes, dtypes, devices, Python scalars) run on every call; value checks
(``check_finite_tensor``, ``check_range``) read tensor data, i.e. synchronise a GPU with the host and stop
``torch.compile`` from tracing, so ops run them only where ``value_checks_on`` says so.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def parse_device(device: str | torch.device, name: str) -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` naming ``name`` unless it names one (whether or not this
    machine has it)."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must name a torch device such as cpu or cuda:0, got {device!r}") from None


def check_device(device: str | torch.device, name: str) -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` naming ``name`` unless it is the CPU or an accelerator (with
    its index in range) this machine has."""
    parsed = parse_device(device, name)
    if parsed.type == "cpu":
        return parsed
    present = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if present is None or present.type != parsed.type:
        has = "only a CPU" if present is None else f"a {present.type} device, not {parsed.type}"
        raise ValueError(f"{name} {str(device)!r} is not available on this machine (it has {has})")
    count = torch.accelerator.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"{name} {str(device)!r} is not available on this machine (it has {count} {parsed.type})")
    return parsed


def check_tensor(
    name: str,
    x: object,
    *,
    ndim: int | None = None,
    floating: bool = True,
) -> torch.Tensor:
    """Check that ``x`` is a tensor of rank ``ndim`` with a supported floating dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"{name} must have a floating dtype ({allowed}), got {x.dtype}")
    return x


def check_shape(name: str, x: torch.Tensor, shape: Sequence[int], what: str) -> None:
    """Check ``x.shape == shape``; ``what`` explains where the expected shape comes from."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(x.shape)}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Check that every tensor in ``others`` lives on ``reference``'s device."""
    for name, x in others.items():
        if x is not None and x.device != reference.device:
            raise ValueError(f"{name} is on {x.device} but {reference_name} is on {reference.device}")


CHECK_VALUES_ENV = "OMNINFT_CHECK_VALUES"


def value_checks_on(check_values: object, device: torch.device) -> bool:
    """Whether an op inspects tensor values (ranges, NaN, zero sums) in this call.

    Never while ``torch.compile`` traces; else ``check_values`` when it is a bool; else ``$OMNINFT_CHECK_VALUES``
    (``1`` on, ``0`` off) when set; else on for CPU tensors and off for all others (a CUDA check would wait for the
    GPU on every call).
    """
    if check_values is not None and not isinstance(check_values, bool):
        raise TypeError(f"check_values must be a bool or None, got {type(check_values).__name__}")
    if torch.compiler.is_compiling():
        return False
    if check_values is not None:
        return check_values
    setting = os.environ.get(CHECK_VALUES_ENV, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{CHECK_VALUES_ENV}={setting!r} must be 0 or 1")
    return setting == "1" if setting else device.type == "cpu"


def _readable(name: str, x: object) -> torch.Tensor:
    """``x`` as a tensor whose values can be read (``TypeError`` / ``ValueError`` naming ``name``)."""
    check_tensor(name, x, floating=False)
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values to check")
    return x


def check_finite_tensor(name: str, x: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first non-finite element of ``x``."""
    bad = ~torch.isfinite(_readable(name, x))
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        position = ", ".join(str(i) for i in index)
        raise ValueError(f"{name}[{position}] is not finite ({x[index].item()})")


def check_range(name: str, x: torch.Tensor, low: float, high: float) -> None:
    """Raise ``ValueError`` naming the first element of ``x`` outside ``[low, high]``."""
    x = _readable(name, x)
    bad = ~((x >= low) & (x <= high))
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        position = ", ".join(str(i) for i in index)
        raise ValueError(f"{name}[{position}] = {x[index].item()} is outside [{low}, {high}]")


def check_scalar(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
) -> float:
    """Check that ``value`` is a finite real number in the given bounds and return it as ``float``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {bound} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value
