"""NVTX ranges through the ``nvtx`` package (``torch.cuda.nvtx`` raises on CPU builds of torch)."""

from __future__ import annotations

import nvtx

DOMAIN = "omninft_fast"


def nvtx_range(name: str) -> nvtx.annotate:
    """A context manager marking ``name`` on the Nsight Systems timeline; near free without a profiler."""
    return nvtx.annotate(name, domain=DOMAIN)
