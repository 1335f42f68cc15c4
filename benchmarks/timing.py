"""The one timer of the GPU benchmarks: CUDA-event medians on a GPU, a host timer on a dry run."""

from __future__ import annotations

import time
from collections.abc import Callable


def device_ms(fn: Callable[[], object], dry_run: bool = False, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn`` through ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls,
    warm-up first, repeated for about ``rep_ms``: give calls of several milliseconds a longer one); on a dry run (CPU)
    one host-timed call after one warm-up call."""
    if dry_run:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
