"""GPU-free sm_90a compile check of the cross-attention kernels (Triton's bundled ptxas, no driver needed)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from omninft_fast.kernels.compile_check import (
    KernelSpec,
    compile_for_sm90,
    compile_specs_for_sm90,
    kernel_path,
)
from omninft_fast.kernels.cross_attention import sm90_kernel_specs
from omninft_fast.kernels.cross_attention_bwd import _split_sum_kernel
from omninft_fast.kernels.fp8_quantize import sm90_kernel_specs as fp8_quantize_specs

# H100: 227 KiB of shared memory per block, 255 registers per thread.
MAX_SHARED_BYTES = 227 * 1024


def test_attention_kernels_compile_for_sm90_without_spills():
    # Every kernel at LTX-2's cross-modal head dim in bfloat16, plus the heaviest ones at head dim 128 in float16.
    specs = sm90_kernel_specs(head_dims=(64,), dtypes=(torch.bfloat16,))
    heavy = ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel")
    wide = sm90_kernel_specs(head_dims=(128,), dtypes=(torch.float16,))
    specs += [s for s in wide if s.kernel.endswith(heavy) and "split=False" in s.label]
    results = compile_specs_for_sm90(specs)
    assert len(results) == len(specs)
    table = "\n".join(
        f"{r.name} [{r.label}] registers={r.registers} spills={r.spills} shared={r.shared_bytes}" for r in results
    )
    print(table)
    for r in results:
        assert 0 < r.registers <= 255, table
        assert r.spills == 0, f"{r.name} [{r.label}] spills registers:\n{table}"
        assert r.shared_bytes <= MAX_SHARED_BYTES, table


def test_fp8_quantize_kernel_compiles_for_sm90_without_spills():
    results = compile_specs_for_sm90(fp8_quantize_specs())
    table = "\n".join(f"[{r.label}] registers={r.registers} spills={r.spills}" for r in results)
    print(table)
    assert len(results) == 18 and all(0 < r.registers <= 255 and r.spills == 0 for r in results), table


def test_single_kernel_api_and_errors():
    res = compile_for_sm90(
        _split_sum_kernel,
        signature={"Part": "*fp32", "Out": "*bf16", "numel": "i32", "num_splits": "i32", "scale": "fp32"},
        constexprs={"BLOCK": 1024},
        num_warps=4,
        num_stages=1,
        label="split sum",
    )
    assert res.name == "_split_sum_kernel" and res.label == "split sum" and res.spills == 0 and res.registers > 0
    assert kernel_path(_split_sum_kernel) == "omninft_fast.kernels.cross_attention_bwd:_split_sum_kernel"
    with pytest.raises(ValueError, match="kernel must look like"):
        kernel_path("no_colon")
    with pytest.raises(TypeError, match="kernel must be a @triton.jit function"):
        kernel_path(42)
    with pytest.raises(RuntimeError, match="signature lacks arguments"):
        compile_specs_for_sm90([KernelSpec(kernel_path(_split_sum_kernel), {"Part": "*fp32"}, {"BLOCK": 1024})])
