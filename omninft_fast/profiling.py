"""NVTX ranges through the ``nvtx`` package (``torch.cuda.nvtx`` raises on CPU builds of torch).

The package is optional: without it (some GPU images ship only NVIDIA's libraries) the ranges are no-ops.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

try:
    import nvtx
except ImportError:
    nvtx = None

DOMAIN = "omninft_fast"


def nvtx_range(name: str) -> AbstractContextManager:
    """A context manager marking ``name`` on the Nsight Systems timeline; near free without a profiler."""
    if nvtx is None:
        return contextlib.nullcontext()
    return nvtx.annotate(name, domain=DOMAIN)
