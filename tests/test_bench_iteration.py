"""The iteration benchmark's comparison runs on the CPU at the micro config's sizes and counts each loop's
arithmetic."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_iteration  # noqa: E402


def test_count_flops_counts_cpu_attention_forward_and_backward() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, requires_grad=True) for n in (5, 7, 7))

    def attend() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    counted = bench_iteration.count_flops(attend)
    forward = 2 * 2 * 3 * 5 * 7 * (8 + 8)
    assert counted["attention"] == forward * 7 / 2
    assert counted["other"] == 0 and counted["total"] == counted["attention"]


def test_compare_reports_equal_losses_and_less_arithmetic_for_the_engine() -> None:
    pytest.importorskip("ltx_core", reason="the benchmark's model is ltx-core's LTX-2 (the ltx2 extra)")
    result = bench_iteration.compare("cpu", 1, dry_run=True, flops=True)
    assert result["first_iteration_loss_rel_diff"] < 1e-5
    engine, baseline = result["engine"]["flops"], result["baseline"]["flops"]
    for counts in (engine, baseline):
        assert counts["attention"] > 0 and counts["other"] > 0
        assert counts["total"] == counts["attention"] + counts["other"]
    assert 1 < result["flops_ratio"] == baseline["total"] / engine["total"]
    assert result["engine"]["achieved_gflops_per_s"] > 0
    report = bench_iteration.to_markdown(result)
    assert "the engine's arithmetic" in report and f"{result['flops_ratio']:.2f}x" in report
