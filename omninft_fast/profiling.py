"""NVTX ranges through the ``nvtx`` package (``torch.cuda.nvtx`` raises on CPU builds of torch)."""

from __future__ import annotations

import contextlib

import nvtx
import torch

DOMAIN = "omninft_fast"


def nvtx_range(name: str) -> contextlib.AbstractContextManager:
    """A context manager marking ``name`` on the Nsight Systems timeline; near free without a profiler.

    Empty while ``torch.compile`` traces: a compiled graph runs without these Python calls (and ``nvtx``'s
    Cython domain lookup would break the graph).
    """
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return nvtx.annotate(name, domain=DOMAIN)
