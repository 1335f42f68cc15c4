"""The one place that decides which implementation of a kernel-backed op runs.

Backends:
- ``reference``: plain PyTorch (``omninft_fast/ops``), any device; the ground truth.
- ``triton``: kernels in ``omninft_fast.kernels``; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
- ``cpp``: the ``omninft_fast._C`` extension built from ``csrc/``; CPU tensors.
- ``auto``: CUDA tensors take ``triton``, CPU tensors take ``cpp`` where built, else ``reference``.

The choice per call is, in order: the op's ``backend=`` argument, the environment variable
``OMNINFT_BACKEND``, then ``auto``.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("auto", "triton", "cpp", "reference")
ENV_VAR = "OMNINFT_BACKEND"


# Loaders of the implementations, one per (op, backend). They import with plain ``import`` statements, which
# ``torch.compile`` traces (``importlib`` calls would break the graph), so a compiled op resolves its backend
# inside the graph at no cost and recompiles when ``$OMNINFT_BACKEND`` changes.
def _attention_reference() -> Callable:
    from omninft_fast.ops.attention import cross_attention_reference

    return cross_attention_reference


def _attention_triton() -> Callable:
    from omninft_fast.kernels.cross_attention import cross_attention_triton

    return cross_attention_triton


def _nft_loss_reference() -> Callable:
    from omninft_fast.ops.nft_loss import nft_loss_reference

    return nft_loss_reference


def _nft_loss_triton() -> Callable:
    from omninft_fast.ops.nft_loss_triton import nft_loss_triton

    return nft_loss_triton


def _nft_loss_cpp() -> Callable:
    from omninft_fast.ops.nft_loss_cpp import nft_loss_cpp

    return nft_loss_cpp


def _fp8_quantize_reference() -> Callable:
    from omninft_fast.fp8 import quantize_reference

    return quantize_reference


def _fp8_quantize_triton() -> Callable:
    from omninft_fast.fp8 import quantize_triton

    return quantize_triton


# op name -> backend -> loader of its implementation.
IMPLEMENTATIONS: dict[str, dict[str, Callable[[], Callable]]] = {
    "cross_attention": {"reference": _attention_reference, "triton": _attention_triton},
    "nft_loss": {"reference": _nft_loss_reference, "triton": _nft_loss_triton, "cpp": _nft_loss_cpp},
    "fp8_quantize": {"reference": _fp8_quantize_reference, "triton": _fp8_quantize_triton},
}


class BackendError(RuntimeError):
    """A backend was asked for that the op does not have or that cannot run here."""


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: ``backend`` if given, else ``$OMNINFT_BACKEND``, else ``auto``."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        source = ENV_VAR
    if backend not in BACKENDS:
        raise BackendError(f"{source}={backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_cpp_extension() -> str | None:
    try:
        import omninft_fast._C  # noqa: F401
    except ImportError as err:
        return f"the C++ extension omninft_fast._C is not built ({err}); reinstall with a C++ compiler present"
    return None


# Probed once at import, outside any traced region.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_CPP_EXTENSION_ERROR = _probe_cpp_extension()
_WARNED: set[tuple[str, str]] = set()


def triton_available() -> bool:
    """True when the ``triton`` package is installed."""
    return _TRITON_INSTALLED


def cpp_extension_error() -> str | None:
    """Why ``omninft_fast._C`` cannot be used, or ``None`` when it loads."""
    return _CPP_EXTENSION_ERROR


def _why_not(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` here, or ``None`` if it can."""
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreting():
            return "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 (set before import) for CPU tensors"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device.type} tensors"
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ extension runs on CPU tensors, got {device.type} tensors"
        return cpp_extension_error()
    return None


def _warn_fallback_once(op: str, reason: str) -> None:
    if (op, reason) not in _WARNED:
        _WARNED.add((op, reason))
        warnings.warn(f"omninft_fast.{op}: using the PyTorch reference because {reason}", stacklevel=5)


def _auto(op: str, device: torch.device) -> str:
    available = IMPLEMENTATIONS[op]
    preferred = {"cuda": "triton", "cpu": "cpp"}.get(device.type)
    if preferred in available:
        reason = _why_not(preferred, device)
        if reason is None:
            return preferred
        _warn_fallback_once(op, reason)
    return "reference"


def check_op_backend(op: str, backend: str | None) -> None:
    """``BackendError`` naming ``backend`` unless it is ``None`` (read per call from ``$OMNINFT_BACKEND``),
    ``auto`` or one of ``op``'s backends."""
    if backend is not None and requested_backend(backend) != "auto" and backend not in IMPLEMENTATIONS[op]:
        have = ", ".join(["auto", *IMPLEMENTATIONS[op]])
        raise BackendError(f"backend={backend!r}: op {op!r} has no such backend (it has: {have})")


def select(op: str, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """Resolve ``op`` for tensors on ``device``: returns ``(backend name, implementation)``."""
    if op not in IMPLEMENTATIONS:
        raise BackendError(f"unknown op {op!r}; kernel-backed ops are {', '.join(IMPLEMENTATIONS)}")
    check_op_backend(op, backend)
    name = requested_backend(backend)
    if name == "auto":
        name = _auto(op, device)
    if name not in IMPLEMENTATIONS[op]:  # only a backend named by $OMNINFT_BACKEND gets here
        have = ", ".join(IMPLEMENTATIONS[op])
        raise BackendError(f"op {op!r} has no {name!r} backend ({ENV_VAR}={name!r}; it has: {have})")
    reason = _why_not(name, device)
    if reason is not None:
        raise BackendError(f"op {op!r} cannot use the {name!r} backend here: {reason}")
    return name, IMPLEMENTATIONS[op][name]()


def available_backends(op: str, device: torch.device) -> list[str]:
    """The backends of ``op`` that can run on ``device`` in this process."""
    return [name for name in IMPLEMENTATIONS[op] if _why_not(name, device) is None]
