"""NVTX ranges through the ``nvtx`` package (``torch.cuda.nvtx`` raises on CPU builds of torch).

The package is optional: without it (some GPU images ship only NVIDIA's libraries) the ranges are no-ops.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import nvtx
except ImportError:
    nvtx = None

DOMAIN = "omninft_fast"


def nvtx_range(name: str) -> contextlib.AbstractContextManager:
    """A context manager marking ``name`` on the Nsight Systems timeline; near free without a profiler.

    Empty while ``torch.compile`` traces: a compiled graph runs without these Python calls (and ``nvtx``'s
    Cython domain lookup would break the graph).
    """
    if nvtx is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return nvtx.annotate(name, domain=DOMAIN)
